//! The rmcp crate's client (3.x), unmodified, through the gateway in both protocol eras: the
//! legacy `initialize` handshake and the modern `server/discover` lifecycle. Upstreams: the
//! Rust demo server (which refuses any call without a valid receipt, checked with the control
//! plane's attested key) and, when the PyPI peers are installed, PyPI `mcp` SDK servers (one
//! that speaks both eras, one legacy-only).

mod peers_support;

use std::time::Duration;

use attestplane_tests::DevStack;
use peers_support::{PyServers, gateway_url, mint_token, register_pinned, stats};
use rmcp::model::{CallToolRequestParams, ClientConfig, ProtocolVersion};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::{ClientLifecycleMode, ClientServiceExt as _};
use serde_json::{Value, json};

/// What one rmcp session saw.
#[derive(Debug)]
struct Seen {
    version: Option<String>,
    tools: Vec<String>,
    calls: Vec<Result<String, String>>,
}

async fn session(url: &str, token: &str, modern: bool, calls: &[(&str, Value)]) -> Seen {
    let transport = StreamableHttpClientTransport::from_config(
        StreamableHttpClientTransportConfig::with_uri(url.to_owned()).auth_header(token),
    );
    let lifecycle = if modern {
        ClientLifecycleMode::Discover {
            preferred_versions: vec![ProtocolVersion::V_2026_07_28],
        }
    } else {
        ClientLifecycleMode::Initialize
    };
    let client = ClientConfig::default()
        .serve_with_lifecycle(transport, lifecycle)
        .await
        .unwrap_or_else(|e| panic!("rmcp could not start a session at {url}: {e}"));
    let version = client
        .peer_info()
        .and_then(|info| serde_json::to_value(&*info).ok())
        .and_then(|v| v["protocolVersion"].as_str().map(str::to_owned));
    let mut tools: Vec<String> = client
        .list_all_tools()
        .await
        .unwrap_or_else(|e| panic!("tools/list at {url}: {e}"))
        .into_iter()
        .map(|t| t.name.to_string())
        .collect();
    tools.sort();
    let mut results = Vec::new();
    for (name, arguments) in calls {
        let Value::Object(arguments) = arguments.clone() else {
            panic!("arguments must be an object");
        };
        let params = CallToolRequestParams::new((*name).to_owned()).with_arguments(arguments);
        let outcome = match client.call_tool(params).await {
            Ok(result) => {
                let v = serde_json::to_value(&result).unwrap_or_default();
                let text = v["content"]
                    .as_array()
                    .map(|c| {
                        c.iter()
                            .filter_map(|c| c["text"].as_str())
                            .collect::<Vec<_>>()
                            .join(" ")
                    })
                    .unwrap_or_default();
                if v["isError"] == true {
                    Err(format!("tool error: {text}"))
                } else {
                    Ok(text)
                }
            }
            Err(e) => Err(e.to_string()),
        };
        results.push(outcome);
    }
    let _ = client.cancel().await;
    Seen {
        version,
        tools,
        calls: results,
    }
}

/// An endpoint id, an allowed call, its expected text, the tools expected in the listing
/// (`None`: the call's tool is among them).
type Target = (
    String,
    (&'static str, Value),
    &'static str,
    Option<Vec<&'static str>>,
);

#[test]
fn rmcp_client_in_both_eras_through_the_gateway_to_the_demo_and_python_servers() {
    let python = peers_support::python();
    let mut stack = DevStack::start();
    let gateway = gateway_url(&stack);
    let runtime = peers_support::runtime();
    stack.files.register_and_attest_weather(&stack.demo_url);
    let mut targets: Vec<Target> = vec![(
        "weather".into(),
        ("forecast", json!({"city": "Oslo"})),
        "Oslo",
        None,
    )];
    let py = python
        .as_ref()
        .map(|p| PyServers::start(p, &["stateful-sse", "legacy-stateless-json"]));
    if let Some(py) = &py {
        for shape in ["stateful-sse", "legacy-stateless-json"] {
            register_pinned(&stack, &runtime, shape, py.addr(shape), &["add", "weather"]);
            targets.push((
                shape.into(),
                ("add", json!({"a": 40, "b": 2})),
                "42",
                Some(vec!["add", "weather"]),
            ));
        }
    }
    for (id, (tool, arguments), want, tools) in &targets {
        let endpoint = format!("{gateway}/mcp/{id}");
        let user = mint_token(&stack, &endpoint, "tool-user", &format!("{id}.jwt"));
        let viewer = mint_token(&stack, &endpoint, "viewer", &format!("{id}-viewer.jwt"));
        for modern in [false, true] {
            let what = format!("{id}, modern: {modern}");
            let seen = runtime.block_on(session(
                &endpoint,
                &user,
                modern,
                &[(tool, arguments.clone()), ("convert", json!({}))],
            ));
            let version = if modern { "2026-07-28" } else { "2025-11-25" };
            assert_eq!(seen.version.as_deref(), Some(version), "{what}: {seen:?}");
            match tools {
                Some(t) => assert_eq!(&seen.tools, t, "{what}: {seen:?}"),
                None => assert!(seen.tools.iter().any(|t| t == tool), "{what}: {seen:?}"),
            }
            let text = seen.calls[0]
                .as_ref()
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert!(text.contains(want), "{what}: {seen:?}");
            // Not pinned (or not there at all): refused by the gateway.
            assert!(seen.calls[1].is_err(), "{what}: {seen:?}");
            let seen = runtime.block_on(session(
                &endpoint,
                &viewer,
                modern,
                &[(tool, arguments.clone())],
            ));
            assert!(seen.tools.is_empty(), "{what}: {seen:?}");
            let refused = seen.calls[0]
                .as_ref()
                .expect_err("a viewer's call is denied");
            assert!(refused.contains("call refused"), "{what}: {refused}");
        }
    }
    // The demo server ran exactly the two allowed calls, each with a receipt it verified (it
    // refuses a call without one).
    let (status, body) = attestplane_tests::http_get(&format!("{}/calls", stack.demo_url)).unwrap();
    assert_eq!(status, 200);
    assert_eq!(String::from_utf8_lossy(&body).trim(), "2");
    if let Some(py) = &py {
        for shape in ["stateful-sse", "legacy-stateless-json"] {
            let s = stats(&runtime, py.addr(shape));
            assert_eq!(s["calls"], json!({"add": 2}), "{shape}: {s}");
            assert_eq!(s["receipt_header"], 2, "{shape}: {s}");
        }
    }
    let (ok, _) = stack.stop(Duration::from_secs(20));
    assert!(ok);
}
