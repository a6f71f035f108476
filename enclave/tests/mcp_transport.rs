//! The enclave's MCP transport (`attestplane_enclave::mcp_transport`) against stand-in hosts:
//! Unix sockets in a temp dir play the host's dial port (answering each dial the way a test
//! needs) and the host relay's connections to the MCP port.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use attestplane_enclave::mcp_transport::{
    DialError, DialStage, Dialer, DialerLimits, McpListener, serve_agents,
};
use attestplane_proto::{
    Address, DialReply, DialStatus, ProtoError, Stream, VSOCK_ANY, connect, read_dial_request,
    read_held, write_dial,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;

const T: Duration = Duration::from_secs(10);

fn sock(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

/// A host dial port that answers every request with `reply` (after checking the request
/// names `expect`), then, if the reply was `Connected`, echoes the payloads of the enclave's
/// held frames at once (whatever their need: this host holds nothing). Counts requests.
fn fake_host(path: PathBuf, expect: &'static str, reply: DialReply) -> Arc<AtomicUsize> {
    let listener = UnixListener::bind(path).unwrap();
    let requests = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&requests);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let reply = reply.clone();
            let count = Arc::clone(&count);
            tokio::spawn(async move {
                let request = read_dial_request(&mut s).await.unwrap();
                assert_eq!(request.server.as_str(), expect);
                count.fetch_add(1, Ordering::SeqCst);
                write_dial(&mut s, &reply.encode().unwrap()).await.unwrap();
                if reply.status == DialStatus::Connected {
                    let (mut r, mut w) = s.into_split();
                    let mut payload = Vec::new();
                    while let Ok(Some(_need)) = read_held(&mut r, &mut payload).await {
                        if w.write_all(&payload).await.is_err() {
                            break;
                        }
                    }
                    let _ = w.shutdown().await;
                }
            });
        }
    });
    requests
}

fn dialer(path: PathBuf, max: usize, timeout: Duration) -> Dialer {
    Dialer::new(
        Address::Unix(path),
        DialerLimits {
            max_connections: max,
            timeout,
        },
    )
}

/// A host that connects every dial for `weather`, and a dialer of at most `max` connections
/// to it; the count of dial requests the host received.
fn connecting_host(max: usize) -> (tempfile::TempDir, Dialer, Arc<AtomicUsize>) {
    let dir = tempfile::tempdir().unwrap();
    let path = sock(&dir, "dial.sock");
    let requests = fake_host(
        path.clone(),
        "weather",
        DialReply::new(DialStatus::Connected, ""),
    );
    (dir, dialer(path, max, T), requests)
}

#[tokio::test]
async fn dial_returns_a_stream_that_carries_the_upstreams_bytes() {
    let (_dir, d, requests) = connecting_host(4);
    let dialed = d.dial("weather").await.unwrap();
    assert!(dialed.gate.is_some(), "a dialled connection is held");
    let mut s = dialed.io;
    assert_eq!(d.open_connections(), 1);
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = tokio::io::split(&mut s);
    let send = async {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let mut back = Vec::new();
    let recv = r.read_to_end(&mut back);
    let ((), got) = tokio::join!(send, recv);
    got.unwrap();
    assert!(back == data);
    drop(s);
    assert_eq!(d.open_connections(), 0);
    assert_eq!(requests.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn host_refusals_become_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    type Check = fn(&DialError) -> bool;
    let cases: [(DialStatus, Check); 6] = [
        (
            DialStatus::UnknownServer,
            |e| matches!(e, DialError::UnknownServer { server, message } if server == "weather" && message == "why"),
        ),
        (DialStatus::ConnectFailed, |e| {
            matches!(e, DialError::ConnectFailed { .. })
        }),
        (DialStatus::Timeout, |e| {
            matches!(
                e,
                DialError::Timeout {
                    stage: DialStage::ConnectUpstream,
                    ..
                }
            )
        }),
        (DialStatus::EndpointRefused, |e| {
            matches!(
                e,
                DialError::Refused {
                    status: DialStatus::EndpointRefused,
                    ..
                }
            )
        }),
        (DialStatus::Overloaded, |e| {
            matches!(
                e,
                DialError::Refused {
                    status: DialStatus::Overloaded,
                    ..
                }
            )
        }),
        (DialStatus::BadRequest, |e| {
            matches!(
                e,
                DialError::Refused {
                    status: DialStatus::BadRequest,
                    ..
                }
            )
        }),
    ];
    for (i, (status, check)) in cases.into_iter().enumerate() {
        let path = sock(&dir, &format!("dial-{i}.sock"));
        fake_host(path.clone(), "weather", DialReply::new(status, "why"));
        let d = dialer(path, 4, T);
        let err = d.dial("weather").await.err().unwrap();
        assert!(check(&err), "{status}: {err}");
        assert!(err.to_string().contains("weather"), "{err}");
        // A refusal gives its slot back.
        assert_eq!(d.open_connections(), 0);
    }
}

#[tokio::test]
async fn the_gateway_connector_carries_the_typed_error() {
    use attestplane_enclave::gateway::upstream::Connect;
    let dir = tempfile::tempdir().unwrap();
    let path = sock(&dir, "dial.sock");
    fake_host(
        path.clone(),
        "weather",
        DialReply::new(DialStatus::UnknownServer, "revoked"),
    );
    let err = dialer(path, 4, T).connect("weather").await.err().unwrap();
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    let inner = err.get_ref().and_then(|e| e.downcast_ref::<DialError>());
    assert!(
        matches!(inner, Some(DialError::UnknownServer { message, .. }) if message == "revoked"),
        "{err}"
    );
}

#[tokio::test]
async fn a_host_that_never_answers_times_out_at_the_reply() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock(&dir, "dial.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let held = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        tokio::time::sleep(T).await;
        drop(s);
    });
    let d = dialer(path, 4, Duration::from_millis(200));
    let err = d.dial("weather").await.err().unwrap();
    assert!(
        matches!(
            err,
            DialError::Timeout {
                stage: DialStage::Reply,
                ..
            }
        ),
        "{err}"
    );
    held.abort();
}

#[tokio::test]
async fn garbage_and_cut_replies_are_bad_replies() {
    let dir = tempfile::tempdir().unwrap();
    for (i, answer) in [
        b"HTTP/1.1 200 OK\r\n\r\n".to_vec(),
        vec![0x04, 0x01],       // a length over the limit
        vec![0x00, 0x10, 0xa1], // cut mid-message
        Vec::new(),             // closed at once
    ]
    .into_iter()
    .enumerate()
    {
        let path = sock(&dir, &format!("dial-{i}.sock"));
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let _ = read_dial_request(&mut s).await;
            s.write_all(&answer).await.unwrap();
            s.shutdown().await.unwrap();
        });
        let err = dialer(path, 4, T).dial("weather").await.err().unwrap();
        assert!(
            matches!(
                &err,
                DialError::BadReply {
                    source: ProtoError::TooLarge { .. }
                        | ProtoError::UnexpectedEof { .. }
                        | ProtoError::Malformed { .. },
                    ..
                }
            ),
            "{i}: {err}"
        );
    }
}

#[tokio::test]
async fn no_host_is_host_unreachable_and_bad_ids_are_refused_before_connecting() {
    let dir = tempfile::tempdir().unwrap();
    let d = dialer(sock(&dir, "nobody.sock"), 4, T);
    let err = d.dial("weather").await.err().unwrap();
    assert!(matches!(err, DialError::HostUnreachable { .. }), "{err}");
    for bad in ["", "a\nb", &"x".repeat(257)] {
        let err = d.dial(bad).await.err().unwrap();
        assert!(matches!(err, DialError::BadServerId { .. }), "{err}");
    }
}

#[tokio::test]
async fn dialer_limit_refuses_without_asking_the_host_and_frees_on_drop() {
    let (_dir, d, requests) = connecting_host(2);
    let a = d.dial("weather").await.unwrap();
    let _b = d.dial("weather").await.unwrap();
    let err = d.dial("weather").await.err().unwrap();
    assert!(
        matches!(err, DialError::TooManyConnections { max: 2, .. }),
        "{err}"
    );
    assert_eq!(requests.load(Ordering::SeqCst), 2);
    drop(a);
    d.dial("weather").await.unwrap();
    assert_eq!(requests.load(Ordering::SeqCst), 3);
}

// ---------------------------------------------------------------------------------------------
// Agents in.

async fn echo_server(listener: McpListener) -> tokio::task::JoinHandle<std::io::Result<()>> {
    tokio::spawn(serve_agents(
        listener,
        |stream| async move {
            let (mut r, mut w) = tokio::io::split(stream.io);
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        },
        std::future::pending(),
    ))
}

async fn exchange(s: &mut Stream, data: &[u8]) -> Vec<u8> {
    s.write_all(data).await.unwrap();
    let mut back = vec![0u8; data.len()];
    tokio::time::timeout(T, s.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    back
}

#[tokio::test]
async fn agent_connections_over_the_limit_are_closed_and_slots_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let address = Address::Unix(sock(&dir, "mcp.sock"));
    let listener = McpListener::bind(&address, 2).await.unwrap();
    assert_eq!(listener.max_connections(), 2);
    let server = echo_server(listener).await;
    let mut a = connect(&address).await.unwrap();
    let mut b = connect(&address).await.unwrap();
    assert_eq!(exchange(&mut a, b"a").await, b"a");
    assert_eq!(exchange(&mut b, b"b").await, b"b");
    let mut c = connect(&address).await.unwrap();
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(T, c.read(&mut buf)).await.unwrap();
    assert!(matches!(n, Ok(0) | Err(_)), "over-limit served: {n:?}");
    drop(a);
    // The slot is back once the handler has seen the close and dropped its stream.
    let mut served = false;
    for _ in 0..100 {
        let mut d = connect(&address).await.unwrap();
        let _ = d.write_all(b"d").await;
        let mut one = [0u8; 1];
        if let Ok(Ok(1)) = tokio::time::timeout(Duration::from_millis(200), d.read(&mut one)).await
        {
            served = true;
            break;
        }
    }
    assert!(served, "a freed slot was never reused");
    server.abort();
}

#[tokio::test]
async fn a_silent_agent_does_not_hold_up_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let address = Address::Unix(sock(&dir, "mcp.sock"));
    let listener = McpListener::bind(&address, 16).await.unwrap();
    let server = echo_server(listener).await;
    let mut silent = Vec::new();
    for _ in 0..8 {
        let mut s = connect(&address).await.unwrap();
        s.write_all(b"P").await.unwrap();
        silent.push(s);
    }
    for i in 0..4u8 {
        // Not a NUL first byte: that would start the host's preamble.
        let byte = b'a' + i;
        let mut s = connect(&address).await.unwrap();
        assert_eq!(exchange(&mut s, &[byte; 1000]).await, vec![byte; 1000]);
    }
    server.abort();
}

#[tokio::test]
async fn serve_agents_stops_accepting_on_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let address = Address::Unix(sock(&dir, "mcp.sock"));
    let listener = McpListener::bind(&address, 4).await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&served);
    let server = tokio::spawn(serve_agents(
        listener,
        move |_stream| {
            count.fetch_add(1, Ordering::SeqCst);
            async {}
        },
        async {
            let _ = stopped.await;
        },
    ));
    // A connection is handed to the handler once its first byte says whether the host's
    // relay holds it.
    let mut a = connect(&address).await.unwrap();
    a.write_all(b"G").await.unwrap();
    for _ in 0..200 {
        if served.load(Ordering::SeqCst) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(served.load(Ordering::SeqCst), 1);
    stop.send(()).unwrap();
    tokio::time::timeout(T, server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(connect(&address).await.is_err());
}

#[tokio::test]
async fn vsock_addresses_bind_where_the_kernel_has_vsock() {
    // The production addresses parse into the vsock variants …
    assert_eq!(
        "vsock:any:5006".parse::<Address>().unwrap(),
        Address::Vsock {
            cid: VSOCK_ANY,
            port: 5006
        }
    );
    assert_eq!(
        "vsock:3:5007".parse::<Address>().unwrap(),
        Address::Vsock { cid: 3, port: 5007 }
    );
    // … and a listener on vsock binds through the same code path, where vsock exists. A live
    // round trip needs the loopback transport (CID 1); this machine may have neither, and no
    // test may connect to the host (CID 2) or the parent (CID 3).
    let listener = match McpListener::bind(
        &Address::Vsock {
            cid: VSOCK_ANY,
            port: VSOCK_ANY,
        },
        4,
    )
    .await
    {
        Ok(l) => l,
        Err(e) => {
            eprintln!("SKIPPED live vsock: this kernel offers no vsock socket ({e})");
            return;
        }
    };
    let Ok(Address::Vsock { port, .. }) = listener.local_addr() else {
        panic!("a vsock listener reports a non-vsock address");
    };
    let server = echo_server(listener).await;
    match tokio::time::timeout(
        Duration::from_secs(2),
        connect(&Address::Vsock { cid: 1, port }),
    )
    .await
    {
        Ok(Ok(mut s)) => assert_eq!(exchange(&mut s, b"vsock").await, b"vsock"),
        other => eprintln!("SKIPPED live vsock round trip: no vsock loopback (CID 1): {other:?}"),
    }
    server.abort();
}

#[tokio::test]
async fn a_connection_opened_with_the_hosts_preamble_is_held_and_frames_what_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let address = Address::Unix(sock(&dir, "mcp.sock"));
    let listener = McpListener::bind(&address, 4).await.unwrap();
    let server = tokio::spawn(serve_agents(
        listener,
        |stream| async move {
            let (mut stream, gate) = (stream.io, stream.gate);
            let mut request = [0u8; 3];
            stream.read_exact(&mut request).await.unwrap();
            if let Some(gate) = gate {
                gate.require(9);
            }
            stream.write_all(&request).await.unwrap();
            stream.flush().await.unwrap();
        },
        std::future::pending(),
    ));
    // The host's relay: preamble, then the agent's bytes; the answer comes back framed under
    // the need the handler raised.
    let mut host = connect(&address).await.unwrap();
    host.write_all(&attestplane_proto::RELEASE_PREAMBLE)
        .await
        .unwrap();
    host.write_all(b"abc").await.unwrap();
    let mut payload = Vec::new();
    let need = tokio::time::timeout(T, read_held(&mut host, &mut payload))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((need, payload.as_slice()), (Some(9), &b"abc"[..]));
    // An agent straight on the port: raw bytes back, nothing held.
    let mut agent = connect(&address).await.unwrap();
    assert_eq!(exchange(&mut agent, b"xyz").await, b"xyz");
    // A NUL that does not start the preamble: closed, nothing served.
    let mut bad = connect(&address).await.unwrap();
    bad.write_all(b"\0attestplane-xx1abc").await.unwrap();
    let mut rest = Vec::new();
    let n = tokio::time::timeout(T, bad.read_to_end(&mut rest))
        .await
        .unwrap();
    assert!(
        matches!(n, Ok(0) | Err(_)),
        "a bad preamble was served: {rest:?}"
    );
    server.abort();
}
