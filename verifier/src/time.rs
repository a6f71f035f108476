//! Time as an explicit value.
//!
//! Nothing in this crate reads a clock. Every verification takes the instant it verifies at as
//! a [`UnixMillis`], and tests pin it. The binary is the only place that asks the operating
//! system what time it is, and only when the user did not say.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch, UTC. The unit the Nitro NSM uses for its `timestamp`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UnixMillis(u64);

impl UnixMillis {
    /// The instant `ms` milliseconds after 1970-01-01T00:00:00Z.
    pub const fn from_millis(ms: u64) -> Self {
        Self(ms)
    }

    /// The instant `s` seconds after the epoch, saturating at the far future.
    pub const fn from_secs(s: u64) -> Self {
        Self(s.saturating_mul(1000))
    }

    /// Milliseconds since the epoch.
    pub const fn as_millis(self) -> u64 {
        self.0
    }

    /// Whole seconds since the epoch (rounded down).
    pub const fn as_secs(self) -> u64 {
        self.0 / 1000
    }

    /// `self + ms`, or `None` on overflow.
    pub const fn checked_add_millis(self, ms: u64) -> Option<Self> {
        match self.0.checked_add(ms) {
            Some(v) => Some(Self(v)),
            None => None,
        }
    }

    /// Milliseconds from `earlier` to `self`, or `None` if `earlier` is later than `self`.
    pub const fn millis_since(self, earlier: Self) -> Option<u64> {
        self.0.checked_sub(earlier.0)
    }

    /// Converts a [`SystemTime`]; instants before the epoch become the epoch.
    pub fn from_system_time(t: SystemTime) -> Self {
        let ms = t
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        Self(ms)
    }

    /// The same instant as a [`SystemTime`].
    pub fn to_system_time(self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.0)
    }
}

impl fmt::Display for UnixMillis {
    /// RFC 3339 with milliseconds, e.g. `2022-10-13T08:58:02.136Z`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}",
            humantime::format_rfc3339_millis(self.to_system_time())
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays_rfc3339_millis() {
        assert_eq!(
            UnixMillis::from_millis(1_665_651_482_136).to_string(),
            "2022-10-13T08:58:02.136Z"
        );
    }

    #[test]
    fn millis_since_refuses_negative() {
        let a = UnixMillis::from_millis(10);
        let b = UnixMillis::from_millis(20);
        assert_eq!(b.millis_since(a), Some(10));
        assert_eq!(a.millis_since(b), None);
    }
}
