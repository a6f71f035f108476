//! The operator's, agent's and auditor's commands of the `attestplane` CLI: HTTP clients of the
//! proxy's API (docs/http-api.md).

use std::path::PathBuf;

use clap::Subcommand;

/// Settings every client command may use, resolved from flags, environment and the TOML config
/// by `main` (flags win over the environment, which wins over the file).
#[derive(Clone, Debug)]
pub struct ClientContext {
    /// The proxy's base URL, e.g. `http://127.0.0.1:7400`.
    pub url: String,
    /// Print data as JSON instead of text.
    pub json: bool,
    /// The admin signing key file (hex ed25519 secret) for admin requests.
    pub admin_key: Option<PathBuf>,
    /// The agent's bearer token file (a JWT).
    pub token: Option<PathBuf>,
    /// The development identity provider's key file (hex ed25519 secret), for `token mint`.
    pub idp_key: Option<PathBuf>,
    /// The development identity provider's issuer (`iss`) and audience (`aud`).
    pub idp_issuer: Option<String>,
    /// See `idp_issuer`.
    pub idp_audience: Option<String>,
    /// PEM root the control plane's attestation document must chain to (default: AWS Nitro
    /// root G1); the mock's in development.
    pub root: Option<PathBuf>,
    /// JSON file of the control plane's expected PCRs (the `--pcrs` format of attestplane-verify).
    pub pcrs: Option<PathBuf>,
    /// Accept a debug-mode control plane (development only).
    pub allow_debug: bool,
}

/// The client commands.
#[derive(Debug, Subcommand)]
pub enum ClientCommand {}

/// Runs one client command; the returned code is the process's exit code (0 success, 1 refused
/// or failed verification, 2 usage or I/O error).
pub async fn run(command: ClientCommand, _context: &ClientContext) -> anyhow::Result<u8> {
    match command {}
}
