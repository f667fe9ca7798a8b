//! `GET /ws/connect`: one task per agent connection, split into a reader (this task) and a
//! writer joined by the connection's bounded outbox.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{WebSocket, WebSocketUpgrade};
use axum::http::HeaderMap;
use axum::response::Response;
use shared::labels::Labels;
use shared::protocol::{
    AgentMessage, MAX_MESSAGE_BYTES, OLDEST_PROTOCOL_VERSION, PROTOCOL_VERSION, ServerMessage,
};
use shared::{ClientId, ErrorCode};
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::AppState;
use crate::auth::{AgentCredential, agent_identity};
use crate::connection::{self, AgentWriter, Incoming};
use crate::error::ApiError;
use crate::registry::{AgentHandle, ConnId, Handshaking, HeldToken, OUTBOX_CAPACITY};
use crate::renewal::{self, Renewal};

/// How long the writer waits before trying a failed renewal again.
const RENEWAL_RETRY: Duration = Duration::from_secs(60);

/// How long a new connection has to send its `hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// WebSocket close codes (RFC 6455).
const CLOSE_NORMAL: u16 = 1000;
const CLOSE_GOING_AWAY: u16 = 1001;
const CLOSE_PROTOCOL_ERROR: u16 = 1002;
const CLOSE_POLICY: u16 = 1008;

pub async fn connect(
    State(state): State<AppState>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    // Authenticate before looking at the upgrade, so a bad token is always a 401.
    let credential = agent_identity(&state.tokens, &state.revocations, &headers)?;
    let client_id = credential.client_id.clone();
    let upgrade = upgrade.map_err(|e| ApiError::new(ErrorCode::BadRequest, e.body_text()))?;
    // Connections still in their handshake count too, so that sockets which never say hello
    // cannot crowd out agents that do (they are cut after HELLO_TIMEOUT).
    if state.registry.connections() >= state.config.max_agent_connections
        && state.registry.get(&client_id).is_none()
    {
        return Err(ApiError::new(
            ErrorCode::TooManyConnections,
            "the server is at its agent connection limit",
        ));
    }
    let handshaking = state.registry.handshaking();
    Ok(upgrade
        .max_message_size(MAX_MESSAGE_BYTES)
        .max_frame_size(MAX_MESSAGE_BYTES)
        // Agents send little; small buffers keep an idle connection cheap.
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
        .on_upgrade(move |socket| run_session(state, credential, handshaking, socket)))
}

/// One agent connection: the handshake, then registration, the writer task and the read loop.
async fn run_session(
    state: AppState,
    credential: AgentCredential,
    handshaking: Handshaking,
    socket: WebSocket,
) {
    let client_id = credential.client_id;
    let (mut reader, mut writer) = connection::split(socket);
    let Some(hello) = handshake(&client_id, &mut reader, &mut writer).await else {
        return;
    };
    let protocol_version = hello.protocol_version;
    let expires_at = credential.token.expires_at;
    let held = Arc::new(HeldToken::new(credential.token.clone()));
    let (session, outbox_rx) = Registration::new(&state, &client_id, hello, held.clone()).await;
    drop(handshaking);
    // A revocation between the token check and the registration found no connection to close:
    // look again now that this one is registered (a revocation after this finds it).
    if state
        .revocations
        .is_revoked(&client_id, credential.issued_at)
        || credential
            .token
            .jti
            .as_deref()
            .is_some_and(|jti| state.tokens.is_revoked(jti))
    {
        tracing::warn!(%client_id, "token revoked during the handshake; closing");
        let _ = session.outbox.try_send(ServerMessage::Error {
            code: ErrorCode::Unauthorized,
            message: "this agent's token was revoked".into(),
        });
        session.close.cancel();
    }
    let mut renewal = Renewal::for_agent(
        state.tokens.clone(),
        client_id.clone(),
        protocol_version,
        (
            state.config.agent_token_ttl(),
            state.config.token_rotation_spread(),
        ),
        held,
    );
    renewal::warn_if_expiring(
        &client_id,
        protocol_version,
        expires_at,
        renewal.as_mut().is_some_and(|r| r.due_in().is_zero()),
    );
    let writer_task = spawn_writer(&state, writer, outbox_rx, renewal, session.close.clone());
    read_loop(&state, &session, &mut reader).await;
    session.close.cancel();
    let _ = writer_task.await;
    // `session` drops here, and with it the registry entry.
}

/// What an accepted `hello` said.
struct Hello {
    protocol_version: u32,
    agent_version: String,
    labels: Labels,
}

/// Longest agent version kept; it is shown to operators.
const MAX_AGENT_VERSION_CHARS: usize = 64;

/// The first message must be a hello with a protocol version the server serves (this release's
/// or the previous one); anything else is answered with an error and a close. Returns the
/// agent's versions if the session may go on.
async fn handshake(
    client_id: &ClientId,
    reader: &mut connection::AgentReader,
    writer: &mut AgentWriter,
) -> Option<Hello> {
    let hello = tokio::time::timeout(HELLO_TIMEOUT, reader.recv()).await;
    match hello {
        Ok(Ok(Some(Incoming::Message(AgentMessage::Hello {
            protocol_version,
            agent_version,
            labels,
        })))) => {
            if !(OLDEST_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&protocol_version) {
                let message = format!(
                    "agent speaks protocol {protocol_version}, server speaks {OLDEST_PROTOCOL_VERSION} to {PROTOCOL_VERSION}: upgrade the {}",
                    if protocol_version < PROTOCOL_VERSION {
                        "agent"
                    } else {
                        "server"
                    }
                );
                tracing::warn!(%client_id, ?agent_version, "{message}");
                reject(writer, ErrorCode::ProtocolVersionMismatch, &message).await;
                return None;
            }
            tracing::info!(%client_id, ?agent_version, protocol_version, %labels, "agent connected");
            Some(Hello {
                protocol_version,
                labels,
                agent_version: agent_version
                    .chars()
                    .take(MAX_AGENT_VERSION_CHARS)
                    .collect(),
            })
        }
        Ok(Ok(Some(_))) => {
            reject(
                writer,
                ErrorCode::UnexpectedMessage,
                "the first message must be hello",
            )
            .await;
            None
        }
        Ok(Err(err)) => {
            reject(writer, err.code(), &err.to_string()).await;
            None
        }
        Ok(Ok(None)) => None,
        Err(_) => {
            reject(writer, ErrorCode::AgentTimeout, "no hello received").await;
            None
        }
    }
}

/// A connection's place in the registry. Its `Drop` removes the entry (unless a newer connection
/// replaced it), tells the uploads that the agent is away and stops the writer, on every way out
/// of the session, a panic in a handler included.
struct Registration {
    state: AppState,
    client_id: ClientId,
    conn_id: ConnId,
    /// The claim on the bus under which this replica holds the store (0 for one server).
    epoch: u64,
    outbox: mpsc::Sender<ServerMessage>,
    last_seen_ms: Arc<AtomicI64>,
    /// Ends the writer, and the session with it.
    close: CancellationToken,
}

impl Registration {
    /// Registers the connection (replacing an older one of the same client), queues the
    /// welcome and lets the uploads know the agent is here.
    async fn new(
        state: &AppState,
        client_id: &ClientId,
        hello: Hello,
        token: Arc<HeldToken>,
    ) -> (Self, mpsc::Receiver<ServerMessage>) {
        let protocol_version = hello.protocol_version;
        state
            .metrics
            .agent_connections
            .fetch_add(1, Ordering::Relaxed);
        let now = OffsetDateTime::now_utc();
        let seen = crate::inventory::Store {
            client_id: client_id.clone(),
            labels: hello.labels.clone(),
            agent_version: hello.agent_version.clone(),
            protocol_version,
            first_seen_ms: unix_ms(now),
            last_seen_ms: unix_ms(now),
        };
        // Recorded before the store is claimed, so that it is in the inventory once any replica
        // shows it as connected. (Nothing between the claim and the registry's entry below may
        // wait: a newer claim elsewhere, heard meanwhile, would find no entry here to close.)
        state.inventory.connected(seen).written().await;
        let conn_id = state.registry.next_conn_id();
        // The newest connection holds the store, on every replica.
        let epoch = state.bus.claim(client_id).await;
        let close = state.shutdown.child_token();
        let (outbox, outbox_rx) = mpsc::channel::<ServerMessage>(OUTBOX_CAPACITY);
        let last_seen_ms = Arc::new(AtomicI64::new(unix_ms(now)));
        let labels = hello.labels.clone();
        let handle = AgentHandle {
            conn_id,
            epoch,
            outbox: outbox.clone(),
            connected_since: now,
            protocol_version,
            agent_version: hello.agent_version,
            labels: hello.labels,
            last_seen_ms: last_seen_ms.clone(),
            token,
            close: close.clone(),
        };
        let registration = Self {
            state: state.clone(),
            client_id: client_id.clone(),
            conn_id,
            epoch,
            outbox,
            last_seen_ms,
            close,
        };
        if let Some(old) = state.registry.insert(client_id.clone(), handle) {
            tracing::info!(%client_id, old_conn = %old.conn_id, "replacing an older connection");
            let _ = old.outbox.try_send(ServerMessage::Error {
                code: ErrorCode::ConnectionReplaced,
                message: "a newer connection for this client id replaced this one".into(),
            });
            old.close.cancel();
        }
        let _ = registration
            .outbox
            .send(ServerMessage::Welcome {
                client_id: client_id.clone(),
                protocol_version,
            })
            .await;
        // An upload the agent left unfinished resumes first; a collection's waits behind it.
        state.uploads.on_agent_connected(client_id, conn_id, epoch);
        state.collections.on_agent_connected(client_id, &labels);
        (registration, outbox_rx)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.close.cancel();
        self.state.registry.remove(&self.client_id, self.conn_id);
        let last_seen = self.last_seen_ms.load(Ordering::Relaxed);
        self.state.inventory.left(&self.client_id, last_seen);
        self.state.uploads.on_agent_disconnected(self.conn_id);
        self.state
            .bus
            .left(&self.client_id, self.epoch, &self.state.tracker);
        tracing::info!(client_id = %self.client_id, conn_id = %self.conn_id, "agent disconnected");
    }
}

/// The writer: drains the outbox, pings, and sends the agent a fresh token whenever its current
/// one is due (`renewal`), which a key rotation can bring forward. On close it flushes what is
/// queued first, so an error message reaches the agent before the close frame. Whatever ends it
/// ends the session.
fn spawn_writer(
    state: &AppState,
    mut writer: AgentWriter,
    mut outbox_rx: mpsc::Receiver<ServerMessage>,
    mut renewal: Option<Renewal>,
    close: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let ping_interval = Duration::from_secs(state.config.ping_interval_secs.max(1));
    let mut active_key = renewal.as_ref().map(|_| state.tokens.watch_active());
    state.tracker.spawn(async move {
        let mut ping = tokio::time::interval(ping_interval);
        ping.tick().await;
        // A failed renewal is tried again after a pause rather than in a spin.
        let mut renewal_paused_until = Instant::now();
        loop {
            let pause = renewal_paused_until.saturating_duration_since(Instant::now());
            let renew_in = renewal.as_mut().map(|r| r.due_in().max(pause));
            tokio::select! {
                () = tokio::time::sleep(renew_in.unwrap_or(Duration::MAX)), if renew_in.is_some() => {
                    let Some(renewal) = &mut renewal else { continue };
                    match renewal.renew() {
                        Ok(msg) => {
                            if writer.send(&msg).await.is_err() { break; }
                        }
                        Err(e) => {
                            tracing::error!(error = format!("{e:#}"), "could not mint a renewed agent token");
                            renewal_paused_until = Instant::now() + RENEWAL_RETRY;
                        }
                    }
                }
                // A rotation: look again at when the token is due.
                () = key_changed(&mut active_key) => {}
                msg = outbox_rx.recv() => match msg {
                    Some(msg) => {
                        if writer.send(&msg).await.is_err() { break; }
                    }
                    None => break,
                },
                _ = ping.tick() => {
                    if writer.ping().await.is_err() { break; }
                }
                () = close.cancelled() => {
                    while let Ok(msg) = outbox_rx.try_recv() {
                        if writer.send(&msg).await.is_err() { break; }
                    }
                    writer.close(CLOSE_GOING_AWAY, "closing").await;
                    break;
                }
            }
        }
        close.cancel();
    })
}

/// Resolves when the active signing key changes; never without a receiver.
async fn key_changed(active_key: &mut Option<tokio::sync::watch::Receiver<String>>) {
    let changed = match active_key {
        Some(rx) => rx.changed().await.is_ok(),
        None => false,
    };
    if !changed {
        std::future::pending::<()>().await;
    }
}

/// The reader: dispatches messages until the agent leaves, goes quiet, misbehaves or is closed.
async fn read_loop(state: &AppState, session: &Registration, reader: &mut connection::AgentReader) {
    let client_id = &session.client_id;
    let idle_timeout = Duration::from_secs(state.config.agent_idle_timeout_secs.max(1));
    let mut rate = TokenBucket::new(state.config.agent_max_messages_per_sec, Instant::now());
    loop {
        let incoming = tokio::select! {
            () = session.close.cancelled() => return,
            r = tokio::time::timeout(idle_timeout, reader.recv()) => r,
        };
        match incoming {
            Ok(Ok(Some(_))) if !rate.allow(Instant::now()) => {
                tracing::warn!(%client_id, "agent exceeded its message rate, closing");
                let _ = session.outbox.try_send(ServerMessage::Error {
                    code: ErrorCode::RateLimited,
                    message: format!(
                        "more than {} messages per second",
                        state.config.agent_max_messages_per_sec
                    ),
                });
                return;
            }
            Ok(Ok(Some(incoming))) => {
                session
                    .last_seen_ms
                    .store(unix_ms(OffsetDateTime::now_utc()), Ordering::Relaxed);
                if let Incoming::Message(msg) = incoming {
                    state
                        .uploads
                        .on_agent_message(client_id, session.conn_id, msg);
                }
            }
            Ok(Ok(None)) => return,
            Ok(Err(err)) => {
                tracing::warn!(%client_id, error = %err, "closing connection");
                let _ = session.outbox.try_send(ServerMessage::Error {
                    code: err.code(),
                    message: err.to_string(),
                });
                return;
            }
            Err(_) => {
                tracing::warn!(%client_id, "agent silent for too long, closing");
                return;
            }
        }
    }
}

async fn reject(writer: &mut AgentWriter, code: ErrorCode, message: &str) {
    let _ = writer
        .send(&ServerMessage::Error {
            code,
            message: message.to_owned(),
        })
        .await;
    let close_code = match code {
        ErrorCode::ProtocolVersionMismatch | ErrorCode::UnexpectedMessage => CLOSE_PROTOCOL_ERROR,
        ErrorCode::MalformedMessage => CLOSE_POLICY,
        _ => CLOSE_NORMAL,
    };
    writer.close(close_code, code.as_str()).await;
}

/// Allows `rate` events per second on average and bursts of up to `2 × rate`.
#[derive(Debug)]
struct TokenBucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: u32, now: Instant) -> Self {
        let rate = f64::from(rate.max(1));
        Self {
            rate,
            capacity: rate * 2.0,
            tokens: rate * 2.0,
            last: now,
        }
    }

    fn allow(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

fn unix_ms(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_bucket_allows_bursts_then_the_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(10, start);
        let burst = (0..100).take_while(|_| bucket.allow(start)).count();
        assert_eq!(burst, 20);
        assert!(!bucket.allow(start));
        // Half a second later, five more.
        let later = start + Duration::from_millis(500);
        let refilled = (0..100).take_while(|_| bucket.allow(later)).count();
        assert_eq!(refilled, 5);
    }
}
