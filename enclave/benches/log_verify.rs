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
//! - `ed25519`: the raw rates on one core over the log's own messages (COSE Sig_structures),
//!   signatures and key: `verify_batch` over batches of [`SIGNATURE_BATCH`], and single
//!   `verify_strict`. Target: log verification per core ≥ 0.9 × the raw batch rate.
//! - `log_parts`: the other work `verify_log` does per entry, each on one core over the whole
//!   log (decode, hashing and the Merkle frontier, the small-order check on `R`, copying the
//!   signed bytes), plus the two epoch documents' attestation checks, to say where any time
//!   above the batch verification goes.
//!
//! Run: `cargo bench -p attestplane-enclave --bench log_verify`.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Instant;

use attestplane_enclave::nsm::{Clock, MockNsm, Nsm};
use attestplane_enclave::writer::{Head, LogWriter};
use attestplane_verifier::UnixMillis;
use attestplane_verifier::attestation::{
    Expectations, Pcr, PcrIndex, TrustAnchor, VerifyAt, verify_attestation,
};
use attestplane_verifier::entry::{EntryHash, Event, SignedEntry};
use attestplane_verifier::log::{LogPolicy, SIGNATURE_BATCH, verify_log};
use attestplane_verifier::merkle::{self, CompactRange};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ed25519_dalek::{Signature, VerifyingKey};

/// 2026-11-22T00:00:00Z.
const T0: u64 = 1_795_305_600_000;
const ORIGIN: &str = "attestplane.bench/log";
const ENTRIES: usize = 20_000;
const EPOCHS: usize = 2;

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

fn build_log() -> Log {
    let nsm = MockNsm::builder([7; 32], Clock::Fixed(UnixMillis::from_millis(T0))).build();
    let now = UnixMillis::from_millis(T0);
    let per_epoch = ENTRIES / EPOCHS;
    let mut entries = Vec::with_capacity(ENTRIES);
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
    key: VerifyingKey,
}

/// One `verify_batch` call's inputs.
struct Batch<'a> {
    messages: Vec<&'a [u8]>,
    signatures: Vec<Signature>,
    keys: Vec<VerifyingKey>,
}

impl<'a> Batch<'a> {
    fn of(chunk: &'a [Sig]) -> Self {
        Self {
            messages: chunk.iter().map(|s| s.message.as_slice()).collect(),
            signatures: chunk.iter().map(|s| s.signature).collect(),
            keys: chunk.iter().map(|s| s.key).collect(),
        }
    }

    fn verify(&self) -> bool {
        ed25519_dalek::verify_batch(&self.messages, &self.signatures, &self.keys).is_ok()
    }
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
        .map(|e| e.key)
        .unwrap_or_else(|| panic!("no epoch"));
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

/// Times `a` and `b` back to back, `rounds` times (alternating which goes first), and returns
/// the medians of `time(a) / time(b)`, of `time(a)` and of `time(b)`. On a noisy machine a
/// ratio of two criterion medians taken minutes apart mixes in the load's drift; pairs taken
/// back to back do not.
fn paired(rounds: usize, mut a: impl FnMut() -> bool, mut b: impl FnMut() -> bool) -> Paired {
    let mut ta = Vec::with_capacity(rounds);
    let mut tb = Vec::with_capacity(rounds);
    let mut ratios = Vec::with_capacity(rounds);
    let time = |f: &mut dyn FnMut() -> bool| {
        let start = Instant::now();
        assert!(black_box(f()), "a paired measurement failed");
        start.elapsed().as_secs_f64()
    };
    for round in 0..rounds {
        let (x, y) = if round % 2 == 0 {
            let x = time(&mut a);
            (x, time(&mut b))
        } else {
            let y = time(&mut b);
            (time(&mut a), y)
        };
        ta.push(x);
        tb.push(y);
        ratios.push(x / y);
    }
    Paired {
        ratio: median(&mut ratios),
        a: median(&mut ta),
        b: median(&mut tb),
    }
}

struct Paired {
    ratio: f64,
    a: f64,
    b: f64,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn bench(c: &mut Criterion) {
    let log = build_log();
    let one = pool(1);
    let two = pool(2);
    let decoded = decode_all(&log.entries);
    let sigs = last_epoch_signatures(&log, &decoded);
    assert!(
        sigs.iter()
            .all(|s| s.key.verify_strict(&s.message, &s.signature).is_ok()),
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

    let n = log.entries.len() as u64;
    // Rates from back-to-back pairs (see `paired`), printed before criterion's own figures.
    let all_batches: Vec<Batch<'_>> = sigs.chunks(SIGNATURE_BATCH).map(Batch::of).collect();
    let m = sigs.len() as f64;
    let rounds = 7;
    let log_1 = || one.install(|| verify_log(&log.entries, log.policy.clone(), log.at).is_ok());
    let log_2 = || two.install(|| verify_log(&log.entries, log.policy.clone(), log.at).is_ok());
    let raw = || all_batches.iter().all(Batch::verify);
    let p = paired(rounds, log_1, raw);
    eprintln!(
        "paired: verify_log on 1 thread {:.0} entries/s, raw verify_batch on 1 thread {:.0} \
         signatures/s; ratio {:.3} (target >= 0.9)",
        n as f64 / p.a,
        m / p.b,
        (n as f64 / m) / p.ratio
    );
    let p = paired(rounds, log_2, log_1);
    eprintln!(
        "paired: verify_log on 2 threads {:.0} entries/s, on 1 thread {:.0} entries/s; \
         speed-up {:.3}",
        n as f64 / p.a,
        n as f64 / p.b,
        1.0 / p.ratio
    );

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
    group.bench_function("verify_batch_64_1_thread", |b| {
        b.iter(|| {
            i = (i + 1) % batches.len();
            black_box(&batches[i]).verify()
        })
    });
    group.throughput(Throughput::Elements(1));
    let mut i = 0;
    group.bench_function("verify_strict_1_thread", |b| {
        b.iter(|| {
            i = (i + 1) % sigs.len();
            let s = &sigs[i];
            s.key
                .verify_strict(black_box(&s.message), black_box(&s.signature))
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
    group.bench_function("r_small_order_check", |b| {
        b.iter(|| {
            black_box(&decoded)
                .iter()
                .filter(|d| {
                    VerifyingKey::from_bytes(d.signature().r_bytes()).is_ok_and(|r| !r.is_weak())
                })
                .count()
        })
    });
    group.bench_function("copy_signed_bytes", |b| {
        b.iter(|| {
            black_box(&decoded)
                .iter()
                .map(|d| d.signed_bytes().to_vec())
                .map(|v| v.len())
                .sum::<usize>()
        })
    });
    group.throughput(Throughput::Elements(sigs.len() as u64));
    group.bench_function("verify_batch_all_last_epoch", |b| {
        b.iter(|| black_box(&all_batches).iter().all(Batch::verify))
    });
    group.finish();

    // The two epoch documents (the log verifier checks each once; the second reuses the
    // cached CA chain).
    let docs: Vec<&[u8]> = decoded
        .iter()
        .filter_map(|d| match &d.entry().event {
            Event::EpochStart { attestation } => Some(attestation.as_slice()),
            _ => None,
        })
        .collect();
    let expect = Expectations {
        pcrs: log.policy.pcrs.clone(),
        ..Expectations::default()
    };
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
