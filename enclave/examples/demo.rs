//! The walk-through on one machine, in one process: a control-plane enclave on a mock NSM, an
//! attested MCP server on another mock NSM, an operator, an agent, and the files an auditor
//! checks with `attestplane-verify`.
//!
//!   register → attest → resolve → call → export → (verify, done by `scripts/demo`)
//!
//! The host's part (storing entries and reporting them durable) is played in memory here; the
//! HTTP host proxy is a separate program. Everything runs on the enclave's real request
//! handling (`Enclave::handle`) and the verifier's real formats.
//!
//! Usage: `cargo run -p attestplane-enclave --example demo [OUT_DIR]` (default `target/demo`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use attestplane_enclave::nsm::{Clock, MockNsm, Nsm};
use attestplane_enclave::service::{Enclave, EnclaveConfig};
use attestplane_proto::{ByteBuf, PROTOCOL_VERSION, Request, Response};
use attestplane_verifier::UnixMillis;
use attestplane_verifier::admin::{
    AdminAction, AdminRequest, Deployment, Digest32, IdentityProviderSpec, PcrHex, ServerSpec,
};
use attestplane_verifier::attestation::{Pcr, PcrIndex, TrustAnchor};
use attestplane_verifier::entry::EntryHash;
use attestplane_verifier::handle::{IdentityClaims, Jwks};
use ed25519_dalek::SigningKey;
use sha2::{Digest as _, Sha256, Sha384};

const ORIGIN: &str = "attestplane.demo/log";
const ISSUER: &str = "https://control.attestplane.demo";
const POLICY: &str = include_str!("../../verifier/testdata/policy/starter.cedar");

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

struct Host {
    nsm: Arc<MockNsm>,
    enclave: Enclave,
    store: Vec<Vec<u8>>,
    now: UnixMillis,
    next_id: u64,
}

impl Host {
    /// Sends a request; stores what the enclave asks to persist, reports it durable, and
    /// returns the reply that was held for durability.
    fn send(&mut self, request: Request) -> Result<Response> {
        self.next_id += 1;
        let id = self.next_id;
        self.nsm.set_time(self.now);
        let mut replies = self.enclave.handle(id, request, self.now).into_iter();
        let (_, reply) = replies.next().ok_or("no reply")?;
        let Response::Persist { entries, .. } = reply else {
            return Ok(reply);
        };
        let Some((_, Response::Held { through_seq, reply })) = replies.next() else {
            return Err("no held reply after the Persist".into());
        };
        self.store
            .extend(entries.into_iter().map(ByteBuf::into_vec));
        if through_seq + 1 != self.store.len() as u64 {
            return Err("the reply is held for another entry than the last stored".into());
        }
        self.next_id += 1;
        let _ = self
            .enclave
            .handle(self.next_id, Request::Durable { through_seq }, self.now);
        Ok(*reply)
    }
}

fn pcrs_of(nsm: &MockNsm) -> Result<Vec<(PcrIndex, Pcr)>> {
    (0u8..3)
        .map(|i| {
            let v = nsm.describe_pcr(u16::from(i))?.value;
            Ok((PcrIndex::try_from(i)?, Pcr::try_from(v.as_slice())?))
        })
        .collect()
}

fn step(n: u32, what: &str) {
    println!("\n[{n}] {what}");
}

fn main() -> Result<()> {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "target/demo".into()),
    );
    std::fs::create_dir_all(&out)?;
    let now = UnixMillis::from_system_time(SystemTime::now());

    step(
        1,
        "boot the control plane on a mock NSM (NOT an attested enclave: local demo)",
    );
    let nsm =
        Arc::new(MockNsm::builder(*b"attestplane demo control plane..", Clock::Fixed(now)).build());
    let server_nsm = MockNsm::builder(*b"attestplane demo mcp server.....", Clock::Fixed(now))
        .image_measurements(
            Sha384::digest(b"weather image pcr0").into(),
            Sha384::digest(b"weather image pcr1").into(),
            Sha384::digest(b"weather image pcr2").into(),
        )
        .build();
    let self_root = nsm.root_pem()?;
    let server_root = server_nsm.root_pem()?;
    let config = EnclaveConfig {
        origin: ORIGIN.into(),
        issuer: ISSUER.into(),
        self_anchor: TrustAnchor::from_pem(self_root.as_bytes())?,
        server_anchor: TrustAnchor::from_pem(server_root.as_bytes())?,
        allow_debug: false,
    };
    let admin = SigningKey::from_bytes(&Sha256::digest(b"demo admin key").into());
    let mut host = Host {
        enclave: Enclave::new(nsm.clone(), config)
            .with_pinned_genesis(vec![admin.verifying_key().to_bytes()]),
        nsm: nsm.clone(),
        store: Vec::new(),
        now,
        next_id: 0,
    };
    host.send(Request::Hello {
        version: PROTOCOL_VERSION,
    })?;
    host.send(Request::ReplayBegin {
        genesis_admin_keys: vec![ByteBuf::from(admin.verifying_key().to_bytes().to_vec())],
        total_entries: 0,
    })?;
    let r = host.send(Request::ReplayEnd)?;
    println!("    epoch 0 opened with an NSM attestation binding the epoch key: {r:?}");

    let mut nonce = 0u8;
    let mut admin_request = |host: &mut Host, action: AdminAction| -> Result<Response> {
        nonce += 1;
        let genesis = host.store.get(1).ok_or("no genesis entry stored")?;
        let bytes = AdminRequest {
            time: host.now,
            nonce: [nonce; 16],
            deployment: Deployment {
                origin: ORIGIN.into(),
                genesis: EntryHash::of(genesis),
            },
            action,
        }
        .sign(&admin.verifying_key(), &admin)?;
        host.send(Request::Admin {
            request: ByteBuf::from(bytes),
        })
    };

    step(
        2,
        "operator: install the starter policy and a development identity provider",
    );
    println!(
        "    {:?}",
        admin_request(
            &mut host,
            AdminAction::SetPolicy {
                text: POLICY.into()
            }
        )?
    );
    let idp = SigningKey::from_bytes(&Sha256::digest(b"demo identity provider").into());
    let jwks = Jwks::from_keys([("dev-idp", idp.verifying_key())])?.to_json();
    println!(
        "    {:?}",
        admin_request(
            &mut host,
            AdminAction::SetIdentityProvider(IdentityProviderSpec {
                issuer: "https://idp.attestplane.demo".into(),
                audience: "attestplane".into(),
                jwks,
            }),
        )?
    );

    step(
        3,
        "operator: register the MCP server `weather` with the PCRs it must run",
    );
    let spec = ServerSpec {
        id: "weather".into(),
        name: "Weather".into(),
        tenant: "acme".into(),
        resource: "https://weather.acme.example/mcp".into(),
        endpoint: "http://127.0.0.1:9000".into(),
        pcrs: pcrs_of(&server_nsm)?
            .into_iter()
            .map(|(i, p)| (i, PcrHex(p)))
            .collect(),
        allow_debug: false,
        max_attestation_age_ms: 10 * 60 * 1000,
        tools: [(
            "forecast".to_string(),
            Digest32(Sha256::digest(b"{\"name\":\"forecast\"}").into()),
        )]
        .into(),
        assurance: attestplane_verifier::admin::Assurance::Nitro,
        prices: Default::default(),
        client_requests: Default::default(),
    };
    println!(
        "    {:?}",
        admin_request(&mut host, AdminAction::RegisterServer(spec))?
    );

    step(
        4,
        "agent: resolve `weather` before it is attested (must be denied)",
    );
    let token = IdentityClaims {
        iss: "https://idp.attestplane.demo".into(),
        aud: "attestplane".into(),
        sub: "agent-7".into(),
        user: Some("alice".into()),
        tenant: "acme".into(),
        roles: vec!["tool-user".into()],
        iat: Some(now.as_secs()),
        exp: now.as_secs() + 3600,
    }
    .encode("dev-idp", &idp)?;
    let resolve = Request::Resolve {
        bearer: token.clone(),
        server_id: "weather".into(),
    };
    println!("    {:?}", host.send(resolve.clone())?);

    step(
        5,
        "attest: the enclave issues a nonce, the server's NSM signs a document carrying it",
    );
    let Response::Challenge {
        nonce: challenge, ..
    } = host.send(Request::AttestChallenge {
        server_id: "weather".into(),
    })?
    else {
        return Err("no challenge".into());
    };
    let document = server_nsm.attest(None, Some(challenge.to_vec()), None)?;
    println!(
        "    {:?}",
        host.send(Request::AttestEvidence {
            server_id: "weather".into(),
            nonce: challenge,
            document: ByteBuf::from(document),
        })?
    );

    step(6, "agent: resolve again: a handle signed by the epoch key");
    let handle = match host.send(resolve)? {
        Response::Handle { token, seq, .. } => {
            println!("    handle issued by log entry {seq}");
            token
        }
        other => return Err(format!("expected a handle, got {other:?}").into()),
    };

    step(
        7,
        "agent: call the pinned tool `forecast`, then an unpinned one (denied)",
    );
    for tool in ["forecast", "delete_everything"] {
        let r = host.send(Request::Authorize {
            bearer: token.clone(),
            server_id: "weather".into(),
            tool: tool.into(),
        })?;
        println!("    {tool}: {r:?}");
    }

    step(
        8,
        "export: the log, a checkpoint, the handle and the control plane's JWKS",
    );
    let Response::Checkpoint { note } = host.send(Request::Checkpoint)? else {
        return Err("no checkpoint".into());
    };
    let Response::Attestation { jwks, .. } = host.send(Request::GetAttestation { nonce: None })?
    else {
        return Err("no attestation".into());
    };
    let pcrs: serde_json::Map<String, serde_json::Value> = pcrs_of(&nsm)?
        .into_iter()
        .map(|(i, p)| (format!("PCR{i}"), p.to_hex().into()))
        .collect();
    std::fs::write(out.join("log.cbor"), host.store.concat())?;
    std::fs::write(out.join("checkpoint.txt"), &note)?;
    std::fs::write(out.join("handle.jwt"), &handle)?;
    std::fs::write(out.join("jwks.json"), &jwks)?;
    std::fs::write(out.join("control-plane-root.pem"), &self_root)?;
    std::fs::write(out.join("server-root.pem"), &server_root)?;
    std::fs::write(out.join("pcrs.json"), serde_json::to_string_pretty(&pcrs)?)?;
    std::fs::write(out.join("issuer.txt"), ISSUER)?;
    println!(
        "    {} entries written to {}",
        host.store.len(),
        out.display()
    );
    Ok(())
}
