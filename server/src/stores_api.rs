//! `GET /stores` (the fleet, a page at a time, for the operator page) and
//! `GET /stores/{client_id}/uploads` (one store's uploads, newest first).

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use shared::api::{
    ClientInfo, DEFAULT_STORES_PAGE, MAX_STORES_PAGE, StoreList, StoreListParams,
    StoreUploadsParams, UploadList,
};
use shared::labels::{Label, Labels};
use shared::{ClientId, ErrorCode};

use crate::AppState;
use crate::api::{connected_info, ms_rfc3339, parse_client_id, parse_labels};
use crate::auth::Operator;
use crate::error::ApiError;
use crate::inventory::Store;
use crate::registry::AgentHandle;

/// Uploads of one store listed by default, and at most.
const DEFAULT_UPLOADS: usize = 20;
const MAX_UPLOADS: usize = 200;

/// One store as a list sees it, before it is rendered: what the inventory recorded, and whether
/// an agent holds it now. Lists filter and page these, and render only what they return.
pub enum Listed {
    Known {
        store: Store,
        connected: bool,
    },
    /// Connected, but the inventory failed to record it.
    Unrecorded(ClientId, AgentHandle),
}

impl Listed {
    fn client_id(&self) -> &ClientId {
        match self {
            Listed::Known { store, .. } => &store.client_id,
            Listed::Unrecorded(id, _) => id,
        }
    }

    fn connected(&self) -> bool {
        match self {
            Listed::Known { connected, .. } => *connected,
            Listed::Unrecorded(..) => true,
        }
    }

    fn labels(&self) -> &Labels {
        match self {
            Listed::Known { store, .. } => &store.labels,
            Listed::Unrecorded(_, h) => &h.labels,
        }
    }

    fn agent_version(&self) -> &str {
        match self {
            Listed::Known { store, .. } => &store.agent_version,
            Listed::Unrecorded(_, h) => &h.agent_version,
        }
    }
}

/// Every store ever seen whose labels include all of `wanted`, by client id.
pub fn listed(state: &AppState, wanted: &[Label]) -> Result<Vec<Listed>, ApiError> {
    let mut live = state.registry.connected_ids();
    let stores = state.inventory.list(wanted).map_err(|e| {
        tracing::error!(
            error = format!("{e:#}"),
            "reading the store inventory failed"
        );
        ApiError::new(ErrorCode::Internal, "the store inventory could not be read")
    })?;
    let mut listed: Vec<Listed> = stores
        .into_iter()
        .map(|store| {
            let connected = live.remove(&store.client_id);
            Listed::Known { store, connected }
        })
        .collect();
    // Connected agents the inventory failed to record are still listed.
    let unrecorded = live.into_iter().filter_map(|id| {
        let h = state.registry.get(&id)?;
        h.labels
            .matches_all(wanted)
            .then_some(Listed::Unrecorded(id, h))
    });
    listed.extend(unrecorded);
    listed.sort_by(|a, b| a.client_id().cmp(b.client_id()));
    Ok(listed)
}

/// A listed store as the API shows it, live details included while it is connected.
pub fn info(state: &AppState, listed: Listed) -> ClientInfo {
    match listed {
        Listed::Unrecorded(id, h) => connected_info(state, id, &h, None),
        Listed::Known { store, connected } => {
            let first_seen = Some(ms_rfc3339(store.first_seen_ms));
            match connected
                .then(|| state.registry.get(&store.client_id))
                .flatten()
            {
                Some(h) => connected_info(state, store.client_id, &h, first_seen),
                None => ClientInfo {
                    active_upload: state.uploads.active_for(&store.client_id),
                    client_id: store.client_id,
                    connected: false,
                    connected_since: None,
                    last_seen: ms_rfc3339(store.last_seen_ms),
                    first_seen,
                    protocol_version: store.protocol_version,
                    agent_version: store.agent_version,
                    token_expires_at: None,
                    labels: store.labels,
                },
            }
        }
    }
}

/// What a page of stores is filtered by, besides labels.
struct Filter {
    glob: Option<glob::Pattern>,
    /// Lowercase.
    text: Option<String>,
    connected: Option<bool>,
}

impl Filter {
    fn keeps(&self, store: &Listed) -> bool {
        let id = store.client_id().as_str();
        self.connected.is_none_or(|c| store.connected() == c)
            && self.glob.as_ref().is_none_or(|g| g.matches(id))
            && self.text.as_deref().is_none_or(|text| {
                id.to_ascii_lowercase().contains(text)
                    || store.agent_version().to_ascii_lowercase().contains(text)
                    || store
                        .labels()
                        .iter()
                        .any(|(k, v)| format!("{k}={v}").to_ascii_lowercase().contains(text))
            })
    }
}

/// `GET /stores`: every store ever seen that matches the filters, a page at a time, by id.
#[utoipa::path(get, path = "/stores", operation_id = "list_stores", tag = "stores", params(StoreListParams),
    responses((status = 200, description = "One page of stores, by client id", body = StoreList)))]
pub async fn list(
    State(state): State<AppState>,
    _: Operator,
    params: Result<Query<StoreListParams>, QueryRejection>,
) -> Result<Json<StoreList>, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::new(ErrorCode::BadRequest, e.body_text()))?;
    let wanted = parse_labels(params.label.as_deref())?;
    let after = params
        .after
        .as_deref()
        .map(ClientId::parse)
        .transpose()
        .map_err(|e| ApiError::new(ErrorCode::InvalidClientId, format!("after: {e}")))?;
    let limit = params.limit.unwrap_or(DEFAULT_STORES_PAGE);
    if !(1..=MAX_STORES_PAGE).contains(&limit) {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            format!("limit must be 1 to {MAX_STORES_PAGE}"),
        ));
    }
    let glob = params
        .glob
        .as_deref()
        .filter(|g| !g.is_empty())
        .map(glob::Pattern::new)
        .transpose()
        .map_err(|e| ApiError::new(ErrorCode::BadRequest, format!("glob: {e}")))?;
    let filter = Filter {
        glob,
        text: params
            .q
            .as_deref()
            .map(str::trim)
            .filter(|q| !q.is_empty())
            .map(str::to_ascii_lowercase),
        connected: params.connected,
    };
    let matching: Vec<Listed> = listed(&state, &wanted)?
        .into_iter()
        .filter(|s| filter.keeps(s))
        .collect();
    let total = matching.len();
    let connected = matching.iter().filter(|s| s.connected()).count();
    let mut page: Vec<Listed> = matching
        .into_iter()
        .filter(|s| after.as_ref().is_none_or(|a| s.client_id() > a))
        .take(limit + 1)
        .collect();
    let next_after = if page.len() > limit {
        page.truncate(limit);
        page.last().map(|s| s.client_id().clone())
    } else {
        None
    };
    let page = page.into_iter().map(|s| info(&state, s)).collect();
    Ok(Json(StoreList {
        stores: page,
        total,
        connected,
        next_after,
    }))
}

/// `GET /stores/{client_id}/uploads`: the store's uploads, newest first.
#[utoipa::path(get, path = "/stores/{client_id}/uploads", operation_id = "store_uploads", tag = "stores",
    params(("client_id" = ClientId, Path, description = "The store"), StoreUploadsParams),
    responses((status = 200, description = "The store's uploads, newest first", body = UploadList)))]
pub async fn uploads(
    State(state): State<AppState>,
    _: Operator,
    Path(raw): Path<String>,
    params: Result<Query<StoreUploadsParams>, QueryRejection>,
) -> Result<Json<UploadList>, ApiError> {
    let client_id = parse_client_id(&raw)?;
    let Query(params) = params.map_err(|e| ApiError::new(ErrorCode::BadRequest, e.body_text()))?;
    let limit = params.limit.unwrap_or(DEFAULT_UPLOADS);
    if !(1..=MAX_UPLOADS).contains(&limit) {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            format!("limit must be 1 to {MAX_UPLOADS}"),
        ));
    }
    Ok(Json(UploadList {
        uploads: state.uploads.recent_for(&client_id, limit),
    }))
}
