//! Agent routes (bearer JWT, forwarded to the enclave untouched): discover, resolve a handle;
//! and the retired advisory authorize route (410: tool calls go through the MCP gateway).

use attestplane_proto::{ErrorCode, Request, Response, ServerInfo};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};

use super::body::{HandleIssued, ListedServer, ServerList};
use super::error::{ApiError, ApiResult};
use super::{AppState, path_id};

fn denied(seq: u64, code: ErrorCode, reason: &str) -> ApiError {
    ApiError::from_code(code, reason).logged(seq)
}

pub(super) async fn discover(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> ApiResult<Json<ServerList>> {
    let bearer = bearer(&headers)?;
    match state.call(Request::Discover { bearer }).await? {
        Response::Servers { servers, seq } => {
            let servers = servers.into_iter().map(listed).collect();
            Ok(Json(ServerList { servers, seq }))
        }
        Response::Denied { seq, reason, code } => Err(denied(seq, code, &reason)),
        other => Err(ApiError::unexpected(&other)),
    }
}

pub(super) async fn resolve(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Json<HandleIssued>> {
    let bearer = bearer(&headers)?;
    let server_id = path_id("server id", &id)?;
    match state.call(Request::Resolve { bearer, server_id }).await? {
        Response::Handle {
            token,
            seq,
            expires_at,
        } => Ok(Json(HandleIssued {
            token,
            seq,
            expires_at,
        })),
        Response::Denied { seq, reason, code } => Err(denied(seq, code, &reason)),
        other => Err(ApiError::unexpected(&other)),
    }
}

/// `POST /v1/servers/{id}/tools/{tool}/authorize`, retired: it asked the enclave whether a
/// call would be allowed, but nothing made the agent ask, its answer was unsigned, and it wrote
/// a decision for a call that never passed through the control plane. Tool calls are decided,
/// enforced and logged by the MCP gateway (`/mcp/{server-id}`); this answers 410 and touches
/// neither the enclave nor the log.
pub(super) async fn authorize_retired(Path((id, _tool)): Path<(String, String)>) -> ApiError {
    ApiError::new(
        StatusCode::GONE,
        "gone",
        format!(
            "the advisory authorize route is retired: call tools through the MCP gateway at /mcp/{}",
            id.chars().take(64).collect::<String>()
        ),
    )
}

fn listed(s: ServerInfo) -> ListedServer {
    ListedServer {
        id: s.id,
        name: s.name,
        tenant: s.tenant,
        resource: s.resource,
        attested: s.attested,
    }
}

fn bearer(headers: &HeaderMap) -> ApiResult<String> {
    let unauthenticated =
        |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", m.to_owned());
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| unauthenticated("missing Authorization: Bearer token"))?;
    let value = value
        .to_str()
        .map_err(|_| unauthenticated("the Authorization header is not text"))?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or_else(|| unauthenticated("the Authorization header is not a Bearer token"))?
        .trim();
    if token.is_empty() {
        return Err(unauthenticated("empty bearer token"));
    }
    Ok(token.to_owned())
}
