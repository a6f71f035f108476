//! The Nitro Secure Module behind one trait: the real device and a deterministic mock.
//!
//! Inside a Nitro Enclave the NSM is the only source of three things the control plane needs:
//! randomness for the epoch key, platform configuration registers (PCRs) that measure the image,
//! and attestation documents that bind a public key and user data to those measurements under a
//! certificate chain rooted in AWS's Nitro root CA. [`Nsm`] is the one interface to it. It takes
//! and returns the very [`Request`] and [`Response`] types of AWS's `aws-nitro-enclaves-nsm-api`
//! crate, so the mock and the device cannot drift apart in what they are asked, and its provided
//! methods ([`Nsm::attest`], [`Nsm::random`], …) turn responses into typed results.
//!
//! - [`RealNsm`] opens `/dev/nsm` and forwards requests to the driver. It is the only
//!   implementation a production enclave uses.
//! - [`MockNsm`] behaves like the device (same requests, same error codes for the same misuse)
//!   and signs attestation documents with a P-384 chain it generates from a 32-byte seed, shaped
//!   like AWS's. Tests use it to stand in both for the control plane's own enclave and for
//!   attested MCP servers; `attestplane dev` uses it to run the stack on a laptop.
//!
//! Which one runs is a start-up choice made by whoever constructs the server; no production path
//! contains a compile-time fake. The mock's fault-injection knobs, which produce deliberately
//! broken chains and documents for the verifier's tests, are gathered in [`testing`] (defined
//! next to the code that applies them, so the files of this folder import one way only:
//! `certs` and `document` at the bottom, `mock` above them, `testing` re-exporting).
//!
//! ## Trust assumptions
//!
//! The real NSM is trusted (it is part of the Nitro hypervisor). The mock is trusted by nobody:
//! its root is generated from a seed anyone can know, so a verifier only accepts its documents
//! when told to pin the mock's root explicitly.
//!
//! ## What this module deliberately does not do
//!
//! - It does not parse or verify attestation documents; that is the verifier crate's job, done
//!   with an encoder that shares no code with the mock's, so each checks the other.
//! - It does not retry or reinterpret device errors: a refused request is reported with the
//!   device's own error code.
//! - The mock does not read the system clock unless it was built with [`Clock::System`], which
//!   only the developer binary should choose.

mod certs;
mod document;
mod mock;
mod real;
pub mod testing;

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

pub use aws_nitro_enclaves_nsm_api::api::{Digest, ErrorCode, Request, Response};

pub use certs::MockError;
pub use document::MapEncoding;
pub use mock::{Clock, MAX_EXTEND_DATA_LEN, MockNsm, MockNsmBuilder, RANDOM_CHUNK_LEN};
pub use real::{NSM_DEVICE_PATH, RealNsm};

/// Number of PCRs an NSM exposes (`max_pcrs` in `DescribeNSM`).
pub const PCR_COUNT: u16 = 32;

/// Length in bytes of one PCR value (SHA-384).
pub const PCR_LEN: usize = 48;

/// PCRs `0..BOOT_LOCKED_PCRS` are measured and locked by the hypervisor before the enclave runs.
pub const BOOT_LOCKED_PCRS: u16 = 16;

/// The most bytes the NSM accepts in each of `user_data`, `nonce` and `public_key`.
pub const MAX_ATTESTATION_FIELD_LEN: usize = 1024;

/// The most random bytes [`Nsm::random`] hands out in one call (it loops over `GetRandom`).
pub const MAX_RANDOM_LEN: usize = 1 << 20;

/// Access to a Nitro Secure Module, real or mock.
///
/// Implementors provide [`Nsm::process`]; the other methods are conveniences over it that check
/// the response's shape and map device errors to [`NsmError`].
pub trait Nsm: Send + Sync {
    /// Sends one request and returns the module's response, error responses included.
    fn process(&self, request: Request) -> Response;

    /// Asks for an attestation document (untagged COSE_Sign1 bytes) carrying the given optional
    /// fields. Each must be at most [`MAX_ATTESTATION_FIELD_LEN`] bytes or the module refuses it.
    fn attest(
        &self,
        user_data: Option<Vec<u8>>,
        nonce: Option<Vec<u8>>,
        public_key: Option<Vec<u8>>,
    ) -> Result<Vec<u8>, NsmError> {
        let request = Request::Attestation {
            user_data: user_data.map(Into::into),
            nonce: nonce.map(Into::into),
            public_key: public_key.map(Into::into),
        };
        match self.process(request) {
            Response::Attestation { document } => Ok(document),
            other => Err(unexpected(Operation::Attestation, other)),
        }
    }

    /// Returns exactly `len` bytes of NSM randomness, calling `GetRandom` as often as needed
    /// (each call yields a limited number of bytes, 256 on current devices).
    fn random(&self, len: usize) -> Result<Vec<u8>, NsmError> {
        if len > MAX_RANDOM_LEN {
            return Err(NsmError::RandomTooLong {
                requested: len,
                max: MAX_RANDOM_LEN,
            });
        }
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            match self.process(Request::GetRandom) {
                Response::GetRandom { random } if random.is_empty() => {
                    return Err(NsmError::EmptyRandom);
                }
                Response::GetRandom { random } => {
                    let want = len.saturating_sub(out.len());
                    out.extend(random.iter().take(want));
                }
                other => return Err(unexpected(Operation::GetRandom, other)),
            }
        }
        Ok(out)
    }

    /// Reads PCR `index` and whether it is locked.
    fn describe_pcr(&self, index: u16) -> Result<PcrState, NsmError> {
        match self.process(Request::DescribePCR { index }) {
            Response::DescribePCR { lock, data } => Ok(PcrState {
                locked: lock,
                value: data,
            }),
            other => Err(unexpected(Operation::DescribePcr, other)),
        }
    }

    /// Extends PCR `index` with `data` (`PCR = SHA-384(PCR ‖ data)`) and returns the new value.
    /// A locked PCR refuses with [`NsmErrorCode::ReadOnlyIndex`].
    fn extend_pcr(&self, index: u16, data: &[u8]) -> Result<Vec<u8>, NsmError> {
        let request = Request::ExtendPCR {
            index,
            data: data.to_vec(),
        };
        match self.process(request) {
            Response::ExtendPCR { data } => Ok(data),
            other => Err(unexpected(Operation::ExtendPcr, other)),
        }
    }

    /// Locks PCR `index` against further extension.
    fn lock_pcr(&self, index: u16) -> Result<(), NsmError> {
        match self.process(Request::LockPCR { index }) {
            Response::LockPCR => Ok(()),
            other => Err(unexpected(Operation::LockPcr, other)),
        }
    }

    /// Locks PCRs `0..range` against further extension.
    fn lock_pcrs(&self, range: u16) -> Result<(), NsmError> {
        match self.process(Request::LockPCRs { range }) {
            Response::LockPCRs => Ok(()),
            other => Err(unexpected(Operation::LockPcrs, other)),
        }
    }

    /// Returns the module's version, identity and PCR bank description.
    fn describe_nsm(&self) -> Result<NsmDescription, NsmError> {
        match self.process(Request::DescribeNSM) {
            Response::DescribeNSM {
                version_major,
                version_minor,
                version_patch,
                module_id,
                max_pcrs,
                locked_pcrs,
                digest,
            } => Ok(NsmDescription {
                version: (version_major, version_minor, version_patch),
                module_id,
                max_pcrs,
                locked_pcrs,
                digest,
            }),
            other => Err(unexpected(Operation::DescribeNsm, other)),
        }
    }
}

impl<T: Nsm + ?Sized> Nsm for Arc<T> {
    fn process(&self, request: Request) -> Response {
        (**self).process(request)
    }
}

impl<T: Nsm + ?Sized> Nsm for Box<T> {
    fn process(&self, request: Request) -> Response {
        (**self).process(request)
    }
}

/// The state of one PCR, as `DescribePCR` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PcrState {
    /// Whether the PCR refuses further extension.
    pub locked: bool,
    /// The PCR's current value ([`PCR_LEN`] bytes on a SHA-384 module).
    pub value: Vec<u8>,
}

/// What `DescribeNSM` reports.
#[derive(Clone, Debug, PartialEq)]
pub struct NsmDescription {
    /// `(major, minor, patch)` of the module's API.
    pub version: (u16, u16, u16),
    /// The module's identifier (`i-…-enc…`).
    pub module_id: String,
    /// How many PCRs the module exposes.
    pub max_pcrs: u16,
    /// The PCRs that are locked.
    pub locked_pcrs: BTreeSet<u16>,
    /// The hash of the PCR bank.
    pub digest: Digest,
}

/// The NSM operation a failure concerns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    /// `DescribePCR`.
    DescribePcr,
    /// `ExtendPCR`.
    ExtendPcr,
    /// `LockPCR`.
    LockPcr,
    /// `LockPCRs`.
    LockPcrs,
    /// `DescribeNSM`.
    DescribeNsm,
    /// `Attestation`.
    Attestation,
    /// `GetRandom`.
    GetRandom,
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::DescribePcr => "describe-pcr",
            Self::ExtendPcr => "extend-pcr",
            Self::LockPcr => "lock-pcr",
            Self::LockPcrs => "lock-pcrs",
            Self::DescribeNsm => "describe-nsm",
            Self::Attestation => "attestation",
            Self::GetRandom => "get-random",
        })
    }
}

/// The NSM's error codes (`aws_nitro_enclaves_nsm_api::api::ErrorCode`), comparable and copyable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NsmErrorCode {
    /// An error response that said `Success`.
    Success,
    /// Input argument(s) invalid.
    InvalidArgument,
    /// PCR index out of bounds.
    InvalidIndex,
    /// The response does not correspond to the request.
    InvalidResponse,
    /// The PCR is locked and the operation would modify it.
    ReadOnlyIndex,
    /// The module lacks the capability for the request.
    InvalidOperation,
    /// The output buffer is too small.
    BufferTooSmall,
    /// The user-provided input is too large.
    InputTooLarge,
    /// The module failed internally.
    InternalError,
}

impl From<&ErrorCode> for NsmErrorCode {
    fn from(code: &ErrorCode) -> Self {
        match code {
            ErrorCode::Success => Self::Success,
            ErrorCode::InvalidArgument => Self::InvalidArgument,
            ErrorCode::InvalidIndex => Self::InvalidIndex,
            ErrorCode::InvalidResponse => Self::InvalidResponse,
            ErrorCode::ReadOnlyIndex => Self::ReadOnlyIndex,
            ErrorCode::InvalidOperation => Self::InvalidOperation,
            ErrorCode::BufferTooSmall => Self::BufferTooSmall,
            ErrorCode::InputTooLarge => Self::InputTooLarge,
            ErrorCode::InternalError => Self::InternalError,
        }
    }
}

impl From<NsmErrorCode> for ErrorCode {
    fn from(code: NsmErrorCode) -> Self {
        match code {
            NsmErrorCode::Success => Self::Success,
            NsmErrorCode::InvalidArgument => Self::InvalidArgument,
            NsmErrorCode::InvalidIndex => Self::InvalidIndex,
            NsmErrorCode::InvalidResponse => Self::InvalidResponse,
            NsmErrorCode::ReadOnlyIndex => Self::ReadOnlyIndex,
            NsmErrorCode::InvalidOperation => Self::InvalidOperation,
            NsmErrorCode::BufferTooSmall => Self::BufferTooSmall,
            NsmErrorCode::InputTooLarge => Self::InputTooLarge,
            NsmErrorCode::InternalError => Self::InternalError,
        }
    }
}

impl fmt::Display for NsmErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Success => "success",
            Self::InvalidArgument => "invalid argument",
            Self::InvalidIndex => "invalid pcr index",
            Self::InvalidResponse => "invalid response",
            Self::ReadOnlyIndex => "read-only pcr index",
            Self::InvalidOperation => "invalid operation",
            Self::BufferTooSmall => "buffer too small",
            Self::InputTooLarge => "input too large",
            Self::InternalError => "internal error",
        })
    }
}

/// Why an NSM operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NsmError {
    /// The NSM device could not be opened (not inside an enclave, or no permission).
    #[error("nsm device {path} unavailable: {kind}")]
    DeviceUnavailable {
        /// The device path tried.
        path: &'static str,
        /// What the operating system said.
        kind: std::io::ErrorKind,
    },
    /// The module answered with an error code.
    #[error("nsm refused {operation}: {code}")]
    Refused {
        /// The operation refused.
        operation: Operation,
        /// The module's error code.
        code: NsmErrorCode,
    },
    /// The module answered with a response of another kind than the request called for.
    #[error("nsm answered {operation} with a {found} response")]
    UnexpectedResponse {
        /// The operation asked for.
        operation: Operation,
        /// The kind of response received.
        found: &'static str,
    },
    /// More random bytes were asked for than [`MAX_RANDOM_LEN`].
    #[error("requested {requested} random bytes, more than the maximum {max}")]
    RandomTooLong {
        /// Bytes requested.
        requested: usize,
        /// The limit.
        max: usize,
    },
    /// `GetRandom` returned no bytes, so filling the request would never finish.
    #[error("nsm returned no random bytes")]
    EmptyRandom,
}

/// Maps a response that does not answer `operation` to the right error.
fn unexpected(operation: Operation, response: Response) -> NsmError {
    match response {
        Response::Error(code) => NsmError::Refused {
            operation,
            code: NsmErrorCode::from(&code),
        },
        other => NsmError::UnexpectedResponse {
            operation,
            found: response_kind(&other),
        },
    }
}

/// The name of a response's kind, for error messages.
fn response_kind(response: &Response) -> &'static str {
    match response {
        Response::DescribePCR { .. } => "describe-pcr",
        Response::ExtendPCR { .. } => "extend-pcr",
        Response::LockPCR => "lock-pcr",
        Response::LockPCRs => "lock-pcrs",
        Response::DescribeNSM { .. } => "describe-nsm",
        Response::Attestation { .. } => "attestation",
        Response::GetRandom { .. } => "get-random",
        Response::Error(_) => "error",
        _ => "unknown",
    }
}
