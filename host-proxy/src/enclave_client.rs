//! The host's client of the enclave: a few persistent connections, requests multiplexed over
//! them by id, the two-phase durability protocol, and the replay of the stored log at boot.
//!
//! Role. Everything the HTTP API asks of the enclave goes through [`EnclaveClient::call`]. The
//! client keeps [`ClientOptions::connections`] connections open (docs/design.md, "Transport":
//! never a connection per request), sends each request on one of them under a fresh id, and completes
//! the caller's future when the *final* reply arrives under that id.
//!
//! Durability. A request that writes the log is answered with [`Response::Persist`] and, right
//! after it, its final reply wrapped in [`Response::Held`], which names the last entry the reply
//! depends on. The client hands the entries to the [`Store`] **in sequence order** — replies
//! travel on different connections and may arrive out of order, and a `Persist` whose own
//! connection died is re-sent by the enclave on another one under an id this client may not
//! know — so every `Persist`, known id or not, goes through one sequencer that parks early
//! batches until the gap before them is filled. The held reply waits in the client (with the
//! caller's waiter, under the same lock as the durable watermark) until a commit makes every
//! entry through its seq durable, whichever request's `Persist` carried them and on whichever
//! connection; only then is the caller answered. A failed commit fails the client and every
//! waiter, held or not, with the store's error: a held reply is never released after it. Each
//! completed commit is also reported to the enclave with [`Request::Durable`] (its checkpoints
//! and its MCP gateway wait on that), but the callers no longer wait for that round trip. So
//! no caller is ever answered on the strength of an entry that is not on disk. The rule is
//! this client's to keep (the enclave cannot see the disk; it never could: a host could
//! always report `Durable` early), and it is pinned by `host-proxy/tests/enclave_client.rs`.
//!
//! Commits, two ways. Under concurrency the store's writer thread group-commits the queued
//! batches and one task reports each completed commit. A lone `Persist` on an idle store (one
//! client) is committed by the connection's reader itself ([`Store::submit_or_reserve`]):
//! write and `fdatasync` on its own runtime thread, then the `Durable` queued on its own
//! connection, without waking the writer thread and being woken back (two thread hand-offs per
//! `Persist`, a tenth of a millisecond or more on a small VM). Either way held replies are
//! released, and the `Durable` sent, only after the `fdatasync` covering the entry returned, and
//! never for an entry whose write failed (the store then fails and the client stops serving).
//!
//! Boot and reconnection. On every new connection the client says `Hello`. If the enclave has
//! not replayed (a fresh enclave, or one that restarted), one connection streams the whole
//! stored log into it (`ReplayBegin`, `ReplayEntries`…, `ReplayEnd`, whose `Persist` carries the
//! new epoch's opening entries) while requests wait. If the enclave is ready but its head is not
//! the store's head (entries the enclave signed never reached this disk, e.g. the proxy was
//! killed between the two), the client refuses to serve: continuing would extend a chain whose
//! links the store does not have. Restarting the enclave recovers (it replays what is stored,
//! and opens a new epoch after it). Nothing acknowledged to anyone is lost that way, because
//! nothing is acknowledged before it is durable. The exception is the boot this client was
//! serving when its last connection dropped (same epoch: the enclave did not restart): it is
//! served again at once, nothing reset and no head check, since its head may be ahead of the
//! store by `Persist`s it re-sends on the new connections.
//!
//! Held replies across a restart. A held reply may wait for entries another connection's
//! `Persist` is to carry. While the same boot of the enclave runs, they come: it re-sends a
//! `Persist` whose connection closed on another live connection or on the next one to open. So
//! a held reply is not failed when a connection drops, the last one included. A restart is
//! different: the entries the old boot signed and never delivered are gone, and the new boot,
//! replayed from the store, writes *other* entries at those seqs; releasing the reply when they
//! become durable would answer on the strength of an entry that is in no log. So when the
//! client adopts a boot after serving another (it replays it, or finds it ready at another
//! epoch), before the new boot can write anything (`Shared::reset_sequencer`): every held
//! reply waiting for an entry the store never received fails with
//! [`ClientError::Unavailable`] (503 in the API), and every other connection is retired,
//! closed, with whatever it still delivers ignored (the old boot's frames may still be read on
//! one, and the new boot has written nothing any of them could carry). A held reply whose
//! entries the store already has is left to their commit. The restart is seen when a
//! connection reaches the new boot; while none can (the enclave is down), a held reply waits up
//! to its caller's timeout (504), since a slow network and a restart look the same until then.
//!
//! Trust. The enclave's replies are input like any other: a malformed reply, an id this client
//! never used, a `Persist` overlapping stored entries, all end in an error, never a panic. The
//! client checks nothing cryptographic: the enclave verifies the log at replay and auditors
//! verify it afterwards. It never logs request or reply bodies (bearer tokens and handles pass
//! through it).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use attestplane_proto::{
    Address, Body, ByteBuf, Frame, FrameDecoder, MAX_ENTRIES_PER_FRAME, PROTOCOL_VERSION, Request,
    Response, encode_frame, read_frame,
};
use tokio::io::{AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, oneshot, watch};

use crate::store::{Commit, InlineCommit, Store, StoreError, Submitted};

/// Persistent connections to the enclave by default.
pub const DEFAULT_CONNECTIONS: usize = 4;

/// Frames queued for writing per connection.
const WRITE_QUEUE: usize = 1024;

/// How long one replay step may take (a batch of 4096 entries is verified in well under this).
const REPLAY_STEP_TIMEOUT: Duration = Duration::from_secs(300);

/// Why a reply held for entries a restarted enclave never delivered is not released.
const RESTARTED: &str = "the enclave restarted before the entries this reply depends on were \
                         stored: they are in no log; retry";

/// Reconnection back-off bounds.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Tunables of the client.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Persistent connections to keep open.
    pub connections: usize,
    /// The admin keys trusted at genesis, sent with `ReplayBegin`.
    pub genesis_admin_keys: Vec<[u8; 32]>,
    /// How long [`EnclaveClient::call`] waits for the enclave to become ready.
    pub ready_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            connections: DEFAULT_CONNECTIONS,
            genesis_admin_keys: Vec::new(),
            ready_timeout: Duration::from_secs(5),
        }
    }
}

/// Why a call did not get a final reply.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// No connection to the enclave could be used.
    #[error("the enclave is unavailable: {0}")]
    Unavailable(String),
    /// The enclave has not finished replaying the log.
    #[error("the enclave is replaying the log")]
    NotReady,
    /// The client refuses to serve (broken log at replay, store failure, enclave ahead of
    /// the store); the reason says which and what to do.
    #[error("not serving: {0}")]
    Failed(String),
    /// No final reply within the deadline. The request may still complete in the enclave.
    #[error("the enclave did not answer in time")]
    Timeout,
    /// The enclave broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// What the client is doing, for `/readyz` and the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    /// No usable connection yet.
    Connecting,
    /// Streaming the stored log into the enclave: entries sent so far, of `total`.
    Replaying {
        /// Entries sent.
        sent: u64,
        /// Entries stored.
        total: u64,
    },
    /// Serving: the enclave's current epoch.
    Ready {
        /// The epoch opened at the enclave's last boot.
        epoch: u64,
    },
    /// Refusing to serve, and why.
    Failed(String),
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct ClientMetrics {
    /// Final replies received.
    pub replies: AtomicU64,
    /// Sum of round-trip times of final replies, in microseconds.
    pub round_trip_us: AtomicU64,
    /// `Persist` batches stored.
    pub persists: AtomicU64,
    /// `Persist` batches that arrived under an id this client did not know.
    pub rerouted_persists: AtomicU64,
    /// `Persist` batches parked because an earlier one had not arrived yet.
    pub parked_persists: AtomicU64,
    /// Connections established.
    pub connects: AtomicU64,
    /// Replays run.
    pub replays: AtomicU64,
}

/// The client. Cheap to clone; all clones share the connections.
#[derive(Clone)]
pub struct EnclaveClient {
    shared: Arc<Shared>,
}

impl fmt::Debug for EnclaveClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnclaveClient")
            .field("address", &self.shared.address)
            .field("phase", &*self.shared.phase.borrow())
            .finish_non_exhaustive()
    }
}

struct Shared {
    address: Address,
    store: Arc<Store>,
    options: ClientOptions,
    next_id: AtomicU64,
    waiters: Mutex<Waiters>,
    links: Mutex<Vec<Option<Link>>>,
    round_robin: AtomicUsize,
    phase: watch::Sender<Phase>,
    /// Serialises the decision to replay: one connection replays, the others wait.
    control: tokio::sync::Mutex<()>,
    /// The epoch of the enclave boot this client last served. Kept when every connection
    /// drops, to tell a reconnection to the same boot (which still owes its undelivered
    /// `Persist`s) from a restart (which lost them).
    served_epoch: Mutex<Option<u64>>,
    /// How many times the client has retired its connections to a boot that is gone
    /// ([`Shared::reset_sequencer`]); changed under the links' lock.
    retirements: AtomicU64,
    sequencer: Mutex<Sequencer>,
    /// Group commits in submission order, for the one task that reports them durable.
    commits: mpsc::UnboundedSender<Commit>,
    /// One more than the highest seq reported durable to the current enclave (0: none).
    reported: AtomicU64,
    metrics: ClientMetrics,
}

/// Who waits for which request id, the final replies held for durability, and how far the
/// store is known durable: one lock, so that a held reply is either released by the commit
/// that covers it or finds that commit already recorded.
struct Waiters {
    map: HashMap<u64, Waiter>,
    /// `(through_seq, id)` of every [`Waiter::Held`], in the order commits release them.
    held: BTreeSet<(u64, u64)>,
    /// Entries below this seq are durable in the store (commits this client saw complete, and
    /// what the store held when the client started).
    durable_next: u64,
}

impl Waiters {
    fn insert(&mut self, id: u64, waiter: Waiter) {
        let held = match &waiter {
            Waiter::Held { through_seq, .. } => Some(*through_seq),
            Waiter::Call { .. } | Waiter::Ignore { .. } => None,
        };
        if let Some(Waiter::Held { through_seq, .. }) = self.map.insert(id, waiter) {
            self.held.remove(&(through_seq, id));
        }
        if let Some(through_seq) = held {
            self.held.insert((through_seq, id));
        }
    }

    fn remove(&mut self, id: u64) -> Option<Waiter> {
        let waiter = self.map.remove(&id);
        if let Some(Waiter::Held { through_seq, .. }) = &waiter {
            self.held.remove(&(*through_seq, id));
        }
        waiter
    }

    fn drain(&mut self) -> Vec<Waiter> {
        self.held.clear();
        self.map.drain().map(|(_, w)| w).collect()
    }

    /// Records every entry through `last` durable and takes the held replies that waited for
    /// them.
    fn durable_through(&mut self, last: u64) -> Vec<Waiter> {
        self.durable_next = self.durable_next.max(last.saturating_add(1));
        let mut released = Vec::new();
        while let Some(&(seq, id)) = self.held.first() {
            if seq > last {
                break;
            }
            self.held.pop_first();
            if let Some(waiter) = self.map.remove(&id) {
                released.push(waiter);
            }
        }
        released
    }
}

enum Waiter {
    /// A caller waits for the final reply.
    Call {
        slot: usize,
        sent: Instant,
        reply: oneshot::Sender<Result<Response, ClientError>>,
    },
    /// The final reply has arrived, held until every entry through `through_seq` is durable. It
    /// no longer depends on its connection.
    Held {
        through_seq: u64,
        sent: Instant,
        response: Response,
        reply: oneshot::Sender<Result<Response, ClientError>>,
    },
    /// Nobody waits (the `Ack` of a `Durable`).
    Ignore { slot: usize },
}

impl Waiter {
    /// The connection whose closing fails the waiter (none for a reply already received).
    fn slot(&self) -> Option<usize> {
        match self {
            Waiter::Call { slot, .. } | Waiter::Ignore { slot } => Some(*slot),
            Waiter::Held { .. } => None,
        }
    }

    /// Fails the caller, if one waits.
    fn fail(self, error: ClientError) {
        if let Waiter::Call { reply, .. } | Waiter::Held { reply, .. } = self {
            let _ = reply.send(Err(error));
        }
    }
}

#[derive(Clone)]
struct Link {
    /// Distinguishes this connection from an earlier one in the same slot.
    generation: u64,
    frames: mpsc::Sender<Frame>,
    /// Set when the connection is retired ([`Shared::reset_sequencer`]): whatever it still
    /// delivers is ignored.
    retired: Arc<AtomicBool>,
    /// Its reader, stopped when it is retired.
    reader: tokio::task::AbortHandle,
}

/// Orders `Persist` batches by seq before they reach the store.
struct Sequencer {
    /// The seq the next stored batch must start with.
    next: u64,
    /// Batches that arrived before the one at `next`.
    parked: BTreeMap<u64, Vec<ByteBuf>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl EnclaveClient {
    /// Starts the client: it connects in the background, replays the stored log if the
    /// enclave needs it, and serves calls once ready. Must run inside a Tokio runtime.
    pub fn start(address: Address, store: Arc<Store>, options: ClientOptions) -> EnclaveClient {
        let connections = options.connections.max(1);
        let (phase, _) = watch::channel(Phase::Connecting);
        let next = store.next_seq();
        let durable_next = store.len();
        let (commits, committed) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            address,
            store,
            options,
            next_id: AtomicU64::new(1),
            waiters: Mutex::new(Waiters {
                map: HashMap::new(),
                held: BTreeSet::new(),
                durable_next,
            }),
            links: Mutex::new(vec![None; connections]),
            round_robin: AtomicUsize::new(0),
            phase,
            control: tokio::sync::Mutex::new(()),
            served_epoch: Mutex::new(None),
            retirements: AtomicU64::new(0),
            sequencer: Mutex::new(Sequencer {
                next,
                parked: BTreeMap::new(),
            }),
            commits,
            reported: AtomicU64::new(0),
            metrics: ClientMetrics::default(),
        });
        tokio::spawn(Arc::clone(&shared).report_commits(committed));
        for slot in 0..connections {
            tokio::spawn(Arc::clone(&shared).keep_connected(slot));
        }
        EnclaveClient { shared }
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.shared.phase.borrow().clone()
    }

    /// Waits until the client is ready or has failed, at most `timeout`.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<u64, ClientError> {
        self.shared.wait_ready(timeout).await
    }

    /// The counters.
    pub fn metrics(&self) -> &ClientMetrics {
        &self.shared.metrics
    }

    /// The store the client persists into.
    pub fn store(&self) -> &Arc<Store> {
        &self.shared.store
    }

    /// Sends `request` and returns its final reply (for a two-phase request: after its
    /// entries are durable). Waits for readiness first, at most the client's ready timeout;
    /// gives up on the reply after `timeout`.
    pub async fn call(&self, request: Request, timeout: Duration) -> Result<Response, ClientError> {
        // Fast path: ready now (no watch subscription, no extra timer per request).
        let ready = matches!(*self.shared.phase.borrow(), Phase::Ready { .. });
        if !ready {
            self.shared
                .wait_ready(self.shared.options.ready_timeout)
                .await?;
        }
        let slot = self.shared.pick_slot()?;
        self.shared.call_on(slot, request, timeout).await
    }
}

impl Shared {
    async fn wait_ready(&self, timeout: Duration) -> Result<u64, ClientError> {
        let mut rx = self.phase.subscribe();
        let wait = async {
            loop {
                match &*rx.borrow_and_update() {
                    Phase::Ready { epoch } => return Ok(*epoch),
                    Phase::Failed(why) => return Err(ClientError::Failed(why.clone())),
                    Phase::Connecting | Phase::Replaying { .. } => {}
                }
                if rx.changed().await.is_err() {
                    return Err(ClientError::Unavailable("client stopped".into()));
                }
            }
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(r) => r,
            Err(_) => Err(match &*self.phase.borrow() {
                Phase::Replaying { .. } => ClientError::NotReady,
                _ => ClientError::Unavailable("no connection to the enclave".into()),
            }),
        }
    }

    fn pick_slot(&self) -> Result<usize, ClientError> {
        let links = lock(&self.links);
        let n = links.len();
        let start = self.round_robin.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|i| start.wrapping_add(i) % n)
            .find(|&s| links.get(s).is_some_and(Option::is_some))
            .ok_or_else(|| ClientError::Unavailable("no connection to the enclave".into()))
    }

    fn fresh_id(&self) -> u64 {
        // Ids start at 1 (0 is NO_REQUEST_ID) and are never reused within a process.
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    async fn call_on(
        &self,
        slot: usize,
        request: Request,
        timeout: Duration,
    ) -> Result<Response, ClientError> {
        let id = self.fresh_id();
        let (tx, rx) = oneshot::channel();
        let link = lock(&self.links)
            .get(slot)
            .cloned()
            .flatten()
            .ok_or_else(|| ClientError::Unavailable("connection closed".into()))?;
        lock(&self.waiters).insert(
            id,
            Waiter::Call {
                slot,
                sent: Instant::now(),
                reply: tx,
            },
        );
        if link.frames.send(Frame::request(id, request)).await.is_err() {
            lock(&self.waiters).remove(id);
            return Err(ClientError::Unavailable("connection closed".into()));
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ClientError::Unavailable("connection closed".into())),
            Err(_) => {
                // A reply still held for durability is dropped with its waiter.
                lock(&self.waiters).remove(id);
                Err(ClientError::Timeout)
            }
        }
    }

    /// One connection slot: connect, greet, serve, and reconnect when it drops.
    async fn keep_connected(self: Arc<Self>, slot: usize) {
        let mut backoff = BACKOFF_MIN;
        let mut generation = 0u64;
        loop {
            if matches!(*self.phase.borrow(), Phase::Failed(_)) {
                return;
            }
            let retirements = self.retirements.load(Ordering::SeqCst);
            let stream = match attestplane_proto::connect(&self.address).await {
                Ok(s) => s,
                Err(e) => {
                    if slot == 0 {
                        tracing_line(&format!(
                            "cannot connect to the enclave at {}: {e}",
                            self.address
                        ));
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            };
            backoff = BACKOFF_MIN;
            generation += 1;
            self.metrics.connects.fetch_add(1, Ordering::Relaxed);
            let (reader, writer) = tokio::io::split(stream);
            let (frames_tx, frames_rx) = mpsc::channel(WRITE_QUEUE);
            let retired = Arc::new(AtomicBool::new(false));
            let reader_task = {
                let mut links = lock(&self.links);
                if self.retirements.load(Ordering::SeqCst) != retirements {
                    // The client retired its connections while this one opened: it may be
                    // to the boot that is gone. Not used; the next one will be to the new.
                    drop(links);
                    tokio::time::sleep(BACKOFF_MIN).await;
                    continue;
                }
                // Spawned under the links' lock, so that a retirement either happened before
                // (seen above) or finds the link.
                let reader_task =
                    tokio::spawn(Arc::clone(&self).read_loop(slot, reader, Arc::clone(&retired)));
                if let Some(l) = links.get_mut(slot) {
                    *l = Some(Link {
                        generation,
                        frames: frames_tx,
                        retired,
                        reader: reader_task.abort_handle(),
                    });
                }
                reader_task
            };
            let writer_task = tokio::spawn(write_loop(writer, frames_rx));
            let greeted = self.greet(slot).await;
            if let Err(e) = &greeted {
                tracing_line(&format!("connection {slot}: {e}"));
            }
            if greeted.is_ok() {
                let _ = reader_task.await;
            } else {
                reader_task.abort();
            }
            writer_task.abort();
            self.drop_link(slot, generation);
            if matches!(*self.phase.borrow(), Phase::Failed(_)) {
                return;
            }
            tokio::time::sleep(BACKOFF_MIN).await;
        }
    }

    /// `Hello`, then, if the enclave needs it, the replay; or the head check.
    async fn greet(&self, slot: usize) -> Result<(), ClientError> {
        let hello = self
            .call_on(
                slot,
                Request::Hello {
                    version: PROTOCOL_VERSION,
                },
                Duration::from_secs(10),
            )
            .await?;
        if !matches!(hello, Response::Hello { .. }) {
            return Err(unexpected("Hello", &hello));
        }
        // One connection at a time decides (and maybe replays); the state is read after
        // taking the lock, since another connection may have replayed meanwhile.
        let _control = self.control.lock().await;
        let status = self
            .call_on(slot, Request::Status, Duration::from_secs(10))
            .await?;
        let Response::Status {
            ready,
            epoch,
            head_seq,
            durable_seq,
            ..
        } = status
        else {
            return Err(unexpected("Status", &status));
        };
        let phase = self.phase.borrow().clone();
        let served = *lock(&self.served_epoch);
        match (ready, phase) {
            (_, Phase::Failed(why)) => Err(ClientError::Failed(why)),
            (true, Phase::Ready { epoch: known }) if epoch == Some(known) => Ok(()),
            (true, _) if epoch.is_some() && epoch == served => {
                self.resume(slot, epoch, head_seq, durable_seq).await
            }
            (true, _) => {
                // An enclave this client has not seen ready: its head must be the store's.
                let stored = self.store.next_seq();
                let enclave_next = head_seq.map_or(0, |h| h.saturating_add(1));
                if enclave_next != stored {
                    let why = format!(
                        "the enclave's log has {enclave_next} entries but the store holds \
                         {stored}: entries the enclave signed were never stored (was the proxy \
                         killed?); restart the enclave so that it replays the stored log"
                    );
                    self.fail(&why);
                    return Err(ClientError::Failed(why));
                }
                let epoch = epoch.ok_or_else(|| {
                    ClientError::Protocol("a ready enclave reported no epoch".into())
                })?;
                // What the enclave knows to be durable; everything it holds is stored, so
                // report it all (a proxy that restarted after storing entries it never got to
                // report would otherwise leave the enclave waiting, e.g. for checkpoints).
                self.reset_sequencer(stored, durable_seq.map_or(0, |d| d.saturating_add(1)), slot);
                self.serve(epoch);
                tracing_line(&format!(
                    "enclave ready (epoch {epoch}, {stored} entries stored)"
                ));
                if let Some(last) = stored.checked_sub(1) {
                    self.report_durable(last, Some(slot)).await;
                }
                Ok(())
            }
            (false, _) => self.replay(slot).await,
        }
    }

    /// Back to serving `epoch`, and remembered as the boot served.
    fn serve(&self, epoch: u64) {
        *lock(&self.served_epoch) = Some(epoch);
        self.phase.send_replace(Phase::Ready { epoch });
    }

    /// Serving again the boot this client served before every connection dropped (same epoch,
    /// so the enclave has not restarted). Its `Persist`s not yet delivered are re-sent, on this
    /// connection or another, so nothing is reset: parked batches keep waiting for their gap
    /// and held replies for their entries. Its head may be ahead of the store by exactly those
    /// (which is why the head check of a boot not served before does not apply), never behind.
    async fn resume(
        &self,
        slot: usize,
        epoch: Option<u64>,
        head_seq: Option<u64>,
        durable_seq: Option<u64>,
    ) -> Result<(), ClientError> {
        let epoch = epoch
            .ok_or_else(|| ClientError::Protocol("a ready enclave reported no epoch".into()))?;
        let taken = lock(&self.sequencer).next;
        let enclave_next = head_seq.map_or(0, |h| h.saturating_add(1));
        if enclave_next < taken {
            let why = format!(
                "the enclave's log has {enclave_next} entries but it sent this client {taken}, \
                 in the same epoch {epoch}"
            );
            self.fail(&why);
            return Err(ClientError::Failed(why));
        }
        // A `Durable` lost with the old connections is sent again.
        self.reported.fetch_min(
            durable_seq.map_or(0, |d| d.saturating_add(1)),
            Ordering::SeqCst,
        );
        self.serve(epoch);
        tracing_line(&format!(
            "enclave reachable again (same boot, epoch {epoch}; {} of its entries not yet \
             received)",
            enclave_next.saturating_sub(taken)
        ));
        if let Some(last) = self.store.len().checked_sub(1) {
            self.report_durable(last, Some(slot)).await;
        }
        Ok(())
    }

    /// Adopts, on `slot`'s connection, a boot of the enclave this client has not served (a
    /// fresh one it replays, or one ready at another epoch whose head is the store's): the next
    /// entry it writes is `next`.
    ///
    /// If the client served another boot before, that boot is gone, with every entry it signed
    /// that never reached the store, and the new one writes other entries at those seqs. So,
    /// before the new boot can write anything: a held reply that depends on such an entry is
    /// failed (released later, it would answer on the strength of the new boot's entry, not
    /// its own); and every other connection is retired (closed, and whatever it still delivers
    /// ignored: a `Persist` or held reply the old boot sent before it died may still be read on
    /// one; the new boot has written nothing the store lacks, nothing at all before its replay
    /// and, found ready, no entry past the store's head). Their callers get `Unavailable`. A
    /// held reply whose entries the store has is left to their commit, which releases or fails
    /// it.
    fn reset_sequencer(&self, next: u64, reported: u64, slot: usize) {
        let successor = lock(&self.served_epoch).is_some();
        let mut seq = lock(&self.sequencer);
        let (lost, retired) = {
            // The sequencer's lock first, as in `persist`: no batch is stored meanwhile, and a
            // frame read on a retired connection is seen as such (`persist`, `hold`).
            let mut waiters = lock(&self.waiters);
            let ids: Vec<u64> = waiters
                .held
                .range((next.min(seq.next), 0)..)
                .map(|&(_, id)| id)
                .collect();
            let lost: Vec<Waiter> = ids
                .into_iter()
                .filter_map(|id| waiters.remove(id))
                .collect();
            let mut retired = Vec::new();
            if successor {
                let mut links = lock(&self.links);
                self.retirements.fetch_add(1, Ordering::SeqCst);
                for (other, link) in links.iter_mut().enumerate() {
                    if other != slot
                        && let Some(link) = link.take()
                    {
                        link.retired.store(true, Ordering::SeqCst);
                        link.reader.abort();
                        retired.push(other);
                    }
                }
            }
            (lost, retired)
        };
        seq.next = next;
        seq.parked.clear();
        self.reported.store(reported, Ordering::SeqCst);
        drop(seq);
        if !lost.is_empty() || !retired.is_empty() {
            tracing_line(&format!(
                "a new boot of the enclave: {} held replies depend on entries that were never \
                 stored, and fail; {} connections to the old boot retired",
                lost.len(),
                retired.len()
            ));
        }
        for waiter in lost {
            waiter.fail(ClientError::Unavailable(RESTARTED.into()));
        }
        for other in retired {
            self.fail_slot(other, "the enclave restarted before the reply");
        }
    }

    /// Streams the stored log into the enclave on `slot`.
    async fn replay(&self, slot: usize) -> Result<(), ClientError> {
        self.metrics.replays.fetch_add(1, Ordering::Relaxed);
        let total = self.store.len();
        self.reset_sequencer(self.store.next_seq(), 0, slot);
        self.phase.send_replace(Phase::Replaying { sent: 0, total });
        tracing_line(&format!(
            "replaying {total} stored entries into the enclave"
        ));
        let started = Instant::now();
        let keys = self
            .options
            .genesis_admin_keys
            .iter()
            .map(|k| ByteBuf::from(k.to_vec()))
            .collect();
        self.replay_step(
            slot,
            Request::ReplayBegin {
                genesis_admin_keys: keys,
                total_entries: total,
            },
        )
        .await?;
        let mut sent = 0u64;
        // Read the next batch on a blocking thread while the enclave verifies this one.
        let mut stream_from = 0u64;
        while stream_from < total {
            let store = Arc::clone(&self.store);
            let from = stream_from;
            let batch = tokio::task::spawn_blocking(move || {
                store.range(
                    from,
                    total.min(from.saturating_add(MAX_ENTRIES_PER_FRAME as u64)),
                )
            })
            .await
            .map_err(|e| ClientError::Failed(format!("reading the store: {e}")))?
            .map_err(|e| self.fail_store(&e))?;
            if batch.is_empty() {
                let why = format!("the store returned no entries at seq {from}");
                self.fail(&why);
                return Err(ClientError::Failed(why));
            }
            let n = batch.len() as u64;
            stream_from = stream_from.saturating_add(n);
            self.replay_step(
                slot,
                Request::ReplayEntries {
                    entries: batch.into_iter().map(ByteBuf::from).collect(),
                },
            )
            .await?;
            sent = sent.saturating_add(n);
            self.phase.send_replace(Phase::Replaying { sent, total });
        }
        // ReplayEnd is two-phase: its Persist (the new epoch's opening entries) is stored and
        // reported durable by the read loop; the Ack follows.
        self.replay_step(slot, Request::ReplayEnd).await?;
        let status = self
            .call_on(slot, Request::Status, Duration::from_secs(10))
            .await?;
        let Response::Status {
            ready: true,
            epoch: Some(epoch),
            ..
        } = status
        else {
            return Err(unexpected("Status after the replay", &status));
        };
        self.serve(epoch);
        tracing_line(&format!(
            "replay of {total} entries done in {:.1} s; serving epoch {epoch}",
            started.elapsed().as_secs_f64()
        ));
        Ok(())
    }

    async fn replay_step(&self, slot: usize, request: Request) -> Result<(), ClientError> {
        match self.call_on(slot, request, REPLAY_STEP_TIMEOUT).await? {
            Response::Ack => Ok(()),
            Response::BrokenLog { seq, message } => {
                let why = match seq {
                    Some(seq) => {
                        format!("the enclave refused the stored log at entry {seq}: {message}")
                    }
                    None => format!("the enclave refused the stored log: {message}"),
                };
                self.fail(&why);
                Err(ClientError::Failed(why))
            }
            other => Err(unexpected("replay", &other)),
        }
    }

    fn fail(&self, why: &str) {
        tracing_line(&format!("not serving: {why}"));
        self.phase.send_replace(Phase::Failed(why.to_owned()));
        // Held replies included: whatever they wait for will never be reported durable.
        let waiters = lock(&self.waiters).drain();
        for w in waiters {
            w.fail(ClientError::Failed(why.to_owned()));
        }
    }

    fn fail_store(&self, e: &StoreError) -> ClientError {
        let why = format!("the log store failed: {e}");
        self.fail(&why);
        ClientError::Failed(why)
    }

    fn drop_link(&self, slot: usize, generation: u64) {
        {
            let mut links = lock(&self.links);
            if let Some(l) = links.get_mut(slot)
                && l.as_ref().is_some_and(|l| l.generation == generation)
            {
                *l = None;
            }
            // No connection left: not ready until one is re-established and the enclave
            // checked again (it may have restarted and need the replay).
            if links.iter().all(Option::is_none) {
                self.phase.send_if_modified(|phase| {
                    if matches!(phase, Phase::Ready { .. } | Phase::Replaying { .. }) {
                        *phase = Phase::Connecting;
                        true
                    } else {
                        false
                    }
                });
            }
        }
        // A reply already received and held for durability does not depend on the connection
        // any more: its entries are with the store (and their commit releases or fails it), or
        // still to come in a `Persist` the same boot of the enclave re-sends on any connection,
        // this one's successor included. If the enclave restarts instead, the replay fails it
        // (`reset_sequencer`).
        self.fail_slot(
            slot,
            "the connection to the enclave closed before the reply",
        );
    }

    /// Fails the callers waiting for a reply on `slot`'s connection.
    fn fail_slot(&self, slot: usize, why: &str) {
        let orphans: Vec<Waiter> = {
            let mut waiters = lock(&self.waiters);
            let ids: Vec<u64> = waiters
                .map
                .iter()
                .filter(|(_, w)| w.slot() == Some(slot))
                .map(|(id, _)| *id)
                .collect();
            ids.iter().filter_map(|id| waiters.remove(*id)).collect()
        };
        for w in orphans {
            w.fail(ClientError::Unavailable(why.into()));
        }
    }

    async fn read_loop(
        self: Arc<Self>,
        slot: usize,
        reader: tokio::io::ReadHalf<attestplane_proto::Stream>,
        retired: Arc<AtomicBool>,
    ) {
        let mut reader = BufReader::with_capacity(64 * 1024, reader);
        let mut decoder = FrameDecoder::new();
        loop {
            match read_frame(&mut reader, &mut decoder).await {
                Ok(Some(frame)) => match self.on_frame(frame, &retired) {
                    Ok(None) => {}
                    Ok(Some(inline)) => {
                        // Blocks this runtime thread for one fdatasync: only taken when the
                        // store is otherwise idle (see `Store::submit_or_reserve`).
                        match inline.run() {
                            Ok(last) => {
                                self.release_through(last);
                                // The commit woke the tasks waiting on these entries: the
                                // relays holding the data path's calls and answers, and the
                                // replies just released. Let them write before this thread
                                // reports to the enclave (which wakes the connection's writer,
                                // and that would run first).
                                tokio::task::yield_now().await;
                                self.report_durable(last, Some(slot)).await;
                            }
                            Err(e) => {
                                self.fail_store(&e);
                            }
                        }
                    }
                    Err(e) => {
                        tracing_line(&format!("connection {slot}: {e}; closing it"));
                        return;
                    }
                },
                Ok(None) => return,
                Err(e) if e.is_fatal() => {
                    tracing_line(&format!("connection {slot}: {e}"));
                    return;
                }
                Err(e) => {
                    tracing_line(&format!(
                        "connection {slot}: bad frame from the enclave: {e}"
                    ));
                    if let Some(id) = e.request_id()
                        && let Some(waiter) = lock(&self.waiters).remove(id)
                    {
                        waiter.fail(ClientError::Protocol(e.to_string()));
                    }
                }
            }
        }
    }

    /// Handles one frame from the enclave, read on a connection `retired` or not; a `Persist`
    /// reserved for an inline commit is returned for the caller to run.
    fn on_frame(
        self: &Arc<Self>,
        frame: Frame,
        retired: &AtomicBool,
    ) -> Result<Option<InlineCommit>, ClientError> {
        if frame.version != PROTOCOL_VERSION {
            return Err(ClientError::Protocol(format!(
                "protocol version {} (this client speaks {PROTOCOL_VERSION})",
                frame.version
            )));
        }
        let response = match frame.body {
            Body::Response(r) => r,
            Body::Request(_) => {
                return Err(ClientError::Protocol("the enclave sent a request".into()));
            }
        };
        if let Response::Persist { first_seq, entries } = response {
            let known = lock(&self.waiters).map.contains_key(&frame.id);
            if !known {
                self.metrics
                    .rerouted_persists
                    .fetch_add(1, Ordering::Relaxed);
            }
            return self.persist(first_seq, entries, retired);
        }
        if let Response::Held { through_seq, reply } = response {
            return self
                .hold(frame.id, through_seq, *reply, retired)
                .map(|()| None);
        }
        let waiter = lock(&self.waiters).remove(frame.id);
        match waiter {
            Some(Waiter::Call { sent, reply, .. }) => {
                // Error replies (Overloaded included) go to the caller like any reply; the API
                // maps every enclave code in one place.
                self.answer(sent, reply, response);
            }
            Some(held @ Waiter::Held { .. }) => {
                // A second final reply under an id whose first is held: the first stands.
                lock(&self.waiters).insert(frame.id, held);
                tracing_line(&format!(
                    "the enclave sent a second final reply for request {}; ignored",
                    frame.id
                ));
            }
            Some(Waiter::Ignore { .. }) => {}
            None => {
                if let Response::Error { code, message } = &response {
                    tracing_line(&format!(
                        "the enclave reported {code} for request {}: {message}",
                        frame.id
                    ));
                }
            }
        }
        Ok(None)
    }

    /// Completes a caller's call with `response`.
    fn answer(
        &self,
        sent: Instant,
        reply: oneshot::Sender<Result<Response, ClientError>>,
        response: Response,
    ) {
        self.metrics.replies.fetch_add(1, Ordering::Relaxed);
        let us = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.metrics.round_trip_us.fetch_add(us, Ordering::Relaxed);
        let _ = reply.send(Ok(response));
    }

    /// A final reply that depends on every entry through `through_seq`: answered now if the
    /// store has made them durable, otherwise held with its waiter until a commit does
    /// ([`Shared::release_through`]). A reply nobody waits for (the call timed out) is dropped.
    ///
    /// A reply read on a `retired` connection comes from a boot of the enclave that is gone
    /// (see [`Shared::reset_sequencer`]) and may depend on entries in no log, whose seqs are now
    /// the new boot's: its caller gets `Unavailable`, and the reader stops (an error).
    fn hold(
        &self,
        id: u64,
        through_seq: u64,
        response: Response,
        retired: &AtomicBool,
    ) -> Result<(), ClientError> {
        let mut waiters = lock(&self.waiters);
        // Read under the waiters' lock, which `reset_sequencer` holds to set it.
        let gone = retired.load(Ordering::SeqCst);
        match waiters.remove(id) {
            Some(Waiter::Call { reply, .. }) if gone => {
                drop(waiters);
                let _ = reply.send(Err(ClientError::Unavailable(RESTARTED.into())));
            }
            Some(Waiter::Call { sent, reply, .. }) => {
                if through_seq < waiters.durable_next {
                    drop(waiters);
                    self.answer(sent, reply, response);
                } else {
                    waiters.insert(
                        id,
                        Waiter::Held {
                            through_seq,
                            sent,
                            response,
                            reply,
                        },
                    );
                }
            }
            Some(other) => {
                // Already held, or a `Durable`'s acknowledgement: not a reply to hold.
                waiters.insert(id, other);
                drop(waiters);
                tracing_line(&format!(
                    "the enclave sent a held reply for request {id}, which awaits none; ignored"
                ));
            }
            None => {}
        }
        if gone {
            return Err(ClientError::Protocol(
                "a held reply from a boot of the enclave that is gone".into(),
            ));
        }
        Ok(())
    }

    /// Called once every entry through `last` is durable (a commit returned): answers the
    /// callers whose replies were held for those entries.
    fn release_through(&self, last: u64) {
        let released = lock(&self.waiters).durable_through(last);
        for waiter in released {
            if let Waiter::Held {
                sent,
                response,
                reply,
                ..
            } = waiter
            {
                self.answer(sent, reply, response);
            }
        }
    }

    /// Queues a `Persist` batch for the store in seq order and reports durability as commits
    /// complete; or, on an idle store, returns the batch's commit reserved for the caller to run
    /// (at most one: while it is reserved, later batches queue behind it).
    ///
    /// A batch read on a `retired` connection was signed by a boot that is gone, and its seqs
    /// are the new boot's: it is dropped, and the reader stops (an error).
    fn persist(
        self: &Arc<Self>,
        first_seq: u64,
        entries: Vec<ByteBuf>,
        retired: &AtomicBool,
    ) -> Result<Option<InlineCommit>, ClientError> {
        if entries.is_empty() {
            return Err(ClientError::Protocol("an empty Persist".into()));
        }
        let mut seq = lock(&self.sequencer);
        // Read under the sequencer's lock, which `reset_sequencer` holds to set it.
        if retired.load(Ordering::SeqCst) {
            return Err(ClientError::Protocol(
                "a Persist from a boot of the enclave that is gone; dropped".into(),
            ));
        }
        if first_seq < seq.next {
            let why = format!(
                "the enclave asked to store seq {first_seq} again (the store is at {})",
                seq.next
            );
            drop(seq);
            self.fail(&why);
            return Err(ClientError::Failed(why));
        }
        if first_seq > seq.next {
            self.metrics.parked_persists.fetch_add(1, Ordering::Relaxed);
            if seq.parked.len() >= 4 * WRITE_QUEUE {
                return Err(ClientError::Protocol(
                    "too many out-of-order Persists".into(),
                ));
            }
            seq.parked.insert(first_seq, entries);
            return Ok(None);
        }
        let mut inline = None;
        let mut batch = Some((first_seq, entries));
        while let Some((first, entries)) = batch.take() {
            let n = entries.len() as u64;
            let submitted = self
                .store
                .submit_or_reserve(first, entries.into_iter().map(ByteBuf::into_vec).collect())
                .map_err(|e| self.fail_store(&e))?;
            self.metrics.persists.fetch_add(1, Ordering::Relaxed);
            seq.next = first.saturating_add(n);
            let next = seq.next;
            batch = seq.parked.remove(&next).map(|e| (next, e));
            match submitted {
                // Sent under the sequencer's lock: the reporter sees commits in seq order.
                Submitted::Queued(commit) => {
                    let _ = self.commits.send(commit);
                }
                // Only the first batch can be reserved: the reservation keeps the store busy.
                Submitted::Inline(commit) => inline = Some(commit),
            }
        }
        Ok(inline)
    }

    /// The one task that waits for group commits (in submission order) and reports them with
    /// `Durable`: one report for all the commits one `fdatasync` completed, not a task and a
    /// report per `Persist`.
    async fn report_commits(self: Arc<Self>, mut commits: mpsc::UnboundedReceiver<Commit>) {
        let mut next: Option<Commit> = None;
        loop {
            let commit = match next.take() {
                Some(commit) => commit,
                None => match commits.recv().await {
                    Some(commit) => commit,
                    None => return,
                },
            };
            let mut last = match commit.await {
                Ok(last) => last,
                Err(e) => {
                    self.fail_store(&e);
                    continue;
                }
            };
            while let Ok(mut commit) = commits.try_recv() {
                match poll_now(&mut commit) {
                    Some(Ok(l)) => last = last.max(l),
                    Some(Err(e)) => {
                        self.fail_store(&e);
                        break;
                    }
                    None => {
                        next = Some(commit);
                        break;
                    }
                }
            }
            self.release_through(last);
            self.report_durable(last, None).await;
        }
    }

    /// Sends `Durable { through_seq: last }` (on `prefer`'s connection if it is up), unless a
    /// report as high went out already. Call it only once every entry up to `last` is durable.
    async fn report_durable(&self, last: u64, prefer: Option<usize>) {
        let reported_next = last.saturating_add(1);
        if self.reported.fetch_max(reported_next, Ordering::SeqCst) >= reported_next {
            return; // A later commit already reported this one.
        }
        let preferred = prefer.filter(|&s| lock(&self.links).get(s).is_some_and(Option::is_some));
        let Some(slot) = preferred.or_else(|| self.pick_slot().ok()) else {
            return; // No connection: the next report (or the next replay) covers it.
        };
        let id = self.fresh_id();
        let link = lock(&self.links).get(slot).cloned().flatten();
        let Some(link) = link else { return };
        lock(&self.waiters).insert(id, Waiter::Ignore { slot });
        if link
            .frames
            .send(Frame::request(id, Request::Durable { through_seq: last }))
            .await
            .is_err()
        {
            lock(&self.waiters).remove(id);
        }
    }
}

/// The result of `commit` if it is already complete (never waits).
fn poll_now(commit: &mut Commit) -> Option<Result<u64, StoreError>> {
    let mut cx = Context::from_waker(Waker::noop());
    match Pin::new(commit).poll(&mut cx) {
        Poll::Ready(result) => Some(result),
        Poll::Pending => None,
    }
}

fn unexpected(what: &str, got: &Response) -> ClientError {
    let kind = match got {
        Response::Error { code, message } => format!("error {code}: {message}"),
        Response::BrokenLog {
            seq: Some(seq),
            message,
        } => format!("the enclave refuses the stored log at entry {seq}: {message}"),
        Response::BrokenLog { seq: None, message } => {
            format!("the enclave refuses the stored log: {message}")
        }
        other => format!("a {} reply", response_kind(other)),
    };
    ClientError::Protocol(format!("unexpected reply to {what}: {kind}"))
}

/// The name of a reply's variant (never its contents: handles and tokens travel in some).
fn response_kind(r: &Response) -> &'static str {
    match r {
        Response::Hello { .. } => "Hello",
        Response::Ack => "Ack",
        Response::Persist { .. } => "Persist",
        Response::Held { .. } => "Held",
        Response::Challenge { .. } => "Challenge",
        Response::AdminResult { .. } => "AdminResult",
        Response::AttestResult { .. } => "AttestResult",
        Response::Handle { .. } => "Handle",
        Response::Denied { .. } => "Denied",
        Response::Servers { .. } => "Servers",
        Response::Authorized { .. } => "Authorized",
        Response::Checkpoint { .. } => "Checkpoint",
        Response::Attestation { .. } => "Attestation",
        Response::Status { .. } => "Status",
        Response::BrokenLog { .. } => "BrokenLog",
        Response::Error { .. } => "Error",
    }
}

/// Writes frames as they come, flushing when the queue runs dry (one write for a burst).
async fn write_loop(
    writer: tokio::io::WriteHalf<attestplane_proto::Stream>,
    mut frames: mpsc::Receiver<Frame>,
) {
    let mut writer = BufWriter::with_capacity(64 * 1024, writer);
    while let Some(frame) = frames.recv().await {
        let mut next = Some(frame);
        while let Some(frame) = next.take() {
            match encode_frame(&frame) {
                Ok(bytes) => {
                    if writer.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
                Err(e) => tracing_line(&format!("cannot encode a request: {e}")),
            }
            next = frames.try_recv().ok();
        }
        if writer.flush().await.is_err() {
            return;
        }
    }
}

/// One line on stderr (the proxy's log). Never called with a request or reply body.
pub(crate) fn tracing_line(line: &str) {
    eprintln!("attestplane: {line}");
}
