//! The embedded S3 endpoint: s3s-fs served on its own listener, so a new user needs no AWS
//! account, Docker or LocalStack. It verifies SigV4 signatures (headers and presigned URLs) for
//! real; SigV2, which s3s also understands, is refused before it reaches s3s.

use std::path::Path;

use anyhow::Context;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use s3s::auth::SimpleAuth;
use s3s::service::{S3Service, S3ServiceBuilder};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub fn build_service(
    data_dir: &Path,
    access_key: &str,
    secret_key: &str,
) -> anyhow::Result<S3Service> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating data directory {}", data_dir.display()))?;
    let store = crate::embedded_store::EmbeddedStore::new(data_dir)?;
    let mut builder = S3ServiceBuilder::new(store);
    builder.set_auth(SimpleAuth::from_single(access_key, secret_key.to_owned()));
    Ok(builder.build())
}

/// Serves `service` on `listener` until `shutdown` fires, over TLS when `tls` is given.
pub async fn serve(
    listener: TcpListener,
    service: S3Service,
    tls: Option<TlsAcceptor>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let socket = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((socket, _)) => socket,
                Err(err) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %err, "embedded s3: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = socket.set_nodelay(true);
        let service = service.clone();
        let shutdown = shutdown.clone();
        let tls = tls.clone();
        tracker.spawn(async move {
            match tls {
                None => serve_connection(socket, service, shutdown).await,
                Some(acceptor) => {
                    let handshake = tokio::time::timeout(
                        std::time::Duration::from_secs(10),
                        acceptor.accept(socket),
                    );
                    if let Ok(Ok(stream)) = handshake.await {
                        serve_connection(stream, service, shutdown).await;
                    }
                }
            }
        });
    }
}

async fn serve_connection<IO>(io: IO, service: S3Service, shutdown: CancellationToken)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let http = crate::listen::http();
    let conn = http
        .serve_connection(
            TokioIo::new(io),
            hyper::service::service_fn(move |req: Request<Incoming>| {
                let service = service.clone();
                async move {
                    if is_sigv2(&req) {
                        return Ok(sigv2_refusal());
                    }
                    service.call(req.map(s3s::Body::from)).await
                }
            }),
        )
        .into_owned();
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        () = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), conn).await;
        }
    }
}

/// SigV2 uses `Authorization: AWS <key>:<sig>` or `AWSAccessKeyId`/`Signature` query parameters,
/// and POST policy forms. Backhaul only ever signs SigV4, so anything else is refused.
fn is_sigv2<B>(req: &Request<B>) -> bool {
    let header_v2 = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("AWS "));
    let query_v2 = req.uri().query().is_some_and(|q| {
        q.split('&')
            .any(|kv| kv.starts_with("AWSAccessKeyId=") || kv.starts_with("Signature="))
    });
    let form_post = req.method() == http::Method::POST
        && req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("multipart/form-data"));
    header_v2 || query_v2 || form_post
}

fn sigv2_refusal() -> Response<s3s::Body> {
    let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>AccessDenied</Code>\
                <Message>only AWS Signature Version 4 is accepted</Message></Error>";
    let mut resp = Response::new(s3s::Body::from(body.to_owned()));
    *resp.status_mut() = StatusCode::FORBIDDEN;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/xml"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(uri: &str, auth: Option<&str>) -> Request<()> {
        let mut b = Request::builder().uri(uri);
        if let Some(a) = auth {
            b = b.header("authorization", a);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn recognises_sigv2() {
        assert!(is_sigv2(&req("/b/k", Some("AWS key:sig"))));
        assert!(is_sigv2(&req(
            "/b/k?AWSAccessKeyId=k&Expires=1&Signature=s",
            None
        )));
        assert!(!is_sigv2(&req(
            "/b/k",
            Some("AWS4-HMAC-SHA256 Credential=x")
        )));
        assert!(!is_sigv2(&req(
            "/b/k?X-Amz-Signature=s&X-Amz-Credential=c",
            None
        )));
    }
}
