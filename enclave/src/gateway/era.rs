//! Which MCP protocol era an agent's request belongs to, and the modern era's header checks.
//!
//! Two eras share the streamable-HTTP endpoint:
//! - legacy (`2025-11-25` and earlier): an `initialize` handshake, a session id the server
//!   mints and the client echoes in `Mcp-Session-Id`;
//! - modern (`2026-07-28`): stateless; every request carries its protocol version in
//!   `params._meta["io.modelcontextprotocol/protocolVersion"]` and mirrors it, the method and
//!   the tool name into headers (`MCP-Protocol-Version`, `Mcp-Method`, `Mcp-Name`), which the
//!   server must check against the body (400 with `-32020` on a mismatch, `-32022` for a
//!   version it does not speak).
//!
//! Pure functions of the request's headers and parsed body; no I/O.

use attestplane_verifier::gateway::jsonrpc::{MAX_ID_LEN, Message};
use serde_json::value::RawValue;

/// The legacy protocol version the gateway speaks.
pub const LEGACY_VERSION: &str = "2025-11-25";

/// Earlier legacy versions a client may ask for in `initialize`; the gateway answers with
/// [`LEGACY_VERSION`] to all of them, which the spec allows.
pub const LEGACY_VERSIONS: &[&str] = &["2025-11-25", "2025-06-18", "2025-03-26"];

/// The modern protocol version the gateway speaks.
pub const MODERN_VERSION: &str = "2026-07-28";

/// `_meta` member carrying the modern protocol version.
pub const META_PROTOCOL_VERSION: &str = "io.modelcontextprotocol/protocolVersion";

/// JSON-RPC error: headers missing or not matching the body (modern era).
pub const HEADER_MISMATCH: i64 = -32020;

/// JSON-RPC error: a protocol version the server does not speak.
pub const UNSUPPORTED_PROTOCOL_VERSION: i64 = -32022;

/// The protocol era of one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Era {
    /// `2025-11-25` and earlier: sessions.
    Legacy,
    /// `2026-07-28`: stateless.
    Modern,
}

impl Era {
    /// The name logged for this era.
    pub fn as_str(self) -> &'static str {
        match self {
            Era::Legacy => "legacy",
            Era::Modern => "modern",
        }
    }
}

/// The request headers the gateway reads.
#[derive(Clone, Debug, Default)]
pub struct McpHeaders {
    /// `MCP-Protocol-Version`.
    pub protocol_version: Option<String>,
    /// `Mcp-Method`.
    pub method: Option<String>,
    /// `Mcp-Name`.
    pub name: Option<String>,
    /// `Mcp-Session-Id`.
    pub session: Option<String>,
}

/// Why a request's era could not be settled.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EraError {
    /// A header is missing or does not match the body (`-32020`).
    #[error("header {header} {problem}")]
    HeaderMismatch {
        /// The header.
        header: &'static str,
        /// What is wrong.
        problem: &'static str,
    },
    /// A protocol version the gateway does not speak (`-32022`).
    #[error("unsupported protocol version {0:?}")]
    Unsupported(String),
}

impl EraError {
    /// The JSON-RPC error code.
    pub fn code(&self) -> i64 {
        match self {
            EraError::HeaderMismatch { .. } => HEADER_MISMATCH,
            EraError::Unsupported(_) => UNSUPPORTED_PROTOCOL_VERSION,
        }
    }
}

/// The version in `params._meta["io.modelcontextprotocol/protocolVersion"]`, if any.
pub fn body_version(message: &Message<'_>) -> Option<String> {
    let v = meta_member(message, META_PROTOCOL_VERSION)?;
    serde_json::from_str::<String>(v.get()).ok()
}

/// Member `key` of `params._meta`, as sent, if the request has one.
pub fn meta_member<'a>(message: &Message<'a>, key: &str) -> Option<&'a RawValue> {
    let params = message.params()?;
    let members = attestplane_verifier::gateway::jsonrpc::object_members(params, "params").ok()?;
    let (_, meta) = members.into_iter().find(|(k, _)| k == "_meta")?;
    let meta = attestplane_verifier::gateway::jsonrpc::object_members(meta, "_meta").ok()?;
    meta.into_iter().find(|(k, _)| k == key).map(|(_, v)| v)
}

/// The `params.name` of a request, if it is a string.
fn params_name(message: &Message<'_>) -> Option<String> {
    let params = message.params()?;
    let members = attestplane_verifier::gateway::jsonrpc::object_members(params, "params").ok()?;
    let (_, v) = members.iter().find(|(k, _)| k == "name" || k == "uri")?;
    serde_json::from_str::<String>(v.get()).ok()
}

/// Settles the era of `message` sent with `headers`, checking the modern era's headers.
///
/// Modern when the header or the body names `2026-07-28`; legacy otherwise (an `initialize`,
/// or a request in a session). A modern request must carry `MCP-Protocol-Version` equal to
/// the body's version, `Mcp-Method` equal to the method, and for `tools/call` (and the other
/// named methods) `Mcp-Name` equal to `params.name`/`params.uri`.
pub fn classify(headers: &McpHeaders, message: &Message<'_>) -> Result<Era, EraError> {
    let body = body_version(message);
    let modern = headers.protocol_version.as_deref() == Some(MODERN_VERSION)
        || body.as_deref() == Some(MODERN_VERSION);
    if !modern {
        if let Some(v) = &body {
            // A body version from the future (or garbage) in a legacy-looking request.
            if !LEGACY_VERSIONS.contains(&v.as_str()) {
                return Err(EraError::Unsupported(v.clone()));
            }
        }
        if let Some(h) = &headers.protocol_version
            && !LEGACY_VERSIONS.contains(&h.as_str())
        {
            return Err(EraError::Unsupported(h.clone()));
        }
        return Ok(Era::Legacy);
    }
    match (&headers.protocol_version, &body) {
        (None, _) => {
            return Err(EraError::HeaderMismatch {
                header: "MCP-Protocol-Version",
                problem: "is missing",
            });
        }
        (Some(h), Some(b)) if h != b => {
            return Err(EraError::HeaderMismatch {
                header: "MCP-Protocol-Version",
                problem: "does not match params._meta",
            });
        }
        (Some(_), None) if message.method() != Some("server/discover") => {
            return Err(EraError::HeaderMismatch {
                header: "MCP-Protocol-Version",
                problem: "has no matching params._meta version",
            });
        }
        _ => {}
    }
    let method = message.method().unwrap_or_default();
    match &headers.method {
        None => {
            return Err(EraError::HeaderMismatch {
                header: "Mcp-Method",
                problem: "is missing",
            });
        }
        Some(m) if m != method => {
            return Err(EraError::HeaderMismatch {
                header: "Mcp-Method",
                problem: "does not match the body's method",
            });
        }
        _ => {}
    }
    if matches!(method, "tools/call" | "resources/read" | "prompts/get") {
        let body_name = params_name(message);
        match (&headers.name, body_name) {
            (None, _) => {
                return Err(EraError::HeaderMismatch {
                    header: "Mcp-Name",
                    problem: "is missing",
                });
            }
            (Some(h), Some(b)) if decode_header_value(h).as_deref() == Some(b.as_str()) => {}
            _ => {
                return Err(EraError::HeaderMismatch {
                    header: "Mcp-Name",
                    problem: "does not match params.name",
                });
            }
        }
    }
    Ok(Era::Modern)
}

/// The `id` of a body that is not a message the gateway reads (a wrong `jsonrpc`, a bad
/// member, a response where a request belongs), as written, when it can still be read without
/// doubt: a top-level object whose one `id` member is a string or a number of at most
/// [`MAX_ID_LEN`] bytes. A refusal of such a body carries it (JSON-RPC answers `null` only
/// when the id cannot be detected); anything else (not JSON, a batch, two `id` members, an id
/// of another type) is `None`.
pub fn readable_id(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct IdOnly<'a> {
        #[serde(borrow)]
        id: Option<&'a RawValue>,
    }
    if body.len() > attestplane_verifier::gateway::jsonrpc::MAX_MESSAGE_LEN {
        return None;
    }
    // Serde refuses a duplicated `id` member: an ambiguous id is not read.
    let parsed: IdOnly<'_> = serde_json::from_slice(body).ok()?;
    let id = parsed.id?.get();
    let readable = id.len() <= MAX_ID_LEN
        && (serde_json::from_str::<String>(id).is_ok()
            || serde_json::from_str::<serde_json::Number>(id).is_ok());
    readable.then(|| id.to_owned())
}

/// A header value as the spec encodes it: plain ASCII, or `=?base64?…?=` for anything else.
pub fn decode_header_value(value: &str) -> Option<String> {
    use base64::Engine as _;
    match value
        .strip_prefix("=?base64?")
        .and_then(|v| v.strip_suffix("?="))
    {
        Some(b64) => base64::engine::general_purpose::STANDARD
            .decode(b64)
            .ok()
            .and_then(|b| String::from_utf8(b).ok()),
        None => Some(value.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use attestplane_verifier::gateway::jsonrpc::parse_message;

    fn modern_call(name: &str) -> String {
        format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"{name}","arguments":{{}},"_meta":{{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}}}}"#
        )
    }

    fn headers(v: Option<&str>, m: Option<&str>, n: Option<&str>) -> McpHeaders {
        McpHeaders {
            protocol_version: v.map(str::to_owned),
            method: m.map(str::to_owned),
            name: n.map(str::to_owned),
            session: None,
        }
    }

    #[test]
    fn modern_request_with_matching_headers_is_modern() {
        let body = modern_call("add");
        let m = parse_message(body.as_bytes()).unwrap();
        let h = headers(Some(MODERN_VERSION), Some("tools/call"), Some("add"));
        assert_eq!(classify(&h, &m), Ok(Era::Modern));
    }

    #[test]
    fn header_body_mismatches_are_refused_with_32020() {
        let body = modern_call("add");
        let m = parse_message(body.as_bytes()).unwrap();
        for h in [
            headers(Some(MODERN_VERSION), Some("tools/list"), Some("add")),
            headers(Some(MODERN_VERSION), None, Some("add")),
            headers(Some(MODERN_VERSION), Some("tools/call"), Some("delete")),
            headers(Some(MODERN_VERSION), Some("tools/call"), None),
            headers(None, Some("tools/call"), Some("add")),
            headers(Some("2025-11-25"), Some("tools/call"), Some("add")),
        ] {
            let e = classify(&h, &m).unwrap_err();
            assert_eq!(e.code(), HEADER_MISMATCH, "{h:?}: {e}");
        }
    }

    #[test]
    fn base64_mcp_name_is_decoded_before_comparison() {
        let body = modern_call("wéather");
        let m = parse_message(body.as_bytes()).unwrap();
        let h = headers(
            Some(MODERN_VERSION),
            Some("tools/call"),
            Some("=?base64?d8OpYXRoZXI=?="),
        );
        assert_eq!(classify(&h, &m), Ok(Era::Modern));
    }

    #[test]
    fn unknown_versions_are_unsupported() {
        let body = r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"2099-01-01"}}}"#;
        let m = parse_message(body.as_bytes()).unwrap();
        let e = classify(&headers(None, None, None), &m).unwrap_err();
        assert_eq!(e.code(), UNSUPPORTED_PROTOCOL_VERSION);
        let body = r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#;
        let m = parse_message(body.as_bytes()).unwrap();
        let e = classify(&headers(Some("1999-01-01"), None, None), &m).unwrap_err();
        assert_eq!(e.code(), UNSUPPORTED_PROTOCOL_VERSION);
    }

    #[test]
    fn an_unreadable_or_ambiguous_id_is_not_echoed_in_a_refusal() {
        let id = |b: &str| readable_id(b.as_bytes());
        assert_eq!(
            id(r#"{"jsonrpc":"1.0","id":"a-1","method":"x"}"#).as_deref(),
            Some(r#""a-1""#)
        );
        assert_eq!(id(r#"{"id":7e0,"method":{}}"#).as_deref(), Some("7e0"));
        // Two ids: which one a client meant is unknowable.
        assert_eq!(id(r#"{"id":1,"id":2}"#), None);
        // Not a string or number, not an object, not JSON, too long.
        for b in [
            r#"{"id":{"x":1}}"#,
            r#"{"id":null}"#,
            r#"[{"id":1}]"#,
            r#"{"id":1"#,
            "7",
        ] {
            assert_eq!(id(b), None, "{b}");
        }
        let long = format!(r#"{{"id":"{}"}}"#, "x".repeat(MAX_ID_LEN));
        assert_eq!(id(&long), None);
    }

    #[test]
    fn legacy_requests_are_legacy() {
        let body = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"x","version":"1"}}}"#;
        let m = parse_message(body.as_bytes()).unwrap();
        assert_eq!(classify(&headers(None, None, None), &m), Ok(Era::Legacy));
        assert_eq!(
            classify(&headers(Some("2025-11-25"), None, None), &m),
            Ok(Era::Legacy)
        );
    }
}
