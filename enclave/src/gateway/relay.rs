//! A legacy server's server-to-client requests, relayed to a legacy agent.
//!
//! A `2025-11-25` server asks its client for sampling, elicitation or roots with a JSON-RPC
//! request on the SSE stream of the answer it is working on, and waits for the client to POST
//! the response to its session. Where the server's registration allows the kind
//! (`client_requests`) and the agent speaks the same era (it has a session to POST from), the
//! gateway relays it:
//!
//! - the agent's call is answered as an SSE stream (`text/event-stream`) from the first relayed
//!   request on (a call that relays nothing is answered with plain JSON, as any other);
//! - the request is re-issued on that stream under an id the gateway mints (never the server's:
//!   `attestplane-relay-` and 128 bits from the NSM), bound to the agent, its session and the
//!   call; its `params` are treated by the call's PII rule first (`redact` redacts them,
//!   `refuse` refuses a request that carries PII to the server, never relaying it), so a relayed
//!   request carries nothing the server's own answer could not;
//! - the agent POSTs its response (a JSON-RPC response to the gateway's id) to its session: it
//!   is matched back to the call only from the same agent and session, treated by the call's
//!   PII rule like an answer, and forwarded to the server's session under the server's own id;
//!   a response to an unknown, expired or another agent's id is refused ([`RelayError`]) and
//!   changes nothing;
//! - then the call's final answer, on the same stream, once its result entry is durable.
//!
//! Bounds: at most [`super::upstream::MAX_SERVER_REQUESTS`] per call (one more ends the call
//! as a bad answer), one relayed request awaiting its agent at a time per call, at most
//! [`MAX_PENDING`] in the gateway, and a time limit for the agent's answer
//! ([`super::GatewayConfig::agent_answer_timeout`]; then the server is told the agent did not
//! answer). The wait does not count against the upstream's timeout. Anything else (a kind the
//! registration does not allow, an unknown method, a modern agent) is refused to the server at
//! once (`-32601`), never relayed.
//!
//! What is logged: the call's `decision` and `call_result` entries as for any call (the result's
//! hash is the final answer's, as the agent receives it in the last event). A relay is not an
//! entry of its own: log format v1 has no event for it, and neither the request nor the agent's
//! response (the agent's content, which may carry PII) is written anywhere.

use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use attestplane_verifier::admin::ClientRequest;
use attestplane_verifier::gateway::jsonrpc::{
    INTERNAL_ERROR, INVALID_REQUEST, Message, error_response, parse_message,
};
use attestplane_verifier::gateway::pii;
use attestplane_verifier::policy::PiiAction;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::{Body, Frame, SizeHint};
use hyper::header::HeaderValue;
use hyper::{Response, StatusCode};
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};

use super::redact::{self, Treated};
use super::session::SessionOwner;
use super::upstream::{Paused, ServerRequests, UpstreamError, refusal};
use crate::server::EnclaveAccess;

/// What every id the gateway mints for a relayed request starts with.
pub const RELAY_ID_PREFIX: &str = "attestplane-relay-";

/// The most relayed requests awaiting their agents' answers in the whole gateway.
pub const MAX_PENDING: usize = 4096;

/// Events queued toward an agent that does not read its stream.
const STREAM_DEPTH: usize = 4;

/// The body of an answer to an agent: whole, or an SSE stream written as the call goes.
#[derive(Debug)]
pub enum AgentBody {
    /// The whole answer.
    Whole(Full<Bytes>),
    /// Events, as the call writes them; the stream ends when the call drops its sender.
    Stream(mpsc::Receiver<Bytes>),
}

impl From<Full<Bytes>> for AgentBody {
    fn from(f: Full<Bytes>) -> Self {
        Self::Whole(f)
    }
}

impl Body for AgentBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Self::Whole(f) => Pin::new(f).poll_frame(cx),
            Self::Stream(rx) => rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Whole(f) => f.is_end_stream(),
            Self::Stream(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Whole(f) => f.size_hint(),
            Self::Stream(_) => SizeHint::default(),
        }
    }
}

/// An answer to an agent.
pub type AgentReply = Response<AgentBody>;

/// The kind of server-to-client request `method` is, if it is one the control plane relays.
pub fn kind_of(method: &str) -> Option<ClientRequest> {
    match method {
        "sampling/createMessage" => Some(ClientRequest::Sampling),
        "elicitation/create" => Some(ClientRequest::Elicitation),
        "roots/list" => Some(ClientRequest::Roots),
        _ => None,
    }
}

/// Why an agent's response was not taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RelayError {
    /// No relayed request awaits a response with this id from this agent in this session
    /// (never sent, answered already, expired, or another agent's or session's).
    #[error("no request the control plane relayed awaits a response with this id in this session")]
    Unknown,
    /// Too many relayed requests await their agents' answers.
    #[error("too many relayed requests await their agents' answers")]
    Full,
}

/// A relayed request awaiting its agent's response.
#[derive(Debug)]
struct Pending {
    owner: SessionOwner,
    session: String,
    expires: Instant,
    answer: oneshot::Sender<String>,
}

/// The relayed requests awaiting their agents' responses, by the id the gateway minted.
#[derive(Debug)]
pub struct Relays {
    pending: Mutex<HashMap<String, Pending>>,
    timeout: Duration,
}

impl Relays {
    /// Relays whose agents have `timeout` to answer.
    pub fn new(timeout: Duration) -> Self {
        Self {
            pending: Mutex::new(HashMap::new()),
            timeout,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Pending>> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers request `id` as awaiting `owner`'s response in `session`.
    fn open(
        &self,
        id: String,
        owner: SessionOwner,
        session: String,
        now: Instant,
    ) -> Result<oneshot::Receiver<String>, RelayError> {
        let mut pending = self.lock();
        if pending.len() >= MAX_PENDING {
            pending.retain(|_, p| now < p.expires && !p.answer.is_closed());
            if pending.len() >= MAX_PENDING {
                return Err(RelayError::Full);
            }
        }
        let (tx, rx) = oneshot::channel();
        pending.insert(
            id,
            Pending {
                owner,
                session,
                expires: now + self.timeout,
                answer: tx,
            },
        );
        Ok(rx)
    }

    fn forget(&self, id: &str) {
        self.lock().remove(id);
    }

    /// Hands `response` (a JSON-RPC response, its text as the agent sent it) to the call that
    /// relayed request `id` (the response's id, as sent), if `owner` is the agent it was
    /// relayed to, in `session`, and it still waits. Otherwise [`RelayError::Unknown`], and
    /// nothing changes: a response from another agent or session does not use up the id.
    pub fn deliver(
        &self,
        owner: &SessionOwner,
        session: &str,
        id: &RawValue,
        response: String,
        now: Instant,
    ) -> Result<(), RelayError> {
        let id: String = serde_json::from_str(id.get()).map_err(|_| RelayError::Unknown)?;
        let mut pending = self.lock();
        match pending.get(&id) {
            Some(p) if p.owner == *owner && p.session == session && now < p.expires => {}
            _ => return Err(RelayError::Unknown),
        }
        let p = pending.remove(&id).ok_or(RelayError::Unknown)?;
        p.answer.send(response).map_err(|_| RelayError::Unknown)
    }

    /// How many relayed requests await an answer.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none does.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

/// Where the call's answer to its agent stands.
enum Agent {
    /// Nothing sent yet: the agent's request waits for its head.
    Waiting(oneshot::Sender<AgentReply>),
    /// Answered as an SSE stream: events go here.
    Streaming(mpsc::Sender<Bytes>),
    /// The agent is gone.
    Gone,
}

/// One call's relay toward its agent: answers the server-to-client requests a legacy server
/// sends on the call's stream, relaying those of an allowed kind to the agent.
pub struct CallRelay {
    relays: Arc<Relays>,
    access: EnclaveAccess,
    owner: SessionOwner,
    session: String,
    allowed: BTreeSet<ClientRequest>,
    rule: PiiAction,
    agent_id: Option<String>,
    agent: Agent,
    paused: Arc<Paused>,
    relayed: usize,
}

impl std::fmt::Debug for CallRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallRelay")
            .field("allowed", &self.allowed)
            .field("relayed", &self.relayed)
            .finish_non_exhaustive()
    }
}

impl CallRelay {
    /// A relay for the call `agent_id` (the agent's JSON-RPC id, as sent) of `owner` in
    /// `session`, relaying the kinds in `allowed` under the call's PII `rule`. Its answer's
    /// head goes to `head` (plain JSON if nothing is relayed, else an SSE stream).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        relays: Arc<Relays>,
        access: EnclaveAccess,
        owner: SessionOwner,
        session: String,
        allowed: BTreeSet<ClientRequest>,
        rule: PiiAction,
        agent_id: Option<String>,
        head: oneshot::Sender<AgentReply>,
    ) -> Self {
        Self {
            relays,
            access,
            owner,
            session,
            allowed,
            rule,
            agent_id,
            agent: Agent::Waiting(head),
            paused: Arc::new(Paused::default()),
            relayed: 0,
        }
    }

    /// The time the call waited on its agent, which the upstream's timeout does not count.
    pub fn paused(&self) -> Arc<Paused> {
        Arc::clone(&self.paused)
    }

    /// How many requests were relayed to the agent.
    pub fn relayed(&self) -> usize {
        self.relayed
    }

    /// Ends the call with `reply` (its final answer, whose result entry is durable): the
    /// answer itself if nothing was relayed, else its JSON-RPC message as the stream's last
    /// event (a reply that is not JSON-RPC becomes an internal error for the agent's id).
    pub async fn conclude(self, reply: AgentReply) {
        match self.agent {
            Agent::Waiting(head) => {
                let _ = head.send(reply);
            }
            Agent::Streaming(events) => {
                let json = reply
                    .headers()
                    .get(hyper::header::CONTENT_TYPE)
                    .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
                let body = reply
                    .into_body()
                    .collect()
                    .await
                    .map(|c| c.to_bytes())
                    .unwrap_or_default();
                let text = match (json, std::str::from_utf8(&body)) {
                    (true, Ok(t)) => t.to_owned(),
                    (_, text) => {
                        let id = self
                            .agent_id
                            .as_deref()
                            .and_then(|i| RawValue::from_string(i.to_owned()).ok());
                        error_response(
                            id.as_deref(),
                            INTERNAL_ERROR,
                            text.unwrap_or("the call failed"),
                        )
                    }
                };
                let _ =
                    tokio::time::timeout(self.relays.timeout, events.send(sse_event(&text))).await;
            }
            Agent::Gone => {}
        }
    }

    /// Sends `event` to the agent, answering its request as an SSE stream first if nothing was
    /// sent yet. `false` when the agent is gone (or does not read within the time limit).
    async fn send(&mut self, event: Bytes) -> bool {
        if let Agent::Waiting(_) = self.agent
            && let Agent::Waiting(head) = std::mem::replace(&mut self.agent, Agent::Gone)
        {
            let (tx, rx) = mpsc::channel(STREAM_DEPTH);
            if head.send(sse_head(rx)).is_err() {
                return false;
            }
            self.agent = Agent::Streaming(tx);
        }
        let Agent::Streaming(events) = &self.agent else {
            return false;
        };
        let sent = tokio::time::timeout(self.relays.timeout, events.send(event)).await;
        if !matches!(sent, Ok(Ok(()))) {
            self.agent = Agent::Gone;
            return false;
        }
        true
    }

    /// Relays `request` (of an allowed kind) to the agent and waits for its response: the
    /// response to POST to the server (the server's id), or the error to answer it with.
    async fn relay(&mut self, request: &Message<'_>) -> Result<String, (i64, String)> {
        let server_id = request
            .id()
            .ok_or((INVALID_REQUEST, "a request without an id".to_owned()))?;
        let treated = treat_request(request, self.rule).map_err(|why| (INVALID_REQUEST, why))?;
        let random = self
            .access
            .run(|enclave, _| (enclave.random(16), Vec::new()))
            .await;
        let Ok(Ok(random)) = random else {
            return Err((INTERNAL_ERROR, "no randomness for a relayed id".into()));
        };
        let gateway_id = format!("{RELAY_ID_PREFIX}{}", hex::encode(random));
        let quoted = format!("\"{gateway_id}\"");
        let reissued = parse_message(treated.as_bytes())
            .ok()
            .and_then(|m| m.id().and_then(|old| m.with_replaced(old, &quoted).ok()))
            .ok_or((
                INTERNAL_ERROR,
                "the request could not be re-issued".to_owned(),
            ))?;
        let answer = self
            .relays
            .open(
                gateway_id.clone(),
                self.owner.clone(),
                self.session.clone(),
                Instant::now(),
            )
            .map_err(|e| (INTERNAL_ERROR, e.to_string()))?;
        if !self.send(sse_event(&reissued)).await {
            self.relays.forget(&gateway_id);
            return Err((INTERNAL_ERROR, "the agent is gone".into()));
        }
        self.relayed += 1;
        self.paused.begin();
        let got = tokio::time::timeout(self.relays.timeout, answer).await;
        self.paused.end();
        self.relays.forget(&gateway_id);
        let Ok(Ok(response)) = got else {
            return Err((
                INTERNAL_ERROR,
                "the agent did not answer the relayed request in time".into(),
            ));
        };
        // The agent's content goes to the server: treated by the call's rule like an answer.
        let treated = match redact::treat_answer(response.as_bytes(), self.rule) {
            Ok(Treated::Forward(bytes, _)) => bytes,
            Ok(Treated::Withheld(_)) => {
                return Err((
                    INVALID_REQUEST,
                    "the agent's answer carries PII and the policy's rule for this call refuses it"
                        .into(),
                ));
            }
            Err(e) => return Err((INVALID_REQUEST, format!("the agent's answer: {e}"))),
        };
        parse_message(&treated)
            .ok()
            .and_then(|m| {
                m.id()
                    .and_then(|old| m.with_replaced(old, server_id.get()).ok())
            })
            .ok_or((
                INVALID_REQUEST,
                "the agent's answer is not a JSON-RPC response".to_owned(),
            ))
    }
}

impl ServerRequests for CallRelay {
    fn answer<'a>(
        &'a mut self,
        request: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<String, UpstreamError>> + Send + 'a>> {
        Box::pin(async move {
            let m = parse_message(request.as_bytes())
                .map_err(|_| UpstreamError::BadAnswer("an sse event is not json-rpc"))?;
            let allowed = m
                .method()
                .and_then(kind_of)
                .is_some_and(|k| self.allowed.contains(&k));
            if !allowed {
                return refusal(request);
            }
            match self.relay(&m).await {
                Ok(response) => Ok(response),
                Err((code, why)) => Ok(error_response(m.id(), code, &why)),
            }
        })
    }
}

/// `request`'s text under the call's PII `rule`: as sent (`allow`, or nothing found), its
/// `params` redacted in place (`redact`), or refused (`refuse` with findings; a scan that fails).
fn treat_request(request: &Message<'_>, rule: PiiAction) -> Result<String, String> {
    let text = request.text().to_owned();
    let Some(params) = request.params() else {
        return Ok(text);
    };
    let scan_failed = |e: pii::PiiError| format!("the request could not be scanned for PII: {e}");
    match rule {
        PiiAction::Allow => Ok(text),
        PiiAction::Refuse => {
            let report = pii::scan_json(params.get(), &[]).map_err(scan_failed)?;
            if report.is_empty() {
                Ok(text)
            } else {
                Err("the request carries PII and the policy's rule for this call refuses it".into())
            }
        }
        PiiAction::Redact => {
            let (report, redacted) = pii::redact_json(params.get(), &[]).map_err(scan_failed)?;
            if report.is_empty() {
                return Ok(text);
            }
            request
                .with_replaced(params, &redacted)
                .map_err(|e| format!("the request could not be redacted: {e}"))
        }
    }
}

/// One SSE event carrying `json` (each of its lines a `data` line).
pub fn sse_event(json: &str) -> Bytes {
    let mut out = String::with_capacity(json.len() + 32);
    out.push_str("event: message\n");
    for line in json.split(['\n', '\r']) {
        out.push_str("data: ");
        out.push_str(line);
        out.push('\n');
    }
    out.push('\n');
    Bytes::from(out)
}

/// The head of an SSE answer whose events come from `events`.
fn sse_head(events: mpsc::Receiver<Bytes>) -> AgentReply {
    let mut r = Response::new(AgentBody::Stream(events));
    *r.status_mut() = StatusCode::OK;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    r.headers_mut().insert(
        hyper::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(agent: &str) -> SessionOwner {
        SessionOwner {
            server: "weather".into(),
            agent: agent.into(),
            issuer: "idp".into(),
        }
    }

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_owned()).unwrap()
    }

    #[test]
    fn a_response_from_another_agent_or_session_or_to_a_guessed_id_changes_nothing() {
        let relays = Relays::new(Duration::from_secs(60));
        let now = Instant::now();
        let id = format!("{RELAY_ID_PREFIX}00ff");
        let mut rx = relays
            .open(id.clone(), owner("alice"), "s1".into(), now)
            .unwrap();
        let quoted = raw(&format!("\"{id}\""));
        let r = || "{}".to_owned();
        assert_eq!(
            relays.deliver(&owner("mallory"), "s1", &quoted, r(), now),
            Err(RelayError::Unknown)
        );
        assert_eq!(
            relays.deliver(&owner("alice"), "s2", &quoted, r(), now),
            Err(RelayError::Unknown)
        );
        let guessed = raw(&format!("\"{RELAY_ID_PREFIX}00fe\""));
        assert_eq!(
            relays.deliver(&owner("alice"), "s1", &guessed, r(), now),
            Err(RelayError::Unknown)
        );
        // The id as a number, or the same text unquoted: not the id.
        assert_eq!(
            relays.deliver(&owner("alice"), "s1", &raw("255"), r(), now),
            Err(RelayError::Unknown)
        );
        assert!(rx.try_recv().is_err(), "nothing reached the call");
        assert_eq!(relays.len(), 1, "still awaited");
        // Expired: refused, though the right agent answers.
        let late = now + Duration::from_secs(61);
        assert_eq!(
            relays.deliver(&owner("alice"), "s1", &quoted, r(), late),
            Err(RelayError::Unknown)
        );
        assert_eq!(
            relays.deliver(&owner("alice"), "s1", &quoted, "ok".into(), now),
            Ok(())
        );
        assert_eq!(rx.try_recv().unwrap(), "ok");
        // Once only.
        assert_eq!(
            relays.deliver(&owner("alice"), "s1", &quoted, r(), now),
            Err(RelayError::Unknown)
        );
        assert!(relays.is_empty());
    }

    #[test]
    fn relayed_requests_are_bounded() {
        let relays = Relays::new(Duration::from_secs(60));
        let now = Instant::now();
        let mut held = Vec::new();
        for i in 0..MAX_PENDING {
            held.push(
                relays
                    .open(format!("{i}"), owner("a"), "s".into(), now)
                    .unwrap(),
            );
        }
        assert_eq!(
            relays
                .open("one more".into(), owner("a"), "s".into(), now)
                .err(),
            Some(RelayError::Full)
        );
        // Expired ones make room.
        let later = now + Duration::from_secs(61);
        assert!(
            relays
                .open("one more".into(), owner("a"), "s".into(), later)
                .is_ok()
        );
    }

    #[test]
    fn a_relayed_requests_params_follow_the_calls_pii_rule() {
        let text = r#"{"jsonrpc":"2.0","id":"ask-0","method":"sampling/createMessage","params":{"messages":[{"role":"user","content":{"type":"text","text":"mail bob@example.com"}}],"maxTokens":1e3}}"#;
        let m = parse_message(text.as_bytes()).unwrap();
        assert_eq!(treat_request(&m, PiiAction::Allow).unwrap(), text);
        let redacted = treat_request(&m, PiiAction::Redact).unwrap();
        assert!(
            !redacted.contains("bob@example.com") && redacted.contains("[REDACTED:email]"),
            "{redacted}"
        );
        assert!(redacted.contains(r#""maxTokens":1e3"#), "{redacted}");
        assert!(treat_request(&m, PiiAction::Refuse).is_err());
        let clean = r#"{"jsonrpc":"2.0","id":1,"method":"roots/list"}"#;
        let m = parse_message(clean.as_bytes()).unwrap();
        assert_eq!(treat_request(&m, PiiAction::Refuse).unwrap(), clean);
    }

    #[test]
    fn an_sse_event_keeps_every_line_of_its_message_in_data() {
        assert_eq!(
            &sse_event("{\n\"a\":1}")[..],
            b"event: message\ndata: {\ndata: \"a\":1}\n\n"
        );
        assert_eq!(
            kind_of("sampling/createMessage"),
            Some(ClientRequest::Sampling)
        );
        assert_eq!(kind_of("ping"), None);
    }
}
