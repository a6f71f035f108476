//! Bounded caches of verified certificate paths: the CA part (root → … → instance certificate)
//! and the whole path (the CA part and the leaf).
//!
//! Role: on real documents four of the five signature verifications cover certificates that are
//! the same from one document to the next (the instance certificate lives about a day, the
//! zonal about five), and the fifth, the leaf link, is the same for every document the NSM
//! signs under one leaf (leaves live about three hours). Remembering that a given `cabundle`
//! verified lets a verification with a new leaf do only the leaf link and the COSE signature;
//! remembering that a given `cabundle` *and leaf* verified lets a warm verification do only the
//! COSE signature.
//!
//! Trust: an entry is keyed by the SHA-256 of the exact DER of every certificate it covers
//! (length-prefixed, root first, the leaf last for a whole path, under a domain tag that tells
//! the two kinds apart), so a hit means "these very bytes verified against this verifier's
//! anchor". It is reused only while the verification time lies within every covered
//! certificate's validity window (the intersection is stored), so a cached path can never vouch
//! at a time the full check would refuse. Every other rule of [`super::chain`] depends on the
//! bytes alone, so needs no re-check; the root pin is checked again on every verification
//! anyway.
//!
//! What it does not do: share entries across anchors (each [`super::AttestationVerifier`] owns
//! its caches), or grow without bound: at most `capacity` entries per cache, least recently used
//! evicted first, entries that expired before the time of an insertion dropped.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use sha2::{Digest, Sha256};

use super::chain::{VerifiedCaChain, VerifiedLeaf};
use crate::time::UnixMillis;

/// Cache key: SHA-256 over a domain tag and each certificate's length and DER, root first.
pub(crate) type PathKey = [u8; 32];

/// Domain tag of the key of a CA chain (`cabundle` only).
const CA_CHAIN_TAG: &[u8] = b"attestplane/attestation-cache/ca-chain/v1";
/// Domain tag of the key of a whole path (`cabundle` then the leaf).
const FULL_PATH_TAG: &[u8] = b"attestplane/attestation-cache/full-path/v1";

fn hash_certs(tag: &[u8], certs: &[&[u8]]) -> PathKey {
    let mut h = Sha256::new();
    h.update((tag.len() as u64).to_be_bytes());
    h.update(tag);
    for der in certs {
        h.update((der.len() as u64).to_be_bytes());
        h.update(der);
    }
    h.finalize().into()
}

/// The keys of a `cabundle` alone and of the `cabundle` with `leaf`.
pub(crate) fn path_keys(cabundle: &[Vec<u8>], leaf: &[u8]) -> (PathKey, PathKey) {
    let mut certs: Vec<&[u8]> = cabundle.iter().map(Vec::as_slice).collect();
    let chain = hash_certs(CA_CHAIN_TAG, &certs);
    certs.push(leaf);
    (chain, hash_certs(FULL_PATH_TAG, &certs))
}

/// A cached result that holds only within a validity window.
pub(crate) trait Windowed {
    /// Latest notBefore of the certificates it covers.
    fn not_before(&self) -> UnixMillis;
    /// Earliest notAfter of the certificates it covers.
    fn not_after(&self) -> UnixMillis;
    /// Whether `at` lies within every covered certificate's validity window.
    fn valid_at(&self, at: UnixMillis) -> bool {
        self.not_before() <= at && at <= self.not_after()
    }
}

impl Windowed for VerifiedCaChain {
    fn not_before(&self) -> UnixMillis {
        self.not_before
    }
    fn not_after(&self) -> UnixMillis {
        self.not_after
    }
}

/// A whole verified path: the CA part and the leaf, valid where all five are.
#[derive(Debug)]
pub(crate) struct VerifiedPath {
    pub cas: Arc<VerifiedCaChain>,
    pub leaf: VerifiedLeaf,
    not_before: UnixMillis,
    not_after: UnixMillis,
}

impl VerifiedPath {
    pub fn new(cas: Arc<VerifiedCaChain>, leaf: VerifiedLeaf) -> Self {
        let not_before = cas.not_before.max(leaf.summary.not_before);
        let not_after = cas.not_after.min(leaf.summary.not_after);
        Self {
            cas,
            leaf,
            not_before,
            not_after,
        }
    }
}

impl Windowed for VerifiedPath {
    fn not_before(&self) -> UnixMillis {
        self.not_before
    }
    fn not_after(&self) -> UnixMillis {
        self.not_after
    }
}

/// Least-recently-used list of verified results; front is the oldest.
#[derive(Debug)]
pub(crate) struct BoundedCache<V> {
    capacity: usize,
    entries: Mutex<VecDeque<(PathKey, Arc<V>)>>,
}

impl<V: Windowed> BoundedCache<V> {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            entries: Mutex::new(VecDeque::with_capacity(capacity.min(1024))),
        }
    }

    /// The cached result for `key` if it is valid at `at` (marking it recently used). An entry
    /// found but not valid at `at` is left alone: another caller may audit at a time it covers.
    pub fn get(&self, key: &PathKey, at: UnixMillis) -> Option<Arc<V>> {
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

    /// Remembers a result that verified at `at`.
    pub fn insert(&self, key: PathKey, value: Arc<V>, at: UnixMillis) {
        if self.capacity == 0 {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries.retain(|(k, v)| *k != key && v.not_after() >= at);
        while entries.len() >= self.capacity {
            entries.pop_front();
        }
        entries.push_back((key, value));
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

/// The two caches of one verifier.
#[derive(Debug)]
pub(crate) struct PathCaches {
    /// Verified CA chains, by `cabundle`.
    pub chains: BoundedCache<VerifiedCaChain>,
    /// Verified whole paths, by `cabundle` and leaf.
    pub paths: BoundedCache<VerifiedPath>,
}

impl PathCaches {
    /// Caches of at most `capacity` entries each (`0` disables both).
    pub fn new(capacity: usize) -> Self {
        Self {
            chains: BoundedCache::new(capacity),
            paths: BoundedCache::new(capacity),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_tell_chains_and_paths_and_splits_apart() {
        let a = vec![vec![1u8, 2], vec![3u8]];
        let (chain, path) = path_keys(&a, &[4]);
        assert_ne!(chain, path);
        // The same bytes split differently between certificates give another key.
        let b = vec![vec![1u8], vec![2u8, 3]];
        let (chain_b, path_b) = path_keys(&b, &[4]);
        assert_ne!(chain, chain_b);
        assert_ne!(path, path_b);
        // A whole path is not the CA chain of a longer bundle.
        let c = vec![vec![1u8, 2], vec![3u8], vec![4u8]];
        let (chain_c, _) = path_keys(&c, &[5]);
        assert_ne!(path, chain_c);
        // Another leaf under the same bundle: same chain key, other path key.
        let (chain_d, path_d) = path_keys(&a, &[5]);
        assert_eq!(chain, chain_d);
        assert_ne!(path, path_d);
    }
}
