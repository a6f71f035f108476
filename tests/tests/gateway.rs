//! The MCP data path through the real binaries: `attestplane dev` (enclave with its gateway,
//! host relays, demo server), an agent speaking streamable HTTP to the relay, the demo server
//! checking each call's receipt with the control plane's attested key, and the exported log
//! verified by `attestplane-verify`.

use std::time::Duration;

use attestplane_tests::DevStack;

const MODERN: &str = "2026-07-28";

fn gateway_url(stack: &DevStack) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(addr) = stack.proc.stdout_lines().iter().find_map(|l| {
            l.strip_prefix("attestplane MCP relay: tcp:")
                .map(str::to_owned)
        }) {
            return format!("http://{}", addr.trim());
        }
        assert!(
            std::time::Instant::now() < deadline,
            "attestplane dev printed no MCP relay address"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn post(
    client: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    let mut req = client
        .post(url)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", MODERN)
        .header("mcp-method", v["method"].as_str().unwrap());
    if let Some(n) = v["params"]["name"].as_str() {
        req = req.header("mcp-name", n);
    }
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.body(body.to_owned()).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

fn call(tool: &str, args: &str) -> String {
    format!(
        r#"{{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{{"name":"{tool}","arguments":{args},"_meta":{{"io.modelcontextprotocol/protocolVersion":"{MODERN}"}}}}}}"#
    )
}

#[test]
fn agent_calls_through_the_enclave_and_the_server_accepts_only_receipted_calls() {
    let mut stack = DevStack::start();
    let gateway = gateway_url(&stack);
    stack.files.register_and_attest_weather(&stack.demo_url);
    let endpoint = format!("{gateway}/mcp/weather");
    let token = stack
        .files
        .mint_agent_token_for(Some(&endpoint), "agent-mcp.jwt");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let calls_at_server = |rt: &tokio::runtime::Runtime| -> u64 {
        rt.block_on(async {
            client
                .get(format!("{}/calls", stack.demo_url))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        })
    };

    runtime.block_on(async {
        // The pinned tool is listed.
        let list = format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{{"_meta":{{"io.modelcontextprotocol/protocolVersion":"{MODERN}"}}}}}}"#
        );
        let (status, body) = post(&client, &endpoint, Some(&token), &list).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("\"forecast\""), "{body}");
        // An allowed call runs at the server, with a receipt.
        let (status, body) = post(&client, &endpoint, Some(&token), &call("forecast", r#"{"city":"Oslo"}"#)).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("\"result\""), "{body}");
        // No token: 401 with the resource metadata.
        let (status, _) = post(&client, &endpoint, None, &list).await;
        assert_eq!(status, 401);
    });
    assert_eq!(calls_at_server(&runtime), 1);

    // Straight to the server, skipping the control plane: no receipt, refused, never run.
    runtime.block_on(async {
        let direct = format!("{}/mcp", stack.demo_url);
        let (status, body) = post(
            &client,
            &direct,
            None,
            &call("forecast", r#"{"city":"Oslo"}"#),
        )
        .await;
        assert_eq!(status, 401, "{body}");
        assert!(body.contains("receipt"), "{body}");
    });
    assert_eq!(
        calls_at_server(&runtime),
        1,
        "the unreceipted call never ran"
    );

    // The log, gateway entries included, verifies as an auditor runs it.
    let (log, checkpoint) = stack.files.export("gateway.cbor");
    let (ran, json) = stack.files.verify_log(&log, Some(&checkpoint));
    assert_eq!(ran.code, Some(0), "{json}");
    let (ok, _) = stack.stop(Duration::from_secs(20));
    assert!(ok);
}

// ---- gwsafe: the must-nots of issue 10 that need the real binaries (the entry size limit of
// the host's store, the auditor's CLI) ----

/// A booted dev stack with `weather` registered and attested, the policy set to the starter
/// set plus `extra`, a runtime and an HTTP client, and the agent's token for the endpoint.
struct Walk {
    stack: DevStack,
    endpoint: String,
    token: String,
    runtime: tokio::runtime::Runtime,
    client: reqwest::Client,
}

impl Walk {
    fn start(extra_policy: &str) -> Walk {
        let stack = DevStack::start();
        let gateway = gateway_url(&stack);
        stack.files.register_and_attest_weather(&stack.demo_url);
        if !extra_policy.is_empty() {
            let starter = std::fs::read_to_string(attestplane_tests::starter_policy_path())
                .expect("the starter policy");
            let path = stack.files.path("policy.cedar");
            std::fs::write(&path, format!("{starter}\n{extra_policy}\n")).unwrap();
            stack
                .files
                .cli(&["policy", "set", &path.display().to_string()])
                .ok();
        }
        let endpoint = format!("{gateway}/mcp/weather");
        let token = stack
            .files
            .mint_agent_token_for(Some(&endpoint), "agent-mcp.jwt");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        Walk {
            stack,
            endpoint,
            token,
            runtime,
            client,
        }
    }

    fn post(&self, body: &str) -> (u16, String) {
        self.runtime
            .block_on(post(&self.client, &self.endpoint, Some(&self.token), body))
    }

    /// Exports the log and runs `attestplane-verify log` on it: the verifier's JSON, after
    /// asserting it exited 0.
    fn verified_log(&self, name: &str) -> serde_json::Value {
        let (log, checkpoint) = self.stack.files.export(name);
        let (ran, json) = self.stack.files.verify_log(&log, Some(&checkpoint));
        assert_eq!(ran.code, Some(0), "{json}");
        json
    }
}

/// The JSON-RPC error code of an answer.
fn error_code(body: &str) -> Option<i64> {
    serde_json::from_str::<serde_json::Value>(body).ok()?["error"]["code"].as_i64()
}

#[test]
fn declared_arguments_whose_logged_projection_outgrows_an_entry_get_invalid_params() {
    // A policy that reads `city`: the decision entry records the projection of the call's
    // arguments on what the set declares, in canonical JSON. A declared member of the wrong
    // type keeps its value (the call is denied for it), and canonical numbers can be longer
    // than the agent's spelling (`1e15` is `1000000000000000`): 350 kB of arguments would
    // make a decision entry over the store's entry limit (the old code never answered it).
    let w = Walk::start(
        "@id(\"no-atlantis\")\n@arguments(\"city: String\")\nforbid (principal, action == Attestplane::Action::\"call\", resource)\nwhen { context.arguments has city && context.arguments.city == \"Atlantis\" };",
    );
    let head_before = attestplane_tests::log_head(&w.stack.url).0;
    let numbers = vec!["1e15"; 70_000].join(",");
    let (status, body) = w.post(&call("forecast", &format!(r#"{{"city":[{numbers}]}}"#)));
    let short = &body[..body.len().min(300)];
    assert_eq!(status, 400, "{short}");
    assert_eq!(error_code(&body), Some(-32602), "{short}");
    assert!(body.contains("projection"), "{short}");
    // Nothing was written for it: the log's head did not move.
    assert_eq!(attestplane_tests::log_head(&w.stack.url).0, head_before);
    // The most the gateway reads (1 MiB) as one declared string: its decision entry would
    // have been a few bytes under the entry limit; over the projection bound, refused the
    // same way.
    let frame = call("forecast", r#"{"city":""}"#).len();
    let city = "x".repeat(1024 * 1024 - frame);
    let (status, body) = w.post(&call("forecast", &format!(r#"{{"city":"{city}"}}"#)));
    let short = &body[..body.len().min(300)];
    assert_eq!(status, 400, "{short}");
    assert_eq!(error_code(&body), Some(-32602), "{short}");
    assert_eq!(attestplane_tests::log_head(&w.stack.url).0, head_before);
    // The stack serves on: an ordinary call goes through, and the log verifies.
    let (status, body) = w.post(&call("forecast", r#"{"city":"Oslo"}"#));
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"result\""), "{body}");
    w.verified_log("projection.cbor");
}
