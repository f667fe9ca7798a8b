//! The look, on the holder of the `Abandoned` lease, for stores whose unfinished uploads no live
//! replica drives: their replica died while the agent was away, or before it came back. Each
//! is claimed and taken on here, so that the stall timeout, the endings and the verifications
//! run somewhere.
//!
//! A store is taken on only when its presence has stayed the same for two looks in a row, and
//! the claim is made over that very revision ([`super::Bus::claim_unchanged`]). An agent that
//! connects anywhere meanwhile changes the presence, so its connection is never replaced by
//! this claim: a replaced agent would back off for minutes, and its upload would wait for it.

use std::collections::HashMap;
use std::sync::Mutex;

use shared::ClientId;

use crate::AppState;

/// The stores seen abandoned on the last look, with the presence revision each had then
/// (`None`: no presence at all).
#[derive(Default)]
pub struct Look {
    candidates: Mutex<HashMap<ClientId, Option<u64>>>,
}

impl Look {
    /// One look: stores seen abandoned, unchanged, on the previous look are taken on; the
    /// others seen abandoned now are remembered for the next.
    pub async fn run(&self, state: &AppState) {
        if state.bus.replica().is_none() {
            return;
        }
        let previous = std::mem::take(&mut *self.lock());
        let mut seen_now = HashMap::new();
        // Each holder is pinged once per look, however many stores it holds.
        let mut alive = HashMap::new();
        for client_id in state.uploads.unfinished_clients() {
            let Some(revision) = abandoned(state, &client_id, &mut alive).await else {
                continue;
            };
            if previous.get(&client_id) != Some(&revision) {
                seen_now.insert(client_id, revision);
                continue;
            }
            take_on(state, &client_id, revision).await;
        }
        *self.lock() = seen_now;
    }

    /// Forgets what was seen: this replica does not hold the lease now.
    pub fn forget(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ClientId, Option<u64>>> {
        self.candidates.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// If no live replica drives `client_id`'s unfinished uploads, the revision of its presence
/// (`Some(None)` when it has none). `alive` holds the answers of the replicas pinged so far.
async fn abandoned(
    state: &AppState,
    client_id: &ClientId,
    alive: &mut HashMap<String, bool>,
) -> Option<Option<u64>> {
    if held_here(state, client_id) {
        return None;
    }
    let seen = state.bus.presence(client_id).await.ok()?;
    // Looked at again: a connection may have registered while presence was read.
    if held_here(state, client_id) {
        return None;
    }
    if let Some(holder) = &seen
        && !state.bus.is_mine(holder)
    {
        let answers = match alive.get(&holder.replica) {
            Some(answers) => *answers,
            None => {
                let answers = state.bus.alive(holder).await;
                alive.insert(holder.replica.clone(), answers);
                answers
            }
        };
        if answers {
            return None;
        }
    }
    Some(seen.map(|h| h.epoch))
}

fn held_here(state: &AppState, client_id: &ClientId) -> bool {
    state.registry.get(client_id).is_some() || state.uploads.active_for(client_id).is_some()
}

async fn take_on(state: &AppState, client_id: &ClientId, revision: Option<u64>) {
    match state.bus.claim_unchanged(client_id, revision).await {
        Ok(Some(epoch)) => {
            tracing::warn!(%client_id, "no live replica holds the store's unfinished upload; taking it on");
            state.uploads.take_on(client_id, epoch).await;
        }
        Ok(None) => {
            tracing::info!(%client_id, "the store was claimed while it looked abandoned; its holder drives it");
        }
        Err(e) => {
            tracing::warn!(%client_id, error = %e.message(), "claiming an abandoned store failed; the next look tries again");
        }
    }
}
