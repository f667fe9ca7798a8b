//! How replicas reach each other (`BUS=nats`), and how one server does without (`BUS=local`).
//!
//! **Presence.** Which replica holds each store is a key of a JetStream key-value bucket: the
//! store's id, whose value names the replica and whether the agent is connected there now. A
//! replica claims a store when its agent says `hello` (a put: the newest connection wins); the
//! key's revision is the claim's **epoch**. A claim with no connection behind it (to take on or
//! end uploads no live replica drives) is a compare-and-set over the revision it read, so it
//! never replaces a connection made meanwhile ([`Bus::claim_unchanged`]). When the agent
//! leaves, the replica marks the key "away" only if its own claim is still the latest, and
//! keeps the store's unfinished uploads: it holds them until another replica claims the store.
//!
//! **Fencing.** Every replica watches the bucket. A claim by another replica closes this
//! replica's connection of that store if it is older (a lower epoch), and lets go of the store's
//! unfinished uploads. Uploads are saved under the epoch of the claim they are driven under, and
//! the database refuses a save under an older epoch than the row's (`db::Saved::Superseded`),
//! so a replica that has not heard of a newer claim yet still cannot overwrite its work.
//!
//! **Commands.** An API call about a store held elsewhere (a trigger, a cancel, a live status)
//! is carried out by the holder ([`command::Command`], a NATS request to the holder's subject),
//! so the answer is the one that replica's own API gives. A store no replica holds, or whose
//! replica does not answer, is `CLIENT_NOT_CONNECTED`. Revocations are broadcast to every
//! replica, which applies them to its in-memory lists and closes the store's connection. A
//! replica that is on the bus but answers nothing within 15 s (overloaded, or stopped) is
//! neither: the call is `TIMEOUT` (503), and nothing is taken from that replica. The request
//! stays with it, and it carries it out when it runs again, as if it had answered late.
//!
//! **Collections.** One replica drives them (a lease, `lease::Singleton::Collections`): it
//! holds the live ones, asks their stores (through each store's holder, [`Command::Ask`]) and
//! hears the others on a subject of its own ([`ToDriver`]): hellos, upload endings, and
//! cancels. News lost on the way costs a delay only: the driver adopts new collections from the
//! database and settles running stores from their upload records every few seconds.

pub mod abandoned;
pub mod command;
mod deployment;
pub mod lease;
mod nats;

use anyhow::Context;
use shared::{ClientId, ErrorCode};
use tokio_util::task::TaskTracker;

use crate::config::{BusKind, Config};
use crate::error::ApiError;

pub use command::{Broadcast, Command, Reply, ToDriver};

/// Where a store is held, as the bus says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub replica: String,
    /// Whether the agent is connected to that replica now (else it holds the store's unfinished
    /// uploads until another replica claims the store).
    pub connected: bool,
    pub epoch: u64,
}

/// The deployment's identity, made once in its database (`backhaul_deployment`).
fn deployment(database: &crate::db::Location) -> anyhow::Result<String> {
    let row = database
        .connect()?
        .query_opt("SELECT id FROM backhaul_deployment", &[])?
        .context("the database has no deployment identity")?;
    row.text(0)
}

/// The bus of this server.
pub enum Bus {
    /// One server: every agent is in this process's registry.
    Local,
    Nats(nats::Nats),
}

impl Bus {
    /// Connects to NATS and prepares the presence bucket when `BUS=nats`.
    pub async fn connect(config: &Config) -> anyhow::Result<Self> {
        match (config.bus, &config.nats_url) {
            (BusKind::Local, _) => Ok(Self::Local),
            (BusKind::Nats, Some(url)) => {
                let replica = config
                    .replica_id
                    .clone()
                    .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
                let deployment = deployment(&config.database())?;
                let names = nats::Names::new(&config.nats_prefix);
                Ok(Self::Nats(
                    nats::Nats::connect(url.expose(), replica, names, &deployment).await?,
                ))
            }
            (BusKind::Nats, None) => anyhow::bail!("BUS=nats needs NATS_URL"),
        }
    }

    /// This replica's name on the bus.
    pub fn replica(&self) -> Option<&str> {
        match self {
            Self::Local => None,
            Self::Nats(n) => Some(n.replica()),
        }
    }

    /// Claims `client_id` for this replica, for a connection of its agent; returns the claim's
    /// epoch. The newest connection wins, whatever the presence said before. One server claims
    /// nothing (epoch 0). If the bus cannot be reached, the agent is still served here (epoch
    /// 0), and other replicas do not find it until it reconnects.
    pub async fn claim(&self, client_id: &ClientId) -> u64 {
        match self {
            Self::Local => 0,
            Self::Nats(n) => n.claim(client_id).await.unwrap_or_else(|e| {
                tracing::error!(%client_id, error = format!("{e:#}"), "could not claim the store on the bus; other replicas will not find it");
                0
            }),
        }
    }

    /// Claims `client_id` with no connection (to end or time out uploads that no live replica
    /// drives), only if its presence is still at the revision `seen` (the [`Holder::epoch`] of
    /// [`Bus::presence`]; `None` if it had no entry). A claim made since, above all one of a
    /// connecting agent, wins: then `Ok(None)`, and nothing changes. Returns the claim's epoch
    /// (0 for one server).
    pub async fn claim_unchanged(
        &self,
        client_id: &ClientId,
        seen: Option<u64>,
    ) -> Result<Option<u64>, ApiError> {
        match self {
            Self::Local => Ok(Some(0)),
            Self::Nats(n) => n
                .claim_unchanged(client_id, seen)
                .await
                .map_err(|e| ApiError::internal(&e.context("claiming a store on the bus"))),
        }
    }

    /// The agent of `client_id` left this replica: the claim of `epoch` is marked away, unless a
    /// newer one replaced it.
    pub fn left(&self, client_id: &ClientId, epoch: u64, tracker: &TaskTracker) {
        if let Self::Nats(n) = self
            && epoch > 0
        {
            let (n, client_id) = (n.clone(), client_id.clone());
            tracker.spawn(async move { n.left(&client_id, epoch).await });
        }
    }

    /// The replica that holds `client_id`, if another one does; `None` for one server, for a
    /// store nobody claimed, and for a store this replica holds.
    pub async fn holder_elsewhere(&self, client_id: &ClientId) -> Result<Option<Holder>, ApiError> {
        Ok(self
            .presence(client_id)
            .await?
            .filter(|holder| !self.is_mine(holder)))
    }

    /// The presence of `client_id` as the bus has it now, this replica's own claim included;
    /// `None` for one server and for a store nobody claimed.
    pub async fn presence(&self, client_id: &ClientId) -> Result<Option<Holder>, ApiError> {
        match self {
            Self::Local => Ok(None),
            Self::Nats(n) => n
                .holder(client_id)
                .await
                .map_err(|e| ApiError::internal(&e.context("reading presence on the bus"))),
        }
    }

    /// Whether `holder` names this replica.
    pub fn is_mine(&self, holder: &Holder) -> bool {
        self.replica() == Some(holder.replica.as_str())
    }

    /// Has `holder` carry out `command`. `Ok(None)` when that replica does not answer (it is
    /// gone): the caller answers as if no replica held the store.
    pub async fn call(
        &self,
        holder: &Holder,
        command: &Command,
    ) -> Result<Option<Reply>, ApiError> {
        match self {
            Self::Local => Ok(None),
            Self::Nats(n) => n
                .call(&holder.replica, command)
                .await
                .map_err(|e| unanswered_or_internal(e, "a command to another replica")),
        }
    }

    /// Whether another replica holds `client_id` with its agent connected now (as this
    /// replica's presence watch last showed it); always false for one server.
    pub fn connected_elsewhere(&self, client_id: &ClientId) -> bool {
        match self {
            Self::Local => false,
            Self::Nats(n) => n.connected_elsewhere(client_id),
        }
    }

    /// Tells the replica that drives collections of `news`, in the background.
    pub fn tell_driver(&self, news: ToDriver, tracker: &TaskTracker) {
        if let Self::Nats(n) = self {
            let n = n.clone();
            tracker.spawn(async move { n.tell_driver(&news).await });
        }
    }

    /// Asks the replica that drives collections; `Ok(None)` when none does now.
    pub async fn ask_driver(&self, news: &ToDriver) -> Result<Option<Reply>, ApiError> {
        match self {
            Self::Local => Ok(None),
            Self::Nats(n) => n
                .ask_driver(news)
                .await
                .map_err(|e| unanswered_or_internal(e, "the replica driving collections")),
        }
    }

    /// Whether `holder`'s replica answers. One that does not answer at all is gone; one that
    /// answers late is taken as alive.
    pub async fn alive(&self, holder: &Holder) -> bool {
        !matches!(self.call(holder, &Command::Ping).await, Ok(None))
    }

    /// Tells every other replica of `what`.
    pub fn broadcast(&self, what: &Broadcast, tracker: &TaskTracker) {
        if let Self::Nats(n) = self {
            let (n, what) = (n.clone(), what.clone());
            tracker.spawn(async move { n.broadcast(&what).await });
        }
    }

    /// Starts watching presence and serving commands and broadcasts, until shutdown.
    pub fn start(&self, state: &crate::AppState) {
        if let Self::Nats(n) = self {
            n.start(state);
        }
    }
}

/// The error of a store that no replica holds (or whose replica is gone).
pub fn not_connected(client_id: &ClientId) -> ApiError {
    ApiError::new(
        ErrorCode::ClientNotConnected,
        format!("client {client_id} is not connected"),
    )
}

/// `TIMEOUT` (503) for a replica that is there but did not answer in time: the request may still
/// be carried out, so the operator looks before trying again. Any other failure of the bus is
/// the server's own.
fn unanswered_or_internal(err: anyhow::Error, what: &str) -> ApiError {
    if err.downcast_ref::<nats::Unanswered>().is_some() {
        tracing::warn!(error = format!("{err:#}"), "{what}");
        ApiError::new(
            ErrorCode::Timeout,
            format!(
                "{what}: {err:#}; it may be overloaded or stopped, and may still carry the \
                 request out: look at the status before trying again"
            ),
        )
    } else {
        ApiError::internal(&err.context(what.to_owned()))
    }
}
