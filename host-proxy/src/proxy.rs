//! `attestplane proxy`: the host proxy on a parent instance (or locally, for `attestplane dev`).
//!
//! It opens the store, starts the enclave client (which replays the stored log into the enclave
//! if the enclave needs it), serves the HTTP API, and shuts down gracefully on SIGINT or
//! SIGTERM: the listener stops accepting, requests in flight finish (their entries are stored
//! and reported durable), then the store is closed.
//!
//! With `--enclave-mcp` and `--dial-listen` it also runs the MCP data path's byte relays
//! ([`crate::relay`]): agents connect to `--mcp-listen` and their bytes go to the enclave's MCP
//! port; the enclave dials `--dial-listen` for connections to registered MCP servers.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use attestplane_proto::Address;
use clap::Args;

use crate::api::{AppState, router};
use crate::config::ProxySection;
use crate::enclave_client::{ClientOptions, DEFAULT_CONNECTIONS, EnclaveClient};
use crate::relay::{DEFAULT_MCP_LISTEN, Relay, RelayConfig, RelayLimits};
use crate::store::{Store, StoreError};

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
    /// The enclave's MCP port (vsock:CID:PORT, unix:PATH or tcp:IP:PORT). Turns on the MCP
    /// data path's relays; needs --dial-listen.
    #[arg(long, env = "ATTESTPLANE_ENCLAVE_MCP", value_name = "ADDR")]
    pub enclave_mcp: Option<String>,
    /// Where the enclave dials for connections to registered MCP servers (vsock:any:PORT on a
    /// parent instance, unix:PATH or tcp:IP:PORT locally).
    #[arg(long, env = "ATTESTPLANE_DIAL_LISTEN", value_name = "ADDR")]
    pub dial_listen: Option<String>,
    /// Agent-facing address of the MCP relay [default: 127.0.0.1:7300].
    #[arg(long, env = "ATTESTPLANE_MCP_LISTEN", value_name = "IP:PORT")]
    pub mcp_listen: Option<String>,
    /// Agent connections (and, separately, upstream connections) relayed at once
    /// [default: 1024].
    #[arg(long, value_name = "N")]
    pub max_mcp_connections: Option<usize>,
    /// A relayed MCP connection with no byte either way for this long is closed [default: 5m].
    #[arg(long, value_name = "DURATION")]
    pub mcp_idle_timeout: Option<String>,
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
    /// The MCP data path's relays, when turned on.
    pub mcp: Option<RelayConfig>,
}

/// Why the proxy's settings (flags over the file over defaults) are unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A required setting has no value.
    #[error("no {what}: give {flag}")]
    Missing {
        /// What is missing.
        what: &'static str,
        /// The flag that gives it.
        flag: &'static str,
    },
    /// A setting's value is not of its kind or out of its range.
    #[error("{flag} {value:?}: {problem}")]
    Invalid {
        /// The flag (or the file's key of the same name).
        flag: &'static str,
        /// The value given.
        value: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The MCP data path's settings given in part.
    #[error(
        "the MCP data path needs both --enclave-mcp and --dial-listen (and --mcp-listen means \
         nothing without them)"
    )]
    IncompleteMcpPath,
}

/// Why the proxy could not start or stopped with an error. Each variant names what failed;
/// the underlying error is its [`std::error::Error::source`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    /// The settings are unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The store could not be opened.
    #[error("cannot open the log store in {}", dir.display())]
    OpenStore {
        /// The store's directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: StoreError,
    },
    /// The task opening the store did not finish.
    #[error("the log store's opening task failed")]
    OpenTask(#[source] tokio::task::JoinError),
    /// The API's address could not be bound.
    #[error("cannot listen on {addr}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP client for attestation fetches could not be built.
    #[error("cannot build the HTTP client for attestation fetches")]
    HttpClient(#[source] reqwest::Error),
    /// The MCP data path's relays could not start.
    #[error("cannot start the MCP relays (agents on {mcp_listen}, dial on {dial_listen})")]
    Relay {
        /// The agent-facing address.
        mcp_listen: SocketAddr,
        /// Where the enclave dials.
        dial_listen: Address,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The enclave refused the stored log (or the client gave up on it).
    #[error("the enclave cannot serve this log: {why}")]
    EnclaveRefused {
        /// The enclave client's reason.
        why: String,
    },
    /// The HTTP server's task panicked.
    #[error("the HTTP server panicked")]
    ServerPanicked(#[source] tokio::task::JoinError),
    /// The HTTP server failed.
    #[error("the HTTP server failed")]
    ServerFailed(#[source] std::io::Error),
}

fn invalid(flag: &'static str, value: &str, problem: impl ToString) -> ConfigError {
    ConfigError::Invalid {
        flag,
        value: value.to_owned(),
        problem: problem.to_string(),
    }
}

impl ProxyConfig {
    /// Flags over the file over defaults.
    pub fn resolve(args: ProxyArgs, file: &ProxySection) -> Result<ProxyConfig, ConfigError> {
        let mcp = resolve_mcp(&args.mcp_flags(), file)?;
        let enclave =
            args.enclave
                .or_else(|| file.enclave.clone())
                .ok_or(ConfigError::Missing {
                    what: "enclave address",
                    flag: "--enclave (vsock:CID:PORT, unix:PATH or tcp:IP:PORT)",
                })?;
        let enclave: Address = enclave
            .parse()
            .map_err(|e| invalid("--enclave", &enclave, e))?;
        let listen = args
            .listen
            .or_else(|| file.listen.clone())
            .unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
        let listen: SocketAddr = listen
            .parse()
            .map_err(|_| invalid("--listen", &listen, "is not IP:PORT"))?;
        let data_dir =
            args.data_dir
                .or_else(|| file.data_dir.clone())
                .ok_or(ConfigError::Missing {
                    what: "data directory",
                    flag: "--data-dir",
                })?;
        let keys = if args.genesis_admin_keys.is_empty() {
            file.genesis_admin_keys.clone().unwrap_or_default()
        } else {
            args.genesis_admin_keys
        };
        let genesis_admin_keys = keys
            .iter()
            .map(|k| parse_key(k))
            .collect::<Result<Vec<_>, _>>()?;
        let request_timeout = match args
            .request_timeout
            .or_else(|| file.request_timeout.clone())
        {
            Some(t) => humantime::parse_duration(&t)
                .map_err(|e| invalid("--request-timeout", &t, format!("not a duration: {e}")))?,
            None => DEFAULT_REQUEST_TIMEOUT,
        };
        let connections = args
            .connections
            .or(file.connections)
            .unwrap_or(DEFAULT_CONNECTIONS);
        if !(1..=64).contains(&connections) {
            return Err(invalid(
                "--connections",
                &connections.to_string(),
                "must be between 1 and 64",
            ));
        }
        Ok(ProxyConfig {
            mcp,
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

/// The relay flags, taken out of [`ProxyArgs`] before it is consumed.
struct McpFlags {
    enclave_mcp: Option<String>,
    dial_listen: Option<String>,
    mcp_listen: Option<String>,
    max_connections: Option<usize>,
    idle_timeout: Option<String>,
}

impl ProxyArgs {
    fn mcp_flags(&self) -> McpFlags {
        McpFlags {
            enclave_mcp: self.enclave_mcp.clone(),
            dial_listen: self.dial_listen.clone(),
            mcp_listen: self.mcp_listen.clone(),
            max_connections: self.max_mcp_connections,
            idle_timeout: self.mcp_idle_timeout.clone(),
        }
    }
}

/// The relays' configuration: flags over the file over defaults; `None` when the data path is
/// off (no enclave MCP address).
fn resolve_mcp(flags: &McpFlags, file: &ProxySection) -> Result<Option<RelayConfig>, ConfigError> {
    let enclave_mcp = flags
        .enclave_mcp
        .clone()
        .or_else(|| file.enclave_mcp.clone());
    let dial_listen = flags
        .dial_listen
        .clone()
        .or_else(|| file.dial_listen.clone());
    let mcp_listen = flags.mcp_listen.clone().or_else(|| file.mcp_listen.clone());
    let (enclave_mcp, dial_listen) = match (enclave_mcp, dial_listen) {
        (Some(e), Some(d)) => (e, d),
        (None, None) if mcp_listen.is_none() => return Ok(None),
        _ => return Err(ConfigError::IncompleteMcpPath),
    };
    let enclave_mcp: Address = enclave_mcp
        .parse()
        .map_err(|e| invalid("--enclave-mcp", &enclave_mcp, e))?;
    let dial_listen: Address = dial_listen
        .parse()
        .map_err(|e| invalid("--dial-listen", &dial_listen, e))?;
    let mcp_listen = mcp_listen.unwrap_or_else(|| DEFAULT_MCP_LISTEN.to_owned());
    let mcp_listen: SocketAddr = mcp_listen
        .parse()
        .map_err(|_| invalid("--mcp-listen", &mcp_listen, "is not IP:PORT"))?;
    let mut limits = RelayLimits::default();
    if let Some(n) = flags.max_connections.or(file.max_mcp_connections) {
        if n == 0 {
            return Err(invalid("--max-mcp-connections", "0", "must be at least 1"));
        }
        limits.max_agent_connections = n;
        limits.max_upstream_connections = n;
    }
    if let Some(t) = flags
        .idle_timeout
        .clone()
        .or_else(|| file.mcp_idle_timeout.clone())
    {
        limits.idle_timeout = humantime::parse_duration(&t)
            .map_err(|e| invalid("--mcp-idle-timeout", &t, format!("not a duration: {e}")))?;
    }
    Ok(Some(RelayConfig {
        mcp_listen,
        enclave_mcp,
        dial_listen,
        limits,
    }))
}

/// A hex Ed25519 public key (a genesis admin key).
pub fn parse_key(hex_key: &str) -> Result<[u8; 32], ConfigError> {
    let flag = "--genesis-admin-key";
    let bytes = hex::decode(hex_key.trim()).map_err(|_| invalid(flag, hex_key, "is not hex"))?;
    let key: [u8; 32] = bytes
        .try_into()
        .map_err(|_| invalid(flag, hex_key, "is not 32 bytes"))?;
    ed25519_dalek::VerifyingKey::from_bytes(&key)
        .map_err(|_| invalid(flag, hex_key, "is not an Ed25519 public key"))?;
    Ok(key)
}

/// `attestplane proxy`: runs until SIGINT/SIGTERM.
pub async fn main(args: ProxyArgs, file: &ProxySection) -> Result<u8, ProxyError> {
    let config = ProxyConfig::resolve(args, file)?;
    let running = start(config).await?;
    println!("attestplane proxy ready: http://{}", running.local_addr);
    if let Some(mcp) = running.mcp_addr {
        println!("attestplane MCP relay: tcp:{mcp}");
    }
    running
        .wait(attestplane_proto::shutdown_signal("attestplane"))
        .await?;
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
    /// The MCP relay's agent-facing address, when the data path is on.
    pub mcp_addr: Option<SocketAddr>,
    relay: Option<Relay>,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    store: Arc<Store>,
}

/// Opens the store, binds and serves the API, connects to the enclave and returns once the
/// enclave serves (replay included). Fails if the enclave refuses the stored log.
pub async fn start(config: ProxyConfig) -> Result<Running, ProxyError> {
    let dir = config.store_dir.clone();
    let store = tokio::task::spawn_blocking(move || Store::open(&dir))
        .await
        .map_err(ProxyError::OpenTask)?
        .map_err(|source| ProxyError::OpenStore {
            dir: config.store_dir.clone(),
            source,
        })?;
    let recovery = store.recovery();
    eprintln!(
        "attestplane: store {}: {} entries in {} segments, indexed in {:.1} s{}{}",
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
        },
        match recovery.unused_tail {
            0 => String::new(),
            n => format!("; cut {n} bytes of unused room (zeros) after the last record"),
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
    let listen_error = |source| ProxyError::Listen {
        addr: config.listen,
        source,
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(listen_error)?;
    let local_addr = listener.local_addr().map_err(listen_error)?;
    let state = AppState::new(client.clone(), config.request_timeout, config.max_in_flight)
        .map_err(ProxyError::HttpClient)?;
    let api_state = state.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        axum::serve(listener, router(state))
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .await
    });
    // The relays start with the API: a misconfigured address fails the start at once. Agent
    // connections made during the replay reach the enclave, which serves MCP only after it.
    let relay = match config.mcp.clone() {
        Some(mcp) => {
            let (mcp_listen, dial_listen) = (mcp.mcp_listen, mcp.dial_listen.clone());
            let relay = Relay::start(mcp, Arc::clone(&store))
                .await
                .map_err(|source| ProxyError::Relay {
                    mcp_listen,
                    dial_listen,
                    source,
                })?;
            api_state.set_relay_metrics(Arc::clone(relay.metrics()));
            Some(relay)
        }
        None => None,
    };
    loop {
        match client.wait_ready(Duration::from_secs(3600)).await {
            Ok(_) => break,
            Err(crate::enclave_client::ClientError::Failed(why)) => {
                let _ = stop.send(());
                let _ = server.await;
                return Err(ProxyError::EnclaveRefused { why });
            }
            Err(_) => continue,
        }
    }
    Ok(Running {
        local_addr,
        client,
        entries_at_open,
        mcp_addr: relay.as_ref().map(Relay::mcp_addr),
        relay,
        stop,
        server,
        store,
    })
}

impl Running {
    /// Serves the API until `shutdown` completes, then drains (requests in flight finish, their
    /// entries stored) and closes.
    pub async fn wait(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ProxyError> {
        let mut server = self.server;
        let relay = self.relay;
        tokio::select! {
            () = shutdown => {
                let _ = self.stop.send(());
                server
                    .await
                    .map_err(ProxyError::ServerPanicked)?
                    .map_err(ProxyError::ServerFailed)?;
            }
            result = &mut server => {
                result
                    .map_err(ProxyError::ServerPanicked)?
                    .map_err(ProxyError::ServerFailed)?;
            }
        }
        if let Some(relay) = relay {
            relay.shutdown().await;
        }
        eprintln!("attestplane: stopped; {} entries stored", self.store.len());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(enclave_mcp: Option<&str>, dial: Option<&str>, listen: Option<&str>) -> McpFlags {
        McpFlags {
            enclave_mcp: enclave_mcp.map(str::to_owned),
            dial_listen: dial.map(str::to_owned),
            mcp_listen: listen.map(str::to_owned),
            max_connections: None,
            idle_timeout: None,
        }
    }

    #[test]
    fn mcp_relays_are_off_unless_both_addresses_are_given() {
        let none = ProxySection::default();
        assert_eq!(resolve_mcp(&flags(None, None, None), &none).unwrap(), None);
        for half in [
            flags(Some("vsock:16:5006"), None, None),
            flags(None, Some("vsock:any:5007"), None),
            flags(None, None, Some("127.0.0.1:7300")),
        ] {
            assert!(resolve_mcp(&half, &none).is_err());
        }
        let on = resolve_mcp(
            &flags(Some("vsock:16:5006"), Some("vsock:any:5007"), None),
            &none,
        )
        .unwrap()
        .unwrap();
        assert_eq!(on.mcp_listen.to_string(), DEFAULT_MCP_LISTEN);
        assert_eq!(on.enclave_mcp.to_string(), "vsock:16:5006");
        assert_eq!(on.dial_listen.to_string(), "vsock:any:5007");
        assert_eq!(on.limits, RelayLimits::default());
    }

    #[test]
    fn mcp_flags_win_over_the_file_and_bad_values_are_refused() {
        let file = ProxySection {
            enclave_mcp: Some("unix:/run/e.sock".into()),
            dial_listen: Some("unix:/run/d.sock".into()),
            max_mcp_connections: Some(8),
            mcp_idle_timeout: Some("1m".into()),
            ..ProxySection::default()
        };
        let c = resolve_mcp(&flags(Some("tcp:127.0.0.1:9"), None, None), &file)
            .unwrap()
            .unwrap();
        assert_eq!(c.enclave_mcp.to_string(), "tcp:127.0.0.1:9");
        assert_eq!(c.dial_listen.to_string(), "unix:/run/d.sock");
        assert_eq!(c.limits.max_agent_connections, 8);
        assert_eq!(c.limits.idle_timeout, Duration::from_secs(60));
        for bad in [
            flags(Some("tcp:localhost:9"), None, None),
            flags(None, Some("udp:1"), None),
            flags(None, None, Some("localhost:7300")),
        ] {
            assert!(resolve_mcp(&bad, &file).is_err());
        }
        let zero = McpFlags {
            max_connections: Some(0),
            ..flags(None, None, None)
        };
        assert!(resolve_mcp(&zero, &file).is_err());
    }
}
