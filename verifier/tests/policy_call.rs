//! Cedar `call` decisions with the call's arguments, PII findings and server assurance in the
//! context; the listing context tool lists are filtered with; the index still agrees with full
//! evaluation.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::BTreeMap;

use attestplane_verifier::UnixMillis;
use attestplane_verifier::policy::{
    Action, AttestationFacts, CallFacts, Counters, DecisionRequest, PolicyEngine, PolicyError,
    Principal, ServerFacts,
};
use proptest::prelude::*;

fn call(tool: &str, facts: Option<CallFacts>) -> DecisionRequest {
    DecisionRequest {
        principal: Principal {
            agent: "agent-1".into(),
            user: "alice".into(),
            tenant: "acme".into(),
            roles: vec!["payer".into()],
            issuer: "https://idp.example".into(),
        },
        action: Action::Call,
        server: ServerFacts {
            id: "pay".into(),
            name: "payments".into(),
            tenant: "acme".into(),
            resource: "https://pay.example/mcp".into(),
            assurance: "nitro".into(),
        },
        tool: Some(tool.into()),
        attestation: AttestationFacts {
            verified: true,
            age_ms: Some(1_000),
            pcr_match: true,
            debug: false,
        },
        time: UnixMillis::from_secs(1_704_067_200),
        counters: Counters::default(),
        call: facts,
    }
}

fn args(json: &str) -> Option<CallFacts> {
    Some(CallFacts {
        arguments: Some(json.into()),
        ..CallFacts::default()
    })
}

fn decide(engine: &PolicyEngine, req: &DecisionRequest) -> bool {
    let d = engine.decide(req);
    assert_eq!(d, engine.decide_unindexed(req));
    d.allowed
}

const CAP: &str = r#"
@id("calls") permit(principal, action == Attestplane::Action::"call", resource);
@id("cap") @arguments("amount: Long, currency: String")
forbid(principal, action == Attestplane::Action::"call", resource == Attestplane::Tool::"pay/transfer")
  unless { context.arguments has amount && context.arguments.amount <= 10000 };
"#;

#[test]
fn a_policy_caps_an_argument() {
    let engine = PolicyEngine::new(CAP).unwrap();
    assert!(decide(
        &engine,
        &call("transfer", args(r#"{"amount": 500, "to": "x"}"#))
    ));
    assert!(decide(
        &engine,
        &call("transfer", args(r#"{"amount": 1e4}"#))
    ));
    assert!(!decide(
        &engine,
        &call("transfer", args(r#"{"amount": 10001}"#))
    ));
    // Absent: the forbid's `unless` needs it.
    assert!(!decide(&engine, &call("transfer", args(r#"{"to": "x"}"#))));
    // Other tools are not capped.
    assert!(decide(
        &engine,
        &call("balance", args(r#"{"amount": 99999999}"#))
    ));
}

#[test]
fn a_mistyped_argument_denies_instead_of_skipping_the_forbid() {
    let engine = PolicyEngine::new(CAP).unwrap();
    for bad in [
        r#"{"amount": "1"}"#,
        r#"{"amount": 1.5}"#,
        r#"{"amount": 9007199254740993}"#,
        r#"{"amount": [1]}"#,
        r#"{"amount": 1, "amount": 2}"#,
        r#"[1]"#,
    ] {
        let d = engine.decide(&call("transfer", args(bad)));
        assert!(!d.allowed, "{bad}");
        assert!(!d.errors.is_empty(), "{bad}");
        // The error names the argument, never its value.
        assert!(!d.errors.iter().any(|e| e.contains("9007199254740993")));
    }
    // Even for a tool the forbid does not concern: the context cannot be built.
    assert!(!decide(
        &engine,
        &call("balance", args(r#"{"amount": "x"}"#))
    ));
}

#[test]
fn sets_and_bools_are_typed_too() {
    let engine = PolicyEngine::new(
        r#"@id("p") @arguments("tags: Set<String>, dry_run: Bool")
           permit(principal, action == Attestplane::Action::"call", resource)
           when { context.arguments has dry_run && context.arguments.dry_run
                  && context.arguments has tags && context.arguments.tags.contains("safe") };"#,
    )
    .unwrap();
    assert!(decide(
        &engine,
        &call("t", args(r#"{"dry_run": true, "tags": ["safe", "x"]}"#))
    ));
    assert!(!decide(
        &engine,
        &call("t", args(r#"{"dry_run": true, "tags": ["x"]}"#))
    ));
    assert!(!decide(
        &engine,
        &call("t", args(r#"{"dry_run": true, "tags": ["safe", 1]}"#))
    ));
}

#[test]
fn pii_findings_and_assurance_are_in_the_context() {
    let engine = PolicyEngine::new(
        r#"@id("calls") permit(principal, action == Attestplane::Action::"call", resource)
             when { context.server_assurance == "nitro" };
           @id("no-cards") forbid(principal, action == Attestplane::Action::"call", resource)
             when { context.pii.types.contains("card") || context.pii.private_key > 0 };"#,
    )
    .unwrap();
    let with = |pii: &[(&str, u64)], assurance: &str| {
        let mut req = call(
            "t",
            Some(CallFacts {
                arguments: None,
                pii: pii
                    .iter()
                    .map(|(k, n)| (k.to_string(), *n))
                    .collect::<BTreeMap<_, _>>(),
            }),
        );
        req.server.assurance = assurance.to_owned();
        req
    };
    assert!(decide(&engine, &with(&[("email", 2)], "nitro")));
    assert!(!decide(&engine, &with(&[("card", 1)], "nitro")));
    assert!(!decide(&engine, &with(&[("private_key", 1)], "nitro")));
    assert!(!decide(&engine, &with(&[], "none")));
    assert!(decide(&engine, &with(&[], "nitro")));
    // The registration's level, never the attestation facts: a `none` server that somehow
    // carries verified facts is still `none`, a `nitro` one without them still `nitro`.
    let mut req = with(&[], "none");
    req.attestation.verified = true;
    assert!(!decide(&engine, &req));
    let mut req = with(&[], "nitro");
    req.attestation.verified = false;
    assert!(decide(&engine, &req));
    // The listing context (no call facts) sees it too.
    let mut listing = call("t", None);
    listing.server.assurance = "none".into();
    assert!(!decide(&engine, &listing));
}

#[test]
fn listing_context_is_the_call_with_no_argument_and_no_finding() {
    // A tool is listed iff `call` is allowed with `call: None`: no argument present, no PII
    // finding, the registration's assurance. Forbids on argument values do not hide a tool
    // (the call itself is still decided with its arguments); a permit that requires an
    // argument does.
    let engine = PolicyEngine::new(
        r#"@id("calls") permit(principal, action == Attestplane::Action::"call", resource == Attestplane::Tool::"pay/transfer");
           @id("needs") @arguments("amount: Long")
           permit(principal, action == Attestplane::Action::"call", resource == Attestplane::Tool::"pay/refund")
             when { context.arguments has amount };
           @id("cap") forbid(principal, action == Attestplane::Action::"call", resource)
             when { context.arguments has amount && context.arguments.amount > 10 };"#,
    )
    .unwrap();
    assert!(decide(&engine, &call("transfer", None)), "listed");
    assert!(!decide(&engine, &call("refund", None)), "not listed");
    assert!(
        decide(&engine, &call("refund", args(r#"{"amount": 5}"#))),
        "yet callable"
    );
    assert!(!decide(
        &engine,
        &call("transfer", args(r#"{"amount": 50}"#))
    ));
}

#[test]
fn rejects_bad_argument_declarations() {
    for (text, want_arguments_error) in [
        (
            r#"@arguments("amount Long") permit(principal, action, resource);"#,
            true,
        ),
        (
            r#"@arguments("amount: Float") permit(principal, action, resource);"#,
            true,
        ),
        (
            r#"@arguments("a-b: Long") permit(principal, action, resource);"#,
            true,
        ),
        (
            r#"@id("a") @arguments("amount: Long") permit(principal, action, resource);
               @id("b") @arguments("amount: String") permit(principal, action, resource);"#,
            true,
        ),
        // Using an argument nobody declared fails validation.
        (
            r#"permit(principal, action == Attestplane::Action::"call", resource)
               when { context.arguments has amount && context.arguments.amount > 1 };"#,
            false,
        ),
        // Arguments are not in the context of resolve.
        (
            r#"@arguments("amount: Long") permit(principal, action == Attestplane::Action::"resolve", resource)
               when { context.arguments has amount };"#,
            false,
        ),
    ] {
        let err = PolicyEngine::new(text).unwrap_err();
        assert_eq!(
            matches!(err, PolicyError::Arguments { .. }),
            want_arguments_error,
            "{text}: {err}"
        );
        if !want_arguments_error {
            assert!(matches!(err, PolicyError::Validation { .. }), "{err}");
        }
    }
}

fn call_condition() -> impl Strategy<Value = String> {
    prop_oneof![
        (0i64..20).prop_map(|n| format!(
            "context.arguments has amount && context.arguments.amount > {n}"
        )),
        Just(r#"context.arguments has memo && context.arguments.memo == "ok""#.to_owned()),
        Just(r#"context.pii.types.contains("card")"#.to_owned()),
        (0i64..3).prop_map(|n| format!("context.pii.count > {n}")),
        Just(r#"context.server_assurance == "nitro""#.to_owned()),
        Just("context.attestation.verified".to_owned()),
    ]
}

fn call_policy_set() -> impl Strategy<Value = String> {
    prop::collection::vec(
        (
            any::<bool>(),
            prop::sample::select(vec![
                "resource".to_owned(),
                r#"resource == Attestplane::Tool::"pay/transfer""#.to_owned(),
                r#"resource in Attestplane::Server::"pay""#.to_owned(),
                r#"resource == Attestplane::Tool::"other/transfer""#.to_owned(),
            ]),
            prop::collection::vec(call_condition(), 0..3),
        ),
        0..8,
    )
    .prop_map(|ps| {
        let mut text = String::new();
        for (i, (permit, r, conds)) in ps.into_iter().enumerate() {
            let effect = if permit { "permit" } else { "forbid" };
            text.push_str(&format!(
                "@id(\"p{i}\") @arguments(\"amount: Long, memo: String\")\n{effect}(principal, action == Attestplane::Action::\"call\", {r})"
            ));
            if !conds.is_empty() {
                text.push_str(&format!(" when {{ {} }}", conds.join(" && ")));
            }
            text.push_str(";\n");
        }
        text
    })
}

fn call_facts() -> impl Strategy<Value = Option<CallFacts>> {
    prop::option::of((
        prop::option::of(prop_oneof![
            (0i64..30).prop_map(|n| format!(r#"{{"amount": {n}}}"#)),
            Just(r#"{"memo": "ok", "amount": 3}"#.to_owned()),
            Just(r#"{"amount": "x"}"#.to_owned()),
            Just("{}".to_owned()),
        ]),
        prop::collection::btree_map(
            prop::sample::select(vec!["card".to_owned(), "email".to_owned()]),
            0u64..3,
            0..2,
        ),
    ))
    .prop_map(|f| f.map(|(arguments, pii)| CallFacts { arguments, pii }))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn index_agrees_with_full_evaluation_on_calls(
        text in call_policy_set(),
        facts in prop::collection::vec((call_facts(), prop::sample::select(vec!["transfer", "refund"]), prop::sample::select(vec!["nitro", "none"])), 1..8),
    ) {
        let engine = PolicyEngine::new(&text)
            .map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        for (f, tool, assurance) in facts {
            let mut req = call(tool, f);
            req.server.assurance = assurance.to_owned();
            prop_assert_eq!(engine.decide(&req), engine.decide_unindexed(&req), "{}", text);
        }
    }
}
