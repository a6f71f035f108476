//! The bytes of a Nitro attestation document, written the way the NSM writes them.
//!
//! A document is an untagged COSE_Sign1 (RFC 9052):
//!
//! ```text
//! 84                      array(4)
//!    44 a1 01 38 22       protected: bstr({1: -35}), alg ES384
//!    a0                   unprotected: {}
//!    59 xx xx <payload>   payload: bstr(CBOR map)
//!    58 60 <r ‖ s>        signature: 96 bytes
//! ```
//!
//! The payload map's keys come in AWS's order (`module_id`, `digest`, `timestamp`, `pcrs`,
//! `certificate`, `cabundle`, `public_key`, `user_data`, `nonce`); absent optional fields are
//! CBOR `null`. The outer map is definite (`a9`, as before mid-2025) or indefinite (`bf … ff`, as
//! since); inner structures are always definite, as on real devices. The signature is ES384 over
//! the COSE `Sig_structure` `["Signature1", protected, h'', payload]`, RFC 6979 deterministic.
//!
//! The CBOR is written by hand, byte by byte, rather than through a serializer, so that the
//! encoding is exactly what this module says and so that faults (a duplicate key, a tag, trailing
//! bytes) are as easy to write as the correct form. Nothing here parses.

use p384::ecdsa::signature::Signer;
use p384::ecdsa::{Signature, SigningKey};

/// CBOR major types.
const MAJOR_UINT: u8 = 0;
const MAJOR_BYTES: u8 = 2;
const MAJOR_TEXT: u8 = 3;
const MAJOR_ARRAY: u8 = 4;
const MAJOR_MAP: u8 = 5;
const MAJOR_TAG: u8 = 6;
const CBOR_NULL: u8 = 0xf6;
const CBOR_INDEFINITE_MAP: u8 = 0xbf;
const CBOR_BREAK: u8 = 0xff;

/// COSE_Sign1's CBOR tag, which the NSM does not write.
const COSE_SIGN1_TAG: u64 = 18;

/// `{1: -35}`: alg ES384, the only protected header the NSM writes.
pub(crate) const ES384_PROTECTED_HEADER: [u8; 4] = [0xa1, 0x01, 0x38, 0x22];

/// How the payload's outer map states its length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MapEncoding {
    /// `a9`: nine entries, as NSMs wrote before mid-2025.
    #[default]
    Definite,
    /// `bf … ff`, as NSMs write since mid-2025.
    Indefinite,
}

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

/// What goes into one document's payload.
#[derive(Clone, Debug)]
pub(crate) struct PayloadFields<'a> {
    pub(crate) module_id: &'a str,
    pub(crate) digest: &'a str,
    pub(crate) timestamp: u64,
    pub(crate) pcrs: Vec<(u16, Vec<u8>)>,
    pub(crate) certificate: &'a [u8],
    pub(crate) cabundle: &'a [Vec<u8>],
    pub(crate) public_key: Option<&'a [u8]>,
    pub(crate) user_data: Option<&'a [u8]>,
    pub(crate) nonce: Option<&'a [u8]>,
}

/// The payload map: entries in AWS's order, each value already CBOR-encoded, then the faults.
pub(crate) fn encode_payload(
    fields: &PayloadFields<'_>,
    encoding: MapEncoding,
    faults: &DocumentFaults,
) -> Vec<u8> {
    let mut pcrs = Vec::new();
    head(&mut pcrs, MAJOR_MAP, len_u64(fields.pcrs.len()));
    for (index, value) in &fields.pcrs {
        head(&mut pcrs, MAJOR_UINT, u64::from(*index));
        bytes(&mut pcrs, value);
    }
    let mut cabundle = Vec::new();
    head(&mut cabundle, MAJOR_ARRAY, len_u64(fields.cabundle.len()));
    for cert in fields.cabundle {
        bytes(&mut cabundle, cert);
    }
    let optional = |v: Option<&[u8]>| match v {
        Some(v) => cbor_bytes(v),
        None => vec![CBOR_NULL],
    };
    let mut entries: Vec<(String, Vec<u8>)> = vec![
        ("module_id".to_owned(), cbor_text(fields.module_id)),
        ("digest".to_owned(), cbor_text(fields.digest)),
        ("timestamp".to_owned(), cbor_uint(fields.timestamp)),
        ("pcrs".to_owned(), pcrs),
        ("certificate".to_owned(), cbor_bytes(fields.certificate)),
        ("cabundle".to_owned(), cabundle),
        ("public_key".to_owned(), optional(fields.public_key)),
        ("user_data".to_owned(), optional(fields.user_data)),
        ("nonce".to_owned(), optional(fields.nonce)),
    ];

    for (key, value) in &faults.replace_fields {
        if let Some(entry) = entries.iter_mut().find(|(k, _)| k == key) {
            entry.1.clone_from(value);
        }
    }
    entries.retain(|(k, _)| !faults.omit_fields.iter().any(|o| o == k));
    for key in &faults.duplicate_fields {
        if let Some(entry) = entries.iter().find(|(k, _)| k == key).cloned() {
            entries.push(entry);
        }
    }
    entries.extend(faults.extra_fields.iter().cloned());

    let mut out = Vec::new();
    match encoding {
        MapEncoding::Definite => head(&mut out, MAJOR_MAP, len_u64(entries.len())),
        MapEncoding::Indefinite => out.push(CBOR_INDEFINITE_MAP),
    }
    for (key, value) in &entries {
        text(&mut out, key);
        out.extend_from_slice(value);
    }
    if encoding == MapEncoding::Indefinite {
        out.push(CBOR_BREAK);
    }
    out
}

/// Signs `payload` with `key` and writes the COSE_Sign1, applying the envelope faults.
pub(crate) fn sign_cose(
    payload: &[u8],
    key: &SigningKey,
    s_form: SignatureS,
    faults: &DocumentFaults,
) -> Vec<u8> {
    let protected = faults
        .protected_header
        .clone()
        .unwrap_or_else(|| ES384_PROTECTED_HEADER.to_vec());
    let signature = shape_s(key.sign(&sig_structure(&protected, payload)), s_form);
    let mut signature = signature.to_bytes().to_vec();
    if faults.corrupt_signature
        && let Some(first) = signature.first_mut()
    {
        *first ^= 0x01;
    }

    let mut out = Vec::with_capacity(payload.len() + 128);
    if faults.tag_cose {
        head(&mut out, MAJOR_TAG, COSE_SIGN1_TAG);
    }
    head(&mut out, MAJOR_ARRAY, 4);
    bytes(&mut out, &protected);
    match &faults.unprotected_header {
        Some(raw) => out.extend_from_slice(raw),
        None => head(&mut out, MAJOR_MAP, 0),
    }
    bytes(&mut out, payload);
    bytes(&mut out, &signature);
    out.extend_from_slice(&faults.trailing_bytes);
    out
}

/// `Sig_structure = ["Signature1", body_protected, external_aad = h'', payload]`.
pub(crate) fn sig_structure(protected: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + protected.len() + 20);
    head(&mut out, MAJOR_ARRAY, 4);
    text(&mut out, "Signature1");
    bytes(&mut out, protected);
    bytes(&mut out, &[]);
    bytes(&mut out, payload);
    out
}

/// Puts `s` in the asked-for half of the scalar field (both halves verify).
fn shape_s(signature: Signature, form: SignatureS) -> Signature {
    let low = signature.normalize_s();
    match (form, low) {
        (SignatureS::AsSigned, _) | (SignatureS::High, Some(_)) | (SignatureS::Low, None) => {
            signature
        }
        (SignatureS::Low, Some(low)) => low,
        (SignatureS::High, None) => {
            let (r, s) = signature.split_scalars();
            Signature::from_scalars(r, -s).unwrap_or(signature)
        }
    }
}

fn len_u64(len: usize) -> u64 {
    u64::try_from(len).unwrap_or(u64::MAX)
}

/// Writes a CBOR head: major type and argument, shortest form.
fn head(out: &mut Vec<u8>, major: u8, value: u64) {
    let m = major << 5;
    if value < 24 {
        out.push(m | value as u8);
    } else if let Ok(v) = u8::try_from(value) {
        out.extend_from_slice(&[m | 24, v]);
    } else if let Ok(v) = u16::try_from(value) {
        out.push(m | 25);
        out.extend_from_slice(&v.to_be_bytes());
    } else if let Ok(v) = u32::try_from(value) {
        out.push(m | 26);
        out.extend_from_slice(&v.to_be_bytes());
    } else {
        out.push(m | 27);
        out.extend_from_slice(&value.to_be_bytes());
    }
}

fn bytes(out: &mut Vec<u8>, value: &[u8]) {
    head(out, MAJOR_BYTES, len_u64(value.len()));
    out.extend_from_slice(value);
}

fn text(out: &mut Vec<u8>, value: &str) {
    head(out, MAJOR_TEXT, len_u64(value.len()));
    out.extend_from_slice(value.as_bytes());
}

/// CBOR byte string.
pub(crate) fn cbor_bytes(value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len() + 9);
    bytes(&mut out, value);
    out
}

/// CBOR text string.
pub(crate) fn cbor_text(value: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len() + 9);
    text(&mut out, value);
    out
}

/// CBOR unsigned integer.
pub(crate) fn cbor_uint(value: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(9);
    head(&mut out, MAJOR_UINT, value);
    out
}

/// CBOR map from unsigned keys to byte strings (the `pcrs` shape), definite length.
pub(crate) fn cbor_uint_bytes_map(entries: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    head(&mut out, MAJOR_MAP, len_u64(entries.len()));
    for (k, v) in entries {
        head(&mut out, MAJOR_UINT, *k);
        bytes(&mut out, v);
    }
    out
}

/// CBOR array of byte strings (the `cabundle` shape).
pub(crate) fn cbor_bytes_array(items: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    head(&mut out, MAJOR_ARRAY, len_u64(items.len()));
    for item in items {
        bytes(&mut out, item);
    }
    out
}

/// CBOR `null`.
pub(crate) fn cbor_null() -> Vec<u8> {
    vec![CBOR_NULL]
}

/// Raw CBOR values for [`DocumentFaults::replace_fields`] and [`DocumentFaults::extra_fields`].
pub mod cbor {
    /// A byte string.
    pub fn bytes(value: &[u8]) -> Vec<u8> {
        super::cbor_bytes(value)
    }
    /// A text string.
    pub fn text(value: &str) -> Vec<u8> {
        super::cbor_text(value)
    }
    /// An unsigned integer.
    pub fn uint(value: u64) -> Vec<u8> {
        super::cbor_uint(value)
    }
    /// `null`.
    pub fn null() -> Vec<u8> {
        super::cbor_null()
    }
    /// A definite map from unsigned integers to byte strings (the shape of `pcrs`).
    pub fn uint_bytes_map(entries: &[(u64, Vec<u8>)]) -> Vec<u8> {
        super::cbor_uint_bytes_map(entries)
    }
    /// A definite array of byte strings (the shape of `cabundle`).
    pub fn bytes_array(items: &[Vec<u8>]) -> Vec<u8> {
        super::cbor_bytes_array(items)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_use_the_shortest_form() {
        let mut out = Vec::new();
        head(&mut out, MAJOR_UINT, 23);
        head(&mut out, MAJOR_UINT, 24);
        head(&mut out, MAJOR_BYTES, 256);
        head(&mut out, MAJOR_UINT, 1_665_651_482_136);
        assert_eq!(
            out,
            [
                0x17, 0x18, 0x18, 0x59, 0x01, 0x00, 0x1b, 0x00, 0x00, 0x01, 0x83, 0xd0, 0x90, 0x9e,
                0x18
            ]
        );
    }

    #[test]
    fn sig_structure_matches_rfc_9052_layout() {
        let s = sig_structure(&ES384_PROTECTED_HEADER, &[0xa0]);
        let mut expected = vec![0x84, 0x6a];
        expected.extend_from_slice(b"Signature1");
        expected.extend_from_slice(&[0x44, 0xa1, 0x01, 0x38, 0x22, 0x40, 0x41, 0xa0]);
        assert_eq!(s, expected);
    }
}
