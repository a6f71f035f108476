//! Framing: a 4-byte big-endian length prefix followed by that many bytes of CBOR.
//!
//! Role: turn a [`Frame`] into bytes and bytes back into frames, without I/O. [`encode_frame`]
//! and [`decode_frame`] work on whole buffers; [`FrameDecoder`] is the incremental form a
//! connection uses: push bytes as they arrive, pop frames as they complete.
//!
//! Trust: none. Every byte is hostile, whichever side sent it. The prefix is checked against
//! [`MAX_FRAME_LEN`] as soon as its four bytes are in, before anything is allocated for the body;
//! the body buffer then grows with the bytes that actually arrive, never beyond the announced
//! length, so a peer that announces 8 MiB and sends 10 bytes costs about 8 KiB. CBOR decoding is
//! linear in the body, nests at most as deep as ciborium's recursion limit, and the counted
//! limits of [`crate::messages`] bound what a sequence can make it allocate. Nothing here panics
//! on input.
//!
//! What an error means for the stream: a malformed body, trailing bytes inside the body or a
//! foreign version spoil one frame only (the prefix still delimited it), and the decoder is ready
//! for the next one; the error carries the frame's id when it could be read so a server can
//! answer that request. An oversized prefix cannot be skipped safely: the decoder stays failed
//! and the connection must be closed ([`ProtoError::is_fatal`]).
//!
//! Not here: sockets and async (see [`crate::transport`]), what the messages mean.

use std::io;

use serde::Deserialize;

use crate::error::ProtoError;
use crate::messages::{Frame, PROTOCOL_VERSION};

/// Largest frame body, in bytes (the length prefix not included).
pub const MAX_FRAME_LEN: usize = 8 * 1024 * 1024;

/// Length of the prefix that precedes every body: a big-endian `u32`.
pub const LEN_PREFIX: usize = 4;

/// The smallest step by which a body buffer grows when the amount to come is unknown.
const MIN_GROWTH: usize = 8 * 1024;

/// Encodes `frame` as prefix and body. Refuses frames whose body would exceed
/// [`MAX_FRAME_LEN`] (it stops encoding at the limit, so it never buffers more) and frames that
/// exceed a counted limit of [`crate::messages`].
pub fn encode_frame(frame: &Frame) -> Result<Vec<u8>, ProtoError> {
    let mut out = CappedWriter {
        buf: Vec::with_capacity(256),
        limit: LEN_PREFIX + MAX_FRAME_LEN,
        overflowed_at: None,
    };
    out.buf.extend_from_slice(&[0; LEN_PREFIX]);
    if let Err(e) = ciborium::into_writer(frame, &mut out) {
        if let Some(len) = out.overflowed_at {
            return Err(ProtoError::TooLarge {
                len,
                max: MAX_FRAME_LEN,
            });
        }
        let reason = match e {
            ciborium::ser::Error::Value(msg) => msg,
            ciborium::ser::Error::Io(io) => io.to_string(),
        };
        return Err(ProtoError::Encode { reason });
    }
    let mut buf = out.buf;
    let body_len = buf.len().saturating_sub(LEN_PREFIX);
    let prefix = u32::try_from(body_len).map_err(|_| ProtoError::TooLarge {
        len: body_len as u64,
        max: MAX_FRAME_LEN,
    })?;
    if let Some(head) = buf.get_mut(..LEN_PREFIX) {
        head.copy_from_slice(&prefix.to_be_bytes());
    }
    Ok(buf)
}

/// Decodes exactly one frame (prefix and body) from `bytes`: nothing may be missing, nothing
/// may follow, and the frame must speak [`PROTOCOL_VERSION`].
pub fn decode_frame(bytes: &[u8]) -> Result<Frame, ProtoError> {
    let Some((prefix, body)) = bytes.split_first_chunk::<LEN_PREFIX>() else {
        return Err(ProtoError::Truncated {
            expected: LEN_PREFIX,
            found: bytes.len(),
        });
    };
    let len = announced_len(*prefix)?;
    if body.len() < len {
        return Err(ProtoError::Truncated {
            expected: LEN_PREFIX + len,
            found: bytes.len(),
        });
    }
    if body.len() > len {
        return Err(ProtoError::TrailingBytes {
            trailing: body.len() - len,
        });
    }
    decode_body(body)
}

/// The body length a prefix announces, refused above [`MAX_FRAME_LEN`].
fn announced_len(prefix: [u8; LEN_PREFIX]) -> Result<usize, ProtoError> {
    let len = u32::from_be_bytes(prefix);
    match usize::try_from(len) {
        Ok(len) if len <= MAX_FRAME_LEN => Ok(len),
        _ => Err(ProtoError::TooLarge {
            len: u64::from(len),
            max: MAX_FRAME_LEN,
        }),
    }
}

/// The fields of a frame that every version is expected to keep, read when the full decode
/// fails so that the error can name the version and the request.
#[derive(Deserialize)]
struct Header {
    version: u16,
    id: u64,
}

/// Decodes one body (one CBOR item, nothing after it).
fn decode_body(body: &[u8]) -> Result<Frame, ProtoError> {
    let mut rest = body;
    match ciborium::from_reader::<Frame, _>(&mut rest) {
        Ok(frame) => {
            if frame.version != PROTOCOL_VERSION {
                return Err(ProtoError::unsupported_version(frame.version, frame.id));
            }
            if !rest.is_empty() {
                return Err(ProtoError::TrailingBytes {
                    trailing: rest.len(),
                });
            }
            Ok(frame)
        }
        Err(e) => {
            let reason = describe(e);
            match ciborium::from_reader::<Header, _>(body) {
                Ok(h) if h.version != PROTOCOL_VERSION => {
                    Err(ProtoError::unsupported_version(h.version, h.id))
                }
                Ok(h) => Err(ProtoError::malformed(Some(h.id), &reason)),
                Err(_) => Err(ProtoError::malformed(None, &reason)),
            }
        }
    }
}

/// A decoder complaint without `Debug` formatting.
fn describe(e: ciborium::de::Error<io::Error>) -> String {
    match e {
        ciborium::de::Error::Io(_) => "cbor body ends early".to_owned(),
        ciborium::de::Error::Syntax(offset) => format!("invalid cbor at offset {offset}"),
        ciborium::de::Error::Semantic(Some(offset), msg) => format!("{msg} (at offset {offset})"),
        ciborium::de::Error::Semantic(None, msg) => msg,
        ciborium::de::Error::RecursionLimitExceeded => "cbor nested too deeply".to_owned(),
    }
}

/// A `Vec` writer that fails once `limit` bytes would be exceeded.
struct CappedWriter {
    buf: Vec<u8>,
    limit: usize,
    /// The body length reached when the limit was hit.
    overflowed_at: Option<u64>,
}

impl io::Write for CappedWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let total = self.buf.len().saturating_add(data.len());
        if total > self.limit {
            self.overflowed_at = Some(total.saturating_sub(LEN_PREFIX) as u64);
            return Err(io::Error::other("frame exceeds the size limit"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Incremental decoder: push bytes as they arrive, pop frames as they complete.
///
/// It holds at most one frame: [`push`](Self::push) takes bytes up to the end of the current
/// frame and leaves the rest to the caller until [`next_frame`](Self::next_frame) has popped it.
/// Its memory is bounded by the announced length of the current frame, itself at most
/// [`MAX_FRAME_LEN`], and grows only with bytes received.
///
/// ```
/// use attestplane_proto::{encode_frame, Frame, FrameDecoder, Request};
///
/// let bytes = [
///     encode_frame(&Frame::request(1, Request::Status))?,
///     encode_frame(&Frame::request(2, Request::Checkpoint))?,
/// ]
/// .concat();
/// let mut decoder = FrameDecoder::new();
/// let mut frames = Vec::new();
/// let mut input = bytes.as_slice();
/// while !input.is_empty() {
///     let taken = decoder.push(input)?;
///     input = input.get(taken..).unwrap_or_default();
///     while let Some(frame) = decoder.next_frame()? {
///         frames.push(frame);
///     }
/// }
/// assert_eq!(frames.len(), 2);
/// assert!(decoder.is_idle());
/// # Ok::<(), attestplane_proto::ProtoError>(())
/// ```
#[derive(Debug, Default)]
pub struct FrameDecoder {
    state: State,
}

#[derive(Debug)]
enum State {
    /// Reading the length prefix.
    Prefix {
        buf: [u8; LEN_PREFIX],
        filled: usize,
    },
    /// Reading a body of `len` bytes. `buf[..filled]` holds received bytes; `buf` is zero-filled
    /// beyond that up to its length, which never exceeds `len`.
    Body {
        len: usize,
        buf: Vec<u8>,
        filled: usize,
    },
    /// A prefix announced more than the limit; the stream cannot be resynchronised.
    Failed { len: u64 },
}

impl Default for State {
    fn default() -> Self {
        State::Prefix {
            buf: [0; LEN_PREFIX],
            filled: 0,
        }
    }
}

impl FrameDecoder {
    /// A decoder at a frame boundary.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes bytes from `bytes` up to the end of the current frame and returns how many it
    /// took; the caller keeps the rest for after [`next_frame`](Self::next_frame). Takes nothing
    /// while a complete frame waits to be popped.
    ///
    /// Errors: [`ProtoError::TooLarge`] as soon as a prefix announces more than
    /// [`MAX_FRAME_LEN`], before any allocation for the body; the decoder then stays failed.
    pub fn push(&mut self, bytes: &[u8]) -> Result<usize, ProtoError> {
        let mut taken = 0;
        loop {
            let rest = bytes.get(taken..).unwrap_or_default();
            if rest.is_empty() {
                return Ok(taken);
            }
            let spare = self.spare(rest.len())?;
            let n = spare.len().min(rest.len());
            if n == 0 {
                return Ok(taken);
            }
            if let (Some(dst), Some(src)) = (spare.get_mut(..n), rest.get(..n)) {
                dst.copy_from_slice(src);
            }
            self.advance(n)?;
            taken += n;
        }
    }

    /// Pops the current frame if it is complete.
    ///
    /// Errors: [`ProtoError::Malformed`], [`ProtoError::TrailingBytes`] and
    /// [`ProtoError::UnsupportedVersion`] spoil that frame only; the decoder is ready for the
    /// next. [`ProtoError::TooLarge`] repeats once the decoder has failed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, ProtoError> {
        match &mut self.state {
            State::Body { len, buf, filled } if *filled == *len => {
                let body = std::mem::take(buf);
                self.state = State::default();
                decode_body(&body).map(Some)
            }
            State::Failed { len } => Err(ProtoError::TooLarge {
                len: *len,
                max: MAX_FRAME_LEN,
            }),
            _ => Ok(None),
        }
    }

    /// Bytes still needed to complete the current prefix or body; 0 when a frame waits to be
    /// popped or the decoder has failed.
    pub fn needed(&self) -> usize {
        match &self.state {
            State::Prefix { filled, .. } => LEN_PREFIX - filled,
            State::Body { len, filled, .. } => len - filled,
            State::Failed { .. } => 0,
        }
    }

    /// Bytes of the current frame received so far, prefix included.
    pub fn buffered(&self) -> usize {
        match &self.state {
            State::Prefix { filled, .. } => *filled,
            State::Body { filled, .. } => LEN_PREFIX + filled,
            State::Failed { .. } => 0,
        }
    }

    /// Whether the decoder is at a frame boundary with nothing buffered (where a peer may close
    /// the connection cleanly).
    pub fn is_idle(&self) -> bool {
        matches!(self.state, State::Prefix { filled: 0, .. })
    }

    /// Checks the state at the end of the stream: `Ok` at a frame boundary,
    /// [`ProtoError::UnexpectedEof`] in the middle of a frame (or with a frame not popped),
    /// [`ProtoError::TooLarge`] after a failure.
    pub fn finish(&self) -> Result<(), ProtoError> {
        match &self.state {
            State::Prefix { filled: 0, .. } => Ok(()),
            State::Failed { len } => Err(ProtoError::TooLarge {
                len: *len,
                max: MAX_FRAME_LEN,
            }),
            _ => Err(ProtoError::UnexpectedEof {
                buffered: self.buffered(),
            }),
        }
    }

    /// Writable room for the next bytes of the current prefix or body, at most `want` bytes of
    /// new allocation beyond doubling, never beyond the announced length. Empty when a frame
    /// waits to be popped.
    pub(crate) fn spare(&mut self, want: usize) -> Result<&mut [u8], ProtoError> {
        match &mut self.state {
            State::Prefix { buf, filled } => Ok(buf.get_mut(*filled..).unwrap_or_default()),
            State::Body { len, buf, filled } => {
                if *filled == buf.len() && buf.len() < *len {
                    let target = filled
                        .saturating_add(want)
                        .max(buf.len().saturating_mul(2))
                        .max(MIN_GROWTH)
                        .min(*len);
                    buf.reserve_exact(target - buf.len());
                    buf.resize(target, 0);
                }
                Ok(buf.get_mut(*filled..).unwrap_or_default())
            }
            State::Failed { len } => Err(ProtoError::TooLarge {
                len: *len,
                max: MAX_FRAME_LEN,
            }),
        }
    }

    /// Commits `n` bytes written into [`spare`](Self::spare). Checks a completed prefix.
    pub(crate) fn advance(&mut self, n: usize) -> Result<(), ProtoError> {
        match &mut self.state {
            State::Prefix { buf, filled } => {
                *filled = (*filled + n).min(LEN_PREFIX);
                if *filled == LEN_PREFIX {
                    match announced_len(*buf) {
                        Ok(len) => {
                            self.state = State::Body {
                                len,
                                buf: Vec::new(),
                                filled: 0,
                            };
                        }
                        Err(e) => {
                            self.state = State::Failed {
                                len: u64::from(u32::from_be_bytes(*buf)),
                            };
                            return Err(e);
                        }
                    }
                }
                Ok(())
            }
            State::Body { buf, filled, .. } => {
                *filled = (*filled + n).min(buf.len());
                Ok(())
            }
            State::Failed { len } => Err(ProtoError::TooLarge {
                len: *len,
                max: MAX_FRAME_LEN,
            }),
        }
    }

    /// Capacity of the body buffer (for tests of the allocation bound).
    #[cfg(test)]
    fn body_capacity(&self) -> usize {
        match &self.state {
            State::Body { buf, .. } => buf.capacity(),
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{Body, Request, Response};

    fn status(id: u64) -> Frame {
        Frame::request(id, Request::Status)
    }

    #[test]
    fn oversized_prefix_is_refused_before_any_allocation() {
        let mut d = FrameDecoder::new();
        let prefix = u32::try_from(MAX_FRAME_LEN + 1).unwrap().to_be_bytes();
        let err = d.push(&prefix).unwrap_err();
        assert!(
            matches!(err, ProtoError::TooLarge { len, max } if len == MAX_FRAME_LEN as u64 + 1 && max == MAX_FRAME_LEN),
            "{err}"
        );
        assert_eq!(d.body_capacity(), 0);
        assert!(matches!(d.push(b"x"), Err(ProtoError::TooLarge { .. })));
        assert!(matches!(d.next_frame(), Err(ProtoError::TooLarge { .. })));
        assert!(matches!(d.finish(), Err(ProtoError::TooLarge { .. })));
    }

    #[test]
    fn body_buffer_grows_with_received_bytes_not_the_announced_length() {
        let mut d = FrameDecoder::new();
        let prefix = u32::try_from(MAX_FRAME_LEN).unwrap().to_be_bytes();
        assert_eq!(d.push(&prefix).unwrap(), LEN_PREFIX);
        assert_eq!(d.push(&[0u8; 10]).unwrap(), 10);
        assert!(d.body_capacity() <= MIN_GROWTH, "{}", d.body_capacity());
        for _ in 0..100 {
            d.push(&[0u8; 1000]).unwrap();
        }
        assert!(d.body_capacity() <= 2 * 101_000, "{}", d.body_capacity());
        assert_eq!(d.buffered(), LEN_PREFIX + 100_010);
        assert_eq!(d.needed(), MAX_FRAME_LEN - 100_010);
    }

    #[test]
    fn body_buffer_never_exceeds_the_announced_length() {
        let frame = encode_frame(&status(3)).unwrap();
        let mut d = FrameDecoder::new();
        for b in &frame {
            assert_eq!(d.push(std::slice::from_ref(b)).unwrap(), 1);
            assert!(d.body_capacity() <= frame.len() - LEN_PREFIX);
        }
        assert_eq!(d.next_frame().unwrap(), Some(status(3)));
    }

    #[test]
    fn push_stops_at_the_end_of_a_frame() {
        let one = encode_frame(&status(1)).unwrap();
        let two = encode_frame(&status(2)).unwrap();
        let both = [one.clone(), two].concat();
        let mut d = FrameDecoder::new();
        assert_eq!(d.push(&both).unwrap(), one.len());
        assert_eq!(d.push(&both[one.len()..]).unwrap(), 0);
        assert_eq!(d.needed(), 0);
        assert_eq!(d.next_frame().unwrap(), Some(status(1)));
        assert_eq!(d.next_frame().unwrap(), None);
        assert_eq!(d.push(&both[one.len()..]).unwrap(), both.len() - one.len());
        assert_eq!(d.next_frame().unwrap(), Some(status(2)));
        assert!(d.is_idle());
        d.finish().unwrap();
    }

    #[test]
    fn finish_mid_frame_reports_unexpected_eof() {
        let frame = encode_frame(&status(1)).unwrap();
        let mut d = FrameDecoder::new();
        d.push(&frame[..6]).unwrap();
        assert!(matches!(
            d.finish(),
            Err(ProtoError::UnexpectedEof { buffered: 6 })
        ));
    }

    #[test]
    fn malformed_body_spoils_one_frame_only() {
        let mut bad = 3u32.to_be_bytes().to_vec();
        bad.extend_from_slice(&[0xff, 0xff, 0xff]);
        let good = encode_frame(&status(9)).unwrap();
        let mut d = FrameDecoder::new();
        assert_eq!(d.push(&bad).unwrap(), bad.len());
        let err = d.next_frame().unwrap_err();
        assert!(
            matches!(err, ProtoError::Malformed { id: None, .. }),
            "{err}"
        );
        assert!(!err.is_fatal());
        d.push(&good).unwrap();
        assert_eq!(d.next_frame().unwrap(), Some(status(9)));
    }

    #[test]
    fn empty_body_is_malformed() {
        assert!(matches!(
            decode_frame(&[0, 0, 0, 0]),
            Err(ProtoError::Malformed { id: None, .. })
        ));
    }

    #[test]
    fn decode_frame_rejects_truncation_and_trailing_bytes() {
        let frame = encode_frame(&status(1)).unwrap();
        assert!(matches!(
            decode_frame(&frame[..2]),
            Err(ProtoError::Truncated {
                expected: LEN_PREFIX,
                found: 2
            })
        ));
        let cut = frame.len() - 1;
        assert!(matches!(
            decode_frame(&frame[..cut]),
            Err(ProtoError::Truncated { expected, found }) if expected == frame.len() && found == cut
        ));
        let mut long = frame.clone();
        long.push(0);
        assert!(matches!(
            decode_frame(&long),
            Err(ProtoError::TrailingBytes { trailing: 1 })
        ));
    }

    #[test]
    fn trailing_cbor_inside_the_body_is_refused_with_its_count() {
        let frame = encode_frame(&status(1)).unwrap();
        let mut body = frame[LEN_PREFIX..].to_vec();
        body.extend_from_slice(&[0xf6, 0xf6]); // two CBOR nulls
        let mut bytes = u32::try_from(body.len()).unwrap().to_be_bytes().to_vec();
        bytes.extend_from_slice(&body);
        assert!(matches!(
            decode_frame(&bytes),
            Err(ProtoError::TrailingBytes { trailing: 2 })
        ));
    }

    #[test]
    fn encode_refuses_a_body_over_the_limit_without_buffering_it() {
        let entry = serde_bytes::ByteBuf::from(vec![7u8; MAX_FRAME_LEN / 2]);
        let frame = Frame::response(
            1,
            Response::Persist {
                first_seq: 0,
                entries: vec![entry.clone(), entry],
            },
        );
        let err = encode_frame(&frame).unwrap_err();
        assert!(
            matches!(err, ProtoError::TooLarge { len, max: MAX_FRAME_LEN } if len > MAX_FRAME_LEN as u64),
            "{err}"
        );
    }

    #[test]
    fn a_body_of_exactly_the_limit_round_trips() {
        // Find the entry size that makes the body exactly MAX_FRAME_LEN bytes long.
        let probe = |n: usize| {
            encode_frame(&Frame::response(
                1,
                Response::Persist {
                    first_seq: 0,
                    entries: vec![serde_bytes::ByteBuf::from(vec![1u8; n])],
                },
            ))
        };
        let base = probe(MAX_FRAME_LEN - 100).unwrap().len() - LEN_PREFIX;
        let n = MAX_FRAME_LEN - 100 + (MAX_FRAME_LEN - base);
        let bytes = probe(n).unwrap();
        assert_eq!(bytes.len(), LEN_PREFIX + MAX_FRAME_LEN);
        let frame = decode_frame(&bytes).unwrap();
        assert!(matches!(
            frame.body,
            Body::Response(Response::Persist { ref entries, .. }) if entries.first().map(|e| e.len()) == Some(n)
        ));
        assert!(matches!(probe(n + 1), Err(ProtoError::TooLarge { .. })));
    }
}
