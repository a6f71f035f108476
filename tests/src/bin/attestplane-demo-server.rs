//! `attestplane-demo-server`: a small "attested MCP server" on a mock NSM, for the local stack
//! (`attestplane dev`) and the end-to-end tests.
//!
//! It stands in for an MCP server running in its own Nitro Enclave: it owns a mock NSM whose
//! image measurements (PCR0/1/2) are the SHA-384 of `"NAME pcr0"`, `"NAME pcr1"` and
//! `"NAME pcr2"` for its `--image NAME`, and serves `GET /attestation?nonce=HEX` with the raw
//! COSE_Sign1 attestation document the mock signs over that nonce. The control plane fetches it
//! (through the host proxy) to attest the server before issuing handles for it.
//!
//! Flags (the contract in notes/STACK.md): `--listen IP:PORT` (default 127.0.0.1:7401, port 0
//! allowed; a non-loopback address is refused unless `--allow-remote`), `--mock-seed HEX`,
//! `--image NAME`, `--print-mock-root PATH` (PEM of the mock's root, what the control plane must
//! pin as its server root), `--print-pcrs PATH` (JSON `{"PCR0": hex, "PCR1": hex, "PCR2": hex}`,
//! usable as `attestplane-verify --pcrs` and `attestplane servers register --pcrs`). Once
//! listening it prints `http://IP:PORT` as its first stdout line; log lines go to stderr. It
//! stops on SIGINT or SIGTERM.
//!
//! Trust: none. This is NOT an attested server: the mock's documents are signed by a root
//! anyone can derive from the seed, and the default seed is public. It exists so a newcomer can
//! walk through register → attest → resolve on one machine.
//!
//! Not here: the MCP protocol beyond what the walk-through needs (no `/mcp` endpoint yet).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use attestplane_enclave::nsm::{Clock, MockNsm, Nsm, PCR_LEN};
use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use clap::Parser;
use sha2::{Digest as _, Sha384};

/// The mock's seed when none is given: public, fixed, for development only, and different from
/// the enclave's development seed.
const DEV_SEED: [u8; 32] = *b"attestplane demo server seed 001";

/// The largest nonce accepted, in bytes (the NSM accepts at most 1024; the HTTP API allows 512).
const MAX_NONCE_LEN: usize = 512;

/// An attested MCP server on a mock NSM (development and tests only).
#[derive(Debug, Parser)]
#[command(name = "attestplane-demo-server", version)]
struct Cli {
    /// Where to listen (port 0: any free port; the bound address is printed on stdout).
    #[arg(long, value_name = "IP:PORT", default_value = "127.0.0.1:7401")]
    listen: SocketAddr,
    /// Accept a non-loopback --listen address.
    #[arg(long)]
    allow_remote: bool,
    /// The mock's 32-byte seed, hex (default: a fixed, public development seed).
    #[arg(long, value_name = "HEX")]
    mock_seed: Option<String>,
    /// The image name its measurements derive from: PCRn = SHA-384("NAME pcrN").
    #[arg(long, value_name = "NAME", default_value = "attestplane-demo-weather")]
    image: String,
    /// Write the mock NSM's root certificate (PEM) to PATH, then continue.
    #[arg(long, value_name = "PATH")]
    print_mock_root: Option<PathBuf>,
    /// Write the image's PCR0/1/2 as JSON ({"PCR0": hex, ...}) to PATH, then continue.
    #[arg(long, value_name = "PATH")]
    print_pcrs: Option<PathBuf>,
}

/// The image measurements of `--image NAME`: `SHA-384("NAME pcr0")`, `… pcr1`, `… pcr2`.
fn image_pcrs(image: &str) -> [[u8; PCR_LEN]; 3] {
    [0, 1, 2].map(|i| Sha384::digest(format!("{image} pcr{i}").as_bytes()).into())
}

fn parse_seed(text: &str) -> Result<[u8; 32]> {
    let bytes = hex::decode(text.trim()).context("--mock-seed is not hex")?;
    <[u8; 32]>::try_from(bytes.as_slice())
        .map_err(|_| anyhow::anyhow!("--mock-seed must be 32 bytes, found {}", bytes.len()))
}

fn write_file(path: &Path, what: &str, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes)
        .with_context(|| format!("cannot write the {what} to {}", path.display()))?;
    eprintln!(
        "attestplane-demo-server: {what} written to {}",
        path.display()
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    if !cli.listen.ip().is_loopback() && !cli.allow_remote {
        bail!(
            "--listen {}: not a loopback address; this server's attestation is a mock, pass \
             --allow-remote to expose it anyway",
            cli.listen
        );
    }
    eprintln!(
        "attestplane-demo-server: WARNING: mock NSM: this is NOT an attested server. Its \
         attestation documents are signed by a root anyone can derive from the seed."
    );
    let seed = match &cli.mock_seed {
        Some(hex) => parse_seed(hex)?,
        None => DEV_SEED,
    };
    let [pcr0, pcr1, pcr2] = image_pcrs(&cli.image);
    let nsm = MockNsm::builder(seed, Clock::System)
        .image_measurements(pcr0, pcr1, pcr2)
        .build();

    if let Some(path) = &cli.print_mock_root {
        let pem = nsm.root_pem().context("cannot build the mock's root")?;
        write_file(path, "mock root", pem.as_bytes())?;
    }
    // The PCRs are read back from the mock, so the file says what its documents carry.
    let mut pcrs = serde_json::Map::new();
    for i in 0u16..3 {
        let pcr = nsm
            .describe_pcr(i)
            .with_context(|| format!("cannot read PCR{i}"))?;
        pcrs.insert(format!("PCR{i}"), hex::encode(&pcr.value).into());
    }
    if let Some(path) = &cli.print_pcrs {
        let json = serde_json::to_string_pretty(&pcrs).context("cannot encode the PCRs")?;
        write_file(path, "PCRs", json.as_bytes())?;
    }
    for (name, value) in &pcrs {
        eprintln!("attestplane-demo-server: {name} {value}");
    }

    let listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cli.listen))?;
    let bound = listener
        .local_addr()
        .context("cannot read the bound address")?;
    {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        writeln!(out, "http://{bound}").context("cannot write to stdout")?;
        out.flush().context("cannot write to stdout")?;
    }
    eprintln!(
        "attestplane-demo-server: image {:?} listening on http://{bound}",
        cli.image
    );
    axum::serve(listener, router(Arc::new(nsm)))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("the server failed")?;
    eprintln!("attestplane-demo-server: stopped");
    Ok(())
}

fn router(nsm: Arc<MockNsm>) -> Router {
    Router::new()
        .route("/attestation", get(attestation))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(nsm)
}

#[derive(Debug, serde::Deserialize)]
struct AttestationQuery {
    nonce: Option<String>,
}

/// `GET /attestation?nonce=HEX`: the mock's attestation document over that nonce.
async fn attestation(
    State(nsm): State<Arc<MockNsm>>,
    query: Result<Query<AttestationQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let nonce = match query {
        Ok(Query(AttestationQuery { nonce: Some(n) })) => n,
        Ok(Query(AttestationQuery { nonce: None })) => {
            return bad_request("the nonce query parameter is required".into());
        }
        Err(e) => return bad_request(format!("bad query: {e}")),
    };
    if nonce.len() > 2 * MAX_NONCE_LEN {
        return bad_request(format!("the nonce is longer than {MAX_NONCE_LEN} bytes"));
    }
    let nonce = match hex::decode(&nonce) {
        Ok(n) if !n.is_empty() => n,
        Ok(_) => return bad_request("the nonce is empty".into()),
        Err(e) => return bad_request(format!("the nonce is not hex: {e}")),
    };
    // Signing is a few milliseconds of P-384 arithmetic: keep it off the reactor.
    let signed = tokio::task::spawn_blocking(move || nsm.attest(None, Some(nonce), None)).await;
    match signed {
        Ok(Ok(document)) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/cbor")],
            document,
        )
            .into_response(),
        Ok(Err(e)) => {
            eprintln!("attestplane-demo-server: the mock NSM refused to attest: {e}");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the mock NSM refused to attest".into(),
            )
        }
        Err(e) => {
            eprintln!("attestplane-demo-server: the attestation task failed: {e}");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the attestation task failed".into(),
            )
        }
    }
}

fn bad_request(message: String) -> Response {
    error(StatusCode::BAD_REQUEST, "bad_request", message)
}

/// The HTTP API's error shape: `{"error": {"code", "message"}}`.
fn error(status: StatusCode, code: &str, message: String) -> Response {
    let body = serde_json::json!({ "error": { "code": code, "message": message } });
    (status, axum::Json(body)).into_response()
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            eprintln!("attestplane-demo-server: cannot listen for SIGINT: {e}");
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                eprintln!("attestplane-demo-server: cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
    eprintln!("attestplane-demo-server: shutting down");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_defaults_to_loopback_7401() {
        let cli = Cli::try_parse_from(["attestplane-demo-server"]).unwrap();
        assert_eq!(cli.listen, "127.0.0.1:7401".parse().unwrap());
        assert_eq!(cli.image, "attestplane-demo-weather");
        assert!(!cli.allow_remote);
    }

    #[test]
    fn seed_must_be_32_bytes_of_hex() {
        assert_eq!(parse_seed(&hex::encode(DEV_SEED)).unwrap(), DEV_SEED);
        assert!(parse_seed("00").is_err());
        assert!(parse_seed("not hex").is_err());
    }
}
