//! The tamper matrix: every way a compromised host could rework a stored log, each detected by
//! `verify_log` and each naming the first bad sequence number (docs/design.md, "Trust model").
//!
//! Logs are built here by hand from the verifier's encoders, with epoch documents from the mock
//! NSM, so each test can produce exactly the forgery it names. One test also runs the enclave's
//! real `LogWriter` across two epochs.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::BTreeMap;

use attestplane_enclave::nsm::{Clock, MockNsm, Nsm};
use attestplane_enclave::writer::{Head, LogWriter};
use attestplane_verifier::UnixMillis;
use attestplane_verifier::attestation::{Pcr, PcrIndex, TrustAnchor};
use attestplane_verifier::checkpoint::{Checkpoint, sign_checkpoint};
use attestplane_verifier::entry::{Entry, EntryHash, EpochBinding, Event, KeyId};
use attestplane_verifier::log::{LogError, LogPolicy, LogVerifier, claimed_size, verify_log};
use attestplane_verifier::merkle::{self, CompactRange};
use ed25519_dalek::SigningKey;

/// 2026-11-22T00:00:00Z.
const T0: u64 = 1_795_305_600_000;
const ORIGIN: &str = "attestplane.test/log";

fn nsm(seed: u8) -> MockNsm {
    MockNsm::builder([seed; 32], Clock::Fixed(UnixMillis::from_millis(T0))).build()
}

fn pcrs_of(nsm: &MockNsm) -> BTreeMap<PcrIndex, Pcr> {
    (0u8..3)
        .map(|i| {
            let v = nsm.describe_pcr(u16::from(i)).unwrap().value;
            (
                PcrIndex::try_from(i).unwrap(),
                Pcr::try_from(v.as_slice()).unwrap(),
            )
        })
        .collect()
}

fn policy(nsm: &MockNsm) -> LogPolicy {
    let anchor = TrustAnchor::from_pem(nsm.root_pem().unwrap().as_bytes()).unwrap();
    LogPolicy::new(anchor, pcrs_of(nsm))
}

fn at() -> UnixMillis {
    UnixMillis::from_millis(T0 + 3_600_000)
}

/// How to forge the document that opens an epoch.
#[derive(Clone, Copy, Default)]
struct EpochForgery {
    /// Attest this key instead of the one that signs.
    other_key: bool,
    /// Bind this predecessor hash instead of the real one.
    other_prev: bool,
}

struct Builder {
    nsm: MockNsm,
    entries: Vec<Vec<u8>>,
    head: EntryHash,
    time: u64,
    epoch: Option<(u64, SigningKey)>,
    keys: Vec<SigningKey>,
    frontier: CompactRange,
}

impl Builder {
    fn new(nsm: MockNsm) -> Self {
        Self {
            nsm,
            entries: Vec::new(),
            head: EntryHash::ZERO,
            time: T0,
            epoch: None,
            keys: Vec::new(),
            frontier: CompactRange::new(),
        }
    }

    fn push_signed(&mut self, bytes: Vec<u8>) {
        self.head = EntryHash::of(&bytes);
        self.frontier
            .push(merkle::leaf_hash(self.head.as_bytes()))
            .unwrap();
        self.entries.push(bytes);
    }

    fn open_epoch(&mut self, key_seed: u8) -> &mut Self {
        self.open_epoch_forged(key_seed, EpochForgery::default())
    }

    fn open_epoch_forged(&mut self, key_seed: u8, forge: EpochForgery) -> &mut Self {
        let key = SigningKey::from_bytes(&[key_seed; 32]);
        let number = self.epoch.as_ref().map_or(0, |(n, _)| n + 1);
        let seq = self.entries.len() as u64;
        let binding = EpochBinding {
            epoch: number,
            seq,
            prev: if forge.other_prev {
                EntryHash::from_bytes([0xee; 32])
            } else {
                self.head
            },
        };
        let attested = if forge.other_key {
            SigningKey::from_bytes(&[0xaa; 32]).verifying_key()
        } else {
            key.verifying_key()
        };
        let doc = self
            .nsm
            .attest(
                Some(binding.encode().unwrap()),
                None,
                Some(attested.as_bytes().to_vec()),
            )
            .unwrap();
        self.time += 10;
        let bytes = Entry {
            seq,
            prev: self.head,
            epoch: number,
            time: UnixMillis::from_millis(self.time),
            event: Event::EpochStart { attestation: doc },
        }
        .sign(&KeyId::of(&key.verifying_key()), &key)
        .unwrap();
        self.push_signed(bytes);
        self.keys.push(key.clone());
        self.epoch = Some((number, key));
        self
    }

    fn entry(&self, event: Event) -> Entry {
        Entry {
            seq: self.entries.len() as u64,
            prev: self.head,
            epoch: self.epoch.as_ref().map_or(0, |(n, _)| *n),
            time: UnixMillis::from_millis(self.time),
            event,
        }
    }

    fn filler(&self) -> Event {
        Event::Checkpoint {
            size: self.entries.len() as u64,
            root: *self.frontier.root().as_bytes(),
        }
    }

    fn append(&mut self, n: usize) -> &mut Self {
        for _ in 0..n {
            self.time += 10;
            let e = self.entry(self.filler());
            let (_, key) = self.epoch.as_ref().unwrap();
            let bytes = e.sign(&KeyId::of(&key.verifying_key()), key).unwrap();
            self.push_signed(bytes);
        }
        self
    }

    fn append_with(&mut self, e: Entry, key: &SigningKey, kid: KeyId) -> &mut Self {
        let bytes = e.sign(&kid, key).unwrap();
        self.push_signed(bytes);
        self
    }

    fn checkpoint(&self) -> String {
        let (_, key) = self.epoch.as_ref().unwrap();
        let cp = Checkpoint::new(ORIGIN, self.entries.len() as u64, self.frontier.root()).unwrap();
        sign_checkpoint(&cp, ORIGIN, key).unwrap()
    }
}

/// Two epochs: 0 opens at seq 0 with entries 1..=10; 1 opens at seq 11 with entries 12..=21.
fn two_epochs() -> Builder {
    let mut b = Builder::new(nsm(1));
    b.open_epoch(10).append(10).open_epoch(11).append(10);
    b
}

fn verify(b: &Builder, entries: &[Vec<u8>]) -> Result<u64, LogError> {
    verify_log(entries, policy(&b.nsm), at()).map(|l| l.size())
}

fn first_bad(b: &Builder, entries: &[Vec<u8>]) -> u64 {
    let err = verify(b, entries).expect_err("tampered log verified");
    err.seq()
        .unwrap_or_else(|| panic!("error names no sequence number: {err}"))
}

fn verify_with_checkpoint(b: &Builder, entries: &[Vec<u8>], note: &str) -> Result<u64, LogError> {
    let mut v = LogVerifier::new(policy(&b.nsm), at())?;
    if let Some(size) = claimed_size(note) {
        v.remember_root_at(size);
    }
    v.verify_round(entries)?;
    v.finish_with_checkpoint(note).map(|l| l.size())
}

#[test]
fn accepts_intact_two_epoch_log() {
    let b = two_epochs();
    let log = verify_log(&b.entries, policy(&b.nsm), at()).unwrap();
    assert_eq!(log.size(), 22);
    assert_eq!(log.epochs().len(), 2);
    assert_eq!(log.epochs()[1].start_seq, 11);
    assert_eq!(log.root(), b.frontier.root());
    assert_eq!(
        verify_with_checkpoint(&b, &b.entries, &b.checkpoint()).unwrap(),
        22
    );
}

#[test]
fn rejects_modified_byte_naming_its_entry() {
    let b = two_epochs();
    let target = 5;
    let len = b.entries[target].len();
    for pos in (0..len).step_by(3) {
        let mut entries = b.entries.clone();
        entries[target][pos] ^= 0x01;
        assert_eq!(
            first_bad(&b, &entries),
            target as u64,
            "flipping byte {pos} of entry {target}"
        );
    }
}

#[test]
fn rejects_modified_epoch_document() {
    let b = two_epochs();
    let mut entries = b.entries.clone();
    // Somewhere inside the embedded attestation document of the second epoch.
    let mid = entries[11].len() / 2;
    entries[11][mid] ^= 0x80;
    assert_eq!(first_bad(&b, &entries), 11);
}

#[test]
fn rejects_dropped_entry() {
    let b = two_epochs();
    let mut entries = b.entries.clone();
    entries.remove(7);
    assert!(matches!(
        verify(&b, &entries),
        Err(LogError::SequenceMismatch { seq: 7, found: 8 })
    ));
}

#[test]
fn rejects_reordered_entries() {
    let b = two_epochs();
    let mut entries = b.entries.clone();
    entries.swap(4, 5);
    assert!(matches!(
        verify(&b, &entries),
        Err(LogError::SequenceMismatch { seq: 4, found: 5 })
    ));
}

#[test]
fn rejects_duplicated_entry() {
    let b = two_epochs();
    let mut entries = b.entries.clone();
    entries.insert(6, entries[5].clone());
    assert!(matches!(
        verify(&b, &entries),
        Err(LogError::SequenceMismatch { seq: 6, found: 5 })
    ));
}

#[test]
fn rejects_entry_spliced_from_another_log() {
    let a = two_epochs();
    // Another control plane on the same (mock) hardware and image: same root, same PCRs.
    let mut other = Builder::new(nsm(1));
    other.open_epoch(20).append(20);
    let mut entries = a.entries.clone();
    entries[5] = other.entries[5].clone();
    assert!(matches!(
        verify(&a, &entries),
        Err(LogError::BrokenLink { seq: 5, .. })
    ));
    // A whole foreign epoch spliced in after seq 10 does not link either.
    let mut entries = a.entries[..11].to_vec();
    entries.extend(other.entries[11..].iter().cloned());
    assert_eq!(first_bad(&a, &entries), 11);
}

#[test]
fn rejects_log_truncated_inside_an_epoch_given_a_checkpoint() {
    let b = two_epochs();
    let note = b.checkpoint();
    let cut = &b.entries[..15];
    // Without a checkpoint a cut-off tail is undetectable: the prefix is a valid log.
    assert_eq!(verify(&b, cut).unwrap(), 15);
    assert!(matches!(
        verify_with_checkpoint(&b, cut, &note),
        Err(LogError::Truncated {
            seq: 15,
            size: 15,
            checkpoint_size: 22
        })
    ));
    // Cut before the epoch whose key signed the checkpoint.
    let cut = &b.entries[..8];
    assert!(matches!(
        verify_with_checkpoint(&b, cut, &note),
        Err(LogError::Truncated { seq: 8, .. })
    ));
}

#[test]
fn rejects_checkpoint_of_a_forked_log() {
    let b = two_epochs();
    // The epoch-1 key signs a checkpoint over a different history of the same size.
    let (_, key) = b.epoch.as_ref().unwrap();
    let forged = Checkpoint::new(ORIGIN, 22, merkle::leaf_hash(b"fork")).unwrap();
    let note = sign_checkpoint(&forged, ORIGIN, key).unwrap();
    assert!(matches!(
        verify_with_checkpoint(&b, &b.entries, &note),
        Err(LogError::CheckpointRootMismatch { size: 22, .. })
    ));
    // A checkpoint signed by a key that is no epoch key of the log proves nothing.
    let stranger = SigningKey::from_bytes(&[0x55; 32]);
    let cp = Checkpoint::new(ORIGIN, 22, b.frontier.root()).unwrap();
    let note = sign_checkpoint(&cp, ORIGIN, &stranger).unwrap();
    assert!(matches!(
        verify_with_checkpoint(&b, &b.entries, &note),
        Err(LogError::Checkpoint(_))
    ));
}

#[test]
fn rejects_entry_signed_by_previous_epoch_key() {
    let mut b = two_epochs();
    let old = b.keys[0].clone();
    let old_kid = KeyId::of(&old.verifying_key());
    let e = b.entry(b.filler());
    b.append_with(e, &old, old_kid);
    let seq = 22;
    assert!(matches!(
        verify(&b, &b.entries),
        Err(LogError::WrongKey { seq: 22, .. })
    ));

    // The same, naming the current key id but signed with the old key.
    let mut b = two_epochs();
    let current_kid = KeyId::of(&b.keys[1].verifying_key());
    let e = b.entry(b.filler());
    b.append_with(e, &old, current_kid);
    assert!(matches!(
        verify(&b, &b.entries),
        Err(LogError::BadSignature { seq: 22, .. })
    ));

    // Or claiming the old epoch number outright.
    let mut b = two_epochs();
    let mut e = b.entry(b.filler());
    e.epoch = 0;
    b.append_with(e, &old, old_kid);
    assert_eq!(first_bad(&b, &b.entries), seq);
}

#[test]
fn rejects_epoch_attesting_a_different_key() {
    let mut b = Builder::new(nsm(1));
    b.open_epoch(10).append(3).open_epoch_forged(
        11,
        EpochForgery {
            other_key: true,
            ..Default::default()
        },
    );
    assert!(matches!(
        verify(&b, &b.entries),
        Err(LogError::EpochKeyMismatch { seq: 4, .. })
    ));
}

#[test]
fn rejects_epoch_binding_a_different_predecessor() {
    let mut b = Builder::new(nsm(1));
    b.open_epoch(10).append(3).open_epoch_forged(
        11,
        EpochForgery {
            other_prev: true,
            ..Default::default()
        },
    );
    assert!(matches!(
        verify(&b, &b.entries),
        Err(LogError::EpochBindingMismatch { seq: 4, .. })
    ));
}

#[test]
fn rejects_replayed_epoch_document() {
    // The host re-uses epoch 0's (genuine) document to open a later epoch under its own key.
    let b = two_epochs();
    let Event::EpochStart { attestation } =
        attestplane_verifier::entry::SignedEntry::decode(&b.entries[0])
            .unwrap()
            .into_entry()
            .event
    else {
        panic!("entry 0 is not an epoch start");
    };
    let mut forged = Builder::new(nsm(1));
    forged.open_epoch(10).append(10);
    let host_key = SigningKey::from_bytes(&[10; 32]); // even with epoch 0's own key
    let e = Entry {
        seq: 11,
        prev: forged.head,
        epoch: 1,
        time: UnixMillis::from_millis(forged.time + 10),
        event: Event::EpochStart { attestation },
    };
    forged.append_with(e, &host_key, KeyId::of(&host_key.verifying_key()));
    assert!(matches!(
        verify(&forged, &forged.entries),
        Err(LogError::EpochBindingMismatch { seq: 11, .. })
    ));
}

#[test]
fn rejects_epoch_from_another_image() {
    let b = two_epochs();
    // Same hardware root, different image measurements.
    let other_image = MockNsm::builder([1; 32], Clock::Fixed(UnixMillis::from_millis(T0)))
        .image_measurements([7; 48], [8; 48], [9; 48])
        .build();
    let mut forged = Builder::new(other_image);
    forged.open_epoch(10).append(2);
    assert!(matches!(
        verify_log(&forged.entries, policy(&b.nsm), at()),
        Err(LogError::ImageNotAllowed { seq: 0, pcrs }) if pcrs.get(&PcrIndex::try_from(0u8).unwrap()) == Some(&Pcr::new([7; 48]))
    ));
}

#[test]
fn rejects_debug_mode_epoch_unless_allowed() {
    let debug = MockNsm::builder([1; 32], Clock::Fixed(UnixMillis::from_millis(T0)))
        .debug_mode(true)
        .build();
    let mut b = Builder::new(debug);
    b.open_epoch(10).append(2);
    let mut p = policy(&b.nsm);
    assert!(matches!(
        verify_log(&b.entries, p.clone(), at()),
        Err(LogError::EpochAttestation { seq: 0, .. })
    ));
    p.allow_debug = true;
    assert!(verify_log(&b.entries, p, at()).is_ok());
}

#[test]
fn rejects_log_not_opening_with_an_epoch() {
    let b = two_epochs();
    assert!(matches!(
        verify(&b, &b.entries[1..]),
        Err(LogError::SequenceMismatch { seq: 0, found: 1 })
    ));
    // An entry 0 that is not an epoch start.
    let mut c = Builder::new(nsm(1));
    let key = SigningKey::from_bytes(&[10; 32]);
    let e = c.entry(Event::Checkpoint {
        size: 0,
        root: [0; 32],
    });
    c.append_with(e, &key, KeyId::of(&key.verifying_key()));
    assert!(matches!(
        verify(&c, &c.entries),
        Err(LogError::MissingEpochStart { seq: 0 })
    ));
}

#[test]
fn rejects_time_going_backwards_and_future_entries() {
    let mut b = two_epochs();
    let mut e = b.entry(b.filler());
    e.time = UnixMillis::from_millis(T0);
    let key = b.keys[1].clone();
    b.append_with(e, &key, KeyId::of(&key.verifying_key()));
    assert!(matches!(
        verify(&b, &b.entries),
        Err(LogError::TimeWentBackwards { seq: 22, .. })
    ));

    let mut b = two_epochs();
    let mut e = b.entry(b.filler());
    e.time = UnixMillis::from_millis(at().as_millis() + 3_600_000);
    b.append_with(e, &key, KeyId::of(&key.verifying_key()));
    assert!(matches!(
        verify(&b, &b.entries),
        Err(LogError::FromTheFuture { seq: 22, .. })
    ));
}

#[test]
fn refuses_to_verify_without_expected_pcrs() {
    let b = two_epochs();
    let mut p = policy(&b.nsm);
    p.images.clear();
    assert!(matches!(
        verify_log(&b.entries, p.clone(), at()),
        Err(LogError::NoExpectedPcrs)
    ));
    // An image of no PCRs would match any document.
    p.images = vec![policy(&b.nsm).images[0].clone(), Default::default()];
    assert!(matches!(
        verify_log(&b.entries, p, at()),
        Err(LogError::NoExpectedPcrs)
    ));
}

#[test]
fn writer_output_verifies_across_epochs() {
    let nsm = nsm(3);
    let now = UnixMillis::from_millis(T0);
    let (mut w0, first) = LogWriter::open(&nsm, Head::empty(), ORIGIN, now).unwrap();
    let mut entries = vec![first.bytes];
    for i in 0..5 {
        let e = Event::Checkpoint {
            size: i,
            root: [0; 32],
        };
        entries.push(w0.append(e, now).unwrap().bytes);
    }
    let (mut w1, start) = LogWriter::open(&nsm, w0.head().clone(), ORIGIN, now).unwrap();
    assert_eq!(start.seq, 6);
    entries.push(start.bytes);
    for i in 0..5 {
        let e = Event::Checkpoint {
            size: i,
            root: [0; 32],
        };
        entries.push(w1.append(e, now).unwrap().bytes);
    }
    let note = w1.checkpoint().unwrap();
    let mut v = LogVerifier::new(policy(&nsm), at()).unwrap();
    v.remember_root_at(12);
    v.verify_round(&entries).unwrap();
    let log = v.finish_with_checkpoint(&note).unwrap();
    assert_eq!(log.size(), 12);
    assert_eq!(log.epochs().len(), 2);
    assert_ne!(log.epochs()[0].kid, log.epochs()[1].kid);
}
