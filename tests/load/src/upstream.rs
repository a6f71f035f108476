//! The gateway benchmark's upstream: a small, fast MCP server (`attestplane-load bench-upstream`,
//! run by the bench as a child process of its own so that its CPU time is counted apart).
//!
//! It speaks the modern era (`2026-07-28`, stateless: `server/discover` answers with it), lists
//! one tool (`forecast`, the demo server's definition, whose pin the bench registers) and answers
//! each `tools/call` of it with a short text result, like the demo server. It is what a real
//! deployment's server does per call and little else: hyper's HTTP/1.1 server on one runtime
//! thread, the JSON-RPC message read through the verifier's borrowed views (no typed model), and
//! on `/mcp` the **receipt check** a server behind the gateway must run: the
//! `Attestplane-Receipt` header verified by an `attestplane_verifier::gateway::receipt::ReceiptVerifier`
//! built once the key is known (an Ed25519 signature by the control plane's attested epoch key,
//! the audience, method, tool and the RFC 8785 hash of the arguments as received, expiry, and a
//! replay cache), as a deployed server holds one. A call to
//! `/mcp` without a valid receipt is refused (HTTP 401) and never runs.
//!
//! The key comes from `--receipt-key-file`: read at first use, because the bench learns the key
//! only once the control plane is up; the bench writes it there after verifying the control
//! plane's attestation document against its mock root (the key the document binds, never one
//! the host merely serves).
//!
//! **`--insecure-unreceipted-baseline`** adds a second endpoint, `/mcp-unreceipted-baseline`,
//! served by the same code with the receipt check skipped. It exists ONLY so that the bench can
//! call the same upstream directly, without the control plane, for the baseline of the
//! gateway's added latency. It is off unless named, the registered endpoint (`/mcp`) always
//! checks receipts, and nothing but this benchmark may use it.
//!
//! `GET /attestation?nonce=HEX` answers a mock-NSM attestation document with the demo server's
//! measurements (`--image`), as the handle mode's document source does, so the server is
//! registered as assurance `nitro` and attested like the handle mode's. `GET /stats` answers
//! `receipted unreceipted refused` counts of tool calls run or refused.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::SystemTime;

use anyhow::{Context, Result, bail};
use attestplane_enclave::nsm::{Clock, MockNsm, Nsm};
use attestplane_verifier::UnixMillis;
use attestplane_verifier::gateway::jsonrpc::{Kind, parse_message};
use attestplane_verifier::gateway::receipt::{
    RECEIPT_HEADER, ReceiptVerifier, ReceivedCall, ReplayCache,
};
use bytes::Bytes;
use clap::Parser;
use ed25519_dalek::VerifyingKey;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

/// The mock NSM's seed (public: this is a benchmark).
pub const SEED: [u8; 32] = *b"attestplane load: bench upstream";

/// The tool it serves, as `tools/list` lists it (the demo server's `forecast`).
pub const TOOL: &str = r#"{"name":"forecast","description":"Weather forecast for a city (demo data).","inputSchema":{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}}"#;

/// The path of the baseline endpoint (see the module documentation).
pub const BASELINE_PATH: &str = "/mcp-unreceipted-baseline";

/// The largest request body read.
const MAX_BODY: usize = 1024 * 1024;

/// Receipts remembered against replay (a receipt lives 60 s: enough for ~15,000 calls/s).
const REPLAY_CAPACITY: usize = 1_000_000;

/// `attestplane-load bench-upstream`.
#[derive(Debug, Parser)]
#[command(name = "attestplane-load bench-upstream")]
pub struct UpstreamCli {
    /// Where to listen (loopback; port 0 picks one, printed as `http://IP:PORT` on stdout).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The image name its mock measurements derive from.
    #[arg(long, default_value = crate::world::IMAGE)]
    image: String,
    /// The file holding the control plane's attested epoch key (hex), read at first use.
    #[arg(long, value_name = "PATH")]
    receipt_key_file: PathBuf,
    /// Also serve /mcp-unreceipted-baseline WITHOUT the receipt check (benchmark baseline only).
    #[arg(long)]
    insecure_unreceipted_baseline: bool,
    /// Runtime threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

struct Upstream {
    nsm: MockNsm,
    resource: String,
    key_file: PathBuf,
    /// The control plane's key, prepared once it is known.
    verifier: OnceLock<ReceiptVerifier>,
    replay: Mutex<ReplayCache>,
    baseline: bool,
    receipted: AtomicU64,
    unreceipted: AtomicU64,
    refused: AtomicU64,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("resource", &self.resource)
            .field("baseline", &self.baseline)
            .finish_non_exhaustive()
    }
}

/// Runs the upstream until killed.
pub fn main(args: impl Iterator<Item = String>) -> Result<()> {
    let cli = UpstreamCli::parse_from(args);
    if !cli.listen.ip().is_loopback() {
        bail!("--listen {}: loopback only", cli.listen);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.threads.max(1))
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    rt.block_on(serve(cli))
}

async fn serve(cli: UpstreamCli) -> Result<()> {
    let pcrs = crate::world::image_pcrs(&cli.image);
    let nsm = MockNsm::builder(SEED, Clock::System)
        .image_measurements(pcrs[0], pcrs[1], pcrs[2])
        .build();
    let listener = tokio::net::TcpListener::bind(cli.listen).await?;
    let bound = listener.local_addr()?;
    if cli.insecure_unreceipted_baseline {
        eprintln!(
            "bench-upstream: WARNING: {BASELINE_PATH} serves tool calls WITHOUT a receipt \
             (benchmark baseline only)"
        );
    }
    let state = Arc::new(Upstream {
        nsm,
        resource: format!("http://{bound}/mcp"),
        key_file: cli.receipt_key_file,
        verifier: OnceLock::new(),
        replay: Mutex::new(ReplayCache::new(REPLAY_CAPACITY)),
        baseline: cli.insecure_unreceipted_baseline,
        receipted: AtomicU64::new(0),
        unreceipted: AtomicU64::new(0),
        refused: AtomicU64::new(0),
    });
    {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        writeln!(out, "http://{bound}")?;
        out.flush()?;
    }
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(state.answer(req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, kind: &'static str, body: impl Into<Bytes>) -> Reply {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(kind) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

fn rpc(id: &str, result: &str) -> Reply {
    reply(
        StatusCode::OK,
        "application/json",
        format!(r#"{{"jsonrpc":"2.0","id":{id},"result":{result}}}"#),
    )
}

fn rpc_error(status: StatusCode, id: &str, code: i64, message: &str) -> Reply {
    let message = serde_json::Value::from(message).to_string();
    reply(
        status,
        "application/json",
        format!(r#"{{"jsonrpc":"2.0","id":{id},"error":{{"code":{code},"message":{message}}}}}"#),
    )
}

impl Upstream {
    async fn answer(&self, req: Request<hyper::body::Incoming>) -> Reply {
        let path = req.uri().path().to_owned();
        match (req.method(), path.as_str()) {
            (&Method::GET, "/attestation") => self.attestation(req.uri().query()),
            (&Method::GET, "/stats") => reply(
                StatusCode::OK,
                "text/plain",
                format!(
                    "{} {} {}",
                    self.receipted.load(Ordering::Relaxed),
                    self.unreceipted.load(Ordering::Relaxed),
                    self.refused.load(Ordering::Relaxed)
                ),
            ),
            (&Method::POST, "/mcp") => self.mcp(req, true).await,
            (&Method::POST, BASELINE_PATH) if self.baseline => self.mcp(req, false).await,
            (&Method::GET, "/mcp") => reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "no server-initiated stream",
            ),
            _ => reply(StatusCode::NOT_FOUND, "text/plain", "no such endpoint"),
        }
    }

    fn attestation(&self, query: Option<&str>) -> Reply {
        let nonce = query
            .and_then(|q| q.strip_prefix("nonce="))
            .and_then(|h| hex::decode(h).ok())
            .filter(|n| !n.is_empty() && n.len() <= 512);
        let Some(nonce) = nonce else {
            return reply(StatusCode::BAD_REQUEST, "text/plain", "bad nonce");
        };
        match self.nsm.attest(None, Some(nonce), None) {
            Ok(doc) => reply(StatusCode::OK, "application/cbor", doc),
            Err(e) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                e.to_string(),
            ),
        }
    }

    fn verifier(&self) -> Option<&ReceiptVerifier> {
        if let Some(v) = self.verifier.get() {
            return Some(v);
        }
        let text = std::fs::read_to_string(&self.key_file).ok()?;
        let bytes: [u8; 32] = hex::decode(text.trim()).ok()?.try_into().ok()?;
        let key = VerifyingKey::from_bytes(&bytes).ok()?;
        let verifier = ReceiptVerifier::new(&key).ok()?;
        Some(self.verifier.get_or_init(|| verifier))
    }

    async fn mcp(&self, req: Request<hyper::body::Incoming>, receipted: bool) -> Reply {
        let receipt = req
            .headers()
            .get(RECEIPT_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return rpc_error(StatusCode::PAYLOAD_TOO_LARGE, "null", -32600, "too large"),
        };
        let Ok(message) = parse_message(&body) else {
            return rpc_error(StatusCode::BAD_REQUEST, "null", -32700, "parse error");
        };
        if message.kind() == Kind::Notification {
            return reply(StatusCode::ACCEPTED, "text/plain", "");
        }
        let id = message.id().map_or("null", |r| r.get());
        match message.method().unwrap_or_default() {
            "server/discover" => rpc(
                id,
                r#"{"resultType":"complete","supportedVersions":["2026-07-28"],"capabilities":{"tools":{}},"serverInfo":{"name":"attestplane-load bench-upstream","version":"1"}}"#,
            ),
            "ping" => rpc(id, "{}"),
            "tools/list" => rpc(id, &format!(r#"{{"tools":[{TOOL}]}}"#)),
            "tools/call" => {
                let Ok(params) = message.tools_call_params() else {
                    return rpc_error(StatusCode::OK, id, -32602, "bad params");
                };
                if params.name != "forecast" {
                    return rpc_error(StatusCode::OK, id, -32602, "unknown tool");
                }
                let arguments = params.arguments.map(|a| a.get());
                if receipted {
                    let Some(verifier) = self.verifier() else {
                        return rpc_error(
                            StatusCode::SERVICE_UNAVAILABLE,
                            id,
                            -32603,
                            "the control plane's key is not known yet",
                        );
                    };
                    let Some(token) = receipt else {
                        self.refused.fetch_add(1, Ordering::Relaxed);
                        return rpc_error(
                            StatusCode::UNAUTHORIZED,
                            id,
                            -32001,
                            "the call carries no receipt",
                        );
                    };
                    let call = ReceivedCall {
                        audience: &self.resource,
                        method: "tools/call",
                        tool: &params.name,
                        arguments,
                    };
                    let now = UnixMillis::from_system_time(SystemTime::now());
                    let checked = {
                        let mut cache = self.replay.lock().unwrap_or_else(PoisonError::into_inner);
                        verifier.verify(&token, &call, now, &mut cache)
                    };
                    if let Err(e) = checked {
                        self.refused.fetch_add(1, Ordering::Relaxed);
                        return rpc_error(
                            StatusCode::UNAUTHORIZED,
                            id,
                            -32001,
                            &format!("receipt refused: {e}"),
                        );
                    }
                    self.receipted.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.unreceipted.fetch_add(1, Ordering::Relaxed);
                }
                let city = arguments
                    .and_then(|a| serde_json::from_str::<serde_json::Value>(a).ok())
                    .and_then(|v| v.get("city").and_then(|c| c.as_str()).map(str::to_owned))
                    .unwrap_or_default();
                let city: String = city.chars().filter(|c| !c.is_control()).take(100).collect();
                let text = serde_json::Value::from(format!(
                    "Forecast for {city}: sunny, 21 °C (demo data)"
                ))
                .to_string();
                rpc(
                    id,
                    &format!(r#"{{"content":[{{"type":"text","text":{text}}}],"isError":false}}"#),
                )
            }
            _ => rpc_error(StatusCode::OK, id, -32601, "method not found"),
        }
    }
}
