//! The log writer: turns events into signed entries, in order, under the epoch key.
//!
//! One writer exists per epoch. [`LogWriter::open`] starts an epoch after a given head: it asks
//! the NSM for an attestation document whose `public_key` is the new epoch key and whose
//! `user_data` is the [`EpochBinding`] of the entry it writes, and makes that document the
//! `epoch_start` entry. [`LogWriter::append`] signs each further event as the next entry.
//! Entry times never go backwards: a clock that steps back is clamped to the last entry's time.
//!
//! The writer keeps an O(log n) Merkle frontier so it can sign checkpoints without holding the
//! log. It does not decide what is durable: the service releases replies and signs checkpoints
//! only over entries the host has reported durable.

use attestplane_verifier::UnixMillis;
use attestplane_verifier::checkpoint::{Checkpoint, sign_checkpoint};
use attestplane_verifier::entry::{
    Entry, EntryError, EntryHash, EpochBinding, Event, KeyId, MAX_ENTRY_LEN,
};
use attestplane_verifier::merkle::{self, CompactRange};
use ed25519_dalek::VerifyingKey;
use thiserror::Error;

use crate::epoch::EpochKey;
use crate::nsm::{Nsm, NsmError};

/// Where a log stands: what a new epoch continues from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    /// Number of entries (the next sequence number).
    pub size: u64,
    /// Hash of the last entry ([`EntryHash::ZERO`] when empty).
    pub hash: EntryHash,
    /// The last epoch's number, if any.
    pub epoch: Option<u64>,
    /// Time of the last entry.
    pub time: UnixMillis,
    /// Merkle frontier over all entries.
    pub frontier: CompactRange,
}

impl Head {
    /// The head of the empty log: genesis follows.
    pub fn empty() -> Self {
        Self {
            size: 0,
            hash: EntryHash::ZERO,
            epoch: None,
            time: UnixMillis::from_millis(0),
            frontier: CompactRange::new(),
        }
    }
}

/// One entry as written.
#[derive(Clone, Debug)]
pub struct Written {
    /// Its sequence number.
    pub seq: u64,
    /// Its encoded bytes, to persist.
    pub bytes: Vec<u8>,
    /// Its hash.
    pub hash: EntryHash,
    /// What it says: the entry exactly as encoded into `bytes`, so the writer's caller can
    /// apply what it has just signed without decoding it back.
    pub entry: Entry,
}

/// Why an entry could not be written.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum WriterError {
    /// The NSM refused randomness or an attestation document.
    #[error("nsm: {0}")]
    Nsm(#[from] NsmError),
    /// The entry could not be encoded or signed.
    #[error("entry: {0}")]
    Entry(#[from] EntryError),
    /// The checkpoint could not be made.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// Sequence numbers or the Merkle tree are exhausted.
    #[error("the log is full")]
    Full,
}

/// Writes the entries of one epoch.
#[derive(Debug)]
pub struct LogWriter {
    key: EpochKey,
    epoch: u64,
    head: Head,
    origin: String,
}

impl LogWriter {
    /// Opens a new epoch after `head` with a key drawn from `nsm`, at time `now`. Returns the
    /// writer and the `epoch_start` entry, which must be persisted like any other.
    pub fn open(
        nsm: &dyn Nsm,
        head: Head,
        origin: &str,
        now: UnixMillis,
    ) -> Result<(Self, Written), WriterError> {
        let key = EpochKey::generate(nsm)?;
        let epoch = match head.epoch {
            None => 0,
            Some(e) => e.checked_add(1).ok_or(WriterError::Full)?,
        };
        let binding = EpochBinding {
            epoch,
            seq: head.size,
            prev: head.hash,
        };
        let document = nsm.attest(
            Some(binding.encode()?),
            None,
            Some(key.verifying_key().as_bytes().to_vec()),
        )?;
        let mut writer = Self {
            key,
            epoch,
            head,
            origin: origin.to_string(),
        };
        let written = writer.append(
            Event::EpochStart {
                attestation: document,
            },
            now,
        )?;
        Ok((writer, written))
    }

    /// Signs `event` as the next entry. An entry longer than [`MAX_ENTRY_LEN`] (which the
    /// host's store and every verifier refuse) is refused here, before it is chained: the head
    /// does not move, so nothing is half-written and the next entry links to the last one.
    pub fn append(&mut self, event: Event, now: UnixMillis) -> Result<Written, WriterError> {
        let time = now.max(self.head.time);
        let seq = self.head.size;
        let entry = Entry {
            seq,
            prev: self.head.hash,
            epoch: self.epoch,
            time,
            event,
        };
        let bytes = entry.sign(&self.key.kid(), &self.key)?;
        if bytes.len() > MAX_ENTRY_LEN {
            return Err(WriterError::Entry(EntryError::TooLong {
                len: bytes.len(),
                max: MAX_ENTRY_LEN,
            }));
        }
        let hash = EntryHash::of(&bytes);
        self.head
            .frontier
            .push(merkle::leaf_hash(hash.as_bytes()))
            .map_err(|_| WriterError::Full)?;
        self.head.size = seq.checked_add(1).ok_or(WriterError::Full)?;
        self.head.hash = hash;
        self.head.time = time;
        self.head.epoch = Some(self.epoch);
        Ok(Written {
            seq,
            bytes,
            hash,
            entry,
        })
    }

    /// A signed checkpoint note over every entry written so far, under the key name equal to
    /// the log's origin.
    pub fn checkpoint(&self) -> Result<String, WriterError> {
        let cp = Checkpoint::new(
            self.origin.clone(),
            self.head.size,
            self.head.frontier.root(),
        )
        .map_err(|e| WriterError::Checkpoint(e.to_string()))?;
        sign_checkpoint(&cp, &self.origin, &self.key)
            .map_err(|e| WriterError::Checkpoint(e.to_string()))
    }

    /// Where the log stands.
    pub fn head(&self) -> &Head {
        &self.head
    }

    /// The epoch number.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The epoch key's public half.
    pub fn verifying_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// The epoch key's id.
    pub fn kid(&self) -> KeyId {
        self.key.kid()
    }

    /// The epoch key, for signing handles.
    pub(crate) fn key(&self) -> &EpochKey {
        &self.key
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nsm::{Clock, MockNsm};

    fn admin(len: usize) -> Event {
        Event::Admin {
            request: vec![0xa5; len],
            accepted: false,
            reason: None,
        }
    }

    #[test]
    fn the_largest_drift_a_listing_can_produce_fits_one_entry() {
        use attestplane_verifier::entry::DriftRecord;
        use attestplane_verifier::gateway::pin::{MAX_LISTED_TOOLS, MAX_TOOL_NAME_LEN};
        // Every listed tool yields at most one drift record, whose name is at most
        // MAX_TOOL_NAME_LEN bytes (a longer one is `invalid` by position): the worst record is
        // a `changed` one with both digests. MAX_LISTED_TOOLS of them, for a server id of the
        // longest an endpoint accepts, must be loggable, or a hostile listing could make its
        // endpoint's drift unloggable.
        let t = UnixMillis::from_millis(1_000);
        let nsm = MockNsm::builder([7; 32], Clock::Fixed(t)).build();
        let (mut w, _) = LogWriter::open(&nsm, Head::empty(), "test", t).unwrap();
        let record = |i: usize| DriftRecord {
            kind: "changed".into(),
            name: format!("{i:05}{}", "é".repeat((MAX_TOOL_NAME_LEN - 5) / 2)),
            pinned: Some([0xff; 32]),
            found: Some([0xee; 32]),
        };
        // The check refuses a listing with more records than an entry may hold.
        assert_eq!(
            MAX_LISTED_TOOLS,
            attestplane_verifier::entry::MAX_DRIFT_RECORDS
        );
        let drift: Vec<DriftRecord> = (0..MAX_LISTED_TOOLS).map(record).collect();
        assert!(drift.iter().all(|d| d.name.len() <= MAX_TOOL_NAME_LEN));
        let written = w
            .append(
                Event::ToolDrift {
                    server: "s".repeat(256),
                    drift,
                },
                t,
            )
            .expect("the worst drift entry fits");
        assert!(written.bytes.len() <= MAX_ENTRY_LEN);
    }

    #[test]
    fn an_entry_over_the_limit_is_refused_before_it_is_chained() {
        let t = UnixMillis::from_millis(1_000);
        let nsm = MockNsm::builder([7; 32], Clock::Fixed(t)).build();
        let (mut w, start) = LogWriter::open(&nsm, Head::empty(), "test", t).unwrap();
        let before = w.head().clone();
        // The store and every verifier refuse an entry over MAX_ENTRY_LEN: the old writer
        // chained it anyway, so the host could never store it and every later entry linked
        // to an entry the log would never hold.
        match w.append(admin(MAX_ENTRY_LEN), t) {
            Err(WriterError::Entry(EntryError::TooLong { len, max })) => {
                assert!(len > max && max == MAX_ENTRY_LEN, "{len} {max}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(w.head(), &before, "the head did not move");
        // The next entry links to the last one written.
        let next = w.append(admin(16), t).unwrap();
        assert_eq!(next.seq, start.seq + 1);
        assert_eq!(next.entry.prev, start.hash);
        // An entry just under the limit is still written.
        let big = w.append(admin(MAX_ENTRY_LEN - 1024), t).unwrap();
        assert!(big.bytes.len() <= MAX_ENTRY_LEN);
        assert_eq!(big.seq, next.seq + 1);
    }
}
