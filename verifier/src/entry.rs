//! Log entries: the one definition of their bytes.
//!
//! An entry is a tagged COSE_Sign1 (RFC 9052) whose protected header is exactly
//! `{1: -8 (EdDSA), 3: "application/vnd.attestplane.entry.v1+cbor", 4: kid}`, whose unprotected
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
//! Decoding reads the bytes once: the COSE_Sign1 envelope is compared with the profile's fixed
//! layout and the payload read by a one-pass deterministic CBOR reader
//! ([`cbor::decode_one_pass`]), without re-encoding; an event whose encoding has a fixed
//! layout (`checkpoint`) is read in place, without building it as a CBOR value first. The earlier decoding (parse, re-encode,
//! compare) is kept as [`SignedEntry::decode_reference`]: it gives the answer, and the precise
//! error, whenever the one-pass path does not accept, and property tests and the `entry` fuzz
//! target hold the two to the same answers.
//!
//! This module checks one entry on its own (shape and, given a key, its signature). Whether it
//! belongs where it stands in a log is [`crate::log`]'s question.

use std::collections::BTreeMap;
use std::fmt;

use ciborium::value::Value;
use ed25519_dalek::{Signature, Signer, VerifyingKey};
use serde::{Serialize, Serializer};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::cbor::{
    self, CborError, Fields, ShapeError, as_u64, keys32, map, opt_text, texts, uint,
};
use crate::cose::{self, CoseError};
pub use crate::eddsa::KeyId;
use crate::reason::{Reason, ReasonError, opt_reason, take_opt_reason};
use crate::time::UnixMillis;

pub use crate::cose::FormatVersion;

/// Content type in every entry's protected header: binds the signature to this format and its
/// version ([`FormatVersion::CURRENT`], v1). An entry under another version of it, or under
/// the unversioned type written before v1, is refused as [`EntryError::UnsupportedVersion`].
pub const ENTRY_CONTENT_TYPE: &str = "application/vnd.attestplane.entry.v1+cbor";

/// The largest encoded entry accepted.
pub const MAX_ENTRY_LEN: usize = cbor::MAX_PAYLOAD_LEN + 512;

/// The most drift records one `tool_drift` event carries.
pub const MAX_DRIFT_RECORDS: usize = 4096;

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

impl From<ReasonError> for EntryError {
    fn from(e: ReasonError) -> Self {
        match e {
            ReasonError::Shape(e) => EntryError::Shape(e),
            ReasonError::UnknownCode { code } => EntryError::UnknownReason { code },
        }
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
    /// The first admin key set, fixed once, right after the genesis epoch opens.
    Genesis {
        /// Raw Ed25519 public keys allowed to sign admin requests.
        admin_keys: Vec<[u8; 32]>,
        /// The keys came from the host, not from the enclave's measured command line: the
        /// enclave ran with `--insecure-host-chosen-genesis` (development only). Whoever
        /// controls the host chose who administers such a log.
        host_chosen: bool,
    },
    /// A signed admin request and whether it was applied. Refused requests are logged too.
    Admin {
        /// The signed request exactly as received (see [`crate::admin`]).
        request: Vec<u8>,
        /// Whether the enclave applied it.
        accepted: bool,
        /// Why it was refused.
        reason: Option<Reason>,
    },
    /// The verification of an MCP server's attestation document, either way.
    Attestation(AttestationRecord),
    /// A policy decision (resolve, call), allowed or denied.
    Decision(Box<DecisionRecord>),
    /// A `discover`: which servers the agent was shown.
    Discovery {
        /// Who asked.
        principal: PrincipalRecord,
        /// Ids of the servers the policy let it see, sorted.
        servers: Vec<String>,
    },
    /// The gateway found an upstream's tools differing from their pins: the tools concerned
    /// are withheld from every listing and their calls refused until an admin re-pins.
    ToolDrift {
        /// The registered server.
        server: String,
        /// What differs, in the order the pin check reports it.
        drift: Vec<DriftRecord>,
    },
    /// How a call the gateway forwarded ended: written before the answer reaches the agent,
    /// or when the upstream failed or timed out (`aborted`).
    CallResult {
        /// The sequence number of the call's decision entry.
        call: u64,
        /// `ok` (a JSON-RPC result), `error` (a JSON-RPC error or a tool result with
        /// `isError`), or `aborted` (no answer: the upstream failed, timed out or answered
        /// garbage).
        outcome: String,
        /// SHA-256 of the answer's bytes as the agent receives them (zero when aborted).
        result: [u8; 32],
        /// PII found in the upstream's answer, and what the call's rule did with it
        /// (`refuse` turns the outcome into `withheld`).
        pii: PiiRecord,
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

/// One difference between an upstream's listed tools and their pins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriftRecord {
    /// `changed`, `renamed`, `unpinned`, `missing`, `duplicate` or `invalid`.
    pub kind: String,
    /// The tool's name as listed (for `renamed`: the new name; for `missing`: the pinned name).
    pub name: String,
    /// The pinned digest, where one applies.
    pub pinned: Option<[u8; 32]>,
    /// The listed definition's digest, where there is one.
    pub found: Option<[u8; 32]>,
}

/// An MCP server's attestation, as the enclave verified it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttestationRecord {
    /// The registered server's id.
    pub server: String,
    /// The nonce the enclave issued.
    pub nonce: Vec<u8>,
    /// The document the host fetched (verbatim).
    pub document: Vec<u8>,
    /// Whether it verified against the registration.
    pub verified: bool,
    /// SHA-384 digest of the verified measurement (see `state::measurement_digest`).
    pub measurement: Option<[u8; 48]>,
    /// Why it was refused.
    pub reason: Option<Reason>,
}

/// The facts a decision was taken on, and its outcome: enough to re-evaluate it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecisionRecord {
    /// `resolve`, `call`, `read_resource` or `get_prompt` (the last two: the gateway's
    /// `resources/read` and `prompts/get`).
    pub action: String,
    /// Who asked (from the verified identity token; the token itself is never logged).
    pub principal: PrincipalRecord,
    /// The server concerned.
    pub server: String,
    /// The item: the tool for `call`, the resource URI for `read_resource`, the prompt name
    /// for `get_prompt`.
    pub tool: Option<String>,
    /// Attestation facts given to the policy.
    pub attestation: AttestationFactsRecord,
    /// Counters given to the policy.
    pub calls_last_minute: u64,
    /// Spend given to the policy, in millionths of the currency unit.
    pub spend_micros: u64,
    /// The verdict.
    pub allowed: bool,
    /// Ids of the policies that determined it.
    pub policies: Vec<String>,
    /// Why it was denied.
    pub reason: Option<Reason>,
    /// The handle issued, for an allowed `resolve`.
    pub handle: Option<HandleRecord>,
    /// For a `call` (`read_resource`, `get_prompt`) the gateway decided: what it saw of the
    /// request itself.
    pub call: Option<CallRecord>,
}

/// What a gateway `call` decision saw of the call, besides the common facts: enough to replay
/// it, and nothing a policy did not read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallRecord {
    /// SHA-256 over the RFC 8785 canonical JSON of the arguments as forwarded (the receipt's
    /// `args`): after redaction when the rule redacted.
    pub args: [u8; 32],
    /// The pinned digest of the tool's definition the call was checked against (the
    /// receipt's `def`).
    pub definition: [u8; 32],
    /// The arguments the policy set declares (`@arguments`) as the policy saw them: canonical
    /// JSON of an object, PII redacted; `None` when the call passed none of them. Undeclared
    /// arguments are never logged.
    pub arguments: Option<String>,
    /// PII found in the arguments as the agent sent them, and the call's rule.
    pub pii: PiiRecord,
    /// The tool's price in the registration, reserved against the spend caps (`None`: the
    /// tool has no price). Set on allowed calls only.
    pub price: Option<PriceRecord>,
}

/// A call's price: atomic units of an asset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PriceRecord {
    /// Atomic units.
    pub amount: u64,
    /// The asset (e.g. `USDC`).
    pub asset: String,
}

/// PII findings in one direction of a call: how many of each kind, never the values (nor
/// their hashes: a hash of a phone or card number is the number to anyone who can enumerate
/// them, and the host holds the log), and the rule applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PiiRecord {
    /// `allow`, `redact` or `refuse` (see `policy::PiiAction`).
    pub action: String,
    /// Findings by kind (`email`, `card`, …); kinds with none are absent.
    pub counts: BTreeMap<String, u64>,
}

/// The most PII kinds a record may name.
pub const MAX_PII_KINDS: usize = 32;

/// An agent's verified identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrincipalRecord {
    /// Agent id (`sub`).
    pub agent: String,
    /// The user it acts for.
    pub user: String,
    /// Its tenant.
    pub tenant: String,
    /// Its roles.
    pub roles: Vec<String>,
    /// The identity provider that vouched for it.
    pub issuer: String,
}

/// Attestation facts as the policy saw them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttestationFactsRecord {
    /// A verified attestation is on record.
    pub verified: bool,
    /// Its age in milliseconds, if any.
    pub age_ms: Option<u64>,
    /// Its PCRs matched the registration.
    pub pcr_match: bool,
    /// It was taken in debug mode.
    pub debug: bool,
}

/// A handle issued by a `resolve`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandleRecord {
    /// The JWT's `jti`.
    pub jti: String,
    /// Its `exp` (Unix seconds).
    pub expires: u64,
    /// Its `aud`.
    pub audience: String,
    /// The tools it allows, sorted.
    pub tools: Vec<String>,
}

impl Event {
    /// The event's type name as encoded.
    pub fn type_name(&self) -> &'static str {
        match self {
            Event::EpochStart { .. } => "epoch_start",
            Event::Genesis { .. } => "genesis",
            Event::Admin { .. } => "admin",
            Event::Attestation(_) => "attestation",
            Event::Decision(_) => "decision",
            Event::Discovery { .. } => "discovery",
            Event::ToolDrift { .. } => "tool_drift",
            Event::CallResult { .. } => "call_result",
            Event::Checkpoint { .. } => "checkpoint",
        }
    }

    fn to_value(&self) -> Value {
        let kind = ("type", Value::Text(self.type_name().into()));
        match self {
            Event::EpochStart { attestation } => {
                map([kind, ("attestation", Value::Bytes(attestation.clone()))])
            }
            Event::Genesis {
                admin_keys,
                host_chosen,
            } => map([
                kind,
                ("admin_keys", keys32(admin_keys)),
                ("host_chosen", Value::Bool(*host_chosen)),
            ]),
            Event::Admin {
                request,
                accepted,
                reason,
            } => map([
                kind,
                ("request", Value::Bytes(request.clone())),
                ("accepted", Value::Bool(*accepted)),
                ("reason", opt_reason(reason)),
            ]),
            Event::Attestation(a) => map([
                kind,
                ("server", Value::Text(a.server.clone())),
                ("nonce", Value::Bytes(a.nonce.clone())),
                ("document", Value::Bytes(a.document.clone())),
                ("verified", Value::Bool(a.verified)),
                (
                    "measurement",
                    a.measurement
                        .map_or(Value::Null, |m| Value::Bytes(m.to_vec())),
                ),
                ("reason", opt_reason(&a.reason)),
            ]),
            Event::Decision(d) => map([
                kind,
                ("action", Value::Text(d.action.clone())),
                ("principal", principal_to_value(&d.principal)),
                ("server", Value::Text(d.server.clone())),
                ("tool", opt_text(&d.tool)),
                (
                    "attestation",
                    map([
                        ("verified", Value::Bool(d.attestation.verified)),
                        ("age_ms", d.attestation.age_ms.map_or(Value::Null, uint)),
                        ("pcr_match", Value::Bool(d.attestation.pcr_match)),
                        ("debug", Value::Bool(d.attestation.debug)),
                    ]),
                ),
                ("calls_last_minute", uint(d.calls_last_minute)),
                ("spend_micros", uint(d.spend_micros)),
                ("allowed", Value::Bool(d.allowed)),
                ("policies", texts(&d.policies)),
                ("reason", opt_reason(&d.reason)),
                (
                    "call",
                    d.call.as_ref().map_or(Value::Null, |c| {
                        map([
                            ("args", Value::Bytes(c.args.to_vec())),
                            ("definition", Value::Bytes(c.definition.to_vec())),
                            ("arguments", opt_text(&c.arguments)),
                            ("pii", pii_to_value(&c.pii)),
                            (
                                "price",
                                c.price.as_ref().map_or(Value::Null, |p| {
                                    map([
                                        ("amount", uint(p.amount)),
                                        ("asset", Value::Text(p.asset.clone())),
                                    ])
                                }),
                            ),
                        ])
                    }),
                ),
                (
                    "handle",
                    d.handle.as_ref().map_or(Value::Null, |h| {
                        map([
                            ("jti", Value::Text(h.jti.clone())),
                            ("expires", uint(h.expires)),
                            ("audience", Value::Text(h.audience.clone())),
                            ("tools", texts(&h.tools)),
                        ])
                    }),
                ),
            ]),
            Event::Discovery { principal, servers } => map([
                kind,
                ("principal", principal_to_value(principal)),
                ("servers", texts(servers)),
            ]),
            Event::ToolDrift { server, drift } => map([
                kind,
                ("server", Value::Text(server.clone())),
                (
                    "drift",
                    Value::Array(
                        drift
                            .iter()
                            .map(|d| {
                                map([
                                    ("kind", Value::Text(d.kind.clone())),
                                    ("name", Value::Text(d.name.clone())),
                                    (
                                        "pinned",
                                        d.pinned.map_or(Value::Null, |b| Value::Bytes(b.to_vec())),
                                    ),
                                    (
                                        "found",
                                        d.found.map_or(Value::Null, |b| Value::Bytes(b.to_vec())),
                                    ),
                                ])
                            })
                            .collect(),
                    ),
                ),
            ]),
            Event::CallResult {
                call,
                outcome,
                result,
                pii,
            } => map([
                kind,
                ("call", uint(*call)),
                ("outcome", Value::Text(outcome.clone())),
                ("result", Value::Bytes(result.to_vec())),
                ("pii", pii_to_value(pii)),
            ]),
            Event::Checkpoint { size, root } => map([
                kind,
                ("size", uint(*size)),
                ("root", Value::Bytes(root.to_vec())),
            ]),
        }
    }

    /// The event that ends the payload at `r`, when it is of a type whose encoding has a fixed
    /// layout (`checkpoint`), read without building it as a value; `None` for anything else,
    /// which [`Event::from_value`] then decodes or refuses. Accepts only what that path
    /// accepts, with the same value.
    fn read_fixed(mut r: cbor::OnePass<'_>) -> Option<Self> {
        // {"root": bstr(32), "size": uint, "type": "checkpoint"}: keys in deterministic order.
        r.expect(&[0xa3, 0x64, b'r', b'o', b'o', b't'])?;
        let root = r.bytes_n::<32>()?;
        r.expect(&[0x64, b's', b'i', b'z', b'e'])?;
        let size = r.uint()?;
        r.expect(&[0x64, b't', b'y', b'p', b'e', 0x6a])?;
        r.expect(b"checkpoint")?;
        r.at_end().then_some(Event::Checkpoint { size, root })
    }

    fn from_value(value: Value) -> Result<Self, EntryError> {
        let mut f = Fields::new(value, "event")?;
        let kind = f.text("type")?;
        let event = match kind.as_str() {
            "epoch_start" => Event::EpochStart {
                attestation: f.bytes("attestation")?,
            },
            "genesis" => Event::Genesis {
                admin_keys: f.keys32("admin_keys")?,
                host_chosen: f.bool("host_chosen")?,
            },
            "admin" => Event::Admin {
                request: f.bytes("request")?,
                accepted: f.bool("accepted")?,
                reason: take_opt_reason(&mut f, "reason")?,
            },
            "attestation" => Event::Attestation(AttestationRecord {
                server: f.text("server")?,
                nonce: f.bytes("nonce")?,
                document: f.bytes("document")?,
                verified: f.bool("verified")?,
                measurement: f.opt_array("measurement")?,
                reason: take_opt_reason(&mut f, "reason")?,
            }),
            "decision" => {
                let principal = principal_from_value(f.take("principal")?)?;
                let mut a = Fields::new(f.take("attestation")?, "attestation")?;
                let attestation = AttestationFactsRecord {
                    verified: a.bool("verified")?,
                    age_ms: a.opt_u64("age_ms")?,
                    pcr_match: a.bool("pcr_match")?,
                    debug: a.bool("debug")?,
                };
                a.finish()?;
                let handle = match f.take("handle")? {
                    Value::Null => None,
                    v => {
                        let mut h = Fields::new(v, "handle")?;
                        let record = HandleRecord {
                            jti: h.text("jti")?,
                            expires: h.u64("expires")?,
                            audience: h.text("audience")?,
                            tools: h.texts("tools")?,
                        };
                        h.finish()?;
                        Some(record)
                    }
                };
                let call = match f.take("call")? {
                    Value::Null => None,
                    v => {
                        let mut c = Fields::new(v, "call")?;
                        let record = CallRecord {
                            args: c.array("args")?,
                            definition: c.array("definition")?,
                            arguments: c.opt_text("arguments")?,
                            pii: pii_from_value(c.take("pii")?)?,
                            price: match c.take("price")? {
                                Value::Null => None,
                                v => {
                                    let mut p = Fields::new(v, "price")?;
                                    let price = PriceRecord {
                                        amount: p.u64("amount")?,
                                        asset: p.text("asset")?,
                                    };
                                    p.finish()?;
                                    Some(price)
                                }
                            },
                        };
                        c.finish()?;
                        Some(record)
                    }
                };
                Event::Decision(Box::new(DecisionRecord {
                    action: f.text("action")?,
                    principal,
                    server: f.text("server")?,
                    tool: f.opt_text("tool")?,
                    attestation,
                    calls_last_minute: f.u64("calls_last_minute")?,
                    spend_micros: f.u64("spend_micros")?,
                    allowed: f.bool("allowed")?,
                    policies: f.texts("policies")?,
                    reason: take_opt_reason(&mut f, "reason")?,
                    handle,
                    call,
                }))
            }
            "discovery" => Event::Discovery {
                principal: principal_from_value(f.take("principal")?)?,
                servers: f.texts("servers")?,
            },
            "tool_drift" => {
                let server = f.text("server")?;
                let Value::Array(items) = f.take("drift")? else {
                    return Err(EntryError::Shape(ShapeError::Field {
                        field: "drift",
                        expected: "array of maps",
                    }));
                };
                if items.len() > MAX_DRIFT_RECORDS {
                    return Err(EntryError::Shape(ShapeError::Field {
                        field: "drift",
                        expected: "at most 4096 items",
                    }));
                }
                let mut drift = Vec::with_capacity(items.len());
                for item in items {
                    let mut d = Fields::new(item, "drift")?;
                    drift.push(DriftRecord {
                        kind: d.text("kind")?,
                        name: d.text("name")?,
                        pinned: d.opt_array("pinned")?,
                        found: d.opt_array("found")?,
                    });
                    d.finish()?;
                }
                Event::ToolDrift { server, drift }
            }
            "call_result" => Event::CallResult {
                call: f.u64("call")?,
                outcome: f.text("outcome")?,
                result: f.array("result")?,
                pii: pii_from_value(f.take("pii")?)?,
            },
            "checkpoint" => Event::Checkpoint {
                size: f.u64("size")?,
                root: f.array("root")?,
            },
            _ => return Err(EntryError::UnknownEvent { kind }),
        };
        f.finish()?;
        Ok(event)
    }
}

fn pii_to_value(p: &PiiRecord) -> Value {
    map([
        ("action", Value::Text(p.action.clone())),
        (
            "counts",
            Value::Map(
                p.counts
                    .iter()
                    .map(|(k, n)| (Value::Text(k.clone()), uint(*n)))
                    .collect(),
            ),
        ),
    ])
}

fn pii_from_value(v: Value) -> Result<PiiRecord, EntryError> {
    let mut p = Fields::new(v, "pii")?;
    let action = p.text("action")?;
    let bad = || {
        EntryError::Shape(ShapeError::Field {
            field: "counts",
            expected: "map of at most 32 kinds to unsigned integers",
        })
    };
    let entries = cbor::text_map(p.take("counts")?).ok_or_else(bad)?;
    if entries.len() > MAX_PII_KINDS {
        return Err(bad());
    }
    let mut counts = BTreeMap::new();
    for (k, v) in entries {
        let n = cbor::as_u64(&v).ok_or_else(bad)?;
        if counts.insert(k, n).is_some() {
            return Err(bad());
        }
    }
    p.finish()?;
    Ok(PiiRecord { action, counts })
}

fn principal_to_value(p: &PrincipalRecord) -> Value {
    map([
        ("agent", Value::Text(p.agent.clone())),
        ("user", Value::Text(p.user.clone())),
        ("tenant", Value::Text(p.tenant.clone())),
        ("roles", texts(&p.roles)),
        ("issuer", Value::Text(p.issuer.clone())),
    ])
}

fn principal_from_value(v: Value) -> Result<PrincipalRecord, EntryError> {
    let mut p = Fields::new(v, "principal")?;
    let principal = PrincipalRecord {
        agent: p.text("agent")?,
        user: p.text("user")?,
        tenant: p.text("tenant")?,
        roles: p.texts("roles")?,
        issuer: p.text("issuer")?,
    };
    p.finish()?;
    Ok(principal)
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
        match Self::from_payload_envelope(bytes) {
            Some(decoded) => decoded,
            None => Self::from_value(cbor::decode(bytes)?),
        }
    }

    /// The common case of [`Entry::from_payload`] without building the envelope as a value:
    /// the payload is exactly `{"seq", "prev", "time", "epoch", "event"}` (deterministic key
    /// order: shorter keys first) in deterministic CBOR, the event read by the one-pass
    /// reader. `None` for anything else, which the general path then decodes (or refuses,
    /// with its precise error): whatever this accepts, that path accepts with the same value
    /// and whatever this refuses (an event's shape), that path refuses for the same reason.
    fn from_payload_envelope(bytes: &[u8]) -> Option<Result<Self, EntryError>> {
        let mut r = cbor::OnePass::start(bytes)?;
        r.expect(&[0xa5, 0x63, b's', b'e', b'q'])?;
        let seq = r.uint()?;
        r.expect(&[0x64, b'p', b'r', b'e', b'v'])?;
        let prev = EntryHash(r.bytes_n::<32>()?);
        r.expect(&[0x64, b't', b'i', b'm', b'e'])?;
        let time = UnixMillis::from_millis(r.uint()?);
        r.expect(&[0x65, b'e', b'p', b'o', b'c', b'h'])?;
        let epoch = r.uint()?;
        r.expect(&[0x65, b'e', b'v', b'e', b'n', b't'])?;
        if let Some(event) = Event::read_fixed(r.clone()) {
            return Some(Ok(Entry {
                seq,
                prev,
                epoch,
                time,
                event,
            }));
        }
        let event = r.rest_item(1)?;
        Some(Event::from_value(event).map(|event| Entry {
            seq,
            prev,
            epoch,
            time,
            event,
        }))
    }

    /// [`Entry::from_payload`] with the reference CBOR decoder only (see
    /// [`SignedEntry::decode_reference`]).
    #[doc(hidden)]
    pub fn from_payload_reference(bytes: &[u8]) -> Result<Self, EntryError> {
        Self::from_value(cbor::decode_reference(bytes)?)
    }

    fn from_value(value: Value) -> Result<Self, EntryError> {
        let mut fields = Fields::new(value, "entry")?;
        let entry = Entry {
            seq: fields.u64("seq")?,
            prev: EntryHash(fields.array("prev")?),
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
        Ok(cose::sign(
            ENTRY_CONTENT_TYPE,
            kid.as_bytes(),
            self.payload()?,
            signer,
        )?)
    }
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
        let opened = cose::open_borrowed(bytes, ENTRY_CONTENT_TYPE, MAX_ENTRY_LEN)?;
        let entry = Entry::from_payload(&opened.payload)?;
        Ok(Self {
            entry,
            kid: KeyId::from_bytes(opened.kid),
            signature: opened.signature,
            tbs: opened.tbs,
            hash: EntryHash::of(bytes),
        })
    }

    /// [`SignedEntry::decode`] with the reference decoders only: `coset` parsing and
    /// re-encoding of the COSE_Sign1, lenient CBOR decoding and re-encoding of the payload.
    /// Slower; property tests and the `entry` fuzz target hold [`SignedEntry::decode`] (which
    /// reads the bytes once) to its answers. Not meant for other uses.
    #[doc(hidden)]
    pub fn decode_reference(bytes: &[u8]) -> Result<Self, EntryError> {
        let opened = cose::open_reference(bytes, ENTRY_CONTENT_TYPE, MAX_ENTRY_LEN)?;
        let entry = Entry::from_payload_reference(&opened.payload)?;
        Ok(Self {
            entry,
            kid: KeyId::from_bytes(opened.kid),
            signature: opened.signature,
            tbs: opened.tbs,
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

    /// Checks the signature under `key` by the rules of [`crate::eddsa`] (the log verifier's),
    /// and that `key` is the one the header names.
    pub fn verify(&self, key: &VerifyingKey) -> Result<(), EntryError> {
        if KeyId::of(key) != self.kid {
            return Err(EntryError::KeyMismatch);
        }
        crate::eddsa::PublicKey::from_verifying_key(key)
            .map_err(|_| EntryError::BadSignature)?
            .verify(&self.tbs, &self.signature)
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
        let bad = || ShapeError::Field {
            field: "epoch binding",
            expected: "[context, epoch, seq, prev]",
        };
        let Value::Array(items) = cbor::decode(bytes)? else {
            return Err(bad().into());
        };
        match items.as_slice() {
            [Value::Text(ctx), epoch, seq, Value::Bytes(prev)] if ctx == EPOCH_BINDING_CONTEXT => {
                Ok(Self {
                    epoch: as_u64(epoch).ok_or_else(bad)?,
                    seq: as_u64(seq).ok_or_else(bad)?,
                    prev: EntryHash(prev.as_slice().try_into().map_err(|_| bad())?),
                })
            }
            _ => Err(bad().into()),
        }
    }
}

impl From<CoseError> for EntryError {
    fn from(e: CoseError) -> Self {
        match e {
            CoseError::TooLong { len, max } => EntryError::TooLong { len, max },
            CoseError::Malformed(reason) => EntryError::Cose { reason },
            CoseError::Header(reason) => EntryError::Header { reason },
            CoseError::Version { found } => EntryError::UnsupportedVersion { found },
            CoseError::NotCanonical => EntryError::NotCanonical,
            CoseError::SigningFailed => EntryError::SigningFailed,
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
    /// The entry is of another version of the format than the one this verifier reads
    /// ([`FormatVersion::CURRENT`]): a pre-v1 entry, or one of a later version.
    #[error(
        "entry format {found} is not {}, the only version this verifier reads",
        FormatVersion::CURRENT
    )]
    UnsupportedVersion {
        /// The version its content type names.
        found: FormatVersion,
    },
    /// The payload is not deterministic CBOR.
    #[error("payload: {0}")]
    Cbor(#[from] CborError),
    /// A field is missing, has the wrong type, or is not defined by this version.
    #[error("{0}")]
    Shape(#[from] ShapeError),
    /// The event type is not one this version knows; refusing is the only safe choice.
    #[error("unknown event type {kind:?}")]
    UnknownEvent {
        /// The type name found.
        kind: String,
    },
    /// A refusal's reason code is not one this version knows.
    #[error("unknown reason code {code:?}")]
    UnknownReason {
        /// The code found.
        code: String,
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
            Err(EntryError::Shape(ShapeError::UnknownField { key, .. })) if key == "extra"
        ));
    }

    /// The fixed-layout reader of `checkpoint` events gives the general path's answer on the
    /// encodings next to the one it accepts (and the right value on that one).
    #[test]
    fn checkpoint_fast_path_agrees_with_the_value_path() {
        let payload = sample(300).payload().unwrap();
        // {"root": bstr(32), "size": 300, "type": "checkpoint"} ends the payload: 64 bytes.
        let fixed_at = payload.len() - (1 + 5 + 2 + 32 + 5 + 3 + 5 + 1 + 10);
        let event = payload[fixed_at..].to_vec();
        let envelope = &payload[..fixed_at];
        let mut variants: Vec<Vec<u8>> = vec![event.clone()];
        // size 300 (0x19 0x01 0x2c) in a longer head; root one byte short; another type;
        // an extra field; a byte after the map; the map cut short.
        let size_at = 1 + 5 + 2 + 32 + 5;
        assert_eq!(event[size_at..size_at + 3], [0x19, 0x01, 0x2c]);
        let mut long_size = event.clone();
        long_size.splice(size_at..size_at + 3, [0x1a, 0, 0, 0x01, 0x2c]);
        variants.push(long_size);
        let mut short_root = event.clone();
        assert_eq!(short_root[6..8], [0x58, 32]);
        short_root[7] = 31;
        short_root.remove(8);
        variants.push(short_root);
        let mut other_type = event.clone();
        let last = other_type.len() - 1;
        other_type[last] = b'q';
        variants.push(other_type);
        let mut extra = event.clone();
        extra[0] = 0xa4;
        extra.extend_from_slice(&[0x65, b'e', b'x', b't', b'r', b'a', 0x01]);
        variants.push(extra);
        let mut trailing = event.clone();
        trailing.push(0x00);
        variants.push(trailing);
        variants.push(event[..event.len() - 1].to_vec());
        for (i, v) in variants.iter().enumerate() {
            let whole = [envelope, v.as_slice()].concat();
            let fast = Entry::from_payload(&whole);
            assert_eq!(fast, Entry::from_payload_reference(&whole), "variant {i}");
            assert_eq!(fast.is_ok(), i == 0, "variant {i}");
        }
        assert_eq!(
            Entry::from_payload(&payload).unwrap(),
            sample(300),
            "the fixed layout reads the value written"
        );
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
