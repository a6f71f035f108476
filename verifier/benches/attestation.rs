//! Cost of verifying a real AWS Nitro attestation document, cold and warm, against the raw cost
//! of the P-384 ECDSA-SHA384 verifications it needs, measured in the same run.
//!
//! The document is `testdata/nitro/nitro-01-evervault-2022-prod-pcr8.cose` (a chain of five:
//! root, regional, zonal, instance, leaf), verified at its own timestamp. In setup the exact
//! inputs of its five signature checks are extracted independently of the verifier (x509-parser
//! for the four certificate links: tbsCertificate bytes, DER signature, issuer key; the COSE
//! Sig_structure and the 96-byte r‖s under the leaf key for the fifth), and each is checked to
//! verify before anything is timed.
//!
//! Groups:
//! - `attestation/cold`: [`verify_attestation`], the whole chain every time; against
//!   `attestation/raw/five_p384_verifies`. Target: cold ≤ 1.2 × five verifies.
//! - `attestation/warm`: [`AttestationVerifier::verify`] with the whole path cached (the CA
//!   chain and the leaf link, valid at the verification time). A warm check verifies the COSE
//!   signature only, plus parsing and hashing; it is reported against one verify (target:
//!   warm ≤ 1.2 × one verify), and for comparison against two (what a warm check cost when only
//!   the CA chain was cached).
//! - `attestation/parts`: what a verification does besides the five signature checks (document
//!   parsing, certificate parsing, public-key decoding, hashing, summaries), to say where any
//!   time above the signature checks goes.
//!
//! Run: `cargo bench -p attestplane-verifier --bench attestation`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::hint::black_box;
use std::time::Instant;

use attestplane_verifier::attestation::{
    AttestationVerifier, Expectations, TrustAnchor, VerifyAt, parse_attestation, verify_attestation,
};
use criterion::{Criterion, criterion_group, criterion_main};
use p384::ecdsa::signature::Verifier;
use p384::ecdsa::{Signature, VerifyingKey};
use p384::pkcs8::DecodePublicKey;
use sha2::{Digest, Sha256};
use x509_parser::certificate::X509Certificate;
use x509_parser::oid_registry::{OID_X509_EXT_BASIC_CONSTRAINTS, OID_X509_EXT_KEY_USAGE};
use x509_parser::prelude::FromDer;

const DOC: &[u8] = include_bytes!("../testdata/nitro/nitro-01-evervault-2022-prod-pcr8.cose");

/// One signature check: key, message, signature.
struct SigCheck {
    key: VerifyingKey,
    message: Vec<u8>,
    signature: Signature,
}

impl SigCheck {
    fn verify(&self) -> bool {
        self.key.verify(&self.message, &self.signature).is_ok()
    }
}

/// A CBOR head with the shortest argument (major type, length), enough for byte and text
/// strings under 64 KiB.
fn cbor_head(out: &mut Vec<u8>, major: u8, len: usize) {
    let m = major << 5;
    if len < 24 {
        out.push(m | len as u8);
    } else if let Ok(n) = u8::try_from(len) {
        out.extend_from_slice(&[m | 24, n]);
    } else if let Ok(n) = u16::try_from(len) {
        out.push(m | 25);
        out.extend_from_slice(&n.to_be_bytes());
    } else {
        panic!("string of {len} bytes is too long for this bench");
    }
}

/// `["Signature1", protected, h'', payload]` (RFC 9052 §4.4), built here independently of the
/// verifier.
fn sig_structure(protected: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0x84];
    cbor_head(&mut out, 3, 10);
    out.extend_from_slice(b"Signature1");
    cbor_head(&mut out, 2, protected.len());
    out.extend_from_slice(protected);
    cbor_head(&mut out, 2, 0);
    cbor_head(&mut out, 2, payload.len());
    out.extend_from_slice(payload);
    out
}

fn p384_key(cert: &X509Certificate<'_>) -> VerifyingKey {
    let key = p384::PublicKey::from_public_key_der(cert.public_key().raw)
        .unwrap_or_else(|e| panic!("certificate key is not p-384: {e}"));
    VerifyingKey::from(key)
}

/// The five signature checks of `DOC`: four certificate links (root → regional → zonal →
/// instance → leaf), then the COSE signature.
fn extract_checks() -> Vec<SigCheck> {
    let doc = parse_attestation(DOC).unwrap_or_else(|e| panic!("document: {e}"));
    let mut path: Vec<&[u8]> = doc.cabundle().iter().map(Vec::as_slice).collect();
    path.push(doc.certificate());
    let certs: Vec<X509Certificate<'_>> = path
        .iter()
        .map(|der| {
            let (rest, cert) =
                X509Certificate::from_der(der).unwrap_or_else(|e| panic!("certificate: {e}"));
            assert!(rest.is_empty(), "bytes after a certificate");
            cert
        })
        .collect();
    assert_eq!(certs.len(), 5, "a real document has a path of five");
    let mut checks: Vec<SigCheck> = certs
        .windows(2)
        .map(|pair| {
            let [issuer, subject] = pair else {
                unreachable!("windows(2)")
            };
            SigCheck {
                key: p384_key(issuer),
                message: subject.tbs_certificate.as_ref().to_vec(),
                signature: Signature::from_der(&subject.signature_value.data)
                    .unwrap_or_else(|e| panic!("certificate signature: {e}")),
            }
        })
        .collect();
    let leaf = certs.last().unwrap_or_else(|| unreachable!("five certs"));
    checks.push(SigCheck {
        key: p384_key(leaf),
        message: sig_structure(doc.protected_header(), doc.payload()),
        signature: Signature::from_slice(doc.signature())
            .unwrap_or_else(|e| panic!("cose signature: {e}")),
    });
    for (i, c) in checks.iter().enumerate() {
        assert!(c.verify(), "signature check {i} of the document fails");
    }
    checks
}

/// Back-to-back timings of several operations: each round runs every operation once, starting
/// from a different one each round, so that the load of a noisy machine falls on all of them
/// alike. Ratios of criterion medians taken minutes apart mix in the drift of that load; ratios
/// within one interleaved run do not.
struct Interleaved {
    names: Vec<&'static str>,
    /// `times[i][round]`, seconds.
    times: Vec<Vec<f64>>,
}

type Op<'a> = (&'static str, Box<dyn FnMut() -> bool + 'a>);

fn interleave(rounds: usize, mut ops: Vec<Op<'_>>) -> Interleaved {
    let k = ops.len();
    let mut times = vec![Vec::with_capacity(rounds); k];
    for round in 0..rounds {
        for j in 0..k {
            let i = (round + j) % k;
            let (name, f) = &mut ops[i];
            let start = Instant::now();
            let ok = black_box(f());
            times[i].push(start.elapsed().as_secs_f64());
            assert!(ok, "interleaved operation {name} failed");
        }
    }
    Interleaved {
        names: ops.iter().map(|(n, _)| *n).collect(),
        times,
    }
}

impl Interleaved {
    fn series(&self, name: &str) -> &[f64] {
        let i = self
            .names
            .iter()
            .position(|n| *n == name)
            .unwrap_or_else(|| panic!("no operation {name}"));
        &self.times[i]
    }

    /// Median time of `name`, seconds.
    fn median(&self, name: &str) -> f64 {
        median(self.series(name).to_vec())
    }

    /// Fastest time of `name` (the least disturbed run), seconds.
    fn min(&self, name: &str) -> f64 {
        self.series(name)
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min)
    }

    /// Median over rounds of `time(a) / time(b)`, and the ratio of the two minima.
    fn ratio(&self, a: &str, b: &str) -> (f64, f64) {
        let ratios = self
            .series(a)
            .iter()
            .zip(self.series(b))
            .map(|(x, y)| x / y)
            .collect();
        (median(ratios), self.min(a) / self.min(b))
    }
}

/// Whether the binary runs as a benchmark (`cargo bench` passes `--bench`), not as a smoke test
/// (`cargo test --all-targets` runs each benchmark once without it): the interleaved run is
/// skipped in a smoke test.
fn bench_mode() -> bool {
    std::env::args().any(|a| a == "--bench")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn bench(c: &mut Criterion) {
    let anchor = TrustAnchor::aws_nitro_root_g1();
    let expect = Expectations::default();
    let at = VerifyAt::DocumentTimestamp;
    let checks = extract_checks();
    let (links, cose) = checks.split_at(4);
    let leaf_link = links.last().unwrap_or_else(|| unreachable!("four links"));
    let cose = cose
        .first()
        .unwrap_or_else(|| unreachable!("one cose check"));
    eprintln!(
        "attestation bench: {} bytes; link messages {:?} bytes; cose sig_structure {} bytes",
        DOC.len(),
        links.iter().map(|l| l.message.len()).collect::<Vec<_>>(),
        cose.message.len()
    );

    verify_attestation(DOC, &anchor, &expect, at)
        .unwrap_or_else(|e| panic!("the document must verify at its timestamp: {e}"));
    let warm = AttestationVerifier::with_cache_capacity(anchor.clone(), 16);
    warm.verify(DOC, &expect, at)
        .unwrap_or_else(|e| panic!("warm-up verification: {e}"));
    let cached = warm
        .verify(DOC, &expect, at)
        .unwrap_or_else(|e| panic!("cached verification: {e}"));
    assert!(
        cached
            .checks()
            .iter()
            .filter(|c| c.to_string().ends_with("[cached]"))
            .count()
            == 5,
        "the second verification must hit the path cache"
    );

    let doc = parse_attestation(DOC).unwrap_or_else(|e| panic!("document: {e}"));
    let mut path: Vec<Vec<u8>> = doc.cabundle().to_vec();
    path.push(doc.certificate().to_vec());
    if bench_mode() {
        // Ratios from one interleaved run (see `Interleaved`), printed before criterion's figures.
        let ops: Vec<Op<'_>> = vec![
            (
                "cold",
                Box::new(|| verify_attestation(DOC, &anchor, &expect, at).is_ok()),
            ),
            ("five", Box::new(|| checks.iter().all(SigCheck::verify))),
            ("warm", Box::new(|| warm.verify(DOC, &expect, at).is_ok())),
            ("one_cose", Box::new(|| cose.verify())),
            ("one_link", Box::new(|| leaf_link.verify())),
            ("two", Box::new(|| leaf_link.verify() && cose.verify())),
            ("parse", Box::new(|| parse_attestation(DOC).is_ok())),
            (
                "x509_five",
                Box::new(|| {
                    path.iter()
                        .all(|der| X509Certificate::from_der(der).is_ok())
                }),
            ),
        ];
        let run = interleave(150, ops);
        for name in &run.names {
            eprintln!(
                "interleaved {name:>10}: median {:9.1} µs, fastest {:9.1} µs",
                run.median(name) * 1e6,
                run.min(name) * 1e6
            );
        }
        for (a, b, what) in [
            ("cold", "five", "cold / five p-384 verifies (target <= 1.2)"),
            (
                "warm",
                "one_cose",
                "warm / one p-384 verify, cose (target <= 1.2)",
            ),
            ("warm", "one_link", "warm / one p-384 verify, leaf link"),
            (
                "warm",
                "two",
                "warm / two p-384 verifies (leaf link + cose, the cost with only the ca chain cached)",
            ),
            ("one_cose", "one_link", "cose verify / leaf-link verify"),
        ] {
            let (med, fastest) = run.ratio(a, b);
            eprintln!(
                "ratio {what}: median of per-round ratios {med:.3}, of the fastest runs {fastest:.3}"
            );
        }
    }

    let mut group = c.benchmark_group("attestation");

    group.bench_function("cold/verify_attestation", |b| {
        b.iter(|| verify_attestation(black_box(DOC), &anchor, &expect, at).is_ok())
    });
    group.bench_function("raw/five_p384_verifies", |b| {
        b.iter(|| black_box(&checks).iter().all(SigCheck::verify))
    });
    group.bench_function("warm/verifier_verify_cached_path", |b| {
        b.iter(|| warm.verify(black_box(DOC), &expect, at).is_ok())
    });
    group.bench_function("raw/one_p384_verify_leaf_link", |b| {
        b.iter(|| black_box(leaf_link).verify())
    });
    group.bench_function("raw/one_p384_verify_cose", |b| {
        b.iter(|| black_box(cose).verify())
    });
    group.bench_function("raw/two_p384_verifies_leaf_link_and_cose", |b| {
        b.iter(|| black_box(leaf_link).verify() && black_box(cose).verify())
    });
    // Each of the five alone. They do the same work; differences between them show how much
    // the machine's speed drifts between criterion runs.
    for (i, check) in checks.iter().enumerate() {
        group.bench_function(format!("raw/p384_verify_check_{i}"), |b| {
            b.iter(|| black_box(check).verify())
        });
    }

    // Where the time above the signature checks goes.
    group.bench_function("parts/parse_attestation", |b| {
        b.iter(|| parse_attestation(black_box(DOC)).is_ok())
    });
    group.bench_function("parts/x509_parse_five_certs", |b| {
        b.iter(|| {
            black_box(&path)
                .iter()
                .all(|der| X509Certificate::from_der(der).is_ok())
        })
    });
    group.bench_function("parts/x509_parse_leaf", |b| {
        b.iter(|| X509Certificate::from_der(black_box(doc.certificate())).is_ok())
    });
    let parsed: Vec<X509Certificate<'_>> = path
        .iter()
        .filter_map(|der| X509Certificate::from_der(der).ok().map(|(_, c)| c))
        .collect();
    group.bench_function("parts/p384_key_from_spki_five", |b| {
        b.iter(|| {
            black_box(&parsed)
                .iter()
                .all(|c| p384::PublicKey::from_public_key_der(c.public_key().raw).is_ok())
        })
    });
    group.bench_function("parts/sha256_root_pin_and_chain_key", |b| {
        b.iter(|| {
            let cabundle = black_box(doc.cabundle());
            let pin: [u8; 32] = cabundle
                .first()
                .map(|root| Sha256::digest(root).into())
                .unwrap_or_default();
            let mut h = Sha256::new();
            for der in cabundle {
                h.update((der.len() as u64).to_be_bytes());
                h.update(der);
            }
            let key: [u8; 32] = h.finalize().into();
            (pin, key)
        })
    });
    group.bench_function("parts/summaries_subject_and_sha256_five", |b| {
        b.iter(|| {
            black_box(&parsed)
                .iter()
                .zip(&path)
                .map(|(c, der)| {
                    let subject = c.subject().to_string();
                    let digest: [u8; 32] = Sha256::digest(der).into();
                    subject.len() + usize::from(digest[0])
                })
                .sum::<usize>()
        })
    });
    group.bench_function("parts/ca_rules_extensions_five", |b| {
        b.iter(|| {
            black_box(&parsed).iter().all(|c| {
                c.basic_constraints().is_ok()
                    && c.key_usage().is_ok()
                    && c.extensions().iter().all(|e| {
                        !e.critical
                            || e.oid == OID_X509_EXT_BASIC_CONSTRAINTS
                            || e.oid == OID_X509_EXT_KEY_USAGE
                    })
            })
        })
    });
    group.bench_function("parts/signature_from_der_four_links", |b| {
        b.iter(|| {
            black_box(&parsed)
                .iter()
                .skip(1)
                .all(|c| Signature::from_der(&c.signature_value.data).is_ok())
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
