//! Server handles: JWTs (JWS compact serialisation, `alg` EdDSA over Ed25519) signed by the
//! enclave's epoch key.
//!
//! A handle tells an MCP server, and any OAuth/JWT middleware in front of it, that the control
//! plane let agent `sub` use the tools `tools` of the server at resource URI `aud` until `exp`,
//! after verifying that the server runs the measurement whose digest is `measurement`; `seq` is
//! the log entry that issued it, so every handle can be traced to the audit log. The host serves
//! the epoch keys as a JWKS ([`Jwks`]) next to the enclave's attestation document.
//!
//! Encoding is by hand (serde_json, base64url without padding, ed25519-dalek) to keep the
//! accepted language small:
//!
//! - The header is exactly `{"alg":"EdDSA","typ":"JWT","kid":…}` when we write it. When we read
//!   one, `alg` must be `EdDSA` (so `none`, `HS256`, `RS256`… are refused before any key is
//!   looked at), `kid` must name a key of the JWKS, `typ` if present must be `JWT`, and a `crit`
//!   header is refused since we understand no extension. Other header fields (`jku`, `x5u`,
//!   `jwk`…) are ignored: keys come only from the JWKS the caller trusts.
//! - Header and claims must be JSON objects without duplicate member names (serde_json would
//!   silently keep the last one, and another parser the first).
//! - The typed claims ([`HandleClaims`]) must be well typed; extra claims are allowed and
//!   ignored, as middleware ignores them. `aud` is a single string, not an array.
//! - Base64url is decoded canonically (no padding, no stray bits), so every token has exactly
//!   one encoding and any byte changed in a token is rejected.
//! - The signature is checked before the claims are parsed, by the one rule set of
//!   [`crate::eddsa`] (cofactored, as ZIP 215 defines it; canonical `s`), the same rules as
//!   log entries and checkpoints. A JWKS key must be canonical and of prime order: a set with
//!   any other Ed25519 key is refused when it is built.
//! - Time is a parameter: `exp`, `nbf` and `iat` (seconds) are compared with the caller's
//!   [`UnixMillis`] allowing `leeway_secs` either way; a handle issued in the future beyond the
//!   leeway is refused.
//!
//! ## Trust assumptions
//!
//! The token is hostile. The JWKS and the expectations are trusted: the caller has checked
//! that the keys are the attested epoch keys of the enclave.
//!
//! ## What this module deliberately does not do
//!
//! - It fetches nothing (no `jku`/`x5u`), and supports no algorithm but EdDSA over Ed25519.
//! - It does not track `jti` for replay; handles are bearer tokens bounded by `exp`.
//! - It does not check that `seq` is in the log, or `measurement` against a registration; the
//!   log verifier does that.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::{Signature, Signer, VerifyingKey};
use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};
use thiserror::Error;

use crate::eddsa::PublicKey;
use crate::time::UnixMillis;

/// The longest token accepted or produced, in bytes (a common HTTP header line limit).
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// The longest JWKS document accepted, in bytes.
pub const MAX_JWKS_LEN: usize = 64 * 1024;

/// The most keys a JWKS may list.
pub const MAX_JWKS_KEYS: usize = 64;

/// The longest key ID accepted or produced, in bytes.
pub const MAX_KID_LEN: usize = 128;

/// The only JWS algorithm accepted.
pub const ALGORITHM: &str = "EdDSA";

/// The number of hex digits of a SHA-384 digest (`measurement`).
const MEASUREMENT_HEX_LEN: usize = 96;

/// Errors of handle encoding, JWKS parsing and handle verification.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum HandleError {
    /// The token is longer than [`MAX_TOKEN_LEN`] (or a JWKS than [`MAX_JWKS_LEN`]).
    #[error("input is {len} bytes, more than the limit of {max}")]
    TooLong {
        /// The input's length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The token does not have exactly three dot-separated segments.
    #[error("token has {found} segments, expected 3")]
    SegmentCount {
        /// The number of segments found.
        found: usize,
    },
    /// The token is not well formed.
    #[error("malformed token: {reason}")]
    Malformed {
        /// What is wrong.
        reason: &'static str,
    },
    /// A JSON object in the token has a member name twice.
    #[error("duplicate member {key:?} in the token's {part}")]
    DuplicateKey {
        /// `header` or `claims`.
        part: &'static str,
        /// The repeated name.
        key: String,
    },
    /// The header's `alg` is not `EdDSA`.
    #[error("algorithm {alg:?} is not accepted (only EdDSA)")]
    BadAlgorithm {
        /// The algorithm named.
        alg: String,
    },
    /// The header has a `crit` member; no extension is understood.
    #[error("token has critical header extensions")]
    CriticalHeader,
    /// The header has no `kid`.
    #[error("token header has no key id")]
    MissingKid,
    /// The `kid` names no key of the JWKS.
    #[error("unknown key id {kid:?}")]
    UnknownKid {
        /// The key ID named.
        kid: String,
    },
    /// The signature does not verify under the key named.
    #[error("signature does not verify under key {kid:?}")]
    BadSignature {
        /// The key ID used.
        kid: String,
    },
    /// The claims are not the handle claims (missing, mistyped or malformed).
    #[error("invalid claims: {reason}")]
    InvalidClaims {
        /// What is wrong, as the JSON decoder says it.
        reason: String,
    },
    /// A claim has the right type but a bad value.
    #[error("invalid claim {claim}: {reason}")]
    InvalidClaim {
        /// The claim's name.
        claim: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
    /// The handle has expired.
    #[error("handle expired at {exp} (unix seconds); checked at {at}")]
    Expired {
        /// The instant of the check.
        at: UnixMillis,
        /// The `exp` claim, in seconds.
        exp: u64,
    },
    /// The handle is not valid yet.
    #[error("handle is not valid before {nbf} (unix seconds); checked at {at}")]
    NotYetValid {
        /// The instant of the check.
        at: UnixMillis,
        /// The `nbf` claim, in seconds.
        nbf: u64,
    },
    /// The handle says it was issued in the future.
    #[error("handle issued at {iat} (unix seconds), after the check at {at}")]
    IssuedInFuture {
        /// The instant of the check.
        at: UnixMillis,
        /// The `iat` claim, in seconds.
        iat: u64,
    },
    /// The issuer is not the one expected.
    #[error("issuer is {found:?}, expected {expected:?}")]
    WrongIssuer {
        /// The issuer expected.
        expected: String,
        /// The issuer in the handle.
        found: String,
    },
    /// The audience is not the one expected.
    #[error("audience is {found:?}, expected {expected:?}")]
    WrongAudience {
        /// The audience expected.
        expected: String,
        /// The audience in the handle.
        found: String,
    },
    /// A JWKS is not well formed.
    #[error("bad jwks: {reason}")]
    BadJwks {
        /// What is wrong.
        reason: &'static str,
    },
    /// A JWKS lists two keys with the same key ID.
    #[error("jwks has key id {kid:?} twice")]
    DuplicateKid {
        /// The repeated key ID.
        kid: String,
    },
    /// A key ID is empty or longer than [`MAX_KID_LEN`].
    #[error("invalid key id")]
    InvalidKid,
    /// The signer failed.
    #[error("signing failed")]
    Signing,
}

/// The claims of a server handle.
///
/// Serialised in this field order; `nbf` is omitted when `None`. Extra claims in a token are
/// ignored when verifying.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandleClaims {
    /// Issuer: the control plane.
    pub iss: String,
    /// Subject: the agent's ID.
    pub sub: String,
    /// Audience: the MCP server's resource URI.
    pub aud: String,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    /// Issued at, seconds since the epoch.
    pub iat: u64,
    /// Not before, seconds since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Unique token ID.
    pub jti: String,
    /// The agent's tenant.
    pub tenant: String,
    /// The tools the handle allows.
    pub tools: Vec<String>,
    /// Lower-case hex of the SHA-384 digest of the server's verified PCRs (96 digits).
    pub measurement: String,
    /// Sequence number of the log entry that issued the handle.
    pub seq: u64,
    /// The server's ID in the registry.
    pub server: String,
}

impl HandleClaims {
    /// Checks the values the types do not: non-empty identifiers, the measurement's form, and
    /// `exp` after `iat`.
    fn check(&self) -> Result<(), HandleError> {
        let bad = |claim, reason| Err(HandleError::InvalidClaim { claim, reason });
        for (claim, value) in [
            ("iss", &self.iss),
            ("sub", &self.sub),
            ("aud", &self.aud),
            ("jti", &self.jti),
            ("tenant", &self.tenant),
            ("server", &self.server),
        ] {
            if value.is_empty() {
                return bad(claim, "empty");
            }
        }
        if self.tools.iter().any(String::is_empty) {
            return bad("tools", "empty tool name");
        }
        if self.measurement.len() != MEASUREMENT_HEX_LEN
            || !self
                .measurement
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return bad("measurement", "not 96 lower-case hex digits");
        }
        if self.exp <= self.iat {
            return bad("exp", "not after iat");
        }
        Ok(())
    }
}

fn check_kid(kid: &str) -> Result<(), HandleError> {
    if kid.is_empty() || kid.len() > MAX_KID_LEN {
        return Err(HandleError::InvalidKid);
    }
    Ok(())
}

#[derive(Serialize)]
struct HeaderOut<'a> {
    alg: &'a str,
    typ: &'a str,
    kid: &'a str,
}

/// A JWT of type `JWT` ([`encode_jws_typed`]). Handles ([`encode_handle`]) and agent identity
/// tokens ([`IdentityClaims::encode`]) are made with it.
pub fn encode_jws<C, S>(claims: &C, kid: &str, signer: &S) -> Result<String, HandleError>
where
    C: Serialize + ?Sized,
    S: Signer<Signature>,
{
    encode_jws_typed(claims, "JWT", kid, signer)
}

/// The one JWT encoder of the project: `claims` (any JSON object, in its serialisation order)
/// signed with EdDSA under `kid`, as `base64url(header).base64url(claims).base64url(signature)`
/// with the header `{"alg":"EdDSA","typ":typ,"kid":…}`. [`encode_jws`] makes the `JWT`-typed
/// handles and identity tokens; the gateway's receipts
/// ([`crate::gateway::receipt::encode_receipt`]) carry their own `typ`, so that one kind of
/// token is never taken for another.
pub fn encode_jws_typed<C, S>(
    claims: &C,
    typ: &str,
    kid: &str,
    signer: &S,
) -> Result<String, HandleError>
where
    C: Serialize + ?Sized,
    S: Signer<Signature>,
{
    check_kid(kid)?;
    let header = serde_json::to_vec(&HeaderOut {
        alg: ALGORITHM,
        typ,
        kid,
    })
    .map_err(|_| HandleError::Malformed {
        reason: "header does not serialize",
    })?;
    let payload = serde_json::to_vec(claims).map_err(|_| HandleError::Malformed {
        reason: "claims do not serialize",
    })?;
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(payload)
    );
    let signature = signer
        .try_sign(signing_input.as_bytes())
        .map_err(|_| HandleError::Signing)?;
    Ok(format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(signature.to_bytes())
    ))
}

/// The most roles an agent identity token may carry.
pub const MAX_IDENTITY_ROLES: usize = 64;

/// The longest text claim (`iss`, `sub`, `user`, `tenant`, each role) of an identity token, in
/// bytes.
pub const MAX_IDENTITY_CLAIM_LEN: usize = 256;

/// Clock skew allowed on an identity token's `exp`, `nbf` and `iat`, in seconds.
pub const IDENTITY_LEEWAY_SECS: u64 = 60;

/// Why an agent identity token's claims were refused: which claim, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("token claim {claim}: {problem}")]
pub struct ClaimError {
    /// The claim.
    pub claim: &'static str,
    /// What is wrong.
    pub problem: &'static str,
}

/// The claims of an agent's identity token, as an identity provider issues them and the
/// enclave reads them: who the agent is (`sub`), whom it acts for (`user`, the agent itself
/// when absent), its tenant and roles, for which audience, and when it was issued and expires
/// (seconds since the epoch). The development identity provider (`attestplane token mint`),
/// the tests and the benchmarks mint tokens from this type ([`IdentityClaims::encode`]); the
/// enclave reads them with [`IdentityClaims::read`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct IdentityClaims {
    /// Issuer: the identity provider.
    pub iss: String,
    /// Audience: the control plane (or one of its resources). A token read may name several
    /// (an array); read, this is the one it was accepted for.
    pub aud: String,
    /// Subject: the agent.
    pub sub: String,
    /// The user the agent acts for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The agent's tenant.
    pub tenant: String,
    /// The agent's roles, as the token lists them.
    pub roles: Vec<String>,
    /// Issued at (optional when read).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// Expires at.
    pub exp: u64,
}

impl IdentityClaims {
    /// Encodes and signs the token with the identity provider's key.
    pub fn encode<S: Signer<Signature>>(
        &self,
        kid: &str,
        signer: &S,
    ) -> Result<String, HandleError> {
        encode_jws(self, kid, signer)
    }

    /// Reads the claims of a token whose signature verified under `issuer`'s keys
    /// ([`verify_jws`]), for `audience`, at `now`.
    ///
    /// `iss` must be `issuer`; `aud` a string equal to `audience` or an array naming it; `exp`
    /// is required and, with `nbf` and `iat` when present, a non-negative integer of seconds:
    /// the token is refused from `exp` plus [`IDENTITY_LEEWAY_SECS`] on, before `nbf` minus the
    /// leeway, and when issued later than `now` plus the leeway. `sub` and `tenant` are
    /// required, `user` optional, each a non-empty string of at most
    /// [`MAX_IDENTITY_CLAIM_LEN`] bytes; `roles`, if present, an array of at most
    /// [`MAX_IDENTITY_ROLES`] such strings. Other claims are ignored. The first failing claim,
    /// in that order, is the one named.
    pub fn read(
        claims: &Map<String, Value>,
        issuer: &str,
        audience: &str,
        now: UnixMillis,
    ) -> Result<IdentityClaims, ClaimError> {
        let refuse = |claim, problem| ClaimError { claim, problem };
        if claim_text(claims, "iss")?.as_deref() != Some(issuer) {
            return Err(refuse("iss", "does not match the provider"));
        }
        let aud_ok = match claims.get("aud") {
            Some(Value::String(a)) => a == audience,
            Some(Value::Array(items)) => items.iter().any(|a| a.as_str() == Some(audience)),
            _ => false,
        };
        if !aud_ok {
            return Err(refuse("aud", "does not name this control plane"));
        }
        let now_s = now.as_secs();
        let exp = claim_secs(claims, "exp")?.ok_or(refuse("exp", "is required"))?;
        if now_s >= exp.saturating_add(IDENTITY_LEEWAY_SECS) {
            return Err(refuse("exp", "token has expired"));
        }
        if let Some(nbf) = claim_secs(claims, "nbf")?
            && now_s.saturating_add(IDENTITY_LEEWAY_SECS) < nbf
        {
            return Err(refuse("nbf", "token is not yet valid"));
        }
        let iat = claim_secs(claims, "iat")?;
        if let Some(iat) = iat
            && iat > now_s.saturating_add(IDENTITY_LEEWAY_SECS)
        {
            return Err(refuse("iat", "token was issued in the future"));
        }
        let sub = claim_text(claims, "sub")?.ok_or(refuse("sub", "is required"))?;
        let tenant = claim_text(claims, "tenant")?.ok_or(refuse("tenant", "is required"))?;
        let user = claim_text(claims, "user")?;
        let roles = match claims.get("roles") {
            None => Vec::new(),
            Some(Value::Array(items)) if items.len() <= MAX_IDENTITY_ROLES => items
                .iter()
                .map(|r| match r {
                    Value::String(s) if text_fits(s) => Some(s.clone()),
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()
                .ok_or(refuse("roles", "must be an array of non-empty strings"))?,
            Some(_) => return Err(refuse("roles", "must be an array of at most 64 strings")),
        };
        Ok(IdentityClaims {
            iss: issuer.to_owned(),
            aud: audience.to_owned(),
            sub,
            user,
            tenant,
            roles,
            iat,
            exp,
        })
    }
}

fn text_fits(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_IDENTITY_CLAIM_LEN
}

/// A text claim of an identity token, if present.
fn claim_text(
    claims: &Map<String, Value>,
    claim: &'static str,
) -> Result<Option<String>, ClaimError> {
    match claims.get(claim) {
        None => Ok(None),
        Some(Value::String(s)) if text_fits(s) => Ok(Some(s.clone())),
        Some(_) => Err(ClaimError {
            claim,
            problem: "must be a non-empty string of at most 256 bytes",
        }),
    }
}

/// A time claim (seconds) of an identity token, if present.
fn claim_secs(claims: &Map<String, Value>, claim: &'static str) -> Result<Option<u64>, ClaimError> {
    match claims.get(claim) {
        None => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or(ClaimError {
            claim,
            problem: "must be a non-negative integer (seconds)",
        }),
    }
}

/// Encodes and signs a handle: `base64url(header).base64url(claims).base64url(signature)`.
pub fn encode_handle<S>(claims: &HandleClaims, kid: &str, signer: &S) -> Result<String, HandleError>
where
    S: Signer<Signature>,
{
    check_kid(kid)?;
    claims.check()?;
    let token = encode_jws(claims, kid, signer)?;
    if token.len() > MAX_TOKEN_LEN {
        return Err(HandleError::TooLong {
            len: token.len(),
            max: MAX_TOKEN_LEN,
        });
    }
    Ok(token)
}

/// A JSON object read without losing duplicate member names: the first repeated name, if any,
/// is kept aside.
struct StrictObject {
    members: Map<String, Value>,
    duplicate: Option<String>,
}

impl<'de> Deserialize<'de> for StrictObject {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectVisitor;
        impl<'de> Visitor<'de> for ObjectVisitor {
            type Value = StrictObject;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<StrictObject, A::Error> {
                let mut members = Map::new();
                let mut duplicate = None;
                while let Some(key) = access.next_key::<String>()? {
                    let value: Value = access.next_value()?;
                    if members.contains_key(&key) {
                        duplicate.get_or_insert(key);
                    } else {
                        members.insert(key, value);
                    }
                }
                Ok(StrictObject { members, duplicate })
            }
        }
        deserializer.deserialize_map(ObjectVisitor)
    }
}

/// Decodes one base64url segment into a JSON object without duplicate names.
fn decode_object(segment: &str, part: &'static str) -> Result<Map<String, Value>, HandleError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(segment)
        .map_err(|_| HandleError::Malformed {
            reason: if part == "header" {
                "header is not base64url"
            } else {
                "claims are not base64url"
            },
        })?;
    let object: StrictObject =
        serde_json::from_slice(&bytes).map_err(|_| HandleError::Malformed {
            reason: if part == "header" {
                "header is not a JSON object"
            } else {
                "claims are not a JSON object"
            },
        })?;
    if let Some(key) = object.duplicate {
        return Err(HandleError::DuplicateKey { part, key });
    }
    Ok(object.members)
}

/// What a verifier expects of a handle besides a valid signature and times.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HandleExpectations {
    /// The `iss` required, if any.
    pub issuer: Option<String>,
    /// The `aud` required, if any. A relying party (an MCP server) should always set it to its
    /// own resource URI.
    pub audience: Option<String>,
    /// Clock skew allowed on `exp`, `nbf` and `iat`, in seconds.
    pub leeway_secs: u64,
}

/// A handle whose signature, times and expectations all checked out. Only [`verify_handle`]
/// makes one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedHandle {
    claims: HandleClaims,
    kid: String,
}

impl VerifiedHandle {
    /// The verified claims.
    pub fn claims(&self) -> &HandleClaims {
        &self.claims
    }

    /// The ID of the key that signed the handle.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The verified claims, by value.
    pub fn into_claims(self) -> HandleClaims {
        self.claims
    }
}

/// Verifies the JWS layer of an EdDSA JWT against the keys of `jwks`: length, shape, header
/// (`alg` EdDSA, no `crit`, `typ` JWT if present, a known `kid`) and signature. Returns the
/// `kid` and the claims object, without interpreting any claim. Handles and agents' identity
/// tokens both go through it.
pub fn verify_jws(token: &str, jwks: &Jwks) -> Result<(String, Map<String, Value>), HandleError> {
    verify_jws_typed(token, jwks, None)
}

/// [`verify_jws`] for a token whose header must carry `typ` exactly `typ` when `typ` is given
/// (explicit typing, RFC 8725 §3.11: a token of one kind is never accepted as another, so a
/// handle is no receipt and a receipt no handle). Without it, `typ` may be absent or `JWT`.
pub fn verify_jws_typed(
    token: &str,
    jwks: &Jwks,
    typ: Option<&str>,
) -> Result<(String, Map<String, Value>), HandleError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(HandleError::TooLong {
            len: token.len(),
            max: MAX_TOKEN_LEN,
        });
    }
    let segments: Vec<&str> = token.split('.').collect();
    let [header_b64, payload_b64, signature_b64] = segments.as_slice() else {
        return Err(HandleError::SegmentCount {
            found: segments.len(),
        });
    };

    // Header: algorithm first, so that `none` and HMAC/RSA tokens never reach a key.
    let header = decode_object(header_b64, "header")?;
    match header.get("alg") {
        Some(Value::String(alg)) if alg == ALGORITHM => {}
        Some(Value::String(alg)) => return Err(HandleError::BadAlgorithm { alg: alg.clone() }),
        Some(_) => {
            return Err(HandleError::Malformed {
                reason: "alg is not a string",
            });
        }
        None => {
            return Err(HandleError::Malformed {
                reason: "header has no alg",
            });
        }
    }
    if header.contains_key("crit") {
        return Err(HandleError::CriticalHeader);
    }
    match (header.get("typ"), typ) {
        (None, None) => {}
        (Some(Value::String(found)), None) if found == "JWT" => {}
        (Some(Value::String(found)), Some(want)) if found == want => {}
        _ => {
            return Err(HandleError::Malformed {
                reason: "typ is not the expected type",
            });
        }
    }
    let kid = match header.get("kid") {
        Some(Value::String(kid)) if !kid.is_empty() => kid,
        Some(Value::String(_)) | None => return Err(HandleError::MissingKid),
        Some(_) => {
            return Err(HandleError::Malformed {
                reason: "kid is not a string",
            });
        }
    };
    let key = jwks
        .key(kid)
        .ok_or_else(|| HandleError::UnknownKid { kid: kid.clone() })?;

    // Signature over the two first segments exactly as received.
    let signature_bytes =
        URL_SAFE_NO_PAD
            .decode(signature_b64)
            .map_err(|_| HandleError::Malformed {
                reason: "signature is not base64url",
            })?;
    let signature =
        Signature::from_slice(&signature_bytes).map_err(|_| HandleError::Malformed {
            reason: "signature is not 64 bytes",
        })?;
    let signed_len = header_b64.len() + 1 + payload_b64.len();
    let signing_input = token.get(..signed_len).ok_or(HandleError::Malformed {
        reason: "token is truncated",
    })?;
    key.verify(signing_input.as_bytes(), &signature)
        .map_err(|_| HandleError::BadSignature { kid: kid.clone() })?;

    let members = decode_object(payload_b64, "claims")?;
    Ok((kid.clone(), members))
}

/// Verifies a handle against the keys of `jwks` at the instant `at`.
pub fn verify_handle(
    token: &str,
    jwks: &Jwks,
    expect: &HandleExpectations,
    at: UnixMillis,
) -> Result<VerifiedHandle, HandleError> {
    let (kid, members) = verify_jws(token, jwks)?;
    let kid = &kid;
    // Claims.
    let claims: HandleClaims =
        serde_json::from_value(Value::Object(members)).map_err(|e| HandleError::InvalidClaims {
            reason: e.to_string(),
        })?;
    claims.check()?;

    // Times, in milliseconds, with the leeway either way.
    let now = at.as_millis();
    let leeway = expect.leeway_secs.saturating_mul(1000);
    let ms = |secs: u64| secs.saturating_mul(1000);
    if now >= ms(claims.exp).saturating_add(leeway) {
        return Err(HandleError::Expired {
            at,
            exp: claims.exp,
        });
    }
    if let Some(nbf) = claims.nbf
        && now.saturating_add(leeway) < ms(nbf)
    {
        return Err(HandleError::NotYetValid { at, nbf });
    }
    if ms(claims.iat) > now.saturating_add(leeway) {
        return Err(HandleError::IssuedInFuture {
            at,
            iat: claims.iat,
        });
    }

    if let Some(expected) = &expect.issuer
        && *expected != claims.iss
    {
        return Err(HandleError::WrongIssuer {
            expected: expected.clone(),
            found: claims.iss,
        });
    }
    if let Some(expected) = &expect.audience
        && *expected != claims.aud
    {
        return Err(HandleError::WrongAudience {
            expected: expected.clone(),
            found: claims.aud,
        });
    }
    Ok(VerifiedHandle {
        kid: kid.clone(),
        claims,
    })
}

/// A set of Ed25519 verification keys by key ID, as a JSON Web Key Set (RFC 7517, RFC 8037):
/// `{"keys":[{"kty":"OKP","crv":"Ed25519","x":…,"kid":…,"alg":"EdDSA","use":"sig"}]}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jwks {
    keys: Vec<(String, PublicKey)>,
}

#[derive(Serialize)]
struct JwkOut<'a> {
    kty: &'a str,
    crv: &'a str,
    x: String,
    kid: &'a str,
    alg: &'a str,
    #[serde(rename = "use")]
    use_: &'a str,
}

#[derive(Serialize)]
struct JwksOut<'a> {
    keys: Vec<JwkOut<'a>>,
}

impl Jwks {
    /// A JWKS of the given keys. Key IDs must be non-empty, at most [`MAX_KID_LEN`] bytes and
    /// distinct; at most [`MAX_JWKS_KEYS`] keys; every key canonical and of prime order (see
    /// [`crate::eddsa`]).
    pub fn from_keys<I, K>(keys: I) -> Result<Self, HandleError>
    where
        I: IntoIterator<Item = (K, VerifyingKey)>,
        K: Into<String>,
    {
        let mut out = Jwks { keys: Vec::new() };
        for (kid, key) in keys {
            out.insert(kid.into(), key)?;
        }
        Ok(out)
    }

    fn insert(&mut self, kid: String, key: VerifyingKey) -> Result<(), HandleError> {
        check_kid(&kid)?;
        let key = PublicKey::from_verifying_key(&key).map_err(|reason| HandleError::BadJwks {
            reason: reason.as_str(),
        })?;
        if self.get(&kid).is_some() {
            return Err(HandleError::DuplicateKid { kid });
        }
        if self.keys.len() >= MAX_JWKS_KEYS {
            return Err(HandleError::BadJwks {
                reason: "too many keys",
            });
        }
        self.keys.push((kid, key));
        Ok(())
    }

    /// Parses a JWKS document. Keys of other types (`kty` not `OKP` or `crv` not `Ed25519`),
    /// or marked for another algorithm or use, are skipped; an Ed25519 key that is malformed,
    /// carries private material (`d`) or repeats a key ID makes the whole set invalid.
    pub fn parse(bytes: &[u8]) -> Result<Self, HandleError> {
        let bad = |reason| HandleError::BadJwks { reason };
        if bytes.len() > MAX_JWKS_LEN {
            return Err(HandleError::TooLong {
                len: bytes.len(),
                max: MAX_JWKS_LEN,
            });
        }
        let doc: StrictObject =
            serde_json::from_slice(bytes).map_err(|_| bad("not a JSON object"))?;
        if doc.duplicate.is_some() {
            return Err(bad("duplicate member"));
        }
        let Some(Value::Array(entries)) = doc.members.get("keys") else {
            return Err(bad("no keys array"));
        };
        if entries.len() > MAX_JWKS_KEYS {
            return Err(bad("too many keys"));
        }
        let mut out = Jwks { keys: Vec::new() };
        for entry in entries {
            let Value::Object(jwk) = entry else {
                return Err(bad("key is not an object"));
            };
            let text = |name: &str| match jwk.get(name) {
                None => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.as_str())),
                Some(_) => Err(bad("key member is not a string")),
            };
            if text("kty")? != Some("OKP") || text("crv")? != Some("Ed25519") {
                continue;
            }
            if jwk.contains_key("d") {
                return Err(bad("key contains private material"));
            }
            if text("alg")?.is_some_and(|alg| alg != ALGORITHM)
                || text("use")?.is_some_and(|u| u != "sig")
            {
                continue;
            }
            let kid = text("kid")?.ok_or(bad("key has no kid"))?;
            let x = text("x")?.ok_or(bad("key has no x"))?;
            let raw = URL_SAFE_NO_PAD
                .decode(x)
                .map_err(|_| bad("x is not base64url"))?;
            let raw: [u8; 32] = raw.try_into().map_err(|_| bad("x is not 32 bytes"))?;
            let key = VerifyingKey::from_bytes(&raw).map_err(|_| bad("x is not an Ed25519 key"))?;
            out.insert(kid.to_owned(), key)?;
        }
        Ok(out)
    }

    /// The key with ID `kid`.
    pub fn get(&self, kid: &str) -> Option<&VerifyingKey> {
        self.key(kid).map(PublicKey::verifying_key)
    }

    /// The key with ID `kid`, to verify with.
    pub fn key(&self, kid: &str) -> Option<&PublicKey> {
        self.keys.iter().find(|(k, _)| k == kid).map(|(_, key)| key)
    }

    /// The key IDs, in order.
    pub fn kids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|(k, _)| k.as_str())
    }

    /// The number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the set has no keys.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The set as a JWKS JSON document.
    pub fn to_json(&self) -> String {
        let doc = JwksOut {
            keys: self
                .keys
                .iter()
                .map(|(kid, key)| JwkOut {
                    kty: "OKP",
                    crv: "Ed25519",
                    x: URL_SAFE_NO_PAD.encode(key.as_bytes()),
                    kid,
                    alg: ALGORITHM,
                    use_: "sig",
                })
                .collect(),
        };
        // Serialising plain strings into a String cannot fail.
        serde_json::to_string(&doc).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_object_reports_duplicates() {
        let o: StrictObject = serde_json::from_str(r#"{"a":1,"b":2,"a":3}"#).unwrap();
        assert_eq!(o.duplicate.as_deref(), Some("a"));
        assert_eq!(o.members.get("a"), Some(&Value::from(1)));
        assert!(serde_json::from_str::<StrictObject>("[1]").is_err());
        assert!(serde_json::from_str::<StrictObject>(r#"{"a":1} x"#).is_err());
    }

    #[test]
    fn rejects_bad_measurement_and_empty_ids() {
        let good = HandleClaims {
            iss: "i".into(),
            sub: "s".into(),
            aud: "a".into(),
            exp: 2,
            iat: 1,
            nbf: None,
            jti: "j".into(),
            tenant: "t".into(),
            tools: vec!["x".into()],
            measurement: "ab".repeat(48),
            seq: 0,
            server: "srv".into(),
        };
        assert!(good.check().is_ok());
        let mut c = good.clone();
        c.measurement = "AB".repeat(48);
        assert!(c.check().is_err());
        let mut c = good.clone();
        c.measurement = "ab".repeat(32);
        assert!(c.check().is_err());
        let mut c = good.clone();
        c.sub.clear();
        assert_eq!(
            c.check(),
            Err(HandleError::InvalidClaim {
                claim: "sub",
                reason: "empty"
            })
        );
        let mut c = good;
        c.exp = c.iat;
        assert!(c.check().is_err());
    }

    #[test]
    fn identity_claims_read_back_as_written() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
        let jwks = Jwks::from_keys([("k", key.verifying_key())]).unwrap();
        let written = IdentityClaims {
            iss: "https://idp.example".into(),
            aud: "attestplane".into(),
            sub: "agent-7".into(),
            user: None,
            tenant: "acme".into(),
            roles: vec!["b".into(), "a".into()],
            iat: Some(1_000),
            exp: 4_600,
        };
        let token = written.encode("k", &key).unwrap();
        let (_, claims) = verify_jws(&token, &jwks).unwrap();
        let now = UnixMillis::from_millis(2_000_000);
        let read = IdentityClaims::read(&claims, &written.iss, &written.aud, now).unwrap();
        assert_eq!(read, written);
        // Read for another issuer or audience, the same claims are refused.
        assert_eq!(
            IdentityClaims::read(&claims, "https://other.example", &written.aud, now)
                .unwrap_err()
                .claim,
            "iss"
        );
        assert_eq!(
            IdentityClaims::read(&claims, &written.iss, "other", now)
                .unwrap_err()
                .claim,
            "aud"
        );
    }
}
