//! The one set of Ed25519 rules for everything the enclave signs.
//!
//! Every signature by an enclave epoch key (log entries, checkpoints, handles; receipts when
//! they come) and every identity-provider token is checked here and nowhere else: single
//! signatures with [`PublicKey::verify`], many at once with [`verify_batch`]. Both give the same
//! verdict on every input, however the signatures are grouped or ordered and whatever the
//! random batch coefficients, so the enclave at boot, an auditor's `attestplane-verify` and a
//! witness cannot disagree about a log.
//!
//! ## The rules
//!
//! A public key `A_bytes` is usable ([`PublicKey::from_bytes`]) when it is
//!
//! - the encoding of a point `A` of the curve (it decompresses),
//! - the canonical encoding of that point (`y < p`, and no sign bit on `x = 0`), so one key
//!   has one byte string and one [`KeyId`],
//! - of order `l`, the prime order of the base point's subgroup: not of small order (with such a
//!   key anyone can sign anything under the cofactored equation) and without a small-order
//!   component. The enclave's keys are `a·B` and always pass; the check is made once, when a key
//!   is accepted (an epoch opens, a JWKS is read), not per signature.
//!
//! A signature `(R_bytes, s_bytes)` on a message `M` under such a key verifies when, as ZIP 215
//! defines it,
//!
//! - `R_bytes` decompresses to a point `R` (any encoding that decompresses, as ZIP 215 says);
//! - `s_bytes` is the canonical encoding of an integer `s < l`;
//! - `[8][s]B = [8]R + [8][k]A` with `k = SHA-512(R_bytes ‖ A_bytes ‖ M) mod l`: the
//!   *cofactored* equation. The cofactorless one, `[s]B = R + [k]A`, is never used.
//!
//! Single verification and batch verification are ed25519-zebra's implementation of exactly
//! these rules (its batch verifier computes `[8](−(Σzᵢsᵢ)B + Σ(zᵢkᵢ)Aᵢ + ΣzᵢRᵢ) = 0` with
//! random 128-bit `zᵢ`, gathering the terms of each distinct key into one, so a batch of 64
//! signatures under one epoch key costs one multiscalar multiplication of 66 points). Because
//! the equation is multiplied by the cofactor, a small-order component of `R` cancels in every
//! term whatever the `zᵢ`: a signature the key holder crafted with `R + T` for a torsion point
//! `T` verifies alone and in any batch, every time. A batch that contains a signature that does
//! not verify alone is refused except with probability below 2⁻¹²⁸, and [`verify_batch`] then
//! checks the signatures one by one: its answer is always that of single verification.
//!
//! ## What this module deliberately does not do
//!
//! - It does not accept keys the rules above refuse, even though ZIP 215 would: a caller gets a
//!   typed [`KeyError`] when it builds the key, before any signature is looked at.
//! - It does not refuse an `R` of small order or with a small-order component (ZIP 215 accepts
//!   both): only the holder of the secret key can make such a signature, and refusing it would
//!   need a scalar multiplication per signature. It does not refuse a non-canonical `R`
//!   encoding either (those exist only for a handful of points, all of small order but two).
//! - It does not check admin requests: those are signed by the operators' admin keys, not the
//!   enclave's, one at a time, in [`crate::admin`].

use std::fmt;

use curve25519_dalek::edwards::CompressedEdwardsY;
use ed25519_dalek::{Signature, VerifyingKey};
use ed25519_zebra::batch;
use rand_chacha::ChaCha20Rng;
use rand_core::{OsRng, RngCore, SeedableRng};
use serde::{Serialize, Serializer};
use sha2::{Digest as _, Sha256};
use thiserror::Error;

/// Identifies an epoch key: SHA-256 of its 32 raw public-key bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId([u8; 32]);

impl KeyId {
    /// The id of `key`.
    pub fn of(key: &VerifyingKey) -> Self {
        Self(Sha256::digest(key.as_bytes()).into())
    }

    /// Wraps raw id bytes.
    pub const fn from_bytes(b: [u8; 32]) -> Self {
        Self(b)
    }

    /// The raw id bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lower-case hex: also the `kid` of the key in a JWKS.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({})", self.to_hex())
    }
}

impl Serialize for KeyId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

/// Why a byte string is not a usable Ed25519 public key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum KeyError {
    /// The bytes are not the encoding of a point of the curve.
    #[error("not a point of the curve")]
    NotAPoint,
    /// The bytes encode a point, but not in the canonical way.
    #[error("not the canonical encoding of its point")]
    NonCanonical,
    /// The point has small order (1, 2, 4 or 8): anyone could sign under it.
    #[error("a point of small order")]
    SmallOrder,
    /// The point has a component of small order.
    #[error("a point with a small-order component")]
    MixedOrder,
}

impl KeyError {
    /// A short, fixed description (for errors that carry a `&'static str`).
    pub fn as_str(&self) -> &'static str {
        match self {
            KeyError::NotAPoint => "not a point of the curve",
            KeyError::NonCanonical => "not the canonical encoding of its point",
            KeyError::SmallOrder => "a point of small order",
            KeyError::MixedOrder => "a point with a small-order component",
        }
    }
}

/// A signature that does not verify under the rules of this module.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
#[error("the signature does not verify")]
pub struct BadSignature;

/// An Ed25519 public key that satisfies the key rules of this module. Only
/// [`PublicKey::from_bytes`] (and its conversions) builds one.
#[derive(Clone, Copy)]
pub struct PublicKey {
    dalek: VerifyingKey,
    zebra: ed25519_zebra::VerificationKey,
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("PublicKey")
            .field(&hex::encode(self.as_bytes()))
            .finish()
    }
}

impl PartialEq for PublicKey {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for PublicKey {}

impl PublicKey {
    /// Accepts `bytes` as a key when they satisfy the key rules (see the module docs).
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, KeyError> {
        let point = CompressedEdwardsY(*bytes)
            .decompress()
            .ok_or(KeyError::NotAPoint)?;
        if point.compress().as_bytes() != bytes {
            return Err(KeyError::NonCanonical);
        }
        if point.is_small_order() {
            return Err(KeyError::SmallOrder);
        }
        if !point.is_torsion_free() {
            return Err(KeyError::MixedOrder);
        }
        let dalek = VerifyingKey::from_bytes(bytes).map_err(|_| KeyError::NotAPoint)?;
        let zebra =
            ed25519_zebra::VerificationKey::try_from(*bytes).map_err(|_| KeyError::NotAPoint)?;
        Ok(Self { dalek, zebra })
    }

    /// Accepts a `VerifyingKey` as a key when it satisfies the key rules.
    pub fn from_verifying_key(key: &VerifyingKey) -> Result<Self, KeyError> {
        Self::from_bytes(key.as_bytes())
    }

    /// The key's 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        self.dalek.as_bytes()
    }

    /// The same key as an `ed25519_dalek` key (for key ids, JWKS output, signing-side APIs).
    pub fn verifying_key(&self) -> &VerifyingKey {
        &self.dalek
    }

    /// Verifies one signature (the rules are in the module docs).
    pub fn verify(&self, message: &[u8], signature: &Signature) -> Result<(), BadSignature> {
        self.zebra
            .verify(signature, message)
            .map_err(|_| BadSignature)
    }
}

impl TryFrom<&VerifyingKey> for PublicKey {
    type Error = KeyError;
    fn try_from(key: &VerifyingKey) -> Result<Self, KeyError> {
        Self::from_verifying_key(key)
    }
}

/// One signature to check in a batch.
#[derive(Clone, Copy, Debug)]
pub struct Item<'a> {
    /// The key it must verify under.
    pub key: &'a PublicKey,
    /// The signed message.
    pub message: &'a [u8],
    /// The signature.
    pub signature: &'a Signature,
}

/// Verifies every item; on failure returns the index of the first item that does not verify
/// alone. The answer is always the one [`PublicKey::verify`] gives item by item (see the module
/// docs): batch verification only makes the common case, where all verify, cheaper.
pub fn verify_batch(items: &[Item<'_>]) -> Result<(), usize> {
    if items.is_empty() {
        return Ok(());
    }
    // One draw from the operating system per batch; the batch coefficients come from a ChaCha20
    // stream seeded with it. Without randomness the batch equation proves nothing, and each
    // signature is checked alone instead.
    let mut seed = [0u8; 32];
    if OsRng.try_fill_bytes(&mut seed).is_ok() {
        let mut verifier = batch::Verifier::new();
        for item in items {
            verifier.queue((
                ed25519_zebra::VerificationKeyBytes::from(*item.key.as_bytes()),
                *item.signature,
                item.message,
            ));
        }
        if verifier.verify(ChaCha20Rng::from_seed(seed)).is_ok() {
            return Ok(());
        }
    }
    match items
        .iter()
        .position(|i| i.key.verify(i.message, i.signature).is_err())
    {
        Some(first) => Err(first),
        // Unreachable under the cofactored equation (a batch of signatures that each verify
        // always verifies); single verification is the rule, so it decides.
        None => Ok(()),
    }
}

// The signers and torsion points the verifier's, the enclave's and the end-to-end
// signature-rule tests use.
#[cfg(test)]
#[path = "../tests/support/torsion.rs"]
mod torsion;

#[cfg(test)]
mod tests {
    use curve25519_dalek::constants::ED25519_BASEPOINT_POINT;
    use curve25519_dalek::edwards::EdwardsPoint;
    use curve25519_dalek::scalar::Scalar;
    use ed25519_dalek::{Signer, SigningKey};
    use sha2::{Digest, Sha512};

    use super::*;

    use super::torsion::torsion_points;

    #[test]
    fn keys_of_small_order_or_with_torsion_are_refused() {
        let good = SigningKey::from_bytes(&[5; 32]).verifying_key();
        let a = CompressedEdwardsY(*good.as_bytes()).decompress().unwrap();
        assert!(PublicKey::from_verifying_key(&good).is_ok());
        for t in torsion_points() {
            let small = t.compress().to_bytes();
            assert_eq!(PublicKey::from_bytes(&small), Err(KeyError::SmallOrder));
            if t != EdwardsPoint::default() {
                let mixed = (a + t).compress().to_bytes();
                assert_eq!(PublicKey::from_bytes(&mixed), Err(KeyError::MixedOrder));
            }
        }
        // y = 1 + p: the identity, non-canonically.
        let mut non_canonical = [0xffu8; 32];
        non_canonical[0] = 0xee;
        non_canonical[31] = 0x7f;
        assert_eq!(
            PublicKey::from_bytes(&non_canonical),
            Err(KeyError::NonCanonical)
        );
        // The sign bit set on a key: another point (or none), never the same key.
        let mut flipped = *good.as_bytes();
        flipped[31] ^= 0x80;
        assert_ne!(
            PublicKey::from_bytes(&flipped).map(|k| *k.as_bytes()),
            Ok(*good.as_bytes())
        );
    }

    #[test]
    fn batch_names_the_first_bad_signature() {
        let key = SigningKey::from_bytes(&[9; 32]);
        let pk = PublicKey::from_verifying_key(&key.verifying_key()).unwrap();
        let messages: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i; 3 + usize::from(i)]).collect();
        let mut signatures: Vec<Signature> = messages.iter().map(|m| key.sign(m)).collect();
        let check = |s: &[Signature]| {
            let items: Vec<Item<'_>> = messages
                .iter()
                .zip(s)
                .map(|(m, signature)| Item {
                    key: &pk,
                    message: m,
                    signature,
                })
                .collect();
            verify_batch(&items)
        };
        assert_eq!(check(&signatures), Ok(()));
        signatures[7] = key.sign(b"other");
        signatures[4] = key.sign(b"other");
        assert_eq!(check(&signatures), Err(4));
        assert_eq!(verify_batch(&[]), Ok(()));
    }

    #[test]
    fn torsion_in_r_verifies_alone_and_in_batches() {
        let a = Scalar::from_bytes_mod_order([7; 32]);
        let big_a = ED25519_BASEPOINT_POINT * a;
        let pk = PublicKey::from_bytes(&big_a.compress().to_bytes()).unwrap();
        for t in torsion_points() {
            let r = Scalar::from_bytes_mod_order([3; 32]);
            let big_r = (ED25519_BASEPOINT_POINT * r + t).compress().to_bytes();
            let message = b"torsion";
            let k = Scalar::from_hash(
                Sha512::new()
                    .chain_update(big_r)
                    .chain_update(pk.as_bytes())
                    .chain_update(message),
            );
            let mut raw = [0u8; 64];
            raw[..32].copy_from_slice(&big_r);
            raw[32..].copy_from_slice((r + k * a).as_bytes());
            let sig = Signature::from_bytes(&raw);
            assert_eq!(pk.verify(message, &sig), Ok(()));
            let item = Item {
                key: &pk,
                message,
                signature: &sig,
            };
            for _ in 0..64 {
                assert_eq!(verify_batch(&[item, item, item]), Ok(()));
            }
        }
    }
}
