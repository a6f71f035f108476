//! The receipts the Python receipt check (`integrations/python`) is tested with are made by the
//! Rust encoder the gateway signs with, so the two implementations are checked against each
//! other: this test makes them (deterministic: Ed25519 signatures and the claims' JSON are) and
//! compares them with the committed fixture the Python tests read.
//! `ATTESTPLANE_WRITE_FIXTURES=1` rewrites the fixture.
//!
//! And the Python check at work: a PyPI `mcp` server with `RequireReceipt`, its key from the
//! control plane's attestation as `attestplane-verify` verified it, behind the real gateway.

mod peers_support;

use std::path::Path;
use std::time::Duration;

use attestplane_tests::{DevStack, binary, run};
use peers_support::{PyServers, gateway_url, mint_token, register_plain, stats};

use attestplane_verifier::gateway::receipt::{
    ReceiptClaims, ReceivedCall, ReplayCache, arguments_hash, encode_receipt, verify_receipt,
};
use attestplane_verifier::{UnixMillis, entry::KeyId};
use ed25519_dalek::SigningKey;
use serde_json::json;

const IAT: u64 = 1_800_000_000;
const AUDIENCE: &str = "http://127.0.0.1:7300/mcp/weather";
/// Key order, escapes, a non-ASCII key, `1e3`, nesting: what canonical JSON must settle.
const ARGUMENTS: &str = r#"{"z":[1e3,0.1,"é\u0041"],"a":{"y":true,"x":null},"ü":-0.5}"#;

fn claims(arguments: &str) -> ReceiptClaims {
    ReceiptClaims {
        iss: "attestplane".into(),
        aud: AUDIENCE.into(),
        sub: "agent-7".into(),
        usr: "alice".into(),
        ten: "acme".into(),
        mth: "tools/call".into(),
        tool: "convert".into(),
        args: arguments_hash(Some(arguments)).unwrap(),
        def: "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE".into(),
        jti: "00112233445566778899aabbccddeeff".into(),
        iat: IAT,
        exp: IAT + 30,
        seq: 42,
    }
}

fn sign(claims: &ReceiptClaims, key: &SigningKey) -> String {
    let kid = KeyId::of(&key.verifying_key()).to_hex();
    encode_receipt(claims, &kid, key).unwrap()
}

#[test]
fn python_receipt_fixtures_are_what_the_rust_encoder_makes() {
    let key = SigningKey::from_bytes(&[7; 32]);
    let other = SigningKey::from_bytes(&[9; 32]);
    let c = claims(ARGUMENTS);
    let receipt = sign(&c, &key);
    // The Rust check accepts what the Python one must accept.
    let call = ReceivedCall {
        audience: AUDIENCE,
        method: "tools/call",
        tool: "convert",
        arguments: Some(ARGUMENTS),
    };
    verify_receipt(
        &receipt,
        &key.verifying_key(),
        &call,
        UnixMillis::from_millis((IAT + 1) * 1000),
        &mut ReplayCache::new(8),
    )
    .unwrap();
    let fixture = json!({
        "made_by": "tests/tests/peers_receipt.rs (the Rust receipt encoder); do not edit",
        "key": hex::encode(key.verifying_key().as_bytes()),
        "other_key": hex::encode(other.verifying_key().as_bytes()),
        "audience": AUDIENCE,
        "method": "tools/call",
        "tool": "convert",
        "arguments": ARGUMENTS,
        "iat": IAT,
        "exp": IAT + 30,
        "receipt": receipt,
        "receipt_by_other_key": sign(&c, &other),
        "receipt_other_jti": sign(&ReceiptClaims { jti: "ffeeddccbbaa99887766554433221100".into(), ..c.clone() }, &key),
    });
    let text = format!("{}\n", serde_json::to_string_pretty(&fixture).unwrap());
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../integrations/python/tests/fixtures/receipts.json");
    if std::env::var_os("ATTESTPLANE_WRITE_FIXTURES").is_some() {
        std::fs::write(&path, &text).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert_eq!(
        committed,
        text,
        "{} is not what the Rust encoder makes now: rerun with ATTESTPLANE_WRITE_FIXTURES=1",
        path.display()
    );
}

#[test]
fn python_middleware_runs_gateway_calls_and_refuses_calls_that_skip_it() {
    let Some(python) = peers_support::python() else {
        return;
    };
    let mut stack = DevStack::start();
    let gateway = gateway_url(&stack);
    let runtime = peers_support::runtime();
    // The server checks receipts for its resource URI, which it knows before it listens
    // (the resource names the server; the endpoint is where the host reaches it).
    let resource = "https://receipted.peers.test/mcp".to_owned();
    let data = |name: &str| stack.files.path(name).display().to_string();
    let shape = "receipted-stateful-sse";
    let servers = PyServers::start_with(
        &python,
        &[shape],
        &[
            ("ATTESTPLANE_CONTROL_PLANE", stack.url.clone()),
            ("ATTESTPLANE_PCRS", data("control-plane-pcrs.json")),
            ("ATTESTPLANE_ROOT", data("control-plane-root.pem")),
            (
                "ATTESTPLANE_VERIFY",
                binary("attestplane-verify").display().to_string(),
            ),
            ("ATTESTPLANE_AUDIENCE", resource.clone()),
        ],
    );
    let upstream = servers.addr(shape);
    register_plain(
        &stack,
        &runtime,
        "receipted",
        upstream,
        &resource,
        &["add", "weather"],
    );
    let endpoint = format!("{gateway}/mcp/receipted");
    let token = mint_token(&stack, &endpoint, "tool-user", "receipted.jwt");
    let direct = format!("http://{upstream}/mcp");
    let answers = peers_support::python_client(
        &python,
        &serde_json::json!([
            // Through the control plane, in both eras: receipted, run.
            {"url": endpoint, "token": token, "mode": "legacy",
             "ops": [{"op": "call", "name": "add", "arguments": {"a": 40, "b": 2}}]},
            {"url": endpoint, "token": token, "mode": "2026-07-28",
             "ops": [{"op": "call", "name": "add", "arguments": {"a": 1, "b": 2}}]},
            // Straight to the server, skipping the control plane: no receipt, refused.
            {"url": direct, "token": "none", "mode": "2026-07-28",
             "ops": [{"op": "call", "name": "add", "arguments": {"a": 40, "b": 2}}]},
            {"url": direct, "token": "none", "mode": "legacy",
             "ops": [{"op": "call", "name": "add", "arguments": {"a": 40, "b": 2}}]},
        ]),
    );
    assert_eq!(answers[0]["outcomes"][0]["text"], "42", "{answers:?}");
    assert_eq!(answers[1]["outcomes"][0]["text"], "3", "{answers:?}");
    for skipped in &answers[2..] {
        let error = skipped["outcomes"][0]["error"].as_str().unwrap_or("");
        assert!(error.contains("MissingReceipt"), "{answers:?}");
    }
    let s = stats(&runtime, upstream);
    // Four calls arrived; only the two with receipts ran.
    assert_eq!(s["calls"], serde_json::json!({"add": 4}), "{s}");
    assert_eq!(s["ran"], serde_json::json!({"add": 2}), "{s}");

    // The key comes only from an attestation that verifies: against other PCRs, none.
    let mut pcrs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data("control-plane-pcrs.json")).unwrap())
            .unwrap();
    let first = pcrs
        .as_object()
        .and_then(|o| o.keys().next().cloned())
        .unwrap();
    pcrs[&first] = serde_json::json!("00".repeat(48));
    let other = stack.files.path("other-pcrs.json");
    std::fs::write(&other, pcrs.to_string()).unwrap();
    let mut cmd = std::process::Command::new(&python);
    cmd.env(
        "PYTHONPATH",
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../integrations/python"),
    )
    .arg("-c")
    .arg(
        "import base64, json, sys, urllib.request\n\
         from attestplane_receipt import attested_key, AttestationRefused\n\
         doc = base64.b64decode(json.loads(urllib.request.urlopen(sys.argv[1] + '/v1/attestation').read())['document'])\n\
         try:\n    attested_key(doc, pcrs=sys.argv[2], root=sys.argv[3], verifier=sys.argv[4])\nexcept AttestationRefused as e:\n    print('refused:', e); sys.exit(0)\n\
         sys.exit('a key from an attestation with other PCRs')",
    )
    .arg(&stack.url)
    .arg(&other)
    .arg(data("control-plane-root.pem"))
    .arg(binary("attestplane-verify"));
    let ran = run(cmd);
    ran.ok();
    assert!(ran.stdout.contains("refused:"), "{ran}");
    let (ok, _) = stack.stop(Duration::from_secs(20));
    assert!(ok);
}
