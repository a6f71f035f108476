//! Cost of checking RFC 9162 inclusion and consistency proofs in a tree of 1,000,000 leaves,
//! and the throughput of [`CompactRange::push`].
//!
//! Setup (not timed) derives 1,000,000 leaf hashes (32 MB), the tree's root, and proofs from
//! [`inclusion_proof`] and [`consistency_proof`] for a few positions; every proof is checked to
//! verify before anything is timed. Each timed iteration verifies one proof, cycling through
//! the positions, so the figure is per proof.
//!
//! Run: `cargo bench -p attestplane-verifier --bench merkle`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::hint::black_box;

use attestplane_verifier::merkle::{
    CompactRange, Hash, consistency_proof, inclusion_proof, leaf_hash, root, verify_consistency,
    verify_inclusion,
};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const TREE_SIZE: u64 = 1_000_000;
/// Tree size when the binary runs as a smoke test (`cargo test --all-targets` runs each
/// benchmark once, unoptimised, without `--bench`); positions are scaled down to it.
const SMOKE_TEST_TREE_SIZE: u64 = 10_000;
const INCLUSION_INDICES: [u64; 4] = [0, 123_457, 654_321, TREE_SIZE - 1];
const CONSISTENCY_OLD_SIZES: [u64; 4] = [123_457, 524_288, 777_777, TREE_SIZE - 1];
/// Leaves pushed per timed iteration of the compact-range benchmark.
const PUSH_BATCH: u64 = 65_536;

struct Inclusion {
    leaf: Hash,
    index: u64,
    proof: Vec<Hash>,
}

struct Consistency {
    old_size: u64,
    old_root: Hash,
    proof: Vec<Hash>,
}

fn leaves(n: u64) -> Vec<Hash> {
    (0..n).map(|i| leaf_hash(&i.to_be_bytes())).collect()
}

fn bench_mode() -> bool {
    std::env::args().any(|a| a == "--bench")
}

fn bench(c: &mut Criterion) {
    let size = if bench_mode() {
        TREE_SIZE
    } else {
        SMOKE_TEST_TREE_SIZE
    };
    // Positions scaled to the tree (identity at full size), at least 1, below `size`.
    let scaled = |x: u64| (x * size / TREE_SIZE).clamp(1, size - 1);
    let leaves = leaves(size);
    let tree_root = root(&leaves);
    let inclusions: Vec<Inclusion> = INCLUSION_INDICES
        .iter()
        .map(|&index| {
            let index = if index == 0 { 0 } else { scaled(index) };
            let proof = inclusion_proof(&leaves, index)
                .unwrap_or_else(|e| panic!("inclusion proof for {index}: {e}"));
            let leaf = leaves
                .get(index as usize)
                .copied()
                .unwrap_or_else(|| panic!("no leaf {index}"));
            verify_inclusion(&leaf, index, size, &proof, &tree_root)
                .unwrap_or_else(|e| panic!("inclusion proof for {index} must verify: {e}"));
            Inclusion { leaf, index, proof }
        })
        .collect();
    let consistencies: Vec<Consistency> = CONSISTENCY_OLD_SIZES
        .iter()
        .map(|&old_size| {
            let old_size = scaled(old_size);
            let proof = consistency_proof(&leaves, old_size)
                .unwrap_or_else(|e| panic!("consistency proof from {old_size}: {e}"));
            let old_root = root(leaves.get(..old_size as usize).unwrap_or_default());
            verify_consistency(old_size, size, &old_root, &tree_root, &proof)
                .unwrap_or_else(|e| panic!("consistency proof from {old_size} must verify: {e}"));
            Consistency {
                old_size,
                old_root,
                proof,
            }
        })
        .collect();
    eprintln!(
        "merkle bench: {size} leaves; inclusion proof lengths {:?}; consistency proof \
         lengths {:?}",
        inclusions.iter().map(|p| p.proof.len()).collect::<Vec<_>>(),
        consistencies
            .iter()
            .map(|p| p.proof.len())
            .collect::<Vec<_>>()
    );

    let mut group = c.benchmark_group("merkle_1m");
    group.throughput(Throughput::Elements(1));
    let mut i = 0;
    group.bench_function("verify_inclusion", |b| {
        b.iter(|| {
            i = (i + 1) % inclusions.len();
            let p = &inclusions[i];
            verify_inclusion(
                black_box(&p.leaf),
                p.index,
                size,
                black_box(&p.proof),
                &tree_root,
            )
            .is_ok()
        })
    });
    let mut i = 0;
    group.bench_function("verify_consistency", |b| {
        b.iter(|| {
            i = (i + 1) % consistencies.len();
            let p = &consistencies[i];
            verify_consistency(
                p.old_size,
                size,
                black_box(&p.old_root),
                &tree_root,
                black_box(&p.proof),
            )
            .is_ok()
        })
    });
    group.finish();

    let batch = leaves
        .get(..PUSH_BATCH.min(size) as usize)
        .unwrap_or_default();
    let mut group = c.benchmark_group("compact_range");
    group.throughput(Throughput::Elements(batch.len() as u64));
    group.bench_function("push_65536", |b| {
        b.iter(|| {
            let mut range = CompactRange::new();
            for leaf in black_box(batch) {
                let _ = range.push(*leaf);
            }
            range.size()
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
