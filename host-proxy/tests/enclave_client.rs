//! The enclave client against a scripted fake enclave on a Unix socket: the durability
//! protocol's ordering rules, which a real enclave exercises only by chance.
//!
//! - `Persist` batches that arrive out of seq order (on different connections) are stored in
//!   seq order, and no final reply is released before its entry is durable.
//! - A `Persist` under an id the client never used (the enclave re-sends one whose connection
//!   died) is stored all the same, and reported durable.
//! - An enclave whose log is ahead of the store is refused, with a reason naming the fix.
//! - A `Persist` overlapping stored entries stops the client instead of corrupting the store.
//! - A lone `Persist` (committed by the connection's reader, not the writer thread) is reported
//!   `Durable` only once it is on disk, and a `Persist` whose write fails never is.
//! - A final reply the enclave sends `Held` for an entry is released to the caller only once
//!   the entry is durable, whichever connection's `Persist` carried it, and never when its
//!   commit fails.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::Arc;
use std::time::Duration;

use attestplane_host::enclave_client::{ClientError, ClientOptions, EnclaveClient, Phase};
use attestplane_host::store::{MIN_SEGMENT_BYTES, Store, StoreOptions};
use attestplane_proto::{
    Address, Body, ByteBuf, Frame, FrameDecoder, Listener, Request, Response, read_frame,
    write_frame,
};
use tokio::sync::mpsc;

/// What the fake enclave sees: (connection, request id, request), and a way to answer on any
/// connection.
struct Fake {
    requests: mpsc::UnboundedReceiver<(usize, u64, Request)>,
    writers: Arc<tokio::sync::Mutex<Vec<mpsc::UnboundedSender<Frame>>>>,
}

impl Fake {
    async fn start(path: &std::path::Path) -> Fake {
        let listener = Listener::bind(&Address::Unix(path.to_path_buf()))
            .await
            .unwrap();
        let (req_tx, requests) = mpsc::unbounded_channel();
        let writers: Arc<tokio::sync::Mutex<Vec<mpsc::UnboundedSender<Frame>>>> = Arc::default();
        let w = Arc::clone(&writers);
        tokio::spawn(async move {
            loop {
                let Ok(stream) = listener.accept().await else {
                    return;
                };
                let (mut reader, mut writer) = tokio::io::split(stream);
                let (tx, mut rx) = mpsc::unbounded_channel::<Frame>();
                let conn = {
                    let mut w = w.lock().await;
                    w.push(tx);
                    w.len() - 1
                };
                tokio::spawn(async move {
                    while let Some(frame) = rx.recv().await {
                        if write_frame(&mut writer, &frame).await.is_err() {
                            return;
                        }
                    }
                });
                let req_tx = req_tx.clone();
                tokio::spawn(async move {
                    let mut decoder = FrameDecoder::new();
                    while let Ok(Some(frame)) = read_frame(&mut reader, &mut decoder).await {
                        if let Body::Request(r) = frame.body {
                            let _ = req_tx.send((conn, frame.id, r));
                        }
                    }
                });
            }
        });
        Fake { requests, writers }
    }

    async fn send(&self, conn: usize, id: u64, response: Response) {
        let w = self.writers.lock().await;
        w[conn].send(Frame::response(id, response)).unwrap();
    }

    /// The next request, answering `Hello`/`Status` as an enclave that is ready at epoch 3 with
    /// `head` as its head seq, and acknowledging `Durable`s (returned too).
    async fn next(&mut self, head: Option<u64>) -> (usize, u64, Request) {
        loop {
            let (conn, id, request) =
                tokio::time::timeout(Duration::from_secs(10), self.requests.recv())
                    .await
                    .expect("a request within 10 s")
                    .expect("the fake's listener is alive");
            match request {
                Request::Hello { version } => {
                    self.send(
                        conn,
                        id,
                        Response::Hello {
                            version,
                            ready: true,
                            epoch: Some(3),
                            head_seq: head,
                        },
                    )
                    .await;
                }
                Request::Status => {
                    self.send(
                        conn,
                        id,
                        Response::Status {
                            ready: true,
                            epoch: Some(3),
                            head_seq: head,
                            durable_seq: head,
                            servers: 0,
                        },
                    )
                    .await;
                }
                Request::Durable { .. } => {
                    self.send(conn, id, Response::Ack).await;
                    return (conn, id, request);
                }
                other => return (conn, id, other),
            }
        }
    }

    /// Waits for a `Durable` covering `seq`.
    async fn durable_through(&mut self, seq: u64, head: Option<u64>) {
        loop {
            if let (_, _, Request::Durable { through_seq }) = self.next(head).await
                && through_seq >= seq
            {
                return;
            }
        }
    }
}

fn entry(seq: u64) -> ByteBuf {
    ByteBuf::from(format!("entry {seq}").into_bytes())
}

fn resolve(server: &str) -> Request {
    Request::Resolve {
        bearer: "token".into(),
        server_id: server.into(),
    }
}

fn handle(seq: u64) -> Response {
    Response::Handle {
        token: format!("handle-{seq}"),
        seq,
        expires_at: 0,
    }
}

async fn setup(connections: usize) -> (tempfile::TempDir, Fake, EnclaveClient, Arc<Store>) {
    setup_with(connections, StoreOptions::default()).await
}

/// [`setup`] with a store of `options`, in the directory's `log`.
async fn setup_with(
    connections: usize,
    options: StoreOptions,
) -> (tempfile::TempDir, Fake, EnclaveClient, Arc<Store>) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("enclave.sock");
    let fake = Fake::start(&socket).await;
    let store = Arc::new(Store::open_with(dir.path().join("log"), options).unwrap());
    let client = EnclaveClient::start(
        Address::Unix(socket),
        Arc::clone(&store),
        ClientOptions {
            connections,
            ..ClientOptions::default()
        },
    );
    (dir, fake, client, store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_persists_are_stored_in_seq_order_and_replies_wait_for_durability() {
    let (_dir, mut fake, client, store) = setup(2).await;
    // Serve Hello/Status until the client is ready on both connections.
    let ready = tokio::spawn({
        let client = client.clone();
        async move { client.wait_ready(Duration::from_secs(10)).await }
    });
    let a = tokio::spawn({
        let client = client.clone();
        async move { client.call(resolve("a"), Duration::from_secs(10)).await }
    });
    let (conn_a, id_a, req_a) = fake.next(None).await;
    assert_eq!(req_a, resolve("a"));
    assert_eq!(ready.await.unwrap(), Ok(3));
    // A second request, on whichever connection the client picks.
    let b = tokio::spawn({
        let client = client.clone();
        async move { client.call(resolve("b"), Duration::from_secs(10)).await }
    });
    let (conn_b, id_b, req_b) = fake.next(None).await;
    assert_eq!(req_b, resolve("b"));

    // B's Persist (seq 1) arrives before A's (seq 0).
    fake.send(
        conn_b,
        id_b,
        Response::Persist {
            first_seq: 1,
            entries: vec![entry(1)],
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(store.len(), 0, "seq 1 must wait for seq 0");
    fake.send(
        conn_a,
        id_a,
        Response::Persist {
            first_seq: 0,
            entries: vec![entry(0)],
        },
    )
    .await;
    fake.durable_through(1, None).await;
    assert_eq!(
        store.range(0, 2).unwrap(),
        vec![b"entry 0".to_vec(), b"entry 1".to_vec()]
    );
    assert!(!a.is_finished() && !b.is_finished(), "no final reply yet");

    // The final replies, released by the enclave after the Durable.
    fake.send(conn_a, id_a, handle(0)).await;
    fake.send(conn_b, id_b, handle(1)).await;
    assert_eq!(a.await.unwrap(), Ok(handle(0)));
    assert_eq!(b.await.unwrap(), Ok(handle(1)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persist_under_an_unknown_id_is_stored_and_reported_durable() {
    let (_dir, mut fake, client, store) = setup(1).await;
    let c = client.clone();
    let call = tokio::spawn(async move { c.call(resolve("a"), Duration::from_secs(10)).await });
    let (conn, id, _) = fake.next(None).await;
    // The enclave re-sends the Persist of a request made on a connection that died: an id
    // this client never used, carrying seq 0; then this request's own, seq 1.
    fake.send(
        conn,
        987_654_321,
        Response::Persist {
            first_seq: 0,
            entries: vec![entry(0)],
        },
    )
    .await;
    fake.send(
        conn,
        id,
        Response::Persist {
            first_seq: 1,
            entries: vec![entry(1), entry(2)],
        },
    )
    .await;
    fake.durable_through(2, None).await;
    assert_eq!(store.len(), 3);
    fake.send(conn, id, handle(2)).await;
    assert_eq!(call.await.unwrap(), Ok(handle(2)));
    assert_eq!(
        client
            .metrics()
            .rerouted_persists
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enclave_ahead_of_the_store_is_refused() {
    let (_dir, mut fake, client, store) = setup(1).await;
    // The store is empty, the enclave claims 11 entries (head seq 10): entries were signed and
    // never stored. Serving would extend a chain the store cannot show.
    let serve = tokio::spawn(async move {
        loop {
            fake.next(Some(10)).await;
        }
    });
    let err = client
        .wait_ready(Duration::from_secs(10))
        .await
        .unwrap_err();
    let ClientError::Failed(why) = &err else {
        panic!("expected Failed, got {err:?}");
    };
    assert!(why.contains("restart the enclave"), "{why}");
    assert!(matches!(client.phase(), Phase::Failed(_)));
    assert_eq!(store.len(), 0);
    let call = client.call(resolve("a"), Duration::from_secs(1)).await;
    assert!(matches!(call, Err(ClientError::Failed(_))), "{call:?}");
    serve.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persist_overlapping_stored_entries_stops_the_client() {
    let (_dir, mut fake, client, store) = setup(1).await;
    let c = client.clone();
    let first = tokio::spawn(async move { c.call(resolve("a"), Duration::from_secs(10)).await });
    let (conn, id, _) = fake.next(None).await;
    fake.send(
        conn,
        id,
        Response::Persist {
            first_seq: 0,
            entries: vec![entry(0)],
        },
    )
    .await;
    fake.durable_through(0, None).await;
    fake.send(conn, id, handle(0)).await;
    assert_eq!(first.await.unwrap(), Ok(handle(0)));

    let c = client.clone();
    let second = tokio::spawn(async move { c.call(resolve("b"), Duration::from_secs(10)).await });
    let (conn, id, _) = fake.next(Some(0)).await;
    // seq 0 again, with other bytes: a rewrite of history.
    fake.send(
        conn,
        id,
        Response::Persist {
            first_seq: 0,
            entries: vec![ByteBuf::from(b"forged".to_vec())],
        },
    )
    .await;
    let reply = second.await.unwrap();
    assert!(matches!(reply, Err(ClientError::Failed(_))), "{reply:?}");
    assert!(matches!(client.phase(), Phase::Failed(_)));
    assert_eq!(store.range(0, 1).unwrap(), vec![b"entry 0".to_vec()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_persist_is_reported_durable_only_once_stored_and_a_failed_write_never() {
    let small = StoreOptions {
        segment_bytes: MIN_SEGMENT_BYTES,
    };
    let (dir, mut fake, client, store) = setup_with(1, small).await;
    let log = dir.path().join("log");
    let c = client.clone();
    let first = tokio::spawn(async move { c.call(resolve("a"), Duration::from_secs(10)).await });
    let (conn, id, _) = fake.next(None).await;
    // One entry that fills the first segment, so that the next commit starts segment 1.
    let full = ByteBuf::from(vec![7u8; MIN_SEGMENT_BYTES as usize]);
    fake.send(
        conn,
        id,
        Response::Persist {
            first_seq: 0,
            entries: vec![full],
        },
    )
    .await;
    fake.durable_through(0, None).await;
    assert_eq!(store.len(), 1, "Durable(0) before entry 0 was durable");
    assert_eq!(
        store.stats().inline_commits,
        1,
        "a lone Persist is committed by the reader"
    );
    fake.send(conn, id, handle(0)).await;
    assert_eq!(first.await.unwrap(), Ok(handle(0)));

    // A file squatting segment 1's name: creating it fails, a real I/O failure of the commit.
    std::fs::File::create(log.join("segments").join("00000000000000000001.log")).unwrap();
    let c = client.clone();
    let second = tokio::spawn(async move { c.call(resolve("b"), Duration::from_secs(10)).await });
    let (conn, id, _) = fake.next(Some(0)).await;
    fake.send(
        conn,
        id,
        Response::Persist {
            first_seq: 1,
            entries: vec![entry(1)],
        },
    )
    .await;
    let reply = second.await.unwrap();
    assert!(matches!(reply, Err(ClientError::Failed(_))), "{reply:?}");
    assert!(matches!(client.phase(), Phase::Failed(_)));
    // No Durable for the entry that never reached the disk, now or later.
    let later = tokio::time::timeout(Duration::from_millis(500), fake.next(Some(0))).await;
    assert!(
        !matches!(later, Ok((_, _, Request::Durable { through_seq })) if through_seq >= 1),
        "{later:?}"
    );
    assert_eq!(store.len(), 1);
}

fn held(through_seq: u64, reply: Response) -> Response {
    Response::Held {
        through_seq,
        reply: Box::new(reply),
    }
}

/// The handle is held for entry 1; entry 1 arrives before entry 0, so it waits in the
/// sequencer and is not durable: the caller is not answered. Once entry 0 arrives (re-sent
/// under an id the client never used) both are committed, and only then is the handle released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_reply_is_released_only_once_its_entry_is_durable() {
    let (_dir, mut fake, client, store) = setup(1).await;
    let c = client.clone();
    let call = tokio::spawn(async move {
        let reply = c.call(resolve("a"), Duration::from_secs(10)).await;
        (reply, c.store().len())
    });
    let (conn, id, _) = fake.next(None).await;
    fake.send(
        conn,
        id,
        Response::Persist {
            first_seq: 1,
            entries: vec![entry(1)],
        },
    )
    .await;
    fake.send(conn, id, held(1, handle(1))).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!call.is_finished(), "released before entry 1 was durable");
    assert_eq!(store.len(), 0);

    fake.send(
        conn,
        987_654_321,
        Response::Persist {
            first_seq: 0,
            entries: vec![entry(0)],
        },
    )
    .await;
    let (reply, stored) = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("not released once durable")
        .unwrap();
    assert_eq!(reply, Ok(handle(1)));
    assert_eq!(stored, 2, "released before the commit");
    // The enclave still hears about it.
    fake.durable_through(1, None).await;
}

/// A held reply whose entry's commit fails is never released: the caller gets the store's
/// failure, as it did when the enclave held the reply, whether the reply arrived before the
/// `Persist` or after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_reply_whose_commit_fails_is_never_released() {
    let small = StoreOptions {
        segment_bytes: MIN_SEGMENT_BYTES,
    };
    let (dir, mut fake, client, store) = setup_with(1, small).await;
    let log = dir.path().join("log");
    let c = client.clone();
    let first = tokio::spawn(async move { c.call(resolve("a"), Duration::from_secs(10)).await });
    let (conn, id, _) = fake.next(None).await;
    // One entry that fills the first segment, so that the next commit starts segment 1.
    let full = ByteBuf::from(vec![7u8; MIN_SEGMENT_BYTES as usize]);
    fake.send(
        conn,
        id,
        Response::Persist {
            first_seq: 0,
            entries: vec![full],
        },
    )
    .await;
    fake.send(conn, id, held(0, handle(0))).await;
    assert_eq!(first.await.unwrap(), Ok(handle(0)));
    fake.durable_through(0, None).await;

    // A file squatting segment 1's name: creating it fails, a real I/O failure of the commit.
    std::fs::File::create(log.join("segments").join("00000000000000000001.log")).unwrap();
    let c = client.clone();
    let second = tokio::spawn(async move { c.call(resolve("b"), Duration::from_secs(10)).await });
    let (conn, id, request) = fake.next(Some(0)).await;
    assert_eq!(request, resolve("b"));
    // The held reply first (it waits), then the entry whose commit fails.
    fake.send(conn, id, held(1, handle(1))).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!second.is_finished());
    fake.send(
        conn,
        id,
        Response::Persist {
            first_seq: 1,
            entries: vec![entry(1)],
        },
    )
    .await;
    let reply = tokio::time::timeout(Duration::from_secs(10), second)
        .await
        .expect("the caller was left waiting")
        .unwrap();
    assert!(matches!(reply, Err(ClientError::Failed(_))), "{reply:?}");
    assert!(matches!(client.phase(), Phase::Failed(_)));
    assert_eq!(store.len(), 1);
}

/// A reply held on one connection for an entry whose `Persist` comes on the other connection
/// is released when that entry is durable, not before; a reply held for an entry already
/// durable is released at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_held_for_another_connections_persist_is_released_when_that_is_durable() {
    let (_dir, mut fake, client, store) = setup(2).await;
    let c = client.clone();
    let a = tokio::spawn(async move { c.call(resolve("a"), Duration::from_secs(10)).await });
    let (conn_a, id_a, _) = fake.next(None).await;
    let c = client.clone();
    let b = tokio::spawn(async move { c.call(resolve("b"), Duration::from_secs(10)).await });
    let (_, id_b, _) = fake.next(None).await;
    // Both connections are up (the fake has accepted two).
    for _ in 0..1000 {
        if fake.writers.lock().await.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let other = 1 - conn_a;

    fake.send(conn_a, id_a, held(0, handle(0))).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!a.is_finished(), "released with no entry 0 anywhere");
    assert_eq!(store.len(), 0);

    // Entry 0 comes in B's Persist, on the other connection.
    fake.send(
        other,
        id_b,
        Response::Persist {
            first_seq: 0,
            entries: vec![entry(0)],
        },
    )
    .await;
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(10), a)
            .await
            .expect("not released once entry 0 was durable")
            .unwrap(),
        Ok(handle(0))
    );
    assert_eq!(store.len(), 1);
    assert!(!b.is_finished(), "B's own final reply has not come");
    fake.send(other, id_b, held(0, handle(1))).await;
    assert_eq!(b.await.unwrap(), Ok(handle(1)));
}
