//! `handle resolve SERVER_ID`: obtain a server handle and believe it only after checking it.
//!
//! The host is untrusted, so before printing a handle the CLI checks, at the current time:
//!
//! 1. the control plane's attestation document, fetched with a fresh random nonce
//!    (`GET /v1/attestation?nonce=`): chain to the pinned root (`--root`, default AWS Nitro root
//!    G1), signature, freshness, the nonce, the expected PCRs (`--pcrs`, when given), and no
//!    debug mode unless `allow_debug` is set;
//! 2. that the JWKS served with it holds exactly one key, the document's `public_key`: the
//!    attested epoch key;
//! 3. the handle (`POST /v1/servers/{id}/handle`) against that key alone: EdDSA signature,
//!    `exp`/`nbf`/`iat`, `aud` = the server's resource URI (from `--audience` or the agent's
//!    server listing), `server` = the id asked for, `seq` = the log entry the host named.
//!
//! The issuer is not pinned: it is whatever the enclave was started with, and the signature by
//! the attested key is what makes the handle the control plane's. Without `--pcrs` any enclave
//! image under the root passes step 1, which the command says on stderr.

use std::collections::BTreeMap;
use std::path::PathBuf;

use attestplane_verifier::UnixMillis;
use attestplane_verifier::attestation::{
    Expectations, Pcr, PcrIndex, TrustAnchor, VerifiedAttestation, VerifyAt, verify_attestation,
};
use attestplane_verifier::handle::{HandleExpectations, Jwks, VerifiedHandle, verify_handle};
use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use clap::Subcommand;
use rand_core::{OsRng, RngCore as _};
use serde_json::json;

use super::http::Api;
use super::keys::write_private;
use super::pcrs::read_pcrs_file;
use super::servers::list;
use super::{
    CliError, CliResult, ClientContext, clean, now, print_json, read_bearer, read_file, rfc3339,
};
use crate::api::body::{EnclaveAttestation, HandleIssued};

/// How old the control plane's document may be (it was just made for our nonce).
pub const MAX_DOCUMENT_AGE_MS: u64 = 5 * 60 * 1000;

/// Clock skew allowed on the handle's times, in seconds.
pub const HANDLE_LEEWAY_SECS: u64 = 60;

/// The largest root certificate file read.
const MAX_ROOT_LEN: u64 = 64 * 1024;

/// Standard base64 with or without padding.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// `handle ...`.
#[derive(Debug, Subcommand)]
pub enum HandleCommand {
    /// Resolve a handle for a server with the agent's token (--token), verify the control
    /// plane's attestation (--root, --pcrs) and the handle, then print it (stdout; the checks
    /// on stderr).
    Resolve {
        /// The server's id.
        server: String,
        /// The handle's required `aud` (default: the server's resource URI from the agent's
        /// server listing).
        #[arg(long, value_name = "URI")]
        audience: Option<String>,
        /// Write the handle to this file (mode 0600) instead of stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

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

/// Verifies the control plane's document and returns it with the JWKS of its attested key.
pub fn verify_control_plane(
    document: &[u8],
    jwks_json: &[u8],
    trust: &ControlPlaneTrust,
    nonce: &[u8],
    at: UnixMillis,
) -> CliResult<(VerifiedAttestation, Jwks)> {
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
    let attested = Jwks::from_keys([(kid.to_owned(), *key)])
        .map_err(|e| CliError::Failed(format!("the control plane's JWKS is invalid: {e}")))?;
    Ok((verified, attested))
}

/// Verifies a handle the host returned for `server` (issued by log entry `seq`) against the
/// attested JWKS.
pub fn verify_resolved(
    token: &str,
    jwks: &Jwks,
    server: &str,
    audience: Option<&str>,
    seq: u64,
    at: UnixMillis,
) -> CliResult<VerifiedHandle> {
    let expect = HandleExpectations {
        issuer: None,
        audience: audience.map(str::to_owned),
        leeway_secs: HANDLE_LEEWAY_SECS,
    };
    let verified = verify_handle(token, jwks, &expect, at)
        .map_err(|e| CliError::Failed(format!("the handle did not verify: {e}")))?;
    let claims = verified.claims();
    if claims.server != server {
        return Err(CliError::Failed(format!(
            "the handle is for server {:?}, not {server:?}",
            clean(&claims.server)
        )));
    }
    if claims.seq != seq {
        return Err(CliError::Failed(format!(
            "the handle names log entry {}, the host said {seq}",
            claims.seq
        )));
    }
    Ok(verified)
}

/// What the control plane must be, from the client's settings.
pub(crate) fn trust(context: &ClientContext) -> CliResult<ControlPlaneTrust> {
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
    Ok(ControlPlaneTrust {
        anchor,
        pcrs,
        allow_debug: context.allow_debug,
    })
}

/// Fetches the control plane's attestation document and JWKS with a fresh nonce of ours and
/// verifies them ([`verify_control_plane`]).
pub(crate) async fn attested_control_plane(
    api: &Api,
    trust: &ControlPlaneTrust,
) -> CliResult<(VerifiedAttestation, Jwks)> {
    let mut nonce = [0u8; 32];
    OsRng
        .try_fill_bytes(&mut nonce)
        .map_err(|e| CliError::Io(anyhow::anyhow!("no randomness from the OS: {e}")))?;
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
            .map_err(|e| CliError::Io(anyhow::anyhow!("cannot re-encode the JWKS: {e}")))?,
    };
    verify_control_plane(&document, &jwks_json, trust, &nonce, now())
}

/// Runs a `handle` command.
pub async fn run(command: HandleCommand, context: &ClientContext) -> CliResult {
    let HandleCommand::Resolve {
        server,
        audience,
        out,
    } = command;
    let bearer = read_bearer(context)?;
    let trust = trust(context)?;
    let api = Api::new(&context.url)?;

    // 1-2. The control plane, with our own nonce.
    let (attestation, jwks) = attested_control_plane(&api, &trust).await?;

    // 3. The audience, then the handle. Given with --audience, it is the caller's own
    // expectation; otherwise it comes from the host's server listing, which nothing signs.
    let audience_pinned = audience.is_some();
    let audience = match audience {
        Some(a) => Some(a),
        None => match list(&api, &bearer).await {
            Ok(listing) => listing
                .servers
                .into_iter()
                .find(|s| s.id == server)
                .map(|s| s.resource),
            Err(e) => {
                eprintln!("warning: cannot list servers to learn {server}'s resource URI: {e}");
                None
            }
        },
    };
    let answer: HandleIssued = api
        .post_json(&["v1", "servers", &server, "handle"], None, Some(&bearer))
        .await?;
    let handle = verify_resolved(
        &answer.token,
        &jwks,
        &server,
        audience.as_deref(),
        answer.seq,
        now(),
    )?;

    // Output.
    if audience.is_none() {
        eprintln!(
            "warning: {server}'s resource URI is unknown (not in the agent's listing); the \
             handle's audience was not checked (give --audience URI)"
        );
    }
    let claims = handle.claims();
    let pcrs: serde_json::Map<String, serde_json::Value> = attestation
        .pcrs()
        .iter()
        .filter(|(i, _)| trust.pcrs.contains_key(*i) || i.get() <= 2)
        .map(|(i, p)| (format!("PCR{i}"), p.to_hex().into()))
        .collect();
    let control_plane = json!({
        "module_id": attestation.module_id(),
        "timestamp": rfc3339(attestation.timestamp()),
        "debug": attestation.is_debug(),
        "root_fingerprint": hex::encode(attestation.root_fingerprint()),
        "pcrs_checked": !trust.pcrs.is_empty(),
        "pcrs": pcrs,
        "kid": handle.kid(),
    });
    if let Some(path) = &out {
        write_private(path, format!("{}\n", answer.token).as_bytes())?;
    }
    if context.json {
        let mut doc = json!({
            "verified": true,
            "server": claims.server,
            "seq": claims.seq,
            "claims": claims,
            "audience_checked": audience.is_some(),
            "audience_source": match (audience_pinned, audience.is_some()) {
                (true, _) => "--audience",
                (false, true) => "the host's server listing (not signed)",
                (false, false) => "none",
            },
            "control_plane": control_plane,
        });
        if out.is_none()
            && let Some(o) = doc.as_object_mut()
        {
            o.insert("handle".into(), answer.token.clone().into());
        }
        return print_json(&doc);
    }
    if trust.pcrs.is_empty() {
        eprintln!(
            "warning: no expected PCRs (--pcrs): any enclave image under the root is accepted"
        );
    }
    eprintln!(
        "verified control plane: module {}, root {}, PCRs {}, epoch key {}",
        clean(attestation.module_id()),
        hex::encode(attestation.root_fingerprint()),
        if trust.pcrs.is_empty() {
            "not checked".to_owned()
        } else {
            format!("{} checked", trust.pcrs.len())
        },
        clean(handle.kid()),
    );
    eprintln!(
        "verified handle: server {}, aud {}{}, sub {}, tools [{}], log entry {}, expires {}",
        clean(&claims.server),
        clean(&claims.aud),
        if audience.is_some() {
            ""
        } else {
            " (unchecked)"
        },
        clean(&claims.sub),
        claims
            .tools
            .iter()
            .map(|t| clean(t))
            .collect::<Vec<_>>()
            .join(", "),
        claims.seq,
        rfc3339(UnixMillis::from_secs(claims.exp)),
    );
    match &out {
        Some(path) => eprintln!("handle written to {}", path.display()),
        None => outln!("{}", answer.token),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use attestplane_verifier::handle::{HandleClaims, encode_handle};
    use ed25519_dalek::{SigningKey, VerifyingKey};

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
        let (v, jwks) =
            verify_control_plane(MOCK_PROD, &jwks_with(&key), &trust(), &nonce(), AT).unwrap();
        assert_eq!(v.public_key(), Some(key.as_slice()));
        assert_eq!(jwks.get("k").unwrap().as_bytes().as_slice(), key.as_slice());

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

    fn handle(key: &SigningKey, server: &str, aud: &str, seq: u64) -> String {
        let claims = HandleClaims {
            iss: "https://control.attestplane.test".into(),
            sub: "agent-7".into(),
            aud: aud.into(),
            exp: AT.as_secs() + 300,
            iat: AT.as_secs(),
            nbf: None,
            jti: "j1".into(),
            tenant: "acme".into(),
            tools: vec!["forecast".into()],
            measurement: "ab".repeat(48),
            seq,
            server: server.into(),
        };
        encode_handle(&claims, "k", key).unwrap()
    }

    #[test]
    fn a_handle_must_be_signed_by_the_attested_key_for_the_server_asked() {
        let epoch = SigningKey::from_bytes(&[1; 32]);
        let jwks = Jwks::from_keys([("k", epoch.verifying_key())]).unwrap();
        let aud = "https://weather.acme.example/mcp";
        let good = handle(&epoch, "weather", aud, 11);
        assert!(verify_resolved(&good, &jwks, "weather", Some(aud), 11, AT).is_ok());
        assert!(verify_resolved(&good, &jwks, "weather", None, 11, AT).is_ok());
        // Another audience, server or seq than the host claimed.
        assert!(verify_resolved(&good, &jwks, "weather", Some("https://x/mcp"), 11, AT).is_err());
        assert!(verify_resolved(&good, &jwks, "calendar", Some(aud), 11, AT).is_err());
        assert!(verify_resolved(&good, &jwks, "weather", Some(aud), 12, AT).is_err());
        // Signed by a key that is not the attested one (the host's own, say).
        let host = SigningKey::from_bytes(&[2; 32]);
        let forged = handle(&host, "weather", aud, 11);
        assert!(verify_resolved(&forged, &jwks, "weather", Some(aud), 11, AT).is_err());
        // Expired.
        let later = AT.checked_add_millis(3600 * 1000).unwrap();
        assert!(verify_resolved(&good, &jwks, "weather", Some(aud), 11, later).is_err());
    }
}
