//! `registrar-node load pubkey`: registrations/s or attestations/s on the envelope port.
//!
//! Register mode signs every frame before the timed window (fresh device ids and P-256
//! keys), so the window only sends and reads. Attest mode registers one device per
//! connection before the window; in it each connection loops Challenge → Attest, which
//! signs the server's nonce in the window (a device cannot sign it earlier).

use registrar::core::random;
use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, ValueEnum};
use registrar::client::pubkey::{self, DeviceKey};
use registrar::wire::envelope::{DEFAULT_MAX_PAYLOAD, HEADER_LEN, TRAILER_LEN};
use registrar::wire::pubkey::{DeviceId, parse_challenge_reply};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Register fresh devices (one signed Register frame each).
    Register,
    /// Challenge → Attest round trips of already registered devices.
    Attest,
}

#[derive(Args, Debug)]
pub struct LoadPubkeyArgs {
    /// Server host name or IP address.
    #[arg(long, env = "REGISTRAR_SERVER")]
    server: String,
    #[arg(long, default_value_t = 8447)]
    envelope_port: u16,
    /// What to measure.
    #[arg(long, value_enum, default_value_t = Mode::Register)]
    mode: Mode,
    /// Concurrent clients, each with its own connection (or UDP socket).
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Operations to complete (registrations, or attestations).
    #[arg(long, default_value_t = 10_000)]
    count: usize,
    /// One datagram per frame instead of TCP.
    #[arg(long)]
    udp: bool,
    /// Per-request reply timeout.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// The listener's process id: report its CPU time over the window.
    #[arg(long)]
    listener_pid: Option<u32>,
    /// Requests each connection keeps in flight: it sends this many frames at once
    /// (one write on TCP), then reads their replies, matched by request id. 1 is
    /// one request at a time, as a device does; more is a gateway multiplexing many
    /// devices over one connection.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pipeline: u32,
}

enum Conn {
    Tcp(TcpStream),
    Udp(UdpSocket),
}

impl Conn {
    async fn open(addr: SocketAddr, udp: bool) -> Result<Conn> {
        Ok(if udp {
            let socket = UdpSocket::bind(if addr.is_ipv4() {
                "0.0.0.0:0"
            } else {
                "[::]:0"
            })
            .await?;
            socket.connect(addr).await?;
            Conn::Udp(socket)
        } else {
            let stream = TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            Conn::Tcp(stream)
        })
    }

    /// Sends `frames` at once and reads one reply to each: their statuses and
    /// payloads, in the order of `frames` whatever order the replies came in.
    async fn exchange(&mut self, frames: &[Vec<u8>]) -> Result<Vec<(u16, Vec<u8>)>> {
        let mut ids = Vec::with_capacity(frames.len());
        for frame in frames {
            let (header, _) =
                pubkey::parse_reply(frame, u32::MAX).map_err(|e| anyhow!("{:?}", e.error))?;
            ids.push(header.request_id);
        }
        let mut replies: Vec<Option<(u16, Vec<u8>)>> = vec![None; frames.len()];
        match self {
            Conn::Udp(socket) => {
                for frame in frames {
                    socket.send(frame).await?;
                }
            }
            Conn::Tcp(stream) => stream.write_all(&frames.concat()).await?,
        }
        for _ in 0..frames.len() {
            let reply = self.read_reply().await?;
            let (header, payload) = pubkey::parse_reply(&reply, u32::MAX)
                .map_err(|e| anyhow!("bad reply frame: {:?}", e.error))?;
            let slot = ids
                .iter()
                .position(|id| *id == header.request_id)
                .and_then(|i| replies.get_mut(i).filter(|r| r.is_none()))
                .ok_or_else(|| anyhow!("reply to request {} not asked for", header.request_id))?;
            *slot = Some((header.status.0, payload.to_vec()));
        }
        Ok(replies.into_iter().flatten().collect())
    }

    /// One whole reply frame.
    async fn read_reply(&mut self) -> Result<Vec<u8>> {
        Ok(match self {
            Conn::Udp(socket) => {
                let mut buf = vec![0u8; 65_536];
                let n = socket.recv(&mut buf).await?;
                buf.truncate(n);
                buf
            }
            Conn::Tcp(stream) => {
                let mut reply = vec![0u8; HEADER_LEN];
                stream.read_exact(&mut reply).await?;
                let len = u32::from_be_bytes(reply[12..16].try_into().expect("4 bytes")) as usize;
                if len > DEFAULT_MAX_PAYLOAD as usize * 64 {
                    bail!("reply declares {len} payload bytes");
                }
                reply.resize(HEADER_LEN + len + TRAILER_LEN, 0);
                stream.read_exact(&mut reply[HEADER_LEN..]).await?;
                reply
            }
        })
    }
}

fn device() -> Result<(DeviceId, DeviceKey)> {
    let id = DeviceId::new(random::bytes()?).map_err(|e| anyhow!("device id: {e}"))?;
    Ok((id, DeviceKey::generate()?))
}

pub fn run(args: &LoadPubkeyArgs) -> Result<serde_json::Value> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    runtime.block_on(run_async(args))
}

async fn run_async(args: &LoadPubkeyArgs) -> Result<serde_json::Value> {
    if args.count == 0 || args.connections == 0 {
        bail!("--count and --connections must be at least 1");
    }
    let addr = (args.server.as_str(), args.envelope_port)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| anyhow!("{}: no address", args.server))?;

    // Before the window: signed Register frames, or one registered device per connection.
    let prepared: Arc<Vec<Vec<u8>>> = Arc::new(match args.mode {
        Mode::Register => {
            eprintln!("signing {} Register frames …", args.count);
            (0..args.count)
                .map(|i| {
                    let (id, key) = device()?;
                    Ok(pubkey::register_frame(i as u32, id, &key)?)
                })
                .collect::<Result<_>>()?
        }
        Mode::Attest => Vec::new(),
    });
    let mut devices = Vec::new();
    if args.mode == Mode::Attest {
        let mut conn = Conn::open(addr, false)
            .await
            .context("registering the devices")?;
        for i in 0..args.connections {
            let (id, key) = device()?;
            let (status, _) = conn
                .exchange(&[pubkey::register_frame(i as u32, id, &key)?])
                .await?
                .remove(0);
            if status != 201 {
                bail!("registering a load device: status {status}");
            }
            devices.push((id, key));
        }
    }

    let cpu_before = args
        .listener_pid
        .map(crate::load::process_cpu_seconds)
        .transpose()?;
    let threads_before = args
        .listener_pid
        .map(crate::load::thread_cpu_seconds)
        .transpose()?;
    let machine_before = crate::load::MachineCpu::now();
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    let mut devices = devices.into_iter();
    for _ in 0..args.connections {
        let (next, done, prepared) = (Arc::clone(&next), Arc::clone(&done), Arc::clone(&prepared));
        let (mode, count, udp, timeout) = (args.mode, args.count, args.udp, args.timeout);
        let pipeline = args.pipeline as usize;
        let device = devices.next();
        workers.spawn(async move {
            let mut histogram = crate::load::latency_histogram()?;
            let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
            let mut conn = Conn::open(addr, udp).await?;
            let mut request_id = 0u32;
            loop {
                let first = next.fetch_add(pipeline, Ordering::Relaxed);
                if first >= count {
                    break;
                }
                let batch = first..(first + pipeline).min(count);
                let sent = Instant::now();
                let outcome = match (mode, &device) {
                    (Mode::Register, _) => {
                        tokio::time::timeout(timeout, conn.exchange(&prepared[batch.clone()])).await
                    }
                    (Mode::Attest, Some((id, key))) => {
                        tokio::time::timeout(timeout, async {
                            let challenges: Vec<Vec<u8>> = batch
                                .clone()
                                .map(|_| {
                                    request_id = request_id.wrapping_add(1);
                                    pubkey::challenge_frame(request_id, *id)
                                })
                                .collect();
                            let mut results = conn.exchange(&challenges).await?;
                            let mut attests = Vec::new();
                            let mut slots = Vec::new();
                            for (slot, (status, payload)) in results.iter().enumerate() {
                                if *status != 200 {
                                    continue;
                                }
                                let nonce =
                                    parse_challenge_reply(payload).map_err(|e| anyhow!("{e}"))?;
                                request_id = request_id.wrapping_add(1);
                                attests.push(pubkey::attest_frame(request_id, *id, nonce, key)?);
                                slots.push(slot);
                            }
                            for (slot, result) in
                                slots.into_iter().zip(conn.exchange(&attests).await?)
                            {
                                results[slot] = result;
                            }
                            anyhow::Ok(results)
                        })
                        .await
                    }
                    (Mode::Attest, None) => unreachable!("one device per connection"),
                };
                let names: Vec<String> = match outcome {
                    Ok(Ok(results)) => results
                        .into_iter()
                        .map(|(status, _)| status.to_string())
                        .collect(),
                    failed => {
                        // Replies still on their way would be read as answers to the
                        // next batch: start over on a fresh connection.
                        conn = Conn::open(addr, udp).await?;
                        let name = if failed.is_err() {
                            "no_reply"
                        } else {
                            "io_error"
                        };
                        vec![name.into(); batch.len()]
                    }
                };
                let latency = sent.elapsed().as_micros().max(1) as u64;
                for name in names {
                    histogram.saturating_record(latency);
                    *outcomes.entry(name).or_default() += 1;
                }
                done.fetch_add(batch.len() as u64, Ordering::Relaxed);
            }
            anyhow::Ok((histogram, outcomes))
        });
    }
    let (progress, ticker) = crate::load::progress(args.count, &done);
    let mut histogram = crate::load::latency_histogram()?;
    let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
    while let Some(result) = workers.join_next().await {
        let (h, o) = result??;
        histogram.add(&h)?;
        for (k, v) in o {
            *outcomes.entry(k).or_default() += v;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    ticker.abort();
    progress.finish_and_clear();
    let cpu = match (args.listener_pid, cpu_before) {
        (Some(pid), Some(before)) => Some(crate::load::process_cpu_seconds(pid)? - before),
        _ => None,
    };
    let threads_after = args
        .listener_pid
        .map(crate::load::thread_cpu_seconds)
        .transpose()?;
    let machine_after = crate::load::MachineCpu::now();
    let success = if args.mode == Mode::Register {
        "201"
    } else {
        "200"
    };
    let ok = outcomes.get(success).copied().unwrap_or(0);
    Ok(json!({
        "operation": if args.mode == Mode::Register { "registration" } else { "attestation" },
        "transport": if args.udp { "udp" } else { "tcp" },
        "connections": args.connections,
        "completed": ok,
        "seconds": secs,
        "per_second": ok as f64 / secs,
        "latency_ms": crate::load::latency_json(&histogram),
        "outcomes": outcomes,
        "listener_cpu_seconds": cpu,
        "listener_cpu_us_per_operation": cpu.filter(|_| ok > 0).map(|c| c * 1e6 / ok as f64),
        "listener_cpu_us_per_operation_by_thread": match (&threads_before, &threads_after) {
            (Some(b), Some(a)) => crate::load::thread_cpu_us_per_op(b, a, ok),
            _ => serde_json::Value::Null,
        },
        "machine_cpu": crate::load::MachineCpu::report(&machine_before, &machine_after, ok),
    }))
}

pub fn summary(r: &serde_json::Value) -> String {
    let text = format!(
        "{} {}s in {:.2} s over {} {} connections: {:.1}/s\n\
         latency ms: p50 {:.3}  p90 {:.3}  p99 {:.3}  max {:.3}\n\
         outcomes by status: {}",
        r["completed"],
        r["operation"].as_str().unwrap_or(""),
        r["seconds"].as_f64().unwrap_or(0.0),
        r["connections"],
        r["transport"].as_str().unwrap_or(""),
        r["per_second"].as_f64().unwrap_or(0.0),
        r["latency_ms"]["p50"].as_f64().unwrap_or(0.0),
        r["latency_ms"]["p90"].as_f64().unwrap_or(0.0),
        r["latency_ms"]["p99"].as_f64().unwrap_or(0.0),
        r["latency_ms"]["max"].as_f64().unwrap_or(0.0),
        r["outcomes"]
            .as_object()
            .map(|m| m
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect::<Vec<_>>()
                .join(", "))
            .unwrap_or_default(),
    );
    let cpu = match (
        r["listener_cpu_seconds"].as_f64(),
        r["listener_cpu_us_per_operation"].as_f64(),
    ) {
        (Some(cpu), Some(per)) => {
            format!("\nlistener CPU: {cpu:.2} s user+sys, {per:.1} µs per operation")
        }
        _ => String::new(),
    };
    text + &cpu
        + &crate::load::threads_summary(&r["listener_cpu_us_per_operation_by_thread"])
        + &crate::load::machine_summary(
            &r["machine_cpu"],
            r["listener_cpu_us_per_operation"].as_f64(),
            "operation",
        )
}
