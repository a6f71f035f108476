//! # attestplane-verifier: the trust kernel
//!
//! Attestplane's policy engine and audit log run inside an AWS Nitro Enclave. Everything an
//! outsider checks about what that enclave did is a byte string defined in this crate, and every
//! check of those bytes is a function in this crate.
//!
//! ## Layout
//!
//! Byte formats and their primitives, at the bottom:
//!
//! - [`cbor`]: deterministic CBOR (the encoder of every signed payload, a strict decoder, and
//!   the one splitter of RFC 8742 CBOR sequences, the export format of the log).
//! - `cose` (private): the COSE_Sign1 / EdDSA profile that entries and admin requests share.
//! - [`time`]: [`UnixMillis`], the explicit instant every verification takes.
//! - [`entry`]: log entries, each a COSE_Sign1 (EdDSA, signed by the enclave's epoch key) over a
//!   deterministic CBOR payload `{seq, prev, epoch, time, event}`. The enclave produces its bytes
//!   with the encoder here; the auditor decodes them with the decoder here.
//! - [`admin`]: signed admin requests, the only way the registry, policy, identity providers
//!   and admin keys change.
//! - [`merkle`]: RFC 6962 / RFC 9162 Merkle tree hashing, inclusion and consistency proofs.
//! - [`checkpoint`]: signed tree heads in the C2SP `tlog-checkpoint` signed-note format.
//! - [`handle`]: EdDSA JWTs: the one JWT encoder, server handles checked against a JWKS, and
//!   the claims of agents' identity tokens.
//! - [`eddsa`]: the one set of Ed25519 rules (cofactored, as ZIP 215 defines it, with
//!   prime-order keys) by which every signature of the enclave's keys is checked, alone or in
//!   batches.
//!
//! Checks of what the enclave and the host hand out:
//!
//! - [`attestation`]: AWS Nitro attestation documents (COSE_Sign1, ES384, an X.509 chain to a
//!   pinned root, PCRs, nonce, public key, user data), verified the way AWS documents it, with
//!   the corrections real documents teach; and the one reader of PCR files.
//! - [`eif`]: enclave image files and their measurements (PCR0/1/2/8), to tie a log's epochs
//!   to a commit.
//! - [`log`]: verification of a whole log: signatures, dense sequence numbers, hash links, and
//!   epochs, each opened by an attestation document that binds the epoch key to the measured
//!   image and the epoch to its predecessor.
//!
//! The control plane's decisions, as pure functions both the enclave and the auditor run:
//!
//! - [`policy`]: Cedar policy decisions (the one function the enclave decides with and the
//!   auditor replays).
//! - [`reason`]: typed refusal reasons, logged as codes; their text is derived, never compared.
//! - [`state`]: the state fold: registry, policy, identity providers and admin keys as a pure
//!   function of the log; the enclave computes each event with the same queries.
//! - [`replay`]: log verification and the state fold as one loop, used by the auditor's
//!   `attestplane-verify log` and by the enclave at boot.
//! - [`gateway`]: the MCP gateway's pure kernel (JSON-RPC framing limits, canonical JSON, tool
//!   pinning, PII findings, call receipts), re-run by the auditor.
//! - [`error`]: [`Error`], the crate's one error type over each module's own.
//!
//! Dependencies point up this list (`log` uses `entry`, `attestation` and `checkpoint`;
//! `state` uses `admin`, `policy` and `log`; `replay` joins `log` and `state`), with the
//! cycles a shared vocabulary brings between sibling formats (`entry` names `admin` requests,
//! `log` and `state` refer to each other's types). **The trust boundary** is this crate's
//! input: every byte string handed to it is hostile, from whoever holds it.
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
pub mod reason;
pub mod replay;
pub mod state;
pub mod time;

pub use error::Error;
pub use time::UnixMillis;
