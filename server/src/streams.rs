//! Live views as server-sent events: `GET /uploads/{id}/events` and
//! `GET /collections/{id}/events`. Each sends the same JSON as its `GET` twin whenever it
//! changes, so the operator page follows an upload or a collection without reloading (and
//! polls the `GET` route when a proxy strips the stream). The streams are read from the state
//! this server holds, checked every [`TICK`].

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::response::sse::{Event, KeepAlive, KeepAliveStream, Sse};
use futures::Stream;
use serde::Serialize;
use shared::api::UploadStatus;
use shared::api::collections::{CollectionState, CollectionSummary};
use shared::{CollectionId, ErrorCode, UploadId};
use tokio_util::task::TaskTracker;
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::{Ref, RefOr, Schema};
use utoipa::{PartialSchema, ToSchema};

use crate::AppState;
use crate::auth::Operator;
use crate::error::ApiError;

/// How often a stream looks for a change.
const TICK: Duration = Duration::from_millis(500);
/// How long one stream lives; the browser's `EventSource` reconnects by itself.
const MAX_STREAM: Duration = Duration::from_secs(3600);

/// What one tick of a stream found.
enum Look<T> {
    /// Still going; send this if it changed.
    Going(T),
    /// Send this, then end.
    Last(T),
    /// Gone (or unreadable): end.
    Gone,
}

/// A stream of `event: <name>` frames from `look`, one per change, until it ends, the server
/// shuts down or [`MAX_STREAM`] passes.
fn changes<T, F, Fut>(
    name: &'static str,
    state: &AppState,
    mut look: F,
) -> impl Stream<Item = Result<Event, Infallible>> + use<T, F, Fut>
where
    T: Serialize + Send + 'static,
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Look<T>> + Send,
{
    let shutdown = state.shutdown.clone();
    async_stream(&state.tracker, move |tx| async move {
        let deadline = tokio::time::Instant::now() + MAX_STREAM;
        let mut tick = tokio::time::interval(TICK);
        let mut last_sent = String::new();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep_until(deadline) => return,
                _ = tick.tick() => {}
            }
            let (value, last) = match look().await {
                Look::Going(v) => (v, false),
                Look::Last(v) => (v, true),
                Look::Gone => return,
            };
            let Ok(json) = serde_json::to_string(&value) else {
                return;
            };
            if json != last_sent {
                if tx
                    .send(Event::default().event(name).data(&json))
                    .await
                    .is_err()
                {
                    return;
                }
                last_sent = json;
            }
            if last {
                return;
            }
        }
    })
}

/// A stream fed by `producer` through a small channel: the producer stops when the client
/// goes away (its send fails).
fn async_stream<F, Fut>(
    tracker: &TaskTracker,
    producer: F,
) -> impl Stream<Item = Result<Event, Infallible>> + use<F, Fut>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Event>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tracker.spawn(producer(tx));
    futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|event| (Ok(event), rx))
    })
}

fn sse<S>(stream: S) -> Sse<KeepAliveStream<S>>
where
    S: Stream<Item = Result<Event, Infallible>> + Send + 'static,
{
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

/// The schema of one frame of an event stream: its `event` name, and its `data`, the JSON of
/// `schema`.
fn event_schema(event: &str, schema: &str) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .property(
            "event",
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some([event])),
        )
        .required("event")
        .property(
            "data",
            ObjectBuilder::new()
                .schema_type(Type::String)
                .content_media_type("application/json")
                .content_schema(Some(Ref::from_schema_name(schema)))
                .description(Some(format!("A `{schema}`, as JSON"))),
        )
        .required("data")
        .property("id", ObjectBuilder::new().schema_type(Type::String))
        .property("retry", ObjectBuilder::new().schema_type(Type::Integer))
        .into()
}

/// One frame of `GET /uploads/{upload_id}/events`.
pub struct UploadStatusEvent;

impl PartialSchema for UploadStatusEvent {
    fn schema() -> RefOr<Schema> {
        event_schema("status", "UploadStatus")
    }
}

impl ToSchema for UploadStatusEvent {
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        schemas.push(("UploadStatus".into(), UploadStatus::schema()));
        UploadStatus::schemas(schemas);
    }
}

/// One frame of `GET /collections/{id}/events`.
pub struct CollectionSummaryEvent;

impl PartialSchema for CollectionSummaryEvent {
    fn schema() -> RefOr<Schema> {
        event_schema("summary", "CollectionSummary")
    }
}

impl ToSchema for CollectionSummaryEvent {
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        schemas.push(("CollectionSummary".into(), CollectionSummary::schema()));
        CollectionSummary::schemas(schemas);
    }
}

/// `GET /uploads/{upload_id}/events`: the upload's status as it changes, ending with its
/// final state.
#[utoipa::path(get, path = "/uploads/{upload_id}/events", tag = "uploads",
    params(("upload_id" = UploadId, Path, description = "The upload")),
    responses((status = 200, description = "`event: status` frames, each an `UploadStatus` as JSON, sent when it changes; the stream ends after a final state",
        content_type = "text/event-stream", body = UploadStatusEvent)))]
pub async fn upload_events(
    State(state): State<AppState>,
    _: Operator,
    Path(raw): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let id = UploadId::parse(&raw)
        .map_err(|e| ApiError::new(ErrorCode::InvalidUploadId, e.to_string()))?;
    state.uploads.status(id)?;
    let here = state.clone();
    // An upload another replica drives is shown as that replica sees it.
    Ok(sse(changes("status", &state, move || {
        let state = here.clone();
        async move {
            match crate::bus::command::status(&state, id).await {
                Ok(s) if s.state.is_terminal() => Look::Last(s),
                Ok(s) => Look::Going(s),
                Err(_) => Look::Gone,
            }
        }
    })))
}

/// `GET /collections/{id}/events`: the collection's summary as it changes, ending once it is
/// expired or cancelled and settled.
#[utoipa::path(get, path = "/collections/{id}/events", tag = "collections",
    params(("id" = CollectionId, Path, description = "The collection")),
    responses((status = 200, description = "`event: summary` frames, each a `CollectionSummary` as JSON, sent when it changes; the stream ends once the collection is expired or cancelled and settled",
        content_type = "text/event-stream", body = CollectionSummaryEvent)))]
pub async fn collection_events(
    State(state): State<AppState>,
    _: Operator,
    Path(raw): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let id = CollectionId::parse(&raw)
        .map_err(|e| ApiError::new(ErrorCode::InvalidCollectionId, e.to_string()))?;
    state.collections.summary(id).await?;
    let collections = state.collections.clone();
    Ok(sse(changes("summary", &state, move || {
        let collections = collections.clone();
        async move {
            match collections.summary(id).await {
                // Expired or cancelled with nothing left to run: it cannot change any more.
                Ok(s) if s.settled && s.state != CollectionState::Open => Look::Last(s),
                Ok(s) => Look::Going::<CollectionSummary>(s),
                Err(_) => Look::Gone,
            }
        }
    })))
}
