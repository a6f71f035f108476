//! A bounded cache of verified CA chains (root → … → instance certificate).
//!
//! Role: on real documents four of the five signature verifications cover certificates that are
//! the same from one document to the next (the instance certificate lives about a day, the
//! zonal about five). Remembering that a given `cabundle` verified lets a warm verification do
//! only the leaf link and the COSE signature.
//!
//! Trust: an entry is keyed by the SHA-256 of the exact DER of every CA certificate, so a hit
//! means "these very bytes verified against this verifier's anchor". It is reused only while the
//! verification time lies within every CA's validity window (the intersection is stored), so a
//! cached chain can never vouch at a time the full check would refuse. Per-certificate rules
//! other than time depend on the bytes alone, so they need no re-check.
//!
//! What it does not do: share entries across anchors (each [`super::AttestationVerifier`] owns
//! one), or grow without bound: at most `capacity` entries, least recently used evicted first,
//! entries expired at the time of an insertion dropped.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use sha2::{Digest, Sha256};

use super::chain::VerifiedCaChain;
use crate::time::UnixMillis;

/// Cache key: SHA-256 over each CA certificate's length and DER, root first.
pub(crate) type ChainKey = [u8; 32];

/// Computes the key of a `cabundle`.
pub(crate) fn chain_key(cabundle: &[Vec<u8>]) -> ChainKey {
    let mut h = Sha256::new();
    for der in cabundle {
        h.update((der.len() as u64).to_be_bytes());
        h.update(der);
    }
    h.finalize().into()
}

/// Least-recently-used list of verified chains; front is the oldest.
#[derive(Debug)]
pub(crate) struct ChainCache {
    capacity: usize,
    entries: Mutex<VecDeque<(ChainKey, Arc<VerifiedCaChain>)>>,
}

impl ChainCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            entries: Mutex::new(VecDeque::with_capacity(capacity.min(1024))),
        }
    }

    /// The cached chain for `key` if it is valid at `at` (marking it recently used). An entry
    /// found but not valid at `at` is left alone: another caller may audit at a time it covers.
    pub fn get(&self, key: &ChainKey, at: UnixMillis) -> Option<Arc<VerifiedCaChain>> {
        if self.capacity == 0 {
            return None;
        }
        // The list is consistent after every operation, so a poisoned lock is still usable.
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let pos = entries.iter().position(|(k, _)| k == key)?;
        let entry = entries.remove(pos)?;
        let hit = entry.1.valid_at(at).then(|| Arc::clone(&entry.1));
        entries.push_back(entry);
        hit
    }

    /// Remembers a chain that verified at `at`.
    pub fn insert(&self, key: ChainKey, chain: Arc<VerifiedCaChain>, at: UnixMillis) {
        if self.capacity == 0 {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries.retain(|(k, c)| *k != key && c.not_after >= at);
        while entries.len() >= self.capacity {
            entries.pop_front();
        }
        entries.push_back((key, chain));
    }

    /// Number of entries (for tests).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}
