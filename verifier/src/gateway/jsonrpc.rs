//! JSON-RPC 2.0 envelopes with narrow typed views, forwarded byte for byte.
//!
//! The gateway sits between MCP clients and MCP servers that speak protocol revisions it may
//! not know yet. A typed MCP model (rmcp's, say) drops the fields it does not know
//! (`Tool.execution`, the `tools/call` `task` parameter, vendor fields, new result members) and
//! rewrites number spellings (`1e3` → `1000.0`) when it serialises again. So nothing here
//! re-serialises a message: [`parse_message`] reads the envelope (`jsonrpc`, `id`, `method`,
//! `params`, `result`, `error`) into borrowed [`RawValue`]s over the original text, and the
//! views ([`ToolsCallParams`], [`ToolsListResult`], [`ToolsListParams`]) read the few members
//! a decision needs and keep the rest as raw members. A message the gateway passes unchanged
//! is forwarded as [`Message::text`]: the very bytes it received.
//!
//! When the gateway must change a message (add the receipt at
//! `params._meta["io.attestplane/receipt"]`, withhold tools from a `tools/list` result, replace
//! redacted arguments) it splices new bytes over exactly the member it changes
//! ([`Message::with_params_meta`], [`Message::with_result_tools`], [`Message::with_replaced`]):
//! every other byte of the message, whitespace included, is what arrived.
//!
//! ## What is refused
//!
//! With a typed [`JsonRpcError`]: more than [`MAX_MESSAGE_LEN`] bytes; nesting deeper than
//! [`MAX_DEPTH`]; text that is not UTF-8 or not JSON; batches (a JSON array at the top: MCP
//! removed them in 2025-06-18); anything but an object at the top; a member name twice at the
//! top or in a view's object (serde_json would keep the last, another parser the first);
//! `jsonrpc` other than `"2.0"`; an `id` that is not a string or number (or `null` in an error
//! response); a method that is not a string or longer than [`MAX_METHOD_LEN`]; params that
//! are not an object or array; a response with both or neither of `result` and `error`.
//! Names are compared after unescaping, so `"\u006dethod"` is `method`.
//!
//! ## What this module does not do
//!
//! It does not know MCP's other methods, check a message against the MCP schema, or decide
//! anything: the gateway decides, the enclave does the I/O. It does not check the I-JSON rules
//! of arguments (that is [`super::json::parse_ijson`], on [`ToolsCallParams::arguments`]).

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;
use std::ops::Range;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use thiserror::Error;

use super::json;

/// The largest message accepted, in bytes.
pub const MAX_MESSAGE_LEN: usize = 4 * 1024 * 1024;

/// The deepest nesting of arrays and objects accepted in a message.
pub const MAX_DEPTH: usize = json::MAX_DEPTH;

/// The longest method name accepted, in bytes.
pub const MAX_METHOD_LEN: usize = 256;

/// The longest `id` accepted, as written, in bytes.
pub const MAX_ID_LEN: usize = 256;

/// The longest tool name accepted in `tools/call`, in bytes (SEP-986 caps names at 128).
pub const MAX_TOOL_NAME_LEN: usize = 128;

/// The longest pagination cursor accepted, in bytes.
pub const MAX_CURSOR_LEN: usize = 4096;

/// The longest resource URI (`resources/read`) accepted.
pub const MAX_URI_LEN: usize = 4096;

/// The `_meta` member under which the gateway passes a call's receipt.
pub const RECEIPT_META_KEY: &str = "io.attestplane/receipt";

/// JSON-RPC's "parse error".
pub const PARSE_ERROR: i64 = -32700;
/// JSON-RPC's "invalid request".
pub const INVALID_REQUEST: i64 = -32600;
/// JSON-RPC's "method not found".
pub const METHOD_NOT_FOUND: i64 = -32601;
/// JSON-RPC's "invalid params".
pub const INVALID_PARAMS: i64 = -32602;
/// JSON-RPC's "internal error".
pub const INTERNAL_ERROR: i64 = -32603;
/// A server-defined code: the call carried no valid receipt (see [`super::receipt`]).
pub const RECEIPT_REQUIRED: i64 = -32001;

/// Why a message was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum JsonRpcError {
    /// The message is longer than [`MAX_MESSAGE_LEN`].
    #[error("message is {len} bytes, more than the maximum {max}")]
    TooLong {
        /// The message's length.
        len: usize,
        /// [`MAX_MESSAGE_LEN`].
        max: usize,
    },
    /// The message nests deeper than [`MAX_DEPTH`].
    #[error("message nests deeper than {max} at byte {offset}")]
    TooDeep {
        /// Where the limit was passed.
        offset: usize,
        /// [`MAX_DEPTH`].
        max: usize,
    },
    /// The message is not UTF-8.
    #[error("message is not utf-8 at byte {offset}")]
    NotUtf8 {
        /// The first invalid byte.
        offset: usize,
    },
    /// The message (or a member a view reads) is not JSON.
    #[error("not json: {reason}")]
    Syntax {
        /// serde_json's description (with line and column).
        reason: String,
    },
    /// The message is a JSON-RPC batch.
    #[error("json-rpc batches are not accepted")]
    Batch,
    /// The message is not a JSON object.
    #[error("message is not a json object")]
    NotObject,
    /// An object has a member name twice.
    #[error("member {key:?} appears twice in {within}")]
    DuplicateMember {
        /// The repeated name (at most 64 characters of it).
        key: String,
        /// Which object: `message`, `params`, `result`, `_meta`.
        within: &'static str,
    },
    /// A member is missing or has the wrong type or value.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// Which member (`jsonrpc`, `id`, `method`, `params.name`, …).
        field: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A view was asked of a message of another kind or method.
    #[error("expected {expected}, found {found}")]
    WrongMessage {
        /// What the view reads (`tools/call request`, …).
        expected: &'static str,
        /// What the message is.
        found: String,
    },
}

impl JsonRpcError {
    /// The JSON-RPC error code an answer to this refusal carries.
    pub fn code(&self) -> i64 {
        match self {
            JsonRpcError::NotUtf8 { .. } | JsonRpcError::Syntax { .. } => PARSE_ERROR,
            JsonRpcError::Invalid { field, .. } if field.starts_with("params") => INVALID_PARAMS,
            JsonRpcError::DuplicateMember { within, .. } if *within != "message" => INVALID_PARAMS,
            JsonRpcError::WrongMessage { .. } => INVALID_PARAMS,
            _ => INVALID_REQUEST,
        }
    }
}

/// What a message is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A request: `method` and `id`.
    Request,
    /// A notification: `method`, no `id`.
    Notification,
    /// A successful response: `id` and `result`.
    Response,
    /// An error response: `id` (possibly `null`) and `error`.
    ErrorResponse,
}

/// The members of a JSON object as borrowed raw values, in document order.
pub type RawMembers<'a> = Vec<(Cow<'a, str>, &'a RawValue)>;

/// A parsed JSON-RPC message: borrowed views over the bytes it was parsed from.
#[derive(Clone)]
pub struct Message<'a> {
    text: &'a str,
    members: RawMembers<'a>,
    kind: Kind,
    id: Option<&'a RawValue>,
    method: Option<String>,
    params: Option<&'a RawValue>,
    result: Option<&'a RawValue>,
    error: Option<&'a RawValue>,
}

impl fmt::Debug for Message<'_> {
    /// Kind, id and method only: params and results may carry secrets or personal data.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("kind", &self.kind)
            .field("id", &self.id.map(RawValue::get))
            .field("method", &self.method)
            .field("len", &self.text.len())
            .finish_non_exhaustive()
    }
}

/// A member name, borrowed when it has no escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

/// An object's members; the first repeated name, if any, set aside.
struct Members<'a> {
    members: RawMembers<'a>,
    duplicate: Option<String>,
}

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct MembersVisitor;
        impl<'de> Visitor<'de> for MembersVisitor {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a json object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members<'de>, A::Error> {
                let mut members: RawMembers<'de> = Vec::new();
                let mut seen: HashSet<Cow<'de, str>> = HashSet::new();
                let mut duplicate = None;
                while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
                    let value: &'de RawValue = map.next_value()?;
                    if !seen.insert(key.clone()) {
                        duplicate.get_or_insert_with(|| json::quote(&key));
                    }
                    members.push((key, value));
                }
                Ok(Members { members, duplicate })
            }
        }
        d.deserialize_map(MembersVisitor)
    }
}

/// The members of the JSON object `raw`, refusing repeated names.
pub fn object_members<'a>(
    raw: &'a RawValue,
    within: &'static str,
) -> Result<RawMembers<'a>, JsonRpcError> {
    let text = raw.get();
    if !text.starts_with('{') {
        return Err(JsonRpcError::Invalid {
            field: within,
            reason: "not an object",
        });
    }
    let parsed: Members<'a> = serde_json::from_str(text).map_err(|e| JsonRpcError::Syntax {
        reason: e.to_string(),
    })?;
    if let Some(key) = parsed.duplicate {
        return Err(JsonRpcError::DuplicateMember { key, within });
    }
    Ok(parsed.members)
}

fn find<'a>(members: &RawMembers<'a>, name: &str) -> Option<&'a RawValue> {
    members.iter().find(|(k, _)| k == name).map(|(_, v)| *v)
}

/// The offset of the first byte at which arrays and objects nest deeper than `max`, outside
/// strings; `None` if they never do.
fn too_deep_at(bytes: &[u8], max: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for (i, &b) in bytes.iter().enumerate() {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return Some(i);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    None
}

/// Reads a JSON string member.
fn string_of(raw: &RawValue, field: &'static str) -> Result<String, JsonRpcError> {
    if !raw.get().starts_with('"') {
        return Err(JsonRpcError::Invalid {
            field,
            reason: "not a string",
        });
    }
    serde_json::from_str::<String>(raw.get()).map_err(|_| JsonRpcError::Invalid {
        field,
        reason: "not a valid string",
    })
}

/// Parses one JSON-RPC 2.0 message.
pub fn parse_message(bytes: &[u8]) -> Result<Message<'_>, JsonRpcError> {
    if bytes.len() > MAX_MESSAGE_LEN {
        return Err(JsonRpcError::TooLong {
            len: bytes.len(),
            max: MAX_MESSAGE_LEN,
        });
    }
    let text = std::str::from_utf8(bytes).map_err(|e| JsonRpcError::NotUtf8 {
        offset: e.valid_up_to(),
    })?;
    if let Some(offset) = too_deep_at(bytes, MAX_DEPTH) {
        return Err(JsonRpcError::TooDeep {
            offset,
            max: MAX_DEPTH,
        });
    }
    match text
        .trim_start_matches([' ', '\t', '\n', '\r'])
        .as_bytes()
        .first()
    {
        Some(b'[') => {
            // Refuse a batch only if it is well-formed JSON; garbage is a parse error.
            return Err(match serde_json::from_str::<&RawValue>(text) {
                Ok(_) => JsonRpcError::Batch,
                Err(e) => JsonRpcError::Syntax {
                    reason: e.to_string(),
                },
            });
        }
        Some(b'{') => {}
        _ => {
            return Err(match serde_json::from_str::<&RawValue>(text) {
                Ok(_) => JsonRpcError::NotObject,
                Err(e) => JsonRpcError::Syntax {
                    reason: e.to_string(),
                },
            });
        }
    }
    let parsed: Members<'_> = serde_json::from_str(text).map_err(|e| JsonRpcError::Syntax {
        reason: e.to_string(),
    })?;
    if let Some(key) = parsed.duplicate {
        return Err(JsonRpcError::DuplicateMember {
            key,
            within: "message",
        });
    }
    let members = parsed.members;

    match find(&members, "jsonrpc") {
        Some(v) if v.get() == "\"2.0\"" => {}
        Some(v) if string_of(v, "jsonrpc").is_ok_and(|s| s == "2.0") => {}
        Some(_) => {
            return Err(JsonRpcError::Invalid {
                field: "jsonrpc",
                reason: "not \"2.0\"",
            });
        }
        None => {
            return Err(JsonRpcError::Invalid {
                field: "jsonrpc",
                reason: "missing",
            });
        }
    }
    let id = find(&members, "id");
    let method = find(&members, "method")
        .map(|m| {
            let s = string_of(m, "method")?;
            if s.is_empty() || s.len() > MAX_METHOD_LEN {
                return Err(JsonRpcError::Invalid {
                    field: "method",
                    reason: "empty or too long",
                });
            }
            Ok(s)
        })
        .transpose()?;
    let params = find(&members, "params");
    let result = find(&members, "result");
    let error = find(&members, "error");

    if let Some(p) = params
        && !(p.get().starts_with('{') || p.get().starts_with('['))
    {
        return Err(JsonRpcError::Invalid {
            field: "params",
            reason: "not an object or array",
        });
    }
    let kind = match (&method, id, result, error) {
        (Some(_), _, None, None) => {
            if id.is_some() {
                Kind::Request
            } else {
                Kind::Notification
            }
        }
        (Some(_), _, _, _) => {
            return Err(JsonRpcError::Invalid {
                field: "result",
                reason: "a request carries result or error",
            });
        }
        (None, Some(_), Some(_), None) => Kind::Response,
        (None, Some(_), None, Some(e)) => {
            if !e.get().starts_with('{') {
                return Err(JsonRpcError::Invalid {
                    field: "error",
                    reason: "not an object",
                });
            }
            Kind::ErrorResponse
        }
        (None, Some(_), Some(_), Some(_)) => {
            return Err(JsonRpcError::Invalid {
                field: "result",
                reason: "both result and error",
            });
        }
        (None, Some(_), None, None) => {
            return Err(JsonRpcError::Invalid {
                field: "result",
                reason: "a response has neither result nor error",
            });
        }
        (None, None, _, _) => {
            return Err(JsonRpcError::Invalid {
                field: "method",
                reason: "neither a method nor an id",
            });
        }
    };
    if let Some(raw) = id {
        let t = raw.get();
        let ok = match t.as_bytes().first() {
            Some(b'"') => string_of(raw, "id").is_ok(),
            Some(b'-' | b'0'..=b'9') => true,
            Some(b'n') => kind == Kind::ErrorResponse,
            _ => false,
        };
        if !ok {
            return Err(JsonRpcError::Invalid {
                field: "id",
                reason: "not a string or number",
            });
        }
        if t.len() > MAX_ID_LEN {
            return Err(JsonRpcError::Invalid {
                field: "id",
                reason: "too long",
            });
        }
    }
    Ok(Message {
        text,
        members,
        kind,
        id,
        method,
        params,
        result,
        error,
    })
}

/// One change to a message: replace `range` of its text with `with`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Splice {
    range: Range<usize>,
    with: String,
}

/// Where `inner` (a subslice of `outer`) starts in `outer`.
fn offset_in(outer: &str, inner: &str) -> Option<usize> {
    let start = (inner.as_ptr() as usize).checked_sub(outer.as_ptr() as usize)?;
    (start.checked_add(inner.len())? <= outer.len()).then_some(start)
}

impl<'a> Message<'a> {
    /// The message's bytes exactly as received: what the gateway forwards when it changes
    /// nothing.
    pub fn text(&self) -> &'a str {
        self.text
    }

    /// What the message is.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The `id` as written (a string with its quotes, a number in its spelling, or `null`).
    pub fn id(&self) -> Option<&'a RawValue> {
        self.id
    }

    /// The method of a request or notification.
    pub fn method(&self) -> Option<&str> {
        self.method.as_deref()
    }

    /// `params`, as written.
    pub fn params(&self) -> Option<&'a RawValue> {
        self.params
    }

    /// `result`, as written.
    pub fn result(&self) -> Option<&'a RawValue> {
        self.result
    }

    /// `error`, as written.
    pub fn error(&self) -> Option<&'a RawValue> {
        self.error
    }

    /// Every top-level member, in document order.
    pub fn members(&self) -> &RawMembers<'a> {
        &self.members
    }

    /// The byte range of `raw` (a value borrowed from this message) in [`Message::text`].
    pub fn span_of(&self, raw: &RawValue) -> Option<Range<usize>> {
        let start = offset_in(self.text, raw.get())?;
        Some(start..start + raw.get().len())
    }

    fn expect(&self, kind: Kind, method: &str, what: &'static str) -> Result<(), JsonRpcError> {
        let ok = self.kind == kind && (method.is_empty() || self.method.as_deref() == Some(method));
        if ok {
            Ok(())
        } else {
            Err(JsonRpcError::WrongMessage {
                expected: what,
                found: match &self.method {
                    Some(m) => format!("{:?} {}", self.kind, json::quote(m)),
                    None => format!("{:?}", self.kind),
                },
            })
        }
    }

    /// The params of a `tools/call` request.
    pub fn tools_call_params(&self) -> Result<ToolsCallParams<'a>, JsonRpcError> {
        self.expect(Kind::Request, "tools/call", "tools/call request")?;
        self.named_params()
    }

    /// The params of a `prompts/get` request: the prompt's `name` and its `arguments` (an
    /// object, if present), in the same view as a tool call's.
    pub fn prompts_get_params(&self) -> Result<ToolsCallParams<'a>, JsonRpcError> {
        self.expect(Kind::Request, "prompts/get", "prompts/get request")?;
        self.named_params()
    }

    /// The params of a `resources/read` request: the resource's `uri`.
    pub fn resources_read_params(&self) -> Result<ResourcesReadParams<'a>, JsonRpcError> {
        self.expect(Kind::Request, "resources/read", "resources/read request")?;
        let params = self.params.ok_or(JsonRpcError::Invalid {
            field: "params",
            reason: "missing",
        })?;
        let rest = object_members(params, "params")?;
        let uri_raw = find(&rest, "uri").ok_or(JsonRpcError::Invalid {
            field: "params.uri",
            reason: "missing",
        })?;
        let uri = string_of(uri_raw, "params.uri")?;
        if uri.is_empty() || uri.len() > MAX_URI_LEN {
            return Err(JsonRpcError::Invalid {
                field: "params.uri",
                reason: "empty or too long",
            });
        }
        let meta = find(&rest, "_meta");
        if let Some(m) = meta {
            object_members(m, "_meta")?;
        }
        let rest = rest
            .into_iter()
            .filter(|(k, _)| !matches!(k.as_ref(), "uri" | "_meta"))
            .collect();
        Ok(ResourcesReadParams { uri, meta, rest })
    }

    /// `name` and `arguments` of a request's params (a tool call or a prompt).
    fn named_params(&self) -> Result<ToolsCallParams<'a>, JsonRpcError> {
        let params = self.params.ok_or(JsonRpcError::Invalid {
            field: "params",
            reason: "missing",
        })?;
        let rest = object_members(params, "params")?;
        let name_raw = find(&rest, "name").ok_or(JsonRpcError::Invalid {
            field: "params.name",
            reason: "missing",
        })?;
        let name = string_of(name_raw, "params.name")?;
        if name.is_empty() || name.len() > MAX_TOOL_NAME_LEN {
            return Err(JsonRpcError::Invalid {
                field: "params.name",
                reason: "empty or too long",
            });
        }
        let arguments = find(&rest, "arguments");
        if let Some(a) = arguments
            && !a.get().starts_with('{')
        {
            return Err(JsonRpcError::Invalid {
                field: "params.arguments",
                reason: "not an object",
            });
        }
        let meta = find(&rest, "_meta");
        if let Some(m) = meta {
            object_members(m, "_meta")?;
        }
        let rest = rest
            .into_iter()
            .filter(|(k, _)| !matches!(k.as_ref(), "name" | "arguments" | "_meta"))
            .collect();
        Ok(ToolsCallParams {
            name,
            arguments,
            meta,
            rest,
        })
    }

    /// The params of a `tools/list` request (which may have none).
    pub fn tools_list_params(&self) -> Result<ToolsListParams<'a>, JsonRpcError> {
        self.expect(Kind::Request, "tools/list", "tools/list request")?;
        let Some(params) = self.params else {
            return Ok(ToolsListParams {
                cursor: None,
                rest: Vec::new(),
            });
        };
        let rest = object_members(params, "params")?;
        let cursor = find(&rest, "cursor")
            .map(|c| cursor_of(c, "params.cursor"))
            .transpose()?;
        let rest = rest.into_iter().filter(|(k, _)| k != "cursor").collect();
        Ok(ToolsListParams { cursor, rest })
    }

    /// The result of a response to `tools/list` (the caller knows which request it answers).
    pub fn tools_list_result(&self) -> Result<ToolsListResult<'a>, JsonRpcError> {
        let r = self.list_result(ListKind::Tools)?;
        Ok(ToolsListResult {
            tools: r.items,
            next_cursor: r.next_cursor,
            rest: r.rest,
        })
    }

    /// The result of a listing response of `kind`: its items (each an object, as written),
    /// the next cursor, and the other members.
    pub fn list_result(&self, kind: ListKind) -> Result<ListResult<'a>, JsonRpcError> {
        let member = kind.member();
        let field = kind.field();
        self.expect(Kind::Response, "", "response")?;
        let result = self.result.ok_or(JsonRpcError::Invalid {
            field: "result",
            reason: "missing",
        })?;
        let rest = object_members(result, "result")?;
        let items_raw = find(&rest, member).ok_or(JsonRpcError::Invalid {
            field,
            reason: "missing",
        })?;
        if !items_raw.get().starts_with('[') {
            return Err(JsonRpcError::Invalid {
                field,
                reason: "not an array",
            });
        }
        let items: Vec<&'a RawValue> =
            serde_json::from_str(items_raw.get()).map_err(|e| JsonRpcError::Syntax {
                reason: e.to_string(),
            })?;
        if items.iter().any(|t| !t.get().starts_with('{')) {
            return Err(JsonRpcError::Invalid {
                field,
                reason: "an element is not an object",
            });
        }
        let next_cursor = match find(&rest, "nextCursor") {
            Some(c) if c.get() == "null" => None,
            Some(c) => Some(cursor_of(c, "result.nextCursor")?),
            None => None,
        };
        let rest = rest
            .into_iter()
            .filter(|(k, _)| k != member && k != "nextCursor")
            .collect();
        Ok(ListResult {
            items,
            next_cursor,
            rest,
        })
    }

    fn apply(&self, mut splices: Vec<Splice>) -> String {
        splices.sort_by_key(|s| s.range.start);
        let mut out = String::with_capacity(
            self.text.len() + splices.iter().map(|s| s.with.len()).sum::<usize>(),
        );
        let mut at = 0;
        for s in splices {
            out.push_str(self.text.get(at..s.range.start).unwrap_or(""));
            out.push_str(&s.with);
            at = s.range.end.max(at);
        }
        out.push_str(self.text.get(at..).unwrap_or(""));
        out
    }

    /// A splice that inserts `"key":value` as the last member of the object `obj` (a value of
    /// this message, or the message itself when `None`).
    fn insert_member(
        &self,
        obj: Option<&RawValue>,
        empty: bool,
        key: &str,
        value: &str,
    ) -> Result<Splice, JsonRpcError> {
        let (start, text) = match obj {
            Some(raw) => (
                self.span_of(raw)
                    .map(|r| r.start)
                    .ok_or(JsonRpcError::Invalid {
                        field: "params",
                        reason: "not part of this message",
                    })?,
                raw.get(),
            ),
            None => {
                let trimmed = self.text.trim_end_matches([' ', '\t', '\n', '\r']);
                (0, trimmed)
            }
        };
        // The object's text ends with its closing brace.
        let close = start + text.len().saturating_sub(1);
        let mut with = String::new();
        if !empty {
            with.push(',');
        }
        json::write_string(&mut with, key);
        with.push(':');
        with.push_str(value);
        Ok(Splice {
            range: close..close,
            with,
        })
    }

    /// The message with `params._meta[key]` set to `value` (JSON text), creating `_meta` and
    /// `params` if absent; every other byte as received. Refused when `params` is an array or
    /// `_meta` is not an object.
    pub fn with_params_meta(&self, key: &str, value: &RawValue) -> Result<String, JsonRpcError> {
        let splice = match self.params {
            None => {
                let mut inner = String::from("{\"_meta\":{");
                json::write_string(&mut inner, key);
                inner.push(':');
                inner.push_str(value.get());
                inner.push_str("}}");
                self.insert_member(None, false, "params", &inner)?
            }
            Some(params) => {
                let members = object_members(params, "params")?;
                match find(&members, "_meta") {
                    None => {
                        let mut inner = String::from("{");
                        json::write_string(&mut inner, key);
                        inner.push(':');
                        inner.push_str(value.get());
                        inner.push('}');
                        self.insert_member(Some(params), members.is_empty(), "_meta", &inner)?
                    }
                    Some(meta) => {
                        let meta_members = object_members(meta, "_meta")?;
                        match find(&meta_members, key) {
                            Some(old) => Splice {
                                range: self.span_of(old).ok_or(JsonRpcError::Invalid {
                                    field: "params._meta",
                                    reason: "not part of this message",
                                })?,
                                with: value.get().to_owned(),
                            },
                            None => self.insert_member(
                                Some(meta),
                                meta_members.is_empty(),
                                key,
                                value.get(),
                            )?,
                        }
                    }
                }
            }
        };
        Ok(self.apply(vec![splice]))
    }

    /// The message with its `result.tools` array replaced by `tools` (each a tool object of
    /// this message, in the order given), every other byte as received.
    pub fn with_result_tools(&self, tools: &[&RawValue]) -> Result<String, JsonRpcError> {
        self.with_result_items(ListKind::Tools, tools)
    }

    /// This response with its listing of `kind` replaced by `items` (each written as given);
    /// every other byte unchanged.
    pub fn with_result_items(
        &self,
        kind: ListKind,
        tools: &[&RawValue],
    ) -> Result<String, JsonRpcError> {
        let result = self.result.ok_or(JsonRpcError::Invalid {
            field: "result",
            reason: "missing",
        })?;
        let members = object_members(result, "result")?;
        let old = find(&members, kind.member()).ok_or(JsonRpcError::Invalid {
            field: kind.field(),
            reason: "missing",
        })?;
        let range = self.span_of(old).ok_or(JsonRpcError::Invalid {
            field: kind.field(),
            reason: "not part of this message",
        })?;
        let mut with = String::from("[");
        for (i, t) in tools.iter().enumerate() {
            if i > 0 {
                with.push(',');
            }
            with.push_str(t.get());
        }
        with.push(']');
        Ok(self.apply(vec![Splice { range, with }]))
    }

    /// The message with the bytes of `raw` (a value of this message) replaced by `with`.
    pub fn with_replaced(&self, raw: &RawValue, with: &str) -> Result<String, JsonRpcError> {
        let range = self.span_of(raw).ok_or(JsonRpcError::Invalid {
            field: "params",
            reason: "not part of this message",
        })?;
        Ok(self.apply(vec![Splice {
            range,
            with: with.to_owned(),
        }]))
    }
}

fn cursor_of(raw: &RawValue, field: &'static str) -> Result<String, JsonRpcError> {
    let c = string_of(raw, field)?;
    if c.len() > MAX_CURSOR_LEN {
        return Err(JsonRpcError::Invalid {
            field,
            reason: "too long",
        });
    }
    Ok(c)
}

/// The params of a `tools/call` request.
#[derive(Clone)]
pub struct ToolsCallParams<'a> {
    /// The tool's name.
    pub name: String,
    /// `arguments` as written (an object), if present.
    pub arguments: Option<&'a RawValue>,
    /// `_meta` as written (an object), if present.
    pub meta: Option<&'a RawValue>,
    /// Every other member (`task`, vendor fields …), as written.
    pub rest: RawMembers<'a>,
}

impl fmt::Debug for ToolsCallParams<'_> {
    /// The tool name and the other members' names only: arguments may carry secrets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ToolsCallParams")
            .field("name", &self.name)
            .field("arguments_len", &self.arguments.map(|a| a.get().len()))
            .field(
                "rest",
                &self.rest.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// The params of a `tools/list` request.
#[derive(Clone, Debug)]
pub struct ToolsListParams<'a> {
    /// The pagination cursor, if any.
    pub cursor: Option<String>,
    /// Every other member, as written.
    pub rest: RawMembers<'a>,
}

/// The params of a `resources/read` request.
#[derive(Clone, Debug)]
pub struct ResourcesReadParams<'a> {
    /// The resource's URI.
    pub uri: String,
    /// `_meta` as written (an object), if present.
    pub meta: Option<&'a RawValue>,
    /// Every other member, as written.
    pub rest: RawMembers<'a>,
}

/// Which listing a response carries: the member its items are in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListKind {
    /// `tools/list`: `tools`.
    Tools,
    /// `resources/list`: `resources`.
    Resources,
    /// `resources/templates/list`: `resourceTemplates`.
    ResourceTemplates,
    /// `prompts/list`: `prompts`.
    Prompts,
}

impl ListKind {
    /// The result member holding the items.
    pub const fn member(self) -> &'static str {
        match self {
            ListKind::Tools => "tools",
            ListKind::Resources => "resources",
            ListKind::ResourceTemplates => "resourceTemplates",
            ListKind::Prompts => "prompts",
        }
    }

    /// The member's path, for errors.
    pub const fn field(self) -> &'static str {
        match self {
            ListKind::Tools => "result.tools",
            ListKind::Resources => "result.resources",
            ListKind::ResourceTemplates => "result.resourceTemplates",
            ListKind::Prompts => "result.prompts",
        }
    }

    /// The member of each item that names it for the policy: `name`, `uri` or `uriTemplate`.
    pub const fn key(self) -> &'static str {
        match self {
            ListKind::Tools | ListKind::Prompts => "name",
            ListKind::Resources => "uri",
            ListKind::ResourceTemplates => "uriTemplate",
        }
    }
}

/// The result of a listing response.
#[derive(Clone, Debug)]
pub struct ListResult<'a> {
    /// Each item object, as written.
    pub items: Vec<&'a RawValue>,
    /// The cursor of the next page, if any (`null` reads as none).
    pub next_cursor: Option<String>,
    /// Every other member, as written.
    pub rest: RawMembers<'a>,
}

/// The result of a `tools/list` response.
#[derive(Clone, Debug)]
pub struct ToolsListResult<'a> {
    /// Each tool object, as written.
    pub tools: Vec<&'a RawValue>,
    /// The cursor of the next page, if any (`null` reads as none).
    pub next_cursor: Option<String>,
    /// Every other member, as written.
    pub rest: RawMembers<'a>,
}

/// A JSON-RPC error response to the request with id `id` (`null` when it is not known).
pub fn error_response(id: Option<&RawValue>, code: i64, message: &str) -> String {
    let mut out = String::from("{\"jsonrpc\":\"2.0\",\"id\":");
    out.push_str(id.map_or("null", RawValue::get));
    out.push_str(",\"error\":{\"code\":");
    out.push_str(&code.to_string());
    out.push_str(",\"message\":");
    json::write_string(&mut out, message);
    out.push_str("}}");
    out
}

/// A JSON-RPC request (or a notification when `id` is `None`); `params` is JSON text.
pub fn request(id: Option<&RawValue>, method: &str, params: Option<&RawValue>) -> String {
    let mut out = String::from("{\"jsonrpc\":\"2.0\"");
    if let Some(id) = id {
        out.push_str(",\"id\":");
        out.push_str(id.get());
    }
    out.push_str(",\"method\":");
    json::write_string(&mut out, method);
    if let Some(p) = params {
        out.push_str(",\"params\":");
        out.push_str(p.get());
    }
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_owned()).unwrap()
    }

    #[test]
    fn forwards_unknown_fields_and_number_spellings_byte_for_byte() {
        let text = br#"{"jsonrpc":"2.0", "id": 1e3, "method":"tools/call","params":{"name":"pay","arguments":{"amount":1E3,"x":1.50},"task":{"ttl":6e4},"x-vendor":[1,2]},"future":true}"#;
        let m = parse_message(text).unwrap();
        assert_eq!(m.text().as_bytes(), text);
        assert_eq!(m.kind(), Kind::Request);
        assert_eq!(m.id().unwrap().get(), "1e3");
        let p = m.tools_call_params().unwrap();
        assert_eq!(p.name, "pay");
        assert_eq!(p.arguments.unwrap().get(), r#"{"amount":1E3,"x":1.50}"#);
        let rest: Vec<_> = p.rest.iter().map(|(k, v)| (k.as_ref(), v.get())).collect();
        assert_eq!(rest, [("task", r#"{"ttl":6e4}"#), ("x-vendor", "[1,2]")]);
    }

    #[test]
    fn refuses_batches_and_non_objects() {
        assert_eq!(
            parse_message(br#"[{"jsonrpc":"2.0","id":1,"method":"ping"}]"#).unwrap_err(),
            JsonRpcError::Batch
        );
        assert_eq!(parse_message(b" 1 ").unwrap_err(), JsonRpcError::NotObject);
        assert!(matches!(
            parse_message(b"[1,").unwrap_err(),
            JsonRpcError::Syntax { .. }
        ));
        assert!(matches!(
            parse_message(b"{\"jsonrpc\":\"2.0\"} x").unwrap_err(),
            JsonRpcError::Syntax { .. }
        ));
        assert_eq!(
            parse_message(b"\xff").unwrap_err(),
            JsonRpcError::NotUtf8 { offset: 0 }
        );
    }

    #[test]
    fn refuses_smuggled_duplicate_members() {
        // A second `method`, spelled with an escape, must not slip past a gateway that reads
        // the first while the server reads the last.
        let err = parse_message(
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/list","\u006dethod":"tools/call"}"#,
        )
        .unwrap_err();
        assert_eq!(
            err,
            JsonRpcError::DuplicateMember {
                key: "method".into(),
                within: "message"
            }
        );
        let m = parse_message(
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","name":"b"}}"#,
        )
        .unwrap();
        assert!(matches!(
            m.tools_call_params().unwrap_err(),
            JsonRpcError::DuplicateMember {
                within: "params",
                ..
            }
        ));
    }

    #[test]
    fn refuses_bad_envelopes() {
        for (text, field) in [
            (r#"{"id":1,"method":"a"}"#, "jsonrpc"),
            (r#"{"jsonrpc":"1.0","id":1,"method":"a"}"#, "jsonrpc"),
            (r#"{"jsonrpc":2.0,"id":1,"method":"a"}"#, "jsonrpc"),
            (r#"{"jsonrpc":"2.0","id":true,"method":"a"}"#, "id"),
            (r#"{"jsonrpc":"2.0","id":null,"method":"a"}"#, "id"),
            (r#"{"jsonrpc":"2.0","id":{},"method":"a"}"#, "id"),
            (r#"{"jsonrpc":"2.0","id":1,"method":7}"#, "method"),
            (r#"{"jsonrpc":"2.0","id":1,"method":""}"#, "method"),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"a","params":"x"}"#,
                "params",
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"result":1,"error":{}}"#,
                "result",
            ),
            (r#"{"jsonrpc":"2.0","id":1}"#, "result"),
            (r#"{"jsonrpc":"2.0"}"#, "method"),
            (r#"{"jsonrpc":"2.0","id":1,"error":3}"#, "error"),
        ] {
            match parse_message(text.as_bytes()) {
                Err(JsonRpcError::Invalid { field: f, .. }) => assert_eq!(f, field, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
        let null_id =
            parse_message(br#"{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"x"}}"#)
                .unwrap();
        assert_eq!(null_id.kind(), Kind::ErrorResponse);
        let long = format!(
            r#"{{"jsonrpc":"2.0","id":"{}","method":"a"}}"#,
            "x".repeat(300)
        );
        assert!(parse_message(long.as_bytes()).is_err());
    }

    #[test]
    fn refuses_oversized_and_deep_messages() {
        let big = vec![b' '; MAX_MESSAGE_LEN + 1];
        assert!(matches!(
            parse_message(&big).unwrap_err(),
            JsonRpcError::TooLong { .. }
        ));
        let deep = format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"a","params":{}{}}}"#,
            "[".repeat(MAX_DEPTH),
            "]".repeat(MAX_DEPTH)
        );
        assert!(matches!(
            parse_message(deep.as_bytes()).unwrap_err(),
            JsonRpcError::TooDeep { .. }
        ));
        // Brackets inside strings do not count.
        let fine = format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"a","params":{{"s":"{}\"["}}}}"#,
            "[".repeat(200)
        );
        parse_message(fine.as_bytes()).unwrap();
    }

    #[test]
    fn receipt_goes_into_meta_and_nothing_else_moves() {
        let value = raw(r#""tok.en.sig""#);
        for (input, expected) in [
            (
                r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"a","arguments":{"n":1e3}}}"#,
                r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"a","arguments":{"n":1e3},"_meta":{"io.attestplane/receipt":"tok.en.sig"}}}"#,
            ),
            (
                r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"a","_meta":{ }} }"#,
                r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"a","_meta":{ "io.attestplane/receipt":"tok.en.sig"}} }"#,
            ),
            (
                r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"_meta":{"progressToken":1,"io.attestplane/receipt":"forged"},"name":"a"}}"#,
                r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"_meta":{"progressToken":1,"io.attestplane/receipt":"tok.en.sig"},"name":"a"}}"#,
            ),
            (
                r#"{"jsonrpc":"2.0","id":7,"method":"ping"}"#,
                r#"{"jsonrpc":"2.0","id":7,"method":"ping","params":{"_meta":{"io.attestplane/receipt":"tok.en.sig"}}}"#,
            ),
            (
                r#"{"jsonrpc":"2.0","id":7,"method":"ping","params":{}}"#,
                r#"{"jsonrpc":"2.0","id":7,"method":"ping","params":{"_meta":{"io.attestplane/receipt":"tok.en.sig"}}}"#,
            ),
        ] {
            let m = parse_message(input.as_bytes()).unwrap();
            let out = m.with_params_meta(RECEIPT_META_KEY, &value).unwrap();
            assert_eq!(out, expected);
            parse_message(out.as_bytes()).unwrap();
        }
        let arr = parse_message(br#"{"jsonrpc":"2.0","id":7,"method":"x","params":[1]}"#).unwrap();
        assert!(arr.with_params_meta(RECEIPT_META_KEY, &value).is_err());
    }

    #[test]
    fn filtering_tools_keeps_the_rest_of_the_result() {
        let text = r#"{"jsonrpc":"2.0","id":"a","result":{"tools":[{"name":"a","x":1e3},{"name":"b"}, {"name":"c"}],"nextCursor":"n","future":{"k":[1.0]}}}"#;
        let m = parse_message(text.as_bytes()).unwrap();
        let r = m.tools_list_result().unwrap();
        assert_eq!(r.tools.len(), 3);
        assert_eq!(r.next_cursor.as_deref(), Some("n"));
        let kept = [r.tools[0], r.tools[2]];
        let out = m.with_result_tools(&kept).unwrap();
        assert_eq!(
            out,
            r#"{"jsonrpc":"2.0","id":"a","result":{"tools":[{"name":"a","x":1e3},{"name":"c"}],"nextCursor":"n","future":{"k":[1.0]}}}"#
        );
    }

    #[test]
    fn builds_error_responses_and_requests() {
        let id = raw("\"x\"");
        let e = error_response(Some(&id), RECEIPT_REQUIRED, "no \"receipt\"");
        let m = parse_message(e.as_bytes()).unwrap();
        assert_eq!(m.kind(), Kind::ErrorResponse);
        assert_eq!(
            e,
            r#"{"jsonrpc":"2.0","id":"x","error":{"code":-32001,"message":"no \"receipt\""}}"#
        );
        let params = raw(r#"{"cursor":"c"}"#);
        let r = request(Some(&raw("3")), "tools/list", Some(&params));
        let m = parse_message(r.as_bytes()).unwrap();
        assert_eq!(m.tools_list_params().unwrap().cursor.as_deref(), Some("c"));
    }

    #[test]
    fn debug_does_not_print_arguments() {
        let m = parse_message(
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","arguments":{"password":"hunter2"}}}"#,
        )
        .unwrap();
        assert!(!format!("{m:?}").contains("hunter2"));
        assert!(!format!("{:?}", m.tools_call_params().unwrap()).contains("hunter2"));
    }
}
