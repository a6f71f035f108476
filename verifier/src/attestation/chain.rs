//! The certificate chain of a Nitro attestation document: root → regional → zonal → instance →
//! leaf, each link checked the way AWS's attestation process describes.
//!
//! Role: given `cabundle` (root first) and `certificate` (the leaf), establish that the leaf's
//! P-384 key was certified by the pinned root at the verification time, and return that key.
//!
//! Trust: the root is trusted because its DER SHA-256 equals the caller's [`TrustAnchor`], not
//! because of anything it says about itself (its self-signature is therefore not checked).
//! Everything else is hostile input.
//!
//! Rules, for each certificate in the path (position 0 is the root, the leaf is last):
//! - well-formed DER with nothing after it; signature algorithm ecdsa-with-SHA384 (outer and
//!   inner identical); public key on P-384;
//! - the verification time within [notBefore, notAfter] (root included);
//! - no critical extension other than basicConstraints and keyUsage;
//! - below the root: issuer name equal (byte for byte) to the parent's subject name, and the
//!   signature over the raw tbsCertificate verifies under the parent's key;
//! - CAs (root and every `cabundle` entry): basicConstraints critical with cA = TRUE, keyUsage
//!   with keyCertSign, and at most pathLenConstraint CA certificates after them;
//! - the leaf: not a CA (basicConstraints absent, or cA = FALSE without pathLenConstraint), and
//!   keyUsage with digitalSignature.
//!
//! What it deliberately does not do: name constraints, policies, extended key usage (AWS's chain
//! uses none), revocation (AWS publishes CRL URLs on intermediates but the leaves live three
//! hours; the documented process disables CRL checks), or path building: the path is the order
//! the document gives, or nothing.

use std::fmt;

use p384::ecdsa::signature::Verifier;
use p384::ecdsa::{Signature, VerifyingKey};
use p384::pkcs8::DecodePublicKey;
use serde::Serialize;
use sha2::{Digest, Sha256};
use x509_parser::certificate::X509Certificate;
use x509_parser::oid_registry::{
    OID_SIG_ECDSA_WITH_SHA384, OID_X509_EXT_BASIC_CONSTRAINTS, OID_X509_EXT_KEY_USAGE,
};
use x509_parser::prelude::FromDer;

use super::AttestationError;
use super::types::ser_hex;
use crate::time::UnixMillis;

/// The AWS Nitro Enclaves Root G1 certificate, PEM, as AWS publishes it.
pub const AWS_NITRO_ROOT_G1_PEM: &str = include_str!("../../testdata/nitro/aws-nitro-root-g1.pem");

/// SHA-256 of the DER of AWS Nitro Enclaves Root G1.
pub const AWS_NITRO_ROOT_G1_SHA256: [u8; 32] = [
    0x64, 0x1a, 0x03, 0x21, 0xa3, 0xe2, 0x44, 0xef, 0xe4, 0x56, 0x46, 0x31, 0x95, 0xd6, 0x06, 0x31,
    0x7e, 0xd7, 0xcd, 0xcc, 0x3c, 0x17, 0x56, 0xe0, 0x98, 0x93, 0xf3, 0xc6, 0x8f, 0x79, 0xbb, 0x5b,
];

/// A pinned root certificate, identified by the SHA-256 of its DER.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct TrustAnchor {
    fingerprint: [u8; 32],
}

impl TrustAnchor {
    /// AWS Nitro Enclaves Root G1 (DER SHA-256 `641a0321…79bb5b`), valid 2019-10-28 to 2049-10-28.
    pub fn aws_nitro_root_g1() -> Self {
        Self {
            fingerprint: AWS_NITRO_ROOT_G1_SHA256,
        }
    }

    /// Pins the first certificate in a PEM file.
    pub fn from_pem(pem: &[u8]) -> Result<Self, AttestationError> {
        let (_, pem) =
            x509_parser::pem::parse_x509_pem(pem).map_err(|e| AttestationError::TrustAnchor {
                reason: format!("not a pem certificate: {e}"),
            })?;
        if pem.label != "CERTIFICATE" {
            return Err(AttestationError::TrustAnchor {
                reason: format!("pem label is {:?}, expected CERTIFICATE", pem.label),
            });
        }
        Self::from_der(&pem.contents)
    }

    /// Pins a DER certificate (which must parse as X.509, with nothing after it).
    pub fn from_der(der: &[u8]) -> Result<Self, AttestationError> {
        match X509Certificate::from_der(der) {
            Ok(([], _)) => Ok(Self {
                fingerprint: Sha256::digest(der).into(),
            }),
            Ok((rest, _)) => Err(AttestationError::TrustAnchor {
                reason: format!("{} bytes after the certificate", rest.len()),
            }),
            Err(e) => Err(AttestationError::TrustAnchor {
                reason: format!("not a der certificate: {e}"),
            }),
        }
    }

    /// Pins a root by the SHA-256 of its DER.
    pub const fn from_fingerprint(fingerprint: [u8; 32]) -> Self {
        Self { fingerprint }
    }

    /// SHA-256 of the root's DER.
    pub fn fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }
}

impl fmt::Debug for TrustAnchor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustAnchor(sha256:{})", hex::encode(self.fingerprint))
    }
}

/// What was established about one certificate of the path (for [`super::Check`] output).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CertSummary {
    /// Position in the root-first path.
    pub position: usize,
    /// Subject distinguished name, as text.
    pub subject: String,
    /// notBefore.
    pub not_before: UnixMillis,
    /// notAfter.
    pub not_after: UnixMillis,
    /// SHA-256 of the DER.
    #[serde(serialize_with = "ser_hex")]
    pub sha256: [u8; 32],
}

/// The verified CA part of a path (root through the last `cabundle` entry): what the leaf link
/// needs, and what the cache keeps.
#[derive(Debug, Clone)]
pub(crate) struct VerifiedCaChain {
    /// Key of the last CA (the instance certificate on real documents).
    pub issuer_key: VerifyingKey,
    /// Raw DER subject name of the last CA.
    pub issuer_subject: Vec<u8>,
    /// Latest notBefore among the CAs.
    pub not_before: UnixMillis,
    /// Earliest notAfter among the CAs.
    pub not_after: UnixMillis,
    /// One summary per CA, root first.
    pub certs: Vec<CertSummary>,
}

/// The verified leaf: the key that must have signed the COSE_Sign1.
#[derive(Debug, Clone)]
pub(crate) struct VerifiedLeaf {
    pub key: VerifyingKey,
    pub summary: CertSummary,
}

/// A parsed certificate with the facts the rules need.
struct Cert<'a> {
    position: usize,
    der: &'a [u8],
    x509: X509Certificate<'a>,
    key: VerifyingKey,
    not_before: UnixMillis,
    not_after: UnixMillis,
}

fn asn1_to_millis(t: x509_parser::time::ASN1Time) -> UnixMillis {
    // Before 1970 saturates to the epoch: only ever makes a window smaller or a cert expired.
    UnixMillis::from_secs(u64::try_from(t.timestamp()).unwrap_or(0))
}

impl<'a> Cert<'a> {
    /// Parses `der` and checks what a certificate must satisfy on its own.
    fn parse(position: usize, der: &'a [u8], at: UnixMillis) -> Result<Self, AttestationError> {
        let malformed = |reason: String| AttestationError::CertificateMalformed {
            cert: position,
            reason,
        };
        let (rest, x509) = X509Certificate::from_der(der).map_err(|e| malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(malformed(format!(
                "{} bytes after the certificate",
                rest.len()
            )));
        }
        let outer = &x509.signature_algorithm;
        let inner = &x509.tbs_certificate.signature;
        if outer.algorithm != OID_SIG_ECDSA_WITH_SHA384 || outer.parameters.is_some() {
            return Err(AttestationError::UnsupportedSignatureAlgorithm {
                cert: position,
                oid: outer.algorithm.to_id_string(),
            });
        }
        if inner != outer {
            return Err(AttestationError::UnsupportedSignatureAlgorithm {
                cert: position,
                oid: format!(
                    "{} (tbsCertificate says {})",
                    outer.algorithm.to_id_string(),
                    inner.algorithm.to_id_string()
                ),
            });
        }
        let key = p384::PublicKey::from_public_key_der(x509.public_key().raw)
            .map(VerifyingKey::from)
            .map_err(|_| AttestationError::UnsupportedPublicKey { cert: position })?;
        for ext in x509.extensions() {
            if ext.critical
                && ext.oid != OID_X509_EXT_BASIC_CONSTRAINTS
                && ext.oid != OID_X509_EXT_KEY_USAGE
            {
                return Err(AttestationError::UnsupportedCriticalExtension {
                    cert: position,
                    oid: ext.oid.to_id_string(),
                });
            }
        }
        let validity = x509.validity();
        let not_before = asn1_to_millis(validity.not_before);
        let not_after = asn1_to_millis(validity.not_after);
        if at < not_before {
            return Err(AttestationError::NotYetValid {
                cert: position,
                not_before,
                at,
            });
        }
        if at > not_after {
            return Err(AttestationError::Expired {
                cert: position,
                not_after,
                at,
            });
        }
        Ok(Self {
            position,
            der,
            x509,
            key,
            not_before,
            not_after,
        })
    }

    fn malformed(&self, e: impl fmt::Display) -> AttestationError {
        AttestationError::CertificateMalformed {
            cert: self.position,
            reason: e.to_string(),
        }
    }

    /// Checks the CA rules; `followers` is the number of CA certificates after this one.
    fn check_ca(&self, followers: usize) -> Result<(), AttestationError> {
        let cert = self.position;
        let bc = self
            .x509
            .basic_constraints()
            .map_err(|e| self.malformed(e))?
            .ok_or(AttestationError::NotCa { cert })?;
        if !bc.value.ca {
            return Err(AttestationError::NotCa { cert });
        }
        if !bc.critical {
            return Err(AttestationError::BasicConstraintsNotCritical { cert });
        }
        if let Some(path_len) = bc.value.path_len_constraint
            && usize::try_from(path_len).is_ok_and(|p| followers > p)
        {
            return Err(AttestationError::PathLenExceeded {
                cert,
                path_len,
                followers,
            });
        }
        let ku = self.x509.key_usage().map_err(|e| self.malformed(e))?;
        if !ku.is_some_and(|ku| ku.value.key_cert_sign()) {
            return Err(AttestationError::MissingKeyCertSign { cert });
        }
        Ok(())
    }

    /// Checks the end-entity rules.
    fn check_leaf(&self) -> Result<(), AttestationError> {
        let cert = self.position;
        if let Some(bc) = self
            .x509
            .basic_constraints()
            .map_err(|e| self.malformed(e))?
            && (bc.value.ca || bc.value.path_len_constraint.is_some())
        {
            return Err(AttestationError::LeafIsCa { cert });
        }
        let ku = self.x509.key_usage().map_err(|e| self.malformed(e))?;
        if !ku.is_some_and(|ku| ku.value.digital_signature()) {
            return Err(AttestationError::LeafMissingDigitalSignature { cert });
        }
        Ok(())
    }

    /// Checks that this certificate was issued by the holder of `issuer_key` named
    /// `issuer_subject` (the certificate at `parent`).
    fn check_issued_by(
        &self,
        parent: usize,
        issuer_subject: &[u8],
        issuer_key: &VerifyingKey,
    ) -> Result<(), AttestationError> {
        let cert = self.position;
        if self.x509.issuer().as_raw() != issuer_subject {
            return Err(AttestationError::IssuerMismatch { cert, parent });
        }
        let sig = &self.x509.signature_value;
        if sig.unused_bits != 0 {
            return Err(AttestationError::CertificateSignature { cert, parent });
        }
        let sig = Signature::from_der(&sig.data)
            .map_err(|_| AttestationError::CertificateSignature { cert, parent })?;
        issuer_key
            .verify(self.x509.tbs_certificate.as_ref(), &sig)
            .map_err(|_| AttestationError::CertificateSignature { cert, parent })
    }

    fn summary(&self) -> CertSummary {
        CertSummary {
            position: self.position,
            subject: self.x509.subject().to_string(),
            not_before: self.not_before,
            not_after: self.not_after,
            sha256: Sha256::digest(self.der).into(),
        }
    }
}

/// Checks the root pin.
pub(crate) fn check_root_pin(
    root_der: &[u8],
    anchor: &TrustAnchor,
) -> Result<(), AttestationError> {
    let found: [u8; 32] = Sha256::digest(root_der).into();
    if found != anchor.fingerprint {
        return Err(AttestationError::UntrustedRoot {
            expected_hex: hex::encode(anchor.fingerprint),
            found_hex: hex::encode(found),
        });
    }
    Ok(())
}

/// Verifies `cabundle` (root first) at `at`: the root pin and every CA rule and link.
pub(crate) fn verify_ca_chain(
    cabundle: &[Vec<u8>],
    anchor: &TrustAnchor,
    at: UnixMillis,
) -> Result<VerifiedCaChain, AttestationError> {
    let root_der = cabundle
        .first()
        .ok_or(AttestationError::EmptyField { field: "cabundle" })?;
    check_root_pin(root_der, anchor)?;
    let mut parent: Option<Cert<'_>> = None;
    let mut certs = Vec::with_capacity(cabundle.len());
    let mut not_before = UnixMillis::from_millis(0);
    let mut not_after = UnixMillis::from_millis(u64::MAX);
    for (position, der) in cabundle.iter().enumerate() {
        let cert = Cert::parse(position, der, at)?;
        let followers = cabundle.len().saturating_sub(position + 1);
        cert.check_ca(followers)?;
        if let Some(p) = &parent {
            cert.check_issued_by(p.position, p.x509.subject().as_raw(), &p.key)?;
        }
        not_before = not_before.max(cert.not_before);
        not_after = not_after.min(cert.not_after);
        certs.push(cert.summary());
        parent = Some(cert);
    }
    let last = parent.ok_or(AttestationError::EmptyField { field: "cabundle" })?;
    Ok(VerifiedCaChain {
        issuer_key: last.key,
        issuer_subject: last.x509.subject().as_raw().to_vec(),
        not_before,
        not_after,
        certs,
    })
}

/// Verifies the leaf at `at` against a verified CA chain.
pub(crate) fn verify_leaf(
    leaf_der: &[u8],
    cas: &VerifiedCaChain,
    at: UnixMillis,
) -> Result<VerifiedLeaf, AttestationError> {
    let position = cas.certs.len();
    let leaf = Cert::parse(position, leaf_der, at)?;
    leaf.check_leaf()?;
    leaf.check_issued_by(
        position.saturating_sub(1),
        &cas.issuer_subject,
        &cas.issuer_key,
    )?;
    Ok(VerifiedLeaf {
        key: leaf.key,
        summary: leaf.summary(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_root_matches_embedded_pem() {
        let from_pem = TrustAnchor::from_pem(AWS_NITRO_ROOT_G1_PEM.as_bytes()).unwrap();
        assert_eq!(from_pem, TrustAnchor::aws_nitro_root_g1());
        assert_eq!(
            hex::encode(from_pem.fingerprint()),
            "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b"
        );
    }

    #[test]
    fn trust_anchor_rejects_garbage() {
        assert!(
            TrustAnchor::from_pem(b"-----BEGIN NOPE-----\nAAAA\n-----END NOPE-----\n").is_err()
        );
        assert!(TrustAnchor::from_der(&[0x30, 0x03, 0x02, 0x01, 0x00]).is_err());
    }
}
