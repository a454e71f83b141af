//! Prometheus metrics: what happened, by flow, transport and outcome.
//!
//! Recording goes through the `metrics` facade (a no-op until a recorder is
//! installed, so tests and admin commands pay nothing); `serve --metrics-addr` installs
//! the Prometheus recorder and serves its text at `GET /metrics`. The refusals under
//! load and the failed requests are also summed here for the log ([`report`]), recorder
//! or not.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::Transport;

pub const REQUESTS: &str = "registrar_requests_total";
pub const LATENCY: &str = "registrar_request_duration_seconds";
pub const SHED: &str = "registrar_shed_total";
pub const RATE_LIMITED: &str = "registrar_rate_limited_total";
pub const STORE_ERRORS: &str = "registrar_store_errors_total";
pub const CONNECTIONS: &str = "registrar_open_connections";
pub const CONNECTIONS_REFUSED: &str = "registrar_connections_refused_total";
pub const CONNECTIONS_CLOSED: &str = "registrar_connections_closed_total";
pub const CRYPTO_QUEUE: &str = "registrar_crypto_queue_depth";
pub const UDP_KERNEL_DROPS: &str = "registrar_udp_receive_buffer_drops";
pub const UDP_REPLACED: &str = "registrar_udp_replies_replaced_total";
pub const UDP_WITHHELD: &str = "registrar_udp_replies_withheld_total";

/// One finished request.
pub fn request(flow: &'static str, transport: Transport, outcome: &'static str, latency: Duration) {
    let transport = transport.as_str();
    counter!(REQUESTS, "flow" => flow, "transport" => transport, "outcome" => outcome).increment(1);
    histogram!(LATENCY, "flow" => flow, "transport" => transport).record(latency.as_secs_f64());
}

/// A request refused because the crypto queue was full or standing.
pub fn shed(flow: &'static str, transport: Transport) {
    counter!(SHED, "flow" => flow, "transport" => transport.as_str()).increment(1);
    SHED_SINCE_REPORT.fetch_add(1, Ordering::Relaxed);
}

/// A request refused by the per-source token bucket.
pub fn rate_limited(flow: &'static str, transport: Transport) {
    counter!(RATE_LIMITED, "flow" => flow, "transport" => transport.as_str()).increment(1);
    RATE_LIMITED_SINCE_REPORT.fetch_add(1, Ordering::Relaxed);
}

/// Refusals under load since the last report. Under a flood they are thousands a
/// second, and one log line each buried what the operator needs to see (at 2× the
/// maximum rate they were about 40% of the log's bytes), so each goes to `debug` and
/// [`report`] logs their sum once a second.
static SHED_SINCE_REPORT: AtomicU64 = AtomicU64::new(0);
static RATE_LIMITED_SINCE_REPORT: AtomicU64 = AtomicU64::new(0);

/// Sources told apart in one report; the rest are summed as others.
const TALLIED_SOURCES: usize = 4096;

/// Requests that failed since the last report (a bad frame, a refused passphrase, an
/// unknown node, …): any source can cause them at line rate, so each is a `debug` line
/// and [`report`] sums them once a second, by flow and outcome, naming the source that
/// sent the most.
#[derive(Default)]
struct FailureTally {
    by_outcome: BTreeMap<(&'static str, &'static str), u64>,
    /// Failures of the store's (unavailable, or holding what cannot be opened): the
    /// summary is then a WARN.
    store_failed: u64,
    by_source: HashMap<IpAddr, u64>,
    other_sources: u64,
}

static FAILED_SINCE_REPORT: LazyLock<Mutex<FailureTally>> = LazyLock::new(Mutex::default);

/// Counts a failed request for the next [`report`]; `store` when the store failed it.
pub fn failed(flow: &'static str, outcome: &'static str, source: IpAddr, store: bool) {
    let mut tally = FAILED_SINCE_REPORT
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    *tally.by_outcome.entry((flow, outcome)).or_default() += 1;
    tally.store_failed += u64::from(store);
    let known = tally.by_source.len();
    match tally.by_source.get_mut(&source) {
        Some(count) => *count += 1,
        None if known < TALLIED_SOURCES => {
            tally.by_source.insert(source, 1);
        }
        None => tally.other_sources += 1,
    }
}

/// How often [`report`] logs what it has counted.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(1);

/// Logs, once per [`REPORT_INTERVAL`] in which there were any, how many requests were
/// shed (503, or dropped on UDP) and rate-limited (429), at WARN, and how many failed,
/// at INFO (WARN when the store failed some); a last time at `cancel`.
pub async fn report(cancel: CancellationToken) {
    let mut tick = tokio::time::interval(REPORT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let last = tokio::select! {
            _ = cancel.cancelled() => true,
            _ = tick.tick() => false,
        };
        let shed = SHED_SINCE_REPORT.swap(0, Ordering::Relaxed);
        let rate_limited = RATE_LIMITED_SINCE_REPORT.swap(0, Ordering::Relaxed);
        if shed + rate_limited > 0 {
            warn!(
                shed,
                rate_limited, "requests refused under load since the last report"
            );
        }
        let tally = std::mem::take(
            &mut *FAILED_SINCE_REPORT
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        if !tally.by_outcome.is_empty() {
            let failed: u64 = tally.by_outcome.values().sum();
            let outcomes = tally
                .by_outcome
                .iter()
                .map(|((flow, outcome), n)| format!("{flow}/{outcome}={n}"))
                .collect::<Vec<_>>()
                .join(" ");
            let sources = tally.by_source.len() as u64 + tally.other_sources;
            let (top_source, top_source_failed) = tally
                .by_source
                .iter()
                .max_by_key(|(_, n)| **n)
                .map(|(ip, n)| (*ip, *n))
                .expect("a failure has a source");
            let store_failed = tally.store_failed;
            if store_failed > 0 {
                warn!(
                    failed,
                    store_failed,
                    outcomes,
                    sources,
                    %top_source,
                    top_source_failed,
                    "requests failed since the last report (each at debug)"
                );
            } else {
                info!(
                    failed,
                    outcomes,
                    sources,
                    %top_source,
                    top_source_failed,
                    "requests failed since the last report (each at debug)"
                );
            }
        }
        if last {
            return;
        }
    }
}

/// A UDP reply too large for the rules, answered with the port's 413 instead.
pub fn udp_reply_replaced(port: &'static str) {
    counter!(UDP_REPLACED, "port" => port).increment(1);
}

/// A UDP reply not sent: it, and anything the port could send instead, would have
/// been larger than the rules allow for the datagram it answered.
pub fn udp_reply_withheld(port: &'static str) {
    counter!(UDP_WITHHELD, "port" => port).increment(1);
}

pub fn store_error(flow: &'static str) {
    counter!(STORE_ERRORS, "flow" => flow).increment(1);
}

pub fn crypto_queue_depth(depth: usize) {
    gauge!(CRYPTO_QUEUE).set(depth as f64);
}

/// A TCP connection refused at accept: its source had `--max-connections-per-source`
/// open (`source_full`), or `--max-connections` were open and none idle (`full`).
pub fn connection_refused(port: &'static str, reason: &'static str) {
    counter!(CONNECTIONS_REFUSED, "port" => port, "reason" => reason).increment(1);
}

/// Why the server closed a TCP connection (idle, partial frame, bad frames, …).
pub fn connection_closed(port: &'static str, reason: &'static str) {
    counter!(CONNECTIONS_CLOSED, "port" => port, "reason" => reason).increment(1);
}

/// Counts an open connection for as long as it lives.
pub struct OpenConnection;

impl OpenConnection {
    pub fn new() -> Self {
        gauge!(CONNECTIONS).increment(1.0);
        OpenConnection
    }
}

impl Default for OpenConnection {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        gauge!(CONNECTIONS).decrement(1.0);
    }
}

/// Installs the Prometheus recorder (latency as a histogram with buckets from 100 µs
/// to 10 s) and returns the handle that renders it.
pub fn install() -> Result<PrometheusHandle, String> {
    const BUCKETS: &[f64] = &[
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0, 10.0,
    ];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(LATENCY.into()), BUCKETS)
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| e.to_string())?;
    describe_series();
    Ok(handle)
}

/// The `# HELP` line of every series.
fn describe_series() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        REQUESTS,
        "Requests answered or dropped, by flow, transport and outcome (every port)."
    );
    describe_histogram!(
        LATENCY,
        metrics::Unit::Seconds,
        "Time from a request's arrival to its reply, by flow and transport."
    );
    describe_counter!(
        SHED,
        "Requests refused because the crypto queue was full or standing (503, or dropped on UDP)."
    );
    describe_counter!(
        RATE_LIMITED,
        "Requests refused by the per-source token bucket (429)."
    );
    describe_counter!(
        STORE_ERRORS,
        "Requests that failed on the store (503), by flow."
    );
    describe_gauge!(CONNECTIONS, "TCP connections open now, all ports together.");
    describe_counter!(
        CONNECTIONS_REFUSED,
        "TCP connections closed at accept, by port and reason (source_full: --max-connections-per-source; full: --max-connections with none idle)."
    );
    describe_counter!(
        CONNECTIONS_CLOSED,
        "TCP connections the server closed, by port and reason (idle, partial_frame, bad_frames, evicted, buffer_budget, …)."
    );
    describe_gauge!(
        CRYPTO_QUEUE,
        "Requests queued for or running on a crypto thread."
    );
    describe_counter!(
        UDP_REPLACED,
        "UDP replies larger than 3x their request or 1,232 bytes, answered with 413 instead, by port."
    );
    describe_counter!(
        UDP_WITHHELD,
        "UDP replies not sent because even an error reply would exceed 3x the datagram it answered, by port."
    );
    describe_gauge!(
        UDP_KERNEL_DROPS,
        "Datagrams the kernel dropped from a full UDP receive buffer, by port (read from /proc at each scrape)."
    );
}

/// Datagrams the kernel dropped because a UDP socket's receive buffer was full (a flood
/// faster than the listener reads): the one limit the listener itself never sees.
/// Read from /proc/net/udp{,6} by local port at each scrape.
fn record_udp_kernel_drops(ports: &[(&'static str, u16)]) {
    for (name, port) in ports {
        let drops: u64 = ["/proc/net/udp", "/proc/net/udp6"]
            .iter()
            .filter_map(|table| std::fs::read_to_string(table).ok())
            .flat_map(|text| {
                text.lines()
                    .skip(1)
                    .filter_map(|line| {
                        let fields: Vec<&str> = line.split_whitespace().collect();
                        let local_port = fields.get(1)?.rsplit(':').next()?;
                        (u16::from_str_radix(local_port, 16).ok()? == *port)
                            .then(|| fields.last()?.parse::<u64>().ok())
                            .flatten()
                    })
                    .collect::<Vec<_>>()
            })
            .sum();
        gauge!(UDP_KERNEL_DROPS, "port" => *name).set(drops as f64);
    }
}

/// Serves `GET /metrics` (HTTP/1.0-style: one response, then close) until `cancel`.
pub async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    cancel: CancellationToken,
    udp_ports: Vec<(&'static str, u16)>,
) {
    let udp_ports: std::sync::Arc<[(&'static str, u16)]> = udp_ports.into();
    loop {
        let (mut stream, peer) = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    warn!(error = %e, "metrics accept failed");
                    continue;
                }
            },
        };
        let (handle, udp_ports) = (handle.clone(), std::sync::Arc::clone(&udp_ports));
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await;
            let Ok(Ok(n)) = read else { return };
            let request = String::from_utf8_lossy(&buf[..n]);
            let response = if request.starts_with("GET /metrics ")
                || request.starts_with("GET /metrics\r")
            {
                record_udp_kernel_drops(&udp_ports);
                handle.run_upkeep();
                let body = handle.render();
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else {
                let body = "only GET /metrics is served here\n";
                format!(
                    "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
            };
            if let Err(e) = stream.write_all(response.as_bytes()).await {
                debug!(%peer, error = %e, "metrics write failed");
            }
            let _ = stream.shutdown().await;
        });
    }
}

/// Where the metrics listener is, for the start-up line.
pub fn describe(addr: SocketAddr) -> String {
    format!("metrics=http://{addr}/metrics")
}
