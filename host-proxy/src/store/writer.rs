//! The group-commit writer: one thread takes every queued append, writes them with one
//! `write`, syncs once, publishes them to the index, and only then completes each append's
//! [`Commit`]. After a failed write or sync it fails everything queued and stops: the store
//! accepts no append until it is reopened.

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
    RECORD_HEADER_LEN, SegmentMeta, Shared, StoreError, lock, sync_dir, write,
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
}

impl Queue {
    pub(super) fn new(next_seq: u64) -> Queue {
        Queue {
            pending: VecDeque::new(),
            next_seq,
            failed: None,
            closing: false,
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
    path: Arc<Path>,
    len: u64,
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
        Ok(Writer {
            segments_dir,
            segment_bytes,
            current,
            buf: Vec::new(),
        })
    }

    pub(super) fn run(mut self, shared: &Shared) {
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
                encode_record(&mut self.buf, len, hash, entry);
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
