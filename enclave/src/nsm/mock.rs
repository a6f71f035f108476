//! A deterministic software NSM.
//!
//! [`MockNsm`] answers the same requests as the device, with the device's semantics:
//!
//! - 32 PCRs of 48 bytes. At "boot" PCRs 0–15 are set from the configured image measurements
//!   (PCR0/1/2, derived from the seed unless given), the instance (PCR4 = SHA-384(0⁴⁸ ‖
//!   instance id)) and zeros elsewhere, then locked; PCRs 16–31 start at zero, unlocked.
//!   In debug mode PCR0/1/2/8 read zero, as on a real enclave started with `--debug-mode`.
//! - `ExtendPCR`: `PCR = SHA-384(PCR ‖ data)`; a locked PCR answers `ReadOnlyIndex`, an index
//!   past 31 `InvalidIndex`. `LockPCR` on a locked PCR answers `ReadOnlyIndex`; `LockPCRs(n)`
//!   locks `0..n` (`InvalidIndex` past 32). These follow QEMU's NSM emulator where AWS's
//!   documentation is silent.
//! - `GetRandom`: 256 bytes per call from the operating system's generator, so that no two
//!   boots hand out the same bytes (the epoch key is made from them). A fixture that must be
//!   reproducible asks for [`MockNsmBuilder::fixture_randomness`]: ChaCha20 seeded with the seed.
//! - `Attestation`: a document with every locked PCR, signed by the leaf of a generated chain
//!   (see `certs`), `user_data`/`nonce`/`public_key` as given (each at most 1024 bytes, else
//!   `InputTooLarge`), the timestamp read from the mock's [`Clock`].
//!
//! Determinism: the same seed, configuration and sequence of (time, request) give the same
//! response bytes, except `GetRandom`, which is reproducible only with fixture randomness. The
//! chain is issued at the first attestation, anchored at that instant, and issued again
//! (anchored anew) when the clock leaves the first two hours of the leaf's three-hour life, so
//! every document has at least an hour of leaf validity left.
//!
//! Trust: none. The seed is no secret; anyone who knows it can forge this mock's documents,
//! which is why a verifier accepts them only when told to pin this mock's root. Randomness is
//! another matter: were it derived from a public seed, every epoch of every run would sign with
//! one key anyone can compute, and a restart would never change keys. So it comes from the
//! operating system unless a caller explicitly asks for a fixture's reproducible stream.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::{Mutex, PoisonError};
use std::time::SystemTime;

use attestplane_verifier::UnixMillis;
use rand_chacha::ChaCha20Rng;
use rand_core::{OsRng, RngCore, SeedableRng};
use sha2::{Digest as _, Sha256, Sha384};

use super::certs::{
    ChainSpec, IssuedChain, KeyRing, LEAF_LIFETIME_MS, MockError, MockIdentity, certificate_pem,
    issue_chain,
};
use super::document::{
    DocumentFaults, MapEncoding, PayloadFields, SignatureS, encode_payload, sign_cose,
};
use super::{
    BOOT_LOCKED_PCRS, Digest, ErrorCode, MAX_ATTESTATION_FIELD_LEN, Nsm, PCR_COUNT, PCR_LEN,
    Request, Response,
};

/// Bytes one `GetRandom` returns, as on current devices.
pub const RANDOM_CHUNK_LEN: usize = 256;

/// The largest `ExtendPCR` data the mock accepts (the driver's request limit is 4096 bytes).
pub const MAX_EXTEND_DATA_LEN: usize = 4096;

/// A chain is reused for documents signed within this long after its anchor.
const CHAIN_REUSE_MS: u64 = LEAF_LIFETIME_MS - 3_600_000;

const PCR_INDEX_LEN: usize = PCR_COUNT as usize;

/// Where the mock's time comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Clock {
    /// A pinned instant, moved only by [`MockNsm::set_time`] and [`MockNsm::advance_time`].
    Fixed(UnixMillis),
    /// The operating system's clock. For the developer binary only; tests pin time.
    System,
}

impl Clock {
    fn now(&self) -> UnixMillis {
        match self {
            Self::Fixed(t) => *t,
            Self::System => UnixMillis::from_system_time(SystemTime::now()),
        }
    }
}

/// Configures a [`MockNsm`].
#[derive(Clone, Debug)]
pub struct MockNsmBuilder {
    seed: [u8; 32],
    clock: Clock,
    identity: MockIdentity,
    boot_pcrs: Vec<(u16, [u8; PCR_LEN])>,
    debug_mode: bool,
    map_encoding: MapEncoding,
    fixture_randomness: bool,
    chain: Option<ChainSpec>,
    faults: DocumentFaults,
    signature_s: SignatureS,
}

impl MockNsmBuilder {
    /// A mock whose keys, identity and image measurements derive from `seed`, reading time
    /// from `clock`. Its randomness comes from the operating system (see
    /// [`fixture_randomness`](Self::fixture_randomness)).
    pub fn new(seed: [u8; 32], clock: Clock) -> Self {
        Self {
            seed,
            clock,
            identity: MockIdentity::from_seed(&seed),
            boot_pcrs: Vec::new(),
            debug_mode: false,
            map_encoding: MapEncoding::Definite,
            fixture_randomness: false,
            chain: None,
            faults: DocumentFaults::default(),
            signature_s: SignatureS::AsSigned,
        }
    }

    /// Sets the boot value of PCR `index` (0–15; other indices are ignored).
    pub fn boot_pcr(mut self, index: u16, value: [u8; PCR_LEN]) -> Self {
        if index < BOOT_LOCKED_PCRS {
            self.boot_pcrs.push((index, value));
        }
        self
    }

    /// Sets the image measurements PCR0, PCR1 and PCR2.
    pub fn image_measurements(
        self,
        pcr0: [u8; PCR_LEN],
        pcr1: [u8; PCR_LEN],
        pcr2: [u8; PCR_LEN],
    ) -> Self {
        self.boot_pcr(0, pcr0).boot_pcr(1, pcr1).boot_pcr(2, pcr2)
    }

    /// Runs as an enclave started in debug mode: PCR0, 1, 2 and 8 read zero.
    pub fn debug_mode(mut self, on: bool) -> Self {
        self.debug_mode = on;
        self
    }

    /// How the payload's outer map is written (definite by default).
    pub fn map_encoding(mut self, encoding: MapEncoding) -> Self {
        self.map_encoding = encoding;
        self
    }

    /// Hands out randomness derived from the seed instead of the operating system's, so that
    /// everything made from it (the epoch key, nonces) is the same on every run. For fixtures
    /// and known-answer tests only: with a public seed, anyone can compute those keys.
    pub fn fixture_randomness(mut self) -> Self {
        self.fixture_randomness = true;
        self
    }

    /// Presents another identity (module id, certificate names, PCR4).
    pub fn identity(mut self, identity: MockIdentity) -> Self {
        self.identity = identity;
        self
    }

    /// The mock, booted: PCRs 0–15 set and locked.
    pub fn build(self) -> MockNsm {
        let mut pcrs = [PcrSlot::ZERO; PCR_INDEX_LEN];
        for (index, slot) in (0u16..).zip(pcrs.iter_mut()) {
            slot.value = self.default_boot_pcr(index);
        }
        for (index, value) in &self.boot_pcrs {
            if let Some(slot) = pcrs.get_mut(usize::from(*index)) {
                slot.value = *value;
            }
        }
        if self.debug_mode {
            for index in [0usize, 1, 2, 8] {
                if let Some(slot) = pcrs.get_mut(index) {
                    slot.value = [0; PCR_LEN];
                }
            }
        }
        for slot in pcrs.iter_mut().take(usize::from(BOOT_LOCKED_PCRS)) {
            slot.locked = true;
        }
        let chain = self
            .chain
            .unwrap_or_else(|| ChainSpec::aws_like(&self.identity));
        let random = if self.fixture_randomness {
            let seed: [u8; 32] = Sha256::new()
                .chain_update(b"attestplane mock nsm random\0")
                .chain_update(self.seed)
                .finalize()
                .into();
            Randomness::Fixture(Box::new(ChaCha20Rng::from_seed(seed)))
        } else {
            Randomness::Os
        };
        MockNsm {
            module_id: self.identity.module_id(),
            identity: self.identity,
            chain_spec: chain,
            faults: self.faults,
            signature_s: self.signature_s,
            map_encoding: self.map_encoding,
            state: Mutex::new(State {
                pcrs,
                random,
                clock: self.clock,
                chain: None,
                keys: KeyRing::new(self.seed),
            }),
        }
    }

    fn default_boot_pcr(&self, index: u16) -> [u8; PCR_LEN] {
        match index {
            // An image measurement: SHA-384(0⁴⁸ ‖ SHA-384(section data)), here of a seeded label.
            0..=2 => {
                let section = Sha384::new()
                    .chain_update(b"attestplane mock nsm image section\0")
                    .chain_update(self.seed)
                    .chain_update(index.to_be_bytes())
                    .finalize();
                extend(&[0; PCR_LEN], &section)
            }
            4 => extend(&[0; PCR_LEN], self.identity.instance_id.as_bytes()),
            _ => [0; PCR_LEN],
        }
    }
}

/// Test tooling on the mock's builder.
impl MockNsmBuilder {
    /// Test tooling: issue this chain instead of the AWS-like default.
    pub fn chain_spec(mut self, spec: ChainSpec) -> Self {
        self.chain = Some(spec);
        self
    }

    /// Test tooling: break every document this mock signs in these ways.
    pub fn document_faults(mut self, faults: DocumentFaults) -> Self {
        self.faults = faults;
        self
    }

    /// Test tooling: force the half of the field the signatures' `s` lies in.
    pub fn signature_s(mut self, form: SignatureS) -> Self {
        self.signature_s = form;
        self
    }
}

#[derive(Clone, Copy, Debug)]
struct PcrSlot {
    value: [u8; PCR_LEN],
    locked: bool,
}

impl PcrSlot {
    const ZERO: Self = Self {
        value: [0; PCR_LEN],
        locked: false,
    };
}

/// Where `GetRandom`'s bytes come from.
enum Randomness {
    /// The operating system's generator (the default).
    Os,
    /// ChaCha20 seeded from the mock's seed (fixtures only).
    Fixture(Box<ChaCha20Rng>),
}

impl Randomness {
    /// Fills `out`; `false` if the operating system's generator failed.
    fn fill(&mut self, out: &mut [u8]) -> bool {
        match self {
            Self::Os => OsRng.try_fill_bytes(out).is_ok(),
            Self::Fixture(rng) => {
                rng.fill_bytes(out);
                true
            }
        }
    }
}

struct State {
    pcrs: [PcrSlot; PCR_INDEX_LEN],
    random: Randomness,
    clock: Clock,
    chain: Option<IssuedChain>,
    keys: KeyRing,
}

/// A software NSM that behaves like the device and signs with a chain generated from a seed.
pub struct MockNsm {
    module_id: String,
    identity: MockIdentity,
    chain_spec: ChainSpec,
    faults: DocumentFaults,
    signature_s: SignatureS,
    map_encoding: MapEncoding,
    state: Mutex<State>,
}

impl fmt::Debug for MockNsm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MockNsm")
            .field("module_id", &self.module_id)
            .field("map_encoding", &self.map_encoding)
            .finish_non_exhaustive()
    }
}

impl MockNsm {
    /// A mock for the developer binary: default configuration, system clock.
    pub fn with_system_clock(seed: [u8; 32]) -> Self {
        MockNsmBuilder::new(seed, Clock::System).build()
    }

    /// Starts configuring a mock (same as [`MockNsmBuilder::new`]).
    pub fn builder(seed: [u8; 32], clock: Clock) -> MockNsmBuilder {
        MockNsmBuilder::new(seed, clock)
    }

    /// The identity this mock presents.
    pub fn identity(&self) -> &MockIdentity {
        &self.identity
    }

    /// The instant the mock's clock reads.
    pub fn now(&self) -> UnixMillis {
        self.lock().clock.now()
    }

    /// Pins the clock at `at`.
    pub fn set_time(&self, at: UnixMillis) {
        self.lock().clock = Clock::Fixed(at);
    }

    /// Moves a pinned clock forward by `ms` (saturating); pins a system clock at now + `ms`.
    pub fn advance_time(&self, ms: u64) {
        let mut state = self.lock();
        let now = state.clock.now();
        state.clock = Clock::Fixed(now.checked_add_millis(ms).unwrap_or(now));
    }

    /// The current value of every locked PCR: what the next document will carry.
    pub fn locked_pcrs(&self) -> Vec<(u16, [u8; PCR_LEN])> {
        let state = self.lock();
        (0u16..)
            .zip(state.pcrs.iter())
            .filter(|(_, slot)| slot.locked)
            .map(|(i, slot)| (i, slot.value))
            .collect()
    }

    /// The chain documents are signed with at the clock's instant, root first, leaf last (DER).
    pub fn chain_der(&self) -> Result<Vec<Vec<u8>>, MockError> {
        let mut state = self.lock();
        let now = state.clock.now();
        Ok(self.current_chain(&mut state, now)?.root_first.clone())
    }

    /// The root certificate of this mock's chain (DER), to pin as a trust anchor.
    pub fn root_der(&self) -> Result<Vec<u8>, MockError> {
        self.chain_der()?
            .into_iter()
            .next()
            .ok_or(MockError::ChainTooShort { found: 0 })
    }

    /// The root certificate of this mock's chain as PEM.
    pub fn root_pem(&self) -> Result<String, MockError> {
        certificate_pem(&self.root_der()?)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The chain valid at `now`, issuing it if there is none or the current one is too old.
    fn current_chain<'s>(
        &self,
        state: &'s mut State,
        now: UnixMillis,
    ) -> Result<&'s IssuedChain, MockError> {
        let fresh = state.chain.as_ref().is_some_and(|c| {
            now.millis_since(c.anchor)
                .is_some_and(|age| age < CHAIN_REUSE_MS)
        });
        if !fresh {
            let anchor = UnixMillis::from_secs(now.as_secs());
            state.chain = Some(issue_chain(&self.chain_spec, &mut state.keys, anchor)?);
        }
        state
            .chain
            .as_ref()
            .ok_or(MockError::ChainTooShort { found: 0 })
    }

    fn attestation(
        &self,
        state: &mut State,
        user_data: Option<Vec<u8>>,
        nonce: Option<Vec<u8>>,
        public_key: Option<Vec<u8>>,
    ) -> Response {
        let too_long = |v: &Option<Vec<u8>>| {
            v.as_ref()
                .is_some_and(|v| v.len() > MAX_ATTESTATION_FIELD_LEN)
        };
        if !self.faults.allow_oversized_fields
            && (too_long(&user_data) || too_long(&nonce) || too_long(&public_key))
        {
            return Response::Error(ErrorCode::InputTooLarge);
        }
        let now = state.clock.now();
        let pcrs: Vec<(u16, Vec<u8>)> = (0u16..)
            .zip(state.pcrs.iter())
            .filter(|(_, slot)| slot.locked)
            .map(|(i, slot)| (i, slot.value.to_vec()))
            .collect();
        let chain = match self.current_chain(state, now) {
            Ok(chain) => chain.clone(),
            Err(_) => return Response::Error(ErrorCode::InternalError),
        };
        let fields = PayloadFields {
            module_id: &self.module_id,
            digest: "SHA384",
            timestamp: now.as_millis(),
            pcrs,
            certificate: &chain.leaf,
            cabundle: &chain.cabundle,
            public_key: public_key.as_deref(),
            user_data: user_data.as_deref(),
            nonce: nonce.as_deref(),
        };
        let payload = encode_payload(&fields, self.map_encoding, &self.faults);
        let label = self
            .faults
            .sign_with_key
            .as_deref()
            .unwrap_or(&chain.leaf_key_label);
        let key = state.keys.key(label);
        let document = sign_cose(&payload, &key, self.signature_s, &self.faults);
        Response::Attestation { document }
    }
}

/// `SHA-384(pcr ‖ data)`.
fn extend(pcr: &[u8; PCR_LEN], data: &[u8]) -> [u8; PCR_LEN] {
    Sha384::new()
        .chain_update(pcr)
        .chain_update(data)
        .finalize()
        .into()
}

impl Nsm for MockNsm {
    fn process(&self, request: Request) -> Response {
        let mut state = self.lock();
        match request {
            Request::DescribePCR { index } => match state.pcrs.get(usize::from(index)) {
                Some(slot) => Response::DescribePCR {
                    lock: slot.locked,
                    data: slot.value.to_vec(),
                },
                None => Response::Error(ErrorCode::InvalidIndex),
            },
            Request::ExtendPCR { index, data } => {
                if data.len() > MAX_EXTEND_DATA_LEN {
                    return Response::Error(ErrorCode::InputTooLarge);
                }
                match state.pcrs.get_mut(usize::from(index)) {
                    None => Response::Error(ErrorCode::InvalidIndex),
                    Some(slot) if slot.locked => Response::Error(ErrorCode::ReadOnlyIndex),
                    Some(slot) => {
                        slot.value = extend(&slot.value, &data);
                        Response::ExtendPCR {
                            data: slot.value.to_vec(),
                        }
                    }
                }
            }
            Request::LockPCR { index } => match state.pcrs.get_mut(usize::from(index)) {
                None => Response::Error(ErrorCode::InvalidIndex),
                Some(slot) if slot.locked => Response::Error(ErrorCode::ReadOnlyIndex),
                Some(slot) => {
                    slot.locked = true;
                    Response::LockPCR
                }
            },
            Request::LockPCRs { range } => {
                if range > PCR_COUNT {
                    return Response::Error(ErrorCode::InvalidIndex);
                }
                for slot in state.pcrs.iter_mut().take(usize::from(range)) {
                    slot.locked = true;
                }
                Response::LockPCRs
            }
            Request::DescribeNSM => Response::DescribeNSM {
                version_major: 1,
                version_minor: 0,
                version_patch: 0,
                module_id: self.module_id.clone(),
                max_pcrs: PCR_COUNT,
                locked_pcrs: (0u16..)
                    .zip(state.pcrs.iter())
                    .filter(|(_, slot)| slot.locked)
                    .map(|(i, _)| i)
                    .collect::<BTreeSet<u16>>(),
                digest: Digest::SHA384,
            },
            Request::Attestation {
                user_data,
                nonce,
                public_key,
            } => self.attestation(
                &mut state,
                user_data.map(|b| b.into_vec()),
                nonce.map(|b| b.into_vec()),
                public_key.map(|b| b.into_vec()),
            ),
            Request::GetRandom => {
                let mut random = vec![0u8; RANDOM_CHUNK_LEN];
                if state.random.fill(&mut random) {
                    Response::GetRandom { random }
                } else {
                    // As a device whose generator fails: an error, never predictable bytes.
                    Response::Error(ErrorCode::InternalError)
                }
            }
            _ => Response::Error(ErrorCode::InvalidOperation),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use ciborium::Value;
    use der::{Decode, Encode};
    use p384::ecdsa::signature::Verifier;
    use p384::ecdsa::{Signature, VerifyingKey};
    use x509_cert::Certificate;

    use super::*;
    use crate::nsm::document::sig_structure;
    use crate::nsm::{NsmError, NsmErrorCode, Operation};

    const SEED: [u8; 32] = [0x42; 32];
    const T0: UnixMillis = UnixMillis::from_millis(1_750_000_000_123);

    fn mock() -> MockNsm {
        MockNsmBuilder::new(SEED, Clock::Fixed(T0)).build()
    }

    fn refused(result: Result<impl fmt::Debug, NsmError>) -> (Operation, NsmErrorCode) {
        match result {
            Err(NsmError::Refused { operation, code }) => (operation, code),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    /// (protected, unprotected, payload, signature) of an untagged COSE_Sign1.
    fn split_cose(doc: &[u8]) -> (Vec<u8>, Value, Vec<u8>, Vec<u8>) {
        let value: Value = ciborium::from_reader(doc).unwrap();
        let Value::Array(items) = value else {
            panic!("not an array")
        };
        let [p, u, pl, s]: [Value; 4] = items.try_into().unwrap();
        (
            p.into_bytes().unwrap(),
            u,
            pl.into_bytes().unwrap(),
            s.into_bytes().unwrap(),
        )
    }

    fn payload_map(payload: &[u8]) -> Vec<(String, Value)> {
        let value: Value = ciborium::from_reader(payload).unwrap();
        value
            .into_map()
            .unwrap()
            .into_iter()
            .map(|(k, v)| (k.into_text().unwrap(), v))
            .collect()
    }

    fn field<'a>(map: &'a [(String, Value)], key: &str) -> &'a Value {
        &map.iter().find(|(k, _)| k == key).unwrap().1
    }

    fn key_of(cert_der: &[u8]) -> VerifyingKey {
        let cert = Certificate::from_der(cert_der).unwrap();
        VerifyingKey::from_sec1_bytes(
            cert.tbs_certificate
                .subject_public_key_info
                .subject_public_key
                .raw_bytes(),
        )
        .unwrap()
    }

    #[test]
    fn boot_locks_pcrs_0_to_15_with_the_configured_measurements() {
        let nsm = MockNsmBuilder::new(SEED, Clock::Fixed(T0))
            .image_measurements([1; 48], [2; 48], [3; 48])
            .build();
        let d = nsm.describe_nsm().unwrap();
        assert_eq!(d.locked_pcrs, (0..16).collect());
        assert_eq!(d.max_pcrs, 32);
        assert_eq!(d.digest, Digest::SHA384);
        assert_eq!(d.module_id, nsm.identity().module_id());
        assert_eq!(nsm.describe_pcr(1).unwrap().value, vec![2; 48]);
        assert!(nsm.describe_pcr(15).unwrap().locked);
        assert_eq!(
            nsm.describe_pcr(16).unwrap(),
            crate::nsm::PcrState {
                locked: false,
                value: vec![0; 48]
            }
        );
        let pcr4 = extend(&[0; 48], nsm.identity().instance_id.as_bytes());
        assert_eq!(nsm.describe_pcr(4).unwrap().value, pcr4.to_vec());
    }

    #[test]
    fn extend_sets_pcr_to_sha384_of_old_value_and_data() {
        let nsm = mock();
        let once = nsm.extend_pcr(16, b"abc").unwrap();
        let expected: Vec<u8> = Sha384::new()
            .chain_update([0u8; 48])
            .chain_update(b"abc")
            .finalize()
            .to_vec();
        assert_eq!(once, expected);
        let twice = nsm.extend_pcr(16, b"def").unwrap();
        let expected2: Vec<u8> = Sha384::new()
            .chain_update(&expected)
            .chain_update(b"def")
            .finalize()
            .to_vec();
        assert_eq!(twice, expected2);
        assert_eq!(nsm.describe_pcr(16).unwrap().value, expected2);
    }

    #[test]
    fn extending_a_locked_pcr_answers_read_only_index() {
        let nsm = mock();
        assert_eq!(
            refused(nsm.extend_pcr(0, b"x")),
            (Operation::ExtendPcr, NsmErrorCode::ReadOnlyIndex)
        );
        nsm.extend_pcr(20, b"x").unwrap();
        nsm.lock_pcr(20).unwrap();
        assert!(nsm.describe_pcr(20).unwrap().locked);
        assert_eq!(
            refused(nsm.extend_pcr(20, b"y")),
            (Operation::ExtendPcr, NsmErrorCode::ReadOnlyIndex)
        );
        assert_eq!(
            refused(nsm.lock_pcr(20)),
            (Operation::LockPcr, NsmErrorCode::ReadOnlyIndex)
        );
    }

    #[test]
    fn pcr_indices_past_31_answer_invalid_index() {
        let nsm = mock();
        assert_eq!(
            refused(nsm.describe_pcr(32)),
            (Operation::DescribePcr, NsmErrorCode::InvalidIndex)
        );
        assert_eq!(
            refused(nsm.extend_pcr(32, b"x")),
            (Operation::ExtendPcr, NsmErrorCode::InvalidIndex)
        );
        assert_eq!(
            refused(nsm.lock_pcr(40)),
            (Operation::LockPcr, NsmErrorCode::InvalidIndex)
        );
        assert_eq!(
            refused(nsm.lock_pcrs(33)),
            (Operation::LockPcrs, NsmErrorCode::InvalidIndex)
        );
    }

    #[test]
    fn lock_pcrs_locks_exactly_the_prefix() {
        let nsm = mock();
        nsm.lock_pcrs(18).unwrap();
        assert!(nsm.describe_pcr(17).unwrap().locked);
        assert!(!nsm.describe_pcr(18).unwrap().locked);
        assert_eq!(nsm.describe_nsm().unwrap().locked_pcrs, (0..18).collect());
    }

    #[test]
    fn debug_mode_zeroes_pcr_0_1_2_and_8() {
        let nsm = MockNsmBuilder::new(SEED, Clock::Fixed(T0))
            .image_measurements([1; 48], [2; 48], [3; 48])
            .boot_pcr(8, [8; 48])
            .boot_pcr(3, [3; 48])
            .debug_mode(true)
            .build();
        for i in [0, 1, 2, 8] {
            assert_eq!(nsm.describe_pcr(i).unwrap().value, vec![0; 48], "pcr{i}");
        }
        assert_eq!(nsm.describe_pcr(3).unwrap().value, vec![3; 48]);
    }

    #[test]
    fn random_fills_the_requested_length_across_chunks() {
        let nsm = mock();
        let r = nsm.random(1000).unwrap();
        assert_eq!(r.len(), 1000);
        assert!(r.iter().any(|&b| b != 0));
        assert!(nsm.random(0).unwrap().is_empty());
        assert!(matches!(
            nsm.random(crate::nsm::MAX_RANDOM_LEN + 1),
            Err(NsmError::RandomTooLong { .. })
        ));
        // Chunks are consecutive draws, never repeated.
        let a = nsm.random(RANDOM_CHUNK_LEN).unwrap();
        let b = nsm.random(RANDOM_CHUNK_LEN).unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn fixture_randomness_is_deterministic_per_seed() {
        let fixture = |seed| {
            MockNsmBuilder::new(seed, Clock::Fixed(T0))
                .fixture_randomness()
                .build()
        };
        assert_eq!(
            fixture(SEED).random(300).unwrap(),
            fixture(SEED).random(300).unwrap()
        );
        assert_ne!(
            fixture(SEED).random(300).unwrap(),
            fixture([1; 32]).random(300).unwrap()
        );
    }

    /// Issue 9, item 7: with randomness derived from the public development seed, every boot
    /// made the same epoch key (kid c8bc89c9… for `attestplane dev`), one anyone can compute.
    #[test]
    fn epoch_keys_do_not_repeat_across_boots_with_the_same_public_seed() {
        let boot = || MockNsmBuilder::new(SEED, Clock::Fixed(T0)).build();
        let (a, b) = (boot(), boot());
        assert_eq!(
            a.root_der().unwrap(),
            b.root_der().unwrap(),
            "same identity"
        );
        let key = |nsm: &MockNsm| crate::epoch::EpochKey::generate(nsm).unwrap().kid();
        assert_ne!(key(&a), key(&b), "two boots drew the same epoch key");
        let fixture = || {
            MockNsmBuilder::new(SEED, Clock::Fixed(T0))
                .fixture_randomness()
                .build()
        };
        assert_ne!(key(&a), key(&fixture()));
        assert_ne!(key(&b), key(&fixture()));
    }

    #[test]
    fn same_seed_and_inputs_give_byte_identical_documents() {
        let doc = |seed| {
            MockNsmBuilder::new(seed, Clock::Fixed(T0))
                .build()
                .attest(
                    Some(b"u".to_vec()),
                    Some(b"n".to_vec()),
                    Some(b"k".to_vec()),
                )
                .unwrap()
        };
        assert_eq!(doc(SEED), doc(SEED));
        assert_ne!(doc(SEED), doc([1; 32]));
    }

    #[test]
    fn document_has_the_nsm_envelope_and_payload_shape() {
        let nsm = mock();
        let doc = nsm.attest(None, Some(vec![7; 32]), None).unwrap();
        // 84 44 a1 01 38 22 a0 59 …, like every real document.
        assert_eq!(
            doc.get(..8).unwrap(),
            [0x84, 0x44, 0xa1, 0x01, 0x38, 0x22, 0xa0, 0x59]
        );
        let (protected, unprotected, payload, signature) = split_cose(&doc);
        assert_eq!(protected, [0xa1, 0x01, 0x38, 0x22]);
        assert_eq!(unprotected, Value::Map(vec![]));
        assert_eq!(signature.len(), 96);
        assert_eq!(payload.first(), Some(&0xa9));

        let map = payload_map(&payload);
        let keys: Vec<&str> = map.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "module_id",
                "digest",
                "timestamp",
                "pcrs",
                "certificate",
                "cabundle",
                "public_key",
                "user_data",
                "nonce"
            ]
        );
        assert_eq!(
            field(&map, "module_id"),
            &Value::Text(nsm.identity().module_id())
        );
        assert_eq!(field(&map, "digest"), &Value::Text("SHA384".into()));
        assert_eq!(
            field(&map, "timestamp"),
            &Value::Integer(T0.as_millis().into())
        );
        assert_eq!(field(&map, "public_key"), &Value::Null);
        assert_eq!(field(&map, "user_data"), &Value::Null);
        assert_eq!(field(&map, "nonce"), &Value::Bytes(vec![7; 32]));
        let pcrs = field(&map, "pcrs").as_map().unwrap();
        assert_eq!(pcrs.len(), 16);
        let cabundle = field(&map, "cabundle").as_array().unwrap();
        assert_eq!(cabundle.len(), 4);

        // The signature verifies under the leaf's key, over the Sig_structure.
        let leaf = field(&map, "certificate").as_bytes().unwrap();
        let sig = Signature::from_slice(&signature).unwrap();
        key_of(leaf)
            .verify(&sig_structure(&protected, &payload), &sig)
            .unwrap();
    }

    #[test]
    fn coset_parses_and_verifies_the_document() {
        use coset::CborSerializable;
        let doc = mock().attest(Some(vec![]), None, None).unwrap();
        let sign1 = coset::CoseSign1::from_slice(&doc).unwrap();
        assert_eq!(
            sign1.protected.header.alg,
            Some(coset::RegisteredLabelWithPrivate::Assigned(
                coset::iana::Algorithm::ES384
            ))
        );
        let payload = sign1.payload.clone().unwrap();
        let map = payload_map(&payload);
        assert_eq!(field(&map, "user_data"), &Value::Bytes(vec![]));
        let leaf = key_of(field(&map, "certificate").as_bytes().unwrap());
        sign1
            .verify_signature(b"", |sig, data| {
                leaf.verify(data, &Signature::from_slice(sig).unwrap())
            })
            .unwrap();
    }

    #[test]
    fn indefinite_encoding_wraps_the_payload_in_bf_ff() {
        let nsm = MockNsmBuilder::new(SEED, Clock::Fixed(T0))
            .map_encoding(MapEncoding::Indefinite)
            .build();
        let (_, _, payload, _) = split_cose(&nsm.attest(None, None, None).unwrap());
        assert_eq!(payload.first(), Some(&0xbf));
        assert_eq!(payload.last(), Some(&0xff));
        assert_eq!(payload_map(&payload).len(), 9);
    }

    #[test]
    fn document_carries_every_locked_pcr() {
        let nsm = mock();
        let value = nsm.extend_pcr(16, b"app").unwrap();
        nsm.lock_pcr(16).unwrap();
        let (_, _, payload, _) = split_cose(&nsm.attest(None, None, None).unwrap());
        let map = payload_map(&payload);
        let pcrs: BTreeMap<u64, Vec<u8>> = field(&map, "pcrs")
            .as_map()
            .unwrap()
            .iter()
            .map(|(k, v)| {
                (
                    u64::try_from(k.as_integer().unwrap()).unwrap(),
                    v.as_bytes().unwrap().clone(),
                )
            })
            .collect();
        assert_eq!(pcrs.len(), 17);
        assert_eq!(pcrs.get(&16), Some(&value));
        let expected: BTreeMap<u64, Vec<u8>> = nsm
            .locked_pcrs()
            .into_iter()
            .map(|(i, v)| (u64::from(i), v.to_vec()))
            .collect();
        assert_eq!(pcrs, expected);
    }

    #[test]
    fn attestation_refuses_fields_over_1024_bytes() {
        let nsm = mock();
        assert!(nsm.attest(Some(vec![0; 1024]), None, None).is_ok());
        for (u, n, k) in [
            (Some(vec![0; 1025]), None, None),
            (None, Some(vec![0; 1025]), None),
            (None, None, Some(vec![0; 1025])),
        ] {
            assert_eq!(
                refused(nsm.attest(u, n, k)),
                (Operation::Attestation, NsmErrorCode::InputTooLarge)
            );
        }
    }

    #[test]
    fn chain_links_verify_and_match_the_aws_profile() {
        let nsm = mock();
        let chain = nsm.chain_der().unwrap();
        assert_eq!(chain.len(), 5);
        let certs: Vec<Certificate> = chain
            .iter()
            .map(|d| Certificate::from_der(d).unwrap())
            .collect();
        for (i, cert) in certs.iter().enumerate() {
            let issuer = &certs[i.saturating_sub(1)];
            assert_eq!(cert.tbs_certificate.issuer, issuer.tbs_certificate.subject);
            let sig = Signature::from_der(cert.signature.raw_bytes()).unwrap();
            key_of(&issuer.to_der().unwrap())
                .verify(&cert.tbs_certificate.to_der().unwrap(), &sig)
                .unwrap();
            let not_before = cert.tbs_certificate.validity.not_before.to_unix_duration();
            let not_after = cert.tbs_certificate.validity.not_after.to_unix_duration();
            let now = std::time::Duration::from_millis(T0.as_millis());
            assert!(
                not_before <= now && now <= not_after,
                "cert {i} valid at T0"
            );
        }
        let leaf = &certs[4].tbs_certificate.validity;
        let life = leaf.not_after.to_unix_duration() - leaf.not_before.to_unix_duration();
        assert_eq!(life.as_secs(), 3 * 3600 + 3);
        let constraints: Vec<(bool, Option<u8>)> = certs
            .iter()
            .map(|c| {
                let (critical, bc) = c
                    .tbs_certificate
                    .get::<x509_cert::ext::pkix::BasicConstraints>()
                    .unwrap()
                    .unwrap();
                assert!(critical);
                (bc.ca, bc.path_len_constraint)
            })
            .collect();
        assert_eq!(
            constraints,
            [
                (true, None),
                (true, Some(2)),
                (true, Some(1)),
                (true, Some(0)),
                (false, None)
            ]
        );
        let usages: Vec<(bool, bool, bool)> = certs
            .iter()
            .map(|c| {
                let (critical, ku) = c
                    .tbs_certificate
                    .get::<x509_cert::ext::pkix::KeyUsage>()
                    .unwrap()
                    .unwrap();
                (critical, ku.key_cert_sign(), ku.digital_signature())
            })
            .collect();
        assert_eq!(
            usages,
            [
                (true, true, true),
                (true, true, true),
                (true, true, true),
                (true, true, false),
                (false, false, true)
            ]
        );
    }

    #[test]
    fn root_survives_reissue_while_intermediates_change() {
        let nsm = mock();
        let first = nsm.chain_der().unwrap();
        nsm.advance_time(30 * 60 * 1000);
        assert_eq!(nsm.chain_der().unwrap(), first, "reused within two hours");
        nsm.advance_time(2 * 3600 * 1000);
        let second = nsm.chain_der().unwrap();
        assert_eq!(second.first(), first.first());
        assert_ne!(second.get(1), first.get(1));
        assert_ne!(second.last(), first.last());
        let pem = nsm.root_pem().unwrap();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----\n"));
    }

    #[test]
    fn high_and_low_s_signatures_both_verify() {
        let docs: Vec<Vec<u8>> = [SignatureS::High, SignatureS::Low]
            .into_iter()
            .map(|form| {
                MockNsmBuilder::new(SEED, Clock::Fixed(T0))
                    .signature_s(form)
                    .build()
                    .attest(None, None, None)
                    .unwrap()
            })
            .collect();
        assert_ne!(docs[0], docs[1]);
        for (doc, high) in docs.iter().zip([true, false]) {
            let (protected, _, payload, signature) = split_cose(doc);
            let sig = Signature::from_slice(&signature).unwrap();
            assert_eq!(sig.normalize_s().is_some(), high);
            let map = payload_map(&payload);
            key_of(field(&map, "certificate").as_bytes().unwrap())
                .verify(&sig_structure(&protected, &payload), &sig)
                .unwrap();
        }
    }

    #[test]
    fn debug_output_names_no_key_material() {
        let text = format!("{:?}", mock());
        assert!(text.contains("module_id"));
        assert!(!text.contains("keys"));
        assert!(!text.contains("seed"));
    }
}
