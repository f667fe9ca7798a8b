//! One connection's session: a `select!` over shutdown, the outbox, pings, the idle deadline,
//! finished describes and incoming messages. Describes and uploads run on tasks of their own
//! (children of the session's token), so the loop keeps answering while a file is hashed.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use shared::protocol::{AgentMessage, PROTOCOL_VERSION, ServerMessage, UploadPlan};
use shared::{ErrorCode, FileName, UploadId};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::connection::{Incoming, ServerConnection};
use crate::token::AgentToken;
use crate::uploader::{
    self, DescribeSettings, DiskPacer, Encoded, KnownHashes, Layout, Progress, RateLimiter,
    UploadSettings,
};

/// How often progress is reported while parts are in flight.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(500);
/// Queue of messages from upload tasks to the session writer.
const OUTBOX_CAPACITY: usize = 64;

pub(crate) enum SessionEnd {
    Shutdown,
    Lost(String),
    /// The server closed this connection for a newer one with the same identity.
    Replaced,
}

/// A describe that ran on its own task, back to the session.
struct DescribeDone {
    upload_id: UploadId,
    /// Which describe of the upload this was: a later one supersedes it.
    serial: u64,
    path: PathBuf,
    result: Result<uploader::Described, uploader::UploadError>,
    elapsed: Duration,
}

/// A file described for an upload: where it is, its layout, and its encoded parts if any.
#[derive(Clone)]
struct DescribedFile {
    path: PathBuf,
    layout: Layout,
    encoded: Option<Arc<Encoded>>,
}

pub(crate) struct Session<'a> {
    config: &'a Config,
    http: &'a reqwest::Client,
    conn: ServerConnection,
    outbox_tx: mpsc::Sender<AgentMessage>,
    outbox_rx: mpsc::Receiver<AgentMessage>,
    /// Upload tasks of this session, by upload id; cancelled when the session ends.
    uploads: HashMap<UploadId, CancellationToken>,
    /// The file each described upload refers to, as described (with its spool, if it was
    /// encoded); kept until the upload ends here, because a plan for fresh URLs can follow the
    /// first one.
    described: HashMap<UploadId, DescribedFile>,
    limiter: Option<Arc<RateLimiter>>,
    /// SHA-256s of files uploaded, kept across sessions.
    known: KnownHashes,
    /// The token to connect with next time; replaced when the server renews it.
    token: &'a mut AgentToken,
    /// Describes running on their own tasks, by upload: their serial and how to stop them.
    describing: HashMap<UploadId, (u64, CancellationToken)>,
    next_serial: u64,
    describe_tx: mpsc::Sender<DescribeDone>,
    describe_rx: mpsc::Receiver<DescribeDone>,
    hash_pacer: Option<Arc<DiskPacer>>,
    session_cancel: CancellationToken,
}

impl<'a> Session<'a> {
    pub(crate) fn new(
        config: &'a Config,
        http: &'a reqwest::Client,
        conn: ServerConnection,
        limiter: Option<Arc<RateLimiter>>,
        known: KnownHashes,
        token: &'a mut AgentToken,
        hash_pacer: Option<Arc<DiskPacer>>,
    ) -> Self {
        let (outbox_tx, outbox_rx) = mpsc::channel(OUTBOX_CAPACITY);
        let (describe_tx, describe_rx) = mpsc::channel(OUTBOX_CAPACITY);
        Self {
            config,
            http,
            conn,
            outbox_tx,
            outbox_rx,
            uploads: HashMap::new(),
            described: HashMap::new(),
            limiter,
            known,
            token,
            describing: HashMap::new(),
            next_serial: 0,
            describe_tx,
            describe_rx,
            hash_pacer,
            session_cancel: CancellationToken::new(),
        }
    }

    pub(crate) async fn run(
        &mut self,
        shutdown: &CancellationToken,
        backoff: &mut crate::backoff::Backoff,
    ) -> SessionEnd {
        let end = self.run_inner(shutdown, backoff).await;
        // Uploads are bound to the connection: the server fails them when it drops.
        self.session_cancel.cancel();
        end
    }

    async fn run_inner(
        &mut self,
        shutdown: &CancellationToken,
        backoff: &mut crate::backoff::Backoff,
    ) -> SessionEnd {
        let hello = AgentMessage::Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            // Checked when the agent started.
            labels: self.config.labels().unwrap_or_default(),
        };
        if let Err(e) = self.conn.send(&hello).await {
            return SessionEnd::Lost(e.to_string());
        }
        let idle_timeout = Duration::from_secs(self.config.server_idle_timeout_secs.max(1));
        let mut deadline = Instant::now() + idle_timeout;
        let mut ping =
            tokio::time::interval(Duration::from_secs(self.config.ping_interval_secs.max(1)));
        ping.tick().await;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => {
                    self.session_cancel.cancel();
                    self.conn.close().await;
                    return SessionEnd::Shutdown;
                }
                Some(msg) = self.outbox_rx.recv() => {
                    if let AgentMessage::UploadCompleted { upload_id, .. }
                    | AgentMessage::UploadFailed { upload_id, .. } = &msg
                    {
                        self.described.remove(upload_id);
                    }
                    if let Err(e) = self.conn.send(&msg).await {
                        return SessionEnd::Lost(e.to_string());
                    }
                }
                Some(done) = self.describe_rx.recv() => {
                    if let Err(e) = self.finish_describe(done).await {
                        return SessionEnd::Lost(e.to_string());
                    }
                }
                _ = ping.tick() => {
                    if let Err(e) = self.conn.ping().await {
                        return SessionEnd::Lost(e.to_string());
                    }
                }
                () = tokio::time::sleep_until(deadline) => {
                    return SessionEnd::Lost(format!("nothing heard from the server for {}s", idle_timeout.as_secs()));
                }
                incoming = self.conn.recv() => {
                    deadline = Instant::now() + idle_timeout;
                    match incoming {
                        Ok(Some(Incoming::Message(msg))) => {
                            if let Some(end) = self.handle(msg, backoff).await {
                                return end;
                            }
                        }
                        Ok(Some(Incoming::Heartbeat)) => {}
                        Ok(None) => return SessionEnd::Lost("server closed the connection".into()),
                        Err(e) => return SessionEnd::Lost(e.to_string()),
                    }
                }
            }
        }
    }

    async fn handle(
        &mut self,
        msg: ServerMessage,
        backoff: &mut crate::backoff::Backoff,
    ) -> Option<SessionEnd> {
        match msg {
            ServerMessage::Welcome { client_id, .. } => {
                tracing::info!(%client_id, "connected to server");
                backoff.reset();
            }
            ServerMessage::DescribeFile {
                upload_id,
                share,
                min_part_size,
                compression,
                layout_hint,
            } => self.start_describe(upload_id, &share, min_part_size, compression, layout_hint),
            ServerMessage::StartUpload(plan) => self.start_upload(plan),
            ServerMessage::CancelUpload { upload_id, code } => {
                // A cancel can come while the file is hashed, or between describe and plan.
                self.described.remove(&upload_id);
                if let Some((_, token)) = self.describing.remove(&upload_id) {
                    tracing::info!(%upload_id, %code, "server cancelled the upload while the file was described");
                    token.cancel();
                }
                if let Some(token) = self.uploads.remove(&upload_id) {
                    tracing::info!(%upload_id, %code, "server cancelled the upload");
                    token.cancel();
                }
            }
            ServerMessage::TokenRenewed { token, expires_at } => {
                self.token.replace(token, expires_at);
            }
            ServerMessage::Error { code, message } => {
                tracing::error!(%code, message, "server reported an error");
                if code == ErrorCode::ConnectionReplaced {
                    return Some(SessionEnd::Replaced);
                }
            }
        }
        None
    }

    /// Describes a share on a task of its own, so that pings and cancels are answered while a
    /// large file is hashed; the answer goes out when it is done ([`Self::finish_describe`]).
    fn start_describe(
        &mut self,
        upload_id: UploadId,
        share: &FileName,
        min_part_size: u64,
        compression: Option<shared::encoding::Compression>,
        layout_hint: Vec<u64>,
    ) {
        let Some(path) = self.config.share_path(share) else {
            let _ = self.outbox_tx.try_send(AgentMessage::UploadFailed {
                upload_id,
                code: ErrorCode::FileNotShared,
                message: format!("this agent does not share '{share}'"),
                sha256: None,
            });
            return;
        };
        self.next_serial += 1;
        let serial = self.next_serial;
        let cancel = self.session_cancel.child_token();
        if let Some((_, older)) = self.describing.insert(upload_id, (serial, cancel.clone())) {
            older.cancel();
        }
        let tx = self.describe_tx.clone();
        // A server of protocol 4 or older asks for no compression, and gets none.
        let compression = compression.map_or(shared::encoding::Compression::None, |asked| {
            asked.over(self.config.share_compression(share))
        });
        let mut settings = DescribeSettings {
            max_size: self.config.max_file_size,
            min_part_size,
            threads: self.config.hash_threads,
            pacer: self.hash_pacer.clone(),
            compression,
            zstd_level: self.config.zstd_level,
            spool_dir: self.config.spool_dir(),
            layout_hint,
            seal: None,
        };
        // An encrypted share is sealed whatever the server asked: its recipients are pinned here.
        let recipients = self.config.share_recipients(share).to_vec();
        let key_dir = self.config.key_dir();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let described = async {
                if !recipients.is_empty() {
                    let key = tokio::task::spawn_blocking(move || {
                        crate::store_keys::load_or_create(&key_dir, &recipients)
                    })
                    .await
                    .map_err(|e| {
                        uploader::UploadError::new(ErrorCode::FileReadError, e.to_string())
                    })??;
                    settings.seal = Some(Arc::new(key));
                }
                uploader::describe_file(&path, &settings).await
            };
            let result = tokio::select! {
                r = described => r,
                () = cancel.cancelled() => return,
            };
            let _ = tx
                .send(DescribeDone {
                    upload_id,
                    serial,
                    path,
                    result,
                    elapsed: started.elapsed(),
                })
                .await;
        });
    }

    /// Answers a describe that finished, unless it was cancelled or superseded meanwhile.
    async fn finish_describe(&mut self, done: DescribeDone) -> Result<(), tungstenite::Error> {
        let DescribeDone {
            upload_id,
            serial,
            path,
            result,
            elapsed,
        } = done;
        match self.describing.get(&upload_id) {
            Some((current, token)) if *current == serial && !token.is_cancelled() => {
                self.describing.remove(&upload_id);
            }
            _ => return Ok(()),
        }
        let reply = match result {
            Ok(d) => {
                let stored = d.encoded.as_ref().map(|e| e.stored_size());
                tracing::info!(%upload_id, size = d.snapshot.size, ?stored, ?elapsed, "file described");
                let layout = Layout {
                    snapshot: d.snapshot,
                    part_size: d.part_size,
                    part_crc64nvme: d.part_crc64nvme.clone().into(),
                };
                let (sha256, encoding, encoded_parts) = match &d.encoded {
                    Some(e) => (Some(e.sha256.clone()), Some(e.encoding), e.parts.clone()),
                    None => (self.known.lookup(&path, &layout), None, Vec::new()),
                };
                // Remember the path only for a file the server may now plan an upload of.
                self.described.insert(
                    upload_id,
                    DescribedFile {
                        path,
                        layout,
                        encoded: d.encoded,
                    },
                );
                AgentMessage::FileInfo {
                    upload_id,
                    file_name: d.file_name,
                    size: d.snapshot.size,
                    modified_ms: d.snapshot.modified_ms,
                    part_size: d.part_size,
                    part_crc64nvme: d.part_crc64nvme.iter().map(|c| c.to_base64()).collect(),
                    sha256,
                    part_md5: Vec::new(),
                    encoding,
                    encoded_parts,
                    part_digests: d.part_digests,
                }
            }
            Err(e) => {
                tracing::warn!(%upload_id, code = %e.code, message = e.message, "cannot share the file");
                AgentMessage::UploadFailed {
                    upload_id,
                    code: e.code,
                    message: e.message,
                    sha256: None,
                }
            }
        };
        self.conn.send(&reply).await
    }

    fn start_upload(&mut self, plan: UploadPlan) {
        let upload_id = plan.upload_id;
        // Only a file this session described can be uploaded.
        let Some(DescribedFile {
            path,
            layout,
            encoded,
        }) = self.described.get(&upload_id).cloned()
        else {
            tracing::warn!(%upload_id, "plan for an upload this agent never described");
            let _ = self.outbox_tx.try_send(AgentMessage::UploadFailed {
                upload_id,
                code: ErrorCode::UnexpectedMessage,
                message: "no file was described for this upload".into(),
                sha256: None,
            });
            return;
        };
        self.uploads.retain(|_, t| !t.is_cancelled());
        if self.uploads.contains_key(&upload_id) {
            tracing::warn!(%upload_id, "a second plan for an upload already running; ignored");
            return;
        }
        let cancel = self.session_cancel.child_token();
        self.uploads.insert(upload_id, cancel.clone());
        let outbox = self.outbox_tx.clone();
        let http = self.http.clone();
        let known = self.known.clone();
        let settings = UploadSettings {
            concurrency: self.config.upload_concurrency,
            attempts: self.config.part_attempts,
            retry_min: Duration::from_millis(self.config.part_retry_min_ms),
            limiter: self.limiter.clone(),
            hash_pacer: self.hash_pacer.clone(),
            request_timeout: Duration::from_secs(self.config.request_timeout_secs),
            policy: self.config.upload_policy(),
        };
        tracing::info!(%upload_id, size = plan.size, parts = plan.parts.len(), already_stored = plan.done.len(), "upload starting");
        tokio::spawn(async move {
            let progress = Arc::new(Progress::default());
            let reporter = {
                let progress = progress.clone();
                let outbox = outbox.clone();
                let cancel = cancel.clone();
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(PROGRESS_INTERVAL);
                    let mut last = (u32::MAX, u64::MAX, u32::MAX);
                    let mut sha_sent = false;
                    loop {
                        tokio::select! {
                            () = cancel.cancelled() => break,
                            _ = tick.tick() => {}
                            () = progress.sha256_known.notified(), if !sha_sent => {}
                        }
                        let now = (
                            progress.parts_done.load(Ordering::Relaxed),
                            progress.bytes_done.load(Ordering::Relaxed),
                            progress.retries.load(Ordering::Relaxed),
                        );
                        // The SHA-256 goes out at once, before the completion request.
                        let sha256 = progress.sha256.get().filter(|_| !sha_sent).cloned();
                        if now != last || sha256.is_some() {
                            last = now;
                            sha_sent |= sha256.is_some();
                            // Progress is advisory: drop it rather than wait if the queue is full.
                            let _ = outbox.try_send(AgentMessage::Progress {
                                upload_id,
                                parts_done: now.0,
                                bytes_done: now.1,
                                part_retries: now.2,
                                sha256,
                            });
                        }
                    }
                })
            };
            let started = std::time::Instant::now();
            let was_encoded = encoded.is_some();
            let result = uploader::upload(
                &http,
                path.clone(),
                &layout,
                encoded,
                &plan,
                &settings,
                progress.clone(),
                cancel.clone(),
            )
            .await;
            cancel.cancel();
            let _ = reporter.await;
            let retries = progress.retries.load(Ordering::Relaxed);
            // A last report, so the server's counts include what happened since the last tick.
            let _ = outbox
                .send(AgentMessage::Progress {
                    upload_id,
                    parts_done: progress.parts_done.load(Ordering::Relaxed),
                    bytes_done: progress.bytes_done.load(Ordering::Relaxed),
                    part_retries: retries,
                    sha256: None,
                })
                .await;
            // Kept once the pass has computed it, whatever the outcome: a session that ended
            // while storage completed the object (its answer never came, and the report of the
            // SHA-256 may not have reached the server) still brings it with the next
            // description. An encoded file's SHA-256 goes with its description anyway.
            if let Some(sha256) = progress.sha256.get()
                && !was_encoded
            {
                known.remember(path, layout, sha256.clone());
            }
            let msg = match result {
                Ok(uploader::Outcome::Completed {
                    parts,
                    complete_time,
                    sha256,
                }) => {
                    tracing::info!(%upload_id, elapsed = ?started.elapsed(), ?complete_time, retries, sha256, "upload finished");
                    AgentMessage::UploadCompleted {
                        upload_id,
                        parts,
                        complete_ms: complete_time.as_millis() as u64,
                        sha256: Some(sha256),
                    }
                }
                Ok(uploader::Outcome::CompleteFailed { error, sha256 }) => {
                    tracing::warn!(%upload_id, code = %error.code, message = error.message, "completing the upload failed");
                    AgentMessage::UploadFailed {
                        upload_id,
                        code: error.code,
                        message: error.message,
                        sha256: Some(sha256),
                    }
                }
                Ok(uploader::Outcome::NeedUrls) => {
                    tracing::info!(%upload_id, retries, "upload URLs expired; asking for fresh ones");
                    AgentMessage::NeedUrls { upload_id }
                }
                Err(e) => {
                    tracing::warn!(%upload_id, code = %e.code, message = e.message, "upload failed");
                    AgentMessage::UploadFailed {
                        upload_id,
                        code: e.code,
                        message: e.message,
                        sha256: None,
                    }
                }
            };
            let _ = outbox.send(msg).await;
        });
    }
}
