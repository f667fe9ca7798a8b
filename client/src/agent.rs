//! The agent's control channel: a reconnect loop around one session ([`crate::session`]) at a
//! time.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::connection::{ConnectError, ServerConnection};
use crate::session::{Session, SessionEnd};
use crate::token::AgentToken;
use crate::uploader::{DiskPacer, KnownHashes, RateLimiter};

/// How long opening the WebSocket (TCP, TLS and the upgrade) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs until `shutdown` is cancelled. Never returns because the server is down: every failure to
/// connect or lost connection feeds the backoff policy and the loop tries again.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    config.validate()?;
    let tls = crate::connection::tls_config(config.ca_file.as_deref())?;
    let mut http = reqwest::Client::builder();
    if let Some(path) = &config.ca_file {
        let pem =
            std::fs::read(path).with_context(|| format!("reading CA_FILE {}", path.display()))?;
        for cert in reqwest::Certificate::from_pem_bundle(&pem)
            .with_context(|| format!("parsing CA_FILE {}", path.display()))?
        {
            http = http.add_root_certificate(cert);
        }
    }
    let http = http
        // A redirect could lead anywhere; uploads go only where the policy allows.
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .pool_max_idle_per_host(config.upload_concurrency)
        .build()?;
    let limiter = (config.max_upload_bytes_per_sec > 0)
        .then(|| Arc::new(RateLimiter::new(config.max_upload_bytes_per_sec)));
    let mut backoff = config.reconnect_policy();
    let known = KnownHashes::default();
    let mut token = AgentToken::load(&config)?;
    let hash_pacer = (config.hash_read_bytes_per_sec > 0)
        .then(|| Arc::new(DiskPacer::new(config.hash_read_bytes_per_sec)));
    loop {
        if shutdown.is_cancelled() {
            return Ok(());
        }
        let outcome = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            r = tokio::time::timeout(
                CONNECT_TIMEOUT,
                ServerConnection::connect(&config.server_url, token.current().expose(), &tls),
            ) => r.unwrap_or_else(|_| Err(ConnectError::Transport(format!(
                "no answer within {}s", CONNECT_TIMEOUT.as_secs()
            )))),
        };
        let mut delay = None;
        match outcome {
            Ok(conn) => {
                let mut session = Session::new(
                    &config,
                    &http,
                    conn,
                    limiter.clone(),
                    known.clone(),
                    &mut token,
                    hash_pacer.clone(),
                );
                match session.run(&shutdown, &mut backoff).await {
                    SessionEnd::Shutdown => return Ok(()),
                    SessionEnd::Lost(reason) => {
                        tracing::warn!(reason, "connection to server lost");
                    }
                    SessionEnd::Replaced => {
                        let wait = Duration::from_secs(config.replaced_backoff_secs);
                        tracing::error!(
                            backoff_secs = wait.as_secs(),
                            "another agent connected with this store's identity and replaced this one: two machines may share one token; backing off before trying again"
                        );
                        delay = Some(wait);
                    }
                }
            }
            Err(ConnectError::Refused { status, detail }) => {
                // A rejected token will not fix itself, but the operator may fix the server side
                // (a revocation lifted, a secret rotated): keep trying, slowly and loudly.
                tracing::error!(%status, detail, "server refused this agent");
            }
            Err(err) => {
                tracing::warn!(error = %err, "could not reach server");
            }
        }
        let delay = delay.unwrap_or_else(|| backoff.next_delay());
        tracing::info!(?delay, "reconnecting after delay");
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(delay) => {}
        }
    }
}
