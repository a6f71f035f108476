//! The MCP data path's byte relays: agents → the enclave's MCP port, and the enclave → the MCP
//! servers it asks for.
//!
//! Role. The MCP gateway runs inside the enclave; the enclave has no network. This module is
//! the host's whole part of the data path, and it is two copies of bytes:
//!
//! - **The agent relay** listens on an agent-facing TCP address (`--mcp-listen`) and, for each
//!   accepted agent connection, opens a connection of its own to the enclave's MCP address
//!   (`--enclave-mcp`: `vsock:CID:PORT` in production, `unix:PATH` or `tcp:IP:PORT` locally)
//!   and copies bytes both ways until both sides have closed. It prepends nothing: the enclave
//!   does not learn the agent's address from the host (it would have no reason to believe it).
//! - **The upstream dialer** listens on the address the enclave dials (`--dial-listen`). Each
//!   connection starts with one [`DialRequest`] naming a registered server id; the host looks
//!   the id up among the accepted registrations of its stored log ([`Registry`]), refuses
//!   unknown or revoked ids and endpoints it will not dial ([`DialTarget`]), connects to the
//!   registered endpoint's host and port (with a connect timeout), answers one [`DialReply`],
//!   and on success copies bytes both ways. The request carries no address, so nothing that
//!   reaches the dial port can make the host connect anywhere a signed registration does not
//!   name. The connection is raw TCP: no redirects to follow and no proxy taken from the
//!   environment, because there is no HTTP client here at all.
//!
//! Both relays parse no MCP and no HTTP: they see bytes, count them, and close. When TLS ends
//! inside the enclave (the next step of the confidential transport) the bytes they carry become
//! ciphertext and nothing here changes; only [`DialTarget`] will then also admit `https://`.
//!
//! Held bytes. What the enclave sends toward an agent or a server depends on log entries: a
//! call may reach its server only once its decision entry is durable, and its answer the agent
//! only once its result entry is. So the enclave's side of both relays is framed
//! ([`attestplane_proto::release`]): each frame says how many entries must be durable before
//! its payload is delivered, and the relay holds it until the store's [`DurableWatch`] says so
//! (frames in order; a store that fails delivers nothing more and the connection closes). The
//! agent relay tells the enclave it holds frames by opening each connection with
//! [`RELEASE_PREAMBLE`]; a dialled connection holds them by the dial protocol's version. This
//! saves a round trip through the enclave per entry (the `Durable` to the enclave, the bytes
//! back) and changes no trust: the host that delivers is the host that stores and that would
//! report the entry durable. Bytes from agents and servers to the enclave are not framed.
//!
//! Limits. Each relay has a connection limit (one more connection is accepted and closed at
//! once; the dialer first answers [`DialStatus::Overloaded`]), an idle timeout (no byte in
//! either direction for that long closes both sides, so a peer that stops reading or writing
//! cannot hold a slot for ever), and the dialer has a deadline for the request and for the
//! connect. A slow or silent peer holds only its own slot: accepting never waits on a
//! connection. Half-close is relayed: when one side finishes sending, the other side's write
//! half is shut down and the opposite direction keeps flowing until it finishes too.
//!
//! Trust. None: agents, the enclave's dial requests (the dial port may be reachable by other
//! local processes) and upstreams are all hostile. What the host must get right here is only
//! that it dials nothing but registered endpoints and that no peer can exhaust it; what the
//! bytes mean is the enclave's business, and a host that relays them wrongly can only cause
//! refusals (the gateway logs, receipts bind calls to their arguments).

use std::fmt::Write as _;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use attestplane_proto::{
    Address, DialReply, DialRequest, DialStatus, Listener, ProtoError, RELEASE_PREAMBLE, Stream,
    connect, read_dial_request, read_held, write_dial,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::registry::Registry;
use crate::store::{DurableWatch, Store};

/// Default agent-facing address of the MCP relay.
pub const DEFAULT_MCP_LISTEN: &str = "127.0.0.1:7300";

/// Default for [`RelayLimits::max_agent_connections`].
pub const DEFAULT_MAX_AGENT_CONNECTIONS: usize = 1024;

/// Default for [`RelayLimits::max_upstream_connections`].
pub const DEFAULT_MAX_UPSTREAM_CONNECTIONS: usize = 1024;

/// Default for [`RelayLimits::idle_timeout`]. Long enough for an MCP event stream that is quiet
/// between notifications; short enough that abandoned connections give their slots back.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Default for [`RelayLimits::connect_timeout`].
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Default for [`RelayLimits::request_timeout`].
pub const DEFAULT_DIAL_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a stopping relay lets its connections finish before closing them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Bytes read at once per direction of a relayed connection.
const RELAY_BUFFER: usize = 16 * 1024;

/// How long the dialer tries to tell a connection over its limit that it is refused.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_millis(100);

/// The longest pause after repeated `accept` failures (too many open files, …).
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Where the relays listen and connect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayConfig {
    /// The agent-facing address (TCP).
    pub mcp_listen: SocketAddr,
    /// The enclave's MCP address.
    pub enclave_mcp: Address,
    /// The address the enclave dials for upstream connections.
    pub dial_listen: Address,
    /// Limits and timeouts.
    pub limits: RelayLimits,
}

/// Connection limits and timeouts of the relays.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayLimits {
    /// Agent connections relayed at once; one more is accepted and closed.
    pub max_agent_connections: usize,
    /// Upstream connections relayed (or being dialled) at once; one more is answered
    /// [`DialStatus::Overloaded`] and closed.
    pub max_upstream_connections: usize,
    /// A relayed connection with no byte in either direction for this long is closed.
    pub idle_timeout: Duration,
    /// Connecting to the enclave (agent relay) or to an upstream (dialer).
    pub connect_timeout: Duration,
    /// Receiving a dial request after the enclave connected.
    pub request_timeout: Duration,
}

impl Default for RelayLimits {
    fn default() -> Self {
        RelayLimits {
            max_agent_connections: DEFAULT_MAX_AGENT_CONNECTIONS,
            max_upstream_connections: DEFAULT_MAX_UPSTREAM_CONNECTIONS,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            request_timeout: DEFAULT_DIAL_REQUEST_TIMEOUT,
        }
    }
}

/// Counters of both relays (all monotonic except the `*_active` gauges).
#[derive(Debug, Default)]
pub struct RelayMetrics {
    /// Agent connections accepted and relayed.
    pub agent_connections: AtomicU64,
    /// Agent connections closed at once because the limit was reached.
    pub agent_refused: AtomicU64,
    /// Agent connections closed because the enclave's MCP address did not answer.
    pub agent_enclave_unreachable: AtomicU64,
    /// Agent connections being relayed now.
    pub agent_active: AtomicU64,
    /// Bytes from agents to the enclave.
    pub agent_bytes_in: AtomicU64,
    /// Bytes from the enclave to agents.
    pub agent_bytes_out: AtomicU64,
    /// Relayed connections (either relay) closed by the idle timeout.
    pub idle_closed: AtomicU64,
    /// Dial requests answered [`DialStatus::Connected`].
    pub dials_connected: AtomicU64,
    /// Dial connections refused, any status but `Connected` (the over-limit ones included).
    pub dials_refused: AtomicU64,
    /// Upstream connections being relayed now.
    pub upstream_active: AtomicU64,
    /// Bytes from the enclave to upstreams.
    pub upstream_bytes_out: AtomicU64,
    /// Bytes from upstreams to the enclave.
    pub upstream_bytes_in: AtomicU64,
}

impl RelayMetrics {
    /// Appends the counters in the Prometheus text format.
    pub fn render(&self, out: &mut String) {
        for (name, kind, value) in [
            (
                "attestplane_mcp_agent_connections_total",
                "counter",
                &self.agent_connections,
            ),
            (
                "attestplane_mcp_agent_refused_total",
                "counter",
                &self.agent_refused,
            ),
            (
                "attestplane_mcp_agent_enclave_unreachable_total",
                "counter",
                &self.agent_enclave_unreachable,
            ),
            (
                "attestplane_mcp_agent_connections_active",
                "gauge",
                &self.agent_active,
            ),
            (
                "attestplane_mcp_agent_bytes_in_total",
                "counter",
                &self.agent_bytes_in,
            ),
            (
                "attestplane_mcp_agent_bytes_out_total",
                "counter",
                &self.agent_bytes_out,
            ),
            (
                "attestplane_mcp_idle_closed_total",
                "counter",
                &self.idle_closed,
            ),
            (
                "attestplane_mcp_dials_connected_total",
                "counter",
                &self.dials_connected,
            ),
            (
                "attestplane_mcp_dials_refused_total",
                "counter",
                &self.dials_refused,
            ),
            (
                "attestplane_mcp_upstream_connections_active",
                "gauge",
                &self.upstream_active,
            ),
            (
                "attestplane_mcp_upstream_bytes_out_total",
                "counter",
                &self.upstream_bytes_out,
            ),
            (
                "attestplane_mcp_upstream_bytes_in_total",
                "counter",
                &self.upstream_bytes_in,
            ),
        ] {
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {}", value.load(Ordering::Relaxed));
        }
    }
}

/// Both relays, running.
#[derive(Debug)]
pub struct Relay {
    mcp_addr: SocketAddr,
    dial_addr: Address,
    metrics: Arc<RelayMetrics>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl Relay {
    /// Binds both listeners and starts relaying. Registered endpoints are read from `store`
    /// (accepted admin entries) when the enclave dials.
    ///
    /// A `unix:` dial address whose file is a stale socket (nobody listening) is removed first;
    /// anything else at that path is an error.
    pub async fn start(config: RelayConfig, store: Arc<Store>) -> io::Result<Relay> {
        let agents = TcpListener::bind(config.mcp_listen).await?;
        let mcp_addr = agents.local_addr()?;
        if let Address::Unix(path) = &config.dial_listen {
            remove_stale_socket(path)?;
        }
        let dial = Listener::bind(&config.dial_listen).await?;
        let dial_addr = dial.local_addr()?;
        let metrics = Arc::new(RelayMetrics::default());
        let (stop, stopped) = watch::channel(false);
        let durable = store.durable_watch();
        let mut tasks = JoinSet::new();
        tasks.spawn(agent_accept_loop(
            agents,
            config.enclave_mcp,
            durable.clone(),
            config.limits.clone(),
            Arc::clone(&metrics),
            stopped.clone(),
        ));
        tasks.spawn(dial_accept_loop(
            dial,
            Arc::new(Upstreams {
                store,
                durable,
                registry: Registry::default(),
            }),
            config.limits,
            Arc::clone(&metrics),
            stopped,
        ));
        Ok(Relay {
            mcp_addr,
            dial_addr,
            metrics,
            stop,
            tasks,
        })
    }

    /// The bound agent-facing address (with the port the kernel chose for port 0).
    pub fn mcp_addr(&self) -> SocketAddr {
        self.mcp_addr
    }

    /// The bound dial address.
    pub fn dial_addr(&self) -> &Address {
        &self.dial_addr
    }

    /// The relays' counters.
    pub fn metrics(&self) -> &Arc<RelayMetrics> {
        &self.metrics
    }

    /// Stops accepting, lets relayed connections finish for up to [`SHUTDOWN_GRACE`], then
    /// closes the rest.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        let drain = async { while self.tasks.join_next().await.is_some() {} };
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, drain).await;
        self.tasks.abort_all();
        if let Address::Unix(path) = &self.dial_addr {
            let _ = std::fs::remove_file(path);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The agent relay.

async fn agent_accept_loop(
    listener: TcpListener,
    enclave: Address,
    durable: DurableWatch,
    limits: RelayLimits,
    metrics: Arc<RelayMetrics>,
    mut stopped: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_agent_connections.max(1)));
    let mut connections = JoinSet::new();
    let mut failures = 0u32;
    loop {
        while connections.try_join_next().is_some() {}
        let accepted = tokio::select! {
            _ = stopped.changed() => break,
            accepted = listener.accept() => accepted,
        };
        let agent = match accepted {
            Ok((agent, _)) => {
                failures = 0;
                agent
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                accept_backoff("agent", &e, failures).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            metrics.agent_refused.fetch_add(1, Ordering::Relaxed);
            drop(agent);
            continue;
        };
        let _ = agent.set_nodelay(true);
        let enclave = enclave.clone();
        let durable = durable.clone();
        let limits = limits.clone();
        let metrics = Arc::clone(&metrics);
        connections.spawn(async move {
            let _slot = slot;
            relay_agent(agent, &enclave, durable, &limits, &metrics).await;
        });
    }
    drop(listener);
    let drain = async { while connections.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, drain).await;
}

async fn relay_agent(
    agent: TcpStream,
    enclave: &Address,
    durable: DurableWatch,
    limits: &RelayLimits,
    metrics: &RelayMetrics,
) {
    // Connect, then say that this peer holds the enclave's frames.
    let opened = async {
        let mut inner = connect(enclave).await?;
        inner.write_all(&RELEASE_PREAMBLE).await?;
        inner.flush().await?;
        io::Result::Ok(inner)
    };
    let inner = match tokio::time::timeout(limits.connect_timeout, opened).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(_)) | Err(_) => {
            metrics
                .agent_enclave_unreachable
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    metrics.agent_connections.fetch_add(1, Ordering::Relaxed);
    metrics.agent_active.fetch_add(1, Ordering::Relaxed);
    let end = splice(
        agent,
        inner,
        limits.idle_timeout,
        (&metrics.agent_bytes_in, None),
        (&metrics.agent_bytes_out, Some(durable)),
    )
    .await;
    if end == SpliceEnd::Idle {
        metrics.idle_closed.fetch_add(1, Ordering::Relaxed);
    }
    metrics.agent_active.fetch_sub(1, Ordering::Relaxed);
}

// ---------------------------------------------------------------------------------------------
// The upstream dialer.

/// Where the dialer learns endpoints.
#[derive(Debug)]
struct Upstreams {
    store: Arc<Store>,
    /// The enclave's frames on dialled connections wait on it.
    durable: DurableWatch,
    registry: Registry,
}

async fn dial_accept_loop(
    listener: Listener,
    upstreams: Arc<Upstreams>,
    limits: RelayLimits,
    metrics: Arc<RelayMetrics>,
    mut stopped: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_upstream_connections.max(1)));
    let mut connections = JoinSet::new();
    let mut failures = 0u32;
    loop {
        while connections.try_join_next().is_some() {}
        let accepted = tokio::select! {
            _ = stopped.changed() => break,
            accepted = listener.accept() => accepted,
        };
        let mut conn = match accepted {
            Ok(conn) => {
                failures = 0;
                conn
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                accept_backoff("dial", &e, failures).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            metrics.dials_refused.fetch_add(1, Ordering::Relaxed);
            let reply = DialReply::new(
                DialStatus::Overloaded,
                "the host is at its limit of upstream connections",
            );
            let _ =
                tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, send_reply(&mut conn, &reply)).await;
            continue;
        };
        let upstreams = Arc::clone(&upstreams);
        let limits = limits.clone();
        let metrics = Arc::clone(&metrics);
        connections.spawn(async move {
            let _slot = slot;
            serve_dial(conn, &upstreams, &limits, &metrics).await;
        });
    }
    drop(listener);
    let drain = async { while connections.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, drain).await;
}

async fn serve_dial(
    mut conn: Stream,
    upstreams: &Arc<Upstreams>,
    limits: &RelayLimits,
    metrics: &RelayMetrics,
) {
    let upstream = match dial(&mut conn, upstreams, limits).await {
        Ok(upstream) => upstream,
        Err(reply) => {
            metrics.dials_refused.fetch_add(1, Ordering::Relaxed);
            let _ =
                tokio::time::timeout(limits.request_timeout, send_reply(&mut conn, &reply)).await;
            return;
        }
    };
    let connected = DialReply::new(DialStatus::Connected, "");
    match tokio::time::timeout(limits.request_timeout, send_reply(&mut conn, &connected)).await {
        Ok(Ok(())) => {}
        _ => return,
    }
    metrics.dials_connected.fetch_add(1, Ordering::Relaxed);
    metrics.upstream_active.fetch_add(1, Ordering::Relaxed);
    let end = splice(
        conn,
        upstream,
        limits.idle_timeout,
        (&metrics.upstream_bytes_out, Some(upstreams.durable.clone())),
        (&metrics.upstream_bytes_in, None),
    )
    .await;
    if end == SpliceEnd::Idle {
        metrics.idle_closed.fetch_add(1, Ordering::Relaxed);
    }
    metrics.upstream_active.fetch_sub(1, Ordering::Relaxed);
}

/// Reads the request, looks the server up and connects; the refusal to send otherwise.
async fn dial(
    conn: &mut Stream,
    upstreams: &Arc<Upstreams>,
    limits: &RelayLimits,
) -> Result<TcpStream, DialReply> {
    let request = match tokio::time::timeout(limits.request_timeout, read_dial_request(conn)).await
    {
        Ok(Ok(request)) => request,
        Ok(Err(e)) => {
            return Err(DialReply::new(
                DialStatus::BadRequest,
                &format!("cannot read the dial request: {e}"),
            ));
        }
        Err(_) => {
            return Err(DialReply::new(
                DialStatus::BadRequest,
                "no complete dial request within the request timeout",
            ));
        }
    };
    let endpoint = lookup(upstreams, &request).await?;
    let target = DialTarget::parse(&endpoint)
        .map_err(|e| DialReply::new(DialStatus::EndpointRefused, &e.to_string()))?;
    match tokio::time::timeout(limits.connect_timeout, target.connect()).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Ok(Err(e)) => Err(e.reply(&target)),
        Err(_) => Err(DialReply::new(
            DialStatus::Timeout,
            &format!("no connection to {target} within the connect timeout"),
        )),
    }
}

/// The registered endpoint of the requested server, from the stored log.
async fn lookup(upstreams: &Arc<Upstreams>, request: &DialRequest) -> Result<String, DialReply> {
    // `Registry::endpoint` reads the store (disk); keep it off the async workers.
    let upstreams = Arc::clone(upstreams);
    let id = request.server.as_str().to_owned();
    let found =
        tokio::task::spawn_blocking(move || upstreams.registry.endpoint(&upstreams.store, &id))
            .await;
    match found {
        Err(e) => Err(DialReply::new(
            DialStatus::ConnectFailed,
            &format!("the registry lookup failed: {e}"),
        )),
        Ok(Ok(Some(endpoint))) => Ok(endpoint),
        Ok(Ok(None)) => Err(DialReply::new(
            DialStatus::UnknownServer,
            "no accepted registration names this server (never registered, or revoked)",
        )),
        Ok(Err(e)) => Err(DialReply::new(
            DialStatus::ConnectFailed,
            &format!("cannot read the registry from the store: {e}"),
        )),
    }
}

async fn send_reply(conn: &mut Stream, reply: &DialReply) -> io::Result<()> {
    let bytes = reply
        .encode()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    write_dial(conn, &bytes)
        .await
        .map_err(|e| io::Error::other(e.to_string()))
}

/// An endpoint the dialer will connect to: the host and port of a registration's
/// `http://HOST[:PORT][/PATH]` endpoint.
///
/// Refused: any other scheme (`https://` until TLS ends inside the enclave: today the gateway
/// speaks plain HTTP, which a TLS port would not understand), user info (`http://a@b` — it
/// hides where the connection goes, and would put credentials in the log), a query or
/// fragment, an empty host or port, port 0, characters outside a host name or an IP literal.
/// Addresses that resolve to link-local (the cloud metadata service lives there), unspecified,
/// multicast or broadcast addresses are refused at connect time, whatever the name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DialTarget {
    host: String,
    port: u16,
}

/// Why an endpoint is not dialled.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    /// Not `http://`.
    #[error("endpoint {endpoint:?} is not http:// (the host dials plain-HTTP endpoints only)")]
    Scheme {
        /// The registered endpoint (endpoints are public: they are in the signed log).
        endpoint: String,
    },
    /// Syntactically not `http://HOST[:PORT][/PATH]`.
    #[error("endpoint {endpoint:?} is not http://HOST[:PORT][/PATH]: {problem}")]
    Malformed {
        /// The registered endpoint.
        endpoint: String,
        /// What is wrong.
        problem: &'static str,
    },
}

/// Why connecting to a [`DialTarget`] failed.
#[derive(Debug)]
enum ConnectError {
    /// The name did not resolve, or resolved to nothing.
    Resolve(io::Error),
    /// Every address it resolved to is one the host does not dial.
    Forbidden(IpAddr),
    /// No address accepted the connection (the last error).
    Connect(io::Error),
}

impl ConnectError {
    fn reply(&self, target: &DialTarget) -> DialReply {
        match self {
            ConnectError::Resolve(e) => DialReply::new(
                DialStatus::ConnectFailed,
                &format!("cannot resolve {}: {e}", target.host),
            ),
            ConnectError::Forbidden(ip) => DialReply::new(
                DialStatus::EndpointRefused,
                &format!(
                    "{} resolves to {ip}, an address the host does not dial (link-local, unspecified, multicast or broadcast)",
                    target.host
                ),
            ),
            ConnectError::Connect(e) => DialReply::new(
                DialStatus::ConnectFailed,
                &format!("cannot connect to {target}: {e}"),
            ),
        }
    }
}

impl std::fmt::Display for DialTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl DialTarget {
    /// Parses a registration's endpoint.
    pub fn parse(endpoint: &str) -> Result<DialTarget, EndpointError> {
        let bad = |problem| EndpointError::Malformed {
            endpoint: endpoint.to_owned(),
            problem,
        };
        let rest = endpoint
            .get(..7)
            .filter(|scheme| scheme.eq_ignore_ascii_case("http://"))
            .and_then(|_| endpoint.get(7..))
            .ok_or_else(|| EndpointError::Scheme {
                endpoint: endpoint.to_owned(),
            })?;
        if rest.contains(['?', '#']) {
            return Err(bad("a query or fragment"));
        }
        let authority = rest.split('/').next().unwrap_or_default();
        if authority.contains('@') {
            return Err(bad("user info before the host"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (ip, after) = v6.split_once(']').ok_or_else(|| bad("an unclosed '['"))?;
            let ip: std::net::Ipv6Addr = ip.parse().map_err(|_| bad("a bad IPv6 literal"))?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or_else(|| bad("junk after ']'"))?),
            };
            (ip.to_string(), port)
        } else {
            match authority.split_once(':') {
                Some((host, port)) => (host.to_owned(), Some(port)),
                None => (authority.to_owned(), None),
            }
        };
        if host.is_empty() {
            return Err(bad("an empty host"));
        }
        if !host.contains(':')
            && !host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        {
            return Err(bad("a host that is neither a name nor an IP literal"));
        }
        let port = match port {
            None => 80,
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| bad("a port outside 1–65535"))?,
            Some(_) => return Err(bad("a port that is not a number")),
        };
        Ok(DialTarget {
            host: host.to_ascii_lowercase(),
            port,
        })
    }

    /// The host (a name, or an IP literal without brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port (80 when the endpoint names none).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Resolves and connects, trying each permitted address in turn.
    async fn connect(&self) -> Result<TcpStream, ConnectError> {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .map_err(ConnectError::Resolve)?
            .collect();
        let mut last = None;
        let mut forbidden = None;
        for addr in addrs {
            if !dialable(addr.ip()) {
                forbidden = Some(addr.ip());
                continue;
            }
            match TcpStream::connect(addr).await {
                Ok(stream) => return Ok(stream),
                Err(e) => last = Some(e),
            }
        }
        Err(match (last, forbidden) {
            (Some(e), _) => ConnectError::Connect(e),
            (None, Some(ip)) => ConnectError::Forbidden(ip),
            (None, None) => ConnectError::Resolve(io::Error::new(
                io::ErrorKind::NotFound,
                "the name resolves to no address",
            )),
        })
    }
}

/// Whether the dialer may connect to `ip`: not link-local (169.254.0.0/16 holds the cloud
/// metadata service; fe80::/10), unspecified, multicast or broadcast. Loopback is allowed
/// (local development and tests run MCP servers there).
fn dialable(ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(v4) => {
            !(v4.is_link_local() || v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast())
        }
        IpAddr::V6(v6) => !(v6.is_unicast_link_local() || v6.is_unspecified() || v6.is_multicast()),
    }
}

// ---------------------------------------------------------------------------------------------
// Copying bytes.

/// How a relayed connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SpliceEnd {
    /// Both sides finished sending.
    Closed,
    /// No byte in either direction for the idle timeout.
    Idle,
    /// A read or write failed (a reset, a broken pipe).
    Failed,
}

/// Copies bytes between `a` and `b` both ways until both directions have finished, one fails,
/// or nothing moves for `idle`. Each direction that reaches its end shuts down the other
/// side's write half (half-close) and the other direction continues. Each direction has its
/// byte counter and, when its source is the enclave, the watch its held frames wait on (the
/// source is then read as frames and their payloads delivered, [`copy_held`]).
async fn splice<A, B>(
    a: A,
    b: B,
    idle: Duration,
    (a_to_b, a_held): (&AtomicU64, Option<DurableWatch>),
    (b_to_a, b_held): (&AtomicU64, Option<DurableWatch>),
) -> SpliceEnd
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut a_read, mut a_write) = tokio::io::split(a);
    let (mut b_read, mut b_write) = tokio::io::split(b);
    let activity = Activity::new();
    let forward = copy_direction(&mut a_read, &mut b_write, a_to_b, &activity, a_held);
    let backward = copy_direction(&mut b_read, &mut a_write, b_to_a, &activity, b_held);
    tokio::pin!(forward, backward);
    let (mut forward_done, mut backward_done) = (false, false);
    loop {
        let deadline = activity.last() + idle;
        tokio::select! {
            result = &mut forward, if !forward_done => {
                if result.is_err() {
                    return SpliceEnd::Failed;
                }
                forward_done = true;
            }
            result = &mut backward, if !backward_done => {
                if result.is_err() {
                    return SpliceEnd::Failed;
                }
                backward_done = true;
            }
            () = tokio::time::sleep_until(deadline) => {
                if activity.last() + idle <= Instant::now() {
                    return SpliceEnd::Idle;
                }
            }
        }
        if forward_done && backward_done {
            return SpliceEnd::Closed;
        }
    }
}

async fn copy_direction<R, W>(
    reader: &mut R,
    writer: &mut W,
    counter: &AtomicU64,
    activity: &Activity,
    held: Option<DurableWatch>,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    match held {
        Some(durable) => copy_held(reader, writer, counter, activity, durable).await,
        None => copy_half(reader, writer, counter, activity).await,
    }
}

/// Reads the enclave's held frames from `reader` and writes each payload to `writer` once the
/// entries it needs are durable, in order. A stream that ends between frames shuts `writer`
/// down (half-close); a malformed or cut-off frame, or a store that fails before a frame's
/// entries are durable, is an error (the connection closes, the payload undelivered).
async fn copy_held<R, W>(
    reader: &mut R,
    writer: &mut W,
    counter: &AtomicU64,
    activity: &Activity,
    mut durable: DurableWatch,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // Buffered: a frame's header and payload usually arrive in one read.
    let mut reader = BufReader::with_capacity(RELAY_BUFFER, reader);
    let mut payload = Vec::with_capacity(RELAY_BUFFER);
    loop {
        let need = match read_held(&mut reader, &mut payload).await {
            Ok(Some(need)) => need,
            Ok(None) => {
                writer.shutdown().await?;
                return Ok(());
            }
            Err(ProtoError::Io(e)) => return Err(e),
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        };
        activity.touch();
        durable.reached(need).await.map_err(io::Error::other)?;
        writer.write_all(&payload).await?;
        writer.flush().await?;
        counter.fetch_add(payload.len() as u64, Ordering::Relaxed);
        activity.touch();
    }
}

async fn copy_half<R, W>(
    reader: &mut R,
    writer: &mut W,
    counter: &AtomicU64,
    activity: &Activity,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; RELAY_BUFFER];
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            writer.shutdown().await?;
            return Ok(());
        }
        activity.touch();
        writer.write_all(buf.get(..n).unwrap_or_default()).await?;
        writer.flush().await?;
        counter.fetch_add(n as u64, Ordering::Relaxed);
        activity.touch();
    }
}

/// When bytes last moved on a relayed connection.
struct Activity {
    start: Instant,
    /// Milliseconds after `start`.
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

async fn accept_backoff(which: &str, e: &io::Error, failures: u32) {
    let pause = Duration::from_millis(10)
        .saturating_mul(1u32 << failures.min(10))
        .min(MAX_ACCEPT_BACKOFF);
    eprintln!("attestplane: mcp {which} relay: accept failed ({e}); retrying in {pause:?}");
    tokio::time::sleep(pause).await;
}

/// Removes a socket file left by an earlier run (nobody accepts on it); refuses to touch
/// anything else.
fn remove_stale_socket(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is in use by a running server", path.display()),
                ));
            }
            std::fs::remove_file(path)
        }
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_render_every_counter_once() {
        let m = RelayMetrics::default();
        m.agent_bytes_in.fetch_add(42, Ordering::Relaxed);
        m.dials_refused.fetch_add(3, Ordering::Relaxed);
        let mut out = String::new();
        m.render(&mut out);
        assert!(
            out.contains("\nattestplane_mcp_agent_bytes_in_total 42\n"),
            "{out}"
        );
        assert!(
            out.contains("\nattestplane_mcp_dials_refused_total 3\n"),
            "{out}"
        );
        assert!(out.contains("# TYPE attestplane_mcp_agent_connections_active gauge\n"));
        assert_eq!(out.lines().filter(|l| l.starts_with("# TYPE")).count(), 12);
        assert_eq!(out.lines().count(), 24);
    }

    #[test]
    fn http_endpoints_parse_to_host_and_port() {
        for (endpoint, host, port) in [
            ("http://127.0.0.1:7401", "127.0.0.1", 7401),
            ("http://127.0.0.1:7401/", "127.0.0.1", 7401),
            ("HTTP://Weather.Example:8080/mcp", "weather.example", 8080),
            ("http://weather.example", "weather.example", 80),
            ("http://[::1]:9000/a/b", "::1", 9000),
            ("http://[::1]", "::1", 80),
        ] {
            let t = DialTarget::parse(endpoint).unwrap();
            assert_eq!((t.host(), t.port()), (host, port), "{endpoint}");
        }
        assert_eq!(
            DialTarget::parse("http://[::1]:9").unwrap().to_string(),
            "[::1]:9"
        );
    }

    #[test]
    fn refuses_endpoints_it_will_not_dial() {
        for endpoint in [
            "https://weather.example",
            "ftp://x",
            "unix:/run/x",
            "tcp:1.2.3.4:5",
            "",
        ] {
            assert!(
                matches!(
                    DialTarget::parse(endpoint),
                    Err(EndpointError::Scheme { .. })
                ),
                "{endpoint}"
            );
        }
        for endpoint in [
            "http://user@evil.example",
            "http://good.example@evil.example:80",
            "http://",
            "http://:80",
            "http://host:",
            "http://host:0",
            "http://host:65536",
            "http://host:+80",
            "http://host:80?x=1",
            "http://host#frag",
            "http://ho st",
            "http://host\n.example",
            "http://[::1",
            "http://[nope]:80",
            "http://[::1]x",
            "http://a:1:2",
        ] {
            assert!(
                matches!(
                    DialTarget::parse(endpoint),
                    Err(EndpointError::Malformed { .. })
                ),
                "{endpoint}"
            );
        }
    }

    #[test]
    fn refuses_metadata_and_other_non_unicast_addresses() {
        for ip in [
            "169.254.169.254",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "fe80::1",
            "::",
            "ff02::1",
            "::ffff:169.254.169.254",
        ] {
            assert!(!dialable(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["127.0.0.1", "10.0.0.7", "::1", "2001:db8::1"] {
            assert!(dialable(ip.parse().unwrap()), "{ip}");
        }
    }
}
