//! # attestplane-eif: the enclave image, built so that anyone can rebuild it
//!
//! An auditor trusts a log because its epochs are attested with PCR0/1/2 of the enclave image,
//! and those values are only worth something if anyone can rebuild the image from a commit and
//! get the same ones. This crate builds that image without docker:
//!
//! - [`cpio`]: a deterministic initramfs writer (newc cpio, uncompressed): entries sorted by
//!   path, missing parent directories added, mtime fixed (0 or `SOURCE_DATE_EPOCH`), uid and gid
//!   0, inode numbers assigned in order, normalised permissions, `TRAILER!!!`. The same tree
//!   always gives the same bytes, whatever the file system's order, timestamps or umask.
//! - [`image`]: an EIF writer that lays the file out exactly as `nitro-cli build-enclave`
//!   (aws-nitro-enclaves-image-format `EifBuilder`) does — version 4 header, kernel, cmdline,
//!   metadata, ramdisks, IEEE CRC-32 — and computes PCR0, PCR1 and PCR2 while it writes.
//!
//! The `attestplane-eif` binary wraps both (`build`, `initramfs`); `scripts/build-eif` chains
//! them with the kernel, `init` and `nsm.ko` from nitro-cli's blobs, and `eif/README.md` says
//! what is and is not reproducible where.
//!
//! ## Trust assumptions
//!
//! This is a build tool: its inputs (kernel, ramdisk files, directory trees, manifests) are the
//! builder's own. It still bounds every length the format caps and refuses what it cannot
//! encode, with typed errors, rather than writing an image nitro-cli would not.
//!
//! ## What this crate deliberately does not do
//!
//! - It does not sign images (no signature section, so no PCR8): signing needs the release key
//!   and belongs on the release host (`nitro-cli build-enclave --signing-certificate
//!   --private-key`).
//! - It does not compress ramdisks: the kernel accepts plain cpio, and compression is one more
//!   thing whose output must be pinned. AWS's own linuxkit is patched to emit plain cpio too.
//! - It does not parse images: `attestplane-verify eif` (the verifier crate) does, with its own
//!   independent implementation of the formulas; the tests check the two agree. The verifier
//!   never depends on this crate.

#![forbid(unsafe_code)]

pub mod cpio;
pub mod image;

pub use cpio::{CpioError, Initramfs, Manifest, ManifestEntry};
pub use image::{Arch, BuildError, BuiltEif, EifSpec, Measurements, Metadata, build_eif};
