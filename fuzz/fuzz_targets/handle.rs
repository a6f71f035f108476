//! Handles (JWTs) presented to relying parties, and JWKS documents.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    use attestplane_verifier::handle::{HandleExpectations, Jwks, verify_handle, verify_jws};
    let _ = Jwks::parse(data);
    if let Ok(token) = std::str::from_utf8(data) {
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]).verifying_key();
        if let Ok(jwks) = Jwks::from_keys([("k", key)]) {
            let _ = verify_jws(token, &jwks);
            let at = attestplane_verifier::UnixMillis::from_millis(1_795_305_600_000);
            let _ = verify_handle(token, &jwks, &HandleExpectations::default(), at);
        }
    }
});
