//! The MCP data path's transport, both sides joined: an agent's bytes go through the host's
//! agent relay to the enclave's `McpListener`; a stand-in gateway there dials a registered
//! server with the enclave's `Dialer` through the host's dialer, and splices the two. What
//! comes back to the agent is what the MCP server (an echo) sent, intact, and the dial
//! frames the two crates exchange are one definition (`attestplane_proto::dial`).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use attestplane_enclave::mcp_transport::{
    DialError, Dialer, DialerLimits, McpListener, serve_agents,
};
use attestplane_host::relay::{Relay, RelayConfig, RelayLimits};
use attestplane_host::store::Store;
use attestplane_proto::Address;
use attestplane_verifier::admin::AdminAction;
use ed25519_dalek::SigningKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[path = "../../host-proxy/tests/support/registrations.rs"]
mod registrations;
use registrations::{append_admin, spec};

/// Appends entry `seq` to `store` (a refused admin act: it changes nothing).
async fn one_more_entry(store: &Store, key: &SigningKey, seq: u64) {
    let action = AdminAction::RevokeServer {
        id: "nothing".into(),
    };
    append_admin(store, key, seq, action, false).await;
}

/// The host: `store` with server `weather` registered at `upstream` (entry 0, signed with the
/// key `[9; 32]`), and both relays in front of an enclave MCP address in `dir`.
async fn host(
    dir: &tempfile::TempDir,
    store: &Arc<Store>,
    upstream: std::net::SocketAddr,
) -> (Relay, Address) {
    append_admin(
        store,
        &SigningKey::from_bytes(&[9; 32]),
        0,
        AdminAction::RegisterServer(spec("weather", &format!("http://{upstream}"))),
        true,
    )
    .await;
    let enclave_mcp = Address::Unix(dir.path().join("enclave-mcp.sock"));
    let relay = Relay::start(
        RelayConfig {
            mcp_listen: "127.0.0.1:0".parse().unwrap(),
            enclave_mcp: enclave_mcp.clone(),
            dial_listen: Address::Unix(dir.path().join("dial.sock")),
            limits: RelayLimits::default(),
        },
        Arc::clone(store),
    )
    .await
    .unwrap();
    (relay, enclave_mcp)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_to_enclave_to_upstream_and_back_through_both_relays() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path().join("log")).unwrap());

    // The MCP server: echoes, counts connections.
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((s, _)) = upstream.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    // The host.
    let (relay, enclave_mcp) = host(&dir, &store, upstream_addr).await;

    // The enclave: each agent connection names a server in its first line (a stand-in for
    // the gateway's routing), is dialled through the host, and spliced.
    let dialer = Dialer::new(relay.dial_addr().clone(), DialerLimits::default());
    let listener = McpListener::bind(&enclave_mcp, 16).await.unwrap();
    let outcomes = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = Arc::clone(&outcomes);
    tokio::spawn(serve_agents(
        listener,
        move |agent| {
            let dialer = dialer.clone();
            let seen = Arc::clone(&seen);
            async move {
                let mut agent = agent.io;
                let mut line = Vec::new();
                let mut byte = [0u8; 1];
                while agent.read_exact(&mut byte).await.is_ok() && byte[0] != b'\n' {
                    line.push(byte[0]);
                }
                let server = String::from_utf8(line).unwrap();
                match dialer.dial(&server).await {
                    Ok(dialed) => {
                        let mut upstream = dialed.io;
                        seen.lock().unwrap().push(Ok(server));
                        let _ = tokio::io::copy_bidirectional(&mut agent, &mut upstream).await;
                    }
                    Err(e) => {
                        let unknown = matches!(e, DialError::UnknownServer { .. });
                        seen.lock().unwrap().push(Err((server, unknown)));
                    }
                }
            }
        },
        std::future::pending(),
    ));

    // An agent calls the registered server: 2 MiB there and back, intact.
    let mut agent = TcpStream::connect(relay.mcp_addr()).await.unwrap();
    agent.write_all(b"weather\n").await.unwrap();
    let data: Vec<u8> = (0..2u32 << 20).map(|i| (i * 7 % 253) as u8).collect();
    let (mut r, mut w) = agent.into_split();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), r.read_to_end(&mut back))
        .await
        .unwrap()
        .unwrap();
    writer.await.unwrap();
    assert_eq!(back.len(), data.len());
    assert!(back == data, "bytes changed on the way");

    // An agent asking for a server nobody registered: refused by the host, and the MCP
    // server never sees a connection for it.
    let mut agent = TcpStream::connect(relay.mcp_addr()).await.unwrap();
    agent.write_all(b"calendar\n").await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), agent.read_to_end(&mut rest)).await;
    assert!(rest.is_empty());

    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    let outcomes = outcomes.lock().unwrap().clone();
    assert_eq!(
        outcomes,
        vec![Ok("weather".to_owned()), Err(("calendar".to_owned(), true))]
    );
    let m = relay.metrics();
    assert_eq!(m.dials_connected.load(Ordering::Relaxed), 1);
    assert_eq!(m.dials_refused.load(Ordering::Relaxed), 1);
    relay.shutdown().await;
}

/// What the enclave writes toward a server or an agent under a raised gate reaches neither
/// before the store holds that many entries: the host's relays hold it, and deliver it right
/// after the commit that makes it durable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_bytes_reach_the_server_and_the_agent_only_once_their_entries_are_durable() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path().join("log")).unwrap());
    let key = SigningKey::from_bytes(&[9; 32]);

    // The MCP server: records what reaches it and echoes it.
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    let received = Arc::new(std::sync::Mutex::new(Vec::new()));
    let got = Arc::clone(&received);
    tokio::spawn(async move {
        while let Ok((s, _)) = upstream.accept().await {
            let got = Arc::clone(&got);
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let mut buf = [0u8; 64];
                while let Ok(n) = r.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    got.lock().unwrap().extend_from_slice(&buf[..n]);
                    if w.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let (relay, enclave_mcp) = host(&dir, &store, upstream_addr).await;

    // The stand-in gateway: the call may reach the server once entry 1 is durable (two
    // entries), its answer the agent once entry 2 is (three).
    let dialer = Dialer::new(relay.dial_addr().clone(), DialerLimits::default());
    let listener = McpListener::bind(&enclave_mcp, 16).await.unwrap();
    tokio::spawn(serve_agents(
        listener,
        move |agent| {
            let dialer = dialer.clone();
            async move {
                let agent_gate = agent.gate.expect("the host's relay holds agents");
                let mut agent = agent.io;
                let mut request = [0u8; 4];
                agent.read_exact(&mut request).await.unwrap();
                let dialed = dialer.dial("weather").await.unwrap();
                let mut upstream = dialed.io;
                dialed
                    .gate
                    .expect("a dialled connection is held")
                    .require(2);
                upstream.write_all(&request).await.unwrap();
                upstream.flush().await.unwrap();
                let mut answer = [0u8; 4];
                upstream.read_exact(&mut answer).await.unwrap();
                agent_gate.require(3);
                agent.write_all(&answer).await.unwrap();
                agent.flush().await.unwrap();
                let mut rest = Vec::new();
                let _ = agent.read_to_end(&mut rest).await;
            }
        },
        std::future::pending(),
    ));

    let mut agent = TcpStream::connect(relay.mcp_addr()).await.unwrap();
    agent.write_all(b"call").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        received.lock().unwrap().is_empty(),
        "the call reached the server before its entry was durable"
    );

    one_more_entry(&store, &key, 1).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while received.lock().unwrap().len() < 4 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the call never arrived"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(&received.lock().unwrap()[..], b"call");

    let mut answer = [0u8; 4];
    let early = tokio::time::timeout(Duration::from_millis(300), agent.read(&mut answer)).await;
    assert!(
        early.is_err(),
        "the answer reached the agent before its entry was durable: {early:?}"
    );
    one_more_entry(&store, &key, 2).await;
    tokio::time::timeout(Duration::from_secs(10), agent.read_exact(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&answer, b"call");
    relay.shutdown().await;
}
