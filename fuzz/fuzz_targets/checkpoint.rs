//! Signed checkpoint notes held by auditors and served by the host.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(note) = std::str::from_utf8(data) {
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]).verifying_key();
        let _ = attestplane_verifier::checkpoint::verify_checkpoint(note, "attestplane/log", &key);
        let _ = attestplane_verifier::log::claimed_size(note);
    }
});
