//! The connected agents, by client id, and [`AgentLink`], the one way the rest of the server
//! sends to an agent.

use std::collections::HashMap;
use std::num::NonZeroU64;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use shared::ClientId;
use shared::labels::Labels;
use shared::protocol::ServerMessage;
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Capacity of each connection's outgoing queue. Commands are rare and small; a full queue means
/// the agent stopped reading, and the caller is told rather than left waiting.
pub const OUTBOX_CAPACITY: usize = 32;

/// One agent connection, numbered from 1 in the order this process accepted them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnId(NonZeroU64);

impl std::fmt::Display for ConnId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
impl ConnId {
    pub fn for_test(n: u64) -> Self {
        Self(NonZeroU64::new(n).expect("connection ids start at 1"))
    }
}

/// Why a message did not reach an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The client has no connection, or a newer one than the message was meant for.
    #[error("the agent's connection is gone")]
    Gone,
    /// The connection's queue is full: the agent stopped reading.
    #[error("the agent is not reading")]
    Full,
}

/// Sending to the agent that holds a store. The upload core uses nothing else to reach agents,
/// so that another implementation (one that reaches agents connected to other replicas) can take
/// the registry's place. Every send names the connection it is meant for: a message for a
/// connection that was replaced is not delivered to its successor.
#[async_trait::async_trait]
pub trait AgentLink: Send + Sync {
    /// The current connection of `client_id`, if it is connected.
    fn connection(&self, client_id: &ClientId) -> Option<ConnId>;
    /// The protocol version the agent on `conn` speaks, while that connection is current.
    fn protocol(&self, client_id: &ClientId, conn: ConnId) -> Option<u32>;
    /// Queues `msg` without waiting.
    fn try_send(
        &self,
        client_id: &ClientId,
        conn: ConnId,
        msg: ServerMessage,
    ) -> Result<(), SendError>;
    /// Queues `msg`, waiting while the queue is full (for large messages such as a plan).
    async fn send(
        &self,
        client_id: &ClientId,
        conn: ConnId,
        msg: ServerMessage,
    ) -> Result<(), SendError>;
}

/// How the rest of the server reaches one live agent connection.
#[derive(Debug, Clone)]
pub struct AgentHandle {
    pub conn_id: ConnId,
    /// The claim under which this replica holds the store for this connection (`bus`); 0 for
    /// one server.
    pub epoch: u64,
    pub outbox: mpsc::Sender<ServerMessage>,
    pub connected_since: OffsetDateTime,
    /// What the agent said in its `hello`.
    pub protocol_version: u32,
    pub agent_version: String,
    pub labels: Labels,
    /// Unix milliseconds of the last frame received, updated by the connection's reader.
    pub last_seen_ms: Arc<AtomicI64>,
    /// The agent's token: the one it connected with, then each one it was sent (`renewal`).
    pub token: Arc<HeldToken>,
    /// Cancelled to close the connection (replaced by a newer one, server shutting down).
    pub close: CancellationToken,
}

/// The token an agent connection holds, shared by its renewal (which replaces it) and everyone
/// who reports on it or revokes it.
#[derive(Debug)]
pub struct HeldToken(Mutex<TokenIds>);

/// Which token, by what key, until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenIds {
    /// `None` for a token minted before tokens had ids.
    pub jti: Option<String>,
    /// `None` for a legacy HS256 token.
    pub kid: Option<String>,
    /// Unix seconds.
    pub expires_at: u64,
}

impl HeldToken {
    pub fn new(ids: TokenIds) -> Self {
        Self(Mutex::new(ids))
    }

    pub fn get(&self) -> TokenIds {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn replace(&self, ids: TokenIds) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = ids;
    }

    pub fn expires_at(&self) -> u64 {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).expires_at
    }
}

impl AgentHandle {
    /// Tells the agent its token was revoked, then closes the connection.
    pub fn close_revoked(&self) {
        let _ = self.outbox.try_send(ServerMessage::Error {
            code: shared::ErrorCode::Unauthorized,
            message: "this agent's token was revoked".into(),
        });
        self.close.cancel();
    }

    pub fn token_expires_at(&self) -> u64 {
        self.token.expires_at()
    }

    pub fn last_seen(&self) -> OffsetDateTime {
        let ms = self.last_seen_ms.load(Ordering::Relaxed);
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
            .unwrap_or(self.connected_since)
    }
}

#[derive(Debug, Default)]
pub struct Registry {
    // A std Mutex: it is never held across an await, and every critical section is a map lookup.
    agents: Mutex<HashMap<ClientId, AgentHandle>>,
    next_conn_id: AtomicU64,
    /// Upgraded connections that have not been registered yet (no `hello` so far).
    handshaking: Arc<AtomicU64>,
}

/// A connection counted as handshaking until this is dropped (registered, or gone).
#[derive(Debug)]
pub struct Handshaking(Arc<AtomicU64>);

impl Drop for Handshaking {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Registry {
    pub fn next_conn_id(&self) -> ConnId {
        let n = self.next_conn_id.fetch_add(1, Ordering::Relaxed) + 1;
        ConnId(NonZeroU64::new(n).unwrap_or(NonZeroU64::MIN))
    }

    /// Registers a connection and returns the one it replaces, if any.
    pub fn insert(&self, client_id: ClientId, handle: AgentHandle) -> Option<AgentHandle> {
        self.lock().insert(client_id, handle)
    }

    /// Removes the entry only if it still belongs to `conn_id`: a replaced connection must not
    /// remove its successor.
    pub fn remove(&self, client_id: &ClientId, conn_id: ConnId) {
        let mut agents = self.lock();
        if agents.get(client_id).is_some_and(|h| h.conn_id == conn_id) {
            agents.remove(client_id);
        }
    }

    pub fn get(&self, client_id: &ClientId) -> Option<AgentHandle> {
        self.lock().get(client_id).cloned()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Counts a connection that has not said `hello` yet, until the guard is dropped.
    pub fn handshaking(&self) -> Handshaking {
        self.handshaking.fetch_add(1, Ordering::Relaxed);
        Handshaking(self.handshaking.clone())
    }

    /// Registered connections plus those still in their handshake: what
    /// `MAX_AGENT_CONNECTIONS` limits.
    pub fn connections(&self) -> usize {
        self.len() + self.handshaking.load(Ordering::Relaxed) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn snapshot(&self) -> Vec<(ClientId, AgentHandle)> {
        let mut all: Vec<_> = self
            .lock()
            .iter()
            .map(|(id, h)| (id.clone(), h.clone()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// The ids of the connected agents.
    pub fn connected_ids(&self) -> std::collections::HashSet<ClientId> {
        self.lock().keys().cloned().collect()
    }

    /// How many connected agents match `pred`, without copying the registry (`pred` runs under
    /// the lock and must be quick).
    pub fn count(&self, pred: impl Fn(&AgentHandle) -> bool) -> usize {
        self.lock().values().filter(|h| pred(h)).count()
    }

    /// The outbox of `conn`, if it is still `client_id`'s connection.
    fn outbox(
        &self,
        client_id: &ClientId,
        conn: ConnId,
    ) -> Result<mpsc::Sender<ServerMessage>, SendError> {
        self.lock()
            .get(client_id)
            .filter(|h| h.conn_id == conn)
            .map(|h| h.outbox.clone())
            .ok_or(SendError::Gone)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ClientId, AgentHandle>> {
        // A panic while holding this lock cannot leave the map half-updated (every operation is
        // a single insert or remove), so a poisoned lock is still safe to use.
        self.agents.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait::async_trait]
impl AgentLink for Registry {
    fn connection(&self, client_id: &ClientId) -> Option<ConnId> {
        self.lock().get(client_id).map(|h| h.conn_id)
    }

    fn protocol(&self, client_id: &ClientId, conn: ConnId) -> Option<u32> {
        self.lock()
            .get(client_id)
            .filter(|h| h.conn_id == conn)
            .map(|h| h.protocol_version)
    }

    fn try_send(
        &self,
        client_id: &ClientId,
        conn: ConnId,
        msg: ServerMessage,
    ) -> Result<(), SendError> {
        self.outbox(client_id, conn)?
            .try_send(msg)
            .map_err(|err| match err {
                mpsc::error::TrySendError::Full(_) => SendError::Full,
                mpsc::error::TrySendError::Closed(_) => SendError::Gone,
            })
    }

    async fn send(
        &self,
        client_id: &ClientId,
        conn: ConnId,
        msg: ServerMessage,
    ) -> Result<(), SendError> {
        let outbox = self.outbox(client_id, conn)?;
        outbox.send(msg).await.map_err(|_| SendError::Gone)
    }
}
