//! The bus on NATS: presence in the JetStream key-value bucket `<prefix>_presence` (one key per
//! store; each replica follows it with a watch and keeps which stores are connected elsewhere),
//! commands as requests to `<prefix>.replica.<replica>`, news on `<prefix>.broadcast`, and what
//! the replica driving collections hears on `<prefix>.collections` (only that replica
//! subscribes). The prefix is `NATS_PREFIX` (`backhaul` unless set).
//!
//! The bucket also holds the deployment's identity ([`super::deployment`]): a replica of another
//! deployment, on the same NATS server under the same prefix, is refused at start.

use std::collections::HashSet;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::kv;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use shared::ClientId;

use super::Holder;
use super::command::{self, Broadcast, Command, Reply, ToDriver};
pub use super::deployment::Names;
use super::deployment::{ours, with_credentials};

/// How long a replica may take to answer a command (a cancel waits up to a few seconds for its
/// clean-up).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// A replica that is on the bus but did not answer within [`REQUEST_TIMEOUT`]: it may be
/// overloaded or stopped, not gone, so nothing is taken from it.
#[derive(Debug, thiserror::Error)]
#[error("no answer within {} s", REQUEST_TIMEOUT.as_secs())]
pub struct Unanswered;

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
    /// The stores connected to another replica, as the presence watch last showed them.
    elsewhere: Mutex<Elsewhere>,
    replica: String,
    names: Names,
}

impl Nats {
    /// Connects as `replica` of the deployment `deployment` (its identity in the database), with
    /// the names `names`; refused where another deployment uses them.
    pub async fn connect(
        url: &str,
        replica: String,
        names: Names,
        deployment: &str,
    ) -> anyhow::Result<Self> {
        let client = with_credentials(async_nats::ConnectOptions::new(), url)?
            .name(format!("backhaul-server-{replica}"))
            .request_timeout(Some(REQUEST_TIMEOUT))
            .connect(url)
            .await
            .context("connecting to NATS (NATS_URL)")?;
        let jetstream = async_nats::jetstream::new(client.clone());
        let presence = jetstream
            .create_or_update_key_value(kv::Config {
                bucket: names.bucket(),
                description: "Backhaul: which replica holds each store".into(),
                history: 1,
                storage: async_nats::jetstream::stream::StorageType::File,
                ..Default::default()
            })
            .await
            .context("opening the presence bucket (NATS needs JetStream: nats-server -js)")?;
        ours(&presence, &names, deployment).await?;
        tracing::info!(replica, prefix = names.prefix, "on the NATS bus");
        Ok(Self(Arc::new(Inner {
            client,
            presence,
            elsewhere: Mutex::new(Elsewhere::default()),
            replica,
            names,
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

    pub async fn claim(&self, client_id: &ClientId) -> anyhow::Result<u64> {
        Ok(self
            .0
            .presence
            .put(client_id.as_str(), self.value(true)?)
            .await?)
    }

    /// A claim with no connection, only over the revision `seen` (or where there is no entry):
    /// `Ok(None)` if the key changed since.
    pub async fn claim_unchanged(
        &self,
        client_id: &ClientId,
        seen: Option<u64>,
    ) -> anyhow::Result<Option<u64>> {
        let (key, value) = (client_id.as_str(), self.value(false)?);
        match seen {
            Some(revision) => match self.0.presence.update(key, value, revision).await {
                Ok(epoch) => Ok(Some(epoch)),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(None),
                Err(e) => Err(e.into()),
            },
            None => match self.0.presence.create(key, value).await {
                Ok(epoch) => Ok(Some(epoch)),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
                Err(e) => Err(e.into()),
            },
        }
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

    /// Whether another replica holds `client_id` with its agent connected, as the watch last
    /// showed it.
    pub fn connected_elsewhere(&self, client_id: &ClientId) -> bool {
        self.elsewhere().contains(client_id)
    }

    pub async fn call(&self, replica: &str, command: &Command) -> anyhow::Result<Option<Reply>> {
        self.request(self.0.names.replica(replica), serde_json::to_vec(command)?)
            .await
            .with_context(|| format!("replica {replica}"))
    }

    /// A request and its answer; `None` when nobody listens on `subject`, and [`Unanswered`]
    /// (in the error) when the listener said nothing within [`REQUEST_TIMEOUT`].
    async fn request(&self, subject: String, payload: Vec<u8>) -> anyhow::Result<Option<Reply>> {
        use async_nats::client::RequestErrorKind;
        match self.0.client.request(subject, payload.into()).await {
            Ok(msg) => Ok(Some(
                serde_json::from_slice(&msg.payload).context("a reply from another replica")?,
            )),
            Err(e) if e.kind() == RequestErrorKind::NoResponders => Ok(None),
            Err(e) if e.kind() == RequestErrorKind::TimedOut => Err(Unanswered.into()),
            Err(e) => Err(e.into()),
        }
    }

    /// Tells the replica driving collections; lost if none listens (it catches up by itself).
    pub async fn tell_driver(&self, news: &ToDriver) {
        if let Err(e) = self.publish(&self.0.names.driver, news).await {
            tracing::warn!(
                error = format!("{e:#}"),
                ?news,
                "could not tell the collection driver"
            );
        }
    }

    /// Publishes `what` as JSON on `subject`, expecting no answer.
    async fn publish(&self, subject: &str, what: &impl Serialize) -> anyhow::Result<()> {
        let payload = serde_json::to_vec(what)?;
        Ok(self
            .0
            .client
            .publish(subject.to_owned(), payload.into())
            .await?)
    }

    /// Asks the replica driving collections; `None` when no replica drives them now.
    pub async fn ask_driver(&self, news: &ToDriver) -> anyhow::Result<Option<Reply>> {
        self.request(self.0.names.driver.clone(), serde_json::to_vec(news)?)
            .await
    }

    pub async fn broadcast(&self, news: &Broadcast) {
        if let Err(e) = self.publish(&self.0.names.broadcast, news).await {
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
        let (this, st) = (self.clone(), state.clone());
        until_shutdown(state, async move { this.serve_driver(&st).await });
    }

    /// While this replica drives collections, hears the others on `<prefix>.collections`: it subscribes as
    /// soon as it takes the role, and drops the subscription as soon as it lets it go.
    async fn serve_driver(&self, state: &crate::AppState) {
        let mut driving = state.collections.watch_driving();
        loop {
            if driving.wait_for(|d| *d).await.is_err() {
                return;
            }
            let mut news = match self.0.client.subscribe(self.0.names.driver.clone()).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot hear the other replicas about collections; trying again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            loop {
                tokio::select! {
                    got = news.next() => {
                        let Some(msg) = got else { break };
                        let (state, client) = (state.clone(), self.0.client.clone());
                        state.tracker.clone().spawn(async move {
                            let reply = match serde_json::from_slice::<ToDriver>(&msg.payload) {
                                Ok(news) => state.collections.hear(news).await,
                                Err(e) => {
                                    tracing::warn!(error = %e, "collection news this replica cannot read");
                                    None
                                }
                            };
                            if let (Some(reply_to), Some(reply)) = (msg.reply, reply) {
                                answer(&client, reply_to, &reply).await;
                            }
                        });
                    }
                    changed = driving.changed() => {
                        if changed.is_err() || !*driving.borrow_and_update() {
                            break;
                        }
                    }
                }
            }
            // Dropping the subscription ends it: another replica drives collections now.
        }
    }

    async fn serve_commands(&self, state: &crate::AppState) {
        loop {
            let mut requests = match self
                .0
                .client
                .subscribe(self.0.names.replica(&self.0.replica))
                .await
            {
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
                    answer(&client, reply_to, &reply).await;
                });
            }
        }
    }

    async fn serve_news(&self, state: &crate::AppState) {
        loop {
            let mut news = match self
                .0
                .client
                .subscribe(self.0.names.broadcast.clone())
                .await
            {
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
            // Every key's last value first, then each change.
            let mut changes = match self.0.presence.watch_with_history(">").await {
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
                let Ok(client_id) = ClientId::parse(&entry.key) else {
                    continue;
                };
                if entry.operation != kv::Operation::Put {
                    self.elsewhere().set(&client_id, false);
                    continue;
                }
                match serde_json::from_slice::<Presence>(&entry.value) {
                    Ok(p) => {
                        let elsewhere = p.replica != self.0.replica;
                        self.elsewhere().set(&client_id, elsewhere && p.connected);
                        if elsewhere {
                            command::claimed_elsewhere(state, &client_id, entry.revision);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(%client_id, error = %e, "a presence value this replica cannot read")
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Nats {
    fn elsewhere(&self) -> std::sync::MutexGuard<'_, Elsewhere> {
        self.0.elsewhere.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The stores connected to another replica, each as a 64-bit fingerprint of its id rather than
/// the id, so that every replica keeps the whole fleet's presence in a few bytes per store
/// (with the ids, this set was most of the memory a replica spends per store beyond its own).
/// The fingerprint is keyed per process, so no one can choose ids that collide. The chance that
/// two of 100,000 ids collide is about 3 in 10^10. Two stores that did would share one answer,
/// the last word on either: one could look connected elsewhere (asking its holder, which reads
/// presence itself, finds it is not) or look offline to a collection until its next presence
/// change. Nothing else reads this set.
#[derive(Default)]
struct Elsewhere {
    keys: RandomState,
    stores: HashSet<u64>,
}

impl Elsewhere {
    fn fingerprint(&self, client_id: &ClientId) -> u64 {
        self.keys.hash_one(client_id.as_str())
    }

    fn set(&mut self, client_id: &ClientId, connected_elsewhere: bool) {
        let f = self.fingerprint(client_id);
        if connected_elsewhere {
            self.stores.insert(f);
        } else {
            self.stores.remove(&f);
        }
    }

    fn contains(&self, client_id: &ClientId) -> bool {
        self.stores.contains(&self.fingerprint(client_id))
    }
}

/// Sends `reply` to the requester waiting on `reply_to`.
async fn answer(client: &async_nats::Client, reply_to: async_nats::Subject, reply: &Reply) {
    match serde_json::to_vec(reply) {
        Ok(payload) => {
            if let Err(e) = client.publish(reply_to, payload.into()).await {
                tracing::warn!(error = %e, "could not answer another replica");
            }
        }
        Err(e) => tracing::error!(error = %e, "a reply"),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elsewhere_follows_the_last_word_on_each_store() {
        let mut e = Elsewhere::default();
        let (a, b) = (
            ClientId::parse("store-a").unwrap(),
            ClientId::parse("store-b").unwrap(),
        );
        e.set(&a, true);
        assert!(e.contains(&a));
        assert!(!e.contains(&b));
        e.set(&b, true);
        e.set(&a, false);
        assert!(!e.contains(&a));
        assert!(e.contains(&b));
        e.set(&a, false);
        assert!(!e.contains(&a));
    }

    #[test]
    fn a_presence_value_from_a_newer_release_is_read() {
        let p: Presence = serde_json::from_str(
            r#"{"replica":"r2","connected":true,"added_later":{"zone":"eu"}}"#,
        )
        .unwrap();
        assert_eq!((p.replica.as_str(), p.connected), ("r2", true));
    }

    /// The test command's NATS server, which this test needs.
    async fn replica(name: &str) -> Nats {
        let url = std::env::var("BACKHAUL_TEST_NATS_URL")
            .expect("this test needs NATS: set BACKHAUL_TEST_NATS_URL (scripts/test.sh does)");
        Nats::connect(
            &url,
            format!("{name}-{}", uuid::Uuid::new_v4().simple()),
            Names::new("backhaul_lib_tests"),
            "server-lib-tests",
        )
        .await
        .unwrap()
    }

    /// A NATS server that asks for a user and password: the credentials in the URL are used
    /// (percent-decoded), and wrong or missing ones are refused.
    #[tokio::test]
    async fn credentials_in_the_url_are_used() {
        let bin = std::env::var("BACKHAUL_TEST_NATS_SERVER").expect(
            "this test needs a nats-server binary: set BACKHAUL_TEST_NATS_SERVER (scripts/test.sh \
             does, from engines/nats.sh bin)",
        );
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut server = std::process::Command::new(bin)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir.path())
            .args(["--user", "backhaul", "--pass", "p@ss:w/rd"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let connect = |url: String| async move {
            Nats::connect(&url, "r".into(), Names::new("backhaul"), "d").await
        };
        let url = |userinfo: &str| format!("nats://{userinfo}@127.0.0.1:{port}");
        let mut up = false;
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                up = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert!(up, "the test's nats-server did not start");

        let joined = connect(url("backhaul:p%40ss%3Aw%2Frd")).await;
        let wrong = connect(url("backhaul:guess")).await;
        let none = connect(format!("nats://127.0.0.1:{port}")).await;
        server.kill().unwrap();
        server.wait().unwrap();
        joined.unwrap();
        for refused in [wrong, none] {
            let message = format!("{:#}", refused.err().expect("refused"));
            assert!(message.contains("connecting to NATS"), "{message}");
        }
    }

    /// Replicas of one deployment share a prefix; a replica of another deployment under the
    /// same prefix is refused, saying why, and one under a prefix of its own is not.
    #[tokio::test]
    async fn another_deployment_under_the_same_prefix_is_refused() {
        let url = std::env::var("BACKHAUL_TEST_NATS_URL")
            .expect("this test needs NATS: set BACKHAUL_TEST_NATS_URL (scripts/test.sh does)");
        let prefix = format!("backhaul_{}", uuid::Uuid::new_v4().simple());
        let connect = |prefix: &str, deployment: &'static str| {
            let (url, names) = (url.clone(), Names::new(prefix));
            async move {
                Nats::connect(
                    &url,
                    uuid::Uuid::new_v4().simple().to_string(),
                    names,
                    deployment,
                )
                .await
            }
        };
        let first = connect(&prefix, "one").await.unwrap();
        let second = connect(&prefix, "one").await.unwrap();
        let err = connect(&prefix, "two").await.err().expect("refused");
        let message = format!("{err:#}");
        assert!(
            message.contains(&format!(
                "NATS_PREFIX {prefix} is in use on this NATS server"
            )) && message.contains("one")
                && message.contains("two"),
            "{message}"
        );
        // The refused replica took nothing: the first two still share their presence.
        let store = ClientId::parse("store-1").unwrap();
        let epoch = first.claim(&store).await.unwrap();
        assert_eq!(
            second.holder(&store).await.unwrap().map(|h| h.epoch),
            Some(epoch)
        );
        connect(&format!("{prefix}_other"), "two").await.unwrap();
    }

    /// A claim with no connection is made only over the presence it saw: a connection's claim
    /// made since always wins, and is never replaced by it.
    #[tokio::test]
    async fn a_claim_without_a_connection_never_replaces_a_newer_claim() {
        let (a, b) = (replica("a").await, replica("b").await);
        let store = ClientId::parse(&format!("store-{}", uuid::Uuid::new_v4().simple())).unwrap();

        // A sees no entry; B's agent connects before A claims.
        assert_eq!(a.holder(&store).await.unwrap(), None);
        let connected = b.claim(&store).await.unwrap();
        assert_eq!(a.claim_unchanged(&store, None).await.unwrap(), None);
        let now = a.holder(&store).await.unwrap().unwrap();
        assert_eq!(
            (now.replica.as_str(), now.connected, now.epoch),
            (b.replica(), true, connected)
        );

        // Over the revision it saw, A's claim is made, and is a later epoch.
        let taken = a
            .claim_unchanged(&store, Some(connected))
            .await
            .unwrap()
            .unwrap();
        assert!(taken > connected);
        let now = a.holder(&store).await.unwrap().unwrap();
        assert_eq!((now.replica.as_str(), now.connected), (a.replica(), false));

        // B's agent connects again: a claim over the older revision changes nothing.
        let again = b.claim(&store).await.unwrap();
        assert_eq!(a.claim_unchanged(&store, Some(taken)).await.unwrap(), None);
        let now = a.holder(&store).await.unwrap().unwrap();
        assert_eq!(
            (now.replica.as_str(), now.connected, now.epoch),
            (b.replica(), true, again)
        );

        // A store no replica ever claimed is claimed over "no entry".
        let fresh = ClientId::parse(&format!("store-{}", uuid::Uuid::new_v4().simple())).unwrap();
        assert!(b.claim_unchanged(&fresh, None).await.unwrap().is_some());
    }
}
