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
    append_admin(
        &store,
        &SigningKey::from_bytes(&[9; 32]),
        0,
        AdminAction::RegisterServer(spec("weather", &format!("http://{upstream_addr}"))),
        true,
    )
    .await;

    // The host.
    let enclave_mcp = Address::Unix(dir.path().join("enclave-mcp.sock"));
    let relay = Relay::start(
        RelayConfig {
            mcp_listen: "127.0.0.1:0".parse().unwrap(),
            enclave_mcp: enclave_mcp.clone(),
            dial_listen: Address::Unix(dir.path().join("dial.sock")),
            limits: RelayLimits::default(),
        },
        Arc::clone(&store),
    )
    .await
    .unwrap();

    // The enclave: each agent connection names a server in its first line (a stand-in for
    // the gateway's routing), is dialled through the host, and spliced.
    let dialer = Dialer::new(relay.dial_addr().clone(), DialerLimits::default());
    let listener = McpListener::bind(&enclave_mcp, 16).await.unwrap();
    let outcomes = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = Arc::clone(&outcomes);
    tokio::spawn(serve_agents(
        listener,
        move |mut agent| {
            let dialer = dialer.clone();
            let seen = Arc::clone(&seen);
            async move {
                let mut line = Vec::new();
                let mut byte = [0u8; 1];
                while agent.read_exact(&mut byte).await.is_ok() && byte[0] != b'\n' {
                    line.push(byte[0]);
                }
                let server = String::from_utf8(line).unwrap();
                match dialer.dial(&server).await {
                    Ok(mut upstream) => {
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
