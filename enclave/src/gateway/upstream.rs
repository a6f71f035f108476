//! The gateway's HTTP client toward MCP servers.
//!
//! Connections come from a [`Connect`]: in production the host's dialer, which opens the TCP
//! connection to the registered endpoint and relays bytes (the enclave names the server id;
//! the host may refuse, and later cannot read what TLS protects). Connections are kept alive
//! and reused per server.
//!
//! Each upstream speaks one era, found once by probing (`server/discover` first; on anything
//! but a modern answer, `initialize` + `notifications/initialized`), remembered, and logged by
//! the caller. A legacy upstream's session id is the gateway's, never the agent's; a 404 on it
//! (the server forgot the session) re-initializes once.
//!
//! Answers are read bounded ([`super::MAX_RESPONSE_BODY`]): plain JSON, or an SSE stream read
//! event by event until the JSON-RPC response in it (notifications before it are counted and
//! dropped, at most [`MAX_SSE_EVENTS`]; the read stops at the response, so a server that holds
//! the stream open after answering does not hold the call).
//!
//! A legacy (`2025-11-25`) server asks its client for sampling, elicitation or roots with a
//! JSON-RPC request on the stream of the answer it is working on, and waits for the client to
//! POST the response to its session. What answers it is the call's [`ServerRequests`]: by
//! default [`RefuseAll`] (a JSON-RPC error `-32601` naming the method at once; a `ping` gets
//! its empty result), so the server's tool sees the refusal and finishes and the call ends with
//! the server's own answer; for a legacy agent whose server's registration allows the kind, the
//! gateway's relay ([`super::relay`]) asks the agent. The answer is POSTed to the server's
//! session. At most [`MAX_SERVER_REQUESTS`] are answered per call; more end the call as a bad
//! answer. The time the call waits on an agent's answer ([`Paused`]) does not count against the
//! upstream's timeout (the agent's answer has a limit of its own). A modern (`2026-07-28`)
//! server asks inside a result (`input_required`); a request on its answer's stream is not of
//! that era and ends the call as a bad answer (nothing of it reaches the agent).
//!
//! [`Upstreams::listen_tools_changed`] holds a stream of its own open to an upstream and
//! reports its `notifications/tools/list_changed`, one bounded event at a time.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use attestplane_proto::Gate;
use attestplane_verifier::gateway::jsonrpc::{
    Kind, METHOD_NOT_FOUND, error_response, parse_message,
};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Body as _;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use super::MAX_RESPONSE_BODY;
use super::era::{Era, LEGACY_VERSION, META_PROTOCOL_VERSION, MODERN_VERSION};

/// A byte stream to an upstream: where TLS will wrap it.
pub trait UpstreamIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> UpstreamIo for T {}

/// A boxed upstream stream.
pub type BoxedIo = Box<dyn UpstreamIo>;

/// A new upstream connection: its stream and, when a host holds what is written to it until
/// log entries are durable ([`attestplane_proto::release`]), its gate. With no gate, the
/// gateway waits for the entries itself before writing what depends on them.
pub struct Dialed {
    /// The connection.
    pub io: BoxedIo,
    /// Raised to hold what is written next until that many entries are durable.
    pub gate: Option<Gate>,
}

impl std::fmt::Debug for Dialed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dialed")
            .field("held", &self.gate.is_some())
            .finish_non_exhaustive()
    }
}

/// The future a [`Connect`] returns.
pub type ConnectFuture = Pin<Box<dyn Future<Output = io::Result<Dialed>> + Send>>;

/// Opens byte streams to registered servers, by server id.
pub trait Connect: Send + Sync + 'static {
    /// A new connection to server `server_id`'s registered endpoint.
    fn connect(&self, server_id: &str) -> ConnectFuture;

    /// Whether every connection this opens is held by a host ([`Dialed::gate`] is set), so
    /// the gateway may write a call before its decision entry is durable and let the host
    /// hold it. `false` by default: the gateway then waits for `Durable` first.
    fn holds(&self) -> bool {
        false
    }
}

/// The most SSE events read before the response.
pub const MAX_SSE_EVENTS: usize = 1024;

/// The most server-to-client requests a legacy server may send on one answer's stream (each
/// is answered with a POST of its own); one more ends the call as a bad answer.
pub const MAX_SERVER_REQUESTS: usize = 16;

/// Answers the server-to-client requests a legacy server sends on one call's stream.
pub trait ServerRequests: Send {
    /// The JSON-RPC response to POST to the server's session for `request` (its text, as the
    /// server sent it, a JSON-RPC request): its id must be the server's.
    fn answer<'a>(
        &'a mut self,
        request: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<String, UpstreamError>> + Send + 'a>>;
}

/// Answers every server-to-client request at once, relaying none: `ping` with its empty
/// result, anything else with a JSON-RPC error `-32601` naming the method.
#[derive(Clone, Copy, Debug, Default)]
pub struct RefuseAll;

impl ServerRequests for RefuseAll {
    fn answer<'a>(
        &'a mut self,
        request: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<String, UpstreamError>> + Send + 'a>> {
        Box::pin(async move { refusal(request) })
    }
}

/// The answer [`RefuseAll`] gives `request`.
pub fn refusal(request: &str) -> Result<String, UpstreamError> {
    let m = parse_message(request.as_bytes())
        .map_err(|_| UpstreamError::BadAnswer("an sse event is not json-rpc"))?;
    let method = m.method().unwrap_or_default();
    Ok(if method == "ping" {
        format!(
            r#"{{"jsonrpc":"2.0","id":{},"result":{{}}}}"#,
            m.id().map_or("null", |i| i.get())
        )
    } else {
        error_response(
            m.id(),
            METHOD_NOT_FOUND,
            &format!(
                "the control plane does not relay this {LEGACY_VERSION} server's request to the agent ({}): refused",
                truncated(method, 64)
            ),
        )
    })
}

/// How long a call has waited on its agent (an agent answering a relayed server-to-client
/// request): time the upstream's timeout does not count.
#[derive(Debug, Default)]
pub struct Paused(Mutex<(Duration, Option<std::time::Instant>)>);

impl Paused {
    fn lock(&self) -> std::sync::MutexGuard<'_, (Duration, Option<std::time::Instant>)> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The call starts waiting on its agent.
    pub fn begin(&self) {
        let mut p = self.lock();
        if p.1.is_none() {
            p.1 = Some(std::time::Instant::now());
        }
    }

    /// The wait is over.
    pub fn end(&self) {
        let mut p = self.lock();
        if let Some(since) = p.1.take() {
            p.0 = p.0.saturating_add(since.elapsed());
        }
    }

    /// The time waited so far (a wait in progress included), and whether one is.
    fn waited(&self) -> (Duration, bool) {
        let p = self.lock();
        match p.1 {
            Some(since) => (p.0.saturating_add(since.elapsed()), true),
            None => (p.0, false),
        }
    }
}

/// The largest answer read to a POST of a response (a server acknowledges one with `202` and
/// no body).
const MAX_ACK_BODY: usize = 64 * 1024;

/// Why an upstream call failed: every variant ends the call with an `aborted` entry.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpstreamError {
    /// No connection could be opened.
    #[error("cannot connect to the server: {0}")]
    Connect(io::Error),
    /// HTTP failed on the connection.
    #[error("http: {0}")]
    Http(String),
    /// The server answered with an HTTP error status.
    #[error("the server answered HTTP {0}")]
    Status(u16),
    /// The answer was too large, not JSON-RPC, or did not answer the request.
    #[error("bad answer from the server: {0}")]
    BadAnswer(&'static str),
    /// The answer could not be scanned for PII, and which limit it hit (too long, too many
    /// findings, redaction did not settle, ...): an answer the gateway cannot scan is never
    /// passed on.
    #[error("the answer could not be scanned for PII: {0}")]
    Unscannable(attestplane_verifier::gateway::pii::PiiError),
    /// The call took too long.
    #[error("the server did not answer in time")]
    Timeout,
    /// A request that may leave only once an entry is durable came to a connection no host
    /// holds (never sent: the gateway asked for a held connection and got another).
    #[error("the upstream connection cannot hold the request until its entry is durable")]
    Unheld,
}

/// A server's endpoint, as registered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// The server id (what the dialer is asked for).
    pub server: String,
    /// `Host` header value.
    pub authority: String,
    /// The MCP endpoint's path.
    pub path: String,
}

impl Endpoint {
    /// The endpoint of a registration: the host dials the registered `endpoint`
    /// (`http://host:port`), and the MCP endpoint's path is the path of its resource URI
    /// (`…/mcp`; `/` when it has none).
    pub fn of_registration(server: &str, endpoint: &str, resource: &str) -> Option<Self> {
        let base = Self::parse(server, endpoint)?;
        let path = resource
            .split_once("://")
            .map(|(_, rest)| rest)
            .and_then(|rest| rest.find('/').and_then(|i| rest.get(i..)))
            .unwrap_or("/");
        Some(Self {
            path: path.to_owned(),
            ..base
        })
    }

    /// The endpoint of server `server` whose MCP URL is `url` (`http://host:port/path`).
    pub fn parse(server: &str, url: &str) -> Option<Self> {
        let rest = url.strip_prefix("http://")?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (rest.get(..i)?, rest.get(i..)?),
            None => (rest, "/"),
        };
        if authority.is_empty() || authority.contains('@') {
            return None;
        }
        Some(Self {
            server: server.to_owned(),
            authority: authority.to_owned(),
            path: path.to_owned(),
        })
    }
}

#[derive(Clone, Debug)]
struct Known {
    era: Era,
    session: Option<String>,
}

/// An upstream's answer to one request.
#[derive(Debug)]
pub struct Answer {
    /// The JSON-RPC message that answers the request (bytes as the server sent them).
    pub body: Bytes,
    /// Whether the server streamed it as SSE.
    pub streamed: bool,
    /// Notifications the server sent before the answer (dropped; counted).
    pub notifications: usize,
    /// Server-to-client requests the server sent before the answer (legacy era; each
    /// answered with an error, never relayed to the agent).
    pub server_requests: usize,
}

/// An open HTTP connection to a server, and its gate if a host holds it.
struct Pooled {
    sender: SendRequest<Full<Bytes>>,
    gate: Option<Gate>,
}

/// The client: connections, eras and sessions per server.
pub struct Upstreams {
    connect: Arc<dyn Connect>,
    idle: Mutex<HashMap<String, Vec<Pooled>>>,
    known: Mutex<HashMap<String, Known>>,
    timeout: Duration,
}

impl std::fmt::Debug for Upstreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstreams")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Idle connections kept per server.
const MAX_IDLE_PER_SERVER: usize = 32;

impl Upstreams {
    /// A client opening connections with `connect`, each call bounded by `timeout`.
    pub fn new(connect: Arc<dyn Connect>, timeout: Duration) -> Self {
        Self {
            connect,
            idle: Mutex::new(HashMap::new()),
            known: Mutex::new(HashMap::new()),
            timeout,
        }
    }

    /// Whether the host holds what is written on every upstream connection ([`Connect::holds`]):
    /// then [`Self::call`] may be given a request that must wait for an entry.
    pub fn holds(&self) -> bool {
        self.connect.holds()
    }

    /// The era of `endpoint`'s server, probing it the first time.
    pub async fn era(&self, endpoint: &Endpoint) -> Result<Era, UpstreamError> {
        Ok(self.known(endpoint).await?.era)
    }

    async fn known(&self, endpoint: &Endpoint) -> Result<Known, UpstreamError> {
        if let Some(k) = self.lock_known().get(&endpoint.server).cloned() {
            return Ok(k);
        }
        let known = self.probe(endpoint).await?;
        self.lock_known()
            .insert(endpoint.server.clone(), known.clone());
        Ok(known)
    }

    fn lock_known(&self) -> std::sync::MutexGuard<'_, HashMap<String, Known>> {
        self.known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lock_idle(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Pooled>>> {
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Forgets what is known of `server` (its era and session): the next call probes again.
    pub fn forget(&self, server: &str) {
        self.lock_known().remove(server);
    }

    async fn probe(&self, endpoint: &Endpoint) -> Result<Known, UpstreamError> {
        let discover = format!(
            r#"{{"jsonrpc":"2.0","id":"attestplane-probe","method":"server/discover","params":{{"_meta":{{"{META_PROTOCOL_VERSION}":"{MODERN_VERSION}","io.modelcontextprotocol/clientInfo":{{"name":"attestplane-gateway","version":"{}"}},"io.modelcontextprotocol/clientCapabilities":{{}}}}}}}}"#,
            env!("CARGO_PKG_VERSION")
        );
        let modern = Known {
            era: Era::Modern,
            session: None,
        };
        if let Ok((answer, _)) = self
            .exchange(
                endpoint,
                &modern,
                "server/discover",
                None,
                &discover,
                None,
                &mut RefuseAll,
            )
            .await
            && let Ok(m) = parse_message(&answer.body)
            && m.kind() == Kind::Response
            && m.result()
                .is_some_and(|r| r.get().contains(&format!("\"{MODERN_VERSION}\"")))
        {
            return Ok(modern);
        }
        self.initialize(endpoint).await
    }

    async fn initialize(&self, endpoint: &Endpoint) -> Result<Known, UpstreamError> {
        let init = format!(
            r#"{{"jsonrpc":"2.0","id":"attestplane-init","method":"initialize","params":{{"protocolVersion":"{LEGACY_VERSION}","capabilities":{{}},"clientInfo":{{"name":"attestplane-gateway","version":"{}"}}}}}}"#,
            env!("CARGO_PKG_VERSION")
        );
        let fresh = Known {
            era: Era::Legacy,
            session: None,
        };
        let (answer, session) = self
            .exchange(
                endpoint,
                &fresh,
                "initialize",
                None,
                &init,
                None,
                &mut RefuseAll,
            )
            .await?;
        let m = parse_message(&answer.body).map_err(|_| UpstreamError::BadAnswer("initialize"))?;
        if m.kind() != Kind::Response {
            return Err(UpstreamError::BadAnswer("initialize was refused"));
        }
        let known = Known {
            era: Era::Legacy,
            session,
        };
        let initialized = r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#;
        self.exchange(
            endpoint,
            &known,
            "notifications/initialized",
            None,
            initialized,
            None,
            &mut RefuseAll,
        )
        .await?;
        Ok(known)
    }

    /// Sends one JSON-RPC request (`body`, already in the upstream's era) and returns the
    /// message that answers it. `name` is the tool name (`Mcp-Name`), `receipt` the receipt
    /// header. A legacy session the server has forgotten is renewed once.
    ///
    /// `need`: the log entries that must be durable before the request may reach the server
    /// (0: none). More than 0 only where [`Self::holds`]: the request is written at once and
    /// the host holds it until then; a connection without a gate refuses it
    /// ([`UpstreamError::Unheld`]) and nothing is sent.
    #[allow(clippy::too_many_arguments)]
    pub async fn call(
        &self,
        endpoint: &Endpoint,
        method: &str,
        name: Option<&str>,
        body: &str,
        receipt: Option<&str>,
        need: u64,
    ) -> Result<Answer, UpstreamError> {
        let work = async {
            let known = self.known(endpoint).await?;
            let mut refuse = RefuseAll;
            let mut send = async |known: &Known| {
                self.exchange_after(
                    endpoint,
                    known,
                    (method, name, body, receipt),
                    &mut refuse,
                    need,
                )
                .await
                .map(|(a, _)| a)
            };
            match send(&known).await {
                Err(UpstreamError::Status(404)) if known.era == Era::Legacy => {
                    self.forget(&endpoint.server);
                    let known = self.known(endpoint).await?;
                    send(&known).await
                }
                other => other,
            }
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| UpstreamError::Timeout)?
    }

    /// [`Self::call`], a legacy server's requests on the answer's stream answered by
    /// `requests` instead of refused; the time `paused` records (the call waiting on its
    /// agent) does not count against the timeout.
    #[allow(clippy::too_many_arguments)]
    pub async fn call_answering(
        &self,
        endpoint: &Endpoint,
        method: &str,
        name: Option<&str>,
        body: &str,
        receipt: Option<&str>,
        requests: &mut dyn ServerRequests,
        paused: &Paused,
    ) -> Result<Answer, UpstreamError> {
        let work = async {
            let known = self.known(endpoint).await?;
            match self
                .exchange(endpoint, &known, method, name, body, receipt, requests)
                .await
            {
                Err(UpstreamError::Status(404)) if known.era == Era::Legacy => {
                    self.forget(&endpoint.server);
                    let known = self.known(endpoint).await?;
                    self.exchange(endpoint, &known, method, name, body, receipt, requests)
                        .await
                        .map(|(a, _)| a)
                }
                other => other.map(|(a, _)| a),
            }
        };
        let started = tokio::time::Instant::now();
        tokio::pin!(work);
        loop {
            let (waited, waiting) = paused.waited();
            let deadline = started + self.timeout + waited;
            // While the call waits on its agent the deadline moves with it: look again later.
            let wake = if waiting {
                deadline.max(tokio::time::Instant::now() + Duration::from_millis(100))
            } else {
                deadline
            };
            match tokio::time::timeout_at(wake, &mut work).await {
                Ok(result) => return result,
                Err(_) => {
                    let (waited, waiting) = paused.waited();
                    if !waiting && tokio::time::Instant::now() >= started + self.timeout + waited {
                        return Err(UpstreamError::Timeout);
                    }
                }
            }
        }
    }

    async fn sender(&self, server: &str) -> Result<Pooled, UpstreamError> {
        loop {
            let candidate = self.lock_idle().get_mut(server).and_then(Vec::pop);
            match candidate {
                Some(mut p) => {
                    if p.sender.ready().await.is_ok() {
                        return Ok(p);
                    }
                }
                None => break,
            }
        }
        let dialed = self
            .connect
            .connect(server)
            .await
            .map_err(UpstreamError::Connect)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(dialed.io))
            .await
            .map_err(|e| UpstreamError::Http(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Pooled {
            sender,
            gate: dialed.gate,
        })
    }

    fn give_back(&self, server: &str, pooled: Pooled) {
        if pooled.sender.is_closed() {
            return;
        }
        let mut idle = self.lock_idle();
        let list = idle.entry(server.to_owned()).or_default();
        if list.len() < MAX_IDLE_PER_SERVER {
            list.push(pooled);
        }
    }

    /// One HTTP exchange; returns the answer and the `Mcp-Session-Id` the server sent, if any.
    /// A legacy server's requests on the answer's stream are answered by `requests`.
    #[allow(clippy::too_many_arguments)]
    async fn exchange(
        &self,
        endpoint: &Endpoint,
        known: &Known,
        method: &str,
        name: Option<&str>,
        body: &str,
        receipt: Option<&str>,
        requests: &mut dyn ServerRequests,
    ) -> Result<(Answer, Option<String>), UpstreamError> {
        self.exchange_after(endpoint, known, (method, name, body, receipt), requests, 0)
            .await
    }

    /// [`Self::exchange`] of a request that may reach the server only once `need` entries are
    /// durable: the connection's gate is raised to it before anything is written (a
    /// connection without one refuses a `need` above 0).
    async fn exchange_after(
        &self,
        endpoint: &Endpoint,
        known: &Known,
        (method, name, body, receipt): (&str, Option<&str>, &str, Option<&str>),
        requests: &mut dyn ServerRequests,
        need: u64,
    ) -> Result<(Answer, Option<String>), UpstreamError> {
        let request = post_request(endpoint, known, method, name, body, receipt)?;
        let mut pooled = self.sender(&endpoint.server).await?;
        if need > 0 {
            match &pooled.gate {
                Some(gate) => gate.require(need),
                None => return Err(UpstreamError::Unheld),
            }
        }
        let response = pooled
            .sender
            .send_request(request)
            .await
            .map_err(|e| UpstreamError::Http(e.to_string()))?;
        let status = response.status();
        let session = response
            .headers()
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let sse = response
            .headers()
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if sse && status.is_success() {
            // Read event by event and stop at the answer: a server that keeps the stream open
            // after answering (or floods it) never holds the call past its answer or the
            // bounds. A stream left unread is not reused: dropping it closes the connection.
            let (answer, finished) = self
                .read_sse_answer(endpoint, known, response.into_body(), requests)
                .await?;
            if finished {
                self.give_back(&endpoint.server, pooled);
            }
            return Ok((answer, session));
        }
        let collected = Limited::new(response.into_body(), MAX_RESPONSE_BODY)
            .collect()
            .await
            .map_err(|_| UpstreamError::BadAnswer("answer too large or cut off"))?
            .to_bytes();
        self.give_back(&endpoint.server, pooled);
        if status == hyper::StatusCode::ACCEPTED && method.starts_with("notifications/") {
            return Ok((
                Answer {
                    body: Bytes::new(),
                    streamed: false,
                    notifications: 0,
                    server_requests: 0,
                },
                session,
            ));
        }
        if !status.is_success() {
            return Err(UpstreamError::Status(status.as_u16()));
        }
        let answer = Answer {
            body: collected,
            streamed: false,
            notifications: 0,
            server_requests: 0,
        };
        Ok((answer, session))
    }
}

/// The POST of one JSON-RPC message to `endpoint` in `known`'s era (and session).
fn post_request(
    endpoint: &Endpoint,
    known: &Known,
    method: &str,
    name: Option<&str>,
    body: &str,
    receipt: Option<&str>,
) -> Result<hyper::Request<Full<Bytes>>, UpstreamError> {
    let mut request = hyper::Request::post(endpoint.path.as_str())
        .header(hyper::header::HOST, endpoint.authority.as_str())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(hyper::header::ACCEPT, "application/json, text/event-stream");
    match known.era {
        Era::Modern => {
            request = request
                .header("MCP-Protocol-Version", MODERN_VERSION)
                .header("Mcp-Method", method);
            if let Some(n) = name {
                request = request.header("Mcp-Name", encode_header_value(n));
            }
        }
        Era::Legacy => {
            if method != "initialize" {
                request = request.header("MCP-Protocol-Version", LEGACY_VERSION);
            }
            if let Some(s) = &known.session {
                request = request.header("Mcp-Session-Id", s.as_str());
            }
        }
    }
    if let Some(r) = receipt {
        request = request.header("Attestplane-Receipt", r);
    }
    request
        .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
        .map_err(|e| UpstreamError::Http(e.to_string()))
}

impl Upstreams {
    /// Reads an SSE response body until the JSON-RPC response in it: the answer, and whether
    /// the stream was read to its end (only then may the connection be reused). Bounded: at
    /// most [`MAX_RESPONSE_BODY`] bytes in all (so no event is larger), at most
    /// [`MAX_SSE_EVENTS`] events before the answer. A server-to-client request before the
    /// answer (legacy era) is answered by `requests`, POSTed to the server's session
    /// ([`Self::post_to_session`]), and the read goes on: the server's answer comes after it.
    /// A modern server's request on the stream is not of its era: the call ends, a bad answer.
    async fn read_sse_answer(
        &self,
        endpoint: &Endpoint,
        known: &Known,
        mut body: hyper::body::Incoming,
        requests: &mut dyn ServerRequests,
    ) -> Result<(Answer, bool), UpstreamError> {
        let mut reader = SseAnswer::default();
        let mut total = 0usize;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| UpstreamError::Http(e.to_string()))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            total = total.saturating_add(data.len());
            if total > MAX_RESPONSE_BODY {
                return Err(UpstreamError::BadAnswer(
                    "the sse stream is larger than the answer bound",
                ));
            }
            let found = reader.push(&data)?;
            // Only a legacy server has a session to answer to; a modern server asks inside a
            // result (`input_required`), and a request on its stream (before its answer or in
            // the same read) is not of its era: nothing of the stream reaches the agent.
            if known.era == Era::Modern && reader.requests_seen > 0 {
                return Err(UpstreamError::BadAnswer(
                    "a 2026-07-28 server sent a request on an answer's stream",
                ));
            }
            if let Some(answer) = found {
                // Requests in the same read as the answer are moot: the server has answered.
                return Ok((answer, body.is_end_stream()));
            }
            let pending = std::mem::take(&mut reader.requests);
            for request in pending {
                let response = requests.answer(&request).await?;
                self.post_to_session(endpoint, known, &response).await?;
            }
        }
        let answer = reader.finish()?;
        if known.era == Era::Modern && answer.server_requests > 0 {
            return Err(UpstreamError::BadAnswer(
                "a 2026-07-28 server sent a request on an answer's stream",
            ));
        }
        Ok((answer, true))
    }

    /// POSTs `response` (the answer to a server-to-client request the server sent on a stream)
    /// to the server's session, as the legacy era's client answers a request. The server's
    /// `2xx` is all that is read back (bounded); another status ends the call.
    async fn post_to_session(
        &self,
        endpoint: &Endpoint,
        known: &Known,
        response: &str,
    ) -> Result<(), UpstreamError> {
        let post = post_request(endpoint, known, "", None, response, None)?;
        let mut pooled = self.sender(&endpoint.server).await?;
        let answer = pooled
            .sender
            .send_request(post)
            .await
            .map_err(|e| UpstreamError::Http(e.to_string()))?;
        let status = answer.status();
        Limited::new(answer.into_body(), MAX_ACK_BODY)
            .collect()
            .await
            .map_err(|_| UpstreamError::BadAnswer("the acknowledgement is too large or cut off"))?;
        self.give_back(&endpoint.server, pooled);
        if !status.is_success() {
            return Err(UpstreamError::Status(status.as_u16()));
        }
        Ok(())
    }
}

/// At most `max` bytes of `s`, cut at a character boundary (a hostile method name is not
/// echoed whole).
fn truncated(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default()
}

/// The JSON-RPC response in an SSE stream, read incrementally: the first `data` event that is
/// a response or an error response; notifications before it are counted and dropped.
#[derive(Debug)]
struct SseAnswer {
    events: SseEvents,
    seen: usize,
    notifications: usize,
    /// Server-to-client requests read and not yet answered (their JSON text).
    requests: Vec<String>,
    /// Server-to-client requests read in all.
    requests_seen: usize,
}

impl Default for SseAnswer {
    fn default() -> Self {
        Self {
            events: SseEvents::bounded(MAX_RESPONSE_BODY),
            seen: 0,
            notifications: 0,
            requests: Vec::new(),
            requests_seen: 0,
        }
    }
}

impl SseAnswer {
    /// Adds `bytes`; the answer once an event completed it.
    fn push(&mut self, bytes: &[u8]) -> Result<Option<Answer>, UpstreamError> {
        let events = self.events.push(bytes)?;
        self.take(events)
    }

    /// The stream ended: its last event may lack the blank line that ends it.
    fn finish(mut self) -> Result<Answer, UpstreamError> {
        let last = self.events.finish()?;
        match self.take(last)? {
            Some(a) => Ok(a),
            None => Err(UpstreamError::BadAnswer(
                "the stream ended without an answer",
            )),
        }
    }

    fn take(&mut self, events: Vec<String>) -> Result<Option<Answer>, UpstreamError> {
        for data in events {
            self.seen += 1;
            if self.seen > MAX_SSE_EVENTS {
                return Err(UpstreamError::BadAnswer(
                    "too many events before the answer",
                ));
            }
            match parse_message(data.as_bytes()).map(|m| m.kind()) {
                Ok(Kind::Response | Kind::ErrorResponse) => {
                    return Ok(Some(Answer {
                        body: Bytes::from(data),
                        streamed: true,
                        notifications: self.notifications,
                        server_requests: self.requests_seen,
                    }));
                }
                Ok(Kind::Request) => {
                    self.requests_seen += 1;
                    if self.requests_seen > MAX_SERVER_REQUESTS {
                        return Err(UpstreamError::BadAnswer(
                            "too many server-to-client requests before the answer",
                        ));
                    }
                    self.requests.push(data);
                }
                Ok(Kind::Notification) => self.notifications += 1,
                Err(_) => return Err(UpstreamError::BadAnswer("an sse event is not json-rpc")),
            }
        }
        Ok(None)
    }
}

/// The largest SSE event read on a listen stream.
pub const MAX_LISTEN_EVENT: usize = 64 * 1024;

/// The method of the notification that an upstream's tool list changed.
pub const TOOLS_LIST_CHANGED: &str = "notifications/tools/list_changed";

impl Upstreams {
    /// Listens for the upstream's `notifications/tools/list_changed` on a connection of its
    /// own, calling `on_change` for each, until the stream ends: in the modern era a
    /// `subscriptions/listen` request for `toolsListChanged`, in the legacy era the session's
    /// GET stream. Events are read one at a time, each bounded ([`MAX_LISTEN_EVENT`]); a legacy
    /// server's request on it is refused at once (as on a call's stream); other messages are
    /// ignored; an answer to the listen request ends it. An upstream that offers
    /// no stream (HTTP 405, an error, not SSE) ends it at once.
    pub async fn listen_tools_changed(
        &self,
        endpoint: &Endpoint,
        mut on_change: impl FnMut() + Send,
    ) -> Result<(), UpstreamError> {
        let known = self.known(endpoint).await?;
        let mut request = match known.era {
            Era::Modern => hyper::Request::post(endpoint.path.as_str())
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .header(hyper::header::ACCEPT, "application/json, text/event-stream")
                .header("MCP-Protocol-Version", MODERN_VERSION)
                .header("Mcp-Method", "subscriptions/listen"),
            Era::Legacy => {
                let Some(session) = &known.session else {
                    return Ok(());
                };
                hyper::Request::get(endpoint.path.as_str())
                    .header(hyper::header::ACCEPT, "text/event-stream")
                    .header("MCP-Protocol-Version", LEGACY_VERSION)
                    .header("Mcp-Session-Id", session.as_str())
            }
        };
        request = request.header(hyper::header::HOST, endpoint.authority.as_str());
        let body = match known.era {
            Era::Modern => format!(
                r#"{{"jsonrpc":"2.0","id":"attestplane-listen","method":"subscriptions/listen","params":{{"notifications":{{"toolsListChanged":true}},"_meta":{{"{META_PROTOCOL_VERSION}":"{MODERN_VERSION}","io.modelcontextprotocol/clientInfo":{{"name":"attestplane-gateway","version":"{}"}},"io.modelcontextprotocol/clientCapabilities":{{}}}}}}}}"#,
                env!("CARGO_PKG_VERSION")
            ),
            Era::Legacy => String::new(),
        };
        let request = request
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| UpstreamError::Http(e.to_string()))?;
        // A connection of its own: the stream holds it for as long as it lasts.
        let dialed = self
            .connect
            .connect(&endpoint.server)
            .await
            .map_err(UpstreamError::Connect)?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(dialed.io))
            .await
            .map_err(|e| UpstreamError::Http(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| UpstreamError::Http(e.to_string()))?;
        if !response.status().is_success() {
            return Err(UpstreamError::Status(response.status().as_u16()));
        }
        let sse = response
            .headers()
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if !sse {
            return Err(UpstreamError::BadAnswer("the listen stream is not sse"));
        }
        let mut body = response.into_body();
        let mut events = SseEvents::bounded(MAX_LISTEN_EVENT);
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| UpstreamError::Http(e.to_string()))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            for event in events.push(&data)? {
                let kind = parse_message(event.as_bytes())
                    .map(|m| (m.kind(), m.method() == Some(TOOLS_LIST_CHANGED)));
                match kind {
                    Ok((Kind::Notification, true)) => on_change(),
                    // The server ended the subscription.
                    Ok((Kind::Response | Kind::ErrorResponse, _)) => return Ok(()),
                    // A legacy server's request outside any call (its session's stream): refused
                    // at once like one on a call's stream, so that whatever waits on it in the
                    // server does not wait for ever. A failed answer does not end the stream.
                    Ok((Kind::Request, _)) if known.era == Era::Legacy => {
                        if let Ok(response) = refusal(&event) {
                            let _ = self.post_to_session(endpoint, &known, &response).await;
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }
}

/// An SSE stream read incrementally: bytes in, the `data` of each complete event out.
#[derive(Debug)]
struct SseEvents {
    buffer: Vec<u8>,
    /// How far `buffer` has been searched for an event's end (without finding one).
    searched: usize,
    /// The longest event (or line) accepted.
    max: usize,
}

impl SseEvents {
    /// A reader of events of at most `max` bytes each.
    fn bounded(max: usize) -> Self {
        Self {
            buffer: Vec::new(),
            searched: 0,
            max,
        }
    }

    /// Adds `bytes`; returns the data of the events they completed. An event (or a line)
    /// longer than the bound ends the stream. Each byte is searched once for an event's end,
    /// however thinly the stream is cut.
    fn push(&mut self, bytes: &[u8]) -> Result<Vec<String>, UpstreamError> {
        self.buffer.extend_from_slice(bytes);
        let mut out = Vec::new();
        loop {
            // A separator may straddle the previous search's end: look back three bytes.
            let from = self.searched.saturating_sub(3);
            let Some((at, len)) = self
                .buffer
                .get(from..)
                .and_then(find_event_end)
                .map(|(at, len)| (at + from, len))
            else {
                self.searched = self.buffer.len();
                if self.buffer.len() > self.max {
                    return Err(UpstreamError::BadAnswer("an sse event is too large"));
                }
                return Ok(out);
            };
            if at > self.max {
                return Err(UpstreamError::BadAnswer("an sse event is too large"));
            }
            let event: Vec<u8> = self.buffer.drain(..at + len).take(at).collect();
            self.searched = 0;
            if let Some(data) = event_data(&event)? {
                out.push(data);
            }
        }
    }

    /// The data of the last event, which the end of the stream ended (if it has any).
    fn finish(&mut self) -> Result<Vec<String>, UpstreamError> {
        let event = std::mem::take(&mut self.buffer);
        Ok(event_data(&event)?.into_iter().collect())
    }
}

/// The `data` of one event (its lines joined), `None` when it has none.
fn event_data(event: &[u8]) -> Result<Option<String>, UpstreamError> {
    let text =
        std::str::from_utf8(event).map_err(|_| UpstreamError::BadAnswer("sse is not utf-8"))?;
    let mut data = String::new();
    let mut any = false;
    for line in text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l)) {
        if let Some(d) = line.strip_prefix("data:") {
            if any {
                data.push('\n');
            }
            any = true;
            data.push_str(d.strip_prefix(' ').unwrap_or(d));
        }
    }
    Ok((any && !data.is_empty()).then_some(data))
}

/// Where the first event in `buffer` ends: the index of its blank-line separator and the
/// separator's length.
fn find_event_end(buffer: &[u8]) -> Option<(usize, usize)> {
    let lf = buffer.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2));
    let crlf = buffer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

/// A header value as the spec wants it: plain when printable ASCII, else the base64 sentinel.
pub fn encode_header_value(v: &str) -> String {
    use base64::Engine as _;
    if v.bytes().all(|b| (0x20..0x7f).contains(&b)) && !v.starts_with("=?") {
        v.to_owned()
    } else {
        format!(
            "=?base64?{}?=",
            base64::engine::general_purpose::STANDARD.encode(v)
        )
    }
}

/// The JSON-RPC response in an SSE stream: the first `data` event that is a response or an
/// error response; notifications before it are counted.
pub fn answer_from_sse(stream: &[u8]) -> Result<Answer, UpstreamError> {
    let mut reader = SseAnswer::default();
    match reader.push(stream)? {
        Some(a) => Ok(a),
        None => reader.finish(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_parses_http_urls_only() {
        let e = Endpoint::parse("w", "http://127.0.0.1:7401/mcp").unwrap();
        assert_eq!(e.authority, "127.0.0.1:7401");
        assert_eq!(e.path, "/mcp");
        assert_eq!(
            Endpoint::parse("w", "http://h:1").unwrap().path,
            "/".to_owned()
        );
        assert!(Endpoint::parse("w", "https://h/mcp").is_none());
        assert!(Endpoint::parse("w", "http://user@h/mcp").is_none());
        assert!(Endpoint::parse("w", "http:///mcp").is_none());
        let e =
            Endpoint::of_registration("w", "http://w.internal:9000", "https://w.example/v1/mcp")
                .unwrap();
        assert_eq!(
            (e.authority.as_str(), e.path.as_str()),
            ("w.internal:9000", "/v1/mcp")
        );
        assert!(Endpoint::of_registration("w", "https://w.internal", "https://w/mcp").is_none());
    }

    #[test]
    fn sse_answer_skips_notifications() {
        let s = b"event: message\r\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"params\":{}}\r\n\r\ndata: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{\"x\":1e3}}\n\n";
        let a = answer_from_sse(s).unwrap();
        assert_eq!(
            &a.body[..],
            br#"{"jsonrpc":"2.0","id":1,"result":{"x":1e3}}"#
        );
        assert_eq!(a.notifications, 1);
        assert!(a.streamed);
    }

    #[test]
    fn sse_without_answer_or_with_garbage_is_refused() {
        assert!(answer_from_sse(b"data: {\"jsonrpc\":\"2.0\",\"method\":\"n\"}\n\n").is_err());
        assert!(answer_from_sse(b"data: not json\n\n").is_err());
        let flood = "data: {\"jsonrpc\":\"2.0\",\"method\":\"n\"}\n\n".repeat(MAX_SSE_EVENTS + 1);
        assert!(matches!(
            answer_from_sse(flood.as_bytes()),
            Err(UpstreamError::BadAnswer(
                "too many events before the answer"
            ))
        ));
    }

    #[test]
    fn listen_events_are_read_incrementally_and_bounded() {
        let mut e = SseEvents::bounded(MAX_LISTEN_EVENT);
        assert!(
            e.push(b"event: message\r\ndata: {\"a\"")
                .unwrap()
                .is_empty()
        );
        assert_eq!(e.push(b":1}\r\n\r\ndata: x\n").unwrap(), vec![r#"{"a":1}"#]);
        assert_eq!(e.push(b"\n: comment\n\n").unwrap(), vec!["x"]);
        let mut e = SseEvents::bounded(MAX_LISTEN_EVENT);
        let huge = vec![b'a'; MAX_LISTEN_EVENT + 1];
        assert!(e.push(&huge).is_err());
    }

    #[test]
    fn an_sse_answer_cut_one_byte_at_a_time_is_found_once_and_stops_the_read() {
        let stream = b"data: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\"}\r\n\r\ndata: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}}\r\n\r\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"late\"}\n\n";
        let mut reader = SseAnswer::default();
        let mut found = None;
        for (i, b) in stream.iter().enumerate() {
            if let Some(a) = reader.push(std::slice::from_ref(b)).unwrap() {
                found = Some((i, a));
                break;
            }
        }
        let (at, answer) = found.expect("the answer is found");
        // Found at the blank line that ends it, before the rest of the stream was read.
        assert_eq!(&stream[at - 3..=at], b"\r\n\r\n");
        assert_eq!(&answer.body[..], br#"{"jsonrpc":"2.0","id":1,"result":{}}"#);
        assert_eq!(answer.notifications, 1);
        // An answer the end of the stream ends (no blank line) is still found.
        let a = answer_from_sse(b"data: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}}").unwrap();
        assert_eq!(&a.body[..], br#"{"jsonrpc":"2.0","id":1,"result":{}}"#);
    }

    #[test]
    fn an_sse_event_over_the_answer_bound_is_refused_as_too_large() {
        let big = format!(
            "data: {{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{{\"t\":\"{}\"}}}}",
            "x".repeat(MAX_RESPONSE_BODY)
        );
        let mut reader = SseAnswer::default();
        let mut refused = None;
        for chunk in big.as_bytes().chunks(64 * 1024) {
            if let Err(e) = reader.push(chunk) {
                refused = Some(e);
                break;
            }
        }
        assert!(
            matches!(
                refused,
                Some(UpstreamError::BadAnswer("an sse event is too large"))
            ),
            "{refused:?}"
        );
        // Complete within one push: refused too.
        let whole = format!("{big}\n\n");
        assert!(matches!(
            answer_from_sse(whole.as_bytes()),
            Err(UpstreamError::BadAnswer("an sse event is too large"))
        ));
    }

    #[test]
    fn header_values_use_the_base64_sentinel_when_needed() {
        assert_eq!(encode_header_value("add"), "add");
        assert_eq!(encode_header_value("wéather"), "=?base64?d8OpYXRoZXI=?=");
    }
}
