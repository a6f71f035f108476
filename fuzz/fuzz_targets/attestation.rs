//! Fuzzes the attestation verifier (which parses first) with the AWS root at a pinned time:
//! it may reject anything, but never panic.
#![no_main]

use attestplane_verifier::UnixMillis;
use attestplane_verifier::attestation::{Expectations, TrustAnchor, VerifyAt, verify_attestation};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = verify_attestation(
        data,
        &TrustAnchor::aws_nitro_root_g1(),
        &Expectations::default(),
        VerifyAt::Instant(UnixMillis::from_millis(1_665_651_482_136)),
    );
});
