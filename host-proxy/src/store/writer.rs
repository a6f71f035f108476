//! The group-commit writer: two threads take turns taking every queued append, writing them
//! with one `write` and syncing them with one `fdatasync`; batches are published to the index,
//! and their appends' [`Commit`]s completed, strictly in the order they were written, each only
//! once its own sync has returned. While one batch's `fdatasync` is in flight the other thread
//! writes and syncs the next, so an append that arrives just after a sync started waits for its
//! own sync, not for that one to finish first. At most [`MAX_UNSYNCED_BYTES`] are ever written
//! and not yet synced (the bound recovery's torn-tail rule relies on). After a failed write or
//! sync it fails that batch, every batch written after it and everything queued, and stops:
//! the store accepts no append until it is reopened.
//!
//! Each thread syncs through its own handle of the segment, opened when the segment was (before
//! anything was written into it): the kernel reports a writeback error once per open file, so a
//! shared handle could hand the error of one batch's pages to the other thread's `fdatasync` and
//! let the batch whose pages were lost look durable.

use std::collections::VecDeque;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use attestplane_verifier::entry::EntryHash;
use attestplane_verifier::merkle;

use super::segment::{encode_record, segment_name};
use super::{
    MAX_APPEND_BYTES, MAX_APPEND_ENTRIES, MAX_BATCH_BYTES, MAX_ENTRY_LEN, MAX_SEGMENT_FILE_BYTES,
    MAX_UNSYNCED_BYTES, RECORD_HEADER_LEN, SegmentMeta, Shared, StoreError, lock, sync_dir, write,
};

/// Writer threads, hence batches whose `fdatasync` may be in flight at once.
const SYNCERS: usize = 2;

/// Completes with the last seq of an append once it is durable; see
/// [`Store::submit`](super::Store::submit).
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

pub(super) struct Queue {
    pub(super) pending: VecDeque<Pending>,
    /// The seq the next submit must start with.
    pub(super) next_seq: u64,
    /// The first write or sync failure; no appends after it.
    pub(super) failed: Option<StoreError>,
    pub(super) closing: bool,
    /// Bytes written by batches whose sync has not completed (at most [`MAX_UNSYNCED_BYTES`]).
    unsynced: u64,
}

impl Queue {
    pub(super) fn new(next_seq: u64) -> Queue {
        Queue {
            pending: VecDeque::new(),
            next_seq,
            failed: None,
            closing: false,
            unsynced: 0,
        }
    }
}

/// A checked append waiting for the writer.
pub(super) struct Pending {
    first_seq: u64,
    pub(super) end_seq: u64,
    entries: Vec<Vec<u8>>,
    hashes: Vec<EntryHash>,
    /// Encoded size (headers included).
    bytes: usize,
    done: Completer,
}

impl Pending {
    /// Checks an append's bounds and hashes its entries (on the caller's thread, off the
    /// writer's).
    pub(super) fn check(first_seq: u64, entries: Vec<Vec<u8>>) -> Result<Pending, StoreError> {
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

    pub(super) fn with_commit(mut self) -> (Pending, Commit) {
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

/// The segment the writer appends to.
struct OpenSegment {
    file: File,
    /// One handle per writer thread, for its `fdatasync`s (see the module documentation).
    sync: [Arc<File>; SYNCERS],
    path: Arc<Path>,
    /// Bytes written (synced or not).
    len: u64,
}

impl OpenSegment {
    fn new(file: File, path: Arc<Path>, len: u64) -> Result<OpenSegment, StoreError> {
        let open = || {
            File::open(&path)
                .map(Arc::new)
                .map_err(StoreError::io("open segment for sync", &path))
        };
        Ok(OpenSegment {
            file,
            sync: [open()?, open()?],
            path,
            len,
        })
    }
}

/// The writers' state: the segment appended to. Taken by one thread at a time, to take a batch
/// and write it.
pub(super) struct Writer {
    segments_dir: PathBuf,
    segment_bytes: u64,
    current: Option<OpenSegment>,
    buf: Vec<u8>,
    /// The ticket of the next batch written.
    next_ticket: u64,
}

/// A batch written and not yet synced.
struct Written {
    batch: Vec<Pending>,
    /// Its place in the write order: batches are published in ticket order.
    ticket: u64,
    /// The handle its writer thread syncs.
    sync: Arc<File>,
    path: Arc<Path>,
    /// Bytes written.
    bytes: u64,
    /// The segment's length once the batch is in it.
    segment_len: u64,
    /// The segment the batch started, if it did.
    created: Option<SegmentMeta>,
    offsets: Vec<u32>,
    leaves: Vec<merkle::Hash>,
}

/// The publication order: the ticket whose turn it is.
struct Turn {
    next: Mutex<u64>,
    changed: Condvar,
}

impl Writer {
    /// The writer of the store whose last segment is `last`: that segment is reopened for
    /// appending and synced, with the segments directory, so that whatever a crashed
    /// predecessor wrote but never synced is durable before anyone reads it.
    pub(super) fn open(
        segments_dir: PathBuf,
        segment_bytes: u64,
        last: Option<&SegmentMeta>,
    ) -> Result<Writer, StoreError> {
        let current = match last {
            Some(last) => {
                let file = OpenOptions::new()
                    .append(true)
                    .open(&last.path)
                    .map_err(StoreError::io("open segment for append", &last.path))?;
                file.sync_all()
                    .map_err(StoreError::io("fsync segment", &last.path))?;
                Some(OpenSegment::new(file, Arc::clone(&last.path), last.len)?)
            }
            None => None,
        };
        sync_dir(&segments_dir)?;
        Ok(Writer {
            segments_dir,
            segment_bytes,
            current,
            buf: Vec::new(),
            next_ticket: 0,
        })
    }

    /// Runs the writer threads (this one and one more) until the store closes or fails.
    pub(super) fn run(self, shared: &Shared) {
        let writer = Mutex::new(self);
        let turn = Turn {
            next: Mutex::new(0),
            changed: Condvar::new(),
        };
        std::thread::scope(|scope| {
            let (writer, turn) = (&writer, &turn);
            for thread in 1..SYNCERS {
                let spawned = std::thread::Builder::new()
                    .name("attestplane-store-sync".into())
                    .spawn_scoped(scope, move || work(shared, writer, turn, thread));
                if spawned.is_err() {
                    // One thread still commits everything, only without overlapping syncs.
                    eprintln!("attestplane: store: cannot start a second writer thread");
                }
            }
            work(shared, writer, turn, 0);
        });
    }

    /// Writes `batch` (not synced) and hands back what its sync and publication need (all but
    /// the batch itself, which the caller keeps to complete whatever the outcome).
    fn write(&mut self, batch: &[Pending], thread: usize) -> Result<Written, StoreError> {
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
            created = Some(SegmentMeta {
                first_seq,
                path: Arc::clone(&path),
                len: 0,
            });
            self.current = Some(OpenSegment::new(file, path, 0)?);
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
                encode_record(&mut self.buf, len, hash, entry);
                leaves.push(merkle::leaf_hash(hash.as_bytes()));
            }
        }
        segment
            .file
            .write_all(&self.buf)
            .map_err(StoreError::io("write segment", &segment.path))?;
        let bytes = self.buf.len() as u64;
        segment.len = segment.len.saturating_add(bytes);
        if self.buf.capacity() > 2 * MAX_BATCH_BYTES {
            self.buf = Vec::new();
        }
        let ticket = self.next_ticket;
        self.next_ticket = ticket.saturating_add(1);
        let sync = segment
            .sync
            .get(thread)
            .or(segment.sync.first())
            .map(Arc::clone)
            .ok_or(StoreError::Closed)?;
        Ok(Written {
            batch: Vec::new(),
            ticket,
            sync,
            path: Arc::clone(&segment.path),
            bytes,
            segment_len: segment.len,
            created,
            offsets,
            leaves,
        })
    }
}

/// One writer thread: take a batch and write it (one thread at a time, so the file's order is
/// the ticket order), sync it (both threads at once), publish it in ticket order.
fn work(shared: &Shared, writer: &Mutex<Writer>, turn: &Turn, thread: usize) {
    loop {
        let written = {
            let mut w = lock(writer);
            let Some((batch, bytes)) = next_batch(shared) else {
                return;
            };
            match w.write(&batch, thread) {
                Ok(written) => Written { batch, ..written },
                Err(error) => {
                    // Nothing of this batch was given a ticket: fail it and everything queued;
                    // batches written before it still publish.
                    let rest = {
                        let mut queue = lock(&shared.queue);
                        queue.failed = Some(error.clone());
                        queue.unsynced = queue.unsynced.saturating_sub(bytes);
                        std::mem::take(&mut queue.pending)
                    };
                    shared.wake.notify_all();
                    for p in batch {
                        p.done.complete(Err(error.clone()));
                    }
                    fail_queued(rest, &error);
                    return;
                }
            }
        };
        let synced = written
            .sync
            .sync_data()
            .map_err(StoreError::io("fdatasync segment", &written.path));
        if synced.is_ok() {
            shared.syncs.fetch_add(1, Ordering::Relaxed);
        }
        if !publish(shared, turn, written, synced) {
            return;
        }
    }
}

/// Publishes a synced batch once every batch written before it has been: to the index, then to
/// its appends' commits. A batch whose sync failed, or that follows one that failed, is failed
/// instead, with everything queued. Returns whether the writer goes on.
fn publish(shared: &Shared, turn: &Turn, w: Written, synced: Result<(), StoreError>) -> bool {
    let mut next = lock(&turn.next);
    while *next != w.ticket {
        next = turn
            .changed
            .wait(next)
            .unwrap_or_else(PoisonError::into_inner);
    }
    let failed = {
        let mut queue = lock(&shared.queue);
        queue.unsynced = queue.unsynced.saturating_sub(w.bytes);
        match (&synced, &queue.failed) {
            (Err(error), None) => {
                queue.failed = Some(error.clone());
                Some((error.clone(), std::mem::take(&mut queue.pending)))
            }
            (_, Some(cause)) => Some((cause.clone(), VecDeque::new())),
            (Ok(()), None) => None,
        }
    };
    shared.wake.notify_all();
    let going_on = match failed {
        None => {
            let entries: usize = w.batch.iter().map(|p| p.entries.len()).sum();
            let head = w.batch.last().and_then(|p| p.hashes.last()).copied();
            let created = w.created.is_some();
            {
                let mut index = write(&shared.index);
                if let Some(meta) = w.created {
                    index.segments.push(meta);
                }
                if let Some(meta) = index.segments.last_mut() {
                    meta.len = w.segment_len;
                }
                index.offsets.extend_from_slice(&w.offsets);
                for leaf in w.leaves {
                    index.leaves.push(leaf);
                }
                if head.is_some() {
                    index.head = head;
                }
            }
            if created {
                shared.segments_created.fetch_add(1, Ordering::Relaxed);
            }
            shared
                .appends
                .fetch_add(w.batch.len() as u64, Ordering::Relaxed);
            shared.entries.fetch_add(entries as u64, Ordering::Relaxed);
            for p in w.batch {
                let last = p.end_seq.saturating_sub(1);
                p.done.complete(Ok(last));
            }
            true
        }
        Some((error, rest)) => {
            // This batch's own failure is reported as is; a batch after a failure, and every
            // append still queued, as failed because of it.
            let own = synced.is_err();
            for p in w.batch {
                p.done.complete(Err(if own {
                    error.clone()
                } else {
                    StoreError::Failed {
                        cause: Box::new(error.clone()),
                    }
                }));
            }
            fail_queued(rest, &error);
            false
        }
    };
    *next = next.saturating_add(1);
    turn.changed.notify_all();
    going_on
}

/// Fails appends that were queued when the writer failed.
fn fail_queued(rest: VecDeque<Pending>, error: &StoreError) {
    for p in rest {
        p.done.complete(Err(StoreError::Failed {
            cause: Box::new(error.clone()),
        }));
    }
}

/// Waits for queued appends and takes a batch of them, with its size in bytes; `None` once
/// closing and drained, or after a failure. A batch holds at most [`MAX_BATCH_BYTES`] (or one
/// larger append), and never takes the bytes written but not synced past
/// [`MAX_UNSYNCED_BYTES`]: while another batch is syncing, an append that would is left for
/// after it.
fn next_batch(shared: &Shared) -> Option<(Vec<Pending>, u64)> {
    let mut queue = lock(&shared.queue);
    loop {
        if queue.failed.is_some() {
            return None;
        }
        match queue.pending.front() {
            Some(front) if fits(queue.unsynced, 0, front.bytes) => break,
            Some(_) => {}
            None if queue.closing => return None,
            None => {}
        }
        queue = shared
            .wake
            .wait(queue)
            .unwrap_or_else(PoisonError::into_inner);
    }
    let unsynced = queue.unsynced;
    let mut batch = Vec::new();
    let mut bytes = 0usize;
    while let Some(front) = queue.pending.front() {
        if !batch.is_empty() && bytes.saturating_add(front.bytes) > MAX_BATCH_BYTES {
            break;
        }
        if !fits(unsynced, bytes, front.bytes) {
            break;
        }
        bytes = bytes.saturating_add(front.bytes);
        if let Some(p) = queue.pending.pop_front() {
            batch.push(p);
        }
    }
    let bytes = bytes as u64;
    queue.unsynced = queue.unsynced.saturating_add(bytes);
    Some((batch, bytes))
}

/// Whether `more` bytes can be written after `taken` of this batch while `unsynced` bytes of
/// other batches await their sync. With nothing else unsynced, any one append fits (it is at
/// most [`MAX_UNSYNCED_BYTES`] by the append bounds).
fn fits(unsynced: u64, taken: usize, more: usize) -> bool {
    let after = unsynced
        .saturating_add(taken as u64)
        .saturating_add(more as u64);
    (unsynced == 0 && taken == 0) || after <= MAX_UNSYNCED_BYTES
}

#[cfg(test)]
mod tests {
    use super::super::{MIN_SEGMENT_BYTES, Store, StoreOptions};
    use super::*;

    fn entry(seq: u64) -> Vec<u8> {
        let mut e = format!("entry {seq} ").into_bytes();
        e.resize(64, b'.');
        e
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

    /// Two batches may sync at once, but recovery cuts a bad tail only if it is no longer than
    /// one maximal append ([`MAX_UNSYNCED_BYTES`]): the second batch must never take the bytes
    /// written and not yet synced past that, or a crash could leave a tail recovery calls
    /// corruption.
    #[test]
    fn a_batch_beside_one_still_syncing_never_takes_unsynced_bytes_past_the_recovery_bound() {
        let dir = tempfile::tempdir().unwrap();
        let shared = Shared {
            dir: dir.path().to_path_buf(),
            queue: Mutex::new(Queue::new(0)),
            wake: Condvar::new(),
            index: std::sync::RwLock::new(super::super::Index::default()),
            checkpoint: Mutex::new(()),
            appends: Default::default(),
            entries: Default::default(),
            syncs: Default::default(),
            segments_created: Default::default(),
            _lock: File::create(dir.path().join("lock")).unwrap(),
        };
        let big = vec![7u8; MAX_ENTRY_LEN];
        let per_append = (MAX_ENTRY_LEN + RECORD_HEADER_LEN) as u64;
        let mut commits = Vec::new();
        {
            let mut queue = lock(&shared.queue);
            for seq in 0..3 {
                let (p, c) = Pending::check(seq, vec![big.clone()])
                    .unwrap()
                    .with_commit();
                queue.pending.push_back(p);
                commits.push(c);
            }
            // Another batch is syncing; room is left beside it for one of these appends only.
            queue.unsynced = MAX_UNSYNCED_BYTES - per_append - 1;
        }
        let (batch, bytes) = next_batch(&shared).unwrap();
        assert_eq!(batch.len(), 1);
        assert_eq!(bytes, per_append);
        let queue = lock(&shared.queue);
        assert_eq!(queue.unsynced, MAX_UNSYNCED_BYTES - 1);
        assert_eq!(queue.pending.len(), 2);
        // The next append waits for a sync to complete; alone, any append goes.
        assert!(!fits(queue.unsynced, 0, per_append as usize));
        assert!(fits(0, 0, MAX_UNSYNCED_BYTES as usize));
        assert!(!fits(1, 0, MAX_UNSYNCED_BYTES as usize));
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
        let options = StoreOptions {
            segment_bytes: MIN_SEGMENT_BYTES,
        };
        let store = Store::open_with(dir.path(), options).unwrap();
        // One entry fills the first segment, so the next batch starts segment 1: a file of that
        // name already there makes creating it fail, a real I/O failure of the writer.
        let full = vec![7u8; MIN_SEGMENT_BYTES as usize];
        store.append_blocking(0, vec![full]).unwrap();
        let squatter = dir
            .path()
            .join(super::super::segment::SEGMENTS_DIR)
            .join(segment_name(1));
        File::create(&squatter).unwrap();
        let err = store.append_blocking(1, vec![entry(1)]).unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::Io {
                    op: "create segment",
                    ..
                }
            ),
            "{err}"
        );
        let err = store.append_blocking(2, vec![entry(2)]).unwrap_err();
        assert!(matches!(err, StoreError::Failed { .. }), "{err}");
        assert_eq!(store.len(), 1);
        drop(store);
        // Reopened, the store takes the (empty, densely named) segment as its last one.
        let store = Store::open_with(dir.path(), options).unwrap();
        assert_eq!(store.len(), 1);
        assert_eq!(store.append_blocking(1, vec![entry(1)]).unwrap(), 1);
        assert_eq!(store.get(1).unwrap(), entry(1));
    }
}
