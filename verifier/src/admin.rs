//! Signed admin requests: the only way the registry, the policy, the identity providers and the
//! admin key set change.
//!
//! An admin request is a COSE_Sign1 in the same Ed25519 profile as log entries, with content
//! type `application/vnd.attestplane.admin.v1+cbor` (so an admin signature can never pass as an
//! entry, nor the reverse; a request of another format version is refused as
//! [`AdminError::UnsupportedVersion`]), signed by one of the current admin keys. Its payload is the
//! deterministic CBOR map
//! `{ "time": ms, "nonce": bstr(16), "deployment": { "origin": text, "genesis": bstr(32) },
//! "action": { "type": ..., ... } }`.
//! `time` and `nonce` let the enclave refuse a replayed request: it accepts a request only
//! within [`ADMIN_REQUEST_WINDOW_MS`] of its own clock and only if the nonce was not seen in
//! that window. `deployment` names the one log the request is for ([`Deployment`]: the log's
//! origin and the hash of its genesis entry), so a request signed for one deployment (say,
//! staging) cannot be replayed against another that trusts the same admin key (production),
//! nor against a copy of the log served under another origin: the enclave refuses it, and the
//! state fold refuses a log that records one as accepted.
//!
//! The enclave logs every admin request it receives, accepted or refused, with the signed bytes
//! verbatim, so an auditor can check that every change to the state was signed by a key that
//! was an admin key at that point of the log. This module defines the bytes; applying a request
//! to the state is [`crate::state`]'s job.
//!
//! Admin private keys never enter this crate's types except as a `Signer` passed by reference;
//! nothing here stores or prints one.

use std::collections::{BTreeMap, BTreeSet};

use ciborium::value::Value;
use ed25519_dalek::{Signature, Signer, VerifyingKey};
use serde::Serialize;
use thiserror::Error;

use crate::attestation::{Pcr, PcrIndex};
use crate::cbor::{self, CborError, Fields, ShapeError, as_u64, keys32, map, uint};
use crate::cose::{self, CoseError};
use crate::entry::{EntryHash, FormatVersion, KeyId};
use crate::time::UnixMillis;

/// Content type of an admin request's protected header, with the format's version (v1).
pub const ADMIN_CONTENT_TYPE: &str = "application/vnd.attestplane.admin.v1+cbor";

/// The largest admin request accepted.
pub const MAX_ADMIN_REQUEST_LEN: usize = cbor::MAX_PAYLOAD_LEN + 512;

/// How far an admin request's time may be from the enclave's clock, either way.
pub const ADMIN_REQUEST_WINDOW_MS: u64 = 5 * 60 * 1000;

/// The most admin keys a key set may hold.
pub const MAX_ADMIN_KEYS: usize = 16;

/// The longest identifier (server id, tenant, tool name, issuer) accepted.
pub const MAX_ID_LEN: usize = 256;

/// The most tools a server registration may pin.
pub const MAX_TOOLS: usize = 1024;

use crate::gateway::limits::{LimitError, MAX_ASSET_LEN, check_rules};
pub use crate::gateway::limits::{MAX_LIMIT_RULES, Price, RateLimit, ScopeKind, SpendCap};
/// The digest a tool is pinned by (defined with the pin check, which computes it).
pub use crate::gateway::pin::Digest32;

/// How a registered server's identity is established.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Assurance {
    /// A Nitro Enclave whose attestation document the control plane verifies against the
    /// registered PCRs.
    Nitro,
    /// Nothing: a plain server. It has no PCRs, is never attested, and its tools may still be
    /// pinned; the policy sees the level (`context.server_assurance`).
    None,
}

impl Assurance {
    /// The level as encoded (and as the policy sees it).
    pub fn as_str(&self) -> &'static str {
        match self {
            Assurance::Nitro => "nitro",
            Assurance::None => "none",
        }
    }
}

/// A server-to-client request method a registration may allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientRequest {
    /// `sampling/createMessage`.
    Sampling,
    /// `elicitation/create`.
    Elicitation,
    /// `roots/list`.
    Roots,
}

impl ClientRequest {
    /// The name as encoded.
    pub fn as_str(&self) -> &'static str {
        match self {
            ClientRequest::Sampling => "sampling",
            ClientRequest::Elicitation => "elicitation",
            ClientRequest::Roots => "roots",
        }
    }
}

/// A registration of an MCP server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServerSpec {
    /// Stable id, unique in the registry.
    pub id: String,
    /// Human name.
    pub name: String,
    /// The tenant that owns it.
    pub tenant: String,
    /// Its OAuth resource URI: the `aud` of the handles issued for it.
    pub resource: String,
    /// Where the host fetches `GET {endpoint}/attestation?nonce=HEX`.
    pub endpoint: String,
    /// The PCRs its attestation documents must carry, by index.
    pub pcrs: BTreeMap<PcrIndex, PcrHex>,
    /// Accept attestation documents from a debug-mode enclave. Never for production.
    pub allow_debug: bool,
    /// How old a verified attestation may be before the server counts as unattested.
    pub max_attestation_age_ms: u64,
    /// Pinned tool definitions: tool name → SHA-256 of its canonical definition.
    pub tools: BTreeMap<String, Digest32>,
    /// How its identity is established (`nitro`: attested against `pcrs`; `none`: no PCRs).
    pub assurance: Assurance,
    /// Per-call prices of its tools (each a pinned tool).
    pub prices: BTreeMap<String, Price>,
    /// The server-to-client requests it may make (none by default).
    pub client_requests: BTreeSet<ClientRequest>,
}

/// A PCR value that serialises as hex.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PcrHex(pub Pcr);

impl Serialize for PcrHex {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0.to_hex())
    }
}

/// An identity provider whose tokens identify agents.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct IdentityProviderSpec {
    /// The `iss` its tokens carry.
    pub issuer: String,
    /// The `aud` its tokens must carry.
    pub audience: String,
    /// Its JWKS (JSON text) with the keys it signs with.
    pub jwks: String,
}

/// What an admin request asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AdminAction {
    /// Add a server; refused if the id exists.
    RegisterServer(ServerSpec),
    /// Replace an existing server's registration; its attestation must be redone.
    UpdateServer(ServerSpec),
    /// Remove a server; no handle is issued for it afterwards.
    RevokeServer {
        /// The server's id.
        id: String,
    },
    /// Replace the Cedar policy set (validated against the schema before it is accepted).
    SetPolicy {
        /// Cedar policy text.
        text: String,
    },
    /// Add or replace an identity provider (keyed by issuer).
    SetIdentityProvider(IdentityProviderSpec),
    /// Remove an identity provider.
    RemoveIdentityProvider {
        /// Its issuer.
        issuer: String,
    },
    /// Replace the admin key set.
    RotateAdminKeys {
        /// The new set of raw Ed25519 public keys.
        keys: Vec<[u8; 32]>,
    },
    /// Allow the control plane's epochs to run another image (an upgrade): later epochs whose
    /// attestation documents carry these PCRs are accepted by the enclave's boot and by
    /// `attestplane-verify log`. PCR0, PCR1 and PCR2 are required, none of them zero (a debug-mode
    /// enclave's PCRs attest nothing).
    AllowImage {
        /// The image's PCRs, by index.
        pcrs: BTreeMap<PcrIndex, PcrHex>,
    },
    /// Replace the rate limits and spend caps.
    SetLimits {
        /// GCRA rate limits.
        rates: Vec<RateLimit>,
        /// Spend caps.
        spends: Vec<SpendCap>,
    },
}

impl AdminAction {
    /// The action's type name as encoded.
    pub fn type_name(&self) -> &'static str {
        match self {
            AdminAction::RegisterServer(_) => "register_server",
            AdminAction::UpdateServer(_) => "update_server",
            AdminAction::RevokeServer { .. } => "revoke_server",
            AdminAction::SetPolicy { .. } => "set_policy",
            AdminAction::SetIdentityProvider(_) => "set_identity_provider",
            AdminAction::RemoveIdentityProvider { .. } => "remove_identity_provider",
            AdminAction::RotateAdminKeys { .. } => "rotate_admin_keys",
            AdminAction::AllowImage { .. } => "allow_image",
            AdminAction::SetLimits { .. } => "set_limits",
        }
    }
}

/// The deployment an admin request is for: one log, named by its origin (the name its
/// checkpoints are signed under) and the hash of its genesis entry (entry 1, which links to the
/// first epoch's attestation document, so no two logs share it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Deployment {
    /// The log's origin line.
    pub origin: String,
    /// SHA-256 of the genesis entry's encoded bytes.
    pub genesis: EntryHash,
}

impl std::fmt::Display for Deployment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?} (genesis {})", self.origin, self.genesis)
    }
}

fn deployment_to_value(d: &Deployment) -> Value {
    map([
        ("origin", Value::Text(d.origin.clone())),
        ("genesis", Value::Bytes(d.genesis.as_bytes().to_vec())),
    ])
}

fn deployment_from_value(v: Value) -> Result<Deployment, AdminError> {
    let mut f = Fields::new(v, "deployment")?;
    let deployment = Deployment {
        origin: id("origin", f.text("origin")?)?,
        genesis: EntryHash::from_bytes(f.array("genesis")?),
    };
    f.finish()?;
    Ok(deployment)
}

/// An admin request before signing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminRequest {
    /// When the admin made it (the enclave refuses it outside its window).
    pub time: UnixMillis,
    /// Random, unique per request: a replayed request is refused.
    pub nonce: [u8; 16],
    /// The deployment it is for: any other refuses it.
    pub deployment: Deployment,
    /// What to do.
    pub action: AdminAction,
}

impl AdminRequest {
    /// The deterministic CBOR payload.
    pub fn payload(&self) -> Result<Vec<u8>, AdminError> {
        Ok(cbor::encode(&map([
            ("time", uint(self.time.as_millis())),
            ("nonce", Value::Bytes(self.nonce.to_vec())),
            ("deployment", deployment_to_value(&self.deployment)),
            ("action", action_to_value(&self.action)),
        ]))?)
    }

    /// Decodes a payload (deterministic form only).
    pub fn from_payload(bytes: &[u8]) -> Result<Self, AdminError> {
        let mut f = Fields::new(cbor::decode(bytes)?, "admin request")?;
        let request = AdminRequest {
            time: UnixMillis::from_millis(f.u64("time")?),
            nonce: f.array("nonce")?,
            deployment: deployment_from_value(f.take("deployment")?)?,
            action: action_from_value(f.take("action")?)?,
        };
        f.finish()?;
        Ok(request)
    }

    /// Signs the request with an admin key: the bytes to send to the control plane.
    pub fn sign<S: Signer<Signature>>(
        &self,
        key: &VerifyingKey,
        signer: &S,
    ) -> Result<Vec<u8>, AdminError> {
        let kid = KeyId::of(key);
        Ok(cose::sign(
            ADMIN_CONTENT_TYPE,
            kid.as_bytes(),
            self.payload()?,
            signer,
        )?)
    }
}

/// A decoded admin request with its signature, not yet checked.
#[derive(Clone, Debug)]
pub struct SignedAdminRequest {
    request: AdminRequest,
    kid: KeyId,
    signature: Signature,
    tbs: Vec<u8>,
}

impl SignedAdminRequest {
    /// Parses signed request bytes strictly.
    pub fn decode(bytes: &[u8]) -> Result<Self, AdminError> {
        let opened = cose::open(bytes, ADMIN_CONTENT_TYPE, MAX_ADMIN_REQUEST_LEN)?;
        Ok(Self {
            request: AdminRequest::from_payload(&opened.payload)?,
            kid: KeyId::from_bytes(opened.kid),
            signature: opened.signature,
            tbs: opened.tbs,
        })
    }

    /// The request (unverified until [`SignedAdminRequest::verify`] succeeds).
    pub fn request(&self) -> &AdminRequest {
        &self.request
    }

    /// The key id it names.
    pub fn kid(&self) -> &KeyId {
        &self.kid
    }

    /// Checks the signature under the admin key it names, which must be in `admin_keys`.
    /// Returns the key that signed.
    pub fn verify(&self, admin_keys: &[VerifyingKey]) -> Result<VerifyingKey, AdminError> {
        let key = admin_keys
            .iter()
            .find(|k| KeyId::of(k) == self.kid)
            .ok_or(AdminError::UnknownAdminKey { kid: self.kid })?;
        key.verify_strict(&self.tbs, &self.signature)
            .map_err(|_| AdminError::BadSignature { kid: self.kid })?;
        Ok(*key)
    }

    /// Checks that the request is for `expected`, the deployment checking it.
    pub fn check_deployment(&self, expected: &Deployment) -> Result<(), AdminError> {
        if self.request.deployment == *expected {
            Ok(())
        } else {
            Err(AdminError::OtherDeployment {
                expected: expected.clone(),
                found: self.request.deployment.clone(),
            })
        }
    }

    /// Whether `time` (the enclave's clock) is within the request's window.
    pub fn is_fresh_at(&self, now: UnixMillis) -> bool {
        let t = self.request.time;
        let skew = now.millis_since(t).or_else(|| t.millis_since(now));
        skew.is_some_and(|d| d <= ADMIN_REQUEST_WINDOW_MS)
    }
}

/// Why an admin request was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum AdminError {
    /// The COSE framing or header is wrong.
    #[error("malformed admin request: {reason}")]
    Malformed {
        /// What was wrong.
        reason: String,
    },
    /// The request is of another version of the format than the one this verifier reads
    /// ([`FormatVersion::CURRENT`]): signed by a pre-v1 CLI, or by a later one.
    #[error(
        "admin request format {found} is not {}, the only version this verifier reads",
        FormatVersion::CURRENT
    )]
    UnsupportedVersion {
        /// The version its content type names.
        found: FormatVersion,
    },
    /// The payload is not deterministic CBOR.
    #[error("admin request payload: {0}")]
    Cbor(#[from] CborError),
    /// The payload has the wrong shape.
    #[error("admin request: {0}")]
    Shape(#[from] ShapeError),
    /// The action type is not one this version knows.
    #[error("unknown admin action {kind:?}")]
    UnknownAction {
        /// The type found.
        kind: String,
    },
    /// A value is out of bounds (too long, too many, empty).
    #[error("admin request: {field} {problem}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// A `set_limits` whose rules the gateway could not use (two rules for one scope, too
    /// many).
    #[error("admin request: limits: {0}")]
    Limits(#[from] LimitError),
    /// The request names a key that is not a current admin key.
    #[error("signed by {kid}, which is not a current admin key")]
    UnknownAdminKey {
        /// The key id named.
        kid: KeyId,
    },
    /// The signature does not verify.
    #[error("bad signature by admin key {kid}")]
    BadSignature {
        /// The key id named.
        kid: KeyId,
    },
    /// The request is for another deployment (another log, or this log under another origin).
    #[error("the request is for deployment {found}, not {expected}")]
    OtherDeployment {
        /// The deployment checking it.
        expected: Deployment,
        /// The deployment the request names.
        found: Deployment,
    },
    /// The signer failed.
    #[error("signing failed")]
    SigningFailed,
}

impl From<CoseError> for AdminError {
    fn from(e: CoseError) -> Self {
        match e {
            CoseError::TooLong { len, max } => AdminError::Malformed {
                reason: format!("{len} bytes exceeds the limit of {max}"),
            },
            CoseError::Malformed(reason) => AdminError::Malformed { reason },
            CoseError::Header(reason) => AdminError::Malformed {
                reason: reason.to_string(),
            },
            CoseError::Version { found } => AdminError::UnsupportedVersion { found },
            CoseError::NotCanonical => AdminError::Malformed {
                reason: "not in canonical encoding".into(),
            },
            CoseError::SigningFailed => AdminError::SigningFailed,
        }
    }
}

fn id(field: &'static str, v: String) -> Result<String, AdminError> {
    if v.is_empty() {
        return Err(AdminError::Invalid {
            field,
            problem: "is empty",
        });
    }
    if v.len() > MAX_ID_LEN || v.chars().any(char::is_control) {
        return Err(AdminError::Invalid {
            field,
            problem: "is too long or holds control characters",
        });
    }
    Ok(v)
}

fn pcrs_to_value(pcrs: &BTreeMap<PcrIndex, PcrHex>) -> Value {
    Value::Map(
        pcrs.iter()
            .map(|(i, p)| {
                (
                    uint(u64::from(i.get())),
                    Value::Bytes(p.0.as_bytes().to_vec()),
                )
            })
            .collect(),
    )
}

fn pcrs_from_value(v: Value) -> Result<BTreeMap<PcrIndex, PcrHex>, AdminError> {
    let bad_pcrs = AdminError::Invalid {
        field: "pcrs",
        problem: "must map indexes 0..=31 to 48-byte values",
    };
    match v {
        Value::Map(entries) => entries
            .into_iter()
            .map(|(k, v)| {
                let idx = as_u64(&k)
                    .and_then(|i| u8::try_from(i).ok())
                    .and_then(|i| PcrIndex::try_from(i).ok())?;
                let Value::Bytes(b) = v else { return None };
                let pcr = Pcr::try_from(b.as_slice()).ok()?;
                Some((idx, PcrHex(pcr)))
            })
            .collect::<Option<BTreeMap<_, _>>>()
            .ok_or(bad_pcrs),
        _ => Err(bad_pcrs),
    }
}

/// Checks an `allow_image` PCR set: PCR0, PCR1 and PCR2 present and not zero.
fn image_pcrs(pcrs: BTreeMap<PcrIndex, PcrHex>) -> Result<BTreeMap<PcrIndex, PcrHex>, AdminError> {
    let plain: BTreeMap<PcrIndex, Pcr> = pcrs.iter().map(|(i, p)| (*i, p.0)).collect();
    if !crate::attestation::names_an_image(&plain) {
        return Err(AdminError::Invalid {
            field: "pcrs",
            problem: "an image is named by PCR0, PCR1 and PCR2, none of them zero",
        });
    }
    Ok(pcrs)
}

fn server_to_value(s: &ServerSpec) -> Value {
    map([
        ("id", Value::Text(s.id.clone())),
        ("name", Value::Text(s.name.clone())),
        ("tenant", Value::Text(s.tenant.clone())),
        ("resource", Value::Text(s.resource.clone())),
        ("endpoint", Value::Text(s.endpoint.clone())),
        (
            "pcrs",
            Value::Map(
                s.pcrs
                    .iter()
                    .map(|(i, p)| {
                        (
                            uint(u64::from(i.get())),
                            Value::Bytes(p.0.as_bytes().to_vec()),
                        )
                    })
                    .collect(),
            ),
        ),
        ("allow_debug", Value::Bool(s.allow_debug)),
        ("max_attestation_age_ms", uint(s.max_attestation_age_ms)),
        (
            "tools",
            Value::Map(
                s.tools
                    .iter()
                    .map(|(n, d)| (Value::Text(n.clone()), Value::Bytes(d.0.to_vec())))
                    .collect(),
            ),
        ),
        ("assurance", Value::Text(s.assurance.as_str().into())),
        (
            "prices",
            Value::Map(
                s.prices
                    .iter()
                    .map(|(n, p)| {
                        (
                            Value::Text(n.clone()),
                            map([
                                ("amount", uint(p.amount)),
                                ("asset", Value::Text(p.asset.clone())),
                            ]),
                        )
                    })
                    .collect(),
            ),
        ),
        (
            "client_requests",
            Value::Array(
                s.client_requests
                    .iter()
                    .map(|c| Value::Text(c.as_str().into()))
                    .collect(),
            ),
        ),
    ])
}

fn prices_from_value(v: Value) -> Result<BTreeMap<String, Price>, AdminError> {
    let bad = || AdminError::Invalid {
        field: "prices",
        problem: "must map tool names to {amount, asset}",
    };
    let Value::Map(entries) = v else {
        return Err(bad());
    };
    if entries.len() > MAX_TOOLS {
        return Err(bad());
    }
    let mut out = BTreeMap::new();
    for (k, v) in entries {
        let Value::Text(tool) = k else {
            return Err(bad());
        };
        let mut p = Fields::new(v, "price")?;
        let price = Price {
            amount: p.u64("amount")?,
            asset: asset(p.text("asset")?)?,
        };
        p.finish()?;
        if out.insert(id("tool name", tool)?, price).is_some() {
            return Err(bad());
        }
    }
    Ok(out)
}

fn client_requests_from_value(v: Value) -> Result<BTreeSet<ClientRequest>, AdminError> {
    let bad = || AdminError::Invalid {
        field: "client_requests",
        problem: "must be a set of \"sampling\", \"elicitation\", \"roots\"",
    };
    let Value::Array(items) = v else {
        return Err(bad());
    };
    let mut out = BTreeSet::new();
    for item in items {
        let c = match item {
            Value::Text(t) if t == "sampling" => ClientRequest::Sampling,
            Value::Text(t) if t == "elicitation" => ClientRequest::Elicitation,
            Value::Text(t) if t == "roots" => ClientRequest::Roots,
            _ => return Err(bad()),
        };
        if !out.insert(c) {
            return Err(bad());
        }
    }
    Ok(out)
}

fn limits_to_value(rates: &[RateLimit], spends: &[SpendCap]) -> [(&'static str, Value); 2] {
    [
        (
            "rates",
            Value::Array(
                rates
                    .iter()
                    .map(|r| {
                        map([
                            ("scope", Value::Text(r.scope.as_str().into())),
                            ("rate_per_minute", uint(r.rate_per_minute)),
                            ("burst", uint(r.burst)),
                        ])
                    })
                    .collect(),
            ),
        ),
        (
            "spends",
            Value::Array(
                spends
                    .iter()
                    .map(|c| {
                        map([
                            ("scope", Value::Text(c.scope.as_str().into())),
                            ("asset", Value::Text(c.asset.clone())),
                            ("cap", uint(c.cap)),
                            ("window_ms", uint(c.window_ms)),
                        ])
                    })
                    .collect(),
            ),
        ),
    ]
}

fn scope_of(f: &mut Fields) -> Result<ScopeKind, AdminError> {
    ScopeKind::parse(&f.text("scope")?).ok_or(AdminError::Invalid {
        field: "scope",
        problem: "must be tenant, user, agent or tool",
    })
}

fn items(v: Value, field: &'static str) -> Result<Vec<Value>, AdminError> {
    match v {
        Value::Array(items) if items.len() <= MAX_LIMIT_RULES => Ok(items),
        _ => Err(AdminError::Invalid {
            field,
            problem: "must be an array of at most 256 limits",
        }),
    }
}

/// An asset name: what an identifier may be, and at most [`MAX_ASSET_LEN`] bytes.
fn asset(v: String) -> Result<String, AdminError> {
    let v = id("asset", v)?;
    if v.len() > MAX_ASSET_LEN {
        return Err(AdminError::Invalid {
            field: "asset",
            problem: "is longer than 64 bytes",
        });
    }
    Ok(v)
}

fn limits_from_value(f: &mut Fields) -> Result<(Vec<RateLimit>, Vec<SpendCap>), AdminError> {
    let positive = |field: &'static str, v: u64| {
        if v == 0 {
            Err(AdminError::Invalid {
                field,
                problem: "must be at least 1",
            })
        } else {
            Ok(v)
        }
    };
    let mut rates = Vec::new();
    for v in items(f.take("rates")?, "rates")? {
        let mut r = Fields::new(v, "rate limit")?;
        let limit = RateLimit {
            scope: scope_of(&mut r)?,
            rate_per_minute: positive("rate_per_minute", r.u64("rate_per_minute")?)?,
            burst: positive("burst", r.u64("burst")?)?,
        };
        r.finish()?;
        rates.push(limit);
    }
    let mut spends = Vec::new();
    for v in items(f.take("spends")?, "spends")? {
        let mut c = Fields::new(v, "spend cap")?;
        let cap = SpendCap {
            scope: scope_of(&mut c)?,
            asset: asset(c.text("asset")?)?,
            cap: c.u64("cap")?,
            window_ms: positive("window_ms", c.u64("window_ms")?)?,
        };
        c.finish()?;
        spends.push(cap);
    }
    // The gateway's own check: one rate rule per scope, one cap per scope and asset.
    check_rules(&rates, &spends)?;
    Ok((rates, spends))
}

fn server_from_value(v: Value) -> Result<ServerSpec, AdminError> {
    let mut f = Fields::new(v, "server")?;
    let pcrs = pcrs_from_value(f.take("pcrs")?)?;
    let assurance = match f.text("assurance")?.as_str() {
        "nitro" => Assurance::Nitro,
        "none" => Assurance::None,
        _ => {
            return Err(AdminError::Invalid {
                field: "assurance",
                problem: "must be nitro or none",
            });
        }
    };
    match assurance {
        Assurance::Nitro if pcrs.is_empty() => {
            return Err(AdminError::Invalid {
                field: "pcrs",
                problem: "is empty: a nitro server must be pinned to at least one measurement",
            });
        }
        Assurance::None if !pcrs.is_empty() => {
            return Err(AdminError::Invalid {
                field: "pcrs",
                problem: "must be empty for a server of assurance none",
            });
        }
        _ => {}
    }
    let bad_tools = AdminError::Invalid {
        field: "tools",
        problem: "must map tool names to 32-byte digests",
    };
    let tools = match f.take("tools")? {
        Value::Map(entries) if entries.len() <= MAX_TOOLS => entries
            .into_iter()
            .map(|(k, v)| match (k, v) {
                (Value::Text(n), Value::Bytes(d)) => {
                    Some((n, Digest32(<[u8; 32]>::try_from(d.as_slice()).ok()?)))
                }
                _ => None,
            })
            .collect::<Option<BTreeMap<_, _>>>()
            .ok_or(bad_tools.clone())?,
        _ => return Err(bad_tools),
    };
    for name in tools.keys() {
        id("tool name", name.clone())?;
    }
    let prices = prices_from_value(f.take("prices")?)?;
    if prices.keys().any(|t| !tools.contains_key(t)) {
        return Err(AdminError::Invalid {
            field: "prices",
            problem: "names a tool the registration does not pin",
        });
    }
    let client_requests = client_requests_from_value(f.take("client_requests")?)?;
    let spec = ServerSpec {
        id: id("id", f.text("id")?)?,
        name: id("name", f.text("name")?)?,
        tenant: id("tenant", f.text("tenant")?)?,
        resource: id("resource", f.text("resource")?)?,
        endpoint: id("endpoint", f.text("endpoint")?)?,
        pcrs,
        allow_debug: f.bool("allow_debug")?,
        max_attestation_age_ms: f.u64("max_attestation_age_ms")?,
        tools,
        assurance,
        prices,
        client_requests,
    };
    f.finish()?;
    Ok(spec)
}

fn action_to_value(a: &AdminAction) -> Value {
    let kind = ("type", Value::Text(a.type_name().into()));
    match a {
        AdminAction::RegisterServer(s) | AdminAction::UpdateServer(s) => {
            map([kind, ("server", server_to_value(s))])
        }
        AdminAction::RevokeServer { id } => map([kind, ("id", Value::Text(id.clone()))]),
        AdminAction::SetPolicy { text } => map([kind, ("text", Value::Text(text.clone()))]),
        AdminAction::SetIdentityProvider(p) => map([
            kind,
            ("issuer", Value::Text(p.issuer.clone())),
            ("audience", Value::Text(p.audience.clone())),
            ("jwks", Value::Text(p.jwks.clone())),
        ]),
        AdminAction::RemoveIdentityProvider { issuer } => {
            map([kind, ("issuer", Value::Text(issuer.clone()))])
        }
        AdminAction::RotateAdminKeys { keys } => map([kind, ("keys", keys32(keys))]),
        AdminAction::AllowImage { pcrs } => map([kind, ("pcrs", pcrs_to_value(pcrs))]),
        AdminAction::SetLimits { rates, spends } => {
            let [r, s] = limits_to_value(rates, spends);
            map([kind, r, s])
        }
    }
}

fn action_from_value(v: Value) -> Result<AdminAction, AdminError> {
    let mut f = Fields::new(v, "action")?;
    let kind = f.text("type")?;
    let action = match kind.as_str() {
        "register_server" => AdminAction::RegisterServer(server_from_value(f.take("server")?)?),
        "update_server" => AdminAction::UpdateServer(server_from_value(f.take("server")?)?),
        "revoke_server" => AdminAction::RevokeServer {
            id: id("id", f.text("id")?)?,
        },
        "set_policy" => AdminAction::SetPolicy {
            text: f.text("text")?,
        },
        "set_identity_provider" => AdminAction::SetIdentityProvider(IdentityProviderSpec {
            issuer: id("issuer", f.text("issuer")?)?,
            audience: id("audience", f.text("audience")?)?,
            jwks: f.text("jwks")?,
        }),
        "remove_identity_provider" => AdminAction::RemoveIdentityProvider {
            issuer: id("issuer", f.text("issuer")?)?,
        },
        "rotate_admin_keys" => {
            let keys = f.keys32("keys")?;
            if keys.is_empty() || keys.len() > MAX_ADMIN_KEYS {
                return Err(AdminError::Invalid {
                    field: "keys",
                    problem: "must be 1 to 16 raw 32-byte Ed25519 keys",
                });
            }
            AdminAction::RotateAdminKeys { keys }
        }
        "allow_image" => AdminAction::AllowImage {
            pcrs: image_pcrs(pcrs_from_value(f.take("pcrs")?)?)?,
        },
        "set_limits" => {
            let (rates, spends) = limits_from_value(&mut f)?;
            AdminAction::SetLimits { rates, spends }
        }
        _ => return Err(AdminError::UnknownAction { kind }),
    };
    f.finish()?;
    Ok(action)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;

    fn server() -> ServerSpec {
        ServerSpec {
            id: "weather".into(),
            name: "Weather".into(),
            tenant: "acme".into(),
            resource: "https://weather.acme.example/mcp".into(),
            endpoint: "http://127.0.0.1:9000".into(),
            pcrs: [(PcrIndex::IMAGE, PcrHex(Pcr::new([1; 48])))].into(),
            allow_debug: false,
            max_attestation_age_ms: 600_000,
            tools: [("forecast".to_string(), Digest32([3; 32]))].into(),
            assurance: Assurance::Nitro,
            prices: [(
                "forecast".to_string(),
                Price {
                    amount: 250,
                    asset: "credits".into(),
                },
            )]
            .into(),
            client_requests: [ClientRequest::Roots, ClientRequest::Sampling].into(),
        }
    }

    fn deployment() -> Deployment {
        Deployment {
            origin: "attestplane.test/log".into(),
            genesis: EntryHash::from_bytes([7; 32]),
        }
    }

    fn all_actions() -> Vec<AdminAction> {
        vec![
            AdminAction::RegisterServer(server()),
            AdminAction::UpdateServer(server()),
            AdminAction::RevokeServer {
                id: "weather".into(),
            },
            AdminAction::SetPolicy {
                text: "permit(principal, action, resource);".into(),
            },
            AdminAction::SetIdentityProvider(IdentityProviderSpec {
                issuer: "https://idp.example".into(),
                audience: "attestplane".into(),
                jwks: "{\"keys\":[]}".into(),
            }),
            AdminAction::RemoveIdentityProvider {
                issuer: "https://idp.example".into(),
            },
            AdminAction::RotateAdminKeys {
                keys: vec![[4; 32]],
            },
            AdminAction::AllowImage { pcrs: image(5) },
            AdminAction::SetLimits {
                rates: vec![RateLimit {
                    scope: ScopeKind::Agent,
                    rate_per_minute: 60,
                    burst: 10,
                }],
                spends: vec![SpendCap {
                    scope: ScopeKind::Tenant,
                    asset: "credits".into(),
                    cap: 1_000_000,
                    window_ms: 86_400_000,
                }],
            },
            AdminAction::RegisterServer(ServerSpec {
                pcrs: BTreeMap::new(),
                assurance: Assurance::None,
                prices: BTreeMap::new(),
                client_requests: BTreeSet::new(),
                ..server()
            }),
        ]
    }

    fn image(fill: u8) -> BTreeMap<PcrIndex, PcrHex> {
        (0u8..=2)
            .map(|i| (PcrIndex::try_from(i).unwrap(), PcrHex(Pcr::new([fill; 48]))))
            .collect()
    }

    #[test]
    fn allow_image_without_pcr0_1_2_or_with_a_zero_one_is_refused() {
        let k = SigningKey::from_bytes(&[1; 32]);
        let mut missing = image(5);
        missing.remove(&PcrIndex::try_from(1u8).unwrap());
        let mut debug = image(5);
        debug.insert(PcrIndex::try_from(2u8).unwrap(), PcrHex(Pcr::ZERO));
        for pcrs in [missing, debug, BTreeMap::new()] {
            let req = AdminRequest {
                time: UnixMillis::from_millis(1_000),
                nonce: [9; 16],
                deployment: deployment(),
                action: AdminAction::AllowImage { pcrs },
            };
            let bytes = req.sign(&k.verifying_key(), &k).unwrap();
            assert!(
                matches!(
                    SignedAdminRequest::decode(&bytes),
                    Err(AdminError::Invalid { field: "pcrs", .. })
                ),
                "{:?}",
                SignedAdminRequest::decode(&bytes)
            );
        }
    }

    #[test]
    fn every_action_round_trips_signed() {
        let k = SigningKey::from_bytes(&[1; 32]);
        for action in all_actions() {
            let req = AdminRequest {
                time: UnixMillis::from_millis(1_000),
                nonce: [9; 16],
                deployment: deployment(),
                action,
            };
            let bytes = req.sign(&k.verifying_key(), &k).unwrap();
            let signed = SignedAdminRequest::decode(&bytes).unwrap();
            assert_eq!(signed.request(), &req);
            assert_eq!(
                signed.verify(&[k.verifying_key()]).unwrap(),
                k.verifying_key()
            );
        }
    }

    #[test]
    fn rejects_request_signed_by_non_admin_key() {
        let admin = SigningKey::from_bytes(&[1; 32]);
        let intruder = SigningKey::from_bytes(&[2; 32]);
        let req = AdminRequest {
            time: UnixMillis::from_millis(1_000),
            nonce: [9; 16],
            deployment: deployment(),
            action: AdminAction::RevokeServer { id: "x".into() },
        };
        let bytes = req.sign(&intruder.verifying_key(), &intruder).unwrap();
        let signed = SignedAdminRequest::decode(&bytes).unwrap();
        assert!(matches!(
            signed.verify(&[admin.verifying_key()]),
            Err(AdminError::UnknownAdminKey { .. })
        ));
        // Naming the admin's key id but signing with another key.
        let forged = req.sign(&admin.verifying_key(), &intruder).unwrap();
        let signed = SignedAdminRequest::decode(&forged).unwrap();
        assert!(matches!(
            signed.verify(&[admin.verifying_key()]),
            Err(AdminError::BadSignature { .. })
        ));
    }

    #[test]
    fn admin_signature_cannot_pass_as_entry() {
        let k = SigningKey::from_bytes(&[1; 32]);
        let req = AdminRequest {
            time: UnixMillis::from_millis(1_000),
            nonce: [9; 16],
            deployment: deployment(),
            action: AdminAction::RevokeServer { id: "x".into() },
        };
        let bytes = req.sign(&k.verifying_key(), &k).unwrap();
        assert!(crate::entry::SignedEntry::decode(&bytes).is_err());
    }

    #[test]
    fn freshness_window_is_symmetric() {
        let k = SigningKey::from_bytes(&[1; 32]);
        let req = AdminRequest {
            time: UnixMillis::from_millis(10_000_000),
            nonce: [9; 16],
            deployment: deployment(),
            action: AdminAction::RevokeServer { id: "x".into() },
        };
        let signed =
            SignedAdminRequest::decode(&req.sign(&k.verifying_key(), &k).unwrap()).unwrap();
        assert!(signed.is_fresh_at(UnixMillis::from_millis(
            10_000_000 + ADMIN_REQUEST_WINDOW_MS
        )));
        assert!(signed.is_fresh_at(UnixMillis::from_millis(
            10_000_000 - ADMIN_REQUEST_WINDOW_MS
        )));
        assert!(!signed.is_fresh_at(UnixMillis::from_millis(
            10_000_001 + ADMIN_REQUEST_WINDOW_MS
        )));
        assert!(!signed.is_fresh_at(UnixMillis::from_millis(9_999_999 - ADMIN_REQUEST_WINDOW_MS)));
    }

    /// `v` with its map member `key` replaced by `value`.
    fn with(v: Value, key: &str, value: Value) -> Value {
        let Value::Map(entries) = v else {
            panic!("not a map")
        };
        Value::Map(
            entries
                .into_iter()
                .map(|(k, old)| {
                    let new = if k == Value::Text(key.into()) {
                        value.clone()
                    } else {
                        old
                    };
                    (k, new)
                })
                .collect(),
        )
    }

    #[test]
    fn unknown_assurance_level_is_refused() {
        // Levels named in the design but not built yet, and anything else, are refused: an
        // old verifier must never read a level it does not know as one it does.
        for level in ["webpki", "pinned", "Nitro", ""] {
            let v = with(
                server_to_value(&server()),
                "assurance",
                Value::Text(level.into()),
            );
            assert!(
                matches!(
                    server_from_value(v),
                    Err(AdminError::Invalid {
                        field: "assurance",
                        ..
                    })
                ),
                "{level:?}"
            );
        }
        let v = with(server_to_value(&server()), "assurance", uint(0));
        assert!(server_from_value(v).is_err());
    }

    #[test]
    fn plain_server_with_pcrs_and_prices_of_unpinned_tools_are_refused() {
        // A server of assurance none that names PCRs would read as attested to a careless
        // reader: refused.
        let plain = ServerSpec {
            assurance: Assurance::None,
            ..server()
        };
        assert!(matches!(
            server_from_value(server_to_value(&plain)),
            Err(AdminError::Invalid { field: "pcrs", .. })
        ));
        // A price for a tool the registration does not pin.
        let mut s = server();
        s.prices.insert(
            "unpinned".into(),
            Price {
                amount: 1,
                asset: "credits".into(),
            },
        );
        assert!(matches!(
            server_from_value(server_to_value(&s)),
            Err(AdminError::Invalid {
                field: "prices",
                ..
            })
        ));
        // A client request the gateway does not know, or one listed twice.
        for requests in [
            Value::Array(vec![Value::Text("resources".into())]),
            Value::Array(vec![
                Value::Text("roots".into()),
                Value::Text("roots".into()),
            ]),
            Value::Text("roots".into()),
        ] {
            let v = with(server_to_value(&server()), "client_requests", requests);
            assert!(matches!(
                server_from_value(v),
                Err(AdminError::Invalid {
                    field: "client_requests",
                    ..
                })
            ));
        }
    }

    #[test]
    fn set_limits_with_zero_rates_or_unknown_scopes_is_refused() {
        let bad = [
            AdminAction::SetLimits {
                rates: vec![RateLimit {
                    scope: ScopeKind::Agent,
                    rate_per_minute: 0,
                    burst: 1,
                }],
                spends: vec![],
            },
            AdminAction::SetLimits {
                rates: vec![RateLimit {
                    scope: ScopeKind::Agent,
                    rate_per_minute: 1,
                    burst: 0,
                }],
                spends: vec![],
            },
            AdminAction::SetLimits {
                rates: vec![],
                spends: vec![SpendCap {
                    scope: ScopeKind::User,
                    asset: "credits".into(),
                    cap: 1,
                    window_ms: 0,
                }],
            },
        ];
        // Two rate rules for one scope: the gateway could not tell which applies.
        let twice = AdminAction::SetLimits {
            rates: vec![
                RateLimit {
                    scope: ScopeKind::Agent,
                    rate_per_minute: 60,
                    burst: 1,
                },
                RateLimit {
                    scope: ScopeKind::Agent,
                    rate_per_minute: 6000,
                    burst: 100,
                },
            ],
            spends: vec![],
        };
        assert!(matches!(
            action_from_value(action_to_value(&twice)),
            Err(AdminError::Limits(LimitError::DuplicateRule { .. }))
        ));
        for action in bad {
            assert!(
                action_from_value(action_to_value(&action)).is_err(),
                "{action:?}"
            );
        }
        let v = action_to_value(&AdminAction::SetLimits {
            rates: vec![],
            spends: vec![],
        });
        let scoped = map([
            ("scope", Value::Text("server".into())),
            ("rate_per_minute", uint(1)),
            ("burst", uint(1)),
        ]);
        let v = with(v, "rates", Value::Array(vec![scoped]));
        assert!(matches!(
            action_from_value(v),
            Err(AdminError::Invalid { field: "scope", .. })
        ));
    }

    #[test]
    fn rejects_server_without_pcrs_and_empty_ids() {
        let mut s = server();
        s.pcrs.clear();
        assert!(matches!(
            server_from_value(server_to_value(&s)),
            Err(AdminError::Invalid { field: "pcrs", .. })
        ));
        let mut s = server();
        s.tenant = String::new();
        assert!(matches!(
            server_from_value(server_to_value(&s)),
            Err(AdminError::Invalid {
                field: "tenant",
                ..
            })
        ));
    }

    #[test]
    fn a_request_for_another_deployment_is_refused() {
        let k = SigningKey::from_bytes(&[1; 32]);
        let req = AdminRequest {
            time: UnixMillis::from_millis(1_000),
            nonce: [9; 16],
            deployment: deployment(),
            action: AdminAction::RevokeServer { id: "x".into() },
        };
        let signed =
            SignedAdminRequest::decode(&req.sign(&k.verifying_key(), &k).unwrap()).unwrap();
        assert_eq!(signed.request().deployment, deployment());
        assert!(signed.check_deployment(&deployment()).is_ok());
        // Same log under another origin (a copy served elsewhere), and another log under the
        // same origin (staging and production both called "attestplane.test/log").
        let other_origin = Deployment {
            origin: "attestplane.test/copy".into(),
            ..deployment()
        };
        let other_genesis = Deployment {
            genesis: EntryHash::from_bytes([8; 32]),
            ..deployment()
        };
        for other in [other_origin, other_genesis] {
            let e = signed.check_deployment(&other).unwrap_err();
            assert_eq!(
                e,
                AdminError::OtherDeployment {
                    expected: other.clone(),
                    found: deployment(),
                }
            );
        }
    }

    #[test]
    fn a_request_without_a_deployment_does_not_decode() {
        let payload = cbor::encode(&map([
            ("time", uint(1_000)),
            ("nonce", Value::Bytes(vec![9; 16])),
            (
                "action",
                action_to_value(&AdminAction::RevokeServer { id: "x".into() }),
            ),
        ]))
        .unwrap();
        assert!(AdminRequest::from_payload(&payload).is_err());
        let bad_origin = Deployment {
            origin: "a\nb".into(),
            ..deployment()
        };
        assert!(deployment_from_value(deployment_to_value(&bad_origin)).is_err());
    }
}
