//! The group-commit writer: one thread takes every queued append, writes them with one
//! `write`, syncs once, publishes them to the index, and only then completes each append's
//! [`Commit`]. After a failed write or sync it fails everything queued and stops: the store
//! accepts no append until it is reopened.
//!
//! A lone append on an idle store may instead be committed by its submitter on its own thread
//! ([`InlineCommit`]): the same write, sync and publication, without the two thread hand-offs.
//! One committer at a time holds [`Queue::busy`]; the writer thread takes no batch while an
//! inline commit runs, and the inline committer wakes it afterwards if appends queued up
//! meanwhile, so the disk order stays the submission order.

use std::collections::VecDeque;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use attestplane_verifier::entry::EntryHash;
use attestplane_verifier::merkle;

use super::segment::{encode_record, segment_name};
use super::{
    Durability, MAX_APPEND_BYTES, MAX_APPEND_ENTRIES, MAX_BATCH_BYTES, MAX_ENTRY_LEN,
    MAX_SEGMENT_FILE_BYTES, RECORD_HEADER_LEN, SegmentMeta, Shared, StoreError, lock, sync_dir,
    write,
};

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
            state.waiting = true;
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
    /// A commit is being written and synced (by the writer thread or an [`InlineCommit`]);
    /// nobody else takes a batch meanwhile.
    pub(super) busy: bool,
    /// Appends in the last group commit (1 when the store sees one writer at a time).
    pub(super) last_batch_appends: usize,
}

impl Queue {
    pub(super) fn new(next_seq: u64) -> Queue {
        Queue {
            pending: VecDeque::new(),
            next_seq,
            failed: None,
            closing: false,
            busy: false,
            last_batch_appends: 0,
        }
    }
}

/// What [`Store::submit_or_reserve`](super::Store::submit_or_reserve) did with an append.
#[must_use = "an append is durable only once its commit completes or runs"]
#[derive(Debug)]
pub enum Submitted {
    /// Queued for the writer thread, like [`Store::submit`](super::Store::submit).
    Queued(Commit),
    /// Reserved for the caller to write and sync on its own thread.
    Inline(InlineCommit),
}

/// An append reserved for its submitter to commit on its own thread; see
/// [`Store::submit_or_reserve`](super::Store::submit_or_reserve). While it exists the writer
/// thread takes no batch, so run it promptly: dropped without running, it is handed to the
/// writer thread (and nobody learns when it is durable).
#[must_use = "the store writes nothing else until an inline commit runs or is dropped"]
pub struct InlineCommit {
    shared: Arc<Shared>,
    pending: Option<Pending>,
}

impl fmt::Debug for InlineCommit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InlineCommit").finish_non_exhaustive()
    }
}

impl InlineCommit {
    pub(super) fn new(shared: Arc<Shared>, pending: Pending) -> InlineCommit {
        InlineCommit {
            shared,
            pending: Some(pending),
        }
    }

    /// Writes and syncs the append on this thread (blocking it for one `fdatasync`), publishes
    /// it, and returns its last seq once it is durable. A failure fails the store as a failure
    /// of the writer thread does.
    pub fn run(mut self) -> Result<u64, StoreError> {
        let Some(pending) = self.pending.take() else {
            return Err(StoreError::Closed);
        };
        let last = pending.end_seq.saturating_sub(1);
        let batch = vec![pending];
        self.shared.inline_commits.fetch_add(1, Ordering::Relaxed);
        commit(&self.shared, batch, Committer::Inline).map(|()| last)
    }
}

impl Drop for InlineCommit {
    fn drop(&mut self) {
        if let Some(pending) = self.pending.take() {
            let mut queue = lock(&self.shared.queue);
            queue.pending.push_front(pending);
            queue.busy = false;
            drop(queue);
            self.shared.wake.notify_one();
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
    /// A thread waits in [`Commit::wait`] (the condition variable is signalled only then: a
    /// signal costs a system call even with nobody waiting).
    waiting: bool,
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
    let (waker, waiting) = {
        let mut state = lock(&slot.state);
        state.result = Some(result);
        (state.waker.take(), state.waiting)
    };
    if waiting {
        slot.ready.notify_all();
    }
    if let Some(waker) = waker {
        waker.wake();
    }
}

/// Bytes a segment file is extended by ahead of its records (see [`Writer::write`]).
pub(super) const PREALLOC_BYTES: u64 = 1024 * 1024;

/// The segment the writer appends to.
struct OpenSegment {
    file: File,
    path: Arc<Path>,
    /// Where the records end: the next record's offset.
    len: u64,
    /// The file's size: `len` plus zeros not yet written over.
    size: u64,
    /// A write or sync failed: what lies past `len` is unknown, so it is never cut on close.
    failed: bool,
}

impl OpenSegment {
    /// Cuts the file back to its records (the zeros ahead of them) and syncs it.
    fn trim(&mut self) -> Result<(), StoreError> {
        if self.size == self.len || self.failed {
            return Ok(());
        }
        self.file
            .set_len(self.len)
            .map_err(StoreError::io("truncate segment", &self.path))?;
        self.file
            .sync_all()
            .map_err(StoreError::io("fsync segment", &self.path))?;
        self.size = self.len;
        Ok(())
    }
}

impl Drop for OpenSegment {
    /// A store closed cleanly leaves its last segment ending at its last record. If this
    /// fails, or the process dies first, the next open cuts the zeros instead.
    fn drop(&mut self) {
        let _ = self.trim();
    }
}

/// The writer thread's state.
pub(super) struct Writer {
    segments_dir: PathBuf,
    segment_bytes: u64,
    current: Option<OpenSegment>,
    buf: Vec<u8>,
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
                    .write(true)
                    .open(&last.path)
                    .map_err(StoreError::io("open segment for append", &last.path))?;
                file.sync_all()
                    .map_err(StoreError::io("fsync segment", &last.path))?;
                // The scan at open cut everything past the last record.
                Some(OpenSegment {
                    file,
                    path: Arc::clone(&last.path),
                    len: last.len,
                    size: last.len,
                    failed: false,
                })
            }
            None => None,
        };
        sync_dir(&segments_dir)?;
        Ok(Writer {
            segments_dir,
            segment_bytes,
            current,
            buf: Vec::new(),
        })
    }

    /// Writes one batch, syncs it once, then publishes it to the index.
    ///
    /// Records are written over zeros the file already holds: the file is extended ahead of
    /// them, [`PREALLOC_BYTES`] at a time, so that most `fdatasync`s need not also record a new
    /// file size (measured on the ext4 of the development machine: 0.15 ms per `fdatasync` of
    /// a 600-byte record against 0.22 ms when appending). The scan at open reads a tail of
    /// zeros after the last record as this unused room and cuts it, and a segment is cut back
    /// to its records before the next one is started and when the store closes.
    fn write(&mut self, shared: &Shared, batch: &[Pending]) -> Result<(), StoreError> {
        let first_seq = batch.first().map_or(0, |p| p.first_seq);
        let mut created = None;
        let roll = self
            .current
            .as_ref()
            .is_none_or(|s| s.len >= self.segment_bytes);
        if roll {
            // The full segment ends at its last record before the next one exists: only the
            // last segment may hold unused room.
            if let Some(full) = self.current.as_mut() {
                full.trim()?;
            }
            let path: Arc<Path> = self.segments_dir.join(segment_name(first_seq)).into();
            let file = OpenOptions::new()
                .write(true)
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
            self.current = Some(OpenSegment {
                file,
                path,
                len: 0,
                size: 0,
                failed: false,
            });
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
        let end = segment.len.saturating_add(self.buf.len() as u64);
        if end > segment.size {
            // Room for this batch and, within the segment's size, the next few.
            let size = end.max(
                segment
                    .len
                    .saturating_add(PREALLOC_BYTES)
                    .min(self.segment_bytes),
            );
            segment.failed = true;
            segment
                .file
                .set_len(size)
                .map_err(StoreError::io("extend segment", &segment.path))?;
            segment.size = size;
            segment.failed = false;
        }
        // Until the sync returns, what lies past `len` is unknown.
        segment.failed = true;
        segment
            .file
            .write_all_at(&self.buf, segment.len)
            .map_err(StoreError::io("write segment", &segment.path))?;
        segment
            .file
            .sync_data()
            .map_err(StoreError::io("fdatasync segment", &segment.path))?;
        segment.failed = false;
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

/// The writer thread: takes batches and commits them until the store closes or fails.
pub(super) fn run(shared: &Shared) {
    while let Some(batch) = next_batch(shared) {
        if commit(shared, batch, Committer::Thread).is_err() {
            return;
        }
    }
}

/// Who runs a commit.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Committer {
    /// The writer thread (which looks at the queue again by itself afterwards).
    Thread,
    /// An [`InlineCommit`] on its submitter's thread.
    Inline,
}

/// Writes, syncs and publishes `batch` (the caller holds [`Queue::busy`]), completes its
/// appends, and releases `busy`; an inline committer then wakes the writer thread if appends
/// queued up meanwhile (or the store is closing). After a failure every queued append fails
/// too and the store takes no more.
fn commit(shared: &Shared, batch: Vec<Pending>, by: Committer) -> Result<(), StoreError> {
    let started = std::time::Instant::now();
    let written = lock(&shared.writer).write(shared, &batch);
    let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    shared.commit_micros.fetch_add(micros, Ordering::Relaxed);
    let appends = batch.len();
    match written {
        Ok(()) => {
            let entries: usize = batch.iter().map(|p| p.entries.len()).sum();
            shared.appends.fetch_add(appends as u64, Ordering::Relaxed);
            shared.entries.fetch_add(entries as u64, Ordering::Relaxed);
            // The store is free again before the waiters learn of it: an append one of them
            // submits next finds it idle.
            let wake = {
                let mut queue = lock(&shared.queue);
                queue.busy = false;
                queue.last_batch_appends = appends;
                by == Committer::Inline && (!queue.pending.is_empty() || queue.closing)
            };
            if wake {
                shared.wake.notify_one();
            }
            // Bytes held for these entries (the MCP relays) may go now.
            if let Some(end) = batch.last().map(|p| p.end_seq) {
                shared.durable.send_if_modified(|d| match d {
                    Durability::Entries(n) if *n < end => {
                        *d = Durability::Entries(end);
                        true
                    }
                    _ => false,
                });
            }
            for p in batch {
                let last = p.end_seq.saturating_sub(1);
                p.done.complete(Ok(last));
            }
            Ok(())
        }
        Err(error) => {
            let rest = {
                let mut queue = lock(&shared.queue);
                queue.failed = Some(error.clone());
                queue.busy = false;
                std::mem::take(&mut queue.pending)
            };
            shared.durable.send_replace(Durability::Failed);
            // Wakes the writer thread if it waits (it stops: nothing is queued any more).
            shared.wake.notify_all();
            for p in batch {
                p.done.complete(Err(error.clone()));
            }
            for p in rest {
                p.done.complete(Err(StoreError::Failed {
                    cause: Box::new(error.clone()),
                }));
            }
            Err(error)
        }
    }
}

/// Waits for queued appends while no other commit runs, and takes a batch of them (setting
/// [`Queue::busy`]); `None` once closing and drained, or after a failure.
fn next_batch(shared: &Shared) -> Option<Vec<Pending>> {
    let mut queue = lock(&shared.queue);
    while queue.pending.is_empty() || queue.busy {
        // Closing: an inline commit still reserved writes itself (or, dropped, is never
        // acknowledged); waiting for it could deadlock a thread that drops the store holding one.
        if queue.failed.is_some() || (queue.closing && queue.pending.is_empty()) {
            return None;
        }
        queue = shared
            .wake
            .wait(queue)
            .unwrap_or_else(PoisonError::into_inner);
    }
    queue.busy = true;
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

    fn reserve(store: &Store, seq: u64) -> InlineCommit {
        match store.submit_or_reserve(seq, vec![entry(seq)]).unwrap() {
            Submitted::Inline(c) => c,
            Submitted::Queued(_) => panic!("append {seq} was queued, not reserved"),
        }
    }

    #[test]
    fn a_lone_append_on_an_idle_store_is_committed_by_its_submitter() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for seq in 0..3u64 {
            let inline = reserve(&store, seq);
            assert_eq!(
                store.len(),
                seq,
                "nothing is durable before the commit runs"
            );
            assert_eq!(inline.run().unwrap(), seq);
            assert_eq!(store.len(), seq + 1);
            assert_eq!(store.get(seq).unwrap(), entry(seq));
        }
        let stats = store.stats();
        assert_eq!(
            (stats.inline_commits, stats.syncs, stats.appends),
            (3, 3, 3)
        );
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.len(), 3, "inline commits are on disk");
    }

    #[test]
    fn appends_submitted_behind_an_inline_commit_are_written_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let inline = reserve(&store, 0);
        // While the reservation holds the store, the next appends queue for the writer thread,
        // which must not write them first (seq 1 before seq 0 would be a gap on disk).
        let queued: Vec<Commit> = (1..4u64)
            .map(
                |seq| match store.submit_or_reserve(seq, vec![entry(seq)]).unwrap() {
                    Submitted::Queued(c) => c,
                    Submitted::Inline(_) => panic!("a second reservation while one is held"),
                },
            )
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert_eq!(
            store.len(),
            0,
            "the writer thread waited for the reservation"
        );
        assert_eq!(inline.run().unwrap(), 0);
        for (seq, c) in (1u64..).zip(queued) {
            assert_eq!(c.wait().unwrap(), seq);
        }
        assert_eq!(
            store.range(0, 4).unwrap(),
            (0..4).map(entry).collect::<Vec<_>>()
        );
        // The three queued appends were one group commit of three: the next lone append
        // goes to the writer thread too (concurrency was seen), the one after that inline.
        match store.submit_or_reserve(4, vec![entry(4)]).unwrap() {
            Submitted::Queued(c) => assert_eq!(c.wait().unwrap(), 4),
            Submitted::Inline(_) => panic!("reserved right after a group commit of three"),
        }
        assert_eq!(reserve(&store, 5).run().unwrap(), 5);
        assert_eq!(store.stats().inline_commits, 2);
    }

    #[test]
    fn a_dropped_inline_commit_is_written_by_the_writer_thread() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        drop(reserve(&store, 0));
        assert_eq!(store.append_blocking(1, vec![entry(1)]).unwrap(), 1);
        assert_eq!(store.get(0).unwrap(), entry(0));
        assert_eq!(store.stats().inline_commits, 0);
    }

    #[test]
    fn dropping_the_store_with_an_inline_commit_reserved_does_not_hang() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let inline = reserve(&store, 0);
        drop(store);
        // The reservation still commits by itself (the writer thread has stopped).
        assert_eq!(inline.run().unwrap(), 0);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn the_durable_watch_follows_commits_and_a_failure_ends_every_wait() {
        let dir = tempfile::tempdir().unwrap();
        let options = StoreOptions {
            segment_bytes: MIN_SEGMENT_BYTES,
        };
        let store = Store::open_with(dir.path(), options).unwrap();
        let mut watch = store.durable_watch();
        assert_eq!(watch.now(), Durability::Entries(0));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        // Nothing durable yet: a wait for one entry is still waiting.
        let early = rt.block_on(async {
            tokio::time::timeout(std::time::Duration::from_millis(50), watch.reached(1)).await
        });
        assert!(early.is_err(), "reached before the commit");
        let full = vec![7u8; MIN_SEGMENT_BYTES as usize];
        store.append_blocking(0, vec![full]).unwrap();
        assert_eq!(watch.now(), Durability::Entries(1));
        rt.block_on(watch.reached(1)).unwrap();
        rt.block_on(watch.reached(0)).unwrap();
        // The next commit fails (its segment cannot be created): a wait for it ends in error,
        // never in "durable".
        File::create(
            dir.path()
                .join(super::super::segment::SEGMENTS_DIR)
                .join(segment_name(1)),
        )
        .unwrap();
        let mut waiting = store.durable_watch();
        let wait = rt.spawn(async move { waiting.reached(2).await });
        assert!(store.append_blocking(1, vec![entry(1)]).is_err());
        assert_eq!(rt.block_on(wait).unwrap(), Err(super::super::NeverDurable));
        assert_eq!(watch.now(), Durability::Failed);
        assert_eq!(
            rt.block_on(watch.reached(2)),
            Err(super::super::NeverDurable)
        );
    }

    #[test]
    fn an_inline_write_failure_fails_it_and_every_later_append() {
        let dir = tempfile::tempdir().unwrap();
        let options = StoreOptions {
            segment_bytes: MIN_SEGMENT_BYTES,
        };
        let store = Store::open_with(dir.path(), options).unwrap();
        let full = vec![7u8; MIN_SEGMENT_BYTES as usize];
        let Submitted::Inline(first) = store.submit_or_reserve(0, vec![full]).unwrap() else {
            panic!("the first append on an idle store is reserved");
        };
        assert_eq!(first.run().unwrap(), 0);
        // The next commit starts segment 1; a file of that name makes creating it fail.
        File::create(
            dir.path()
                .join(super::super::segment::SEGMENTS_DIR)
                .join(segment_name(1)),
        )
        .unwrap();
        let err = reserve(&store, 1).run().unwrap_err();
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
        assert_eq!(store.len(), 1, "the failed append is not published");
        let err = store.submit_or_reserve(2, vec![entry(2)]).unwrap_err();
        assert!(matches!(err, StoreError::Failed { .. }), "{err}");
        let err = store.append_blocking(2, vec![entry(2)]).unwrap_err();
        assert!(matches!(err, StoreError::Failed { .. }), "{err}");
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
