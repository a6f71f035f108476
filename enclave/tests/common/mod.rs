//! Shared helpers for the enclave's service-level tests: a [`Harness`] that boots an
//! [`Enclave`] over a mock NSM with a pinned clock and plays the host (it keeps the stored log
//! as a list of entry bytes and does the `Persist` → `Held` → `Durable` dance), admin keys that sign
//! requests, an identity provider that mints agents' bearer tokens, and attested MCP servers
//! (each a mock NSM with its own image PCRs).
//!
//! Nothing here reads a clock: every instant is [`T0`] plus an explicit offset.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use attestplane_enclave::nsm::{Clock, MockNsm, Nsm};
use attestplane_enclave::service::{Enclave, EnclaveConfig, Replies};
use attestplane_proto::{ByteBuf, PROTOCOL_VERSION, Request, Response};
use attestplane_verifier::UnixMillis;
use attestplane_verifier::admin::{
    AdminAction, AdminRequest, Deployment, Digest32, IdentityProviderSpec, PcrHex, ServerSpec,
};
use attestplane_verifier::attestation::{Pcr, PcrIndex, TrustAnchor};
use attestplane_verifier::entry::{Entry, EntryHash, Event, SignedEntry};
use attestplane_verifier::handle::{IdentityClaims, Jwks, encode_jws};
use attestplane_verifier::log::LogPolicy;
use ed25519_dalek::SigningKey;
use sha2::{Digest as _, Sha256, Sha384};

/// 2026-11-22T00:00:00Z.
pub const T0: u64 = 1_795_305_600_000;
/// One minute in milliseconds.
pub const MINUTE_MS: u64 = 60_000;
/// The log's origin (checkpoint key name).
pub const ORIGIN: &str = "attestplane.test/log";
/// The `iss` of handles.
pub const ISSUER: &str = "https://control.attestplane.test";
/// The seed of the control plane's own mock NSM.
pub const ENCLAVE_SEED: [u8; 32] = *b"attestplane service tests: encl.";
/// The seed every MCP server's mock NSM shares (so they share one root), varying PCRs only.
pub const SERVER_SEED: [u8; 32] = *b"attestplane service tests: servr";
/// The starter policy shipped with the verifier.
pub const STARTER_POLICY: &str = include_str!("../../../verifier/testdata/policy/starter.cedar");
/// How old a server's verified attestation may be in the registrations made here.
pub const MAX_ATTESTATION_AGE_MS: u64 = 10 * MINUTE_MS;

/// `T0 + offset_ms`.
pub fn at(offset_ms: u64) -> UnixMillis {
    UnixMillis::from_millis(T0 + offset_ms)
}

/// The control plane's own mock NSM at `T0`.
pub fn enclave_nsm() -> Arc<MockNsm> {
    Arc::new(MockNsm::builder(ENCLAVE_SEED, Clock::Fixed(at(0))).build())
}

/// A control plane's mock NSM at `T0` with [`enclave_nsm`]'s root but running another image,
/// labelled `image`.
pub fn other_image_nsm(image: u8) -> Arc<MockNsm> {
    Arc::new(
        MockNsm::builder(ENCLAVE_SEED, Clock::Fixed(at(0)))
            .image_measurements(
                measurement(image, 0),
                measurement(image, 1),
                measurement(image, 2),
            )
            .build(),
    )
}

fn anchor_of(nsm: &MockNsm) -> TrustAnchor {
    TrustAnchor::from_pem(nsm.root_pem().unwrap().as_bytes()).unwrap()
}

/// The root every MCP server's document chains to.
pub fn server_anchor() -> TrustAnchor {
    anchor_of(&MockNsm::builder(SERVER_SEED, Clock::Fixed(at(0))).build())
}

/// The configuration the harness boots with.
pub fn config(nsm: &MockNsm) -> EnclaveConfig {
    EnclaveConfig {
        origin: ORIGIN.into(),
        issuer: ISSUER.into(),
        self_anchor: anchor_of(nsm),
        server_anchor: server_anchor(),
        allow_debug: false,
    }
}

/// PCR0, PCR1 and PCR2 of `nsm`.
pub fn image_pcrs(nsm: &MockNsm) -> BTreeMap<PcrIndex, Pcr> {
    (0u8..3)
        .map(|i| {
            let v = nsm.describe_pcr(u16::from(i)).unwrap().value;
            (
                PcrIndex::try_from(i).unwrap(),
                Pcr::try_from(v.as_slice()).unwrap(),
            )
        })
        .collect()
}

/// What an auditor trusts about the control plane running on `nsm`.
pub fn log_policy(nsm: &MockNsm) -> LogPolicy {
    LogPolicy::new(anchor_of(nsm), image_pcrs(nsm))
}

/// Decodes a stored entry.
pub fn decode(bytes: &[u8]) -> Entry {
    SignedEntry::decode(bytes).unwrap().into_entry()
}

/// An admin's signing key.
pub struct Admin {
    key: SigningKey,
}

impl Admin {
    /// The admin key derived from `seed`.
    pub fn new(seed: u8) -> Self {
        Self {
            key: SigningKey::from_bytes(&[seed; 32]),
        }
    }

    /// The raw public key.
    pub fn public(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    /// Signs `action` for `deployment`, made at `time` with `nonce`.
    pub fn sign(
        &self,
        deployment: &Deployment,
        time: UnixMillis,
        nonce: [u8; 16],
        action: AdminAction,
    ) -> Vec<u8> {
        AdminRequest {
            time,
            nonce,
            deployment: deployment.clone(),
            action,
        }
        .sign(&self.key.verifying_key(), &self.key)
        .unwrap()
    }
}

/// An identity provider that vouches for agents with EdDSA JWTs.
pub struct Idp {
    key: SigningKey,
    /// Its `iss`.
    pub issuer: String,
    /// The `aud` its tokens carry.
    pub audience: String,
    /// The `kid` its tokens name.
    pub kid: String,
}

impl Idp {
    /// A provider with a key derived from `seed`.
    pub fn new(seed: u8, issuer: &str) -> Self {
        Self {
            key: SigningKey::from_bytes(&[seed; 32]),
            issuer: issuer.into(),
            audience: "attestplane".into(),
            kid: format!("idp-key-{seed}"),
        }
    }

    /// Its JWKS as JSON text.
    pub fn jwks(&self) -> String {
        Jwks::from_keys([(self.kid.clone(), self.key.verifying_key())])
            .unwrap()
            .to_json()
    }

    /// The admin action that installs it.
    pub fn install(&self) -> AdminAction {
        AdminAction::SetIdentityProvider(IdentityProviderSpec {
            issuer: self.issuer.clone(),
            audience: self.audience.clone(),
            jwks: self.jwks(),
        })
    }

    /// Signs arbitrary claims as an EdDSA JWT under its key.
    pub fn sign_claims(&self, claims: &serde_json::Value) -> String {
        encode_jws(claims, &self.kid, &self.key).unwrap()
    }

    /// The claims of a token for `agent` of `tenant` with `roles`, issued at `now`, valid an
    /// hour.
    pub fn claims(
        &self,
        agent: &str,
        tenant: &str,
        roles: &[&str],
        now: UnixMillis,
    ) -> serde_json::Value {
        serde_json::to_value(IdentityClaims {
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            sub: agent.into(),
            user: None,
            tenant: tenant.into(),
            roles: roles.iter().map(|r| (*r).to_owned()).collect(),
            iat: Some(now.as_secs()),
            exp: now.as_secs() + 3600,
        })
        .unwrap()
    }

    /// A token for `agent` of `tenant` with `roles`, issued at `now`, valid an hour.
    pub fn token(&self, agent: &str, tenant: &str, roles: &[&str], now: UnixMillis) -> String {
        self.sign_claims(&self.claims(agent, tenant, roles, now))
    }
}

/// One image measurement of an MCP server image labelled `image`.
fn measurement(image: u8, index: u8) -> [u8; 48] {
    Sha384::digest([b'i', image, index]).into()
}

/// A tool definition's pinned digest.
pub fn tool_digest(name: &str) -> Digest32 {
    Digest32(Sha256::digest(name.as_bytes()).into())
}

/// An MCP server in a Nitro Enclave: a mock NSM (sharing [`SERVER_SEED`]'s root) running image
/// `image`, and the registration an operator would make for it.
pub struct McpServer {
    /// Its NSM.
    pub nsm: MockNsm,
    /// Its registration.
    pub spec: ServerSpec,
}

impl McpServer {
    /// Server `id` of `tenant` running image `image`, with the tools `search` and `write`
    /// pinned, registered with its own PCRs.
    pub fn new(id: &str, tenant: &str, image: u8) -> Self {
        let nsm = MockNsm::builder(SERVER_SEED, Clock::Fixed(at(0)))
            .image_measurements(
                measurement(image, 0),
                measurement(image, 1),
                measurement(image, 2),
            )
            .build();
        Self::with_nsm(id, tenant, nsm)
    }

    /// Server `id` of `tenant` running in debug mode (PCR0/1/2 read zero); registered with the
    /// zero PCRs its documents carry and `allow_debug` off.
    pub fn debug(id: &str, tenant: &str) -> Self {
        let nsm = MockNsm::builder(SERVER_SEED, Clock::Fixed(at(0)))
            .debug_mode(true)
            .build();
        Self::with_nsm(id, tenant, nsm)
    }

    fn with_nsm(id: &str, tenant: &str, nsm: MockNsm) -> Self {
        let pcrs = image_pcrs(&nsm)
            .into_iter()
            .map(|(i, p)| (i, PcrHex(p)))
            .collect();
        let spec = ServerSpec {
            id: id.into(),
            name: format!("{id} server"),
            tenant: tenant.into(),
            resource: format!("https://{id}.{tenant}.example/mcp"),
            endpoint: format!("http://{id}.internal:9000"),
            pcrs,
            allow_debug: false,
            max_attestation_age_ms: MAX_ATTESTATION_AGE_MS,
            tools: [
                ("search".to_string(), tool_digest("search")),
                ("write".to_string(), tool_digest("write")),
            ]
            .into(),
            assurance: attestplane_verifier::admin::Assurance::Nitro,
            prices: Default::default(),
            client_requests: Default::default(),
        };
        Self { nsm, spec }
    }

    /// The server's id.
    pub fn id(&self) -> &str {
        &self.spec.id
    }

    /// Its attestation document carrying `nonce`, made at `now`.
    pub fn attest(&self, nonce: &[u8], now: UnixMillis) -> Vec<u8> {
        self.nsm.set_time(now);
        self.nsm.attest(None, Some(nonce.to_vec()), None).unwrap()
    }

    /// The admin action that registers it.
    pub fn register(&self) -> AdminAction {
        AdminAction::RegisterServer(self.spec.clone())
    }
}

/// The host, as far as the enclave can tell: it forwards requests, stores entries and reports
/// them durable.
pub struct Harness {
    /// The enclave's NSM (its clock follows [`Harness::now`]).
    pub nsm: Arc<MockNsm>,
    /// The enclave under test.
    pub enclave: Enclave,
    /// The stored log, in order.
    pub store: Vec<Vec<u8>>,
    /// The enclave's clock.
    pub now: UnixMillis,
    next_id: u64,
    nonce: u64,
}

impl Harness {
    /// A fresh control plane at `T0` with an empty log whose genesis admin key set is
    /// `admins`.
    pub fn new(admins: &[&Admin]) -> Self {
        let keys = admins.iter().map(|a| a.public()).collect::<Vec<_>>();
        match Self::boot(enclave_nsm(), Vec::new(), &keys, at(0)) {
            Ok(h) => h,
            Err((r, _)) => panic!("boot failed: {r:?}"),
        }
    }

    /// Boots a new enclave over `nsm` at `now`, replaying `store`. Returns the first reply that
    /// is not the expected one (a `BrokenLog`, an error) as `Err`, with the harness.
    pub fn boot(
        nsm: Arc<MockNsm>,
        store: Vec<Vec<u8>>,
        genesis: &[[u8; 32]],
        now: UnixMillis,
    ) -> Result<Self, (Response, Box<Self>)> {
        let enclave = Enclave::new(nsm.clone(), config(&nsm));
        Self::boot_enclave(enclave, nsm, store, genesis, now)
    }

    /// [`Harness::boot`] of an enclave configured by the caller (over `nsm`).
    pub fn boot_enclave(
        enclave: Enclave,
        nsm: Arc<MockNsm>,
        store: Vec<Vec<u8>>,
        genesis: &[[u8; 32]],
        now: UnixMillis,
    ) -> Result<Self, (Response, Box<Self>)> {
        // A new log starts under the keys pinned in the enclave, as in a production image.
        let enclave = if genesis.is_empty() {
            enclave
        } else {
            enclave.with_pinned_genesis(genesis.to_vec())
        };
        let total_entries = store.len() as u64;
        let mut h = Self {
            nsm,
            enclave,
            store,
            now,
            next_id: 1,
            nonce: 0,
        };
        let begin = h.send(Request::ReplayBegin {
            genesis_admin_keys: genesis.iter().map(|k| ByteBuf::from(k.to_vec())).collect(),
            total_entries,
        });
        if begin != Response::Ack {
            return Err((begin, Box::new(h)));
        }
        let batches: Vec<Vec<ByteBuf>> = h
            .store
            .chunks(7)
            .map(|c| c.iter().map(|e| ByteBuf::from(e.clone())).collect())
            .collect();
        for entries in batches {
            let reply = h.send(Request::ReplayEntries { entries });
            if reply != Response::Ack {
                return Err((reply, Box::new(h)));
            }
        }
        let end = h.send(Request::ReplayEnd);
        if end != Response::Ack || !h.enclave.is_ready() {
            return Err((end, Box::new(h)));
        }
        Ok(h)
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Moves the enclave's clock forward.
    pub fn advance(&mut self, ms: u64) {
        self.now = self.now.checked_add_millis(ms).unwrap();
    }

    /// Sends `request` under a fresh id at [`Harness::now`] and returns the enclave's replies
    /// untouched.
    pub fn send_raw(&mut self, request: Request) -> (u64, Replies) {
        let id = self.id();
        self.nsm.set_time(self.now);
        let replies = self.enclave.handle(id, request, self.now);
        (id, replies)
    }

    /// Sends `request` and returns its final reply: a `Persist` is stored, the `Held` reply
    /// after it checked to name the last stored entry, durability reported, and the held reply
    /// returned.
    pub fn send(&mut self, request: Request) -> Response {
        let (id, replies) = self.send_raw(request);
        let mut replies = replies.into_iter();
        let (rid, reply) = replies.next().expect("no reply");
        assert_eq!(rid, id, "reply under another id");
        let Response::Persist { first_seq, entries } = reply else {
            assert!(
                !matches!(reply, Response::Held { .. }),
                "a Held reply without its Persist"
            );
            assert!(replies.next().is_none(), "one reply expected");
            return reply;
        };
        let (hid, held) = replies.next().expect("no final reply after the Persist");
        assert_eq!(hid, id, "final reply under another id");
        assert!(replies.next().is_none(), "more than Persist and Held");
        let Response::Held { through_seq, reply } = held else {
            panic!("the final reply is not held for durability: {held:?}");
        };
        assert!(!entries.is_empty(), "an empty Persist");
        assert_eq!(
            first_seq,
            self.store.len() as u64,
            "Persist does not continue the stored log"
        );
        self.store
            .extend(entries.into_iter().map(ByteBuf::into_vec));
        assert_eq!(
            through_seq,
            self.store.len() as u64 - 1,
            "held for another entry than its last"
        );
        let (durable_id, acked) = self.send_raw(Request::Durable { through_seq });
        assert_eq!(acked, vec![(durable_id, Response::Ack)], "Durable");
        *reply
    }

    /// A fresh admin nonce.
    pub fn nonce(&mut self) -> [u8; 16] {
        self.nonce += 1;
        let mut n = [0u8; 16];
        n[..8].copy_from_slice(&self.nonce.to_be_bytes());
        n[8..].copy_from_slice(b"nonce-ok");
        n
    }

    /// The deployment of the stored log: [`ORIGIN`] and the hash of its genesis entry (1).
    pub fn deployment(&self) -> Deployment {
        Deployment {
            origin: ORIGIN.into(),
            genesis: EntryHash::of(self.store.get(1).expect("the log has a genesis entry")),
        }
    }

    /// `action` signed by `admin` now with a fresh nonce, for this deployment.
    pub fn signed(&mut self, admin: &Admin, action: AdminAction) -> Vec<u8> {
        let nonce = self.nonce();
        admin.sign(&self.deployment(), self.now, nonce, action)
    }

    /// Sends signed admin request bytes; returns `(accepted, seq, reason)`.
    pub fn admin_bytes(&mut self, bytes: Vec<u8>) -> (bool, u64, Option<String>) {
        match self.send(Request::Admin {
            request: ByteBuf::from(bytes),
        }) {
            Response::AdminResult {
                accepted,
                seq,
                reason,
            } => (accepted, seq, reason),
            other => panic!("expected AdminResult, got {other:?}"),
        }
    }

    /// Signs `action` with `admin` and sends it; panics unless it is accepted.
    pub fn admin_ok(&mut self, admin: &Admin, action: AdminAction) -> u64 {
        let bytes = self.signed(admin, action);
        let (accepted, seq, reason) = self.admin_bytes(bytes);
        assert!(accepted, "admin request refused: {reason:?}");
        seq
    }

    /// Asks for a challenge for `server` and presents the document it makes for it now.
    pub fn attest(&mut self, server: &McpServer) -> Response {
        let nonce = self.challenge(server.id());
        let document = server.attest(&nonce, self.now);
        self.evidence(server.id(), &nonce, document)
    }

    /// Asks for a challenge nonce for `server_id`.
    pub fn challenge(&mut self, server_id: &str) -> Vec<u8> {
        match self.send(Request::AttestChallenge {
            server_id: server_id.into(),
        }) {
            Response::Challenge { nonce, .. } => nonce.into_vec(),
            other => panic!("expected Challenge, got {other:?}"),
        }
    }

    /// Presents attestation evidence.
    pub fn evidence(&mut self, server_id: &str, nonce: &[u8], document: Vec<u8>) -> Response {
        self.send(Request::AttestEvidence {
            server_id: server_id.into(),
            nonce: ByteBuf::from(nonce.to_vec()),
            document: ByteBuf::from(document),
        })
    }

    /// Resolves a handle.
    pub fn resolve(&mut self, bearer: &str, server_id: &str) -> Response {
        self.send(Request::Resolve {
            bearer: bearer.into(),
            server_id: server_id.into(),
        })
    }

    /// Authorizes a tool call.
    pub fn authorize(&mut self, bearer: &str, server_id: &str, tool: &str) -> Response {
        self.send(Request::Authorize {
            bearer: bearer.into(),
            server_id: server_id.into(),
            tool: tool.into(),
        })
    }

    /// Lists servers.
    pub fn discover(&mut self, bearer: &str) -> Response {
        self.send(Request::Discover {
            bearer: bearer.into(),
        })
    }

    /// The enclave's status reply.
    pub fn status(&mut self) -> Response {
        self.send(Request::Status)
    }

    /// `GetAttestation` with `nonce`: the document and the JWKS.
    pub fn own_attestation(&mut self, nonce: Option<&[u8]>) -> (Vec<u8>, Jwks) {
        match self.send(Request::GetAttestation {
            nonce: nonce.map(|n| ByteBuf::from(n.to_vec())),
        }) {
            Response::Attestation { document, jwks } => {
                (document.into_vec(), Jwks::parse(jwks.as_bytes()).unwrap())
            }
            other => panic!("expected Attestation, got {other:?}"),
        }
    }

    /// The decoded stored entry at `seq`.
    pub fn entry(&self, seq: u64) -> Entry {
        decode(&self.store[usize::try_from(seq).unwrap()])
    }

    /// The decoded last stored entry.
    pub fn last(&self) -> Entry {
        decode(self.store.last().unwrap())
    }

    /// Registers `servers`, installs `policy` and the identity provider `idp`, all signed by
    /// `admin`.
    pub fn setup(&mut self, admin: &Admin, servers: &[&McpServer], policy: &str, idp: &Idp) {
        for s in servers {
            self.admin_ok(admin, s.register());
        }
        self.admin_ok(
            admin,
            AdminAction::SetPolicy {
                text: policy.into(),
            },
        );
        self.admin_ok(admin, idp.install());
    }

    /// The hello reply.
    pub fn hello(&mut self) -> Response {
        self.send(Request::Hello {
            version: PROTOCOL_VERSION,
        })
    }
}

/// The event of `entry`.
pub fn event(entry: &Entry) -> &Event {
    &entry.event
}

/// `attestplane-verify`, next to this test's directory in the target dir (built by
/// `cargo build`/`cargo test --workspace`).
pub fn verifier_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?.parent()?;
    let bin = dir.join(format!(
        "attestplane-verify{}",
        std::env::consts::EXE_SUFFIX
    ));
    bin.exists().then_some(bin)
}
