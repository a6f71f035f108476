//! `attestplane-demo-server` as a process: its ready line, its printed root and PCRs, and its
//! `/attestation` documents, checked with the verifier library against what it printed and
//! against the PCRs its `--image` name defines (PCRn = SHA-384("NAME pcrN")).

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, SystemTime};

use attestplane_tests::{Proc, READY_TIMEOUT, binary, run, temp_dir};
use attestplane_verifier::UnixMillis;
use attestplane_verifier::attestation::{
    Expectations, Pcr, PcrIndex, TrustAnchor, VerifyAt, verify_attestation,
};
use sha2::{Digest as _, Sha384};

struct Demo {
    proc: Proc,
    url: String,
    root: TrustAnchor,
    pcrs: BTreeMap<PcrIndex, Pcr>,
    dir: tempfile::TempDir,
}

fn start(extra: &[&str]) -> Demo {
    let dir = temp_dir("demo-server-");
    let root = dir.path().join("root.pem");
    let pcrs = dir.path().join("pcrs.json");
    let mut cmd = Command::new(binary("attestplane-demo-server"));
    cmd.args(["--listen", "127.0.0.1:0", "--print-mock-root"])
        .arg(&root)
        .arg("--print-pcrs")
        .arg(&pcrs)
        .args(extra);
    let mut proc = Proc::spawn(
        "attestplane-demo-server",
        cmd,
        &dir.path().join("stderr.log"),
    );
    let url = proc.wait_line("http://", READY_TIMEOUT);
    let anchor = TrustAnchor::from_pem(&std::fs::read(&root).unwrap()).unwrap();
    let json: BTreeMap<String, String> =
        serde_json::from_slice(&std::fs::read(&pcrs).unwrap()).unwrap();
    let pcrs = json
        .iter()
        .map(|(k, v)| {
            let i: u8 = k.strip_prefix("PCR").unwrap().parse().unwrap();
            (PcrIndex::try_from(i).unwrap(), Pcr::from_hex(v).unwrap())
        })
        .collect();
    Demo {
        proc,
        url,
        root: anchor,
        pcrs,
        dir,
    }
}

fn image_pcrs(image: &str) -> BTreeMap<PcrIndex, Pcr> {
    (0u8..3)
        .map(|i| {
            let digest = Sha384::digest(format!("{image} pcr{i}").as_bytes());
            (
                PcrIndex::try_from(i).unwrap(),
                Pcr::try_from(&digest[..]).unwrap(),
            )
        })
        .collect()
}

fn now() -> UnixMillis {
    UnixMillis::from_system_time(SystemTime::now())
}

async fn get(url: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

#[tokio::test]
async fn serves_attestation_documents_that_verify_against_its_printed_root_and_pcrs() {
    let demo = start(&[]);
    assert_eq!(
        demo.pcrs,
        image_pcrs("attestplane-demo-weather"),
        "the printed PCRs are not those of the default image"
    );

    let health = get(&format!("{}/healthz", demo.url)).await;
    assert_eq!(health.status(), 200);

    let nonce: Vec<u8> = (0u8..32).map(|i| i.wrapping_mul(37)).collect();
    let resp = get(&format!(
        "{}/attestation?nonce={}",
        demo.url,
        hex::encode(&nonce)
    ))
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/cbor")
    );
    let doc = resp.bytes().await.unwrap().to_vec();
    let expect = Expectations {
        pcrs: demo.pcrs.clone(),
        nonce: Some(nonce.clone()),
        max_age_ms: Some(60_000),
        ..Expectations::default()
    };
    let verified = verify_attestation(&doc, &demo.root, &expect, VerifyAt::Instant(now()))
        .unwrap_or_else(|e| panic!("{e}\n{}", demo.proc.diagnostics()));
    assert_eq!(verified.nonce(), Some(nonce.as_slice()));
    assert!(!verified.is_debug());

    // The auditor's CLI agrees, with the printed PCR file as its --pcrs.
    let doc_file = demo.dir.path().join("doc.cbor");
    std::fs::write(&doc_file, &doc).unwrap();
    let mut cmd = Command::new(binary("attestplane-verify"));
    cmd.arg("attestation")
        .arg(&doc_file)
        .arg("--pcrs")
        .arg(demo.dir.path().join("pcrs.json"))
        .arg("--root")
        .arg(demo.dir.path().join("root.pem"))
        .args(["--nonce", &hex::encode(&nonce)])
        .args(["--at", &now().as_millis().to_string()]);
    run(cmd).ok();

    // The same document does not pass for another nonce, nor under another root.
    let other_nonce = Expectations {
        nonce: Some(vec![0; 32]),
        ..expect.clone()
    };
    assert!(verify_attestation(&doc, &demo.root, &other_nonce, VerifyAt::Instant(now())).is_err());
    let other = start(&["--mock-seed", &"11".repeat(32)]);
    assert_ne!(other.root.fingerprint(), demo.root.fingerprint());
    assert!(verify_attestation(&doc, &other.root, &expect, VerifyAt::Instant(now())).is_err());
}

#[tokio::test]
async fn image_flag_sets_the_measurements() {
    let demo = start(&["--image", "acme-search"]);
    assert_eq!(demo.pcrs, image_pcrs("acme-search"));
    assert_ne!(demo.pcrs, image_pcrs("attestplane-demo-weather"));
    let doc = get(&format!("{}/attestation?nonce=00ff", demo.url))
        .await
        .bytes()
        .await
        .unwrap();
    let expect = Expectations {
        pcrs: image_pcrs("acme-search"),
        nonce: Some(vec![0x00, 0xff]),
        ..Expectations::default()
    };
    verify_attestation(&doc, &demo.root, &expect, VerifyAt::Instant(now())).unwrap();
}

#[tokio::test]
async fn refuses_bad_nonces_with_400() {
    let demo = start(&[]);
    let max = "ab".repeat(512);
    let ok = get(&format!("{}/attestation?nonce={max}", demo.url)).await;
    assert_eq!(ok.status(), 200, "a 512-byte nonce is allowed");
    for query in [
        String::new(),
        "?nonce=".to_owned(),
        "?nonce=zz".to_owned(),
        "?nonce=abc".to_owned(),
        format!("?nonce={max}ab"),
    ] {
        let resp = get(&format!("{}/attestation{query}", demo.url)).await;
        assert_eq!(resp.status(), 400, "GET /attestation{query}");
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], "bad_request", "{body}");
    }
}

#[test]
fn refuses_a_non_loopback_address_without_allow_remote() {
    let mut cmd = Command::new(binary("attestplane-demo-server"));
    cmd.args(["--listen", "0.0.0.0:0"]);
    let ran = run(cmd);
    assert_ne!(ran.code, Some(0), "{ran}");
    assert!(ran.stdout.is_empty(), "{ran}");
    assert!(ran.stderr.contains("--allow-remote"), "{ran}");
}
