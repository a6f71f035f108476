//! Agent identity: the bearer JWT an agent presents, verified inside the enclave.
//!
//! The token must be an EdDSA (Ed25519) JWT from an identity provider an admin installed (its
//! issuer, audience and JWKS are part of the logged state). The issuer is read from the
//! unverified claims only to choose which provider's keys to check the signature with; nothing
//! else is believed before the signature verifies. Then `exp` is required, `nbf` and `iat` are
//! honoured, `aud` must name the provider's audience, and the claims map to the agent (`sub`),
//! its user (`user`, default `sub`), tenant (`tenant`, required) and roles (`roles`, optional).
//!
//! The claims are read by the verifier's [`IdentityClaims::read`], the reading side of the one
//! identity-claims type every token minter (the CLI, the tests, the benchmarks) writes with.
//!
//! A development issuer for local use is an ordinary admin-installed provider: there is no
//! bypass. Tokens are secrets: they never appear in errors, logs or entries; only the verified
//! identity is logged.
//!
//! Agents present the same token on request after request, so [`BearerCache`] remembers the
//! tokens already verified: a token seen again costs a SHA-256 and a lookup instead of a
//! signature verification and two JSON parses. The cache never holds a token, only its
//! SHA-256 (a hash of a high-entropy signed token reveals nothing usable: the enclave accepts
//! tokens, not hashes); it answers for a token only while [`authenticate`] would accept it
//! (before `exp` plus leeway, not earlier than the instant it was verified, and while the
//! identity providers are the ones it was verified against); and it is bounded.

use std::collections::{HashMap, VecDeque};

use attestplane_verifier::UnixMillis;
use attestplane_verifier::entry::PrincipalRecord;
use attestplane_verifier::handle::{
    ClaimError, HandleError, IDENTITY_LEEWAY_SECS, IdentityClaims, MAX_IDENTITY_ROLES, verify_jws,
};
use attestplane_verifier::state::State;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::Value;
use sha2::{Digest as _, Sha256};
use thiserror::Error;

/// The longest bearer token accepted.
pub const MAX_BEARER_LEN: usize = 8 * 1024;

/// The most roles a token may carry.
pub const MAX_ROLES: usize = MAX_IDENTITY_ROLES;

/// Clock skew allowed on `exp`, `nbf`, `iat`, in seconds.
pub const LEEWAY_SECS: u64 = IDENTITY_LEEWAY_SECS;

/// The most verified tokens a [`BearerCache`] remembers.
pub const BEARER_CACHE_CAPACITY: usize = 4096;

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

impl From<ClaimError> for IdentityError {
    fn from(e: ClaimError) -> Self {
        IdentityError::Claim {
            claim: e.claim,
            problem: e.problem,
        }
    }
}

impl From<HandleError> for IdentityError {
    fn from(e: HandleError) -> Self {
        IdentityError::Rejected(e.to_string())
    }
}

/// Verifies `bearer` against the identity providers in `state` at `now`.
pub fn authenticate(
    state: &State,
    bearer: &str,
    now: UnixMillis,
) -> Result<PrincipalRecord, IdentityError> {
    verify(state, bearer, Audience::Provider, now).map(|(principal, _)| principal)
}

/// A verified token's remembered identity.
struct Cached {
    principal: PrincipalRecord,
    /// When it was verified: not used for an earlier instant (`nbf`, `iat`).
    verified_at: UnixMillis,
    /// `exp` plus leeway, in Unix seconds: not used from then on.
    until_secs: u64,
    /// The identity providers it was verified against.
    generation: u64,
    /// Insertion order, to tell a current entry from a replaced one in `order`.
    serial: u64,
}

/// Bearer tokens already verified, keyed by their SHA-256 (see the module documentation).
/// One cache serves one [`State`].
pub struct BearerCache {
    entries: HashMap<[u8; 32], Cached>,
    order: VecDeque<([u8; 32], u64)>,
    serial: u64,
    capacity: usize,
}

impl std::fmt::Debug for BearerCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BearerCache")
            .field("entries", &self.entries.len())
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl Default for BearerCache {
    fn default() -> Self {
        Self::new(BEARER_CACHE_CAPACITY)
    }
}

impl BearerCache {
    /// An empty cache of at most `capacity` tokens (0 remembers nothing).
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: HashMap::new(),
            order: VecDeque::new(),
            serial: 0,
            capacity,
        }
    }

    /// How many tokens it remembers.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it remembers none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// [`authenticate`], answered from the cache when `bearer` was verified before and would
    /// verify now: the same identity or the same refusal as [`authenticate`] gives.
    pub fn authenticate(
        &mut self,
        state: &State,
        bearer: &str,
        now: UnixMillis,
    ) -> Result<PrincipalRecord, IdentityError> {
        self.authenticate_for(state, bearer, Audience::Provider, now)
    }

    /// [`BearerCache::authenticate`] for a token that must name `audience`. The cache key
    /// covers the audience too, so a token verified for one endpoint is never answered for
    /// another from the cache.
    pub fn authenticate_for(
        &mut self,
        state: &State,
        bearer: &str,
        audience: Audience<'_>,
        now: UnixMillis,
    ) -> Result<PrincipalRecord, IdentityError> {
        if bearer.len() > MAX_BEARER_LEN {
            return Err(IdentityError::Malformed("token too long"));
        }
        let mut hasher = Sha256::new();
        hasher.update(bearer.as_bytes());
        if let Audience::Resource(uri) = audience {
            // A NUL cannot occur in a JWS compact token: the two parts cannot run together.
            hasher.update([0u8]);
            hasher.update(uri.as_bytes());
        }
        let key: [u8; 32] = hasher.finalize().into();
        let generation = state.identity_generation();
        if let Some(c) = self.entries.get(&key) {
            if c.generation == generation && now >= c.verified_at && now.as_secs() < c.until_secs {
                return Ok(c.principal.clone());
            }
            self.entries.remove(&key);
        }
        let (principal, exp) = verify(state, bearer, audience, now)?;
        if self.capacity > 0 {
            self.insert(
                key,
                Cached {
                    principal: principal.clone(),
                    verified_at: now,
                    until_secs: exp.saturating_add(LEEWAY_SECS),
                    generation,
                    serial: 0,
                },
                now,
            );
        }
        Ok(principal)
    }

    fn insert(&mut self, key: [u8; 32], mut cached: Cached, now: UnixMillis) {
        if self.entries.len() >= self.capacity {
            let now_s = now.as_secs();
            self.entries.retain(|_, c| now_s < c.until_secs);
            let entries = &self.entries;
            self.order
                .retain(|(k, serial)| entries.get(k).is_some_and(|c| c.serial == *serial));
        }
        while self.entries.len() >= self.capacity {
            let Some((k, serial)) = self.order.pop_front() else {
                break;
            };
            if self.entries.get(&k).is_some_and(|c| c.serial == serial) {
                self.entries.remove(&k);
            }
        }
        self.serial = self.serial.wrapping_add(1);
        cached.serial = self.serial;
        self.order.push_back((key, self.serial));
        self.entries.insert(key, cached);
        // Entries removed on lookup leave stale positions behind: keep `order` bounded too.
        if self.order.len() > self.capacity.saturating_mul(2) {
            let entries = &self.entries;
            self.order
                .retain(|(k, serial)| entries.get(k).is_some_and(|c| c.serial == *serial));
        }
    }
}

/// Which audience a token must name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Audience<'a> {
    /// The identity provider's configured audience: the control plane's own API.
    Provider,
    /// A protected resource of the control plane: an MCP endpoint's resource URI (RFC 8707),
    /// so a token minted for one endpoint is refused at every other.
    Resource(&'a str),
}

/// Verifies `bearer`; returns the identity and the token's `exp`.
fn verify(
    state: &State,
    bearer: &str,
    audience: Audience<'_>,
    now: UnixMillis,
) -> Result<(PrincipalRecord, u64), IdentityError> {
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
    let expected = match audience {
        Audience::Provider => provider.audience.as_str(),
        Audience::Resource(uri) => uri,
    };
    let claims = IdentityClaims::read(&claims, &provider.issuer, expected, now)?;
    let mut roles = claims.roles;
    roles.sort();
    roles.dedup();
    Ok((
        PrincipalRecord {
            user: claims.user.unwrap_or_else(|| claims.sub.clone()),
            agent: claims.sub,
            tenant: claims.tenant,
            roles,
            issuer,
        },
        claims.exp,
    ))
}
