//! # attestplane-enclave: what runs inside the Nitro Enclave
//!
//! Attestplane's control plane — its policy engine and its audit log — runs inside an AWS Nitro
//! Enclave, so that an auditor can prove, without trusting the parent instance, what it decided
//! and that the measured code decided it. This crate is that enclave-side program: it talks to
//! the Nitro Secure Module, holds the epoch signing key, keeps the live state derived from the
//! log, evaluates policy and writes signed log entries, and serves framed requests from the host.
//!
//! ## Layout
//!
//! The crate is a stack; each module uses only the ones below it (and `attestplane-verifier`
//! for every byte format, the state fold and the policy engine):
//!
//! - [`server`]: the thin async shell: accepts connections from the host (vsock, or a Unix
//!   socket or loopback TCP in development), decodes frames with `attestplane-proto`'s bounded
//!   decoder, hands each request to the one [`service::Enclave`], writes replies back. **The
//!   trust boundary**: everything that arrives here is the untrusted host's.
//! - [`gateway`]: the MCP data path inside the enclave (agents' `tools/list` and `tools/call`
//!   decided, logged and relayed with a receipt); it reaches the enclave through the server's
//!   access handle and the service, and decides with the verifier's pure gateway kernel.
//! - [`service`]: request handling as a plain function of (request, time): decisions, the
//!   two-phase durable replies, the replay of the stored log at boot.
//! - [`identity`]: agents' bearer JWTs verified against the identity providers of the state,
//!   with a bounded cache of verified tokens.
//! - [`writer`]: turns events into signed, hash-linked entries under the epoch key, opening
//!   each epoch with an attestation document.
//! - [`mcp_transport`]: the gateway's byte streams: agent connections relayed in by the host,
//!   upstream connections dialled out through it (the seam where TLS will wrap them).
//! - [`epoch`]: the epoch signing key (never leaves enclave memory, zeroized on drop).
//! - [`nsm`]: the Nitro Secure Module behind one trait: the real `/dev/nsm` and a mock that
//!   signs AWS-shaped attestation documents with a chain generated from a seed.
//!
//! `main.rs` (the `attestplane-enclave` binary) only parses flags, picks the NSM and runs the
//! server.
//!
//! ## Trust assumptions
//!
//! Trusted: the enclave image (measured into PCR0/1/2), the Nitro hypervisor and its NSM.
//! Untrusted: the parent instance and everything that reaches the enclave through it — every
//! request, every stored log entry streamed back in at boot, the host's clock for anything but
//! liveness.
//!
//! ## What this crate deliberately does not do
//!
//! - It defines no signed or hashed byte format of Attestplane's own: those live in
//!   `attestplane-verifier`, whose encoders the enclave uses, so the auditor's decoder and the
//!   enclave's encoder are one piece of code. (The mock NSM's attestation documents are AWS's
//!   format, written independently of the verifier's parser on purpose.)
//! - It knows no HTTP and no database; the host-proxy does.
//! - Whether the real or the mock NSM runs is decided at start-up by whoever builds the server,
//!   never by a compile-time switch inside production code.

#![forbid(unsafe_code)]

pub mod epoch;
pub mod gateway;
pub mod identity;
pub mod mcp_transport;
pub mod nsm;
pub mod server;
pub mod service;
pub mod writer;
