//! Boot replay of a long stored log, against the verifier's own log-verification throughput,
//! and the replaying enclave's peak memory.
//!
//! Run: `cargo run --release -p attestplane-enclave --example replay_bench [-- ENTRIES]`
//! (default 1,000,000 entries).
//!
//! 1. Generation (not timed for the figures): a log of ENTRIES entries in two epochs, written
//!    with [`LogWriter`] over a mock NSM and folded into a [`State`] entry by entry as the
//!    enclave does live, so every logged decision is the one the state gives (the state side
//!    decides and folds on one thread, the writer signs on another). The world is the decision
//!    bench's: 20 tenants, 100 servers, 180 tools, 50 policies, 200 agents. After each epoch
//!    opens, every server is attested (its document, ~5 KB, is in the entry). The rest are, at
//!    1 ms intervals: 80 % `call` decisions, 15 % `resolve` decisions (an allowed one names the
//!    tools the handle allows, one Cedar evaluation each), 5 % discoveries (one evaluation per
//!    server of the tenant); 5 % of the requests go to another tenant's server and 2 % of calls
//!    name an unpinned tool (both refused by hard rules before Cedar). The log is written to a
//!    temporary file as an RFC 8742 CBOR sequence and kept in memory.
//! 2. `verify_log` over the in-memory log, in a rayon pool of 1 thread and of 2.
//! 3. Each measurement of the enclave runs in a child process (this program re-executed with
//!    `ATTESTPLANE_REPLAY_BENCH_CHILD` set, its rayon pool sized by the parent), which streams
//!    the file in batches of `MAX_ENTRIES_PER_FRAME` (4096) and reports its own peak RSS
//!    (`VmHWM`), untouched by the generator's memory. Only the enclave's work is timed, not
//!    the file reads. Modes:
//!    - `replay`: a fresh [`Enclave`] fed `ReplayBegin`, `ReplayEntries`…, `ReplayEnd` (and the
//!      `Durable` for the new epoch's entry), as the host does at boot: its rate and VmHWM,
//!      over the whole log and over its first 100,000 entries (memory must not grow with the
//!      log's length);
//!    - `paired`: the same replay and the verifier's own rounds ([`LogVerifier::verify_round`],
//!      which is all `verify_log` does, per 4096 entries) over the same batches, batch by batch,
//!      alternating which goes first. On a shared machine whose load drifts by the minute, this
//!      is the ratio to trust; separate runs are printed too;
//!    - `verify`: the streaming [`LogVerifier`] alone;
//!    - `fold`: the enclave's replay loop written out (`verify_round`, then
//!      `State::apply_with` per entry in the mode [`EpochTrust`] chooses, trusted for the
//!      enclave's own image) with each part timed, and the apply timed per event type;
//!      `recheck`: the same with every epoch re-decided (`State::apply`, Cedar evaluated
//!      again), as for epochs written by another image and as an auditor does.
//!
//! `--auditor` measures the auditor's full verification instead (see [`auditor`]); with
//! `--distinct` the log is built so that no two of its Cedar requests share a memo key (see
//! [`generate`]).
//!
//! Target: replay ≥ 0.8 × `verify_log` throughput; memory bounded by the state.
//!
//! Measured (2026-12-04, 2 shared cores, load average 2–13 from other builds), 1,000,000
//! entries, paired batch by batch: replay / verify 0.98 and 0.98 on one thread, 0.92 and 0.97
//! on two (two runs); 100,000 entries: 0.91 and 0.87. Peak RSS of the replaying enclave 28.2
//! MiB over 1,000,000 entries and 27.1–27.9 MiB over 100,000 (bounded by the state). Own-image
//! epochs applied trusted: the apply is ~5 % of the fold (decisions ~1–3 µs each); re-deciding
//! every epoch (`recheck`) makes it ~50 % and halves the rate.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, SyncSender, channel, sync_channel};
use std::time::Instant;

use attestplane_enclave::nsm::{Clock, MockNsm, Nsm};
use attestplane_enclave::service::{Enclave, EnclaveConfig, EpochTrust};
use attestplane_enclave::writer::{Head, LogWriter};
use attestplane_proto::{ByteBuf, MAX_ENTRIES_PER_FRAME, Request, Response};
use attestplane_verifier::UnixMillis;
use attestplane_verifier::admin::{
    AdminAction, AdminRequest, Deployment, Digest32, IdentityProviderSpec, PcrHex, ServerSpec,
};
use attestplane_verifier::attestation::{Pcr, PcrIndex, TrustAnchor};
use attestplane_verifier::cbor::item_len;
use attestplane_verifier::entry::{AttestationRecord, Entry, EntryHash, Event, PrincipalRecord};
use attestplane_verifier::handle::Jwks;
use attestplane_verifier::log::{LogPolicy, LogVerifier, verify_log};
use attestplane_verifier::policy::Action;
use attestplane_verifier::replay::Replay;
use attestplane_verifier::state::{ApplyMode, State};
use ed25519_dalek::SigningKey;
use sha2::{Digest as _, Sha256};

/// 2026-11-22T00:00:00Z.
const T0: u64 = 1_795_305_600_000;
const ORIGIN: &str = "attestplane.bench/log";
const ISSUER: &str = "https://control.attestplane.bench";
const IDP_ISSUER: &str = "https://idp.bench.example";
const AUDIENCE: &str = "attestplane";
const ENCLAVE_SEED: [u8; 32] = *b"attestplane replay bench: enclav";
const SERVER_SEED: [u8; 32] = *b"attestplane replay bench: server";
const CHILD_ENV: &str = "ATTESTPLANE_REPLAY_BENCH_CHILD";

const TENANTS: usize = 20;
const SERVERS_PER_TENANT: usize = 5;
const SERVERS: usize = TENANTS * SERVERS_PER_TENANT;
const AGENTS_PER_TENANT: usize = 10;
const DEFAULT_ENTRIES: u64 = 1_000_000;
const SMALL_ENTRIES: u64 = 100_000;
/// Bytes read from the log file at a time.
const READ_CHUNK: usize = 1 << 20;

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

/// 50 policies over the 300 entities (the decision bench's set).
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

/// The agents, as the identity provider vouches for them (roles sorted, as `authenticate`
/// returns them).
fn agents(rng: &mut Rng) -> Vec<PrincipalRecord> {
    (0..TENANTS * AGENTS_PER_TENANT)
        .map(|i| {
            let t = i / AGENTS_PER_TENANT;
            let mut roles = Vec::new();
            if rng.below(4) != 0 {
                roles.push("tool-user".to_string());
            }
            for r in ["analyst", "ops", "contractor", "writer", "readonly"] {
                if rng.below(3) == 0 {
                    roles.push(r.to_string());
                }
            }
            roles.sort();
            PrincipalRecord {
                agent: format!("agt_{}", rng.hex(24)),
                user: format!("user-{}@{}.example", rng.hex(8), tenant(t)),
                tenant: tenant(t),
                roles,
                issuer: IDP_ISSUER.into(),
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

fn enclave_nsm(now: UnixMillis) -> MockNsm {
    MockNsm::builder(ENCLAVE_SEED, Clock::Fixed(now)).build()
}

fn server_nsm() -> MockNsm {
    MockNsm::builder(SERVER_SEED, Clock::Fixed(at(T0))).build()
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

/// Counts and sizes per event type.
#[derive(Default)]
struct Tally {
    by_type: BTreeMap<&'static str, (u64, u64)>,
}

impl Tally {
    fn add(&mut self, kind: &'static str, bytes: usize) {
        let e = self.by_type.entry(kind).or_default();
        e.0 += 1;
        e.1 += bytes as u64;
    }
}

/// What the state side hands the writer side.
enum Job {
    /// Open a new epoch at this time.
    OpenEpoch(UnixMillis),
    /// Sign this event as the next entry, at this time.
    Append(Event, UnixMillis),
}

/// What the writer side returns: the log, in memory.
struct WrittenLog {
    entries: Vec<Vec<u8>>,
    tally: Tally,
}

/// The writer side: the enclave's [`LogWriter`], persisting each entry to the file.
/// The genesis entry's hash goes back to the state side on `genesis`: admin requests name it.
fn write_log(
    nsm: MockNsm,
    path: &Path,
    total: u64,
    jobs: Receiver<Job>,
    genesis: Sender<EntryHash>,
) -> WrittenLog {
    let file = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut entries = Vec::with_capacity(total as usize);
    let mut tally = Tally::default();
    let mut writer: Option<LogWriter> = None;
    for job in jobs {
        let (kind, written) = match job {
            Job::OpenEpoch(now) => {
                let head = writer
                    .as_ref()
                    .map_or_else(Head::empty, |w| w.head().clone());
                nsm.set_time(now);
                let (w, start) = LogWriter::open(&nsm, head, ORIGIN, now)
                    .unwrap_or_else(|e| panic!("open epoch: {e}"));
                writer = Some(w);
                ("epoch_start", start)
            }
            Job::Append(event, now) => {
                let kind = event.type_name();
                let w = writer
                    .as_mut()
                    .unwrap_or_else(|| panic!("no epoch open"))
                    .append(event, now)
                    .unwrap_or_else(|e| panic!("append: {e}"));
                (kind, w)
            }
        };
        if kind == "genesis" {
            let _ = genesis.send(written.hash);
        }
        tally.add(kind, written.bytes.len());
        out.write_all(&written.bytes)
            .unwrap_or_else(|e| panic!("write: {e}"));
        entries.push(written.bytes);
    }
    out.flush().unwrap_or_else(|e| panic!("flush: {e}"));
    WrittenLog { entries, tally }
}

/// The state side: decides as the enclave does and folds each entry into its [`State`] before
/// handing the event to the writer side (which signs it on the other core). `State::apply_own`
/// reads an entry's time and event only, so it is applied to the entry as the writer will make
/// it (`prev` aside), in trusted mode as the enclave applies what it has just decided; the
/// replays below check every entry against the signed bytes (and `recheck` re-decides all).
struct Generator {
    servers: MockNsm,
    state: State,
    now: UnixMillis,
    seq: u64,
    epoch: u64,
    jobs: SyncSender<Job>,
    rng: Rng,
    /// The deployment admin requests name, once genesis is written.
    deployment: Option<Deployment>,
    jti: u64,
}

impl Generator {
    fn fold(&mut self, event: Event) {
        let entry = Entry {
            seq: self.seq,
            prev: EntryHash::ZERO,
            epoch: self.epoch,
            time: self.now,
            event,
        };
        self.state
            .apply_own(self.seq, &entry)
            .unwrap_or_else(|e| panic!("apply {}: {e}", self.seq));
        self.seq += 1;
        let job = match entry.event {
            Event::EpochStart { .. } => Job::OpenEpoch(self.now),
            event => Job::Append(event, self.now),
        };
        self.jobs
            .send(job)
            .unwrap_or_else(|e| panic!("writer side: {e}"));
    }

    fn open_epoch(&mut self, first: bool) {
        if !first {
            self.epoch += 1;
        }
        // `apply` does nothing with an epoch start but count it.
        self.fold(Event::EpochStart {
            attestation: Vec::new(),
        });
    }

    fn admin(&mut self, key: &SigningKey, action: AdminAction) {
        let mut nonce = [0u8; 16];
        nonce[..8].copy_from_slice(&self.rng.next().to_be_bytes());
        let deployment = self
            .deployment
            .clone()
            .unwrap_or_else(|| panic!("admin request before genesis"));
        let request = AdminRequest {
            time: self.now,
            nonce,
            deployment,
            action,
        }
        .sign(&key.verifying_key(), key)
        .unwrap_or_else(|e| panic!("admin sign: {e}"));
        if let Err(reason) = self.state.check_admin(&request, self.now) {
            panic!("admin request refused: {reason}");
        }
        self.fold(Event::Admin {
            request,
            accepted: true,
            reason: None,
        });
        self.now = at(self.now.as_millis() + 1);
    }

    fn attest_all(&mut self) {
        for s in 0..SERVERS {
            let nonce: Vec<u8> = (0..4).flat_map(|_| self.rng.next().to_be_bytes()).collect();
            self.servers.set_time(self.now);
            let document = self
                .servers
                .attest(None, Some(nonce.clone()), None)
                .unwrap_or_else(|e| panic!("server attest: {e}"));
            let attested = self
                .state
                .check_attestation(&server(s), &nonce, &document, self.now)
                .unwrap_or_else(|e| panic!("attestation of {}: {e}", server(s)));
            self.fold(Event::Attestation(AttestationRecord {
                server: server(s),
                nonce,
                document,
                verified: true,
                measurement: Some(attested.measurement),
                reason: None,
            }));
            self.now = at(self.now.as_millis() + 1);
        }
    }

    /// One agent request, logged as the enclave logs it.
    fn request(&mut self, agents: &[PrincipalRecord]) {
        self.now = at(self.now.as_millis() + 1);
        let now = self.now;
        let principal = &agents[self.rng.below(agents.len())];
        let own = principal
            .tenant
            .strip_prefix("tenant-")
            .and_then(|t| t.parse::<usize>().ok())
            .unwrap_or(0);
        let t = if self.rng.below(100) < 5 {
            self.rng.below(TENANTS)
        } else {
            own
        };
        let s = t * SERVERS_PER_TENANT + self.rng.below(SERVERS_PER_TENANT);
        let kind = self.rng.below(100);
        let event = if kind < 80 {
            let pinned = tools(s);
            let tool = if self.rng.below(100) < 2 {
                "delete"
            } else {
                pinned[self.rng.below(pinned.len())]
            };
            let record = self
                .state
                .decide(principal, Action::Call, &server(s), Some(tool), now);
            Event::Decision(Box::new(record))
        } else if kind < 95 {
            let mut record = self
                .state
                .decide(principal, Action::Resolve, &server(s), None, now);
            if let Some(handle) = record.handle.as_mut() {
                self.jti += 1;
                handle.jti = format!("{:032x}", self.jti);
            }
            Event::Decision(Box::new(record))
        } else {
            Event::Discovery {
                principal: principal.clone(),
                servers: self.state.discover(principal, now),
            }
        };
        self.fold(event);
    }
}

struct Generated {
    entries: Vec<Vec<u8>>,
    policy: LogPolicy,
    end: UnixMillis,
    tally: Tally,
    bytes: u64,
    secs: f64,
}

/// With `distinct`, the policy set also reads `context.attestation.age_ms` in arithmetic (a
/// forbid that never holds), so that a replay's [`DecisionMemo`] keys every request by its
/// exact age: no two Cedar requests of the log share a key (each entry has its own
/// millisecond), the memo's worst case.
///
/// [`DecisionMemo`]: attestplane_verifier::policy::DecisionMemo
fn generate(total: u64, path: &Path, distinct: bool) -> Generated {
    let start = Instant::now();
    let mut rng = Rng(0x5eed_7e91);
    let nsm = enclave_nsm(at(T0));
    let servers = server_nsm();
    let server_pcrs = image_pcrs(&servers);
    let policy = LogPolicy::new(anchor_of(&nsm), image_pcrs(&nsm));
    let admin = SigningKey::from_bytes(&[1; 32]);
    let idp = SigningKey::from_bytes(&[40; 32]);
    let mut text = policy_text(&mut rng);
    if distinct {
        text.push_str(
            "@id(\"age-arithmetic\")\nforbid (principal, action, resource)\n\
             when { context.attestation has age_ms && context.attestation.age_ms + 1 < 0 };\n",
        );
    }
    let agents = agents(&mut rng);
    let (jobs, received) = sync_channel(4096);
    let (genesis_sent, genesis_hash) = channel();
    let writer_path = path.to_path_buf();
    let writer =
        std::thread::spawn(move || write_log(nsm, &writer_path, total, received, genesis_sent));
    let mut g = Generator {
        state: State::new(anchor_of(&servers)),
        servers,
        now: at(T0),
        seq: 0,
        epoch: 0,
        jobs,
        rng,
        jti: 0,
        deployment: None,
    };
    g.open_epoch(true);
    g.fold(Event::Genesis {
        admin_keys: vec![admin.verifying_key().to_bytes()],
        host_chosen: false,
    });
    let genesis = genesis_hash
        .recv()
        .unwrap_or_else(|e| panic!("the writer side sent no genesis hash: {e}"));
    g.state.set_genesis_hash(genesis);
    g.deployment = Some(Deployment {
        origin: ORIGIN.into(),
        genesis,
    });
    for s in 0..SERVERS {
        g.admin(&admin, AdminAction::RegisterServer(spec(s, &server_pcrs)));
    }
    g.admin(&admin, AdminAction::SetPolicy { text });
    let jwks = Jwks::from_keys([("idp-key-1".to_string(), idp.verifying_key())])
        .unwrap_or_else(|e| panic!("jwks: {e}"));
    g.admin(
        &admin,
        AdminAction::SetIdentityProvider(IdentityProviderSpec {
            issuer: IDP_ISSUER.into(),
            audience: AUDIENCE.into(),
            jwks: jwks.to_json(),
        }),
    );
    g.attest_all();
    let half = total / 2;
    let mut last_report = Instant::now();
    while g.seq < total {
        if g.seq == half {
            g.open_epoch(false);
            g.attest_all();
            continue;
        }
        g.request(&agents);
        if last_report.elapsed().as_secs() >= 30 {
            last_report = Instant::now();
            eprintln!(
                "  generated {} entries in {:.0} s",
                g.seq,
                start.elapsed().as_secs_f64()
            );
        }
    }
    let end = g.now;
    drop(g);
    let mut written = writer
        .join()
        .unwrap_or_else(|_| panic!("the writer side panicked"));
    written.entries.truncate(total as usize);
    let bytes = written.entries.iter().map(|e| e.len() as u64).sum();
    Generated {
        policy,
        end,
        bytes,
        tally: written.tally,
        entries: written.entries,
        secs: start.elapsed().as_secs_f64(),
    }
}

fn proc_status_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Streams an RFC 8742 sequence of entries from a file, in batches.
struct Items {
    file: File,
    buf: Vec<u8>,
    start: usize,
    eof: bool,
}

impl Items {
    fn open(path: &Path) -> Self {
        Self {
            file: File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display())),
            buf: Vec::with_capacity(2 * READ_CHUNK),
            start: 0,
            eof: false,
        }
    }

    /// Up to `max` more entries (none at the end).
    fn batch(&mut self, max: usize) -> Vec<Vec<u8>> {
        let mut out = Vec::with_capacity(max);
        while out.len() < max {
            let rest = &self.buf[self.start..];
            match item_len(rest) {
                Ok(len) => {
                    out.push(rest[..len].to_vec());
                    self.start += len;
                }
                Err(e) => {
                    if self.eof {
                        assert!(rest.is_empty(), "trailing bytes in the log file: {e}");
                        break;
                    }
                    self.buf.drain(..self.start);
                    self.start = 0;
                    let old = self.buf.len();
                    self.buf.resize(old + READ_CHUNK, 0);
                    let n = self
                        .file
                        .read(&mut self.buf[old..])
                        .unwrap_or_else(|e| panic!("read: {e}"));
                    self.buf.truncate(old + n);
                    self.eof = n == 0;
                }
            }
        }
        out
    }
}

/// What a child reports on its stdout, one `key=value` per field.
fn report(fields: &[(&str, String)]) {
    let line: Vec<String> = fields.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("RESULT {}", line.join(" "));
}

fn child(mode: &str) {
    let mut args = std::env::args().skip(1);
    let path = PathBuf::from(args.next().unwrap_or_else(|| panic!("child: no file")));
    let limit: u64 = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("child: no entry count"));
    let threads: usize = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("child: no thread count"));
    let end: u64 = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("child: no end time"));
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .unwrap_or_else(|e| panic!("rayon: {e}"));
    let hwm_start = proc_status_kb("VmHWM:");
    let mut items = Items::open(&path);
    let now = at(end + 60_000);
    let mut timed = 0.0f64;
    let mut seen = 0u64;
    let next = |items: &mut Items, seen: &mut u64| {
        let want = MAX_ENTRIES_PER_FRAME.min((limit - *seen) as usize);
        let batch = if want == 0 {
            Vec::new()
        } else {
            items.batch(want)
        };
        *seen += batch.len() as u64;
        batch
    };
    let mut fields: Vec<(&str, String)> = Vec::new();
    match mode {
        "replay" => {
            let nsm = Arc::new(enclave_nsm(now));
            let config = EnclaveConfig {
                origin: ORIGIN.into(),
                issuer: ISSUER.into(),
                self_anchor: anchor_of(&nsm),
                server_anchor: anchor_of(&server_nsm()),
                allow_debug: false,
            };
            let mut enclave = Enclave::new(nsm.clone(), config);
            let t = Instant::now();
            let begin = enclave.handle(
                1,
                Request::ReplayBegin {
                    genesis_admin_keys: Vec::new(),
                    total_entries: limit,
                },
                now,
            );
            timed += t.elapsed().as_secs_f64();
            assert_eq!(begin, vec![(1, Response::Ack)]);
            let mut id = 1;
            loop {
                let batch = next(&mut items, &mut seen);
                if batch.is_empty() {
                    break;
                }
                id += 1;
                let entries = batch.into_iter().map(ByteBuf::from).collect();
                let t = Instant::now();
                let reply = enclave.handle(id, Request::ReplayEntries { entries }, now);
                timed += t.elapsed().as_secs_f64();
                assert_eq!(reply, vec![(id, Response::Ack)], "replay refused");
            }
            let t = Instant::now();
            let reply = enclave.handle(id + 1, Request::ReplayEnd, now);
            let through_seq = match reply.as_slice() {
                [
                    (_, Response::Persist { .. }),
                    (_, Response::Held { through_seq, reply }),
                ] if **reply == Response::Ack => *through_seq,
                other => panic!("replay end: {other:?}"),
            };
            let acked = enclave.handle(id + 2, Request::Durable { through_seq }, now);
            timed += t.elapsed().as_secs_f64();
            assert_eq!(acked, vec![(id + 2, Response::Ack)]);
            assert!(enclave.is_ready(), "the enclave did not become ready");
            let snapshot = enclave.state().snapshot();
            fields.push(("applied", enclave.state().applied().to_string()));
            fields.push(("servers", snapshot.servers.len().to_string()));
            fields.push((
                "calls_in_window",
                snapshot.calls.values().sum::<usize>().to_string(),
            ));
        }
        "verify" => {
            let nsm = enclave_nsm(now);
            let policy = LogPolicy::new(anchor_of(&nsm), image_pcrs(&nsm));
            let mut verifier =
                LogVerifier::new(policy, now).unwrap_or_else(|e| panic!("verifier: {e}"));
            loop {
                let batch = next(&mut items, &mut seen);
                if batch.is_empty() {
                    break;
                }
                let t = Instant::now();
                verifier
                    .verify_round(&batch)
                    .unwrap_or_else(|e| panic!("verify: {e}"));
                timed += t.elapsed().as_secs_f64();
            }
            let t = Instant::now();
            let log = verifier.finish().unwrap_or_else(|e| panic!("verify: {e}"));
            timed += t.elapsed().as_secs_f64();
            assert_eq!(log.size(), limit);
        }
        "full" => {
            // What `attestplane-verify log` does, in process: the pipelined `Replay`,
            // re-deciding every epoch.
            let nsm = enclave_nsm(now);
            let policy = LogPolicy::new(anchor_of(&nsm), image_pcrs(&nsm));
            let mut replay = Replay::new(policy, now, anchor_of(&server_nsm()))
                .unwrap_or_else(|e| panic!("replay: {e}"))
                .pipelined();
            loop {
                let batch = next(&mut items, &mut seen);
                if batch.is_empty() {
                    break;
                }
                let t = Instant::now();
                replay
                    .push_round(&batch)
                    .unwrap_or_else(|e| panic!("replay: {e}"));
                timed += t.elapsed().as_secs_f64();
            }
            let t = Instant::now();
            let replayed = replay.finish().unwrap_or_else(|e| panic!("replay: {e}"));
            timed += t.elapsed().as_secs_f64();
            assert_eq!(replayed.log.size(), limit);
            fields.push(("memo_hits", replayed.memo.hits.to_string()));
            fields.push(("memo_misses", replayed.memo.misses.to_string()));
        }
        "paired" => {
            // The enclave's replay and the verifier's own rounds over the same batches, batch by
            // batch, alternating which goes first: a load that drifts during the run weighs on
            // both alike. `verify_log` is exactly these rounds over 4096-entry chunks.
            let nsm = Arc::new(enclave_nsm(now));
            let config = EnclaveConfig {
                origin: ORIGIN.into(),
                issuer: ISSUER.into(),
                self_anchor: anchor_of(&nsm),
                server_anchor: anchor_of(&server_nsm()),
                allow_debug: false,
            };
            let mut enclave = Enclave::new(nsm.clone(), config);
            let begin = enclave.handle(
                1,
                Request::ReplayBegin {
                    genesis_admin_keys: Vec::new(),
                    total_entries: limit,
                },
                now,
            );
            assert_eq!(begin, vec![(1, Response::Ack)]);
            let policy = LogPolicy::new(anchor_of(&nsm), image_pcrs(&nsm));
            let mut verifier =
                LogVerifier::new(policy, now).unwrap_or_else(|e| panic!("verifier: {e}"));
            let (mut verify_secs, mut replay_secs) = (0.0f64, 0.0f64);
            let mut ratios = Vec::new();
            let mut id = 1;
            loop {
                let batch = next(&mut items, &mut seen);
                if batch.is_empty() {
                    break;
                }
                id += 1;
                let copy = batch.clone();
                let verify = |v: &mut LogVerifier| {
                    let t = Instant::now();
                    v.verify_round(&copy)
                        .unwrap_or_else(|e| panic!("verify: {e}"));
                    t.elapsed().as_secs_f64()
                };
                let entries: Vec<ByteBuf> = batch.into_iter().map(ByteBuf::from).collect();
                let replay = |e: &mut Enclave| {
                    let t = Instant::now();
                    let reply = e.handle(id, Request::ReplayEntries { entries }, now);
                    let secs = t.elapsed().as_secs_f64();
                    assert_eq!(reply, vec![(id, Response::Ack)], "replay refused");
                    secs
                };
                let (v, r) = if id % 2 == 0 {
                    let v = verify(&mut verifier);
                    (v, replay(&mut enclave))
                } else {
                    let r = replay(&mut enclave);
                    (verify(&mut verifier), r)
                };
                verify_secs += v;
                replay_secs += r;
                ratios.push(v / r);
            }
            verifier.finish().unwrap_or_else(|e| panic!("verify: {e}"));
            ratios.sort_by(f64::total_cmp);
            let median = ratios.get(ratios.len() / 2).copied().unwrap_or(f64::NAN);
            timed = replay_secs;
            fields.push(("verify_secs", format!("{verify_secs:.3}")));
            fields.push(("replay_secs", format!("{replay_secs:.3}")));
            fields.push(("median_batch_ratio", format!("{median:.3}")));
        }
        "fold" | "recheck" => {
            let nsm = enclave_nsm(now);
            let trust = EpochTrust::new(image_pcrs(&nsm));
            let policy = LogPolicy::new(anchor_of(&nsm), image_pcrs(&nsm));
            let mut verifier =
                LogVerifier::new(policy, now).unwrap_or_else(|e| panic!("verifier: {e}"));
            let mut state = State::new(anchor_of(&server_nsm()));
            let mut verify_secs = 0.0;
            let mut apply: BTreeMap<&'static str, (u64, f64)> = BTreeMap::new();
            loop {
                let batch = next(&mut items, &mut seen);
                if batch.is_empty() {
                    break;
                }
                let t = Instant::now();
                let verified = verifier
                    .verify_round(&batch)
                    .unwrap_or_else(|e| panic!("verify: {e}"));
                verify_secs += t.elapsed().as_secs_f64();
                for signed in &verified {
                    let t = Instant::now();
                    let m = match mode {
                        "fold" => trust.mode(signed),
                        _ => ApplyMode::Recheck,
                    };
                    state
                        .apply_with(signed, m)
                        .unwrap_or_else(|e| panic!("apply: {e}"));
                    let e = apply.entry(signed.entry().event.type_name()).or_default();
                    e.0 += 1;
                    e.1 += t.elapsed().as_secs_f64();
                }
            }
            let apply_secs: f64 = apply.values().map(|(_, s)| s).sum();
            timed = verify_secs + apply_secs;
            fields.push(("verify_secs", format!("{verify_secs:.3}")));
            fields.push(("apply_secs", format!("{apply_secs:.3}")));
            for (kind, (n, secs)) in &apply {
                fields.push((kind, format!("{n}:{secs:.3}")));
            }
        }
        other => panic!("unknown child mode {other}"),
    }
    fields.insert(0, ("secs", format!("{timed:.3}")));
    fields.insert(0, ("entries", seen.to_string()));
    fields.push(("hwm_start_kb", hwm_start.to_string()));
    fields.push(("hwm_kb", proc_status_kb("VmHWM:").to_string()));
    fields.push(("rss_kb", proc_status_kb("VmRSS:").to_string()));
    report(&fields);
}

/// Runs a child measurement and returns its reported fields.
fn run_child(
    mode: &str,
    path: &Path,
    entries: u64,
    threads: usize,
    end: UnixMillis,
) -> BTreeMap<String, String> {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current exe: {e}"));
    let load = loadavg();
    let out = Command::new(exe)
        .env(CHILD_ENV, mode)
        .arg(path)
        .arg(entries.to_string())
        .arg(threads.to_string())
        .arg(end.as_millis().to_string())
        .output()
        .unwrap_or_else(|e| panic!("spawn child: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child {mode} failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| panic!("child {mode} reported nothing: {stdout}"));
    let mut fields: BTreeMap<String, String> = line
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    fields.insert("load_before".into(), load);
    fields.insert("load_after".into(), loadavg());
    fields
}

fn field(f: &BTreeMap<String, String>, k: &str) -> f64 {
    f.get(k).and_then(|v| v.parse().ok()).unwrap_or(f64::NAN)
}

fn rate(f: &BTreeMap<String, String>) -> f64 {
    field(f, "entries") / field(f, "secs")
}

fn mib(kb: f64) -> f64 {
    kb / 1024.0
}

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap_or_else(|e| panic!("rayon pool of {threads}: {e}"))
}

fn parent() {
    let total: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(DEFAULT_ENTRIES);
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let path = dir.path().join("log.cbors");
    eprintln!(
        "replay bench: generating {total} entries (load average {})",
        loadavg()
    );
    let distinct = std::env::args().any(|a| a == "--distinct");
    let g = generate(total, &path, distinct);
    eprintln!(
        "generated {} entries, {} bytes ({:.0} bytes/entry) in {:.0} s; by type (count, mean bytes):",
        g.entries.len(),
        g.bytes,
        g.bytes as f64 / g.entries.len() as f64,
        g.secs
    );
    for (kind, (n, bytes)) in &g.tally.by_type {
        eprintln!("  {kind:<12} {n:>9} {:>6.0}", *bytes as f64 / *n as f64);
    }

    let at_end = at(g.end.as_millis() + 60_000);
    let mut verify_log_rates = BTreeMap::new();
    for threads in [1usize, 2] {
        let load = loadavg();
        let t = Instant::now();
        let log = pool(threads)
            .install(|| verify_log(&g.entries, g.policy.clone(), at_end))
            .unwrap_or_else(|e| panic!("the generated log must verify: {e}"));
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(log.size(), total);
        assert_eq!(log.epochs().len(), 2);
        let r = total as f64 / secs;
        verify_log_rates.insert(threads, r);
        eprintln!(
            "verify_log (in memory), {threads} thread(s): {secs:.2} s, {r:.0} entries/s \
             (load {load} -> {})",
            loadavg()
        );
    }
    if std::env::args().any(|a| a == "--auditor") {
        auditor(&g, &path, dir.path(), at_end);
        return;
    }
    drop(g.entries);

    let mut results = Vec::new();
    // The full-length runs are the ones the target is about; the breakdown and the streamed
    // verifier run on the first SMALL_ENTRIES entries (same mix, a tenth of the time).
    let small = SMALL_ENTRIES.min(total);
    for (mode, n, threads) in [
        ("replay", total, 1),
        ("paired", total, 1),
        ("paired", total, 2),
        ("replay", small, 1),
        ("fold", small, 1),
        ("recheck", small, 1),
    ] {
        let f = run_child(mode, &path, n, threads, g.end);
        eprintln!(
            "child {mode:<6} {n:>8} entries, {threads} thread(s): {:.2} s, {:.0} entries/s, \
             VmHWM {:.1} MiB (at start {:.1} MiB) (load {} -> {})",
            field(&f, "secs"),
            rate(&f),
            mib(field(&f, "hwm_kb")),
            mib(field(&f, "hwm_start_kb")),
            f.get("load_before").map_or("", String::as_str),
            f.get("load_after").map_or("", String::as_str),
        );
        if mode == "paired" {
            let verify = field(&f, "verify_secs");
            let replay = field(&f, "replay_secs");
            eprintln!(
                "  paired batch by batch: LogVerifier rounds {verify:.2} s ({:.0} entries/s), enclave \
                 ReplayEntries {replay:.2} s ({:.0} entries/s): replay / verify throughput {:.2}, \
                 median over batches {:.2}",
                n as f64 / verify,
                n as f64 / replay,
                verify / replay,
                field(&f, "median_batch_ratio"),
            );
        }
        if mode == "fold" || mode == "recheck" {
            let secs = field(&f, "secs");
            eprintln!(
                "  {mode}: verify_round {:.2} s ({:.0} %), State::apply_with {:.2} s ({:.0} %); apply by \
                 type (count: seconds, us/entry):",
                field(&f, "verify_secs"),
                100.0 * field(&f, "verify_secs") / secs,
                field(&f, "apply_secs"),
                100.0 * field(&f, "apply_secs") / secs,
            );
            for kind in [
                "decision",
                "discovery",
                "attestation",
                "admin",
                "epoch_start",
                "genesis",
            ] {
                if let Some((n, s)) = f.get(kind).and_then(|v| v.split_once(':')) {
                    let n: f64 = n.parse().unwrap_or(f64::NAN);
                    let s: f64 = s.parse().unwrap_or(f64::NAN);
                    eprintln!(
                        "    {kind:<12} {n:>9.0}: {s:>7.2} s, {:>7.1} us/entry, {:.0} % of the fold",
                        s / n * 1e6,
                        100.0 * s / secs
                    );
                }
            }
        }
        results.push((mode, n, threads, f));
    }

    eprintln!("\nsummary ({total} entries, 2 epochs):");
    for threads in [1usize, 2] {
        let vl = verify_log_rates.get(&threads).copied().unwrap_or(f64::NAN);
        let replay = results
            .iter()
            .find(|(mode, n, t, _)| *mode == "replay" && *n == total && *t == threads)
            .map_or(f64::NAN, |(_, _, _, f)| rate(f));
        let paired = results
            .iter()
            .find(|(mode, n, t, _)| *mode == "paired" && *n == total && *t == threads)
            .map(|(_, _, _, f)| (f, field(f, "verify_secs") / field(f, "replay_secs")));
        if replay.is_finite() {
            eprintln!(
                "  {threads} thread(s), separate runs: verify_log (in memory) {vl:.0} entries/s, \
                 enclave replay (child) {replay:.0} entries/s: {:.2} (the load differed between them)",
                replay / vl,
            );
        }
        if let Some((f, ratio)) = paired {
            eprintln!(
                "  {threads} thread(s), paired batch by batch: verify {:.0} entries/s, replay {:.0} \
                 entries/s: replay / verify = {ratio:.2} (target >= 0.8: {})",
                total as f64 / field(f, "verify_secs"),
                total as f64 / field(f, "replay_secs"),
                if ratio >= 0.8 { "pass" } else { "miss" },
            );
        }
    }
    for (mode, n, threads, f) in &results {
        if *mode == "replay" {
            eprintln!(
                "  peak RSS of the replaying enclave, {n} entries, {threads} thread(s): VmHWM {:.1} MiB",
                mib(field(f, "hwm_kb"))
            );
        }
    }
}

/// `--auditor`: the real `attestplane-verify log` process (built next to this example:
/// `cargo build --release -p attestplane-verifier --bin attestplane-verify`) over the whole
/// file and over its first `SMALL_ENTRIES` entries, each under `/usr/bin/time -v` for its peak
/// RSS, on 2 threads; against the streaming `LogVerifier` alone (signatures, links, epochs: the
/// `verify` child) on the same file and threads, alternated, so that the ratio comes from one
/// run on one machine state.
fn auditor(g: &Generated, path: &Path, dir: &Path, at_end: UnixMillis) {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current exe: {e}"));
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("attestplane-verify"))
        .filter(|b| b.is_file())
        .unwrap_or_else(|| panic!("build attestplane-verify (release) next to this example"));
    let nsm = enclave_nsm(at_end);
    let root = dir.join("root.pem");
    let server_root = dir.join("server-root.pem");
    std::fs::write(&root, nsm.root_pem().unwrap_or_else(|e| panic!("{e}")))
        .unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(
        &server_root,
        server_nsm().root_pem().unwrap_or_else(|e| panic!("{e}")),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let total = g.entries.len() as u64;
    let small = SMALL_ENTRIES.min(total);
    let small_path = dir.join("log-small.cbors");
    std::fs::write(
        &small_path,
        g.entries
            .iter()
            .take(small as usize)
            .flat_map(|e| e.iter().copied())
            .collect::<Vec<u8>>(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    // ATTESTPLANE_REPLAY_BENCH_KEEP=DIR keeps the log and the roots there, and prints the
    // command line, to profile the CLI on its own.
    if let Ok(keep) = std::env::var("ATTESTPLANE_REPLAY_BENCH_KEEP") {
        let keep = PathBuf::from(keep);
        for (from, name) in [
            (path, "log.cbors"),
            (small_path.as_path(), "log-small.cbors"),
            (root.as_path(), "root.pem"),
            (server_root.as_path(), "server-root.pem"),
        ] {
            std::fs::copy(from, keep.join(name)).unwrap_or_else(|e| panic!("keep {name}: {e}"));
        }
        let pcrs: Vec<String> = image_pcrs(&nsm)
            .iter()
            .map(|(i, p)| format!("--pcr {}={}", i.get(), p.to_hex()))
            .collect();
        eprintln!(
            "kept in {}: attestplane-verify log log.cbors {} --root root.pem --server-root \
             server-root.pem --at {}",
            keep.display(),
            pcrs.join(" "),
            at_end.as_millis()
        );
        // ATTESTPLANE_REPLAY_BENCH_KEEP_ONLY=1: generate and keep, measure nothing (the
        // generation is a build's load; the measurements belong in a quiet hold).
        if std::env::var_os("ATTESTPLANE_REPLAY_BENCH_KEEP_ONLY").is_some() {
            eprintln!(
                "signatures-only: {CHILD_ENV}=verify {} FILE ENTRIES 2 {}",
                std::env::current_exe()
                    .map_or_else(|_| "replay_bench".into(), |e| e.display().to_string()),
                g.end.as_millis()
            );
            return;
        }
    }
    let cli = |file: &Path| -> (f64, f64) {
        let mut cmd = Command::new("/usr/bin/time");
        cmd.arg("-v").arg(&bin).arg("log").arg(file);
        for (i, p) in image_pcrs(&nsm) {
            cmd.arg("--pcr").arg(format!("{}={}", i.get(), p.to_hex()));
        }
        let t = Instant::now();
        let out = cmd
            .arg("--root")
            .arg(&root)
            .arg("--server-root")
            .arg(&server_root)
            .arg("--at")
            .arg(at_end.as_millis().to_string())
            .env("RAYON_NUM_THREADS", "2")
            .output()
            .unwrap_or_else(|e| panic!("run attestplane-verify: {e}"));
        let secs = t.elapsed().as_secs_f64();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "attestplane-verify failed:\n{stdout}\n{stderr}"
        );
        let kb: f64 = stderr
            .lines()
            .find_map(|l| {
                l.trim()
                    .strip_prefix("Maximum resident set size (kbytes): ")
            })
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(f64::NAN);
        (secs, kb)
    };
    eprintln!(
        "\nauditor: attestplane-verify log (streamed, replay re-deciding everything) against the streaming LogVerifier alone, 2 threads:"
    );
    let mut ratios = Vec::new();
    for round in 0..2 {
        for (n, file) in [(total, path), (small, small_path.as_path())] {
            let load = loadavg();
            let v = run_child("verify", file, n, 2, g.end);
            let (secs, kb) = cli(file);
            let f = run_child("full", file, n, 2, g.end);
            let sig_rate = rate(&v);
            let full_rate = n as f64 / secs;
            let hits = field(&f, "memo_hits");
            let misses = field(&f, "memo_misses");
            eprintln!(
                "  round {round}, {n} entries: pipelined Replay in process (reads not timed) {:.0} entries/s = {:.2} x signatures-only; \
                 Cedar requests {:.0}, {:.1} % answered from the memo",
                rate(&f),
                rate(&f) / sig_rate,
                hits + misses,
                100.0 * hits / (hits + misses)
            );
            eprintln!(
                "  round {round}, {n} entries: signatures only (LogVerifier, in-process) {sig_rate:.0} entries/s; \
                 attestplane-verify log (whole process: start, read, verify, replay) {secs:.2} s = {full_rate:.0} entries/s, \
                 peak RSS {:.1} MiB; full / signatures-only = {:.2} (load {load} -> {})",
                kb / 1024.0,
                full_rate / sig_rate,
                loadavg()
            );
            ratios.push((n, full_rate / sig_rate, kb / 1024.0));
        }
    }
    for (n, ratio, mib) in ratios {
        eprintln!(
            "  summary {n} entries: full / signatures-only {ratio:.2} (target >= 0.7: {}), peak RSS {mib:.1} MiB (target <= 64: {})",
            if ratio >= 0.7 { "pass" } else { "miss" },
            if mib <= 64.0 { "pass" } else { "miss" },
        );
    }
}

fn main() {
    match std::env::var(CHILD_ENV) {
        Ok(mode) => child(&mode),
        Err(_) => parent(),
    }
}
