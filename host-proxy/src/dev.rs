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

use anyhow::{Context, Result, bail};
use attestplane_proto::{Address, ByteBuf, Request, Response};
use attestplane_verifier::UnixMillis;
use attestplane_verifier::admin::{AdminAction, Deployment, IdentityProviderSpec};
use attestplane_verifier::attestation::{Expectations, TrustAnchor, VerifyAt, verify_attestation};
use clap::Args;
use ed25519_dalek::SigningKey;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::cli::attest::ControlPlaneTrust;
use crate::cli::http::Api;
use crate::cli::pcrs::read_pcrs_file;
use crate::cli::{admin, deployment, keys, submit};
use crate::enclave_client::EnclaveClient;
use crate::proxy::{self, DEFAULT_MAX_IN_FLIGHT, DEFAULT_REQUEST_TIMEOUT, ProxyConfig};
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

/// Runs the local stack until SIGINT/SIGTERM.
pub async fn main(args: DevArgs) -> Result<u8> {
    let dir = args.data_dir.clone();
    create_private_dir(&dir)?;
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()
            .context("cannot find this executable")?
            .parent()
            .context("this executable has no directory")?
            .to_path_buf(),
    };
    let admin = load_or_create_key(&dir.join("admin.key"))?;
    let idp = load_or_create_key(&dir.join("idp.key"))?;
    let admin_pub = hex::encode(admin.verifying_key().as_bytes());

    // The API's address is fixed before anything starts, so that the demo server can be told
    // where the control plane's JWKS is (port 0: a free port, picked now).
    let mut listen: std::net::SocketAddr = args
        .listen
        .parse()
        .with_context(|| format!("--listen {:?} is not IP:PORT", args.listen))?;
    if listen.port() == 0 {
        listen = std::net::TcpListener::bind(listen)
            .and_then(|l| l.local_addr())
            .with_context(|| format!("cannot find a free port on {}", listen.ip()))?;
    }

    let mut mcp_listen: std::net::SocketAddr = args
        .mcp_listen
        .parse()
        .with_context(|| format!("--mcp-listen {:?} is not IP:PORT", args.mcp_listen))?;
    if mcp_listen.port() == 0 {
        mcp_listen = std::net::TcpListener::bind(mcp_listen)
            .and_then(|l| l.local_addr())
            .with_context(|| format!("cannot find a free port on {}", mcp_listen.ip()))?;
    }

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
        std::fs::remove_file(&socket)
            .with_context(|| format!("cannot remove the stale socket {}", socket.display()))?;
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
        enclave: format!("unix:{}", socket.display())
            .parse()
            .map_err(|e| anyhow::anyhow!("{e}"))?,
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
            .context("cannot write demo-server-url")?;
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

fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))
}

/// Reads a hex Ed25519 secret key file, creating it (mode 0600) if it does not exist; the
/// CLI's key-file code, so that secret keys are handled in one place.
fn load_or_create_key(path: &Path) -> Result<SigningKey> {
    if path.exists() {
        return Ok(keys::read_secret_key(path)?);
    }
    let key = keys::generate()?;
    keys::write_secret_key(path, &key)?;
    Ok(key)
}

/// Starts `exe` with `args`, stdout piped, and returns it with the first line it prints (its
/// address).
async fn spawn(exe: &Path, args: &[String]) -> Result<(Child, String)> {
    if !exe.exists() {
        bail!(
            "{} not found; build the workspace's binaries first (cargo build --workspace --bins) \
             or give --bin-dir",
            exe.display()
        );
    }
    let mut child = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", exe.display()))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(CHILD_START_TIMEOUT, lines.next_line())
        .await
        .with_context(|| format!("{} did not start in time", exe.display()))?
        .with_context(|| format!("reading from {}", exe.display()))?
        .with_context(|| format!("{} exited before printing its address", exe.display()))?;
    // Keep draining its stdout so that it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, line.trim().to_owned()))
}

/// The deployment of the stack at `url`, verified against `DIR/control-plane-root.pem` and
/// `DIR/control-plane-pcrs.json`.
async fn learn_deployment(dir: &Path, url: &str) -> Result<Deployment> {
    let root = std::fs::read(dir.join("control-plane-root.pem"))
        .context("cannot read control-plane-root.pem")?;
    let trust = ControlPlaneTrust {
        anchor: TrustAnchor::from_pem(&root).map_err(|e| anyhow::anyhow!("{e}"))?,
        pcrs: read_pcrs_file(&dir.join("control-plane-pcrs.json"))?,
        allow_debug: false,
    };
    let learned = deployment::learn(&Api::new(url)?, &trust).await?;
    if learned.deployment.origin != DEV_ORIGIN {
        bail!(
            "the control plane's log is {:?}, not {DEV_ORIGIN:?}",
            learned.deployment.origin
        );
    }
    Ok(learned.deployment)
}

/// Installs the starter policy and the development identity provider.
async fn bootstrap(
    client: &EnclaveClient,
    admin_key: &SigningKey,
    idp: &SigningKey,
    deployment: &Deployment,
) -> Result<()> {
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
            Response::AdminResult { reason, seq, .. } => bail!(
                "the enclave refused {name} (log entry {seq}): {}",
                reason.unwrap_or_default()
            ),
            _ => bail!("unexpected reply to {name}"),
        }
    }
    Ok(())
}

/// Writes the control plane's PCRs, read from its own attestation document checked against
/// the mock root it printed.
async fn write_control_plane_pcrs(client: &EnclaveClient, dir: &Path) -> Result<()> {
    let Response::Attestation { document, .. } = client
        .call(
            Request::GetAttestation { nonce: None },
            DEFAULT_REQUEST_TIMEOUT,
        )
        .await?
    else {
        bail!("the enclave did not return its attestation document");
    };
    let root = std::fs::read(dir.join("control-plane-root.pem"))
        .context("cannot read control-plane-root.pem")?;
    let anchor = TrustAnchor::from_pem(&root).map_err(|e| anyhow::anyhow!("{e}"))?;
    let verified = verify_attestation(
        &document,
        &anchor,
        &Expectations::default(),
        VerifyAt::Instant(UnixMillis::from_system_time(SystemTime::now())),
    )
    .map_err(|e| anyhow::anyhow!("the control plane's own document does not verify: {e}"))?;
    let mut pcrs = serde_json::Map::new();
    for (index, value) in verified.pcrs() {
        let i = index.get();
        if i <= 2 {
            pcrs.insert(format!("PCR{i}"), hex::encode(value.as_bytes()).into());
        }
    }
    let text = serde_json::to_string_pretty(&pcrs)?;
    std::fs::write(dir.join("control-plane-pcrs.json"), text + "\n")
        .context("cannot write control-plane-pcrs.json")?;
    Ok(())
}

fn write_client_config(dir: &Path, url: &str, deployment: &Deployment) -> Result<()> {
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
    std::fs::write(dir.join("config.toml"), text).context("cannot write config.toml")
}

/// An MCP client configuration for the gateway: the stdio bridge (for clients configured with
/// a command) and the streamable-HTTP endpoint (for clients that take a URL and a token).
fn write_mcp_client_config(dir: &Path, gateway: &str) -> Result<()> {
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
    let text =
        serde_json::to_string_pretty(&config).context("cannot encode the MCP client config")?;
    std::fs::write(dir.join("mcp-client.json"), text + "\n").context("cannot write mcp-client.json")
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
