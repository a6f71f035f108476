//! The epoch key: the Ed25519 key that signs every log entry, checkpoint and handle of one
//! enclave boot.
//!
//! It is generated from NSM randomness at boot, bound to the measured image by the attestation
//! document that opens the epoch, and never leaves enclave memory: the type is not `Clone`, not
//! `Serialize`, its `Debug` prints only the key id, and the secret is zeroized on drop (the
//! `zeroize` feature of `ed25519-dalek`). Nothing in this crate writes it anywhere.

use std::fmt;

use attestplane_verifier::entry::KeyId;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use zeroize::Zeroizing;

use crate::nsm::{Nsm, NsmError};

/// The signing key of the current epoch.
pub struct EpochKey {
    signing: SigningKey,
    kid: KeyId,
}

impl EpochKey {
    /// Draws a fresh key from the NSM's randomness.
    pub fn generate(nsm: &dyn Nsm) -> Result<Self, NsmError> {
        let mut seed = Zeroizing::new([0u8; 32]);
        let random = Zeroizing::new(nsm.random(32)?);
        for (dst, src) in seed.iter_mut().zip(random.iter()) {
            *dst = *src;
        }
        Ok(Self::from_seed(&seed))
    }

    fn from_seed(seed: &[u8; 32]) -> Self {
        let signing = SigningKey::from_bytes(seed);
        let kid = KeyId::of(&signing.verifying_key());
        Self { signing, kid }
    }

    /// The public half.
    pub fn verifying_key(&self) -> VerifyingKey {
        self.signing.verifying_key()
    }

    /// The key id entries name in their header.
    pub fn kid(&self) -> KeyId {
        self.kid
    }
}

impl Signer<Signature> for EpochKey {
    fn try_sign(&self, msg: &[u8]) -> Result<Signature, ed25519_dalek::SignatureError> {
        self.signing.try_sign(msg)
    }
}

impl ed25519_dalek::ed25519::signature::Keypair for EpochKey {
    type VerifyingKey = VerifyingKey;

    fn verifying_key(&self) -> VerifyingKey {
        self.signing.verifying_key()
    }
}

impl fmt::Debug for EpochKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EpochKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nsm::{Clock, MockNsm};
    use attestplane_verifier::UnixMillis;

    #[test]
    fn debug_output_holds_no_secret() {
        let nsm = MockNsm::builder([1; 32], Clock::Fixed(UnixMillis::from_millis(1))).build();
        let key = EpochKey::generate(&nsm).unwrap();
        let debug = format!("{key:?}");
        let secret_hex = hex::encode(key.signing.to_bytes());
        assert!(!debug.contains(&secret_hex));
        assert!(debug.contains(&key.kid().to_hex()));
    }

    #[test]
    fn keys_differ_per_draw() {
        let nsm = MockNsm::builder([1; 32], Clock::Fixed(UnixMillis::from_millis(1))).build();
        let a = EpochKey::generate(&nsm).unwrap();
        let b = EpochKey::generate(&nsm).unwrap();
        assert_ne!(a.verifying_key(), b.verifying_key());
    }
}
