//! The enclave's server driven over real sockets: a Unix socket in a temporary directory and
//! loopback TCP on port 0 (never a fixed port), in front of an enclave over a mock NSM whose
//! clock is pinned at [`T0`].
//!
//! What is checked: requests are answered on the connection that sent them, a two-phase
//! request with its `Persist` and then its final reply in a `Held` (the host, not the enclave,
//! holds it until the entries are durable); the boot sequence works over the wire; frame errors
//! are answered and either leave the connection usable or close it, and never stop the server;
//! the connection and in-flight limits; graceful shutdown; a `Persist` no connection had room
//! for (none open, or every outbox full) reaches the first that has, unasked. Requests are
//! kept in flight by occupying the handler with a job through the side door ([`Blocker`]): the
//! enclave itself no longer holds any reply. A live-vsock test runs where the kernel offers
//! vsock loopback and is skipped elsewhere (it never connects to CID 2 or 3).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use attestplane_enclave::nsm::{Clock, MockNsm};
use attestplane_enclave::server::{
    EnclaveAccess, ServerError, ServerLimits, inside_channel, run_with_inside,
};
use attestplane_enclave::service::{Enclave, EnclaveConfig};
use attestplane_proto::{
    Address, Body, ByteBuf, ErrorCode, Frame, FrameDecoder, Listener, MAX_FRAME_LEN, NO_REQUEST_ID,
    PROTOCOL_VERSION, Request, Response, Stream, connect, encode_frame, read_frame, write_frame,
};
use attestplane_verifier::UnixMillis;
use attestplane_verifier::attestation::TrustAnchor;
use attestplane_verifier::entry::SignedEntry;
use proptest::prelude::*;
use tokio::io::AsyncWriteExt;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const SEED: [u8; 32] = *b"attestplane server tests seed v1";
/// 2025-09-01T12:00:00.250Z.
const T0: UnixMillis = UnixMillis::from_millis(1_756_728_000_250);
/// How long a test waits for any one reply before it fails.
const PATIENCE: Duration = Duration::from_secs(20);

fn genesis_key() -> ByteBuf {
    let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    ByteBuf::from(key.verifying_key().to_bytes().to_vec())
}

fn enclave() -> Enclave {
    let nsm = MockNsm::builder(SEED, Clock::Fixed(T0)).build();
    let root = TrustAnchor::from_der(&nsm.root_der().unwrap()).unwrap();
    let config = EnclaveConfig {
        origin: "attestplane.test/log".to_owned(),
        issuer: "attestplane-test".to_owned(),
        self_anchor: root.clone(),
        server_anchor: root,
        allow_debug: false,
    };
    let pinned = ed25519_dalek::SigningKey::from_bytes(&[7; 32]).verifying_key();
    Enclave::new(Arc::new(nsm), config).with_pinned_genesis(vec![pinned.to_bytes()])
}

#[derive(Clone, Copy, Debug)]
enum Transport {
    Unix,
    Tcp,
}

struct TestServer {
    addr: Address,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ServerError>>,
    access: EnclaveAccess,
    _dir: tempfile::TempDir,
}

/// The handler occupied by a side-door job that waits until [`Blocker::release`]: requests
/// read meanwhile wait in the handler's queue, in flight.
struct Blocker {
    release: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Blocker {
    async fn release(self) {
        let _ = self.release.send(());
        tokio::task::spawn_blocking(move || self.thread.join().unwrap())
            .await
            .unwrap();
    }
}

impl TestServer {
    async fn start(transport: Transport, limits: ServerLimits) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let addr = match transport {
            Transport::Unix => Address::Unix(dir.path().join("enclave.sock")),
            Transport::Tcp => "tcp:127.0.0.1:0".parse().unwrap(),
        };
        let listener = Listener::bind(&addr).await.unwrap();
        Self::serve(listener, limits, dir)
    }

    fn serve(listener: Listener, limits: ServerLimits, dir: tempfile::TempDir) -> Self {
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = async move {
            let _ = stopped.await;
        };
        // Room for the side door's one job, and for the queued requests of the tests that
        // block the handler.
        let (access, inside) = inside_channel(64);
        let task = tokio::spawn(run_with_inside(
            listener,
            enclave(),
            || T0,
            limits,
            inside,
            shutdown,
        ));
        Self {
            addr,
            stop: Some(stop),
            task,
            access,
            _dir: dir,
        }
    }

    /// Occupies the handler until the returned [`Blocker`] is released.
    async fn block_handler(&self) -> Blocker {
        let access = self.access.clone();
        let runtime = tokio::runtime::Handle::current();
        let (started_tx, started) = oneshot::channel();
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            runtime
                .block_on(access.run(move |_, _| {
                    let _ = started_tx.send(());
                    let _ = wait.recv();
                    ((), Vec::new())
                }))
                .unwrap();
        });
        tokio::time::timeout(PATIENCE, started)
            .await
            .expect("the blocking job did not start")
            .unwrap();
        Blocker { release, thread }
    }

    async fn client(&self) -> Client {
        Client {
            stream: connect(&self.addr).await.unwrap(),
            decoder: FrameDecoder::new(),
        }
    }

    /// Signals shutdown and waits for `run` to return.
    async fn stop(mut self) -> Result<(), ServerError> {
        let _ = self.stop.take().map(|s| s.send(()));
        tokio::time::timeout(PATIENCE, self.task)
            .await
            .expect("run did not return after shutdown")
            .unwrap()
    }
}

struct Client {
    stream: Stream,
    decoder: FrameDecoder,
}

impl Client {
    async fn send(&mut self, id: u64, request: Request) {
        write_frame(&mut self.stream, &Frame::request(id, request))
            .await
            .unwrap();
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
        self.stream.flush().await.unwrap();
    }

    /// The next frame, or `None` when the server closed the connection.
    async fn next(&mut self) -> Option<Frame> {
        tokio::time::timeout(PATIENCE, read_frame(&mut self.stream, &mut self.decoder))
            .await
            .expect("no reply in time")
            .unwrap()
    }

    /// The next reply, which must be a response.
    async fn recv(&mut self) -> (u64, Response) {
        let frame = self.next().await.expect("connection closed");
        assert_eq!(frame.version, PROTOCOL_VERSION);
        match frame.body {
            Body::Response(r) => (frame.id, r),
            Body::Request(r) => panic!("the server sent a request: {r:?}"),
        }
    }

    /// Sends `request` and returns the one reply it expects next.
    async fn call(&mut self, id: u64, request: Request) -> Response {
        self.send(id, request).await;
        let (got, reply) = self.recv().await;
        assert_eq!(got, id, "reply under another id: {reply:?}");
        reply
    }

    async fn expect_closed(&mut self) {
        let next = self.next().await;
        assert!(
            next.is_none(),
            "expected the connection closed, got {next:?}"
        );
    }

    async fn hello(&mut self, id: u64) -> bool {
        match self
            .call(
                id,
                Request::Hello {
                    version: PROTOCOL_VERSION,
                },
            )
            .await
        {
            Response::Hello { ready, version, .. } => {
                assert_eq!(version, PROTOCOL_VERSION);
                ready
            }
            other => panic!("not a hello: {other:?}"),
        }
    }
}

fn error_code(reply: &Response) -> ErrorCode {
    match reply {
        Response::Error { code, .. } => *code,
        other => panic!("not an error reply: {other:?}"),
    }
}

fn replay_begin(total_entries: u64) -> Request {
    Request::ReplayBegin {
        genesis_admin_keys: vec![genesis_key()],
        total_entries,
    }
}

/// `Ack` held until every entry through `through_seq` is durable.
fn held_ack(through_seq: u64) -> Response {
    Response::Held {
        through_seq,
        reply: Box::new(Response::Ack),
    }
}

/// Starts and ends an empty replay on `client` (ids 1 and 2); returns the Persist's entries.
/// The final `Ack` for id 2 follows at once, held until entry 1 is durable.
async fn begin_boot(client: &mut Client) -> Vec<ByteBuf> {
    assert_eq!(client.call(1, replay_begin(0)).await, Response::Ack);
    let entries = match client.call(2, Request::ReplayEnd).await {
        Response::Persist { first_seq, entries } => {
            assert_eq!(first_seq, 0);
            assert_eq!(entries.len(), 2, "epoch start and genesis");
            entries
        }
        other => panic!("ReplayEnd did not ask to persist: {other:?}"),
    };
    assert_eq!(
        client.recv().await,
        (2, held_ack(1)),
        "the final reply, held"
    );
    entries
}

#[tokio::test]
async fn hello_is_answered_on_unix_and_tcp() {
    for transport in [Transport::Unix, Transport::Tcp] {
        let server = TestServer::start(transport, ServerLimits::default()).await;
        let mut client = server.client().await;
        assert!(
            !client.hello(1).await,
            "{transport:?}: not ready before boot"
        );
        assert_eq!(
            error_code(&client.call(2, Request::Checkpoint).await),
            ErrorCode::NotReady,
            "{transport:?}"
        );
        server.stop().await.unwrap();
    }
}

#[tokio::test]
async fn boot_sequence_over_the_wire_sends_the_ack_held_for_its_entries_and_records_durable() {
    let server = TestServer::start(Transport::Unix, ServerLimits::default()).await;
    let mut client = server.client().await;
    let entries = begin_boot(&mut client).await;
    for (seq, bytes) in (0u64..).zip(&entries) {
        assert_eq!(SignedEntry::decode(bytes).unwrap().entry().seq, seq);
    }
    let durable_seq = |status: Response| match status {
        Response::Status {
            ready, durable_seq, ..
        } => {
            assert!(ready);
            durable_seq
        }
        other => panic!("not a status: {other:?}"),
    };
    assert_eq!(durable_seq(client.call(3, Request::Status).await), None);
    // The host's report is recorded and acknowledged; nothing else comes with it.
    assert_eq!(
        client.call(4, Request::Durable { through_seq: 1 }).await,
        Response::Ack
    );
    assert_eq!(durable_seq(client.call(5, Request::Status).await), Some(1));
    assert!(client.hello(6).await, "ready after the boot");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_second_enclave_replays_what_the_first_persisted() {
    let first = TestServer::start(Transport::Tcp, ServerLimits::default()).await;
    let mut client = first.client().await;
    let entries = begin_boot(&mut client).await;
    first.stop().await.unwrap();

    let second = TestServer::start(Transport::Tcp, ServerLimits::default()).await;
    let mut client = second.client().await;
    assert_eq!(client.call(1, replay_begin(2)).await, Response::Ack);
    assert_eq!(
        client.call(2, Request::ReplayEntries { entries }).await,
        Response::Ack
    );
    match client.call(3, Request::ReplayEnd).await {
        Response::Persist { first_seq, entries } => {
            assert_eq!(first_seq, 2, "the new epoch continues the replayed log");
            assert_eq!(entries.len(), 1, "no second genesis");
        }
        other => panic!("not a persist: {other:?}"),
    }
    assert_eq!(client.recv().await, (3, held_ack(2)));
    second.stop().await.unwrap();
}

#[tokio::test]
async fn replies_are_routed_to_the_connection_that_sent_the_request() {
    let server = TestServer::start(Transport::Unix, ServerLimits::default()).await;
    let mut a = server.client().await;
    let mut b = server.client().await;
    begin_boot(&mut a).await;

    // B reports durability: B gets only its own Ack, and A nothing (its final reply came with
    // its Persist).
    b.send(3, Request::Durable { through_seq: 1 }).await;
    assert_eq!(b.recv().await, (3, Response::Ack));
    assert!(b.hello(4).await, "nothing else was queued on B");
    assert!(a.hello(5).await, "nothing else was queued on A");

    // Pipelined requests on both connections, interleaved.
    a.send(10, Request::Status).await;
    b.send(11, Request::Status).await;
    a.send(
        12,
        Request::Hello {
            version: PROTOCOL_VERSION,
        },
    )
    .await;
    b.send(
        13,
        Request::Hello {
            version: PROTOCOL_VERSION,
        },
    )
    .await;
    let (id, reply) = a.recv().await;
    assert_eq!(id, 10);
    assert!(matches!(reply, Response::Status { .. }), "{reply:?}");
    let (id, reply) = a.recv().await;
    assert_eq!(id, 12);
    assert!(matches!(reply, Response::Hello { .. }), "{reply:?}");
    let (id, reply) = b.recv().await;
    assert_eq!(id, 11);
    assert!(matches!(reply, Response::Status { .. }), "{reply:?}");
    let (id, reply) = b.recv().await;
    assert_eq!(id, 13);
    assert!(matches!(reply, Response::Hello { .. }), "{reply:?}");
    server.stop().await.unwrap();
}

/// The enclave answers every request within the job that serves it, so an id is never in
/// flight across jobs (the `Conflict` rule is pinned by the handler's unit test): the same id
/// sent on two connections while both wait in the queue is answered on each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_id_queued_on_two_connections_is_answered_on_each() {
    let server = TestServer::start(Transport::Tcp, ServerLimits::default()).await;
    let mut a = server.client().await;
    let mut b = server.client().await;
    begin_boot(&mut a).await;
    let blocker = server.block_handler().await;
    a.send(7, Request::Status).await;
    b.send(
        7,
        Request::Hello {
            version: PROTOCOL_VERSION,
        },
    )
    .await;
    blocker.release().await;
    let (id, reply) = a.recv().await;
    assert_eq!(id, 7);
    assert!(matches!(reply, Response::Status { .. }), "{reply:?}");
    let (id, reply) = b.recv().await;
    assert_eq!(id, 7);
    assert!(matches!(reply, Response::Hello { .. }), "{reply:?}");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn malformed_body_gets_bad_frame_and_the_connection_continues() {
    let server = TestServer::start(Transport::Unix, ServerLimits::default()).await;
    let mut client = server.client().await;
    client.send_raw(&[0, 0, 0, 3, 0xff, 0xff, 0xff]).await;
    let (id, reply) = client.recv().await;
    assert_eq!(id, NO_REQUEST_ID);
    assert_eq!(error_code(&reply), ErrorCode::BadFrame);
    client.send_raw(&[0, 0, 0, 0]).await; // An empty body.
    assert_eq!(error_code(&client.recv().await.1), ErrorCode::BadFrame);
    assert!(!client.hello(1).await);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn unsupported_version_is_answered_under_the_frame_id() {
    let server = TestServer::start(Transport::Unix, ServerLimits::default()).await;
    let mut client = server.client().await;
    let mut frame = Frame::request(41, Request::Status);
    frame.version = PROTOCOL_VERSION + 1;
    client.send_raw(&encode_frame(&frame).unwrap()).await;
    let (id, reply) = client.recv().await;
    assert_eq!(id, 41);
    assert_eq!(error_code(&reply), ErrorCode::UnsupportedVersion);
    assert!(!client.hello(42).await);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_response_frame_from_the_host_gets_bad_frame() {
    let server = TestServer::start(Transport::Unix, ServerLimits::default()).await;
    let mut client = server.client().await;
    let frame = Frame::response(7, Response::Ack);
    client.send_raw(&encode_frame(&frame).unwrap()).await;
    let (id, reply) = client.recv().await;
    assert_eq!(id, 7);
    assert_eq!(error_code(&reply), ErrorCode::BadFrame);
    assert!(!client.hello(8).await);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn request_id_zero_is_reserved() {
    let server = TestServer::start(Transport::Unix, ServerLimits::default()).await;
    let mut client = server.client().await;
    assert_eq!(
        error_code(&client.call(NO_REQUEST_ID, Request::Status).await),
        ErrorCode::BadRequest
    );
    assert!(!client.hello(1).await);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn oversized_frame_gets_too_large_then_close_and_others_are_served() {
    let server = TestServer::start(Transport::Tcp, ServerLimits::default()).await;
    let mut other = server.client().await;
    let mut client = server.client().await;
    let prefix = u32::try_from(MAX_FRAME_LEN + 1).unwrap().to_be_bytes();
    client.send_raw(&prefix).await;
    let (id, reply) = client.recv().await;
    assert_eq!(id, NO_REQUEST_ID);
    assert_eq!(error_code(&reply), ErrorCode::TooLarge);
    client.expect_closed().await;
    assert!(!other.hello(1).await);
    assert!(!server.client().await.hello(2).await);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn truncated_frame_gets_bad_frame_then_close() {
    let server = TestServer::start(Transport::Unix, ServerLimits::default()).await;
    let mut client = server.client().await;
    let frame = encode_frame(&Frame::request(3, Request::Status)).unwrap();
    client.send_raw(&frame[..frame.len() - 2]).await;
    client.stream.shutdown().await.unwrap();
    let (id, reply) = client.recv().await;
    assert_eq!(id, NO_REQUEST_ID);
    assert_eq!(error_code(&reply), ErrorCode::BadFrame);
    client.expect_closed().await;
    assert!(!server.client().await.hello(4).await);
    server.stop().await.unwrap();
}

/// Random bytes: either a raw byte soup (usually an absurd length prefix) or a plausible prefix
/// followed by random body bytes, possibly fewer than announced.
fn hostile_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..2048),
        (0u32..600, proptest::collection::vec(any::<u8>(), 0..600)).prop_map(|(len, body)| {
            let mut bytes = len.to_be_bytes().to_vec();
            bytes.extend_from_slice(&body);
            bytes
        }),
    ]
}

#[test]
fn random_bytes_on_one_connection_never_stop_the_server() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = rt.block_on(TestServer::start(Transport::Unix, ServerLimits::default()));
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let next_id = AtomicU64::new(1_000_000);
    runner
        .run(&hostile_bytes(), |bytes| {
            let id = next_id.fetch_add(1, Ordering::Relaxed);
            rt.block_on(async {
                let mut hostile = server.client().await;
                // The server may close early (an oversized prefix); later writes may then fail.
                let _ = hostile.stream.write_all(&bytes).await;
                let _ = hostile.stream.shutdown().await;
                // Whatever comes back are well-formed replies, and then the server closes.
                let mut replies = 0;
                loop {
                    let read = tokio::time::timeout(
                        PATIENCE,
                        read_frame(&mut hostile.stream, &mut hostile.decoder),
                    )
                    .await
                    .expect("the server neither answered nor closed");
                    match read {
                        Ok(Some(frame)) => {
                            prop_assert!(matches!(frame.body, Body::Response(_)), "{frame:?}");
                            replies += 1;
                            prop_assert!(replies <= bytes.len().max(1), "more replies than bytes");
                        }
                        Ok(None) => break,
                        Err(e) => prop_assert!(false, "the server sent a bad frame: {e}"),
                    }
                }
                let mut probe = server.client().await;
                prop_assert!(!probe.hello(id).await);
                Ok(())
            })
        })
        .unwrap();
    rt.block_on(server.stop()).unwrap();
}

#[tokio::test]
async fn connections_over_the_limit_are_told_overloaded_and_closed() {
    let limits = ServerLimits {
        max_connections: 2,
        ..ServerLimits::default()
    };
    let server = TestServer::start(Transport::Unix, limits).await;
    let mut a = server.client().await;
    let mut b = server.client().await;
    assert!(!a.hello(1).await);
    assert!(!b.hello(2).await);

    let mut c = server.client().await;
    let (id, reply) = c.recv().await;
    assert_eq!(id, NO_REQUEST_ID);
    assert_eq!(error_code(&reply), ErrorCode::Overloaded);
    c.expect_closed().await;
    assert!(!a.hello(3).await, "the admitted connections are unaffected");

    // A closed connection frees its slot (the server notices the close asynchronously).
    drop(b);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let mut d = server.client().await;
        d.send(
            4,
            Request::Hello {
                version: PROTOCOL_VERSION,
            },
        )
        .await;
        match d.recv().await {
            (4, Response::Hello { .. }) => break,
            (
                NO_REQUEST_ID,
                Response::Error {
                    code: ErrorCode::Overloaded,
                    ..
                },
            ) => {
                assert!(tokio::time::Instant::now() < deadline, "slot never freed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_limit_answers_overloaded_but_admits_durable() {
    let limits = ServerLimits {
        max_in_flight_per_connection: 1,
        ..ServerLimits::default()
    };
    let server = TestServer::start(Transport::Unix, limits).await;
    let mut client = server.client().await;
    begin_boot(&mut client).await;
    let blocker = server.block_handler().await;
    client.send(3, Request::Status).await; // In flight behind the blocker: the limit.
    assert_eq!(
        error_code(&client.call(4, Request::Status).await),
        ErrorCode::Overloaded
    );
    client.send(5, Request::Durable { through_seq: 1 }).await;
    blocker.release().await;
    let (id, reply) = client.recv().await;
    assert_eq!(id, 3);
    assert!(matches!(reply, Response::Status { .. }), "{reply:?}");
    assert_eq!(client.recv().await, (5, Response::Ack));
    assert!(client.hello(6).await, "the slot is free again");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn graceful_shutdown_returns_and_closes_idle_connections() {
    let server = TestServer::start(Transport::Unix, ServerLimits::default()).await;
    let addr = server.addr.clone();
    let mut client = server.client().await;
    assert!(!client.hello(1).await);
    server.stop().await.unwrap();
    client.expect_closed().await;
    assert!(connect(&addr).await.is_err(), "no longer accepting");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_lets_in_flight_requests_finish() {
    let limits = ServerLimits {
        max_in_flight_per_connection: 1,
        ..ServerLimits::default()
    };
    let server = TestServer::start(Transport::Tcp, limits).await;
    let mut client = server.client().await;
    begin_boot(&mut client).await;
    let blocker = server.block_handler().await;
    client.send(3, Request::Status).await; // In flight behind the blocker.
    assert_eq!(
        error_code(&client.call(30, Request::Status).await),
        ErrorCode::Overloaded,
        "3 is in flight"
    );
    let TestServer {
        addr,
        stop,
        task,
        _dir,
        ..
    } = server;
    let _ = stop.map(|s| s.send(()));
    // The listener is dropped just before the connections are told to drain.
    while connect(&addr).await.is_ok() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;

    // Draining: new work is refused, but Durable is admitted.
    match client.call(4, Request::Status).await {
        Response::Error {
            code: ErrorCode::Overloaded,
            message,
        } => assert!(message.contains("shutting down"), "{message}"),
        other => panic!("not refused: {other:?}"),
    }
    assert!(!task.is_finished());
    client.send(5, Request::Durable { through_seq: 1 }).await;
    // Refused on the spot, after the Durable was read (frames are read in order).
    assert_eq!(
        error_code(&client.call(6, Request::Status).await),
        ErrorCode::Overloaded
    );
    blocker.release().await;
    let (id, reply) = client.recv().await;
    assert_eq!(id, 3);
    assert!(matches!(reply, Response::Status { .. }), "{reply:?}");
    assert_eq!(client.recv().await, (5, Response::Ack));
    client.expect_closed().await;
    tokio::time::timeout(PATIENCE, task)
        .await
        .expect("run did not return")
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_gives_up_on_in_flight_requests_after_the_grace_period() {
    let limits = ServerLimits {
        shutdown_grace: Duration::from_millis(200),
        max_in_flight_per_connection: 1,
        ..ServerLimits::default()
    };
    let server = TestServer::start(Transport::Unix, limits).await;
    let mut client = server.client().await;
    begin_boot(&mut client).await;
    let blocker = server.block_handler().await;
    client.send(3, Request::Status).await; // Never answered while the handler is occupied.
    assert_eq!(
        error_code(&client.call(4, Request::Status).await),
        ErrorCode::Overloaded,
        "3 is in flight"
    );
    let started = tokio::time::Instant::now();
    let stopping = tokio::spawn(server.stop());
    client.expect_closed().await;
    assert!(started.elapsed() >= Duration::from_millis(200));
    // The handler finishes its job once free; only then does `run` return.
    blocker.release().await;
    stopping.await.unwrap().unwrap();
}

#[tokio::test]
async fn serves_over_vsock_where_the_kernel_offers_loopback() {
    let addr: Address = "vsock:any:any".parse().unwrap();
    let Ok(listener) = Listener::bind(&addr).await else {
        eprintln!("skipping: vsock unavailable");
        return;
    };
    let Ok(Address::Vsock { port, .. }) = listener.local_addr() else {
        eprintln!("skipping: vsock unavailable (no local address)");
        return;
    };
    let server = TestServer::serve(
        listener,
        ServerLimits::default(),
        tempfile::tempdir().unwrap(),
    );
    // CID 1 is the local loopback; never the host (2) or hypervisor (3).
    let local = Address::Vsock { cid: 1, port };
    let stream = match tokio::time::timeout(Duration::from_secs(2), connect(&local)).await {
        Ok(Ok(stream)) => stream,
        _ => {
            eprintln!("skipping: vsock unavailable (no loopback)");
            server.stop().await.unwrap();
            return;
        }
    };
    let mut client = Client {
        stream,
        decoder: FrameDecoder::new(),
    };
    assert!(!client.hello(1).await);
    server.stop().await.unwrap();
}

/// Issue 9, item 6: a host that sends requests on a connection and never reads the replies
/// cannot make the enclave hold more than `max_queued_reply_bytes` for it. While the handler
/// is occupied, A's requests are read and queued (two admin requests, logged as refused, and
/// status requests); then A is flooded until its socket is full of `Overloaded` refusals and
/// its task is stuck writing. When the handler answers the queued requests, their replies
/// overflow A's limit: the enclave closes A instead of queueing them, hands A's unwritten
/// `Persist`s to B, and serves B throughout. Every entry reaches the host exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_that_never_reads_is_cut_off_at_the_reply_limit_and_others_are_served() {
    use attestplane_verifier::admin::{AdminAction, AdminRequest};
    use std::sync::atomic::AtomicUsize;
    use tokio::io::AsyncReadExt;

    const LIMIT: usize = 2048;
    /// Two-phase requests: a `Persist` and a held `AdminResult` each.
    const ADMIN: u64 = 2;
    /// Status requests whose replies take A past `LIMIT` together with the admin replies.
    const STATUS: u64 = 40;
    let limits = ServerLimits {
        max_queued_reply_bytes: LIMIT,
        max_in_flight_per_connection: (ADMIN + STATUS) as usize,
        ..ServerLimits::default()
    };
    let server = TestServer::start(Transport::Unix, limits).await;
    let mut a = server.client().await;
    let mut b = server.client().await;
    begin_boot(&mut a).await;
    assert!(b.hello(3).await);

    let blocker = server.block_handler().await;
    let stranger = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    for i in 0..ADMIN {
        let request = AdminRequest {
            time: T0,
            nonce: u128::from(i).to_be_bytes(),
            deployment: attestplane_verifier::admin::Deployment {
                origin: "attestplane.test/log".into(),
                genesis: attestplane_verifier::entry::EntryHash::ZERO,
            },
            action: AdminAction::RevokeServer {
                id: "nobody".to_owned(),
            },
        }
        .sign(&stranger.verifying_key(), &stranger)
        .unwrap();
        let request = Request::Admin {
            request: ByteBuf::from(request),
        };
        a.send(100 + i, request).await;
    }
    for i in 0..STATUS {
        a.send(200 + i, Request::Status).await;
    }
    // One more than the limit: refused by A's task itself, so every request before it has
    // been read and queued.
    assert_eq!(
        error_code(&a.call(999, Request::Status).await),
        ErrorCode::Overloaded
    );

    // From here on nobody reads A. Flood it until its task is stuck writing refusals into a
    // full socket and the host's own writes stall.
    let (mut a_read, mut a_write) = tokio::io::split(a.stream);
    let sent = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&sent);
    let flood = tokio::spawn(async move {
        for id in 1_000_000u64.. {
            let frame = encode_frame(&Frame::request(id, Request::Status)).unwrap();
            if a_write.write_all(&frame).await.is_err() {
                return;
            }
            counter.fetch_add(frame.len(), Ordering::Relaxed);
        }
    });
    let mut last = 0;
    let mut still = 0;
    while still < 10 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = sent.load(Ordering::Relaxed);
        still = if now == last && now > 0 { still + 1 } else { 0 };
        last = now;
        assert!(
            !flood.is_finished(),
            "the flood stopped: A was closed too early"
        );
    }

    // The queued requests are answered: A's replies overflow its limit.
    blocker.release().await;
    let mut persisted = Vec::new();
    let mut id = 10;
    while persisted.len() < ADMIN as usize {
        id += 1;
        b.send(id, Request::Status).await;
        loop {
            match b.recv().await {
                (_, Response::Persist { first_seq, entries }) => {
                    persisted.extend((first_seq..).take(entries.len()));
                }
                (got, Response::Status { .. }) if got == id => break,
                other => panic!("B got {other:?}"),
            }
        }
    }
    assert!(
        b.hello(id + 1).await,
        "B is served after A's replies overflowed"
    );

    // A is closed: reading it yields what its socket buffered, then the end.
    let mut decoder = FrameDecoder::new();
    let closed = tokio::time::timeout(PATIENCE, async {
        loop {
            match read_frame(&mut a_read, &mut decoder).await {
                Ok(Some(Frame {
                    body: Body::Response(Response::Persist { first_seq, entries }),
                    ..
                })) => persisted.extend((first_seq..).take(entries.len())),
                Ok(Some(_)) => {}
                // The end, possibly in the middle of the write that was abandoned.
                Ok(None) | Err(_) => break,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the enclave kept the stuck connection open");
    let mut rest = Vec::new();
    assert_eq!(a_read.read_to_end(&mut rest).await.unwrap_or(0), 0);
    persisted.sort_unstable();
    assert_eq!(
        persisted,
        (2..2 + ADMIN).collect::<Vec<_>>(),
        "every Persist for A's requests reached the host, once"
    );
    tokio::time::timeout(PATIENCE, flood)
        .await
        .expect("the host's writes to the closed connection still block")
        .unwrap();
    assert!(b.hello(id + 2).await);
    server.stop().await.unwrap();
}

/// An admin request signed by a key that is not an admin's: the enclave logs it (one entry)
/// and refuses it.
fn stranger_admin(nonce: u128) -> Request {
    use attestplane_verifier::admin::{AdminAction, AdminRequest, Deployment};
    let stranger = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    let request = AdminRequest {
        time: T0,
        nonce: nonce.to_be_bytes(),
        deployment: Deployment {
            origin: "attestplane.test/log".into(),
            genesis: attestplane_verifier::entry::EntryHash::ZERO,
        },
        action: AdminAction::RevokeServer {
            id: "nobody".to_owned(),
        },
    }
    .sign(&stranger.verifying_key(), &stranger)
    .unwrap();
    Request::Admin {
        request: ByteBuf::from(request),
    }
}

/// Entries written while no host connection is open (the gateway's, say, while the proxy
/// restarts) wait in the enclave and reach the first connection that opens: until this was
/// fixed they were dropped, and the host's log stalled at the gap for good.
#[tokio::test]
async fn a_persist_written_while_no_connection_is_open_reaches_the_first_that_opens() {
    let server = TestServer::start(Transport::Unix, ServerLimits::default()).await;
    // The enclave boots through the side door, no host connection open at all: its opening
    // entries have nowhere to go.
    server
        .access
        .run(|enclave, now| {
            let mut replies = enclave.handle(1, replay_begin(0), now);
            replies.extend(enclave.handle(2, Request::ReplayEnd, now));
            ((), replies)
        })
        .await
        .unwrap();
    let mut a = server.client().await;
    a.send(
        3,
        Request::Hello {
            version: PROTOCOL_VERSION,
        },
    )
    .await;
    let mut got = vec![a.recv().await, a.recv().await];
    got.sort_by_key(|(id, _)| *id);
    assert!(
        matches!(
            got.as_slice(),
            [
                (2, Response::Persist { first_seq: 0, entries }),
                (3, Response::Hello { ready: true, .. }),
            ] if entries.len() == 2
        ),
        "{got:?}"
    );
    assert!(
        matches!(a.call(4, Request::Status).await, Response::Status { .. }),
        "the Persist came twice"
    );
    server.stop().await.unwrap();
}

/// A `Persist` no connection had room for goes out as soon as an outbox drains, with no
/// further request to carry it: the connection's task asks the handler for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_persist_goes_out_when_a_full_outbox_drains_without_another_request() {
    const LIMIT: usize = 64 * 1024;
    let limits = ServerLimits {
        max_queued_reply_bytes: LIMIT,
        ..ServerLimits::default()
    };
    let server = TestServer::start(Transport::Unix, limits).await;
    let mut a = server.client().await;
    begin_boot(&mut a).await;
    // A large Persist A's host does not read yet: A's outbox holds it (an empty outbox takes
    // one reply of any size), far over the limit, behind a full socket.
    let big = Response::Persist {
        first_seq: 1_000,
        entries: vec![ByteBuf::from(vec![0xa5; 256 * 1024]); 8],
    };
    server
        .access
        .run(move |_, _| ((), vec![(9_001, big)]))
        .await
        .unwrap();
    // The gateway writes an entry: A, the only connection, has no room for its Persist.
    server
        .access
        .run(|enclave, now| ((), enclave.handle(50, stranger_admin(1), now)))
        .await
        .unwrap();
    // A's host reads again, and sends nothing.
    let (id, big) = a.recv().await;
    assert!(
        matches!(
            big,
            Response::Persist {
                first_seq: 1_000,
                ..
            }
        ),
        "{id}"
    );
    let (id, waiting) = a.recv().await;
    assert_eq!(id, 50);
    assert!(
        matches!(&waiting, Response::Persist { first_seq: 2, entries } if entries.len() == 1),
        "{waiting:?}"
    );
    assert!(
        matches!(
            a.call(51, Request::Status).await,
            Response::Status {
                head_seq: Some(2),
                ..
            }
        ),
        "the Persist came twice"
    );
    server.stop().await.unwrap();
}
