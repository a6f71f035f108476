//! The gateway's pure kernel: everything the enclave decides about an MCP message, as
//! functions the auditor's verifier can run again.
//!
//! The enclave sits in the MCP data path: every `tools/list` and `tools/call` between an agent
//! and a registered server passes through it. The enclave's gateway does the I/O (HTTP, both
//! protocol eras, sessions, upstream connections, durable log entries); the decisions and the
//! byte formats they rest on are here, in the verifier crate, so that `attestplane-verify log`
//! replays each one from the logged facts and gets the same answer:
//!
//! - [`json`]: a strict JSON reader with byte spans (duplicate names, lone surrogates and
//!   unsafe numbers refused), used wherever the gateway looks inside a value.
//! - [`jsonrpc`]: JSON-RPC envelopes with narrow typed views; messages are forwarded byte for
//!   byte and edited only in the member the gateway changes.
//! - [`jcs`]: RFC 8785 canonical JSON, the one form that is hashed.
//! - [`pin`]: tool-definition digests and the pin check of a listed tool set.
//! - [`limits`]: GCRA rate limits and windowed spend caps per tenant, user, agent and tool.
//! - [`pii`]: personal data and secrets in arguments and results, found after normalisation,
//!   reported as kinds, counts and hashes, redacted in place.
//! - [`receipt`]: per-call receipts, the JWS (signed by the epoch key) an MCP server checks
//!   before it runs a tool: who called, which tool, the hash of the arguments as forwarded,
//!   and the log entry that decided the call.
//!
//! ## What this module does not do
//!
//! No I/O, no clock, no async runtime, no HTTP: time and state are parameters, results are
//! values. It does not log: the caller writes the entries that carry its inputs and outputs.
//! Each submodule's essay says what it leaves to the caller.

pub mod jcs;
pub mod json;
pub mod jsonrpc;
pub mod limits;
pub mod pii;
pub mod pin;
pub mod receipt;
