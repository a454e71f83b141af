//! The crypto pool: private-key operations run on dedicated threads, never on the
//! tokio reactor, fed by a bounded queue. A full queue sheds the request at once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread;

use tokio::sync::oneshot;

type Task = Box<dyn FnOnce() + Send>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("crypto queue full")]
pub struct Overloaded;

#[derive(Clone)]
pub struct CryptoPool {
    queue: SyncSender<Task>,
    depth: Arc<AtomicUsize>,
}

impl CryptoPool {
    /// `threads` workers (normally one per core) behind a queue of `capacity` tasks.
    pub fn new(threads: usize, capacity: usize) -> std::io::Result<Self> {
        let (queue, tasks) = mpsc::sync_channel::<Task>(capacity);
        let tasks = Arc::new(Mutex::new(tasks));
        for i in 0..threads.max(1) {
            let tasks = Arc::clone(&tasks);
            thread::Builder::new()
                .name(format!("crypto-{i}"))
                .spawn(move || {
                    loop {
                        // The lock is held only while waiting for the next task.
                        let next = tasks.lock().map(|rx| rx.recv());
                        match next {
                            Ok(Ok(task)) => task(),
                            _ => return,
                        }
                    }
                })?;
        }
        Ok(CryptoPool {
            queue,
            depth: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Tasks queued or running.
    pub fn depth(&self) -> usize {
        self.depth.load(Ordering::Relaxed)
    }

    /// Runs `work` on the pool; `Overloaded` at once when the queue is full.
    pub async fn run<T, F>(&self, work: F) -> Result<T, Overloaded>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (done, result) = oneshot::channel();
        let depth = Arc::clone(&self.depth);
        depth.fetch_add(1, Ordering::Relaxed);
        let task: Task = Box::new(move || {
            let _ = done.send(work());
            depth.fetch_sub(1, Ordering::Relaxed);
        });
        match self.queue.try_send(task) {
            Ok(()) => result.await.map_err(|_| Overloaded),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.depth.fetch_sub(1, Ordering::Relaxed);
                Err(Overloaded)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_work_off_the_reactor_and_sheds_when_full() {
        let pool = CryptoPool::new(1, 1).unwrap();
        assert_eq!(pool.run(|| 6 * 7).await, Ok(42));

        // Block the only worker, fill the one queue slot, and the next task is shed.
        let (release, blocked) = std::sync::mpsc::channel::<()>();
        let (started_tx, started) = oneshot::channel();
        let p = pool.clone();
        let first = tokio::spawn(async move {
            p.run(move || {
                let _ = started_tx.send(());
                blocked.recv().unwrap();
            })
            .await
        });
        started.await.unwrap();
        let p = pool.clone();
        let queued = tokio::spawn(async move { p.run(|| 1).await });
        // Wait until the queued task is counted, without sleeping on a guess.
        while pool.depth() < 2 {
            tokio::task::yield_now().await;
        }
        assert_eq!(pool.run(|| 2).await, Err(Overloaded));
        release.send(()).unwrap();
        assert_eq!(first.await.unwrap(), Ok(()));
        assert_eq!(queued.await.unwrap(), Ok(1));
        assert_eq!(pool.depth(), 0);
    }
}
