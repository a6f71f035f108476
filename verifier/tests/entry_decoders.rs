//! The one-pass decoders against the reference decoders they replace on the hot path.
//!
//! [`SignedEntry::decode`] reads an entry's bytes once (a byte-level COSE_Sign1 opener, a
//! one-pass deterministic CBOR reader); [`SignedEntry::decode_reference`] parses with `coset`
//! and `ciborium` and re-encodes to prove canonical form. They must give the same answer on
//! every input, error included: valid entries of every event type, entries with changed,
//! inserted or deleted bytes, truncations, payloads mutated under a well-formed envelope, and
//! arbitrary bytes. Likewise [`cbor::decode_one_pass`] may only accept what
//! [`cbor::decode_reference`] accepts, with the same value, and must accept the deterministic
//! encoding of any value a signed payload can hold.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use attestplane_verifier::UnixMillis;
use attestplane_verifier::cbor;
use attestplane_verifier::entry::{
    AttestationFactsRecord, AttestationRecord, CallRecord, DecisionRecord, ENTRY_CONTENT_TYPE,
    Entry, EntryError, EntryHash, Event, HandleRecord, KeyId, PiiRecord, PriceRecord,
    PrincipalRecord, SignedEntry,
};
use attestplane_verifier::reason::Reason;
use ciborium::value::{Integer, Value};
use coset::iana::Algorithm;
use coset::{CoseSign1Builder, HeaderBuilder, TaggedCborSerializable};
use ed25519_dalek::SigningKey;
use proptest::prelude::*;

fn key() -> SigningKey {
    SigningKey::from_bytes(&[0x42; 32])
}

fn text() -> impl Strategy<Value = String> {
    "\\PC{0,24}"
}

fn opt_text() -> impl Strategy<Value = Option<String>> {
    proptest::option::of(text())
}

/// Reasons of every shape: without data, with text, with a list, with a key id, with an index.
fn opt_reason() -> impl Strategy<Value = Option<Reason>> {
    proptest::option::of(prop_oneof![
        Just(Reason::NoPermit),
        Just(Reason::NonceNotIssued),
        text().prop_map(|server| Reason::UnknownServer { server }),
        texts().prop_map(|policies| Reason::Forbidden { policies }),
        any::<[u8; 32]>().prop_map(|k| Reason::UnknownAdminKey {
            kid: KeyId::from_bytes(k)
        }),
        (0u8..32).prop_map(|index| Reason::PcrMismatch { index }),
    ])
}

fn texts() -> impl Strategy<Value = Vec<String>> {
    proptest::collection::vec(text(), 0..4)
}

/// Byte strings around the CBOR head boundaries (23/24, 255/256 bytes) and beyond.
fn blob() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..40),
        proptest::collection::vec(any::<u8>(), 250..270),
        proptest::collection::vec(any::<u8>(), 0..2000),
    ]
}

fn principal() -> impl Strategy<Value = PrincipalRecord> {
    (text(), text(), text(), texts(), text()).prop_map(|(agent, user, tenant, roles, issuer)| {
        PrincipalRecord {
            agent,
            user,
            tenant,
            roles,
            issuer,
        }
    })
}

fn pii() -> impl Strategy<Value = PiiRecord> {
    (
        text(),
        proptest::collection::btree_map(text(), any::<u64>(), 0..4),
    )
        .prop_map(|(action, counts)| PiiRecord { action, counts })
}

fn decision() -> impl Strategy<Value = Event> {
    let call = proptest::option::of(
        (
            any::<[u8; 32]>(),
            any::<[u8; 32]>(),
            opt_text(),
            pii(),
            proptest::option::of((any::<u64>(), text())),
        )
            .prop_map(|(args, definition, arguments, pii, price)| CallRecord {
                args,
                definition,
                arguments,
                pii,
                price: price.map(|(amount, asset)| PriceRecord { amount, asset }),
            }),
    );
    let facts = (
        any::<bool>(),
        proptest::option::of(any::<u64>()),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(verified, age_ms, pcr_match, debug)| AttestationFactsRecord {
                verified,
                age_ms,
                pcr_match,
                debug,
            },
        );
    let handle = proptest::option::of((text(), any::<u64>(), text(), texts()).prop_map(
        |(jti, expires, audience, tools)| HandleRecord {
            jti,
            expires,
            audience,
            tools,
        },
    ));
    (
        (text(), principal(), text(), opt_text(), facts),
        (
            any::<u64>(),
            any::<u64>(),
            any::<bool>(),
            texts(),
            opt_reason(),
            handle,
            call,
        ),
    )
        .prop_map(
            |(
                (action, principal, server, tool, attestation),
                (calls_last_minute, spend_micros, allowed, policies, reason, handle, call),
            )| {
                Event::Decision(Box::new(DecisionRecord {
                    action,
                    principal,
                    server,
                    tool,
                    attestation,
                    calls_last_minute,
                    spend_micros,
                    allowed,
                    policies,
                    reason,
                    handle,
                    call,
                }))
            },
        )
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        (any::<u64>(), any::<[u8; 32]>()).prop_map(|(size, root)| Event::Checkpoint { size, root }),
        blob().prop_map(|attestation| Event::EpochStart { attestation }),
        (
            proptest::collection::vec(any::<[u8; 32]>(), 0..4),
            any::<bool>()
        )
            .prop_map(|(admin_keys, host_chosen)| Event::Genesis {
                admin_keys,
                host_chosen
            }),
        (blob(), any::<bool>(), opt_reason()).prop_map(|(request, accepted, reason)| {
            Event::Admin {
                request,
                accepted,
                reason,
            }
        }),
        (
            text(),
            blob(),
            blob(),
            any::<bool>(),
            proptest::option::of(any::<[u8; 32]>()),
            opt_reason()
        )
            .prop_map(|(server, nonce, document, verified, m, reason)| {
                Event::Attestation(AttestationRecord {
                    server,
                    nonce,
                    document,
                    verified,
                    measurement: m.map(|m| {
                        let mut out = [0u8; 48];
                        out[..32].copy_from_slice(&m);
                        out
                    }),
                    reason,
                })
            }),
        decision(),
        (any::<u64>(), text(), any::<[u8; 32]>(), pii()).prop_map(
            |(call, outcome, result, pii)| Event::CallResult {
                call,
                outcome,
                result,
                pii
            }
        ),
        (principal(), texts())
            .prop_map(|(principal, servers)| Event::Discovery { principal, servers }),
    ]
}

fn entry() -> impl Strategy<Value = Entry> {
    (
        any::<u64>(),
        any::<[u8; 32]>(),
        any::<u64>(),
        any::<u64>(),
        event(),
    )
        .prop_map(|(seq, prev, epoch, time, event)| Entry {
            seq,
            prev: EntryHash::from_bytes(prev),
            epoch,
            time: UnixMillis::from_millis(time),
            event,
        })
}

fn signed(e: &Entry) -> Vec<u8> {
    let k = key();
    e.sign(&KeyId::of(&k.verifying_key()), &k).unwrap()
}

/// The two decoders' answers agree: the same entry, key id, signature, signed bytes and
/// hash, or the same error.
fn assert_same(bytes: &[u8]) -> Result<(), TestCaseError> {
    let fast = SignedEntry::decode(bytes);
    let reference = SignedEntry::decode_reference(bytes);
    match (&fast, &reference) {
        (Ok(a), Ok(b)) => {
            prop_assert_eq!(a.entry(), b.entry());
            prop_assert_eq!(a.kid(), b.kid());
            prop_assert_eq!(a.signature(), b.signature());
            prop_assert_eq!(a.signed_bytes(), b.signed_bytes());
            prop_assert_eq!(a.hash(), b.hash());
        }
        (Err(a), Err(b)) => prop_assert_eq!(a, b),
        _ => prop_assert!(
            false,
            "decoders disagree: one-pass {:?}, reference {:?}",
            fast.as_ref().map(SignedEntry::entry),
            reference.as_ref().map(SignedEntry::entry)
        ),
    }
    Ok(())
}

/// A COSE_Sign1 in the entry profile around an arbitrary payload (signature arbitrary too:
/// decoding does not check it).
fn envelope(payload: Vec<u8>, signature: [u8; 64]) -> Vec<u8> {
    let kid = KeyId::of(&key().verifying_key());
    let protected = HeaderBuilder::new()
        .algorithm(Algorithm::EdDSA)
        .content_type(ENTRY_CONTENT_TYPE.to_string())
        .key_id(kid.as_bytes().to_vec())
        .build();
    let mut cose = CoseSign1Builder::new()
        .protected(protected)
        .payload(payload)
        .build();
    cose.signature = signature.to_vec();
    cose.to_tagged_vec().unwrap()
}

#[derive(Debug, Clone)]
enum Mutation {
    Set(prop::sample::Index, u8),
    Insert(prop::sample::Index, u8),
    Delete(prop::sample::Index),
    Truncate(prop::sample::Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        1 => (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        1 => any::<prop::sample::Index>().prop_map(Mutation::Delete),
        1 => any::<prop::sample::Index>().prop_map(Mutation::Truncate),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    if bytes.is_empty() {
        return;
    }
    match m {
        Mutation::Set(i, b) => {
            let i = i.index(bytes.len());
            bytes[i] = *b;
        }
        Mutation::Insert(i, b) => bytes.insert(i.index(bytes.len() + 1), *b),
        Mutation::Delete(i) => {
            bytes.remove(i.index(bytes.len()));
        }
        Mutation::Truncate(i) => bytes.truncate(i.index(bytes.len())),
    }
}

/// Small CBOR values of every kind a signed payload may hold, nested a few levels.
fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        any::<u64>().prop_map(|n| Value::Integer(Integer::from(n))),
        any::<i64>().prop_map(|n| Value::Integer(Integer::from(n))),
        proptest::collection::vec(any::<u8>(), 0..40).prop_map(Value::Bytes),
        "\\PC{0,30}".prop_map(Value::Text),
        any::<bool>().prop_map(Value::Bool),
        Just(Value::Null),
    ];
    leaf.prop_recursive(5, 64, 8, |inner| {
        let key = prop_oneof![
            "[a-z]{0,6}".prop_map(Value::Text),
            any::<i32>().prop_map(|n| Value::Integer(Integer::from(n))),
        ];
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            proptest::collection::vec((key, inner), 0..8).prop_map(Value::Map),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn decoders_agree_on_valid_entries(e in entry()) {
        let bytes = signed(&e);
        assert_same(&bytes)?;
        let decoded = SignedEntry::decode(&bytes).unwrap();
        prop_assert_eq!(decoded.entry(), &e);
        // The one-pass CBOR reader takes every payload the encoder writes.
        prop_assert!(cbor::decode_one_pass(&e.payload().unwrap()).is_some());
    }

    #[test]
    fn decoders_agree_on_mutated_entries(
        e in entry(),
        ms in proptest::collection::vec(mutation(), 1..4),
    ) {
        let mut bytes = signed(&e);
        for m in &ms {
            apply(&mut bytes, m);
        }
        assert_same(&bytes)?;
    }

    #[test]
    fn decoders_agree_on_mutated_payloads_in_a_valid_envelope(
        e in entry(),
        ms in proptest::collection::vec(mutation(), 1..4),
        sig in any::<[u8; 32]>(),
    ) {
        let mut payload = e.payload().unwrap();
        for m in &ms {
            apply(&mut payload, m);
        }
        let mut signature = [0u8; 64];
        signature[..32].copy_from_slice(&sig);
        let bytes = envelope(payload.clone(), signature);
        assert_same(&bytes)?;
        let fast = Entry::from_payload(&payload);
        let reference = Entry::from_payload_reference(&payload);
        prop_assert_eq!(fast, reference);
    }

    #[test]
    fn decoders_agree_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        assert_same(&bytes)?;
        let fast: Result<Entry, EntryError> = Entry::from_payload(&bytes);
        prop_assert_eq!(fast, Entry::from_payload_reference(&bytes));
    }

    #[test]
    fn one_pass_cbor_reads_every_deterministic_value(v in value()) {
        let Ok(bytes) = cbor::encode(&v) else {
            // Duplicate map keys: no deterministic encoding exists.
            return Ok(());
        };
        let reference = cbor::decode_reference(&bytes).unwrap();
        prop_assert_eq!(cbor::decode_one_pass(&bytes), Some(reference));
    }

    #[test]
    fn one_pass_cbor_accepts_only_what_the_reference_accepts(
        v in value(),
        ms in proptest::collection::vec(mutation(), 0..4),
        raw in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        // Encoded with ciborium as given (unsorted, duplicates allowed), then mutated; and
        // arbitrary bytes.
        let mut bytes = Vec::new();
        ciborium::ser::into_writer(&v, &mut bytes).unwrap();
        for m in &ms {
            apply(&mut bytes, m);
        }
        for input in [&bytes, &raw] {
            if let Some(value) = cbor::decode_one_pass(input) {
                prop_assert_eq!(cbor::decode_reference(input), Ok(value));
            }
            prop_assert_eq!(cbor::decode(input), cbor::decode_reference(input));
        }
    }
}

#[test]
fn one_pass_cbor_follows_the_reference_on_nesting_and_edge_encodings() {
    // Nested arrays, 1 to 24 deep: the one-pass reader stops early, the reference decides.
    for depth in 1..24 {
        let mut bytes = vec![0x81; depth];
        bytes.push(0x01);
        assert_eq!(cbor::decode(&bytes), cbor::decode_reference(&bytes));
        if let Some(v) = cbor::decode_one_pass(&bytes) {
            assert_eq!(cbor::decode_reference(&bytes), Ok(v));
        }
    }
    // Heads at and around every width boundary, shortest and not; negative extremes; simple
    // values, floats, tags, indefinite lengths, breaks, invalid UTF-8, unsorted and duplicate
    // keys.
    let cases: &[&str] = &[
        "17",
        "1818",
        "1817",
        "18ff",
        "190100",
        "1900ff",
        "1a00010000",
        "1a0000ffff",
        "1b0000000100000000",
        "1b00000000ffffffff",
        "1bffffffffffffffff",
        "3bffffffffffffffff",
        "20",
        "37",
        "3818",
        "3817",
        "5700",
        "5817",
        "581800",
        "f4",
        "f5",
        "f6",
        "f7",
        "f814",
        "f820",
        "f93c00",
        "c101",
        "9f01ff",
        "ff",
        "62c328",
        "a2616101616102",
        "a2616201616102",
        "a2616101616201",
        "a201010002",
        "a200010102",
        "a2200101017f",
        "80",
        "a0",
        "40",
        "60",
    ];
    for hex in cases {
        let bytes = hex::decode(hex).unwrap();
        if let Some(v) = cbor::decode_one_pass(&bytes) {
            assert_eq!(cbor::decode_reference(&bytes), Ok(v), "{hex}");
        }
        assert_eq!(
            cbor::decode(&bytes),
            cbor::decode_reference(&bytes),
            "{hex}"
        );
    }
}
