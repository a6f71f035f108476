//! Tool pins: what a server's tools must look like for the gateway to show and call them.
//!
//! An operator registers a server with the digest of each tool it may offer
//! (`ServerSpec::tools`: name → digest). A tool's digest is
//! `SHA-256("attestplane/tool/v1" ‖ JCS(tool))` over the *whole* tool object as the server
//! lists it (name, title, description, schemas, annotations, `execution`, vendor fields):
//! [`tool_digest`]. JCS (RFC 8785, [`super::jcs`]) makes the digest independent of member order
//! and number spelling, and nothing else: a changed description, an invisible character (a
//! zero-width space), a widened schema all change it. A "rug pull" — a server that changes a
//! tool after it was approved — is thereby caught on the next listing.
//!
//! [`check_tools`] compares a listed tool set (every page of a `tools/list`, concatenated) with
//! the pins and sorts each tool into kept (name pinned, digest equal, listed once) or withheld,
//! with the kind of [`Drift`]:
//!
//! - [`Drift::Changed`]: the name is pinned, the definition is not the pinned one;
//! - [`Drift::Renamed`]: the name is not pinned, but the tool with its name set back to a
//!   pinned name that is missing from the listing has exactly that name's pinned digest;
//! - [`Drift::Unpinned`]: the name is not pinned (and it is no rename);
//! - [`Drift::Missing`]: a pinned name is not listed;
//! - [`Drift::Duplicate`]: a name is listed more than once (every copy is withheld: which one
//!   the server would run is not known);
//! - [`Drift::Invalid`]: the element has no string `name` or no canonical form (duplicate
//!   member names, a lone surrogate, a number that overflows), or a name longer than
//!   [`MAX_TOOL_NAME_LEN`] (no `tools/call` can name it). It is reported by its position, not
//!   its name, so every drift record is bounded and the drift of the largest listing
//!   ([`MAX_LISTED_TOOLS`] tools) fits one log entry: a hostile name cannot make the drift
//!   unloggable.
//!
//! The name set is pinned too: [`PinCheck::set_matches`] is true only if the listed names are
//! exactly the pinned ones and every tool is kept. A tool is callable only if it is kept
//! ([`PinCheck::kept_digest`]); the caller logs the drift and withholds the rest. Only an
//! admin act changes pins.
//!
//! ## What this module does not do
//!
//! It does not fetch pages, follow cursors or decide when to re-list (the gateway does, within
//! its own bound, and re-checks on `notifications/tools/list_changed`). It does not judge
//! whether a changed tool is harmless: any change withholds it until re-pinned.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use thiserror::Error;

use super::jcs::{self, JcsError};
use super::json::{self, Value};
pub use super::jsonrpc::MAX_TOOL_NAME_LEN;

/// A SHA-256 digest (a tool's pin) that serialises as hex.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Digest32(pub [u8; 32]);

impl serde::Serialize for Digest32 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(self.0))
    }
}

/// The domain tag hashed before a tool's canonical JSON.
pub const TOOL_DIGEST_DOMAIN: &str = "attestplane/tool/v1";

/// The most tools one listing (all pages) may hold.
pub const MAX_LISTED_TOOLS: usize = 4096;

/// The longest tool definition accepted, in bytes.
pub const MAX_TOOL_LEN: usize = 256 * 1024;

/// How many bytes of definitions one [`check_tools`] may re-canonicalise while it looks for
/// renames (each unpinned tool against each missing pinned name). Past it an unpinned tool is
/// reported as [`Drift::Unpinned`] rather than [`Drift::Renamed`]: withheld all the same, and
/// the same answer on replay, since the budget is spent in listing order.
pub const MAX_RENAME_WORK: usize = 16 * 1024 * 1024;

/// Why a tool definition has no digest.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum PinError {
    /// The definition is longer than [`MAX_TOOL_LEN`].
    #[error("tool definition is {len} bytes, more than the maximum {max}")]
    TooLong {
        /// Its length.
        len: usize,
        /// [`MAX_TOOL_LEN`].
        max: usize,
    },
    /// The definition is not a JSON object.
    #[error("tool definition is not a json object")]
    NotObject,
    /// The definition has no string `name`.
    #[error("tool definition has no string name")]
    NoName,
    /// The definition has no canonical form.
    #[error("tool definition has no canonical form: {0}")]
    Canonical(#[from] JcsError),
    /// The tool's name is longer than [`MAX_TOOL_NAME_LEN`]: no `tools/call` can name it.
    #[error("tool name is {len} bytes, more than the maximum {max}")]
    NameTooLong {
        /// Its length.
        len: usize,
        /// [`MAX_TOOL_NAME_LEN`].
        max: usize,
    },
    /// The listing differs from the pins in more than [`MAX_LISTED_TOOLS`] ways (its tools
    /// and the pinned tools it omits): more than one log entry may record.
    #[error("listing differs from its pins in {count} ways, more than the maximum {max}")]
    TooMuchDrift {
        /// How many.
        count: usize,
        /// [`MAX_LISTED_TOOLS`].
        max: usize,
    },
    /// The listing holds more than [`MAX_LISTED_TOOLS`] tools.
    #[error("listing holds {count} tools, more than the maximum {max}")]
    TooManyTools {
        /// How many.
        count: usize,
        /// [`MAX_LISTED_TOOLS`].
        max: usize,
    },
}

/// A tool definition's name and digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ToolDigest {
    /// The tool's `name`.
    pub name: String,
    /// `SHA-256("attestplane/tool/v1" ‖ JCS(tool))`.
    pub digest: Digest32,
}

fn digest_of_canonical(canonical: &str) -> Digest32 {
    let mut h = Sha256::new();
    h.update(TOOL_DIGEST_DOMAIN.as_bytes());
    h.update(canonical.as_bytes());
    Digest32(h.finalize().into())
}

/// The digest of the tool definition `tool` (JSON text of one element of `tools/list`'s
/// `tools`), and its name.
pub fn tool_digest(tool: &str) -> Result<ToolDigest, PinError> {
    if tool.len() > MAX_TOOL_LEN {
        return Err(PinError::TooLong {
            len: tool.len(),
            max: MAX_TOOL_LEN,
        });
    }
    let node = json::parse(tool).map_err(JcsError::from)?;
    if !matches!(node.value, Value::Object(_)) {
        return Err(PinError::NotObject);
    }
    let name = node
        .get("name")
        .and_then(|n| n.as_str())
        .ok_or(PinError::NoName)?;
    let canonical = jcs::canonicalize_node(&node)?;
    Ok(ToolDigest {
        name: name.to_owned(),
        digest: digest_of_canonical(&canonical),
    })
}

/// The digest `tool` would have if its `name` were `name`: how a rename is recognised.
fn digest_renamed(tool: &str, name: &str) -> Option<Digest32> {
    let mut node = json::parse(tool).ok()?;
    let Value::Object(members) = &mut node.value else {
        return None;
    };
    let member = members.iter_mut().find(|m| m.key == "name")?;
    member.value.value = Value::String(name.to_owned().into());
    jcs::canonicalize_node(&node)
        .ok()
        .map(|c| digest_of_canonical(&c))
}

/// How a listed tool, or a pinned one, differs from its pin.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Drift {
    /// The name is pinned; the definition is not the pinned one.
    Changed {
        /// The tool's name.
        name: String,
        /// The pinned digest.
        pinned: Digest32,
        /// The listed definition's digest.
        found: Digest32,
    },
    /// A pinned tool, unchanged but for its name.
    Renamed {
        /// The pinned name (missing from the listing).
        from: String,
        /// The listed name.
        to: String,
        /// The listed definition's digest.
        found: Digest32,
    },
    /// The name is not pinned.
    Unpinned {
        /// The listed name.
        name: String,
        /// The listed definition's digest.
        found: Digest32,
    },
    /// A pinned name the listing does not have.
    Missing {
        /// The pinned name.
        name: String,
        /// Its pinned digest.
        pinned: Digest32,
    },
    /// A name listed more than once.
    Duplicate {
        /// The name.
        name: String,
        /// How many times it is listed.
        count: usize,
    },
    /// An element with no name or no canonical form.
    Invalid {
        /// Its position in the listing, from 0.
        index: usize,
        /// Why.
        error: PinError,
    },
}

impl Drift {
    /// A stable short code for the kind: `changed`, `renamed`, `unpinned`, `missing`,
    /// `duplicate`, `invalid`.
    pub fn kind(&self) -> &'static str {
        match self {
            Drift::Changed { .. } => "changed",
            Drift::Renamed { .. } => "renamed",
            Drift::Unpinned { .. } => "unpinned",
            Drift::Missing { .. } => "missing",
            Drift::Duplicate { .. } => "duplicate",
            Drift::Invalid { .. } => "invalid",
        }
    }
}

/// A listed tool that matches its pin.
#[derive(Clone, Debug)]
pub struct KeptTool<'a> {
    /// Its position in the listing.
    pub index: usize,
    /// Its name.
    pub name: String,
    /// Its (pinned) digest.
    pub digest: Digest32,
    /// Its definition as listed, to forward byte for byte.
    pub raw: &'a RawValue,
}

/// The outcome of [`check_tools`].
#[derive(Clone, Debug)]
pub struct PinCheck<'a> {
    kept: Vec<KeptTool<'a>>,
    withheld: Vec<usize>,
    drift: Vec<Drift>,
}

impl<'a> PinCheck<'a> {
    /// The tools that match their pins, in listing order.
    pub fn kept(&self) -> &[KeptTool<'a>] {
        &self.kept
    }

    /// The kept definitions, in listing order: what a filtered `tools/list` shows (before the
    /// policy filter).
    pub fn kept_raw(&self) -> Vec<&'a RawValue> {
        self.kept.iter().map(|k| k.raw).collect()
    }

    /// Positions of the withheld tools in the listing.
    pub fn withheld(&self) -> &[usize] {
        &self.withheld
    }

    /// Every difference from the pins: per withheld tool, then the missing names (sorted).
    pub fn drift(&self) -> &[Drift] {
        &self.drift
    }

    /// The listed names are exactly the pinned ones and every tool is kept.
    pub fn set_matches(&self) -> bool {
        self.drift.is_empty()
    }

    /// The digest of `name` if it is kept: the only tools that may be called.
    pub fn kept_digest(&self, name: &str) -> Option<Digest32> {
        self.kept.iter().find(|k| k.name == name).map(|k| k.digest)
    }
}

/// Checks a listing (all pages' `tools` elements, in order) against `pins`.
pub fn check_tools<'a>(
    listed: &[&'a RawValue],
    pins: &BTreeMap<String, Digest32>,
) -> Result<PinCheck<'a>, PinError> {
    if listed.len() > MAX_LISTED_TOOLS {
        return Err(PinError::TooManyTools {
            count: listed.len(),
            max: MAX_LISTED_TOOLS,
        });
    }
    // A name no call can carry is invalid, reported by position: a drift record never holds
    // more than MAX_TOOL_NAME_LEN bytes of a listed name.
    let digests: Vec<Result<ToolDigest, PinError>> = listed
        .iter()
        .map(|t| {
            tool_digest(t.get()).and_then(|d| {
                if d.name.len() > MAX_TOOL_NAME_LEN {
                    Err(PinError::NameTooLong {
                        len: d.name.len(),
                        max: MAX_TOOL_NAME_LEN,
                    })
                } else {
                    Ok(d)
                }
            })
        })
        .collect();
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for d in digests.iter().flatten() {
        *counts.entry(d.name.as_str()).or_default() += 1;
    }
    let listed_names: BTreeSet<&str> = counts.keys().copied().collect();
    // Pinned names absent from the listing: candidates for a rename, else missing.
    let mut absent: BTreeSet<&str> = pins
        .keys()
        .map(String::as_str)
        .filter(|n| !listed_names.contains(n))
        .collect();

    let mut check = PinCheck {
        kept: Vec::new(),
        withheld: Vec::new(),
        drift: Vec::new(),
    };
    let mut reported_duplicates: BTreeSet<&str> = BTreeSet::new();
    let mut rename_budget = MAX_RENAME_WORK;
    for (index, (raw, d)) in listed.iter().zip(&digests).enumerate() {
        let d = match d {
            Ok(d) => d,
            Err(error) => {
                check.withheld.push(index);
                check.drift.push(Drift::Invalid {
                    index,
                    error: error.clone(),
                });
                continue;
            }
        };
        let count = counts.get(d.name.as_str()).copied().unwrap_or(0);
        if count > 1 {
            check.withheld.push(index);
            if reported_duplicates.insert(d.name.as_str()) {
                check.drift.push(Drift::Duplicate {
                    name: d.name.clone(),
                    count,
                });
            }
            continue;
        }
        match pins.get(&d.name) {
            Some(pinned) if *pinned == d.digest => check.kept.push(KeptTool {
                index,
                name: d.name.clone(),
                digest: d.digest,
                raw,
            }),
            Some(pinned) => {
                check.withheld.push(index);
                check.drift.push(Drift::Changed {
                    name: d.name.clone(),
                    pinned: *pinned,
                    found: d.digest,
                });
            }
            None => {
                check.withheld.push(index);
                let renamed_from = absent.iter().copied().find(|from| {
                    let Some(left) = rename_budget.checked_sub(raw.get().len()) else {
                        return false;
                    };
                    rename_budget = left;
                    pins.get(*from)
                        .is_some_and(|p| digest_renamed(raw.get(), from) == Some(*p))
                });
                match renamed_from {
                    Some(from) => {
                        absent.remove(from);
                        check.drift.push(Drift::Renamed {
                            from: from.to_owned(),
                            to: d.name.clone(),
                            found: d.digest,
                        });
                    }
                    None => check.drift.push(Drift::Unpinned {
                        name: d.name.clone(),
                        found: d.digest,
                    }),
                }
            }
        }
    }
    for name in absent {
        if let Some(pinned) = pins.get(name) {
            check.drift.push(Drift::Missing {
                name: name.to_owned(),
                pinned: *pinned,
            });
        }
    }
    // A log entry holds at most MAX_LISTED_TOOLS drift records (the entry format's
    // MAX_DRIFT_RECORDS): every listed tool and every pin absent from the listing is at most one
    // record, so a full listing that also omits a pinned tool would be over it, and an entry
    // holding it would be one no verifier reads. Such a listing is refused as a whole.
    if check.drift.len() > MAX_LISTED_TOOLS {
        return Err(PinError::TooMuchDrift {
            count: check.drift.len(),
            max: MAX_LISTED_TOOLS,
        });
    }
    Ok(check)
}

#[cfg(test)]
mod tests {
    use super::*;

    const READ: &str = r#"{"name":"read","description":"Read a file.","inputSchema":{"type":"object","properties":{"path":{"type":"string"}},"required":["path"]}}"#;
    const WRITE: &str = r#"{"name":"write","description":"Write a file.","inputSchema":{"type":"object","properties":{"path":{"type":"string","maxLength":1e3}}}}"#;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_owned()).unwrap()
    }

    fn pins(tools: &[&str]) -> BTreeMap<String, Digest32> {
        tools
            .iter()
            .map(|t| {
                let d = tool_digest(t).unwrap();
                (d.name, d.digest)
            })
            .collect()
    }

    fn check<'a>(listed: &'a [Box<RawValue>], pins: &BTreeMap<String, Digest32>) -> PinCheck<'a> {
        let refs: Vec<&RawValue> = listed.iter().map(|b| b.as_ref()).collect();
        check_tools(&refs, pins).unwrap()
    }

    #[test]
    fn digest_is_domain_tagged_sha256_of_jcs() {
        let d = tool_digest(READ).unwrap();
        let canonical = jcs::canonicalize(READ).unwrap();
        let expected: [u8; 32] =
            Sha256::digest(format!("attestplane/tool/v1{canonical}").as_bytes()).into();
        assert_eq!(d.digest, Digest32(expected));
        assert_eq!(d.name, "read");
    }

    #[test]
    fn reordered_members_and_respelled_numbers_keep_the_digest() {
        let reordered = r#"{ "inputSchema": {"properties":{"path":{"maxLength":1000,"type":"string"}},"type":"object"},
            "description":"Write a file.", "name":"write"}"#;
        assert_eq!(tool_digest(WRITE).unwrap(), tool_digest(reordered).unwrap());
        let listed = [raw(reordered)];
        let c = check(&listed, &pins(&[WRITE]));
        assert!(c.set_matches());
        assert_eq!(
            c.kept_digest("write"),
            Some(tool_digest(WRITE).unwrap().digest)
        );
    }

    #[test]
    fn rug_pull_with_a_zero_width_space_is_withheld() {
        let pulled = READ.replace("Read a file.", "Read a\u{200b} file.");
        let listed = [raw(&pulled), raw(WRITE)];
        let p = pins(&[READ, WRITE]);
        let c = check(&listed, &p);
        assert_eq!(c.kept().len(), 1);
        assert_eq!(c.kept()[0].name, "write");
        assert_eq!(c.withheld(), [0]);
        assert_eq!(
            c.kept_digest("read"),
            None,
            "a changed tool may not be called"
        );
        assert!(matches!(c.drift(), [Drift::Changed { name, .. }] if name == "read"));
        assert!(!c.set_matches());
    }

    #[test]
    fn widened_schema_and_new_vendor_field_are_changes() {
        for pulled in [
            READ.replace(r#""required":["path"]"#, r#""required":[]"#),
            READ.replace(r#""name":"read","#, r#""name":"read","x-vendor":1,"#),
            READ.replace(
                r#""name":"read","#,
                r#""name":"read","execution":{"taskSupport":"optional"},"#,
            ),
        ] {
            let listed = [raw(&pulled)];
            let c = check(&listed, &pins(&[READ]));
            assert_eq!(c.drift()[0].kind(), "changed", "{pulled}");
            assert!(c.kept().is_empty());
        }
    }

    #[test]
    fn rename_is_drift_even_though_the_definition_is_the_pinned_one() {
        let renamed = READ.replace(r#""name":"read""#, r#""name":"read_file""#);
        let listed = [raw(&renamed)];
        let c = check(&listed, &pins(&[READ]));
        assert!(c.kept().is_empty());
        assert_eq!(
            c.drift(),
            [Drift::Renamed {
                from: "read".into(),
                to: "read_file".into(),
                found: tool_digest(&renamed).unwrap().digest,
            }]
        );
    }

    #[test]
    fn swapped_names_are_changes_not_kept() {
        // Two pinned tools whose names are swapped: each name is pinned, neither definition is.
        let a = READ.replace(r#""name":"read""#, r#""name":"write""#);
        let b = WRITE.replace(r#""name":"write""#, r#""name":"read""#);
        let listed = [raw(&a), raw(&b)];
        let c = check(&listed, &pins(&[READ, WRITE]));
        assert!(c.kept().is_empty());
        assert!(c.drift().iter().all(|d| d.kind() == "changed"));
    }

    #[test]
    fn unpinned_missing_duplicate_and_invalid_tools() {
        let extra = r#"{"name":"exec","description":"Run anything."}"#;
        let listed = [
            raw(extra),
            raw(WRITE),
            raw(WRITE),
            raw(r#"{"description":"no name"}"#),
            raw(r#"{"name":"dup","a":1,"a":2}"#),
            raw("[1]"),
        ];
        let c = check(&listed, &pins(&[READ, WRITE]));
        assert!(c.kept().is_empty());
        assert_eq!(c.withheld(), [0, 1, 2, 3, 4, 5]);
        let kinds: Vec<&str> = c.drift().iter().map(Drift::kind).collect();
        assert_eq!(
            kinds,
            [
                "unpinned",
                "duplicate",
                "invalid",
                "invalid",
                "invalid",
                "missing"
            ]
        );
        assert!(matches!(&c.drift()[5], Drift::Missing { name, .. } if name == "read"));
    }

    #[test]
    fn a_hostile_tool_name_longer_than_any_call_can_carry_is_invalid_by_position() {
        // The old check reported it under its name: a few names of up to MAX_TOOL_LEN each
        // made the drift entry too large to log, and the endpoint's listings failed for as
        // long as the server listed them.
        let long = format!(r#"{{"name":"{}","inputSchema":{{}}}}"#, "n".repeat(200_000));
        let edge = format!(
            r#"{{"name":"{}","inputSchema":{{}}}}"#,
            "é".repeat(MAX_TOOL_NAME_LEN / 2)
        );
        let listed = [raw(&long), raw(READ), raw(&edge)];
        let c = check(&listed, &pins(&[READ]));
        assert_eq!(c.kept().len(), 1, "the pinned tool is kept");
        match &c.drift()[0] {
            Drift::Invalid {
                index: 0,
                error: PinError::NameTooLong { len, max },
            } => assert_eq!((*len, *max), (200_000, MAX_TOOL_NAME_LEN)),
            other => panic!("{other:?}"),
        }
        // A name of exactly the bound is a name.
        assert!(
            matches!(&c.drift()[1], Drift::Unpinned { name, .. } if name.len() == MAX_TOOL_NAME_LEN)
        );
    }

    #[test]
    fn a_full_listing_that_also_omits_a_pin_is_refused_as_a_whole() {
        // 4096 unpinned tools and a pinned tool missing: 4097 drift records, one more than an
        // entry may hold. The old check reported them all, and the entry recording them was one
        // no verifier reads (so the log no longer replayed, nor the enclave restarted).
        let listed: Vec<Box<RawValue>> = (0..MAX_LISTED_TOOLS)
            .map(|i| raw(&format!(r#"{{"name":"t{i}"}}"#)))
            .collect();
        let refs: Vec<&RawValue> = listed.iter().map(|b| b.as_ref()).collect();
        match check_tools(&refs, &pins(&[READ])) {
            Err(PinError::TooMuchDrift { count, max }) => {
                assert_eq!((count, max), (MAX_LISTED_TOOLS + 1, MAX_LISTED_TOOLS));
            }
            other => panic!("{:?}", other.map(|c| c.drift().len())),
        }
        // One fewer tool: recorded in full.
        assert_eq!(
            check_tools(&refs[1..], &pins(&[READ]))
                .unwrap()
                .drift()
                .len(),
            MAX_LISTED_TOOLS
        );
    }

    #[test]
    fn rename_search_is_bounded() {
        // Many unpinned tools against many missing pins: the search stops at the budget, and
        // every tool is still withheld.
        let pinned: Vec<String> = (0..64)
            .map(|i| READ.replace(r#""name":"read""#, &format!(r#""name":"p{i}""#)))
            .collect();
        let p = pins(&pinned.iter().map(String::as_str).collect::<Vec<_>>());
        let big = "x".repeat(200_000);
        let listed: Vec<Box<RawValue>> = (0..64)
            .map(|i| raw(&format!(r#"{{"name":"u{i}","description":"{big}"}}"#)))
            .collect();
        let c = check(&listed, &p);
        assert!(c.kept().is_empty());
        assert_eq!(c.withheld().len(), 64);
    }

    #[test]
    fn empty_pins_keep_nothing() {
        let listed = [raw(READ)];
        let c = check(&listed, &BTreeMap::new());
        assert!(c.kept().is_empty());
        assert_eq!(c.drift()[0].kind(), "unpinned");
    }

    #[test]
    fn refuses_oversized_listings() {
        let one = raw(READ);
        let listed: Vec<&RawValue> =
            std::iter::repeat_n(one.as_ref(), MAX_LISTED_TOOLS + 1).collect();
        assert!(matches!(
            check_tools(&listed, &BTreeMap::new()),
            Err(PinError::TooManyTools { .. })
        ));
    }
}
