//! The book of live collections: the only holder of their lock, and the one place where a
//! change is saved.
//!
//! A collection is live while it is open or has a store waiting or running; it is then held
//! whole in memory. Once it can no longer change it leaves the book, and is read from the store
//! when asked for. Every change is written through to the [`Store`] under the lock, before it is
//! acted on: a store is marked `running`, with its upload's id, before it is asked, so a restart
//! in between cannot ask it twice.
//!
//! Only the replica that drives collections holds them live ([`Role::Driving`]); the book of
//! every other replica follows: it writes new collections to the store, for the driver to
//! adopt, and reads the rest from the store, which the driver writes through.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use shared::api::UploadStatus;
use shared::api::collections::CollectionState;
use shared::encoding::Compression;
use shared::labels::Labels;
use shared::{ClientId, CollectionId, FileName, ScheduleId, UploadId};

use super::record::{Collection, Row, Stage};
use super::store::Store;
use crate::uploads::UnixMs;

/// A store the dispatcher is to ask now, already recorded as running.
#[derive(Debug, Clone)]
pub struct Planned {
    pub collection: CollectionId,
    pub client_id: ClientId,
    pub upload: UploadId,
    pub share: FileName,
    pub compression: Compression,
    pub created_by: String,
    pub created_from: String,
}

/// Why a collection could not be cancelled.
#[derive(Debug)]
pub enum CancelError {
    NotFound,
    /// Nothing in it is left to cancel.
    Finished(CollectionState),
    Store(anyhow::Error),
}

/// Whether this replica drives the collections, and then the live ones.
enum Role {
    Following,
    Driving(HashMap<CollectionId, Collection>),
}

pub struct Book {
    role: Mutex<Role>,
    /// Whether the role is [`Role::Driving`], for those who wait for it to change; written
    /// under the role's lock.
    driving: tokio::sync::watch::Sender<bool>,
    store: Store,
}

/// The live collections when driving; nothing to change when following.
fn live(role: &mut Role) -> Option<&mut HashMap<CollectionId, Collection>> {
    match role {
        Role::Driving(live) => Some(live),
        Role::Following => None,
    }
}

impl Book {
    /// A book on `store` that follows until [`Book::drive`].
    pub fn open(store: Store) -> Self {
        Self {
            role: Mutex::new(Role::Following),
            driving: tokio::sync::watch::Sender::new(false),
            store,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Role> {
        self.role.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether this book holds the live collections.
    pub fn driving(&self) -> bool {
        matches!(*self.lock(), Role::Driving(_))
    }

    /// Follows [`Book::driving`] as it changes.
    pub fn watch_driving(&self) -> tokio::sync::watch::Receiver<bool> {
        self.driving.subscribe()
    }

    /// Takes the live collections from the store, to drive them. Returns whether the book was
    /// following until now.
    pub fn drive(&self) -> anyhow::Result<bool> {
        let mut role = self.lock();
        if matches!(*role, Role::Driving(_)) {
            return Ok(false);
        }
        let live = self
            .store
            .load_live()?
            .into_iter()
            .map(|c| (c.spec.id, c))
            .collect();
        *role = Role::Driving(live);
        self.driving.send_replace(true);
        Ok(true)
    }

    /// Lets the live collections go: another replica drives them now.
    pub fn follow(&self) {
        let mut role = self.lock();
        *role = Role::Following;
        self.driving
            .send_if_modified(|d| std::mem::replace(d, false));
    }

    /// When driving, takes on the open collections that other replicas created in the store.
    pub fn adopt_new(&self) -> anyhow::Result<usize> {
        let mut role = self.lock();
        let Some(live) = live(&mut role) else {
            return Ok(0);
        };
        let mut adopted = 0;
        for id in self.store.open_ids()? {
            if live.contains_key(&id) {
                continue;
            }
            if let Some(c) = self.store.load(id)?
                && c.is_live()
            {
                live.insert(id, c);
                adopted += 1;
            }
        }
        Ok(adopted)
    }

    /// Records a new collection. `connected` lists the agents connected now; it is read under
    /// the lock, after which every agent that says hello finds the collection in the book, so
    /// no store that connects meanwhile is missed. A following book only stores it: the driver
    /// adopts it from there.
    pub fn create(
        &self,
        mut c: Collection,
        connected: impl FnOnce() -> Vec<(ClientId, Labels)>,
    ) -> anyhow::Result<()> {
        let mut role = self.lock();
        for (client, labels) in connected() {
            if c.spec.matcher.matches(&client, &labels) {
                c.rows.entry(client).or_insert(Row {
                    stage: Stage::Waiting,
                    matched: c.spec.created,
                    finished: None,
                });
            }
        }
        self.store.insert(&c)?;
        if let Some(live) = live(&mut role) {
            live.insert(c.spec.id, c);
        }
        Ok(())
    }

    /// A store said hello: every open collection it matches and has not met yet gains it.
    /// Returns whether it is waiting in any collection now.
    pub fn store_connected(&self, client: &ClientId, labels: &Labels, now: UnixMs) -> bool {
        let mut role = self.lock();
        let Some(live) = live(&mut role) else {
            return false;
        };
        let mut waiting = false;
        for c in live.values_mut() {
            if c.state != CollectionState::Open {
                continue;
            }
            if let Some(row) = c.rows.get(client) {
                waiting |= row.stage == Stage::Waiting;
                continue;
            }
            if !c.spec.matcher.matches(client, labels) {
                continue;
            }
            let row = Row {
                stage: Stage::Waiting,
                matched: now,
                finished: None,
            };
            if let Err(e) = self.store.save_rows(c.spec.id, [(client, &row)]) {
                tracing::error!(collection_id = %c.spec.id, %client, error = format!("{e:#}"), "could not add a store to a collection");
                continue;
            }
            tracing::info!(collection_id = %c.spec.id, %client, "a store that connected joins a collection");
            c.rows.insert(client.clone(), row);
            waiting = true;
        }
        waiting
    }

    /// Chooses the stores to ask now: in each open collection, waiting stores that `can_ask`
    /// allows, up to its free slots. Each is saved as running, with a new upload id, before it
    /// is returned.
    pub fn plan(&self, can_ask: impl Fn(&ClientId) -> bool) -> Vec<Planned> {
        let mut role = self.lock();
        let Some(live) = live(&mut role) else {
            return Vec::new();
        };
        let mut collections: Vec<&mut Collection> = live
            .values_mut()
            .filter(|c| c.state == CollectionState::Open)
            .collect();
        collections.sort_by_key(|c| c.spec.created);
        let mut planned = Vec::new();
        for c in collections {
            let slots = (c.spec.max_concurrent as usize).saturating_sub(c.running());
            if slots == 0 {
                continue;
            }
            let chosen: Vec<ClientId> = c
                .rows
                .iter()
                .filter(|(client, row)| row.stage == Stage::Waiting && can_ask(client))
                .take(slots)
                .map(|(client, _)| client.clone())
                .collect();
            if chosen.is_empty() {
                continue;
            }
            let rows: Vec<(ClientId, Row)> = chosen
                .into_iter()
                .map(|client| {
                    let mut row = c.rows[&client].clone();
                    row.stage = Stage::Running {
                        upload: UploadId::new_random(),
                    };
                    (client, row)
                })
                .collect();
            if let Err(e) = self
                .store
                .save_rows(c.spec.id, rows.iter().map(|(k, r)| (k, r)))
            {
                tracing::error!(collection_id = %c.spec.id, error = format!("{e:#}"), "could not record the stores to ask; asking none");
                continue;
            }
            for (client, row) in rows {
                let Some(upload) = row.stage.upload() else {
                    continue;
                };
                planned.push(Planned {
                    collection: c.spec.id,
                    client_id: client.clone(),
                    upload,
                    share: c.spec.share.clone(),
                    compression: c.spec.compression,
                    created_by: c.spec.created_by.clone(),
                    created_from: c.spec.created_from.clone(),
                });
                c.rows.insert(client, row);
            }
        }
        planned
    }

    /// A planned store could not be asked (it left, or is busy): it waits again.
    pub fn unask(&self, p: &Planned) {
        self.update(p.collection, &p.client_id, |row| {
            (row.stage == Stage::Running { upload: p.upload }).then(|| Row {
                stage: Stage::Waiting,
                ..row.clone()
            })
        });
    }

    /// An upload ended; if a collection asked for it, its store's row says how.
    pub fn upload_ended(&self, status: &UploadStatus, now: UnixMs) {
        let Some(collection) = status.collection_id else {
            return;
        };
        self.update(collection, &status.client_id, |row| {
            if row.stage
                != (Stage::Running {
                    upload: status.upload_id,
                })
            {
                return None;
            }
            Some(Row {
                stage: ended_stage(status)?,
                finished: Some(now),
                ..row.clone()
            })
        });
    }

    /// The store a running upload belongs to has no such upload: it was never asked (the
    /// server stopped between recording and asking), so it waits again.
    pub fn never_asked(&self, collection: CollectionId, client: &ClientId, upload: UploadId) {
        self.update(collection, client, |row| {
            (row.stage == Stage::Running { upload }).then(|| Row {
                stage: Stage::Waiting,
                ..row.clone()
            })
        });
    }

    /// Changes one row if `change` says so, saving it, and lets a collection that can no
    /// longer change leave the book.
    fn update(
        &self,
        collection: CollectionId,
        client: &ClientId,
        change: impl FnOnce(&Row) -> Option<Row>,
    ) {
        let mut role = self.lock();
        let Some(live) = live(&mut role) else {
            return;
        };
        let Some(c) = live.get_mut(&collection) else {
            return;
        };
        let Some(new) = c.rows.get(client).and_then(change) else {
            return;
        };
        if let Err(e) = self.store.save_rows(collection, [(client, &new)]) {
            tracing::error!(collection_id = %collection, %client, error = format!("{e:#}"), "saving a collection row failed");
        }
        c.rows.insert(client.clone(), new);
        if !c.is_live() {
            live.remove(&collection);
        }
    }

    /// Open collections past their expiry expire: stores still waiting are `not_reached`.
    /// Uploads already running go on.
    pub fn expire(&self, now: UnixMs) {
        let mut role = self.lock();
        let Some(live) = live(&mut role) else {
            return;
        };
        let due: Vec<CollectionId> = live
            .values()
            .filter(|c| c.state == CollectionState::Open && c.spec.expires <= now)
            .map(|c| c.spec.id)
            .collect();
        for id in due {
            let Some(c) = live.get_mut(&id) else { continue };
            let reached = end_waiting(c, Stage::NotReached, now);
            if let Err(e) = self
                .store
                .save_rows(id, reached.iter().map(|k| (k, &c.rows[k])))
                .and_then(|()| self.store.set_state(id, CollectionState::Expired))
            {
                tracing::error!(collection_id = %id, error = format!("{e:#}"), "saving an expiry failed");
            }
            c.state = CollectionState::Expired;
            tracing::info!(collection_id = %id, not_reached = reached.len(), "collection expired");
            if !c.is_live() {
                live.remove(&id);
            }
        }
    }

    /// Cancels a collection: waiting stores are cancelled at once; the uploads running are
    /// returned, for the caller to cancel (their rows follow when they end).
    pub fn cancel(&self, id: CollectionId, now: UnixMs) -> Result<Vec<UploadId>, CancelError> {
        let mut role = self.lock();
        let Some(c) = live(&mut role).and_then(|live| live.get_mut(&id)) else {
            return match self.store.load(id) {
                Ok(Some(c)) => Err(CancelError::Finished(c.state)),
                Ok(None) => Err(CancelError::NotFound),
                Err(e) => Err(CancelError::Store(e)),
            };
        };
        let cancelled = end_waiting(c, Stage::Cancelled { upload: None }, now);
        self.store
            .save_rows(id, cancelled.iter().map(|k| (k, &c.rows[k])))
            .and_then(|()| self.store.set_state(id, CollectionState::Cancelled))
            .map_err(CancelError::Store)?;
        c.state = CollectionState::Cancelled;
        let running = c
            .rows
            .values()
            .filter_map(|r| match r.stage {
                Stage::Running { upload } => Some(upload),
                _ => None,
            })
            .collect();
        if !c.is_live()
            && let Some(live) = live(&mut role)
        {
            live.remove(&id);
        }
        Ok(running)
    }

    /// Runs `f` on a collection: a live one under the lock (`f` must not block), any other as
    /// the store has it. `None` if there is no such collection.
    pub fn read<T>(
        &self,
        id: CollectionId,
        f: impl FnOnce(&Collection) -> T,
    ) -> anyhow::Result<Option<T>> {
        {
            let mut role = self.lock();
            if let Some(c) = live(&mut role).and_then(|live| live.get(&id)) {
                return Ok(Some(f(c)));
            }
        }
        Ok(self.store.load(id)?.map(|c| f(&c)))
    }

    /// Every running store of the live collections.
    pub fn running(&self) -> Vec<(CollectionId, ClientId, UploadId)> {
        let mut role = self.lock();
        let Some(live) = live(&mut role) else {
            return Vec::new();
        };
        live.values()
            .flat_map(|c| {
                c.rows.iter().filter_map(|(client, r)| match r.stage {
                    Stage::Running { upload } => Some((c.spec.id, client.clone(), upload)),
                    _ => None,
                })
            })
            .collect()
    }

    /// Stores waiting in open collections, for `/metrics`.
    pub fn waiting(&self) -> usize {
        let mut role = self.lock();
        let Some(live) = live(&mut role) else {
            return 0;
        };
        live.values()
            .filter(|c| c.state == CollectionState::Open)
            .flat_map(|c| c.rows.values())
            .filter(|r| r.stage == Stage::Waiting)
            .count()
    }

    pub fn fired_since(&self, schedule: ScheduleId, at: UnixMs) -> anyhow::Result<bool> {
        self.store.fired_since(schedule, at)
    }

    pub fn newest(&self, limit: usize) -> anyhow::Result<Vec<CollectionId>> {
        self.store.newest(limit)
    }

    pub fn count_by_state(&self) -> anyhow::Result<Vec<(String, u64)>> {
        self.store.count_by_state()
    }
}

/// Ends every waiting row of `c` as `stage`; returns their stores.
fn end_waiting(c: &mut Collection, stage: Stage, now: UnixMs) -> Vec<ClientId> {
    let mut ended = Vec::new();
    for (client, row) in c.rows.iter_mut() {
        if row.stage == Stage::Waiting {
            row.stage = stage.clone();
            row.finished = Some(now);
            ended.push(client.clone());
        }
    }
    ended
}

/// The final stage of a store whose upload ended with `status`.
fn ended_stage(status: &UploadStatus) -> Option<Stage> {
    use shared::api::UploadState;
    let upload = status.upload_id;
    Some(match status.state {
        UploadState::Completed => Stage::Completed {
            upload,
            key: status.key.clone()?,
            size: status.size?,
            sha256: status.sha256.clone(),
        },
        UploadState::Failed => Stage::Failed {
            upload,
            error: status.error.clone().unwrap_or(shared::api::ErrorDetail {
                code: shared::ErrorCode::Internal,
                message: "the upload failed without a reason".into(),
            }),
        },
        UploadState::Cancelled => Stage::Cancelled {
            upload: Some(upload),
        },
        UploadState::Requested | UploadState::Uploading | UploadState::Verifying => return None,
    })
}

#[cfg(test)]
mod tests;
