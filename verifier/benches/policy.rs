//! Cost of one policy decision, indexed and unindexed, with 50 policies over 300 entities.
//!
//! The world is generated deterministically: 10 tenants, 58 servers (5 or 6 per tenant) and
//! 232 tools (4 per server), 300 entities in all. The policy set mixes 6 unscoped policies
//! (tenant isolation, attested resolve, rate limit …), 8 per tenant, 16 per server, 16 per tool
//! and 4 `is`-scoped ones. Requests cycle through 256 generated (agent, action, server, tool)
//! combinations; before measuring, every one is checked to decide the same both ways.
//! `decide_deny_all` is the fixed part of every decision: building the request's entities and
//! context with an empty policy set, so nothing is evaluated.
//!
//! Run: `cargo bench -p attestplane-verifier --bench policy`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::hint::black_box;

use attestplane_verifier::UnixMillis;
use attestplane_verifier::policy::{
    Action, AttestationFacts, Counters, DecisionRequest, PolicyEngine, Principal, ServerFacts,
};
use criterion::{Criterion, criterion_group, criterion_main};

const TENANTS: usize = 10;
const SERVERS: usize = 58;
const TOOLS_PER_SERVER: usize = 4;
const REQUESTS: usize = 256;

/// A small deterministic generator (SplitMix64), so runs are comparable.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn tenant(i: usize) -> String {
    format!("tenant-{}", i % TENANTS)
}

fn server(i: usize) -> String {
    format!("srv-{}", i % SERVERS)
}

fn tool(i: usize) -> String {
    format!("tool-{}", i % TOOLS_PER_SERVER)
}

fn server_tenant(i: usize) -> String {
    tenant(i % SERVERS)
}

fn policies(rng: &mut Rng) -> String {
    let mut text = String::from(
        r#"
@id("tenant-isolation")
forbid (principal, action, resource) unless { principal.tenant == resource.tenant };
@id("discover-same-tenant")
permit (principal, action == Attestplane::Action::"discover", resource)
when { principal.tenant == resource.tenant };
@id("resolve-attested")
permit (principal, action == Attestplane::Action::"resolve", resource)
when { context.attestation.verified && context.attestation.pcr_match && !context.attestation.debug };
@id("call-tool-user")
permit (principal, action == Attestplane::Action::"call", resource)
when { principal.roles.contains("tool-user") && context.attestation.verified };
@id("call-rate-limit")
forbid (principal, action == Attestplane::Action::"call", resource)
unless { context.counters.calls_last_minute < 600 };
@id("fresh-attestation")
forbid (principal, action == Attestplane::Action::"resolve", resource)
unless { context.attestation has age_ms && context.attestation.age_ms < 300000 };
"#,
    );
    for i in 0..8 {
        let t = tenant(rng.below(TENANTS));
        let effect = if i % 3 == 0 { "forbid" } else { "permit" };
        text.push_str(&format!(
            "@id(\"tenant-{i}\")\n{effect} (principal, action, resource in Attestplane::Tenant::\"{t}\")\n\
             when {{ principal.roles.contains(\"admin\") && context.time > 1700000000 }};\n"
        ));
    }
    for i in 0..16 {
        let s = server(rng.below(SERVERS));
        let (effect, op) = if i % 4 == 0 {
            ("forbid", "==")
        } else {
            ("permit", "in")
        };
        text.push_str(&format!(
            "@id(\"server-{i}\")\n{effect} (principal, action, resource {op} Attestplane::Server::\"{s}\")\n\
             when {{ principal.roles.contains(\"ops\") || context.counters.spend_micros > 5000000 }};\n"
        ));
    }
    for i in 0..16 {
        let s = rng.below(SERVERS);
        let t = tool(rng.below(TOOLS_PER_SERVER));
        let effect = if i % 2 == 0 { "forbid" } else { "permit" };
        text.push_str(&format!(
            "@id(\"tool-{i}\")\n{effect} (principal, action == Attestplane::Action::\"call\", \
             resource == Attestplane::Tool::\"{}/{t}\")\n\
             when {{ principal.issuer == \"https://idp.example\" && context.counters.calls_last_minute > 100 }};\n",
            server(s)
        ));
    }
    for i in 0..4 {
        let (ty, action) = if i % 2 == 0 {
            ("Server", "resolve")
        } else {
            ("Tool", "call")
        };
        text.push_str(&format!(
            "@id(\"is-{i}\")\npermit (principal, action == Attestplane::Action::\"{action}\", \
             resource is Attestplane::{ty})\nwhen {{ principal.roles.contains(\"auditor-{i}\") }};\n"
        ));
    }
    text
}

fn requests(rng: &mut Rng) -> Vec<DecisionRequest> {
    (0..REQUESTS)
        .map(|_| {
            let s = rng.below(SERVERS);
            let agent_tenant = if rng.below(8) == 0 {
                tenant(rng.below(TENANTS))
            } else {
                server_tenant(s)
            };
            let action = Action::ALL[rng.below(3)];
            let roles = ["tool-user", "ops", "admin", "reader"]
                .into_iter()
                .filter(|_| rng.below(2) == 0)
                .map(str::to_owned)
                .collect();
            DecisionRequest {
                principal: Principal {
                    agent: format!("agent-{}", rng.below(1000)),
                    user: format!("user-{}", rng.below(100)),
                    tenant: agent_tenant,
                    roles,
                    issuer: "https://idp.example".into(),
                },
                action,
                server: ServerFacts {
                    id: server(s),
                    name: format!("server {s}"),
                    tenant: server_tenant(s),
                    resource: format!("https://{}.mcp.example/", server(s)),
                    assurance: "nitro".into(),
                },
                tool: Some(tool(rng.below(TOOLS_PER_SERVER))),
                attestation: AttestationFacts {
                    verified: rng.below(10) != 0,
                    age_ms: Some(rng.below(400_000) as u64),
                    pcr_match: rng.below(10) != 0,
                    debug: rng.below(20) == 0,
                },
                time: UnixMillis::from_secs(1_704_067_200),
                counters: Counters {
                    calls_last_minute: rng.below(700) as u64,
                    spend_micros: rng.below(10_000_000) as u64,
                },
                call: None,
            }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let mut rng = Rng(0x5eed_0001);
    let text = policies(&mut rng);
    let engine = PolicyEngine::new(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(engine.policy_count(), 50);
    let requests = requests(&mut rng);
    let mut allowed = 0;
    for req in &requests {
        let d = engine.decide(req);
        assert_eq!(d, engine.decide_unindexed(req), "{req:?}");
        allowed += usize::from(d.allowed);
    }
    eprintln!(
        "policy bench: {} policies, {} requests, {allowed} allowed",
        engine.policy_count(),
        requests.len()
    );

    let mut group = c.benchmark_group("policy_50");
    let mut i = 0usize;
    group.bench_function("decide", |b| {
        b.iter(|| {
            i = (i + 1) % requests.len();
            black_box(engine.decide(black_box(&requests[i])))
        })
    });
    group.bench_function("decide_unindexed", |b| {
        b.iter(|| {
            i = (i + 1) % requests.len();
            black_box(engine.decide_unindexed(black_box(&requests[i])))
        })
    });
    // The fixed cost: building the request's entities and context, evaluating nothing.
    let empty = PolicyEngine::deny_all();
    group.bench_function("decide_deny_all", |b| {
        b.iter(|| {
            i = (i + 1) % requests.len();
            black_box(empty.decide(black_box(&requests[i])))
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
