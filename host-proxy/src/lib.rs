//! # attestplane (host proxy): what runs on the parent instance
//!
//! The enclave decides and signs; the host proxy carries. It owns everything the enclave cannot
//! have: the disk, the network, the clients. This library holds its parts; the `attestplane`
//! binary wires them together.
//!
//! ## Layout
//!
//! - [`proxy`]: `attestplane proxy`, wiring the parts below into one process: it opens the
//!   store, starts the enclave client, serves the API and the relays, and shuts down
//!   gracefully.
//! - [`api`]: the HTTP API (docs/http-api.md): `router(state)`, handlers by audience, one
//!   error type mapped to statuses and stable codes, and the JSON body types ([`api::body`])
//!   the CLI shares. Each request becomes one enclave request or a read of the store.
//! - [`relay`]: the MCP data path's byte relays (agents to the enclave's gateway, the enclave
//!   to MCP servers); the gateway's decisions are the enclave's, the host only copies bytes.
//! - [`enclave_client`]: persistent connections to the enclave over `attestplane-proto`,
//!   requests multiplexed by id, the two-phase durability protocol (entries stored, in seq
//!   order, before the enclave releases a reply) and the replay of the stored log at boot.
//! - [`registry`]: where registered MCP servers live, read from the admin entries of the
//!   stored log (to fetch their attestation documents).
//! - [`store`]: the durable home of the signed log: append-only segment files written with a
//!   group commit, nothing acknowledged before it is durable; entries, ranges, the head, the
//!   latest checkpoint and Merkle proofs.
//! - [`cli`]: the operator's, agent's and auditor's commands, HTTP clients of the API.
//! - [`config`]: the configuration file, flags and environment, resolved.
//! - [`dev`]: `attestplane dev`, the whole stack on one machine on a mock NSM.
//!
//! Dependencies point down the list: `proxy` uses `api`, `relay`, `enclave_client`, `config`
//! and `store`; `api` and `relay` use `registry` and `store` (`api` also `enclave_client`);
//! `enclave_client` and `registry` use `store`; `cli` uses only `api::body` of the server
//! side; `dev` runs `proxy` in-process and makes its starter admin requests with `cli`'s code. **The trust boundary** is everywhere at once: every byte from the enclave, an
//! agent, an MCP server or the disk is input to check, and nothing this crate serves needs to
//! be believed (the enclave signed what matters).
//!
//! ## Trust assumptions
//!
//! The host is untrusted by everyone else: auditors and the enclave verify every byte it hands
//! them (signatures, hash links, checkpoints, proofs). The host proxy therefore adds no security
//! of its own to the log's contents; what it must get right is *liveness and durability*: never
//! tell the enclave an entry is durable before it is, never lose an acknowledged entry, and
//! never silently drop or reorder what it stored.
//!
//! ## What this crate deliberately does not do
//!
//! - It does not depend on the enclave crate (an architecture invariant checked by
//!   `scripts/check-architecture`): it talks to the enclave through `attestplane-proto` only.
//! - It does not verify signatures of log entries; the enclave does at replay and the auditor
//!   does with `attestplane-verify`.
//! - It holds no key that signs anything the enclave signs.

#![forbid(unsafe_code)]

pub mod api;
pub mod cli;
pub mod config;
pub mod dev;
pub mod enclave_client;
pub mod proxy;
pub mod registry;
pub mod relay;
pub mod store;

pub use store::{Store, StoreError};
