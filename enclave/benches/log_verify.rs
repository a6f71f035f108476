//! Throughput of whole-log verification against the raw Ed25519 rates, in the same run.
//!
//! Setup (not timed): the enclave's [`LogWriter`] writes a log of 20,000 entries in two epochs
//! (10,000 each, every epoch opened by an `epoch_start` entry carrying a mock-NSM attestation
//! document; the rest are `checkpoint` events), and the verifier policy pins the mock's root
//! and PCR0–2. The log is checked to verify before anything is timed.
//!
//! Groups:
//! - `log_verify/verify_log_{1,2}_threads`: [`verify_log`] over the whole log inside a rayon
//!   pool of one thread (one core) and of two (all cores of the bench machine), in entries/s.
//!   The interleaved run also times raw batch verification on two threads, to tell what the
//!   machine's second core gives from what the verifier makes of it.
//! - `ed25519`: the raw rates on one core of ed25519-zebra, the library whose ZIP 215 rules
//!   the log verifier applies (`attestplane_verifier::eddsa`), over the log's own messages (COSE
//!   Sig_structures), signatures and key: its batch verifier over batches of
//!   [`SIGNATURE_BATCH`] (which gathers the terms of one key into one, as inside an epoch), the
//!   same batches through the verifier's `eddsa::verify_batch` (the library plus one draw of OS
//!   randomness per batch), and single verification. Target: log verification per core ≥ 0.9 ×
//!   the raw batch rate. The interleaved run also times the library's batch verifier over
//!   signatures by 64 distinct keys (nothing to gather: the textbook batch rate).
//! - `log_parts`: the other work `verify_log` does per entry, each on one core over the whole
//!   log (decode, hashing and the Merkle frontier), plus the two epoch documents' attestation
//!   checks, to say where any time above the batch verification goes.
//! - `decode_parts`: [`SignedEntry::decode`] (one pass) against
//!   [`SignedEntry::decode_reference`] (the decoding it replaced, kept as the reference), and
//!   the reference split into its steps (COSE parse, canonical re-encoding with the
//!   Sig_structure, strict payload CBOR decode, field extraction, hash) next to the one-pass
//!   payload reader.
//!
//! Run: `cargo bench -p attestplane-enclave --bench log_verify`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Instant;

use attestplane_enclave::nsm::{Clock, MockNsm, Nsm};
use attestplane_enclave::writer::{Head, LogWriter};
use attestplane_verifier::UnixMillis;
use attestplane_verifier::attestation::{
    AttestationVerifier, Expectations, Pcr, PcrIndex, TrustAnchor, VerifyAt, verify_attestation,
};
use attestplane_verifier::cbor;
use attestplane_verifier::eddsa::{self, PublicKey};
use attestplane_verifier::entry::{ENTRY_CONTENT_TYPE, Entry, EntryHash, Event, SignedEntry};
use attestplane_verifier::log::{LogPolicy, SIGNATURE_BATCH, verify_log};
use attestplane_verifier::merkle::{self, CompactRange};
use coset::iana::Algorithm;
use coset::{CoseSign1, CoseSign1Builder, HeaderBuilder, TaggedCborSerializable};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ed25519_dalek::{Signature, Signer, SigningKey};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use rayon::prelude::*;

/// 2026-11-22T00:00:00Z.
const T0: u64 = 1_795_305_600_000;
const ORIGIN: &str = "attestplane.bench/log";
const ENTRIES: usize = 20_000;
const EPOCHS: usize = 2;
/// Log size when the binary runs as a smoke test (see [`bench_mode`]).
const SMOKE_TEST_ENTRIES: usize = 1_000;

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap_or_else(|e| panic!("rayon pool of {threads}: {e}"))
}

struct Log {
    entries: Vec<Vec<u8>>,
    policy: LogPolicy,
    at: UnixMillis,
}

fn build_log(entries: usize) -> Log {
    let nsm = MockNsm::builder([7; 32], Clock::Fixed(UnixMillis::from_millis(T0))).build();
    let now = UnixMillis::from_millis(T0);
    let per_epoch = entries / EPOCHS;
    let mut entries = Vec::with_capacity(entries);
    let mut head = Head::empty();
    for _ in 0..EPOCHS {
        let (mut writer, start) =
            LogWriter::open(&nsm, head, ORIGIN, now).unwrap_or_else(|e| panic!("open epoch: {e}"));
        entries.push(start.bytes);
        for i in 1..per_epoch {
            let event = Event::Checkpoint {
                size: i as u64,
                root: [0x5a; 32],
            };
            let written = writer
                .append(event, now)
                .unwrap_or_else(|e| panic!("append: {e}"));
            entries.push(written.bytes);
        }
        head = writer.head().clone();
    }
    let pcrs: BTreeMap<PcrIndex, Pcr> = (0u8..3)
        .map(|i| {
            let value = nsm
                .describe_pcr(u16::from(i))
                .unwrap_or_else(|e| panic!("describe pcr {i}: {e}"))
                .value;
            let index = PcrIndex::try_from(i).unwrap_or_else(|e| panic!("pcr index {i}: {e}"));
            let pcr =
                Pcr::try_from(value.as_slice()).unwrap_or_else(|e| panic!("pcr {i} value: {e}"));
            (index, pcr)
        })
        .collect();
    let root = nsm.root_pem().unwrap_or_else(|e| panic!("mock root: {e}"));
    let anchor =
        TrustAnchor::from_pem(root.as_bytes()).unwrap_or_else(|e| panic!("mock root anchor: {e}"));
    Log {
        entries,
        policy: LogPolicy::new(anchor, pcrs),
        at: UnixMillis::from_millis(T0 + 3_600_000),
    }
}

/// The inputs of one signature check.
struct Sig {
    message: Vec<u8>,
    signature: Signature,
    key: PublicKey,
}

impl Sig {
    /// ed25519-zebra's single verification.
    fn verify_single(&self) -> bool {
        ed25519_zebra::VerificationKey::try_from(*self.key.as_bytes())
            .and_then(|k| k.verify(&self.signature, &self.message))
            .is_ok()
    }
}

/// One batch: ed25519-zebra's batch verifier, raw (coefficients from a ChaCha20 stream seeded
/// once for the whole run, the cheapest source) or through the verifier's `eddsa::verify_batch`.
struct Batch<'a> {
    chunk: &'a [Sig],
}

impl<'a> Batch<'a> {
    fn of(chunk: &'a [Sig]) -> Self {
        Self { chunk }
    }

    fn verify_raw(&self, rng: &mut ChaCha20Rng) -> bool {
        let mut v = ed25519_zebra::batch::Verifier::new();
        for s in self.chunk {
            v.queue((
                ed25519_zebra::VerificationKeyBytes::from(*s.key.as_bytes()),
                s.signature,
                s.message.as_slice(),
            ));
        }
        v.verify(rng).is_ok()
    }

    fn verify_rules(&self) -> bool {
        let items: Vec<eddsa::Item<'_>> = self
            .chunk
            .iter()
            .map(|s| eddsa::Item {
                key: &s.key,
                message: &s.message,
                signature: &s.signature,
            })
            .collect();
        eddsa::verify_batch(&items).is_ok()
    }
}

/// The same messages signed by `n` distinct keys in turn (raw batches with nothing to gather).
fn distinct_key_signatures(sigs: &[Sig], n: usize) -> Vec<Sig> {
    let keys: Vec<SigningKey> = (0..n)
        .map(|i| SigningKey::from_bytes(&[u8::try_from(i % 250).unwrap_or(0) + 1; 32]))
        .collect();
    sigs.iter()
        .zip(keys.iter().cycle())
        .map(|(s, k)| Sig {
            message: s.message.clone(),
            signature: k.sign(&s.message),
            key: PublicKey::from_verifying_key(&k.verifying_key())
                .unwrap_or_else(|e| panic!("bench key: {e}")),
        })
        .collect()
}

fn decode_all(entries: &[Vec<u8>]) -> Vec<SignedEntry> {
    entries
        .iter()
        .map(|b| SignedEntry::decode(b).unwrap_or_else(|e| panic!("decode: {e}")))
        .collect()
}

/// The signature checks of the last epoch's ordinary entries (one key).
fn last_epoch_signatures(log: &Log, decoded: &[SignedEntry]) -> Vec<Sig> {
    let start = decoded
        .iter()
        .rposition(|e| matches!(e.entry().event, Event::EpochStart { .. }))
        .unwrap_or_else(|| panic!("no epoch_start"));
    let verified = verify_log(&log.entries, log.policy.clone(), log.at)
        .unwrap_or_else(|e| panic!("the bench log must verify: {e}"));
    let key = verified
        .epochs()
        .last()
        .map(|e| PublicKey::from_verifying_key(&e.key))
        .unwrap_or_else(|| panic!("no epoch"))
        .unwrap_or_else(|e| panic!("epoch key: {e}"));
    decoded
        .iter()
        .skip(start + 1)
        .map(|e| Sig {
            message: e.signed_bytes().to_vec(),
            signature: *e.signature(),
            key,
        })
        .collect()
}

/// Back-to-back timings of several operations: each round runs every operation once, starting
/// from a different one each round, so that the load of a noisy machine falls on all of them
/// alike. Ratios of criterion medians taken minutes apart mix in the drift of that load; ratios
/// within one interleaved run do not.
struct Interleaved {
    names: Vec<&'static str>,
    /// `times[i][round]`, seconds.
    times: Vec<Vec<f64>>,
}

type Op<'a> = (&'static str, Box<dyn FnMut() -> bool + 'a>);

fn interleave(rounds: usize, mut ops: Vec<Op<'_>>) -> Interleaved {
    let k = ops.len();
    let mut times = vec![Vec::with_capacity(rounds); k];
    for round in 0..rounds {
        for j in 0..k {
            let i = (round + j) % k;
            let (name, f) = &mut ops[i];
            let start = Instant::now();
            let ok = black_box(f());
            times[i].push(start.elapsed().as_secs_f64());
            assert!(ok, "interleaved operation {name} failed");
        }
    }
    Interleaved {
        names: ops.iter().map(|(n, _)| *n).collect(),
        times,
    }
}

impl Interleaved {
    fn series(&self, name: &str) -> &[f64] {
        let i = self
            .names
            .iter()
            .position(|n| *n == name)
            .unwrap_or_else(|| panic!("no operation {name}"));
        &self.times[i]
    }

    /// Median time of `name`, seconds.
    fn median(&self, name: &str) -> f64 {
        median(self.series(name).to_vec())
    }

    /// Fastest time of `name` (the least disturbed run), seconds.
    fn min(&self, name: &str) -> f64 {
        self.series(name)
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min)
    }

    /// Median over rounds of `time(a) / time(b)`, and the ratio of the two minima.
    fn ratio(&self, a: &str, b: &str) -> (f64, f64) {
        let ratios = self
            .series(a)
            .iter()
            .zip(self.series(b))
            .map(|(x, y)| x / y)
            .collect();
        (median(ratios), self.min(a) / self.min(b))
    }
}

/// Whether the binary runs as a benchmark (`cargo bench` passes `--bench`), not as a smoke test
/// (`cargo test --all-targets` runs each benchmark once without it): the interleaved run is
/// skipped in a smoke test.
fn bench_mode() -> bool {
    std::env::args().any(|a| a == "--bench")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn bench(c: &mut Criterion) {
    let log = build_log(if bench_mode() {
        ENTRIES
    } else {
        SMOKE_TEST_ENTRIES
    });
    let one = pool(1);
    let two = pool(2);
    let decoded = decode_all(&log.entries);
    let sigs = last_epoch_signatures(&log, &decoded);
    assert!(
        sigs.iter().all(Sig::verify_single),
        "every signature must verify"
    );
    let total_bytes: usize = log.entries.iter().map(Vec::len).sum();
    let mean_message = sigs.iter().map(|s| s.message.len()).sum::<usize>() / sigs.len().max(1);
    eprintln!(
        "log bench: {} entries, {EPOCHS} epochs, {total_bytes} bytes, mean sig_structure {mean_message} \
         bytes; {} signatures of one key for the raw rates; rayon global pool {} threads",
        log.entries.len(),
        sigs.len(),
        rayon::current_num_threads()
    );

    // What `SignedEntry::decode` does, step by step (the steps of the verifier's COSE profile
    // opening and strict payload decoding, replayed with the same crates), over the last
    // epoch's ordinary entries.
    let start = log.entries.len() - sigs.len();
    let ordinary = log.entries.get(start..).unwrap_or_default();
    let opened: Vec<CoseSign1> = ordinary
        .iter()
        .map(|b| CoseSign1::from_tagged_slice(b).unwrap_or_else(|e| panic!("coset: {e}")))
        .collect();
    let payloads: Vec<Vec<u8>> = opened
        .iter()
        .map(|c| c.payload.clone().unwrap_or_default())
        .collect();
    let kid = opened
        .first()
        .map(|c| c.protected.header.key_id.clone())
        .unwrap_or_default();
    let docs: Vec<&[u8]> = decoded
        .iter()
        .filter_map(|d| match &d.entry().event {
            Event::EpochStart { attestation } => Some(attestation.as_slice()),
            _ => None,
        })
        .collect();
    let expect = Expectations {
        pcrs: log.policy.images.first().cloned().unwrap_or_default(),
        ..Expectations::default()
    };
    let canonical = |c: &CoseSign1, payload: &Vec<u8>| {
        let protected = HeaderBuilder::new()
            .algorithm(Algorithm::EdDSA)
            .content_type(ENTRY_CONTENT_TYPE.to_string())
            .key_id(kid.clone())
            .build();
        let mut expected = CoseSign1Builder::new()
            .protected(protected)
            .payload(payload.clone())
            .build();
        let tbs = expected.tbs_data(&[]);
        expected.signature = c.signature.clone();
        let bytes = expected.to_tagged_vec().unwrap_or_default();
        tbs.len() + bytes.len()
    };

    let n = log.entries.len() as u64;
    let all_batches: Vec<Batch<'_>> = sigs.chunks(SIGNATURE_BATCH).map(Batch::of).collect();
    let distinct = distinct_key_signatures(&sigs, SIGNATURE_BATCH);
    let distinct_batches: Vec<Batch<'_>> =
        distinct.chunks(SIGNATURE_BATCH).map(Batch::of).collect();
    assert!(
        all_batches.iter().all(Batch::verify_rules)
            && distinct_batches.iter().all(Batch::verify_rules),
        "every batch must verify"
    );
    if bench_mode() {
        // Rates and the breakdown from one interleaved run (see `Interleaved`), printed before
        // criterion's own figures. Every part runs on one thread.
        let verify_in = |pool: &rayon::ThreadPool| {
            pool.install(|| verify_log(&log.entries, log.policy.clone(), log.at).is_ok())
        };
        let ops: Vec<Op<'_>> = vec![
            ("log_1_thread", Box::new(|| verify_in(&one))),
            ("log_2_threads", Box::new(|| verify_in(&two))),
            ("raw_batch", {
                let mut rng = ChaCha20Rng::seed_from_u64(1);
                let batches = &all_batches;
                Box::new(move || batches.iter().all(|b| b.verify_raw(&mut rng)))
            }),
            (
                "raw_batch_2_threads",
                Box::new(|| {
                    two.install(|| {
                        all_batches
                            .par_iter()
                            .map_init(|| ChaCha20Rng::seed_from_u64(2), |rng, b| b.verify_raw(rng))
                            .all(|ok| ok)
                    })
                }),
            ),
            (
                "rules_batch",
                Box::new(|| all_batches.iter().all(Batch::verify_rules)),
            ),
            ("raw_batch_distinct_keys", {
                let mut rng = ChaCha20Rng::seed_from_u64(3);
                let batches = &distinct_batches;
                Box::new(move || batches.iter().all(|b| b.verify_raw(&mut rng)))
            }),
            (
                "decode",
                Box::new(|| log.entries.iter().all(|e| SignedEntry::decode(e).is_ok())),
            ),
            (
                "decode_reference",
                Box::new(|| {
                    log.entries
                        .iter()
                        .all(|e| SignedEntry::decode_reference(e).is_ok())
                }),
            ),
            (
                "hash_frontier",
                Box::new(|| {
                    let mut range = CompactRange::new();
                    log.entries.iter().all(|e| {
                        range
                            .push(merkle::leaf_hash(EntryHash::of(e).as_bytes()))
                            .is_ok()
                    })
                }),
            ),
            (
                "epoch_docs",
                Box::new(|| {
                    let v = AttestationVerifier::new(log.policy.anchor.clone());
                    docs.iter().all(|doc| {
                        v.verify(doc, &expect, VerifyAt::Instant(UnixMillis::from_millis(T0)))
                            .is_ok()
                    })
                }),
            ),
            (
                "coset_parse",
                Box::new(|| {
                    ordinary
                        .iter()
                        .all(|e| CoseSign1::from_tagged_slice(e).is_ok())
                }),
            ),
            (
                "coset_reencode",
                Box::new(|| {
                    opened
                        .iter()
                        .zip(&payloads)
                        .all(|(c, p)| canonical(c, p) > 0)
                }),
            ),
            (
                "payload_strict",
                Box::new(|| payloads.iter().all(|p| cbor::decode(p).is_ok())),
            ),
            (
                "payload_lenient",
                Box::new(|| payloads.iter().all(|p| cbor::decode_lenient(p).is_ok())),
            ),
            (
                "payload_one_pass",
                Box::new(|| payloads.iter().all(|p| cbor::decode_one_pass(p).is_some())),
            ),
            (
                "entry_from_payload",
                Box::new(|| payloads.iter().all(|p| Entry::from_payload(p).is_ok())),
            ),
        ];
        let run = interleave(15, ops);
        let m = sigs.len() as f64;
        let nf = n as f64;
        let per = |name: &str| {
            if matches!(
                name,
                "raw_batch"
                    | "raw_batch_2_threads"
                    | "rules_batch"
                    | "raw_batch_distinct_keys"
                    | "coset_parse"
                    | "coset_reencode"
                    | "payload_strict"
                    | "payload_lenient"
                    | "payload_one_pass"
                    | "entry_from_payload"
            ) {
                m
            } else {
                nf
            }
        };
        for name in &run.names {
            eprintln!(
                "interleaved {name:>18}: per entry median {:8.2} µs, fastest {:8.2} µs",
                run.median(name) / per(name) * 1e6,
                run.min(name) / per(name) * 1e6
            );
        }
        let (med, fastest) = run.ratio("raw_batch", "log_1_thread");
        eprintln!(
            "rate verify_log 1 thread: {:.0} entries/s (fastest {:.0}); raw ed25519-zebra batch \
             (one key) 1 thread: {:.0} signatures/s (fastest {:.0}); log / raw = {:.3} per-round \
             median, {:.3} fastest (target >= 0.9)",
            nf / run.median("log_1_thread"),
            nf / run.min("log_1_thread"),
            m / run.median("raw_batch"),
            m / run.min("raw_batch"),
            med * nf / m,
            fastest * nf / m
        );
        let (med, fastest) = run.ratio("raw_batch_distinct_keys", "log_1_thread");
        eprintln!(
            "raw ed25519-zebra batch (64 distinct keys) 1 thread: {:.0} signatures/s (fastest \
             {:.0}); log / raw distinct = {:.3} per-round median, {:.3} fastest",
            m / run.median("raw_batch_distinct_keys"),
            m / run.min("raw_batch_distinct_keys"),
            med * nf / m,
            fastest * nf / m
        );
        let (med, fastest) = run.ratio("raw_batch", "rules_batch");
        eprintln!(
            "eddsa::verify_batch (the log verifier's rules) 1 thread: {:.0} signatures/s (fastest \
             {:.0}); / raw = {med:.3} per-round median, {fastest:.3} fastest",
            m / run.median("rules_batch"),
            m / run.min("rules_batch"),
        );
        let (med, fastest) = run.ratio("log_1_thread", "log_2_threads");
        eprintln!(
            "rate verify_log 2 threads: {:.0} entries/s (fastest {:.0}); speed-up over 1 thread \
             {med:.3} per-round median, {fastest:.3} fastest",
            nf / run.median("log_2_threads"),
            nf / run.min("log_2_threads"),
        );
        let (med, fastest) = run.ratio("raw_batch", "raw_batch_2_threads");
        eprintln!(
            "raw batch 2 threads: {:.0} signatures/s (fastest {:.0}); speed-up over 1 thread \
             {med:.3} per-round median, {fastest:.3} fastest (what the machine allows)",
            m / run.median("raw_batch_2_threads"),
            m / run.min("raw_batch_2_threads"),
        );
        let parts = run.median("decode")
            + run.median("hash_frontier")
            + run.median("epoch_docs")
            + run.median("rules_batch") * (nf - docs.len() as f64) / m;
        eprintln!(
            "sum of the parts (decode, hashing and frontier, epoch documents, batch verification \
             at the eddsa::verify_batch rate) {:.3} s against verify_log on 1 thread {:.3} s: \
             {:.1}% unaccounted (linking, collecting, allocation)",
            parts,
            run.median("log_1_thread"),
            (1.0 - parts / run.median("log_1_thread")) * 100.0
        );
    }

    let mut group = c.benchmark_group("log_verify");
    group.sample_size(10);
    group.throughput(Throughput::Elements(n));
    for (name, pool) in [
        ("verify_log_1_thread", &one),
        ("verify_log_2_threads", &two),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| {
                pool.install(|| {
                    verify_log(black_box(&log.entries), log.policy.clone(), log.at).is_ok()
                })
            })
        });
    }
    group.finish();

    // Raw Ed25519 on one core (the calling thread; nothing here is parallel).
    let batches: Vec<Batch<'_>> = sigs.chunks_exact(SIGNATURE_BATCH).map(Batch::of).collect();
    let mut group = c.benchmark_group("ed25519");
    group.throughput(Throughput::Elements(SIGNATURE_BATCH as u64));
    let mut i = 0;
    let mut rng = ChaCha20Rng::seed_from_u64(4);
    group.bench_function("zebra_batch_64_1_thread", |b| {
        b.iter(|| {
            i = (i + 1) % batches.len();
            black_box(&batches[i]).verify_raw(&mut rng)
        })
    });
    let mut i = 0;
    group.bench_function("eddsa_verify_batch_64_1_thread", |b| {
        b.iter(|| {
            i = (i + 1) % batches.len();
            black_box(&batches[i]).verify_rules()
        })
    });
    group.throughput(Throughput::Elements(1));
    let mut i = 0;
    group.bench_function("eddsa_verify_single_1_thread", |b| {
        b.iter(|| {
            i = (i + 1) % sigs.len();
            let s = &sigs[i];
            s.key
                .verify(black_box(&s.message), black_box(&s.signature))
                .is_ok()
        })
    });
    group.finish();

    // Where the time goes, each part on one core over the whole log.
    let mut group = c.benchmark_group("log_parts");
    group.sample_size(10);
    group.throughput(Throughput::Elements(n));
    group.bench_function("decode_signed_entry", |b| {
        b.iter(|| {
            black_box(&log.entries)
                .iter()
                .filter(|e| SignedEntry::decode(e).is_ok())
                .count()
        })
    });
    group.bench_function("entry_hash_leaf_hash_frontier", |b| {
        b.iter(|| {
            let mut range = CompactRange::new();
            for e in black_box(&log.entries) {
                let _ = range.push(merkle::leaf_hash(EntryHash::of(e).as_bytes()));
            }
            range.root()
        })
    });
    group.bench_function("frontier_only", |b| {
        b.iter(|| {
            let mut range = CompactRange::new();
            for d in black_box(&decoded) {
                let _ = range.push(merkle::leaf_hash(d.hash().as_bytes()));
            }
            range.size()
        })
    });
    group.throughput(Throughput::Elements(sigs.len() as u64));
    group.bench_function("eddsa_verify_batch_all_last_epoch", |b| {
        b.iter(|| black_box(&all_batches).iter().all(Batch::verify_rules))
    });
    group.finish();

    let mut group = c.benchmark_group("decode_parts");
    group.sample_size(10);
    group.throughput(Throughput::Elements(ordinary.len() as u64));
    group.bench_function("signed_entry_decode", |b| {
        b.iter(|| {
            black_box(ordinary)
                .iter()
                .filter(|e| SignedEntry::decode(e).is_ok())
                .count()
        })
    });
    group.bench_function("signed_entry_decode_reference", |b| {
        b.iter(|| {
            black_box(ordinary)
                .iter()
                .filter(|e| SignedEntry::decode_reference(e).is_ok())
                .count()
        })
    });
    group.bench_function("coset_from_tagged_slice", |b| {
        b.iter(|| {
            black_box(ordinary)
                .iter()
                .filter(|e| CoseSign1::from_tagged_slice(e).is_ok())
                .count()
        })
    });
    group.bench_function("coset_canonical_reencode_and_tbs", |b| {
        b.iter(|| {
            black_box(&opened)
                .iter()
                .zip(&payloads)
                .map(|(c, payload)| canonical(c, payload))
                .sum::<usize>()
        })
    });
    group.bench_function("payload_cbor_decode_strict", |b| {
        b.iter(|| {
            black_box(&payloads)
                .iter()
                .filter(|p| cbor::decode(p).is_ok())
                .count()
        })
    });
    group.bench_function("payload_cbor_decode_one_pass", |b| {
        b.iter(|| {
            black_box(&payloads)
                .iter()
                .filter(|p| cbor::decode_one_pass(p).is_some())
                .count()
        })
    });
    group.bench_function("payload_cbor_decode_lenient", |b| {
        b.iter(|| {
            black_box(&payloads)
                .iter()
                .filter(|p| cbor::decode_lenient(p).is_ok())
                .count()
        })
    });
    group.bench_function("entry_from_payload", |b| {
        b.iter(|| {
            black_box(&payloads)
                .iter()
                .filter(|p| Entry::from_payload(p).is_ok())
                .count()
        })
    });
    group.bench_function("sha256_entry_bytes", |b| {
        b.iter(|| {
            black_box(ordinary)
                .iter()
                .map(|e| EntryHash::of(e).as_bytes()[0])
                .fold(0u8, u8::wrapping_add)
        })
    });
    group.finish();

    // The two epoch documents (the log verifier checks each once; the second reuses the
    // cached CA chain).
    let mut group = c.benchmark_group("log_parts");
    group.throughput(Throughput::Elements(1));
    let mut i = 0;
    group.bench_function("epoch_document_cold", |b| {
        b.iter(|| {
            i = (i + 1) % docs.len();
            verify_attestation(
                black_box(docs[i]),
                &log.policy.anchor,
                &expect,
                VerifyAt::Instant(UnixMillis::from_millis(T0)),
            )
            .is_ok()
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
