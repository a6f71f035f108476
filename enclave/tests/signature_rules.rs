//! Issue 9 item 2 through the log paths: a log whose epoch key signed its entries with a
//! small-order component in `R` (orders 2, 4 and 8) gets ONE verdict, [`RUNS`] runs each, from
//! `verify_log`, from the streaming verifier fed in rounds of every size (one entry per round:
//! every batch a single signature), from the enclave's boot replay, and from the auditor's
//! `attestplane-verify log` on the export. Every entry from the crafted one on carries the
//! torsion, so each run of a path gives 60 or 10 crafted signatures a verdict: over 1,000 per
//! path and order (the CLI's 20 runs: 1,200). Before, the log verifier's batches were cofactorless
//! with random coefficients, so such a log verified in some runs and not in others, and an
//! enclave at boot and an auditor could disagree about it. A non-canonical `s`, an epoch key
//! of small order and an epoch key with a small-order component are refused by every path.
//!
//! The logs are built by hand (as in `log_tamper.rs`) with epoch documents from the mock NSM
//! binding the test's own epoch key, signed with the crafted signers of
//! `verifier/tests/support/torsion.rs`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

#[path = "../../verifier/tests/support/torsion.rs"]
mod torsion;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use attestplane_enclave::nsm::{MockNsm, Nsm};
use attestplane_enclave::service::Enclave;
use attestplane_proto::{ByteBuf, Request, Response};
use attestplane_verifier::entry::{Entry, EntryHash, EpochBinding, Event, KeyId};
use attestplane_verifier::log::{LogError, LogVerifier, verify_log};
use attestplane_verifier::merkle::{self, CompactRange};
use common::*;
use ed25519_dalek::ed25519::signature::{Error as SignatureError, Signer};
use ed25519_dalek::{Signature, VerifyingKey};
use torsion::{
    SmallOrderKeyForger, TorsionSigner, order_of, residual, torsion_point, with_non_canonical_s,
};

/// Runs per path. Each run checks the epoch's attestation document again (five P-384
/// signatures), so the log paths run fewer times than the library-level tests of
/// `verifier/tests/signature_rules.rs` (1,000). The old verifier accepted a signature of
/// torsion order `n` in a run with probability `1/n` only, so it passes 100 runs with
/// probability at most `2^-100`.
const RUNS: usize = 100;
/// Runs of the CLI (a process each).
const CLI_RUNS: usize = 20;
const ORDERS: [u64; 3] = [2, 4, 8];
/// Entries in each test log: two signature batches, one full (64) and one partial.
const LOG_LEN: usize = 100;

/// Which entry gets the crafted signature, and how.
#[derive(Clone, Copy, Debug)]
enum Craft {
    /// Nothing: an ordinary log.
    None,
    /// `R` of every entry from `seq` on carries a torsion point of order `order`.
    TorsionR { seq: usize, order: u64 },
    /// Entry `seq` carries `s + l` instead of `s`.
    NonCanonicalS { seq: usize },
}

/// Signs with `plain`, except that the entry `craft` names is signed by `crafted`, or its
/// signature altered.
struct LogSigner {
    plain: TorsionSigner,
    crafted: Option<TorsionSigner>,
    non_canonical: bool,
}

impl Signer<Signature> for LogSigner {
    fn try_sign(&self, message: &[u8]) -> Result<Signature, SignatureError> {
        let signature = match &self.crafted {
            Some(c) => c.sign_message(message),
            None => self.plain.sign_message(message),
        };
        Ok(if self.non_canonical {
            with_non_canonical_s(&signature)
        } else {
            signature
        })
    }
}

/// A log of [`LOG_LEN`] entries in one epoch (epoch start, genesis, checkpoints) attested by
/// `nsm` for the epoch key `key`; `sign(seq)` signs entry `seq`.
fn build_log<S: Signer<Signature>>(
    nsm: &MockNsm,
    key: [u8; 32],
    admin: [u8; 32],
    sign: impl Fn(usize) -> S,
) -> Vec<Vec<u8>> {
    let kid = KeyId::of(&VerifyingKey::from_bytes(&key).unwrap());
    let mut entries = Vec::with_capacity(LOG_LEN);
    let mut head = EntryHash::ZERO;
    let mut frontier = CompactRange::new();
    for seq in 0..LOG_LEN {
        let event = match seq {
            0 => {
                let binding = EpochBinding {
                    epoch: 0,
                    seq: 0,
                    prev: EntryHash::ZERO,
                };
                let doc = nsm
                    .attest(Some(binding.encode().unwrap()), None, Some(key.to_vec()))
                    .unwrap();
                Event::EpochStart { attestation: doc }
            }
            1 => Event::Genesis {
                admin_keys: vec![admin],
                host_chosen: false,
            },
            _ => Event::Checkpoint {
                size: seq as u64,
                root: *frontier.root().as_bytes(),
            },
        };
        let entry = Entry {
            seq: seq as u64,
            prev: head,
            epoch: 0,
            time: at(10 * seq as u64),
            event,
        };
        let bytes = entry.sign(&kid, &sign(seq)).unwrap();
        head = EntryHash::of(&bytes);
        frontier.push(merkle::leaf_hash(head.as_bytes())).unwrap();
        entries.push(bytes);
    }
    entries
}

/// A log under an epoch key of prime order, with `craft` applied.
fn crafted_log(nsm: &MockNsm, craft: Craft) -> Vec<Vec<u8>> {
    let plain = TorsionSigner::new(77, torsion_point(1));
    let key = plain.public();
    build_log(nsm, key, Admin::new(1).public(), |seq| {
        let (crafted, non_canonical) = match craft {
            Craft::TorsionR { seq: s, order } if seq >= s => {
                (Some(TorsionSigner::new(77, torsion_point(order))), false)
            }
            Craft::NonCanonicalS { seq: s } if s == seq => (None, true),
            _ => (None, false),
        };
        LogSigner {
            plain: plain.clone(),
            crafted,
            non_canonical,
        }
    })
}

/// Where the verifier checks the log: a minute after its last entry.
fn verify_at() -> attestplane_verifier::UnixMillis {
    at(10 * LOG_LEN as u64 + MINUTE_MS)
}

/// The verdict of `verify_log`: the size, or the first bad entry and why.
fn in_memory(nsm: &MockNsm, log: &[Vec<u8>]) -> Result<u64, (Option<u64>, String)> {
    verify_log(log, log_policy(nsm), verify_at())
        .map(|l| l.size())
        .map_err(|e| (e.seq(), e.to_string()))
}

/// The verdict of the streaming verifier fed rounds of `round` entries.
fn in_rounds(nsm: &MockNsm, log: &[Vec<u8>], round: usize) -> Result<u64, (Option<u64>, String)> {
    let run = || -> Result<u64, LogError> {
        let mut v = LogVerifier::new(log_policy(nsm), verify_at())?;
        for chunk in log.chunks(round) {
            v.verify_round(chunk)?;
        }
        v.finish().map(|l| l.size())
    };
    run().map_err(|e| (e.seq(), e.to_string()))
}

/// The verdict of the enclave's boot replay: every entry in one `ReplayEntries` (so its
/// verifier batches them 64 at a time); `Ok` when it acknowledges them.
fn boot_replay(nsm: &Arc<MockNsm>, log: &[Vec<u8>]) -> Result<(), (Option<u64>, String)> {
    // An enclave whose image pins the log's genesis admin key, as in production.
    let mut enclave =
        Enclave::new(nsm.clone(), config(nsm)).with_pinned_genesis(vec![Admin::new(1).public()]);
    let now = verify_at();
    let mut send = |id: u64, r: Request| {
        let mut replies = enclave.handle(id, r, now);
        assert_eq!(replies.len(), 1);
        replies.remove(0).1
    };
    let begin = send(
        1,
        Request::ReplayBegin {
            genesis_admin_keys: vec![],
            total_entries: log.len() as u64,
        },
    );
    assert_eq!(begin, Response::Ack);
    match send(
        2,
        Request::ReplayEntries {
            entries: log.iter().map(|e| ByteBuf::from(e.clone())).collect(),
        },
    ) {
        Response::Ack => Ok(()),
        Response::BrokenLog { seq, message } => Err((seq, message)),
        other => panic!("unexpected reply to the replay: {other:?}"),
    }
}

/// The auditor's files for logs attested by `nsm`, in `dir`.
struct Cli {
    binary: PathBuf,
    pcrs: PathBuf,
    root: PathBuf,
    dir: PathBuf,
}

impl Cli {
    fn new(nsm: &MockNsm, dir: &Path) -> Option<Self> {
        let binary = verifier_binary()?;
        let pcrs: serde_json::Map<String, serde_json::Value> = image_pcrs(nsm)
            .into_iter()
            .map(|(i, p)| (format!("PCR{i}"), p.to_hex().into()))
            .collect();
        let pcrs_path = dir.join("pcrs.json");
        std::fs::write(&pcrs_path, serde_json::to_string(&pcrs).unwrap()).unwrap();
        let root = dir.join("root.pem");
        std::fs::write(&root, nsm.root_pem().unwrap()).unwrap();
        Some(Self {
            binary,
            pcrs: pcrs_path,
            root,
            dir: dir.to_path_buf(),
        })
    }

    /// Writes the export; returns its path.
    fn export(&self, name: &str, log: &[Vec<u8>]) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::write(&path, log.concat()).unwrap();
        path
    }

    /// `attestplane-verify log EXPORT … --json`: the exit code and the first bad sequence
    /// number it reports.
    fn verify(&self, export: &Path) -> (Option<i32>, serde_json::Value) {
        let out = Command::new(&self.binary)
            .arg("log")
            .arg(export)
            .arg("--pcrs")
            .arg(&self.pcrs)
            .arg("--root")
            .arg(&self.root)
            .arg("--genesis-admin-key")
            .arg(
                Admin::new(1)
                    .public()
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>(),
            )
            .arg("--at")
            .arg(verify_at().as_millis().to_string())
            .arg("--json")
            .output()
            .unwrap();
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.code(), report["first_bad_seq"].clone())
    }
}

#[test]
fn torsion_in_r_gets_one_verdict_from_verify_log_every_run() {
    let nsm = enclave_nsm();
    for order in ORDERS {
        // In the full first batch, and in the partial second one.
        for seq in [40, 90] {
            let log = crafted_log(&nsm, Craft::TorsionR { seq, order });
            for run in 0..RUNS {
                assert_eq!(
                    in_memory(&nsm, &log),
                    Ok(LOG_LEN as u64),
                    "order {order}, entry {seq}, run {run}"
                );
            }
        }
    }
}

#[test]
fn torsion_in_r_gets_one_verdict_from_rounds_of_every_size() {
    // Rounds of one entry make every batch a single signature; rounds of 7 and 33 mix the
    // crafted signature with others at other offsets.
    let nsm = enclave_nsm();
    for order in ORDERS {
        let log = crafted_log(&nsm, Craft::TorsionR { seq: 40, order });
        for run in 0..RUNS {
            for round in [1, 7, 33] {
                assert_eq!(
                    in_rounds(&nsm, &log, round),
                    Ok(LOG_LEN as u64),
                    "order {order}, rounds of {round}, run {run}"
                );
            }
        }
    }
}

#[test]
fn torsion_in_r_gets_one_verdict_from_the_enclave_boot_replay() {
    let nsm = enclave_nsm();
    for order in ORDERS {
        let log = crafted_log(&nsm, Craft::TorsionR { seq: 40, order });
        for run in 0..RUNS {
            assert_eq!(boot_replay(&nsm, &log), Ok(()), "order {order}, run {run}");
        }
        // And the whole boot: the enclave serves on that log and continues it (on an NSM of
        // its own: the harness moves its clock).
        let h = Harness::boot(enclave_nsm(), log, &[Admin::new(1).public()], verify_at())
            .unwrap_or_else(|(r, _)| panic!("order {order}: boot refused: {r:?}"));
        assert!(h.enclave.is_ready());
        assert!(h.store.len() > LOG_LEN);
    }
}

#[test]
fn torsion_in_r_gets_one_verdict_from_the_cli() {
    let nsm = enclave_nsm();
    let dir = tempfile::tempdir().unwrap();
    let Some(cli) = Cli::new(&nsm, dir.path()) else {
        eprintln!(
            "SKIPPED: attestplane-verify is not built next to this test; run `cargo test --workspace`"
        );
        return;
    };
    // One export per order, every run of the auditor's binary the same answer.
    let exports: Vec<(u64, PathBuf)> = ORDERS
        .iter()
        .map(|&order| {
            let log = crafted_log(&nsm, Craft::TorsionR { seq: 40, order });
            (order, cli.export(&format!("torsion-{order}.cbor"), &log))
        })
        .collect();
    // The runs go on two threads (each a process of its own).
    std::thread::scope(|scope| {
        for half in 0..2 {
            let (cli, exports) = (&cli, &exports);
            scope.spawn(move || {
                for run in (half..CLI_RUNS).step_by(2) {
                    for (order, export) in exports {
                        let (code, first_bad) = cli.verify(export);
                        assert_eq!(
                            (code, first_bad),
                            (Some(0), serde_json::Value::Null),
                            "order {order}, run {run}"
                        );
                    }
                }
            });
        }
    });
}

#[test]
fn non_canonical_s_is_refused_by_every_log_path() {
    let nsm = enclave_nsm();
    let dir = tempfile::tempdir().unwrap();
    let cli = Cli::new(&nsm, dir.path());
    for seq in [40usize, 90] {
        let log = crafted_log(&nsm, Craft::NonCanonicalS { seq });
        let bad = Some(seq as u64);
        for run in 0..100 {
            assert_eq!(
                in_memory(&nsm, &log).map_err(|e| e.0),
                Err(bad),
                "run {run}"
            );
            assert_eq!(
                in_rounds(&nsm, &log, 1).map_err(|e| e.0),
                Err(bad),
                "run {run}"
            );
            assert_eq!(
                boot_replay(&nsm, &log).map_err(|e| e.0),
                Err(bad),
                "run {run}"
            );
        }
        assert!(matches!(
            verify_log(&log, log_policy(&nsm), verify_at()),
            Err(LogError::BadSignature { .. })
        ));
        if let Some(cli) = &cli {
            let export = cli.export("non-canonical-s.cbor", &log);
            assert_eq!(cli.verify(&export), (Some(1), serde_json::json!(seq)));
        }
    }
}

#[test]
fn small_order_epoch_key_is_refused_by_every_log_path() {
    let nsm = enclave_nsm();
    let dir = tempfile::tempdir().unwrap();
    let cli = Cli::new(&nsm, dir.path());
    for t in torsion::torsion_points() {
        // Anyone can sign for such a key: the forger has no secret at all.
        let forger = SmallOrderKeyForger::new(&t);
        let log = build_log(&nsm, forger.public(), Admin::new(1).public(), |_| {
            forger.clone()
        });
        assert!(matches!(
            verify_log(&log, log_policy(&nsm), verify_at()),
            Err(LogError::EpochKeyRefused { seq: 0, .. })
        ));
        assert_eq!(in_rounds(&nsm, &log, 1).map_err(|e| e.0), Err(Some(0)));
        assert_eq!(boot_replay(&nsm, &log).map_err(|e| e.0), Err(Some(0)));
        if let Some(cli) = &cli {
            let export = cli.export("small-order-key.cbor", &log);
            assert_eq!(cli.verify(&export), (Some(1), serde_json::json!(0)));
        }
    }
}

#[test]
fn epoch_key_with_a_torsion_component_is_refused_by_every_log_path() {
    let nsm = enclave_nsm();
    let dir = tempfile::tempdir().unwrap();
    let cli = Cli::new(&nsm, dir.path());
    for order in ORDERS {
        let signer = TorsionSigner::with_key_torsion(5, torsion_point(1), torsion_point(order));
        let log = build_log(&nsm, signer.public(), Admin::new(1).public(), |_| {
            signer.clone()
        });
        assert!(matches!(
            verify_log(&log, log_policy(&nsm), verify_at()),
            Err(LogError::EpochKeyRefused { seq: 0, .. })
        ));
        assert_eq!(boot_replay(&nsm, &log).map_err(|e| e.0), Err(Some(0)));
        if let Some(cli) = &cli {
            let export = cli.export("mixed-order-key.cbor", &log);
            assert_eq!(cli.verify(&export), (Some(1), serde_json::json!(0)));
        }
    }
}

/// [`crafted_log`]'s log, with each entry's signed message (the bytes `Entry::sign` handed its
/// signer) and signature, recorded while building it.
type Signed = Vec<(Vec<u8>, Signature)>;
fn signed_messages(nsm: &MockNsm, craft: Craft) -> (Vec<Vec<u8>>, Signed) {
    struct Recording<'a> {
        inner: LogSigner,
        out: &'a std::cell::RefCell<Vec<(Vec<u8>, Signature)>>,
    }
    impl Signer<Signature> for Recording<'_> {
        fn try_sign(&self, message: &[u8]) -> Result<Signature, SignatureError> {
            let signature = self.inner.try_sign(message)?;
            self.out.borrow_mut().push((message.to_vec(), signature));
            Ok(signature)
        }
    }
    let plain = TorsionSigner::new(77, torsion_point(1));
    let out = std::cell::RefCell::new(Vec::new());
    let log = build_log(nsm, plain.public(), Admin::new(1).public(), |seq| {
        Recording {
            inner: LogSigner {
                plain: plain.clone(),
                crafted: match craft {
                    Craft::TorsionR { seq: s, order } if seq >= s => {
                        Some(TorsionSigner::new(77, torsion_point(order)))
                    }
                    _ => None,
                },
                non_canonical: false,
            },
            out: &out,
        }
    });
    (log, out.into_inner())
}

#[test]
fn the_crafted_logs_differ_from_an_ordinary_one_only_in_the_signature() {
    // A control: the ordinary log verifies everywhere, so the verdicts above are about the
    // crafted signatures and nothing else; and the crafted entries really are the attack:
    // `[s]B − R − [k]A` is a torsion point of the order named (so a cofactorless check refuses
    // each one alone, and accepted a batch of them in some runs only), the others are exact.
    let nsm = enclave_nsm();
    let log = crafted_log(&nsm, Craft::None);
    assert_eq!(in_memory(&nsm, &log), Ok(LOG_LEN as u64));
    assert_eq!(boot_replay(&nsm, &log), Ok(()));
    let key = TorsionSigner::new(77, torsion_point(1));
    for order in ORDERS {
        let crafted = crafted_log(&nsm, Craft::TorsionR { seq: 40, order });
        assert_eq!(crafted[..40], log[..40]);
        for seq in 40..LOG_LEN {
            assert_ne!(crafted[seq], log[seq], "order {order}, entry {seq}");
        }
        let (recorded, signed) = signed_messages(&nsm, Craft::TorsionR { seq: 40, order });
        assert_eq!(recorded, crafted);
        assert_eq!(signed.len(), LOG_LEN);
        for (seq, (message, signature)) in signed.iter().enumerate() {
            let t = -residual(&key.public(), message, signature);
            let want = if seq >= 40 { order } else { 1 };
            assert_eq!(order_of(&t), want, "order {order}, entry {seq}");
            assert_eq!(
                key.verifying_key()
                    .verify_strict(message, signature)
                    .is_ok(),
                seq < 40,
                "order {order}, entry {seq}"
            );
        }
    }
}
