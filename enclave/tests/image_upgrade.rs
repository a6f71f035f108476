//! Image upgrades (docs/design.md, "Genesis and upgrades"): a new image's epochs are accepted only
//! after an accepted `allow_image` admin act earlier in the log allowed its PCRs, by the
//! enclave's boot and by the auditor's replay (the one `Replay` loop both run), and by the
//! `attestplane-verify log` binary when it is built next to this test.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use attestplane_enclave::nsm::MockNsm;
use attestplane_enclave::service::Enclave;
use attestplane_enclave::writer::{Head, LogWriter};
use attestplane_proto::Response;
use attestplane_verifier::UnixMillis;
use attestplane_verifier::admin::{AdminAction, PcrHex};
use attestplane_verifier::attestation::{Pcr, PcrIndex};
use attestplane_verifier::entry::EntryHash;
use attestplane_verifier::log::{LogError, LogVerifier, ROUND, verify_log};
use attestplane_verifier::replay::{Replay, ReplayError, ReplayedLog};
use common::*;

fn allow(nsm: &MockNsm) -> AdminAction {
    AdminAction::AllowImage {
        pcrs: image_pcrs(nsm)
            .into_iter()
            .map(|(i, p)| (i, PcrHex(p)))
            .collect(),
    }
}

/// An enclave of `nsm`'s image that pins `pinned` (the image that started the log) besides
/// its own.
fn boot_pinned(
    nsm: &Arc<MockNsm>,
    pinned: &MockNsm,
    store: Vec<Vec<u8>>,
    now: UnixMillis,
) -> Result<Harness, Response> {
    let enclave =
        Enclave::new(nsm.clone(), config(nsm)).with_pinned_images(vec![image_pcrs(pinned)]);
    Harness::boot_enclave(enclave, nsm.clone(), store, &[], now).map_err(|(r, _)| r)
}

/// The auditor's replay (what `attestplane-verify log` runs) over `store` in one round,
/// pinning only `pinned`'s image.
fn audit(store: &[Vec<u8>], pinned: &MockNsm, now: UnixMillis) -> Result<ReplayedLog, ReplayError> {
    let mut replay = Replay::new(log_policy(pinned), now, server_anchor())?;
    replay.push_round(store)?;
    replay.finish()
}

/// What a host running `image` on the stored log writes: that image's epoch after the head.
fn host_runs_image(image: &MockNsm, store: &[Vec<u8>], now: UnixMillis) -> Vec<u8> {
    let mut v = LogVerifier::new(
        attestplane_verifier::log::LogPolicy::with_images(
            log_policy(image).anchor,
            vec![image_pcrs(image), image_pcrs(&enclave_nsm())],
        ),
        now,
    )
    .unwrap();
    v.verify_round(store).unwrap();
    let head = Head {
        size: v.verified(),
        hash: v.head().unwrap_or(EntryHash::ZERO),
        epoch: v.current_epoch(),
        time: v.last_time().unwrap(),
        frontier: v.frontier().clone(),
    };
    image.set_time(now);
    let (_, start) = LogWriter::open(image, head, ORIGIN, now).unwrap();
    start.bytes
}

fn broken_at(reply: Result<Harness, Response>) -> (Option<u64>, String) {
    match reply {
        Err(Response::BrokenLog { seq, message }) => (seq, message),
        Err(other) => panic!("expected BrokenLog, got {other:?}"),
        Ok(_) => panic!("the enclave booted"),
    }
}

fn image_not_allowed(result: Result<ReplayedLog, ReplayError>) -> (u64, BTreeMap<PcrIndex, Pcr>) {
    match result {
        Err(ReplayError::Log(LogError::ImageNotAllowed { seq, pcrs })) => (seq, pcrs),
        Err(other) => panic!("expected ImageNotAllowed, got {other}"),
        Ok(_) => panic!("the auditor accepted an unannounced image"),
    }
}

#[test]
fn image_a_then_allow_b_then_an_epoch_under_b_is_accepted() {
    let admin = Admin::new(1);
    let a = enclave_nsm();
    let b = other_image_nsm(7);
    let mut h = Harness::new(&[&admin]);
    h.advance(1_000);
    let allowed_at = h.admin_ok(&admin, allow(&b));

    // The upgraded image pins the one that started the log and finds itself allowed.
    h.advance(1_000);
    let mut hb = boot_pinned(&b, &a, h.store.clone(), h.now)
        .unwrap_or_else(|r| panic!("image B refused an upgrade the log allows: {r:?}"));
    let b_epoch = allowed_at + 1;
    assert_eq!(decode(&hb.store[b_epoch as usize]).epoch, 1);
    hb.advance(1_000);
    // (A fresh harness counts nonces from zero again: pick one the log has not seen.)
    let request = admin.sign(
        &hb.deployment(),
        hb.now,
        [0x42; 16],
        AdminAction::SetPolicy {
            text: STARTER_POLICY.into(),
        },
    );
    let (accepted, _, reason) = hb.admin_bytes(request);
    assert!(accepted, "{reason:?}");

    // The allow act and B's epoch in one round of the auditor's replay, pinning only A.
    assert!(hb.store.len() < ROUND);
    let replayed = audit(&hb.store, &a, hb.now)
        .unwrap_or_else(|e| panic!("the auditor refused the allowed upgrade: {e}"));
    let images: Vec<_> = replayed
        .log
        .epochs()
        .iter()
        .map(|e| e.image.clone())
        .collect();
    assert_eq!(images, vec![image_pcrs(&a), image_pcrs(&b)]);
    assert_eq!(replayed.state.snapshot().allowed_images.len(), 1);

    // Image A, booted again on the upgraded log, accepts B's epoch too.
    hb.advance(1_000);
    Harness::boot(a.clone(), hb.store.clone(), &[], hb.now)
        .unwrap_or_else(|(r, _)| panic!("image A refused B's allowed epoch: {r:?}"));

    // Signatures alone (no fold) cannot know what the log allowed: B is refused there.
    assert!(matches!(
        verify_log(&hb.store, log_policy(&a), hb.now),
        Err(LogError::ImageNotAllowed { seq, .. }) if seq == b_epoch
    ));

    if let Some(bin) = verify_bin() {
        let (code, out) = run_cli(&bin, &hb.store, &a, hb.now);
        assert_eq!(code, Some(0), "{out}");
    }
}

#[test]
fn unannounced_image_c_is_refused_by_the_booting_enclave_and_the_auditor() {
    let admin = Admin::new(1);
    let a = enclave_nsm();
    let b = other_image_nsm(7);
    let c = other_image_nsm(9);
    let mut h = Harness::new(&[&admin]);
    h.advance(1_000);
    h.admin_ok(&admin, allow(&b));
    h.advance(1_000);

    // An enclave of image C, even one that pins A, does not continue a log that never allowed C.
    let (seq, message) = broken_at(boot_pinned(&c, &a, h.store.clone(), h.now));
    assert_eq!(seq, Some(h.store.len() as u64));
    assert!(message.contains("neither pinned nor allowed"), "{message}");

    // The host runs C anyway and stores its epoch: the enclave of A stops at it.
    let mut store = h.store.clone();
    let c_epoch = store.len() as u64;
    store.push(host_runs_image(&c, &store, h.now));
    let (seq, message) =
        broken_at(Harness::boot(a.clone(), store.clone(), &[], h.now).map_err(|(r, _)| r));
    assert_eq!(seq, Some(c_epoch));
    assert!(
        message.contains(&image_pcrs(&c)[&PcrIndex::IMAGE].to_hex()),
        "{message}"
    );

    // So does the auditor, naming C's PCRs.
    let (seq, pcrs) = image_not_allowed(audit(&store, &a, h.now));
    assert_eq!(seq, c_epoch);
    assert_eq!(pcrs, image_pcrs(&c));

    if let Some(bin) = verify_bin() {
        let (code, out) = run_cli(&bin, &store, &a, h.now);
        assert_eq!(code, Some(1), "{out}");
        assert!(
            out.contains(&format!("\"first_bad_seq\":{c_epoch}")),
            "{out}"
        );
    }
}

#[test]
fn refused_allow_image_acts_allow_nothing() {
    let admin = Admin::new(1);
    let intruder = Admin::new(2);
    let a = enclave_nsm();
    let b = other_image_nsm(7);
    let mut h = Harness::new(&[&admin]);
    h.advance(1_000);
    // Signed by a key that is not an admin key, and an admin's request with its signature
    // flipped: both logged as refused.
    let by_intruder = h.signed(&intruder, allow(&b));
    assert!(!h.admin_bytes(by_intruder).0);
    let mut forged = h.signed(&admin, allow(&b));
    let last = forged.len() - 1;
    forged[last] ^= 1;
    let (accepted, _, reason) = h.admin_bytes(forged);
    assert!(!accepted, "a request with a broken signature was accepted");
    assert!(reason.is_some());
    h.advance(1_000);

    let (seq, _) = broken_at(boot_pinned(&b, &a, h.store.clone(), h.now));
    assert_eq!(seq, Some(h.store.len() as u64));

    let mut store = h.store.clone();
    let b_epoch = store.len() as u64;
    store.push(host_runs_image(&b, &store, h.now));
    let (seq, _) =
        broken_at(Harness::boot(a.clone(), store.clone(), &[], h.now).map_err(|(r, _)| r));
    assert_eq!(seq, Some(b_epoch));
    let (seq, pcrs) = image_not_allowed(audit(&store, &a, h.now));
    assert_eq!((seq, pcrs), (b_epoch, image_pcrs(&b)));

    // And the auditor's binary, at the same entry (the refused acts before it verify).
    if let Some(bin) = verify_bin() {
        let (code, out) = run_cli(&bin, &store, &a, h.now);
        assert_eq!(code, Some(1), "{out}");
        assert!(
            out.contains(&format!("\"first_bad_seq\":{b_epoch}")),
            "{out}"
        );
        let (code, out) = run_cli(&bin, &store[..b_epoch as usize], &a, h.now);
        assert_eq!(code, Some(0), "{out}");
    }
}

/// `attestplane-verify`, found next to this test's own directory in the target dir (built when
/// the verifier package is part of the run, as with `cargo test --workspace`).
fn verify_bin() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?.parent()?;
    let bin = dir.join(format!(
        "attestplane-verify{}",
        std::env::consts::EXE_SUFFIX
    ));
    if !bin.is_file() {
        eprintln!("SKIPPED the CLI half: attestplane-verify is not built next to this test");
    }
    bin.is_file().then_some(bin)
}

/// Runs `attestplane-verify log --json` over `store` pinning `pinned`'s image.
fn run_cli(
    bin: &PathBuf,
    store: &[Vec<u8>],
    pinned: &MockNsm,
    now: UnixMillis,
) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    std::fs::write(p("log.cbor"), store.concat()).unwrap();
    std::fs::write(p("root.pem"), pinned.root_pem().unwrap()).unwrap();
    let server_root =
        MockNsm::builder(SERVER_SEED, attestplane_enclave::nsm::Clock::Fixed(at(0))).build();
    std::fs::write(p("server-root.pem"), server_root.root_pem().unwrap()).unwrap();
    let mut cmd = Command::new(bin);
    cmd.arg("log").arg(p("log.cbor"));
    for (i, pcr) in image_pcrs(pinned) {
        cmd.arg("--pcr")
            .arg(format!("{}={}", i.get(), pcr.to_hex()));
    }
    let out = cmd
        .arg("--root")
        .arg(p("root.pem"))
        .arg("--server-root")
        .arg(p("server-root.pem"))
        .arg("--at")
        .arg(now.as_millis().to_string())
        .arg("--json")
        .output()
        .unwrap();
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}
