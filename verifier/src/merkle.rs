//! Placeholder: being written.

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MerkleError {
    /// Placeholder.
    #[error("placeholder")]
    Placeholder,
}
