//! Store benchmark: appends of 300-byte entries from 64 concurrent writers sharing group
//! commits, against one writer with one `fdatasync` per entry, measured in the same run; then
//! the index rebuild at open for a large log, reads and proofs on it.
//!
//! `cargo bench -p attestplane --bench store`. Environment:
//! - `STORE_BENCH_SECS` (default 3): seconds per append phase;
//! - `STORE_BENCH_REBUILD` (default 1000000): entries for the rebuild phase (0 skips it);
//! - `STORE_BENCH_DIR`: where to write (default: a temporary directory, which is deleted).
//!
//! Measured on the 2-core development VM (ext4 on a virtio disk), 3 s phases, two runs while
//! other builds were running (fdatasync cost varies with disk load):
//!
//! | | run 1 (loaded disk) | run 2 |
//! |---|---|---|
//! | one fdatasync per entry | 226 entries/s, p50 4.0 ms | 10,159 entries/s, p50 0.10 ms |
//! | group commit, 64 writers | 4,815 entries/s, 35.7 per sync, p99 31.7 ms | 88,603 entries/s, 51.2 per sync, p99 2.6 ms |
//! | ratio | 21.3x | 8.7x |
//! | open (index rebuild), 1M entries of 300 B, 308 MB | 1.13 s | 0.72 s |
//! | get, random seq | 7.5 µs | 3.2 µs |
//! | inclusion / consistency proof at 1M | 0.38 s each (flat O(n)) | 1 ms each (chunk roots) |

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use attestplane_host::store::{MAX_APPEND_ENTRIES, Store};
use attestplane_verifier::merkle;

const ENTRY_LEN: usize = 300;
const WRITERS: usize = 64;

fn entry(seq: u64) -> Vec<u8> {
    let mut e = format!("entry {seq:020} ").into_bytes();
    e.resize(ENTRY_LEN, (seq % 251) as u8);
    e
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// One writer, one entry per append, so one fdatasync per entry.
fn sequential(dir: &std::path::Path, run: Duration) -> f64 {
    let store = Store::open(dir).expect("open");
    let started = Instant::now();
    let mut latencies = Vec::new();
    let mut seq = 0;
    while started.elapsed() < run {
        let t = Instant::now();
        store
            .append_blocking(seq, vec![entry(seq)])
            .expect("append");
        latencies.push(t.elapsed());
        seq += 1;
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let rate = seq as f64 / elapsed;
    let stats = store.stats();
    println!(
        "one fdatasync per entry:  {seq:>8} entries in {elapsed:.2} s = {rate:>9.0} entries/s; \
         {} syncs; latency p50 {:.3} ms, p99 {:.3} ms",
        stats.syncs,
        ms(percentile(&latencies, 0.5)),
        ms(percentile(&latencies, 0.99)),
    );
    rate
}

/// 64 writers, each appending one entry at a time; appends queued together share a sync.
fn concurrent(dir: &std::path::Path, run: Duration) -> f64 {
    let store = Arc::new(Store::open(dir).expect("open"));
    let sequencer = Arc::new(Mutex::new(()));
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let threads: Vec<_> = (0..WRITERS)
        .map(|_| {
            let (store, sequencer, stop, count) = (
                Arc::clone(&store),
                Arc::clone(&sequencer),
                Arc::clone(&stop),
                Arc::clone(&count),
            );
            std::thread::spawn(move || {
                let mut latencies = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let commit = {
                        let _turn = sequencer.lock().expect("sequencer");
                        let seq = store.next_seq();
                        store.submit(seq, vec![entry(seq)]).expect("submit")
                    };
                    commit.wait().expect("append");
                    latencies.push(t.elapsed());
                    count.fetch_add(1, Ordering::Relaxed);
                }
                latencies
            })
        })
        .collect();
    std::thread::sleep(run);
    stop.store(true, Ordering::Relaxed);
    let mut latencies: Vec<Duration> = threads
        .into_iter()
        .flat_map(|t| t.join().expect("writer"))
        .collect();
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let n = count.load(Ordering::Relaxed);
    let rate = n as f64 / elapsed;
    let stats = store.stats();
    println!(
        "group commit, {WRITERS} writers: {n:>8} entries in {elapsed:.2} s = {rate:>9.0} entries/s; \
         {} syncs ({:.1} entries per sync); latency p50 {:.3} ms, p99 {:.3} ms",
        stats.syncs,
        stats.entries as f64 / stats.syncs.max(1) as f64,
        ms(percentile(&latencies, 0.5)),
        ms(percentile(&latencies, 0.99)),
    );
    rate
}

/// Writes `n` entries in maximal appends, reopens, and times the rebuild, reads and proofs.
fn rebuild(dir: &std::path::Path, n: u64) {
    let started = Instant::now();
    {
        let store = Store::open(dir).expect("open");
        let mut seq = 0;
        while seq < n {
            let end = (seq + MAX_APPEND_ENTRIES as u64).min(n);
            store
                .append_blocking(seq, (seq..end).map(entry).collect())
                .expect("append");
            seq = end;
        }
    }
    println!(
        "wrote {n} entries of {ENTRY_LEN} bytes in appends of {MAX_APPEND_ENTRIES}: {:.2} s",
        started.elapsed().as_secs_f64()
    );

    let t = Instant::now();
    let store = Store::open(dir).expect("reopen");
    let open = t.elapsed();
    let r = store.recovery();
    println!(
        "open (index rebuild) of {} entries, {} segments, {:.0} MB: {:.3} s (scan {:.3} s) = {:.0} entries/s",
        r.entries,
        r.segments,
        r.bytes as f64 / 1e6,
        open.as_secs_f64(),
        r.elapsed.as_secs_f64(),
        r.entries as f64 / open.as_secs_f64(),
    );

    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let gets = 10_000;
    let t = Instant::now();
    for _ in 0..gets {
        let seq = next();
        assert_eq!(store.get(seq).expect("get"), entry(seq));
    }
    println!(
        "get (random seq, verified against its leaf): {:.1} µs each",
        t.elapsed().as_secs_f64() * 1e6 / gets as f64
    );
    let t = Instant::now();
    let batches = store.stream(MAX_APPEND_ENTRIES).count();
    println!(
        "stream the whole log in batches of {MAX_APPEND_ENTRIES}: {batches} batches in {:.3} s",
        t.elapsed().as_secs_f64()
    );

    let t = Instant::now();
    let root = store.root(n).expect("root");
    println!("root of {n} leaves: {:.3} s", t.elapsed().as_secs_f64());
    let index = next();
    let t = Instant::now();
    let proof = store.inclusion_proof(index, n).expect("proof");
    let took = t.elapsed();
    let leaf = store.leaf_hash(index).expect("leaf");
    merkle::verify_inclusion(&leaf, index, n, &proof, &root).expect("inclusion verifies");
    println!(
        "inclusion proof of {index} in {n}: {:.3} s ({} hashes)",
        took.as_secs_f64(),
        proof.len()
    );
    let old = next().max(1);
    let t = Instant::now();
    let proof = store.consistency_proof(old, n).expect("proof");
    println!(
        "consistency proof {old} -> {n}: {:.3} s ({} hashes)",
        t.elapsed().as_secs_f64(),
        proof.len()
    );
}

fn main() {
    let run = Duration::from_secs(env_u64("STORE_BENCH_SECS", 3));
    let rebuild_n = env_u64("STORE_BENCH_REBUILD", 1_000_000);
    let temp;
    let base = match std::env::var_os("STORE_BENCH_DIR") {
        Some(d) => std::path::PathBuf::from(d),
        None => {
            temp = tempfile::tempdir().expect("tempdir");
            temp.path().to_path_buf()
        }
    };
    println!("store bench in {}", base.display());

    let one = sequential(&base.join("sequential"), run);
    let group = concurrent(&base.join("concurrent"), run);
    println!(
        "group commit / one fdatasync per entry = {:.1}x (target >= 3x)",
        group / one
    );
    if rebuild_n > 0 {
        rebuild(&base.join("rebuild"), rebuild_n);
    }
}
