//! The HTTP API's status table (docs/http-api.md), pinned row by row with `router()` and
//! `tower::ServiceExt::oneshot`: no listener, no client, only the router over a real enclave
//! client and store, talking to a scripted fake enclave on a temp-dir Unix socket.
//!
//! Each test names the row (status and code) it pins; the success shapes of every route are
//! pinned too, so a refactoring of the API that changes what a client sees fails here.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use attestplane_host::api::{AppState, MAX_BODY, router};
use attestplane_host::enclave_client::{ClientOptions, EnclaveClient};
use attestplane_host::store::Store;
use attestplane_proto::{
    Address, Body as FrameBody, ByteBuf, ErrorCode, Frame, FrameDecoder, Listener, Request,
    Response, ServerInfo, read_frame, write_frame,
};
use attestplane_verifier::UnixMillis;
use attestplane_verifier::admin::{AdminAction, AdminRequest, Deployment, PcrHex, ServerSpec};
use attestplane_verifier::attestation::{Pcr, PcrIndex};
use attestplane_verifier::checkpoint::Checkpoint;
use attestplane_verifier::entry::{Entry, EntryHash, Event, KeyId};
use attestplane_verifier::merkle;
use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request as HttpRequest, StatusCode, header};
use ed25519_dalek::SigningKey;
use serde_json::{Value, json};
use tower::ServiceExt as _;

/// How the fake enclave answers a request other than the connection's own (`Hello`, `Status`,
/// `Durable`): `None` never answers.
type Script = Arc<dyn Fn(&Request) -> Option<Response> + Send + Sync>;

/// A fake enclave on a Unix socket: ready at epoch 1 with `head_seq` as its head, and
/// answering everything else with `script`.
async fn fake_enclave(path: &std::path::Path, head_seq: Option<u64>, script: Script) {
    let listener = Listener::bind(&Address::Unix(path.to_path_buf()))
        .await
        .unwrap();
    tokio::spawn(async move {
        while let Ok(stream) = listener.accept().await {
            let script = Arc::clone(&script);
            tokio::spawn(async move {
                let (mut reader, mut writer) = tokio::io::split(stream);
                let mut decoder = FrameDecoder::new();
                while let Ok(Some(frame)) = read_frame(&mut reader, &mut decoder).await {
                    let FrameBody::Request(request) = frame.body else {
                        continue;
                    };
                    let reply = match &request {
                        Request::Hello { version } => Some(Response::Hello {
                            version: *version,
                            ready: true,
                            epoch: Some(1),
                            head_seq,
                        }),
                        Request::Status => Some(Response::Status {
                            ready: true,
                            epoch: Some(1),
                            head_seq,
                            durable_seq: head_seq,
                            servers: 0,
                        }),
                        Request::Durable { .. } => Some(Response::Ack),
                        other => script(other),
                    };
                    if let Some(reply) = reply
                        && write_frame(&mut writer, &Frame::response(frame.id, reply))
                            .await
                            .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
}

/// The router under test, and what it stands on.
struct Api {
    app: Router,
    store: Arc<Store>,
    _dir: tempfile::TempDir,
}

struct Setup {
    script: Script,
    /// Entries stored before the client starts.
    stored: Vec<Vec<u8>>,
    /// The enclave's head as it claims it (default: the stored log's).
    head_seq: Option<Option<u64>>,
    /// No enclave listening at all.
    no_enclave: bool,
    request_timeout: Duration,
    max_in_flight: usize,
}

impl Setup {
    fn new(script: impl Fn(&Request) -> Option<Response> + Send + Sync + 'static) -> Setup {
        Setup {
            script: Arc::new(script),
            stored: Vec::new(),
            head_seq: None,
            no_enclave: false,
            request_timeout: Duration::from_secs(5),
            max_in_flight: 64,
        }
    }

    /// The API with a ready client (waits for it unless the enclave is absent or ahead).
    async fn start(self) -> Api {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("enclave.sock");
        let store = Arc::new(Store::open(dir.path().join("log")).unwrap());
        if !self.stored.is_empty() {
            store.append_blocking(0, self.stored.clone()).unwrap();
        }
        let stored_head = store.len().checked_sub(1);
        let head_seq = self.head_seq.unwrap_or(stored_head);
        if !self.no_enclave {
            fake_enclave(&socket, head_seq, self.script).await;
        }
        let client = EnclaveClient::start(
            Address::Unix(socket),
            Arc::clone(&store),
            ClientOptions {
                connections: 1,
                ready_timeout: Duration::from_millis(300),
                ..ClientOptions::default()
            },
        );
        if !self.no_enclave && head_seq == stored_head {
            client.wait_ready(Duration::from_secs(10)).await.unwrap();
        }
        let state = AppState::new(client, self.request_timeout, self.max_in_flight).unwrap();
        Api {
            app: router(state),
            store,
            _dir: dir,
        }
    }
}

/// An answer: status, headers, body.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    fn text(&self) -> String {
        String::from_utf8(self.body.clone()).unwrap()
    }

    /// Asserts an error answer of the table: status, code, and `seq` when the refusal was
    /// logged.
    #[track_caller]
    fn assert_error(&self, status: StatusCode, code: &str, seq: Option<u64>) {
        let body = self.json();
        assert_eq!(self.status, status, "{body}");
        assert_eq!(body["error"]["code"], code, "{body}");
        assert!(body["error"]["message"].is_string(), "{body}");
        assert_eq!(body["error"]["seq"].as_u64(), seq, "{body}");
    }

    fn retry_after(&self) -> Option<&str> {
        self.headers
            .get(header::RETRY_AFTER)
            .map(|v| v.to_str().unwrap())
    }
}

impl Api {
    async fn request(&self, request: HttpRequest<Body>) -> Answer {
        let response = self.app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap()
            .to_vec();
        Answer {
            status,
            headers,
            body,
        }
    }

    async fn get(&self, uri: &str) -> Answer {
        self.request(HttpRequest::get(uri).body(Body::empty()).unwrap())
            .await
    }

    async fn post(&self, uri: &str) -> Answer {
        self.request(
            HttpRequest::post(uri)
                .header(header::AUTHORIZATION, "Bearer agent-token")
                .body(Body::empty())
                .unwrap(),
        )
        .await
    }

    async fn agent_get(&self, uri: &str) -> Answer {
        self.request(
            HttpRequest::get(uri)
                .header(header::AUTHORIZATION, "Bearer agent-token")
                .body(Body::empty())
                .unwrap(),
        )
        .await
    }

    async fn post_json(&self, uri: &str, body: impl Into<Body>) -> Answer {
        self.request(
            HttpRequest::builder()
                .method(Method::POST)
                .uri(uri)
                .header(header::CONTENT_TYPE, "application/json")
                .body(body.into())
                .unwrap(),
        )
        .await
    }
}

fn error(code: ErrorCode, message: &str) -> Option<Response> {
    Some(Response::Error {
        code,
        message: message.into(),
    })
}

/// A script answering every request with `reply`.
fn always(reply: Option<Response>) -> impl Fn(&Request) -> Option<Response> + Send + Sync {
    move |_| reply.clone()
}

const ADMIN_BODY: &str = r#"{"request": "AAEC"}"#;

// ---------------------------------------------------------------------------------------------
// Successes: the shape of every route's answer.

#[tokio::test]
async fn admin_accepted_answers_200_with_the_seq() {
    let api = Setup::new(|r| match r {
        Request::Admin { request } if request.as_slice() == [0, 1, 2] => {
            Some(Response::AdminResult {
                accepted: true,
                seq: 7,
                reason: None,
            })
        }
        Request::Admin { request } if request.as_slice() == [0, 1] => Some(Response::AdminResult {
            accepted: true,
            seq: 8,
            reason: None,
        }),
        _ => error(ErrorCode::Internal, "unexpected request"),
    })
    .start()
    .await;
    let answer = api.post_json("/v1/admin", ADMIN_BODY).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.json(), json!({"accepted": true, "seq": 7}));
    // Padding is optional.
    for body in [r#"{"request": "AAE="}"#, r#"{"request": "AAE"}"#] {
        let answer = api.post_json("/v1/admin", body).await;
        assert_eq!(answer.json(), json!({"accepted": true, "seq": 8}));
    }
}

#[tokio::test]
async fn agent_routes_answer_their_documented_shapes() {
    let api = Setup::new(|r| match r {
        Request::Discover { bearer } if bearer == "agent-token" => Some(Response::Servers {
            servers: vec![ServerInfo {
                id: "s1".into(),
                name: "Server one".into(),
                tenant: "acme".into(),
                resource: "https://s1.example".into(),
                attested: true,
            }],
            seq: 10,
        }),
        Request::Resolve { server_id, .. } if server_id == "s1" => Some(Response::Handle {
            token: "handle-jwt".into(),
            seq: 11,
            expires_at: 1_764_870_000,
        }),
        Request::Authorize { tool, .. } if tool == "read" => Some(Response::Authorized {
            allowed: true,
            seq: 12,
            reason: None,
        }),
        Request::Authorize { .. } => Some(Response::Authorized {
            allowed: false,
            seq: 13,
            reason: Some("no policy permits call".into()),
        }),
        _ => error(ErrorCode::Internal, "unexpected request"),
    })
    .start()
    .await;

    let answer = api.agent_get("/v1/servers").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        answer.json(),
        json!({"servers": [{"id": "s1", "name": "Server one", "tenant": "acme",
            "resource": "https://s1.example", "attested": true}], "seq": 10})
    );
    let answer = api.post("/v1/servers/s1/handle").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        answer.json(),
        json!({"token": "handle-jwt", "seq": 11, "expires_at": 1_764_870_000u64})
    );
}

#[tokio::test]
async fn retired_authorize_route_answers_410_and_never_reaches_the_enclave() {
    let reached = Arc::new(AtomicUsize::new(0));
    let seen = reached.clone();
    let api = Setup::new(move |r| match r {
        Request::Authorize { .. } => {
            seen.fetch_add(1, Ordering::SeqCst);
            Some(Response::Authorized {
                allowed: true,
                seq: 12,
                reason: None,
            })
        }
        _ => error(ErrorCode::Internal, "unexpected request"),
    })
    .start()
    .await;
    for path in [
        "/v1/servers/s1/tools/read/authorize",
        "/v1/servers/ghost/tools/x/authorize",
    ] {
        let answer = api.post(path).await;
        answer.assert_error(StatusCode::GONE, "gone", None);
        assert!(
            answer.json()["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("/mcp/")),
            "the answer says where calls go now"
        );
    }
    assert_eq!(
        reached.load(Ordering::SeqCst),
        0,
        "nothing was asked of the enclave"
    );
}

/// A checkpoint note over the empty log (the store reads only the size its body claims).
fn note() -> String {
    let body = Checkpoint::new("test.example/log", 0, merkle::empty_root())
        .unwrap()
        .body();
    format!("{body}\n\u{2014} test.example/log c2lnbmF0dXJl\n")
}

#[tokio::test]
async fn auditor_routes_answer_their_documented_shapes() {
    let api = Setup::new(|r| match r {
        Request::GetAttestation { nonce } => Some(Response::Attestation {
            document: ByteBuf::from(nonce.clone().map_or(b"doc".to_vec(), |n| n.into_vec())),
            jwks: r#"{"keys":[]}"#.into(),
        }),
        Request::Checkpoint => Some(Response::Checkpoint { note: note() }),
        _ => error(ErrorCode::Internal, "unexpected request"),
    })
    .start()
    .await;

    let answer = api.get("/v1/attestation?nonce=00ff").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(
        answer.json(),
        json!({"document": "AP8=", "jwks": {"keys": []}})
    );
    let answer = api.get("/v1/jwks").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.headers[header::CONTENT_TYPE], "application/json");
    assert_eq!(answer.text(), r#"{"keys":[]}"#);

    let answer = api.get("/v1/log/head").await;
    assert_eq!(answer.json(), json!({"size": 0, "head": null}));
    api.get("/v1/log/checkpoint")
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found", None);
    let answer = api.post_json("/v1/log/checkpoint", "").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.text(), note());
    let answer = api.get("/v1/log/checkpoint").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        answer.headers[header::CONTENT_TYPE],
        "text/plain; charset=utf-8"
    );
    assert_eq!(answer.text(), note());
}

#[tokio::test]
async fn log_routes_serve_the_stored_entries_and_their_proofs() {
    let entries: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 3]).collect();
    let mut setup = Setup::new(always(None));
    setup.stored = entries.clone();
    let api = setup.start().await;
    let leaves: Vec<_> = entries.iter().map(|e| EntryHash::of(e)).collect();

    let answer = api.get("/v1/log/head").await;
    assert_eq!(
        answer.json(),
        json!({"size": 5, "head": leaves[4].to_hex()})
    );
    let answer = api.get("/v1/log/entries?start=1&end=3").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.headers[header::CONTENT_TYPE], "application/cbor-seq");
    assert_eq!(answer.headers["attestplane-next-start"], "3");
    assert_eq!(
        answer.body,
        [entries[1].clone(), entries[2].clone()].concat()
    );
    let answer = api.get("/v1/log/entries?start=4&end=100").await;
    assert_eq!(answer.headers["attestplane-next-start"], "5");
    assert_eq!(answer.body, entries[4]);

    let answer = api.get("/v1/log/proof/inclusion?index=2&size=5").await;
    assert_eq!(answer.status, StatusCode::OK);
    let body = answer.json();
    assert_eq!(body["index"], 2);
    assert_eq!(body["size"], 5);
    assert_eq!(body["leaf"], api.store.leaf_hash(2).unwrap().to_hex());
    assert_eq!(body["root"], api.store.root(5).unwrap().to_hex());
    let proof: Vec<String> = api
        .store
        .inclusion_proof(2, 5)
        .unwrap()
        .iter()
        .map(|h| h.to_hex())
        .collect();
    assert_eq!(body["proof"], json!(proof));

    let answer = api.get("/v1/log/proof/consistency?old=2&new=5").await;
    assert_eq!(answer.status, StatusCode::OK);
    let body = answer.json();
    assert_eq!(body["old"], 2);
    assert_eq!(body["new"], 5);
    assert_eq!(body["old_root"], api.store.root(2).unwrap().to_hex());
    assert_eq!(body["new_root"], api.store.root(5).unwrap().to_hex());
    let proof: Vec<String> = api
        .store
        .consistency_proof(2, 5)
        .unwrap()
        .iter()
        .map(|h| h.to_hex())
        .collect();
    assert_eq!(body["proof"], json!(proof));
}

#[tokio::test]
async fn operations_routes_report_liveness_readiness_and_metrics() {
    let api = Setup::new(always(None)).start().await;
    let answer = api.get("/healthz").await;
    assert_eq!(
        (answer.status, answer.text().as_str()),
        (StatusCode::OK, "ok\n")
    );
    let answer = api.get("/readyz").await;
    assert_eq!(
        (answer.status, answer.text().as_str()),
        (StatusCode::OK, "ready (epoch 1)\n")
    );
    api.get("/v1/nowhere").await;
    let answer = api.get("/metrics").await;
    assert_eq!(answer.status, StatusCode::OK);
    let text = answer.text();
    for line in [
        r#"attestplane_http_requests_total{route="/healthz",status="200"} 1"#,
        r#"attestplane_http_requests_total{route="unmatched",status="404"} 1"#,
        "attestplane_log_entries 0",
        "attestplane_ready 1",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "{line} missing from\n{text}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 400 bad_request.

#[tokio::test]
async fn status_400_bad_request_for_malformed_json_queries_and_admin_bytes() {
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&calls);
    let api = Setup::new(move |_| {
        seen.fetch_add(1, Ordering::SeqCst);
        error(ErrorCode::BadRequest, "not an admin request")
    })
    .start()
    .await;
    let bad = StatusCode::BAD_REQUEST;
    for (uri, body) in [
        ("/v1/admin", "{not json"),
        ("/v1/admin", r#"{"request": "AAEC", "extra": 1}"#),
        ("/v1/admin", r#"{"request": "not base64!"}"#),
        ("/v1/admin", r#"{"request": ""}"#),
    ] {
        api.post_json(uri, body)
            .await
            .assert_error(bad, "bad_request", None);
    }
    for uri in [
        "/v1/log/entries?start=x",
        "/v1/log/entries?start=1",
        "/v1/log/entries?start=0&end=0&other=1",
        "/v1/log/proof/inclusion?index=0&size=0",
        "/v1/log/proof/inclusion?index=0&size=1",
        "/v1/log/proof/consistency?old=2&new=1",
        "/v1/attestation?nonce=zz",
    ] {
        api.get(uri).await.assert_error(bad, "bad_request", None);
    }
    let long_nonce = "00".repeat(513);
    api.get(&format!("/v1/attestation?nonce={long_nonce}"))
        .await
        .assert_error(bad, "bad_request", None);
    let long_id = "s".repeat(257);
    api.post(&format!("/v1/servers/{long_id}/handle"))
        .await
        .assert_error(bad, "bad_request", None);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "nothing reached the enclave"
    );
    // Bytes the enclave refuses to decode.
    api.post_json("/v1/admin", ADMIN_BODY)
        .await
        .assert_error(bad, "bad_request", None);
}

// ---------------------------------------------------------------------------------------------
// 401 unauthenticated.

#[tokio::test]
async fn status_401_unauthenticated_for_a_missing_or_malformed_bearer_and_a_refused_jwt() {
    let api = Setup::new(always(error(ErrorCode::Unauthenticated, "token expired")))
        .start()
        .await;
    let unauthorized = StatusCode::UNAUTHORIZED;
    api.get("/v1/servers")
        .await
        .assert_error(unauthorized, "unauthenticated", None);
    for value in ["Basic abc", "Bearer ", "Bearer    "] {
        api.request(
            HttpRequest::get("/v1/servers")
                .header(header::AUTHORIZATION, value)
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .assert_error(unauthorized, "unauthenticated", None);
    }
    api.agent_get("/v1/servers")
        .await
        .assert_error(unauthorized, "unauthenticated", None);
}

// ---------------------------------------------------------------------------------------------
// 403 denied and admin_refused; 404 not_found; 409 conflict.

#[tokio::test]
async fn status_403_denied_carries_the_seq_of_the_logged_refusal() {
    let api = Setup::new(always(Some(Response::Denied {
        seq: 42,
        reason: "no policy permits resolve".into(),
        code: ErrorCode::Denied,
    })))
    .start()
    .await;
    let forbidden = StatusCode::FORBIDDEN;
    api.agent_get("/v1/servers")
        .await
        .assert_error(forbidden, "denied", Some(42));
    api.post("/v1/servers/s1/handle")
        .await
        .assert_error(forbidden, "denied", Some(42));
}

#[tokio::test]
async fn status_403_admin_refused_carries_the_seq_of_the_logged_refusal() {
    let api = Setup::new(always(Some(Response::AdminResult {
        accepted: false,
        seq: 7,
        reason: Some("unknown admin key".into()),
    })))
    .start()
    .await;
    let answer = api.post_json("/v1/admin", ADMIN_BODY).await;
    answer.assert_error(StatusCode::FORBIDDEN, "admin_refused", Some(7));
    assert_eq!(answer.json()["error"]["message"], "unknown admin key");
}

#[tokio::test]
async fn status_404_not_found_for_routes_the_enclave_and_unregistered_servers() {
    let api = Setup::new(|r| match r {
        Request::Resolve { .. } => Some(Response::Denied {
            seq: 3,
            reason: "no such server".into(),
            code: ErrorCode::NotFound,
        }),
        Request::AttestChallenge { .. } => Some(Response::Challenge {
            nonce: ByteBuf::from(vec![9; 32]),
            expires_at_ms: 0,
        }),
        _ => error(ErrorCode::NotFound, "no such tool"),
    })
    .start()
    .await;
    let not_found = StatusCode::NOT_FOUND;
    api.get("/v1/nowhere")
        .await
        .assert_error(not_found, "not_found", None);
    api.post("/v1/servers/ghost/handle")
        .await
        .assert_error(not_found, "not_found", Some(3));
    // The enclave issued a nonce but the stored log registers no such server.
    api.post("/v1/servers/ghost/attest")
        .await
        .assert_error(not_found, "not_found", None);
}

#[tokio::test]
async fn status_409_conflict_from_the_enclave() {
    let api = Setup::new(always(error(ErrorCode::Conflict, "conflicts")))
        .start()
        .await;
    api.post_json("/v1/admin", ADMIN_BODY).await.assert_error(
        StatusCode::CONFLICT,
        "conflict",
        None,
    );
}

#[tokio::test]
async fn status_409_conflict_for_a_second_attestation_of_a_server_in_progress() {
    // The enclave never answers the first challenge, so its attestation stays in progress.
    let challenges = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&challenges);
    let mut setup = Setup::new(move |_| {
        seen.fetch_add(1, Ordering::SeqCst);
        None
    });
    setup.request_timeout = Duration::from_secs(2);
    let api = Arc::new(setup.start().await);
    let first = tokio::spawn({
        let api = Arc::clone(&api);
        async move { api.post("/v1/servers/s1/attest").await.status }
    });
    wait_for(&challenges, 1).await;
    api.post("/v1/servers/s1/attest")
        .await
        .assert_error(StatusCode::CONFLICT, "conflict", None);
    assert_eq!(
        challenges.load(Ordering::SeqCst),
        1,
        "refused before the enclave"
    );
    assert_eq!(first.await.unwrap(), StatusCode::GATEWAY_TIMEOUT);
}

/// Waits until `counter` reaches `n` (the fake enclave received that many requests).
async fn wait_for(counter: &AtomicUsize, n: usize) {
    for _ in 0..1000 {
        if counter.load(Ordering::SeqCst) >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("the fake enclave did not see {n} requests");
}

// ---------------------------------------------------------------------------------------------
// 413, 415.

#[tokio::test]
async fn status_413_too_large_for_a_body_over_the_limit() {
    let api = Setup::new(always(None)).start().await;
    let body = format!(r#"{{"request": "{}"}}"#, "A".repeat(MAX_BODY));
    api.post_json("/v1/admin", body).await.assert_error(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
        None,
    );
}

#[tokio::test]
async fn status_413_too_large_from_the_enclave() {
    let api = Setup::new(always(error(ErrorCode::TooLarge, "too many")))
        .start()
        .await;
    api.post_json("/v1/admin", ADMIN_BODY).await.assert_error(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
        None,
    );
}

#[tokio::test]
async fn status_415_unsupported_media_type_for_a_body_that_is_not_json() {
    let api = Setup::new(always(None)).start().await;
    api.request(
        HttpRequest::post("/v1/admin")
            .header(header::CONTENT_TYPE, "text/plain")
            .body(Body::from(ADMIN_BODY))
            .unwrap(),
    )
    .await
    .assert_error(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        None,
    );
}

// ---------------------------------------------------------------------------------------------
// Attestation: 200, 422 attestation_refused, 502 upstream.

/// A stored log registering servers `ok`, `refused` and `broken` at `endpoint/{id}`: entries
/// the host's registry reads (it checks no signature; the enclave does).
fn registrations(endpoint: &str) -> Vec<Vec<u8>> {
    let key = SigningKey::from_bytes(&[7; 32]);
    let kid = KeyId::of(&key.verifying_key());
    let mut prev = EntryHash::ZERO;
    ["ok", "refused", "broken"]
        .iter()
        .zip(0u64..)
        .map(|(id, seq)| {
            let request = AdminRequest {
                time: UnixMillis::from_millis(1),
                nonce: [u8::try_from(seq).unwrap(); 16],
                deployment: Deployment {
                    origin: "attestplane.test/log".into(),
                    genesis: EntryHash::ZERO,
                },
                action: AdminAction::RegisterServer(ServerSpec {
                    id: (*id).into(),
                    name: (*id).into(),
                    tenant: "acme".into(),
                    resource: format!("https://{id}.example"),
                    endpoint: format!("{endpoint}/{id}"),
                    pcrs: [(PcrIndex::IMAGE, PcrHex(Pcr::new([1; 48])))].into(),
                    allow_debug: false,
                    max_attestation_age_ms: 60_000,
                    tools: BTreeMap::new(),
                    assurance: attestplane_verifier::admin::Assurance::Nitro,
                    prices: Default::default(),
                    client_requests: Default::default(),
                }),
            }
            .sign(&key.verifying_key(), &key)
            .unwrap();
            let bytes = Entry {
                seq,
                prev,
                epoch: 0,
                time: UnixMillis::from_millis(2),
                event: Event::Admin {
                    request,
                    accepted: true,
                    reason: None,
                },
            }
            .sign(&kid, &key)
            .unwrap();
            prev = EntryHash::of(&bytes);
            bytes
        })
        .collect()
}

/// An MCP server's attestation endpoint on loopback: `/ok` and `/refused` serve the nonce back
/// as the document, `/broken` answers 500.
async fn attestation_server() -> String {
    use axum::extract::Query;
    use axum::routing::get;
    let serve = |query: Query<BTreeMap<String, String>>| async move {
        hex::decode(query.0.get("nonce").cloned().unwrap_or_default()).unwrap()
    };
    let app = Router::new()
        .route("/ok/attestation", get(serve))
        .route("/refused/attestation", get(serve))
        .route(
            "/broken/attestation",
            get(|| async { StatusCode::INTERNAL_SERVER_ERROR }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{address}")
}

#[tokio::test]
async fn attest_fetches_from_the_registered_endpoint_and_maps_the_verdict() {
    let endpoint = attestation_server().await;
    let mut setup = Setup::new(|r| match r {
        Request::AttestChallenge { .. } => Some(Response::Challenge {
            nonce: ByteBuf::from(vec![0xab; 32]),
            expires_at_ms: 0,
        }),
        // The document the server served is the nonce it was asked for.
        Request::AttestEvidence {
            server_id,
            nonce,
            document,
        } if document == nonce => Some(Response::AttestResult {
            verified: server_id == "ok",
            seq: 20,
            measurement: (server_id == "ok").then(|| "ab".repeat(48)),
            reason: (server_id != "ok").then(|| "PCR0 mismatch".into()),
        }),
        _ => error(ErrorCode::Internal, "unexpected request"),
    });
    setup.stored = registrations(&endpoint);

    let api = setup.start().await;

    let answer = api.post("/v1/servers/ok/attest").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(
        answer.json(),
        json!({"verified": true, "seq": 20, "measurement": "ab".repeat(48)})
    );
    let answer = api.post("/v1/servers/refused/attest").await;
    answer.assert_error(
        StatusCode::UNPROCESSABLE_ENTITY,
        "attestation_refused",
        Some(20),
    );
    assert_eq!(answer.json()["error"]["message"], "PCR0 mismatch");
    api.post("/v1/servers/broken/attest").await.assert_error(
        StatusCode::BAD_GATEWAY,
        "upstream",
        None,
    );
}

// ---------------------------------------------------------------------------------------------
// 503 not_ready / overloaded / enclave_unavailable / not_serving; 504 timeout; 500 internal.

#[tokio::test]
async fn status_503_not_ready_and_overloaded_from_the_enclave() {
    let api = Setup::new(|r| match r {
        Request::Discover { .. } => error(ErrorCode::NotReady, "replaying"),
        _ => error(ErrorCode::Overloaded, "shedding load"),
    })
    .start()
    .await;
    let unavailable = StatusCode::SERVICE_UNAVAILABLE;
    api.agent_get("/v1/servers")
        .await
        .assert_error(unavailable, "not_ready", None);
    let answer = api.post_json("/v1/admin", ADMIN_BODY).await;
    answer.assert_error(unavailable, "overloaded", None);
    assert_eq!(answer.retry_after(), Some("1"));
}

#[tokio::test]
async fn status_503_overloaded_beyond_the_in_flight_limit_but_operations_still_answer() {
    // The enclave never answers: the one admitted request holds the only slot.
    let requests = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&requests);
    let mut setup = Setup::new(move |_| {
        seen.fetch_add(1, Ordering::SeqCst);
        None
    });
    setup.max_in_flight = 1;
    setup.request_timeout = Duration::from_secs(2);
    let api = Arc::new(setup.start().await);
    let held = tokio::spawn({
        let api = Arc::clone(&api);
        async move { api.agent_get("/v1/servers").await.status }
    });
    wait_for(&requests, 1).await;
    let answer = api.get("/v1/log/head").await;
    answer.assert_error(StatusCode::SERVICE_UNAVAILABLE, "overloaded", None);
    assert_eq!(answer.retry_after(), Some("1"));
    assert_eq!(api.get("/healthz").await.status, StatusCode::OK);
    assert_eq!(api.get("/readyz").await.status, StatusCode::OK);
    assert_eq!(held.await.unwrap(), StatusCode::GATEWAY_TIMEOUT);
}

#[tokio::test]
async fn status_503_enclave_unavailable_when_no_enclave_listens() {
    let mut setup = Setup::new(always(None));
    setup.no_enclave = true;
    let api = setup.start().await;
    let answer = api.agent_get("/v1/servers").await;
    answer.assert_error(StatusCode::SERVICE_UNAVAILABLE, "enclave_unavailable", None);
    assert_eq!(answer.retry_after(), Some("1"));
    let answer = api.get("/readyz").await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.text(), "connecting to the enclave\n");
}

#[tokio::test]
async fn status_503_not_serving_when_the_enclave_is_ahead_of_the_store() {
    let mut setup = Setup::new(always(None));
    setup.head_seq = Some(Some(10));
    let api = setup.start().await;
    let mut answer = api.agent_get("/v1/servers").await;
    for _ in 0..100 {
        if answer.json()["error"]["code"] == "not_serving" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        answer = api.agent_get("/v1/servers").await;
    }
    answer.assert_error(StatusCode::SERVICE_UNAVAILABLE, "not_serving", None);
    let answer = api.get("/readyz").await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        answer.text().starts_with("not serving: "),
        "{}",
        answer.text()
    );
}

#[tokio::test]
async fn status_504_timeout_when_the_enclave_does_not_answer_in_time() {
    let mut setup = Setup::new(always(None));
    setup.request_timeout = Duration::from_millis(200);
    let api = setup.start().await;
    api.agent_get("/v1/servers")
        .await
        .assert_error(StatusCode::GATEWAY_TIMEOUT, "timeout", None);
}

#[tokio::test]
async fn status_500_internal_for_enclave_failures_and_unexpected_replies() {
    let api = Setup::new(|r| match r {
        Request::Discover { .. } => error(ErrorCode::Internal, "failed"),
        Request::GetAttestation { .. } => Some(Response::Attestation {
            document: ByteBuf::from(vec![1]),
            jwks: "not json".into(),
        }),
        // A reply of the wrong kind.
        _ => Some(Response::Ack),
    })
    .start()
    .await;
    let internal = StatusCode::INTERNAL_SERVER_ERROR;
    api.agent_get("/v1/servers")
        .await
        .assert_error(internal, "internal", None);
    api.post_json("/v1/admin", ADMIN_BODY)
        .await
        .assert_error(internal, "internal", None);
    api.get("/v1/attestation")
        .await
        .assert_error(internal, "internal", None);
}

// ---------------------------------------------------------------------------------------------
// A final reply held for durability (protocol version 2).

/// The enclave sends a handle at once, held until entry 0 is durable; the HTTP request stays
/// pending while entry 0 is not in the store, and is answered once another request's `Persist`
/// has stored it. The `Persist` request itself never gets a final reply: 504.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handle_held_for_an_entry_is_answered_only_once_the_entry_is_durable() {
    let mut setup = Setup::new(|request| match request {
        Request::Resolve { .. } => Some(Response::Held {
            through_seq: 0,
            reply: Box::new(Response::Handle {
                token: "handle-jwt".into(),
                seq: 0,
                expires_at: 1_764_870_000,
            }),
        }),
        Request::Admin { .. } => Some(Response::Persist {
            first_seq: 0,
            entries: vec![ByteBuf::from(b"entry 0".to_vec())],
        }),
        _ => error(ErrorCode::Internal, "unexpected request"),
    });
    setup.request_timeout = Duration::from_secs(3);
    let api = Arc::new(setup.start().await);
    let handle = tokio::spawn({
        let api = Arc::clone(&api);
        async move {
            let answer = api.post("/v1/servers/s1/handle").await;
            // The entry is on disk by the time the client sees its handle.
            (answer.status, answer.json(), api.store.len())
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!handle.is_finished(), "answered before entry 0 was stored");
    assert_eq!(api.store.len(), 0);

    let admin = tokio::spawn({
        let api = Arc::clone(&api);
        async move { api.post_json("/v1/admin", ADMIN_BODY).await.status }
    });
    let (status, body, stored) = tokio::time::timeout(Duration::from_secs(2), handle)
        .await
        .expect("not answered once entry 0 was durable")
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({"token": "handle-jwt", "seq": 0, "expires_at": 1_764_870_000u64})
    );
    assert_eq!(stored, 1);
    assert_eq!(admin.await.unwrap(), StatusCode::GATEWAY_TIMEOUT);
}

/// A handle held for an entry that never reaches the store is never answered: the request
/// times out (504), and no handle leaves the proxy.
#[tokio::test]
async fn a_handle_held_for_an_entry_never_stored_is_never_answered() {
    let mut setup = Setup::new(always(Some(Response::Held {
        through_seq: 5,
        reply: Box::new(Response::Handle {
            token: "handle-jwt".into(),
            seq: 5,
            expires_at: 1_764_870_000,
        }),
    })));
    setup.request_timeout = Duration::from_millis(500);
    let api = setup.start().await;
    let answer = api.post("/v1/servers/s1/handle").await;
    assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(!answer.text().contains("handle-jwt"), "{}", answer.text());
}
