//! The durable log store: append-only segment files, group commit, an in-memory index.
//!
//! Role. The enclave signs log entries; the host keeps them. This module is the only one that
//! knows how they are kept. Its one promise is DESIGN.md's: *nothing is acknowledged before it
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
//! concurrency. A new segment is started when the current one has reached
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
//! [`merkle::inclusion_proof`] and [`merkle::consistency_proof`]. Every read re-hashes the entry and compares it with the leaf hash recorded when
//! it was indexed, so bytes changed on disk afterwards are reported ([`StoreError::Changed`]),
//! never served. sled is not used: its `flush` is not durable (DESIGN.md, "The store"), the
//! segments are the source of truth anyway, and rebuilding the index from them is fast (see the
//! figures in `benches/store.rs`); one copy of the data means no second copy to disagree.
//!
//! ## Recovery
//!
//! At open every record of every segment is checked. A bad record (short header, zero or
//! oversized length, a body running past the end of the file, or a checksum mismatch) is
//! - a *torn tail*, cut away, if it is in the last segment, the bytes from it to the end of the
//!   file are no more than one batch can leave unsynced ([`MAX_UNSYNCED_BYTES`]) and no valid
//!   record starts anywhere after it. Such bytes were never acknowledged (acknowledgement
//!   follows the sync of the whole batch); they are copied to `DIR/quarantine/` first and
//!   reported in [`Store::recovery`];
//! - otherwise a hard error, [`StoreError::Corrupt`], naming the segment, offset and seq and why
//!   it cannot be a torn tail. Nothing is dropped silently.
//!
//! Open then syncs the last segment and the segments directory, so that records a crashed
//! predecessor wrote but never synced are durable before anyone reads them.
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

use std::collections::VecDeque;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock};
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use attestplane_verifier::checkpoint::MAX_NOTE_LEN;
use attestplane_verifier::entry::EntryHash;
use attestplane_verifier::log::claimed_size;
use attestplane_verifier::merkle::{self, Hash, MerkleError};
use thiserror::Error;

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

const SEGMENTS_DIR: &str = "segments";
const SEGMENT_SUFFIX: &str = ".log";
const SEGMENT_NAME_DIGITS: usize = 20;
const CHECKPOINT_FILE: &str = "checkpoint";
const CHECKPOINT_TMP: &str = "checkpoint.tmp";
const LOCK_FILE: &str = "LOCK";
const QUARANTINE_DIR: &str = "quarantine";
const SCAN_BUFFER: usize = 1024 * 1024;
/// Most saved tails for one segment offset.
const MAX_QUARANTINE_VERSIONS: u32 = 100;
/// Leaf hashes are kept in immutable chunks of this many, so that proofs can snapshot them
/// without holding the index lock.
const LEAF_CHUNK: usize = 4096;

// A replay batch must fit one protocol frame, with room for CBOR framing of each entry.
const _: () =
    assert!(MAX_RANGE_BYTES + 16 * MAX_RANGE_ENTRIES + 1024 <= attestplane_proto::MAX_FRAME_LEN);
// Every record offset fits a u32.
const _: () = assert!(MAX_SEGMENT_FILE_BYTES < u32::MAX as u64);

/// What is wrong with one record of a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum RecordFault {
    /// Fewer bytes than a header remain at the end of the file.
    #[error("only {have} bytes of an 8-byte header")]
    ShortHeader {
        /// Bytes left in the file.
        have: u64,
    },
    /// The length field is zero (the store never writes an empty entry).
    #[error("length is zero")]
    ZeroLength,
    /// The length field exceeds [`MAX_ENTRY_LEN`].
    #[error("length {len} exceeds the maximum entry length {max}")]
    TooLong {
        /// The length found.
        len: u64,
        /// [`MAX_ENTRY_LEN`].
        max: usize,
    },
    /// The length field runs past the end of the file.
    #[error("length {len} runs past the end of the file ({have} bytes left)")]
    ShortBody {
        /// The length found.
        len: u64,
        /// Bytes left after the header.
        have: u64,
    },
    /// The checksum does not match the entry's bytes.
    #[error("checksum {stored:08x} does not match the entry's {computed:08x}")]
    BadChecksum {
        /// The checksum in the header.
        stored: u32,
        /// The checksum of the bytes found.
        computed: u32,
    },
}

/// Why a bad record found at open is not a torn tail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum NotTorn {
    /// Only the last segment can end in a torn write.
    #[error("it is not in the last segment")]
    NotLastSegment,
    /// A valid record starts after it, so it is not at the end of what was written.
    #[error("a valid record follows at offset {offset}")]
    ValidRecordFollows {
        /// Offset of the valid record.
        offset: u64,
    },
    /// More bytes follow it than one batch can leave unsynced.
    #[error("{len} bytes follow it, more than one batch ({max})")]
    TailTooLong {
        /// Bytes from the bad record to the end of the file.
        len: u64,
        /// [`MAX_UNSYNCED_BYTES`].
        max: u64,
    },
    /// The search for a valid record after it exceeded [`MAX_TAIL_SCAN_HASH_BYTES`].
    #[error("the bytes after it are too costly to search for valid records")]
    ScanBudgetExhausted,
}

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
    /// A checkpoint note longer than [`MAX_NOTE_LEN`].
    #[error("checkpoint note is {len} bytes, more than {max}")]
    CheckpointTooLarge {
        /// Its length.
        len: u64,
        /// [`MAX_NOTE_LEN`].
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
        let segments_dir = dir.join(SEGMENTS_DIR);
        if !segments_dir.is_dir() {
            fs::create_dir(&segments_dir)
                .map_err(StoreError::io("create segments directory", &segments_dir))?;
            sync_dir(&dir)?;
        }
        let tmp = dir.join(CHECKPOINT_TMP);
        match fs::remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(StoreError::io("remove stale checkpoint temp", &tmp)(e));
            }
            _ => {}
        }

        let (index, mut recovery) = rebuild_index(&dir, &segments_dir)?;
        // Whatever a crashed predecessor wrote but never synced is durable before it is read.
        let current = match index.segments.last() {
            Some(last) => {
                let file = OpenOptions::new()
                    .append(true)
                    .open(&last.path)
                    .map_err(StoreError::io("open segment for append", &last.path))?;
                file.sync_all()
                    .map_err(StoreError::io("fsync segment", &last.path))?;
                Some(OpenSegment {
                    file,
                    path: Arc::clone(&last.path),
                    len: last.len,
                })
            }
            None => None,
        };
        sync_dir(&segments_dir)?;
        recovery.elapsed = started.elapsed();

        let next_seq = index.len();
        let shared = Arc::new(Shared {
            dir,
            queue: Mutex::new(Queue {
                pending: VecDeque::new(),
                next_seq,
                failed: None,
                closing: false,
            }),
            wake: Condvar::new(),
            index: RwLock::new(index),
            checkpoint: Mutex::new(()),
            appends: AtomicU64::new(0),
            entries: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            segments_created: AtomicU64::new(0),
            #[cfg(test)]
            inject_failure: std::sync::atomic::AtomicBool::new(false),
            _lock: lock,
        });
        let writer = Writer {
            segments_dir,
            segment_bytes: options.segment_bytes,
            current,
            buf: Vec::new(),
        };
        let for_thread = Arc::clone(&shared);
        let handle = std::thread::Builder::new()
            .name("attestplane-store-writer".into())
            .spawn(move || writer.run(&for_thread))
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
        queue.next_seq = pending.end_seq;
        let (pending, commit) = pending.with_commit();
        queue.pending.push_back(pending);
        drop(queue);
        self.shared.wake.notify_one();
        Ok(commit)
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
        read_locations(&locs)
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

    /// Replaces the latest checkpoint note, atomically (temp file, fsync, rename, fsync of the
    /// directory). The note is not verified here (the enclave signed it; auditors check it),
    /// but its body must state a size, no larger than the durable log and no smaller than the
    /// stored checkpoint's.
    pub fn put_checkpoint(&self, note: &str) -> Result<(), StoreError> {
        if note.len() > MAX_NOTE_LEN {
            return Err(StoreError::CheckpointTooLarge {
                len: note.len() as u64,
                max: MAX_NOTE_LEN,
            });
        }
        let size = claimed_size(note).ok_or(StoreError::CheckpointMalformed {
            reason: "its body does not parse",
        })?;
        let len = self.len();
        if size > len {
            return Err(StoreError::CheckpointAhead { size, len });
        }
        let _serial = lock(&self.shared.checkpoint);
        // A stored note that cannot be read or parsed does not block its replacement.
        if let Ok(Some(stored)) = self.latest_checkpoint()
            && let Some(stored) = claimed_size(&stored)
            && size < stored
        {
            return Err(StoreError::CheckpointRegression { size, stored });
        }
        let dir = &self.shared.dir;
        let tmp = dir.join(CHECKPOINT_TMP);
        let path = dir.join(CHECKPOINT_FILE);
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(StoreError::io("create", &tmp))?;
        file.write_all(note.as_bytes())
            .map_err(StoreError::io("write", &tmp))?;
        file.sync_all().map_err(StoreError::io("fsync", &tmp))?;
        drop(file);
        fs::rename(&tmp, &path).map_err(StoreError::io("rename checkpoint into", &path))?;
        sync_dir(dir)
    }

    /// The latest checkpoint note stored, if any.
    pub fn latest_checkpoint(&self) -> Result<Option<String>, StoreError> {
        let path = self.shared.dir.join(CHECKPOINT_FILE);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::io("open", &path)(e)),
        };
        let mut bytes = Vec::new();
        file.take(MAX_NOTE_LEN as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(StoreError::io("read", &path))?;
        if bytes.len() > MAX_NOTE_LEN {
            return Err(StoreError::CheckpointTooLarge {
                len: bytes.len() as u64,
                max: MAX_NOTE_LEN,
            });
        }
        String::from_utf8(bytes)
            .map(Some)
            .map_err(|_| StoreError::CheckpointMalformed {
                reason: "the stored note is not UTF-8",
            })
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

/// Completes with the last seq of an append once it is durable; see [`Store::submit`].
/// Await it, or call [`Commit::wait`] from a thread that is not async.
#[must_use = "an append is durable only once its commit completes"]
pub struct Commit {
    slot: Arc<Slot>,
}

impl fmt::Debug for Commit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Commit").finish_non_exhaustive()
    }
}

impl Commit {
    /// Blocks the thread until the append is durable (or failed).
    pub fn wait(self) -> Result<u64, StoreError> {
        let mut state = lock(&self.slot.state);
        loop {
            if let Some(result) = state.result.take() {
                return result;
            }
            state = self
                .slot
                .ready
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

impl Future for Commit {
    type Output = Result<u64, StoreError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = lock(&self.slot.state);
        match state.result.take() {
            Some(result) => Poll::Ready(result),
            None => {
                state.waker = Some(cx.waker().clone());
                Poll::Pending
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
    index: RwLock<Index>,
    /// Serialises checkpoint replacement.
    checkpoint: Mutex<()>,
    appends: AtomicU64,
    entries: AtomicU64,
    syncs: AtomicU64,
    segments_created: AtomicU64,
    /// Makes the next batch fail, to test failure handling.
    #[cfg(test)]
    inject_failure: std::sync::atomic::AtomicBool,
    /// Holds the advisory lock for the store's lifetime.
    _lock: File,
}

struct Queue {
    pending: VecDeque<Pending>,
    /// The seq the next submit must start with.
    next_seq: u64,
    /// The first write or sync failure; no appends after it.
    failed: Option<StoreError>,
    closing: bool,
}

/// A checked append waiting for the writer.
struct Pending {
    first_seq: u64,
    end_seq: u64,
    entries: Vec<Vec<u8>>,
    hashes: Vec<EntryHash>,
    /// Encoded size (headers included).
    bytes: usize,
    done: Completer,
}

impl Pending {
    /// Checks an append's bounds and hashes its entries (on the caller's thread, off the
    /// writer's).
    fn check(first_seq: u64, entries: Vec<Vec<u8>>) -> Result<Pending, StoreError> {
        if entries.is_empty() {
            return Err(StoreError::EmptyAppend);
        }
        if entries.len() > MAX_APPEND_ENTRIES {
            return Err(StoreError::TooManyEntries {
                count: entries.len(),
                max: MAX_APPEND_ENTRIES,
            });
        }
        let end_seq = first_seq
            .checked_add(entries.len() as u64)
            .ok_or(StoreError::SeqOverflow)?;
        let mut total = 0usize;
        for (seq, entry) in (first_seq..).zip(&entries) {
            if entry.is_empty() {
                return Err(StoreError::EmptyEntry { seq });
            }
            if entry.len() > MAX_ENTRY_LEN {
                return Err(StoreError::EntryTooLarge {
                    seq,
                    len: entry.len(),
                    max: MAX_ENTRY_LEN,
                });
            }
            total = total.saturating_add(entry.len());
        }
        if total > MAX_APPEND_BYTES {
            return Err(StoreError::AppendTooLarge {
                len: total,
                max: MAX_APPEND_BYTES,
            });
        }
        let hashes = entries.iter().map(|e| EntryHash::of(e)).collect();
        Ok(Pending {
            first_seq,
            end_seq,
            bytes: total + RECORD_HEADER_LEN * entries.len(),
            entries,
            hashes,
            done: Completer { slot: None },
        })
    }

    fn with_commit(mut self) -> (Pending, Commit) {
        let slot = Arc::new(Slot {
            state: Mutex::new(SlotState::default()),
            ready: Condvar::new(),
        });
        self.done = Completer {
            slot: Some(Arc::clone(&slot)),
        };
        (self, Commit { slot })
    }
}

struct Slot {
    state: Mutex<SlotState>,
    ready: Condvar,
}

#[derive(Default)]
struct SlotState {
    result: Option<Result<u64, StoreError>>,
    waker: Option<Waker>,
}

/// The writer's end of a [`Commit`]. Dropped without completing (the writer stopped), it
/// completes the commit with [`StoreError::Closed`], so no waiter hangs.
struct Completer {
    slot: Option<Arc<Slot>>,
}

impl Completer {
    fn complete(mut self, result: Result<u64, StoreError>) {
        if let Some(slot) = self.slot.take() {
            fill(&slot, result);
        }
    }
}

impl Drop for Completer {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            fill(&slot, Err(StoreError::Closed));
        }
    }
}

fn fill(slot: &Slot, result: Result<u64, StoreError>) {
    let waker = {
        let mut state = lock(&slot.state);
        state.result = Some(result);
        state.waker.take()
    };
    slot.ready.notify_all();
    if let Some(waker) = waker {
        waker.wake();
    }
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

/// Leaf hashes in immutable chunks of [`LEAF_CHUNK`] (a power of two), each with its Merkle
/// root computed when it fills, plus the open chunk being filled.
#[derive(Default)]
struct Leaves {
    sealed: Vec<Arc<[Hash]>>,
    roots: Vec<Hash>,
    open: Vec<Hash>,
}

impl Leaves {
    fn push(&mut self, leaf: Hash) {
        self.open.push(leaf);
        if self.open.len() >= LEAF_CHUNK {
            let full = std::mem::replace(&mut self.open, Vec::with_capacity(LEAF_CHUNK));
            self.roots.push(merkle::root(&full));
            self.sealed.push(Arc::from(full));
        }
    }

    fn get(&self, seq: u64) -> Option<Hash> {
        let i = usize::try_from(seq).ok()?;
        let (chunk, within) = (i / LEAF_CHUNK, i % LEAF_CHUNK);
        match self.sealed.get(chunk) {
            Some(c) => c.get(within).copied(),
            None if chunk == self.sealed.len() => self.open.get(within).copied(),
            None => None,
        }
    }

    /// The tree of the first `size` leaves (`size` at most the number pushed).
    fn snapshot(&self, size: u64) -> TreeSnapshot {
        let size = usize::try_from(size).unwrap_or(usize::MAX);
        let full = size / LEAF_CHUNK;
        let open = if full >= self.sealed.len() {
            self.open.clone()
        } else {
            Vec::new()
        };
        TreeSnapshot {
            unit: LEAF_CHUNK,
            size,
            chunks: self.sealed.iter().take(full + 1).cloned().collect(),
            roots: self.roots.iter().take(full).copied().collect(),
            open,
        }
    }
}

/// The tree of the first `size` leaves, seen as aligned units of `unit` leaves (a power of
/// two): `chunks` holds the leaves of each sealed unit, `roots` the roots of the units that are
/// full within `size`, and `open` the leaves after the sealed units.
///
/// Every full unit is a complete subtree of the RFC 6962 tree, and so is the partial last one
/// (the tree's splits at powers of two at least `unit` fall on unit boundaries). So the tree
/// over the units' roots is the top of the real tree, and a proof is a proof inside one unit
/// followed by a proof over the units, both made by the verifier's generators: O(size / unit +
/// unit) hashes instead of O(size).
struct TreeSnapshot {
    unit: usize,
    size: usize,
    chunks: Vec<Arc<[Hash]>>,
    roots: Vec<Hash>,
    open: Vec<Hash>,
}

impl TreeSnapshot {
    /// The leaves of unit `u` that are within the tree.
    fn unit_leaves(&self, u: usize) -> &[Hash] {
        let start = u.saturating_mul(self.unit);
        let end = start.saturating_add(self.unit).min(self.size);
        let leaves: &[Hash] = match self.chunks.get(u) {
            Some(chunk) => chunk,
            None if u == self.chunks.len() => &self.open,
            None => &[],
        };
        leaves.get(..end.saturating_sub(start)).unwrap_or(leaves)
    }

    /// The roots of the units: the full ones, then the partial last one if any.
    fn units(&self) -> Vec<Hash> {
        let full = self.size / self.unit;
        let mut units: Vec<Hash> = self.roots.iter().take(full).copied().collect();
        if !self.size.is_multiple_of(self.unit) {
            units.push(merkle::root(self.unit_leaves(full)));
        }
        units
    }

    fn root(&self) -> Hash {
        if self.size == 0 {
            return merkle::empty_root();
        }
        merkle::root(&self.units())
    }

    fn inclusion_proof(&self, index: u64) -> Result<Vec<Hash>, MerkleError> {
        let i = usize::try_from(index)
            .ok()
            .filter(|i| *i < self.size)
            .ok_or(MerkleError::IndexOutOfRange {
                index,
                size: self.size as u64,
            })?;
        let (u, within) = (i / self.unit, i % self.unit);
        let mut proof = merkle::inclusion_proof(self.unit_leaves(u), within as u64)?;
        proof.extend(merkle::inclusion_proof(&self.units(), u as u64)?);
        Ok(proof)
    }

    fn consistency_proof(&self, old_size: u64) -> Result<Vec<Hash>, MerkleError> {
        let old = usize::try_from(old_size)
            .ok()
            .filter(|o| *o <= self.size)
            .ok_or(MerkleError::SizeRegression {
                old_size,
                new_size: self.size as u64,
            })?;
        if old == 0 || old == self.size {
            return Ok(Vec::new());
        }
        let (u, within) = (old / self.unit, old % self.unit);
        let units = self.units();
        if within == 0 {
            // The old tree is whole units: the proof lives entirely in the tree of units.
            return merkle::consistency_proof(&units, u as u64);
        }
        // The old tree ends inside unit `u`. RFC 9162's SUBPROOF walks down to that unit,
        // recording the siblings on its path (the unit's inclusion proof among the units),
        // then continues inside it; the inner part omits the old subtree's root only when the
        // old tree is that subtree, i.e. when the walk never went right (u == 0).
        let leaves = self.unit_leaves(u);
        let mut proof = Vec::new();
        if u > 0 && within.is_power_of_two() {
            proof.push(merkle::root(leaves.get(..within).unwrap_or(leaves)));
        }
        proof.extend(merkle::consistency_proof(leaves, within as u64)?);
        proof.extend(merkle::inclusion_proof(&units, u as u64)?);
        Ok(proof)
    }
}

/// The segment the writer appends to.
struct OpenSegment {
    file: File,
    path: Arc<Path>,
    len: u64,
}

/// The writer thread's state.
struct Writer {
    segments_dir: PathBuf,
    segment_bytes: u64,
    current: Option<OpenSegment>,
    buf: Vec<u8>,
}

impl Writer {
    fn run(mut self, shared: &Shared) {
        while let Some(batch) = next_batch(shared) {
            match self.write(shared, &batch) {
                Ok(()) => {
                    let entries: usize = batch.iter().map(|p| p.entries.len()).sum();
                    shared
                        .appends
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    shared.entries.fetch_add(entries as u64, Ordering::Relaxed);
                    for p in batch {
                        let last = p.end_seq.saturating_sub(1);
                        p.done.complete(Ok(last));
                    }
                }
                Err(error) => {
                    let rest = {
                        let mut queue = lock(&shared.queue);
                        queue.failed = Some(error.clone());
                        std::mem::take(&mut queue.pending)
                    };
                    for p in batch {
                        p.done.complete(Err(error.clone()));
                    }
                    for p in rest {
                        p.done.complete(Err(StoreError::Failed {
                            cause: Box::new(error.clone()),
                        }));
                    }
                    return;
                }
            }
        }
    }

    /// Writes one batch, syncs it once, then publishes it to the index.
    fn write(&mut self, shared: &Shared, batch: &[Pending]) -> Result<(), StoreError> {
        #[cfg(test)]
        if shared.inject_failure.swap(false, Ordering::SeqCst) {
            return Err(StoreError::io("injected failure", &self.segments_dir)(
                io::Error::other("injected"),
            ));
        }
        let first_seq = batch.first().map_or(0, |p| p.first_seq);
        let mut created = None;
        let roll = self
            .current
            .as_ref()
            .is_none_or(|s| s.len >= self.segment_bytes);
        if roll {
            let path: Arc<Path> = self.segments_dir.join(segment_name(first_seq)).into();
            let file = OpenOptions::new()
                .append(true)
                .create_new(true)
                .open(&path)
                .map_err(StoreError::io("create segment", &path))?;
            // The new name must survive power loss before anything in it is acknowledged.
            sync_dir(&self.segments_dir)?;
            shared.segments_created.fetch_add(1, Ordering::Relaxed);
            created = Some(SegmentMeta {
                first_seq,
                path: Arc::clone(&path),
                len: 0,
            });
            self.current = Some(OpenSegment { file, path, len: 0 });
        }
        let Some(segment) = self.current.as_mut() else {
            return Err(StoreError::Closed);
        };

        let count: usize = batch.iter().map(|p| p.entries.len()).sum();
        let mut offsets = Vec::with_capacity(count);
        let mut leaves = Vec::with_capacity(count);
        self.buf.clear();
        for p in batch {
            for (entry, hash) in p.entries.iter().zip(&p.hashes) {
                let offset = segment.len.saturating_add(self.buf.len() as u64);
                let offset = u32::try_from(offset).map_err(|_| StoreError::SegmentTooLarge {
                    path: segment.path.to_path_buf(),
                    len: offset,
                    max: MAX_SEGMENT_FILE_BYTES,
                })?;
                offsets.push(offset);
                let len = u32::try_from(entry.len()).map_err(|_| StoreError::EntryTooLarge {
                    seq: p.first_seq,
                    len: entry.len(),
                    max: MAX_ENTRY_LEN,
                })?;
                self.buf.extend_from_slice(&len.to_be_bytes());
                self.buf.extend_from_slice(&checksum(hash).to_be_bytes());
                self.buf.extend_from_slice(entry);
                leaves.push(merkle::leaf_hash(hash.as_bytes()));
            }
        }
        segment
            .file
            .write_all(&self.buf)
            .map_err(StoreError::io("write segment", &segment.path))?;
        segment
            .file
            .sync_data()
            .map_err(StoreError::io("fdatasync segment", &segment.path))?;
        shared.syncs.fetch_add(1, Ordering::Relaxed);
        segment.len = segment.len.saturating_add(self.buf.len() as u64);
        if self.buf.capacity() > 2 * MAX_BATCH_BYTES {
            self.buf = Vec::new();
        }

        let head = batch.last().and_then(|p| p.hashes.last()).copied();
        let mut index = write(&shared.index);
        if let Some(meta) = created {
            index.segments.push(meta);
        }
        if let Some(meta) = index.segments.last_mut() {
            meta.len = segment.len;
        }
        index.offsets.extend_from_slice(&offsets);
        for leaf in leaves {
            index.leaves.push(leaf);
        }
        if head.is_some() {
            index.head = head;
        }
        Ok(())
    }
}

/// Waits for queued appends and takes a batch of them; `None` once closing and drained.
fn next_batch(shared: &Shared) -> Option<Vec<Pending>> {
    let mut queue = lock(&shared.queue);
    while queue.pending.is_empty() {
        if queue.closing {
            return None;
        }
        queue = shared
            .wake
            .wait(queue)
            .unwrap_or_else(PoisonError::into_inner);
    }
    let mut batch = Vec::new();
    let mut bytes = 0usize;
    while let Some(front) = queue.pending.front() {
        if !batch.is_empty() && bytes.saturating_add(front.bytes) > MAX_BATCH_BYTES {
            break;
        }
        bytes = bytes.saturating_add(front.bytes);
        if let Some(p) = queue.pending.pop_front() {
            batch.push(p);
        }
    }
    Some(batch)
}

/// Reads entries at `locs` (consecutive seqs), one read per segment, checking each against
/// its indexed hash.
fn read_locations(locs: &[Location]) -> Result<Vec<Vec<u8>>, StoreError> {
    let mut out = Vec::with_capacity(locs.len());
    let mut rest = locs;
    while let Some(first) = rest.first() {
        let same = rest
            .iter()
            .take_while(|l| Arc::ptr_eq(&l.path, &first.path))
            .count();
        let (group, tail) = rest.split_at(same);
        rest = tail;
        let Some(last) = group.last() else { break };
        let start = first.offset;
        let end = last.offset + (RECORD_HEADER_LEN + last.len) as u64;
        let span = usize::try_from(end.saturating_sub(start))
            .map_err(|_| StoreError::Index { seq: last.seq })?;
        let file = File::open(&first.path).map_err(StoreError::io("open segment", &first.path))?;
        let mut buf = vec![0u8; span];
        file.read_exact_at(&mut buf, start)
            .map_err(StoreError::io("read segment", &first.path))?;
        for loc in group {
            let changed = || StoreError::Changed {
                path: loc.path.to_path_buf(),
                offset: loc.offset,
                seq: loc.seq,
            };
            let from =
                usize::try_from(loc.offset - start).map_err(|_| changed())? + RECORD_HEADER_LEN;
            let entry = buf.get(from..from + loc.len).ok_or_else(changed)?;
            if merkle::leaf_hash(EntryHash::of(entry).as_bytes()) != loc.leaf {
                return Err(changed());
            }
            out.push(entry.to_vec());
        }
    }
    Ok(out)
}

/// The record checksum: the first four bytes of the entry hash.
fn checksum(hash: &EntryHash) -> u32 {
    let [a, b, c, d, ..] = *hash.as_bytes();
    u32::from_be_bytes([a, b, c, d])
}

fn segment_name(first_seq: u64) -> String {
    format!(
        "{first_seq:0width$}{SEGMENT_SUFFIX}",
        width = SEGMENT_NAME_DIGITS
    )
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != SEGMENT_NAME_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Lists the segments, sorted by first seq.
fn list_segments(segments_dir: &Path) -> Result<Vec<(u64, PathBuf)>, StoreError> {
    let mut out = Vec::new();
    let entries =
        fs::read_dir(segments_dir).map_err(StoreError::io("list segments", segments_dir))?;
    for entry in entries {
        let entry = entry.map_err(StoreError::io("list segments", segments_dir))?;
        let path = entry.path();
        let is_file = entry
            .file_type()
            .map_err(StoreError::io("stat", &path))?
            .is_file();
        let first = entry.file_name().to_str().and_then(parse_segment_name);
        let Some(first) = first.filter(|_| is_file) else {
            return Err(StoreError::UnexpectedFile { path });
        };
        if out.len() >= MAX_SEGMENTS {
            return Err(StoreError::TooManySegments {
                path: segments_dir.to_path_buf(),
                max: MAX_SEGMENTS,
            });
        }
        out.push((first, path));
    }
    out.sort_unstable_by_key(|(first, _)| *first);
    Ok(out)
}

/// Scans every segment, cuts a torn tail off the last, and builds the index.
fn rebuild_index(dir: &Path, segments_dir: &Path) -> Result<(Index, Recovery), StoreError> {
    let segments = list_segments(segments_dir)?;
    let mut index = Index::default();
    let mut recovery = Recovery {
        entries: 0,
        segments: segments.len(),
        bytes: 0,
        torn_tail: None,
        elapsed: Duration::ZERO,
    };
    let mut expected = 0u64;
    for (i, (first_seq, path)) in segments.iter().enumerate() {
        if *first_seq != expected {
            return Err(StoreError::SegmentGap {
                path: path.clone(),
                expected,
                found: *first_seq,
            });
        }
        let is_last = i + 1 == segments.len();
        let scan = scan_segment(path, &mut index)?;
        recovery.bytes = recovery.bytes.saturating_add(scan.file_len);
        let mut len = scan.file_len;
        if let Some((offset, fault)) = scan.bad {
            let seq = first_seq.saturating_add(scan.count);
            let corrupt = |not_torn| StoreError::Corrupt {
                path: path.clone(),
                offset,
                seq,
                fault,
                not_torn,
            };
            if !is_last {
                return Err(corrupt(NotTorn::NotLastSegment));
            }
            let tail = read_torn_tail(path, scan.file_len, offset).map_err(|e| match e {
                TailError::NotTorn(why) => corrupt(why),
                TailError::Store(e) => e,
            })?;
            let saved_to = quarantine(dir, *first_seq, offset, &tail)?;
            truncate(path, offset)?;
            len = offset;
            recovery.torn_tail = Some(TornTail {
                segment: path.clone(),
                offset,
                len: tail.len() as u64,
                seq,
                fault,
                saved_to,
            });
        }
        index.segments.push(SegmentMeta {
            first_seq: *first_seq,
            path: path.as_path().into(),
            len,
        });
        expected = first_seq
            .checked_add(scan.count)
            .ok_or(StoreError::SeqOverflow)?;
    }
    recovery.entries = index.len();
    Ok((index, recovery))
}

struct Scan {
    file_len: u64,
    /// Valid records.
    count: u64,
    /// The first bad record: its offset and fault.
    bad: Option<(u64, RecordFault)>,
}

/// Reads a segment's records in order, indexing each valid one, up to the first bad one.
fn scan_segment(path: &Path, index: &mut Index) -> Result<Scan, StoreError> {
    let file = File::open(path).map_err(StoreError::io("open segment", path))?;
    let file_len = file
        .metadata()
        .map_err(StoreError::io("stat segment", path))?
        .len();
    if file_len > MAX_SEGMENT_FILE_BYTES {
        return Err(StoreError::SegmentTooLarge {
            path: path.to_path_buf(),
            len: file_len,
            max: MAX_SEGMENT_FILE_BYTES,
        });
    }
    let mut reader = BufReader::with_capacity(SCAN_BUFFER, file);
    let mut offset = 0u64;
    let mut count = 0u64;
    let mut body = Vec::new();
    let read_err = StoreError::io("read segment", path);
    let mut result = Ok(());
    let bad = loop {
        let remaining = file_len - offset;
        if remaining == 0 {
            break None;
        }
        if remaining < RECORD_HEADER_LEN as u64 {
            break Some((offset, RecordFault::ShortHeader { have: remaining }));
        }
        let mut header = [0u8; RECORD_HEADER_LEN];
        if let Err(e) = reader.read_exact(&mut header) {
            result = Err(e);
            break None;
        }
        let (len, stored) = parse_header(header);
        let have = remaining - RECORD_HEADER_LEN as u64;
        if len == 0 {
            break Some((offset, RecordFault::ZeroLength));
        }
        if len > MAX_ENTRY_LEN as u64 {
            break Some((
                offset,
                RecordFault::TooLong {
                    len,
                    max: MAX_ENTRY_LEN,
                },
            ));
        }
        if len > have {
            break Some((offset, RecordFault::ShortBody { len, have }));
        }
        // len <= MAX_ENTRY_LEN, so it fits a usize.
        body.resize(len as usize, 0);
        if let Err(e) = reader.read_exact(&mut body) {
            result = Err(e);
            break None;
        }
        let hash = EntryHash::of(&body);
        let computed = checksum(&hash);
        if computed != stored {
            break Some((offset, RecordFault::BadChecksum { stored, computed }));
        }
        // offset < file_len <= MAX_SEGMENT_FILE_BYTES < u32::MAX.
        index.offsets.push(offset as u32);
        index.leaves.push(merkle::leaf_hash(hash.as_bytes()));
        index.head = Some(hash);
        offset += RECORD_HEADER_LEN as u64 + len;
        count += 1;
    };
    result.map_err(read_err)?;
    Ok(Scan {
        file_len,
        count,
        bad,
    })
}

fn parse_header(header: [u8; RECORD_HEADER_LEN]) -> (u64, u32) {
    let [l0, l1, l2, l3, c0, c1, c2, c3] = header;
    (
        u64::from(u32::from_be_bytes([l0, l1, l2, l3])),
        u32::from_be_bytes([c0, c1, c2, c3]),
    )
}

enum TailError {
    NotTorn(NotTorn),
    Store(StoreError),
}

/// Reads the bytes from a bad record at `offset` to the end of the last segment, if they can
/// be a torn write: no longer than one batch, and no valid record anywhere in them.
fn read_torn_tail(path: &Path, file_len: u64, offset: u64) -> Result<Vec<u8>, TailError> {
    let len = file_len.saturating_sub(offset);
    if len > MAX_UNSYNCED_BYTES {
        return Err(TailError::NotTorn(NotTorn::TailTooLong {
            len,
            max: MAX_UNSYNCED_BYTES,
        }));
    }
    let file = File::open(path)
        .map_err(StoreError::io("open segment", path))
        .map_err(TailError::Store)?;
    // len <= MAX_UNSYNCED_BYTES, a few MiB.
    let mut tail = vec![0u8; len as usize];
    file.read_exact_at(&mut tail, offset)
        .map_err(StoreError::io("read segment", path))
        .map_err(TailError::Store)?;
    match find_valid_record(&tail, MAX_TAIL_SCAN_HASH_BYTES) {
        Ok(None) => Ok(tail),
        Ok(Some(at)) => Err(TailError::NotTorn(NotTorn::ValidRecordFollows {
            offset: offset.saturating_add(at as u64),
        })),
        Err(()) => Err(TailError::NotTorn(NotTorn::ScanBudgetExhausted)),
    }
}

/// The first position after 0 in `tail` where a whole valid record starts, hashing at most
/// `budget` bytes (`Err` when the budget runs out).
fn find_valid_record(tail: &[u8], mut budget: u64) -> Result<Option<usize>, ()> {
    for at in 1..tail.len() {
        let Some(header) = tail
            .get(at..at + RECORD_HEADER_LEN)
            .and_then(|h| <[u8; RECORD_HEADER_LEN]>::try_from(h).ok())
        else {
            break;
        };
        let (len, stored) = parse_header(header);
        if len == 0 || len > MAX_ENTRY_LEN as u64 {
            continue;
        }
        let start = at + RECORD_HEADER_LEN;
        // len <= MAX_ENTRY_LEN fits a usize.
        let Some(body) = tail.get(start..start + len as usize) else {
            continue;
        };
        budget = budget.checked_sub(len).ok_or(())?;
        if checksum(&EntryHash::of(body)) == stored {
            return Ok(Some(at));
        }
    }
    Ok(None)
}

/// Saves a torn tail under `DIR/quarantine/` (durably) before it is cut.
fn quarantine(dir: &Path, first_seq: u64, offset: u64, tail: &[u8]) -> Result<PathBuf, StoreError> {
    let qdir = dir.join(QUARANTINE_DIR);
    if !qdir.is_dir() {
        fs::create_dir(&qdir).map_err(StoreError::io("create quarantine directory", &qdir))?;
        sync_dir(dir)?;
    }
    // A tail cut at the same place before (a crash between saving and cutting, or a later
    // torn write at the same offset) keeps its file: identical bytes reuse it, others get the
    // next free suffix.
    for version in 0..MAX_QUARANTINE_VERSIONS {
        let suffix = if version == 0 {
            String::new()
        } else {
            format!(".{version}")
        };
        let path = qdir.join(format!(
            "{first_seq:0w$}-{offset:0w$}{suffix}.torn",
            w = SEGMENT_NAME_DIGITS
        ));
        let mut file = match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                if fs::read(&path).map_err(StoreError::io("read", &path))? == tail {
                    return Ok(path);
                }
                continue;
            }
            Err(e) => return Err(StoreError::io("create", &path)(e)),
        };
        file.write_all(tail)
            .map_err(StoreError::io("write", &path))?;
        file.sync_all().map_err(StoreError::io("fsync", &path))?;
        sync_dir(&qdir)?;
        return Ok(path);
    }
    Err(StoreError::io("save torn tail in", &qdir)(
        io::Error::other("too many saved tails at this offset"),
    ))
}

fn truncate(path: &Path, len: u64) -> Result<(), StoreError> {
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(StoreError::io("open segment", path))?;
    file.set_len(len)
        .map_err(StoreError::io("truncate segment", path))?;
    file.sync_all()
        .map_err(StoreError::io("fsync segment", path))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: u64) -> Vec<u8> {
        let mut e = format!("entry {seq} ").into_bytes();
        e.resize(64, b'.');
        e
    }

    #[test]
    fn segment_names_round_trip_and_reject_others() {
        assert_eq!(segment_name(31337), "00000000000000031337.log");
        assert_eq!(parse_segment_name(&segment_name(31337)), Some(31337));
        assert_eq!(parse_segment_name(&segment_name(u64::MAX)), Some(u64::MAX));
        for bad in [
            "0000000000000003133.log",
            "000000000000000313370.log",
            "0000000000000003133a.log",
            "00000000000000031337.lo",
            "99999999999999999999.log",
            "+0000000000000031337.log",
        ] {
            assert_eq!(parse_segment_name(bad), None, "{bad}");
        }
    }

    fn leaves(n: usize) -> Vec<Hash> {
        (0..n as u64)
            .map(|i| merkle::leaf_hash(&i.to_be_bytes()))
            .collect()
    }

    fn snapshot_of(leaves: &[Hash], unit: usize) -> TreeSnapshot {
        let chunks: Vec<Arc<[Hash]>> = leaves.chunks_exact(unit).map(Arc::from).collect();
        TreeSnapshot {
            unit,
            size: leaves.len(),
            roots: chunks.iter().map(|c| merkle::root(c)).collect(),
            open: leaves[chunks.len() * unit..].to_vec(),
            chunks,
        }
    }

    #[test]
    fn unit_proofs_equal_the_verifiers_proofs_over_all_leaves() {
        for unit in [1, 2, 4, 8] {
            for n in 0..=40 {
                let all = leaves(n);
                let tree = snapshot_of(&all, unit);
                assert_eq!(tree.root(), merkle::root(&all), "unit {unit}, size {n}");
                for index in 0..n as u64 {
                    assert_eq!(
                        tree.inclusion_proof(index).unwrap(),
                        merkle::inclusion_proof(&all, index).unwrap(),
                        "unit {unit}, inclusion of {index} in {n}"
                    );
                }
                for old in 0..=n as u64 {
                    assert_eq!(
                        tree.consistency_proof(old).unwrap(),
                        merkle::consistency_proof(&all, old).unwrap(),
                        "unit {unit}, consistency {old} to {n}"
                    );
                }
                assert!(tree.inclusion_proof(n as u64).is_err());
                assert!(tree.consistency_proof(n as u64 + 1).is_err());
            }
        }
    }

    #[test]
    fn leaves_snapshot_any_prefix_across_chunks() {
        let all = leaves(2 * LEAF_CHUNK + 7);
        let mut stored = Leaves::default();
        for (i, h) in all.iter().enumerate() {
            stored.push(*h);
            assert_eq!(stored.get(i as u64), Some(*h));
        }
        assert_eq!(stored.get(all.len() as u64), None);
        for size in [
            0,
            1,
            LEAF_CHUNK - 1,
            LEAF_CHUNK,
            LEAF_CHUNK + 1,
            2 * LEAF_CHUNK,
            all.len(),
        ] {
            let tree = stored.snapshot(size as u64);
            let prefix = &all[..size];
            assert_eq!(tree.root(), merkle::root(prefix), "size {size}");
            if size > 0 {
                let index = size as u64 / 2;
                assert_eq!(
                    tree.inclusion_proof(index).unwrap(),
                    merkle::inclusion_proof(prefix, index).unwrap(),
                    "size {size}"
                );
            }
            for old in [1, LEAF_CHUNK / 2, LEAF_CHUNK, LEAF_CHUNK + 3] {
                if old <= size {
                    assert_eq!(
                        tree.consistency_proof(old as u64).unwrap(),
                        merkle::consistency_proof(prefix, old as u64).unwrap(),
                        "{old} to {size}"
                    );
                }
            }
        }
    }

    #[test]
    fn one_sync_covers_every_queued_append() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        // Queue 100 appends while the writer cannot take any (it needs the queue lock), so it
        // finds all of them at once.
        let commits: Vec<Commit> = {
            let mut queue = lock(&store.shared.queue);
            (0..100u64)
                .map(|seq| {
                    let (p, c) = Pending::check(seq, vec![entry(seq)]).unwrap().with_commit();
                    queue.next_seq = p.end_seq;
                    queue.pending.push_back(p);
                    c
                })
                .collect()
        };
        store.shared.wake.notify_one();
        for (seq, c) in commits.into_iter().enumerate() {
            assert_eq!(c.wait().unwrap(), seq as u64);
        }
        assert_eq!(store.stats().syncs, 1);
        assert_eq!(store.stats().appends, 100);
        assert_eq!(store.len(), 100);
    }

    #[test]
    fn batches_stop_at_the_byte_bound() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let big = vec![7u8; MAX_ENTRY_LEN];
        // Each append is one maximal entry; a batch holds as many as fit MAX_BATCH_BYTES.
        let per_batch = MAX_BATCH_BYTES / (MAX_ENTRY_LEN + RECORD_HEADER_LEN);
        let n = 2 * per_batch as u64 + 1;
        let commits: Vec<Commit> = {
            let mut queue = lock(&store.shared.queue);
            (0..n)
                .map(|seq| {
                    let (p, c) = Pending::check(seq, vec![big.clone()])
                        .unwrap()
                        .with_commit();
                    queue.next_seq = p.end_seq;
                    queue.pending.push_back(p);
                    c
                })
                .collect()
        };
        store.shared.wake.notify_one();
        for c in commits {
            c.wait().unwrap();
        }
        assert_eq!(store.stats().syncs, 3);
    }

    #[test]
    fn a_write_failure_fails_the_batch_and_every_later_append() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.append_blocking(0, vec![entry(0)]).unwrap();
        store.shared.inject_failure.store(true, Ordering::SeqCst);
        let err = store.append_blocking(1, vec![entry(1)]).unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::Io {
                    op: "injected failure",
                    ..
                }
            ),
            "{err}"
        );
        let err = store.append_blocking(2, vec![entry(2)]).unwrap_err();
        assert!(matches!(err, StoreError::Failed { .. }), "{err}");
        assert_eq!(store.len(), 1);
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.len(), 1);
        assert_eq!(store.append_blocking(1, vec![entry(1)]).unwrap(), 1);
    }

    #[test]
    fn find_valid_record_skips_zeros_and_respects_the_budget() {
        assert_eq!(find_valid_record(&[0u8; 4096], 0), Ok(None));
        let e = entry(9);
        let hash = EntryHash::of(&e);
        let mut tail = vec![0u8; 100];
        tail.extend_from_slice(&(e.len() as u32).to_be_bytes());
        tail.extend_from_slice(&checksum(&hash).to_be_bytes());
        tail.extend_from_slice(&e);
        assert_eq!(find_valid_record(&tail, u64::MAX), Ok(Some(100)));
        assert_eq!(find_valid_record(&tail, 10), Err(()));
    }
}
