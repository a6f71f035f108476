//! # attestplane-verifier: the trust kernel
//!
//! Attestplane's policy engine and audit log run inside an AWS Nitro Enclave. Everything an
//! outsider checks about what that enclave did is a byte string defined in this crate, and every
//! check of those bytes is a function in this crate:
//!
//! - [`attestation`]: AWS Nitro attestation documents (COSE_Sign1, ES384, an X.509 chain to a
//!   pinned root, PCRs, nonce, public key, user data), verified the way AWS documents it, with
//!   the corrections real documents teach.
//! - [`entry`]: log entries, each a COSE_Sign1 (EdDSA, signed by the enclave's epoch key) over a
//!   deterministic CBOR payload `{seq, prev, epoch, time, event}`. The enclave produces its bytes
//!   with the encoder here; the auditor decodes them with the decoder here.
//! - [`log`]: verification of a whole log: signatures, dense sequence numbers, hash links, and
//!   epochs, each opened by an attestation document that binds the epoch key to the measured
//!   image and the epoch to its predecessor.
//! - [`merkle`]: RFC 6962 / RFC 9162 Merkle tree hashing, inclusion and consistency proofs.
//! - [`checkpoint`]: signed tree heads in the C2SP `tlog-checkpoint` signed-note format.
//! - [`handle`]: server handles, EdDSA JWTs checked against a JWKS.
//! - [`eddsa`]: the one set of Ed25519 rules (cofactored, as ZIP 215 defines it, with prime-order
//!   keys) by which every signature of the enclave's keys is checked, alone or in batches.
//!
//! ## Trust assumptions
//!
//! Trusted: the root certificate the caller pins (AWS Nitro Enclaves Root G1 is built in), the
//! expected PCR values the caller supplies, and the time the caller says it is. Nothing else.
//! The bytes under verification are hostile: they may come from a compromised parent instance.
//!
//! ## What this crate deliberately does not do
//!
//! - It never reads a clock. Every verification takes the instant to verify at
//!   ([`time::UnixMillis`]); tests pin it.
//! - It never does I/O: no files, sockets, databases or async runtime. The
//!   `attestplane-verify` binary reads files and hands bytes in.
//! - It depends on no other Attestplane crate; the enclave depends on it, never the reverse.
//! - It does not fetch certificates, revocation lists or anything else from the network: Nitro
//!   leaf certificates live about three hours and AWS publishes no revocation for them.
//!
//! Successful checks return `Verified*` values whose fields are private, so holding one is
//! proof that the check ran and passed.

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

pub mod admin;
pub mod attestation;
pub mod cbor;
pub mod checkpoint;
mod cose;
pub mod eddsa;
pub mod eif;
pub mod entry;
pub mod error;
pub mod gateway;
pub mod handle;
pub mod log;
pub mod merkle;
pub mod policy;
pub mod replay;
pub mod state;
pub mod time;

pub use error::Error;
pub use time::UnixMillis;
