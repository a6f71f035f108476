//! `images allow`: allow the control plane to run another image (an upgrade).
//!
//! A signed `allow_image` admin request ([`super::submit`]) naming the new image's PCRs. Once
//! the enclave has logged it as accepted, epochs whose attestation documents carry those PCRs
//! are accepted by the enclave's boot and by `attestplane-verify log`; an epoch of an image no
//! accepted act allowed earlier in the log is refused by both. The image's PCR file is
//! `--image-pcrs`, not the global `--pcrs` (and `ATTESTPLANE_PCRS`), which names the PCRs of the
//! control plane running now: sharing it would let that file become the image allowed.

use std::path::PathBuf;

use attestplane_verifier::admin::{AdminAction, PcrHex};
use attestplane_verifier::attestation::{Pcr, PcrIndex, names_an_image};
use clap::{Args, Subcommand};

use super::keys::admin_key;
use super::pcrs::{merge, parse_pcr_flag};
use super::submit::submit_admin;
use super::{CliError, CliResult, ClientContext};

/// `images ...`.
#[derive(Debug, Subcommand)]
pub enum ImagesCommand {
    /// Allow the control plane's next epochs to run the image with these PCRs.
    Allow(ImageFlags),
}

/// The PCRs of an image.
#[derive(Debug, Args)]
pub struct ImageFlags {
    /// JSON file of the image's PCRs ({"PCR0": "hex", ...}, as `attestplane-verify eif --json`
    /// and nitro-cli write). PCR0, PCR1 and PCR2 are required.
    #[arg(id = "image_pcrs", long = "image-pcrs", value_name = "FILE")]
    pub pcrs: Option<PathBuf>,
    /// A PCR as N=HEX (repeatable; combines with --image-pcrs).
    #[arg(long = "pcr", value_name = "N=HEX", value_parser = parse_pcr_flag)]
    pub pcr: Vec<(PcrIndex, Pcr)>,
}

impl ImageFlags {
    /// The `allow_image` action these flags describe. Refuses locally what the enclave would
    /// refuse (and log) anyway: PCR0–2 missing or zero.
    pub fn action(&self) -> CliResult<AdminAction> {
        let pcrs = merge(self.pcrs.as_deref(), &self.pcr)?;
        if !names_an_image(&pcrs) {
            return Err(CliError::Usage(
                "an image is named by PCR0, PCR1 and PCR2, none of them zero: give them with \
                 --image-pcrs FILE or --pcr N=HEX (ATTESTPLANE_PCRS is the running control \
                 plane's and not used here)"
                    .into(),
            ));
        }
        Ok(AdminAction::AllowImage {
            pcrs: pcrs.into_iter().map(|(i, p)| (i, PcrHex(p))).collect(),
        })
    }
}

/// Runs an `images` command.
pub async fn run(command: ImagesCommand, context: &ClientContext) -> CliResult {
    match command {
        ImagesCommand::Allow(flags) => {
            let action = flags.action()?;
            let key = admin_key(context)?;
            submit_admin(context, &key, action).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flag(i: u8, fill: u8) -> (PcrIndex, Pcr) {
        (PcrIndex::try_from(i).unwrap(), Pcr::new([fill; 48]))
    }

    #[test]
    fn allow_needs_pcr0_1_2_none_zero() {
        let ok = ImageFlags {
            pcrs: None,
            pcr: vec![flag(0, 1), flag(1, 2), flag(2, 3)],
        };
        assert!(matches!(ok.action(), Ok(AdminAction::AllowImage { pcrs }) if pcrs.len() == 3));
        let missing = ImageFlags {
            pcrs: None,
            pcr: vec![flag(0, 1), flag(2, 3)],
        };
        assert!(matches!(missing.action(), Err(CliError::Usage(_))));
        let debug = ImageFlags {
            pcrs: None,
            pcr: vec![flag(0, 0), flag(1, 0), flag(2, 0)],
        };
        assert!(matches!(debug.action(), Err(CliError::Usage(_))));
    }
}
