//! The table of open TCP connections, one for all the ports of a listener: the cap on
//! all of them (`--max-connections`), the cap per source address
//! (`--max-connections-per-source`), and who goes when the table is full: the
//! connection idle the longest, not the newcomer. A connection is idle while it is not
//! handling a request (it may be waiting for one, or for the rest of one).
//!
//! It also keeps the budget of request bytes buffered by all connections together
//! (`--max-buffered`): a connection takes from it before its buffer grows, waits when
//! it is spent, and when it stays spent the largest holder is closed.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::metrics;

/// The connection table; cloning it shares it.
#[derive(Debug, Clone)]
pub struct ConnectionLimit {
    table: Arc<Mutex<Table>>,
    /// Woken whenever buffered bytes are given back.
    released: Arc<Notify>,
    max: usize,
    per_source: usize,
    max_buffered: usize,
}

#[derive(Debug, Default)]
struct Table {
    entries: HashMap<u64, Entry>,
    by_source: HashMap<IpAddr, usize>,
    /// Idle connections, the longest idle first.
    idle: BTreeSet<(Instant, u64)>,
    next_id: u64,
    /// Request bytes buffered by all connections.
    buffered: usize,
}

#[derive(Debug)]
struct Entry {
    source: IpAddr,
    port: &'static str,
    idle_since: Option<Instant>,
    buffered: usize,
    evict: CancellationToken,
}

/// Why a connection was not let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Its source has `--max-connections-per-source` open.
    SourceFull,
    /// `--max-connections` are open and every one of them is handling a request.
    Full,
}

impl Refused {
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::SourceFull => "source_full",
            Refused::Full => "full",
        }
    }
}

impl ConnectionLimit {
    pub fn new(max: usize, per_source: usize, max_buffered: usize) -> Self {
        ConnectionLimit {
            table: Arc::default(),
            released: Arc::default(),
            max,
            per_source: per_source.max(1),
            max_buffered,
        }
    }

    pub fn max(&self) -> usize {
        self.max
    }

    pub fn per_source(&self) -> usize {
        self.per_source
    }

    /// A place in the table for a connection from `source` on `port`, idle from `now`;
    /// when the table is full, the connection idle the longest is told to close
    /// ([`Connection::evicted`]) and its place taken.
    pub fn try_open(
        &self,
        source: IpAddr,
        port: &'static str,
        now: Instant,
    ) -> Result<Connection, Refused> {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if table.by_source.get(&source).copied().unwrap_or(0) >= self.per_source {
            return Err(Refused::SourceFull);
        }
        if table.entries.len() >= self.max {
            let &(since, oldest) = table.idle.first().ok_or(Refused::Full)?;
            table.idle.remove(&(since, oldest));
            if let Some(entry) = table.remove(oldest) {
                metrics::connection_closed(entry.port, "evicted");
                entry.evict.cancel();
            }
        }
        let id = table.next_id;
        table.next_id += 1;
        let evict = CancellationToken::new();
        table.entries.insert(
            id,
            Entry {
                source,
                port,
                idle_since: Some(now),
                buffered: 0,
                evict: evict.clone(),
            },
        );
        table.idle.insert((now, id));
        *table.by_source.entry(source).or_default() += 1;
        Ok(Connection {
            limit: self.clone(),
            id,
            evicted: evict,
        })
    }

    /// Closes the connection holding the most buffered bytes (counted as shed for the
    /// budget); false when none holds any.
    fn shed_largest(&self) -> bool {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let Some((&id, _)) = table
            .entries
            .iter()
            .filter(|(_, e)| e.buffered > 0)
            .max_by_key(|(_, e)| e.buffered)
        else {
            return false;
        };
        let entry = table.remove(id).expect("just found");
        if let Some(since) = entry.idle_since {
            table.idle.remove(&(since, id));
        }
        metrics::connection_closed(entry.port, "buffer_budget");
        entry.evict.cancel();
        drop(table);
        self.released.notify_waiters();
        true
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entries
            .len()
    }
}

impl Table {
    /// Forgets connection `id` and gives back its buffered bytes (its idle mark is the
    /// caller's to drop).
    fn remove(&mut self, id: u64) -> Option<Entry> {
        let entry = self.entries.remove(&id)?;
        self.buffered -= entry.buffered;
        if let Some(count) = self.by_source.get_mut(&entry.source) {
            *count -= 1;
            if *count == 0 {
                self.by_source.remove(&entry.source);
            }
        }
        Some(entry)
    }
}

/// A connection's place in the table, given up when dropped.
#[derive(Debug)]
pub struct Connection {
    limit: ConnectionLimit,
    id: u64,
    evicted: CancellationToken,
}

/// How long a connection waits for buffer budget before the largest holder is shed.
const BUDGET_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

impl Connection {
    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.limit.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Handling a request: not to be evicted.
    pub fn busy(&self) {
        let mut table = self.table();
        let id = self.id;
        if let Some(since) = table.entries.get_mut(&id).and_then(|e| e.idle_since.take()) {
            table.idle.remove(&(since, id));
        }
    }

    /// Done with its requests from `now`: the first to go once it is the longest idle.
    pub fn idle(&self, now: Instant) {
        let mut table = self.table();
        let id = self.id;
        if let Some(entry) = table.entries.get_mut(&id)
            && entry.idle_since.is_none()
        {
            entry.idle_since = Some(now);
            table.idle.insert((now, id));
        }
    }

    /// Cancelled when the table needed this connection's place, or its buffer.
    pub fn evicted(&self) -> &CancellationToken {
        &self.evicted
    }

    /// Sets what this connection buffers to `bytes`, if the budget allows it: false
    /// when it does not (nothing changes).
    fn try_hold(&self, bytes: usize) -> bool {
        let mut table = self.table();
        let Some(held) = table.entries.get(&self.id).map(|e| e.buffered) else {
            return true;
        };
        let total = table.buffered - held + bytes;
        if bytes > held && total > self.limit.max_buffered {
            return false;
        }
        table.buffered = total;
        table.entries.get_mut(&self.id).expect("present").buffered = bytes;
        drop(table);
        if bytes < held {
            self.limit.released.notify_waiters();
        }
        true
    }

    /// Waits until this connection may buffer `bytes` in all: while the budget is
    /// spent it reads nothing; after [`BUDGET_WAIT`] without relief the largest holder
    /// is closed (perhaps this one: then [`Connection::evicted`] fires and this
    /// returns false).
    pub async fn hold(&self, bytes: usize) -> bool {
        loop {
            if self.evicted.is_cancelled() {
                return false;
            }
            let released = self.limit.released.notified();
            if self.try_hold(bytes) {
                return true;
            }
            let relieved = tokio::time::timeout(BUDGET_WAIT, released).await.is_ok();
            if !relieved && !self.try_hold(bytes) && !self.limit.shed_largest() {
                // Nobody holds anything, yet this does not fit: a frame larger than
                // the whole budget.
                return false;
            }
        }
    }

    /// Buffers nothing any more.
    pub fn release(&self) {
        self.try_hold(0);
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        let mut table = self.table();
        if let Some(entry) = table.remove(self.id) {
            if let Some(since) = entry.idle_since {
                table.idle.remove(&(since, self.id));
            }
            if entry.buffered > 0 {
                drop(table);
                self.limit.released.notify_waiters();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    #[test]
    fn a_source_has_its_cap_and_others_are_let_in() {
        let limit = ConnectionLimit::new(10, 2, 1 << 20);
        let now = Instant::now();
        let a = limit.try_open(ip(1), "reg", now).unwrap();
        let _b = limit.try_open(ip(1), "reg", now).unwrap();
        assert_eq!(
            limit.try_open(ip(1), "reg", now).unwrap_err(),
            Refused::SourceFull
        );
        assert!(limit.try_open(ip(2), "reg", now).is_ok());
        drop(a);
        assert!(limit.try_open(ip(1), "reg", now).is_ok(), "a place freed");
    }

    #[test]
    fn a_full_table_evicts_the_longest_idle_and_never_a_busy_one() {
        let limit = ConnectionLimit::new(3, 3, 1 << 20);
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let first = limit.try_open(ip(1), "reg", at(0)).unwrap();
        let second = limit.try_open(ip(2), "state", at(1)).unwrap();
        let third = limit.try_open(ip(3), "envelope", at(2)).unwrap();
        // The first is busy: the second, idle the longest, goes.
        first.busy();
        let fourth = limit.try_open(ip(4), "cert", at(3)).unwrap();
        assert!(!first.evicted().is_cancelled());
        assert!(second.evicted().is_cancelled());
        assert_eq!(limit.open(), 3);
        // Idle again from 4 ms: now the third (idle since 2 ms) is the oldest.
        first.idle(at(4));
        let _fifth = limit.try_open(ip(5), "cert", at(5)).unwrap();
        assert!(third.evicted().is_cancelled());
        assert!(!first.evicted().is_cancelled());
        // Dropping an evicted connection frees nothing twice.
        drop((second, third));
        assert_eq!(limit.open(), 3);
        // All busy: refused.
        first.busy();
        fourth.busy();
        _fifth.busy();
        assert_eq!(
            limit.try_open(ip(6), "reg", at(6)).unwrap_err(),
            Refused::Full
        );
    }

    #[tokio::test]
    async fn a_spent_budget_holds_readers_then_sheds_the_largest_holder() {
        let limit = ConnectionLimit::new(10, 10, 1000);
        let now = Instant::now();
        let big = limit.try_open(ip(1), "envelope", now).unwrap();
        let small = limit.try_open(ip(2), "envelope", now).unwrap();
        assert!(big.hold(700).await);
        assert!(small.hold(200).await);
        // 200 more do not fit; nobody gives any back: the largest holder goes.
        let newcomer = limit.try_open(ip(3), "envelope", now).unwrap();
        assert!(newcomer.hold(200).await);
        assert!(big.evicted().is_cancelled());
        assert!(!small.evicted().is_cancelled());
        // Given back while one waits: it goes on, nobody is shed.
        let waiter = limit.try_open(ip(4), "envelope", now).unwrap();
        let waiting = tokio::spawn(async move { (waiter.hold(700).await, waiter) });
        tokio::task::yield_now().await;
        small.release();
        newcomer.release();
        let (held, waiter) = waiting.await.unwrap();
        assert!(held);
        assert!(!small.evicted().is_cancelled() && !newcomer.evicted().is_cancelled());
        // More than the whole budget never fits.
        waiter.release();
        assert!(!waiter.hold(1001).await);
    }
}
