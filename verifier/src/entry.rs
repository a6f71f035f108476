//! Log entries: the one definition of their bytes.
//!
//! An entry is a tagged COSE_Sign1 (RFC 9052) whose protected header is exactly
//! `{1: -8 (EdDSA), 3: "application/vnd.attestplane.entry+cbor", 4: kid}`, whose unprotected
//! header is empty, and whose payload is the deterministic CBOR map
//!
//! ```text
//! { "seq": uint, "prev": bstr(32), "epoch": uint, "time": uint (ms), "event": { "type": text, ... } }
//! ```
//!
//! `seq` is dense from 0; `prev` is the SHA-256 of the previous entry's complete encoded bytes
//! (32 zero bytes for entry 0); `epoch` counts enclave boots from 0; `time` is the enclave's
//! clock in milliseconds; `kid` is the SHA-256 of the raw Ed25519 public key of the epoch.
//!
//! The enclave builds entries with [`Entry::sign`]; everybody else reads them with
//! [`SignedEntry::decode`]. Decoding is strict: an entry is accepted only if encoding what was
//! decoded reproduces its bytes exactly, so each entry has one encoding and one hash.
//!
//! This module checks one entry on its own (shape and, given a key, its signature). Whether it
//! belongs where it stands in a log is [`crate::log`]'s question.

use std::fmt;

use ciborium::value::Value;
use coset::{CoseSign1, CoseSign1Builder, HeaderBuilder, TaggedCborSerializable, iana::Algorithm};
use ed25519_dalek::{Signature, Signer, VerifyingKey};
use serde::{Serialize, Serializer};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::cbor::{self, CborError, as_u64, text_map, uint};
use crate::time::UnixMillis;

/// Content type in every entry's protected header: binds the signature to this format.
pub const ENTRY_CONTENT_TYPE: &str = "application/vnd.attestplane.entry+cbor";

/// The largest encoded entry accepted.
pub const MAX_ENTRY_LEN: usize = cbor::MAX_PAYLOAD_LEN + 512;

/// Domain separator at the head of the attestation `user_data` that opens an epoch.
pub const EPOCH_BINDING_CONTEXT: &str = "attestplane/epoch/v1";

/// SHA-256 of an entry's complete encoded bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EntryHash([u8; 32]);

impl EntryHash {
    /// The `prev` of entry 0: 32 zero bytes.
    pub const ZERO: Self = Self([0; 32]);

    /// Hashes encoded entry bytes.
    pub fn of(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }

    /// Wraps raw hash bytes.
    pub const fn from_bytes(b: [u8; 32]) -> Self {
        Self(b)
    }

    /// The raw hash bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lower-case hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Option<Self> {
        let mut b = [0u8; 32];
        hex::decode_to_slice(s, &mut b).ok()?;
        Some(Self(b))
    }
}

impl fmt::Display for EntryHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for EntryHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EntryHash({})", self.to_hex())
    }
}

impl Serialize for EntryHash {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

/// Identifies an epoch key: SHA-256 of its 32 raw public-key bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId([u8; 32]);

impl KeyId {
    /// The id of `key`.
    pub fn of(key: &VerifyingKey) -> Self {
        Self(Sha256::digest(key.as_bytes()).into())
    }

    /// The raw id bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lower-case hex: also the `kid` of the key in a JWKS.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({})", self.to_hex())
    }
}

impl Serialize for KeyId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

/// What an entry records.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A new enclave boot: carries the NSM attestation document whose `public_key` is the epoch
    /// key and whose `user_data` is the [`EpochBinding`] of this entry.
    EpochStart {
        /// The raw Nitro attestation document (COSE_Sign1 bytes).
        attestation: Vec<u8>,
    },
    /// The enclave's view of the tree at `size` entries (a signed checkpoint is published
    /// separately; this records that it was taken).
    Checkpoint {
        /// Number of entries covered.
        size: u64,
        /// RFC 6962 root over their entry hashes.
        root: [u8; 32],
    },
}

impl Event {
    /// The event's type name as encoded.
    pub fn type_name(&self) -> &'static str {
        match self {
            Event::EpochStart { .. } => "epoch_start",
            Event::Checkpoint { .. } => "checkpoint",
        }
    }

    fn to_value(&self) -> Value {
        let mut fields = vec![(
            Value::Text("type".into()),
            Value::Text(self.type_name().into()),
        )];
        match self {
            Event::EpochStart { attestation } => fields.push((
                Value::Text("attestation".into()),
                Value::Bytes(attestation.clone()),
            )),
            Event::Checkpoint { size, root } => {
                fields.push((Value::Text("size".into()), uint(*size)));
                fields.push((Value::Text("root".into()), Value::Bytes(root.to_vec())));
            }
        }
        Value::Map(fields)
    }

    fn from_value(value: Value) -> Result<Self, EntryError> {
        let mut fields = Fields::new(value, "event")?;
        let kind = fields.text("type")?;
        let event = match kind.as_str() {
            "epoch_start" => Event::EpochStart {
                attestation: fields.bytes("attestation")?,
            },
            "checkpoint" => Event::Checkpoint {
                size: fields.u64("size")?,
                root: fields.hash32("root")?,
            },
            _ => return Err(EntryError::UnknownEvent { kind }),
        };
        fields.finish()?;
        Ok(event)
    }
}

/// The unsigned content of an entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Position in the log, dense from 0.
    pub seq: u64,
    /// Hash of the previous entry's bytes ([`EntryHash::ZERO`] at 0).
    pub prev: EntryHash,
    /// Enclave boot counter, from 0.
    pub epoch: u64,
    /// The enclave's clock when the entry was made.
    pub time: UnixMillis,
    /// What happened.
    pub event: Event,
}

impl Entry {
    /// The deterministic CBOR payload.
    pub fn payload(&self) -> Result<Vec<u8>, EntryError> {
        let value = Value::Map(vec![
            (Value::Text("seq".into()), uint(self.seq)),
            (
                Value::Text("prev".into()),
                Value::Bytes(self.prev.0.to_vec()),
            ),
            (Value::Text("epoch".into()), uint(self.epoch)),
            (Value::Text("time".into()), uint(self.time.as_millis())),
            (Value::Text("event".into()), self.event.to_value()),
        ]);
        Ok(cbor::encode(&value)?)
    }

    /// Decodes a payload, which must be in deterministic form.
    pub fn from_payload(bytes: &[u8]) -> Result<Self, EntryError> {
        let mut fields = Fields::new(cbor::decode(bytes)?, "entry")?;
        let entry = Entry {
            seq: fields.u64("seq")?,
            prev: EntryHash(fields.hash32("prev")?),
            epoch: fields.u64("epoch")?,
            time: UnixMillis::from_millis(fields.u64("time")?),
            event: Event::from_value(fields.take("event")?)?,
        };
        fields.finish()?;
        Ok(entry)
    }

    /// Encodes and signs the entry: the complete bytes to append to the log.
    pub fn sign<S: Signer<Signature>>(
        &self,
        kid: &KeyId,
        signer: &S,
    ) -> Result<Vec<u8>, EntryError> {
        let payload = self.payload()?;
        let unsigned = unsigned_cose(kid, payload);
        let tbs = unsigned.tbs_data(&[]);
        let signature = signer
            .try_sign(&tbs)
            .map_err(|_| EntryError::SigningFailed)?;
        let mut signed = unsigned;
        signed.signature = signature.to_bytes().to_vec();
        signed.to_tagged_vec().map_err(|e| EntryError::Cose {
            reason: e.to_string(),
        })
    }
}

fn unsigned_cose(kid: &KeyId, payload: Vec<u8>) -> CoseSign1 {
    let protected = HeaderBuilder::new()
        .algorithm(Algorithm::EdDSA)
        .content_type(ENTRY_CONTENT_TYPE.to_string())
        .key_id(kid.0.to_vec())
        .build();
    CoseSign1Builder::new()
        .protected(protected)
        .payload(payload)
        .build()
}

/// A decoded entry with its signature, not yet checked against any key.
#[derive(Clone, Debug)]
pub struct SignedEntry {
    entry: Entry,
    kid: KeyId,
    signature: Signature,
    tbs: Vec<u8>,
    hash: EntryHash,
}

impl SignedEntry {
    /// Parses an entry's bytes strictly (see the module documentation).
    pub fn decode(bytes: &[u8]) -> Result<Self, EntryError> {
        if bytes.len() > MAX_ENTRY_LEN {
            return Err(EntryError::TooLong {
                len: bytes.len(),
                max: MAX_ENTRY_LEN,
            });
        }
        let cose = CoseSign1::from_tagged_slice(bytes).map_err(|e| EntryError::Cose {
            reason: e.to_string(),
        })?;
        if cose.protected.header.alg
            != Some(coset::RegisteredLabelWithPrivate::Assigned(
                Algorithm::EdDSA,
            ))
        {
            return Err(EntryError::Header {
                reason: "algorithm is not EdDSA",
            });
        }
        let kid: [u8; 32] = cose
            .protected
            .header
            .key_id
            .as_slice()
            .try_into()
            .map_err(|_| EntryError::Header {
                reason: "kid is not 32 bytes",
            })?;
        let kid = KeyId(kid);
        let payload = cose.payload.clone().ok_or(EntryError::Header {
            reason: "payload is detached",
        })?;
        let signature: [u8; 64] =
            cose.signature
                .as_slice()
                .try_into()
                .map_err(|_| EntryError::Header {
                    reason: "signature is not 64 bytes",
                })?;
        let entry = Entry::from_payload(&payload)?;

        // One encoding only: the bytes must be exactly what our encoder makes of them. This
        // refuses extra header parameters, unprotected headers and non-canonical COSE framing.
        let mut expected = unsigned_cose(&kid, payload);
        let tbs = expected.tbs_data(&[]);
        expected.signature = signature.to_vec();
        let canonical = expected.to_tagged_vec().map_err(|e| EntryError::Cose {
            reason: e.to_string(),
        })?;
        if canonical != bytes {
            return Err(EntryError::NotCanonical);
        }
        Ok(Self {
            entry,
            kid,
            signature: Signature::from_bytes(&signature),
            tbs,
            hash: EntryHash::of(bytes),
        })
    }

    /// The decoded content.
    pub fn entry(&self) -> &Entry {
        &self.entry
    }

    /// The key id in the protected header.
    pub fn kid(&self) -> &KeyId {
        &self.kid
    }

    /// SHA-256 of the entry's bytes.
    pub fn hash(&self) -> EntryHash {
        self.hash
    }

    /// The COSE `Sig_structure` bytes the signature covers.
    pub fn signed_bytes(&self) -> &[u8] {
        &self.tbs
    }

    /// The Ed25519 signature.
    pub fn signature(&self) -> &Signature {
        &self.signature
    }

    /// Checks the signature under `key` (strict verification: no small-order keys, canonical
    /// `S`), and that `key` is the one the header names.
    pub fn verify(&self, key: &VerifyingKey) -> Result<(), EntryError> {
        if KeyId::of(key) != self.kid {
            return Err(EntryError::KeyMismatch);
        }
        key.verify_strict(&self.tbs, &self.signature)
            .map_err(|_| EntryError::BadSignature)
    }

    /// Consumes the value, returning the entry.
    pub fn into_entry(self) -> Entry {
        self.entry
    }
}

/// What the attestation document opening an epoch carries in `user_data`: the epoch number,
/// the sequence number of the entry that opens it, and the hash of the entry before it (the
/// predecessor's head). Binding these into the NSM-signed document means an old epoch
/// document cannot be replayed at another place in the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct EpochBinding {
    /// The epoch being opened.
    pub epoch: u64,
    /// Sequence number of its `epoch_start` entry.
    pub seq: u64,
    /// Hash of the entry at `seq - 1` ([`EntryHash::ZERO`] for the genesis epoch).
    pub prev: EntryHash,
}

impl EpochBinding {
    /// Deterministic CBOR: `["attestplane/epoch/v1", epoch, seq, prev]`.
    pub fn encode(&self) -> Result<Vec<u8>, EntryError> {
        Ok(cbor::encode(&Value::Array(vec![
            Value::Text(EPOCH_BINDING_CONTEXT.into()),
            uint(self.epoch),
            uint(self.seq),
            Value::Bytes(self.prev.0.to_vec()),
        ]))?)
    }

    /// Parses the encoding of [`EpochBinding::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Self, EntryError> {
        let bad = || EntryError::Field {
            field: "epoch binding",
            expected: "[context, epoch, seq, prev]",
        };
        let Value::Array(items) = cbor::decode(bytes)? else {
            return Err(bad());
        };
        match items.as_slice() {
            [Value::Text(ctx), epoch, seq, Value::Bytes(prev)] if ctx == EPOCH_BINDING_CONTEXT => {
                Ok(Self {
                    epoch: as_u64(epoch).ok_or_else(bad)?,
                    seq: as_u64(seq).ok_or_else(bad)?,
                    prev: EntryHash(prev.as_slice().try_into().map_err(|_| bad())?),
                })
            }
            _ => Err(bad()),
        }
    }
}

/// Why a single entry was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum EntryError {
    /// The entry is longer than [`MAX_ENTRY_LEN`].
    #[error("entry of {len} bytes exceeds the limit of {max}")]
    TooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The COSE_Sign1 framing did not parse.
    #[error("malformed cose_sign1: {reason}")]
    Cose {
        /// What the parser reported.
        reason: String,
    },
    /// The protected header is not the one entries carry.
    #[error("bad protected header: {reason}")]
    Header {
        /// What was wrong.
        reason: &'static str,
    },
    /// The payload is not deterministic CBOR.
    #[error("payload: {0}")]
    Cbor(#[from] CborError),
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
    /// The event type is not one this version knows; refusing is the only safe choice.
    #[error("unknown event type {kind:?}")]
    UnknownEvent {
        /// The type name found.
        kind: String,
    },
    /// The bytes decode but are not the canonical encoding of what they hold.
    #[error("entry is not in canonical encoding")]
    NotCanonical,
    /// The header's kid does not name the key the signature was checked with.
    #[error("entry names a different key")]
    KeyMismatch,
    /// The signature does not verify.
    #[error("signature does not verify")]
    BadSignature,
    /// The signer failed.
    #[error("signing failed")]
    SigningFailed,
}

/// Strict reader over a text-keyed map: every field must be taken exactly once.
struct Fields {
    within: &'static str,
    fields: Vec<(String, Value)>,
}

impl Fields {
    fn new(value: Value, within: &'static str) -> Result<Self, EntryError> {
        let fields = text_map(value).ok_or(EntryError::Field {
            field: within,
            expected: "map with text keys",
        })?;
        Ok(Self { within, fields })
    }

    fn take(&mut self, field: &'static str) -> Result<Value, EntryError> {
        let pos = self
            .fields
            .iter()
            .position(|(k, _)| k == field)
            .ok_or(EntryError::Field {
                field,
                expected: "present",
            })?;
        Ok(self.fields.swap_remove(pos).1)
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, EntryError> {
        as_u64(&self.take(field)?).ok_or(EntryError::Field {
            field,
            expected: "unsigned integer",
        })
    }

    fn text(&mut self, field: &'static str) -> Result<String, EntryError> {
        match self.take(field)? {
            Value::Text(t) => Ok(t),
            _ => Err(EntryError::Field {
                field,
                expected: "text",
            }),
        }
    }

    fn bytes(&mut self, field: &'static str) -> Result<Vec<u8>, EntryError> {
        match self.take(field)? {
            Value::Bytes(b) => Ok(b),
            _ => Err(EntryError::Field {
                field,
                expected: "byte string",
            }),
        }
    }

    fn hash32(&mut self, field: &'static str) -> Result<[u8; 32], EntryError> {
        self.bytes(field)?
            .as_slice()
            .try_into()
            .map_err(|_| EntryError::Field {
                field,
                expected: "32 bytes",
            })
    }

    fn finish(self) -> Result<(), EntryError> {
        match self.fields.into_iter().next() {
            None => Ok(()),
            Some((key, _)) => Err(EntryError::UnknownField {
                key,
                within: self.within,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[7u8; 32])
    }

    fn sample(seq: u64) -> Entry {
        Entry {
            seq,
            prev: EntryHash::ZERO,
            epoch: 0,
            time: UnixMillis::from_millis(1_700_000_000_000),
            event: Event::Checkpoint {
                size: seq,
                root: [9; 32],
            },
        }
    }

    #[test]
    fn round_trips_and_verifies() {
        let k = key();
        let kid = KeyId::of(&k.verifying_key());
        let bytes = sample(3).sign(&kid, &k).unwrap();
        let decoded = SignedEntry::decode(&bytes).unwrap();
        assert_eq!(decoded.entry(), &sample(3));
        assert_eq!(decoded.kid(), &kid);
        assert_eq!(decoded.hash(), EntryHash::of(&bytes));
        decoded.verify(&k.verifying_key()).unwrap();
    }

    #[test]
    fn rejects_signature_under_other_key() {
        let k = key();
        let other = SigningKey::from_bytes(&[8u8; 32]);
        let kid = KeyId::of(&k.verifying_key());
        let bytes = sample(0).sign(&kid, &other).unwrap();
        let decoded = SignedEntry::decode(&bytes).unwrap();
        assert_eq!(
            decoded.verify(&k.verifying_key()),
            Err(EntryError::BadSignature)
        );
        assert_eq!(
            decoded.verify(&other.verifying_key()),
            Err(EntryError::KeyMismatch)
        );
    }

    #[test]
    fn rejects_untagged_entry() {
        let k = key();
        let kid = KeyId::of(&k.verifying_key());
        let bytes = sample(0).sign(&kid, &k).unwrap();
        // Drop the leading tag 18 (0xd2).
        assert_eq!(bytes.first(), Some(&0xd2));
        assert!(matches!(
            SignedEntry::decode(&bytes[1..]),
            Err(EntryError::Cose { .. })
        ));
    }

    #[test]
    fn rejects_unknown_event() {
        let value = Value::Map(vec![(
            Value::Text("type".into()),
            Value::Text("launch_missiles".into()),
        )]);
        assert_eq!(
            Event::from_value(value),
            Err(EntryError::UnknownEvent {
                kind: "launch_missiles".into()
            })
        );
    }

    #[test]
    fn rejects_extra_payload_field() {
        let mut fields = match cbor::decode(&sample(1).payload().unwrap()).unwrap() {
            Value::Map(f) => f,
            _ => unreachable!(),
        };
        fields.push((Value::Text("extra".into()), uint(1)));
        let bytes = cbor::encode(&Value::Map(fields)).unwrap();
        assert!(matches!(
            Entry::from_payload(&bytes),
            Err(EntryError::UnknownField { key, .. }) if key == "extra"
        ));
    }

    #[test]
    fn epoch_binding_round_trips() {
        let b = EpochBinding {
            epoch: 2,
            seq: 17,
            prev: EntryHash([5; 32]),
        };
        assert_eq!(EpochBinding::decode(&b.encode().unwrap()).unwrap(), b);
        assert!(EpochBinding::decode(b"\x80").is_err());
    }
}
