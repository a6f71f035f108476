//! `attestplane`: the host proxy and the CLI of operators, agents and auditors.
//!
//! - `attestplane proxy` serves the HTTP API (docs/http-api.md) on the parent instance, stores
//!   the log durably and talks to the enclave over vsock (a Unix socket or loopback TCP locally).
//! - `attestplane dev` runs the whole stack on one machine: the enclave binary on a mock NSM, a
//!   demo attested MCP server, and the proxy, with development keys in a data directory.
//! - The other commands are HTTP clients of the API (`servers`, `policy`, `token`, `handle`,
//!   `log`, `keys`).
//!
//! Settings come from flags, then `ATTESTPLANE_*` environment variables, then the TOML file
//! named by `--config` / `ATTESTPLANE_CONFIG` (see `config.rs`), then built-in defaults.
//! Exit codes: 0 success, 1 refused or failed verification, 2 usage or I/O error.

use std::path::PathBuf;
use std::process::ExitCode;

use attestplane_host::cli::{self, ClientCommand, ClientContext};
use attestplane_host::config::ConfigFile;
use attestplane_host::dev::{self, DevArgs};
use attestplane_host::proxy::{self, ProxyArgs};
use clap::{Parser, Subcommand};

/// The default proxy URL of client commands.
const DEFAULT_URL: &str = "http://127.0.0.1:7400";

/// Attestplane: an attested control plane for MCP servers.
#[derive(Debug, Parser)]
#[command(name = "attestplane", version)]
struct Cli {
    /// TOML configuration file.
    #[arg(long, global = true, env = "ATTESTPLANE_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print data as JSON.
    #[arg(long, global = true)]
    json: bool,
    /// The proxy's base URL (client commands); http:// only: this build has no TLS, so put the
    /// proxy on loopback or behind a TLS-terminating front end.
    #[arg(long, global = true, env = "ATTESTPLANE_URL", value_name = "URL")]
    url: Option<String>,
    /// Admin key file (hex ed25519 secret) that signs admin requests.
    #[arg(
        long,
        global = true,
        env = "ATTESTPLANE_ADMIN_KEY",
        value_name = "FILE"
    )]
    admin_key: Option<PathBuf>,
    /// Agent bearer token file (a JWT).
    #[arg(long, global = true, env = "ATTESTPLANE_TOKEN", value_name = "FILE")]
    token: Option<PathBuf>,
    /// PEM root the control plane's attestation must chain to (default: AWS Nitro root G1).
    #[arg(long, global = true, env = "ATTESTPLANE_ROOT", value_name = "PEM")]
    root: Option<PathBuf>,
    /// The control plane's expected PCRs (JSON, as `attestplane-verify --pcrs` reads).
    #[arg(long, global = true, env = "ATTESTPLANE_PCRS", value_name = "FILE")]
    pcrs: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the HTTP API in front of an enclave (production).
    Proxy(ProxyArgs),
    /// Run the whole stack locally: enclave on a mock NSM, demo MCP server, proxy.
    Dev(DevArgs),
    #[command(flatten)]
    Client(ClientCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let file = match &cli.config {
        Some(path) => match ConfigFile::load(path) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        },
        None => ConfigFile::default(),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Proxy(args) => proxy::main(args, &file.proxy).await.map_err(|e| chain(&e)),
            Command::Dev(args) => dev::main(args).await.map_err(|e| chain(&e)),
            Command::Client(command) => {
                let c = file.client;
                let context = ClientContext {
                    url: cli.url.or(c.url).unwrap_or_else(|| DEFAULT_URL.to_owned()),
                    json: cli.json,
                    admin_key: cli.admin_key.or(c.admin_key),
                    token: cli.token.or(c.token),
                    idp_key: c.idp_key,
                    idp_issuer: c.idp_issuer,
                    idp_audience: c.idp_audience,
                    root: cli.root.or(c.root),
                    pcrs: cli.pcrs.or(c.pcrs),
                    allow_debug: c.allow_debug.unwrap_or(false),
                    config: cli.config.clone(),
                    origin: c.origin,
                    genesis: c.genesis,
                };
                Ok(cli::run(command, &context).await)
            }
        }
    });
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

/// An error and its sources, outermost first, joined by ": ".
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
