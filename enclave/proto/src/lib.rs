//! The wire protocol between the Attestplane host proxy and its enclave.
//!
//! Role. The enclave holds the epoch key, the state and the policy; the host proxy holds the
//! disk, the network and the clients. Everything between them crosses one channel: vsock in
//! production, a Unix socket or loopback TCP locally. This crate is that channel's one
//! definition: the versioned [`messages`] ([`Frame`], [`Request`], [`Response`], [`ErrorCode`]),
//! their [`frame`] encoding (a big-endian `u32` length prefix and a CBOR body of at most
//! [`MAX_FRAME_LEN`] bytes), and the [`transport`] ([`Address`], [`Listener`], [`Stream`],
//! [`read_frame`], [`write_frame`]). Both sides depend on it; the host depends on it and never on
//! the enclave crate, so that the untrusted side links none of the trusted side's code.
//!
//! Conversation. The host opens a few persistent connections and multiplexes requests over them
//! by request id; the enclave answers each request under its id, out of order. Requests that
//! write the log are answered in two phases, sent together: [`Response::Persist`] with the signed
//! entries, then [`Response::Held`], the final reply, which the host releases only once those
//! entries are durable in its store (and reports with [`Request::Durable`]). Each request's
//! documentation lists its replies and its error replies.
//!
//! Trust: none, in both directions. The enclave must survive a hostile host and the host must
//! survive a misbehaving enclave, so every frame is hostile input: lengths are checked against
//! named limits before anything is allocated, decoding never panics, and every failure is a
//! typed [`ProtoError`] ([`error`]) that says what was wrong and, where it could be read, which
//! request it concerns. Nothing on this channel is authenticated or encrypted, and nothing needs to be: what
//! the enclave must believe is signed (admin requests, attestation documents, log entries), and
//! what it decides is logged and signed by it. Error messages on the wire and the `Debug` output
//! of messages carry no secrets (bearer tokens and handles are redacted).
//!
//! A second, smaller conversation serves the MCP data path: the enclave asks the host for a
//! connection to a registered MCP server with one [`DialRequest`] and reads one [`DialReply`],
//! after which the connection carries the upstream's bytes ([`dial`]). Agent connections carry
//! the agent's bytes to the enclave's MCP port unchanged, after a preamble from the host's relay
//! ([`RELEASE_PREAMBLE`]). On both kinds, what the enclave sends toward an agent or a server
//! travels in [`release`] frames that the host holds until the log entries they depend on are
//! durable: the data path's counterpart of [`Response::Held`].
//!
//! Not here: what the requests mean and how they are decided (the enclave crate), durable storage
//! and HTTP (the host proxy), the byte formats of log entries, checkpoints and attestation
//! documents (the verifier crate; here they are opaque byte strings), and connection management:
//! limits, shutdown, retries and the request-id bookkeeping belong to the server and the client.
//! The one exception is [`signal`]: the SIGINT/SIGTERM future every long-running program of the
//! workspace stops on, here because this is the crate all of them already depend on.
#![forbid(unsafe_code)]

pub mod dial;
pub mod error;
pub mod frame;
pub mod messages;
pub mod release;
pub mod signal;
pub mod transport;

pub use dial::{
    DIAL_LEN_PREFIX, DIAL_VERSION, DialReply, DialRequest, DialStatus, MAX_DIAL_FRAME_LEN,
    MAX_DIAL_MESSAGE_LEN, MAX_SERVER_ID_LEN, ServerId, read_dial_reply, read_dial_request,
    write_dial,
};
pub use error::{MAX_REASON_LEN, ProtoError};
pub use frame::{FrameDecoder, LEN_PREFIX, MAX_FRAME_LEN, decode_frame, encode_frame};
pub use messages::{
    Body, ED25519_PUBLIC_KEY_LEN, ErrorCode, Frame, MAX_ADMIN_KEYS, MAX_ENTRIES_PER_FRAME,
    MAX_ERROR_MESSAGE_LEN, MAX_SERVERS_PER_REPLY, NO_REQUEST_ID, PROTOCOL_VERSION, Request,
    Response, ServerInfo,
};
pub use release::{
    Gate, Held, MAX_RELEASE_PAYLOAD, RELEASE_HEADER_LEN, RELEASE_PREAMBLE, ReleaseHeader, read_held,
};
pub use serde_bytes::ByteBuf;
pub use signal::shutdown_signal;
pub use transport::{Address, Listener, Stream, VSOCK_ANY, connect, read_frame, write_frame};
