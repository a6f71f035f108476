//! Signed checkpoints: the C2SP `tlog-checkpoint` body inside a C2SP `signed-note`.
//!
//! The enclave periodically signs the log's Merkle tree head (origin, size, root) with its epoch
//! key, in the format Go's `golang.org/x/mod/sumdb/note`, Trillian Tessera and Sigstore use, so
//! that auditors, agents and witnesses can hold a checkpoint outside the host and later prove
//! that the log they are shown extends it (or that it does not):
//!
//! ```text
//! <origin>\n
//! <size, decimal, no leading zeros>\n
//! <root, standard base64 with padding>\n
//! \n
//! — <key name> <base64(key ID (4 bytes, big-endian) ‖ Ed25519 signature (64 bytes))>\n
//! ```
//!
//! The signature covers the note text (the three body lines, final newline included). The key ID
//! is the first four bytes of `SHA-256(key name ‖ 0x0A ‖ 0x01 ‖ public key)` ([`key_id`]).
//!
//! ## Decisions
//!
//! - **Extension lines are rejected.** The checkpoint spec allows opaque lines after the root
//!   but does not recommend them (monitors cannot audit them), and Attestplane never writes
//!   any, so a note carrying one is not ours: [`CheckpointError::ExtensionLines`].
//! - **Other signatures are ignored**, as the signed-note spec requires: witnesses' cosignatures
//!   and keys of other epochs may sign the same note. A line is "ours" only when both the key
//!   name and the key ID match the key given. If one of ours fails to verify, the whole note is
//!   rejected (the spec's SHOULD); at least one of ours must verify.
//! - Signature lines must be well formed even when they are not ours (em dash, space, a key name
//!   without spaces or `+`, one space, canonical base64 of at least five bytes).
//! - A size-0 checkpoint must carry the empty tree's root.
//! - Ed25519 signatures are checked by the one rule set of [`crate::eddsa`] (cofactored, as
//!   ZIP 215 defines it; canonical `s`), the same rules as log entries and handles; the key must
//!   be canonical and of prime order ([`CheckpointError::BadKey`]).
//!
//! ## Trust assumptions
//!
//! The note is hostile. The key name and the verifying key are trusted: the caller takes them
//! from the log's verified epoch (the key is bound to the measured enclave by its attestation
//! document). Callers that accept checkpoints of one log only must compare
//! [`VerifiedCheckpoint::origin`] with the origin they expect.
//!
//! ## What this module deliberately does not do
//!
//! - It does not support signature types other than Ed25519 (`0x01`), nor timestamped
//!   cosignatures (`0x04`); their lines are parsed and ignored.
//! - It does not decide which of two checkpoints is "latest", nor fetch proofs: given two
//!   verified checkpoints and a proof, [`verify_consistent_checkpoints`] says whether they are
//!   consistent and, if not, returns both tree heads as evidence.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::ed25519::signature::Keypair;
use ed25519_dalek::{Signature, Signer, VerifyingKey};
use serde::Serialize;
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::eddsa::{KeyError, PublicKey};
use crate::merkle::{self, Hash, MerkleError};

/// The largest signed note accepted, in bytes. Room for well over the 16 signatures the
/// signed-note spec requires verifiers to accept, even post-quantum ones.
pub const MAX_NOTE_LEN: usize = 64 * 1024;

/// The most signature lines accepted in one note (the spec requires at least 16).
pub const MAX_SIGNATURES: usize = 32;

/// The longest origin line accepted or produced, in bytes.
pub const MAX_ORIGIN_LEN: usize = 256;

/// The longest key name accepted or produced, in bytes.
pub const MAX_KEY_NAME_LEN: usize = 256;

/// The signed-note signature type byte of Ed25519.
const SIG_TYPE_ED25519: u8 = 0x01;

/// What starts every signature line: em dash (U+2014) and a space.
const SIG_LINE_PREFIX: &str = "\u{2014} ";

/// Length of a key ID.
const KEY_ID_LEN: usize = 4;

/// Errors of checkpoint encoding, parsing and verification.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// The note is longer than [`MAX_NOTE_LEN`].
    #[error("note is {len} bytes, more than the limit of {max}")]
    TooLong {
        /// The note's length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The note is not a well-formed signed note.
    #[error("malformed note: {reason}")]
    MalformedNote {
        /// What is wrong.
        reason: &'static str,
    },
    /// The note text is not a well-formed checkpoint body.
    #[error("malformed checkpoint: {reason}")]
    MalformedBody {
        /// What is wrong.
        reason: &'static str,
    },
    /// The checkpoint carries extension lines, which Attestplane never writes.
    #[error("checkpoint has {count} extension line(s); attestplane checkpoints have none")]
    ExtensionLines {
        /// How many lines follow the root hash.
        count: usize,
    },
    /// The note has more than [`MAX_SIGNATURES`] signature lines.
    #[error("note has more than {max} signatures")]
    TooManySignatures {
        /// The limit.
        max: usize,
    },
    /// A key name is empty, too long, or contains a space, a `+` or a control character.
    #[error("invalid key name: {reason}")]
    InvalidKeyName {
        /// What is wrong.
        reason: &'static str,
    },
    /// A signature line names the expected key (name and key ID) but does not verify.
    #[error("signature by key {key_name} does not verify")]
    BadSignature {
        /// The key name.
        key_name: String,
    },
    /// The key given to verify with is one the signature rules refuse (see [`crate::eddsa`]).
    #[error("key {key_name} is refused: {reason}")]
    BadKey {
        /// The key name.
        key_name: String,
        /// Why.
        reason: KeyError,
    },
    /// No signature line names the expected key (name and key ID).
    #[error("note has no signature by key {key_name} (key id {key_id})")]
    MissingSignature {
        /// The key name.
        key_name: String,
        /// The expected key ID, 8 hex digits.
        key_id: String,
    },
    /// The signer failed.
    #[error("signing failed")]
    Signing,
    /// Two checkpoints come from logs with different origins.
    #[error("checkpoints are from different logs: {old_origin:?} and {new_origin:?}")]
    OriginMismatch {
        /// The first checkpoint's origin.
        old_origin: String,
        /// The second checkpoint's origin.
        new_origin: String,
    },
    /// Two checkpoints of the same size have different roots: the log forked. Both were
    /// signed, so this is proof of misbehaviour.
    #[error("two checkpoints of size {size} have different roots {old_root} and {new_root}")]
    Fork {
        /// The common size.
        size: u64,
        /// The first checkpoint's root.
        old_root: Hash,
        /// The second checkpoint's root.
        new_root: Hash,
    },
    /// The consistency proof given does not show that the smaller tree is a prefix of the
    /// larger. When the proof comes from the log itself, the log is inconsistent.
    #[error(
        "checkpoint (size {old_size}, root {old_root}) and checkpoint (size {new_size}, root {new_root}) are not shown consistent: {reason}"
    )]
    Inconsistent {
        /// The smaller checkpoint's size.
        old_size: u64,
        /// The smaller checkpoint's root.
        old_root: Hash,
        /// The larger checkpoint's size.
        new_size: u64,
        /// The larger checkpoint's root.
        new_root: Hash,
        /// Why the proof failed.
        reason: MerkleError,
    },
}

/// A log's tree head: origin, size and root. The note text of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Checkpoint {
    origin: String,
    size: u64,
    root: Hash,
}

fn has_control_char(s: &str) -> bool {
    s.chars().any(|c| c.is_control())
}

fn check_key_name(name: &str) -> Result<(), CheckpointError> {
    let reason = if name.is_empty() {
        "empty"
    } else if name.len() > MAX_KEY_NAME_LEN {
        "too long"
    } else if name.chars().any(char::is_whitespace) {
        "contains a space"
    } else if name.contains('+') {
        "contains '+'"
    } else if has_control_char(name) {
        "contains a control character"
    } else {
        return Ok(());
    };
    Err(CheckpointError::InvalidKeyName { reason })
}

fn check_origin(origin: &str) -> Result<(), CheckpointError> {
    let reason = if origin.is_empty() {
        "empty origin"
    } else if origin.len() > MAX_ORIGIN_LEN {
        "origin too long"
    } else if has_control_char(origin) {
        "control character in origin"
    } else {
        return Ok(());
    };
    Err(CheckpointError::MalformedBody { reason })
}

fn check_empty_tree(size: u64, root: &Hash) -> Result<(), CheckpointError> {
    if size == 0 && *root != merkle::empty_root() {
        return Err(CheckpointError::MalformedBody {
            reason: "size 0 with a root other than the empty tree's",
        });
    }
    Ok(())
}

impl Checkpoint {
    /// A checkpoint. The origin must be non-empty, at most [`MAX_ORIGIN_LEN`] bytes, without
    /// control characters; a size-0 checkpoint must have the empty tree's root.
    pub fn new(origin: impl Into<String>, size: u64, root: Hash) -> Result<Self, CheckpointError> {
        let origin = origin.into();
        check_origin(&origin)?;
        check_empty_tree(size, &root)?;
        Ok(Self { origin, size, root })
    }

    /// The log's origin line.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The number of leaves in the tree.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The Merkle tree root at that size.
    pub fn root(&self) -> &Hash {
        &self.root
    }

    /// The note text: `origin\nsize\nbase64(root)\n`.
    pub fn body(&self) -> String {
        format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            STANDARD.encode(self.root.as_bytes())
        )
    }

    /// Parses a note text; the inverse of [`Checkpoint::body`].
    pub fn parse_body(text: &str) -> Result<Self, CheckpointError> {
        let malformed = |reason| CheckpointError::MalformedBody { reason };
        if text.len() > MAX_NOTE_LEN {
            return Err(CheckpointError::TooLong {
                len: text.len(),
                max: MAX_NOTE_LEN,
            });
        }
        let lines = text
            .strip_suffix('\n')
            .ok_or(malformed("text does not end in a newline"))?;
        let mut lines = lines.split('\n');
        let origin = lines.next().unwrap_or("");
        check_origin(origin)?;
        let size = parse_size(lines.next().ok_or(malformed("missing size line"))?)?;
        let root = parse_root(lines.next().ok_or(malformed("missing root line"))?)?;
        let extra = lines.count();
        if extra > 0 {
            return Err(CheckpointError::ExtensionLines { count: extra });
        }
        check_empty_tree(size, &root)?;
        Ok(Self {
            origin: origin.to_owned(),
            size,
            root,
        })
    }
}

fn parse_size(line: &str) -> Result<u64, CheckpointError> {
    let malformed = |reason| CheckpointError::MalformedBody { reason };
    if line.is_empty() || !line.bytes().all(|b| b.is_ascii_digit()) {
        return Err(malformed("size is not a decimal number"));
    }
    if line.len() > 1 && line.starts_with('0') {
        return Err(malformed("size has a leading zero"));
    }
    line.parse::<u64>()
        .map_err(|_| malformed("size does not fit in 64 bits"))
}

fn parse_root(line: &str) -> Result<Hash, CheckpointError> {
    let malformed = |reason| CheckpointError::MalformedBody { reason };
    // 32 bytes encode to 44 characters; anything longer cannot be a root.
    if line.len() != 44 {
        return Err(malformed("root is not 32 bytes of base64"));
    }
    let bytes = STANDARD
        .decode(line)
        .map_err(|_| malformed("root is not canonical base64"))?;
    Hash::from_slice(&bytes).map_err(|_| malformed("root is not 32 bytes of base64"))
}

/// The signed-note key ID of an Ed25519 key: the first four bytes of
/// `SHA-256(key name ‖ 0x0A ‖ 0x01 ‖ public key)`.
pub fn key_id(key_name: &str, key: &VerifyingKey) -> [u8; 4] {
    let mut h = Sha256::new();
    h.update(key_name.as_bytes());
    h.update([b'\n', SIG_TYPE_ED25519]);
    h.update(key.as_bytes());
    let digest = h.finalize();
    let mut id = [0u8; KEY_ID_LEN];
    for (out, b) in id.iter_mut().zip(digest.iter()) {
        *out = *b;
    }
    id
}

/// Signs `cp` and returns the full signed note: the body, a blank line and one signature line.
/// The signer's public key determines the key ID.
pub fn sign_checkpoint<S>(
    cp: &Checkpoint,
    key_name: &str,
    signer: &S,
) -> Result<String, CheckpointError>
where
    S: Signer<Signature> + Keypair<VerifyingKey = VerifyingKey>,
{
    check_key_name(key_name)?;
    let text = cp.body();
    let signature = signer
        .try_sign(text.as_bytes())
        .map_err(|_| CheckpointError::Signing)?;
    let mut blob = Vec::with_capacity(KEY_ID_LEN + Signature::BYTE_SIZE);
    blob.extend_from_slice(&key_id(key_name, &signer.verifying_key()));
    blob.extend_from_slice(&signature.to_bytes());
    Ok(format!(
        "{text}\n{SIG_LINE_PREFIX}{key_name} {}\n",
        STANDARD.encode(blob)
    ))
}

/// One parsed signature line.
struct SignatureLine<'a> {
    key_name: &'a str,
    key_id: [u8; KEY_ID_LEN],
    signature: Vec<u8>,
}

/// A note split into its text and its signature lines, not yet verified.
struct SplitNote<'a> {
    text: &'a str,
    signatures: Vec<SignatureLine<'a>>,
}

fn split_note(note: &str) -> Result<SplitNote<'_>, CheckpointError> {
    let malformed = |reason| CheckpointError::MalformedNote { reason };
    if note.len() > MAX_NOTE_LEN {
        return Err(CheckpointError::TooLong {
            len: note.len(),
            max: MAX_NOTE_LEN,
        });
    }
    if note.chars().any(|c| c < ' ' && c != '\n') {
        return Err(malformed("control character"));
    }
    // The text ends at the last blank line; the text keeps its final newline.
    let blank = note
        .rfind("\n\n")
        .ok_or(malformed("no blank line before the signatures"))?;
    let (text, rest) = note.split_at_checked(blank + 1).unwrap_or((note, ""));
    let block = rest.strip_prefix('\n').unwrap_or(rest);
    let block = block
        .strip_suffix('\n')
        .ok_or(malformed("signature lines do not end in a newline"))?;
    if block.is_empty() {
        return Err(malformed("no signature lines"));
    }
    let mut signatures = Vec::new();
    for line in block.split('\n') {
        if signatures.len() == MAX_SIGNATURES {
            return Err(CheckpointError::TooManySignatures {
                max: MAX_SIGNATURES,
            });
        }
        signatures.push(parse_signature_line(line)?);
    }
    Ok(SplitNote { text, signatures })
}

fn parse_signature_line(line: &str) -> Result<SignatureLine<'_>, CheckpointError> {
    let malformed = |reason| CheckpointError::MalformedNote { reason };
    let rest = line.strip_prefix(SIG_LINE_PREFIX).ok_or(malformed(
        "signature line does not start with an em dash and a space",
    ))?;
    let (key_name, encoded) = rest
        .split_once(' ')
        .ok_or(malformed("signature line has no signature"))?;
    check_key_name(key_name).map_err(|_| malformed("signature line has an invalid key name"))?;
    let blob = STANDARD
        .decode(encoded)
        .map_err(|_| malformed("signature is not canonical base64"))?;
    let (id, signature) = blob
        .split_first_chunk::<KEY_ID_LEN>()
        .ok_or(malformed("signature is shorter than a key id"))?;
    if signature.is_empty() {
        return Err(malformed("signature is empty"));
    }
    Ok(SignatureLine {
        key_name,
        key_id: *id,
        signature: signature.to_vec(),
    })
}

/// A checkpoint whose note carried a valid signature by the expected key. Only
/// [`verify_checkpoint`] makes one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedCheckpoint {
    checkpoint: Checkpoint,
    key_name: String,
    note: String,
}

impl VerifiedCheckpoint {
    /// The tree head.
    pub fn checkpoint(&self) -> &Checkpoint {
        &self.checkpoint
    }

    /// The log's origin line. Compare it with the origin you expect.
    pub fn origin(&self) -> &str {
        &self.checkpoint.origin
    }

    /// The tree size.
    pub fn size(&self) -> u64 {
        self.checkpoint.size
    }

    /// The tree root.
    pub fn root(&self) -> &Hash {
        &self.checkpoint.root
    }

    /// The name of the key whose signature verified.
    pub fn key_name(&self) -> &str {
        &self.key_name
    }

    /// The signed note exactly as verified: the evidence to show a third party.
    pub fn note(&self) -> &str {
        &self.note
    }
}

/// Verifies a signed checkpoint note against the key `key_name` / `key` and parses its body.
///
/// Signature lines by other keys (another name or another key ID) are ignored; every line by
/// this key must verify, and there must be at least one.
pub fn verify_checkpoint(
    note: &str,
    key_name: &str,
    key: &VerifyingKey,
) -> Result<VerifiedCheckpoint, CheckpointError> {
    check_key_name(key_name)?;
    let split = split_note(note)?;
    let want_id = key_id(key_name, key);
    let rules_key =
        PublicKey::from_verifying_key(key).map_err(|reason| CheckpointError::BadKey {
            key_name: key_name.to_owned(),
            reason,
        })?;
    let mut verified = false;
    for line in &split.signatures {
        if line.key_name != key_name || line.key_id != want_id {
            continue;
        }
        let bad = || CheckpointError::BadSignature {
            key_name: key_name.to_owned(),
        };
        let signature = Signature::from_slice(&line.signature).map_err(|_| bad())?;
        rules_key
            .verify(split.text.as_bytes(), &signature)
            .map_err(|_| bad())?;
        verified = true;
    }
    if !verified {
        return Err(CheckpointError::MissingSignature {
            key_name: key_name.to_owned(),
            key_id: hex::encode(want_id),
        });
    }
    let checkpoint = Checkpoint::parse_body(split.text)?;
    Ok(VerifiedCheckpoint {
        checkpoint,
        key_name: key_name.to_owned(),
        note: note.to_owned(),
    })
}

/// Checks that two verified checkpoints of one log are consistent, given a consistency proof
/// from the smaller tree to the larger (the arguments may come in either order; an empty proof
/// when the sizes are equal).
///
/// On conflict the error carries both tree heads: [`CheckpointError::Fork`] when the sizes are
/// equal and the roots differ (both signed: proof of a fork), [`CheckpointError::Inconsistent`]
/// when the proof fails.
pub fn verify_consistent_checkpoints(
    old: &VerifiedCheckpoint,
    new: &VerifiedCheckpoint,
    proof: &[Hash],
) -> Result<(), CheckpointError> {
    if old.origin() != new.origin() {
        return Err(CheckpointError::OriginMismatch {
            old_origin: old.origin().to_owned(),
            new_origin: new.origin().to_owned(),
        });
    }
    let (old, new) = if old.size() <= new.size() {
        (old, new)
    } else {
        (new, old)
    };
    if old.size() == new.size() && old.root() != new.root() {
        return Err(CheckpointError::Fork {
            size: old.size(),
            old_root: *old.root(),
            new_root: *new.root(),
        });
    }
    merkle::verify_consistency(old.size(), new.size(), old.root(), new.root(), proof).map_err(
        |reason| CheckpointError::Inconsistent {
            old_size: old.size(),
            old_root: *old.root(),
            new_size: new.size(),
            new_root: *new.root(),
            reason,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root_of(n: u8) -> Hash {
        merkle::leaf_hash(&[n])
    }

    #[test]
    fn body_round_trips() {
        let cp = Checkpoint::new("example.com/log", 20852163, root_of(1)).unwrap();
        assert_eq!(Checkpoint::parse_body(&cp.body()).unwrap(), cp);
    }

    #[test]
    fn parses_the_spec_example_body() {
        // The example of c2sp.org/tlog-checkpoint.
        let text =
            "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n";
        let cp = Checkpoint::parse_body(text).unwrap();
        assert_eq!(cp.origin(), "example.com/behind-the-sofa");
        assert_eq!(cp.size(), 20852163);
        assert_eq!(cp.body(), text);
    }

    #[test]
    fn rejects_malformed_sizes() {
        let r = STANDARD.encode(root_of(1).as_bytes());
        for size in [
            "",
            "01",
            "+1",
            "-1",
            " 1",
            "1 ",
            "0x1",
            "18446744073709551616",
        ] {
            let text = format!("o\n{size}\n{r}\n");
            assert!(
                matches!(
                    Checkpoint::parse_body(&text),
                    Err(CheckpointError::MalformedBody { .. })
                ),
                "accepted size {size:?}"
            );
        }
        assert!(Checkpoint::parse_body(&format!("o\n18446744073709551615\n{r}\n")).is_ok());
    }

    #[test]
    fn rejects_malformed_roots() {
        let good = STANDARD.encode(root_of(1).as_bytes());
        let short = STANDARD.encode([0u8; 31]);
        let long = STANDARD.encode([0u8; 33]);
        let unpadded = good.trim_end_matches('=').to_owned();
        let url = STANDARD
            .encode([0xfb; 32])
            .replace('+', "-")
            .replace('/', "_");
        for root in [short, long, unpadded, url, String::new()] {
            let text = format!("o\n1\n{root}\n");
            assert!(
                matches!(
                    Checkpoint::parse_body(&text),
                    Err(CheckpointError::MalformedBody { .. })
                ),
                "accepted root {root:?}"
            );
        }
    }

    #[test]
    fn rejects_extension_lines_and_missing_lines() {
        let r = STANDARD.encode(root_of(1).as_bytes());
        assert_eq!(
            Checkpoint::parse_body(&format!("o\n1\n{r}\next\n")),
            Err(CheckpointError::ExtensionLines { count: 1 })
        );
        assert!(Checkpoint::parse_body(&format!("o\n1\n{r}")).is_err());
        assert!(Checkpoint::parse_body("o\n1\n").is_err());
        assert!(Checkpoint::parse_body(&format!("\n1\n{r}\n")).is_err());
    }

    #[test]
    fn rejects_empty_tree_with_nonempty_root() {
        assert!(Checkpoint::new("o", 0, merkle::empty_root()).is_ok());
        assert!(matches!(
            Checkpoint::new("o", 0, root_of(1)),
            Err(CheckpointError::MalformedBody { .. })
        ));
    }

    #[test]
    fn rejects_bad_origins_and_key_names() {
        assert!(Checkpoint::new("", 1, root_of(1)).is_err());
        assert!(Checkpoint::new("a\nb", 1, root_of(1)).is_err());
        assert!(Checkpoint::new("a".repeat(MAX_ORIGIN_LEN + 1), 1, root_of(1)).is_err());
        for name in ["", "a b", "a+b", "a\tb", "a\u{00a0}b"] {
            assert!(check_key_name(name).is_err(), "accepted key name {name:?}");
        }
        assert!(check_key_name("example.com/log").is_ok());
    }

    #[test]
    fn key_id_matches_signed_note_definition() {
        let key = VerifyingKey::from_bytes(&[
            0xd7, 0x5a, 0x98, 0x01, 0x82, 0xb1, 0x0a, 0xb7, 0xd5, 0x4b, 0xfe, 0xd3, 0xc9, 0x64,
            0x07, 0x3a, 0x0e, 0xe1, 0x72, 0xf3, 0xda, 0xa6, 0x23, 0x25, 0xaf, 0x02, 0x1a, 0x68,
            0xf7, 0x07, 0x51, 0x1a,
        ])
        .unwrap();
        let mut h = Sha256::new();
        h.update(b"name\n\x01");
        h.update(key.as_bytes());
        let d = h.finalize();
        assert_eq!(key_id("name", &key), [d[0], d[1], d[2], d[3]]);
    }
}
