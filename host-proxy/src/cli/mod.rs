//! The operator's, agent's and auditor's commands of the `attestplane` CLI: HTTP clients of the
//! proxy's API (docs/http-api.md).
//!
//! - Operators sign admin requests locally with their admin key, for the deployment pinned in
//!   the configuration ([`deployment`]): `servers register|update|revoke`, `policy set`,
//!   `idp set|remove`, `keys rotate`, `images allow`, `limits set`. The proxy forwards the signed bytes untouched; the enclave
//!   checks them. The CLI then confirms the outcome from the log, against a fresh checkpoint
//!   signed by the attested epoch key, instead of believing the host's answer ([`submit`]).
//! - Agents list servers and resolve handles with a bearer token ([`servers`], [`handle`]).
//!   `handle resolve` believes nothing the host says: it verifies the control plane's
//!   attestation document (fresh nonce, pinned root, expected PCRs; [`attest`]) and the handle
//!   against the attested key before printing it.
//! - Auditors export the log for `attestplane-verify log` and read it ([`log`]).
//! - `keys gen` and `token mint` are local ([`keys`], [`token`]); `token mint` is the
//!   development identity provider of `attestplane dev`, not a production issuer.
//!
//! Plain HTTP only: this build has no TLS (see [`http`]).
//!
//! Exit codes: 0 success; 1 refused by the control plane (a 4xx answer) or failed
//! verification; 2 usage, I/O, transport or server (5xx) errors. Errors are printed on stderr
//! as `error: <code>: <message> (log entry <seq>)`.
//!
//! Module layout (no import cycle among them; `scripts/check-module-cycles` checks):
//! [`http`] and [`pcrs`] at the bottom; [`attest`] (the verified control plane) and [`log`]
//! (reading the log the host serves) above them; [`submit`] (signing, submitting and confirming
//! admin requests) on those; the commands on top: [`keys`] (whose admin key the other admin
//! commands read), [`admin`] (policy, identity providers), [`servers`], [`images`],
//! [`limits`], [`deployment`], [`handle`], [`mcp`] (the stdio bridge to the gateway),
//! [`token`].
//!
//! What it deliberately does not do: `log tail` and `policy show` display entries as the host
//! serves them without verifying signatures or hash links (that is `attestplane-verify log`'s
//! job on an exported log); secrets (key files, bearer tokens, handles) are never printed
//! except the token a command exists to produce (`token mint`, `handle resolve`).

/// `println!` to stdout that returns [`CliError::Closed`] instead of panicking when stdout is
/// closed (`attestplane log tail | head`); use inside functions returning [`CliResult`].
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::write_out(format_args!("{}\n", format_args!($($arg)*)))?
    };
}

pub mod admin;
pub mod attest;
pub mod deployment;
pub mod handle;
pub mod http;
pub mod images;
pub mod keys;
pub mod limits;
pub mod log;
pub mod mcp;
pub mod pcrs;
pub mod servers;
pub mod submit;
#[cfg(test)]
mod testing;
pub mod token;

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use attestplane_verifier::UnixMillis;
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
    /// The configuration file the settings came from (`deployment pin` writes it).
    pub config: Option<PathBuf>,
    /// The pinned deployment's origin (admin requests are signed for it).
    pub origin: Option<String>,
    /// The pinned deployment's genesis entry hash (hex).
    pub genesis: Option<String>,
}

/// Shown under the help of every client command group.
pub const PLAIN_HTTP_NOTE: &str = "The proxy is reached over plain HTTP (--url http://HOST:PORT): \
this build has no TLS. Bearer tokens cross that connection, so reach a remote proxy through an SSH \
tunnel or a TLS-terminating proxy on the same host. The host is not trusted: `handle resolve` \
verifies the control plane's attestation and the handle; the log is verified offline by \
`attestplane-verify log` (log tail and policy show only display it).";

/// The client commands.
#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Admin and identity-provider key files; rotate the admin key set.
    #[command(subcommand, after_help = PLAIN_HTTP_NOTE)]
    Keys(keys::KeysCommand),
    /// Register, update, revoke, attest and list MCP servers.
    #[command(subcommand, after_help = PLAIN_HTTP_NOTE)]
    Servers(servers::ServersCommand),
    /// Install or show the Cedar policy.
    #[command(subcommand, after_help = PLAIN_HTTP_NOTE)]
    Policy(admin::PolicyCommand),
    /// Install or remove an identity provider (issuer, audience, JWKS).
    #[command(subcommand, after_help = PLAIN_HTTP_NOTE)]
    Idp(admin::IdpCommand),
    /// Mint an agent token with the development identity provider.
    #[command(subcommand, after_help = PLAIN_HTTP_NOTE)]
    Token(token::TokenCommand),
    /// Resolve a server handle and verify it (and the control plane) before printing it.
    #[command(subcommand, after_help = PLAIN_HTTP_NOTE)]
    Handle(handle::HandleCommand),
    /// Export the log for `attestplane-verify log`, or print its latest entries.
    #[command(subcommand, after_help = PLAIN_HTTP_NOTE)]
    Log(log::LogCommand),
    /// Bridge a stdio MCP client to the gateway (after verifying the control plane).
    #[command(subcommand, after_help = PLAIN_HTTP_NOTE)]
    Mcp(mcp::McpCommand),
    /// Allow the control plane to run another image (an upgrade).
    #[command(subcommand, after_help = PLAIN_HTTP_NOTE)]
    Images(images::ImagesCommand),
    /// Learn the deployment (log origin, genesis entry) from the attested control plane and
    /// pin it: admin requests are signed for it alone.
    #[command(subcommand, after_help = PLAIN_HTTP_NOTE)]
    Deployment(deployment::DeploymentCommand),
    /// Replace the gateway's rate limits and spend caps.
    #[command(subcommand, after_help = PLAIN_HTTP_NOTE)]
    Limits(limits::LimitsCommand),
}

/// Runs one client command; the returned code is the process's exit code (0 success, 1 refused
/// or failed verification, 2 usage or I/O error). A failure is reported on stderr here.
pub async fn run(command: ClientCommand, context: &ClientContext) -> u8 {
    let result = match command {
        ClientCommand::Keys(c) => keys::run(c, context).await,
        ClientCommand::Servers(c) => servers::run(c, context).await,
        ClientCommand::Policy(c) => admin::run_policy(c, context).await,
        ClientCommand::Idp(c) => admin::run_idp(c, context).await,
        ClientCommand::Token(c) => token::run(c, context),
        ClientCommand::Handle(c) => handle::run(c, context).await,
        ClientCommand::Log(c) => log::run(c, context).await,
        ClientCommand::Mcp(c) => mcp::run(c, context).await,
        ClientCommand::Images(c) => images::run(c, context).await,
        ClientCommand::Deployment(c) => deployment::run(c, context).await,
        ClientCommand::Limits(c) => limits::run(c, context).await,
    };
    match result {
        Ok(()) | Err(CliError::Closed) => 0,
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
    }
}

/// Why a client command failed; decides the exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The API answered with an error (`{"error": {...}}`); 4xx exit 1, others exit 2.
    #[error("{code}: {message}{}", seq_suffix(*.seq))]
    Api {
        /// HTTP status.
        status: u16,
        /// The stable machine code.
        code: String,
        /// The message (control characters replaced).
        message: String,
        /// The log entry that recorded the refusal, if any.
        seq: Option<u64>,
    },
    /// Something did not verify, or a refusal decided locally (exit 1).
    #[error("{0}")]
    Failed(String),
    /// An admin act the host reported is not what the log records (exit 1).
    #[error("unconfirmed: {0}")]
    Unconfirmed(#[from] submit::ConfirmError),
    /// Bad flags or settings (exit 2).
    #[error("{0}")]
    Usage(String),
    /// Stdout was closed by the reader (exit 0, nothing printed).
    #[error("stdout closed")]
    Closed,
    /// I/O, transport or an answer of the wrong shape (exit 2): what failed, with the
    /// underlying error's text.
    #[error("{0}")]
    Io(String),
}

fn seq_suffix(seq: Option<u64>) -> String {
    seq.map(|s| format!(" (log entry {s})")).unwrap_or_default()
}

impl CliError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Api { status, .. } if (400..500).contains(status) => 1,
            CliError::Failed(_) | CliError::Unconfirmed(_) => 1,
            CliError::Closed => 0,
            CliError::Api { .. } | CliError::Usage(_) | CliError::Io(_) => 2,
        }
    }
}

/// The result of a client command.
pub type CliResult<T = ()> = Result<T, CliError>;

/// Replaces control characters (terminal escapes included) in text the host or a log entry
/// supplied, before it reaches a terminal.
pub fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// Now, from the system clock.
pub fn now() -> UnixMillis {
    UnixMillis::from_system_time(SystemTime::now())
}

/// RFC 3339 (UTC, milliseconds) of an instant.
pub fn rfc3339(t: UnixMillis) -> String {
    humantime::format_rfc3339_millis(t.to_system_time()).to_string()
}

/// Prints a JSON value on stdout.
pub fn print_json(value: &serde_json::Value) -> CliResult {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| CliError::Io(format!("cannot encode JSON output: {e}")))?;
    outln!("{text}");
    Ok(())
}

/// Writes to stdout; a closed stdout is [`CliError::Closed`].
pub fn write_out(args: std::fmt::Arguments<'_>) -> CliResult {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    out.write_fmt(args).map_err(|e| {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            CliError::Closed
        } else {
            CliError::Io(format!("cannot write to stdout: {e}"))
        }
    })
}

/// Reads a whole file of at most `max` bytes.
pub fn read_file(path: &Path, max: u64) -> CliResult<Vec<u8>> {
    let io = |e: std::io::Error| CliError::Io(format!("cannot read {}: {e}", path.display()));
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > max {
        return Err(CliError::Usage(format!(
            "{} is {len} bytes, more than the limit of {max}",
            path.display()
        )));
    }
    std::fs::read(path).map_err(io)
}

/// The agent's bearer token from the `--token` file.
pub fn read_bearer(context: &ClientContext) -> CliResult<String> {
    let path = context.token.as_deref().ok_or_else(|| {
        CliError::Usage(
            "this command needs an agent token: --token FILE (or ATTESTPLANE_TOKEN, or token = in \
             the [client] config)"
                .into(),
        )
    })?;
    let bytes = read_file(
        path,
        attestplane_verifier::handle::MAX_TOKEN_LEN as u64 + 64,
    )?;
    let text = String::from_utf8(bytes)
        .map_err(|_| CliError::Usage(format!("{}: the token is not text", path.display())))?;
    let token = text.trim();
    if token.is_empty() || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(CliError::Usage(format!(
            "{}: not a bearer token (one JWT on one line)",
            path.display()
        )));
    }
    Ok(token.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_contract() {
        let api = |status| CliError::Api {
            status,
            code: "x".into(),
            message: "y".into(),
            seq: None,
        };
        assert_eq!(api(403).exit_code(), 1);
        assert_eq!(api(422).exit_code(), 1);
        assert_eq!(api(500).exit_code(), 2);
        assert_eq!(api(503).exit_code(), 2);
        assert_eq!(CliError::Failed("bad".into()).exit_code(), 1);
        assert_eq!(CliError::Usage("bad".into()).exit_code(), 2);
        assert_eq!(CliError::Io("bad".to_owned()).exit_code(), 2);
        assert_eq!(CliError::Closed.exit_code(), 0);
    }

    #[test]
    fn clean_replaces_terminal_escapes() {
        assert_eq!(clean("a\x1b[2Jb\nc\u{9b}d"), "a?[2Jb?c?d");
    }
}
