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
//! - A held reply survives the drop of any connection while the same boot of the enclave runs
//!   (it re-sends the `Persist` on a live or a new connection), but one waiting for an entry a
//!   restarted enclave never delivered fails with `Unavailable` as soon as the new boot is
//!   found, and is never released when the new boot's entries fill those seqs; nothing the old
//!   boot sends on a connection still open is used after that.

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
    /// Per connection, the tasks that serve it: aborting them closes it.
    tasks: Arc<tokio::sync::Mutex<Vec<[tokio::task::AbortHandle; 2]>>>,
    /// The boot `Hello`/`Status` describe: its epoch, and whether it has been replayed.
    epoch: u64,
    ready: bool,
    /// `Status` requests answered.
    statuses: usize,
}

impl Fake {
    async fn start(path: &std::path::Path) -> Fake {
        let listener = Listener::bind(&Address::Unix(path.to_path_buf()))
            .await
            .unwrap();
        let (req_tx, requests) = mpsc::unbounded_channel();
        let writers: Arc<tokio::sync::Mutex<Vec<mpsc::UnboundedSender<Frame>>>> = Arc::default();
        let tasks: Arc<tokio::sync::Mutex<Vec<[tokio::task::AbortHandle; 2]>>> = Arc::default();
        let w = Arc::clone(&writers);
        let t = Arc::clone(&tasks);
        tokio::spawn(async move {
            loop {
                let Ok(stream) = listener.accept().await else {
                    return;
                };
                let (mut reader, mut writer) = tokio::io::split(stream);
                let (tx, mut rx) = mpsc::unbounded_channel::<Frame>();
                // The connection's tasks are registered before it is numbered, so that
                // `restart` closes every connection a request has come from.
                let mut t = t.lock().await;
                let conn = {
                    let mut w = w.lock().await;
                    w.push(tx);
                    w.len() - 1
                };
                let writing = tokio::spawn(async move {
                    while let Some(frame) = rx.recv().await {
                        if write_frame(&mut writer, &frame).await.is_err() {
                            return;
                        }
                    }
                });
                let req_tx = req_tx.clone();
                let reading = tokio::spawn(async move {
                    let mut decoder = FrameDecoder::new();
                    while let Ok(Some(frame)) = read_frame(&mut reader, &mut decoder).await {
                        if let Body::Request(r) = frame.body {
                            let _ = req_tx.send((conn, frame.id, r));
                        }
                    }
                });
                t.push([writing.abort_handle(), reading.abort_handle()]);
            }
        });
        Fake {
            requests,
            writers,
            tasks,
            epoch: 3,
            ready: true,
            statuses: 0,
        }
    }

    /// Sends `response` on `conn`; dropped if that connection is closed (as an enclave drops
    /// a reply whose connection has gone).
    async fn send(&self, conn: usize, id: u64, response: Response) {
        let w = self.writers.lock().await;
        let _ = w[conn].send(Frame::response(id, response));
    }

    /// Closes every connection open now.
    async fn close_all(&self) {
        for [writing, reading] in self.tasks.lock().await.iter() {
            writing.abort();
            reading.abort();
        }
    }

    /// Closes every connection and comes back as a new boot at `epoch`, not yet replayed:
    /// whatever the old boot signed and did not deliver is gone with it.
    async fn restart(&mut self, epoch: u64) {
        self.close_all().await;
        self.epoch = epoch;
        self.ready = false;
    }

    /// Serves the client's replay of the stored log (answering everything else as
    /// [`Fake::next`] does); `ReplayEnd` is answered with the new epoch's `opening` entries,
    /// after the replayed ones, and its `Ack` held for them. Returns the entries replayed.
    async fn serve_replay(&mut self, opening: Vec<ByteBuf>) -> u64 {
        let mut total = 0;
        loop {
            let (conn, id, request) = self.next(None).await;
            match request {
                Request::ReplayBegin { total_entries, .. } => {
                    total = total_entries;
                    self.send(conn, id, Response::Ack).await;
                }
                Request::ReplayEntries { .. } => self.send(conn, id, Response::Ack).await,
                Request::ReplayEnd => {
                    let through = total + opening.len() as u64 - 1;
                    self.send(
                        conn,
                        id,
                        Response::Persist {
                            first_seq: total,
                            entries: opening,
                        },
                    )
                    .await;
                    self.ready = true;
                    self.send(conn, id, held(through, Response::Ack)).await;
                    return total;
                }
                _ => {}
            }
        }
    }

    /// The next request, answering `Hello`/`Status` as an enclave that is ready at its epoch (3
    /// unless it restarted) with `head` as its head seq, or not yet replayed, and acknowledging
    /// `Durable`s (returned too).
    async fn next(&mut self, head: Option<u64>) -> (usize, u64, Request) {
        loop {
            let (conn, id, request) =
                tokio::time::timeout(Duration::from_secs(10), self.requests.recv())
                    .await
                    .expect("a request within 10 s")
                    .expect("the fake's listener is alive");
            match request {
                Request::Hello { version } => {
                    let (ready, epoch, head) = self.boot(head);
                    self.send(
                        conn,
                        id,
                        Response::Hello {
                            version,
                            ready,
                            epoch,
                            head_seq: head,
                        },
                    )
                    .await;
                }
                Request::Status => {
                    self.statuses += 1;
                    let (ready, epoch, head) = self.boot(head);
                    self.send(
                        conn,
                        id,
                        Response::Status {
                            ready,
                            epoch,
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

    /// What `Hello` and `Status` report: (ready, epoch, head seq). A boot not yet replayed has
    /// no log.
    fn boot(&self, head: Option<u64>) -> (bool, Option<u64>, Option<u64>) {
        if self.ready {
            (true, Some(self.epoch), head)
        } else {
            (false, None, None)
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

/// Segments as small as the store allows, so that one entry can fill one.
fn small_segments() -> StoreOptions {
    StoreOptions {
        segment_bytes: MIN_SEGMENT_BYTES,
    }
}

/// On a one-connection client over [`small_segments`]: starts a call and answers it with a
/// `Persist` of one entry that fills segment 0, so that the next commit starts segment 1.
/// Returns the call, its connection and its id.
async fn fill_first_segment(fake: &mut Fake, client: &EnclaveClient) -> (Call, usize, u64) {
    let c = client.clone();
    let first = tokio::spawn(async move { c.call(resolve("a"), Duration::from_secs(10)).await });
    let (conn, id, _) = fake.next(None).await;
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
    (first, conn, id)
}

/// A file squatting segment 1's name under the store in `dir`: creating it fails, a real I/O
/// failure of the commit that starts it.
fn squat_segment_one(dir: &std::path::Path) {
    std::fs::File::create(
        dir.join("log")
            .join("segments")
            .join("00000000000000000001.log"),
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_persist_is_reported_durable_only_once_stored_and_a_failed_write_never() {
    let (dir, mut fake, client, store) = setup_with(1, small_segments()).await;
    let (first, conn, id) = fill_first_segment(&mut fake, &client).await;
    fake.durable_through(0, None).await;
    assert_eq!(store.len(), 1, "Durable(0) before entry 0 was durable");
    assert_eq!(
        store.stats().inline_commits,
        1,
        "a lone Persist is committed by the reader"
    );
    fake.send(conn, id, handle(0)).await;
    assert_eq!(first.await.unwrap(), Ok(handle(0)));

    squat_segment_one(dir.path());
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
    let (reply, stored) = within(call, "not released once durable").await;
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
    let (dir, mut fake, client, store) = setup_with(1, small_segments()).await;
    let (first, conn, id) = fill_first_segment(&mut fake, &client).await;
    fake.send(conn, id, held(0, handle(0))).await;
    assert_eq!(first.await.unwrap(), Ok(handle(0)));
    fake.durable_through(0, None).await;

    squat_segment_one(dir.path());
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
    let reply = within(second, "the caller was left waiting").await;
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
        within(a, "not released once entry 0 was durable").await,
        Ok(handle(0))
    );
    assert_eq!(store.len(), 1);
    assert!(!b.is_finished(), "B's own final reply has not come");
    fake.send(other, id_b, held(0, handle(1))).await;
    assert_eq!(b.await.unwrap(), Ok(handle(1)));
}

type Call = tokio::task::JoinHandle<Result<Response, ClientError>>;

/// `task`'s result, which must come within 10 s (`what` says what was left waiting).
async fn within<T>(task: tokio::task::JoinHandle<T>, what: &str) -> T {
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect(what)
        .unwrap()
}

fn assert_unavailable(reply: &Result<Response, ClientError>) {
    assert!(
        matches!(reply, Err(ClientError::Unavailable(_))),
        "{reply:?}"
    );
}

/// Once both connections of a two-connection client have been checked, starts calls `a` and
/// `b`, which go one on each: returns the calls and, for each, its connection and id.
async fn two_calls(
    fake: &mut Fake,
    client: &EnclaveClient,
    timeout: Duration,
) -> (Call, Call, (usize, u64), (usize, u64)) {
    while fake.statuses < 2 {
        let _ = tokio::time::timeout(Duration::from_millis(100), fake.next(None)).await;
    }
    let c = client.clone();
    let a = tokio::spawn(async move { c.call(resolve("a"), timeout).await });
    let (conn_a, id_a, _) = fake.next(None).await;
    let c = client.clone();
    let b = tokio::spawn(async move { c.call(resolve("b"), timeout).await });
    let (conn_b, id_b, _) = fake.next(None).await;
    assert_ne!(conn_a, conn_b);
    (a, b, (conn_a, id_a), (conn_b, id_b))
}

/// A reply held for an entry that another connection's `Persist` was to carry, when every
/// connection drops and the enclave comes back as a new boot: the entry is gone with the old
/// boot, and the new boot writes other entries at the same seqs. The caller must not get the
/// reply when those become durable (it depends on an entry in no log): it gets `Unavailable`
/// as soon as the client finds the enclave restarted, long before its timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_reply_whose_entries_die_with_the_enclave_is_failed_not_released() {
    let (_dir, mut fake, client, store) = setup(2).await;
    let timeout = Duration::from_secs(60);
    let (a, b, (conn_a, id_a), _) = two_calls(&mut fake, &client, timeout).await;
    fake.send(conn_a, id_a, held(0, handle(0))).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!a.is_finished(), "released with no entry 0 anywhere");

    // B's Persist (entry 0) never comes: the enclave restarts.
    let restarted = std::time::Instant::now();
    fake.restart(4).await;
    assert_eq!(fake.serve_replay(vec![entry(100), entry(101)]).await, 0);
    fake.durable_through(1, Some(1)).await;
    assert_eq!(
        store.range(0, 2).unwrap(),
        vec![b"entry 100".to_vec(), b"entry 101".to_vec()],
        "the new boot's entries fill seqs 0 and 1"
    );
    let reply = within(a, "the caller still waits").await;
    assert_unavailable(&reply);
    assert!(
        restarted.elapsed() < timeout / 4,
        "{:?}",
        restarted.elapsed()
    );
    let reply = b.await.unwrap();
    assert_unavailable(&reply);
    // The client serves the new boot.
    let serve = tokio::spawn(async move {
        loop {
            fake.next(Some(1)).await;
        }
    });
    assert_eq!(client.wait_ready(Duration::from_secs(10)).await, Ok(4));
    serve.abort();
}

/// A held reply whose entry was durable before every connection dropped is answered, and the
/// enclave's restart leaves it alone; one whose entry was not is failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_reply_whose_entries_were_durable_is_delivered_across_a_restart() {
    let (_dir, mut fake, client, store) = setup(2).await;
    let timeout = Duration::from_secs(60);
    let (a, b, (conn_a, id_a), (other, id_b)) = two_calls(&mut fake, &client, timeout).await;
    // A's reply waits for entry 0, which B's Persist carries; B's waits for entry 1, which
    // never comes.
    fake.send(conn_a, id_a, held(0, handle(0))).await;
    fake.send(other, id_b, held(1, handle(1))).await;
    fake.send(
        other,
        id_b,
        Response::Persist {
            first_seq: 0,
            entries: vec![entry(0)],
        },
    )
    .await;
    fake.durable_through(0, Some(1)).await;
    assert_eq!(store.len(), 1);

    fake.restart(4).await;
    assert_eq!(fake.serve_replay(vec![entry(100), entry(101)]).await, 1);
    fake.durable_through(2, Some(2)).await;
    assert_eq!(within(a, "A was not answered").await, Ok(handle(0)));
    let reply = within(b, "B still waits").await;
    assert_unavailable(&reply);
}

/// The connection that was to carry a held reply's entry drops, and the enclave (the same
/// boot) re-sends that `Persist` on the live connection, under an id the client no longer
/// waits on: the held reply is released once the entry is durable, not failed with the
/// connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_reply_survives_the_drop_of_the_connection_that_owed_its_entry() {
    let (_dir, mut fake, client, store) = setup(2).await;
    let (a, b, (conn_a, id_a), (other, id_b)) =
        two_calls(&mut fake, &client, Duration::from_secs(30)).await;
    fake.send(conn_a, id_a, held(0, handle(0))).await;
    {
        let tasks = fake.tasks.lock().await;
        for task in &tasks[other] {
            task.abort();
        }
    }
    let reply = within(b, "B was left waiting").await;
    assert_unavailable(&reply);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!a.is_finished(), "released with no entry 0 anywhere");
    fake.send(
        conn_a,
        id_b,
        Response::Persist {
            first_seq: 0,
            entries: vec![entry(0)],
        },
    )
    .await;
    assert_eq!(
        within(a, "not released once entry 0 was durable").await,
        Ok(handle(0))
    );
    assert_eq!(store.len(), 1);
}

/// Every connection drops but the enclave does not restart: the same boot (same epoch), ready,
/// its head one entry ahead of the store, re-sends the undelivered `Persist` on one of the new
/// connections, after the other has already checked its status. That is not a restart: the
/// held reply waits for the entry and is released once it is durable, and the client serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_reply_survives_losing_every_connection_to_the_same_boot() {
    let (_dir, mut fake, client, store) = setup(2).await;
    let (a, _b, (conn_a, id_a), (_, id_b)) =
        two_calls(&mut fake, &client, Duration::from_secs(30)).await;
    fake.send(conn_a, id_a, held(0, handle(0))).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    fake.close_all().await;

    // Both connections come back. Answer `Hello` and `Status` as the same boot, whose head is
    // entry 0; once one connection has had its status, send the orphaned Persist on the other.
    let mut statused = None;
    let mut resent = false;
    while !resent {
        let (conn, id, request) =
            tokio::time::timeout(Duration::from_secs(10), fake.requests.recv())
                .await
                .expect("a request within 10 s")
                .unwrap();
        if conn < 2 {
            continue; // Sent before the drop.
        }
        match request {
            Request::Hello { version } => {
                fake.send(
                    conn,
                    id,
                    Response::Hello {
                        version,
                        ready: true,
                        epoch: Some(3),
                        head_seq: Some(0),
                    },
                )
                .await;
            }
            Request::Status => {
                fake.send(
                    conn,
                    id,
                    Response::Status {
                        ready: true,
                        epoch: Some(3),
                        head_seq: Some(0),
                        durable_seq: None,
                        servers: 0,
                    },
                )
                .await;
                if statused.is_none() {
                    statused = Some(conn);
                    // Let the client act on the status before the Persist arrives.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    for _ in 0..1000 {
                        if fake.writers.lock().await.len() == 4 {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    let other = if conn == 2 { 3 } else { 2 };
                    fake.send(
                        other,
                        id_b,
                        Response::Persist {
                            first_seq: 0,
                            entries: vec![entry(0)],
                        },
                    )
                    .await;
                    resent = true;
                }
            }
            Request::Durable { .. } => fake.send(conn, id, Response::Ack).await,
            _ => {}
        }
    }
    let serve = tokio::spawn(async move {
        loop {
            fake.next(Some(0)).await;
        }
    });
    assert_eq!(
        within(a, "not released once entry 0 was durable").await,
        Ok(handle(0))
    );
    assert_eq!(store.len(), 1);
    assert_eq!(client.wait_ready(Duration::from_secs(10)).await, Ok(3));
    serve.abort();
}

/// Frames a boot of the enclave sent before it died can still be read after the client has
/// adopted the next boot (they were buffered on a connection the client had not yet seen
/// close). Here one connection of the old boot stays open while the other reconnects to a
/// restarted enclave; once the replay has begun, the old connection delivers a held reply for
/// entry 0 and a `Persist` of entry 0. Neither may be used (the client retires that
/// connection): entry 0 is now the new boot's, so the reply is failed (never released when the
/// new entry 0 is durable), and the old batch is not stored (it would put an entry of the old
/// boot under the new boot's seq).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_from_a_boot_that_is_gone_are_not_used() {
    let (_dir, mut fake, client, store) = setup(2).await;
    let (a, b, (conn_a, id_a), (conn_b, id_b)) =
        two_calls(&mut fake, &client, Duration::from_secs(60)).await;
    {
        let tasks = fake.tasks.lock().await;
        for task in &tasks[conn_b] {
            task.abort();
        }
    }
    let reply = within(b, "B was left waiting").await;
    assert_unavailable(&reply);
    // The enclave restarted (in the fake, the old boot's connection `conn_a` stays open).
    fake.epoch = 4;
    fake.ready = false;
    loop {
        let (conn, id, request) = fake.next(None).await;
        match request {
            Request::ReplayBegin { total_entries, .. } => {
                assert_eq!(total_entries, 0);
                fake.send(conn, id, Response::Ack).await;
                break;
            }
            Request::ReplayEntries { .. } => fake.send(conn, id, Response::Ack).await,
            _ => {}
        }
    }
    fake.send(
        conn_a,
        id_b,
        Response::Persist {
            first_seq: 0,
            entries: vec![entry(0)],
        },
    )
    .await;
    fake.send(conn_a, id_a, held(0, handle(0))).await;
    let reply = within(a, "A still waits").await;
    assert_unavailable(&reply);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(store.next_seq(), 0, "the old boot's entry 0 was taken");
    loop {
        let (conn, id, request) = fake.next(None).await;
        if request == Request::ReplayEnd {
            fake.send(
                conn,
                id,
                Response::Persist {
                    first_seq: 0,
                    entries: vec![entry(100), entry(101)],
                },
            )
            .await;
            fake.ready = true;
            fake.send(conn, id, held(1, Response::Ack)).await;
            break;
        }
    }
    fake.durable_through(1, Some(1)).await;
    assert_eq!(
        store.range(0, 2).unwrap(),
        vec![b"entry 100".to_vec(), b"entry 101".to_vec()]
    );
    let serve = tokio::spawn(async move {
        loop {
            fake.next(Some(1)).await;
        }
    });
    assert_eq!(client.wait_ready(Duration::from_secs(10)).await, Ok(4));
    serve.abort();
}

/// The same, on a connection the client has not finished checking (its `Hello` is still
/// unanswered, but requests already go to it): a held reply to a request sent there before the
/// enclave restarted, read after the new boot was adopted, is failed, not released when the new
/// boot's entry 0 is durable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_reply_to_a_request_sent_before_the_restart_is_not_used() {
    let (_dir, mut fake, client, store) = setup(2).await;
    // One connection is checked; the other's `Hello` waits unanswered.
    let mut checked = None;
    let mut unchecked = None;
    let mut statused = false;
    while !statused || unchecked.is_none() {
        let (conn, id, request) =
            tokio::time::timeout(Duration::from_secs(10), fake.requests.recv())
                .await
                .expect("a request within 10 s")
                .unwrap();
        match request {
            Request::Hello { version } if unchecked.is_none() && checked != Some(conn) => {
                if checked.is_none() && unchecked.is_none() {
                    checked = Some(conn);
                    fake.send(
                        conn,
                        id,
                        Response::Hello {
                            version,
                            ready: true,
                            epoch: Some(3),
                            head_seq: None,
                        },
                    )
                    .await;
                } else {
                    unchecked = Some(conn);
                }
            }
            Request::Status => {
                statused = true;
                fake.send(
                    conn,
                    id,
                    Response::Status {
                        ready: true,
                        epoch: Some(3),
                        head_seq: None,
                        durable_seq: None,
                        servers: 0,
                    },
                )
                .await;
            }
            _ => {}
        }
    }
    assert_eq!(client.wait_ready(Duration::from_secs(10)).await, Ok(3));
    let (checked, unchecked) = (checked.unwrap(), unchecked.unwrap());
    // Two calls: one goes to each connection.
    let mut calls = Vec::new();
    for server in ["a", "b"] {
        let c = client.clone();
        calls.push(tokio::spawn(async move {
            c.call(resolve(server), Duration::from_secs(60)).await
        }));
    }
    let mut on_unchecked = None;
    for _ in 0..2 {
        let (conn, id, request) = fake.next(None).await;
        if conn == unchecked {
            on_unchecked = Some((id, request));
        }
    }
    let (id, request) = on_unchecked.expect("no call went to the unchecked connection");
    let call = calls.remove(usize::from(request != resolve("a")));

    // The enclave restarts; the checked connection closes and comes back to the new boot.
    {
        let tasks = fake.tasks.lock().await;
        for task in &tasks[checked] {
            task.abort();
        }
    }
    fake.epoch = 4;
    fake.ready = false;
    loop {
        let (conn, rid, request) = fake.next(None).await;
        if let Request::ReplayBegin { .. } = request {
            fake.send(conn, rid, Response::Ack).await;
            break;
        }
    }
    // The old boot's held reply, read late on the connection still open.
    fake.send(unchecked, id, held(0, handle(0))).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    loop {
        let (conn, rid, request) = fake.next(None).await;
        if request == Request::ReplayEnd {
            fake.send(
                conn,
                rid,
                Response::Persist {
                    first_seq: 0,
                    entries: vec![entry(100), entry(101)],
                },
            )
            .await;
            fake.ready = true;
            fake.send(conn, rid, held(1, Response::Ack)).await;
            break;
        }
    }
    fake.durable_through(1, Some(1)).await;
    assert_eq!(store.len(), 2);
    let reply = within(call, "the caller still waits").await;
    assert_unavailable(&reply);
}
