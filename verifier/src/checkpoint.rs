//! Placeholder: being written.

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// Placeholder.
    #[error("placeholder")]
    Placeholder,
}
