//! Newtypes for PCR indexes and values.
//!
//! A [`PcrIndex`] is 0..=31 by construction and a [`Pcr`] is exactly 48 bytes (SHA-384), so code
//! holding one never re-checks either. Both print and serialise as the operator types them: a
//! decimal index and lower-case hex.

use std::fmt;
use std::str::FromStr;

use serde::{Serialize, Serializer};

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
}
