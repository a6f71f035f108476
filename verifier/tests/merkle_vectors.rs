//! RFC 6962 Merkle tree vectors run as data (verifier/testdata/merkle/, provenance in its
//! README.md), and property tests of generation against verification.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use attestplane_verifier::merkle::{
    self, CompactRange, Hash, MAX_PROOF_LEN, MerkleError, consistency_proof, inclusion_proof,
    leaf_hash, node_hash, verify_consistency, verify_inclusion,
};
use proptest::prelude::*;
use serde::Deserialize;

#[derive(Deserialize)]
struct Vectors {
    leaf_inputs: Vec<String>,
    node_hashes_by_level: Vec<Vec<Hash>>,
    roots_by_size: Vec<Hash>,
    compact_ranges_by_size: Vec<Vec<Hash>>,
    inclusion: Vec<InclusionVector>,
    consistency: Vec<ConsistencyVector>,
}

#[derive(Deserialize)]
struct InclusionVector {
    index: u64,
    size: u64,
    proof: Vec<Hash>,
}

#[derive(Deserialize)]
struct ConsistencyVector {
    old_size: u64,
    new_size: u64,
    proof: Vec<Hash>,
}

fn vectors() -> Vectors {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/merkle/rfc6962.json");
    let text = std::fs::read_to_string(path).expect("read vectors");
    serde_json::from_str(&text).expect("parse vectors")
}

fn leaf_hashes(v: &Vectors) -> Vec<Hash> {
    v.leaf_inputs
        .iter()
        .map(|input| leaf_hash(&hex::decode(input).expect("leaf hex")))
        .collect()
}

/// A hash no tree in the vectors has.
fn some_hash() -> Hash {
    Hash::from_hex("abacaba000000000000000000000000000000000000000000060061e00123456").unwrap()
}

fn flip(h: &Hash, byte: usize, bit: u8) -> Hash {
    let mut b = *h.as_bytes();
    b[byte] ^= 1 << bit;
    Hash::from_bytes(b)
}

#[test]
fn leaf_hashes_match_published_level_zero() {
    let v = vectors();
    assert_eq!(leaf_hashes(&v), v.node_hashes_by_level[0]);
}

#[test]
fn interior_nodes_match_published_levels() {
    let v = vectors();
    for level in 1..v.node_hashes_by_level.len() {
        let below = &v.node_hashes_by_level[level - 1];
        for (i, want) in v.node_hashes_by_level[level].iter().enumerate() {
            assert_eq!(
                node_hash(&below[2 * i], &below[2 * i + 1]),
                *want,
                "level {level} index {i}"
            );
        }
    }
}

#[test]
fn roots_match_published_roots_for_every_size() {
    let v = vectors();
    let leaves = leaf_hashes(&v);
    assert_eq!(v.roots_by_size.len(), leaves.len() + 1);
    for (size, want) in v.roots_by_size.iter().enumerate() {
        assert_eq!(merkle::root(&leaves[..size]), *want, "size {size}");
    }
}

#[test]
fn compact_range_matches_published_frontiers_and_roots() {
    let v = vectors();
    let leaves = leaf_hashes(&v);
    let mut range = CompactRange::new();
    assert_eq!(range.nodes(), v.compact_ranges_by_size[0].as_slice());
    assert_eq!(range.root(), v.roots_by_size[0]);
    for (i, leaf) in leaves.iter().enumerate() {
        range.push(*leaf).unwrap();
        let size = i + 1;
        assert_eq!(range.size(), size as u64);
        assert_eq!(
            range.nodes(),
            v.compact_ranges_by_size[size].as_slice(),
            "size {size}"
        );
        assert_eq!(range.root(), v.roots_by_size[size], "size {size}");
    }
}

#[test]
fn published_inclusion_proofs_are_generated_and_verify() {
    let v = vectors();
    let leaves = leaf_hashes(&v);
    for t in &v.inclusion {
        let tree = &leaves[..t.size as usize];
        assert_eq!(
            inclusion_proof(tree, t.index).unwrap(),
            t.proof,
            "generate {}/{}",
            t.index,
            t.size
        );
        let root = v.roots_by_size[t.size as usize];
        let leaf = leaves[t.index as usize];
        verify_inclusion(&leaf, t.index, t.size, &t.proof, &root)
            .unwrap_or_else(|e| panic!("verify {}/{}: {e}", t.index, t.size));
    }
}

#[test]
fn corrupted_inclusion_proofs_are_rejected() {
    let v = vectors();
    let leaves = leaf_hashes(&v);
    for t in &v.inclusion {
        let root = v.roots_by_size[t.size as usize];
        let leaf = leaves[t.index as usize];
        let (i, n, p) = (t.index, t.size, t.proof.clone());
        let mut probes: Vec<(String, Hash, u64, u64, Vec<Hash>, Hash)> = vec![
            (
                "index - 1".into(),
                leaf,
                i.wrapping_sub(1),
                n,
                p.clone(),
                root,
            ),
            ("index + 1".into(), leaf, i + 1, n, p.clone(), root),
            ("index ^ 2".into(), leaf, i ^ 2, n, p.clone(), root),
            ("size * 2".into(), leaf, i, n * 2, p.clone(), root),
            ("size / 2".into(), leaf, i, n / 2, p.clone(), root),
            (
                "wrong leaf".into(),
                leaf_hash(b"WrongLeaf"),
                i,
                n,
                p.clone(),
                root,
            ),
            (
                "empty root".into(),
                leaf,
                i,
                n,
                p.clone(),
                merkle::empty_root(),
            ),
            ("random root".into(), leaf, i, n, p.clone(), some_hash()),
        ];
        let mut with = |desc: &str, proof: Vec<Hash>| {
            probes.push((desc.into(), leaf, i, n, proof, root));
        };
        with("trailing root", [p.clone(), vec![root]].concat());
        with("trailing garbage", [p.clone(), vec![some_hash()]].concat());
        with("preceding root", [vec![root], p.clone()].concat());
        with("preceding garbage", [vec![some_hash()], p.clone()].concat());
        if !p.is_empty() {
            with("removed component", p[..p.len() - 1].to_vec());
        }
        if p.len() > 1 {
            with(
                "inserted component",
                [vec![p[0], some_hash()], p[1..].to_vec()].concat(),
            );
        }
        for k in 0..p.len() {
            let mut q = p.clone();
            q[k] = flip(&q[k], 0, 3);
            with(&format!("modified proof[{k}] bit 3"), q);
        }
        for (desc, leaf, index, size, proof, root) in probes {
            assert!(
                verify_inclusion(&leaf, index, size, &proof, &root).is_err(),
                "{}/{}: accepted {desc}",
                t.index,
                t.size
            );
        }
    }
}

#[test]
fn published_consistency_proofs_are_generated_and_verify() {
    let v = vectors();
    let leaves = leaf_hashes(&v);
    for t in &v.consistency {
        let tree = &leaves[..t.new_size as usize];
        assert_eq!(
            consistency_proof(tree, t.old_size).unwrap(),
            t.proof,
            "generate {}->{}",
            t.old_size,
            t.new_size
        );
        let old_root = v.roots_by_size[t.old_size as usize];
        let new_root = v.roots_by_size[t.new_size as usize];
        verify_consistency(t.old_size, t.new_size, &old_root, &new_root, &t.proof)
            .unwrap_or_else(|e| panic!("verify {}->{}: {e}", t.old_size, t.new_size));
    }
}

#[test]
fn corrupted_consistency_proofs_are_rejected() {
    let v = vectors();
    for t in v.consistency.iter().filter(|t| !t.proof.is_empty()) {
        let (m, n, p) = (t.old_size, t.new_size, t.proof.clone());
        let r1 = v.roots_by_size[m as usize];
        let r2 = v.roots_by_size[n as usize];
        let wrong = leaf_hash(b"WrongRoot");
        let mut probes: Vec<(String, u64, u64, Hash, Hash, Vec<Hash>)> = vec![
            ("size1 - 1".into(), m - 1, n, r1, r2, p.clone()),
            ("size1 + 1".into(), m + 1, n, r1, r2, p.clone()),
            ("size1 ^ 2".into(), m ^ 2, n, r1, r2, p.clone()),
            ("size2 * 2".into(), m, n * 2, r1, r2, p.clone()),
            ("size2 / 2".into(), m, n / 2, r1, r2, p.clone()),
            ("wrong root1".into(), m, n, wrong, r2, p.clone()),
            ("wrong root2".into(), m, n, r1, wrong, p.clone()),
            ("swapped roots".into(), m, n, r2, r1, p.clone()),
            ("empty proof".into(), m, n, r1, r2, vec![]),
            (
                "trailing garbage".into(),
                m,
                n,
                r1,
                r2,
                [p.clone(), vec![some_hash()]].concat(),
            ),
            (
                "trailing root1".into(),
                m,
                n,
                r1,
                r2,
                [p.clone(), vec![r1]].concat(),
            ),
            (
                "trailing root2".into(),
                m,
                n,
                r1,
                r2,
                [p.clone(), vec![r2]].concat(),
            ),
            (
                "preceding garbage".into(),
                m,
                n,
                r1,
                r2,
                [vec![some_hash()], p.clone()].concat(),
            ),
            (
                "preceding root1".into(),
                m,
                n,
                r1,
                r2,
                [vec![r1], p.clone()].concat(),
            ),
            (
                "preceding root2".into(),
                m,
                n,
                r1,
                r2,
                [vec![r2], p.clone()].concat(),
            ),
            (
                "preceding proof[0]".into(),
                m,
                n,
                r1,
                r2,
                [vec![p[0]], p.clone()].concat(),
            ),
            (
                "truncated proof".into(),
                m,
                n,
                r1,
                r2,
                p[..p.len() - 1].to_vec(),
            ),
        ];
        for k in 0..p.len() {
            let mut q = p.clone();
            q[k] = flip(&q[k], 0, 4);
            probes.push((format!("modified proof[{k}] bit 4"), m, n, r1, r2, q));
        }
        for (desc, m, n, r1, r2, proof) in probes {
            assert!(
                verify_consistency(m, n, &r1, &r2, &proof).is_err(),
                "{}->{}: accepted {desc}",
                t.old_size,
                t.new_size
            );
        }
    }
}

#[test]
fn equal_sizes_need_equal_roots_and_an_empty_proof() {
    let v = vectors();
    let r = v.roots_by_size[3];
    assert!(verify_consistency(3, 3, &r, &r, &[]).is_ok());
    assert_eq!(
        verify_consistency(3, 3, &r, &v.roots_by_size[4], &[]),
        Err(MerkleError::ConsistencyMismatch {
            old_size: 3,
            new_size: 3
        })
    );
    assert_eq!(
        verify_consistency(3, 3, &r, &r, &[r]),
        Err(MerkleError::ProofLength {
            expected: 0,
            found: 1
        })
    );
}

#[test]
fn wrong_length_proof_is_named_as_such() {
    let v = vectors();
    let leaves = leaf_hashes(&v);
    let t = &v.inclusion[1];
    let root = v.roots_by_size[8];
    assert_eq!(
        verify_inclusion(&leaves[0], t.index, t.size, &t.proof[..2], &root),
        Err(MerkleError::ProofLength {
            expected: 3,
            found: 2
        })
    );
    let long = vec![root; MAX_PROOF_LEN + 1];
    assert!(matches!(
        verify_inclusion(&leaves[0], 0, 8, &long, &root),
        Err(MerkleError::ProofLength { expected: 3, .. })
    ));
}

#[test]
fn inclusion_mismatch_carries_index_and_size() {
    let v = vectors();
    let leaves = leaf_hashes(&v);
    let t = &v.inclusion[2];
    assert_eq!(
        verify_inclusion(&leaves[0], t.index, t.size, &t.proof, &v.roots_by_size[8]),
        Err(MerkleError::InclusionMismatch { index: 5, size: 8 })
    );
}

#[test]
fn handles_sizes_near_u64_max_without_panicking() {
    let h = leaf_hash(b"x");
    let big = u64::MAX;
    let proof = vec![h; 64];
    assert!(verify_inclusion(&h, big - 1, big, &proof, &h).is_err());
    assert!(verify_inclusion(&h, 0, big, &proof, &h).is_err());
    assert!(verify_consistency(big - 1, big, &h, &h, &proof).is_err());
    assert!(verify_consistency(1, big, &h, &h, &proof).is_err());
    assert!(verify_consistency(1 << 63, big, &h, &h, &proof).is_err());
    assert!(verify_consistency((1 << 63) + 1, big, &h, &h, &[h; 65]).is_err());
}

fn gen_leaves(n: usize) -> Vec<Hash> {
    (0..n as u64)
        .map(|i| leaf_hash(&merkle::leaf_hash(&i.to_le_bytes()).as_bytes()[..]))
        .collect()
}

/// Every valid inclusion proof in trees up to 64 leaves, exhaustively.
#[test]
fn every_inclusion_proof_up_to_64_leaves_verifies() {
    let all = gen_leaves(64);
    for n in 1..=all.len() {
        let tree = &all[..n];
        let root = merkle::root(tree);
        for i in 0..n as u64 {
            let proof = inclusion_proof(tree, i).unwrap();
            assert!(proof.len() <= MAX_PROOF_LEN);
            verify_inclusion(&tree[i as usize], i, n as u64, &proof, &root)
                .unwrap_or_else(|e| panic!("{i}/{n}: {e}"));
        }
    }
}

/// Every valid consistency proof between trees up to 64 leaves, exhaustively.
#[test]
fn every_consistency_proof_up_to_64_leaves_verifies() {
    let all = gen_leaves(64);
    let roots: Vec<Hash> = (0..=all.len()).map(|n| merkle::root(&all[..n])).collect();
    for n in 0..=all.len() {
        for m in 0..=n {
            let proof = consistency_proof(&all[..n], m as u64).unwrap();
            verify_consistency(m as u64, n as u64, &roots[m], &roots[n], &proof)
                .unwrap_or_else(|e| panic!("{m}->{n}: {e}"));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn generated_inclusion_proofs_verify_and_any_change_is_rejected(
        (n, i) in (1usize..300).prop_flat_map(|n| (Just(n), 0..n)),
        byte in 0usize..32,
        bit in 0u8..8,
        pick in any::<prop::sample::Index>(),
        delta in 1u64..1000,
    ) {
        let tree = gen_leaves(n);
        let root = merkle::root(&tree);
        let (index, size) = (i as u64, n as u64);
        let leaf = tree[i];
        let proof = inclusion_proof(&tree, index).unwrap();
        prop_assert!(verify_inclusion(&leaf, index, size, &proof, &root).is_ok());

        // A flipped bit in the leaf, the root or any proof hash.
        prop_assert!(verify_inclusion(&flip(&leaf, byte, bit), index, size, &proof, &root).is_err());
        prop_assert!(verify_inclusion(&leaf, index, size, &proof, &flip(&root, byte, bit)).is_err());
        if !proof.is_empty() {
            let k = pick.index(proof.len());
            let mut bad = proof.clone();
            bad[k] = flip(&bad[k], byte, bit);
            prop_assert!(verify_inclusion(&leaf, index, size, &bad, &root).is_err());
        }
        // Another index with the same proof. (Another size is not always caught by the
        // proof alone: RFC 6962 binds the size through the root, which a checkpoint signs.)
        let other_index = (index + delta) % size;
        if other_index != index {
            prop_assert!(verify_inclusion(&leaf, other_index, size, &proof, &root).is_err());
        }
    }

    #[test]
    fn generated_consistency_proofs_verify_and_any_change_is_rejected(
        (n, m) in (1usize..300).prop_flat_map(|n| (Just(n), 1..=n)),
        byte in 0usize..32,
        bit in 0u8..8,
        pick in any::<prop::sample::Index>(),
        delta in 1u64..1000,
    ) {
        let tree = gen_leaves(n);
        let new_root = merkle::root(&tree);
        let old_root = merkle::root(&tree[..m]);
        let (old, new) = (m as u64, n as u64);
        let proof = consistency_proof(&tree, old).unwrap();
        prop_assert!(proof.len() <= MAX_PROOF_LEN);
        prop_assert!(verify_consistency(old, new, &old_root, &new_root, &proof).is_ok());

        prop_assert!(verify_consistency(old, new, &flip(&old_root, byte, bit), &new_root, &proof).is_err());
        prop_assert!(verify_consistency(old, new, &old_root, &flip(&new_root, byte, bit), &proof).is_err());
        if !proof.is_empty() {
            let k = pick.index(proof.len());
            let mut bad = proof.clone();
            bad[k] = flip(&bad[k], byte, bit);
            prop_assert!(verify_consistency(old, new, &old_root, &new_root, &bad).is_err());
        }
        // A different old size with the same proof and roots.
        if old > 1 {
            let other_old = 1 + (old - 1 + delta) % new;
            if other_old != old && merkle::root(&tree[..other_old as usize]) != old_root {
                prop_assert!(verify_consistency(other_old, new, &old_root, &new_root, &proof).is_err());
            }
        }
    }

    #[test]
    fn compact_range_root_equals_root_for_every_prefix(n in 0usize..300) {
        let tree = gen_leaves(n);
        let mut range = CompactRange::new();
        prop_assert_eq!(range.root(), merkle::root(&[]));
        for (k, leaf) in tree.iter().enumerate() {
            range.push(*leaf).unwrap();
            prop_assert_eq!(range.size(), (k + 1) as u64);
            prop_assert_eq!(range.nodes().len(), (k + 1).count_ones() as usize);
            prop_assert_eq!(range.root(), merkle::root(&tree[..=k]));
        }
    }

    #[test]
    fn verification_never_panics_on_arbitrary_input(
        index in any::<u64>(),
        size in any::<u64>(),
        old in any::<u64>(),
        proof in prop::collection::vec(any::<[u8; 32]>(), 0..70),
        a in any::<[u8; 32]>(),
        b in any::<[u8; 32]>(),
    ) {
        let proof: Vec<Hash> = proof.into_iter().map(Hash::from_bytes).collect();
        let (a, b) = (Hash::from_bytes(a), Hash::from_bytes(b));
        let _ = verify_inclusion(&a, index, size, &proof, &b);
        let _ = verify_inclusion(&a, index % size.max(1), size, &proof, &b);
        let _ = verify_consistency(old, size, &a, &b, &proof);
        let _ = verify_consistency(old % size.max(1), size, &a, &b, &proof);
    }
}

/// A consistency proof for (m, n) never verifies for another old size m' with m's root, for all
/// sizes up to 64 (checked exhaustively).
#[test]
fn consistency_proof_does_not_verify_for_another_old_size() {
    let all = gen_leaves(64);
    let roots: Vec<Hash> = (0..=all.len()).map(|n| merkle::root(&all[..n])).collect();
    for n in 1..=all.len() {
        for m in 1..n {
            let proof = consistency_proof(&all[..n], m as u64).unwrap();
            for other in 0..=n {
                if other == m {
                    continue;
                }
                assert!(
                    verify_consistency(other as u64, n as u64, &roots[m], &roots[n], &proof)
                        .is_err(),
                    "proof {m}->{n} accepted as {other}->{n}"
                );
            }
        }
    }
}
