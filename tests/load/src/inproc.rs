//! The reference: the enclave's decision rate in-process, on one thread.
//!
//! An [`Enclave`] over a [`MockNsm`] is booted and set up through its own requests, exactly as
//! the real stack is (genesis, the same policy, identity provider and registration, and an
//! attestation of the server by a second mock NSM with the same image measurements), with the
//! host's part played in memory: every `Persist` is acknowledged at once with `Durable` (nothing
//! stored), as `enclave/benches/decision.rs` does. The measured request is the one the HTTP
//! clients send: `Resolve` for the registered server with one of the agents' bearer tokens
//! (its handle comes back held for its entry, taken at once), then the host's `Durable`. Time
//! is the system clock, as in the enclave binary.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Result, bail};
use attestplane_enclave::nsm::{Clock, MockNsm, Nsm};
use attestplane_enclave::service::{Enclave, EnclaveConfig};
use attestplane_proto::{ByteBuf, Request, Response};
use attestplane_verifier::UnixMillis;
use attestplane_verifier::attestation::TrustAnchor;
use attestplane_verifier::entry::EntryHash;

use attestplane_enclave::gateway::inside::{self, CallVerdict};
use attestplane_enclave::gateway::redact::{self, Treated};
use attestplane_verifier::admin::{Digest32, ServerSpec};
use attestplane_verifier::gateway::json::parse_ijson;
use attestplane_verifier::gateway::jsonrpc::{Kind, RECEIPT_META_KEY, parse_message};
use serde_json::value::RawValue;
use sha2::{Digest as _, Sha256};

use crate::world::{self, World};

const ENCLAVE_SEED: [u8; 32] = *b"attestplane load: in-proc enclav";
const SERVER_SEED: [u8; 32] = *b"attestplane load: in-proc server";

fn now() -> UnixMillis {
    UnixMillis::from_system_time(SystemTime::now())
}

fn anchor(nsm: &MockNsm) -> Result<TrustAnchor> {
    let pem = nsm.root_pem()?;
    Ok(TrustAnchor::from_pem(pem.as_bytes())?)
}

/// The enclave with the host played in memory.
pub struct InProcess {
    enclave: Enclave,
    next_id: u64,
    tokens: Vec<String>,
    turn: usize,
    /// The hash of entry 1 (genesis), once persisted.
    genesis: Option<EntryHash>,
}

impl std::fmt::Debug for InProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcess")
            .field("requests", &self.next_id)
            .finish_non_exhaustive()
    }
}

impl InProcess {
    /// Boots and sets up the enclave; the agents present `tokens` in turn.
    pub fn new(world: &mut World, tokens: Vec<String>) -> Result<Self> {
        let pcrs = world::image_pcrs(world::IMAGE);
        let spec = World::spec("http://127.0.0.1:9", &pcrs)?;
        let mut this = Self::boot(world, tokens, spec)?;
        // One resolution per token, so that every token is in the enclave's bearer cache (as
        // it is in the proxied enclave after the warm-up).
        for _ in 0..this.tokens.len() {
            this.resolve()?;
        }
        Ok(this)
    }

    /// Boots the enclave and sets it up with the registration `spec` (of an image with the
    /// measurements of [`world::IMAGE`]), attested.
    fn boot(world: &mut World, tokens: Vec<String>, spec: ServerSpec) -> Result<Self> {
        if tokens.is_empty() {
            bail!("no bearer tokens");
        }
        let nsm = Arc::new(MockNsm::builder(ENCLAVE_SEED, Clock::System).build());
        let pcrs = world::image_pcrs(world::IMAGE);
        let server = MockNsm::builder(SERVER_SEED, Clock::System)
            .image_measurements(pcrs[0], pcrs[1], pcrs[2])
            .build();
        let config = EnclaveConfig {
            origin: world::ORIGIN.into(),
            issuer: "attestplane".into(),
            self_anchor: anchor(&nsm)?,
            server_anchor: anchor(&server)?,
            allow_debug: false,
        };
        let mut this = Self {
            enclave: Enclave::new(nsm, config)
                .with_pinned_genesis(vec![world.admin.verifying_key().to_bytes()]),
            next_id: 0,
            tokens,
            turn: 0,
            genesis: None,
        };
        let admin = world.admin.verifying_key().to_bytes();
        this.expect_ack(Request::ReplayBegin {
            genesis_admin_keys: vec![ByteBuf::from(admin.to_vec())],
            total_entries: 0,
        })?;
        this.expect_ack(Request::ReplayEnd)?;
        let Some(genesis) = this.genesis else {
            bail!("in-process enclave: no genesis entry was persisted");
        };
        world.set_genesis(genesis);
        for action in world.setup_actions(spec)? {
            let name = action.type_name();
            let bytes = world.admin_request(action, now())?;
            match this.send(Request::Admin {
                request: ByteBuf::from(bytes),
            })? {
                Response::AdminResult { accepted: true, .. } => {}
                other => bail!("in-process enclave refused {name}: {other:?}"),
            }
        }
        let challenge = this.send(Request::AttestChallenge {
            server_id: world::SERVER_ID.into(),
        })?;
        let Response::Challenge { nonce, .. } = challenge else {
            bail!("in-process enclave: no challenge: {challenge:?}");
        };
        let document = server.attest(None, Some(nonce.to_vec()), None)?;
        match this.send(Request::AttestEvidence {
            server_id: world::SERVER_ID.into(),
            nonce,
            document: ByteBuf::from(document),
        })? {
            Response::AttestResult { verified: true, .. } => {}
            other => bail!("in-process attestation refused: {other:?}"),
        }
        Ok(this)
    }

    fn expect_ack(&mut self, request: Request) -> Result<()> {
        match self.send(request)? {
            Response::Ack => Ok(()),
            other => bail!("in-process enclave: expected Ack, got {other:?}"),
        }
    }

    /// Sends `request`; a `Persist` is acknowledged durable at once and the released final
    /// reply returned.
    fn send(&mut self, request: Request) -> Result<Response> {
        self.next_id += 1;
        let id = self.next_id;
        let t = now();
        let mut replies = self.enclave.handle(id, request, t).into_iter();
        let Some((_, reply)) = replies.next() else {
            bail!("in-process enclave: no reply");
        };
        let Response::Persist { first_seq, entries } = reply else {
            return Ok(reply);
        };
        let Some((_, Response::Held { through_seq, reply })) = replies.next() else {
            bail!("in-process enclave: no held reply after the Persist");
        };
        if let Some(genesis) = 1u64
            .checked_sub(first_seq)
            .and_then(|i| entries.get(i as usize))
        {
            self.genesis = Some(EntryHash::of(genesis));
        }
        // Stored at once (nothing is written), then reported, as the host does.
        self.next_id += 1;
        let _ = self
            .enclave
            .handle(self.next_id, Request::Durable { through_seq }, t);
        Ok(*reply)
    }

    /// One resolution with the next token; fails unless a handle is issued.
    fn resolve(&mut self) -> Result<()> {
        self.turn = (self.turn + 1) % self.tokens.len();
        let bearer = self.tokens[self.turn].clone();
        match self.send(Request::Resolve {
            bearer,
            server_id: world::SERVER_ID.into(),
        })? {
            Response::Handle { .. } => Ok(()),
            other => bail!("in-process resolve: expected a handle, got {other:?}"),
        }
    }

    /// Resolves back to back for `duration` (at least 100 resolutions); returns the rate per
    /// second of wall time and, if the thread's CPU time is readable, per second of CPU time
    /// (what the rate would be on a core of its own: robust to other load on the machine).
    pub fn run(&mut self, duration: Duration) -> Result<(f64, Option<f64>)> {
        let cpu_before = crate::stack::thread_cpu_time();
        let started = Instant::now();
        let mut n = 0u64;
        loop {
            for _ in 0..100 {
                self.resolve()?;
            }
            n += 100;
            if started.elapsed() >= duration {
                break;
            }
        }
        let wall = started.elapsed();
        let cpu = crate::stack::thread_cpu_time()
            .zip(cpu_before)
            .map(|(after, before)| after.saturating_sub(before))
            .filter(|c| !c.is_zero());
        Ok((
            n as f64 / wall.as_secs_f64(),
            cpu.map(|c| n as f64 / c.as_secs_f64()),
        ))
    }
}

/// The gateway's core in-process: the same enclave, set up with the gateway benchmark's
/// registration, driven through the functions the gateway runs per `tools/call`
/// (`enclave::gateway::inside` on the handler thread, `redact` and the JSON-RPC views off it),
/// with no HTTP, no relays and no upstream: the upstream's answer is a fixed byte string, and
/// each entry is acknowledged durable at once (nothing stored).
///
/// Per call, as `gateway::http` does it: parse the agent's message and its `tools/call` params,
/// check the arguments are I-JSON, authenticate the bearer for the endpoint's resource URI
/// (the enclave's bearer cache), look the endpoint up, scan and redact the arguments
/// (`redact::call_arguments`), decide and write the decision entry (`inside::decide_call`:
/// hard rules, Cedar, the receipt signed), `Durable`, splice the receipt into the forwarded
/// message's `_meta`, treat the answer by the call's PII rule (`redact::treat_answer`), check
/// it is a JSON-RPC response, hash it, write the result entry (`inside::record_result`),
/// `Durable`. Not done: the modern envelope's `resultType` splice on the answer (a private
/// helper of `gateway::http`, a string edit) and the bounded listing re-check every 60 s.
pub struct InProcessGateway {
    inner: InProcess,
    /// The endpoint's resource URI (the tokens' audience).
    resource: String,
    /// The agent's request, as sent.
    request: Vec<u8>,
    /// The upstream's answer.
    answer: Vec<u8>,
    /// The tool's pin, from the listing check.
    live: Digest32,
}

impl std::fmt::Debug for InProcessGateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcessGateway")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl InProcessGateway {
    /// Boots the enclave with `spec` (the upstream's registration); the agents present
    /// `tokens` (audience `resource`) in turn and send `request`; the upstream answers `answer`.
    pub fn new(
        world: &mut World,
        tokens: Vec<String>,
        spec: ServerSpec,
        resource: String,
        request: Vec<u8>,
        answer: Vec<u8>,
    ) -> Result<Self> {
        let mut inner = InProcess::boot(world, tokens, spec)?;
        // The listing check, as the gateway's first call runs it: the tool's pin.
        let listed: Vec<Box<RawValue>> =
            vec![RawValue::from_string(crate::upstream::TOOL.to_owned())?];
        let token = inner.tokens[0].clone();
        let t = now();
        let principal = inside::authenticate(&mut inner.enclave, &token, &resource, t)
            .map_err(|e| anyhow::anyhow!("in-process gateway: {e}"))?;
        inner.next_id += 1;
        let mut drift = Vec::new();
        let (listing, _) = inside::check_listing(
            &mut inner.enclave,
            t,
            inner.next_id,
            &principal,
            world::SERVER_ID,
            &listed,
            &mut drift,
        )
        .map_err(|e| anyhow::anyhow!("in-process gateway listing: {e}"))?;
        if listing.drift_seq.is_some() || listing.shown.len() != 1 {
            bail!("in-process gateway: the tool is not kept and shown: {listing:?}");
        }
        let Some(live) = listing.kept.get("forecast").copied() else {
            bail!("in-process gateway: forecast is not kept");
        };
        let mut this = Self {
            inner,
            resource,
            request,
            answer,
            live,
        };
        // One call per token, so that every token is in the bearer cache (as in the proxied
        // enclave after the warm-up).
        for _ in 0..this.inner.tokens.len() {
            this.call()?;
        }
        Ok(this)
    }

    /// The host's `Durable` for entries up to `seq`.
    fn durable(inner: &mut InProcess, seq: u64, t: UnixMillis) {
        inner.next_id += 1;
        let _ = inner
            .enclave
            .handle(inner.next_id, Request::Durable { through_seq: seq }, t);
    }

    /// One `tools/call` with the next token; fails unless it is allowed and both entries are
    /// written.
    fn call(&mut self) -> Result<()> {
        let inner = &mut self.inner;
        inner.turn = (inner.turn + 1) % inner.tokens.len();
        let t = now();
        let message = parse_message(&self.request)?;
        let params = message.tools_call_params()?;
        if let Some(args) = params.arguments {
            parse_ijson(args.get()).map_err(|e| anyhow::anyhow!("arguments: {e}"))?;
        }
        let principal = inside::authenticate(
            &mut inner.enclave,
            &inner.tokens[inner.turn],
            &self.resource,
            t,
        )
        .map_err(|e| anyhow::anyhow!("in-process gateway: {e}"))?;
        inside::endpoint_url(&inner.enclave, world::SERVER_ID)
            .map_err(|e| anyhow::anyhow!("in-process gateway: {e}"))?;
        let args = redact::call_arguments(params.arguments.map(RawValue::get))
            .map_err(|e| anyhow::anyhow!("in-process gateway arguments: {e}"))?;
        inner.next_id += 1;
        let (verdict, _) = inside::decide_call(
            &mut inner.enclave,
            t,
            inner.next_id,
            &principal,
            world::SERVER_ID,
            &params.name,
            Some(self.live),
            &args,
        )
        .map_err(|e| anyhow::anyhow!("in-process gateway: {e}"))?;
        let CallVerdict::Allowed { seq, receipt, pii } = verdict else {
            bail!("in-process gateway: the call was not allowed: {verdict:?}");
        };
        Self::durable(inner, seq, t);
        let quoted = RawValue::from_string(format!("\"{receipt}\""))?;
        let forwarded = message.with_params_meta(RECEIPT_META_KEY, &quoted)?;
        std::hint::black_box(forwarded);
        let (body, pii) = match redact::treat_answer(&self.answer, pii) {
            Ok(Treated::Forward(body, pii)) => (body, pii),
            other => bail!("in-process gateway: the answer was not forwarded: {other:?}"),
        };
        let outcome = match parse_message(&body) {
            Ok(m) if m.kind() == Kind::Response => "ok",
            _ => bail!("in-process gateway: the answer is not a response"),
        };
        let hash: [u8; 32] = Sha256::digest(&body).into();
        inner.next_id += 1;
        let (result_seq, _) = inside::record_result(
            &mut inner.enclave,
            t,
            inner.next_id,
            seq,
            outcome,
            hash,
            pii,
        )
        .map_err(|e| anyhow::anyhow!("in-process gateway: {e}"))?;
        Self::durable(inner, result_seq, t);
        Ok(())
    }

    /// Calls back to back for `duration` (at least 100 calls); returns calls per second of
    /// wall time and, if readable, per second of the thread's CPU time.
    pub fn run(&mut self, duration: Duration) -> Result<(f64, Option<f64>)> {
        let cpu_before = crate::stack::thread_cpu_time();
        let started = Instant::now();
        let mut n = 0u64;
        loop {
            for _ in 0..100 {
                self.call()?;
            }
            n += 100;
            if started.elapsed() >= duration {
                break;
            }
        }
        let wall = started.elapsed();
        let cpu = crate::stack::thread_cpu_time()
            .zip(cpu_before)
            .map(|(after, before)| after.saturating_sub(before))
            .filter(|c| !c.is_zero());
        Ok((
            n as f64 / wall.as_secs_f64(),
            cpu.map(|c| n as f64 / c.as_secs_f64()),
        ))
    }
}
