//! The host's view of where registered MCP servers live, read from the stored log.
//!
//! Role. To attest a server the host must fetch `GET {endpoint}/attestation?nonce=…` from the
//! endpoint its registration names. The registry itself lives in the enclave (state is the
//! log); the host reads the same accepted `register_server` / `update_server` /
//! `revoke_server` admin entries from its own store to learn the endpoints. It decodes entries
//! incrementally (each entry once per process) and only on demand.
//!
//! Trust. None needed: this view only decides where the host fetches a document from. The
//! document is self-authenticating (signed by the server's NSM, carrying the enclave's fresh
//! nonce), and the enclave verifies it against *its* registration, so a host that fetched from
//! the wrong place gains nothing but a logged refusal.

use std::collections::HashMap;
use std::sync::Mutex;

use attestplane_verifier::admin::{AdminAction, SignedAdminRequest};
use attestplane_verifier::entry::{Event, SignedEntry};

use crate::store::{Store, StoreError};

/// Endpoints of registered servers, from the admin entries of the log.
#[derive(Debug, Default)]
pub struct Registry {
    inner: Mutex<Scan>,
}

#[derive(Debug, Default)]
struct Scan {
    /// Entries `0..scanned` have been read.
    scanned: u64,
    endpoints: HashMap<String, String>,
}

impl Registry {
    /// The registered endpoint of `server_id`, after reading any entries not yet read.
    /// `None` when the server is not registered (or was revoked).
    pub fn endpoint(&self, store: &Store, server_id: &str) -> Result<Option<String>, StoreError> {
        let mut scan = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let len = store.len();
        while scan.scanned < len {
            let batch = store.range(scan.scanned, len)?;
            if batch.is_empty() {
                break;
            }
            for bytes in &batch {
                scan.read(bytes);
            }
            scan.scanned = scan.scanned.saturating_add(batch.len() as u64);
        }
        Ok(scan.endpoints.get(server_id).cloned())
    }
}

impl Scan {
    fn read(&mut self, bytes: &[u8]) {
        // An entry that does not decode is not this view's business (the enclave refuses the
        // log at replay); skip it.
        let Ok(entry) = SignedEntry::decode(bytes) else {
            return;
        };
        let Event::Admin {
            request,
            accepted: true,
            ..
        } = &entry.entry().event
        else {
            return;
        };
        let Ok(signed) = SignedAdminRequest::decode(request) else {
            return;
        };
        match &signed.request().action {
            AdminAction::RegisterServer(spec) | AdminAction::UpdateServer(spec) => {
                self.endpoints
                    .insert(spec.id.clone(), spec.endpoint.clone());
            }
            AdminAction::RevokeServer { id, .. } => {
                self.endpoints.remove(id);
            }
            _ => {}
        }
    }
}
