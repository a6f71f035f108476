//! Log entries as the host streams them back at boot and as auditors read them. The one-pass
//! decoders must give the reference decoders' answer on every input, error included.
#![no_main]
use attestplane_verifier::cbor;
use attestplane_verifier::entry::{Entry, SignedEntry};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    match (
        SignedEntry::decode(data),
        SignedEntry::decode_reference(data),
    ) {
        (Ok(a), Ok(b)) => {
            assert_eq!(a.entry(), b.entry());
            assert_eq!(a.kid(), b.kid());
            assert_eq!(a.signature(), b.signature());
            assert_eq!(a.signed_bytes(), b.signed_bytes());
            assert_eq!(a.hash(), b.hash());
        }
        (Err(a), Err(b)) => assert_eq!(a, b),
        (a, b) => panic!(
            "decoders disagree: one-pass ok {}, reference ok {}",
            a.is_ok(),
            b.is_ok()
        ),
    }
    assert_eq!(
        Entry::from_payload(data),
        Entry::from_payload_reference(data)
    );
    if let Some(value) = cbor::decode_one_pass(data) {
        assert_eq!(cbor::decode_reference(data), Ok(value));
    }
    let _ = cbor::item_len(data);
});
