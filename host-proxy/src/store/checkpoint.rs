//! The latest checkpoint note: one file, replaced atomically (temp file, fsync, rename, fsync
//! of the directory), never moved backwards. The note is the enclave's signed bytes; the store
//! reads only the size its body claims, to refuse a note ahead of the durable log or behind
//! the stored one.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::Path;

use attestplane_verifier::checkpoint::MAX_NOTE_LEN;
use attestplane_verifier::log::claimed_size;

use super::{Store, StoreError, lock, sync_dir};

const CHECKPOINT_FILE: &str = "checkpoint";
const CHECKPOINT_TMP: &str = "checkpoint.tmp";

impl Store {
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
}

/// Removes a temp file a crash left behind mid-replacement (the stored note is intact).
pub(super) fn remove_stale_temp(dir: &Path) -> Result<(), StoreError> {
    let tmp = dir.join(CHECKPOINT_TMP);
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(StoreError::io("remove stale checkpoint temp", &tmp)(e))
        }
        _ => Ok(()),
    }
}
