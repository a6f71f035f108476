//! MCP relay benchmark: what the host's byte relays add, measured against the same echo
//! server reached directly, in the same run.
//!
//! `cargo bench -p attestplane --bench relay`. Environment: `RELAY_BENCH_ROUNDS` (default
//! 20000) round trips per latency phase; `RELAY_BENCH_MIB` (default 256) MiB per throughput
//! phase.
//!
//! Phases:
//! - latency: one client, 1 KiB request / 1 KiB answer ping-pong over one connection, direct
//!   TCP to the echo vs through the agent relay (TCP in, Unix socket to the "enclave" echo);
//!   p50 / p99 per round trip and the difference;
//! - throughput: one connection streaming one way through the agent relay, MiB/s;
//! - dial: connection set-up through the dialer (request, registry lookup, TCP connect to the
//!   registered echo, reply), p50 / p99.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use attestplane_host::relay::{Relay, RelayConfig, RelayLimits};
use attestplane_host::store::Store;
use attestplane_proto::{
    Address, DialRequest, DialStatus, ServerId, connect, read_dial_reply, write_dial,
};
use attestplane_verifier::admin::AdminAction;
use ed25519_dalek::SigningKey;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener};

#[path = "../tests/support/registrations.rs"]
mod registrations;
use registrations::{append_admin, spec};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn echo<S: AsyncRead + AsyncWrite + Unpin>(s: S) {
    let (mut r, mut w) = tokio::io::split(s);
    let _ = tokio::io::copy(&mut r, &mut w).await;
    let _ = w.shutdown().await;
}

async fn ping_pong<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, rounds: usize) -> Vec<Duration> {
    let msg = vec![7u8; 1024];
    let mut back = vec![0u8; 1024];
    let mut times = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        s.write_all(&msg).await.unwrap();
        s.read_exact(&mut back).await.unwrap();
        times.push(t.elapsed());
    }
    times.sort();
    times
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let rounds = env("RELAY_BENCH_ROUNDS", 20_000);
    let mib = env("RELAY_BENCH_MIB", 256);
    let dir = tempfile::tempdir().unwrap();

    // The echo, on TCP (the direct path and the registered upstream) and on a Unix socket
    // (the enclave's MCP port).
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tcp_addr = tcp.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = tcp.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(echo(s));
        }
    });
    let unix_path = dir.path().join("enclave-mcp.sock");
    let unix = UnixListener::bind(&unix_path).unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = unix.accept().await {
            tokio::spawn(echo(s));
        }
    });

    // A store registering the echo as "echo".
    let store = Arc::new(Store::open(dir.path().join("log")).unwrap());
    let key = SigningKey::from_bytes(&[5; 32]);
    let spec = spec("echo", &format!("http://{tcp_addr}"));
    append_admin(&store, &key, 0, AdminAction::RegisterServer(spec), true).await;

    let relay = Relay::start(
        RelayConfig {
            mcp_listen: "127.0.0.1:0".parse().unwrap(),
            enclave_mcp: Address::Unix(unix_path),
            dial_listen: Address::Unix(dir.path().join("dial.sock")),
            limits: RelayLimits::default(),
        },
        Arc::clone(&store),
    )
    .await
    .unwrap();

    // Latency, interleaved in blocks so that machine noise hits both paths alike.
    let mut direct = TcpStream::connect(tcp_addr).await.unwrap();
    direct.set_nodelay(true).unwrap();
    let mut relayed = TcpStream::connect(relay.mcp_addr()).await.unwrap();
    relayed.set_nodelay(true).unwrap();
    ping_pong(&mut direct, 1000).await;
    ping_pong(&mut relayed, 1000).await;
    let (mut d, mut r) = (Vec::new(), Vec::new());
    for _ in 0..10 {
        d.extend(ping_pong(&mut direct, rounds / 10).await);
        r.extend(ping_pong(&mut relayed, rounds / 10).await);
    }
    d.sort();
    r.sort();
    println!("latency, 1 KiB ping-pong, {rounds} round trips each, same run:");
    for (name, p) in [("p50", 0.5), ("p90", 0.9), ("p99", 0.99)] {
        println!(
            "  {name}: direct {:7.1} µs   relayed {:7.1} µs   added {:6.1} µs",
            us(pct(&d, p)),
            us(pct(&r, p)),
            us(pct(&r, p)) - us(pct(&d, p))
        );
    }

    // Throughput, one way (the echo's answer is drained alongside).
    let s = TcpStream::connect(relay.mcp_addr()).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let total = mib << 20;
    let drain = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut n = 0usize;
        while n < total {
            let k = rd.read(&mut buf).await.unwrap();
            if k == 0 {
                break;
            }
            n += k;
        }
        n
    });
    let chunk = vec![1u8; 64 * 1024];
    let t = Instant::now();
    for _ in 0..(total / chunk.len()) {
        wr.write_all(&chunk).await.unwrap();
    }
    let got = drain.await.unwrap();
    let secs = t.elapsed().as_secs_f64();
    println!(
        "throughput through the agent relay (echoed back through it): {:.0} MiB/s each way ({} MiB in {:.2} s)",
        (got as f64 / (1 << 20) as f64) / secs,
        got >> 20,
        secs
    );

    // Dial set-up.
    let mut times = Vec::new();
    let request = DialRequest::new(ServerId::new("echo").unwrap())
        .encode()
        .unwrap();
    for _ in 0..2000 {
        let t = Instant::now();
        let mut c = connect(relay.dial_addr()).await.unwrap();
        write_dial(&mut c, &request).await.unwrap();
        let reply = read_dial_reply(&mut c).await.unwrap();
        assert_eq!(reply.status, DialStatus::Connected);
        times.push(t.elapsed());
    }
    times.sort();
    println!(
        "dial set-up (request, registry lookup, TCP connect, reply), 2000 dials: p50 {:.1} µs, p99 {:.1} µs",
        us(pct(&times, 0.5)),
        us(pct(&times, 0.99))
    );
    relay.shutdown().await;
}
