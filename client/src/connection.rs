//! The agent's WebSocket edge: typed messages in and out, frames stay here.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use futures::{SinkExt, StreamExt};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use shared::protocol::{AgentMessage, MAX_MESSAGE_BYTES, ServerMessage};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};
use url::Url;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The server answered the upgrade with an HTTP error (401 for a bad token, say).
    #[error("server refused the connection with HTTP {status}: {detail}")]
    Refused { status: StatusCode, detail: String },
    #[error("could not connect: {0}")]
    Transport(String),
}

#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    #[error("server sent a malformed message: {0}")]
    Malformed(String),
    #[error("connection lost: {0}")]
    Transport(#[from] tungstenite::Error),
}

pub enum Incoming {
    Message(ServerMessage),
    Heartbeat,
}

pub struct ServerConnection {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl ServerConnection {
    pub async fn connect(
        url: &Url,
        token: &str,
        tls: &Arc<rustls::ClientConfig>,
    ) -> Result<Self, ConnectError> {
        let mut request = url
            .as_str()
            .into_client_request()
            .map_err(|e| ConnectError::Transport(e.to_string()))?;
        let bearer = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| ConnectError::Transport("token is not a valid header value".into()))?;
        request.headers_mut().insert("authorization", bearer);
        let mut config = WebSocketConfig::default();
        config.max_message_size = Some(MAX_MESSAGE_BYTES);
        config.max_frame_size = Some(MAX_MESSAGE_BYTES);
        config.read_buffer_size = 16 * 1024;
        config.write_buffer_size = 0;
        let connector = Connector::Rustls(tls.clone());
        match tokio_tungstenite::connect_async_tls_with_config(
            request,
            Some(config),
            true,
            Some(connector),
        )
        .await
        {
            Ok((ws, _)) => Ok(Self { ws }),
            Err(tungstenite::Error::Http(resp)) => {
                let detail = resp
                    .body()
                    .as_deref()
                    .and_then(|b| serde_json::from_slice::<shared::api::ErrorBody>(b).ok())
                    .map(|b| format!("{}: {}", b.error.code, b.error.message))
                    .unwrap_or_else(|| "no details".into());
                Err(ConnectError::Refused {
                    status: resp.status(),
                    detail,
                })
            }
            Err(e) => Err(ConnectError::Transport(e.to_string())),
        }
    }

    pub async fn send(&mut self, msg: &AgentMessage) -> Result<(), tungstenite::Error> {
        let json = serde_json::to_string(msg).expect("agent messages always serialize");
        self.ws.send(Message::Text(json.into())).await
    }

    pub async fn ping(&mut self) -> Result<(), tungstenite::Error> {
        self.ws.send(Message::Ping(Default::default())).await
    }

    /// `Ok(None)` when the server closed the connection. Cancel-safe.
    pub async fn recv(&mut self) -> Result<Option<Incoming>, RecvError> {
        let Some(frame) = self.ws.next().await else {
            return Ok(None);
        };
        match frame? {
            Message::Text(text) => serde_json::from_str(text.as_str())
                .map(|m| Some(Incoming::Message(m)))
                .map_err(|e| RecvError::Malformed(e.to_string())),
            Message::Binary(_) => Err(RecvError::Malformed("unexpected binary frame".into())),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {
                Ok(Some(Incoming::Heartbeat))
            }
            Message::Close(_) => Ok(None),
        }
    }

    pub async fn close(&mut self) {
        let _ = self.ws.close(None).await;
    }
}

/// The TLS settings of the control channel: the system's roots plus `ca_file`, if any.
pub fn tls_config(ca_file: Option<&Path>) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    // A machine without a system store still works with a configured CA.
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = ca_file {
        for cert in CertificateDer::pem_file_iter(path)
            .with_context(|| format!("reading CA_FILE {}", path.display()))?
        {
            let cert = cert.with_context(|| format!("parsing CA_FILE {}", path.display()))?;
            roots.add(cert).with_context(|| {
                format!("CA_FILE {} holds an unusable certificate", path.display())
            })?;
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}
