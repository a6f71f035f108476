//! The dial protocol: how the enclave asks the host for a connection to a registered MCP server.
//!
//! Role. The enclave has no network. When its gateway needs an upstream connection it opens a
//! connection to the host's dial address (vsock in production, a Unix socket or loopback TCP
//! locally), sends one [`DialRequest`] naming the registered server it wants, and reads one
//! [`DialReply`]. On [`DialStatus::Connected`] the same connection then carries the upstream's
//! bytes both ways: what the server sends reaches the enclave untouched, and what the enclave
//! sends travels in held frames ([`crate::release`]) that the host unwraps and delivers once the
//! log entries they depend on are durable; the host parses nothing of the bytes themselves. On
//! any other status the host closes the connection after the reply.
//!
//! The request names a *server id*, never an address: the host dials only the endpoint that the
//! server's accepted registration in the stored log names, so an enclave (or anything that can
//! reach the dial port) cannot make the host connect anywhere else.
//!
//! Encoding. Each message is a 2-byte big-endian length followed by that many bytes of CBOR
//! (serde into ciborium, maps keyed by field name, unknown fields refused), at most
//! [`MAX_DIAL_FRAME_LEN`] bytes. Both messages carry [`DIAL_VERSION`]; a peer speaking another
//! version is refused ([`ProtoError::DialVersion`]), there is no negotiation. The readers never
//! read past the end of their message, so the bytes that follow a `Connected` reply are the
//! upstream's.
//!
//! Trust: none, in both directions. The host must survive a hostile dial request (bounded,
//! typed errors, no panic) and the enclave a hostile reply. Nothing here is authenticated: a
//! host can always refuse or misroute a connection, which is why the gateway's upstream
//! connections will carry TLS that ends inside the enclave (and why an unattested, plain-HTTP
//! upstream is a lower assurance level that the policy sees). Reply messages are for operators'
//! logs: short, bounded, and never secrets.
//!
//! Not here: the registry lookup and the copying (the host proxy's relay), timeouts and
//! connection limits (both callers own them).

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::ProtoError;

/// The dial protocol's version. Version 2: the enclave's bytes after `Connected` are held
/// frames ([`crate::release`]); version 1 carried them raw.
pub const DIAL_VERSION: u16 = 2;

/// Length of the prefix before each dial message: a big-endian `u16`.
pub const DIAL_LEN_PREFIX: usize = 2;

/// Largest dial message body, in bytes (prefix not included).
pub const MAX_DIAL_FRAME_LEN: usize = 1024;

/// Longest server id, in bytes: the same bound the registry's admin requests enforce.
pub const MAX_SERVER_ID_LEN: usize = 256;

/// Longest [`DialReply::message`], in bytes; longer messages are cut at a character boundary.
pub const MAX_DIAL_MESSAGE_LEN: usize = 256;

/// A registered server's id as a dial request may carry it: 1 to [`MAX_SERVER_ID_LEN`] bytes,
/// no control characters (the rule the registry applies to ids).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ServerId(String);

impl ServerId {
    /// Checks `id` against the id rule.
    pub fn new(id: &str) -> Result<ServerId, ProtoError> {
        let problem = if id.is_empty() {
            Some("is empty")
        } else if id.len() > MAX_SERVER_ID_LEN {
            Some("is longer than 256 bytes")
        } else if id.chars().any(char::is_control) {
            Some("holds control characters")
        } else {
            None
        };
        match problem {
            Some(problem) => Err(ProtoError::BadServerId { problem }),
            None => Ok(ServerId(id.to_owned())),
        }
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ServerId {
    type Error = ProtoError;

    fn try_from(id: String) -> Result<Self, ProtoError> {
        ServerId::new(&id)
    }
}

impl From<ServerId> for String {
    fn from(id: ServerId) -> String {
        id.0
    }
}

impl std::fmt::Display for ServerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Enclave → host: "connect me to this registered server".
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DialRequest {
    /// [`DIAL_VERSION`].
    pub version: u16,
    /// The registered server to connect to.
    pub server: ServerId,
}

impl DialRequest {
    /// A request at [`DIAL_VERSION`].
    pub fn new(server: ServerId) -> DialRequest {
        DialRequest {
            version: DIAL_VERSION,
            server,
        }
    }

    /// Prefix and body.
    pub fn encode(&self) -> Result<Vec<u8>, ProtoError> {
        encode(self)
    }

    /// Decodes one body (prefix already removed).
    ///
    /// Errors: [`ProtoError::DialVersion`], [`ProtoError::BadServerId`],
    /// [`ProtoError::Malformed`], [`ProtoError::TrailingBytes`].
    pub fn decode(body: &[u8]) -> Result<DialRequest, ProtoError> {
        let request: DialRequest = decode(body)?;
        check_version(request.version)?;
        Ok(request)
    }
}

/// What the host did with a [`DialRequest`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DialStatus {
    /// Connected: the upstream's bytes follow on this connection.
    Connected,
    /// No accepted registration names this server id, or it was revoked.
    UnknownServer,
    /// The registration's endpoint is not one the host dials (today: `http://HOST[:PORT]`
    /// only, no user info, query or fragment).
    EndpointRefused,
    /// The host could not connect to the registered endpoint (refused, unreachable, the name
    /// does not resolve).
    ConnectFailed,
    /// The host's connect timeout elapsed.
    Timeout,
    /// The host is at its limit of upstream connections; retry later.
    Overloaded,
    /// The request could not be read (malformed, oversized, foreign version, too slow).
    BadRequest,
}

impl std::fmt::Display for DialStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DialStatus::Connected => "connected",
            DialStatus::UnknownServer => "unknown server",
            DialStatus::EndpointRefused => "endpoint refused",
            DialStatus::ConnectFailed => "connect failed",
            DialStatus::Timeout => "timeout",
            DialStatus::Overloaded => "overloaded",
            DialStatus::BadRequest => "bad request",
        })
    }
}

/// Host → enclave: the answer to a [`DialRequest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DialReply {
    /// [`DIAL_VERSION`].
    pub version: u16,
    /// What happened.
    pub status: DialStatus,
    /// A short explanation for operators (empty when connected), at most
    /// [`MAX_DIAL_MESSAGE_LEN`] bytes; never a secret.
    pub message: String,
}

impl DialReply {
    /// A reply at [`DIAL_VERSION`]; `message` is cut to [`MAX_DIAL_MESSAGE_LEN`] bytes.
    pub fn new(status: DialStatus, message: &str) -> DialReply {
        let mut end = message.len().min(MAX_DIAL_MESSAGE_LEN);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        DialReply {
            version: DIAL_VERSION,
            status,
            message: message.get(..end).unwrap_or_default().to_owned(),
        }
    }

    /// Prefix and body.
    pub fn encode(&self) -> Result<Vec<u8>, ProtoError> {
        if self.message.len() > MAX_DIAL_MESSAGE_LEN {
            return Err(ProtoError::Encode {
                reason: format!(
                    "dial reply message of {} bytes exceeds {MAX_DIAL_MESSAGE_LEN}",
                    self.message.len()
                ),
            });
        }
        encode(self)
    }

    /// Decodes one body (prefix already removed).
    ///
    /// Errors: [`ProtoError::DialVersion`], [`ProtoError::Malformed`] (also for a message over
    /// [`MAX_DIAL_MESSAGE_LEN`]), [`ProtoError::TrailingBytes`].
    pub fn decode(body: &[u8]) -> Result<DialReply, ProtoError> {
        let reply: DialReply = decode(body)?;
        check_version(reply.version)?;
        if reply.message.len() > MAX_DIAL_MESSAGE_LEN {
            return Err(ProtoError::malformed(
                None,
                "dial reply message exceeds its limit",
            ));
        }
        Ok(reply)
    }
}

/// Reads one dial request, and not a byte more.
///
/// Errors: those of [`read_dial_body`] and [`DialRequest::decode`].
pub async fn read_dial_request<R>(reader: &mut R) -> Result<DialRequest, ProtoError>
where
    R: AsyncRead + Unpin + ?Sized,
{
    DialRequest::decode(&read_dial_body(reader).await?)
}

/// Reads one dial reply, and not a byte more: what follows is the upstream's.
///
/// Errors: those of [`read_dial_body`] and [`DialReply::decode`].
pub async fn read_dial_reply<R>(reader: &mut R) -> Result<DialReply, ProtoError>
where
    R: AsyncRead + Unpin + ?Sized,
{
    DialReply::decode(&read_dial_body(reader).await?)
}

/// Writes an encoded dial message whole and flushes it.
pub async fn write_dial<W>(writer: &mut W, bytes: &[u8]) -> Result<(), ProtoError>
where
    W: AsyncWrite + Unpin + ?Sized,
{
    writer.write_all(bytes).await?;
    writer.flush().await?;
    Ok(())
}

/// Reads one prefix and the body it announces.
///
/// Errors: [`ProtoError::TooLarge`] for a length over [`MAX_DIAL_FRAME_LEN`] (before reading
/// the body), [`ProtoError::Malformed`] for a zero length, [`ProtoError::UnexpectedEof`] when
/// the peer closes before the message ends (`buffered: 0` when it sent nothing), and
/// [`ProtoError::Io`].
pub async fn read_dial_body<R>(reader: &mut R) -> Result<Vec<u8>, ProtoError>
where
    R: AsyncRead + Unpin + ?Sized,
{
    let mut prefix = [0u8; DIAL_LEN_PREFIX];
    read_full(reader, &mut prefix, 0).await?;
    let len = usize::from(u16::from_be_bytes(prefix));
    if len > MAX_DIAL_FRAME_LEN {
        return Err(ProtoError::TooLarge {
            len: len as u64,
            max: MAX_DIAL_FRAME_LEN,
        });
    }
    if len == 0 {
        return Err(ProtoError::malformed(None, "empty dial message"));
    }
    let mut body = vec![0u8; len];
    read_full(reader, &mut body, DIAL_LEN_PREFIX).await?;
    Ok(body)
}

/// Fills `buf`; `before` bytes of the message were read earlier (for the EOF count).
async fn read_full<R>(reader: &mut R, buf: &mut [u8], before: usize) -> Result<(), ProtoError>
where
    R: AsyncRead + Unpin + ?Sized,
{
    let mut filled = 0;
    while filled < buf.len() {
        let n = reader
            .read(buf.get_mut(filled..).unwrap_or_default())
            .await?;
        if n == 0 {
            return Err(ProtoError::UnexpectedEof {
                buffered: before + filled,
            });
        }
        filled += n;
    }
    Ok(())
}

fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>, ProtoError> {
    let mut out = vec![0u8; DIAL_LEN_PREFIX];
    ciborium::into_writer(message, &mut out).map_err(|e| ProtoError::Encode {
        reason: match e {
            ciborium::ser::Error::Value(msg) => msg,
            ciborium::ser::Error::Io(io) => io.to_string(),
        },
    })?;
    let body_len = out.len().saturating_sub(DIAL_LEN_PREFIX);
    let prefix = u16::try_from(body_len)
        .ok()
        .filter(|len| usize::from(*len) <= MAX_DIAL_FRAME_LEN)
        .ok_or(ProtoError::TooLarge {
            len: body_len as u64,
            max: MAX_DIAL_FRAME_LEN,
        })?;
    if let Some(head) = out.get_mut(..DIAL_LEN_PREFIX) {
        head.copy_from_slice(&prefix.to_be_bytes());
    }
    Ok(out)
}

/// The field every dial version keeps, read when the full decode fails so that a foreign
/// version is reported as such.
#[derive(Deserialize)]
struct VersionOnly {
    version: u16,
}

fn decode<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ProtoError> {
    let mut rest = body;
    match ciborium::from_reader::<T, _>(&mut rest) {
        Ok(message) => {
            if !rest.is_empty() {
                return Err(ProtoError::TrailingBytes {
                    trailing: rest.len(),
                });
            }
            Ok(message)
        }
        Err(e) => {
            if let Ok(v) = ciborium::from_reader::<VersionOnly, _>(body) {
                check_version(v.version)?;
            }
            Err(ProtoError::malformed(None, &describe(e)))
        }
    }
}

fn check_version(found: u16) -> Result<(), ProtoError> {
    if found == DIAL_VERSION {
        Ok(())
    } else {
        Err(ProtoError::DialVersion {
            found,
            expected: DIAL_VERSION,
        })
    }
}

fn describe(e: ciborium::de::Error<std::io::Error>) -> String {
    match e {
        ciborium::de::Error::Io(_) => "cbor body ends early".to_owned(),
        ciborium::de::Error::Syntax(offset) => format!("invalid cbor at offset {offset}"),
        ciborium::de::Error::Semantic(Some(offset), msg) => format!("{msg} (at offset {offset})"),
        ciborium::de::Error::Semantic(None, msg) => msg,
        ciborium::de::Error::RecursionLimitExceeded => "cbor nested too deeply".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> ServerId {
        ServerId::new(s).unwrap()
    }

    #[tokio::test]
    async fn request_and_reply_round_trip_without_reading_past_their_end() {
        let request = DialRequest::new(id("weather"));
        let reply = DialReply::new(DialStatus::Connected, "");
        let mut wire = request.encode().unwrap();
        wire.extend(reply.encode().unwrap());
        wire.extend_from_slice(b"upstream bytes");
        let mut r = wire.as_slice();
        assert_eq!(read_dial_request(&mut r).await.unwrap(), request);
        assert_eq!(read_dial_reply(&mut r).await.unwrap(), reply);
        assert_eq!(r, b"upstream bytes");
    }

    #[test]
    fn request_bytes_are_pinned() {
        // {"version": 2, "server": "w"} with a 2-byte length prefix.
        let bytes = DialRequest::new(id("w")).encode().unwrap();
        let mut expected = vec![0x00, 0x13, 0xa2];
        expected.extend(b"\x67version\x02\x66server\x61w");
        assert_eq!(bytes, expected);
    }

    #[test]
    fn server_ids_follow_the_registry_rule() {
        assert!(ServerId::new(&"x".repeat(MAX_SERVER_ID_LEN)).is_ok());
        for bad in [
            String::new(),
            "x".repeat(MAX_SERVER_ID_LEN + 1),
            "a\nb".into(),
            "a\u{0}".into(),
            "\u{85}".into(),
        ] {
            assert!(
                matches!(ServerId::new(&bad), Err(ProtoError::BadServerId { .. })),
                "{bad:?}"
            );
        }
    }

    #[tokio::test]
    async fn rejects_a_request_smuggling_a_bad_server_id_past_the_encoder() {
        // A hostile peer encodes the id by hand; decoding must apply the rule anyway.
        #[derive(Serialize)]
        struct Raw<'a> {
            version: u16,
            server: &'a str,
        }
        for server in ["", "a\u{1b}[2Jb"] {
            let bytes = encode(&Raw {
                version: DIAL_VERSION,
                server,
            })
            .unwrap();
            let err = read_dial_request(&mut bytes.as_slice()).await.unwrap_err();
            assert!(matches!(err, ProtoError::Malformed { .. }), "{err}");
        }
    }

    #[tokio::test]
    async fn rejects_oversized_and_empty_lengths_before_reading_a_body() {
        let mut wire = u16::try_from(MAX_DIAL_FRAME_LEN + 1)
            .unwrap()
            .to_be_bytes()
            .to_vec();
        wire.extend(vec![0u8; 10]);
        let err = read_dial_request(&mut wire.as_slice()).await.unwrap_err();
        assert!(
            matches!(err, ProtoError::TooLarge { len, max: MAX_DIAL_FRAME_LEN } if len == MAX_DIAL_FRAME_LEN as u64 + 1),
            "{err}"
        );
        let err = read_dial_request(&mut [0u8, 0].as_slice())
            .await
            .unwrap_err();
        assert!(matches!(err, ProtoError::Malformed { .. }), "{err}");
    }

    #[tokio::test]
    async fn truncated_requests_report_how_much_arrived() {
        let bytes = DialRequest::new(id("weather")).encode().unwrap();
        for cut in [0, 1, 2, bytes.len() - 1] {
            let err = read_dial_request(&mut &bytes[..cut]).await.unwrap_err();
            assert!(
                matches!(err, ProtoError::UnexpectedEof { buffered } if buffered == cut),
                "{cut}: {err}"
            );
        }
    }

    #[tokio::test]
    async fn rejects_a_foreign_version_by_name() {
        // Version 1 (raw enclave bytes, nothing held) included: a host of that version would
        // deliver what the enclave sends before its entries are durable.
        let mut request = DialRequest::new(id("w"));
        request.version = 1;
        let bytes = request.encode().unwrap();
        let err = read_dial_request(&mut bytes.as_slice()).await.unwrap_err();
        assert!(
            matches!(
                err,
                ProtoError::DialVersion {
                    found: 1,
                    expected: DIAL_VERSION
                }
            ),
            "{err}"
        );
        // A future version with fields this one does not know is still named as a version.
        #[derive(Serialize)]
        struct Future<'a> {
            version: u16,
            server: &'a str,
            tls: bool,
        }
        let bytes = encode(&Future {
            version: 3,
            server: "w",
            tls: true,
        })
        .unwrap();
        let err = read_dial_request(&mut bytes.as_slice()).await.unwrap_err();
        assert!(
            matches!(err, ProtoError::DialVersion { found: 3, .. }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn rejects_unknown_fields_and_trailing_cbor() {
        #[derive(Serialize)]
        struct Extra<'a> {
            version: u16,
            server: &'a str,
            address: &'a str,
        }
        let bytes = encode(&Extra {
            version: DIAL_VERSION,
            server: "w",
            address: "tcp:10.0.0.1:22",
        })
        .unwrap();
        let err = read_dial_request(&mut bytes.as_slice()).await.unwrap_err();
        assert!(matches!(err, ProtoError::Malformed { .. }), "{err}");

        let body = &DialRequest::new(id("w")).encode().unwrap()[DIAL_LEN_PREFIX..];
        let mut long = body.to_vec();
        long.push(0xf6);
        assert!(matches!(
            DialRequest::decode(&long),
            Err(ProtoError::TrailingBytes { trailing: 1 })
        ));
    }

    #[test]
    fn reply_messages_are_bounded_at_a_char_boundary() {
        let reply = DialReply::new(DialStatus::ConnectFailed, &"€".repeat(200));
        assert!(reply.message.len() <= MAX_DIAL_MESSAGE_LEN);
        assert!(reply.message.len() > MAX_DIAL_MESSAGE_LEN - 3);
        let encoded = reply.encode().unwrap();
        assert_eq!(
            DialReply::decode(&encoded[DIAL_LEN_PREFIX..]).unwrap(),
            reply
        );
        let long = DialReply {
            message: "x".repeat(MAX_DIAL_MESSAGE_LEN + 1),
            ..reply
        };
        assert!(long.encode().is_err());
        let bytes = encode(&long).unwrap();
        assert!(matches!(
            DialReply::decode(&bytes[DIAL_LEN_PREFIX..]),
            Err(ProtoError::Malformed { .. })
        ));
    }

    #[test]
    fn every_status_round_trips() {
        for status in [
            DialStatus::Connected,
            DialStatus::UnknownServer,
            DialStatus::EndpointRefused,
            DialStatus::ConnectFailed,
            DialStatus::Timeout,
            DialStatus::Overloaded,
            DialStatus::BadRequest,
        ] {
            let bytes = DialReply::new(status, "m").encode().unwrap();
            assert_eq!(
                DialReply::decode(&bytes[DIAL_LEN_PREFIX..]).unwrap().status,
                status
            );
        }
    }
}
