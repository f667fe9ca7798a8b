//! The accept loops' common ground: how every listener (the API and WebSocket one, the embedded
//! S3 endpoint) speaks HTTP, and the API's accept loop, over plain TCP or TLS.
//!
//! Every connection must send its request headers within [`HEADER_READ_TIMEOUT`], and a TLS
//! client must finish its handshake within [`tls::HANDSHAKE_TIMEOUT`]: a socket that connects
//! and then dawdles is closed, so idle sockets cannot use up the server's file descriptors.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::tls;

/// How long a connection may take to send a request's headers (each request's, on a kept-alive
/// connection).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an open connection gets to finish its request when the server shuts down.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// HTTP/1.1 (and HTTP/2 by prior knowledge) with the header-read timeout.
pub fn http() -> ConnBuilder<TokioExecutor> {
    let mut http = ConnBuilder::new(TokioExecutor::new());
    http.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    http
}

/// Serves `app` (with WebSocket upgrades, and the peer address as `ConnectInfo<SocketAddr>`)
/// until `shutdown`, over TLS when an acceptor is given.
pub async fn serve_api(
    listener: TcpListener,
    acceptor: Option<TlsAcceptor>,
    app: Router,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let http = http();
    loop {
        let (tcp, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(err) => {
                    // Out of file descriptors, most likely: wait rather than spin.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = app
            .clone()
            .layer(axum::Extension(ConnectInfo::<SocketAddr>(peer)));
        let http = http.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            match acceptor {
                None => serve_connection(&http, tcp, app, &shutdown).await,
                Some(acceptor) => {
                    match tokio::time::timeout(tls::HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => serve_connection(&http, stream, app, &shutdown).await,
                        Ok(Err(err)) => {
                            tracing::debug!(%peer, error = %err, "TLS handshake failed");
                        }
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
}

async fn serve_connection<IO>(
    http: &ConnBuilder<TokioExecutor>,
    io: IO,
    app: Router,
    shutdown: &CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = http
        .serve_connection_with_upgrades(TokioIo::new(io), TowerToHyperService::new(app))
        .into_owned();
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        () = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn).await;
        }
    }
}
