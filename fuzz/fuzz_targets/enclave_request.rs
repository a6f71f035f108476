//! Feeds frames from the host to a booted enclave: any bytes that decode to a request go to
//! `Enclave::handle`, which may refuse anything but must never panic. The enclave (a mock NSM
//! with a pinned clock, booted on an empty log) persists across inputs, so sequences of
//! requests reach the states earlier inputs left behind; its queues are bounded by the
//! service's own limits (`MAX_HELD`, `MAX_CHALLENGES`).
#![no_main]

use std::sync::{Arc, Mutex, OnceLock};

use attestplane_enclave::nsm::{Clock, MockNsm};
use attestplane_enclave::service::{Enclave, EnclaveConfig};
use attestplane_proto::{Body, ByteBuf, Request, decode_frame};
use attestplane_verifier::UnixMillis;
use attestplane_verifier::attestation::TrustAnchor;
use libfuzzer_sys::fuzz_target;

/// 2025-09-01T12:00:00.250Z.
const T0: UnixMillis = UnixMillis::from_millis(1_756_728_000_250);

/// The ed25519 base point: a valid public key for the genesis admin set.
const GENESIS_KEY: [u8; 32] = [
    0x58, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66,
    0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66,
];

fn booted() -> Enclave {
    let nsm = MockNsm::builder(*b"attestplane fuzz enclave seed v1", Clock::Fixed(T0))
        .fixture_randomness()
        .build();
    let root = TrustAnchor::from_der(&nsm.root_der().unwrap()).unwrap();
    let config = EnclaveConfig {
        origin: "attestplane.fuzz/log".to_owned(),
        issuer: "attestplane-fuzz".to_owned(),
        self_anchor: root.clone(),
        server_anchor: root,
        allow_debug: false,
    };
    // The host's genesis keys are part of the input: let the enclave take them.
    let mut enclave = Enclave::new(Arc::new(nsm), config).with_insecure_host_chosen_genesis();
    let keys = vec![ByteBuf::from(GENESIS_KEY.to_vec())];
    let begin = Request::ReplayBegin {
        genesis_admin_keys: keys,
        total_entries: 0,
    };
    enclave.handle(1, begin, T0);
    enclave.handle(2, Request::ReplayEnd, T0);
    enclave.handle(3, Request::Durable { through_seq: 1 }, T0);
    assert!(enclave.is_ready(), "the fuzz enclave did not boot");
    enclave
}

static ENCLAVE: OnceLock<Mutex<Enclave>> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = decode_frame(data) {
        if let Body::Request(request) = frame.body {
            let enclave = ENCLAVE.get_or_init(|| Mutex::new(booted()));
            let mut enclave = enclave.lock().unwrap_or_else(|e| e.into_inner());
            let _ = enclave.handle(frame.id, request, T0);
        }
    }
});
