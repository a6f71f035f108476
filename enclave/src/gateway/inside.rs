//! What the gateway does with the enclave itself, one job at a time with the host's requests
//! (in place on the calling task's thread when the handler is free, on the handler thread
//! otherwise): authenticate an agent, check an upstream's tools against their pins, decide a
//! call, and write the entries.
//!
//! Each function here is a plain function of the enclave, the inputs and the enclave's time,
//! run through [`crate::server::EnclaveAccess::run`]; it returns its outcome and the `Persist`
//! replies of the entries it wrote. The caller waits for those entries to be durable
//! ([`crate::server::EnclaveAccess::durable`]) before it acts on the outcome: before it
//! forwards an allowed call, and before it answers the agent with a call's result.
//!
//! The decisions are the verifier's: hard rules and Cedar through
//! [`State::decide`](attestplane_verifier::state::State::decide) (the same function
//! `attestplane-verify log` replays), pins through
//! `attestplane_verifier::gateway::pin::check_tools`.

use std::collections::BTreeMap;

use attestplane_proto::Response;
use attestplane_verifier::UnixMillis;
use attestplane_verifier::admin::Digest32;
use attestplane_verifier::entry::{DriftRecord, Event, PiiRecord, PrincipalRecord};
use attestplane_verifier::gateway::pin::{Drift, check_tools};
use attestplane_verifier::gateway::receipt::{ReceiptClaims, encode_receipt};
use attestplane_verifier::policy::{Action, PiiAction};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::value::RawValue;

use crate::identity::Audience;
use crate::service::Enclave;

/// Replies to route (the `Persist` of what was written).
pub type Replies = Vec<(u64, Response)>;

/// How long a receipt lives: long enough for the forward, short enough that a captured one is
/// soon worthless (servers also keep a replay cache).
pub const RECEIPT_LIFETIME_SECS: u64 = 60;

/// Ids of the `Persist` replies the gateway's entries travel under: far from any id a host
/// uses for its requests (the host stores a `Persist` under any id).
pub const GATEWAY_ID_BASE: u64 = 1 << 62;

/// Why the gateway refuses a request before deciding it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// The bearer token is missing or not valid for this endpoint (HTTP 401).
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// No such server is registered (HTTP 404).
    #[error("unknown server {0:?}")]
    UnknownServer(String),
    /// The enclave is not serving (boot not finished or broken log) (HTTP 503).
    #[error("the control plane is not ready")]
    NotReady,
    /// The call's arguments cannot be read by the policy (not an object) (JSON-RPC invalid
    /// params; nothing is logged).
    #[error("bad arguments: {0}")]
    BadArguments(String),
    /// The enclave could not write an entry (HTTP 500). An entry the writer refuses (over the
    /// entry size limit) is refused before it is chained: nothing is written and the enclave
    /// serves on. An entry chained but not applied stops the enclave serving.
    #[error("the log could not be written: {0}")]
    Log(String),
}

/// The identity an agent's token proves, for `audience`.
pub fn authenticate(
    enclave: &mut Enclave,
    bearer: &str,
    audience: &str,
    now: UnixMillis,
) -> Result<PrincipalRecord, Refusal> {
    enclave
        .authenticate_for(bearer, Audience::Resource(audience), now)
        .map_err(|e| Refusal::Unauthenticated(e.to_string()))
}

/// Where a registered server is: its `endpoint` (what the host dials) and its resource URI
/// (whose path is the MCP endpoint's).
pub fn endpoint_url(enclave: &Enclave, server: &str) -> Result<(String, String), Refusal> {
    enclave
        .state()
        .server(server)
        .map(|s| (s.spec.endpoint.clone(), s.spec.resource.clone()))
        .ok_or_else(|| Refusal::UnknownServer(server.to_owned()))
}

/// The outcome of checking a listing.
#[derive(Clone, Debug, Default)]
pub struct Listing {
    /// Positions (in the listing) of the tools this agent is shown: pinned, unchanged, and
    /// permitted by the policy.
    pub shown: Vec<usize>,
    /// Each kept tool's name and pinned digest (what a call is checked against).
    pub kept: BTreeMap<String, Digest32>,
    /// The sequence number of the drift entry written for this listing, if any.
    pub drift_seq: Option<u64>,
}

/// Checks an upstream's listing (all pages' tools, in order) against the server's pins, logs
/// new drift (`known_drift` is what was already logged for this server: the same drift is not
/// logged twice in a row), and filters the kept tools by the policy for `principal`.
pub fn check_listing(
    enclave: &mut Enclave,
    now: UnixMillis,
    id: u64,
    principal: &PrincipalRecord,
    server: &str,
    listed: &[Box<RawValue>],
    known_drift: &mut Vec<DriftRecord>,
) -> Result<(Listing, Replies), Refusal> {
    if !enclave.serving() {
        return Err(Refusal::NotReady);
    }
    let now = enclave.entry_time(now);
    let Some(spec) = enclave.state().server(server).map(|s| s.spec.clone()) else {
        return Err(Refusal::UnknownServer(server.to_owned()));
    };
    let refs: Vec<&RawValue> = listed.iter().map(|b| b.as_ref()).collect();
    let mut listing = Listing::default();
    let mut replies = Vec::new();
    let (kept, drift): (Vec<(usize, String, Digest32)>, Vec<DriftRecord>) =
        match check_tools(&refs, &spec.tools) {
            Ok(check) => (
                check
                    .kept()
                    .iter()
                    .map(|k| (k.index, k.name.clone(), k.digest))
                    .collect(),
                check.drift().iter().map(drift_record).collect(),
            ),
            // A listing the check cannot read at all (too many tools): nothing is kept.
            Err(e) => (
                Vec::new(),
                vec![DriftRecord {
                    kind: "invalid".into(),
                    name: e.to_string(),
                    pinned: None,
                    found: None,
                }],
            ),
        };
    if !drift.is_empty() && drift != *known_drift {
        let event = Event::ToolDrift {
            server: server.to_owned(),
            drift: drift.clone(),
        };
        let (seq, r) = enclave
            .write_for_gateway(id, event, now)
            .map_err(Refusal::Log)?;
        listing.drift_seq = Some(seq);
        replies.extend(r);
    }
    *known_drift = drift;
    for (index, name, digest) in kept {
        let decision = enclave
            .state()
            .decide(principal, Action::Call, server, Some(&name), now);
        if decision.allowed {
            listing.shown.push(index);
        }
        listing.kept.insert(name, digest);
    }
    Ok((listing, replies))
}

fn drift_record(d: &Drift) -> DriftRecord {
    let (name, pinned, found) = match d {
        Drift::Changed {
            name,
            pinned,
            found,
        } => (name.clone(), Some(pinned.0), Some(found.0)),
        Drift::Renamed { to, found, .. } => (to.clone(), None, Some(found.0)),
        Drift::Unpinned { name, found } => (name.clone(), None, Some(found.0)),
        Drift::Missing { name, pinned } => (name.clone(), Some(pinned.0), None),
        Drift::Duplicate { name, .. } => (name.clone(), None, None),
        Drift::Invalid { index, .. } => (format!("#{index}"), None, None),
        _ => (String::new(), None, None),
    };
    DriftRecord {
        kind: d.kind().to_owned(),
        name,
        pinned,
        found,
    }
}

/// What the gateway knows of a call's arguments before deciding it, computed off the handler
/// thread: the PII scan and both forms the arguments may be forwarded in.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct CallArguments {
    /// The arguments with every PII finding redacted (`None`: the call has none). What
    /// policies see.
    pub redacted: Option<String>,
    /// The receipt hash of the arguments as the agent sent them.
    pub sent_digest: [u8; 32],
    /// The receipt hash of the redacted arguments.
    pub redacted_digest: [u8; 32],
    /// PII findings in the arguments as sent, by kind.
    pub pii: BTreeMap<String, u64>,
}

impl std::fmt::Debug for CallArguments {
    /// Lengths and counts only: arguments may carry secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallArguments")
            .field("redacted_len", &self.redacted.as_ref().map(String::len))
            .field("pii", &self.pii)
            .finish_non_exhaustive()
    }
}

/// What the gateway does with a call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallVerdict {
    /// Forward it, with `receipt`, once entry `seq` is durable.
    Allowed {
        /// The decision entry.
        seq: u64,
        /// The receipt the server checks (a compact JWS by the epoch key).
        receipt: String,
        /// The call's PII rule: under `redact` the redacted arguments are forwarded (the
        /// receipt's hash is theirs), and the result is treated by the same rule.
        pii: PiiAction,
    },
    /// Refuse it; the refusal is entry `seq`.
    Denied {
        /// The decision entry.
        seq: u64,
        /// Why (derived from the logged decision).
        reason: String,
    },
    /// Refuse it without a decision entry: the tool's live definition is not its pinned one
    /// (the drift is logged by [`check_listing`]).
    Withheld,
}

/// What a gated request is about: the action, the JSON-RPC method (the receipt's `mth`), the
/// item (tool name, resource URI, prompt name: the receipt's `tool`), and the pinned digest the
/// item is checked against (tools only; resources and prompts are not pinned and carry zeroes).
#[derive(Clone, Copy, Debug)]
pub struct Gated<'a> {
    /// `call`, `read_resource` or `get_prompt`.
    pub action: Action,
    /// `tools/call`, `resources/read` or `prompts/get`.
    pub method: &'a str,
    /// The tool's name, the resource's URI, or the prompt's name.
    pub item: &'a str,
}

/// Decides a `tools/call` of `tool` on `server` for `principal` and writes the decision entry.
/// `live` is the tool's pinned digest if the upstream's current listing still matches its pin
/// (from [`check_listing`]), `None` if the tool is withheld; `args` is what the gateway
/// found in the call's arguments. Arguments the policy cannot read (not an object) are
/// refused before anything is written.
#[allow(clippy::too_many_arguments)]
pub fn decide_call(
    enclave: &mut Enclave,
    now: UnixMillis,
    id: u64,
    principal: &PrincipalRecord,
    server: &str,
    tool: &str,
    live: Option<Digest32>,
    args: &CallArguments,
) -> Result<(CallVerdict, Replies), Refusal> {
    if !enclave.serving() {
        return Err(Refusal::NotReady);
    }
    if enclave.state().server(server).is_none() {
        return Err(Refusal::UnknownServer(server.to_owned()));
    }
    let Some(pinned) = live else {
        return Ok((CallVerdict::Withheld, Vec::new()));
    };
    let gated = Gated {
        action: Action::Call,
        method: "tools/call",
        item: tool,
    };
    decide_gated(enclave, now, id, principal, server, gated, pinned.0, args)
}

/// Decides a gated request (a tool call with its pinned `definition`, a resource read or a
/// prompt get with zeroes) and writes the decision entry; an allowed one gets its receipt.
#[allow(clippy::too_many_arguments)]
pub fn decide_gated(
    enclave: &mut Enclave,
    now: UnixMillis,
    id: u64,
    principal: &PrincipalRecord,
    server: &str,
    gated: Gated<'_>,
    definition: [u8; 32],
    args: &CallArguments,
) -> Result<(CallVerdict, Replies), Refusal> {
    decide_gated_with(
        enclave,
        now,
        id,
        principal,
        server,
        gated,
        definition,
        args,
        sign_receipt,
    )
}

/// Signs `claims` with the epoch key (the receipt's `kid` is the key's): how
/// [`decide_gated`] makes receipts.
pub fn sign_receipt(enclave: &Enclave, claims: &ReceiptClaims) -> Result<String, Refusal> {
    let Some((key, kid)) = enclave.epoch_signer() else {
        return Err(Refusal::NotReady);
    };
    encode_receipt(claims, &kid, key).map_err(|e| Refusal::Log(format!("receipt: {e}")))
}

/// [`decide_gated`] with the receipt signed by `sign` ([`sign_receipt`] there; a parameter so
/// that a signer's failure can be tried). An allowed request's receipt is made (its jti
/// drawn, its claims signed) before the decision entry is written, naming the sequence number
/// and time the entry will have: a receipt that cannot be made leaves no entry at all (never
/// a decision whose `Persist` was dropped), and a write that fails leaves a receipt no one
/// sees.
#[allow(clippy::too_many_arguments)]
pub fn decide_gated_with(
    enclave: &mut Enclave,
    now: UnixMillis,
    id: u64,
    principal: &PrincipalRecord,
    server: &str,
    gated: Gated<'_>,
    definition: [u8; 32],
    args: &CallArguments,
    sign: impl FnOnce(&Enclave, &ReceiptClaims) -> Result<String, Refusal>,
) -> Result<(CallVerdict, Replies), Refusal> {
    if !enclave.serving() {
        return Err(Refusal::NotReady);
    }
    let now = enclave.entry_time(now);
    let Some(audience) = enclave
        .state()
        .server(server)
        .map(|s| s.spec.resource.clone())
    else {
        return Err(Refusal::UnknownServer(server.to_owned()));
    };
    let mut record = enclave
        .state()
        .decide_gated(
            principal,
            gated.action,
            server,
            gated.item,
            definition,
            args.redacted.as_deref(),
            &args.pii,
            now,
        )
        .map_err(Refusal::BadArguments)?;
    let rule = record
        .call
        .as_ref()
        .and_then(|c| PiiAction::parse(&c.pii.action))
        .unwrap_or(PiiAction::DEFAULT);
    // The hash of the arguments as they will be forwarded: redacted unless the rule allows
    // PII through (a refused call is not forwarded; its record names what was sent).
    let digest = match rule {
        PiiAction::Allow | PiiAction::Refuse => args.sent_digest,
        PiiAction::Redact => args.redacted_digest,
    };
    if let Some(c) = record.call.as_mut() {
        c.args = digest;
    }
    let allowed = record.allowed;
    let reason = record
        .reason
        .as_ref()
        .map_or_else(|| "denied by policy".to_owned(), ToString::to_string);
    // The receipt, before anything is written: the entry's sequence number is the log's size
    // and its time `now` (the writer assigns exactly these; checked below).
    let made = if allowed {
        let seq = enclave.next_seq().ok_or(Refusal::NotReady)?;
        let jti = hex::encode(enclave.random(16).map_err(Refusal::Log)?);
        let claims = ReceiptClaims {
            iss: enclave.issuer().to_owned(),
            aud: audience,
            sub: principal.agent.clone(),
            usr: principal.user.clone(),
            ten: principal.tenant.clone(),
            mth: gated.method.to_owned(),
            tool: gated.item.to_owned(),
            args: URL_SAFE_NO_PAD.encode(digest),
            def: URL_SAFE_NO_PAD.encode(definition),
            jti,
            iat: now.as_secs(),
            exp: now.as_secs().saturating_add(RECEIPT_LIFETIME_SECS),
            seq,
        };
        Some((seq, sign(enclave, &claims)?))
    } else {
        None
    };
    let event = Event::Decision(Box::new(record));
    let Some((seq, receipt)) = made else {
        let (seq, replies) = enclave
            .write_for_gateway(id, event, now)
            .map_err(Refusal::Log)?;
        return Ok((CallVerdict::Denied { seq, reason }, replies));
    };
    // Written only as the entry the receipt names (`seq`), or not at all.
    let replies = enclave
        .write_for_gateway_as(id, event, now, seq)
        .map_err(Refusal::Log)?;
    Ok((
        CallVerdict::Allowed {
            seq,
            receipt,
            pii: rule,
        },
        replies,
    ))
}

/// Which of `items` (a listing's items, each named by `names`: resource URIs, template URIs,
/// prompt names) `principal` is shown: those on which `action` is allowed in the listing
/// context (no argument, no finding), as tools are. Nothing is written.
pub fn filter_items(
    enclave: &Enclave,
    now: UnixMillis,
    principal: &PrincipalRecord,
    server: &str,
    action: Action,
    names: &[Option<String>],
) -> Result<Vec<bool>, Refusal> {
    if !enclave.serving() {
        return Err(Refusal::NotReady);
    }
    if enclave.state().server(server).is_none() {
        return Err(Refusal::UnknownServer(server.to_owned()));
    }
    Ok(names
        .iter()
        .map(|name| {
            name.as_deref().is_some_and(|n| {
                enclave
                    .state()
                    .decide(principal, action, server, Some(n), now)
                    .allowed
            })
        })
        .collect())
}

/// Writes how call `call` ended: `outcome` is `ok`, `error`, `withheld` (the result carried
/// PII and the rule refuses it) or `aborted`, `result` the hash of the answer the agent
/// receives, `pii` what the result carried and the rule applied.
pub fn record_result(
    enclave: &mut Enclave,
    now: UnixMillis,
    id: u64,
    call: u64,
    outcome: &str,
    result: [u8; 32],
    pii: PiiRecord,
) -> Result<(u64, Replies), Refusal> {
    enclave
        .write_for_gateway(
            id,
            Event::CallResult {
                call,
                outcome: outcome.to_owned(),
                result,
                pii,
            },
            now,
        )
        .map_err(Refusal::Log)
}
