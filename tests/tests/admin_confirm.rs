//! Admin acts are confirmed from the log, not from the host's word (issue 9 item 4).
//!
//! A tampering host sits between the real CLI and the real stack (`attestplane dev`): an axum
//! reverse proxy that forwards everything and, per attack, lies about one thing. Each attack
//! must end in a non-zero exit naming what the host did, and an honest host's answer must be
//! confirmed:
//!
//! - a revocation dropped and claimed as accepted (at the position it would have had);
//! - an accepted request answered with the wrong `seq`;
//! - an entry served that is not the one in the checkpoint (re-signed by the host);
//! - a checkpoint signed by a key the enclave's attestation does not vouch for;
//! - a request for another deployment: refused (and logged) by the enclave, and, when the host
//!   claims it was accepted, named as refused in the log.

use std::sync::{Arc, Mutex};

use attestplane_tests::{DevStack, Ran, StackFiles, log_head};
use attestplane_verifier::checkpoint::{Checkpoint, sign_checkpoint};
use attestplane_verifier::entry::{Event, KeyId, SignedEntry};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use ed25519_dalek::SigningKey;

/// What the host lies about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tamper {
    /// Nothing: forwards every request and answer.
    Honest,
    /// Does not forward `POST /v1/admin`; answers accepted at the log's current size.
    DropAdminClaimAccepted,
    /// Forwards `POST /v1/admin`; answers an accepted request with the previous `seq`.
    ShiftSeq,
    /// Serves single admin entries re-signed by its own key (same content, other bytes).
    ForgeEntry,
    /// Serves fresh checkpoints re-signed by its own key under the log's origin.
    ForeignCheckpoint,
    /// Answers a refused admin request (`admin_refused`) as accepted at its `seq`.
    ClaimAccepted,
}

#[derive(Clone)]
struct Host {
    upstream: String,
    http: reqwest::Client,
    tamper: Arc<Mutex<Tamper>>,
    key: Arc<SigningKey>,
}

impl Host {
    fn tamper(&self) -> Tamper {
        *self.tamper.lock().unwrap()
    }

    async fn forward(
        &self,
        method: Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: Bytes,
    ) -> (StatusCode, Vec<u8>) {
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.upstream))
            .body(body);
        if let Some(ct) = headers.get("content-type") {
            req = req.header("content-type", ct.as_bytes());
        }
        let resp = req.send().await.unwrap();
        let status = StatusCode::from_u16(resp.status().as_u16()).unwrap();
        (status, resp.bytes().await.unwrap().to_vec())
    }
}

fn json(status: StatusCode, value: serde_json::Value) -> Response {
    (
        status,
        [("content-type", "application/json")],
        value.to_string(),
    )
        .into_response()
}

async fn handle(
    State(host): State<Host>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let tamper = host.tamper();
    let path = uri.path().to_owned();
    let query = uri.query().unwrap_or("").to_owned();
    if method == Method::POST && path == "/v1/admin" {
        if tamper == Tamper::DropAdminClaimAccepted {
            let (_, head) = host
                .forward(
                    Method::GET,
                    &"/v1/log/head".parse().unwrap(),
                    &headers,
                    Bytes::new(),
                )
                .await;
            let head: serde_json::Value = serde_json::from_slice(&head).unwrap();
            let seq = head["size"].as_u64().unwrap();
            return json(
                StatusCode::OK,
                serde_json::json!({ "accepted": true, "seq": seq }),
            );
        }
        let (status, answer) = host.forward(method, &uri, &headers, body).await;
        let answer: serde_json::Value = serde_json::from_slice(&answer).unwrap();
        return match tamper {
            Tamper::ShiftSeq if status == StatusCode::OK => {
                let seq = answer["seq"].as_u64().unwrap();
                json(
                    StatusCode::OK,
                    serde_json::json!({ "accepted": true, "seq": seq - 1 }),
                )
            }
            Tamper::ClaimAccepted if answer["error"]["code"] == "admin_refused" => {
                let seq = answer["error"]["seq"].as_u64().unwrap();
                json(
                    StatusCode::OK,
                    serde_json::json!({ "accepted": true, "seq": seq }),
                )
            }
            _ => json(status, answer),
        };
    }
    let (status, bytes) = host.forward(method.clone(), &uri, &headers, body).await;
    if tamper == Tamper::ForgeEntry && path == "/v1/log/entries" && status == StatusCode::OK {
        // One entry asked for, and an admin event: the host serves its own signature over it.
        let single = query.split('&').filter_map(|kv| kv.split_once('=')).fold(
            (None, None),
            |(s, e), (k, v)| match k {
                "start" => (v.parse::<u64>().ok(), e),
                "end" => (s, v.parse::<u64>().ok()),
                _ => (s, e),
            },
        );
        if let (Some(start), Some(end)) = single
            && end == start + 1
            && let Ok(signed) = SignedEntry::decode(&bytes)
            && matches!(signed.entry().event, Event::Admin { .. })
        {
            let forged = signed
                .entry()
                .sign(&KeyId::of(&host.key.verifying_key()), host.key.as_ref())
                .unwrap();
            return (status, forged).into_response();
        }
    }
    if tamper == Tamper::ForeignCheckpoint
        && method == Method::POST
        && path == "/v1/log/checkpoint"
        && status == StatusCode::OK
    {
        let note = String::from_utf8(bytes).unwrap();
        let body: String = note.split_inclusive('\n').take(3).collect();
        let cp = Checkpoint::parse_body(&body).unwrap();
        let forged = sign_checkpoint(&cp, cp.origin(), host.key.as_ref()).unwrap();
        return (status, forged).into_response();
    }
    (status, bytes).into_response()
}

/// Starts the tampering host in front of `upstream`; returns its URL and its switch.
async fn tampering_host(upstream: &str) -> (String, Arc<Mutex<Tamper>>) {
    let tamper = Arc::new(Mutex::new(Tamper::Honest));
    let host = Host {
        upstream: upstream.to_owned(),
        http: reqwest::Client::builder().no_proxy().build().unwrap(),
        tamper: tamper.clone(),
        key: Arc::new(SigningKey::from_bytes(&[66; 32])),
    };
    let app = axum::Router::new().fallback(handle).with_state(host);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, tamper)
}

/// `attestplane --config DIR/<config> --url URL ARGS...`, off the async runtime.
async fn cli(files: &StackFiles, config: &str, url: &str, args: &[&str]) -> Ran {
    let mut all = vec!["--url".to_owned(), url.to_owned()];
    all.extend(args.iter().map(|a| (*a).to_owned()));
    let dir = files.dir.clone();
    let config = config.to_owned();
    tokio::task::spawn_blocking(move || {
        let files = StackFiles { dir };
        let mut cmd = std::process::Command::new(attestplane_tests::binary("attestplane"));
        cmd.arg("--config").arg(files.path(&config)).args(&all);
        cmd.env_remove("ATTESTPLANE_CONFIG")
            .env_remove("ATTESTPLANE_URL")
            .env_remove("ATTESTPLANE_TOKEN");
        attestplane_tests::run(cmd)
    })
    .await
    .unwrap()
}

fn assert_named(ran: &Ran, what: &str, needle: &str) {
    assert_eq!(ran.code, Some(1), "{what}: exit code; {ran:?}");
    assert!(
        ran.stderr.contains(needle),
        "{what}: stderr lacks {needle:?}: {ran:?}"
    );
    assert!(!ran.stdout.contains("accepted:"), "{what}: {ran:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_acts_are_confirmed_from_the_log_and_a_lying_host_is_named() {
    let stack = DevStack::start();
    let files = &stack.files;
    files.register_and_attest_weather(&stack.demo_url);
    let (fake, tamper) = tampering_host(&stack.url).await;
    let policy = attestplane_tests::starter_policy_path()
        .display()
        .to_string();
    let set = |t: Tamper| *tamper.lock().unwrap() = t;
    let config = "config.toml";

    // A dropped revocation claimed as accepted: nothing was logged, and the CLI says so.
    set(Tamper::DropAdminClaimAccepted);
    let (before, _) = log_head(&stack.url);
    let ran = cli(files, config, &fake, &["servers", "revoke", "weather"]).await;
    assert_named(
        &ran,
        "dropped revocation",
        "is not in the enclave's fresh checkpoint",
    );
    assert!(ran.stderr.contains("unconfirmed"), "{ran:?}");
    assert_eq!(
        log_head(&stack.url).0,
        before,
        "the revocation was not submitted"
    );

    // An accepted request answered with another position.
    set(Tamper::ShiftSeq);
    let ran = cli(files, config, &fake, &["policy", "set", &policy]).await;
    assert_named(&ran, "wrong seq", "does not record this request");

    // An entry served that is not the one the checkpoint commits to.
    set(Tamper::ForgeEntry);
    let ran = cli(files, config, &fake, &["policy", "set", &policy]).await;
    assert_named(&ran, "forged entry", "is not the one in the checkpoint");

    // A checkpoint signed by the host's own key, under the log's origin.
    set(Tamper::ForeignCheckpoint);
    let ran = cli(files, config, &fake, &["policy", "set", &policy]).await;
    assert_named(
        &ran,
        "unattested checkpoint",
        "is not signed by the attested epoch key",
    );

    // A request for another deployment (a config pinning another genesis entry): the enclave
    // refuses it and logs the refusal; the CLI confirms the refusal from the log.
    let text = std::fs::read_to_string(files.path(config)).unwrap();
    let genesis = text
        .lines()
        .find_map(|l| l.strip_prefix("genesis = \""))
        .and_then(|l| l.strip_suffix('"'))
        .expect("attestplane dev pinned the genesis hash")
        .to_owned();
    let other = format!(
        "{}{}",
        if genesis.starts_with('0') { "1" } else { "0" },
        &genesis[1..]
    );
    std::fs::write(files.path("other.toml"), text.replace(&genesis, &other)).unwrap();
    set(Tamper::Honest);
    let (before, _) = log_head(&stack.url);
    let ran = cli(files, "other.toml", &stack.url, &["policy", "set", &policy]).await;
    assert_named(&ran, "another deployment", "admin_refused");
    assert!(ran.stderr.contains("for another deployment"), "{ran:?}");
    assert!(ran.stderr.contains("confirmed from the log"), "{ran:?}");
    assert_eq!(log_head(&stack.url).0, before + 1, "the refusal is logged");

    // ... and a host that claims it was accepted is named.
    set(Tamper::ClaimAccepted);
    let ran = cli(files, "other.toml", &fake, &["policy", "set", &policy]).await;
    assert_named(
        &ran,
        "refused entry claimed accepted",
        "records the request as refused",
    );

    // The honest path, through the same host: confirmed, with what was checked.
    set(Tamper::Honest);
    let ran = cli(files, config, &fake, &["servers", "revoke", "weather"]).await;
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert!(
        ran.stdout.contains("accepted: revoke_server weather")
            && ran
                .stdout
                .contains("confirmed in the enclave's checkpoint of size"),
        "{ran:?}"
    );

    // The log with every refusal still verifies.
    let (log, checkpoint) = files.export("final");
    let (ran, json) = files.verify_log(&log, Some(&checkpoint));
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert_eq!(json["verified"], true, "{json}");
}
