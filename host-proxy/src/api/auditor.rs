//! Auditor and relying-party routes: the enclave's attestation document and JWKS, and reads
//! of the stored log (head, entries, checkpoints, Merkle proofs). Everything served here is
//! signed by the enclave or checkable against what it signed; the host is not believed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use attestplane_proto::{ByteBuf, ErrorCode, Request, Response};
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response as HttpResponse};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::Value;

use super::body::{ConsistencyProof, EnclaveAttestation, InclusionProof, LogHead};
use super::error::{ApiError, ApiResult, blocking};
use super::{AppState, MAX_ENTRIES_PER_RESPONSE, MAX_NONCE};
use crate::store::StoreError;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NonceQuery {
    nonce: Option<String>,
}

async fn own_attestation_parts(
    state: &AppState,
    nonce: Option<Vec<u8>>,
) -> ApiResult<(Vec<u8>, String)> {
    match state
        .call(Request::GetAttestation {
            nonce: nonce.map(ByteBuf::from),
        })
        .await?
    {
        Response::Attestation { document, jwks } => Ok((document.into_vec(), jwks)),
        other => Err(ApiError::unexpected(&other)),
    }
}

pub(super) async fn own_attestation(
    State(state): State<AppState>,
    query: Result<Query<NonceQuery>, QueryRejection>,
) -> ApiResult<Json<EnclaveAttestation>> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let nonce = match q.nonce {
        Some(h) => {
            let n = hex::decode(&h)
                .map_err(|e| ApiError::bad_request(format!("`nonce` is not hex: {e}")))?;
            if n.len() > MAX_NONCE {
                return Err(ApiError::bad_request(format!(
                    "`nonce` is longer than {MAX_NONCE} bytes"
                )));
            }
            Some(n)
        }
        None => None,
    };
    let (document, jwks) = own_attestation_parts(&state, nonce).await?;
    let jwks: Value = serde_json::from_str(&jwks).map_err(|_| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the enclave's JWKS is not JSON",
        )
    })?;
    Ok(Json(EnclaveAttestation {
        document: base64::engine::general_purpose::STANDARD.encode(document),
        jwks,
    }))
}

pub(super) async fn jwks(State(state): State<AppState>) -> ApiResult<HttpResponse> {
    let (_, jwks) = own_attestation_parts(&state, None).await?;
    Ok(([(header::CONTENT_TYPE, "application/json")], jwks).into_response())
}

pub(super) async fn log_head(State(state): State<AppState>) -> Json<LogHead> {
    let store = &state.inner.store;
    Json(LogHead {
        size: store.len(),
        head: store.head_hash().map(|h| h.to_hex()),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RangeQuery {
    start: u64,
    end: Option<u64>,
}

pub(super) async fn log_entries(
    State(state): State<AppState>,
    query: Result<Query<RangeQuery>, QueryRejection>,
) -> ApiResult<HttpResponse> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let store = Arc::clone(&state.inner.store);
    let size = store.len();
    if q.start > size {
        return Err(ApiError::bad_request(format!(
            "start {} is beyond the log's size {size}",
            q.start
        )));
    }
    let limit = q.start.saturating_add(MAX_ENTRIES_PER_RESPONSE).min(size);
    let end = q.end.unwrap_or(limit).min(limit);
    if end < q.start {
        return Err(ApiError::bad_request("end is before start"));
    }
    let start = q.start;
    let entries = blocking(move || store.range(start, end)).await?;
    let mut body = Vec::with_capacity(entries.iter().map(Vec::len).sum());
    for e in &entries {
        body.extend_from_slice(e);
    }
    let next = start.saturating_add(entries.len() as u64);
    let mut response = (
        [(header::CONTENT_TYPE, "application/cbor-seq")],
        Bytes::from(body),
    )
        .into_response();
    response
        .headers_mut()
        .insert("attestplane-next-start", HeaderValue::from(next));
    Ok(response)
}

pub(super) async fn latest_checkpoint(State(state): State<AppState>) -> ApiResult<HttpResponse> {
    match state.inner.store.latest_checkpoint()? {
        Some(note) => Ok(text(note)),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no checkpoint has been stored yet",
        )),
    }
}

pub(super) async fn new_checkpoint(State(state): State<AppState>) -> ApiResult<HttpResponse> {
    // A checkpoint covers durable entries only; entries in flight make the enclave answer
    // NotReady, so retry briefly.
    let deadline = Instant::now() + state.inner.request_timeout;
    loop {
        match state.call(Request::Checkpoint).await? {
            Response::Checkpoint { note } => {
                let store = Arc::clone(&state.inner.store);
                let stored = note.clone();
                blocking(move || store.put_checkpoint(&stored)).await?;
                return Ok(text(note));
            }
            Response::Error {
                code: ErrorCode::NotReady,
                ..
            } if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            other => return Err(ApiError::unexpected(&other)),
        }
    }
}

fn text(body: String) -> HttpResponse {
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct InclusionQuery {
    index: u64,
    size: u64,
}

pub(super) async fn inclusion_proof(
    State(state): State<AppState>,
    query: Result<Query<InclusionQuery>, QueryRejection>,
) -> ApiResult<Json<InclusionProof>> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let store = Arc::clone(&state.inner.store);
    if q.size == 0 || q.index >= q.size || q.size > store.len() {
        return Err(ApiError::bad_request(format!(
            "need index < size <= {} (the log's size)",
            store.len()
        )));
    }
    let (leaf, root, proof) = blocking(move || {
        Ok::<_, StoreError>((
            store.leaf_hash(q.index)?,
            store.root(q.size)?,
            store.inclusion_proof(q.index, q.size)?,
        ))
    })
    .await?;
    Ok(Json(InclusionProof {
        index: q.index,
        size: q.size,
        leaf: leaf.to_hex(),
        root: root.to_hex(),
        proof: proof.iter().map(|h| h.to_hex()).collect(),
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ConsistencyQuery {
    old: u64,
    new: u64,
}

pub(super) async fn consistency_proof(
    State(state): State<AppState>,
    query: Result<Query<ConsistencyQuery>, QueryRejection>,
) -> ApiResult<Json<ConsistencyProof>> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let store = Arc::clone(&state.inner.store);
    if q.old > q.new || q.new > store.len() {
        return Err(ApiError::bad_request(format!(
            "need old <= new <= {} (the log's size)",
            store.len()
        )));
    }
    let (old_root, new_root, proof) = blocking(move || {
        Ok::<_, StoreError>((
            store.root(q.old)?,
            store.root(q.new)?,
            store.consistency_proof(q.old, q.new)?,
        ))
    })
    .await?;
    Ok(Json(ConsistencyProof {
        old: q.old,
        new: q.new,
        old_root: old_root.to_hex(),
        new_root: new_root.to_hex(),
        proof: proof.iter().map(|h| h.to_hex()).collect(),
    }))
}
