//! Collections: one file asked of many stores, including those offline now, on the existing
//! upload machinery.
//!
//! A collection has a target (all stores, ids, an id glob, or labels), a share, an expiry and a
//! limit on how many stores upload at once. When it is created it matches every store in the
//! inventory (and, for an ids target, every named store, seen or not); a matching store that
//! says hello later, before the expiry, joins it. Each store's transfer is an ordinary upload
//! ([`Uploads::ask`]) that carries the collection's id, with every guarantee uploads have.
//!
//! ```text
//!   matched ──► waiting ──(connected, not busy, a free slot)──► running ──► completed
//!                  │                                              │       failed
//!                  │ expiry: not_reached                          │       cancelled
//!                  │ cancel: cancelled                            ▼
//!                  └──────────────────────────────────────► (the upload's own end)
//! ```
//!
//! One task, the dispatcher ([`Collections::run`], in [`driver`]), asks the stores: it wakes
//! when a collection is created, a store connects, an upload ends (any upload: its store may
//! have been busy) and once a second for expiries. The rows live in the [`book`], the one owner
//! of their lock, which writes every change through to the database before it is acted on.
//!
//! With several replicas, one drives the collections (the `Collections` lease) and the others
//! follow: they create collections in the database for the driver to adopt, read collections
//! from the database, and tell the driver what it must hear (see [`crate::bus`]).

mod book;
mod driver;
mod record;
mod settings;
mod store;
mod target;
mod view;

use std::sync::Arc;

use shared::api::collections::{
    CollectionPreview, CollectionRow, CollectionRows, CollectionState, CollectionSummary,
    CollectionTemplate, CreateCollection, MAX_ROWS_PAGE, RowState,
};
use shared::labels::Labels;
use shared::{ClientId, CollectionId, ErrorCode, ScheduleId, UploadId};
use tokio::sync::Notify;
use tokio_util::task::TaskTracker;

use crate::bus::{Bus, Reply, ToDriver};
use crate::error::ApiError;
use crate::inventory::Inventory;
use crate::registry::Registry;
use crate::uploads::{Requester, UnixMs, Uploads};

use book::{Book, CancelError};
pub use record::Firing;

use record::{Collection, Row, Spec, Stage};
use settings::Checked;

/// Which rows a page shows.
#[derive(Debug, Clone, Copy, Default)]
pub struct RowFilter {
    pub state: Option<RowState>,
    /// Failed with this code.
    pub code: Option<ErrorCode>,
}

impl RowFilter {
    fn keeps(&self, row: &CollectionRow) -> bool {
        self.state.is_none_or(|s| row.state == s)
            && self
                .code
                .is_none_or(|code| row.error.as_ref().is_some_and(|e| e.code == code))
    }
}

/// A completed store, for the manifest.
#[derive(Debug, Clone)]
pub struct Completed {
    pub client_id: ClientId,
    pub upload_id: UploadId,
    pub key: String,
    pub size: u64,
    pub sha256: Option<String>,
}

/// The collection service. Cheap to clone.
#[derive(Clone)]
pub struct Collections(Arc<Core>);

struct Core {
    book: Book,
    uploads: Uploads,
    registry: Arc<Registry>,
    bus: Arc<Bus>,
    tracker: TaskTracker,
    wake: Notify,
}

impl Collections {
    /// The collections in the database; they are driven here once [`Collections::lead`] finds
    /// this replica holding the lease.
    pub fn open(
        db: crate::db::Db,
        uploads: Uploads,
        registry: Arc<Registry>,
        bus: Arc<Bus>,
        tracker: TaskTracker,
    ) -> Self {
        Self(Arc::new(Core {
            book: Book::open(store::Store::new(db)),
            uploads,
            registry,
            bus,
            tracker,
            wake: Notify::new(),
        }))
    }

    /// Whether this replica drives the collections now.
    pub fn driving(&self) -> bool {
        self.0.book.driving()
    }

    /// Follows [`Collections::driving`] as it changes.
    pub fn watch_driving(&self) -> tokio::sync::watch::Receiver<bool> {
        self.0.book.watch_driving()
    }

    /// A store said hello: it joins the open collections it matches, and is asked if a slot
    /// is free.
    pub fn on_agent_connected(&self, client: &ClientId, labels: &Labels) {
        if !self.driving() {
            let news = ToDriver::Hello {
                client_id: client.clone(),
                labels: labels.clone(),
            };
            self.0.bus.tell_driver(news, &self.0.tracker);
        } else if self.0.book.store_connected(client, labels, UnixMs::now()) {
            self.0.wake.notify_one();
        }
    }

    /// `POST /collections`.
    pub fn create(
        &self,
        req: CreateCollection,
        inventory: &Inventory,
        requester: &Requester,
    ) -> Result<CollectionSummary, ApiError> {
        let now = time::OffsetDateTime::now_utc();
        let expires = settings::expiry(&req, now)?;
        let checked = Checked::try_from(&req)?;
        self.start(checked, now, expires, None, inventory, requester)
    }

    /// `POST /collections/preview`: the stores `req` would match now, connected or not.
    pub fn preview(
        &self,
        req: CreateCollection,
        inventory: &Inventory,
    ) -> Result<CollectionPreview, ApiError> {
        settings::expiry(&req, time::OffsetDateTime::now_utc())?;
        let checked = Checked::try_from(&req)?;
        let m = &checked.matcher;
        let mut matched: std::collections::BTreeSet<ClientId> = m.named().cloned().collect();
        let known = inventory.list(&[]).map_err(|e| ApiError::internal(&e))?;
        matched.extend(
            known
                .into_iter()
                .filter(|s| m.matches(&s.client_id, &s.labels))
                .map(|s| s.client_id),
        );
        matched.extend(
            self.0
                .registry
                .snapshot()
                .into_iter()
                .filter(|(client, h)| m.matches(client, &h.labels))
                .map(|(client, _)| client),
        );
        let connected = matched.iter().filter(|c| self.connected(c)).count() as u64;
        let total = matched.len() as u64;
        Ok(CollectionPreview {
            matched: total,
            connected,
            offline: total - connected,
        })
    }

    /// A schedule fired at `firing.at`: the collection of its template, expiring `expires_in`
    /// after the firing. `None` if that moment is past already (a firing missed while the
    /// server was down for longer), and nothing is created.
    pub fn fire(
        &self,
        firing: Firing,
        template: &CollectionTemplate,
        inventory: &Inventory,
        requester: &Requester,
    ) -> Result<Option<CollectionSummary>, ApiError> {
        let (checked, expires_in) = settings::template(template)?;
        let expires = firing.at.to_datetime() + expires_in;
        let now = time::OffsetDateTime::now_utc();
        if expires <= now {
            return Ok(None);
        }
        self.start(checked, now, expires, Some(firing), inventory, requester)
            .map(Some)
    }

    /// Checks a schedule's template as a collection's settings would be checked.
    pub fn check_template(template: &CollectionTemplate) -> Result<(), ApiError> {
        settings::template(template).map(|_| ())
    }

    /// Whether a collection of `schedule` exists for its firing at `at` or a later one.
    pub fn fired_since(&self, schedule: ScheduleId, at: UnixMs) -> anyhow::Result<bool> {
        self.0.book.fired_since(schedule, at)
    }

    /// Records a new collection matching the inventory (and the connected agents), and wakes
    /// the dispatcher.
    fn start(
        &self,
        checked: Checked,
        now: time::OffsetDateTime,
        expires: time::OffsetDateTime,
        firing: Option<Firing>,
        inventory: &Inventory,
        requester: &Requester,
    ) -> Result<CollectionSummary, ApiError> {
        let Checked {
            matcher,
            share,
            max_concurrent,
            compression,
        } = checked;
        let created = UnixMs::from(now);
        let mut rows = std::collections::BTreeMap::new();
        let waiting = Row {
            stage: Stage::Waiting,
            matched: created,
            finished: None,
        };
        for client in matcher.named() {
            rows.insert(client.clone(), waiting.clone());
        }
        let known = inventory.list(&[]).map_err(|e| ApiError::internal(&e))?;
        for store in known {
            if matcher.matches(&store.client_id, &store.labels) {
                rows.insert(store.client_id, waiting.clone());
            }
        }
        let id = CollectionId::new_random();
        let collection = Collection {
            spec: Spec {
                id,
                matcher,
                share,
                max_concurrent,
                compression,
                created_by: requester.operator.clone(),
                created_from: requester.from.to_string(),
                created,
                expires: UnixMs::from(expires),
                firing,
            },
            state: CollectionState::Open,
            rows,
        };
        let registry = &self.0.registry;
        self.0
            .book
            .create(collection, || {
                registry
                    .snapshot()
                    .into_iter()
                    .map(|(client, handle)| (client, handle.labels))
                    .collect()
            })
            .map_err(|e| ApiError::internal(&e))?;
        let summary = self.summary_here(id)?;
        tracing::info!(
            audit = true,
            collection_id = %id,
            schedule_id = firing.map(|f| f.schedule.to_string()),
            target = %summary.target,
            file = summary.file,
            matched = summary.counts.matched,
            operator = requester.operator,
            from = %requester.from,
            "collection created"
        );
        self.0.wake.notify_one();
        Ok(summary)
    }

    /// Runs `f` on a collection, live or from the store.
    fn read<T>(&self, id: CollectionId, f: impl FnOnce(&Collection) -> T) -> Result<T, ApiError> {
        match self.0.book.read(id, f) {
            Ok(Some(t)) => Ok(t),
            Ok(None) => Err(ApiError::new(
                ErrorCode::CollectionNotFound,
                format!("no collection {id}"),
            )),
            Err(e) => Err(ApiError::internal(
                &e.context(format!("reading collection {id}")),
            )),
        }
    }

    /// The summary with the progress known here (uploads this replica drives, and the records
    /// of the others).
    fn summary_here(&self, id: CollectionId) -> Result<CollectionSummary, ApiError> {
        self.read(id, |c| self.summarize(c, &view::Progress::default()))
    }

    /// `GET /collections/{id}`: the same on every replica (the progress of each running upload
    /// as the replica driving it sees it).
    pub async fn summary(&self, id: CollectionId) -> Result<CollectionSummary, ApiError> {
        let progress = self.progress(id).await?;
        self.read(id, |c| self.summarize(c, &progress))
    }

    /// `GET /collections`: the newest first.
    pub async fn list(&self, limit: usize) -> Result<Vec<CollectionSummary>, ApiError> {
        let ids = self
            .0
            .book
            .newest(limit)
            .map_err(|e| ApiError::internal(&e))?;
        let mut list = Vec::with_capacity(ids.len());
        for id in ids {
            // A collection that cannot be read is logged (by `read`) and left out.
            if let Ok(summary) = self.summary(id).await {
                list.push(summary);
            }
        }
        Ok(list)
    }

    /// `GET /collections/{id}/uploads`: rows by client id, after `after`.
    pub async fn rows(
        &self,
        id: CollectionId,
        after: Option<&ClientId>,
        limit: usize,
        only: RowFilter,
    ) -> Result<CollectionRows, ApiError> {
        let limit = limit.clamp(1, MAX_ROWS_PAGE);
        let progress = self.progress(id).await?;
        self.read(id, |c| {
            let mut page: Vec<CollectionRow> = c
                .rows
                .iter()
                .filter(|(client, _)| after.is_none_or(|a| *client > a))
                .map(|(client, row)| self.show_row(client, row, &progress))
                .filter(|row| only.keeps(row))
                .take(limit + 1)
                .collect();
            let next_after = (page.len() > limit).then(|| {
                page.truncate(limit);
                page[limit - 1].client_id.clone()
            });
            CollectionRows {
                rows: page,
                next_after,
            }
        })
    }

    /// The completed stores, for the manifest.
    pub fn completed(&self, id: CollectionId) -> Result<Vec<Completed>, ApiError> {
        self.read(id, |c| {
            c.rows
                .iter()
                .filter_map(|(client, row)| match &row.stage {
                    Stage::Completed {
                        upload,
                        key,
                        size,
                        sha256,
                    } => Some(Completed {
                        client_id: client.clone(),
                        upload_id: *upload,
                        key: key.clone(),
                        size: *size,
                        sha256: sha256.clone(),
                    }),
                    _ => None,
                })
                .collect()
        })
    }

    /// `DELETE /collections/{id}`: stores not asked yet are cancelled, and so are the uploads
    /// running (each aborting its multipart upload). Carried out by the replica that drives
    /// collections; while none does (the lease just moved), it waits up to three ticks for one.
    pub async fn cancel(
        &self,
        id: CollectionId,
        requester: &Requester,
    ) -> Result<CollectionSummary, ApiError> {
        if self.driving() {
            return self.cancel_here(id, requester).await;
        }
        let news = ToDriver::Cancel {
            collection_id: id,
            operator: requester.operator.clone(),
            from: requester.from,
        };
        // A replica that takes the lease drives from its next tick (one to two ticks after its
        // holder died, when the database saw the death at once): until then none answers.
        let handover = tokio::time::Instant::now() + 3 * driver::TICK;
        loop {
            match self.0.bus.ask_driver(&news).await? {
                Some(Reply::Collection { summary }) => return Ok(*summary),
                Some(Reply::Error { error }) => return Err(error.into()),
                Some(other) => return Err(crate::bus::command::unexpected(&other)),
                None if self.driving() => return self.cancel_here(id, requester).await,
                None if tokio::time::Instant::now() < handover => {
                    tokio::time::sleep(driver::TICK / 4).await;
                }
                None => {
                    return Err(ApiError::new(
                        ErrorCode::Timeout,
                        "no replica drives collections at this moment (one takes over within \
                         seconds); try again",
                    ));
                }
            }
        }
    }

    async fn cancel_here(
        &self,
        id: CollectionId,
        requester: &Requester,
    ) -> Result<CollectionSummary, ApiError> {
        let running = match self.0.book.cancel(id, UnixMs::now()) {
            Ok(running) => running,
            Err(CancelError::NotFound) => {
                return Err(ApiError::new(
                    ErrorCode::CollectionNotFound,
                    format!("no collection {id}"),
                ));
            }
            Err(CancelError::Finished(state)) => {
                return Err(ApiError::new(
                    ErrorCode::CollectionFinished,
                    format!("collection {id} is {state} and has nothing left to cancel"),
                ));
            }
            Err(CancelError::Store(e)) => return Err(ApiError::internal(&e)),
        };
        tracing::info!(
            audit = true,
            collection_id = %id,
            running = running.len(),
            operator = requester.operator,
            from = %requester.from,
            "collection cancelled"
        );
        let (bus, uploads) = (&self.0.bus, &self.0.uploads);
        let cancels = running.into_iter().map(|upload| async move {
            // One that finished meanwhile has its row already.
            let _ = crate::bus::command::cancel_via(bus, uploads, upload, requester).await;
        });
        futures::future::join_all(cancels).await;
        self.summary(id).await
    }

    /// Collections by state, and stores waiting in open ones, for `/metrics`.
    pub fn gauges(&self) -> (Vec<(String, u64)>, usize) {
        let by_state = self.0.book.count_by_state().unwrap_or_else(|e| {
            tracing::error!(error = format!("{e:#}"), "counting collections failed");
            Vec::new()
        });
        (by_state, self.0.book.waiting())
    }
}
