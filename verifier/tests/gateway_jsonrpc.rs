//! Property tests of the gateway's JSON-RPC layer: parsing and forwarding is the identity on
//! bytes, and each edit changes only its own member.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use attestplane_verifier::gateway::json;
use attestplane_verifier::gateway::jsonrpc::{
    Kind, RECEIPT_META_KEY, RawMembers, object_members, parse_message,
};
use proptest::prelude::*;
use serde_json::value::RawValue;

fn ws() -> impl Strategy<Value = String> {
    "[ \t\n\r]{0,2}"
}

fn number() -> impl Strategy<Value = String> {
    "-?(0|[1-9][0-9]{0,6})(\\.[0-9]{1,4})?([eE][+-]?[0-9]{1,2})?"
}

fn string() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            "[a-zA-Z0-9 _/.-]{1,6}",
            Just("\\\"".to_owned()),
            Just("\\\\".to_owned()),
            Just("\\n".to_owned()),
            Just("\\u00e9".to_owned()),
            Just("\\ud83d\\ude00".to_owned()),
            Just("é€😀".to_owned()),
            Just("\u{200b}".to_owned()),
        ],
        0..4,
    )
    .prop_map(|parts| format!("\"{}\"", parts.concat()))
}

/// Arbitrary JSON text, spelled in the many ways JSON allows.
fn value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("null".to_owned()),
        Just("true".to_owned()),
        Just("false".to_owned()),
        number(),
        string(),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec((ws(), inner.clone(), ws()), 0..5).prop_map(|items| {
                let body: Vec<String> = items
                    .into_iter()
                    .map(|(a, v, b)| format!("{a}{v}{b}"))
                    .collect();
                format!("[{}]", body.join(","))
            }),
            prop::collection::btree_map("[a-z_]{1,5}", (ws(), inner, ws()), 0..5).prop_map(
                |members| {
                    let body: Vec<String> = members
                        .into_iter()
                        .map(|(k, (a, v, b))| format!("{a}\"{k}\"{b}:{a}{v}{b}"))
                        .collect();
                    format!("{{{}}}", body.join(","))
                }
            ),
        ]
    })
}

/// An object text with distinct member names drawn from `names` plus the given fixed members.
fn object_with(fixed: Vec<(&'static str, BoxedStrategy<String>)>) -> impl Strategy<Value = String> {
    let extra = prop::collection::btree_map("x[a-z]{1,4}", (ws(), value()), 0..4);
    let fixed_values: Vec<BoxedStrategy<(String, String)>> = fixed
        .into_iter()
        .map(|(k, s)| (Just(k.to_owned()), s).boxed())
        .collect();
    (fixed_values, extra, any::<prop::sample::Index>(), ws()).prop_map(|(fixed, extra, rot, w)| {
        let mut members: Vec<String> = fixed
            .into_iter()
            .map(|(k, v)| format!("{w}\"{k}\"{w}:{w}{v}"))
            .chain(
                extra
                    .into_iter()
                    .map(|(k, (w2, v))| format!("\"{k}\":{w2}{v}{w2}")),
            )
            .collect();
        if !members.is_empty() {
            let n = rot.index(members.len());
            members.rotate_left(n);
        }
        format!("{{{w}{}{w}}}", members.join(","))
    })
}

fn tools_call() -> impl Strategy<Value = String> {
    let meta = prop_oneof![
        Just(None),
        object_with(vec![]).prop_map(Some),
        object_with(vec![(RECEIPT_META_KEY, string().boxed())]).prop_map(Some),
    ];
    (meta, prop::bool::ANY, number()).prop_flat_map(|(meta, with_args, id)| {
        let mut fixed: Vec<(&'static str, BoxedStrategy<String>)> =
            vec![("name", "\"[a-z_]{1,12}\"".boxed())];
        if with_args {
            fixed.push(("arguments", object_with(vec![]).boxed()));
        }
        if let Some(m) = meta {
            fixed.push(("_meta", Just(m).boxed()));
        }
        object_with(vec![
            ("jsonrpc", Just("\"2.0\"".to_owned()).boxed()),
            ("id", Just(id).boxed()),
            ("method", Just("\"tools/call\"".to_owned()).boxed()),
            ("params", object_with(fixed).boxed()),
        ])
    })
}

fn raw_pairs<'a>(members: &'a RawMembers<'a>) -> Vec<(&'a str, &'a str)> {
    members.iter().map(|(k, v)| (k.as_ref(), v.get())).collect()
}

fn without<'a>(pairs: &[(&'a str, &'a str)], key: &str) -> Vec<(&'a str, &'a str)> {
    pairs.iter().copied().filter(|(k, _)| *k != key).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn parse_then_forward_is_the_identity(text in tools_call()) {
        let m = parse_message(text.as_bytes()).unwrap();
        prop_assert_eq!(m.text(), text.as_str());
        prop_assert_eq!(m.kind(), Kind::Request);
        m.tools_call_params().unwrap();
    }

    #[test]
    fn adding_the_receipt_touches_only_its_member(text in tools_call(), token in string()) {
        let m = parse_message(text.as_bytes()).unwrap();
        let receipt = RawValue::from_string(token.clone()).unwrap();
        let out = m.with_params_meta(RECEIPT_META_KEY, &receipt).unwrap();
        let e = parse_message(out.as_bytes()).unwrap();

        // Top level: everything but params is byte-identical and in the same order.
        let before = raw_pairs(m.members());
        let after = raw_pairs(e.members());
        prop_assert_eq!(without(&before, "params"), without(&after, "params"));

        // Params: everything but _meta is identical.
        let p0 = object_members(m.params().unwrap(), "params").unwrap();
        let p1 = object_members(e.params().unwrap(), "params").unwrap();
        prop_assert_eq!(without(&raw_pairs(&p0), "_meta"), without(&raw_pairs(&p1), "_meta"));

        // _meta: everything but the receipt is identical, and the receipt is the new one.
        let meta1 = e.tools_call_params().unwrap().meta.unwrap();
        let m1 = object_members(meta1, "_meta").unwrap();
        let m0 = match m.tools_call_params().unwrap().meta {
            Some(meta0) => object_members(meta0, "_meta").unwrap(),
            None => Vec::new(),
        };
        prop_assert_eq!(
            without(&raw_pairs(&m0), RECEIPT_META_KEY),
            without(&raw_pairs(&m1), RECEIPT_META_KEY)
        );
        let got = raw_pairs(&m1).into_iter().find(|(k, _)| *k == RECEIPT_META_KEY).unwrap().1;
        prop_assert_eq!(got, token.as_str());

        // Every byte outside params is where it was.
        let p0_span = m.span_of(m.params().unwrap()).unwrap();
        let p1_span = e.span_of(e.params().unwrap()).unwrap();
        prop_assert_eq!(&text[..p0_span.start], &out[..p1_span.start]);
        prop_assert_eq!(&text[p0_span.end..], &out[p1_span.end..]);
    }

    #[test]
    fn filtering_tools_touches_only_the_tools_array(
        tools in prop::collection::vec(object_with(vec![("name", string().boxed())]), 0..6),
        keep in prop::collection::vec(any::<bool>(), 6),
        extra in object_with(vec![]),
        w in ws(),
    ) {
        let result = format!(
            "{{{w}\"tools\"{w}:{w}[{}]{w},\"extra\":{extra}}}",
            tools.join(&format!(",{w}"))
        );
        let text = format!(r#"{{"jsonrpc":"2.0","id":"q","result":{result}}}"#);
        let m = parse_message(text.as_bytes()).unwrap();
        let r = m.tools_list_result().unwrap();
        prop_assert_eq!(r.tools.len(), tools.len());
        let kept: Vec<&RawValue> = r
            .tools
            .iter()
            .zip(&keep)
            .filter(|(_, k)| **k)
            .map(|(t, _)| *t)
            .collect();
        let out = m.with_result_tools(&kept).unwrap();
        let e = parse_message(out.as_bytes()).unwrap();
        let r1 = e.tools_list_result().unwrap();
        let kept_text: Vec<&str> = kept.iter().map(|t| t.get()).collect();
        let now_text: Vec<&str> = r1.tools.iter().map(|t| t.get()).collect();
        prop_assert_eq!(kept_text, now_text);
        prop_assert_eq!(raw_pairs(&r.rest), raw_pairs(&r1.rest));
    }

    #[test]
    fn strict_reader_agrees_with_serde_json(text in value()) {
        let ours = json::parse(&text);
        let theirs: Result<serde_json::Value, _> = serde_json::from_str(&text);
        prop_assert!(ours.is_ok(), "{:?} on {}", ours.err(), text);
        prop_assert!(theirs.is_ok());
        let node = ours.unwrap();
        prop_assert_eq!(node.span.end - node.span.start, text.trim_matches([' ', '\t', '\n', '\r']).len());
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(m) = parse_message(&bytes) {
            let _ = m.tools_call_params();
            let _ = m.tools_list_result();
            let _ = m.tools_list_params();
        }
        if let Ok(s) = std::str::from_utf8(&bytes) {
            let _ = json::parse_ijson(s);
        }
    }

    #[test]
    fn mutated_messages_never_panic(text in tools_call(), at in any::<prop::sample::Index>(), b in any::<u8>()) {
        let mut bytes = text.into_bytes();
        let i = at.index(bytes.len());
        bytes[i] = b;
        if let Ok(m) = parse_message(&bytes) {
            if let Ok(p) = m.tools_call_params()
                && let Some(a) = p.arguments
            {
                let _ = json::parse_ijson(a.get());
            }
            let receipt = RawValue::from_string("\"r\"".to_owned()).unwrap();
            if let Ok(out) = m.with_params_meta(RECEIPT_META_KEY, &receipt) {
                prop_assert!(parse_message(out.as_bytes()).is_ok(), "{}", out);
            }
        }
    }
}
