//! The HTTP API (docs/http-api.md): operators, agents, auditors and operations.
//!
//! Role. [`router`] maps each route to one enclave request (or a read of the store) and each
//! outcome to a status code and a stable machine code ([`ApiError`]). Handlers hold no state of
//! their own: the enclave decides, the store keeps, this module translates.
//!
//! Limits. Bodies are JSON of at most [`MAX_BODY`] bytes; every enclave call has the proxy's
//! request timeout (504 after it); at most `max_in_flight` requests are inside the proxy at
//! once, beyond which it answers 503 with `Retry-After` instead of queueing without bound.
//! A server's attestation document is fetched with its own timeout and size limit.
//!
//! Trust. Every request is hostile input. Bearer tokens are forwarded to the enclave untouched
//! and never logged or echoed; error messages carry the enclave's reasons (which never contain
//! secrets) and never a request body.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use attestplane_proto::{ByteBuf, ErrorCode, Request, Response, ServerInfo};
use axum::body::{Body, Bytes};
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response as HttpResponse};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use crate::enclave_client::{ClientError, EnclaveClient, Phase};
use crate::registry::Registry;
use crate::store::{Store, StoreError};

/// Largest request body accepted.
pub const MAX_BODY: usize = 256 * 1024;

/// Largest attestation document fetched from a server.
pub const MAX_ATTESTATION_DOCUMENT: usize = 64 * 1024;

/// How long fetching a server's attestation document may take.
pub const ATTESTATION_FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Most entries one `/v1/log/entries` response carries (the store's own range bound; it also
/// bounds the bytes).
pub const MAX_ENTRIES_PER_RESPONSE: u64 = crate::store::MAX_RANGE_ENTRIES as u64;

/// Longest nonce a caller may ask the enclave's attestation document to carry.
pub const MAX_NONCE: usize = 512;

/// What the handlers share.
#[derive(Clone, Debug)]
pub struct AppState {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    client: EnclaveClient,
    store: Arc<Store>,
    registry: Registry,
    http: reqwest::Client,
    request_timeout: Duration,
    in_flight: Semaphore,
    /// Servers with an attestation in progress (the enclave keeps one nonce per server, so
    /// concurrent attestations of one server would invalidate each other's nonces).
    attesting: Mutex<std::collections::HashSet<String>>,
    metrics: Metrics,
}

impl AppState {
    /// State over a started client and its store. Fails only if the HTTP client for
    /// attestation fetches cannot be built (never with a weaker configuration instead).
    pub fn new(
        client: EnclaveClient,
        request_timeout: Duration,
        max_in_flight: usize,
    ) -> Result<Self, reqwest::Error> {
        let store = Arc::clone(client.store());
        // Attestation fetches go to the registered endpoint and nowhere else: no redirects
        // (a server could otherwise point the host at its internal services) and no proxy from
        // the environment.
        let http = reqwest::Client::builder()
            .timeout(ATTESTATION_FETCH_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()?;
        Ok(AppState {
            inner: Arc::new(Inner {
                client,
                store,
                registry: Registry::default(),
                http,
                request_timeout,
                in_flight: Semaphore::new(max_in_flight.max(1)),
                attesting: Mutex::default(),
                metrics: Metrics::default(),
            }),
        })
    }

    /// The enclave client.
    pub fn client(&self) -> &EnclaveClient {
        &self.inner.client
    }

    async fn call(&self, request: Request) -> Result<Response, ApiError> {
        self.inner
            .client
            .call(request, self.inner.request_timeout)
            .await
            .map_err(ApiError::from)
    }
}

/// The API's router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/admin", post(admin))
        .route("/v1/servers", get(discover))
        .route("/v1/servers/{id}/attest", post(attest))
        .route("/v1/servers/{id}/handle", post(resolve))
        .route("/v1/servers/{id}/tools/{tool}/authorize", post(authorize))
        .route("/v1/attestation", get(own_attestation))
        .route("/v1/jwks", get(jwks))
        .route("/v1/log/head", get(log_head))
        .route("/v1/log/entries", get(log_entries))
        .route(
            "/v1/log/checkpoint",
            get(latest_checkpoint).post(new_checkpoint),
        )
        .route("/v1/log/proof/inclusion", get(inclusion_proof))
        .route("/v1/log/proof/consistency", get(consistency_proof))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .layer(middleware::from_fn_with_state(state.clone(), admission))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// Counts, times and admits requests: beyond the in-flight limit, 503 at once.
async fn admission(
    State(state): State<AppState>,
    matched: Option<MatchedPath>,
    request: axum::extract::Request,
    next: Next,
) -> HttpResponse {
    let route = matched
        .as_ref()
        .map_or("unmatched", |m| m.as_str())
        .to_owned();
    let started = Instant::now();
    let operational = matches!(route.as_str(), "/healthz" | "/readyz" | "/metrics");
    let response = if operational {
        next.run(request).await
    } else {
        match state.inner.in_flight.try_acquire() {
            Ok(_permit) => next.run(request).await,
            Err(_) => ApiError::overloaded("too many requests in flight").into_response(),
        }
    };
    state
        .inner
        .metrics
        .observe(&route, response.status().as_u16(), started.elapsed());
    response
}

// ---------------------------------------------------------------------------------------------
// Errors.

/// An error answer: status, stable code, message, and the log entry that recorded it if any.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    seq: Option<u64>,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            seq: None,
            retry_after: None,
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    fn overloaded(message: &str) -> Self {
        let mut e = Self::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", message);
        e.retry_after = Some(1);
        e
    }

    fn logged(mut self, seq: u64) -> Self {
        self.seq = Some(seq);
        self
    }

    /// An enclave error code as HTTP.
    fn from_code(code: ErrorCode, message: &str) -> Self {
        let (status, name) = match code {
            ErrorCode::BadRequest => (StatusCode::BAD_REQUEST, "bad_request"),
            ErrorCode::Unauthenticated => (StatusCode::UNAUTHORIZED, "unauthenticated"),
            ErrorCode::Denied => (StatusCode::FORBIDDEN, "denied"),
            ErrorCode::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            ErrorCode::Conflict => (StatusCode::CONFLICT, "conflict"),
            ErrorCode::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            ErrorCode::NotReady => (StatusCode::SERVICE_UNAVAILABLE, "not_ready"),
            ErrorCode::BrokenLog => (StatusCode::SERVICE_UNAVAILABLE, "broken_log"),
            ErrorCode::Overloaded => return Self::overloaded(message),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        Self::new(status, name, message)
    }

    fn unexpected(got: &Response) -> Self {
        match got {
            Response::Error { code, message } => Self::from_code(*code, message),
            _ => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "unexpected reply from the enclave",
            ),
        }
    }
}

impl From<ClientError> for ApiError {
    fn from(e: ClientError) -> Self {
        let message = e.to_string();
        match e {
            ClientError::Unavailable(_) => {
                let mut e = Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "enclave_unavailable",
                    message,
                );
                e.retry_after = Some(1);
                e
            }
            ClientError::NotReady => {
                let mut e = Self::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", message);
                e.retry_after = Some(1);
                e
            }
            ClientError::Failed(_) => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "not_serving", message)
            }
            ClientError::Timeout => Self::new(StatusCode::GATEWAY_TIMEOUT, "timeout", message),
            ClientError::Protocol(_) => {
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
            }
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::OutOfRange { .. } => Self::bad_request(e.to_string()),
            _ => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("log store: {e}"),
            ),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        let (code, status) = match r.status() {
            StatusCode::UNSUPPORTED_MEDIA_TYPE => {
                ("unsupported_media_type", StatusCode::UNSUPPORTED_MEDIA_TYPE)
            }
            StatusCode::PAYLOAD_TOO_LARGE => ("too_large", StatusCode::PAYLOAD_TOO_LARGE),
            _ => ("bad_request", StatusCode::BAD_REQUEST),
        };
        Self::new(status, code, r.body_text())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> HttpResponse {
        let mut error = json!({"code": self.code, "message": self.message});
        if let (Some(seq), Some(obj)) = (self.seq, error.as_object_mut()) {
            obj.insert("seq".into(), seq.into());
        }
        let mut response = (self.status, Json(json!({ "error": error }))).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// Runs blocking store work off the async workers.
async fn blocking<T, E>(f: impl FnOnce() -> Result<T, E> + Send + 'static) -> ApiResult<T>
where
    T: Send + 'static,
    E: Into<ApiError> + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result.map_err(Into::into),
        Err(e) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("a store task failed: {e}"),
        )),
    }
}

fn bearer(headers: &HeaderMap) -> ApiResult<String> {
    let unauthenticated =
        |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", m.to_owned());
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| unauthenticated("missing Authorization: Bearer token"))?;
    let value = value
        .to_str()
        .map_err(|_| unauthenticated("the Authorization header is not text"))?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or_else(|| unauthenticated("the Authorization header is not a Bearer token"))?
        .trim();
    if token.is_empty() {
        return Err(unauthenticated("empty bearer token"));
    }
    Ok(token.to_owned())
}

/// A server or tool id taken from the path: printable, bounded.
fn path_id(what: &str, id: &str) -> ApiResult<String> {
    if id.is_empty() || id.len() > 256 || id.chars().any(char::is_control) {
        return Err(ApiError::bad_request(format!(
            "the {what} must be 1 to 256 printable characters"
        )));
    }
    Ok(id.to_owned())
}

// ---------------------------------------------------------------------------------------------
// Operator.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminBody {
    request: String,
}

const BASE64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

async fn admin(
    State(state): State<AppState>,
    body: Result<Json<AdminBody>, JsonRejection>,
) -> ApiResult<Json<Value>> {
    let Json(body) = body?;
    let bytes = BASE64
        .decode(body.request.trim())
        .map_err(|e| ApiError::bad_request(format!("`request` is not base64: {e}")))?;
    if bytes.is_empty() {
        return Err(ApiError::bad_request("`request` is empty"));
    }
    match state
        .call(Request::Admin {
            request: ByteBuf::from(bytes),
        })
        .await?
    {
        Response::AdminResult {
            accepted: true,
            seq,
            ..
        } => Ok(Json(json!({"accepted": true, "seq": seq}))),
        Response::AdminResult {
            accepted: false,
            seq,
            reason,
        } => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "admin_refused",
            reason.unwrap_or_else(|| "refused".into()),
        )
        .logged(seq)),
        other => Err(ApiError::unexpected(&other)),
    }
}

/// Removes a server from the in-progress set when its attestation ends, however it ends.
struct AttestGuard<'a> {
    set: &'a Mutex<std::collections::HashSet<String>>,
    id: String,
}

impl Drop for AttestGuard<'_> {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

async fn attest(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let server_id = path_id("server id", &id)?;
    let inserted = state
        .inner
        .attesting
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(server_id.clone());
    if !inserted {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            "an attestation of this server is already in progress",
        ));
    }
    let _guard = AttestGuard {
        set: &state.inner.attesting,
        id: server_id.clone(),
    };
    let challenge = state
        .call(Request::AttestChallenge {
            server_id: server_id.clone(),
        })
        .await?;
    let Response::Challenge { nonce, .. } = challenge else {
        return Err(ApiError::unexpected(&challenge));
    };
    let store = Arc::clone(&state.inner.store);
    let inner = Arc::clone(&state.inner);
    let lookup = server_id.clone();
    let endpoint = blocking(move || inner.registry.endpoint(&store, &lookup))
        .await?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "the server's registration is not in the stored log",
            )
        })?;
    let document = fetch_attestation(&state.inner.http, &endpoint, &nonce).await?;
    let result = state
        .call(Request::AttestEvidence {
            server_id,
            nonce,
            document: ByteBuf::from(document),
        })
        .await?;
    match result {
        Response::AttestResult {
            verified: true,
            seq,
            measurement,
            ..
        } => Ok(Json(
            json!({"verified": true, "seq": seq, "measurement": measurement}),
        )),
        Response::AttestResult {
            verified: false,
            seq,
            reason,
            ..
        } => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "attestation_refused",
            reason.unwrap_or_else(|| "the attestation did not verify".into()),
        )
        .logged(seq)),
        other => Err(ApiError::unexpected(&other)),
    }
}

/// `GET {endpoint}/attestation?nonce=HEX`, bounded in time and size.
async fn fetch_attestation(
    http: &reqwest::Client,
    endpoint: &str,
    nonce: &[u8],
) -> ApiResult<Vec<u8>> {
    let upstream = |m: String| ApiError::new(StatusCode::BAD_GATEWAY, "upstream", m);
    let url = format!(
        "{}/attestation?nonce={}",
        endpoint.trim_end_matches('/'),
        hex::encode(nonce)
    );
    let mut response = http
        .get(&url)
        .send()
        .await
        .map_err(|e| upstream(format!("cannot fetch the server's attestation: {e}")))?;
    if !response.status().is_success() {
        return Err(upstream(format!(
            "the server answered {} to its attestation request",
            response.status()
        )));
    }
    let mut document = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| upstream(format!("reading the server's attestation: {e}")))?
    {
        if document.len().saturating_add(chunk.len()) > MAX_ATTESTATION_DOCUMENT {
            return Err(upstream(format!(
                "the server's attestation document is larger than {MAX_ATTESTATION_DOCUMENT} bytes"
            )));
        }
        document.extend_from_slice(&chunk);
    }
    Ok(document)
}

// ---------------------------------------------------------------------------------------------
// Agent.

#[derive(Serialize)]
struct ServerView<'a> {
    id: &'a str,
    name: &'a str,
    tenant: &'a str,
    resource: &'a str,
    attested: bool,
}

fn denied(seq: u64, code: ErrorCode, reason: &str) -> ApiError {
    ApiError::from_code(code, reason).logged(seq)
}

async fn discover(State(state): State<AppState>, headers: HeaderMap) -> ApiResult<Json<Value>> {
    let bearer = bearer(&headers)?;
    match state.call(Request::Discover { bearer }).await? {
        Response::Servers { servers, seq } => {
            let views: Vec<ServerView<'_>> = servers.iter().map(view).collect();
            Ok(Json(json!({"servers": views, "seq": seq})))
        }
        Response::Denied { seq, reason, code } => Err(denied(seq, code, &reason)),
        other => Err(ApiError::unexpected(&other)),
    }
}

fn view(s: &ServerInfo) -> ServerView<'_> {
    ServerView {
        id: &s.id,
        name: &s.name,
        tenant: &s.tenant,
        resource: &s.resource,
        attested: s.attested,
    }
}

async fn resolve(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    let bearer = bearer(&headers)?;
    let server_id = path_id("server id", &id)?;
    match state.call(Request::Resolve { bearer, server_id }).await? {
        Response::Handle {
            token,
            seq,
            expires_at,
        } => Ok(Json(
            json!({"token": token, "seq": seq, "expires_at": expires_at}),
        )),
        Response::Denied { seq, reason, code } => Err(denied(seq, code, &reason)),
        other => Err(ApiError::unexpected(&other)),
    }
}

async fn authorize(
    State(state): State<AppState>,
    Path((id, tool)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    let bearer = bearer(&headers)?;
    let server_id = path_id("server id", &id)?;
    let tool = path_id("tool name", &tool)?;
    match state
        .call(Request::Authorize {
            bearer,
            server_id,
            tool,
        })
        .await?
    {
        Response::Authorized {
            allowed,
            seq,
            reason,
        } => {
            let mut body = json!({"allowed": allowed, "seq": seq});
            if let (Some(reason), Some(obj)) = (reason, body.as_object_mut()) {
                obj.insert("reason".into(), reason.into());
            }
            Ok(Json(body))
        }
        Response::Denied { seq, reason, code } => Err(denied(seq, code, &reason)),
        other => Err(ApiError::unexpected(&other)),
    }
}

// ---------------------------------------------------------------------------------------------
// Auditor.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NonceQuery {
    nonce: Option<String>,
}

async fn own_attestation_parts(
    state: &AppState,
    nonce: Option<Vec<u8>>,
) -> ApiResult<(Vec<u8>, String)> {
    match state
        .call(Request::GetAttestation {
            nonce: nonce.map(ByteBuf::from),
        })
        .await?
    {
        Response::Attestation { document, jwks } => Ok((document.into_vec(), jwks)),
        other => Err(ApiError::unexpected(&other)),
    }
}

async fn own_attestation(
    State(state): State<AppState>,
    query: Result<Query<NonceQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let nonce = match q.nonce {
        Some(h) => {
            let n = hex::decode(&h)
                .map_err(|e| ApiError::bad_request(format!("`nonce` is not hex: {e}")))?;
            if n.len() > MAX_NONCE {
                return Err(ApiError::bad_request(format!(
                    "`nonce` is longer than {MAX_NONCE} bytes"
                )));
            }
            Some(n)
        }
        None => None,
    };
    let (document, jwks) = own_attestation_parts(&state, nonce).await?;
    let jwks: Value = serde_json::from_str(&jwks).map_err(|_| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the enclave's JWKS is not JSON",
        )
    })?;
    Ok(Json(json!({
        "document": base64::engine::general_purpose::STANDARD.encode(document),
        "jwks": jwks,
    })))
}

async fn jwks(State(state): State<AppState>) -> ApiResult<HttpResponse> {
    let (_, jwks) = own_attestation_parts(&state, None).await?;
    Ok(([(header::CONTENT_TYPE, "application/json")], jwks).into_response())
}

async fn log_head(State(state): State<AppState>) -> Json<Value> {
    let store = &state.inner.store;
    Json(json!({
        "size": store.len(),
        "head": store.head_hash().map(|h| h.to_hex()),
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RangeQuery {
    start: u64,
    end: Option<u64>,
}

async fn log_entries(
    State(state): State<AppState>,
    query: Result<Query<RangeQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<HttpResponse> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let store = Arc::clone(&state.inner.store);
    let size = store.len();
    if q.start > size {
        return Err(ApiError::bad_request(format!(
            "start {} is beyond the log's size {size}",
            q.start
        )));
    }
    let limit = q.start.saturating_add(MAX_ENTRIES_PER_RESPONSE).min(size);
    let end = q.end.unwrap_or(limit).min(limit);
    if end < q.start {
        return Err(ApiError::bad_request("end is before start"));
    }
    let start = q.start;
    let entries = blocking(move || store.range(start, end)).await?;
    let mut body = Vec::with_capacity(entries.iter().map(Vec::len).sum());
    for e in &entries {
        body.extend_from_slice(e);
    }
    let next = start.saturating_add(entries.len() as u64);
    let mut response = (
        [(header::CONTENT_TYPE, "application/cbor-seq")],
        Bytes::from(body),
    )
        .into_response();
    response
        .headers_mut()
        .insert("attestplane-next-start", HeaderValue::from(next));
    Ok(response)
}

async fn latest_checkpoint(State(state): State<AppState>) -> ApiResult<HttpResponse> {
    match state.inner.store.latest_checkpoint()? {
        Some(note) => Ok(text(note)),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no checkpoint has been stored yet",
        )),
    }
}

async fn new_checkpoint(State(state): State<AppState>) -> ApiResult<HttpResponse> {
    // A checkpoint covers durable entries only; entries in flight make the enclave answer
    // NotReady, so retry briefly.
    let deadline = Instant::now() + state.inner.request_timeout;
    loop {
        match state.call(Request::Checkpoint).await? {
            Response::Checkpoint { note } => {
                let store = Arc::clone(&state.inner.store);
                let stored = note.clone();
                blocking(move || store.put_checkpoint(&stored)).await?;
                return Ok(text(note));
            }
            Response::Error {
                code: ErrorCode::NotReady,
                ..
            } if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            other => return Err(ApiError::unexpected(&other)),
        }
    }
}

fn text(body: String) -> HttpResponse {
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InclusionQuery {
    index: u64,
    size: u64,
}

async fn inclusion_proof(
    State(state): State<AppState>,
    query: Result<Query<InclusionQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let store = Arc::clone(&state.inner.store);
    if q.size == 0 || q.index >= q.size || q.size > store.len() {
        return Err(ApiError::bad_request(format!(
            "need index < size <= {} (the log's size)",
            store.len()
        )));
    }
    let (leaf, root, proof) = blocking(move || {
        Ok::<_, StoreError>((
            store.leaf_hash(q.index)?,
            store.root(q.size)?,
            store.inclusion_proof(q.index, q.size)?,
        ))
    })
    .await?;
    Ok(Json(json!({
        "index": q.index,
        "size": q.size,
        "leaf": leaf.to_hex(),
        "root": root.to_hex(),
        "proof": proof.iter().map(|h| h.to_hex()).collect::<Vec<_>>(),
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConsistencyQuery {
    old: u64,
    new: u64,
}

async fn consistency_proof(
    State(state): State<AppState>,
    query: Result<Query<ConsistencyQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let store = Arc::clone(&state.inner.store);
    if q.old > q.new || q.new > store.len() {
        return Err(ApiError::bad_request(format!(
            "need old <= new <= {} (the log's size)",
            store.len()
        )));
    }
    let (old_root, new_root, proof) = blocking(move || {
        Ok::<_, StoreError>((
            store.root(q.old)?,
            store.root(q.new)?,
            store.consistency_proof(q.old, q.new)?,
        ))
    })
    .await?;
    Ok(Json(json!({
        "old": q.old,
        "new": q.new,
        "old_root": old_root.to_hex(),
        "new_root": new_root.to_hex(),
        "proof": proof.iter().map(|h| h.to_hex()).collect::<Vec<_>>(),
    })))
}

// ---------------------------------------------------------------------------------------------
// Operations.

async fn readyz(State(state): State<AppState>) -> HttpResponse {
    match state.inner.client.phase() {
        Phase::Ready { epoch } => {
            (StatusCode::OK, format!("ready (epoch {epoch})\n")).into_response()
        }
        Phase::Connecting => (
            StatusCode::SERVICE_UNAVAILABLE,
            "connecting to the enclave\n",
        )
            .into_response(),
        Phase::Replaying { sent, total } => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("replaying the log into the enclave: {sent} of {total}\n"),
        )
            .into_response(),
        Phase::Failed(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not serving: {why}\n"),
        )
            .into_response(),
    }
}

/// Latency histogram bucket bounds, in seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
];

#[derive(Debug, Default)]
struct Metrics {
    by_route: Mutex<HashMap<(String, u16), u64>>,
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Metrics {
    fn observe(&self, route: &str, status: u16, elapsed: Duration) {
        {
            let mut m = self.by_route.lock().unwrap_or_else(|p| p.into_inner());
            *m.entry((route.to_owned(), status)).or_insert(0) += 1;
        }
        let secs = elapsed.as_secs_f64();
        for (bound, bucket) in BUCKETS.iter().zip(&self.buckets) {
            if secs <= *bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }
}

async fn metrics(State(state): State<AppState>) -> HttpResponse {
    let m = &state.inner.metrics;
    let mut out = String::new();
    let _ = writeln!(out, "# TYPE attestplane_http_requests_total counter");
    {
        let by_route = m.by_route.lock().unwrap_or_else(|p| p.into_inner());
        let mut rows: Vec<_> = by_route.iter().collect();
        rows.sort();
        for ((route, status), n) in rows {
            let _ = writeln!(
                out,
                "attestplane_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
    }
    let _ = writeln!(
        out,
        "# TYPE attestplane_http_request_duration_seconds histogram"
    );
    for (bound, bucket) in BUCKETS.iter().zip(&m.buckets) {
        let _ = writeln!(
            out,
            "attestplane_http_request_duration_seconds_bucket{{le=\"{bound}\"}} {}",
            bucket.load(Ordering::Relaxed)
        );
    }
    let count = m.count.load(Ordering::Relaxed);
    let _ = writeln!(
        out,
        "attestplane_http_request_duration_seconds_bucket{{le=\"+Inf\"}} {count}"
    );
    let _ = writeln!(
        out,
        "attestplane_http_request_duration_seconds_sum {}",
        m.sum_us.load(Ordering::Relaxed) as f64 / 1e6
    );
    let _ = writeln!(
        out,
        "attestplane_http_request_duration_seconds_count {count}"
    );
    let store = &state.inner.store;
    let stats = store.stats();
    let _ = writeln!(out, "# TYPE attestplane_log_entries gauge");
    let _ = writeln!(out, "attestplane_log_entries {}", store.len());
    let _ = writeln!(out, "# TYPE attestplane_store_syncs_total counter");
    let _ = writeln!(out, "attestplane_store_syncs_total {}", stats.syncs);
    let c = state.inner.client.metrics();
    let replies = c.replies.load(Ordering::Relaxed);
    let _ = writeln!(out, "# TYPE attestplane_enclave_round_trip_seconds summary");
    let _ = writeln!(
        out,
        "attestplane_enclave_round_trip_seconds_sum {}",
        c.round_trip_us.load(Ordering::Relaxed) as f64 / 1e6
    );
    let _ = writeln!(
        out,
        "attestplane_enclave_round_trip_seconds_count {replies}"
    );
    for (name, v) in [
        ("attestplane_enclave_persists_total", &c.persists),
        (
            "attestplane_enclave_rerouted_persists_total",
            &c.rerouted_persists,
        ),
        (
            "attestplane_enclave_parked_persists_total",
            &c.parked_persists,
        ),
        ("attestplane_enclave_connects_total", &c.connects),
        ("attestplane_enclave_replays_total", &c.replays),
    ] {
        let _ = writeln!(out, "# TYPE {name} counter");
        let _ = writeln!(out, "{name} {}", v.load(Ordering::Relaxed));
    }
    let ready = u8::from(matches!(state.inner.client.phase(), Phase::Ready { .. }));
    let _ = writeln!(out, "# TYPE attestplane_ready gauge");
    let _ = writeln!(out, "attestplane_ready {ready}");
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        Body::from(out),
    )
        .into_response()
}
