//! Operator routes: `POST /v1/admin` forwards a signed admin request untouched;
//! `POST /v1/servers/{id}/attest` fetches a server's attestation document from its registered
//! endpoint and hands it to the enclave.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use attestplane_proto::{ByteBuf, Request, Response};
use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use base64::Engine as _;

use super::body::{AdminAccepted, AdminSubmission, AttestVerified};
use super::error::{ApiError, ApiResult, blocking};
use super::{AppState, MAX_ATTESTATION_DOCUMENT, path_id};

const BASE64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

pub(super) async fn admin(
    State(state): State<AppState>,
    body: Result<Json<AdminSubmission>, JsonRejection>,
) -> ApiResult<Json<AdminAccepted>> {
    let Json(body) = body?;
    let bytes = BASE64
        .decode(body.request.trim())
        .map_err(|e| ApiError::bad_request(format!("`request` is not base64: {e}")))?;
    if bytes.is_empty() {
        return Err(ApiError::bad_request("`request` is empty"));
    }
    match state
        .call(Request::Admin {
            request: ByteBuf::from(bytes),
        })
        .await?
    {
        Response::AdminResult {
            accepted: true,
            seq,
            ..
        } => Ok(Json(AdminAccepted {
            accepted: true,
            seq,
        })),
        Response::AdminResult {
            accepted: false,
            seq,
            reason,
        } => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "admin_refused",
            reason.unwrap_or_else(|| "refused".into()),
        )
        .logged(seq)),
        other => Err(ApiError::unexpected(&other)),
    }
}

/// Removes a server from the in-progress set when its attestation ends, however it ends.
struct AttestGuard<'a> {
    set: &'a Mutex<HashSet<String>>,
    id: String,
}

impl Drop for AttestGuard<'_> {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

pub(super) async fn attest(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<AttestVerified>> {
    let server_id = path_id("server id", &id)?;
    let inserted = state
        .inner
        .attesting
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(server_id.clone());
    if !inserted {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            "an attestation of this server is already in progress",
        ));
    }
    let _guard = AttestGuard {
        set: &state.inner.attesting,
        id: server_id.clone(),
    };
    let challenge = state
        .call(Request::AttestChallenge {
            server_id: server_id.clone(),
        })
        .await?;
    let Response::Challenge { nonce, .. } = challenge else {
        return Err(ApiError::unexpected(&challenge));
    };
    let store = Arc::clone(&state.inner.store);
    let inner = Arc::clone(&state.inner);
    let lookup = server_id.clone();
    let endpoint = blocking(move || inner.registry.endpoint(&store, &lookup))
        .await?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "the server's registration is not in the stored log",
            )
        })?;
    let document = fetch_attestation(&state.inner.http, &endpoint, &nonce).await?;
    let result = state
        .call(Request::AttestEvidence {
            server_id,
            nonce,
            document: ByteBuf::from(document),
        })
        .await?;
    match result {
        Response::AttestResult {
            verified: true,
            seq,
            measurement,
            ..
        } => Ok(Json(AttestVerified {
            verified: true,
            seq,
            measurement,
        })),
        Response::AttestResult {
            verified: false,
            seq,
            reason,
            ..
        } => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "attestation_refused",
            reason.unwrap_or_else(|| "the attestation did not verify".into()),
        )
        .logged(seq)),
        other => Err(ApiError::unexpected(&other)),
    }
}

/// `GET {endpoint}/attestation?nonce=HEX`, bounded in time and size.
async fn fetch_attestation(
    http: &reqwest::Client,
    endpoint: &str,
    nonce: &[u8],
) -> ApiResult<Vec<u8>> {
    let upstream = |m: String| ApiError::new(StatusCode::BAD_GATEWAY, "upstream", m);
    let url = format!(
        "{}/attestation?nonce={}",
        endpoint.trim_end_matches('/'),
        hex::encode(nonce)
    );
    let mut response = http
        .get(&url)
        .send()
        .await
        .map_err(|e| upstream(format!("cannot fetch the server's attestation: {e}")))?;
    if !response.status().is_success() {
        return Err(upstream(format!(
            "the server answered {} to its attestation request",
            response.status()
        )));
    }
    let mut document = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| upstream(format!("reading the server's attestation: {e}")))?
    {
        if document.len().saturating_add(chunk.len()) > MAX_ATTESTATION_DOCUMENT {
            return Err(upstream(format!(
                "the server's attestation document is larger than {MAX_ATTESTATION_DOCUMENT} bytes"
            )));
        }
        document.extend_from_slice(&chunk);
    }
    Ok(document)
}
