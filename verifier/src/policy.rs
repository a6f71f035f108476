//! Cedar policy decisions (stub: the full engine lands in the next commit).

use crate::time::UnixMillis;

/// The Cedar schema for namespace `Attestplane`.
pub const SCHEMA: &str = "";
/// Longest policy text accepted, in bytes.
pub const MAX_POLICY_TEXT_LEN: usize = 256 * 1024;
/// Most policies accepted in one set.
pub const MAX_POLICIES: usize = 10_000;

/// The agent asking.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// Agent id.
    pub agent: String,
    /// User id.
    pub user: String,
    /// Tenant id.
    pub tenant: String,
    /// Roles.
    pub roles: Vec<String>,
    /// Issuer.
    pub issuer: String,
}

/// What the agent asks to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Discover.
    Discover,
    /// Resolve.
    Resolve,
    /// Call.
    Call,
}

/// The server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerFacts {
    /// Id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Tenant.
    pub tenant: String,
    /// Resource URI.
    pub resource: String,
}

/// Attestation facts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttestationFacts {
    /// Verified.
    pub verified: bool,
    /// Age.
    pub age_ms: Option<u64>,
    /// PCR match.
    pub pcr_match: bool,
    /// Debug mode.
    pub debug: bool,
}

/// Counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Calls in the last minute.
    pub calls_last_minute: u64,
    /// Spend.
    pub spend_micros: u64,
}

/// A request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecisionRequest {
    /// Principal.
    pub principal: Principal,
    /// Action.
    pub action: Action,
    /// Server.
    pub server: ServerFacts,
    /// Tool.
    pub tool: Option<String>,
    /// Attestation.
    pub attestation: AttestationFacts,
    /// Time.
    pub time: UnixMillis,
    /// Counters.
    pub counters: Counters,
}

/// A decision.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decision {
    /// Allowed.
    pub allowed: bool,
    /// Determining policies.
    pub policies: Vec<String>,
    /// Errors.
    pub errors: Vec<String>,
}

/// Policy errors.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// Too long.
    #[error("policy text is {len} bytes, more than the maximum {max}")]
    TooLong {
        /// Length.
        len: usize,
        /// Max.
        max: usize,
    },
}

/// The engine.
#[derive(Debug)]
pub struct PolicyEngine {
    text: String,
}

impl PolicyEngine {
    /// Parses a policy set.
    pub fn new(text: &str) -> Result<Self, PolicyError> {
        if text.len() > MAX_POLICY_TEXT_LEN {
            return Err(PolicyError::TooLong {
                len: text.len(),
                max: MAX_POLICY_TEXT_LEN,
            });
        }
        Ok(Self {
            text: text.to_owned(),
        })
    }
    /// Denies everything.
    pub fn deny_all() -> Self {
        Self {
            text: String::new(),
        }
    }
    /// Decides.
    pub fn decide(&self, _req: &DecisionRequest) -> Decision {
        Decision::default()
    }
    /// Decides.
    pub fn decide_unindexed(&self, _req: &DecisionRequest) -> Decision {
        Decision::default()
    }
    /// Count.
    pub fn policy_count(&self) -> usize {
        0
    }
    /// Text.
    pub fn text(&self) -> &str {
        &self.text
    }
}
