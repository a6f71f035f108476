//! Enclave image files (EIF): parsing and the image measurements PCR0, PCR1, PCR2 and PCR8.
//!
//! An auditor's question is "which code produced this log?". The log's epochs are attested with
//! PCR0/1/2 of the enclave image; this module computes those values from an EIF, so that anyone
//! who rebuilds the image from a commit can compare them with what the log's attestation
//! documents carry (`attestplane-verify eif IMAGE --json > pcrs.json`, then
//! `attestplane-verify log LOG --pcrs pcrs.json`).
//!
//! ## The format (as `aws-nitro-enclaves-image-format` writes it)
//!
//! All integers are big-endian. The file opens with a 548-byte header:
//!
//! ```text
//! magic ".eif" (4) | version u16 | flags u16 | default_mem u64 | default_cpus u64
//! | reserved u16 | num_sections u16 | section_offsets [u64; 32] | section_sizes [u64; 32]
//! | unused u32 | eif_crc32 u32
//! ```
//!
//! Each section is a 12-byte header (`type u16 | flags u16 | size u64`) followed by `size`
//! bytes of data. `section_offsets[i]` is where section `i`'s header starts and
//! `section_sizes[i]` is the size of its data. Types: 1 kernel, 2 cmdline, 3 ramdisk,
//! 4 signature (version 3 on), 5 metadata (version 4 on). `nitro-cli build-enclave` writes
//! kernel, cmdline, metadata, the ramdisks, then the signature, back to back. Flag bit 0 of the
//! header marks an aarch64 image. The CRC (version 2 on) is the IEEE CRC-32 (as zlib's) over the
//! header without its last four bytes, then every section header and its data, in file order.
//!
//! ## The measurements
//!
//! Each PCR is a SHA-384 register extended once from zero:
//! `PCR = SHA-384(48 zero bytes ‖ SHA-384(data))`, where `data` is the concatenation of section
//! *data* (never the section headers), in file order:
//!
//! - PCR0: the kernel, the cmdline and every ramdisk;
//! - PCR1: the kernel, the cmdline and the first ramdisk;
//! - PCR2: every ramdisk after the first (`SHA-384` of the empty string when there is none);
//! - PCR8, only for a signed image: the DER of the signing certificate, which the signature
//!   section carries as PEM inside CBOR `[{"signing_certificate": bytes, "signature": bytes}]`
//!   (serde_cbor writes the byte vectors as arrays of integers; both forms are accepted).
//!
//! The metadata and signature sections are not part of PCR0/1/2. This is what
//! `EifReader` / `get_pcrs` in aws-nitro-enclaves-image-format and QEMU's `hw/core/eif.c`
//! compute, and what the Nitro hypervisor reports in attestation documents.
//!
//! ## Trust assumptions
//!
//! The image bytes are hostile: every length and offset is checked against the file and
//! against a named bound, and no input makes this module panic or allocate in proportion to a
//! claimed size. Nothing about the image is trusted; the PCRs are a function of its bytes.
//!
//! ## What this module deliberately does not do
//!
//! - It accepts only the layout nitro-cli writes: section 0 the kernel, section 1 the cmdline,
//!   sections back to back in header order with no gap, overlap or trailing byte, each header's
//!   size equal to the table's, section flags zero, unused table slots zero. An image that
//!   bends these rules is refused rather than measured in a way the hypervisor may not.
//! - It does not verify the signature section's COSE signature over PCR0, nor the signing
//!   certificate's validity: PCR8 identifies the certificate, trusting it is the caller's call.
//! - It does not interpret the metadata section (build time, docker info): it is not measured.
//! - It does no I/O; the `attestplane-verify eif` command reads the file.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;
use sha2::{Digest, Sha384};
use thiserror::Error;

use crate::attestation::{Pcr, PcrIndex};

/// The four bytes an EIF starts with: `.eif`.
pub const EIF_MAGIC: [u8; 4] = *b".eif";
/// Length of the file header, in bytes.
pub const EIF_HEADER_LEN: usize = 548;
/// Length of a section header, in bytes.
pub const SECTION_HEADER_LEN: usize = 12;
/// Entries in the header's section table: no image has more sections.
pub const MAX_SECTIONS: usize = 32;
/// The largest image accepted, in bytes (4 GiB; enclave images are tens to hundreds of MiB).
pub const MAX_EIF_LEN: u64 = 1 << 32;
/// The newest format version understood (4: metadata section).
pub const MAX_EIF_VERSION: u16 = 4;
/// The largest cmdline section accepted, in bytes (Linux itself takes 2048 on x86_64).
pub const MAX_CMDLINE_LEN: u64 = 64 * 1024;
/// The largest signature section accepted, in bytes (one PEM certificate and a COSE_Sign1).
pub const MAX_SIGNATURE_LEN: u64 = 64 * 1024;
/// Header flag bit: the image is for aarch64 (clear: x86_64).
pub const FLAG_ARCH_AARCH64: u16 = 0x1;

/// Length of a PCR (SHA-384), in bytes.
const PCR_LEN: usize = 48;
/// Where the section table starts in the header.
const OFFSETS_AT: usize = 28;
/// Where the CRC field starts in the header (the last four bytes).
const CRC_AT: usize = EIF_HEADER_LEN - 4;

/// What a section holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SectionKind {
    /// The Linux kernel image (bzImage / Image).
    Kernel,
    /// The kernel command line (no terminating NUL).
    Cmdline,
    /// A ramdisk (newc cpio). The first is the bootstrap (init, NSM driver), the rest the
    /// application.
    Ramdisk,
    /// The signature over PCR0 with the signing certificate (CBOR).
    Signature,
    /// Build metadata (JSON). Not measured.
    Metadata,
}

impl SectionKind {
    /// The section type code the format uses.
    pub const fn code(self) -> u16 {
        match self {
            Self::Kernel => 1,
            Self::Cmdline => 2,
            Self::Ramdisk => 3,
            Self::Signature => 4,
            Self::Metadata => 5,
        }
    }

    /// The kind a type code names; `None` for 0 ("invalid") and unknown codes.
    pub const fn from_code(code: u16) -> Option<Self> {
        match code {
            1 => Some(Self::Kernel),
            2 => Some(Self::Cmdline),
            3 => Some(Self::Ramdisk),
            4 => Some(Self::Signature),
            5 => Some(Self::Metadata),
            _ => None,
        }
    }
}

impl fmt::Display for SectionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Kernel => "kernel",
            Self::Cmdline => "cmdline",
            Self::Ramdisk => "ramdisk",
            Self::Signature => "signature",
            Self::Metadata => "metadata",
        })
    }
}

/// The CPU architecture an image is built for (header flag bit 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    /// x86_64 (flag clear).
    X86_64,
    /// aarch64 (flag set).
    Aarch64,
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::X86_64 => "x86_64",
            Self::Aarch64 => "aarch64",
        })
    }
}

/// One section of a parsed image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct EifSection {
    /// What it holds.
    pub kind: SectionKind,
    /// Where its 12-byte header starts in the file.
    pub offset: u64,
    /// Size of its data (after the header), in bytes.
    pub size: u64,
}

/// Why an image could not be measured. Every variant names what was wrong and where.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum EifError {
    /// The image is larger than [`MAX_EIF_LEN`].
    #[error("image is {len} bytes; at most {max} are accepted")]
    TooLarge {
        /// Its length.
        len: u64,
        /// The bound.
        max: u64,
    },
    /// The image is shorter than its header.
    #[error("image is {len} bytes, shorter than the {EIF_HEADER_LEN}-byte header")]
    TruncatedHeader {
        /// Its length.
        len: usize,
    },
    /// The first four bytes are not `.eif`.
    #[error("bad magic {found:02x?}, expected \".eif\"")]
    BadMagic {
        /// The bytes found.
        found: [u8; 4],
    },
    /// A format version this module does not know.
    #[error("unsupported eif version {found} (versions 1 to {MAX_EIF_VERSION} are understood)")]
    UnsupportedVersion {
        /// The version in the header.
        found: u16,
    },
    /// Header flag bits other than the architecture bit are set.
    #[error("unknown header flags {flags:#06x}")]
    UnknownFlags {
        /// The flags in the header.
        flags: u16,
    },
    /// The header declares more sections than its table holds.
    #[error("header declares {found} sections; the table holds {MAX_SECTIONS}")]
    TooManySections {
        /// The declared count.
        found: u16,
    },
    /// A table slot past the declared sections is not zero.
    #[error("section table slot {index} lies past the {count} declared sections but is not zero")]
    UnusedSlotNotZero {
        /// The slot.
        index: usize,
        /// The declared section count.
        count: u16,
    },
    /// A section starts before the previous one ends.
    #[error(
        "section {index} starts at byte {offset}, inside the previous section (ends at {expected})"
    )]
    OverlappingSection {
        /// The section.
        index: usize,
        /// Where the table says it starts.
        offset: u64,
        /// Where the previous section ends.
        expected: u64,
    },
    /// A section starts after the previous one ends, leaving bytes no section owns.
    #[error("section {index} starts at byte {offset}, leaving a gap after byte {expected}")]
    GapBeforeSection {
        /// The section.
        index: usize,
        /// Where the table says it starts.
        offset: u64,
        /// Where the previous section ends.
        expected: u64,
    },
    /// A section's header or data runs past the end of the file.
    #[error(
        "section {index} ({size} bytes of data at byte {offset}) runs past the end of the {len}-byte image"
    )]
    SectionPastEnd {
        /// The section.
        index: usize,
        /// Where its header starts.
        offset: u64,
        /// Its data size.
        size: u64,
        /// The file's length.
        len: u64,
    },
    /// The section header's size differs from the header table's.
    #[error(
        "section {index} is {section} bytes by its own header but {table} by the section table"
    )]
    SizeMismatch {
        /// The section.
        index: usize,
        /// Size in the file header's table.
        table: u64,
        /// Size in the section header.
        section: u64,
    },
    /// A section type code that is "invalid" (0) or unknown.
    #[error("section {index} has invalid type {code}")]
    InvalidSectionType {
        /// The section.
        index: usize,
        /// The type code.
        code: u16,
    },
    /// A section header's flags are not zero.
    #[error("section {index} has flags {flags:#06x}; nitro-cli writes 0")]
    SectionFlags {
        /// The section.
        index: usize,
        /// The flags.
        flags: u16,
    },
    /// A section the image needs is absent.
    #[error("the image has no {kind} section")]
    MissingSection {
        /// What is missing.
        kind: SectionKind,
    },
    /// A section that may occur once occurs again.
    #[error("section {index} is a second {kind} section")]
    DuplicateSection {
        /// The second occurrence.
        index: usize,
        /// Its kind.
        kind: SectionKind,
    },
    /// The kernel is not section 0 or the cmdline not section 1.
    #[error("section {index} is {found}; it must be the {expected}")]
    MisplacedSection {
        /// The section.
        index: usize,
        /// What must be there.
        expected: SectionKind,
        /// What is there.
        found: SectionKind,
    },
    /// Bytes follow the last section.
    #[error("{len} bytes follow the last section, which ends at byte {offset}")]
    TrailingBytes {
        /// Where the last section ends.
        offset: u64,
        /// How many bytes follow.
        len: u64,
    },
    /// A section is larger than its kind allows.
    #[error("section {index} ({kind}) is {size} bytes; at most {max} are accepted")]
    SectionTooLarge {
        /// The section.
        index: usize,
        /// Its kind.
        kind: SectionKind,
        /// Its size.
        size: u64,
        /// The bound.
        max: u64,
    },
    /// The CRC stored in the header is not the CRC of the image.
    #[error("header crc32 is {stored:#010x} but the image's is {computed:#010x}")]
    CrcMismatch {
        /// The CRC in the header.
        stored: u32,
        /// The CRC computed over the image.
        computed: u32,
    },
    /// The signature section does not yield a signing certificate (so PCR8 is unknown).
    #[error("signature section {index}: {reason}")]
    Signature {
        /// The section.
        index: usize,
        /// What was wrong.
        reason: String,
    },
}

/// What an image measures to, and a summary of how it is laid out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct EifMeasurements {
    /// SHA-384 extend of kernel ‖ cmdline ‖ all ramdisks.
    pub pcr0: Pcr,
    /// SHA-384 extend of kernel ‖ cmdline ‖ first ramdisk.
    pub pcr1: Pcr,
    /// SHA-384 extend of the ramdisks after the first.
    pub pcr2: Pcr,
    /// SHA-384 extend of the signing certificate's DER, for a signed image.
    pub pcr8: Option<Pcr>,
    /// Format version.
    pub version: u16,
    /// Target architecture.
    pub arch: Arch,
    /// Default enclave memory recorded in the header (not used by `nitro-cli run-enclave`).
    pub default_mem: u64,
    /// Default enclave CPU count recorded in the header.
    pub default_cpus: u64,
    /// The CRC stored in the header.
    pub crc32: u32,
    /// Whether the CRC was checked (versions before 2 carry none).
    pub crc_checked: bool,
    /// The kernel command line (lossy UTF-8, for display).
    pub cmdline: String,
    /// Every section, in file order.
    pub sections: Vec<EifSection>,
}

impl EifMeasurements {
    /// The expected-PCR file: `{"PCR0": "hex", "PCR1": "hex", "PCR2": "hex"}` plus `"PCR8"`
    /// for a signed image; the shape nitro-cli prints under "Measurements" (without its
    /// "HashAlgorithm") and `attestplane-verify log --pcrs FILE` reads.
    pub fn to_pcrs_json(&self) -> serde_json::Value {
        let mut map = serde_json::Map::new();
        for (name, pcr) in self.named_pcrs() {
            map.insert(name.to_string(), serde_json::Value::String(pcr.to_hex()));
        }
        serde_json::Value::Object(map)
    }

    /// The measurements as expected PCRs, for [`crate::log::LogPolicy`] or
    /// [`crate::attestation::Expectations`].
    pub fn pcrs(&self) -> BTreeMap<PcrIndex, Pcr> {
        let mut out = BTreeMap::new();
        for (index, pcr) in [(0u8, self.pcr0), (1, self.pcr1), (2, self.pcr2)]
            .into_iter()
            .chain(self.pcr8.map(|p| (8, p)))
        {
            if let Ok(i) = PcrIndex::try_from(index) {
                out.insert(i, pcr);
            }
        }
        out
    }

    fn named_pcrs(&self) -> Vec<(&'static str, Pcr)> {
        let mut v = vec![
            ("PCR0", self.pcr0),
            ("PCR1", self.pcr1),
            ("PCR2", self.pcr2),
        ];
        if let Some(p) = self.pcr8 {
            v.push(("PCR8", p));
        }
        v
    }
}

/// Parses an EIF and computes its measurements. See the module documentation for the layout
/// accepted and the formulas.
pub fn measure_eif(bytes: &[u8]) -> Result<EifMeasurements, EifError> {
    let image_len = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
    if image_len > MAX_EIF_LEN {
        return Err(EifError::TooLarge {
            len: image_len,
            max: MAX_EIF_LEN,
        });
    }
    let header = Header::parse(bytes)?;
    let sections = header.sections(bytes, image_len)?;
    check_layout(&sections)?;

    let mut image = Sha384::new();
    let mut bootstrap = Sha384::new();
    let mut app = Sha384::new();
    let mut pcr8 = None;
    let mut ramdisks = 0usize;
    let mut cmdline = String::new();
    let mut crc = Crc32::new();
    crc.update(header.without_crc);
    for (index, s) in sections.iter().enumerate() {
        crc.update(s.header);
        crc.update(s.data);
        match s.kind {
            SectionKind::Kernel => {
                image.update(s.data);
                bootstrap.update(s.data);
            }
            SectionKind::Cmdline => {
                bound(index, s, MAX_CMDLINE_LEN)?;
                image.update(s.data);
                bootstrap.update(s.data);
                cmdline = String::from_utf8_lossy(s.data).into_owned();
            }
            SectionKind::Ramdisk => {
                image.update(s.data);
                if ramdisks == 0 {
                    bootstrap.update(s.data);
                } else {
                    app.update(s.data);
                }
                ramdisks = ramdisks.saturating_add(1);
            }
            SectionKind::Signature => {
                bound(index, s, MAX_SIGNATURE_LEN)?;
                let der = signing_certificate_der(s.data)
                    .map_err(|reason| EifError::Signature { index, reason })?;
                pcr8 = Some(extend(Sha384::digest(&der).into()));
            }
            SectionKind::Metadata => {}
        }
    }
    let computed = crc.finish();
    let crc_checked = header.version >= 2;
    if crc_checked && computed != header.crc32 {
        return Err(EifError::CrcMismatch {
            stored: header.crc32,
            computed,
        });
    }
    Ok(EifMeasurements {
        pcr0: extend(image.finalize().into()),
        pcr1: extend(bootstrap.finalize().into()),
        pcr2: extend(app.finalize().into()),
        pcr8,
        version: header.version,
        arch: header.arch,
        default_mem: header.default_mem,
        default_cpus: header.default_cpus,
        crc32: header.crc32,
        crc_checked,
        cmdline,
        sections: sections
            .iter()
            .map(|s| EifSection {
                kind: s.kind,
                offset: s.offset,
                size: s.size,
            })
            .collect(),
    })
}

/// One PCR extend from the zero register: `SHA-384(48 zero bytes ‖ digest)`.
fn extend(digest: [u8; PCR_LEN]) -> Pcr {
    let mut h = Sha384::new();
    h.update([0u8; PCR_LEN]);
    h.update(digest);
    Pcr::new(h.finalize().into())
}

fn bound(index: usize, s: &Section<'_>, max: u64) -> Result<(), EifError> {
    if s.size > max {
        return Err(EifError::SectionTooLarge {
            index,
            kind: s.kind,
            size: s.size,
            max,
        });
    }
    Ok(())
}

/// The file header, parsed.
struct Header<'a> {
    version: u16,
    arch: Arch,
    default_mem: u64,
    default_cpus: u64,
    count: u16,
    offsets: [u64; MAX_SECTIONS],
    sizes: [u64; MAX_SECTIONS],
    crc32: u32,
    /// The header bytes the CRC covers.
    without_crc: &'a [u8],
}

/// Big-endian reads at fixed positions of a slice whose length was checked.
fn be_u16(b: &[u8], at: usize) -> u16 {
    let mut out = [0u8; 2];
    if let Some(s) = b.get(at..at.saturating_add(2)) {
        out.copy_from_slice(s);
    }
    u16::from_be_bytes(out)
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    let mut out = [0u8; 4];
    if let Some(s) = b.get(at..at.saturating_add(4)) {
        out.copy_from_slice(s);
    }
    u32::from_be_bytes(out)
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut out = [0u8; 8];
    if let Some(s) = b.get(at..at.saturating_add(8)) {
        out.copy_from_slice(s);
    }
    u64::from_be_bytes(out)
}

impl<'a> Header<'a> {
    fn parse(bytes: &'a [u8]) -> Result<Self, EifError> {
        let h = bytes
            .get(..EIF_HEADER_LEN)
            .ok_or(EifError::TruncatedHeader { len: bytes.len() })?;
        let mut magic = [0u8; 4];
        if let Some(m) = h.get(..4) {
            magic.copy_from_slice(m);
        }
        if magic != EIF_MAGIC {
            return Err(EifError::BadMagic { found: magic });
        }
        let version = be_u16(h, 4);
        if version == 0 || version > MAX_EIF_VERSION {
            return Err(EifError::UnsupportedVersion { found: version });
        }
        let flags = be_u16(h, 6);
        if flags & !FLAG_ARCH_AARCH64 != 0 {
            return Err(EifError::UnknownFlags { flags });
        }
        let arch = if flags & FLAG_ARCH_AARCH64 != 0 {
            Arch::Aarch64
        } else {
            Arch::X86_64
        };
        let count = be_u16(h, 26);
        if usize::from(count) > MAX_SECTIONS {
            return Err(EifError::TooManySections { found: count });
        }
        let mut offsets = [0u64; MAX_SECTIONS];
        let mut sizes = [0u64; MAX_SECTIONS];
        for (i, (o, s)) in offsets.iter_mut().zip(sizes.iter_mut()).enumerate() {
            *o = be_u64(h, OFFSETS_AT + 8 * i);
            *s = be_u64(h, OFFSETS_AT + 8 * (MAX_SECTIONS + i));
            if i >= usize::from(count) && (*o != 0 || *s != 0) {
                return Err(EifError::UnusedSlotNotZero { index: i, count });
            }
        }
        Ok(Self {
            version,
            arch,
            default_mem: be_u64(h, 8),
            default_cpus: be_u64(h, 16),
            count,
            offsets,
            sizes,
            crc32: be_u32(h, CRC_AT),
            without_crc: h.get(..CRC_AT).unwrap_or_default(),
        })
    }

    /// Walks the section table: each section must start where the previous one ended, lie
    /// inside the file and agree with its own header; the last must end the file.
    fn sections(&self, bytes: &'a [u8], image_len: u64) -> Result<Vec<Section<'a>>, EifError> {
        let mut out = Vec::with_capacity(usize::from(self.count));
        let mut cursor = EIF_HEADER_LEN as u64;
        let table = self.offsets.iter().zip(self.sizes.iter());
        for (index, (&offset, &size)) in table.take(usize::from(self.count)).enumerate() {
            if offset < cursor {
                return Err(EifError::OverlappingSection {
                    index,
                    offset,
                    expected: cursor,
                });
            }
            if offset > cursor {
                return Err(EifError::GapBeforeSection {
                    index,
                    offset,
                    expected: cursor,
                });
            }
            let past_end = EifError::SectionPastEnd {
                index,
                offset,
                size,
                len: image_len,
            };
            let end = offset
                .checked_add(SECTION_HEADER_LEN as u64)
                .and_then(|e| e.checked_add(size))
                .filter(|e| *e <= image_len)
                .ok_or(past_end)?;
            let range = |a: u64, b: u64| -> Option<&'a [u8]> {
                bytes.get(usize::try_from(a).ok()?..usize::try_from(b).ok()?)
            };
            let data_at = offset.saturating_add(SECTION_HEADER_LEN as u64);
            let (Some(header), Some(data)) = (range(offset, data_at), range(data_at, end)) else {
                return Err(EifError::SectionPastEnd {
                    index,
                    offset,
                    size,
                    len: image_len,
                });
            };
            let code = be_u16(header, 0);
            let flags = be_u16(header, 2);
            let own_size = be_u64(header, 4);
            let kind =
                SectionKind::from_code(code).ok_or(EifError::InvalidSectionType { index, code })?;
            if flags != 0 {
                return Err(EifError::SectionFlags { index, flags });
            }
            if own_size != size {
                return Err(EifError::SizeMismatch {
                    index,
                    table: size,
                    section: own_size,
                });
            }
            out.push(Section {
                kind,
                offset,
                size,
                header,
                data,
            });
            cursor = end;
        }
        if cursor < image_len {
            return Err(EifError::TrailingBytes {
                offset: cursor,
                len: image_len - cursor,
            });
        }
        Ok(out)
    }
}

/// One section, borrowed from the image.
struct Section<'a> {
    kind: SectionKind,
    offset: u64,
    size: u64,
    header: &'a [u8],
    data: &'a [u8],
}

/// The kernel first, the cmdline second, at least one ramdisk, at most one signature and one
/// metadata section.
fn check_layout(sections: &[Section<'_>]) -> Result<(), EifError> {
    for (index, expected) in [(0usize, SectionKind::Kernel), (1, SectionKind::Cmdline)] {
        match sections.get(index) {
            None => return Err(EifError::MissingSection { kind: expected }),
            Some(s) if s.kind != expected => {
                return Err(EifError::MisplacedSection {
                    index,
                    expected,
                    found: s.kind,
                });
            }
            Some(_) => {}
        }
    }
    let mut seen: BTreeMap<SectionKind, usize> = BTreeMap::new();
    for (index, s) in sections.iter().enumerate() {
        let n = seen.entry(s.kind).or_default();
        *n = n.saturating_add(1);
        if s.kind != SectionKind::Ramdisk && *n > 1 {
            return Err(EifError::DuplicateSection {
                index,
                kind: s.kind,
            });
        }
    }
    if !seen.contains_key(&SectionKind::Ramdisk) {
        return Err(EifError::MissingSection {
            kind: SectionKind::Ramdisk,
        });
    }
    Ok(())
}

/// Extracts the signing certificate's DER from a signature section:
/// CBOR `[{"signing_certificate": PEM, "signature": COSE_Sign1}, …]`, first element.
fn signing_certificate_der(data: &[u8]) -> Result<Vec<u8>, String> {
    use ciborium::Value;
    let mut rest = data;
    let value: Value = ciborium::from_reader(&mut rest).map_err(|e| format!("not cbor: {e}"))?;
    if !rest.is_empty() {
        return Err(format!("{} bytes follow the cbor item", rest.len()));
    }
    let Value::Array(items) = value else {
        return Err("not a cbor array of pcr signatures".into());
    };
    let Some(Value::Map(first)) = items.into_iter().next() else {
        return Err("the first pcr signature is missing or not a map".into());
    };
    let cert = first
        .into_iter()
        .find_map(|(k, v)| match k {
            Value::Text(t) if t == "signing_certificate" => Some(v),
            _ => None,
        })
        .ok_or_else(|| "no signing_certificate".to_string())?;
    let pem = match cert {
        Value::Bytes(b) => b,
        Value::Array(items) => items
            .into_iter()
            .map(|v| match v {
                Value::Integer(i) => u8::try_from(i128::from(i)).ok(),
                _ => None,
            })
            .collect::<Option<Vec<u8>>>()
            .ok_or_else(|| "signing_certificate is not a byte array".to_string())?,
        _ => return Err("signing_certificate is not bytes".into()),
    };
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem)
        .map_err(|e| format!("signing_certificate is not pem: {e}"))?;
    if pem.label != "CERTIFICATE" {
        return Err(format!(
            "signing_certificate pem label is {:?}, expected CERTIFICATE",
            pem.label
        ));
    }
    let (tail, _) = x509_parser::parse_x509_certificate(&pem.contents)
        .map_err(|e| format!("signing_certificate is not an x.509 certificate: {e}"))?;
    if !tail.is_empty() {
        return Err(format!(
            "{} bytes follow the signing certificate's der",
            tail.len()
        ));
    }
    Ok(pem.contents)
}

/// CRC-32/ISO-HDLC (the IEEE CRC of zlib, gzip and PNG): reflected polynomial 0xEDB88320,
/// initial value and final XOR all ones.
#[derive(Clone, Copy, Debug)]
pub struct Crc32(u32);

/// The byte-at-a-time lookup table, built at compile time.
const CRC_TABLE: [u32; 256] = crc_table();

// Indexing here runs in const evaluation over a fixed range: an out-of-range index would fail
// the build, never a run.
#[allow(clippy::indexing_slicing)]
const fn crc_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

impl Crc32 {
    /// A fresh CRC.
    pub const fn new() -> Self {
        Self(0xFFFF_FFFF)
    }

    /// Feeds bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        let mut c = self.0;
        for b in bytes {
            let i = usize::from((c as u8) ^ b);
            c = CRC_TABLE.get(i).copied().unwrap_or(0) ^ (c >> 8);
        }
        self.0 = c;
    }

    /// The CRC of everything fed.
    pub const fn finish(self) -> u32 {
        self.0 ^ 0xFFFF_FFFF
    }
}

impl Default for Crc32 {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_standard_check_value() {
        // The CRC-32/ISO-HDLC check value of "123456789" (the catalogue's test vector).
        let mut c = Crc32::new();
        c.update(b"123456789");
        assert_eq!(c.finish(), 0xCBF4_3926);
        let mut split = Crc32::new();
        split.update(b"1234");
        split.update(b"56789");
        assert_eq!(split.finish(), 0xCBF4_3926);
        assert_eq!(Crc32::new().finish(), 0);
    }

    #[test]
    fn header_length_matches_its_fields() {
        // magic, version, flags, mem, cpus, reserved, count, 2 × 32 u64, unused, crc.
        assert_eq!(
            4 + 2 + 2 + 8 + 8 + 2 + 2 + 2 * 8 * MAX_SECTIONS + 4 + 4,
            EIF_HEADER_LEN
        );
        assert_eq!(OFFSETS_AT, 4 + 2 + 2 + 8 + 8 + 2 + 2);
    }

    #[test]
    fn section_codes_round_trip_and_zero_is_invalid() {
        for k in [
            SectionKind::Kernel,
            SectionKind::Cmdline,
            SectionKind::Ramdisk,
            SectionKind::Signature,
            SectionKind::Metadata,
        ] {
            assert_eq!(SectionKind::from_code(k.code()), Some(k));
        }
        assert_eq!(SectionKind::from_code(0), None);
        assert_eq!(SectionKind::from_code(6), None);
    }

    #[test]
    fn extend_of_empty_digest_is_the_published_formula() {
        let d: [u8; 48] = Sha384::digest(b"").into();
        let mut concat = vec![0u8; 48];
        concat.extend_from_slice(&d);
        let expect: [u8; 48] = Sha384::digest(&concat).into();
        assert_eq!(extend(d).as_bytes(), &expect);
    }
}
