//! Building [`Storage`] from the server's [`Config`]: the embedded S3 endpoint started on its
//! listener, or any S3 reached through the standard settings and aws-config's chain.

use anyhow::bail;
use aws_credential_types::Credentials;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use url::Url;

use super::{Storage, StorageSettings};
use crate::config::{Config, StorageKind};
use crate::embedded_s3;

/// The storage `config` names. `embedded_listener` is required with `STORAGE=embedded` (the
/// embedded endpoint serves on it, over TLS when `tls` is given) and ignored otherwise.
pub async fn from_config(
    config: &Config,
    embedded_listener: Option<TcpListener>,
    tls: Option<&tokio_rustls::TlsAcceptor>,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) -> anyhow::Result<Storage> {
    match config.storage {
        StorageKind::Embedded => {
            open_embedded(config, embedded_listener, tls, shutdown, tracker).await
        }
        StorageKind::S3 => open_s3(config).await,
    }
}

/// `STORAGE=embedded`: starts the embedded S3 endpoint on `listener` (and, with TLS, a plain
/// loopback listener for the server's own client), then connects to it.
async fn open_embedded(
    config: &Config,
    listener: Option<TcpListener>,
    tls: Option<&tokio_rustls::TlsAcceptor>,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) -> anyhow::Result<Storage> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let Some(listener) = listener else {
        bail!("STORAGE=embedded needs a listener for the embedded S3 endpoint");
    };
    let public_addr = listener.local_addr()?;
    let secret = config
        .embedded_s3_secret_key
        .as_ref()
        .map(|s| s.expose().to_owned())
        .unwrap_or_else(random_secret);
    let service =
        embedded_s3::build_service(&config.data_dir, &config.embedded_s3_access_key, &secret)?;
    // With TLS, the server reaches its own store over a plain loopback listener, so its
    // S3 client needs no trust in the configured certificate; agents get TLS.
    let internal_addr = if tls.is_some() {
        let internal = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = internal.local_addr()?;
        tracker.spawn(embedded_s3::serve(
            internal,
            service.clone(),
            None,
            shutdown.clone(),
            tracker.clone(),
        ));
        addr
    } else {
        public_addr
    };
    tracker.spawn(embedded_s3::serve(
        listener,
        service,
        tls.cloned(),
        shutdown.clone(),
        tracker.clone(),
    ));
    let local = Url::parse(&format!("http://{}", connectable(internal_addr)))?;
    let public = Url::parse(&format!("{scheme}://{}", connectable(public_addr)))?;
    tracing::info!(endpoint = %public, data_dir = %config.data_dir.display(), "embedded S3 endpoint listening");
    let storage = Storage::connect(StorageSettings {
        bucket: config.bucket.clone(),
        region: config.aws_region.clone(),
        endpoint: Some(local.clone()),
        public_endpoint: Some(config.s3_public_endpoint.clone().unwrap_or(public)),
        force_path_style: true,
        credentials: Some(Credentials::new(
            &config.embedded_s3_access_key,
            secret,
            None,
            None,
            "backhaul-embedded",
        )),
        encryption: encryption(config),
    })
    .await?;
    storage.ensure_bucket(true).await?;
    Ok(storage)
}

/// `STORAGE=s3`: AWS or any S3, through the standard settings and aws-config's chain.
async fn open_s3(config: &Config) -> anyhow::Result<Storage> {
    let credentials = config
        .aws_access_key_id
        .as_ref()
        .zip(config.aws_secret_access_key.as_ref())
        .map(|(id, secret)| Credentials::new(id, secret.expose(), None, None, "backhaul-config"));
    let storage = Storage::connect(StorageSettings {
        bucket: config.bucket.clone(),
        region: config.aws_region.clone(),
        endpoint: config.s3_endpoint_url.clone(),
        public_endpoint: config.s3_public_endpoint.clone(),
        force_path_style: config
            .s3_force_path_style
            .unwrap_or(config.s3_endpoint_url.is_some()),
        credentials,
        encryption: encryption(config),
    })
    .await?;
    storage.ensure_bucket(false).await?;
    Ok(storage)
}

fn encryption(config: &Config) -> super::Encryption {
    super::Encryption {
        sse: config.s3_sse,
        kms_key_id: config.s3_sse_kms_key_id.clone(),
    }
}

fn random_secret() -> String {
    use rand::Rng;
    let bytes: [u8; 24] = rand::thread_rng().r#gen();
    hex::encode(bytes)
}

/// An address a local client can connect to: a wildcard bind becomes loopback.
fn connectable(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    addr
}
