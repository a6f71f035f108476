//! The log-entry format: known-answer bytes, round trips, and strictness under mutation.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use attestplane_verifier::UnixMillis;
use attestplane_verifier::entry::{Entry, EntryHash, EpochBinding, Event, KeyId, SignedEntry};
use ed25519_dalek::SigningKey;
use proptest::prelude::*;

fn key() -> SigningKey {
    SigningKey::from_bytes(&[0x42; 32])
}

fn entry(seq: u64, prev: [u8; 32], epoch: u64, time: u64, event: Event) -> Entry {
    Entry {
        seq,
        prev: EntryHash::from_bytes(prev),
        epoch,
        time: UnixMillis::from_millis(time),
        event,
    }
}

/// Pins the exact bytes of one entry of format v1. The payload hex was written by hand from
/// RFC 8949 §4.2.1 and the entry hash computed independently (by `scripts/gen-format-kat`, its
/// `checkpoint_entry` case, and checked with Python `cryptography` Ed25519 over the same
/// Sig_structure), not copied from this crate's output. If this changes, every existing log
/// stops verifying: change it only with a new format version.
#[test]
fn entry_bytes_known_answer() {
    let k = key();
    let kid = KeyId::of(&k.verifying_key());
    let e = entry(
        1,
        [0x11; 32],
        0,
        1_700_000_000_000,
        Event::Checkpoint {
            size: 1,
            root: [0x22; 32],
        },
    );
    let payload = e.payload().unwrap();
    assert_eq!(
        hex::encode(&payload),
        concat!(
            "a5", // map(5), keys in deterministic order
            "63736571",
            "01", // "seq": 1
            "6470726576",
            "5820",
            "1111111111111111111111111111111111111111111111111111111111111111",
            "6474696d65",
            "1b0000018bcfe56800", // "time": 1700000000000
            "6565706f6368",
            "00",           // "epoch": 0
            "656576656e74", // "event":
            "a3",
            "64726f6f74",
            "5820",
            "2222222222222222222222222222222222222222222222222222222222222222",
            "6473697a65",
            "01", // "size": 1
            "6474797065",
            "6a636865636b706f696e74", // "type": "checkpoint"
        )
    );
    let bytes = e.sign(&kid, &k).unwrap();
    // Tag 18, array(4), protected bstr(82) {1: -8, 3: content type, 4: kid}, {}, payload, sig.
    assert_eq!(hex::encode(&bytes[..4]), "d2845852");
    assert_eq!(
        hex::encode(&bytes[4..54]),
        concat!(
            "a30127", // map(3), 1: -8
            "03",
            "7829", // 3: text(41)
            "6170706c69636174696f6e2f766e642e617474657374706c616e652e656e7472792e76312b63626f72",
            "045820", // 4: bstr(32), the kid follows
        ),
        "the protected header names application/vnd.attestplane.entry.v1+cbor"
    );
    assert_eq!(
        EntryHash::of(&bytes).to_hex(),
        "3e9527bd421d2c98f1a771f06102e32a74a24304eb1475770cb60d6a7e8f6883",
        "entry hash changed: the encoding is no longer what existing logs hold"
    );
}

#[test]
fn rejects_non_canonical_cose_framing() {
    let k = key();
    let kid = KeyId::of(&k.verifying_key());
    let bytes = entry(
        0,
        [0; 32],
        0,
        5,
        Event::Checkpoint {
            size: 0,
            root: [0; 32],
        },
    )
    .sign(&kid, &k)
    .unwrap();
    // Re-encode the protected header bstr length in the two-byte form (0x59 00 50 instead of
    // 0x58 50): same COSE structure, different bytes. It must not be accepted.
    let mut longer = bytes[..2].to_vec();
    longer.extend_from_slice(&[0x59, 0x00]);
    longer.extend_from_slice(&bytes[3..]);
    assert!(SignedEntry::decode(&longer).is_err());
}

fn arb_event() -> impl Strategy<Value = Event> {
    prop_oneof![
        (any::<u64>(), any::<[u8; 32]>()).prop_map(|(size, root)| Event::Checkpoint { size, root }),
        proptest::collection::vec(any::<u8>(), 0..300)
            .prop_map(|attestation| Event::EpochStart { attestation }),
    ]
}

fn arb_entry() -> impl Strategy<Value = Entry> {
    (
        any::<u64>(),
        any::<[u8; 32]>(),
        any::<u64>(),
        any::<u64>(),
        arb_event(),
    )
        .prop_map(|(s, p, ep, t, ev)| entry(s, p, ep, t, ev))
}

proptest! {
    #[test]
    fn entries_round_trip(e in arb_entry()) {
        let k = key();
        let kid = KeyId::of(&k.verifying_key());
        let bytes = e.sign(&kid, &k).unwrap();
        let decoded = SignedEntry::decode(&bytes).unwrap();
        prop_assert_eq!(decoded.entry(), &e);
        prop_assert!(decoded.verify(&k.verifying_key()).is_ok());
        prop_assert_eq!(Entry::from_payload(&e.payload().unwrap()).unwrap(), e);
    }

    #[test]
    fn any_single_byte_change_is_rejected(e in arb_entry(), pos in any::<prop::sample::Index>(), delta in 1u8..=255) {
        let k = key();
        let kid = KeyId::of(&k.verifying_key());
        let mut bytes = e.sign(&kid, &k).unwrap();
        let i = pos.index(bytes.len());
        bytes[i] ^= delta;
        let accepted = SignedEntry::decode(&bytes)
            .map(|d| d.verify(&k.verifying_key()).is_ok())
            .unwrap_or(false);
        prop_assert!(!accepted, "a modified entry verified (byte {} ^ {:#x})", i, delta);
    }

    #[test]
    fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = SignedEntry::decode(&bytes);
        let _ = Entry::from_payload(&bytes);
        let _ = EpochBinding::decode(&bytes);
        let _ = attestplane_verifier::cbor::item_len(&bytes);
    }

    #[test]
    fn decoder_never_panics_on_mutated_entries(e in arb_entry(), cuts in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let k = key();
        let mut bytes = e.sign(&KeyId::of(&k.verifying_key()), &k).unwrap();
        for (pos, b) in cuts {
            let i = pos.index(bytes.len());
            bytes[i] = b;
        }
        let _ = SignedEntry::decode(&bytes);
        let _ = SignedEntry::decode(&bytes[..bytes.len() / 2]);
    }
}

/// The known answers `scripts/gen-format-kat` computed with its own CBOR, COSE and RFC 8032
/// Ed25519 (Python's standard library only): never this crate's output.
const KAT: &str = include_str!("data/format-kat.json");

fn kat(name: &str) -> (Vec<u8>, Vec<u8>, String) {
    let all: serde_json::Value = serde_json::from_str(KAT).unwrap();
    let case = all["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no known answer {name}"));
    let hex_of = |k: &str| hex::decode(case[k].as_str().unwrap()).unwrap();
    (
        hex_of("payload"),
        hex_of("signed"),
        case["sha256"].as_str().unwrap().to_owned(),
    )
}

/// Every case's bytes, as the crate encodes them, equal the independent generator's; and the
/// crate decodes and verifies the generator's bytes back to the same values.
#[test]
fn encoder_bytes_equal_the_independent_known_answers() {
    use attestplane_verifier::admin::{
        AdminAction, AdminRequest, Deployment, RateLimit, ScopeKind, SignedAdminRequest, SpendCap,
    };
    use attestplane_verifier::reason::Reason;

    let epoch = key();
    let kid = KeyId::of(&epoch.verifying_key());
    let admin = SigningKey::from_bytes(&[0x07; 32]);
    let check = |name: &str, payload: Vec<u8>, signed: Vec<u8>| {
        let (want_payload, want_signed, want_hash) = kat(name);
        assert_eq!(
            hex::encode(&payload),
            hex::encode(&want_payload),
            "{name}: payload"
        );
        assert_eq!(
            hex::encode(&signed),
            hex::encode(&want_signed),
            "{name}: signed bytes"
        );
        assert_eq!(EntryHash::of(&signed).to_hex(), want_hash, "{name}: hash");
    };

    let checkpoint = entry(
        1,
        [0x11; 32],
        0,
        1_700_000_000_000,
        Event::Checkpoint {
            size: 1,
            root: [0x22; 32],
        },
    );
    check(
        "checkpoint_entry",
        checkpoint.payload().unwrap(),
        checkpoint.sign(&kid, &epoch).unwrap(),
    );

    let genesis = entry(
        1,
        [0x33; 32],
        0,
        1_700_000_000_001,
        Event::Genesis {
            admin_keys: vec![admin.verifying_key().to_bytes()],
            host_chosen: false,
        },
    );
    let genesis_bytes = genesis.sign(&kid, &epoch).unwrap();
    check(
        "genesis_entry",
        genesis.payload().unwrap(),
        genesis_bytes.clone(),
    );

    let request = AdminRequest {
        time: UnixMillis::from_millis(1_700_000_000_002),
        nonce: [0x05; 16],
        deployment: Deployment {
            origin: "attestplane.test/log".into(),
            genesis: EntryHash::of(&genesis_bytes),
        },
        action: AdminAction::SetLimits {
            rates: vec![RateLimit {
                scope: ScopeKind::Agent,
                rate_per_minute: 60,
                burst: 10,
            }],
            spends: vec![SpendCap {
                scope: ScopeKind::Tenant,
                asset: "credits".into(),
                cap: 100_000,
                window_ms: 86_400_000,
            }],
        },
    };
    let request_bytes = request.sign(&admin.verifying_key(), &admin).unwrap();
    check(
        "admin_request",
        request.payload().unwrap(),
        request_bytes.clone(),
    );
    let decoded = SignedAdminRequest::decode(&kat("admin_request").1).unwrap();
    assert_eq!(decoded.request(), &request);
    assert!(decoded.verify(&[admin.verifying_key()]).is_ok());

    let refused = entry(
        2,
        *EntryHash::of(&genesis_bytes).as_bytes(),
        0,
        1_700_000_000_003,
        Event::Admin {
            request: request_bytes,
            accepted: false,
            reason: Some(Reason::Forbidden {
                policies: vec!["a".into(), "b".into()],
            }),
        },
    );
    check(
        "refused_admin_entry",
        refused.payload().unwrap(),
        refused.sign(&kid, &epoch).unwrap(),
    );
    for name in ["checkpoint_entry", "genesis_entry", "refused_admin_entry"] {
        // The generator's bytes, read back by the log verifier's decoder.
        let decoded = SignedEntry::decode(&kat(name).1).unwrap();
        assert!(decoded.verify(&epoch.verifying_key()).is_ok(), "{name}");
    }
    assert_eq!(
        SignedEntry::decode(&kat("refused_admin_entry").1)
            .unwrap()
            .entry(),
        &refused
    );
}

/// An entry of the format before v1 (the unversioned content type
/// `application/vnd.attestplane.entry+cbor`), validly signed, is refused by its version, not
/// read as v1 and not lumped in with malformed headers: by the one-pass decoder and the
/// reference decoder alike. Its bytes are the generator's, under the old content type.
#[test]
fn rejects_pre_v1_entry_by_its_version() {
    use attestplane_verifier::entry::{EntryError, FormatVersion};

    let (_, pre_v1, hash) = kat("pre_v1_checkpoint_entry");
    // The hash entries of this content had before v1: the generator reproduces the old format.
    assert_eq!(
        hash,
        "4e809cada362753e96385cbacdf040106ba6b25cf6b1b213444cce00cb546d46"
    );
    let want = EntryError::UnsupportedVersion {
        found: FormatVersion::PreV1,
    };
    assert_eq!(SignedEntry::decode(&pre_v1).unwrap_err(), want);
    assert_eq!(SignedEntry::decode_reference(&pre_v1).unwrap_err(), want);
    assert_eq!(
        want.to_string(),
        "entry format pre-v1 is not v1, the only version this verifier reads"
    );
}

/// An admin request signed under the pre-v1 content type is refused by its version.
#[test]
fn rejects_pre_v1_admin_request_by_its_version() {
    use attestplane_verifier::admin::{AdminError, SignedAdminRequest};
    use attestplane_verifier::entry::FormatVersion;

    let (_, v1, _) = kat("admin_request");
    // The same request with "admin.v1+cbor" spelled "admin+cbor": the protected header shrinks
    // by three bytes, and the signature no longer matters (the version is refused first).
    let v1_hex = hex::encode(&v1);
    let ct_v1 = hex::encode("\x78\x29application/vnd.attestplane.admin.v1+cbor");
    let ct_pre = hex::encode("\x78\x26application/vnd.attestplane.admin+cbor");
    assert!(v1_hex.starts_with("d2845852"));
    let pre = v1_hex
        .replacen("d2845852", "d284584f", 1)
        .replacen(&ct_v1, &ct_pre, 1);
    assert_ne!(pre, v1_hex);
    let err = SignedAdminRequest::decode(&hex::decode(pre).unwrap()).unwrap_err();
    assert_eq!(
        err,
        AdminError::UnsupportedVersion {
            found: FormatVersion::PreV1
        }
    );
}
