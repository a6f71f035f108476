//! The Cedar policy engine: the scope index always agrees with full evaluation, deny by
//! default, install-time refusal of bad policy sets, tenant isolation, and the starter policy.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use attestplane_verifier::UnixMillis;
use attestplane_verifier::policy::{
    Action, AttestationFacts, Counters, Decision, DecisionRequest, MAX_POLICY_TEXT_LEN,
    PolicyEngine, PolicyError, Principal, ServerFacts,
};
use proptest::prelude::*;

const STARTER: &str = include_str!("../testdata/policy/starter.cedar");

/// A pinned instant: 2024-01-01T00:00:00Z.
const NOW: UnixMillis = UnixMillis::from_secs(1_704_067_200);

fn request(action: Action, agent_tenant: &str, server_tenant: &str) -> DecisionRequest {
    DecisionRequest {
        principal: Principal {
            agent: "agent-1".into(),
            user: "alice".into(),
            tenant: agent_tenant.into(),
            roles: vec!["tool-user".into()],
            issuer: "https://idp.example".into(),
        },
        action,
        server: ServerFacts {
            id: "srv-1".into(),
            name: "files".into(),
            tenant: server_tenant.into(),
            resource: "https://files.example/mcp".into(),
            assurance: "nitro".into(),
        },
        tool: Some("read".into()),
        attestation: AttestationFacts {
            verified: true,
            age_ms: Some(2_000),
            pcr_match: true,
            debug: false,
        },
        time: NOW,
        counters: Counters {
            calls_last_minute: 3,
            spend_micros: 0,
        },
        call: None,
    }
}

fn decide(engine: &PolicyEngine, req: &DecisionRequest) -> Decision {
    let indexed = engine.decide(req);
    assert_eq!(indexed, engine.decide_unindexed(req), "index disagrees");
    indexed
}

// ---------------------------------------------------------------------------------------------
// Deny by default.

#[test]
fn empty_policy_set_denies_everything() {
    for engine in [PolicyEngine::deny_all(), PolicyEngine::new("").unwrap()] {
        assert_eq!(engine.policy_count(), 0);
        for action in Action::ALL {
            let d = decide(&engine, &request(action, "acme", "acme"));
            assert_eq!(d, Decision::default(), "{action:?}");
        }
    }
}

#[test]
fn forbid_alone_denies() {
    let engine = PolicyEngine::new(
        r#"@id("no-debug") forbid(principal, action, resource) when { context.attestation.debug };"#,
    )
    .unwrap();
    for action in Action::ALL {
        let mut req = request(action, "acme", "acme");
        let d = decide(&engine, &req);
        assert!(!d.allowed);
        assert!(d.policies.is_empty(), "no forbid was satisfied: {d:?}");
        req.attestation.debug = true;
        let d = decide(&engine, &req);
        assert!(!d.allowed);
        assert_eq!(d.policies, ["no-debug"]);
    }
}

#[test]
fn forbid_overrides_permit_and_is_the_determining_policy() {
    let engine = PolicyEngine::new(
        r#"@id("all") permit(principal, action, resource);
           @id("rate") forbid(principal, action == Attestplane::Action::"call", resource)
             unless { context.counters.calls_last_minute < 10 };"#,
    )
    .unwrap();
    let mut req = request(Action::Call, "acme", "acme");
    let d = decide(&engine, &req);
    assert!(d.allowed);
    assert_eq!(d.policies, ["all"]);
    req.counters.calls_last_minute = 10;
    let d = decide(&engine, &req);
    assert!(!d.allowed);
    assert_eq!(d.policies, ["rate"]);
}

#[test]
fn evaluation_error_skips_the_policy_and_is_reported() {
    // A forbid that overflows is skipped (Cedar's semantics), so write forbids that cannot error.
    let engine = PolicyEngine::new(
        r#"@id("all") permit(principal, action, resource);
           @id("overflow") forbid(principal, action, resource)
             when { context.counters.spend_micros + 1 > 0 };"#,
    )
    .unwrap();
    let mut req = request(Action::Resolve, "acme", "acme");
    let d = decide(&engine, &req);
    assert!(!d.allowed);
    assert!(d.errors.is_empty());
    req.counters.spend_micros = u64::MAX; // saturates to i64::MAX, then `+ 1` overflows
    let d = decide(&engine, &req);
    assert!(d.allowed);
    assert_eq!(d.errors.len(), 1);
    assert!(d.errors[0].contains("overflow"), "{:?}", d.errors);
}

// ---------------------------------------------------------------------------------------------
// Refusal at install time.

#[test]
fn rejects_unknown_attribute() {
    let err = PolicyEngine::new(
        r#"permit(principal, action, resource) when { principal.department == "ops" };"#,
    )
    .unwrap_err();
    let PolicyError::Validation { messages } = &err else {
        panic!("expected a validation error, got {err:?}");
    };
    assert!(
        messages.iter().any(|m| m.contains("department")),
        "{messages:?}"
    );
}

#[test]
fn rejects_unknown_entity_type() {
    let err =
        PolicyEngine::new(r#"permit(principal, action, resource in Attestplane::Bucket::"b");"#)
            .unwrap_err();
    let PolicyError::Validation { messages } = &err else {
        panic!("expected a validation error, got {err:?}");
    };
    assert!(
        messages.iter().any(|m| m.contains("Bucket")),
        "{messages:?}"
    );
}

#[test]
fn rejects_unknown_action_and_unguarded_optional_age() {
    for text in [
        r#"permit(principal, action == Attestplane::Action::"delete", resource);"#,
        r#"permit(principal, action, resource) when { context.attestation.age_ms < 60000 };"#,
        // Without the namespace the types are unknown.
        r#"permit(principal, action == Action::"resolve", resource);"#,
    ] {
        let err = PolicyEngine::new(text).unwrap_err();
        assert!(
            matches!(err, PolicyError::Validation { .. }),
            "{text}: {err:?}"
        );
    }
}

#[test]
fn rejects_syntax_error() {
    let err = PolicyEngine::new("permit(principal, action, resource) when { true ").unwrap_err();
    assert!(matches!(err, PolicyError::Parse { .. }), "{err:?}");
    let err = PolicyEngine::new("allow everything;").unwrap_err();
    assert!(matches!(err, PolicyError::Parse { .. }), "{err:?}");
}

#[test]
fn rejects_oversize_text() {
    let text = format!(
        "permit(principal, action, resource);{}",
        " ".repeat(MAX_POLICY_TEXT_LEN)
    );
    assert_eq!(
        PolicyEngine::new(&text).unwrap_err(),
        PolicyError::TooLong {
            len: text.len(),
            max: MAX_POLICY_TEXT_LEN
        }
    );
    // Exactly at the limit is accepted.
    let at_limit = format!(
        "permit(principal, action, resource);{}",
        " ".repeat(MAX_POLICY_TEXT_LEN - 36)
    );
    assert_eq!(at_limit.len(), MAX_POLICY_TEXT_LEN);
    assert!(PolicyEngine::new(&at_limit).is_ok());
}

// ---------------------------------------------------------------------------------------------
// Tenant isolation and determining policies.

const CROSS_TENANT: &str = r#"
@id("resolve-same-tenant")
permit(principal, action == Attestplane::Action::"resolve", resource)
when {
  principal.tenant == resource.tenant &&
  context.attestation.verified &&
  context.attestation.pcr_match
};
"#;

#[test]
fn same_tenant_resolve_allowed_cross_tenant_denied() {
    let engine = PolicyEngine::new(CROSS_TENANT).unwrap();
    let d = decide(&engine, &request(Action::Resolve, "acme", "acme"));
    assert!(d.allowed);
    assert_eq!(d.policies, ["resolve-same-tenant"]);

    let d = decide(&engine, &request(Action::Resolve, "acme", "globex"));
    assert!(!d.allowed);
    assert!(d.policies.is_empty());
}

#[test]
fn same_tenant_resolve_denied_without_attestation() {
    let engine = PolicyEngine::new(CROSS_TENANT).unwrap();
    let mut req = request(Action::Resolve, "acme", "acme");
    req.attestation.pcr_match = false;
    assert!(!decide(&engine, &req).allowed);
    req.attestation.pcr_match = true;
    req.attestation.verified = false;
    assert!(!decide(&engine, &req).allowed);
}

#[test]
fn tenant_isolation_cannot_be_bypassed_with_a_lookalike_tool_id() {
    // Tool ids are "<server>/<tool>": a tool named so that the id looks like another server's
    // tool must not pick up that server's permits.
    let engine = PolicyEngine::new(
        r#"@id("srv-a-read") permit(principal, action, resource == Attestplane::Tool::"srv-a/read");"#,
    )
    .unwrap();
    let mut req = request(Action::Call, "acme", "acme");
    req.server.id = "srv-a".into();
    assert!(decide(&engine, &req).allowed);
    req.server.id = "srv".into();
    req.tool = Some("a/read".into()); // Tool::"srv/a/read", a different id
    assert!(!decide(&engine, &req).allowed);
}

#[test]
fn determining_policies_are_the_satisfied_permits_sorted_by_id() {
    let engine = PolicyEngine::new(
        r#"@id("zeta") permit(principal, action == Attestplane::Action::"discover", resource);
           permit(principal, action, resource in Attestplane::Tenant::"acme");
           @id("alpha") permit(principal, action, resource == Attestplane::Server::"srv-1")
             when { principal.roles.contains("tool-user") };
           @id("unrelated") permit(principal, action, resource == Attestplane::Server::"srv-2");
           @id("no-such-role") permit(principal, action, resource)
             when { principal.roles.contains("admin") };"#,
    )
    .unwrap();
    assert_eq!(engine.policy_count(), 5);
    let d = decide(&engine, &request(Action::Discover, "acme", "acme"));
    assert!(d.allowed);
    assert_eq!(d.policies, ["alpha", "policy1", "zeta"]);

    let d = decide(&engine, &request(Action::Resolve, "acme", "globex"));
    assert!(d.allowed);
    assert_eq!(d.policies, ["alpha"]);
}

// ---------------------------------------------------------------------------------------------
// The starter policy.

#[test]
fn starter_policy_validates() {
    let engine = PolicyEngine::new(STARTER).unwrap();
    assert_eq!(engine.text(), STARTER);
    assert!(engine.policy_count() >= 4);
}

#[test]
fn starter_policy_decides_as_documented() {
    let engine = PolicyEngine::new(STARTER).unwrap();
    let ok = |a| request(a, "acme", "acme");

    assert!(decide(&engine, &ok(Action::Discover)).allowed);
    assert!(decide(&engine, &ok(Action::Resolve)).allowed);
    assert!(decide(&engine, &ok(Action::Call)).allowed);

    // Cross-tenant: nothing.
    for action in Action::ALL {
        let d = decide(&engine, &request(action, "acme", "globex"));
        assert!(!d.allowed, "{action:?}");
        assert_eq!(d.policies, ["tenant-isolation"], "{action:?}");
    }

    // Resolve needs a verified, matching, non-debug attestation; discover does not.
    for (field, value) in [("verified", false), ("pcr_match", false), ("debug", true)] {
        let mut req = ok(Action::Resolve);
        match field {
            "verified" => req.attestation.verified = value,
            "pcr_match" => req.attestation.pcr_match = value,
            _ => req.attestation.debug = value,
        }
        assert!(!decide(&engine, &req).allowed, "{field}");
        req.action = Action::Discover;
        assert!(decide(&engine, &req).allowed, "{field}");
    }

    // Call needs the tool-user role and stays under the rate limit.
    let mut req = ok(Action::Call);
    req.principal.roles = vec!["reader".into()];
    assert!(!decide(&engine, &req).allowed);
    let mut req = ok(Action::Call);
    req.counters.calls_last_minute = 599;
    assert!(decide(&engine, &req).allowed);
    req.counters.calls_last_minute = 600;
    let d = decide(&engine, &req);
    assert!(!d.allowed);
    assert_eq!(d.policies, ["call-rate-limit"]);
}

// ---------------------------------------------------------------------------------------------
// The index agrees with full evaluation on random policy sets and requests.

const TENANTS: [&str; 3] = ["t0", "t1", "t2"];
const SERVERS: [&str; 4] = ["s0", "s1", "s2", "s0/x"];
const TOOLS: [&str; 3] = ["read", "write", "x/read"];
const ROLES: [&str; 3] = ["tool-user", "admin", "reader"];

/// A scope text and the resource types it can match: (server, tool).
type Scope = (String, (bool, bool));

fn action_scope() -> impl Strategy<Value = Scope> {
    let scope = |text: &str, types| Just((text.to_owned(), types));
    prop_oneof![
        scope("action", (true, true)),
        scope(
            r#"action == Attestplane::Action::"discover""#,
            (true, false)
        ),
        scope(r#"action == Attestplane::Action::"resolve""#, (true, false)),
        scope(r#"action == Attestplane::Action::"call""#, (false, true)),
        scope(
            r#"action in [Attestplane::Action::"discover", Attestplane::Action::"resolve"]"#,
            (true, false)
        ),
        scope(
            r#"action in [Attestplane::Action::"resolve", Attestplane::Action::"call"]"#,
            (true, true)
        ),
    ]
}

fn resource_scope() -> impl Strategy<Value = Scope> {
    let tenant = prop::sample::select(&TENANTS[..]);
    let server = prop::sample::select(&SERVERS[..]);
    let tool = prop::sample::select(&TOOLS[..]);
    let both = (true, true);
    let servers = (true, false);
    let tools = (false, true);
    prop_oneof![
        3 => Just(("resource".to_owned(), both)),
        2 => server.clone().prop_map(move |s| (format!(r#"resource == Attestplane::Server::"{s}""#), servers)),
        2 => server.clone().prop_map(move |s| (format!(r#"resource in Attestplane::Server::"{s}""#), both)),
        2 => (server.clone(), tool)
            .prop_map(move |(s, t)| (format!(r#"resource == Attestplane::Tool::"{s}/{t}""#), tools)),
        2 => tenant.clone().prop_map(move |t| (format!(r#"resource in Attestplane::Tenant::"{t}""#), both)),
        1 => Just(("resource is Attestplane::Server".to_owned(), servers)),
        1 => Just(("resource is Attestplane::Tool".to_owned(), tools)),
        1 => tenant.clone().prop_map(move |t| (
            format!(r#"resource is Attestplane::Server in Attestplane::Tenant::"{t}""#),
            servers,
        )),
        1 => server.prop_map(move |s| (
            format!(r#"resource is Attestplane::Tool in Attestplane::Server::"{s}""#),
            tools,
        )),
        1 => tenant.prop_map(move |t| (
            format!(r#"resource is Attestplane::Tool in Attestplane::Tenant::"{t}""#),
            tools,
        )),
    ]
}

fn principal_scope() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => Just("principal".to_owned()),
        1 => prop::sample::select(&TENANTS[..])
            .prop_map(|t| format!(r#"principal in Attestplane::Tenant::"{t}""#)),
        1 => Just(r#"principal == Attestplane::Agent::"a0""#.to_owned()),
    ]
}

fn condition() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(&ROLES[..])
            .prop_map(|r| format!(r#"principal.roles.contains("{r}")"#)),
        Just("principal.tenant == resource.tenant".to_owned()),
        prop::sample::select(&TENANTS[..])
            .prop_map(|t| format!(r#"principal.tenant == Attestplane::Tenant::"{t}""#)),
        Just("context.attestation.verified".to_owned()),
        Just("context.attestation.pcr_match".to_owned()),
        Just("!context.attestation.debug".to_owned()),
        (0i64..10_000).prop_map(|n| format!(
            "context.attestation has age_ms && context.attestation.age_ms < {n}"
        )),
        (0i64..1_000).prop_map(|n| format!("context.counters.calls_last_minute < {n}")),
        // Overflows (an evaluation error) when spend_micros is large.
        Just("context.counters.spend_micros + 9000000000000000000 > 0".to_owned()),
        Just(r#"resource.name == "files""#.to_owned()),
        Just("context.time > 1704067000".to_owned()),
    ]
}

/// One policy whose scope can match some request (the validator refuses impossible ones).
fn policy() -> impl Strategy<Value = String> {
    (
        prop::bool::weighted(0.7),
        principal_scope(),
        (action_scope(), resource_scope()).prop_filter(
            "the action's resource type must fit the resource scope",
            |((_, (a_server, a_tool)), (_, (r_server, r_tool)))| {
                (*a_server && *r_server) || (*a_tool && *r_tool)
            },
        ),
        prop::collection::vec(condition(), 0..3),
    )
        .prop_map(|(permit, p, ((a, _), (r, _)), conds)| {
            let effect = if permit { "permit" } else { "forbid" };
            let mut text = format!("{effect}({p}, {a}, {r})");
            if !conds.is_empty() {
                text.push_str(&format!(" when {{ {} }}", conds.join(" && ")));
            }
            text
        })
}

fn policy_set() -> impl Strategy<Value = String> {
    prop::collection::vec((policy(), any::<bool>()), 0..12).prop_map(|policies| {
        let mut text = String::new();
        for (i, (policy, named)) in policies.into_iter().enumerate() {
            if named {
                text.push_str(&format!("@id(\"p-{i}\")\n"));
            }
            text.push_str(&policy);
            text.push_str(";\n");
        }
        text
    })
}

fn decision_request() -> impl Strategy<Value = DecisionRequest> {
    let name = |xs: &'static [&'static str]| prop::sample::select(xs).prop_map(str::to_owned);
    (
        (
            name(&["a0", "a1"]),
            name(&TENANTS),
            prop::sample::subsequence(&ROLES[..], 0..=3),
        ),
        prop::sample::select(&Action::ALL[..]),
        (name(&SERVERS), name(&TENANTS), name(&["files", "mail"])),
        name(&TOOLS),
        (
            any::<bool>(),
            prop::option::of(0u64..20_000),
            any::<bool>(),
            any::<bool>(),
        ),
        (
            0u64..1_100,
            prop_oneof![Just(0u64), Just(u64::MAX), any::<u64>()],
        ),
        1_704_066_900u64..1_704_067_300,
    )
        .prop_map(
            |(
                (agent, tenant, roles),
                action,
                (server, server_tenant, server_name),
                tool,
                (verified, age_ms, pcr_match, debug),
                (calls, spend),
                secs,
            )| DecisionRequest {
                principal: Principal {
                    agent,
                    user: "u0".into(),
                    tenant,
                    roles: roles.into_iter().map(str::to_owned).collect(),
                    issuer: "https://idp.example".into(),
                },
                action,
                server: ServerFacts {
                    id: server,
                    name: server_name,
                    tenant: server_tenant,
                    resource: "https://mcp.example".into(),
                    assurance: "nitro".into(),
                },
                tool: Some(tool),
                attestation: AttestationFacts {
                    verified,
                    age_ms,
                    pcr_match,
                    debug,
                },
                time: UnixMillis::from_secs(secs),
                counters: Counters {
                    calls_last_minute: calls,
                    spend_micros: spend,
                },
                call: None,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn index_agrees_with_full_evaluation(
        text in policy_set(),
        requests in prop::collection::vec(decision_request(), 1..16),
    ) {
        let engine = PolicyEngine::new(&text)
            .map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        for req in &requests {
            prop_assert_eq!(engine.decide(req), engine.decide_unindexed(req), "{}\n{:?}", text, req);
        }
    }
}

/// The random cases above are only worth something if they reach every kind of outcome: checks
/// that a deterministic sample of them allows, denies by forbid, denies by default and errors.
#[test]
fn random_cases_reach_every_outcome() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    let mut runner = TestRunner::deterministic();
    let (mut allowed, mut forbidden, mut defaulted, mut errored) = (0, 0, 0, 0);
    for _ in 0..200 {
        let text = policy_set().new_tree(&mut runner).unwrap().current();
        let engine = PolicyEngine::new(&text).unwrap();
        for _ in 0..8 {
            let req = decision_request().new_tree(&mut runner).unwrap().current();
            let d = decide(&engine, &req);
            match (d.allowed, d.policies.is_empty()) {
                (true, _) => allowed += 1,
                (false, false) => forbidden += 1,
                (false, true) => defaulted += 1,
            }
            if !d.errors.is_empty() {
                errored += 1;
            }
        }
    }
    let total = 200 * 8;
    for (what, n) in [
        ("allowed", allowed),
        ("denied by a forbid", forbidden),
        ("denied by default", defaulted),
        ("with errors", errored),
    ] {
        eprintln!("{n} of {total} decisions {what}");
        assert!(n * 50 >= total, "only {n} of {total} decisions {what}");
    }
}
