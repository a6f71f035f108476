//! The MCP data path's transport inside the enclave: agent connections in, upstream
//! connections out, as plain byte streams for the gateway.
//!
//! Role. The gateway speaks MCP (HTTP) to agents and to MCP servers, but the enclave has no
//! network: every byte crosses vsock, relayed by the untrusted host. This module is where the
//! gateway gets its streams, and the only place that knows how they arrive:
//!
//! - [`McpListener`] accepts the connections the host relays from agents (one vsock
//!   connection per agent connection, on the enclave's MCP address: `vsock:any:PORT` in
//!   production, `unix:PATH` or `tcp:IP:PORT` locally), within a connection limit. An accepted
//!   connection is a [`PendingAgent`]; [`PendingAgent::establish`] turns it into an
//!   [`AgentStream`]. [`serve_agents`] is the accept loop that does both, one task per
//!   connection.
//! - [`Dialer::dial`] opens a connection to a registered MCP server through the host: it
//!   connects to the host's dial address, sends a [`DialRequest`] naming the server id, reads
//!   the host's [`DialReply`](attestplane_proto::dial::DialReply) and returns the connection
//!   as a [`Dialed`] (the stream and its gate), within a deadline and a limit on upstream
//!   connections, or a typed [`DialError`].
//!
//! The TLS seam. Both streams are boxed byte streams ([`ByteStream`], the gateway's
//! `UpstreamIo`), so the gateway is written
//! against "some bytes both ways" and never against a socket type. When TLS ends inside the
//! enclave (the confidential transport), [`PendingAgent::establish`] will run the server-side
//! handshake with the key bound into the epoch's attestation document, and [`Dialer::dial`]
//! will run the client-side handshake after the host's `Connected` (pinning the key an attested
//! server's document carries, or checking WebPKI roots built into the image). Their
//! signatures stay as they are and no gateway code changes. That is also why `establish` is a
//! separate, per-connection step rather than part of [`McpListener::accept`]: a handshake
//! waits on the peer, and a peer that stalls it (slowloris) must hold its own task, never the
//! accept loop. [`serve_agents`] calls it in the connection's task, under
//! [`ESTABLISH_TIMEOUT`].
//!
//! Held bytes. What the gateway writes toward an agent or a server may depend on log entries
//! (a call reaches its server only once its decision entry is durable, its answer the agent only
//! once its result entry is). The host's relays hold such bytes for it
//! ([`attestplane_proto::release`]): every dialled connection, and every agent connection the
//! host's relay opens with [`RELEASE_PREAMBLE`], frames what the enclave writes, each frame
//! marked with the [`Gate`] of its connection, and the host delivers a frame only once that many
//! entries are durable. The gateway raises a connection's gate instead of waiting for the host's
//! `Durable` ([`AgentStream::gate`], [`Dialed::gate`]); a connection without the preamble (an
//! agent connected straight to the port, as tests do) has no gate, and the gateway waits.
//!
//! Trust: none in the host. It can refuse, delay, cut or misroute any connection, and it sees
//! every byte until TLS lands; what it cannot do is reach the enclave any other way than
//! through these streams, whose bytes the gateway parses as hostile input. A dial reply is
//! hostile too: bounded, versioned, decoded without panics, and a `Connected` from the host
//! proves nothing about who answers (hence receipts for servers, TLS pinning next). The
//! peer address of an agent connection is the host's relay and is never used.
//!
//! Not here: HTTP and MCP (the gateway), retries and connection reuse (the gateway keeps
//! upstream connections alive and reuses them), the host's side (the host proxy's relay).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use attestplane_proto::{
    Address, DialRequest, DialStatus, Gate, Held, Listener, ProtoError, RELEASE_PREAMBLE, ServerId,
    Stream, connect, read_dial_reply, write_dial,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::gateway::upstream::Dialed;

/// Default enclave MCP address (production): the host relays agents here.
pub const DEFAULT_MCP_LISTEN: &str = "vsock:any:5006";

/// Default host dial address (production): the parent instance is vsock CID 3.
pub const DEFAULT_DIAL: &str = "vsock:3:5007";

/// Default for [`McpListener::bind`]'s connection limit.
pub const DEFAULT_MAX_AGENT_CONNECTIONS: usize = 1024;

/// Default for [`DialerLimits::max_connections`].
pub const DEFAULT_MAX_UPSTREAM_CONNECTIONS: usize = 1024;

/// Default for [`DialerLimits::timeout`]: connect to the host, send the request, and read the
/// reply (which includes the host's own connect to the server, 5 s by default there).
pub const DEFAULT_DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long [`serve_agents`] lets [`PendingAgent::establish`] take (a TLS handshake, later).
pub const ESTABLISH_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a stopping [`serve_agents`] lets connection tasks finish before aborting them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Consecutive `accept` failures after which [`McpListener::accept`] returns the error.
const MAX_ACCEPT_FAILURES: u32 = 8;

/// The first pause after a failed `accept`; it doubles with each further failure.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);

/// Bytes both ways, whatever carries them: a vsock, Unix or TCP stream today, a TLS session
/// over one of them once the confidential transport lands.
pub trait ByteStream: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> ByteStream for T {}

/// An agent's connection, ready for the gateway's HTTP server.
pub struct AgentStream {
    /// The connection's bytes.
    pub io: Box<dyn ByteStream>,
    /// The gate of a connection the host holds frames on (its relay opened it with the
    /// preamble); `None` for an unheld one, whose bytes go out as they are written (the
    /// gateway then waits for entries to be durable before it writes what depends on them).
    pub gate: Option<Gate>,
}

impl std::fmt::Debug for AgentStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentStream")
            .field("held", &self.gate.is_some())
            .finish_non_exhaustive()
    }
}

/// A stream that holds a slot of a connection limit until it is dropped, and gives back the
/// byte [`PendingAgent::establish`] read to tell an HTTP request from the host's preamble.
struct Slotted<S> {
    inner: S,
    _slot: OwnedSemaphorePermit,
    /// A byte already read from `inner`, returned before anything else.
    first: Option<u8>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Slotted<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() > 0
            && let Some(b) = this.first.take()
        {
            buf.put_slice(&[b]);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Slotted<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

// ---------------------------------------------------------------------------------------------
// Agents in.

/// The enclave's MCP listener: accepts the agent connections the host relays.
#[derive(Debug)]
pub struct McpListener {
    listener: Listener,
    slots: Arc<Semaphore>,
    max_connections: usize,
    refused: AtomicU64,
}

/// An accepted agent connection whose set-up ([`PendingAgent::establish`]) has not run yet.
/// It holds its slot of the connection limit, and so does the [`AgentStream`] it becomes.
#[derive(Debug)]
pub struct PendingAgent {
    stream: Stream,
    slot: OwnedSemaphorePermit,
}

impl McpListener {
    /// Binds `address` (vsock, Unix or TCP) with a limit of `max_connections` agent
    /// connections at once (at least 1).
    pub async fn bind(address: &Address, max_connections: usize) -> io::Result<McpListener> {
        let max_connections = max_connections.max(1);
        Ok(McpListener {
            listener: Listener::bind(address).await?,
            slots: Arc::new(Semaphore::new(max_connections)),
            max_connections,
            refused: AtomicU64::new(0),
        })
    }

    /// The bound address (with the port chosen for a port-0 or `any` bind).
    pub fn local_addr(&self) -> io::Result<Address> {
        self.listener.local_addr()
    }

    /// The connection limit.
    pub fn max_connections(&self) -> usize {
        self.max_connections
    }

    /// Connections closed on arrival because the limit was reached.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Waits for the next agent connection within the limit. A connection beyond the limit is
    /// closed at once (the host relay then closes the agent's) and the wait goes on. Never
    /// reads from a connection, so no peer can stall it.
    ///
    /// Errors: the listener failed `MAX_ACCEPT_FAILURES` times in a row (with a doubling
    /// pause between attempts); transient failures are retried.
    pub async fn accept(&self) -> io::Result<PendingAgent> {
        let mut failures = 0u32;
        loop {
            let stream = match self.listener.accept().await {
                Ok(stream) => stream,
                Err(e) => {
                    failures = failures.saturating_add(1);
                    if failures >= MAX_ACCEPT_FAILURES {
                        return Err(e);
                    }
                    tokio::time::sleep(ACCEPT_BACKOFF.saturating_mul(1u32 << failures.min(16)))
                        .await;
                    continue;
                }
            };
            failures = 0;
            match Arc::clone(&self.slots).try_acquire_owned() {
                Ok(slot) => return Ok(PendingAgent { stream, slot }),
                Err(_) => {
                    self.refused.fetch_add(1, Ordering::Relaxed);
                    drop(stream);
                }
            }
        }
    }
}

impl PendingAgent {
    /// Completes the connection's set-up and hands it over as an [`AgentStream`]: reads the
    /// first byte, and if it starts [`RELEASE_PREAMBLE`] (the host's relay holds this
    /// connection's frames) the rest of the preamble, so the stream frames what is written to
    /// it under a [`Gate`] of its own; any other first byte (an HTTP request) is given back to
    /// the reader and the stream is unheld. With TLS inside the enclave this also runs the
    /// handshake (inside the frames). Call it in the connection's own task, with a timeout
    /// ([`serve_agents`] does both): it waits for the peer's first bytes.
    ///
    /// Errors: the connection closes or fails before its first byte, or starts the preamble
    /// and does not finish it (`InvalidData`).
    pub async fn establish(self) -> io::Result<AgentStream> {
        let mut stream = self.stream;
        let mut first = [0u8; 1];
        stream.read_exact(&mut first).await?;
        if first[0] != RELEASE_PREAMBLE[0] {
            let io = Slotted {
                inner: stream,
                _slot: self.slot,
                first: Some(first[0]),
            };
            return Ok(AgentStream {
                io: Box::new(io),
                gate: None,
            });
        }
        let mut rest = [0u8; RELEASE_PREAMBLE.len() - 1];
        stream.read_exact(&mut rest).await?;
        if RELEASE_PREAMBLE.get(1..) != Some(&rest[..]) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the connection starts with a NUL byte but not with the host's preamble",
            ));
        }
        let gate = Gate::new();
        let io = Slotted {
            inner: Held::new(stream, gate.clone()),
            _slot: self.slot,
            first: None,
        };
        Ok(AgentStream {
            io: Box::new(io),
            gate: Some(gate),
        })
    }
}

/// Accepts agent connections until `shutdown` completes, and for each one, in a task of its
/// own, runs [`PendingAgent::establish`] (under [`ESTABLISH_TIMEOUT`]) and then `handler` with
/// the stream. On shutdown it stops accepting, lets running handlers finish for
/// [`SHUTDOWN_GRACE`], then aborts them.
///
/// Errors: the listener failed for good (see [`McpListener::accept`]).
pub async fn serve_agents<H, F>(
    listener: McpListener,
    handler: H,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()>
where
    H: Fn(AgentStream) -> F + Send + Sync + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let handler = Arc::new(handler);
    let mut tasks = JoinSet::new();
    tokio::pin!(shutdown);
    let result = loop {
        while tasks.try_join_next().is_some() {}
        let pending = tokio::select! {
            () = &mut shutdown => break Ok(()),
            pending = listener.accept() => pending,
        };
        let pending = match pending {
            Ok(pending) => pending,
            Err(e) => break Err(e),
        };
        let handler = Arc::clone(&handler);
        tasks.spawn(async move {
            if let Ok(Ok(stream)) =
                tokio::time::timeout(ESTABLISH_TIMEOUT, pending.establish()).await
            {
                handler(stream).await;
            }
        });
    };
    drop(listener);
    let drain = async { while tasks.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, drain).await;
    tasks.abort_all();
    result
}

/// Both halves of the transport, bound from the enclave's `--mcp-listen` and `--dial` flags.
#[derive(Debug)]
pub struct McpTransport {
    /// Agent connections in.
    pub listener: McpListener,
    /// Upstream connections out.
    pub dialer: Dialer,
}

impl McpTransport {
    /// Binds the MCP listener with the default limits and makes a dialer for the host's dial
    /// address (nothing connects until the first dial).
    pub async fn bind(listen: &Address, dial: Address) -> io::Result<McpTransport> {
        Ok(McpTransport {
            listener: McpListener::bind(listen, DEFAULT_MAX_AGENT_CONNECTIONS).await?,
            dialer: Dialer::new(dial, DialerLimits::default()),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Upstreams out.

/// Limits of a [`Dialer`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DialerLimits {
    /// Upstream connections open at once (each returned stream holds one until dropped).
    pub max_connections: usize,
    /// Connecting to the host, sending the request and reading the reply, all together.
    pub timeout: Duration,
}

impl Default for DialerLimits {
    fn default() -> Self {
        DialerLimits {
            max_connections: DEFAULT_MAX_UPSTREAM_CONNECTIONS,
            timeout: DEFAULT_DIAL_TIMEOUT,
        }
    }
}

/// Opens connections to registered MCP servers through the host. Clones share the connection
/// limit (so a clone can move into a `'static` future).
#[derive(Clone, Debug)]
pub struct Dialer {
    address: Address,
    limits: DialerLimits,
    slots: Arc<Semaphore>,
}

/// Which step of a dial ran out of time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DialStage {
    /// Connecting to the host's dial address.
    ConnectHost,
    /// Sending the request.
    Request,
    /// Waiting for the host's reply.
    Reply,
    /// The host's own connect to the server (reported by the host).
    ConnectUpstream,
}

impl std::fmt::Display for DialStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DialStage::ConnectHost => "connecting to the host",
            DialStage::Request => "sending the dial request",
            DialStage::Reply => "waiting for the host's reply",
            DialStage::ConnectUpstream => "the host connecting to the server",
        })
    }
}

/// Why [`Dialer::dial`] returned no stream. Messages from the host are quoted as the host
/// sent them (bounded by the dial protocol); they are the untrusted host's words.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DialError {
    /// The server id does not follow the id rule; nothing was sent.
    #[error("cannot dial {server:?}: {source}")]
    BadServerId {
        /// The id as given.
        server: String,
        /// What is wrong with it.
        #[source]
        source: ProtoError,
    },
    /// This dialer is at its limit of open upstream connections; nothing was sent.
    #[error("cannot dial {server}: {max} upstream connections are open already")]
    TooManyConnections {
        /// The server.
        server: String,
        /// The limit.
        max: usize,
    },
    /// The host's dial address did not accept the connection, or the connection failed
    /// before a reply.
    #[error("cannot dial {server}: the host's dial address {address} failed: {source}")]
    HostUnreachable {
        /// The server.
        server: String,
        /// The host's dial address.
        address: Address,
        /// The socket error.
        #[source]
        source: io::Error,
    },
    /// The deadline passed.
    #[error("cannot dial {server}: timed out {stage}")]
    Timeout {
        /// The server.
        server: String,
        /// Which step.
        stage: DialStage,
    },
    /// The host knows no accepted, unrevoked registration of this server.
    #[error("cannot dial {server}: the host knows no such registered server ({message})")]
    UnknownServer {
        /// The server.
        server: String,
        /// The host's explanation.
        message: String,
    },
    /// The host could not connect to the server's registered endpoint.
    #[error("cannot dial {server}: the host could not connect to it ({message})")]
    ConnectFailed {
        /// The server.
        server: String,
        /// The host's explanation.
        message: String,
    },
    /// The host refused for another reason: the endpoint is not one it dials, it is
    /// overloaded, or it could not read the request.
    #[error("cannot dial {server}: the host refused ({status}: {message})")]
    Refused {
        /// The server.
        server: String,
        /// The host's status.
        status: DialStatus,
        /// The host's explanation.
        message: String,
    },
    /// The host's reply is not a dial reply (malformed, oversized, another version, or the
    /// connection ended before it was complete).
    #[error("cannot dial {server}: bad reply from the host: {source}")]
    BadReply {
        /// The server.
        server: String,
        /// What was wrong.
        #[source]
        source: ProtoError,
    },
}

impl Dialer {
    /// A dialer that asks the host at `address` (`vsock:3:PORT` in production).
    pub fn new(address: Address, limits: DialerLimits) -> Dialer {
        let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
        Dialer {
            address,
            limits,
            slots,
        }
    }

    /// The host's dial address.
    pub fn address(&self) -> &Address {
        &self.address
    }

    /// Upstream connections open now.
    pub fn open_connections(&self) -> usize {
        self.limits
            .max_connections
            .max(1)
            .saturating_sub(self.slots.available_permits())
    }

    /// Opens a connection to the registered server `server_id` through the host. The
    /// returned stream carries the server's bytes; what is written to it goes out in held
    /// frames under the returned gate (the dial protocol's version 2); it holds one of the
    /// dialer's connection slots until dropped.
    ///
    /// Errors: see [`DialError`]; every variant names the server.
    pub async fn dial(&self, server_id: &str) -> Result<Dialed, DialError> {
        let server = ServerId::new(server_id).map_err(|source| DialError::BadServerId {
            server: server_id.to_owned(),
            source,
        })?;
        let name = server.as_str().to_owned();
        let slot = Arc::clone(&self.slots).try_acquire_owned().map_err(|_| {
            DialError::TooManyConnections {
                server: name.clone(),
                max: self.limits.max_connections.max(1),
            }
        })?;
        let request =
            DialRequest::new(server)
                .encode()
                .map_err(|source| DialError::BadServerId {
                    server: name.clone(),
                    source,
                })?;
        let deadline = Instant::now() + self.limits.timeout;
        let timeout = |stage| DialError::Timeout {
            server: name.clone(),
            stage,
        };
        let unreachable = |source| DialError::HostUnreachable {
            server: name.clone(),
            address: self.address.clone(),
            source,
        };
        let mut stream = tokio::time::timeout_at(deadline, connect(&self.address))
            .await
            .map_err(|_| timeout(DialStage::ConnectHost))?
            .map_err(unreachable)?;
        tokio::time::timeout_at(deadline, write_dial(&mut stream, &request))
            .await
            .map_err(|_| timeout(DialStage::Request))?
            .map_err(|e| match e {
                ProtoError::Io(source) => unreachable(source),
                other => unreachable(io::Error::other(other.to_string())),
            })?;
        let reply = tokio::time::timeout_at(deadline, read_dial_reply(&mut stream))
            .await
            .map_err(|_| timeout(DialStage::Reply))?
            .map_err(|source| DialError::BadReply {
                server: name.clone(),
                source,
            })?;
        let message = reply.message;
        match reply.status {
            DialStatus::Connected => {
                let gate = Gate::new();
                let io = Slotted {
                    inner: Held::new(stream, gate.clone()),
                    _slot: slot,
                    first: None,
                };
                Ok(Dialed {
                    io: Box::new(io),
                    gate: Some(gate),
                })
            }
            DialStatus::UnknownServer => Err(DialError::UnknownServer {
                server: name,
                message,
            }),
            DialStatus::ConnectFailed => Err(DialError::ConnectFailed {
                server: name,
                message,
            }),
            DialStatus::Timeout => Err(timeout(DialStage::ConnectUpstream)),
            status @ (DialStatus::EndpointRefused
            | DialStatus::Overloaded
            | DialStatus::BadRequest) => Err(DialError::Refused {
                server: name,
                status,
                message,
            }),
        }
    }
}

impl DialError {
    /// The closest `io::ErrorKind`, for callers that speak `io::Error`.
    pub fn kind(&self) -> io::ErrorKind {
        match self {
            DialError::BadServerId { .. } => io::ErrorKind::InvalidInput,
            DialError::TooManyConnections { .. } => io::ErrorKind::WouldBlock,
            DialError::HostUnreachable { source, .. } => source.kind(),
            DialError::Timeout { .. } => io::ErrorKind::TimedOut,
            DialError::UnknownServer { .. } => io::ErrorKind::NotFound,
            DialError::ConnectFailed { .. } | DialError::Refused { .. } => {
                io::ErrorKind::ConnectionRefused
            }
            DialError::BadReply { .. } => io::ErrorKind::InvalidData,
        }
    }
}

/// The gateway's upstream client dials through the host with this: the `io::Error` carries
/// the [`DialError`] (recover it with `get_ref()` / `downcast`) and its closest kind.
impl crate::gateway::upstream::Connect for Dialer {
    fn connect(&self, server_id: &str) -> crate::gateway::upstream::ConnectFuture {
        let dialer = self.clone();
        let server_id = server_id.to_owned();
        Box::pin(async move {
            dialer
                .dial(&server_id)
                .await
                .map_err(|e| io::Error::new(e.kind(), e))
        })
    }

    /// Every dialled connection is held: the host speaks the dial protocol's version 2.
    fn holds(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_addresses_are_vsock_and_parse() {
        let listen: Address = DEFAULT_MCP_LISTEN.parse().unwrap();
        assert_eq!(
            listen,
            Address::Vsock {
                cid: attestplane_proto::VSOCK_ANY,
                port: 5006
            }
        );
        let dial: Address = DEFAULT_DIAL.parse().unwrap();
        assert_eq!(dial, Address::Vsock { cid: 3, port: 5007 });
        // Nothing connects here: a dialer is only an address and limits until it dials.
        let dialer = Dialer::new(dial.clone(), DialerLimits::default());
        assert_eq!(dialer.address(), &dial);
        assert_eq!(dialer.open_connections(), 0);
    }
}
