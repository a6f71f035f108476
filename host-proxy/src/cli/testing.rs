//! Helpers shared by the CLI modules' unit tests.

use attestplane_verifier::UnixMillis;
use attestplane_verifier::admin::Deployment;
use attestplane_verifier::entry::{Entry, EntryHash, Event, KeyId};
use ed25519_dalek::SigningKey;

use super::ClientContext;

/// A context for the proxy at `url` with every other setting unset.
pub fn context(url: &str) -> ClientContext {
    ClientContext {
        url: url.to_owned(),
        json: false,
        admin_key: None,
        token: None,
        idp_key: None,
        idp_issuer: None,
        idp_audience: None,
        root: None,
        pcrs: None,
        allow_debug: false,
        config: None,
        origin: None,
        genesis: None,
    }
}

/// The test deployment: origin `attestplane.test/log`, genesis hash all 7s.
pub fn deployment() -> Deployment {
    Deployment {
        origin: "attestplane.test/log".into(),
        genesis: EntryHash::from_bytes([7; 32]),
    }
}

/// Entry `seq` carrying `event` (epoch 0, no previous hash), signed by `key`.
pub fn signed_entry(seq: u64, event: Event, key: &SigningKey) -> Vec<u8> {
    Entry {
        seq,
        prev: EntryHash::ZERO,
        epoch: 0,
        time: UnixMillis::from_millis(1_764_870_000_000 + seq),
        event,
    }
    .sign(&KeyId::of(&key.verifying_key()), key)
    .unwrap()
}
