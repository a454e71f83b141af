//! Per-source admission control: a token bucket per IP address in front of every
//! expensive (private-key or signature) operation, so one source cannot take the
//! crypto pool from the others.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

use super::Transport;
use crate::flow::Refusal;

/// Sources tracked before idle (full) buckets are swept out.
const SWEEP_AT: usize = 65_536;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Token buckets by key: a source address, or a node.
#[derive(Debug)]
pub struct RateLimiter<K = IpAddr> {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<K, Bucket>>,
}

impl<K: std::hash::Hash + Eq + Copy> RateLimiter<K> {
    /// `rate` requests per second sustained, up to `burst` at once, per source address.
    /// `None` when `rate` is 0 (no limit).
    pub fn new(rate: f64, burst: u32) -> Option<Self> {
        (rate > 0.0).then(|| RateLimiter {
            rate,
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        })
    }

    /// Takes one token for `source` at `now`; false when its bucket is empty.
    pub fn admit(&self, source: K, now: Instant) -> bool {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= SWEEP_AT {
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.last).as_secs_f64() * rate < burst
            });
        }
        let bucket = buckets.entry(source).or_insert(Bucket {
            tokens: self.burst,
            last: now,
        });
        let refill = now.saturating_duration_since(bucket.last).as_secs_f64() * self.rate;
        bucket.tokens = (bucket.tokens + refill).min(self.burst);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Sources currently tracked (for tests and metrics).
    pub fn tracked(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// The per-source budget of one port (or of one kind of work): a token bucket per
/// address and transport, or nothing when the rate is 0. TCP and UDP have buckets of
/// their own: a TCP source proved its address in the handshake, a UDP one did not, so
/// datagrams spoofed "from" a client cannot spend its TCP budget.
#[derive(Debug)]
pub struct Admission {
    tcp: Option<RateLimiter>,
    udp: Option<RateLimiter>,
}

impl Admission {
    pub fn new(rate: f64, burst: u32) -> Self {
        Admission {
            tcp: RateLimiter::new(rate, burst),
            udp: RateLimiter::new(rate, burst),
        }
    }

    /// Spends one token of `source`'s budget on `transport`, or refuses. Call it only
    /// for a request past the cheap checks (length, framing, CRC): garbage must not
    /// spend a source's budget.
    pub fn admit(&self, source: IpAddr, transport: Transport, now: Instant) -> Result<(), Refusal> {
        let limiter = match transport {
            Transport::Tcp => &self.tcp,
            Transport::Udp => &self.udp,
        };
        match limiter {
            Some(limiter) if !limiter.admit(source, now) => Err(Refusal::RateLimited),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_source_gets_its_burst_then_its_rate_and_others_are_unaffected() {
        let limiter: RateLimiter = RateLimiter::new(10.0, 3).unwrap();
        let (a, b) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let t0 = Instant::now();
        assert!((0..3).all(|_| limiter.admit(a, t0)));
        assert!(!limiter.admit(a, t0));
        assert!(limiter.admit(b, t0), "another source has its own bucket");
        // 100 ms at 10/s refills one token, not more.
        let t1 = t0 + Duration::from_millis(100);
        assert!(limiter.admit(a, t1));
        assert!(!limiter.admit(a, t1));
        // A long pause refills to the burst, no further.
        let t2 = t1 + Duration::from_secs(60);
        assert!((0..3).all(|_| limiter.admit(a, t2)));
        assert!(!limiter.admit(a, t2));
    }

    #[test]
    fn tcp_and_udp_budgets_are_apart() {
        let admission = Admission::new(1.0, 2);
        let (source, t0) = ("10.0.0.1".parse().unwrap(), Instant::now());
        assert!((0..2).all(|_| admission.admit(source, Transport::Udp, t0).is_ok()));
        assert_eq!(
            admission.admit(source, Transport::Udp, t0),
            Err(Refusal::RateLimited)
        );
        assert!(admission.admit(source, Transport::Tcp, t0).is_ok());
    }

    #[test]
    fn zero_rate_means_no_limiter() {
        assert!(RateLimiter::<IpAddr>::new(0.0, 10).is_none());
    }

    #[test]
    fn idle_sources_are_swept_so_memory_stays_bounded() {
        let limiter: RateLimiter = RateLimiter::new(1000.0, 1).unwrap();
        let t0 = Instant::now();
        for i in 0..SWEEP_AT as u32 {
            limiter.admit(IpAddr::from(i.to_be_bytes()), t0);
        }
        assert_eq!(limiter.tracked(), SWEEP_AT);
        limiter.admit("192.0.2.1".parse().unwrap(), t0 + Duration::from_secs(1));
        assert_eq!(limiter.tracked(), 1);
    }
}
