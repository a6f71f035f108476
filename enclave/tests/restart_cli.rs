//! Issue 3's restart acceptance through the auditor's binary: a control plane runs, stops, and a
//! new enclave over the same stored log opens a second epoch; `attestplane-verify log` accepts the
//! two-epoch log (replaying every decision) and rejects it when the link between the epochs is
//! cut, naming the entry.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::path::PathBuf;
use std::process::Command;

use attestplane_proto::Response;
use common::*;

#[test]
fn verifier_cli_accepts_two_epoch_log_and_rejects_a_cut_link() {
    let Some(verify) = verifier_binary() else {
        eprintln!(
            "SKIPPED: attestplane-verify is not built next to this test; run `cargo test --workspace`"
        );
        return;
    };
    // Epoch 0: genesis, a registered and attested server, a handle.
    let admin = Admin::new(1);
    let idp = Idp::new(9, "https://idp.test");
    let server = McpServer::new("weather", "acme", 1);
    let mut h = Harness::new(&[&admin]);
    h.admin_ok(&admin, idp.install());
    let policy = attestplane_verifier::admin::AdminAction::SetPolicy {
        text: STARTER_POLICY.into(),
    };
    h.admin_ok(&admin, policy);
    h.admin_ok(&admin, server.register());
    assert!(matches!(
        h.attest(&server),
        Response::AttestResult { verified: true, .. }
    ));
    let bearer = idp.token("agent-1", "acme", &["tool-user"], h.now);
    assert!(matches!(
        h.resolve(&bearer, "weather"),
        Response::Handle { .. }
    ));
    let first_epoch_len = h.store.len();

    // Restart: a new enclave over the same NSM (same image) replays and opens epoch 1.
    h.advance(MINUTE_MS);
    let nsm = h.nsm.clone();
    let now = h.now;
    let mut h2 = match Harness::boot(nsm, h.store.clone(), &[], now) {
        Ok(h2) => h2,
        Err((r, _)) => panic!("restart refused: {r:?}"),
    };
    let bearer = idp.token("agent-1", "acme", &["tool-user"], h2.now);
    assert!(matches!(
        h2.authorize(&bearer, "weather", "search"),
        Response::Authorized { allowed: true, .. }
    ));

    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let pcrs: serde_json::Map<String, serde_json::Value> = image_pcrs(&h2.nsm)
        .into_iter()
        .map(|(i, p)| (format!("PCR{i}"), p.to_hex().into()))
        .collect();
    let pcrs = write(
        "pcrs.json",
        serde_json::to_string(&pcrs).unwrap().as_bytes(),
    );
    let root = write("root.pem", h2.nsm.root_pem().unwrap().as_bytes());
    let server_root = write("server-root.pem", server.nsm.root_pem().unwrap().as_bytes());
    let run = |log: &PathBuf| {
        Command::new(&verify)
            .arg("log")
            .arg(log)
            .arg("--pcrs")
            .arg(&pcrs)
            .arg("--root")
            .arg(&root)
            .arg("--server-root")
            .arg(&server_root)
            .arg("--at")
            .arg((h2.now.as_millis() + MINUTE_MS).to_string())
            .arg("--json")
            .output()
            .unwrap()
    };

    let whole = write("log.cbor", &h2.store.concat());
    let out = run(&whole);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0), "{report}");
    assert_eq!(report["log"]["epochs"].as_array().unwrap().len(), 2);
    assert_eq!(
        report["log"]["epochs"][1]["start_seq"],
        first_epoch_len as u64
    );

    // Cut the link: drop the last entry of the first epoch.
    let mut cut = h2.store.clone();
    cut.remove(first_epoch_len - 1);
    let cut = write("cut.cbor", &cut.concat());
    let out = run(&cut);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert_eq!(
        report["first_bad_seq"],
        (first_epoch_len - 1) as u64,
        "{report}"
    );
}
