//! The connected agents, by client id.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use shared::ClientId;
use shared::protocol::ServerMessage;
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Capacity of each connection's outgoing queue. Commands are rare and small; a full queue means
/// the agent stopped reading, and the caller is told rather than left waiting.
pub const OUTBOX_CAPACITY: usize = 32;

/// How the rest of the server reaches one live agent connection.
#[derive(Debug, Clone)]
pub struct AgentHandle {
    pub conn_id: u64,
    pub outbox: mpsc::Sender<ServerMessage>,
    pub connected_since: OffsetDateTime,
    /// Unix milliseconds of the last frame received, updated by the connection's reader.
    pub last_seen_ms: Arc<AtomicI64>,
    /// Cancelled to close the connection (replaced by a newer one, server shutting down).
    pub close: CancellationToken,
}

impl AgentHandle {
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
}

impl Registry {
    pub fn next_conn_id(&self) -> u64 {
        self.next_conn_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Registers a connection and returns the one it replaces, if any.
    pub fn insert(&self, client_id: ClientId, handle: AgentHandle) -> Option<AgentHandle> {
        self.lock().insert(client_id, handle)
    }

    /// Removes the entry only if it still belongs to `conn_id`: a replaced connection must not
    /// remove its successor.
    pub fn remove(&self, client_id: &ClientId, conn_id: u64) {
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

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ClientId, AgentHandle>> {
        // A panic while holding this lock cannot leave the map half-updated (every operation is
        // a single insert or remove), so a poisoned lock is still safe to use.
        self.agents.lock().unwrap_or_else(|e| e.into_inner())
    }
}
