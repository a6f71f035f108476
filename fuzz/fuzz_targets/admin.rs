//! Signed admin requests, forwarded untouched by the host.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = attestplane_verifier::admin::SignedAdminRequest::decode(data);
});
