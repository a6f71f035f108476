//! The EIF writer: the byte layout `nitro-cli build-enclave` produces, and PCR0/1/2.
//!
//! Layout (all integers big-endian), as aws-nitro-enclaves-image-format's `EifBuilder` writes
//! it for version 4:
//!
//! ```text
//! header (548 bytes): ".eif" | version 4 | flags (bit 0: aarch64) | default_mem 1 GiB
//!                     | default_cpus 2 | reserved 0 | num_sections
//!                     | section_offsets [u64; 32] | section_sizes [u64; 32] | unused 0 | crc32
//! then, back to back, each section as a 12-byte header (type u16 | flags 0 | size u64) and
//! its data: kernel (1), cmdline (2, no NUL), metadata (5, JSON), ramdisk (3) …
//! ```
//!
//! `section_offsets[i]` points at section `i`'s header; `section_sizes[i]` is its data size.
//! The CRC is CRC-32/ISO-HDLC over the header without the CRC field, then every section header
//! and data in order.
//!
//! Measurements: `PCRn = SHA-384(48 zero bytes ‖ SHA-384(data))` with PCR0 over kernel ‖
//! cmdline ‖ all ramdisks, PCR1 over kernel ‖ cmdline ‖ first ramdisk, PCR2 over the other
//! ramdisks. The metadata section is not measured, so its build time cannot change a PCR; this
//! writer still takes the time as a parameter so that the whole file is reproducible.
//!
//! It does not write a signature section (see the crate documentation).

use std::fmt;

use sha2::{Digest, Sha384};
use thiserror::Error;

/// The EIF version written (4: with a metadata section).
pub const EIF_VERSION: u16 = 4;
/// Length of the file header.
pub const HEADER_LEN: usize = 548;
/// Length of a section header.
pub const SECTION_HEADER_LEN: usize = 12;
/// Entries in the header's section table.
pub const MAX_SECTIONS: usize = 32;
/// Ramdisks that fit next to kernel, cmdline and metadata.
pub const MAX_RAMDISKS: usize = MAX_SECTIONS - 3;
/// The default enclave memory nitro-cli records in the header (`1024 * 1024 * 1024`).
pub const DEFAULT_MEM: u64 = 1024 * 1024 * 1024;
/// The default CPU count nitro-cli records in the header.
pub const DEFAULT_CPUS: u64 = 2;
/// The largest cmdline accepted (the verifier refuses longer ones).
pub const MAX_CMDLINE_LEN: usize = 64 * 1024;

const KERNEL: u16 = 1;
const CMDLINE: u16 = 2;
const RAMDISK: u16 = 3;
const METADATA: u16 = 5;
const FLAG_AARCH64: u16 = 0x1;
const PCR_LEN: usize = 48;

/// The architecture recorded in the header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Arch {
    /// x86_64 (flags 0).
    #[default]
    X86_64,
    /// aarch64 (flag bit 0).
    Aarch64,
}

/// The build metadata nitro-cli records (`EifIdentityInfo`). Not measured, but part of the
/// file, so every field is an input: nothing is read from the clock or the environment here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Metadata {
    /// `ImageName`.
    pub image_name: String,
    /// `ImageVersion`.
    pub image_version: String,
    /// `BuildMetadata.BuildTime` (RFC 3339; use `SOURCE_DATE_EPOCH`, not the clock).
    pub build_time: String,
    /// `BuildMetadata.BuildTool`.
    pub build_tool: String,
    /// `BuildMetadata.BuildToolVersion`.
    pub build_tool_version: String,
    /// `BuildMetadata.OperatingSystem` (from the kernel config, e.g. `Linux`).
    pub operating_system: String,
    /// `BuildMetadata.KernelVersion` (from the kernel config).
    pub kernel_version: String,
    /// `CustomMetadata`: a JSON value (`null` for none).
    pub custom: serde_json::Value,
}

impl Default for Metadata {
    fn default() -> Self {
        Self {
            image_name: "attestplane-enclave".into(),
            image_version: env!("CARGO_PKG_VERSION").into(),
            build_time: "1970-01-01T00:00:00Z".into(),
            build_tool: env!("CARGO_PKG_NAME").into(),
            build_tool_version: env!("CARGO_PKG_VERSION").into(),
            operating_system: "Unknown".into(),
            kernel_version: "Unknown".into(),
            custom: serde_json::Value::Null,
        }
    }
}

impl Metadata {
    /// The JSON nitro-cli writes, with its field order (`DockerInfo` is `null`: no docker).
    pub fn to_json(&self) -> Vec<u8> {
        let s = |v: &str| serde_json::Value::String(v.to_string()).to_string();
        format!(
            "{{\"ImageName\":{},\"ImageVersion\":{},\"BuildMetadata\":{{\"BuildTime\":{},\
             \"BuildTool\":{},\"BuildToolVersion\":{},\"OperatingSystem\":{},\
             \"KernelVersion\":{}}},\"DockerInfo\":null,\"CustomMetadata\":{}}}",
            s(&self.image_name),
            s(&self.image_version),
            s(&self.build_time),
            s(&self.build_tool),
            s(&self.build_tool_version),
            s(&self.operating_system),
            s(&self.kernel_version),
            self.custom,
        )
        .into_bytes()
    }

    /// Fills `operating_system` and `kernel_version` from a kernel `.config` the way nitro-cli
    /// does: its third line reads `# Linux/x86_64 6.12.0 Kernel Configuration`.
    pub fn with_kernel_config(mut self, config: &str) -> Self {
        if let Some(line) = config.lines().nth(2) {
            let words: Vec<&str> = line.split([' ', '/', '-']).collect();
            if let Some(os) = words.get(1) {
                self.operating_system = (*os).to_string();
            }
            if let Some(k) = words.get(3) {
                self.kernel_version = (*k).to_string();
            }
        }
        self
    }
}

/// Everything an image is made of.
#[derive(Clone, Debug)]
pub struct EifSpec<'a> {
    /// The kernel image (bzImage on x86_64).
    pub kernel: &'a [u8],
    /// The kernel command line (written without a terminating NUL).
    pub cmdline: &'a str,
    /// The ramdisks, bootstrap first.
    pub ramdisks: Vec<&'a [u8]>,
    /// Target architecture.
    pub arch: Arch,
    /// Build metadata.
    pub metadata: Metadata,
}

/// Why an image could not be built.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum BuildError {
    /// No ramdisk was given: the kernel would have no init.
    #[error("an image needs at least one ramdisk")]
    NoRamdisk,
    /// More ramdisks than the section table holds.
    #[error("{count} ramdisks given; at most {MAX_RAMDISKS} fit in the section table")]
    TooManyRamdisks {
        /// How many were given.
        count: usize,
    },
    /// The kernel is empty.
    #[error("the kernel is empty")]
    EmptyKernel,
    /// The cmdline contains a NUL (nitro-cli stores it as a C string).
    #[error("the cmdline contains a nul byte at {at}")]
    CmdlineNul {
        /// Its position.
        at: usize,
    },
    /// The cmdline is longer than [`MAX_CMDLINE_LEN`].
    #[error("the cmdline is {len} bytes; at most {MAX_CMDLINE_LEN} are accepted")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
    },
}

/// PCR0, PCR1 and PCR2 of an image.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Measurements {
    /// Kernel ‖ cmdline ‖ all ramdisks.
    pub pcr0: [u8; PCR_LEN],
    /// Kernel ‖ cmdline ‖ first ramdisk.
    pub pcr1: [u8; PCR_LEN],
    /// The ramdisks after the first.
    pub pcr2: [u8; PCR_LEN],
}

impl Measurements {
    /// `{"PCR0": "hex", "PCR1": "hex", "PCR2": "hex"}` with a final newline: the file
    /// `attestplane-verify log --pcrs` reads.
    pub fn to_json(&self) -> String {
        format!(
            "{{\n  \"PCR0\": \"{}\",\n  \"PCR1\": \"{}\",\n  \"PCR2\": \"{}\"\n}}\n",
            hex::encode(self.pcr0),
            hex::encode(self.pcr1),
            hex::encode(self.pcr2)
        )
    }
}

impl fmt::Debug for Measurements {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Measurements")
            .field("pcr0", &hex::encode(self.pcr0))
            .field("pcr1", &hex::encode(self.pcr1))
            .field("pcr2", &hex::encode(self.pcr2))
            .finish()
    }
}

/// A built image.
#[derive(Clone, Debug)]
pub struct BuiltEif {
    /// The file's bytes.
    pub bytes: Vec<u8>,
    /// Its PCRs, computed while writing.
    pub measurements: Measurements,
}

/// Builds an image. Same spec, same bytes.
pub fn build_eif(spec: &EifSpec<'_>) -> Result<BuiltEif, BuildError> {
    if spec.kernel.is_empty() {
        return Err(BuildError::EmptyKernel);
    }
    if let Some(at) = spec.cmdline.bytes().position(|b| b == 0) {
        return Err(BuildError::CmdlineNul { at });
    }
    if spec.cmdline.len() > MAX_CMDLINE_LEN {
        return Err(BuildError::CmdlineTooLong {
            len: spec.cmdline.len(),
        });
    }
    if spec.ramdisks.is_empty() {
        return Err(BuildError::NoRamdisk);
    }
    if spec.ramdisks.len() > MAX_RAMDISKS {
        return Err(BuildError::TooManyRamdisks {
            count: spec.ramdisks.len(),
        });
    }
    let metadata = spec.metadata.to_json();
    let mut sections: Vec<(u16, &[u8])> = vec![
        (KERNEL, spec.kernel),
        (CMDLINE, spec.cmdline.as_bytes()),
        (METADATA, &metadata),
    ];
    sections.extend(spec.ramdisks.iter().map(|r| (RAMDISK, *r)));

    let total = HEADER_LEN
        + sections
            .iter()
            .map(|(_, d)| SECTION_HEADER_LEN + d.len())
            .sum::<usize>();
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(b".eif");
    header.extend_from_slice(&EIF_VERSION.to_be_bytes());
    let flags = match spec.arch {
        Arch::X86_64 => 0,
        Arch::Aarch64 => FLAG_AARCH64,
    };
    header.extend_from_slice(&flags.to_be_bytes());
    header.extend_from_slice(&DEFAULT_MEM.to_be_bytes());
    header.extend_from_slice(&DEFAULT_CPUS.to_be_bytes());
    header.extend_from_slice(&0u16.to_be_bytes());
    // At most 3 + MAX_RAMDISKS = 32 sections: fits.
    header.extend_from_slice(&(sections.len() as u16).to_be_bytes());
    let mut offsets = [0u64; MAX_SECTIONS];
    let mut sizes = [0u64; MAX_SECTIONS];
    let mut cursor = HEADER_LEN as u64;
    for ((o, s), (_, data)) in offsets.iter_mut().zip(sizes.iter_mut()).zip(&sections) {
        *o = cursor;
        *s = data.len() as u64;
        cursor += (SECTION_HEADER_LEN + data.len()) as u64;
    }
    for v in offsets.iter().chain(sizes.iter()) {
        header.extend_from_slice(&v.to_be_bytes());
    }
    header.extend_from_slice(&0u32.to_be_bytes());

    let mut crc = Crc32::new();
    crc.update(&header);
    let section_headers: Vec<[u8; SECTION_HEADER_LEN]> = sections
        .iter()
        .map(|(kind, data)| {
            let mut h = [0u8; SECTION_HEADER_LEN];
            h[..2].copy_from_slice(&kind.to_be_bytes());
            h[4..].copy_from_slice(&(data.len() as u64).to_be_bytes());
            h
        })
        .collect();
    for (h, (_, data)) in section_headers.iter().zip(&sections) {
        crc.update(h);
        crc.update(data);
    }
    header.extend_from_slice(&crc.finish().to_be_bytes());

    let mut bytes = Vec::with_capacity(total);
    bytes.extend_from_slice(&header);
    for (h, (_, data)) in section_headers.iter().zip(&sections) {
        bytes.extend_from_slice(h);
        bytes.extend_from_slice(data);
    }
    Ok(BuiltEif {
        bytes,
        measurements: measure(spec),
    })
}

/// The measurements of a spec, without building it.
pub fn measure(spec: &EifSpec<'_>) -> Measurements {
    let mut image = Sha384::new();
    let mut bootstrap = Sha384::new();
    let mut app = Sha384::new();
    for part in [spec.kernel, spec.cmdline.as_bytes()] {
        image.update(part);
        bootstrap.update(part);
    }
    for (i, r) in spec.ramdisks.iter().enumerate() {
        image.update(r);
        if i == 0 {
            bootstrap.update(r);
        } else {
            app.update(r);
        }
    }
    Measurements {
        pcr0: extend(image),
        pcr1: extend(bootstrap),
        pcr2: extend(app),
    }
}

fn extend(h: Sha384) -> [u8; PCR_LEN] {
    let mut reg = Sha384::new();
    reg.update([0u8; PCR_LEN]);
    reg.update(h.finalize());
    reg.finalize().into()
}

/// CRC-32/ISO-HDLC (zlib's crc32), bit by bit: the image is written once per build.
struct Crc32(u32);

impl Crc32 {
    fn new() -> Self {
        Self(0xFFFF_FFFF)
    }

    fn update(&mut self, bytes: &[u8]) {
        let mut c = self.0;
        for b in bytes {
            c ^= u32::from(*b);
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0xEDB8_8320
                } else {
                    c >> 1
                };
            }
        }
        self.0 = c;
    }

    fn finish(&self) -> u32 {
        !self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec<'a>(ramdisks: Vec<&'a [u8]>) -> EifSpec<'a> {
        EifSpec {
            kernel: b"kernel",
            cmdline: "console=ttyS0",
            ramdisks,
            arch: Arch::X86_64,
            metadata: Metadata::default(),
        }
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        let mut c = Crc32::new();
        c.update(b"123456789");
        assert_eq!(c.finish(), 0xCBF4_3926);
    }

    #[test]
    fn refuses_images_nitro_cli_would_not_write() {
        assert_eq!(build_eif(&spec(vec![])).unwrap_err(), BuildError::NoRamdisk);
        let many = vec![&b"r"[..]; MAX_RAMDISKS + 1];
        assert_eq!(
            build_eif(&spec(many)).unwrap_err(),
            BuildError::TooManyRamdisks {
                count: MAX_RAMDISKS + 1
            }
        );
        let mut s = spec(vec![b"r"]);
        s.cmdline = "a\0b";
        assert_eq!(build_eif(&s).unwrap_err(), BuildError::CmdlineNul { at: 1 });
        let mut s = spec(vec![b"r"]);
        s.kernel = b"";
        assert_eq!(build_eif(&s).unwrap_err(), BuildError::EmptyKernel);
    }

    #[test]
    fn the_most_ramdisks_fill_the_section_table_exactly() {
        let many = vec![&b"r"[..]; MAX_RAMDISKS];
        let eif = build_eif(&spec(many)).unwrap();
        assert_eq!(u16::from_be_bytes([eif.bytes[26], eif.bytes[27]]), 32);
    }

    #[test]
    fn metadata_is_the_json_nitro_cli_reads() {
        let m = Metadata {
            custom: serde_json::json!({"commit": "abc"}),
            ..Metadata::default()
        }
        .with_kernel_config("#\n# Automatically generated file; DO NOT EDIT.\n# Linux/x86_64 6.12.7 Kernel Configuration\n");
        let v: serde_json::Value = serde_json::from_slice(&m.to_json()).unwrap();
        assert_eq!(v["BuildMetadata"]["OperatingSystem"], "Linux");
        assert_eq!(v["BuildMetadata"]["KernelVersion"], "6.12.7");
        assert_eq!(v["DockerInfo"], serde_json::Value::Null);
        assert_eq!(v["CustomMetadata"]["commit"], "abc");
        assert!(
            m.to_json()
                .starts_with(b"{\"ImageName\":\"attestplane-enclave\",")
        );
    }

    #[test]
    fn metadata_does_not_change_the_measurements() {
        let a = build_eif(&spec(vec![b"r0", b"r1"])).unwrap();
        let mut s = spec(vec![b"r0", b"r1"]);
        s.metadata.build_time = "2030-01-01T00:00:00Z".into();
        let b = build_eif(&s).unwrap();
        assert_ne!(a.bytes, b.bytes);
        assert_eq!(a.measurements, b.measurements);
    }
}
