//! The gateway's decisions on the enclave itself (`gateway::inside`), driven directly: what is
//! written when making a receipt fails.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use attestplane_enclave::gateway::inside::{
    self, CallVerdict, GATEWAY_ID_BASE, Gated, Refusal, decide_gated_with, sign_receipt,
};
use attestplane_enclave::gateway::redact;
use attestplane_proto::Response;
use attestplane_verifier::policy::Action;
use common::*;

const RESOURCE: &str = "http://gateway.test/mcp/weather";

/// A control plane serving `weather` (attested, tool `add` pinned) under the starter policy,
/// and an agent with the `tool-user` role.
fn setup() -> (
    Harness,
    attestplane_verifier::entry::PrincipalRecord,
    inside::CallArguments,
) {
    let admin = Admin::new(1);
    let mut server = McpServer::new("weather", "acme", 1);
    server.spec.tools = [("add".to_owned(), tool_digest("add"))].into();
    let idp = Idp::new(40, "https://idp.acme.example");
    let mut h = Harness::new(&[&admin]);
    h.setup(&admin, &[&server], STARTER_POLICY, &idp);
    let _ = h.attest(&server);
    let mut claims = idp.claims("agent-7", "acme", &["tool-user"], h.now);
    claims["aud"] = serde_json::json!(RESOURCE);
    let token = idp.sign_claims(&claims);
    let principal = inside::authenticate(&mut h.enclave, &token, RESOURCE, h.now).unwrap();
    let args = redact::call_arguments(Some(r#"{"a":1}"#)).unwrap();
    (h, principal, args)
}

fn add() -> Gated<'static> {
    Gated {
        action: Action::Call,
        method: "tools/call",
        item: "add",
    }
}

/// The `Persist` among `replies`: its first sequence number and entry count.
fn persisted(replies: &[(u64, Response)]) -> Vec<(u64, usize)> {
    replies
        .iter()
        .filter_map(|(_, r)| match r {
            Response::Persist { first_seq, entries } => Some((*first_seq, entries.len())),
            _ => None,
        })
        .collect()
}

/// A receipt that cannot be made must leave no decision entry behind: the old gateway wrote
/// the decision first and signed the receipt after, so a signer failure returned an error
/// and dropped the entry's `Persist`, and the host's log got a hole (the next entry's
/// `Persist` started one past the end of what it stored, and the next boot's replay refuses
/// such a log).
#[test]
fn a_receipt_signer_that_fails_leaves_no_half_written_decision() {
    let (mut h, principal, args) = setup();
    let stored = h.store.len() as u64;
    let failed = decide_gated_with(
        &mut h.enclave,
        h.now,
        GATEWAY_ID_BASE | 1,
        &principal,
        "weather",
        add(),
        tool_digest("add").0,
        &args,
        |_, _| Err(Refusal::Log("receipt: the signer failed".into())),
    );
    assert!(
        matches!(failed, Err(Refusal::Log(ref why)) if why.contains("signer failed")),
        "{failed:?}"
    );
    // The next decision is the next entry of what the host stored: nothing was chained for
    // the failed one.
    let (verdict, replies) = decide_gated_with(
        &mut h.enclave,
        h.now,
        GATEWAY_ID_BASE | 2,
        &principal,
        "weather",
        add(),
        tool_digest("add").0,
        &args,
        sign_receipt,
    )
    .unwrap();
    assert_eq!(persisted(&replies), vec![(stored, 1)]);
    let CallVerdict::Allowed { seq, receipt, .. } = verdict else {
        panic!("the call should be allowed: {verdict:?}");
    };
    assert_eq!(seq, stored);
    // The receipt names the entry it was made for (its `seq` claim), signed before the entry
    // existed.
    let payload = receipt.split('.').nth(1).unwrap();
    use base64::Engine as _;
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["seq"], serde_json::json!(seq));
}

/// A refused call needs no receipt: a signer that would fail is never asked, and the refusal
/// is written.
#[test]
fn a_denied_call_is_written_without_asking_the_signer() {
    let (mut h, principal, args) = setup();
    let stored = h.store.len() as u64;
    let gated = Gated {
        action: Action::Call,
        method: "tools/call",
        item: "not-pinned",
    };
    let (verdict, replies) = decide_gated_with(
        &mut h.enclave,
        h.now,
        GATEWAY_ID_BASE | 1,
        &principal,
        "weather",
        gated,
        [0; 32],
        &args,
        |_, _| panic!("a refused call asked for a receipt"),
    )
    .unwrap();
    assert!(
        matches!(verdict, CallVerdict::Denied { seq, .. } if seq == stored),
        "{verdict:?}"
    );
    assert_eq!(persisted(&replies), vec![(stored, 1)]);
}
