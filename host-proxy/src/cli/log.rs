//! `log export` and `log tail`, and the reads of the log the host serves that other commands
//! build on (head, pages of entries, checkpoints, inclusion proofs, one-line summaries).
//!
//! `log export` writes exactly the bytes of the entries, concatenated in sequence order: the
//! RFC 8742 CBOR sequence `attestplane-verify log` reads. It pages `GET /v1/log/entries` 4096
//! entries at a time until the head's size, checks that each page holds the entries asked for
//! (so a short page cannot silently shorten the export), and writes the file under a temporary
//! name, renamed when complete. With `--checkpoint`, it first asks for a fresh signed checkpoint
//! (`POST /v1/log/checkpoint`, falling back to the latest stored one) and exports at least the
//! entries it covers, so the verifier can detect a truncated log.
//!
//! `log tail` decodes entries with the verifier's decoder but verifies nothing (no signature,
//! no hash link): it shows what the host serves. The fetch helpers here verify nothing either;
//! callers that must believe what they fetch (admin confirmations, `deployment`) check it
//! against a checkpoint signed by the attested epoch key. They never print a bearer
//! token or a handle (entries hold neither: only handle ids and the verified identity).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use attestplane_verifier::admin::{AdminAction, SignedAdminRequest};
use attestplane_verifier::cbor::split_sequence;
use attestplane_verifier::entry::{Event, KeyId, SignedEntry};
use attestplane_verifier::log::claimed_size;
use attestplane_verifier::merkle;
use clap::Subcommand;
use ed25519_dalek::VerifyingKey;
use reqwest::Method;
use serde_json::json;

use super::http::{Api, MAX_ENTRIES_PAGE_LEN, MAX_NOTE_LEN};
use super::{CliError, CliResult, ClientContext, clean, print_json, rfc3339};
use crate::api::body::{InclusionProof, LogHead};

/// Entries asked for per page (the API's maximum).
pub const PAGE: u64 = 4096;

/// How often `log tail --follow` polls the head.
const FOLLOW_INTERVAL: Duration = Duration::from_secs(1);

/// `log ...`.
#[derive(Debug, Subcommand)]
pub enum LogCommand {
    /// Write the whole log as the CBOR sequence `attestplane-verify log` reads.
    Export {
        /// The file to write (replaced when the export completes).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Also write a signed checkpoint (a fresh one if the proxy can sign it) covering at
        /// most the exported entries: `attestplane-verify log --checkpoint FILE`.
        #[arg(long, value_name = "FILE")]
        checkpoint: Option<PathBuf>,
    },
    /// Print the last entries, one line each (as served by the host, not verified).
    Tail {
        /// How many of the last entries.
        #[arg(short = 'n', long = "lines", default_value_t = 10)]
        n: u64,
        /// Keep printing new entries as they are appended.
        #[arg(short, long)]
        follow: bool,
    },
}

/// Runs a `log` command.
pub async fn run(command: LogCommand, context: &ClientContext) -> CliResult {
    let api = Api::new(&context.url)?;
    match command {
        LogCommand::Export { out, checkpoint } => {
            export(&api, context, &out, checkpoint.as_deref()).await
        }
        LogCommand::Tail { n, follow } => tail(&api, context, n, follow).await,
    }
}

/// The size of the log the host serves (`GET /v1/log/head`; unverified).
pub async fn head(api: &Api) -> CliResult<u64> {
    let head: LogHead = api.get_json(&["v1", "log", "head"], &[], None).await?;
    Ok(head.size)
}

/// Entries `start..end` as stored; refuses a page that does not hold exactly them.
pub async fn fetch(api: &Api, start: u64, end: u64) -> CliResult<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    let mut next = start;
    while next < end {
        let page_end = end.min(next.saturating_add(PAGE));
        let bytes = api
            .bytes(
                Method::GET,
                &["v1", "log", "entries"],
                &[("start", next.to_string()), ("end", page_end.to_string())],
                MAX_ENTRIES_PAGE_LEN,
            )
            .await?;
        let items = split_sequence(&bytes).map_err(|e| {
            CliError::Failed(format!(
                "the entries served from {next} are not a CBOR sequence: {e}"
            ))
        })?;
        let got = items.len() as u64;
        if got == 0 || got > page_end - next {
            return Err(CliError::Failed(format!(
                "asked for entries {next}..{page_end}, the proxy served {got}"
            )));
        }
        out.extend(items.into_iter().map(<[u8]>::to_vec));
        next = next.saturating_add(got);
    }
    Ok(out)
}

/// A checkpoint the enclave signs now over the durable log (`POST /v1/log/checkpoint`), as
/// served (unverified).
pub async fn fresh_checkpoint(api: &Api) -> CliResult<String> {
    let bytes = api
        .bytes(
            Method::POST,
            &["v1", "log", "checkpoint"],
            &[],
            MAX_NOTE_LEN,
        )
        .await?;
    note_text(bytes)
}

fn note_text(bytes: Vec<u8>) -> CliResult<String> {
    String::from_utf8(bytes)
        .map_err(|_| CliError::Failed("the checkpoint note is not UTF-8 text".into()))
}

async fn fetch_checkpoint(api: &Api) -> CliResult<String> {
    match fresh_checkpoint(api).await {
        Ok(note) => Ok(note),
        Err(e) => {
            eprintln!("warning: no fresh checkpoint ({e}); using the latest stored one");
            note_text(
                api.bytes(Method::GET, &["v1", "log", "checkpoint"], &[], MAX_NOTE_LEN)
                    .await?,
            )
        }
    }
}

/// The inclusion proof the host serves for leaf `index` in the tree of `size` leaves
/// (unverified: check it with `merkle::verify_inclusion` against a verified root).
pub async fn inclusion_proof(api: &Api, index: u64, size: u64) -> CliResult<Vec<merkle::Hash>> {
    // Only the proof is used: the leaf and root are computed by the caller, never taken from
    // the host.
    let answer: InclusionProof = api
        .get_json(
            &["v1", "log", "proof", "inclusion"],
            &[("index", index.to_string()), ("size", size.to_string())],
            None,
        )
        .await?;
    // A proof has at most 64 hashes; more is not a proof (and not worth decoding).
    if answer.proof.len() > 64 {
        return Err(CliError::Failed(format!(
            "the inclusion proof served for entry {index} has {} hashes",
            answer.proof.len()
        )));
    }
    answer
        .proof
        .iter()
        .map(|h| {
            merkle::Hash::from_hex(h).map_err(|e| {
                CliError::Failed(format!(
                    "the inclusion proof served for entry {index} is malformed: {e}"
                ))
            })
        })
        .collect()
}

async fn export(
    api: &Api,
    context: &ClientContext,
    out: &Path,
    checkpoint: Option<&Path>,
) -> CliResult {
    // The checkpoint first: the export must cover every entry it commits to.
    let note = match checkpoint {
        Some(_) => Some(fetch_checkpoint(api).await?),
        None => None,
    };
    let size = head(api).await?;
    if let Some(claimed) = note.as_deref().and_then(claimed_size)
        && claimed > size
    {
        // The checkpoint was taken before the head was read, so the host is serving fewer
        // entries than it signed for: export what it serves; the verifier names the cut.
        eprintln!(
            "warning: the checkpoint covers {claimed} entries but the host serves {size}: \
             attestplane-verify log --checkpoint will report the log as truncated"
        );
    }
    let partial = partial_name(out);
    let io =
        |p: &Path, e: std::io::Error| CliError::Io(format!("cannot write {}: {e}", p.display()));
    let mut file = std::fs::File::create(&partial).map_err(|e| io(&partial, e))?;
    let mut next = 0u64;
    let mut bytes_written = 0u64;
    let result = async {
        while next < size {
            let end = size.min(next.saturating_add(PAGE));
            let entries = fetch(api, next, end).await?;
            for e in &entries {
                file.write_all(e).map_err(|err| io(&partial, err))?;
                bytes_written = bytes_written.saturating_add(e.len() as u64);
            }
            next = next.saturating_add(entries.len() as u64);
        }
        file.sync_all().map_err(|e| io(&partial, e))?;
        Ok::<(), CliError>(())
    }
    .await;
    if let Err(e) = result {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    std::fs::rename(&partial, out).map_err(|e| io(out, e))?;
    if let (Some(path), Some(note)) = (checkpoint, &note) {
        std::fs::write(path, note).map_err(|e| io(path, e))?;
    }
    let checkpoint_size = note.as_deref().and_then(claimed_size);
    if context.json {
        print_json(&json!({
            "entries": size,
            "bytes": bytes_written,
            "out": out.display().to_string(),
            "checkpoint": checkpoint.map(|p| p.display().to_string()),
            "checkpoint_size": checkpoint_size,
        }))
    } else {
        outln!(
            "{size} entries ({bytes_written} bytes) written to {}",
            out.display()
        );
        if let Some(path) = checkpoint {
            outln!(
                "checkpoint (size {}) written to {}",
                checkpoint_size.map_or_else(|| "?".into(), |s| s.to_string()),
                path.display()
            );
        }
        Ok(())
    }
}

fn partial_name(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    out.with_file_name(name)
}

async fn tail(api: &Api, context: &ClientContext, n: u64, follow: bool) -> CliResult {
    let mut size = head(api).await?;
    let mut next = size.saturating_sub(n);
    loop {
        if next < size {
            for (i, bytes) in fetch(api, next, size).await?.iter().enumerate() {
                print_entry(next.saturating_add(i as u64), bytes, context.json)?;
            }
            next = size;
        }
        if !follow {
            return Ok(());
        }
        let _ = std::io::stdout().flush();
        tokio::time::sleep(FOLLOW_INTERVAL).await;
        size = head(api).await?;
        if size < next {
            return Err(CliError::Failed(format!(
                "the log shrank from {next} to {size} entries"
            )));
        }
    }
}

fn print_entry(position: u64, bytes: &[u8], json: bool) -> CliResult {
    let entry = match SignedEntry::decode(bytes) {
        Ok(e) => e.into_entry(),
        Err(e) => {
            let message = format!("undecodable entry: {e}");
            if json {
                outln!("{}", json!({ "seq": position, "error": message }));
            } else {
                outln!("{position:>8}  {}", clean(&message));
            }
            return Ok(());
        }
    };
    let summary = summary(&entry.event);
    let kind = entry.event.type_name();
    if json {
        outln!(
            "{}",
            json!({
                "seq": entry.seq,
                "epoch": entry.epoch,
                "time": rfc3339(entry.time),
                "event": kind,
                "summary": summary,
            })
        );
    } else {
        let mismatch = if entry.seq == position {
            String::new()
        } else {
            format!(" [served at position {position}]")
        };
        outln!(
            "{:>8}  epoch {:<3} {}  {:<12} {}{mismatch}",
            entry.seq,
            entry.epoch,
            rfc3339(entry.time),
            kind,
            clean(&summary)
        );
    }
    Ok(())
}

/// A one-line summary of an event. Holds no secret: entries carry none.
pub fn summary(event: &Event) -> String {
    match event {
        Event::EpochStart { attestation } => {
            format!(
                "enclave boot, attestation document of {} bytes",
                attestation.len()
            )
        }
        Event::Genesis {
            admin_keys,
            host_chosen,
        } => format!(
            "{}{} admin key(s): {}",
            if *host_chosen {
                "HOST-CHOSEN (insecure development genesis) "
            } else {
                ""
            },
            admin_keys.len(),
            admin_keys
                .iter()
                .map(|k| match VerifyingKey::from_bytes(k) {
                    Ok(key) => short_kid(KeyId::of(&key).as_bytes()),
                    Err(_) => format!("invalid key {}", short(k)),
                })
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Event::Admin {
            request,
            accepted,
            reason,
        } => {
            let what = match SignedAdminRequest::decode(request) {
                Ok(r) => {
                    let action = &r.request().action;
                    match subject_of(action) {
                        Some(s) => format!(
                            "{} {s} by {}",
                            action.type_name(),
                            short_kid(r.kid().as_bytes())
                        ),
                        None => format!(
                            "{} by {}",
                            action.type_name(),
                            short_kid(r.kid().as_bytes())
                        ),
                    }
                }
                Err(e) => format!("undecodable request ({e})"),
            };
            if *accepted {
                format!("accepted {what}")
            } else {
                format!(
                    "REFUSED {what}: {}",
                    reason
                        .as_ref()
                        .map_or("no reason".into(), ToString::to_string)
                )
            }
        }
        Event::Attestation(a) => {
            if a.verified {
                format!(
                    "server {} verified, measurement {}",
                    a.server,
                    a.measurement.map(|m| short48(&m)).unwrap_or_default()
                )
            } else {
                format!(
                    "server {} REFUSED: {}",
                    a.server,
                    a.reason
                        .as_ref()
                        .map_or("no reason".into(), ToString::to_string)
                )
            }
        }
        Event::Decision(d) => {
            let tool = d
                .tool
                .as_deref()
                .map(|t| format!(" tool {t}"))
                .unwrap_or_default();
            let verdict = if d.allowed {
                "allowed".to_owned()
            } else {
                format!(
                    "DENIED: {}",
                    d.reason
                        .as_ref()
                        .map_or("no reason".into(), ToString::to_string)
                )
            };
            format!(
                "{} by {} (user {}, tenant {}) on {}{tool}: {verdict}",
                d.action, d.principal.agent, d.principal.user, d.principal.tenant, d.server
            )
        }
        Event::Discovery { principal, servers } => format!(
            "discover by {} (tenant {}): {} server(s)",
            principal.agent,
            principal.tenant,
            servers.len()
        ),
        Event::Checkpoint { size, root } => format!("size {size}, root {}", short(root)),
        Event::CallResult { call, outcome, .. } => format!("call {call}: {}", clean(outcome)),
        Event::ToolDrift { server, drift } => format!(
            "server {} tools drifted from their pins: {}",
            clean(server),
            drift
                .iter()
                .map(|d| format!("{} {}", clean(&d.kind), clean(&d.name)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => other.type_name().to_owned(),
    }
}

fn short(b: &[u8; 32]) -> String {
    hex::encode(b.get(..8).unwrap_or_default())
}

fn short_kid(b: &[u8; 32]) -> String {
    format!("key {}", short(b))
}

fn short48(b: &[u8; 48]) -> String {
    hex::encode(b.get(..8).unwrap_or_default())
}

/// What an action is about, for output.
pub fn subject_of(action: &AdminAction) -> Option<String> {
    match action {
        AdminAction::RegisterServer(s) | AdminAction::UpdateServer(s) => Some(s.id.clone()),
        AdminAction::RevokeServer { id } => Some(id.clone()),
        AdminAction::SetIdentityProvider(p) => Some(p.issuer.clone()),
        AdminAction::RemoveIdentityProvider { issuer } => Some(issuer.clone()),
        AdminAction::RotateAdminKeys { keys } => Some(format!("{} keys", keys.len())),
        AdminAction::SetPolicy { text } => Some(format!("{} bytes", text.len())),
        AdminAction::AllowImage { pcrs } => pcrs
            .get(&attestplane_verifier::attestation::PcrIndex::IMAGE)
            .map(|p| format!("PCR0 {}", p.0.to_hex())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::SigningKey;

    use super::*;
    use crate::cli::testing::signed_entry as entry;

    #[test]
    fn splits_a_sequence_and_refuses_a_truncated_tail() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let a = entry(
            0,
            Event::Checkpoint {
                size: 0,
                root: [0; 32],
            },
            &key,
        );
        let b = entry(
            1,
            Event::Checkpoint {
                size: 1,
                root: [1; 32],
            },
            &key,
        );
        let seq = [a.clone(), b.clone()].concat();
        let items = split_sequence(&seq).unwrap();
        assert_eq!(items, [a.as_slice(), b.as_slice()]);
        assert!(split_sequence(&seq[..seq.len() - 1]).is_err());
        assert!(split_sequence(&[]).unwrap().is_empty());
    }

    /// A fake proxy serving `size` one-byte CBOR items (`i % 24` at position `i`), with pages
    /// `short_by` items short or `extra` items too long; no fresh checkpoint, a stored one.
    #[derive(Clone, Copy)]
    struct Fake {
        size: u64,
        short_by: u64,
        extra: u64,
    }

    #[derive(serde::Deserialize)]
    struct Range {
        start: u64,
        end: Option<u64>,
    }

    fn item(i: u64) -> u8 {
        (i % 24) as u8
    }

    fn note(size: u64) -> String {
        use base64::Engine as _;
        let root = base64::engine::general_purpose::STANDARD.encode([0u8; 32]);
        format!("fake.test/log\n{size}\n{root}\n\n\u{2014} fake AAAA\n")
    }

    async fn serve(fake: Fake) -> ClientContext {
        use axum::extract::{Query, State};
        use axum::http::StatusCode;
        use axum::routing::get;
        async fn head(State(f): State<Fake>) -> axum::Json<serde_json::Value> {
            axum::Json(json!({ "size": f.size, "head": null }))
        }
        async fn entries(State(f): State<Fake>, Query(r): Query<Range>) -> Vec<u8> {
            let end = r.end.unwrap_or(u64::MAX).min(r.start + PAGE).min(f.size);
            let count = (end - r.start).saturating_sub(f.short_by).max(1) + f.extra;
            (r.start..r.start + count).map(item).collect()
        }
        async fn fresh() -> (StatusCode, axum::Json<serde_json::Value>) {
            let e =
                json!({ "error": { "code": "not_ready", "message": "entries await durability" } });
            (StatusCode::SERVICE_UNAVAILABLE, axum::Json(e))
        }
        async fn stored(State(f): State<Fake>) -> String {
            note(f.size)
        }
        let app = axum::Router::new()
            .route("/v1/log/head", get(head))
            .route("/v1/log/entries", get(entries))
            .route("/v1/log/checkpoint", get(stored).post(fresh))
            .with_state(fake);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        crate::cli::testing::context(&format!("http://{addr}"))
    }

    async fn export_from(fake: Fake) -> (CliResult, tempfile::TempDir) {
        let context = serve(fake).await;
        let dir = tempfile::tempdir().unwrap();
        let command = LogCommand::Export {
            out: dir.path().join("log.cbor"),
            checkpoint: Some(dir.path().join("checkpoint.txt")),
        };
        (run(command, &context).await, dir)
    }

    #[tokio::test]
    async fn export_pages_through_the_log_and_writes_exactly_the_served_bytes() {
        // Two pages (4096 + 904), and pages served short, which the export completes.
        for short_by in [0, 300] {
            let fake = Fake {
                size: 5000,
                short_by,
                extra: 0,
            };
            let (result, dir) = export_from(fake).await;
            result.unwrap();
            let written = std::fs::read(dir.path().join("log.cbor")).unwrap();
            let expected: Vec<u8> = (0..5000).map(item).collect();
            assert_eq!(written, expected, "short_by {short_by}");
            // No fresh checkpoint (503): the stored one, verbatim.
            let cp = std::fs::read_to_string(dir.path().join("checkpoint.txt")).unwrap();
            assert_eq!(cp, note(5000));
            assert!(!dir.path().join("log.cbor.partial").exists());
        }
    }

    #[tokio::test]
    async fn export_refuses_a_page_with_more_entries_than_asked_and_leaves_no_file() {
        let (result, dir) = export_from(Fake {
            size: 5000,
            short_by: 0,
            extra: 1,
        })
        .await;
        let e = result.unwrap_err();
        assert!(matches!(e, CliError::Failed(_)), "{e:?}");
        assert!(!dir.path().join("log.cbor").exists());
        assert!(!dir.path().join("log.cbor.partial").exists());
    }

    #[test]
    fn partial_name_is_next_to_the_output() {
        assert_eq!(
            partial_name(Path::new("/tmp/x/log.cbor")),
            Path::new("/tmp/x/log.cbor.partial")
        );
    }
}
