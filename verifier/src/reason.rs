//! Refusal reasons: typed codes, logged in entries; their text is derived, never logged.
//!
//! Every refusal the control plane logs (a denied decision, a refused admin request, refused
//! attestation evidence) carries a [`Reason`]: a stable code with the data that helps a reader
//! (which policies forbade, which server, which key). In an entry a reason is the deterministic
//! CBOR map `{"code": text, ...data}`; the English text is [`Reason`]'s `Display` and may be
//! reworded freely, because nothing compares it: replay compares reasons as values, the enclave
//! picks wire error codes by matching the enum ([`Reason::is_not_found`]), and an auditor's
//! tooling reads [`Reason::code`].
//!
//! Codes are part of the log format: a code is never renamed or reused, and a new refusal gets
//! a new code (an old verifier refuses an entry whose code it does not know, as it refuses an
//! unknown event).

use std::fmt;

use ciborium::value::Value;
use serde::Serialize;
use thiserror::Error;

use crate::attestation::AttestationError;
use crate::cbor::{Fields, ShapeError, map, texts, uint};
use crate::eddsa::KeyId;

/// Why a request, a decision or a piece of evidence was refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "code", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Reason {
    // --- Decisions (resolve, call, discover).
    /// The server is not registered (decisions, admin updates and revocations, evidence).
    UnknownServer {
        /// The id asked for.
        server: String,
    },
    /// The server belongs to another tenant than the agent.
    OtherTenant,
    /// The server holds no verified attestation.
    NotAttested,
    /// The server's last verified attestation is older than its registration allows.
    AttestationStale,
    /// The called tool is not pinned in the server's registration.
    ToolNotPinned {
        /// The tool asked for.
        tool: String,
    },
    /// The policy could not be evaluated; deny.
    PolicyError,
    /// No policy permits the request (deny by default).
    NoPermit,
    /// One or more `forbid` policies determined the denial.
    Forbidden {
        /// Their ids, sorted.
        policies: Vec<String>,
    },
    /// The call's arguments carry PII and the `@pii` rule of the permits that allowed it is
    /// `refuse`.
    PiiRefused,
    /// The call is over a rate limit (GCRA) for this scope.
    RateLimited {
        /// `tenant`, `user`, `agent` or `tool`.
        scope: String,
    },
    /// The call's price would take a spend cap's window over its cap.
    SpendCapReached {
        /// `tenant`, `user`, `agent` or `tool`.
        scope: String,
        /// The capped asset.
        asset: String,
    },

    // --- Admin requests.
    /// The request does not decode as an admin request.
    MalformedRequest,
    /// The request is signed by a key that is not a current admin key.
    UnknownAdminKey {
        /// The key id the request names.
        kid: KeyId,
    },
    /// The signature does not verify under the admin key it names.
    BadAdminSignature {
        /// The key id the request names.
        kid: KeyId,
    },
    /// The request's time is outside the window around the enclave's clock.
    StaleRequest,
    /// The request's nonce was used by an earlier request.
    ReplayedNonce,
    /// The request names another deployment (another log, or this log under another origin):
    /// the logged request says which.
    OtherDeployment,
    /// The log has no genesis entry yet, so no request can name it.
    NoGenesis,
    /// A server with this id is already registered.
    ServerExists {
        /// The id.
        server: String,
    },
    /// The registry holds the most servers it may.
    RegistryFull,
    /// The policy text does not parse or does not validate against the schema.
    InvalidPolicy,
    /// The identity provider's JWKS does not parse or holds no usable Ed25519 key.
    InvalidJwks,
    /// The most identity providers are installed.
    TooManyIdentityProviders,
    /// No identity provider with this issuer is installed.
    UnknownIdentityProvider {
        /// The issuer.
        issuer: String,
    },
    /// An admin key set is empty, too large, or holds an unusable key.
    UnusableAdminKey,
    /// The image an `allow_image` names is allowed already.
    ImageAlreadyAllowed,
    /// The log allows the most images it may.
    TooManyAllowedImages,

    // --- Attestation evidence.
    /// The nonce is not one the enclave issued for this server and still holds: never
    /// issued, already used, or expired. Evidence refused so changes nothing.
    NonceNotIssued,
    /// The server is registered without an attestation (assurance `none`): there is nothing
    /// to verify a document against.
    NotAttestable,
    /// The document does not parse as a Nitro attestation document.
    DocumentMalformed,
    /// The document's signature or certificate chain does not verify to the pinned root.
    DocumentUntrusted,
    /// A certificate of the chain, or the document's timestamp, is not valid at the time.
    DocumentNotValidAt,
    /// The document is older than the freshness the enclave demands.
    DocumentTooOld,
    /// The document comes from a debug-mode enclave and the registration does not allow it.
    DebugMode,
    /// A registered PCR is missing from the document or differs.
    PcrMismatch {
        /// The PCR's index.
        index: u8,
    },
    /// The document does not carry the nonce the enclave issued.
    NonceMismatch,
}

/// Why a logged reason does not decode (the entry decoder reports it as its own error).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ReasonError {
    /// The reason is not a map of the fields its code defines.
    #[error("{0}")]
    Shape(#[from] ShapeError),
    /// The code is not one this version knows.
    #[error("unknown reason code {code:?}")]
    UnknownCode {
        /// The code found.
        code: String,
    },
}

impl Reason {
    /// The stable code, as logged.
    pub fn code(&self) -> &'static str {
        match self {
            Reason::UnknownServer { .. } => "unknown_server",
            Reason::OtherTenant => "other_tenant",
            Reason::NotAttested => "not_attested",
            Reason::AttestationStale => "attestation_stale",
            Reason::ToolNotPinned { .. } => "tool_not_pinned",
            Reason::PolicyError => "policy_error",
            Reason::NoPermit => "no_permit",
            Reason::Forbidden { .. } => "forbidden",
            Reason::PiiRefused => "pii_refused",
            Reason::RateLimited { .. } => "rate_limited",
            Reason::SpendCapReached { .. } => "spend_cap_reached",
            Reason::MalformedRequest => "malformed_request",
            Reason::UnknownAdminKey { .. } => "unknown_admin_key",
            Reason::BadAdminSignature { .. } => "bad_admin_signature",
            Reason::StaleRequest => "stale_request",
            Reason::ReplayedNonce => "replayed_nonce",
            Reason::OtherDeployment => "other_deployment",
            Reason::NoGenesis => "no_genesis",
            Reason::ServerExists { .. } => "server_exists",
            Reason::RegistryFull => "registry_full",
            Reason::InvalidPolicy => "invalid_policy",
            Reason::InvalidJwks => "invalid_jwks",
            Reason::TooManyIdentityProviders => "too_many_identity_providers",
            Reason::UnknownIdentityProvider { .. } => "unknown_identity_provider",
            Reason::UnusableAdminKey => "unusable_admin_key",
            Reason::ImageAlreadyAllowed => "image_already_allowed",
            Reason::TooManyAllowedImages => "too_many_allowed_images",
            Reason::NonceNotIssued => "nonce_not_issued",
            Reason::NotAttestable => "not_attestable",
            Reason::DocumentMalformed => "document_malformed",
            Reason::DocumentUntrusted => "document_untrusted",
            Reason::DocumentNotValidAt => "document_not_valid_at",
            Reason::DocumentTooOld => "document_too_old",
            Reason::DebugMode => "debug_mode",
            Reason::PcrMismatch { .. } => "pcr_mismatch",
            Reason::NonceMismatch => "nonce_mismatch",
        }
    }

    /// Whether the refusal means "no such thing" (an unknown server or tool) rather than a
    /// verdict: the enclave answers these with its `NotFound` error code.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            Reason::UnknownServer { .. } | Reason::ToolNotPinned { .. }
        )
    }

    /// Whether refused evidence with this reason says something about the server (and so
    /// withdraws its earlier attestation) or only about the request that carried it (a nonce
    /// the enclave did not issue, an unknown or unattestable server), which changes nothing.
    pub fn withdraws_attestation(&self) -> bool {
        !matches!(
            self,
            Reason::NonceNotIssued | Reason::UnknownServer { .. } | Reason::NotAttestable
        )
    }

    /// The reason for an attestation document that failed verification.
    pub fn of_attestation_error(e: &AttestationError) -> Self {
        use AttestationError as E;
        match e {
            E::UntrustedRoot { .. }
            | E::CertificateMalformed { .. }
            | E::UnsupportedSignatureAlgorithm { .. }
            | E::UnsupportedPublicKey { .. }
            | E::IssuerMismatch { .. }
            | E::CertificateSignature { .. }
            | E::NotCa { .. }
            | E::BasicConstraintsNotCritical { .. }
            | E::MissingKeyCertSign { .. }
            | E::PathLenExceeded { .. }
            | E::LeafIsCa { .. }
            | E::LeafMissingDigitalSignature { .. }
            | E::UnsupportedCriticalExtension { .. }
            | E::ChainTooLong { .. }
            | E::BadSignature
            | E::TrustAnchor { .. } => Reason::DocumentUntrusted,
            E::NotYetValid { .. } | E::Expired { .. } | E::TimestampInFuture { .. } => {
                Reason::DocumentNotValidAt
            }
            E::TooOld { .. } | E::MaxAgeNeedsInstant => Reason::DocumentTooOld,
            E::DebugMode => Reason::DebugMode,
            E::ExpectedPcrMissing { index } | E::PcrMismatch { index, .. } => {
                Reason::PcrMismatch { index: index.get() }
            }
            E::ExpectedFieldMissing { .. } | E::FieldMismatch { .. } => Reason::NonceMismatch,
            _ => Reason::DocumentMalformed,
        }
    }

    pub(crate) fn to_value(&self) -> Value {
        let code = ("code", Value::Text(self.code().into()));
        match self {
            Reason::UnknownServer { server } | Reason::ServerExists { server } => {
                map([code, ("server", Value::Text(server.clone()))])
            }
            Reason::ToolNotPinned { tool } => map([code, ("tool", Value::Text(tool.clone()))]),
            Reason::RateLimited { scope } => map([code, ("scope", Value::Text(scope.clone()))]),
            Reason::SpendCapReached { scope, asset } => map([
                code,
                ("scope", Value::Text(scope.clone())),
                ("asset", Value::Text(asset.clone())),
            ]),
            Reason::Forbidden { policies } => map([code, ("policies", texts(policies))]),
            Reason::UnknownAdminKey { kid } | Reason::BadAdminSignature { kid } => {
                map([code, ("kid", Value::Bytes(kid.as_bytes().to_vec()))])
            }
            Reason::UnknownIdentityProvider { issuer } => {
                map([code, ("issuer", Value::Text(issuer.clone()))])
            }
            Reason::PcrMismatch { index } => map([code, ("index", uint(u64::from(*index)))]),
            _ => map([code]),
        }
    }

    pub(crate) fn from_value(value: Value) -> Result<Self, ReasonError> {
        let mut f = Fields::new(value, "reason")?;
        let code = f.text("code")?;
        let reason = match code.as_str() {
            "unknown_server" => Reason::UnknownServer {
                server: f.text("server")?,
            },
            "other_tenant" => Reason::OtherTenant,
            "not_attested" => Reason::NotAttested,
            "attestation_stale" => Reason::AttestationStale,
            "tool_not_pinned" => Reason::ToolNotPinned {
                tool: f.text("tool")?,
            },
            "policy_error" => Reason::PolicyError,
            "no_permit" => Reason::NoPermit,
            "forbidden" => Reason::Forbidden {
                policies: f.texts("policies")?,
            },
            "pii_refused" => Reason::PiiRefused,
            "rate_limited" => Reason::RateLimited {
                scope: f.text("scope")?,
            },
            "spend_cap_reached" => Reason::SpendCapReached {
                scope: f.text("scope")?,
                asset: f.text("asset")?,
            },
            "malformed_request" => Reason::MalformedRequest,
            "unknown_admin_key" => Reason::UnknownAdminKey {
                kid: KeyId::from_bytes(f.array("kid")?),
            },
            "bad_admin_signature" => Reason::BadAdminSignature {
                kid: KeyId::from_bytes(f.array("kid")?),
            },
            "stale_request" => Reason::StaleRequest,
            "replayed_nonce" => Reason::ReplayedNonce,
            "other_deployment" => Reason::OtherDeployment,
            "no_genesis" => Reason::NoGenesis,
            "server_exists" => Reason::ServerExists {
                server: f.text("server")?,
            },
            "registry_full" => Reason::RegistryFull,
            "invalid_policy" => Reason::InvalidPolicy,
            "invalid_jwks" => Reason::InvalidJwks,
            "too_many_identity_providers" => Reason::TooManyIdentityProviders,
            "unknown_identity_provider" => Reason::UnknownIdentityProvider {
                issuer: f.text("issuer")?,
            },
            "unusable_admin_key" => Reason::UnusableAdminKey,
            "image_already_allowed" => Reason::ImageAlreadyAllowed,
            "too_many_allowed_images" => Reason::TooManyAllowedImages,
            "nonce_not_issued" => Reason::NonceNotIssued,
            "not_attestable" => Reason::NotAttestable,
            "document_malformed" => Reason::DocumentMalformed,
            "document_untrusted" => Reason::DocumentUntrusted,
            "document_not_valid_at" => Reason::DocumentNotValidAt,
            "document_too_old" => Reason::DocumentTooOld,
            "debug_mode" => Reason::DebugMode,
            "pcr_mismatch" => {
                let index = f.u64("index")?;
                Reason::PcrMismatch {
                    index: u8::try_from(index).ok().filter(|i| *i < 32).ok_or(
                        ShapeError::Field {
                            field: "index",
                            expected: "a PCR index 0..=31",
                        },
                    )?,
                }
            }
            "nonce_mismatch" => Reason::NonceMismatch,
            _ => return Err(ReasonError::UnknownCode { code }),
        };
        f.finish()?;
        Ok(reason)
    }
}

/// The derived text: free to change, never compared.
impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::UnknownServer { server } => write!(f, "unknown server {server:?}"),
            Reason::OtherTenant => f.write_str("server belongs to another tenant"),
            Reason::NotAttested => f.write_str("server has no verified attestation"),
            Reason::AttestationStale => f.write_str("server attestation is stale"),
            Reason::ToolNotPinned { tool } => {
                write!(f, "tool {tool:?} is not pinned in the registration")
            }
            Reason::PolicyError => f.write_str("policy evaluation failed (deny)"),
            Reason::NoPermit => f.write_str("no policy permits it (deny by default)"),
            Reason::Forbidden { policies } => {
                write!(f, "forbidden by policy {}", policies.join(", "))
            }
            Reason::PiiRefused => {
                f.write_str("the arguments carry PII and the policy's rule refuses it")
            }
            Reason::RateLimited { scope } => write!(f, "over the {scope} rate limit"),
            Reason::SpendCapReached { scope, asset } => {
                write!(f, "the {scope} spend cap for {asset} is reached")
            }
            Reason::MalformedRequest => f.write_str("not a well-formed admin request"),
            Reason::UnknownAdminKey { kid } => {
                write!(f, "signed by {kid}, which is not a current admin key")
            }
            Reason::BadAdminSignature { kid } => write!(f, "bad signature by admin key {kid}"),
            Reason::StaleRequest => {
                f.write_str("request time is outside the window around the enclave's clock")
            }
            Reason::ReplayedNonce => f.write_str("replayed request: nonce already used"),
            Reason::OtherDeployment => f.write_str(
                "the request is for another deployment (another log, or this log under another \
                 origin)",
            ),
            Reason::NoGenesis => {
                f.write_str("the log has no genesis entry: no admin request can name it yet")
            }
            Reason::ServerExists { server } => write!(f, "server {server:?} is already registered"),
            Reason::RegistryFull => f.write_str("the registry is full"),
            Reason::InvalidPolicy => f.write_str("the policy does not validate"),
            Reason::InvalidJwks => {
                f.write_str("identity provider JWKS holds no usable Ed25519 key")
            }
            Reason::TooManyIdentityProviders => f.write_str("too many identity providers"),
            Reason::UnknownIdentityProvider { issuer } => {
                write!(f, "no identity provider {issuer:?}")
            }
            Reason::UnusableAdminKey => f.write_str("unusable admin key set"),
            Reason::ImageAlreadyAllowed => f.write_str("the image is already allowed"),
            Reason::TooManyAllowedImages => f.write_str("too many allowed images"),
            Reason::NonceNotIssued => f.write_str(
                "no outstanding challenge with this nonce for this server \
                 (never issued, already used or expired)",
            ),
            Reason::NotAttestable => {
                f.write_str("the server is registered without attestation (assurance none)")
            }
            Reason::DocumentMalformed => f.write_str("the attestation document is malformed"),
            Reason::DocumentUntrusted => {
                f.write_str("the attestation document does not verify to the pinned root")
            }
            Reason::DocumentNotValidAt => {
                f.write_str("the attestation document is not valid at this time")
            }
            Reason::DocumentTooOld => f.write_str("the attestation document is too old"),
            Reason::DebugMode => f.write_str("the attestation document is from debug mode"),
            Reason::PcrMismatch { index } => {
                write!(f, "pcr {index} differs from the registration")
            }
            Reason::NonceMismatch => {
                f.write_str("the attestation document does not carry the issued nonce")
            }
        }
    }
}

/// `Some(reason)` as its map, `None` as null.
pub(crate) fn opt_reason(r: &Option<Reason>) -> Value {
    r.as_ref().map_or(Value::Null, Reason::to_value)
}

/// Reads an optional reason.
pub(crate) fn take_opt_reason(
    f: &mut Fields,
    field: &'static str,
) -> Result<Option<Reason>, ReasonError> {
    match f.take(field)? {
        Value::Null => Ok(None),
        v => Ok(Some(Reason::from_value(v)?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<Reason> {
        vec![
            Reason::UnknownServer { server: "s".into() },
            Reason::OtherTenant,
            Reason::NotAttested,
            Reason::AttestationStale,
            Reason::ToolNotPinned { tool: "t".into() },
            Reason::PolicyError,
            Reason::NoPermit,
            Reason::Forbidden {
                policies: vec!["p0".into(), "p1".into()],
            },
            Reason::PiiRefused,
            Reason::RateLimited {
                scope: "agent".into(),
            },
            Reason::SpendCapReached {
                scope: "tenant".into(),
                asset: "USDC".into(),
            },
            Reason::MalformedRequest,
            Reason::UnknownAdminKey {
                kid: KeyId::from_bytes([1; 32]),
            },
            Reason::BadAdminSignature {
                kid: KeyId::from_bytes([2; 32]),
            },
            Reason::StaleRequest,
            Reason::ReplayedNonce,
            Reason::OtherDeployment,
            Reason::NoGenesis,
            Reason::ServerExists { server: "s".into() },
            Reason::RegistryFull,
            Reason::InvalidPolicy,
            Reason::InvalidJwks,
            Reason::TooManyIdentityProviders,
            Reason::UnknownIdentityProvider { issuer: "i".into() },
            Reason::UnusableAdminKey,
            Reason::ImageAlreadyAllowed,
            Reason::TooManyAllowedImages,
            Reason::NonceNotIssued,
            Reason::NotAttestable,
            Reason::DocumentMalformed,
            Reason::DocumentUntrusted,
            Reason::DocumentNotValidAt,
            Reason::DocumentTooOld,
            Reason::DebugMode,
            Reason::PcrMismatch { index: 2 },
            Reason::NonceMismatch,
        ]
    }

    #[test]
    fn every_reason_round_trips_under_its_own_code() {
        let mut codes = std::collections::BTreeSet::new();
        for r in all() {
            assert!(codes.insert(r.code()), "code {} used twice", r.code());
            let back = Reason::from_value(r.to_value()).unwrap();
            assert_eq!(back, r);
            let json = serde_json::to_value(&r).unwrap();
            assert_eq!(json["code"], r.code());
        }
    }

    #[test]
    fn rejects_unknown_code_and_extra_data() {
        let v = map([("code", Value::Text("launch_missiles".into()))]);
        assert_eq!(
            Reason::from_value(v),
            Err(ReasonError::UnknownCode {
                code: "launch_missiles".into()
            })
        );
        let v = map([
            ("code", Value::Text("no_permit".into())),
            ("policies", texts(&[])),
        ]);
        assert!(Reason::from_value(v).is_err());
        let v = map([
            ("code", Value::Text("pcr_mismatch".into())),
            ("index", uint(32)),
        ]);
        assert!(Reason::from_value(v).is_err());
    }
}
