//! `registrar-node hostile`: what an attacker on the network does to a listener, to
//! measure what it costs (tools/perf/hostile.sh runs these beside a legitimate load).
//! Loopback only: every source address is one of 127.0.0.0/8.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use registrar::client::pubkey::hello_frame;
use registrar::wire::envelope;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, UdpSocket};

#[derive(Subcommand, Debug, Clone)]
pub enum HostileCommand {
    /// Open many TCP connections and hold them, each doing what --behaviour says;
    /// report how many the listener let in, closed, and kept.
    Tcp(TcpArgs),
    /// Send datagrams as fast as possible; report the replies' count and bytes (the
    /// amplification the listener allowed).
    Udp(UdpArgs),
}

/// What each held connection does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Behaviour {
    /// Connect and say nothing.
    Idle,
    /// A Hello on the envelope port every --every (a keep-alive that costs nothing).
    Hello,
    /// A frame header declaring the largest payload, then --partial bytes of it.
    Partial,
    /// One byte of the certificate magic, then nothing.
    Dribble,
}

#[derive(Args, Debug, Clone)]
pub struct TcpArgs {
    /// Loopback address of the listener.
    #[arg(long, default_value = "127.0.0.1")]
    server: Ipv4Addr,
    #[arg(long)]
    port: u16,
    /// Connections to open.
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Source addresses to spread them over: 127.0.0.2, 127.0.0.3, …
    #[arg(long, default_value_t = 1)]
    sources: u8,
    #[arg(long, value_enum, default_value_t = Behaviour::Idle)]
    behaviour: Behaviour,
    /// With --behaviour hello: how often.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    every: Duration,
    /// With --behaviour partial: payload bytes sent after the header.
    #[arg(long, default_value_t = 16_000)]
    partial: usize,
    /// With --behaviour partial: the payload length the header declares.
    #[arg(long, default_value_t = 16_384)]
    declared: u32,
    /// How long to hold the connections.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    hold: Duration,
}

#[derive(Args, Debug, Clone)]
pub struct UdpArgs {
    #[arg(long, default_value = "127.0.0.1")]
    server: Ipv4Addr,
    #[arg(long)]
    port: u16,
    /// Datagrams to send.
    #[arg(long, default_value_t = 100_000)]
    datagrams: u64,
    /// Bytes per datagram (content: --content).
    #[arg(long, default_value_t = 1)]
    size: usize,
    /// What the datagrams hold.
    #[arg(long, value_enum, default_value_t = Content::Garbage)]
    content: Content,
    /// Source address (spoofing, on loopback: any 127/8 address).
    #[arg(long, default_value = "127.0.0.2")]
    source: Ipv4Addr,
    /// How long to wait for late replies after the last datagram.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    linger: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Content {
    /// Bytes 0x5a.
    Garbage,
    /// An envelope Hello, zero-padded to --size if larger than a bare one.
    Hello,
}

pub fn run(command: HostileCommand) -> Result<Value> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match command {
        HostileCommand::Tcp(args) => runtime.block_on(tcp(args)),
        HostileCommand::Udp(args) => runtime.block_on(udp(args)),
    }
}

/// What happened to the connections, counted as they go.
#[derive(Default)]
struct Tally {
    /// Connected (the handshake completed).
    connected: AtomicU64,
    /// The connect itself failed.
    failed: AtomicU64,
    /// Closed by the listener within a second of connecting (refused at accept).
    refused: AtomicU64,
    /// Closed by the listener later, while held.
    closed: AtomicU64,
    /// Still open at the end of --hold.
    held: AtomicU64,
}

async fn tcp(args: TcpArgs) -> Result<Value> {
    if !args.server.is_loopback() {
        bail!("hostile traffic goes to loopback addresses only");
    }
    let server = SocketAddr::from((args.server, args.port));
    let tally = Arc::new(Tally::default());
    let started = Instant::now();
    let end = tokio::time::Instant::now() + args.hold;
    let args = Arc::new(args);
    let mut tasks = Vec::with_capacity(args.connections);
    for i in 0..args.connections {
        let source = source_address(i, args.sources);
        let (tally, args) = (Arc::clone(&tally), Arc::clone(&args));
        tasks.push(tokio::spawn(async move {
            hold_one(server, source, &args, &tally, end).await;
        }));
        // Connects in bursts, as a flood does, without exhausting the accept backlog.
        if i % 256 == 255 {
            tokio::task::yield_now().await;
        }
    }
    for task in tasks {
        let _ = task.await;
    }
    let count = |c: &AtomicU64| c.load(Ordering::Relaxed);
    Ok(json!({
        "behaviour": format!("{:?}", args.behaviour).to_lowercase(),
        "connections": args.connections,
        "sources": args.sources,
        "connected": count(&tally.connected),
        "connect_failed": count(&tally.failed),
        "refused_at_accept": count(&tally.refused),
        "closed_by_listener": count(&tally.closed),
        "held_to_the_end": count(&tally.held),
        "seconds": started.elapsed().as_secs_f64(),
    }))
}

/// 127.0.0.2, 127.0.0.3, … by turns.
fn source_address(i: usize, sources: u8) -> IpAddr {
    let n = (i % usize::from(sources.max(1))) as u8;
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + n))
}

async fn hold_one(
    server: SocketAddr,
    source: IpAddr,
    args: &TcpArgs,
    tally: &Tally,
    end: tokio::time::Instant,
) {
    let connect = async {
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(source, 0))?;
        socket.connect(server).await
    };
    let mut stream = match connect.await {
        Ok(stream) => stream,
        Err(_) => {
            tally.failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    tally.connected.fetch_add(1, Ordering::Relaxed);
    let opened = Instant::now();
    let first: Vec<u8> = match args.behaviour {
        Behaviour::Idle => Vec::new(),
        Behaviour::Hello => hello_frame(0),
        Behaviour::Partial => {
            let mut frame = envelope::to_vec(
                &envelope::Header::request(envelope::Flow::PUBKEY, envelope::Kind(1), 0),
                &vec![0u8; args.declared as usize],
            );
            frame.truncate(envelope::HEADER_LEN + args.partial.min(args.declared as usize));
            frame
        }
        Behaviour::Dribble => vec![registrar::wire::ijam::CERT_REQUEST[0]],
    };
    if !first.is_empty() && stream.write_all(&first).await.is_err() {
        tally.closed.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let mut buf = [0u8; 4096];
    let mut next_hello = tokio::time::Instant::now() + args.every;
    loop {
        let wake = if args.behaviour == Behaviour::Hello {
            next_hello.min(end)
        } else {
            end
        };
        tokio::select! {
            read = stream.read(&mut buf) => match read {
                Ok(0) | Err(_) => {
                    if opened.elapsed() < Duration::from_secs(1) && args.behaviour == Behaviour::Idle {
                        tally.refused.fetch_add(1, Ordering::Relaxed);
                    } else {
                        tally.closed.fetch_add(1, Ordering::Relaxed);
                    }
                    return;
                }
                Ok(_) => {}
            },
            _ = tokio::time::sleep_until(wake) => {
                if tokio::time::Instant::now() >= end {
                    tally.held.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                next_hello += args.every;
                if stream.write_all(&hello_frame(0)).await.is_err() {
                    tally.closed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
    }
}

async fn udp(args: UdpArgs) -> Result<Value> {
    if !args.server.is_loopback() || !args.source.is_loopback() {
        bail!("hostile traffic goes to and from loopback addresses only");
    }
    let socket = Arc::new(
        UdpSocket::bind((args.source, 0))
            .await
            .with_context(|| format!("bind {}", args.source))?,
    );
    socket.connect((args.server, args.port)).await?;
    let datagram = match args.content {
        Content::Garbage => vec![0x5a; args.size],
        Content::Hello => {
            let bare = hello_frame(0);
            if args.size <= bare.len() {
                bare
            } else {
                registrar::client::pubkey::request_frame(
                    envelope::Flow::CORE,
                    registrar::wire::core::HELLO,
                    0,
                    &vec![0u8; args.size - bare.len()],
                )
            }
        }
    };
    let (replies, reply_bytes) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let receiver = {
        let (socket, replies, reply_bytes) = (
            Arc::clone(&socket),
            Arc::clone(&replies),
            Arc::clone(&reply_bytes),
        );
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            while let Ok(n) = socket.recv(&mut buf).await {
                replies.fetch_add(1, Ordering::Relaxed);
                reply_bytes.fetch_add(n as u64, Ordering::Relaxed);
            }
        })
    };
    let started = Instant::now();
    let mut sent = 0u64;
    for _ in 0..args.datagrams {
        // A full socket buffer (ENOBUFS) drops a datagram: the flood goes on.
        if socket.send(&datagram).await.is_ok() {
            sent += 1;
        }
    }
    let sending = started.elapsed();
    tokio::time::sleep(args.linger).await;
    receiver.abort();
    let (replies, reply_bytes) = (
        replies.load(Ordering::Relaxed),
        reply_bytes.load(Ordering::Relaxed),
    );
    let sent_bytes = sent * datagram.len() as u64;
    Ok(json!({
        "datagram_bytes": datagram.len(),
        "sent": sent,
        "sent_bytes": sent_bytes,
        "sent_per_second": sent as f64 / sending.as_secs_f64(),
        "replies": replies,
        "reply_bytes": reply_bytes,
        "amplification": if sent_bytes == 0 { 0.0 } else { reply_bytes as f64 / sent_bytes as f64 },
    }))
}

/// One line for people.
pub fn summary(json: &Value) -> String {
    if json.get("behaviour").is_some() {
        format!(
            "{} {} connections from {} sources: {} connected, {} refused at accept, {} closed by the listener, {} held to the end",
            json["behaviour"].as_str().unwrap_or_default(),
            json["connections"],
            json["sources"],
            json["connected"],
            json["refused_at_accept"],
            json["closed_by_listener"],
            json["held_to_the_end"]
        )
    } else {
        format!(
            "{} datagrams of {} bytes sent ({:.0}/s): {} replies, {} bytes back, amplification {:.2}",
            json["sent"],
            json["datagram_bytes"],
            json["sent_per_second"].as_f64().unwrap_or_default(),
            json["replies"],
            json["reply_bytes"],
            json["amplification"].as_f64().unwrap_or_default()
        )
    }
}
