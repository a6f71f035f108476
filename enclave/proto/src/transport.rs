//! Transport: one listener and one stream type over vsock, Unix sockets and TCP, and async
//! helpers that move frames over them.
//!
//! Role: in production the enclave listens on a vsock port and the host connects to the
//! enclave's CID; locally both sides use a Unix socket or loopback TCP with the same framing.
//! Servers and clients are written once against [`Listener`], [`Stream`] and [`connect`], and the
//! choice is an [`Address`] string: `vsock:CID:PORT`, `unix:PATH` or `tcp:IP:PORT`.
//!
//! Trust: none. The channel is neither authenticated nor encrypted on any transport, and it need
//! not be: the host is untrusted by design, so everything the enclave must believe is signed and
//! everything it decides is logged. Frames read here are decoded by [`crate::FrameDecoder`], which
//! refuses an oversized prefix before allocating.
//!
//! Decisions:
//! - `tcp:` takes an IP literal (`tcp:127.0.0.1:5005`, `tcp:[::1]:5005`), never a host name:
//!   parsing stays pure, and no name server can redirect the channel. Any IP is accepted; only
//!   loopback makes sense, since TCP here exists for local development and tests.
//! - `vsock:` takes numeric CID and port; `any` stands for `VMADDR_CID_ANY` / `VMADDR_PORT_ANY`
//!   (`u32::MAX`), the usual listening address inside an enclave (`vsock:any:5005`).
//! - `unix:` takes a path. Binding fails if the path exists; removing a stale socket file is the
//!   caller's decision, and the file is not removed when the listener is dropped.
//! - Accepted and connected TCP streams have `TCP_NODELAY` set: frames are small
//!   request/response units and must not wait for Nagle's algorithm.
//!
//! Not here: connection limits, shutdown, request multiplexing and retry (the enclave's server
//! and the host's client own those; a [`Stream`] can be split with `tokio::io::split`).

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio_vsock::{VsockAddr, VsockListener, VsockStream};

use crate::error::ProtoError;
use crate::frame::{FrameDecoder, encode_frame};
use crate::messages::Frame;

/// `VMADDR_CID_ANY` / `VMADDR_PORT_ANY`, written `any` in an address.
pub const VSOCK_ANY: u32 = u32::MAX;

/// Most bytes one read asks the socket for.
const READ_CHUNK: usize = 64 * 1024;

/// Where to listen or connect.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Address {
    /// An `AF_VSOCK` address: context id and port (`vsock:CID:PORT`).
    Vsock {
        /// The context id ([`VSOCK_ANY`] to listen on any).
        cid: u32,
        /// The port ([`VSOCK_ANY`] to bind any free port).
        port: u32,
    },
    /// A Unix domain socket path (`unix:PATH`).
    Unix(PathBuf),
    /// A TCP socket address with an IP literal (`tcp:IP:PORT`, IPv6 in brackets).
    Tcp(SocketAddr),
}

impl FromStr for Address {
    type Err = ProtoError;

    fn from_str(input: &str) -> Result<Self, ProtoError> {
        let bad = |reason: &'static str| ProtoError::BadAddress {
            input: input.to_owned(),
            reason,
        };
        let (scheme, rest) = input
            .split_once(':')
            .ok_or_else(|| bad("expected vsock:CID:PORT, unix:PATH or tcp:IP:PORT"))?;
        match scheme {
            "vsock" => {
                let (cid, port) = rest
                    .split_once(':')
                    .ok_or_else(|| bad("expected vsock:CID:PORT"))?;
                let cid = parse_vsock_part(cid).ok_or_else(|| bad("CID must be a u32 or any"))?;
                let port =
                    parse_vsock_part(port).ok_or_else(|| bad("PORT must be a u32 or any"))?;
                Ok(Address::Vsock { cid, port })
            }
            "unix" if rest.is_empty() => Err(bad("empty socket path")),
            "unix" => Ok(Address::Unix(PathBuf::from(rest))),
            "tcp" => rest.parse::<SocketAddr>().map(Address::Tcp).map_err(|_| {
                bad("expected tcp:IP:PORT with an IP literal (no host names), e.g. tcp:127.0.0.1:5005 or tcp:[::1]:5005")
            }),
            _ => Err(bad("unknown scheme: expected vsock, unix or tcp")),
        }
    }
}

/// A vsock CID or port: decimal `u32`, or `any` for [`VSOCK_ANY`].
fn parse_vsock_part(s: &str) -> Option<u32> {
    if s == "any" {
        return Some(VSOCK_ANY);
    }
    // `u32::from_str` accepts a leading `+`; an address has one spelling.
    if !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

struct VsockPart(u32);

impl fmt::Display for VsockPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == VSOCK_ANY {
            f.write_str("any")
        } else {
            write!(f, "{}", self.0)
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Vsock { cid, port } => {
                write!(f, "vsock:{}:{}", VsockPart(*cid), VsockPart(*port))
            }
            Address::Unix(path) => write!(f, "unix:{}", path.display()),
            Address::Tcp(addr) => write!(f, "tcp:{addr}"),
        }
    }
}

/// A listening socket of any transport.
#[derive(Debug)]
pub enum Listener {
    /// Listening on vsock.
    Vsock(VsockListener),
    /// Listening on a Unix socket.
    Unix(UnixListener),
    /// Listening on TCP.
    Tcp(TcpListener),
}

impl Listener {
    /// Binds `address`. Must run inside a Tokio runtime with I/O enabled. Vsock binding fails
    /// with an error (never a panic) where the kernel has no vsock support.
    pub async fn bind(address: &Address) -> io::Result<Listener> {
        match address {
            Address::Vsock { cid, port } => {
                VsockListener::bind(VsockAddr::new(*cid, *port)).map(Listener::Vsock)
            }
            Address::Unix(path) => UnixListener::bind(path).map(Listener::Unix),
            Address::Tcp(addr) => TcpListener::bind(addr).await.map(Listener::Tcp),
        }
    }

    /// Waits for the next connection.
    pub async fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Vsock(l) => l.accept().await.map(|(s, _)| Stream::Vsock(s)),
            Listener::Unix(l) => l.accept().await.map(|(s, _)| Stream::Unix(s)),
            Listener::Tcp(l) => {
                let (s, _) = l.accept().await?;
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
        }
    }

    /// The bound address, with the port the kernel chose for a port-0 (or `any`) bind.
    pub fn local_addr(&self) -> io::Result<Address> {
        match self {
            Listener::Vsock(l) => l.local_addr().map(|a| Address::Vsock {
                cid: a.cid(),
                port: a.port(),
            }),
            Listener::Unix(l) => {
                let addr = l.local_addr()?;
                let path = addr.as_pathname().ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidData, "unix listener has no path")
                })?;
                Ok(Address::Unix(path.to_path_buf()))
            }
            Listener::Tcp(l) => l.local_addr().map(Address::Tcp),
        }
    }
}

/// A connected stream of any transport; reads and writes bytes like the stream it wraps.
#[derive(Debug)]
pub enum Stream {
    /// A vsock connection.
    Vsock(VsockStream),
    /// A Unix socket connection.
    Unix(UnixStream),
    /// A TCP connection.
    Tcp(TcpStream),
}

/// Connects to `address`. Must run inside a Tokio runtime with I/O enabled.
pub async fn connect(address: &Address) -> io::Result<Stream> {
    match address {
        Address::Vsock { cid, port } => VsockStream::connect(VsockAddr::new(*cid, *port))
            .await
            .map(Stream::Vsock),
        Address::Unix(path) => UnixStream::connect(path).await.map(Stream::Unix),
        Address::Tcp(addr) => {
            let s = TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            Ok(Stream::Tcp(s))
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Vsock(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Vsock(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Vsock(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Vsock(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Vsock(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Vsock(s) => s.is_write_vectored(),
            Stream::Unix(s) => s.is_write_vectored(),
            Stream::Tcp(s) => s.is_write_vectored(),
        }
    }
}

/// Reads the next frame. `Ok(None)` when the peer closed the connection at a frame boundary.
///
/// Never reads past the end of the current frame, so no bytes are lost between calls; wrap the
/// reader in a `tokio::io::BufReader` to save system calls. Cancel-safe: partial progress lives
/// in `decoder`, so the call may sit in a `select!` and be repeated with the same decoder.
///
/// Errors: [`ProtoError::TooLarge`] as soon as a prefix announces more than
/// [`crate::MAX_FRAME_LEN`] (before allocating); [`ProtoError::UnexpectedEof`] when the peer
/// closes mid-frame; [`ProtoError::Io`]; and the per-frame decode errors of
/// [`FrameDecoder::next_frame`], after which the next call reads the next frame.
pub async fn read_frame<R>(
    reader: &mut R,
    decoder: &mut FrameDecoder,
) -> Result<Option<Frame>, ProtoError>
where
    R: AsyncRead + Unpin + ?Sized,
{
    loop {
        if let Some(frame) = decoder.next_frame()? {
            return Ok(Some(frame));
        }
        let want = decoder.needed().min(READ_CHUNK);
        let spare = decoder.spare(want)?;
        let room = spare.len().min(want);
        let n = reader
            .read(spare.get_mut(..room).unwrap_or_default())
            .await?;
        if n == 0 {
            return decoder.finish().map(|()| None);
        }
        decoder.advance(n)?;
    }
}

/// Encodes `frame` and writes it whole, then flushes. Not cancel-safe: a write abandoned midway
/// leaves a partial frame on the stream, so the connection must then be dropped.
///
/// Errors: those of [`encode_frame`] (nothing is written then) and [`ProtoError::Io`].
pub async fn write_frame<W>(writer: &mut W, frame: &Frame) -> Result<(), ProtoError>
where
    W: AsyncWrite + Unpin + ?Sized,
{
    let bytes = encode_frame(frame)?;
    writer.write_all(&bytes).await?;
    writer.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_strings_parse_to_the_expected_address() {
        let ok: [(&str, Address); 8] = [
            (
                "vsock:16:5005",
                Address::Vsock {
                    cid: 16,
                    port: 5005,
                },
            ),
            (
                "vsock:any:5005",
                Address::Vsock {
                    cid: VSOCK_ANY,
                    port: 5005,
                },
            ),
            (
                "vsock:4294967295:any",
                Address::Vsock {
                    cid: VSOCK_ANY,
                    port: VSOCK_ANY,
                },
            ),
            ("unix:/run/ap.sock", Address::Unix("/run/ap.sock".into())),
            ("unix:rel/a:b.sock", Address::Unix("rel/a:b.sock".into())),
            (
                "tcp:127.0.0.1:5005",
                Address::Tcp("127.0.0.1:5005".parse().unwrap()),
            ),
            ("tcp:[::1]:0", Address::Tcp("[::1]:0".parse().unwrap())),
            (
                "tcp:10.0.0.7:80",
                Address::Tcp("10.0.0.7:80".parse().unwrap()),
            ),
        ];
        for (s, want) in ok {
            assert_eq!(s.parse::<Address>().unwrap(), want, "{s}");
        }
    }

    #[test]
    fn malformed_address_strings_are_refused_with_a_reason() {
        let bad = [
            "",
            "vsock",
            "vsock:16",
            "vsock:16:",
            "vsock::5005",
            "vsock:-1:5005",
            "vsock:+16:5005",
            "vsock:16:4294967296",
            "vsock:0x10:5005",
            "vsock:16:5005:1",
            "unix:",
            "tcp:localhost:5005",
            "tcp:example.com:443",
            "tcp:127.0.0.1",
            "tcp:127.0.0.1:65536",
            "tcp:::1:5005",
            "udp:127.0.0.1:53",
            "VSOCK:16:5005",
        ];
        for s in bad {
            let err = s.parse::<Address>().unwrap_err();
            assert!(
                matches!(&err, ProtoError::BadAddress { input, .. } if input == s),
                "{s}: {err}"
            );
        }
    }

    #[test]
    fn addresses_display_as_they_parse() {
        for s in [
            "vsock:16:5005",
            "vsock:any:5005",
            "vsock:3:any",
            "unix:/tmp/x.sock",
            "tcp:127.0.0.1:5005",
            "tcp:[::1]:7",
        ] {
            assert_eq!(s.parse::<Address>().unwrap().to_string(), s);
        }
        assert_eq!(
            "vsock:4294967295:1".parse::<Address>().unwrap().to_string(),
            "vsock:any:1"
        );
    }
}
