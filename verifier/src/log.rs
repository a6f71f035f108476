//! Placeholder: being written.

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    /// Placeholder.
    #[error("placeholder")]
    Placeholder,
}
