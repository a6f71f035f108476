//! Writes the mock NSM's deterministic fixtures to `verifier/testdata/mock/`.
//!
//! ```text
//! cargo run -p attestplane-enclave --example gen_fixtures [OUT_DIR]
//! ```
//!
//! Every byte depends only on the seed, the pinned instant and the inputs below, so running it
//! twice writes identical files; the README it writes lists each file's SHA-256.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::error::Error;
use std::fmt::Write as _;
use std::path::PathBuf;

use attestplane_enclave::nsm::{Clock, MapEncoding, MockNsm, MockNsmBuilder, Nsm};
use attestplane_verifier::UnixMillis;
use sha2::{Digest as _, Sha256, Sha384};

/// The fixtures' seed: 32 ASCII bytes.
const SEED: &[u8; 32] = b"attestplane mock nsm fixtures v1";
/// 2025-07-01T00:00:00.123Z.
const AT: UnixMillis = UnixMillis::from_millis(1_751_328_000_123);

fn measurement(label: &str) -> [u8; 48] {
    Sha384::digest(label.as_bytes()).into()
}

fn builder() -> MockNsmBuilder {
    MockNsmBuilder::new(*SEED, Clock::Fixed(AT)).image_measurements(
        measurement("attestplane fixture pcr0"),
        measurement("attestplane fixture pcr1"),
        measurement("attestplane fixture pcr2"),
    )
}

struct Fixture {
    file: &'static str,
    what: String,
    bytes: Vec<u8>,
}

fn describe(nsm: &MockNsm, mode: &str, nonce: &[u8], user_data: &[u8], pk: &[u8]) -> String {
    let mut s = format!(
        "{mode}; timestamp {} ({AT}); module_id `{}`; nonce `{}`; user_data `{}`; \
         public_key `{}`; PCRs 0–15:\n",
        AT.as_millis(),
        nsm.identity().module_id(),
        hex::encode(nonce),
        hex::encode(user_data),
        hex::encode(pk),
    );
    for (i, v) in nsm.locked_pcrs() {
        if v != [0; 48] {
            let _ = writeln!(s, "  - PCR{i} `{}`", hex::encode(v));
        }
    }
    s.push_str("  - every other PCR is 48 zero bytes\n");
    s
}

fn main() -> Result<(), Box<dyn Error>> {
    let out: PathBuf = match std::env::args_os().nth(1) {
        Some(dir) => dir.into(),
        None => [
            env!("CARGO_MANIFEST_DIR"),
            "..",
            "verifier",
            "testdata",
            "mock",
        ]
        .iter()
        .collect(),
    };
    std::fs::create_dir_all(&out)?;

    let nonce = Sha256::digest(b"attestplane fixture nonce").to_vec();
    let user_data = b"attestplane fixture user data".to_vec();
    // A real Ed25519 key (of prime order, as the signature rules require of an epoch key), from
    // a seed derived the way the other values are.
    let key_seed: [u8; 32] = Sha256::digest(b"attestplane fixture public key").into();
    let public_key = ed25519_dalek::SigningKey::from_bytes(&key_seed)
        .verifying_key()
        .to_bytes()
        .to_vec();

    let prod = builder().build();
    let indefinite = builder().map_encoding(MapEncoding::Indefinite).build();
    let debug = builder().debug_mode(true).build();

    let mut fixtures = vec![Fixture {
        file: "mock-root.pem",
        what: "the mock root certificate (self-signed, P-384, valid 2019-10-28T13:28:05Z to \
               2049-10-28T14:28:05Z): pin it with `TrustAnchor::from_pem` / `--root`"
            .to_owned(),
        bytes: prod.root_pem()?.into_bytes(),
    }];
    let attest = |nsm: &MockNsm| {
        nsm.attest(
            Some(user_data.clone()),
            Some(nonce.clone()),
            Some(public_key.clone()),
        )
    };
    fixtures.push(Fixture {
        file: "mock-prod.cose",
        what: describe(
            &prod,
            "production mode, definite-length payload map (`a9`)",
            &nonce,
            &user_data,
            &public_key,
        ),
        bytes: attest(&prod)?,
    });
    fixtures.push(Fixture {
        file: "mock-prod-indefinite.cose",
        what: describe(
            &indefinite,
            "the same document with an indefinite-length payload map (`bf … ff`), as NSMs \
             write since mid-2025",
            &nonce,
            &user_data,
            &public_key,
        ),
        bytes: attest(&indefinite)?,
    });
    fixtures.push(Fixture {
        file: "mock-debug.cose",
        what: describe(
            &debug,
            "debug mode (PCR0/1/2/8 zero): must be rejected unless debug is allowed",
            &nonce,
            &user_data,
            &public_key,
        ),
        bytes: attest(&debug)?,
    });

    let mut readme = String::from(
        "# Mock NSM fixtures\n\n\
         Written by `enclave/examples/gen_fixtures.rs` with the mock NSM \
         (`attestplane_enclave::nsm::MockNsm`); do not edit by hand. Regenerate with\n\n\
         ```sh\ncargo run -p attestplane-enclave --example gen_fixtures\n```\n\n\
         The output is deterministic (seeded keys, RFC 6979 signatures, a pinned clock): \
         regenerating must leave every file byte-identical, so a diff means the mock changed.\n\n",
    );
    let _ = writeln!(
        readme,
        "- seed: the 32 ASCII bytes `{}` (hex `{}`)\n- clock: {} ms = {AT}\n\
         - image measurements: PCR0/1/2 = SHA-384(\"attestplane fixture pcrN\"); PCR4 = \
         SHA-384(0⁴⁸ ‖ instance id), as AWS computes it\n\
         - chain: root → regional → zonal → instance → leaf, all P-384 / ecdsa-with-SHA384, \
         anchored at the clock; the leaf is valid from 3 s before to 3 h after it, so the \
         documents verify at their own timestamp and fail a few hours later\n\
         - a document from this seed is trusted only by a verifier that pins `mock-root.pem`; \
         the AWS root must reject it\n",
        String::from_utf8_lossy(SEED),
        hex::encode(SEED),
        AT.as_millis(),
    );
    readme.push_str("\n## Files\n\n");
    for f in &fixtures {
        std::fs::write(out.join(f.file), &f.bytes)?;
        let _ = writeln!(
            readme,
            "### `{}`\n\nSHA-256 `{}`, {} bytes. {}\n",
            f.file,
            hex::encode(Sha256::digest(&f.bytes)),
            f.bytes.len(),
            f.what.trim_end()
        );
    }
    std::fs::write(out.join("README.md"), readme)?;
    println!("wrote {} fixtures to {}", fixtures.len(), out.display());
    Ok(())
}
