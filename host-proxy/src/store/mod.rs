//! The durable log store: append-only segment files, group commit, an in-memory index.
//!
//! Role. The enclave signs log entries; the host keeps them. This module is the only one that
//! knows how they are kept. Its one promise is docs/design.md's: *nothing is acknowledged before it
//! is durable*, where durable means it survives power loss, not only a process crash.
//!
//! ## On disk
//!
//! ```text
//! DIR/LOCK                                  advisory lock: one process per store
//! DIR/segments/00000000000000000000.log     entries 0.., named by the seq of its first entry
//! DIR/segments/00000000000000031337.log     the next segment, and so on
//! DIR/checkpoint                            the latest checkpoint note (replaced atomically)
//! DIR/quarantine/SSSS…-OOOO….torn           bytes of a torn tail cut at open, kept for forensics
//! ```
//!
//! A segment is a sequence of records, `len: u32 BE ‖ check: u32 BE ‖ entry`, where `check` is
//! the first four bytes of the entry's SHA-256 (its [`EntryHash`], which the store computes for
//! the Merkle leaves anyway). Records carry no sequence number: an entry's seq is its position
//! (the segment's first seq plus the records before it), and the segments' names must follow on
//! densely from each other. Whether the seq *inside* each signed entry matches is the enclave's
//! business at replay, and the auditor's.
//!
//! ## Writing: one writer, group commit
//!
//! [`Store::submit`] checks an append (bounds, and that it starts exactly at the next seq:
//! no gap, no overlap) and queues it; a single writer thread takes everything queued, writes it
//! with one `write`, calls `fdatasync` once, publishes it to the index and only then completes
//! each append's [`Commit`]. Appends that arrive while a sync is in flight share the next one,
//! so the number of syncs per second stays bounded by the disk while throughput grows with
//! concurrency. [`Store::submit_or_reserve`] lets a lone append on an idle store skip the
//! thread: its submitter writes, syncs and publishes it itself ([`InlineCommit`]), one commit at
//! a time with the writer thread, so the disk order is still the submission order. A new segment is started when the current one has reached
//! [`StoreOptions::segment_bytes`]; its directory entry is made durable (the directory is
//! fsync'd) before the first record is written into it. A batch never spans two segments.
//!
//! After a failed write or sync the store refuses every further append ([`StoreError::Failed`]):
//! after an `fsync` error the kernel may have dropped the dirty pages, and retrying could
//! acknowledge data that is not on disk. Reopening rescans the segments.
//!
//! ## Reading and the index
//!
//! The index (per entry: its offset in its segment and its Merkle leaf hash; per segment: its
//! first seq and durable length) lives in memory and is rebuilt at [`Store::open`] by scanning
//! every segment: 36 bytes per entry, 36 MB per million entries, all in memory. Readers see
//! only entries that are durable. The leaf hashes are kept in sealed chunks of 4096 with each
//! chunk's root, so a root or proof costs O(n / 4096 + 4096) hashes rather than O(n), and is
//! computed outside the index lock; the proofs themselves come from the verifier's
//! [`merkle::inclusion_proof`](attestplane_verifier::merkle::inclusion_proof) and
//! [`merkle::consistency_proof`](attestplane_verifier::merkle::consistency_proof). Every read
//! re-hashes the entry and compares it with the leaf hash recorded when it was indexed, so
//! bytes changed on disk afterwards are reported ([`StoreError::Changed`]), never served. sled
//! is not used: its `flush` is not durable (docs/design.md, "The store"), the segments are the
//! source of truth anyway, and rebuilding the index from them is fast (see the figures in
//! `benches/store.rs`); one copy of the data means no second copy to disagree.
//!
//! ## Recovery
//!
//! At open every record of every segment is checked. A bad record (short header, zero or
//! oversized length, a body running past the end of the file, or a checksum mismatch) is
//! - *unused room*, cut away, if only zeros follow the last valid record: the writer extends
//!   a segment file ahead of its records (the `fdatasync` of a write over zeros the file
//!   already holds need not record a new size) and cuts it back when the store closes or the
//!   segment is full, so a store that did not close leaves such zeros. They hold no record,
//!   and their count is reported in [`Store::recovery`];
//! - a *torn tail*, cut away, if it is in the last segment, the bytes from it to the last
//!   non-zero byte of the file are no more than one batch can leave unsynced ([`MAX_UNSYNCED_BYTES`]) and no valid
//!   record starts anywhere after it. Such bytes were never acknowledged (acknowledgement
//!   follows the sync of the whole batch); they are copied to `DIR/quarantine/` first and
//!   reported in [`Store::recovery`];
//! - otherwise a hard error, [`StoreError::Corrupt`], naming the segment, offset and seq and why
//!   it cannot be a torn tail. Nothing is dropped silently.
//!
//! Open then syncs the last segment and the segments directory, so that records a crashed
//! predecessor wrote but never synced are durable before anyone reads them.
//!
//! ## Layout
//!
//! - this file: [`Store`] (open, submit, reads, proofs), its errors and the in-memory index
//!   every other part shares;
//! - `segment`: the on-disk record format (encoding, parsing, the checksum), segment names,
//!   the scan that rebuilds the index at open, torn-tail recovery and quarantine, and reads of
//!   indexed records;
//! - `writer`: the group-commit writer thread, its queue, and [`Commit`], the future (or
//!   blocking wait) an append completes through;
//! - `tree`: pure Merkle bookkeeping over the leaf hashes (chunks with their roots, snapshots,
//!   proofs composed from the verifier's generators); no I/O, no locks, no store errors;
//! - `checkpoint`: the latest checkpoint note, replaced atomically.
//!
//! `writer` and `segment` use the index of this file; `writer` writes records with
//! `segment`'s encoder; `tree` depends on nothing but the verifier's
//! [`merkle`](attestplane_verifier::merkle) module.
//!
//! ## Trust assumptions and what this module does not do
//!
//! The disk is the host's, and the host is untrusted by everyone else; the store trusts its disk
//! only not to lie *accidentally* (the checks above catch torn writes and bit rot, not a
//! malicious host, which could rewrite everything consistently; the enclave and the auditor
//! catch that with signatures and checkpoints). The store does not decode or verify entries
//! (their signatures, seqs and links are checked by the enclave at replay), does not sign
//! anything, and does not reorder: appends must arrive in seq order, and a caller receiving
//! entries from several connections must sequence them before submitting.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use attestplane_verifier::entry::EntryHash;
use attestplane_verifier::merkle::{Hash, MerkleError};
use thiserror::Error;

mod checkpoint;
mod segment;
mod tree;
mod writer;

pub use segment::{NotTorn, RecordFault};
pub use writer::{Commit, InlineCommit, Submitted};

use tree::{Leaves, TreeSnapshot};
use writer::{Pending, Queue, Writer};

/// The largest entry the store accepts: the verifier's limit on an encoded entry.
pub const MAX_ENTRY_LEN: usize = attestplane_verifier::entry::MAX_ENTRY_LEN;

/// Most entries one append may carry: as many as one protocol frame carries.
pub const MAX_APPEND_ENTRIES: usize = attestplane_proto::MAX_ENTRIES_PER_FRAME;

/// Most entry bytes one append may carry: no more than one protocol frame carries.
pub const MAX_APPEND_BYTES: usize = attestplane_proto::MAX_FRAME_LEN;

/// Length of a record header: `len: u32 BE ‖ check: u32 BE`.
pub const RECORD_HEADER_LEN: usize = 8;

/// The writer stops adding appends to a batch once it holds this many bytes (a single larger
/// append still goes alone).
pub const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;

/// The most bytes that can ever be written but not yet synced: one batch. A bad tail longer
/// than this cannot be a torn write and is reported as corruption.
pub const MAX_UNSYNCED_BYTES: u64 =
    (MAX_APPEND_BYTES + RECORD_HEADER_LEN * MAX_APPEND_ENTRIES) as u64;

/// Default size at which a new segment is started.
pub const DEFAULT_SEGMENT_BYTES: u64 = 8 * 1024 * 1024;

/// Smallest configurable segment size.
pub const MIN_SEGMENT_BYTES: u64 = 4 * 1024;

/// Largest configurable segment size.
pub const MAX_SEGMENT_BYTES: u64 = 1024 * 1024 * 1024;

/// Largest segment file accepted at open: the largest segment size plus one batch. Keeps every
/// record offset within a `u32`.
pub const MAX_SEGMENT_FILE_BYTES: u64 = MAX_SEGMENT_BYTES + MAX_UNSYNCED_BYTES;

/// Most segment files accepted at open (8 TiB of log at the default segment size).
pub const MAX_SEGMENTS: usize = 1_000_000;

/// Most entries [`Store::range`] returns at once (one replay frame's worth).
pub const MAX_RANGE_ENTRIES: usize = attestplane_proto::MAX_ENTRIES_PER_FRAME;

/// Most entry bytes [`Store::range`] returns at once (always at least one entry). Half a
/// protocol frame, so a batch from [`Store::stream`] always fits a replay frame.
pub const MAX_RANGE_BYTES: usize = attestplane_proto::MAX_FRAME_LEN / 2;

/// Bytes hashed, at most, while looking for a valid record after a bad one at open.
pub const MAX_TAIL_SCAN_HASH_BYTES: u64 = 256 * 1024 * 1024;

const LOCK_FILE: &str = "LOCK";

// A replay batch must fit one protocol frame, with room for CBOR framing of each entry.
const _: () =
    assert!(MAX_RANGE_BYTES + 16 * MAX_RANGE_ENTRIES + 1024 <= attestplane_proto::MAX_FRAME_LEN);
// Every record offset fits a u32.
const _: () = assert!(MAX_SEGMENT_FILE_BYTES < u32::MAX as u64);

/// Errors of the log store.
#[derive(Debug, Clone, Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A file-system operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: Arc<io::Error>,
    },
    /// Another process (or another `Store` in this one) holds the store's lock.
    #[error("store {path} is locked by another process")]
    Locked {
        /// The lock file.
        path: PathBuf,
    },
    /// The options are out of bounds.
    #[error("segment size {segment_bytes} is not between {min} and {max}")]
    InvalidOptions {
        /// The segment size asked for.
        segment_bytes: u64,
        /// [`MIN_SEGMENT_BYTES`].
        min: u64,
        /// [`MAX_SEGMENT_BYTES`].
        max: u64,
    },
    /// The segments directory holds something that is not a segment.
    #[error("unexpected file {path} in the segments directory")]
    UnexpectedFile {
        /// The offending path.
        path: PathBuf,
    },
    /// The segments directory holds more than [`MAX_SEGMENTS`] files.
    #[error("segments directory {path} holds more than {max} segments")]
    TooManySegments {
        /// The segments directory.
        path: PathBuf,
        /// [`MAX_SEGMENTS`].
        max: usize,
    },
    /// A segment file is larger than any the store writes.
    #[error("segment {path} is {len} bytes, more than {max}")]
    SegmentTooLarge {
        /// The segment.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// [`MAX_SEGMENT_FILE_BYTES`].
        max: u64,
    },
    /// A segment does not start where the previous one ended (a gap, or an overlap).
    #[error("segment {path} starts at seq {found}, expected {expected}")]
    SegmentGap {
        /// The segment.
        path: PathBuf,
        /// The seq after the previous segment's last entry (0 for the first segment).
        expected: u64,
        /// The seq its name gives.
        found: u64,
    },
    /// A record is bad and cannot be a torn tail.
    #[error(
        "segment {path}: record at offset {offset} (seq {seq}) is corrupt ({fault}); not a torn tail: {not_torn}"
    )]
    Corrupt {
        /// The segment.
        path: PathBuf,
        /// Byte offset of the record in the segment.
        offset: u64,
        /// The seq the record would hold.
        seq: u64,
        /// What is wrong with it.
        fault: RecordFault,
        /// Why it is not a torn tail.
        not_torn: NotTorn,
    },
    /// An entry's bytes on disk no longer match the hash indexed when the store was opened or
    /// the entry written.
    #[error("segment {path}: entry {seq} at offset {offset} changed on disk since it was indexed")]
    Changed {
        /// The segment.
        path: PathBuf,
        /// Byte offset of the record.
        offset: u64,
        /// The entry's seq.
        seq: u64,
    },
    /// An append does not start at the next seq: entries are missing before it.
    #[error("append starting at seq {first_seq} leaves a gap: the next seq is {next}")]
    Gap {
        /// The seq the next append must start with.
        next: u64,
        /// The seq this append starts with.
        first_seq: u64,
    },
    /// An append starts below the next seq: it would overwrite stored or queued entries.
    #[error("append starting at seq {first_seq} overlaps stored entries: the next seq is {next}")]
    Overlap {
        /// The seq the next append must start with.
        next: u64,
        /// The seq this append starts with.
        first_seq: u64,
    },
    /// An append with no entries.
    #[error("append has no entries")]
    EmptyAppend,
    /// An append with more than [`MAX_APPEND_ENTRIES`] entries.
    #[error("append has {count} entries, more than {max}")]
    TooManyEntries {
        /// The number of entries.
        count: usize,
        /// [`MAX_APPEND_ENTRIES`].
        max: usize,
    },
    /// An append with more than [`MAX_APPEND_BYTES`] bytes of entries.
    #[error("append has {len} bytes of entries, more than {max}")]
    AppendTooLarge {
        /// The total length.
        len: usize,
        /// [`MAX_APPEND_BYTES`].
        max: usize,
    },
    /// An empty entry.
    #[error("entry {seq} is empty")]
    EmptyEntry {
        /// Its seq.
        seq: u64,
    },
    /// An entry longer than [`MAX_ENTRY_LEN`].
    #[error("entry {seq} has {len} bytes, more than {max}")]
    EntryTooLarge {
        /// Its seq.
        seq: u64,
        /// Its length.
        len: usize,
        /// [`MAX_ENTRY_LEN`].
        max: usize,
    },
    /// Sequence numbers would pass `u64::MAX`.
    #[error("sequence numbers overflow")]
    SeqOverflow,
    /// A read or proof past the durable entries.
    #[error("range {start}..{end} is out of bounds for a log of {len} entries")]
    OutOfRange {
        /// First seq (or index) asked for.
        start: u64,
        /// One past the last seq (or the tree size) asked for.
        end: u64,
        /// The number of durable entries.
        len: u64,
    },
    /// A checkpoint note longer than the verifier's
    /// [`MAX_NOTE_LEN`](attestplane_verifier::checkpoint::MAX_NOTE_LEN).
    #[error("checkpoint note is {len} bytes, more than {max}")]
    CheckpointTooLarge {
        /// Its length.
        len: u64,
        /// [`MAX_NOTE_LEN`](attestplane_verifier::checkpoint::MAX_NOTE_LEN).
        max: usize,
    },
    /// A checkpoint note whose body does not parse, or a stored one that is not UTF-8.
    #[error("checkpoint note is malformed: {reason}")]
    CheckpointMalformed {
        /// What is wrong.
        reason: &'static str,
    },
    /// A checkpoint for more entries than are durable.
    #[error("checkpoint for {size} entries is ahead of the {len} durable entries")]
    CheckpointAhead {
        /// The checkpoint's tree size.
        size: u64,
        /// The number of durable entries.
        len: u64,
    },
    /// A checkpoint for fewer entries than the stored one.
    #[error("checkpoint for {size} entries is older than the stored one for {stored}")]
    CheckpointRegression {
        /// The new checkpoint's tree size.
        size: u64,
        /// The stored checkpoint's tree size.
        stored: u64,
    },
    /// Proof generation failed (index or sizes out of range).
    #[error("merkle proof: {0}")]
    Merkle(#[from] MerkleError),
    /// A write or sync failed earlier; the store accepts no appends until it is reopened.
    #[error("the store failed earlier and must be reopened: {cause}")]
    Failed {
        /// The first failure.
        #[source]
        cause: Box<StoreError>,
    },
    /// The store was closed before the append completed.
    #[error("the store is closed")]
    Closed,
    /// The in-memory index does not cover a seq it should (a bug, never input-dependent).
    #[error("index has no location for seq {seq}")]
    Index {
        /// The seq.
        seq: u64,
    },
}

impl StoreError {
    fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
        move |source| StoreError::Io {
            op,
            path: path.to_path_buf(),
            source: Arc::new(source),
        }
    }
}

/// Tunables of a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreOptions {
    /// A new segment is started once the current one holds this many bytes. Between
    /// [`MIN_SEGMENT_BYTES`] and [`MAX_SEGMENT_BYTES`]; [`DEFAULT_SEGMENT_BYTES`] by default.
    pub segment_bytes: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            segment_bytes: DEFAULT_SEGMENT_BYTES,
        }
    }
}

/// What [`Store::open`] found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Entries indexed.
    pub entries: u64,
    /// Segment files scanned.
    pub segments: usize,
    /// Bytes of segments scanned.
    pub bytes: u64,
    /// The torn tail cut from the last segment, if there was one.
    pub torn_tail: Option<TornTail>,
    /// Bytes of zeros cut after the last record of a segment: room the writer makes ahead of
    /// its records and cuts when the store closes, left by a store that did not close.
    pub unused_tail: u64,
    /// Time spent scanning and indexing.
    pub elapsed: Duration,
}

/// A torn tail cut away at open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    /// The segment it was cut from.
    pub segment: PathBuf,
    /// Offset of the first bad record (the segment's new length).
    pub offset: u64,
    /// Bytes cut.
    pub len: u64,
    /// The seq the first bad record would have held.
    pub seq: u64,
    /// What was wrong with that record.
    pub fault: RecordFault,
    /// Where the cut bytes were saved.
    pub saved_to: PathBuf,
}

/// Counters since the store was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Appends completed.
    pub appends: u64,
    /// Entries written.
    pub entries: u64,
    /// Group commits, each one `fdatasync` of a segment.
    pub syncs: u64,
    /// Segments created.
    pub segments_created: u64,
    /// Group commits run on the submitting thread ([`Store::submit_or_reserve`]) rather than
    /// the writer thread.
    pub inline_commits: u64,
    /// Time spent in group commits (write, `fdatasync`, index), in microseconds.
    pub commit_micros: u64,
}

/// How far the store's durable entries reach ([`Store::durable_watch`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// This many entries, from seq 0, are durable.
    Entries(u64),
    /// A write or sync failed: nothing more becomes durable until the store is reopened.
    Failed,
}

/// The entries a watcher waited for will never be durable: the store failed or closed first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
#[error("the store failed or closed before the entries were durable")]
pub struct NeverDurable;

/// Follows the number of durable entries: what holds bytes until entries are durable (the MCP
/// relays, for the enclave's held frames) waits on it. Published after each group commit's
/// `fdatasync` and index update, before its appends complete.
#[derive(Clone, Debug)]
pub struct DurableWatch(tokio::sync::watch::Receiver<Durability>);

impl DurableWatch {
    /// Returns once at least `need` entries are durable (at once for 0).
    ///
    /// Errors: [`NeverDurable`] when the store fails or closes first.
    pub async fn reached(&mut self, need: u64) -> Result<(), NeverDurable> {
        if need == 0 {
            return Ok(());
        }
        let reached = self
            .0
            .wait_for(|d| !matches!(d, Durability::Entries(n) if *n < need))
            .await
            .map_err(|_| NeverDurable)?;
        match *reached {
            Durability::Entries(_) => Ok(()),
            Durability::Failed => Err(NeverDurable),
        }
    }

    /// The latest state, without waiting.
    pub fn now(&self) -> Durability {
        *self.0.borrow()
    }
}

/// The durable log store. See the module documentation.
pub struct Store {
    shared: Arc<Shared>,
    writer: Option<JoinHandle<()>>,
    recovery: Recovery,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.shared.dir)
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (creating if needed) the store in `dir` with default options, recovering as the
    /// module documentation describes.
    pub fn open(dir: impl AsRef<Path>) -> Result<Store, StoreError> {
        Self::open_with(dir, StoreOptions::default())
    }

    /// Opens (creating if needed) the store in `dir`.
    pub fn open_with(dir: impl AsRef<Path>, options: StoreOptions) -> Result<Store, StoreError> {
        if !(MIN_SEGMENT_BYTES..=MAX_SEGMENT_BYTES).contains(&options.segment_bytes) {
            return Err(StoreError::InvalidOptions {
                segment_bytes: options.segment_bytes,
                min: MIN_SEGMENT_BYTES,
                max: MAX_SEGMENT_BYTES,
            });
        }
        let started = Instant::now();
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir).map_err(StoreError::io("create store directory", &dir))?;
        let lock = lock_dir(&dir)?;
        let segments_dir = dir.join(segment::SEGMENTS_DIR);
        if !segments_dir.is_dir() {
            fs::create_dir(&segments_dir)
                .map_err(StoreError::io("create segments directory", &segments_dir))?;
            sync_dir(&dir)?;
        }
        checkpoint::remove_stale_temp(&dir)?;

        let (index, mut recovery) = segment::rebuild_index(&dir, &segments_dir)?;
        // Whatever a crashed predecessor wrote but never synced is durable before it is read.
        let writer = Writer::open(segments_dir, options.segment_bytes, index.segments.last())?;
        recovery.elapsed = started.elapsed();

        let next_seq = index.len();
        let (durable, _) = tokio::sync::watch::channel(Durability::Entries(next_seq));
        let shared = Arc::new(Shared {
            durable,
            dir,
            queue: Mutex::new(Queue::new(next_seq)),
            wake: Condvar::new(),
            writer: Mutex::new(writer),
            index: RwLock::new(index),
            checkpoint: Mutex::new(()),
            appends: AtomicU64::new(0),
            entries: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            segments_created: AtomicU64::new(0),
            inline_commits: AtomicU64::new(0),
            commit_micros: AtomicU64::new(0),
            _lock: lock,
        });
        let for_thread = Arc::clone(&shared);
        let handle = std::thread::Builder::new()
            .name("attestplane-store-writer".into())
            .spawn(move || writer::run(&for_thread))
            .map_err(StoreError::io("spawn the writer thread for", &shared.dir))?;
        Ok(Store {
            shared,
            writer: Some(handle),
            recovery,
        })
    }

    /// Queues an append of `entries` as seqs `first_seq..` and returns at once; the returned
    /// [`Commit`] completes with the last seq once the entries are durable.
    ///
    /// The order of calls is the order on disk: callers that must agree on seqs serialise
    /// their calls to `submit` (not their waits). Refused at once: a gap or overlap with the
    /// next seq ([`Store::next_seq`]), an empty append, more than [`MAX_APPEND_ENTRIES`]
    /// entries or [`MAX_APPEND_BYTES`] bytes, an empty entry or one over [`MAX_ENTRY_LEN`], and
    /// any append after a failure. Dropping the `Commit` does not cancel the append.
    pub fn submit(&self, first_seq: u64, entries: Vec<Vec<u8>>) -> Result<Commit, StoreError> {
        let pending = Pending::check(first_seq, entries)?;
        let mut queue = lock(&self.shared.queue);
        admit(&mut queue, first_seq, pending.end_seq)?;
        Ok(self.enqueue(queue, pending))
    }

    /// Queues `pending` (already admitted under `queue`) for the writer thread, waking it if it
    /// is idle.
    fn enqueue(&self, mut queue: MutexGuard<'_, Queue>, pending: Pending) -> Commit {
        let (pending, commit) = pending.with_commit();
        queue.pending.push_back(pending);
        let idle = !queue.busy;
        drop(queue);
        if idle {
            self.shared.wake.notify_one();
        }
        commit
    }

    /// [`Store::submit`], except that when no commit is in flight, nothing else is queued and
    /// the last group commit held a single append (one writer at a time, as with one client),
    /// the append is not handed to the writer thread: it is reserved for the caller, who writes
    /// and syncs it on its own thread with [`InlineCommit::run`]. That saves the two thread
    /// hand-offs (to the writer and back) a lone append otherwise pays; under concurrency the
    /// writer thread's group commit takes over again by itself (a commit in flight, or a
    /// batch of several appends, sends the next ones to the queue).
    ///
    /// The order of calls is the order on disk, as with `submit`: appends submitted after a
    /// reservation wait for it (the writer thread takes them only once it has run). An
    /// [`InlineCommit`] dropped without running is handed to the writer thread.
    pub fn submit_or_reserve(
        &self,
        first_seq: u64,
        entries: Vec<Vec<u8>>,
    ) -> Result<Submitted, StoreError> {
        let pending = Pending::check(first_seq, entries)?;
        let mut queue = lock(&self.shared.queue);
        admit(&mut queue, first_seq, pending.end_seq)?;
        if !queue.busy && queue.pending.is_empty() && queue.last_batch_appends <= 1 {
            queue.busy = true;
            drop(queue);
            return Ok(Submitted::Inline(InlineCommit::new(
                Arc::clone(&self.shared),
                pending,
            )));
        }
        Ok(Submitted::Queued(self.enqueue(queue, pending)))
    }

    /// Appends `entries` as seqs `first_seq..` and returns the last seq once they are durable
    /// (`fdatasync`ed). The append is queued when this future is first polled; use
    /// [`Store::submit`] to fix the order before awaiting.
    pub async fn append(&self, first_seq: u64, entries: Vec<Vec<u8>>) -> Result<u64, StoreError> {
        self.submit(first_seq, entries)?.await
    }

    /// [`Store::append`] for threads that are not async: blocks until the entries are durable.
    pub fn append_blocking(
        &self,
        first_seq: u64,
        entries: Vec<Vec<u8>>,
    ) -> Result<u64, StoreError> {
        self.submit(first_seq, entries)?.wait()
    }

    /// The seq the next [`Store::submit`] must start with (durable plus queued entries).
    pub fn next_seq(&self) -> u64 {
        lock(&self.shared.queue).next_seq
    }

    /// A watch of the number of durable entries ([`DurableWatch`]).
    pub fn durable_watch(&self) -> DurableWatch {
        DurableWatch(self.shared.durable.subscribe())
    }

    /// The number of durable entries.
    pub fn len(&self) -> u64 {
        read(&self.shared.index).len()
    }

    /// Whether no entry is durable yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The hash of the last durable entry (the `prev` of the next), if any.
    pub fn head_hash(&self) -> Option<EntryHash> {
        read(&self.shared.index).head
    }

    /// The durable entry `seq`.
    pub fn get(&self, seq: u64) -> Result<Vec<u8>, StoreError> {
        let end = seq.checked_add(1).ok_or(StoreError::SeqOverflow)?;
        self.range(seq, end)?
            .into_iter()
            .next()
            .ok_or(StoreError::Index { seq })
    }

    /// Durable entries from `start` towards `end` (exclusive), in order: at most
    /// [`MAX_RANGE_ENTRIES`] entries and [`MAX_RANGE_BYTES`] bytes, and at least one entry when
    /// `start < end`. Callers continue from `start` plus the number returned.
    pub fn range(&self, start: u64, end: u64) -> Result<Vec<Vec<u8>>, StoreError> {
        let locs = {
            let index = read(&self.shared.index);
            let len = index.len();
            if start > end || end > len {
                return Err(StoreError::OutOfRange { start, end, len });
            }
            let end = end.min(start.saturating_add(MAX_RANGE_ENTRIES as u64));
            let mut locs = Vec::new();
            let mut bytes = 0usize;
            for seq in start..end {
                let loc = index.locate(seq)?;
                if !locs.is_empty() && bytes.saturating_add(loc.len) > MAX_RANGE_BYTES {
                    break;
                }
                bytes = bytes.saturating_add(loc.len);
                locs.push(loc);
            }
            locs
        };
        segment::read_locations(&locs)
    }

    /// Every entry durable now, from seq 0, in batches of at most `batch_size` entries (and
    /// [`MAX_RANGE_BYTES`] bytes), for streaming the log into the enclave at boot. The first
    /// error ends the iteration.
    pub fn stream(&self, batch_size: usize) -> EntryStream<'_> {
        EntryStream {
            store: self,
            next: 0,
            end: self.len(),
            batch: batch_size.clamp(1, MAX_RANGE_ENTRIES) as u64,
        }
    }

    /// The Merkle leaf hash of durable entry `seq`.
    pub fn leaf_hash(&self, seq: u64) -> Result<Hash, StoreError> {
        let index = read(&self.shared.index);
        index.leaves.get(seq).ok_or(StoreError::OutOfRange {
            start: seq,
            end: seq.saturating_add(1),
            len: index.len(),
        })
    }

    /// The Merkle root of the first `size` entries.
    pub fn root(&self, size: u64) -> Result<Hash, StoreError> {
        Ok(self.tree(size)?.root())
    }

    /// The inclusion proof of entry `index` in the tree of the first `size` entries
    /// (RFC 9162 §2.1.3.1, bottom-up).
    pub fn inclusion_proof(&self, index: u64, size: u64) -> Result<Vec<Hash>, StoreError> {
        Ok(self.tree(size)?.inclusion_proof(index)?)
    }

    /// The consistency proof from the tree of the first `old_size` entries to that of the first
    /// `new_size` (RFC 9162 §2.1.4.1).
    pub fn consistency_proof(&self, old_size: u64, new_size: u64) -> Result<Vec<Hash>, StoreError> {
        if old_size > new_size {
            return Err(MerkleError::SizeRegression { old_size, new_size }.into());
        }
        Ok(self.tree(new_size)?.consistency_proof(old_size)?)
    }

    /// What [`Store::open`] found: entries, segments, a torn tail cut, and how long it took.
    pub fn recovery(&self) -> &Recovery {
        &self.recovery
    }

    /// Counters since open.
    pub fn stats(&self) -> StoreStats {
        let s = &self.shared;
        StoreStats {
            appends: s.appends.load(Ordering::Relaxed),
            entries: s.entries.load(Ordering::Relaxed),
            syncs: s.syncs.load(Ordering::Relaxed),
            segments_created: s.segments_created.load(Ordering::Relaxed),
            inline_commits: s.inline_commits.load(Ordering::Relaxed),
            commit_micros: s.commit_micros.load(Ordering::Relaxed),
        }
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// A snapshot of the tree of the first `size` entries; the index lock is held only to
    /// clone a few reference counts and at most one chunk of leaf hashes.
    fn tree(&self, size: u64) -> Result<TreeSnapshot, StoreError> {
        let index = read(&self.shared.index);
        let len = index.len();
        if size > len {
            return Err(StoreError::OutOfRange {
                start: 0,
                end: size,
                len,
            });
        }
        Ok(index.leaves.snapshot(size))
    }
}

/// Admits an append of seqs `first_seq..end_seq` to `queue`: no append after a failure or
/// once closing, and exactly the next seq (no gap, no overlap). Advances the next seq.
fn admit(queue: &mut Queue, first_seq: u64, end_seq: u64) -> Result<(), StoreError> {
    if let Some(cause) = &queue.failed {
        return Err(StoreError::Failed {
            cause: Box::new(cause.clone()),
        });
    }
    if queue.closing {
        return Err(StoreError::Closed);
    }
    let next = queue.next_seq;
    if first_seq > next {
        return Err(StoreError::Gap { next, first_seq });
    }
    if first_seq < next {
        return Err(StoreError::Overlap { next, first_seq });
    }
    queue.next_seq = end_seq;
    Ok(())
}

impl Drop for Store {
    /// Lets the writer finish what is queued, then stops it.
    fn drop(&mut self) {
        lock(&self.shared.queue).closing = true;
        self.shared.wake.notify_all();
        if let Some(handle) = self.writer.take() {
            let _ = handle.join();
        }
    }
}

/// Batches of durable entries from seq 0; see [`Store::stream`].
#[derive(Debug)]
pub struct EntryStream<'a> {
    store: &'a Store,
    next: u64,
    end: u64,
    batch: u64,
}

impl Iterator for EntryStream<'_> {
    type Item = Result<Vec<Vec<u8>>, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.end {
            return None;
        }
        let end = self.end.min(self.next.saturating_add(self.batch));
        match self.store.range(self.next, end) {
            Ok(batch) if !batch.is_empty() => {
                self.next = self.next.saturating_add(batch.len() as u64);
                Some(Ok(batch))
            }
            Ok(_) => {
                self.next = self.end;
                Some(Err(StoreError::Index { seq: self.next }))
            }
            Err(e) => {
                self.next = self.end;
                Some(Err(e))
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Internals.

/// State shared by the handle, readers and the writer thread.
struct Shared {
    dir: PathBuf,
    queue: Mutex<Queue>,
    wake: Condvar,
    /// The segment writer. Locked only by the committer that set [`Queue::busy`] (the writer
    /// thread or an [`InlineCommit`]), so never contended.
    writer: Mutex<Writer>,
    index: RwLock<Index>,
    /// Serialises checkpoint replacement.
    checkpoint: Mutex<()>,
    appends: AtomicU64,
    entries: AtomicU64,
    syncs: AtomicU64,
    segments_created: AtomicU64,
    inline_commits: AtomicU64,
    commit_micros: AtomicU64,
    /// The number of durable entries, published after each commit ([`DurableWatch`]).
    durable: tokio::sync::watch::Sender<Durability>,
    /// Holds the advisory lock for the store's lifetime.
    _lock: File,
}

/// The in-memory index of durable entries.
#[derive(Default)]
struct Index {
    segments: Vec<SegmentMeta>,
    /// Per entry, the offset of its record in its segment.
    offsets: Vec<u32>,
    leaves: Leaves,
    head: Option<EntryHash>,
}

struct SegmentMeta {
    first_seq: u64,
    path: Arc<Path>,
    /// Durable length in bytes.
    len: u64,
}

/// Where an entry is, and what it must hash to.
struct Location {
    seq: u64,
    path: Arc<Path>,
    /// Offset of the record (its header).
    offset: u64,
    /// Length of the entry.
    len: usize,
    leaf: Hash,
}

impl Index {
    fn len(&self) -> u64 {
        self.offsets.len() as u64
    }

    fn locate(&self, seq: u64) -> Result<Location, StoreError> {
        let missing = StoreError::Index { seq };
        let i = usize::try_from(seq).map_err(|_| missing.clone())?;
        let s = self
            .segments
            .partition_point(|s| s.first_seq <= seq)
            .checked_sub(1)
            .ok_or(missing.clone())?;
        let segment = self.segments.get(s).ok_or(missing.clone())?;
        let segment_end_seq = self
            .segments
            .get(s + 1)
            .map_or(self.len(), |next| next.first_seq);
        let offset = u64::from(*self.offsets.get(i).ok_or(missing.clone())?);
        let record_end = match seq.checked_add(1) {
            Some(next) if next < segment_end_seq => {
                u64::from(*self.offsets.get(i + 1).ok_or(missing.clone())?)
            }
            _ => segment.len,
        };
        let len = record_end
            .checked_sub(offset)
            .and_then(|n| n.checked_sub(RECORD_HEADER_LEN as u64))
            .and_then(|n| usize::try_from(n).ok())
            .ok_or(missing.clone())?;
        let leaf = self.leaves.get(seq).ok_or(missing)?;
        Ok(Location {
            seq,
            path: Arc::clone(&segment.path),
            offset,
            len,
            leaf,
        })
    }
}

/// Takes the store's advisory lock, failing at once if someone holds it.
fn lock_dir(dir: &Path) -> Result<File, StoreError> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(StoreError::io("open", &path))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => Err(StoreError::Locked { path }),
        Err(fs::TryLockError::Error(e)) => Err(StoreError::io("lock", &path)(e)),
    }
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(StoreError::io("fsync directory", dir))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}
