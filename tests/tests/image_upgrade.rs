//! Image upgrades through the real binaries (docs/design.md, "Genesis and upgrades"): the
//! control plane starts a log as image A, an operator allows image B with `attestplane images
//! allow`, and `attestplane-enclave` running B continues the log once its measured command line
//! pins A (`--pinned-image`, the image that started the log); B without that pin, and an image
//! C no act allowed, are refused at boot, and the proxy names the refusal. The auditor, pinning
//! only A, verifies the upgraded log.

use std::path::{Path, PathBuf};
use std::time::Duration;

use attestplane_tests::*;

/// Writes a PCR file for a made-up image (PCR0–2 = SHA-384 of `{label}{i}`) into the stack's
/// directory.
fn image(files: &StackFiles, name: &str, label: &str) -> PathBuf {
    let pcrs: serde_json::Map<String, serde_json::Value> = (0..3)
        .map(|i| {
            let digest = <sha2::Sha384 as sha2::Digest>::digest(format!("{label}{i}").as_bytes());
            (format!("PCR{i}"), hex::encode(digest).into())
        })
        .collect();
    let path = files.path(name);
    std::fs::write(&path, serde_json::to_string(&pcrs).unwrap()).unwrap();
    path
}

/// The `--pinned-image` value naming the image of a PCR file: `0=HEX,1=HEX,2=HEX`.
fn pin(pcrs: &Path) -> String {
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(pcrs).unwrap()).unwrap();
    (0..3)
        .map(|i| format!("{i}={}", json[format!("PCR{i}")].as_str().unwrap()))
        .collect::<Vec<_>>()
        .join(",")
}

/// Stops the proxy and the enclave, starts the enclave as `image` with `extra` arguments, and
/// the proxy over the same store: `Err` with the proxy's output when it does not serve.
fn restart_as(stack: &mut SplitStack, image: &Path, extra: &[&str]) -> Result<(), String> {
    if let Some(proxy) = stack.proxy.as_mut() {
        proxy.terminate(Duration::from_secs(10));
    }
    if let Some(enclave) = stack.enclave.as_mut() {
        enclave.kill();
    }
    stack.start_enclave_image(image, extra);
    stack.start_proxy()
}

#[test]
fn upgrade_to_an_allowed_image_boots_only_when_pinned_and_an_unannounced_image_is_refused() {
    let mut stack = SplitStack::start();
    let a = stack.files.path("control-plane-pcrs.json");
    let b = image(&stack.files, "image-b-pcrs.json", "e2e image b pcr");
    let c = image(&stack.files, "image-c-pcrs.json", "e2e image c pcr");
    let b_arg = b.display().to_string();
    stack
        .files
        .cli(&["images", "allow", "--image-pcrs", &b_arg])
        .ok();
    let pinned_a = pin(&a);

    // B with nothing pinned: the log's first epoch runs A, which B was never told to accept.
    let refused = restart_as(&mut stack, &b, &[]).expect_err("B served A's log unpinned");
    assert!(
        refused.contains("neither pinned nor allowed"),
        "the refusal does not say the image is not allowed:\n{refused}"
    );

    // B pinning A on its command line: it replays A's epoch and opens its own.
    restart_as(&mut stack, &b, &["--pinned-image", &pinned_a])
        .unwrap_or_else(|e| panic!("the upgraded image did not serve: {e}"));
    assert_eq!(ready_epoch(&stack.url), Some(1), "B's epoch is not epoch 1");

    // The auditor pins only A: B's epoch is accepted for the allow_image act before it.
    let (log, checkpoint) = stack.files.export("upgraded.cbor");
    let (ran, report) = stack.files.verify_log(&log, Some(&checkpoint));
    assert_eq!(ran.code, Some(0), "the upgraded log did not verify\n{ran}");
    assert_eq!(
        report["log"]["epochs"].as_array().map(Vec::len),
        Some(2),
        "{report}"
    );

    // C pinning A, never allowed: refused at boot, even though the log ran B after A.
    let refused = restart_as(&mut stack, &c, &["--pinned-image", &pinned_a])
        .expect_err("an unannounced image served the log");
    assert!(
        refused.contains("neither pinned nor allowed"),
        "the refusal does not say the image is not allowed:\n{refused}"
    );
}
