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
