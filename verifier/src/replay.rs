//! Replay: log verification and the state fold, as one loop.
//!
//! [`Replay`] is the only place that runs the [log verifier](crate::log) and the
//! [state fold](crate::state) together, and both consumers of a stored log use it: the
//! auditor's `attestplane-verify log` and the enclave at boot. Entries go in by rounds
//! ([`Replay::push_round`]); the log verifier checks each round (decoding, links, epochs,
//! signatures, in parallel) and hands back [`VerifiedEntry`] values, which the state fold
//! applies in order. Memory is bounded by one round, the state and the list of epochs, not by
//! the log's length, so a caller that reads the log in rounds (as both consumers do) replays
//! a log of any length.
//!
//! A [pipelined](Replay::pipelined) replay (the auditor's CLI, [`PipelinedReplay`]) folds on a
//! thread of its own, a round or two behind the log verifier, so the in-order fold overlaps
//! the signature checks; its verdict, and the first failure it names, are those of the
//! unpipelined replay (a test compares the two, round sizes from 1 up, with the entry-by-entry
//! fold).
//!
//! ## What a replay checks beyond the log verifier
//!
//! - Every logged admin change, attestation and decision against the state so far (see
//!   [`crate::state`]), in the mode [`EpochTrust`] chooses for the entry's epoch: re-decided
//!   ([`ApplyMode::Recheck`]) unless the caller trusts the epoch's image to have decided
//!   correctly itself (the enclave, for epochs its own measured image wrote).
//! - That every epoch runs an image the caller pinned ([`LogPolicy::images`]) or one that an
//!   `allow_image` admin act accepted *earlier* in the log allowed
//!   ([`crate::admin::AdminAction::AllowImage`]); otherwise [`LogError::ImageNotAllowed`] names
//!   the epoch's first entry and its PCRs. The log verifier leaves this check to the fold
//!   because only the fold knows what the log allowed before each epoch, including an act
//!   verified in the same round as the epoch it allows. A refused act allows nothing (the fold
//!   applies accepted acts only, and re-checks that they were signed by an admin key).
//! - Optionally, that the log's genesis names exactly the admin keys the caller pinned
//!   ([`Replay::expect_genesis_keys`]).
//!
//! The first failure is reported with its sequence number, whether the log verifier or the
//! fold found it: within a round, the fold runs over the verified prefix before a failure of
//! the log verifier is reported, so a bad decision before a broken link is named first.
//!
//! ## What it does not do
//!
//! It reads no files and no clock: the caller streams the entries in and gives the
//! verification instant.

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::mpsc::{SyncSender, sync_channel};
use std::thread::JoinHandle;

use rayon::prelude::*;
use thiserror::Error;

use crate::attestation::{Pcr, PcrIndex, TrustAnchor};
use crate::entry::{Event, MAX_ENTRY_LEN};
use crate::log::{
    LogError, LogPolicy, LogVerifier, ROUND, VerifiedEntry, VerifiedLog, image_matches, image_of,
};
use crate::policy::{DecisionMemo, MemoStats};
use crate::state::{ApplyMode, Deferred, State, StateError};
use crate::time::UnixMillis;

/// Why a replay failed: the log's structure and signatures, its state, or its genesis.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ReplayError {
    /// The log verifier refused an entry (or the checkpoint).
    #[error(transparent)]
    Log(#[from] LogError),
    /// The state contradicts a logged event.
    #[error("replay: {0}")]
    State(#[from] StateError),
    /// The genesis admin keys were chosen by the host (the enclave ran with
    /// `--insecure-host-chosen-genesis`), and the caller pinned keys or refuses such a log.
    #[error("entry {seq}: the genesis admin keys were chosen by the host, not pinned in the image")]
    HostChosenGenesis {
        /// Position of the genesis entry.
        seq: u64,
    },
    /// The genesis entry names other admin keys than the pinned ones.
    #[error(
        "entry {seq}: genesis admin keys differ from the pinned ones (log: {}; pinned: {})",
        fmt_keys(found),
        fmt_keys(expected)
    )]
    GenesisKeysDiffer {
        /// Position of the genesis entry.
        seq: u64,
        /// The pinned keys, sorted.
        expected: Vec<[u8; 32]>,
        /// The keys the log's genesis names, sorted.
        found: Vec<[u8; 32]>,
    },
    /// A pipelined replay's fold thread could not be started.
    #[error("replay: the fold thread could not be started: {0}")]
    FoldThread(String),
    /// The replay stopped at an earlier failure, already reported: drop it.
    #[error("replay: stopped at an earlier failure")]
    Stopped,
}

fn fmt_keys(keys: &[[u8; 32]]) -> String {
    keys.iter().map(hex::encode).collect::<Vec<_>>().join(", ")
}

impl ReplayError {
    /// The first bad sequence number, when the failure is about an entry.
    pub fn seq(&self) -> Option<u64> {
        match self {
            ReplayError::Log(e) => e.seq(),
            ReplayError::State(e) => Some(e.seq()),
            ReplayError::GenesisKeysDiffer { seq, .. } | ReplayError::HostChosenGenesis { seq } => {
                Some(*seq)
            }
            ReplayError::FoldThread(_) | ReplayError::Stopped => None,
        }
    }
}

/// Chooses, epoch by epoch, how the fold applies logged decisions: trusted
/// ([`ApplyMode::Trusted`]) in an epoch opened by an attestation document that carries the
/// trusted image's PCRs (not in debug mode), re-decided ([`ApplyMode::Recheck`]) in any other.
/// The enclave trusts its own image (the same code made those decisions on the same state);
/// an auditor trusts none.
#[derive(Clone, Debug, Default)]
pub struct EpochTrust {
    own: BTreeMap<PcrIndex, Pcr>,
}

impl EpochTrust {
    /// Trusts the epochs of the image whose PCRs are `own`. Empty or all-zero (debug-mode)
    /// PCRs trust no epoch.
    pub fn new(own: BTreeMap<PcrIndex, Pcr>) -> Self {
        Self { own }
    }

    /// Trusts no epoch: every decision is re-decided (what an auditor does).
    pub fn none() -> Self {
        Self::default()
    }

    /// How to apply `entry`.
    pub fn mode(&self, entry: &VerifiedEntry) -> ApplyMode {
        let epoch = entry.epoch();
        let trusted = !self.own.is_empty()
            && !self.own.values().any(Pcr::is_zero)
            && !epoch.debug
            && image_matches(&self.own, &epoch.pcrs);
        if trusted {
            ApplyMode::Trusted
        } else {
            ApplyMode::Recheck
        }
    }
}

/// A log that verified and replayed.
#[derive(Debug)]
pub struct ReplayedLog {
    /// The log verifier's findings.
    pub log: VerifiedLog,
    /// The state after the last entry.
    pub state: State,
    /// Entries by event type.
    pub events: BTreeMap<&'static str, u64>,
    /// How many of the re-decisions' Cedar requests were answered from the replay's
    /// [`DecisionMemo`], and how many Cedar evaluated.
    pub memo: MemoStats,
}

/// Log verification and state fold over a log streamed in by rounds (see the module
/// documentation). After an error, drop it: it does not pick up again.
#[derive(Debug)]
pub struct Replay {
    verifier: LogVerifier,
    fold: Fold,
}

/// The in-order half of a replay: the state and what the fold checks beyond the log
/// verifier. Separate from the [`LogVerifier`] so that the two can run at once (a pipelined
/// replay folds on its own thread while the next rounds are verified).
#[derive(Debug)]
struct Fold {
    policy: LogPolicy,
    state: State,
    trust: EpochTrust,
    genesis: Option<Vec<[u8; 32]>>,
    refuse_host_chosen: bool,
    events: BTreeMap<&'static str, u64>,
    /// The re-decisions' Cedar answers, shared by the threads that check them (bounded; its
    /// answers are Cedar's own, see [`DecisionMemo`]).
    memo: DecisionMemo,
}

impl Replay {
    /// A replay of a log checked at instant `at` against `policy`, whose MCP servers'
    /// attestation documents chain to `server_anchor`. Every epoch is re-decided until
    /// [`Replay::with_trust`] says otherwise.
    pub fn new(
        policy: LogPolicy,
        at: UnixMillis,
        server_anchor: TrustAnchor,
    ) -> Result<Self, LogError> {
        let mut verifier = LogVerifier::new(policy.clone(), at)?;
        // Which images may run is the fold's business: it knows the images the log allowed.
        verifier.defer_image_checks();
        Ok(Self {
            verifier,
            fold: Fold {
                policy,
                state: State::new(server_anchor),
                trust: EpochTrust::none(),
                genesis: None,
                refuse_host_chosen: false,
                events: BTreeMap::new(),
                memo: DecisionMemo::new(),
            },
        })
    }

    /// Applies the epochs `trust` trusts without re-deciding their decisions.
    pub fn with_trust(mut self, trust: EpochTrust) -> Self {
        self.fold.trust = trust;
        self
    }

    /// Pins the log's origin: every admin request the log records as accepted must name it
    /// (see [`State::with_origin`]).
    pub fn with_origin(mut self, origin: impl Into<String>) -> Self {
        self.fold.state = self.fold.state.with_origin(origin);
        self
    }

    /// Requires the log's genesis to name exactly `keys` (in any order), pinned in the image
    /// (a genesis the host chose is refused).
    pub fn expect_genesis_keys(mut self, mut keys: Vec<[u8; 32]>) -> Self {
        keys.sort_unstable();
        keys.dedup();
        self.fold.genesis = Some(keys);
        self.fold.refuse_host_chosen = true;
        self
    }

    /// Refuses a log whose genesis keys the host chose (`host_chosen` in the genesis entry).
    pub fn refuse_host_chosen_genesis(mut self) -> Self {
        self.fold.refuse_host_chosen = true;
        self
    }

    /// Pipelines the rounds (see [`PipelinedReplay`]): for a reader of a whole log (the
    /// auditor's CLI). A caller that must know after each round whether it folded (the
    /// enclave answering each batch at boot) keeps the plain replay.
    pub fn pipelined(self) -> PipelinedReplay {
        PipelinedReplay::new(self)
    }

    /// Asks the log verifier to remember the Merkle root of the first `size` entries, to check
    /// a checkpoint of that size at the end. Call before pushing entries.
    pub fn remember_root_at(&mut self, size: u64) {
        self.verifier.remember_root_at(size);
    }

    /// Verifies the next entries of the log and folds them into the state.
    ///
    /// Three steps: the log verifier checks the round (on all cores); the fold applies it in
    /// order, computing each logged decision's inputs from the state (cheap) and applying its
    /// logged outcome, and checks on the spot each re-decided entry whose policy answers the
    /// replay's memo holds; then the policy evaluations of the round's other re-decided
    /// entries run on all cores, each against the snapshot of its own inputs. The first
    /// failure of the three, by sequence number, is reported.
    pub fn push_round<B: AsRef<[u8]> + Sync>(&mut self, round: &[B]) -> Result<(), ReplayError> {
        let (verified, failure) = self.verifier.verify_round_prefix(round);
        // The fold runs over the verified prefix first: an earlier failure of its own is the
        // one to report.
        self.fold.settle(&verified)?;
        failure.map_or(Ok(()), |e| Err(e.into()))
    }

    /// Entries verified and folded so far.
    pub fn verified(&self) -> u64 {
        self.verifier.verified()
    }

    /// The log verifier (head, epoch, Merkle frontier so far).
    pub fn verifier(&self) -> &LogVerifier {
        &self.verifier
    }

    /// The state so far.
    pub fn state(&self) -> &State {
        &self.fold.state
    }

    /// Entries by event type so far (folded ones).
    pub fn events(&self) -> &BTreeMap<&'static str, u64> {
        &self.fold.events
    }

    /// How many of the re-decisions' Cedar requests so far were answered from the replay's
    /// [`DecisionMemo`] and how many Cedar evaluated.
    pub fn memo_stats(&self) -> MemoStats {
        self.fold.memo.stats()
    }

    /// The log verifier and the state, to continue the log from (the enclave at boot).
    pub fn into_parts(self) -> Result<(LogVerifier, State), ReplayError> {
        Ok((self.verifier, self.fold.state))
    }

    /// Ends the replay: the log must not be empty.
    pub fn finish(self) -> Result<ReplayedLog, ReplayError> {
        let log = self.verifier.finish()?;
        Ok(self.fold.into_replayed(log))
    }

    /// Ends the replay and checks the log against a signed checkpoint held outside the host
    /// (see [`LogVerifier::finish_with_checkpoint`]); its size must have been announced with
    /// [`Replay::remember_root_at`].
    pub fn finish_with_checkpoint(self, note: &str) -> Result<ReplayedLog, ReplayError> {
        let log = self.verifier.finish_with_checkpoint(note)?;
        Ok(self.fold.into_replayed(log))
    }
}

/// A [`Replay`] whose fold runs on a thread of its own, a round or two behind the log
/// verifier: each [`PipelinedReplay::push_round`] verifies its round (signatures on all
/// cores) and hands it to the fold, which applies it in order and runs its policy evaluations
/// on all cores meanwhile. The two halves never wait for each other round by round, so the
/// cores stay busy while one of them is in an in-order part (the verifier linking entries, the
/// fold applying them). Its verdict, and the first failure it names, are those of the plain
/// replay (a test compares the two, round sizes from 1 up, with the entry-by-entry fold); a
/// failure of the fold is reported by a later call than the one that pushed its round (at the
/// latest by [`PipelinedReplay::finish`]). Memory: the rounds in flight, at most
/// [`FOLD_QUEUE`] verified rounds waiting plus the one being folded, and the state. After an
/// error, drop it: every later call fails with [`ReplayError::Stopped`].
#[derive(Debug)]
pub struct PipelinedReplay {
    verifier: LogVerifier,
    fold: FoldStage,
}

/// How many verified rounds may wait for the fold thread.
pub const FOLD_QUEUE: usize = 1;

#[derive(Debug)]
enum FoldStage {
    /// No round pushed yet.
    Idle(Box<Fold>),
    /// The fold thread, fed verified rounds; it returns the fold and its first failure when its
    /// queue closes or when a round fails.
    Running {
        rounds: SyncSender<Vec<VerifiedEntry>>,
        thread: JoinHandle<(Fold, Result<(), ReplayError>)>,
    },
    /// A call failed.
    Stopped,
}

impl PipelinedReplay {
    fn new(replay: Replay) -> Self {
        Self {
            verifier: replay.verifier,
            fold: FoldStage::Idle(Box::new(replay.fold)),
        }
    }

    /// Asks the log verifier to remember the Merkle root of the first `size` entries, to check
    /// a checkpoint of that size at the end. Call before pushing entries.
    pub fn remember_root_at(&mut self, size: u64) {
        self.verifier.remember_root_at(size);
    }

    /// Entries verified so far (the fold may be a round or two behind).
    pub fn verified(&self) -> u64 {
        self.verifier.verified()
    }

    /// Verifies the next entries of the log and hands them to the fold. A failure is the
    /// first by sequence number of this round's verification and of everything folded so far.
    pub fn push_round<B: AsRef<[u8]> + Sync>(&mut self, round: &[B]) -> Result<(), ReplayError> {
        if let FoldStage::Idle(_) = self.fold {
            self.start()?;
        }
        let FoldStage::Running { rounds, .. } = &self.fold else {
            return Err(ReplayError::Stopped);
        };
        let (verified, failure) = self.verifier.verify_round_prefix(round);
        // The fold thread ends early only at a failure of its own: that one is earlier.
        let handed = rounds.send(verified).is_ok();
        match failure {
            None if handed => Ok(()),
            // The fold sees the verified prefix first: an earlier failure of its own is the
            // one to report.
            failure => {
                self.join()?;
                self.fold = FoldStage::Stopped;
                failure.map_or(Err(ReplayError::Stopped), |e| Err(e.into()))
            }
        }
    }

    /// Ends the replay: the log must not be empty.
    pub fn finish(mut self) -> Result<ReplayedLog, ReplayError> {
        let fold = self.join()?;
        let log = self.verifier.finish()?;
        Ok(fold.into_replayed(log))
    }

    /// Ends the replay and checks the log against a signed checkpoint held outside the host
    /// (see [`LogVerifier::finish_with_checkpoint`]); its size must have been announced with
    /// [`PipelinedReplay::remember_root_at`].
    pub fn finish_with_checkpoint(mut self, note: &str) -> Result<ReplayedLog, ReplayError> {
        let fold = self.join()?;
        let log = self.verifier.finish_with_checkpoint(note)?;
        Ok(fold.into_replayed(log))
    }

    fn start(&mut self) -> Result<(), ReplayError> {
        let FoldStage::Idle(fold) = std::mem::replace(&mut self.fold, FoldStage::Stopped) else {
            return Err(ReplayError::Stopped);
        };
        let (rounds, queue) = sync_channel::<Vec<VerifiedEntry>>(FOLD_QUEUE);
        let thread = std::thread::Builder::new()
            .name("replay-fold".into())
            .spawn(move || {
                let mut fold = *fold;
                for round in queue {
                    if let Err(e) = fold.settle(&round) {
                        return (fold, Err(e));
                    }
                }
                (fold, Ok(()))
            })
            .map_err(|e| ReplayError::FoldThread(e.to_string()))?;
        self.fold = FoldStage::Running { rounds, thread };
        Ok(())
    }

    /// Closes the fold's queue and waits for it to fold what it holds: the fold, or its first
    /// failure.
    fn join(&mut self) -> Result<Fold, ReplayError> {
        match std::mem::replace(&mut self.fold, FoldStage::Stopped) {
            FoldStage::Idle(fold) => Ok(*fold),
            FoldStage::Running { rounds, thread } => {
                drop(rounds);
                match thread.join() {
                    Ok((fold, Ok(()))) => Ok(fold),
                    Ok((_, Err(e))) => Err(e),
                    // The fold has no panics on its input paths; should one happen, it is
                    // the caller's as if the fold had run on its thread.
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            }
            FoldStage::Stopped => Err(ReplayError::Stopped),
        }
    }
}

impl Fold {
    fn into_replayed(self, log: VerifiedLog) -> ReplayedLog {
        ReplayedLog {
            log,
            memo: self.memo.stats(),
            state: self.state,
            events: self.events,
        }
    }

    /// Folds verified entries in order, then runs the policy evaluations of the re-decided
    /// ones on all cores; the first failure by sequence number.
    fn settle(&mut self, verified: &[VerifiedEntry]) -> Result<(), ReplayError> {
        let mut deferred = Vec::new();
        let mut fold_failure = None;
        for (i, entry) in verified.iter().enumerate() {
            match self.apply(entry) {
                Ok(Some(d)) => deferred.push((i, d)),
                Ok(None) => {}
                Err(e) => {
                    fold_failure = Some(e);
                    break;
                }
            }
        }
        // Every deferred check is of an entry before the fold's failure, if any.
        let memo = &self.memo;
        // One check per task: their costs differ a thousandfold (a memo hit's comparison, a
        // Cedar evaluation, an attestation document's P-384 signature) and cluster (a new
        // epoch's attestations come together), so chunks of them would leave a core idle.
        let recheck_failure = deferred
            .into_par_iter()
            .with_max_len(1)
            .filter_map(|(i, d)| {
                let entry = verified.get(i)?;
                d.check(entry.entry(), Some(memo)).err()
            })
            .min_by_key(StateError::seq);
        if let Some(e) = recheck_failure {
            return Err(e.into());
        }
        fold_failure.map_or(Ok(()), Err)
    }

    fn apply(&mut self, entry: &VerifiedEntry) -> Result<Option<Deferred>, ReplayError> {
        if let Event::EpochStart { .. } = &entry.entry().event {
            let pcrs = &entry.epoch().pcrs;
            // Pinned, or allowed by an `allow_image` act folded before this entry: an act
            // later in the log, or one that was refused, allows nothing here.
            if !self.policy.pins(pcrs) && !self.state.image_allowed(pcrs) {
                return Err(LogError::ImageNotAllowed {
                    seq: entry.seq(),
                    pcrs: image_of(pcrs),
                }
                .into());
            }
        }
        if let Event::Genesis {
            host_chosen: true, ..
        } = &entry.entry().event
            && self.refuse_host_chosen
        {
            return Err(ReplayError::HostChosenGenesis { seq: entry.seq() });
        }
        if let (Some(pinned), Event::Genesis { admin_keys, .. }) =
            (&self.genesis, &entry.entry().event)
        {
            let mut found = admin_keys.clone();
            found.sort_unstable();
            found.dedup();
            if found != *pinned {
                return Err(ReplayError::GenesisKeysDiffer {
                    seq: entry.seq(),
                    expected: pinned.clone(),
                    found,
                });
            }
        }
        let mode = self.trust.mode(entry);
        let deferred = self.state.apply_deferring(entry, mode, Some(&self.memo))?;
        *self
            .events
            .entry(entry.entry().event.type_name())
            .or_default() += 1;
        Ok(deferred)
    }
}

/// Why an exported log could not be read as a CBOR sequence.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ReadError {
    /// The reader failed.
    #[error("read error: {0}")]
    Io(#[from] std::io::Error),
    /// The bytes are not a sequence of well-formed CBOR items no longer than an entry may be.
    #[error("not a CBOR sequence of entries: item {item} at byte {offset}: {reason}")]
    Malformed {
        /// Index of the item.
        item: u64,
        /// Where it starts.
        offset: u64,
        /// Why.
        reason: String,
    },
}

/// How much an [`EntryReader`] reads at a time.
const READ_CHUNK: usize = 1 << 20;

/// Reads an exported log (an RFC 8742 CBOR sequence of entries) from any reader, item by item,
/// without interpreting the items: what a streaming replay feeds [`Replay::push_round`] with.
/// It holds one round of items and at most one entry's worth of read-ahead (an item longer than
/// [`MAX_ENTRY_LEN`] is refused), never the whole file.
#[derive(Debug)]
pub struct EntryReader<R> {
    inner: R,
    buf: Vec<u8>,
    start: usize,
    eof: bool,
    offset: u64,
    items: u64,
}

impl<R: Read> EntryReader<R> {
    /// A reader over `inner`.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            start: 0,
            eof: false,
            offset: 0,
            items: 0,
        }
    }

    /// The next at most `max` items; empty at the end of the sequence.
    pub fn next_round(&mut self, max: usize) -> Result<Vec<Vec<u8>>, ReadError> {
        let mut round = Vec::with_capacity(max.min(ROUND));
        while round.len() < max {
            match self.next_item()? {
                Some(item) => round.push(item),
                None => break,
            }
        }
        Ok(round)
    }

    /// The next item, or `None` at the end of the sequence.
    pub fn next_item(&mut self) -> Result<Option<Vec<u8>>, ReadError> {
        loop {
            let available = self.buf.get(self.start..).unwrap_or_default();
            if available.is_empty() && self.eof {
                return Ok(None);
            }
            if !available.is_empty() {
                match crate::cbor::item_len(available) {
                    Ok(len) if len <= MAX_ENTRY_LEN => {
                        if let Some(item) = available.get(..len) {
                            let item = item.to_vec();
                            self.start += len;
                            self.offset += len as u64;
                            self.items += 1;
                            return Ok(Some(item));
                        }
                    }
                    Ok(len) => return Err(self.malformed(format!("{len} bytes long"))),
                    Err(e) => {
                        // Either truncated by the read-ahead or malformed: only more bytes
                        // tell, and never more than one entry's worth.
                        if self.eof || available.len() > MAX_ENTRY_LEN {
                            return Err(self.malformed(e.to_string()));
                        }
                    }
                }
            }
            self.fill()?;
        }
    }

    fn malformed(&self, reason: String) -> ReadError {
        ReadError::Malformed {
            item: self.items,
            offset: self.offset,
            reason,
        }
    }

    fn fill(&mut self) -> Result<(), ReadError> {
        self.buf.drain(..self.start.min(self.buf.len()));
        self.start = 0;
        // `read_to_end` over `take` reads up to one chunk into spare capacity, without zeroing
        // it first, however few bytes each read returns.
        let read = (&mut self.inner)
            .take(READ_CHUNK as u64)
            .read_to_end(&mut self.buf)?;
        if read == 0 {
            self.eof = true;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader that hands out at most `step` bytes per read.
    struct Trickle<'a> {
        bytes: &'a [u8],
        step: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            let n = self.step.min(out.len()).min(self.bytes.len());
            let (head, tail) = self.bytes.split_at(n);
            out[..n].copy_from_slice(head);
            self.bytes = tail;
            Ok(n)
        }
    }

    fn items() -> Vec<Vec<u8>> {
        (0..50usize)
            .map(|i| {
                let v = ciborium::value::Value::Bytes(vec![i as u8; i * 97]);
                crate::cbor::encode(&v).unwrap()
            })
            .collect()
    }

    #[test]
    fn reads_a_sequence_in_rounds_whatever_the_read_sizes() {
        let items = items();
        let bytes = items.concat();
        for step in [1, 7, 4096, usize::MAX] {
            let mut r = EntryReader::new(Trickle {
                bytes: &bytes,
                step,
            });
            let mut got = Vec::new();
            loop {
                let round = r.next_round(8).unwrap();
                if round.is_empty() {
                    break;
                }
                assert!(round.len() <= 8);
                got.extend(round);
            }
            assert_eq!(got, items, "step {step}");
        }
    }

    #[test]
    fn refuses_a_truncated_tail_and_names_the_item() {
        let items = items();
        let mut bytes = items.concat();
        bytes.pop();
        let mut r = EntryReader::new(bytes.as_slice());
        let err = loop {
            match r.next_item() {
                Ok(Some(_)) => {}
                Ok(None) => panic!("a truncated sequence read to its end"),
                Err(e) => break e,
            }
        };
        assert!(
            matches!(err, ReadError::Malformed { item: 49, .. }),
            "{err}"
        );
    }

    #[test]
    fn refuses_an_item_longer_than_an_entry_without_reading_it_whole() {
        // A byte string head that declares 1 GiB, followed by a little of it.
        let mut bytes = vec![0x5a, 0x40, 0, 0, 0];
        bytes.extend(vec![0u8; 3 * READ_CHUNK]);
        let mut r = EntryReader::new(bytes.as_slice());
        assert!(matches!(
            r.next_item(),
            Err(ReadError::Malformed { item: 0, .. })
        ));
        assert!(r.buf.len() <= MAX_ENTRY_LEN + READ_CHUNK);
    }
}
