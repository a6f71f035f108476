//! Real AWS Nitro attestation documents (verifier/testdata/nitro/README.md) through the public
//! API: they verify at their own timestamp with their real PCRs, fail "now", and every
//! expectation the caller sets is enforced.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::BTreeMap;

use attestplane_verifier::UnixMillis;
use attestplane_verifier::attestation::{
    AttestationError, AttestationVerifier, Check, Expectations, Pcr, PcrIndex, TrustAnchor,
    VerifyAt, parse_attestation, verify_attestation,
};
use base64::Engine;

const PROD: &[u8] = include_bytes!("../testdata/nitro/nitro-01-evervault-2022-prod-pcr8.cose");
const DEBUG: &[u8] = include_bytes!("../testdata/nitro/nitro-02-evervault-2023-debug.cose");
const MALFORMED_B64: &str = include_str!("../testdata/nitro/malformed-truncated-key.b64");

/// 2026-11-22T00:00:00Z: long after every leaf expired.
const NOW: UnixMillis = UnixMillis::from_millis(1_795_305_600_000);

const ZERO: &str = "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000";

/// PCR0–15 of the 2022 production document.
const PROD_PCRS: [&str; 16] = [
    "f4d48b81a460c9916d1e685119074bf24660afd3e34fae9fca0a0d28d9d5599936332687e6f66fc890ac8cf150142d8b",
    "bcdf05fefccaa8e55bf2c8d6dee9e79bbff31e34bf28a99aa19e6b29c37ee80b214a414b7607236edf26fcb78654e63f",
    "d8f114da658de5481f8d9ec73907feb553560787522f705c92d7d96beed8e15e2aa611984e098c576832c292e8dc469a",
    "4a9329d69c836267b18abbf9f4a38889124490453419e426818626348d21f989dc930b1562682a9082887454e53425aa",
    "1f442c86d494a88185642086d904ed89f62fb66ee9997d7b1a4f040faab3bba4244c768a584e5778195b3afc715637c6",
    ZERO,
    ZERO,
    ZERO,
    "8790eb3cce6c83d07e84b126dc61ca923333d6f66615c4a79157de48c5ab2418bdc60746ea7b7afbff03a1c6210201cb",
    ZERO,
    ZERO,
    ZERO,
    ZERO,
    ZERO,
    ZERO,
    ZERO,
];

const PROD_NONCE: &str = "cb3dc2eb76c0c1344adf10cc4868591e5bb7fa4b4a8069e144762f71ea1d0017e23f89ba9db04eb26b20fca1a954447d5fb466067b06a6a22eed8100c73b398a4f85a099f8ffcf84c654485590158c7d966e8b09af224654f97f63ec07096c78925f961eff653fd4f3aff684f07f7505722be06316cf8c48d643a33aba4af214991708ab2ee1ee85d42d0ad218915a369d62a483e60538ed8d0fb3d7f34712d895b24bd971a425cbfa9efd2c5e9d511656064260f8faf9cf69c5306137e748d9bcddb4d0d3e01fba1acb9ca35ff11694ab32bd135effe00124ee939b0c21db78cf8e50e37ce0eed59e5e6322197addaed909dcc2bfe5195ed32567a64eb59db3";

/// PCR3 and PCR4 of the 2023 debug document (PCR0–2 and 5–15 are zero).
const DEBUG_PCR3: &str = "4a9329d69c836267b18abbf9f4a38889124490453419e426818626348d21f989dc930b1562682a9082887454e53425aa";
const DEBUG_PCR4: &str = "d0531b1400dd43288c82c226c16bf647c637dd5e4d9b4f7a8aaadc6d6760b854a06c7008cca0d15ca80094dd33a65065";

fn idx(i: u8) -> PcrIndex {
    PcrIndex::try_from(i).unwrap()
}

fn prod_pcrs() -> BTreeMap<PcrIndex, Pcr> {
    (0u8..)
        .zip(PROD_PCRS)
        .map(|(i, h)| (idx(i), Pcr::from_hex(h).unwrap()))
        .collect()
}

fn debug_pcrs() -> BTreeMap<PcrIndex, Pcr> {
    (0u8..16)
        .map(|i| {
            let h = match i {
                3 => DEBUG_PCR3,
                4 => DEBUG_PCR4,
                _ => ZERO,
            };
            (idx(i), Pcr::from_hex(h).unwrap())
        })
        .collect()
}

fn aws() -> TrustAnchor {
    TrustAnchor::aws_nitro_root_g1()
}

fn expect_pcrs(pcrs: BTreeMap<PcrIndex, Pcr>) -> Expectations {
    Expectations {
        pcrs,
        ..Expectations::default()
    }
}

#[test]
fn prod_document_verifies_at_its_timestamp_with_all_its_pcrs() {
    let e = Expectations {
        nonce: Some(hex::decode(PROD_NONCE).unwrap()),
        ..expect_pcrs(prod_pcrs())
    };
    let v = verify_attestation(PROD, &aws(), &e, VerifyAt::DocumentTimestamp).unwrap();
    assert_eq!(v.module_id(), "i-020b6af9246d90e92-enc0183d09086c24190");
    assert_eq!(v.digest(), "SHA384");
    assert_eq!(v.timestamp(), UnixMillis::from_millis(1_665_651_482_136));
    assert_eq!(v.verified_at(), v.timestamp());
    assert_eq!(v.pcrs(), &prod_pcrs());
    assert_eq!(
        v.pcr(idx(0)).map(Pcr::to_hex).as_deref(),
        Some(PROD_PCRS[0])
    );
    assert!(!v.is_debug());
    assert_eq!(v.public_key(), None);
    assert_eq!(v.user_data(), None);
    assert_eq!(v.nonce().map(<[u8]>::len), Some(256));
    assert_eq!(v.chain_len(), 5);
    assert_eq!(v.root_fingerprint(), aws().fingerprint());
    // Leaf notAfter: 2022-10-13T11:58:02Z.
    assert_eq!(v.leaf_not_after(), UnixMillis::from_secs(1_665_662_282));
    let certs = v
        .checks()
        .iter()
        .filter(|c| matches!(c, Check::Certificate { .. }))
        .count();
    assert_eq!(certs, 5);
    assert!(v.checks().contains(&Check::CoseSignature));
    assert_eq!(
        v.checks()
            .iter()
            .filter(|c| matches!(c, Check::Pcr { .. }))
            .count(),
        16
    );
    let json = serde_json::to_value(&v).unwrap();
    assert_eq!(json["pcrs"]["0"], PROD_PCRS[0]);
    assert_eq!(json["nonce"], PROD_NONCE);
    assert_eq!(json["user_data"], serde_json::Value::Null);
}

#[test]
fn debug_document_verifies_at_its_timestamp_only_when_debug_is_allowed() {
    let mut e = expect_pcrs(debug_pcrs());
    assert_eq!(
        verify_attestation(DEBUG, &aws(), &e, VerifyAt::DocumentTimestamp).unwrap_err(),
        AttestationError::DebugMode
    );
    e.allow_debug = true;
    let v = verify_attestation(DEBUG, &aws(), &e, VerifyAt::DocumentTimestamp).unwrap();
    assert!(v.is_debug());
    assert_eq!(v.timestamp(), UnixMillis::from_millis(1_695_049_410_860));
    assert_eq!(v.pcrs(), &debug_pcrs());
    assert_eq!(v.user_data().map(<[u8]>::len), Some(91));
    assert_eq!(v.chain_len(), 5);
}

#[test]
fn debug_document_is_rejected_even_without_pcr_expectations() {
    assert_eq!(
        verify_attestation(
            DEBUG,
            &aws(),
            &Expectations::default(),
            VerifyAt::DocumentTimestamp
        )
        .unwrap_err(),
        AttestationError::DebugMode
    );
}

#[test]
fn both_documents_are_expired_now() {
    let e = Expectations {
        allow_debug: true,
        ..Expectations::default()
    };
    for doc in [PROD, DEBUG] {
        let err = verify_attestation(doc, &aws(), &e, VerifyAt::Instant(NOW)).unwrap_err();
        // The regional certificate (position 1) is the first in the path to have expired.
        match err {
            AttestationError::Expired {
                cert,
                at,
                not_after,
            } => {
                assert_eq!(cert, 1);
                assert_eq!(at, NOW);
                assert!(not_after < NOW);
            }
            other => panic!("expected Expired, got {other:?}"),
        }
    }
}

#[test]
fn prod_document_is_not_yet_valid_before_its_leaf() {
    // 2022-10-13T08:57:00Z: the instance certificate is valid, the leaf (from 08:57:59) is not.
    let at = VerifyAt::Instant(UnixMillis::from_secs(1_665_651_420));
    assert!(matches!(
        verify_attestation(PROD, &aws(), &Expectations::default(), at),
        Err(AttestationError::NotYetValid { cert: 4, .. })
    ));
}

#[test]
fn prod_document_verifies_at_an_instant_inside_the_leaf_window() {
    // 2022-10-13T10:00:00Z.
    let at = VerifyAt::Instant(UnixMillis::from_secs(1_665_655_200));
    let v = verify_attestation(PROD, &aws(), &expect_pcrs(prod_pcrs()), at).unwrap();
    assert_eq!(v.verified_at(), UnixMillis::from_secs(1_665_655_200));
}

#[test]
fn any_single_pcr_change_is_a_mismatch_at_that_index() {
    for (doc, pcrs, allow_debug) in [(PROD, prod_pcrs(), false), (DEBUG, debug_pcrs(), true)] {
        for i in 0u8..16 {
            let mut e = Expectations {
                allow_debug,
                ..expect_pcrs(pcrs.clone())
            };
            let mut changed = *pcrs.get(&idx(i)).unwrap().as_bytes();
            changed[47] ^= 1;
            let changed = Pcr::new(changed);
            e.pcrs.insert(idx(i), changed);
            assert_eq!(
                verify_attestation(doc, &aws(), &e, VerifyAt::DocumentTimestamp).unwrap_err(),
                AttestationError::PcrMismatch {
                    index: idx(i),
                    expected: changed,
                    found: *pcrs.get(&idx(i)).unwrap(),
                }
            );
        }
    }
}

#[test]
fn expected_pcr_absent_from_document_is_rejected() {
    let mut e = expect_pcrs(prod_pcrs());
    e.pcrs.insert(idx(16), Pcr::ZERO);
    assert_eq!(
        verify_attestation(PROD, &aws(), &e, VerifyAt::DocumentTimestamp).unwrap_err(),
        AttestationError::ExpectedPcrMissing { index: idx(16) }
    );
}

#[test]
fn malformed_sample_is_rejected_as_a_parse_error() {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(MALFORMED_B64.trim())
        .unwrap();
    let parsed = parse_attestation(&bytes);
    // The payload's byte-string length still counts the three missing bytes, so it swallows the
    // head of the signature and what follows is not CBOR: the envelope itself is malformed.
    assert!(
        matches!(
            parsed,
            Err(AttestationError::Malformed {
                part: "cose_sign1",
                ..
            })
        ),
        "{parsed:?}"
    );
    let verified = verify_attestation(
        &bytes,
        &aws(),
        &Expectations::default(),
        VerifyAt::Instant(NOW),
    );
    assert_eq!(verified.unwrap_err(), parsed.unwrap_err());
}

#[test]
fn wrong_root_anchor_is_rejected() {
    // Pin the document's own regional certificate instead of the AWS root.
    let regional = parse_attestation(PROD).unwrap().cabundle()[1].clone();
    let other = TrustAnchor::from_der(&regional).unwrap();
    let err = verify_attestation(
        PROD,
        &other,
        &Expectations::default(),
        VerifyAt::DocumentTimestamp,
    )
    .unwrap_err();
    assert_eq!(
        err,
        AttestationError::UntrustedRoot {
            expected_hex: hex::encode(other.fingerprint()),
            found_hex: "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b"
                .to_owned(),
        }
    );
    let v = AttestationVerifier::new(TrustAnchor::from_fingerprint([0; 32]));
    assert!(matches!(
        v.verify(PROD, &Expectations::default(), VerifyAt::DocumentTimestamp),
        Err(AttestationError::UntrustedRoot { .. })
    ));
}

#[test]
fn wrong_nonce_is_rejected() {
    let mut nonce = hex::decode(PROD_NONCE).unwrap();
    nonce[0] ^= 0xff;
    let e = Expectations {
        nonce: Some(nonce.clone()),
        ..Expectations::default()
    };
    assert_eq!(
        verify_attestation(PROD, &aws(), &e, VerifyAt::DocumentTimestamp).unwrap_err(),
        AttestationError::FieldMismatch {
            field: "nonce",
            expected_hex: hex::encode(&nonce),
            found_hex: PROD_NONCE.to_owned(),
        }
    );
}

#[test]
fn expected_user_data_or_public_key_absent_is_rejected() {
    let e = Expectations {
        user_data: Some(vec![]),
        ..Expectations::default()
    };
    assert_eq!(
        verify_attestation(PROD, &aws(), &e, VerifyAt::DocumentTimestamp).unwrap_err(),
        AttestationError::ExpectedFieldMissing { field: "user_data" }
    );
    let e = Expectations {
        public_key: Some(vec![1]),
        ..Expectations::default()
    };
    assert_eq!(
        verify_attestation(PROD, &aws(), &e, VerifyAt::DocumentTimestamp).unwrap_err(),
        AttestationError::ExpectedFieldMissing {
            field: "public_key"
        }
    );
}

#[test]
fn debug_document_user_data_must_match_exactly() {
    let ud = parse_attestation(DEBUG)
        .unwrap()
        .user_data()
        .unwrap()
        .to_vec();
    let mut e = Expectations {
        allow_debug: true,
        user_data: Some(ud.clone()),
        ..Expectations::default()
    };
    assert!(verify_attestation(DEBUG, &aws(), &e, VerifyAt::DocumentTimestamp).is_ok());
    e.user_data = Some(ud[..90].to_vec());
    assert!(matches!(
        verify_attestation(DEBUG, &aws(), &e, VerifyAt::DocumentTimestamp),
        Err(AttestationError::FieldMismatch {
            field: "user_data",
            ..
        })
    ));
}

#[test]
fn tagged_real_document_is_rejected() {
    let mut tagged = vec![0xd2];
    tagged.extend_from_slice(PROD);
    assert_eq!(
        parse_attestation(&tagged).unwrap_err(),
        AttestationError::Tagged {
            part: "cose_sign1",
            tag: 18
        }
    );
}

#[test]
fn signature_swapped_between_documents_is_rejected() {
    // Document 01's envelope with document 02's signature: everything parses, the chain
    // verifies, and only the COSE signature catches it.
    let mut doc = PROD.to_vec();
    let n = doc.len();
    doc[n - 96..].copy_from_slice(&DEBUG[DEBUG.len() - 96..]);
    assert_eq!(
        verify_attestation(
            &doc,
            &aws(),
            &Expectations::default(),
            VerifyAt::DocumentTimestamp
        )
        .unwrap_err(),
        AttestationError::BadSignature
    );
}

#[test]
fn cached_verifier_agrees_with_the_free_function() {
    let v = AttestationVerifier::new(aws());
    let e = expect_pcrs(prod_pcrs());
    for _ in 0..3 {
        let a = v.verify(PROD, &e, VerifyAt::DocumentTimestamp).unwrap();
        assert_eq!(a.pcrs(), &prod_pcrs());
        assert!(matches!(
            v.verify(PROD, &e, VerifyAt::Instant(NOW)),
            Err(AttestationError::Expired { cert: 1, .. })
        ));
    }
}
