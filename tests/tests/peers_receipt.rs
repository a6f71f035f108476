//! The receipts the Python receipt check (`integrations/python`) is tested with are made by the
//! Rust encoder the gateway signs with, so the two implementations are checked against each
//! other: this test makes them (deterministic: Ed25519 signatures and the claims' JSON are) and
//! compares them with the committed fixture the Python tests read.
//! `ATTESTPLANE_WRITE_FIXTURES=1` rewrites the fixture.

use std::path::Path;

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
