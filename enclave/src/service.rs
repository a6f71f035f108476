//! The enclave's request handling: a plain function of (request, time) that returns the
//! replies to send, sans I/O.
//!
//! Every request that changes the log is answered in two phases, returned together. The enclave
//! signs the new entries, applies them to its state, and answers `Persist { entries }` under the
//! request's id, followed by the final reply (a handle, an admin result …) wrapped in
//! `Held { through_seq }`, which names the last of those entries. The host releases the wrapped
//! reply only once every entry through `through_seq` is durable in its store, and reports
//! durability with `Durable { through_seq }`, which the enclave records (its checkpoints cover
//! durable entries only, and its MCP gateway waits on it). Until protocol version 2 the enclave
//! held the final reply itself until that `Durable`; that kept nothing from the host, which
//! stores the entries and is the one that would report them durable (it could always release
//! early by lying with `Durable`), and cost every request two more crossings between host and
//! enclave. A host that releases early, or lies about durability, can lose entries, but never
//! without the loss showing: the next boot's replay, an auditor's checkpoint and every receipt
//! (a handle names its entry's sequence number) expose it.
//!
//! Boot: the host streams the stored log in (`ReplayBegin`, `ReplayEntries`…, `ReplayEnd`).
//! The enclave verifies it and folds it into its state with the verifier library's one replay
//! loop ([`attestplane_verifier::replay::Replay`], the same the auditor's CLI runs) — every
//! signature, link and epoch document, against the PCRs the enclave itself is running with. A log that fails verification leaves the enclave refusing to serve, with the reason.
//! Then it opens a new epoch linked to the old head (and, on an empty log, writes the genesis
//! admin key set).
//!
//! ## Which logged decisions are evaluated again
//!
//! Live, the enclave decides, signs the entry, and applies that entry to its state with
//! [`State::apply_own`], in [`ApplyMode::Trusted`]: from the entry as it was signed, without
//! decoding the bytes back and without evaluating the decision a second time (the decision it
//! has just made is the one it applies). The state change is the one [`State::apply`] makes for
//! the same entry once the log verifier has checked it.
//!
//! At boot, every entry's signature, link and epoch binding is verified, always. What differs
//! is whether a logged decision (or discovery) is evaluated again against the replayed state,
//! and that is chosen per epoch ([`EpochTrust`]):
//!
//! - An epoch whose opening attestation document carries this enclave's own PCR0/1/2 (not in
//!   debug mode) was written by the same measured image: the same code made those decisions,
//!   on the state the same code had derived from the same verified prefix of the log, and only
//!   that image's enclave ever held the epoch key that signed them. Evaluating them again would
//!   re-run this very code on the very same inputs; it could reveal only a non-deterministic
//!   policy engine, not a forgery. So they are applied as logged ([`ApplyMode::Trusted`]).
//!   Admin requests and server attestations are still checked in full (they are rare, and they
//!   are what the later decisions depend on).
//! - Any other epoch (another image, or debug mode, where PCRs are zero and attest nothing) is
//!   re-decided entry by entry ([`ApplyMode::Recheck`]): a logged decision that the policy
//!   would not make stops the boot.
//!
//! An auditor who replays the log with the verifier CLI re-decides everything, whoever wrote it.
//!
//! ## Which images may have written the log
//!
//! The enclave accepts epochs of its own image, of the images pinned with
//! [`Enclave::with_pinned_images`] (for an upgraded image: the one that started the log), and of
//! any image an accepted `allow_image` admin act earlier in the log allowed. An epoch of any
//! other image stops the boot (`ImageNotAllowed`, naming the epoch's first entry and its
//! PCRs). Epochs of images other than its own are re-decided in full.
//!
//! [`ApplyMode::Trusted`]: attestplane_verifier::state::ApplyMode::Trusted
//! [`ApplyMode::Recheck`]: attestplane_verifier::state::ApplyMode::Recheck

use std::collections::BTreeMap;
use std::sync::Arc;

use attestplane_proto::{ByteBuf, ErrorCode, PROTOCOL_VERSION, Request, Response, ServerInfo};
use attestplane_verifier::UnixMillis;
use attestplane_verifier::admin::SignedAdminRequest;
use attestplane_verifier::attestation::{Pcr, PcrIndex, TrustAnchor};
use attestplane_verifier::entry::{AttestationRecord, EntryHash, Event};
use attestplane_verifier::handle::{HandleClaims, Jwks, encode_handle};
use attestplane_verifier::log::{LogError, LogPolicy, image_matches};
use attestplane_verifier::policy::Action;
use attestplane_verifier::reason::Reason;
/// How boot replay applies each epoch: trusted for the enclave's own image, re-checked for any
/// other (the verifier's, re-exported: the one replay loop lives there).
pub use attestplane_verifier::replay::EpochTrust;
use attestplane_verifier::replay::Replay;
use attestplane_verifier::state::State;

use ed25519_dalek::VerifyingKey;

use crate::identity::BearerCache;
use crate::nsm::Nsm;
use crate::writer::{Head, LogWriter, Written};

/// How long an attestation challenge nonce stays valid.
pub const CHALLENGE_TTL_MS: u64 = 5 * 60 * 1000;

/// The most outstanding attestation challenges.
pub const MAX_CHALLENGES: usize = 10_000;

/// Length of an attestation challenge nonce.
pub const NONCE_LEN: usize = 32;

/// What the enclave is configured with at start-up.
#[derive(Clone, Debug)]
pub struct EnclaveConfig {
    /// The log's origin: the checkpoint key name.
    pub origin: String,
    /// The `iss` of the handles it issues.
    pub issuer: String,
    /// The root its own NSM's documents chain to (AWS's in production, the mock's locally).
    pub self_anchor: TrustAnchor,
    /// The root MCP servers' documents must chain to.
    pub server_anchor: TrustAnchor,
    /// Accept its own epochs from a debug-mode enclave when replaying (local development).
    pub allow_debug: bool,
}

struct Booting {
    replay: Replay,
    genesis_keys: Vec<[u8; 32]>,
    expected: u64,
    /// The enclave's own PCR0–2.
    own: BTreeMap<PcrIndex, Pcr>,
}

enum Phase {
    /// Waiting for `ReplayBegin`.
    Booting,
    /// Receiving the stored log.
    Replaying(Box<Booting>),
    /// Serving.
    Ready(Box<LogWriter>),
    /// The stored log failed verification: refuse everything.
    Broken { seq: Option<u64>, message: String },
}

/// The enclave.
pub struct Enclave {
    nsm: Arc<dyn Nsm>,
    config: EnclaveConfig,
    state: State,
    phase: Phase,
    durable: Option<u64>,
    challenges: BTreeMap<String, (Vec<u8>, UnixMillis)>,
    pinned_genesis: Option<Vec<[u8; 32]>>,
    pinned_images: Vec<BTreeMap<PcrIndex, Pcr>>,
    insecure_host_chosen_genesis: bool,
    bearers: BearerCache,
}

impl std::fmt::Debug for Enclave {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enclave")
            .field("state", &self.state)
            .field("durable", &self.durable)
            .finish_non_exhaustive()
    }
}

/// Replies to send, each under a request id.
pub type Replies = Vec<(u64, Response)>;

fn error(id: u64, code: ErrorCode, message: &str) -> Replies {
    vec![(id, Response::error(code, message))]
}

/// The code of a logged refusal: `NotFound` for an unknown server or tool, else `Denied`.
/// Chosen by the reason's variant, never by its text.
fn refusal_code(reason: &Reason) -> ErrorCode {
    if reason.is_not_found() {
        ErrorCode::NotFound
    } else {
        ErrorCode::Denied
    }
}

impl Enclave {
    /// A booting enclave over `nsm`.
    pub fn new(nsm: Arc<dyn Nsm>, config: EnclaveConfig) -> Self {
        Self {
            // Admin requests must name the origin this enclave signs checkpoints under.
            state: State::new(config.server_anchor.clone()).with_origin(config.origin.clone()),
            nsm,
            config,
            phase: Phase::Booting,
            durable: None,
            challenges: BTreeMap::new(),
            pinned_genesis: None,
            pinned_images: Vec::new(),
            insecure_host_chosen_genesis: false,
            bearers: BearerCache::default(),
        }
    }

    /// Pins the genesis admin key set: the enclave uses exactly these keys for a new log and
    /// refuses a stored log whose genesis names others or was chosen by a host. In production
    /// the keys are on the measured image's command line (`--genesis-admin-key`), so PCRs
    /// attest them. Without pinned keys the enclave refuses to start a new log, unless
    /// [`Enclave::with_insecure_host_chosen_genesis`] says otherwise.
    pub fn with_pinned_genesis(mut self, mut keys: Vec<[u8; 32]>) -> Self {
        keys.sort_unstable();
        keys.dedup();
        self.pinned_genesis = Some(keys);
        self
    }

    /// Pins images, besides its own, whose epochs the enclave accepts in a stored log without
    /// an `allow_image` act before them: the images of the log's earlier epochs that this image
    /// continues (an upgraded image pins the one that started the log). Like the genesis keys,
    /// these belong in the measured image. Any other image's epochs are accepted only after an
    /// accepted `allow_image` act names them.
    pub fn with_pinned_images(mut self, images: Vec<BTreeMap<PcrIndex, Pcr>>) -> Self {
        self.pinned_images = images;
        self
    }

    /// DEVELOPMENT ONLY: without pinned keys, start a new log under the admin keys the host
    /// sends with `ReplayBegin`, and accept a stored log whose genesis a host chose. The
    /// genesis entry records it (`host_chosen`), so every auditor sees that whoever ran the
    /// host chose the log's administrators. Ignored when keys are pinned.
    pub fn with_insecure_host_chosen_genesis(mut self) -> Self {
        self.insecure_host_chosen_genesis = true;
        self
    }

    /// The state derived from the log so far.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Whether it serves requests.
    pub fn is_ready(&self) -> bool {
        matches!(self.phase, Phase::Ready(_))
    }

    fn writer(&self) -> Option<&LogWriter> {
        match &self.phase {
            Phase::Ready(w) => Some(w),
            _ => None,
        }
    }

    /// Handles one request at time `now` (the enclave's clock).
    pub fn handle(&mut self, id: u64, request: Request, now: UnixMillis) -> Replies {
        if let Phase::Broken { seq, message } = &self.phase {
            return vec![(id, Response::broken_log(*seq, message))];
        }
        match request {
            Request::Hello { version } => {
                if version != PROTOCOL_VERSION {
                    return error(
                        id,
                        ErrorCode::UnsupportedVersion,
                        "unsupported protocol version",
                    );
                }
                let head = self.writer().map(|w| w.head().clone());
                vec![(
                    id,
                    Response::Hello {
                        version: PROTOCOL_VERSION,
                        ready: self.is_ready(),
                        epoch: head.as_ref().and_then(|h| h.epoch),
                        head_seq: head.and_then(|h| h.size.checked_sub(1)),
                    },
                )]
            }
            Request::ReplayBegin {
                genesis_admin_keys,
                total_entries,
            } => self.replay_begin(id, genesis_admin_keys, total_entries, now),
            Request::ReplayEntries { entries } => self.replay_entries(id, &entries),
            Request::ReplayEnd => self.replay_end(id, now),
            Request::Durable { through_seq } => self.durable(id, through_seq),
            Request::Status => {
                let head = self.writer().map(|w| w.head().clone());
                vec![(
                    id,
                    Response::Status {
                        ready: self.is_ready(),
                        epoch: head.as_ref().and_then(|h| h.epoch),
                        head_seq: head.and_then(|h| h.size.checked_sub(1)),
                        durable_seq: self.durable,
                        servers: self.state.servers().count() as u64,
                    },
                )]
            }
            other => {
                if !self.is_ready() {
                    return error(
                        id,
                        ErrorCode::NotReady,
                        "the enclave has not finished booting",
                    );
                }
                self.serve(id, other, now)
            }
        }
    }

    fn replay_begin(
        &mut self,
        id: u64,
        keys: Vec<ByteBuf>,
        total: u64,
        now: UnixMillis,
    ) -> Replies {
        if !matches!(self.phase, Phase::Booting) {
            return error(id, ErrorCode::Conflict, "replay already started");
        }
        let mut genesis_keys = Vec::with_capacity(keys.len());
        for k in &keys {
            let usable = <[u8; 32]>::try_from(k.as_slice())
                .ok()
                .filter(|k| VerifyingKey::from_bytes(k).is_ok_and(|k| !k.is_weak()));
            match usable {
                Some(k) => genesis_keys.push(k),
                None => {
                    return error(
                        id,
                        ErrorCode::BadRequest,
                        "genesis admin keys must be valid 32-byte Ed25519 public keys",
                    );
                }
            }
        }
        genesis_keys.sort_unstable();
        genesis_keys.dedup();
        if let Some(pinned) = &self.pinned_genesis {
            if !genesis_keys.is_empty() && genesis_keys != *pinned {
                return error(
                    id,
                    ErrorCode::BadRequest,
                    "genesis admin keys differ from the keys pinned in the enclave",
                );
            }
            genesis_keys = pinned.clone();
        } else if !self.insecure_host_chosen_genesis {
            // Nothing pinned and no development flag: the host's keys are not used.
            genesis_keys.clear();
        }
        let pcrs = match self.own_pcrs() {
            Ok(p) => p,
            Err(m) => return error(id, ErrorCode::Internal, &m),
        };
        let trust = EpochTrust::new(pcrs.clone());
        let own = pcrs.clone();
        let mut images = vec![pcrs];
        images.extend(self.pinned_images.iter().cloned());
        let mut policy = LogPolicy::with_images(self.config.self_anchor.clone(), images);
        policy.allow_debug = self.config.allow_debug;
        // The enclave's own clock is what entries must not postdate; the host cannot move it.
        let replay = match Replay::new(policy, now, self.config.server_anchor.clone()) {
            // Admin requests must name the origin this enclave signs checkpoints under.
            Ok(r) => r.with_trust(trust).with_origin(self.config.origin.clone()),
            Err(e) => return error(id, ErrorCode::Internal, &e.to_string()),
        };
        let replay = match &self.pinned_genesis {
            Some(pinned) => replay.expect_genesis_keys(pinned.clone()),
            None if self.insecure_host_chosen_genesis => replay,
            None => replay.refuse_host_chosen_genesis(),
        };
        self.phase = Phase::Replaying(Box::new(Booting {
            replay,
            genesis_keys,
            expected: total,
            own,
        }));
        vec![(id, Response::Ack)]
    }

    fn own_pcrs(&self) -> Result<BTreeMap<PcrIndex, Pcr>, String> {
        let mut out = BTreeMap::new();
        for i in 0u8..3 {
            let state = self
                .nsm
                .describe_pcr(u16::from(i))
                .map_err(|e| format!("cannot read own PCR{i}: {e}"))?;
            let index = PcrIndex::try_from(i).map_err(|e| e.to_string())?;
            let pcr = Pcr::try_from(state.value.as_slice()).map_err(|e| e.to_string())?;
            out.insert(index, pcr);
        }
        Ok(out)
    }

    fn broken(&mut self, id: u64, seq: Option<u64>, message: String) -> Replies {
        let reply = Response::broken_log(seq, &message);
        self.phase = Phase::Broken { seq, message };
        vec![(id, reply)]
    }

    fn replay_entries(&mut self, id: u64, entries: &[ByteBuf]) -> Replies {
        let Phase::Replaying(booting) = &mut self.phase else {
            return error(id, ErrorCode::Conflict, "no replay in progress");
        };
        // The verifier's one replay loop: signatures, links and epochs, then the state fold
        // (and the pinned genesis keys).
        match booting.replay.push_round(entries) {
            Ok(()) => vec![(id, Response::Ack)],
            Err(e) => self.broken(id, e.seq(), e.to_string()),
        }
    }

    fn replay_end(&mut self, id: u64, now: UnixMillis) -> Replies {
        let phase = std::mem::replace(&mut self.phase, Phase::Booting);
        let Phase::Replaying(booting) = phase else {
            self.phase = phase;
            return error(id, ErrorCode::Conflict, "no replay in progress");
        };
        let Booting {
            replay,
            genesis_keys,
            expected,
            own,
        } = *booting;
        let (v, state) = match replay.into_parts() {
            Ok(parts) => parts,
            Err(e) => return self.broken(id, e.seq(), e.to_string()),
        };
        self.state = state;
        if v.verified() != expected {
            let message = format!(
                "the host announced {} entries and sent {}",
                expected,
                v.verified()
            );
            return self.broken(id, Some(v.verified()), message);
        }
        let head = Head {
            size: v.verified(),
            hash: v.head().unwrap_or(EntryHash::ZERO),
            epoch: v.current_epoch(),
            time: v.last_time().unwrap_or(UnixMillis::from_millis(0)),
            frontier: v.frontier().clone(),
        };
        // This image may continue the log only if it started it, ran it before, or an
        // accepted `allow_image` act allows it: otherwise its epochs would be ones that no
        // auditor pinning the log's images accepts (see the module documentation).
        let ran_before = v.epochs().iter().any(|e| image_matches(&own, &e.image));
        if v.verified() > 0 && !ran_before && !self.state.image_allowed(&own) {
            let e = LogError::ImageNotAllowed {
                seq: v.verified(),
                pcrs: own,
            };
            return self.broken(id, e.seq(), e.to_string());
        }
        let needs_genesis = !self.state.has_genesis();
        if needs_genesis && self.pinned_genesis.is_none() && !self.insecure_host_chosen_genesis {
            let message = "no genesis admin keys are pinned in this image \
                           (--genesis-admin-key): refusing to start a new log under keys the \
                           host chose";
            if head.size == 0 {
                self.phase = Phase::Booting;
                return error(id, ErrorCode::BadRequest, message);
            }
            return self.broken(id, None, message.into());
        }
        if needs_genesis && genesis_keys.is_empty() {
            if head.size == 0 {
                // Nothing was replayed: the host may start over with the keys.
                self.phase = Phase::Booting;
                return error(
                    id,
                    ErrorCode::BadRequest,
                    "an empty log needs the genesis admin keys",
                );
            }
            // A stored log without genesis: its state is in place and cannot be retried.
            return self.broken(id, None, "an empty log needs the genesis admin keys".into());
        }
        let (mut writer, start) =
            match LogWriter::open(self.nsm.as_ref(), head, &self.config.origin, now) {
                Ok(w) => w,
                Err(e) => {
                    return self.broken(id, None, format!("cannot open an epoch: {e}"));
                }
            };
        let mut written = vec![start];
        if needs_genesis {
            match writer.append(
                Event::Genesis {
                    admin_keys: genesis_keys,
                    host_chosen: self.pinned_genesis.is_none(),
                },
                now,
            ) {
                Ok(w) => written.push(w),
                Err(e) => return error(id, ErrorCode::Internal, &e.to_string()),
            }
        }
        for w in &written {
            if let Err(e) = self.apply_written(w) {
                return self.broken(id, Some(w.seq), e);
            }
        }
        self.phase = Phase::Ready(Box::new(writer));
        self.persist_then(id, written, Response::Ack)
    }

    /// Applies an entry this enclave has just decided and signed: from the entry as signed,
    /// without decoding it back or deciding again (see the module documentation).
    fn apply_written(&mut self, w: &Written) -> Result<(), String> {
        if let Event::Genesis { .. } = w.entry.event {
            // The next admin request must name it, before any entry links to it.
            self.state.set_genesis_hash(w.hash);
        }
        self.state
            .apply_own(w.seq, &w.entry)
            .map_err(|e| e.to_string())
    }

    /// Answers `Persist` with the written entries, then `response` wrapped in `Held` through
    /// the last of them: the host releases it once they are durable.
    fn persist_then(&mut self, id: u64, written: Vec<Written>, response: Response) -> Replies {
        let (Some(first_seq), Some(through_seq)) = (
            written.first().map(|w| w.seq),
            written.last().map(|w| w.seq),
        ) else {
            return vec![(id, response)];
        };
        let persist = Response::Persist {
            first_seq,
            entries: written
                .into_iter()
                .map(|w| ByteBuf::from(w.bytes))
                .collect(),
        };
        let held = Response::Held {
            through_seq,
            reply: Box::new(response),
        };
        vec![(id, persist), (id, held)]
    }

    fn durable(&mut self, id: u64, through_seq: u64) -> Replies {
        let head = self.writer().map(|w| w.head().size);
        match head {
            Some(size) if through_seq < size => {}
            _ => return error(id, ErrorCode::BadRequest, "durable beyond the log's head"),
        }
        self.durable = Some(self.durable.map_or(through_seq, |d| d.max(through_seq)));
        vec![(id, Response::Ack)]
    }

    /// Writes one event, applies it, and returns what was written.
    fn write(&mut self, event: Event, now: UnixMillis) -> Result<Written, String> {
        let Phase::Ready(writer) = &mut self.phase else {
            return Err("not ready".into());
        };
        let written = writer.append(event, now).map_err(|e| e.to_string())?;
        if let Err(e) = self.apply_written(&written) {
            // The writer has chained an entry the host will never see: every later entry
            // would link to a missing one. Stop serving rather than write a broken log.
            let message = format!("entry {} could not be applied: {e}", written.seq);
            self.phase = Phase::Broken {
                seq: Some(written.seq),
                message: message.clone(),
            };
            return Err(message);
        }
        Ok(written)
    }

    fn serve(&mut self, id: u64, request: Request, now: UnixMillis) -> Replies {
        // The writer never lets an entry's time go back (it clamps to the head's time), and
        // replay decides at the entry's time: so decide at that time too. Otherwise a clock
        // read out of order would log a decision that replay contradicts, after the writer
        // had already chained the entry.
        let now = self.writer().map_or(now, |w| now.max(w.head().time));
        match request {
            Request::Admin { request } => {
                // Bytes that are not an admin request at all are refused unlogged (the
                // protocol's contract); anything that decodes is logged, accepted or not.
                if let Err(e) = SignedAdminRequest::decode(&request) {
                    return error(
                        id,
                        ErrorCode::BadRequest,
                        &format!("not an admin request: {e}"),
                    );
                }
                let (accepted, reason) = match self.state.check_admin(&request, now) {
                    Ok(_) => (true, None),
                    Err(reason) => (false, Some(reason)),
                };
                let event = Event::Admin {
                    request: request.into_vec(),
                    accepted,
                    reason: reason.clone(),
                };
                match self.write(event, now) {
                    Ok(w) => {
                        let seq = w.seq;
                        self.persist_then(
                            id,
                            vec![w],
                            Response::AdminResult {
                                accepted,
                                seq,
                                reason: reason.as_ref().map(Reason::to_string),
                            },
                        )
                    }
                    Err(e) => error(id, ErrorCode::Internal, &e),
                }
            }
            Request::AttestChallenge { server_id } => self.challenge(id, server_id, now),
            Request::AttestEvidence {
                server_id,
                nonce,
                document,
            } => self.evidence(id, server_id, nonce.into_vec(), document.into_vec(), now),
            Request::Resolve { bearer, server_id } => self.resolve(id, &bearer, &server_id, now),
            Request::Discover { bearer } => self.discover(id, &bearer, now),
            Request::Authorize {
                bearer,
                server_id,
                tool,
            } => self.authorize(id, &bearer, &server_id, &tool, now),
            Request::Checkpoint => self.checkpoint(id),
            Request::GetAttestation { nonce } => self.own_attestation(id, nonce),
            _ => error(id, ErrorCode::BadRequest, "unexpected request"),
        }
    }

    fn challenge(&mut self, id: u64, server_id: String, now: UnixMillis) -> Replies {
        if self.state.server(&server_id).is_none() {
            return error(id, ErrorCode::NotFound, "unknown server");
        }
        self.challenges.retain(|_, (_, expires)| *expires > now);
        if self.challenges.len() >= MAX_CHALLENGES && !self.challenges.contains_key(&server_id) {
            return error(id, ErrorCode::Overloaded, "too many outstanding challenges");
        }
        let nonce = match self.nsm.random(NONCE_LEN) {
            Ok(n) => n,
            Err(e) => return error(id, ErrorCode::Internal, &format!("nsm: {e}")),
        };
        let expires = now.checked_add_millis(CHALLENGE_TTL_MS).unwrap_or(now);
        self.challenges.insert(server_id, (nonce.clone(), expires));
        vec![(
            id,
            Response::Challenge {
                nonce: ByteBuf::from(nonce),
                expires_at_ms: expires.as_millis(),
            },
        )]
    }

    fn evidence(
        &mut self,
        id: u64,
        server_id: String,
        nonce: Vec<u8>,
        document: Vec<u8>,
        now: UnixMillis,
    ) -> Replies {
        if self.state.server(&server_id).is_none() {
            return error(id, ErrorCode::NotFound, "unknown server");
        }
        // The nonce must be the one this enclave issued for this server, unexpired, used once.
        // Evidence that fails this is logged as refused, like any other failed attestation.
        let issued = match self.challenges.get(&server_id) {
            Some((issued, expires)) if *issued == nonce && *expires > now => {
                self.challenges.remove(&server_id);
                true
            }
            _ => false,
        };
        let outcome = if issued {
            self.state
                .check_attestation(&server_id, &nonce, &document, now)
        } else {
            // Logged as refused evidence; the state fold leaves the server's attestation as
            // it was (see `Reason::withdraws_attestation`).
            Err(Reason::NonceNotIssued)
        };
        let (verified, measurement, reason) = match outcome {
            Ok(a) => (true, Some(a.measurement), None),
            Err(reason) => (false, None, Some(reason)),
        };
        let event = Event::Attestation(AttestationRecord {
            server: server_id,
            nonce,
            document,
            verified,
            measurement,
            reason: reason.clone(),
        });
        match self.write(event, now) {
            Ok(w) => {
                let seq = w.seq;
                self.persist_then(
                    id,
                    vec![w],
                    Response::AttestResult {
                        verified,
                        seq,
                        measurement: measurement.map(hex::encode),
                        reason: reason.as_ref().map(Reason::to_string),
                    },
                )
            }
            Err(e) => error(id, ErrorCode::Internal, &e),
        }
    }

    fn resolve(&mut self, id: u64, bearer: &str, server_id: &str, now: UnixMillis) -> Replies {
        let principal = match self.bearers.authenticate(&self.state, bearer, now) {
            Ok(p) => p,
            Err(e) => return error(id, ErrorCode::Unauthenticated, &e.to_string()),
        };
        let mut record = self
            .state
            .decide(&principal, Action::Resolve, server_id, None, now);
        let Some(writer) = self.writer() else {
            return error(id, ErrorCode::NotReady, "not ready");
        };
        let seq = writer.head().size;
        let kid = writer.kid().to_hex();
        let mut token = None;
        if let Some(handle) = record.handle.as_mut() {
            let jti = match self.nsm.random(16) {
                Ok(r) => hex::encode(r),
                Err(e) => return error(id, ErrorCode::Internal, &format!("nsm: {e}")),
            };
            handle.jti = jti.clone();
            let measurement = self
                .state
                .server(server_id)
                .and_then(|s| s.attested.as_ref())
                .map(|a| hex::encode(a.measurement))
                .unwrap_or_default();
            let claims = HandleClaims {
                iss: self.config.issuer.clone(),
                sub: principal.agent.clone(),
                aud: handle.audience.clone(),
                exp: handle.expires,
                iat: now.as_secs(),
                nbf: None,
                jti,
                tenant: principal.tenant.clone(),
                tools: handle.tools.clone(),
                measurement,
                seq,
                server: server_id.to_string(),
            };
            let Some(writer) = self.writer() else {
                return error(id, ErrorCode::NotReady, "not ready");
            };
            match encode_handle(&claims, &kid, writer.key()) {
                Ok(t) => token = Some((t, handle.expires)),
                Err(e) => return error(id, ErrorCode::Internal, &e.to_string()),
            }
        }
        let reason = record.reason.clone();
        match self.write(Event::Decision(Box::new(record)), now) {
            Ok(w) => {
                let seq = w.seq;
                let response = match (token, reason) {
                    (Some((token, expires_at)), _) => Response::Handle {
                        token,
                        seq,
                        expires_at,
                    },
                    (None, Some(r)) => Response::denied(seq, refusal_code(&r), &r.to_string()),
                    (None, None) => Response::denied(seq, ErrorCode::Denied, "denied"),
                };
                self.persist_then(id, vec![w], response)
            }
            Err(e) => error(id, ErrorCode::Internal, &e),
        }
    }

    fn discover(&mut self, id: u64, bearer: &str, now: UnixMillis) -> Replies {
        let principal = match self.bearers.authenticate(&self.state, bearer, now) {
            Ok(p) => p,
            Err(e) => return error(id, ErrorCode::Unauthenticated, &e.to_string()),
        };
        let servers = self.state.discover(&principal, now);
        let infos: Vec<ServerInfo> = servers
            .iter()
            .filter_map(|s| self.state.server(s))
            .map(|s| ServerInfo {
                id: s.spec.id.clone(),
                name: s.spec.name.clone(),
                tenant: s.spec.tenant.clone(),
                resource: s.spec.resource.clone(),
                attested: self.state.attestation_facts(s, now).verified,
            })
            .collect();
        match self.write(Event::Discovery { principal, servers }, now) {
            Ok(w) => {
                let seq = w.seq;
                self.persist_then(
                    id,
                    vec![w],
                    Response::Servers {
                        servers: infos,
                        seq,
                    },
                )
            }
            Err(e) => error(id, ErrorCode::Internal, &e),
        }
    }

    fn authorize(
        &mut self,
        id: u64,
        bearer: &str,
        server_id: &str,
        tool: &str,
        now: UnixMillis,
    ) -> Replies {
        let principal = match self.bearers.authenticate(&self.state, bearer, now) {
            Ok(p) => p,
            Err(e) => return error(id, ErrorCode::Unauthenticated, &e.to_string()),
        };
        let record = self
            .state
            .decide(&principal, Action::Call, server_id, Some(tool), now);
        let allowed = record.allowed;
        let reason = record.reason.clone();
        match self.write(Event::Decision(Box::new(record)), now) {
            Ok(w) => {
                let seq = w.seq;
                let response = match reason {
                    // An unknown server or tool is a `Denied` with `NotFound`, not a verdict.
                    Some(r) if r.is_not_found() => {
                        Response::denied(seq, ErrorCode::NotFound, &r.to_string())
                    }
                    reason => Response::Authorized {
                        allowed,
                        seq,
                        reason: reason.as_ref().map(Reason::to_string),
                    },
                };
                self.persist_then(id, vec![w], response)
            }
            Err(e) => error(id, ErrorCode::Internal, &e),
        }
    }

    fn checkpoint(&mut self, id: u64) -> Replies {
        let Some(writer) = self.writer() else {
            return error(id, ErrorCode::NotReady, "not ready");
        };
        let size = writer.head().size;
        if self.durable.map_or(0, |d| d.saturating_add(1)) < size {
            return error(
                id,
                ErrorCode::NotReady,
                "entries await durability; a checkpoint covers durable entries only",
            );
        }
        match writer.checkpoint() {
            Ok(note) => vec![(id, Response::Checkpoint { note })],
            Err(e) => error(id, ErrorCode::Internal, &e.to_string()),
        }
    }

    fn own_attestation(&mut self, id: u64, nonce: Option<ByteBuf>) -> Replies {
        let Some(writer) = self.writer() else {
            return error(id, ErrorCode::NotReady, "not ready");
        };
        let key = writer.verifying_key();
        let kid = writer.kid().to_hex();
        let document = match self.nsm.attest(
            None,
            nonce.map(ByteBuf::into_vec),
            Some(key.as_bytes().to_vec()),
        ) {
            Ok(d) => d,
            Err(e) => return error(id, ErrorCode::BadRequest, &format!("nsm: {e}")),
        };
        match Jwks::from_keys([(kid, key)]) {
            Ok(jwks) => vec![(
                id,
                Response::Attestation {
                    document: ByteBuf::from(document),
                    jwks: jwks.to_json(),
                },
            )],
            Err(e) => error(id, ErrorCode::Internal, &e.to_string()),
        }
    }
}

/// What the MCP gateway (`crate::gateway`) may do with the enclave: authenticate, read the
/// state, and write entries that ride the same Persist/Durable path as every other entry.
impl Enclave {
    /// The highest sequence number the host has reported durable.
    pub fn durable_through(&self) -> Option<u64> {
        self.durable
    }

    /// Authenticates an agent's bearer token for `audience`, through the bearer cache.
    pub(crate) fn authenticate_for(
        &mut self,
        bearer: &str,
        audience: crate::identity::Audience<'_>,
        now: UnixMillis,
    ) -> Result<attestplane_verifier::entry::PrincipalRecord, crate::identity::IdentityError> {
        self.bearers
            .authenticate_for(&self.state, bearer, audience, now)
    }

    /// `now` as the next entry's time will be: never before the head's time (the writer clamps),
    /// so a decision taken at this time is the one replay takes at the entry's time.
    pub(crate) fn entry_time(&self, now: UnixMillis) -> UnixMillis {
        self.writer().map_or(now, |w| now.max(w.head().time))
    }

    /// Whether the enclave is serving.
    pub(crate) fn serving(&self) -> bool {
        self.writer().is_some()
    }

    /// The epoch key (for receipts) and its key id, while the enclave is serving.
    pub(crate) fn epoch_signer(&self) -> Option<(&crate::epoch::EpochKey, String)> {
        self.writer().map(|w| (w.key(), w.kid().to_hex()))
    }

    /// The control plane's issuer name.
    pub(crate) fn issuer(&self) -> &str {
        &self.config.issuer
    }

    /// `n` bytes of the NSM's randomness.
    pub(crate) fn random(&self, n: usize) -> Result<Vec<u8>, String> {
        self.nsm.random(n).map_err(|e| format!("nsm: {e}"))
    }

    /// The sequence number the next entry will have (the log's size), while serving.
    pub(crate) fn next_seq(&self) -> Option<u64> {
        self.writer().map(|w| w.head().size)
    }

    /// [`Self::write_for_gateway`] of an entry that must be entry `seq` (a receipt made
    /// beforehand names it): refused, with nothing written, if the next entry would be another.
    pub(crate) fn write_for_gateway_as(
        &mut self,
        id: u64,
        event: Event,
        now: UnixMillis,
        seq: u64,
    ) -> Result<Replies, String> {
        match self.next_seq() {
            Some(next) if next == seq => {}
            Some(next) => return Err(format!("entry {seq} expected, the log's next is {next}")),
            None => return Err("not ready".into()),
        }
        self.write_for_gateway(id, event, now).map(|(_, r)| r)
    }

    /// Writes `event` (signed, applied to the state) and returns its sequence number and the
    /// `Persist` reply that hands it to the host under `id`.
    pub(crate) fn write_for_gateway(
        &mut self,
        id: u64,
        event: Event,
        now: UnixMillis,
    ) -> Result<(u64, Replies), String> {
        let written = self.write(event, now)?;
        let seq = written.seq;
        Ok((
            seq,
            vec![(
                id,
                Response::Persist {
                    first_seq: seq,
                    entries: vec![ByteBuf::from(written.bytes)],
                },
            )],
        ))
    }
}
