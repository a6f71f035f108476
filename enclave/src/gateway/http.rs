//! The gateway's HTTP server for agents: one MCP endpoint per registered server,
//! `/mcp/{server-id}`, in both protocol eras, plus RFC 9728 protected-resource metadata.
//!
//! Per request: the bearer token is checked inside the enclave against the endpoint's resource
//! URI (401 with `WWW-Authenticate: Bearer resource_metadata=…` otherwise); the body is read
//! bounded and parsed as one JSON-RPC message (batches refused); the era is settled and the
//! modern era's headers checked against the body; then the method is served:
//!
//! - `initialize` (legacy): a session minted from the NSM's randomness, bound to the agent;
//! - `server/discover` (modern), `ping`: answered by the gateway;
//! - `tools/list`: the upstream's tools (all pages, bounded), checked against their pins,
//!   filtered by the policy for this agent, forwarded byte for byte; the listing is cached
//!   for calls for at most [`TOOLS_TTL`], and a listener on the upstream's
//!   `notifications/tools/list_changed` (`subscriptions/listen` in the modern era, the
//!   session's GET stream in the legacy one) drops the cache at once, so a call after an
//!   announced change is checked against a fresh listing;
//! - `tools/call`: decided (pins, hard rules, Cedar), the decision entry made durable, then
//!   forwarded; the answer's result entry made durable, then answered;
//! - `resources/read`, `prompts/get`: decided (hard rules, Cedar `read_resource` on the URI,
//!   `get_prompt` on the name) and logged exactly like a call, with a receipt;
//! - `resources/list`, `resources/templates/list`, `prompts/list`: the agent's page forwarded,
//!   its items filtered per identity like tools;
//! - a legacy agent's JSON-RPC response: its answer to a server's request the gateway relayed
//!   to it on a call's stream ([`super::relay`]), taken only from that agent and session;
//! - anything else (`resources/subscribe` among them): refused (`-32601`), deny by default.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use attestplane_verifier::admin::{ClientRequest, Digest32};
use attestplane_verifier::entry::{DriftRecord, PiiRecord, PrincipalRecord};
use attestplane_verifier::gateway::json::parse_ijson;
use attestplane_verifier::gateway::jsonrpc::{
    INTERNAL_ERROR, INVALID_PARAMS, INVALID_REQUEST, JsonRpcError, Kind, ListKind,
    METHOD_NOT_FOUND, Message, RECEIPT_META_KEY, error_response, parse_message,
};
use attestplane_verifier::policy::{Action, PiiAction};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::value::RawValue;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, AsyncWrite};

use super::era::{self, Era, LEGACY_VERSION, MODERN_VERSION, McpHeaders};
use super::inside::{self, CallVerdict, GATEWAY_ID_BASE, Gated, Refusal};
use super::redact::{self, Treated};
use super::relay::{AgentBody, CallRelay, Relays};
use super::session::{SessionError, SessionOwner, Sessions};
use super::upstream::{Answer, Endpoint, UpstreamError, Upstreams};
use super::{GatewayConfig, MAX_REQUEST_BODY};
use crate::server::{EnclaveAccess, HandlerGone};
use attestplane_proto::Gate;

/// How long an upstream's listing is trusted for calls before it is fetched again.
pub const TOOLS_TTL: Duration = Duration::from_secs(60);

/// The most `tools/list` pages followed.
pub const MAX_PAGES: usize = 16;

/// What the gateway knows of one upstream's tools.
#[derive(Default)]
struct ToolCache {
    /// When the listing was fetched.
    fetched: Option<Instant>,
    /// The kept tools and their pinned digests.
    kept: std::collections::BTreeMap<String, Digest32>,
    /// The drift last logged.
    drift: Vec<DriftRecord>,
    /// The pins the listing was checked against: a call whose tool's pin has changed since
    /// (an admin re-pinned or unpinned it) re-lists and re-checks before it is decided.
    pins: std::collections::BTreeMap<String, Digest32>,
}

/// The gateway: shared by every agent connection.
pub struct Gateway {
    config: GatewayConfig,
    access: EnclaveAccess,
    upstreams: Arc<Upstreams>,
    sessions: Mutex<Sessions>,
    tools: Arc<Mutex<HashMap<String, ToolCache>>>,
    /// Per server, when a listener for its `notifications/tools/list_changed` was last
    /// started, and whether it still runs.
    listeners: Arc<Mutex<HashMap<String, (Instant, bool)>>>,
    next_id: AtomicU64,
    /// Server-to-client requests relayed to agents, awaiting their answers.
    relays: Arc<Relays>,
    /// The gateway itself, for the tasks a relaying call runs in (set when it first serves).
    me: std::sync::OnceLock<std::sync::Weak<Gateway>>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

type Reply = Response<AgentBody>;

/// A settled request: who, where, which era.
struct Ctx {
    server: String,
    principal: PrincipalRecord,
    /// The era the agent speaks (answers are shaped for it).
    era: Era,
    /// Where the server is, as registered when the agent was authenticated (`None`: the
    /// registered endpoint is not an `http://` URL).
    endpoint: Option<Endpoint>,
    /// The legacy session the request came in (checked), if any.
    session: Option<String>,
    /// The gate of the agent's connection when the host holds what is written on it
    /// ([`Gateway::serve_held`]): an answer that depends on an entry is
    /// then written at once and held by the host until the entry is durable. `None`: the
    /// gateway waits for `Durable` before answering.
    held: Option<Gate>,
}

/// The step a `tools/call` trip to the handler thread took.
enum CallStep {
    /// The tool's pin changed since its listing was checked: nothing decided; list again.
    Stale,
    /// Decided (and, unless withheld, the decision entry written).
    Verdict(CallVerdict),
}

impl Gateway {
    /// A gateway deciding through `access` and reaching upstreams through `upstreams`.
    pub fn new(config: GatewayConfig, access: EnclaveAccess, upstreams: Upstreams) -> Self {
        let sessions = Sessions::new(config.max_sessions, config.session_idle);
        let relays = Arc::new(Relays::new(config.agent_answer_timeout));
        Self {
            config,
            access,
            upstreams: Arc::new(upstreams),
            sessions: Mutex::new(sessions),
            tools: Arc::new(Mutex::new(HashMap::new())),
            listeners: Arc::new(Mutex::new(HashMap::new())),
            next_id: AtomicU64::new(0),
            relays,
            me: std::sync::OnceLock::new(),
        }
    }

    /// Serves HTTP/1.1 on one agent connection until it closes; answers that depend on log
    /// entries wait for the host's `Durable` before they are written.
    pub async fn serve_connection<S>(self: Arc<Self>, io: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        self.serve_held(io, None).await;
    }

    /// [`Self::serve_connection`] for a connection the host holds under `held` (the gate of
    /// an agent connection from the enclave's MCP listener, `AgentStream::gate`): answers that
    /// depend on entries are written at once under their need, and the host delivers them
    /// once the entries are durable. `None`: as [`Self::serve_connection`].
    pub async fn serve_held<S>(self: Arc<Self>, io: S, held: Option<Gate>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let _ = self.me.set(Arc::downgrade(&self));
        let gateway = self;
        let service = hyper::service::service_fn(move |req| {
            let gateway = gateway.clone();
            let held = held.clone();
            async move { Ok::<_, Infallible>(gateway.handle_held(req, held).await) }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .keep_alive(true)
            .max_buf_size(64 * 1024)
            .header_read_timeout(Duration::from_secs(10))
            .timer(hyper_util::rt::TokioTimer::new())
            .serve_connection(TokioIo::new(io), service)
            .await;
    }

    fn next_id(&self) -> u64 {
        GATEWAY_ID_BASE | self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn lock_sessions(&self) -> std::sync::MutexGuard<'_, Sessions> {
        self.sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lock_tools(&self) -> std::sync::MutexGuard<'_, HashMap<String, ToolCache>> {
        self.tools
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Answers one HTTP request.
    ///
    /// The bearer token is checked first, before a POST's body is read: an agent without a
    /// valid token gets its 401 at the cost of one signature check (none when the token is in
    /// the enclave's bearer cache), and its body is read only if it is small
    /// ([`ID_READ_LIMIT`]), and then only skimmed for the request's JSON-RPC id, which the 401
    /// carries; never parsed as a message or scanned for PII. Nothing is decided, written or
    /// forwarded before the token checks out.
    pub async fn handle(&self, req: Request<Incoming>) -> Reply {
        self.handle_held(req, None).await
    }

    /// [`Self::handle`] for a request on a connection the host holds under `held`.
    async fn handle_held(&self, req: Request<Incoming>, held: Option<Gate>) -> Reply {
        let path = req.uri().path().to_owned();
        if let Some(id) = path.strip_prefix("/.well-known/oauth-protected-resource/mcp/") {
            return self.metadata(id).await;
        }
        let Some(server) = path.strip_prefix("/mcp/").filter(|s| valid_id(s)) else {
            return plain(StatusCode::NOT_FOUND, "no such endpoint");
        };
        let server = server.to_owned();
        let bearer = match bearer(req.headers()) {
            Some(b) => b,
            None => return self.unauthorized(&server, None, "a bearer token is required"),
        };
        let headers = mcp_headers(req.headers());
        let method = req.method().clone();
        let (principal, endpoint) = match self.authenticated(&server, bearer).await {
            Ok(x) => x,
            Err(e) => {
                let id = match method {
                    Method::POST => small_body_id(req.into_body()).await,
                    _ => None,
                };
                return self.refused_caller(&server, id.as_deref(), &e);
            }
        };
        if method != Method::POST {
            return match method {
                Method::DELETE => self.delete_session(&server, &principal, &headers),
                // No server-initiated stream is offered (the spec allows 405).
                Method::GET => with_allow(plain(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "no server-initiated stream at this endpoint",
                )),
                _ => with_allow(plain(StatusCode::METHOD_NOT_ALLOWED, "use POST")),
            };
        }
        let body = match Limited::new(req.into_body(), MAX_REQUEST_BODY)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(_) => {
                return rpc_error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    None,
                    INVALID_REQUEST,
                    "request body too large",
                );
            }
        };
        let message = match parse_message(&body) {
            Ok(m) => m,
            Err(e) => {
                // Not a message the gateway reads, but its id may still be readable: the
                // refusal carries it then.
                let id = era::readable_id(&body);
                return rpc_error(
                    StatusCode::BAD_REQUEST,
                    id.as_deref(),
                    e.code(),
                    &e.to_string(),
                );
            }
        };
        let id = message.id().map(|r| r.get().to_owned());
        let era = match era::classify(&headers, &message) {
            Ok(era) => era,
            Err(e) => {
                return rpc_error(
                    StatusCode::BAD_REQUEST,
                    id.as_deref(),
                    e.code(),
                    &e.to_string(),
                );
            }
        };
        match message.kind() {
            Kind::Request => {}
            Kind::Notification => return accepted(),
            // A legacy agent's answer to a server's request the gateway relayed to it.
            Kind::Response | Kind::ErrorResponse
                if era == Era::Legacy && headers.session.is_some() =>
            {
                return self.agent_response(&server, id.as_deref(), &principal, &headers, &message);
            }
            // Otherwise the gateway asked nothing: a response is out of place.
            Kind::Response | Kind::ErrorResponse => {
                return rpc_error(
                    StatusCode::BAD_REQUEST,
                    id.as_deref(),
                    INVALID_REQUEST,
                    "unexpected response: the gateway sent no request",
                );
            }
        }
        let method = message.method().unwrap_or_default().to_owned();
        let ctx = Ctx {
            server,
            principal,
            era,
            endpoint,
            session: headers.session.clone(),
            held,
        };
        if era == Era::Legacy && method != "initialize" {
            let owner = owner(&ctx);
            let result = match &headers.session {
                Some(s) => self.lock_sessions().touch(s, &owner, Instant::now()),
                None => Err(SessionError::Unknown),
            };
            if let Err(e) = result {
                let status = if headers.session.is_some() {
                    StatusCode::NOT_FOUND
                } else {
                    StatusCode::BAD_REQUEST
                };
                return rpc_error(status, id.as_deref(), INVALID_REQUEST, &e.to_string());
            }
        }
        match method.as_str() {
            "initialize" if era == Era::Legacy => self.initialize(&ctx, id.as_deref()).await,
            "server/discover" if era == Era::Modern => discover(id.as_deref()),
            "ping" => json(
                StatusCode::OK,
                format!(
                    r#"{{"jsonrpc":"2.0","id":{},"result":{{}}}}"#,
                    id.as_deref().unwrap_or("null")
                ),
            ),
            "tools/list" => self.tools_list(&ctx, &message).await,
            "tools/call" => self.tools_call(ctx, &message).await,
            "resources/read" => self.read_or_get(&ctx, &message, Action::ReadResource).await,
            "prompts/get" => self.read_or_get(&ctx, &message, Action::GetPrompt).await,
            "resources/list" => {
                self.gated_list(&ctx, &message, ListKind::Resources, Action::ReadResource)
                    .await
            }
            "resources/templates/list" => {
                self.gated_list(
                    &ctx,
                    &message,
                    ListKind::ResourceTemplates,
                    Action::ReadResource,
                )
                .await
            }
            "prompts/list" => {
                self.gated_list(&ctx, &message, ListKind::Prompts, Action::GetPrompt)
                    .await
            }
            _ => {
                let status = match era {
                    Era::Modern => StatusCode::NOT_FOUND,
                    Era::Legacy => StatusCode::OK,
                };
                rpc_error(
                    status,
                    id.as_deref(),
                    METHOD_NOT_FOUND,
                    "method not available through the control plane",
                )
            }
        }
    }

    /// Authenticates the agent for `server`'s endpoint and reads where the server is, in one
    /// trip to the enclave; why not (401, 404, 503) if it fails.
    async fn authenticated(
        &self,
        server: &str,
        bearer: String,
    ) -> Result<(PrincipalRecord, Option<Endpoint>), Refusal> {
        let audience = self.config.resource(server);
        let sid = server.to_owned();
        self.access
            .run(move |enclave, now| {
                let who = authenticate_inside(enclave, &sid, &bearer, &audience, now);
                (who, Vec::new())
            })
            .await
            .map_err(|_| Refusal::NotReady)
            .and_then(|r| r)
    }

    /// The answer to a caller refused before its request (JSON-RPC id `id`) is decided.
    fn refused_caller(&self, server: &str, id: Option<&str>, e: &Refusal) -> Reply {
        match e {
            Refusal::Unauthenticated(why) => self.unauthorized(server, id, why),
            e => refusal_reply(id, e),
        }
    }

    fn unauthorized(&self, server: &str, id: Option<&str>, why: &str) -> Reply {
        let mut reply = rpc_error(StatusCode::UNAUTHORIZED, id, INVALID_REQUEST, why);
        let challenge = format!(
            "Bearer resource_metadata=\"{}\"",
            self.config.metadata_url(server)
        );
        if let Ok(v) = HeaderValue::from_str(&challenge) {
            reply
                .headers_mut()
                .insert(hyper::header::WWW_AUTHENTICATE, v);
        }
        reply
    }

    /// RFC 9728 protected-resource metadata: the resource and the authorization servers whose
    /// tokens the endpoint accepts (the installed identity providers).
    async fn metadata(&self, server: &str) -> Reply {
        if !valid_id(server) {
            return plain(StatusCode::NOT_FOUND, "no such endpoint");
        }
        let id = server.to_owned();
        let issuers = self
            .access
            .run(move |enclave, _| {
                let known = enclave.state().server(&id).is_some();
                let issuers: Vec<String> = enclave.state().identity_issuers();
                ((known, issuers), Vec::new())
            })
            .await;
        match issuers {
            Ok((true, issuers)) => {
                let body = serde_json::json!({
                    "resource": self.config.resource(server),
                    "authorization_servers": issuers,
                    "bearer_methods_supported": ["header"],
                });
                json(StatusCode::OK, body.to_string())
            }
            Ok((false, _)) => plain(StatusCode::NOT_FOUND, "no such endpoint"),
            Err(_) => plain(StatusCode::SERVICE_UNAVAILABLE, "not ready"),
        }
    }

    async fn initialize(&self, ctx: &Ctx, id: Option<&str>) -> Reply {
        let random = self
            .access
            .run(|enclave, _| (enclave.random(16), Vec::new()))
            .await;
        let Ok(Ok(random)) = random else {
            return rpc_error(
                StatusCode::SERVICE_UNAVAILABLE,
                id,
                INTERNAL_ERROR,
                "no randomness for a session",
            );
        };
        let session = match self
            .lock_sessions()
            .open(owner(ctx), &random, Instant::now())
        {
            Ok(s) => s,
            Err(e) => {
                return rpc_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    id,
                    INTERNAL_ERROR,
                    &e.to_string(),
                );
            }
        };
        let body = format!(
            r#"{{"jsonrpc":"2.0","id":{},"result":{{"protocolVersion":"{LEGACY_VERSION}","capabilities":{{"tools":{{"listChanged":false}},"resources":{{}},"prompts":{{}}}},"serverInfo":{{"name":"attestplane/{}","version":"{}"}}}}}}"#,
            id.unwrap_or("null"),
            ctx.server,
            env!("CARGO_PKG_VERSION")
        );
        let mut reply = json(StatusCode::OK, body);
        if let Ok(v) = HeaderValue::from_str(&session) {
            reply.headers_mut().insert("mcp-session-id", v);
        }
        reply
    }

    fn delete_session(
        &self,
        server: &str,
        principal: &PrincipalRecord,
        headers: &McpHeaders,
    ) -> Reply {
        let owner = SessionOwner {
            server: server.to_owned(),
            agent: principal.agent.clone(),
            issuer: principal.issuer.clone(),
        };
        match &headers.session {
            Some(s) => match self.lock_sessions().close(s, &owner) {
                Ok(()) => plain(StatusCode::OK, "session ended"),
                Err(_) => plain(StatusCode::NOT_FOUND, "unknown session"),
            },
            None => plain(StatusCode::BAD_REQUEST, "no session"),
        }
    }

    /// Fetches every page of the upstream's tools (bounded): the answers' bytes.
    async fn fetch_tools(&self, endpoint: &Endpoint) -> Result<Vec<Bytes>, UpstreamError> {
        let era = self.upstreams.era(endpoint).await?;
        let mut pages = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let mut params = serde_json::Map::new();
            if let Some(c) = &cursor {
                params.insert("cursor".into(), serde_json::Value::String(c.clone()));
            }
            if era == Era::Modern {
                params.insert("_meta".into(), modern_meta());
            }
            let body = serde_json::json!({
                "jsonrpc": "2.0",
                "id": "attestplane-list",
                "method": "tools/list",
                "params": params,
            })
            .to_string();
            let answer = self
                .upstreams
                .call(endpoint, "tools/list", None, &body, None, 0)
                .await?;
            let next = parse_message(&answer.body)
                .ok()
                .and_then(|m| m.tools_list_result().ok())
                .and_then(|r| r.next_cursor);
            pages.push(answer.body);
            match next {
                Some(c) => cursor = Some(c),
                None => return Ok(pages),
            }
        }
        Err(UpstreamError::BadAnswer("too many tools/list pages"))
    }

    /// Lists, checks pins (logging drift) and filters for `ctx`'s agent. Returns the last
    /// page (its other members are forwarded as they are) and the shown tools' text.
    /// A refusal answers the request whose JSON-RPC id is `rid` (a listing, or the call that
    /// needed one).
    async fn listing(
        &self,
        ctx: &Ctx,
        endpoint: &Endpoint,
        rid: Option<&str>,
    ) -> Result<(Bytes, Vec<String>), Reply> {
        let pages = self
            .fetch_tools(endpoint)
            .await
            .map_err(|e| upstream_reply(rid, &e))?;
        let mut listed: Vec<Box<RawValue>> = Vec::new();
        for page in &pages {
            let m = parse_message(page).map_err(|_| bad_upstream(rid))?;
            let r = m.tools_list_result().map_err(|_| bad_upstream(rid))?;
            for t in r.tools {
                listed.push(t.to_owned());
            }
        }
        let last = pages.last().cloned().unwrap_or_default();
        let principal = ctx.principal.clone();
        let server = ctx.server.clone();
        let mut drift = self
            .lock_tools()
            .get(&server)
            .map(|c| c.drift.clone())
            .unwrap_or_default();
        let id = self.next_id();
        let listed = Arc::new(listed);
        let for_inside = listed.clone();
        let outcome = self
            .access
            .run(move |enclave, now| {
                match inside::check_listing(
                    enclave,
                    now,
                    id,
                    &principal,
                    &server,
                    &for_inside,
                    &mut drift,
                ) {
                    Ok((listing, replies)) => {
                        let pins = enclave
                            .state()
                            .server(&server)
                            .map(|s| s.spec.tools.clone())
                            .unwrap_or_default();
                        (Ok((listing, drift, pins)), replies)
                    }
                    Err(e) => (Err(e), Vec::new()),
                }
            })
            .await
            .map_err(|_| plain(StatusCode::SERVICE_UNAVAILABLE, "not ready"))?;
        let (listing, drift, pins) = outcome.map_err(|e| refusal_reply(rid, &e))?;
        if let Some(seq) = listing.drift_seq {
            self.access
                .durable(seq)
                .await
                .map_err(|_| plain(StatusCode::SERVICE_UNAVAILABLE, "not ready"))?;
        }
        {
            let mut tools = self.lock_tools();
            let cache = tools.entry(ctx.server.clone()).or_default();
            cache.fetched = Some(Instant::now());
            cache.kept = listing.kept.clone();
            cache.drift = drift;
            cache.pins = pins;
        }
        self.listen_for_changes(endpoint);
        let shown = listing
            .shown
            .iter()
            .filter_map(|i| listed.get(*i).map(|t| t.get().to_owned()))
            .collect();
        Ok((last, shown))
    }

    /// Makes sure a listener for the upstream's `notifications/tools/list_changed` runs: each
    /// one makes the next call re-list and re-check the pins instead of trusting the cached
    /// listing for the rest of [`TOOLS_TTL`]. Started at most once per [`TOOLS_TTL`] per
    /// server (an upstream that offers no stream is not asked on every listing).
    fn listen_for_changes(&self, endpoint: &Endpoint) {
        let server = endpoint.server.clone();
        {
            let mut listeners = lock(&self.listeners);
            match listeners.get(&server) {
                Some((_, true)) => return,
                Some((started, false)) if started.elapsed() < TOOLS_TTL => return,
                _ => {}
            }
            listeners.insert(server.clone(), (Instant::now(), true));
        }
        let (upstreams, tools, listeners) = (
            self.upstreams.clone(),
            self.tools.clone(),
            self.listeners.clone(),
        );
        let endpoint = endpoint.clone();
        tokio::spawn(async move {
            let changed = || {
                if let Some(cache) = lock(&tools).get_mut(&server) {
                    cache.fetched = None;
                }
            };
            let _ = upstreams.listen_tools_changed(&endpoint, changed).await;
            if let Some(l) = lock(&listeners).get_mut(&server) {
                l.1 = false;
            }
        });
    }

    async fn tools_list(&self, ctx: &Ctx, message: &Message<'_>) -> Reply {
        let id = message.id().map(RawValue::get);
        let Some(endpoint) = ctx.endpoint.clone() else {
            return not_http();
        };
        let (last, shown) = match self.listing(ctx, &endpoint, id).await {
            Ok(x) => x,
            Err(r) => return r,
        };
        let Ok(page) = parse_message(&last) else {
            return bad_upstream(id);
        };
        let raws: Vec<Box<RawValue>> = shown
            .into_iter()
            .filter_map(|t| RawValue::from_string(t).ok())
            .collect();
        let refs: Vec<&RawValue> = raws.iter().map(|b| b.as_ref()).collect();
        let Ok(with_tools) = page.with_result_tools(&refs) else {
            return bad_upstream(id);
        };
        let Some(body) = with_agent_id(&with_tools, id) else {
            return bad_upstream(id);
        };
        // The listing is filtered for this agent: never cacheable for anyone else.
        match for_agent(ctx.era, body, true) {
            Ok(body) => json(StatusCode::OK, body),
            Err(_) => bad_upstream(id),
        }
    }

    /// A `tools/call` of an authenticated agent: the pin and the decision in one trip to the
    /// enclave. The listing is fetched first only if the cached one is older than
    /// [`TOOLS_TTL`].
    async fn tools_call(&self, ctx: Ctx, message: &Message<'_>) -> Reply {
        let id = message.id().map(RawValue::get);
        let params = match message.tools_call_params() {
            Ok(p) => p,
            Err(e) => return rpc_error(StatusCode::BAD_REQUEST, id, e.code(), &e.to_string()),
        };
        if let Some(r) = refuse_non_ijson(id, params.arguments) {
            return r;
        }
        // An endpoint the gateway cannot reach: refused before anything is decided.
        let Some(endpoint) = ctx.endpoint.clone() else {
            return not_http();
        };
        // The tool's live definition must still be its pinned one: from a listing younger than
        // the TTL, or a fresh one.
        let fresh = self
            .lock_tools()
            .get(&ctx.server)
            .and_then(|c| c.fetched.filter(|t| t.elapsed() < TOOLS_TTL).map(|_| ()))
            .is_some();
        if !fresh && let Err(r) = self.listing(&ctx, &endpoint, id).await {
            return r;
        }
        // PII: scanned and redacted once, here, off the enclave's handler thread; the
        // decision sees the redacted form and picks which form is forwarded.
        let args = match redact::call_arguments(params.arguments.map(RawValue::get)) {
            Ok(a) => a,
            Err(e) => return rpc_error(StatusCode::BAD_REQUEST, id, INVALID_PARAMS, &e),
        };
        let redacted = args.redacted.clone();
        let args = Arc::new(args);
        let mut attempt = 0;
        let verdict = loop {
            attempt += 1;
            let (live, checked_pin) = self
                .lock_tools()
                .get(&ctx.server)
                .map(|c| {
                    (
                        c.kept.get(&params.name).copied(),
                        c.pins.get(&params.name).copied(),
                    )
                })
                .unwrap_or_default();
            let principal = ctx.principal.clone();
            let sid = ctx.server.clone();
            let tool = params.name.clone();
            let args_inside = Arc::clone(&args);
            let rid = self.next_id();
            let trip = self
                .access
                .run(move |enclave, now| {
                    match decide_call_inside(
                        enclave,
                        now,
                        rid,
                        &sid,
                        &principal,
                        &tool,
                        live,
                        checked_pin,
                        &args_inside,
                    ) {
                        Ok((step, replies)) => (Ok(step), replies),
                        Err(e) => (Err(e), Vec::new()),
                    }
                })
                .await;
            let step = match trip {
                Err(HandlerGone) => return plain(StatusCode::SERVICE_UNAVAILABLE, "not ready"),
                Ok(Err(e)) => return refusal_reply(id, &e),
                Ok(Ok(step)) => step,
            };
            match step {
                CallStep::Verdict(v) => break v,
                // Stale twice: withheld (as before a fresh listing was possible).
                CallStep::Stale if attempt >= 2 => break CallVerdict::Withheld,
                CallStep::Stale => {
                    // List again (once), against the pins in force.
                    if let Err(r) = self.listing(&ctx, &endpoint, id).await {
                        return r;
                    }
                }
            }
        };
        let gated = Gated {
            action: Action::Call,
            method: "tools/call",
            item: &params.name,
        };
        self.forward_decided(
            &ctx,
            message,
            &endpoint,
            gated,
            params.arguments,
            redacted,
            Ok(Ok(verdict)),
        )
        .await
    }

    /// A `resources/read` or `prompts/get`: decided like a tool call (hard rules, then Cedar's
    /// `read_resource` on the URI or `get_prompt` on the name, a prompt's arguments in the
    /// context after the PII scan), its decision entry durable before it is forwarded with a
    /// receipt, its result entry durable before the answer reaches the agent. Resources and
    /// prompts are not pinned (the registration pins tools only), and rate limits and spend
    /// caps count tool calls only.
    async fn read_or_get(&self, ctx: &Ctx, message: &Message<'_>, action: Action) -> Reply {
        let id = message.id().map(RawValue::get);
        let parsed = match action {
            Action::ReadResource => message
                .resources_read_params()
                .map(|p| ("resources/read", p.uri, None)),
            _ => message
                .prompts_get_params()
                .map(|p| ("prompts/get", p.name, p.arguments)),
        };
        let (method, item, arguments) = match parsed {
            Ok(p) => p,
            Err(e) => return rpc_error(StatusCode::BAD_REQUEST, id, e.code(), &e.to_string()),
        };
        if let Some(r) = refuse_non_ijson(id, arguments) {
            return r;
        }
        let Some(endpoint) = ctx.endpoint.clone() else {
            return not_http();
        };
        let args = match redact::call_arguments(arguments.map(RawValue::get)) {
            Ok(a) => a,
            Err(e) => return rpc_error(StatusCode::BAD_REQUEST, id, INVALID_PARAMS, &e),
        };
        let redacted = args.redacted.clone();
        let principal = ctx.principal.clone();
        let server = ctx.server.clone();
        let target = item.clone();
        let rid = self.next_id();
        let verdict = self
            .access
            .run(move |enclave, now| {
                let gated = Gated {
                    action,
                    method,
                    item: &target,
                };
                match inside::decide_gated(
                    enclave, now, rid, &principal, &server, gated, [0; 32], &args,
                ) {
                    Ok((v, replies)) => (Ok(v), replies),
                    Err(e) => (Err(e), Vec::new()),
                }
            })
            .await;
        let gated = Gated {
            action,
            method,
            item: &item,
        };
        self.forward_decided(ctx, message, &endpoint, gated, arguments, redacted, verdict)
            .await
    }

    /// `resources/list`, `resources/templates/list` or `prompts/list`: the agent's request
    /// forwarded (one page at a time, its cursor as sent), and the page's items filtered for
    /// this agent: an item is shown iff `action` on it (by URI, URI template or name) is
    /// allowed in the listing context, as tools are. Nothing is logged (a listing decides
    /// nothing that reaches the server); the kept items and every other member pass byte for
    /// byte, and an error from the upstream is passed on.
    async fn gated_list(
        &self,
        ctx: &Ctx,
        message: &Message<'_>,
        kind: ListKind,
        action: Action,
    ) -> Reply {
        let id = message.id().map(RawValue::get);
        let method = message.method().unwrap_or_default().to_owned();
        let Some(endpoint) = ctx.endpoint.clone() else {
            return not_http();
        };
        let era = match self.upstreams.era(&endpoint).await {
            Ok(e) => e,
            Err(e) => return upstream_reply(id, &e),
        };
        let mut body = message.text().to_owned();
        if era == Era::Modern && era::body_version(message).is_none() {
            body = match modern_envelope(body) {
                Ok(b) => b,
                Err(_) => return bad_upstream(id),
            };
        }
        let answer = match self
            .upstreams
            .call(&endpoint, &method, None, &body, None, 0)
            .await
        {
            Ok(a) => a,
            Err(e) => return upstream_reply(id, &e),
        };
        let Ok(page) = parse_message(&answer.body) else {
            return bad_upstream(id);
        };
        if page.kind() == Kind::ErrorResponse {
            return match with_agent_id(page.text(), id) {
                Some(b) => json(StatusCode::OK, b),
                None => bad_upstream(id),
            };
        }
        let Ok(listed) = page.list_result(kind) else {
            return bad_upstream(id);
        };
        let names: Vec<Option<String>> = listed
            .items
            .iter()
            .map(|item| {
                attestplane_verifier::gateway::jsonrpc::object_members(item, "item")
                    .ok()
                    .and_then(|m| {
                        m.iter()
                            .find(|(k, _)| k == kind.key())
                            .and_then(|(_, v)| serde_json::from_str::<String>(v.get()).ok())
                    })
            })
            .collect();
        let principal = ctx.principal.clone();
        let server = ctx.server.clone();
        let shown = self
            .access
            .run(move |enclave, now| {
                let now = enclave.entry_time(now);
                (
                    inside::filter_items(enclave, now, &principal, &server, action, &names),
                    Vec::new(),
                )
            })
            .await;
        let shown = match shown {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return refusal_reply(id, &e),
            Err(_) => return plain(StatusCode::SERVICE_UNAVAILABLE, "not ready"),
        };
        let kept: Vec<&RawValue> = listed
            .items
            .iter()
            .zip(shown)
            .filter_map(|(item, show)| show.then_some(*item))
            .collect();
        let Ok(filtered) = page.with_result_items(kind, &kept) else {
            return bad_upstream(id);
        };
        let Some(body) = with_agent_id(&filtered, id) else {
            return bad_upstream(id);
        };
        match for_agent(ctx.era, body, true) {
            Ok(body) => json(StatusCode::OK, body),
            Err(_) => bad_upstream(id),
        }
    }

    /// Acts on a gated request's verdict (a tool call, a resource read, a prompt get): a
    /// refusal answered once its entry is durable; an allowed request forwarded once its
    /// decision entry is durable, with its receipt (and, under `redact`, its redacted
    /// arguments spliced in), and its answer treated, logged and answered by [`Self::finish`].
    #[allow(clippy::too_many_arguments)]
    async fn forward_decided(
        &self,
        ctx: &Ctx,
        message: &Message<'_>,
        endpoint: &Endpoint,
        gated: Gated<'_>,
        arguments: Option<&RawValue>,
        redacted: Option<String>,
        verdict: Result<Result<CallVerdict, Refusal>, HandlerGone>,
    ) -> Reply {
        let id = message.id().map(RawValue::get);
        let (seq, receipt, rule) = match verdict {
            Ok(Ok(CallVerdict::Allowed { seq, receipt, pii })) => (seq, receipt, pii),
            Ok(Ok(CallVerdict::Denied { seq, reason })) => {
                if self.access.durable(seq).await.is_err() {
                    return plain(StatusCode::SERVICE_UNAVAILABLE, "not ready");
                }
                return rpc_error(
                    StatusCode::OK,
                    id,
                    INVALID_PARAMS,
                    &format!("call refused (entry {seq}): {reason}"),
                );
            }
            Ok(Ok(CallVerdict::Withheld)) => {
                return rpc_error(
                    StatusCode::OK,
                    id,
                    INVALID_PARAMS,
                    &format!(
                        "tool {:?} is withheld: it is not pinned, or its definition has changed since it was pinned",
                        gated.item
                    ),
                );
            }
            Ok(Err(e)) => return refusal_reply(id, &e),
            Err(_) => return plain(StatusCode::SERVICE_UNAVAILABLE, "not ready"),
        };
        // The bytes to forward are made while the decision entry's fdatasync runs (making
        // them is not forwarding): the agent's message as it came, the receipt spliced into
        // `params._meta` and, under `redact`, the redacted arguments in place of the sent
        // ones. Nothing reaches the server before the entry is durable: where the host holds
        // the upstream connections the call is written at once under the entry's need and the
        // host delivers it after its `fdatasync` (no round trip through the enclave);
        // otherwise the gateway waits for `Durable` first. A call that relays server requests
        // to its agent waits either way ([`Self::relayed_call`]).
        let outgoing = outgoing_body(message, arguments, redacted, rule, &receipt);
        let need = if self.upstreams.holds() {
            seq.saturating_add(1)
        } else {
            if self.access.durable(seq).await.is_err() {
                return plain(StatusCode::SERVICE_UNAVAILABLE, "not ready");
            }
            0
        };
        let mut body = match outgoing {
            Ok(b) => b,
            Err(why) => {
                return self
                    .aborted(id, seq, rule, &UpstreamError::BadAnswer(why))
                    .await;
            }
        };
        // Toward the upstream's era: a modern upstream also gets the protocol version in
        // `params._meta` if the agent spoke legacy.
        let era = match self.upstreams.era(endpoint).await {
            Ok(e) => e,
            Err(e) => return self.aborted(id, seq, rule, &e).await,
        };
        if era == Era::Modern && era::body_version(message).is_none() {
            body = match modern_envelope(body) {
                Ok(b) => b,
                Err(_) => {
                    return self
                        .aborted(id, seq, rule, &UpstreamError::BadAnswer("modern envelope"))
                        .await;
                }
            };
        }
        if let Some(reply) = self
            .relayed_call(
                ctx,
                id,
                (seq, need),
                rule,
                endpoint,
                &gated,
                &body,
                &receipt,
                era,
            )
            .await
        {
            return reply;
        }
        let answer = match self
            .upstreams
            .call(
                endpoint,
                gated.method,
                Some(gated.item),
                &body,
                Some(&receipt),
                need,
            )
            .await
        {
            Ok(a) => a,
            Err(e) => return self.aborted(id, seq, rule, &e).await,
        };
        self.finish(id, seq, rule, ctx, answer).await
    }

    /// The kinds of server-to-client request `server`'s registration allows (none for a server
    /// no longer registered).
    async fn client_requests(
        &self,
        server: String,
    ) -> Result<std::collections::BTreeSet<ClientRequest>, HandlerGone> {
        self.access
            .run(move |enclave, _| {
                let allowed = enclave
                    .state()
                    .server(&server)
                    .map(|s| s.spec.client_requests.clone())
                    .unwrap_or_default();
                (allowed, Vec::new())
            })
            .await
    }

    /// A legacy agent's call forwarded to a legacy server whose registration allows
    /// server-to-client requests: run by a task of its own that relays the server's requests
    /// of an allowed kind to the agent on the call's SSE stream ([`super::relay`]) and ends it
    /// with the call's answer. `None` when the call cannot relay (another era on either side,
    /// no session, nothing allowed): it is forwarded as any other.
    #[allow(clippy::too_many_arguments)]
    async fn relayed_call(
        &self,
        ctx: &Ctx,
        id: Option<&str>,
        (seq, need): (u64, u64),
        rule: PiiAction,
        endpoint: &Endpoint,
        gated: &Gated<'_>,
        body: &str,
        receipt: &str,
        upstream_era: Era,
    ) -> Option<Reply> {
        if ctx.era != Era::Legacy || upstream_era != Era::Legacy {
            return None;
        }
        let session = ctx.session.clone()?;
        let me = self.me.get().and_then(std::sync::Weak::upgrade)?;
        let allowed = self.client_requests(ctx.server.clone()).await.ok()?;
        if allowed.is_empty() {
            return None;
        }
        // A relayed call goes out through exchanges of its own (requests, answers to the
        // server's requests) that are not held: the decision entry is durable first.
        if need > 0 && self.access.durable(seq).await.is_err() {
            return Some(plain(StatusCode::SERVICE_UNAVAILABLE, "not ready"));
        }
        let (head, headed) = tokio::sync::oneshot::channel();
        let mut relay = CallRelay::new(
            self.relays.clone(),
            self.access.clone(),
            owner(ctx),
            session.clone(),
            allowed,
            rule,
            id.map(str::to_owned),
            head,
        );
        // The relayed call's final answer is written by a task of its own, after the relayed
        // requests on the same stream: it waits for `Durable` rather than hold the stream.
        let ctx = Ctx {
            server: ctx.server.clone(),
            principal: ctx.principal.clone(),
            era: ctx.era,
            endpoint: ctx.endpoint.clone(),
            session: Some(session),
            held: None,
        };
        let (endpoint, method, item) = (
            endpoint.clone(),
            gated.method.to_owned(),
            gated.item.to_owned(),
        );
        let (id, body, receipt) = (id.map(str::to_owned), body.to_owned(), receipt.to_owned());
        tokio::spawn(async move {
            let paused = relay.paused();
            let answer = me
                .upstreams
                .call_answering(
                    &endpoint,
                    &method,
                    Some(&item),
                    &body,
                    Some(&receipt),
                    &mut relay,
                    &paused,
                )
                .await;
            let reply = match answer {
                Ok(a) => me.finish(id.as_deref(), seq, rule, &ctx, a).await,
                Err(e) => me.aborted(id.as_deref(), seq, rule, &e).await,
            };
            relay.conclude(reply).await;
        });
        Some(
            headed
                .await
                .unwrap_or_else(|_| plain(StatusCode::SERVICE_UNAVAILABLE, "not ready")),
        )
    }

    /// A legacy agent's response to a server's request the gateway relayed to it: taken only
    /// from the agent and the session it was relayed to, while its call waits (`202`);
    /// anything else is refused (`400`, naming no more than that) and changes nothing.
    fn agent_response(
        &self,
        server: &str,
        id: Option<&str>,
        principal: &PrincipalRecord,
        headers: &McpHeaders,
        message: &Message<'_>,
    ) -> Reply {
        let owner = SessionOwner {
            server: server.to_owned(),
            agent: principal.agent.clone(),
            issuer: principal.issuer.clone(),
        };
        let Some(session) = headers.session.as_deref() else {
            return rpc_error(StatusCode::BAD_REQUEST, id, INVALID_REQUEST, "no session");
        };
        if let Err(e) = self.lock_sessions().touch(session, &owner, Instant::now()) {
            return rpc_error(StatusCode::NOT_FOUND, id, INVALID_REQUEST, &e.to_string());
        }
        let delivered = match message.id() {
            Some(rid) => self.relays.deliver(
                &owner,
                session,
                rid,
                message.text().to_owned(),
                Instant::now(),
            ),
            None => Err(super::relay::RelayError::Unknown),
        };
        match delivered {
            Ok(()) => accepted(),
            Err(e) => rpc_error(StatusCode::BAD_REQUEST, id, INVALID_REQUEST, &e.to_string()),
        }
    }

    /// Treats the answer by the call's PII rule, shapes it for the agent's era, logs its
    /// result entry, waits for it to be durable, and answers the agent.
    async fn finish(
        &self,
        id: Option<&str>,
        seq: u64,
        rule: PiiAction,
        ctx: &Ctx,
        answer: Answer,
    ) -> Reply {
        let agent_era = ctx.era;
        let (body, pii, withheld) = match redact::treat_answer(&answer.body, rule) {
            Ok(Treated::Forward(body, pii)) => (body, pii, false),
            Ok(Treated::Withheld(pii)) => {
                let agent_id = id.and_then(|i| RawValue::from_string(i.to_owned()).ok());
                let text = error_response(
                    agent_id.as_deref(),
                    INVALID_PARAMS,
                    &format!(
                        "the result of call {seq} is withheld: it carries PII and the policy's rule refuses it"
                    ),
                );
                (text.into_bytes(), pii, true)
            }
            Err(e) => {
                let why = match e {
                    redact::TreatError::NotAResponse => {
                        UpstreamError::BadAnswer("not a json-rpc response")
                    }
                    redact::TreatError::Scan(limit) => UpstreamError::Unscannable(limit),
                };
                return self.aborted(id, seq, rule, &why).await;
            }
        };
        let body = match String::from_utf8(body)
            .map_err(|_| ())
            .and_then(|b| for_agent(agent_era, b, false).map_err(|_| ()))
        {
            Ok(b) => b,
            Err(()) => {
                return self
                    .aborted(
                        id,
                        seq,
                        rule,
                        &UpstreamError::BadAnswer("not a json-rpc response"),
                    )
                    .await;
            }
        };
        // A modern upstream's `input_required` result asks the agent for server-to-client
        // requests (sampling, elicitation, roots), which the agent fulfils and answers by
        // retrying its request (a new decision). It reaches the agent only if the server's
        // registration allows every kind it asks for, and only an agent of the modern era can
        // answer it; otherwise the agent gets an error and the result entry says `error`.
        let body = match input_required_methods(&body) {
            Some(methods) if !withheld => {
                let allowed = self
                    .client_requests(ctx.server.clone())
                    .await
                    .unwrap_or_default();
                match refused_input_request(&methods, &allowed, agent_era) {
                    None => body,
                    Some(why) => {
                        let agent_id = id.and_then(|i| RawValue::from_string(i.to_owned()).ok());
                        error_response(agent_id.as_deref(), INVALID_REQUEST, &why)
                    }
                }
            }
            _ => body,
        };
        let outcome = match parse_message(body.as_bytes()) {
            _ if withheld => "withheld",
            Ok(m) if m.kind() == Kind::Response => {
                if m.result().is_some_and(is_error_result) {
                    "error"
                } else {
                    "ok"
                }
            }
            Ok(m) if m.kind() == Kind::ErrorResponse => "error",
            _ => {
                return self
                    .aborted(
                        id,
                        seq,
                        rule,
                        &UpstreamError::BadAnswer("not a json-rpc response"),
                    )
                    .await;
            }
        };
        let hash: [u8; 32] = Sha256::digest(body.as_bytes()).into();
        let rid = self.next_id();
        let written = self
            .access
            .run(move |enclave, now| {
                match inside::record_result(enclave, now, rid, seq, outcome, hash, pii) {
                    Ok((s, replies)) => (Ok(s), replies),
                    Err(e) => (Err(e), Vec::new()),
                }
            })
            .await;
        match written {
            Ok(Ok(result_seq)) => {
                // Held by the host until the result entry is durable, or waited for here.
                match &ctx.held {
                    Some(gate) => gate.require(result_seq.saturating_add(1)),
                    None => {
                        if self.access.durable(result_seq).await.is_err() {
                            return plain(StatusCode::SERVICE_UNAVAILABLE, "not ready");
                        }
                    }
                }
                json(StatusCode::OK, body)
            }
            Ok(Err(e)) => {
                // The writer refused the result entry (nothing of it was written): the call
                // still ends with an `aborted` entry if one can be written, and the agent gets
                // a typed error at once, never the answer.
                self.record_aborted(seq, rule).await;
                refusal_reply(id, &e)
            }
            Err(_) => plain(StatusCode::SERVICE_UNAVAILABLE, "not ready"),
        }
    }

    /// Logs an `aborted` result for call `seq` and tells the agent the upstream failed.
    async fn aborted(
        &self,
        id: Option<&str>,
        seq: u64,
        rule: PiiAction,
        e: &UpstreamError,
    ) -> Reply {
        self.record_aborted(seq, rule).await;
        upstream_reply(id, e)
    }

    /// Writes an `aborted` result entry for call `seq` and waits for it to be durable (best
    /// effort: the agent's error does not wait on a log that cannot be written).
    async fn record_aborted(&self, seq: u64, rule: PiiAction) {
        let rid = self.next_id();
        let pii = PiiRecord {
            action: rule.as_str().to_owned(),
            counts: Default::default(),
        };
        let written = self
            .access
            .run(move |enclave, now| {
                match inside::record_result(enclave, now, rid, seq, "aborted", [0; 32], pii) {
                    Ok((s, replies)) => (Ok(s), replies),
                    Err(e) => (Err(e), Vec::new()),
                }
            })
            .await;
        if let Ok(Ok(s)) = written {
            let _ = self.access.durable(s).await;
        }
    }
}

/// On the handler thread: where `server` is registered (unknown: 404), then the agent whose
/// `bearer` token is valid for `audience` (otherwise 401).
fn authenticate_inside(
    enclave: &mut crate::service::Enclave,
    server: &str,
    bearer: &str,
    audience: &str,
    now: attestplane_verifier::UnixMillis,
) -> Result<(PrincipalRecord, Option<Endpoint>), Refusal> {
    let (endpoint, resource) = inside::endpoint_url(enclave, server)?;
    let principal = inside::authenticate(enclave, bearer, audience, now)?;
    Ok((
        principal,
        Endpoint::of_registration(server, &endpoint, &resource),
    ))
}

/// With the enclave, one `tools/call` of an authenticated agent: checks that the tool's pin
/// is still the one its listing was checked against (`checked_pin`), and decides (writing the
/// decision entry). Returns the step taken and the `Persist` of what it wrote.
#[allow(clippy::too_many_arguments)]
fn decide_call_inside(
    enclave: &mut crate::service::Enclave,
    now: attestplane_verifier::UnixMillis,
    rid: u64,
    server: &str,
    principal: &PrincipalRecord,
    tool: &str,
    live: Option<Digest32>,
    checked_pin: Option<Digest32>,
    args: &inside::CallArguments,
) -> Result<(CallStep, inside::Replies), Refusal> {
    // The listing was checked against the pins of its time: if the tool's pin changed since
    // (a re-pin), the check is stale and nothing is decided.
    let pinned = enclave
        .state()
        .server(server)
        .and_then(|s| s.spec.tools.get(tool).copied());
    if pinned != checked_pin {
        return Ok((CallStep::Stale, Vec::new()));
    }
    let (verdict, replies) =
        inside::decide_call(enclave, now, rid, principal, server, tool, live, args)?;
    Ok((CallStep::Verdict(verdict), replies))
}

/// The largest body of an unauthenticated POST read to find the request's id for its 401:
/// a larger one is not read at all.
pub const ID_READ_LIMIT: usize = 16 * 1024;

/// The JSON-RPC id of a refused caller's request body, read only if its declared length
/// (`Content-Length`) is at most [`ID_READ_LIMIT`] bytes, and only skimmed for the id
/// ([`era::readable_id`]). A larger body, or one of unknown length, is not read at all.
async fn small_body_id(body: Incoming) -> Option<String> {
    use hyper::body::Body as _;
    let declared = body.size_hint().exact()?;
    if declared > ID_READ_LIMIT as u64 {
        return None;
    }
    let bytes = Limited::new(body, ID_READ_LIMIT)
        .collect()
        .await
        .ok()?
        .to_bytes();
    era::readable_id(&bytes)
}

/// The answer when a server's registered endpoint is not one the gateway can reach.
fn not_http() -> Reply {
    plain(
        StatusCode::BAD_GATEWAY,
        "the registered endpoint is not an http:// URL",
    )
}

/// The methods an `input_required` result (the modern era's server-to-client requests) asks
/// for, one per input request (`None` where a request names none readably); `None` when
/// `body` is not such a result.
fn input_required_methods(body: &str) -> Option<Vec<Option<String>>> {
    use attestplane_verifier::gateway::jsonrpc::object_members;
    let m = parse_message(body.as_bytes()).ok()?;
    let members = object_members(m.result()?, "result").ok()?;
    let (_, kind) = members.iter().find(|(k, _)| k == "resultType")?;
    if kind.get() != "\"input_required\"" {
        return None;
    }
    let Some(requests) = members
        .iter()
        .find(|(k, _)| k == "inputRequests")
        .and_then(|(_, v)| object_members(v, "result.inputRequests").ok())
    else {
        // Input required, but what is asked cannot be read: refused.
        return Some(vec![None]);
    };
    Some(
        requests
            .iter()
            .map(|(_, request)| {
                object_members(request, "result.inputRequests")
                    .ok()?
                    .iter()
                    .find(|(k, _)| k == "method")
                    .and_then(|(_, v)| serde_json::from_str::<String>(v.get()).ok())
            })
            .collect(),
    )
}

/// Why server-to-client requests asking for `methods` may not reach an agent of `era` when
/// the server's registration allows `allowed`; `None` when they may. Deny by default: an
/// unknown method, an unreadable request, an empty set of requests or a legacy agent (which
/// cannot answer a request inside a result) refuse.
fn refused_input_request(
    methods: &[Option<String>],
    allowed: &std::collections::BTreeSet<ClientRequest>,
    era: Era,
) -> Option<String> {
    if era != Era::Modern {
        return Some(
            "the server asked for input (server-to-client requests) that a 2025-11-25 agent cannot answer through the control plane".into(),
        );
    }
    if methods.is_empty() {
        return Some("the server asked for input without naming any request".into());
    }
    for method in methods {
        let kind = match method.as_deref() {
            Some("sampling/createMessage") => Some(ClientRequest::Sampling),
            Some("elicitation/create") => Some(ClientRequest::Elicitation),
            Some("roots/list") => Some(ClientRequest::Roots),
            _ => None,
        };
        match kind {
            Some(k) if allowed.contains(&k) => {}
            Some(k) => {
                return Some(format!(
                    "the server asked the agent for {} ({}), which its registration does not allow",
                    k.as_str(),
                    method.as_deref().unwrap_or_default()
                ));
            }
            None => {
                return Some(format!(
                    "the server asked the agent for {:?}, which is not a server-to-client request the control plane relays",
                    method.as_deref().unwrap_or("an unreadable request")
                ));
            }
        }
    }
    None
}

/// The body an allowed request is forwarded with: `message` as the agent sent it, with
/// `receipt` spliced into `params._meta` and, under `redact`, the `redacted` arguments in
/// place of the sent `arguments` (spliced: the rest byte for byte). Why not, if it cannot be
/// made.
fn outgoing_body(
    message: &Message<'_>,
    arguments: Option<&RawValue>,
    redacted: Option<String>,
    rule: PiiAction,
    receipt: &str,
) -> Result<String, &'static str> {
    let quoted = RawValue::from_string(format!("\"{receipt}\"")).map_err(|_| "receipt")?;
    let redacted_text = match (rule, arguments, redacted) {
        (PiiAction::Redact, Some(raw), Some(r)) if r != raw.get() => {
            Some(message.with_replaced(raw, &r).map_err(|_| "redaction")?)
        }
        _ => None,
    };
    match redacted_text {
        Some(text) => parse_message(text.as_bytes())
            .map_err(|_| "redaction")?
            .with_params_meta(RECEIPT_META_KEY, &quoted)
            .map_err(|_| "receipt"),
        None => message
            .with_params_meta(RECEIPT_META_KEY, &quoted)
            .map_err(|_| "receipt"),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Whether a tool result says `"isError": true` (its top-level member only).
/// Reads the result's top-level members as raw values (the envelope parser's view), without
/// building a tree of the whole answer.
fn is_error_result(result: &RawValue) -> bool {
    attestplane_verifier::gateway::jsonrpc::object_members(result, "result")
        .ok()
        .and_then(|m| {
            m.iter()
                .find(|(k, _)| k == "isError")
                .map(|(_, v)| v.get() == "true")
        })
        .unwrap_or(false)
}

/// `body` (a JSON-RPC response) with its id replaced by `id` (the agent's).
fn with_agent_id(body: &str, id: Option<&str>) -> Option<String> {
    let m = parse_message(body.as_bytes()).ok()?;
    let old = m.id()?;
    m.with_replaced(old, id.unwrap_or("null")).ok()
}

/// `body` (a request from a legacy-era agent) with the modern era's request envelope in
/// `params._meta` for a modern upstream: the protocol version, and the client's info and
/// capabilities, which a modern server requires on every request (the PyPI `mcp` 2.x server
/// refuses a request without them). The agent's handshake ended at the gateway, so the
/// envelope is the gateway's own; members the agent already sent are kept.
fn modern_envelope(mut body: String) -> Result<String, JsonRpcError> {
    let meta = modern_meta();
    let Some(members) = meta.as_object() else {
        return Ok(body);
    };
    for (key, value) in members {
        let message = parse_message(body.as_bytes())?;
        if era::meta_member(&message, key).is_some() {
            continue;
        }
        let Ok(raw) = RawValue::from_string(value.to_string()) else {
            continue;
        };
        body = message.with_params_meta(key, &raw)?;
    }
    Ok(body)
}

/// A response shaped for an agent of era `era`. A modern agent's SDK requires members a legacy
/// upstream does not send: every result's `resultType` (`complete`), and on `tools/list` the
/// cache hints `ttlMs` and `cacheScope`. A listing (`listing`) is filtered per agent, so its
/// `cacheScope` is always `private` (a `public` listing from the upstream could otherwise be
/// served from a shared cache to an agent the policy shows less); a missing `ttlMs` is `0`.
/// Error responses and legacy agents' answers pass unchanged; other members byte for byte.
fn for_agent(era: Era, mut body: String, listing: bool) -> Result<String, JsonRpcError> {
    if era != Era::Modern {
        return Ok(body);
    }
    let mut wanted: Vec<(&str, &str, bool)> = vec![("resultType", "\"complete\"", false)];
    if listing {
        wanted.push(("ttlMs", "0", false));
        wanted.push(("cacheScope", "\"private\"", true));
    }
    for (key, value, replace) in wanted {
        let message = parse_message(body.as_bytes())?;
        let Some(result) = message.result() else {
            return Ok(body);
        };
        let members = attestplane_verifier::gateway::jsonrpc::object_members(result, "result")?;
        match members.iter().find(|(k, _)| k == key) {
            Some((_, old)) if replace && old.get() != value => {
                body = message.with_replaced(old, value)?;
            }
            Some(_) => {}
            None => {
                let span = message.span_of(result).ok_or(JsonRpcError::Invalid {
                    field: "result",
                    reason: "not part of this message",
                })?;
                let close = span.end.saturating_sub(1);
                let mut member = String::new();
                if !members.is_empty() {
                    member.push(',');
                }
                member.push('"');
                member.push_str(key);
                member.push_str("\":");
                member.push_str(value);
                let (head, tail) = (body.get(..close), body.get(close..));
                let (Some(head), Some(tail)) = (head, tail) else {
                    return Err(JsonRpcError::Invalid {
                        field: "result",
                        reason: "not part of this message",
                    });
                };
                body = format!("{head}{member}{tail}");
            }
        }
    }
    Ok(body)
}

fn modern_meta() -> serde_json::Value {
    serde_json::json!({
        era::META_PROTOCOL_VERSION: MODERN_VERSION,
        "io.modelcontextprotocol/clientInfo": {"name": "attestplane-gateway", "version": env!("CARGO_PKG_VERSION")},
        "io.modelcontextprotocol/clientCapabilities": {},
    })
}

fn owner(ctx: &Ctx) -> SessionOwner {
    SessionOwner {
        server: ctx.server.clone(),
        agent: ctx.principal.agent.clone(),
        issuer: ctx.principal.issuer.clone(),
    }
}

/// The answer to `server/discover`. `ttlMs` and `cacheScope` are required members of a
/// cacheable result (rmcp refuses a discover result without them).
fn discover(id: Option<&str>) -> Reply {
    json(
        StatusCode::OK,
        format!(
            r#"{{"jsonrpc":"2.0","id":{},"result":{{"resultType":"complete","supportedVersions":["{MODERN_VERSION}"],"capabilities":{{"tools":{{}},"resources":{{}},"prompts":{{}}}},"ttlMs":0,"cacheScope":"private","_meta":{{"io.modelcontextprotocol/serverInfo":{{"name":"attestplane-gateway","version":"{}"}}}}}}}}"#,
            id.unwrap_or("null"),
            env!("CARGO_PKG_VERSION")
        ),
    )
}

/// Server ids as the registry allows them in a path: no separators or escapes.
fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 256
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(hyper::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty())
        .then(|| token.trim().to_owned())
}

fn mcp_headers(h: &HeaderMap) -> McpHeaders {
    let get = |name: &str| {
        h.get(name)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.trim().to_owned())
    };
    McpHeaders {
        protocol_version: get("mcp-protocol-version"),
        method: get("mcp-method"),
        name: get("mcp-name"),
        session: get("mcp-session-id"),
    }
}

fn json(status: StatusCode, body: String) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(body)).into());
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn plain(status: StatusCode, text: &'static str) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())).into());
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn with_allow(mut r: Reply) -> Reply {
    r.headers_mut().insert(
        hyper::header::ALLOW,
        HeaderValue::from_static("POST, DELETE"),
    );
    r
}

fn accepted() -> Reply {
    let mut r = Response::new(Full::new(Bytes::new()).into());
    *r.status_mut() = StatusCode::ACCEPTED;
    r
}

/// Refuses arguments that are not I-JSON (RFC 7493) as invalid params, before anything is
/// decided or logged: the one check `tools/call` and `prompts/get` share.
fn refuse_non_ijson(id: Option<&str>, arguments: Option<&RawValue>) -> Option<Reply> {
    let e = parse_ijson(arguments?.get()).err()?;
    Some(rpc_error(
        StatusCode::BAD_REQUEST,
        id,
        INVALID_PARAMS,
        &format!("arguments are not I-JSON: {e}"),
    ))
}

fn rpc_error(status: StatusCode, id: Option<&str>, code: i64, message: &str) -> Reply {
    let id = id.and_then(|i| RawValue::from_string(i.to_owned()).ok());
    json(status, error_response(id.as_deref(), code, message))
}

fn refusal_reply(id: Option<&str>, e: &Refusal) -> Reply {
    let status = match e {
        Refusal::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
        Refusal::UnknownServer(_) => StatusCode::NOT_FOUND,
        Refusal::NotReady => StatusCode::SERVICE_UNAVAILABLE,
        Refusal::Log(_) => StatusCode::INTERNAL_SERVER_ERROR,
        Refusal::BadArguments(_) => {
            return rpc_error(StatusCode::BAD_REQUEST, id, INVALID_PARAMS, &e.to_string());
        }
    };
    rpc_error(status, id, INTERNAL_ERROR, &e.to_string())
}

fn upstream_reply(id: Option<&str>, e: &UpstreamError) -> Reply {
    let status = match e {
        UpstreamError::Timeout => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::BAD_GATEWAY,
    };
    rpc_error(status, id, INTERNAL_ERROR, &format!("upstream: {e}"))
}

fn bad_upstream(id: Option<&str>) -> Reply {
    upstream_reply(id, &UpstreamError::BadAnswer("not a tools/list result"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_owned()).unwrap()
    }

    #[test]
    fn legacy_call_gets_the_modern_envelope_for_a_modern_upstream() {
        let legacy = r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"add","arguments":{"a":1e3},"_meta":{"progressToken":1,"io.modelcontextprotocol/clientCapabilities":{"x":1}}}}"#;
        let out = modern_envelope(legacy.to_owned()).unwrap();
        let m = parse_message(out.as_bytes()).unwrap();
        assert_eq!(era::body_version(&m).as_deref(), Some(MODERN_VERSION));
        assert!(era::meta_member(&m, "io.modelcontextprotocol/clientInfo").is_some());
        // What the agent sent is kept, byte for byte.
        assert_eq!(
            era::meta_member(&m, "io.modelcontextprotocol/clientCapabilities").map(RawValue::get),
            Some(r#"{"x":1}"#)
        );
        assert!(out.contains(r#""arguments":{"a":1e3}"#), "{out}");
        assert!(out.contains(r#""progressToken":1"#), "{out}");
        // No params at all.
        let bare = r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#;
        let out = modern_envelope(bare.to_owned()).unwrap();
        let m = parse_message(out.as_bytes()).unwrap();
        assert_eq!(era::body_version(&m).as_deref(), Some(MODERN_VERSION));
    }

    #[test]
    fn modern_agents_get_the_members_their_sdk_requires() {
        let call = r#"{"jsonrpc":"2.0","id":1,"result":{"content":[],"x":1e3}}"#;
        let out = for_agent(Era::Modern, call.into(), false).unwrap();
        assert_eq!(
            out,
            r#"{"jsonrpc":"2.0","id":1,"result":{"content":[],"x":1e3,"resultType":"complete"}}"#
        );
        assert_eq!(for_agent(Era::Legacy, call.into(), false).unwrap(), call);
        let empty = r#"{"jsonrpc":"2.0","id":1,"result":{}}"#;
        assert_eq!(
            for_agent(Era::Modern, empty.into(), false).unwrap(),
            r#"{"jsonrpc":"2.0","id":1,"result":{"resultType":"complete"}}"#
        );
        let error = r#"{"jsonrpc":"2.0","id":1,"error":{"code":-1,"message":"m"}}"#;
        assert_eq!(for_agent(Era::Modern, error.into(), false).unwrap(), error);
    }

    #[test]
    fn a_filtered_listing_is_never_publicly_cacheable() {
        let list = r#"{"jsonrpc":"2.0","id":1,"result":{"tools":[],"resultType":"complete","ttlMs":60000,"cacheScope":"public"}}"#;
        let out = for_agent(Era::Modern, list.into(), true).unwrap();
        assert_eq!(
            out,
            r#"{"jsonrpc":"2.0","id":1,"result":{"tools":[],"resultType":"complete","ttlMs":60000,"cacheScope":"private"}}"#
        );
        let legacy = r#"{"jsonrpc":"2.0","id":1,"result":{"tools":[]}}"#;
        let out = for_agent(Era::Modern, legacy.into(), true).unwrap();
        assert_eq!(
            out,
            r#"{"jsonrpc":"2.0","id":1,"result":{"tools":[],"resultType":"complete","ttlMs":0,"cacheScope":"private"}}"#
        );
    }

    #[test]
    fn input_requests_reach_the_agent_only_when_the_registration_allows_every_kind() {
        let body = |requests: &str| {
            format!(
                r#"{{"jsonrpc":"2.0","id":1,"result":{{"resultType":"input_required","inputRequests":{requests},"requestState":"s"}}}}"#
            )
        };
        let sampling = body(r#"{"a":{"method":"sampling/createMessage","params":{}}}"#);
        let both = body(
            r#"{"a":{"method":"sampling/createMessage","params":{}},"b":{"method":"roots/list"}}"#,
        );
        let odd = body(r#"{"a":{"method":"ping"}}"#);
        let complete =
            r#"{"jsonrpc":"2.0","id":1,"result":{"resultType":"complete","content":[]}}"#;
        assert_eq!(input_required_methods(complete), None);
        let allowed: std::collections::BTreeSet<ClientRequest> = [ClientRequest::Sampling].into();
        let none = std::collections::BTreeSet::new();
        let m = input_required_methods(&sampling).unwrap();
        assert_eq!(refused_input_request(&m, &allowed, Era::Modern), None);
        // Refused by default, for an unregistered kind, for a method that is no such request,
        // for an unreadable or empty request set, and toward a legacy agent.
        assert!(refused_input_request(&m, &none, Era::Modern).is_some());
        assert!(refused_input_request(&m, &allowed, Era::Legacy).is_some());
        let m = input_required_methods(&both).unwrap();
        assert!(
            refused_input_request(&m, &allowed, Era::Modern)
                .unwrap()
                .contains("roots")
        );
        let m = input_required_methods(&odd).unwrap();
        assert!(refused_input_request(&m, &allowed, Era::Modern).is_some());
        let m = input_required_methods(&body("[]")).unwrap();
        assert!(refused_input_request(&m, &allowed, Era::Modern).is_some());
        let m = input_required_methods(&body("{}")).unwrap();
        assert!(refused_input_request(&m, &allowed, Era::Modern).is_some());
    }

    #[test]
    fn is_error_reads_the_top_level_member_only() {
        assert!(is_error_result(&raw(r#"{"content":[],"isError":true}"#)));
        assert!(!is_error_result(&raw(r#"{"content":[],"isError":false}"#)));
        assert!(!is_error_result(&raw(r#"{"content":[{"isError":true}]}"#)));
        assert!(!is_error_result(&raw(r#"[1]"#)));
    }
}
