//! Admin requests: signed here with the operator's admin key for the pinned deployment, posted
//! to `POST /v1/admin` as `{"request": "<base64>"}`, and then confirmed from the log itself.
//!
//! Every request carries the current time, 16 random bytes from the operating system (so the
//! enclave can refuse a replay) and the [`Deployment`] it is for: the log's origin and the hash
//! of its genesis entry, pinned in the client configuration (`origin`, `genesis`; learned once
//! with `attestplane deployment pin`). Without them nothing is signed. Requests are built with
//! the verifier's [`attestplane_verifier::admin`] encoder, the one definition of their bytes.
//!
//! ## Confirmation
//!
//! The proxy's answer (`{"accepted": true, "seq": N}`, or `admin_refused` with a `seq`) is
//! signed by nobody: a host could drop a revocation and say it happened. So the CLI believes
//! only the log, through the enclave's signature ([`confirm`]):
//!
//! 1. the control plane's attestation document for a fresh nonce, verified against the pinned
//!    root and the expected PCRs (`--pcrs` is required), not in debug mode unless allowed: the
//!    attested epoch key;
//! 2. a checkpoint the enclave signs now (`POST /v1/log/checkpoint`), verified under the pinned
//!    origin and that key, covering the entry the host named;
//! 3. the entry at that position and its inclusion proof against the checkpoint's root (the
//!    leaf computed here from the entry's bytes);
//! 4. the entry's event: an admin event holding exactly the bytes we signed, and its verdict.
//!
//! Only then is the outcome printed (entry, epoch, checkpoint size). A host that answers with
//! the wrong position, serves another entry, or claims acceptance for a request the log records
//! as refused (or does not record at all) is named by a [`ConfirmError`] (exit 1).

use attestplane_verifier::UnixMillis;
use attestplane_verifier::admin::{AdminAction, AdminRequest, Deployment, SignedAdminRequest};
use attestplane_verifier::checkpoint::{Checkpoint, verify_checkpoint};
use attestplane_verifier::entry::{EntryHash, Event, SignedEntry};
use attestplane_verifier::merkle;
use attestplane_verifier::reason::Reason;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::{SigningKey, VerifyingKey};
use rand_core::{OsRng, RngCore as _};
use serde_json::json;

use super::attest::{ControlPlaneTrust, attested_control_plane};
use super::http::Api;
use super::log::{fetch, fresh_checkpoint, inclusion_proof, subject_of};
use super::{CliError, CliResult, ClientContext, clean, now, print_json};
use crate::api::body::{AdminAccepted, AdminSubmission};

/// Why an admin act the host reported could not be confirmed from the log: each names how the
/// host misreported it (or that the log says otherwise).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfirmError {
    /// The checkpoint is not one the attested epoch key signed under the pinned origin.
    #[error(
        "the checkpoint is not signed by the attested epoch key under origin {origin:?}: {reason}"
    )]
    UnattestedCheckpoint {
        /// The pinned origin.
        origin: String,
        /// What failed.
        reason: String,
    },
    /// The enclave's fresh checkpoint does not reach the entry the host named.
    #[error("log entry {seq} is not in the enclave's fresh checkpoint of size {size}")]
    NotInCheckpoint {
        /// The position the host named.
        seq: u64,
        /// The checkpoint's size.
        size: u64,
    },
    /// The entry served at `seq` is not the leaf at `seq` of the checkpoint's tree.
    #[error("the entry served as log entry {seq} is not the one in the checkpoint of size {size}")]
    NotIncluded {
        /// The position.
        seq: u64,
        /// The checkpoint's size.
        size: u64,
    },
    /// The entry at `seq` says it is at another position.
    #[error("the entry served as log entry {seq} says it is entry {found}")]
    WrongPosition {
        /// The position asked for.
        seq: u64,
        /// The position the entry carries.
        found: u64,
    },
    /// The entry at `seq` is not our request (the host named another entry, or never
    /// submitted ours).
    #[error("log entry {seq} does not record this request: it holds {found}")]
    NotThisRequest {
        /// The position the host named.
        seq: u64,
        /// What it holds instead.
        found: String,
    },
    /// The host said accepted; the log records the request as refused.
    #[error(
        "the host said accepted, but log entry {seq} records the request as refused: {}",
        .reason.as_ref().map_or_else(|| "no reason logged".to_owned(), ToString::to_string)
    )]
    RefusedInLog {
        /// The entry.
        seq: u64,
        /// The logged reason.
        reason: Option<Reason>,
    },
}

/// An admin act as the log records it, checked against a fresh checkpoint of the attested key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confirmed {
    /// The entry recording it.
    pub seq: u64,
    /// Its epoch.
    pub epoch: u64,
    /// Whether the enclave applied it.
    pub accepted: bool,
    /// Why not, when refused.
    pub reason: Option<Reason>,
    /// The size of the checkpoint that includes it.
    pub checkpoint_size: u64,
}

/// The deployment pinned in the client configuration (`origin` and `genesis`).
pub fn pinned_deployment(context: &ClientContext) -> CliResult<Deployment> {
    let (Some(origin), Some(genesis)) = (&context.origin, &context.genesis) else {
        return Err(CliError::Usage(
            "no deployment is pinned: admin requests name the log they are for. Run `attestplane \
             deployment pin` (it verifies the control plane and records origin = and genesis = \
             in the [client] config), or set them there"
                .into(),
        ));
    };
    let genesis = EntryHash::from_hex(genesis.trim()).ok_or_else(|| {
        CliError::Usage(format!(
            "genesis = {genesis:?} in the config is not a hash (64 hex digits)"
        ))
    })?;
    Ok(Deployment {
        origin: origin.clone(),
        genesis,
    })
}

/// Builds and signs an admin request for `deployment` at `time` with a fresh random nonce.
pub fn sign_admin(
    action: AdminAction,
    key: &SigningKey,
    deployment: &Deployment,
    time: UnixMillis,
) -> CliResult<Vec<u8>> {
    let mut nonce = [0u8; 16];
    OsRng
        .try_fill_bytes(&mut nonce)
        .map_err(|e| CliError::Io(format!("no randomness from the OS: {e}")))?;
    let bytes = AdminRequest {
        time,
        nonce,
        deployment: deployment.clone(),
        action,
    }
    .sign(&key.verifying_key(), key)
    .map_err(|e| CliError::Usage(format!("cannot build the admin request: {e}")))?;
    // Decode what we built with the enclave's own decoder: a value it would refuse as
    // malformed (an empty id, too many tools...) is refused here, before it reaches the log.
    SignedAdminRequest::decode(&bytes)
        .map_err(|e| CliError::Usage(format!("invalid admin request: {e}")))?;
    Ok(bytes)
}

/// Signs `action` now for the pinned deployment, posts it, confirms the outcome from the log
/// (see the module documentation) and prints what was confirmed.
pub async fn submit_admin(
    context: &ClientContext,
    key: &SigningKey,
    action: AdminAction,
) -> CliResult {
    let deployment = pinned_deployment(context)?;
    let trust = ControlPlaneTrust::pinned(context, "confirming an admin act")?;
    let api = Api::new(&context.url)?;
    let kind = action.type_name();
    let subject = subject_of(&action);
    let bytes = sign_admin(action, key, &deployment, now())?;
    let body = json!(AdminSubmission {
        request: STANDARD.encode(&bytes),
    });
    let answer = api
        .post_json::<AdminAccepted>(&["v1", "admin"], Some(&body), None)
        .await;
    // What the host claims: accepted at seq, or refused (and logged) at seq.
    let (claimed_accepted, seq, refusal) = match answer {
        Ok(a) => (a.accepted, a.seq, None),
        Err(CliError::Api {
            status,
            code,
            message,
            seq: Some(seq),
        }) if code == "admin_refused" => (
            false,
            seq,
            Some(CliError::Api {
                status,
                code,
                message,
                seq: Some(seq),
            }),
        ),
        Err(e) => return Err(e),
    };
    let confirmed = confirm(&api, &trust, &deployment, &bytes, seq, claimed_accepted).await?;
    if !confirmed.accepted {
        let reason = confirmed
            .reason
            .as_ref()
            .map_or_else(|| "no reason logged".to_owned(), ToString::to_string);
        eprintln!(
            "confirmed from the log: {kind} was refused by the enclave in log entry {} (epoch {}, \
             checkpoint of size {}): {}",
            confirmed.seq,
            confirmed.epoch,
            confirmed.checkpoint_size,
            clean(&reason)
        );
        return Err(refusal.unwrap_or_else(|| {
            CliError::Failed(format!(
                "admin_refused: {kind} was not accepted (log entry {seq}): {}",
                clean(&reason)
            ))
        }));
    }
    if refusal.is_some() {
        eprintln!(
            "warning: the host answered that {kind} was refused, but log entry {seq} records it \
             as accepted"
        );
    }
    if context.json {
        print_json(&json!({
            "accepted": true,
            "confirmed": true,
            "seq": confirmed.seq,
            "epoch": confirmed.epoch,
            "checkpoint_size": confirmed.checkpoint_size,
            "action": kind,
            "subject": subject,
            "deployment": deployment,
        }))
    } else {
        let what = match subject {
            Some(s) => format!("{kind} {}", clean(&s)),
            None => kind.to_owned(),
        };
        outln!(
            "accepted: {what} (log entry {}, epoch {}; confirmed in the enclave's checkpoint of \
             size {})",
            confirmed.seq,
            confirmed.epoch,
            confirmed.checkpoint_size
        );
        Ok(())
    }
}

/// Confirms from the log that entry `seq` records `request` (the signed bytes we sent), as
/// accepted if `claimed_accepted`: against a fresh checkpoint signed by an attested epoch key
/// of `deployment`'s origin. Returns the logged outcome (which may be a refusal when the host
/// said so).
pub async fn confirm(
    api: &Api,
    trust: &ControlPlaneTrust,
    deployment: &Deployment,
    request: &[u8],
    seq: u64,
    claimed_accepted: bool,
) -> CliResult<Confirmed> {
    let control = attested_control_plane(api, trust).await?;
    let (size, root) = attested_checkpoint(api, &control.key, &deployment.origin).await?;
    let entry = included_entry(api, seq, size, &root).await?;
    let confirmed = check_entry(&entry, seq, size, request)?;
    if claimed_accepted && !confirmed.accepted {
        return Err(ConfirmError::RefusedInLog {
            seq,
            reason: confirmed.reason.clone(),
        }
        .into());
    }
    Ok(confirmed)
}

/// A fresh checkpoint verified under `origin` and the attested `key`: its size and root.
pub async fn attested_checkpoint(
    api: &Api,
    key: &VerifyingKey,
    origin: &str,
) -> CliResult<(u64, merkle::Hash)> {
    let note = fresh_checkpoint(api).await?;
    let verified =
        verify_checkpoint(&note, origin, key).map_err(|e| ConfirmError::UnattestedCheckpoint {
            origin: origin.to_owned(),
            reason: e.to_string(),
        })?;
    Ok((verified.size(), *verified.root()))
}

/// The entry at `seq`, as the leaf at `seq` of the tree of `size` leaves with root `root`.
pub async fn included_entry(
    api: &Api,
    seq: u64,
    size: u64,
    root: &merkle::Hash,
) -> CliResult<Vec<u8>> {
    if seq >= size {
        return Err(ConfirmError::NotInCheckpoint { seq, size }.into());
    }
    let mut entries = fetch(api, seq, seq.saturating_add(1)).await?;
    let (Some(entry), None) = (entries.pop(), entries.pop()) else {
        return Err(CliError::Failed(format!("the host served no entry {seq}")));
    };
    let proof = inclusion_proof(api, seq, size).await?;
    let leaf = merkle::leaf_hash(EntryHash::of(&entry).as_bytes());
    merkle::verify_inclusion(&leaf, seq, size, &proof, root)
        .map_err(|_| ConfirmError::NotIncluded { seq, size })?;
    Ok(entry)
}

/// Checks that `entry` (included at `seq`) records `request`; returns the logged verdict.
pub fn check_entry(
    entry: &[u8],
    seq: u64,
    checkpoint_size: u64,
    request: &[u8],
) -> Result<Confirmed, ConfirmError> {
    // Included in a checkpoint the enclave signed, so the enclave wrote it: it decodes.
    let entry = SignedEntry::decode(entry)
        .map_err(|e| ConfirmError::NotThisRequest {
            seq,
            found: format!("an undecodable entry ({e})"),
        })?
        .into_entry();
    if entry.seq != seq {
        return Err(ConfirmError::WrongPosition {
            seq,
            found: entry.seq,
        });
    }
    match entry.event {
        Event::Admin {
            request: logged,
            accepted,
            reason,
        } if logged == request => Ok(Confirmed {
            seq,
            epoch: entry.epoch,
            accepted,
            reason,
            checkpoint_size,
        }),
        Event::Admin { request, .. } => Err(ConfirmError::NotThisRequest {
            seq,
            found: match SignedAdminRequest::decode(&request) {
                Ok(r) => format!("another admin request ({})", r.request().action.type_name()),
                Err(_) => "another admin request".into(),
            },
        }),
        other => Err(ConfirmError::NotThisRequest {
            seq,
            found: format!("a {} event", other.type_name()),
        }),
    }
}

/// Checks a served checkpoint note's claimed origin without verifying it (to name the origin
/// when learning a deployment).
pub fn claimed_origin(note: &str) -> Option<String> {
    let body: String = note.split_inclusive('\n').take(3).collect();
    Checkpoint::parse_body(&body)
        .ok()
        .map(|c| c.origin().to_owned())
}

#[cfg(test)]
mod tests {
    use attestplane_verifier::entry::{Entry, KeyId};

    use super::*;
    use crate::cli::testing::deployment;

    #[test]
    fn a_signed_request_verifies_with_the_verifier_and_only_under_its_key() {
        let key = SigningKey::from_bytes(&[11; 32]);
        let t = UnixMillis::from_millis(1_764_870_000_000);
        let action = AdminAction::RevokeServer {
            id: "weather".into(),
        };
        let bytes = sign_admin(action.clone(), &key, &deployment(), t).unwrap();
        let signed = SignedAdminRequest::decode(&bytes).unwrap();
        assert_eq!(
            signed.verify(&[key.verifying_key()]).unwrap(),
            key.verifying_key()
        );
        assert_eq!(signed.request().action, action);
        assert_eq!(signed.request().time, t);
        assert_eq!(signed.request().deployment, deployment());
        assert!(signed.is_fresh_at(t));
        let other = SigningKey::from_bytes(&[12; 32]);
        assert!(signed.verify(&[other.verifying_key()]).is_err());
    }

    #[test]
    fn nonces_are_fresh_per_request() {
        let key = SigningKey::from_bytes(&[13; 32]);
        let t = UnixMillis::from_millis(1);
        let d = deployment();
        let nonce = |bytes: Vec<u8>| SignedAdminRequest::decode(&bytes).unwrap().request().nonce;
        let revoke = || AdminAction::RevokeServer { id: "x".into() };
        let a = nonce(sign_admin(revoke(), &key, &d, t).unwrap());
        let b = nonce(sign_admin(revoke(), &key, &d, t).unwrap());
        assert_ne!(a, b);
        assert_ne!(a, [0; 16]);
    }

    #[test]
    fn an_invalid_action_is_refused_before_signing() {
        let key = SigningKey::from_bytes(&[14; 32]);
        let e = sign_admin(
            AdminAction::RevokeServer { id: String::new() },
            &key,
            &deployment(),
            UnixMillis::from_millis(1),
        );
        assert!(e.is_err());
    }

    fn context(origin: Option<&str>, genesis: Option<&str>) -> ClientContext {
        ClientContext {
            origin: origin.map(str::to_owned),
            genesis: genesis.map(str::to_owned),
            ..crate::cli::testing::context("http://127.0.0.1:9")
        }
    }

    #[test]
    fn nothing_is_signed_without_a_pinned_deployment() {
        let hash = "07".repeat(32);
        assert_eq!(
            pinned_deployment(&context(Some("attestplane.test/log"), Some(&hash))).unwrap(),
            deployment()
        );
        for (origin, genesis) in [
            (None, Some(hash.as_str())),
            (Some("attestplane.test/log"), None),
            (Some("attestplane.test/log"), Some("beef")),
        ] {
            let e = pinned_deployment(&context(origin, genesis)).unwrap_err();
            assert!(matches!(e, CliError::Usage(_)), "{e:?}");
        }
    }

    fn admin_entry(seq: u64, request: Vec<u8>, accepted: bool) -> Vec<u8> {
        let key = SigningKey::from_bytes(&[3; 32]);
        Entry {
            seq,
            prev: EntryHash::ZERO,
            epoch: 2,
            time: UnixMillis::from_millis(1),
            event: Event::Admin {
                request,
                accepted,
                reason: (!accepted).then_some(Reason::UnknownAdminKey {
                    kid: KeyId::from_bytes([1; 32]),
                }),
            },
        }
        .sign(&KeyId::of(&key.verifying_key()), &key)
        .unwrap()
    }

    #[test]
    fn an_entry_confirms_only_the_request_it_records() {
        let key = SigningKey::from_bytes(&[15; 32]);
        let t = UnixMillis::from_millis(1);
        let ours = sign_admin(
            AdminAction::RevokeServer { id: "x".into() },
            &key,
            &deployment(),
            t,
        )
        .unwrap();
        let other = sign_admin(
            AdminAction::RevokeServer { id: "x".into() },
            &key,
            &deployment(),
            t,
        )
        .unwrap();
        let confirmed = check_entry(&admin_entry(9, ours.clone(), true), 9, 10, &ours).unwrap();
        assert_eq!(
            confirmed,
            Confirmed {
                seq: 9,
                epoch: 2,
                accepted: true,
                reason: None,
                checkpoint_size: 10,
            }
        );
        let refused = check_entry(&admin_entry(9, ours.clone(), false), 9, 10, &ours).unwrap();
        assert!(!refused.accepted);
        // Same action, another request (another nonce): not ours.
        assert!(matches!(
            check_entry(&admin_entry(9, other, true), 9, 10, &ours),
            Err(ConfirmError::NotThisRequest { seq: 9, .. })
        ));
        // The entry says it sits elsewhere.
        assert_eq!(
            check_entry(&admin_entry(8, ours.clone(), true), 9, 10, &ours),
            Err(ConfirmError::WrongPosition { seq: 9, found: 8 })
        );
    }

    #[test]
    fn claimed_origin_reads_the_first_line_of_a_note() {
        use base64::Engine as _;
        let root = base64::engine::general_purpose::STANDARD.encode([0u8; 32]);
        let note = format!("attestplane.test/log\n5\n{root}\n\n\u{2014} x AAAA\n");
        assert_eq!(
            claimed_origin(&note).as_deref(),
            Some("attestplane.test/log")
        );
        assert_eq!(claimed_origin("garbage"), None);
    }
}
