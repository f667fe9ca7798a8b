//! Driving the collections: the dispatcher that asks their stores, on the one replica that
//! holds the `Collections` lease (always, for one server), and what that replica hears from
//! the others.
//!
//! The driver asks a store connected here through this replica's uploads, and one connected
//! elsewhere through its holder ([`Command::Ask`]). Endings of uploads driven elsewhere reach it
//! as [`ToDriver::Ended`]; one lost on the way is found by [`Collections::settle`], which reads
//! the upload records of the running stores every [`SETTLE_EVERY`] ticks.

use std::time::Duration;

use futures::StreamExt;
use shared::ErrorCode;
use shared::api::UploadStatus;
use tokio::sync::mpsc;

use super::Collections;
use super::book::Planned;
use crate::bus::lease::{Leases, Singleton};
use crate::bus::{Command, Reply, ToDriver};
use crate::error::ApiError;
use crate::registry::AgentLink;
use crate::uploads::{Ask, Requester, UnixMs};

/// How often the dispatcher looks for expiries, and for the lease, even when nothing woke it.
pub(super) const TICK: Duration = Duration::from_secs(1);
/// Every this many ticks, the driver settles running stores from their upload records.
const SETTLE_EVERY: u32 = 5;
/// How many stores held elsewhere are asked at once.
const ASKED_AT_ONCE: usize = 16;

impl Collections {
    /// Takes the driver's role when this replica holds the lease (loading the live collections
    /// and settling what the previous driver left), lets it go when another replica holds it,
    /// and, driving, adopts the collections other replicas created.
    pub fn lead(&self, leases: &Leases) {
        let book = &self.0.book;
        if !leases.holds(Singleton::Collections) {
            if book.driving() {
                tracing::warn!("another replica drives the collections now");
                book.follow();
            }
            return;
        }
        match book.drive() {
            Ok(true) => {
                tracing::info!("this replica drives the collections");
                self.settle();
                self.0.wake.notify_one();
            }
            Ok(false) => match book.adopt_new() {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(adopted = n, "collections created on other replicas");
                    self.0.wake.notify_one();
                }
                Err(e) => {
                    tracing::error!(
                        error = format!("{e:#}"),
                        "looking for new collections failed"
                    )
                }
            },
            Err(e) => {
                tracing::error!(
                    error = format!("{e:#}"),
                    "the collections could not be loaded; not driving them"
                )
            }
        }
    }

    /// Settles running stores from their upload records: one whose upload ended is given its
    /// outcome; one whose upload does not exist was never asked (the driver stopped between
    /// recording and asking), and waits again.
    pub fn settle(&self) {
        for (collection, client, upload) in self.0.book.running() {
            match self.0.uploads.status(upload) {
                Ok(status) if status.state.is_terminal() => {
                    self.0.book.upload_ended(&status, UnixMs::now());
                }
                Ok(_) => {}
                Err(e) if e.code() == ErrorCode::UploadNotFound => {
                    tracing::info!(%collection, %client, %upload, "a store recorded as asked never was; it waits again");
                    self.0.book.never_asked(collection, &client, upload);
                }
                Err(_) => {
                    tracing::error!(%collection, %client, %upload, "the upload of a collection's store cannot be read; the store is left as running");
                }
            }
        }
    }

    /// The dispatcher: leads or follows, asks waiting stores as slots free up, applies upload
    /// endings and expiries, until shutdown. A follower passes the endings of its uploads on
    /// to the driver.
    pub async fn run(
        self,
        state: crate::AppState,
        mut ended: mpsc::UnboundedReceiver<UploadStatus>,
    ) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks = 0u32;
        loop {
            tokio::select! {
                () = state.shutdown.cancelled() => break,
                got = ended.recv() => {
                    let Some(status) = got else { break };
                    self.upload_ended(status);
                    // Endings arrive in bursts: take them all before one pass.
                    while let Ok(status) = ended.try_recv() {
                        self.upload_ended(status);
                    }
                }
                () = self.0.wake.notified() => {}
                _ = tick.tick() => {
                    self.lead(&state.leases);
                    ticks = ticks.wrapping_add(1);
                    if self.driving() && ticks.is_multiple_of(SETTLE_EVERY) {
                        self.settle();
                    }
                    self.0.book.expire(UnixMs::now());
                }
            }
            self.dispatch().await;
        }
    }

    /// An upload of this replica ended: the driver's book notes it, wherever that is.
    fn upload_ended(&self, status: UploadStatus) {
        if self.driving() {
            self.0.book.upload_ended(&status, UnixMs::now());
        } else if status.collection_id.is_some() {
            let news = ToDriver::Ended {
                status: Box::new(status),
            };
            self.0.bus.tell_driver(news, &self.0.tracker);
        }
    }

    /// Asks every store the book plans for; one that cannot be asked now waits again.
    async fn dispatch(&self) {
        let (uploads, registry, bus) = (&self.0.uploads, &self.0.registry, &self.0.bus);
        let planned = self.0.book.plan(|client| {
            if registry.connection(client).is_some() {
                uploads.active_for(client).is_none()
            } else {
                // Whether it is busy there, its holder says when asked.
                bus.connected_elsewhere(client)
            }
        });
        futures::stream::iter(planned)
            .for_each_concurrent(ASKED_AT_ONCE, |p| self.ask(p))
            .await;
    }

    /// Asks one planned store, here or through the replica that holds it.
    async fn ask(&self, p: Planned) {
        let requester = Requester::recorded(p.created_by.clone(), &p.created_from);
        let asked = if self.0.registry.connection(&p.client_id).is_some() {
            let ask = Ask {
                id: p.upload,
                client_id: p.client_id.clone(),
                share: p.share.clone(),
                collection: Some(p.collection),
                compression: p.compression,
            };
            self.0.uploads.ask(ask, &requester).map(|_| ())
        } else {
            match self.ask_elsewhere(&p, requester).await {
                Some(asked) => asked,
                // Whether it was asked is unknown: it stays running, and `settle` finds out.
                None => return,
            }
        };
        if let Err(e) = asked {
            tracing::info!(collection_id = %p.collection, client_id = %p.client_id, code = %e.code(), "a store could not be asked now; it waits");
            self.0.book.unask(&p);
        }
    }

    /// Asks a store through its holder; `None` if the holder took the command but its answer
    /// was lost.
    async fn ask_elsewhere(
        &self,
        p: &Planned,
        requester: Requester,
    ) -> Option<Result<(), ApiError>> {
        let bus = &self.0.bus;
        let holder = match bus.holder_elsewhere(&p.client_id).await {
            Ok(Some(holder)) if holder.connected => holder,
            Ok(_) => return Some(Err(crate::bus::not_connected(&p.client_id))),
            Err(e) => return Some(Err(e)),
        };
        let command = Command::Ask {
            upload_id: p.upload,
            client_id: p.client_id.clone(),
            share: p.share.clone(),
            collection_id: p.collection,
            compression: p.compression,
            operator: requester.operator,
            from: requester.from,
        };
        match bus.call(&holder, &command).await {
            Ok(Some(Reply::Triggered { .. })) => Some(Ok(())),
            Ok(Some(Reply::Error { error })) => Some(Err(error.into())),
            Ok(Some(other)) => Some(Err(crate::bus::command::unexpected(&other))),
            Ok(None) => Some(Err(crate::bus::not_connected(&p.client_id))),
            Err(e) => {
                tracing::warn!(client_id = %p.client_id, code = %e.code(), "asking a store through its replica got no answer; its upload record will tell");
                None
            }
        }
    }

    /// What another replica tells the driver; a cancel is answered.
    pub async fn hear(&self, news: ToDriver) -> Option<Reply> {
        match news {
            ToDriver::Hello { client_id, labels } => {
                if self
                    .0
                    .book
                    .store_connected(&client_id, &labels, UnixMs::now())
                {
                    self.0.wake.notify_one();
                }
                None
            }
            ToDriver::Ended { status } => {
                self.0.book.upload_ended(&status, UnixMs::now());
                self.0.wake.notify_one();
                None
            }
            ToDriver::Cancel {
                collection_id,
                operator,
                from,
            } => {
                let requester = Requester { operator, from };
                Some(match self.cancel(collection_id, &requester).await {
                    Ok(summary) => Reply::Collection {
                        summary: Box::new(summary),
                    },
                    Err(e) => Reply::Error { error: e.into() },
                })
            }
        }
    }
}
