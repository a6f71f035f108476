//! The MCP gateway end to end inside one process: an agent's HTTP requests reach the gateway
//! over loopback TCP, the gateway decides on the enclave's handler thread (the real
//! `server::run_with_inside`, with a fake host that stores `Persist`ed entries and reports them
//! durable), and forwards to a fake upstream MCP server that counts what reaches it.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use attestplane_enclave::gateway::GatewayConfig;
use attestplane_enclave::gateway::http::Gateway;
use attestplane_enclave::gateway::upstream::{BoxedIo, Connect, ConnectFuture, Dialed, Upstreams};
use attestplane_enclave::server::{self, ServerLimits};
use attestplane_proto::{Address, Body, Frame, FrameDecoder, Listener, Request, Response};
use attestplane_verifier::admin::Digest32;
use attestplane_verifier::entry::{Event, SignedEntry};
use attestplane_verifier::gateway::pin::tool_digest;
use attestplane_verifier::gateway::receipt::{
    ReceiptError, ReceivedCall, ReplayCache, verify_receipt,
};
use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use sha2::Digest as _;
use tokio::io::BufReader;
use tokio::net::{TcpListener, TcpStream};

const AGENT: &str = "agent-7";
const ADD: &str = r#"{"name":"add","description":"Adds two numbers.","inputSchema":{"type":"object","properties":{"a":{"type":"number"},"b":{"type":"number","maximum":1e3}}},"execution":{"taskSupport":"optional"},"x-vendor":{"k":1}}"#;
const ECHO: &str =
    r#"{"name":"echo","description":"Echoes text.","inputSchema":{"type":"object"}}"#;

const RESOURCES: &str = r#"{"resources":[{"uri":"file:///docs/a","name":"a","size":1e3},{"uri":"file:///etc/passwd","name":"passwd"}],"nextCursor":"page-2","x-vendor":1e3}"#;
const TEMPLATES: &str = r#"{"resourceTemplates":[{"uriTemplate":"file:///docs/{name}","name":"docs"},{"uriTemplate":"file:///etc/{name}","name":"etc"}]}"#;
const PROMPTS: &str =
    r#"{"prompts":[{"name":"greet","arguments":[{"name":"who"}]},{"name":"secret"}]}"#;

/// A fake upstream MCP server.
struct Upstream {
    modern: bool,
    tools: Mutex<Vec<String>>,
    calls: AtomicUsize,
    last_call: Mutex<Option<(String, Option<String>)>>,
    last_receipt: Mutex<Option<String>>,
    hang: std::sync::atomic::AtomicBool,
    /// The text a tool call's result carries.
    answer_text: Mutex<String>,
    /// `resources/read` and `prompts/get` requests that reached it.
    reads: AtomicUsize,
    /// The last of them, with its receipt header.
    last_read: Mutex<Option<(String, Option<String>)>>,
    /// When set, a tool call is answered `input_required` with these `inputRequests`.
    input_required: Mutex<Option<String>>,
    /// When set (legacy era), a tool call is answered as an SSE stream that first asks the
    /// client `count` server-to-client requests of `method`, then waits for the client's
    /// response to the first one (POSTed to the session) and answers the call with what it
    /// got: a tool error if the client refused.
    ask_client: Mutex<Option<(String, usize)>>,
    /// The JSON-RPC responses POSTed to it (answers to its requests), with their session id.
    client_responses: Mutex<Vec<(serde_json::Value, Option<String>)>>,
    client_responded: tokio::sync::Notify,
    /// The session's GET stream (legacy era), once the client opened it: what the test writes
    /// there reaches the client outside any call.
    get_stream: Mutex<Option<tokio::sync::mpsc::Sender<Bytes>>>,
    /// With [`Self::ask_client`]: answer the call right after asking, without waiting for the
    /// client's response.
    dont_wait: std::sync::atomic::AtomicBool,
    /// Answer `tools/list` with something that is not JSON-RPC.
    list_garbage: std::sync::atomic::AtomicBool,
}

/// A response body fed by a channel: an SSE stream the test upstream writes as it goes.
struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|o| o.map(|b| Ok(hyper::body::Frame::data(b))))
    }
}

type UpBody = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

impl Upstream {
    fn new(modern: bool) -> Arc<Self> {
        Arc::new(Self {
            modern,
            tools: Mutex::new(vec![ADD.to_owned(), ECHO.to_owned()]),
            calls: AtomicUsize::new(0),
            last_call: Mutex::new(None),
            last_receipt: Mutex::new(None),
            hang: std::sync::atomic::AtomicBool::new(false),
            answer_text: Mutex::new("3".into()),
            reads: AtomicUsize::new(0),
            last_read: Mutex::new(None),
            input_required: Mutex::new(None),
            ask_client: Mutex::new(None),
            client_responses: Mutex::new(Vec::new()),
            client_responded: tokio::sync::Notify::new(),
            get_stream: Mutex::new(None),
            dont_wait: std::sync::atomic::AtomicBool::new(false),
            list_garbage: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Serves one request: a response POSTed by the client (recorded, `202`), a tool call
    /// that asks the client first ([`Self::ask_client`]) as an SSE stream, anything else by
    /// [`Self::answer`].
    async fn serve(
        self: Arc<Self>,
        req: hyper::Request<hyper::body::Incoming>,
    ) -> hyper::Response<UpBody> {
        let (parts, body) = req.into_parts();
        if parts.method == hyper::Method::GET && !self.modern {
            let (tx, rx) = tokio::sync::mpsc::channel(8);
            *self.get_stream.lock().unwrap() = Some(tx);
            let mut r = hyper::Response::new(UpBody::new(ChannelBody(rx)));
            r.headers_mut()
                .insert("content-type", "text/event-stream".parse().unwrap());
            return r;
        }
        let body = body.collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        if v.get("method").is_none() && v.get("id").is_some() {
            let session = parts
                .headers
                .get("mcp-session-id")
                .map(|h| h.to_str().unwrap().to_owned());
            self.client_responses.lock().unwrap().push((v, session));
            self.client_responded.notify_one();
            let mut r = hyper::Response::new(Full::new(Bytes::new()).boxed());
            *r.status_mut() = hyper::StatusCode::ACCEPTED;
            return r;
        }
        let ask = self.ask_client.lock().unwrap().clone();
        if let (Some((method, count)), "tools/call") =
            (ask, v["method"].as_str().unwrap_or_default())
        {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let id = v["id"].clone();
            let (tx, rx) = tokio::sync::mpsc::channel(count + 2);
            let up = self.clone();
            tokio::spawn(async move {
                for i in 0..count {
                    let event = format!(
                        "event: message\ndata: {{\"jsonrpc\":\"2.0\",\"id\":\"ask-{i}\",\"method\":\"{method}\",\"params\":{{\"messages\":[],\"maxTokens\":5,\"systemPrompt\":\"reply to bob@example.com\"}}}}\n\n"
                    );
                    let _ = tx.send(Bytes::from(event)).await;
                }
                // Wait for the client's answer as a server's tool does (up to 5 s).
                let answered = tokio::time::timeout(Duration::from_secs(5), async {
                    loop {
                        if up.dont_wait.load(Ordering::SeqCst) {
                            return serde_json::json!({"dont": "wait"});
                        }
                        let notified = up.client_responded.notified();
                        if let Some(r) = up.client_responses.lock().unwrap().first().cloned() {
                            return r.0;
                        }
                        notified.await;
                    }
                })
                .await;
                let text = match answered {
                    Ok(r) if r.get("error").is_some() => {
                        format!("the client refused: {}", r["error"]["code"])
                    }
                    Ok(r) if r.get("dont").is_some() => "did not wait".to_owned(),
                    Ok(_) => "the client answered".to_owned(),
                    Err(_) => "no answer from the client".to_owned(),
                };
                let event = format!(
                    "event: message\ndata: {{\"jsonrpc\":\"2.0\",\"id\":{id},\"result\":{{\"content\":[{{\"type\":\"text\",\"text\":\"{text}\"}}],\"isError\":true}}}}\n\n"
                );
                let _ = tx.send(Bytes::from(event)).await;
            });
            let mut r = hyper::Response::new(UpBody::new(ChannelBody(rx)));
            r.headers_mut()
                .insert("content-type", "text/event-stream".parse().unwrap());
            return r;
        }
        self.answer(hyper::Request::from_parts(parts, Full::new(body)))
            .await
            .map(|b| b.boxed())
    }

    async fn answer(
        self: Arc<Self>,
        req: hyper::Request<Full<Bytes>>,
    ) -> hyper::Response<Full<Bytes>> {
        let auth = req
            .headers()
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_owned());
        let receipt = req
            .headers()
            .get("attestplane-receipt")
            .map(|v| v.to_str().unwrap().to_owned());
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8(body.to_vec()).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let method = v["method"].as_str().unwrap_or_default().to_owned();
        let id = v.get("id").cloned().unwrap_or(serde_json::Value::Null);
        let reply = |result: String| {
            let mut r = hyper::Response::new(Full::new(Bytes::from(format!(
                r#"{{"jsonrpc":"2.0","id":{id},"result":{result}}}"#
            ))));
            r.headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            r
        };
        match method.as_str() {
            "server/discover" if self.modern => {
                reply(r#"{"resultType":"complete","supportedVersions":["2026-07-28"],"capabilities":{"tools":{}}}"#.into())
            }
            "server/discover" => {
                let mut r = reply(r#"{}"#.into());
                *r.status_mut() = hyper::StatusCode::BAD_REQUEST;
                r
            }
            "initialize" => {
                let mut r = reply(
                    r#"{"protocolVersion":"2025-11-25","capabilities":{"tools":{}},"serverInfo":{"name":"up","version":"1"}}"#.into(),
                );
                r.headers_mut()
                    .insert("mcp-session-id", "upstream-session".parse().unwrap());
                r
            }
            "notifications/initialized" => {
                let mut r = hyper::Response::new(Full::new(Bytes::new()));
                *r.status_mut() = hyper::StatusCode::ACCEPTED;
                r
            }
            "tools/list" if self.list_garbage.load(Ordering::SeqCst) => {
                let mut r = hyper::Response::new(Full::new(Bytes::from_static(b"<html>")));
                r.headers_mut()
                    .insert("content-type", "application/json".parse().unwrap());
                r
            }
            "tools/list" => {
                let tools = self.tools.lock().unwrap().join(",");
                reply(format!(r#"{{"tools":[{tools}],"futureField":{{"x":1e3}}}}"#))
            }
            "tools/call" => {
                self.calls.fetch_add(1, Ordering::SeqCst);
                *self.last_call.lock().unwrap() = Some((text.clone(), auth));
                *self.last_receipt.lock().unwrap() = receipt;
                if self.hang.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                }
                if let Some(requests) = self.input_required.lock().unwrap().clone() {
                    return reply(format!(
                        r#"{{"resultType":"input_required","inputRequests":{requests},"requestState":"opaque"}}"#
                    ));
                }
                let text = self.answer_text.lock().unwrap().clone();
                reply(format!(
                    r#"{{"content":[{{"type":"text","text":"{text}"}}],"isError":false,"vendor":1e3}}"#
                ))
            }
            "resources/list" => reply(RESOURCES.into()),
            "resources/templates/list" => reply(TEMPLATES.into()),
            "prompts/list" => reply(PROMPTS.into()),
            "resources/read" => {
                self.reads.fetch_add(1, Ordering::SeqCst);
                *self.last_read.lock().unwrap() = Some((text.clone(), receipt));
                let uri = v["params"]["uri"].clone();
                reply(format!(
                    r#"{{"contents":[{{"uri":{uri},"text":"hello","x":1e3}}]}}"#
                ))
            }
            "prompts/get" => {
                self.reads.fetch_add(1, Ordering::SeqCst);
                *self.last_read.lock().unwrap() = Some((text.clone(), receipt));
                reply(
                    r#"{"messages":[{"role":"user","content":{"type":"text","text":"write to bob@example.com"}}],"x":1e3}"#
                        .into(),
                )
            }
            _ => reply("{}".into()),
        }
    }
}

/// Delivers what `from` (the enclave's side of a held connection) sends in frames to `to`, each
/// payload once `stored` has reached its need: what the host's relays do.
async fn hold_and_deliver<R, W>(
    mut from: R,
    mut to: W,
    mut stored: tokio::sync::watch::Receiver<u64>,
) where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt as _;
    let mut payload = Vec::new();
    while let Ok(Some(need)) = attestplane_proto::read_held(&mut from, &mut payload).await {
        if stored.wait_for(|n| *n >= need).await.is_err() {
            return;
        }
        if to.write_all(&payload).await.is_err() {
            return;
        }
    }
    let _ = to.shutdown().await;
}

/// Connects every server id to one local address through a stand-in for the host's dialer
/// that holds the enclave's frames until the fake host has stored what they need.
struct HeldDirect(SocketAddr, tokio::sync::watch::Receiver<u64>);

impl Connect for HeldDirect {
    fn connect(&self, _server_id: &str) -> ConnectFuture {
        let (addr, stored) = (self.0, self.1.clone());
        Box::pin(async move {
            let upstream = TcpStream::connect(addr).await?;
            let (enclave_side, host_side) = tokio::io::duplex(256 * 1024);
            let (host_r, mut host_w) = tokio::io::split(host_side);
            let (mut up_r, up_w) = upstream.into_split();
            tokio::spawn(hold_and_deliver(host_r, up_w, stored));
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut up_r, &mut host_w).await;
            });
            let gate = attestplane_proto::Gate::new();
            Ok(Dialed {
                io: Box::new(attestplane_proto::Held::new(enclave_side, gate.clone())) as BoxedIo,
                gate: Some(gate),
            })
        })
    }

    fn holds(&self) -> bool {
        true
    }
}

/// Connects every server id to one local address.
struct Direct(SocketAddr);

impl Connect for Direct {
    fn connect(&self, _server_id: &str) -> ConnectFuture {
        let addr = self.0;
        Box::pin(async move {
            let s = TcpStream::connect(addr).await?;
            Ok(Dialed {
                io: Box::new(s) as BoxedIo,
                gate: None,
            })
        })
    }
}

struct Stack {
    agent: SocketAddr,
    store: Arc<Mutex<Vec<Vec<u8>>>>,
    /// The most entries the fake host stores (and so reports durable); more wait.
    limit: tokio::sync::watch::Sender<u64>,
    upstream: Arc<Upstream>,
    idp: Idp,
    now: attestplane_verifier::UnixMillis,
    config: GatewayConfig,
}

impl Stack {
    fn token(&self, server: &str, roles: &[&str]) -> String {
        let mut claims = self.idp.claims(AGENT, "acme", roles, self.now);
        claims["aud"] = serde_json::json!(self.config.resource(server));
        self.idp.sign_claims(&claims)
    }

    fn entries(&self) -> Vec<Event> {
        self.store
            .lock()
            .unwrap()
            .iter()
            .map(|b| SignedEntry::decode(b).unwrap().entry().event.clone())
            .collect()
    }

    async fn post(
        &self,
        path: &str,
        headers: &[(&str, String)],
        body: &str,
    ) -> (u16, hyper::HeaderMap, String) {
        let stream = TcpStream::connect(self.agent).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut req = hyper::Request::post(path).header("host", "gateway");
        for (k, v) in headers {
            req = req.header(*k, v.as_str());
        }
        let req = req
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, headers, String::from_utf8_lossy(&body).into_owned())
    }

    async fn modern(&self, server: &str, token: &str, body: &str) -> (u16, String) {
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        let method = v["method"].as_str().unwrap().to_owned();
        let mut headers = vec![
            ("authorization", format!("Bearer {token}")),
            ("mcp-protocol-version", "2026-07-28".to_owned()),
            ("mcp-method", method),
        ];
        if let Some(n) = v["params"]["name"]
            .as_str()
            .or_else(|| v["params"]["uri"].as_str())
        {
            headers.push(("mcp-name", n.to_owned()));
        }
        let (s, _, b) = self.post(&format!("/mcp/{server}"), &headers, body).await;
        (s, b)
    }
}

fn modern_call(tool: &str, args: &str) -> String {
    format!(
        r#"{{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{{"name":"{tool}","arguments":{args},"task":{{"ttl":5}},"_meta":{{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}}}}"#
    )
}

const MODERN_LIST: &str = r#"{"jsonrpc":"2.0","id":"l1","method":"tools/list","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}"#;

/// A booted control plane with server `weather` (pins: `add` and `echo` as the upstream lists
/// them) attested, a policy letting tool-users call `add` only, served with a gateway.
async fn stack(modern: bool) -> Stack {
    stack_with(modern, "").await
}

/// [`stack`] with `extra` policies added to the set.
async fn stack_with(modern: bool, extra: &str) -> Stack {
    stack_full(modern, extra, &[], None).await
}

/// [`stack_with`], with `prices` (tool, amount, asset) in the registration and `limits` (a
/// `set_limits` act) applied after setup.
async fn stack_full(
    modern: bool,
    extra: &str,
    prices: &[(&str, u64, &str)],
    limits: Option<attestplane_verifier::admin::AdminAction>,
) -> Stack {
    stack_opts(modern, extra, prices, limits, Opts::default()).await
}

/// How a test's stack differs from [`stack`]'s.
#[derive(Default)]
struct Opts {
    /// The whole policy set, instead of the starter policy with `no-echo` and the extras.
    policy: Option<String>,
    /// Register `weather` with assurance `none` (no PCRs, never attested).
    plain: bool,
    /// The server-to-client requests `weather`'s registration allows.
    client_requests: Vec<attestplane_verifier::admin::ClientRequest>,
    /// How long a relayed request waits for the agent (the default otherwise).
    agent_answer_timeout: Option<Duration>,
    /// Serve through stand-ins for the host's relays that hold the enclave's frames until the
    /// fake host has stored what they need (agents connect to an `McpListener` through a relay
    /// that sends the preamble; upstreams are dialled through [`HeldDirect`]).
    held: bool,
}

async fn stack_opts(
    modern: bool,
    extra: &str,
    prices: &[(&str, u64, &str)],
    limits: Option<attestplane_verifier::admin::AdminAction>,
    opts: Opts,
) -> Stack {
    let admin = Admin::new(1);
    let mut server = McpServer::new("weather", "acme", 1);
    if opts.plain {
        server.spec.assurance = attestplane_verifier::admin::Assurance::None;
        server.spec.pcrs.clear();
    }
    server.spec.client_requests = opts.client_requests.iter().copied().collect();
    let pins: BTreeMap<String, Digest32> = [ADD, ECHO]
        .iter()
        .map(|t| {
            let d = tool_digest(t).unwrap();
            (d.name, d.digest)
        })
        .collect();
    server.spec.tools = pins;
    for (tool, amount, asset) in prices {
        server.spec.prices.insert(
            (*tool).to_owned(),
            attestplane_verifier::gateway::limits::Price {
                amount: *amount,
                asset: (*asset).to_owned(),
            },
        );
    }
    let idp = Idp::new(40, "https://idp.acme.example");
    let mut h = Harness::new(&[&admin]);
    let policy = opts.policy.unwrap_or_else(|| format!(
        "{STARTER_POLICY}\n@id(\"no-echo\")\nforbid (principal, action == Attestplane::Action::\"call\", resource == Attestplane::Tool::\"weather/echo\");\n{extra}"
    ));
    h.setup(&admin, &[&server], &policy, &idp);
    if let Some(limits) = limits {
        h.admin_ok(&admin, limits);
    }
    if !opts.plain {
        let _ = h.attest(&server);
    }
    let now = h.now;
    let store = Arc::new(Mutex::new(h.store.clone()));

    let upstream = Upstream::new(modern);
    let up_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_addr = up_listener.local_addr().unwrap();
    let up = upstream.clone();
    tokio::spawn(async move {
        loop {
            let (s, _) = up_listener.accept().await.unwrap();
            let up = up.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let up = up.clone();
                    async move { Ok::<_, std::convert::Infallible>(up.serve(req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });

    // The enclave's host port, and a fake host storing entries and reporting them durable.
    let listener = Listener::bind(&Address::Tcp("127.0.0.1:0".parse().unwrap()))
        .await
        .unwrap();
    let host_addr = listener.local_addr().unwrap();
    let (access, inside) = server::inside_channel(64);
    let enclave = h.enclave;
    let nsm = h.nsm.clone();
    nsm.set_time(now);
    tokio::spawn(server::run_with_inside(
        listener,
        enclave,
        move || now,
        ServerLimits::default(),
        inside,
        std::future::pending(),
    ));
    let host_store = store.clone();
    let host = attestplane_proto::connect(&host_addr).await.unwrap();
    let (limit, mut limited) = tokio::sync::watch::channel(u64::MAX);
    let (stored_tx, stored) = tokio::sync::watch::channel(store.lock().unwrap().len() as u64);
    tokio::spawn(async move {
        let (r, mut w) = tokio::io::split(host);
        let mut r = BufReader::new(r);
        let mut decoder = FrameDecoder::new();
        let mut next = 1u64;
        while let Ok(Some(frame)) = attestplane_proto::read_frame(&mut r, &mut decoder).await {
            if let Body::Response(Response::Persist { first_seq, entries }) = frame.body {
                let end = first_seq + entries.len() as u64;
                let _ = limited.wait_for(|l| *l >= end).await;
                let through_seq = {
                    let mut s = host_store.lock().unwrap();
                    assert_eq!(s.len() as u64, first_seq, "entries arrive in order");
                    s.extend(entries.into_iter().map(|e| e.into_vec()));
                    stored_tx.send_replace(s.len() as u64);
                    s.len() as u64 - 1
                };
                next += 1;
                let f = Frame::request(next, Request::Durable { through_seq });
                attestplane_proto::write_frame(&mut w, &f).await.unwrap();
            }
        }
    });

    let mut config = GatewayConfig {
        public_base: "http://gateway.test".into(),
        upstream_timeout: Duration::from_millis(800),
        ..GatewayConfig::default()
    };
    if let Some(t) = opts.agent_answer_timeout {
        config.agent_answer_timeout = t;
    }
    let connect: Arc<dyn Connect> = if opts.held {
        Arc::new(HeldDirect(up_addr, stored.clone()))
    } else {
        Arc::new(Direct(up_addr))
    };
    let gateway = Arc::new(Gateway::new(
        config.clone(),
        access,
        Upstreams::new(connect, config.upstream_timeout),
    ));
    let agents = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let agent = agents.local_addr().unwrap();
    if opts.held {
        // The enclave's MCP listener, and a stand-in for the host's agent relay in front.
        let mcp = Address::Tcp("127.0.0.1:0".parse().unwrap());
        let listener = attestplane_enclave::mcp_transport::McpListener::bind(&mcp, 64)
            .await
            .unwrap();
        let mcp = listener.local_addr().unwrap();
        tokio::spawn(attestplane_enclave::mcp_transport::serve_agents(
            listener,
            move |stream| gateway.clone().serve_held(stream.io, stream.gate),
            std::future::pending(),
        ));
        tokio::spawn(async move {
            loop {
                let (agent, _) = agents.accept().await.unwrap();
                let mut inner = attestplane_proto::connect(&mcp).await.unwrap();
                let stored = stored.clone();
                tokio::spawn(async move {
                    use tokio::io::AsyncWriteExt as _;
                    inner
                        .write_all(&attestplane_proto::RELEASE_PREAMBLE)
                        .await
                        .unwrap();
                    let (inner_r, mut inner_w) = tokio::io::split(inner);
                    let (mut agent_r, agent_w) = agent.into_split();
                    tokio::spawn(hold_and_deliver(inner_r, agent_w, stored));
                    let _ = tokio::io::copy(&mut agent_r, &mut inner_w).await;
                });
            }
        });
    } else {
        tokio::spawn(async move {
            loop {
                let (s, _) = agents.accept().await.unwrap();
                tokio::spawn(gateway.clone().serve_connection(s));
            }
        });
    }
    Stack {
        agent,
        store,
        limit,
        upstream,
        idp,
        now,
        config,
    }
}

fn calls(stack: &Stack) -> usize {
    stack.upstream.calls.load(Ordering::SeqCst)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_call_is_logged_durably_before_and_after_and_forwarded_byte_for_byte() {
    let s = stack(true).await;
    let token = s.token("weather", &["tool-user"]);
    let before = s.entries().len();
    let (status, body) = s
        .modern("weather", &token, &modern_call("add", r#"{"a":1,"b":2e0}"#))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        r#"{"jsonrpc":"2.0","id":7,"result":{"content":[{"type":"text","text":"3"}],"isError":false,"vendor":1e3,"resultType":"complete"}}"#,
        "the upstream's answer reaches the agent byte for byte (plus the resultType a modern agent's SDK requires)"
    );
    assert_eq!(calls(&s), 1);
    let (forwarded, auth) = s.upstream.last_call.lock().unwrap().clone().unwrap();
    assert!(auth.is_none(), "the agent's token is never sent upstream");
    assert!(
        forwarded.contains(r#""arguments":{"a":1,"b":2e0},"task":{"ttl":5}"#),
        "arguments, numbers and unknown params forwarded as written: {forwarded}"
    );
    let events = s.entries();
    let new: Vec<&Event> = events[before..].iter().collect();
    assert_eq!(new.len(), 2, "a decision and a result: {new:?}");
    let Event::Decision(d) = new[0] else {
        panic!("{:?}", new[0])
    };
    assert!(d.allowed);
    assert_eq!(d.action, "call");
    assert_eq!(d.tool.as_deref(), Some("add"));
    assert_eq!(d.principal.agent, AGENT);
    let Event::CallResult { call, outcome, .. } = new[1] else {
        panic!("{:?}", new[1])
    };
    assert_eq!(*call as usize, before);
    assert_eq!(outcome, "ok");

    // The receipt: in the header and in params._meta, verifying with the attested epoch key
    // for exactly this call, once.
    let header = s.upstream.last_receipt.lock().unwrap().clone().unwrap();
    let v: serde_json::Value = serde_json::from_str(&forwarded).unwrap();
    assert_eq!(v["params"]["_meta"]["io.attestplane/receipt"], header);
    let key = epoch_key(&s);
    let received = ReceivedCall {
        audience: "https://weather.acme.example/mcp",
        method: "tools/call",
        tool: "add",
        arguments: Some(r#"{"a":1,"b":2}"#),
    };
    let mut cache = ReplayCache::new(16);
    let verified = verify_receipt(&header, &key, &received, s.now, &mut cache).unwrap();
    assert_eq!(verified.claims().seq as usize, before);
    assert_eq!(verified.claims().sub, AGENT);
    assert!(matches!(
        verify_receipt(&header, &key, &received, s.now, &mut cache),
        Err(ReceiptError::Replayed { .. })
    ));
    let other = ReceivedCall {
        arguments: Some(r#"{"a":1,"b":3}"#),
        ..received
    };
    assert!(matches!(
        verify_receipt(&header, &key, &other, s.now, &mut ReplayCache::new(1)),
        Err(ReceiptError::OtherArguments { .. })
    ));
    replays(&s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_call_is_logged_and_never_reaches_the_server() {
    let s = stack(true).await;
    let before = s.entries().len();
    // Forbidden tool.
    let token = s.token("weather", &["tool-user"]);
    let (status, body) = s
        .modern("weather", &token, &modern_call("echo", r#"{"text":"hi"}"#))
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"error\""), "{body}");
    // No role.
    let token = s.token("weather", &[]);
    let (_, body) = s
        .modern("weather", &token, &modern_call("add", r#"{"a":1}"#))
        .await;
    assert!(body.contains("\"error\""), "{body}");
    assert_eq!(calls(&s), 0, "no denied call reaches the server");
    let events = s.entries();
    let denied: Vec<_> = events[before..]
        .iter()
        .filter(|e| matches!(e, Event::Decision(d) if !d.allowed && d.action == "call"))
        .collect();
    assert_eq!(denied.len(), 2, "{:?}", &events[before..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_list_is_filtered_per_identity_and_forwarded_byte_for_byte() {
    let s = stack(true).await;
    let token = s.token("weather", &["tool-user"]);
    let (status, body) = s.modern("weather", &token, MODERN_LIST).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        format!(
            r#"{{"jsonrpc":"2.0","id":"l1","result":{{"tools":[{ADD}],"futureField":{{"x":1e3}},"resultType":"complete","ttlMs":0,"cacheScope":"private"}}}}"#
        ),
        "only the callable tool, the agent's id, unknown fields and number spellings kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rug_pulled_tool_is_withheld_its_call_refused_and_the_drift_logged() {
    let s = stack(true).await;
    let token = s.token("weather", &["tool-user"]);
    // The server changes `add`'s description invisibly (a zero-width space) after pinning.
    *s.upstream.tools.lock().unwrap() =
        vec![ADD.replace("Adds two", "Adds\u{200b} two"), ECHO.to_owned()];
    let (status, body) = s.modern("weather", &token, MODERN_LIST).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        !body.contains("\"add\""),
        "the changed tool is withheld: {body}"
    );
    let (_, body) = s
        .modern("weather", &token, &modern_call("add", r#"{"a":1}"#))
        .await;
    assert!(body.contains("withheld"), "{body}");
    assert_eq!(calls(&s), 0, "the refused call never reached the server");
    let drift: Vec<_> = s
        .entries()
        .into_iter()
        .filter_map(|e| match e {
            Event::ToolDrift { server, drift } => Some((server, drift)),
            _ => None,
        })
        .collect();
    assert_eq!(drift.len(), 1, "the drift is logged once: {drift:?}");
    assert_eq!(drift[0].0, "weather");
    assert_eq!(drift[0].1[0].kind, "changed");
    assert_eq!(drift[0].1[0].name, "add");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_and_wrong_audience_get_401_with_resource_metadata() {
    let s = stack(true).await;
    let (status, headers, _) = s.post("/mcp/weather", &[], MODERN_LIST).await;
    assert_eq!(status, 401);
    let challenge = headers.get("www-authenticate").unwrap().to_str().unwrap();
    assert_eq!(
        challenge,
        "Bearer resource_metadata=\"http://gateway.test/.well-known/oauth-protected-resource/mcp/weather\""
    );
    // A token for another endpoint.
    let other = s.token("other", &["tool-user"]);
    let (status, _) = s.modern("weather", &other, MODERN_LIST).await;
    assert_eq!(status, 401);
    // A token for the control plane's API.
    let api = s.idp.token(AGENT, "acme", &["tool-user"], s.now);
    let (status, _) = s.modern("weather", &api, MODERN_LIST).await;
    assert_eq!(status, 401);
    assert_eq!(calls(&s), 0);
    // The metadata names the resource and the identity provider.
    let stream = TcpStream::connect(s.agent).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = send
        .send_request(
            hyper::Request::get("/.well-known/oauth-protected-resource/mcp/weather")
                .header("host", "gateway")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["resource"], "http://gateway.test/mcp/weather");
    assert_eq!(v["authorization_servers"][0], "https://idp.acme.example");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_batched_mismatched_and_non_ijson_requests_are_refused() {
    let s = stack(true).await;
    let token = s.token("weather", &["tool-user"]);
    let auth = ("authorization", format!("Bearer {token}"));
    let before = s.entries().len();
    // A batch.
    let (status, _, body) = s
        .post(
            "/mcp/weather",
            std::slice::from_ref(&auth),
            &format!("[{MODERN_LIST}]"),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    // Not JSON.
    let (status, _, body) = s
        .post("/mcp/weather", std::slice::from_ref(&auth), "{\"jsonrpc\":")
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("-32700"), "{body}");
    // Mcp-Name disagreeing with the body.
    let (status, _, body) = s
        .post(
            "/mcp/weather",
            &[
                auth.clone(),
                ("mcp-protocol-version", "2026-07-28".into()),
                ("mcp-method", "tools/call".into()),
                ("mcp-name", "echo".into()),
            ],
            &modern_call("add", "{}"),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("-32020"), "{body}");
    // An integer beyond 2^53.
    let (status, body) = s
        .modern(
            "weather",
            &token,
            &modern_call("add", r#"{"a":9007199254740993}"#),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    // Oversized.
    let big = modern_call(
        "add",
        &format!(r#"{{"a":"{}"}}"#, "x".repeat(2 * 1024 * 1024)),
    );
    let (status, _, _) = s
        .post("/mcp/weather", std::slice::from_ref(&auth), &big)
        .await;
    assert_eq!(status, 413);
    assert_eq!(calls(&s), 0);
    assert_eq!(s.entries().len(), before, "nothing refused here is logged");
    // And the stack still serves.
    let (status, body) = s
        .modern("weather", &token, &modern_call("add", r#"{"a":1}"#))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(calls(&s), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_client_through_modern_server_with_sessions_bound_to_the_agent() {
    let s = stack(true).await;
    let token = s.token("weather", &["tool-user"]);
    let auth = ("authorization", format!("Bearer {token}"));
    let init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;
    let (status, headers, body) = s
        .post("/mcp/weather", std::slice::from_ref(&auth), init)
        .await;
    assert_eq!(status, 200, "{body}");
    let session = headers
        .get("mcp-session-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(session.len(), 32, "128 random bits");
    let call = r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"add","arguments":{"a":1}}}"#;
    let with_session = ("mcp-session-id", session.clone());
    let (status, _, body) = s
        .post("/mcp/weather", &[auth.clone(), with_session.clone()], call)
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"result\""), "{body}");
    assert_eq!(calls(&s), 1);
    let (forwarded, _) = s.upstream.last_call.lock().unwrap().clone().unwrap();
    assert!(
        forwarded.contains("2026-07-28"),
        "a legacy client's call reaches a modern server in its era: {forwarded}"
    );
    // Another agent presenting this session id: unknown.
    let mut claims = s.idp.claims("mallory", "acme", &["tool-user"], s.now);
    claims["aud"] = serde_json::json!(s.config.resource("weather"));
    let mallory = s.idp.sign_claims(&claims);
    let (status, _, _) = s
        .post(
            "/mcp/weather",
            &[
                ("authorization", format!("Bearer {mallory}")),
                with_session.clone(),
            ],
            call,
        )
        .await;
    assert_eq!(status, 404);
    // An unknown session.
    let (status, _, _) = s
        .post(
            "/mcp/weather",
            &[auth.clone(), ("mcp-session-id", "00".repeat(16))],
            call,
        )
        .await;
    assert_eq!(status, 404);
    assert_eq!(calls(&s), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modern_client_through_legacy_server() {
    let s = stack(false).await;
    let token = s.token("weather", &["tool-user"]);
    let (status, body) = s
        .modern("weather", &token, &modern_call("add", r#"{"a":1}"#))
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"result\""), "{body}");
    assert_eq!(calls(&s), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_that_hangs_gets_an_aborted_entry_and_the_stack_serves_on() {
    let s = stack(true).await;
    let token = s.token("weather", &["tool-user"]);
    s.upstream.hang.store(true, Ordering::SeqCst);
    let (status, body) = s
        .modern("weather", &token, &modern_call("add", r#"{"a":1}"#))
        .await;
    assert_eq!(status, 504, "{body}");
    let last = s.entries().pop().unwrap();
    let Event::CallResult { outcome, .. } = last else {
        panic!("{last:?}")
    };
    assert_eq!(outcome, "aborted");
    s.upstream.hang.store(false, Ordering::SeqCst);
    let (status, body) = s
        .modern("weather", &token, &modern_call("add", r#"{"a":1}"#))
        .await;
    assert_eq!(status, 200, "{body}");
}

/// The current epoch's key, from the attestation document that opened it.
fn epoch_key(s: &Stack) -> ed25519_dalek::VerifyingKey {
    let store = s.store.lock().unwrap();
    let doc = store
        .iter()
        .rev()
        .find_map(
            |b| match SignedEntry::decode(b).unwrap().entry().event.clone() {
                Event::EpochStart { attestation } => Some(attestation),
                _ => None,
            },
        )
        .unwrap();
    let parsed = attestplane_verifier::attestation::parse_attestation(&doc).unwrap();
    let raw: [u8; 32] = parsed.public_key().unwrap().try_into().unwrap();
    ed25519_dalek::VerifyingKey::from_bytes(&raw).unwrap()
}

/// The stored log verifies and its state fold re-decides every entry the gateway wrote.
fn replays(s: &Stack) {
    let store = s.store.lock().unwrap().clone();
    replay(&store, s.now).expect("the gateway's log replays");
}

/// Replays `store` as an auditor does: every signature and link, every decision re-decided.
fn replay(
    store: &[Vec<u8>],
    now: attestplane_verifier::UnixMillis,
) -> Result<(), attestplane_verifier::replay::ReplayError> {
    let at = now.checked_add_millis(60_000).unwrap();
    let mut r =
        attestplane_verifier::replay::Replay::new(log_policy(&enclave_nsm()), at, server_anchor())
            .expect("replay starts");
    r.push_round(store)?;
    r.finish().map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_call_or_result_entry_is_named_by_replay() {
    let s = stack(true).await;
    let token = s.token("weather", &["tool-user"]);
    let (status, body) = s
        .modern("weather", &token, &modern_call("add", r#"{"a":1}"#))
        .await;
    assert_eq!(status, 200, "{body}");
    let store = s.store.lock().unwrap().clone();
    replay(&store, s.now).unwrap();
    let result = store.len() - 1;
    assert_tampering_named(&store, s.now, &[result - 1, result]);
}

/// Flips a byte inside the payload of each entry at `seqs` in turn (the tail is the
/// signature) and asserts that replay names that entry.
fn assert_tampering_named(
    store: &[Vec<u8>],
    now: attestplane_verifier::UnixMillis,
    seqs: &[usize],
) {
    for &seq in seqs {
        let mut tampered = store.to_vec();
        let bytes = tampered.get_mut(seq).unwrap();
        let at = bytes.len() - 80;
        bytes[at] ^= 1;
        let e = replay(&tampered, now).unwrap_err();
        assert_eq!(e.seq(), Some(seq as u64), "{e}");
    }
}

const EMAIL: &str = "alice@example.com";
const CARD: &str = "4111 1111 1111 1111";

fn decision_at(s: &Stack, index: usize) -> attestplane_verifier::entry::DecisionRecord {
    match &s.entries()[index] {
        Event::Decision(d) => (**d).clone(),
        other => panic!("not a decision: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pii_is_redacted_before_the_server_and_before_the_agent_and_only_counted_in_the_log() {
    // The starter policy's permits say nothing about PII, so the rule is the default: redact.
    let s = stack(true).await;
    let token = s.token("weather", &["tool-user"]);
    *s.upstream.answer_text.lock().unwrap() = format!("charged card {CARD}");
    let before = s.entries().len();
    let args = format!(r#"{{"a":1,"b":2e0,"note":"mail {EMAIL}, card {CARD}"}}"#);
    let (status, body) = s
        .modern("weather", &token, &modern_call("add", &args))
        .await;
    assert_eq!(status, 200, "{body}");
    // The server saw neither value, and the rest of the message as the agent wrote it.
    let (forwarded, _) = s.upstream.last_call.lock().unwrap().clone().unwrap();
    assert!(
        !forwarded.contains(EMAIL) && !forwarded.contains(CARD),
        "{forwarded}"
    );
    assert!(forwarded.contains("[REDACTED:email]") && forwarded.contains("[REDACTED:card]"));
    assert!(forwarded.contains(r#""b":2e0"#) && forwarded.contains(r#""task":{"ttl":5}"#));
    // The agent did not get the card number back either.
    assert!(
        !body.contains(CARD) && body.contains("[REDACTED:card]"),
        "{body}"
    );
    assert!(
        body.contains(r#""vendor":1e3"#),
        "the rest of the answer byte for byte: {body}"
    );

    // The receipt covers the arguments as forwarded (redacted), so the server's check passes
    // on what it received, and fails on what the agent sent.
    let header = s.upstream.last_receipt.lock().unwrap().clone().unwrap();
    let v: serde_json::Value = serde_json::from_str(&forwarded).unwrap();
    let sent_on = v["params"]["arguments"].to_string();
    let key = epoch_key(&s);
    let received = ReceivedCall {
        audience: "https://weather.acme.example/mcp",
        method: "tools/call",
        tool: "add",
        arguments: Some(&sent_on),
    };
    verify_receipt(&header, &key, &received, s.now, &mut ReplayCache::new(4)).unwrap();
    let original = ReceivedCall {
        arguments: Some(&args),
        ..received
    };
    assert!(matches!(
        verify_receipt(&header, &key, &original, s.now, &mut ReplayCache::new(4)),
        Err(ReceiptError::OtherArguments { .. })
    ));

    // The log counts kinds; no value and no hash of one is in any entry.
    let d = decision_at(&s, before);
    let call = d
        .call
        .clone()
        .expect("a gateway call records its call section");
    assert_eq!(call.pii.action, "redact");
    assert_eq!(call.pii.counts.get("email"), Some(&1));
    assert_eq!(call.pii.counts.get("card"), Some(&1));
    let Event::CallResult { pii, outcome, .. } = &s.entries()[before + 1] else {
        panic!("no result entry");
    };
    assert_eq!(outcome, "ok");
    assert_eq!(pii.counts.get("card"), Some(&1));
    let digits: String = CARD.chars().filter(|c| c.is_ascii_digit()).collect();
    for bytes in s.store.lock().unwrap().iter() {
        let text = String::from_utf8_lossy(bytes);
        assert!(!text.contains(EMAIL) && !text.contains(CARD) && !text.contains(&digits));
        for finding in [EMAIL, CARD] {
            let h: [u8; 32] = sha2::Sha256::digest(finding.as_bytes()).into();
            assert!(
                !bytes.windows(32).any(|w| w == h),
                "a finding's hash is logged"
            );
        }
    }
    replays(&s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refuse_rule_denies_a_call_carrying_pii_and_withholds_a_result_carrying_it() {
    let s = stack_with(
        true,
        "@id(\"add-no-pii\") @pii(\"refuse\")\npermit (principal, action == Attestplane::Action::\"call\", resource == Attestplane::Tool::\"weather/add\") when { principal.roles.contains(\"tool-user\") };\n",
    )
    .await;
    let token = s.token("weather", &["tool-user"]);
    let before = s.entries().len();
    let args = format!(r#"{{"a":1,"note":"{EMAIL}"}}"#);
    let (status, body) = s
        .modern("weather", &token, &modern_call("add", &args))
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("refused") && body.contains("PII"), "{body}");
    assert_eq!(calls(&s), 0, "the call never reached the server");
    let d = decision_at(&s, before);
    assert!(!d.allowed);
    assert_eq!(d.call.as_ref().unwrap().pii.action, "refuse");

    // A clean call passes, and its result, which carries a card number, is withheld.
    *s.upstream.answer_text.lock().unwrap() = format!("card {CARD}");
    let (status, body) = s
        .modern("weather", &token, &modern_call("add", r#"{"a":1}"#))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(calls(&s), 1);
    assert!(!body.contains(CARD), "{body}");
    assert!(
        body.contains(r#""error""#) && body.contains("withheld"),
        "{body}"
    );
    let Some(Event::CallResult { outcome, pii, .. }) = s.entries().last().cloned() else {
        panic!("no result entry");
    };
    assert_eq!(outcome, "withheld");
    assert_eq!(pii.counts.get("card"), Some(&1));
    replays(&s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn argument_policies_decide_on_the_arguments_and_replay_from_their_logged_projection() {
    let s = stack_with(
        true,
        "@id(\"add-cap\") @arguments(\"a: Long, note: String\")\nforbid (principal, action == Attestplane::Action::\"call\", resource == Attestplane::Tool::\"weather/add\") unless { context.arguments has a && context.arguments.a <= 100 };\n",
    )
    .await;
    let token = s.token("weather", &["tool-user"]);
    let before = s.entries().len();
    for (args, allowed) in [
        (r#"{"a":100,"b":7,"note":"mail alice@example.com"}"#, true),
        (r#"{"a":1e3}"#, false),
        // A string where a Long is declared cannot side-step the forbid.
        (r#"{"a":"5"}"#, false),
        (r#"{"b":1}"#, false),
    ] {
        let (status, body) = s.modern("weather", &token, &modern_call("add", args)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body.contains(r#""result""#), allowed, "{args}: {body}");
    }
    assert_eq!(calls(&s), 1);
    let d = decision_at(&s, before);
    // Only the declared arguments, canonical, PII redacted: `b` and the address are not
    // logged.
    assert_eq!(
        d.call.unwrap().arguments.as_deref(),
        Some(r#"{"a":100,"note":"mail [REDACTED:email]"}"#)
    );
    let d = decision_at(&s, before + 2);
    assert_eq!(d.call.unwrap().arguments.as_deref(), Some(r#"{"a":1000}"#));
    replays(&s);
}

fn reason_of(s: &Stack, index: usize) -> Option<attestplane_verifier::reason::Reason> {
    decision_at(s, index).reason
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_over_the_rate_limit_is_refused_logged_and_never_reaches_the_server() {
    use attestplane_verifier::admin::AdminAction;
    use attestplane_verifier::gateway::limits::{RateLimit, ScopeKind};
    let limits = AdminAction::SetLimits {
        rates: vec![RateLimit {
            scope: ScopeKind::Agent,
            rate_per_minute: 6,
            burst: 2,
        }],
        spends: vec![],
    };
    let s = stack_full(true, "", &[], Some(limits)).await;
    let token = s.token("weather", &["tool-user"]);
    let before = s.entries().len();
    let mut answers = Vec::new();
    for _ in 0..4 {
        let (status, body) = s
            .modern("weather", &token, &modern_call("add", r#"{"a":1}"#))
            .await;
        assert_eq!(status, 200, "{body}");
        answers.push(body.contains(r#""result""#));
    }
    // The enclave's clock stands still here: a burst of 2, then nothing until the GCRA
    // interval (10 s at 6 a minute) passes.
    assert_eq!(answers, [true, true, false, false]);
    assert_eq!(calls(&s), 2, "refused calls never reached the server");
    let refused: Vec<_> = s.entries()[before..]
        .iter()
        .filter_map(|e| match e {
            Event::Decision(d) if !d.allowed => d.reason.clone(),
            _ => None,
        })
        .collect();
    assert_eq!(
        refused,
        vec![
            attestplane_verifier::reason::Reason::RateLimited {
                scope: "agent".into()
            };
            2
        ]
    );
    // The verifier replays the GCRA state from the logged times and agrees on every verdict.
    replays(&s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spend_over_the_cap_is_refused_and_each_allowed_call_logs_its_price() {
    use attestplane_verifier::admin::AdminAction;
    use attestplane_verifier::gateway::limits::{ScopeKind, SpendCap};
    let limits = AdminAction::SetLimits {
        rates: vec![],
        spends: vec![SpendCap {
            scope: ScopeKind::Tenant,
            asset: "USDC".into(),
            cap: 100,
            window_ms: 3_600_000,
        }],
    };
    let s = stack_full(true, "", &[("add", 40, "USDC")], Some(limits)).await;
    let token = s.token("weather", &["tool-user"]);
    let before = s.entries().len();
    for expected in [true, true, false] {
        let (status, body) = s
            .modern("weather", &token, &modern_call("add", r#"{"a":1}"#))
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body.contains(r#""result""#), expected, "{body}");
    }
    assert_eq!(calls(&s), 2);
    let first = decision_at(&s, before).call.unwrap();
    let price = first.price.unwrap();
    assert_eq!((price.amount, price.asset.as_str()), (40, "USDC"));
    assert_eq!(
        reason_of(&s, before + 4),
        Some(attestplane_verifier::reason::Reason::SpendCapReached {
            scope: "tenant".into(),
            asset: "USDC".into()
        })
    );
    replays(&s);
}

/// A policy that keeps `add` to attested servers and lets tool-users call anything else.
const NITRO_ONLY_ADD: &str = r#"
@id("calls") permit (principal, action == Attestplane::Action::"call", resource)
  when { principal.roles.contains("tool-user") };
@id("add-attested-only") forbid (principal, action == Attestplane::Action::"call", resource == Attestplane::Tool::"weather/add")
  unless { context.server_assurance == "nitro" };
"#;

/// A stack under [`NITRO_ONLY_ADD`] whose registration is `plain` or attested.
async fn nitro_only_add_stack(modern: bool, plain: bool) -> Stack {
    let opts = Opts {
        policy: Some(NITRO_ONLY_ADD.into()),
        plain,
        ..Opts::default()
    };
    stack_opts(modern, "", &[], None, opts).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_servers_tool_under_a_nitro_only_policy_is_refused_and_withheld_from_the_listing() {
    for modern in [true, false] {
        let plain = nitro_only_add_stack(modern, true).await;
        let token = plain.token("weather", &["tool-user"]);
        let (status, body) = plain.modern("weather", &token, MODERN_LIST).await;
        assert_eq!(status, 200, "{body}");
        assert!(
            body.contains(r#""name":"echo""#),
            "the other tool is shown: {body}"
        );
        assert!(
            !body.contains(r#""name":"add""#),
            "withheld from the listing: {body}"
        );
        let before = plain.entries().len();
        let (_, body) = plain
            .modern("weather", &token, &modern_call("add", r#"{"a":1}"#))
            .await;
        assert!(body.contains("\"error\""), "{body}");
        assert_eq!(
            calls(&plain),
            0,
            "the refused call never reaches the server"
        );
        let d = decision_at(&plain, before);
        assert!(!d.allowed);
        assert_eq!(
            d.reason,
            Some(attestplane_verifier::reason::Reason::Forbidden {
                policies: vec!["add-attested-only".into()]
            })
        );
        // The same tool on the plain server's neighbour is callable: the policy is what
        // refuses, on the registration's level.
        let (status, body) = plain
            .modern("weather", &token, &modern_call("echo", r#"{"text":"hi"}"#))
            .await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("\"result\""), "{body}");
        assert_eq!(calls(&plain), 1);
        replays(&plain);

        // The same policy on the attested registration lets `add` through and shows it.
        let attested = nitro_only_add_stack(modern, false).await;
        let token = attested.token("weather", &["tool-user"]);
        let (_, body) = attested.modern("weather", &token, MODERN_LIST).await;
        assert!(body.contains(r#""name":"add""#), "{body}");
        let (_, body) = attested
            .modern("weather", &token, &modern_call("add", r#"{"a":1}"#))
            .await;
        assert!(body.contains("\"result\""), "{body}");
        replays(&attested);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_over_a_pii_scan_limit_is_aborted_naming_the_limit_and_the_stack_serves_on() {
    let s = stack(true).await;
    let token = s.token("weather", &["tool-user"]);
    // More findings than the scanner counts: an answer the gateway cannot scan is never
    // passed on, under any rule.
    *s.upstream.answer_text.lock().unwrap() =
        vec!["a@b.example"; attestplane_verifier::gateway::pii::MAX_FINDINGS + 1].join(" ");
    let (status, body) = s
        .modern("weather", &token, &modern_call("add", r#"{"a":1}"#))
        .await;
    assert_eq!(status, 502, "{body}");
    assert!(
        body.contains("could not be scanned for PII: more than 10000 findings"),
        "{body}"
    );
    assert!(!body.contains("a@b.example"), "{body}");
    let last = s.entries().pop().unwrap();
    let Event::CallResult { outcome, .. } = last else {
        panic!("{last:?}")
    };
    assert_eq!(outcome, "aborted");
    *s.upstream.answer_text.lock().unwrap() = "3".into();
    let (status, body) = s
        .modern("weather", &token, &modern_call("add", r#"{"a":1}"#))
        .await;
    assert_eq!(status, 200, "{body}");
    replays(&s);
}

/// Resources under `file:///docs/` and the prompt `greet` for readers; nothing else (the
/// starter policy permits no resource or prompt).
const READERS: &str = r#"
@id("read-docs")
permit (principal, action == Attestplane::Action::"read_resource", resource)
  when { principal.roles.contains("reader") && resource.uri like "file:///docs/*" };
@id("greet")
permit (principal, action == Attestplane::Action::"get_prompt", resource == Attestplane::Prompt::"weather/greet")
  when { principal.roles.contains("reader") };
"#;

impl Stack {
    /// A legacy-era session for `token`.
    async fn session(&self, token: &str) -> String {
        let init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;
        let auth = ("authorization", format!("Bearer {token}"));
        let (status, headers, body) = self
            .post("/mcp/weather", std::slice::from_ref(&auth), init)
            .await;
        assert_eq!(status, 200, "{body}");
        headers
            .get("mcp-session-id")
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned()
    }

    /// Sends `method` with `params` (a JSON object's members, may be empty) to `weather` as an
    /// agent of the modern era or (with a fresh session) the legacy one.
    async fn ask(&self, modern: bool, token: &str, method: &str, params: &str) -> (u16, String) {
        if modern {
            let sep = if params.is_empty() { "" } else { "," };
            let body = format!(
                r#"{{"jsonrpc":"2.0","id":9,"method":"{method}","params":{{{params}{sep}"_meta":{{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}}}}"#
            );
            self.modern("weather", token, &body).await
        } else {
            let session = self.session(token).await;
            let body =
                format!(r#"{{"jsonrpc":"2.0","id":9,"method":"{method}","params":{{{params}}}}}"#);
            let (status, _, body) = self
                .post(
                    "/mcp/weather",
                    &[
                        ("authorization", format!("Bearer {token}")),
                        ("mcp-session-id", session),
                    ],
                    &body,
                )
                .await;
            (status, body)
        }
    }
}

fn reads(s: &Stack) -> usize {
    s.upstream.reads.load(Ordering::SeqCst)
}

/// Every (agent era, upstream era) pair.
const ERAS: [(bool, bool); 4] = [(true, true), (true, false), (false, true), (false, false)];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permitted_resource_read_and_prompt_get_are_logged_like_calls_and_forwarded_byte_for_byte()
 {
    for (agent_modern, upstream_modern) in ERAS {
        let s = stack_with(upstream_modern, READERS).await;
        let token = s.token("weather", &["reader"]);
        let before = s.entries().len();
        let (status, body) = s
            .ask(
                agent_modern,
                &token,
                "resources/read",
                r#""uri":"file:///docs/a","x-vendor":1e3"#,
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let want = if agent_modern {
            r#"{"jsonrpc":"2.0","id":9,"result":{"contents":[{"uri":"file:///docs/a","text":"hello","x":1e3}],"resultType":"complete"}}"#
        } else {
            r#"{"jsonrpc":"2.0","id":9,"result":{"contents":[{"uri":"file:///docs/a","text":"hello","x":1e3}]}}"#
        };
        assert_eq!(body, want, "the answer byte for byte");
        assert_eq!(reads(&s), 1);
        let (forwarded, header) = s.upstream.last_read.lock().unwrap().clone().unwrap();
        assert!(forwarded.contains(r#""x-vendor":1e3"#), "{forwarded}");
        let events = s.entries();
        let new = &events[before..];
        assert_eq!(new.len(), 2, "a decision and a result: {new:?}");
        let d = decision_at(&s, before);
        assert!(d.allowed);
        assert_eq!(d.action, "read_resource");
        assert_eq!(d.tool.as_deref(), Some("file:///docs/a"));
        assert_eq!(d.policies, vec!["read-docs".to_owned()]);
        let Event::CallResult { call, outcome, .. } = &new[1] else {
            panic!("{:?}", new[1])
        };
        assert_eq!((*call as usize, outcome.as_str()), (before, "ok"));
        // The receipt names the method and the URI, for this read only.
        let header = header.expect("a receipt header");
        let v: serde_json::Value = serde_json::from_str(&forwarded).unwrap();
        assert_eq!(v["params"]["_meta"]["io.attestplane/receipt"], header);
        let received = ReceivedCall {
            audience: "https://weather.acme.example/mcp",
            method: "resources/read",
            tool: "file:///docs/a",
            arguments: None,
        };
        let verified = verify_receipt(
            &header,
            &epoch_key(&s),
            &received,
            s.now,
            &mut ReplayCache::new(4),
        )
        .unwrap();
        assert_eq!(verified.claims().seq as usize, before);

        // A prompt, its arguments scanned: the starter's default rule redacts, so the server
        // gets the redacted argument and the agent the redacted answer.
        let before = s.entries().len();
        let (status, body) = s
            .ask(
                agent_modern,
                &token,
                "prompts/get",
                r#""name":"greet","arguments":{"who":"alice@example.com"}"#,
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("[REDACTED:email]"), "{body}");
        assert!(!body.contains("bob@example.com"), "{body}");
        assert!(body.contains(r#""x":1e3"#), "{body}");
        let (forwarded, _) = s.upstream.last_read.lock().unwrap().clone().unwrap();
        assert!(
            !forwarded.contains("alice@example.com") && forwarded.contains("[REDACTED:email]"),
            "{forwarded}"
        );
        let d = decision_at(&s, before);
        assert!(d.allowed);
        assert_eq!(d.action, "get_prompt");
        assert_eq!(d.tool.as_deref(), Some("greet"));
        let c = d.call.unwrap();
        assert_eq!(c.pii.action, "redact");
        assert_eq!(c.pii.counts.get("email"), Some(&1));
        assert_eq!(reads(&s), 2);
        replays(&s);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpermitted_reads_and_prompts_are_refused_with_a_typed_reason_and_never_reach_the_server()
{
    use attestplane_verifier::reason::Reason;
    for (agent_modern, upstream_modern) in ERAS {
        let s = stack_with(upstream_modern, READERS).await;
        let reader = s.token("weather", &["reader"]);
        let tool_user = s.token("weather", &["tool-user"]);
        let cases: [(&String, &str, &str, &str); 4] = [
            (
                &reader,
                "resources/read",
                r#""uri":"file:///etc/passwd""#,
                "read_resource",
            ),
            (&reader, "prompts/get", r#""name":"secret""#, "get_prompt"),
            (
                &tool_user,
                "resources/read",
                r#""uri":"file:///docs/a""#,
                "read_resource",
            ),
            (&tool_user, "prompts/get", r#""name":"greet""#, "get_prompt"),
        ];
        for (token, method, params, action) in cases {
            let before = s.entries().len();
            let (status, body) = s.ask(agent_modern, token, method, params).await;
            assert_eq!(status, 200, "{body}");
            assert!(body.contains("\"error\""), "{method} {params}: {body}");
            let d = decision_at(&s, before);
            assert!(!d.allowed);
            assert_eq!(d.action, action);
            assert_eq!(d.reason, Some(Reason::NoPermit), "{method} {params}");
            assert_eq!(
                s.entries().len(),
                before + 1,
                "a refusal has no result entry"
            );
        }
        assert_eq!(reads(&s), 0, "no refused read reaches the server");
        // The starter policy alone permits no resource and no prompt.
        let bare = stack(upstream_modern).await;
        let token = bare.token("weather", &["reader", "tool-user"]);
        let (_, body) = bare
            .ask(
                agent_modern,
                &token,
                "resources/read",
                r#""uri":"file:///docs/a""#,
            )
            .await;
        assert!(body.contains("\"error\""), "{body}");
        assert_eq!(reads(&bare), 0);
        // Subscriptions stay refused.
        let (_, body) = s
            .ask(
                agent_modern,
                &reader,
                "resources/subscribe",
                r#""uri":"file:///docs/a""#,
            )
            .await;
        assert!(body.contains("-32601"), "{body}");
        replays(&s);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resource_template_and_prompt_listings_are_filtered_per_identity() {
    for (agent_modern, upstream_modern) in ERAS {
        let s = stack_with(upstream_modern, READERS).await;
        let reader = s.token("weather", &["reader"]);
        let other = s.token("weather", &["tool-user"]);
        let tail = if agent_modern {
            r#","resultType":"complete","ttlMs":0,"cacheScope":"private""#
        } else {
            ""
        };
        let (status, body) = s.ask(agent_modern, &reader, "resources/list", "").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body,
            format!(
                r#"{{"jsonrpc":"2.0","id":9,"result":{{"resources":[{{"uri":"file:///docs/a","name":"a","size":1e3}}],"nextCursor":"page-2","x-vendor":1e3{tail}}}}}"#
            ),
            "the permitted resource only; cursor, vendor members and numbers kept"
        );
        let (_, body) = s.ask(agent_modern, &other, "resources/list", "").await;
        assert!(body.contains(r#""resources":[]"#), "{body}");
        let (_, body) = s
            .ask(agent_modern, &reader, "resources/templates/list", "")
            .await;
        assert!(
            body.contains(r#""uriTemplate":"file:///docs/{name}""#),
            "{body}"
        );
        assert!(!body.contains("file:///etc/"), "{body}");
        let (_, body) = s.ask(agent_modern, &reader, "prompts/list", "").await;
        assert!(body.contains(r#""name":"greet""#), "{body}");
        assert!(!body.contains("secret"), "{body}");
        let (_, body) = s.ask(agent_modern, &other, "prompts/list", "").await;
        assert!(body.contains(r#""prompts":[]"#), "{body}");
        assert_eq!(reads(&s), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_resource_or_prompt_entry_is_named_by_replay() {
    let s = stack_with(true, READERS).await;
    let token = s.token("weather", &["reader"]);
    let (status, body) = s
        .ask(true, &token, "resources/read", r#""uri":"file:///docs/a""#)
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = s
        .ask(true, &token, "prompts/get", r#""name":"secret""#)
        .await;
    assert_eq!(status, 200, "{body}");
    let store = s.store.lock().unwrap().clone();
    replay(&store, s.now).unwrap();
    // The read's decision and result, and the refused prompt's decision.
    let last = store.len() - 1;
    assert_tampering_named(&store, s.now, &[last - 2, last - 1, last]);
}

const SAMPLING: &str =
    r#"{"s1":{"method":"sampling/createMessage","params":{"messages":[],"maxTokens":5}}}"#;
const ELICITATION: &str =
    r#"{"e1":{"method":"elicitation/create","params":{"message":"ok?","requestedSchema":{}}}}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_to_client_requests_reach_the_agent_only_when_the_registration_allows_them() {
    use attestplane_verifier::admin::ClientRequest;
    // Refused by default: the registration allows nothing.
    let s = stack(true).await;
    let token = s.token("weather", &["tool-user"]);
    *s.upstream.input_required.lock().unwrap() = Some(SAMPLING.into());
    let (status, body) = s
        .modern("weather", &token, &modern_call("add", r#"{"a":1}"#))
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("\"error\"") && body.contains("sampling"),
        "{body}"
    );
    assert!(
        !body.contains("createMessage\",\"params"),
        "the agent never sees it: {body}"
    );
    let Some(Event::CallResult { outcome, .. }) = s.entries().pop() else {
        panic!("no result entry")
    };
    assert_eq!(outcome, "error");
    replays(&s);

    // Allowed when registered; another kind the server was not registered for is refused.
    let s = stack_opts(
        true,
        "",
        &[],
        None,
        Opts {
            client_requests: vec![ClientRequest::Sampling],
            ..Opts::default()
        },
    )
    .await;
    let token = s.token("weather", &["tool-user"]);
    *s.upstream.input_required.lock().unwrap() = Some(SAMPLING.into());
    let (_, body) = s
        .modern("weather", &token, &modern_call("add", r#"{"a":1}"#))
        .await;
    assert!(
        body.contains(r#""resultType":"input_required""#) && body.contains(SAMPLING),
        "relayed byte for byte: {body}"
    );
    let Some(Event::CallResult { outcome, .. }) = s.entries().pop() else {
        panic!("no result entry")
    };
    assert_eq!(outcome, "ok");
    *s.upstream.input_required.lock().unwrap() = Some(ELICITATION.into());
    let (_, body) = s
        .modern("weather", &token, &modern_call("add", r#"{"a":1}"#))
        .await;
    assert!(
        body.contains("\"error\"") && body.contains("elicitation"),
        "{body}"
    );
    assert!(!body.contains("requestedSchema"), "{body}");
    // A legacy agent cannot answer a request inside a result: refused too.
    *s.upstream.input_required.lock().unwrap() = Some(SAMPLING.into());
    let (_, body) = s
        .ask(
            false,
            &token,
            "tools/call",
            r#""name":"add","arguments":{"a":1}"#,
        )
        .await;
    assert!(body.contains("\"error\""), "{body}");
    assert!(!body.contains("maxTokens"), "{body}");
    replays(&s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legacy_servers_sampling_request_mid_call_is_refused_at_once_and_the_call_ends_with_its_answer()
 {
    use attestplane_verifier::admin::ClientRequest;
    // A legacy upstream whose tool asks the client for sampling on the call's SSE stream and
    // waits for the answer. The old gateway dropped the request like a notification: the
    // server never heard back and the call ended `aborted` at the upstream timeout (504).
    let s = stack(false).await;
    let token = s.token("weather", &["tool-user"]);
    *s.upstream.ask_client.lock().unwrap() = Some(("sampling/createMessage".into(), 1));
    let (status, body) = s
        .modern("weather", &token, &modern_call("add", r#"{"a":1}"#))
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("the client refused: -32601") && body.contains("\"isError\":true"),
        "the server's own answer, after it saw the refusal: {body}"
    );
    assert!(
        !body.contains("maxTokens"),
        "the agent never sees the request: {body}"
    );
    {
        let responses = s.upstream.client_responses.lock().unwrap();
        assert_eq!(responses.len(), 1, "{responses:?}");
        let (r, session) = &responses[0];
        assert_eq!(r["id"], "ask-0", "{r}");
        assert_eq!(r["error"]["code"], -32601, "{r}");
        assert!(
            r["error"]["message"]
                .as_str()
                .unwrap()
                .contains("sampling/createMessage"),
            "{r}"
        );
        assert_eq!(
            session.as_deref(),
            Some("upstream-session"),
            "POSTed to the upstream's session"
        );
    }
    let Some(Event::CallResult { outcome, .. }) = s.entries().pop() else {
        panic!("no result entry")
    };
    assert_eq!(outcome, "error", "the agent got a tool error");
    replays(&s);

    // Registered for sampling, and a modern agent: still refused at once (a modern agent has no
    // session to answer a legacy server's request from; a legacy agent gets it relayed:
    // `a_legacy_servers_allowed_sampling_request_is_relayed_to_the_agent_...`). The call ends
    // with the server's answer all the same.
    let s = stack_opts(
        false,
        "",
        &[],
        None,
        Opts {
            client_requests: vec![ClientRequest::Sampling],
            ..Opts::default()
        },
    )
    .await;
    let token = s.token("weather", &["tool-user"]);
    *s.upstream.ask_client.lock().unwrap() = Some(("sampling/createMessage".into(), 1));
    let (status, body) = s
        .ask(
            true,
            &token,
            "tools/call",
            r#""name":"add","arguments":{"a":1}"#,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("the client refused: -32601"), "{body}");
    assert_eq!(s.upstream.client_responses.lock().unwrap().len(), 1);
    replays(&s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legacy_server_flooding_requests_mid_call_is_aborted_and_the_stack_serves_on() {
    use attestplane_enclave::gateway::upstream::MAX_SERVER_REQUESTS;
    let s = stack(false).await;
    let token = s.token("weather", &["tool-user"]);
    *s.upstream.ask_client.lock().unwrap() = Some(("ping".into(), MAX_SERVER_REQUESTS + 1));
    let (status, body) = s
        .modern("weather", &token, &modern_call("add", r#"{"a":1}"#))
        .await;
    assert_eq!(status, 502, "{body}");
    assert!(
        body.contains("too many server-to-client requests"),
        "{body}"
    );
    let Some(Event::CallResult { outcome, .. }) = s.entries().pop() else {
        panic!("no result entry")
    };
    assert_eq!(outcome, "aborted");
    {
        let responses = s.upstream.client_responses.lock().unwrap();
        assert!(
            responses.len() <= MAX_SERVER_REQUESTS,
            "{}",
            responses.len()
        );
        // A ping is answered with its empty result, not refused.
        for (r, _) in responses.iter() {
            assert_eq!(r["result"], serde_json::json!({}), "{r}");
        }
    }
    *s.upstream.ask_client.lock().unwrap() = None;
    let (status, body) = s
        .modern("weather", &token, &modern_call("add", r#"{"a":1}"#))
        .await;
    assert_eq!(status, 200, "{body}");
    replays(&s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_listing_of_long_names_is_logged_within_the_entry_limit_and_the_pinned_tool_stays_callable()
 {
    use attestplane_verifier::entry::MAX_ENTRY_LEN;
    // A hostile upstream lists thousands of unpinned tools with long names, and one name of
    // 200,000 bytes. The old drift entry recorded each under its name: it was over the entry
    // limit, the writer refused it, and the endpoint's listings and calls failed (500) for as
    // long as the server listed them (and the writer before that chained it: the log
    // stalled). A name longer than any call can carry is now `invalid` by position, so the
    // drift entry stays within the limit, is logged, and the pinned tool stays callable.
    let s = stack(true).await;
    let token = s.token("weather", &["tool-user"]);
    {
        let mut tools = s.upstream.tools.lock().unwrap();
        for i in 0..4000 {
            tools.push(format!(
                r#"{{"name":"t{i:04}-{}","inputSchema":{{"type":"object"}}}}"#,
                "n".repeat(300)
            ));
        }
        tools.push(format!(
            r#"{{"name":"{}","inputSchema":{{}}}}"#,
            "h".repeat(200_000)
        ));
        // Names of the longest a call can carry: unpinned, under their names.
        for i in 0..90 {
            tools.push(format!(
                r#"{{"name":"u{i:02}{}","inputSchema":{{}}}}"#,
                "é".repeat(62)
            ));
        }
    }
    let (status, body) = s.modern("weather", &token, MODERN_LIST).await;
    assert_eq!(status, 200, "{}", &body[..body.len().min(300)]);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let names: Vec<&str> = v["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["add"],
        "the hostile tools are withheld (echo by the policy)"
    );
    let (status, body) = s
        .modern("weather", &token, &modern_call("add", r#"{"a":1}"#))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(calls(&s), 1);
    let drift = s
        .entries()
        .into_iter()
        .find_map(|e| match e {
            Event::ToolDrift { drift, .. } => Some(drift),
            _ => None,
        })
        .expect("the drift is logged");
    assert_eq!(drift.len(), 4091, "one record per hostile tool");
    assert_eq!(
        drift.iter().filter(|d| d.kind == "invalid").count(),
        4001,
        "too long to name: by position"
    );
    assert!(drift.iter().all(|d| d.name.len() <= 128));
    assert!(
        s.store
            .lock()
            .unwrap()
            .iter()
            .all(|e| e.len() <= MAX_ENTRY_LEN)
    );
    replays(&s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withheld_tools_call_is_answered_like_a_policy_denial_and_an_undecidable_call_400() {
    // The documented table (ARCHITECTURE.md, "Statuses"): a request the gateway decided and
    // refused is a JSON-RPC error in a 200; a request that cannot be decided as sent is a 400.
    let s = stack(true).await;
    let token = s.token("weather", &["tool-user"]);
    let code = |body: &str| {
        serde_json::from_str::<serde_json::Value>(body).unwrap()["error"]["code"].as_i64()
    };
    // Denied by the policy (`no-echo`): 200, -32602, with a decision entry.
    let (status, body) = s
        .modern("weather", &token, &modern_call("echo", r#"{"t":"x"}"#))
        .await;
    assert_eq!((status, code(&body)), (200, Some(-32602)), "{body}");
    // Withheld: a tool the server never listed, and a pinned tool the server changed.
    let (status, body) = s
        .modern("weather", &token, &modern_call("nope", r#"{"a":1}"#))
        .await;
    assert_eq!((status, code(&body)), (200, Some(-32602)), "{body}");
    assert!(body.contains("withheld"), "{body}");
    *s.upstream.tools.lock().unwrap() =
        vec![ADD.replace("Adds two", "Adds\u{200b} two"), ECHO.to_owned()];
    let (_, body) = s.modern("weather", &token, MODERN_LIST).await;
    assert!(!body.contains("\"add\""), "{body}");
    for modern in [true, false] {
        let (status, body) = s
            .ask(
                modern,
                &token,
                "tools/call",
                r#""name":"add","arguments":{"a":1}"#,
            )
            .await;
        assert_eq!((status, code(&body)), (200, Some(-32602)), "{body}");
        assert!(body.contains("withheld"), "{body}");
    }
    // Cannot be decided as sent: arguments that are not I-JSON, arguments that are not an
    // object: 400 with -32602.
    for args in [r#"{"a":9007199254740993}"#, "[1]"] {
        let (status, body) = s
            .modern("weather", &token, &modern_call("echo", args))
            .await;
        assert_eq!((status, code(&body)), (400, Some(-32602)), "{args}: {body}");
    }
    assert_eq!(calls(&s), 0, "nothing reached the server");
    replays(&s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legacy_servers_request_on_its_session_stream_is_refused_at_once() {
    // A legacy server may ask outside any call, on the session's GET stream (the PyPI `mcp`
    // SDK sends `roots/list` there). The old gateway's listener ignored it, so whatever waited
    // on it in the server waited for ever.
    let s = stack(false).await;
    let token = s.token("weather", &["tool-user"]);
    let (status, body) = s.modern("weather", &token, MODERN_LIST).await;
    assert_eq!(status, 200, "{body}");
    // The listing starts the listener on the session's stream.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let stream = loop {
        if let Some(tx) = s.upstream.get_stream.lock().unwrap().clone() {
            break tx;
        }
        assert!(tokio::time::Instant::now() < deadline, "no GET stream");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    stream
        .send(Bytes::from_static(
            b"event: message\r\ndata: {\"jsonrpc\":\"2.0\",\"id\":41,\"method\":\"roots/list\"}\r\n\r\n",
        ))
        .await
        .unwrap();
    let answered = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let notified = s.upstream.client_responded.notified();
            if let Some(r) = s.upstream.client_responses.lock().unwrap().first().cloned() {
                return r;
            }
            notified.await;
        }
    })
    .await;
    let (r, session) = answered.expect("the server's request was never answered");
    assert_eq!(r["id"], 41, "{r}");
    assert_eq!(r["error"]["code"], -32601, "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("roots/list"),
        "{r}"
    );
    assert_eq!(session.as_deref(), Some("upstream-session"));
    // The stack serves on.
    let (status, body) = s
        .modern("weather", &token, &modern_call("add", r#"{"a":1}"#))
        .await;
    assert_eq!(status, 200, "{body}");
}

/// A modern-era `tools/call` is read and parsed before its token is checked (so that it is
/// authenticated and decided in one trip to the handler thread): a caller without a valid
/// token must still get its 401 whatever it sent, and nothing may be decided, written or
/// forwarded for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthenticated_tools_call_gets_401_whatever_its_body_and_nothing_is_decided() {
    let s = stack(true).await;
    // One allowed call first: the listing is cached, so the one-trip path is the one taken.
    let token = s.token("weather", &["tool-user"]);
    let (status, body) = s
        .modern("weather", &token, &modern_call("add", r#"{"a":1,"b":2}"#))
        .await;
    assert_eq!(status, 200, "{body}");
    let before = s.entries().len();
    let served = calls(&s);
    let other = s.token("other", &["tool-user"]);
    let bodies = [
        modern_call("add", r#"{"a":1,"b":2}"#),
        modern_call("add", r#"{"a":1e400,"b":2}"#),
        modern_call("add", r#"[1,2]"#),
        "{\"jsonrpc\":".to_owned(),
    ];
    for (who, bearer) in [
        ("another endpoint's token", other.as_str()),
        ("garbage", "x.y.z"),
    ] {
        for body in &bodies {
            let headers = [
                ("authorization", format!("Bearer {bearer}")),
                ("mcp-protocol-version", "2026-07-28".to_owned()),
                ("mcp-method", "tools/call".to_owned()),
                ("mcp-name", "add".to_owned()),
            ];
            let (status, h, answer) = s.post("/mcp/weather", &headers, body).await;
            assert_eq!(status, 401, "{who}, {body}: {answer}");
            assert!(h.get("www-authenticate").is_some(), "{who}, {body}");
        }
    }
    assert_eq!(
        s.entries().len(),
        before,
        "an unauthenticated call was logged"
    );
    assert_eq!(
        calls(&s),
        served,
        "an unauthenticated call reached the server"
    );
}

/// A refusal answers with the JSON-RPC id of the request it refuses whenever that id can be
/// read: the old gateway answered a refused listing (and the call that needed it, and a
/// refused token) with `"id": null`, which a client cannot match to its request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_listing_and_other_refusals_carry_the_requests_id_not_null() {
    let s = stack(true).await;
    let token = s.token("weather", &["tool-user"]);
    let id_of = |body: &str| serde_json::from_str::<serde_json::Value>(body).unwrap()["id"].clone();
    // A listing the upstream answers with garbage: 502, and the id is the listing's.
    s.upstream.list_garbage.store(true, Ordering::SeqCst);
    let (status, body) = s.modern("weather", &token, MODERN_LIST).await;
    assert_eq!(status, 502);
    assert_eq!(id_of(&body), "l1", "{body}");
    // The call that needed that listing: refused with its own id.
    let (status, body) = s
        .modern("weather", &token, &modern_call("add", r#"{"a":1}"#))
        .await;
    assert_eq!(status, 502);
    assert_eq!(id_of(&body), 7, "{body}");
    // The legacy era's listing, refused the same way.
    let (status, body) = s.ask(false, &token, "tools/list", r#""cursor":"c""#).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(id_of(&body), 9, "{body}");
    assert_eq!(calls(&s), 0);
    s.upstream.list_garbage.store(false, Ordering::SeqCst);
    // A token for another endpoint: 401, with the request's id.
    let other = s.token("elsewhere", &["tool-user"]);
    let (status, body) = s.modern("weather", &other, MODERN_LIST).await;
    assert_eq!(status, 401);
    assert_eq!(id_of(&body), "l1", "{body}");
    let (status, body) = s
        .modern("weather", &other, &modern_call("add", r#"{"a":1}"#))
        .await;
    assert_eq!(status, 401);
    assert_eq!(id_of(&body), 7, "{body}");
    // A body that is not a request the gateway reads, but whose id is plain.
    let (status, _, body) = s
        .post(
            "/mcp/weather",
            &[("authorization", format!("Bearer {token}"))],
            r#"{"jsonrpc":"1.0","id":"bad-1","method":"tools/list"}"#,
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(id_of(&body), "bad-1", "{body}");
    // A response where the gateway asked nothing.
    let (status, _, body) = s
        .post(
            "/mcp/weather",
            &[("authorization", format!("Bearer {token}"))],
            r#"{"jsonrpc":"2.0","id":"r-9","result":{}}"#,
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(id_of(&body), "r-9", "{body}");
    replays(&s);
}

/// An open SSE answer to an agent, read event by event.
struct AgentStream {
    body: hyper::body::Incoming,
    buffer: String,
}

impl AgentStream {
    /// The next event's data as JSON (`None` when the stream ended).
    async fn next(&mut self) -> Option<serde_json::Value> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let event: String = self.buffer.drain(..end + 2).collect();
                let data: Vec<&str> = event
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(|d| d.strip_prefix(' ').unwrap_or(d))
                    .collect();
                if data.is_empty() {
                    continue;
                }
                return Some(serde_json::from_str(&data.join("\n")).unwrap());
            }
            let frame = tokio::time::timeout(Duration::from_secs(10), self.body.frame())
                .await
                .expect("the stream stalled")?
                .unwrap();
            if let Ok(data) = frame.into_data() {
                self.buffer.push_str(std::str::from_utf8(&data).unwrap());
            }
        }
    }
}

impl Stack {
    /// A token for agent `agent` at `weather`'s endpoint.
    fn token_for(&self, agent: &str) -> String {
        let mut claims = self.idp.claims(agent, "acme", &["tool-user"], self.now);
        claims["aud"] = serde_json::json!(self.config.resource("weather"));
        self.idp.sign_claims(&claims)
    }

    /// Sends a legacy agent's `body` in `session` and returns the answer's status, content type
    /// and body, unread.
    async fn open_legacy(
        &self,
        token: &str,
        session: &str,
        body: &str,
    ) -> (u16, String, hyper::body::Incoming) {
        let stream = TcpStream::connect(self.agent).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = hyper::Request::post("/mcp/weather")
            .header("host", "gateway")
            .header("authorization", format!("Bearer {token}"))
            .header("mcp-session-id", session)
            .header("mcp-protocol-version", "2025-11-25")
            .header("accept", "application/json, text/event-stream")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let kind = resp
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        (status, kind, resp.into_body())
    }

    /// A legacy agent POSTs `response` in `session`: the status and body.
    async fn respond(&self, token: &str, session: &str, response: &str) -> (u16, String) {
        let (status, _, body) = self
            .post(
                "/mcp/weather",
                &[
                    ("authorization", format!("Bearer {token}")),
                    ("mcp-session-id", session.to_owned()),
                    ("mcp-protocol-version", "2025-11-25".to_owned()),
                ],
                response,
            )
            .await;
        (status, body)
    }
}

const LEGACY_ADD: &str =
    r#"{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":"add","arguments":{"a":1}}}"#;

/// A legacy server's sampling request mid-call, the registration allowing sampling, a legacy
/// agent: the old gateway refused it (`-32601`) whatever the registration said. Now the agent
/// gets it on the call's SSE stream under a gateway id, its answer reaches the server under the
/// server's id, and the call ends on the same stream; both directions follow the call's PII
/// rule (here `redact`). Responses forged from another agent's
/// session, from another session of the same agent, or to a guessed id are refused and change
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legacy_servers_allowed_sampling_request_is_relayed_to_the_agent_and_forged_answers_are_refused()
 {
    use attestplane_verifier::admin::ClientRequest;
    let s = stack_opts(
        false,
        "",
        &[],
        None,
        Opts {
            client_requests: vec![ClientRequest::Sampling],
            ..Opts::default()
        },
    )
    .await;
    let alice = s.token("weather", &["tool-user"]);
    let mallory = s.token_for("mallory");
    let session = s.session(&alice).await;
    let other_session = s.session(&alice).await;
    let mallorys = s.session(&mallory).await;
    *s.upstream.ask_client.lock().unwrap() = Some(("sampling/createMessage".into(), 1));
    let (status, kind, body) = s.open_legacy(&alice, &session, LEGACY_ADD).await;
    assert_eq!(status, 200);
    assert!(kind.starts_with("text/event-stream"), "{kind}");
    let mut stream = AgentStream {
        body,
        buffer: String::new(),
    };
    let asked = stream.next().await.expect("the relayed request");
    assert_eq!(asked["method"], "sampling/createMessage", "{asked}");
    assert_eq!(asked["params"]["maxTokens"], 5, "{asked}");
    // The call's PII rule (`redact`: the permit says nothing) applies to what is relayed.
    assert_eq!(
        asked["params"]["systemPrompt"], "reply to [REDACTED:email]",
        "{asked}"
    );
    let gid = asked["id"].as_str().expect("a string id").to_owned();
    assert!(
        gid.starts_with("attestplane-relay-") && gid.len() == "attestplane-relay-".len() + 32,
        "a gateway id, never the server's: {gid}"
    );
    let answer = |id: &str| {
        format!(
            r#"{{"jsonrpc":"2.0","id":"{id}","result":{{"role":"assistant","content":{{"type":"text","text":"sunny, ask carol@example.com"}},"model":"m-1"}}}}"#
        )
    };
    // Forged: another agent in its own session, the same agent in another session, a guessed
    // id. Each is refused with a typed error and none reaches the server.
    for (token, sess, id) in [
        (&mallory, &mallorys, gid.clone()),
        (&alice, &other_session, gid.clone()),
        (
            &alice,
            &session,
            format!("attestplane-relay-{}", "0".repeat(32)),
        ),
        (&alice, &session, "ask-0".to_owned()),
    ] {
        let (status, body) = s.respond(token, sess, &answer(&id)).await;
        assert_eq!(status, 400, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["code"], -32600, "{v}");
        assert_eq!(v["id"], id.as_str(), "{v}");
    }
    // Another agent's session id with alice's token: unknown session, like any.
    let (status, _) = s.respond(&alice, &mallorys, &answer(&gid)).await;
    assert_eq!(status, 404);
    assert!(s.upstream.client_responses.lock().unwrap().is_empty());
    // The agent's own answer: taken once.
    let (status, body) = s.respond(&alice, &session, &answer(&gid)).await;
    assert_eq!(status, 202, "{body}");
    let (status, _) = s.respond(&alice, &session, &answer(&gid)).await;
    assert_eq!(status, 400, "an answered id is used up");
    let last = stream.next().await.expect("the call's answer");
    assert_eq!(last["id"], 9, "{last}");
    assert_eq!(
        last["result"]["content"][0]["text"], "the client answered",
        "{last}"
    );
    assert!(
        stream.next().await.is_none(),
        "the stream ends with the answer"
    );
    {
        let responses = s.upstream.client_responses.lock().unwrap();
        assert_eq!(responses.len(), 1, "{responses:?}");
        let (r, upstream_session) = &responses[0];
        assert_eq!(r["id"], "ask-0", "under the server's own id: {r}");
        assert_eq!(r["result"]["model"], "m-1", "the agent's answer: {r}");
        assert_eq!(
            r["result"]["content"]["text"], "sunny, ask [REDACTED:email]",
            "the agent's answer under the call's rule: {r}"
        );
        assert_eq!(upstream_session.as_deref(), Some("upstream-session"));
    }
    let Some(Event::CallResult { outcome, .. }) = s.entries().pop() else {
        panic!("no result entry")
    };
    assert_eq!(outcome, "error", "the server's tool result says isError");
    replays(&s);
}

/// An agent that never answers a relayed request: the server is told so once the agent's time
/// is up, and the call ends with its answer on the stream. The wait is not the upstream's: the
/// agent's limit here is longer than the upstream timeout, which must not end the call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_never_answers_a_relayed_request_is_timed_out_and_the_server_told() {
    use attestplane_verifier::admin::ClientRequest;
    let s = stack_opts(
        false,
        "",
        &[],
        None,
        Opts {
            client_requests: vec![ClientRequest::Sampling, ClientRequest::Elicitation],
            agent_answer_timeout: Some(Duration::from_millis(1500)),
            ..Opts::default()
        },
    )
    .await;
    let alice = s.token("weather", &["tool-user"]);
    let session = s.session(&alice).await;
    *s.upstream.ask_client.lock().unwrap() = Some(("elicitation/create".into(), 1));
    let (_, kind, body) = s.open_legacy(&alice, &session, LEGACY_ADD).await;
    assert!(kind.starts_with("text/event-stream"), "{kind}");
    let mut stream = AgentStream {
        body,
        buffer: String::new(),
    };
    let asked = stream.next().await.unwrap();
    assert_eq!(asked["method"], "elicitation/create");
    let last = stream.next().await.expect("the call's answer");
    assert_eq!(
        last["result"]["content"][0]["text"], "the client refused: -32603",
        "{last}"
    );
    {
        let responses = s.upstream.client_responses.lock().unwrap();
        let (r, _) = &responses[0];
        assert_eq!(r["id"], "ask-0");
        assert!(
            r["error"]["message"].as_str().unwrap().contains("in time"),
            "{r}"
        );
    }
    // The answer after the time is up reaches nothing.
    let gid = asked["id"].as_str().unwrap();
    let (status, _) = s
        .respond(
            &alice,
            &session,
            &format!(r#"{{"jsonrpc":"2.0","id":"{gid}","result":{{"action":"decline"}}}}"#),
        )
        .await;
    assert_eq!(status, 400);
    replays(&s);
}

/// A modern server may only ask inside a result (`input_required`): a JSON-RPC request on its
/// answer's SSE stream is not of its era. The old gateway dropped it and forwarded the answer
/// after it; now the call ends as a bad answer (`aborted`, 502) and nothing of the stream
/// reaches the agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_modern_server_sending_a_request_on_its_answers_stream_is_aborted_and_nothing_forwarded()
{
    let s = stack(true).await;
    let token = s.token("weather", &["tool-user"]);
    *s.upstream.ask_client.lock().unwrap() = Some(("sampling/createMessage".into(), 1));
    s.upstream.dont_wait.store(true, Ordering::SeqCst);
    let (status, body) = s
        .modern("weather", &token, &modern_call("add", r#"{"a":1}"#))
        .await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("2026-07-28 server sent a request"), "{body}");
    assert!(
        !body.contains("did not wait") && !body.contains("maxTokens"),
        "{body}"
    );
    let Some(Event::CallResult { outcome, .. }) = s.entries().pop() else {
        panic!("no result entry")
    };
    assert_eq!(outcome, "aborted");
    assert!(s.upstream.client_responses.lock().unwrap().is_empty());
    replays(&s);
}

/// An agent without a valid token must cost the gateway a token check, not a read and parse
/// (and PII scan) of its body: the old gateway read the whole body (up to 1 MiB) before it
/// checked the token, so a request that declares a large body and sends it slowly (or never)
/// held its 401 until every byte had arrived. The token is now checked first: the 401 comes
/// with most of the body still unsent, and nothing is decided or forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_token_is_refused_before_its_large_body_is_read() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let s = stack(true).await;
    let other = s.token("elsewhere", &["tool-user"]);
    for token in ["not-a-token".to_owned(), other] {
        let mut stream = TcpStream::connect(s.agent).await.unwrap();
        let declared = 512 * 1024;
        let head = format!(
            "POST /mcp/weather HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/json\r\n\
             authorization: Bearer {token}\r\nmcp-protocol-version: 2026-07-28\r\n\
             mcp-method: tools/call\r\nmcp-name: add\r\ncontent-length: {declared}\r\n\r\n"
        );
        // The head and the start of a tools/call whose arguments would fill the declared
        // length; the rest never comes.
        let mut start = head.into_bytes();
        start.extend_from_slice(
            br#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"add","arguments":{"a":""#,
        );
        start.extend_from_slice(&[b'4'; 1024]);
        stream.write_all(&start).await.unwrap();
        let mut answer = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(20), stream.read(&mut answer))
            .await
            .expect("no answer while the body is still unsent: the body is being read first")
            .unwrap();
        let text = String::from_utf8_lossy(&answer[..n]);
        assert!(text.starts_with("HTTP/1.1 401"), "{text}");
        assert!(text.contains("resource_metadata="), "{text}");
    }
    assert_eq!(calls(&s), 0);
    replays(&s);
}

/// A hostile upstream lists as many tools as a listing may hold and none of the pinned ones:
/// one drift record per listed tool plus one per missing pin is more than a log entry may hold.
/// The old gateway wrote that entry all the same; no verifier reads it, so the log no longer
/// replayed (nor would the enclave restart on it). Now the listing is refused as a whole,
/// logged as one `invalid` record: nothing is kept, calls are withheld, and the log replays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_whose_drift_is_more_than_an_entry_may_hold_is_logged_as_one_record_and_the_log_replays()
 {
    use attestplane_verifier::gateway::pin::MAX_LISTED_TOOLS;
    let s = stack(true).await;
    let token = s.token("weather", &["tool-user"]);
    *s.upstream.tools.lock().unwrap() = (0..MAX_LISTED_TOOLS)
        .map(|i| format!(r#"{{"name":"t{i}","inputSchema":{{}}}}"#))
        .collect();
    let (status, body) = s.modern("weather", &token, MODERN_LIST).await;
    assert_eq!(status, 200, "{}", &body[..body.len().min(300)]);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["result"]["tools"],
        serde_json::json!([]),
        "nothing is kept"
    );
    let (status, body) = s
        .modern("weather", &token, &modern_call("add", r#"{"a":1}"#))
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("withheld"), "{body}");
    assert_eq!(calls(&s), 0);
    let drift = s
        .entries()
        .into_iter()
        .find_map(|e| match e {
            Event::ToolDrift { drift, .. } => Some(drift),
            _ => None,
        })
        .expect("the drift is logged");
    assert_eq!(drift.len(), 1, "{drift:?}");
    assert_eq!(drift[0].kind, "invalid");
    replays(&s);
}

/// Where the host holds the enclave's bytes, the gateway writes a call at once under its
/// decision entry's need and its answer under its result entry's: neither reaches the server or
/// the agent while the host has not stored the entry (the fake host is paused), and both go
/// once it has. A gateway that wrote them under a lower need would let the call through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_call_and_its_answer_wait_for_the_host_to_store_their_entries() {
    let s = stack_opts(
        true,
        "",
        &[],
        None,
        Opts {
            held: true,
            ..Opts::default()
        },
    )
    .await;
    let token = s.token("weather", &["tool-user"]);
    // Warm up (the listing the call needs, the upstream's era) with the host storing.
    let (status, body) = s
        .modern("weather", &token, &modern_call("add", r#"{"a":1,"b":2}"#))
        .await;
    assert_eq!(status, 200, "{body}");
    let before = calls(&s);
    let stored = s.entries().len();

    // The host stores nothing more: the call must not reach the server.
    s.limit.send_replace(stored as u64);
    let call = {
        let token = token.clone();
        let s = &s;
        async move {
            s.modern("weather", &token, &modern_call("add", r#"{"a":4,"b":5}"#))
                .await
        }
    };
    tokio::pin!(call);
    let early = tokio::time::timeout(Duration::from_millis(400), &mut call).await;
    assert!(
        early.is_err(),
        "answered before anything was stored: {early:?}"
    );
    assert_eq!(
        calls(&s),
        before,
        "the call reached the server before its decision entry was stored"
    );
    assert_eq!(s.entries().len(), stored);

    // The host stores the decision entry only: the call goes, its answer must not.
    s.limit.send_replace(stored as u64 + 1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while calls(&s) == before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the call never reached the server"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let early = tokio::time::timeout(Duration::from_millis(400), &mut call).await;
    assert!(
        early.is_err(),
        "the answer reached the agent before its result entry was stored: {early:?}"
    );

    s.limit.send_replace(u64::MAX);
    let (status, body) = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(calls(&s), before + 1);
    let events = s.entries();
    assert_eq!(events.len(), stored + 2, "a decision and a result entry");
}
