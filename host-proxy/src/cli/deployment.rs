//! `deployment show|pin`: learn which log admin requests are for, once, from the enclave's own
//! word, and pin it in the client configuration.
//!
//! A deployment is the log's origin and the hash of its genesis entry (entry 1). Every admin
//! request names it, and the enclave refuses a request for another, so a request signed for
//! staging cannot be replayed against production, even where one admin key serves both. The
//! CLI learns it without trusting the host:
//!
//! 1. the control plane's attestation document for a fresh nonce, verified against the pinned
//!    root and the expected PCRs (required): the attested epoch key;
//! 2. a checkpoint the enclave signs now, verified under that key; its origin line is the log's
//!    origin (the enclave signs checkpoints under its origin as key name);
//! 3. entry 1 and its inclusion proof against that checkpoint's root: a genesis event, whose
//!    hash is the genesis hash.
//!
//! `pin` writes `origin = ...` and `genesis = ...` into the `[client]` table of the
//! configuration file (`--config`); it never replaces a different pinned deployment (edit the
//! file to move to another log on purpose). Admin commands refuse to sign without one.

use std::path::Path;

use attestplane_verifier::admin::Deployment;
use attestplane_verifier::checkpoint::verify_checkpoint;
use attestplane_verifier::entry::{EntryHash, Event, SignedEntry};
use clap::Subcommand;
use serde_json::json;

use super::attest::{ControlPlaneTrust, attested_control_plane};
use super::http::Api;
use super::log::fresh_checkpoint;
use super::submit::{ConfirmError, claimed_origin, included_entry, pinned_deployment};
use super::{CliError, CliResult, ClientContext, clean, print_json};
use crate::config::ConfigFile;

/// The position of the genesis entry.
const GENESIS_SEQ: u64 = 1;

/// `deployment ...`.
#[derive(Debug, Subcommand)]
pub enum DeploymentCommand {
    /// Verify the control plane and print its deployment (origin, genesis entry hash), and
    /// whether it is the one pinned in the configuration.
    Show,
    /// Verify the control plane and pin its deployment in the configuration file (--config):
    /// admin requests are signed for it, and only for it.
    Pin,
}

/// A deployment as learned from the attested control plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Learned {
    /// The deployment.
    pub deployment: Deployment,
    /// The size of the checkpoint that includes the genesis entry.
    pub checkpoint_size: u64,
}

/// Learns the deployment of the control plane behind `api` (see the module documentation).
pub async fn learn(api: &Api, trust: &ControlPlaneTrust) -> CliResult<Learned> {
    let control = attested_control_plane(api, trust).await?;
    let note = fresh_checkpoint(api).await?;
    let origin = claimed_origin(&note)
        .ok_or_else(|| CliError::Failed("the checkpoint served is not a checkpoint note".into()))?;
    let verified = verify_checkpoint(&note, &origin, &control.key).map_err(|e| {
        ConfirmError::UnattestedCheckpoint {
            origin: origin.clone(),
            reason: e.to_string(),
        }
    })?;
    let (size, root) = (verified.size(), *verified.root());
    if size <= GENESIS_SEQ {
        return Err(CliError::Failed(format!(
            "the log holds {size} entries: no genesis entry yet"
        )));
    }
    let bytes = included_entry(api, GENESIS_SEQ, size, &root).await?;
    let entry = SignedEntry::decode(&bytes)
        .map_err(|e| CliError::Failed(format!("entry {GENESIS_SEQ} does not decode: {e}")))?
        .into_entry();
    if entry.seq != GENESIS_SEQ || !matches!(entry.event, Event::Genesis { .. }) {
        return Err(CliError::Failed(format!(
            "entry {GENESIS_SEQ} is not the genesis entry (it holds a {} event at position {})",
            entry.event.type_name(),
            entry.seq
        )));
    }
    Ok(Learned {
        deployment: Deployment {
            origin,
            genesis: EntryHash::of(&bytes),
        },
        checkpoint_size: size,
    })
}

/// Runs a `deployment` command.
pub async fn run(command: DeploymentCommand, context: &ClientContext) -> CliResult {
    let trust = ControlPlaneTrust::pinned(context, "learning the deployment")?;
    let api = Api::new(&context.url)?;
    let learned = learn(&api, &trust).await?;
    let d = &learned.deployment;
    let pinned = match (&context.origin, &context.genesis) {
        (None, None) => None,
        _ => Some(pinned_deployment(context)?),
    };
    match command {
        DeploymentCommand::Show => {
            let status = match &pinned {
                None => "not pinned",
                Some(p) if p == d => "pinned",
                Some(_) => "DIFFERS from the pinned deployment",
            };
            if context.json {
                print_json(&json!({
                    "origin": d.origin,
                    "genesis": d.genesis,
                    "checkpoint_size": learned.checkpoint_size,
                    "pinned": pinned.as_ref().map(|p| p == d),
                }))?;
            } else {
                outln!("origin = {:?}", clean(&d.origin));
                outln!("genesis = \"{}\"", d.genesis);
                eprintln!(
                    "verified: the attested control plane's checkpoint of size {} includes this \
                     genesis entry; {status}",
                    learned.checkpoint_size
                );
            }
            match pinned {
                Some(p) if p != *d => Err(CliError::Failed(format!(
                    "the control plane serves deployment {d}, the configuration pins {p}"
                ))),
                _ => Ok(()),
            }
        }
        DeploymentCommand::Pin => {
            let path = context.config.as_deref().ok_or_else(|| {
                CliError::Usage(
                    "pin writes the configuration file: give --config FILE (or \
                     ATTESTPLANE_CONFIG)"
                        .into(),
                )
            })?;
            match &pinned {
                Some(p) if p == d => {}
                Some(p) => {
                    return Err(CliError::Failed(format!(
                        "{} already pins deployment {p}, not {d}; edit it to move to another log",
                        path.display()
                    )));
                }
                None => pin_in_file(path, d)?,
            }
            if context.json {
                print_json(&json!({
                    "origin": d.origin,
                    "genesis": d.genesis,
                    "checkpoint_size": learned.checkpoint_size,
                    "config": path.display().to_string(),
                }))
            } else {
                outln!(
                    "pinned deployment {} in {}",
                    clean(&d.to_string()),
                    path.display()
                );
                Ok(())
            }
        }
    }
}

/// Writes `deployment` into the `[client]` table of the configuration file at `path`.
pub fn pin_in_file(path: &Path, deployment: &Deployment) -> CliResult {
    let io = |e: std::io::Error| CliError::Io(format!("{}: {e}", path.display()));
    let text = std::fs::read_to_string(path).map_err(io)?;
    let new = pin_in_text(&text, deployment)
        .map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))?;
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = std::path::PathBuf::from(partial);
    std::fs::write(&partial, new).map_err(io)?;
    if let Ok(meta) = std::fs::metadata(path) {
        let _ = std::fs::set_permissions(&partial, meta.permissions());
    }
    std::fs::rename(&partial, path).map_err(io)
}

/// `s` as a TOML basic string, quotes included.
pub fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The configuration text with `origin` and `genesis` added to its `[client]` table (created
/// if missing). Refuses text that already sets either, and checks the result parses to exactly
/// that deployment.
pub fn pin_in_text(text: &str, deployment: &Deployment) -> Result<String, String> {
    let before = ConfigFile::parse(text)?;
    if before.client.origin.is_some() || before.client.genesis.is_some() {
        return Err("the [client] table already sets origin or genesis".into());
    }
    let lines = format!(
        "origin = {}\ngenesis = \"{}\"\n",
        toml_string(&deployment.origin),
        deployment.genesis
    );
    let header = text.lines().position(|l| {
        let l = l.trim();
        l == "[client]"
            || l.strip_prefix("[client]")
                .is_some_and(|r| r.trim().starts_with('#'))
    });
    let out = match header {
        Some(i) => {
            let mut out = String::with_capacity(text.len() + lines.len());
            for (n, line) in text.split_inclusive('\n').enumerate() {
                out.push_str(line);
                if n == i {
                    if !line.ends_with('\n') {
                        out.push('\n');
                    }
                    out.push_str(&lines);
                }
            }
            out
        }
        None => {
            let sep = if text.is_empty() || text.ends_with('\n') {
                ""
            } else {
                "\n"
            };
            format!("{text}{sep}[client]\n{lines}")
        }
    };
    let after = ConfigFile::parse(&out)?;
    if after.client.origin.as_deref() != Some(deployment.origin.as_str())
        || after.client.genesis.as_deref() != Some(deployment.genesis.to_hex().as_str())
    {
        return Err("cannot add the deployment to the [client] table".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment() -> Deployment {
        Deployment {
            origin: "attestplane.test/\"log\"\\\u{7f}".into(),
            genesis: EntryHash::from_bytes([7; 32]),
        }
    }

    #[test]
    fn pins_into_the_client_table_wherever_it_is() {
        let d = deployment();
        for text in [
            "[client]\nurl = \"http://127.0.0.1:1\"\n[proxy]\nlisten = \"127.0.0.1:2\"\n",
            "[proxy]\nlisten = \"127.0.0.1:2\"\n\n[client] # the CLI\nurl = \"http://x:1\"",
            "[proxy]\nlisten = \"127.0.0.1:2\"",
            "",
        ] {
            let out = pin_in_text(text, &d).unwrap();
            let c = ConfigFile::parse(&out).unwrap();
            assert_eq!(c.client.origin.as_deref(), Some(d.origin.as_str()), "{out}");
            assert_eq!(c.client.genesis, Some(d.genesis.to_hex()), "{out}");
            if text.contains("listen") {
                assert_eq!(c.proxy.listen.as_deref(), Some("127.0.0.1:2"), "{out}");
            }
        }
    }

    #[test]
    fn never_replaces_a_pinned_deployment() {
        let d = deployment();
        let pinned = pin_in_text("[client]\n", &d).unwrap();
        assert!(pin_in_text(&pinned, &d).is_err());
        assert!(pin_in_text("[client]\ngenesis = \"00\"\n", &d).is_err());
    }
}
