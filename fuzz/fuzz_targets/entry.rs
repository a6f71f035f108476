//! Log entries as the host streams them back at boot and as auditors read them.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = attestplane_verifier::entry::SignedEntry::decode(data);
    let _ = attestplane_verifier::entry::Entry::from_payload(data);
    let _ = attestplane_verifier::cbor::item_len(data);
});
