//! The control plane, verified: its attestation document fetched with a fresh random nonce
//! (`GET /v1/attestation?nonce=`) and checked before anything it signed is believed.
//!
//! [`attested_control_plane`] checks, at the current time: the chain to the pinned root
//! (`--root`, default AWS Nitro root G1), the signature, freshness, our nonce, the expected
//! PCRs (`--pcrs`), no debug mode unless `allow_debug` is set, and that the JWKS served with the
//! document holds exactly one key, the document's `public_key`: the attested epoch key. What
//! that key signs (handles, checkpoints) is then the measured enclave's word, not the host's.
//!
//! Used by `handle resolve` (the handle's key), by every admin command (the checkpoint that
//! confirms the act) and by `deployment` (the checkpoint that names the genesis entry).

use std::collections::BTreeMap;

use attestplane_verifier::UnixMillis;
use attestplane_verifier::attestation::{
    Expectations, Pcr, PcrIndex, TrustAnchor, VerifiedAttestation, VerifyAt, verify_attestation,
};
use attestplane_verifier::handle::Jwks;
use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use ed25519_dalek::VerifyingKey;
use rand_core::{OsRng, RngCore as _};

use super::http::Api;
use super::pcrs::read_pcrs_file;
use super::{CliError, CliResult, ClientContext, now, read_file};
use crate::api::body::EnclaveAttestation;

/// How old the control plane's document may be (it was just made for our nonce).
pub const MAX_DOCUMENT_AGE_MS: u64 = 5 * 60 * 1000;

/// The largest root certificate file read.
const MAX_ROOT_LEN: u64 = 64 * 1024;

/// Standard base64 with or without padding.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// What the control plane must be.
#[derive(Debug, Clone)]
pub struct ControlPlaneTrust {
    /// The pinned root.
    pub anchor: TrustAnchor,
    /// Expected PCRs (empty: any image under the root).
    pub pcrs: BTreeMap<PcrIndex, Pcr>,
    /// Accept a debug-mode enclave.
    pub allow_debug: bool,
}

impl ControlPlaneTrust {
    /// The trust of `context`: `--root` (default AWS Nitro root G1), `--pcrs`, `allow_debug`.
    pub fn of(context: &ClientContext) -> CliResult<Self> {
        let anchor = match &context.root {
            None => TrustAnchor::aws_nitro_root_g1(),
            Some(path) => TrustAnchor::from_pem(&read_file(path, MAX_ROOT_LEN)?).map_err(|e| {
                CliError::Usage(format!(
                    "{}: not a usable root certificate: {e}",
                    path.display()
                ))
            })?,
        };
        let pcrs = match &context.pcrs {
            Some(path) => read_pcrs_file(path)?,
            None => BTreeMap::new(),
        };
        Ok(Self {
            anchor,
            pcrs,
            allow_debug: context.allow_debug,
        })
    }

    /// [`ControlPlaneTrust::of`], refusing a trust without expected PCRs: for what the CLI
    /// must not believe from an unknown image (admin acts, the deployment it pins).
    pub fn pinned(context: &ClientContext, what: &str) -> CliResult<Self> {
        let trust = Self::of(context)?;
        if trust.pcrs.is_empty() {
            return Err(CliError::Usage(format!(
                "{what} needs the control plane's expected PCRs: --pcrs FILE (or \
                 ATTESTPLANE_PCRS, or pcrs = in the [client] config)"
            )));
        }
        Ok(trust)
    }
}

/// The control plane as verified: its document and its attested epoch key.
#[derive(Debug)]
pub struct AttestedControlPlane {
    /// The verified attestation document.
    pub attestation: VerifiedAttestation,
    /// The JWKS holding the attested key alone.
    pub jwks: Jwks,
    /// The attested epoch key.
    pub key: VerifyingKey,
}

/// Verifies the control plane's document and returns it with the JWKS of its attested key.
pub fn verify_control_plane(
    document: &[u8],
    jwks_json: &[u8],
    trust: &ControlPlaneTrust,
    nonce: &[u8],
    at: UnixMillis,
) -> CliResult<AttestedControlPlane> {
    let expect = Expectations {
        pcrs: trust.pcrs.clone(),
        allow_debug: trust.allow_debug,
        nonce: Some(nonce.to_vec()),
        max_age_ms: Some(MAX_DOCUMENT_AGE_MS),
        ..Expectations::default()
    };
    let verified = verify_attestation(document, &trust.anchor, &expect, VerifyAt::Instant(at))
        .map_err(|e| {
            CliError::Failed(format!(
                "the control plane's attestation document did not verify: {e}"
            ))
        })?;
    let public_key = verified.public_key().ok_or_else(|| {
        CliError::Failed("the control plane's attestation document binds no public key".into())
    })?;
    let served = Jwks::parse(jwks_json)
        .map_err(|e| CliError::Failed(format!("the control plane's JWKS is invalid: {e}")))?;
    let mut kids = served.kids();
    let (Some(kid), None) = (kids.next(), kids.next()) else {
        return Err(CliError::Failed(format!(
            "the control plane's JWKS holds {} keys; want exactly the attested one",
            served.len()
        )));
    };
    let key = served
        .get(kid)
        .ok_or_else(|| CliError::Failed("the control plane's JWKS is inconsistent".into()))?;
    if key.as_bytes().as_slice() != public_key {
        return Err(CliError::Failed(format!(
            "the JWKS key {} is not the attested key {}",
            hex::encode(key.as_bytes()),
            hex::encode(public_key)
        )));
    }
    let key = *key;
    let jwks = Jwks::from_keys([(kid.to_owned(), key)])
        .map_err(|e| CliError::Failed(format!("the control plane's JWKS is invalid: {e}")))?;
    Ok(AttestedControlPlane {
        attestation: verified,
        jwks,
        key,
    })
}

/// Fetches the control plane's attestation document for a fresh random nonce and verifies it
/// now.
pub async fn attested_control_plane(
    api: &Api,
    trust: &ControlPlaneTrust,
) -> CliResult<AttestedControlPlane> {
    let mut nonce = [0u8; 32];
    OsRng
        .try_fill_bytes(&mut nonce)
        .map_err(|e| CliError::Io(format!("no randomness from the OS: {e}")))?;
    let answer: EnclaveAttestation = api
        .get_json(
            &["v1", "attestation"],
            &[("nonce", hex::encode(nonce))],
            None,
        )
        .await?;
    let document = BASE64
        .decode(answer.document.as_bytes())
        .map_err(|e| CliError::Failed(format!("the attestation document is not base64: {e}")))?;
    // The JWKS as an object (the API's shape) or as JSON text.
    let jwks_json = match answer.jwks {
        serde_json::Value::String(text) => text.into_bytes(),
        other => serde_json::to_vec(&other)
            .map_err(|e| CliError::Io(format!("cannot re-encode the JWKS: {e}")))?,
    };
    verify_control_plane(&document, &jwks_json, trust, &nonce, now())
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::SigningKey;

    use super::*;

    const MOCK_ROOT: &[u8] = include_bytes!("../../../verifier/testdata/mock/mock-root.pem");
    const MOCK_PROD: &[u8] = include_bytes!("../../../verifier/testdata/mock/mock-prod.cose");
    const MOCK_DEBUG: &[u8] = include_bytes!("../../../verifier/testdata/mock/mock-debug.cose");
    /// The fixtures' clock plus one second.
    const AT: UnixMillis = UnixMillis::from_millis(1_751_328_001_123);
    const NONCE: &str = "7479700772a78a88992e10d246c5a6b3586320224161745e54d28468a1e55222";
    const KEY: &str = "c819af6a4f7b27c1145b3cdb8618855cd49bb6a763b0b742bbd8d5f67c1dd8ca";
    const PCR0: &str = "9b8eb59648ccf149137f8041fd0024fa02d35dd33a80e5053535cf272753c17dcbed7673b8a9b7bc0aad2760e3ab4e87";

    fn trust() -> ControlPlaneTrust {
        ControlPlaneTrust {
            anchor: TrustAnchor::from_pem(MOCK_ROOT).unwrap(),
            pcrs: [(PcrIndex::IMAGE, Pcr::from_hex(PCR0).unwrap())].into(),
            allow_debug: false,
        }
    }

    fn jwks_with(key: &[u8]) -> Vec<u8> {
        let key = VerifyingKey::from_bytes(key.try_into().unwrap()).unwrap();
        Jwks::from_keys([("k", key)])
            .unwrap()
            .to_json()
            .into_bytes()
    }

    fn nonce() -> Vec<u8> {
        hex::decode(NONCE).unwrap()
    }

    #[test]
    fn accepts_the_attested_key_and_only_it() {
        let key = hex::decode(KEY).unwrap();
        let cp = verify_control_plane(MOCK_PROD, &jwks_with(&key), &trust(), &nonce(), AT).unwrap();
        assert_eq!(cp.attestation.public_key(), Some(key.as_slice()));
        assert_eq!(cp.key.as_bytes().as_slice(), key.as_slice());
        assert_eq!(
            cp.jwks.get("k").unwrap().as_bytes().as_slice(),
            key.as_slice()
        );

        let other = SigningKey::from_bytes(&[5; 32]).verifying_key();
        let e = verify_control_plane(
            MOCK_PROD,
            &jwks_with(other.as_bytes()),
            &trust(),
            &nonce(),
            AT,
        )
        .unwrap_err();
        assert!(e.to_string().contains("not the attested key"), "{e}");

        // The attested key plus another: refused (a host could slip its own key in).
        let two = Jwks::from_keys([
            (
                "k",
                VerifyingKey::from_bytes(&key.clone().try_into().unwrap()).unwrap(),
            ),
            ("evil", other),
        ])
        .unwrap()
        .to_json();
        assert!(verify_control_plane(MOCK_PROD, two.as_bytes(), &trust(), &nonce(), AT).is_err());
    }

    #[test]
    fn refuses_a_replayed_document_wrong_pcrs_debug_root_or_time() {
        let jwks = jwks_with(&hex::decode(KEY).unwrap());
        // Another nonce: a replayed document.
        assert!(verify_control_plane(MOCK_PROD, &jwks, &trust(), &[7; 32], AT).is_err());
        // Other expected PCR0.
        let mut t = trust();
        t.pcrs.insert(PcrIndex::IMAGE, Pcr::new([1; 48]));
        assert!(verify_control_plane(MOCK_PROD, &jwks, &t, &nonce(), AT).is_err());
        // Debug mode, unless allowed.
        let mut t = trust();
        t.pcrs.clear();
        assert!(verify_control_plane(MOCK_DEBUG, &jwks, &t, &nonce(), AT).is_err());
        t.allow_debug = true;
        assert!(verify_control_plane(MOCK_DEBUG, &jwks, &t, &nonce(), AT).is_ok());
        // The AWS root does not trust the mock.
        let mut t = trust();
        t.anchor = TrustAnchor::aws_nitro_root_g1();
        assert!(verify_control_plane(MOCK_PROD, &jwks, &t, &nonce(), AT).is_err());
        // Ten minutes later the document is too old.
        let later = AT.checked_add_millis(10 * 60 * 1000).unwrap();
        assert!(verify_control_plane(MOCK_PROD, &jwks, &trust(), &nonce(), later).is_err());
    }
}
