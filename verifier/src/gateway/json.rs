//! A small, strict JSON reader that keeps byte positions: the ground the other gateway modules
//! stand on when they must look inside a value (I-JSON checks, canonical JSON, PII scanning and
//! in-place redaction).
//!
//! [`parse`] turns text into a tree of [`Node`]s, each with the [`Span`] of its bytes in the
//! input, object members in document order with their keys decoded. It accepts exactly RFC 8259
//! JSON and refuses, with a typed [`JsonError`] that names the byte offset:
//!
//! - nesting deeper than [`MAX_DEPTH`], more than [`MAX_NODES`] values, more than
//!   [`MAX_JSON_LEN`] bytes (so work and memory are bounded by the input length);
//! - an object with the same member name twice (after unescaping: `"a"` and `"\u0061"` are the
//!   same name), which RFC 8259 leaves to the parser and serde_json resolves silently;
//! - a `\u` escape that leaves a lone UTF-16 surrogate (not a Unicode string).
//!
//! [`check_ijson`] adds RFC 7493's number rules on top: an integer literal beyond
//! ±(2^53 − 1) or a number whose magnitude overflows a double is refused, because two
//! implementations would not agree on its value (Rust rounds `9007199254740993` silently,
//! Python keeps it exact), and every hash the gateway signs is over canonical JSON of such
//! values.
//!
//! ## What this module does not do
//!
//! It does not build `serde_json` values, interpret numbers beyond classifying them, or write
//! JSON (the canonical writer is [`super::jcs`]). Envelope parsing, where nothing but a few
//! members is looked at, is [`super::jsonrpc`]'s job and does not build a tree.

use std::borrow::Cow;

use thiserror::Error;

/// The longest text [`parse`] accepts, in bytes.
pub const MAX_JSON_LEN: usize = 8 * 1024 * 1024;

/// The deepest nesting of arrays and objects accepted (the outermost value is depth 1).
pub const MAX_DEPTH: usize = 64;

/// The most values (scalars, arrays, objects; members count their value) one text may hold.
pub const MAX_NODES: usize = 1 << 20;

/// The longest member name or string quoted back in an error, in characters.
const MAX_QUOTED: usize = 64;

/// Byte offsets `[start, end)` of a value in the parsed text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Span {
    /// Offset of the value's first byte.
    pub start: usize,
    /// Offset just past its last byte.
    pub end: usize,
}

impl Span {
    /// The spanned text of `text`, or `""` if the span does not lie in it.
    pub fn of<'a>(&self, text: &'a str) -> &'a str {
        text.get(self.start..self.end).unwrap_or("")
    }
}

/// One JSON value with its position.
#[derive(Clone, Debug, PartialEq)]
pub struct Node<'a> {
    /// Where the value's bytes are in the input.
    pub span: Span,
    /// The value.
    pub value: Value<'a>,
}

/// A JSON value. Numbers keep their text; strings are decoded.
#[derive(Clone, Debug, PartialEq)]
pub enum Value<'a> {
    /// `null`
    Null,
    /// `true` or `false`
    Bool(bool),
    /// A number, exactly as written (`1e3` stays `1e3`).
    Number(&'a str),
    /// A string, unescaped.
    String(Cow<'a, str>),
    /// An array.
    Array(Vec<Node<'a>>),
    /// An object's members in document order (names are distinct).
    Object(Vec<Member<'a>>),
}

/// One member of an object.
#[derive(Clone, Debug, PartialEq)]
pub struct Member<'a> {
    /// The member name, unescaped.
    pub key: Cow<'a, str>,
    /// Where the name's quoted string is.
    pub key_span: Span,
    /// The member's value.
    pub value: Node<'a>,
}

impl<'a> Node<'a> {
    /// The member `key` of an object, if this is an object that has it.
    pub fn get(&self, key: &str) -> Option<&Node<'a>> {
        match &self.value {
            Value::Object(members) => members.iter().find(|m| m.key == key).map(|m| &m.value),
            _ => None,
        }
    }

    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
}

/// Why a text is not (accepted) JSON.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum JsonError {
    /// The text is longer than [`MAX_JSON_LEN`] (or the caller's own bound).
    #[error("json text is {len} bytes, more than the maximum {max}")]
    TooLong {
        /// The text's length.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// Arrays and objects nest deeper than [`MAX_DEPTH`].
    #[error("json nests deeper than {max} at byte {offset}")]
    TooDeep {
        /// Where the limit was passed.
        offset: usize,
        /// [`MAX_DEPTH`].
        max: usize,
    },
    /// The text holds more than [`MAX_NODES`] values.
    #[error("json holds more than {max} values")]
    TooManyValues {
        /// [`MAX_NODES`].
        max: usize,
    },
    /// The text is not JSON.
    #[error("json syntax error at byte {offset}: expected {expected}")]
    Syntax {
        /// Where the parser stopped.
        offset: usize,
        /// What it expected there.
        expected: &'static str,
    },
    /// An object names a member twice.
    #[error("duplicate member name {key:?} at byte {offset}")]
    DuplicateKey {
        /// The repeated name (at most 64 characters of it).
        key: String,
        /// Where the second occurrence starts.
        offset: usize,
    },
    /// A `\u` escape leaves a lone surrogate.
    #[error("lone utf-16 surrogate escape at byte {offset}")]
    LoneSurrogate {
        /// Where the escape starts.
        offset: usize,
    },
    /// An integer literal beyond ±(2^53 − 1) (RFC 7493 §2.2).
    #[error("integer at byte {offset} is beyond ±(2^53 - 1)")]
    IntegerOutOfRange {
        /// Where the number starts.
        offset: usize,
    },
    /// A number whose magnitude overflows an IEEE 754 double.
    #[error("number at byte {offset} overflows a double")]
    NumberOutOfRange {
        /// Where the number starts.
        offset: usize,
    },
}

/// Shortens `s` for an error message.
pub(crate) fn quote(s: &str) -> String {
    s.chars().take(MAX_QUOTED).collect()
}

/// Parses `text` as one JSON value (whitespace around it allowed, nothing else).
pub fn parse(text: &str) -> Result<Node<'_>, JsonError> {
    if text.len() > MAX_JSON_LEN {
        return Err(JsonError::TooLong {
            len: text.len(),
            max: MAX_JSON_LEN,
        });
    }
    let mut p = Parser {
        text,
        bytes: text.as_bytes(),
        pos: 0,
        nodes: 0,
    };
    p.skip_ws();
    let node = p.value(0)?;
    p.skip_ws();
    if p.pos != p.bytes.len() {
        return Err(JsonError::Syntax {
            offset: p.pos,
            expected: "end of input",
        });
    }
    Ok(node)
}

/// Parses `text` and checks it is I-JSON (RFC 7493): what [`parse`] checks (no duplicate
/// names, no lone surrogates) plus numbers that a double represents: integer literals within
/// ±(2^53 − 1), no number that overflows.
pub fn parse_ijson(text: &str) -> Result<Node<'_>, JsonError> {
    let node = parse(text)?;
    check_ijson(&node)?;
    Ok(node)
}

/// Checks the number rules of I-JSON on a parsed tree (see [`parse_ijson`]).
pub fn check_ijson(node: &Node<'_>) -> Result<(), JsonError> {
    let mut stack = vec![node];
    while let Some(n) = stack.pop() {
        match &n.value {
            Value::Number(raw) => check_number(raw, n.span.start)?,
            Value::Array(items) => stack.extend(items.iter()),
            Value::Object(members) => stack.extend(members.iter().map(|m| &m.value)),
            Value::Null | Value::Bool(_) | Value::String(_) => {}
        }
    }
    Ok(())
}

/// The largest integer magnitude every I-JSON implementation represents exactly.
const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

fn check_number(raw: &str, offset: usize) -> Result<(), JsonError> {
    let is_integer = !raw.bytes().any(|b| matches!(b, b'.' | b'e' | b'E'));
    if is_integer {
        let digits = raw.strip_prefix('-').unwrap_or(raw);
        // At most 16 digits can be ≤ 2^53 - 1 (9007199254740991 has 16).
        let ok = digits.len() <= 16 && digits.parse::<u64>().is_ok_and(|v| v <= MAX_SAFE_INTEGER);
        if !ok {
            return Err(JsonError::IntegerOutOfRange { offset });
        }
        return Ok(());
    }
    match raw.parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(()),
        _ => Err(JsonError::NumberOutOfRange { offset }),
    }
}

struct Parser<'a> {
    text: &'a str,
    bytes: &'a [u8],
    pos: usize,
    nodes: usize,
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.pos += 1;
        }
    }

    fn syntax(&self, expected: &'static str) -> JsonError {
        JsonError::Syntax {
            offset: self.pos,
            expected,
        }
    }

    fn literal(&mut self, word: &'static str) -> Result<(), JsonError> {
        let end = self.pos.saturating_add(word.len());
        if self.bytes.get(self.pos..end) == Some(word.as_bytes()) {
            self.pos = end;
            Ok(())
        } else {
            Err(self.syntax(word))
        }
    }

    fn value(&mut self, depth: usize) -> Result<Node<'a>, JsonError> {
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            return Err(JsonError::TooManyValues { max: MAX_NODES });
        }
        let start = self.pos;
        let value = match self.peek() {
            Some(b'{') => self.object(depth + 1)?,
            Some(b'[') => self.array(depth + 1)?,
            Some(b'"') => Value::String(self.string()?),
            Some(b't') => {
                self.literal("true")?;
                Value::Bool(true)
            }
            Some(b'f') => {
                self.literal("false")?;
                Value::Bool(false)
            }
            Some(b'n') => {
                self.literal("null")?;
                Value::Null
            }
            Some(b'-' | b'0'..=b'9') => Value::Number(self.number()?),
            _ => return Err(self.syntax("a value")),
        };
        Ok(Node {
            span: Span {
                start,
                end: self.pos,
            },
            value,
        })
    }

    fn enter(&self, depth: usize) -> Result<(), JsonError> {
        if depth > MAX_DEPTH {
            return Err(JsonError::TooDeep {
                offset: self.pos,
                max: MAX_DEPTH,
            });
        }
        Ok(())
    }

    fn array(&mut self, depth: usize) -> Result<Value<'a>, JsonError> {
        self.enter(depth)?;
        self.pos += 1; // '['
        let mut items = Vec::new();
        self.skip_ws();
        if self.peek() == Some(b']') {
            self.pos += 1;
            return Ok(Value::Array(items));
        }
        loop {
            self.skip_ws();
            items.push(self.value(depth)?);
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(Value::Array(items));
                }
                _ => return Err(self.syntax("',' or ']'")),
            }
        }
    }

    fn object(&mut self, depth: usize) -> Result<Value<'a>, JsonError> {
        self.enter(depth)?;
        self.pos += 1; // '{'
        let mut members: Vec<Member<'a>> = Vec::new();
        self.skip_ws();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(Value::Object(members));
        }
        // Names seen so far; a linear scan is quadratic, so hash once objects grow.
        let mut seen: Option<std::collections::HashSet<Cow<'a, str>>> = None;
        loop {
            self.skip_ws();
            if self.peek() != Some(b'"') {
                return Err(self.syntax("a member name"));
            }
            let key_start = self.pos;
            let key = self.string()?;
            let key_span = Span {
                start: key_start,
                end: self.pos,
            };
            let duplicate = match &mut seen {
                Some(set) => !set.insert(key.clone()),
                None => {
                    let dup = members.iter().any(|m| m.key == key);
                    if members.len() >= 16 {
                        let mut set: std::collections::HashSet<Cow<'a, str>> =
                            members.iter().map(|m| m.key.clone()).collect();
                        set.insert(key.clone());
                        seen = Some(set);
                    }
                    dup
                }
            };
            if duplicate {
                return Err(JsonError::DuplicateKey {
                    key: quote(&key),
                    offset: key_start,
                });
            }
            self.skip_ws();
            if self.peek() != Some(b':') {
                return Err(self.syntax("':'"));
            }
            self.pos += 1;
            self.skip_ws();
            let value = self.value(depth)?;
            members.push(Member {
                key,
                key_span,
                value,
            });
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(Value::Object(members));
                }
                _ => return Err(self.syntax("',' or '}'")),
            }
        }
    }

    fn number(&mut self) -> Result<&'a str, JsonError> {
        let start = self.pos;
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        match self.peek() {
            Some(b'0') => self.pos += 1,
            Some(b'1'..=b'9') => self.digits(),
            _ => return Err(self.syntax("a digit")),
        }
        if self.peek() == Some(b'.') {
            self.pos += 1;
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(self.syntax("a digit after '.'"));
            }
            self.digits();
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.pos += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.pos += 1;
            }
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(self.syntax("a digit in the exponent"));
            }
            self.digits();
        }
        Ok(self.text.get(start..self.pos).unwrap_or(""))
    }

    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.pos += 1;
        }
    }

    fn hex4(&mut self) -> Result<u32, JsonError> {
        let end = self.pos.saturating_add(4);
        let digits = self
            .text
            .get(self.pos..end)
            .filter(|d| d.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| self.syntax("four hex digits"))?;
        let v = u32::from_str_radix(digits, 16).map_err(|_| self.syntax("four hex digits"))?;
        self.pos = end;
        Ok(v)
    }

    /// A string at `self.pos` (which holds `"`), unescaped.
    fn string(&mut self) -> Result<Cow<'a, str>, JsonError> {
        self.pos += 1;
        let start = self.pos;
        // Fast path: no escapes.
        loop {
            match self.peek() {
                None => return Err(self.syntax("'\"'")),
                Some(b'"') => {
                    let s = self.text.get(start..self.pos).unwrap_or("");
                    self.pos += 1;
                    return Ok(Cow::Borrowed(s));
                }
                Some(b'\\') => break,
                Some(0x00..=0x1f) => return Err(self.syntax("no control character in a string")),
                Some(_) => self.pos += 1,
            }
        }
        let mut out = String::from(self.text.get(start..self.pos).unwrap_or(""));
        loop {
            let run = self.pos;
            while let Some(b) = self.peek() {
                if b == b'"' || b == b'\\' || b < 0x20 {
                    break;
                }
                self.pos += 1;
            }
            out.push_str(self.text.get(run..self.pos).unwrap_or(""));
            match self.peek() {
                None => return Err(self.syntax("'\"'")),
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(Cow::Owned(out));
                }
                Some(b'\\') => {
                    let escape_at = self.pos;
                    self.pos += 1;
                    let c = match self.peek() {
                        Some(b'"') => '"',
                        Some(b'\\') => '\\',
                        Some(b'/') => '/',
                        Some(b'b') => '\u{8}',
                        Some(b'f') => '\u{c}',
                        Some(b'n') => '\n',
                        Some(b'r') => '\r',
                        Some(b't') => '\t',
                        Some(b'u') => {
                            self.pos += 1;
                            let hi = self.hex4()?;
                            let code = if (0xD800..0xDC00).contains(&hi) {
                                // A high surrogate must be followed by `\u` and a low one.
                                if self.bytes.get(self.pos..self.pos.saturating_add(2))
                                    != Some(b"\\u".as_slice())
                                {
                                    return Err(JsonError::LoneSurrogate { offset: escape_at });
                                }
                                self.pos += 2;
                                let lo = self.hex4()?;
                                if !(0xDC00..0xE000).contains(&lo) {
                                    return Err(JsonError::LoneSurrogate { offset: escape_at });
                                }
                                0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
                            } else if (0xDC00..0xE000).contains(&hi) {
                                return Err(JsonError::LoneSurrogate { offset: escape_at });
                            } else {
                                hi
                            };
                            let c = char::from_u32(code)
                                .ok_or(JsonError::LoneSurrogate { offset: escape_at })?;
                            out.push(c);
                            continue;
                        }
                        _ => return Err(self.syntax("an escape character")),
                    };
                    self.pos += 1;
                    out.push(c);
                }
                Some(_) => return Err(self.syntax("no control character in a string")),
            }
        }
    }
}

/// Writes `s` as a JSON string the way RFC 8785 does (and the way the gateway writes every
/// string it changes): `"` and `\` escaped, control characters as `\b \t \n \f \r` or
/// `\u00xx`, everything else as UTF-8.
pub fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\u{c}' => out.push_str("\\f"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 => {
                out.push_str(&format!("\\u{:04x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_with_spans_and_keeps_number_text() {
        let text = r#" {"a": [1e3, -0.5, true, null], "b\u0021": "x\n"} "#;
        let n = parse(text).unwrap();
        let a = n.get("a").unwrap();
        assert_eq!(a.span.of(text), "[1e3, -0.5, true, null]");
        let Value::Array(items) = &a.value else {
            panic!()
        };
        assert_eq!(items[0].value, Value::Number("1e3"));
        assert_eq!(n.get("b!").unwrap().as_str(), Some("x\n"));
    }

    #[test]
    fn rejects_duplicate_names_even_when_escaped() {
        let err = parse(r#"{"a":1,"\u0061":2}"#).unwrap_err();
        assert_eq!(
            err,
            JsonError::DuplicateKey {
                key: "a".into(),
                offset: 7
            }
        );
        // Past the linear-scan threshold too.
        let mut text = String::from("{");
        for i in 0..40 {
            text.push_str(&format!("\"k{i}\":0,"));
        }
        text.push_str("\"k3\":1}");
        assert!(matches!(parse(&text), Err(JsonError::DuplicateKey { .. })));
    }

    #[test]
    fn rejects_lone_surrogates() {
        for text in [
            r#""\ud800""#,
            r#""\udc00""#,
            r#""\ud800x""#,
            r#""\ud800\u0041""#,
        ] {
            assert!(
                matches!(parse(text), Err(JsonError::LoneSurrogate { .. })),
                "{text}"
            );
        }
        assert_eq!(
            parse(r#""\ud83d\ude00""#).unwrap().as_str(),
            Some("\u{1F600}")
        );
    }

    #[test]
    fn rejects_deep_nesting_without_recursing_far() {
        let deep = "[".repeat(MAX_DEPTH + 1) + &"]".repeat(MAX_DEPTH + 1);
        assert!(matches!(parse(&deep), Err(JsonError::TooDeep { .. })));
        let ok = "[".repeat(MAX_DEPTH) + &"]".repeat(MAX_DEPTH);
        assert!(parse(&ok).is_ok());
        // A million opening brackets stop at the limit.
        assert!(matches!(
            parse(&"[".repeat(1_000_000)),
            Err(JsonError::TooDeep { .. })
        ));
    }

    #[test]
    fn rejects_non_json() {
        for text in [
            "",
            "{",
            "[1,]",
            "{\"a\"}",
            "01",
            "1.",
            "-",
            "1e",
            "\"\u{1}\"",
            "tru",
            "{} {}",
            "\"\\x\"",
            "NaN",
            "'a'",
        ] {
            assert!(
                matches!(parse(text), Err(JsonError::Syntax { .. })),
                "{text:?}: {:?}",
                parse(text)
            );
        }
    }

    #[test]
    fn ijson_refuses_unsafe_integers_and_overflowing_numbers() {
        assert!(parse_ijson("[9007199254740991, -9007199254740991, 0, -0, 1e400000000]").is_err());
        assert!(parse_ijson("[9007199254740991, -9007199254740991, 0, -0, 1.5e300]").is_ok());
        for (text, bad) in [
            ("9007199254740992", "int"),
            ("-9007199254740992", "int"),
            ("123456789012345678901234567890", "int"),
            ("1e309", "float"),
            ("-1e309", "float"),
        ] {
            let err = parse_ijson(text).unwrap_err();
            match bad {
                "int" => assert_eq!(err, JsonError::IntegerOutOfRange { offset: 0 }, "{text}"),
                _ => assert_eq!(err, JsonError::NumberOutOfRange { offset: 0 }, "{text}"),
            }
        }
        // Nested, with the offset of the culprit.
        assert_eq!(
            parse_ijson(r#"{"a":{"b":[1,18446744073709551616]}}"#).unwrap_err(),
            JsonError::IntegerOutOfRange { offset: 13 }
        );
    }

    #[test]
    fn write_string_escapes_like_rfc8785() {
        let mut out = String::new();
        write_string(&mut out, "a\"\\\u{8}\t\n\u{c}\r\u{1f}\u{7f}é/");
        assert_eq!(out, "\"a\\\"\\\\\\b\\t\\n\\f\\r\\u001f\u{7f}é/\"");
    }
}
