//! `attestplane proxy`: the host proxy on a parent instance (or locally, for `attestplane dev`).
//!
//! It opens the store, starts the enclave client (which replays the stored log into the enclave
//! if the enclave needs it), serves the HTTP API, and shuts down gracefully on SIGINT or
//! SIGTERM: the listener stops accepting, requests in flight finish (their entries are stored
//! and reported durable), then the store is closed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use attestplane_proto::Address;
use clap::Args;

use crate::api::{AppState, router};
use crate::config::ProxySection;
use crate::enclave_client::{ClientOptions, DEFAULT_CONNECTIONS, EnclaveClient};
use crate::store::Store;

/// Default address of the HTTP API.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7400";

/// Default request timeout.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Default limit of requests inside the proxy at once.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 4096;

/// `attestplane proxy` flags (each also settable in `[proxy]` of the config file).
#[derive(Debug, Args)]
pub struct ProxyArgs {
    /// The enclave: vsock:CID:PORT on a parent instance, unix:PATH or tcp:IP:PORT locally.
    #[arg(long, env = "ATTESTPLANE_ENCLAVE", value_name = "ADDR")]
    pub enclave: Option<String>,
    /// Address of the HTTP API [default: 127.0.0.1:7400].
    #[arg(long, env = "ATTESTPLANE_LISTEN", value_name = "IP:PORT")]
    pub listen: Option<String>,
    /// Data directory: the log store lives in DIR/log.
    #[arg(long, env = "ATTESTPLANE_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Admin key trusted at genesis (hex Ed25519 public key; repeatable). Needed only to start
    /// a new log; must match the enclave's pinned keys if it has any.
    #[arg(long = "genesis-admin-key", value_name = "HEX")]
    pub genesis_admin_keys: Vec<String>,
    /// Persistent connections to the enclave [default: 4].
    #[arg(long, value_name = "N")]
    pub connections: Option<usize>,
    /// Request timeout, e.g. 10s [default: 10s].
    #[arg(long, value_name = "DURATION")]
    pub request_timeout: Option<String>,
    /// Requests inside the proxy at once before it answers 503 [default: 4096].
    #[arg(long, value_name = "N")]
    pub max_in_flight: Option<usize>,
}

/// Everything `serve` needs, resolved.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// The enclave's address.
    pub enclave: Address,
    /// The API's address.
    pub listen: SocketAddr,
    /// The store's directory.
    pub store_dir: PathBuf,
    /// Genesis admin keys.
    pub genesis_admin_keys: Vec<[u8; 32]>,
    /// Enclave connections.
    pub connections: usize,
    /// Request timeout.
    pub request_timeout: Duration,
    /// In-flight limit.
    pub max_in_flight: usize,
}

impl ProxyConfig {
    /// Flags over the file over defaults.
    pub fn resolve(args: ProxyArgs, file: &ProxySection) -> Result<ProxyConfig> {
        let enclave = args.enclave.or_else(|| file.enclave.clone()).context(
            "no enclave address: give --enclave (vsock:CID:PORT, unix:PATH or tcp:IP:PORT)",
        )?;
        let enclave: Address = enclave
            .parse()
            .map_err(|e| anyhow::anyhow!("--enclave: {e}"))?;
        let listen = args
            .listen
            .or_else(|| file.listen.clone())
            .unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
        let listen: SocketAddr = listen
            .parse()
            .with_context(|| format!("--listen {listen:?} is not IP:PORT"))?;
        let data_dir = args
            .data_dir
            .or_else(|| file.data_dir.clone())
            .context("no data directory: give --data-dir")?;
        let keys = if args.genesis_admin_keys.is_empty() {
            file.genesis_admin_keys.clone().unwrap_or_default()
        } else {
            args.genesis_admin_keys
        };
        let genesis_admin_keys = keys
            .iter()
            .map(|k| parse_key(k))
            .collect::<Result<Vec<_>>>()?;
        let request_timeout = match args
            .request_timeout
            .or_else(|| file.request_timeout.clone())
        {
            Some(t) => humantime::parse_duration(&t)
                .with_context(|| format!("request timeout {t:?} is not a duration"))?,
            None => DEFAULT_REQUEST_TIMEOUT,
        };
        let connections = args
            .connections
            .or(file.connections)
            .unwrap_or(DEFAULT_CONNECTIONS);
        if !(1..=64).contains(&connections) {
            bail!("--connections must be between 1 and 64");
        }
        Ok(ProxyConfig {
            enclave,
            listen,
            store_dir: data_dir.join("log"),
            genesis_admin_keys,
            connections,
            request_timeout,
            max_in_flight: args
                .max_in_flight
                .or(file.max_in_flight)
                .unwrap_or(DEFAULT_MAX_IN_FLIGHT),
        })
    }
}

/// A hex Ed25519 public key.
pub fn parse_key(hex_key: &str) -> Result<[u8; 32]> {
    let bytes =
        hex::decode(hex_key.trim()).with_context(|| format!("admin key {hex_key:?} is not hex"))?;
    let key: [u8; 32] = bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("admin key {hex_key:?} is not 32 bytes"))?;
    ed25519_dalek::VerifyingKey::from_bytes(&key)
        .with_context(|| format!("admin key {hex_key:?} is not an Ed25519 public key"))?;
    Ok(key)
}

/// `attestplane proxy`: runs until SIGINT/SIGTERM.
pub async fn main(args: ProxyArgs, file: &ProxySection) -> Result<u8> {
    let config = ProxyConfig::resolve(args, file)?;
    let running = start(config).await?;
    println!("attestplane proxy ready: http://{}", running.local_addr);
    running.wait(shutdown_signal()).await?;
    Ok(0)
}

/// A started proxy.
#[derive(Debug)]
pub struct Running {
    /// The bound API address.
    pub local_addr: SocketAddr,
    /// The enclave client.
    pub client: EnclaveClient,
    /// Entries the store held when it was opened (0: a new log).
    pub entries_at_open: u64,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    store: Arc<Store>,
}

/// Opens the store, binds and serves the API, connects to the enclave and returns once the
/// enclave serves (replay included). Fails if the enclave refuses the stored log.
pub async fn start(config: ProxyConfig) -> Result<Running> {
    let dir = config.store_dir.clone();
    let store = tokio::task::spawn_blocking(move || Store::open(&dir))
        .await?
        .with_context(|| {
            format!(
                "cannot open the log store in {}",
                config.store_dir.display()
            )
        })?;
    let recovery = store.recovery();
    eprintln!(
        "attestplane: store {}: {} entries in {} segments, indexed in {:.1} s{}",
        config.store_dir.display(),
        recovery.entries,
        recovery.segments,
        recovery.elapsed.as_secs_f64(),
        match &recovery.torn_tail {
            Some(t) => format!(
                "; cut a torn tail of {} bytes at seq {} (never acknowledged), saved to {}",
                t.len,
                t.seq,
                t.saved_to.display()
            ),
            None => String::new(),
        }
    );
    let entries_at_open = recovery.entries;
    let store = Arc::new(store);
    let client = EnclaveClient::start(
        config.enclave.clone(),
        Arc::clone(&store),
        ClientOptions {
            connections: config.connections,
            genesis_admin_keys: config.genesis_admin_keys.clone(),
            ready_timeout: config.request_timeout,
        },
    );
    // Serve at once (so /healthz and /readyz answer during a long replay; other routes wait
    // for readiness within their timeout), then wait for the replay however long it takes.
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let local_addr = listener.local_addr()?;
    let state = AppState::new(client.clone(), config.request_timeout, config.max_in_flight)
        .context("cannot build the HTTP client for attestation fetches")?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        axum::serve(listener, router(state))
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .await
    });
    loop {
        match client.wait_ready(Duration::from_secs(3600)).await {
            Ok(_) => break,
            Err(crate::enclave_client::ClientError::Failed(why)) => {
                let _ = stop.send(());
                let _ = server.await;
                bail!("the enclave cannot serve this log: {why}")
            }
            Err(_) => continue,
        }
    }
    Ok(Running {
        local_addr,
        client,
        entries_at_open,
        stop,
        server,
        store,
    })
}

impl Running {
    /// Serves the API until `shutdown` completes, then drains (requests in flight finish, their
    /// entries stored) and closes.
    pub async fn wait(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<()> {
        let mut server = self.server;
        tokio::select! {
            () = shutdown => {
                let _ = self.stop.send(());
                server.await.context("the HTTP server panicked")?.context("the HTTP server failed")?;
            }
            result = &mut server => {
                result.context("the HTTP server panicked")?.context("the HTTP server failed")?;
            }
        }
        eprintln!("attestplane: stopped; {} entries stored", self.store.len());
        Ok(())
    }
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
