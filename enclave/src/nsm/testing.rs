//! Test and fixture tooling: fault injection for the mock NSM's chains and documents.
//!
//! Everything here exists so that the verifier's tests can produce each kind of bad attestation
//! document AWS's rules reject — a leaf marked CA, an expired intermediate, a link signed by the
//! wrong key, a tagged COSE envelope, a duplicate payload key — from a mock that is otherwise
//! exactly the one the running system uses. Nothing in a production path calls into this module:
//! a [`MockNsm`](super::MockNsm) built without these knobs is the correct mock, and the real NSM
//! has no knobs at all.
//!
//! Trust: none. Documents built with faults are meant to be rejected.
//!
//! ```
//! use attestplane_enclave::nsm::{Clock, MockNsmBuilder, Nsm};
//! use attestplane_enclave::nsm::testing::{ChainSpec, MockIdentity, Position};
//! use attestplane_verifier::UnixMillis;
//!
//! let seed = [7u8; 32];
//! let chain = ChainSpec::aws_like(&MockIdentity::from_seed(&seed)).expired(Position::Zonal);
//! let nsm = MockNsmBuilder::new(seed, Clock::Fixed(UnixMillis::from_secs(1_750_000_000)))
//!     .chain_spec(chain)
//!     .build();
//! let document = nsm.attest(None, Some(b"nonce".to_vec()), None).unwrap();
//! assert_eq!(document[0], 0x84);
//! ```

pub use super::certs::{
    BasicConstraintsSpec, BundleOrder, CertKey, CertSignatureAlgorithm, CertSpec, ChainSpec,
    KeyUsageSpec, LEAF_LIFETIME_MS, MockIdentity, NameAttr, NameSpec, ROOT_NOT_AFTER,
    ROOT_NOT_BEFORE, ValiditySpec,
};
use super::mock::MockNsmBuilder;

const DAY_MS: i64 = 24 * 3_600_000;

/// Which half of the scalar field the ES384 signature's `s` is put in. Both verify; real NSMs
/// produce either, about half the time each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SignatureS {
    /// Whatever RFC 6979 signing produced.
    #[default]
    AsSigned,
    /// Force `s > n/2`.
    High,
    /// Force `s <= n/2`.
    Low,
}

/// Ways to break a document's envelope or payload. The default breaks nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DocumentFaults {
    /// Wrap the COSE_Sign1 in CBOR tag 18 (the NSM never does).
    pub tag_cose: bool,
    /// Bytes appended after the COSE_Sign1.
    pub trailing_bytes: Vec<u8>,
    /// Payload keys to leave out.
    pub omit_fields: Vec<String>,
    /// Payload keys to write a second time (same value), at the end of the map.
    pub duplicate_fields: Vec<String>,
    /// Extra payload entries, key and raw CBOR value, at the end of the map.
    pub extra_fields: Vec<(String, Vec<u8>)>,
    /// Payload values to replace, key and raw CBOR value (see [`cbor`]).
    pub replace_fields: Vec<(String, Vec<u8>)>,
    /// Raw protected-header bytes instead of `a1 01 38 22` (the signature still covers them).
    pub protected_header: Option<Vec<u8>>,
    /// Raw CBOR for the unprotected header instead of `a0`.
    pub unprotected_header: Option<Vec<u8>>,
    /// Flip a bit of the COSE signature.
    pub corrupt_signature: bool,
    /// Sign the document with the key of this label instead of the leaf's.
    pub sign_with_key: Option<String>,
    /// Accept `user_data`, `nonce` and `public_key` longer than the NSM's 1024-byte limit.
    pub allow_oversized_fields: bool,
}

/// A certificate's place in a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Position {
    /// The first certificate (the self-signed root).
    Root,
    /// The second certificate.
    Regional,
    /// The third certificate.
    Zonal,
    /// The last CA certificate (the leaf's issuer).
    Instance,
    /// The last certificate (signs documents).
    Leaf,
    /// Index into the chain, root = 0.
    Index(usize),
}

impl Position {
    /// The index this position names in a chain of `len` certificates, if any.
    pub fn index(self, len: usize) -> Option<usize> {
        let i = match self {
            Self::Root => Some(0),
            Self::Regional => Some(1),
            Self::Zonal => Some(2),
            Self::Instance => len.checked_sub(2),
            Self::Leaf => len.checked_sub(1),
            Self::Index(i) => Some(i),
        };
        i.filter(|&i| i < len)
    }
}

/// Fault methods. Each returns the changed specification; a position the chain does not have
/// leaves it unchanged.
impl ChainSpec {
    /// The certificate at `position`, to change freely.
    pub fn cert_mut(&mut self, position: Position) -> Option<&mut CertSpec> {
        let i = position.index(self.certs.len())?;
        self.certs.get_mut(i)
    }

    fn with(mut self, position: Position, change: impl FnOnce(&mut CertSpec)) -> Self {
        if let Some(cert) = self.cert_mut(position) {
            change(cert);
        }
        self
    }

    /// The leaf's basicConstraints say CA.
    pub fn leaf_marked_ca(self) -> Self {
        self.with(Position::Leaf, |c| {
            c.basic_constraints = Some(BasicConstraintsSpec {
                critical: true,
                ca: true,
                path_len: None,
            });
        })
    }

    /// The certificate's basicConstraints say not CA (and carry no pathLen).
    pub fn without_ca_flag(self, position: Position) -> Self {
        self.with(position, |c| {
            c.basic_constraints = Some(BasicConstraintsSpec {
                critical: true,
                ca: false,
                path_len: None,
            });
        })
    }

    /// The certificate has no basicConstraints extension at all.
    pub fn without_basic_constraints(self, position: Position) -> Self {
        self.with(position, |c| c.basic_constraints = None)
    }

    /// The certificate's keyUsage lacks keyCertSign.
    pub fn without_key_cert_sign(self, position: Position) -> Self {
        self.with(position, |c| {
            if let Some(ku) = c.key_usage.as_mut() {
                ku.key_cert_sign = false;
            }
        })
    }

    /// The certificate has no keyUsage extension at all.
    pub fn without_key_usage(self, position: Position) -> Self {
        self.with(position, |c| c.key_usage = None)
    }

    /// Sets the certificate's pathLenConstraint (keeping its CA flag).
    pub fn path_len(self, position: Position, path_len: Option<u8>) -> Self {
        self.with(position, |c| {
            if let Some(bc) = c.basic_constraints.as_mut() {
                bc.path_len = path_len;
            }
        })
    }

    /// The certificate expired a day before the chain was issued.
    pub fn expired(self, position: Position) -> Self {
        self.validity(
            position,
            ValiditySpec::Relative {
                not_before_ms: -2 * DAY_MS,
                not_after_ms: -DAY_MS,
            },
        )
    }

    /// The certificate becomes valid a day after the chain was issued.
    pub fn not_yet_valid(self, position: Position) -> Self {
        self.validity(
            position,
            ValiditySpec::Relative {
                not_before_ms: DAY_MS,
                not_after_ms: 2 * DAY_MS,
            },
        )
    }

    /// Sets the certificate's validity.
    pub fn validity(self, position: Position, validity: ValiditySpec) -> Self {
        self.with(position, |c| c.validity = validity)
    }

    /// The certificate names an issuer that is not its issuing certificate's subject.
    pub fn wrong_issuer_name(self, position: Position) -> Self {
        self.with(position, |c| {
            c.issuer_name = Some(vec![
                (NameAttr::Country, "US".to_owned()),
                (NameAttr::Organization, "Amazon".to_owned()),
                (NameAttr::OrganizationalUnit, "AWS".to_owned()),
                (
                    NameAttr::CommonName,
                    "wrong-issuer.mock.aws.nitro-enclaves".to_owned(),
                ),
            ]);
        })
    }

    /// The certificate is signed by a key that is not its issuer's (label `rogue`).
    pub fn signed_by_wrong_key(self, position: Position) -> Self {
        self.with(position, |c| c.signed_by = Some("rogue".to_owned()))
    }

    /// The certificate declares and uses another signature algorithm.
    pub fn signature_algorithm(self, position: Position, alg: CertSignatureAlgorithm) -> Self {
        self.with(position, |c| c.signature_algorithm = alg)
    }

    /// The leaf certifies a P-256 key instead of a P-384 one.
    pub fn p256_leaf_key(self) -> Self {
        self.with(Position::Leaf, |c| c.public_key = CertKey::P256)
    }

    /// A bit of the certificate's signature is flipped.
    pub fn corrupt_signature(self, position: Position) -> Self {
        self.with(position, |c| c.corrupt_signature = true)
    }

    /// Orders `cabundle` differently.
    pub fn bundle_order(mut self, order: BundleOrder) -> Self {
        self.bundle_order = order;
        self
    }

    /// Inserts `n` more CA certificates above the leaf's issuer, properly signed and with
    /// pathLen constraints that allow them, so that the only fault is the chain's length.
    pub fn extra_intermediates(mut self, n: usize) -> Self {
        let Some(at) = self.certs.len().checked_sub(2) else {
            return self;
        };
        let Some(template) = self.certs.get(at.saturating_sub(1)).cloned() else {
            return self;
        };
        for k in 0..n {
            let mut extra = template.clone();
            extra.key_label = format!("extra-{k}");
            for (attr, value) in &mut extra.subject {
                if *attr == NameAttr::CommonName {
                    *value = format!("extra-{k}.{value}");
                }
            }
            extra.issuer_name = None;
            self.certs.insert(at.saturating_add(k), extra);
        }
        let len = self.certs.len();
        for (i, cert) in self.certs.iter_mut().enumerate().skip(1) {
            let below = len.saturating_sub(2).saturating_sub(i);
            if let Some(bc) = cert.basic_constraints.as_mut()
                && bc.ca
            {
                bc.path_len = Some(u8::try_from(below).unwrap_or(u8::MAX));
            }
        }
        self
    }

    /// The chain hangs off a different root with the same name (key label `other-root`).
    pub fn different_root(self) -> Self {
        self.with(Position::Root, |c| c.key_label = "other-root".to_owned())
    }
}

/// Test tooling on the mock's builder.
impl MockNsmBuilder {
    /// Test tooling: issue this chain instead of the AWS-like default.
    pub fn chain_spec(mut self, spec: ChainSpec) -> Self {
        self.chain = Some(spec);
        self
    }

    /// Test tooling: break every document this mock signs in these ways.
    pub fn document_faults(mut self, faults: DocumentFaults) -> Self {
        self.faults = faults;
        self
    }

    /// Test tooling: force the half of the field the signatures' `s` lies in.
    pub fn signature_s(mut self, form: SignatureS) -> Self {
        self.signature_s = form;
        self
    }
}

/// Raw CBOR values for [`DocumentFaults::replace_fields`] and [`DocumentFaults::extra_fields`].
pub mod cbor {
    /// A byte string.
    pub fn bytes(value: &[u8]) -> Vec<u8> {
        super::super::document::cbor_bytes(value)
    }
    /// A text string.
    pub fn text(value: &str) -> Vec<u8> {
        super::super::document::cbor_text(value)
    }
    /// An unsigned integer.
    pub fn uint(value: u64) -> Vec<u8> {
        super::super::document::cbor_uint(value)
    }
    /// `null`.
    pub fn null() -> Vec<u8> {
        super::super::document::cbor_null()
    }
    /// A definite map from unsigned integers to byte strings (the shape of `pcrs`).
    pub fn uint_bytes_map(entries: &[(u64, Vec<u8>)]) -> Vec<u8> {
        super::super::document::cbor_uint_bytes_map(entries)
    }
    /// A definite array of byte strings (the shape of `cabundle`).
    pub fn bytes_array(items: &[Vec<u8>]) -> Vec<u8> {
        super::super::document::cbor_bytes_array(items)
    }
}
