//! # attestplane (host proxy): what runs on the parent instance
//!
//! The enclave decides and signs; the host proxy carries. It owns everything the enclave cannot
//! have: the disk, the network, the clients. This library holds its parts; the `attestplane`
//! binary wires them together.
//!
//! - [`store`]: the durable home of the signed log. Entries live in append-only segment files,
//!   appended with a group commit (concurrent appenders share one `fdatasync`), and nothing is
//!   acknowledged before it is durable. It serves entries, ranges, the head, the latest
//!   checkpoint and Merkle proofs, and streams the log back into the enclave at boot.
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
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

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
