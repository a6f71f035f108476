//! `attestplane-eif`: builds the enclave image file and its initramfs, deterministically.
//!
//! ```text
//! attestplane-eif initramfs (--root DIR [--prefix P] | --manifest FILE)… --out F [--mtime SECS]
//! attestplane-eif build --kernel F (--cmdline STR | --cmdline-file F) --ramdisk F [--ramdisk F…]
//!                       --out F [--pcrs-out F.json] [--arch x86_64|aarch64]
//!                       [--kernel-config F] [--image-name N] [--image-version V]
//! ```
//!
//! Times come from `SOURCE_DATE_EPOCH` (or 0), never from the clock. Exit codes: 0 built,
//! 1 the inputs cannot make an image, 2 usage or I/O error.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail};
use attestplane_eif::{Arch, EifSpec, Initramfs, Manifest, Metadata, build_eif};
use clap::{Parser, Subcommand, ValueEnum};

/// Build Attestplane's enclave image file (EIF) and its initramfs reproducibly.
#[derive(Debug, Parser)]
#[command(name = "attestplane-eif", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write a deterministic newc cpio initramfs from directory trees and/or manifests.
    Initramfs(InitramfsArgs),
    /// Write an EIF from a kernel, a cmdline and ramdisks, and its expected PCRs.
    Build(BuildArgs),
}

#[derive(Debug, clap::Args)]
struct InitramfsArgs {
    /// A directory whose contents go into the archive (repeatable).
    #[arg(long, value_name = "DIR")]
    root: Vec<PathBuf>,
    /// The archive directory the --root trees go under (e.g. `rootfs`); default the root.
    #[arg(long, value_name = "PATH", default_value = "")]
    prefix: String,
    /// A manifest of `dir PATH MODE`, `file PATH MODE SOURCE`, `symlink PATH TARGET` lines
    /// (repeatable).
    #[arg(long, value_name = "FILE")]
    manifest: Vec<PathBuf>,
    /// Where to write the archive.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Modification time of every entry; default `SOURCE_DATE_EPOCH`, else 0.
    #[arg(long, value_name = "SECS")]
    mtime: Option<u32>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ArchArg {
    #[value(name = "x86_64")]
    X86_64,
    #[value(name = "aarch64")]
    Aarch64,
}

#[derive(Debug, clap::Args)]
struct BuildArgs {
    /// The kernel image (bzImage).
    #[arg(long, value_name = "FILE")]
    kernel: PathBuf,
    /// The kernel command line.
    #[arg(long, value_name = "STR", conflicts_with = "cmdline_file")]
    cmdline: Option<String>,
    /// A file holding the kernel command line (trailing newlines are dropped).
    #[arg(long, value_name = "FILE")]
    cmdline_file: Option<PathBuf>,
    /// A ramdisk, bootstrap first (repeatable, at least one).
    #[arg(long, value_name = "FILE", required = true)]
    ramdisk: Vec<PathBuf>,
    /// Where to write the image.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Where to write `{"PCR0": …, "PCR1": …, "PCR2": …}`.
    #[arg(long, value_name = "FILE")]
    pcrs_out: Option<PathBuf>,
    /// Target architecture recorded in the header.
    #[arg(long, value_enum, default_value = "x86_64")]
    arch: ArchArg,
    /// The kernel's .config, for the metadata's OperatingSystem and KernelVersion.
    #[arg(long, value_name = "FILE")]
    kernel_config: Option<PathBuf>,
    /// Metadata ImageName.
    #[arg(long, default_value = "attestplane-enclave")]
    image_name: String,
    /// Metadata ImageVersion; default this tool's version.
    #[arg(long)]
    image_version: Option<String>,
}

/// A usage or I/O failure (exit 2) versus inputs that cannot make an image (exit 1).
enum Failure {
    Usage(anyhow::Error),
    Invalid(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Self::Usage(e)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Initramfs(a) => initramfs(a),
        Command::Build(a) => build(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Invalid(e)) => {
            eprintln!("attestplane-eif: {e:#}");
            ExitCode::from(1)
        }
        Err(Failure::Usage(e)) => {
            eprintln!("attestplane-eif: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

fn write(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

/// `SOURCE_DATE_EPOCH` as seconds, or 0 when unset.
fn source_date_epoch() -> anyhow::Result<u64> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(s) => s
            .trim()
            .parse()
            .map_err(|_| anyhow!("SOURCE_DATE_EPOCH={s:?} is not a number of seconds")),
        Err(std::env::VarError::NotPresent) => Ok(0),
        Err(e) => bail!("SOURCE_DATE_EPOCH: {e}"),
    }
}

fn initramfs(a: InitramfsArgs) -> Result<(), Failure> {
    if a.root.is_empty() && a.manifest.is_empty() {
        return Err(anyhow!("give at least one --root or --manifest").into());
    }
    let mtime = match a.mtime {
        Some(m) => m,
        None => {
            let s = source_date_epoch()?;
            u32::try_from(s).map_err(|_| anyhow!("SOURCE_DATE_EPOCH {s} does not fit in newc"))?
        }
    };
    let mut archive = Initramfs::new();
    for root in &a.root {
        archive
            .add_tree(root, &a.prefix)
            .map_err(|e| anyhow!("{}: {e}", root.display()))?;
    }
    for path in &a.manifest {
        let text =
            String::from_utf8(read(path)?).map_err(|_| anyhow!("{}: not utf-8", path.display()))?;
        let manifest = Manifest::parse(&text).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        archive
            .add_manifest(&manifest)
            .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    }
    let bytes = archive.to_bytes(mtime);
    write(&a.out, &bytes)?;
    eprintln!(
        "wrote {} ({} entries, {} bytes, mtime {mtime})",
        a.out.display(),
        archive.len(),
        bytes.len()
    );
    Ok(())
}

fn build(a: BuildArgs) -> Result<(), Failure> {
    let kernel = read(&a.kernel)?;
    let cmdline = match (&a.cmdline, &a.cmdline_file) {
        (Some(c), None) => c.clone(),
        (None, Some(p)) => String::from_utf8(read(p)?)
            .map_err(|_| anyhow!("{}: not utf-8", p.display()))?
            .trim_end_matches(['\n', '\r'])
            .to_string(),
        _ => return Err(anyhow!("give exactly one of --cmdline and --cmdline-file").into()),
    };
    let ramdisks = a
        .ramdisk
        .iter()
        .map(|p| read(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let epoch = source_date_epoch()?;
    let build_time = UNIX_EPOCH
        .checked_add(Duration::from_secs(epoch))
        .ok_or_else(|| anyhow!("SOURCE_DATE_EPOCH {epoch} is out of range"))?;
    let mut metadata = Metadata {
        image_name: a.image_name.clone(),
        build_time: humantime::format_rfc3339_seconds(build_time).to_string(),
        ..Metadata::default()
    };
    if let Some(v) = &a.image_version {
        metadata.image_version = v.clone();
    }
    if let Some(p) = &a.kernel_config {
        let text = String::from_utf8_lossy(&read(p)?).into_owned();
        metadata = metadata.with_kernel_config(&text);
    }
    let spec = EifSpec {
        kernel: &kernel,
        cmdline: &cmdline,
        ramdisks: ramdisks.iter().map(Vec::as_slice).collect(),
        arch: match a.arch {
            ArchArg::X86_64 => Arch::X86_64,
            ArchArg::Aarch64 => Arch::Aarch64,
        },
        metadata,
    };
    let eif = build_eif(&spec).map_err(|e| Failure::Invalid(anyhow!("cannot build: {e}")))?;
    write(&a.out, &eif.bytes)?;
    let json = eif.measurements.to_json();
    if let Some(p) = &a.pcrs_out {
        write(p, json.as_bytes())?;
    }
    eprintln!("wrote {} ({} bytes)", a.out.display(), eif.bytes.len());
    print!("{json}");
    Ok(())
}
