//! Newtypes for PCR indexes and values, and the one reader of PCR files.
//!
//! A [`PcrIndex`] is 0..=31 by construction and a [`Pcr`] is exactly 48 bytes (SHA-384), so code
//! holding one never re-checks either. Both print and serialise as the operator types them: a
//! decimal index and lower-case hex. [`parse_pcrs_json`] reads expected PCR values in every
//! JSON shape the project writes or accepts (the CLIs, the mock enclave, `nitro-cli`);
//! [`parse_pcr_assignment`] reads the `N=HEX` the command lines take for one PCR, and
//! [`names_an_image`] says whether a PCR set identifies an image.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Serialize, Serializer};
use thiserror::Error;

use super::AttestationError;

/// Number of PCRs an NSM has (indexes 0..=31).
pub const PCR_COUNT: usize = 32;

/// Length of a PCR value: the NSM's registers are SHA-384.
pub const PCR_LEN: usize = 48;

/// The index of a platform configuration register, 0..=31.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct PcrIndex(u8);

impl PcrIndex {
    /// PCR0: the whole enclave image.
    pub const IMAGE: Self = Self(0);
    /// PCR1: the kernel, its command line and the first ramdisk.
    pub const KERNEL: Self = Self(1);
    /// PCR2: the remaining ramdisks (the application).
    pub const APPLICATION: Self = Self(2);

    /// The index as a number.
    pub const fn get(self) -> u8 {
        self.0
    }

    /// All 32 indexes in order.
    pub fn all() -> impl Iterator<Item = Self> {
        (0u8..32).map(Self)
    }
}

impl TryFrom<u8> for PcrIndex {
    type Error = AttestationError;

    fn try_from(i: u8) -> Result<Self, Self::Error> {
        if usize::from(i) < PCR_COUNT {
            Ok(Self(i))
        } else {
            Err(AttestationError::PcrIndexOutOfRange {
                index: i128::from(i),
            })
        }
    }
}

impl FromStr for PcrIndex {
    type Err = AttestationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let n: i128 = s.trim().parse().map_err(|_| AttestationError::PcrValue {
            reason: format!(
                "pcr index {:?} is not a number",
                s.chars().take(16).collect::<String>()
            ),
        })?;
        u8::try_from(n)
            .ok()
            .and_then(|n| Self::try_from(n).ok())
            .ok_or(AttestationError::PcrIndexOutOfRange { index: n })
    }
}

impl fmt::Display for PcrIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The value of a PCR: a SHA-384 register.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Pcr([u8; PCR_LEN]);

impl Pcr {
    /// The all-zero register (what a debug-mode enclave reports for PCR0–2).
    pub const ZERO: Self = Self([0; PCR_LEN]);

    /// Wraps 48 bytes.
    pub const fn new(bytes: [u8; PCR_LEN]) -> Self {
        Self(bytes)
    }

    /// Parses 96 hex digits (either case; surrounding whitespace ignored).
    pub fn from_hex(s: &str) -> Result<Self, AttestationError> {
        let mut out = [0u8; PCR_LEN];
        hex::decode_to_slice(s.trim(), &mut out).map_err(|e| AttestationError::PcrValue {
            reason: format!("expected {} hex digits: {e}", PCR_LEN * 2),
        })?;
        Ok(Self(out))
    }

    /// Lower-case hex, 96 digits.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The 48 bytes.
    pub const fn as_bytes(&self) -> &[u8; PCR_LEN] {
        &self.0
    }

    /// Whether every byte is zero.
    pub fn is_zero(&self) -> bool {
        self.0.iter().all(|b| *b == 0)
    }
}

impl TryFrom<&[u8]> for Pcr {
    type Error = AttestationError;

    fn try_from(b: &[u8]) -> Result<Self, Self::Error> {
        <[u8; PCR_LEN]>::try_from(b)
            .map(Self)
            .map_err(|_| AttestationError::PcrValue {
                reason: format!("expected {PCR_LEN} bytes, got {}", b.len()),
            })
    }
}

impl FromStr for Pcr {
    type Err = AttestationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_hex(s)
    }
}

impl fmt::Display for Pcr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Pcr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pcr({})", self.to_hex())
    }
}

impl Serialize for Pcr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

/// Parses one PCR as the command lines write it, `N=HEX` (an index 0..=31 and 96 hex digits;
/// whitespace around either is ignored).
pub fn parse_pcr_assignment(s: &str) -> Result<(PcrIndex, Pcr), AttestationError> {
    let (i, h) = s
        .split_once('=')
        .ok_or_else(|| AttestationError::PcrValue {
            reason: format!(
                "expected N=HEX, got {:?}",
                s.chars().take(16).collect::<String>()
            ),
        })?;
    let index: PcrIndex = i.parse()?;
    let pcr = Pcr::from_hex(h).map_err(|_| AttestationError::PcrValue {
        reason: format!("PCR{index} is not {} hex digits", PCR_LEN * 2),
    })?;
    Ok((index, pcr))
}

/// Whether `pcrs` name an image: PCR0, PCR1 and PCR2 (image, kernel, application) present and
/// none of them zero (a debug-mode enclave reports zeros, which would name every one of them).
/// The rule for an `allow_image` act, the CLI that signs one, and the enclave's pinned images.
pub fn names_an_image(pcrs: &BTreeMap<PcrIndex, Pcr>) -> bool {
    [PcrIndex::IMAGE, PcrIndex::KERNEL, PcrIndex::APPLICATION]
        .iter()
        .all(|i| pcrs.get(i).is_some_and(|p| !p.is_zero()))
}

/// Serialises bytes as lower-case hex (for `--json`).
pub(crate) fn ser_hex<S: Serializer, T: AsRef<[u8]>>(b: &T, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode(b.as_ref()))
}

/// Serialises optional bytes as lower-case hex or `null`.
pub(crate) fn ser_hex_opt<S: Serializer>(b: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
    match b {
        Some(b) => s.serialize_some(&hex::encode(b)),
        None => s.serialize_none(),
    }
}

/// The largest PCR file (JSON) accepted.
pub const MAX_PCRS_JSON_LEN: usize = 64 * 1024;

/// Why a JSON document of PCR values was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum PcrsJsonError {
    /// More than [`MAX_PCRS_JSON_LEN`] bytes.
    #[error("a PCR file is at most {max} bytes, this one is {len}")]
    TooLong {
        /// The document's length.
        len: usize,
        /// [`MAX_PCRS_JSON_LEN`].
        max: usize,
    },
    /// Not JSON at all.
    #[error("not JSON: {reason}")]
    NotJson {
        /// What the parser said.
        reason: String,
    },
    /// JSON, but not an object (nor one under `Measurements`).
    #[error("not a JSON object of PCRs")]
    NotAnObject,
    /// A key that names a PCR (`PCRn`, `pcrn`, `n`) with no index 0 to 31.
    #[error("key {key:?} names no PCR index from 0 to 31")]
    BadIndex {
        /// The key (at most 32 characters of it).
        key: String,
    },
    /// A PCR's value is not a string of 96 hex digits.
    #[error("PCR{index} is not 48 bytes of hex")]
    BadValue {
        /// The PCR.
        index: PcrIndex,
    },
    /// Two keys name the same PCR (e.g. `PCR0` and `0`).
    #[error("PCR{index} is given twice")]
    Duplicate {
        /// The PCR.
        index: PcrIndex,
    },
    /// No key names a PCR.
    #[error("no PCR values (want {{\"PCR0\": \"hex\", ...}})")]
    Empty,
}

/// Parses expected PCR values from JSON: `{"PCR0": "hex", ...}`, `{"0": "hex", ...}`, or
/// `nitro-cli`'s `{"Measurements": {...}, "HashAlgorithm": ...}`.
///
/// A key names a PCR when it is `PCR` or `pcr` followed by anything, or all digits; such a key
/// must name an index from 0 to 31 and carry 96 hex digits, and no PCR may be named twice.
/// Other keys (metadata such as `HashAlgorithm`) are ignored. At least one PCR is required.
pub fn parse_pcrs_json(bytes: &[u8]) -> Result<BTreeMap<PcrIndex, Pcr>, PcrsJsonError> {
    if bytes.len() > MAX_PCRS_JSON_LEN {
        return Err(PcrsJsonError::TooLong {
            len: bytes.len(),
            max: MAX_PCRS_JSON_LEN,
        });
    }
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| PcrsJsonError::NotJson {
            reason: e.to_string(),
        })?;
    let object = value
        .get("Measurements")
        .unwrap_or(&value)
        .as_object()
        .ok_or(PcrsJsonError::NotAnObject)?;
    let mut out = BTreeMap::new();
    for (key, v) in object {
        let digits = key.strip_prefix("PCR").or_else(|| key.strip_prefix("pcr"));
        let names_a_pcr =
            digits.is_some() || (!key.is_empty() && key.bytes().all(|b| b.is_ascii_digit()));
        if !names_a_pcr {
            continue;
        }
        let digits = digits.unwrap_or(key);
        let index = Some(digits)
            .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|d| d.parse::<PcrIndex>().ok())
            .ok_or_else(|| PcrsJsonError::BadIndex {
                key: key.chars().take(32).collect(),
            })?;
        let pcr = v
            .as_str()
            .and_then(|h| Pcr::from_hex(h).ok())
            .ok_or(PcrsJsonError::BadValue { index })?;
        if out.insert(index, pcr).is_some() {
            return Err(PcrsJsonError::Duplicate { index });
        }
    }
    if out.is_empty() {
        return Err(PcrsJsonError::Empty);
    }
    Ok(out)
}

/// Why a PCR file could not be read.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum PcrsFileError {
    /// The file could not be opened or read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
    /// The file's bytes are not a PCR document ([`parse_pcrs_json`]), or more than
    /// [`MAX_PCRS_JSON_LEN`] of them.
    #[error("{}: {source}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong with its contents.
        source: PcrsJsonError,
    },
}

/// Reads a PCR file: at most [`MAX_PCRS_JSON_LEN`] bytes (one more is read, to tell a longer
/// file, a device or a pipe apart), parsed by [`parse_pcrs_json`]. The one PCR-file reader of
/// the enclave's command line, the operator's CLI and `attestplane-verify`.
pub fn read_pcrs_file(path: &Path) -> Result<BTreeMap<PcrIndex, Pcr>, PcrsFileError> {
    let io = |source| PcrsFileError::Io {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut bytes = Vec::new();
    file.take(MAX_PCRS_JSON_LEN as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    parse_pcrs_json(&bytes).map_err(|source| PcrsFileError::Invalid {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pcr_index_rejects_32_and_accepts_31() {
        assert!(PcrIndex::try_from(31).is_ok());
        assert_eq!(
            PcrIndex::try_from(32),
            Err(AttestationError::PcrIndexOutOfRange { index: 32 })
        );
        assert_eq!("8".parse::<PcrIndex>().map(PcrIndex::get), Ok(8));
        assert!(matches!(
            "x".parse::<PcrIndex>(),
            Err(AttestationError::PcrValue { .. })
        ));
        assert_eq!(
            "300".parse::<PcrIndex>(),
            Err(AttestationError::PcrIndexOutOfRange { index: 300 })
        );
    }

    #[test]
    fn pcr_hex_round_trips_and_rejects_wrong_length() {
        let h = "f4d48b81a460c9916d1e685119074bf24660afd3e34fae9fca0a0d28d9d5599936332687e6f66fc890ac8cf150142d8b";
        let p = Pcr::from_hex(h).unwrap();
        assert_eq!(p.to_hex(), h);
        assert!(!p.is_zero());
        assert!(Pcr::ZERO.is_zero());
        assert!(Pcr::from_hex(&h[2..]).is_err());
        assert!(Pcr::from_hex(&format!("{h}00")).is_err());
    }

    fn hex48(b: u8) -> String {
        hex::encode([b; 48])
    }

    #[test]
    fn pcrs_json_reads_every_shape_the_project_writes() {
        let flat = format!(
            r#"{{"PCR0":"{}","pcr1":"{}","2":"{}","HashAlgorithm":"Sha384 {{ ... }}"}}"#,
            hex48(1),
            hex48(2),
            hex48(3)
        );
        let map = parse_pcrs_json(flat.as_bytes()).unwrap();
        assert_eq!(map.keys().map(|i| i.get()).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(map.get(&PcrIndex::KERNEL), Some(&Pcr::new([2; 48])));
        let nested = format!(
            r#"{{"Measurements":{{"PCR0":"{}","8":"{}"}},"HashAlgorithm":"x"}}"#,
            hex48(1),
            hex48(9)
        );
        let map = parse_pcrs_json(nested.as_bytes()).unwrap();
        assert_eq!(map.keys().map(|i| i.get()).collect::<Vec<_>>(), [0, 8]);
    }

    #[test]
    fn pcrs_json_refuses_bad_keys_values_duplicates_and_empty_files() {
        let a = hex48(0xaa);
        let cases = [
            (format!(r#"{{"PCR32": "{a}"}}"#), "BadIndex"),
            (format!(r#"{{"PCRx": "{a}"}}"#), "BadIndex"),
            (format!(r#"{{"PCR": "{a}"}}"#), "BadIndex"),
            (format!(r#"{{"99999999999999999999": "{a}"}}"#), "BadIndex"),
            (r#"{"PCR0": "aabb"}"#.to_owned(), "BadValue"),
            (r#"{"PCR0": 7}"#.to_owned(), "BadValue"),
            (format!(r#"{{"PCR0": "{}"}}"#, "zz".repeat(48)), "BadValue"),
            (format!(r#"{{"PCR1": "{a}", "1": "{a}"}}"#), "Duplicate"),
            (format!(r#"{{"+1": "{a}", "HashAlgorithm": "x"}}"#), "Empty"),
            ("{}".to_owned(), "Empty"),
            ("[]".to_owned(), "NotAnObject"),
            ("{".to_owned(), "NotJson"),
            (
                format!(r#"{{"x": "{}"}}"#, " ".repeat(MAX_PCRS_JSON_LEN)),
                "TooLong",
            ),
        ];
        for (bad, want) in cases {
            let err = parse_pcrs_json(bad.as_bytes()).unwrap_err();
            assert!(format!("{err:?}").starts_with(want), "{bad:.40}: {err:?}");
        }
    }

    #[test]
    fn pcrs_file_reading_is_bounded_and_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.json");
        std::fs::write(&good, format!(r#"{{"PCR0": "{}"}}"#, hex48(1))).unwrap();
        assert_eq!(read_pcrs_file(&good).unwrap().len(), 1);
        // One byte over the limit (valid JSON but for its length) is refused by length.
        let long = dir.path().join("long.json");
        let json = format!(r#"{{"PCR0": "{}"}}"#, hex48(1));
        let pad = " ".repeat(MAX_PCRS_JSON_LEN + 1 - json.len());
        std::fs::write(&long, format!("{json}{pad}")).unwrap();
        let err = read_pcrs_file(&long).unwrap_err();
        assert!(
            matches!(&err, PcrsFileError::Invalid { path, source: PcrsJsonError::TooLong { .. } } if path == &long),
            "{err:?}"
        );
        assert!(
            err.to_string().starts_with(&long.display().to_string()),
            "{err}"
        );
        // An endless file is read only up to the limit.
        let err = read_pcrs_file(Path::new("/dev/zero")).unwrap_err();
        assert!(
            matches!(err, PcrsFileError::Invalid { source: PcrsJsonError::TooLong { len, .. }, .. } if len == MAX_PCRS_JSON_LEN + 1),
            "{err:?}"
        );
        let missing = dir.path().join("missing.json");
        let err = read_pcrs_file(&missing).unwrap_err();
        assert!(matches!(err, PcrsFileError::Io { .. }), "{err:?}");
        assert!(err.to_string().starts_with("cannot read "), "{err}");
    }
}
