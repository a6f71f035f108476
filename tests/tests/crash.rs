//! Issue 4's crash acceptance, with the enclave, the proxy and the demo server as separate
//! processes (`SplitStack`):
//! - the enclave is killed (SIGKILL) and restarted: the same proxy reconnects, replays, and the
//!   log continues in a new epoch; the exported two-epoch log verifies;
//! - the proxy is killed (SIGKILL) during a burst of concurrent handle resolutions: after a
//!   restart, every handle whose response was delivered has its seq in the exported log, which
//!   verifies.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use attestplane_tests::{
    SplitStack, flip_stored_entry, http_get, log_head, ready_epoch, rewrite_store, split_log,
    stored_entries,
};
use attestplane_verifier::entry::{Event, SignedEntry};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// The `jti` claim of a JWT (unverified: only to find its log entry).
fn jti_of(token: &str) -> String {
    let payload = token
        .split('.')
        .nth(1)
        .unwrap_or_else(|| panic!("not a JWT: {token}"));
    let claims: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
    claims["jti"]
        .as_str()
        .unwrap_or_else(|| panic!("no jti: {claims}"))
        .to_owned()
}

fn resolve_seq(stack: &SplitStack) -> u64 {
    let ran = stack.files.cli(&["--json", "handle", "resolve", "weather"]);
    ran.ok();
    ran.json()["seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("no seq:\n{ran}"))
}

#[test]
fn enclave_restart_continues_the_log_in_a_new_epoch_that_verifies() {
    let mut stack = SplitStack::start();
    stack.files.mint_agent_token();
    let first = resolve_seq(&stack);
    let (size_before, _) = log_head(&stack.url);
    assert!(first < size_before);

    let epoch_before = ready_epoch(&stack.url);
    assert_eq!(epoch_before, Some(0), "the proxy is not ready in epoch 0");

    stack.enclave.as_mut().unwrap().kill();
    stack.start_enclave();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut epoch = epoch_before;
    while epoch != Some(1) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        epoch = ready_epoch(&stack.url);
    }
    assert_eq!(
        epoch,
        Some(1),
        "the proxy did not become ready in epoch 1 after the enclave restarted\n{}",
        stack.proxy.as_ref().unwrap().diagnostics()
    );
    assert!(
        stack.proxy.as_mut().unwrap().is_running(),
        "the proxy exited when the enclave restarted"
    );
    let second = resolve_seq(&stack);
    assert!(
        second > first,
        "handle after restart at {second}, before at {first}"
    );

    let (log, checkpoint) = stack.files.export("log.cbor");
    let (ran, report) = stack.files.verify_log(&log, Some(&checkpoint));
    assert_eq!(ran.code, Some(0), "the two-epoch log did not verify\n{ran}");
    let epochs = report["log"]["epochs"].as_array().unwrap();
    assert_eq!(epochs.len(), 2, "expected two epochs: {report}");
    assert_eq!(
        epochs[1]["start_seq"], size_before,
        "the new epoch does not start right after the old log: {report}"
    );
    // The restarted enclave signs with a new key (the mock's randomness comes from the OS, not
    // from its public seed), and the log verifies across the change.
    assert!(epochs[0]["kid"].is_string(), "no kid: {report}");
    assert_ne!(
        epochs[0]["kid"], epochs[1]["kid"],
        "the restarted enclave signs with the previous epoch's key: {report}"
    );
    assert_ne!(epochs[0]["key"], epochs[1]["key"], "{report}");
    assert!(second >= size_before);
}

#[test]
fn readyz_reports_a_dead_enclave() {
    let mut stack = SplitStack::start();
    assert_eq!(ready_epoch(&stack.url), Some(0));
    stack.enclave.as_mut().unwrap().kill();
    // With no enclave the proxy does not serve: /readyz says so (http-api.md: 200 once the
    // enclave has replayed the log and serves, else 503).
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut readyz = ready_epoch(&stack.url);
    while readyz.is_some() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        readyz = ready_epoch(&stack.url);
    }
    assert_eq!(
        readyz, None,
        "/readyz still answers 200 (epoch 0) 5 s after the enclave died"
    );
    assert!(stack.proxy.as_mut().unwrap().is_running(), "the proxy died");
    let status = http_get(&format!("{}/readyz", stack.url)).map(|(s, _)| s);
    assert_eq!(status.ok(), Some(503), "/readyz without an enclave");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_sigkill_during_a_burst_loses_no_delivered_handle() {
    let mut stack = SplitStack::start();
    let token = stack.files.mint_agent_token();
    let mut delivered = Vec::new();
    // Where the kill lands decides the restart: if the enclave signed entries the store never
    // got, the proxy refuses it and the enclave restarts too (replaying the store); if the
    // store holds all the enclave signed, the proxy restarts alone. Go round until the proxy
    // restarted alone once (both paths are then covered), at most MAX_ROUNDS times.
    const MAX_ROUNDS: usize = 12;
    let mut alone = false;
    for round in 1..=MAX_ROUNDS {
        // Alternate wide and narrow bursts: a narrow one leaves the kill more chances to land
        // where the store holds all the enclave signed.
        let concurrency = if round % 2 == 1 { 16 } else { 2 };
        let got = burst_then_kill(&mut stack, &token, concurrency).await;
        assert!(
            got.len() >= 50,
            "round {round}: too few handles before the kill ({}) to test anything",
            got.len()
        );
        let count = got.len();
        delivered.extend(got);
        alone = tokio::task::block_in_place(|| match stack.start_proxy() {
            Ok(()) => true,
            Err(first) => {
                assert!(
                    first.contains("exited") && first.contains("restart the enclave"),
                    "the proxy did not restart, and not because the enclave is ahead:\n{first}"
                );
                stack.enclave.as_mut().unwrap().kill();
                stack.start_enclave();
                stack
                    .start_proxy()
                    .unwrap_or_else(|e| panic!("the proxy did not restart: {e}"));
                false
            }
        });
        eprintln!(
            "round {round} ({concurrency} at once): restarted the {} after {count} delivered handles",
            if alone {
                "proxy alone"
            } else {
                "proxy and the enclave"
            }
        );
        if alone {
            break;
        }
    }
    if !alone {
        eprintln!("note: the proxy never restarted alone in {MAX_ROUNDS} rounds");
    }

    // Export at once (a fresh checkpoint over what the restarted stack holds), then check.
    let files = &stack.files;
    let (log, checkpoint) = tokio::task::block_in_place(|| files.export("log.cbor"));
    let (ran, report) = tokio::task::block_in_place(|| files.verify_log(&log, Some(&checkpoint)));
    assert_eq!(
        ran.code,
        Some(0),
        "the log after the crash did not verify\n{ran}"
    );
    let size = report["log"]["size"].as_u64().unwrap();
    let mut seen = std::collections::BTreeSet::new();
    let entries = split_log(&std::fs::read(&log).unwrap());
    for (seq, jti) in &delivered {
        assert!(
            *seq < size,
            "handle with seq {seq} was delivered but the log has {size} entries"
        );
        assert!(seen.insert(*seq), "two handles with seq {seq}");
        // The entry at that seq is the decision that issued this very handle.
        let entry = SignedEntry::decode(&entries[*seq as usize])
            .unwrap_or_else(|e| panic!("entry {seq}: {e}"));
        match &entry.entry().event {
            Event::Decision(d) => assert_eq!(
                d.handle.as_ref().map(|h| h.jti.as_str()),
                Some(jti.as_str()),
                "entry {seq} records another handle"
            ),
            other => panic!(
                "entry {seq} is a {}, not the handle's decision",
                other.type_name()
            ),
        }
    }

    // It serves again: a new handle comes after the exported log.
    let after = tokio::task::block_in_place(|| resolve_seq(&stack));
    assert!(
        after >= size,
        "a handle after the restart has seq {after}, inside the exported log of {size}"
    );
}

/// Runs `concurrency` concurrent handle resolutions against the proxy until 200 were delivered
/// (or 30 s),
/// kills the proxy (SIGKILL) in the middle of them, and returns each delivered handle's seq and
/// `jti`.
async fn burst_then_kill(
    stack: &mut SplitStack,
    token: &str,
    concurrency: usize,
) -> Vec<(u64, String)> {
    let url = format!("{}/v1/servers/weather/handle", stack.url);
    let http = reqwest::Client::new();
    let delivered = Arc::new(Mutex::new(Vec::<(u64, String)>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (http, url, token) = (http.clone(), url.clone(), token.to_owned());
        let (delivered, stop) = (delivered.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let resp = http
                    .post(&url)
                    .bearer_auth(&token)
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await;
                let Ok(resp) = resp else { break };
                if resp.status() != 200 {
                    continue;
                }
                // Delivered: the whole body arrived.
                let Ok(body) = resp.json::<serde_json::Value>().await else {
                    break;
                };
                let seq = body["seq"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("a handle without seq: {body}"));
                let jti = jti_of(body["token"].as_str().unwrap_or(""));
                delivered.lock().unwrap().push((seq, jti));
            }
        }));
    }
    let started = Instant::now();
    while delivered.lock().unwrap().len() < 200 && started.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stack.proxy.as_mut().unwrap().kill();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    delivered.lock().unwrap().clone()
}

/// A host that edits one stored entry (fixing the record's checksum, so its own store accepts
/// it) serves the edited bytes; the auditor's verifier names the entry. An accidental edit
/// (checksum not fixed) makes the proxy refuse to open its store, naming the entry.
#[test]
fn tampered_store_entry_is_named() {
    let mut stack = SplitStack::start();
    stack.files.mint_agent_token();
    let handle = resolve_seq(&stack) as usize;
    stack.files.cli(&["--json", "servers", "list"]).ok();
    let (size, _) = log_head(&stack.url);
    assert!(handle + 1 < size as usize);
    let data = stack.files.dir.clone();

    // Accidental: the proxy refuses its own store.
    stack
        .proxy
        .as_mut()
        .unwrap()
        .terminate(Duration::from_secs(10));
    assert_eq!(stored_entries(&data).len() as u64, size);
    let pristine: Vec<(PathBuf, Vec<u8>)> = stored_entries(&data)
        .iter()
        .map(|e| e.segment.clone())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .map(|p| {
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect();
    flip_stored_entry(&data, handle, false);
    let refused = stack
        .start_proxy()
        .expect_err("the proxy served a store with a corrupt record");
    assert!(
        refused.contains(&format!("seq {handle}")),
        "the proxy's refusal does not name seq {handle}:\n{refused}"
    );

    // Deliberate: the store accepts it, the enclave (same head) serves on, the auditor names it.
    for (path, bytes) in &pristine {
        std::fs::write(path, bytes).unwrap();
    }
    flip_stored_entry(&data, handle, true);
    stack
        .start_proxy()
        .unwrap_or_else(|e| panic!("the proxy did not restart: {e}"));
    let (log, _) = stack.files.export("log.cbor");
    let (ran, report) = stack.files.verify_log(&log, None);
    assert_eq!(ran.code, Some(1), "the edited log verified\n{ran}");
    assert_eq!(report["first_bad_seq"], handle as u64, "{report}");

    // Deleting or swapping stored entries (valid records): a restarted enclave replays the
    // store and refuses it; the proxy does not serve and names the entry.
    let entries: Vec<Vec<u8>> = pristine_entries(&pristine);
    for (what, edited) in [
        ("deleted", {
            let mut e = entries.clone();
            e.remove(handle);
            e
        }),
        ("swapped", {
            let mut e = entries.clone();
            e.swap(handle - 1, handle);
            e
        }),
    ] {
        if let Some(proxy) = stack.proxy.as_mut() {
            proxy.terminate(Duration::from_secs(10));
        }
        stack.enclave.as_mut().unwrap().kill();
        rewrite_store(&data, &edited);
        stack.start_enclave();
        let first_bad = if what == "deleted" {
            handle
        } else {
            handle - 1
        };
        let refused = stack
            .start_proxy()
            .expect_err(&format!("the proxy served a store with {what} entries"));
        assert!(
            refused.contains(&format!("entry {first_bad}:")),
            "{what}: the refusal does not name entry {first_bad}:\n{refused}"
        );
        for (path, bytes) in &pristine {
            std::fs::write(path, bytes).unwrap();
        }
        stack.proxy = None;
    }
}

fn pristine_entries(segments: &[(PathBuf, Vec<u8>)]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (_, bytes) in segments {
        let mut offset = 0;
        while offset + 8 <= bytes.len() {
            let len = u32::from_be_bytes(bytes[offset..offset + 4].try_into().unwrap()) as usize;
            out.push(bytes[offset + 8..offset + 8 + len].to_vec());
            offset += 8 + len;
        }
    }
    out
}
