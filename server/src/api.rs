//! The operator REST API.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use shared::api::{
    ClientInfo, ClientListParams, ClientStatus, DownloadLink, Health, RevocationResponse,
    TriggerParams, TriggerResponse, UploadState, UploadStatus,
};
use shared::encoding::Compression;
use shared::protocol::DEFAULT_SHARE;
use shared::{ClientId, ErrorCode, FileName, UploadId};

use shared::labels::Label;

use crate::AppState;
use crate::auth::Operator;
use crate::error::ApiError;
use crate::registry::AgentHandle;
use crate::uploads::rfc3339;

pub fn parse_client_id(raw: &str) -> Result<ClientId, ApiError> {
    ClientId::parse(raw).map_err(|e| ApiError::new(ErrorCode::InvalidClientId, e.to_string()))
}

fn parse_upload_id(raw: &str) -> Result<UploadId, ApiError> {
    UploadId::parse(raw).map_err(|e| ApiError::new(ErrorCode::InvalidUploadId, e.to_string()))
}

#[utoipa::path(post, path = "/trigger-download/{client_id}", tag = "uploads",
    params(("client_id" = ClientId, Path, description = "The store"), TriggerParams),
    responses((status = 202, description = "The agent was asked for the file", body = TriggerResponse)))]
pub async fn trigger_download(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    operator: Operator,
    Path(raw_client_id): Path<String>,
    params: Result<Query<TriggerParams>, QueryRejection>,
) -> Result<(StatusCode, Json<TriggerResponse>), ApiError> {
    let received = std::time::Instant::now();
    let client_id = parse_client_id(&raw_client_id)?;
    let Query(params) = params.map_err(|e| ApiError::new(ErrorCode::BadRequest, e.body_text()))?;
    let share = FileName::parse(params.file.as_deref().unwrap_or(DEFAULT_SHARE))
        .map_err(|e| ApiError::new(ErrorCode::InvalidFileName, format!("share name: {e}")))?;
    let compression = params
        .encoding
        .as_deref()
        .map(str::parse::<Compression>)
        .transpose()
        .map_err(|e| ApiError::new(ErrorCode::InvalidEncoding, e.to_string()))?
        .unwrap_or_default();
    let upload_id = crate::bus::command::trigger(
        &state,
        client_id.clone(),
        share,
        compression,
        &operator.requester(peer),
    )
    .await?;
    state.metrics.observe_dispatch(received.elapsed());
    Ok((
        StatusCode::ACCEPTED,
        Json(TriggerResponse {
            upload_id,
            client_id,
            state: UploadState::Requested,
            status_url: format!("/uploads/{upload_id}"),
        }),
    ))
}

/// `GET /clients`: the connected agents, or with `all=true` every store ever seen; `label`
/// keeps those with all of the given labels.
#[utoipa::path(get, path = "/clients", tag = "stores", params(ClientListParams),
    responses((status = 200, description = "The stores, by id", body = Vec<ClientInfo>)))]
pub async fn list_clients(
    State(state): State<AppState>,
    _: Operator,
    params: Result<Query<ClientListParams>, QueryRejection>,
) -> Result<Json<Vec<ClientInfo>>, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::new(ErrorCode::BadRequest, e.body_text()))?;
    let wanted = parse_labels(params.label.as_deref())?;
    if !params.all {
        let mut clients: Vec<ClientInfo> = state
            .registry
            .snapshot()
            .into_iter()
            .filter(|(_, h)| h.labels.matches_all(&wanted))
            .map(|(id, h)| connected_info(&state, id, &h, None))
            .collect();
        clients.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        return Ok(Json(clients));
    }
    let stores = crate::stores_api::listed(&state, &wanted)?;
    Ok(Json(
        stores
            .into_iter()
            .map(|s| crate::stores_api::info(&state, s))
            .collect(),
    ))
}

/// A `label` query: `key=value` pairs, comma-separated.
pub fn parse_labels(raw: Option<&str>) -> Result<Vec<Label>, ApiError> {
    raw.unwrap_or_default()
        .split(',')
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.parse::<Label>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ApiError::new(ErrorCode::BadRequest, format!("label: {e}")))
}

/// Unix milliseconds as RFC 3339.
pub(crate) fn ms_rfc3339(ms: i64) -> String {
    rfc3339(
        time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH),
    )
}

pub(crate) fn connected_info(
    state: &AppState,
    client_id: ClientId,
    h: &AgentHandle,
    first_seen: Option<String>,
) -> ClientInfo {
    ClientInfo {
        active_upload: state.uploads.active_for(&client_id),
        client_id,
        connected: true,
        connected_since: Some(rfc3339(h.connected_since)),
        last_seen: rfc3339(h.last_seen()),
        first_seen,
        protocol_version: h.protocol_version,
        agent_version: h.agent_version.clone(),
        token_expires_at: unix_rfc3339(h.token_expires_at()),
        labels: h.labels.clone(),
    }
}

#[utoipa::path(get, path = "/status/{client_id}", tag = "stores", params(("client_id" = ClientId, Path, description = "The store")),
    responses((status = 200, description = "The store's connection and latest upload", body = ClientStatus)))]
pub async fn client_status(
    State(state): State<AppState>,
    _: Operator,
    Path(raw_client_id): Path<String>,
) -> Result<Json<ClientStatus>, ApiError> {
    let client_id = parse_client_id(&raw_client_id)?;
    crate::bus::command::client_status(&state, client_id)
        .await
        .map(Json)
}

/// A store as this server sees it: its connection here, if any, and its uploads.
pub fn client_status_here(state: &AppState, client_id: ClientId) -> ClientStatus {
    let handle = state.registry.get(&client_id);
    ClientStatus {
        connected: handle.is_some(),
        connected_since: handle.as_ref().map(|h| rfc3339(h.connected_since)),
        last_seen: handle.as_ref().map(|h| rfc3339(h.last_seen())),
        token_expires_at: handle
            .as_ref()
            .and_then(|h| unix_rfc3339(h.token_expires_at())),
        active_upload: state.uploads.active_for(&client_id),
        last_upload: state.uploads.latest_for(&client_id),
        client_id,
    }
}

#[utoipa::path(get, path = "/uploads/{upload_id}", tag = "uploads", params(("upload_id" = UploadId, Path, description = "The upload")),
    responses((status = 200, description = "The upload's state and progress", body = UploadStatus)))]
pub async fn upload_status(
    State(state): State<AppState>,
    _: Operator,
    Path(raw_upload_id): Path<String>,
) -> Result<Json<UploadStatus>, ApiError> {
    let upload_id = parse_upload_id(&raw_upload_id)?;
    crate::bus::command::status(&state, upload_id)
        .await
        .map(Json)
}

/// `GET /uploads/{upload_id}/download`: a 307 to a presigned GET of the verified object. Only
/// the object's location passes through the server, never its bytes.
#[utoipa::path(get, path = "/uploads/{upload_id}/download", tag = "uploads", params(("upload_id" = UploadId, Path, description = "The upload")),
    responses((status = 307, description = "A presigned GET of the verified object, in `Location` and the body", body = DownloadLink,
        headers(("location" = String, description = "The presigned URL")))))]
pub async fn download_link(
    State(state): State<AppState>,
    operator: Operator,
    Path(raw_upload_id): Path<String>,
) -> Result<Response, ApiError> {
    let upload_id = parse_upload_id(&raw_upload_id)?;
    let status = state.uploads.status(upload_id)?;
    let (UploadState::Completed, Some(key), Some(size)) = (status.state, &status.key, status.size)
    else {
        return Err(ApiError::new(
            ErrorCode::UploadNotCompleted,
            format!(
                "upload {upload_id} is {}; only a completed upload can be downloaded",
                status.state
            ),
        )
        .with_state(status.state));
    };
    let presigner = state
        .storage
        .presigner(state.config.download_url_ttl())
        .await
        .map_err(|e| ApiError::internal(&e))?;
    let url = presigner.get(key).map_err(|e| ApiError::internal(&e))?;
    tracing::info!(
        audit = true,
        %upload_id,
        operator = operator.name,
        ttl_secs = presigner.ttl().as_secs(),
        "download link issued"
    );
    let location =
        HeaderValue::try_from(url.as_str()).map_err(|e| ApiError::internal(&e.into()))?;
    let link = DownloadLink {
        upload_id,
        url,
        expires_in_secs: presigner.ttl().as_secs(),
        size,
        sha256: status.sha256,
        checksum_crc64nvme: status.checksum_crc64nvme,
        encoding: status.encoding.unwrap_or_default(),
        stored_size: status.stored_size.filter(|s| *s != size),
    };
    Ok((
        StatusCode::TEMPORARY_REDIRECT,
        [(header::LOCATION, location)],
        Json(link),
    )
        .into_response())
}

/// `POST /revocations/{client_id}`: refuses every token of that client issued until now and
/// closes its live connection.
#[utoipa::path(post, path = "/revocations/{client_id}", tag = "stores", params(("client_id" = ClientId, Path, description = "The store")),
    responses((status = 200, description = "Every token of the store issued until now is refused", body = RevocationResponse)))]
pub async fn revoke_client(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    operator: Operator,
    Path(raw_client_id): Path<String>,
) -> Result<Json<RevocationResponse>, ApiError> {
    let client_id = parse_client_id(&raw_client_id)?;
    // Where the store is connected is read before the news goes out: its holder marks it away
    // as soon as it closes the connection.
    let connected_elsewhere = state.registry.get(&client_id).is_none()
        && state
            .bus
            .holder_elsewhere(&client_id)
            .await
            .inspect_err(|e| tracing::warn!(%client_id, error = e.message(), "where the revoked store is connected is unknown; the answer says not connected"))
            .ok()
            .flatten()
            .is_some_and(|h| h.connected);
    let not_before = state.revocations.revoke(&client_id).map_err(|e| {
        tracing::error!(%client_id, error = format!("{e:#}"), "revocation not saved");
        ApiError::new(
            ErrorCode::Internal,
            "the revocation could not be saved (see the server log), so nothing was revoked",
        )
    })?;
    state.bus.broadcast(
        &crate::bus::Broadcast::StoreRevoked {
            client_id: client_id.clone(),
            not_before,
        },
        &state.tracker,
    );
    let disconnected = match state.registry.get(&client_id) {
        Some(handle) => {
            handle.close_revoked();
            true
        }
        // The holder closes it when it hears of the revocation.
        None => connected_elsewhere,
    };
    tracing::info!(
        audit = true,
        %client_id,
        operator = operator.name,
        from = %peer,
        disconnected,
        "agent tokens revoked"
    );
    Ok(Json(RevocationResponse {
        client_id,
        tokens_issued_before: not_before,
        disconnected,
    }))
}

/// `DELETE /uploads/{upload_id}`.
#[utoipa::path(delete, path = "/uploads/{upload_id}", tag = "uploads", params(("upload_id" = UploadId, Path, description = "The upload")),
    responses((status = 200, description = "The upload, cancelled", body = UploadStatus)))]
pub async fn cancel_upload(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    operator: Operator,
    Path(raw_upload_id): Path<String>,
) -> Result<Json<UploadStatus>, ApiError> {
    let upload_id = parse_upload_id(&raw_upload_id)?;
    let requester = operator.requester(peer);
    crate::bus::command::cancel(&state, upload_id, &requester)
        .await
        .map(Json)
}

/// Unix seconds as RFC 3339 (`None` if out of range).
/// Unix seconds as RFC 3339; `None` if out of range.
pub fn unix_rfc3339(secs: u64) -> Option<String> {
    let t = time::OffsetDateTime::from_unix_timestamp(i64::try_from(secs).ok()?).ok()?;
    Some(rfc3339(t))
}

#[utoipa::path(get, path = "/healthz", tag = "server",
    responses((status = 200, description = "The server is up", body = Health)))]
pub async fn healthz(State(state): State<AppState>) -> Json<Health> {
    Json(Health {
        status: "ok".to_owned(),
        connected_agents: state.registry.len(),
    })
}

/// `GET /metrics`: Prometheus text format. Operators only, like the rest of the API; Prometheus
/// sends the token with `authorization: {credentials_file: ...}`.
#[utoipa::path(get, path = "/metrics", tag = "server",
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain")))]
pub async fn metrics(
    State(state): State<AppState>,
    _operator: Operator,
) -> impl axum::response::IntoResponse {
    let open = state.uploads.open_counts();
    let soon = shared::auth::unix_now() + crate::renewal::EXPIRY_WARNING.as_secs();
    let expiring = state.registry.count(|h| h.token_expires_at() < soon);
    let (collections, stores_pending) = state.collections.gauges();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(&crate::metrics::Gauges {
            connected: state.registry.len(),
            expiring,
            open: &open,
            collections: &collections,
            stores_pending,
        }),
    )
}

pub async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "no such route")
}
