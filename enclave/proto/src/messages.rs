//! The messages the host proxy and the enclave exchange, and the frame that carries them.
//!
//! Role: one definition of every request, every reply and every error code on the host–enclave
//! channel. A [`Frame`] carries the protocol version, a request id chosen by the host, and a
//! [`Body`]: a [`Request`] (host → enclave) or a [`Response`] (enclave → host). The enclave answers
//! every request under the request's own id; requests are multiplexed over a few persistent
//! connections and answered out of order.
//!
//! Encoding: serde into CBOR (ciborium). Structs are CBOR maps keyed by field name, enums are
//! externally tagged with `snake_case` names (`{"request": {"resolve": {...}}}`, unit variants as
//! a bare text string), byte strings travel as CBOR byte strings (`serde_bytes`), never as arrays
//! of integers. Unknown fields are refused. This encoding is a transport format only: nothing
//! here is signed or hashed, so it may use serde's derives; the signed log entries inside
//! [`Request::ReplayEntries`] and [`Response::Persist`] are opaque bytes whose format belongs to
//! the verifier crate.
//!
//! Two-phase replies. Everything that writes the log (`Admin`, `AttestEvidence`, `Resolve`,
//! `Discover`, `Authorize`, `ReplayEnd`) is answered with two frames under the request's id,
//! sent together: first [`Response::Persist`] with the signed entries to store, then
//! [`Response::Held`], which wraps the final reply (`AdminResult`, `AttestResult`, `Handle`,
//! `Denied`, `Servers`, `Authorized`, `Ack`) and names the last entry it depends on. The host
//! stores the entries, and releases the wrapped reply to whoever asked only once every entry
//! through that sequence number is durable in its store, never if storing them fails; it
//! reports durability to the enclave with [`Request::Durable`] as before (the enclave's
//! checkpoints and its MCP gateway wait on that report). So the rule is the host's to keep: it
//! releases no response that depends on an entry before the entry is durable. It could always
//! break it by lying with `Durable`; what changed in version 2 is that an honest host no longer
//! sends the reply through the enclave a second time to keep it.
//!
//! Trust: none. Either side may be hostile (the host is untrusted by design; the enclave's
//! replies reach a host that must not crash on them). Decoding enforces the counted limits below
//! (`MAX_*`) so that a frame of at most [`crate::MAX_FRAME_LEN`] bytes cannot make the decoder
//! allocate much more than its own size; the serialiser refuses to produce what the decoder would
//! refuse.
//!
//! Errors on the wire: [`Response::Error`] carries a stable [`ErrorCode`] and a short message.
//! Messages are for operators reading logs: they must never carry secrets (keys, bearer tokens,
//! handles) or `Debug` dumps of internal state. Build them with [`Response::error`], which takes a
//! `&str` and bounds its length. The `Debug` output of [`Request`] and [`Response`] redacts bearer
//! tokens and handles and prints byte strings as their length only.
//!
//! Not here: what the messages mean (the enclave implements them), authentication of the host
//! (there is none: anything the enclave must be sure of is signed, and everything it decides is
//! logged), and I/O (see [`crate::frame`] and [`crate::transport`]).

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

/// The protocol version this crate speaks. A frame carrying another version is refused with
/// [`ErrorCode::UnsupportedVersion`]; there is no negotiation. Version 2 added
/// [`Response::Held`] (version 1's enclave held final replies until `Durable`) and removed
/// `held_replies` from [`Response::Status`].
pub const PROTOCOL_VERSION: u16 = 2;

/// Frame id reserved for replies to frames whose id could not be read (the host never sends it).
pub const NO_REQUEST_ID: u64 = 0;

/// Most log entries one frame may carry ([`Request::ReplayEntries`], [`Response::Persist`]).
pub const MAX_ENTRIES_PER_FRAME: usize = 4096;

/// Most genesis admin keys a [`Request::ReplayBegin`] may carry.
pub const MAX_ADMIN_KEYS: usize = 64;

/// Length in bytes of an ed25519 public key (the genesis admin keys).
pub const ED25519_PUBLIC_KEY_LEN: usize = 32;

/// Most servers one [`Response::Servers`] may list.
pub const MAX_SERVERS_PER_REPLY: usize = 10_000;

/// Longest error message, in bytes, that [`Response::error`] and [`Response::denied`] keep;
/// longer messages are cut at a character boundary.
pub const MAX_ERROR_MESSAGE_LEN: usize = 1024;

/// One unit on the wire: version, request id, and a request or a response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Frame {
    /// The sender's protocol version; always [`PROTOCOL_VERSION`] for frames this crate decodes.
    pub version: u16,
    /// The request id, chosen by the host; a reply carries the id of the request it answers.
    /// [`NO_REQUEST_ID`] is reserved for error replies to frames whose id could not be read.
    pub id: u64,
    /// The request or response.
    pub body: Body,
}

impl Frame {
    /// A request frame at [`PROTOCOL_VERSION`].
    pub fn request(id: u64, request: Request) -> Self {
        Frame {
            version: PROTOCOL_VERSION,
            id,
            body: Body::Request(request),
        }
    }

    /// A response frame at [`PROTOCOL_VERSION`].
    pub fn response(id: u64, response: Response) -> Self {
        Frame {
            version: PROTOCOL_VERSION,
            id,
            body: Body::Response(response),
        }
    }
}

/// What a frame carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Body {
    /// Host → enclave.
    Request(Request),
    /// Enclave → host.
    Response(Response),
}

/// A request from the host to the enclave.
///
/// Every request may also be answered with `Error { code: BadFrame | TooLarge |
/// UnsupportedVersion }` when its frame cannot be read, `Error { code: Overloaded }` when the
/// enclave sheds load (retry later), and `Error { code: Internal }` when the enclave fails
/// (for example the NSM does not answer). Requests other than `Hello`, `Status`, `Durable` and
/// the replay sequence are answered `Error { code: NotReady }` until the replay has completed.
///
/// In a two-phase request's documentation, "→ `Persist`, then `X`" means `Persist` followed by
/// [`Response::Held`] wrapping `X`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Opens a connection's conversation; → [`Response::Hello`].
    ///
    /// Errors: `UnsupportedVersion` when `version` is not the enclave's [`PROTOCOL_VERSION`].
    Hello {
        /// The host's protocol version.
        version: u16,
    },
    /// Starts streaming the stored log into a freshly booted enclave; → [`Response::Ack`].
    ///
    /// Errors: `Conflict` when a replay is in progress or has completed; `BadRequest` when a key
    /// is not a valid ed25519 public key.
    ReplayBegin {
        /// The admin keys trusted at genesis (32-byte ed25519 public keys, at most
        /// [`MAX_ADMIN_KEYS`]). Used only when the log is empty or to check its first entry.
        #[serde(
            serialize_with = "limits::ser_keys",
            deserialize_with = "limits::de_keys"
        )]
        genesis_admin_keys: Vec<ByteBuf>,
        /// How many entries the host is about to send, in total.
        total_entries: u64,
    },
    /// The next batch of stored log entries, in sequence order; → [`Response::Ack`].
    ///
    /// Errors: `Conflict` without a preceding `ReplayBegin`; `BadRequest` when the batches
    /// exceed the announced `total_entries`; [`Response::BrokenLog`] when an entry fails
    /// verification (the enclave then refuses to serve).
    ReplayEntries {
        /// Encoded log entries (at most [`MAX_ENTRIES_PER_FRAME`]), each exactly as stored.
        #[serde(
            serialize_with = "limits::ser_entries",
            deserialize_with = "limits::de_entries"
        )]
        entries: Vec<ByteBuf>,
    },
    /// Ends the replay. Two-phase: → [`Response::Persist`] with the new epoch's opening entries,
    /// then [`Response::Ack`] (held until they are durable); the enclave is ready from then on.
    ///
    /// Errors: `Conflict` without a preceding `ReplayBegin`; [`Response::BrokenLog`] when fewer
    /// entries arrived than announced or the log as a whole fails verification.
    ReplayEnd,
    /// The host reports every entry up to and including `through_seq` durably stored;
    /// → [`Response::Ack`] under this request's id. The enclave's checkpoints and the entries
    /// its MCP gateway writes wait for it; final replies do not (see [`Response::Held`]).
    ///
    /// Errors: `BadRequest` when `through_seq` is beyond the last entry the enclave handed out.
    Durable {
        /// The highest durable sequence number.
        through_seq: u64,
    },
    /// A signed admin request, forwarded untouched. Two-phase: → [`Response::Persist`], then
    /// [`Response::AdminResult`]. A request whose signature or key does not verify is logged and
    /// answered `AdminResult { accepted: false }`.
    ///
    /// Errors: `NotReady`; `BadRequest` when the bytes are not an admin request at all (nothing
    /// is logged).
    Admin {
        /// The encoded, signed admin request.
        request: ByteBuf,
    },
    /// Asks for a fresh nonce for a server's attestation; → [`Response::Challenge`].
    ///
    /// Errors: `NotReady`; `NotFound` when no such server is registered.
    AttestChallenge {
        /// The registered server's id.
        server_id: String,
    },
    /// A server's attestation document, fetched by the host with the nonce from
    /// `AttestChallenge`. Two-phase: → [`Response::Persist`], then [`Response::AttestResult`]
    /// (verified or not: both outcomes are logged, including an unknown or expired nonce).
    ///
    /// Errors: `NotReady`; `NotFound` when no such server is registered.
    AttestEvidence {
        /// The registered server's id.
        server_id: String,
        /// The nonce the enclave issued.
        nonce: ByteBuf,
        /// The server's attestation document (COSE_Sign1), as fetched.
        document: ByteBuf,
    },
    /// An agent asks for a handle to a server. Two-phase: → [`Response::Persist`], then
    /// [`Response::Handle`] or [`Response::Denied`] (policy refusal: `Denied`; unknown or revoked
    /// server: `NotFound`).
    ///
    /// Errors: `NotReady`; `Unauthenticated` when the bearer credential does not verify (nothing
    /// is logged).
    Resolve {
        /// The agent's bearer credential, forwarded untouched. A secret: never logged.
        bearer: String,
        /// The server the agent wants a handle for.
        server_id: String,
    },
    /// An agent lists the servers it may use. Two-phase: → [`Response::Persist`], then
    /// [`Response::Servers`] or [`Response::Denied`].
    ///
    /// Errors: `NotReady`; `Unauthenticated` when the bearer credential does not verify.
    Discover {
        /// The agent's bearer credential, forwarded untouched. A secret: never logged.
        bearer: String,
    },
    /// A tool call through the gateway. Two-phase: → [`Response::Persist`], then
    /// [`Response::Authorized`] (allowed or not) or [`Response::Denied`] (unknown server or tool).
    ///
    /// Errors: `NotReady`; `Unauthenticated` when the bearer credential does not verify.
    Authorize {
        /// The agent's bearer credential, forwarded untouched. A secret: never logged.
        bearer: String,
        /// The server the tool belongs to.
        server_id: String,
        /// The tool's name.
        tool: String,
    },
    /// Asks for a signed checkpoint of the log; → [`Response::Checkpoint`].
    ///
    /// Errors: `NotReady`.
    Checkpoint,
    /// Asks for the enclave's own attestation document (binding the epoch key) and the epoch key
    /// as JWKS; → [`Response::Attestation`].
    ///
    /// Errors: `NotReady`; `BadRequest` when the nonce is longer than the NSM accepts.
    GetAttestation {
        /// A caller's nonce to include in the document, if any.
        nonce: Option<ByteBuf>,
    },
    /// Asks for the enclave's state; → [`Response::Status`]. Answered before the replay too.
    Status,
}

/// A reply from the enclave to the host, always under the id of the request it answers.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Response {
    /// Reply to [`Request::Hello`].
    Hello {
        /// The enclave's protocol version.
        version: u16,
        /// Whether the replay has completed and the enclave serves requests.
        ready: bool,
        /// The current epoch, once one is open.
        epoch: Option<u64>,
        /// The sequence number of the last entry, once the log is not empty.
        head_seq: Option<u64>,
    },
    /// Plain acknowledgement (`ReplayBegin`, `ReplayEntries`, `Durable`, the end of `ReplayEnd`).
    Ack,
    /// First phase of a two-phase reply: entries to store durably before the final reply is
    /// released. The host stores them and reports them with [`Request::Durable`]. May arrive
    /// on another connection, under an id the host does not know, when the request's own
    /// connection closed before it was written: the host stores it all the same.
    Persist {
        /// The sequence number of the first entry in `entries`; the rest follow densely.
        first_seq: u64,
        /// The encoded, signed log entries (at most [`MAX_ENTRIES_PER_FRAME`]).
        #[serde(
            serialize_with = "limits::ser_entries",
            deserialize_with = "limits::de_entries"
        )]
        entries: Vec<ByteBuf>,
    },
    /// Second phase of a two-phase reply, sent right after its [`Response::Persist`]: the final
    /// reply, which the host must not release to anyone (nor act on) before every entry up to
    /// and including `through_seq` is durable in its store. The entries may have come in
    /// another request's `Persist`, on another connection. If storing them fails, the reply is
    /// never released. `reply` is never itself `Held` or `Persist` (refused when encoding and
    /// decoding).
    Held {
        /// The last entry `reply` depends on.
        through_seq: u64,
        /// The final reply.
        #[serde(
            serialize_with = "limits::ser_held",
            deserialize_with = "limits::de_held"
        )]
        reply: Box<Response>,
    },
    /// Reply to [`Request::AttestChallenge`].
    Challenge {
        /// The nonce the server's attestation document must carry.
        nonce: ByteBuf,
        /// When the nonce stops being accepted, in milliseconds since the Unix epoch.
        expires_at_ms: u64,
    },
    /// Final reply to [`Request::Admin`].
    AdminResult {
        /// Whether the request was applied.
        accepted: bool,
        /// The sequence number of the entry that logged it.
        seq: u64,
        /// Why it was not applied.
        reason: Option<String>,
    },
    /// Final reply to [`Request::AttestEvidence`].
    AttestResult {
        /// Whether the document verified against the registration.
        verified: bool,
        /// The sequence number of the entry that logged the result.
        seq: u64,
        /// The digest of the verified measurement, hex, when verified.
        measurement: Option<String>,
        /// Why it did not verify.
        reason: Option<String>,
    },
    /// Final reply to [`Request::Resolve`] when a handle was issued.
    Handle {
        /// The handle (a JWT signed by the epoch key). A bearer credential: never logged.
        token: String,
        /// The sequence number of the entry that issued it.
        seq: u64,
        /// The handle's `exp` claim, in seconds since the Unix epoch.
        expires_at: u64,
    },
    /// Final reply when a logged request was refused (`Resolve`, `Discover`, `Authorize`).
    Denied {
        /// The sequence number of the entry that logged the refusal.
        seq: u64,
        /// Why, for the agent; never a secret.
        reason: String,
        /// What kind of refusal (`Denied` for policy, `NotFound` for an unknown server, …).
        code: ErrorCode,
    },
    /// Final reply to [`Request::Discover`].
    Servers {
        /// The servers the agent may use (at most [`MAX_SERVERS_PER_REPLY`]).
        #[serde(
            serialize_with = "limits::ser_servers",
            deserialize_with = "limits::de_servers"
        )]
        servers: Vec<ServerInfo>,
        /// The sequence number of the entry that logged the decision.
        seq: u64,
    },
    /// Final reply to [`Request::Authorize`].
    Authorized {
        /// Whether the tool call may proceed.
        allowed: bool,
        /// The sequence number of the entry that logged the decision.
        seq: u64,
        /// Why not.
        reason: Option<String>,
    },
    /// Reply to [`Request::Checkpoint`].
    Checkpoint {
        /// The signed checkpoint, in the C2SP tlog-checkpoint note format.
        note: String,
    },
    /// Reply to [`Request::GetAttestation`].
    Attestation {
        /// The enclave's attestation document (COSE_Sign1) binding the epoch key.
        document: ByteBuf,
        /// The epoch key as a JSON Web Key Set.
        jwks: String,
    },
    /// Reply to [`Request::Status`].
    Status {
        /// Whether the replay has completed and the enclave serves requests.
        ready: bool,
        /// The current epoch, once one is open.
        epoch: Option<u64>,
        /// The sequence number of the last entry, once the log is not empty.
        head_seq: Option<u64>,
        /// The highest sequence number the host has reported durable.
        durable_seq: Option<u64>,
        /// How many servers are registered.
        servers: u64,
    },
    /// The stored log failed verification; the enclave refuses to serve. Carries the evidence.
    BrokenLog {
        /// The first bad sequence number, when one entry is to blame.
        seq: Option<u64>,
        /// What was wrong.
        message: String,
    },
    /// The request failed without a log entry.
    Error {
        /// Stable, machine-readable code.
        code: ErrorCode,
        /// Human-readable detail for operators; never a secret or a `Debug` dump.
        message: String,
    },
}

impl Response {
    /// An error reply. `message` must carry no secret and no `Debug` dump; it is cut to
    /// [`MAX_ERROR_MESSAGE_LEN`] bytes.
    pub fn error(code: ErrorCode, message: &str) -> Self {
        Response::Error {
            code,
            message: bounded_message(message),
        }
    }

    /// A logged refusal. `reason` must carry no secret; it is cut to [`MAX_ERROR_MESSAGE_LEN`]
    /// bytes.
    pub fn denied(seq: u64, code: ErrorCode, reason: &str) -> Self {
        Response::Denied {
            seq,
            reason: bounded_message(reason),
            code,
        }
    }

    /// A broken-log reply. `message` must carry no secret; it is cut to
    /// [`MAX_ERROR_MESSAGE_LEN`] bytes.
    pub fn broken_log(seq: Option<u64>, message: &str) -> Self {
        Response::BrokenLog {
            seq,
            message: bounded_message(message),
        }
    }
}

/// `message` cut to at most [`MAX_ERROR_MESSAGE_LEN`] bytes at a character boundary.
pub(crate) fn bounded_message(message: &str) -> String {
    if message.len() <= MAX_ERROR_MESSAGE_LEN {
        return message.to_owned();
    }
    let mut end = MAX_ERROR_MESSAGE_LEN;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    message.get(..end).unwrap_or_default().to_owned()
}

/// One server in a [`Response::Servers`] listing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerInfo {
    /// The server's registered id.
    pub id: String,
    /// Its display name.
    pub name: String,
    /// The tenant it belongs to.
    pub tenant: String,
    /// Its resource URI (the `aud` of its handles).
    pub resource: String,
    /// Whether it has a current verified attestation.
    pub attested: bool,
}

/// Stable error codes on the wire. New codes may be added with a protocol version.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame could not be decoded.
    BadFrame,
    /// The frame exceeded [`crate::MAX_FRAME_LEN`] or a counted limit.
    TooLarge,
    /// The frame's protocol version is not the receiver's.
    UnsupportedVersion,
    /// The enclave has not completed its replay.
    NotReady,
    /// The stored log failed verification.
    BrokenLog,
    /// The request decoded but is not acceptable (bad argument, out of sequence).
    BadRequest,
    /// The bearer credential did not verify.
    Unauthenticated,
    /// Policy refused.
    Denied,
    /// No such server, tool or nonce.
    NotFound,
    /// The request conflicts with the enclave's state (for example a second replay).
    Conflict,
    /// The enclave sheds load; retry later.
    Overloaded,
    /// The enclave failed; nothing about the request is implied.
    Internal,
}

impl ErrorCode {
    /// Every code, in declaration order.
    pub const ALL: [ErrorCode; 12] = [
        ErrorCode::BadFrame,
        ErrorCode::TooLarge,
        ErrorCode::UnsupportedVersion,
        ErrorCode::NotReady,
        ErrorCode::BrokenLog,
        ErrorCode::BadRequest,
        ErrorCode::Unauthenticated,
        ErrorCode::Denied,
        ErrorCode::NotFound,
        ErrorCode::Conflict,
        ErrorCode::Overloaded,
        ErrorCode::Internal,
    ];

    /// The stable machine-readable code, as on the wire (`"bad_frame"`, …).
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::NotReady => "not_ready",
            ErrorCode::BrokenLog => "broken_log",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::Denied => "denied",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `Debug` for byte strings: the length only.
struct Len(usize);

impl fmt::Debug for Len {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{} bytes>", self.0)
    }
}

/// `Debug` for a batch of byte strings: the count and total length only.
struct Batch<'a>(&'a [ByteBuf]);

impl fmt::Debug for Batch<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let total: usize = self.0.iter().map(|b| b.len()).sum();
        write!(f, "<{} items, {} bytes>", self.0.len(), total)
    }
}

/// Stands in for a secret in `Debug` output.
const REDACTED: &str = "<redacted>";

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Request::Hello { version } => {
                f.debug_struct("Hello").field("version", version).finish()
            }
            Request::ReplayBegin {
                genesis_admin_keys,
                total_entries,
            } => f
                .debug_struct("ReplayBegin")
                .field("genesis_admin_keys", &Batch(genesis_admin_keys))
                .field("total_entries", total_entries)
                .finish(),
            Request::ReplayEntries { entries } => f
                .debug_struct("ReplayEntries")
                .field("entries", &Batch(entries))
                .finish(),
            Request::ReplayEnd => f.write_str("ReplayEnd"),
            Request::Durable { through_seq } => f
                .debug_struct("Durable")
                .field("through_seq", through_seq)
                .finish(),
            Request::Admin { request } => f
                .debug_struct("Admin")
                .field("request", &Len(request.len()))
                .finish(),
            Request::AttestChallenge { server_id } => f
                .debug_struct("AttestChallenge")
                .field("server_id", server_id)
                .finish(),
            Request::AttestEvidence {
                server_id,
                nonce,
                document,
            } => f
                .debug_struct("AttestEvidence")
                .field("server_id", server_id)
                .field("nonce", &Len(nonce.len()))
                .field("document", &Len(document.len()))
                .finish(),
            Request::Resolve { server_id, .. } => f
                .debug_struct("Resolve")
                .field("bearer", &REDACTED)
                .field("server_id", server_id)
                .finish(),
            Request::Discover { .. } => f
                .debug_struct("Discover")
                .field("bearer", &REDACTED)
                .finish(),
            Request::Authorize {
                server_id, tool, ..
            } => f
                .debug_struct("Authorize")
                .field("bearer", &REDACTED)
                .field("server_id", server_id)
                .field("tool", tool)
                .finish(),
            Request::Checkpoint => f.write_str("Checkpoint"),
            Request::GetAttestation { nonce } => f
                .debug_struct("GetAttestation")
                .field("nonce", &nonce.as_ref().map(|n| Len(n.len())))
                .finish(),
            Request::Status => f.write_str("Status"),
        }
    }
}

impl fmt::Debug for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Response::Hello {
                version,
                ready,
                epoch,
                head_seq,
            } => f
                .debug_struct("Hello")
                .field("version", version)
                .field("ready", ready)
                .field("epoch", epoch)
                .field("head_seq", head_seq)
                .finish(),
            Response::Ack => f.write_str("Ack"),
            Response::Persist { first_seq, entries } => f
                .debug_struct("Persist")
                .field("first_seq", first_seq)
                .field("entries", &Batch(entries))
                .finish(),
            Response::Held { through_seq, reply } => f
                .debug_struct("Held")
                .field("through_seq", through_seq)
                .field("reply", reply)
                .finish(),
            Response::Challenge {
                nonce,
                expires_at_ms,
            } => f
                .debug_struct("Challenge")
                .field("nonce", &Len(nonce.len()))
                .field("expires_at_ms", expires_at_ms)
                .finish(),
            Response::AdminResult {
                accepted,
                seq,
                reason,
            } => f
                .debug_struct("AdminResult")
                .field("accepted", accepted)
                .field("seq", seq)
                .field("reason", reason)
                .finish(),
            Response::AttestResult {
                verified,
                seq,
                measurement,
                reason,
            } => f
                .debug_struct("AttestResult")
                .field("verified", verified)
                .field("seq", seq)
                .field("measurement", measurement)
                .field("reason", reason)
                .finish(),
            Response::Handle {
                seq, expires_at, ..
            } => f
                .debug_struct("Handle")
                .field("token", &REDACTED)
                .field("seq", seq)
                .field("expires_at", expires_at)
                .finish(),
            Response::Denied { seq, reason, code } => f
                .debug_struct("Denied")
                .field("seq", seq)
                .field("reason", reason)
                .field("code", code)
                .finish(),
            Response::Servers { servers, seq } => f
                .debug_struct("Servers")
                .field("servers", servers)
                .field("seq", seq)
                .finish(),
            Response::Authorized {
                allowed,
                seq,
                reason,
            } => f
                .debug_struct("Authorized")
                .field("allowed", allowed)
                .field("seq", seq)
                .field("reason", reason)
                .finish(),
            Response::Checkpoint { note } => {
                f.debug_struct("Checkpoint").field("note", note).finish()
            }
            Response::Attestation { document, jwks } => f
                .debug_struct("Attestation")
                .field("document", &Len(document.len()))
                .field("jwks", jwks)
                .finish(),
            Response::Status {
                ready,
                epoch,
                head_seq,
                durable_seq,
                servers,
            } => f
                .debug_struct("Status")
                .field("ready", ready)
                .field("epoch", epoch)
                .field("head_seq", head_seq)
                .field("durable_seq", durable_seq)
                .field("servers", servers)
                .finish(),
            Response::BrokenLog { seq, message } => f
                .debug_struct("BrokenLog")
                .field("seq", seq)
                .field("message", message)
                .finish(),
            Response::Error { code, message } => f
                .debug_struct("Error")
                .field("code", code)
                .field("message", message)
                .finish(),
        }
    }
}

/// Counted limits on sequences, enforced both when encoding and when decoding.
mod limits {
    use std::fmt;
    use std::marker::PhantomData;

    use serde::de::{self, Deserializer, SeqAccess, Visitor};
    use serde::ser::{self, Serializer};
    use serde::{Deserialize, Serialize};
    use serde_bytes::ByteBuf;

    use super::{
        ED25519_PUBLIC_KEY_LEN, MAX_ADMIN_KEYS, MAX_ENTRIES_PER_FRAME, MAX_SERVERS_PER_REPLY,
        Response, ServerInfo,
    };

    /// Upper bound on what a sequence's announced length may make us preallocate.
    const MAX_PREALLOC: usize = 256;

    fn ser_bounded<S: Serializer, T: Serialize>(
        items: &[T],
        max: usize,
        what: &str,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        if items.len() > max {
            return Err(ser::Error::custom(format_args!(
                "{} {what} exceed the limit of {max}",
                items.len()
            )));
        }
        s.collect_seq(items)
    }

    struct Bounded<T> {
        max: usize,
        what: &'static str,
        item: PhantomData<T>,
    }

    impl<'de, T: Deserialize<'de>> Visitor<'de> for Bounded<T> {
        type Value = Vec<T>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "a sequence of at most {} {}", self.max, self.what)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let hint = seq.size_hint().unwrap_or(0);
            if hint > self.max {
                return Err(de::Error::invalid_length(hint, &self));
            }
            let mut out = Vec::with_capacity(hint.min(MAX_PREALLOC));
            while let Some(item) = seq.next_element()? {
                if out.len() >= self.max {
                    return Err(de::Error::invalid_length(out.len() + 1, &self));
                }
                out.push(item);
            }
            Ok(out)
        }
    }

    fn de_bounded<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
        d: D,
        max: usize,
        what: &'static str,
    ) -> Result<Vec<T>, D::Error> {
        d.deserialize_seq(Bounded {
            max,
            what,
            item: PhantomData,
        })
    }

    pub(super) fn ser_entries<S: Serializer>(v: &[ByteBuf], s: S) -> Result<S::Ok, S::Error> {
        ser_bounded(v, MAX_ENTRIES_PER_FRAME, "entries", s)
    }

    pub(super) fn de_entries<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ByteBuf>, D::Error> {
        de_bounded(d, MAX_ENTRIES_PER_FRAME, "entries")
    }

    pub(super) fn ser_servers<S: Serializer>(v: &[ServerInfo], s: S) -> Result<S::Ok, S::Error> {
        ser_bounded(v, MAX_SERVERS_PER_REPLY, "servers", s)
    }

    pub(super) fn de_servers<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ServerInfo>, D::Error> {
        de_bounded(d, MAX_SERVERS_PER_REPLY, "servers")
    }

    /// What a [`Response::Held`] may wrap: a final reply, never a `Persist` or another `Held`.
    const HELD_EXPECTED: &str = "a final reply (not Persist or Held)";

    fn holdable(reply: &Response) -> bool {
        !matches!(reply, Response::Held { .. } | Response::Persist { .. })
    }

    pub(super) fn ser_held<S: Serializer>(v: &Response, s: S) -> Result<S::Ok, S::Error> {
        if !holdable(v) {
            return Err(ser::Error::custom(format_args!(
                "a held reply must be {HELD_EXPECTED}"
            )));
        }
        v.serialize(s)
    }

    pub(super) fn de_held<'de, D: Deserializer<'de>>(d: D) -> Result<Box<Response>, D::Error> {
        let reply = Box::<Response>::deserialize(d)?;
        if !holdable(&reply) {
            return Err(de::Error::invalid_value(
                de::Unexpected::Other("a Persist or Held reply"),
                &HELD_EXPECTED,
            ));
        }
        Ok(reply)
    }

    const KEY_EXPECTED: &str = "a 32-byte ed25519 public key";

    pub(super) fn ser_keys<S: Serializer>(v: &[ByteBuf], s: S) -> Result<S::Ok, S::Error> {
        if let Some(bad) = v.iter().find(|k| k.len() != ED25519_PUBLIC_KEY_LEN) {
            return Err(ser::Error::custom(format_args!(
                "admin key of {} bytes, expected {KEY_EXPECTED}",
                bad.len()
            )));
        }
        ser_bounded(v, MAX_ADMIN_KEYS, "admin keys", s)
    }

    pub(super) fn de_keys<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ByteBuf>, D::Error> {
        let keys: Vec<ByteBuf> = de_bounded(d, MAX_ADMIN_KEYS, "admin keys")?;
        if let Some(bad) = keys.iter().find(|k| k.len() != ED25519_PUBLIC_KEY_LEN) {
            return Err(de::Error::invalid_length(bad.len(), &KEY_EXPECTED));
        }
        Ok(keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_code_strings_match_their_wire_names() {
        for code in ErrorCode::ALL {
            let mut bytes = Vec::new();
            ciborium::into_writer(&code, &mut bytes).unwrap();
            let wire: String = ciborium::from_reader(bytes.as_slice()).unwrap();
            assert_eq!(wire, code.as_str());
            assert_eq!(code.to_string(), code.as_str());
        }
    }

    #[test]
    fn error_messages_are_cut_at_a_char_boundary() {
        let long = "é".repeat(MAX_ERROR_MESSAGE_LEN); // 2 bytes each
        let Response::Error { message, .. } = Response::error(ErrorCode::Internal, &long) else {
            panic!("not an error reply");
        };
        assert!(message.len() <= MAX_ERROR_MESSAGE_LEN);
        assert_eq!(message.len(), MAX_ERROR_MESSAGE_LEN);
        assert!(long.starts_with(&message));
        let odd = format!("x{long}");
        let Response::Denied { reason, .. } = Response::denied(1, ErrorCode::Denied, &odd) else {
            panic!("not a denial");
        };
        assert_eq!(reason.len(), MAX_ERROR_MESSAGE_LEN - 1);
    }

    #[test]
    fn debug_redacts_bearer_tokens_and_handles() {
        let secret = "s3cr3t-bearer-token";
        let requests = [
            Request::Resolve {
                bearer: secret.into(),
                server_id: "srv".into(),
            },
            Request::Discover {
                bearer: secret.into(),
            },
            Request::Authorize {
                bearer: secret.into(),
                server_id: "srv".into(),
                tool: "t".into(),
            },
        ];
        for r in requests {
            let shown = format!("{:?}", Frame::request(1, r));
            assert!(!shown.contains(secret), "{shown}");
            assert!(shown.contains(REDACTED), "{shown}");
        }
        let handle = Response::Handle {
            token: secret.into(),
            seq: 3,
            expires_at: 4,
        };
        let shown = format!("{:?}", Frame::response(1, handle));
        assert!(!shown.contains(secret), "{shown}");
    }

    #[test]
    fn debug_prints_byte_strings_as_lengths() {
        let r = Request::ReplayEntries {
            entries: vec![
                ByteBuf::from(vec![0xAB; 100]),
                ByteBuf::from(vec![0xCD; 28]),
            ],
        };
        assert_eq!(
            format!("{r:?}"),
            "ReplayEntries { entries: <2 items, 128 bytes> }"
        );
    }
}
