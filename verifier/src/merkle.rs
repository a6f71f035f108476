//! RFC 6962 / RFC 9162 Merkle trees over SHA-256.
//!
//! Attestplane's log is a hash chain of signed entries, and the same entries are also the leaves
//! of a Merkle tree, so that the enclave can sign small checkpoints (size, root) and an auditor
//! can check inclusion and consistency proofs the way Certificate Transparency clients do.
//!
//! - The tree's leaf data are the log's entry hashes: `entry_hash = SHA-256(encoded entry)`, and
//!   the leaf hash is `SHA-256(0x00 ‖ entry_hash)` ([`leaf_hash`]).
//! - An interior node is `SHA-256(0x01 ‖ left ‖ right)` ([`node_hash`]).
//! - The tree of `n` leaves splits at the largest power of two below `n` (RFC 6962 §2.1), and the
//!   empty tree's root is `SHA-256("")` ([`empty_root`]).
//!
//! Verification ([`verify_inclusion`], [`verify_consistency`]) follows RFC 9162 §2.1.3.2 and
//! §2.1.4.2. The expected proof length is computed from the index and sizes before any hashing,
//! so a proof that is too short or too long is rejected with [`MerkleError::ProofLength`] rather
//! than by a root mismatch. Generation ([`inclusion_proof`], [`consistency_proof`]) follows
//! RFC 9162 §2.1.3.1 and §2.1.4.1 over a slice of leaf hashes, in O(n) time; the host uses it to
//! serve proofs. [`CompactRange`] keeps the root of an append-only tree in O(log n) memory; the
//! enclave uses it to maintain the root over millions of entries without storing them.
//!
//! ## Trust assumptions
//!
//! The proof, the sizes and the leaf are hostile. The roots a caller verifies against are
//! trusted only as far as the caller's source for them is (normally a verified checkpoint).
//!
//! ## What this module deliberately does not do
//!
//! - It does not hash entries: callers pass the entry hash to [`leaf_hash`] (the entry encoding
//!   lives in [`crate::entry`]).
//! - It does not store trees or cache interior nodes; the host's store may do that.
//! - It is SHA-256 only; no other hash function is configurable.
//! - A consistency proof from the empty tree is empty, and only the empty root is accepted as the
//!   root of a tree of size 0 (stricter than some CT clients, which accept any old root then).

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};
use thiserror::Error;

/// Length in bytes of every hash in the tree.
pub const HASH_LEN: usize = 32;

/// The longest proof in a tree of fewer than 2^63 leaves (an inclusion proof never has more
/// than 64 hashes; a consistency proof could have 65 only above that size). Verification
/// compares a proof's length exactly with the one the index and sizes imply; decoders of proofs
/// bound their input with this.
pub const MAX_PROOF_LEN: usize = 64;

/// Domain-separation prefix of a leaf hash (RFC 6962 §2.1).
const LEAF_PREFIX: u8 = 0x00;
/// Domain-separation prefix of an interior node hash (RFC 6962 §2.1).
const NODE_PREFIX: u8 = 0x01;

/// Errors of Merkle hashing, proof generation and proof verification.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum MerkleError {
    /// A leaf index is not below the tree size.
    #[error("leaf index {index} is out of range for tree size {size}")]
    IndexOutOfRange {
        /// The leaf index asked for.
        index: u64,
        /// The tree size.
        size: u64,
    },
    /// The older tree of a consistency check is larger than the newer one.
    #[error("old tree size {old_size} is larger than new tree size {new_size}")]
    SizeRegression {
        /// The size claimed for the older tree.
        old_size: u64,
        /// The size claimed for the newer tree.
        new_size: u64,
    },
    /// The proof has the wrong number of hashes for the index and sizes given.
    #[error("proof has {found} hashes, expected {expected}")]
    ProofLength {
        /// The number of hashes a valid proof has.
        expected: usize,
        /// The number of hashes supplied.
        found: usize,
    },
    /// An inclusion proof does not lead to the expected root.
    #[error("inclusion proof for leaf {index} does not match the root of tree size {size}")]
    InclusionMismatch {
        /// The leaf index.
        index: u64,
        /// The tree size.
        size: u64,
    },
    /// A consistency proof does not lead to both roots.
    #[error("consistency proof from tree size {old_size} to {new_size} does not match the roots")]
    ConsistencyMismatch {
        /// The older tree's size.
        old_size: u64,
        /// The newer tree's size.
        new_size: u64,
    },
    /// A hash did not have [`HASH_LEN`] bytes.
    #[error("hash has {found} bytes, expected 32")]
    HashLength {
        /// The number of bytes found (for hex input, the number of hex digits halved).
        found: usize,
    },
    /// A hash in hex was not valid hexadecimal.
    #[error("hash is not valid hex")]
    HashHex,
    /// A tree cannot grow past 2^64 - 1 leaves.
    #[error("tree is full")]
    TreeFull,
    /// The nodes given for a compact range do not fit its size.
    #[error("compact range of size {size} needs {expected} nodes, found {found}")]
    CompactRangeShape {
        /// The size of the range.
        size: u64,
        /// The number of nodes a range of that size holds.
        expected: usize,
        /// The number of nodes given.
        found: usize,
    },
}

/// A SHA-256 hash in the tree: a leaf hash, an interior node or a root.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hash([u8; HASH_LEN]);

impl Hash {
    /// Wraps 32 bytes.
    pub const fn from_bytes(bytes: [u8; HASH_LEN]) -> Self {
        Self(bytes)
    }

    /// Takes a hash from a slice that must be exactly 32 bytes long.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, MerkleError> {
        <[u8; HASH_LEN]>::try_from(bytes)
            .map(Self)
            .map_err(|_| MerkleError::HashLength { found: bytes.len() })
    }

    /// Parses 64 hex digits (either case).
    pub fn from_hex(s: &str) -> Result<Self, MerkleError> {
        if s.len() != 2 * HASH_LEN {
            return Err(MerkleError::HashLength { found: s.len() / 2 });
        }
        let mut out = [0u8; HASH_LEN];
        hex::decode_to_slice(s, &mut out).map_err(|_| MerkleError::HashHex)?;
        Ok(Self(out))
    }

    /// The hash as 64 lower-case hex digits.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The 32 bytes.
    pub const fn as_bytes(&self) -> &[u8; HASH_LEN] {
        &self.0
    }
}

impl fmt::Display for Hash {
    /// Lower-case hex.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({})", self.to_hex())
    }
}

impl AsRef<[u8]> for Hash {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Serialize for Hash {
    /// As a lower-case hex string.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Hash {
    /// From a hex string of 64 digits.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Hash::from_hex(&s).map_err(serde::de::Error::custom)
    }
}

/// The root of the empty tree: `SHA-256("")`.
pub fn empty_root() -> Hash {
    Hash(Sha256::digest([]).into())
}

/// The leaf hash `SHA-256(0x00 ‖ data)`. In Attestplane `data` is an entry hash.
pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([LEAF_PREFIX]);
    h.update(data);
    Hash(h.finalize().into())
}

/// The interior node hash `SHA-256(0x01 ‖ left ‖ right)`.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([NODE_PREFIX]);
    h.update(left.0);
    h.update(right.0);
    Hash(h.finalize().into())
}

/// The root of the tree whose leaf hashes are `leaf_hashes` (RFC 6962 `MTH`), in O(n) time and
/// O(log n) memory.
pub fn root(leaf_hashes: &[Hash]) -> Hash {
    let mut range = CompactRange::new();
    for leaf in leaf_hashes {
        // A slice cannot hold 2^64 - 1 hashes, so the range never fills.
        let _ = range.push(*leaf);
    }
    range.root()
}

/// The largest power of two strictly below `n`, for `n >= 2`.
fn split_point(n: usize) -> usize {
    // For n >= 2, n - 1 >= 1 and the highest set bit of n - 1 is the answer.
    let below = n.saturating_sub(1);
    if below == 0 {
        return 0;
    }
    1usize << (usize::BITS - 1 - below.leading_zeros())
}

/// Splits `leaves` at the largest power of two below its length (RFC 6962's `k`).
fn split(leaves: &[Hash]) -> (&[Hash], &[Hash]) {
    leaves
        .split_at_checked(split_point(leaves.len()))
        .unwrap_or((leaves, &[]))
}

fn to_usize(v: u64) -> Option<usize> {
    usize::try_from(v).ok()
}

/// The inclusion proof (audit path) for the leaf at `index` in the tree of `leaf_hashes`
/// (RFC 9162 §2.1.3.1), bottom-up.
pub fn inclusion_proof(leaf_hashes: &[Hash], index: u64) -> Result<Vec<Hash>, MerkleError> {
    let size = leaf_hashes.len() as u64;
    let out_of_range = MerkleError::IndexOutOfRange { index, size };
    let mut m = to_usize(index).ok_or(out_of_range.clone())?;
    if m >= leaf_hashes.len() {
        return Err(out_of_range);
    }
    // Walk down from the root, recording the sibling subtree's root at each split; the proof
    // lists them from the leaf up.
    let mut top_down = Vec::new();
    let mut subtree = leaf_hashes;
    while subtree.len() > 1 {
        let (left, right) = split(subtree);
        if m < left.len() {
            top_down.push(root(right));
            subtree = left;
        } else {
            top_down.push(root(left));
            m -= left.len();
            subtree = right;
        }
    }
    top_down.reverse();
    Ok(top_down)
}

/// The consistency proof from the tree of the first `old_size` leaves to the tree of all of
/// `leaf_hashes` (RFC 9162 §2.1.4.1). Empty when `old_size` is 0 or equals the tree size.
pub fn consistency_proof(leaf_hashes: &[Hash], old_size: u64) -> Result<Vec<Hash>, MerkleError> {
    let new_size = leaf_hashes.len() as u64;
    if old_size > new_size {
        return Err(MerkleError::SizeRegression { old_size, new_size });
    }
    let mut m = to_usize(old_size).ok_or(MerkleError::SizeRegression { old_size, new_size })?;
    if m == 0 || m == leaf_hashes.len() {
        return Ok(Vec::new());
    }
    // SUBPROOF(m, D[n], b), unrolled: each step records one subtree root that comes after the
    // rest of the proof, so they are collected top-down and reversed at the end.
    let mut top_down = Vec::new();
    let mut subtree = leaf_hashes;
    let mut whole_old_tree = true;
    while m < subtree.len() {
        let (left, right) = split(subtree);
        if m <= left.len() {
            top_down.push(root(right));
            subtree = left;
        } else {
            top_down.push(root(left));
            m -= left.len();
            subtree = right;
            whole_old_tree = false;
        }
    }
    // Now m == subtree.len(): the subtree is complete in the old tree. Its root is known to the
    // verifier only when it is the whole old tree.
    if !whole_old_tree {
        top_down.push(root(subtree));
    }
    top_down.reverse();
    Ok(top_down)
}

/// Shape of an inclusion proof for `index` in a tree of `size` leaves: the number of hashes
/// below the point where the paths to `index` and to the last leaf meet (`inner`), and the
/// number of left siblings above it (`border`).
fn inclusion_shape(index: u64, size: u64) -> (usize, usize) {
    let last = size.saturating_sub(1);
    let inner = (u64::BITS - (index ^ last).leading_zeros()) as usize;
    let border = index.checked_shr(inner as u32).unwrap_or(0).count_ones() as usize;
    (inner, border)
}

/// The root implied by an inclusion proof for `leaf` at `index` in a tree of `size` leaves.
/// Fails only on an index out of range or a proof of the wrong length.
pub fn root_from_inclusion_proof(
    leaf: &Hash,
    index: u64,
    size: u64,
    proof: &[Hash],
) -> Result<Hash, MerkleError> {
    if index >= size {
        return Err(MerkleError::IndexOutOfRange { index, size });
    }
    let (inner, border) = inclusion_shape(index, size);
    let expected = inner + border;
    if proof.len() != expected {
        return Err(MerkleError::ProofLength {
            expected,
            found: proof.len(),
        });
    }
    let (inner_part, border_part) = proof.split_at_checked(inner).unwrap_or((proof, &[]));
    let mut r = *leaf;
    for (level, sibling) in inner_part.iter().enumerate() {
        r = if index.checked_shr(level as u32).unwrap_or(0) & 1 == 0 {
            node_hash(&r, sibling)
        } else {
            node_hash(sibling, &r)
        };
    }
    for sibling in border_part {
        r = node_hash(sibling, &r);
    }
    Ok(r)
}

/// Checks that `leaf` is the leaf hash at `index` in the tree of `size` leaves whose root is
/// `root` (RFC 9162 §2.1.3.2).
pub fn verify_inclusion(
    leaf: &Hash,
    index: u64,
    size: u64,
    proof: &[Hash],
    root: &Hash,
) -> Result<(), MerkleError> {
    let computed = root_from_inclusion_proof(leaf, index, size, proof)?;
    if computed == *root {
        Ok(())
    } else {
        Err(MerkleError::InclusionMismatch { index, size })
    }
}

/// Checks that the tree of `old_size` leaves with root `old_root` is a prefix of the tree of
/// `new_size` leaves with root `new_root` (RFC 9162 §2.1.4.2).
///
/// Equal sizes need an empty proof and equal roots; an old size of 0 needs an empty proof and
/// the empty root as `old_root`.
pub fn verify_consistency(
    old_size: u64,
    new_size: u64,
    old_root: &Hash,
    new_root: &Hash,
    proof: &[Hash],
) -> Result<(), MerkleError> {
    let mismatch = MerkleError::ConsistencyMismatch { old_size, new_size };
    if old_size > new_size {
        return Err(MerkleError::SizeRegression { old_size, new_size });
    }
    if old_size == new_size || old_size == 0 {
        if !proof.is_empty() {
            return Err(MerkleError::ProofLength {
                expected: 0,
                found: proof.len(),
            });
        }
        let expected_old = if old_size == 0 {
            empty_root()
        } else {
            *new_root
        };
        return if *old_root == expected_old {
            Ok(())
        } else {
            Err(mismatch)
        };
    }
    // 0 < old_size < new_size. The last old leaf sits at the right edge of a complete subtree of
    // 2^level leaves (level = trailing zeros of old_size); that subtree is a node of both trees.
    // The proof is that node's hash (unless it is the whole old tree, whose root the verifier
    // has), then its inclusion path at that level in the new tree.
    let level = old_size.trailing_zeros();
    let node_index = (old_size - 1) >> level;
    let new_width = ((new_size - 1) >> level) + 1;
    let (inner, border) = inclusion_shape(node_index, new_width);
    let seed_in_proof = usize::from(node_index != 0);
    let expected = seed_in_proof + inner + border;
    if proof.len() != expected {
        return Err(MerkleError::ProofLength {
            expected,
            found: proof.len(),
        });
    }
    let (seed, path) = if seed_in_proof == 1 {
        match proof.split_first() {
            Some((first, rest)) => (*first, rest),
            None => return Err(mismatch),
        }
    } else {
        (*old_root, proof)
    };
    let (inner_part, border_part) = path.split_at_checked(inner).unwrap_or((path, &[]));
    // Old tree: the node is its last at this level, so only left siblings contribute.
    // New tree: both sides contribute, as in an inclusion proof.
    let mut old = seed;
    let mut new = seed;
    for (bit, sibling) in inner_part.iter().enumerate() {
        if node_index.checked_shr(bit as u32).unwrap_or(0) & 1 == 1 {
            old = node_hash(sibling, &old);
            new = node_hash(sibling, &new);
        } else {
            new = node_hash(&new, sibling);
        }
    }
    for sibling in border_part {
        old = node_hash(sibling, &old);
        new = node_hash(sibling, &new);
    }
    if old == *old_root && new == *new_root {
        Ok(())
    } else {
        Err(mismatch)
    }
}

/// An append-only Merkle accumulator: the roots of the complete subtrees that make up the tree
/// of the leaves pushed so far (the tree's right frontier), in O(log n) memory.
///
/// [`CompactRange::root`] equals [`root`] of the same leaves. The enclave keeps one to sign
/// checkpoints without storing the log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompactRange {
    size: u64,
    /// Roots of complete subtrees, largest (leftmost) first; one per set bit of `size`.
    nodes: Vec<Hash>,
}

impl CompactRange {
    /// The range of the empty tree.
    pub const fn new() -> Self {
        Self {
            size: 0,
            nodes: Vec::new(),
        }
    }

    /// Restores a range from its size and its nodes as returned by [`CompactRange::nodes`].
    pub fn from_parts(size: u64, nodes: Vec<Hash>) -> Result<Self, MerkleError> {
        let expected = size.count_ones() as usize;
        if nodes.len() != expected {
            return Err(MerkleError::CompactRangeShape {
                size,
                expected,
                found: nodes.len(),
            });
        }
        Ok(Self { size, nodes })
    }

    /// Appends one leaf hash.
    pub fn push(&mut self, leaf: Hash) -> Result<(), MerkleError> {
        let new_size = self.size.checked_add(1).ok_or(MerkleError::TreeFull)?;
        // Each trailing one bit of the old size is a complete subtree of the same height as
        // the one being carried: merge them.
        let mut carry = leaf;
        let mut bits = self.size;
        while bits & 1 == 1 {
            match self.nodes.pop() {
                Some(left) => carry = node_hash(&left, &carry),
                None => break,
            }
            bits >>= 1;
        }
        self.nodes.push(carry);
        self.size = new_size;
        Ok(())
    }

    /// The number of leaves pushed.
    pub const fn size(&self) -> u64 {
        self.size
    }

    /// The complete-subtree roots, largest first.
    pub fn nodes(&self) -> &[Hash] {
        &self.nodes
    }

    /// The root of the tree of all leaves pushed so far.
    pub fn root(&self) -> Hash {
        let mut iter = self.nodes.iter().rev();
        let Some(last) = iter.next() else {
            return empty_root();
        };
        iter.fold(*last, |acc, left| node_hash(left, &acc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaves(n: u64) -> Vec<Hash> {
        (0..n).map(|i| leaf_hash(&i.to_be_bytes())).collect()
    }

    #[test]
    fn empty_root_is_sha256_of_nothing() {
        assert_eq!(
            empty_root().to_hex(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(root(&[]), empty_root());
    }

    #[test]
    fn split_point_is_largest_power_of_two_below() {
        assert_eq!(split_point(2), 1);
        assert_eq!(split_point(3), 2);
        assert_eq!(split_point(4), 2);
        assert_eq!(split_point(5), 4);
        assert_eq!(split_point(8), 4);
        assert_eq!(split_point(9), 8);
    }

    #[test]
    fn hash_hex_round_trips_and_rejects_bad_input() {
        let h = leaf_hash(b"x");
        assert_eq!(Hash::from_hex(&h.to_hex()), Ok(h));
        assert_eq!(
            Hash::from_hex(&h.to_hex().to_uppercase()),
            Ok(h),
            "upper case accepted"
        );
        assert_eq!(
            Hash::from_hex("00"),
            Err(MerkleError::HashLength { found: 1 })
        );
        assert_eq!(Hash::from_hex(&"zz".repeat(32)), Err(MerkleError::HashHex));
        assert_eq!(
            Hash::from_slice(&[0u8; 31]),
            Err(MerkleError::HashLength { found: 31 })
        );
    }

    #[test]
    fn rejects_index_out_of_range_in_generation_and_verification() {
        let l = leaves(3);
        assert_eq!(
            inclusion_proof(&l, 3),
            Err(MerkleError::IndexOutOfRange { index: 3, size: 3 })
        );
        assert_eq!(
            verify_inclusion(&l[0], 0, 0, &[], &empty_root()),
            Err(MerkleError::IndexOutOfRange { index: 0, size: 0 })
        );
    }

    #[test]
    fn rejects_consistency_with_shrinking_size() {
        let l = leaves(3);
        assert_eq!(
            consistency_proof(&l, 4),
            Err(MerkleError::SizeRegression {
                old_size: 4,
                new_size: 3
            })
        );
        let r = root(&l);
        assert_eq!(
            verify_consistency(3, 2, &r, &r, &[]),
            Err(MerkleError::SizeRegression {
                old_size: 3,
                new_size: 2
            })
        );
    }

    #[test]
    fn rejects_nonempty_root_for_empty_old_tree() {
        let l = leaves(5);
        let r = root(&l);
        assert!(verify_consistency(0, 5, &empty_root(), &r, &[]).is_ok());
        assert_eq!(
            verify_consistency(0, 5, &r, &r, &[]),
            Err(MerkleError::ConsistencyMismatch {
                old_size: 0,
                new_size: 5
            })
        );
    }

    #[test]
    fn compact_range_push_fails_when_full() {
        let mut r = CompactRange {
            size: u64::MAX,
            nodes: vec![empty_root(); 64],
        };
        assert_eq!(r.push(empty_root()), Err(MerkleError::TreeFull));
    }

    #[test]
    fn compact_range_from_parts_checks_shape() {
        assert!(CompactRange::from_parts(5, vec![empty_root(); 2]).is_ok());
        assert_eq!(
            CompactRange::from_parts(5, vec![empty_root(); 3]),
            Err(MerkleError::CompactRangeShape {
                size: 5,
                expected: 2,
                found: 3
            })
        );
    }

    #[test]
    fn compact_range_restored_from_parts_continues_the_same_tree() {
        let l = leaves(13);
        let mut a = CompactRange::new();
        for h in &l[..6] {
            a.push(*h).unwrap();
        }
        let mut b = CompactRange::from_parts(a.size(), a.nodes().to_vec()).unwrap();
        for h in &l[6..] {
            b.push(*h).unwrap();
        }
        assert_eq!(b.root(), root(&l));
    }

    #[test]
    fn hash_serializes_as_hex_string() {
        let h = leaf_hash(b"");
        let json = serde_json::to_string(&h).unwrap();
        assert_eq!(json, format!("\"{}\"", h.to_hex()));
        assert_eq!(serde_json::from_str::<Hash>(&json).unwrap(), h);
        assert!(serde_json::from_str::<Hash>("\"00\"").is_err());
    }
}
