//! Signed checkpoints (C2SP tlog-checkpoint in a signed note) and server handles (EdDSA JWTs):
//! known answers, interoperability with real sum.golang.org checkpoints, every rejection the
//! formats promise, and property tests that any single-byte change is refused and that no input
//! panics the parsers.
//!
//! The known answers were computed independently of this crate, with Python's `cryptography`
//! package (Ed25519) and its standard `json`/`base64` modules, from the same seed and inputs.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use attestplane_verifier::UnixMillis;
use attestplane_verifier::checkpoint::{
    self, Checkpoint, CheckpointError, MAX_NOTE_LEN, MAX_SIGNATURES, VerifiedCheckpoint,
    sign_checkpoint, verify_checkpoint, verify_consistent_checkpoints,
};
use attestplane_verifier::handle::{
    HandleClaims, HandleError, HandleExpectations, Jwks, MAX_TOKEN_LEN, encode_handle,
    verify_handle,
};
use attestplane_verifier::merkle::{self, Hash, MerkleError};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use proptest::prelude::*;
use serde::Deserialize;

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

const LOG: &str = "attestplane.example/log";

/// The RFC 6962 root of the 8 Certificate Transparency test leaves (testdata/merkle).
const ROOT8: &str = "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328";

/// The checkpoint (LOG, 8, ROOT8) signed by the key of seed [7; 32] under key name LOG.
const KAT_NOTE: &str = "attestplane.example/log\n8\nXcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=\n\n\u{2014} attestplane.example/log bbDLQku/7qT9umQE6TsoenWGizrbE943OCjjTzO92XJ8dJ5Xk7hSCE5rIqaH4Ok7k+gMKPwnQOvtYW2og2Nmwv302QU=\n";

/// The handle of `kat_claims()` signed by the key of seed [7; 32] under kid "epoch-3".
const KAT_TOKEN: &str = "eyJhbGciOiJFZERTQSIsInR5cCI6IkpXVCIsImtpZCI6ImVwb2NoLTMifQ.eyJpc3MiOiJodHRwczovL2F0dGVzdHBsYW5lLmV4YW1wbGUiLCJzdWIiOiJhZ2VudC03IiwiYXVkIjoiaHR0cHM6Ly9tY3AuZXhhbXBsZS93ZWF0aGVyIiwiZXhwIjoxNzYwMDAwMzAwLCJpYXQiOjE3NjAwMDAwMDAsIm5iZiI6MTc2MDAwMDAwMCwianRpIjoiaC0wMDAxIiwidGVuYW50IjoiYWNtZSIsInRvb2xzIjpbImZvcmVjYXN0IiwiYWxlcnRzIl0sIm1lYXN1cmVtZW50IjoiZDBiNmU4NWYxOTQzODY5OWVkMjI0MTMxZDg2MmM2YjhhOWE0YmRkNTczYTEzY2MxZWFmZmY1ODdkM2YzNmVlMTJmMmJiMmZlODJlMWVjODk4MTVjMDM2YzVjOTIxODkyIiwic2VxIjo0Miwic2VydmVyIjoid2VhdGhlciJ9.Oj1JJyUcb5rEoN-VKT_M9hHSycwmTcWpn0Y_v5_eoNnb9Ltvh2vV3r-8i4pqe2XSN9oG8qi6KsAduP6pT1gEDg";

/// The JWKS of the key of seed [7; 32] under kid "epoch-3".
const KAT_JWKS: &str = r#"{"keys":[{"kty":"OKP","crv":"Ed25519","x":"6kpsY-KcUgq-9VB7Ey7F-ZVHdq6-vnuSQh7qaRRG0iw","kid":"epoch-3","alg":"EdDSA","use":"sig"}]}"#;

const KID: &str = "epoch-3";
const ISS: &str = "https://attestplane.example";
const AUD: &str = "https://mcp.example/weather";
/// iat and nbf of the known-answer handle; it expires 300 s later.
const IAT: u64 = 1_760_000_000;
const EXP: u64 = 1_760_000_300;

fn key() -> SigningKey {
    SigningKey::from_bytes(&[7; 32])
}

fn other_key() -> SigningKey {
    SigningKey::from_bytes(&[9; 32])
}

fn root8() -> Hash {
    Hash::from_hex(ROOT8).unwrap()
}

fn kat_checkpoint() -> Checkpoint {
    Checkpoint::new(LOG, 8, root8()).unwrap()
}

fn kat_claims() -> HandleClaims {
    HandleClaims {
        iss: ISS.into(),
        sub: "agent-7".into(),
        aud: AUD.into(),
        exp: EXP,
        iat: IAT,
        nbf: Some(IAT),
        jti: "h-0001".into(),
        tenant: "acme".into(),
        tools: vec!["forecast".into(), "alerts".into()],
        // SHA-384("attestplane test pcrs")
        measurement: "d0b6e85f19438699ed224131d862c6b8a9a4bdd573a13cc1eafff587d3f36ee12f2bb2fe82e1ec89815c036c5c921892".into(),
        seq: 42,
        server: "weather".into(),
    }
}

fn jwks() -> Jwks {
    Jwks::from_keys([(KID, key().verifying_key())]).unwrap()
}

fn expect() -> HandleExpectations {
    HandleExpectations {
        issuer: Some(ISS.into()),
        audience: Some(AUD.into()),
        leeway_secs: 0,
    }
}

/// One minute into the known-answer handle's life.
fn during() -> UnixMillis {
    UnixMillis::from_secs(IAT + 60)
}

/// A token over arbitrary header and claims JSON, signed with `key`.
fn sign_raw(header: &str, claims: &str, key: &SigningKey) -> String {
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims)
    );
    let sig = key.sign(input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.to_bytes()))
}

const HEADER: &str = r#"{"alg":"EdDSA","typ":"JWT","kid":"epoch-3"}"#;

fn claims_json() -> String {
    serde_json::to_string(&kat_claims()).unwrap()
}

fn verify_kat_note(note: &str) -> Result<VerifiedCheckpoint, CheckpointError> {
    verify_checkpoint(note, LOG, &key().verifying_key())
}

// ---------------------------------------------------------------------------------------------
// Checkpoints
// ---------------------------------------------------------------------------------------------

#[test]
fn checkpoint_note_bytes_match_known_answer() {
    let note = sign_checkpoint(&kat_checkpoint(), LOG, &key()).unwrap();
    assert_eq!(note, KAT_NOTE);
}

#[test]
fn checkpoint_key_id_matches_known_answer() {
    // The note package's verifier key for this key is
    // attestplane.example/log+6db0cb42+AepKbGPinFIKvvVQexMuxfmVR3auvr57kkIe6mkURtIs
    assert_eq!(
        checkpoint::key_id(LOG, &key().verifying_key()),
        [0x6d, 0xb0, 0xcb, 0x42]
    );
}

#[test]
fn signed_checkpoint_round_trips() {
    let v = verify_kat_note(KAT_NOTE).unwrap();
    assert_eq!(v.checkpoint(), &kat_checkpoint());
    assert_eq!(v.origin(), LOG);
    assert_eq!(v.size(), 8);
    assert_eq!(v.root(), &root8());
    assert_eq!(v.key_name(), LOG);
    assert_eq!(v.note(), KAT_NOTE);
}

#[derive(Deserialize)]
struct SumDb {
    key_name: String,
    public_key_hex: String,
    checkpoints: Vec<SumDbCheckpoint>,
}

#[derive(Deserialize)]
struct SumDbCheckpoint {
    size: u64,
    root_base64: String,
    note: String,
}

#[test]
fn verifies_real_sum_golang_org_checkpoints() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/testdata/merkle/sumdb_checkpoints.json"
    );
    let data: SumDb = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let pk: [u8; 32] = hex::decode(&data.public_key_hex)
        .unwrap()
        .try_into()
        .unwrap();
    let pk = VerifyingKey::from_bytes(&pk).unwrap();
    assert_eq!(
        checkpoint::key_id(&data.key_name, &pk),
        [0x03, 0x3d, 0xe0, 0xae]
    );
    assert!(!data.checkpoints.is_empty());
    for cp in &data.checkpoints {
        let v = verify_checkpoint(&cp.note, &data.key_name, &pk)
            .unwrap_or_else(|e| panic!("size {}: {e}", cp.size));
        assert_eq!(v.origin(), "go.sum database tree");
        assert_eq!(v.size(), cp.size);
        assert_eq!(STANDARD.encode(v.root().as_bytes()), cp.root_base64);
        // Re-encoding the body gives back the signed text exactly.
        assert!(cp.note.starts_with(&v.checkpoint().body()));
        // And our key does not verify it.
        assert!(matches!(
            verify_checkpoint(&cp.note, &data.key_name, &key().verifying_key()),
            Err(CheckpointError::MissingSignature { .. })
        ));
    }
}

#[test]
fn rejects_checkpoint_with_tampered_root() {
    let mut root = *root8().as_bytes();
    root[0] ^= 1;
    let forged = KAT_NOTE.replace(&STANDARD.encode(root8().as_bytes()), &STANDARD.encode(root));
    assert_ne!(forged, KAT_NOTE);
    assert_eq!(
        verify_kat_note(&forged),
        Err(CheckpointError::BadSignature {
            key_name: LOG.into()
        })
    );
}

#[test]
fn rejects_checkpoint_with_tampered_size() {
    let forged = KAT_NOTE.replacen("\n8\n", "\n9\n", 1);
    assert_eq!(
        verify_kat_note(&forged),
        Err(CheckpointError::BadSignature {
            key_name: LOG.into()
        })
    );
}

#[test]
fn rejects_checkpoint_signed_by_another_key() {
    let note = sign_checkpoint(&kat_checkpoint(), LOG, &other_key()).unwrap();
    // Same name, another key: another key ID, so no signature of ours at all.
    assert!(matches!(
        verify_kat_note(&note),
        Err(CheckpointError::MissingSignature { key_name, .. }) if key_name == LOG
    ));
}

#[test]
fn rejects_checkpoint_signed_under_another_key_name() {
    let note = sign_checkpoint(&kat_checkpoint(), "other.example/log", &key()).unwrap();
    assert!(matches!(
        verify_kat_note(&note),
        Err(CheckpointError::MissingSignature { .. })
    ));
    // Renaming the line does not help: the key ID binds the name.
    let renamed = note.replace("\u{2014} other.example/log ", &format!("\u{2014} {LOG} "));
    assert!(matches!(
        verify_kat_note(&renamed),
        Err(CheckpointError::MissingSignature { .. })
    ));
}

#[test]
fn rejects_truncated_checkpoint_notes() {
    for len in 0..KAT_NOTE.len() {
        let Some(prefix) = KAT_NOTE.get(..len) else {
            continue;
        };
        assert!(
            verify_kat_note(prefix).is_err(),
            "accepted the first {len} bytes"
        );
    }
}

#[test]
fn ignores_cosignatures_by_unknown_keys() {
    let witness = sign_checkpoint(&kat_checkpoint(), "witness.example/w1", &other_key()).unwrap();
    let witness_line = witness.rsplit_once("\n\n").unwrap().1;
    let ours_line = KAT_NOTE.rsplit_once("\n\n").unwrap().1;
    let text = kat_checkpoint().body();
    for note in [
        format!("{text}\n{ours_line}{witness_line}"),
        format!("{text}\n{witness_line}{ours_line}"),
    ] {
        let v = verify_kat_note(&note).unwrap();
        assert_eq!(v.size(), 8);
    }
    // A line that reuses our name with a foreign key (another key ID) is ignored too.
    let impostor = sign_checkpoint(&kat_checkpoint(), LOG, &other_key()).unwrap();
    let impostor_line = impostor.rsplit_once("\n\n").unwrap().1;
    assert!(verify_kat_note(&format!("{text}\n{impostor_line}{ours_line}")).is_ok());
    // But the note must carry one of ours.
    assert!(matches!(
        verify_kat_note(&format!("{text}\n{witness_line}")),
        Err(CheckpointError::MissingSignature { .. })
    ));
}

#[test]
fn rejects_note_where_one_of_our_signatures_is_bad() {
    let ours_line = KAT_NOTE.rsplit_once("\n\n").unwrap().1;
    // Our key ID, a signature over something else.
    let bad = sign_checkpoint(&Checkpoint::new(LOG, 9, root8()).unwrap(), LOG, &key()).unwrap();
    let bad_line = bad.rsplit_once("\n\n").unwrap().1;
    let text = kat_checkpoint().body();
    assert_eq!(
        verify_kat_note(&format!("{text}\n{ours_line}{bad_line}")),
        Err(CheckpointError::BadSignature {
            key_name: LOG.into()
        })
    );
}

#[test]
fn rejects_malformed_signature_lines() {
    let text = kat_checkpoint().body();
    let ours_line = KAT_NOTE.rsplit_once("\n\n").unwrap().1;
    for bad_line in [
        "- attestplane.example/log AAAAAAAA\n", // hyphen instead of em dash
        "\u{2014} attestplane.example/log\n",   // no signature
        "\u{2014}  attestplane.example/log AAAAAAAA\n", // empty key name
        "\u{2014} a+b AAAAAAAA\n",              // '+' in key name
        "\u{2014} name AAAA\n",                 // shorter than a key ID
        "\u{2014} name AAAAAAA\n",              // not base64
        "\u{2014} name AAAAAAAA AAAA\n",        // extra field
    ] {
        let note = format!("{text}\n{ours_line}{bad_line}");
        assert!(
            matches!(
                verify_kat_note(&note),
                Err(CheckpointError::MalformedNote { .. })
            ),
            "accepted {bad_line:?}"
        );
    }
    // No trailing newline, blank line at the end, carriage return.
    assert!(verify_kat_note(KAT_NOTE.trim_end_matches('\n')).is_err());
    assert!(verify_kat_note(&format!("{KAT_NOTE}\n")).is_err());
    assert!(matches!(
        verify_kat_note(&KAT_NOTE.replace('\n', "\r\n")),
        Err(CheckpointError::MalformedNote {
            reason: "control character"
        })
    ));
}

#[test]
fn rejects_signed_checkpoint_with_extension_lines() {
    let text = format!("{}extension\n", kat_checkpoint().body());
    let sig = key().sign(text.as_bytes());
    let mut blob = checkpoint::key_id(LOG, &key().verifying_key()).to_vec();
    blob.extend_from_slice(&sig.to_bytes());
    let note = format!("{text}\n\u{2014} {LOG} {}\n", STANDARD.encode(blob));
    assert_eq!(
        verify_kat_note(&note),
        Err(CheckpointError::ExtensionLines { count: 1 })
    );
}

#[test]
fn rejects_oversized_notes_and_too_many_signatures() {
    let huge = format!("{KAT_NOTE}{}", "x".repeat(MAX_NOTE_LEN));
    assert!(matches!(
        verify_kat_note(&huge),
        Err(CheckpointError::TooLong { .. })
    ));
    let ours_line = KAT_NOTE.rsplit_once("\n\n").unwrap().1;
    let witness = sign_checkpoint(&kat_checkpoint(), "w.example/w", &other_key()).unwrap();
    let witness_line = witness.rsplit_once("\n\n").unwrap().1;
    let text = kat_checkpoint().body();
    let many = format!("{text}\n{ours_line}{}", witness_line.repeat(MAX_SIGNATURES));
    assert_eq!(
        verify_kat_note(&many),
        Err(CheckpointError::TooManySignatures {
            max: MAX_SIGNATURES
        })
    );
    // Up to the limit is fine (the spec requires at least 16).
    let enough = format!(
        "{text}\n{ours_line}{}",
        witness_line.repeat(MAX_SIGNATURES - 1)
    );
    assert!(verify_kat_note(&enough).is_ok());
}

fn signed(origin: &str, size: u64, root: Hash) -> VerifiedCheckpoint {
    let note = sign_checkpoint(&Checkpoint::new(origin, size, root).unwrap(), LOG, &key()).unwrap();
    verify_kat_note(&note).unwrap()
}

fn tree(n: u64) -> Vec<Hash> {
    (0..n)
        .map(|i| merkle::leaf_hash(merkle::leaf_hash(&i.to_be_bytes()).as_bytes()))
        .collect()
}

#[test]
fn consistent_checkpoints_verify_in_either_order() {
    let leaves = tree(13);
    let old = signed(LOG, 5, merkle::root(&leaves[..5]));
    let new = signed(LOG, 13, merkle::root(&leaves));
    let proof = merkle::consistency_proof(&leaves, 5).unwrap();
    verify_consistent_checkpoints(&old, &new, &proof).unwrap();
    verify_consistent_checkpoints(&new, &old, &proof).unwrap();
    verify_consistent_checkpoints(&new, &new, &[]).unwrap();
}

#[test]
fn forked_checkpoints_of_equal_size_carry_both_roots() {
    let a = tree(7);
    let mut b = a.clone();
    b[3] = merkle::leaf_hash(b"spliced");
    let left = signed(LOG, 7, merkle::root(&a));
    let right = signed(LOG, 7, merkle::root(&b));
    assert_eq!(
        verify_consistent_checkpoints(&left, &right, &[]),
        Err(CheckpointError::Fork {
            size: 7,
            old_root: merkle::root(&a),
            new_root: merkle::root(&b),
        })
    );
}

#[test]
fn inconsistent_checkpoints_carry_both_tree_heads() {
    // The host rewrote entry 2 after the auditor saw size 4.
    let honest = tree(9);
    let mut rewritten = honest.clone();
    rewritten[2] = merkle::leaf_hash(b"rewritten");
    let old = signed(LOG, 4, merkle::root(&honest[..4]));
    let new = signed(LOG, 9, merkle::root(&rewritten));
    let proof = merkle::consistency_proof(&rewritten, 4).unwrap();
    let err = verify_consistent_checkpoints(&old, &new, &proof).unwrap_err();
    assert_eq!(
        err,
        CheckpointError::Inconsistent {
            old_size: 4,
            old_root: merkle::root(&honest[..4]),
            new_size: 9,
            new_root: merkle::root(&rewritten),
            reason: MerkleError::ConsistencyMismatch {
                old_size: 4,
                new_size: 9
            },
        }
    );
    let message = err.to_string();
    assert!(message.contains(&merkle::root(&honest[..4]).to_hex()));
    assert!(message.contains(&merkle::root(&rewritten).to_hex()));
}

#[test]
fn rejects_consistency_across_origins() {
    let leaves = tree(3);
    let a = signed(LOG, 3, merkle::root(&leaves));
    let b = signed("other.example/log", 3, merkle::root(&leaves));
    assert!(matches!(
        verify_consistent_checkpoints(&a, &b, &[]),
        Err(CheckpointError::OriginMismatch { .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// Handles
// ---------------------------------------------------------------------------------------------

#[test]
fn handle_token_matches_known_answer() {
    assert_eq!(
        encode_handle(&kat_claims(), KID, &key()).unwrap(),
        KAT_TOKEN
    );
}

#[test]
fn jwks_json_matches_known_answer_and_round_trips() {
    assert_eq!(jwks().to_json(), KAT_JWKS);
    assert_eq!(Jwks::parse(KAT_JWKS.as_bytes()).unwrap(), jwks());
}

#[test]
fn handle_round_trips() {
    let v = verify_handle(KAT_TOKEN, &jwks(), &expect(), during()).unwrap();
    assert_eq!(v.claims(), &kat_claims());
    assert_eq!(v.kid(), KID);
    // Without expectations too.
    let v = verify_handle(KAT_TOKEN, &jwks(), &HandleExpectations::default(), during()).unwrap();
    assert_eq!(v.into_claims(), kat_claims());
    // nbf is optional and omitted when absent.
    let mut c = kat_claims();
    c.nbf = None;
    let t = encode_handle(&c, KID, &key()).unwrap();
    let payload = URL_SAFE_NO_PAD
        .decode(t.split('.').nth(1).unwrap())
        .unwrap();
    assert!(!String::from_utf8(payload).unwrap().contains("nbf"));
    assert_eq!(
        verify_handle(&t, &jwks(), &expect(), during())
            .unwrap()
            .claims(),
        &c
    );
}

#[test]
fn rejects_alg_none() {
    let header = r#"{"alg":"none","typ":"JWT","kid":"epoch-3"}"#;
    let unsigned = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims_json())
    );
    assert_eq!(
        verify_handle(&unsigned, &jwks(), &expect(), during()),
        Err(HandleError::BadAlgorithm { alg: "none".into() })
    );
    // Even carrying a valid EdDSA signature over the same input.
    let signed = sign_raw(header, &claims_json(), &key());
    assert_eq!(
        verify_handle(&signed, &jwks(), &expect(), during()),
        Err(HandleError::BadAlgorithm { alg: "none".into() })
    );
}

#[test]
fn rejects_alg_hs256_and_rs256() {
    for alg in ["HS256", "RS256", "ES256", "eddsa", "Ed25519"] {
        let header = format!(r#"{{"alg":"{alg}","typ":"JWT","kid":"epoch-3"}}"#);
        // An HMAC "keyed" with the public key is the classic confusion; the algorithm is
        // refused before any key is used, so the signature bytes do not matter.
        let token = format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode(&header),
            URL_SAFE_NO_PAD.encode(claims_json()),
            URL_SAFE_NO_PAD.encode([0x5a; 32])
        );
        assert_eq!(
            verify_handle(&token, &jwks(), &expect(), during()),
            Err(HandleError::BadAlgorithm { alg: alg.into() })
        );
    }
}

#[test]
fn rejects_expired_handle_at_pinned_time() {
    let at = UnixMillis::from_secs(EXP);
    assert_eq!(
        verify_handle(KAT_TOKEN, &jwks(), &expect(), at),
        Err(HandleError::Expired { at, exp: EXP })
    );
    // One millisecond before expiry it is valid.
    let just_before = UnixMillis::from_millis(EXP * 1000 - 1);
    assert!(verify_handle(KAT_TOKEN, &jwks(), &expect(), just_before).is_ok());
    // The leeway extends it, and only by that much.
    let lenient = HandleExpectations {
        leeway_secs: 30,
        ..expect()
    };
    assert!(verify_handle(KAT_TOKEN, &jwks(), &lenient, at).is_ok());
    let late = UnixMillis::from_secs(EXP + 30);
    assert_eq!(
        verify_handle(KAT_TOKEN, &jwks(), &lenient, late),
        Err(HandleError::Expired { at: late, exp: EXP })
    );
}

#[test]
fn rejects_handle_not_yet_valid() {
    let mut c = kat_claims();
    c.nbf = Some(IAT + 100);
    let t = encode_handle(&c, KID, &key()).unwrap();
    let at = UnixMillis::from_secs(IAT + 50);
    assert_eq!(
        verify_handle(&t, &jwks(), &expect(), at),
        Err(HandleError::NotYetValid { at, nbf: IAT + 100 })
    );
    let lenient = HandleExpectations {
        leeway_secs: 50,
        ..expect()
    };
    assert!(verify_handle(&t, &jwks(), &lenient, at).is_ok());
}

#[test]
fn rejects_handle_issued_in_the_future() {
    let at = UnixMillis::from_secs(IAT - 10);
    let mut c = kat_claims();
    c.nbf = None;
    let t = encode_handle(&c, KID, &key()).unwrap();
    assert_eq!(
        verify_handle(&t, &jwks(), &expect(), at),
        Err(HandleError::IssuedInFuture { at, iat: IAT })
    );
    let lenient = HandleExpectations {
        leeway_secs: 10,
        ..expect()
    };
    assert!(verify_handle(&t, &jwks(), &lenient, at).is_ok());
}

#[test]
fn rejects_wrong_audience_and_issuer() {
    let other = HandleExpectations {
        audience: Some("https://mcp.example/other".into()),
        ..expect()
    };
    assert_eq!(
        verify_handle(KAT_TOKEN, &jwks(), &other, during()),
        Err(HandleError::WrongAudience {
            expected: "https://mcp.example/other".into(),
            found: AUD.into(),
        })
    );
    let other = HandleExpectations {
        issuer: Some("https://evil.example".into()),
        ..expect()
    };
    assert_eq!(
        verify_handle(KAT_TOKEN, &jwks(), &other, during()),
        Err(HandleError::WrongIssuer {
            expected: "https://evil.example".into(),
            found: ISS.into(),
        })
    );
}

#[test]
fn rejects_unknown_and_missing_kid() {
    let t = encode_handle(&kat_claims(), "epoch-4", &key()).unwrap();
    assert_eq!(
        verify_handle(&t, &jwks(), &expect(), during()),
        Err(HandleError::UnknownKid {
            kid: "epoch-4".into()
        })
    );
    let t = sign_raw(r#"{"alg":"EdDSA","typ":"JWT"}"#, &claims_json(), &key());
    assert_eq!(
        verify_handle(&t, &jwks(), &expect(), during()),
        Err(HandleError::MissingKid)
    );
}

#[test]
fn rejects_handle_signed_by_another_key_under_our_kid() {
    let t = encode_handle(&kat_claims(), KID, &other_key()).unwrap();
    assert_eq!(
        verify_handle(&t, &jwks(), &expect(), during()),
        Err(HandleError::BadSignature { kid: KID.into() })
    );
}

#[test]
fn rejects_critical_header() {
    let t = sign_raw(
        r#"{"alg":"EdDSA","typ":"JWT","kid":"epoch-3","crit":["exp"]}"#,
        &claims_json(),
        &key(),
    );
    assert_eq!(
        verify_handle(&t, &jwks(), &expect(), during()),
        Err(HandleError::CriticalHeader)
    );
}

#[test]
fn rejects_modified_payload() {
    let mut c = kat_claims();
    c.tools.push("delete_everything".into());
    let forged_payload = URL_SAFE_NO_PAD.encode(serde_json::to_string(&c).unwrap());
    let parts: Vec<&str> = KAT_TOKEN.split('.').collect();
    let forged = format!("{}.{forged_payload}.{}", parts[0], parts[2]);
    assert_eq!(
        verify_handle(&forged, &jwks(), &expect(), during()),
        Err(HandleError::BadSignature { kid: KID.into() })
    );
}

#[test]
fn rejects_tokens_with_two_or_four_segments() {
    let parts: Vec<&str> = KAT_TOKEN.split('.').collect();
    let two = format!("{}.{}", parts[0], parts[1]);
    assert_eq!(
        verify_handle(&two, &jwks(), &expect(), during()),
        Err(HandleError::SegmentCount { found: 2 })
    );
    let four = format!("{KAT_TOKEN}.{}", parts[2]);
    assert_eq!(
        verify_handle(&four, &jwks(), &expect(), during()),
        Err(HandleError::SegmentCount { found: 4 })
    );
    // JWE compact (five segments) is not a handle either.
    let five = format!("{KAT_TOKEN}.a.b");
    assert_eq!(
        verify_handle(&five, &jwks(), &expect(), during()),
        Err(HandleError::SegmentCount { found: 5 })
    );
}

#[test]
fn rejects_oversize_token() {
    let huge = format!("{KAT_TOKEN}{}", "A".repeat(MAX_TOKEN_LEN));
    assert_eq!(
        verify_handle(&huge, &jwks(), &expect(), during()),
        Err(HandleError::TooLong {
            len: huge.len(),
            max: MAX_TOKEN_LEN
        })
    );
    // And the encoder will not produce one.
    let mut c = kat_claims();
    c.tools = (0..1000).map(|i| format!("tool-{i}")).collect();
    assert!(matches!(
        encode_handle(&c, KID, &key()),
        Err(HandleError::TooLong { .. })
    ));
}

#[test]
fn rejects_duplicate_json_members() {
    let dup_claim = claims_json().replacen(
        r#""aud":"https://mcp.example/weather""#,
        r#""aud":"https://mcp.example/weather","aud":"https://mcp.example/other""#,
        1,
    );
    let t = sign_raw(HEADER, &dup_claim, &key());
    assert_eq!(
        verify_handle(&t, &jwks(), &expect(), during()),
        Err(HandleError::DuplicateKey {
            part: "claims",
            key: "aud".into()
        })
    );
    let t = sign_raw(
        r#"{"alg":"EdDSA","typ":"JWT","kid":"epoch-3","kid":"epoch-9"}"#,
        &claims_json(),
        &key(),
    );
    assert_eq!(
        verify_handle(&t, &jwks(), &expect(), during()),
        Err(HandleError::DuplicateKey {
            part: "header",
            key: "kid".into()
        })
    );
}

#[test]
fn accepts_extra_claims_but_not_mistyped_ones() {
    let extra = claims_json().replacen('{', r#"{"scope":"mcp:tools","x":{"y":[1,2]},"#, 1);
    let t = sign_raw(HEADER, &extra, &key());
    assert_eq!(
        verify_handle(&t, &jwks(), &expect(), during())
            .unwrap()
            .claims(),
        &kat_claims()
    );
    for (from, to) in [
        (r#""seq":42"#, r#""seq":"42""#),
        (r#""seq":42"#, r#""seq":-1"#),
        (r#""seq":42"#, r#""seq":42.5"#),
        (
            r#""aud":"https://mcp.example/weather""#,
            r#""aud":["https://mcp.example/weather"]"#,
        ),
        (r#""tools":["forecast","alerts"]"#, r#""tools":"forecast""#),
        (r#","tenant":"acme""#, ""),
    ] {
        let t = sign_raw(HEADER, &claims_json().replacen(from, to, 1), &key());
        assert!(
            matches!(
                verify_handle(&t, &jwks(), &expect(), during()),
                Err(HandleError::InvalidClaims { .. })
            ),
            "accepted {to:?}"
        );
    }
    // Well typed but ill formed: the measurement must be 96 lower-case hex digits.
    let mut c = kat_claims();
    c.measurement = c.measurement.to_uppercase();
    let t = sign_raw(HEADER, &serde_json::to_string(&c).unwrap(), &key());
    assert!(matches!(
        verify_handle(&t, &jwks(), &expect(), during()),
        Err(HandleError::InvalidClaim {
            claim: "measurement",
            ..
        })
    ));
    assert!(encode_handle(&c, KID, &key()).is_err());
}

#[test]
fn rejects_wrong_typ_and_non_object_header() {
    let t = sign_raw(
        r#"{"alg":"EdDSA","typ":"at+jwt","kid":"epoch-3"}"#,
        &claims_json(),
        &key(),
    );
    assert!(matches!(
        verify_handle(&t, &jwks(), &expect(), during()),
        Err(HandleError::Malformed { .. })
    ));
    let t = sign_raw(r#"["EdDSA"]"#, &claims_json(), &key());
    assert!(matches!(
        verify_handle(&t, &jwks(), &expect(), during()),
        Err(HandleError::Malformed { .. })
    ));
    // Padded base64url is not the canonical encoding.
    let parts: Vec<&str> = KAT_TOKEN.split('.').collect();
    let padded = format!("{}=.{}.{}", parts[0], parts[1], parts[2]);
    assert!(matches!(
        verify_handle(&padded, &jwks(), &expect(), during()),
        Err(HandleError::Malformed { .. })
    ));
}

#[test]
fn jwks_skips_foreign_keys_and_rejects_bad_ed25519_keys() {
    let x = URL_SAFE_NO_PAD.encode(key().verifying_key().as_bytes());
    let mixed = format!(
        r#"{{"keys":[{{"kty":"RSA","kid":"rsa-1","n":"AQAB","e":"AQAB"}},{{"kty":"OKP","crv":"X25519","kid":"x","x":"{x}"}},{{"kty":"OKP","crv":"Ed25519","kid":"epoch-3","x":"{x}"}}]}}"#
    );
    let set = Jwks::parse(mixed.as_bytes()).unwrap();
    assert_eq!(set.kids().collect::<Vec<_>>(), vec!["epoch-3"]);
    assert!(verify_handle(KAT_TOKEN, &set, &expect(), during()).is_ok());

    let with_d =
        format!(r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","kid":"k","x":"{x}","d":"{x}"}}]}}"#);
    assert!(matches!(
        Jwks::parse(with_d.as_bytes()),
        Err(HandleError::BadJwks { .. })
    ));
    let dup = format!(
        r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","kid":"k","x":"{x}"}},{{"kty":"OKP","crv":"Ed25519","kid":"k","x":"{x}"}}]}}"#
    );
    assert_eq!(
        Jwks::parse(dup.as_bytes()),
        Err(HandleError::DuplicateKid { kid: "k".into() })
    );
    let short = r#"{"keys":[{"kty":"OKP","crv":"Ed25519","kid":"k","x":"AAAA"}]}"#;
    assert!(matches!(
        Jwks::parse(short.as_bytes()),
        Err(HandleError::BadJwks { .. })
    ));
    assert!(Jwks::parse(b"[]").is_err());
    assert!(Jwks::parse(br#"{"keys":{}}"#).is_err());
    assert!(
        Jwks::from_keys([
            ("k", key().verifying_key()),
            ("k", other_key().verifying_key())
        ])
        .is_err()
    );
}

// ---------------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------------

/// `s` with the byte at `index` replaced by `value`, or `None` if that is not a change or not
/// UTF-8 (the `&str` APIs cannot be handed such input at all).
fn mutate(s: &str, index: usize, value: u8) -> Option<String> {
    let mut bytes = s.as_bytes().to_vec();
    if bytes[index] == value {
        return None;
    }
    bytes[index] = value;
    String::from_utf8(bytes).ok()
}

/// Every bit of every byte, deterministically (the property tests below try other values).
#[test]
fn flipping_any_bit_of_a_note_or_token_is_rejected() {
    for bit in 0..8 {
        for index in 0..KAT_NOTE.len() {
            let value = KAT_NOTE.as_bytes()[index] ^ (1 << bit);
            if let Some(changed) = mutate(KAT_NOTE, index, value) {
                assert!(verify_kat_note(&changed).is_err(), "accepted {changed:?}");
            }
        }
        for index in 0..KAT_TOKEN.len() {
            let value = KAT_TOKEN.as_bytes()[index] ^ (1 << bit);
            if let Some(changed) = mutate(KAT_TOKEN, index, value) {
                let r = verify_handle(&changed, &jwks(), &HandleExpectations::default(), during());
                assert!(r.is_err(), "accepted {changed:?}");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn any_single_byte_change_in_a_signed_note_is_rejected(
        index in 0..KAT_NOTE.len(),
        value in any::<u8>(),
    ) {
        if let Some(changed) = mutate(KAT_NOTE, index, value) {
            prop_assert!(verify_kat_note(&changed).is_err(), "accepted {changed:?}");
        }
    }

    #[test]
    fn any_single_byte_change_in_a_token_is_rejected(
        index in 0..KAT_TOKEN.len(),
        value in any::<u8>(),
    ) {
        if let Some(changed) = mutate(KAT_TOKEN, index, value) {
            prop_assert!(
                verify_handle(&changed, &jwks(), &HandleExpectations::default(), during()).is_err(),
                "accepted {changed:?}"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn checkpoint_parsers_never_panic(s in "\\PC{0,300}", bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let k = key().verifying_key();
        let _ = Checkpoint::parse_body(&s);
        let _ = verify_checkpoint(&s, LOG, &k);
        let lossy = String::from_utf8_lossy(&bytes);
        let _ = Checkpoint::parse_body(&lossy);
        let _ = verify_checkpoint(&lossy, LOG, &k);
        // Structured noise: a real note with random text spliced in.
        let spliced = format!("{}{}{}", &KAT_NOTE[..30], s, &KAT_NOTE[30..]);
        let _ = verify_checkpoint(&spliced, LOG, &k);
    }

    #[test]
    fn handle_parsers_never_panic(
        s in "[A-Za-z0-9_.=-]{0,400}",
        header in "\\PC{0,80}",
        claims in "\\PC{0,200}",
        bytes in prop::collection::vec(any::<u8>(), 0..400),
    ) {
        let set = jwks();
        let _ = verify_handle(&s, &set, &expect(), during());
        let _ = verify_handle(&sign_raw(&header, &claims, &key()), &set, &expect(), during());
        let _ = verify_handle(&String::from_utf8_lossy(&bytes), &set, &expect(), during());
        let _ = Jwks::parse(&bytes);
        let _ = Jwks::parse(header.as_bytes());
    }

    #[test]
    fn signed_checkpoints_round_trip(
        origin in "[a-z0-9./ -]{1,40}",
        size in any::<u64>(),
        root in any::<[u8; 32]>(),
        key_name in "[a-z0-9./-]{1,40}",
    ) {
        let root = if size == 0 { merkle::empty_root() } else { Hash::from_bytes(root) };
        let cp = Checkpoint::new(origin.clone(), size, root).unwrap();
        prop_assert_eq!(Checkpoint::parse_body(&cp.body()).unwrap(), cp.clone());
        let note = sign_checkpoint(&cp, &key_name, &key()).unwrap();
        let v = verify_checkpoint(&note, &key_name, &key().verifying_key()).unwrap();
        prop_assert_eq!(v.checkpoint(), &cp);
    }
}
