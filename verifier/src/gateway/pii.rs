//! Personal data and secrets in tool arguments and results: detection after normalisation,
//! findings as types, counts and hashes, redaction in place.
//!
//! The gateway scans what an agent sends a tool (arguments) and what comes back (results,
//! structured content); the per-tool policy chooses allow, redact or refuse. This module only
//! finds and, when asked, redacts; the choice is the caller's.
//!
//! ## Normalisation
//!
//! Text is matched after each character is put in NFKC form (full-width digits `４１１１` become
//! `4111`, ligatures and compatibility forms fold) and the invisible characters U+200B–U+200D,
//! U+2060, U+FEFF and U+00AD are dropped, so `jo\u{200b}hn@example.com` is an email. Every byte
//! of the normalised text maps back to the original character it came from, so a redaction
//! covers exactly the original characters of the match, zero-width ones included.
//!
//! ## Types and their rules
//!
//! | kind | matched | refused (not a finding) |
//! |---|---|---|
//! | `email` | `local@label.label.tld`, TLD of 2–24 letters | a domain without a letter TLD (`pkg@1.2.3`) |
//! | `phone` | E.164 with `+`: 8–15 digits, spaces, dots, dashes, parentheses between | no `+` (bare digit runs are ids and timestamps) |
//! | `card` | 13–19 digits, optionally grouped by single spaces or dashes | a number that fails the Luhn check |
//! | `iban` | two letters, two check digits, the country's length | unknown country, wrong length, mod-97 ≠ 1 |
//! | `national_id` | US SSN `AAA-GG-SSSS` or `AAA GG SSSS` | area 000, 666 or 9xx; group 00; serial 0000; one digit repeated; the published samples 078-05-1120, 219-09-9999, 123-45-6789 |
//! | `ip_address` | IPv4 dotted quad, IPv6 (as `std::net` parses them) | version strings (`10.0.19041.1`), words around (`Vec::new`) |
//! | `cloud_key` | AWS access key ids (`AKIA`, `ASIA`, `ABIA`, `ACCA`, `A3T?` + 16) | — |
//! | `jwt` | three base64url parts whose first decodes to a JSON object with `alg` | — |
//! | `private_key` | PEM `-----BEGIN … PRIVATE KEY-----` through its END line (or the end of the text), `AGE-SECRET-KEY-1…` | — |
//!
//! Overlapping matches: the earliest wins, then the longest.
//!
//! ## JSON
//!
//! [`scan_json`] and [`redact_json`] walk a JSON value with [`super::json`] and scan every
//! string leaf, every number leaf (a card sent as a number) and every member name, except the
//! top-level members the caller names (the gateway passes `_meta`). Redaction replaces each
//! match with `[REDACTED:<kind>]` inside the string (a number with a finding becomes that
//! string; a member name gets a numbered marker so names stay distinct) and splices the new
//! string over the old bytes: everything else keeps its bytes.
//!
//! A finding records the kind and the SHA-256 of the normalised matched text, never the value.
//! Hashes of low-entropy values (a phone number, an SSN) can be reversed by trying every value;
//! they serve to correlate findings across entries, not to hide the value from an auditor who
//! sees the log.
//!
//! ## Bounds
//!
//! Matching uses the `regex` crate (linear time, no backtracking); each candidate's check is
//! linear in its length. Input is bounded by [`MAX_SCAN_LEN`], findings by [`MAX_FINDINGS`]
//! (past it the scan fails, and the caller refuses: fail closed).
//!
//! ## What this module does not do
//!
//! It does not decode blobs (base64 images, resources): what is not text is not scanned. It
//! finds no names, addresses or free-form secrets (passwords in prose); it does not look at
//! context words. It does not decide what to do with a finding.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::sync::OnceLock;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use regex::Regex;
use sha2::{Digest, Sha256};
use thiserror::Error;
use unicode_normalization::UnicodeNormalization;

use super::json::{self, JsonError, Node, Value};

/// The longest text (or JSON value) scanned, in bytes.
pub const MAX_SCAN_LEN: usize = 4 * 1024 * 1024;

/// The most findings one scan reports; past it the scan fails.
pub const MAX_FINDINGS: usize = 10_000;

/// A kind of personal data or secret.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PiiKind {
    /// An email address.
    Email,
    /// A phone number in E.164 form.
    Phone,
    /// A payment card number (Luhn-valid).
    Card,
    /// An IBAN (mod-97-valid, of its country's length).
    Iban,
    /// A national id (US SSN).
    NationalId,
    /// An IPv4 or IPv6 address.
    IpAddress,
    /// A cloud access key id.
    CloudKey,
    /// A JSON Web Token.
    Jwt,
    /// A private key.
    PrivateKey,
}

impl PiiKind {
    /// Every kind, in a fixed order.
    pub const ALL: [PiiKind; 9] = [
        PiiKind::Email,
        PiiKind::Phone,
        PiiKind::Card,
        PiiKind::Iban,
        PiiKind::NationalId,
        PiiKind::IpAddress,
        PiiKind::CloudKey,
        PiiKind::Jwt,
        PiiKind::PrivateKey,
    ];

    /// The stable name (`email`, `phone`, `card`, `iban`, `national_id`, `ip_address`,
    /// `cloud_key`, `jwt`, `private_key`): what entries and Cedar's `context.pii` carry.
    pub const fn as_str(self) -> &'static str {
        match self {
            PiiKind::Email => "email",
            PiiKind::Phone => "phone",
            PiiKind::Card => "card",
            PiiKind::Iban => "iban",
            PiiKind::NationalId => "national_id",
            PiiKind::IpAddress => "ip_address",
            PiiKind::CloudKey => "cloud_key",
            PiiKind::Jwt => "jwt",
            PiiKind::PrivateKey => "private_key",
        }
    }
}

impl fmt::Display for PiiKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One finding: a kind and the SHA-256 of the normalised value. Never the value.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Finding {
    /// What was found.
    pub kind: PiiKind,
    /// SHA-256 of the matched text after normalisation.
    pub sha256: [u8; 32],
}

impl fmt::Debug for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Finding({}, {})", self.kind, hex::encode(self.sha256))
    }
}

/// A finding in a text, with where it is.
#[derive(Clone, PartialEq, Eq)]
pub struct Match {
    /// The finding.
    pub finding: Finding,
    /// The byte range of the original text it covers.
    pub range: Range<usize>,
}

impl fmt::Debug for Match {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Match({:?}, {:?})", self.finding, self.range)
    }
}

/// The findings of one scan, in document order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScanReport {
    /// Every finding.
    pub findings: Vec<Finding>,
}

impl ScanReport {
    /// How many findings of each kind (kinds with none are absent).
    pub fn counts(&self) -> BTreeMap<PiiKind, u64> {
        let mut out = BTreeMap::new();
        for f in &self.findings {
            *out.entry(f.kind).or_insert(0u64) += 1;
        }
        out
    }

    /// Whether nothing was found.
    pub fn is_empty(&self) -> bool {
        self.findings.is_empty()
    }
}

/// Why a scan failed (the caller refuses the message).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum PiiError {
    /// The input is longer than [`MAX_SCAN_LEN`].
    #[error("input is {len} bytes, more than the scan limit {max}")]
    TooLong {
        /// Its length.
        len: usize,
        /// [`MAX_SCAN_LEN`].
        max: usize,
    },
    /// More than [`MAX_FINDINGS`] findings.
    #[error("more than {max} findings")]
    TooManyFindings {
        /// [`MAX_FINDINGS`].
        max: usize,
    },
    /// The input is not accepted JSON.
    #[error("not json: {0}")]
    Json(#[from] JsonError),
    /// Redacting member names made two of them equal.
    #[error("redaction would make member names collide")]
    NameCollision,
    /// Redaction kept uncovering values past [`MAX_REDACTION_PASSES`] passes.
    #[error("redaction did not converge")]
    RedactionUnstable,
    /// The patterns did not compile (a bug in this module).
    #[error("internal pii scanner error")]
    Internal,
}

/// Text after normalisation, with each byte's original range.
struct Normalized {
    text: String,
    origin: Vec<Range<usize>>,
}

fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{200B}'..='\u{200D}' | '\u{2060}' | '\u{FEFF}' | '\u{00AD}'
    )
}

fn normalize(original: &str) -> Normalized {
    let mut text = String::with_capacity(original.len());
    let mut origin = Vec::with_capacity(original.len());
    for (i, c) in original.char_indices() {
        if is_invisible(c) {
            continue;
        }
        let range = i..i + c.len_utf8();
        if c.is_ascii() {
            text.push(c);
            origin.push(range);
            continue;
        }
        for n in std::iter::once(c).nfkc() {
            if is_invisible(n) {
                continue;
            }
            text.push(n);
            for _ in 0..n.len_utf8() {
                origin.push(range.clone());
            }
        }
    }
    Normalized { text, origin }
}

impl Normalized {
    /// The original byte range of the normalised range `r`.
    fn original(&self, r: &Range<usize>) -> Option<Range<usize>> {
        let first = self.origin.get(r.start)?;
        let last = self.origin.get(r.end.checked_sub(1)?)?;
        Some(first.start..last.end)
    }
}

struct Patterns {
    email: Regex,
    phone: Regex,
    digits: Regex,
    iban: Regex,
    ssn: Regex,
    ipv4: Regex,
    ipv6: Regex,
    aws: Regex,
    jwt: Regex,
    pem: Regex,
    age: Regex,
}

fn patterns() -> Option<&'static Patterns> {
    static P: OnceLock<Option<Patterns>> = OnceLock::new();
    P.get_or_init(|| {
        let r = |p: &str| Regex::new(p).ok();
        Some(Patterns {
            email: r(
                r"[A-Za-z0-9._%+\-]{1,64}@(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.){1,8}[A-Za-z]{2,24}",
            )?,
            phone: r(r"\+[1-9](?:[ .\-]?\(?[0-9]\)?){6,18}")?,
            digits: r(r"[0-9]+(?:[ \-][0-9]+)*")?,
            iban: r(r"[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]){10,32}")?,
            ssn: r(r"[0-9]{3}([ \-])[0-9]{2}[ \-][0-9]{4}")?,
            ipv4: r(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}")?,
            ipv6: r(r"[0-9A-Fa-f:]*:[0-9A-Fa-f:]*(?:[0-9]{1,3}(?:\.[0-9]{1,3}){3})?")?,
            aws: r(r"(?:AKIA|ASIA|ABIA|ACCA|A3T[A-Z0-9])[A-Z0-9]{16}")?,
            jwt: r(r"eyJ[A-Za-z0-9_\-]{2,}\.[A-Za-z0-9_\-]{2,}\.[A-Za-z0-9_\-]*")?,
            pem: r(
                r"(?s)-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\z)",
            )?,
            age: r(r"AGE-SECRET-KEY-1[QPZRY9X8GF2TVDW0S3JN54KHCE6MUA7L]{58}")?,
        })
    })
    .as_ref()
}

fn byte_before(text: &str, at: usize) -> Option<u8> {
    at.checked_sub(1)
        .and_then(|i| text.as_bytes().get(i).copied())
}

fn byte_at(text: &str, at: usize) -> Option<u8> {
    text.as_bytes().get(at).copied()
}

fn is_word(b: Option<u8>) -> bool {
    b.is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn is_digit(b: Option<u8>) -> bool {
    b.is_some_and(|b| b.is_ascii_digit())
}

/// The Luhn check over ASCII digits.
pub fn luhn_valid(digits: &[u8]) -> bool {
    let mut sum = 0u32;
    for (i, d) in digits.iter().rev().enumerate() {
        let mut v = u32::from(d.wrapping_sub(b'0'));
        if v > 9 {
            return false;
        }
        if i % 2 == 1 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    !digits.is_empty() && sum.is_multiple_of(10)
}

/// IBAN lengths by country (ISO 13616 registry).
const IBAN_LENGTHS: &[(&str, usize)] = &[
    ("AD", 24),
    ("AE", 23),
    ("AL", 28),
    ("AT", 20),
    ("AZ", 28),
    ("BA", 20),
    ("BE", 16),
    ("BG", 22),
    ("BH", 22),
    ("BI", 27),
    ("BR", 29),
    ("BY", 28),
    ("CH", 21),
    ("CR", 22),
    ("CY", 28),
    ("CZ", 24),
    ("DE", 22),
    ("DJ", 27),
    ("DK", 18),
    ("DO", 28),
    ("EE", 20),
    ("EG", 29),
    ("ES", 24),
    ("FI", 18),
    ("FK", 18),
    ("FO", 18),
    ("FR", 27),
    ("GB", 22),
    ("GE", 22),
    ("GI", 23),
    ("GL", 18),
    ("GR", 27),
    ("GT", 28),
    ("HR", 21),
    ("HU", 28),
    ("IE", 22),
    ("IL", 23),
    ("IQ", 23),
    ("IS", 26),
    ("IT", 27),
    ("JO", 30),
    ("KW", 30),
    ("KZ", 20),
    ("LB", 28),
    ("LC", 32),
    ("LI", 21),
    ("LT", 20),
    ("LU", 20),
    ("LV", 21),
    ("LY", 25),
    ("MC", 27),
    ("MD", 24),
    ("ME", 22),
    ("MK", 19),
    ("MN", 20),
    ("MR", 27),
    ("MT", 31),
    ("MU", 30),
    ("NI", 28),
    ("NL", 18),
    ("NO", 15),
    ("OM", 23),
    ("PK", 24),
    ("PL", 28),
    ("PS", 29),
    ("PT", 25),
    ("QA", 29),
    ("RO", 24),
    ("RS", 22),
    ("RU", 33),
    ("SA", 24),
    ("SC", 31),
    ("SD", 18),
    ("SE", 24),
    ("SI", 19),
    ("SK", 24),
    ("SM", 27),
    ("SO", 23),
    ("ST", 25),
    ("SV", 28),
    ("TL", 23),
    ("TN", 24),
    ("TR", 26),
    ("UA", 29),
    ("VA", 22),
    ("VG", 24),
    ("XK", 20),
    ("YE", 30),
];

/// The mod-97 check of ISO 13616 over an IBAN without spaces.
pub fn iban_valid(iban: &[u8]) -> bool {
    let Some(country) = iban.get(..2).and_then(|c| std::str::from_utf8(c).ok()) else {
        return false;
    };
    let Some(&(_, len)) = IBAN_LENGTHS.iter().find(|(c, _)| *c == country) else {
        return false;
    };
    if iban.len() != len {
        return false;
    }
    let (head, tail) = iban.split_at(4.min(iban.len()));
    let mut rem = 0u32;
    for &b in tail.iter().chain(head) {
        let v = match b {
            b'0'..=b'9' => u32::from(b - b'0'),
            b'A'..=b'Z' => u32::from(b - b'A') + 10,
            _ => return false,
        };
        rem = if v >= 10 {
            (rem * 100 + v) % 97
        } else {
            (rem * 10 + v) % 97
        };
    }
    rem == 1
}

/// Whether `area-group-serial` is an SSN that could have been issued.
pub fn ssn_valid(area: &str, group: &str, serial: &str) -> bool {
    let all = format!("{area}{group}{serial}");
    if area == "000" || area == "666" || area.starts_with('9') {
        return false;
    }
    if group == "00" || serial == "0000" {
        return false;
    }
    if all.bytes().all(|b| Some(&b) == all.as_bytes().first()) {
        return false;
    }
    !matches!(all.as_str(), "078051120" | "219099999" | "123456789")
}

fn jwt_header_ok(token: &str) -> bool {
    let Some(header) = token.split('.').next() else {
        return false;
    };
    let Ok(bytes) = URL_SAFE_NO_PAD.decode(header) else {
        return false;
    };
    matches!(
        serde_json::from_slice::<serde_json::Value>(&bytes),
        Ok(serde_json::Value::Object(m)) if m.contains_key("alg")
    )
}

/// Finds every match in `original` (ranges in its bytes).
pub fn scan_text(original: &str) -> Result<Vec<Match>, PiiError> {
    if original.len() > MAX_SCAN_LEN {
        return Err(PiiError::TooLong {
            len: original.len(),
            max: MAX_SCAN_LEN,
        });
    }
    let p = patterns().ok_or(PiiError::Internal)?;
    let norm = normalize(original);
    let t = norm.text.as_str();
    let mut raw: Vec<(PiiKind, Range<usize>)> = Vec::new();

    for m in p.pem.find_iter(t) {
        raw.push((PiiKind::PrivateKey, m.range()));
    }
    for m in p.age.find_iter(t) {
        raw.push((PiiKind::PrivateKey, m.range()));
    }
    for m in p.jwt.find_iter(t) {
        if !is_word(byte_before(t, m.start())) && jwt_header_ok(m.as_str()) {
            raw.push((PiiKind::Jwt, m.range()));
        }
    }
    for m in p.aws.find_iter(t) {
        if !is_word(byte_before(t, m.start())) && !is_word(byte_at(t, m.end())) {
            raw.push((PiiKind::CloudKey, m.range()));
        }
    }
    for m in p.email.find_iter(t) {
        let before = byte_before(t, m.start());
        let after = byte_at(t, m.end());
        if !before.is_some_and(|b| b.is_ascii_alphanumeric() || b"._%+-".contains(&b))
            && !is_word(after)
        {
            raw.push((PiiKind::Email, m.range()));
        }
    }
    for m in p.iban.find_iter(t) {
        if is_word(byte_before(t, m.start())) {
            continue;
        }
        // Take the country's length of characters, skipping single spaces.
        let country = m.as_str().get(..2).unwrap_or("");
        let Some(&(_, len)) = IBAN_LENGTHS.iter().find(|(c, _)| *c == country) else {
            continue;
        };
        let mut compact = Vec::with_capacity(len);
        let mut end = m.start();
        for (i, b) in m.as_str().bytes().enumerate() {
            if compact.len() == len {
                break;
            }
            if b != b' ' {
                compact.push(b);
                end = m.start() + i + 1;
            }
        }
        if compact.len() == len && !is_word(byte_at(t, end)) && iban_valid(&compact) {
            raw.push((PiiKind::Iban, m.start()..end));
        }
    }
    for m in p.ssn.find_iter(t) {
        let s = m.as_str();
        let sep = s.as_bytes().get(3).copied();
        if s.as_bytes().get(6).copied() != sep
            || is_word(byte_before(t, m.start()))
            || is_word(byte_at(t, m.end()))
            || byte_before(t, m.start()) == Some(b'-')
            || byte_at(t, m.end()) == Some(b'-')
        {
            continue;
        }
        let (area, group, serial) = (
            s.get(0..3).unwrap_or(""),
            s.get(4..6).unwrap_or(""),
            s.get(7..11).unwrap_or(""),
        );
        if ssn_valid(area, group, serial) {
            raw.push((PiiKind::NationalId, m.range()));
        }
    }
    for m in p.phone.find_iter(t) {
        let digits = m.as_str().bytes().filter(u8::is_ascii_digit).count();
        // The `+` is its own boundary on the left (`…com+44…` after an email is a phone).
        if (8..=15).contains(&digits) && !is_digit(byte_at(t, m.end())) {
            raw.push((PiiKind::Phone, m.range()));
        }
    }
    for m in p.digits.find_iter(t) {
        if is_word(byte_before(t, m.start())) || is_word(byte_at(t, m.end())) {
            continue;
        }
        // Groups of digits; the whole run, or its longest prefix of whole groups, of 13–19
        // Luhn-valid digits.
        let s = m.as_str();
        let mut best = None;
        let mut digits: Vec<u8> = Vec::new();
        for (i, b) in s.bytes().enumerate() {
            if b.is_ascii_digit() {
                digits.push(b);
                if digits.len() > 19 {
                    break;
                }
                let group_ends = !is_digit(s.as_bytes().get(i + 1).copied());
                if group_ends && digits.len() >= 13 && luhn_valid(&digits) {
                    best = Some(i + 1);
                }
            }
        }
        if let Some(end) = best {
            raw.push((PiiKind::Card, m.start()..m.start() + end));
        }
    }
    for m in p.ipv4.find_iter(t) {
        let before = byte_before(t, m.start());
        let after = byte_at(t, m.end());
        let after2 = byte_at(t, m.end() + 1);
        if is_word(before)
            || before == Some(b'.')
            || is_word(after)
            || (after == Some(b'.') && is_digit(after2))
        {
            continue;
        }
        if m.as_str().parse::<std::net::Ipv4Addr>().is_ok() {
            raw.push((PiiKind::IpAddress, m.range()));
        }
    }
    for m in p.ipv6.find_iter(t) {
        let s = m.as_str();
        if s.len() < 3 || s.bytes().filter(|&b| b == b':').count() < 2 {
            continue;
        }
        if is_word(byte_before(t, m.start())) || is_word(byte_at(t, m.end())) {
            continue;
        }
        if s.parse::<std::net::Ipv6Addr>().is_ok() {
            raw.push((PiiKind::IpAddress, m.range()));
        }
    }

    // Earliest, then longest, wins; overlapping later matches are dropped.
    raw.sort_by(|a, b| a.1.start.cmp(&b.1.start).then(b.1.end.cmp(&a.1.end)));
    let mut out: Vec<Match> = Vec::new();
    let mut covered = 0usize;
    for (kind, r) in raw {
        if r.start < covered || r.is_empty() {
            continue;
        }
        covered = r.end;
        let value = t.get(r.clone()).unwrap_or("");
        let range = norm.original(&r).ok_or(PiiError::Internal)?;
        out.push(Match {
            finding: Finding {
                kind,
                sha256: Sha256::digest(value.as_bytes()).into(),
            },
            range,
        });
        if out.len() > MAX_FINDINGS {
            return Err(PiiError::TooManyFindings { max: MAX_FINDINGS });
        }
    }
    Ok(out)
}

/// `original` with every match replaced by `[REDACTED:<kind>]`.
pub fn redact_text(original: &str, matches: &[Match]) -> String {
    let mut out = String::with_capacity(original.len());
    let mut at = 0;
    for m in matches {
        out.push_str(original.get(at..m.range.start).unwrap_or(""));
        out.push_str("[REDACTED:");
        out.push_str(m.finding.kind.as_str());
        out.push(']');
        at = m.range.end;
    }
    out.push_str(original.get(at..).unwrap_or(""));
    out
}

/// Scans the JSON value `text`: string and number leaves and member names, skipping the
/// top-level members named in `skip`.
pub fn scan_json(text: &str, skip: &[&str]) -> Result<ScanReport, PiiError> {
    Ok(walk(text, skip, false)?.0)
}

/// How many times redaction re-scans its own output. Matching takes the earliest candidate,
/// so a value that overlapped an earlier match (`+44 20 7946 0958fe80::1`) can surface once the
/// earlier one is replaced; redaction repeats until a scan of its output finds nothing.
pub const MAX_REDACTION_PASSES: usize = 4;

/// Scans like [`scan_json`] and returns the value with every finding redacted (identical
/// bytes where nothing was found). The output is re-scanned until nothing is found in it;
/// if that takes more than [`MAX_REDACTION_PASSES`] passes the redaction fails
/// ([`PiiError::RedactionUnstable`]) and the caller refuses. The report holds every pass's
/// findings.
pub fn redact_json(text: &str, skip: &[&str]) -> Result<(ScanReport, String), PiiError> {
    let (mut report, mut out) = walk(text, skip, true)?;
    if report.is_empty() {
        return Ok((report, out));
    }
    for _ in 1..MAX_REDACTION_PASSES {
        let (more, next) = walk(&out, skip, true)?;
        if more.is_empty() {
            return Ok((report, out));
        }
        report.findings.extend(more.findings);
        out = next;
    }
    Err(PiiError::RedactionUnstable)
}

/// Redacts a text until a scan of the result finds nothing (as [`redact_json`] does), and
/// returns every finding.
pub fn redact_text_fully(text: &str) -> Result<(Vec<Finding>, String), PiiError> {
    let mut findings = Vec::new();
    let mut out = text.to_owned();
    for _ in 0..MAX_REDACTION_PASSES {
        let ms = scan_text(&out)?;
        if ms.is_empty() {
            return Ok((findings, out));
        }
        findings.extend(ms.iter().map(|m| m.finding));
        out = redact_text(&out, &ms);
    }
    if scan_text(&out)?.is_empty() {
        return Ok((findings, out));
    }
    Err(PiiError::RedactionUnstable)
}

fn walk(text: &str, skip: &[&str], redact: bool) -> Result<(ScanReport, String), PiiError> {
    if text.len() > MAX_SCAN_LEN {
        return Err(PiiError::TooLong {
            len: text.len(),
            max: MAX_SCAN_LEN,
        });
    }
    let root = json::parse(text)?;
    let mut report = ScanReport::default();
    let mut splices: Vec<(Range<usize>, String)> = Vec::new();
    let mut key_counter = 0usize;
    let mut stack: Vec<(&Node<'_>, bool)> = vec![(&root, true)];
    while let Some((node, top)) = stack.pop() {
        match &node.value {
            Value::String(s) => {
                let ms = scan_text(s)?;
                if !ms.is_empty() {
                    report.findings.extend(ms.iter().map(|m| m.finding));
                    if redact {
                        let mut w = String::new();
                        json::write_string(&mut w, &redact_text(s, &ms));
                        splices.push((node.span.start..node.span.end, w));
                    }
                }
            }
            Value::Number(n) => {
                let ms = scan_text(n)?;
                if let Some(first) = ms.first() {
                    report.findings.extend(ms.iter().map(|m| m.finding));
                    if redact {
                        let mut w = String::new();
                        let marker = format!("[REDACTED:{}]", first.finding.kind.as_str());
                        json::write_string(&mut w, &marker);
                        splices.push((node.span.start..node.span.end, w));
                    }
                }
            }
            Value::Array(items) => stack.extend(items.iter().rev().map(|n| (n, false))),
            Value::Object(members) => {
                for m in members.iter().rev() {
                    if top && skip.contains(&m.key.as_ref()) {
                        continue;
                    }
                    stack.push((&m.value, false));
                }
                for m in members {
                    if top && skip.contains(&m.key.as_ref()) {
                        continue;
                    }
                    let ms = scan_text(&m.key)?;
                    if !ms.is_empty() {
                        report.findings.extend(ms.iter().map(|x| x.finding));
                        if redact {
                            key_counter += 1;
                            let mut w = String::new();
                            let redacted = format!("{}#{key_counter}", redact_text(&m.key, &ms));
                            json::write_string(&mut w, &redacted);
                            splices.push((m.key_span.start..m.key_span.end, w));
                        }
                    }
                }
            }
            Value::Null | Value::Bool(_) => {}
        }
        if report.findings.len() > MAX_FINDINGS {
            return Err(PiiError::TooManyFindings { max: MAX_FINDINGS });
        }
    }
    if !redact || splices.is_empty() {
        return Ok((report, text.to_owned()));
    }
    splices.sort_by_key(|(r, _)| r.start);
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for (r, w) in splices {
        out.push_str(text.get(at..r.start).unwrap_or(""));
        out.push_str(&w);
        at = r.end;
    }
    out.push_str(text.get(at..).unwrap_or(""));
    // Renamed members must not collide with each other or with existing names.
    if let Err(JsonError::DuplicateKey { .. }) = json::parse(&out) {
        return Err(PiiError::NameCollision);
    }
    Ok((report, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(text: &str) -> Vec<PiiKind> {
        scan_text(text)
            .unwrap()
            .iter()
            .map(|m| m.finding.kind)
            .collect()
    }

    fn redacted(text: &str) -> String {
        redact_text(text, &scan_text(text).unwrap())
    }

    #[test]
    fn finds_each_kind() {
        let age = format!(
            "AGE-SECRET-KEY-1{}",
            "QPZRY9X8GF".repeat(6).get(..58).unwrap()
        );
        let jwt = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxIn0.c2ln";
        for (text, kind) in [
            ("mail john.doe+x@mail.example.co.uk now", PiiKind::Email),
            ("call +44 20 7946 0958.", PiiKind::Phone),
            ("card 4111 1111 1111 1111 exp", PiiKind::Card),
            ("card 5555-5555-5555-4444", PiiKind::Card),
            ("iban GB82 WEST 1234 5698 7654 32", PiiKind::Iban),
            ("iban DE89370400440532013000.", PiiKind::Iban),
            ("ssn 536-22-1234", PiiKind::NationalId),
            ("host 192.168.1.20:80", PiiKind::IpAddress),
            ("host 2001:db8::8a2e:370:7334 up", PiiKind::IpAddress),
            ("key AKIAIOSFODNN7EXAMPLE", PiiKind::CloudKey),
            (&format!("token {jwt}"), PiiKind::Jwt),
            (
                "-----BEGIN RSA PRIVATE KEY-----\nMIIE\n-----END RSA PRIVATE KEY-----",
                PiiKind::PrivateKey,
            ),
            (&age, PiiKind::PrivateKey),
        ] {
            assert_eq!(kinds(text), [kind], "{text}");
        }
    }

    #[test]
    fn luhn_failing_numbers_are_not_cards() {
        assert!(kinds("4111 1111 1111 1112").is_empty());
        assert!(kinds("order 1234567890123456").is_empty());
        // Too short, too long.
        assert!(kinds("411111111111").is_empty());
        assert!(kinds("41111111111111111111111").is_empty());
        // A card followed by a year is still found.
        assert_eq!(kinds("4111 1111 1111 1111 2029"), [PiiKind::Card]);
    }

    #[test]
    fn iban_rules() {
        assert!(kinds("GB82 WEST 1234 5698 7654 33").is_empty(), "mod-97");
        assert!(kinds("GB82 WEST 1234 5698 7654").is_empty(), "length");
        assert!(kinds("QQ82 WEST 1234 5698 7654 32").is_empty(), "country");
        assert!(iban_valid(b"NO9386011117947"));
    }

    #[test]
    fn ssn_invalidation_rules() {
        for bad in [
            "000-12-3456",
            "666-12-3456",
            "900-12-3456",
            "987-65-4321",
            "123-00-4567",
            "123-45-0000",
            "111-11-1111",
            "078-05-1120",
            "219-09-9999",
            "123-45-6789",
            "536 22-1234",
            "1536-22-1234",
        ] {
            assert!(kinds(bad).is_empty(), "{bad}");
        }
        assert_eq!(kinds("536 22 1234"), [PiiKind::NationalId]);
    }

    #[test]
    fn phones_need_a_plus_and_e164_length() {
        assert!(kinds("id 4420794609581").is_empty());
        assert!(kinds("+1 234").is_empty());
        assert!(kinds("+1234567890123456789").is_empty());
        assert_eq!(kinds("+14155552671"), [PiiKind::Phone]);
    }

    #[test]
    fn versions_paths_and_package_names_are_not_findings() {
        for text in [
            "windows 10.0.19041.1",
            "Vec::new()",
            "pkg@1.2.3",
            "1.2.3.4.5",
            "time 12:30:45",
            "999.1.1.1",
            "AKIAIOSFODNN7EXAMPLEX",
            "eyJub3RhbGciOjF9.eyJ4IjoxfQ.c2ln",
        ] {
            assert!(kinds(text).is_empty(), "{text}: {:?}", kinds(text));
        }
    }

    #[test]
    fn full_width_digits_and_zero_width_splits_are_found() {
        // Full-width card digits (NFKC folds them).
        let fw = "４１１１ １１１１ １１１１ １１１１";
        assert_eq!(kinds(fw), [PiiKind::Card]);
        assert_eq!(redacted(&format!("x {fw} y")), "x [REDACTED:card] y");
        // A zero-width space inside an email and a soft hyphen inside a card.
        let zw = "mail jo\u{200b}hn@example.com!";
        assert_eq!(kinds(zw), [PiiKind::Email]);
        assert_eq!(redacted(zw), "mail [REDACTED:email]!");
        assert_eq!(kinds("4111\u{ad}1111\u{feff}11111111"), [PiiKind::Card]);
        // The hash is of the normalised value: both spellings hash alike.
        let a = scan_text("john@example.com").unwrap();
        let b = scan_text("jo\u{200d}hn@example.com").unwrap();
        assert_eq!(a[0].finding.sha256, b[0].finding.sha256);
    }

    #[test]
    fn pem_without_end_is_redacted_to_the_end() {
        let text = "x -----BEGIN PRIVATE KEY-----\nMIIEv...";
        assert_eq!(redacted(text), "x [REDACTED:private_key]");
    }

    #[test]
    fn json_leaves_keys_and_numbers_are_scanned_and_redacted_in_place() {
        let text = r#"{"to": "a@example.com", "n": 4111111111111111, "amount": 1e3,
            "nested": [{"b@example.org": true}], "_meta": {"x": "c@example.com"}}"#;
        let (report, out) = redact_json(text, &["_meta"]).unwrap();
        assert_eq!(report.counts().get(&PiiKind::Email), Some(&2));
        assert_eq!(report.counts().get(&PiiKind::Card), Some(&1));
        assert_eq!(
            out,
            r#"{"to": "[REDACTED:email]", "n": "[REDACTED:card]", "amount": 1e3,
            "nested": [{"[REDACTED:email]#1": true}], "_meta": {"x": "c@example.com"}}"#
        );
        // Nothing found: the very same bytes.
        let clean = r#"{ "a" : 1e3 }"#;
        assert_eq!(redact_json(clean, &[]).unwrap().1, clean);
    }

    #[test]
    fn a_value_hidden_behind_an_earlier_match_is_redacted_too() {
        let text = "+44 20 7946 0958fe80::1";
        assert_eq!(kinds(text), [PiiKind::Phone]);
        let (findings, out) = redact_text_fully(text).unwrap();
        assert_eq!(out, "[REDACTED:phone][REDACTED:ip_address]");
        assert_eq!(findings.len(), 2);
        let mut doc = String::new();
        json::write_string(&mut doc, text);
        let (report, out) = redact_json(&doc, &[]).unwrap();
        assert_eq!(out, "\"[REDACTED:phone][REDACTED:ip_address]\"");
        assert_eq!(report.findings.len(), 2);
    }

    #[test]
    fn redacted_names_never_collide() {
        let text = r#"{"[REDACTED:email]#1": 1, "a@example.com": 2}"#;
        assert_eq!(redact_json(text, &[]), Err(PiiError::NameCollision));
    }

    #[test]
    fn findings_never_print_values() {
        let m = scan_text("a@example.com").unwrap();
        assert!(!format!("{m:?}").contains("example"));
    }
}
