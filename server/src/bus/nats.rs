//! The bus on NATS: presence in the JetStream key-value bucket `backhaul_presence` (one key per
//! store), commands as requests to `backhaul.replica.<replica>`, news on `backhaul.broadcast`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::kv;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use shared::ClientId;

use super::Holder;
use super::command::{self, Broadcast, Command, Reply};

const BUCKET: &str = "backhaul_presence";
const BROADCAST: &str = "backhaul.broadcast";
/// How long a replica may take to answer a command (a cancel waits up to a few seconds for its
/// clean-up).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

fn subject(replica: &str) -> String {
    format!("backhaul.replica.{replica}")
}

/// A presence value: which replica holds the store, and whether its agent is connected there.
#[derive(Debug, Serialize, Deserialize)]
struct Presence {
    replica: String,
    connected: bool,
}

#[derive(Clone)]
pub struct Nats(Arc<Inner>);

struct Inner {
    client: async_nats::Client,
    presence: kv::Store,
    replica: String,
}

impl Nats {
    pub async fn connect(url: &str, replica: String) -> anyhow::Result<Self> {
        let client = async_nats::ConnectOptions::new()
            .name(format!("backhaul-server-{replica}"))
            .request_timeout(Some(REQUEST_TIMEOUT))
            .connect(url)
            .await
            .context("connecting to NATS (NATS_URL)")?;
        let jetstream = async_nats::jetstream::new(client.clone());
        let presence = jetstream
            .create_or_update_key_value(kv::Config {
                bucket: BUCKET.into(),
                description: "Backhaul: which replica holds each store".into(),
                history: 1,
                storage: async_nats::jetstream::stream::StorageType::File,
                ..Default::default()
            })
            .await
            .context("opening the presence bucket (NATS needs JetStream: nats-server -js)")?;
        tracing::info!(replica, "on the NATS bus");
        Ok(Self(Arc::new(Inner {
            client,
            presence,
            replica,
        })))
    }

    pub fn replica(&self) -> &str {
        &self.0.replica
    }

    fn value(&self, connected: bool) -> anyhow::Result<bytes::Bytes> {
        Ok(serde_json::to_vec(&Presence {
            replica: self.0.replica.clone(),
            connected,
        })?
        .into())
    }

    pub async fn claim(&self, client_id: &ClientId, connected: bool) -> anyhow::Result<u64> {
        Ok(self
            .0
            .presence
            .put(client_id.as_str(), self.value(connected)?)
            .await?)
    }

    pub async fn left(&self, client_id: &ClientId, epoch: u64) {
        let value = match self.value(false) {
            Ok(v) => v,
            Err(e) => return tracing::error!(error = %e, "presence value"),
        };
        // Fails when a newer claim replaced ours, which is what should happen then.
        if let Err(e) = self
            .0
            .presence
            .update(client_id.as_str(), value, epoch)
            .await
        {
            tracing::debug!(%client_id, error = %e, "presence not marked away (claimed since)");
        }
    }

    pub async fn holder(&self, client_id: &ClientId) -> anyhow::Result<Option<Holder>> {
        let Some(entry) = self.0.presence.entry(client_id.as_str()).await? else {
            return Ok(None);
        };
        if entry.operation != kv::Operation::Put {
            return Ok(None);
        }
        let p: Presence = serde_json::from_slice(&entry.value).context("a presence value")?;
        Ok(Some(Holder {
            replica: p.replica,
            connected: p.connected,
            epoch: entry.revision,
        }))
    }

    pub async fn call(&self, replica: &str, command: &Command) -> anyhow::Result<Option<Reply>> {
        let payload = serde_json::to_vec(command)?;
        match self
            .0
            .client
            .request(subject(replica), payload.into())
            .await
        {
            Ok(msg) => Ok(Some(
                serde_json::from_slice(&msg.payload).context("a reply from another replica")?,
            )),
            Err(e) if e.kind() == async_nats::client::RequestErrorKind::NoResponders => Ok(None),
            Err(e) => Err(e).with_context(|| format!("replica {replica} did not answer")),
        }
    }

    pub async fn broadcast(&self, news: &Broadcast) {
        let sent = match serde_json::to_vec(news) {
            Ok(payload) => self
                .0
                .client
                .publish(BROADCAST, payload.into())
                .await
                .map_err(anyhow::Error::from),
            Err(e) => Err(e.into()),
        };
        if let Err(e) = sent {
            tracing::error!(
                error = format!("{e:#}"),
                ?news,
                "could not tell the other replicas"
            );
        }
    }

    /// Serves commands and news, and watches presence, until shutdown.
    pub fn start(&self, state: &crate::AppState) {
        let (this, st) = (self.clone(), state.clone());
        until_shutdown(state, async move { this.serve_commands(&st).await });
        let (this, st) = (self.clone(), state.clone());
        until_shutdown(state, async move { this.serve_news(&st).await });
        let (this, st) = (self.clone(), state.clone());
        until_shutdown(state, async move { this.watch_presence(&st).await });
    }

    async fn serve_commands(&self, state: &crate::AppState) {
        loop {
            let mut requests = match self.0.client.subscribe(subject(&self.0.replica)).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot take commands from the bus; trying again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            while let Some(msg) = requests.next().await {
                let Some(reply_to) = msg.reply.clone() else {
                    continue;
                };
                let (state, client) = (state.clone(), self.0.client.clone());
                state.tracker.clone().spawn(async move {
                    let reply = match serde_json::from_slice::<Command>(&msg.payload) {
                        Ok(command) => command::execute(&state, command).await,
                        Err(e) => Reply::Error {
                            error: crate::error::ApiError::new(
                                shared::ErrorCode::BadRequest,
                                format!("a command this replica cannot read: {e}"),
                            )
                            .into(),
                        },
                    };
                    match serde_json::to_vec(&reply) {
                        Ok(payload) => {
                            if let Err(e) = client.publish(reply_to, payload.into()).await {
                                tracing::warn!(error = %e, "could not answer a command");
                            }
                        }
                        Err(e) => tracing::error!(error = %e, "a reply"),
                    }
                });
            }
        }
    }

    async fn serve_news(&self, state: &crate::AppState) {
        loop {
            let mut news = match self.0.client.subscribe(BROADCAST).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot hear the other replicas; trying again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            while let Some(msg) = news.next().await {
                match serde_json::from_slice::<Broadcast>(&msg.payload) {
                    Ok(b) => command::apply(state, b),
                    Err(e) => tracing::warn!(error = %e, "news this replica cannot read"),
                }
            }
        }
    }

    async fn watch_presence(&self, state: &crate::AppState) {
        loop {
            let mut changes = match self.0.presence.watch_all().await {
                Ok(w) => w,
                Err(e) => {
                    tracing::error!(error = %e, "cannot watch presence; trying again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            while let Some(change) = changes.next().await {
                let entry = match change {
                    Ok(entry) => entry,
                    Err(e) => {
                        tracing::warn!(error = %e, "presence watch");
                        break;
                    }
                };
                if entry.operation != kv::Operation::Put {
                    continue;
                }
                let Ok(client_id) = ClientId::parse(&entry.key) else {
                    continue;
                };
                match serde_json::from_slice::<Presence>(&entry.value) {
                    Ok(p) if p.replica != self.0.replica => {
                        command::claimed_elsewhere(state, &client_id, entry.revision);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(%client_id, error = %e, "a presence value this replica cannot read")
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Runs `job` on the server's tracker until shutdown.
fn until_shutdown(
    state: &crate::AppState,
    job: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let shutdown = state.shutdown.clone();
    state.tracker.spawn(async move {
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = job => {}
        }
    });
}
