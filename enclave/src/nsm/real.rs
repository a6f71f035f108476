//! The real NSM: `/dev/nsm` through AWS's driver functions.
//!
//! The file descriptor is private to [`RealNsm`], opened once by [`RealNsm::open`] and closed
//! exactly once when the value drops; nothing else can reach it, so no request can go to a
//! closed or foreign descriptor. The driver functions of `aws-nitro-enclaves-nsm-api` are safe
//! to call (the ioctl lives inside that crate), so this module needs no `unsafe`.
//!
//! It does not interpret responses beyond what [`Nsm`]'s provided methods do, and it does not
//! retry: the NSM answers or it does not.

use std::io::ErrorKind;
use std::path::Path;

use aws_nitro_enclaves_nsm_api::driver::{nsm_exit, nsm_init, nsm_process_request};

use super::{Nsm, NsmError, Request, Response};

/// The device node the driver opens.
pub const NSM_DEVICE_PATH: &str = "/dev/nsm";

/// The Nitro Secure Module of the enclave this process runs in.
#[derive(Debug)]
pub struct RealNsm {
    /// Descriptor returned by `nsm_init`; always valid (non-negative) while `self` lives.
    fd: i32,
}

impl RealNsm {
    /// Opens the enclave's NSM device.
    ///
    /// Fails with [`NsmError::DeviceUnavailable`] outside an enclave, where `/dev/nsm` does not
    /// exist (kind `NotFound`), or when it cannot be opened.
    pub fn open() -> Result<Self, NsmError> {
        // `nsm_init` reports failure only as -1; look first so the error can say why.
        if let Err(e) = std::fs::metadata(Path::new(NSM_DEVICE_PATH)) {
            return Err(NsmError::DeviceUnavailable {
                path: NSM_DEVICE_PATH,
                kind: e.kind(),
            });
        }
        let fd = nsm_init();
        if fd < 0 {
            return Err(NsmError::DeviceUnavailable {
                path: NSM_DEVICE_PATH,
                kind: ErrorKind::Other,
            });
        }
        Ok(Self { fd })
    }
}

impl Nsm for RealNsm {
    fn process(&self, request: Request) -> Response {
        nsm_process_request(self.fd, request)
    }
}

impl Drop for RealNsm {
    fn drop(&mut self) {
        nsm_exit(self.fd);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_fails_with_not_found_outside_an_enclave() {
        if Path::new(NSM_DEVICE_PATH).exists() {
            eprintln!("{NSM_DEVICE_PATH} exists: this test only checks the absent-device path");
            return;
        }
        match RealNsm::open() {
            Err(NsmError::DeviceUnavailable { path, kind }) => {
                assert_eq!(path, NSM_DEVICE_PATH);
                assert_eq!(kind, ErrorKind::NotFound);
            }
            other => panic!("expected DeviceUnavailable, got {other:?}"),
        }
    }
}
