//! `attestplane proxy`.
use clap::Args;

use crate::config::ProxySection;

/// `attestplane proxy` flags.
#[derive(Debug, Args)]
pub struct ProxyArgs {}

/// Runs the proxy until SIGINT/SIGTERM.
pub async fn main(_args: ProxyArgs, _file: &ProxySection) -> anyhow::Result<u8> {
    anyhow::bail!("not built yet")
}
