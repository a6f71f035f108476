//! The attestation module's error taxonomy.
//!
//! One variant per rule, with the evidence in its fields, so that a test (or an operator reading
//! `--json`) can tell exactly which rule a document broke. Certificates are named by their
//! position in the root-first path: `0` is the root (`cabundle[0]`), the leaf (`certificate`) is
//! last. Messages are lower-case and compose under `attestation: …`.

use thiserror::Error;

use super::types::{Pcr, PcrIndex};
use crate::time::UnixMillis;

/// Why an attestation document was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum AttestationError {
    // ---- size and CBOR envelope -------------------------------------------------------------
    /// The input is longer than [`super::MAX_DOCUMENT_LEN`]; it was not parsed.
    #[error("document is {len} bytes, more than the maximum {max}")]
    TooLong {
        /// Length of the input.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The bytes are not well-formed CBOR, or not of the expected shape.
    #[error("malformed {part}: {reason}")]
    Malformed {
        /// `"cose_sign1"` or `"payload"`.
        part: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// The COSE_Sign1 (or the payload) carries a CBOR tag; Nitro documents are untagged.
    #[error("unexpected cbor tag {tag} on the {part}")]
    Tagged {
        /// `"cose_sign1"` or `"payload"`.
        part: &'static str,
        /// The tag number (18 is the COSE_Sign1 tag).
        tag: u64,
    },
    /// Bytes follow the end of the COSE_Sign1 or of the payload map.
    #[error("{count} trailing bytes after the {part}")]
    TrailingBytes {
        /// `"cose_sign1"` or `"payload"`.
        part: &'static str,
        /// How many bytes follow.
        count: usize,
    },
    /// The protected header is not exactly `a1 01 38 22` (`{1: -35}`, ES384).
    #[error("protected header is {found_hex}, expected a1013822 ({{1: -35}}, es384)")]
    ProtectedHeader {
        /// The protected header bytes, in hex.
        found_hex: String,
    },
    /// The unprotected header is not an empty map.
    #[error("unprotected header has {entries} entries, expected none")]
    UnprotectedHeader {
        /// Number of entries found.
        entries: usize,
    },
    /// The signature is not 96 bytes (r‖s for P-384).
    #[error("signature is {len} bytes, expected 96")]
    SignatureLength {
        /// Length found.
        len: usize,
    },
    /// The COSE_Sign1 envelope uses a non-canonical encoding (indefinite or non-minimal
    /// lengths); the NSM never produces one.
    #[error("cose_sign1 envelope is not canonically encoded")]
    NonCanonicalEnvelope,

    // ---- payload fields ------------------------------------------------------------------
    /// A required payload field is absent.
    #[error("missing field {field}")]
    MissingField {
        /// The field name.
        field: &'static str,
    },
    /// A payload field appears twice.
    #[error("duplicate field {field}")]
    DuplicateField {
        /// The field name.
        field: &'static str,
    },
    /// The payload has a key that is not one of the nine Nitro fields.
    #[error("unknown field {key}")]
    UnknownField {
        /// The key (a text key verbatim, or a description of a non-text key).
        key: String,
    },
    /// A payload field has the wrong CBOR type.
    #[error("field {field} is not {expected}")]
    FieldType {
        /// The field name.
        field: &'static str,
        /// The type the field must have.
        expected: &'static str,
    },
    /// A payload field is longer than allowed.
    #[error("field {field} is {len} long, more than the maximum {max}")]
    FieldTooLong {
        /// The field name.
        field: &'static str,
        /// Its length (bytes, characters or entries).
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A payload field that must be non-empty is empty.
    #[error("field {field} is empty")]
    EmptyField {
        /// The field name.
        field: &'static str,
    },
    /// `digest` is not `"SHA384"`.
    #[error("digest is {found:?}, expected \"SHA384\"")]
    UnsupportedDigest {
        /// The value found.
        found: String,
    },
    /// `timestamp` is zero.
    #[error("timestamp is zero")]
    ZeroTimestamp,
    /// The `pcrs` map has too few or too many entries.
    #[error("{count} pcrs, expected between {min} and {max}")]
    PcrCount {
        /// Entries found.
        count: usize,
        /// Minimum (16, the NSM always reports PCR0–15).
        min: usize,
        /// Maximum (32).
        max: usize,
    },
    /// A PCR index is not an integer in 0..=31.
    #[error("pcr index {index} is out of range 0..=31")]
    PcrIndexOutOfRange {
        /// The index found.
        index: i128,
    },
    /// A PCR index appears twice in the `pcrs` map.
    #[error("duplicate pcr {index}")]
    DuplicatePcr {
        /// The index.
        index: PcrIndex,
    },
    /// A PCR value is not a 48-byte string.
    #[error("pcr {index} is {len} bytes, expected 48")]
    PcrLength {
        /// The index.
        index: PcrIndex,
        /// Length found.
        len: usize,
    },
    /// One of PCR0–15, which the NSM always reports, is absent.
    #[error("pcr {index} is missing from the document")]
    MissingPcr {
        /// The index.
        index: PcrIndex,
    },
    /// `cabundle` has more certificates than [`super::MAX_CHAIN_LEN`] allows.
    #[error("cabundle has {len} certificates, more than the maximum {max}")]
    ChainTooLong {
        /// Certificates in `cabundle`.
        len: usize,
        /// The limit.
        max: usize,
    },

    // ---- certificate chain ---------------------------------------------------------------
    /// `cabundle[0]` is not the pinned root.
    #[error("root certificate sha-256 {found_hex} is not the pinned root {expected_hex}")]
    UntrustedRoot {
        /// The pinned fingerprint, hex.
        expected_hex: String,
        /// The fingerprint of `cabundle[0]`, hex.
        found_hex: String,
    },
    /// A certificate is not well-formed DER X.509 (or has bytes after it).
    #[error("certificate {cert}: malformed: {reason}")]
    CertificateMalformed {
        /// Position in the root-first path.
        cert: usize,
        /// What was wrong.
        reason: String,
    },
    /// A certificate is signed with something other than ecdsa-with-SHA384, or its outer and
    /// inner signature algorithms differ.
    #[error("certificate {cert}: unsupported signature algorithm {oid}")]
    UnsupportedSignatureAlgorithm {
        /// Position in the root-first path.
        cert: usize,
        /// The algorithm found (dotted OID, with a note if the two copies differ).
        oid: String,
    },
    /// A certificate's public key is not a P-384 EC key.
    #[error("certificate {cert}: public key is not a p-384 ec key")]
    UnsupportedPublicKey {
        /// Position in the root-first path.
        cert: usize,
    },
    /// A certificate's issuer name differs from its parent's subject name.
    #[error("certificate {cert}: issuer does not match the subject of certificate {parent}")]
    IssuerMismatch {
        /// Position in the root-first path.
        cert: usize,
        /// The parent's position.
        parent: usize,
    },
    /// A certificate's signature does not verify under its parent's key.
    #[error("certificate {cert}: signature does not verify under certificate {parent}'s key")]
    CertificateSignature {
        /// Position in the root-first path.
        cert: usize,
        /// The parent's position.
        parent: usize,
    },
    /// The verification time is before a certificate's notBefore.
    #[error("certificate {cert}: not valid before {not_before}, verifying at {at}")]
    NotYetValid {
        /// Position in the root-first path.
        cert: usize,
        /// The certificate's notBefore.
        not_before: UnixMillis,
        /// The verification time.
        at: UnixMillis,
    },
    /// The verification time is after a certificate's notAfter.
    #[error("certificate {cert}: expired at {not_after}, verifying at {at}")]
    Expired {
        /// Position in the root-first path.
        cert: usize,
        /// The certificate's notAfter.
        not_after: UnixMillis,
        /// The verification time.
        at: UnixMillis,
    },
    /// A CA certificate lacks basicConstraints with cA = TRUE.
    #[error("certificate {cert}: not a ca (basicConstraints ca=true missing)")]
    NotCa {
        /// Position in the root-first path.
        cert: usize,
    },
    /// A CA certificate's basicConstraints extension is not marked critical.
    #[error("certificate {cert}: basicConstraints is not critical")]
    BasicConstraintsNotCritical {
        /// Position in the root-first path.
        cert: usize,
    },
    /// A CA certificate lacks keyUsage keyCertSign.
    #[error("certificate {cert}: keyUsage lacks keyCertSign")]
    MissingKeyCertSign {
        /// Position in the root-first path.
        cert: usize,
    },
    /// More CA certificates follow a CA than its pathLenConstraint allows.
    #[error(
        "certificate {cert}: pathLenConstraint {path_len} but {followers} ca certificates follow"
    )]
    PathLenExceeded {
        /// Position in the root-first path.
        cert: usize,
        /// The constraint.
        path_len: u32,
        /// CA certificates that follow it in the path.
        followers: usize,
    },
    /// The leaf certificate is a CA (basicConstraints cA = TRUE or a pathLenConstraint).
    #[error("certificate {cert}: leaf is a ca")]
    LeafIsCa {
        /// Position in the root-first path.
        cert: usize,
    },
    /// The leaf certificate lacks keyUsage digitalSignature.
    #[error("certificate {cert}: leaf keyUsage lacks digitalSignature")]
    LeafMissingDigitalSignature {
        /// Position in the root-first path.
        cert: usize,
    },
    /// A certificate has a critical extension this verifier does not process.
    #[error("certificate {cert}: unsupported critical extension {oid}")]
    UnsupportedCriticalExtension {
        /// Position in the root-first path.
        cert: usize,
        /// The extension's OID.
        oid: String,
    },

    // ---- COSE signature and time ---------------------------------------------------------
    /// The COSE_Sign1 signature does not verify under the leaf certificate's key.
    #[error("cose signature does not verify under the leaf certificate's key")]
    BadSignature,
    /// In [`super::VerifyAt::Instant`] mode the document's timestamp is later than the
    /// verification time plus [`super::MAX_CLOCK_SKEW_MS`].
    #[error("document timestamp {timestamp} is in the future of {at}")]
    TimestampInFuture {
        /// The document's timestamp.
        timestamp: UnixMillis,
        /// The verification time.
        at: UnixMillis,
    },
    /// The document is older than `max_age_ms`.
    #[error("document is {age_ms} ms old at {at}, more than the maximum {max_age_ms} ms")]
    TooOld {
        /// The verification time.
        at: UnixMillis,
        /// `at - timestamp`.
        age_ms: u64,
        /// The limit.
        max_age_ms: u64,
    },
    /// `max_age_ms` was set but the verification is at the document's own timestamp, where
    /// freshness means nothing; fail closed.
    #[error("max_age_ms needs an explicit verification instant, not the document timestamp")]
    MaxAgeNeedsInstant,

    // ---- expectations --------------------------------------------------------------------
    /// PCR0, PCR1 and PCR2 are all zero (debug mode) and debug was not allowed.
    #[error("document is from an enclave in debug mode (pcr0, pcr1, pcr2 all zero)")]
    DebugMode,
    /// An expected PCR is not in the document.
    #[error("expected pcr {index} is not in the document")]
    ExpectedPcrMissing {
        /// The index.
        index: PcrIndex,
    },
    /// A PCR differs from the expected value.
    #[error("pcr {index} is {found}, expected {expected}")]
    PcrMismatch {
        /// The index.
        index: PcrIndex,
        /// The expected value.
        expected: Pcr,
        /// The value in the document.
        found: Pcr,
    },
    /// An expected optional field (`nonce`, `public_key`, `user_data`) is null in the document.
    #[error("expected {field} but the document has none")]
    ExpectedFieldMissing {
        /// The field name.
        field: &'static str,
    },
    /// An optional field differs from the expected value.
    #[error("{field} is {found_hex}, expected {expected_hex}")]
    FieldMismatch {
        /// The field name.
        field: &'static str,
        /// The expected value, hex.
        expected_hex: String,
        /// The value in the document, hex.
        found_hex: String,
    },

    // ---- values given by the caller ------------------------------------------------------
    /// A trust anchor could not be read from PEM or DER.
    #[error("trust anchor: {reason}")]
    TrustAnchor {
        /// What was wrong.
        reason: String,
    },
    /// A PCR value given by the caller is not 48 bytes / 96 hex digits, or a PCR index given
    /// as text is not a number.
    #[error("pcr value: {reason}")]
    PcrValue {
        /// What was wrong.
        reason: String,
    },
}
