//! The `call_result` event: how a forwarded MCP call ended. Its bytes round-trip through the
//! one encoder and decoder, and the state fold refuses one that names no earlier entry.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use attestplane_verifier::UnixMillis;
use attestplane_verifier::attestation::TrustAnchor;
use std::collections::BTreeMap;

use attestplane_verifier::entry::{Entry, EntryHash, Event, KeyId, PiiRecord, SignedEntry};
use attestplane_verifier::state::{State, StateError};
use ed25519_dalek::SigningKey;

fn pii(action: &str, counts: &[(&str, u64)]) -> PiiRecord {
    PiiRecord {
        action: action.into(),
        counts: counts
            .iter()
            .map(|(k, n)| (k.to_string(), *n))
            .collect::<BTreeMap<_, _>>(),
    }
}

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
    for (outcome, found) in [
        ("ok", pii("redact", &[("card", 2), ("email", 1)])),
        ("error", pii("allow", &[])),
        ("withheld", pii("refuse", &[("iban", 1)])),
        ("aborted", pii("redact", &[])),
    ] {
        let e = entry(
            12,
            Event::CallResult {
                call: 11,
                outcome: outcome.into(),
                result: [7; 32],
                pii: found,
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
    let none = || pii("redact", &[]);
    for (call, outcome, found) in [
        (12, "ok", none()),
        (13, "ok", none()),
        (11, "maybe", none()),
        // An unknown rule, a result that passed although its rule refuses what it carried, a
        // withheld result with nothing found or under another rule, an aborted call that
        // claims findings: each is a record the gateway never writes.
        (11, "ok", pii("sometimes", &[])),
        (11, "ok", pii("refuse", &[("card", 1)])),
        (11, "withheld", pii("refuse", &[])),
        (11, "withheld", pii("redact", &[("card", 1)])),
        (11, "aborted", pii("redact", &[("card", 1)])),
    ] {
        let mut state = State::new(anchor.clone());
        let e = entry(
            12,
            Event::CallResult {
                call,
                outcome: outcome.into(),
                result: [0; 32],
                pii: found,
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
    // And the consistent ones are accepted (so the refusals above are about what they name).
    for (outcome, found) in [
        ("ok", pii("refuse", &[])),
        ("withheld", pii("refuse", &[("card", 1)])),
        ("ok", pii("allow", &[("card", 1)])),
    ] {
        let mut state = State::new(anchor.clone());
        let e = entry(
            12,
            Event::CallResult {
                call: 11,
                outcome: outcome.into(),
                result: [0; 32],
                pii: found,
            },
        );
        assert_eq!(state.apply_own(12, &e), Ok(()), "{outcome}");
    }
}
