//! Issue 4's acceptance: bad input at every endpoint of the proxy (malformed JSON, oversized
//! body, wrong content type, unsigned, badly signed, foreign-signed or replayed admin requests,
//! missing / malformed / expired / foreign JWTs, unknown servers, bad query parameters) gets the
//! documented 4xx status and error code (docs/http-api.md), and nothing is written to the log
//! but the refusal itself when the enclave logs it (`seq` in the error, and the log grew by
//! exactly that one entry, compared with `/v1/log/head` before and after).

use std::time::{Duration, SystemTime};

use attestplane_tests::{DEV_AUDIENCE, DEV_ISSUER, DEV_ORIGIN, DevStack, genesis_hash, log_head};
use attestplane_verifier::UnixMillis;
use attestplane_verifier::admin::{AdminAction, AdminRequest, Deployment};
use attestplane_verifier::handle::IdentityClaims;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::SigningKey;
use serde_json::{Value, json};

/// What a request must get.
#[derive(Debug, Clone, Copy)]
enum Logged {
    /// Refused without writing anything.
    No,
    /// Refused with a log entry named by `seq` (the only entry written).
    Yes,
    /// Either, consistently with `seq` (the contract leaves it to the enclave: attesting an
    /// unknown server is refused before any challenge, unlogged).
    Either,
}

struct Api {
    url: String,
    http: reqwest::Client,
}

impl Api {
    async fn send(&self, req: reqwest::RequestBuilder) -> (u16, Value) {
        let resp = req
            .timeout(Duration::from_secs(20))
            .send()
            .await
            .unwrap_or_else(|e| panic!("request failed: {e}"));
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.unwrap_or_default();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (status, body)
    }

    /// Sends `req` and checks the status, the error code and what was written.
    async fn expect(
        &self,
        what: &str,
        req: reqwest::RequestBuilder,
        status: u16,
        code: &str,
        logged: Logged,
    ) {
        let (before, _) = log_head(&self.url);
        let (got, body) = self.send(req).await;
        let (after, _) = log_head(&self.url);
        assert_eq!(got, status, "{what}: status; body {body}");
        assert_eq!(
            body["error"]["code"], code,
            "{what}: error code; body {body}"
        );
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{what}: no message: {body}"
        );
        let seq = body["error"]["seq"].as_u64();
        eprintln!("{what}: {got} {code} seq {seq:?}");
        let logged = match logged {
            Logged::Either => seq.is_some(),
            Logged::Yes => true,
            Logged::No => false,
        };
        if logged {
            assert_eq!(seq, Some(before), "{what}: the refusal's seq; body {body}");
            assert_eq!(
                after,
                before + 1,
                "{what}: more than the refusal was written"
            );
        } else {
            assert_eq!(seq, None, "{what}: a seq on an unlogged refusal: {body}");
            assert_eq!(after, before, "{what}: something was written");
        }
    }

    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.post(format!("{}{path}", self.url))
    }

    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.get(format!("{}{path}", self.url))
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An EdDSA agent JWT with the claims `token mint` writes.
fn jwt(key: &SigningKey, issuer: &str, iat: u64, exp: u64) -> String {
    IdentityClaims {
        iss: issuer.into(),
        aud: DEV_AUDIENCE.into(),
        sub: "agent-7".into(),
        user: Some("alice".into()),
        tenant: "acme".into(),
        roles: vec!["tool-user".into()],
        iat: Some(iat),
        exp,
    }
    .encode("dev", key)
    .unwrap()
}

fn read_key(path: &std::path::Path) -> SigningKey {
    let text = std::fs::read_to_string(path).unwrap();
    let mut secret = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut secret)
        .unwrap_or_else(|e| panic!("{}: not a hex ed25519 secret: {e}", path.display()));
    SigningKey::from_bytes(&secret)
}

fn admin_request(key: &SigningKey, nonce: u8, deployment: &Deployment) -> Vec<u8> {
    let policy = std::fs::read_to_string(attestplane_tests::starter_policy_path()).unwrap();
    AdminRequest {
        time: UnixMillis::from_system_time(SystemTime::now()),
        nonce: [nonce; 16],
        deployment: deployment.clone(),
        action: AdminAction::SetPolicy { text: policy },
    }
    .sign(&key.verifying_key(), key)
    .unwrap()
}

fn admin_body(bytes: &[u8]) -> String {
    json!({ "request": STANDARD.encode(bytes) }).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_documented_4xx_and_writes_only_logged_refusals() {
    let stack = DevStack::start();
    let files = &stack.files;
    files.register_and_attest_weather(&stack.demo_url);
    let token = files.mint_agent_token();
    let api = Api {
        url: stack.url.clone(),
        http: reqwest::Client::new(),
    };
    let admin = read_key(&files.path("admin.key"));
    let deployment = Deployment {
        origin: DEV_ORIGIN.into(),
        genesis: genesis_hash(&stack.url),
    };
    let idp = read_key(&files.path("idp.key"));
    let json_ct = ("content-type", "application/json");
    let now = now_secs();

    // --- POST /v1/admin
    api.expect(
        "admin: malformed JSON",
        api.post("/v1/admin")
            .header(json_ct.0, json_ct.1)
            .body("{\"request\":"),
        400,
        "bad_request",
        Logged::No,
    )
    .await;
    api.expect(
        "admin: JSON of the wrong shape",
        api.post("/v1/admin")
            .header(json_ct.0, json_ct.1)
            .body("{\"req\": 1}"),
        400,
        "bad_request",
        Logged::No,
    )
    .await;
    api.expect(
        "admin: not base64",
        api.post("/v1/admin")
            .header(json_ct.0, json_ct.1)
            .body("{\"request\": \"@@@\"}"),
        400,
        "bad_request",
        Logged::No,
    )
    .await;
    api.expect(
        "admin: wrong content type",
        api.post("/v1/admin")
            .header("content-type", "text/plain")
            .body(admin_body(&admin_request(&admin, 1, &deployment))),
        415,
        "unsupported_media_type",
        Logged::No,
    )
    .await;
    api.expect(
        "admin: no content type",
        api.post("/v1/admin")
            .body(admin_body(&admin_request(&admin, 2, &deployment))),
        415,
        "unsupported_media_type",
        Logged::No,
    )
    .await;
    let big = json!({ "request": STANDARD.encode(vec![0u8; 300 * 1024]) }).to_string();
    api.expect(
        "admin: oversized body",
        api.post("/v1/admin").header(json_ct.0, json_ct.1).body(big),
        413,
        "too_large",
        Logged::No,
    )
    .await;
    api.expect(
        "admin: unsigned bytes",
        api.post("/v1/admin")
            .header(json_ct.0, json_ct.1)
            .body(admin_body(b"not a signed admin request")),
        400,
        "bad_request",
        Logged::No,
    )
    .await;
    let mut bad_sig = admin_request(&admin, 3, &deployment);
    let last = bad_sig.len() - 1;
    bad_sig[last] ^= 1;
    api.expect(
        "admin: bad signature",
        api.post("/v1/admin")
            .header(json_ct.0, json_ct.1)
            .body(admin_body(&bad_sig)),
        403,
        "admin_refused",
        Logged::Yes,
    )
    .await;
    let stranger = SigningKey::from_bytes(&[7; 32]);
    api.expect(
        "admin: unknown key",
        api.post("/v1/admin")
            .header(json_ct.0, json_ct.1)
            .body(admin_body(&admin_request(&stranger, 4, &deployment))),
        403,
        "admin_refused",
        Logged::Yes,
    )
    .await;
    let once = admin_request(&admin, 5, &deployment);
    let (before, _) = log_head(&api.url);
    let (status, body) = api
        .send(
            api.post("/v1/admin")
                .header(json_ct.0, json_ct.1)
                .body(admin_body(&once)),
        )
        .await;
    assert_eq!(
        (status, &body["accepted"]),
        (200, &json!(true)),
        "the first submission: {body}"
    );
    assert_eq!(body["seq"], before, "{body}");
    api.expect(
        "admin: replayed request",
        api.post("/v1/admin")
            .header(json_ct.0, json_ct.1)
            .body(admin_body(&once)),
        403,
        "admin_refused",
        Logged::Yes,
    )
    .await;

    // --- Agent endpoints: bearer JWTs.
    let expired = jwt(&idp, DEV_ISSUER, now - 7200, now - 3600);
    let foreign = jwt(&stranger, DEV_ISSUER, now, now + 3600);
    let other_issuer = jwt(&idp, "https://other-idp.example", now, now + 3600);
    let bearers: [(&str, Option<String>); 6] = [
        ("no token", None),
        ("malformed token", Some("Bearer not.a.jwt".into())),
        ("not a bearer", Some(format!("Basic {token}"))),
        ("expired token", Some(format!("Bearer {expired}"))),
        ("foreign-signed token", Some(format!("Bearer {foreign}"))),
        (
            "token of an unknown issuer",
            Some(format!("Bearer {other_issuer}")),
        ),
    ];
    for (what, auth) in &bearers {
        let with = |req: reqwest::RequestBuilder| match auth {
            Some(a) => req.header("authorization", a),
            None => req,
        };
        api.expect(
            &format!("servers: {what}"),
            with(api.get("/v1/servers")),
            401,
            "unauthenticated",
            Logged::No,
        )
        .await;
        api.expect(
            &format!("handle: {what}"),
            with(api.post("/v1/servers/weather/handle")),
            401,
            "unauthenticated",
            Logged::No,
        )
        .await;
        api.expect(
            &format!("retired authorize: {what}"),
            with(api.post("/v1/servers/weather/tools/forecast/authorize")),
            410,
            "gone",
            Logged::No,
        )
        .await;
    }
    let bearer = format!("Bearer {token}");
    api.expect(
        "handle: unknown server",
        api.post("/v1/servers/nosuch/handle")
            .header("authorization", &bearer),
        404,
        "not_found",
        Logged::Yes,
    )
    .await;
    api.expect(
        "retired authorize: unknown server",
        api.post("/v1/servers/nosuch/tools/forecast/authorize")
            .header("authorization", &bearer),
        410,
        "gone",
        Logged::No,
    )
    .await;

    // --- Operator: attesting an unknown server.
    api.expect(
        "attest: unknown server",
        api.post("/v1/servers/nosuch/attest"),
        404,
        "not_found",
        Logged::Either,
    )
    .await;

    // --- Auditor endpoints: bad query parameters.
    let long_nonce = "ab".repeat(513);
    for (what, path) in [
        (
            "attestation: nonce not hex",
            "/v1/attestation?nonce=zz".to_owned(),
        ),
        (
            "attestation: nonce over 512 bytes",
            format!("/v1/attestation?nonce={long_nonce}"),
        ),
        (
            "entries: start not a number",
            "/v1/log/entries?start=x".to_owned(),
        ),
        (
            "entries: start beyond the size",
            "/v1/log/entries?start=1000000".to_owned(),
        ),
        ("entries: no start", "/v1/log/entries".to_owned()),
        (
            "inclusion: index beyond size",
            "/v1/log/proof/inclusion?index=5&size=2".to_owned(),
        ),
        (
            "inclusion: size beyond the log",
            "/v1/log/proof/inclusion?index=0&size=1000000".to_owned(),
        ),
        (
            "consistency: old after new",
            "/v1/log/proof/consistency?old=5&new=2".to_owned(),
        ),
        (
            "consistency: no parameters",
            "/v1/log/proof/consistency".to_owned(),
        ),
    ] {
        api.expect(what, api.get(&path), 400, "bad_request", Logged::No)
            .await;
    }
    api.expect(
        "unknown route",
        api.get("/v1/nothing-here"),
        404,
        "not_found",
        Logged::No,
    )
    .await;

    // The log is still whole: every refusal above verified as part of it.
    let (log, checkpoint) = files.export("after.cbor");
    let (ran, report) = files.verify_log(&log, Some(&checkpoint));
    assert_eq!(ran.code, Some(0), "{ran}");
    assert_eq!(report["verified"], true);
}
