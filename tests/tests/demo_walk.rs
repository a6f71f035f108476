//! Issue 4's acceptance through the real binaries: the newcomer's walk on `attestplane dev`
//! (register → attest → token → resolve → export → `attestplane-verify log`), and a host that
//! tampers with the exported log (one byte flipped, one entry deleted, two entries swapped)
//! caught by the verifier naming the right sequence number.

use std::path::Path;
use std::time::Duration;

use attestplane_tests::{DevStack, Ran, StackFiles, log_head, split_log};

/// Runs the verifier on `entries` written to `DIR/NAME`; asserts it fails naming `seq`.
fn assert_rejected_at(files: &StackFiles, name: &str, entries: &[Vec<u8>], seq: usize) {
    let path = files.path(name);
    std::fs::write(&path, entries.concat()).unwrap();
    let (ran, report) = files.verify_log(&path, None);
    assert_eq!(
        ran.code,
        Some(1),
        "{name}: expected a failed verification\n{ran}"
    );
    assert_eq!(report["verified"], false, "{name}: {report}");
    assert_eq!(
        report["first_bad_seq"], seq as u64,
        "{name}: the verifier named the wrong entry: {report}"
    );
}

fn verified(files: &StackFiles, log: &Path, checkpoint: Option<&Path>) -> serde_json::Value {
    let (ran, report) = files.verify_log(log, checkpoint);
    assert_eq!(ran.code, Some(0), "the exported log did not verify\n{ran}");
    assert_eq!(report["verified"], true, "{report}");
    report
}

#[test]
fn demo_walk_exports_a_log_the_verifier_accepts_and_tampering_is_named() {
    let stack = DevStack::start();
    let files = &stack.files;
    for name in [
        "admin.key",
        "idp.key",
        "control-plane-root.pem",
        "control-plane-pcrs.json",
        "server-root.pem",
        "demo-server-pcrs.json",
        "config.toml",
    ] {
        assert!(
            files.path(name).is_file(),
            "attestplane dev did not write {name}"
        );
    }
    // dev installs the policy and the identity provider; the walk registers the server.
    let (start_size, _) = log_head(&stack.url);
    assert!(
        start_size >= 3,
        "genesis, policy, identity provider: {start_size}"
    );
    files.register_and_attest_weather(&stack.demo_url);
    files.mint_agent_token();
    let listing = files.cli(&["--json", "servers", "list"]);
    listing.ok();
    let servers = listing.json()["servers"].clone();
    assert_eq!(servers[0]["id"], "weather", "{listing}");
    assert_eq!(servers[0]["attested"], true, "{listing}");

    let resolved = files.cli(&["--json", "handle", "resolve", "weather"]);
    resolved.ok();
    let handle = resolved.json();
    assert_eq!(handle["verified"], true, "{resolved}");
    assert_eq!(handle["server"], "weather", "{resolved}");
    let handle_seq = handle["seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("no seq in {resolved}"));

    // One more logged decision, so the handle's entry is not the last.
    files.cli(&["--json", "servers", "list"]).ok();

    let (log, checkpoint) = stack.files.export("log.cbor");
    let entries = split_log(&std::fs::read(&log).unwrap());
    let (size, _) = log_head(&stack.url);
    assert_eq!(entries.len() as u64, size, "the export holds the whole log");
    assert!(
        handle_seq + 1 < size,
        "handle seq {handle_seq}: expected at least one entry after it in {size}"
    );
    let report = verified(files, &log, Some(&checkpoint));
    assert_eq!(report["log"]["size"], size, "{report}");
    let epochs = report["log"]["epochs"].as_array().unwrap();
    assert_eq!(epochs.len(), 1, "{report}");

    // The host flips one byte in the middle of the handle's entry.
    let k = handle_seq as usize;
    let mut flipped = entries.clone();
    let mid = flipped[k].len() / 2;
    flipped[k][mid] ^= 0x01;
    assert_rejected_at(files, "flipped.cbor", &flipped, k);

    // ... deletes one entry (the discovery just before the handle's, or the handle's).
    for k in [k - 1, k] {
        let mut deleted = entries.clone();
        deleted.remove(k);
        assert_rejected_at(files, &format!("deleted-{k}.cbor"), &deleted, k);
    }

    // ... swaps two neighbours.
    let mut swapped = entries.clone();
    swapped.swap(k - 1, k);
    assert_rejected_at(files, "swapped.cbor", &swapped, k - 1);

    // ... or cuts the tail, which only the checkpoint reveals.
    let cut = files.path("cut.cbor");
    std::fs::write(&cut, entries[..entries.len() - 1].concat()).unwrap();
    verified(files, &cut, None);
    let (ran, report): (Ran, _) = files.verify_log(&cut, Some(&checkpoint));
    assert_eq!(ran.code, Some(1), "a cut tail passed the checkpoint\n{ran}");
    assert_eq!(report["verified"], false, "{report}");

    // Ctrl-C (SIGTERM) stops dev and its children.
    let mut stack = stack;
    let (ok, left) = stack.stop(Duration::from_secs(10));
    assert!(ok, "attestplane dev did not exit cleanly on SIGTERM");
    assert!(
        left.is_empty(),
        "still running after dev stopped: {left:#?}"
    );
}
