//! Property tests: no byte of a real attestation document can change without the verifier
//! noticing, and no input makes the parser or the verifier panic.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use attestplane_verifier::UnixMillis;
use std::sync::LazyLock;

use attestplane_verifier::attestation::{
    AttestationError, AttestationVerifier, Expectations, TrustAnchor, VerifyAt, parse_attestation,
    verify_attestation,
};
use proptest::prelude::*;

const PROD: &[u8] = include_bytes!("../testdata/nitro/nitro-01-evervault-2022-prod-pcr8.cose");
const DEBUG: &[u8] = include_bytes!("../testdata/nitro/nitro-02-evervault-2023-debug.cose");

/// 2026-11-22T00:00:00Z.
const NOW: UnixMillis = UnixMillis::from_millis(1_795_305_600_000);

/// A verifier shared by the cases, so that changes outside `cabundle` cost only the leaf link
/// and the COSE signature (changes inside it miss the cache and take the full path).
static VERIFIER: LazyLock<AttestationVerifier> =
    LazyLock::new(|| AttestationVerifier::new(TrustAnchor::aws_nitro_root_g1()));

fn verify_cached(doc: &[u8]) -> Result<(), AttestationError> {
    let e = Expectations {
        allow_debug: true,
        ..Expectations::default()
    };
    VERIFIER
        .verify(doc, &e, VerifyAt::DocumentTimestamp)
        .map(|_| ())
}

fn verify_at_timestamp(doc: &[u8]) -> Result<(), AttestationError> {
    let e = Expectations {
        allow_debug: true,
        ..Expectations::default()
    };
    verify_attestation(
        doc,
        &TrustAnchor::aws_nitro_root_g1(),
        &e,
        VerifyAt::DocumentTimestamp,
    )
    .map(|_| ())
}

#[test]
fn unmodified_documents_verify() {
    // The baseline the properties below depart from.
    assert_eq!(verify_at_timestamp(PROD), Ok(()));
    assert_eq!(verify_at_timestamp(DEBUG), Ok(()));
}

/// The signed content of a document: what the COSE signature covers, plus the signature.
fn signed_triple(doc: &[u8]) -> Option<(Vec<u8>, Vec<u8>, Vec<u8>)> {
    let d = parse_attestation(doc).ok()?;
    Some((
        d.protected_header().to_vec(),
        d.payload().to_vec(),
        d.signature().to_vec(),
    ))
}

#[test]
fn every_single_byte_change_either_fails_to_parse_or_changes_signed_bytes() {
    // Exhaustive over every position of both documents, with four changes each (low bit, one
    // major type up, high bit, minus one), about 38,000 parses. A change the parser accepts must alter the protected header, the
    // payload or the signature, all of which the ES384 signature covers; the canonical-encoding
    // rule leaves no byte of the envelope outside those three. So no byte can change while
    // verification still succeeds; the property tests below confirm that end to end on
    // sampled positions and values (a full verification costs five P-384 verifications).
    for base in [PROD, DEBUG] {
        let original = signed_triple(base).unwrap();
        let mut doc = base.to_vec();
        for pos in 0..base.len() {
            for delta in [0x01, 0x20, 0x80, 0xff] {
                doc[pos] = base[pos].wrapping_add(delta);
                if let Some(triple) = signed_triple(&doc) {
                    assert_ne!(
                        triple, original,
                        "byte {pos} + {delta} parses to the same content"
                    );
                }
            }
            doc[pos] = base[pos];
        }
    }
}

proptest! {
    // Each end-to-end case costs up to five P-384 verifications, slow in debug builds.
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn any_single_byte_change_is_rejected(
        which in 0usize..2,
        pos in any::<prop::sample::Index>(),
        delta in 1u8..=255,
    ) {
        let base = [PROD, DEBUG][which];
        let pos = pos.index(base.len());
        let mut doc = base.to_vec();
        doc[pos] = doc[pos].wrapping_add(delta);
        prop_assert!(verify_cached(&doc).is_err(), "change at byte {} accepted", pos);
    }

    #[test]
    fn truncations_are_rejected_without_panic(which in 0usize..2, cut in any::<prop::sample::Index>()) {
        let base = [PROD, DEBUG][which];
        let len = cut.index(base.len());
        let doc = &base[..len];
        prop_assert!(parse_attestation(doc).is_err());
        prop_assert!(verify_at_timestamp(doc).is_err());
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = parse_attestation(&bytes);
        let _ = verify_attestation(
            &bytes,
            &TrustAnchor::aws_nitro_root_g1(),
            &Expectations::default(),
            VerifyAt::Instant(NOW),
        );
    }

    #[test]
    fn arbitrary_bytes_behind_a_real_prefix_never_panic(
        cut in any::<prop::sample::Index>(),
        tail in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        // Keep the envelope's head so the fuzz input reaches the payload and chain parsers.
        let mut doc = PROD[..cut.index(PROD.len())].to_vec();
        doc.extend_from_slice(&tail);
        let _ = parse_attestation(&doc);
        prop_assert!(verify_at_timestamp(&doc).is_err() || doc == PROD);
    }

    #[test]
    fn overwritten_spans_are_rejected(
        which in 0usize..2,
        start in any::<prop::sample::Index>(),
        junk in prop::collection::vec(any::<u8>(), 1..64),
    ) {
        let base = [PROD, DEBUG][which];
        let start = start.index(base.len());
        let mut doc = base.to_vec();
        let end = (start + junk.len()).min(doc.len());
        doc[start..end].copy_from_slice(&junk[..end - start]);
        prop_assume!(doc != base);
        prop_assert!(verify_at_timestamp(&doc).is_err());
    }
}
