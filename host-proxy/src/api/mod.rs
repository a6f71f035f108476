//! The HTTP API (docs/http-api.md): operators, agents, auditors and operations.
//!
//! Role. [`router`] maps each route to one enclave request (or a read of the store) and each
//! outcome to a status code and a stable machine code ([`ApiError`]). Handlers hold no state of
//! their own: the enclave decides, the store keeps, this module translates.
//!
//! Limits. Bodies are JSON of at most [`MAX_BODY`] bytes; every enclave call has the proxy's
//! request timeout (504 after it); at most `max_in_flight` requests are inside the proxy at
//! once, beyond which it answers 503 with `Retry-After` instead of queueing without bound.
//! A server's attestation document is fetched with its own timeout and size limit.
//!
//! Trust. Every request is hostile input. Bearer tokens are forwarded to the enclave untouched
//! and never logged or echoed; error messages carry the enclave's reasons (which never contain
//! secrets) and never a request body.
//!
//! Layout. This file holds the shared state, [`router`], admission (the in-flight limit and
//! the request metrics) and the operational routes (`/healthz`, `/readyz`, `/metrics`); the
//! handlers live by audience, each a thin translation between HTTP and one enclave request:
//!
//! - `operator`: `/v1/admin` and `/v1/servers/{id}/attest` (with the bounded fetch of the
//!   server's attestation document);
//! - `agent`: discover and resolve, behind a bearer JWT the enclave checks (and the retired
//!   advisory authorize route, 410);
//! - `auditor`: the enclave's attestation and JWKS, and the stored log (entries, checkpoints,
//!   proofs);
//! - `error`: [`ApiError`], the one mapping from an outcome to a status and a code;
//! - [`body`]: the JSON bodies, shared with the CLI that reads them.
//!
//! The handler modules depend on this file and on `error`, never on each other.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use attestplane_proto::{Request, Response};
use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, MatchedPath, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response as HttpResponse};
use axum::routing::{get, post};
use tokio::sync::Semaphore;

use crate::enclave_client::{EnclaveClient, Phase};
use crate::registry::Registry;
use crate::store::Store;

mod agent;
mod auditor;
pub mod body;
mod error;
mod operator;

pub use error::ApiError;
use error::ApiResult;

/// Largest request body accepted.
pub const MAX_BODY: usize = 256 * 1024;

/// Largest attestation document fetched from a server.
pub const MAX_ATTESTATION_DOCUMENT: usize = 64 * 1024;

/// How long fetching a server's attestation document may take.
pub const ATTESTATION_FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Most entries one `/v1/log/entries` response carries (the store's own range bound; it also
/// bounds the bytes).
pub const MAX_ENTRIES_PER_RESPONSE: u64 = crate::store::MAX_RANGE_ENTRIES as u64;

/// Longest nonce a caller may ask the enclave's attestation document to carry.
pub const MAX_NONCE: usize = 512;

/// What the handlers share.
#[derive(Clone, Debug)]
pub struct AppState {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    client: EnclaveClient,
    store: Arc<Store>,
    registry: Registry,
    http: reqwest::Client,
    request_timeout: Duration,
    in_flight: Semaphore,
    /// Servers with an attestation in progress (the enclave keeps one nonce per server, so
    /// concurrent attestations of one server would invalidate each other's nonces).
    attesting: Mutex<HashSet<String>>,
    metrics: Metrics,
    /// The MCP relays' counters, when the data path is on.
    relay: std::sync::OnceLock<Arc<crate::relay::RelayMetrics>>,
}

impl AppState {
    /// State over a started client and its store. Fails only if the HTTP client for
    /// attestation fetches cannot be built (never with a weaker configuration instead).
    pub fn new(
        client: EnclaveClient,
        request_timeout: Duration,
        max_in_flight: usize,
    ) -> Result<Self, reqwest::Error> {
        let store = Arc::clone(client.store());
        // Attestation fetches go to the registered endpoint and nowhere else: no redirects
        // (a server could otherwise point the host at its internal services) and no proxy from
        // the environment.
        let http = reqwest::Client::builder()
            .timeout(ATTESTATION_FETCH_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()?;
        Ok(AppState {
            inner: Arc::new(Inner {
                client,
                store,
                registry: Registry::default(),
                http,
                request_timeout,
                in_flight: Semaphore::new(max_in_flight.max(1)),
                attesting: Mutex::default(),
                metrics: Metrics::default(),
                relay: std::sync::OnceLock::new(),
            }),
        })
    }

    /// Adds the MCP relays' counters to `/metrics` (once; later calls are ignored).
    pub fn set_relay_metrics(&self, metrics: Arc<crate::relay::RelayMetrics>) {
        let _ = self.inner.relay.set(metrics);
    }

    /// The enclave client.
    pub fn client(&self) -> &EnclaveClient {
        &self.inner.client
    }

    async fn call(&self, request: Request) -> Result<Response, ApiError> {
        self.inner
            .client
            .call(request, self.inner.request_timeout)
            .await
            .map_err(ApiError::from)
    }
}

/// The API's router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/admin", post(operator::admin))
        .route("/v1/servers", get(agent::discover))
        .route("/v1/servers/{id}/attest", post(operator::attest))
        .route("/v1/servers/{id}/handle", post(agent::resolve))
        .route(
            "/v1/servers/{id}/tools/{tool}/authorize",
            post(agent::authorize_retired),
        )
        .route("/v1/attestation", get(auditor::own_attestation))
        .route("/v1/jwks", get(auditor::jwks))
        .route("/v1/log/head", get(auditor::log_head))
        .route("/v1/log/entries", get(auditor::log_entries))
        .route(
            "/v1/log/checkpoint",
            get(auditor::latest_checkpoint).post(auditor::new_checkpoint),
        )
        .route("/v1/log/proof/inclusion", get(auditor::inclusion_proof))
        .route("/v1/log/proof/consistency", get(auditor::consistency_proof))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .layer(middleware::from_fn_with_state(state.clone(), admission))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// Counts, times and admits requests: beyond the in-flight limit, 503 at once.
async fn admission(
    State(state): State<AppState>,
    matched: Option<MatchedPath>,
    request: axum::extract::Request,
    next: Next,
) -> HttpResponse {
    let route = matched.as_ref().map_or("unmatched", |m| m.as_str());
    let started = Instant::now();
    let operational = matches!(route, "/healthz" | "/readyz" | "/metrics");
    let response = if operational {
        next.run(request).await
    } else {
        match state.inner.in_flight.try_acquire() {
            Ok(_permit) => next.run(request).await,
            Err(_) => ApiError::overloaded("too many requests in flight").into_response(),
        }
    };
    state
        .inner
        .metrics
        .observe(route, response.status().as_u16(), started.elapsed());
    response
}

/// A server or tool id taken from the path: printable, bounded.
fn path_id(what: &str, id: &str) -> ApiResult<String> {
    if id.is_empty() || id.len() > 256 || id.chars().any(char::is_control) {
        return Err(ApiError::bad_request(format!(
            "the {what} must be 1 to 256 printable characters"
        )));
    }
    Ok(id.to_owned())
}

// ---------------------------------------------------------------------------------------------
// Operations.

async fn readyz(State(state): State<AppState>) -> HttpResponse {
    match state.inner.client.phase() {
        Phase::Ready { epoch } => {
            (StatusCode::OK, format!("ready (epoch {epoch})\n")).into_response()
        }
        Phase::Connecting => (
            StatusCode::SERVICE_UNAVAILABLE,
            "connecting to the enclave\n",
        )
            .into_response(),
        Phase::Replaying { sent, total } => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("replaying the log into the enclave: {sent} of {total}\n"),
        )
            .into_response(),
        Phase::Failed(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not serving: {why}\n"),
        )
            .into_response(),
    }
}

/// Latency histogram bucket bounds, in seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
];

#[derive(Debug, Default)]
struct Metrics {
    /// Requests by route and status. A request only reads the map and bumps its counter; the
    /// key is allocated once, the first time a (route, status) pair is seen.
    by_route: RwLock<HashMap<String, HashMap<u16, AtomicU64>>>,
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Metrics {
    fn observe(&self, route: &str, status: u16, elapsed: Duration) {
        let counted = {
            let m = self.by_route.read().unwrap_or_else(|p| p.into_inner());
            m.get(route)
                .and_then(|by_status| by_status.get(&status))
                .map(|n| n.fetch_add(1, Ordering::Relaxed))
                .is_some()
        };
        if !counted {
            let mut m = self.by_route.write().unwrap_or_else(|p| p.into_inner());
            m.entry(route.to_owned())
                .or_default()
                .entry(status)
                .or_default()
                .fetch_add(1, Ordering::Relaxed);
        }
        let secs = elapsed.as_secs_f64();
        for (bound, bucket) in BUCKETS.iter().zip(&self.buckets) {
            if secs <= *bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }
}

async fn metrics(State(state): State<AppState>) -> HttpResponse {
    let m = &state.inner.metrics;
    let mut out = String::new();
    let _ = writeln!(out, "# TYPE attestplane_http_requests_total counter");
    {
        let by_route = m.by_route.read().unwrap_or_else(|p| p.into_inner());
        let mut rows: Vec<(&str, u16, u64)> = by_route
            .iter()
            .flat_map(|(route, by_status)| {
                by_status
                    .iter()
                    .map(|(status, n)| (route.as_str(), *status, n.load(Ordering::Relaxed)))
            })
            .collect();
        rows.sort_unstable();
        for (route, status, n) in rows {
            let _ = writeln!(
                out,
                "attestplane_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
    }
    let _ = writeln!(
        out,
        "# TYPE attestplane_http_request_duration_seconds histogram"
    );
    for (bound, bucket) in BUCKETS.iter().zip(&m.buckets) {
        let _ = writeln!(
            out,
            "attestplane_http_request_duration_seconds_bucket{{le=\"{bound}\"}} {}",
            bucket.load(Ordering::Relaxed)
        );
    }
    let count = m.count.load(Ordering::Relaxed);
    let _ = writeln!(
        out,
        "attestplane_http_request_duration_seconds_bucket{{le=\"+Inf\"}} {count}"
    );
    let _ = writeln!(
        out,
        "attestplane_http_request_duration_seconds_sum {}",
        m.sum_us.load(Ordering::Relaxed) as f64 / 1e6
    );
    let _ = writeln!(
        out,
        "attestplane_http_request_duration_seconds_count {count}"
    );
    let store = &state.inner.store;
    let stats = store.stats();
    let _ = writeln!(out, "# TYPE attestplane_log_entries gauge");
    let _ = writeln!(out, "attestplane_log_entries {}", store.len());
    let _ = writeln!(out, "# TYPE attestplane_store_syncs_total counter");
    let _ = writeln!(out, "attestplane_store_syncs_total {}", stats.syncs);
    let _ = writeln!(out, "# TYPE attestplane_store_inline_commits_total counter");
    let _ = writeln!(
        out,
        "attestplane_store_inline_commits_total {}",
        stats.inline_commits
    );
    let _ = writeln!(out, "# TYPE attestplane_store_commit_seconds_total counter");
    let _ = writeln!(
        out,
        "attestplane_store_commit_seconds_total {}",
        stats.commit_micros as f64 / 1e6
    );
    let c = state.inner.client.metrics();
    let replies = c.replies.load(Ordering::Relaxed);
    let _ = writeln!(out, "# TYPE attestplane_enclave_round_trip_seconds summary");
    let _ = writeln!(
        out,
        "attestplane_enclave_round_trip_seconds_sum {}",
        c.round_trip_us.load(Ordering::Relaxed) as f64 / 1e6
    );
    let _ = writeln!(
        out,
        "attestplane_enclave_round_trip_seconds_count {replies}"
    );
    for (name, v) in [
        ("attestplane_enclave_persists_total", &c.persists),
        (
            "attestplane_enclave_rerouted_persists_total",
            &c.rerouted_persists,
        ),
        (
            "attestplane_enclave_parked_persists_total",
            &c.parked_persists,
        ),
        ("attestplane_enclave_connects_total", &c.connects),
        ("attestplane_enclave_replays_total", &c.replays),
    ] {
        let _ = writeln!(out, "# TYPE {name} counter");
        let _ = writeln!(out, "{name} {}", v.load(Ordering::Relaxed));
    }
    if let Some(relay) = state.inner.relay.get() {
        relay.render(&mut out);
    }
    let ready = u8::from(matches!(state.inner.client.phase(), Phase::Ready { .. }));
    let _ = writeln!(out, "# TYPE attestplane_ready gauge");
    let _ = writeln!(out, "attestplane_ready {ready}");
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        Body::from(out),
    )
        .into_response()
}
