//! What the peer tests share: finding the installed peers (SKIP locally, FAIL under CI when
//! one is missing), starting the peer servers, a byte-relaying front that gives each peer
//! server an attestation endpoint, pins computed from a server's live listing, and running the
//! peer clients.

#![allow(dead_code)] // each test binary uses a part

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use attestplane_tests::{DevStack, Proc, run};
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

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

/// A runtime for the test's own HTTP (fronts, pins, stats).
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

/// A front for a peer server that has no attestation of its own: a connection whose first
/// request is for `/attestation` is relayed to the demo server (whose mock-NSM document the
/// registration expects), every other connection to the peer server, bytes untouched in both
/// directions. The registered endpoint is the front; what the gateway sends and the peer
/// answers passes through as is.
pub struct Front {
    /// `http://IP:PORT`.
    pub url: String,
    upstream: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Front {
    /// Starts a front for `upstream` (`IP:PORT`) and the demo server at `demo_url`.
    pub fn start(runtime: &tokio::runtime::Runtime, upstream: &str, demo_url: &str) -> Front {
        let front = Front::reserve(runtime, demo_url);
        front.route_to(upstream);
        front
    }

    /// Sets the peer server (`IP:PORT`) that non-attestation connections go to.
    pub fn route_to(&self, upstream: &str) {
        *self
            .upstream
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = upstream.to_owned();
    }

    /// A front whose address is known before its peer server's (a server that must know its
    /// own resource URI when it starts); [`Front::route_to`] sets the server.
    pub fn reserve(runtime: &tokio::runtime::Runtime, demo_url: &str) -> Front {
        let cell = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let upstream = cell.clone();
        let demo = demo_url.trim_start_matches("http://").to_owned();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        runtime.spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let upstream = upstream
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone();
                let demo = demo.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65536 {
                        match inbound.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let attestation = head.starts_with(b"GET /attestation");
                    let target = if attestation { demo } else { upstream };
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    if outbound.write_all(&head).await.is_err() {
                        return;
                    }
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                });
            }
        });
        Front {
            url,
            upstream: cell,
        }
    }
}

/// One HTTP POST of a JSON-RPC message to an MCP endpoint: status, session id, and the
/// JSON-RPC response (plain JSON, or the response event of an SSE stream) as raw text.
async fn post(
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

/// Registers the server behind `front` as `id` (tenant `acme`, the demo server's PCRs) with
/// pins for the tools named in `pin`, computed from its live listing, and attests it.
pub fn register_pinned(
    stack: &DevStack,
    runtime: &tokio::runtime::Runtime,
    id: &str,
    front: &Front,
    pin: &[&str],
) {
    let resource = format!("{}/mcp", front.url);
    let tools = runtime.block_on(live_tools(&resource));
    let mut args: Vec<String> = [
        "servers",
        "register",
        "--id",
        id,
        "--tenant",
        "acme",
        "--resource",
        &resource,
        "--endpoint",
        &front.url,
        "--server-pcrs",
        &stack
            .files
            .path("demo-server-pcrs.json")
            .display()
            .to_string(),
    ]
    .iter()
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
    stack.files.cli(&["servers", "attest", id]).ok();
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
