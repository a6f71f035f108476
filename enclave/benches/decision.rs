//! Decision latency in-process, against the cost of its two irreducible parts measured alone in
//! the same run.
//!
//! The world (built deterministically, not timed): 20 tenants, 100 MCP servers (5 a tenant) and
//! 180 tools (`search` on every server, `write` on 80 of them): 300 policy entities, and 200
//! agents (10 a tenant) with random roles. The policy set has 50 policies: 6 unscoped (tenant
//! isolation, attested resolve, rate limit …), 20 tenant-scoped permits with role conditions, 14
//! per-server forbids, 6 per-tool forbids and 4 `is Tool` policies. An [`Enclave`] over a mock
//! NSM is booted and set up through its own requests (genesis, 100 registrations, the policy,
//! the identity provider, and an attestation of every server), playing the host's
//! `Persist` → `Durable` dance. Every benchmarked request is a same-tenant `call` of a pinned
//! tool on an attested server, so every one reaches the Cedar evaluation (none is settled by a
//! hard rule first). The clock moves 2 ms per decision, so the agents' call windows reach a
//! steady state (about 100 allowed calls a minute each).
//!
//! Groups (criterion):
//! - `decision/service_authorize`: the full service path: [`Enclave::handle`] with
//!   `Request::Authorize` (the bearer JWT — verified once per token, then answered from the
//!   enclave's bounded cache of verified tokens, as for an agent that presents its token again
//!   — `State::decide`, the entry encoded, signed, hashed into the Merkle frontier and applied
//!   in trusted mode, the `Persist` and `Held` replies) and then the host's `Durable`.
//!   `decision/service_resolve`: the same for a `Resolve` (one more Cedar evaluation per pinned
//!   tool, and the handle JWT signed).
//! - `decision/core_decide_sign_apply`: what the service does for an `Authorize` minus the
//!   bearer and the transport: `State::decide` + `LogWriter::append` (encode, sign, hash,
//!   frontier) + `State::apply_own` (trusted) of the entry just signed (counts the call).
//!   `decision/core_decide_sign`: the same without the apply. (The old live path, which decoded
//!   the entry back and re-decided it with `State::apply`, is gone: `State::apply` now takes
//!   only entries the log verifier has checked.)
//! - `parts/*`: one Ed25519 signature over a decision entry's own signed bytes (~600 bytes),
//!   the Cedar evaluation alone (`PolicyEngine::decide` for the same requests), and the other
//!   pieces (`State::decide`, `append`, decode, bearer verification, SHA-256 of an entry).
//!
//! Then, outside criterion, each path is timed decision by decision over 10,000 decisions
//! (median, p99, p99.9, and the sustained rate on one core = decisions / total time), the
//! reference (one signature + one Cedar evaluation, back to back) likewise, and the ratio is
//! also taken from back-to-back blocks (alternating which goes first), which a loaded machine
//! disturbs less than two distributions taken seconds apart. Target: in-process decision ≤ 1.5 ×
//! (Ed25519 signature + Cedar evaluation).
//!
//! Run: `cargo bench -p attestplane-enclave --bench decision` (or run the bench binary with
//! `--bench NOMATCH` to skip the criterion groups and print only the distributions and ratios).
//!
//! Measured (2026-12-04, 2 shared cores under a load average of 5–13 from other builds; five
//! runs): median per-decision ratio to the reference (sign + Cedar, ~46 µs median) —
//! service `Authorize` 1.27–1.32x, core decide+sign+hash+apply 1.23–1.42x, paired blocks
//! 1.24–1.49x (service) and 1.28–1.33x (core); the old path that decoded the entry back and
//! re-decided it when applying: 1.76–2.25x. p99 ratios are dominated by the machine's load
//! (millisecond preemptions) and are not meaningful here.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use attestplane_enclave::identity::{BearerCache, authenticate};
use attestplane_enclave::nsm::{Clock, MockNsm, Nsm};
use attestplane_enclave::service::{Enclave, EnclaveConfig};
use attestplane_enclave::writer::{Head, LogWriter, Written};
use attestplane_proto::{ByteBuf, Request, Response};
use attestplane_verifier::UnixMillis;
use attestplane_verifier::admin::{
    AdminAction, AdminRequest, Deployment, Digest32, IdentityProviderSpec, PcrHex, ServerSpec,
};
use attestplane_verifier::attestation::{Pcr, PcrIndex, TrustAnchor};
use attestplane_verifier::entry::{DecisionRecord, EntryHash, Event, PrincipalRecord, SignedEntry};
use attestplane_verifier::handle::{IdentityClaims, Jwks};
use attestplane_verifier::log::{LogPolicy, LogVerifier};
use attestplane_verifier::policy::{Action, DecisionRequest, PolicyEngine, Principal, ServerFacts};
use attestplane_verifier::reason::Reason;
use attestplane_verifier::state::State;
use criterion::{Criterion, criterion_group, criterion_main};
use ed25519_dalek::{Signer as _, SigningKey};
use sha2::{Digest as _, Sha256};

/// 2026-11-22T00:00:00Z.
const T0: u64 = 1_795_305_600_000;
const ORIGIN: &str = "attestplane.bench/log";
const ISSUER: &str = "https://control.attestplane.bench";
const IDP_ISSUER: &str = "https://idp.bench.example";
const AUDIENCE: &str = "attestplane";
const ENCLAVE_SEED: [u8; 32] = *b"attestplane decision bench: encl";
const SERVER_SEED: [u8; 32] = *b"attestplane decision bench: serv";

const TENANTS: usize = 20;
const SERVERS_PER_TENANT: usize = 5;
const SERVERS: usize = TENANTS * SERVERS_PER_TENANT;
const AGENTS_PER_TENANT: usize = 10;
const REQUESTS: usize = 1024;
/// How far the enclave's clock moves per decision.
const STEP_MS: u64 = 2;

/// Sizes of the set-up and of the runs outside criterion.
#[derive(Clone, Copy)]
struct Sizes {
    /// Decisions made before measuring, to bring the call windows to their steady state.
    warm: usize,
    /// Decisions timed one by one for each latency distribution.
    samples: usize,
    /// Back-to-back blocks for the paired ratios, and decisions per block.
    rounds: usize,
    block: usize,
}

impl Sizes {
    /// Full sizes under `cargo bench` (which passes `--bench`); small ones when
    /// `cargo test --all-targets` runs the binary once as a smoke test.
    fn get() -> Self {
        if std::env::args().any(|a| a == "--bench") {
            Self {
                warm: 60_000 / STEP_MS as usize,
                samples: 10_000,
                rounds: 31,
                block: 256,
            }
        } else {
            Self {
                warm: 200,
                samples: 100,
                rounds: 3,
                block: 8,
            }
        }
    }
}

fn at(ms: u64) -> UnixMillis {
    UnixMillis::from_millis(ms)
}

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

    fn hex(&mut self, len: usize) -> String {
        (0..len)
            .map(|_| char::from(b"0123456789abcdef"[self.below(16)]))
            .collect()
    }
}

fn tenant(t: usize) -> String {
    format!("tenant-{t:02}")
}

fn server(s: usize) -> String {
    format!("srv-{s:03}")
}

fn server_tenant(s: usize) -> usize {
    s / SERVERS_PER_TENANT
}

/// The tools server `s` pins: `search` everywhere, `write` on four servers of five.
fn tools(s: usize) -> &'static [&'static str] {
    if s % SERVERS_PER_TENANT == SERVERS_PER_TENANT - 1 {
        &["search"]
    } else {
        &["search", "write"]
    }
}

/// 50 policies over the 300 entities.
fn policy_text(rng: &mut Rng) -> String {
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
when { principal.roles.contains("tool-user") && context.attestation.verified && !context.attestation.debug };
@id("call-rate-limit")
forbid (principal, action == Attestplane::Action::"call", resource)
unless { context.counters.calls_last_minute < 600 };
@id("fresh-attestation")
forbid (principal, action == Attestplane::Action::"resolve", resource)
unless { context.attestation has age_ms && context.attestation.age_ms < 3600000 };
"#,
    );
    for t in 0..TENANTS {
        let scope = format!("resource in Attestplane::Tenant::\"{}\"", tenant(t));
        if t % 2 == 0 {
            text.push_str(&format!(
                "@id(\"tenant-{t}-analysts\")\npermit (principal, action == Attestplane::Action::\"call\", {scope})\n\
                 when {{ principal.roles.contains(\"analyst\") && context.time > 1700000000 }};\n"
            ));
        } else {
            text.push_str(&format!(
                "@id(\"tenant-{t}-ops\")\npermit (principal, action in [Attestplane::Action::\"resolve\", \
                 Attestplane::Action::\"call\"], {scope})\n\
                 when {{ principal.roles.contains(\"ops\") && context.attestation.verified }};\n"
            ));
        }
    }
    for i in 0..14 {
        let s = server(rng.below(SERVERS));
        if i % 2 == 0 {
            text.push_str(&format!(
                "@id(\"server-{i}-contractors\")\nforbid (principal, action, resource in Attestplane::Server::\"{s}\")\n\
                 when {{ principal.roles.contains(\"contractor\") || context.counters.calls_last_minute > 500 }};\n"
            ));
        } else {
            text.push_str(&format!(
                "@id(\"server-{i}-resolve\")\nforbid (principal, action == Attestplane::Action::\"resolve\", \
                 resource == Attestplane::Server::\"{s}\")\n\
                 when {{ principal.roles.contains(\"contractor\") && context.time > 1700000000 }};\n"
            ));
        }
    }
    for i in 0..6 {
        let s = loop {
            let s = rng.below(SERVERS);
            if tools(s).contains(&"write") {
                break s;
            }
        };
        text.push_str(&format!(
            "@id(\"tool-{i}-writers\")\nforbid (principal, action == Attestplane::Action::\"call\", \
             resource == Attestplane::Tool::\"{}/write\")\nunless {{ principal.roles.contains(\"writer\") }};\n",
            server(s)
        ));
    }
    for i in 0..4 {
        let (effect, cond) = if i % 2 == 0 {
            (
                "permit",
                format!("principal.roles.contains(\"auditor-{i}\") && resource.name == \"search\""),
            )
        } else {
            (
                "forbid",
                format!(
                    "principal.roles.contains(\"readonly\") && resource.name == \"write\" && {i} > 0"
                ),
            )
        };
        text.push_str(&format!(
            "@id(\"tools-{i}\")\n{effect} (principal, action == Attestplane::Action::\"call\", \
             resource is Attestplane::Tool)\nwhen {{ {cond} }};\n"
        ));
    }
    text
}

struct Agent {
    id: String,
    user: String,
    tenant: usize,
    roles: Vec<String>,
}

fn agents(rng: &mut Rng) -> Vec<Agent> {
    (0..TENANTS * AGENTS_PER_TENANT)
        .map(|i| {
            let mut roles = Vec::new();
            if rng.below(4) != 0 {
                roles.push("tool-user".to_string());
            }
            for r in ["analyst", "ops", "contractor", "writer", "readonly"] {
                if rng.below(3) == 0 {
                    roles.push(r.to_string());
                }
            }
            Agent {
                id: format!("agt_{}", rng.hex(24)),
                user: format!(
                    "user-{}@{}.example",
                    rng.hex(8),
                    tenant(i / AGENTS_PER_TENANT)
                ),
                tenant: i / AGENTS_PER_TENANT,
                roles,
            }
        })
        .collect()
}

fn image_pcrs(nsm: &MockNsm) -> BTreeMap<PcrIndex, Pcr> {
    (0u8..3)
        .map(|i| {
            let v = nsm
                .describe_pcr(u16::from(i))
                .unwrap_or_else(|e| panic!("pcr {i}: {e}"))
                .value;
            let index = PcrIndex::try_from(i).unwrap_or_else(|e| panic!("pcr index {i}: {e}"));
            let pcr = Pcr::try_from(v.as_slice()).unwrap_or_else(|e| panic!("pcr {i}: {e}"));
            (index, pcr)
        })
        .collect()
}

fn anchor_of(nsm: &MockNsm) -> TrustAnchor {
    let pem = nsm.root_pem().unwrap_or_else(|e| panic!("mock root: {e}"));
    TrustAnchor::from_pem(pem.as_bytes()).unwrap_or_else(|e| panic!("mock anchor: {e}"))
}

fn spec(s: usize, pcrs: &BTreeMap<PcrIndex, Pcr>) -> ServerSpec {
    let t = tenant(server_tenant(s));
    ServerSpec {
        id: server(s),
        name: format!("{} server", server(s)),
        tenant: t.clone(),
        resource: format!("https://{}.{t}.example/mcp", server(s)),
        endpoint: format!("http://{}.internal:9000", server(s)),
        pcrs: pcrs.iter().map(|(i, p)| (*i, PcrHex(*p))).collect(),
        allow_debug: false,
        max_attestation_age_ms: 24 * 3_600_000,
        tools: tools(s)
            .iter()
            .map(|t| (t.to_string(), Digest32(Sha256::digest(t.as_bytes()).into())))
            .collect(),
        assurance: attestplane_verifier::admin::Assurance::Nitro,
        prices: Default::default(),
        client_requests: Default::default(),
    }
}

/// The identity provider: an EdDSA JWT issuer.
struct Idp {
    key: SigningKey,
    kid: String,
}

impl Idp {
    fn install(&self) -> AdminAction {
        let jwks = Jwks::from_keys([(self.kid.clone(), self.key.verifying_key())])
            .unwrap_or_else(|e| panic!("jwks: {e}"));
        AdminAction::SetIdentityProvider(IdentityProviderSpec {
            issuer: IDP_ISSUER.into(),
            audience: AUDIENCE.into(),
            jwks: jwks.to_json(),
        })
    }

    /// A token for `agent`, valid a day from `now`.
    fn token(&self, agent: &Agent, now: UnixMillis) -> String {
        IdentityClaims {
            iss: IDP_ISSUER.into(),
            aud: AUDIENCE.into(),
            sub: agent.id.clone(),
            user: Some(agent.user.clone()),
            tenant: tenant(agent.tenant),
            roles: agent.roles.iter().map(|r| r.to_string()).collect(),
            iat: Some(now.as_secs()),
            exp: now.as_secs() + 86_400,
        }
        .encode(&self.kid, &self.key)
        .unwrap_or_else(|e| panic!("token: {e}"))
    }
}

/// The host, as far as the enclave can tell.
struct Host {
    nsm: Arc<MockNsm>,
    enclave: Enclave,
    now: UnixMillis,
    next_id: u64,
    /// The stored log (kept during set-up only).
    store: Vec<Vec<u8>>,
    keep: bool,
}

impl Host {
    fn tick(&mut self, ms: u64) {
        self.now = at(self.now.as_millis() + ms);
    }

    /// Sends `request`; a `Persist` is stored (if kept), reported durable, and the final reply
    /// held for it returned.
    fn send(&mut self, request: Request) -> Response {
        self.next_id += 1;
        let id = self.next_id;
        self.nsm.set_time(self.now);
        let mut replies = self.enclave.handle(id, request, self.now).into_iter();
        let (_, reply) = replies.next().unwrap_or_else(|| panic!("no reply"));
        let Response::Persist { entries, .. } = reply else {
            return reply;
        };
        let Some((_, Response::Held { through_seq, reply })) = replies.next() else {
            panic!("no held reply after the Persist");
        };
        if self.keep {
            self.store
                .extend(entries.into_iter().map(ByteBuf::into_vec));
        }
        self.next_id += 1;
        let _ = self
            .enclave
            .handle(self.next_id, Request::Durable { through_seq }, self.now);
        *reply
    }

    fn admin(&mut self, key: &SigningKey, nonce: u64, action: AdminAction) {
        let mut n = [0u8; 16];
        n[..8].copy_from_slice(&nonce.to_be_bytes());
        let genesis = self
            .store
            .get(1)
            .unwrap_or_else(|| panic!("admin request before genesis is stored"));
        let bytes = AdminRequest {
            time: self.now,
            nonce: n,
            deployment: Deployment {
                origin: ORIGIN.into(),
                genesis: EntryHash::of(genesis),
            },
            action,
        }
        .sign(&key.verifying_key(), key)
        .unwrap_or_else(|e| panic!("admin sign: {e}"));
        match self.send(Request::Admin {
            request: ByteBuf::from(bytes),
        }) {
            Response::AdminResult { accepted: true, .. } => {}
            other => panic!("admin request refused: {other:?}"),
        }
        self.tick(1);
    }
}

/// One benchmarked request: a same-tenant call of a pinned tool.
struct Call {
    bearer: String,
    principal: PrincipalRecord,
    server: String,
    tool: String,
}

/// How the core path applies the entry it has signed.
#[derive(Clone, Copy)]
enum Apply {
    /// Not at all.
    None,
    /// As the service does: the entry as signed, the decision not evaluated again.
    Trusted,
}

/// The core path: the enclave's state and a writer of its own, without the service around.
struct Core {
    state: State,
    writer: LogWriter,
    now: UnixMillis,
}

impl Core {
    fn step(&mut self) -> UnixMillis {
        self.now = at(self.now.as_millis() + STEP_MS).max(self.writer.head().time);
        self.now
    }

    /// `decide` + encode, sign, hash (+ the apply chosen): what `Enclave::handle(Authorize)`
    /// does once the bearer is verified.
    fn authorize(&mut self, c: &Call, apply: Apply) -> Written {
        let now = self.step();
        let record = self
            .state
            .decide(&c.principal, Action::Call, &c.server, Some(&c.tool), now);
        let written = self
            .writer
            .append(Event::Decision(Box::new(record)), now)
            .unwrap_or_else(|e| panic!("append: {e}"));
        match apply {
            Apply::None => {}
            Apply::Trusted => self
                .state
                .apply_own(written.seq, &written.entry)
                .unwrap_or_else(|e| panic!("apply: {e}")),
        }
        written
    }
}

struct Bench {
    host: Host,
    core: Core,
    calls: Vec<Call>,
    cedar: Vec<DecisionRequest>,
    engine: PolicyEngine,
    /// Signed bytes (COSE Sig_structures) of decision entries.
    messages: Vec<Vec<u8>>,
    entries: Vec<Vec<u8>>,
    records: Vec<DecisionRecord>,
    sign_key: SigningKey,
    scratch: LogWriter,
}

fn setup() -> Bench {
    let mut rng = Rng(0x5eed_d3c1);
    let nsm = Arc::new(MockNsm::builder(ENCLAVE_SEED, Clock::Fixed(at(T0))).build());
    let server_nsm = MockNsm::builder(SERVER_SEED, Clock::Fixed(at(T0))).build();
    let server_pcrs = image_pcrs(&server_nsm);
    let config = EnclaveConfig {
        origin: ORIGIN.into(),
        issuer: ISSUER.into(),
        self_anchor: anchor_of(&nsm),
        server_anchor: anchor_of(&server_nsm),
        allow_debug: false,
    };
    let admin = SigningKey::from_bytes(&[1; 32]);
    let idp = Idp {
        key: SigningKey::from_bytes(&[40; 32]),
        kid: "idp-key-1".into(),
    };
    let mut host = Host {
        enclave: Enclave::new(nsm.clone(), config.clone())
            .with_pinned_genesis(vec![admin.verifying_key().to_bytes()]),
        nsm: nsm.clone(),
        now: at(T0),
        next_id: 0,
        store: Vec::new(),
        keep: true,
    };
    let begin = host.send(Request::ReplayBegin {
        genesis_admin_keys: vec![ByteBuf::from(admin.verifying_key().to_bytes().to_vec())],
        total_entries: 0,
    });
    assert_eq!(begin, Response::Ack);
    assert_eq!(host.send(Request::ReplayEnd), Response::Ack);
    host.tick(1);

    let text = policy_text(&mut rng);
    let engine = PolicyEngine::new(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(engine.policy_count(), 50);
    let mut nonce = 0;
    for s in 0..SERVERS {
        nonce += 1;
        host.admin(
            &admin,
            nonce,
            AdminAction::RegisterServer(spec(s, &server_pcrs)),
        );
    }
    host.admin(&admin, nonce + 1, AdminAction::SetPolicy { text });
    host.admin(&admin, nonce + 2, idp.install());
    for s in 0..SERVERS {
        let challenge = host.send(Request::AttestChallenge {
            server_id: server(s),
        });
        let Response::Challenge { nonce, .. } = challenge else {
            panic!("challenge: {challenge:?}");
        };
        server_nsm.set_time(host.now);
        let document = server_nsm
            .attest(None, Some(nonce.to_vec()), None)
            .unwrap_or_else(|e| panic!("server attest: {e}"));
        match host.send(Request::AttestEvidence {
            server_id: server(s),
            nonce,
            document: ByteBuf::from(document),
        }) {
            Response::AttestResult { verified: true, .. } => {}
            other => panic!("attestation refused: {other:?}"),
        }
        host.tick(1);
    }

    // The core path's state: the same log folded into a `State`, and a new epoch after it.
    let mut verifier = LogVerifier::new(
        LogPolicy::new(config.self_anchor.clone(), image_pcrs(&nsm)),
        at(u64::MAX / 2),
    )
    .unwrap_or_else(|e| panic!("log verifier: {e}"));
    let verified = verifier
        .verify_round(&host.store)
        .unwrap_or_else(|e| panic!("the set-up log must verify: {e}"));
    let mut state = State::new(config.server_anchor.clone());
    for e in &verified {
        state.apply(e).unwrap_or_else(|e| panic!("fold: {e}"));
    }
    let head = Head {
        size: verifier.verified(),
        hash: verifier.head().unwrap_or(EntryHash::ZERO),
        epoch: verifier.current_epoch(),
        time: verifier.last_time().unwrap_or(at(0)),
        frontier: verifier.frontier().clone(),
    };
    let (writer, start) = LogWriter::open(nsm.as_ref(), head, ORIGIN, host.now)
        .unwrap_or_else(|e| panic!("open: {e}"));
    state
        .apply_own(start.seq, &start.entry)
        .unwrap_or_else(|e| panic!("apply epoch start: {e}"));
    let mut core = Core {
        state,
        writer,
        now: host.now,
    };
    assert_eq!(
        core.state.snapshot().servers,
        host.enclave.state().snapshot().servers
    );
    host.store = Vec::new();
    host.keep = false;

    let agents = agents(&mut rng);
    let bearers: Vec<String> = agents.iter().map(|a| idp.token(a, host.now)).collect();
    let principals: Vec<PrincipalRecord> = bearers
        .iter()
        .map(|b| {
            authenticate(host.enclave.state(), b, host.now)
                .unwrap_or_else(|e| panic!("bearer: {e}"))
        })
        .collect();
    let calls: Vec<Call> = (0..REQUESTS)
        .map(|_| {
            let a = rng.below(agents.len());
            let t = agents[a].tenant;
            let s = t * SERVERS_PER_TENANT + rng.below(SERVERS_PER_TENANT);
            let pinned = tools(s);
            Call {
                bearer: bearers[a].clone(),
                principal: principals[a].clone(),
                server: server(s),
                tool: pinned[rng.below(pinned.len())].to_string(),
            }
        })
        .collect();

    // Warm the core state's call windows to their steady state, and keep what it wrote.
    let mut entries = Vec::new();
    let mut records = Vec::new();
    for i in 0..Sizes::get().warm {
        let w = core.authorize(&calls[i % REQUESTS], Apply::Trusted);
        if entries.len() < REQUESTS {
            let signed = SignedEntry::decode(&w.bytes).unwrap_or_else(|e| panic!("{e}"));
            if let Event::Decision(d) = &signed.entry().event {
                records.push((**d).clone());
            }
            entries.push(w.bytes);
        }
    }
    let messages: Vec<Vec<u8>> = entries
        .iter()
        .map(|b| {
            SignedEntry::decode(b)
                .unwrap_or_else(|e| panic!("{e}"))
                .signed_bytes()
                .to_vec()
        })
        .collect();

    // The same requests as Cedar sees them, with the facts the state gives now.
    let cedar = calls
        .iter()
        .map(|c| {
            let s = core
                .state
                .server(&c.server)
                .unwrap_or_else(|| panic!("server"));
            let p = &c.principal;
            DecisionRequest {
                principal: Principal {
                    agent: p.agent.clone(),
                    user: p.user.clone(),
                    tenant: p.tenant.clone(),
                    roles: p.roles.clone(),
                    issuer: p.issuer.clone(),
                },
                action: Action::Call,
                server: ServerFacts {
                    id: s.spec.id.clone(),
                    name: s.spec.name.clone(),
                    tenant: s.spec.tenant.clone(),
                    resource: s.spec.resource.clone(),
                    assurance: "nitro".into(),
                },
                tool: Some(c.tool.clone()),
                attestation: core.state.attestation_facts(s, core.now),
                time: core.now,
                counters: core.state.counters(&p.agent, core.now),
                call: None,
            }
        })
        .collect::<Vec<_>>();
    // Every request reaches Cedar, and Cedar alone decides as `State::decide` did.
    for (c, r) in cedar.iter().zip(&records) {
        assert!(
            matches!(
                r.reason,
                None | Some(Reason::Forbidden { .. } | Reason::NoPermit)
            ),
            "a request was settled before Cedar: {r:?}"
        );
        assert_eq!(engine.decide(c).allowed, r.allowed);
    }
    let scratch = LogWriter::open(nsm.as_ref(), Head::empty(), ORIGIN, host.now)
        .unwrap_or_else(|e| panic!("open: {e}"))
        .0;
    // Warm the service's call windows too.
    for i in 0..Sizes::get().warm {
        service_authorize(&mut host, &calls[i % REQUESTS]);
    }
    Bench {
        host,
        core,
        calls,
        cedar,
        engine,
        messages,
        entries,
        records,
        sign_key: SigningKey::from_bytes(&[7; 32]),
        scratch,
    }
}

fn service_authorize(host: &mut Host, c: &Call) -> bool {
    host.tick(STEP_MS);
    match host.send(Request::Authorize {
        bearer: c.bearer.clone(),
        server_id: c.server.clone(),
        tool: c.tool.clone(),
    }) {
        Response::Authorized { allowed, .. } => allowed,
        other => panic!("authorize: {other:?}"),
    }
}

fn service_resolve(host: &mut Host, c: &Call) -> bool {
    host.tick(STEP_MS);
    match host.send(Request::Resolve {
        bearer: c.bearer.clone(),
        server_id: c.server.clone(),
    }) {
        Response::Handle { .. } => true,
        Response::Denied { .. } => false,
        other => panic!("resolve: {other:?}"),
    }
}

/// Latencies of `n` calls of `f`, one by one.
struct Latency {
    median_us: f64,
    p99_us: f64,
    p999_us: f64,
    max_us: f64,
    per_sec: f64,
}

fn latency(n: usize, mut f: impl FnMut(usize)) -> Latency {
    let mut v = Vec::with_capacity(n);
    let start = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        f(i);
        v.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let total = start.elapsed().as_secs_f64();
    v.sort_by(f64::total_cmp);
    let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    Latency {
        median_us: q(0.5),
        p99_us: q(0.99),
        p999_us: q(0.999),
        max_us: q(1.0),
        per_sec: n as f64 / total,
    }
}

fn show(name: &str, l: &Latency) {
    eprintln!(
        "  {name:<34} median {:>7.1} us  p99 {:>7.1} us  p99.9 {:>7.1} us  max {:>8.1} us  {:>7.0} /s",
        l.median_us, l.p99_us, l.p999_us, l.max_us, l.per_sec
    );
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Medians over `sizes.rounds` back-to-back blocks of `a` and `b` (alternating which goes first):
/// (time of a per call, time of b per call, median of the per-round ratios).
fn paired(sizes: Sizes, mut a: impl FnMut(usize), mut b: impl FnMut(usize)) -> (f64, f64, f64) {
    let mut ta = Vec::new();
    let mut tb = Vec::new();
    let mut ratios = Vec::new();
    let block = |f: &mut dyn FnMut(usize), round: usize| {
        let start = Instant::now();
        for i in 0..sizes.block {
            f(round * sizes.block + i);
        }
        start.elapsed().as_secs_f64() * 1e6 / sizes.block as f64
    };
    for round in 0..sizes.rounds {
        let (x, y) = if round % 2 == 0 {
            let x = block(&mut a, round);
            (x, block(&mut b, round))
        } else {
            let y = block(&mut b, round);
            (block(&mut a, round), y)
        };
        ta.push(x);
        tb.push(y);
        ratios.push(x / y);
    }
    (median(&mut ta), median(&mut tb), median(&mut ratios))
}

fn bench(c: &mut Criterion) {
    let setup_start = Instant::now();
    let Bench {
        mut host,
        mut core,
        calls,
        cedar,
        engine,
        messages,
        entries,
        records,
        sign_key,
        mut scratch,
    } = setup();
    let allowed = records.iter().filter(|r| r.allowed).count();
    let mean_entry = entries.iter().map(Vec::len).sum::<usize>() / entries.len();
    let mean_message = messages.iter().map(Vec::len).sum::<usize>() / messages.len();
    eprintln!(
        "decision bench: {TENANTS} tenants, {SERVERS} servers, 180 tools, {} agents, {} policies; \
         {REQUESTS} call requests ({allowed} allowed); decision entry {mean_entry} bytes, signed \
         message {mean_message} bytes; set-up {:.1} s",
        TENANTS * AGENTS_PER_TENANT,
        engine.policy_count(),
        setup_start.elapsed().as_secs_f64()
    );
    let n = REQUESTS;

    let mut group = c.benchmark_group("decision");
    let mut i = 0usize;
    group.bench_function("service_authorize", |b| {
        b.iter(|| {
            i += 1;
            service_authorize(&mut host, &calls[i % n])
        })
    });
    group.bench_function("service_resolve", |b| {
        b.iter(|| {
            i += 1;
            service_resolve(&mut host, &calls[i % n])
        })
    });
    group.bench_function("core_decide_sign_apply", |b| {
        b.iter(|| {
            i += 1;
            core.authorize(&calls[i % n], Apply::Trusted).seq
        })
    });
    group.bench_function("core_decide_sign", |b| {
        b.iter(|| {
            i += 1;
            core.authorize(&calls[i % n], Apply::None).seq
        })
    });
    group.finish();

    let mut group = c.benchmark_group("parts");
    group.bench_function("ed25519_sign_entry", |b| {
        b.iter(|| {
            i += 1;
            sign_key.sign(black_box(&messages[i % messages.len()]))
        })
    });
    group.bench_function("cedar_decide", |b| {
        b.iter(|| {
            i += 1;
            engine.decide(black_box(&cedar[i % n])).allowed
        })
    });
    group.bench_function("state_decide", |b| {
        b.iter(|| {
            i += 1;
            let c = &calls[i % n];
            core.state
                .decide(
                    &c.principal,
                    Action::Call,
                    &c.server,
                    Some(&c.tool),
                    core.now,
                )
                .allowed
        })
    });
    group.bench_function("append_encode_sign_hash", |b| {
        b.iter(|| {
            i += 1;
            let r = records[i % records.len()].clone();
            scratch
                .append(Event::Decision(Box::new(r)), core.now)
                .map(|w| w.seq)
                .is_ok()
        })
    });
    group.bench_function("entry_decode", |b| {
        b.iter(|| {
            i += 1;
            SignedEntry::decode(black_box(&entries[i % entries.len()])).is_ok()
        })
    });
    group.bench_function("entry_sha256", |b| {
        b.iter(|| {
            i += 1;
            EntryHash::of(black_box(&entries[i % entries.len()]))
        })
    });
    group.bench_function("bearer_authenticate", |b| {
        b.iter(|| {
            i += 1;
            authenticate(host.enclave.state(), &calls[i % n].bearer, host.now).is_ok()
        })
    });
    let mut bearers = BearerCache::default();
    group.bench_function("bearer_authenticate_cached", |b| {
        b.iter(|| {
            i += 1;
            bearers
                .authenticate(host.enclave.state(), &calls[i % n].bearer, host.now)
                .is_ok()
        })
    });
    group.finish();

    // Distributions, decision by decision, and the sustained rate on one core.
    let sizes = Sizes::get();
    let samples = sizes.samples;
    eprintln!("\nlatency over {samples} decisions each (one core):");
    let service = latency(samples, |i| {
        black_box(service_authorize(&mut host, &calls[i % n]));
    });
    show("service Authorize (+ Durable)", &service);
    let resolve = latency(samples, |i| {
        black_box(service_resolve(&mut host, &calls[i % n]));
    });
    show("service Resolve (+ Durable)", &resolve);
    let core_full = latency(samples, |i| {
        black_box(core.authorize(&calls[i % n], Apply::Trusted));
    });
    show("core decide+sign+hash+apply", &core_full);
    let core_sign = latency(samples, |i| {
        black_box(core.authorize(&calls[i % n], Apply::None));
    });
    show("core decide+sign+hash", &core_sign);
    let sign = latency(samples, |i| {
        black_box(sign_key.sign(&messages[i % messages.len()]));
    });
    show("ed25519 sign alone", &sign);
    let cedar_alone = latency(samples, |i| {
        black_box(engine.decide(&cedar[i % n]));
    });
    show("cedar decide alone", &cedar_alone);
    let reference = latency(samples, |i| {
        black_box(sign_key.sign(&messages[i % messages.len()]));
        black_box(engine.decide(&cedar[i % n]));
    });
    show("reference: sign + cedar", &reference);
    let auth = latency(samples, |i| {
        black_box(authenticate(host.enclave.state(), &calls[i % n].bearer, host.now).is_ok());
    });
    show("bearer authenticate alone", &auth);

    eprintln!("\nratios to the reference (target <= 1.5):");
    for (name, l) in [
        ("core decide+sign+hash+apply", &core_full),
        ("core decide+sign+hash", &core_sign),
        ("service Authorize", &service),
    ] {
        eprintln!(
            "  {name:<34} median {:.2}x  p99 {:.2}x",
            l.median_us / reference.median_us,
            l.p99_us / reference.p99_us
        );
    }
    let reference_block = |i: usize| {
        black_box(sign_key.sign(&messages[i % messages.len()]));
        black_box(engine.decide(&cedar[i % n]));
    };
    let (a, b, r) = paired(
        sizes,
        |i| {
            black_box(core.authorize(&calls[i % n], Apply::Trusted));
        },
        reference_block,
    );
    eprintln!(
        "  paired blocks: core decide+sign+hash+apply {a:.1} us vs reference {b:.1} us: {r:.2}x"
    );
    let (a, b, r) = paired(
        sizes,
        |i| {
            black_box(core.authorize(&calls[i % n], Apply::None));
        },
        reference_block,
    );
    eprintln!("  paired blocks: core decide+sign+hash {a:.1} us vs reference {b:.1} us: {r:.2}x");
    let (a, b, r) = paired(
        sizes,
        |i| {
            black_box(service_authorize(&mut host, &calls[i % n]));
        },
        reference_block,
    );
    eprintln!("  paired blocks: service Authorize {a:.1} us vs reference {b:.1} us: {r:.2}x");
}

criterion_group!(benches, bench);
criterion_main!(benches);
