//! Merkle bookkeeping over the log's leaf hashes, pure: no I/O, no locks, no store errors.
//!
//! [`Leaves`] keeps the leaf hashes in immutable chunks of [`LEAF_CHUNK`] with each chunk's
//! root, so that a [`TreeSnapshot`] of any prefix costs a few reference counts (and at most
//! one chunk copied), and its root and proofs cost O(size / chunk + chunk) hashes. Every hash
//! and every proof step comes from the verifier's [`merkle`] module; the tests check the
//! composed proofs against the verifier's own over all leaves, and with its proof checkers.

use std::sync::Arc;

use attestplane_verifier::merkle::{self, Hash, MerkleError};

/// Leaf hashes are kept in immutable chunks of this many, so that proofs can snapshot them
/// without holding the index lock.
pub(super) const LEAF_CHUNK: usize = 4096;

/// Leaf hashes in immutable chunks of [`LEAF_CHUNK`] (a power of two), each with its Merkle
/// root computed when it fills, plus the open chunk being filled.
#[derive(Default)]
pub(super) struct Leaves {
    sealed: Vec<Arc<[Hash]>>,
    roots: Vec<Hash>,
    open: Vec<Hash>,
}

impl Leaves {
    pub(super) fn push(&mut self, leaf: Hash) {
        self.open.push(leaf);
        if self.open.len() >= LEAF_CHUNK {
            let full = std::mem::replace(&mut self.open, Vec::with_capacity(LEAF_CHUNK));
            self.roots.push(merkle::root(&full));
            self.sealed.push(Arc::from(full));
        }
    }

    pub(super) fn get(&self, seq: u64) -> Option<Hash> {
        let i = usize::try_from(seq).ok()?;
        let (chunk, within) = (i / LEAF_CHUNK, i % LEAF_CHUNK);
        match self.sealed.get(chunk) {
            Some(c) => c.get(within).copied(),
            None if chunk == self.sealed.len() => self.open.get(within).copied(),
            None => None,
        }
    }

    /// The tree of the first `size` leaves (`size` at most the number pushed).
    pub(super) fn snapshot(&self, size: u64) -> TreeSnapshot {
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
pub(super) struct TreeSnapshot {
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

    pub(super) fn root(&self) -> Hash {
        if self.size == 0 {
            return merkle::empty_root();
        }
        merkle::root(&self.units())
    }

    pub(super) fn inclusion_proof(&self, index: u64) -> Result<Vec<Hash>, MerkleError> {
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

    pub(super) fn consistency_proof(&self, old_size: u64) -> Result<Vec<Hash>, MerkleError> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
                let root = tree.root();
                for index in 0..n as u64 {
                    let proof = tree.inclusion_proof(index).unwrap();
                    assert_eq!(
                        proof,
                        merkle::inclusion_proof(&all, index).unwrap(),
                        "unit {unit}, inclusion of {index} in {n}"
                    );
                    merkle::verify_inclusion(&all[index as usize], index, n as u64, &proof, &root)
                        .unwrap();
                }
                for old in 0..=n as u64 {
                    let proof = tree.consistency_proof(old).unwrap();
                    assert_eq!(
                        proof,
                        merkle::consistency_proof(&all, old).unwrap(),
                        "unit {unit}, consistency {old} to {n}"
                    );
                    let old_root = snapshot_of(&all[..old as usize], unit).root();
                    merkle::verify_consistency(old, n as u64, &old_root, &root, &proof).unwrap();
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
}
