//! The crypto pool: private-key operations run on dedicated threads, never on the
//! tokio reactor, fed by a bounded queue. A full queue sheds the request at once.
//!
//! Under sustained overload a bounded queue alone still lets every admitted request
//! wait the whole queue out. So the pool also sheds by sojourn time, as CoDel does:
//! when every request has waited longer than `target` for a whole `INTERVAL`, requests
//! that waited longer than `target` are shed at their turn (cheaply, without the
//! private-key work) until one comes through within it. A burst that drains within
//! the interval (a fleet powering on) is served in full; a standing queue is not.
//!
//! Under load a worker also hands results back in small batches: it runs the tasks
//! already queued (up to [`MAX_BATCH`], for at most [`BATCH_TIME`]) before waking any
//! of their callers. The reactor then wakes once for the batch, and their store
//! commands leave in one write instead of one each: on 2 cores that was the largest
//! cost beside the crypto itself. A lone task is answered as soon as it is done.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::flow::{Offload, Refusal};

/// A task's work: it returns what hands the result to the caller.
type Task = Box<dyn FnOnce() -> Completion + Send>;
type Completion = Box<dyn FnOnce() + Send>;

/// Tasks one worker runs before it hands their results back, at most.
pub const MAX_BATCH: usize = 8;
/// A worker stops adding tasks to a batch after this much work, so the first one's
/// caller does not wait long (one RSA-4096 decryption is about this long).
pub const BATCH_TIME: Duration = Duration::from_millis(1);

/// How long the queue may stand above the target before shedding starts.
pub const INTERVAL: Duration = Duration::from_millis(100);

/// The sojourn-time controller shared by the workers.
#[derive(Debug)]
struct Sojourn {
    target: Duration,
    state: Mutex<SojournState>,
}

#[derive(Debug, Default)]
struct SojournState {
    /// When the current run of over-target waits started, if one is running.
    above_since: Option<Instant>,
    /// When shedding last stopped: a queue that stands again soon after is shed again
    /// at once, without waiting out a fresh interval (CoDel's quick re-entry).
    stopped_shedding: Option<Instant>,
}

impl Sojourn {
    fn new(target: Duration) -> Self {
        Sojourn {
            target,
            state: Mutex::new(SojournState::default()),
        }
    }

    /// Whether a task that waited `waited` should be shed now.
    fn shed(&self, waited: Duration, now: Instant) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if waited <= self.target {
            if let Some(since) = state.above_since.take()
                && now.duration_since(since) >= INTERVAL
            {
                state.stopped_shedding = Some(now);
            }
            return false;
        }
        let recently_shedding = state
            .stopped_shedding
            .is_some_and(|t| now.duration_since(t) < 10 * INTERVAL);
        let since = *state.above_since.get_or_insert(if recently_shedding {
            now.checked_sub(INTERVAL).unwrap_or(now)
        } else {
            now
        });
        now.duration_since(since) >= INTERVAL
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("crypto queue full")]
pub struct Overloaded;

/// Sets the calling thread's nice value. Lowering one's own priority needs no privilege;
/// elsewhere than on Linux the call would apply to the whole process, so it is skipped.
fn lower_priority(nice: i32) {
    if nice == 0 {
        return;
    }
    #[cfg(target_os = "linux")]
    if let Err(e) = rustix::process::setpriority_process(None, nice) {
        tracing::warn!(nice, error = %e, "cannot lower the crypto threads' priority");
    }
    #[cfg(not(target_os = "linux"))]
    tracing::warn!(nice, "--crypto-nice is applied on Linux only");
}

#[derive(Clone)]
pub struct CryptoPool {
    queue: SyncSender<Task>,
    depth: Arc<AtomicUsize>,
    sojourn: Option<Arc<Sojourn>>,
}

impl CryptoPool {
    /// `threads` workers (normally one per core) behind a queue of `capacity` tasks;
    /// with a `target`, a standing queue is shed by sojourn time (module docs). The
    /// workers run at `nice` (0–19; Linux sets it per thread, so the I/O thread keeps
    /// its own priority and preempts them when it has replies to send).
    pub fn new(
        threads: usize,
        capacity: usize,
        target: Option<Duration>,
        nice: i32,
    ) -> std::io::Result<Self> {
        let (queue, tasks) = mpsc::sync_channel::<Task>(capacity);
        let tasks = Arc::new(Mutex::new(tasks));
        for i in 0..threads.max(1) {
            let tasks = Arc::clone(&tasks);
            thread::Builder::new()
                .name(format!("crypto-{i}"))
                .spawn(move || {
                    lower_priority(nice);
                    let mut done = Vec::with_capacity(MAX_BATCH);
                    // The lock is held only while taking a task, never while running one.
                    loop {
                        // Bound first: a guard in a `while let` would live through the body.
                        let next = tasks.lock().map(|rx| rx.recv());
                        let Ok(Ok(first)) = next else { return };
                        let started = Instant::now();
                        done.push(first());
                        while done.len() < MAX_BATCH && started.elapsed() < BATCH_TIME {
                            // A busy lock means another worker is waiting on an empty
                            // queue: nothing more to batch, and waiting would stall
                            // this batch until the next task arrives.
                            let next = tasks.try_lock().map(|rx| rx.try_recv());
                            match next {
                                Ok(Ok(task)) => done.push(task()),
                                _ => break,
                            }
                        }
                        for complete in done.drain(..) {
                            complete();
                        }
                    }
                })?;
        }
        Ok(CryptoPool {
            queue,
            depth: Arc::new(AtomicUsize::new(0)),
            sojourn: target.map(|target| Arc::new(Sojourn::new(target))),
        })
    }

    /// Tasks queued or running.
    pub fn depth(&self) -> usize {
        self.depth.load(Ordering::Relaxed)
    }

    /// Runs `work` on the pool; `Overloaded` at once when the queue is full.
    pub async fn submit<T, F>(&self, work: F) -> Result<T, Overloaded>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (done, result) = oneshot::channel();
        let depth = Arc::clone(&self.depth);
        depth.fetch_add(1, Ordering::Relaxed);
        let (enqueued, sojourn) = (Instant::now(), self.sojourn.clone());
        let task: Task = Box::new(move || {
            let now = Instant::now();
            let outcome = if sojourn.is_some_and(|s| s.shed(now.duration_since(enqueued), now)) {
                Err(Overloaded)
            } else {
                Ok(work())
            };
            Box::new(move || {
                // Counted out before the caller can see the result.
                depth.fetch_sub(1, Ordering::Relaxed);
                let _ = done.send(outcome);
            })
        });
        match self.queue.try_send(task) {
            Ok(()) => result.await.unwrap_or(Err(Overloaded)),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.depth.fetch_sub(1, Ordering::Relaxed);
                Err(Overloaded)
            }
        }
    }
}

/// The flows' private-key and signature work runs here; the queue depth is a metric.
impl Offload for CryptoPool {
    async fn run<T, W>(&self, work: W) -> Result<T, Refusal>
    where
        T: Send + 'static,
        W: FnOnce() -> T + Send + 'static,
    {
        let done = self.submit(work).await;
        super::metrics::crypto_queue_depth(self.depth());
        done.map_err(|Overloaded| Refusal::Overloaded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn workers_run_at_the_nice_value_and_the_caller_keeps_its_own() {
        let before = rustix::process::getpriority_process(None).unwrap();
        let pool = CryptoPool::new(2, 16, None, 19).unwrap();
        let in_worker = pool
            .run(|| rustix::process::getpriority_process(None).unwrap())
            .await
            .unwrap();
        assert_eq!(in_worker, 19);
        assert_eq!(rustix::process::getpriority_process(None).unwrap(), before);
    }

    #[tokio::test]
    async fn runs_work_off_the_reactor_and_sheds_when_full() {
        let pool = CryptoPool::new(1, 1, None, 0).unwrap();
        assert_eq!(pool.submit(|| 6 * 7).await, Ok(42));

        // Block the only worker, fill the one queue slot, and the next task is shed.
        let (release, blocked) = std::sync::mpsc::channel::<()>();
        let (started_tx, started) = oneshot::channel();
        let p = pool.clone();
        let first = tokio::spawn(async move {
            p.submit(move || {
                let _ = started_tx.send(());
                blocked.recv().unwrap();
            })
            .await
        });
        started.await.unwrap();
        let p = pool.clone();
        let queued = tokio::spawn(async move { p.submit(|| 1).await });
        // Wait until the queued task is counted, without sleeping on a guess.
        tokio::time::timeout(Duration::from_secs(10), async {
            while pool.depth() < 2 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the queued task is counted within 10 s");
        assert_eq!(pool.submit(|| 2).await, Err(Overloaded));
        release.send(()).unwrap();
        assert_eq!(first.await.unwrap(), Ok(()));
        assert_eq!(queued.await.unwrap(), Ok(1));
        assert_eq!(pool.depth(), 0);
    }

    #[test]
    fn a_burst_is_served_but_a_standing_queue_is_shed_until_a_request_is_on_time() {
        let s = Sojourn::new(Duration::from_millis(20));
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        // A burst: waits above target, but for less than one interval.
        assert!(!s.shed(ms(30), t0));
        assert!(!s.shed(ms(60), t0 + ms(50)));
        assert!(!s.shed(ms(5), t0 + ms(90)), "on time again: the run ends");
        // A standing queue: above target for a whole interval, then shed.
        assert!(!s.shed(ms(30), t0 + ms(200)));
        assert!(!s.shed(ms(40), t0 + ms(250)));
        assert!(s.shed(ms(50), t0 + ms(300)));
        assert!(s.shed(ms(25), t0 + ms(301)));
        // The first request within target is served and ends the shedding.
        assert!(!s.shed(ms(10), t0 + ms(302)));
        // A queue standing again soon after is shed at once (quick re-entry)...
        assert!(s.shed(ms(25), t0 + ms(303)));
        assert!(!s.shed(ms(10), t0 + ms(304)));
        // ...but long after, it gets a fresh interval, as a burst would.
        assert!(!s.shed(ms(25), t0 + ms(2000)));
    }

    #[tokio::test]
    async fn a_lone_task_is_answered_while_another_worker_waits_for_work() {
        // One worker waits on the empty queue while the other finishes a task: the
        // result must not wait for a next task to arrive (each run waits for the last).
        let pool = CryptoPool::new(2, 16, None, 0).unwrap();
        for i in 0..200 {
            let answered =
                tokio::time::timeout(Duration::from_secs(10), pool.submit(move || i)).await;
            assert_eq!(answered, Ok(Ok(i)), "task {i} was held back");
        }
    }

    #[tokio::test]
    async fn every_task_of_a_batch_gets_its_own_result() {
        let pool = CryptoPool::new(2, 256, None, 0).unwrap();
        let mut runs = tokio::task::JoinSet::new();
        for i in 0..200u64 {
            let pool = pool.clone();
            runs.spawn(async move { (i, pool.submit(move || i * i).await) });
        }
        let mut answered = 0;
        while let Some(done) = runs.join_next().await {
            let (i, result) = done.unwrap();
            assert_eq!(result, Ok(i * i));
            answered += 1;
        }
        assert_eq!(answered, 200);
        assert_eq!(pool.depth(), 0);
    }

    #[tokio::test]
    async fn a_pool_with_a_target_runs_work_that_is_on_time() {
        let pool = CryptoPool::new(1, 4, Some(Duration::from_millis(20)), 0).unwrap();
        assert_eq!(pool.submit(|| 5).await, Ok(5));
    }
}
