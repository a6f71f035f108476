//! MCP server registrations in a host store, as the enclave would have logged them: what the
//! relay's dialer reads to find a server's endpoint. Shared by the relay's tests
//! (`host-proxy/tests/relay.rs`), its benchmark (`host-proxy/benches/relay.rs`) and the
//! end-to-end transport test (`tests/tests/mcp_transport.rs`), included with `#[path]`.

#![allow(dead_code)]

use attestplane_host::store::Store;
use attestplane_verifier::UnixMillis;
use attestplane_verifier::admin::{AdminAction, AdminRequest, Deployment, PcrHex, ServerSpec};
use attestplane_verifier::attestation::{Pcr, PcrIndex};
use attestplane_verifier::entry::{Entry, EntryHash, Event, KeyId};
use ed25519_dalek::SigningKey;

/// A registration of server `id` of tenant `acme` at `endpoint` (resource `ENDPOINT/mcp`),
/// attested by a Nitro image whose PCR0 is all 1s.
pub fn spec(id: &str, endpoint: &str) -> ServerSpec {
    ServerSpec {
        id: id.into(),
        name: id.into(),
        tenant: "acme".into(),
        resource: format!("{endpoint}/mcp"),
        endpoint: endpoint.into(),
        pcrs: [(
            PcrIndex::try_from(0u8).unwrap(),
            PcrHex(Pcr::try_from([1u8; 48].as_slice()).unwrap()),
        )]
        .into(),
        allow_debug: false,
        max_attestation_age_ms: 60_000,
        tools: Default::default(),
        assurance: attestplane_verifier::admin::Assurance::Nitro,
        prices: Default::default(),
        client_requests: Default::default(),
    }
}

/// Appends entry `seq` to `store`: `action` signed as an admin request by `key` and logged
/// (accepted or not) with the same key standing in for the epoch key.
pub async fn append_admin(
    store: &Store,
    key: &SigningKey,
    seq: u64,
    action: AdminAction,
    accepted: bool,
) {
    let time = UnixMillis::from_millis(1_800_000_000_000 + seq);
    let mut nonce = [0u8; 16];
    nonce[..8].copy_from_slice(&seq.to_be_bytes());
    let request = AdminRequest {
        time,
        nonce,
        deployment: Deployment {
            origin: "attestplane.test/log".into(),
            genesis: EntryHash::ZERO,
        },
        action,
    }
    .sign(&key.verifying_key(), key)
    .unwrap();
    let entry = Entry {
        seq,
        prev: EntryHash::ZERO,
        epoch: 0,
        time,
        event: Event::Admin {
            request,
            accepted,
            reason: None,
        },
    }
    .sign(&KeyId::of(&key.verifying_key()), key)
    .unwrap();
    store.append(seq, vec![entry]).await.unwrap();
}
