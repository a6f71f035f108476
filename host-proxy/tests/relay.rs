//! The MCP data path's byte relays (`attestplane_host::relay`), against stand-ins: a Unix
//! socket plays the enclave's MCP port, raw TCP listeners play MCP servers (counting every
//! connection they accept, so a test can prove that a refused dial never reached them), and a
//! real store holds the admin entries the dialer reads registrations from. The stand-in enclave
//! speaks what the real one does toward the host: it reads the agent relay's preamble, and
//! frames what it sends (`attestplane_proto::release`), under need 0 unless a test says more.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use attestplane_host::relay::{Relay, RelayConfig, RelayLimits};
use attestplane_host::store::Store;
use attestplane_proto::{
    Address, DialReply, DialRequest, DialStatus, Gate, Held, RELEASE_PREAMBLE, ReleaseHeader,
    ServerId, Stream, connect, read_dial_reply, write_dial,
};
use attestplane_verifier::admin::AdminAction;
use ed25519_dalek::SigningKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener};

#[path = "support/registrations.rs"]
mod registrations;
use registrations::{append_admin, spec};

const T: Duration = Duration::from_secs(10);

/// A store with admin entries, and a relay in front of a stand-in enclave.
struct Fixture {
    dir: tempfile::TempDir,
    store: Arc<Store>,
    key: SigningKey,
    seq: u64,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path().join("log")).unwrap());
        Fixture {
            dir,
            store,
            key: SigningKey::from_bytes(&[7; 32]),
            seq: 0,
        }
    }

    /// Appends an admin entry (accepted or not) as the enclave would have signed it.
    async fn admin(&mut self, action: AdminAction, accepted: bool) {
        append_admin(&self.store, &self.key, self.seq, action, accepted).await;
        self.seq += 1;
    }

    async fn register(&mut self, id: &str, endpoint: &str) {
        self.admin(AdminAction::RegisterServer(spec(id, endpoint)), true)
            .await;
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    async fn relay(&self, limits: RelayLimits) -> Relay {
        Relay::start(
            RelayConfig {
                mcp_listen: "127.0.0.1:0".parse().unwrap(),
                enclave_mcp: Address::Unix(self.path("enclave-mcp.sock")),
                dial_listen: Address::Unix(self.path("dial.sock")),
                limits,
            },
            Arc::clone(&self.store),
        )
        .await
        .unwrap()
    }
}

fn limits() -> RelayLimits {
    RelayLimits {
        max_agent_connections: 64,
        max_upstream_connections: 64,
        idle_timeout: Duration::from_secs(30),
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(2),
    }
}

/// Deterministic bytes that reveal reordering, loss or duplication.
fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A TCP "MCP server" that echoes every connection and counts the connections it accepted.
struct CountingEcho {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
}

async fn counting_echo() -> CountingEcho {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(echo(s));
        }
    });
    CountingEcho { addr, accepted }
}

async fn echo<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(s: S) {
    let (mut r, mut w) = tokio::io::split(s);
    let _ = tokio::io::copy(&mut r, &mut w).await;
    let _ = w.shutdown().await;
}

/// The enclave's MCP port: echoes every connection (in frames that need nothing), counts them.
fn echo_enclave(path: PathBuf) -> Arc<AtomicUsize> {
    let listener = UnixListener::bind(path).unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                if let Ok(s) = enclave_side(s).await {
                    echo(s).await;
                }
            });
        }
    });
    accepted
}

/// The enclave's side of a relayed agent connection: checks the host's preamble and frames
/// what it sends.
async fn enclave_side(
    mut s: tokio::net::UnixStream,
) -> std::io::Result<Held<tokio::net::UnixStream>> {
    let mut preamble = [0u8; RELEASE_PREAMBLE.len()];
    s.read_exact(&mut preamble).await?;
    assert_eq!(
        preamble, RELEASE_PREAMBLE,
        "the agent relay opens with its preamble"
    );
    Ok(Held::new(s, Gate::new()))
}

/// Sends `data` through `stream` while reading everything that comes back.
async fn round_trip<S>(stream: S, data: Vec<u8>) -> Vec<u8>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let (mut r, mut w) = tokio::io::split(stream);
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    tokio::time::timeout(T, r.read_to_end(&mut back))
        .await
        .unwrap()
        .unwrap();
    writer.await.unwrap();
    back
}

/// The enclave's side of a dial: request, reply, and the stream on success.
async fn dial(relay: &Relay, server: &str) -> (DialReply, Stream) {
    let mut s = connect(relay.dial_addr()).await.unwrap();
    let request = DialRequest::new(ServerId::new(server).unwrap());
    write_dial(&mut s, &request.encode().unwrap())
        .await
        .unwrap();
    let reply = tokio::time::timeout(T, read_dial_reply(&mut s))
        .await
        .unwrap()
        .unwrap();
    (reply, s)
}

async fn eventually(what: &str, f: impl Fn() -> bool) {
    for _ in 0..500 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

// ---------------------------------------------------------------------------------------------
// The agent relay.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_bytes_reach_the_enclave_and_back_intact() {
    let f = Fixture::new();
    let accepted = echo_enclave(f.path("enclave-mcp.sock"));
    let relay = f.relay(limits()).await;
    let data = payload(8 << 20, 1);
    let agent = TcpStream::connect(relay.mcp_addr()).await.unwrap();
    let back = round_trip(agent, data.clone()).await;
    assert_eq!(back.len(), data.len());
    assert!(back == data, "relayed bytes differ");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    let m = relay.metrics();
    eventually("byte counters", || {
        m.agent_bytes_in.load(Ordering::Relaxed) == 8 << 20
            && m.agent_bytes_out.load(Ordering::Relaxed) == 8 << 20
            && m.agent_active.load(Ordering::Relaxed) == 0
    })
    .await;
    assert_eq!(m.agent_connections.load(Ordering::Relaxed), 1);
    relay.shutdown().await;
}

#[tokio::test]
async fn agent_half_close_is_relayed_and_the_answer_still_flows() {
    let f = Fixture::new();
    let listener = UnixListener::bind(f.path("enclave-mcp.sock")).unwrap();
    let relay = f.relay(limits()).await;
    // The enclave reads the request to its end (it sees the agent's FIN), then answers.
    let enclave = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        let mut s = enclave_side(s).await.unwrap();
        let mut request = Vec::new();
        s.read_to_end(&mut request).await.unwrap();
        let answer = payload(1 << 20, request.len() as u64);
        s.write_all(&answer).await.unwrap();
        s.shutdown().await.unwrap();
        request
    });
    let mut agent = TcpStream::connect(relay.mcp_addr()).await.unwrap();
    let request = payload(300_000, 2);
    agent.write_all(&request).await.unwrap();
    agent.shutdown().await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(T, agent.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(enclave.await.unwrap() == request);
    assert!(answer == payload(1 << 20, 300_000));
}

#[tokio::test]
async fn enclave_half_close_is_relayed_and_the_agent_can_still_send() {
    let f = Fixture::new();
    let listener = UnixListener::bind(f.path("enclave-mcp.sock")).unwrap();
    let relay = f.relay(limits()).await;
    // The enclave says hello and stops sending, then keeps reading.
    let enclave = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        let mut s = enclave_side(s).await.unwrap();
        s.write_all(b"hello").await.unwrap();
        s.shutdown().await.unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        rest
    });
    let mut agent = TcpStream::connect(relay.mcp_addr()).await.unwrap();
    let mut hello = Vec::new();
    tokio::time::timeout(T, agent.read_to_end(&mut hello))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(hello, b"hello");
    let late = payload(500_000, 3);
    agent.write_all(&late).await.unwrap();
    agent.shutdown().await.unwrap();
    assert!(tokio::time::timeout(T, enclave).await.unwrap().unwrap() == late);
}

#[tokio::test]
async fn agent_connection_over_the_limit_is_closed_without_reaching_the_enclave() {
    let f = Fixture::new();
    let accepted = echo_enclave(f.path("enclave-mcp.sock"));
    let relay = f
        .relay(RelayLimits {
            max_agent_connections: 2,
            ..limits()
        })
        .await;
    let mut held = Vec::new();
    for i in 0..2u8 {
        let mut a = TcpStream::connect(relay.mcp_addr()).await.unwrap();
        a.write_all(&[i]).await.unwrap();
        let mut b = [0u8; 1];
        a.read_exact(&mut b).await.unwrap();
        assert_eq!(b, [i]);
        held.push(a);
    }
    let mut third = TcpStream::connect(relay.mcp_addr()).await.unwrap();
    let mut buf = [0u8; 1];
    let closed = tokio::time::timeout(T, third.read(&mut buf)).await.unwrap();
    assert!(
        matches!(closed, Ok(0) | Err(_)),
        "over-limit connection was served: {closed:?}"
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    assert_eq!(relay.metrics().agent_refused.load(Ordering::Relaxed), 1);

    // A slot freed is a slot reused.
    drop(held.pop());
    eventually("the slot to free", || {
        relay.metrics().agent_active.load(Ordering::Relaxed) == 1
    })
    .await;
    let again = TcpStream::connect(relay.mcp_addr()).await.unwrap();
    assert_eq!(round_trip(again, b"again".to_vec()).await, b"again");
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn slowloris_agent_does_not_block_others() {
    let f = Fixture::new();
    let _accepted = echo_enclave(f.path("enclave-mcp.sock"));
    let relay = f.relay(limits()).await;
    // Several agents that send one byte of a request and stall.
    let mut stalled = Vec::new();
    for _ in 0..8 {
        let mut s = TcpStream::connect(relay.mcp_addr()).await.unwrap();
        s.write_all(b"P").await.unwrap();
        stalled.push(s);
    }
    for i in 0..4 {
        let s = TcpStream::connect(relay.mcp_addr()).await.unwrap();
        let data = payload(100_000, 10 + i);
        assert!(round_trip(s, data.clone()).await == data);
    }
    drop(stalled);
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let f = Fixture::new();
    let _accepted = echo_enclave(f.path("enclave-mcp.sock"));
    let relay = f
        .relay(RelayLimits {
            idle_timeout: Duration::from_millis(300),
            ..limits()
        })
        .await;
    let mut s = TcpStream::connect(relay.mcp_addr()).await.unwrap();
    // Traffic keeps it open past the timeout …
    for _ in 0..4 {
        s.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    // … silence closes it.
    let mut b = [0u8; 1];
    let n = tokio::time::timeout(T, s.read(&mut b)).await.unwrap();
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    assert_eq!(relay.metrics().idle_closed.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn agent_is_closed_when_the_enclave_does_not_answer() {
    let f = Fixture::new();
    // Nothing listens on the enclave's MCP address.
    let relay = f.relay(limits()).await;
    let mut s = TcpStream::connect(relay.mcp_addr()).await.unwrap();
    let mut b = [0u8; 1];
    let n = tokio::time::timeout(T, s.read(&mut b)).await.unwrap();
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    eventually("the failure to be counted", || {
        relay
            .metrics()
            .agent_enclave_unreachable
            .load(Ordering::Relaxed)
            == 1
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// The upstream dialer.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dial_connects_to_the_registered_endpoint_and_relays_both_ways() {
    let mut f = Fixture::new();
    let upstream = counting_echo().await;
    f.register("weather", &format!("http://{}/mcp", upstream.addr))
        .await;
    let relay = f.relay(limits()).await;
    let (reply, stream) = dial(&relay, "weather").await;
    assert_eq!(reply.status, DialStatus::Connected, "{}", reply.message);
    let data = payload(4 << 20, 4);
    assert!(round_trip(Held::new(stream, Gate::new()), data.clone()).await == data);
    assert_eq!(upstream.accepted.load(Ordering::SeqCst), 1);
    let m = relay.metrics();
    eventually("byte counters", || {
        m.upstream_bytes_out.load(Ordering::Relaxed) == 4 << 20
            && m.upstream_bytes_in.load(Ordering::Relaxed) == 4 << 20
    })
    .await;
    assert_eq!(m.dials_connected.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn dial_to_an_unregistered_server_is_refused_without_a_connection_attempt() {
    let mut f = Fixture::new();
    let upstream = counting_echo().await;
    let endpoint = format!("http://{}", upstream.addr);
    f.register("weather", &endpoint).await;
    // A registration the enclave refused is no registration.
    f.admin(
        AdminAction::RegisterServer(spec("refused", &endpoint)),
        false,
    )
    .await;
    let relay = f.relay(limits()).await;
    for id in ["calendar", "refused", "Weather", "weather "] {
        let (reply, _) = dial(&relay, id).await;
        assert_eq!(reply.status, DialStatus::UnknownServer, "{id}");
    }
    assert_eq!(upstream.accepted.load(Ordering::SeqCst), 0);
    assert_eq!(relay.metrics().dials_refused.load(Ordering::Relaxed), 4);
}

#[tokio::test]
async fn dial_to_a_revoked_server_is_refused_without_a_connection_attempt() {
    let mut f = Fixture::new();
    let upstream = counting_echo().await;
    f.register("weather", &format!("http://{}", upstream.addr))
        .await;
    let relay = f.relay(limits()).await;
    let (reply, _) = dial(&relay, "weather").await;
    assert_eq!(reply.status, DialStatus::Connected);
    assert_eq!(upstream.accepted.load(Ordering::SeqCst), 1);
    // Revoked while the relay runs: the next dial reads the new entry.
    f.admin(
        AdminAction::RevokeServer {
            id: "weather".into(),
        },
        true,
    )
    .await;
    let (reply, _) = dial(&relay, "weather").await;
    assert_eq!(reply.status, DialStatus::UnknownServer, "{}", reply.message);
    assert_eq!(upstream.accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn dialer_refuses_endpoints_that_are_not_the_registered_one() {
    let mut f = Fixture::new();
    let old = counting_echo().await;
    let new = counting_echo().await;
    f.register("weather", &format!("http://{}", old.addr)).await;
    f.admin(
        AdminAction::UpdateServer(spec("weather", &format!("http://{}", new.addr))),
        true,
    )
    .await;
    // An update the enclave refused changes nothing.
    f.admin(
        AdminAction::UpdateServer(spec("weather", &format!("http://{}", old.addr))),
        false,
    )
    .await;
    let relay = f.relay(limits()).await;
    let (reply, _) = dial(&relay, "weather").await;
    assert_eq!(reply.status, DialStatus::Connected);
    assert_eq!(new.accepted.load(Ordering::SeqCst), 1);
    assert_eq!(old.accepted.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn dialer_refuses_registered_endpoints_it_will_not_dial() {
    let mut f = Fixture::new();
    let upstream = counting_echo().await;
    let port = upstream.addr.port();
    let cases = [
        ("tls", format!("https://127.0.0.1:{port}")),
        ("userinfo", format!("http://user@127.0.0.1:{port}")),
        ("query", format!("http://127.0.0.1:{port}/?next=x")),
        ("metadata", "http://169.254.169.254:80".to_owned()),
        ("unspecified", format!("http://0.0.0.0:{port}")),
    ];
    for (id, endpoint) in &cases {
        f.register(id, endpoint).await;
    }
    let relay = f.relay(limits()).await;
    for (id, endpoint) in &cases {
        let (reply, _) = dial(&relay, id).await;
        assert_eq!(
            reply.status,
            DialStatus::EndpointRefused,
            "{endpoint}: {}",
            reply.message
        );
    }
    assert_eq!(upstream.accepted.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn dial_to_a_dead_endpoint_says_connect_failed() {
    let mut f = Fixture::new();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    f.register("gone", &format!("http://127.0.0.1:{port}"))
        .await;
    let relay = f.relay(limits()).await;
    let (reply, _) = dial(&relay, "gone").await;
    assert_eq!(reply.status, DialStatus::ConnectFailed, "{}", reply.message);
}

#[tokio::test]
async fn malformed_and_slow_dial_requests_get_bad_request() {
    let mut f = Fixture::new();
    let upstream = counting_echo().await;
    f.register("weather", &format!("http://{}", upstream.addr))
        .await;
    let relay = f
        .relay(RelayLimits {
            request_timeout: Duration::from_millis(300),
            ..limits()
        })
        .await;
    // Garbage, an oversized length, a CBOR body that ends early.
    for bytes in [
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        vec![0xff, 0xff, 0, 0],
        [&[0u8, 3][..], b"\xa1\x61a"].concat(),
    ] {
        let mut s = connect(relay.dial_addr()).await.unwrap();
        s.write_all(&bytes).await.unwrap();
        let reply = tokio::time::timeout(T, read_dial_reply(&mut s))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(reply.status, DialStatus::BadRequest, "{}", reply.message);
    }
    // Half a request, then silence: refused at the request timeout, and it blocked nobody.
    let mut slow = connect(relay.dial_addr()).await.unwrap();
    slow.write_all(&[0]).await.unwrap();
    let (reply, _) = dial(&relay, "weather").await;
    assert_eq!(reply.status, DialStatus::Connected);
    let reply = tokio::time::timeout(T, read_dial_reply(&mut slow))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply.status, DialStatus::BadRequest);
    assert_eq!(upstream.accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn dial_over_the_limit_is_answered_overloaded() {
    let mut f = Fixture::new();
    let upstream = counting_echo().await;
    f.register("weather", &format!("http://{}", upstream.addr))
        .await;
    let relay = f
        .relay(RelayLimits {
            max_upstream_connections: 1,
            ..limits()
        })
        .await;
    let (reply, held) = dial(&relay, "weather").await;
    assert_eq!(reply.status, DialStatus::Connected);
    let mut s = connect(relay.dial_addr()).await.unwrap();
    let reply = tokio::time::timeout(T, read_dial_reply(&mut s))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply.status, DialStatus::Overloaded);
    assert_eq!(upstream.accepted.load(Ordering::SeqCst), 1);
    drop(held);
    eventually("the slot to free", || {
        relay.metrics().upstream_active.load(Ordering::Relaxed) == 0
    })
    .await;
    let (reply, _) = dial(&relay, "weather").await;
    assert_eq!(reply.status, DialStatus::Connected);
}

#[test]
fn server_ids_have_the_registry_bound() {
    assert_eq!(
        attestplane_proto::MAX_SERVER_ID_LEN,
        attestplane_verifier::admin::MAX_ID_LEN
    );
}

// ---------------------------------------------------------------------------------------------
// Held bytes.

/// A TCP "MCP server" that records every byte it receives.
async fn recording_server() -> (SocketAddr, Arc<std::sync::Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let got = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = Arc::clone(&got);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let sink = Arc::clone(&sink);
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    sink.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
        }
    });
    (addr, got)
}

async fn settle() {
    tokio::time::sleep(Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_frame_reaches_the_server_only_once_its_entries_are_durable_and_in_order() {
    let mut f = Fixture::new();
    let (addr, got) = recording_server().await;
    f.register("weather", &format!("http://{addr}/mcp")).await;
    let relay = f.relay(limits()).await;
    let (reply, mut stream) = dial(&relay, "weather").await;
    assert_eq!(reply.status, DialStatus::Connected, "{}", reply.message);
    // One entry is durable (the registration). The call needs two; the frame after it needs
    // nothing, yet must not overtake it.
    let mut wire = ReleaseHeader { len: 4, need: 2 }.encode().to_vec();
    wire.extend_from_slice(b"call");
    wire.extend_from_slice(&ReleaseHeader { len: 5, need: 0 }.encode());
    wire.extend_from_slice(b"-next");
    stream.write_all(&wire).await.unwrap();
    stream.flush().await.unwrap();
    settle().await;
    assert!(
        got.lock().unwrap().is_empty(),
        "held bytes reached the server before their entry was durable"
    );
    f.admin(AdminAction::RevokeServer { id: "other".into() }, false)
        .await;
    eventually("the held bytes to arrive", || {
        got.lock().unwrap().len() == 9
    })
    .await;
    assert_eq!(&got.lock().unwrap()[..], b"call-next");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_answer_reaches_the_agent_only_once_its_entries_are_durable() {
    let mut f = Fixture::new();
    let listener = UnixListener::bind(f.path("enclave-mcp.sock")).unwrap();
    let relay = f.relay(limits()).await;
    let enclave = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        let mut s = enclave_side(s).await.unwrap();
        let mut request = [0u8; 3];
        s.read_exact(&mut request).await.unwrap();
        s.gate().require(1);
        s.write_all(b"answer").await.unwrap();
        s.flush().await.unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
    });
    let mut agent = TcpStream::connect(relay.mcp_addr()).await.unwrap();
    agent.write_all(b"ask").await.unwrap();
    let mut answer = [0u8; 6];
    let early = tokio::time::timeout(Duration::from_millis(300), agent.read(&mut answer)).await;
    assert!(
        early.is_err(),
        "the answer reached the agent early: {early:?}"
    );
    f.admin(AdminAction::RevokeServer { id: "other".into() }, false)
        .await;
    tokio::time::timeout(T, agent.read_exact(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&answer, b"answer");
    drop(agent);
    let _ = tokio::time::timeout(T, enclave).await;
}

#[tokio::test]
async fn a_malformed_or_cut_off_held_frame_closes_the_connection_and_delivers_nothing() {
    let mut f = Fixture::new();
    let (addr, got) = recording_server().await;
    f.register("weather", &format!("http://{addr}/mcp")).await;
    let relay = f.relay(limits()).await;
    let oversized = ReleaseHeader {
        len: u32::try_from(attestplane_proto::MAX_RELEASE_PAYLOAD).unwrap() + 1,
        need: 0,
    }
    .encode()
    .to_vec();
    let empty = ReleaseHeader { len: 0, need: 0 }.encode().to_vec();
    let mut cut = ReleaseHeader { len: 10, need: 0 }.encode().to_vec();
    cut.extend_from_slice(b"short");
    for bad in [oversized, empty, cut] {
        let (reply, mut stream) = dial(&relay, "weather").await;
        assert_eq!(reply.status, DialStatus::Connected, "{}", reply.message);
        stream.write_all(&bad).await.unwrap();
        stream.shutdown().await.unwrap();
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(T, stream.read_to_end(&mut rest)).await;
        assert!(
            closed.is_ok(),
            "the relay kept a connection with a bad frame open"
        );
    }
    settle().await;
    assert!(
        got.lock().unwrap().is_empty(),
        "a bad frame's bytes were delivered"
    );
}
