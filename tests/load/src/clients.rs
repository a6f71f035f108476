//! The closed-loop clients both modes run: each on its own keep-alive connection, requests
//! back to back, latency recorded from the end of the warm-up, and the results merged.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::http;

/// Whether a reply is a success; `Err` names the failure ("STATUS code", …).
pub type Check = fn(&http::Reply) -> Result<(), String>;

/// What one round of clients does.
pub struct Load {
    /// Where the clients connect.
    pub addr: SocketAddr,
    /// The raw requests, used in turn (client `c` starts at `c` and strides by the client count).
    pub requests: Arc<Vec<Vec<u8>>>,
    /// Clients.
    pub concurrency: usize,
    /// Requests completed before this are not measured.
    pub measure_from: Instant,
    /// No request starts after this.
    pub end: Instant,
    /// Stop after this many measured requests (all clients together).
    pub budget: Option<u64>,
    /// Which replies count as successes.
    pub check: Check,
}

/// The clients' merged results.
#[derive(Debug, Default)]
pub struct Results {
    /// Latencies of measured successes, in microseconds, sorted.
    pub latencies_us: Vec<u32>,
    /// Measured successes.
    pub ok: u64,
    /// Successes, warm-up included.
    pub all_ok: u64,
    /// Measured failures by kind.
    pub errors: BTreeMap<String, u64>,
    /// When the last measured success completed.
    pub last_done: Option<Instant>,
}

impl Results {
    fn merge(&mut self, other: Results) {
        self.ok += other.ok;
        self.all_ok += other.all_ok;
        self.latencies_us.extend(other.latencies_us);
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        self.last_done = self.last_done.max(other.last_done);
    }
}

/// Runs `load.concurrency` clients to the end of the load and merges their results.
pub async fn run(load: Load) -> Result<Results> {
    let budget = load
        .budget
        .map(|limit| (Arc::new(AtomicU64::new(0)), limit));
    let tasks: Vec<_> = (0..load.concurrency)
        .map(|c| {
            tokio::spawn(client(
                load.addr,
                Arc::clone(&load.requests),
                c,
                load.concurrency,
                load.measure_from,
                load.end,
                budget.clone(),
                load.check,
            ))
        })
        .collect();
    let mut all = Results::default();
    for t in tasks {
        all.merge(t.await.context("a client task failed")?);
    }
    all.latencies_us.sort_unstable();
    Ok(all)
}

/// One client: back-to-back requests on one connection until `end` (or the budget), measured
/// from `measure_from`.
#[allow(clippy::too_many_arguments)]
async fn client(
    addr: SocketAddr,
    requests: Arc<Vec<Vec<u8>>>,
    first: usize,
    stride: usize,
    measure_from: Instant,
    end: Instant,
    budget: Option<(Arc<AtomicU64>, u64)>,
    check: Check,
) -> Results {
    let mut r = Results::default();
    let mut conn: Option<http::Conn> = None;
    let mut i = first;
    loop {
        let started = Instant::now();
        if started >= end {
            break;
        }
        let measured = started >= measure_from;
        if measured
            && let Some((taken, limit)) = &budget
            && taken.fetch_add(1, Ordering::Relaxed) >= *limit
        {
            break;
        }
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match http::Conn::connect(addr).await {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    *r.errors.entry(format!("io: {e}")).or_default() += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let Some(raw) = requests.get(i % requests.len().max(1)) else {
            break;
        };
        i = i.wrapping_add(stride);
        let started = Instant::now();
        let reply = c.send(raw).await;
        let done = Instant::now();
        match reply {
            Ok(reply) => match check(&reply) {
                Ok(()) => {
                    r.all_ok += 1;
                    if measured {
                        r.ok += 1;
                        let us = u32::try_from(done.duration_since(started).as_micros())
                            .unwrap_or(u32::MAX);
                        r.latencies_us.push(us);
                        r.last_done = Some(done);
                    }
                }
                Err(kind) => {
                    if measured {
                        *r.errors.entry(kind).or_default() += 1;
                    }
                    if reply.status == 503 {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            },
            Err(e) => {
                if measured {
                    *r.errors.entry(format!("io: {e}")).or_default() += 1;
                }
                conn = None;
            }
        }
    }
    r
}

/// The cores each thread of `pid` used since `before` (the thread CPU times then) over `wall`,
/// busiest first, those above 1 % only, at most six.
pub fn busiest_threads(pid: u32, before: &BTreeMap<u32, Duration>, wall: Duration) -> Vec<f64> {
    let mut busy: Vec<f64> = crate::stack::threads_cpu_time(pid)
        .into_iter()
        .map(|(tid, t)| {
            let b = before.get(&tid).copied().unwrap_or_default();
            t.saturating_sub(b).as_secs_f64() / wall.as_secs_f64()
        })
        .filter(|&cores| cores >= 0.01)
        .collect();
    busy.sort_by(|a, b| b.total_cmp(a));
    busy.truncate(6);
    busy
}
