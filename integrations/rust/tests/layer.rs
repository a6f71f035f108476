//! The middleware in front of a real axum router: a valid receipt reaches the handler; a
//! missing, forged, replayed, other-audience, other-arguments, expired or mismatched one is
//! refused with -32001 and the handler never runs.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use attestplane_receipt::{ReceiptChecker, require_receipt};
use attestplane_verifier::gateway::receipt::{ReceiptClaims, arguments_hash, encode_receipt};
use axum::Router;
use axum::body::{Body, to_bytes};
use axum::http::Request;
use axum::routing::post;
use ed25519_dalek::SigningKey;
use tower::ServiceExt;

const AUDIENCE: &str = "https://files.example/mcp";

fn key() -> SigningKey {
    SigningKey::from_bytes(&[9; 32])
}

fn receipt(args: &str, aud: &str, jti: &str, iat: u64) -> String {
    let claims = ReceiptClaims {
        iss: "attestplane".into(),
        aud: aud.into(),
        sub: "agent-1".into(),
        usr: "alice".into(),
        ten: "acme".into(),
        mth: "tools/call".into(),
        tool: "read".into(),
        args: arguments_hash(Some(args)).unwrap(),
        def: "00".repeat(32),
        jti: jti.into(),
        iat,
        exp: iat + 60,
        seq: 7,
    };
    let kid = attestplane_verifier::entry::KeyId::of(&key().verifying_key()).to_hex();
    encode_receipt(&claims, &kid, &key()).unwrap()
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn app(calls: Arc<AtomicUsize>) -> Router {
    let checker = Arc::new(ReceiptChecker::new(key().verifying_key(), AUDIENCE, 64).unwrap());
    Router::new()
        .route(
            "/mcp",
            post(move || {
                let calls = calls.clone();
                async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    r#"{"jsonrpc":"2.0","id":1,"result":{"content":[]}}"#
                }
            }),
        )
        .layer(axum::middleware::from_fn_with_state(
            checker,
            require_receipt,
        ))
}

fn call_body(args: &str, meta_receipt: Option<&str>) -> String {
    match meta_receipt {
        Some(r) => format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"read","arguments":{args},"_meta":{{"io.attestplane/receipt":"{r}"}}}}}}"#
        ),
        None => format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"read","arguments":{args}}}}}"#
        ),
    }
}

async fn send(app: &Router, body: String, header: Option<&str>) -> String {
    let mut req = Request::post("/mcp").header("content-type", "application/json");
    if let Some(h) = header {
        req = req.header("Attestplane-Receipt", h);
    }
    let resp = app
        .clone()
        .oneshot(req.body(Body::from(body)).unwrap())
        .await
        .unwrap();
    let bytes = to_bytes(resp.into_body(), 1 << 20).await.unwrap();
    String::from_utf8(bytes.to_vec()).unwrap()
}

#[tokio::test]
async fn valid_receipts_pass_and_every_bad_one_is_refused() {
    let calls = Arc::new(AtomicUsize::new(0));
    let app = app(calls.clone());
    let args = r#"{"path":"/etc/motd","n":1e3}"#;
    let now = now_secs();

    // Valid, in the header and then (another jti) in _meta.
    let r1 = receipt(args, AUDIENCE, "00000000000000000000000000000001", now);
    assert!(
        send(&app, call_body(args, None), Some(&r1))
            .await
            .contains("result")
    );
    let r2 = receipt(args, AUDIENCE, "00000000000000000000000000000002", now);
    assert!(
        send(&app, call_body(args, Some(&r2)), None)
            .await
            .contains("result")
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    let refused = |out: String| {
        assert!(out.contains("-32001"), "{out}");
        assert!(out.contains(r#""id":1"#), "{out}");
    };
    // Missing.
    refused(send(&app, call_body(args, None), None).await);
    // Replayed.
    refused(send(&app, call_body(args, None), Some(&r1)).await);
    // Other arguments (the host changed them).
    let r3 = receipt(args, AUDIENCE, "00000000000000000000000000000003", now);
    refused(
        send(
            &app,
            call_body(r#"{"path":"/etc/shadow","n":1e3}"#, None),
            Some(&r3),
        )
        .await,
    );
    // Another audience.
    let r4 = receipt(
        args,
        "https://other.example/mcp",
        "00000000000000000000000000000004",
        now,
    );
    refused(send(&app, call_body(args, None), Some(&r4)).await);
    // Expired.
    let r5 = receipt(
        args,
        AUDIENCE,
        "00000000000000000000000000000005",
        now - 600,
    );
    refused(send(&app, call_body(args, None), Some(&r5)).await);
    // Two different receipts.
    let r6 = receipt(args, AUDIENCE, "00000000000000000000000000000006", now);
    let r7 = receipt(args, AUDIENCE, "00000000000000000000000000000007", now);
    refused(send(&app, call_body(args, Some(&r7)), Some(&r6)).await);
    // Forged: signed by another key.
    let forged = {
        let mut t = r6.clone();
        t.pop();
        t.push(if r6.ends_with('A') { 'B' } else { 'A' });
        t
    };
    refused(send(&app, call_body(args, None), Some(&forged)).await);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "no refused call reached the handler"
    );
}

#[tokio::test]
async fn other_methods_pass_and_smuggling_bodies_are_refused() {
    let calls = Arc::new(AtomicUsize::new(0));
    let app = app(calls.clone());
    let list = r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#.to_owned();
    assert!(send(&app, list, None).await.contains("result"));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // A batch, and a second `method` that a lenient parser would read as tools/call.
    for body in [
        r#"[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"read"}}]"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","method":"tools/call","params":{"name":"read"}}"#,
        "not json",
    ] {
        let out = send(&app, body.to_owned(), None).await;
        assert!(out.contains("-32001"), "{body}: {out}");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}
