//! What the peer tests share: finding the installed peers (SKIP locally, FAIL under CI when
//! one is missing), starting the peer servers, registering them as plain servers (assurance
//! `none`: they run in no TEE, so nothing attests them) with pins computed from their live
//! listing, and running the peer clients. The attested (`nitro`) server path is the demo
//! server's (`tests/tests/gateway.rs`, `peers_rmcp.rs`) and the benchmark upstream's.

#![allow(dead_code)] // each test binary uses a part

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use attestplane_tests::{DevStack, Proc, run};
use serde_json::Value;

/// `tests/peers/`: the pinned peer installs and the peer scripts.
pub fn peers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("peers")
}

/// `Some(found)`, or: under `CI=true` a failure (CI installs every peer, so a missing one is a
/// broken install, never a silent green), locally a `SKIP` line and `None`.
fn require<T>(peer: &str, found: Option<T>) -> Option<T> {
    if found.is_some() {
        return found;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("the test peer {peer} is not installed: .ci/run installs it (tests/peers/)");
    }
    eprintln!(
        "SKIP: the test peer {peer} is not installed; install it as .ci/run does \
         (python3 -m venv tests/peers/.venv && tests/peers/.venv/bin/pip install -r \
         tests/peers/requirements.txt; cd tests/peers && npm ci)"
    );
    None
}

/// The Python of `tests/peers/.venv`, with the PyPI `mcp` 2.x SDK installed.
pub fn python() -> Option<PathBuf> {
    let py = peers_dir().join(".venv/bin/python");
    let found = py.is_file()
        && Command::new(&py)
            .args(["-c", "import mcp"])
            .output()
            .is_ok_and(|o| o.status.success());
    require("PyPI mcp 2.x (tests/peers/.venv)", found.then_some(py))
}

/// `node`, with `tests/peers/node_modules` holding the npm TypeScript SDK and
/// `@modelcontextprotocol/server-everything`.
pub fn node() -> Option<PathBuf> {
    let modules = peers_dir().join("node_modules/@modelcontextprotocol");
    let found = modules.join("sdk/package.json").is_file()
        && modules.join("server-everything/package.json").is_file()
        && Command::new("node")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
    require(
        "npm @modelcontextprotocol/sdk and server-everything (tests/peers/node_modules)",
        found.then(|| PathBuf::from("node")),
    )
}

/// A runtime for the test's own HTTP (pins, stats).
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// The gateway's agent-facing base URL that `attestplane dev` printed.
pub fn gateway_url(stack: &DevStack) -> String {
    stack.gateway_url()
}

/// Python SDK servers, one per shape, in one process (`tests/peers/py_server.py`).
pub struct PyServers {
    proc: Proc,
    addrs: HashMap<String, String>,
    _dir: tempfile::TempDir,
}

impl PyServers {
    /// Starts `shapes` (see `py_server.py`) and waits until each listens.
    pub fn start(python: &Path, shapes: &[&str]) -> PyServers {
        Self::start_with(python, shapes, &[])
    }

    /// [`PyServers::start`] with environment variables `env` (the receipted shape's).
    pub fn start_with(python: &Path, shapes: &[&str], env: &[(&str, String)]) -> PyServers {
        let dir = attestplane_tests::temp_dir("attestplane-peers-py-");
        let mut cmd = Command::new(python);
        cmd.arg(peers_dir().join("py_server.py")).args(shapes);
        cmd.env(
            "PYTHONPATH",
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../integrations/python"),
        );
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut proc = Proc::spawn("py_server.py", cmd, &dir.path().join("py.stderr"));
        let mut addrs = HashMap::new();
        for _ in shapes {
            let line = proc.wait_line("listening ", Duration::from_secs(90));
            let mut parts = line.split_whitespace().skip(1);
            let (Some(shape), Some(url)) = (parts.next(), parts.next()) else {
                panic!("py_server.py printed {line:?}");
            };
            addrs.insert(
                shape.to_owned(),
                url.trim_start_matches("http://").to_owned(),
            );
        }
        PyServers {
            proc,
            addrs,
            _dir: dir,
        }
    }

    /// `IP:PORT` of shape `shape`.
    pub fn addr(&self, shape: &str) -> &str {
        self.addrs
            .get(shape)
            .unwrap_or_else(|| panic!("no server of shape {shape}"))
    }
}

/// `@modelcontextprotocol/server-everything` in its streamable HTTP mode.
pub struct Everything {
    proc: Proc,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Everything {
    /// `IP:PORT`.
    pub fn addr(&self) -> &str {
        &self.addr
    }
}

/// Starts server-everything on a free port (it takes its port from `PORT` and prints no
/// address it bound, so the port is picked here and the server retried on a race).
pub fn server_everything(node: &Path) -> Everything {
    let dir = attestplane_tests::temp_dir("attestplane-peers-everything-");
    let script =
        peers_dir().join("node_modules/@modelcontextprotocol/server-everything/dist/index.js");
    for attempt in 0..3 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap();
        let mut cmd = Command::new(node);
        cmd.arg(&script)
            .arg("streamableHttp")
            .env("PORT", port.to_string());
        let mut proc = Proc::spawn(
            "server-everything",
            cmd,
            &dir.path().join(format!("everything-{attempt}.stderr")),
        );
        let addr = format!("127.0.0.1:{port}");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while std::time::Instant::now() < deadline && proc.is_running() {
            if std::net::TcpStream::connect(&addr).is_ok() {
                return Everything {
                    proc,
                    addr,
                    _dir: dir,
                };
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!(
            "server-everything did not start on {addr}:\n{}",
            proc.diagnostics()
        );
    }
    panic!("server-everything did not start");
}

/// One HTTP POST of a JSON-RPC message to an MCP endpoint: status, session id, and the
/// JSON-RPC response (plain JSON, or the response event of an SSE stream) as raw text.
pub async fn post(
    client: &reqwest::Client,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, Option<String>, String) {
    let mut req = client
        .post(url)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.body(body.to_owned()).send().await.unwrap();
    let status = resp.status().as_u16();
    let session = resp
        .headers()
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let sse = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let text = resp.text().await.unwrap_or_default();
    let message = if sse {
        text.lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .map(str::trim)
            .find(|d| d.contains("\"result\"") || d.contains("\"error\""))
            .unwrap_or_default()
            .to_owned()
    } else {
        text
    };
    (status, session, message)
}

/// The raw `tools` of the server at `url` (its MCP endpoint), as it lists them to anyone:
/// the modern era if it speaks it, else the legacy handshake.
pub async fn live_tools(url: &str) -> Vec<Box<serde_json::value::RawValue>> {
    #[derive(serde::Deserialize)]
    struct Page {
        result: Tools,
    }
    #[derive(serde::Deserialize)]
    struct Tools {
        tools: Vec<Box<serde_json::value::RawValue>>,
    }
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let modern = r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientInfo":{"name":"pin","version":"1"},"io.modelcontextprotocol/clientCapabilities":{}}}}"#;
    let (status, _, body) = post(
        &client,
        url,
        &[
            ("mcp-protocol-version", "2026-07-28"),
            ("mcp-method", "tools/list"),
        ],
        modern,
    )
    .await;
    if status == 200
        && let Ok(page) = serde_json::from_str::<Page>(&body)
    {
        return page.result.tools;
    }
    let init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"pin","version":"1"}}}"#;
    let (status, session, body) = post(&client, url, &[], init).await;
    assert_eq!(status, 200, "initialize at {url}: {body}");
    let mut headers = vec![("mcp-protocol-version", "2025-11-25")];
    if let Some(s) = &session {
        headers.push(("mcp-session-id", s.as_str()));
    }
    post(
        &client,
        url,
        &headers,
        r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
    )
    .await;
    let (status, _, body) = post(
        &client,
        url,
        &headers,
        r#"{"jsonrpc":"2.0","id":2,"method":"tools/list","params":{}}"#,
    )
    .await;
    assert_eq!(status, 200, "tools/list at {url}: {body}");
    serde_json::from_str::<Page>(&body)
        .unwrap_or_else(|e| panic!("tools/list at {url}: {e}: {body}"))
        .result
        .tools
}

/// Registers the server at `addr` (`IP:PORT`, its MCP endpoint at `/mcp`) as `id`
/// (tenant `acme`, assurance `none`: a plain server, never attested) with pins for the tools
/// named in `pin`, computed from its live listing. Its resource URI is
/// `http://{addr}/mcp`.
pub fn register_pinned(
    stack: &DevStack,
    runtime: &tokio::runtime::Runtime,
    id: &str,
    addr: &str,
    pin: &[&str],
) {
    register_plain(stack, runtime, id, addr, &format!("http://{addr}/mcp"), pin);
}

/// [`register_pinned`] with resource URI `resource` (whose path is the MCP endpoint's): a
/// server that checks receipts knows its audience before it listens.
pub fn register_plain(
    stack: &DevStack,
    runtime: &tokio::runtime::Runtime,
    id: &str,
    addr: &str,
    resource: &str,
    pin: &[&str],
) {
    register_plain_with(stack, runtime, id, addr, resource, pin, &[]);
}

/// [`register_plain`] with `extra` arguments to `servers register` (e.g. `--client-request`).
pub fn register_plain_with(
    stack: &DevStack,
    runtime: &tokio::runtime::Runtime,
    id: &str,
    addr: &str,
    resource: &str,
    pin: &[&str],
    extra: &[&str],
) {
    let tools = runtime.block_on(live_tools(&format!("http://{addr}/mcp")));
    let endpoint = format!("http://{addr}");
    let mut args: Vec<String> = [
        "servers",
        "register",
        "--id",
        id,
        "--tenant",
        "acme",
        "--resource",
        resource,
        "--endpoint",
        &endpoint,
        "--assurance",
        "none",
    ]
    .iter()
    .chain(extra)
    .map(|s| (*s).to_owned())
    .collect();
    let mut pinned = Vec::new();
    for tool in &tools {
        let d = attestplane_verifier::gateway::pin::tool_digest(tool.get())
            .unwrap_or_else(|e| panic!("{id}: a listed tool has no digest ({e}): {tool}"));
        if pin.contains(&d.name.as_str()) {
            args.push("--tool".into());
            args.push(format!("{}={}", d.name, hex::encode(d.digest.0)));
            pinned.push(d.name);
        }
    }
    pinned.sort();
    let mut want: Vec<String> = pin.iter().map(|s| (*s).to_owned()).collect();
    want.sort();
    assert_eq!(pinned, want, "{id} does not list every tool to pin");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    stack.files.cli(&args).ok();
    allow_plain_servers(stack);
}

/// The policy for plain peer servers: the starter policy (whose call permit needs a verified
/// attestation, which a server of assurance `none` never has) and a permit for tool-users of
/// the tenant on servers of assurance `none`. Set once per stack.
const PLAIN_PEERS_POLICY: &str = r#"
@id("call-plain-peers")
permit (principal, action == Attestplane::Action::"call", resource)
when {
  principal.tenant == resource.tenant &&
  principal.roles.contains("tool-user") &&
  context.server_assurance == "none"
};
"#;

fn allow_plain_servers(stack: &DevStack) {
    let path = stack.files.path("plain-peers.cedar");
    if path.exists() {
        return;
    }
    let starter = std::fs::read_to_string(attestplane_tests::starter_policy_path())
        .expect("the starter policy");
    std::fs::write(&path, format!("{starter}\n{PLAIN_PEERS_POLICY}")).unwrap();
    stack
        .files
        .cli(&["policy", "set", &path.display().to_string()])
        .ok();
}

/// An agent token for `endpoint` (agent-7 for alice in acme) with role `role`.
pub fn mint_token(stack: &DevStack, endpoint: &str, role: &str, name: &str) -> String {
    stack.files.mint_agent_token_as(Some(endpoint), role, name)
}

/// `GET /control/stats` of a Python peer server.
pub fn stats(runtime: &tokio::runtime::Runtime, addr: &str) -> Value {
    runtime.block_on(async {
        reqwest::Client::builder()
            .no_proxy()
            .build()
            .unwrap()
            .get(format!("http://{addr}/control/stats"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    })
}

/// `POST /control/rugpull` of a Python peer server.
pub fn rug_pull(runtime: &tokio::runtime::Runtime, addr: &str) {
    rug_pull_at(runtime, addr, "/control/rugpull");
}

/// `POST /control/rugpull?notify=1`: the rug pull, announced with
/// `notifications/tools/list_changed` on the server's `subscriptions/listen` streams.
pub fn rug_pull_announced(runtime: &tokio::runtime::Runtime, addr: &str) {
    rug_pull_at(runtime, addr, "/control/rugpull?notify=1");
}

/// `POST /control/flood?n=N` of a Python peer server: `n` more tools with long names.
pub fn flood(runtime: &tokio::runtime::Runtime, addr: &str, n: usize) {
    rug_pull_at(runtime, addr, &format!("/control/flood?n={n}"));
}

fn rug_pull_at(runtime: &tokio::runtime::Runtime, addr: &str, path: &str) {
    runtime.block_on(async {
        let r = reqwest::Client::builder()
            .no_proxy()
            .build()
            .unwrap()
            .post(format!("http://{addr}{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
    });
}

fn run_client(mut cmd: Command, what: &str) -> Vec<Value> {
    cmd.current_dir(peers_dir());
    let ran = run(cmd);
    ran.ok();
    let v: Value = ran.json();
    match v {
        Value::Array(a) => a,
        other => panic!("{what} printed {other}"),
    }
}

/// Runs the PyPI `mcp` client script over `sessions` (see `py_client.py`).
pub fn python_client(python: &Path, sessions: &Value) -> Vec<Value> {
    let mut cmd = Command::new(python);
    cmd.arg(peers_dir().join("py_client.py"))
        .arg(sessions.to_string());
    run_client(cmd, "py_client.py")
}

/// Runs the npm TypeScript SDK client script over `sessions` (see `node_client.mjs`).
pub fn node_client(node: &Path, sessions: &Value) -> Vec<Value> {
    let mut cmd = Command::new(node);
    cmd.arg(peers_dir().join("node_client.mjs"))
        .arg(sessions.to_string());
    run_client(cmd, "node_client.mjs")
}
