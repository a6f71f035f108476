//! `attestplane dev`: the whole stack on one machine, for development and the walk-through.
//!
//! It starts, as child processes, the enclave binary on a **mock NSM** (its documents are
//! signed by a root anyone can regenerate from the public development seed: this is not an
//! attested enclave) and, unless told not to, a demo "attested MCP server" on another mock NSM;
//! then it runs the proxy in-process in front of them. On a new log it installs the starter
//! policy and a development identity provider with signed admin requests, exactly as an
//! operator would. It writes everything a newcomer needs into the data directory (keys, roots,
//! expected PCRs, a client config file) and prints the next steps.
//!
//! Not linked to the enclave crate (an architecture invariant): it runs the
//! `attestplane-enclave` binary, found next to its own executable or in `--bin-dir`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime};

use attestplane_proto::{Address, ByteBuf, Request, Response};
use attestplane_verifier::UnixMillis;
use attestplane_verifier::admin::{AdminAction, Deployment, IdentityProviderSpec};
use attestplane_verifier::attestation::{
    AttestationError, Expectations, TrustAnchor, VerifyAt, verify_attestation,
};
use clap::Args;
use ed25519_dalek::SigningKey;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::cli::attest::ControlPlaneTrust;
use crate::cli::http::Api;
use crate::cli::pcrs::read_pcrs_file;
use crate::cli::{CliError, admin, deployment, keys, submit};
use crate::enclave_client::{ClientError, EnclaveClient};
use crate::proxy::{self, DEFAULT_MAX_IN_FLIGHT, DEFAULT_REQUEST_TIMEOUT, ProxyConfig, ProxyError};
use crate::relay::{RelayConfig, RelayLimits};

/// The development identity provider's issuer.
pub const DEV_ISSUER: &str = "https://dev-idp.attestplane.local";
/// The audience its tokens carry.
pub const DEV_AUDIENCE: &str = "attestplane";
/// Its key id.
pub const DEV_KID: &str = admin::DEV_IDP_KID;
/// The origin of the development log.
pub const DEV_ORIGIN: &str = "attestplane.dev/log";
/// The starter policy installed on a new log.
pub const STARTER_POLICY: &str = include_str!("../../verifier/testdata/policy/starter.cedar");

/// How long a child may take to print its address.
const CHILD_START_TIMEOUT: Duration = Duration::from_secs(30);

/// `attestplane dev` flags.
#[derive(Debug, Args)]
pub struct DevArgs {
    /// Where keys, roots, the log and the client config go.
    #[arg(long, value_name = "DIR", default_value = "attestplane-dev")]
    pub data_dir: PathBuf,
    /// Address of the HTTP API (port 0 picks a free port).
    #[arg(long, value_name = "IP:PORT", default_value = proxy::DEFAULT_LISTEN)]
    pub listen: String,
    /// Agent-facing address of the MCP relay (port 0 picks a free port).
    #[arg(long, value_name = "IP:PORT", default_value = crate::relay::DEFAULT_MCP_LISTEN)]
    pub mcp_listen: String,
    /// Do not start the demo MCP server.
    #[arg(long)]
    pub no_demo_server: bool,
    /// Address of the demo MCP server (port 0 picks a free port).
    #[arg(long, value_name = "IP:PORT", default_value = "127.0.0.1:7401")]
    pub demo_server_listen: String,
    /// Directory holding `attestplane-enclave` and `attestplane-demo-server` (default: the
    /// directory of this executable).
    #[arg(long, value_name = "DIR")]
    pub bin_dir: Option<PathBuf>,
}

/// Why `attestplane dev` could not start the stack or stopped with an error. Each variant names
/// what failed; the underlying error, if any, is its [`std::error::Error::source`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DevError {
    /// A file or directory of the stack could not be created, read or written.
    #[error("{what}")]
    Io {
        /// What was being done, naming the file.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// This executable's directory (where the other binaries are looked for) is unknown.
    #[error("this executable has no directory")]
    NoExecutableDir,
    /// An address flag is not `IP:PORT`.
    #[error("{flag} {value:?} is not IP:PORT")]
    BadAddress {
        /// The flag.
        flag: &'static str,
        /// The value given.
        value: String,
        /// Why it does not parse.
        #[source]
        source: std::net::AddrParseError,
    },
    /// A binary of the stack is not where it was looked for.
    #[error(
        "{} not found; build the workspace's binaries first (cargo build --workspace --bins) \
         or give --bin-dir",
        exe.display()
    )]
    MissingBinary {
        /// Where it was looked for.
        exe: PathBuf,
    },
    /// A child started but did not print its address.
    #[error("{} {problem}", exe.display())]
    ChildStart {
        /// The child's executable.
        exe: PathBuf,
        /// What went wrong: it timed out, or exited first.
        problem: &'static str,
    },
    /// The enclave's socket address is not an address.
    #[error(transparent)]
    Address(#[from] attestplane_proto::ProtoError),
    /// The in-process proxy could not start or failed.
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    /// A CLI step (keys, deployment, admin signing) failed.
    #[error(transparent)]
    Cli(#[from] CliError),
    /// A call to the enclave failed.
    #[error(transparent)]
    Enclave(#[from] ClientError),
    /// The enclave refused an admin act of the bootstrap.
    #[error("the enclave refused {action} (log entry {seq}): {reason}")]
    Refused {
        /// The act.
        action: &'static str,
        /// The entry that recorded the refusal.
        seq: u64,
        /// The enclave's reason.
        reason: String,
    },
    /// The enclave answered a request with a reply of another kind.
    #[error("unexpected reply to {request}")]
    UnexpectedReply {
        /// The request.
        request: &'static str,
    },
    /// The enclave answered a request for its attestation document with another reply.
    #[error("the enclave did not return its attestation document")]
    NoAttestation,
    /// The mock root the enclave printed is not a root certificate.
    #[error("control-plane-root.pem is not a root certificate")]
    Root(#[source] AttestationError),
    /// The control plane's own attestation document does not verify under its mock root.
    #[error("the control plane's own document does not verify")]
    OwnDocument(#[source] AttestationError),
    /// The control plane runs another log than the development one.
    #[error("the control plane's log is {found:?}, not {DEV_ORIGIN:?}")]
    WrongOrigin {
        /// The origin it runs.
        found: String,
    },
    /// A JSON file of the stack could not be encoded.
    #[error("cannot encode {what}")]
    Json {
        /// Which file.
        what: &'static str,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

/// `DevError::Io` with `what`.
fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DevError {
    let what = what.into();
    move |source| DevError::Io { what, source }
}

/// Runs the local stack until SIGINT/SIGTERM.
pub async fn main(args: DevArgs) -> Result<u8, DevError> {
    let dir = args.data_dir.clone();
    create_private_dir(&dir)?;
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()
            .map_err(io("cannot find this executable"))?
            .parent()
            .ok_or(DevError::NoExecutableDir)?
            .to_path_buf(),
    };
    let admin = load_or_create_key(&dir.join("admin.key"))?;
    let idp = load_or_create_key(&dir.join("idp.key"))?;
    let admin_pub = hex::encode(admin.verifying_key().as_bytes());

    // The API's address is fixed before anything starts, so that the demo server can be told
    // where the control plane's JWKS is (port 0: a free port, picked now).
    let listen = bound_address("--listen", &args.listen)?;
    let mcp_listen = bound_address("--mcp-listen", &args.mcp_listen)?;

    let mut children = Vec::new();
    let mut demo_url = None;
    if !args.no_demo_server {
        let (child, url) = spawn(
            &bin_dir.join("attestplane-demo-server"),
            &[
                "--listen".into(),
                args.demo_server_listen.clone(),
                "--print-mock-root".into(),
                path_arg(&dir.join("server-root.pem")),
                "--print-pcrs".into(),
                path_arg(&dir.join("demo-server-pcrs.json")),
                "--print-tools".into(),
                path_arg(&dir.join("demo-server-tools.json")),
                "--control-plane".into(),
                format!("http://{listen}"),
                // Receipts from the gateway are checked with the control plane's attested
                // key; both files are written once the enclave is up, and read at first use.
                "--control-plane-root".into(),
                path_arg(&dir.join("control-plane-root.pem")),
                "--control-plane-pcrs".into(),
                path_arg(&dir.join("control-plane-pcrs.json")),
            ],
        )
        .await?;
        children.push(child);
        demo_url = Some(url);
    }

    let socket = dir.join("enclave.sock");
    if socket.exists() {
        std::fs::remove_file(&socket).map_err(io(format!(
            "cannot remove the stale socket {}",
            socket.display()
        )))?;
    }
    // The MCP data path: the enclave listens for relayed agents on one socket and dials
    // upstreams through the proxy on another.
    let enclave_mcp = dir.join("enclave-mcp.sock");
    let dial = dir.join("dial.sock");
    let mut enclave_args = vec![
        "--mcp-listen".into(),
        format!("unix:{}", enclave_mcp.display()),
        "--dial".into(),
        format!("unix:{}", dial.display()),
        "--mcp-public-base".into(),
        format!("http://{mcp_listen}"),
        "--nsm".into(),
        "mock".into(),
        "--listen".into(),
        format!("unix:{}", socket.display()),
        "--print-mock-root".into(),
        path_arg(&dir.join("control-plane-root.pem")),
        "--genesis-admin-key".into(),
        admin_pub.clone(),
        "--origin".into(),
        DEV_ORIGIN.into(),
    ];
    if demo_url.is_some() {
        enclave_args.push("--server-root".into());
        enclave_args.push(path_arg(&dir.join("server-root.pem")));
    }
    let (enclave, _) = spawn(&bin_dir.join("attestplane-enclave"), &enclave_args).await?;
    children.push(enclave);

    let running = proxy::start(ProxyConfig {
        enclave: format!("unix:{}", socket.display()).parse()?,
        listen,
        store_dir: dir.join("log"),
        genesis_admin_keys: vec![admin.verifying_key().to_bytes()],
        connections: 2,
        request_timeout: DEFAULT_REQUEST_TIMEOUT,
        max_in_flight: DEFAULT_MAX_IN_FLIGHT,
        mcp: Some(RelayConfig {
            mcp_listen,
            enclave_mcp: Address::Unix(enclave_mcp),
            dial_listen: Address::Unix(dial),
            limits: RelayLimits::default(),
        }),
    })
    .await?;
    let url = format!("http://{}", running.local_addr);

    // The deployment, learned the way an operator learns it: from the attested control plane
    // (its PCRs as read just now, under the mock root), checkpoint and genesis entry.
    write_control_plane_pcrs(&running.client, &dir).await?;
    let deployment = learn_deployment(&dir, &url).await?;
    if running.entries_at_open == 0 {
        bootstrap(&running.client, &admin, &idp, &deployment).await?;
    }
    if let Some(demo) = &demo_url {
        std::fs::write(dir.join("demo-server-url"), format!("{demo}\n"))
            .map_err(io("cannot write demo-server-url"))?;
    }
    write_client_config(&dir, &url, &deployment)?;

    println!("attestplane dev ready: {url}");
    if let Some(mcp) = running.mcp_addr {
        println!("attestplane MCP relay: tcp:{mcp}");
    }
    let gateway = format!("http://{mcp_listen}");
    write_mcp_client_config(&dir, &gateway)?;
    print_next_steps(&dir, &url, demo_url.as_deref());
    print_mcp_steps(&dir, &gateway);
    running
        .wait(attestplane_proto::shutdown_signal("attestplane"))
        .await?;
    for mut child in children {
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
    Ok(0)
}

fn path_arg(p: &Path) -> String {
    p.display().to_string()
}

/// `value` of `flag` as an address; port 0 is replaced by a free port, picked now.
fn bound_address(flag: &'static str, value: &str) -> Result<std::net::SocketAddr, DevError> {
    let addr: std::net::SocketAddr = value.parse().map_err(|source| DevError::BadAddress {
        flag,
        value: value.to_owned(),
        source,
    })?;
    if addr.port() != 0 {
        return Ok(addr);
    }
    std::net::TcpListener::bind(addr)
        .and_then(|l| l.local_addr())
        .map_err(io(format!("cannot find a free port on {}", addr.ip())))
}

fn create_private_dir(dir: &Path) -> Result<(), DevError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(format!("cannot create {}", dir.display())))
}

/// Reads a hex Ed25519 secret key file, creating it (mode 0600) if it does not exist; the
/// CLI's key-file code, so that secret keys are handled in one place.
fn load_or_create_key(path: &Path) -> Result<SigningKey, DevError> {
    if path.exists() {
        return Ok(keys::read_secret_key(path)?);
    }
    let key = keys::generate()?;
    keys::write_secret_key(path, &key)?;
    Ok(key)
}

/// Starts `exe` with `args`, stdout piped, and returns it with the first line it prints (its
/// address).
async fn spawn(exe: &Path, args: &[String]) -> Result<(Child, String), DevError> {
    if !exe.exists() {
        return Err(DevError::MissingBinary {
            exe: exe.to_owned(),
        });
    }
    let mut child = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(io(format!("cannot start {}", exe.display())))?;
    let start_error = |problem| DevError::ChildStart {
        exe: exe.to_owned(),
        problem,
    };
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| start_error("has no stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(CHILD_START_TIMEOUT, lines.next_line())
        .await
        .map_err(|_| start_error("did not start in time"))?
        .map_err(io(format!("reading from {}", exe.display())))?
        .ok_or_else(|| start_error("exited before printing its address"))?;
    // Keep draining its stdout so that it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, line.trim().to_owned()))
}

/// The deployment of the stack at `url`, verified against `DIR/control-plane-root.pem` and
/// `DIR/control-plane-pcrs.json`.
async fn learn_deployment(dir: &Path, url: &str) -> Result<Deployment, DevError> {
    let trust = ControlPlaneTrust {
        anchor: control_plane_root(dir)?,
        pcrs: read_pcrs_file(&dir.join("control-plane-pcrs.json"))?,
        allow_debug: false,
    };
    let learned = deployment::learn(&Api::new(url)?, &trust).await?;
    if learned.deployment.origin != DEV_ORIGIN {
        return Err(DevError::WrongOrigin {
            found: learned.deployment.origin,
        });
    }
    Ok(learned.deployment)
}

/// Installs the starter policy and the development identity provider.
async fn bootstrap(
    client: &EnclaveClient,
    admin_key: &SigningKey,
    idp: &SigningKey,
    deployment: &Deployment,
) -> Result<(), DevError> {
    let jwks = admin::jwks_of(idp, DEV_KID)?;
    for action in [
        AdminAction::SetPolicy {
            text: STARTER_POLICY.into(),
        },
        AdminAction::SetIdentityProvider(IdentityProviderSpec {
            issuer: DEV_ISSUER.into(),
            audience: DEV_AUDIENCE.into(),
            jwks: jwks.clone(),
        }),
    ] {
        let name = action.type_name();
        let bytes = submit::sign_admin(
            action,
            admin_key,
            deployment,
            UnixMillis::from_system_time(SystemTime::now()),
        )?;
        match client
            .call(
                Request::Admin {
                    request: ByteBuf::from(bytes),
                },
                DEFAULT_REQUEST_TIMEOUT,
            )
            .await?
        {
            Response::AdminResult {
                accepted: true,
                seq,
                ..
            } => eprintln!("attestplane dev: {name} accepted (log entry {seq})"),
            Response::AdminResult { reason, seq, .. } => {
                return Err(DevError::Refused {
                    action: name,
                    seq,
                    reason: reason.unwrap_or_default(),
                });
            }
            _ => return Err(DevError::UnexpectedReply { request: name }),
        }
    }
    Ok(())
}

/// Writes the control plane's PCRs, read from its own attestation document checked against
/// the mock root it printed.
async fn write_control_plane_pcrs(client: &EnclaveClient, dir: &Path) -> Result<(), DevError> {
    let Response::Attestation { document, .. } = client
        .call(
            Request::GetAttestation { nonce: None },
            DEFAULT_REQUEST_TIMEOUT,
        )
        .await?
    else {
        return Err(DevError::NoAttestation);
    };
    let anchor = control_plane_root(dir)?;
    let verified = verify_attestation(
        &document,
        &anchor,
        &Expectations::default(),
        VerifyAt::Instant(UnixMillis::from_system_time(SystemTime::now())),
    )
    .map_err(DevError::OwnDocument)?;
    let mut pcrs = serde_json::Map::new();
    for (index, value) in verified.pcrs() {
        let i = index.get();
        if i <= 2 {
            pcrs.insert(format!("PCR{i}"), hex::encode(value.as_bytes()).into());
        }
    }
    let text = serde_json::to_string_pretty(&pcrs).map_err(|source| DevError::Json {
        what: "the control plane's PCRs",
        source,
    })?;
    std::fs::write(dir.join("control-plane-pcrs.json"), text + "\n")
        .map_err(io("cannot write control-plane-pcrs.json"))?;
    Ok(())
}

/// The mock root the enclave printed into `DIR/control-plane-root.pem`.
fn control_plane_root(dir: &Path) -> Result<TrustAnchor, DevError> {
    let root = std::fs::read(dir.join("control-plane-root.pem"))
        .map_err(io("cannot read control-plane-root.pem"))?;
    TrustAnchor::from_pem(&root).map_err(DevError::Root)
}

fn write_client_config(dir: &Path, url: &str, deployment: &Deployment) -> Result<(), DevError> {
    let text = format!(
        "# Written by `attestplane dev`. Use with --config {}/config.toml or ATTESTPLANE_CONFIG.\n\
         [client]\n\
         url = \"{url}\"\n\
         admin_key = \"admin.key\"\n\
         token = \"agent.jwt\"\n\
         idp_key = \"idp.key\"\n\
         idp_issuer = \"{DEV_ISSUER}\"\n\
         idp_audience = \"{DEV_AUDIENCE}\"\n\
         root = \"control-plane-root.pem\"\n\
         pcrs = \"control-plane-pcrs.json\"\n\
         origin = {}\n\
         genesis = \"{}\"\n",
        dir.display(),
        deployment::toml_string(&deployment.origin),
        deployment.genesis,
    );
    std::fs::write(dir.join("config.toml"), text).map_err(io("cannot write config.toml"))
}

/// An MCP client configuration for the gateway: the stdio bridge (for clients configured with
/// a command) and the streamable-HTTP endpoint (for clients that take a URL and a token).
fn write_mcp_client_config(dir: &Path, gateway: &str) -> Result<(), DevError> {
    let config = serde_json::json!({
        "mcpServers": {
            "weather": {
                "command": "attestplane",
                "args": ["mcp", "connect", "weather", "--gateway", gateway],
                "env": { "ATTESTPLANE_CONFIG": dir.join("config.toml").display().to_string() },
            },
            "weather-http": {
                "type": "http",
                "url": format!("{gateway}/mcp/weather"),
                "headers": { "Authorization": "Bearer <a token minted for this URL: see the next steps>" },
            },
        }
    });
    let text = serde_json::to_string_pretty(&config).map_err(|source| DevError::Json {
        what: "the MCP client config",
        source,
    })?;
    std::fs::write(dir.join("mcp-client.json"), text + "\n")
        .map_err(io("cannot write mcp-client.json"))
}

fn print_mcp_steps(dir: &Path, gateway: &str) {
    let d = dir.display();
    println!();
    println!("  MCP gateway (every tools/list and tools/call decided and logged in the enclave):");
    println!("    endpoint per server: {gateway}/mcp/<server-id>");
    println!(
        "    attestplane token mint --sub agent-7 --user alice --tenant acme --role tool-user \\\n      \
         --audience {gateway}/mcp/weather --out {d}/agent.jwt"
    );
    println!("    client configuration (stdio bridge and HTTP): {d}/mcp-client.json");
}

fn print_next_steps(dir: &Path, url: &str, demo: Option<&str>) {
    let d = dir.display();
    println!();
    println!("  The control plane runs on a MOCK NSM: not an attested enclave (development only).");
    println!("  API: {url}   data: {d}/");
    println!();
    println!("  Next, in another shell:");
    println!("    export ATTESTPLANE_CONFIG={d}/config.toml");
    if let Some(demo) = demo {
        println!(
            "    attestplane servers register --id weather --name Weather --tenant acme \\\n      \
             --resource {demo}/mcp --endpoint {demo} --server-pcrs {d}/demo-server-pcrs.json"
        );
        println!("    attestplane servers attest weather");
    }
    println!(
        "    attestplane token mint --sub agent-7 --user alice --tenant acme --role tool-user --out {d}/agent.jwt"
    );
    println!("    attestplane handle resolve weather");
    println!("    attestplane log export --out {d}/log.cbor --checkpoint {d}/checkpoint.txt");
    println!(
        "    attestplane-verify log {d}/log.cbor --pcrs {d}/control-plane-pcrs.json \\\n      \
         --root {d}/control-plane-root.pem --server-root {d}/server-root.pem --checkpoint {d}/checkpoint.txt"
    );
    println!();
    println!("  Ctrl-C stops everything.");
}
