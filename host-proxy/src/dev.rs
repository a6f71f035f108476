//! `attestplane dev`.
use clap::Args;

/// `attestplane dev` flags.
#[derive(Debug, Args)]
pub struct DevArgs {}

/// Runs the local stack until Ctrl-C.
pub async fn main(_args: DevArgs) -> anyhow::Result<u8> {
    anyhow::bail!("not built yet")
}
