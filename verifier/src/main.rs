//! `attestplane-verify`: the auditor's command-line verifier.
//!
//! Reads files, hands their bytes to the `attestplane_verifier` library, and prints what was
//! verified. It trusts nothing on the host that produced the files and uses no network.
//!
//! Exit codes are a contract: 0 when everything verified, 1 when something failed
//! verification, 2 on a usage or I/O error. `--json` prints one JSON object on stdout either way.
//!
//! This is the only place in the crate that reads the clock, and only when a subcommand's
//! `--at` is left to its default of "now".

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::{Context, anyhow, bail};
use attestplane_verifier::UnixMillis;
use attestplane_verifier::attestation::{
    Expectations, Pcr, PcrIndex, TrustAnchor, VerifyAt, verify_attestation,
};
use attestplane_verifier::handle::{HandleExpectations, Jwks, verify_handle};
use attestplane_verifier::log::LogPolicy;
use attestplane_verifier::replay::{EntryReader, ReadError, Replay, ReplayError, ReplayedLog};
use base64::Engine;
use clap::{Args, Parser, Subcommand};
use serde_json::json;

/// Verify Attestplane attestation documents, logs and handles without trusting the host.
#[derive(Debug, Parser)]
#[command(name = "attestplane-verify", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Verify an AWS Nitro attestation document (raw COSE bytes or base64 text).
    Attestation(AttestationArgs),
    /// Verify an exported log: an RFC 8742 CBOR sequence of entries in sequence order.
    Log(LogArgs),
    /// Verify a server handle (a JWT) against a JWKS.
    Handle(HandleArgs),
    /// Measure an enclave image file (EIF): print PCR0, PCR1, PCR2 (and PCR8 if signed).
    Eif(EifArgs),
}

#[derive(Debug, Args)]
struct PcrArgs {
    /// An expected PCR value, as INDEX=HEX (repeatable).
    #[arg(long = "pcr", value_name = "N=HEX", value_parser = attestplane_verifier::attestation::parse_pcr_assignment)]
    pcr: Vec<(PcrIndex, Pcr)>,
    /// A JSON file of expected PCRs: {"PCR0": "hex", ...} or {"0": "hex", ...}
    /// (the shape `attestplane-verify eif --json` and nitro-cli print).
    #[arg(long = "pcrs", value_name = "FILE")]
    pcrs_file: Option<PathBuf>,
    /// Accept an enclave running in debug mode (PCR0/1/2 all zero). Never in production.
    #[arg(long)]
    allow_debug: bool,
    /// The root certificate (PEM) to pin instead of the built-in AWS Nitro Enclaves Root G1.
    #[arg(long, value_name = "PEM")]
    root: Option<PathBuf>,
}

impl PcrArgs {
    fn expected(&self) -> anyhow::Result<BTreeMap<PcrIndex, Pcr>> {
        let mut out = match &self.pcrs_file {
            Some(path) => attestplane_verifier::attestation::read_pcrs_file(path)?,
            None => BTreeMap::new(),
        };
        for (i, p) in &self.pcr {
            out.insert(*i, *p);
        }
        Ok(out)
    }

    fn anchor(&self) -> anyhow::Result<TrustAnchor> {
        match &self.root {
            None => Ok(TrustAnchor::aws_nitro_root_g1()),
            Some(p) => TrustAnchor::from_pem(&read(p)?)
                .map_err(|e| anyhow!("{}: not a usable root certificate: {e}", p.display())),
        }
    }
}

#[derive(Debug, Args)]
struct AttestationArgs {
    /// The document: raw COSE_Sign1 bytes or their base64.
    file: PathBuf,
    /// Verify at this instant (RFC 3339 or Unix milliseconds), or at the document's own signed
    /// timestamp (`document`: for archived documents).
    #[arg(long, value_name = "TIME|document")]
    at: String,
    #[command(flatten)]
    pcrs: PcrArgs,
    /// The nonce the document must carry (hex).
    #[arg(long, value_name = "HEX")]
    nonce: Option<String>,
    /// The public key the document must carry (hex).
    #[arg(long, value_name = "HEX")]
    public_key: Option<String>,
    /// The user data the document must carry (hex).
    #[arg(long, value_name = "HEX")]
    user_data: Option<String>,
    /// Refuse a document older than this relative to --at (e.g. `5m`, `30s`).
    #[arg(long, value_name = "DURATION")]
    max_age: Option<humantime::Duration>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct LogArgs {
    /// The exported log (RFC 8742 CBOR sequence of COSE_Sign1 entries).
    file: PathBuf,
    #[command(flatten)]
    pcrs: PcrArgs,
    /// A signed checkpoint held outside the host: detects a truncated tail.
    #[arg(long, value_name = "FILE")]
    checkpoint: Option<PathBuf>,
    /// The verification instant (RFC 3339 or Unix ms); default now. No entry may be later.
    #[arg(long, value_name = "TIME")]
    at: Option<String>,
    /// The root MCP servers' attestation documents chain to, for re-checking the logged server
    /// attestations (default: the AWS Nitro root; the local dev stack's servers use the mock's).
    #[arg(long, value_name = "PEM")]
    server_root: Option<PathBuf>,
    /// An admin key the log's genesis must name (hex Ed25519 public key; repeatable): the keys
    /// pinned in the control plane's image. A log whose genesis names other keys, or whose
    /// genesis keys the host chose, fails.
    #[arg(long = "genesis-admin-key", value_name = "HEX")]
    genesis_admin_keys: Vec<String>,
    /// A trust file (JSON) naming what this auditor pins: {"pcrs": {"PCR0": hex, ...},
    /// "root": PEM path, "server_root": PEM path, "genesis_admin_keys": [hex, ...]}; paths are
    /// relative to the file. Flags given on the command line take precedence.
    #[arg(long, value_name = "FILE")]
    trust: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// What an auditor pins, in one file (`attestplane-verify log --trust FILE`).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TrustFile {
    /// Expected PCRs of the control plane's image: {"PCR0": hex, ...} or {"0": hex, ...}.
    #[serde(default)]
    pcrs: BTreeMap<String, String>,
    /// PEM root of the control plane's attestation documents (default: AWS's).
    root: Option<PathBuf>,
    /// PEM root of the MCP servers' attestation documents (default: AWS's).
    server_root: Option<PathBuf>,
    /// The genesis admin keys pinned in the image (hex).
    #[serde(default)]
    genesis_admin_keys: Vec<String>,
}

/// The longest trust file read.
const MAX_TRUST_FILE_LEN: usize = 64 * 1024;

impl TrustFile {
    fn read(path: &Path) -> anyhow::Result<Self> {
        let bytes = read(path)?;
        if bytes.len() > MAX_TRUST_FILE_LEN {
            bail!(
                "{}: a trust file is at most {MAX_TRUST_FILE_LEN} bytes",
                path.display()
            );
        }
        let mut t: TrustFile = serde_json::from_slice(&bytes)
            .with_context(|| format!("{}: not a trust file", path.display()))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        t.root = t.root.map(|p| dir.join(p));
        t.server_root = t.server_root.map(|p| dir.join(p));
        Ok(t)
    }

    fn pcrs(&self) -> anyhow::Result<BTreeMap<PcrIndex, Pcr>> {
        let mut out = BTreeMap::new();
        for (k, v) in &self.pcrs {
            let idx = k.trim_start_matches("PCR").trim_start_matches("pcr");
            let idx: PcrIndex = idx
                .parse()
                .map_err(|e| anyhow!("trust file: bad PCR index {k:?}: {e}"))?;
            let pcr =
                Pcr::from_hex(v).map_err(|e| anyhow!("trust file: bad PCR{idx} value: {e}"))?;
            out.insert(idx, pcr);
        }
        Ok(out)
    }
}

fn parse_admin_key(s: &str) -> anyhow::Result<[u8; 32]> {
    let mut key = [0u8; 32];
    hex::decode_to_slice(s.trim(), &mut key)
        .map_err(|e| anyhow!("genesis admin key {s:?}: expected 64 hex digits: {e}"))?;
    ed25519_dalek::VerifyingKey::from_bytes(&key)
        .map_err(|_| anyhow!("genesis admin key {s:?} is not an Ed25519 public key"))?;
    Ok(key)
}

/// An admin key's fingerprint: its key id (SHA-256 of the raw key), as admin requests name it.
fn fingerprint(key: &[u8; 32]) -> String {
    ed25519_dalek::VerifyingKey::from_bytes(key).map_or_else(
        |_| format!("(not a key) {}", hex::encode(key)),
        |k| attestplane_verifier::entry::KeyId::of(&k).to_hex(),
    )
}

/// Why a log did not verify: its bytes are not a sequence of entries, or the replay refused.
#[derive(Debug, thiserror::Error)]
enum LogFailure {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(transparent)]
    Replay(#[from] ReplayError),
}

#[derive(Debug, Args)]
struct HandleArgs {
    /// A file holding the JWT.
    token: PathBuf,
    /// The JWKS to check it against (as served at /.well-known/jwks.json).
    #[arg(long, value_name = "FILE")]
    jwks: PathBuf,
    /// The verification instant (RFC 3339 or Unix ms).
    #[arg(long, value_name = "TIME")]
    at: String,
    /// The issuer the handle must name.
    #[arg(long)]
    issuer: Option<String>,
    /// The audience (server resource URI) the handle must name.
    #[arg(long)]
    audience: Option<String>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct EifArgs {
    /// The enclave image file.
    file: PathBuf,
    /// Print one JSON object: the PCRs as top-level "PCR0".."PCR2" (and "PCR8") keys, usable
    /// as-is with `--pcrs FILE`, and the image's layout under "eif".
    #[arg(long)]
    json: bool,
}

/// A verification that ran to a verdict.
enum Verdict {
    Verified,
    Failed,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = match &cli.command {
        Command::Attestation(a) => a.json,
        Command::Log(a) => a.json,
        Command::Handle(a) => a.json,
        Command::Eif(a) => a.json,
    };
    let result = match cli.command {
        Command::Attestation(a) => attestation(a),
        Command::Log(a) => log(a),
        Command::Handle(a) => handle(a),
        Command::Eif(a) => eif(a),
    };
    match result {
        Ok(Verdict::Verified) => ExitCode::SUCCESS,
        Ok(Verdict::Failed) => ExitCode::from(1),
        Err(e) => {
            if json {
                println!(
                    "{}",
                    json!({ "verified": false, "usage_error": format!("{e:#}") })
                );
            }
            eprintln!("attestplane-verify: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

fn parse_time(s: &str) -> anyhow::Result<UnixMillis> {
    if let Ok(ms) = s.parse::<u64>() {
        return Ok(UnixMillis::from_millis(ms));
    }
    let t = humantime::parse_rfc3339_weak(s)
        .map_err(|e| anyhow!("bad time {s:?} (want RFC 3339 or Unix milliseconds): {e}"))?;
    Ok(UnixMillis::from_system_time(t))
}

fn now() -> UnixMillis {
    UnixMillis::from_system_time(SystemTime::now())
}

fn parse_hex(what: &str, s: &str) -> anyhow::Result<Vec<u8>> {
    hex::decode(s.trim()).map_err(|e| anyhow!("bad {what} hex: {e}"))
}

/// Raw COSE bytes start with a CBOR array (0x84) or a tag; anything that is all base64
/// characters is decoded.
fn cose_or_base64(bytes: Vec<u8>) -> Vec<u8> {
    let text: Vec<u8> = bytes
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    let looks_b64 = !text.is_empty()
        && text
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b'-' | b'_'));
    if looks_b64 {
        let engines = [
            base64::engine::general_purpose::STANDARD,
            base64::engine::general_purpose::URL_SAFE,
        ];
        for e in engines {
            if let Ok(raw) = e.decode(&text) {
                return raw;
            }
        }
        for e in [
            base64::engine::general_purpose::STANDARD_NO_PAD,
            base64::engine::general_purpose::URL_SAFE_NO_PAD,
        ] {
            if let Ok(raw) = e.decode(&text) {
                return raw;
            }
        }
    }
    bytes
}

fn attestation(a: AttestationArgs) -> anyhow::Result<Verdict> {
    let doc = cose_or_base64(read(&a.file)?);
    let anchor = a.pcrs.anchor()?;
    let at = if a.at == "document" {
        VerifyAt::DocumentTimestamp
    } else {
        VerifyAt::Instant(parse_time(&a.at)?)
    };
    let expect = Expectations {
        pcrs: a.pcrs.expected()?,
        allow_debug: a.pcrs.allow_debug,
        nonce: a
            .nonce
            .as_deref()
            .map(|s| parse_hex("nonce", s))
            .transpose()?,
        public_key: a
            .public_key
            .as_deref()
            .map(|s| parse_hex("public key", s))
            .transpose()?,
        user_data: a
            .user_data
            .as_deref()
            .map(|s| parse_hex("user data", s))
            .transpose()?,
        max_age_ms: a
            .max_age
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
    };
    match verify_attestation(&doc, &anchor, &expect, at) {
        Ok(v) => {
            if a.json {
                println!("{}", json!({ "verified": true, "attestation": v }));
            } else {
                println!("VERIFIED attestation document {}", a.file.display());
                println!("  module id:   {}", v.module_id());
                println!(
                    "  timestamp:   {} ({} ms)",
                    v.timestamp(),
                    v.timestamp().as_millis()
                );
                println!("  verified at: {}", v.verified_at());
                println!(
                    "  mode:        {}",
                    if v.is_debug() { "DEBUG" } else { "production" }
                );
                println!(
                    "  chain:       {} certificates to the pinned root",
                    v.chain_len()
                );
                for (i, p) in v.pcrs() {
                    let mark = if expect.pcrs.contains_key(i) {
                        "  (matches expected)"
                    } else {
                        ""
                    };
                    println!("  {:<6}{}{mark}", format!("PCR{i}"), p.to_hex());
                }
                for c in v.checks() {
                    println!("  checked: {c}");
                }
                if expect.pcrs.is_empty() {
                    println!("  note: no --pcr given, so no measurement was compared");
                }
            }
            Ok(Verdict::Verified)
        }
        Err(e) => {
            if a.json {
                println!("{}", json!({ "verified": false, "error": e.to_string() }));
            } else {
                println!("FAILED attestation document {}: {e}", a.file.display());
            }
            Ok(Verdict::Failed)
        }
    }
}

fn log(a: LogArgs) -> anyhow::Result<Verdict> {
    // Streamed: one round of entries in memory at a time, never the whole file.
    let file = std::fs::File::open(&a.file)
        .with_context(|| format!("cannot read {}", a.file.display()))?;
    let trust = match &a.trust {
        Some(p) => TrustFile::read(p)?,
        None => TrustFile::default(),
    };
    let mut pcrs = trust.pcrs()?;
    pcrs.extend(a.pcrs.expected()?);
    if pcrs.is_empty() {
        bail!(
            "give the control plane's expected measurements with --pcr N=HEX, --pcrs FILE or \
             --trust FILE"
        );
    }
    let anchor = match (&a.pcrs.root, &trust.root) {
        (None, Some(p)) => TrustAnchor::from_pem(&read(p)?)
            .map_err(|e| anyhow!("{}: not a usable root certificate: {e}", p.display()))?,
        _ => a.pcrs.anchor()?,
    };
    let pinned_keys = if a.genesis_admin_keys.is_empty() {
        &trust.genesis_admin_keys
    } else {
        &a.genesis_admin_keys
    }
    .iter()
    .map(|k| parse_admin_key(k))
    .collect::<anyhow::Result<Vec<_>>>()?;
    let mut policy = LogPolicy::new(anchor, pcrs);
    policy.allow_debug = a.pcrs.allow_debug;
    let at = match &a.at {
        Some(s) => parse_time(s)?,
        None => now(),
    };
    let checkpoint = a
        .checkpoint
        .as_deref()
        .map(|p| {
            read(p).and_then(|b| {
                String::from_utf8(b).map_err(|_| anyhow!("{}: not UTF-8 text", p.display()))
            })
        })
        .transpose()?;
    let server_anchor = match a.server_root.as_ref().or(trust.server_root.as_ref()) {
        None => TrustAnchor::aws_nitro_root_g1(),
        Some(p) => TrustAnchor::from_pem(&read(p)?)
            .map_err(|e| anyhow!("{}: not a usable root certificate: {e}", p.display()))?,
    };
    // Verification and replay in one loop: every verified entry is folded into the state,
    // which re-checks every admin change, server attestation and policy decision the log
    // records. Three stages overlap: a reader thread splits the next round off the file while
    // the replay verifies one round (signatures on all cores) and its fold thread folds the
    // rounds before it (in order, its policy evaluations on all cores); see `PipelinedReplay`.
    let (rounds_in, rounds) = std::sync::mpsc::sync_channel::<Result<Vec<Vec<u8>>, ReadError>>(1);
    let result = std::thread::scope(|scope| {
        scope.spawn(move || {
            let mut reader = EntryReader::new(file);
            loop {
                // Half rounds: the round being read, the one waiting for the replay, the one
                // being verified and the fold's (waiting and being folded) hold about what
                // two and a half whole rounds would.
                let round = reader.next_round(attestplane_verifier::log::ROUND / 2);
                let last = !matches!(&round, Ok(r) if !r.is_empty());
                // A closed channel means the replay stopped: stop reading.
                if rounds_in.send(round).is_err() || last {
                    break;
                }
            }
        });
        let result = (|| -> Result<ReplayedLog, LogFailure> {
            let mut replay = Replay::new(policy, at, server_anchor).map_err(ReplayError::from)?;
            if !pinned_keys.is_empty() {
                replay = replay.expect_genesis_keys(pinned_keys.clone());
            }
            // Admin requests must name the log's origin: the checkpoint's (verified at the end).
            if let Some(origin) = checkpoint.as_deref().and_then(|n| n.lines().next()) {
                replay = replay.with_origin(origin);
            }
            let mut replay = replay.pipelined();
            if let Some(size) = checkpoint
                .as_deref()
                .and_then(attestplane_verifier::log::claimed_size)
            {
                replay.remember_root_at(size);
            }
            loop {
                // The reader sends until the end of the file (an empty round) or its first
                // error; a reader gone without either is a failure, never the end of the log.
                let round = rounds.recv().unwrap_or_else(|_| {
                    Err(ReadError::Io(std::io::Error::other("the reader stopped")))
                })?;
                if round.is_empty() {
                    break;
                }
                replay.push_round(&round)?;
            }
            Ok(match &checkpoint {
                Some(note) => replay.finish_with_checkpoint(note)?,
                None => replay.finish()?,
            })
        })();
        // Unblocks the reader if the replay stopped early.
        drop(rounds);
        result
    });
    let result = match result {
        Err(LogFailure::Read(ReadError::Io(e))) => {
            return Err(anyhow!("cannot read {}: {e}", a.file.display()));
        }
        Err(LogFailure::Read(e)) => Err(e.to_string()),
        Ok(r) => Ok(Ok(r)),
        Err(LogFailure::Replay(e)) => Ok(Err(e)),
    };
    let result = match result {
        Ok(r) => r,
        Err(e) => {
            if a.json {
                println!(
                    "{}",
                    json!({ "verified": false, "error": format!("{e:#}") })
                );
            } else {
                println!("FAILED log {}: {e:#}", a.file.display());
            }
            return Ok(Verdict::Failed);
        }
    };
    match result {
        Ok(ReplayedLog {
            log,
            state,
            events,
            memo,
        }) => {
            let state = state.snapshot();
            let fingerprints = |keys: &[String]| -> Vec<String> {
                keys.iter()
                    .filter_map(|k| parse_admin_key(k).ok())
                    .map(|k| fingerprint(&k))
                    .collect()
            };
            let at_genesis = fingerprints(&state.genesis_admin_keys);
            let at_end = fingerprints(&state.admin_keys);
            if !pinned_keys.is_empty() && at_genesis.is_empty() {
                let error = "the log has no genesis entry to check the pinned admin keys against";
                if a.json {
                    println!("{}", json!({ "verified": false, "error": error }));
                } else {
                    println!("FAILED log {}: {error}", a.file.display());
                }
                return Ok(Verdict::Failed);
            }
            let genesis = if !pinned_keys.is_empty() {
                "pinned by this auditor"
            } else if state.genesis_host_chosen {
                "CHOSEN BY THE HOST (an enclave run with --insecure-host-chosen-genesis)"
            } else {
                "pinned in the image, not checked: no --genesis-admin-key given"
            };
            if a.json {
                println!(
                    "{}",
                    json!({
                        "verified": true,
                        "log": log,
                        "state": state,
                        "events": events,
                        "cedar_requests": {
                            "evaluated": memo.misses,
                            "answered_from_memo": memo.hits,
                        },
                        "admin_keys": {
                            "at_genesis": at_genesis,
                            "at_end": at_end,
                            "genesis_host_chosen": state.genesis_host_chosen,
                            "genesis_pinned_by_auditor": !pinned_keys.is_empty(),
                        },
                    })
                );
            } else {
                println!("VERIFIED log {}", a.file.display());
                println!("  entries:     {}", log.size());
                if let Some(h) = log.head() {
                    println!("  head:        {h}");
                }
                println!("  merkle root: {}", log.root());
                if let (Some(f), Some(l)) = (log.first_time(), log.last_time()) {
                    println!("  time span:   {f} .. {l}");
                }
                for e in log.epochs() {
                    println!(
                        "  epoch {}: entries {}..{} key {} attested by {} at {}{}",
                        e.epoch,
                        e.start_seq,
                        e.start_seq + e.entries,
                        e.kid,
                        e.module_id,
                        e.attested_at,
                        if e.debug { " (DEBUG MODE)" } else { "" }
                    );
                }
                let counts: Vec<String> = events.iter().map(|(k, v)| format!("{k} {v}")).collect();
                println!("  events:      {}", counts.join(", "));
                println!("  admin keys at genesis ({genesis}):");
                for k in &at_genesis {
                    println!("    {k}");
                }
                println!("  admin keys at the end of the log:");
                for k in &at_end {
                    println!("    {k}");
                }
                println!(
                    "  replayed:    every admin change, attestation and decision re-checked; \
                     {} admin keys, {} servers, policy of {} bytes, {} identity providers",
                    state.admin_keys.len(),
                    state.servers.len(),
                    state.policy.len(),
                    state.identity_providers.len()
                );
                println!(
                    "  cedar:       {} requests evaluated, {} more answered from the replay's \
                     memo of earlier answers",
                    memo.misses, memo.hits
                );
                if checkpoint.is_some() {
                    println!("  checkpoint:  signed by an epoch key and consistent with the log");
                } else {
                    println!("  note: no --checkpoint given, so a cut-off tail cannot be detected");
                }
            }
            Ok(Verdict::Verified)
        }
        Err(e) => {
            if a.json {
                println!(
                    "{}",
                    json!({
                        "verified": false,
                        "first_bad_seq": e.seq(),
                        "error": e.to_string(),
                        "replay_failure": failure_detail(&e),
                    })
                );
            } else {
                match e.seq() {
                    Some(seq) => println!(
                        "FAILED log {}: first bad entry {seq}: {e}",
                        a.file.display()
                    ),
                    None => println!("FAILED log {}: {e}", a.file.display()),
                }
            }
            Ok(Verdict::Failed)
        }
    }
}

/// A replay failure's fields for `--json` (kind, seq, logged and replayed values, reason codes).
fn failure_detail(e: &ReplayError) -> serde_json::Value {
    match e {
        ReplayError::State(e) => serde_json::to_value(e).unwrap_or_default(),
        ReplayError::HostChosenGenesis { seq } => {
            json!({ "kind": "host_chosen_genesis", "seq": seq })
        }
        ReplayError::GenesisKeysDiffer {
            seq,
            expected,
            found,
        } => json!({
            "kind": "genesis_keys_differ",
            "seq": seq,
            "expected": expected.iter().map(hex::encode).collect::<Vec<_>>(),
            "found": found.iter().map(hex::encode).collect::<Vec<_>>(),
        }),
        _ => serde_json::Value::Null,
    }
}

fn handle(a: HandleArgs) -> anyhow::Result<Verdict> {
    let token = String::from_utf8(read(&a.token)?)
        .map_err(|_| anyhow!("{}: not UTF-8 text", a.token.display()))?;
    let jwks = Jwks::parse(&read(&a.jwks)?)
        .map_err(|e| anyhow!("{}: not a usable JWKS: {e}", a.jwks.display()))?;
    let at = parse_time(&a.at)?;
    let expect = HandleExpectations {
        issuer: a.issuer,
        audience: a.audience,
        ..HandleExpectations::default()
    };
    match verify_handle(token.trim(), &jwks, &expect, at) {
        Ok(h) => {
            if a.json {
                println!(
                    "{}",
                    json!({ "verified": true, "kid": h.kid(), "claims": h.claims() })
                );
            } else {
                let c = h.claims();
                println!("VERIFIED handle {}", a.token.display());
                println!("  issuer:      {}", c.iss);
                println!("  agent:       {}", c.sub);
                println!("  audience:    {}", c.aud);
                println!("  tenant:      {}", c.tenant);
                println!("  tools:       {}", c.tools.join(", "));
                println!("  measurement: {}", c.measurement);
                println!("  log entry:   {}", c.seq);
                println!("  expires:     {}", UnixMillis::from_secs(c.exp));
            }
            Ok(Verdict::Verified)
        }
        Err(e) => {
            if a.json {
                println!("{}", json!({ "verified": false, "error": e.to_string() }));
            } else {
                println!("FAILED handle {}: {e}", a.token.display());
            }
            Ok(Verdict::Failed)
        }
    }
}

/// Measures an EIF. Exit 0 with the PCRs, 1 when the image is malformed, 2 on I/O errors.
fn eif(a: EifArgs) -> anyhow::Result<Verdict> {
    use attestplane_verifier::eif::{EifError, MAX_EIF_LEN, measure_eif};
    let len = std::fs::metadata(&a.file)
        .with_context(|| format!("cannot read {}", a.file.display()))?
        .len();
    let measured = if len > MAX_EIF_LEN {
        Err(EifError::TooLarge {
            len,
            max: MAX_EIF_LEN,
        })
    } else {
        measure_eif(&read(&a.file)?)
    };
    let m = match measured {
        Ok(m) => m,
        Err(e) => {
            if a.json {
                println!("{}", json!({ "valid": false, "error": e.to_string() }));
            } else {
                println!("FAILED eif {}: {e}", a.file.display());
            }
            return Ok(Verdict::Failed);
        }
    };
    if a.json {
        let mut out = m.to_pcrs_json();
        if let Some(obj) = out.as_object_mut() {
            obj.insert("valid".into(), json!(true));
            obj.insert("eif".into(), json!(m));
        }
        println!("{out}");
    } else {
        println!("MEASURED eif {}", a.file.display());
        println!(
            "  format:   version {}, {}, crc32 {:#010x} {}",
            m.version,
            m.arch,
            m.crc32,
            if m.crc_checked {
                "(checked)"
            } else {
                "(none before version 2)"
            }
        );
        println!(
            "  defaults: {} cpus, {} memory",
            m.default_cpus, m.default_mem
        );
        println!("  cmdline:  {}", m.cmdline.escape_debug());
        for (i, s) in m.sections.iter().enumerate() {
            println!(
                "  section {i}: {:<9} {:>12} bytes at byte {}",
                s.kind.to_string(),
                s.size,
                s.offset
            );
        }
        println!("  PCR0  {}", m.pcr0);
        println!("  PCR1  {}", m.pcr1);
        println!("  PCR2  {}", m.pcr2);
        match m.pcr8 {
            Some(p) => println!("  PCR8  {p}"),
            None => println!("  note: unsigned image, so no PCR8"),
        }
    }
    Ok(Verdict::Verified)
}
