//! Structural parsing of a Nitro attestation document: bytes to [`AttestationDocument`].
//!
//! Role: turn untrusted bytes into typed fields, rejecting everything that is not exactly the
//! shape the NSM produces, with a precise error for each deviation. The raw protected-header and
//! payload bytes are kept, because the signature covers them as sent; nothing is re-encoded.
//!
//! Trust: none. The result is *unauthenticated*: nothing here checks a signature or a
//! certificate. Only [`super::verify_attestation`] turns a document into something to believe.
//!
//! What it accepts (AWS's published process, corrected by real documents):
//! - an untagged COSE_Sign1 in canonical encoding, protected header exactly `a1 01 38 22`
//!   (`{1: -35}`, ES384), an empty unprotected map, a 96-byte signature, nothing after it;
//! - a payload map, definite (`a9`, before mid-2025) or indefinite (`bf … ff`, after), with
//!   exactly the nine Nitro fields, each once; `public_key`, `user_data` and `nonce` as byte
//!   strings of at most [`MAX_OPTIONAL_FIELD_LEN`] (empty allowed) or `null`;
//! - 16 to 32 PCRs of 48 bytes, which must include PCR0–15 (the NSM always reports them).
//!
//! What it deliberately does not do: parse certificates (the chain module does), accept the
//! tagged form (AWS's documents are untagged; accepting both only widens the attack surface),
//! or tolerate unknown fields (a signed field we ignore is a field someone else may trust).

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;

use ciborium::Value;
use serde::Serialize;

use super::types::{PCR_COUNT, PCR_LEN, Pcr, PcrIndex, ser_hex, ser_hex_opt};
use super::{
    AttestationError, MAX_CBOR_DEPTH, MAX_CERT_LEN, MAX_CHAIN_LEN, MAX_DOCUMENT_LEN,
    MAX_MODULE_ID_LEN, MAX_OPTIONAL_FIELD_LEN,
};
use crate::time::UnixMillis;

/// The only protected header a Nitro document has: `{1: -35}` (alg: ES384).
pub const ES384_PROTECTED_HEADER: [u8; 4] = [0xa1, 0x01, 0x38, 0x22];

/// Length of an ES384 signature, r‖s.
pub const SIGNATURE_LEN: usize = 96;

/// Fewest PCRs a document may carry: the NSM always reports PCR0–15.
pub const MIN_PCRS: usize = 16;

const COSE: &str = "cose_sign1";
const PAYLOAD: &str = "payload";

const MODULE_ID: &str = "module_id";
const DIGEST: &str = "digest";
const TIMESTAMP: &str = "timestamp";
const PCRS: &str = "pcrs";
const CERTIFICATE: &str = "certificate";
const CABUNDLE: &str = "cabundle";
const PUBLIC_KEY: &str = "public_key";
const USER_DATA: &str = "user_data";
const NONCE: &str = "nonce";

/// A structurally valid, **unverified** attestation document.
///
/// Returned by [`parse_attestation`]; its fields have been parsed but nothing vouches for
/// them. Use [`super::verify_attestation`] to get a [`super::VerifiedAttestation`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AttestationDocument {
    #[serde(skip)]
    protected: Vec<u8>,
    #[serde(skip)]
    payload: Vec<u8>,
    #[serde(serialize_with = "ser_hex")]
    signature: [u8; SIGNATURE_LEN],
    module_id: String,
    digest: String,
    timestamp: UnixMillis,
    pcrs: BTreeMap<PcrIndex, Pcr>,
    #[serde(serialize_with = "ser_hex")]
    certificate: Vec<u8>,
    #[serde(serialize_with = "ser_hex_vec")]
    cabundle: Vec<Vec<u8>>,
    #[serde(serialize_with = "ser_hex_opt")]
    public_key: Option<Vec<u8>>,
    #[serde(serialize_with = "ser_hex_opt")]
    user_data: Option<Vec<u8>>,
    #[serde(serialize_with = "ser_hex_opt")]
    nonce: Option<Vec<u8>>,
}

fn ser_hex_vec<S: serde::Serializer>(v: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(hex::encode))
}

impl AttestationDocument {
    /// The raw protected header bytes (always `a1 01 38 22`).
    pub fn protected_header(&self) -> &[u8] {
        &self.protected
    }
    /// The raw payload bytes, as signed.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }
    /// The 96-byte ES384 signature, r‖s.
    pub fn signature(&self) -> &[u8; SIGNATURE_LEN] {
        &self.signature
    }
    /// The NSM module id, e.g. `i-0123…-enc0123…`.
    pub fn module_id(&self) -> &str {
        &self.module_id
    }
    /// The PCR digest algorithm (always `"SHA384"`).
    pub fn digest(&self) -> &str {
        &self.digest
    }
    /// When the NSM produced the document (unauthenticated until verified).
    pub fn timestamp(&self) -> UnixMillis {
        self.timestamp
    }
    /// The PCRs, by index.
    pub fn pcrs(&self) -> &BTreeMap<PcrIndex, Pcr> {
        &self.pcrs
    }
    /// The leaf (signing) certificate, DER.
    pub fn certificate(&self) -> &[u8] {
        &self.certificate
    }
    /// The CA bundle, DER, root first.
    pub fn cabundle(&self) -> &[Vec<u8>] {
        &self.cabundle
    }
    /// `public_key`, or `None` if null.
    pub fn public_key(&self) -> Option<&[u8]> {
        self.public_key.as_deref()
    }
    /// `user_data`, or `None` if null.
    pub fn user_data(&self) -> Option<&[u8]> {
        self.user_data.as_deref()
    }
    /// `nonce`, or `None` if null.
    pub fn nonce(&self) -> Option<&[u8]> {
        self.nonce.as_deref()
    }
    /// Whether PCR0, PCR1 and PCR2 are all zero: the enclave runs in debug mode.
    pub fn is_debug(&self) -> bool {
        [PcrIndex::IMAGE, PcrIndex::KERNEL, PcrIndex::APPLICATION]
            .iter()
            .all(|i| self.pcrs.get(i).is_some_and(Pcr::is_zero))
    }
}

/// Parses an attestation document's structure: the COSE_Sign1 envelope and the payload fields.
///
/// Checks no signature and no certificate: the result is for inspection, fuzzing and as the
/// first step of [`super::verify_attestation`]. Input longer than [`MAX_DOCUMENT_LEN`] is
/// rejected before any parsing.
pub fn parse_attestation(doc: &[u8]) -> Result<AttestationDocument, AttestationError> {
    if doc.len() > MAX_DOCUMENT_LEN {
        return Err(AttestationError::TooLong {
            len: doc.len(),
            max: MAX_DOCUMENT_LEN,
        });
    }
    let envelope = decode_one(doc, COSE)?;
    let (protected, payload, signature) = split_envelope(envelope)?;
    // Everything was well-formed; now insist on the one canonical encoding, so that exactly one
    // byte string is "the document" (its hash is then a stable identifier).
    if canonical_envelope(&protected, &payload, &signature) != doc {
        return Err(AttestationError::NonCanonicalEnvelope);
    }
    let fields = decode_one(&payload, PAYLOAD)?;
    let f = Fields::from_value(fields)?;
    Ok(AttestationDocument {
        protected,
        payload,
        signature,
        module_id: f.module_id,
        digest: f.digest,
        timestamp: f.timestamp,
        pcrs: f.pcrs,
        certificate: f.certificate,
        cabundle: f.cabundle,
        public_key: f.public_key,
        user_data: f.user_data,
        nonce: f.nonce,
    })
}

/// Decodes exactly one CBOR item from `bytes`, refusing tags on it and anything after it.
fn decode_one(bytes: &[u8], part: &'static str) -> Result<Value, AttestationError> {
    let mut rest = bytes;
    let value: Value = ciborium::de::from_reader_with_recursion_limit(&mut rest, MAX_CBOR_DEPTH)
        .map_err(|e| AttestationError::Malformed {
            part,
            reason: describe_cbor_error(&e),
        })?;
    if !rest.is_empty() {
        return Err(AttestationError::TrailingBytes {
            part,
            count: rest.len(),
        });
    }
    if let Value::Tag(tag, _) = value {
        return Err(AttestationError::Tagged { part, tag });
    }
    Ok(value)
}

fn describe_cbor_error<T: std::fmt::Debug>(e: &ciborium::de::Error<T>) -> String {
    match e {
        ciborium::de::Error::Io(_) => "unexpected end of input".to_owned(),
        ciborium::de::Error::Syntax(off) => format!("invalid cbor at offset {off}"),
        ciborium::de::Error::Semantic(Some(off), m) => format!("{m} at offset {off}"),
        ciborium::de::Error::Semantic(None, m) => m.clone(),
        ciborium::de::Error::RecursionLimitExceeded => {
            format!("nested deeper than {MAX_CBOR_DEPTH}")
        }
    }
}

type Envelope = (Vec<u8>, Vec<u8>, [u8; SIGNATURE_LEN]);

/// Splits `[protected, unprotected, payload, signature]` and checks the headers.
fn split_envelope(v: Value) -> Result<Envelope, AttestationError> {
    let malformed = |reason: &str| AttestationError::Malformed {
        part: COSE,
        reason: reason.to_owned(),
    };
    let Value::Array(items) = v else {
        return Err(malformed("not an array"));
    };
    let Ok::<[Value; 4], _>([protected, unprotected, payload, signature]) = items.try_into() else {
        return Err(malformed("not an array of 4 items"));
    };
    let Value::Bytes(protected) = protected else {
        return Err(malformed("protected header is not a byte string"));
    };
    if protected != ES384_PROTECTED_HEADER {
        return Err(AttestationError::ProtectedHeader {
            found_hex: hex::encode(&protected),
        });
    }
    match unprotected {
        Value::Map(m) if m.is_empty() => {}
        Value::Map(m) => return Err(AttestationError::UnprotectedHeader { entries: m.len() }),
        _ => return Err(malformed("unprotected header is not a map")),
    }
    let Value::Bytes(payload) = payload else {
        // `null` would be a detached payload, which Nitro never uses.
        return Err(malformed("payload is not a byte string"));
    };
    let Value::Bytes(signature) = signature else {
        return Err(malformed("signature is not a byte string"));
    };
    let signature = <[u8; SIGNATURE_LEN]>::try_from(signature.as_slice()).map_err(|_| {
        AttestationError::SignatureLength {
            len: signature.len(),
        }
    })?;
    Ok((protected, payload, signature))
}

/// The canonical encoding of a COSE_Sign1 with an empty unprotected map.
pub(crate) fn canonical_envelope(protected: &[u8], payload: &[u8], signature: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(protected.len() + payload.len() + signature.len() + 16);
    out.push(0x84);
    push_bstr(&mut out, protected);
    out.push(0xa0);
    push_bstr(&mut out, payload);
    push_bstr(&mut out, signature);
    out
}

/// The COSE Sig_structure for a COSE_Sign1 with no external AAD (RFC 9052 §4.4), built from
/// the raw protected header and payload bytes:
/// `["Signature1", protected, h'', payload]`.
pub(crate) fn sig_structure(protected: &[u8], payload: &[u8]) -> Vec<u8> {
    const CONTEXT: &[u8] = b"Signature1";
    let mut out = Vec::with_capacity(protected.len() + payload.len() + 32);
    out.push(0x84);
    push_header(&mut out, 3, CONTEXT.len() as u64);
    out.extend_from_slice(CONTEXT);
    push_bstr(&mut out, protected);
    push_bstr(&mut out, &[]);
    push_bstr(&mut out, payload);
    out
}

fn push_bstr(out: &mut Vec<u8>, b: &[u8]) {
    push_header(out, 2, b.len() as u64);
    out.extend_from_slice(b);
}

/// A CBOR head with the shortest argument encoding (RFC 8949 §4.2.1).
fn push_header(out: &mut Vec<u8>, major: u8, n: u64) {
    let m = major << 5;
    if n < 24 {
        out.push(m | n as u8);
    } else if let Ok(n) = u8::try_from(n) {
        out.extend_from_slice(&[m | 24, n]);
    } else if let Ok(n) = u16::try_from(n) {
        out.push(m | 25);
        out.extend_from_slice(&n.to_be_bytes());
    } else if let Ok(n) = u32::try_from(n) {
        out.push(m | 26);
        out.extend_from_slice(&n.to_be_bytes());
    } else {
        out.push(m | 27);
        out.extend_from_slice(&n.to_be_bytes());
    }
}

/// The payload's fields, each checked.
struct Fields {
    module_id: String,
    digest: String,
    timestamp: UnixMillis,
    pcrs: BTreeMap<PcrIndex, Pcr>,
    certificate: Vec<u8>,
    cabundle: Vec<Vec<u8>>,
    public_key: Option<Vec<u8>>,
    user_data: Option<Vec<u8>>,
    nonce: Option<Vec<u8>>,
}

/// Puts `value` in `slot`, or reports the field as duplicated.
fn once<T>(slot: &mut Option<T>, field: &'static str, value: T) -> Result<(), AttestationError> {
    if slot.is_some() {
        return Err(AttestationError::DuplicateField { field });
    }
    *slot = Some(value);
    Ok(())
}

impl Fields {
    fn from_value(v: Value) -> Result<Self, AttestationError> {
        let Value::Map(entries) = v else {
            return Err(AttestationError::Malformed {
                part: PAYLOAD,
                reason: "not a map".to_owned(),
            });
        };
        let mut module_id = None;
        let mut digest = None;
        let mut timestamp = None;
        let mut pcrs = None;
        let mut certificate = None;
        let mut cabundle = None;
        // Optional fields: outer Option is "seen", inner is "null or bytes".
        let mut public_key = None;
        let mut user_data = None;
        let mut nonce = None;
        for (k, v) in entries {
            let Value::Text(k) = k else {
                return Err(AttestationError::UnknownField {
                    key: describe_key(&k),
                });
            };
            match k.as_str() {
                MODULE_ID => once(&mut module_id, MODULE_ID, parse_module_id(v)?)?,
                DIGEST => once(&mut digest, DIGEST, parse_digest(v)?)?,
                TIMESTAMP => once(&mut timestamp, TIMESTAMP, parse_timestamp(v)?)?,
                PCRS => once(&mut pcrs, PCRS, parse_pcrs(v)?)?,
                CERTIFICATE => once(&mut certificate, CERTIFICATE, parse_cert(v, CERTIFICATE)?)?,
                CABUNDLE => once(&mut cabundle, CABUNDLE, parse_cabundle(v)?)?,
                PUBLIC_KEY => once(&mut public_key, PUBLIC_KEY, parse_optional(v, PUBLIC_KEY)?)?,
                USER_DATA => once(&mut user_data, USER_DATA, parse_optional(v, USER_DATA)?)?,
                NONCE => once(&mut nonce, NONCE, parse_optional(v, NONCE)?)?,
                _ => return Err(AttestationError::UnknownField { key: truncate(&k) }),
            }
        }
        let missing = |field| AttestationError::MissingField { field };
        Ok(Self {
            module_id: module_id.ok_or(missing(MODULE_ID))?,
            digest: digest.ok_or(missing(DIGEST))?,
            timestamp: timestamp.ok_or(missing(TIMESTAMP))?,
            pcrs: pcrs.ok_or(missing(PCRS))?,
            certificate: certificate.ok_or(missing(CERTIFICATE))?,
            cabundle: cabundle.ok_or(missing(CABUNDLE))?,
            // The NSM always writes the optional fields, as null when unset.
            public_key: public_key.ok_or(missing(PUBLIC_KEY))?,
            user_data: user_data.ok_or(missing(USER_DATA))?,
            nonce: nonce.ok_or(missing(NONCE))?,
        })
    }
}

fn describe_key(k: &Value) -> String {
    match k {
        Value::Integer(i) => format!("integer {}", i128::from(*i)),
        Value::Bytes(b) => format!("byte string of {} bytes", b.len()),
        Value::Text(t) => truncate(t),
        Value::Bool(b) => format!("bool {b}"),
        Value::Null => "null".to_owned(),
        Value::Tag(t, _) => format!("tag {t}"),
        Value::Float(_) => "a float".to_owned(),
        Value::Array(_) => "an array".to_owned(),
        Value::Map(_) => "a map".to_owned(),
        _ => "an unknown cbor value".to_owned(),
    }
}

/// At most 64 characters of attacker-chosen text in an error.
fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

fn parse_module_id(v: Value) -> Result<String, AttestationError> {
    let Value::Text(s) = v else {
        return Err(AttestationError::FieldType {
            field: MODULE_ID,
            expected: "a text string",
        });
    };
    if s.is_empty() {
        return Err(AttestationError::EmptyField { field: MODULE_ID });
    }
    if s.len() > MAX_MODULE_ID_LEN {
        return Err(AttestationError::FieldTooLong {
            field: MODULE_ID,
            len: s.len(),
            max: MAX_MODULE_ID_LEN,
        });
    }
    Ok(s)
}

fn parse_digest(v: Value) -> Result<String, AttestationError> {
    let Value::Text(s) = v else {
        return Err(AttestationError::FieldType {
            field: DIGEST,
            expected: "a text string",
        });
    };
    if s != "SHA384" {
        return Err(AttestationError::UnsupportedDigest {
            found: truncate(&s),
        });
    }
    Ok(s)
}

fn parse_timestamp(v: Value) -> Result<UnixMillis, AttestationError> {
    let ty = AttestationError::FieldType {
        field: TIMESTAMP,
        expected: "an unsigned integer",
    };
    let Value::Integer(i) = v else {
        return Err(ty);
    };
    let ms = u64::try_from(i).map_err(|_| ty)?;
    if ms == 0 {
        return Err(AttestationError::ZeroTimestamp);
    }
    Ok(UnixMillis::from_millis(ms))
}

fn parse_pcrs(v: Value) -> Result<BTreeMap<PcrIndex, Pcr>, AttestationError> {
    let ty = || AttestationError::FieldType {
        field: PCRS,
        expected: "a map of unsigned integers to byte strings",
    };
    let Value::Map(entries) = v else {
        return Err(ty());
    };
    if entries.len() < MIN_PCRS || entries.len() > PCR_COUNT {
        return Err(AttestationError::PcrCount {
            count: entries.len(),
            min: MIN_PCRS,
            max: PCR_COUNT,
        });
    }
    let mut pcrs = BTreeMap::new();
    for (k, v) in entries {
        let Value::Integer(i) = k else {
            return Err(ty());
        };
        let raw = i128::from(i);
        let index = u8::try_from(raw)
            .ok()
            .and_then(|n| PcrIndex::try_from(n).ok())
            .ok_or(AttestationError::PcrIndexOutOfRange { index: raw })?;
        let Value::Bytes(b) = v else {
            return Err(ty());
        };
        let pcr = Pcr::try_from(b.as_slice()).map_err(|_| AttestationError::PcrLength {
            index,
            len: b.len(),
        })?;
        match pcrs.entry(index) {
            Entry::Occupied(_) => return Err(AttestationError::DuplicatePcr { index }),
            Entry::Vacant(e) => {
                e.insert(pcr);
            }
        }
    }
    for index in PcrIndex::all().take(MIN_PCRS) {
        if !pcrs.contains_key(&index) {
            return Err(AttestationError::MissingPcr { index });
        }
    }
    debug_assert!(pcrs.values().all(|p: &Pcr| p.as_bytes().len() == PCR_LEN));
    Ok(pcrs)
}

fn parse_cert(v: Value, field: &'static str) -> Result<Vec<u8>, AttestationError> {
    let Value::Bytes(b) = v else {
        return Err(AttestationError::FieldType {
            field,
            expected: "a byte string",
        });
    };
    if b.is_empty() {
        return Err(AttestationError::EmptyField { field });
    }
    if b.len() > MAX_CERT_LEN {
        return Err(AttestationError::FieldTooLong {
            field,
            len: b.len(),
            max: MAX_CERT_LEN,
        });
    }
    Ok(b)
}

fn parse_cabundle(v: Value) -> Result<Vec<Vec<u8>>, AttestationError> {
    let Value::Array(items) = v else {
        return Err(AttestationError::FieldType {
            field: CABUNDLE,
            expected: "an array of byte strings",
        });
    };
    if items.is_empty() {
        return Err(AttestationError::EmptyField { field: CABUNDLE });
    }
    if items.len() > MAX_CHAIN_LEN {
        return Err(AttestationError::ChainTooLong {
            len: items.len(),
            max: MAX_CHAIN_LEN,
        });
    }
    items.into_iter().map(|c| parse_cert(c, CABUNDLE)).collect()
}

fn parse_optional(v: Value, field: &'static str) -> Result<Option<Vec<u8>>, AttestationError> {
    match v {
        Value::Null => Ok(None),
        Value::Bytes(b) if b.len() > MAX_OPTIONAL_FIELD_LEN => {
            Err(AttestationError::FieldTooLong {
                field,
                len: b.len(),
                max: MAX_OPTIONAL_FIELD_LEN,
            })
        }
        Value::Bytes(b) => Ok(Some(b)),
        _ => Err(AttestationError::FieldType {
            field,
            expected: "a byte string or null",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A well-formed payload map with `n_pcrs` PCRs and the given optional values.
    fn fields(n_pcrs: u8) -> Vec<(Value, Value)> {
        let pcrs = (0..n_pcrs)
            .map(|i| (Value::Integer(i.into()), Value::Bytes(vec![i; 48])))
            .collect();
        vec![
            (
                Value::Text("module_id".into()),
                Value::Text("i-0abc-enc0def".into()),
            ),
            (Value::Text("digest".into()), Value::Text("SHA384".into())),
            (
                Value::Text("timestamp".into()),
                Value::Integer(1_665_651_482_136u64.into()),
            ),
            (Value::Text("pcrs".into()), Value::Map(pcrs)),
            (
                Value::Text("certificate".into()),
                Value::Bytes(vec![0x30; 10]),
            ),
            (
                Value::Text("cabundle".into()),
                Value::Array(vec![Value::Bytes(vec![0x30; 10])]),
            ),
            (Value::Text("public_key".into()), Value::Null),
            (Value::Text("user_data".into()), Value::Null),
            (Value::Text("nonce".into()), Value::Null),
        ]
    }

    fn encode(v: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::ser::into_writer(v, &mut out).unwrap();
        out
    }

    fn envelope(payload: &[u8]) -> Vec<u8> {
        canonical_envelope(&ES384_PROTECTED_HEADER, payload, &[7u8; 96])
    }

    fn doc_with(entries: Vec<(Value, Value)>) -> Vec<u8> {
        envelope(&encode(&Value::Map(entries)))
    }

    fn set(entries: &mut [(Value, Value)], key: &str, v: Value) {
        for (k, old) in entries.iter_mut() {
            if *k == Value::Text(key.into()) {
                *old = v;
                return;
            }
        }
        panic!("no field {key}");
    }

    /// Encodes a map with indefinite length (`bf … ff`), as NSMs do since mid-2025.
    fn indefinite_map(entries: &[(Value, Value)]) -> Vec<u8> {
        let mut out = vec![0xbf];
        for (k, v) in entries {
            out.extend(encode(k));
            out.extend(encode(v));
        }
        out.push(0xff);
        out
    }

    #[test]
    fn accepts_definite_map_with_null_optionals() {
        let d = parse_attestation(&doc_with(fields(16))).unwrap();
        assert_eq!(d.module_id(), "i-0abc-enc0def");
        assert_eq!(d.timestamp(), UnixMillis::from_millis(1_665_651_482_136));
        assert_eq!(d.pcrs().len(), 16);
        assert_eq!(d.nonce(), None);
        assert_eq!(d.user_data(), None);
        assert_eq!(d.public_key(), None);
        assert_eq!(d.signature(), &[7u8; 96]);
    }

    #[test]
    fn accepts_indefinite_map() {
        let payload = indefinite_map(&fields(16));
        assert_eq!(payload.first(), Some(&0xbf));
        let d = parse_attestation(&envelope(&payload)).unwrap();
        assert_eq!(d.pcrs().len(), 16);
        assert_eq!(d.payload(), payload.as_slice());
    }

    #[test]
    fn accepts_empty_user_data_and_full_optionals() {
        let mut f = fields(16);
        set(&mut f, "user_data", Value::Bytes(vec![]));
        set(
            &mut f,
            "nonce",
            Value::Bytes(vec![1; MAX_OPTIONAL_FIELD_LEN]),
        );
        set(&mut f, "public_key", Value::Bytes(vec![2; 91]));
        let d = parse_attestation(&doc_with(f)).unwrap();
        assert_eq!(d.user_data(), Some(&[][..]));
        assert_eq!(d.nonce().map(<[u8]>::len), Some(MAX_OPTIONAL_FIELD_LEN));
        assert_eq!(d.public_key().map(<[u8]>::len), Some(91));
    }

    #[test]
    fn accepts_17_and_32_pcrs_and_rejects_15_and_33() {
        assert_eq!(
            parse_attestation(&doc_with(fields(17)))
                .unwrap()
                .pcrs()
                .len(),
            17
        );
        assert_eq!(
            parse_attestation(&doc_with(fields(32)))
                .unwrap()
                .pcrs()
                .len(),
            32
        );
        assert_eq!(
            parse_attestation(&doc_with(fields(15))),
            Err(AttestationError::PcrCount {
                count: 15,
                min: 16,
                max: 32
            })
        );
        assert!(matches!(
            parse_attestation(&doc_with(fields(33))),
            Err(AttestationError::PcrCount { count: 33, .. })
        ));
    }

    #[test]
    fn rejects_pcr_index_32_duplicate_pcr_and_gap() {
        let mut f = fields(16);
        let mut pcrs: Vec<(Value, Value)> = (0..16u8)
            .map(|i| (Value::Integer(i.into()), Value::Bytes(vec![0; 48])))
            .collect();
        pcrs.push((Value::Integer(32.into()), Value::Bytes(vec![0; 48])));
        set(&mut f, "pcrs", Value::Map(pcrs.clone()));
        assert_eq!(
            parse_attestation(&doc_with(f.clone())),
            Err(AttestationError::PcrIndexOutOfRange { index: 32 })
        );
        if let Some(last) = pcrs.last_mut() {
            last.0 = Value::Integer(3.into());
        }
        set(&mut f, "pcrs", Value::Map(pcrs.clone()));
        assert_eq!(
            parse_attestation(&doc_with(f.clone())),
            Err(AttestationError::DuplicatePcr {
                index: PcrIndex::try_from(3).unwrap()
            })
        );
        // 16 PCRs but PCR5 replaced by PCR20: PCR0–15 must all be there.
        if let Some(p) = pcrs.get_mut(5) {
            p.0 = Value::Integer(20.into());
        }
        pcrs.pop();
        set(&mut f, "pcrs", Value::Map(pcrs));
        assert_eq!(
            parse_attestation(&doc_with(f)),
            Err(AttestationError::MissingPcr {
                index: PcrIndex::try_from(5).unwrap()
            })
        );
    }

    #[test]
    fn rejects_pcr_of_32_bytes() {
        let mut f = fields(16);
        let mut pcrs: Vec<(Value, Value)> = (0..16u8)
            .map(|i| (Value::Integer(i.into()), Value::Bytes(vec![0; 48])))
            .collect();
        if let Some(p) = pcrs.get_mut(4) {
            p.1 = Value::Bytes(vec![0; 32]);
        }
        set(&mut f, "pcrs", Value::Map(pcrs));
        assert_eq!(
            parse_attestation(&doc_with(f)),
            Err(AttestationError::PcrLength {
                index: PcrIndex::try_from(4).unwrap(),
                len: 32
            })
        );
    }

    #[test]
    fn rejects_duplicate_key() {
        let mut f = fields(16);
        f.push((Value::Text("nonce".into()), Value::Null));
        assert_eq!(
            parse_attestation(&doc_with(f)),
            Err(AttestationError::DuplicateField { field: "nonce" })
        );
    }

    #[test]
    fn rejects_duplicate_key_in_indefinite_map() {
        let mut f = fields(16);
        f.insert(
            0,
            (Value::Text("digest".into()), Value::Text("SHA384".into())),
        );
        let doc = envelope(&indefinite_map(&f));
        assert_eq!(
            parse_attestation(&doc),
            Err(AttestationError::DuplicateField { field: "digest" })
        );
    }

    #[test]
    fn rejects_unknown_key_and_non_text_key() {
        let mut f = fields(16);
        f.push((Value::Text("extra".into()), Value::Null));
        assert_eq!(
            parse_attestation(&doc_with(f)),
            Err(AttestationError::UnknownField {
                key: "extra".into()
            })
        );
        let mut f = fields(16);
        f.push((Value::Integer(1.into()), Value::Null));
        assert_eq!(
            parse_attestation(&doc_with(f)),
            Err(AttestationError::UnknownField {
                key: "integer 1".into()
            })
        );
    }

    #[test]
    fn rejects_missing_fields_including_null_optionals_omitted() {
        for name in [
            "module_id",
            "digest",
            "timestamp",
            "pcrs",
            "certificate",
            "cabundle",
            "public_key",
            "user_data",
            "nonce",
        ] {
            let f: Vec<_> = fields(16)
                .into_iter()
                .filter(|(k, _)| *k != Value::Text(name.into()))
                .collect();
            assert_eq!(
                parse_attestation(&doc_with(f)),
                Err(AttestationError::MissingField { field: name }),
                "{name}"
            );
        }
    }

    #[test]
    fn rejects_wrong_types_and_values() {
        let cases: Vec<(&str, Value, AttestationError)> = vec![
            (
                "module_id",
                Value::Bytes(vec![1]),
                AttestationError::FieldType {
                    field: "module_id",
                    expected: "a text string",
                },
            ),
            (
                "module_id",
                Value::Text(String::new()),
                AttestationError::EmptyField { field: "module_id" },
            ),
            (
                "digest",
                Value::Text("SHA256".into()),
                AttestationError::UnsupportedDigest {
                    found: "SHA256".into(),
                },
            ),
            (
                "timestamp",
                Value::Integer((-1).into()),
                AttestationError::FieldType {
                    field: "timestamp",
                    expected: "an unsigned integer",
                },
            ),
            (
                "timestamp",
                Value::Integer(0.into()),
                AttestationError::ZeroTimestamp,
            ),
            (
                "timestamp",
                Value::Tag(1, Box::new(Value::Integer(5.into()))),
                AttestationError::FieldType {
                    field: "timestamp",
                    expected: "an unsigned integer",
                },
            ),
            (
                "certificate",
                Value::Bytes(vec![]),
                AttestationError::EmptyField {
                    field: "certificate",
                },
            ),
            (
                "certificate",
                Value::Bytes(vec![0; MAX_CERT_LEN + 1]),
                AttestationError::FieldTooLong {
                    field: "certificate",
                    len: MAX_CERT_LEN + 1,
                    max: MAX_CERT_LEN,
                },
            ),
            (
                "cabundle",
                Value::Array(vec![]),
                AttestationError::EmptyField { field: "cabundle" },
            ),
            (
                "cabundle",
                Value::Array(vec![Value::Bytes(vec![1]); MAX_CHAIN_LEN + 1]),
                AttestationError::ChainTooLong {
                    len: MAX_CHAIN_LEN + 1,
                    max: MAX_CHAIN_LEN,
                },
            ),
            (
                "cabundle",
                Value::Array(vec![Value::Text("x".into())]),
                AttestationError::FieldType {
                    field: "cabundle",
                    expected: "a byte string",
                },
            ),
            (
                "nonce",
                Value::Bytes(vec![0; MAX_OPTIONAL_FIELD_LEN + 1]),
                AttestationError::FieldTooLong {
                    field: "nonce",
                    len: MAX_OPTIONAL_FIELD_LEN + 1,
                    max: MAX_OPTIONAL_FIELD_LEN,
                },
            ),
            (
                "user_data",
                Value::Text("hi".into()),
                AttestationError::FieldType {
                    field: "user_data",
                    expected: "a byte string or null",
                },
            ),
            (
                "public_key",
                Value::Bool(false),
                AttestationError::FieldType {
                    field: "public_key",
                    expected: "a byte string or null",
                },
            ),
        ];
        for (name, value, want) in cases {
            let mut f = fields(16);
            set(&mut f, name, value);
            assert_eq!(parse_attestation(&doc_with(f)), Err(want), "{name}");
        }
    }

    #[test]
    fn rejects_trailing_bytes_after_payload_and_after_envelope() {
        let mut payload = encode(&Value::Map(fields(16)));
        payload.push(0x00);
        assert_eq!(
            parse_attestation(&envelope(&payload)),
            Err(AttestationError::TrailingBytes {
                part: "payload",
                count: 1
            })
        );
        let mut doc = doc_with(fields(16));
        doc.extend_from_slice(&[0xf6, 0xf6]);
        assert_eq!(
            parse_attestation(&doc),
            Err(AttestationError::TrailingBytes {
                part: "cose_sign1",
                count: 2
            })
        );
    }

    #[test]
    fn rejects_tag_18_and_other_tags() {
        let doc = doc_with(fields(16));
        let mut tagged = vec![0xd2]; // tag 18
        tagged.extend_from_slice(&doc);
        assert_eq!(
            parse_attestation(&tagged),
            Err(AttestationError::Tagged {
                part: "cose_sign1",
                tag: 18
            })
        );
        let mut tagged = vec![0xd8, 0x62]; // tag 98 (COSE_Sign)
        tagged.extend_from_slice(&doc);
        assert_eq!(
            parse_attestation(&tagged),
            Err(AttestationError::Tagged {
                part: "cose_sign1",
                tag: 98
            })
        );
        let mut payload = vec![0xd8, 0x18]; // tag 24 (encoded CBOR) on the payload map
        payload.extend(encode(&Value::Map(fields(16))));
        assert_eq!(
            parse_attestation(&envelope(&payload)),
            Err(AttestationError::Tagged {
                part: "payload",
                tag: 24
            })
        );
    }

    #[test]
    fn rejects_wrong_headers_and_signature_length() {
        let payload = encode(&Value::Map(fields(16)));
        let es256 = canonical_envelope(&[0xa1, 0x01, 0x26], &payload, &[0; 96]);
        assert_eq!(
            parse_attestation(&es256),
            Err(AttestationError::ProtectedHeader {
                found_hex: "a10126".into()
            })
        );
        let short = canonical_envelope(&ES384_PROTECTED_HEADER, &payload, &[0; 95]);
        assert_eq!(
            parse_attestation(&short),
            Err(AttestationError::SignatureLength { len: 95 })
        );
        let mut unprot = canonical_envelope(&ES384_PROTECTED_HEADER, &payload, &[0; 96]);
        // Replace the empty unprotected map (`a0`, after `84 44 a1 01 38 22`) by {4: h''}.
        unprot.splice(6..7, [0xa1, 0x04, 0x40]);
        assert_eq!(
            parse_attestation(&unprot),
            Err(AttestationError::UnprotectedHeader { entries: 1 })
        );
    }

    #[test]
    fn rejects_non_canonical_envelope() {
        let payload = encode(&Value::Map(fields(16)));
        let canonical = envelope(&payload);
        // Same content, payload length written with 4 bytes instead of 2.
        let mut doc = vec![0x84, 0x44, 0xa1, 0x01, 0x38, 0x22, 0xa0, 0x5a];
        doc.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
        doc.extend_from_slice(&payload);
        doc.extend_from_slice(&canonical[canonical.len() - 98..]);
        assert_eq!(
            parse_attestation(&doc),
            Err(AttestationError::NonCanonicalEnvelope)
        );
    }

    #[test]
    fn rejects_oversize_input_before_parsing() {
        let doc = vec![0u8; MAX_DOCUMENT_LEN + 1];
        assert_eq!(
            parse_attestation(&doc),
            Err(AttestationError::TooLong {
                len: MAX_DOCUMENT_LEN + 1,
                max: MAX_DOCUMENT_LEN
            })
        );
    }

    #[test]
    fn rejects_huge_declared_length_without_allocating() {
        // A byte string claiming 2^63 bytes, inside the size cap.
        let doc = [
            0x84, 0x44, 0xa1, 0x01, 0x38, 0x22, 0xa0, 0x5b, 0x80, 0, 0, 0, 0, 0, 0, 0,
        ];
        assert!(matches!(
            parse_attestation(&doc),
            Err(AttestationError::Malformed {
                part: "cose_sign1",
                ..
            })
        ));
    }

    #[test]
    fn rejects_deep_nesting() {
        let mut payload = vec![0x81; 200];
        payload.push(0x00);
        assert!(matches!(
            parse_attestation(&envelope(&payload)),
            Err(AttestationError::Malformed {
                part: "payload",
                ..
            })
        ));
    }

    #[test]
    fn sig_structure_matches_ciborium_encoding() {
        let payload = vec![0xab; 300];
        let want = encode(&Value::Array(vec![
            Value::Text("Signature1".into()),
            Value::Bytes(ES384_PROTECTED_HEADER.to_vec()),
            Value::Bytes(vec![]),
            Value::Bytes(payload.clone()),
        ]));
        assert_eq!(sig_structure(&ES384_PROTECTED_HEADER, &payload), want);
    }
}
