//! The `call_result` event: how a forwarded MCP call ended. Its bytes round-trip through the
//! one encoder and decoder, and the state fold refuses one that names no earlier entry.

use attestplane_verifier::UnixMillis;
use attestplane_verifier::attestation::TrustAnchor;
use attestplane_verifier::entry::{Entry, EntryHash, Event, KeyId, SignedEntry};
use attestplane_verifier::state::{State, StateError};
use ed25519_dalek::SigningKey;

fn entry(seq: u64, event: Event) -> Entry {
    Entry {
        seq,
        prev: EntryHash::ZERO,
        epoch: 0,
        time: UnixMillis::from_millis(1_700_000_000_000),
        event,
    }
}

#[test]
fn call_result_round_trips_through_the_one_encoder() {
    let key = SigningKey::from_bytes(&[9; 32]);
    let kid = KeyId::of(&key.verifying_key());
    for outcome in ["ok", "error", "aborted"] {
        let e = entry(
            12,
            Event::CallResult {
                call: 11,
                outcome: outcome.into(),
                result: [7; 32],
            },
        );
        let bytes = e.sign(&kid, &key).unwrap();
        let decoded = SignedEntry::decode(&bytes).unwrap();
        assert_eq!(decoded.entry(), &e);
        assert_eq!(decoded.entry().event.type_name(), "call_result");
    }
}

#[test]
fn call_result_naming_no_earlier_entry_or_an_unknown_outcome_is_refused() {
    let anchor = TrustAnchor::aws_nitro_root_g1();
    for (call, outcome) in [(12, "ok"), (13, "ok"), (11, "maybe")] {
        let mut state = State::new(anchor.clone());
        let e = entry(
            12,
            Event::CallResult {
                call,
                outcome: outcome.into(),
                result: [0; 32],
            },
        );
        // The check does not depend on the apply mode; `apply_own` takes an entry without the
        // log (and epoch document) that `State::apply`'s `VerifiedEntry` needs.
        assert_eq!(
            state.apply_own(12, &e),
            Err(StateError::BadCallResult { seq: 12 }),
            "call {call}, outcome {outcome}"
        );
    }
}
