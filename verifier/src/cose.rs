//! The one COSE_Sign1 profile Attestplane signs with: Ed25519 (EdDSA) over a deterministic CBOR
//! payload, tagged (18), protected header exactly `{1: -8, 3: content type, 4: kid}`, empty
//! unprotected header, embedded payload, no external AAD.
//!
//! Log entries and admin requests both use it, told apart by the content type in the protected
//! header so a signature over one can never be taken for the other. Opening is strict: the
//! bytes must be exactly what [`sign`] would produce for the same parts.
//!
//! Opening reads the bytes once ([`open_borrowed`]): the one encoding the profile allows has a
//! fixed layout (only the kid, the payload and the signature vary), so it is compared piece by
//! piece and the `Sig_structure` is assembled from slices of the input. Anything else is handed
//! to the reference opener ([`open_reference`]: parse with `coset`, re-encode the parts, compare
//! the bytes), which names what is wrong; the two are checked against each other by property
//! tests, and the reference decides whenever the fast path does not accept.
//!
//! The content types carry the format's version (`application/vnd.attestplane.entry.v1+cbor`):
//! a message of the same kind under another version (or under the unversioned content type
//! written before v1) is refused as [`CoseError::Version`], naming the version it carries.

use std::borrow::Cow;

use coset::{
    CoseSign1, CoseSign1Builder, HeaderBuilder, RegisteredLabelWithPrivate, TaggedCborSerializable,
    iana::Algorithm,
};
use ed25519_dalek::{Signature, Signer};

/// Why a COSE_Sign1 was refused. Callers wrap it in their own error type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CoseError {
    /// Longer than the caller's limit.
    TooLong { len: usize, max: usize },
    /// Not a tagged COSE_Sign1.
    Malformed(String),
    /// The protected header is not the profile's.
    Header(&'static str),
    /// The content type is of the expected kind, but names another version of its format.
    Version { found: FormatVersion },
    /// Decodes, but not in the one canonical encoding.
    NotCanonical,
    /// The signer failed.
    SigningFailed,
}

/// A version of the signed formats, as the content type names it. The profile's content types
/// are `application/vnd.attestplane.{kind}.v{N}+cbor`; before v1 they carried no version
/// (`application/vnd.attestplane.{kind}+cbor`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FormatVersion {
    /// The unversioned content type written before the format was frozen as v1. No log kept
    /// in production holds it; it is refused by name.
    PreV1,
    /// `.v{N}` in the content type.
    V(u32),
}

impl FormatVersion {
    /// The version of the format this crate reads and writes.
    pub const CURRENT: Self = Self::V(1);

    /// The version `found` names within the family of `expected` (the same
    /// `application/vnd.attestplane.{kind}`), or `None` when `found` is not of that family.
    pub(crate) fn of(found: &str, expected: &str) -> Option<Self> {
        let (family, _) = expected.strip_suffix("+cbor")?.rsplit_once(".v")?;
        let rest = found.strip_prefix(family)?.strip_suffix("+cbor")?;
        if rest.is_empty() {
            return Some(Self::PreV1);
        }
        let digits = rest.strip_prefix(".v")?;
        // Decimal without leading zeros, so each version has one spelling.
        if digits.is_empty()
            || digits.starts_with('0')
            || !digits.bytes().all(|b| b.is_ascii_digit())
        {
            return None;
        }
        digits.parse().ok().map(Self::V)
    }
}

impl std::fmt::Display for FormatVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::PreV1 => f.write_str("pre-v1"),
            Self::V(n) => write!(f, "v{n}"),
        }
    }
}

/// The parts of an opened COSE_Sign1.
pub(crate) struct Opened {
    pub kid: [u8; 32],
    pub payload: Vec<u8>,
    pub signature: Signature,
    /// The `Sig_structure` the signature covers.
    pub tbs: Vec<u8>,
}

/// The parts of an opened COSE_Sign1, the payload borrowed from the input when it can be.
pub(crate) struct OpenedRef<'a> {
    pub kid: [u8; 32],
    pub payload: Cow<'a, [u8]>,
    pub signature: Signature,
    /// The `Sig_structure` the signature covers.
    pub tbs: Vec<u8>,
}

fn unsigned(content_type: &str, kid: &[u8; 32], payload: Vec<u8>) -> CoseSign1 {
    let protected = HeaderBuilder::new()
        .algorithm(Algorithm::EdDSA)
        .content_type(content_type.to_string())
        .key_id(kid.to_vec())
        .build();
    CoseSign1Builder::new()
        .protected(protected)
        .payload(payload)
        .build()
}

/// Signs `payload` under the profile.
pub(crate) fn sign<S: Signer<Signature>>(
    content_type: &str,
    kid: &[u8; 32],
    payload: Vec<u8>,
    signer: &S,
) -> Result<Vec<u8>, CoseError> {
    let mut cose = unsigned(content_type, kid, payload);
    let tbs = cose.tbs_data(&[]);
    let signature = signer
        .try_sign(&tbs)
        .map_err(|_| CoseError::SigningFailed)?;
    cose.signature = signature.to_bytes().to_vec();
    cose.to_tagged_vec()
        .map_err(|e| CoseError::Malformed(e.to_string()))
}

/// Opens `bytes` as the profile with `content_type`, without checking the signature.
pub(crate) fn open(bytes: &[u8], content_type: &str, max_len: usize) -> Result<Opened, CoseError> {
    let o = open_borrowed(bytes, content_type, max_len)?;
    Ok(Opened {
        kid: o.kid,
        payload: o.payload.into_owned(),
        signature: o.signature,
        tbs: o.tbs,
    })
}

/// Like [`open`], borrowing the payload from `bytes`: one pass over the bytes when they are the
/// profile's encoding, the reference opener's verdict otherwise.
pub(crate) fn open_borrowed<'a>(
    bytes: &'a [u8],
    content_type: &str,
    max_len: usize,
) -> Result<OpenedRef<'a>, CoseError> {
    if bytes.len() > max_len {
        return Err(CoseError::TooLong {
            len: bytes.len(),
            max: max_len,
        });
    }
    if let Some(opened) = open_exact(bytes, content_type) {
        return Ok(opened);
    }
    let o = open_reference(bytes, content_type, max_len)?;
    Ok(OpenedRef {
        kid: o.kid,
        payload: Cow::Owned(o.payload),
        signature: o.signature,
        tbs: o.tbs,
    })
}

/// The shortest CBOR head of `major` with argument `arg`: the bytes and how many are used.
fn head(major: u8, arg: u64) -> ([u8; 9], usize) {
    let mut out = [0u8; 9];
    let m = major << 5;
    let be = arg.to_be_bytes();
    let (info, width) = match arg {
        0..=23 => (arg as u8, 0),
        24..=0xff => (24, 1),
        0x100..=0xffff => (25, 2),
        0x1_0000..=0xffff_ffff => (26, 4),
        _ => (27, 8),
    };
    let bytes = std::iter::once(m | info).chain(be.iter().skip(8 - width).copied());
    for (dst, src) in out.iter_mut().zip(bytes) {
        *dst = src;
    }
    (out, 1 + width)
}

/// A reader over the input that only moves forward.
struct Bytes<'a> {
    rest: &'a [u8],
}

impl<'a> Bytes<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (taken, rest) = self.rest.split_at_checked(n)?;
        self.rest = rest;
        Some(taken)
    }

    fn expect(&mut self, want: &[u8]) -> Option<()> {
        (self.take(want.len())? == want).then_some(())
    }

    /// A byte string in its shortest-form definite-length encoding: (the whole encoding, the
    /// content).
    fn bstr(&mut self) -> Option<(&'a [u8], &'a [u8])> {
        let start = self.rest;
        let initial = *self.rest.first()?;
        if initial >> 5 != 2 {
            return None;
        }
        let width = match initial & 0x1f {
            info @ 0..=23 => {
                self.take(1)?;
                let content = self.take(usize::from(info))?;
                return Some((start.get(..1 + content.len())?, content));
            }
            24 => 1,
            25 => 2,
            26 => 4,
            27 => 8,
            _ => return None,
        };
        self.take(1)?;
        let arg = self
            .take(width)?
            .iter()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
        // Shortest form only: the argument needs every byte of its width.
        if head(2, arg).1 != 1 + width {
            return None;
        }
        let len = usize::try_from(arg).ok()?;
        let content = self.take(len)?;
        Some((start.get(..1 + width + len)?, content))
    }
}

/// Opens `bytes` if they are exactly what [`sign`] produces for some kid, payload and
/// signature under `content_type`; `None` for anything else. `content_type` must be one the
/// reference opener accepts at all (`coset` wants `type/subtype` text without surrounding
/// space): the profiles' constants are, and tests check it.
fn open_exact<'a>(bytes: &'a [u8], content_type: &str) -> Option<OpenedRef<'a>> {
    const SIGNATURE1: &[u8] = b"Signature1";
    let mut r = Bytes { rest: bytes };
    // Tag 18, array of four.
    r.expect(&[0xd2, 0x84])?;
    // Protected header: bstr({1: -8, 3: content_type, 4: bstr(kid)}).
    let (protected, mut header) = {
        let (whole, content) = r.bstr()?;
        (whole, Bytes { rest: content })
    };
    header.expect(&[0xa3, 0x01, 0x27, 0x03])?;
    let (ct_head, ct_head_len) = head(3, content_type.len() as u64);
    header.expect(ct_head.get(..ct_head_len)?)?;
    header.expect(content_type.as_bytes())?;
    header.expect(&[0x04, 0x58, 0x20])?;
    let kid: [u8; 32] = header.take(32)?.try_into().ok()?;
    if !header.rest.is_empty() {
        return None;
    }
    // Empty unprotected header, embedded payload, 64-byte signature, nothing after.
    r.expect(&[0xa0])?;
    let (payload_encoded, payload) = r.bstr()?;
    r.expect(&[0x58, 0x40])?;
    let signature: [u8; 64] = r.take(64)?.try_into().ok()?;
    if !r.rest.is_empty() {
        return None;
    }
    // Sig_structure: ["Signature1", protected, h'', payload], reusing the encoded strings.
    let mut tbs =
        Vec::with_capacity(3 + SIGNATURE1.len() + protected.len() + payload_encoded.len());
    tbs.extend_from_slice(&[0x84, 0x60 | SIGNATURE1.len() as u8]);
    tbs.extend_from_slice(SIGNATURE1);
    tbs.extend_from_slice(protected);
    tbs.push(0x40);
    tbs.extend_from_slice(payload_encoded);
    Some(OpenedRef {
        kid,
        payload: Cow::Borrowed(payload),
        signature: Signature::from_bytes(&signature),
        tbs,
    })
}

/// The reference opener: parses `bytes` with `coset`, checks the header, re-encodes the parts
/// and requires the same bytes back. Slow (two allocating passes), precise in its errors.
pub(crate) fn open_reference(
    bytes: &[u8],
    content_type: &str,
    max_len: usize,
) -> Result<Opened, CoseError> {
    if bytes.len() > max_len {
        return Err(CoseError::TooLong {
            len: bytes.len(),
            max: max_len,
        });
    }
    let cose =
        CoseSign1::from_tagged_slice(bytes).map_err(|e| CoseError::Malformed(e.to_string()))?;
    let header = &cose.protected.header;
    if header.alg != Some(RegisteredLabelWithPrivate::Assigned(Algorithm::EdDSA)) {
        return Err(CoseError::Header("algorithm is not EdDSA"));
    }
    match &header.content_type {
        Some(coset::ContentType::Text(t)) if t == content_type => {}
        Some(coset::ContentType::Text(t)) => {
            return Err(match FormatVersion::of(t, content_type) {
                Some(found) => CoseError::Version { found },
                None => CoseError::Header("wrong content type"),
            });
        }
        _ => return Err(CoseError::Header("wrong content type")),
    }
    let kid: [u8; 32] = header
        .key_id
        .as_slice()
        .try_into()
        .map_err(|_| CoseError::Header("kid is not 32 bytes"))?;
    let payload = cose
        .payload
        .clone()
        .ok_or(CoseError::Header("payload is detached"))?;
    let signature: [u8; 64] = cose
        .signature
        .as_slice()
        .try_into()
        .map_err(|_| CoseError::Header("signature is not 64 bytes"))?;

    // One encoding only: extra header parameters, unprotected headers and non-shortest
    // framing all change the bytes and are refused here.
    let mut expected = unsigned(content_type, &kid, payload.clone());
    let tbs = expected.tbs_data(&[]);
    expected.signature = signature.to_vec();
    let canonical = expected
        .to_tagged_vec()
        .map_err(|e| CoseError::Malformed(e.to_string()))?;
    if canonical != bytes {
        return Err(CoseError::NotCanonical);
    }
    Ok(Opened {
        kid,
        payload,
        signature: Signature::from_bytes(&signature),
        tbs,
    })
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::SigningKey;
    use proptest::prelude::*;

    use super::*;

    fn content_type() -> impl Strategy<Value = String> {
        // Around the text head boundary (23/24 bytes) and the profiles' own.
        // (`coset` accepts only `type/subtype` text, so only such a content type can make a
        // profile at all.)
        prop_oneof![
            "[a-z]{1,8}/[a-z+.]{1,24}",
            Just(crate::entry::ENTRY_CONTENT_TYPE.to_string()),
            Just(crate::admin::ADMIN_CONTENT_TYPE.to_string()),
            Just(format!("x/{}", "x".repeat(21))),
            Just(format!("y/{}", "y".repeat(22))),
        ]
    }

    fn payload() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..30),
            proptest::collection::vec(any::<u8>(), 240..300),
            proptest::collection::vec(any::<u8>(), 65_530..65_540),
        ]
    }

    fn same(a: &OpenedRef<'_>, b: &Opened) -> bool {
        a.kid == b.kid
            && a.payload.as_ref() == b.payload.as_slice()
            && a.signature == b.signature
            && a.tbs == b.tbs
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn one_pass_opener_takes_what_sign_writes(
            ct in content_type(),
            kid in any::<[u8; 32]>(),
            payload in payload(),
        ) {
            let key = SigningKey::from_bytes(&[5; 32]);
            let bytes = sign(&ct, &kid, payload, &key).unwrap();
            let fast = open_exact(&bytes, &ct);
            prop_assert!(fast.is_some(), "the one-pass opener refused a signed message");
            let reference = open_reference(&bytes, &ct, usize::MAX).unwrap();
            prop_assert!(same(&fast.unwrap(), &reference));
            // Another content type is refused by both.
            let other = format!("{ct}.other");
            prop_assert!(open_exact(&bytes, &other).is_none());
            prop_assert!(open_reference(&bytes, &other, usize::MAX).is_err());
        }

        #[test]
        fn one_pass_opener_accepts_only_what_the_reference_accepts(
            ct in content_type(),
            payload in proptest::collection::vec(any::<u8>(), 0..300),
            changes in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
            cut in any::<prop::sample::Index>(),
        ) {
            let key = SigningKey::from_bytes(&[5; 32]);
            let bytes = sign(&ct, &[9; 32], payload, &key).unwrap();
            let mut changed = bytes.clone();
            for (i, b) in &changes {
                let i = i.index(changed.len());
                changed[i] = *b;
            }
            let cut = bytes[..cut.index(bytes.len())].to_vec();
            for input in [&changed, &cut] {
                if let Some(fast) = open_exact(input, &ct) {
                    let reference = open_reference(input, &ct, usize::MAX);
                    prop_assert!(reference.is_ok_and(|r| same(&fast, &r)));
                }
            }
        }
    }

    #[test]
    fn the_profiles_content_types_open_with_the_reference() {
        let key = SigningKey::from_bytes(&[5; 32]);
        for ct in [
            crate::entry::ENTRY_CONTENT_TYPE,
            crate::admin::ADMIN_CONTENT_TYPE,
        ] {
            let bytes = sign(ct, &[1; 32], vec![0xa0], &key).unwrap();
            let reference = open_reference(&bytes, ct, usize::MAX).unwrap();
            assert!(same(&open_exact(&bytes, ct).unwrap(), &reference));
        }
    }

    #[test]
    fn content_types_name_their_version_within_their_kind() {
        let entry = crate::entry::ENTRY_CONTENT_TYPE;
        let admin = crate::admin::ADMIN_CONTENT_TYPE;
        assert_eq!(
            FormatVersion::of(entry, entry),
            Some(FormatVersion::CURRENT)
        );
        assert_eq!(
            FormatVersion::of(admin, admin),
            Some(FormatVersion::CURRENT)
        );
        for (found, version) in [
            (
                "application/vnd.attestplane.entry+cbor",
                Some(FormatVersion::PreV1),
            ),
            (
                "application/vnd.attestplane.entry.v2+cbor",
                Some(FormatVersion::V(2)),
            ),
            ("application/vnd.attestplane.entry.v4294967296+cbor", None),
            ("application/vnd.attestplane.entry.v01+cbor", None),
            ("application/vnd.attestplane.entry.v+cbor", None),
            ("application/vnd.attestplane.entry.v-1+cbor", None),
            ("application/vnd.attestplane.entryx+cbor", None),
            ("application/vnd.attestplane.entry.v1+json", None),
            ("application/vnd.attestplane.admin.v1+cbor", None),
            ("application/vnd.attestplane.admin+cbor", None),
        ] {
            assert_eq!(FormatVersion::of(found, entry), version, "{found}");
        }
        assert_eq!(
            FormatVersion::of("application/vnd.attestplane.admin+cbor", admin),
            Some(FormatVersion::PreV1)
        );
    }

    #[test]
    fn another_version_of_the_same_kind_is_refused_by_name() {
        let key = SigningKey::from_bytes(&[5; 32]);
        let entry = crate::entry::ENTRY_CONTENT_TYPE;
        let pre_v1 = sign(
            "application/vnd.attestplane.entry+cbor",
            &[1; 32],
            vec![0xa0],
            &key,
        )
        .unwrap();
        assert!(open_exact(&pre_v1, entry).is_none());
        assert_eq!(
            open_borrowed(&pre_v1, entry, usize::MAX).err(),
            Some(CoseError::Version {
                found: FormatVersion::PreV1
            })
        );
        let admin = sign(crate::admin::ADMIN_CONTENT_TYPE, &[1; 32], vec![0xa0], &key).unwrap();
        assert_eq!(
            open_borrowed(&admin, entry, usize::MAX).err(),
            Some(CoseError::Header("wrong content type"))
        );
    }
}
