//! Property tests of the gateway's PII scanner: no panic on any input, redaction leaves
//! valid JSON with nothing left to find, and the bytes outside findings are kept.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use attestplane_verifier::gateway::json;
use attestplane_verifier::gateway::pii::{redact_json, redact_text_fully, scan_json, scan_text};
use proptest::prelude::*;

fn piece() -> impl Strategy<Value = String> {
    prop_oneof![
        "[ a-z0-9.@:+-]{0,12}",
        Just("john@example.com".to_owned()),
        Just("+44 20 7946 0958".to_owned()),
        Just("4111 1111 1111 1111".to_owned()),
        Just("４１１１１１１１１１１１１１１１".to_owned()),
        Just("GB82 WEST 1234 5698 7654 32".to_owned()),
        Just("536-22-1234".to_owned()),
        Just("10.1.2.3".to_owned()),
        Just("fe80::1".to_owned()),
        Just("AKIAIOSFODNN7EXAMPLE".to_owned()),
        Just("\u{200b}".to_owned()),
        Just("\u{ad}".to_owned()),
        Just("\u{ff10}".to_owned()),
        Just("-----BEGIN PRIVATE KEY-----".to_owned()),
        any::<char>().prop_map(String::from),
    ]
}

fn text() -> impl Strategy<Value = String> {
    prop::collection::vec(piece(), 0..8).prop_map(|p| p.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn scanning_any_text_never_panics_and_ranges_lie_on_char_boundaries(t in text()) {
        let ms = scan_text(&t).unwrap();
        let mut end = 0;
        for m in &ms {
            prop_assert!(m.range.start >= end, "overlapping matches");
            prop_assert!(t.is_char_boundary(m.range.start) && t.is_char_boundary(m.range.end));
            end = m.range.end;
        }
        let (findings, r) = redact_text_fully(&t).unwrap();
        prop_assert!(findings.len() >= ms.len());
        prop_assert!(scan_text(&r).unwrap().is_empty(), "left after redaction: {:?}", r);
    }

    #[test]
    fn redacted_json_is_json_with_nothing_left_to_find(
        values in prop::collection::vec((text(), text()), 0..5),
    ) {
        let body: Vec<String> = values
            .iter()
            .enumerate()
            .map(|(i, (k, v))| {
                let mut key = String::new();
                json::write_string(&mut key, &format!("{i}{k}"));
                let mut val = String::new();
                json::write_string(&mut val, v);
                format!("{key}: [{val}, 1e3]")
            })
            .collect();
        let doc = format!("{{{}}}", body.join(", "));
        let (report, out) = redact_json(&doc, &[]).unwrap();
        json::parse(&out).unwrap();
        prop_assert!(scan_json(&out, &[]).unwrap().is_empty());
        prop_assert_eq!(report.is_empty(), out == doc);
        prop_assert!(values.is_empty() || out.contains("1e3"));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let s = String::from_utf8_lossy(&bytes);
        let _ = scan_text(&s);
        let _ = redact_json(&s, &["_meta"]);
    }
}
