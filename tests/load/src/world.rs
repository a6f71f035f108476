//! What both measurements share: the keys, the policy, the one registered server, the agents'
//! bearer tokens and the signed admin requests that install them.
//!
//! Keys are derived from fixed labels (this is a benchmark, not a deployment); the server's
//! measurements are those of `attestplane-demo-server --image NAME` (PCRn = SHA-384 of
//! `"NAME pcrN"`), so the same registration fits the demo server, the bench's own document
//! source and the in-process server mock.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use attestplane_verifier::UnixMillis;
use attestplane_verifier::admin::{
    AdminAction, AdminRequest, Deployment, Digest32, IdentityProviderSpec, PcrHex, ServerSpec,
};
use attestplane_verifier::attestation::{Pcr, PcrIndex};
use attestplane_verifier::entry::EntryHash;
use attestplane_verifier::handle::{IdentityClaims, Jwks};
use ed25519_dalek::SigningKey;
use sha2::{Digest as _, Sha256, Sha384};

/// The starter policy `attestplane dev` installs.
pub const POLICY: &str = include_str!("../../../verifier/testdata/policy/starter.cedar");
/// The log's origin (both enclaves).
pub const ORIGIN: &str = "attestplane.load/log";
/// The identity provider's issuer, audience and key id.
pub const IDP_ISSUER: &str = "https://idp.attestplane.load";
pub const IDP_AUDIENCE: &str = "attestplane";
pub const IDP_KID: &str = "load";
/// The registered server.
pub const SERVER_ID: &str = "weather";
pub const TENANT: &str = "acme";
/// The demo server's default image name.
pub const IMAGE: &str = "attestplane-demo-weather";
/// How long the server's attestation stays valid (longer than any run).
const MAX_ATTESTATION_AGE_MS: u64 = 24 * 3_600_000;
/// Lifetime of the agents' bearer tokens.
const TOKEN_TTL_SECS: u64 = 24 * 3600;

/// A key derived from a label.
fn key(label: &str) -> SigningKey {
    SigningKey::from_bytes(&Sha256::digest(label.as_bytes()).into())
}

/// The image measurements PCR0..2 of `image` (as the demo server computes them).
pub fn image_pcrs(image: &str) -> [[u8; 48]; 3] {
    [0, 1, 2].map(|i| Sha384::digest(format!("{image} pcr{i}").as_bytes()).into())
}

/// Keys and names of one run.
#[derive(Debug)]
pub struct World {
    pub admin: SigningKey,
    pub idp: SigningKey,
    nonce: u64,
    /// The deployment admin requests name, once the log's genesis entry is known.
    deployment: Option<Deployment>,
}

impl World {
    pub fn new() -> Self {
        Self {
            admin: key("attestplane load bench: admin"),
            idp: key("attestplane load bench: identity provider"),
            nonce: 0,
            deployment: None,
        }
    }

    /// Admin requests from now on are for the log of [`ORIGIN`] whose genesis entry (entry 1)
    /// has `genesis` as its hash.
    pub fn set_genesis(&mut self, genesis: EntryHash) {
        self.deployment = Some(Deployment {
            origin: ORIGIN.into(),
            genesis,
        });
    }

    /// The admin's public key, hex.
    pub fn admin_hex(&self) -> String {
        hex::encode(self.admin.verifying_key().as_bytes())
    }

    /// The registration of the server at `endpoint` running an image with `pcrs`.
    pub fn spec(endpoint: &str, pcrs: &[[u8; 48]; 3]) -> Result<ServerSpec> {
        let tools = [(
            "forecast".to_string(),
            Digest32(Sha256::digest(b"{\"name\":\"forecast\"}").into()),
        )]
        .into();
        Self::spec_with(endpoint, pcrs, tools)
    }

    /// [`World::spec`] with `tools` pinned (name → digest).
    pub fn spec_with(
        endpoint: &str,
        pcrs: &[[u8; 48]; 3],
        tools: BTreeMap<String, Digest32>,
    ) -> Result<ServerSpec> {
        let mut map = BTreeMap::new();
        for (i, value) in (0u8..).zip(pcrs) {
            let index = PcrIndex::try_from(i).map_err(|e| anyhow::anyhow!("PCR{i}: {e}"))?;
            let pcr =
                Pcr::try_from(value.as_slice()).map_err(|e| anyhow::anyhow!("PCR{i}: {e}"))?;
            map.insert(index, PcrHex(pcr));
        }
        Ok(ServerSpec {
            id: SERVER_ID.into(),
            name: "Weather".into(),
            tenant: TENANT.into(),
            resource: format!("{endpoint}/mcp"),
            endpoint: endpoint.into(),
            pcrs: map,
            allow_debug: false,
            max_attestation_age_ms: MAX_ATTESTATION_AGE_MS,
            tools,
            assurance: attestplane_verifier::admin::Assurance::Nitro,
            prices: Default::default(),
            client_requests: Default::default(),
        })
    }

    /// The three admin actions of the set-up, in order: policy, identity provider, server.
    pub fn setup_actions(&self, spec: ServerSpec) -> Result<Vec<AdminAction>> {
        let jwks = Jwks::from_keys([(IDP_KID, self.idp.verifying_key())])
            .map_err(|e| anyhow::anyhow!("cannot build the JWKS: {e}"))?
            .to_json();
        Ok(vec![
            AdminAction::SetPolicy {
                text: POLICY.into(),
            },
            AdminAction::SetIdentityProvider(IdentityProviderSpec {
                issuer: IDP_ISSUER.into(),
                audience: IDP_AUDIENCE.into(),
                jwks,
            }),
            AdminAction::RegisterServer(spec),
        ])
    }

    /// `action` as a signed admin request made at `now`.
    pub fn admin_request(&mut self, action: AdminAction, now: UnixMillis) -> Result<Vec<u8>> {
        self.nonce += 1;
        let mut nonce = [0u8; 16];
        nonce[..8].copy_from_slice(&self.nonce.to_be_bytes());
        nonce[8..].copy_from_slice(&now.as_millis().to_be_bytes());
        let name = action.type_name();
        let deployment = self
            .deployment
            .clone()
            .context("the log's genesis entry is not known yet")?;
        AdminRequest {
            time: now,
            nonce,
            deployment,
            action,
        }
        .sign(&self.admin.verifying_key(), &self.admin)
        .map_err(|e| anyhow::anyhow!("cannot sign {name}: {e}"))
    }

    /// Bearer tokens of `n` agents of the tenant, all with the `tool-user` role, issued at `now`.
    pub fn tokens(&self, n: usize, now: UnixMillis) -> Result<Vec<String>> {
        self.tokens_for(n, now, IDP_AUDIENCE)
    }

    /// [`World::tokens`] for audience `aud` (an MCP endpoint's resource URI for the gateway).
    pub fn tokens_for(&self, n: usize, now: UnixMillis, aud: &str) -> Result<Vec<String>> {
        (0..n).map(|i| self.token(i, now, aud)).collect()
    }

    fn token(&self, i: usize, now: UnixMillis, aud: &str) -> Result<String> {
        IdentityClaims {
            iss: IDP_ISSUER.into(),
            aud: aud.into(),
            sub: format!("agent-{i}"),
            user: Some(format!("user-{i}")),
            tenant: TENANT.into(),
            roles: vec!["tool-user".into()],
            iat: Some(now.as_secs()),
            exp: now.as_secs() + TOKEN_TTL_SECS,
        }
        .encode(IDP_KID, &self.idp)
        .context("JWT")
    }
}
