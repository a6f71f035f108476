//! `handle resolve SERVER_ID`: obtain a server handle and believe it only after checking it.
//!
//! The host is untrusted, so before printing a handle the CLI checks, at the current time:
//!
//! 1. the control plane's attestation document, fetched with a fresh random nonce
//!    (`GET /v1/attestation?nonce=`): chain to the pinned root (`--root`, default AWS Nitro root
//!    G1), signature, freshness, the nonce, the expected PCRs (`--pcrs`, when given), and no
//!    debug mode unless `allow_debug` is set;
//! 2. that the JWKS served with it holds exactly one key, the document's `public_key`: the
//!    attested epoch key (steps 1 and 2 are [`super::attest`]'s);
//! 3. the handle (`POST /v1/servers/{id}/handle`) against that key alone: EdDSA signature,
//!    `exp`/`nbf`/`iat`, `aud` = the server's resource URI (from `--audience` or the agent's
//!    server listing), `server` = the id asked for, `seq` = the log entry the host named.
//!
//! The issuer is not pinned: it is whatever the enclave was started with, and the signature by
//! the attested key is what makes the handle the control plane's. Without `--pcrs` any enclave
//! image under the root passes step 1, which the command says on stderr.

use std::path::PathBuf;

use attestplane_verifier::UnixMillis;
use attestplane_verifier::handle::{HandleExpectations, Jwks, VerifiedHandle, verify_handle};
use clap::Subcommand;
use serde_json::json;

use super::attest::{ControlPlaneTrust, attested_control_plane};
use super::http::Api;
use super::keys::write_private;
use super::servers::list;
use super::{CliError, CliResult, ClientContext, clean, now, print_json, read_bearer, rfc3339};
use crate::api::body::HandleIssued;

/// Clock skew allowed on the handle's times, in seconds.
pub const HANDLE_LEEWAY_SECS: u64 = 60;

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

/// Runs a `handle` command.
pub async fn run(command: HandleCommand, context: &ClientContext) -> CliResult {
    let HandleCommand::Resolve {
        server,
        audience,
        out,
    } = command;
    let bearer = read_bearer(context)?;
    let trust = ControlPlaneTrust::of(context)?;
    let api = Api::new(&context.url)?;

    // 1-2. The control plane, with our own nonce.
    let control = attested_control_plane(&api, &trust).await?;
    let (attestation, jwks) = (control.attestation, control.jwks);

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
    use ed25519_dalek::SigningKey;

    use super::*;

    /// The fixtures' clock plus one second.
    const AT: UnixMillis = UnixMillis::from_millis(1_751_328_001_123);

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
