//! `attestplane-load --mode gateway`: MCP `tools/call` through the gateway (issue 10's
//! benchmarks), each figure a ratio against the same upstream called directly in the same run.
//!
//! The stack: `attestplane-enclave --nsm mock` with its gateway (`--mcp-listen`, `--dial`,
//! `--mcp-public-base`), `attestplane proxy` with the MCP relays (`--enclave-mcp`,
//! `--dial-listen`, `--mcp-listen`), and the bench's own upstream (`upstream.rs`: this executable
//! re-run as `attestplane-load bench-upstream`, a fast hyper MCP server that checks every
//! gateway call's receipt, an Ed25519 verification per call as a real deployment's server
//! does). The upstream is registered as assurance `nitro` (mock NSM, the demo server's
//! measurements) with its one tool pinned, and attested; the agents' tokens name the endpoint's
//! resource URI (`{gateway}/mcp/weather`) as their audience. The era measured is the modern
//! one (`2026-07-28`, stateless: no `initialize`, no session), on both sides: agent → gateway
//! and gateway → upstream. Each call is a `tools/call` of `forecast` with `{"city":"Oslo"}`;
//! an answer counts only if it is HTTP 200 carrying a JSON-RPC result (errors are counted by
//! kind: HTTP status, JSON-RPC error code, I/O).
//!
//! Each call through the gateway writes two log entries, each durable (fsync'd by the proxy)
//! before the gateway acts on it: the decision (before the call is forwarded) and the result
//! (before the answer reaches the agent). Its path: load client → proxy's MCP relay (bytes) →
//! enclave (HTTP, authenticate, PII scan, decide, sign the receipt, entry → proxy store →
//! durable) → proxy's dialer (bytes) → upstream (receipt check) → back the same way (PII scan
//! of the answer, result entry → durable) → agent.
//!
//! What it measures, in order:
//!
//! 1. Latency (`--latency-calls N`, one client): N calls through the gateway and N calls to the
//!    upstream directly (`/mcp-unreceipted-baseline`: the same server and code with the receipt
//!    check skipped, see `upstream.rs`), interleaved one for one after a warm-up; p50/p99/
//!    p99.9/max of each and the gateway's added latency (gateway − direct, per percentile).
//! 2. A direct round: `--concurrency` clients calling the upstream directly for `--duration`
//!    (the upstream's own capacity on this machine, to show it does not cap the gateway).
//! 3. `--rounds` gateway rounds of `--concurrency` clients (`--warmup` + `--duration`, or until
//!    `--calls` measured calls), each between two blocks of the gateway's core driven
//!    in-process (`inproc.rs`, `InProcessGateway`, `--in-process` each): the rate, latency,
//!    errors, the log's growth (must be at least 2 entries per answered call, and the
//!    upstream's receipted calls must match), CPU per call of each process (enclave, proxy,
//!    upstream, load client; from /proc), the busiest threads, and the RSS of the enclave (and
//!    the others) sampled every `--rss-every`: start (end of warm-up), middle, end, max.
//!
//! Targets (issue 10): added latency p50 <= 1 ms and p99 <= 5 ms with one client; >= 1500
//! calls/s at 64 clients with p99 < 50 ms and no errors; enclave memory flat over 1,000,000
//! calls (`--rounds 1 --calls 1000000 --duration 30m --agents 1024`: enough agents that none
//! goes over the starter policy's 600 calls a minute, whose refusals count as errors here).
//!
//! Usage (release build, the binaries in the same target directory):
//!
//! ```text
//! cargo build --release -p attestplane-enclave -p attestplane -p attestplane-load
//! target/release/attestplane-load --mode gateway --duration 10s --rounds 1 --latency-calls 1000 --in-process 1s
//! target/release/attestplane-load --mode gateway --rounds 1 --calls 1000000 --duration 30m \
//!     --agents 1024 --latency-calls 0 --in-process 2s --rss-every 5s   # enclave memory, 1M calls
//! ```
//!
//! Measured on 2026-12-05 (binaries built at commit 022f7de: before the store's two
//! group-commit writers and the leaner Persist path landed; the 2-core development machine
//! shared with six other helpers' builds, load average 13.6-15.8 throughout, so NOT the idle
//! machine issue 10's latency target names), first command above:
//!
//! - fdatasync of a 600-byte append on the store's file system: p50 4.35 ms, p99 12.1 ms.
//! - One client, 1000 calls each way interleaved: direct p50 0.090 ms / p99 0.566 ms, through
//!   the gateway p50 11.76 ms / p99 32.9 ms: added p50 11.7 ms, p99 32.3 ms (targets 1 ms / 5
//!   ms: missed). A call waits for two fdatasyncs in sequence (decision, then result): 8.7 ms
//!   of the 11.7 at this disk's p50; the CPU the call costs in all processes is ~0.45 ms.
//!   (An earlier run at load 13.9: added p50 8.4 ms, p99 27.8 ms.)
//! - 64 clients: 1747 tools/call/s (target 1500: met), p50 34.9 ms, p99 71.7 ms (target 50
//!   ms: missed), p99.9 92.1 ms, no errors; in-process gateway core 2478 calls/s (8073 per
//!   CPU-second, 124 us each), gateway / in-process 70.5 %; 15.1 entries per fdatasync; the
//!   upstream alone 26,355 calls/s at 64 clients. CPU per call: enclave 233 us, proxy 97 us,
//!   upstream 121 us (8 us without the receipt check), load client 13 us: ~0.8 of the 2 cores,
//!   the rest taken by the machine's other load. (Earlier run, load 13.9: 1897/s, p99 73.7 ms.)
//!
//! Re-measured at commit 80b0415 (the store's two group-commit writers and the leaner Persist
//! path landed; 00:28 UTC, load average 11.1-13.9), first command: one client, direct p50 0.087
//! ms / p99 0.187 ms, gateway p50 1.240 ms / p99 6.868 ms: added p50 1.15 ms, p99 6.68 ms
//! (close to, still short of, 1 ms / 5 ms; the probe's appending-file fdatasync was unchanged
//! at 3.97 ms p50, so the store's own are far cheaper than it); 64 clients 2195 tools/call/s,
//! p99 65.6 ms, no errors; in-process 4277/s (8788 per CPU-second), 51.3 %; CPU per call:
//! enclave 232 us, proxy 111 us, upstream 116 us, load client 16 us; 6.9 entries per fdatasync.
//!
//! Memory, second command above (started 23:55 UTC, load average 14.7-16.1): 1,000,000 calls in
//! 622.5 s (1606/s, p99 103.7 ms, no errors), log +2,001,488 entries for 1,000,744 answered
//! calls; enclave RSS 12.9 MiB before the first call, 19.8 MiB at 70,000 calls, 20.0 at
//! 517,000, 19.6 at the end, never above 20.2 (sampled every 5 s): flat. Where the CPU goes
//! (perf profiles of each process) is in ARCHITECTURE.md ("Gateway benchmark").

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use attestplane_enclave::nsm::{Clock, MockNsm};
use attestplane_verifier::UnixMillis;
use attestplane_verifier::attestation::{Expectations, TrustAnchor, VerifyAt, verify_attestation};
use attestplane_verifier::gateway::jsonrpc::{Kind, parse_message};
use attestplane_verifier::gateway::pin::tool_digest;
use attestplane_verifier::gateway::receipt::attested_key;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use sha2::{Digest as _, Sha256};

use crate::inproc::InProcessGateway;
use crate::stack::{self, Child};
use crate::world::{self, World};
use crate::{Cli, bootstrap, clients, http, log_size, percentile_ms, proxy_metrics, spread};

/// Issue 10's targets.
const TARGET_ADDED_P50_MS: f64 = 1.0;
const TARGET_ADDED_P99_MS: f64 = 5.0;
const TARGET_RATE: f64 = 1500.0;
const TARGET_P99_MS: f64 = 50.0;

/// The modern protocol version.
const MODERN: &str = "2026-07-28";

/// The agent's `tools/call`.
const CALL: &str = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"forecast","arguments":{"city":"Oslo"},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}"#;

/// What the upstream answers it (for the in-process reference).
const ANSWER: &str = r#"{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"Forecast for Oslo: sunny, 21 °C (demo data)"}],"isError":false}}"#;

/// The running gateway stack.
struct Stack {
    children: Vec<Child>,
    /// The run directory.
    dir: std::path::PathBuf,
    api: SocketAddr,
    /// The proxy's MCP relay (agents connect here).
    gateway: SocketAddr,
    /// The upstream.
    upstream: SocketAddr,
    enclave_pid: u32,
    proxy_pid: u32,
    upstream_pid: u32,
}

impl Stack {
    async fn stop(self) {
        for c in self.children {
            c.stop().await;
        }
    }

    fn tails(&self) -> String {
        self.children
            .iter()
            .map(|c| format!("--- {} stderr:\n{}", c.name, c.stderr_tail()))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn pids(&self) -> Vec<(&'static str, Option<u32>)> {
        vec![
            ("enclave", Some(self.enclave_pid)),
            ("proxy", Some(self.proxy_pid)),
            ("upstream", Some(self.upstream_pid)),
            ("load client", None),
        ]
    }
}

fn now() -> UnixMillis {
    UnixMillis::from_system_time(SystemTime::now())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// A free loopback port (bound and released: the enclave must know the gateway's public URL
/// before the proxy binds it).
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?;
    Ok(l.local_addr()?.port())
}

/// Runs the gateway benchmark.
pub fn run(
    cli: &Cli,
    bin_dir: &Path,
    dir: &Path,
    rt: &tokio::runtime::Runtime,
    world: &mut World,
) -> Result<bool> {
    let pcrs = world::image_pcrs(world::IMAGE);
    let pin = tool_digest(crate::upstream::TOOL).map_err(|e| anyhow::anyhow!("pin: {e}"))?;
    let tools: BTreeMap<_, _> = [(pin.name.clone(), pin.digest)].into();
    let mcp_port = free_port()?;
    let public_base = format!("http://127.0.0.1:{mcp_port}");
    let resource = format!("{public_base}/mcp/{}", world::SERVER_ID);
    let tokens = world.tokens_for(cli.agents, now(), &resource)?;

    // The upstream's mock root, for the enclave's --server-root (derived from its public seed).
    let server_root = dir.join("server-root.pem");
    let nsm = MockNsm::builder(crate::upstream::SEED, Clock::System)
        .image_measurements(pcrs[0], pcrs[1], pcrs[2])
        .build();
    std::fs::write(&server_root, nsm.root_pem()?).context("cannot write the server root")?;
    drop(nsm);
    let key_file = dir.join("receipt-key.hex");
    let this = std::env::current_exe().context("cannot find this executable")?;
    let (upstream, upstream_url) = rt.block_on(stack::spawn(
        &this,
        &[
            "bench-upstream".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--receipt-key-file".into(),
            key_file.display().to_string(),
            "--insecure-unreceipted-baseline".into(),
        ],
        dir,
        |l| l.starts_with("http://").then(|| l.to_owned()),
    ))?;
    let upstream_addr: SocketAddr = upstream_url
        .strip_prefix("http://")
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("the upstream printed {upstream_url:?}"))?;
    let spec = World::spec_with(&upstream_url, &pcrs, tools)?;

    eprintln!("attestplane-load: setting up the in-process gateway");
    let mut reference = InProcessGateway::new(
        world,
        tokens.clone(),
        spec.clone(),
        resource.clone(),
        CALL.as_bytes().to_vec(),
        ANSWER.as_bytes().to_vec(),
    )?;

    let stack = rt.block_on(start_stack(
        cli,
        bin_dir,
        dir,
        world,
        spec,
        upstream,
        upstream_addr,
        mcp_port,
        &public_base,
        &key_file,
        &tokens[0],
    ))?;
    eprintln!(
        "attestplane-load: stack up: API http://{}, gateway http://{}, upstream {upstream_url} (run directory {})",
        stack.api,
        stack.gateway,
        dir.display()
    );
    let result = measure(cli, rt, &stack, &mut reference, &tokens);
    if result.is_err() {
        eprintln!("{}", stack.tails());
    }
    rt.block_on(stack.stop());
    result
}

#[allow(clippy::too_many_arguments)]
async fn start_stack(
    cli: &Cli,
    bin_dir: &Path,
    dir: &Path,
    world: &mut World,
    spec: attestplane_verifier::admin::ServerSpec,
    upstream: Child,
    upstream_addr: SocketAddr,
    mcp_port: u16,
    public_base: &str,
    key_file: &Path,
    token: &str,
) -> Result<Stack> {
    let upstream_pid = upstream.pid;
    let mut children = vec![upstream];
    let socket = dir.join("enclave.sock");
    let enclave_mcp = dir.join("enclave-mcp.sock");
    let dial = dir.join("dial.sock");
    let cp_root = dir.join("control-plane-root.pem");
    let started = stack::spawn(
        &bin_dir.join("attestplane-enclave"),
        &[
            "--nsm".into(),
            "mock".into(),
            "--listen".into(),
            format!("unix:{}", socket.display()),
            "--print-mock-root".into(),
            cp_root.display().to_string(),
            "--server-root".into(),
            dir.join("server-root.pem").display().to_string(),
            "--genesis-admin-key".into(),
            world.admin_hex(),
            "--origin".into(),
            world::ORIGIN.into(),
            "--mcp-listen".into(),
            format!("unix:{}", enclave_mcp.display()),
            "--dial".into(),
            format!("unix:{}", dial.display()),
            "--mcp-public-base".into(),
            public_base.into(),
        ],
        dir,
        |l| (!l.is_empty()).then(|| l.to_owned()),
    )
    .await;
    let enclave = match started {
        Ok((c, _)) => c,
        Err(e) => {
            for c in children {
                c.stop().await;
            }
            return Err(e);
        }
    };
    let enclave_pid = enclave.pid;
    children.push(enclave);
    let mut proxy_args = vec![
        "proxy".into(),
        "--enclave".into(),
        format!("unix:{}", socket.display()),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--data-dir".into(),
        dir.join("proxy").display().to_string(),
        "--genesis-admin-key".into(),
        world.admin_hex(),
        "--enclave-mcp".into(),
        format!("unix:{}", enclave_mcp.display()),
        "--dial-listen".into(),
        format!("unix:{}", dial.display()),
        "--mcp-listen".into(),
        format!("127.0.0.1:{mcp_port}"),
    ];
    if let Some(n) = cli.proxy_connections {
        proxy_args.push("--connections".into());
        proxy_args.push(n.to_string());
    }
    let started = stack::spawn(&bin_dir.join("attestplane"), &proxy_args, dir, |l| {
        l.strip_prefix("attestplane proxy ready: ")
            .map(str::to_owned)
    })
    .await;
    let (proxy, url) = match started {
        Ok(x) => x,
        Err(e) => {
            for c in children {
                c.stop().await;
            }
            return Err(e);
        }
    };
    let proxy_pid = proxy.pid;
    children.push(proxy);
    let stack = Stack {
        children,
        dir: dir.to_path_buf(),
        api: url
            .strip_prefix("http://")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))),
        gateway: SocketAddr::from(([127, 0, 0, 1], mcp_port)),
        upstream: upstream_addr,
        enclave_pid,
        proxy_pid,
        upstream_pid,
    };
    let set_up = async {
        if stack.api.port() == 0 {
            bail!("the proxy printed an unexpected address {url:?}");
        }
        bootstrap(stack.api, world, spec).await?;
        write_receipt_key(stack.api, &cp_root, key_file).await?;
        check_path(&stack, token).await
    };
    if let Err(e) = set_up.await {
        let tails = stack.tails();
        stack.stop().await;
        bail!("{e:#}\n{tails}");
    }
    Ok(stack)
}

/// The control plane's epoch key from its attestation document (fresh nonce), verified
/// against the mock root the enclave printed, written where the upstream reads it.
async fn write_receipt_key(api: SocketAddr, root: &Path, key_file: &Path) -> Result<()> {
    // Fresh is all a nonce needs to be here.
    let nonce: [u8; 32] = Sha256::digest(format!("{:?}", SystemTime::now())).into();
    let path = format!("/v1/attestation?nonce={}", hex::encode(nonce));
    let reply = http::once(api, "GET", &path, None, None).await?;
    if reply.status != 200 {
        bail!("GET /v1/attestation answered {}", reply.status);
    }
    let json: serde_json::Value =
        serde_json::from_slice(&reply.body).context("GET /v1/attestation body")?;
    let document = json
        .get("document")
        .and_then(|d| d.as_str())
        .and_then(|d| STANDARD.decode(d).ok())
        .context("the attestation answer has no document")?;
    let anchor = TrustAnchor::from_pem(&std::fs::read(root)?)?;
    let expect = Expectations {
        nonce: Some(nonce.to_vec()),
        max_age_ms: Some(5 * 60 * 1000),
        ..Expectations::default()
    };
    let verified = verify_attestation(&document, &anchor, &expect, VerifyAt::Instant(now()))
        .map_err(|e| anyhow::anyhow!("the control plane's attestation did not verify: {e}"))?;
    let key = attested_key(&verified).context("the document binds no Ed25519 key")?;
    std::fs::write(key_file, hex::encode(key.as_bytes())).context("cannot write the key")?;
    Ok(())
}

/// One tools/list and one tools/call through the gateway, one direct call, each checked.
async fn check_path(stack: &Stack, token: &str) -> Result<()> {
    let list = r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}"#;
    let raw = mcp_request(
        stack.gateway,
        &gateway_path(),
        Some(token),
        "tools/list",
        list,
    );
    let mut conn = http::Conn::connect(stack.gateway).await?;
    let reply = conn
        .send(&raw)
        .await
        .context("tools/list through the gateway")?;
    let body = String::from_utf8_lossy(&reply.body);
    if reply.status != 200 || !body.contains("\"forecast\"") {
        bail!(
            "tools/list through the gateway answered {}: {body}",
            reply.status
        );
    }
    let raw = mcp_request(
        stack.gateway,
        &gateway_path(),
        Some(token),
        "tools/call",
        CALL,
    );
    let reply = conn
        .send(&raw)
        .await
        .context("tools/call through the gateway")?;
    if let Err(e) = check_answer(&reply) {
        bail!(
            "tools/call through the gateway: {e}: {}",
            String::from_utf8_lossy(&reply.body)
        );
    }
    let raw = mcp_request(
        stack.upstream,
        crate::upstream::BASELINE_PATH,
        None,
        "tools/call",
        CALL,
    );
    let mut direct = http::Conn::connect(stack.upstream).await?;
    let reply = direct.send(&raw).await.context("direct tools/call")?;
    if let Err(e) = check_answer(&reply) {
        bail!("direct tools/call: {e}");
    }
    // The registered endpoint refuses a call without a receipt.
    let raw = mcp_request(stack.upstream, "/mcp", None, "tools/call", CALL);
    let reply = direct.send(&raw).await.context("unreceipted tools/call")?;
    if reply.status != 401 {
        bail!(
            "the upstream's /mcp answered {} to a call without a receipt",
            reply.status
        );
    }
    Ok(())
}

/// Who answers a request the bench sends.
fn gateway_path() -> String {
    format!("/mcp/{}", world::SERVER_ID)
}

/// The bytes of a modern-era MCP POST.
fn mcp_request(
    host: SocketAddr,
    path: &str,
    bearer: Option<&str>,
    method: &str,
    body: &str,
) -> Vec<u8> {
    let mut headers = vec![
        ("Accept", "application/json, text/event-stream"),
        ("MCP-Protocol-Version", MODERN),
        ("Mcp-Method", method),
    ];
    if method == "tools/call" {
        headers.push(("Mcp-Name", "forecast"));
    }
    http::request_bytes_with("POST", host, path, bearer, &headers, Some(body))
}

/// `Ok` iff the reply is HTTP 200 with a JSON-RPC result; else the error's kind.
fn check_answer(reply: &http::Reply) -> Result<(), String> {
    let message = parse_message(&reply.body);
    let code = || {
        serde_json::from_slice::<serde_json::Value>(&reply.body)
            .ok()
            .and_then(|v| v.pointer("/error/code").and_then(|c| c.as_i64()))
            .map_or_else(|| "?".to_owned(), |c| c.to_string())
    };
    if reply.status != 200 {
        return Err(format!("HTTP {} rpc {}", reply.status, code()));
    }
    match message {
        Ok(m) if m.kind() == Kind::Response && m.result().is_some() => Ok(()),
        Ok(m) if m.kind() == Kind::ErrorResponse => Err(format!("HTTP 200 rpc {}", code())),
        _ => Err("HTTP 200 not a JSON-RPC response".into()),
    }
}

/// p50 and p99 of `fdatasync` after a 600-byte append (about an entry) in `dir`, 200 times.
fn fdatasync_ms(dir: &Path) -> Result<(f64, f64)> {
    use std::io::Write as _;
    let path = dir.join("fdatasync-probe");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .context("cannot create the fdatasync probe")?;
    let mut us = Vec::new();
    for _ in 0..200 {
        file.write_all(&[0u8; 600])?;
        let t = Instant::now();
        file.sync_data()?;
        us.push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
    }
    drop(file);
    let _ = std::fs::remove_file(&path);
    us.sort_unstable();
    Ok((percentile_ms(&us, 0.5), percentile_ms(&us, 0.99)))
}

/// RSS of a process, KiB (`VmRSS` of /proc/PID/status).
fn rss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// One RSS sample: calls answered so far (all clients, warm-up included), RSS per process.
#[derive(Clone, Debug)]
struct RssSample {
    at: Duration,
    calls: u64,
    kib: Vec<Option<u64>>,
}

/// What one round measured.
#[derive(Debug, Default)]
struct Round {
    latencies_us: Vec<u32>,
    ok: u64,
    errors: BTreeMap<String, u64>,
    window: Duration,
    log_growth: u64,
    calls_total: u64,
    upstream_receipted: u64,
    cpu: Vec<(&'static str, Duration)>,
    wall: Duration,
    loadavg: String,
    threads: Vec<(&'static str, Vec<f64>)>,
    rss: Vec<RssSample>,
    /// The proxy's fdatasyncs over the round.
    syncs: f64,
}

impl Round {
    fn rate(&self) -> f64 {
        self.ok as f64 / self.window.as_secs_f64().max(1e-9)
    }
}

/// The upstream's counters: calls run with a receipt, without (baseline), refused.
async fn upstream_stats(addr: SocketAddr) -> Result<[u64; 3]> {
    let reply = http::once(addr, "GET", "/stats", None, None).await?;
    let text = String::from_utf8_lossy(&reply.body);
    let v: Vec<u64> = text
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    match v.as_slice() {
        [a, b, c] => Ok([*a, *b, *c]),
        _ => bail!("GET /stats answered {text:?}"),
    }
}

/// A load round of `cli.concurrency` clients against `addr` with `requests`.
async fn round(
    cli: &Cli,
    stack: &Stack,
    addr: SocketAddr,
    requests: &Arc<Vec<Vec<u8>>>,
    duration: Duration,
    budget: Option<u64>,
) -> Result<Round> {
    let pids = stack.pids();
    let loadavg = loadavg();
    let size_before = log_size(stack.api).await?;
    let metrics_before = proxy_metrics(stack.api).await?;
    let stats_before = upstream_stats(stack.upstream).await?;
    let cpu_before: Vec<Option<Duration>> = pids.iter().map(|(_, p)| stack::cpu_time(*p)).collect();
    let threads_before: Vec<_> = [stack.enclave_pid, stack.proxy_pid]
        .iter()
        .map(|&p| stack::threads_cpu_time(p))
        .collect();
    let started = Instant::now();
    let measure_from = started + cli.warmup;
    let end = measure_from + duration;
    let clients = tokio::spawn(clients::run(clients::Load {
        addr,
        requests: Arc::clone(requests),
        concurrency: cli.concurrency,
        measure_from,
        end,
        budget,
        check: check_answer,
    }));
    // RSS sampler: the upstream's call counter says how far the round is.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = Arc::clone(&stop);
        let pids = [stack.enclave_pid, stack.proxy_pid, stack.upstream_pid];
        let upstream = stack.upstream;
        let every = cli.rss_every.max(Duration::from_millis(100));
        let base = stats_before[0] + stats_before[1];
        tokio::spawn(async move {
            let mut samples = Vec::new();
            loop {
                let calls = upstream_stats(upstream)
                    .await
                    .map(|s| s[0] + s[1] - base)
                    .unwrap_or(0);
                samples.push(RssSample {
                    at: started.elapsed(),
                    calls,
                    kib: pids.iter().map(|&p| rss_kib(p)).collect(),
                });
                if stop.load(Ordering::Relaxed) || Instant::now() >= end {
                    break;
                }
                tokio::time::sleep(every).await;
            }
            samples
        })
    };
    let c = clients.await.context("the clients failed")??;
    let mut r = Round {
        ok: c.ok,
        calls_total: c.all_ok,
        latencies_us: c.latencies_us,
        errors: c.errors,
        ..Round::default()
    };
    let last_done = c.last_done.unwrap_or(measure_from).max(measure_from);
    r.wall = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    r.rss = sampler.await.context("the RSS sampler failed")?;
    let stats_after = upstream_stats(stack.upstream).await?;
    // The last sample: after the last call.
    r.rss.push(RssSample {
        at: r.wall,
        calls: stats_after[0] + stats_after[1] - stats_before[0] - stats_before[1],
        kib: [stack.enclave_pid, stack.proxy_pid, stack.upstream_pid]
            .iter()
            .map(|&p| rss_kib(p))
            .collect(),
    });
    for ((name, pid), before) in [("enclave", stack.enclave_pid), ("proxy", stack.proxy_pid)]
        .into_iter()
        .zip(threads_before)
    {
        let busy = clients::busiest_threads(pid, &before, r.wall);
        r.threads.push((name, busy));
    }
    r.cpu = pids
        .iter()
        .zip(cpu_before)
        .filter_map(|((name, pid), before)| {
            Some((*name, stack::cpu_time(*pid)?.saturating_sub(before?)))
        })
        .collect();
    r.window = last_done.duration_since(measure_from);
    r.log_growth = log_size(stack.api).await? - size_before;
    let syncs = |m: &BTreeMap<String, f64>| {
        m.get("attestplane_store_syncs_total")
            .copied()
            .unwrap_or(0.0)
    };
    r.syncs = syncs(&proxy_metrics(stack.api).await?) - syncs(&metrics_before);
    r.upstream_receipted = stats_after[0] - stats_before[0];
    r.loadavg = loadavg;
    Ok(r)
}

/// The one-client latency measurement: gateway and direct calls interleaved.
async fn latency(
    stack: &Stack,
    gateway: &[Vec<u8>],
    direct: &[u8],
    n: usize,
) -> Result<(Vec<u32>, Vec<u32>)> {
    let mut gw = http::Conn::connect(stack.gateway).await?;
    let mut up = http::Conn::connect(stack.upstream).await?;
    let mut gw_us = Vec::with_capacity(n);
    let mut up_us = Vec::with_capacity(n);
    let warmup = (n / 10).max(50);
    for i in 0..warmup + n {
        let t = Instant::now();
        let reply = up.send(direct).await?;
        let d = t.elapsed();
        check_answer(&reply).map_err(|e| anyhow::anyhow!("direct call {i}: {e}"))?;
        let t = Instant::now();
        let reply = gw.send(&gateway[i % gateway.len()]).await?;
        let g = t.elapsed();
        check_answer(&reply).map_err(|e| anyhow::anyhow!("gateway call {i}: {e}"))?;
        if i >= warmup {
            up_us.push(u32::try_from(d.as_micros()).unwrap_or(u32::MAX));
            gw_us.push(u32::try_from(g.as_micros()).unwrap_or(u32::MAX));
        }
    }
    gw_us.sort_unstable();
    up_us.sort_unstable();
    Ok((gw_us, up_us))
}

/// The proxy store's part of the one-client calls, from its counters over the measurement
/// (warm-up included): commits per call, how many its connection readers ran themselves, and
/// the mean time of one commit (write + fdatasync + index), the host's disk stage of the call.
fn print_store_stages(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>, calls: usize) {
    let delta = |name: &str| Some(after.get(name)? - before.get(name).copied().unwrap_or(0.0));
    let warmup = (calls / 10).max(50);
    let calls = (calls + warmup) as f64;
    let Some(syncs) = delta("attestplane_store_syncs_total").filter(|s| *s > 0.0) else {
        return;
    };
    let mut line = format!(
        "  proxy store: {:.2} commits per gateway call",
        syncs / calls
    );
    if let Some(inline) = delta("attestplane_store_inline_commits_total") {
        line.push_str(&format!(
            ", {:.0} % run by the connection reader",
            100.0 * inline / syncs
        ));
    }
    if let Some(secs) = delta("attestplane_store_commit_seconds_total") {
        line.push_str(&format!(
            ", mean commit (write + fdatasync + index) {:.3} ms",
            1e3 * secs / syncs
        ));
    }
    println!("{line}");
}

fn cpu_line(r: &Round) -> String {
    r.cpu
        .iter()
        .map(|(name, t)| {
            format!(
                "{name} {:.0} us ({:.2} cores)",
                t.as_secs_f64() * 1e6 / r.calls_total.max(1) as f64,
                t.as_secs_f64() / r.wall.as_secs_f64()
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or_else(|| "?".into(), |k| format!("{:.1}", k as f64 / 1024.0))
}

fn measure(
    cli: &Cli,
    rt: &tokio::runtime::Runtime,
    stack: &Stack,
    reference: &mut InProcessGateway,
    tokens: &[String],
) -> Result<bool> {
    let gateway_requests: Arc<Vec<Vec<u8>>> = Arc::new(
        tokens
            .iter()
            .map(|t| {
                mcp_request(
                    stack.gateway,
                    &gateway_path(),
                    Some(t.as_str()),
                    "tools/call",
                    CALL,
                )
            })
            .collect(),
    );
    let direct_request = mcp_request(
        stack.upstream,
        crate::upstream::BASELINE_PATH,
        None,
        "tools/call",
        CALL,
    );
    println!(
        "attestplane-load --mode gateway: MCP tools/call, modern era ({MODERN}, stateless) on both sides; \
         {} agents; {} cores; each gateway call = 2 durable log entries (decision before forwarding, \
         result before answering) + an Ed25519 receipt check at the upstream",
        cli.agents,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let verdict = |ok: bool| if ok { "MET" } else { "NOT MET" };
    let mut all_ok = true;

    // 1. One client: added latency.
    if cli.latency_calls > 0 {
        let (f50, f99) = fdatasync_ms(&stack.dir)?;
        println!(
            "fdatasync of a 600-byte append to a growing file on the store's file system: p50 {f50:.3} ms, \
             p99 {f99:.3} ms (a gateway call waits for two of the store's in sequence at one client)"
        );
        let load = loadavg();
        let metrics_before = rt.block_on(proxy_metrics(stack.api))?;
        let (gw, up) = rt.block_on(latency(
            stack,
            &gateway_requests,
            &direct_request,
            cli.latency_calls,
        ))?;
        let p = |v: &[u32], q: f64| percentile_ms(v, q);
        println!(
            "latency, one client, {} calls each way interleaved (load average before: {load}):",
            cli.latency_calls
        );
        println!(
            "  direct   p50 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms",
            p(&up, 0.5),
            p(&up, 0.99),
            p(&up, 0.999),
            p(&up, 1.0)
        );
        println!(
            "  gateway  p50 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms",
            p(&gw, 0.5),
            p(&gw, 0.99),
            p(&gw, 0.999),
            p(&gw, 1.0)
        );
        let added50 = p(&gw, 0.5) - p(&up, 0.5);
        let added99 = p(&gw, 0.99) - p(&up, 0.99);
        println!(
            "  added    p50 {added50:.3} ms  p99 {added99:.3} ms  p99.9 {:.3} ms  (gateway - direct, per percentile)",
            p(&gw, 0.999) - p(&up, 0.999)
        );
        let metrics_after = rt.block_on(proxy_metrics(stack.api))?;
        print_store_stages(&metrics_before, &metrics_after, cli.latency_calls);
        let ok = added50 <= TARGET_ADDED_P50_MS && added99 <= TARGET_ADDED_P99_MS;
        all_ok &= ok;
        println!(
            "  target added p50 <= {TARGET_ADDED_P50_MS} ms and p99 <= {TARGET_ADDED_P99_MS} ms: {}",
            verdict(ok)
        );
    }
    if cli.latency_only {
        return Ok(!cli.enforce || all_ok);
    }

    // 2. The upstream alone at the same concurrency.
    let direct_requests = Arc::new(vec![direct_request]);
    let d = rt.block_on(round(
        cli,
        stack,
        stack.upstream,
        &direct_requests,
        cli.duration.min(Duration::from_secs(5)),
        None,
    ))?;
    println!(
        "direct: {} clients straight to the upstream: {:.0} calls/s, p50 {:.2} ms, p99 {:.2} ms, {} errors; \
         CPU per call: {}; load average before: {}",
        cli.concurrency,
        d.rate(),
        percentile_ms(&d.latencies_us, 0.5),
        percentile_ms(&d.latencies_us, 0.99),
        d.errors.values().sum::<u64>(),
        cpu_line(&d),
        d.loadavg
    );

    // 3. Gateway rounds between in-process blocks.
    let mut rates = Vec::new();
    let mut p99s = Vec::new();
    let mut ratios = Vec::new();
    let mut failures = 0u64;
    let (mut before, mut before_cpu) = reference.run(cli.in_process)?;
    for n in 1..=cli.rounds {
        let r = rt.block_on(round(
            cli,
            stack,
            stack.gateway,
            &gateway_requests,
            cli.duration,
            cli.calls,
        ))?;
        let (after, after_cpu) = reference.run(cli.in_process)?;
        let inproc = (before + after) / 2.0;
        let inproc_cpu = before_cpu.zip(after_cpu).map(|(a, b)| (a + b) / 2.0);
        let l = &r.latencies_us;
        let errors: u64 = r.errors.values().sum();
        failures += errors;
        let rate = r.rate();
        println!(
            "round {n}: gateway {rate:>6.0} tools/call/s ({} ok in {:.2} s, {errors} errors) at {} clients; \
             latency p50 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms",
            r.ok,
            r.window.as_secs_f64(),
            cli.concurrency,
            percentile_ms(l, 0.50),
            percentile_ms(l, 0.99),
            percentile_ms(l, 0.999),
            percentile_ms(l, 1.0),
        );
        println!(
            "         in-process gateway core {inproc:>6.0} calls/s (before {before:.0}, after {after:.0}); \
             gateway / in-process = {:.1} %; direct / gateway = {:.2}x",
            rate / inproc * 100.0,
            d.rate() / rate
        );
        if let Some(c) = inproc_cpu {
            println!(
                "         in-process per CPU-second: {c:.0} calls ({:.0} us each)",
                1e6 / c
            );
        }
        println!("         CPU per call: {}", cpu_line(&r));
        println!(
            "         machine load average before the round: {}",
            r.loadavg
        );
        let threads: Vec<String> = r
            .threads
            .iter()
            .map(|(name, busy)| {
                let cores: Vec<String> = busy.iter().map(|c| format!("{c:.2}")).collect();
                format!("{name} [{}]", cores.join(" "))
            })
            .collect();
        println!("         busiest threads (cores): {}", threads.join(", "));
        if let (Some(first), Some(last)) = (r.rss.first(), r.rss.last()) {
            let mid = &r.rss[r.rss.len() / 2];
            let max = |i: usize| r.rss.iter().filter_map(|s| s.kib[i]).max();
            let names = ["enclave", "proxy", "upstream"];
            for (i, name) in names.iter().enumerate() {
                println!(
                    "         RSS {name:<8} MiB: start {} (at {} calls), mid {} (at {} calls), end {} (at {} calls), max {}",
                    mib(first.kib[i]),
                    first.calls,
                    mib(mid.kib[i]),
                    mid.calls,
                    mib(last.kib[i]),
                    last.calls,
                    mib(max(i))
                );
            }
            if cli.calls.is_some() {
                let trail: Vec<String> = r
                    .rss
                    .iter()
                    .step_by((r.rss.len() / 12).max(1))
                    .map(|s| {
                        format!(
                            "{:.0}s/{}k:{}",
                            s.at.as_secs_f64(),
                            s.calls / 1000,
                            mib(s.kib[0])
                        )
                    })
                    .collect();
                println!(
                    "         enclave RSS over the round (time/calls:MiB): {}",
                    trail.join(" ")
                );
            }
        }
        println!(
            "         log grew by {} entries for {} answered calls (warm-up included; 2 per call expected); \
             the upstream ran {} receipted calls; {:.1} entries per fdatasync",
            r.log_growth,
            r.calls_total,
            r.upstream_receipted,
            r.log_growth as f64 / r.syncs.max(1.0)
        );
        for (k, v) in &r.errors {
            println!("         error {k}: {v}");
        }
        if r.log_growth < 2 * r.calls_total {
            bail!(
                "the log grew by {} entries but {} calls were answered: a call was answered \
                 without both entries stored",
                r.log_growth,
                r.calls_total
            );
        }
        if r.upstream_receipted < r.calls_total {
            bail!(
                "{} calls were answered but the upstream ran only {} with a receipt",
                r.calls_total,
                r.upstream_receipted
            );
        }
        rates.push(rate);
        p99s.push(percentile_ms(l, 0.99));
        ratios.push(rate / inproc);
        before = after;
        before_cpu = after_cpu;
    }
    let (rate_min, rate_med, rate_max) = spread(rates);
    let (p99_min, p99_med, p99_max) = spread(p99s);
    let (ratio_min, ratio_med, ratio_max) = spread(ratios);
    println!(
        "summary over {} rounds (median, min..max):\n  gateway rate {rate_med:.0}/s ({rate_min:.0}..{rate_max:.0})\n  \
         p99          {p99_med:.2} ms ({p99_min:.2}..{p99_max:.2})\n  vs in-process {:.1} % ({:.1}..{:.1})\n  errors       {failures}",
        cli.rounds,
        ratio_med * 100.0,
        ratio_min * 100.0,
        ratio_max * 100.0,
    );
    let rate_ok = rate_med >= TARGET_RATE;
    let p99_ok = p99_med < TARGET_P99_MS;
    println!(
        "targets (median of rounds):\n  >= {TARGET_RATE:.0} tools/call/s at {} clients: {}\n  p99 < {TARGET_P99_MS:.0} ms: {}\n  no errors: {}",
        cli.concurrency,
        verdict(rate_ok),
        verdict(p99_ok),
        verdict(failures == 0)
    );
    all_ok &= rate_ok && p99_ok && failures == 0;
    Ok(!cli.enforce || all_ok)
}
