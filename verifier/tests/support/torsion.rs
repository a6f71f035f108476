//! Test signers for the signature-rule attacks (issue 9 item 2): Ed25519 signatures whose `R`
//! carries a small-order component, keys with one, and keys of small order. Only the holder of
//! an epoch key can make the first; the others are keys an epoch document could bind.
//!
//! Shared by the verifier's unit and integration tests, the enclave's and the end-to-end tests
//! (included with `#[path]`), so every path is tried with the same crafted signatures. The
//! arithmetic is written out with curve25519-dalek: `R' = [r]B + T`, `k = SHA-512(R' ‖ A ‖ M)
//! mod l`, `s = r + k·a mod l`, so `[8][s]B = [8]R' + [8][k]A` holds (the cofactored equation)
//! while `[s]B = R' + [k]A` does not (the cofactorless one) unless `T` is the identity.

#![allow(dead_code)]

use curve25519_dalek::constants::ED25519_BASEPOINT_POINT;
use curve25519_dalek::edwards::{CompressedEdwardsY, EdwardsPoint};
use curve25519_dalek::scalar::Scalar;
use ed25519_dalek::ed25519::signature::{Error, Keypair, Signer};
use ed25519_dalek::{Signature, VerifyingKey};
use sha2::{Digest, Sha512};

/// The order of a point of the torsion subgroup: 1, 2, 4 or 8.
pub fn order_of(t: &EdwardsPoint) -> u64 {
    let identity = EdwardsPoint::default();
    let mut p = *t;
    for order in [1u64, 2, 4, 8] {
        if p == identity {
            return order;
        }
        p = p + p;
    }
    panic!("not a torsion point")
}

/// The eight torsion points, found from the curve: `[l]P` for points `P` of hashed `y`.
pub fn torsion_points() -> Vec<EdwardsPoint> {
    let mut found: Vec<EdwardsPoint> = Vec::new();
    for i in 0u64..10_000 {
        if found.len() == 8 {
            break;
        }
        let mut y = [0u8; 32];
        y.copy_from_slice(&Sha512::digest(i.to_le_bytes())[..32]);
        let Some(p) = CompressedEdwardsY(y).decompress() else {
            continue;
        };
        let t = p * -Scalar::ONE + p;
        assert!(t.is_small_order());
        if !found.contains(&t) {
            found.push(t);
        }
    }
    assert_eq!(found.len(), 8, "the torsion subgroup has eight points");
    found
}

/// A torsion point of exactly `order` (1, 2, 4 or 8).
pub fn torsion_point(order: u64) -> EdwardsPoint {
    torsion_points()
        .into_iter()
        .find(|t| order_of(t) == order)
        .unwrap_or_else(|| panic!("no torsion point of order {order}"))
}

/// An Ed25519 signer over a known secret scalar that adds `r_torsion` to every `R` it makes,
/// and publishes `[a]B + key_torsion` as its key.
#[derive(Clone)]
pub struct TorsionSigner {
    a: Scalar,
    public: [u8; 32],
    r_torsion: EdwardsPoint,
}

impl TorsionSigner {
    /// Secret scalar from `seed`; every `R` gets `r_torsion` added (the identity: an ordinary
    /// signer).
    pub fn new(seed: u8, r_torsion: EdwardsPoint) -> Self {
        Self::with_key_torsion(seed, r_torsion, EdwardsPoint::default())
    }

    /// Like [`TorsionSigner::new`], with the public key `[a]B + key_torsion` (a key with a
    /// small-order component when `key_torsion` is not the identity).
    pub fn with_key_torsion(seed: u8, r_torsion: EdwardsPoint, key_torsion: EdwardsPoint) -> Self {
        let a = Scalar::from_bytes_mod_order_wide(
            &Sha512::digest([b"torsion-key".as_slice(), &[seed]].concat()).into(),
        );
        let public = (ED25519_BASEPOINT_POINT * a + key_torsion)
            .compress()
            .to_bytes();
        Self {
            a,
            public,
            r_torsion,
        }
    }

    /// The public key's bytes.
    pub fn public(&self) -> [u8; 32] {
        self.public
    }

    /// The public key (ed25519-dalek decompresses it; it applies no other rule here).
    pub fn verifying_key(&self) -> VerifyingKey {
        VerifyingKey::from_bytes(&self.public).expect("a point of the curve")
    }

    /// Signs `message`.
    pub fn sign_message(&self, message: &[u8]) -> Signature {
        let r = Scalar::from_bytes_mod_order_wide(
            &Sha512::new()
                .chain_update(b"torsion-nonce")
                .chain_update(self.a.as_bytes())
                .chain_update(message)
                .finalize()
                .into(),
        );
        let big_r = (ED25519_BASEPOINT_POINT * r + self.r_torsion)
            .compress()
            .to_bytes();
        let k = Scalar::from_bytes_mod_order_wide(
            &Sha512::new()
                .chain_update(big_r)
                .chain_update(self.public)
                .chain_update(message)
                .finalize()
                .into(),
        );
        let s = r + k * self.a;
        let mut raw = [0u8; 64];
        raw[..32].copy_from_slice(&big_r);
        raw[32..].copy_from_slice(s.as_bytes());
        Signature::from_bytes(&raw)
    }
}

impl Signer<Signature> for TorsionSigner {
    fn try_sign(&self, message: &[u8]) -> Result<Signature, Error> {
        Ok(self.sign_message(message))
    }
}

impl Keypair for TorsionSigner {
    type VerifyingKey = VerifyingKey;
    fn verifying_key(&self) -> VerifyingKey {
        TorsionSigner::verifying_key(self)
    }
}

/// A "signer" for a key of small order `T`, who needs no secret: `(R, s) = ([s]B, s)` satisfies
/// the cofactored equation `[8][s]B = [8]R + [8][k]T` for every message, since `[8]T = 0`.
/// Anyone can make these, which is why such keys are refused.
#[derive(Clone)]
pub struct SmallOrderKeyForger {
    public: [u8; 32],
}

impl SmallOrderKeyForger {
    /// A forger for the key `t` (a torsion point).
    pub fn new(t: &EdwardsPoint) -> Self {
        Self {
            public: t.compress().to_bytes(),
        }
    }

    /// The key's bytes.
    pub fn public(&self) -> [u8; 32] {
        self.public
    }

    /// The key (ed25519-dalek decompresses it; its `is_weak` would say it is weak).
    pub fn verifying_key(&self) -> VerifyingKey {
        VerifyingKey::from_bytes(&self.public).expect("a point of the curve")
    }

    /// A signature of `message` that satisfies the cofactored equation.
    pub fn forge(&self, message: &[u8]) -> Signature {
        let s = Scalar::from_bytes_mod_order_wide(&Sha512::digest(message).into());
        let mut raw = [0u8; 64];
        raw[..32].copy_from_slice(&(ED25519_BASEPOINT_POINT * s).compress().to_bytes());
        raw[32..].copy_from_slice(s.as_bytes());
        Signature::from_bytes(&raw)
    }
}

impl Signer<Signature> for SmallOrderKeyForger {
    fn try_sign(&self, message: &[u8]) -> Result<Signature, Error> {
        Ok(self.forge(message))
    }
}

impl Keypair for SmallOrderKeyForger {
    type VerifyingKey = VerifyingKey;
    fn verifying_key(&self) -> VerifyingKey {
        SmallOrderKeyForger::verifying_key(self)
    }
}

/// `[s]B − R − [k]A` for a signature under `public`: the identity for an ordinary signature,
/// minus the torsion point a [`TorsionSigner`] added to `R`.
pub fn residual(public: &[u8; 32], message: &[u8], signature: &Signature) -> EdwardsPoint {
    let a = CompressedEdwardsY(*public)
        .decompress()
        .expect("key decompresses");
    let r = CompressedEdwardsY(*signature.r_bytes())
        .decompress()
        .expect("R decompresses");
    let s = Scalar::from_canonical_bytes(*signature.s_bytes()).expect("canonical s");
    let k = Scalar::from_bytes_mod_order_wide(
        &Sha512::new()
            .chain_update(signature.r_bytes())
            .chain_update(public)
            .chain_update(message)
            .finalize()
            .into(),
    );
    ED25519_BASEPOINT_POINT * s - r - a * k
}

/// `signature` with `s` replaced by `s + l`: the same residue, not a canonical encoding.
pub fn with_non_canonical_s(signature: &Signature) -> Signature {
    let mut raw = signature.to_bytes();
    let l = (Scalar::ZERO - Scalar::ONE).to_bytes();
    let mut carry = 1u16;
    for j in 0..32 {
        let sum = u16::from(raw[32 + j]) + u16::from(l[j]) + carry;
        raw[32 + j] = sum as u8;
        carry = sum >> 8;
    }
    assert_eq!(carry, 0, "s + l fits in 256 bits");
    Signature::from_bytes(&raw)
}
