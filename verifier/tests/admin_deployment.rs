//! The state fold refuses a log that records, as accepted, an admin request made for another
//! deployment: another log (another genesis entry) or this log under another origin.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use attestplane_verifier::UnixMillis;
use attestplane_verifier::admin::{AdminAction, AdminRequest, Deployment};
use attestplane_verifier::attestation::TrustAnchor;
use attestplane_verifier::entry::{Entry, EntryHash, Event, KeyId, SignedEntry};
use attestplane_verifier::reason::Reason;
use attestplane_verifier::state::{State, StateError};
use ed25519_dalek::SigningKey;

const ORIGIN: &str = "attestplane.test/log";
const T: u64 = 1_795_305_600_000;

/// A log under construction, signed by one test epoch key (the fold does not check
/// signatures; the log verifier does, and is not what this file tests: the enclave's tests
/// cover the verified path, boot replay included).
struct Log {
    epoch_key: SigningKey,
    admin: SigningKey,
    entries: Vec<Vec<u8>>,
}

impl Log {
    /// Entries 0 (epoch start) and 1 (genesis with the admin key).
    fn new() -> Self {
        let mut log = Log {
            epoch_key: SigningKey::from_bytes(&[1; 32]),
            admin: SigningKey::from_bytes(&[2; 32]),
            entries: Vec::new(),
        };
        log.push(Event::EpochStart {
            attestation: vec![0xa0],
        });
        let keys = vec![log.admin.verifying_key().to_bytes()];
        log.push(Event::Genesis {
            admin_keys: keys,
            host_chosen: false,
        });
        log
    }

    fn genesis(&self) -> EntryHash {
        EntryHash::of(&self.entries[1])
    }

    fn deployment(&self) -> Deployment {
        Deployment {
            origin: ORIGIN.into(),
            genesis: self.genesis(),
        }
    }

    fn push(&mut self, event: Event) -> u64 {
        let seq = self.entries.len() as u64;
        let prev = self
            .entries
            .last()
            .map_or(EntryHash::ZERO, |b| EntryHash::of(b));
        let kid = KeyId::of(&self.epoch_key.verifying_key());
        let bytes = Entry {
            seq,
            prev,
            epoch: 0,
            time: UnixMillis::from_millis(T + seq),
            event,
        }
        .sign(&kid, &self.epoch_key)
        .unwrap();
        self.entries.push(bytes);
        seq
    }

    /// Logs a policy change for `deployment` as `accepted`.
    fn admin(&mut self, deployment: Deployment, accepted: bool) -> u64 {
        let seq = self.entries.len() as u64;
        let request = AdminRequest {
            time: UnixMillis::from_millis(T + seq),
            nonce: [seq as u8; 16],
            deployment,
            action: AdminAction::SetPolicy {
                text: "permit(principal, action, resource);".into(),
            },
        }
        .sign(&self.admin.verifying_key(), &self.admin)
        .unwrap();
        self.push(Event::Admin {
            request,
            accepted,
            reason: (!accepted).then_some(Reason::OtherDeployment),
        })
    }

    /// Folds every entry into `state` as the enclave applies the entries it writes
    /// (`apply_own`, giving the genesis hash as it writes genesis; the log verifier's path,
    /// `apply`, takes it from the verified genesis entry's bytes instead).
    fn fold(&self, mut state: State) -> Result<State, StateError> {
        for (seq, bytes) in self.entries.iter().enumerate() {
            let entry = SignedEntry::decode(bytes).unwrap();
            state.apply_own(seq as u64, entry.entry())?;
            if let Event::Genesis { .. } = entry.entry().event {
                state.set_genesis_hash(entry.hash());
            }
        }
        Ok(state)
    }
}

fn state() -> State {
    State::new(TrustAnchor::aws_nitro_root_g1())
}

#[test]
fn an_accepted_request_for_this_deployment_applies() {
    let mut log = Log::new();
    let d = log.deployment();
    log.admin(d.clone(), true);
    log.admin(d.clone(), true);
    for s in [state(), state().with_origin(ORIGIN)] {
        let s = log.fold(s).unwrap();
        assert_eq!(s.deployment(), Some(d.clone()));
        assert_eq!(s.policy().policy_count(), 1);
    }
}

#[test]
fn rejects_log_accepting_a_request_for_another_log() {
    let mut log = Log::new();
    let other = Deployment {
        genesis: EntryHash::from_bytes([9; 32]),
        ..log.deployment()
    };
    let seq = log.admin(other, true);
    let e = log.fold(state()).unwrap_err();
    assert!(
        matches!(&e, StateError::ForgedAdmin { seq: s, reason } if *s == seq && *reason == Reason::OtherDeployment),
        "{e:?}"
    );
}

#[test]
fn rejects_log_accepting_a_request_for_another_origin() {
    let mut log = Log::new();
    let renamed = Deployment {
        origin: "attestplane.test/copy".into(),
        ..log.deployment()
    };
    let seq = log.admin(renamed.clone(), true);
    // The auditor who holds a checkpoint of this log pins its origin.
    let e = log.fold(state().with_origin(ORIGIN)).unwrap_err();
    assert_eq!(e.seq(), seq, "{e:?}");
    assert!(matches!(e, StateError::ForgedAdmin { .. }), "{e:?}");

    // Unpinned, the first accepted request names the origin; a second origin in one log is
    // refused.
    let mut log = Log::new();
    log.admin(log.deployment(), true);
    let seq = log.admin(renamed, true);
    let e = log.fold(state()).unwrap_err();
    assert_eq!(e.seq(), seq, "{e:?}");
    assert!(matches!(e, StateError::ForgedAdmin { .. }), "{e:?}");
}

#[test]
fn a_refused_request_for_another_deployment_changes_nothing() {
    let mut log = Log::new();
    let other = Deployment {
        genesis: EntryHash::from_bytes([9; 32]),
        ..log.deployment()
    };
    log.admin(other, false);
    let s = log.fold(state()).unwrap();
    assert_eq!(s.policy().policy_count(), 0);
    assert_eq!(
        s.deployment(),
        None,
        "no origin learned from a refused request"
    );
}
