//! Placeholder: being written.

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandleError {
    /// Placeholder.
    #[error("placeholder")]
    Placeholder,
}
