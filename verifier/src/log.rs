//! Verification of a whole log.
//!
//! A log is a sequence of [entries](crate::entry) in sequence order. It verifies when
//!
//! - sequence numbers are dense from 0 and every `prev` is the hash of the entry before;
//! - entry 0 opens epoch 0, and every epoch is opened by an `epoch_start` entry carrying a Nitro
//!   attestation document that verifies against the pinned root and the expected PCRs at the
//!   entry's own time, whose `public_key` is the epoch key that signs the entry, and whose
//!   `user_data` is the [`EpochBinding`] of exactly that entry (epoch number, position and
//!   predecessor hash), so no epoch document can be moved elsewhere;
//! - every other entry belongs to the current epoch, names the current epoch key, and carries a
//!   valid Ed25519 signature by it, so nothing signed by an earlier epoch's key passes as current;
//! - times never go backwards and none lies after the verification instant (plus skew);
//! - given a checkpoint held outside the host, the log reaches its size and its Merkle root.
//!
//! The first failure is reported with its sequence number; failures that are consequences of an
//! earlier one are not looked for.
//!
//! ## Throughput
//!
//! Entries are decoded (one pass over their bytes, see [`crate::entry`]) and hashed in
//! parallel, linked in one sequential pass, and their signatures are checked in parallel
//! batches with Ed25519 batch verification. Batch verification alone is weaker than
//! `verify_strict`, so each signature's `R` is also checked not to be of small order (by
//! comparison with the fourteen encodings of such points, [`is_small_order_encoding`], instead
//! of decompressing it), and every epoch key is checked once for weakness: together with the
//! batch equation and the canonical-`s` check that batch parsing does, these are the conditions
//! `verify_strict` imposes. A chunk whose signatures all fall under one epoch key (every chunk
//! but those spanning an epoch boundary) is checked with the same batch equation as
//! `ed25519_dalek::verify_batch`, its key's terms gathered into one (see
//! `verify_batch_one_key`), which saves a third of the work; other chunks go to
//! `ed25519_dalek::verify_batch`. A batch that fails is re-checked entry by entry with
//! `verify_strict` to name the first bad entry.
//!
//! ## What this module does not do
//!
//! It does not replay the state or re-evaluate policy decisions (that needs the state fold),
//! and it cannot detect a truncated tail without a checkpoint from outside the host.

use std::collections::BTreeMap;
use std::sync::Arc;

use curve25519_dalek::constants::ED25519_BASEPOINT_POINT;
use curve25519_dalek::edwards::{CompressedEdwardsY, EdwardsPoint};
use curve25519_dalek::scalar::Scalar;
use curve25519_dalek::traits::{IsIdentity, VartimeMultiscalarMul};
use ed25519_dalek::{Signature, VerifyingKey};
use rayon::prelude::*;
use serde::Serialize;
use sha2::{Digest, Sha512};
use thiserror::Error;

use crate::attestation::{
    AttestationError, AttestationVerifier, Expectations, Pcr, PcrIndex, TrustAnchor, VerifyAt,
};
use crate::checkpoint::{self, Checkpoint, CheckpointError, VerifiedCheckpoint};
use crate::entry::{Entry, EntryError, EntryHash, EpochBinding, Event, KeyId, SignedEntry};
use crate::merkle::{self, CompactRange};
use crate::time::UnixMillis;

/// Signatures checked per batch-verification call.
pub const SIGNATURE_BATCH: usize = 64;

/// Entries decoded and checked per parallel round.
pub const ROUND: usize = 4096;

/// What the verifier trusts about the control plane it checks.
#[derive(Clone, Debug)]
pub struct LogPolicy {
    /// The root every epoch document must chain to.
    pub anchor: TrustAnchor,
    /// The images (each a set of PCRs an epoch document must carry, at least one PCR) whose
    /// epochs are accepted without an `allow_image` admin act earlier in the log; at least one
    /// is required. An epoch under any other image is accepted only by a [`crate::replay`]
    /// that finds the image allowed by the state folded so far.
    pub images: Vec<BTreeMap<PcrIndex, Pcr>>,
    /// Accept epochs attested in debug mode (PCR0/1/2 zero). Never for production.
    pub allow_debug: bool,
    /// How much older than its `epoch_start` entry an epoch document may be.
    pub max_epoch_document_age_ms: u64,
    /// How far after the verification instant an entry's time may lie.
    pub max_clock_skew_ms: u64,
}

impl LogPolicy {
    /// A policy with the given anchor and one pinned image, debug refused, 5 minutes' document
    /// age and 5 minutes' skew.
    pub fn new(anchor: TrustAnchor, pcrs: BTreeMap<PcrIndex, Pcr>) -> Self {
        Self::with_images(anchor, vec![pcrs])
    }

    /// Like [`LogPolicy::new`] with several pinned images (an auditor who trusts more than one
    /// build, or an enclave that continues a log its predecessor image started).
    pub fn with_images(anchor: TrustAnchor, images: Vec<BTreeMap<PcrIndex, Pcr>>) -> Self {
        Self {
            anchor,
            images,
            allow_debug: false,
            max_epoch_document_age_ms: 5 * 60 * 1000,
            max_clock_skew_ms: 5 * 60 * 1000,
        }
    }

    /// Whether an epoch document carrying `pcrs` runs one of the pinned images.
    pub fn pins(&self, pcrs: &BTreeMap<PcrIndex, Pcr>) -> bool {
        self.images.iter().any(|image| image_matches(image, pcrs))
    }
}

/// Whether a document's `pcrs` carry `image`: every PCR of the image, with its value. An empty
/// image matches nothing.
pub fn image_matches(image: &BTreeMap<PcrIndex, Pcr>, pcrs: &BTreeMap<PcrIndex, Pcr>) -> bool {
    !image.is_empty() && image.iter().all(|(i, p)| pcrs.get(i) == Some(p))
}

/// The PCRs that identify an image in output: PCR0, PCR1 and PCR2 (image, kernel,
/// application), and PCR8 (signing certificate) when it is set.
pub fn image_of(pcrs: &BTreeMap<PcrIndex, Pcr>) -> BTreeMap<PcrIndex, Pcr> {
    pcrs.iter()
        .filter(|(i, p)| i.get() <= 2 || (i.get() == 8 && !p.is_zero()))
        .map(|(i, p)| (*i, *p))
        .collect()
}

fn ser_pcrs<S: serde::Serializer>(pcrs: &BTreeMap<PcrIndex, Pcr>, s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut m = s.serialize_map(Some(pcrs.len()))?;
    for (i, p) in pcrs {
        m.serialize_entry(&format!("PCR{}", i.get()), &p.to_hex())?;
    }
    m.end()
}

/// The epoch a verified entry belongs to, as its `epoch_start` entry established it.
#[derive(Clone, Debug)]
pub struct VerifiedEpoch {
    /// Epoch number.
    pub number: u64,
    /// Sequence number of its `epoch_start` entry.
    pub start_seq: u64,
    /// The epoch key's id.
    pub kid: KeyId,
    /// Every PCR of the attestation document that opened it: the image that ran.
    pub pcrs: BTreeMap<PcrIndex, Pcr>,
    /// Whether the document came from a debug-mode enclave (PCR0–2 zero: no image attested).
    pub debug: bool,
}

/// An entry that passed the log verifier: decoded strictly, at its place in the dense sequence,
/// linked to its predecessor, its time in order and not in the future, in the current epoch,
/// and signed by that epoch's attested key. Only [`LogVerifier`] makes one, so bytes that did
/// not pass these checks cannot reach the state fold ([`crate::state::State::apply`]).
#[derive(Clone, Debug)]
pub struct VerifiedEntry {
    seq: u64,
    signed: SignedEntry,
    epoch: Arc<VerifiedEpoch>,
}

impl VerifiedEntry {
    /// Its sequence number.
    pub fn seq(&self) -> u64 {
        self.seq
    }
    /// The entry with its signature.
    pub fn signed(&self) -> &SignedEntry {
        &self.signed
    }
    /// The decoded entry.
    pub fn entry(&self) -> &Entry {
        self.signed.entry()
    }
    /// The epoch it belongs to.
    pub fn epoch(&self) -> &VerifiedEpoch {
        &self.epoch
    }
}

/// One epoch of a verified log.
#[derive(Clone, Debug, Serialize)]
pub struct EpochSummary {
    /// Epoch number.
    pub epoch: u64,
    /// Sequence number of its `epoch_start` entry.
    pub start_seq: u64,
    /// Number of entries in the epoch.
    pub entries: u64,
    /// The epoch key's id.
    pub kid: KeyId,
    /// The epoch key.
    #[serde(serialize_with = "ser_key")]
    pub key: VerifyingKey,
    /// The NSM module that attested it.
    pub module_id: String,
    /// The attestation document's timestamp.
    pub attested_at: UnixMillis,
    /// Whether the enclave ran in debug mode.
    pub debug: bool,
    /// PCR0, PCR1, PCR2 (and PCR8 when set) of its document: the image that ran.
    #[serde(serialize_with = "ser_pcrs")]
    pub image: BTreeMap<PcrIndex, Pcr>,
}

fn ser_key<S: serde::Serializer>(k: &VerifyingKey, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode(k.as_bytes()))
}

/// A log that verified. Only [`LogVerifier::finish`] makes one.
#[derive(Clone, Debug, Serialize)]
pub struct VerifiedLog {
    size: u64,
    head: Option<EntryHash>,
    root: merkle::Hash,
    epochs: Vec<EpochSummary>,
    first_time: Option<UnixMillis>,
    last_time: Option<UnixMillis>,
    verified_at: UnixMillis,
}

impl VerifiedLog {
    /// Number of entries.
    pub fn size(&self) -> u64 {
        self.size
    }
    /// Hash of the last entry.
    pub fn head(&self) -> Option<EntryHash> {
        self.head
    }
    /// RFC 6962 root over all entry hashes.
    pub fn root(&self) -> merkle::Hash {
        self.root
    }
    /// The epochs, in order.
    pub fn epochs(&self) -> &[EpochSummary] {
        &self.epochs
    }
    /// Time of the first entry.
    pub fn first_time(&self) -> Option<UnixMillis> {
        self.first_time
    }
    /// Time of the last entry.
    pub fn last_time(&self) -> Option<UnixMillis> {
        self.last_time
    }
    /// The instant it was verified at.
    pub fn verified_at(&self) -> UnixMillis {
        self.verified_at
    }
}

/// Why a log failed verification. Every variant about an entry names its sequence number (the
/// position at which the entry was expected) and carries the evidence.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum LogError {
    /// No expected PCRs were given: a log checked against no measurement proves nothing.
    #[error("no expected pcrs given: refusing to verify a log against no measurement")]
    NoExpectedPcrs,
    /// The log has no entries.
    #[error("the log is empty")]
    Empty,
    /// The entry at `seq` does not decode.
    #[error("entry {seq}: {source}")]
    Entry {
        /// Position.
        seq: u64,
        /// Why.
        source: EntryError,
    },
    /// The entry at position `seq` carries another sequence number (dropped, reordered or
    /// duplicated entries).
    #[error("entry {seq}: sequence number is {found}, expected {seq}")]
    SequenceMismatch {
        /// Position.
        seq: u64,
        /// What the entry says.
        found: u64,
    },
    /// The entry does not link to its predecessor.
    #[error("entry {seq}: prev is {found_prev}, expected {expected_prev}")]
    BrokenLink {
        /// Position.
        seq: u64,
        /// Hash of the entry before it.
        expected_prev: EntryHash,
        /// What the entry says.
        found_prev: EntryHash,
    },
    /// The log does not open with an epoch.
    #[error("entry {seq}: the log must open with an epoch_start entry")]
    MissingEpochStart {
        /// Position.
        seq: u64,
    },
    /// An entry's epoch number is not the current (or, for `epoch_start`, the next) one.
    #[error("entry {seq}: epoch is {found}, expected {expected}")]
    EpochMismatch {
        /// Position.
        seq: u64,
        /// The epoch it should carry.
        expected: u64,
        /// The epoch it carries.
        found: u64,
    },
    /// An entry is signed by (names) a key other than the current epoch's.
    #[error("entry {seq}: signed by key {found}, but the current epoch key is {expected}")]
    WrongKey {
        /// Position.
        seq: u64,
        /// The current epoch key.
        expected: KeyId,
        /// The key the entry names.
        found: KeyId,
    },
    /// The signature does not verify under the epoch key.
    #[error("entry {seq}: bad signature (entry hash {entry_hash})")]
    BadSignature {
        /// Position.
        seq: u64,
        /// Hash of the offending entry.
        entry_hash: EntryHash,
    },
    /// The epoch's attestation document does not verify.
    #[error("entry {seq}: epoch attestation: {source}")]
    EpochAttestation {
        /// Position.
        seq: u64,
        /// Why.
        source: Box<AttestationError>,
    },
    /// The epoch document carries no usable Ed25519 public key, or not the one that signs the
    /// entry.
    #[error("entry {seq}: epoch document binds key {attested:?}, entry is signed by {found}")]
    EpochKeyMismatch {
        /// Position.
        seq: u64,
        /// The key id of the attested key, if it is an Ed25519 key at all.
        attested: Option<KeyId>,
        /// The key the entry names.
        found: KeyId,
    },
    /// The epoch document's `user_data` does not bind this entry's place in the log.
    #[error("entry {seq}: epoch document binds {found:?}, expected {expected:?}")]
    EpochBindingMismatch {
        /// Position.
        seq: u64,
        /// The binding of this entry.
        expected: EpochBinding,
        /// What the document binds, if it decodes.
        found: Option<EpochBinding>,
    },
    /// Time went backwards.
    #[error("entry {seq}: time {found} is before the previous entry's {previous}")]
    TimeWentBackwards {
        /// Position.
        seq: u64,
        /// The previous entry's time.
        previous: UnixMillis,
        /// This entry's time.
        found: UnixMillis,
    },
    /// An entry claims a time after the verification instant.
    #[error("entry {seq}: time {time} is after the verification time {at}")]
    FromTheFuture {
        /// Position.
        seq: u64,
        /// The entry's time.
        time: UnixMillis,
        /// The verification instant.
        at: UnixMillis,
    },
    /// The log is shorter than a checkpoint held outside the host: its tail was cut off.
    #[error(
        "entry {seq}: missing; the log has {size} entries but checkpoint covers {checkpoint_size}"
    )]
    Truncated {
        /// First missing sequence number.
        seq: u64,
        /// Entries present.
        size: u64,
        /// Entries the checkpoint covers.
        checkpoint_size: u64,
    },
    /// The checkpoint's root is not the root of the log's first `size` entries.
    #[error("checkpoint at size {size} has root {checkpoint_root}, the log has {log_root}")]
    CheckpointRootMismatch {
        /// The checkpoint's size.
        size: u64,
        /// The root it signs.
        checkpoint_root: merkle::Hash,
        /// The root of the log's prefix.
        log_root: merkle::Hash,
    },
    /// The log's Merkle tree cannot grow (2^64 entries).
    #[error("entry {seq}: the tree is full")]
    TreeFull {
        /// Position.
        seq: u64,
    },
    /// The checkpoint is not signed by any epoch key of the log.
    #[error("checkpoint: {0}")]
    Checkpoint(Box<CheckpointError>),
    /// An epoch runs an image that is neither pinned nor allowed by an `allow_image` admin act
    /// accepted earlier in the log.
    #[error(
        "entry {seq}: epoch runs an image neither pinned nor allowed earlier in the log ({})",
        fmt_image(pcrs)
    )]
    ImageNotAllowed {
        /// Position of its `epoch_start` entry.
        seq: u64,
        /// PCR0, PCR1, PCR2 (and PCR8 when set) of its attestation document.
        pcrs: BTreeMap<PcrIndex, Pcr>,
    },
}

fn fmt_image(pcrs: &BTreeMap<PcrIndex, Pcr>) -> String {
    pcrs.iter()
        .map(|(i, p)| format!("PCR{}={}", i.get(), p.to_hex()))
        .collect::<Vec<_>>()
        .join(" ")
}

impl LogError {
    /// The first bad sequence number, when the failure is about an entry.
    pub fn seq(&self) -> Option<u64> {
        match self {
            LogError::Entry { seq, .. }
            | LogError::SequenceMismatch { seq, .. }
            | LogError::BrokenLink { seq, .. }
            | LogError::MissingEpochStart { seq }
            | LogError::EpochMismatch { seq, .. }
            | LogError::WrongKey { seq, .. }
            | LogError::BadSignature { seq, .. }
            | LogError::EpochAttestation { seq, .. }
            | LogError::EpochKeyMismatch { seq, .. }
            | LogError::EpochBindingMismatch { seq, .. }
            | LogError::TimeWentBackwards { seq, .. }
            | LogError::FromTheFuture { seq, .. }
            | LogError::TreeFull { seq }
            | LogError::ImageNotAllowed { seq, .. }
            | LogError::Truncated { seq, .. } => Some(*seq),
            LogError::NoExpectedPcrs
            | LogError::Empty
            | LogError::CheckpointRootMismatch { .. }
            | LogError::Checkpoint(_) => None,
        }
    }
}

struct CurrentEpoch {
    key: VerifyingKey,
    verified: Arc<VerifiedEpoch>,
}

/// Verifies a log incrementally: feed entries with [`LogVerifier::push`] or
/// [`LogVerifier::verify_round`], then call [`LogVerifier::finish`]. Memory is bounded by
/// one round, the epoch list and an O(log n) Merkle frontier, not by the log's length.
pub struct LogVerifier {
    policy: LogPolicy,
    attestation: AttestationVerifier,
    at: UnixMillis,
    next_seq: u64,
    head: Option<EntryHash>,
    epoch: Option<CurrentEpoch>,
    first_time: Option<UnixMillis>,
    last_time: Option<UnixMillis>,
    frontier: CompactRange,
    /// Roots of the prefixes a caller asked about, by size.
    roots_at: BTreeMap<u64, Option<merkle::Hash>>,
    epochs: Vec<EpochSummary>,
    buffered: Vec<Vec<u8>>,
    /// Leave the image check of each epoch to the caller (a [`crate::replay::Replay`], which
    /// knows which images the log allowed before it).
    defer_images: bool,
}

impl std::fmt::Debug for LogVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogVerifier")
            .field("next_seq", &self.next_seq)
            .field("head", &self.head)
            .field("epochs", &self.epochs.len())
            .finish_non_exhaustive()
    }
}

impl LogVerifier {
    /// A verifier for a log checked at instant `at` (no entry may be later than `at` plus the
    /// policy's skew).
    pub fn new(policy: LogPolicy, at: UnixMillis) -> Result<Self, LogError> {
        if policy.images.is_empty() || policy.images.iter().any(BTreeMap::is_empty) {
            return Err(LogError::NoExpectedPcrs);
        }
        Ok(Self {
            attestation: AttestationVerifier::new(policy.anchor.clone()),
            policy,
            at,
            next_seq: 0,
            head: None,
            epoch: None,
            first_time: None,
            last_time: None,
            frontier: CompactRange::new(),
            roots_at: BTreeMap::new(),
            epochs: Vec::new(),
            buffered: Vec::new(),
            defer_images: false,
        })
    }

    /// Leaves the image check of each epoch to the caller, which must make it before it uses
    /// any entry of the epoch (see [`crate::replay`]).
    pub(crate) fn defer_image_checks(&mut self) {
        self.defer_images = true;
    }

    /// The policy it verifies against.
    pub fn policy(&self) -> &LogPolicy {
        &self.policy
    }

    /// Asks the verifier to remember the Merkle root of the first `size` entries (to check a
    /// checkpoint of that size at the end). Call before feeding entries.
    pub fn remember_root_at(&mut self, size: u64) {
        self.roots_at.insert(size, None);
        if size == 0 {
            self.roots_at.insert(0, Some(self.frontier.root()));
        }
    }

    /// Number of entries verified so far.
    pub fn verified(&self) -> u64 {
        self.next_seq
    }

    /// Hash of the last verified entry.
    pub fn head(&self) -> Option<EntryHash> {
        self.head
    }

    /// The current epoch's number, once one opened.
    pub fn current_epoch(&self) -> Option<u64> {
        self.epoch.as_ref().map(|e| e.verified.number)
    }

    /// Time of the last verified entry.
    pub fn last_time(&self) -> Option<UnixMillis> {
        self.last_time
    }

    /// The epochs verified so far, in order.
    pub fn epochs(&self) -> &[EpochSummary] {
        &self.epochs
    }

    /// The Merkle frontier over the verified entries.
    pub fn frontier(&self) -> &CompactRange {
        &self.frontier
    }

    /// Buffers one entry; verifies a round when enough are buffered.
    pub fn push(&mut self, bytes: Vec<u8>) -> Result<(), LogError> {
        self.buffered.push(bytes);
        if self.buffered.len() >= ROUND {
            let round = std::mem::take(&mut self.buffered);
            self.verify_round(&round)?;
        }
        Ok(())
    }

    /// Verifies the next entries of the log, in order, and returns them verified. Callers that
    /// fold the log into state apply what this returns (see [`crate::replay`], which does).
    pub fn verify_round<B: AsRef<[u8]> + Sync>(
        &mut self,
        round: &[B],
    ) -> Result<Vec<VerifiedEntry>, LogError> {
        match self.verify_round_prefix(round) {
            (entries, None) => Ok(entries),
            (_, Some(e)) => Err(e),
        }
    }

    /// Like [`LogVerifier::verify_round`], but on failure also returns the entries before the
    /// first bad one, verified (so a caller folding state can look for an earlier failure of
    /// its own among them).
    pub(crate) fn verify_round_prefix<B: AsRef<[u8]> + Sync>(
        &mut self,
        round: &[B],
    ) -> (Vec<VerifiedEntry>, Option<LogError>) {
        let first = self.next_seq;
        let decoded: Vec<Result<SignedEntry, EntryError>> = round
            .par_iter()
            .map(|b| SignedEntry::decode(b.as_ref()))
            .collect();

        // `entries[i]`, at `first + i`, must verify under `keys[i]`.
        let mut entries = Vec::with_capacity(decoded.len());
        let mut keys = Vec::with_capacity(decoded.len());
        let mut epochs = Vec::with_capacity(decoded.len());
        let mut structural: Option<LogError> = None;
        for (offset, result) in decoded.into_iter().enumerate() {
            let seq = first.saturating_add(offset as u64);
            let step = result
                .map_err(|source| LogError::Entry { seq, source })
                .and_then(|entry| self.link(seq, &entry).map(|key| (entry, key)));
            match (step, &self.epoch) {
                (Ok((entry, key)), Some(epoch)) => {
                    keys.push(key);
                    entries.push(entry);
                    epochs.push(Arc::clone(&epoch.verified));
                }
                (Ok(_), None) => {
                    // `link` opens an epoch before it accepts anything.
                    structural = Some(LogError::MissingEpochStart { seq });
                    break;
                }
                (Err(e), _) => {
                    structural = Some(e);
                    break;
                }
            }
        }
        // A bad signature before the structural failure is the first bad entry.
        if let Err(bad) = check_signatures(first, &entries, &keys) {
            let good = bad.seq().map_or(0, |s| s.saturating_sub(first)) as usize;
            entries.truncate(good);
            epochs.truncate(good);
            structural = Some(bad);
        }
        let verified = entries
            .into_iter()
            .zip(epochs)
            .enumerate()
            .map(|(offset, (signed, epoch))| VerifiedEntry {
                seq: first.saturating_add(offset as u64),
                signed,
                epoch,
            })
            .collect();
        (verified, structural)
    }

    /// Checks the entry's place in the log and advances; returns the key its signature must
    /// verify under. Signatures themselves are checked in batches by the caller.
    fn link(&mut self, seq: u64, signed: &SignedEntry) -> Result<VerifyingKey, LogError> {
        let entry = signed.entry();
        if entry.seq != seq {
            return Err(LogError::SequenceMismatch {
                seq,
                found: entry.seq,
            });
        }
        let expected_prev = self.head.unwrap_or(EntryHash::ZERO);
        if entry.prev != expected_prev {
            return Err(LogError::BrokenLink {
                seq,
                expected_prev,
                found_prev: entry.prev,
            });
        }
        if let Some(previous) = self.last_time
            && entry.time < previous
        {
            return Err(LogError::TimeWentBackwards {
                seq,
                previous,
                found: entry.time,
            });
        }
        let latest = self
            .at
            .checked_add_millis(self.policy.max_clock_skew_ms)
            .unwrap_or(UnixMillis::from_millis(u64::MAX));
        if entry.time > latest {
            return Err(LogError::FromTheFuture {
                seq,
                time: entry.time,
                at: self.at,
            });
        }

        let key = match &entry.event {
            Event::EpochStart { attestation } => {
                self.open_epoch(seq, signed, attestation, expected_prev)?
            }
            _ => {
                let current = self
                    .epoch
                    .as_ref()
                    .ok_or(LogError::MissingEpochStart { seq })?;
                if entry.epoch != current.verified.number {
                    return Err(LogError::EpochMismatch {
                        seq,
                        expected: current.verified.number,
                        found: entry.epoch,
                    });
                }
                if *signed.kid() != current.verified.kid {
                    return Err(LogError::WrongKey {
                        seq,
                        expected: current.verified.kid,
                        found: *signed.kid(),
                    });
                }
                current.key
            }
        };

        self.head = Some(signed.hash());
        self.first_time.get_or_insert(entry.time);
        self.last_time = Some(entry.time);
        self.frontier
            .push(merkle::leaf_hash(signed.hash().as_bytes()))
            .map_err(|_| LogError::TreeFull { seq })?;
        self.next_seq = seq.saturating_add(1);
        if let Some(slot) = self.roots_at.get_mut(&self.next_seq) {
            *slot = Some(self.frontier.root());
        }
        if let Some(last) = self.epochs.last_mut() {
            last.entries = last.entries.saturating_add(1);
        }
        Ok(key)
    }

    fn open_epoch(
        &mut self,
        seq: u64,
        signed: &SignedEntry,
        attestation: &[u8],
        prev: EntryHash,
    ) -> Result<VerifyingKey, LogError> {
        let entry = signed.entry();
        let expected_epoch = match &self.epoch {
            None => 0,
            Some(current) => current.verified.number.saturating_add(1),
        };
        if entry.epoch != expected_epoch {
            return Err(LogError::EpochMismatch {
                seq,
                expected: expected_epoch,
                found: entry.epoch,
            });
        }
        // The measurements are compared below, against every pinned image (or left to the
        // replay, which also knows the images the log allowed).
        let expect = Expectations {
            allow_debug: self.policy.allow_debug,
            max_age_ms: Some(self.policy.max_epoch_document_age_ms),
            ..Expectations::default()
        };
        let doc = self
            .attestation
            .verify(attestation, &expect, VerifyAt::Instant(entry.time))
            .map_err(|source| LogError::EpochAttestation {
                seq,
                source: Box::new(source),
            })?;

        let binding = EpochBinding {
            epoch: entry.epoch,
            seq,
            prev,
        };
        let found = doc.user_data().and_then(|b| EpochBinding::decode(b).ok());
        if found != Some(binding) {
            return Err(LogError::EpochBindingMismatch {
                seq,
                expected: binding,
                found,
            });
        }

        let key = doc
            .public_key()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .and_then(|b| VerifyingKey::from_bytes(&b).ok())
            .filter(|k| !k.is_weak());
        let attested = key.as_ref().map(KeyId::of);
        let key = match key {
            Some(k) if KeyId::of(&k) == *signed.kid() => k,
            _ => {
                return Err(LogError::EpochKeyMismatch {
                    seq,
                    attested,
                    found: *signed.kid(),
                });
            }
        };
        let image = image_of(doc.pcrs());
        if !self.defer_images && !self.policy.pins(doc.pcrs()) {
            return Err(LogError::ImageNotAllowed { seq, pcrs: image });
        }
        let kid = KeyId::of(&key);
        self.epoch = Some(CurrentEpoch {
            key,
            verified: Arc::new(VerifiedEpoch {
                number: entry.epoch,
                start_seq: seq,
                kid,
                pcrs: doc.pcrs().clone(),
                debug: doc.is_debug(),
            }),
        });
        self.epochs.push(EpochSummary {
            epoch: entry.epoch,
            start_seq: seq,
            entries: 0,
            kid,
            key,
            module_id: doc.module_id().to_string(),
            attested_at: doc.timestamp(),
            debug: doc.is_debug(),
            image,
        });
        Ok(key)
    }

    /// Verifies whatever is buffered and returns the verified log.
    pub fn finish(mut self) -> Result<VerifiedLog, LogError> {
        let round = std::mem::take(&mut self.buffered);
        self.verify_round(&round)?;
        if self.next_seq == 0 {
            return Err(LogError::Empty);
        }
        Ok(VerifiedLog {
            size: self.next_seq,
            head: self.head,
            root: self.frontier.root(),
            epochs: self.epochs,
            first_time: self.first_time,
            last_time: self.last_time,
            verified_at: self.at,
        })
    }

    /// Like [`LogVerifier::finish`], and also checks the log against a signed checkpoint held
    /// outside the host: it must be signed by one of the log's epoch keys, the log must be at
    /// least as long, and the root of its first `size` entries must be the checkpoint's root.
    /// The checkpoint's size must have been announced with [`LogVerifier::remember_root_at`].
    pub fn finish_with_checkpoint(mut self, note: &str) -> Result<VerifiedLog, LogError> {
        let round = std::mem::take(&mut self.buffered);
        self.verify_round(&round)?;
        let roots_at = std::mem::take(&mut self.roots_at);
        let log = self.finish()?;
        let cp = verify_checkpoint_with_epoch_keys(note, &log.epochs);
        let cp = match cp {
            Ok(cp) => cp,
            Err(e) => {
                // A checkpoint we cannot authenticate against this log's keys may still have
                // been signed by an epoch that the host cut off: say so when it claims more.
                if let Some(claimed) = claimed_size(note)
                    && claimed > log.size
                {
                    return Err(LogError::Truncated {
                        seq: log.size,
                        size: log.size,
                        checkpoint_size: claimed,
                    });
                }
                return Err(LogError::Checkpoint(Box::new(e)));
            }
        };
        if cp.size() > log.size {
            return Err(LogError::Truncated {
                seq: log.size,
                size: log.size,
                checkpoint_size: cp.size(),
            });
        }
        let log_root = roots_at.get(&cp.size()).copied().flatten().ok_or(
            LogError::CheckpointRootMismatch {
                size: cp.size(),
                checkpoint_root: *cp.root(),
                log_root: log.root,
            },
        )?;
        if log_root != *cp.root() {
            return Err(LogError::CheckpointRootMismatch {
                size: cp.size(),
                checkpoint_root: *cp.root(),
                log_root,
            });
        }
        Ok(log)
    }
}

/// The size an (unverified) checkpoint note claims, if its body parses.
pub fn claimed_size(note: &str) -> Option<u64> {
    let (body, _) = note.split_once("\n\n")?;
    Checkpoint::parse_body(&format!("{body}\n"))
        .ok()
        .map(|c| c.size())
}

/// Verifies a checkpoint note signed by one of the log's epoch keys. By convention the
/// enclave signs checkpoints under the key name equal to the log's origin.
fn verify_checkpoint_with_epoch_keys(
    note: &str,
    epochs: &[EpochSummary],
) -> Result<VerifiedCheckpoint, CheckpointError> {
    let (body, _) = note
        .split_once("\n\n")
        .ok_or(CheckpointError::MalformedNote {
            reason: "no blank line between body and signatures",
        })?;
    let claimed = Checkpoint::parse_body(&format!("{body}\n"))?;
    let mut last = None;
    for e in epochs.iter().rev() {
        match checkpoint::verify_checkpoint(note, claimed.origin(), &e.key) {
            Ok(cp) => return Ok(cp),
            Err(err) => last = Some(err),
        }
    }
    Err(last.unwrap_or(CheckpointError::MalformedNote {
        reason: "the log has no epoch key",
    }))
}

/// Verifies the signatures of `entries` (the first at `first`), `entries[i]` under `keys[i]`;
/// on failure names the first bad entry.
fn check_signatures(
    first: u64,
    entries: &[SignedEntry],
    keys: &[VerifyingKey],
) -> Result<(), LogError> {
    let first_bad = entries
        .par_chunks(SIGNATURE_BATCH)
        .zip(keys.par_chunks(SIGNATURE_BATCH))
        .enumerate()
        .filter_map(|(n, (chunk, chunk_keys))| {
            if batch_ok(chunk, chunk_keys) {
                return None;
            }
            let i = chunk
                .iter()
                .zip(chunk_keys)
                .position(|(e, k)| k.verify_strict(e.signed_bytes(), e.signature()).is_err())?;
            let e = chunk.get(i)?;
            let offset = n.saturating_mul(SIGNATURE_BATCH).saturating_add(i);
            Some((first.saturating_add(offset as u64), e.hash()))
        })
        .min_by_key(|(seq, _)| *seq);
    match first_bad {
        None => Ok(()),
        Some((seq, entry_hash)) => Err(LogError::BadSignature { seq, entry_hash }),
    }
}

/// Batch-verifies a chunk with the conditions of `verify_strict` (see the module docs).
fn batch_ok(chunk: &[SignedEntry], keys: &[VerifyingKey]) -> bool {
    if chunk
        .iter()
        .any(|e| is_small_order_encoding(e.signature().r_bytes()))
    {
        return false;
    }
    let messages: Vec<&[u8]> = chunk.iter().map(SignedEntry::signed_bytes).collect();
    let signatures: Vec<Signature> = chunk.iter().map(|e| *e.signature()).collect();
    match keys.split_first() {
        Some((key, rest)) if rest.iter().all(|k| k == key) => {
            verify_batch_one_key(&messages, &signatures, key)
        }
        _ => ed25519_dalek::verify_batch(&messages, &signatures, keys).is_ok(),
    }
}

/// Ed25519 batch verification of signatures that must all verify under one `key` (every chunk
/// inside an epoch). It checks the equation of `ed25519_dalek::verify_batch`,
/// `Σ zᵢRᵢ + Σ (zᵢhᵢ)A − (Σ zᵢsᵢ)B = 0` with `hᵢ = H(Rᵢ ‖ A ‖ Mᵢ)` and random 128-bit `zᵢ`, with
/// the key's terms gathered into one, `(Σ zᵢhᵢ)A`: the same group element, computed with one
/// point in the multiscalar multiplication instead of one per signature. As in ed25519-dalek,
/// each `sᵢ` must be canonical and each `Rᵢ` must decompress, and the `zᵢ` are derived from a
/// hash of every input (each `hᵢ`, which covers `Rᵢ`, `A` and `Mᵢ`, and each `sᵢ`) and 16 fresh
/// random bytes. The randomness matters: the check is cofactorless, so an `Rᵢ` with a torsion
/// component (which `verify_strict` refuses) cancels out when `zᵢ ≡ 0 (mod 8)`; with
/// multipliers fixed by the inputs alone, the key holder could retry until that happened. If
/// the operating system gives no randomness the batch is refused, and the caller falls back to
/// `verify_strict` for each signature.
fn verify_batch_one_key(messages: &[&[u8]], signatures: &[Signature], key: &VerifyingKey) -> bool {
    if messages.len() != signatures.len() {
        return false;
    }
    let a_bytes = key.as_bytes();
    let Some(a) = CompressedEdwardsY(*a_bytes).decompress() else {
        return false;
    };
    let mut transcript = Sha512::new();
    transcript.update(b"attestplane/log/ed25519-batch-one-key/v1");
    let mut hrams = Vec::with_capacity(signatures.len());
    for (message, signature) in messages.iter().zip(signatures) {
        let h: [u8; 64] = Sha512::new()
            .chain_update(signature.r_bytes())
            .chain_update(a_bytes)
            .chain_update(message)
            .finalize()
            .into();
        transcript.update(h);
        hrams.push(Scalar::from_bytes_mod_order_wide(&h));
    }
    for signature in signatures {
        transcript.update(signature.s_bytes());
    }
    let mut fresh = [0u8; 16];
    if rand_core::RngCore::try_fill_bytes(&mut rand_core::OsRng, &mut fresh).is_err() {
        return false;
    }
    transcript.update(fresh);
    let seed = transcript.finalize();

    let mut b_coefficient = Scalar::ZERO;
    let mut a_coefficient = Scalar::ZERO;
    let mut zs = Vec::with_capacity(signatures.len());
    let mut rs = Vec::with_capacity(signatures.len());
    // Four 128-bit z per SHA-512 block of the seed's stream.
    let mut block = [0u8; 64];
    for (i, (signature, h)) in signatures.iter().zip(&hrams).enumerate() {
        let Some(s) = Option::<Scalar>::from(Scalar::from_canonical_bytes(*signature.s_bytes()))
        else {
            return false;
        };
        let Some(r) = CompressedEdwardsY(*signature.r_bytes()).decompress() else {
            return false;
        };
        if i % 4 == 0 {
            block = Sha512::new()
                .chain_update(seed)
                .chain_update(((i / 4) as u64).to_le_bytes())
                .finalize()
                .into();
        }
        let mut z_bytes = [0u8; 16];
        for (dst, src) in z_bytes.iter_mut().zip(block.iter().skip(16 * (i % 4))) {
            *dst = *src;
        }
        let z = Scalar::from(u128::from_le_bytes(z_bytes));
        b_coefficient += z * s;
        a_coefficient += z * h;
        zs.push(z);
        rs.push(r);
    }
    let sum = EdwardsPoint::vartime_multiscalar_mul(
        [-b_coefficient, a_coefficient].into_iter().chain(zs),
        [ED25519_BASEPOINT_POINT, a].into_iter().chain(rs),
    );
    sum.is_identity()
}

/// Every 32-byte string that decompresses to a point of small order: the eight torsion points
/// in their canonical encodings, and the six non-canonical encodings decompression also
/// accepts (`y` written as `y + p`, or the sign bit set on `x = 0`). The same set as
/// ed25519-zebra's and ZIP 215's lists; the test `small_order_encodings_are_exactly_the_torsion_encodings`
/// derives it again from the curve.
const SMALL_ORDER_ENCODINGS: [[u8; 32]; 14] = [
    // The identity (0, 1), and with the sign bit set.
    [
        0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00,
    ],
    [
        0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x80,
    ],
    // (0, -1), of order 2, and with the sign bit set.
    [
        0xec, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0x7f,
    ],
    [
        0xec, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xff,
    ],
    // (±sqrt(-1), 0), of order 4; then the same with y = p.
    [
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00,
    ],
    [
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x80,
    ],
    [
        0xed, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0x7f,
    ],
    [
        0xed, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xff,
    ],
    // The identity with y = p + 1.
    [
        0xee, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0x7f,
    ],
    [
        0xee, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xff,
    ],
    // The four points of order 8.
    [
        0x26, 0xe8, 0x95, 0x8f, 0xc2, 0xb2, 0x27, 0xb0, 0x45, 0xc3, 0xf4, 0x89, 0xf2, 0xef, 0x98,
        0xf0, 0xd5, 0xdf, 0xac, 0x05, 0xd3, 0xc6, 0x33, 0x39, 0xb1, 0x38, 0x02, 0x88, 0x6d, 0x53,
        0xfc, 0x05,
    ],
    [
        0x26, 0xe8, 0x95, 0x8f, 0xc2, 0xb2, 0x27, 0xb0, 0x45, 0xc3, 0xf4, 0x89, 0xf2, 0xef, 0x98,
        0xf0, 0xd5, 0xdf, 0xac, 0x05, 0xd3, 0xc6, 0x33, 0x39, 0xb1, 0x38, 0x02, 0x88, 0x6d, 0x53,
        0xfc, 0x85,
    ],
    [
        0xc7, 0x17, 0x6a, 0x70, 0x3d, 0x4d, 0xd8, 0x4f, 0xba, 0x3c, 0x0b, 0x76, 0x0d, 0x10, 0x67,
        0x0f, 0x2a, 0x20, 0x53, 0xfa, 0x2c, 0x39, 0xcc, 0xc6, 0x4e, 0xc7, 0xfd, 0x77, 0x92, 0xac,
        0x03, 0x7a,
    ],
    [
        0xc7, 0x17, 0x6a, 0x70, 0x3d, 0x4d, 0xd8, 0x4f, 0xba, 0x3c, 0x0b, 0x76, 0x0d, 0x10, 0x67,
        0x0f, 0x2a, 0x20, 0x53, 0xfa, 0x2c, 0x39, 0xcc, 0xc6, 0x4e, 0xc7, 0xfd, 0x77, 0x92, 0xac,
        0x03, 0xfa,
    ],
];

/// Whether `r` (a signature's `R`, or a public key) is an encoding of a point of small order.
/// Equivalent to decompressing it and asking `is_small_order`, for every `r` that decompresses
/// (one that does not fails the batch equation anyway), at the cost of fourteen comparisons.
pub fn is_small_order_encoding(r: &[u8; 32]) -> bool {
    SMALL_ORDER_ENCODINGS.iter().any(|e| e == r)
}

/// Verifies a complete log held in memory. See [`LogVerifier`] for streaming.
pub fn verify_log<B: AsRef<[u8]> + Sync>(
    entries: &[B],
    policy: LogPolicy,
    at: UnixMillis,
) -> Result<VerifiedLog, LogError> {
    let mut v = LogVerifier::new(policy, at)?;
    for round in entries.chunks(ROUND) {
        v.verify_round(round)?;
    }
    v.finish()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn decompresses_to_small_order(r: &[u8; 32]) -> bool {
        CompressedEdwardsY(*r)
            .decompress()
            .is_some_and(|p| p.is_small_order())
    }

    /// The torsion subgroup, found from the curve: `[l]P` for points `P` from hashed `y`s.
    fn torsion_points() -> Vec<EdwardsPoint> {
        let l_minus_one = -Scalar::ONE;
        let mut found: Vec<EdwardsPoint> = Vec::new();
        for i in 0u64..10_000 {
            if found.len() == 8 {
                break;
            }
            let mut y = [0u8; 32];
            y.copy_from_slice(&Sha512::digest(i.to_le_bytes())[..32]);
            let Some(p) = CompressedEdwardsY(y).decompress() else {
                continue;
            };
            let t = p * l_minus_one + p;
            assert!(t.is_small_order());
            if !found.contains(&t) {
                found.push(t);
            }
        }
        found
    }

    #[test]
    fn small_order_encodings_are_exactly_the_torsion_encodings() {
        for e in &SMALL_ORDER_ENCODINGS {
            assert!(decompresses_to_small_order(e), "{}", hex::encode(e));
        }
        let torsion = torsion_points();
        assert_eq!(torsion.len(), 8, "the torsion subgroup has eight points");
        // Every string that decompresses to one of them: y canonical or, below 19, y + p
        // (p = 2^255 - 19, so y + p still fits in 255 bits), with either sign bit.
        let mut all = BTreeSet::new();
        for t in &torsion {
            let mut y = t.compress().to_bytes();
            y[31] &= 0x7f;
            let mut ys = vec![y];
            if y[1..].iter().all(|b| *b == 0) && y[0] < 19 {
                let mut p = [0xffu8; 32];
                p[0] = 0xed + y[0];
                p[31] = 0x7f;
                ys.push(p);
            }
            for y in ys {
                for sign in [0u8, 0x80] {
                    let mut e = y;
                    e[31] |= sign;
                    if CompressedEdwardsY(e).decompress() == Some(*t) {
                        all.insert(e);
                    }
                }
            }
        }
        let listed: BTreeSet<[u8; 32]> = SMALL_ORDER_ENCODINGS.iter().copied().collect();
        assert_eq!(listed.len(), SMALL_ORDER_ENCODINGS.len(), "no duplicates");
        assert_eq!(all, listed);
    }

    #[test]
    fn small_order_check_agrees_with_decompression() {
        let mut cases: Vec<[u8; 32]> = SMALL_ORDER_ENCODINGS.to_vec();
        // Every one-bit change of each listed encoding.
        for e in &SMALL_ORDER_ENCODINGS {
            for bit in 0..256 {
                let mut c = *e;
                c[bit / 8] ^= 1 << (bit % 8);
                cases.push(c);
            }
        }
        // Arbitrary strings, and real signatures' R.
        for i in 0u64..2_000 {
            let mut c = [0u8; 32];
            c.copy_from_slice(&Sha512::digest(i.to_be_bytes())[..32]);
            cases.push(c);
        }
        let key = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
        for i in 0u64..200 {
            use ed25519_dalek::Signer;
            cases.push(*key.sign(&i.to_le_bytes()).r_bytes());
        }
        for c in &cases {
            // A string that does not decompress is refused by the batch equation itself.
            if CompressedEdwardsY(*c).decompress().is_some() {
                assert_eq!(
                    is_small_order_encoding(c),
                    decompresses_to_small_order(c),
                    "{}",
                    hex::encode(c)
                );
            } else {
                assert!(!is_small_order_encoding(c));
            }
        }
    }

    fn signed_batch(n: usize) -> (SigningKeyForTests, Vec<Vec<u8>>, Vec<Signature>) {
        use ed25519_dalek::Signer;
        let key = ed25519_dalek::SigningKey::from_bytes(&[11; 32]);
        let messages: Vec<Vec<u8>> = (0..n)
            .map(|i| format!("entry {i} {}", "x".repeat(i % 300)).into_bytes())
            .collect();
        let signatures = messages.iter().map(|m| key.sign(m)).collect();
        (key, messages, signatures)
    }

    type SigningKeyForTests = ed25519_dalek::SigningKey;

    /// Both batch verifiers' answers, which must agree.
    fn both(messages: &[Vec<u8>], signatures: &[Signature], key: &VerifyingKey) -> bool {
        let refs: Vec<&[u8]> = messages.iter().map(Vec::as_slice).collect();
        let keys = vec![*key; signatures.len()];
        let ours = verify_batch_one_key(&refs, signatures, key);
        let dalek = ed25519_dalek::verify_batch(&refs, signatures, &keys).is_ok();
        assert_eq!(ours, dalek);
        ours
    }

    #[test]
    fn one_key_batch_accepts_valid_batches_of_every_size() {
        for n in [1, 2, 3, 4, 5, 17, 63, 64] {
            let (key, messages, signatures) = signed_batch(n);
            assert!(
                both(&messages, &signatures, &key.verifying_key()),
                "n = {n}"
            );
        }
    }

    #[test]
    fn one_key_batch_refuses_any_bad_signature() {
        let (key, messages, signatures) = signed_batch(64);
        let vk = key.verifying_key();
        let other = ed25519_dalek::SigningKey::from_bytes(&[12; 32]).verifying_key();
        assert!(!both(&messages, &signatures, &other));
        for i in [0, 1, 31, 62, 63] {
            // Message changed.
            let mut m = messages.clone();
            m[i].push(b'!');
            assert!(!both(&m, &signatures, &vk));
            // A bit of R, of s (low bits, so s stays canonical), of the high bit of s.
            for (byte, bit) in [(0, 0), (17, 3), (32, 0), (40, 5), (63, 4)] {
                let mut sigs = signatures.clone();
                let mut raw = sigs[i].to_bytes();
                raw[byte] ^= 1 << bit;
                sigs[i] = Signature::from_bytes(&raw);
                assert!(
                    !both(&messages, &sigs, &vk),
                    "sig {i} byte {byte} bit {bit}"
                );
            }
            // s replaced by s + l: the same residue, not canonical.
            let mut sigs = signatures.clone();
            let mut raw = sigs[i].to_bytes();
            let l = Scalar::ZERO - Scalar::ONE;
            let mut carry = 1u16;
            let mut s_plus_l = [0u8; 32];
            for j in 0..32 {
                let sum = u16::from(raw[32 + j]) + u16::from(l.as_bytes()[j]) + carry;
                s_plus_l[j] = sum as u8;
                carry = sum >> 8;
            }
            raw[32..].copy_from_slice(&s_plus_l);
            sigs[i] = Signature::from_bytes(&raw);
            assert!(!both(&messages, &sigs, &vk));
            // Two signatures swapped.
            let mut sigs = signatures.clone();
            sigs.swap(i, (i + 1) % 64);
            assert!(!both(&messages, &sigs, &vk));
        }
    }
}
