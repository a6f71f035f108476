//! The demo server's `/mcp` endpoint as an agent uses it: a handle from the control plane
//! (`attestplane handle resolve`) opens `initialize`, `tools/list` and `tools/call`; no handle,
//! the agent's own JWT, an edited handle, or a handle for another resource are refused (401);
//! after the enclave restarts (new epoch key) a new handle still works (the server refetches
//! the JWKS).

use std::time::{Duration, Instant};

use attestplane_tests::{SplitStack, ready_epoch};
use serde_json::{Value, json};

struct Mcp {
    url: String,
    http: reqwest::Client,
}

impl Mcp {
    async fn call(&self, bearer: Option<&str>, body: Value) -> (u16, Value) {
        let mut req = self
            .http
            .post(&self.url)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .timeout(Duration::from_secs(10))
            .body(body.to_string());
        if let Some(b) = bearer {
            req = req.bearer_auth(b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.json().await.unwrap_or(Value::Null);
        (status, body)
    }
}

fn resolve(stack: &SplitStack, server: &str) -> String {
    let out = stack.files.path(&format!("{server}.handle"));
    let _ = std::fs::remove_file(&out);
    stack
        .files
        .cli(&[
            "handle",
            "resolve",
            server,
            "--out",
            &out.display().to_string(),
        ])
        .ok();
    std::fs::read_to_string(&out).unwrap().trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_accepts_only_handles_for_its_resource() {
    let mut stack = tokio::task::block_in_place(SplitStack::start);
    tokio::task::block_in_place(|| stack.restart_demo_for_mcp());
    let agent_jwt = tokio::task::block_in_place(|| stack.files.mint_agent_token());
    let handle = tokio::task::block_in_place(|| resolve(&stack, "weather"));
    let mcp = Mcp {
        url: format!("{}/mcp", stack.demo_url),
        http: reqwest::Client::new(),
    };

    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                   "clientInfo": {"name": "e2e", "version": "0"}}});
    let (status, body) = mcp.call(Some(&handle), init.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"]["protocolVersion"], "2025-06-18", "{body}");

    let (status, body) = mcp
        .call(
            Some(&handle),
            json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"]["tools"][0]["name"], "forecast", "{body}");

    let call = json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
        "params": {"name": "forecast", "arguments": {"city": "Oslo"}}});
    let (status, body) = mcp.call(Some(&handle), call.clone()).await;
    assert_eq!(status, 200, "{body}");
    let text = body["result"]["content"][0]["text"].as_str().unwrap_or("");
    assert!(text.contains("Oslo"), "{body}");

    // Refused: no handle, the agent's own token, an edited handle.
    let mut edited = handle.clone().into_bytes();
    let i = edited.len() / 2;
    edited[i] = if edited[i] == b'A' { b'B' } else { b'A' };
    let edited = String::from_utf8(edited).unwrap();
    for (what, bearer) in [
        ("no handle", None),
        ("the agent's JWT", Some(agent_jwt.as_str())),
        ("an edited handle", Some(edited.as_str())),
    ] {
        let (status, body) = mcp.call(bearer, call.clone()).await;
        assert_eq!(status, 401, "{what}: {body}");
    }

    // A handle the control plane issued for another resource (same server, other audience).
    let other = tokio::task::block_in_place(|| {
        stack.files.register_and_attest(
            "elsewhere",
            "https://elsewhere.example/mcp",
            &stack.demo_url,
        );
        resolve(&stack, "elsewhere")
    });
    let (status, body) = mcp.call(Some(&other), call.clone()).await;
    assert_eq!(status, 401, "a handle for another audience: {body}");

    // A new epoch: new key, new JWKS; a new handle still works.
    tokio::task::block_in_place(|| {
        stack.enclave.as_mut().unwrap().kill();
        stack.start_enclave();
        let deadline = Instant::now() + Duration::from_secs(30);
        while ready_epoch(&stack.url) != Some(1) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(
            ready_epoch(&stack.url),
            Some(1),
            "the restarted enclave did not open epoch 1 within 30 s"
        );
    });
    let handle = tokio::task::block_in_place(|| resolve(&stack, "weather"));
    let (status, body) = mcp.call(Some(&handle), call).await;
    assert_eq!(status, 200, "a handle of the new epoch: {body}");
}
