//! Tool arguments and results scanned and redacted for personal data.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    use attestplane_verifier::gateway::pii;
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(ms) = pii::scan_text(text) {
            let _ = pii::redact_text(text, &ms);
        }
        let _ = pii::redact_json(text, &["_meta"]);
    }
});
