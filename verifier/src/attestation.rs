//! Placeholder: being written.

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttestationError {
    /// Placeholder.
    #[error("placeholder")]
    Placeholder,
}
