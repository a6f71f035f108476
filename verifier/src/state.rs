//! The state fold: the control plane's state is a pure function of its log.
//!
//! Registry (servers, expected PCRs, pinned tools), policy, identity providers, admin keys,
//! recent admin nonces and call counters are all derived by applying entries in order with
//! [`State::apply`]. The enclave uses the same code live — it computes an event with the query
//! functions here ([`State::check_admin`], [`State::check_attestation`], [`State::decide`],
//! [`State::discover`]), writes it as an entry and then applies that entry — and at boot it
//! applies the stored log. So the state after a restart is the state before it, by
//! construction, and an auditor who replays the log with this module re-checks every decision:
//!
//! - an admin change logged as accepted must carry a valid signature by a key that was an
//!   admin key at that point, be fresh at the entry's time, not reuse a nonce, and apply;
//! - a server attestation logged as verified must verify again, at the entry's time, against
//!   the registration in force (root, PCRs, nonce, debug rule);
//! - a decision must be the decision this state and policy give at the entry's time, with the
//!   same attestation facts, counters, determining policies, and handle scope.
//!
//! A mismatch is a [`StateError`] naming the entry. Time comes only from entries.
//!
//! ## Re-checked and trusted application
//!
//! [`State::apply`] takes a [`VerifiedEntry`], which only the log verifier makes, so bytes that
//! failed signature, link or epoch checks never reach the fold; [`crate::replay::Replay`] runs
//! the two together. The one other way in is [`State::apply_own`], for the entry the enclave
//! has just decided and signed itself.
//!
//! [`State::apply`] re-checks everything above ([`ApplyMode::Recheck`]). [`State::apply_with`]
//! in [`ApplyMode::Trusted`] takes the logged decisions and discoveries as made: it does not
//! evaluate them again, and applies only what they change (an allowed `call` counts against
//! the agent's call window). Everything else — genesis, admin requests (signature, freshness,
//! nonce, schema validation), attestations (the document verified again) — is checked as in
//! `Recheck`. The state change of an entry is the same in both modes whenever `Recheck`
//! accepts it; the modes differ only in what they refuse. `Trusted` is for entries whose
//! decisions were made by this very code on this very state: the enclave applying the entry it
//! has just decided and signed, and the enclave's boot replay of an epoch written by its own
//! measured image (see the enclave's `service` module). An auditor, and a replay of an epoch
//! written by any other image, use `Recheck`.
//!
//! ## What it does not do
//!
//! It does not authenticate agents (their bearer tokens are secrets and are never logged; the
//! log records the verified identity) and it does not check signatures or links between
//! entries ([`crate::log`] does). Spend counters are carried but nothing increments them yet.

use std::collections::{BTreeMap, VecDeque};

use ciborium::value::Value;
use ed25519_dalek::VerifyingKey;
use serde::Serialize;
use sha2::{Digest, Sha384};
use thiserror::Error;

use crate::admin::{AdminAction, IdentityProviderSpec, ServerSpec, SignedAdminRequest};
use crate::attestation::{AttestationVerifier, Expectations, Pcr, PcrIndex, TrustAnchor, VerifyAt};
use crate::cbor::{self, uint};
use crate::entry::{
    AttestationFactsRecord, AttestationRecord, DecisionRecord, Entry, Event, HandleRecord,
    PrincipalRecord,
};
use crate::handle::Jwks;
use crate::log::VerifiedEntry;
use crate::policy::{
    Action, AttestationFacts, Counters, DecisionRequest, PolicyEngine, Principal, ServerFacts,
};
use crate::time::UnixMillis;

/// Window over which `calls_last_minute` counts.
pub const CALL_WINDOW_MS: u64 = 60_000;

/// How long a handle lives.
pub const HANDLE_TTL_SECS: u64 = 300;

/// How old a server's attestation document may be when it is presented.
pub const ATTESTATION_FRESHNESS_MS: u64 = 5 * 60 * 1000;

/// The most servers the registry holds.
pub const MAX_SERVERS: usize = 10_000;

/// The most identity providers.
pub const MAX_IDENTITY_PROVIDERS: usize = 64;

/// The most images `allow_image` admin acts may allow in one log.
pub const MAX_ALLOWED_IMAGES: usize = 256;

/// The reason [`State::decide`] gives when the server is not registered.
pub const REASON_UNKNOWN_SERVER: &str = "unknown server";

/// The reason [`State::decide`] gives for a `call` of a tool the registration does not pin.
pub const REASON_TOOL_NOT_PINNED: &str = "tool is not pinned in the registration";

/// SHA-384 over the deterministic CBOR map `{index: value}` of the given PCRs: the
/// "measurement" a handle and an attestation entry name.
pub fn measurement_digest(pcrs: &BTreeMap<PcrIndex, Pcr>) -> [u8; 48] {
    let value = Value::Map(
        pcrs.iter()
            .map(|(i, p)| {
                (
                    uint(u64::from(i.get())),
                    Value::Bytes(p.as_bytes().to_vec()),
                )
            })
            .collect(),
    );
    // A map of integers to byte strings always encodes.
    let bytes = cbor::encode(&value).unwrap_or_default();
    Sha384::digest(bytes).into()
}

/// A server's last successful attestation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Attested {
    /// When it was verified (the entry's time).
    pub at: UnixMillis,
    /// Digest of the registered PCRs as the document carried them.
    #[serde(serialize_with = "hex48")]
    pub measurement: [u8; 48],
    /// Whether the document came from a debug-mode enclave.
    pub debug: bool,
}

fn hex48<S: serde::Serializer>(m: &[u8; 48], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode(m))
}

/// A registered server and its attestation status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServerState {
    /// Its registration.
    pub spec: ServerSpec,
    /// Its last verified attestation, cleared by a failed one or a new registration.
    pub attested: Option<Attested>,
}

/// An admin request that checked out, ready to apply.
#[derive(Debug)]
pub struct PreparedAdmin {
    signed: SignedAdminRequest,
    policy: Option<PolicyEngine>,
    jwks: Option<Jwks>,
    keys: Option<Vec<VerifyingKey>>,
}

impl PreparedAdmin {
    /// The request.
    pub fn request(&self) -> &SignedAdminRequest {
        &self.signed
    }
}

/// How [`State::apply_with`] treats a logged decision or discovery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApplyMode {
    /// Evaluate it again against the state and refuse the entry unless the logged outcome is
    /// the one the state gives: what an auditor does.
    Recheck,
    /// Take it as logged, without evaluating the policy again: only for decisions this code
    /// made on this state (see the module documentation).
    Trusted,
}

/// A comparable summary of the state (for "the state after replay equals the state before").
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Snapshot {
    /// Admin keys, hex.
    pub admin_keys: Vec<String>,
    /// Servers by id.
    pub servers: BTreeMap<String, ServerState>,
    /// Policy text.
    pub policy: String,
    /// Identity providers by issuer.
    pub identity_providers: BTreeMap<String, IdentityProviderSpec>,
    /// Admin nonces still inside the replay window.
    pub admin_nonces: usize,
    /// Calls in the current window, by agent.
    pub calls: BTreeMap<String, usize>,
    /// The times (Unix milliseconds) of those calls, by agent.
    pub call_times: BTreeMap<String, Vec<u64>>,
    /// The admin nonces still remembered, with their request times.
    pub admin_nonce_times: BTreeMap<String, u64>,
    /// Images allowed by `allow_image` admin acts, in order, as `{"PCRn": hex}`.
    pub allowed_images: Vec<BTreeMap<String, String>>,
    /// Entries applied.
    pub applied: u64,
}

/// The control plane's state.
pub struct State {
    admin_keys: Vec<VerifyingKey>,
    servers: BTreeMap<String, ServerState>,
    policy: PolicyEngine,
    providers: BTreeMap<String, (IdentityProviderSpec, Jwks)>,
    admin_nonces: BTreeMap<[u8; 16], UnixMillis>,
    calls: BTreeMap<String, VecDeque<UnixMillis>>,
    server_attestation: AttestationVerifier,
    applied: u64,
    identity_generation: u64,
    allowed_images: Vec<BTreeMap<PcrIndex, Pcr>>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("admin_keys", &self.admin_keys.len())
            .field("servers", &self.servers.len())
            .field("policies", &self.policy.policy_count())
            .field("applied", &self.applied)
            .finish_non_exhaustive()
    }
}

/// A logged event that this state contradicts: proof the log was not produced by a correct
/// control plane (or was forged).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum StateError {
    /// A genesis entry anywhere but at seq 1, or a second one.
    #[error("entry {seq}: genesis must be entry 1 and occur once")]
    GenesisOutOfPlace {
        /// Position.
        seq: u64,
    },
    /// The genesis key set is empty, too large, or holds an unusable key.
    #[error("entry {seq}: genesis admin keys are unusable")]
    BadGenesis {
        /// Position.
        seq: u64,
    },
    /// An admin change logged as accepted does not check out.
    #[error("entry {seq}: admin request logged as accepted is invalid: {reason}")]
    ForgedAdmin {
        /// Position.
        seq: u64,
        /// Why.
        reason: String,
    },
    /// An attestation logged as verified does not verify.
    #[error("entry {seq}: attestation logged as verified does not verify: {reason}")]
    AttestationMismatch {
        /// Position.
        seq: u64,
        /// Why.
        reason: String,
    },
    /// A decision differs from the one the state gives.
    #[error("entry {seq}: logged decision differs from replay in {field}")]
    DecisionMismatch {
        /// Position.
        seq: u64,
        /// The first differing field.
        field: &'static str,
    },
    /// A call result that names no earlier entry, or an outcome outside `ok`, `error`,
    /// `aborted`.
    #[error("entry {seq}: call result is malformed")]
    BadCallResult {
        /// Position.
        seq: u64,
    },
}

impl StateError {
    /// The entry concerned.
    pub fn seq(&self) -> u64 {
        match self {
            StateError::GenesisOutOfPlace { seq }
            | StateError::BadGenesis { seq }
            | StateError::ForgedAdmin { seq, .. }
            | StateError::AttestationMismatch { seq, .. }
            | StateError::DecisionMismatch { seq, .. }
            | StateError::BadCallResult { seq } => *seq,
        }
    }
}

fn principal_of(p: &PrincipalRecord) -> Principal {
    Principal {
        agent: p.agent.clone(),
        user: p.user.clone(),
        tenant: p.tenant.clone(),
        roles: p.roles.clone(),
        issuer: p.issuer.clone(),
    }
}

impl State {
    /// The empty state, before genesis. `server_anchor` is the root MCP servers' attestation
    /// documents must chain to (AWS's in production, the mock's locally).
    pub fn new(server_anchor: TrustAnchor) -> Self {
        Self {
            admin_keys: Vec::new(),
            servers: BTreeMap::new(),
            policy: PolicyEngine::deny_all(),
            providers: BTreeMap::new(),
            admin_nonces: BTreeMap::new(),
            calls: BTreeMap::new(),
            server_attestation: AttestationVerifier::new(server_anchor),
            applied: 0,
            identity_generation: 0,
            allowed_images: Vec::new(),
        }
    }

    /// Whether genesis happened.
    pub fn has_genesis(&self) -> bool {
        !self.admin_keys.is_empty()
    }

    /// A registered server.
    pub fn server(&self, id: &str) -> Option<&ServerState> {
        self.servers.get(id)
    }

    /// All registered servers.
    pub fn servers(&self) -> impl Iterator<Item = &ServerState> {
        self.servers.values()
    }

    /// The issuers of the installed identity providers, sorted.
    pub fn identity_issuers(&self) -> Vec<String> {
        self.providers.keys().cloned().collect()
    }

    /// The identity provider for `issuer`.
    pub fn identity_provider(&self, issuer: &str) -> Option<(&IdentityProviderSpec, &Jwks)> {
        self.providers.get(issuer).map(|(s, j)| (s, j))
    }

    /// A number that changes whenever the identity providers change (one is installed,
    /// replaced or removed): what was verified against the providers of one generation need
    /// not hold for the next.
    pub fn identity_generation(&self) -> u64 {
        self.identity_generation
    }

    /// The policy engine in force.
    pub fn policy(&self) -> &PolicyEngine {
        &self.policy
    }

    /// Entries applied so far.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// A comparable summary.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            admin_keys: self
                .admin_keys
                .iter()
                .map(|k| hex::encode(k.as_bytes()))
                .collect(),
            servers: self.servers.clone(),
            policy: self.policy.text().to_string(),
            identity_providers: self
                .providers
                .iter()
                .map(|(k, (s, _))| (k.clone(), s.clone()))
                .collect(),
            admin_nonces: self.admin_nonces.len(),
            calls: self
                .calls
                .iter()
                .map(|(k, v)| (k.clone(), v.len()))
                .collect(),
            call_times: self
                .calls
                .iter()
                .map(|(k, v)| (k.clone(), v.iter().map(|t| t.as_millis()).collect()))
                .collect(),
            admin_nonce_times: self
                .admin_nonces
                .iter()
                .map(|(n, t)| (hex::encode(n), t.as_millis()))
                .collect(),
            allowed_images: self
                .allowed_images
                .iter()
                .map(|image| {
                    image
                        .iter()
                        .map(|(i, p)| (format!("PCR{}", i.get()), p.to_hex()))
                        .collect()
                })
                .collect(),
            applied: self.applied,
        }
    }

    /// Whether an `allow_image` admin act applied so far allows an epoch whose attestation
    /// document carries `pcrs` (every PCR the act names, with its value).
    pub fn image_allowed(&self, pcrs: &BTreeMap<PcrIndex, Pcr>) -> bool {
        self.allowed_images
            .iter()
            .any(|image| crate::log::image_matches(image, pcrs))
    }

    /// Checks a signed admin request at `now` without applying it: signature by a current
    /// admin key, freshness, nonce not seen, and that the action applies (ids exist or not,
    /// policy validates against the schema, JWKS parses, keys are usable).
    pub fn check_admin(&self, bytes: &[u8], now: UnixMillis) -> Result<PreparedAdmin, String> {
        let signed = SignedAdminRequest::decode(bytes).map_err(|e| e.to_string())?;
        signed.verify(&self.admin_keys).map_err(|e| e.to_string())?;
        if !signed.is_fresh_at(now) {
            return Err(format!(
                "request time {} is outside the window around {now}",
                signed.request().time
            ));
        }
        if self.admin_nonces.contains_key(&signed.request().nonce) {
            return Err("replayed request: nonce already used".into());
        }
        let mut prepared = PreparedAdmin {
            signed,
            policy: None,
            jwks: None,
            keys: None,
        };
        match &prepared.signed.request().action {
            AdminAction::RegisterServer(s) => {
                if self.servers.contains_key(&s.id) {
                    return Err(format!("server {:?} is already registered", s.id));
                }
                if self.servers.len() >= MAX_SERVERS {
                    return Err("the registry is full".into());
                }
            }
            AdminAction::UpdateServer(s) => {
                if !self.servers.contains_key(&s.id) {
                    return Err(format!("server {:?} is not registered", s.id));
                }
            }
            AdminAction::RevokeServer { id } => {
                if !self.servers.contains_key(id) {
                    return Err(format!("server {id:?} is not registered"));
                }
            }
            AdminAction::SetPolicy { text } => {
                prepared.policy = Some(PolicyEngine::new(text).map_err(|e| e.to_string())?);
            }
            AdminAction::SetIdentityProvider(p) => {
                let jwks = Jwks::parse(p.jwks.as_bytes()).map_err(|e| e.to_string())?;
                if jwks.is_empty() {
                    return Err("identity provider JWKS holds no usable Ed25519 key".into());
                }
                if !self.providers.contains_key(&p.issuer)
                    && self.providers.len() >= MAX_IDENTITY_PROVIDERS
                {
                    return Err("too many identity providers".into());
                }
                prepared.jwks = Some(jwks);
            }
            AdminAction::RemoveIdentityProvider { issuer } => {
                if !self.providers.contains_key(issuer) {
                    return Err(format!("no identity provider {issuer:?}"));
                }
            }
            AdminAction::RotateAdminKeys { keys } => {
                prepared.keys = Some(parse_admin_keys(keys).ok_or("unusable admin key")?);
            }
            AdminAction::AllowImage { pcrs } => {
                let image: BTreeMap<PcrIndex, Pcr> = pcrs.iter().map(|(i, p)| (*i, p.0)).collect();
                if self.allowed_images.contains(&image) {
                    return Err("the image is already allowed".into());
                }
                if self.allowed_images.len() >= MAX_ALLOWED_IMAGES {
                    return Err("too many allowed images".into());
                }
            }
        }
        Ok(prepared)
    }

    fn apply_admin(&mut self, prepared: PreparedAdmin) {
        let request = prepared.signed.request();
        let time = request.time;
        self.admin_nonces.insert(request.nonce, time);
        match request.action.clone() {
            AdminAction::RegisterServer(spec) | AdminAction::UpdateServer(spec) => {
                self.servers.insert(
                    spec.id.clone(),
                    ServerState {
                        spec,
                        attested: None,
                    },
                );
            }
            AdminAction::RevokeServer { id } => {
                self.servers.remove(&id);
            }
            AdminAction::SetPolicy { .. } => {
                if let Some(p) = prepared.policy {
                    self.policy = p;
                }
            }
            AdminAction::SetIdentityProvider(spec) => {
                if let Some(jwks) = prepared.jwks {
                    self.providers.insert(spec.issuer.clone(), (spec, jwks));
                    self.identity_generation = self.identity_generation.wrapping_add(1);
                }
            }
            AdminAction::RemoveIdentityProvider { issuer } => {
                self.providers.remove(&issuer);
                self.identity_generation = self.identity_generation.wrapping_add(1);
            }
            AdminAction::RotateAdminKeys { .. } => {
                if let Some(keys) = prepared.keys {
                    self.admin_keys = keys;
                }
            }
            AdminAction::AllowImage { pcrs } => {
                self.allowed_images
                    .push(pcrs.into_iter().map(|(i, p)| (i, p.0)).collect());
            }
        }
    }

    fn prune(&mut self, now: UnixMillis) {
        let horizon = now
            .as_millis()
            .saturating_sub(2 * crate::admin::ADMIN_REQUEST_WINDOW_MS);
        self.admin_nonces.retain(|_, t| t.as_millis() >= horizon);
        let call_horizon = now.as_millis().saturating_sub(CALL_WINDOW_MS);
        self.calls.retain(|_, q| {
            while q.front().is_some_and(|t| t.as_millis() <= call_horizon) {
                q.pop_front();
            }
            !q.is_empty()
        });
    }

    /// Verifies a server's attestation document at `now` against its registration: root,
    /// validity at `now`, the registered PCRs, the nonce the enclave issued, the debug rule,
    /// and freshness.
    pub fn check_attestation(
        &self,
        server: &str,
        nonce: &[u8],
        document: &[u8],
        now: UnixMillis,
    ) -> Result<Attested, String> {
        let s = self
            .servers
            .get(server)
            .ok_or_else(|| format!("server {server:?} is not registered"))?;
        let expect = Expectations {
            pcrs: s.spec.pcrs.iter().map(|(i, p)| (*i, p.0)).collect(),
            allow_debug: s.spec.allow_debug,
            nonce: Some(nonce.to_vec()),
            max_age_ms: Some(ATTESTATION_FRESHNESS_MS),
            ..Expectations::default()
        };
        let doc = self
            .server_attestation
            .verify(document, &expect, VerifyAt::Instant(now))
            .map_err(|e| e.to_string())?;
        let matched: BTreeMap<PcrIndex, Pcr> = expect
            .pcrs
            .keys()
            .filter_map(|i| doc.pcr(*i).map(|p| (*i, *p)))
            .collect();
        Ok(Attested {
            at: now,
            measurement: measurement_digest(&matched),
            debug: doc.is_debug(),
        })
    }

    /// The attestation facts of a server at `now`.
    pub fn attestation_facts(&self, server: &ServerState, now: UnixMillis) -> AttestationFacts {
        match &server.attested {
            None => AttestationFacts {
                verified: false,
                age_ms: None,
                pcr_match: false,
                debug: false,
            },
            Some(a) => {
                let age = now.millis_since(a.at).unwrap_or(0);
                let fresh = age <= server.spec.max_attestation_age_ms;
                AttestationFacts {
                    verified: fresh,
                    age_ms: Some(age),
                    pcr_match: true,
                    debug: a.debug,
                }
            }
        }
    }

    /// The agent's counters at `now`.
    pub fn counters(&self, agent: &str, now: UnixMillis) -> Counters {
        let horizon = now.as_millis().saturating_sub(CALL_WINDOW_MS);
        let calls = self
            .calls
            .get(agent)
            .map_or(0, |q| q.iter().filter(|t| t.as_millis() > horizon).count());
        Counters {
            calls_last_minute: calls as u64,
            spend_micros: 0,
        }
    }

    fn policy_request(
        &self,
        principal: &PrincipalRecord,
        action: Action,
        server: &ServerState,
        tool: Option<&str>,
        now: UnixMillis,
    ) -> DecisionRequest {
        DecisionRequest {
            principal: principal_of(principal),
            action,
            server: ServerFacts {
                id: server.spec.id.clone(),
                name: server.spec.name.clone(),
                tenant: server.spec.tenant.clone(),
                resource: server.spec.resource.clone(),
            },
            tool: tool.map(str::to_string),
            attestation: self.attestation_facts(server, now),
            time: now,
            counters: self.counters(&principal.agent, now),
            call: None,
        }
    }

    /// Decides `resolve` or `call` for `principal` at `now`. Hard rules come first and do not
    /// depend on the policy: the server must exist, belong to the agent's tenant, and (for
    /// resolve and call) hold a fresh verified attestation; a called tool must be pinned. Then
    /// the Cedar policy decides, deny by default. An allowed `resolve` carries the handle's
    /// scope (audience, expiry, the pinned tools the policy lets it call); the enclave fills in
    /// the `jti`.
    pub fn decide(
        &self,
        principal: &PrincipalRecord,
        action: Action,
        server_id: &str,
        tool: Option<&str>,
        now: UnixMillis,
    ) -> DecisionRecord {
        let mut record = DecisionRecord {
            action: action.as_str().to_string(),
            principal: principal.clone(),
            server: server_id.to_string(),
            tool: tool.map(str::to_string),
            attestation: AttestationFactsRecord {
                verified: false,
                age_ms: None,
                pcr_match: false,
                debug: false,
            },
            calls_last_minute: 0,
            spend_micros: 0,
            allowed: false,
            policies: Vec::new(),
            reason: None,
            handle: None,
        };
        let Some(server) = self.servers.get(server_id) else {
            record.reason = Some(REASON_UNKNOWN_SERVER.into());
            return record;
        };
        let req = self.policy_request(principal, action, server, tool, now);
        record.attestation = AttestationFactsRecord {
            verified: req.attestation.verified,
            age_ms: req.attestation.age_ms,
            pcr_match: req.attestation.pcr_match,
            debug: req.attestation.debug,
        };
        record.calls_last_minute = req.counters.calls_last_minute;
        record.spend_micros = req.counters.spend_micros;

        if principal.tenant != server.spec.tenant {
            record.reason = Some("server belongs to another tenant".into());
            return record;
        }
        if matches!(action, Action::Resolve | Action::Call) && !req.attestation.verified {
            record.reason = Some(match &server.attested {
                None => "server has no verified attestation".into(),
                Some(_) => "server attestation is stale".into(),
            });
            return record;
        }
        if action == Action::Call {
            match tool {
                Some(t) if server.spec.tools.contains_key(t) => {}
                _ => {
                    record.reason = Some(REASON_TOOL_NOT_PINNED.into());
                    return record;
                }
            }
        }
        let decision = self.policy.decide(&req);
        record.allowed = decision.allowed;
        record.policies = decision.policies;
        if !decision.allowed {
            record.reason = Some(if !decision.errors.is_empty() {
                "policy evaluation failed (deny)".into()
            } else if record.policies.is_empty() {
                "no policy permits it (deny by default)".into()
            } else {
                format!("forbidden by policy {}", record.policies.join(", "))
            });
            return record;
        }
        if action == Action::Resolve {
            let tools = server
                .spec
                .tools
                .keys()
                .filter(|t| {
                    let call = self.policy_request(principal, Action::Call, server, Some(t), now);
                    self.policy.decide(&call).allowed
                })
                .cloned()
                .collect();
            record.handle = Some(HandleRecord {
                jti: String::new(),
                expires: now.as_secs().saturating_add(HANDLE_TTL_SECS),
                audience: server.spec.resource.clone(),
                tools,
            });
        }
        record
    }

    /// The servers `principal` may discover at `now`: same tenant, and the policy allows
    /// `discover`. Sorted by id.
    pub fn discover(&self, principal: &PrincipalRecord, now: UnixMillis) -> Vec<String> {
        self.servers
            .values()
            .filter(|s| s.spec.tenant == principal.tenant)
            .filter(|s| {
                let req = self.policy_request(principal, Action::Discover, s, None, now);
                self.policy.decide(&req).allowed
            })
            .map(|s| s.spec.id.clone())
            .collect()
    }

    /// Applies an entry the log verifier accepted to the state, re-checking every logged
    /// decision ([`ApplyMode::Recheck`]). Entries come in order, each once; [`crate::replay`]
    /// drives this together with the log verifier.
    pub fn apply(&mut self, entry: &VerifiedEntry) -> Result<(), StateError> {
        self.fold(entry.seq(), entry.entry(), ApplyMode::Recheck)
    }

    /// Applies an entry the log verifier accepted in `mode`. With [`ApplyMode::Trusted`], a
    /// logged decision or discovery is not evaluated again; the state changes exactly as
    /// [`ApplyMode::Recheck`] would change it for an entry that `Recheck` accepts.
    pub fn apply_with(&mut self, entry: &VerifiedEntry, mode: ApplyMode) -> Result<(), StateError> {
        self.fold(entry.seq(), entry.entry(), mode)
    }

    /// Applies an entry its author has just decided and signed itself (the enclave, live):
    /// there are no bytes from outside to verify, and the decisions are the ones this code has
    /// just made on this state, so they are taken as made ([`ApplyMode::Trusted`]). Never for
    /// an entry read back from storage or received from anyone: those go through the log
    /// verifier and [`State::apply`].
    pub fn apply_own(&mut self, seq: u64, entry: &Entry) -> Result<(), StateError> {
        self.fold(seq, entry, ApplyMode::Trusted)
    }

    fn fold(&mut self, seq: u64, entry: &Entry, mode: ApplyMode) -> Result<(), StateError> {
        let now = entry.time;
        self.prune(now);
        match &entry.event {
            Event::EpochStart { .. } | Event::Checkpoint { .. } | Event::ToolDrift { .. } => {}
            Event::CallResult { call, outcome, .. } => {
                if *call >= seq || !matches!(outcome.as_str(), "ok" | "error" | "aborted") {
                    return Err(StateError::BadCallResult { seq });
                }
            }
            Event::Genesis { admin_keys } => {
                if seq != 1 || self.has_genesis() {
                    return Err(StateError::GenesisOutOfPlace { seq });
                }
                self.admin_keys =
                    parse_admin_keys(admin_keys).ok_or(StateError::BadGenesis { seq })?;
            }
            Event::Admin {
                request, accepted, ..
            } => {
                if *accepted {
                    let prepared = self
                        .check_admin(request, now)
                        .map_err(|reason| StateError::ForgedAdmin { seq, reason })?;
                    self.apply_admin(prepared);
                }
            }
            Event::Attestation(rec) => self.apply_attestation(seq, rec, now)?,
            Event::Decision(rec) => {
                let action = match rec.action.as_str() {
                    "resolve" => Action::Resolve,
                    "call" => Action::Call,
                    _ => {
                        return Err(StateError::DecisionMismatch {
                            seq,
                            field: "action",
                        });
                    }
                };
                if mode == ApplyMode::Recheck {
                    let replayed = self.decide(
                        &rec.principal,
                        action,
                        &rec.server,
                        rec.tool.as_deref(),
                        now,
                    );
                    compare_decision(seq, rec, &replayed)?;
                }
                if action == Action::Call && rec.allowed {
                    self.calls
                        .entry(rec.principal.agent.clone())
                        .or_default()
                        .push_back(now);
                }
            }
            Event::Discovery { principal, servers } => {
                if mode == ApplyMode::Recheck && *servers != self.discover(principal, now) {
                    return Err(StateError::DecisionMismatch {
                        seq,
                        field: "servers",
                    });
                }
            }
        }
        self.applied = self.applied.saturating_add(1);
        Ok(())
    }

    fn apply_attestation(
        &mut self,
        seq: u64,
        rec: &AttestationRecord,
        now: UnixMillis,
    ) -> Result<(), StateError> {
        if rec.verified {
            let attested = self
                .check_attestation(&rec.server, &rec.nonce, &rec.document, now)
                .map_err(|reason| StateError::AttestationMismatch { seq, reason })?;
            if rec.measurement != Some(attested.measurement) {
                return Err(StateError::AttestationMismatch {
                    seq,
                    reason: "logged measurement differs from the document's".into(),
                });
            }
            if let Some(s) = self.servers.get_mut(&rec.server) {
                s.attested = Some(attested);
            }
        } else if let Some(s) = self.servers.get_mut(&rec.server) {
            // A failed attestation withdraws the previous one: the server may have changed.
            s.attested = None;
        }
        Ok(())
    }
}

fn parse_admin_keys(keys: &[[u8; 32]]) -> Option<Vec<VerifyingKey>> {
    if keys.is_empty() || keys.len() > crate::admin::MAX_ADMIN_KEYS {
        return None;
    }
    keys.iter()
        .map(|k| VerifyingKey::from_bytes(k).ok().filter(|k| !k.is_weak()))
        .collect()
}

fn compare_decision(
    seq: u64,
    logged: &DecisionRecord,
    replayed: &DecisionRecord,
) -> Result<(), StateError> {
    let mismatch = |field| Err(StateError::DecisionMismatch { seq, field });
    if logged.allowed != replayed.allowed {
        return mismatch("allowed");
    }
    if logged.policies != replayed.policies {
        return mismatch("policies");
    }
    if logged.attestation != replayed.attestation {
        return mismatch("attestation facts");
    }
    if logged.calls_last_minute != replayed.calls_last_minute
        || logged.spend_micros != replayed.spend_micros
    {
        return mismatch("counters");
    }
    if logged.reason != replayed.reason {
        return mismatch("reason");
    }
    match (&logged.handle, &replayed.handle) {
        (None, None) => Ok(()),
        (Some(l), Some(r))
            if l.expires == r.expires && l.audience == r.audience && l.tools == r.tools =>
        {
            if l.jti.is_empty() {
                mismatch("handle jti")
            } else {
                Ok(())
            }
        }
        _ => mismatch("handle"),
    }
}
