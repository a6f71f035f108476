//! The mock's certificate chain: root → regional → zonal → instance → leaf, shaped like AWS's.
//!
//! Every key is P-384 and derived from the mock's seed and a label, so one seed always yields
//! the same keys; every certificate is ECDSA-with-SHA-384 and RFC 6979 deterministic, so the same
//! seed, specification and issuance instant yield the same bytes. The extensions follow what the
//! real chain carries (see `/work/shared/testdata/nitro/`):
//!
//! | position | basicConstraints (critical) | keyUsage | key identifiers | lifetime |
//! |---|---|---|---|---|
//! | root | CA | critical: digitalSignature, keyCertSign, cRLSign | SKI | fixed, 30 years |
//! | regional | CA, pathLen 2 | critical: digitalSignature, keyCertSign, cRLSign | AKI, SKI | 20 days |
//! | zonal | CA, pathLen 1 | critical: digitalSignature, keyCertSign, cRLSign | AKI, SKI | 5 days |
//! | instance | CA, pathLen 0 | critical: keyCertSign | none | 1 day |
//! | leaf | not CA | not critical: digitalSignature, nonRepudiation | none | 3 hours |
//!
//! What a [`ChainSpec`] describes is deliberately open: tests bend any of it (a leaf marked CA,
//! a link signed by the wrong key, an expired intermediate …) through the fault methods below,
//! which [`super::testing`] re-exports. The default specification is the only one a running mock uses unless a
//! test asks otherwise.
//!
//! Not reproduced: the CRL distribution points of the regional and zonal certificates (they would
//! name URLs that do not exist), and real AWS serial numbers and subject key identifiers.

use std::collections::BTreeMap;
use std::time::Duration;

use attestplane_verifier::UnixMillis;
use der::asn1::{
    Any, BitString, GeneralizedTime, ObjectIdentifier, OctetString, PrintableStringRef, SetOfVec,
    UtcTime, Utf8StringRef,
};
use der::flagset::FlagSet;
use der::{Encode, Tag};
use p384::ecdsa::signature::Signer;
use p384::ecdsa::signature::hazmat::PrehashSigner;
use p384::ecdsa::{DerSignature, SigningKey};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use sha2::{Digest as _, Sha256, Sha384};
use spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};
use x509_cert::attr::AttributeTypeAndValue;
use x509_cert::certificate::{Certificate, TbsCertificate, Version};
use x509_cert::ext::Extension;
use x509_cert::ext::pkix::{AuthorityKeyIdentifier, BasicConstraints, KeyUsage, KeyUsages};
use x509_cert::name::{Name, RdnSequence, RelativeDistinguishedName};
use x509_cert::serial_number::SerialNumber;
use x509_cert::time::{Time, Validity};

const OID_COUNTRY: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.6");
const OID_STATE: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.8");
const OID_LOCALITY: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.7");
const OID_ORGANIZATION: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.10");
const OID_ORG_UNIT: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.11");
const OID_COMMON_NAME: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.3");
const OID_ECDSA_SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.3");
const OID_ECDSA_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");
const OID_EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const OID_PRIME256V1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
const OID_BASIC_CONSTRAINTS: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.19");
const OID_KEY_USAGE: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.15");
const OID_SUBJECT_KEY_ID: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.14");
const OID_AUTHORITY_KEY_ID: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.35");

/// The uncompressed P-256 base point: a valid public key on the wrong curve, for the
/// "non-P-384 key" fault (nothing ever signs with it).
const P256_GENERATOR: [u8; 65] = [
    0x04, 0x6b, 0x17, 0xd1, 0xf2, 0xe1, 0x2c, 0x42, 0x47, 0xf8, 0xbc, 0xe6, 0xe5, 0x63, 0xa4, 0x40,
    0xf2, 0x77, 0x03, 0x7d, 0x81, 0x2d, 0xeb, 0x33, 0xa0, 0xf4, 0xa1, 0x39, 0x45, 0xd8, 0x98, 0xc2,
    0x96, 0x4f, 0xe3, 0x42, 0xe2, 0xfe, 0x1a, 0x7f, 0x9b, 0x8e, 0xe7, 0xeb, 0x4a, 0x7c, 0x0f, 0x9e,
    0x16, 0x2b, 0xce, 0x33, 0x57, 0x6b, 0x31, 0x5e, 0xce, 0xcb, 0xb6, 0x40, 0x68, 0x37, 0xbf, 0x51,
    0xf5,
];

/// First second of 2050: from here on X.509 times are GeneralizedTime (RFC 5280 §4.1.2.5).
const UTC_TIME_END_SECS: u64 = 2_524_608_000;

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 24 * HOUR_MS;

/// How long a mock leaf certificate lives, like AWS's (three hours).
pub const LEAF_LIFETIME_MS: u64 = 3 * 3_600_000;

/// The AWS Nitro root's validity window, reused for the mock root so that it is independent of
/// when the mock runs: 2019-10-28T13:28:05Z to 2049-10-28T14:28:05Z.
pub const ROOT_NOT_BEFORE: UnixMillis = UnixMillis::from_millis(1_572_269_285_000);
/// End of the mock root's validity (see [`ROOT_NOT_BEFORE`]).
pub const ROOT_NOT_AFTER: UnixMillis = UnixMillis::from_millis(2_519_044_085_000);

/// Why the mock could not produce a certificate or document.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MockError {
    /// DER encoding of a certificate failed.
    #[error("certificate encoding failed: {0}")]
    Der(#[from] der::Error),
    /// Encoding a public key failed.
    #[error("public key encoding failed: {0}")]
    PublicKey(#[from] spki::Error),
    /// Signing failed.
    #[error("signing failed")]
    Signature(#[from] p384::ecdsa::Error),
    /// PEM encoding failed.
    #[error("pem encoding failed")]
    Pem,
    /// A chain needs at least a root and a leaf.
    #[error("chain has {found} certificates; at least 2 are needed")]
    ChainTooShort {
        /// Certificates in the specification.
        found: usize,
    },
}

/// The attribute types AWS uses in its certificate names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameAttr {
    /// `C` (PrintableString).
    Country,
    /// `ST`.
    State,
    /// `L`.
    Locality,
    /// `O`.
    Organization,
    /// `OU`.
    OrganizationalUnit,
    /// `CN`.
    CommonName,
}

/// A distinguished name as a list of single-valued RDNs, in DER order.
pub type NameSpec = Vec<(NameAttr, String)>;

/// When a certificate is valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValiditySpec {
    /// Relative to the chain's issuance instant (the anchor), in milliseconds; rounded down to
    /// whole seconds when encoded.
    Relative {
        /// Offset of `notBefore` from the anchor.
        not_before_ms: i64,
        /// Offset of `notAfter` from the anchor.
        not_after_ms: i64,
    },
    /// Fixed instants.
    Absolute {
        /// `notBefore`.
        not_before: UnixMillis,
        /// `notAfter`.
        not_after: UnixMillis,
    },
}

/// The basicConstraints extension of a certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BasicConstraintsSpec {
    /// Whether the extension is marked critical.
    pub critical: bool,
    /// The `cA` flag.
    pub ca: bool,
    /// `pathLenConstraint`.
    pub path_len: Option<u8>,
}

/// The keyUsage extension of a certificate (only the bits AWS uses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyUsageSpec {
    /// Whether the extension is marked critical.
    pub critical: bool,
    /// `digitalSignature`.
    pub digital_signature: bool,
    /// `nonRepudiation` (`contentCommitment`).
    pub non_repudiation: bool,
    /// `keyCertSign`.
    pub key_cert_sign: bool,
    /// `cRLSign`.
    pub crl_sign: bool,
}

/// The algorithm a certificate declares and is signed with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertSignatureAlgorithm {
    /// `ecdsa-with-SHA384`, what AWS uses.
    EcdsaWithSha384,
    /// `ecdsa-with-SHA256` (a P-384 key signing a SHA-256 digest): valid, but not AWS's profile.
    EcdsaWithSha256,
}

/// The public key a certificate certifies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertKey {
    /// The P-384 key derived from the certificate's `key_label`.
    P384,
    /// A P-256 key (the curve's base point). Only sensible on the leaf: nothing can sign with it.
    P256,
}

/// One certificate of a mock chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertSpec {
    /// Label the certificate's key is derived from (with the seed). Two certificates with the
    /// same label certify the same key.
    pub key_label: String,
    /// The subject name.
    pub subject: NameSpec,
    /// The issuer name; `None` means the issuing certificate's subject (or its own, for a root).
    pub issuer_name: Option<NameSpec>,
    /// When the certificate is valid.
    pub validity: ValiditySpec,
    /// basicConstraints, or `None` to leave the extension out.
    pub basic_constraints: Option<BasicConstraintsSpec>,
    /// keyUsage, or `None` to leave the extension out.
    pub key_usage: Option<KeyUsageSpec>,
    /// Whether to include a subjectKeyIdentifier.
    pub subject_key_identifier: bool,
    /// Whether to include an authorityKeyIdentifier.
    pub authority_key_identifier: bool,
    /// Label of the key that signs this certificate; `None` means the issuer's key.
    pub signed_by: Option<String>,
    /// The signature algorithm declared and used.
    pub signature_algorithm: CertSignatureAlgorithm,
    /// The certified key.
    pub public_key: CertKey,
    /// Flip a bit of the signature after signing.
    pub corrupt_signature: bool,
}

/// How the CA certificates are ordered in the document's `cabundle`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BundleOrder {
    /// Root first, then each intermediate down to the leaf's issuer: what AWS sends.
    RootFirst,
    /// The reverse: the leaf's issuer first, the root last.
    Reversed,
    /// Explicit indices into the CA certificates (0 = root); may omit or repeat certificates.
    Custom(Vec<usize>),
}

/// A chain to issue: CA certificates root first, the leaf last.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainSpec {
    /// The certificates, root first; the last is the leaf that signs documents.
    pub certs: Vec<CertSpec>,
    /// How the CA certificates are placed in `cabundle`.
    pub bundle_order: BundleOrder,
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

/// The identity a mock NSM presents: instance, enclave, region. Derived from the seed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MockIdentity {
    /// EC2 instance id, `i-` and 17 hex digits.
    pub instance_id: String,
    /// Enclave id, `enc` and 16 hex digits.
    pub enclave_id: String,
    /// AWS region name.
    pub region: String,
    /// 16 hex digits naming the regional CA.
    pub regional_tag: String,
    /// 16 hex digits naming the zonal CA.
    pub zonal_tag: String,
}

impl MockIdentity {
    /// The identity a mock with `seed` presents.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        let h = Sha384::new()
            .chain_update(b"attestplane mock nsm identity\0")
            .chain_update(seed)
            .finalize();
        let hex = hex::encode(h);
        let part = |from: usize, to: usize| hex.get(from..to).unwrap_or_default().to_owned();
        Self {
            instance_id: format!("i-{}", part(0, 17)),
            enclave_id: format!("enc{}", part(17, 33)),
            region: "us-east-1".to_owned(),
            regional_tag: part(33, 49),
            zonal_tag: part(49, 65),
        }
    }

    /// The NSM module id, `i-…-enc…`, as AWS forms it.
    pub fn module_id(&self) -> String {
        format!("{}-{}", self.instance_id, self.enclave_id)
    }
}

impl CertSpec {
    fn ca_key_usage(digital_signature: bool, crl_sign: bool) -> Option<KeyUsageSpec> {
        Some(KeyUsageSpec {
            critical: true,
            digital_signature,
            non_repudiation: false,
            key_cert_sign: true,
            crl_sign,
        })
    }

    fn ca(path_len: Option<u8>) -> Option<BasicConstraintsSpec> {
        Some(BasicConstraintsSpec {
            critical: true,
            ca: true,
            path_len,
        })
    }
}

fn aws_name(cn: String) -> NameSpec {
    vec![
        (NameAttr::Country, "US".to_owned()),
        (NameAttr::Organization, "Amazon".to_owned()),
        (NameAttr::OrganizationalUnit, "AWS".to_owned()),
        (NameAttr::CommonName, cn),
    ]
}

fn seattle_name(cn: String) -> NameSpec {
    vec![
        (NameAttr::Country, "US".to_owned()),
        (NameAttr::State, "Washington".to_owned()),
        (NameAttr::Locality, "Seattle".to_owned()),
        (NameAttr::Organization, "Amazon".to_owned()),
        (NameAttr::OrganizationalUnit, "AWS".to_owned()),
        (NameAttr::CommonName, cn),
    ]
}

impl ChainSpec {
    /// The chain a mock with `identity` uses: five certificates shaped like AWS's (see the
    /// module documentation), names marked `mock` so they are never mistaken for AWS's.
    pub fn aws_like(identity: &MockIdentity) -> Self {
        let region = &identity.region;
        let root = CertSpec {
            key_label: "root".to_owned(),
            subject: aws_name("mock.aws.nitro-enclaves".to_owned()),
            issuer_name: None,
            validity: ValiditySpec::Absolute {
                not_before: ROOT_NOT_BEFORE,
                not_after: ROOT_NOT_AFTER,
            },
            basic_constraints: CertSpec::ca(None),
            key_usage: CertSpec::ca_key_usage(true, true),
            subject_key_identifier: true,
            authority_key_identifier: false,
            signed_by: None,
            signature_algorithm: CertSignatureAlgorithm::EcdsaWithSha384,
            public_key: CertKey::P384,
            corrupt_signature: false,
        };
        let regional = CertSpec {
            key_label: "regional".to_owned(),
            subject: aws_name(format!(
                "{}.{region}.mock.aws.nitro-enclaves",
                identity.regional_tag
            )),
            validity: ValiditySpec::Relative {
                not_before_ms: -5 * DAY_MS,
                not_after_ms: 15 * DAY_MS,
            },
            basic_constraints: CertSpec::ca(Some(2)),
            authority_key_identifier: true,
            ..root.clone()
        };
        let zonal = CertSpec {
            key_label: "zonal".to_owned(),
            // AWS writes this one name in the opposite order: CN first.
            subject: vec![
                (
                    NameAttr::CommonName,
                    format!(
                        "{}.zonal.{region}.mock.aws.nitro-enclaves",
                        identity.zonal_tag
                    ),
                ),
                (NameAttr::OrganizationalUnit, "AWS".to_owned()),
                (NameAttr::Organization, "Amazon".to_owned()),
                (NameAttr::Country, "US".to_owned()),
                (NameAttr::State, "WA".to_owned()),
                (NameAttr::Locality, "Seattle".to_owned()),
            ],
            validity: ValiditySpec::Relative {
                not_before_ms: -DAY_MS,
                not_after_ms: 4 * DAY_MS,
            },
            basic_constraints: CertSpec::ca(Some(1)),
            ..regional.clone()
        };
        let instance = CertSpec {
            key_label: "instance".to_owned(),
            subject: seattle_name(format!(
                "{}.{region}.mock.aws.nitro-enclaves",
                identity.instance_id
            )),
            validity: ValiditySpec::Relative {
                not_before_ms: -HOUR_MS,
                not_after_ms: DAY_MS,
            },
            basic_constraints: CertSpec::ca(Some(0)),
            key_usage: Some(KeyUsageSpec {
                critical: true,
                digital_signature: false,
                non_repudiation: false,
                key_cert_sign: true,
                crl_sign: false,
            }),
            subject_key_identifier: false,
            authority_key_identifier: false,
            ..zonal.clone()
        };
        let leaf = CertSpec {
            key_label: "leaf".to_owned(),
            subject: seattle_name(format!("{}.{region}.mock.aws", identity.module_id())),
            validity: ValiditySpec::Relative {
                not_before_ms: -3_000,
                not_after_ms: 3 * HOUR_MS,
            },
            basic_constraints: Some(BasicConstraintsSpec {
                critical: true,
                ca: false,
                path_len: None,
            }),
            key_usage: Some(KeyUsageSpec {
                critical: false,
                digital_signature: true,
                non_repudiation: true,
                key_cert_sign: false,
                crl_sign: false,
            }),
            ..instance.clone()
        };
        Self {
            certs: vec![root, regional, zonal, instance, leaf],
            bundle_order: BundleOrder::RootFirst,
        }
    }
}

/// A chain issued at one instant.
#[derive(Clone, Debug)]
pub(crate) struct IssuedChain {
    /// The issuance instant the relative validities count from.
    pub(crate) anchor: UnixMillis,
    /// The leaf certificate, DER.
    pub(crate) leaf: Vec<u8>,
    /// The CA certificates in `cabundle` order, DER.
    pub(crate) cabundle: Vec<Vec<u8>>,
    /// Every certificate, root first, leaf last, DER.
    pub(crate) root_first: Vec<Vec<u8>>,
    /// The label of the leaf's key, which signs documents.
    pub(crate) leaf_key_label: String,
}

/// The mock's P-384 keys, derived on demand from the seed and a label.
pub(crate) struct KeyRing {
    seed: [u8; 32],
    keys: BTreeMap<String, SigningKey>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRing")
            .field("labels", &self.keys.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl KeyRing {
    pub(crate) fn new(seed: [u8; 32]) -> Self {
        Self {
            seed,
            keys: BTreeMap::new(),
        }
    }

    /// The key for `label`: `ChaCha20(SHA-256("attestplane mock nsm key" ‖ seed ‖ label))`.
    pub(crate) fn key(&mut self, label: &str) -> SigningKey {
        let seed = self.seed;
        self.keys
            .entry(label.to_owned())
            .or_insert_with(|| {
                let derived: [u8; 32] = Sha256::new()
                    .chain_update(b"attestplane mock nsm key\0")
                    .chain_update(seed)
                    .chain_update(label.as_bytes())
                    .finalize()
                    .into();
                SigningKey::random(&mut ChaCha20Rng::from_seed(derived))
            })
            .clone()
    }

    /// A serial number that depends on the seed, the key and the validity window, so that a
    /// certificate with a fixed window (the root) keeps its bytes across reissues.
    fn serial(
        &self,
        label: &str,
        not_before: UnixMillis,
        not_after: UnixMillis,
    ) -> Result<SerialNumber, MockError> {
        let h = Sha256::new()
            .chain_update(b"attestplane mock nsm serial\0")
            .chain_update(self.seed)
            .chain_update(label.as_bytes())
            .chain_update(not_before.as_millis().to_be_bytes())
            .chain_update(not_after.as_millis().to_be_bytes())
            .finalize();
        let mut bytes = [0u8; 16];
        for (b, h) in bytes.iter_mut().zip(h.iter()) {
            *b = *h;
        }
        // Positive and without a leading zero byte: minimal DER.
        bytes[0] = (bytes[0] & 0x7f) | 0x40;
        Ok(SerialNumber::new(&bytes)?)
    }
}

/// Issues `spec` at `anchor`.
pub(crate) fn issue_chain(
    spec: &ChainSpec,
    keys: &mut KeyRing,
    anchor: UnixMillis,
) -> Result<IssuedChain, MockError> {
    if spec.certs.len() < 2 {
        return Err(MockError::ChainTooShort {
            found: spec.certs.len(),
        });
    }
    let mut root_first = Vec::with_capacity(spec.certs.len());
    let mut issuer = spec
        .certs
        .first()
        .ok_or(MockError::ChainTooShort { found: 0 })?;
    for cert in &spec.certs {
        root_first.push(issue_cert(cert, issuer, keys, anchor)?);
        issuer = cert;
    }
    let leaf = root_first
        .pop()
        .ok_or(MockError::ChainTooShort { found: 0 })?;
    let cabundle = match &spec.bundle_order {
        BundleOrder::RootFirst => root_first.clone(),
        BundleOrder::Reversed => root_first.iter().rev().cloned().collect(),
        BundleOrder::Custom(order) => order
            .iter()
            .filter_map(|&i| root_first.get(i).cloned())
            .collect(),
    };
    root_first.push(leaf.clone());
    let leaf_key_label = spec
        .certs
        .last()
        .map(|c| c.key_label.clone())
        .unwrap_or_default();
    Ok(IssuedChain {
        anchor,
        leaf,
        cabundle,
        root_first,
        leaf_key_label,
    })
}

fn issue_cert(
    cert: &CertSpec,
    issuer: &CertSpec,
    keys: &mut KeyRing,
    anchor: UnixMillis,
) -> Result<Vec<u8>, MockError> {
    let subject_spki = match cert.public_key {
        CertKey::P384 => {
            SubjectPublicKeyInfoOwned::from_key(*keys.key(&cert.key_label).verifying_key())?
        }
        CertKey::P256 => SubjectPublicKeyInfoOwned {
            algorithm: AlgorithmIdentifierOwned {
                oid: OID_EC_PUBLIC_KEY,
                parameters: Some(Any::encode_from(&OID_PRIME256V1)?),
            },
            subject_public_key: BitString::from_bytes(&P256_GENERATOR)?,
        },
    };
    let issuer_spki =
        SubjectPublicKeyInfoOwned::from_key(*keys.key(&issuer.key_label).verifying_key())?;
    let signer_label = cert.signed_by.as_deref().unwrap_or(&issuer.key_label);
    let signer = keys.key(signer_label);

    let subject = encode_name(&cert.subject)?;
    let issuer_name = encode_name(cert.issuer_name.as_ref().unwrap_or(&issuer.subject))?;
    let (not_before, not_after) = match cert.validity {
        ValiditySpec::Relative {
            not_before_ms,
            not_after_ms,
        } => (offset(anchor, not_before_ms), offset(anchor, not_after_ms)),
        ValiditySpec::Absolute {
            not_before,
            not_after,
        } => (not_before, not_after),
    };

    let mut extensions = Vec::new();
    if let Some(bc) = cert.basic_constraints {
        let value = BasicConstraints {
            ca: bc.ca,
            path_len_constraint: bc.path_len,
        };
        extensions.push(extension(OID_BASIC_CONSTRAINTS, bc.critical, &value)?);
    }
    if cert.authority_key_identifier {
        let value = AuthorityKeyIdentifier {
            key_identifier: Some(OctetString::new(key_identifier(&issuer_spki))?),
            ..Default::default()
        };
        extensions.push(extension(OID_AUTHORITY_KEY_ID, false, &value)?);
    }
    if cert.subject_key_identifier {
        let value = OctetString::new(key_identifier(&subject_spki))?;
        extensions.push(extension(OID_SUBJECT_KEY_ID, false, &value)?);
    }
    if let Some(ku) = cert.key_usage {
        let mut flags = FlagSet::<KeyUsages>::default();
        for (on, flag) in [
            (ku.digital_signature, KeyUsages::DigitalSignature),
            (ku.non_repudiation, KeyUsages::NonRepudiation),
            (ku.key_cert_sign, KeyUsages::KeyCertSign),
            (ku.crl_sign, KeyUsages::CRLSign),
        ] {
            if on {
                flags |= flag;
            }
        }
        extensions.push(extension(OID_KEY_USAGE, ku.critical, &KeyUsage(flags))?);
    }

    let algorithm = AlgorithmIdentifierOwned {
        oid: match cert.signature_algorithm {
            CertSignatureAlgorithm::EcdsaWithSha384 => OID_ECDSA_SHA384,
            CertSignatureAlgorithm::EcdsaWithSha256 => OID_ECDSA_SHA256,
        },
        parameters: None,
    };
    let tbs = TbsCertificate {
        version: Version::V3,
        serial_number: keys.serial(&cert.key_label, not_before, not_after)?,
        signature: algorithm.clone(),
        issuer: issuer_name,
        validity: Validity {
            not_before: x509_time(not_before)?,
            not_after: x509_time(not_after)?,
        },
        subject,
        subject_public_key_info: subject_spki,
        issuer_unique_id: None,
        subject_unique_id: None,
        extensions: if extensions.is_empty() {
            None
        } else {
            Some(extensions)
        },
    };
    let tbs_der = tbs.to_der()?;
    let signature: DerSignature = match cert.signature_algorithm {
        CertSignatureAlgorithm::EcdsaWithSha384 => signer.sign(&tbs_der),
        CertSignatureAlgorithm::EcdsaWithSha256 => {
            signer.sign_prehash(&Sha256::digest(&tbs_der))?
        }
    };
    let mut signature = signature.as_bytes().to_vec();
    if cert.corrupt_signature
        && let Some(last) = signature.last_mut()
    {
        *last ^= 0x01;
    }
    let certificate = Certificate {
        tbs_certificate: tbs,
        signature_algorithm: algorithm,
        signature: BitString::from_bytes(&signature)?,
    };
    Ok(certificate.to_der()?)
}

/// The PEM text of a DER certificate.
pub(crate) fn certificate_pem(der: &[u8]) -> Result<String, MockError> {
    der::pem::encode_string("CERTIFICATE", der::pem::LineEnding::LF, der)
        .map_err(|_| MockError::Pem)
}

fn offset(anchor: UnixMillis, by_ms: i64) -> UnixMillis {
    let at = i128::from(anchor.as_millis()) + i128::from(by_ms);
    UnixMillis::from_millis(u64::try_from(at.max(0)).unwrap_or(u64::MAX))
}

fn x509_time(at: UnixMillis) -> Result<Time, MockError> {
    let secs = at.as_secs();
    let d = Duration::from_secs(secs);
    Ok(if secs < UTC_TIME_END_SECS {
        Time::UtcTime(UtcTime::from_unix_duration(d)?)
    } else {
        Time::GeneralTime(GeneralizedTime::from_unix_duration(d)?)
    })
}

/// A key identifier: the first 20 bytes of SHA-256 of the subject public key (RFC 7093 §2).
fn key_identifier(spki: &SubjectPublicKeyInfoOwned) -> Vec<u8> {
    let digest = Sha256::digest(spki.subject_public_key.raw_bytes());
    digest.iter().take(20).copied().collect()
}

fn extension(
    oid: ObjectIdentifier,
    critical: bool,
    value: &impl Encode,
) -> Result<Extension, MockError> {
    Ok(Extension {
        extn_id: oid,
        critical,
        extn_value: OctetString::new(value.to_der()?)?,
    })
}

fn encode_name(spec: &NameSpec) -> Result<Name, MockError> {
    let mut rdns = Vec::with_capacity(spec.len());
    for (attr, value) in spec {
        let (oid, value) = match attr {
            NameAttr::Country => (
                OID_COUNTRY,
                Any::encode_from(&PrintableStringRef::new(value)?)?,
            ),
            NameAttr::State => (OID_STATE, utf8(value)?),
            NameAttr::Locality => (OID_LOCALITY, utf8(value)?),
            NameAttr::Organization => (OID_ORGANIZATION, utf8(value)?),
            NameAttr::OrganizationalUnit => (OID_ORG_UNIT, utf8(value)?),
            NameAttr::CommonName => (OID_COMMON_NAME, utf8(value)?),
        };
        let mut set = SetOfVec::new();
        set.insert(AttributeTypeAndValue { oid, value })?;
        rdns.push(RelativeDistinguishedName(set));
    }
    Ok(RdnSequence(rdns))
}

fn utf8(value: &str) -> Result<Any, MockError> {
    let s = Utf8StringRef::new(value)?;
    Ok(Any::new(Tag::Utf8String, s.as_bytes())?)
}
