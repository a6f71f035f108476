//! `token mint`: agent tokens from the development identity provider of `attestplane dev`.
//!
//! The token is an EdDSA JWT (`{"alg":"EdDSA","typ":"JWT","kid":"dev"}`) with the claims the
//! enclave maps to an agent: `iss`, `aud`, `sub` (the agent), `user`, `tenant`, `roles`, `iat`,
//! `exp`. The enclave accepts it only because an admin installed this issuer and its JWKS (as
//! `attestplane dev` does); there is no bypass. This is not a production identity provider: it
//! has no key storage, no revocation and no user authentication.

use std::path::PathBuf;
use std::time::Duration;

use attestplane_verifier::UnixMillis;
use attestplane_verifier::handle::IdentityClaims;
use clap::Subcommand;
use ed25519_dalek::SigningKey;
use serde_json::json;

use super::admin::DEV_IDP_KID;
use super::keys::{read_secret_key, write_private};
use super::{CliError, CliResult, ClientContext, now, print_json};

/// The longest lifetime `token mint` grants.
pub const MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// `token ...`.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Mint an agent token signed by the development identity provider's key (idp_key of the
    /// config, or --idp-key). Development only.
    Mint {
        /// The agent (`sub`).
        #[arg(long, value_name = "AGENT")]
        sub: String,
        /// The user the agent acts for (default: the agent).
        #[arg(long)]
        user: Option<String>,
        /// The agent's tenant.
        #[arg(long)]
        tenant: String,
        /// A role (repeatable), e.g. `tool-user`.
        #[arg(long = "role", value_name = "ROLE")]
        roles: Vec<String>,
        /// Lifetime (at most a week).
        #[arg(long, value_name = "DURATION", default_value = "1h")]
        ttl: humantime::Duration,
        /// Write the token to this file (mode 0600) instead of stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// The identity provider's key file (default: idp_key of the config).
        #[arg(long, value_name = "FILE")]
        idp_key: Option<PathBuf>,
        /// Issuer (default: idp_issuer of the config).
        #[arg(long)]
        issuer: Option<String>,
        /// Audience (default: idp_audience of the config).
        #[arg(long)]
        audience: Option<String>,
        /// Key id in the token header.
        #[arg(long, default_value = DEV_IDP_KID)]
        kid: String,
    },
}

/// Checks and signs an agent token: `iat` given, the lifetime (`exp - iat`) positive and at
/// most [`MAX_TTL`], no empty claim, no empty kid.
pub fn mint(claims: &IdentityClaims, kid: &str, key: &SigningKey) -> CliResult<String> {
    let ttl = claims.iat.map_or(0, |iat| claims.exp.saturating_sub(iat));
    if ttl == 0 || ttl > MAX_TTL.as_secs() {
        return Err(CliError::Usage(format!(
            "the lifetime must be positive and at most {}",
            humantime::format_duration(MAX_TTL)
        )));
    }
    for (what, value) in [
        ("issuer", claims.iss.as_str()),
        ("audience", &claims.aud),
        ("agent", &claims.sub),
        ("user", claims.user.as_deref().unwrap_or("-")),
        ("tenant", &claims.tenant),
        ("kid", kid),
    ] {
        if value.is_empty() {
            return Err(CliError::Usage(format!("the {what} is empty")));
        }
    }
    claims
        .encode(kid, key)
        .map_err(|e| CliError::Usage(format!("cannot encode the token: {e}")))
}

/// Runs a `token` command.
pub fn run(command: TokenCommand, context: &ClientContext) -> CliResult {
    let TokenCommand::Mint {
        sub,
        user,
        tenant,
        roles,
        ttl,
        out,
        idp_key,
        issuer,
        audience,
        kid,
    } = command;
    let key_path = idp_key.or_else(|| context.idp_key.clone()).ok_or_else(|| {
        CliError::Usage(
            "token mint needs the development identity provider's key: --idp-key FILE or idp_key \
             in the [client] config (attestplane dev writes one)"
                .into(),
        )
    })?;
    let iat = now().as_secs();
    let ttl: Duration = ttl.into();
    let claims = IdentityClaims {
        iss: issuer
            .or_else(|| context.idp_issuer.clone())
            .ok_or_else(|| CliError::Usage("give --issuer (or idp_issuer in the config)".into()))?,
        aud: audience
            .or_else(|| context.idp_audience.clone())
            .ok_or_else(|| {
                CliError::Usage("give --audience (or idp_audience in the config)".into())
            })?,
        user: Some(user.unwrap_or_else(|| sub.clone())),
        sub,
        tenant,
        roles,
        iat: Some(iat),
        exp: iat.saturating_add(ttl.as_secs()),
    };
    let key = read_secret_key(&key_path)?;
    let token = mint(&claims, &kid, &key)?;
    let expires = claims.exp;
    match out {
        Some(path) => {
            write_private(&path, format!("{token}\n").as_bytes())?;
            if context.json {
                print_json(&json!({ "out": path.display().to_string(), "expires_at": expires }))
            } else {
                eprintln!(
                    "token for {} (tenant {}) written to {}, expires {}",
                    claims.sub,
                    claims.tenant,
                    path.display(),
                    super::rfc3339(UnixMillis::from_secs(expires))
                );
                Ok(())
            }
        }
        None if context.json => print_json(&json!({ "token": token, "expires_at": expires })),
        None => {
            outln!("{token}");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use attestplane_verifier::handle::{Jwks, verify_jws};

    use super::*;
    use crate::cli::keys::generate;

    fn claims() -> IdentityClaims {
        IdentityClaims {
            iss: "https://dev-idp.attestplane.local".into(),
            aud: "attestplane".into(),
            sub: "agent-7".into(),
            user: Some("alice".into()),
            tenant: "acme".into(),
            roles: vec!["tool-user".into()],
            iat: Some(1_764_870_000),
            exp: 1_764_873_600,
        }
    }

    #[test]
    fn a_minted_token_verifies_under_the_idp_jwks_with_the_claims_asked_for() {
        let key = generate().unwrap();
        let token = mint(&claims(), "dev", &key).unwrap();
        let jwks = Jwks::from_keys([("dev", key.verifying_key())]).unwrap();
        let (kid, c) = verify_jws(&token, &jwks).unwrap();
        assert_eq!(kid, "dev");
        assert_eq!(c["iss"], "https://dev-idp.attestplane.local");
        assert_eq!(c["aud"], "attestplane");
        assert_eq!(c["sub"], "agent-7");
        assert_eq!(c["user"], "alice");
        assert_eq!(c["tenant"], "acme");
        assert_eq!(c["roles"], json!(["tool-user"]));
        assert_eq!(c["iat"], 1_764_870_000);
        assert_eq!(c["exp"], 1_764_873_600);
        // Another key, or another kid, does not verify it.
        let other = Jwks::from_keys([("dev", generate().unwrap().verifying_key())]).unwrap();
        assert!(verify_jws(&token, &other).is_err());
        let renamed = Jwks::from_keys([("prod", key.verifying_key())]).unwrap();
        assert!(verify_jws(&token, &renamed).is_err());
    }

    #[test]
    fn refuses_empty_claims_and_unbounded_lifetimes() {
        let key = generate().unwrap();
        let mut c = claims();
        c.tenant = String::new();
        assert!(mint(&c, "dev", &key).is_err());
        let mut c = claims();
        c.user = Some(String::new());
        assert!(mint(&c, "dev", &key).is_err());
        let mut c = claims();
        let iat = c.iat.unwrap();
        c.exp = iat;
        assert!(mint(&c, "dev", &key).is_err());
        c.exp = iat - 1;
        assert!(mint(&c, "dev", &key).is_err());
        c.exp = iat + MAX_TTL.as_secs() + 1;
        assert!(mint(&c, "dev", &key).is_err());
        let mut c = claims();
        c.iat = None;
        assert!(mint(&c, "dev", &key).is_err());
        assert!(mint(&claims(), "", &key).is_err());
    }
}
