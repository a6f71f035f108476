//! The closed loop an auditor relies on: image bytes → PCRs → attested epoch → verified log.
//!
//! An EIF is built with the `attestplane-eif` builder from synthetic kernel and ramdisk bytes,
//! its PCRs are computed by the verifier's independent parser (`measure_eif`), the mock NSM
//! boots with exactly those measurements, and the enclave's real `LogWriter` writes a log. The
//! verifier must accept that log with the image's PCRs and refuse it, naming entry 0, with the
//! PCRs of an image whose kernel differs in one byte. The same holds through the
//! `attestplane-verify` binary with `--pcrs FILE`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::PathBuf;
use std::process::Command;

use attestplane_eif::{Arch, EifSpec, Initramfs, Metadata, build_eif};
use attestplane_enclave::nsm::{Clock, MockNsm};
use attestplane_enclave::writer::{Head, LogWriter};
use attestplane_verifier::UnixMillis;
use attestplane_verifier::attestation::TrustAnchor;
use attestplane_verifier::eif::{EifMeasurements, measure_eif};
use attestplane_verifier::entry::Event;
use attestplane_verifier::log::{LogError, LogPolicy, verify_log};
use ed25519_dalek::SigningKey;

/// 2026-11-22T00:00:00Z.
const T0: u64 = 1_795_305_600_000;
const ORIGIN: &str = "attestplane.test/eif-closed-loop";

/// The verification instant: an hour after the log was written.
fn at() -> UnixMillis {
    UnixMillis::from_millis(T0 + 3_600_000)
}

/// An image shaped like a real one: a bootstrap ramdisk (init, nsm.ko) and an application
/// ramdisk (rootfs with the enclave binary, cmd, env). `flip` changes the kernel's last byte.
fn image(flip: bool) -> Vec<u8> {
    let mut kernel: Vec<u8> = (0..65_536u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    if flip && let Some(b) = kernel.last_mut() {
        *b ^= 0x01;
    }
    let mut boot = Initramfs::new();
    boot.add_dir("dev", 0o755).unwrap();
    boot.add_file("init", 0o755, b"synthetic init".to_vec())
        .unwrap();
    boot.add_file("nsm.ko", 0o755, b"synthetic nsm driver".to_vec())
        .unwrap();
    let mut app = Initramfs::new();
    for d in ["dev", "proc", "run", "sys", "tmp", "var"] {
        app.add_dir(&format!("rootfs/{d}"), 0o755).unwrap();
    }
    app.add_file(
        "rootfs/attestplane-enclave",
        0o755,
        b"synthetic enclave binary".to_vec(),
    )
    .unwrap();
    app.add_file(
        "cmd",
        0o644,
        b"/attestplane-enclave\n--nsm\nreal\n".to_vec(),
    )
    .unwrap();
    app.add_file("env", 0o644, b"PATH=/\n".to_vec()).unwrap();
    let (boot, app) = (boot.to_bytes(0), app.to_bytes(0));
    let spec = EifSpec {
        kernel: &kernel,
        cmdline: "reboot=k panic=30 pci=off nomodules console=ttyS0",
        ramdisks: vec![&boot, &app],
        arch: Arch::X86_64,
        metadata: Metadata::default(),
    };
    build_eif(&spec).unwrap().bytes
}

fn as_array(p: &attestplane_verifier::attestation::Pcr) -> [u8; 48] {
    *p.as_bytes()
}

/// Boots a mock NSM measuring `m` and writes a short log: the epoch start, the genesis admin
/// key set, and three checkpoints.
fn write_log(m: &EifMeasurements) -> (MockNsm, Vec<Vec<u8>>) {
    let nsm = MockNsm::builder([0x5e; 32], Clock::Fixed(UnixMillis::from_millis(T0)))
        .image_measurements(as_array(&m.pcr0), as_array(&m.pcr1), as_array(&m.pcr2))
        .build();
    let (mut writer, first) =
        LogWriter::open(&nsm, Head::empty(), ORIGIN, UnixMillis::from_millis(T0)).unwrap();
    let mut entries = vec![first.bytes];
    let admin = SigningKey::from_bytes(&[0x42; 32]).verifying_key();
    let genesis = writer
        .append(
            Event::Genesis {
                admin_keys: vec![admin.to_bytes()],
                host_chosen: false,
            },
            UnixMillis::from_millis(T0 + 10),
        )
        .unwrap();
    entries.push(genesis.bytes);
    for i in 0..3u64 {
        let head = writer.head().clone();
        let e = writer
            .append(
                Event::Checkpoint {
                    size: head.size,
                    root: *head.frontier.root().as_bytes(),
                },
                UnixMillis::from_millis(T0 + 20 + 10 * i),
            )
            .unwrap();
        entries.push(e.bytes);
    }
    (nsm, entries)
}

fn anchor(nsm: &MockNsm) -> TrustAnchor {
    TrustAnchor::from_pem(nsm.root_pem().unwrap().as_bytes()).unwrap()
}

#[test]
fn log_verifies_with_the_eif_pcrs_and_fails_with_a_one_byte_different_image() {
    let good = measure_eif(&image(false)).unwrap();
    let other = measure_eif(&image(true)).unwrap();
    assert_ne!(good.pcr0, other.pcr0);
    assert_ne!(good.pcr1, other.pcr1);
    assert_eq!(good.pcr2, other.pcr2, "the kernel is not in PCR2");

    let (nsm, entries) = write_log(&good);
    let log = verify_log(&entries, LogPolicy::new(anchor(&nsm), good.pcrs()), at()).unwrap();
    assert_eq!(log.size(), 5);

    let err = verify_log(&entries, LogPolicy::new(anchor(&nsm), other.pcrs()), at()).unwrap_err();
    assert!(
        matches!(&err, LogError::ImageNotAllowed { seq: 0, pcrs } if *pcrs == good.pcrs()),
        "{err}"
    );
    assert_eq!(err.seq(), Some(0));
}

/// `attestplane-verify`, found next to this test's own directory in the target dir. Cargo
/// builds it only when the verifier package is part of the run (`cargo test --workspace`).
fn verify_bin() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?.parent()?;
    let bin = dir.join(format!(
        "attestplane-verify{}",
        std::env::consts::EXE_SUFFIX
    ));
    bin.is_file().then_some(bin)
}

#[test]
fn verify_cli_accepts_the_log_with_the_eif_pcrs_file_and_refuses_the_other() {
    let Some(bin) = verify_bin() else {
        eprintln!(
            "SKIPPED: attestplane-verify is not built next to this test; run \
             `cargo test --workspace` (or `cargo build -p attestplane-verifier`) first"
        );
        return;
    };
    let good = measure_eif(&image(false)).unwrap();
    let other = measure_eif(&image(true)).unwrap();
    let (nsm, entries) = write_log(&good);

    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    // An RFC 8742 CBOR sequence is the entries' bytes back to back.
    std::fs::write(p("log.cbor"), entries.concat()).unwrap();
    std::fs::write(p("root.pem"), nsm.root_pem().unwrap()).unwrap();
    std::fs::write(p("good.json"), good.to_pcrs_json().to_string()).unwrap();
    std::fs::write(p("other.json"), other.to_pcrs_json().to_string()).unwrap();

    let run = |pcrs: &str| {
        Command::new(&bin)
            .arg("log")
            .arg(p("log.cbor"))
            .arg("--pcrs")
            .arg(p(pcrs))
            .arg("--root")
            .arg(p("root.pem"))
            .arg("--at")
            .arg(at().as_millis().to_string())
            .output()
            .unwrap()
    };
    let ok = run("good.json");
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&ok.stdout),
        String::from_utf8_lossy(&ok.stderr)
    );
    let bad = run("other.json");
    assert_eq!(bad.status.code(), Some(1));
    let text = String::from_utf8_lossy(&bad.stdout);
    assert!(text.contains("first bad entry 0"), "{text}");

    // `attestplane-verify eif --json` output is itself a usable --pcrs file.
    std::fs::write(p("image.eif"), image(false)).unwrap();
    let measured = Command::new(&bin)
        .args(["eif", "--json"])
        .arg(p("image.eif"))
        .output()
        .unwrap();
    assert_eq!(measured.status.code(), Some(0));
    std::fs::write(p("from-cli.json"), &measured.stdout).unwrap();
    assert_eq!(run("from-cli.json").status.code(), Some(0));
}
