//! The `attestplane-verify` binary as an auditor runs it: output and exit codes (0 verified,
//! 1 failed verification, 2 usage or I/O error) on the real AWS documents.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const PROD: &str = "nitro-01-evervault-2022-prod-pcr8.cose";
const DEBUG: &str = "nitro-02-evervault-2023-debug.cose";
const MALFORMED: &str = "malformed-truncated-key.b64";
const PROD_PCR0: &str = "f4d48b81a460c9916d1e685119074bf24660afd3e34fae9fca0a0d28d9d5599936332687e6f66fc890ac8cf150142d8b";

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/nitro")
        .join(name)
}

fn run<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_attestplane-verify"))
        .args(args)
        .output()
        .expect("run attestplane-verify")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn doc(name: &str) -> String {
    data(name).display().to_string()
}

/// Reads the PCRs the document carries through the JSON output.
fn pcrs_of(name: &str, extra: &[&str]) -> Vec<(String, String)> {
    let mut args = vec![
        "attestation".to_string(),
        doc(name),
        "--at".into(),
        "document".into(),
        "--json".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let o = run(&args);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["attestation"]["pcrs"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect()
}

#[test]
fn real_production_document_verifies_at_its_own_time_with_its_pcrs() {
    let pcr0 = format!("0={PROD_PCR0}");
    let o = run(&[
        "attestation",
        &doc(PROD),
        "--at",
        "document",
        "--pcr",
        &pcr0,
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    let out = stdout(&o);
    assert!(out.contains("VERIFIED"));
    assert!(out.contains("i-020b6af9246d90e92-enc0183d09086c24190"));
    assert!(out.contains("production"));
    assert!(out.contains("2022-10-13T08:58:02.136Z"));
    assert!(out.contains(PROD_PCR0));
}

#[test]
fn real_documents_fail_at_the_current_time() {
    for name in [PROD, DEBUG] {
        let o = run(&[
            "attestation",
            &doc(name),
            "--at",
            "2026-11-22T00:00:00Z",
            "--allow-debug",
        ]);
        assert_eq!(o.status.code(), Some(1), "{name}: {}", stdout(&o));
        assert!(stdout(&o).contains("expired"), "{}", stdout(&o));
    }
}

#[test]
fn real_documents_fail_with_any_pcr_changed() {
    for (name, extra) in [(PROD, &[][..]), (DEBUG, &["--allow-debug"][..])] {
        let pcrs = pcrs_of(name, extra);
        assert!(pcrs.len() >= 16);
        // All PCRs as given verify.
        let all: Vec<String> = pcrs.iter().map(|(i, v)| format!("{i}={v}")).collect();
        let mut args = vec![
            "attestation".to_string(),
            doc(name),
            "--at".into(),
            "document".into(),
        ];
        for a in &all {
            args.push("--pcr".into());
            args.push(a.clone());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        assert_eq!(run(&args).status.code(), Some(0));
        // Each one changed fails.
        for (i, v) in &pcrs {
            let mut changed = v.clone().into_bytes();
            changed[0] = if changed[0] == b'0' { b'1' } else { b'0' };
            let pcr = format!("{i}={}", String::from_utf8(changed).unwrap());
            let mut args = vec![
                "attestation".to_string(),
                doc(name),
                "--at".into(),
                "document".into(),
                "--pcr".into(),
                pcr,
            ];
            args.extend(extra.iter().map(|s| s.to_string()));
            let o = run(&args);
            assert_eq!(o.status.code(), Some(1), "{name} PCR{i}: {}", stdout(&o));
            assert!(
                stdout(&o).contains(&format!("pcr {i} is {v}")),
                "{}",
                stdout(&o)
            );
        }
    }
}

#[test]
fn real_debug_document_fails_unless_debug_allowed() {
    let o = run(&["attestation", &doc(DEBUG), "--at", "document"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).contains("debug"));
    let o = run(&[
        "attestation",
        &doc(DEBUG),
        "--at",
        "document",
        "--allow-debug",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    assert!(stdout(&o).contains("DEBUG"));
}

#[test]
fn malformed_sample_fails_with_a_parse_error() {
    let o = run(&["attestation", &doc(MALFORMED), "--at", "document", "--json"]);
    assert_eq!(o.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["verified"], false);
    assert!(v["error"].as_str().unwrap().contains("malformed"), "{v}");
}

#[test]
fn usage_and_io_errors_exit_2() {
    assert_eq!(
        run(&["attestation", "/nonexistent", "--at", "document"])
            .status
            .code(),
        Some(2)
    );
    assert_eq!(
        run(&["attestation", &doc(PROD), "--at", "yesterday"])
            .status
            .code(),
        Some(2)
    );
    assert_eq!(
        run(&[
            "attestation",
            &doc(PROD),
            "--at",
            "document",
            "--pcr",
            "40=00"
        ])
        .status
        .code(),
        Some(2)
    );
    assert_eq!(run(&["frobnicate"]).status.code(), Some(2));
    // A log check without any expected measurement is a usage error, not a pass.
    assert_eq!(run(&["log", &doc(PROD)]).status.code(), Some(2));
}

#[test]
fn a_non_log_file_fails_log_verification() {
    // A single attestation document is a CBOR item but not a log entry.
    let o = run(&[
        "log",
        &doc(PROD),
        "--pcr",
        &format!("0={PROD_PCR0}"),
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["first_bad_seq"], 0);
}

#[test]
fn pcrs_file_accepts_nitro_cli_measurements() {
    let dir = tempfile::tempdir().unwrap();
    let nitro = dir.path().join("measurements.json");
    std::fs::write(
        &nitro,
        format!(
            r#"{{"Measurements": {{"HashAlgorithm": "Sha384 {{ ... }}", "PCR0": "{PROD_PCR0}"}}}}"#
        ),
    )
    .unwrap();
    let o = run(&[
        "attestation",
        &doc(PROD),
        "--at",
        "document",
        "--pcrs",
        nitro.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    assert!(stdout(&o).contains("(matches expected)"));

    // A PCR entry that is not a hex string is a usage error, not silently ignored.
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"{"PCR0": 5}"#).unwrap();
    let o = run(&[
        "attestation",
        &doc(PROD),
        "--at",
        "document",
        "--pcrs",
        bad.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
}
