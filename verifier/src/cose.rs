//! The one COSE_Sign1 profile Attestplane signs with: Ed25519 (EdDSA) over a deterministic CBOR
//! payload, tagged (18), protected header exactly `{1: -8, 3: content type, 4: kid}`, empty
//! unprotected header, embedded payload, no external AAD.
//!
//! Log entries and admin requests both use it, told apart by the content type in the protected
//! header so a signature over one can never be taken for the other. Opening is strict: the
//! bytes must be exactly what [`sign`] would produce for the same parts.

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
    /// Decodes, but not in the one canonical encoding.
    NotCanonical,
    /// The signer failed.
    SigningFailed,
}

/// The parts of an opened COSE_Sign1.
pub(crate) struct Opened {
    pub kid: [u8; 32],
    pub payload: Vec<u8>,
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
