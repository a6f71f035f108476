//! Real MCP peers, unmodified, through the gateway: the PyPI `mcp` 2.x SDK's client (both
//! eras) and the npm TypeScript SDK's client, against servers built with the PyPI `mcp` SDK
//! (stateful and stateless, JSON and SSE answers, modern and legacy-only) and the npm
//! `@modelcontextprotocol/server-everything` (its streamable HTTP mode). Each test starts the
//! real stack (`attestplane dev`), registers the peer servers with pins computed from their
//! live listings, and checks what the clients see and what reached the servers.
//!
//! The peers are installed by `.ci/run` (pinned: `tests/peers/requirements.txt` into
//! `tests/peers/.venv`, `tests/peers/package-lock.json` with `npm ci`). Locally a test whose
//! peer is not installed prints `SKIP` and returns; under `CI=true` it fails instead.

mod peers_support;

use std::time::Duration;

use attestplane_tests::DevStack;
use peers_support::{
    PyServers, gateway_url, mint_token, node_client, python_client, register_pinned,
    register_plain_with, server_everything, stats,
};
use serde_json::{Value, json};

fn list() -> Value {
    json!({"op": "list"})
}

fn call(name: &str, arguments: Value) -> Value {
    json!({"op": "call", "name": name, "arguments": arguments})
}

fn outcomes(session: &Value) -> &Vec<Value> {
    session["outcomes"]
        .as_array()
        .unwrap_or_else(|| panic!("the client session failed: {session}"))
}

#[test]
fn python_sdk_client_in_both_eras_through_the_gateway_to_python_sdk_servers() {
    let Some(python) = peers_support::python() else {
        return;
    };
    let mut stack = DevStack::start();
    let gateway = gateway_url(&stack);
    let shapes = [
        "stateful-sse",
        "stateless-json",
        "stateful-json",
        "stateless-sse",
        "legacy-stateful-sse",
        "legacy-stateless-json",
    ];
    let servers = PyServers::start(&python, &shapes);
    let runtime = peers_support::runtime();
    let mut sessions = Vec::new();
    let mut expect = Vec::new();
    for shape in shapes {
        // `convert` is left unpinned: the gateway withholds it.
        register_pinned(
            &stack,
            &runtime,
            shape,
            servers.addr(shape),
            &["add", "weather"],
        );
        let endpoint = format!("{gateway}/mcp/{shape}");
        let user = mint_token(&stack, &endpoint, "tool-user", &format!("{shape}.jwt"));
        let viewer = mint_token(&stack, &endpoint, "viewer", &format!("{shape}-viewer.jwt"));
        for mode in ["legacy", "2026-07-28"] {
            sessions.push(json!({
                "url": endpoint, "token": user, "mode": mode,
                "ops": [list(), call("add", json!({"a": 20, "b": 22})), call("convert", json!({"amount": 1, "currency": "USD"}))],
            }));
            expect.push((shape, mode, "tool-user"));
        }
        sessions.push(json!({
            "url": endpoint, "token": viewer, "mode": "2026-07-28",
            "ops": [list(), call("add", json!({"a": 1, "b": 2}))],
        }));
        expect.push((shape, "2026-07-28", "viewer"));
    }
    let answers = python_client(&python, &json!(sessions));
    for ((shape, mode, role), session) in expect.iter().zip(&answers) {
        let what = format!("{shape} via {mode} as {role}: {session}");
        let out = outcomes(session);
        let want_version = if *mode == "legacy" {
            "2025-11-25"
        } else {
            "2026-07-28"
        };
        assert_eq!(session["protocol_version"], want_version, "{what}");
        if *role == "tool-user" {
            assert_eq!(out[0]["tools"], json!(["add", "weather"]), "{what}");
            assert_eq!(out[1]["ok"], true, "{what}");
            assert_eq!(out[1]["text"], "42", "{what}");
            assert_eq!(out[1]["is_error"], false, "{what}");
            assert_eq!(out[2]["ok"], false, "{what}");
            assert!(
                out[2]["error"].as_str().unwrap_or("").contains("withheld"),
                "{what}"
            );
        } else {
            assert_eq!(out[0]["tools"], json!([]), "{what}");
            assert_eq!(out[1]["ok"], false, "{what}");
            assert!(
                out[1]["error"]
                    .as_str()
                    .unwrap_or("")
                    .contains("call refused"),
                "{what}"
            );
        }
    }
    for shape in shapes {
        let s = stats(&runtime, servers.addr(shape));
        // Two allowed calls of `add` per server (one per era), each with its receipt in the
        // header and in `_meta`; the withheld and the denied calls never arrived.
        assert_eq!(s["calls"], json!({"add": 2}), "{shape}: {s}");
        assert_eq!(s["receipt_header"], 2, "{shape}: {s}");
        assert_eq!(s["receipt_meta"], 2, "{shape}: {s}");
    }
    let (log, checkpoint) = stack.files.export("peers.cbor");
    let (ran, out) = stack.files.verify_log(&log, Some(&checkpoint));
    assert_eq!(ran.code, Some(0), "{out}");
    let (ok, _) = stack.stop(Duration::from_secs(20));
    assert!(ok);
}

#[test]
fn rug_pulled_tools_are_withheld_and_their_calls_never_reach_the_server() {
    let Some(python) = peers_support::python() else {
        return;
    };
    let mut stack = DevStack::start();
    let gateway = gateway_url(&stack);
    let servers = PyServers::start(&python, &["stateless-json"]);
    let runtime = peers_support::runtime();
    let upstream = servers.addr("stateless-json");
    register_pinned(
        &stack,
        &runtime,
        "pulled",
        upstream,
        &["add", "weather", "convert"],
    );
    let endpoint = format!("{gateway}/mcp/pulled");
    let token = mint_token(&stack, &endpoint, "tool-user", "pulled.jwt");
    let before = python_client(
        &python,
        &json!([{
            "url": endpoint, "token": token, "mode": "2026-07-28",
            "ops": [list(), call("weather", json!({"city": "Oslo"})), call("convert", json!({"amount": 2, "currency": "USD"}))],
        }]),
    );
    let out = outcomes(&before[0]);
    assert_eq!(
        out[0]["tools"],
        json!(["add", "convert", "weather"]),
        "{before:?}"
    );
    assert_eq!(out[1]["text"], "sunny in Oslo", "{before:?}");
    assert_eq!(out[2]["ok"], true, "{before:?}");
    assert_eq!(
        stats(&runtime, upstream)["calls"],
        json!({"weather": 1, "convert": 1})
    );

    // The server changes `weather`'s description, and `convert`'s by a zero-width space.
    peers_support::rug_pull(&runtime, upstream);
    let after = python_client(
        &python,
        &json!([
            {"url": endpoint, "token": token, "mode": "2026-07-28",
             "ops": [list(), call("weather", json!({"city": "Oslo"})), call("convert", json!({"amount": 2, "currency": "USD"})), call("add", json!({"a": 1, "b": 1}))]},
            {"url": endpoint, "token": token, "mode": "legacy",
             "ops": [list(), call("weather", json!({"city": "Oslo"}))]},
        ]),
    );
    for session in &after {
        let out = outcomes(session);
        assert_eq!(out[0]["tools"], json!(["add"]), "{session}");
        for refused in &out[1..] {
            if refused["text"] == "2" {
                continue; // the untouched `add`
            }
            assert_eq!(refused["ok"], false, "{session}");
            assert!(
                refused["error"].as_str().unwrap_or("").contains("withheld"),
                "{session}"
            );
        }
    }
    assert_eq!(outcomes(&after[0])[3]["text"], "2", "{after:?}");
    // The server's own counter: the refused calls never reached it.
    assert_eq!(
        stats(&runtime, upstream)["calls"],
        json!({"weather": 1, "convert": 1, "add": 1})
    );
    // The drift is in the log, which verifies.
    let (log, checkpoint) = stack.files.export("pulled.cbor");
    let (ran, out) = stack.files.verify_log(&log, Some(&checkpoint));
    assert_eq!(ran.code, Some(0), "{out}");
    assert!(
        String::from_utf8_lossy(&std::fs::read(&log).unwrap()).contains("weather"),
        "the drift entry names the tool"
    );
    let (ok, _) = stack.stop(Duration::from_secs(20));
    assert!(ok);
}

#[test]
fn typescript_sdk_client_through_the_gateway_to_server_everything_and_a_python_server() {
    let Some(node) = peers_support::node() else {
        return;
    };
    let python = peers_support::python();
    let mut stack = DevStack::start();
    let gateway = gateway_url(&stack);
    let runtime = peers_support::runtime();
    let everything = server_everything(&node);
    register_pinned(
        &stack,
        &runtime,
        "everything",
        everything.addr(),
        &["echo", "get-sum"],
    );
    let endpoint = format!("{gateway}/mcp/everything");
    let user = mint_token(&stack, &endpoint, "tool-user", "everything.jwt");
    let viewer = mint_token(&stack, &endpoint, "viewer", "everything-viewer.jwt");
    let mut sessions = vec![
        json!({"url": endpoint, "token": user, "ops": [
            list(),
            call("echo", json!({"message": "hello through the enclave"})),
            call("get-sum", json!({"a": 2, "b": 40})),
            call("get-env", json!({})),
        ]}),
        json!({"url": endpoint, "token": viewer, "ops": [list(), call("echo", json!({"message": "x"}))]}),
    ];
    let py = python
        .as_ref()
        .map(|p| PyServers::start(p, &["stateful-sse"]));
    if let Some(py) = &py {
        register_pinned(
            &stack,
            &runtime,
            "python",
            py.addr("stateful-sse"),
            &["add", "weather"],
        );
        let endpoint = format!("{gateway}/mcp/python");
        let token = mint_token(&stack, &endpoint, "tool-user", "python.jwt");
        sessions.push(json!({"url": endpoint, "token": token, "ops": [list(), call("add", json!({"a": 40, "b": 2}))]}));
    }
    let answers = node_client(&node, &json!(sessions));
    let out = outcomes(&answers[0]);
    assert_eq!(out[0]["tools"], json!(["echo", "get-sum"]), "{answers:?}");
    assert_eq!(
        out[1]["text"], "Echo: hello through the enclave",
        "{answers:?}"
    );
    assert!(
        out[2]["text"].as_str().unwrap_or("").contains("42"),
        "{answers:?}"
    );
    // Unpinned: withheld, its call refused before it could reach the server.
    assert_eq!(out[3]["ok"], false, "{answers:?}");
    assert!(
        out[3]["error"].as_str().unwrap_or("").contains("withheld"),
        "{answers:?}"
    );
    let out = outcomes(&answers[1]);
    assert_eq!(out[0]["tools"], json!([]), "{answers:?}");
    assert!(
        out[1]["error"]
            .as_str()
            .unwrap_or("")
            .contains("call refused"),
        "{answers:?}"
    );
    if let Some(py) = &py {
        let out = outcomes(&answers[2]);
        assert_eq!(out[0]["tools"], json!(["add", "weather"]), "{answers:?}");
        assert_eq!(out[1]["text"], "42", "{answers:?}");
        let s = stats(&runtime, py.addr("stateful-sse"));
        assert_eq!(s["receipt_header"], 1, "{s}");
    }
    // The PyPI client against server-everything too, in both eras (the modern one through a
    // legacy-only upstream).
    if let Some(python) = &python {
        let sessions: Vec<Value> = ["legacy", "2026-07-28"]
            .iter()
            .map(|mode| {
                json!({"url": endpoint, "token": user, "mode": mode, "ops": [
                    list(),
                    call("get-sum", json!({"a": 2, "b": 40})),
                    call("get-env", json!({})),
                ]})
            })
            .collect();
        for session in python_client(python, &json!(sessions)) {
            let out = outcomes(&session);
            assert_eq!(out[0]["tools"], json!(["echo", "get-sum"]), "{session}");
            assert!(
                out[1]["text"].as_str().unwrap_or("").contains("42"),
                "{session}"
            );
            assert!(
                out[2]["error"].as_str().unwrap_or("").contains("withheld"),
                "{session}"
            );
        }
    }
    let (ok, _) = stack.stop(Duration::from_secs(20));
    assert!(ok);
}

#[test]
fn an_announced_rug_pull_refuses_the_next_call_without_waiting_for_a_listing() {
    let Some(python) = peers_support::python() else {
        return;
    };
    let mut stack = DevStack::start();
    let gateway = gateway_url(&stack);
    let servers = PyServers::start(&python, &["stateful-sse"]);
    let runtime = peers_support::runtime();
    let upstream = servers.addr("stateful-sse");
    register_pinned(&stack, &runtime, "announced", upstream, &["add", "weather"]);
    let endpoint = format!("{gateway}/mcp/announced");
    let token = mint_token(&stack, &endpoint, "tool-user", "announced.jwt");
    let session = |ops: Value| {
        python_client(
            &python,
            &json!([{"url": endpoint, "token": token, "mode": "2026-07-28", "ops": ops}]),
        )
    };
    // A listing (the gateway caches it, pins checked) and a call.
    let before = session(json!([list(), call("weather", json!({"city": "Oslo"}))]));
    assert_eq!(
        outcomes(&before[0])[1]["text"],
        "sunny in Oslo",
        "{before:?}"
    );
    // The server changes `weather` and says so (notifications/tools/list_changed on its
    // subscriptions/listen stream, which the gateway keeps open).
    peers_support::rug_pull_announced(&runtime, upstream);
    std::thread::sleep(Duration::from_millis(500));
    // The next call, with no listing in between (the cached one is younger than its TTL):
    // refused, and it never reached the server.
    let after = session(json!([call("weather", json!({"city": "Oslo"}))]));
    let out = outcomes(&after[0]);
    assert_eq!(out[0]["ok"], false, "{after:?}");
    assert!(
        out[0]["error"].as_str().unwrap_or("").contains("withheld"),
        "{after:?}"
    );
    assert_eq!(
        stats(&runtime, upstream)["calls"],
        json!({"weather": 1}),
        "the refused call never reached the server"
    );
    let (ok, _) = stack.stop(Duration::from_secs(20));
    assert!(ok);
}

#[test]
fn a_legacy_python_servers_sampling_request_mid_call_is_refused_at_once_and_the_call_ends_with_its_answer()
 {
    // A legacy PyPI `mcp` server whose tool asks the client's model (sampling) on the call's
    // SSE stream and waits for the answer. The old gateway dropped the request like a
    // notification: the server never heard back and the call ended `aborted` at the upstream
    // timeout (30 s). Now the gateway refuses it at once (the registration allows no
    // sampling, and no agent can be asked through it in the legacy era), the tool sees the
    // refusal, and the agent gets the tool's own answer.
    let Some(python) = peers_support::python() else {
        return;
    };
    let mut stack = DevStack::start();
    let gateway = gateway_url(&stack);
    let shape = "legacy-asking-sse";
    let servers = PyServers::start(&python, &[shape]);
    let runtime = peers_support::runtime();
    let upstream = servers.addr(shape);
    register_pinned(&stack, &runtime, "asking", upstream, &["add", "ask_model"]);
    let endpoint = format!("{gateway}/mcp/asking");
    let token = mint_token(&stack, &endpoint, "tool-user", "asking.jwt");
    let mut sessions = Vec::new();
    for mode in ["legacy", "2026-07-28"] {
        sessions.push(json!({
            "url": endpoint, "token": token, "mode": mode,
            "ops": [call("ask_model", json!({"question": "2+2?"})), call("add", json!({"a": 2, "b": 2}))],
        }));
    }
    let answers = python_client(&python, &json!(sessions));
    for session in &answers {
        let out = outcomes(session);
        assert_eq!(out[0]["ok"], true, "{session}");
        assert_eq!(out[0]["text"], "sampling refused: -32601", "{session}");
        assert_eq!(out[1]["text"], "4", "the session serves on: {session}");
    }
    let s = stats(&runtime, upstream);
    assert_eq!(s["ran"]["ask_model"], 2, "{s}");
    let refusals = s["client_refusals"].as_array().unwrap();
    assert_eq!(refusals.len(), 2, "{s}");
    for r in refusals {
        assert_eq!(r["code"], -32601, "{s}");
        assert!(
            r["message"]
                .as_str()
                .unwrap_or("")
                .contains("sampling/createMessage"),
            "{s}"
        );
    }
    let (log, checkpoint) = stack.files.export("asking.cbor");
    let (ran, out) = stack.files.verify_log(&log, Some(&checkpoint));
    assert_eq!(ran.code, Some(0), "{out}");
    let (ok, _) = stack.stop(Duration::from_secs(20));
    assert!(ok);
}

#[test]
fn a_legacy_python_servers_allowed_sampling_request_is_relayed_to_a_legacy_python_client_and_its_model_answers()
 {
    // The same legacy PyPI `mcp` server, registered with `--client-request sampling`: the old
    // gateway refused its request whatever the registration said. Now a legacy PyPI `mcp`
    // client with a sampling callback gets it on the call's SSE stream, its model's answer
    // reaches the server's tool, and the call ends with the tool's answer. A modern client
    // (no session to answer from) is still refused.
    let Some(python) = peers_support::python() else {
        return;
    };
    let mut stack = DevStack::start();
    let gateway = gateway_url(&stack);
    let shape = "legacy-asking-sse";
    let servers = PyServers::start(&python, &[shape]);
    let runtime = peers_support::runtime();
    let upstream = servers.addr(shape);
    register_plain_with(
        &stack,
        &runtime,
        "asking",
        upstream,
        &format!("http://{upstream}/mcp"),
        &["add", "ask_model"],
        &["--client-request", "sampling"],
    );
    let endpoint = format!("{gateway}/mcp/asking");
    let token = mint_token(&stack, &endpoint, "tool-user", "asking.jwt");
    let mut sessions = Vec::new();
    for mode in ["legacy", "2026-07-28"] {
        sessions.push(json!({
            "url": endpoint, "token": token, "mode": mode, "sampling": "four, from the peer model",
            "ops": [call("ask_model", json!({"question": "2+2?"})), call("add", json!({"a": 2, "b": 2}))],
        }));
    }
    let answers = python_client(&python, &json!(sessions));
    let legacy = &answers[0];
    let out = outcomes(legacy);
    assert_eq!(out[0]["ok"], true, "{legacy}");
    assert!(
        out[0]["text"]
            .as_str()
            .unwrap_or("")
            .contains("four, from the peer model"),
        "the server's tool got the client's model's answer: {legacy}"
    );
    assert_eq!(legacy["sampled"], json!(["2+2?"]), "{legacy}");
    assert_eq!(out[1]["text"], "4", "the session serves on: {legacy}");
    let modern = &answers[1];
    let out = outcomes(modern);
    assert_eq!(out[0]["text"], "sampling refused: -32601", "{modern}");
    assert_eq!(modern["sampled"], json!([]), "{modern}");
    let s = stats(&runtime, upstream);
    assert_eq!(s["ran"]["ask_model"], 2, "{s}");
    assert_eq!(s["client_refusals"].as_array().unwrap().len(), 1, "{s}");
    let (log, checkpoint) = stack.files.export("asking.cbor");
    let (ran, out) = stack.files.verify_log(&log, Some(&checkpoint));
    assert_eq!(ran.code, Some(0), "{out}");
    let (ok, _) = stack.stop(Duration::from_secs(20));
    assert!(ok);
}

#[test]
fn a_hostile_listing_of_thousands_of_long_names_is_logged_within_the_entry_limit_and_its_pinned_tools_stay_callable()
 {
    // A server lists 4000 unpinned tools with 300-byte names. The old check recorded each
    // under its name: the `tool_drift` entry was over the log's entry limit, the writer refused
    // it, and the endpoint's listings and calls failed (500) for as long as the server listed
    // them. A name longer than any `tools/call` can carry (128 bytes) is now `invalid` and
    // recorded by its position, so the drift is logged, the hostile tools are withheld, and the
    // pinned tools stay callable.
    let Some(python) = peers_support::python() else {
        return;
    };
    let mut stack = DevStack::start();
    let gateway = gateway_url(&stack);
    let runtime = peers_support::runtime();
    stack.files.register_and_attest_weather(&stack.demo_url);
    let servers = PyServers::start(&python, &["stateless-json"]);
    let upstream = servers.addr("stateless-json");
    register_pinned(&stack, &runtime, "hostile", upstream, &["add", "weather"]);
    peers_support::flood(&runtime, upstream, 4000);
    let endpoint = format!("{gateway}/mcp/hostile");
    let token = mint_token(&stack, &endpoint, "tool-user", "hostile.jwt");
    let head = attestplane_tests::log_head(&stack.url).0;
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let modern = |method: &str, name: Option<&str>, body: String| {
        let bearer = format!("Bearer {token}");
        let mut headers = vec![
            ("authorization", bearer),
            ("mcp-protocol-version", "2026-07-28".to_owned()),
            ("mcp-method", method.to_owned()),
        ];
        if let Some(n) = name {
            headers.push(("mcp-name", n.to_owned()));
        }
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        runtime.block_on(peers_support::post(&client, &endpoint, &headers, &body))
    };
    // The modern era's request envelope (a modern server refuses a request without it).
    let meta = r#""_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientInfo":{"name":"t","version":"1"},"io.modelcontextprotocol/clientCapabilities":{}}"#;
    let (status, _, body) = modern(
        "tools/list",
        None,
        format!(r#"{{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{{{meta}}}}}"#),
    );
    let short = &body[..body.len().min(400)];
    assert_eq!(status, 200, "{short}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let mut shown: Vec<&str> = v["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    shown.sort_unstable();
    assert_eq!(shown, ["add", "weather"], "the hostile tools are withheld");
    let (status, _, body) = modern(
        "tools/call",
        Some("add"),
        format!(
            r#"{{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{{"name":"add","arguments":{{"a":1,"b":2}},{meta}}}}}"#
        ),
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""id":2"#) && body.contains('3'), "{body}");
    assert_eq!(stats(&runtime, upstream)["calls"], json!({"add": 1}));
    assert!(
        attestplane_tests::log_head(&stack.url).0 > head,
        "the drift, the decision and the result were written"
    );
    // The control plane serves on: a call to another server goes through and is logged.
    let weather = format!("{gateway}/mcp/weather");
    let token = stack
        .files
        .mint_agent_token_for(Some(&weather), "weather.jwt");
    let answers = python_client(
        &python,
        &json!([{"url": weather, "token": token, "mode": "2026-07-28", "ops": [call("forecast", json!({"city": "Oslo"}))]}]),
    );
    let out = outcomes(&answers[0]);
    assert_eq!(out[0]["ok"], true, "{}", answers[0]);
    assert!(attestplane_tests::log_head(&stack.url).0 > head);
    let (log, checkpoint) = stack.files.export("hostile.cbor");
    let (ran, out) = stack.files.verify_log(&log, Some(&checkpoint));
    assert_eq!(ran.code, Some(0), "{out}");
    let (ok, _) = stack.stop(Duration::from_secs(20));
    assert!(ok);
}
