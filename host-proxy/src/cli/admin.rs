//! The admin commands for the policy and the identity providers: `policy set|show`,
//! `idp set|remove`. Requests are signed, submitted and confirmed by [`super::submit`] (as for
//! `servers register|update|revoke` and `keys rotate`).
//!
//! `policy show` prints the latest accepted `set_policy` of the log the host serves; it decodes
//! entries with the verifier's decoder but verifies nothing (no signature, no hash link): check
//! the exported log with `attestplane-verify log`.

use std::path::PathBuf;

use attestplane_verifier::UnixMillis;
use attestplane_verifier::admin::{AdminAction, IdentityProviderSpec, SignedAdminRequest};
use attestplane_verifier::entry::{Entry, Event, SignedEntry};
use attestplane_verifier::handle::{Jwks, MAX_JWKS_LEN};
use attestplane_verifier::policy;
use clap::Subcommand;
use ed25519_dalek::SigningKey;
use serde_json::json;

use super::http::Api;
use super::keys::{admin_key, read_secret_key};
use super::log::{PAGE, fetch, head};
use super::submit::submit_admin;
use super::{CliError, CliResult, ClientContext, clean, print_json, read_file, rfc3339};

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
        PolicyCommand::Show => policy_show(context).await,
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

/// `policy show`: the latest accepted `set_policy` of the log the host serves.
pub async fn policy_show(context: &ClientContext) -> CliResult {
    let api = Api::new(&context.url)?;
    let size = head(&api).await?;
    let mut latest: Option<(u64, UnixMillis, String)> = None;
    let mut next = 0u64;
    while next < size {
        let end = size.min(next.saturating_add(PAGE));
        let entries = fetch(&api, next, end).await?;
        for bytes in &entries {
            if let Some((seq, time, text)) = accepted_policy(bytes) {
                latest = Some((seq, time, text));
            }
        }
        next = next.saturating_add(entries.len() as u64);
    }
    let Some((seq, time, text)) = latest else {
        return Err(CliError::Failed(format!(
            "no accepted policy in the {size} entries of the log"
        )));
    };
    if context.json {
        print_json(&json!({ "seq": seq, "time": rfc3339(time), "text": text }))
    } else {
        eprintln!(
            "policy installed by log entry {seq} at {} (as served by the host; verify the log \
             with attestplane-verify)",
            rfc3339(time)
        );
        // Served by the host: no terminal escapes reach the terminal (newlines and tabs kept).
        let text: String = text
            .split('\n')
            .map(|line| line.split('\t').map(clean).collect::<Vec<_>>().join("\t"))
            .collect::<Vec<_>>()
            .join("\n");
        super::write_out(format_args!("{text}"))?;
        if !text.ends_with('\n') {
            outln!("");
        }
        Ok(())
    }
}

/// The policy text of an entry recording an accepted `set_policy`.
fn accepted_policy(bytes: &[u8]) -> Option<(u64, UnixMillis, String)> {
    let Entry {
        seq, time, event, ..
    } = SignedEntry::decode(bytes).ok()?.into_entry();
    let Event::Admin {
        request,
        accepted: true,
        ..
    } = event
    else {
        return None;
    };
    let request = SignedAdminRequest::decode(&request).ok()?;
    match &request.request().action {
        AdminAction::SetPolicy { text } => Some((seq, time, text.clone())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::keys::generate;
    use crate::cli::log::summary;
    use crate::cli::submit::sign_admin;
    use crate::cli::testing::{deployment, signed_entry as entry};

    #[test]
    fn policy_show_takes_accepted_set_policy_only() {
        let enclave = SigningKey::from_bytes(&[3; 32]);
        let admin = SigningKey::from_bytes(&[4; 32]);
        let t = UnixMillis::from_millis(1);
        let set = |text: &str| {
            sign_admin(
                AdminAction::SetPolicy { text: text.into() },
                &admin,
                &deployment(),
                t,
            )
            .unwrap()
        };
        let accepted = entry(
            5,
            Event::Admin {
                request: set("permit(principal, action, resource);"),
                accepted: true,
                reason: None,
            },
            &enclave,
        );
        let refused = entry(
            6,
            Event::Admin {
                request: set("forbid"),
                accepted: false,
                reason: Some(attestplane_verifier::reason::Reason::InvalidPolicy),
            },
            &enclave,
        );
        let revoke = entry(
            7,
            Event::Admin {
                request: sign_admin(
                    AdminAction::RevokeServer { id: "x".into() },
                    &admin,
                    &deployment(),
                    t,
                )
                .unwrap(),
                accepted: true,
                reason: None,
            },
            &enclave,
        );
        assert_eq!(
            accepted_policy(&accepted).unwrap().2,
            "permit(principal, action, resource);"
        );
        assert_eq!(accepted_policy(&accepted).unwrap().0, 5);
        assert!(accepted_policy(&refused).is_none());
        assert!(accepted_policy(&revoke).is_none());
        assert!(
            summary(&SignedEntry::decode(&refused).unwrap().into_entry().event)
                .starts_with("REFUSED set_policy")
        );
    }

    #[test]
    fn jwks_of_a_key_file_names_its_public_half() {
        let key = generate().unwrap();
        let jwks = Jwks::parse(jwks_of(&key, "dev").unwrap().as_bytes()).unwrap();
        assert_eq!(jwks.get("dev"), Some(&key.verifying_key()));
        assert_eq!(jwks.len(), 1);
    }
}
