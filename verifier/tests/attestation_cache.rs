//! The verifier's path caches never accept what a cold verification refuses.
//!
//! Each case warms an [`AttestationVerifier`] on genuine documents, then checks a document at a
//! time against both the warm verifier and [`verify_attestation`] (no cache): the two answers
//! must be identical, error included. The cases try what a cache keyed or bounded wrongly would
//! let through: the same path at times outside one certificate's validity (the leaf's, the
//! CAs'), another leaf under a cached `cabundle`, a tampered, reordered or shortened
//! `cabundle`, a bad COSE signature under a cached path, and expectations a cached path must
//! still be held to.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use attestplane_verifier::UnixMillis;
use attestplane_verifier::attestation::{
    AttestationError, AttestationVerifier, CertSummary, Check, Expectations, TrustAnchor,
    VerifiedAttestation, VerifyAt, verify_attestation,
};
use ciborium::value::Value;

const PROD: &[u8] = include_bytes!("../testdata/nitro/nitro-01-evervault-2022-prod-pcr8.cose");
const DEBUG: &[u8] = include_bytes!("../testdata/nitro/nitro-02-evervault-2023-debug.cose");
const MOCK_PROD: &[u8] = include_bytes!("../testdata/mock/mock-prod.cose");
const MOCK_DEBUG: &[u8] = include_bytes!("../testdata/mock/mock-debug.cose");
const MOCK_ROOT: &[u8] = include_bytes!("../testdata/mock/mock-root.pem");

/// What a verification returned, comparable between the warm and the cold path (the `cached`
/// flags are left out: they are the one thing allowed to differ).
#[derive(Debug, PartialEq)]
enum Outcome {
    Verified {
        checks: Vec<String>,
        document_sha256: [u8; 32],
        leaf_not_after: UnixMillis,
        verified_at: UnixMillis,
    },
    Refused(AttestationError),
}

fn outcome(r: &Result<VerifiedAttestation, AttestationError>) -> Outcome {
    match r {
        Ok(v) => Outcome::Verified {
            checks: v
                .checks()
                .iter()
                .map(|c| match c {
                    Check::Certificate { cert, .. } => format!("{cert:?}"),
                    other => format!("{other:?}"),
                })
                .collect(),
            document_sha256: v.document_sha256(),
            leaf_not_after: v.leaf_not_after(),
            verified_at: v.verified_at(),
        },
        Err(e) => Outcome::Refused(e.clone()),
    }
}

fn cached_certs(r: &Result<VerifiedAttestation, AttestationError>) -> usize {
    r.as_ref().map_or(0, |v| {
        v.checks()
            .iter()
            .filter(|c| matches!(c, Check::Certificate { cached: true, .. }))
            .count()
    })
}

/// Checks `doc` warm and cold; returns the warm result after asserting the two agree.
fn agree(
    warm: &AttestationVerifier,
    doc: &[u8],
    expect: &Expectations,
    at: VerifyAt,
) -> Result<VerifiedAttestation, AttestationError> {
    let cold = verify_attestation(doc, warm.anchor(), expect, at);
    let hot = warm.verify(doc, expect, at);
    assert_eq!(
        outcome(&hot),
        outcome(&cold),
        "warm and cold disagree at {at:?}"
    );
    hot
}

fn allow_debug() -> Expectations {
    Expectations {
        allow_debug: true,
        ..Expectations::default()
    }
}

/// The path's certificates as the cold verification summarised them, root first.
fn summaries(doc: &[u8], anchor: &TrustAnchor) -> Vec<CertSummary> {
    verify_attestation(doc, anchor, &allow_debug(), VerifyAt::DocumentTimestamp)
        .unwrap()
        .checks()
        .iter()
        .filter_map(|c| match c {
            Check::Certificate { cert, .. } => Some(cert.clone()),
            _ => None,
        })
        .collect()
}

/// Splits an untagged COSE_Sign1 into its four items and its payload map.
fn open(doc: &[u8]) -> (Vec<Value>, Vec<(Value, Value)>) {
    let Value::Array(items) = ciborium::de::from_reader::<Value, _>(doc).unwrap() else {
        panic!("not an array")
    };
    let Some(Value::Bytes(payload)) = items.get(2) else {
        panic!("no payload")
    };
    let Value::Map(fields) = ciborium::de::from_reader::<Value, _>(payload.as_slice()).unwrap()
    else {
        panic!("payload is not a map")
    };
    (items, fields)
}

fn field<'a>(fields: &'a [(Value, Value)], name: &str) -> &'a Value {
    &fields
        .iter()
        .find(|(k, _)| k.as_text() == Some(name))
        .unwrap()
        .1
}

/// `doc` with its payload field `name` replaced by `value` (the signature left as it was).
fn with_field(doc: &[u8], name: &str, value: Value) -> Vec<u8> {
    let (mut items, mut fields) = open(doc);
    for (k, v) in &mut fields {
        if k.as_text() == Some(name) {
            *v = value.clone();
        }
    }
    let mut payload = Vec::new();
    ciborium::ser::into_writer(&Value::Map(fields), &mut payload).unwrap();
    items[2] = Value::Bytes(payload);
    let mut out = Vec::new();
    ciborium::ser::into_writer(&Value::Array(items), &mut out).unwrap();
    out
}

fn cabundle(doc: &[u8]) -> Vec<Vec<u8>> {
    let (_, fields) = open(doc);
    let Value::Array(certs) = field(&fields, "cabundle") else {
        panic!("cabundle is not an array")
    };
    certs
        .iter()
        .map(|c| c.as_bytes().unwrap().clone())
        .collect()
}

fn bundle_value(certs: &[Vec<u8>]) -> Value {
    Value::Array(certs.iter().map(|c| Value::Bytes(c.clone())).collect())
}

#[test]
fn rewriting_helpers_reproduce_the_documents() {
    // The tamper cases below re-encode payloads; unchanged they must give the same bytes, so
    // that every difference a case makes is the one it means to make.
    for doc in [PROD, DEBUG, MOCK_PROD] {
        let (_, fields) = open(doc);
        assert_eq!(
            with_field(doc, "cabundle", field(&fields, "cabundle").clone()),
            doc
        );
    }
}

#[test]
fn cached_path_is_not_used_outside_any_certificates_validity() {
    let anchor = TrustAnchor::aws_nitro_root_g1();
    for doc in [PROD, DEBUG] {
        let warm = AttestationVerifier::new(anchor.clone());
        let e = allow_debug();
        warm.verify(doc, &e, VerifyAt::DocumentTimestamp).unwrap();
        let certs = summaries(doc, &anchor);
        assert_eq!(certs.len(), 5);
        let leaf = certs.last().unwrap();
        let mut hits = 0;
        for cert in &certs {
            for t in [
                cert.not_before.as_millis() - 1,
                cert.not_before.as_millis(),
                cert.not_after.as_millis(),
                cert.not_after.as_millis() + 1,
            ] {
                let at = VerifyAt::Instant(UnixMillis::from_millis(t));
                let r = agree(&warm, doc, &e, at);
                if r.is_ok() {
                    assert_eq!(cached_certs(&r), 5, "a valid time must hit the path cache");
                    hits += 1;
                }
                // Around the leaf's edges the CAs are all valid: the leaf alone decides.
                if cert.position == 4 && t < leaf.not_before.as_millis() {
                    assert!(matches!(
                        r,
                        Err(AttestationError::NotYetValid { cert: 4, .. })
                    ));
                }
                if cert.position == 4 && t > leaf.not_after.as_millis() {
                    assert!(matches!(r, Err(AttestationError::Expired { cert: 4, .. })));
                }
            }
        }
        // The leaf's own edges are inside every CA window (and the document is not in the
        // future at its notAfter), so the cache was exercised, not just bypassed.
        assert!(hits >= 1);
        // Still warm, still agreeing, after all the refusals.
        let r = agree(&warm, doc, &e, VerifyAt::DocumentTimestamp);
        assert_eq!(cached_certs(&r), 5);
    }
}

#[test]
fn another_leaf_under_a_cached_bundle_is_checked_in_full() {
    let anchor = TrustAnchor::aws_nitro_root_g1();
    let warm = AttestationVerifier::new(anchor);
    let e = allow_debug();
    warm.verify(PROD, &e, VerifyAt::DocumentTimestamp).unwrap();
    warm.verify(DEBUG, &e, VerifyAt::DocumentTimestamp).unwrap();
    let (_, debug_fields) = open(DEBUG);
    let (_, prod_fields) = open(PROD);
    // PROD's cabundle and payload with DEBUG's leaf, and the other way round: each leaf was
    // verified before, under its own bundle only.
    for (doc, leaf) in [
        (PROD, field(&debug_fields, "certificate")),
        (DEBUG, field(&prod_fields, "certificate")),
    ] {
        let swapped = with_field(doc, "certificate", leaf.clone());
        let r = agree(&warm, &swapped, &e, VerifyAt::DocumentTimestamp);
        assert!(r.is_err(), "a leaf from another path was accepted");
    }
    // The leaf of a cached path behind another cached bundle.
    let swapped = with_field(PROD, "cabundle", field(&debug_fields, "cabundle").clone());
    let r = agree(&warm, &swapped, &e, VerifyAt::DocumentTimestamp);
    assert!(r.is_err());
}

#[test]
fn tampered_bundles_miss_the_cache_and_are_refused_as_cold() {
    let anchor = TrustAnchor::aws_nitro_root_g1();
    let warm = AttestationVerifier::new(anchor);
    let e = allow_debug();
    warm.verify(PROD, &e, VerifyAt::DocumentTimestamp).unwrap();
    let bundle = cabundle(PROD);
    let mut variants: Vec<Vec<Vec<u8>>> = Vec::new();
    for i in 0..bundle.len() {
        for pos in [10, bundle[i].len() / 2, bundle[i].len() - 1] {
            let mut b = bundle.clone();
            b[i][pos] ^= 0x01;
            variants.push(b);
        }
        let mut dropped = bundle.clone();
        dropped.remove(i);
        variants.push(dropped);
    }
    let mut swapped = bundle.clone();
    swapped.swap(1, 2);
    variants.push(swapped);
    let mut duplicated = bundle.clone();
    duplicated.push(bundle[3].clone());
    variants.push(duplicated);
    variants.push(Vec::new());
    for b in variants {
        let doc = with_field(PROD, "cabundle", bundle_value(&b));
        let r = agree(&warm, &doc, &e, VerifyAt::DocumentTimestamp);
        assert!(r.is_err(), "a tampered cabundle was accepted");
    }
    // The untampered document still hits.
    let r = agree(&warm, PROD, &e, VerifyAt::DocumentTimestamp);
    assert_eq!(cached_certs(&r), 5);
}

#[test]
fn a_cached_path_still_needs_a_good_cose_signature_and_the_expectations() {
    let warm = AttestationVerifier::new(TrustAnchor::from_pem(MOCK_ROOT).unwrap());
    let e = allow_debug();
    let r = agree(&warm, MOCK_PROD, &e, VerifyAt::DocumentTimestamp);
    assert_eq!(cached_certs(&r), 0);
    // The last byte is the signature's.
    let mut bad = MOCK_PROD.to_vec();
    *bad.last_mut().unwrap() ^= 0x01;
    let r = agree(&warm, &bad, &e, VerifyAt::DocumentTimestamp);
    assert_eq!(r.unwrap_err(), AttestationError::BadSignature);
    // The mock signs both documents under the same path: the debug one hits the cache and is
    // still refused unless debug is allowed, and still checked against the expected PCRs and
    // nonce.
    let debug = agree(&warm, MOCK_DEBUG, &e, VerifyAt::DocumentTimestamp);
    assert_eq!(cached_certs(&debug), 5);
    let r = agree(
        &warm,
        MOCK_DEBUG,
        &Expectations::default(),
        VerifyAt::DocumentTimestamp,
    );
    assert_eq!(r.unwrap_err(), AttestationError::DebugMode);
    let wrong_nonce = Expectations {
        nonce: Some(vec![0; 32]),
        ..allow_debug()
    };
    let r = agree(&warm, MOCK_PROD, &wrong_nonce, VerifyAt::DocumentTimestamp);
    assert!(matches!(
        r,
        Err(AttestationError::FieldMismatch { field: "nonce", .. })
    ));
    // Another verifier's cache is its own: the AWS-pinned one refuses the mock path.
    let aws = AttestationVerifier::new(TrustAnchor::aws_nitro_root_g1());
    let r = agree(&aws, MOCK_PROD, &e, VerifyAt::DocumentTimestamp);
    assert!(matches!(r, Err(AttestationError::UntrustedRoot { .. })));
}

#[test]
fn path_cache_is_bounded() {
    // Capacity one: the second path evicts the first, which then takes the full check again.
    let warm = AttestationVerifier::with_cache_capacity(TrustAnchor::aws_nitro_root_g1(), 1);
    let e = allow_debug();
    for doc in [PROD, DEBUG, PROD] {
        let r = agree(&warm, doc, &e, VerifyAt::DocumentTimestamp);
        assert_eq!(cached_certs(&r), 0);
    }
    let r = agree(&warm, PROD, &e, VerifyAt::DocumentTimestamp);
    assert_eq!(cached_certs(&r), 5);
}
