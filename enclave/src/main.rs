//! `attestplane-enclave`: the program that runs inside the Nitro Enclave.
//!
//! It opens the NSM (the real `/dev/nsm`, or the mock for local development), builds the
//! [`Enclave`] from its configuration and serves the host on one address until SIGINT or SIGTERM,
//! then shuts down gracefully. It prints the bound address on stdout (one line, so a script or a
//! test that listens on port 0 can read it) and its log lines on stderr.
//!
//! Trust: its arguments come from whoever starts the enclave image, which in production is fixed
//! at image build time and measured; nothing in them can weaken what the enclave checks except
//! `--allow-debug` and the trust roots, which belong to the measured command line for exactly
//! that reason. `--nsm mock` is for development only and says so loudly: a mock's documents are
//! signed by a root anyone can generate from the seed.
//!
//! Not here: request handling ([`attestplane_enclave::service`]) and the connection logic
//! ([`attestplane_enclave::server`]). Log lines carry no secrets and no request bodies.

// As in the library: what the host passes on the command line and the files it names are
// hostile input; no unwrap, expect, panic or unchecked indexing outside tests.

use std::collections::BTreeMap;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::{Context, Result, bail};
use attestplane_enclave::gateway::GatewayConfig;
use attestplane_enclave::gateway::http::Gateway;
use attestplane_enclave::gateway::upstream::Upstreams;
use attestplane_enclave::mcp_transport::{self, McpTransport};
use attestplane_enclave::nsm::{Clock, MockNsm, Nsm, PCR_LEN, RealNsm};
use attestplane_enclave::server::{
    DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_IN_FLIGHT_PER_CONNECTION, ServerLimits, inside_channel,
    run_with_inside,
};
use attestplane_enclave::service::{Enclave, EnclaveConfig};
use attestplane_proto::{Address, Listener};
use attestplane_verifier::UnixMillis;
use attestplane_verifier::attestation::{
    Pcr, PcrIndex, TrustAnchor, names_an_image, parse_pcr_assignment,
};
use clap::{Parser, ValueEnum};

/// The mock's seed when none is given: public, fixed, for development only.
const DEV_SEED: [u8; 32] = *b"attestplane-enclave dev seed 001";

/// Gateway jobs waiting for the enclave's handler.
const GATEWAY_QUEUE: usize = 256;

/// PCRs a `--mock-pcrs` file may set: those the hypervisor measures and locks at boot.
const MAX_MOCK_PCR_INDEX: u16 = 15;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum NsmKind {
    /// The enclave's own `/dev/nsm`.
    Real,
    /// A software NSM with a seeded root: NOT an attested enclave (development and tests).
    Mock,
}

/// The Attestplane control plane inside a Nitro Enclave.
#[derive(Debug, Parser)]
#[command(name = "attestplane-enclave", version)]
struct Cli {
    /// Where to listen: vsock:CID:PORT, unix:PATH or tcp:IP:PORT. The bound address is printed
    /// on stdout.
    #[arg(long, value_name = "ADDR", default_value = "vsock:any:5005")]
    listen: Address,
    /// Which NSM to use (no default: nobody runs the mock by accident).
    #[arg(long, value_enum)]
    nsm: NsmKind,
    /// The mock's 32-byte seed, hex (default: a fixed, public development seed).
    #[arg(long, value_name = "HEX")]
    mock_seed: Option<String>,
    /// JSON file of the measurements the mock reports: {"PCR0": hex, "PCR1": hex, "PCR2": hex}
    /// (keys may also be plain indices, "0" … "15").
    #[arg(long, value_name = "FILE")]
    mock_pcrs: Option<PathBuf>,
    /// Make the mock behave like an enclave started in debug mode (PCRs 0, 1, 2 and 8 zero).
    #[arg(long)]
    mock_debug: bool,
    /// Pin the genesis admin key set (hex Ed25519 public key; repeatable). Part of the image's
    /// measured command line (scripts/build-eif --genesis-admin-key). Without it the enclave
    /// refuses to start a new log.
    #[arg(long = "genesis-admin-key", value_name = "HEX")]
    genesis_admin_keys: Vec<String>,
    /// DEVELOPMENT ONLY: with no --genesis-admin-key, start a new log under whatever admin keys
    /// the host sends. The genesis entry records it and pinned auditors refuse such a log.
    #[arg(long, conflicts_with = "genesis_admin_keys")]
    insecure_host_chosen_genesis: bool,
    /// Pin an image whose epochs this enclave accepts in the log it continues, as
    /// `0=HEX,1=HEX,2=HEX` (PCR0, PCR1 and PCR2, none zero; repeatable): for an upgraded
    /// image, the image that started the log. Its own image is always accepted, and so is any
    /// image an accepted `allow_image` act allowed earlier in the log. Part of the image's
    /// measured command line (scripts/build-eif --pinned-image).
    #[arg(long = "pinned-image", value_name = "N=HEX,…", value_parser = parse_image)]
    pinned_images: Vec<BTreeMap<PcrIndex, Pcr>>,
    /// The log's origin (the checkpoint key name).
    #[arg(long, default_value = "attestplane/log")]
    origin: String,
    /// The `iss` of the handles it issues.
    #[arg(long, default_value = "attestplane")]
    issuer: String,
    /// PEM root that MCP servers' attestation documents must chain to (default: AWS Nitro root
    /// G1).
    #[arg(long, value_name = "PEM")]
    server_root: Option<PathBuf>,
    /// PEM root of its own epochs' documents (default: AWS's with --nsm real, the mock's own
    /// root with --nsm mock).
    #[arg(long, value_name = "PEM")]
    self_root: Option<PathBuf>,
    /// Accept its own earlier epochs from a debug-mode enclave when replaying.
    #[arg(long)]
    allow_debug: bool,
    /// Connections served at once.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// Requests in flight per connection.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_IN_FLIGHT_PER_CONNECTION)]
    max_in_flight: usize,
    /// The MCP data path: where the host relays agents' connections (vsock:any:5006 in
    /// production, unix:PATH or tcp:IP:PORT locally). Needs --dial.
    #[arg(long, value_name = "ADDR")]
    mcp_listen: Option<Address>,
    /// Where to ask the host for connections to registered MCP servers (vsock:3:5007 in
    /// production: the parent instance is CID 3). Needs --mcp-listen.
    #[arg(long, value_name = "ADDR")]
    dial: Option<Address>,
    /// The URL agents reach the gateway at: each server's endpoint is `{URL}/mcp/{id}`, the
    /// audience agents' tokens must name. Part of the measured command line.
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:7300")]
    mcp_public_base: String,
    /// Write the mock NSM's root certificate (PEM) to PATH, so the host and tests can pin it,
    /// then continue.
    #[arg(long, value_name = "PATH")]
    print_mock_root: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let (nsm, mock_root) = open_nsm(&cli)?;
    if let Some(path) = &cli.print_mock_root {
        let pem = mock_root
            .as_ref()
            .context("--print-mock-root needs --nsm mock")?;
        std::fs::write(path, pem)
            .with_context(|| format!("cannot write the mock root to {}", path.display()))?;
        eprintln!(
            "attestplane-enclave: mock root written to {}",
            path.display()
        );
    }
    for i in 0u16..3 {
        let pcr = nsm
            .describe_pcr(i)
            .with_context(|| format!("cannot read PCR{i}"))?;
        eprintln!("attestplane-enclave: PCR{i} {}", hex::encode(&pcr.value));
    }

    let server_anchor = match &cli.server_root {
        Some(path) => anchor_from_file(path)?,
        None => TrustAnchor::aws_nitro_root_g1(),
    };
    let self_anchor = match (&cli.self_root, &mock_root) {
        (Some(path), _) => anchor_from_file(path)?,
        (None, Some(pem)) => {
            TrustAnchor::from_pem(pem.as_bytes()).context("cannot pin the mock's own root")?
        }
        (None, None) => TrustAnchor::aws_nitro_root_g1(),
    };
    let config = EnclaveConfig {
        origin: cli.origin.clone(),
        issuer: cli.issuer.clone(),
        self_anchor,
        server_anchor,
        allow_debug: cli.allow_debug,
    };
    let mut enclave = Enclave::new(nsm, config);
    if cli.insecure_host_chosen_genesis {
        eprintln!(
            "attestplane-enclave: WARNING: --insecure-host-chosen-genesis: a new log starts under \
             admin keys the HOST chooses; the genesis entry records it. Development only."
        );
        enclave = enclave.with_insecure_host_chosen_genesis();
    } else if cli.genesis_admin_keys.is_empty() {
        eprintln!(
            "attestplane-enclave: no --genesis-admin-key: this enclave continues an existing \
             log but refuses to start a new one"
        );
    } else {
        let mut keys = Vec::new();
        for k in &cli.genesis_admin_keys {
            let mut key = [0u8; 32];
            hex::decode_to_slice(k.trim(), &mut key).map_err(|e| {
                anyhow::anyhow!("--genesis-admin-key {k:?}: expected 64 hex digits: {e}")
            })?;
            keys.push(key);
        }
        enclave = enclave.with_pinned_genesis(keys);
    }
    for image in &cli.pinned_images {
        let pcrs: Vec<String> = image
            .iter()
            .map(|(i, p)| format!("PCR{i} {}", p.to_hex()))
            .collect();
        eprintln!(
            "attestplane-enclave: pinned image (accepted in the log it continues): {}",
            pcrs.join(", ")
        );
    }
    enclave = enclave.with_pinned_images(cli.pinned_images.clone());

    let socket_path = match &cli.listen {
        Address::Unix(path) => {
            remove_stale_socket(path)?;
            Some(path.clone())
        }
        _ => None,
    };
    let listener = Listener::bind(&cli.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cli.listen))?;
    let bound = listener
        .local_addr()
        .context("cannot read the bound address")?;
    println!("{bound}");
    eprintln!("attestplane-enclave: listening on {bound}");

    // The MCP data path's transport (attestplane_enclave::mcp_transport).
    let mcp = match (&cli.mcp_listen, &cli.dial) {
        (Some(listen), Some(dial)) => {
            if let Address::Unix(path) = listen {
                remove_stale_socket(path)?;
            }
            let mcp = McpTransport::bind(listen, dial.clone())
                .await
                .with_context(|| format!("cannot listen for MCP on {listen}"))?;
            let bound = mcp
                .listener
                .local_addr()
                .context("cannot read the bound MCP address")?;
            eprintln!("attestplane-enclave: MCP on {bound}, dialing upstreams through {dial}");
            Some(mcp)
        }
        (None, None) => None,
        _ => bail!("--mcp-listen and --dial go together"),
    };
    // The gateway serves the agents the host relays; its decisions run on the same handler as
    // the host's requests (server::run_with_inside), and it reaches servers through the dialer.
    let (access, inside) = inside_channel(GATEWAY_QUEUE);
    let mcp_task = mcp.map(|mcp| {
        let config = GatewayConfig {
            public_base: cli.mcp_public_base.clone(),
            ..GatewayConfig::default()
        };
        let upstreams = Upstreams::new(Arc::new(mcp.dialer), config.upstream_timeout);
        let gateway = Arc::new(Gateway::new(config, access, upstreams));
        tokio::spawn(mcp_transport::serve_agents(
            mcp.listener,
            move |stream| gateway.clone().serve_held(stream.io, stream.gate),
            std::future::pending(),
        ))
    });

    let limits = ServerLimits {
        max_connections: cli.max_connections,
        max_in_flight_per_connection: cli.max_in_flight,
        ..ServerLimits::default()
    };
    let clock = || UnixMillis::from_system_time(SystemTime::now());
    let result = run_with_inside(
        listener,
        enclave,
        clock,
        limits,
        inside,
        attestplane_proto::shutdown_signal("attestplane-enclave"),
    )
    .await;
    if let Some(task) = mcp_task {
        task.abort();
    }
    if let Some(path) = socket_path {
        let _ = std::fs::remove_file(path);
    }
    result.context("the server failed")?;
    eprintln!("attestplane-enclave: stopped");
    Ok(())
}

/// Opens the NSM; for the mock, also its root PEM.
fn open_nsm(cli: &Cli) -> Result<(Arc<dyn Nsm>, Option<String>)> {
    match cli.nsm {
        NsmKind::Real => {
            if cli.mock_seed.is_some() || cli.mock_pcrs.is_some() || cli.mock_debug {
                bail!("--mock-seed, --mock-pcrs and --mock-debug need --nsm mock");
            }
            let nsm = RealNsm::open().context("cannot open the NSM")?;
            Ok((Arc::new(nsm), None))
        }
        NsmKind::Mock => {
            eprintln!(
                "attestplane-enclave: WARNING: --nsm mock: this is NOT an attested enclave. Its \
                 attestation documents are signed by a root anyone can derive from the seed; \
                 nothing it signs proves anything. Use it for development and tests only."
            );
            let seed = match &cli.mock_seed {
                Some(hex) => parse_seed(hex)?,
                None => DEV_SEED,
            };
            let mut builder = MockNsm::builder(seed, Clock::System).debug_mode(cli.mock_debug);
            if let Some(path) = &cli.mock_pcrs {
                for (index, value) in read_pcr_file(path)? {
                    builder = builder.boot_pcr(index, value);
                }
            }
            let mock = builder.build();
            let root = mock.root_pem().context("cannot build the mock's root")?;
            Ok((Arc::new(mock), Some(root)))
        }
    }
}

fn parse_seed(text: &str) -> Result<[u8; 32]> {
    let bytes = hex::decode(text.trim()).context("--mock-seed is not hex")?;
    <[u8; 32]>::try_from(bytes.as_slice())
        .map_err(|_| anyhow::anyhow!("--mock-seed must be 32 bytes, found {}", bytes.len()))
}

/// Reads a `--mock-pcrs` file with the verifier's one PCR-file reader.
fn read_pcr_file(path: &Path) -> Result<BTreeMap<u16, [u8; PCR_LEN]>> {
    let pcrs = attestplane_verifier::attestation::read_pcrs_file(path)?;
    mock_pcrs(pcrs).with_context(|| format!("bad PCR file {}", path.display()))
}

/// The PCRs of a `--mock-pcrs` file, limited to those the mock NSM has.
fn mock_pcrs(pcrs: BTreeMap<PcrIndex, Pcr>) -> Result<BTreeMap<u16, [u8; PCR_LEN]>> {
    let mut out = BTreeMap::new();
    for (index, value) in pcrs {
        let index = u16::from(index.get());
        if index > MAX_MOCK_PCR_INDEX {
            bail!("PCR{index} is not PCR0 … PCR{MAX_MOCK_PCR_INDEX}");
        }
        out.insert(index, *value.as_bytes());
    }
    Ok(out)
}

fn anchor_from_file(path: &Path) -> Result<TrustAnchor> {
    let pem = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    TrustAnchor::from_pem(&pem).with_context(|| format!("{} is not a root", path.display()))
}

/// Removes a socket file left by an earlier run; refuses to touch anything else.
fn remove_stale_socket(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!("{} is in use by a running server", path.display());
            }
            std::fs::remove_file(path)
                .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
            eprintln!(
                "attestplane-enclave: removed stale socket {}",
                path.display()
            );
            Ok(())
        }
        Ok(_) => bail!("{} exists and is not a socket", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot inspect {}", path.display())),
    }
}

/// Parses a `--pinned-image`: `N=HEX` assignments separated by commas, each PCR once, naming
/// an image (PCR0, PCR1 and PCR2, none zero), so no pin can match every image (an empty set) or
/// every debug-mode enclave (zeros).
fn parse_image(s: &str) -> Result<BTreeMap<PcrIndex, Pcr>, String> {
    let mut image = BTreeMap::new();
    for part in s.split(',') {
        let (index, pcr) = parse_pcr_assignment(part).map_err(|e| e.to_string())?;
        if image.insert(index, pcr).is_some() {
            return Err(format!("PCR{index} is given twice"));
        }
    }
    if !names_an_image(&image) {
        return Err("an image is named by PCR0, PCR1 and PCR2, none of them zero".into());
    }
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_pcrs(text: &str) -> Result<BTreeMap<u16, [u8; PCR_LEN]>> {
        mock_pcrs(attestplane_verifier::attestation::parse_pcrs_json(
            text.as_bytes(),
        )?)
    }

    #[test]
    fn pcr_file_accepts_named_and_numeric_keys() {
        let a = "aa".repeat(PCR_LEN);
        let b = "bb".repeat(PCR_LEN);
        let map = parse_pcrs(&format!(r#"{{"PCR0": "{a}", "2": "{b}"}}"#)).unwrap();
        assert_eq!(map.get(&0), Some(&[0xaa; PCR_LEN]));
        assert_eq!(map.get(&2), Some(&[0xbb; PCR_LEN]));
        assert_eq!(map.len(), 2);
    }

    #[test]
    fn pcr_file_refuses_bad_keys_lengths_and_duplicates() {
        let a = "aa".repeat(PCR_LEN);
        for bad in [
            format!(r#"{{"PCR16": "{a}"}}"#),
            format!(r#"{{"PCRx": "{a}"}}"#),
            format!(r#"{{"+1": "{a}"}}"#),
            r#"{"PCR0": "aabb"}"#.to_owned(),
            r#"{"PCR0": "zz"}"#.to_owned(),
            format!(r#"{{"PCR1": "{a}", "1": "{a}"}}"#),
            "[]".to_owned(),
        ] {
            assert!(parse_pcrs(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn seed_must_be_32_bytes_of_hex() {
        assert_eq!(parse_seed(&hex::encode(DEV_SEED)).unwrap(), DEV_SEED);
        assert!(parse_seed("00").is_err());
        assert!(parse_seed("not hex").is_err());
    }

    #[test]
    fn nsm_has_no_default() {
        assert!(Cli::try_parse_from(["attestplane-enclave"]).is_err());
        let cli = Cli::try_parse_from(["attestplane-enclave", "--nsm", "mock"]).unwrap();
        assert_eq!(cli.nsm, NsmKind::Mock);
        assert_eq!(cli.listen.to_string(), "vsock:any:5005");
        assert_eq!(cli.mcp_listen, None);
        assert_eq!(cli.dial, None);
    }

    #[test]
    fn mcp_flags_take_transport_addresses() {
        let cli = Cli::try_parse_from([
            "attestplane-enclave",
            "--nsm",
            "mock",
            "--mcp-listen",
            "vsock:any:5006",
            "--dial",
            "vsock:3:5007",
        ])
        .unwrap();
        assert_eq!(
            cli.mcp_listen.map(|a| a.to_string()).as_deref(),
            Some(mcp_transport::DEFAULT_MCP_LISTEN)
        );
        assert_eq!(
            cli.dial.map(|a| a.to_string()).as_deref(),
            Some(mcp_transport::DEFAULT_DIAL)
        );
        assert!(
            Cli::try_parse_from([
                "attestplane-enclave",
                "--nsm",
                "mock",
                "--dial",
                "tcp:host:1"
            ])
            .is_err()
        );
    }

    #[test]
    fn pinned_image_needs_pcr0_1_2_none_zero_each_once() {
        let h = |b: u8| hex::encode([b; PCR_LEN]);
        let image = parse_image(&format!("0={},1={}, 2={}", h(1), h(2), h(3))).unwrap();
        assert_eq!(image.len(), 3);
        assert_eq!(image.get(&PcrIndex::KERNEL), Some(&Pcr::new([2; PCR_LEN])));
        let with_8 = parse_image(&format!("0={},1={},2={},8={}", h(1), h(2), h(3), h(4)));
        assert_eq!(with_8.map(|i| i.len()), Ok(4));
        for bad in [
            String::new(),
            format!("0={},1={}", h(1), h(2)),
            format!("0={},1={},2={}", h(1), h(2), h(0)),
            format!("0={},1={},2={},1={}", h(1), h(2), h(3), h(2)),
            format!("0={},1={},2={}", h(1), h(2), "ab"),
            format!("0={},1={},32={}", h(1), h(2), h(3)),
            format!("0={} 1={} 2={}", h(1), h(2), h(3)),
        ] {
            assert!(parse_image(&bad).is_err(), "{bad:?} accepted");
        }
        let cli = Cli::try_parse_from([
            "attestplane-enclave",
            "--nsm",
            "mock",
            "--pinned-image",
            &format!("0={},1={},2={}", h(1), h(2), h(3)),
            "--pinned-image",
            &format!("0={},1={},2={}", h(4), h(5), h(6)),
        ])
        .unwrap();
        assert_eq!(cli.pinned_images.len(), 2);
    }
}
