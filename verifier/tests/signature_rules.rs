//! Issue 9 item 2: verdicts that depended on randomness. The log verifier's batch path was
//! cofactorless with random coefficients, so a signature whose `R` carries a small-order
//! component (only the epoch key holder can make one) verified in some runs and not others.
//! Every test here crafts such signatures (orders 2, 4 and 8), keys of small order or with a
//! small-order component, and non-canonical `s`, and requires ONE verdict from every path of
//! the verifier crate that checks the enclave's signatures (`eddsa` alone and in batches of any
//! make-up, checkpoints, handles), 1,000 runs each, equal to ed25519-zebra's (the library whose
//! ZIP 215 rules the verifier applies). The log paths (`verify_log`, the enclave's boot replay
//! and the `attestplane-verify log` CLI) are tried in the enclave crate's
//! `tests/signature_rules.rs`, with epoch documents from the mock NSM.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[path = "support/torsion.rs"]
mod torsion;

use attestplane_verifier::UnixMillis;
use attestplane_verifier::checkpoint::{
    Checkpoint, CheckpointError, sign_checkpoint, verify_checkpoint,
};
use attestplane_verifier::eddsa::{self, Item, KeyError, PublicKey};
use attestplane_verifier::handle::{
    HandleClaims, HandleError, HandleExpectations, Jwks, encode_handle, verify_handle,
};
use attestplane_verifier::merkle::Hash;
use ed25519_dalek::ed25519::signature::Keypair;
use ed25519_dalek::{Signature, Signer, SigningKey};
use torsion::{
    SmallOrderKeyForger, TorsionSigner, torsion_point, torsion_points, with_non_canonical_s,
};

const RUNS: usize = 1_000;
const ORDERS: [u64; 3] = [2, 4, 8];
const ORIGIN: &str = "attestplane.test/log";

/// ed25519-zebra's own single verification: the library's answer.
fn library_single(key: &[u8; 32], message: &[u8], signature: &Signature) -> bool {
    ed25519_zebra::VerificationKey::try_from(*key)
        .and_then(|k| k.verify(signature, message))
        .is_ok()
}

/// ed25519-zebra's own batch verification of `(key, message, signature)`s.
fn library_batch(items: &[Item<'_>]) -> bool {
    let mut v = ed25519_zebra::batch::Verifier::new();
    for i in items {
        v.queue((
            ed25519_zebra::VerificationKeyBytes::from(*i.key.as_bytes()),
            *i.signature,
            i.message,
        ));
    }
    v.verify(rand_core::OsRng).is_ok()
}

/// A batch of `messages[i]` signed `signatures[i]`, all under `key`.
fn items<'a>(
    key: &'a PublicKey,
    messages: &'a [Vec<u8>],
    signatures: &'a [Signature],
) -> Vec<Item<'a>> {
    messages
        .iter()
        .zip(signatures)
        .map(|(message, signature)| Item {
            key,
            message,
            signature,
        })
        .collect()
}

/// A key the verifier refuses (`reason`) is refused as a checkpoint's key and cannot enter a
/// JWKS.
fn refused_for_checkpoints_and_handles<S>(signer: &S, reason: KeyError)
where
    S: Signer<Signature> + Keypair<VerifyingKey = ed25519_dalek::VerifyingKey>,
{
    let cp = Checkpoint::new(ORIGIN, 1, Hash::from_bytes([1; 32])).unwrap();
    let note = sign_checkpoint(&cp, ORIGIN, signer).unwrap();
    assert!(matches!(
        verify_checkpoint(&note, ORIGIN, &signer.verifying_key()),
        Err(CheckpointError::BadKey { reason: r, .. }) if r == reason
    ));
    assert!(matches!(
        Jwks::from_keys([("k", signer.verifying_key())]),
        Err(HandleError::BadJwks { .. })
    ));
}

fn messages(n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| format!("entry {i} {}", "x".repeat(i % 97)).into_bytes())
        .collect()
}

/// A signature of order-`order` torsion in `R` under a prime-order key, with the key.
fn torsion_signature(order: u64, message: &[u8]) -> (TorsionSigner, PublicKey, Signature) {
    let signer = TorsionSigner::new(order as u8, torsion_point(order));
    let key = PublicKey::from_bytes(&signer.public()).expect("the key is of prime order");
    let signature = signer.sign_message(message);
    (signer, key, signature)
}

#[test]
fn crafted_signatures_are_torsion_signatures_that_split_a_cofactorless_batch() {
    // The inputs of this file really are the attack: `[s]B − R − [k]A` is a torsion point of the
    // order named, so cofactorless single verification refuses every one, while cofactorless
    // batch verification accepts exactly those whose coefficient z is a multiple of that order.
    // ed25519-dalek's `verify_batch` (z from a transcript of the inputs) accepts some and
    // refuses others; with fresh random z (the log verifier before) it varied run by run.
    let ms = messages(64);
    for order in ORDERS {
        let signer = TorsionSigner::new(order as u8, torsion_point(order));
        let key = signer.verifying_key();
        let mut batch_accepted = 0;
        for m in &ms {
            let signature = signer.sign_message(m);
            assert_eq!(
                torsion::order_of(&-torsion::residual(&signer.public(), m, &signature)),
                order
            );
            assert!(key.verify_strict(m, &signature).is_err(), "order {order}");
            if ed25519_dalek::verify_batch(&[&m[..]], &[signature], &[key]).is_ok() {
                batch_accepted += 1;
            }
        }
        assert!(
            batch_accepted > 0 && batch_accepted < ms.len(),
            "order {order}: cofactorless batch accepted {batch_accepted} of {}",
            ms.len()
        );
    }
}

#[test]
fn torsion_in_r_gets_one_verdict_alone_and_in_every_batch() {
    for order in ORDERS {
        let ms = messages(64);
        let (signer, key, torsion) = torsion_signature(order, &ms[0]);
        // Ordinary signatures by the same key (no torsion), for the mixed batches.
        let plain = TorsionSigner::new(order as u8, torsion_point(1));
        assert_eq!(plain.public(), signer.public());
        let mut sigs: Vec<Signature> = ms.iter().map(|m| plain.sign_message(m)).collect();
        sigs[0] = torsion;
        // A second epoch key, for batches that span two keys.
        let other = SigningKey::from_bytes(&[order as u8 + 40; 32]);
        let other_key = PublicKey::from_verifying_key(&other.verifying_key()).unwrap();
        let other_sigs: Vec<Signature> = ms.iter().map(|m| other.sign(m)).collect();

        // The verdict, from the library alone: the torsion signature verifies (ZIP 215).
        assert!(
            library_single(key.as_bytes(), &ms[0], &torsion),
            "order {order}"
        );
        assert_eq!(key.verify(&ms[0], &torsion), Ok(()), "order {order}");

        let alone = [Item {
            key: &key,
            message: &ms[0],
            signature: &torsion,
        }];
        let one_key = items(&key, &ms, &sigs);
        let two_keys: Vec<Item<'_>> = ms
            .iter()
            .enumerate()
            .map(|(i, message)| {
                if i % 2 == 0 {
                    Item {
                        key: &key,
                        message,
                        signature: &sigs[i],
                    }
                } else {
                    Item {
                        key: &other_key,
                        message,
                        signature: &other_sigs[i],
                    }
                }
            })
            .collect();
        // The torsion signature in the middle of a one-key batch.
        let mut moved = one_key.clone();
        moved.swap(0, 31);
        for run in 0..RUNS {
            assert_eq!(
                key.verify(&ms[0], &torsion),
                Ok(()),
                "order {order} run {run}"
            );
            for (name, batch) in [
                ("alone", &alone[..]),
                ("one key", &moved[..]),
                ("two keys", &two_keys[..]),
            ] {
                assert_eq!(
                    eddsa::verify_batch(batch),
                    Ok(()),
                    "order {order} {name} run {run}"
                );
            }
        }
        // And the library's batch verifier agrees.
        assert!(library_batch(&one_key) && library_batch(&two_keys));
    }
}

#[test]
fn torsion_in_r_next_to_a_bad_signature_is_not_the_one_named() {
    // A batch with a torsion signature and a forged one: the forged one is named every time,
    // never the torsion one, wherever they sit.
    for order in ORDERS {
        let ms = messages(16);
        let (_, key, torsion) = torsion_signature(order, &ms[5]);
        let plain = TorsionSigner::new(order as u8, torsion_point(1));
        let mut sigs: Vec<Signature> = ms.iter().map(|m| plain.sign_message(m)).collect();
        sigs[5] = torsion;
        sigs[11] = plain.sign_message(b"another message");
        let items = items(&key, &ms, &sigs);
        for run in 0..RUNS {
            assert_eq!(
                eddsa::verify_batch(&items),
                Err(11),
                "order {order} run {run}"
            );
        }
    }
}

#[test]
fn non_canonical_s_is_refused_everywhere() {
    let ms = messages(64);
    let signer = SigningKey::from_bytes(&[21; 32]);
    let key = PublicKey::from_verifying_key(&signer.verifying_key()).unwrap();
    let mut sigs: Vec<Signature> = ms.iter().map(|m| signer.sign(m)).collect();
    let good = sigs[9];
    sigs[9] = with_non_canonical_s(&good);
    assert!(!library_single(key.as_bytes(), &ms[9], &sigs[9]));
    let items = items(&key, &ms, &sigs);
    for run in 0..RUNS {
        assert!(key.verify(&ms[9], &sigs[9]).is_err(), "run {run}");
        assert_eq!(eddsa::verify_batch(&items), Err(9), "run {run}");
        assert_eq!(eddsa::verify_batch(&items[9..10]), Err(0), "run {run}");
    }

    // A checkpoint whose signature carries s + l.
    let cp = Checkpoint::new(ORIGIN, 3, Hash::from_bytes([4; 32])).unwrap();
    let note = sign_checkpoint(&cp, ORIGIN, &signer).unwrap();
    assert!(verify_checkpoint(&note, ORIGIN, &signer.verifying_key()).is_ok());
    let tampered = retarget_checkpoint_signature(&note, with_non_canonical_s);
    assert!(matches!(
        verify_checkpoint(&tampered, ORIGIN, &signer.verifying_key()),
        Err(CheckpointError::BadSignature { .. })
    ));

    // A handle whose signature carries s + l.
    let jwks = Jwks::from_keys([("k", signer.verifying_key())]).unwrap();
    let token = encode_handle(&claims(), "k", &signer).unwrap();
    assert!(verify_handle(&token, &jwks, &expect(), during()).is_ok());
    let tampered = retarget_token_signature(&token, with_non_canonical_s);
    assert!(matches!(
        verify_handle(&tampered, &jwks, &expect(), during()),
        Err(HandleError::BadSignature { .. })
    ));
}

#[test]
fn small_order_epoch_key_is_refused_everywhere() {
    for t in torsion_points() {
        let forger = SmallOrderKeyForger::new(&t);
        let m = b"anything at all";
        let forged = forger.forge(m);
        // What the rules exist for: the library alone (ZIP 215 accepts any key that decodes)
        // takes a signature nobody needed a secret for.
        assert!(library_single(&forger.public(), m, &forged));
        assert_eq!(
            PublicKey::from_bytes(&forger.public()),
            Err(KeyError::SmallOrder)
        );

        // Checkpoints and handles: such a key cannot enter a JWKS, built or parsed.
        refused_for_checkpoints_and_handles(&forger, KeyError::SmallOrder);
        let x = base64_url(&forger.public());
        let doc = format!(
            r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","x":"{x}","kid":"k","alg":"EdDSA","use":"sig"}}]}}"#
        );
        assert!(matches!(
            Jwks::parse(doc.as_bytes()),
            Err(HandleError::BadJwks { .. })
        ));
    }
    // The non-canonical encodings of small-order points are refused as well.
    let mut identity_plus_p = [0xffu8; 32];
    identity_plus_p[0] = 0xee;
    identity_plus_p[31] = 0x7f;
    assert_eq!(
        PublicKey::from_bytes(&identity_plus_p),
        Err(KeyError::NonCanonical)
    );
    let mut identity_signed = [0u8; 32];
    identity_signed[0] = 1;
    identity_signed[31] = 0x80;
    assert_eq!(
        PublicKey::from_bytes(&identity_signed),
        Err(KeyError::NonCanonical)
    );
}

#[test]
fn epoch_key_with_a_torsion_component_is_refused_everywhere() {
    for order in ORDERS {
        let signer = TorsionSigner::with_key_torsion(9, torsion_point(1), torsion_point(order));
        let m = b"entry";
        // Its holder's signatures satisfy the cofactored equation...
        assert!(library_single(&signer.public(), m, &signer.sign_message(m)));
        // ...but the key is not of prime order.
        assert_eq!(
            PublicKey::from_bytes(&signer.public()),
            Err(KeyError::MixedOrder)
        );
        refused_for_checkpoints_and_handles(&signer, KeyError::MixedOrder);
    }
}

#[test]
fn checkpoints_and_handles_signed_with_torsion_in_r_get_one_verdict() {
    for order in ORDERS {
        let signer = TorsionSigner::new(order as u8, torsion_point(order));
        let key = signer.verifying_key();
        let cp = Checkpoint::new(ORIGIN, 7, Hash::from_bytes([7; 32])).unwrap();
        let note = sign_checkpoint(&cp, ORIGIN, &signer).unwrap();
        let jwks = Jwks::from_keys([("k", key)]).unwrap();
        let token = encode_handle(&claims(), "k", &signer).unwrap();
        // The signatures really carry torsion: cofactorless verification refuses them.
        let note_sig = checkpoint_signature(&note);
        assert!(key.verify_strict(cp.body().as_bytes(), &note_sig).is_err());
        for run in 0..RUNS {
            let v = verify_checkpoint(&note, ORIGIN, &key)
                .unwrap_or_else(|e| panic!("order {order} run {run}: {e}"));
            assert_eq!(v.size(), 7);
            verify_handle(&token, &jwks, &expect(), during())
                .unwrap_or_else(|e| panic!("order {order} run {run}: {e}"));
        }
    }
}

#[test]
fn batch_verdicts_equal_the_library_on_valid_and_tampered_batches() {
    // The log verifier's batches (`eddsa::verify_batch`) against ed25519-zebra's single and
    // batch answers, on batches of one key and of two, with tampered messages, `R`, `s`, keys.
    let ms = messages(64);
    let a = SigningKey::from_bytes(&[31; 32]);
    let b = SigningKey::from_bytes(&[32; 32]);
    let ka = PublicKey::from_verifying_key(&a.verifying_key()).unwrap();
    let kb = PublicKey::from_verifying_key(&b.verifying_key()).unwrap();
    let base: Vec<(bool, Vec<u8>, Signature)> = ms
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let use_b = i % 5 == 4;
            let s = if use_b { b.sign(m) } else { a.sign(m) };
            (use_b, m.clone(), s)
        })
        .collect();
    let mut cases: Vec<Vec<(bool, Vec<u8>, Signature)>> = vec![base.clone()];
    for i in [0usize, 4, 31, 63] {
        let mut c = base.clone();
        c[i].1.push(b'!');
        cases.push(c);
        for (byte, bit) in [(0, 0), (17, 3), (31, 7), (32, 0), (40, 5), (63, 4), (63, 7)] {
            let mut c = base.clone();
            let mut raw = c[i].2.to_bytes();
            raw[byte] ^= 1 << bit;
            c[i].2 = Signature::from_bytes(&raw);
            cases.push(c);
        }
        let mut c = base.clone();
        c[i].0 = !c[i].0;
        cases.push(c);
        let mut c = base.clone();
        c[i].2 = with_non_canonical_s(&c[i].2);
        cases.push(c);
        let mut c = base.clone();
        let j = (i + 1) % 64;
        let (x, y) = (c[i].2, c[j].2);
        c[i].2 = y;
        c[j].2 = x;
        cases.push(c);
    }
    for (n, case) in cases.iter().enumerate() {
        let items: Vec<Item<'_>> = case
            .iter()
            .map(|(use_b, message, signature)| Item {
                key: if *use_b { &kb } else { &ka },
                message,
                signature,
            })
            .collect();
        let singles: Vec<bool> = items
            .iter()
            .map(|i| library_single(i.key.as_bytes(), i.message, i.signature))
            .collect();
        let expected = match singles.iter().position(|ok| !ok) {
            None => Ok(()),
            Some(first) => Err(first),
        };
        assert_eq!(eddsa::verify_batch(&items), expected, "case {n}");
        assert_eq!(library_batch(&items), expected.is_ok(), "case {n}");
        for (i, ok) in items.iter().zip(&singles) {
            assert_eq!(
                i.key.verify(i.message, i.signature).is_ok(),
                *ok,
                "case {n}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------

fn claims() -> HandleClaims {
    HandleClaims {
        iss: "https://attestplane.example".into(),
        sub: "agent-7".into(),
        aud: "https://mcp.example/weather".into(),
        exp: 1_760_000_300,
        iat: 1_760_000_000,
        nbf: None,
        jti: "h-1".into(),
        tenant: "acme".into(),
        tools: vec!["forecast".into()],
        measurement: "00".repeat(48),
        seq: 1,
        server: "weather".into(),
    }
}

fn expect() -> HandleExpectations {
    HandleExpectations {
        issuer: None,
        audience: None,
        leeway_secs: 0,
    }
}

fn during() -> UnixMillis {
    UnixMillis::from_secs(1_760_000_060)
}

fn base64_url(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The Ed25519 signature of a note's single signature line.
fn checkpoint_signature(note: &str) -> Signature {
    use base64::Engine as _;
    let line = note.lines().last().unwrap();
    let b64 = line.rsplit(' ').next().unwrap();
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    Signature::from_slice(&raw[4..]).unwrap()
}

/// The note with its signature replaced by `f(signature)`.
fn retarget_checkpoint_signature(note: &str, f: fn(&Signature) -> Signature) -> String {
    use base64::Engine as _;
    let (body, line) = note.trim_end().rsplit_once('\n').unwrap();
    let (prefix, b64) = line.rsplit_once(' ').unwrap();
    let mut raw = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    let sig = f(&Signature::from_slice(&raw[4..]).unwrap());
    raw[4..].copy_from_slice(&sig.to_bytes());
    format!(
        "{body}\n{prefix} {}\n",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

/// The token with its signature replaced by `f(signature)`.
fn retarget_token_signature(token: &str, f: fn(&Signature) -> Signature) -> String {
    use base64::Engine as _;
    let (input, b64) = token.rsplit_once('.').unwrap();
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(b64)
        .unwrap();
    let sig = f(&Signature::from_slice(&raw).unwrap());
    format!("{input}.{}", base64_url(&sig.to_bytes()))
}
