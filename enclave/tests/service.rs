//! The enclave's service, driven request by request without sockets: every request type through
//! its allowed and refused paths, with the log entries each leaves behind, and one test per
//! "must NOT be able to" line of docs/design.md that concerns the enclave, named for it.
//!
//! The host is played by [`common::Harness`]: it stores `Persist`ed entries, reports them
//! durable and collects the released final replies. Time is pinned: the enclave's clock starts
//! at [`common::T0`] and moves only when a test moves it.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::sync::Arc;

use attestplane_enclave::service::{CHALLENGE_TTL_MS, Enclave, Replies};
use attestplane_proto::{ByteBuf, ErrorCode, PROTOCOL_VERSION, Request, Response};
use attestplane_verifier::UnixMillis;
use attestplane_verifier::admin::{AdminAction, AdminRequest, Deployment};
use attestplane_verifier::attestation::{
    Expectations, TrustAnchor, VerifyAt, parse_attestation, verify_attestation,
};
use attestplane_verifier::checkpoint::verify_checkpoint;
use attestplane_verifier::entry::{EntryHash, EpochBinding, Event, SignedEntry};
use attestplane_verifier::handle::{HandleError, HandleExpectations, verify_handle};
use attestplane_verifier::log::{LogError, LogPolicy, verify_log};
use attestplane_verifier::reason::Reason;
use attestplane_verifier::state::{ATTESTATION_FRESHNESS_MS, Snapshot};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::*;
use coset::{CoseSign1, TaggedCborSerializable as _};

const ACME_AGENT: &str = "agent-7";

/// A snapshot with the entry count cleared, to compare states across entries that change
/// nothing but the count.
fn sans_applied(mut s: Snapshot) -> Snapshot {
    s.applied = 0;
    s
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn expect_error(reply: Response, code: ErrorCode) -> String {
    match reply {
        Response::Error { code: c, message } if c == code => message,
        other => panic!("expected Error {code:?}, got {other:?}"),
    }
}

fn expect_handle(reply: Response) -> (String, u64, u64) {
    match reply {
        Response::Handle {
            token,
            seq,
            expires_at,
        } => (token, seq, expires_at),
        other => panic!("expected a Handle, got {other:?}"),
    }
}

fn expect_denied(reply: &Response) -> (u64, String, ErrorCode) {
    match reply {
        Response::Denied { seq, reason, code } => (*seq, reason.clone(), *code),
        other => panic!("expected Denied, got {other:?}"),
    }
}

fn expect_attest(reply: &Response) -> (bool, u64, Option<String>, Option<String>) {
    match reply {
        Response::AttestResult {
            verified,
            seq,
            measurement,
            reason,
        } => (*verified, *seq, measurement.clone(), reason.clone()),
        other => panic!("expected AttestResult, got {other:?}"),
    }
}

fn expect_authorized(reply: &Response) -> (bool, u64, Option<String>) {
    match reply {
        Response::Authorized {
            allowed,
            seq,
            reason,
        } => (*allowed, *seq, reason.clone()),
        other => panic!("expected Authorized, got {other:?}"),
    }
}

fn expect_servers(reply: Response) -> (Vec<String>, u64) {
    match reply {
        Response::Servers { servers, seq } => (servers.into_iter().map(|s| s.id).collect(), seq),
        other => panic!("expected Servers, got {other:?}"),
    }
}

/// The decision logged at `seq`.
fn decision(h: &Harness, seq: u64) -> attestplane_verifier::entry::DecisionRecord {
    match h.entry(seq).event {
        Event::Decision(d) => *d,
        other => panic!("entry {seq} is not a decision: {other:?}"),
    }
}

/// The admin event logged at `seq`: (request bytes, accepted, reason).
fn admin_event(h: &Harness, seq: u64) -> (Vec<u8>, bool, Option<Reason>) {
    match h.entry(seq).event {
        Event::Admin {
            request,
            accepted,
            reason,
        } => (request, accepted, reason),
        other => panic!("entry {seq} is not an admin event: {other:?}"),
    }
}

/// The attestation record logged at `seq`.
fn attestation_event(h: &Harness, seq: u64) -> attestplane_verifier::entry::AttestationRecord {
    match h.entry(seq).event {
        Event::Attestation(a) => a,
        other => panic!("entry {seq} is not an attestation: {other:?}"),
    }
}

/// A control plane with `servers` registered, the starter policy and an identity provider.
fn started(admin: &Admin, servers: &[&McpServer], idp: &Idp) -> Harness {
    let mut h = Harness::new(&[admin]);
    h.setup(admin, servers, STARTER_POLICY, idp);
    h
}

fn idp() -> Idp {
    Idp::new(40, "https://idp.acme.example")
}

/// The common start: admin 1, the server `search` of acme (image 1) registered under the
/// starter policy with the test identity provider, and a token of an acme tool-user.
struct Started {
    admin: Admin,
    server: McpServer,
    idp: Idp,
    h: Harness,
    bearer: String,
}

impl Started {
    fn search() -> Started {
        let admin = Admin::new(1);
        let server = McpServer::new("search", "acme", 1);
        let idp = idp();
        let h = started(&admin, &[&server], &idp);
        let bearer = idp.token(ACME_AGENT, "acme", &["tool-user"], h.now);
        Started {
            admin,
            server,
            idp,
            h,
            bearer,
        }
    }
}

/// A policy allowing every same-tenant action on verified servers, debug or not, with a rate
/// limit of `limit` calls a minute.
fn permissive_policy(limit: u64) -> String {
    format!(
        r#"
@id("same-tenant")
permit (principal, action, resource)
when {{ principal.tenant == resource.tenant && context.attestation.verified }};

@id("discover")
permit (principal, action == Attestplane::Action::"discover", resource);

@id("rate")
forbid (principal, action == Attestplane::Action::"call", resource)
unless {{ context.counters.calls_last_minute < {limit} }};
"#
    )
}

// ---------------------------------------------------------------------------------------------
// Admin requests
// ---------------------------------------------------------------------------------------------

#[test]
fn refuses_forged_admin_request() {
    let admin = Admin::new(1);
    let mallory = Admin::new(66);
    let server = McpServer::new("search", "acme", 1);
    let mut h = Harness::new(&[&admin]);
    let before = h.enclave.state().snapshot();

    // Signed by a key that is not an admin key.
    let forged = h.signed(&mallory, server.register());
    let (accepted, seq, reason) = h.admin_bytes(forged.clone());
    assert!(!accepted);
    let reason = reason.unwrap();
    assert!(reason.contains("not a current admin key"), "{reason}");
    let (logged, logged_accepted, logged_reason) = admin_event(&h, seq);
    assert_eq!(logged, forged, "the refused request is logged verbatim");
    assert!(!logged_accepted);
    assert!(matches!(
        logged_reason,
        Some(Reason::UnknownAdminKey { .. })
    ));
    assert_eq!(logged_reason.map(|r| r.to_string()), Some(reason));
    assert!(h.enclave.state().server("search").is_none());
    assert_eq!(
        sans_applied(h.enclave.state().snapshot()),
        sans_applied(before.clone())
    );

    // A genuine admin signature, carried over bytes the admin never signed.
    let genuine = h.signed(
        &admin,
        AdminAction::SetPolicy {
            text: STARTER_POLICY.into(),
        },
    );
    let other_payload = AdminRequest {
        time: h.now,
        nonce: h.nonce(),
        deployment: h.deployment(),
        action: server.register(),
    }
    .payload()
    .unwrap();
    let mut cose = CoseSign1::from_tagged_slice(&genuine).unwrap();
    cose.payload = Some(other_payload);
    let spliced = cose.to_tagged_vec().unwrap();
    let (accepted, seq, reason) = h.admin_bytes(spliced.clone());
    assert!(!accepted);
    let reason = reason.unwrap();
    assert!(reason.contains("bad signature"), "{reason}");
    let (logged, logged_accepted, _) = admin_event(&h, seq);
    assert_eq!(logged, spliced);
    assert!(!logged_accepted);
    assert!(h.enclave.state().server("search").is_none());
    assert_eq!(
        sans_applied(h.enclave.state().snapshot()),
        sans_applied(before)
    );

    // The signature itself was good: over its own bytes it is accepted.
    let (accepted, _, reason) = h.admin_bytes(genuine);
    assert!(accepted, "{reason:?}");
    assert_eq!(h.enclave.state().policy().text(), STARTER_POLICY);

    // Every entry written verifies as a log.
    verify_log(&h.store, log_policy(&h.nsm), h.now).unwrap();
}

#[test]
fn refuses_admin_request_for_another_deployment() {
    // One admin key trusted by two deployments (staging and production, say): a request signed
    // for one must not take effect on the other, nor on a copy of a log under another origin.
    let admin = Admin::new(1);
    let server = McpServer::new("search", "acme", 1);
    let mut production = Harness::new(&[&admin]);
    let staging = match Harness::boot(enclave_nsm(), Vec::new(), &[admin.public()], at(1_000)) {
        Ok(h) => h,
        Err((r, _)) => panic!("boot failed: {r:?}"),
    };
    assert_ne!(staging.deployment(), production.deployment());
    let before = production.enclave.state().snapshot();

    let other_origin = Deployment {
        origin: "attestplane.test/staging".into(),
        ..production.deployment()
    };
    for (deployment, what) in [
        (staging.deployment(), "another log"),
        (other_origin, "this log under another origin"),
    ] {
        let nonce = production.nonce();
        let bytes = admin.sign(&deployment, production.now, nonce, server.register());
        let (accepted, seq, reason) = production.admin_bytes(bytes.clone());
        assert!(!accepted, "{what}: accepted");
        let reason = reason.unwrap();
        assert!(reason.contains("another deployment"), "{what}: {reason}");
        // Logged as refused, verbatim, and nothing changed.
        let (logged, logged_accepted, logged_reason) = admin_event(&production, seq);
        assert_eq!(logged, bytes);
        assert!(!logged_accepted);
        assert_eq!(logged_reason, Some(Reason::OtherDeployment), "{what}");
        assert!(production.enclave.state().server("search").is_none());
    }
    assert_eq!(
        sans_applied(production.enclave.state().snapshot()),
        sans_applied(before)
    );

    // The same action for this deployment is accepted; the log verifies.
    production.admin_ok(&admin, server.register());
    assert!(production.enclave.state().server("search").is_some());
    verify_log(
        &production.store,
        log_policy(&production.nsm),
        production.now,
    )
    .unwrap();

    // After a restart, which learns the genesis hash from the verified log, the same holds.
    production.advance(MINUTE_MS);
    let (nsm, store, now) = (
        production.nsm.clone(),
        production.store.clone(),
        production.now,
    );
    let mut restarted = match Harness::boot(nsm, store, &[], now) {
        Ok(h) => h,
        Err((r, _)) => panic!("restart refused: {r:?}"),
    };
    assert_eq!(restarted.deployment(), production.deployment());
    let revoke = || AdminAction::RevokeServer {
        id: "search".into(),
    };
    let nonce = restarted.nonce();
    let foreign = admin.sign(&staging.deployment(), restarted.now, nonce, revoke());
    let (accepted, _, reason) = restarted.admin_bytes(foreign);
    assert!(!accepted);
    assert!(reason.unwrap().contains("another deployment"));
    restarted.admin_ok(&admin, revoke());
    assert!(restarted.enclave.state().server("search").is_none());
}

#[test]
fn refuses_replayed_admin_request() {
    let admin = Admin::new(1);
    let server = McpServer::new("search", "acme", 1);
    let mut h = Harness::new(&[&admin]);

    let register = h.signed(&admin, server.register());
    let (accepted, _, reason) = h.admin_bytes(register.clone());
    assert!(accepted, "{reason:?}");
    let after_first = h.enclave.state().snapshot();

    // The same bytes again, a second later.
    h.advance(1_000);
    let (accepted, seq, reason) = h.admin_bytes(register.clone());
    assert!(!accepted);
    assert!(reason.unwrap().contains("replayed"));
    let (logged, logged_accepted, _) = admin_event(&h, seq);
    assert_eq!(logged, register);
    assert!(!logged_accepted);
    assert_eq!(
        sans_applied(h.enclave.state().snapshot()),
        sans_applied(after_first)
    );

    // Even once the action would apply again (the server is revoked), the nonce is spent.
    h.admin_ok(
        &admin,
        AdminAction::RevokeServer {
            id: "search".into(),
        },
    );
    assert!(h.enclave.state().server("search").is_none());
    let (accepted, _, reason) = h.admin_bytes(register.clone());
    assert!(!accepted);
    assert!(reason.unwrap().contains("replayed"));
    assert!(h.enclave.state().server("search").is_none());

    // Stale and future requests fall outside the 5-minute window.
    let before = h.enclave.state().snapshot();
    for time in [
        UnixMillis::from_millis(h.now.as_millis() - 5 * MINUTE_MS - 1),
        UnixMillis::from_millis(h.now.as_millis() + 5 * MINUTE_MS + 1),
    ] {
        let nonce = h.nonce();
        let stale = admin.sign(&h.deployment(), time, nonce, server.register());
        let (accepted, seq, reason) = h.admin_bytes(stale.clone());
        assert!(!accepted);
        assert!(reason.unwrap().contains("outside the window"));
        assert_eq!(admin_event(&h, seq).0, stale);
    }
    assert_eq!(
        sans_applied(h.enclave.state().snapshot()),
        sans_applied(before)
    );
    // Just inside the window is fine.
    let nonce = h.nonce();
    let edge = admin.sign(
        &h.deployment(),
        UnixMillis::from_millis(h.now.as_millis() - 5 * MINUTE_MS),
        nonce,
        server.register(),
    );
    assert!(h.admin_bytes(edge).0);

    // Long after, the first request is refused as stale (its nonce may have been forgotten).
    h.advance(20 * MINUTE_MS);
    let (accepted, _, reason) = h.admin_bytes(register);
    assert!(!accepted);
    assert!(reason.unwrap().contains("outside the window"));
}

#[test]
fn key_rotation_takes_effect() {
    let old = Admin::new(1);
    let new = Admin::new(2);
    let a = McpServer::new("alpha", "acme", 1);
    let b = McpServer::new("beta", "acme", 2);
    let mut h = Harness::new(&[&old]);

    // Signed by the old key before the rotation, sent after it.
    let signed_before = h.signed(&old, a.register());
    h.admin_ok(
        &old,
        AdminAction::RotateAdminKeys {
            keys: vec![new.public()],
        },
    );
    assert_eq!(
        h.enclave.state().snapshot().admin_keys,
        vec![hex::encode(new.public())]
    );

    let (accepted, seq, reason) = h.admin_bytes(signed_before);
    assert!(!accepted);
    assert!(reason.unwrap().contains("not a current admin key"));
    assert!(!admin_event(&h, seq).1);
    let fresh_old = h.signed(&old, a.register());
    let (accepted, _, reason) = h.admin_bytes(fresh_old);
    assert!(!accepted);
    assert!(reason.unwrap().contains("not a current admin key"));
    assert!(h.enclave.state().server("alpha").is_none());

    h.admin_ok(&new, b.register());
    assert!(h.enclave.state().server("beta").is_some());

    // An unusable key set is refused and the current one stays.
    let weak = h.signed(
        &new,
        AdminAction::RotateAdminKeys {
            keys: vec![[0; 32]],
        },
    );
    let (accepted, _, reason) = h.admin_bytes(weak);
    assert!(!accepted);
    assert!(reason.unwrap().contains("unusable admin key"));
    assert_eq!(
        h.enclave.state().snapshot().admin_keys,
        vec![hex::encode(new.public())]
    );

    // The rotation replays: a fresh enclave over the stored log has the same keys.
    let store = h.store.clone();
    h.advance(1_000);
    let restarted = Harness::boot(h.nsm.clone(), store, &[old.public()], h.now)
        .unwrap_or_else(|(r, _)| panic!("restart failed: {r:?}"));
    assert_eq!(
        restarted.enclave.state().snapshot().admin_keys,
        vec![hex::encode(new.public())]
    );
}

#[test]
fn refuses_policy_that_fails_schema_validation() {
    let admin = Admin::new(1);
    let mut h = Harness::new(&[&admin]);
    h.admin_ok(
        &admin,
        AdminAction::SetPolicy {
            text: STARTER_POLICY.into(),
        },
    );

    for bad in [
        // An attribute the schema does not have.
        r#"permit (principal, action == Attestplane::Action::"resolve", resource)
           when { principal.clearance > 3 };"#,
        // An action the schema does not have.
        r#"permit (principal, action == Attestplane::Action::"delete", resource);"#,
        // A call scoped to a Server: can never match.
        r#"permit (principal, action == Attestplane::Action::"call", resource is Attestplane::Server);"#,
        // Not Cedar.
        "permit (principal, action, resource",
    ] {
        let request = h.signed(&admin, AdminAction::SetPolicy { text: bad.into() });
        let (accepted, seq, reason) = h.admin_bytes(request.clone());
        assert!(!accepted, "accepted: {bad}");
        assert!(reason.is_some());
        let (logged, logged_accepted, logged_reason) = admin_event(&h, seq);
        assert_eq!(logged, request);
        assert!(!logged_accepted);
        assert_eq!(logged_reason, Some(Reason::InvalidPolicy));
        assert_eq!(logged_reason.map(|r| r.to_string()), reason);
        assert_eq!(h.enclave.state().policy().text(), STARTER_POLICY);
    }

    // The old policy still decides: the starter policy lets a same-tenant agent discover.
    let server = McpServer::new("search", "acme", 1);
    let idp = idp();
    h.admin_ok(&admin, server.register());
    h.admin_ok(&admin, idp.install());
    let bearer = idp.token(ACME_AGENT, "acme", &[], h.now);
    assert_eq!(expect_servers(h.discover(&bearer)).0, vec!["search"]);
}

// ---------------------------------------------------------------------------------------------
// Server attestation and handles
// ---------------------------------------------------------------------------------------------

#[test]
fn no_handle_for_unattested_server() {
    let Started { mut h, bearer, .. } = Started::search();

    let reply = h.resolve(&bearer, "search");
    let (seq, reason, code) = expect_denied(&reply);
    assert_eq!(code, ErrorCode::Denied);
    assert_eq!(reason, "server has no verified attestation");
    let d = decision(&h, seq);
    assert!(!d.allowed);
    assert!(d.handle.is_none());
    assert!(!d.attestation.verified);
    assert_eq!(d.reason.map(|r| r.to_string()), Some(reason.clone()));

    // Nor may its tools be called.
    let (allowed, seq, reason) = expect_authorized(&h.authorize(&bearer, "search", "search"));
    assert!(!allowed);
    assert_eq!(
        reason.as_deref(),
        Some("server has no verified attestation")
    );
    assert!(!decision(&h, seq).allowed);
}

#[test]
fn no_handle_for_stale_attestation() {
    let Started {
        server,
        mut h,
        bearer,
        ..
    } = Started::search();

    assert!(expect_attest(&h.attest(&server)).0);
    h.advance(MAX_ATTESTATION_AGE_MS);
    expect_handle(h.resolve(&bearer, "search"));

    // One millisecond past the registration's max age: no handle.
    h.advance(1);
    let reply = h.resolve(&bearer, "search");
    let (seq, reason, _) = expect_denied(&reply);
    assert_eq!(reason, "server attestation is stale");
    let d = decision(&h, seq);
    assert!(!d.attestation.verified);
    assert_eq!(d.attestation.age_ms, Some(MAX_ATTESTATION_AGE_MS + 1));
    assert!(d.handle.is_none());

    // A document that was already old when presented does not verify.
    let nonce = h.challenge("search");
    let old = server.attest(
        &nonce,
        UnixMillis::from_millis(h.now.as_millis() - ATTESTATION_FRESHNESS_MS - 1),
    );
    let (verified, seq, _, reason) = expect_attest(&h.evidence("search", &nonce, old));
    assert!(!verified);
    assert!(reason.unwrap().contains("old"));
    assert!(!attestation_event(&h, seq).verified);
    expect_denied(&h.resolve(&bearer, "search"));

    // A fresh attestation restores it.
    assert!(expect_attest(&h.attest(&server)).0);
    expect_handle(h.resolve(&bearer, "search"));
}

#[test]
fn no_handle_for_mismatched_pcrs() {
    let admin = Admin::new(1);
    let server = McpServer::new("search", "acme", 1);
    // Same root, same id, another image.
    let impostor = McpServer::new("search", "acme", 2);
    let idp = idp();
    let mut h = started(&admin, &[&server], &idp);
    let bearer = idp.token(ACME_AGENT, "acme", &["tool-user"], h.now);

    let nonce = h.challenge("search");
    let document = impostor.attest(&nonce, h.now);
    let (verified, seq, measurement, reason) =
        expect_attest(&h.evidence("search", &nonce, document.clone()));
    assert!(!verified);
    assert!(measurement.is_none());
    assert!(reason.unwrap().contains("pcr"));
    let record = attestation_event(&h, seq);
    assert!(!record.verified);
    assert!(record.measurement.is_none());
    assert_eq!(record.document, document, "the refused document is logged");
    assert_eq!(record.nonce, nonce);
    expect_denied(&h.resolve(&bearer, "search"));

    // The genuine image verifies and gets a handle…
    let (verified, seq, measurement, _) = expect_attest(&h.attest(&server));
    assert!(verified);
    let record = attestation_event(&h, seq);
    assert_eq!(
        record.measurement.map(hex::encode),
        measurement,
        "the logged measurement is the one answered"
    );
    expect_handle(h.resolve(&bearer, "search"));

    // …and a later mismatching document withdraws it.
    let nonce = h.challenge("search");
    let document = impostor.attest(&nonce, h.now);
    assert!(!expect_attest(&h.evidence("search", &nonce, document)).0);
    let (_, reason, _) = expect_denied(&h.resolve(&bearer, "search"));
    assert_eq!(reason, "server has no verified attestation");
}

#[test]
fn no_handle_for_debug_server() {
    let admin = Admin::new(1);
    let debug = McpServer::debug("dbg", "acme");
    let idp = idp();
    let mut h = started(&admin, &[&debug], &idp);
    let bearer = idp.token(ACME_AGENT, "acme", &["tool-user"], h.now);

    // The registration does not allow debug: the document is refused.
    let (verified, seq, _, reason) = expect_attest(&h.attest(&debug));
    assert!(!verified);
    assert!(reason.unwrap().contains("debug"));
    assert!(!attestation_event(&h, seq).verified);
    expect_denied(&h.resolve(&bearer, "dbg"));

    // Allowed by the registration, the document verifies, marked debug; the starter policy still
    // refuses a handle to a debug server.
    let mut spec = debug.spec.clone();
    spec.allow_debug = true;
    h.admin_ok(&admin, AdminAction::UpdateServer(spec));
    assert!(expect_attest(&h.attest(&debug)).0);
    let (seq, reason, _) = expect_denied(&h.resolve(&bearer, "dbg"));
    assert_eq!(reason, "no policy permits it (deny by default)");
    let d = decision(&h, seq);
    assert!(d.attestation.verified);
    assert!(d.attestation.debug);

    // Only registration and policy together let a debug server through.
    h.admin_ok(
        &admin,
        AdminAction::SetPolicy {
            text: permissive_policy(600),
        },
    );
    let (token, seq, _) = expect_handle(h.resolve(&bearer, "dbg"));
    assert!(!token.is_empty());
    assert!(decision(&h, seq).attestation.debug);
}

#[test]
fn attestation_with_wrong_or_reused_nonce_is_refused() {
    let admin = Admin::new(1);
    let server = McpServer::new("search", "acme", 1);
    let other = McpServer::new("other", "acme", 3);
    let idp = idp();
    let mut h = started(&admin, &[&server, &other], &idp);
    let bearer = idp.token(ACME_AGENT, "acme", &["tool-user"], h.now);

    // The document carries another nonce than the one issued and presented.
    let issued = h.challenge("search");
    let document = server.attest(b"a nonce the enclave never issued", h.now);
    let (verified, seq, _, reason) = expect_attest(&h.evidence("search", &issued, document));
    assert!(!verified);
    assert!(reason.unwrap().contains("nonce"));
    assert!(!attestation_event(&h, seq).verified);

    // A nonce the enclave never issued, carried by the document and presented.
    let invented = b"a nonce the enclave never issued".to_vec();
    let document = server.attest(&invented, h.now);
    let (verified, seq, _, reason) = expect_attest(&h.evidence("search", &invented, document));
    assert!(!verified);
    assert!(reason.unwrap().contains("challenge"));
    assert_eq!(attestation_event(&h, seq).nonce, invented);
    expect_denied(&h.resolve(&bearer, "search"));

    // A good presentation, then the same nonce and document again.
    let nonce = h.challenge("search");
    let document = server.attest(&nonce, h.now);
    assert!(expect_attest(&h.evidence("search", &nonce, document.clone())).0);
    expect_handle(h.resolve(&bearer, "search"));
    h.advance(1_000);
    let (verified, seq, _, reason) = expect_attest(&h.evidence("search", &nonce, document));
    assert!(!verified);
    assert!(reason.unwrap().contains("challenge"));
    assert!(!attestation_event(&h, seq).verified);

    // A nonce issued for another server.
    let for_other = h.challenge("other");
    let document = server.attest(&for_other, h.now);
    let (verified, _, _, _) = expect_attest(&h.evidence("search", &for_other, document));
    assert!(!verified);

    // An expired nonce.
    let nonce = h.challenge("search");
    h.advance(CHALLENGE_TTL_MS);
    let document = server.attest(&nonce, h.now);
    let (verified, seq, _, reason) = expect_attest(&h.evidence("search", &nonce, document));
    assert!(!verified);
    assert!(reason.unwrap().contains("challenge"));
    assert_eq!(
        attestation_event(&h, seq).reason,
        Some(Reason::NonceNotIssued)
    );
    // Refused evidence says nothing about the server: its attestation stands.
    expect_handle(h.resolve(&bearer, "search"));

    // Evidence for a server that is not registered is refused without an entry.
    let len = h.store.len();
    let reply = h.evidence("nobody", &nonce, server.attest(&nonce, h.now));
    expect_error(reply, ErrorCode::NotFound);
    assert_eq!(h.store.len(), len);

    // All of it replays.
    verify_log(&h.store, log_policy(&h.nsm), h.now).unwrap();
    let store = h.store.clone();
    h.advance(1);
    Harness::boot(h.nsm.clone(), store, &[], h.now)
        .unwrap_or_else(|(r, _)| panic!("restart failed: {r:?}"));
}

#[test]
fn unissued_nonce_cannot_deattest_a_server() {
    // Anyone on the enclave channel can present evidence. Evidence under a nonce the enclave
    // never issued (or one already used, or expired) is logged as refused and changes nothing:
    // it must not withdraw the attestation the server proved with a nonce the enclave did issue.
    let Started {
        server,
        mut h,
        bearer,
        ..
    } = Started::search();
    assert!(expect_attest(&h.attest(&server)).0);
    let attested = h.enclave.state().server("search").unwrap().attested.clone();
    assert!(attested.is_some());
    h.advance(1_000);

    for (nonce, document) in [
        (b"invented".to_vec(), b"garbage".to_vec()),
        (b"invented".to_vec(), server.attest(b"invented", h.now)),
        (vec![0; 32], server.attest(&[0; 32], h.now)),
    ] {
        let (verified, seq, _, _) = expect_attest(&h.evidence("search", &nonce, document));
        assert!(!verified);
        let logged = attestation_event(&h, seq);
        assert_eq!(logged.reason, Some(Reason::NonceNotIssued));
        assert_eq!(
            h.enclave.state().server("search").unwrap().attested,
            attested,
            "refused evidence withdrew the server's attestation"
        );
        expect_handle(h.resolve(&bearer, "search"));
    }

    // The auditor's replay and the enclave's boot fold the refusals the same way.
    verify_log(&h.store, log_policy(&h.nsm), h.now).unwrap();
    let mut audit =
        attestplane_verifier::replay::Replay::new(log_policy(&h.nsm), h.now, server_anchor())
            .unwrap();
    audit
        .push_round(&h.store)
        .unwrap_or_else(|e| panic!("replay refused the log: {e}"));
    assert_eq!(audit.state().server("search").unwrap().attested, attested);
    let store = h.store.clone();
    h.advance(1);
    let mut h = Harness::boot(h.nsm.clone(), store, &[], h.now)
        .unwrap_or_else(|(r, _)| panic!("restart failed: {r:?}"));
    assert_eq!(
        h.enclave.state().server("search").unwrap().attested,
        attested
    );
    expect_handle(h.resolve(&bearer, "search"));
}

#[test]
fn handle_verifies_against_served_jwks() {
    let Started {
        server,
        idp,
        mut h,
        bearer,
        ..
    } = Started::search();
    let (_, _, measurement, _) = expect_attest(&h.attest(&server));
    h.advance(2_000);

    let (token, seq, expires_at) = expect_handle(h.resolve(&bearer, "search"));
    let (document, jwks) = h.own_attestation(Some(b"relying party nonce"));

    // The document is the enclave's own, fresh, with the caller's nonce, and attests the JWKS key.
    let self_anchor = TrustAnchor::from_pem(h.nsm.root_pem().unwrap().as_bytes()).unwrap();
    let verified = verify_attestation(
        &document,
        &self_anchor,
        &Expectations {
            pcrs: image_pcrs(&h.nsm),
            nonce: Some(b"relying party nonce".to_vec()),
            max_age_ms: Some(1_000),
            ..Expectations::default()
        },
        VerifyAt::Instant(h.now),
    )
    .unwrap();
    assert_eq!(jwks.len(), 1);
    let kid = jwks.kids().next().unwrap().to_string();
    let key = jwks.get(&kid).unwrap();
    assert_eq!(verified.public_key(), Some(key.as_bytes().as_slice()));

    // The handle verifies under that key, for the server's resource.
    let expect = HandleExpectations {
        issuer: Some(ISSUER.into()),
        audience: Some(server.spec.resource.clone()),
        leeway_secs: 0,
    };
    let handle = verify_handle(&token, &jwks, &expect, h.now).unwrap();
    assert_eq!(handle.kid(), kid);
    let claims = handle.claims();
    assert_eq!(claims.sub, ACME_AGENT);
    assert_eq!(claims.aud, server.spec.resource);
    assert_eq!(claims.tenant, "acme");
    assert_eq!(claims.server, "search");
    assert_eq!(claims.seq, seq);
    assert_eq!(claims.exp, expires_at);
    assert_eq!(claims.iat, h.now.as_secs());
    assert_eq!(claims.tools, vec!["search", "write"]);
    assert_eq!(Some(claims.measurement.clone()), measurement);

    // The entry at `seq` is in the persisted log, signed by the same key, and issued this handle.
    let signed = SignedEntry::decode(&h.store[seq as usize]).unwrap();
    assert_eq!(signed.kid().to_hex(), kid);
    let d = decision(&h, seq);
    assert!(d.allowed);
    let record = d.handle.unwrap();
    assert_eq!(record.jti, claims.jti);
    assert_eq!(record.expires, claims.exp);
    assert_eq!(record.audience, claims.aud);
    assert_eq!(record.tools, claims.tools);

    // Not for another audience, not after it expires.
    let wrong = HandleExpectations {
        audience: Some("https://other.example/mcp".into()),
        ..expect.clone()
    };
    assert!(matches!(
        verify_handle(&token, &jwks, &wrong, h.now),
        Err(HandleError::WrongAudience { .. })
    ));
    assert!(matches!(
        verify_handle(&token, &jwks, &expect, UnixMillis::from_secs(expires_at)),
        Err(HandleError::Expired { .. })
    ));

    // A handle names only the tools the policy lets the agent call.
    let plain = idp.token("agent-8", "acme", &[], h.now);
    let (token, _, _) = expect_handle(h.resolve(&plain, "search"));
    let handle = verify_handle(&token, &jwks, &expect, h.now).unwrap();
    assert!(handle.claims().tools.is_empty());

    // Neither handles nor bearer tokens are logged.
    for secret in [&token, &bearer, &plain] {
        assert!(!h.store.iter().any(|e| contains(e, secret.as_bytes())));
    }
}

// ---------------------------------------------------------------------------------------------
// Agents' requests
// ---------------------------------------------------------------------------------------------

#[test]
fn refuses_cross_tenant_resolve() {
    let admin = Admin::new(1);
    let ours = McpServer::new("ours", "acme", 1);
    let theirs = McpServer::new("theirs", "globex", 2);
    let idp = idp();
    let mut h = started(&admin, &[&ours, &theirs], &idp);
    assert!(expect_attest(&h.attest(&ours)).0);
    assert!(expect_attest(&h.attest(&theirs)).0);
    let bearer = idp.token(ACME_AGENT, "acme", &["tool-user"], h.now);

    expect_handle(h.resolve(&bearer, "ours"));
    let (seq, reason, code) = expect_denied(&h.resolve(&bearer, "theirs"));
    assert_eq!(code, ErrorCode::Denied);
    assert_eq!(reason, "server belongs to another tenant");
    let d = decision(&h, seq);
    assert!(!d.allowed && d.handle.is_none());
    assert_eq!(d.principal.tenant, "acme");
    assert_eq!(d.server, "theirs");

    // Not even under a policy that permits everything: tenancy is a hard rule.
    h.admin_ok(
        &admin,
        AdminAction::SetPolicy {
            text: r#"permit (principal, action, resource);"#.into(),
        },
    );
    let (_, reason, _) = expect_denied(&h.resolve(&bearer, "theirs"));
    assert_eq!(reason, "server belongs to another tenant");
    let (allowed, _, reason) = expect_authorized(&h.authorize(&bearer, "theirs", "search"));
    assert!(!allowed);
    assert_eq!(reason.as_deref(), Some("server belongs to another tenant"));
    assert_eq!(expect_servers(h.discover(&bearer)).0, vec!["ours"]);
}

#[test]
fn discover_filters_by_tenant_and_policy() {
    let admin = Admin::new(1);
    let alpha = McpServer::new("alpha", "acme", 1);
    let hidden = McpServer::new("hidden", "acme", 2);
    let gamma = McpServer::new("gamma", "globex", 3);
    let idp = idp();
    let mut h = Harness::new(&[&admin]);
    for s in [&alpha, &hidden, &gamma] {
        h.admin_ok(&admin, s.register());
    }
    h.admin_ok(&admin, idp.install());
    let acme = idp.token(ACME_AGENT, "acme", &[], h.now);
    let globex = idp.token("agent-g", "globex", &[], h.now);

    // No policy yet: deny by default, nothing to see (and that is logged).
    let (servers, seq) = expect_servers(h.discover(&acme));
    assert!(servers.is_empty());
    assert!(
        matches!(h.entry(seq).event, Event::Discovery { ref servers, .. } if servers.is_empty())
    );

    h.admin_ok(
        &admin,
        AdminAction::SetPolicy {
            text: r#"
@id("discover-visible")
permit (principal, action == Attestplane::Action::"discover", resource)
when { resource.name != "hidden server" };
"#
            .into(),
        },
    );
    assert!(expect_attest(&h.attest(&alpha)).0);

    let reply = h.discover(&acme);
    let Response::Servers { servers, seq } = reply else {
        panic!("expected Servers, got {reply:?}");
    };
    assert_eq!(servers.len(), 1);
    assert_eq!(servers[0].id, "alpha");
    assert_eq!(servers[0].tenant, "acme");
    assert_eq!(servers[0].resource, alpha.spec.resource);
    assert!(servers[0].attested);
    match h.entry(seq).event {
        Event::Discovery { principal, servers } => {
            assert_eq!(principal.agent, ACME_AGENT);
            assert_eq!(principal.tenant, "acme");
            assert_eq!(servers, vec!["alpha"]);
        }
        other => panic!("expected a discovery entry, got {other:?}"),
    }

    let (servers, _) = expect_servers(h.discover(&globex));
    assert_eq!(servers, vec!["gamma"]);

    // The starter policy shows every server of the agent's tenant.
    h.admin_ok(
        &admin,
        AdminAction::SetPolicy {
            text: STARTER_POLICY.into(),
        },
    );
    assert_eq!(expect_servers(h.discover(&acme)).0, vec!["alpha", "hidden"]);
}

#[test]
fn authorize_call_respects_pinned_tools_and_rate_limit() {
    let admin = Admin::new(1);
    let server = McpServer::new("search", "acme", 1);
    let idp = idp();
    let mut h = started(&admin, &[&server], &idp);
    assert!(expect_attest(&h.attest(&server)).0);
    let user = idp.token(ACME_AGENT, "acme", &["tool-user"], h.now);
    let plain = idp.token("agent-8", "acme", &[], h.now);

    let (allowed, seq, reason) = expect_authorized(&h.authorize(&user, "search", "search"));
    assert!(allowed, "{reason:?}");
    let d = decision(&h, seq);
    assert!(d.allowed);
    assert_eq!(d.tool.as_deref(), Some("search"));
    assert_eq!(d.policies, vec!["call-tool-user"]);

    // A tool that is not pinned in the registration.
    let reply = h.authorize(&user, "search", "delete-everything");
    let (seq, reason, code) = expect_denied(&reply);
    assert_eq!(code, ErrorCode::NotFound);
    assert_eq!(
        decision(&h, seq).reason,
        Some(Reason::ToolNotPinned {
            tool: "delete-everything".into()
        })
    );
    assert_eq!(decision(&h, seq).reason.unwrap().to_string(), reason);
    assert!(!decision(&h, seq).allowed);

    // No role, no permit.
    let (allowed, _, reason) = expect_authorized(&h.authorize(&plain, "search", "search"));
    assert!(!allowed);
    assert_eq!(
        reason.as_deref(),
        Some("no policy permits it (deny by default)")
    );

    // A rate limit of 3 calls a minute.
    h.admin_ok(
        &admin,
        AdminAction::SetPolicy {
            text: permissive_policy(3),
        },
    );
    let bot = idp.token("bot", "acme", &[], h.now);
    for n in 0..3 {
        let (allowed, seq, reason) = expect_authorized(&h.authorize(&bot, "search", "write"));
        assert!(allowed, "call {n}: {reason:?}");
        assert_eq!(decision(&h, seq).calls_last_minute, n);
        h.advance(1_000);
    }
    let first_call = h.now.as_millis() - 3_000;
    for _ in 0..2 {
        let (allowed, seq, reason) = expect_authorized(&h.authorize(&bot, "search", "write"));
        assert!(!allowed);
        assert_eq!(reason.as_deref(), Some("forbidden by policy rate"));
        let d = decision(&h, seq);
        assert_eq!(d.calls_last_minute, 3, "refused calls do not count");
        assert_eq!(d.policies, vec!["rate"]);
    }
    // Another agent has its own budget.
    assert!(expect_authorized(&h.authorize(&plain, "search", "write")).0);
    // Once the first call leaves the window, one more is allowed.
    h.now = UnixMillis::from_millis(first_call + MINUTE_MS + 1);
    let (allowed, seq, _) = expect_authorized(&h.authorize(&bot, "search", "write"));
    assert!(allowed);
    assert_eq!(decision(&h, seq).calls_last_minute, 2);

    // Unknown servers are refused as such, and logged.
    let (seq, reason, code) = expect_denied(&h.authorize(&bot, "nowhere", "write"));
    assert_eq!(code, ErrorCode::NotFound);
    assert_eq!(
        decision(&h, seq).reason,
        Some(Reason::UnknownServer {
            server: "nowhere".into()
        })
    );
    assert!(reason.contains("unknown server"), "{reason}");
    assert_eq!(decision(&h, seq).server, "nowhere");

    // The counters replay.
    let store = h.store.clone();
    let snapshot = h.enclave.state().snapshot();
    let restarted = Harness::boot(h.nsm.clone(), store, &[], h.now)
        .unwrap_or_else(|(r, _)| panic!("restart failed: {r:?}"));
    assert_eq!(restarted.enclave.state().snapshot().calls, snapshot.calls);
}

#[test]
fn denied_requests_are_logged() {
    let admin = Admin::new(1);
    let server = McpServer::new("search", "acme", 1);
    let idp = idp();
    let mut h = started(&admin, &[&server], &idp);
    let user = idp.token(ACME_AGENT, "acme", &["tool-user"], h.now);

    let mut refusals = Vec::new();
    let (seq, reason, _) = expect_denied(&h.resolve(&user, "search"));
    refusals.push((seq, reason));
    let (seq, reason, code) = expect_denied(&h.resolve(&user, "nowhere"));
    assert_eq!(code, ErrorCode::NotFound);
    refusals.push((seq, reason));
    let (allowed, seq, reason) = expect_authorized(&h.authorize(&user, "search", "search"));
    assert!(!allowed);
    refusals.push((seq, reason.unwrap()));
    let (seq, reason, _) = expect_denied(&h.authorize(&user, "nowhere", "search"));
    refusals.push((seq, reason));

    for (seq, reason) in &refusals {
        let d = decision(&h, *seq);
        assert!(!d.allowed);
        assert!(d.handle.is_none());
        assert_eq!(d.reason.map(|r| r.to_string()), Some(reason.clone()));
        assert_eq!(d.principal.agent, ACME_AGENT);
    }
    // Each reply names its own entry, and the entries are the last ones written.
    let seqs: Vec<u64> = refusals.iter().map(|(s, _)| *s).collect();
    let len = h.store.len() as u64;
    assert_eq!(seqs, (len - 4..len).collect::<Vec<_>>());

    // A refused admin request and a refused attestation are logged too.
    let mallory = Admin::new(9);
    let forged = h.signed(
        &mallory,
        AdminAction::RevokeServer {
            id: "search".into(),
        },
    );
    let (accepted, seq, _) = h.admin_bytes(forged);
    assert!(!accepted);
    assert!(!admin_event(&h, seq).1);
    let nonce = h.challenge("search");
    let (verified, seq, _, _) =
        expect_attest(&h.evidence("search", &nonce, b"not a document".to_vec()));
    assert!(!verified);
    assert!(attestation_event(&h, seq).reason.is_some());

    // Everything logged replays to the same decisions.
    let store = h.store.clone();
    Harness::boot(h.nsm.clone(), store, &[], h.now)
        .unwrap_or_else(|(r, _)| panic!("restart failed: {r:?}"));
}

#[test]
fn unauthenticated_requests_are_not_logged() {
    let admin = Admin::new(1);
    let server = McpServer::new("search", "acme", 1);
    let idp = idp();
    let mut h = started(&admin, &[&server], &idp);
    assert!(expect_attest(&h.attest(&server)).0);

    let now = h.now;
    let mut impostor = Idp::new(41, &idp.issuer);
    impostor.kid = idp.kid.clone();
    let unknown_issuer = Idp::new(42, "https://idp.evil.example");
    let mut expired = idp.claims(ACME_AGENT, "acme", &["tool-user"], now);
    expired["exp"] = serde_json::json!(now.as_secs() - 120);
    let mut wrong_aud = idp.claims(ACME_AGENT, "acme", &["tool-user"], now);
    wrong_aud["aud"] = serde_json::json!("someone-else");
    let mut no_tenant = idp.claims(ACME_AGENT, "acme", &["tool-user"], now);
    no_tenant.as_object_mut().unwrap().remove("tenant");
    let good = idp.token(ACME_AGENT, "acme", &["tool-user"], now);
    let parts: Vec<&str> = good.split('.').collect();
    let b64 = |bytes: &[u8]| URL_SAFE_NO_PAD.encode(bytes);
    // `alg: none`, no signature.
    let unsigned_none = format!("{}.{}.", b64(br#"{"alg":"none","typ":"JWT"}"#), parts[1]);
    // A genuine signature over claims naming another tenant.
    let other_tenant = idp.claims(ACME_AGENT, "globex", &["tool-user"], now);
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        b64(&serde_json::to_vec(&other_tenant).unwrap()),
        parts[2]
    );

    let bad_bearers = [
        "".to_string(),
        "not a token".to_string(),
        impostor.token(ACME_AGENT, "acme", &["tool-user"], now),
        unknown_issuer.token(ACME_AGENT, "acme", &["tool-user"], now),
        idp.sign_claims(&expired),
        idp.sign_claims(&wrong_aud),
        idp.sign_claims(&no_tenant),
        unsigned_none,
        tampered,
        "x".repeat(9_000),
    ];
    let len = h.store.len();
    let head = h.status();
    for bearer in &bad_bearers {
        for request in [
            Request::Resolve {
                bearer: bearer.clone(),
                server_id: "search".into(),
            },
            Request::Discover {
                bearer: bearer.clone(),
            },
            Request::Authorize {
                bearer: bearer.clone(),
                server_id: "search".into(),
                tool: "search".into(),
            },
        ] {
            let message = expect_error(h.send(request), ErrorCode::Unauthenticated);
            if bearer.len() > 8 {
                assert!(!message.contains(bearer.as_str()), "the token leaks");
            }
        }
    }
    assert_eq!(h.store.len(), len, "nothing was logged");
    assert_eq!(h.status(), head);

    // The good token works, and is logged as the identity only.
    expect_handle(h.resolve(&good, "search"));
    assert_eq!(h.store.len(), len + 1);
}

// ---------------------------------------------------------------------------------------------
// The log: durability, boot, restart
// ---------------------------------------------------------------------------------------------

/// The final reply comes with its `Persist`, wrapped in `Held` through the last entry it
/// depends on (the host releases it once that entry is durable); the enclave's own view of
/// durability is the host's `Durable`, and checkpoints wait for it.
#[test]
fn final_reply_is_held_for_its_entry_and_checkpoints_wait_for_durable() {
    let admin = Admin::new(1);
    let server = McpServer::new("search", "acme", 1);
    let mut h = Harness::new(&[&admin]);

    let first = h.signed(&admin, server.register());
    let second = h.signed(
        &admin,
        AdminAction::SetPolicy {
            text: STARTER_POLICY.into(),
        },
    );
    let (id1, r1) = h.send_raw(Request::Admin {
        request: ByteBuf::from(first),
    });
    let (id2, r2) = h.send_raw(Request::Admin {
        request: ByteBuf::from(second),
    });
    let split = |replies: &Replies, id: u64| match replies.as_slice() {
        [
            (pid, Response::Persist { first_seq, entries }),
            (hid, Response::Held { through_seq, reply }),
        ] if *pid == id && *hid == id => {
            assert_eq!(entries.len(), 1);
            assert_eq!(through_seq, first_seq, "held for its own entry");
            (*first_seq, entries[0].to_vec(), (**reply).clone())
        }
        other => panic!("expected a Persist and a Held, got {other:?}"),
    };
    let (s1, e1, final1) = split(&r1, id1);
    let (s2, e2, final2) = split(&r2, id2);
    assert_eq!(s2, s1 + 1);
    assert_eq!(decode(&e2).prev, EntryHash::of(&e1));
    for (reply, seq) in [(final1, s1), (final2, s2)] {
        assert_eq!(
            reply,
            Response::AdminResult {
                accepted: true,
                seq,
                reason: None
            }
        );
    }

    // Nothing reported durable yet: a checkpoint would cover undurable entries.
    let message = expect_error(h.send(Request::Checkpoint), ErrorCode::NotReady);
    assert!(message.contains("durab"));

    // Durable through the first: acknowledged, nothing else; a checkpoint still waits.
    h.store.extend([e1, e2]);
    let (did, acked) = h.send_raw(Request::Durable { through_seq: s1 });
    assert_eq!(acked, vec![(did, Response::Ack)]);
    expect_error(h.send(Request::Checkpoint), ErrorCode::NotReady);
    let (did, acked) = h.send_raw(Request::Durable { through_seq: s2 });
    assert_eq!(acked, vec![(did, Response::Ack)]);
    match h.status() {
        Response::Status { durable_seq, .. } => assert_eq!(durable_seq, Some(s2)),
        other => panic!("{other:?}"),
    }
    // Beyond the head is refused.
    expect_error(
        h.send(Request::Durable {
            through_seq: s2 + 1,
        }),
        ErrorCode::BadRequest,
    );

    // Now a checkpoint covers the whole log, signed by the epoch key.
    let Response::Checkpoint { note } = h.send(Request::Checkpoint) else {
        panic!("expected a checkpoint");
    };
    let (_, jwks) = h.own_attestation(None);
    let key = jwks.get(jwks.kids().next().unwrap()).unwrap();
    let cp = verify_checkpoint(&note, ORIGIN, key).unwrap();
    assert_eq!(cp.size(), h.store.len() as u64);
    let verified = verify_log(&h.store, log_policy(&h.nsm), h.now).unwrap();
    assert_eq!(*cp.root(), verified.root());
}

#[test]
fn requests_out_of_sequence_are_refused() {
    let admin = Admin::new(1);
    let nsm = enclave_nsm();
    // The host-chosen path (development only) is the one where the host's keys matter.
    let mut e = Enclave::new(nsm.clone(), config(&nsm)).with_insecure_host_chosen_genesis();
    let now = at(0);
    let one = |e: &mut Enclave, r: Request| {
        let mut replies = e.handle(5, r, now);
        assert_eq!(replies.len(), 1);
        replies.remove(0).1
    };

    assert_eq!(
        one(
            &mut e,
            Request::Hello {
                version: PROTOCOL_VERSION
            }
        ),
        Response::Hello {
            version: PROTOCOL_VERSION,
            ready: false,
            epoch: None,
            head_seq: None
        }
    );
    expect_error(
        one(
            &mut e,
            Request::Hello {
                version: PROTOCOL_VERSION + 1,
            },
        ),
        ErrorCode::UnsupportedVersion,
    );
    expect_error(
        one(
            &mut e,
            Request::Resolve {
                bearer: "t".into(),
                server_id: "s".into(),
            },
        ),
        ErrorCode::NotReady,
    );
    expect_error(one(&mut e, Request::Checkpoint), ErrorCode::NotReady);
    expect_error(
        one(&mut e, Request::Durable { through_seq: 0 }),
        ErrorCode::BadRequest,
    );
    expect_error(
        one(&mut e, Request::ReplayEntries { entries: vec![] }),
        ErrorCode::Conflict,
    );
    expect_error(one(&mut e, Request::ReplayEnd), ErrorCode::Conflict);
    expect_error(
        one(
            &mut e,
            Request::ReplayBegin {
                genesis_admin_keys: vec![ByteBuf::from(vec![1; 31])],
                total_entries: 0,
            },
        ),
        ErrorCode::BadRequest,
    );

    // An empty log without genesis keys cannot start; the host may try again with keys.
    assert_eq!(
        one(
            &mut e,
            Request::ReplayBegin {
                genesis_admin_keys: vec![],
                total_entries: 0,
            }
        ),
        Response::Ack
    );
    expect_error(
        one(
            &mut e,
            Request::ReplayBegin {
                genesis_admin_keys: vec![],
                total_entries: 0,
            },
        ),
        ErrorCode::Conflict,
    );
    let message = expect_error(one(&mut e, Request::ReplayEnd), ErrorCode::BadRequest);
    assert!(message.contains("genesis"));
    assert!(!e.is_ready());

    let mut h = Harness::boot(nsm, Vec::new(), &[admin.public()], now)
        .unwrap_or_else(|(r, _)| panic!("boot failed: {r:?}"));
    // The new epoch opens with the genesis epoch start and the genesis key set.
    assert_eq!(h.store.len(), 2);
    assert!(matches!(h.entry(0).event, Event::EpochStart { .. }));
    assert_eq!(
        h.entry(1).event,
        Event::Genesis {
            admin_keys: vec![admin.public()],
            host_chosen: false,
        }
    );
    assert_eq!(
        h.hello(),
        Response::Hello {
            version: PROTOCOL_VERSION,
            ready: true,
            epoch: Some(0),
            head_seq: Some(1)
        }
    );
    expect_error(
        h.send(Request::ReplayBegin {
            genesis_admin_keys: vec![],
            total_entries: 0,
        }),
        ErrorCode::Conflict,
    );
    expect_error(
        h.send(Request::AttestChallenge {
            server_id: "nobody".into(),
        }),
        ErrorCode::NotFound,
    );
    expect_error(
        h.send(Request::GetAttestation {
            nonce: Some(ByteBuf::from(vec![0; 2_000])),
        }),
        ErrorCode::BadRequest,
    );
    // Bytes that are not an admin request at all are refused without an entry.
    let len = h.store.len();
    expect_error(
        h.send(Request::Admin {
            request: ByteBuf::from(b"definitely not cose".to_vec()),
        }),
        ErrorCode::BadRequest,
    );
    assert_eq!(h.store.len(), len);
}

/// A stored log of a short session: genesis, registrations, policy, identity provider,
/// attestation, handle, call, discovery, a refused admin request.
fn session() -> (Harness, Admin, Idp, McpServer) {
    let admin = Admin::new(1);
    let server = McpServer::new("search", "acme", 1);
    let other = McpServer::new("gamma", "globex", 2);
    let idp = idp();
    let mut h = started(&admin, &[&server, &other], &idp);
    let bearer = idp.token(ACME_AGENT, "acme", &["tool-user"], h.now);
    h.advance(1_000);
    assert!(expect_attest(&h.attest(&server)).0);
    h.advance(1_000);
    expect_handle(h.resolve(&bearer, "search"));
    assert!(expect_authorized(&h.authorize(&bearer, "search", "search")).0);
    expect_denied(&h.resolve(&bearer, "gamma"));
    expect_servers(h.discover(&bearer));
    let mallory = Admin::new(9);
    let forged = h.signed(
        &mallory,
        AdminAction::RevokeServer {
            id: "search".into(),
        },
    );
    assert!(!h.admin_bytes(forged).0);
    h.advance(1_000);
    (h, admin, idp, server)
}

#[test]
fn refuses_to_serve_on_broken_chain_at_boot() {
    let (h, admin, idp, _) = session();
    let good = h.store.clone();
    let n = good.len();
    assert!(n > 10);
    let k = 8;
    let bearer = idp.token(ACME_AGENT, "acme", &["tool-user"], h.now);

    let mut flipped_signature = good.clone();
    *flipped_signature[k].last_mut().unwrap() ^= 0x01;
    let mut flipped_payload = good.clone();
    let middle = flipped_payload[k].len() / 2;
    flipped_payload[k][middle] ^= 0x01;
    let mut dropped = good.clone();
    dropped.remove(k);
    let mut swapped = good.clone();
    swapped.swap(k, k + 1);

    for (name, log) in [
        ("flipped signature byte", flipped_signature),
        ("flipped payload byte", flipped_payload),
        ("dropped entry", dropped),
        ("swapped entries", swapped),
    ] {
        let Err((reply, mut broken)) = Harness::boot(h.nsm.clone(), log, &[admin.public()], h.now)
        else {
            panic!("{name}: the enclave booted on a broken log");
        };
        match &reply {
            Response::BrokenLog { seq, message } => {
                assert_eq!(*seq, Some(k as u64), "{name}: {message}");
                assert!(!message.is_empty());
            }
            other => panic!("{name}: expected BrokenLog, got {other:?}"),
        }
        assert!(!broken.enclave.is_ready());
        // Every later request gets the same answer, and nothing new is written.
        let before = broken.store.len();
        for request in [
            Request::Hello {
                version: PROTOCOL_VERSION,
            },
            Request::Status,
            Request::ReplayEnd,
            Request::Resolve {
                bearer: bearer.clone(),
                server_id: "search".into(),
            },
            Request::GetAttestation { nonce: None },
            Request::Checkpoint,
        ] {
            assert_eq!(broken.send(request), reply, "{name}");
        }
        assert_eq!(broken.store.len(), before);
    }

    // A host that announces more entries than it sends.
    let mut e = Enclave::new(h.nsm.clone(), config(&h.nsm));
    let now = h.now;
    let mut send = |r: Request| {
        let mut replies = e.handle(3, r, now);
        assert_eq!(replies.len(), 1);
        replies.remove(0).1
    };
    assert_eq!(
        send(Request::ReplayBegin {
            genesis_admin_keys: vec![],
            total_entries: n as u64 + 1,
        }),
        Response::Ack
    );
    assert_eq!(
        send(Request::ReplayEntries {
            entries: good.iter().map(|e| ByteBuf::from(e.clone())).collect(),
        }),
        Response::Ack
    );
    match send(Request::ReplayEnd) {
        Response::BrokenLog { seq, .. } => assert_eq!(seq, Some(n as u64)),
        other => panic!("expected BrokenLog, got {other:?}"),
    }

    // The untouched log boots.
    Harness::boot(h.nsm.clone(), good, &[admin.public()], h.now)
        .unwrap_or_else(|(r, _)| panic!("the good log did not boot: {r:?}"));
}

#[test]
fn restart_replays_to_the_same_state_and_opens_a_linked_epoch() {
    let (mut h, admin, idp, server) = session();
    let bearer = idp.token(ACME_AGENT, "acme", &["tool-user"], h.now);
    let (old_token, _, _) = expect_handle(h.resolve(&bearer, "search"));
    let (_, old_jwks) = h.own_attestation(None);
    let old_store = h.store.clone();
    let old_snapshot = h.enclave.state().snapshot();
    let old_last = decode(old_store.last().unwrap());
    assert_eq!(old_snapshot.applied, old_store.len() as u64);

    // A new enclave over the same NSM (same image), a second later.
    h.advance(1_000);
    let mut r = Harness::boot(h.nsm.clone(), old_store.clone(), &[admin.public()], h.now)
        .unwrap_or_else(|(r, _)| panic!("restart failed: {r:?}"));

    // The same state; one more entry applied (the new epoch's start).
    let new_snapshot = r.enclave.state().snapshot();
    assert_eq!(new_snapshot.applied, old_snapshot.applied + 1);
    assert_eq!(sans_applied(new_snapshot), sans_applied(old_snapshot));

    // The new epoch starts right after the old head and links to it.
    assert_eq!(r.store.len(), old_store.len() + 1);
    assert_eq!(&r.store[..old_store.len()], &old_store[..]);
    let start_seq = old_store.len() as u64;
    let start = r.entry(start_seq);
    assert_eq!(start.seq, start_seq);
    assert_eq!(start.prev, EntryHash::of(old_store.last().unwrap()));
    assert_eq!(start.epoch, old_last.epoch + 1);
    let Event::EpochStart { attestation } = &start.event else {
        panic!("expected an epoch start, got {:?}", start.event);
    };
    let document = parse_attestation(attestation).unwrap();
    assert_eq!(
        EpochBinding::decode(document.user_data().unwrap()).unwrap(),
        EpochBinding {
            epoch: start.epoch,
            seq: start_seq,
            prev: start.prev,
        }
    );
    assert_eq!(
        r.hello(),
        Response::Hello {
            version: PROTOCOL_VERSION,
            ready: true,
            epoch: Some(1),
            head_seq: Some(start_seq),
        }
    );

    // An auditor accepts the two-epoch log…
    let policy = log_policy(&r.nsm);
    let verified = verify_log(&r.store, policy.clone(), r.now).unwrap();
    assert_eq!(verified.epochs().len(), 2);
    assert_eq!(verified.size(), r.store.len() as u64);
    // …and names the cut when the first epoch's last entry is removed.
    let mut cut = r.store.clone();
    cut.remove(old_store.len() - 1);
    let err = verify_log(&cut, policy.clone(), r.now).unwrap_err();
    assert_eq!(err.seq(), Some(start_seq - 1), "{err}");
    assert!(matches!(err, LogError::SequenceMismatch { .. }), "{err}");

    // The server's attestation survived the restart: a handle is issued without re-attesting,
    // signed by the new epoch's key.
    let (new_token, seq, _) = expect_handle(r.resolve(&bearer, "search"));
    let (_, new_jwks) = r.own_attestation(None);
    let old_kid = old_jwks.kids().next().unwrap().to_string();
    let new_kid = new_jwks.kids().next().unwrap().to_string();
    assert_ne!(old_kid, new_kid);
    let expect = HandleExpectations {
        issuer: Some(ISSUER.into()),
        audience: Some(server.spec.resource.clone()),
        leeway_secs: 0,
    };
    let handle = verify_handle(&new_token, &new_jwks, &expect, r.now).unwrap();
    assert_eq!(handle.kid(), new_kid);
    assert_eq!(handle.claims().seq, seq);
    assert_eq!(
        SignedEntry::decode(&r.store[seq as usize])
            .unwrap()
            .kid()
            .to_hex(),
        new_kid
    );
    // The previous epoch's key is not passed off as current.
    assert!(matches!(
        verify_handle(&old_token, &new_jwks, &expect, r.now),
        Err(HandleError::UnknownKid { .. })
    ));
    assert!(verify_handle(&new_token, &old_jwks, &expect, r.now).is_err());

    // The whole log still verifies, and a third boot replays both epochs.
    verify_log(&r.store, policy, r.now).unwrap();
    let snapshot = r.enclave.state().snapshot();
    r.advance(1_000);
    let third = Harness::boot(r.nsm.clone(), r.store.clone(), &[], r.now)
        .unwrap_or_else(|(r, _)| panic!("second restart failed: {r:?}"));
    assert_eq!(
        sans_applied(third.enclave.state().snapshot()),
        sans_applied(snapshot)
    );
    assert_eq!(
        third.store.len() as u64 - 1,
        verify_log(&third.store, log_policy(&third.nsm), third.now)
            .unwrap()
            .epochs()
            .last()
            .unwrap()
            .start_seq
    );
}

#[test]
fn clock_stepping_back_does_not_break_the_log() {
    let Started {
        admin,
        server,
        mut h,
        bearer,
        ..
    } = Started::search();
    h.advance(10_000);
    assert!(expect_attest(&h.attest(&server)).0);
    h.advance(5_000);
    expect_handle(h.resolve(&bearer, "search"));

    // Two requests whose clock readings arrive out of order (or a clock that steps back).
    let later = h.now;
    h.now = UnixMillis::from_millis(later.as_millis() - 3_000);
    expect_handle(h.resolve(&bearer, "search"));
    assert!(expect_authorized(&h.authorize(&bearer, "search", "search")).0);
    let signed = h.signed(
        &admin,
        AdminAction::SetPolicy {
            text: STARTER_POLICY.into(),
        },
    );
    assert!(h.admin_bytes(signed).0);
    expect_servers(h.discover(&bearer));
    assert!(expect_attest(&h.attest(&server)).0);
    h.now = later;
    expect_handle(h.resolve(&bearer, "search"));

    // Entry times never go back, and the log replays.
    let times: Vec<u64> = h.store.iter().map(|e| decode(e).time.as_millis()).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]));
    verify_log(&h.store, log_policy(&h.nsm), h.now).unwrap();
    h.advance(1_000);
    Harness::boot(h.nsm.clone(), h.store.clone(), &[], h.now)
        .unwrap_or_else(|(r, _)| panic!("restart failed: {r:?}"));
}

#[test]
fn updates_and_revocations_take_effect() {
    let Started {
        admin,
        server,
        idp,
        mut h,
        bearer,
    } = Started::search();
    assert!(expect_attest(&h.attest(&server)).0);
    expect_handle(h.resolve(&bearer, "search"));

    // A new registration must be attested again; its tools are what handles then carry.
    let mut spec = server.spec.clone();
    spec.tools.remove("write");
    h.admin_ok(&admin, AdminAction::UpdateServer(spec));
    let (_, reason, _) = expect_denied(&h.resolve(&bearer, "search"));
    assert_eq!(reason, "server has no verified attestation");
    assert!(expect_attest(&h.attest(&server)).0);
    let (token, _, _) = expect_handle(h.resolve(&bearer, "search"));
    let (_, jwks) = h.own_attestation(None);
    let handle = verify_handle(&token, &jwks, &HandleExpectations::default(), h.now).unwrap();
    assert_eq!(handle.claims().tools, vec!["search"]);
    let (seq, _, code) = expect_denied(&h.authorize(&bearer, "search", "write"));
    assert_eq!(code, ErrorCode::NotFound);
    assert!(!decision(&h, seq).allowed);

    // A revoked server gets no handle and no challenge.
    h.admin_ok(
        &admin,
        AdminAction::RevokeServer {
            id: "search".into(),
        },
    );
    let (seq, reason, code) = expect_denied(&h.resolve(&bearer, "search"));
    assert_eq!(code, ErrorCode::NotFound);
    assert_eq!(
        decision(&h, seq).reason,
        Some(Reason::UnknownServer {
            server: "search".into()
        })
    );
    assert_eq!(decision(&h, seq).reason.unwrap().to_string(), reason);
    assert!(decision(&h, seq).handle.is_none());
    expect_error(
        h.send(Request::AttestChallenge {
            server_id: "search".into(),
        }),
        ErrorCode::NotFound,
    );

    // A removed identity provider's tokens no longer authenticate anyone.
    h.admin_ok(
        &admin,
        AdminAction::RemoveIdentityProvider {
            issuer: idp.issuer.clone(),
        },
    );
    let len = h.store.len();
    expect_error(h.discover(&bearer), ErrorCode::Unauthenticated);
    assert_eq!(h.store.len(), len);
    assert!(h.enclave.state().identity_provider(&idp.issuer).is_none());
}

/// docs/design.md: the host must not be able to change the registry or policy without a signed
/// admin request. With the genesis keys pinned in the enclave, a host cannot start a fresh log under
/// admin keys of its own choosing, nor replay a stored log whose genesis names other keys.
#[test]
fn host_cannot_choose_genesis_keys_when_pinned() {
    let operator = Admin::new(1);
    let intruder = Admin::new(66);
    let boot = |keys: &[[u8; 32]], store: &[Vec<u8>]| -> Vec<Response> {
        let nsm = enclave_nsm();
        let mut enclave =
            Enclave::new(nsm.clone(), config(&nsm)).with_pinned_genesis(vec![operator.public()]);
        let mut replies = Vec::new();
        let mut send = |id: u64, r: Request| {
            let out: Replies = enclave.handle(id, r, at(0));
            replies.extend(out.into_iter().map(|(_, r)| r));
        };
        send(
            1,
            Request::ReplayBegin {
                genesis_admin_keys: keys.iter().map(|k| ByteBuf::from(k.to_vec())).collect(),
                total_entries: store.len() as u64,
            },
        );
        if !store.is_empty() {
            send(
                2,
                Request::ReplayEntries {
                    entries: store.iter().map(|e| ByteBuf::from(e.clone())).collect(),
                },
            );
        }
        send(3, Request::ReplayEnd);
        replies
    };

    // The host offers its own key for a new log: refused.
    let replies = boot(&[intruder.public()], &[]);
    assert!(
        matches!(
            &replies[0],
            Response::Error {
                code: ErrorCode::BadRequest,
                ..
            }
        ),
        "{replies:?}"
    );

    // The host offers nothing: the pinned keys are used.
    let replies = boot(&[], &[]);
    let persist = replies
        .iter()
        .rfind(|r| matches!(r, Response::Persist { .. }));
    let Some(Response::Persist { entries, .. }) = persist else {
        panic!("no genesis written: {replies:?}");
    };
    let genesis = SignedEntry::decode(&entries[1]).unwrap().into_entry().event;
    assert_eq!(
        genesis,
        Event::Genesis {
            admin_keys: vec![operator.public()],
            host_chosen: false,
        }
    );

    // A stored log whose genesis names the intruder's key is refused at replay.
    let foreign = Harness::new(&[&intruder]);
    let replies = boot(&[], &foreign.store);
    assert!(
        replies
            .iter()
            .any(|r| matches!(r, Response::BrokenLog { seq: Some(1), .. })),
        "{replies:?}"
    );
}

/// The host-chosen-genesis attack: an enclave whose image pins no genesis admin keys is asked to
/// start a new log under keys the host sends. Without the development flag it refuses (and
/// writes nothing); with it, the genesis entry says the host chose, and an enclave without the
/// flag, or an auditor who pinned keys, refuses that log.
#[test]
fn host_chosen_genesis_is_refused_without_the_dev_flag() {
    let intruder = Admin::new(9);
    let nsm = enclave_nsm();
    let now = at(0);
    let begin = Request::ReplayBegin {
        genesis_admin_keys: vec![ByteBuf::from(intruder.public().to_vec())],
        total_entries: 0,
    };

    let mut e = Enclave::new(nsm.clone(), config(&nsm));
    assert_eq!(e.handle(1, begin.clone(), now), vec![(1, Response::Ack)]);
    let replies = e.handle(2, Request::ReplayEnd, now);
    assert!(
        matches!(&replies[..], [(2, Response::Error { code: ErrorCode::BadRequest, message })]
            if message.contains("pinned")),
        "{replies:?}"
    );
    assert!(!e.is_ready());
    assert!(!e.state().has_genesis());

    // With the loud development flag the log starts, and its genesis records who chose.
    let mut dev = Enclave::new(nsm.clone(), config(&nsm)).with_insecure_host_chosen_genesis();
    assert_eq!(dev.handle(1, begin, now), vec![(1, Response::Ack)]);
    let replies = dev.handle(2, Request::ReplayEnd, now);
    let Some((_, Response::Persist { entries, .. })) = replies.first() else {
        panic!("no genesis written: {replies:?}");
    };
    let log: Vec<Vec<u8>> = entries.iter().map(|b| b.to_vec()).collect();
    assert_eq!(
        SignedEntry::decode(&log[1]).unwrap().into_entry().event,
        Event::Genesis {
            admin_keys: vec![intruder.public()],
            host_chosen: true,
        }
    );

    // An enclave without the flag refuses to continue that log.
    match Harness::boot(nsm.clone(), log.clone(), &[], at(1_000)) {
        Err((Response::BrokenLog { seq, .. }, _)) => assert_eq!(seq, Some(1)),
        Err((other, _)) => panic!("expected BrokenLog, got {other:?}"),
        Ok(_) => panic!("an enclave without the dev flag continued a host-chosen log"),
    }
    // So does an auditor who pinned keys, even the very keys the host chose.
    let audit =
        attestplane_verifier::replay::Replay::new(log_policy(&nsm), at(1_000), server_anchor())
            .unwrap()
            .expect_genesis_keys(vec![intruder.public()]);
    let mut audit = audit;
    match audit.push_round(&log) {
        Err(attestplane_verifier::replay::ReplayError::HostChosenGenesis { seq }) => {
            assert_eq!(seq, 1)
        }
        other => panic!("a pinned auditor accepted a host-chosen genesis: {other:?}"),
    }
}

/// An auditor who pins the genesis admin keys refuses a log whose genesis names others.
#[test]
fn pinned_auditor_refuses_a_log_with_other_genesis_keys() {
    let operator = Admin::new(1);
    let intruder = Admin::new(9);
    let h = Harness::new(&[&intruder]);
    let mut audit =
        attestplane_verifier::replay::Replay::new(log_policy(&h.nsm), h.now, server_anchor())
            .unwrap()
            .expect_genesis_keys(vec![operator.public()]);
    match audit.push_round(&h.store) {
        Err(attestplane_verifier::replay::ReplayError::GenesisKeysDiffer {
            seq,
            expected,
            found,
        }) => {
            assert_eq!(seq, 1);
            assert_eq!(expected, vec![operator.public()]);
            assert_eq!(found, vec![intruder.public()]);
        }
        other => panic!("a log with other genesis keys was accepted: {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Trusted application: live, and at boot for the enclave's own image
// ---------------------------------------------------------------------------------------------

/// A new log on `nsm`: its writer, the epoch start (seq 0) and genesis under `admin` (seq 1, at
/// 1 s).
fn open_log_under(
    nsm: &attestplane_enclave::nsm::MockNsm,
    admin: &Admin,
) -> (
    attestplane_enclave::writer::LogWriter,
    attestplane_enclave::writer::Written,
    attestplane_enclave::writer::Written,
) {
    use attestplane_enclave::writer::{Head, LogWriter};
    let (mut writer, start) = LogWriter::open(nsm, Head::empty(), ORIGIN, at(0)).unwrap();
    let genesis = writer
        .append(
            Event::Genesis {
                admin_keys: vec![admin.public()],
                host_chosen: false,
            },
            at(1_000),
        )
        .unwrap();
    (writer, start, genesis)
}

/// A log of one epoch opened on `nsm`: the epoch start, genesis under `admin`, and a decision
/// no policy makes (a `call` allowed on a server nobody registered, with no policy installed),
/// signed by the epoch key like any other entry.
fn log_with_a_decision_policy_would_not_make(
    nsm: &attestplane_enclave::nsm::MockNsm,
    admin: &Admin,
) -> Vec<Vec<u8>> {
    use attestplane_verifier::entry::{AttestationFactsRecord, DecisionRecord, PrincipalRecord};
    let (mut writer, start, genesis) = open_log_under(nsm, admin);
    let forged = DecisionRecord {
        action: "call".into(),
        principal: PrincipalRecord {
            agent: ACME_AGENT.into(),
            user: ACME_AGENT.into(),
            tenant: "acme".into(),
            roles: vec![],
            issuer: "https://idp.acme.example".into(),
        },
        server: "nowhere".into(),
        tool: Some("write".into()),
        attestation: AttestationFactsRecord {
            verified: true,
            age_ms: Some(0),
            pcr_match: true,
            debug: false,
        },
        calls_last_minute: 0,
        spend_micros: 0,
        allowed: true,
        policies: vec!["made-up".into()],
        reason: None,
        handle: None,
        call: None,
    };
    let decision = writer
        .append(Event::Decision(Box::new(forged)), at(2_000))
        .unwrap();
    vec![start.bytes, genesis.bytes, decision.bytes]
}

#[test]
fn own_image_epoch_is_applied_as_logged_at_boot() {
    // Only this image's enclave holds an epoch key bound to its PCRs, so a decision in such an
    // epoch was made by this code: boot replay applies it without deciding again.
    let admin = Admin::new(1);
    let nsm = enclave_nsm();
    let log = log_with_a_decision_policy_would_not_make(&nsm, &admin);
    let h = Harness::boot(nsm, log, &[], at(3_000))
        .unwrap_or_else(|(r, _)| panic!("an own-image epoch was not applied as logged: {r:?}"));
    let snapshot = h.enclave.state().snapshot();
    // Applied as logged: the allowed call counts against the agent's window.
    assert_eq!(
        snapshot.call_times.get(ACME_AGENT),
        Some(&vec![at(2_000).as_millis()])
    );
}

#[test]
fn foreign_image_epoch_is_re_decided_at_boot() {
    use attestplane_enclave::service::EpochTrust;
    use attestplane_verifier::log::LogVerifier;
    use attestplane_verifier::state::{ApplyMode, State, StateError};

    let admin = Admin::new(1);
    let own = enclave_nsm();
    let foreign = other_image_nsm(7);
    assert_ne!(image_pcrs(&own), image_pcrs(&foreign));
    let log = log_with_a_decision_policy_would_not_make(&foreign, &admin);

    // The boot loop over a log whose epoch another image wrote (the log verifier told to
    // accept that image's PCRs, as it would be for an upgrade): every signature and link
    // verifies, and the decision is evaluated again and refused.
    let fold = |own_pcrs| -> (Vec<ApplyMode>, Result<State, StateError>) {
        let mut verifier = LogVerifier::new(log_policy(&foreign), at(3_000)).unwrap();
        let verified = verifier.verify_round(&log).unwrap();
        let trust = EpochTrust::new(own_pcrs);
        let mut state = State::new(server_anchor());
        let mut modes = Vec::new();
        for entry in &verified {
            let mode = trust.mode(entry);
            modes.push(mode);
            if let Err(e) = state.apply_with(entry, mode) {
                return (modes, Err(e));
            }
        }
        (modes, Ok(state))
    };
    let (modes, result) = fold(image_pcrs(&own));
    assert_eq!(modes, vec![ApplyMode::Recheck; 3]);
    match result {
        Err(StateError::DecisionMismatch { seq, field, .. }) => {
            assert_eq!(seq, 2);
            assert_eq!(field, "allowed");
        }
        other => panic!("a foreign epoch's forged decision was not refused: {other:?}"),
    }
    // The same log, replayed by an enclave of the image that wrote it, is applied as logged.
    let (modes, result) = fold(image_pcrs(&foreign));
    assert_eq!(modes, vec![ApplyMode::Trusted; 3]);
    let state = result.unwrap_or_else(|e| panic!("own epoch refused: {e}"));
    assert_eq!(state.snapshot().calls.get(ACME_AGENT), Some(&1));

    // The enclave pins its own image only, and nothing in this log allows another, so it
    // refuses the foreign epoch before any decision is looked at.
    match Harness::boot(own.clone(), log.clone(), &[], at(3_000)) {
        Err((Response::BrokenLog { seq, .. }, _)) => assert_eq!(seq, Some(0)),
        Err((other, _)) => panic!("expected BrokenLog, got {other:?}"),
        Ok(_) => panic!("the enclave booted on another image's epoch"),
    }

    // Debug mode attests nothing (PCRs read zero whatever runs): never trusted, even when the
    // replaying enclave runs in debug mode too.
    let debug = Arc::new(
        attestplane_enclave::nsm::MockNsm::builder(
            ENCLAVE_SEED,
            attestplane_enclave::nsm::Clock::Fixed(at(0)),
        )
        .debug_mode(true)
        .build(),
    );
    let debug_log = log_with_a_decision_policy_would_not_make(&debug, &admin);
    let mut debug_policy = log_policy(&debug);
    debug_policy.allow_debug = true;
    let debug_verified = LogVerifier::new(debug_policy, at(3_000))
        .unwrap()
        .verify_round(&debug_log)
        .unwrap();
    assert_eq!(
        EpochTrust::new(image_pcrs(&debug)).mode(&debug_verified[0]),
        ApplyMode::Recheck
    );
    assert_eq!(
        EpochTrust::new(image_pcrs(&debug)).mode(&debug_verified[2]),
        ApplyMode::Recheck
    );
}

#[test]
fn replay_re_decides_a_forged_decision_on_the_parallel_path_and_names_it() {
    use attestplane_verifier::replay::{EpochTrust, Replay, ReplayError};
    use attestplane_verifier::state::StateError;
    // The auditor's replay defers policy evaluations to all cores; the forged decision is
    // still refused, by its own sequence number, and the same log passes for the image that
    // trusts its own epochs (no evaluation at all).
    let admin = Admin::new(1);
    let foreign = other_image_nsm(7);
    let log = log_with_a_decision_policy_would_not_make(&foreign, &admin);
    let mut replay = Replay::new(log_policy(&foreign), at(3_000), server_anchor()).unwrap();
    match replay.push_round(&log) {
        Err(ReplayError::State(StateError::DecisionMismatch {
            seq: 2,
            field,
            logged,
            replayed,
        })) => {
            assert_eq!(field, "allowed");
            assert_eq!((*logged, *replayed), (true.into(), false.into()));
        }
        other => panic!("the forged decision was not refused: {other:?}"),
    }
    let mut trusted = Replay::new(log_policy(&foreign), at(3_000), server_anchor())
        .unwrap()
        .with_trust(EpochTrust::new(image_pcrs(&foreign)));
    trusted.push_round(&log).unwrap();
}

/// How a replay of `log` ended: the state's snapshot and the entries by type, or the failure's
/// sequence number and text.
type ReplayOutcome = Result<
    (
        Snapshot,
        std::collections::BTreeMap<&'static str, u64>,
        attestplane_verifier::merkle::Hash,
    ),
    (Option<u64>, String),
>;

/// `log` replayed entry by entry, the plain way: the log verifier on one entry at a time, then
/// `State::apply` (every decision re-decided on the spot).
fn sequential_replay(log: &[Vec<u8>], policy: &LogPolicy, at: UnixMillis) -> ReplayOutcome {
    use attestplane_verifier::log::LogVerifier;
    use attestplane_verifier::state::State;
    let mut verifier = LogVerifier::new(policy.clone(), at).unwrap();
    let mut state = State::new(server_anchor());
    let mut events = std::collections::BTreeMap::new();
    for bytes in log {
        let verified = verifier
            .verify_round(std::slice::from_ref(bytes))
            .map_err(|e| (e.seq(), e.to_string()))?;
        for entry in &verified {
            state
                .apply(entry)
                .map_err(|e| (Some(e.seq()), format!("replay: {e}")))?;
            *events.entry(entry.entry().event.type_name()).or_default() += 1;
        }
    }
    let log = verifier.finish().map_err(|e| (e.seq(), e.to_string()))?;
    Ok((state.snapshot(), events, log.root()))
}

/// `log` through `Replay`, pushed in rounds of `round` entries, pipelined or not.
fn rounds_replay(
    log: &[Vec<u8>],
    policy: &LogPolicy,
    at: UnixMillis,
    round: usize,
    pipelined: bool,
) -> ReplayOutcome {
    use attestplane_verifier::replay::Replay;
    let mut replay = Replay::new(policy.clone(), at, server_anchor()).unwrap();
    let failed = |e: attestplane_verifier::replay::ReplayError| (e.seq(), e.to_string());
    let done = if pipelined {
        let mut replay = replay.pipelined();
        for chunk in log.chunks(round) {
            replay.push_round(chunk).map_err(failed)?;
        }
        replay.finish().map_err(failed)?
    } else {
        for chunk in log.chunks(round) {
            replay.push_round(chunk).map_err(failed)?;
        }
        replay.finish().map_err(failed)?
    };
    Ok((done.state.snapshot(), done.events, done.log.root()))
}

#[test]
fn pipelined_replay_gives_the_sequential_verdict_and_state_whatever_the_rounds() {
    // A log with decisions allowed and denied, discoveries, a forged admin act refused,
    // server revocations and an epoch change (a restart), replayed entry by entry the plain
    // way and through `Replay` in rounds of several sizes, pipelined and not: the same state,
    // the same counts and root; and on broken logs the same first failure.
    let (mut h, admin, idp, _server) = session();
    h.admin_ok(&admin, AdminAction::RevokeServer { id: "gamma".into() });
    h.advance(1_000);
    let store = h.store.clone();
    let mut r = Harness::boot(h.nsm.clone(), store, &[admin.public()], h.now)
        .unwrap_or_else(|(r, _)| panic!("restart failed: {r:?}"));
    r.advance(1_000);
    let bearer = idp.token(ACME_AGENT, "acme", &["tool-user"], r.now);
    expect_handle(r.resolve(&bearer, "search"));
    assert!(expect_authorized(&r.authorize(&bearer, "search", "search")).0);
    expect_denied(&r.authorize(&bearer, "search", "delete"));
    expect_denied(&r.resolve(&bearer, "gamma"));
    expect_servers(r.discover(&bearer));
    // The restarted harness counts its admin nonces from the start again: skip the first
    // epoch's.
    for _ in 0..64 {
        r.nonce();
    }
    r.admin_ok(
        &admin,
        AdminAction::RevokeServer {
            id: "search".into(),
        },
    );
    expect_denied(&r.resolve(&bearer, "search"));
    let log = r.store.clone();
    let policy = log_policy(&r.nsm);
    let epochs = log
        .iter()
        .filter(|b| matches!(decode(b).event, Event::EpochStart { .. }))
        .count();
    assert_eq!(epochs, 2);

    let reference = sequential_replay(&log, &policy, r.now).expect("the log replays");
    assert_eq!(reference.0, r.enclave.state().snapshot());
    assert!(reference.1.get("decision").copied().unwrap_or(0) >= 6);
    for round in [1, 2, 3, 7, log.len()] {
        for pipelined in [false, true] {
            assert_eq!(
                rounds_replay(&log, &policy, r.now, round, pipelined),
                Ok(reference.clone()),
                "rounds of {round}, pipelined {pipelined}"
            );
        }
    }

    // Broken logs: two entries swapped (the log verifier's failure), a decision the policy
    // would not make (the fold's), and that forged log with a bad entry after it (both; the
    // earlier one is named).
    let mut swapped = log.clone();
    swapped.swap(9, 10);
    let foreign = other_image_nsm(7);
    let forged = log_with_a_decision_policy_would_not_make(&foreign, &admin);
    let mut forged_then_garbage = forged.clone();
    forged_then_garbage.push(vec![0xff; 8]);
    for (name, broken, policy, when, seq) in [
        ("swapped", &swapped, log_policy(&r.nsm), r.now, 9),
        ("forged", &forged, log_policy(&foreign), at(3_000), 2),
        (
            "forged then garbage",
            &forged_then_garbage,
            log_policy(&foreign),
            at(3_000),
            2,
        ),
    ] {
        let reference = sequential_replay(broken, &policy, when);
        assert_eq!(
            reference.as_ref().err().map(|e| e.0),
            Some(Some(seq)),
            "{name}"
        );
        for round in [1, 2, 3, broken.len()] {
            for pipelined in [false, true] {
                assert_eq!(
                    rounds_replay(broken, &policy, when, round, pipelined),
                    reference,
                    "{name}: rounds of {round}, pipelined {pipelined}"
                );
            }
        }
    }
}

/// A log in `nsm`'s epoch: genesis, `server` registered (seq 2), its attestation at 3 s
/// (seq 3) logged `verified` or refused for a bad signature, with its document's signature
/// broken or not, and, if `then_forged`, a decision no state gives (seq 4, for a server that
/// does not exist: refused by the in-order fold itself, with no deferred check).
fn log_with_an_attestation(
    nsm: &attestplane_enclave::nsm::MockNsm,
    admin: &Admin,
    server: &McpServer,
    verified: bool,
    broken: bool,
    then_forged: bool,
) -> Vec<Vec<u8>> {
    use attestplane_verifier::attestation::AttestationError;
    use attestplane_verifier::entry::AttestationRecord;
    use attestplane_verifier::state::measurement_digest;
    let (mut writer, start, genesis) = open_log_under(nsm, admin);
    let deployment = Deployment {
        origin: ORIGIN.into(),
        genesis: EntryHash::of(&genesis.bytes),
    };
    let register = writer
        .append(
            Event::Admin {
                request: admin.sign(&deployment, at(2_000), [1; 16], server.register()),
                accepted: true,
                reason: None,
            },
            at(2_000),
        )
        .unwrap();
    let nonce = vec![7; 32];
    let mut document = server.attest(&nonce, at(3_000));
    if broken {
        // The COSE signature is the document's last item.
        *document.last_mut().unwrap() ^= 1;
    }
    let pcrs = server.spec.pcrs.iter().map(|(i, p)| (*i, p.0)).collect();
    let attestation = writer
        .append(
            Event::Attestation(AttestationRecord {
                server: server.id().into(),
                nonce,
                document,
                verified,
                measurement: verified.then(|| measurement_digest(&pcrs)),
                reason: (!verified)
                    .then(|| Reason::of_attestation_error(&AttestationError::BadSignature)),
            }),
            at(3_000),
        )
        .unwrap();
    let mut log = vec![
        start.bytes,
        genesis.bytes,
        register.bytes,
        attestation.bytes,
    ];
    if then_forged {
        let forged = log_with_a_decision_policy_would_not_make(nsm, admin);
        let decision = decode(forged.last().unwrap()).event;
        log.push(writer.append(decision, at(4_000)).unwrap().bytes);
    }
    log
}

#[test]
fn replay_names_a_forged_attestation_by_its_seq_whatever_the_rounds() {
    // A document that does not verify, logged as verified, or one that verifies, logged as
    // refused, is named by its own sequence number, before a later entry the fold refuses in
    // the same round, in rounds of any size, pipelined or not; a sound one gives the state the
    // entry-by-entry fold gives. (Guards any move of the document check off the in-order
    // fold, such as deferring it to the parallel checks with the Cedar evaluations.)
    let admin = Admin::new(1);
    let foreign = other_image_nsm(7);
    let server = McpServer::new("search", "acme", 1);
    let policy = log_policy(&foreign);
    let when = at(5_000);
    for (verified, broken) in [(true, false), (false, true)] {
        let log = log_with_an_attestation(&foreign, &admin, &server, verified, broken, false);
        let reference = sequential_replay(&log, &policy, when).expect("the log replays");
        assert_eq!(
            reference
                .0
                .servers
                .get("search")
                .map(|s| s.attested.is_some()),
            Some(verified),
            "the server is registered, attested as logged"
        );
        for round in [1, 2, 3, log.len()] {
            for pipelined in [false, true] {
                assert_eq!(
                    rounds_replay(&log, &policy, when, round, pipelined),
                    Ok(reference.clone()),
                    "verified {verified}: rounds of {round}, pipelined {pipelined}"
                );
            }
        }
    }
    for (verified, broken) in [(true, true), (false, false)] {
        for then_forged in [false, true] {
            let log =
                log_with_an_attestation(&foreign, &admin, &server, verified, broken, then_forged);
            let name = format!("verified {verified}, broken {broken}, then forged {then_forged}");
            let reference = sequential_replay(&log, &policy, when);
            match &reference {
                Err((Some(3), text)) => {
                    assert!(text.contains("attestation logged as"), "{name}: {text}")
                }
                other => panic!("{name}: the forged attestation was not named: {other:?}"),
            }
            for round in [1, 2, 3, log.len()] {
                for pipelined in [false, true] {
                    assert_eq!(
                        rounds_replay(&log, &policy, when, round, pipelined),
                        reference,
                        "{name}: rounds of {round}, pipelined {pipelined}"
                    );
                }
            }
        }
    }
}

/// Whether the decision an authorize, resolve or (denied) reply names was logged as allowed.
fn logged_allowed(h: &Harness, reply: &Response) -> bool {
    let seq = match reply {
        Response::Authorized { seq, .. }
        | Response::Denied { seq, .. }
        | Response::Handle { seq, .. } => *seq,
        other => panic!("expected a decision, got {other:?}"),
    };
    decision(h, seq).allowed
}

#[test]
fn replay_follows_idp_policy_and_registry_changes_that_flip_later_decisions() {
    // Three admin acts change what the same agent asking about the same server means, each
    // flipping a later decision: an identity provider that now asserts other roles for the
    // agent, a policy re-install, and a server revoked and registered again under another
    // name. Anything that reused Cedar entities or policies built before such a change (a
    // cache keyed by the agent's or the server's id alone, or kept across policy sets) would
    // decide the later request as the earlier one: the live decisions below would not flip,
    // and replay (sequential, in rounds, pipelined) would not give them. (A cache keyed that
    // way was tried and fails this test.) Then a policy reading the time and a counter flips
    // later decisions that differ from earlier ones in nothing else (what the replay's memo
    // of Cedar answers must key on).
    let (mut h, admin, idp, server) = session();
    let tool_user = idp.token(ACME_AGENT, "acme", &["tool-user"], h.now);
    let call = h.authorize(&tool_user, "search", "search");
    assert!(logged_allowed(&h, &call), "{call:?}");
    // The identity provider is replaced (new key): the same agent is now a reader only.
    let idp2 = Idp::new(41, &idp.issuer);
    h.admin_ok(&admin, idp2.install());
    let reader = idp2.token(ACME_AGENT, "acme", &["reader"], h.now);
    let call = h.authorize(&reader, "search", "search");
    assert!(!logged_allowed(&h, &call), "{call:?}");
    // A new policy lets readers call, and forbids resolving a server named "search v2".
    let policy = format!(
        "{}\n{}",
        STARTER_POLICY.replace(r#"contains("tool-user")"#, r#"contains("reader")"#),
        r#"@id("no-v2") forbid (principal, action == Attestplane::Action::"resolve", resource)
           when { resource.name == "search v2" };"#
    );
    h.admin_ok(
        &admin,
        AdminAction::SetPolicy {
            text: policy.clone(),
        },
    );
    let call = h.authorize(&reader, "search", "search");
    assert!(logged_allowed(&h, &call), "{call:?}");
    let resolve = h.resolve(&reader, "search");
    assert!(logged_allowed(&h, &resolve), "{resolve:?}");
    // The server is revoked, then registered again as "search v2" and attested again.
    h.admin_ok(
        &admin,
        AdminAction::RevokeServer {
            id: "search".into(),
        },
    );
    expect_denied(&h.resolve(&reader, "search"));
    let mut renamed = server.spec.clone();
    renamed.name = "search v2".into();
    h.admin_ok(&admin, AdminAction::RegisterServer(renamed));
    h.advance(1_000);
    assert!(expect_attest(&h.attest(&server)).0);
    let resolve = h.resolve(&reader, "search");
    assert!(!logged_allowed(&h, &resolve), "{resolve:?}");
    let call = h.authorize(&reader, "search", "search");
    assert!(logged_allowed(&h, &call), "{call:?}");
    h.advance(1_000);
    // A policy that reads the time and a counter, each compared with a literal: requests
    // equal in everything else are decided apart by those comparisons alone. A replay that
    // remembered answers by anything less than their outcomes (the memo's key) would answer
    // the later request as the earlier one.
    h.advance(61_000);
    let cut = h.now.as_secs() + 30;
    h.admin_ok(
        &admin,
        AdminAction::SetPolicy {
            text: format!(
                "{policy}\n\
                 @id(\"burst\") forbid (principal, action == Attestplane::Action::\"call\", resource)\n\
                 unless {{ context.counters.calls_last_minute < 2 }};\n\
                 @id(\"closing\") forbid (principal, action == Attestplane::Action::\"call\", resource)\n\
                 when {{ context.time >= {cut} }};"
            ),
        },
    );
    for expected in [true, true, false] {
        // The same instant: only the counter differs between the three.
        let call = h.authorize(&reader, "search", "search");
        assert_eq!(logged_allowed(&h, &call), expected, "{call:?}");
    }
    h.advance(61_000);
    // The counter is back to zero, as for the first call; only the time differs from it.
    let call = h.authorize(&reader, "search", "search");
    assert!(!logged_allowed(&h, &call), "{call:?}");
    h.advance(1_000);

    let log = h.store.clone();
    let policy = log_policy(&h.nsm);
    let reference = sequential_replay(&log, &policy, h.now).expect("the log replays");
    assert_eq!(reference.0, h.enclave.state().snapshot());
    for round in [1, 2, 5, log.len()] {
        for pipelined in [false, true] {
            assert_eq!(
                rounds_replay(&log, &policy, h.now, round, pipelined),
                Ok(reference.clone()),
                "rounds of {round}, pipelined {pipelined}"
            );
        }
    }
}

/// One request of the live/replay equivalence property.
#[derive(Clone, Debug)]
enum Op {
    Authorize {
        agent: usize,
        server: usize,
        tool: usize,
    },
    Resolve {
        agent: usize,
        server: usize,
    },
    Discover {
        agent: usize,
    },
    Advance {
        ms: u64,
    },
    Attest {
        server: usize,
    },
    RateLimit {
        limit: u64,
    },
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    prop_oneof![
        6 => (0..4usize, 0..4usize, 0..3usize)
            .prop_map(|(agent, server, tool)| Op::Authorize { agent, server, tool }),
        2 => (0..4usize, 0..4usize).prop_map(|(agent, server)| Op::Resolve { agent, server }),
        1 => (0..4usize).prop_map(|agent| Op::Discover { agent }),
        3 => (0..90_000u64).prop_map(|ms| Op::Advance { ms }),
        1 => (0..3usize).prop_map(|server| Op::Attest { server }),
        1 => (1..5u64).prop_map(|limit| Op::RateLimit { limit }),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(16))]

    /// The enclave applies what it has just decided without deciding again; the state it
    /// reaches is, after every request, exactly the state a replay reaches that decodes the
    /// stored bytes and re-checks every decision (`State::apply`).
    #[test]
    fn live_trusted_apply_changes_state_as_rechecking_replay_does(
        ops in proptest::collection::vec(op(), 1..40)
    ) {
        use attestplane_verifier::state::State;
        let admin = Admin::new(1);
        let servers = [
            McpServer::new("alpha", "acme", 1),
            McpServer::new("beta", "acme", 2),
            McpServer::new("gamma", "globex", 3),
        ];
        let idp = idp();
        let mut h = Harness::new(&[&admin]);
        h.setup(&admin, &servers.iter().collect::<Vec<_>>(), &permissive_policy(3), &idp);
        for s in &servers {
            assert!(expect_attest(&h.attest(s)).0);
        }
        let agents = [
            idp.token("a1", "acme", &["tool-user"], h.now),
            idp.token("a2", "acme", &[], h.now),
            idp.token("g1", "globex", &["ops"], h.now),
            idp.token("a3", "acme", &["ops"], h.now),
        ];
        let server_ids = ["alpha", "beta", "gamma", "nowhere"];
        let tools = ["search", "write", "delete"];
        let mut replayed = State::new(server_anchor());
        // Entries reach the fold only through the log verifier; no entry postdates this.
        let mut verifier = attestplane_verifier::log::LogVerifier::new(
            log_policy(&h.nsm),
            attestplane_verifier::UnixMillis::from_millis(u64::MAX / 2),
        )
        .unwrap();
        let mut folded = 0usize;
        for op in ops {
            match op {
                Op::Authorize { agent, server, tool } => {
                    h.authorize(&agents[agent], server_ids[server], tools[tool]);
                }
                Op::Resolve { agent, server } => {
                    h.resolve(&agents[agent], server_ids[server]);
                }
                Op::Discover { agent } => {
                    h.discover(&agents[agent]);
                }
                Op::Advance { ms } => h.advance(ms),
                Op::Attest { server } => {
                    h.attest(&servers[server]);
                }
                Op::RateLimit { limit } => {
                    h.admin_ok(&admin, AdminAction::SetPolicy { text: permissive_policy(limit) });
                }
            }
            for entry in verifier.verify_round(&h.store[folded..]).unwrap() {
                replayed
                    .apply(&entry)
                    .unwrap_or_else(|e| panic!("re-checking replay refused: {e}"));
            }
            folded = h.store.len();
            proptest::prop_assert_eq!(h.enclave.state().snapshot(), replayed.snapshot());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Verified bearer tokens remembered
// ---------------------------------------------------------------------------------------------

#[test]
fn remembered_bearer_token_is_refused_once_expired() {
    let admin = Admin::new(1);
    let server = McpServer::new("search", "acme", 1);
    let idp = idp();
    let mut h = started(&admin, &[&server], &idp);
    assert!(expect_attest(&h.attest(&server)).0);
    let mut claims = idp.claims(ACME_AGENT, "acme", &["tool-user"], h.now);
    let exp = h.now.as_secs() + 120;
    claims["exp"] = serde_json::json!(exp);
    let bearer = idp.sign_claims(&claims);
    assert!(expect_authorized(&h.authorize(&bearer, "search", "search")).0);
    // Within the leeway after `exp` it is still accepted (from the cache)…
    h.now = UnixMillis::from_millis((exp + attestplane_enclave::identity::LEEWAY_SECS - 1) * 1000);
    assert!(expect_attest(&h.attest(&server)).0);
    assert!(expect_authorized(&h.authorize(&bearer, "search", "search")).0);
    // …and refused from then on, as a token never seen before would be.
    h.advance(1_000);
    let len = h.store.len();
    let message = expect_error(
        h.authorize(&bearer, "search", "search"),
        ErrorCode::Unauthenticated,
    );
    assert!(message.contains("exp"), "{message}");
    assert_eq!(h.store.len(), len, "a refused token is not logged");
}

#[test]
fn remembered_bearer_token_is_refused_once_its_provider_changes() {
    let admin = Admin::new(1);
    let server = McpServer::new("search", "acme", 1);
    let idp = idp();
    let mut h = started(&admin, &[&server], &idp);
    assert!(expect_attest(&h.attest(&server)).0);
    let bearer = idp.token(ACME_AGENT, "acme", &["tool-user"], h.now);
    assert!(expect_authorized(&h.authorize(&bearer, "search", "search")).0);

    // The provider's key is rotated: tokens signed by the old key no longer verify.
    let rotated = Idp::new(41, &idp.issuer);
    h.admin_ok(&admin, rotated.install());
    expect_error(
        h.authorize(&bearer, "search", "search"),
        ErrorCode::Unauthenticated,
    );
    let fresh = rotated.token(ACME_AGENT, "acme", &["tool-user"], h.now);
    assert!(expect_authorized(&h.authorize(&fresh, "search", "search")).0);

    // The provider is removed: its tokens are refused, remembered or not.
    h.admin_ok(
        &admin,
        AdminAction::RemoveIdentityProvider {
            issuer: idp.issuer.clone(),
        },
    );
    let message = expect_error(
        h.authorize(&fresh, "search", "search"),
        ErrorCode::Unauthenticated,
    );
    assert!(message.contains("unknown token issuer"), "{message}");
}

#[test]
fn bearer_cache_is_bounded_and_holds_no_token() {
    use attestplane_enclave::identity::BearerCache;
    let admin = Admin::new(1);
    let idp = idp();
    let h = started(&admin, &[], &idp);
    let mut cache = BearerCache::new(3);
    let tokens: Vec<String> = (0..5)
        .map(|i| idp.token(&format!("agent-{i}"), "acme", &[], h.now))
        .collect();
    for (i, t) in tokens.iter().enumerate() {
        let p = cache.authenticate(h.enclave.state(), t, h.now).unwrap();
        assert_eq!(p.agent, format!("agent-{i}"));
        assert!(cache.len() <= 3);
    }
    assert_eq!(cache.len(), 3);
    // A refused token is not remembered.
    assert!(
        cache
            .authenticate(h.enclave.state(), "x.y.z", h.now)
            .is_err()
    );
    assert_eq!(cache.len(), 3);
    let debug = format!("{cache:?}");
    for t in &tokens {
        assert!(!debug.contains(t.as_str()));
        let signature = t.rsplit('.').next().unwrap();
        assert!(!debug.contains(signature));
    }
}

#[test]
fn token_for_one_endpoint_is_refused_at_another_even_from_the_cache() {
    use attestplane_enclave::identity::{Audience, BearerCache};
    let admin = Admin::new(1);
    let server = McpServer::new("search", "acme", 1);
    let idp = idp();
    let h = started(&admin, &[&server], &idp);
    let endpoint = "http://127.0.0.1:7300/mcp/search";
    let mut claims = idp.claims(ACME_AGENT, "acme", &["tool-user"], h.now);
    claims["aud"] = serde_json::json!(endpoint);
    let bearer = idp.sign_claims(&claims);
    let mut cache = BearerCache::new(16);
    let state = h.enclave.state();
    assert!(
        cache
            .authenticate_for(state, &bearer, Audience::Resource(endpoint), h.now)
            .is_ok()
    );
    // The same token, now in the cache, at another endpoint and at the control plane's API.
    for audience in [
        Audience::Resource("http://127.0.0.1:7300/mcp/other"),
        Audience::Provider,
    ] {
        let e = cache
            .authenticate_for(state, &bearer, audience, h.now)
            .unwrap_err();
        assert!(e.to_string().contains("aud"), "{audience:?}: {e}");
    }
    // A token for the control plane's API is no token for an endpoint.
    let api_token = idp.token(ACME_AGENT, "acme", &["tool-user"], h.now);
    assert!(cache.authenticate(state, &api_token, h.now).is_ok());
    assert!(
        cache
            .authenticate_for(state, &api_token, Audience::Resource(endpoint), h.now)
            .is_err()
    );
}
