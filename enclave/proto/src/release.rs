//! Held bytes: what the enclave sends toward an agent or an MCP server, for the host to deliver
//! only once the log entries it depends on are durable.
//!
//! Role. A gateway call's decision entry must be durable before the call reaches the server,
//! and its result entry before the answer reaches the agent. The host is the one that makes
//! entries durable, and the one that carries the bytes: so rather than wait for the host's
//! `Durable` and only then write (a round trip through the enclave per entry), the enclave
//! writes the bytes at once, each run of them marked with how many entries must be durable
//! first, and the host holds them until its store has synced that many. Trust is unchanged: a
//! host that would deliver early could already lie with `Durable`; an honest host delivers
//! right after its `fdatasync`.
//!
//! Where. Only the enclave-to-host direction of the data path's connections is framed; what
//! the host receives from agents and servers and passes to the enclave stays raw bytes.
//! - An upstream connection: every connection the dial protocol ([`crate::dial`], version 2)
//!   connects carries held frames from the enclave after the host's `Connected`.
//! - An agent connection: the host's relay opens each connection to the enclave's MCP port with
//!   [`RELEASE_PREAMBLE`], which says "this peer holds frames"; the enclave then frames what it
//!   sends on that connection. A connection that does not start with the preamble (an agent
//!   connected straight to the port, as tests do) gets raw bytes, and the enclave itself waits
//!   for `Durable` before writing what depends on an entry. The preamble's first byte is NUL,
//!   which no HTTP request starts with, so one byte tells the two apart.
//!
//! Encoding. A frame is a 12-byte header, a big-endian `u32` payload length (1 to
//! [`MAX_RELEASE_PAYLOAD`]) and a big-endian `u64` *need* (the number of log entries, counted
//! from the first, that must be durable before the payload is delivered; 0 for none), then the
//! payload. Frames are delivered in order: a frame waits for its need and for every frame
//! before it. The end of the enclave's stream at a frame boundary is the end of the bytes to
//! deliver (a half-close); anywhere else it is a cut-off frame, and the connection is closed.
//!
//! Trust: the host must survive a hostile enclave-side stream (lengths checked before anything
//! is allocated, typed errors, no panic); the enclave trusts nothing the host says here because
//! the host says nothing: it only delivers or withholds.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use crate::error::ProtoError;

/// What the host's relay writes first on each connection it opens to the enclave's MCP port.
pub const RELEASE_PREAMBLE: [u8; 16] = *b"\0attestplane-hb1";

/// The length of a frame's header.
pub const RELEASE_HEADER_LEN: usize = 12;

/// The largest payload of one frame.
pub const MAX_RELEASE_PAYLOAD: usize = 64 * 1024;

/// A frame's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReleaseHeader {
    /// Payload bytes that follow (1 to [`MAX_RELEASE_PAYLOAD`]).
    pub len: u32,
    /// Entries that must be durable before the payload is delivered (0: none).
    pub need: u64,
}

impl ReleaseHeader {
    /// The header's bytes.
    pub fn encode(&self) -> [u8; RELEASE_HEADER_LEN] {
        let mut out = [0u8; RELEASE_HEADER_LEN];
        let (len, need) = out.split_at_mut(4);
        len.copy_from_slice(&self.len.to_be_bytes());
        need.copy_from_slice(&self.need.to_be_bytes());
        out
    }

    /// Reads a header's bytes.
    ///
    /// Errors: [`ProtoError::TooLarge`] for a payload over [`MAX_RELEASE_PAYLOAD`],
    /// [`ProtoError::Malformed`] for an empty one.
    pub fn decode(bytes: &[u8; RELEASE_HEADER_LEN]) -> Result<ReleaseHeader, ProtoError> {
        let (len, need) = bytes.split_at(4);
        let mut len_bytes = [0u8; 4];
        len_bytes.copy_from_slice(len);
        let mut need_bytes = [0u8; 8];
        need_bytes.copy_from_slice(need);
        let header = ReleaseHeader {
            len: u32::from_be_bytes(len_bytes),
            need: u64::from_be_bytes(need_bytes),
        };
        if header.len == 0 {
            return Err(ProtoError::Malformed {
                id: None,
                reason: "a held frame with no payload".to_owned(),
            });
        }
        if usize::try_from(header.len).map_or(true, |n| n > MAX_RELEASE_PAYLOAD) {
            return Err(ProtoError::TooLarge {
                len: u64::from(header.len),
                max: MAX_RELEASE_PAYLOAD,
            });
        }
        Ok(header)
    }
}

/// What the bytes written next on a [`Held`] stream depend on: the number of log entries that
/// must be durable before the host delivers them. It only grows: raising it covers everything
/// written afterwards on the stream, so a response written after its entry was required can
/// never go out before that entry is durable, whatever else shares the connection.
#[derive(Clone, Debug, Default)]
pub struct Gate(Arc<AtomicU64>);

impl Gate {
    /// A gate at 0: nothing required yet.
    pub fn new() -> Gate {
        Gate::default()
    }

    /// Requires the first `need` entries to be durable before anything written from now on.
    pub fn require(&self, need: u64) {
        self.0.fetch_max(need, Ordering::AcqRel);
    }

    /// The entries required now.
    pub fn need(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }
}

/// A stream whose writes go out as held frames, each marked with its [`Gate`]'s need at the
/// time of the write; reads pass through. A write is accepted whole into one frame (at most
/// [`MAX_RELEASE_PAYLOAD`] bytes of it) and sent before the next is taken; `flush` and
/// `shutdown` send what is pending first.
#[derive(Debug)]
pub struct Held<S> {
    inner: S,
    gate: Gate,
    /// The frame being sent (header and payload).
    out: Vec<u8>,
    /// Bytes of `out` already written.
    sent: usize,
}

impl<S> Held<S> {
    /// Frames what is written to `inner` under `gate`.
    pub fn new(inner: S, gate: Gate) -> Held<S> {
        Held {
            inner,
            gate,
            out: Vec::new(),
            sent: 0,
        }
    }

    /// The stream's gate.
    pub fn gate(&self) -> &Gate {
        &self.gate
    }

    /// Starts a frame of `bufs`' bytes, as many as fit one frame; returns how many it took.
    fn frame(&mut self, bufs: &[io::IoSlice<'_>]) -> usize {
        let total = bufs
            .iter()
            .map(|b| b.len())
            .fold(0usize, usize::saturating_add)
            .min(MAX_RELEASE_PAYLOAD);
        self.out.clear();
        self.sent = 0;
        if total == 0 {
            return 0;
        }
        let header = ReleaseHeader {
            len: u32::try_from(total).unwrap_or(u32::MAX),
            need: self.gate.need(),
        };
        self.out.extend_from_slice(&header.encode());
        let mut left = total;
        for b in bufs {
            let take = b.len().min(left);
            self.out
                .extend_from_slice(b.get(..take).unwrap_or_default());
            left -= take;
            if left == 0 {
                break;
            }
        }
        total
    }
}

impl<S: AsyncWrite + Unpin> Held<S> {
    /// Writes the pending frame to the end.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.out.len() {
            let rest = self.out.get(self.sent..).unwrap_or_default();
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, rest))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.out.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }

    fn poll_write_slices(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_send(cx))?;
        let taken = self.frame(bufs);
        if taken > 0 {
            // Sent now if the socket takes it; otherwise by the next write, flush or shutdown.
            if let Poll::Ready(Err(e)) = self.poll_send(cx) {
                return Poll::Ready(Err(e));
            }
        }
        Poll::Ready(Ok(taken))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Held<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Held<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_write_slices(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_slices(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// Reads the next frame from `reader` into `payload` (replacing its contents) and returns its
/// need; `None` when the stream ends cleanly before a frame starts.
///
/// Errors: a header [`ReleaseHeader::decode`] refuses, [`ProtoError::UnexpectedEof`] for a
/// frame cut off, [`ProtoError::Io`].
pub async fn read_held<R: AsyncRead + Unpin>(
    reader: &mut R,
    payload: &mut Vec<u8>,
) -> Result<Option<u64>, ProtoError> {
    let mut header = [0u8; RELEASE_HEADER_LEN];
    let mut filled = 0;
    while filled < RELEASE_HEADER_LEN {
        let rest = header.get_mut(filled..).unwrap_or_default();
        let n = reader.read(rest).await?;
        if n == 0 {
            if filled == 0 {
                return Ok(None);
            }
            return Err(ProtoError::UnexpectedEof { buffered: filled });
        }
        filled += n;
    }
    let header = ReleaseHeader::decode(&header)?;
    let len = usize::try_from(header.len).unwrap_or(usize::MAX);
    payload.clear();
    payload.resize(len, 0);
    let mut got = 0;
    while got < len {
        let rest = payload.get_mut(got..).unwrap_or_default();
        let n = reader.read(rest).await?;
        if n == 0 {
            return Err(ProtoError::UnexpectedEof {
                buffered: RELEASE_HEADER_LEN + got,
            });
        }
        got += n;
    }
    Ok(Some(header.need))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_round_trips_and_its_bytes_are_pinned() {
        let h = ReleaseHeader {
            len: 0x0102,
            need: 0x0a0b_0c0d,
        };
        let bytes = h.encode();
        assert_eq!(bytes, [0, 0, 1, 2, 0, 0, 0, 0, 0x0a, 0x0b, 0x0c, 0x0d]);
        assert_eq!(ReleaseHeader::decode(&bytes).unwrap(), h);
    }

    #[test]
    fn empty_and_oversized_payloads_are_refused() {
        let empty = ReleaseHeader { len: 0, need: 1 }.encode();
        assert!(matches!(
            ReleaseHeader::decode(&empty),
            Err(ProtoError::Malformed { .. })
        ));
        let over = ReleaseHeader {
            len: u32::try_from(MAX_RELEASE_PAYLOAD).unwrap() + 1,
            need: 0,
        }
        .encode();
        assert!(matches!(
            ReleaseHeader::decode(&over),
            Err(ProtoError::TooLarge { .. })
        ));
        let huge = ReleaseHeader {
            len: u32::MAX,
            need: 0,
        }
        .encode();
        assert!(matches!(
            ReleaseHeader::decode(&huge),
            Err(ProtoError::TooLarge { .. })
        ));
    }

    #[test]
    fn the_preamble_cannot_start_an_http_request() {
        assert_eq!(RELEASE_PREAMBLE[0], 0);
    }

    #[tokio::test]
    async fn writes_are_framed_under_the_gate_in_force_when_written() {
        use tokio::io::AsyncWriteExt;
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let gate = Gate::new();
        let mut held = Held::new(a, gate.clone());
        held.write_all(b"before").await.unwrap();
        gate.require(5);
        gate.require(3); // never lowers it
        held.write_all(b"after").await.unwrap();
        let big = vec![9u8; MAX_RELEASE_PAYLOAD + 10];
        held.write_all(&big).await.unwrap();
        held.shutdown().await.unwrap();
        let mut payload = Vec::new();
        assert_eq!(read_held(&mut b, &mut payload).await.unwrap(), Some(0));
        assert_eq!(payload, b"before");
        assert_eq!(read_held(&mut b, &mut payload).await.unwrap(), Some(5));
        assert_eq!(payload, b"after");
        assert_eq!(read_held(&mut b, &mut payload).await.unwrap(), Some(5));
        assert_eq!(payload.len(), MAX_RELEASE_PAYLOAD);
        assert_eq!(read_held(&mut b, &mut payload).await.unwrap(), Some(5));
        assert_eq!(payload, vec![9u8; 10]);
        assert_eq!(read_held(&mut b, &mut payload).await.unwrap(), None);
    }

    #[tokio::test]
    async fn frames_are_read_in_order_and_a_cut_one_is_refused() {
        let mut wire = Vec::new();
        for (need, payload) in [(0u64, &b"abc"[..]), (7, &b"de"[..])] {
            wire.extend(
                ReleaseHeader {
                    len: u32::try_from(payload.len()).unwrap(),
                    need,
                }
                .encode(),
            );
            wire.extend(payload);
        }
        let mut reader = &wire[..];
        let mut payload = Vec::new();
        assert_eq!(read_held(&mut reader, &mut payload).await.unwrap(), Some(0));
        assert_eq!(payload, b"abc");
        assert_eq!(read_held(&mut reader, &mut payload).await.unwrap(), Some(7));
        assert_eq!(payload, b"de");
        assert_eq!(read_held(&mut reader, &mut payload).await.unwrap(), None);

        for cut in [1, RELEASE_HEADER_LEN, RELEASE_HEADER_LEN + 2] {
            let mut reader = &wire[..cut];
            assert!(
                matches!(
                    read_held(&mut reader, &mut payload).await,
                    Err(ProtoError::UnexpectedEof { buffered }) if buffered == cut
                ),
                "cut at {cut}"
            );
        }
    }
}
