//! The log-entry format: known-answer bytes, round trips, and strictness under mutation.

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

/// Pins the exact bytes of one entry. The payload hex was written by hand from RFC 8949 §4.2.1
/// and the entry hash computed independently (Python `cryptography` Ed25519 over a hand-built
/// COSE Sig_structure), not copied from this crate's output. If this changes, every existing log stops verifying:
/// change it only with a new format version.
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
    // Tag 18, array(4), protected bstr(79) {1: -8, 3: content type, 4: kid}, {}, payload, sig.
    assert_eq!(hex::encode(&bytes[..4]), "d284584f");
    assert_eq!(
        EntryHash::of(&bytes).to_hex(),
        "4e809cada362753e96385cbacdf040106ba6b25cf6b1b213444cce00cb546d46",
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
