//! `attestplane-demo-server`: a small "attested MCP server" on a mock NSM, for the local stack
//! (`attestplane dev`) and the end-to-end tests.
//!
//! It stands in for an MCP server running in its own Nitro Enclave: it owns a mock NSM whose
//! image measurements (PCR0/1/2) are the SHA-384 of `"NAME pcr0"`, `"NAME pcr1"` and
//! `"NAME pcr2"` for its `--image NAME`, and serves `GET /attestation?nonce=HEX` with the raw
//! COSE_Sign1 attestation document the mock signs over that nonce. The control plane fetches it
//! (through the host proxy) to attest the server before issuing handles for it.
//!
//! Flags: `--listen IP:PORT` (default 127.0.0.1:7401, port 0
//! allowed; a non-loopback address is refused unless `--allow-remote`), `--mock-seed HEX`,
//! `--image NAME`, `--print-mock-root PATH` (PEM of the mock's root, what the control plane must
//! pin as its server root), `--print-pcrs PATH` (JSON `{"PCR0": hex, "PCR1": hex, "PCR2": hex}`,
//! usable as `attestplane-verify --pcrs` and `attestplane servers register --server-pcrs`). Once
//! listening it prints `http://IP:PORT` as its first stdout line; log lines go to stderr. It
//! stops on SIGINT or SIGTERM.
//!
//! Trust: none. This is NOT an attested server: the mock's documents are signed by a root
//! anyone can derive from the seed, and the default seed is public. It exists so a newcomer can
//! walk through register → attest → resolve on one machine.
//!
//! `POST /mcp` is a minimal MCP streamable-HTTP endpoint (JSON responses only): `initialize`,
//! `ping`, `tools/list` and `tools/call` of one `forecast` tool. Every request must carry
//! `Authorization: Bearer <handle>`: a handle the control plane issued, verified with the
//! verifier's handle module against the control plane's JWKS (`--control-plane URL`, fetched
//! from `{URL}/v1/jwks`, cached for 30 s and refetched when a handle names an unknown key), with
//! `aud` = this server's resource URI (`--resource`, default `http://IP:PORT/mcp`); a tool is
//! called only if the handle's `tools` claim names it. `--print-tools PATH` writes
//! `{"forecast": "<SHA-256 hex of its definition>"}` for `servers register --tool`.
//!
//! Not here: the rest of MCP (no SSE streams, sessions, resources or prompts), and any check of
//! the control plane's attestation (the JWKS is believed as fetched: the CLI's `handle resolve`
//! shows how an agent checks it; a production server would do the same).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use attestplane_enclave::nsm::{Clock, MockNsm, Nsm, PCR_LEN};
use attestplane_verifier::UnixMillis;
use attestplane_verifier::attestation::parse_pcrs_json;
use attestplane_verifier::attestation::{Expectations, TrustAnchor, VerifyAt, verify_attestation};
use attestplane_verifier::gateway::pin;
use attestplane_verifier::gateway::receipt::{self, ReceivedCall, ReplayCache};
use attestplane_verifier::handle::{HandleExpectations, Jwks, verify_handle};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use clap::Parser;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha384};

/// The mock's seed when none is given: public, fixed, for development only, and different from
/// the enclave's development seed.
const DEV_SEED: [u8; 32] = *b"attestplane demo server seed 001";

/// The largest nonce accepted, in bytes (the NSM accepts at most 1024; the HTTP API allows 512).
const MAX_NONCE_LEN: usize = 512;

/// How long a fetched JWKS is used before it is fetched again.
const JWKS_TTL: Duration = Duration::from_secs(30);

/// The largest JWKS document read from the control plane.
const MAX_JWKS_LEN: usize = 64 * 1024;

/// Clock skew allowed on a handle's times.
const HANDLE_LEEWAY_SECS: u64 = 60;

/// The MCP protocol version answered when the client names none.
const MCP_PROTOCOL_VERSION: &str = "2025-06-18";

/// An attested MCP server on a mock NSM (development and tests only).
#[derive(Debug, Parser)]
#[command(name = "attestplane-demo-server", version)]
struct Cli {
    /// Where to listen (port 0: any free port; the bound address is printed on stdout).
    #[arg(long, value_name = "IP:PORT", default_value = "127.0.0.1:7401")]
    listen: SocketAddr,
    /// Accept a non-loopback --listen address.
    #[arg(long)]
    allow_remote: bool,
    /// The mock's 32-byte seed, hex (default: a fixed, public development seed).
    #[arg(long, value_name = "HEX")]
    mock_seed: Option<String>,
    /// The image name its measurements derive from: PCRn = SHA-384("NAME pcrN").
    #[arg(long, value_name = "NAME", default_value = "attestplane-demo-weather")]
    image: String,
    /// Write the mock NSM's root certificate (PEM) to PATH, then continue.
    #[arg(long, value_name = "PATH")]
    print_mock_root: Option<PathBuf>,
    /// Write the image's PCR0/1/2 as JSON ({"PCR0": hex, ...}) to PATH, then continue.
    #[arg(long, value_name = "PATH")]
    print_pcrs: Option<PathBuf>,
    /// Write its tools' digests as JSON ({"forecast": sha256 hex}) to PATH, then continue.
    #[arg(long, value_name = "PATH")]
    print_tools: Option<PathBuf>,
    /// The control plane whose handles /mcp accepts (its JWKS: GET URL/v1/jwks). Without it,
    /// /mcp answers 503.
    #[arg(long, value_name = "URL")]
    control_plane: Option<String>,
    /// This server's resource URI, the `aud` its handles must name (default: http://IP:PORT/mcp).
    #[arg(long, value_name = "URI")]
    resource: Option<String>,
    /// PEM root the control plane's attestation document must chain to: with it (and
    /// --control-plane-pcrs), `tools/call` also accepts calls relayed by the control plane's
    /// gateway, each carrying a receipt checked with the control plane's attested key. Read at
    /// first use (the control plane may start after this server).
    #[arg(long, value_name = "PEM")]
    control_plane_root: Option<PathBuf>,
    /// JSON file of the control plane's expected PCRs ({"PCR0": hex, …}).
    #[arg(long, value_name = "FILE")]
    control_plane_pcrs: Option<PathBuf>,
    /// The `iss` its handles must name (default: not checked).
    #[arg(long)]
    issuer: Option<String>,
}

/// The `forecast` tool's definition, as `tools/list` serves it.
fn forecast_tool() -> Value {
    json!({
        "name": "forecast",
        "description": "Weather forecast for a city (demo data).",
        "inputSchema": {
            "type": "object",
            "properties": { "city": { "type": "string" } },
            "required": ["city"]
        }
    })
}

/// The pin of a tool definition as the gateway computes it: SHA-256 over a domain tag and the
/// RFC 8785 canonical JSON of the whole tool object.
fn tool_digest(tool: &Value) -> Result<String> {
    let d = pin::tool_digest(&tool.to_string()).map_err(|e| anyhow::anyhow!("tool digest: {e}"))?;
    Ok(hex::encode(d.digest.0))
}

/// The image measurements of `--image NAME`: `SHA-384("NAME pcr0")`, `… pcr1`, `… pcr2`.
fn image_pcrs(image: &str) -> [[u8; PCR_LEN]; 3] {
    [0, 1, 2].map(|i| Sha384::digest(format!("{image} pcr{i}").as_bytes()).into())
}

fn parse_seed(text: &str) -> Result<[u8; 32]> {
    let bytes = hex::decode(text.trim()).context("--mock-seed is not hex")?;
    <[u8; 32]>::try_from(bytes.as_slice())
        .map_err(|_| anyhow::anyhow!("--mock-seed must be 32 bytes, found {}", bytes.len()))
}

fn write_file(path: &Path, what: &str, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes)
        .with_context(|| format!("cannot write the {what} to {}", path.display()))?;
    eprintln!(
        "attestplane-demo-server: {what} written to {}",
        path.display()
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    if !cli.listen.ip().is_loopback() && !cli.allow_remote {
        bail!(
            "--listen {}: not a loopback address; this server's attestation is a mock, pass \
             --allow-remote to expose it anyway",
            cli.listen
        );
    }
    eprintln!(
        "attestplane-demo-server: WARNING: mock NSM: this is NOT an attested server. Its \
         attestation documents are signed by a root anyone can derive from the seed."
    );
    let seed = match &cli.mock_seed {
        Some(hex) => parse_seed(hex)?,
        None => DEV_SEED,
    };
    let [pcr0, pcr1, pcr2] = image_pcrs(&cli.image);
    let nsm = MockNsm::builder(seed, Clock::System)
        .image_measurements(pcr0, pcr1, pcr2)
        .build();

    if let Some(path) = &cli.print_mock_root {
        let pem = nsm.root_pem().context("cannot build the mock's root")?;
        write_file(path, "mock root", pem.as_bytes())?;
    }
    // The PCRs are read back from the mock, so the file says what its documents carry.
    let mut pcrs = serde_json::Map::new();
    for i in 0u16..3 {
        let pcr = nsm
            .describe_pcr(i)
            .with_context(|| format!("cannot read PCR{i}"))?;
        pcrs.insert(format!("PCR{i}"), hex::encode(&pcr.value).into());
    }
    if let Some(path) = &cli.print_pcrs {
        let json = serde_json::to_string_pretty(&pcrs).context("cannot encode the PCRs")?;
        write_file(path, "PCRs", json.as_bytes())?;
    }
    for (name, value) in &pcrs {
        eprintln!("attestplane-demo-server: {name} {value}");
    }
    let digest = tool_digest(&forecast_tool())?;
    eprintln!("attestplane-demo-server: tool forecast sha256 {digest}");
    if let Some(path) = &cli.print_tools {
        let json = json!({ "forecast": digest }).to_string();
        write_file(path, "tool digests", json.as_bytes())?;
    }

    let listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cli.listen))?;
    let bound = listener
        .local_addr()
        .context("cannot read the bound address")?;
    {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        writeln!(out, "http://{bound}").context("cannot write to stdout")?;
        out.flush().context("cannot write to stdout")?;
    }
    eprintln!(
        "attestplane-demo-server: image {:?} listening on http://{bound}",
        cli.image
    );
    let control_plane = cli
        .control_plane
        .as_deref()
        .map(|u| u.trim_end_matches('/').to_owned());
    let state = Arc::new(AppState {
        nsm,
        resource: cli
            .resource
            .clone()
            .unwrap_or_else(|| format!("http://{bound}/mcp")),
        issuer: cli.issuer.clone(),
        control_plane,
        jwks: Mutex::new(None),
        calls: std::sync::atomic::AtomicU64::new(0),
        cp_root: cli.control_plane_root.clone(),
        cp_pcrs: cli.control_plane_pcrs.clone(),
        attested: Mutex::new(None),
        receipts: Mutex::new(ReplayCache::new(MAX_RECEIPTS)),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .context("cannot build the HTTP client")?,
    });
    eprintln!(
        "attestplane-demo-server: /mcp accepts handles for {}{}",
        state.resource,
        match &state.control_plane {
            Some(cp) => format!(" from {cp}"),
            None => " (no --control-plane: /mcp answers 503)".to_owned(),
        }
    );
    axum::serve(listener, router(state))
        .with_graceful_shutdown(attestplane_proto::shutdown_signal(
            "attestplane-demo-server",
        ))
        .await
        .context("the server failed")?;
    eprintln!("attestplane-demo-server: stopped");
    Ok(())
}

/// What the handlers share.
struct AppState {
    nsm: MockNsm,
    resource: String,
    issuer: Option<String>,
    control_plane: Option<String>,
    jwks: Mutex<Option<(Arc<Jwks>, Instant)>>,
    /// Tool calls run (served at `GET /calls`, so tests can prove a refused call never ran).
    calls: std::sync::atomic::AtomicU64,
    cp_root: Option<PathBuf>,
    cp_pcrs: Option<PathBuf>,
    /// The receipt verifier for the control plane's attested epoch key (the key decoded and
    /// checked once, not per call), and when the key was verified.
    attested: Mutex<Option<(Arc<receipt::ReceiptVerifier>, Instant)>>,
    receipts: Mutex<ReplayCache>,
    http: reqwest::Client,
}

/// Receipts remembered against replay.
const MAX_RECEIPTS: usize = 100_000;

/// How long a verified control-plane key is used before the attestation is checked again.
const ATTESTED_TTL: Duration = Duration::from_secs(60);

fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/attestation", get(attestation))
        .route("/mcp", post(mcp))
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/calls",
            get(|State(s): State<Arc<AppState>>| async move {
                s.calls
                    .load(std::sync::atomic::Ordering::SeqCst)
                    .to_string()
            }),
        )
        .with_state(state)
}

#[derive(Debug, serde::Deserialize)]
struct AttestationQuery {
    nonce: Option<String>,
}

/// `GET /attestation?nonce=HEX`: the mock's attestation document over that nonce.
async fn attestation(
    State(state): State<Arc<AppState>>,
    query: Result<Query<AttestationQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let nonce = match query {
        Ok(Query(AttestationQuery { nonce: Some(n) })) => n,
        Ok(Query(AttestationQuery { nonce: None })) => {
            return bad_request("the nonce query parameter is required".into());
        }
        Err(e) => return bad_request(format!("bad query: {e}")),
    };
    if nonce.len() > 2 * MAX_NONCE_LEN {
        return bad_request(format!("the nonce is longer than {MAX_NONCE_LEN} bytes"));
    }
    let nonce = match hex::decode(&nonce) {
        Ok(n) if !n.is_empty() => n,
        Ok(_) => return bad_request("the nonce is empty".into()),
        Err(e) => return bad_request(format!("the nonce is not hex: {e}")),
    };
    // Signing is a few milliseconds of P-384 arithmetic: keep it off the reactor.
    let signed =
        tokio::task::spawn_blocking(move || state.nsm.attest(None, Some(nonce), None)).await;
    match signed {
        Ok(Ok(document)) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/cbor")],
            document,
        )
            .into_response(),
        Ok(Err(e)) => {
            eprintln!("attestplane-demo-server: the mock NSM refused to attest: {e}");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the mock NSM refused to attest".into(),
            )
        }
        Err(e) => {
            eprintln!("attestplane-demo-server: the attestation task failed: {e}");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the attestation task failed".into(),
            )
        }
    }
}

impl AppState {
    /// The control plane's JWKS: cached unless `fresh` or older than [`JWKS_TTL`].
    async fn jwks(&self, fresh: bool) -> Result<Arc<Jwks>, String> {
        if !fresh {
            let cached = self.jwks.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some((jwks, at)) = cached.as_ref()
                && at.elapsed() < JWKS_TTL
            {
                return Ok(Arc::clone(jwks));
            }
        }
        let base = self
            .control_plane
            .as_deref()
            .ok_or("no control plane configured (--control-plane)")?;
        let url = format!("{base}/v1/jwks");
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| format!("cannot fetch {url}: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("{url} answered {}", resp.status()));
        }
        let body = resp
            .bytes()
            .await
            .map_err(|e| format!("cannot read {url}: {e}"))?;
        if body.len() > MAX_JWKS_LEN {
            return Err(format!("{url}: a JWKS of {} bytes", body.len()));
        }
        let jwks = Arc::new(Jwks::parse(&body).map_err(|e| format!("{url}: {e}"))?);
        *self.jwks.lock().unwrap_or_else(PoisonError::into_inner) =
            Some((Arc::clone(&jwks), Instant::now()));
        Ok(jwks)
    }

    /// A receipt verifier for the control plane's epoch key from its attestation document,
    /// verified with a fresh nonce against --control-plane-root and --control-plane-pcrs (never
    /// a JWKS believed as served). `fresh` skips the cache (a new epoch may have opened).
    async fn attested_key(&self, fresh: bool) -> Result<Arc<receipt::ReceiptVerifier>, String> {
        if !fresh
            && let Some((verifier, at)) = self
                .attested
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .as_ref()
            && at.elapsed() < ATTESTED_TTL
        {
            return Ok(Arc::clone(verifier));
        }
        let (Some(root), Some(pcrs), Some(base)) =
            (&self.cp_root, &self.cp_pcrs, self.control_plane.as_deref())
        else {
            return Err(
                "receipts need --control-plane, --control-plane-root and --control-plane-pcrs"
                    .into(),
            );
        };
        let root = std::fs::read(root).map_err(|e| format!("{}: {e}", root.display()))?;
        let anchor =
            TrustAnchor::from_pem(&root).map_err(|e| format!("control-plane root: {e}"))?;
        let pcrs = std::fs::read(pcrs).map_err(|e| format!("{}: {e}", pcrs.display()))?;
        let pcrs = parse_pcrs_json(&pcrs).map_err(|e| format!("control-plane PCRs: {e}"))?;
        let mut nonce = [0u8; 32];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut nonce);
        let url = format!("{base}/v1/attestation?nonce={}", hex::encode(nonce));
        let answer: Value = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| format!("cannot fetch {url}: {e}"))?
            .json()
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        let document = answer
            .get("document")
            .and_then(Value::as_str)
            .and_then(|d| {
                base64::Engine::decode(&base64::engine::general_purpose::STANDARD, d).ok()
            })
            .ok_or("the control plane's answer has no document")?;
        let expect = Expectations {
            pcrs,
            nonce: Some(nonce.to_vec()),
            max_age_ms: Some(5 * 60 * 1000),
            ..Expectations::default()
        };
        let now = UnixMillis::from_system_time(SystemTime::now());
        let verified = verify_attestation(&document, &anchor, &expect, VerifyAt::Instant(now))
            .map_err(|e| format!("the control plane's attestation did not verify: {e}"))?;
        let key = receipt::attested_key(&verified).ok_or("the document binds no Ed25519 key")?;
        let verifier = Arc::new(
            receipt::ReceiptVerifier::new(&key)
                .map_err(|e| format!("the attested key cannot verify receipts: {e}"))?,
        );
        *self.attested.lock().unwrap_or_else(PoisonError::into_inner) =
            Some((Arc::clone(&verifier), Instant::now()));
        Ok(verifier)
    }

    /// Checks the receipt a gateway-relayed `tools/call` carries (header or
    /// `params._meta["io.attestplane/receipt"]`) for exactly this call.
    async fn check_receipt(&self, headers: &HeaderMap, params: &Value) -> Result<(), Response> {
        let token = headers
            .get(receipt::RECEIPT_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .or_else(|| {
                params
                    .pointer("/_meta/io.attestplane~1receipt")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
            .ok_or_else(|| unauthorized("the call carries no receipt".into()))?;
        let tool = params.get("name").and_then(Value::as_str).unwrap_or("");
        let arguments = params.get("arguments").map(Value::to_string);
        let call = ReceivedCall {
            audience: &self.resource,
            method: "tools/call",
            tool,
            arguments: arguments.as_deref(),
        };
        let now = UnixMillis::from_system_time(SystemTime::now());
        let mut last = String::new();
        for fresh in [false, true] {
            let verifier = self.attested_key(fresh).await.map_err(|e| {
                eprintln!("attestplane-demo-server: {e}");
                error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "the control plane's attested key is unavailable".into(),
                )
            })?;
            let result = {
                let mut cache = self.receipts.lock().unwrap_or_else(PoisonError::into_inner);
                verifier.verify(&token, &call, now, &mut cache)
            };
            match result {
                Ok(_) => return Ok(()),
                // Another key: the control plane may have opened a new epoch.
                Err(e @ receipt::ReceiptError::Jws(_)) => last = e.to_string(),
                Err(e) => return Err(unauthorized(format!("receipt refused: {e}"))),
            }
        }
        Err(unauthorized(format!("receipt refused: {last}")))
    }

    /// Verifies the bearer handle; refetches the JWKS once if the cached one does not verify
    /// it (the control plane may have opened a new epoch).
    async fn authenticate(&self, headers: &HeaderMap) -> Result<Vec<String>, Response> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| unauthorized("a bearer handle is required".into()))?;
        let expect = HandleExpectations {
            issuer: self.issuer.clone(),
            audience: Some(self.resource.clone()),
            leeway_secs: HANDLE_LEEWAY_SECS,
        };
        let now = UnixMillis::from_system_time(SystemTime::now());
        let mut last = String::new();
        for fresh in [false, true] {
            let jwks = self.jwks(fresh).await.map_err(|e| {
                eprintln!("attestplane-demo-server: {e}");
                error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "the control plane's keys are unavailable".into(),
                )
            })?;
            match verify_handle(token, &jwks, &expect, now) {
                Ok(handle) => return Ok(handle.into_claims().tools),
                Err(e) => last = e.to_string(),
            }
        }
        Err(unauthorized(format!("the handle did not verify: {last}")))
    }
}

/// `POST /mcp`: one JSON-RPC message.
async fn mcp(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    // Agents come with a handle; the control plane's gateway comes without one, and each of
    // its calls carries a receipt instead (checked in `tools/call` below).
    let relayed = !headers.contains_key(header::AUTHORIZATION);
    let tools = if relayed {
        vec!["forecast".to_owned()]
    } else {
        match state.authenticate(&headers).await {
            Ok(t) => t,
            Err(r) => return r,
        }
    };
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !is_json {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "the body must be application/json".into(),
        );
    }
    let Ok(message) = serde_json::from_slice::<Value>(&body) else {
        return rpc(
            StatusCode::BAD_REQUEST,
            rpc_error(&Value::Null, -32700, "parse error"),
        );
    };
    let id = message.get("id").cloned().unwrap_or(Value::Null);
    let Some(method) = message.get("method").and_then(Value::as_str) else {
        return rpc(
            StatusCode::BAD_REQUEST,
            rpc_error(&id, -32600, "invalid request"),
        );
    };
    if message.get("id").is_none() {
        // A notification (e.g. notifications/initialized): accepted, no answer.
        return StatusCode::ACCEPTED.into_response();
    }
    let params = message.get("params").cloned().unwrap_or(Value::Null);
    let answer = match method {
        "initialize" => {
            let version = params
                .get("protocolVersion")
                .and_then(Value::as_str)
                .unwrap_or(MCP_PROTOCOL_VERSION);
            rpc_result(
                &id,
                json!({
                    "protocolVersion": version,
                    "capabilities": { "tools": {} },
                    "serverInfo": {
                        "name": "attestplane-demo-server",
                        "version": env!("CARGO_PKG_VERSION")
                    }
                }),
            )
        }
        "ping" => rpc_result(&id, json!({})),
        "tools/list" => rpc_result(&id, json!({ "tools": [forecast_tool()] })),
        "tools/call" => {
            if relayed && let Err(r) = state.check_receipt(&headers, &params).await {
                return r;
            }
            state
                .calls
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            call_tool(&id, &params, &tools)
        }
        _ => rpc_error(&id, -32601, "method not found"),
    };
    rpc(StatusCode::OK, answer)
}

fn call_tool(id: &Value, params: &Value, allowed: &[String]) -> Value {
    let name = params.get("name").and_then(Value::as_str).unwrap_or("");
    if name != "forecast" {
        return rpc_error(id, -32602, "unknown tool");
    }
    if !allowed.iter().any(|t| t == name) {
        return rpc_error(id, -32003, "the handle does not allow this tool");
    }
    let Some(city) = params
        .get("arguments")
        .and_then(|a| a.get("city"))
        .and_then(Value::as_str)
    else {
        return rpc_error(id, -32602, "forecast needs a string argument `city`");
    };
    let city: String = city.chars().filter(|c| !c.is_control()).take(100).collect();
    rpc_result(
        id,
        json!({
            "content": [{ "type": "text", "text": format!("Forecast for {city}: sunny, 21 °C (demo data)") }],
            "isError": false
        }),
    )
}

fn rpc_result(id: &Value, result: Value) -> Value {
    json!({ "jsonrpc": "2.0", "id": id, "result": result })
}

fn rpc_error(id: &Value, code: i64, message: &str) -> Value {
    json!({ "jsonrpc": "2.0", "id": id, "error": { "code": code, "message": message } })
}

fn rpc(status: StatusCode, body: Value) -> Response {
    (status, axum::Json(body)).into_response()
}

fn unauthorized(message: String) -> Response {
    let mut r = error(StatusCode::UNAUTHORIZED, "unauthenticated", message);
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer error=\"invalid_token\""),
    );
    r
}

fn bad_request(message: String) -> Response {
    error(StatusCode::BAD_REQUEST, "bad_request", message)
}

/// The HTTP API's error shape: `{"error": {"code", "message"}}`.
fn error(status: StatusCode, code: &str, message: String) -> Response {
    let body = serde_json::json!({ "error": { "code": code, "message": message } });
    (status, axum::Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_defaults_to_loopback_7401() {
        let cli = Cli::try_parse_from(["attestplane-demo-server"]).unwrap();
        assert_eq!(cli.listen, "127.0.0.1:7401".parse().unwrap());
        assert_eq!(cli.image, "attestplane-demo-weather");
        assert!(!cli.allow_remote);
    }

    #[test]
    fn seed_must_be_32_bytes_of_hex() {
        assert_eq!(parse_seed(&hex::encode(DEV_SEED)).unwrap(), DEV_SEED);
        assert!(parse_seed("00").is_err());
        assert!(parse_seed("not hex").is_err());
    }
}
