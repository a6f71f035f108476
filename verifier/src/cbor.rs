//! Deterministic CBOR (RFC 8949 §4.2.1, "core deterministic encoding").
//!
//! Every byte string Attestplane signs or hashes is encoded here: map keys sorted by their
//! encoded bytes, integers and lengths in their shortest form, definite lengths only, no floats
//! and no tags inside signed payloads. Decoding is strict in the other direction: a payload is
//! accepted only if re-encoding what was decoded gives back exactly the input bytes, so every
//! accepted value has one and only one encoding. That is what makes "the hash of an entry" a
//! well-defined thing.
//!
//! This module does not know any Attestplane type; [`crate::entry`] and friends build
//! [`Value`]s and read them back with the small accessors below.

use std::io::Cursor;

use ciborium::value::{Integer, Value};
use thiserror::Error;

/// The largest signed payload accepted anywhere (a policy set is the largest thing we sign).
pub const MAX_PAYLOAD_LEN: usize = 1024 * 1024;

/// Nesting depth allowed in a decoded payload.
pub const MAX_DEPTH: usize = 16;

/// Why a CBOR payload was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum CborError {
    /// The payload is longer than [`MAX_PAYLOAD_LEN`].
    #[error("payload of {len} bytes exceeds the limit of {max}")]
    TooLong {
        /// Length of the input.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The bytes are not well-formed CBOR.
    #[error("malformed cbor: {reason}")]
    Malformed {
        /// What the decoder reported.
        reason: String,
    },
    /// Bytes follow the single top-level item.
    #[error("{count} trailing bytes after the cbor item")]
    TrailingBytes {
        /// How many bytes follow.
        count: usize,
    },
    /// The item decodes but is not in deterministic form (unsorted or duplicate keys,
    /// non-shortest integers, indefinite lengths, floats or tags).
    #[error("cbor is not in deterministic encoding")]
    NotDeterministic,
    /// A map holds the same key twice.
    #[error("duplicate map key")]
    DuplicateKey,
    /// The item nests deeper than [`MAX_DEPTH`], or holds a float or a tag.
    #[error("unsupported cbor item: {what}")]
    Unsupported {
        /// What was found.
        what: &'static str,
    },
}

/// Encodes `value` deterministically. Map keys are sorted by their encoded bytes; duplicate
/// keys, floats and tags are refused because they have no place in a signed payload.
pub fn encode(value: &Value) -> Result<Vec<u8>, CborError> {
    let canonical = canonicalize(value, 0)?;
    let mut out = Vec::new();
    ciborium::ser::into_writer(&canonical, &mut out).map_err(|e| CborError::Malformed {
        reason: e.to_string(),
    })?;
    Ok(out)
}

/// Decodes one CBOR item that must make up all of `bytes` and be in deterministic form.
///
/// One pass over the bytes when they are deterministic CBOR of the kinds signed payloads use
/// (see [`decode_one_pass`]); anything else gets the verdict, and the precise error, of
/// [`decode_reference`]. Property tests hold the two to the same answers.
pub fn decode(bytes: &[u8]) -> Result<Value, CborError> {
    match decode_one_pass(bytes) {
        Some(value) => Ok(value),
        None => decode_reference(bytes),
    }
}

/// The reference decoder: lenient decoding, then re-encoding, which must give back exactly
/// `bytes`. Two allocating passes; it names what is wrong with a refused input.
pub fn decode_reference(bytes: &[u8]) -> Result<Value, CborError> {
    let value = decode_lenient(bytes)?;
    let again = encode(&value)?;
    if again != bytes {
        return Err(CborError::NotDeterministic);
    }
    Ok(value)
}

/// Decodes one CBOR item that must make up all of `bytes`, in any valid encoding.
pub fn decode_lenient(bytes: &[u8]) -> Result<Value, CborError> {
    if bytes.len() > MAX_PAYLOAD_LEN {
        return Err(CborError::TooLong {
            len: bytes.len(),
            max: MAX_PAYLOAD_LEN,
        });
    }
    let mut cursor = Cursor::new(bytes);
    let value: Value = ciborium::de::from_reader_with_recursion_limit(&mut cursor, MAX_DEPTH)
        .map_err(|e| CborError::Malformed {
            reason: e.to_string(),
        })?;
    let used = usize::try_from(cursor.position()).unwrap_or(usize::MAX);
    let count = bytes.len().saturating_sub(used);
    if count != 0 {
        return Err(CborError::TrailingBytes { count });
    }
    Ok(value)
}

/// Nesting the one-pass decoder follows (deeper input goes to the reference decoder).
const ONE_PASS_MAX_DEPTH: usize = 8;

/// Most array or map items the one-pass reader reserves room for before reading them (a count
/// is bounded only by the bytes left, and each item is much larger in memory than on the wire).
const PREALLOCATE_ITEMS: usize = 64;

/// Decodes `bytes` in one pass if they are exactly one item in deterministic encoding: heads
/// in shortest form, definite lengths, map keys in strictly increasing order of their encoded
/// bytes, valid UTF-8 text, only integers, byte and text strings, arrays, maps, booleans and
/// null, nesting at most `ONE_PASS_MAX_DEPTH`, nothing after the item. `None` for anything
/// else: it accepts a subset of what [`decode_reference`] accepts, with the same value.
pub fn decode_one_pass(bytes: &[u8]) -> Option<Value> {
    if bytes.len() > MAX_PAYLOAD_LEN {
        return None;
    }
    let mut r = OnePass { bytes, pos: 0 };
    let value = r.item(0)?;
    (r.pos == bytes.len()).then_some(value)
}

/// A forward-only reader of deterministic CBOR, for a decoder of a fixed layout (the entry
/// envelope) that reads its known items itself and hands the rest to [`OnePass::rest_item`].
/// Every method answers `None` when the bytes are not exactly what it reads in deterministic
/// form, and the caller then falls back to [`decode`]: the reader only ever accepts what
/// [`decode_one_pass`] accepts, with the same values.
#[derive(Clone)]
pub(crate) struct OnePass<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> OnePass<'a> {
    /// A reader at the start of `bytes`, if they are not longer than a payload may be.
    pub(crate) fn start(bytes: &'a [u8]) -> Option<Self> {
        (bytes.len() <= MAX_PAYLOAD_LEN).then_some(Self { bytes, pos: 0 })
    }

    /// Exactly the bytes `want`.
    pub(crate) fn expect(&mut self, want: &[u8]) -> Option<()> {
        (self.take(want.len())? == want).then_some(())
    }

    /// An unsigned integer, in shortest form.
    pub(crate) fn uint(&mut self) -> Option<u64> {
        match self.head()? {
            (0, arg) => Some(arg),
            _ => None,
        }
    }

    /// A byte string of exactly `N` bytes.
    pub(crate) fn bytes_n<const N: usize>(&mut self) -> Option<[u8; N]> {
        match self.head()? {
            (2, len) if len == N as u64 => self.take(N)?.try_into().ok(),
            _ => None,
        }
    }

    /// Whether every byte has been read.
    pub(crate) fn at_end(&self) -> bool {
        self.pos == self.bytes.len()
    }

    /// The one item left, at nesting `depth`, which must end the input.
    pub(crate) fn rest_item(mut self, depth: usize) -> Option<Value> {
        let value = self.item(depth)?;
        (self.pos == self.bytes.len()).then_some(value)
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let taken = self.bytes.get(self.pos..end)?;
        self.pos = end;
        Some(taken)
    }

    /// A head in shortest form with a definite argument: (major type, argument).
    fn head(&mut self) -> Option<(u8, u64)> {
        let initial = *self.take(1)?.first()?;
        let (major, info) = (initial >> 5, initial & 0x1f);
        let (width, min) = match info {
            0..=23 => return Some((major, u64::from(info))),
            24 => (1, 24),
            25 => (2, 0x100),
            26 => (4, 0x1_0000),
            27 => (8, 0x1_0000_0000),
            _ => return None,
        };
        let arg = self
            .take(width)?
            .iter()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
        (arg >= min).then_some((major, arg))
    }

    /// A length that cannot exceed what is left (each element takes at least one byte).
    fn count(&self, n: u64) -> Option<usize> {
        let n = usize::try_from(n).ok()?;
        (n <= self.bytes.len().saturating_sub(self.pos)).then_some(n)
    }

    fn item(&mut self, depth: usize) -> Option<Value> {
        if depth > ONE_PASS_MAX_DEPTH {
            return None;
        }
        let (major, arg) = self.head()?;
        Some(match major {
            0 => Value::Integer(Integer::from(arg)),
            1 => Value::Integer(Integer::try_from(-1i128 - i128::from(arg)).ok()?),
            2 => Value::Bytes(self.take(usize::try_from(arg).ok()?)?.to_vec()),
            3 => {
                let raw = self.take(usize::try_from(arg).ok()?)?;
                Value::Text(std::str::from_utf8(raw).ok()?.to_owned())
            }
            4 => {
                let n = self.count(arg)?;
                // The count is bounded only by the bytes left; reserve little up front.
                let mut items = Vec::with_capacity(n.min(PREALLOCATE_ITEMS));
                for _ in 0..n {
                    items.push(self.item(depth + 1)?);
                }
                Value::Array(items)
            }
            5 => {
                let n = self.count(arg)?;
                let mut entries = Vec::with_capacity(n.min(PREALLOCATE_ITEMS));
                let mut previous_key: Option<&[u8]> = None;
                for _ in 0..n {
                    let start = self.pos;
                    let key = self.item(depth + 1)?;
                    let encoded = self.bytes.get(start..self.pos)?;
                    if previous_key.is_some_and(|p| p >= encoded) {
                        return None;
                    }
                    previous_key = Some(encoded);
                    entries.push((key, self.item(depth + 1)?));
                }
                Value::Map(entries)
            }
            7 => match arg {
                20 => Value::Bool(false),
                21 => Value::Bool(true),
                22 => Value::Null,
                _ => return None,
            },
            // Tags (6) have no place in a signed payload.
            _ => return None,
        })
    }
}

fn canonicalize(value: &Value, depth: usize) -> Result<Value, CborError> {
    if depth > MAX_DEPTH {
        return Err(CborError::Unsupported {
            what: "nesting too deep",
        });
    }
    Ok(match value {
        Value::Integer(_) | Value::Bytes(_) | Value::Text(_) | Value::Bool(_) | Value::Null => {
            value.clone()
        }
        Value::Float(_) => return Err(CborError::Unsupported { what: "float" }),
        Value::Tag(..) => return Err(CborError::Unsupported { what: "tag" }),
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|v| canonicalize(v, depth + 1))
                .collect::<Result<_, _>>()?,
        ),
        Value::Map(entries) => {
            let mut keyed = Vec::with_capacity(entries.len());
            for (k, v) in entries {
                let k = canonicalize(k, depth + 1)?;
                let mut key_bytes = Vec::new();
                ciborium::ser::into_writer(&k, &mut key_bytes).map_err(|e| {
                    CborError::Malformed {
                        reason: e.to_string(),
                    }
                })?;
                keyed.push((key_bytes, k, canonicalize(v, depth + 1)?));
            }
            keyed.sort_by(|a, b| a.0.cmp(&b.0));
            if keyed.windows(2).any(|w| matches!(w, [a, b] if a.0 == b.0)) {
                return Err(CborError::DuplicateKey);
            }
            Value::Map(keyed.into_iter().map(|(_, k, v)| (k, v)).collect())
        }
        _ => {
            return Err(CborError::Unsupported {
                what: "unknown item",
            });
        }
    })
}

/// Length in bytes of the first complete CBOR item in `bytes`, without decoding it: splits an
/// RFC 8742 CBOR sequence (an exported log) into its items. Work is bounded by the input
/// length and nesting by [`MAX_DEPTH`].
pub fn item_len(bytes: &[u8]) -> Result<usize, CborError> {
    skip_item(bytes, 0, 0)
}

/// Why bytes are not an RFC 8742 CBOR sequence: which item, where it starts, and what is
/// wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("item {index} at byte {offset}: {source}")]
pub struct SequenceError {
    /// The item's position in the sequence, from 0.
    pub index: usize,
    /// Its first byte's offset in the input.
    pub offset: usize,
    /// What is wrong with it (a truncated last item included).
    #[source]
    pub source: CborError,
}

/// Splits an RFC 8742 CBOR sequence (an exported log) into its top-level items, in order,
/// without decoding them. The one splitter of the project: the auditor's CLI, the operator's
/// CLI and the tests use it.
pub fn split_sequence(bytes: &[u8]) -> Result<Vec<&[u8]>, SequenceError> {
    let mut items = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let offset = bytes.len() - rest.len();
        let error = |source| SequenceError {
            index: items.len(),
            offset,
            source,
        };
        let len = item_len(rest).map_err(error)?;
        let (item, tail) = rest
            .split_at_checked(len)
            .ok_or_else(|| error(truncated()))?;
        items.push(item);
        rest = tail;
    }
    Ok(items)
}

fn truncated() -> CborError {
    CborError::Malformed {
        reason: "truncated item".into(),
    }
}

/// Reads an item head at `pos`: (major type, argument or None for indefinite, next position).
fn read_head(bytes: &[u8], pos: usize) -> Result<(u8, Option<u64>, usize), CborError> {
    let initial = *bytes.get(pos).ok_or_else(truncated)?;
    let major = initial >> 5;
    let info = initial & 0x1f;
    let next = pos + 1;
    let width = match info {
        0..=23 => return Ok((major, Some(u64::from(info)), next)),
        24 => 1,
        25 => 2,
        26 => 4,
        27 => 8,
        31 if matches!(major, 2..=5 | 7) => return Ok((major, None, next)),
        _ => {
            return Err(CborError::Malformed {
                reason: format!("reserved additional information {info}"),
            });
        }
    };
    let end = next.checked_add(width).ok_or_else(truncated)?;
    let arg = bytes.get(next..end).ok_or_else(truncated)?;
    let value = arg.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
    Ok((major, Some(value), end))
}

fn skip_item(bytes: &[u8], pos: usize, depth: usize) -> Result<usize, CborError> {
    if depth > MAX_DEPTH {
        return Err(CborError::Unsupported {
            what: "nesting too deep",
        });
    }
    let (major, arg, mut pos) = read_head(bytes, pos)?;
    let skip_bytes = |pos: usize, len: u64| -> Result<usize, CborError> {
        let len = usize::try_from(len).map_err(|_| truncated())?;
        let end = pos.checked_add(len).ok_or_else(truncated)?;
        if end > bytes.len() {
            return Err(truncated());
        }
        Ok(end)
    };
    match (major, arg) {
        (0 | 1 | 7, Some(_)) => Ok(pos),
        (2 | 3, Some(len)) => skip_bytes(pos, len),
        (4 | 5, Some(n)) => {
            let items = if major == 5 {
                n.checked_mul(2).ok_or_else(truncated)?
            } else {
                n
            };
            for _ in 0..items {
                pos = skip_item(bytes, pos, depth + 1)?;
            }
            Ok(pos)
        }
        (6, Some(_)) => skip_item(bytes, pos, depth + 1),
        (2..=5, None) => loop {
            if bytes.get(pos) == Some(&0xff) {
                return Ok(pos + 1);
            }
            pos = skip_item(bytes, pos, depth + 1)?;
        },
        _ => Err(CborError::Malformed {
            reason: "unexpected break".into(),
        }),
    }
}

/// A payload map that does not have the expected shape.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ShapeError {
    /// A field is missing or has the wrong type.
    #[error("field {field}: expected {expected}")]
    Field {
        /// The field.
        field: &'static str,
        /// What it should have been.
        expected: &'static str,
    },
    /// A map holds a key this version does not define.
    #[error("unknown field {key:?} in {within}")]
    UnknownField {
        /// The key.
        key: String,
        /// The map it was found in.
        within: &'static str,
    },
}

/// Strict reader over a text-keyed map: every field must be taken exactly once, and
/// [`Fields::finish`] refuses any left over.
pub(crate) struct Fields {
    within: &'static str,
    /// The map's members, every key text (checked by [`Fields::new`]).
    fields: Vec<(Value, Value)>,
}

fn field_err(field: &'static str, expected: &'static str) -> ShapeError {
    ShapeError::Field { field, expected }
}

impl Fields {
    pub(crate) fn new(value: Value, within: &'static str) -> Result<Self, ShapeError> {
        // The members are kept as decoded (no second list): only their keys are checked.
        match value {
            Value::Map(fields) if fields.iter().all(|(k, _)| matches!(k, Value::Text(_))) => {
                Ok(Self { within, fields })
            }
            _ => Err(field_err(within, "map with text keys")),
        }
    }

    pub(crate) fn take(&mut self, field: &'static str) -> Result<Value, ShapeError> {
        let pos = self
            .fields
            .iter()
            .position(|(k, _)| matches!(k, Value::Text(k) if k == field))
            .ok_or(field_err(field, "present"))?;
        Ok(self.fields.swap_remove(pos).1)
    }

    pub(crate) fn u64(&mut self, field: &'static str) -> Result<u64, ShapeError> {
        as_u64(&self.take(field)?).ok_or(field_err(field, "unsigned integer"))
    }

    pub(crate) fn opt_u64(&mut self, field: &'static str) -> Result<Option<u64>, ShapeError> {
        match self.take(field)? {
            Value::Null => Ok(None),
            v => as_u64(&v)
                .map(Some)
                .ok_or(field_err(field, "unsigned integer or null")),
        }
    }

    pub(crate) fn bool(&mut self, field: &'static str) -> Result<bool, ShapeError> {
        match self.take(field)? {
            Value::Bool(b) => Ok(b),
            _ => Err(field_err(field, "bool")),
        }
    }

    pub(crate) fn text(&mut self, field: &'static str) -> Result<String, ShapeError> {
        match self.take(field)? {
            Value::Text(t) => Ok(t),
            _ => Err(field_err(field, "text")),
        }
    }

    pub(crate) fn opt_text(&mut self, field: &'static str) -> Result<Option<String>, ShapeError> {
        match self.take(field)? {
            Value::Null => Ok(None),
            Value::Text(t) => Ok(Some(t)),
            _ => Err(field_err(field, "text or null")),
        }
    }

    pub(crate) fn bytes(&mut self, field: &'static str) -> Result<Vec<u8>, ShapeError> {
        match self.take(field)? {
            Value::Bytes(b) => Ok(b),
            _ => Err(field_err(field, "byte string")),
        }
    }

    pub(crate) fn array<const N: usize>(
        &mut self,
        field: &'static str,
    ) -> Result<[u8; N], ShapeError> {
        self.bytes(field)?
            .as_slice()
            .try_into()
            .map_err(|_| field_err(field, "byte string of the right length"))
    }

    pub(crate) fn opt_array<const N: usize>(
        &mut self,
        field: &'static str,
    ) -> Result<Option<[u8; N]>, ShapeError> {
        match self.take(field)? {
            Value::Null => Ok(None),
            Value::Bytes(b) => b
                .as_slice()
                .try_into()
                .map(Some)
                .map_err(|_| field_err(field, "byte string of the right length")),
            _ => Err(field_err(field, "byte string or null")),
        }
    }

    /// An array of 32-byte byte strings (raw Ed25519 public keys).
    pub(crate) fn keys32(&mut self, field: &'static str) -> Result<Vec<[u8; 32]>, ShapeError> {
        let bad = || field_err(field, "array of 32-byte byte strings");
        match self.take(field)? {
            Value::Array(items) => items
                .into_iter()
                .map(|v| match v {
                    Value::Bytes(b) => <[u8; 32]>::try_from(b.as_slice()).map_err(|_| bad()),
                    _ => Err(bad()),
                })
                .collect(),
            _ => Err(bad()),
        }
    }

    pub(crate) fn texts(&mut self, field: &'static str) -> Result<Vec<String>, ShapeError> {
        match self.take(field)? {
            Value::Array(items) => items
                .into_iter()
                .map(|v| match v {
                    Value::Text(t) => Ok(t),
                    _ => Err(field_err(field, "array of text")),
                })
                .collect(),
            _ => Err(field_err(field, "array of text")),
        }
    }

    pub(crate) fn finish(self) -> Result<(), ShapeError> {
        match self.fields.into_iter().next() {
            None => Ok(()),
            Some((key, _)) => Err(ShapeError::UnknownField {
                key: match key {
                    Value::Text(k) => k,
                    // `new` admits text keys only.
                    _ => String::new(),
                },
                within: self.within,
            }),
        }
    }
}

/// Builds a text-keyed map; [`encode`] sorts it.
pub(crate) fn map<const N: usize>(fields: [(&str, Value); N]) -> Value {
    Value::Map(
        fields
            .into_iter()
            .map(|(k, v)| (Value::Text(k.to_string()), v))
            .collect(),
    )
}

/// `Some(text)` as text, `None` as null.
pub(crate) fn opt_text(v: &Option<String>) -> Value {
    v.as_ref().map_or(Value::Null, |t| Value::Text(t.clone()))
}

/// A list of 32-byte byte strings.
pub(crate) fn keys32(keys: &[[u8; 32]]) -> Value {
    Value::Array(keys.iter().map(|k| Value::Bytes(k.to_vec())).collect())
}

/// A list of texts.
pub(crate) fn texts(v: &[String]) -> Value {
    Value::Array(v.iter().map(|t| Value::Text(t.clone())).collect())
}

/// Reads a map with text keys into a list, refusing any other shape.
pub(crate) fn text_map(value: Value) -> Option<Vec<(String, Value)>> {
    match value {
        Value::Map(entries) => entries
            .into_iter()
            .map(|(k, v)| match k {
                Value::Text(k) => Some((k, v)),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

/// A `u64` from an integer item.
pub(crate) fn as_u64(value: &Value) -> Option<u64> {
    match value {
        Value::Integer(i) => u64::try_from(*i).ok(),
        _ => None,
    }
}

/// An integer item for `v`.
pub(crate) fn uint(v: u64) -> Value {
    Value::Integer(Integer::from(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorts_map_keys_by_encoded_bytes() {
        // "b" (0x61 0x62) sorts before "aa" (0x62 0x61 0x61): shorter encodings first.
        let v = Value::Map(vec![
            (Value::Text("aa".into()), uint(1)),
            (Value::Text("b".into()), uint(2)),
        ]);
        let bytes = encode(&v).unwrap();
        assert_eq!(hex::encode(&bytes), "a261620262616101");
    }

    #[test]
    fn rejects_unsorted_map() {
        // {"aa": 1, "b": 2} in the order given: not deterministic.
        let bytes = hex::decode("a262616101616202").unwrap();
        assert_eq!(decode(&bytes), Err(CborError::NotDeterministic));
    }

    #[test]
    fn rejects_non_shortest_integer() {
        // 1 encoded in two bytes.
        assert_eq!(decode(&[0x18, 0x01]), Err(CborError::NotDeterministic));
    }

    #[test]
    fn rejects_indefinite_length() {
        // [_ 1]
        assert_eq!(
            decode(&[0x9f, 0x01, 0xff]),
            Err(CborError::NotDeterministic)
        );
    }

    #[test]
    fn rejects_duplicate_keys() {
        let bytes = hex::decode("a2616101616102").unwrap();
        assert_eq!(decode(&bytes), Err(CborError::DuplicateKey));
    }

    #[test]
    fn rejects_trailing_bytes() {
        assert_eq!(
            decode(&[0x01, 0x02]),
            Err(CborError::TrailingBytes { count: 1 })
        );
    }

    #[test]
    fn rejects_floats_and_tags() {
        assert!(matches!(
            decode(&[0xf9, 0x3c, 0x00]),
            Err(CborError::Unsupported { what: "float" })
        ));
        assert!(matches!(
            decode(&[0xc1, 0x01]),
            Err(CborError::Unsupported { what: "tag" })
        ));
    }

    #[test]
    fn item_len_splits_a_sequence() {
        let mut seq = encode(&Value::Array(vec![uint(1), Value::Bytes(vec![0; 30])])).unwrap();
        let first = seq.len();
        seq.extend_from_slice(&[0x9f, 0x01, 0xff, 0x05]);
        assert_eq!(item_len(&seq), Ok(first));
        assert_eq!(item_len(&seq[first..]), Ok(3));
        assert_eq!(item_len(&seq[first + 3..]), Ok(1));
        assert!(item_len(&seq[..first - 1]).is_err());
        assert!(item_len(&[0x5b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn split_sequence_names_the_bad_item_and_its_offset() {
        let one = encode(&uint(1)).unwrap();
        let array = encode(&Value::Array(vec![uint(2), Value::Bytes(vec![0; 30])])).unwrap();
        let seq = [one.clone(), array.clone(), one.clone()].concat();
        assert_eq!(
            split_sequence(&seq),
            Ok(vec![one.as_slice(), array.as_slice(), one.as_slice()])
        );
        assert_eq!(split_sequence(&[]), Ok(Vec::new()));
        let truncated = &seq[..one.len() + array.len() - 1];
        let err = split_sequence(truncated).unwrap_err();
        assert_eq!((err.index, err.offset), (1, one.len()));
    }

    #[test]
    fn rejects_deep_nesting() {
        // [[[...[1]...]]] nested 64 deep: well-formed, but deeper than allowed.
        let mut bytes = vec![0x81; 64];
        bytes.push(0x01);
        assert!(matches!(decode(&bytes), Err(CborError::Malformed { .. })));
        assert!(matches!(
            item_len(&bytes),
            Err(CborError::Unsupported { .. })
        ));
        let mut shallow = vec![0x81; 4];
        shallow.push(0x01);
        assert!(decode(&shallow).is_ok());
    }
}
