//! Enclave image files an auditor measures.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = attestplane_verifier::eif::measure_eif(data);
});
