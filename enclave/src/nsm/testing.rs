//! Test and fixture tooling: fault injection for the mock NSM's chains and documents, gathered
//! in one place.
//!
//! Everything here exists so that the verifier's tests can produce each kind of bad attestation
//! document AWS's rules reject — a leaf marked CA, an expired intermediate, a link signed by the
//! wrong key, a tagged COSE envelope, a duplicate payload key — from a mock that is otherwise
//! exactly the one the running system uses. Nothing in a production path calls into these knobs:
//! a [`MockNsm`](super::MockNsm) built without them is the correct mock, and the real NSM has no
//! knobs at all.
//!
//! This module only re-exports. Each knob is defined next to the code that applies it, so the
//! files of `nsm/` import in one direction (`document` and `certs` at the bottom, `mock` above
//! them, this module on top): chain faults ([`ChainSpec`]'s fault methods, [`Position`]) in
//! `certs`, document faults ([`DocumentFaults`], [`SignatureS`], [`cbor`]) in `document`, and
//! the builder's switches ([`MockNsmBuilder::chain_spec`](super::MockNsmBuilder::chain_spec),
//! [`document_faults`](super::MockNsmBuilder::document_faults),
//! [`signature_s`](super::MockNsmBuilder::signature_s)) in `mock`.
//!
//! Trust: none. Documents built with faults are meant to be rejected.
//!
//! ```
//! use attestplane_enclave::nsm::{Clock, MockNsmBuilder, Nsm};
//! use attestplane_enclave::nsm::testing::{ChainSpec, MockIdentity, Position};
//! use attestplane_verifier::UnixMillis;
//!
//! let seed = [7u8; 32];
//! let chain = ChainSpec::aws_like(&MockIdentity::from_seed(&seed)).expired(Position::Zonal);
//! let nsm = MockNsmBuilder::new(seed, Clock::Fixed(UnixMillis::from_secs(1_750_000_000)))
//!     .chain_spec(chain)
//!     .build();
//! let document = nsm.attest(None, Some(b"nonce".to_vec()), None).unwrap();
//! assert_eq!(document[0], 0x84);
//! ```

pub use super::certs::{
    BasicConstraintsSpec, BundleOrder, CertKey, CertSignatureAlgorithm, CertSpec, ChainSpec,
    KeyUsageSpec, LEAF_LIFETIME_MS, MockIdentity, NameAttr, NameSpec, Position, ROOT_NOT_AFTER,
    ROOT_NOT_BEFORE, ValiditySpec,
};
pub use super::document::{DocumentFaults, SignatureS, cbor};
