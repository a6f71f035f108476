//! The crate's one error type.
//!
//! Role: say what was wrong with a frame, an address or a connection, with the data a caller
//! needs to act: the announced length and the limit, the version found, the request id when it
//! could still be read (so that a server can answer the right request), and whether the byte
//! stream is still at a frame boundary ([`ProtoError::is_fatal`]).
//!
//! Trust: messages are built from lengths, offsets, versions and short, bounded excerpts of the
//! decoder's complaint; they carry no frame contents beyond that, so they are safe to log and to
//! send back ([`ProtoError::reply`]).
//!
//! Not here: errors of the requests themselves; those travel as [`crate::Response::Error`].

use std::io;

use crate::messages::{ErrorCode, Frame, NO_REQUEST_ID, PROTOCOL_VERSION, Response};

/// Longest decoder complaint, in bytes, kept in [`ProtoError::Malformed`].
pub const MAX_REASON_LEN: usize = 200;

/// Everything that can go wrong reading, writing or addressing frames.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProtoError {
    /// A frame's length (announced by its prefix, or of an encoding) exceeds the limit.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// The announced or encoded length of the frame's body.
        len: u64,
        /// The limit ([`crate::MAX_FRAME_LEN`]).
        max: usize,
    },
    /// A buffer ends before the frame its prefix announces.
    #[error("frame truncated: expected {expected} bytes, found {found}")]
    Truncated {
        /// Bytes the length prefix (or the prefix itself) requires.
        expected: usize,
        /// Bytes present.
        found: usize,
    },
    /// Bytes follow the frame (in a buffer given to [`crate::decode_frame`]) or follow the CBOR
    /// item inside a frame's body.
    #[error("{trailing} trailing bytes after the frame")]
    TrailingBytes {
        /// How many.
        trailing: usize,
    },
    /// The body is not a valid CBOR encoding of a [`Frame`].
    #[error("malformed frame{}: {reason}", id_suffix(*.id))]
    Malformed {
        /// The frame's request id, when it could be read.
        id: Option<u64>,
        /// What the decoder found wrong (bounded to [`MAX_REASON_LEN`] bytes).
        reason: String,
    },
    /// The frame speaks another protocol version.
    #[error("unsupported protocol version {found} in frame {id} (expected {expected})")]
    UnsupportedVersion {
        /// The version in the frame.
        found: u16,
        /// This crate's [`PROTOCOL_VERSION`].
        expected: u16,
        /// The frame's request id.
        id: u64,
    },
    /// The connection closed in the middle of a frame.
    #[error("connection closed mid-frame with {buffered} bytes of it received")]
    UnexpectedEof {
        /// Bytes of the unfinished frame (prefix included) received before the close.
        buffered: usize,
    },
    /// A frame could not be encoded (a counted limit was exceeded, or the serialiser failed).
    #[error("cannot encode frame: {reason}")]
    Encode {
        /// Why.
        reason: String,
    },
    /// An address string is not `vsock:CID:PORT`, `unix:PATH` or `tcp:IP:PORT`.
    #[error("bad address {input:?}: {reason}")]
    BadAddress {
        /// The address as given (addresses are not secrets).
        input: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A dial message speaks another version of the dial protocol ([`crate::dial`]).
    #[error("unsupported dial protocol version {found} (expected {expected})")]
    DialVersion {
        /// The version in the message.
        found: u16,
        /// [`crate::DIAL_VERSION`].
        expected: u16,
    },
    /// A server id does not follow the id rule ([`crate::ServerId`]).
    #[error("bad server id: {problem}")]
    BadServerId {
        /// What is wrong with it.
        problem: &'static str,
    },
    /// The underlying socket failed.
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
}

fn id_suffix(id: Option<u64>) -> String {
    id.map(|id| format!(" {id}")).unwrap_or_default()
}

impl ProtoError {
    /// The wire error code a peer should be told.
    pub fn code(&self) -> ErrorCode {
        match self {
            ProtoError::TooLarge { .. } => ErrorCode::TooLarge,
            ProtoError::UnsupportedVersion { .. } | ProtoError::DialVersion { .. } => {
                ErrorCode::UnsupportedVersion
            }
            ProtoError::Truncated { .. }
            | ProtoError::TrailingBytes { .. }
            | ProtoError::Malformed { .. }
            | ProtoError::UnexpectedEof { .. } => ErrorCode::BadFrame,
            ProtoError::BadAddress { .. } | ProtoError::BadServerId { .. } => ErrorCode::BadRequest,
            ProtoError::Encode { .. } | ProtoError::Io(_) => ErrorCode::Internal,
        }
    }

    /// The request id of the offending frame, when it could be read.
    pub fn request_id(&self) -> Option<u64> {
        match self {
            ProtoError::Malformed { id, .. } => *id,
            ProtoError::UnsupportedVersion { id, .. } => Some(*id),
            _ => None,
        }
    }

    /// Whether the byte stream has lost its place (an oversized announced length, a close
    /// mid-frame, a socket error): the connection must be closed after replying. A malformed
    /// body or a foreign version is not fatal: the length prefix still delimited the frame.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            ProtoError::TooLarge { .. } | ProtoError::UnexpectedEof { .. } | ProtoError::Io(_)
        )
    }

    /// The error reply a server sends for this error: [`Response::Error`] under the offending
    /// frame's id, or [`NO_REQUEST_ID`] when the id could not be read.
    pub fn reply(&self) -> Frame {
        let id = self.request_id().unwrap_or(NO_REQUEST_ID);
        Frame::response(id, Response::error(self.code(), &self.to_string()))
    }

    /// A decoder complaint, bounded to [`MAX_REASON_LEN`] bytes.
    pub(crate) fn malformed(id: Option<u64>, reason: &str) -> Self {
        let mut end = reason.len().min(MAX_REASON_LEN);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        ProtoError::Malformed {
            id,
            reason: reason.get(..end).unwrap_or_default().to_owned(),
        }
    }

    pub(crate) fn unsupported_version(found: u16, id: u64) -> Self {
        ProtoError::UnsupportedVersion {
            found,
            expected: PROTOCOL_VERSION,
            id,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Body;

    #[test]
    fn reply_answers_the_offending_request_id() {
        let e = ProtoError::unsupported_version(9, 42);
        let reply = e.reply();
        assert_eq!(reply.id, 42);
        assert_eq!(reply.version, PROTOCOL_VERSION);
        let Body::Response(Response::Error { code, message }) = reply.body else {
            panic!("not an error reply: {reply:?}");
        };
        assert_eq!(code, ErrorCode::UnsupportedVersion);
        assert_eq!(
            message,
            "unsupported protocol version 9 in frame 42 (expected 2)"
        );
    }

    #[test]
    fn reply_without_a_readable_id_uses_the_reserved_id() {
        let e = ProtoError::malformed(None, "invalid cbor at offset 3");
        assert_eq!(e.reply().id, NO_REQUEST_ID);
        assert_eq!(e.to_string(), "malformed frame: invalid cbor at offset 3");
        let e = ProtoError::malformed(Some(5), "x");
        assert_eq!(e.to_string(), "malformed frame 5: x");
        assert_eq!(e.reply().id, 5);
    }

    #[test]
    fn malformed_reason_is_bounded_at_a_char_boundary() {
        let long = "€".repeat(MAX_REASON_LEN);
        let ProtoError::Malformed { reason, .. } = ProtoError::malformed(None, &long) else {
            panic!("not malformed");
        };
        assert!(reason.len() <= MAX_REASON_LEN);
        assert!(reason.len() > MAX_REASON_LEN - 3);
        assert!(long.starts_with(&reason));
    }

    #[test]
    fn only_stream_breaking_errors_are_fatal() {
        assert!(
            ProtoError::TooLarge {
                len: u64::from(u32::MAX),
                max: 1
            }
            .is_fatal()
        );
        assert!(ProtoError::UnexpectedEof { buffered: 3 }.is_fatal());
        assert!(!ProtoError::malformed(Some(1), "x").is_fatal());
        assert!(!ProtoError::unsupported_version(2, 1).is_fatal());
    }
}
