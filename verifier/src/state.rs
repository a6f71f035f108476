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
//! - an admin change logged as accepted must be for this deployment (the log's origin and its
//!   genesis entry's hash), carry a valid signature by a key that was an admin key at that
//!   point, be fresh at the entry's time, not reuse a nonce, and apply;
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
use std::sync::Arc;

use ciborium::value::Value;
use ed25519_dalek::VerifyingKey;
use serde::Serialize;
use sha2::{Digest, Sha384};
use thiserror::Error;

use crate::admin::{
    AdminAction, AdminError, Assurance, Deployment, IdentityProviderSpec, RateLimit, ServerSpec,
    SignedAdminRequest, SpendCap,
};
use crate::attestation::{
    AttestationVerifier, Expectations, Pcr, PcrIndex, TrustAnchor, VerifyAt, parse_attestation,
};
use crate::cbor::{self, uint};
use crate::entry::{
    AttestationFactsRecord, AttestationRecord, CallRecord, DecisionRecord, Entry, EntryHash, Event,
    HandleRecord, PiiRecord, PriceRecord, PrincipalRecord,
};
use crate::gateway::limits::{
    CallScope, RateDecision, RateOutcome, RateState, SpendDecision, SpendOutcome, SpendState,
    decide_rate, reserve,
};
use crate::handle::Jwks;
use crate::log::VerifiedEntry;
use crate::policy::{
    Action, AttestationFacts, Counters, Decision, DecisionMemo, DecisionRequest, PiiAction,
    PolicyEngine, RequestKey,
};
use crate::reason::Reason;
use crate::time::UnixMillis;

/// Window over which `calls_last_minute` counts.
pub const CALL_WINDOW_MS: u64 = 60_000;

/// How much entry time passes between two sweeps of expired call times and limit state (see
/// [`State::prune`]).
const SWEEP_INTERVAL_MS: u64 = 1_000;

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

/// Verifies a server's attestation document at `now` against `expect` (from its registration,
/// see [`State::check_attestation`]) and names what it attests.
fn verify_server_document(
    verifier: &AttestationVerifier,
    expect: &Expectations,
    document: &[u8],
    now: UnixMillis,
) -> Result<Attested, Reason> {
    let doc = verifier
        .verify(document, expect, VerifyAt::Instant(now))
        .map_err(|e| Reason::of_attestation_error(&e))?;
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
    /// The admin keys the genesis entry named, hex.
    pub genesis_admin_keys: Vec<String>,
    /// Whether the genesis keys were chosen by the host (development only).
    pub genesis_host_chosen: bool,
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
    /// The rate limits in force.
    pub rate_limits: Vec<RateLimit>,
    /// The spend caps in force.
    pub spend_caps: Vec<SpendCap>,
    /// Entries applied.
    pub applied: u64,
}

/// The control plane's state.
pub struct State {
    admin_keys: Vec<VerifyingKey>,
    genesis: Option<(Vec<[u8; 32]>, bool)>,
    rate_limits: Vec<RateLimit>,
    spend_caps: Vec<SpendCap>,
    /// GCRA state of the rate limits, driven by the gateway's allowed calls at their entries'
    /// times.
    rate_state: RateState,
    /// Spend of the spend caps' windows, driven likewise.
    spend_state: SpendState,
    servers: BTreeMap<String, ServerState>,
    policy: Arc<PolicyEngine>,
    providers: BTreeMap<String, (IdentityProviderSpec, Jwks)>,
    admin_nonces: BTreeMap<[u8; 16], UnixMillis>,
    /// The earliest time in `admin_nonces` (`u64::MAX` ms when there is none): `prune` walks
    /// them only when one has left the window.
    oldest_nonce: UnixMillis,
    calls: BTreeMap<String, VecDeque<UnixMillis>>,
    /// Whether every queue of `calls` is in time order, as it is when the entries' times never
    /// go back (the log verifier's rule): `counters` then counts by binary search.
    calls_sorted: bool,
    /// The latest horizon of the call window so far: call times at or before it have left the
    /// window, whether or not a sweep has dropped them yet (see [`State::prune`]).
    calls_horizon: u64,
    /// When (entry time, ms) `prune` next sweeps the call queues and the limits' state.
    next_sweep: u64,
    /// Shared with the attestation checks a replay defers ([`Deferred`]), with its caches.
    server_attestation: Arc<AttestationVerifier>,
    applied: u64,
    identity_generation: u64,
    allowed_images: Vec<BTreeMap<PcrIndex, Pcr>>,
    /// The log's origin: pinned by [`State::with_origin`], or else learned from the first
    /// accepted admin request.
    origin: Option<String>,
    /// The genesis entry's hash, once known (see [`State::set_genesis_hash`]).
    genesis_hash: Option<EntryHash>,
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
/// control plane (or was forged). Each variant carries what was logged and what replay found,
/// as typed values (serialised for `--json`); nothing here compares text.
#[derive(Debug, Clone, PartialEq, Eq, Error, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
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
    /// An entry contradicts itself (a refusal without a reason, an acceptance with one).
    #[error("entry {seq}: {what}")]
    Inconsistent {
        /// Position.
        seq: u64,
        /// What is contradictory.
        what: &'static str,
    },
    /// An admin change logged as accepted does not check out.
    #[error("entry {seq}: admin request logged as accepted is invalid: {reason} ({})", reason.code())]
    ForgedAdmin {
        /// Position.
        seq: u64,
        /// Why replay refuses it.
        reason: Reason,
    },
    /// An admin request logged as refused is accepted by replay, or refused for another
    /// reason.
    #[error(
        "entry {seq}: admin request logged as refused ({}) is {}",
        logged.code(),
        replayed.as_ref().map_or("accepted by replay".to_string(), |r| format!("refused by replay as {}", r.code()))
    )]
    AdminMismatch {
        /// Position.
        seq: u64,
        /// The logged reason.
        logged: Reason,
        /// Replay's reason, `None` when replay accepts the request.
        replayed: Option<Reason>,
    },
    /// An attestation's logged outcome differs from replay's: logged as verified but refused
    /// (`logged` is `None`), or refused for another reason than the one logged.
    #[error(
        "entry {seq}: attestation logged as {} but replay {}",
        logged.as_ref().map_or("verified".to_string(), |r| format!("refused ({})", r.code())),
        replayed.as_ref().map_or("verifies it".to_string(), |r| format!("refuses it ({}: {r})", r.code()))
    )]
    AttestationMismatch {
        /// Position.
        seq: u64,
        /// The logged reason (`None`: logged as verified).
        logged: Option<Reason>,
        /// Replay's reason (`None`: it verifies).
        replayed: Option<Reason>,
    },
    /// An attestation logged as verified names another measurement than its document's.
    #[error("entry {seq}: logged measurement differs from the document's")]
    MeasurementMismatch {
        /// Position.
        seq: u64,
    },
    /// A decision differs from the one the state gives.
    #[error(
        "entry {seq}: logged decision differs from replay in {field}: logged {logged}, replayed {replayed}"
    )]
    DecisionMismatch {
        /// Position.
        seq: u64,
        /// The first differing field.
        field: &'static str,
        /// The logged value of that field.
        logged: Box<serde_json::Value>,
        /// The value replay computes.
        replayed: Box<serde_json::Value>,
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
            | StateError::AdminMismatch { seq, .. }
            | StateError::Inconsistent { seq, .. }
            | StateError::AttestationMismatch { seq, .. }
            | StateError::MeasurementMismatch { seq }
            | StateError::DecisionMismatch { seq, .. }
            | StateError::BadCallResult { seq } => *seq,
        }
    }
}

impl State {
    /// The empty state, before genesis. `server_anchor` is the root MCP servers' attestation
    /// documents must chain to (AWS's in production, the mock's locally).
    pub fn new(server_anchor: TrustAnchor) -> Self {
        Self {
            admin_keys: Vec::new(),
            genesis: None,
            rate_limits: Vec::new(),
            spend_caps: Vec::new(),
            rate_state: RateState::default(),
            spend_state: SpendState::default(),
            servers: BTreeMap::new(),
            policy: Arc::new(PolicyEngine::deny_all()),
            providers: BTreeMap::new(),
            admin_nonces: BTreeMap::new(),
            oldest_nonce: UnixMillis::from_millis(u64::MAX),
            calls: BTreeMap::new(),
            calls_sorted: true,
            calls_horizon: 0,
            next_sweep: 0,
            server_attestation: Arc::new(AttestationVerifier::new(server_anchor)),
            applied: 0,
            identity_generation: 0,
            allowed_images: Vec::new(),
            origin: None,
            genesis_hash: None,
        }
    }

    /// Pins the log's origin: admin requests naming another are refused. The enclave pins the
    /// origin it signs checkpoints under; an auditor pins the origin of the checkpoint it
    /// holds. Unpinned, the first accepted admin request's origin is the one every later
    /// request must name.
    pub fn with_origin(mut self, origin: impl Into<String>) -> Self {
        self.origin = Some(origin.into());
        self
    }

    /// Records the genesis entry's hash, which admin requests must name. [`State::apply`] and
    /// [`State::apply_with`] record it from the verified genesis entry's bytes; an author that
    /// applies its own entries with [`State::apply_own`] (the enclave writing genesis) gives it
    /// here. The first hash recorded stays.
    pub fn set_genesis_hash(&mut self, hash: EntryHash) {
        self.genesis_hash.get_or_insert(hash);
    }

    /// The deployment admin requests must name, once the genesis hash is known (the origin
    /// only if pinned or learned).
    pub fn deployment(&self) -> Option<Deployment> {
        Some(Deployment {
            origin: self.origin.clone()?,
            genesis: self.genesis_hash?,
        })
    }

    /// Whether genesis happened.
    pub fn has_genesis(&self) -> bool {
        !self.admin_keys.is_empty()
    }

    /// The admin keys the genesis entry named (raw Ed25519 public keys, as logged), and
    /// whether the host chose them; `None` before genesis.
    pub fn genesis(&self) -> Option<(&[[u8; 32]], bool)> {
        self.genesis.as_ref().map(|(k, h)| (k.as_slice(), *h))
    }

    /// The current admin keys.
    pub fn admin_keys(&self) -> &[VerifyingKey] {
        &self.admin_keys
    }

    /// The rate limits and spend caps in force (the last `set_limits`).
    pub fn limits(&self) -> (&[RateLimit], &[SpendCap]) {
        (&self.rate_limits, &self.spend_caps)
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

    /// The call queues without the times that left the window since the last sweep: what an
    /// entry-by-entry prune would have left.
    fn calls_in_window(&self) -> impl Iterator<Item = (&String, Vec<UnixMillis>)> {
        let horizon = self.calls_horizon;
        self.calls.iter().filter_map(move |(k, q)| {
            let kept: Vec<UnixMillis> = q
                .iter()
                .skip_while(|t| t.as_millis() <= horizon)
                .copied()
                .collect();
            (!kept.is_empty()).then_some((k, kept))
        })
    }

    /// A comparable summary.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            admin_keys: self
                .admin_keys
                .iter()
                .map(|k| hex::encode(k.as_bytes()))
                .collect(),
            genesis_admin_keys: self
                .genesis
                .iter()
                .flat_map(|(k, _)| k.iter().map(hex::encode))
                .collect(),
            genesis_host_chosen: self.genesis.as_ref().is_some_and(|(_, h)| *h),
            rate_limits: self.rate_limits.clone(),
            spend_caps: self.spend_caps.clone(),
            servers: self.servers.clone(),
            policy: self.policy.text().to_string(),
            identity_providers: self
                .providers
                .iter()
                .map(|(k, (s, _))| (k.clone(), s.clone()))
                .collect(),
            admin_nonces: self.admin_nonces.len(),
            calls: self
                .calls_in_window()
                .map(|(k, v)| (k.clone(), v.len()))
                .collect(),
            call_times: self
                .calls_in_window()
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
    pub fn check_admin(&self, bytes: &[u8], now: UnixMillis) -> Result<PreparedAdmin, Reason> {
        let signed = SignedAdminRequest::decode(bytes).map_err(|_| Reason::MalformedRequest)?;
        // First the deployment: a request for another log is refused as such, whoever signed it
        // (one admin key may well serve staging and production).
        let expected = Deployment {
            origin: self
                .origin
                .clone()
                .unwrap_or_else(|| signed.request().deployment.origin.clone()),
            genesis: self.genesis_hash.ok_or(Reason::NoGenesis)?,
        };
        signed
            .check_deployment(&expected)
            .map_err(|_| Reason::OtherDeployment)?;
        signed.verify(&self.admin_keys).map_err(|e| match e {
            AdminError::BadSignature { kid } => Reason::BadAdminSignature { kid },
            _ => Reason::UnknownAdminKey { kid: *signed.kid() },
        })?;
        if !signed.is_fresh_at(now) {
            return Err(Reason::StaleRequest);
        }
        if self.admin_nonces.contains_key(&signed.request().nonce) {
            return Err(Reason::ReplayedNonce);
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
                    return Err(Reason::ServerExists {
                        server: s.id.clone(),
                    });
                }
                if self.servers.len() >= MAX_SERVERS {
                    return Err(Reason::RegistryFull);
                }
            }
            AdminAction::UpdateServer(s) => {
                if !self.servers.contains_key(&s.id) {
                    return Err(Reason::UnknownServer {
                        server: s.id.clone(),
                    });
                }
            }
            AdminAction::RevokeServer { id } => {
                if !self.servers.contains_key(id) {
                    return Err(Reason::UnknownServer { server: id.clone() });
                }
            }
            AdminAction::SetPolicy { text } => {
                prepared.policy = Some(PolicyEngine::new(text).map_err(|_| Reason::InvalidPolicy)?);
            }
            AdminAction::SetIdentityProvider(p) => {
                let jwks = Jwks::parse(p.jwks.as_bytes()).map_err(|_| Reason::InvalidJwks)?;
                if jwks.is_empty() {
                    return Err(Reason::InvalidJwks);
                }
                if !self.providers.contains_key(&p.issuer)
                    && self.providers.len() >= MAX_IDENTITY_PROVIDERS
                {
                    return Err(Reason::TooManyIdentityProviders);
                }
                prepared.jwks = Some(jwks);
            }
            AdminAction::RemoveIdentityProvider { issuer } => {
                if !self.providers.contains_key(issuer) {
                    return Err(Reason::UnknownIdentityProvider {
                        issuer: issuer.clone(),
                    });
                }
            }
            AdminAction::RotateAdminKeys { keys } => {
                prepared.keys = Some(parse_admin_keys(keys).ok_or(Reason::UnusableAdminKey)?);
            }
            AdminAction::AllowImage { pcrs } => {
                let image: BTreeMap<PcrIndex, Pcr> = pcrs.iter().map(|(i, p)| (*i, p.0)).collect();
                if self.allowed_images.contains(&image) {
                    return Err(Reason::ImageAlreadyAllowed);
                }
                if self.allowed_images.len() >= MAX_ALLOWED_IMAGES {
                    return Err(Reason::TooManyAllowedImages);
                }
            }
            AdminAction::SetLimits { .. } => {}
        }
        Ok(prepared)
    }

    fn apply_admin(&mut self, prepared: PreparedAdmin) {
        let request = prepared.signed.request();
        let time = request.time;
        self.admin_nonces.insert(request.nonce, time);
        self.oldest_nonce =
            UnixMillis::from_millis(self.oldest_nonce.as_millis().min(time.as_millis()));
        self.origin
            .get_or_insert_with(|| request.deployment.origin.clone());
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
                    self.policy = Arc::new(p);
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
            AdminAction::SetLimits { rates, spends } => self.set_limits(rates, spends),
        }
    }

    fn prune(&mut self, now: UnixMillis) {
        let horizon = now
            .as_millis()
            .saturating_sub(2 * crate::admin::ADMIN_REQUEST_WINDOW_MS);
        if self.oldest_nonce.as_millis() < horizon {
            self.admin_nonces.retain(|_, t| t.as_millis() >= horizon);
            self.oldest_nonce = UnixMillis::from_millis(
                self.admin_nonces
                    .values()
                    .map(|t| t.as_millis())
                    .min()
                    .unwrap_or(u64::MAX),
            );
        }
        // Call times that left the window, and limit state equal to "never seen" (a GCRA time
        // passed, a spend window ended), change no decision: `counters` counts within the
        // window only, and the limits read such state as absent (the kernel's property). They
        // are dropped so that memory stays flat, by a sweep over every agent and key at most
        // once per `SWEEP_INTERVAL_MS` of entry time (and after the limits change), not at
        // every entry: between two sweeps memory holds at most that much more.
        let at = now.as_millis();
        self.calls_horizon = self.calls_horizon.max(at.saturating_sub(CALL_WINDOW_MS));
        if at >= self.next_sweep || !self.calls_sorted {
            let horizon = self.calls_horizon;
            self.calls.retain(|_, q| {
                while q.front().is_some_and(|t| t.as_millis() <= horizon) {
                    q.pop_front();
                }
                !q.is_empty()
            });
            self.rate_state.prune(at);
            self.spend_state.prune(at, &self.spend_caps);
            self.next_sweep = at.saturating_add(SWEEP_INTERVAL_MS);
        }
    }

    fn set_limits(&mut self, rates: Vec<RateLimit>, spends: Vec<SpendCap>) {
        self.rate_limits = rates;
        self.spend_caps = spends;
        // The windows of a cap that went are dropped at the next entry, as by an
        // entry-by-entry prune: a cap put back later starts empty.
        self.next_sweep = 0;
    }

    /// Counts an allowed call of `agent` at `now`.
    fn record_call(&mut self, agent: &str, now: UnixMillis) {
        match self.calls.get_mut(agent) {
            Some(q) => {
                if q.back().is_some_and(|t| t.as_millis() > now.as_millis()) {
                    self.calls_sorted = false;
                }
                q.push_back(now);
            }
            None => {
                self.calls.insert(agent.to_owned(), VecDeque::from([now]));
            }
        }
    }

    /// Whom and what a gateway call counts against.
    fn call_scope(principal: &PrincipalRecord, server: &str, tool: &str) -> CallScope {
        CallScope {
            tenant: principal.tenant.clone(),
            user: principal.user.clone(),
            agent: principal.agent.clone(),
            server: server.to_owned(),
            tool: tool.to_owned(),
        }
    }

    /// The rate and spend outcomes of a gateway call at `now` against the limits in force.
    fn limit_outcomes(
        &self,
        principal: &PrincipalRecord,
        server: &ServerState,
        tool: &str,
        now: UnixMillis,
    ) -> (RateOutcome, SpendOutcome) {
        let scope = Self::call_scope(principal, &server.spec.id, tool);
        let at = now.as_millis();
        let rate = decide_rate(&self.rate_state, at, &self.rate_limits, &scope);
        let spend = reserve(
            &self.spend_state,
            at,
            &self.spend_caps,
            &scope,
            server.spec.prices.get(tool),
        );
        (rate, spend)
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
    ) -> Result<Attested, Reason> {
        let expect = self.attestation_expectations(server, nonce)?;
        verify_server_document(&self.server_attestation, &expect, document, now)
    }

    /// What a document from `server` answering `nonce` must show, from its registration: the
    /// registered PCRs, its debug rule, the nonce, freshness.
    fn attestation_expectations(&self, server: &str, nonce: &[u8]) -> Result<Expectations, Reason> {
        let s = self
            .servers
            .get(server)
            .ok_or_else(|| Reason::UnknownServer {
                server: server.to_string(),
            })?;
        if s.spec.assurance == Assurance::None {
            return Err(Reason::NotAttestable);
        }
        Ok(Expectations {
            pcrs: s.spec.pcrs.iter().map(|(i, p)| (*i, p.0)).collect(),
            allow_debug: s.spec.allow_debug,
            nonce: Some(nonce.to_vec()),
            max_age_ms: Some(ATTESTATION_FRESHNESS_MS),
            ..Expectations::default()
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
        let calls = self.calls.get(agent).map_or(0, |q| {
            if self.calls_sorted {
                q.len()
                    .saturating_sub(q.partition_point(|t| t.as_millis() <= horizon))
            } else {
                q.iter().filter(|t| t.as_millis() > horizon).count()
            }
        });
        Counters {
            calls_last_minute: calls as u64,
            spend_micros: 0,
        }
    }

    /// The request the policy evaluates for `principal` asking `action` of `server` (and
    /// `tool`) at `now`, with these attestation facts and counters, borrowed from the state
    /// and the principal: no call section (the caller adds a gateway action's).
    #[allow(clippy::too_many_arguments)]
    fn request_key<'a>(
        principal: &'a PrincipalRecord,
        action: Action,
        server: &'a ServerState,
        tool: Option<&'a str>,
        attestation: AttestationFacts,
        counters: Counters,
        now: UnixMillis,
    ) -> RequestKey<'a> {
        RequestKey {
            agent: &principal.agent,
            user: &principal.user,
            tenant: &principal.tenant,
            roles: &principal.roles,
            issuer: &principal.issuer,
            action,
            server_id: &server.spec.id,
            server_name: &server.spec.name,
            server_tenant: &server.spec.tenant,
            server_resource: &server.spec.resource,
            server_assurance: server.spec.assurance.as_str(),
            tool,
            attestation,
            time: now,
            counters,
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
        self.decide_with(principal, action, server_id, tool, None, now)
    }

    /// Decides a `tools/call` the gateway is about to forward: [`State::decide`] for `call`,
    /// with the call itself in the policy's context. `arguments` are the call's arguments with
    /// PII redacted (what policies see; their findings are `pii`, counted on the arguments as
    /// sent); the record logs only their projection on what the policy set declares. The
    /// allowed call's PII rule is the policy's ([`PolicyEngine::pii_action`]); under `refuse`
    /// a call with findings is denied. The record's `call.args` is left zero: the argument
    /// hash depends on the rule (redacted or not), and the caller fills it in.
    ///
    /// Arguments the projection cannot read (not an object, too long, not I-JSON) are an
    /// error: the gateway refuses such a call before deciding it.
    #[allow(clippy::too_many_arguments)]
    pub fn decide_call(
        &self,
        principal: &PrincipalRecord,
        server_id: &str,
        tool: &str,
        definition: [u8; 32],
        arguments: Option<&str>,
        pii: &BTreeMap<String, u64>,
        now: UnixMillis,
    ) -> Result<DecisionRecord, String> {
        self.decide_gated(
            principal,
            Action::Call,
            server_id,
            tool,
            definition,
            arguments,
            pii,
            now,
        )
    }

    /// Decides a request the gateway is about to forward, of a gateway action
    /// ([`Action::is_gated`]): a `tools/call` (`item` the tool, `definition` its pinned
    /// digest), a `resources/read` (`item` the URI) or a `prompts/get` (`item` the prompt's
    /// name, `arguments` its arguments). Resources and prompts are not pinned: their
    /// `definition` is all zeroes. Rate limits and spend caps apply to tool calls only. The
    /// rest is [`State::decide_call`]'s: the hard rules, then Cedar with the request in the
    /// context, the PII rule of the permits that allowed it.
    #[allow(clippy::too_many_arguments)]
    pub fn decide_gated(
        &self,
        principal: &PrincipalRecord,
        action: Action,
        server_id: &str,
        item: &str,
        definition: [u8; 32],
        arguments: Option<&str>,
        pii: &BTreeMap<String, u64>,
        now: UnixMillis,
    ) -> Result<DecisionRecord, String> {
        if !action.is_gated() {
            return Err(format!("{} is not a gateway action", action.as_str()));
        }
        let call = CallRecord {
            args: [0; 32],
            definition,
            arguments: self.policy.project_arguments(arguments)?,
            pii: PiiRecord {
                action: PiiAction::DEFAULT.as_str().to_owned(),
                counts: pii.clone(),
            },
            price: None,
        };
        Ok(self.decide_with(principal, action, server_id, Some(item), Some(call), now))
    }

    /// Decides like [`State::decide`], for a `call` with `call` (the gateway's) in the
    /// context: its projected arguments and PII counts as given, its PII rule and verdict as
    /// decided here.
    fn decide_with(
        &self,
        principal: &PrincipalRecord,
        action: Action,
        server_id: &str,
        tool: Option<&str>,
        call: Option<CallRecord>,
        now: UnixMillis,
    ) -> DecisionRecord {
        match self.decide_plan(principal, action, server_id, tool, call, now) {
            DecisionPlan::Settled(record) => *record,
            DecisionPlan::Pending(pending) => pending.evaluate(None),
        }
    }

    /// The state's part of a decision: the attestation facts and counters the record logs,
    /// then the hard rules, which do not depend on the policy: the server must exist, belong
    /// to the agent's tenant, and (for resolve and gateway actions) hold a fresh verified
    /// attestation; a called tool must be pinned. A gateway call's rate and spend outcomes
    /// come from the limits' state now, used only if the policy and the PII rule allow it.
    fn precheck<'a>(
        &'a self,
        principal: &PrincipalRecord,
        action: Action,
        server_id: &str,
        tool: Option<&str>,
        has_call: bool,
        now: UnixMillis,
    ) -> Precheck<'a> {
        let Some(server) = self.servers.get(server_id) else {
            return Precheck {
                attestation: AttestationFacts {
                    verified: false,
                    age_ms: None,
                    pcr_match: false,
                    debug: false,
                },
                counters: Counters::default(),
                open: Err(Reason::UnknownServer {
                    server: server_id.to_string(),
                }),
            };
        };
        let attestation = self.attestation_facts(server, now);
        let counters = self.counters(&principal.agent, now);
        let refuse = |reason| Precheck {
            attestation,
            counters,
            open: Err(reason),
        };
        if principal.tenant != server.spec.tenant {
            return refuse(Reason::OtherTenant);
        }
        // A server registered without attestation (assurance none) is never attested: the
        // policy decides on its assurance level instead of this rule.
        if (action == Action::Resolve || action.is_gated())
            && server.spec.assurance == Assurance::Nitro
            && !attestation.verified
        {
            return refuse(match &server.attested {
                None => Reason::NotAttested,
                Some(_) => Reason::AttestationStale,
            });
        }
        if action == Action::Call {
            match tool {
                Some(t) if server.spec.tools.contains_key(t) => {}
                _ => {
                    return refuse(Reason::ToolNotPinned {
                        tool: tool.unwrap_or_default().to_string(),
                    });
                }
            }
        }
        let limits = if has_call && action == Action::Call {
            let tool = tool.unwrap_or_default();
            let (rate, spend) = self.limit_outcomes(principal, server, tool, now);
            Some(match (rate.decision, spend.decision) {
                (RateDecision::Limited { key, .. }, _) => Err(Reason::RateLimited {
                    scope: key.kind.as_str().to_owned(),
                }),
                (_, SpendDecision::OverCap { key, .. }) => Err(Reason::SpendCapReached {
                    scope: key.key.kind.as_str().to_owned(),
                    asset: key.asset,
                }),
                _ => Ok(server.spec.prices.get(tool).map(|p| PriceRecord {
                    amount: p.amount,
                    asset: p.asset.clone(),
                })),
            })
        } else {
            None
        };
        Precheck {
            attestation,
            counters,
            open: Ok(Open { server, limits }),
        }
    }

    /// [`State::decide_with`] up to the policy evaluation: the hard rules, attestation facts
    /// and counters from the state ([`State::precheck`]), and the requests the policy is to
    /// evaluate (against the policy engine in force, shared, so the evaluation can run later
    /// and elsewhere).
    fn decide_plan(
        &self,
        principal: &PrincipalRecord,
        action: Action,
        server_id: &str,
        tool: Option<&str>,
        mut call: Option<CallRecord>,
        now: UnixMillis,
    ) -> DecisionPlan {
        if let Some(c) = call.as_mut() {
            c.pii.action = PiiAction::DEFAULT.as_str().to_owned();
        }
        let pre = self.precheck(principal, action, server_id, tool, call.is_some(), now);
        let mut record = DecisionRecord {
            action: action.as_str().to_string(),
            principal: principal.clone(),
            server: server_id.to_string(),
            tool: tool.map(str::to_string),
            attestation: facts_record(pre.attestation),
            calls_last_minute: pre.counters.calls_last_minute,
            spend_micros: pre.counters.spend_micros,
            allowed: false,
            policies: Vec::new(),
            reason: None,
            handle: None,
            call: None,
        };
        let open = match pre.open {
            Ok(open) => open,
            Err(reason) => {
                record.reason = Some(reason);
                record.call = call;
                return DecisionPlan::Settled(Box::new(record));
            }
        };
        let server = open.server;
        let key = with_call(
            Self::request_key(
                principal,
                action,
                server,
                tool,
                pre.attestation,
                pre.counters,
                now,
            ),
            call.as_ref(),
        );
        let req = key.to_request();
        let tools = if action == Action::Resolve {
            server
                .spec
                .tools
                .keys()
                .map(|t| {
                    let call = Self::request_key(
                        principal,
                        Action::Call,
                        server,
                        Some(t),
                        pre.attestation,
                        pre.counters,
                        now,
                    );
                    (t.clone(), call.to_request())
                })
                .collect()
        } else {
            Vec::new()
        };
        record.call = call;
        DecisionPlan::Pending(Box::new(PendingDecision {
            record,
            policy: Arc::clone(&self.policy),
            req,
            tools,
            limits: open.limits,
            expires: now.as_secs().saturating_add(HANDLE_TTL_SECS),
            audience: server.spec.resource.clone(),
        }))
    }

    /// For a replay: [`State::decide_plan`] and [`PendingDecision::evaluate`] on a logged
    /// decision whose policy answers `memo` already holds, compared with the logged outcome.
    /// The same rules and the same answers, without building the requests or the record's
    /// inputs (which are the logged ones, and not compared). `None` when an answer is not in
    /// the memo: the caller then plans the decision for Cedar.
    fn recheck_from_memo(
        &self,
        seq: u64,
        rec: &DecisionRecord,
        action: Action,
        now: UnixMillis,
        memo: &DecisionMemo,
    ) -> Option<Result<(), StateError>> {
        let tool = rec.tool.as_deref();
        let pre = self.precheck(
            &rec.principal,
            action,
            &rec.server,
            tool,
            rec.call.is_some(),
            now,
        );
        let mut replayed = DecisionRecord {
            action: String::new(),
            principal: PrincipalRecord {
                agent: String::new(),
                user: String::new(),
                tenant: String::new(),
                roles: Vec::new(),
                issuer: String::new(),
            },
            server: String::new(),
            tool: None,
            attestation: facts_record(pre.attestation),
            calls_last_minute: pre.counters.calls_last_minute,
            spend_micros: pre.counters.spend_micros,
            allowed: false,
            policies: Vec::new(),
            reason: None,
            handle: None,
            // What the comparison reads of the call: the PII rule and the price.
            call: rec.call.as_ref().map(|_| CallRecord {
                args: [0; 32],
                definition: [0; 32],
                arguments: None,
                pii: PiiRecord {
                    action: PiiAction::DEFAULT.as_str().to_owned(),
                    counts: BTreeMap::new(),
                },
                price: None,
            }),
        };
        match pre.open {
            Err(reason) => replayed.reason = Some(reason),
            Ok(open) => {
                let server = open.server;
                let key = with_call(
                    Self::request_key(
                        &rec.principal,
                        action,
                        server,
                        tool,
                        pre.attestation,
                        pre.counters,
                        now,
                    ),
                    rec.call.as_ref(),
                );
                let decision = memo.lookup(&self.policy, &key)?;
                let mut answered = 1;
                let pii_found = rec.call.as_ref().is_some_and(|c| !c.pii.counts.is_empty());
                let stands = apply_policy(
                    &mut replayed,
                    &self.policy,
                    &decision,
                    open.limits.as_ref(),
                    pii_found,
                );
                if stands && action == Action::Resolve {
                    let mut tools = Vec::new();
                    for t in server.spec.tools.keys() {
                        let call = Self::request_key(
                            &rec.principal,
                            Action::Call,
                            server,
                            Some(t),
                            pre.attestation,
                            pre.counters,
                            now,
                        );
                        answered += 1;
                        if memo.lookup(&self.policy, &call)?.allowed {
                            tools.push(t.clone());
                        }
                    }
                    replayed.handle = Some(HandleRecord {
                        jti: String::new(),
                        expires: now.as_secs().saturating_add(HANDLE_TTL_SECS),
                        audience: server.spec.resource.clone(),
                        tools,
                    });
                }
                memo.answered(answered);
            }
        }
        Some(compare_decision(seq, rec, &replayed))
    }

    /// The servers `principal` may discover at `now`: same tenant, and the policy allows
    /// `discover`. Sorted by id.
    pub fn discover(&self, principal: &PrincipalRecord, now: UnixMillis) -> Vec<String> {
        self.discover_plan(principal, now).evaluate(None)
    }

    fn discover_plan(&self, principal: &PrincipalRecord, now: UnixMillis) -> PendingDiscovery {
        PendingDiscovery {
            policy: Arc::clone(&self.policy),
            requests: self
                .servers
                .values()
                .filter(|s| s.spec.tenant == principal.tenant)
                .map(|s| {
                    let req = Self::request_key(
                        principal,
                        Action::Discover,
                        s,
                        None,
                        self.attestation_facts(s, now),
                        self.counters(&principal.agent, now),
                        now,
                    );
                    (s.spec.id.clone(), req.to_request())
                })
                .collect(),
        }
    }

    /// For a replay: whether a logged discovery lists exactly the servers the policy lets
    /// `principal` see, when `memo` holds every answer ([`State::discover_plan`] evaluated
    /// through it, without building the requests). `None` when an answer is missing or the
    /// lists differ: the caller then plans the discovery, whose check reports the difference.
    fn rediscover_from_memo(
        &self,
        principal: &PrincipalRecord,
        logged: &[String],
        now: UnixMillis,
        memo: &DecisionMemo,
    ) -> Option<()> {
        let counters = self.counters(&principal.agent, now);
        let mut logged = logged.iter();
        let mut answered = 0;
        for s in self
            .servers
            .values()
            .filter(|s| s.spec.tenant == principal.tenant)
        {
            let key = Self::request_key(
                principal,
                Action::Discover,
                s,
                None,
                self.attestation_facts(s, now),
                counters,
                now,
            );
            answered += 1;
            if memo.lookup(&self.policy, &key)?.allowed && logged.next() != Some(&s.spec.id) {
                return None;
            }
        }
        if logged.next().is_some() {
            return None;
        }
        memo.answered(answered);
        Some(())
    }

    /// Applies an entry the log verifier accepted to the state, re-checking every logged
    /// decision ([`ApplyMode::Recheck`]). Entries come in order, each once; [`crate::replay`]
    /// drives this together with the log verifier.
    pub fn apply(&mut self, entry: &VerifiedEntry) -> Result<(), StateError> {
        self.apply_with(entry, ApplyMode::Recheck)
    }

    /// Applies an entry the log verifier accepted in `mode`. With [`ApplyMode::Trusted`], a
    /// logged decision or discovery is not evaluated again; the state changes exactly as
    /// [`ApplyMode::Recheck`] would change it for an entry that `Recheck` accepts.
    pub fn apply_with(&mut self, entry: &VerifiedEntry, mode: ApplyMode) -> Result<(), StateError> {
        match self.apply_deferring(entry, mode, None)? {
            None => Ok(()),
            Some(deferred) => deferred.check(entry.entry(), None),
        }
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
        match self.fold_deferring(seq, entry, mode, false, None)? {
            None => Ok(()),
            Some(deferred) => deferred.check(entry, None),
        }
    }

    /// Applies a verified entry like [`State::apply_with`], except that in
    /// [`ApplyMode::Recheck`] the policy evaluation of a logged decision or discovery is
    /// returned instead of done: the state changes as the logged outcome says (as it does
    /// whenever the re-check agrees), and the caller must run [`Deferred::check`] before it
    /// accepts the entry. [`crate::replay`] runs those checks on all cores. With `memo` (a
    /// replay's), a decision or discovery whose every policy answer the memo holds is checked
    /// here and now instead (`recheck_from_memo`, `rediscover_from_memo`: the same rules and
    /// answers, without building its requests), and nothing is returned for it.
    pub(crate) fn apply_deferring(
        &mut self,
        entry: &VerifiedEntry,
        mode: ApplyMode,
        memo: Option<&DecisionMemo>,
    ) -> Result<Option<Deferred>, StateError> {
        let deferred = self.fold_deferring(entry.seq(), entry.entry(), mode, true, memo)?;
        if let Event::Genesis { .. } = entry.entry().event {
            // As in `apply_with`: admin requests name the genesis entry by its bytes' hash.
            self.set_genesis_hash(entry.signed().hash());
        }
        Ok(deferred)
    }

    fn fold_deferring(
        &mut self,
        seq: u64,
        entry: &Entry,
        mode: ApplyMode,
        defer: bool,
        memo: Option<&DecisionMemo>,
    ) -> Result<Option<Deferred>, StateError> {
        let mut deferred = None;
        let now = entry.time;
        self.prune(now);
        match &entry.event {
            Event::EpochStart { .. } | Event::Checkpoint { .. } | Event::ToolDrift { .. } => {}
            Event::CallResult {
                call, outcome, pii, ..
            } => {
                let rule = PiiAction::parse(&pii.action);
                let consistent = match outcome.as_str() {
                    "ok" | "error" => {
                        rule.is_some_and(|r| r != PiiAction::Refuse) || pii.counts.is_empty()
                    }
                    // A result withheld for its PII: the rule refuses and something was found.
                    "withheld" => rule == Some(PiiAction::Refuse) && !pii.counts.is_empty(),
                    // No answer, nothing scanned.
                    "aborted" => pii.counts.is_empty(),
                    _ => false,
                };
                if *call >= seq || rule.is_none() || !consistent {
                    return Err(StateError::BadCallResult { seq });
                }
            }
            Event::Genesis {
                admin_keys,
                host_chosen,
            } => {
                if seq != 1 || self.has_genesis() {
                    return Err(StateError::GenesisOutOfPlace { seq });
                }
                self.admin_keys =
                    parse_admin_keys(admin_keys).ok_or(StateError::BadGenesis { seq })?;
                self.genesis = Some((admin_keys.clone(), *host_chosen));
            }
            Event::Admin {
                request,
                accepted,
                reason,
            } => match (*accepted, reason) {
                (true, None) => {
                    let prepared = self
                        .check_admin(request, now)
                        .map_err(|reason| StateError::ForgedAdmin { seq, reason })?;
                    self.apply_admin(prepared);
                }
                (false, Some(logged)) => {
                    // A refusal changes nothing, but it must be the refusal this state gives:
                    // otherwise the log hides an accepted change or invents a refusal.
                    let replayed = self.check_admin(request, now).err();
                    if replayed.as_ref() != Some(logged) {
                        return Err(StateError::AdminMismatch {
                            seq,
                            logged: logged.clone(),
                            replayed,
                        });
                    }
                }
                (true, Some(_)) | (false, None) => {
                    return Err(StateError::Inconsistent {
                        seq,
                        what: "an admin request is logged accepted with a reason, or refused without one",
                    });
                }
            },
            Event::Attestation(rec) => deferred = self.apply_attestation(seq, rec, now)?,
            Event::Decision(rec) => {
                let action = match Action::parse(&rec.action) {
                    Some(a) if a != Action::Discover => a,
                    _ => {
                        return Err(StateError::DecisionMismatch {
                            seq,
                            field: "action",
                            logged: Box::new(rec.action.clone().into()),
                            replayed: Box::new(serde_json::json!([
                                "resolve",
                                "call",
                                "read_resource",
                                "get_prompt"
                            ])),
                        });
                    }
                };
                // Resources and prompts are decided by the gateway only, always with the
                // request's section.
                if rec.call.is_none() && matches!(action, Action::ReadResource | Action::GetPrompt)
                {
                    return Err(StateError::DecisionMismatch {
                        seq,
                        field: "call",
                        logged: Box::new(serde_json::json!(null)),
                        replayed: Box::new(serde_json::json!(format!(
                            "a call section on a {} decision",
                            action.as_str()
                        ))),
                    });
                }
                if rec.call.is_some() && !action.is_gated() {
                    return Err(StateError::DecisionMismatch {
                        seq,
                        field: "call",
                        logged: Box::new(serde_json::json!("a call section")),
                        replayed: Box::new(serde_json::json!(format!(
                            "none on a {} decision",
                            action.as_str()
                        ))),
                    });
                }
                let from_memo = match memo {
                    Some(m) if mode == ApplyMode::Recheck => {
                        self.recheck_from_memo(seq, rec, action, now, m)
                    }
                    _ => None,
                };
                if let Some(checked) = from_memo {
                    checked?;
                } else if mode == ApplyMode::Recheck {
                    match self.decide_plan(
                        &rec.principal,
                        action,
                        &rec.server,
                        rec.tool.as_deref(),
                        rec.call.clone(),
                        now,
                    ) {
                        DecisionPlan::Settled(replayed) => compare_decision(seq, rec, &replayed)?,
                        DecisionPlan::Pending(plan) => {
                            deferred = Some(Deferred {
                                seq,
                                what: Pending::Decision(plan),
                            });
                        }
                    }
                }
                if action == Action::Call && rec.allowed {
                    self.record_call(&rec.principal.agent, now);
                    // A gateway call counts against the limits in force, at its entry's time:
                    // the same arithmetic the decision ran, so the state after it is the one
                    // the next decision (live or replayed) sees.
                    if rec.call.is_some()
                        && let (Some(server), Some(tool)) =
                            (self.servers.get(&rec.server), rec.tool.as_deref())
                    {
                        let (rate, spend) = self.limit_outcomes(&rec.principal, server, tool, now);
                        self.rate_state.apply(&rate);
                        self.spend_state.apply(&spend.updates);
                    }
                }
            }
            Event::Discovery { principal, servers } => {
                let from_memo = match memo {
                    Some(m) if mode == ApplyMode::Recheck => {
                        self.rediscover_from_memo(principal, servers, now, m)
                    }
                    _ => None,
                };
                if mode == ApplyMode::Recheck && from_memo.is_none() {
                    deferred = Some(Deferred {
                        seq,
                        what: Pending::Discovery(self.discover_plan(principal, now)),
                    });
                }
            }
        }
        self.applied = self.applied.saturating_add(1);
        match deferred {
            Some(d) if !defer => d.check(entry, None).map(|()| None),
            other => Ok(other),
        }
    }

    /// Applies a logged attestation. An accepted one changes the state as logged at once and
    /// returns the check of its document (the signatures, the expensive part) as a
    /// [`Deferred`], made against the server's registration as it stands here; a refused one
    /// is checked on the spot (rare).
    fn apply_attestation(
        &mut self,
        seq: u64,
        rec: &AttestationRecord,
        now: UnixMillis,
    ) -> Result<Option<Deferred>, StateError> {
        match (rec.verified, &rec.reason) {
            (true, None) => {
                let expect = self
                    .attestation_expectations(&rec.server, &rec.nonce)
                    .map_err(|r| StateError::AttestationMismatch {
                        seq,
                        logged: None,
                        replayed: Some(r),
                    })?;
                // Read from the document before it is verified: the deferred check verifies
                // it and compares, and the entry counts only once that passed.
                let debug = parse_attestation(&rec.document).is_ok_and(|d| d.is_debug());
                if let (Some(measurement), Some(s)) =
                    (rec.measurement, self.servers.get_mut(&rec.server))
                {
                    s.attested = Some(Attested {
                        at: now,
                        measurement,
                        debug,
                    });
                }
                return Ok(Some(Deferred {
                    seq,
                    what: Pending::Attestation(Box::new(PendingAttestation {
                        verifier: Arc::clone(&self.server_attestation),
                        expect,
                        debug,
                    })),
                }));
            }
            (false, Some(logged)) if !logged.withdraws_attestation() => {
                // Evidence refused for what the request carried (a nonce the enclave did not
                // issue, or one already used or expired), not for what the server proved:
                // it says nothing about the server and changes nothing. Which nonces the
                // enclave issued is not in the log, so this cannot be re-checked; the entry
                // is signed by the enclave that kept the challenges.
                if rec.measurement.is_some() {
                    return Err(StateError::MeasurementMismatch { seq });
                }
            }
            (false, Some(logged)) => {
                // A document the server presented against a nonce the enclave issued, that
                // does not verify: replay must refuse it for the same reason. It withdraws
                // the previous attestation: the server may have changed.
                let replayed = self
                    .check_attestation(&rec.server, &rec.nonce, &rec.document, now)
                    .err();
                if replayed.as_ref() != Some(logged) || rec.measurement.is_some() {
                    return Err(StateError::AttestationMismatch {
                        seq,
                        logged: Some(logged.clone()),
                        replayed,
                    });
                }
                if let Some(s) = self.servers.get_mut(&rec.server) {
                    s.attested = None;
                }
            }
            (true, Some(_)) | (false, None) => {
                return Err(StateError::Inconsistent {
                    seq,
                    what: "an attestation is logged verified with a reason, or refused without one",
                });
            }
        }
        Ok(None)
    }
}

/// `key` with the call's arguments and PII findings when its action is gated (the gateway's
/// tool calls, resource reads and prompt gets), as the policy sees them.
fn with_call<'a>(mut key: RequestKey<'a>, call: Option<&'a CallRecord>) -> RequestKey<'a> {
    if key.action.is_gated() {
        key.call = call.map(|c| (c.arguments.as_deref(), &c.pii.counts));
    }
    key
}

/// [`State::decide`] after the state's part: settled by a hard rule, or waiting for the policy.
enum DecisionPlan {
    Settled(Box<DecisionRecord>),
    Pending(Box<PendingDecision>),
}

/// A decision whose inputs the state has computed (hard rules passed, facts and counters
/// filled in), its policy evaluation still to do against the policy engine that was in force.
struct PendingDecision {
    record: DecisionRecord,
    policy: Arc<PolicyEngine>,
    req: DecisionRequest,
    /// For a `resolve`: the `call` request of every pinned tool, for the handle's scope.
    tools: Vec<(String, DecisionRequest)>,
    /// For a gateway call: what the rate limits and spend caps say (a refusal, or the price
    /// the allowed call logs), from the state the decision was made in.
    limits: Option<Result<Option<PriceRecord>, Reason>>,
    expires: u64,
    audience: String,
}

/// `policy.decide(req)`, through `memo` when there is one (a replay's; its answers are
/// Cedar's, see [`DecisionMemo`]).
fn decide_through(
    policy: &Arc<PolicyEngine>,
    req: &DecisionRequest,
    memo: Option<&DecisionMemo>,
) -> Decision {
    match memo {
        Some(m) => m.decide(policy, req),
        None => policy.decide(req),
    }
}

impl PendingDecision {
    /// The decision: Cedar decides, deny by default; an allowed `resolve` carries the handle's
    /// scope.
    fn evaluate(self, memo: Option<&DecisionMemo>) -> DecisionRecord {
        let mut record = self.record;
        let decision = decide_through(&self.policy, &self.req, memo);
        let pii_found = record
            .call
            .as_ref()
            .is_some_and(|c| !c.pii.counts.is_empty());
        let stands = apply_policy(
            &mut record,
            &self.policy,
            &decision,
            self.limits.as_ref(),
            pii_found,
        );
        if stands && self.req.action == Action::Resolve {
            let tools = self
                .tools
                .iter()
                .filter(|(_, call)| decide_through(&self.policy, call, memo).allowed)
                .map(|(t, _)| t.clone())
                .collect();
            record.handle = Some(HandleRecord {
                jti: String::new(),
                expires: self.expires,
                audience: self.audience,
                tools,
            });
        }
        record
    }
}

/// Fills in `record` from the policy's `decision`: allowed and the determining policies; for
/// an allowed gateway call, the PII rule of its permits (under `refuse`, a call with findings,
/// `pii_found`, is denied) and then the limits (`limits`: a refusal, or the price the allowed
/// call logs); for a denial, its reason. Whether the decision stands allowed (an allowed
/// `resolve` then needs its handle's scope).
fn apply_policy(
    record: &mut DecisionRecord,
    policy: &PolicyEngine,
    decision: &Decision,
    limits: Option<&Result<Option<PriceRecord>, Reason>>,
    pii_found: bool,
) -> bool {
    record.allowed = decision.allowed;
    record.policies = decision.policies.clone();
    if decision.allowed
        && let Some(c) = record.call.as_mut()
    {
        let rule = policy.pii_action(&record.policies);
        c.pii.action = rule.as_str().to_owned();
        let refusal = if rule == PiiAction::Refuse && pii_found {
            Some(Reason::PiiRefused)
        } else {
            // Limits last: a call the policy refuses spends nothing.
            match limits {
                Some(Err(reason)) => Some(reason.clone()),
                Some(Ok(price)) => {
                    c.price = price.clone();
                    None
                }
                None => None,
            }
        };
        if let Some(reason) = refusal {
            record.allowed = false;
            record.reason = Some(reason);
            return false;
        }
    }
    if !decision.allowed {
        record.reason = Some(if !decision.errors.is_empty() {
            Reason::PolicyError
        } else if record.policies.is_empty() {
            Reason::NoPermit
        } else {
            Reason::Forbidden {
                policies: record.policies.clone(),
            }
        });
        return false;
    }
    true
}

/// The record's form of attestation facts.
fn facts_record(a: AttestationFacts) -> AttestationFactsRecord {
    AttestationFactsRecord {
        verified: a.verified,
        age_ms: a.age_ms,
        pcr_match: a.pcr_match,
        debug: a.debug,
    }
}

/// [`State::precheck`]'s answer.
struct Precheck<'a> {
    attestation: AttestationFacts,
    counters: Counters,
    /// Left to the policy, or refused by a hard rule.
    open: Result<Open<'a>, Reason>,
}

/// A decision the hard rules leave to the policy.
struct Open<'a> {
    server: &'a ServerState,
    /// For a gateway call: what the rate limits and spend caps say.
    limits: Option<Result<Option<PriceRecord>, Reason>>,
}

/// A discovery's requests (one per server of the agent's tenant), to evaluate.
struct PendingDiscovery {
    policy: Arc<PolicyEngine>,
    requests: Vec<(String, DecisionRequest)>,
}

impl PendingDiscovery {
    fn evaluate(&self, memo: Option<&DecisionMemo>) -> Vec<String> {
        self.requests
            .iter()
            .filter(|(_, req)| decide_through(&self.policy, req, memo).allowed)
            .map(|(id, _)| id.clone())
            .collect()
    }
}

enum Pending {
    Decision(Box<PendingDecision>),
    Discovery(PendingDiscovery),
    Attestation(Box<PendingAttestation>),
}

/// An accepted attestation's document check, against the server's registration when the entry
/// was applied.
struct PendingAttestation {
    verifier: Arc<AttestationVerifier>,
    expect: Expectations,
    /// What the fold read from the unverified document.
    debug: bool,
}

/// The policy evaluation of a logged decision or discovery, computed from the state the entry
/// was applied to and independent of everything applied since: it can run on any thread, in
/// any order, and must pass before the entry counts as checked.
pub(crate) struct Deferred {
    seq: u64,
    what: Pending,
}

impl Deferred {
    /// Evaluates the policy (through `memo`, if any) and compares the outcome with `logged`
    /// (the entry it was made for).
    pub(crate) fn check(
        self,
        logged: &Entry,
        memo: Option<&DecisionMemo>,
    ) -> Result<(), StateError> {
        let seq = self.seq;
        match (self.what, &logged.event) {
            (Pending::Decision(plan), Event::Decision(rec)) => {
                compare_decision(seq, rec, &plan.evaluate(memo))
            }
            (Pending::Discovery(plan), Event::Discovery { servers, .. }) => {
                let replayed = plan.evaluate(memo);
                if *servers == replayed {
                    Ok(())
                } else {
                    Err(StateError::DecisionMismatch {
                        seq,
                        field: "servers",
                        logged: Box::new(servers.clone().into()),
                        replayed: Box::new(replayed.into()),
                    })
                }
            }
            (Pending::Attestation(plan), Event::Attestation(rec)) => {
                let attested = verify_server_document(
                    &plan.verifier,
                    &plan.expect,
                    &rec.document,
                    logged.time,
                )
                .map_err(|r| StateError::AttestationMismatch {
                    seq,
                    logged: None,
                    replayed: Some(r),
                })?;
                if rec.measurement != Some(attested.measurement) {
                    return Err(StateError::MeasurementMismatch { seq });
                }
                if attested.debug != plan.debug {
                    return Err(StateError::Inconsistent {
                        seq,
                        what: "the attestation document reads differently verified and unverified",
                    });
                }
                Ok(())
            }
            (what, other) => Err(StateError::DecisionMismatch {
                seq,
                field: "event",
                logged: Box::new(other.type_name().into()),
                replayed: Box::new(
                    match what {
                        Pending::Decision(_) => "decision",
                        Pending::Discovery(_) => "discovery",
                        Pending::Attestation(_) => "attestation",
                    }
                    .into(),
                ),
            }),
        }
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
    use serde_json::{Value as J, json};
    let mismatch = |field, logged: J, replayed: J| {
        Err(StateError::DecisionMismatch {
            seq,
            field,
            logged: Box::new(logged),
            replayed: Box::new(replayed),
        })
    };
    let facts = |a: &AttestationFactsRecord| json!({ "verified": a.verified, "age_ms": a.age_ms, "pcr_match": a.pcr_match, "debug": a.debug });
    let counters = |d: &DecisionRecord| json!({ "calls_last_minute": d.calls_last_minute, "spend_micros": d.spend_micros });
    let handle = |h: &Option<HandleRecord>| {
        h.as_ref().map_or(
            J::Null,
            |h| json!({ "expires": h.expires, "audience": h.audience, "tools": h.tools }),
        )
    };
    if logged.allowed != replayed.allowed {
        return mismatch("allowed", logged.allowed.into(), replayed.allowed.into());
    }
    if logged.policies != replayed.policies {
        return mismatch(
            "policies",
            logged.policies.clone().into(),
            replayed.policies.clone().into(),
        );
    }
    if logged.attestation != replayed.attestation {
        return mismatch(
            "attestation facts",
            facts(&logged.attestation),
            facts(&replayed.attestation),
        );
    }
    if logged.calls_last_minute != replayed.calls_last_minute
        || logged.spend_micros != replayed.spend_micros
    {
        return mismatch("counters", counters(logged), counters(replayed));
    }
    // Reasons are compared as typed values (code and data), never as their text.
    if logged.reason != replayed.reason {
        let show = |r: &Option<Reason>| serde_json::to_value(r).unwrap_or(J::Null);
        return mismatch("reason", show(&logged.reason), show(&replayed.reason));
    }
    // The call's own facts are inputs (taken from the log); its PII rule is decided.
    let rule = |d: &DecisionRecord| d.call.as_ref().map(|c| c.pii.action.clone());
    if rule(logged) != rule(replayed) {
        return mismatch("pii rule", rule(logged).into(), rule(replayed).into());
    }
    let price = |d: &DecisionRecord| {
        d.call
            .as_ref()
            .and_then(|c| c.price.as_ref())
            .map(|p| json!({ "amount": p.amount, "asset": p.asset }))
            .unwrap_or(J::Null)
    };
    if price(logged) != price(replayed) {
        return mismatch("price", price(logged), price(replayed));
    }
    match (&logged.handle, &replayed.handle) {
        (None, None) => Ok(()),
        (Some(l), Some(r))
            if l.expires == r.expires && l.audience == r.audience && l.tools == r.tools =>
        {
            if l.jti.is_empty() {
                mismatch("handle jti", J::from(""), J::from("a random jti"))
            } else {
                Ok(())
            }
        }
        _ => mismatch("handle", handle(&logged.handle), handle(&replayed.handle)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::EntryHash;
    use serde_json::json;

    /// What the tests that fold a log from its genesis share: the admin key (`[1; 32]`, the one
    /// genesis names), the time every entry carries, and the genesis hash admin requests name.
    struct Genesis {
        admin: ed25519_dalek::SigningKey,
        now: UnixMillis,
        hash: EntryHash,
    }

    impl Genesis {
        /// Entry `seq` carrying `event`, at [`Genesis::now`].
        fn entry(&self, seq: u64, event: Event) -> Entry {
            Entry {
                seq,
                prev: EntryHash::ZERO,
                epoch: 0,
                time: self.now,
                event,
            }
        }

        /// An admin request for the test deployment, signed by the genesis admin key (its bytes).
        fn signed(&self, nonce: u8, action: AdminAction) -> Vec<u8> {
            crate::admin::AdminRequest {
                time: self.now,
                nonce: [nonce; 16],
                deployment: Deployment {
                    origin: "attestplane.test/log".into(),
                    genesis: self.hash,
                },
                action,
            }
            .sign(&self.admin.verifying_key(), &self.admin)
            .unwrap()
        }
    }

    /// A state with its genesis entry (seq 1) folded, and the [`Genesis`] that made it.
    fn after_genesis() -> (State, Genesis) {
        let g = Genesis {
            admin: ed25519_dalek::SigningKey::from_bytes(&[1; 32]),
            now: UnixMillis::from_millis(1_000),
            hash: EntryHash::from_bytes([9; 32]),
        };
        let mut state = State::new(TrustAnchor::aws_nitro_root_g1());
        let genesis = Event::Genesis {
            admin_keys: vec![g.admin.verifying_key().to_bytes()],
            host_chosen: false,
        };
        state
            .fold(1, &g.entry(1, genesis), ApplyMode::Recheck)
            .unwrap();
        state.set_genesis_hash(g.hash);
        (state, g)
    }

    fn principal() -> PrincipalRecord {
        PrincipalRecord {
            agent: "agent".into(),
            user: "user".into(),
            tenant: "acme".into(),
            roles: vec![],
            issuer: "https://idp.example".into(),
        }
    }

    fn decision_entry(seq: u64, time: UnixMillis, record: DecisionRecord) -> Entry {
        Entry {
            seq,
            prev: EntryHash::ZERO,
            epoch: 0,
            time,
            event: Event::Decision(Box::new(record)),
        }
    }

    #[test]
    fn logged_decision_with_another_reason_code_is_named_with_both_values() {
        let mut state = State::new(TrustAnchor::aws_nitro_root_g1());
        let now = UnixMillis::from_millis(1_000);
        let record = state.decide(&principal(), Action::Resolve, "nowhere", None, now);
        assert_eq!(
            record.reason,
            Some(Reason::UnknownServer {
                server: "nowhere".into()
            })
        );
        state
            .fold(
                2,
                &decision_entry(2, now, record.clone()),
                ApplyMode::Recheck,
            )
            .unwrap();

        let mut tampered = record;
        tampered.reason = Some(Reason::NoPermit);
        match state.fold(3, &decision_entry(3, now, tampered), ApplyMode::Recheck) {
            Err(StateError::DecisionMismatch {
                seq,
                field,
                logged,
                replayed,
            }) => {
                assert_eq!((seq, field), (3, "reason"));
                assert_eq!(*logged, json!({ "code": "no_permit" }));
                assert_eq!(
                    *replayed,
                    json!({ "code": "unknown_server", "server": "nowhere" })
                );
            }
            other => panic!("a changed reason code was not named: {other:?}"),
        }
    }

    #[test]
    fn a_forged_resource_or_prompt_decision_is_named_by_the_fold() {
        let mut state = State::new(TrustAnchor::aws_nitro_root_g1());
        let now = UnixMillis::from_millis(1_000);
        let none = BTreeMap::new();
        for (seq, action, item) in [
            (2, Action::ReadResource, "file:///docs/a"),
            (6, Action::GetPrompt, "greet"),
        ] {
            let record = state
                .decide_gated(
                    &principal(),
                    action,
                    "nowhere",
                    item,
                    [0; 32],
                    None,
                    &none,
                    now,
                )
                .unwrap();
            assert_eq!(record.action, action.as_str());
            assert!(!record.allowed);
            assert!(record.call.is_some());
            state
                .fold(
                    seq,
                    &decision_entry(seq, now, record.clone()),
                    ApplyMode::Recheck,
                )
                .unwrap();
            let named = |state: &mut State, at: u64, r: DecisionRecord| match state.fold(
                at,
                &decision_entry(at, now, r),
                ApplyMode::Recheck,
            ) {
                Err(StateError::DecisionMismatch { seq, field, .. }) => (seq, field),
                other => panic!(
                    "a forged {} decision was not named: {other:?}",
                    action.as_str()
                ),
            };
            let mut allowed = record.clone();
            allowed.allowed = true;
            allowed.reason = None;
            assert_eq!(named(&mut state, seq + 1, allowed), (seq + 1, "allowed"));
            let mut bare = record.clone();
            bare.call = None;
            assert_eq!(named(&mut state, seq + 2, bare), (seq + 2, "call"));
            let mut other = record;
            other.action = "read_everything".into();
            assert_eq!(named(&mut state, seq + 3, other), (seq + 3, "action"));
        }
        // Not a gateway action.
        assert!(
            state
                .decide_gated(
                    &principal(),
                    Action::Resolve,
                    "nowhere",
                    "x",
                    [0; 32],
                    None,
                    &none,
                    now
                )
                .is_err()
        );
    }

    #[test]
    fn reason_is_logged_as_its_code_so_rewording_its_text_changes_no_verdict() {
        // The entry holds the code and its data, never the sentence: the text can be reworded
        // without changing a byte of any log, and replay compares the typed values.
        let state = State::new(TrustAnchor::aws_nitro_root_g1());
        let now = UnixMillis::from_millis(1_000);
        let record = state.decide(&principal(), Action::Resolve, "nowhere", None, now);
        let reason = record.reason.clone().unwrap();
        let payload = decision_entry(2, now, record).payload().unwrap();
        let has = |needle: &[u8]| payload.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"unknown_server"));
        assert!(!has(reason.to_string().as_bytes()));
        let decoded = Entry::from_payload(&payload).unwrap();
        let Event::Decision(d) = decoded.event else {
            panic!("not a decision")
        };
        assert_eq!(d.reason, Some(reason));
    }

    #[test]
    fn refused_admin_request_must_be_refused_by_replay_for_the_logged_reason() {
        let mut state = State::new(TrustAnchor::aws_nitro_root_g1());
        let admin = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
        let genesis = Entry {
            seq: 1,
            prev: EntryHash::ZERO,
            epoch: 0,
            time: UnixMillis::from_millis(1_000),
            event: Event::Genesis {
                admin_keys: vec![admin.verifying_key().to_bytes()],
                host_chosen: false,
            },
        };
        state.fold(1, &genesis, ApplyMode::Recheck).unwrap();
        let genesis_hash = EntryHash::from_bytes([9; 32]);
        state.set_genesis_hash(genesis_hash);
        let request = crate::admin::AdminRequest {
            time: UnixMillis::from_millis(1_000),
            nonce: [3; 16],
            deployment: Deployment {
                origin: "attestplane.test/log".into(),
                genesis: genesis_hash,
            },
            action: AdminAction::RevokeServer { id: "s".into() },
        }
        .sign(&admin.verifying_key(), &admin)
        .unwrap();
        let admin_entry = |reason| Entry {
            seq: 2,
            prev: EntryHash::ZERO,
            epoch: 0,
            time: UnixMillis::from_millis(1_000),
            event: Event::Admin {
                request: request.clone(),
                accepted: false,
                reason: Some(reason),
            },
        };
        // Logged as refused as stale: replay refuses it because the server is unknown.
        match state.fold(2, &admin_entry(Reason::StaleRequest), ApplyMode::Recheck) {
            Err(StateError::AdminMismatch {
                logged, replayed, ..
            }) => {
                assert_eq!(logged, Reason::StaleRequest);
                assert_eq!(replayed, Some(Reason::UnknownServer { server: "s".into() }));
            }
            other => panic!("a wrong refusal reason was not named: {other:?}"),
        }
        state
            .fold(
                2,
                &admin_entry(Reason::UnknownServer { server: "s".into() }),
                ApplyMode::Recheck,
            )
            .unwrap();
    }

    #[test]
    fn server_without_attestation_is_registered_never_attested_and_limits_fold() {
        use crate::admin::{
            Assurance, ClientRequest, Digest32, Price, RateLimit, ScopeKind, SpendCap,
        };
        let (mut state, g) = after_genesis();
        let now = g.now;
        let at = |seq, event| g.entry(seq, event);
        let signed = |nonce: u8, action| g.signed(nonce, action);
        let spec = ServerSpec {
            id: "plain".into(),
            name: "Plain".into(),
            tenant: "acme".into(),
            resource: "https://plain.example/mcp".into(),
            endpoint: "http://plain.example".into(),
            pcrs: BTreeMap::new(),
            allow_debug: false,
            max_attestation_age_ms: 60_000,
            tools: [("echo".to_string(), Digest32([5; 32]))].into(),
            assurance: Assurance::None,
            prices: [(
                "echo".to_string(),
                Price {
                    amount: 3,
                    asset: "credits".into(),
                },
            )]
            .into(),
            client_requests: [ClientRequest::Elicitation].into(),
        };
        let rates = vec![RateLimit {
            scope: ScopeKind::Agent,
            rate_per_minute: 30,
            burst: 5,
        }];
        let spends = vec![SpendCap {
            scope: ScopeKind::Tenant,
            asset: "credits".into(),
            cap: 100,
            window_ms: 3_600_000,
        }];
        for (seq, request) in [
            (2, signed(2, AdminAction::RegisterServer(spec.clone()))),
            (
                3,
                signed(
                    3,
                    AdminAction::SetLimits {
                        rates: rates.clone(),
                        spends: spends.clone(),
                    },
                ),
            ),
        ] {
            assert!(state.check_admin(&request, now).is_ok());
            let event = Event::Admin {
                request,
                accepted: true,
                reason: None,
            };
            state
                .fold(seq, &at(seq, event), ApplyMode::Recheck)
                .unwrap();
        }
        assert_eq!(state.server("plain").unwrap().spec, spec);
        assert_eq!(state.limits(), (rates.as_slice(), spends.as_slice()));
        // No document can attest it: there are no PCRs to hold one to.
        assert_eq!(
            state.check_attestation("plain", &[1; 32], b"any document", now),
            Err(Reason::NotAttestable)
        );
        // Its calls are not refused for lack of attestation: the policy decides (here: no
        // policy, so deny by default).
        let d = state.decide(&principal(), Action::Call, "plain", Some("echo"), now);
        assert_eq!(d.reason, Some(Reason::NoPermit));
    }

    #[test]
    fn a_replay_answered_from_the_memo_still_names_a_forged_decision_or_discovery() {
        use crate::admin::{Assurance, Digest32};
        // A replay's fold answers a request the memo holds on the spot, without planning it
        // for Cedar: a forged outcome of a request answered so must still be named, by the
        // fold itself, field by field as the planned check names it.
        let (mut state, g) = after_genesis();
        let now = g.now;
        let at = |seq, event| g.entry(seq, event);
        let spec = |id: &str| ServerSpec {
            id: id.into(),
            name: id.into(),
            tenant: "acme".into(),
            resource: format!("https://{id}.example/mcp"),
            endpoint: format!("http://{id}.example"),
            pcrs: BTreeMap::new(),
            allow_debug: false,
            max_attestation_age_ms: 60_000,
            tools: [
                ("echo".to_string(), Digest32([5; 32])),
                ("wipe".to_string(), Digest32([6; 32])),
            ]
            .into(),
            assurance: Assurance::None,
            prices: BTreeMap::new(),
            client_requests: Default::default(),
        };
        let policy = r#"permit(principal, action, resource) when { principal.roles.contains("user") };
            forbid(principal, action, resource is Attestplane::Tool) when { resource.name == "wipe" };
            forbid(principal, action, resource == Attestplane::Server::"hidden");"#;
        for (seq, action) in [
            (2, AdminAction::RegisterServer(spec("plain"))),
            (3, AdminAction::RegisterServer(spec("hidden"))),
            (
                4,
                AdminAction::SetPolicy {
                    text: policy.into(),
                },
            ),
        ] {
            let request = g.signed(seq as u8, action);
            let event = Event::Admin {
                request,
                accepted: true,
                reason: None,
            };
            state
                .fold(seq, &at(seq, event), ApplyMode::Recheck)
                .unwrap();
        }
        let who = PrincipalRecord {
            roles: vec!["user".into()],
            ..principal()
        };
        let memo = DecisionMemo::new();
        // Folds `event` as a replay does; whether it was planned for Cedar, and the outcome.
        let replay = |state: &mut State, seq: u64, event: Event| {
            let entry = at(seq, event);
            match state.fold_deferring(seq, &entry, ApplyMode::Recheck, true, Some(&memo)) {
                Ok(None) => (false, Ok(())),
                Ok(Some(deferred)) => (true, deferred.check(&entry, Some(&memo))),
                Err(e) => (false, Err(e)),
            }
        };
        let field = |r: Result<(), StateError>| match r {
            Err(StateError::DecisionMismatch { field, .. }) => field,
            other => panic!("a forged outcome was not named: {other:?}"),
        };
        // Decided live on the state as it is (each allowed call counts for the next).
        let call = |state: &State| {
            let d = state.decide(&who, Action::Call, "plain", Some("echo"), now);
            assert!(d.allowed);
            Event::Decision(Box::new(d))
        };
        let resolve = |state: &State| {
            let mut d = state.decide(&who, Action::Resolve, "plain", None, now);
            let handle = d.handle.as_mut().unwrap();
            assert_eq!(handle.tools, ["echo"]);
            handle.jti = "jti".into();
            d
        };
        let discovery = |servers: &[&str]| Event::Discovery {
            principal: who.clone(),
            servers: servers.iter().map(|s| s.to_string()).collect(),
        };
        assert_eq!(state.discover(&who, now), ["plain"]);
        // First seen: planned for Cedar, and right.
        let decision = |r: DecisionRecord| Event::Decision(Box::new(r));
        let e = call(&state);
        assert_eq!(replay(&mut state, 5, e), (true, Ok(())));
        let e = decision(resolve(&state));
        assert_eq!(replay(&mut state, 6, e), (true, Ok(())));
        assert_eq!(replay(&mut state, 7, discovery(&["plain"])), (true, Ok(())));
        // Seen again: answered from the memo, and right.
        let e = call(&state);
        assert_eq!(replay(&mut state, 8, e), (false, Ok(())));
        let e = decision(resolve(&state));
        assert_eq!(replay(&mut state, 9, e), (false, Ok(())));
        assert_eq!(
            replay(&mut state, 10, discovery(&["plain"])),
            (false, Ok(()))
        );
        // Forged: named by the fold, without Cedar.
        let Event::Decision(allowed) = call(&state) else {
            unreachable!()
        };
        let denied = DecisionRecord {
            allowed: false,
            reason: Some(Reason::NoPermit),
            ..(*allowed).clone()
        };
        let (planned, outcome) = replay(&mut state, 11, decision(denied));
        assert_eq!((planned, field(outcome)), (false, "allowed"));
        let mut wider = resolve(&state);
        if let Some(h) = wider.handle.as_mut() {
            h.tools.push("wipe".into());
        }
        let (planned, outcome) = replay(&mut state, 12, decision(wider));
        assert_eq!((planned, field(outcome)), (false, "handle"));
        let other_policies = DecisionRecord {
            policies: vec!["policy9".into()],
            ..*allowed
        };
        let (planned, outcome) = replay(&mut state, 13, decision(other_policies));
        assert_eq!((planned, field(outcome)), (false, "policies"));
        // A discovery listing a server the policy hides, or missing one: the lists differ, so
        // the fold plans it and the check names it.
        for (seq, servers) in [(14, &["hidden", "plain"][..]), (15, &[][..])] {
            let (planned, outcome) = replay(&mut state, seq, discovery(servers));
            assert_eq!((planned, field(outcome)), (true, "servers"));
        }
        let stats = memo.stats();
        // Cedar answered each request once: the call (which the resolve's `echo` shares), the
        // resolve, its `wipe`, and the two servers of the discovery.
        assert_eq!(stats.misses, 1 + 1 + 1 + 2, "{stats:?}");
    }

    /// A small deterministic generator (xorshift), so the test needs no crate.
    fn next(seed: &mut u64) -> u64 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    }

    #[test]
    fn sweeping_expired_calls_and_limit_state_once_a_second_changes_no_count_decision_or_snapshot()
    {
        // Two states driven by the same calls: one prunes at every entry (its sweep forced),
        // the other as `prune` does, once per `SWEEP_INTERVAL_MS`. At every step the call
        // counts of every agent, the rate and spend decisions of every call and the snapshot
        // must agree, and the swept state must hold no more than a sweep interval's worth
        // more. A cap removed and put back within a sweep interval starts empty in both.
        use crate::gateway::limits::{Price, ScopeKind};
        let agents = ["a1", "a2", "a3", "a4", "a5"];
        let rates = vec![RateLimit {
            scope: ScopeKind::Agent,
            rate_per_minute: 30,
            burst: 4,
        }];
        let caps = vec![SpendCap {
            scope: ScopeKind::Agent,
            asset: "USDC".into(),
            cap: 20,
            window_ms: 7_000,
        }];
        let price = Price {
            amount: 7,
            asset: "USDC".into(),
        };
        let mut eager = State::new(TrustAnchor::aws_nitro_root_g1());
        let mut lazy = State::new(TrustAnchor::aws_nitro_root_g1());
        for s in [&mut eager, &mut lazy] {
            s.set_limits(rates.clone(), caps.clone());
        }
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut now = 1_000_000u64;
        let mut swept_fewer = false;
        for step in 0..20_000 {
            now += next(&mut seed) % 700;
            let at = UnixMillis::from_millis(now);
            if step % 5_000 == 4_999 {
                // The cap goes and comes back at once.
                for s in [&mut eager, &mut lazy] {
                    s.set_limits(rates.clone(), Vec::new());
                    s.prune(at);
                    s.set_limits(rates.clone(), caps.clone());
                }
            }
            eager.next_sweep = 0;
            eager.prune(at);
            lazy.prune(at);
            let agent = agents[(next(&mut seed) % 5) as usize];
            for a in agents {
                assert_eq!(eager.counters(a, at), lazy.counters(a, at), "step {step}");
            }
            let scope = |agent: &str| CallScope {
                tenant: "acme".into(),
                user: "u".into(),
                agent: agent.into(),
                server: "srv".into(),
                tool: "pay".into(),
            };
            let mut outcomes = Vec::new();
            for s in [&mut eager, &mut lazy] {
                let rate = decide_rate(&s.rate_state, now, &s.rate_limits, &scope(agent));
                let spend = reserve(
                    &s.spend_state,
                    now,
                    &s.spend_caps,
                    &scope(agent),
                    Some(&price),
                );
                let allowed = rate.decision == crate::gateway::limits::RateDecision::Allowed
                    && spend.decision == crate::gateway::limits::SpendDecision::Allowed;
                if allowed {
                    s.rate_state.apply(&rate);
                    s.spend_state.apply(&spend.updates);
                    s.record_call(agent, at);
                }
                outcomes.push((rate.decision, spend.decision));
            }
            assert_eq!(outcomes[0], outcomes[1], "step {step}");
            assert_eq!(eager.snapshot(), lazy.snapshot(), "step {step}");
            let held = |s: &State| s.calls.values().map(VecDeque::len).sum::<usize>();
            swept_fewer |= held(&lazy) > held(&eager);
            // The unswept calls are those that left the window within one sweep interval: the
            // rate limit (a burst of 4, then one per 2 s) lets each of the five agents make at
            // most 4 + 1 calls in a second.
            assert!(
                held(&lazy) <= held(&eager) + 5 * (4 + 1),
                "step {step}: {} calls held against {}",
                held(&lazy),
                held(&eager)
            );
        }
        assert!(
            swept_fewer,
            "the lazy state never held an expired call: the test is vacuous"
        );
    }
}
