//! The crate's one error type.
//!
//! Each module owns the part of the taxonomy that concerns it (`AttestationError`,
//! `EntryError`, `LogError`, `MerkleError`, `CheckpointError`, `HandleError`);
//! [`Error`](enum@Error) gathers them for callers that handle any failure alike. Variants
//! carry the evidence: the first bad sequence number, the expected and found values. Messages
//! are lower-case and compose.

use thiserror::Error;

/// Any failure of this crate.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// An attestation document failed to parse or verify.
    #[error("attestation: {0}")]
    Attestation(#[from] crate::attestation::AttestationError),
    /// A file of expected PCR values was refused.
    #[error("pcrs: {0}")]
    Pcrs(#[from] crate::attestation::PcrsJsonError),
    /// An admin request failed to decode or verify.
    #[error("admin: {0}")]
    Admin(#[from] crate::admin::AdminError),
    /// A log entry failed to encode, decode or verify on its own.
    #[error("entry: {0}")]
    Entry(#[from] crate::entry::EntryError),
    /// A log failed to verify as a whole.
    #[error("log: {0}")]
    Log(#[from] crate::log::LogError),
    /// A Merkle proof failed to verify.
    #[error("merkle: {0}")]
    Merkle(#[from] crate::merkle::MerkleError),
    /// A checkpoint failed to parse or verify.
    #[error("checkpoint: {0}")]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    /// A handle (JWT) failed to parse or verify.
    #[error("handle: {0}")]
    Handle(#[from] crate::handle::HandleError),
}
