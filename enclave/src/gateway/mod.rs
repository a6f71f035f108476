//! The MCP gateway: every `tools/list` and `tools/call` an agent makes passes through the
//! enclave, is decided there, logged durably, and reaches the MCP server only with a receipt.
//!
//! ## Where it sits
//!
//! ```text
//! agent ──HTTP──▶ host relay (bytes) ──▶ [enclave] http ─▶ inside (decide, sign, log)
//!                                                   │            │ Persist ─▶ host store
//!                                                   │            ◀─ Durable
//!                                                   └▶ upstream ──▶ host dialer (bytes) ──▶ MCP server
//! ```
//!
//! The host relays bytes and parses no MCP. The enclave terminates HTTP here (and TLS, once the
//! confidential transport lands: the streams this module reads and writes are the seam where a
//! TLS acceptor and connector wrap them, and nothing above them changes).
//!
//! ## Layout
//!
//! - [`era`]: which protocol era an agent speaks (legacy `2025-11-25` with sessions, modern
//!   `2026-07-28` stateless) and the header/body checks of the modern era, as pure functions.
//! - [`session`]: the legacy era's sessions, minted by the gateway, random, bound to the agent.
//! - [`upstream`]: the HTTP client toward MCP servers over connections the host dials: the
//!   era each upstream speaks (probed once), plain JSON or SSE answers, bounded.
//! - [`inside`]: what runs on the enclave's handler thread with the enclave itself: the
//!   decision (hard rules, pins, Cedar), the receipt, and the entries written (through the same
//!   `Persist`/`Durable` path as every other entry).
//! - [`redact`]: PII in the path: a call's arguments scanned and redacted before the
//!   decision (policies see the redacted form), the answer treated by the call's rule
//!   (allow, redact, refuse) before the agent sees it.
//! - [`http`]: the HTTP server for agents: `/mcp/{server-id}`, RFC 9728 metadata, 401s.
//! - [`relay`]: a legacy server's server-to-client requests relayed to a legacy agent on the
//!   call's SSE stream, where the server's registration allows their kind.
//!
//! ## What it guarantees
//!
//! - A call is forwarded only after its decision entry is durable, and its answer reaches the
//!   agent only after its result entry is durable. A call whose upstream fails or times out
//!   gets an `aborted` result entry.
//! - The agent's bearer token is never sent upstream; the upstream sees a receipt instead.
//! - Messages are never re-serialised through a typed model: what the gateway forwards is the
//!   bytes it received, with only the members it must change spliced
//!   (`attestplane_verifier::gateway::jsonrpc`).
//!
//! ## What it does not do (yet)
//!
//! Resources and prompts pass only where the policy permits (`read_resource`, `get_prompt`),
//! logged like calls; subscriptions to resources are refused. Server-to-client requests
//! reach the agent only where the server's registration allows their kind: a modern server's
//! `input_required` results to a modern agent, a legacy server's requests on a call's stream
//! to a legacy agent ([`relay`]); any other is answered with an error ([`upstream`]). Rate and spend limits are the verifier kernel's arithmetic and are
//! not applied in the path yet.

pub mod era;
pub mod http;
pub mod inside;
pub mod redact;
pub mod relay;
pub mod session;
pub mod upstream;

use std::time::Duration;

/// The largest agent request body read.
pub const MAX_REQUEST_BODY: usize = 1024 * 1024;

/// The largest upstream response body (or SSE stream) read.
pub const MAX_RESPONSE_BODY: usize = 4 * 1024 * 1024;

/// The gateway's configuration.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// The public base URL agents reach the gateway at (e.g. `http://127.0.0.1:7300`): each
    /// endpoint's resource URI is `{public_base}/mcp/{server-id}`, the audience agents' tokens
    /// must name.
    pub public_base: String,
    /// How long an upstream call may take before it is aborted.
    pub upstream_timeout: Duration,
    /// The most legacy-era sessions held at once.
    pub max_sessions: usize,
    /// How long a legacy session lives without use.
    pub session_idle: Duration,
    /// How long a call waits for its agent's answer to a server-to-client request the gateway
    /// relayed ([`relay`]); then the server is told the agent did not answer.
    pub agent_answer_timeout: Duration,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            public_base: "http://127.0.0.1:7300".into(),
            upstream_timeout: Duration::from_secs(30),
            max_sessions: 10_000,
            session_idle: Duration::from_secs(30 * 60),
            agent_answer_timeout: Duration::from_secs(120),
        }
    }
}

impl GatewayConfig {
    /// The resource URI of server `id`'s endpoint.
    pub fn resource(&self, id: &str) -> String {
        format!("{}/mcp/{id}", self.public_base.trim_end_matches('/'))
    }

    /// The URL of the RFC 9728 protected-resource metadata of server `id`'s endpoint.
    pub fn metadata_url(&self, id: &str) -> String {
        format!(
            "{}/.well-known/oauth-protected-resource/mcp/{id}",
            self.public_base.trim_end_matches('/')
        )
    }
}
