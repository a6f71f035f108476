//! Signed admin requests: built here, signed with the operator's admin key, posted to
//! `POST /v1/admin` as `{"request": "<base64>"}`. The proxy forwards the bytes untouched and the
//! enclave decides; a refusal is logged and comes back as `admin_refused` with its `seq`.
//!
//! Every request carries the current time and 16 random bytes from the operating system, so
//! the enclave can refuse a replay. Requests are built with the verifier's
//! [`attestplane_verifier::admin`] encoder, the one definition of their bytes.

use std::path::PathBuf;

use attestplane_verifier::UnixMillis;
use attestplane_verifier::admin::{
    AdminAction, AdminRequest, IdentityProviderSpec, SignedAdminRequest,
};
use attestplane_verifier::handle::{Jwks, MAX_JWKS_LEN};
use attestplane_verifier::policy;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use clap::Subcommand;
use ed25519_dalek::SigningKey;
use rand_core::{OsRng, RngCore as _};
use serde_json::json;

use super::http::Api;
use super::keys::{admin_key, read_secret_key};
use super::{CliError, CliResult, ClientContext, now, print_json, read_file};
use crate::api::body::{AdminAccepted, AdminSubmission};

/// The largest policy file read (the enclave bounds the whole request to about 1 MiB).
const MAX_POLICY_FILE_LEN: u64 = 512 * 1024;

/// The key id of the JWKS `idp set --key` builds, unless `--kid` says otherwise (the
/// development identity provider's, see `attestplane dev`).
pub const DEV_IDP_KID: &str = "dev";

/// `policy ...`.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Replace the Cedar policy set with a file's (validated by the enclave first).
    Set {
        /// The Cedar policy file.
        file: PathBuf,
    },
    /// Print the latest accepted policy, as recorded in the log the host serves (unverified:
    /// check the exported log with `attestplane-verify log`).
    Show,
}

/// `idp ...`.
#[derive(Debug, Subcommand)]
pub enum IdpCommand {
    /// Install (or replace) an identity provider whose EdDSA tokens identify agents.
    Set {
        /// Its issuer (`iss`); default: `idp_issuer` of the config.
        #[arg(long)]
        issuer: Option<String>,
        /// The audience (`aud`) its tokens must carry; default: `idp_audience` of the config.
        #[arg(long)]
        audience: Option<String>,
        /// Its JWKS (Ed25519 keys, JSON).
        #[arg(
            long,
            value_name = "FILE",
            required_unless_present = "key",
            conflicts_with = "key"
        )]
        jwks: Option<PathBuf>,
        /// Instead of --jwks: a JWKS of the public half of this secret key file.
        #[arg(long, value_name = "FILE")]
        key: Option<PathBuf>,
        /// The key id of the JWKS built from --key.
        #[arg(long, default_value = DEV_IDP_KID, requires = "key")]
        kid: String,
    },
    /// Remove an identity provider.
    Remove {
        /// Its issuer.
        #[arg(long)]
        issuer: String,
    },
}

/// Builds and signs an admin request at `time` with a fresh random nonce.
pub fn sign_admin(action: AdminAction, key: &SigningKey, time: UnixMillis) -> CliResult<Vec<u8>> {
    let mut nonce = [0u8; 16];
    OsRng
        .try_fill_bytes(&mut nonce)
        .map_err(|e| CliError::Io(anyhow::anyhow!("no randomness from the OS: {e}")))?;
    let bytes = AdminRequest {
        time,
        nonce,
        action,
    }
    .sign(&key.verifying_key(), key)
    .map_err(|e| CliError::Usage(format!("cannot build the admin request: {e}")))?;
    // Decode what we built with the enclave's own decoder: a value it would refuse as
    // malformed (an empty id, too many tools...) is refused here, before it reaches the log.
    SignedAdminRequest::decode(&bytes)
        .map_err(|e| CliError::Usage(format!("invalid admin request: {e}")))?;
    Ok(bytes)
}

/// Signs `action` now and posts it; prints the outcome.
pub async fn submit_admin(
    context: &ClientContext,
    key: &SigningKey,
    action: AdminAction,
) -> CliResult {
    let api = Api::new(&context.url)?;
    let kind = action.type_name();
    let subject = subject_of(&action);
    let bytes = sign_admin(action, key, now())?;
    let body = json!(AdminSubmission {
        request: STANDARD.encode(&bytes),
    });
    let answer: AdminAccepted = api.post_json(&["v1", "admin"], Some(&body), None).await?;
    if !answer.accepted {
        return Err(CliError::Failed(format!(
            "admin_refused: {kind} was not accepted (log entry {})",
            answer.seq
        )));
    }
    if context.json {
        print_json(
            &json!({ "accepted": true, "seq": answer.seq, "action": kind, "subject": subject }),
        )
    } else {
        match subject {
            Some(s) => outln!("accepted: {kind} {s} (log entry {})", answer.seq),
            None => outln!("accepted: {kind} (log entry {})", answer.seq),
        }
        Ok(())
    }
}

/// What an action is about, for output.
pub fn subject_of(action: &AdminAction) -> Option<String> {
    match action {
        AdminAction::RegisterServer(s) | AdminAction::UpdateServer(s) => Some(s.id.clone()),
        AdminAction::RevokeServer { id } => Some(id.clone()),
        AdminAction::SetIdentityProvider(p) => Some(p.issuer.clone()),
        AdminAction::RemoveIdentityProvider { issuer } => Some(issuer.clone()),
        AdminAction::RotateAdminKeys { keys } => Some(format!("{} keys", keys.len())),
        AdminAction::SetPolicy { text } => Some(format!("{} bytes", text.len())),
        AdminAction::AllowImage { pcrs } => pcrs
            .get(&attestplane_verifier::attestation::PcrIndex::IMAGE)
            .map(|p| format!("PCR0 {}", p.0.to_hex())),
        _ => None,
    }
}

/// Runs a `policy` command.
pub async fn run_policy(command: PolicyCommand, context: &ClientContext) -> CliResult {
    match command {
        PolicyCommand::Set { file } => {
            let text = String::from_utf8(read_file(&file, MAX_POLICY_FILE_LEN)?)
                .map_err(|_| CliError::Usage(format!("{}: not UTF-8 text", file.display())))?;
            // Refuse locally what the enclave would refuse (and log) anyway.
            policy::PolicyEngine::new(&text)
                .map_err(|e| CliError::Usage(format!("{}: {e}", file.display())))?;
            let key = admin_key(context)?;
            submit_admin(context, &key, AdminAction::SetPolicy { text }).await
        }
        PolicyCommand::Show => super::log::policy_show(context).await,
    }
}

/// Runs an `idp` command.
pub async fn run_idp(command: IdpCommand, context: &ClientContext) -> CliResult {
    let action = match command {
        IdpCommand::Set {
            issuer,
            audience,
            jwks,
            key,
            kid,
        } => {
            let issuer = issuer
                .or_else(|| context.idp_issuer.clone())
                .ok_or_else(|| CliError::Usage("give the identity provider's --issuer".into()))?;
            let audience = audience
                .or_else(|| context.idp_audience.clone())
                .ok_or_else(|| CliError::Usage("give the identity provider's --audience".into()))?;
            let jwks = match (jwks, key) {
                (Some(path), _) => {
                    let bytes = read_file(&path, MAX_JWKS_LEN as u64)?;
                    let parsed = Jwks::parse(&bytes)
                        .map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))?;
                    if parsed.is_empty() {
                        return Err(CliError::Usage(format!(
                            "{}: no Ed25519 signing key in the JWKS",
                            path.display()
                        )));
                    }
                    String::from_utf8(bytes)
                        .map_err(|_| CliError::Usage(format!("{}: not UTF-8", path.display())))?
                }
                (None, Some(path)) => jwks_of(&read_secret_key(&path)?, &kid)?,
                (None, None) => {
                    return Err(CliError::Usage("give --jwks FILE or --key FILE".into()));
                }
            };
            AdminAction::SetIdentityProvider(IdentityProviderSpec {
                issuer,
                audience,
                jwks,
            })
        }
        IdpCommand::Remove { issuer } => AdminAction::RemoveIdentityProvider { issuer },
    };
    let key = admin_key(context)?;
    submit_admin(context, &key, action).await
}

/// The JWKS (JSON text) of one signing key's public half.
pub fn jwks_of(key: &SigningKey, kid: &str) -> CliResult<String> {
    Jwks::from_keys([(kid, key.verifying_key())])
        .map(|j| j.to_json())
        .map_err(|e| CliError::Usage(format!("cannot build a JWKS with key id {kid:?}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::keys::generate;

    #[test]
    fn a_signed_request_verifies_with_the_verifier_and_only_under_its_key() {
        let key = generate().unwrap();
        let t = UnixMillis::from_millis(1_764_870_000_000);
        let action = AdminAction::RevokeServer {
            id: "weather".into(),
        };
        let bytes = sign_admin(action.clone(), &key, t).unwrap();
        let signed = SignedAdminRequest::decode(&bytes).unwrap();
        assert_eq!(
            signed.verify(&[key.verifying_key()]).unwrap(),
            key.verifying_key()
        );
        assert_eq!(signed.request().action, action);
        assert_eq!(signed.request().time, t);
        assert!(signed.is_fresh_at(t));
        let other = generate().unwrap();
        assert!(signed.verify(&[other.verifying_key()]).is_err());
    }

    #[test]
    fn nonces_are_fresh_per_request() {
        let key = generate().unwrap();
        let t = UnixMillis::from_millis(1);
        let nonce = |bytes: Vec<u8>| SignedAdminRequest::decode(&bytes).unwrap().request().nonce;
        let a = nonce(sign_admin(AdminAction::RevokeServer { id: "x".into() }, &key, t).unwrap());
        let b = nonce(sign_admin(AdminAction::RevokeServer { id: "x".into() }, &key, t).unwrap());
        assert_ne!(a, b);
        assert_ne!(a, [0; 16]);
    }

    #[test]
    fn an_invalid_action_is_refused_before_signing() {
        let key = generate().unwrap();
        let e = sign_admin(
            AdminAction::RevokeServer { id: String::new() },
            &key,
            UnixMillis::from_millis(1),
        );
        assert!(e.is_err());
    }

    #[test]
    fn jwks_of_a_key_file_names_its_public_half() {
        let key = generate().unwrap();
        let jwks = Jwks::parse(jwks_of(&key, "dev").unwrap().as_bytes()).unwrap();
        assert_eq!(jwks.get("dev"), Some(&key.verifying_key()));
        assert_eq!(jwks.len(), 1);
    }
}
