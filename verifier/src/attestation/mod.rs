//! AWS Nitro Enclaves attestation documents: parse, verify, and check against expectations.
//!
//! Role: decide whether a byte string is an attestation document that the NSM of a real Nitro
//! Enclave signed, under a certificate chain to a pinned root, at a given instant, for an enclave
//! whose measurements and bound values (nonce, public key, user data) are the ones expected. The
//! answer is either a precise [`AttestationError`] or a [`VerifiedAttestation`], which only a
//! successful verification can construct.
//!
//! The process is AWS's ("Nitro Enclaves Attestation Process", aws-nitro-enclaves-nsm-api
//! `docs/attestation_process.md`) with the corrections real documents teach:
//! 1. [`parse_attestation`]: untagged COSE_Sign1, protected header exactly `{1: -35}` (ES384),
//!    empty unprotected header, 96-byte signature; payload map definite or indefinite, exactly
//!    the nine fields, optional ones present as bytes or `null` (see [`document`]).
//! 2. The chain (see [`chain`]): `cabundle[0]` must be the pinned root by DER SHA-256; then
//!    `cabundle[1..]` and `certificate` each signed by the one before, with basicConstraints,
//!    keyUsage, pathLen and validity checked at the verification time.
//! 3. The COSE signature: ES384 over the Sig_structure built from the *raw* protected header
//!    and payload bytes, verified under the leaf's key. High-S signatures are accepted (about
//!    half of genuine ones are high-S).
//! 4. Time: in [`VerifyAt::Instant`] mode the document may not be from the future (beyond
//!    [`MAX_CLOCK_SKEW_MS`]) and, if asked, not older than `max_age_ms`.
//! 5. Expectations, all fail-closed: debug mode (PCR0, PCR1, PCR2 all zero) refused unless
//!    allowed; every expected PCR present and equal; expected nonce / public key / user data
//!    present and byte-equal.
//!
//! Trust assumptions: the caller's [`TrustAnchor`], [`Expectations`] and verification time. The
//! document is hostile: every length is bounded ([`MAX_DOCUMENT_LEN`] first of all), nothing
//! panics on input, and no decision is taken on a field before the signature over it verified.
//!
//! Layout: [`types`] (the `PcrIndex`/`Pcr` newtypes, the one reader of PCR files and of
//! `N=HEX`, which PCR sets name an image) at the bottom; [`document`] (parsing, step 1) and
//! [`chain`] (the pinned root and the certificate path, step 2) on top of it; the private
//! `cache` (verified certificate paths, so a warm check skips the chain) and `error`
//! ([`AttestationError`]); this file joins them (steps 3 to 5, [`VerifiedAttestation`]).
//!
//! What it deliberately does not do: read a clock ([`VerifyAt::DocumentTimestamp`] exists for
//! auditing archived documents, and is named so that nobody mistakes it for "now"); fetch
//! anything (no CRLs: AWS's process disables them and leaves live three hours); interpret
//! `user_data` or `public_key` (their meaning belongs to the protocol that asked for them).

mod cache;
pub mod chain;
pub mod document;
mod error;
pub mod types;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use p384::ecdsa::Signature;
use p384::ecdsa::signature::Verifier;
use serde::Serialize;
use sha2::{Digest, Sha256, Sha384};

pub use chain::{AWS_NITRO_ROOT_G1_PEM, AWS_NITRO_ROOT_G1_SHA256, CertSummary, TrustAnchor};
pub use document::{AttestationDocument, parse_attestation};
pub use error::AttestationError;
pub use types::{
    MAX_PCRS_JSON_LEN, Pcr, PcrIndex, PcrsFileError, PcrsJsonError, names_an_image,
    parse_pcr_assignment, parse_pcrs_json, read_pcrs_file,
};

use cache::{PathCaches, VerifiedPath};
use chain::VerifiedCaChain;
use types::{ser_hex, ser_hex_opt};

use crate::time::UnixMillis;

/// Largest document accepted, checked before any parsing. Real documents are about 4.5 KiB; the
/// NSM's own bound on the payload is 16 KiB.
pub const MAX_DOCUMENT_LEN: usize = 32 * 1024;

/// Largest `cabundle`: real documents carry 4 (root, regional, zonal, instance).
pub const MAX_CHAIN_LEN: usize = 8;

/// Largest certificate, per AWS's specification (`cert = bytes .size (1..1024)`); real ones are
/// 533–793 bytes.
pub const MAX_CERT_LEN: usize = 1024;

/// Largest `user_data`, `nonce` or `public_key` (the NSM accepts up to 1024 bytes for each).
pub const MAX_OPTIONAL_FIELD_LEN: usize = 1024;

/// Largest `module_id` in bytes (real ones are 39).
pub const MAX_MODULE_ID_LEN: usize = 256;

/// Deepest CBOR nesting accepted (real documents nest 3 deep).
pub const MAX_CBOR_DEPTH: usize = 8;

/// How far in the future of the verification instant a document's timestamp may be, to absorb
/// clock differences between the NSM and the verifier: one minute.
pub const MAX_CLOCK_SKEW_MS: u64 = 60_000;

/// Default number of verified CA chains, and of verified whole paths (CA chain and leaf), an
/// [`AttestationVerifier`] remembers.
pub const DEFAULT_CACHE_CAPACITY: usize = 64;

/// When to check certificate validity and freshness.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VerifyAt {
    /// At this instant (normally "now", read by the caller). Also refuses documents from the
    /// future beyond [`MAX_CLOCK_SKEW_MS`] and applies [`Expectations::max_age_ms`].
    Instant(UnixMillis),
    /// At the document's own signed timestamp: "was this valid when it was made?", for auditing
    /// archived documents. Says nothing about freshness; `max_age_ms` is refused in this mode.
    DocumentTimestamp,
}

/// What the caller requires of a document beyond its authenticity. The default expects no PCR
/// and refuses debug mode.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Expectations {
    /// PCRs that must be present with exactly these values.
    pub pcrs: BTreeMap<PcrIndex, Pcr>,
    /// Accept a debug-mode enclave (PCR0, PCR1 and PCR2 all zero).
    pub allow_debug: bool,
    /// If set, the document's `nonce` must be present and equal.
    pub nonce: Option<Vec<u8>>,
    /// If set, the document's `public_key` must be present and equal.
    pub public_key: Option<Vec<u8>>,
    /// If set, the document's `user_data` must be present and equal.
    pub user_data: Option<Vec<u8>>,
    /// If set, the document may be at most this old at a [`VerifyAt::Instant`].
    pub max_age_ms: Option<u64>,
}

/// One thing a verification established, for human or `--json` output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "check", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Check {
    /// Untagged COSE_Sign1, ES384 protected header, well-formed payload.
    Structure,
    /// `cabundle[0]` is the pinned root.
    RootPinned {
        /// SHA-256 of the root's DER.
        #[serde(serialize_with = "ser_hex")]
        fingerprint: [u8; 32],
    },
    /// A certificate of the path satisfied its rules at the verification time (`cached`: it was
    /// verified earlier by the same verifier, in a path of the very same bytes, and reused).
    Certificate {
        /// What was checked about it.
        #[serde(flatten)]
        cert: CertSummary,
        /// Whether the result came from the verifier's cache.
        cached: bool,
    },
    /// The COSE_Sign1 signature verified under the leaf's key.
    CoseSignature,
    /// The timestamp is not in the future and, if asked, recent enough.
    Freshness {
        /// Age of the document at the verification instant (0 if slightly in the future).
        age_ms: u64,
        /// The limit, if one was set.
        max_age_ms: Option<u64>,
    },
    /// The document is not from a debug-mode enclave, or debug mode was allowed.
    DebugMode {
        /// Whether the enclave is in debug mode.
        debug: bool,
    },
    /// An expected PCR matched.
    Pcr {
        /// The index.
        index: PcrIndex,
    },
    /// An expected optional field (`nonce`, `public_key`, `user_data`) matched.
    Field {
        /// The field name.
        field: &'static str,
    },
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Structure => f.write_str("untagged cose_sign1 (es384), well-formed payload"),
            Self::RootPinned { fingerprint } => {
                write!(
                    f,
                    "root is the pinned anchor (sha-256 {})",
                    hex::encode(fingerprint)
                )
            }
            Self::Certificate { cert, cached } => write!(
                f,
                "certificate {} ({}) valid {} to {}{}",
                cert.position,
                cert.subject,
                cert.not_before,
                cert.not_after,
                if *cached { " [cached]" } else { "" }
            ),
            Self::CoseSignature => f.write_str("cose signature verifies under the leaf key"),
            Self::Freshness {
                age_ms,
                max_age_ms: Some(max),
            } => write!(f, "document is {age_ms} ms old (max {max} ms)"),
            Self::Freshness {
                age_ms,
                max_age_ms: None,
            } => write!(f, "document is {age_ms} ms old, not in the future"),
            Self::DebugMode { debug: false } => f.write_str("enclave is not in debug mode"),
            Self::DebugMode { debug: true } => {
                f.write_str("enclave is in debug mode (allowed by the expectations)")
            }
            Self::Pcr { index } => write!(f, "pcr {index} matches"),
            Self::Field { field } => write!(f, "{field} matches"),
        }
    }
}

/// An attestation document that passed every check. Only [`verify_attestation`] and
/// [`AttestationVerifier::verify`] construct one.
#[derive(Clone, Debug, Serialize)]
pub struct VerifiedAttestation {
    module_id: String,
    digest: String,
    timestamp: UnixMillis,
    verified_at: UnixMillis,
    pcrs: BTreeMap<PcrIndex, Pcr>,
    debug: bool,
    #[serde(serialize_with = "ser_hex_opt")]
    public_key: Option<Vec<u8>>,
    #[serde(serialize_with = "ser_hex_opt")]
    user_data: Option<Vec<u8>>,
    #[serde(serialize_with = "ser_hex_opt")]
    nonce: Option<Vec<u8>>,
    chain_len: usize,
    #[serde(serialize_with = "ser_hex")]
    root_fingerprint: [u8; 32],
    leaf_not_after: UnixMillis,
    #[serde(serialize_with = "ser_hex")]
    payload_sha384: [u8; 48],
    #[serde(serialize_with = "ser_hex")]
    document_sha256: [u8; 32],
    checks: Vec<Check>,
}

impl VerifiedAttestation {
    /// The NSM module id (`i-…-enc…`).
    pub fn module_id(&self) -> &str {
        &self.module_id
    }
    /// The PCR digest algorithm (`"SHA384"`).
    pub fn digest(&self) -> &str {
        &self.digest
    }
    /// When the NSM made the document (signed).
    pub fn timestamp(&self) -> UnixMillis {
        self.timestamp
    }
    /// The instant the chain was verified at (the timestamp in
    /// [`VerifyAt::DocumentTimestamp`] mode).
    pub fn verified_at(&self) -> UnixMillis {
        self.verified_at
    }
    /// All PCRs of the document.
    pub fn pcrs(&self) -> &BTreeMap<PcrIndex, Pcr> {
        &self.pcrs
    }
    /// One PCR, if the document has it.
    pub fn pcr(&self, index: PcrIndex) -> Option<&Pcr> {
        self.pcrs.get(&index)
    }
    /// Whether PCR0, PCR1 and PCR2 are all zero (debug mode; only possible with
    /// [`Expectations::allow_debug`]).
    pub fn is_debug(&self) -> bool {
        self.debug
    }
    /// `public_key`, if not null.
    pub fn public_key(&self) -> Option<&[u8]> {
        self.public_key.as_deref()
    }
    /// `user_data`, if not null.
    pub fn user_data(&self) -> Option<&[u8]> {
        self.user_data.as_deref()
    }
    /// `nonce`, if not null.
    pub fn nonce(&self) -> Option<&[u8]> {
        self.nonce.as_deref()
    }
    /// Certificates in the verified path, root and leaf included (5 on real documents).
    pub fn chain_len(&self) -> usize {
        self.chain_len
    }
    /// SHA-256 of the root's DER (equal to the anchor's fingerprint).
    pub fn root_fingerprint(&self) -> [u8; 32] {
        self.root_fingerprint
    }
    /// When the leaf certificate expires.
    pub fn leaf_not_after(&self) -> UnixMillis {
        self.leaf_not_after
    }
    /// What was checked, in order.
    pub fn checks(&self) -> &[Check] {
        &self.checks
    }
    /// SHA-384 of the raw payload bytes.
    pub fn payload_sha384(&self) -> [u8; 48] {
        self.payload_sha384
    }
    /// SHA-256 of the whole document (its canonical encoding is enforced, so this identifies it).
    pub fn document_sha256(&self) -> [u8; 32] {
        self.document_sha256
    }
}

/// Verifies an attestation document against a pinned root, at a given time, and checks it
/// against the caller's expectations. Verifies the whole chain each time; use
/// [`AttestationVerifier`] to reuse verified intermediate chains.
pub fn verify_attestation(
    doc: &[u8],
    anchor: &TrustAnchor,
    expect: &Expectations,
    at: VerifyAt,
) -> Result<VerifiedAttestation, AttestationError> {
    verify_inner(doc, anchor, expect, at, None)
}

/// A reusable verifier: one trust anchor and bounded caches of verified CA chains and of verified
/// whole paths (CA chain and leaf), each entry usable only while every certificate it covers is
/// valid at the verification time. A warm verification (a document under a path already seen)
/// costs the COSE signature only; one under a new leaf but a known CA chain, the leaf link and
/// the COSE signature. `Send + Sync`; share it.
#[derive(Debug)]
pub struct AttestationVerifier {
    anchor: TrustAnchor,
    cache: PathCaches,
}

impl AttestationVerifier {
    /// A verifier with the default cache capacity ([`DEFAULT_CACHE_CAPACITY`]).
    pub fn new(anchor: TrustAnchor) -> Self {
        Self::with_cache_capacity(anchor, DEFAULT_CACHE_CAPACITY)
    }

    /// A verifier remembering at most `n` CA chains and `n` whole paths (`0` disables the
    /// caches).
    pub fn with_cache_capacity(anchor: TrustAnchor, n: usize) -> Self {
        Self {
            anchor,
            cache: PathCaches::new(n),
        }
    }

    /// The pinned root.
    pub fn anchor(&self) -> &TrustAnchor {
        &self.anchor
    }

    /// Same as [`verify_attestation`] with this verifier's anchor, reusing cached paths.
    pub fn verify(
        &self,
        doc: &[u8],
        expect: &Expectations,
        at: VerifyAt,
    ) -> Result<VerifiedAttestation, AttestationError> {
        verify_inner(doc, &self.anchor, expect, at, Some(&self.cache))
    }
}

/// A verified path, and which parts of it came from the cache.
struct PathOutcome {
    path: Arc<VerifiedPath>,
    cas_cached: bool,
    leaf_cached: bool,
}

/// Verifies `cabundle` and `leaf` at `at`, reusing and filling the caches if given. A cached
/// entry is used only if it is valid at `at`; otherwise the full check runs, so the result (and
/// on failure the error) is the same as without a cache.
fn verified_path(
    cabundle: &[Vec<u8>],
    leaf: &[u8],
    anchor: &TrustAnchor,
    at: UnixMillis,
    cache: Option<&PathCaches>,
) -> Result<PathOutcome, AttestationError> {
    let Some(cache) = cache else {
        let cas = Arc::new(chain::verify_ca_chain(cabundle, anchor, at)?);
        let leaf = chain::verify_leaf(leaf, &cas, at)?;
        return Ok(PathOutcome {
            path: Arc::new(VerifiedPath::new(cas, leaf)),
            cas_cached: false,
            leaf_cached: false,
        });
    };
    let (chain_key, path_key) = cache::path_keys(cabundle, leaf);
    if let Some(path) = cache.paths.get(&path_key, at) {
        return Ok(PathOutcome {
            path,
            cas_cached: true,
            leaf_cached: true,
        });
    }
    let (cas, cas_cached): (Arc<VerifiedCaChain>, bool) = match cache.chains.get(&chain_key, at) {
        Some(hit) => (hit, true),
        None => {
            let fresh = Arc::new(chain::verify_ca_chain(cabundle, anchor, at)?);
            cache.chains.insert(chain_key, Arc::clone(&fresh), at);
            (fresh, false)
        }
    };
    let leaf = chain::verify_leaf(leaf, &cas, at)?;
    let path = Arc::new(VerifiedPath::new(cas, leaf));
    cache.paths.insert(path_key, Arc::clone(&path), at);
    Ok(PathOutcome {
        path,
        cas_cached,
        leaf_cached: false,
    })
}

fn verify_inner(
    doc: &[u8],
    anchor: &TrustAnchor,
    expect: &Expectations,
    at: VerifyAt,
    cache: Option<&PathCaches>,
) -> Result<VerifiedAttestation, AttestationError> {
    let parsed = parse_attestation(doc)?;
    let mut checks = vec![Check::Structure];

    let (at_ms, instant) = match at {
        VerifyAt::Instant(t) => (t, true),
        VerifyAt::DocumentTimestamp => (parsed.timestamp(), false),
    };
    if expect.max_age_ms.is_some() && !instant {
        return Err(AttestationError::MaxAgeNeedsInstant);
    }

    // 1. The chain: pinned root, then every CA link, then the leaf link; or a cached result for
    //    these exact bytes, if it is valid at this time (see `cache`).
    let cabundle = parsed.cabundle();
    let root = cabundle
        .first()
        .ok_or(AttestationError::EmptyField { field: "cabundle" })?;
    chain::check_root_pin(root, anchor)?;
    checks.push(Check::RootPinned {
        fingerprint: anchor.fingerprint(),
    });
    let path = verified_path(cabundle, parsed.certificate(), anchor, at_ms, cache)?;
    let (cas, leaf) = (&path.path.cas, &path.path.leaf);
    checks.extend(cas.certs.iter().map(|cert| Check::Certificate {
        cert: cert.clone(),
        cached: path.cas_cached,
    }));
    checks.push(Check::Certificate {
        cert: leaf.summary.clone(),
        cached: path.leaf_cached,
    });

    // 2. The COSE signature over the raw bytes.
    let signature =
        Signature::from_slice(parsed.signature()).map_err(|_| AttestationError::BadSignature)?;
    let tbs = document::sig_structure(parsed.protected_header(), parsed.payload());
    leaf.key
        .verify(&tbs, &signature)
        .map_err(|_| AttestationError::BadSignature)?;
    checks.push(Check::CoseSignature);

    // 3. Time. From here on every field is authenticated.
    let timestamp = parsed.timestamp();
    if instant {
        let latest = at_ms
            .checked_add_millis(MAX_CLOCK_SKEW_MS)
            .unwrap_or(UnixMillis::from_millis(u64::MAX));
        if timestamp > latest {
            return Err(AttestationError::TimestampInFuture {
                timestamp,
                at: at_ms,
            });
        }
        let age_ms = at_ms.millis_since(timestamp).unwrap_or(0);
        if let Some(max_age_ms) = expect.max_age_ms
            && age_ms > max_age_ms
        {
            return Err(AttestationError::TooOld {
                at: at_ms,
                age_ms,
                max_age_ms,
            });
        }
        checks.push(Check::Freshness {
            age_ms,
            max_age_ms: expect.max_age_ms,
        });
    }

    // 4. Expectations.
    let debug = parsed.is_debug();
    if debug && !expect.allow_debug {
        return Err(AttestationError::DebugMode);
    }
    checks.push(Check::DebugMode { debug });
    for (&index, expected) in &expect.pcrs {
        let found = parsed
            .pcrs()
            .get(&index)
            .ok_or(AttestationError::ExpectedPcrMissing { index })?;
        if found != expected {
            return Err(AttestationError::PcrMismatch {
                index,
                expected: *expected,
                found: *found,
            });
        }
        checks.push(Check::Pcr { index });
    }
    for (field, want, have) in [
        ("nonce", &expect.nonce, parsed.nonce()),
        ("public_key", &expect.public_key, parsed.public_key()),
        ("user_data", &expect.user_data, parsed.user_data()),
    ] {
        let Some(want) = want else { continue };
        let have = have.ok_or(AttestationError::ExpectedFieldMissing { field })?;
        if have != want.as_slice() {
            return Err(AttestationError::FieldMismatch {
                field,
                expected_hex: hex::encode(want),
                found_hex: hex::encode(have),
            });
        }
        checks.push(Check::Field { field });
    }

    Ok(VerifiedAttestation {
        module_id: parsed.module_id().to_owned(),
        digest: parsed.digest().to_owned(),
        timestamp,
        verified_at: at_ms,
        pcrs: parsed.pcrs().clone(),
        debug,
        public_key: parsed.public_key().map(<[u8]>::to_vec),
        user_data: parsed.user_data().map(<[u8]>::to_vec),
        nonce: parsed.nonce().map(<[u8]>::to_vec),
        chain_len: cas.certs.len().saturating_add(1),
        root_fingerprint: anchor.fingerprint(),
        leaf_not_after: leaf.summary.not_after,
        payload_sha384: Sha384::digest(parsed.payload()).into(),
        document_sha256: Sha256::digest(doc).into(),
        checks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROD: &[u8] =
        include_bytes!("../../testdata/nitro/nitro-01-evervault-2022-prod-pcr8.cose");
    const DEBUG: &[u8] = include_bytes!("../../testdata/nitro/nitro-02-evervault-2023-debug.cose");

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn verifier_is_send_and_sync() {
        assert_send_sync::<AttestationVerifier>();
    }

    #[test]
    fn cache_hit_marks_every_certificate_cached_and_agrees_with_full_verification() {
        let v = AttestationVerifier::new(TrustAnchor::aws_nitro_root_g1());
        let e = Expectations::default();
        let cold = v.verify(PROD, &e, VerifyAt::DocumentTimestamp).unwrap();
        assert_eq!(v.cache.chains.len(), 1);
        assert_eq!(v.cache.paths.len(), 1);
        let warm = v.verify(PROD, &e, VerifyAt::DocumentTimestamp).unwrap();
        let cached = |a: &VerifiedAttestation| {
            a.checks()
                .iter()
                .filter(|c| matches!(c, Check::Certificate { cached: true, .. }))
                .count()
        };
        assert_eq!(cached(&cold), 0);
        assert_eq!(cached(&warm), 5);
        assert_eq!(cold.pcrs(), warm.pcrs());
        assert_eq!(cold.document_sha256(), warm.document_sha256());
    }

    #[test]
    fn cache_entry_is_not_reused_outside_its_validity_window() {
        let v = AttestationVerifier::new(TrustAnchor::aws_nitro_root_g1());
        let e = Expectations::default();
        v.verify(PROD, &e, VerifyAt::DocumentTimestamp).unwrap();
        // 2022-10-20: the zonal certificate (notAfter 2022-10-18) has expired.
        let later = VerifyAt::Instant(UnixMillis::from_millis(1_666_224_000_000));
        assert!(matches!(
            v.verify(PROD, &e, later),
            Err(AttestationError::Expired { cert: 2, .. })
        ));
    }

    #[test]
    fn cache_is_bounded() {
        let v = AttestationVerifier::with_cache_capacity(TrustAnchor::aws_nitro_root_g1(), 1);
        let e = Expectations {
            allow_debug: true,
            ..Expectations::default()
        };
        v.verify(PROD, &e, VerifyAt::DocumentTimestamp).unwrap();
        v.verify(DEBUG, &e, VerifyAt::DocumentTimestamp).unwrap();
        assert_eq!(v.cache.chains.len(), 1);
        assert_eq!(v.cache.paths.len(), 1);
        let none = AttestationVerifier::with_cache_capacity(TrustAnchor::aws_nitro_root_g1(), 0);
        none.verify(PROD, &e, VerifyAt::DocumentTimestamp).unwrap();
        assert_eq!(none.cache.chains.len(), 0);
        assert_eq!(none.cache.paths.len(), 0);
    }

    #[test]
    fn max_age_is_refused_at_document_timestamp() {
        let e = Expectations {
            max_age_ms: Some(60_000),
            ..Expectations::default()
        };
        assert_eq!(
            verify_attestation(
                PROD,
                &TrustAnchor::aws_nitro_root_g1(),
                &e,
                VerifyAt::DocumentTimestamp
            )
            .unwrap_err(),
            AttestationError::MaxAgeNeedsInstant
        );
    }

    #[test]
    fn freshness_at_an_instant() {
        let anchor = TrustAnchor::aws_nitro_root_g1();
        let ts = 1_665_651_482_136u64;
        let at = |ms| VerifyAt::Instant(UnixMillis::from_millis(ms));
        let fresh = Expectations {
            max_age_ms: Some(60_000),
            ..Expectations::default()
        };
        assert!(verify_attestation(PROD, &anchor, &fresh, at(ts + 60_000)).is_ok());
        assert_eq!(
            verify_attestation(PROD, &anchor, &fresh, at(ts + 60_001)).unwrap_err(),
            AttestationError::TooOld {
                at: UnixMillis::from_millis(ts + 60_001),
                age_ms: 60_001,
                max_age_ms: 60_000
            }
        );
        // The leaf is valid from 08:57:59, 3 s before the timestamp: a verifier clock 2 s
        // behind the NSM is within the skew, but one 3 s behind is before notBefore.
        assert!(verify_attestation(PROD, &anchor, &fresh, at(ts - 2_000)).is_ok());
    }
}
