//! Agent identity: the bearer JWT an agent presents, verified inside the enclave.
//!
//! The token must be an EdDSA (Ed25519) JWT from an identity provider an admin installed (its
//! issuer, audience and JWKS are part of the logged state). The issuer is read from the
//! unverified claims only to choose which provider's keys to check the signature with; nothing
//! else is believed before the signature verifies. Then `exp` is required, `nbf` and `iat` are
//! honoured, `aud` must name the provider's audience, and the claims map to the agent (`sub`),
//! its user (`user`, default `sub`), tenant (`tenant`, required) and roles (`roles`, optional).
//!
//! A development issuer for local use is an ordinary admin-installed provider: there is no
//! bypass. Tokens are secrets: they never appear in errors, logs or entries; only the verified
//! identity is logged.

use attestplane_verifier::UnixMillis;
use attestplane_verifier::entry::PrincipalRecord;
use attestplane_verifier::handle::{HandleError, verify_jws};
use attestplane_verifier::state::State;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::Value;
use thiserror::Error;

/// The longest bearer token accepted.
pub const MAX_BEARER_LEN: usize = 8 * 1024;

/// The most roles a token may carry.
pub const MAX_ROLES: usize = 64;

/// Clock skew allowed on `exp`, `nbf`, `iat`, in seconds.
pub const LEEWAY_SECS: u64 = 60;

/// Why a bearer token was refused. Messages never include the token.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// Not a JWT of the accepted shape.
    #[error("malformed bearer token: {0}")]
    Malformed(&'static str),
    /// No identity provider with this issuer is installed.
    #[error("unknown token issuer {0:?}")]
    UnknownIssuer(String),
    /// The signature or header did not verify.
    #[error("token rejected: {0}")]
    Rejected(String),
    /// A claim is missing, mistyped, or fails its check.
    #[error("token claim {claim}: {problem}")]
    Claim {
        /// The claim.
        claim: &'static str,
        /// What is wrong.
        problem: &'static str,
    },
}

impl From<HandleError> for IdentityError {
    fn from(e: HandleError) -> Self {
        IdentityError::Rejected(e.to_string())
    }
}

fn text(
    claims: &serde_json::Map<String, Value>,
    claim: &'static str,
) -> Result<Option<String>, IdentityError> {
    match claims.get(claim) {
        None => Ok(None),
        Some(Value::String(s)) if !s.is_empty() && s.len() <= 256 => Ok(Some(s.clone())),
        Some(_) => Err(IdentityError::Claim {
            claim,
            problem: "must be a non-empty string of at most 256 bytes",
        }),
    }
}

fn secs(
    claims: &serde_json::Map<String, Value>,
    claim: &'static str,
) -> Result<Option<u64>, IdentityError> {
    match claims.get(claim) {
        None => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or(IdentityError::Claim {
            claim,
            problem: "must be a non-negative integer (seconds)",
        }),
    }
}

/// Verifies `bearer` against the identity providers in `state` at `now`.
pub fn authenticate(
    state: &State,
    bearer: &str,
    now: UnixMillis,
) -> Result<PrincipalRecord, IdentityError> {
    if bearer.len() > MAX_BEARER_LEN {
        return Err(IdentityError::Malformed("token too long"));
    }
    // Choose the provider by the (unverified) issuer.
    let payload = bearer
        .split('.')
        .nth(1)
        .ok_or(IdentityError::Malformed("not a JWS compact token"))?;
    let raw = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| IdentityError::Malformed("claims are not base64url"))?;
    let unverified: serde_json::Map<String, Value> = serde_json::from_slice(&raw)
        .map_err(|_| IdentityError::Malformed("claims are not a JSON object"))?;
    let issuer = match unverified.get("iss") {
        Some(Value::String(s)) => s.clone(),
        _ => return Err(IdentityError::Malformed("no iss claim")),
    };
    let (provider, jwks) = state
        .identity_provider(&issuer)
        .ok_or_else(|| IdentityError::UnknownIssuer(issuer.clone()))?;

    let (_kid, claims) = verify_jws(bearer, jwks)?;

    // From here on the claims are the provider's.
    if text(&claims, "iss")?.as_deref() != Some(provider.issuer.as_str()) {
        return Err(IdentityError::Claim {
            claim: "iss",
            problem: "does not match the provider",
        });
    }
    let aud_ok = match claims.get("aud") {
        Some(Value::String(a)) => *a == provider.audience,
        Some(Value::Array(items)) => items
            .iter()
            .any(|a| a.as_str() == Some(provider.audience.as_str())),
        _ => false,
    };
    if !aud_ok {
        return Err(IdentityError::Claim {
            claim: "aud",
            problem: "does not name this control plane",
        });
    }
    let now_s = now.as_secs();
    let exp = secs(&claims, "exp")?.ok_or(IdentityError::Claim {
        claim: "exp",
        problem: "is required",
    })?;
    if now_s >= exp.saturating_add(LEEWAY_SECS) {
        return Err(IdentityError::Claim {
            claim: "exp",
            problem: "token has expired",
        });
    }
    if let Some(nbf) = secs(&claims, "nbf")?
        && now_s.saturating_add(LEEWAY_SECS) < nbf
    {
        return Err(IdentityError::Claim {
            claim: "nbf",
            problem: "token is not yet valid",
        });
    }
    if let Some(iat) = secs(&claims, "iat")?
        && iat > now_s.saturating_add(LEEWAY_SECS)
    {
        return Err(IdentityError::Claim {
            claim: "iat",
            problem: "token was issued in the future",
        });
    }
    let agent = text(&claims, "sub")?.ok_or(IdentityError::Claim {
        claim: "sub",
        problem: "is required",
    })?;
    let tenant = text(&claims, "tenant")?.ok_or(IdentityError::Claim {
        claim: "tenant",
        problem: "is required",
    })?;
    let user = text(&claims, "user")?.unwrap_or_else(|| agent.clone());
    let roles = match claims.get("roles") {
        None => Vec::new(),
        Some(Value::Array(items)) if items.len() <= MAX_ROLES => items
            .iter()
            .map(|r| match r {
                Value::String(s) if !s.is_empty() && s.len() <= 256 => Some(s.clone()),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()
            .ok_or(IdentityError::Claim {
                claim: "roles",
                problem: "must be an array of non-empty strings",
            })?,
        Some(_) => {
            return Err(IdentityError::Claim {
                claim: "roles",
                problem: "must be an array of at most 64 strings",
            });
        }
    };
    let mut roles = roles;
    roles.sort();
    roles.dedup();
    Ok(PrincipalRecord {
        agent,
        user,
        tenant,
        roles,
        issuer,
    })
}
