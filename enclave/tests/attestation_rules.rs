//! Every rule of AWS's attestation process, and every rejection the verifier promises, tried
//! against documents the mock NSM builds.
//!
//! Each test is one rule, named for it. A test describes its fault as a change to a default
//! [`Scenario`] (the chain, the document's envelope or payload, the mock's state, the caller's
//! expectations or the verification time), and [`rule`] checks both halves: the unfaulted
//! scenario verifies, and the faulted one fails with exactly the expected
//! [`AttestationError`] variant. So a test fails if the fault is not detected, if it is
//! detected as something else, or if the baseline it is measured against is itself broken.
//!
//! Time is pinned: the mock's clock starts at [`T0`]; the default verification instant is one
//! second later.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::BTreeMap;
use std::sync::OnceLock;

use attestplane_enclave::nsm::testing::{
    BundleOrder, CertSignatureAlgorithm, ChainSpec, DocumentFaults, MockIdentity, Position,
    SignatureS, ValiditySpec, cbor,
};
use attestplane_enclave::nsm::{Clock, MapEncoding, MockNsm, MockNsmBuilder, Nsm};
use attestplane_verifier::UnixMillis;
use attestplane_verifier::attestation::{
    AttestationError, AttestationVerifier, Expectations, Pcr, PcrIndex, TrustAnchor,
    VerifiedAttestation, VerifyAt, verify_attestation,
};
use sha2::{Digest as _, Sha256, Sha384};

const SEED: [u8; 32] = *b"attestplane attestation rules v1";
/// 2025-09-01T12:00:00.250Z.
const T0: UnixMillis = UnixMillis::from_millis(1_756_728_000_250);
const MINUTE_MS: u64 = 60_000;
const HOUR_MS: u64 = 60 * MINUTE_MS;

fn measurement(i: u8) -> [u8; 48] {
    Sha384::digest([b'm', i]).into()
}

fn pcr_index(i: u8) -> PcrIndex {
    PcrIndex::try_from(i).unwrap()
}

/// The pinned root of the unfaulted mock.
fn mock_root() -> &'static TrustAnchor {
    static ROOT: OnceLock<TrustAnchor> = OnceLock::new();
    ROOT.get_or_init(|| {
        let nsm = MockNsmBuilder::new(SEED, Clock::Fixed(T0)).build();
        TrustAnchor::from_pem(nsm.root_pem().unwrap().as_bytes()).unwrap()
    })
}

/// Which root the verifier pins.
#[derive(Clone, Copy, Debug)]
enum Anchor {
    /// The root of the unfaulted mock.
    Mock,
    /// The root of the chain under test, whatever it is (to reach the rules about the root).
    OwnRoot,
    /// AWS Nitro Enclaves Root G1.
    Aws,
}

/// Everything that makes one document and its verification.
struct Scenario {
    chain: ChainSpec,
    faults: DocumentFaults,
    signature_s: SignatureS,
    map_encoding: MapEncoding,
    debug_mode: bool,
    /// User PCRs to extend with the given data and lock before attesting.
    locked_user_pcrs: Vec<(u16, &'static [u8])>,
    /// `LockPCRs(n)` before attesting.
    lock_pcrs: Option<u16>,
    /// How long after `T0` the document is made.
    attest_after_ms: u64,
    user_data: Option<Vec<u8>>,
    nonce: Option<Vec<u8>>,
    public_key: Option<Vec<u8>>,
    expect: Expectations,
    at: VerifyAt,
    anchor: Anchor,
}

impl Default for Scenario {
    fn default() -> Self {
        let user_data = b"log head 41".to_vec();
        let nonce = vec![0x5a; 32];
        let public_key = vec![0xed; 32];
        let pcrs = (0u8..3)
            .map(|i| (pcr_index(i), Pcr::new(measurement(i))))
            .collect();
        Self {
            chain: ChainSpec::aws_like(&MockIdentity::from_seed(&SEED)),
            faults: DocumentFaults::default(),
            signature_s: SignatureS::AsSigned,
            map_encoding: MapEncoding::Definite,
            debug_mode: false,
            locked_user_pcrs: Vec::new(),
            lock_pcrs: None,
            attest_after_ms: 0,
            expect: Expectations {
                pcrs,
                allow_debug: false,
                nonce: Some(nonce.clone()),
                public_key: Some(public_key.clone()),
                user_data: Some(user_data.clone()),
                max_age_ms: None,
            },
            user_data: Some(user_data),
            nonce: Some(nonce),
            public_key: Some(public_key),
            at: VerifyAt::Instant(after(1_000)),
            anchor: Anchor::Mock,
        }
    }
}

fn after(ms: u64) -> UnixMillis {
    T0.checked_add_millis(ms).unwrap()
}

impl Scenario {
    fn mock(&self) -> MockNsm {
        let nsm = MockNsmBuilder::new(SEED, Clock::Fixed(T0))
            .image_measurements(measurement(0), measurement(1), measurement(2))
            .debug_mode(self.debug_mode)
            .map_encoding(self.map_encoding)
            .chain_spec(self.chain.clone())
            .document_faults(self.faults.clone())
            .signature_s(self.signature_s)
            .build();
        // Issue the chain at T0 even when the document is made later.
        nsm.chain_der().unwrap();
        for (index, data) in &self.locked_user_pcrs {
            nsm.extend_pcr(*index, data).unwrap();
            nsm.lock_pcr(*index).unwrap();
        }
        if let Some(range) = self.lock_pcrs {
            nsm.lock_pcrs(range).unwrap();
        }
        nsm.advance_time(self.attest_after_ms);
        nsm
    }

    fn document(&self) -> Vec<u8> {
        self.mock()
            .attest(
                self.user_data.clone(),
                self.nonce.clone(),
                self.public_key.clone(),
            )
            .unwrap()
    }

    fn anchor(&self) -> TrustAnchor {
        match self.anchor {
            Anchor::Mock => mock_root().clone(),
            Anchor::OwnRoot => TrustAnchor::from_der(&self.mock().root_der().unwrap()).unwrap(),
            Anchor::Aws => TrustAnchor::aws_nitro_root_g1(),
        }
    }

    fn verify(&self) -> Result<VerifiedAttestation, AttestationError> {
        verify_attestation(&self.document(), &self.anchor(), &self.expect, self.at)
    }
}

/// Asserts that the unfaulted scenario verifies (computed once: it is deterministic).
fn baseline_verifies() {
    static BASELINE: OnceLock<Result<(), AttestationError>> = OnceLock::new();
    if let Err(e) = BASELINE.get_or_init(|| Scenario::default().verify().map(|_| ())) {
        panic!("the unfaulted document must verify, got: {e}");
    }
}

/// The unfaulted scenario verifies; the faulted one fails as `expected` says.
fn rule(fault: impl FnOnce(&mut Scenario), expected: impl Fn(&AttestationError) -> bool) {
    baseline_verifies();
    let mut s = Scenario::default();
    fault(&mut s);
    match s.verify() {
        Err(e) if expected(&e) => {}
        Err(e) => panic!("rejected for the wrong reason: {e:?}"),
        Ok(_) => panic!("the faulted document verified"),
    }
}

/// The unfaulted scenario verifies, and so does the variation; returns the variation's result.
fn accepts(variation: impl FnOnce(&mut Scenario)) -> VerifiedAttestation {
    baseline_verifies();
    let mut s = Scenario::default();
    variation(&mut s);
    match s.verify() {
        Ok(v) => v,
        Err(e) => panic!("the variation must verify, got: {e:?}"),
    }
}

fn chain(s: &mut Scenario, f: impl FnOnce(ChainSpec) -> ChainSpec) {
    s.chain = f(s.chain.clone());
}

// ---- the certificate chain ------------------------------------------------------------------

#[test]
fn rejects_wrong_root() {
    rule(
        |s| chain(s, ChainSpec::different_root),
        |e| matches!(e, AttestationError::UntrustedRoot { .. }),
    );
}

#[test]
fn rejects_mock_document_under_the_aws_root() {
    rule(
        |s| s.anchor = Anchor::Aws,
        |e| matches!(e, AttestationError::UntrustedRoot { .. }),
    );
}

#[test]
fn rejects_pinned_root_without_ca_flag() {
    rule(
        |s| {
            chain(s, |c| c.without_ca_flag(Position::Root));
            s.anchor = Anchor::OwnRoot;
        },
        |e| *e == AttestationError::NotCa { cert: 0 },
    );
}

#[test]
fn rejects_expired_pinned_root() {
    rule(
        |s| {
            chain(s, |c| c.expired(Position::Root));
            s.anchor = Anchor::OwnRoot;
        },
        |e| matches!(e, AttestationError::Expired { cert: 0, .. }),
    );
}

#[test]
fn rejects_leaf_marked_ca() {
    rule(
        |s| chain(s, ChainSpec::leaf_marked_ca),
        |e| *e == AttestationError::LeafIsCa { cert: 4 },
    );
}

#[test]
fn rejects_leaf_with_path_len() {
    rule(
        |s| {
            chain(s, |mut c| {
                if let Some(bc) = c
                    .cert_mut(Position::Leaf)
                    .and_then(|l| l.basic_constraints.as_mut())
                {
                    bc.path_len = Some(0);
                }
                c
            })
        },
        |e| *e == AttestationError::LeafIsCa { cert: 4 },
    );
}

#[test]
fn rejects_leaf_without_digital_signature() {
    rule(
        |s| {
            chain(s, |mut c| {
                if let Some(ku) = c
                    .cert_mut(Position::Leaf)
                    .and_then(|l| l.key_usage.as_mut())
                {
                    ku.digital_signature = false;
                }
                c
            })
        },
        |e| *e == AttestationError::LeafMissingDigitalSignature { cert: 4 },
    );
}

#[test]
fn rejects_intermediate_without_ca_flag() {
    rule(
        |s| chain(s, |c| c.without_ca_flag(Position::Zonal)),
        |e| *e == AttestationError::NotCa { cert: 2 },
    );
}

#[test]
fn rejects_intermediate_without_basic_constraints() {
    rule(
        |s| chain(s, |c| c.without_basic_constraints(Position::Regional)),
        |e| *e == AttestationError::NotCa { cert: 1 },
    );
}

#[test]
fn rejects_non_critical_basic_constraints_on_a_ca() {
    rule(
        |s| {
            chain(s, |mut c| {
                if let Some(bc) = c
                    .cert_mut(Position::Instance)
                    .and_then(|i| i.basic_constraints.as_mut())
                {
                    bc.critical = false;
                }
                c
            })
        },
        |e| *e == AttestationError::BasicConstraintsNotCritical { cert: 3 },
    );
}

#[test]
fn rejects_intermediate_without_keycertsign() {
    rule(
        |s| chain(s, |c| c.without_key_cert_sign(Position::Instance)),
        |e| *e == AttestationError::MissingKeyCertSign { cert: 3 },
    );
}

#[test]
fn rejects_intermediate_without_key_usage() {
    rule(
        |s| chain(s, |c| c.without_key_usage(Position::Zonal)),
        |e| *e == AttestationError::MissingKeyCertSign { cert: 2 },
    );
}

#[test]
fn rejects_pathlen_violation() {
    // The zonal CA allows no CA below it, but the instance CA follows.
    rule(
        |s| chain(s, |c| c.path_len(Position::Zonal, Some(0))),
        |e| {
            *e == AttestationError::PathLenExceeded {
                cert: 2,
                path_len: 0,
                followers: 1,
            }
        },
    );
}

#[test]
fn rejects_expired_intermediate() {
    rule(
        |s| chain(s, |c| c.expired(Position::Zonal)),
        |e| matches!(e, AttestationError::Expired { cert: 2, at, .. } if *at == after(1_000)),
    );
}

#[test]
fn rejects_not_yet_valid_intermediate() {
    rule(
        |s| chain(s, |c| c.not_yet_valid(Position::Regional)),
        |e| matches!(e, AttestationError::NotYetValid { cert: 1, .. }),
    );
}

#[test]
fn rejects_expired_leaf() {
    // The leaf lives three hours; the same document four hours later is refused.
    rule(
        |s| s.at = VerifyAt::Instant(after(4 * HOUR_MS)),
        |e| matches!(e, AttestationError::Expired { cert: 4, .. }),
    );
}

#[test]
fn rejects_wrong_issuer_name() {
    rule(
        |s| chain(s, |c| c.wrong_issuer_name(Position::Instance)),
        |e| *e == AttestationError::IssuerMismatch { cert: 3, parent: 2 },
    );
}

#[test]
fn rejects_bad_link_signature() {
    rule(
        |s| chain(s, |c| c.signed_by_wrong_key(Position::Zonal)),
        |e| *e == AttestationError::CertificateSignature { cert: 2, parent: 1 },
    );
}

#[test]
fn rejects_corrupted_leaf_signature() {
    rule(
        |s| chain(s, |c| c.corrupt_signature(Position::Leaf)),
        |e| *e == AttestationError::CertificateSignature { cert: 4, parent: 3 },
    );
}

#[test]
fn rejects_certificate_signed_with_sha256() {
    rule(
        |s| {
            chain(s, |c| {
                c.signature_algorithm(Position::Instance, CertSignatureAlgorithm::EcdsaWithSha256)
            })
        },
        |e| matches!(e, AttestationError::UnsupportedSignatureAlgorithm { cert: 3, oid } if oid.starts_with("1.2.840.10045.4.3.2")),
    );
}

#[test]
fn rejects_non_p384_leaf_key() {
    rule(
        |s| chain(s, ChainSpec::p256_leaf_key),
        |e| *e == AttestationError::UnsupportedPublicKey { cert: 4 },
    );
}

#[test]
fn rejects_chain_in_wrong_order() {
    // Leaf's issuer first, root last: cabundle[0] is not the pinned root.
    rule(
        |s| chain(s, |c| c.bundle_order(BundleOrder::Reversed)),
        |e| matches!(e, AttestationError::UntrustedRoot { .. }),
    );
}

#[test]
fn rejects_swapped_intermediates() {
    // Root first, but zonal before regional.
    rule(
        |s| chain(s, |c| c.bundle_order(BundleOrder::Custom(vec![0, 2, 1, 3]))),
        // Either rule names the zonal certificate at position 1: its issuer is not the root,
        // and its pathLen of 1 cannot have two CAs after it. The verifier checks the latter first.
        |e| {
            matches!(
                e,
                AttestationError::IssuerMismatch { cert: 1, parent: 0 }
                    | AttestationError::PathLenExceeded { cert: 1, .. }
            )
        },
    );
}

#[test]
fn rejects_missing_intermediate() {
    rule(
        |s| chain(s, |c| c.bundle_order(BundleOrder::Custom(vec![0, 1, 3]))),
        |e| *e == AttestationError::IssuerMismatch { cert: 2, parent: 1 },
    );
}

#[test]
fn rejects_empty_cabundle() {
    rule(
        |s| chain(s, |c| c.bundle_order(BundleOrder::Custom(vec![]))),
        |e| *e == AttestationError::EmptyField { field: "cabundle" },
    );
}

#[test]
fn rejects_overlong_chain() {
    // Properly signed, pathLen allowing it: only the length is wrong. Eight CAs still pass.
    let v = accepts(|s| chain(s, |c| c.extra_intermediates(4)));
    assert_eq!(v.chain_len(), 9);
    rule(
        |s| chain(s, |c| c.extra_intermediates(5)),
        |e| *e == AttestationError::ChainTooLong { len: 9, max: 8 },
    );
}

// ---- the COSE envelope and its signature -----------------------------------------------------

#[test]
fn rejects_tagged_cose() {
    rule(
        |s| s.faults.tag_cose = true,
        |e| {
            *e == AttestationError::Tagged {
                part: "cose_sign1",
                tag: 18,
            }
        },
    );
}

#[test]
fn rejects_trailing_bytes() {
    rule(
        |s| s.faults.trailing_bytes = vec![0x00],
        |e| {
            *e == AttestationError::TrailingBytes {
                part: "cose_sign1",
                count: 1,
            }
        },
    );
}

#[test]
fn rejects_other_protected_header() {
    // ES256 instead of ES384, still signed over what it says.
    rule(
        |s| s.faults.protected_header = Some(vec![0xa1, 0x01, 0x26]),
        |e| {
            *e == AttestationError::ProtectedHeader {
                found_hex: "a10126".to_owned(),
            }
        },
    );
}

#[test]
fn rejects_nonempty_unprotected_header() {
    rule(
        |s| s.faults.unprotected_header = Some(vec![0xa1, 0x04, 0x41, 0x01]),
        |e| *e == AttestationError::UnprotectedHeader { entries: 1 },
    );
}

#[test]
fn rejects_bad_document_signature() {
    rule(
        |s| s.faults.corrupt_signature = true,
        |e| *e == AttestationError::BadSignature,
    );
}

#[test]
fn rejects_document_signed_by_another_key() {
    rule(
        |s| s.faults.sign_with_key = Some("rogue".to_owned()),
        |e| *e == AttestationError::BadSignature,
    );
}

#[test]
fn accepts_high_s_signature() {
    accepts(|s| s.signature_s = SignatureS::High);
}

#[test]
fn accepts_low_s_signature() {
    accepts(|s| s.signature_s = SignatureS::Low);
}

// ---- the payload -----------------------------------------------------------------------------

#[test]
fn rejects_duplicate_payload_key() {
    rule(
        |s| s.faults.duplicate_fields = vec!["nonce".to_owned()],
        |e| *e == AttestationError::DuplicateField { field: "nonce" },
    );
}

#[test]
fn rejects_duplicate_payload_key_in_indefinite_map() {
    rule(
        |s| {
            s.map_encoding = MapEncoding::Indefinite;
            s.faults.duplicate_fields = vec!["pcrs".to_owned()];
        },
        |e| *e == AttestationError::DuplicateField { field: "pcrs" },
    );
}

#[test]
fn rejects_unknown_payload_key() {
    rule(
        |s| {
            s.faults.extra_fields = vec![("unknown".to_owned(), cbor::bytes(b"x"))];
        },
        |e| {
            *e == AttestationError::UnknownField {
                key: "unknown".to_owned(),
            }
        },
    );
}

#[test]
fn rejects_missing_payload_field() {
    rule(
        |s| s.faults.omit_fields = vec!["certificate".to_owned()],
        |e| {
            *e == AttestationError::MissingField {
                field: "certificate",
            }
        },
    );
}

#[test]
fn rejects_omitted_null_optional() {
    // The NSM writes absent optionals as null; omitting the key is not the same document.
    rule(
        |s| {
            s.nonce = None;
            s.expect.nonce = None;
            s.faults.omit_fields = vec!["nonce".to_owned()];
        },
        |e| *e == AttestationError::MissingField { field: "nonce" },
    );
}

#[test]
fn rejects_oversized_user_data() {
    rule(
        |s| {
            s.faults.allow_oversized_fields = true;
            s.user_data = Some(vec![0x75; 1025]);
        },
        |e| {
            *e == AttestationError::FieldTooLong {
                field: "user_data",
                len: 1025,
                max: 1024,
            }
        },
    );
}

#[test]
fn rejects_digest_other_than_sha384() {
    rule(
        |s| {
            s.faults.replace_fields = vec![("digest".to_owned(), cbor::text("SHA256"))];
        },
        |e| {
            *e == AttestationError::UnsupportedDigest {
                found: "SHA256".to_owned(),
            }
        },
    );
}

#[test]
fn rejects_pcr_of_wrong_length() {
    rule(
        |s| {
            let mut pcrs: Vec<(u64, Vec<u8>)> = (0u64..16).map(|i| (i, vec![0; 48])).collect();
            pcrs[5].1 = vec![0; 32];
            s.expect.pcrs.clear();
            s.faults.replace_fields = vec![("pcrs".to_owned(), cbor::uint_bytes_map(&pcrs))];
        },
        |e| {
            *e == AttestationError::PcrLength {
                index: pcr_index(5),
                len: 32,
            }
        },
    );
}

#[test]
fn rejects_missing_boot_pcr() {
    // PCR0–15 are always reported; a document with 16 PCRs but without PCR7 is not an NSM's.
    rule(
        |s| {
            let pcrs: Vec<(u64, Vec<u8>)> = (0u64..17)
                .filter(|&i| i != 7)
                .map(|i| (i, vec![1; 48]))
                .collect();
            s.expect.pcrs.clear();
            s.faults.replace_fields = vec![("pcrs".to_owned(), cbor::uint_bytes_map(&pcrs))];
        },
        |e| {
            *e == AttestationError::MissingPcr {
                index: pcr_index(7),
            }
        },
    );
}

#[test]
fn rejects_duplicate_pcr_index() {
    rule(
        |s| {
            let mut pcrs: Vec<(u64, Vec<u8>)> = (0u64..16).map(|i| (i, vec![0; 48])).collect();
            pcrs.push((3, vec![3; 48]));
            s.expect.pcrs.clear();
            s.faults.replace_fields = vec![("pcrs".to_owned(), cbor::uint_bytes_map(&pcrs))];
        },
        |e| {
            *e == AttestationError::DuplicatePcr {
                index: pcr_index(3),
            }
        },
    );
}

#[test]
fn rejects_zero_timestamp() {
    rule(
        |s| s.faults.replace_fields = vec![("timestamp".to_owned(), cbor::uint(0))],
        |e| *e == AttestationError::ZeroTimestamp,
    );
}

#[test]
fn accepts_indefinite_length_payload() {
    accepts(|s| s.map_encoding = MapEncoding::Indefinite);
}

#[test]
fn accepts_null_optionals() {
    let v = accepts(|s| {
        s.user_data = None;
        s.nonce = None;
        s.public_key = None;
        s.expect.user_data = None;
        s.expect.nonce = None;
        s.expect.public_key = None;
    });
    assert_eq!(
        (v.user_data(), v.nonce(), v.public_key()),
        (None, None, None)
    );
}

#[test]
fn accepts_empty_user_data() {
    let v = accepts(|s| {
        s.user_data = Some(vec![]);
        s.expect.user_data = Some(vec![]);
    });
    assert_eq!(v.user_data(), Some(&[][..]));
}

#[test]
fn accepts_seventeen_pcrs() {
    let v = accepts(|s| s.locked_user_pcrs = vec![(16, b"application config")]);
    assert_eq!(v.pcrs().len(), 17);
    let expected: [u8; 48] = Sha384::new()
        .chain_update([0u8; 48])
        .chain_update(b"application config")
        .finalize()
        .into();
    assert_eq!(v.pcr(pcr_index(16)), Some(&Pcr::new(expected)));
}

#[test]
fn accepts_thirty_two_pcrs() {
    let v = accepts(|s| s.lock_pcrs = Some(32));
    assert_eq!(v.pcrs().len(), 32);
}

// ---- expectations and time -------------------------------------------------------------------

#[test]
fn rejects_pcr_mismatch() {
    rule(
        |s| {
            s.expect.pcrs.insert(pcr_index(2), Pcr::new(measurement(9)));
        },
        |e| {
            *e == AttestationError::PcrMismatch {
                index: pcr_index(2),
                expected: Pcr::new(measurement(9)),
                found: Pcr::new(measurement(2)),
            }
        },
    );
}

#[test]
fn rejects_missing_expected_pcr() {
    // PCR16 is expected but was never locked, so the document does not carry it.
    rule(
        |s| {
            s.expect.pcrs.insert(pcr_index(16), Pcr::ZERO);
        },
        |e| {
            *e == AttestationError::ExpectedPcrMissing {
                index: pcr_index(16),
            }
        },
    );
}

#[test]
fn rejects_debug_mode_unless_allowed() {
    rule(
        |s| s.debug_mode = true,
        |e| *e == AttestationError::DebugMode,
    );
    let v = accepts(|s| {
        s.debug_mode = true;
        s.expect.allow_debug = true;
        s.expect.pcrs.clear();
    });
    assert!(v.is_debug());
}

#[test]
fn rejects_wrong_nonce() {
    rule(
        |s| s.expect.nonce = Some(vec![0x5b; 32]),
        |e| matches!(e, AttestationError::FieldMismatch { field: "nonce", .. }),
    );
}

#[test]
fn rejects_missing_nonce() {
    rule(
        |s| s.nonce = None,
        |e| *e == AttestationError::ExpectedFieldMissing { field: "nonce" },
    );
}

#[test]
fn rejects_wrong_public_key() {
    rule(
        |s| s.public_key = Some(vec![0xee; 32]),
        |e| {
            *e == AttestationError::FieldMismatch {
                field: "public_key",
                expected_hex: hex::encode([0xed; 32]),
                found_hex: hex::encode([0xee; 32]),
            }
        },
    );
}

#[test]
fn rejects_wrong_user_data() {
    rule(
        |s| s.user_data = Some(b"log head 40".to_vec()),
        |e| {
            matches!(
                e,
                AttestationError::FieldMismatch {
                    field: "user_data",
                    ..
                }
            )
        },
    );
}

#[test]
fn rejects_stale_document_beyond_max_age() {
    let max_age_ms = 5 * MINUTE_MS;
    accepts(|s| {
        s.expect.max_age_ms = Some(max_age_ms);
        s.at = VerifyAt::Instant(after(max_age_ms));
    });
    rule(
        |s| {
            s.expect.max_age_ms = Some(max_age_ms);
            s.at = VerifyAt::Instant(after(max_age_ms + 1));
        },
        |e| {
            *e == AttestationError::TooOld {
                at: after(max_age_ms + 1),
                age_ms: max_age_ms + 1,
                max_age_ms,
            }
        },
    );
}

#[test]
fn rejects_document_from_the_future() {
    // Chain issued at T0, document made 30 minutes later, verified 10 minutes after T0.
    rule(
        |s| {
            s.attest_after_ms = 30 * MINUTE_MS;
            s.at = VerifyAt::Instant(after(10 * MINUTE_MS));
        },
        |e| {
            *e == AttestationError::TimestampInFuture {
                timestamp: after(30 * MINUTE_MS),
                at: after(10 * MINUTE_MS),
            }
        },
    );
}

#[test]
fn accepts_expired_document_at_its_own_timestamp() {
    let v = accepts(|s| s.at = VerifyAt::DocumentTimestamp);
    assert_eq!(v.verified_at(), T0);
}

#[test]
fn rejects_cached_chain_outside_its_validity() {
    // A leaf that outlives its issuer: after the instance CA expires, a verifier that cached
    // the CA chain must notice, and name the instance certificate.
    let mut s = Scenario::default();
    chain(&mut s, |c| {
        c.validity(
            Position::Leaf,
            ValiditySpec::Relative {
                not_before_ms: -3_000,
                not_after_ms: 10 * 24 * 3_600_000,
            },
        )
    });
    let doc = s.document();
    let verifier = AttestationVerifier::new(mock_root().clone());
    verifier
        .verify(&doc, &s.expect, VerifyAt::Instant(after(1_000)))
        .unwrap();
    verifier
        .verify(&doc, &s.expect, VerifyAt::Instant(after(2_000)))
        .unwrap();
    let two_days = VerifyAt::Instant(after(48 * HOUR_MS));
    assert!(matches!(
        verifier.verify(&doc, &s.expect, two_days),
        Err(AttestationError::Expired { cert: 3, .. })
    ));
}

// ---- the checked-in fixtures -----------------------------------------------------------------

fn fixture(name: &str) -> Vec<u8> {
    let path = [
        env!("CARGO_MANIFEST_DIR"),
        "..",
        "verifier",
        "testdata",
        "mock",
        name,
    ]
    .iter()
    .collect::<std::path::PathBuf>();
    std::fs::read(path).unwrap()
}

#[test]
fn fixtures_verify_under_the_mock_root_only() {
    let anchor = TrustAnchor::from_pem(&fixture("mock-root.pem")).unwrap();
    let expect = Expectations {
        pcrs: BTreeMap::from([(
            pcr_index(0),
            Pcr::from_hex(
                "9b8eb59648ccf149137f8041fd0024fa02d35dd33a80e5053535cf272753c17dcbed7673b8a9b7bc0aad2760e3ab4e87",
            )
            .unwrap(),
        )]),
        nonce: Some(Sha256::digest(b"attestplane fixture nonce").to_vec()),
        ..Expectations::default()
    };
    for name in ["mock-prod.cose", "mock-prod-indefinite.cose"] {
        let v = verify_attestation(
            &fixture(name),
            &anchor,
            &expect,
            VerifyAt::DocumentTimestamp,
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(v.timestamp(), UnixMillis::from_millis(1_751_328_000_123));
        let under_aws = verify_attestation(
            &fixture(name),
            &TrustAnchor::aws_nitro_root_g1(),
            &expect,
            VerifyAt::DocumentTimestamp,
        );
        assert!(
            matches!(under_aws, Err(AttestationError::UntrustedRoot { .. })),
            "{name} under the aws root: {under_aws:?}"
        );
    }
    let debug = verify_attestation(
        &fixture("mock-debug.cose"),
        &anchor,
        &Expectations::default(),
        VerifyAt::DocumentTimestamp,
    );
    assert_eq!(debug.map(|_| ()), Err(AttestationError::DebugMode));
}
