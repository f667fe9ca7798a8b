//! The REST routes of collections and schedules: `/collections`, `/schedules` and below.

use std::net::SocketAddr;

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use shared::api::collections::{
    CollectionList, CollectionListParams, CollectionPreview, CollectionRows, CollectionSummary,
    CreateCollection, CreateSchedule, MAX_ROWS_PAGE, Manifest, ManifestEntry, RowsParams,
    ScheduleInfo, ScheduleList,
};
use shared::{ClientId, CollectionId, ErrorCode, ScheduleId};

use crate::AppState;
use crate::auth::Operator;
use crate::collections::RowFilter;
use crate::error::ApiError;

/// Collections listed by default, and at most.
const DEFAULT_LIST: usize = 50;
const MAX_LIST: usize = 1_000;

fn parse_id(raw: &str) -> Result<CollectionId, ApiError> {
    CollectionId::parse(raw)
        .map_err(|e| ApiError::new(ErrorCode::InvalidCollectionId, e.to_string()))
}

fn bad_query(e: QueryRejection) -> ApiError {
    ApiError::new(ErrorCode::BadRequest, e.body_text())
}

/// `POST /collections`: 201 with the summary (the stores matched so far).
#[utoipa::path(post, path = "/collections", operation_id = "create_collection", tag = "collections", request_body = CreateCollection,
    responses((status = 201, description = "The collection, with the stores matched so far", body = CollectionSummary)))]
pub async fn create(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    operator: Operator,
    body: Result<Json<CreateCollection>, JsonRejection>,
) -> Result<(StatusCode, Json<CollectionSummary>), ApiError> {
    let Json(req) = body.map_err(|e| ApiError::new(ErrorCode::BadRequest, e.body_text()))?;
    let requester = operator.requester(peer);
    let summary = state
        .collections
        .create(req, &state.inventory, &requester)?;
    Ok((StatusCode::CREATED, Json(summary)))
}

/// `POST /collections/preview`: how many stores the body would match now, creating nothing.
#[utoipa::path(post, path = "/collections/preview", operation_id = "preview_collection", tag = "collections", request_body = CreateCollection,
    responses((status = 200, description = "How many stores would be asked now", body = CollectionPreview)))]
pub async fn preview(
    State(state): State<AppState>,
    _operator: Operator,
    body: Result<Json<CreateCollection>, JsonRejection>,
) -> Result<Json<CollectionPreview>, ApiError> {
    let Json(req) = body.map_err(|e| ApiError::new(ErrorCode::BadRequest, e.body_text()))?;
    state.collections.preview(req, &state.inventory).map(Json)
}

/// `GET /collections?limit=N`: the newest first.
#[utoipa::path(get, path = "/collections", operation_id = "list_collections", tag = "collections", params(CollectionListParams),
    responses((status = 200, description = "The newest collections first", body = CollectionList)))]
pub async fn list(
    State(state): State<AppState>,
    _operator: Operator,
    params: Result<Query<CollectionListParams>, QueryRejection>,
) -> Result<Json<CollectionList>, ApiError> {
    let Query(params) = params.map_err(bad_query)?;
    let limit = params.limit.unwrap_or(DEFAULT_LIST).clamp(1, MAX_LIST);
    Ok(Json(CollectionList {
        collections: state.collections.list(limit).await?,
    }))
}

/// `GET /collections/{id}`.
#[utoipa::path(get, path = "/collections/{id}", operation_id = "collection_summary", tag = "collections", params(("id" = CollectionId, Path, description = "The collection")),
    responses((status = 200, description = "The collection's counts", body = CollectionSummary)))]
pub async fn summary(
    State(state): State<AppState>,
    _operator: Operator,
    Path(raw): Path<String>,
) -> Result<Json<CollectionSummary>, ApiError> {
    state.collections.summary(parse_id(&raw)?).await.map(Json)
}

/// `GET /collections/{id}/uploads?after=<client id>&limit=N[&state=S][&code=C]`: the stores, by
/// client id.
#[utoipa::path(get, path = "/collections/{id}/uploads", operation_id = "collection_rows", tag = "collections", params(("id" = CollectionId, Path, description = "The collection"), RowsParams),
    responses((status = 200, description = "One page of the collection's stores, by id", body = CollectionRows)))]
pub async fn rows(
    State(state): State<AppState>,
    _operator: Operator,
    Path(raw): Path<String>,
    params: Result<Query<RowsParams>, QueryRejection>,
) -> Result<Json<CollectionRows>, ApiError> {
    let id = parse_id(&raw)?;
    let Query(params) = params.map_err(bad_query)?;
    let after = params
        .after
        .as_deref()
        .map(ClientId::parse)
        .transpose()
        .map_err(|e| ApiError::new(ErrorCode::InvalidClientId, format!("after: {e}")))?;
    let limit = params.limit.unwrap_or(MAX_ROWS_PAGE);
    let code = params
        .code
        .as_deref()
        .map(str::parse::<ErrorCode>)
        .transpose()
        .map_err(|e| ApiError::new(ErrorCode::BadRequest, format!("code: {e}")))?;
    let only = RowFilter {
        state: params.state,
        code,
    };
    state
        .collections
        .rows(id, after.as_ref(), limit, only)
        .await
        .map(Json)
}

/// `DELETE /collections/{id}`: cancels what is unfinished.
#[utoipa::path(delete, path = "/collections/{id}", operation_id = "cancel_collection", tag = "collections", params(("id" = CollectionId, Path, description = "The collection")),
    responses((status = 200, description = "The collection, cancelled", body = CollectionSummary)))]
pub async fn cancel(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    operator: Operator,
    Path(raw): Path<String>,
) -> Result<Json<CollectionSummary>, ApiError> {
    let id = parse_id(&raw)?;
    let requester = operator.requester(peer);
    state.collections.cancel(id, &requester).await.map(Json)
}

/// `GET /collections/{id}/manifest`: every completed store with a presigned GET of its file,
/// as JSON, or as CSV when the `Accept` header asks for `text/csv`.
#[utoipa::path(get, path = "/collections/{id}/manifest", operation_id = "collection_manifest", tag = "collections", params(("id" = CollectionId, Path, description = "The collection")),
    responses((status = 200, description = "Every completed store with a presigned GET of its file",
        content((Manifest = "application/json"), (String = "text/csv")))))]
pub async fn manifest(
    State(state): State<AppState>,
    operator: Operator,
    Path(raw): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = parse_id(&raw)?;
    let completed = state.collections.completed(id)?;
    let presigner = state
        .storage
        .presigner(state.config.download_url_ttl())
        .await
        .map_err(|e| ApiError::internal(&e))?;
    let entries = completed
        .into_iter()
        .map(|c| {
            Ok(ManifestEntry {
                url: presigner.get(&c.key)?,
                client_id: c.client_id,
                upload_id: c.upload_id,
                key: c.key,
                size: c.size,
                sha256: c.sha256,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()
        .map_err(|e| ApiError::internal(&e))?;
    tracing::info!(
        audit = true,
        collection_id = %id,
        entries = entries.len(),
        operator = operator.name,
        ttl_secs = presigner.ttl().as_secs(),
        "manifest issued"
    );
    let wants_csv = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/csv"));
    if wants_csv {
        let csv = to_csv(&entries).map_err(|e| ApiError::internal(&e))?;
        return Ok(([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], csv).into_response());
    }
    Ok(Json(Manifest {
        collection_id: id,
        expires_in_secs: presigner.ttl().as_secs(),
        entries,
    })
    .into_response())
}

fn parse_schedule_id(raw: &str) -> Result<ScheduleId, ApiError> {
    ScheduleId::parse(raw).map_err(|e| ApiError::new(ErrorCode::InvalidScheduleId, e.to_string()))
}

/// `POST /schedules`: 201 with the schedule and its next firing.
#[utoipa::path(post, path = "/schedules", tag = "schedules", request_body = CreateSchedule,
    responses((status = 201, description = "The schedule and its next firing", body = ScheduleInfo)))]
pub async fn create_schedule(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    operator: Operator,
    body: Result<Json<CreateSchedule>, JsonRejection>,
) -> Result<(StatusCode, Json<ScheduleInfo>), ApiError> {
    let Json(req) = body.map_err(|e| ApiError::new(ErrorCode::BadRequest, e.body_text()))?;
    let requester = operator.requester(peer);
    let info = state.schedules.create(req, &requester)?;
    Ok((StatusCode::CREATED, Json(info)))
}

/// `GET /schedules`.
#[utoipa::path(get, path = "/schedules", tag = "schedules",
    responses((status = 200, description = "Every schedule", body = ScheduleList)))]
pub async fn list_schedules(
    State(state): State<AppState>,
    _operator: Operator,
) -> Json<ScheduleList> {
    Json(ScheduleList {
        schedules: state.schedules.list(),
    })
}

/// `GET /schedules/{id}`.
#[utoipa::path(get, path = "/schedules/{id}", operation_id = "get_schedule", tag = "schedules", params(("id" = ScheduleId, Path, description = "The schedule")),
    responses((status = 200, description = "The schedule", body = ScheduleInfo)))]
pub async fn schedule(
    State(state): State<AppState>,
    _operator: Operator,
    Path(raw): Path<String>,
) -> Result<Json<ScheduleInfo>, ApiError> {
    state.schedules.get(parse_schedule_id(&raw)?).map(Json)
}

/// `DELETE /schedules/{id}`: no more firings; the collections it created go on.
#[utoipa::path(delete, path = "/schedules/{id}", tag = "schedules", params(("id" = ScheduleId, Path, description = "The schedule")),
    responses((status = 200, description = "The schedule, deleted", body = ScheduleInfo)))]
pub async fn delete_schedule(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    operator: Operator,
    Path(raw): Path<String>,
) -> Result<Json<ScheduleInfo>, ApiError> {
    let id = parse_schedule_id(&raw)?;
    let requester = operator.requester(peer);
    state.schedules.delete(id, &requester).map(Json)
}

/// The manifest as CSV, with a header row.
fn to_csv(entries: &[ManifestEntry]) -> anyhow::Result<String> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(["client_id", "upload_id", "key", "size", "sha256", "url"])?;
    for e in entries {
        w.write_record([
            e.client_id.as_str(),
            &e.upload_id.to_string(),
            &e.key,
            &e.size.to_string(),
            e.sha256.as_deref().unwrap_or(""),
            &e.url,
        ])?;
    }
    Ok(String::from_utf8(w.into_inner()?)?)
}
