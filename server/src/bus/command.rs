//! What crosses the bus between replicas, and the API's calls that may need another replica:
//! each is carried out where the store is held, so every replica answers as the holder would.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use shared::api::collections::CollectionSummary;
use shared::api::{ClientStatus, UploadState, UploadStatus};
use shared::encoding::Compression;
use shared::labels::Labels;
use shared::protocol::ServerMessage;
use shared::{ClientId, CollectionId, ErrorCode, FileName, UploadId};

use super::{Bus, not_connected};
use crate::AppState;
use crate::error::ApiError;
use crate::uploads::{Requester, Uploads};

/// A request to the replica that holds a store.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Command {
    Trigger {
        client_id: ClientId,
        share: FileName,
        compression: Compression,
        operator: String,
        from: SocketAddr,
    },
    Cancel {
        upload_id: UploadId,
        operator: String,
        from: SocketAddr,
    },
    /// The live status of an upload the holder drives.
    Status { upload_id: UploadId },
    /// The store as its holder sees it (`GET /status/{client_id}`).
    Client { client_id: ClientId },
    /// A collection's store, asked by the replica that drives collections.
    Ask {
        upload_id: UploadId,
        client_id: ClientId,
        share: FileName,
        collection_id: CollectionId,
        compression: Compression,
        operator: String,
        from: SocketAddr,
    },
    /// Is this replica alive?
    Ping,
}

/// The holder's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    Triggered { upload_id: UploadId },
    Status { status: Box<UploadStatus> },
    Client { status: Box<ClientStatus> },
    Collection { summary: Box<CollectionSummary> },
    Pong,
    Error { error: WireError },
}

/// An [`ApiError`] on the wire, so that the caller answers exactly what the holder did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireError {
    code: ErrorCode,
    message: String,
    state: Option<UploadState>,
}

impl From<ApiError> for WireError {
    fn from(e: ApiError) -> Self {
        Self {
            code: e.code(),
            message: e.message().to_owned(),
            state: e.state(),
        }
    }
}

impl From<WireError> for ApiError {
    fn from(e: WireError) -> Self {
        let err = ApiError::new(e.code, e.message);
        match e.state {
            Some(state) => err.with_state(state),
            None => err,
        }
    }
}

/// What the replica that drives collections hears from the others (`collections::driver`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "news", rename_all = "snake_case")]
pub enum ToDriver {
    /// A store said hello to another replica: it may join open collections.
    Hello { client_id: ClientId, labels: Labels },
    /// An upload of a collection ended on another replica.
    Ended { status: Box<UploadStatus> },
    /// `DELETE /collections/{id}` on another replica; answered with the summary.
    Cancel {
        collection_id: CollectionId,
        operator: String,
        from: SocketAddr,
    },
}

/// News for every replica.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "broadcast", rename_all = "snake_case")]
pub enum Broadcast {
    /// Every token of the store issued before `not_before` is refused.
    StoreRevoked {
        client_id: ClientId,
        not_before: u64,
    },
    /// One token, by id, until it expires; an agent's names its store.
    TokenRevoked {
        jti: String,
        expires_at: u64,
        client_id: Option<ClientId>,
    },
}

/// Carries out `command` for another replica, as this replica's API would.
pub async fn execute(state: &AppState, command: Command) -> Reply {
    let answer = match command {
        Command::Trigger {
            client_id,
            share,
            compression,
            operator,
            from,
        } => state
            .uploads
            .trigger(client_id, share, compression, &Requester { operator, from })
            .map(|upload_id| Reply::Triggered { upload_id }),
        Command::Cancel {
            upload_id,
            operator,
            from,
        } => state
            .uploads
            .cancel(upload_id, &Requester { operator, from })
            .await
            .map(|status| Reply::Status {
                status: Box::new(status),
            }),
        Command::Status { upload_id } => {
            state.uploads.status(upload_id).map(|status| Reply::Status {
                status: Box::new(status),
            })
        }
        Command::Client { client_id } => Ok(Reply::Client {
            status: Box::new(crate::api::client_status_here(state, client_id)),
        }),
        Command::Ask {
            upload_id,
            client_id,
            share,
            collection_id,
            compression,
            operator,
            from,
        } => {
            let ask = crate::uploads::Ask {
                id: upload_id,
                client_id,
                share,
                collection: Some(collection_id),
                compression,
            };
            state
                .uploads
                .ask(ask, &Requester { operator, from })
                .map(|upload_id| Reply::Triggered { upload_id })
        }
        Command::Ping => Ok(Reply::Pong),
    };
    answer.unwrap_or_else(|e| Reply::Error { error: e.into() })
}

/// Applies news from another replica.
pub fn apply(state: &AppState, news: Broadcast) {
    match news {
        Broadcast::StoreRevoked {
            client_id,
            not_before,
        } => {
            state.revocations.note(&client_id, not_before);
            if let Some(handle) = state.registry.get(&client_id) {
                tracing::info!(%client_id, "the store was revoked on another replica; closing");
                handle.close_revoked();
            }
        }
        Broadcast::TokenRevoked {
            jti,
            expires_at,
            client_id,
        } => {
            state.tokens.note_revoked(&jti, expires_at);
            if let Some(handle) = client_id.and_then(|id| state.registry.get(&id))
                && handle.token.get().jti.as_deref() == Some(jti.as_str())
            {
                handle.close_revoked();
            }
        }
    }
}

/// Another replica claimed `client_id` under `epoch`: an older connection here is closed, and
/// the store's unfinished uploads are let go.
pub fn claimed_elsewhere(state: &AppState, client_id: &ClientId, epoch: u64) {
    if let Some(handle) = state.registry.get(client_id)
        && handle.epoch < epoch
    {
        tracing::info!(%client_id, "the store connected to another replica; closing this connection");
        let _ = handle.outbox.try_send(ServerMessage::Error {
            code: ErrorCode::ConnectionReplaced,
            message: "a newer connection for this client id replaced this one".into(),
        });
        handle.close.cancel();
    }
    state.uploads.release(client_id, epoch);
}

pub fn unexpected(reply: &Reply) -> ApiError {
    ApiError::internal(&anyhow::anyhow!("another replica answered {reply:?}"))
}

/// `POST /trigger-download/{client_id}` on any replica.
pub async fn trigger(
    state: &AppState,
    client_id: ClientId,
    share: FileName,
    compression: Compression,
    requester: &Requester,
) -> Result<UploadId, ApiError> {
    if state.registry.get(&client_id).is_none()
        && let Some(holder) = state.bus.holder_elsewhere(&client_id).await?
    {
        if !holder.connected {
            return Err(not_connected(&client_id));
        }
        let command = Command::Trigger {
            client_id: client_id.clone(),
            share,
            compression,
            operator: requester.operator.clone(),
            from: requester.from,
        };
        return match state.bus.call(&holder, &command).await? {
            Some(Reply::Triggered { upload_id }) => Ok(upload_id),
            Some(Reply::Error { error }) => Err(error.into()),
            Some(other) => Err(unexpected(&other)),
            None => Err(not_connected(&client_id)),
        };
    }
    state
        .uploads
        .trigger(client_id, share, compression, requester)
}

/// `GET /status/{client_id}` on any replica: a store connected to another replica is shown as
/// that replica sees it.
pub async fn client_status(
    state: &AppState,
    client_id: ClientId,
) -> Result<ClientStatus, ApiError> {
    if state.registry.get(&client_id).is_none()
        && let Some(holder) = state.bus.holder_elsewhere(&client_id).await?
        && holder.connected
    {
        let command = Command::Client {
            client_id: client_id.clone(),
        };
        match state.bus.call(&holder, &command).await? {
            Some(Reply::Client { status }) => return Ok(*status),
            Some(Reply::Error { error }) => return Err(error.into()),
            Some(other) => return Err(unexpected(&other)),
            None => {}
        }
    }
    Ok(crate::api::client_status_here(state, client_id))
}

/// `GET /uploads/{id}` on any replica: an unfinished upload another replica drives is shown as
/// that replica sees it (live progress); anything else from here (memory, or the database).
pub async fn status(state: &AppState, id: UploadId) -> Result<UploadStatus, ApiError> {
    status_via(&state.bus, &state.uploads, id).await
}

/// [`status`], with this replica's bus and uploads.
pub async fn status_via(
    bus: &Bus,
    uploads: &Uploads,
    id: UploadId,
) -> Result<UploadStatus, ApiError> {
    let here = uploads.status(id)?;
    if here.state.is_terminal() || uploads.holds(id) {
        return Ok(here);
    }
    let Some(holder) = bus.holder_elsewhere(&here.client_id).await? else {
        return Ok(here);
    };
    match bus
        .call(&holder, &Command::Status { upload_id: id })
        .await?
    {
        Some(Reply::Status { status }) => Ok(*status),
        Some(Reply::Error { error }) => Err(error.into()),
        Some(other) => Err(unexpected(&other)),
        None => Ok(here),
    }
}

/// `DELETE /uploads/{id}` on any replica: carried out by the replica that drives the upload. One
/// that no live replica holds is taken on here first, under a claim of its store, and ended.
pub async fn cancel(
    state: &AppState,
    id: UploadId,
    requester: &Requester,
) -> Result<UploadStatus, ApiError> {
    cancel_via(&state.bus, &state.uploads, id, requester).await
}

/// [`cancel`], with this replica's bus and uploads.
pub async fn cancel_via(
    bus: &Bus,
    uploads: &Uploads,
    id: UploadId,
    requester: &Requester,
) -> Result<UploadStatus, ApiError> {
    // A store that changes hands while this runs is looked up again, a few rounds at most.
    for _ in 0..CANCEL_ROUNDS {
        let here = uploads.status(id)?;
        if uploads.holds(id) || here.state.is_terminal() {
            return uploads.cancel(id, requester).await;
        }
        let seen = bus.presence(&here.client_id).await?;
        if let Some(holder) = seen.as_ref().filter(|h| !bus.is_mine(h)) {
            let command = Command::Cancel {
                upload_id: id,
                operator: requester.operator.clone(),
                from: requester.from,
            };
            match bus.call(holder, &command).await? {
                Some(Reply::Status { status }) => return Ok(*status),
                Some(Reply::Error { error }) => return Err(error.into()),
                Some(other) => return Err(unexpected(&other)),
                None => {}
            }
        }
        if let Some(epoch) = bus
            .claim_unchanged(&here.client_id, seen.as_ref().map(|h| h.epoch))
            .await?
        {
            uploads.take_on(&here.client_id, epoch).await;
            return uploads.cancel(id, requester).await;
        }
    }
    Err(ApiError::new(
        ErrorCode::Timeout,
        format!("the store of upload {id} kept moving between replicas; try the cancel again"),
    ))
}

/// How many times a cancel looks up the replica of a store that keeps changing hands.
const CANCEL_ROUNDS: usize = 3;

#[cfg(test)]
mod tests {
    use serde::de::DeserializeOwned;

    use super::*;

    /// `msg` as a newer release would send it, with a field this release does not know in
    /// every object (the message and what it carries), still reads as `msg`.
    fn reads_with_fields_added<T: Serialize + DeserializeOwned>(msg: &T) {
        fn add(v: &mut serde_json::Value) {
            if let Some(object) = v.as_object_mut() {
                object.values_mut().for_each(add);
                object.insert("added_later".into(), serde_json::json!({"x": [1]}));
            }
        }
        let sent = serde_json::to_value(msg).unwrap();
        let mut newer = sent.clone();
        add(&mut newer);
        let read: T = serde_json::from_value(newer.clone())
            .unwrap_or_else(|e| panic!("{newer} was not read: {e}"));
        assert_eq!(serde_json::to_value(&read).unwrap(), sent);
    }

    #[test]
    fn messages_from_a_newer_release_with_fields_this_one_lacks_are_read() {
        let client_id = ClientId::parse("store-1").unwrap();
        let from: SocketAddr = "10.0.0.7:51000".parse().unwrap();
        let upload_id = UploadId::new_random();
        reads_with_fields_added(&Command::Trigger {
            client_id: client_id.clone(),
            share: FileName::parse("z-report").unwrap(),
            compression: Compression::Auto,
            operator: "ops".into(),
            from,
        });
        reads_with_fields_added(&Command::Cancel {
            upload_id,
            operator: "ops".into(),
            from,
        });
        reads_with_fields_added(&Command::Ping);
        reads_with_fields_added(&Reply::Triggered { upload_id });
        reads_with_fields_added(&Reply::Error {
            error: ApiError::new(ErrorCode::DownloadInProgress, "busy")
                .with_state(UploadState::Uploading)
                .into(),
        });
        reads_with_fields_added(&ToDriver::Cancel {
            collection_id: CollectionId::new_random(),
            operator: "ops".into(),
            from,
        });
        reads_with_fields_added(&Broadcast::StoreRevoked {
            client_id: client_id.clone(),
            not_before: 1_780_000_000,
        });
        reads_with_fields_added(&Broadcast::TokenRevoked {
            jti: "a1".into(),
            expires_at: 1_780_000_000,
            client_id: Some(client_id),
        });
    }

    #[test]
    fn a_message_of_a_kind_this_release_does_not_know_is_an_error_not_a_guess() {
        let err = serde_json::from_str::<Command>(r#"{"command":"added_later"}"#).unwrap_err();
        assert!(err.to_string().contains("unknown variant"), "{err}");
        assert!(serde_json::from_str::<Broadcast>(r#"{"broadcast":"added_later"}"#).is_err());
    }
}
