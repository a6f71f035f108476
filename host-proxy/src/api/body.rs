//! The JSON bodies of the HTTP API (docs/http-api.md), one type per body: the API serialises
//! them and the CLI deserialises them, so the two cannot drift apart. Bodies that are bytes
//! (`application/cbor-seq` entries, checkpoint notes, the JWKS alone) have no type here.
//!
//! None of these bodies is trusted by the CLI for anything that matters: what the enclave
//! signed inside them (handles, documents, proofs against signed checkpoints) is verified.

use std::fmt;

use serde::{Deserialize, Serialize};

/// `POST /v1/admin` request: the signed admin request, standard base64 (padding optional).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSubmission {
    /// The signed request's bytes, base64.
    pub request: String,
}

/// `POST /v1/admin` answer: `{"accepted": true, "seq": 7}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminAccepted {
    /// Always true (a refusal is an error body).
    pub accepted: bool,
    /// The log entry recording it.
    pub seq: u64,
}

/// `POST /v1/servers/{id}/attest` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttestVerified {
    /// Always true (a refusal is an error body).
    pub verified: bool,
    /// The log entry recording it.
    pub seq: u64,
    /// The server's measurement, hex.
    #[serde(default)]
    pub measurement: Option<String>,
}

/// One server of `GET /v1/servers`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListedServer {
    /// Its id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Its tenant.
    pub tenant: String,
    /// Its resource URI (the `aud` of its handles).
    pub resource: String,
    /// Whether a verified attestation is on record.
    pub attested: bool,
}

/// `GET /v1/servers` answer: `{"servers": [...], "seq": 10}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerList {
    /// The servers the agent may discover.
    pub servers: Vec<ListedServer>,
    /// The log entry recording the discovery.
    pub seq: u64,
}

/// `POST /v1/servers/{id}/handle` answer. Its `Debug` leaves the handle out.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandleIssued {
    /// The handle (a JWT signed by the enclave's epoch key).
    pub token: String,
    /// The log entry that issued it.
    pub seq: u64,
    /// Its `exp`, seconds since the epoch.
    pub expires_at: u64,
}

impl fmt::Debug for HandleIssued {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandleIssued")
            .field("seq", &self.seq)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// `GET /v1/attestation` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnclaveAttestation {
    /// The enclave's attestation document (COSE_Sign1), standard base64.
    pub document: String,
    /// The epoch key as a JWKS (a JSON object).
    pub jwks: serde_json::Value,
}

/// `GET /v1/log/head` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogHead {
    /// Entries stored.
    pub size: u64,
    /// The hash of the last entry, hex; `null` for an empty log.
    pub head: Option<String>,
}

/// `GET /v1/log/proof/inclusion` answer (hashes in hex).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InclusionProof {
    /// The entry's seq.
    pub index: u64,
    /// The tree size the proof is for.
    pub size: u64,
    /// The entry's leaf hash.
    pub leaf: String,
    /// The root of the tree of `size` entries.
    pub root: String,
    /// The proof, bottom-up.
    pub proof: Vec<String>,
}

/// `GET /v1/log/proof/consistency` answer (hashes in hex).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsistencyProof {
    /// The old tree size.
    pub old: u64,
    /// The new tree size.
    pub new: u64,
    /// The root of the old tree.
    pub old_root: String,
    /// The root of the new tree.
    pub new_root: String,
    /// The proof.
    pub proof: Vec<String>,
}

/// Every error answer: `{"error": {"code", "message", "seq"?}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// The error of an [`ErrorBody`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// The stable machine code (`denied`, `not_found`, …).
    pub code: String,
    /// What went wrong, for people.
    pub message: String,
    /// The log entry that recorded the refusal, when it was logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
}
