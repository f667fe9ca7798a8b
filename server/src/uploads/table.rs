//! The upload table: the only holder of its lock, and the one place where a change is saved.
//!
//! Every change goes through [`Table::apply`], which runs the state machine
//! ([`Upload::on`]) under the lock and writes the record through to the [`UploadStore`] when
//! [`Event::is_saved`] says so. Nothing outside this module sees the lock or the indexes. The lock
//! is a std `Mutex`, held for bookkeeping and the write-through only, never across an `.await`;
//! S3 calls and messages happen outside it, as effects.
//!
//! Unfinished uploads are held whole. A finished one is kept only as the status the API shows
//! (rendered once, when it finished, by the table's [`Render`]), without its part list, and at
//! most [`MAX_FINISHED_UPLOADS`] of them: memory for finished records is bounded whatever the
//! files' sizes. Older ones are read from the store.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use shared::api::UploadStatus;
use shared::{ClientId, FileName, UploadId};

use super::events::{Effect, Event, Refused};
use super::manifest::{self, Manifest};
use super::record::{Now, Stage, UnixMs, Upload};
use super::stored;
use crate::db::{LoadedRow, Saved, UploadStore};
use crate::registry::ConnId;

/// Finished uploads kept in memory for the status API; older ones are read from the store.
pub const MAX_FINISHED_UPLOADS: usize = 10_000;

/// How an upload is shown to operators (`status::of`, with the server's bucket).
pub type Render = Box<dyn Fn(&Upload) -> UploadStatus + Send + Sync>;

/// Where the status of each upload that finishes is sent, as it finishes (to the collections).
pub type Ended = tokio::sync::mpsc::UnboundedSender<UploadStatus>;

/// A finished upload as the table keeps it.
#[derive(Debug)]
struct Finished {
    client_id: ClientId,
    created: UnixMs,
    status: UploadStatus,
}

#[derive(Debug, Default)]
struct Index {
    /// Unfinished uploads.
    by_id: HashMap<UploadId, Upload>,
    /// At most one unfinished upload per client.
    active_by_client: HashMap<ClientId, UploadId>,
    latest_by_client: HashMap<ClientId, UploadId>,
    /// Finished uploads in memory, and the order they finished in, oldest first.
    finished: HashMap<UploadId, Finished>,
    finished_order: VecDeque<UploadId>,
    /// Stored records this release could not read. They are reported at start and kept out of
    /// every decision: above all, the orphan sweep never aborts their multipart uploads.
    unreadable: HashSet<UploadId>,
    /// The claim under which this replica holds each store it took on (`adopt`); its uploads
    /// are saved under it. A store missing here is saved under 0, as one server does.
    epochs: HashMap<ClientId, u64>,
}

impl Index {
    fn insert(&mut self, upload: Upload, render: &Render) {
        let (id, client) = (upload.id, upload.client_id.clone());
        self.latest_by_client.insert(client.clone(), id);
        if upload.stage.is_terminal() {
            self.keep_finished(&upload, render);
        } else {
            self.active_by_client.insert(client, id);
            self.by_id.insert(id, upload);
        }
    }

    /// An upload that just reached a terminal stage leaves the unfinished ones, for good.
    fn retire(&mut self, id: UploadId, render: &Render) {
        let Some(upload) = self.by_id.remove(&id) else {
            return;
        };
        if self.active_by_client.get(&upload.client_id) == Some(&id) {
            self.active_by_client.remove(&upload.client_id);
        }
        self.keep_finished(&upload, render);
    }

    /// Keeps a finished upload's status, forgetting the oldest beyond the bound.
    fn keep_finished(&mut self, upload: &Upload, render: &Render) {
        self.finished.insert(
            upload.id,
            Finished {
                client_id: upload.client_id.clone(),
                created: upload.created,
                status: render(upload),
            },
        );
        self.finished_order.push_back(upload.id);
        while self.finished_order.len() > MAX_FINISHED_UPLOADS {
            let Some(old) = self.finished_order.pop_front() else {
                break;
            };
            self.forget_finished(old);
        }
    }

    fn forget_finished(&mut self, id: UploadId) {
        if let Some(f) = self.finished.remove(&id)
            && self.latest_by_client.get(&f.client_id) == Some(&id)
        {
            self.latest_by_client.remove(&f.client_id);
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

/// Which unfinished uploads a table holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holding {
    /// Every one: the only server on its database loads them all at start.
    Everything,
    /// Those of the stores whose agents connected to this replica, taken on (`adopt`) when the
    /// agent arrives and let go (`release`) when another replica holds the store. Replicas
    /// sharing a database load none at start, so no two drive one upload.
    ConnectedStores,
}

pub struct Table {
    index: Mutex<Index>,
    store: Box<dyn UploadStore>,
    render: Render,
    ended: Option<Ended>,
    holding: Holding,
}

impl Table {
    /// Loads every unfinished upload and the most recent finished ones from `store`. A record
    /// that cannot be read is reported and set aside, never taken as absent.
    pub fn open(
        store: Box<dyn UploadStore>,
        render: Render,
        ended: Option<Ended>,
        holding: Holding,
    ) -> anyhow::Result<Self> {
        let mut index = Index::default();
        let now = Instant::now();
        for row in store.load_working_set(MAX_FINISHED_UPLOADS)? {
            match stored::from_row(&row, now) {
                Ok(upload)
                    if holding == Holding::ConnectedStores && !upload.stage.is_terminal() => {}
                Ok(upload) => index.insert(upload, &render),
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
            render,
            ended,
            holding,
        })
    }

    /// Takes on the unfinished uploads of `client_id` from the store (those not held already),
    /// when its agent connects to this replica. A table that holds everything has them.
    /// Returns the ids of those taken on now.
    pub fn adopt(&self, client_id: &ClientId, epoch: u64) -> anyhow::Result<Vec<UploadId>> {
        if self.holding == Holding::Everything {
            return Ok(Vec::new());
        }
        let rows = self.store.unfinished_for(client_id)?;
        let mut adopted = Vec::new();
        let now = Instant::now();
        let mut index = self.lock();
        // Claims only grow: a take-on that reads the store late never lowers a connection's.
        let held = index.epochs.entry(client_id.clone()).or_insert(epoch);
        *held = (*held).max(epoch);
        for row in rows {
            match stored::from_row(&row, now) {
                Ok(upload) if !index.by_id.contains_key(&upload.id) => {
                    tracing::info!(%client_id, upload_id = %upload.id, "taking on an unfinished upload");
                    adopted.push(upload.id);
                    index.insert(upload, &self.render);
                }
                Ok(_) => {}
                Err(err) => {
                    tracing::error!(upload_id = row.id, error = %err, "an upload record cannot be read; its multipart upload is left alone");
                    if let Ok(id) = UploadId::parse(&row.id) {
                        index.unreadable.insert(id);
                    }
                }
            }
        }
        Ok(adopted)
    }

    /// Lets go of `client_id`'s unfinished uploads, untouched, because another replica claimed
    /// the store under `epoch`, a later claim than this replica's; it reads them from the
    /// store. Returns their ids.
    pub fn release(&self, client_id: &ClientId, epoch: u64) -> Vec<UploadId> {
        if self.holding == Holding::Everything {
            return Vec::new();
        }
        let mut index = self.lock();
        if index
            .epochs
            .get(client_id)
            .is_some_and(|mine| *mine >= epoch)
        {
            return Vec::new();
        }
        index.epochs.remove(client_id);
        let Some(id) = index.active_by_client.remove(client_id) else {
            return Vec::new();
        };
        index.by_id.remove(&id);
        if index.latest_by_client.get(client_id) == Some(&id) {
            index.latest_by_client.remove(client_id);
        }
        vec![id]
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
            let old: HashSet<UploadId> = index
                .finished
                .iter()
                .filter(|(_, f)| f.created < cutoff)
                .map(|(id, _)| *id)
                .collect();
            index.finished_order.retain(|id| !old.contains(id));
            for id in old {
                index.forget_finished(id);
            }
        }
        self.store.delete_finished_before(cutoff.0)
    }

    /// Writes a record through to the store, under the claim `epoch` on its store. A failed
    /// write is logged: the upload goes on, and only a restart at that moment would lose the
    /// change. `Superseded` means another replica holds the store now.
    fn save(&self, upload: &Upload, epoch: u64) -> Saved {
        let row = match stored::to_row(upload) {
            Ok(row) => row,
            Err(err) => {
                tracing::error!(upload_id = %upload.id, error = %err, "serializing an upload failed");
                return Saved::Written;
            }
        };
        match self.store.save(&row, epoch) {
            Ok(Saved::Superseded) => return Saved::Superseded,
            Ok(Saved::Written) => {}
            Err(err) => {
                tracing::error!(upload_id = %upload.id, error = format!("{err:#}"), "saving an upload failed");
            }
        }
        if let Stage::Completed { transfer, .. } = &upload.stage
            && let Some(manifest) = Manifest::of(upload.id, transfer)
        {
            let finished = upload.finished.unwrap_or(upload.updated);
            // Lost, the manifest costs the next fetch its copies, nothing else.
            let saved = manifest::to_row(&upload.client_id, &upload.share, finished, &manifest)
                .map_err(anyhow::Error::from)
                .and_then(|row| self.store.save_manifest(&row));
            if let Err(err) = saved {
                tracing::error!(upload_id = %upload.id, error = format!("{err:#}"), "saving the part manifest failed");
            }
        }
        Saved::Written
    }

    /// The part manifest of the latest verified object of `client_id`'s `share`, if there is a
    /// usable one.
    pub fn manifest(&self, client_id: &ClientId, share: &FileName) -> Option<Manifest> {
        let row = self
            .store
            .manifest(client_id, share)
            .inspect_err(|err| tracing::error!(%client_id, %share, error = format!("{err:#}"), "reading the part manifest failed"))
            .ok()??;
        manifest::from_row(&row)
            .inspect_err(|err| tracing::warn!(%client_id, %share, error = %err, "a part manifest cannot be read; nothing is copied"))
            .ok()
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
        let epoch = index.epochs.get(&upload.client_id).copied().unwrap_or(0);
        // A new id: no other replica has saved it.
        self.save(&upload, epoch);
        index.insert(upload, &self.render);
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
            .ok_or(Refused("no such unfinished upload"))?;
        let effects = upload.on(event, Now::read())?;
        let epoch = index.epochs.get(&upload.client_id).copied().unwrap_or(0);
        if saved && self.save(upload, epoch) == Saved::Superseded {
            let client_id = upload.client_id.clone();
            tracing::warn!(%client_id, upload_id = %id, "another replica holds this store now; letting its upload go");
            index.by_id.remove(&id);
            if index.active_by_client.get(&client_id) == Some(&id) {
                index.active_by_client.remove(&client_id);
            }
            if index.latest_by_client.get(&client_id) == Some(&id) {
                index.latest_by_client.remove(&client_id);
            }
            return Err(Refused("another replica holds this upload now"));
        }
        if upload.stage.is_terminal() {
            index.retire(id, &self.render);
            if let (Some(ended), Some(f)) = (&self.ended, index.finished.get(&id)) {
                // The receiver is gone only at shutdown.
                let _ = ended.send(f.status.clone());
            }
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

    /// Reads an unfinished upload.
    pub fn read<T>(&self, id: UploadId, f: impl FnOnce(&Upload) -> T) -> Option<T> {
        self.lock().by_id.get(&id).map(f)
    }

    /// The client of an upload in memory, finished or not.
    pub fn client_of(&self, id: UploadId) -> Option<ClientId> {
        let index = self.lock();
        index
            .by_id
            .get(&id)
            .map(|u| u.client_id.clone())
            .or_else(|| index.finished.get(&id).map(|f| f.client_id.clone()))
    }

    /// An upload's status, from memory or else from the store. `Ok(None)` if there is no such
    /// upload; `Err` if its record exists but cannot be read (or the store failed).
    pub fn status(&self, id: UploadId) -> Result<Option<UploadStatus>, Unreadable> {
        {
            let index = self.lock();
            if let Some(upload) = index.by_id.get(&id) {
                return Ok(Some((self.render)(upload)));
            }
            if let Some(f) = index.finished.get(&id) {
                return Ok(Some(f.status.clone()));
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
            Ok(upload) => Ok(Some((self.render)(&upload))),
            Err(err) => {
                tracing::error!(upload_id = %id, error = %err, "an upload record cannot be read");
                Err(Unreadable)
            }
        }
    }

    /// The status of the newest upload of `client_id`, from memory or else from the store.
    pub fn latest_status(&self, client_id: &ClientId) -> Option<UploadStatus> {
        {
            let index = self.lock();
            if let Some(id) = index.latest_by_client.get(client_id) {
                if let Some(upload) = index.by_id.get(id) {
                    return Some((self.render)(upload));
                }
                if let Some(f) = index.finished.get(id) {
                    return Some(f.status.clone());
                }
            }
        }
        self.recent_statuses(client_id, 1).into_iter().next()
    }

    /// The statuses of the newest `limit` uploads of `client_id`, newest first: unfinished ones
    /// as they are in memory, the others as stored. A record that cannot be read is left out
    /// (and logged).
    pub fn recent_statuses(&self, client_id: &ClientId, limit: usize) -> Vec<UploadStatus> {
        let rows = match self.store.recent_for(client_id, limit) {
            Ok(rows) => rows,
            Err(err) => {
                tracing::error!(%client_id, error = format!("{err:#}"), "reading uploads failed");
                return Vec::new();
            }
        };
        rows.into_iter()
            .filter_map(|row| {
                if let Ok(id) = UploadId::parse(&row.id) {
                    let index = self.lock();
                    if let Some(upload) = index.by_id.get(&id) {
                        return Some((self.render)(upload));
                    }
                    if let Some(f) = index.finished.get(&id) {
                        return Some(f.status.clone());
                    }
                }
                self.load(Ok(Some(row))).map(|u| (self.render)(&u))
            })
            .collect()
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

    /// The stores with unfinished uploads in the store (the database), read errors logged.
    pub fn unfinished_clients(&self) -> Vec<ClientId> {
        self.store
            .unfinished_clients()
            .inspect_err(|err| {
                tracing::error!(
                    error = format!("{err:#}"),
                    "listing unfinished uploads failed"
                )
            })
            .unwrap_or_default()
    }

    /// Whether the upload `id` owns the multipart upload `s3_upload_id`: as held here, or, for
    /// a replica, as the database records it (another replica may drive it). A record that
    /// cannot be read, or a database that does not answer, counts as owning it.
    pub fn owns_multipart(&self, id: UploadId, s3_upload_id: &str) -> bool {
        if let Some(owned) = self.read(id, |u| u.owns_multipart(s3_upload_id)) {
            return owned;
        }
        if self.holding == Holding::Everything {
            return false;
        }
        match self.store.get(id) {
            Ok(Some(row)) => stored::from_row(&row, Instant::now())
                .map(|u| u.owns_multipart(s3_upload_id))
                .unwrap_or(true),
            Ok(None) => false,
            Err(err) => {
                tracing::warn!(upload_id = %id, error = format!("{err:#}"), "cannot tell who owns a multipart upload; leaving it");
                true
            }
        }
    }

    /// Whether the upload is unfinished and driven here.
    pub fn holds(&self, id: UploadId) -> bool {
        self.lock().by_id.contains_key(&id)
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
