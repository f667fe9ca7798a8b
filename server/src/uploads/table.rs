//! The upload table: the only holder of its lock, and the one place where a change is saved.
//!
//! Every change goes through [`Table::apply`], which runs the state machine
//! ([`Upload::on`]) under the lock and writes the record through to the [`UploadStore`] when
//! [`Event::is_saved`] says so. Nothing outside this module sees the lock or the indexes. The lock
//! is a std `Mutex`, held for bookkeeping and the write-through only, never across an `.await`;
//! S3 calls and messages happen outside it, as effects.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use shared::{ClientId, UploadId};

use super::events::{Effect, Event, Refused};
use super::record::{Now, UnixMs, Upload};
use super::stored;
use crate::db::{LoadedRow, UploadStore};
use crate::registry::ConnId;

/// Finished uploads kept in memory for the status API; older ones are read from the store.
pub const MAX_FINISHED_UPLOADS: usize = 10_000;

#[derive(Debug, Default)]
struct Index {
    by_id: HashMap<UploadId, Upload>,
    /// At most one unfinished upload per client.
    active_by_client: HashMap<ClientId, UploadId>,
    latest_by_client: HashMap<ClientId, UploadId>,
    /// Terminal uploads in memory, oldest first.
    finished: VecDeque<UploadId>,
    /// Stored records this release could not read. They are reported at start and kept out of
    /// every decision: above all, the orphan sweep never aborts their multipart uploads.
    unreadable: HashSet<UploadId>,
}

impl Index {
    fn insert(&mut self, upload: Upload) {
        let (id, client) = (upload.id, upload.client_id.clone());
        if upload.stage.is_terminal() {
            self.finished.push_back(id);
        } else {
            self.active_by_client.insert(client.clone(), id);
        }
        self.latest_by_client.insert(client, id);
        self.by_id.insert(id, upload);
    }

    /// Bookkeeping for an upload that just reached a terminal stage.
    fn retire(&mut self, id: UploadId, client_id: &ClientId) {
        if self.active_by_client.get(client_id) == Some(&id) {
            self.active_by_client.remove(client_id);
        }
        self.finished.push_back(id);
        while self.finished.len() > MAX_FINISHED_UPLOADS {
            let Some(old) = self.finished.pop_front() else {
                break;
            };
            if let Some(r) = self.by_id.remove(&old)
                && self.latest_by_client.get(&r.client_id) == Some(&old)
            {
                self.latest_by_client.remove(&r.client_id);
            }
        }
    }
}

/// An upload whose record exists but cannot be read (or could not be fetched): it is reported,
/// never taken as absent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unreadable;

/// Why a new upload was not created.
#[derive(Debug)]
pub enum CreateError<E> {
    /// The client has an unfinished upload already.
    Busy(UploadId),
    /// The caller's own check refused it.
    Refused(E),
}

pub struct Table {
    index: Mutex<Index>,
    store: Box<dyn UploadStore>,
}

impl Table {
    /// Loads every unfinished upload and the most recent finished ones from `store`. A record
    /// that cannot be read is reported and set aside, never taken as absent.
    pub fn open(store: Box<dyn UploadStore>) -> anyhow::Result<Self> {
        let mut index = Index::default();
        let now = Instant::now();
        for row in store.load_working_set(MAX_FINISHED_UPLOADS)? {
            match stored::from_row(&row, now) {
                Ok(upload) => index.insert(upload),
                Err(err) => {
                    tracing::error!(
                        upload_id = row.id,
                        format = row.format,
                        error = %err,
                        "an upload record cannot be read; its multipart upload is left alone"
                    );
                    if let Ok(id) = UploadId::parse(&row.id) {
                        index.unreadable.insert(id);
                    }
                }
            }
        }
        Ok(Self {
            index: Mutex::new(index),
            store,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Index> {
        // Each critical section leaves the index consistent before anything can panic.
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets the finished uploads created before `cutoff`, in memory and in the store.
    /// Unfinished uploads stay, however old. Returns how many records the store deleted.
    pub fn forget_finished_before(&self, cutoff: UnixMs) -> anyhow::Result<usize> {
        {
            let mut index = self.lock();
            let Index {
                by_id,
                finished,
                latest_by_client,
                ..
            } = &mut *index;
            finished.retain(|id| {
                let old = by_id.get(id).is_some_and(|u| u.created < cutoff);
                if old
                    && let Some(u) = by_id.remove(id)
                    && latest_by_client.get(&u.client_id) == Some(id)
                {
                    latest_by_client.remove(&u.client_id);
                }
                !old
            });
        }
        self.store.delete_finished_before(cutoff.0)
    }

    /// Writes a record through to the store. A failed write is logged: the upload goes on, and
    /// only a restart at that moment would lose the change.
    fn save(&self, upload: &Upload) {
        let row = match stored::to_row(upload) {
            Ok(row) => row,
            Err(err) => {
                tracing::error!(upload_id = %upload.id, error = %err, "serializing an upload failed");
                return;
            }
        };
        if let Err(err) = self.store.save(&row) {
            tracing::error!(upload_id = %upload.id, error = format!("{err:#}"), "saving an upload failed");
        }
    }

    /// Adds a new upload unless its client has an unfinished one. `admit` runs under the lock
    /// once the client is known to be free (it sends the first message, so that two triggers
    /// cannot both reach the agent); if it fails, nothing is recorded.
    pub fn create<E>(
        &self,
        upload: Upload,
        admit: impl FnOnce(&Upload) -> Result<(), E>,
    ) -> Result<(), CreateError<E>> {
        let mut index = self.lock();
        if let Some(active) = index.active_by_client.get(&upload.client_id) {
            return Err(CreateError::Busy(*active));
        }
        admit(&upload).map_err(CreateError::Refused)?;
        self.save(&upload);
        index.insert(upload);
        Ok(())
    }

    /// Runs `event` through the upload's state machine, saves by the rule of
    /// [`Event::is_saved`], and returns the effects to carry out.
    pub fn apply(&self, id: UploadId, event: Event) -> Result<Vec<Effect>, Refused> {
        let saved = event.is_saved();
        let mut index = self.lock();
        let index = &mut *index;
        let upload = index
            .by_id
            .get_mut(&id)
            .ok_or(Refused("no such upload in memory"))?;
        let effects = upload.on(event, Now::read())?;
        if saved {
            self.save(upload);
        }
        if upload.stage.is_terminal() {
            let client_id = upload.client_id.clone();
            index.retire(id, &client_id);
        }
        Ok(effects)
    }

    /// Applies `event` to the unfinished upload of `client_id`, if it has one.
    pub fn apply_to_client(
        &self,
        client_id: &ClientId,
        event: Event,
    ) -> Option<(UploadId, Result<Vec<Effect>, Refused>)> {
        let id = self.active_for(client_id)?;
        Some((id, self.apply(id, event)))
    }

    /// The unfinished uploads `conn` may act on.
    pub fn held_by(&self, conn: ConnId) -> Vec<UploadId> {
        self.lock()
            .by_id
            .values()
            .filter(|u| u.live.conn == Some(conn))
            .map(|u| u.id)
            .collect()
    }

    /// Reads an upload held in memory.
    pub fn read<T>(&self, id: UploadId, f: impl FnOnce(&Upload) -> T) -> Option<T> {
        self.lock().by_id.get(&id).map(f)
    }

    /// Reads an upload from memory, or else from the store. `Ok(None)` if there is no such
    /// upload; `Err` if its record exists but cannot be read (or the store failed).
    pub fn read_or_load<T>(
        &self,
        id: UploadId,
        f: impl FnOnce(&Upload) -> T,
    ) -> Result<Option<T>, Unreadable> {
        {
            let index = self.lock();
            if let Some(upload) = index.by_id.get(&id) {
                return Ok(Some(f(upload)));
            }
            if index.unreadable.contains(&id) {
                return Err(Unreadable);
            }
        }
        let row = self.store.get(id).map_err(|err| {
            tracing::error!(upload_id = %id, error = format!("{err:#}"), "reading an upload failed");
            Unreadable
        })?;
        let Some(row) = row else {
            return Ok(None);
        };
        match stored::from_row(&row, Instant::now()) {
            Ok(upload) => Ok(Some(f(&upload))),
            Err(err) => {
                tracing::error!(upload_id = %id, error = %err, "an upload record cannot be read");
                Err(Unreadable)
            }
        }
    }

    /// Reads the newest upload of `client_id`, from memory or else from the store.
    pub fn read_latest<T>(&self, client_id: &ClientId, f: impl FnOnce(&Upload) -> T) -> Option<T> {
        {
            let index = self.lock();
            if let Some(upload) = index
                .latest_by_client
                .get(client_id)
                .and_then(|id| index.by_id.get(id))
            {
                return Some(f(upload));
            }
        }
        self.load(self.store.latest_for(client_id)).map(|u| f(&u))
    }

    /// Calls `f` on every unfinished upload, under the lock; `f` must not block.
    pub fn each_unfinished<T>(&self, mut f: impl FnMut(&Upload) -> Option<T>) -> Vec<T> {
        let index = self.lock();
        index
            .active_by_client
            .values()
            .filter_map(|id| index.by_id.get(id))
            .filter_map(&mut f)
            .collect()
    }

    pub fn active_for(&self, client_id: &ClientId) -> Option<UploadId> {
        self.lock().active_by_client.get(client_id).copied()
    }

    pub fn is_unreadable(&self, id: UploadId) -> bool {
        self.lock().unreadable.contains(&id)
    }

    pub fn unfinished_count(&self) -> usize {
        self.lock().active_by_client.len()
    }

    /// A finished upload that is no longer in memory, from the store.
    fn load(&self, row: anyhow::Result<Option<LoadedRow>>) -> Option<Upload> {
        let row = row
            .map_err(|err| tracing::error!(error = format!("{err:#}"), "reading an upload failed"))
            .ok()??;
        stored::from_row(&row, Instant::now())
            .map_err(|err| tracing::error!(upload_id = row.id, error = %err, "an upload record cannot be read"))
            .ok()
    }
}
