//! The Backhaul control plane. It holds one WebSocket per store agent, and when an operator asks
//! for a store's file it starts an S3 multipart upload, presigns it, sends the plan down that
//! agent's WebSocket and finally verifies the stored object with HeadObject. File bytes never pass
//! through it: agents upload straight to storage.
//!
//! [`run`] is the entry point; it takes already-bound listeners so tests can use ephemeral ports.

pub mod admin;
pub mod api;
pub mod auth;
pub mod bus;
pub mod collections;
pub mod collections_api;
pub mod config;
pub mod connection;
pub mod db;
pub mod embedded_s3;
pub mod embedded_store;
pub mod error;
pub mod host;
pub mod inventory;
pub mod listen;
pub mod metrics;
pub mod openapi;
pub mod registry;
pub mod renewal;
pub mod revocations;
pub mod schedules;
pub mod storage;
pub mod stores_api;
pub mod streams;
pub mod tls;
pub mod tokens;
pub mod ui;
pub mod uploads;
pub mod ws;

use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::any;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bus::lease::Singleton;
use crate::collections::Collections;
use crate::config::Config;
use crate::inventory::Inventory;
use crate::registry::Registry;
use crate::revocations::Revocations;
use crate::schedules::Schedules;
use crate::storage::Storage;
use crate::tokens::Tokens;

use crate::uploads::Uploads;

/// How long shutdown waits for connections and S3 clean-up before giving up.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(15);
/// Largest request body the REST API accepts; none of its routes needs one.
const MAX_REST_BODY: usize = 16 * 1024;

/// Shared state of one running server. Cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<StateInner>);

pub struct StateInner {
    pub config: Config,
    /// How this replica reaches the others (`bus::Bus::Local` for one server).
    pub bus: Arc<bus::Bus>,
    /// The jobs that run on one replica at a time.
    pub leases: bus::lease::Leases,
    pub tokens: Arc<Tokens>,
    pub registry: Arc<Registry>,
    pub inventory: Arc<Inventory>,
    pub revocations: Revocations,
    pub uploads: Uploads,
    pub collections: Collections,
    pub schedules: Schedules,
    /// Signed-in browsers of the operator page.
    pub sessions: ui::Sessions,
    pub metrics: Arc<metrics::Metrics>,
    pub storage: Storage,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
}

impl Deref for AppState {
    type Target = StateInner;
    fn deref(&self) -> &StateInner {
        &self.0
    }
}

/// Listeners bound by the caller.
pub struct Listeners {
    pub api: TcpListener,
    /// Required with `STORAGE=embedded`, ignored otherwise.
    pub embedded_s3: Option<TcpListener>,
}

/// How long a REST request may take before it is answered with 503.
pub(crate) const REST_TIMEOUT: Duration = Duration::from_secs(30);

pub fn router(state: AppState) -> Router {
    // The REST timeout (in `api_routes`) does not wrap the WebSocket: an upgraded connection
    // lives on after its handler returned, and its own tasks watch the shutdown token.
    let (rest, _) = openapi::api_routes().split_for_parts();
    rest.route("/ws/connect", any(ws::connect))
        .merge(ui::page_routes())
        .fallback(api::not_found)
        .layer(DefaultBodyLimit::max(MAX_REST_BODY))
        .with_state(state)
}

/// Runs the server until `shutdown` is cancelled, then drains within [`DRAIN_TIMEOUT`].
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    config.validate()?;
    let tokens = Arc::new(Tokens::open(
        &config.token_key_path(),
        &config.database(),
        config.legacy_keys()?,
    )?);
    let tracker = TaskTracker::new();
    let tls = match (&config.tls_cert_file, &config.tls_key_file) {
        (Some(cert), Some(key)) => Some(tls::acceptor(cert, key)?),
        _ => None,
    };
    let storage = storage::from_config(
        &config,
        listeners.embedded_s3,
        tls.as_ref(),
        &shutdown,
        &tracker,
    )
    .await?;
    let bus = Arc::new(bus::Bus::connect(&config).await?);
    // Held until the server stops: a second live replica under this name is refused.
    let _name = match bus.replica() {
        Some(replica) => Some(
            bus::lease::NameLock::take(&config.database(), replica)
                .context("checking that REPLICA_ID is this replica's alone")?,
        ),
        None => None,
    };
    let (state, ended) = AppState::open(config, bus, tokens, storage, &shutdown, &tracker)?;
    state.bus.start(&state);
    let orphan_sweep = Duration::from_secs(state.config.orphan_sweep_interval_secs);

    // What a previous run left half-done is finished before agents can reconnect.
    state.uploads.recover().await;
    state.collections.lead(&state.leases);
    state
        .tracker
        .spawn(state.collections.clone().run(state.clone(), ended));
    // Schedules: the first look is at once, so a firing missed while the server was down runs
    // now, once.
    // The jobs below `leases.holds` run on one replica at a time (on every tick for one
    // server); each replica sweeps the uploads it holds itself.
    spawn_every(&state, schedules::TICK, |s| async move {
        if s.leases.holds(Singleton::Schedules) {
            s.schedules.fire_due(uploads::UnixMs::now());
        }
    });
    spawn_every(&state, Duration::from_secs(1), |s| async move {
        s.uploads.sweep().await;
    });
    let look = Arc::new(bus::abandoned::Look::default());
    spawn_every(&state, ABANDONED_LOOK, move |s| {
        let look = look.clone();
        async move {
            if s.leases.holds(Singleton::Abandoned) {
                look.run(&s).await;
            } else {
                look.forget();
            }
        }
    });
    let retention = Duration::from_secs(state.config.upload_retention_days * 24 * 3600);
    spawn_every(&state, Duration::from_secs(3600), move |s| async move {
        if s.leases.holds(Singleton::Retention) {
            s.uploads.forget_old(retention);
            s.tokens.forget_expired();
        }
    });
    if !orphan_sweep.is_zero() {
        // The first tick is immediate: orphans are swept at start-up, then periodically.
        spawn_every(&state, orphan_sweep, |s| async move {
            if s.leases.holds(Singleton::OrphanSweep) {
                s.uploads.sweep_orphans().await;
            }
        });
    }

    // The inventory's flusher outlives the drain, which ends sessions (and notes their ends).
    let inventory = state.inventory.clone();
    let flusher_stop = CancellationToken::new();
    // Stops it on every way out of this function, an error included.
    let stop_flusher = flusher_stop.clone().drop_guard();
    let flusher = {
        let (inventory, stop) = (inventory.clone(), flusher_stop.clone());
        tokio::spawn(async move { inventory.run_flusher(stop, INVENTORY_RETRY).await })
    };

    tracing::info!(
        addr = %listeners.api.local_addr()?,
        scheme = if tls.is_some() { "https" } else { "http" },
        "server listening"
    );
    serve(listeners.api, tls, router(state), &shutdown, &tracker).await?;

    // Agent sessions watch `shutdown` themselves (graceful shutdown does not cover upgraded
    // connections). Unfinished uploads stay recorded and resume when the server is back.
    tracing::info!("shutting down");
    drain(&tracker).await;
    drop(stop_flusher);
    let _ = flusher.await;
    // The sessions have ended: their last contacts are written.
    if let Err(e) = inventory.flush() {
        tracing::warn!(
            error = format!("{e:#}"),
            "the store inventory's last writes were lost"
        );
    }
    Ok(())
}

/// How often the holder of the `Abandoned` lease looks for uploads no live replica holds.
const ABANDONED_LOOK: Duration = Duration::from_secs(2);

/// How long the inventory's flusher waits after a failed write before trying again.
const INVENTORY_RETRY: Duration = Duration::from_secs(1);

/// Waits for every task (connections, S3 clean-up) within [`DRAIN_TIMEOUT`].
async fn drain(tracker: &TaskTracker) {
    tracker.close();
    if tokio::time::timeout(DRAIN_TIMEOUT, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("shutdown drain timed out");
    }
}

impl AppState {
    /// The state of a server on `storage`: revocations and uploads loaded from the data
    /// directory, the upload service wired to the registry and the metrics.
    fn open(
        config: Config,
        bus: Arc<bus::Bus>,
        tokens: Arc<Tokens>,
        storage: Storage,
        shutdown: &CancellationToken,
        tracker: &TaskTracker,
    ) -> anyhow::Result<(
        Self,
        tokio::sync::mpsc::UnboundedReceiver<shared::api::UploadStatus>,
    )> {
        let database = config.database();
        let revocations = Revocations::open(
            database.connect()?,
            &config.data_dir.join("revocations.json"),
        )?;
        let registry = Arc::new(Registry::default());
        let inventory = Arc::new(Inventory::new(database.connect()?));
        let metrics = Arc::new(metrics::Metrics::default());
        let (ended, ended_rx) = tokio::sync::mpsc::unbounded_channel();
        let uploads = Uploads::open(
            Box::new(db::SqlStore::new(database.connect()?)),
            uploads::Settings::from_config(&config),
            uploads::Services {
                storage: storage.clone(),
                agents: registry.clone(),
                metrics: metrics.clone(),
                tracker: tracker.clone(),
                shutdown: shutdown.clone(),
                ended: Some(ended),
            },
        )
        .with_context(|| format!("loading uploads from {database:?}"))?;
        let collections = Collections::open(
            database.connect()?,
            uploads.clone(),
            registry.clone(),
            bus.clone(),
            tracker.clone(),
        );
        let schedules = Schedules::open(
            schedules::Store::new(database.connect()?),
            collections.clone(),
            inventory.clone(),
        )
        .with_context(|| format!("loading schedules from {database:?}"))?;
        let leases = match config.bus {
            config::BusKind::Local => bus::lease::Leases::alone(),
            config::BusKind::Nats => bus::lease::Leases::shared(database.clone()),
        };
        let state = Self(Arc::new(StateInner {
            config,
            bus,
            leases,
            tokens,
            registry,
            inventory,
            revocations,
            uploads,
            collections,
            schedules,
            sessions: ui::Sessions::default(),
            metrics,
            storage,
            shutdown: shutdown.clone(),
            tracker: tracker.clone(),
        }));
        Ok((state, ended_rx))
    }
}

/// Runs `job` now and then every `every` until shutdown, one run at a time.
fn spawn_every<F, Fut>(state: &AppState, every: Duration, job: F)
where
    F: Fn(AppState) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let state = state.clone();
    state.tracker.clone().spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                () = state.shutdown.cancelled() => break,
                _ = tick.tick() => job(state.clone()).await,
            }
        }
    });
}

/// Serves the API (and the WebSocket) on `listener` until `shutdown`, over TLS when an acceptor
/// is given.
async fn serve(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    app: Router,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) -> anyhow::Result<()> {
    listen::serve_api(listener, tls, app, shutdown.clone(), tracker.clone()).await;
    Ok(())
}

pub(crate) async fn rest_timeout(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    match tokio::time::timeout(REST_TIMEOUT, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => error::ApiError::new(shared::ErrorCode::Timeout, "the request took too long")
            .into_response(),
    }
}
