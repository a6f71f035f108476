//! # attestplane-receipt: the receipt check for Rust MCP servers
//!
//! Behind Attestplane, an MCP server receives each `tools/call` from the control plane's
//! enclave with a *receipt*: a compact JWS signed by the enclave's epoch key naming the
//! server's resource URI, the method, the tool, a hash of the arguments as forwarded, a `jti`
//! and a lifetime of at most 60 s (see `attestplane_verifier::gateway::receipt`). A server
//! that refuses calls without a valid receipt cannot be called around the control plane, and
//! a host that relays the traffic cannot change a call's arguments or replay it.
//!
//! This crate is that refusal for axum servers: [`require_receipt`] is middleware for
//! `axum::middleware::from_fn_with_state`, with a [`ReceiptChecker`] as its state:
//!
//! ```ignore
//! let checker = Arc::new(ReceiptChecker::from_attestation(&verified_doc, "https://files.example/mcp", 4096)?);
//! let app = Router::new()
//!     .route("/mcp", post(mcp_handler))
//!     .layer(axum::middleware::from_fn_with_state(checker, require_receipt));
//! ```
//!
//! It reads the request body (at most [`MAX_BODY_LEN`]), parses it as one JSON-RPC message
//! and, for `tools/call`, takes the receipt from the `Attestplane-Receipt` header or from
//! `params._meta["io.attestplane/receipt"]` (if both are present they must be equal) and
//! checks it against the call it arrived with. A refusal is a JSON-RPC error `-32001` whose
//! message says what was wrong; the handler never sees the request. A body that is not one
//! JSON-RPC message (a batch, duplicate member names, not JSON) is refused too: the server's
//! own parser might read a call into it that this check did not see.
//!
//! ## Trust
//!
//! The key must come from the control plane's attestation document, verified by the caller
//! against the expected PCRs ([`ReceiptChecker::from_attestation`]), never from a JWKS the host
//! serves: the host is who the receipt protects against.
//!
//! ## What this crate does not do
//!
//! It checks `tools/call` only; other methods pass. It does not verify the attestation
//! document (the verifier crate does) or refresh the key when the enclave restarts (a new epoch
//! has a new key: build a new checker from the new document). The replay cache lives in this
//! process: several replicas need a shared one.

#![forbid(unsafe_code)]

use std::sync::{Arc, Mutex};

use attestplane_verifier::UnixMillis;
use attestplane_verifier::attestation::VerifiedAttestation;
use attestplane_verifier::gateway::jsonrpc::{
    self, Kind, RECEIPT_META_KEY, RECEIPT_REQUIRED, object_members,
};
use attestplane_verifier::gateway::receipt::{
    RECEIPT_HEADER, ReceiptError, ReceiptVerifier, ReceivedCall, ReplayCache, VerifiedReceipt,
    attested_key,
};
use axum::body::{Body, to_bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use ed25519_dalek::VerifyingKey;
use serde_json::value::RawValue;

/// The largest request body read, in bytes (the verifier's JSON-RPC message bound).
pub const MAX_BODY_LEN: usize = jsonrpc::MAX_MESSAGE_LEN;

/// Checks receipts for one server: the control plane's attested key (prepared once, see
/// [`ReceiptVerifier`]), the server's resource URI, and a replay cache.
#[derive(Debug)]
pub struct ReceiptChecker {
    verifier: ReceiptVerifier,
    audience: String,
    cache: Mutex<ReplayCache>,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The body is not one acceptable JSON-RPC message.
    Message(jsonrpc::JsonRpcError),
    /// The header and `_meta` carry different receipts.
    TwoReceipts,
    /// The receipt is missing or does not check out.
    Receipt(ReceiptError),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Message(e) => write!(f, "receipt required: {e}"),
            Refusal::TwoReceipts => f.write_str("receipt required: two different receipts"),
            Refusal::Receipt(e) => write!(f, "receipt required: {e}"),
        }
    }
}

impl ReceiptChecker {
    /// A checker with `key` (the attested epoch key), for the server at `audience`, remembering
    /// up to `cache_capacity` unexpired receipts (past that, calls are refused until some
    /// expire). The key is prepared here, once; a key that is not canonical or not of prime
    /// order is refused.
    pub fn new(
        key: VerifyingKey,
        audience: impl Into<String>,
        cache_capacity: usize,
    ) -> Result<Self, ReceiptError> {
        Ok(Self {
            verifier: ReceiptVerifier::new(&key)?,
            audience: audience.into(),
            cache: Mutex::new(ReplayCache::new(cache_capacity)),
        })
    }

    /// A checker with the epoch key of the control plane's verified attestation document;
    /// `None` if the document carries no acceptable Ed25519 key.
    pub fn from_attestation(
        document: &VerifiedAttestation,
        audience: impl Into<String>,
        cache_capacity: usize,
    ) -> Option<Self> {
        Self::new(attested_key(document)?, audience, cache_capacity).ok()
    }

    /// Checks one request: `body` as received, `header` the `Attestplane-Receipt` header's
    /// value if any, at `now`. `Ok(None)` for a message that needs no receipt.
    pub fn check(
        &self,
        header: Option<&str>,
        body: &[u8],
        now: UnixMillis,
    ) -> Result<Option<VerifiedReceipt>, Refusal> {
        let message = jsonrpc::parse_message(body).map_err(Refusal::Message)?;
        if message.kind() != Kind::Request || message.method() != Some("tools/call") {
            return Ok(None);
        }
        let params = message.tools_call_params().map_err(Refusal::Message)?;
        let in_meta = match params.meta {
            Some(meta) => {
                let members = object_members(meta, "_meta").map_err(Refusal::Message)?;
                match members.iter().find(|(k, _)| k == RECEIPT_META_KEY) {
                    Some((_, v)) => Some(
                        serde_json_string(v.get())
                            .ok_or(Refusal::Receipt(ReceiptError::Claim("_meta receipt")))?,
                    ),
                    None => None,
                }
            }
            None => None,
        };
        let token = match (header, in_meta.as_deref()) {
            (Some(h), Some(m)) if h != m => return Err(Refusal::TwoReceipts),
            (Some(h), _) => h,
            (None, Some(m)) => m,
            (None, None) => return Err(Refusal::Receipt(ReceiptError::Missing)),
        };
        let call = ReceivedCall {
            audience: &self.audience,
            method: "tools/call",
            tool: &params.name,
            arguments: params.arguments.map(|a| a.get()),
        };
        let mut cache = self
            .cache
            .lock()
            .map_err(|_| Refusal::Receipt(ReceiptError::CacheFull))?;
        self.verifier
            .verify(token, &call, now, &mut cache)
            .map(Some)
            .map_err(Refusal::Receipt)
    }
}

/// A JSON string's value (the receipt in `_meta` is one).
fn serde_json_string(raw: &str) -> Option<String> {
    let node = attestplane_verifier::gateway::json::parse(raw).ok()?;
    node.as_str().map(str::to_owned)
}

/// The refusal as a JSON-RPC error answer (HTTP 200, as MCP servers answer JSON-RPC errors).
fn refusal_response(id: Option<&str>, refusal: &Refusal) -> Response {
    let id = id.and_then(serde_json_raw);
    let body = jsonrpc::error_response(id.as_deref(), RECEIPT_REQUIRED, &refusal.to_string());
    let mut response = (StatusCode::OK, body).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn serde_json_raw(text: &str) -> Option<Box<RawValue>> {
    RawValue::from_string(text.to_owned()).ok()
}

/// axum middleware: refuses a `tools/call` without a valid receipt (see the crate docs). Use
/// with `axum::middleware::from_fn_with_state(Arc<ReceiptChecker>, require_receipt)`.
pub async fn require_receipt(
    State(checker): State<Arc<ReceiptChecker>>,
    request: Request,
    next: Next,
) -> Response {
    let (parts, body) = request.into_parts();
    let bytes = match to_bytes(body, MAX_BODY_LEN).await {
        Ok(b) => b,
        Err(_) => {
            let refusal = Refusal::Message(jsonrpc::JsonRpcError::TooLong {
                len: MAX_BODY_LEN.saturating_add(1),
                max: MAX_BODY_LEN,
            });
            return refusal_response(None, &refusal);
        }
    };
    let header = parts
        .headers
        .get(RECEIPT_HEADER)
        .and_then(|v| v.to_str().ok());
    let now = UnixMillis::from_system_time(std::time::SystemTime::now());
    if let Err(refusal) = checker.check(header, &bytes, now) {
        let id = jsonrpc::parse_message(&bytes)
            .ok()
            .and_then(|m| m.id().map(|i| i.get().to_owned()));
        return refusal_response(id.as_deref(), &refusal);
    }
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}
