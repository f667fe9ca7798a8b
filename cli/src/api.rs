//! The server's REST API, as `cli` calls it.

use std::time::Duration;

use anyhow::{Context, anyhow};
use shared::UploadId;
use shared::api::{DownloadLink, ErrorBody};

use crate::Cli;

/// A storage connection that sends nothing for this long is given up (and the fetch resumes).
const STORAGE_READ_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Api {
    /// For the API: short timeouts, and no redirects (a download link is read, not followed,
    /// so the operator token never travels to storage).
    http: reqwest::Client,
    /// For storage's presigned URLs: no token, and no limit on a whole transfer, only on
    /// silence.
    storage: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    pub fn new(cli: &Cli) -> anyhow::Result<Self> {
        let token = cli
            .api_token
            .as_ref()
            .map(|t| t.expose().to_owned())
            .ok_or_else(|| anyhow!("no operator token: set API_TOKEN or pass --api-token (mint one with `cli token issue --operator`)"))?;
        let mut http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .redirect(reqwest::redirect::Policy::none());
        let mut storage = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(STORAGE_READ_TIMEOUT);
        if let Some(path) = &cli.ca_file {
            let pem = std::fs::read(path)
                .with_context(|| format!("reading CA_FILE {}", path.display()))?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem)
                .with_context(|| format!("parsing CA_FILE {}", path.display()))?
            {
                http = http.add_root_certificate(cert.clone());
                storage = storage.add_root_certificate(cert);
            }
        }
        Ok(Self {
            http: http.build()?,
            storage: storage.build()?,
            base: cli.server_url.trim_end_matches('/').to_owned(),
            token,
        })
    }

    pub async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("could not reach the server at {}", self.base))?;
        decode(resp).await
    }

    /// A GET whose answer is text of the type `accept` asks for (a CSV manifest).
    pub async fn get_text(&self, path: &str, accept: &str) -> anyhow::Result<String> {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .header(reqwest::header::ACCEPT, accept)
            .send()
            .await
            .with_context(|| format!("could not reach the server at {}", self.base))?;
        if !resp.status().is_success() {
            return decode::<serde_json::Value>(resp)
                .await
                .map(|_| String::new());
        }
        resp.text().await.context("reading the server's answer")
    }

    /// `GET /uploads/{id}/download`: the server answers 307 with the link in its body too.
    pub async fn download_link(&self, upload_id: UploadId) -> anyhow::Result<DownloadLink> {
        self.get(&format!("/uploads/{upload_id}/download")).await
    }

    /// The client for storage's presigned URLs.
    pub fn storage(&self) -> &reqwest::Client {
        &self.storage
    }

    pub async fn post<T: serde::de::DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.send(reqwest::Method::POST, path, None::<&()>).await
    }

    /// A POST with a JSON body.
    pub async fn post_json<B: serde::Serialize, T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        self.send(reqwest::Method::POST, path, Some(body)).await
    }

    pub async fn delete<T: serde::de::DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.send(reqwest::Method::DELETE, path, None::<&()>).await
    }

    async fn send<B: serde::Serialize, T: serde::de::DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&B>,
    ) -> anyhow::Result<T> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("could not reach the server at {}", self.base))?;
        decode(resp).await
    }
}

/// An API error, printed as `CODE: message`.
#[derive(Debug, thiserror::Error)]
#[error("{code}: {message} (HTTP {status})")]
pub struct ApiFailure {
    pub status: u16,
    pub code: String,
    pub message: String,
}

async fn decode<T: serde::de::DeserializeOwned>(resp: reqwest::Response) -> anyhow::Result<T> {
    let status = resp.status();
    let bytes = resp.bytes().await.context("reading the server's answer")?;
    // The only redirect the API answers is a download link, whose body is the link.
    if status.is_success() || status.is_redirection() {
        return serde_json::from_slice(&bytes)
            .context("the server's answer is not what this cli expects");
    }
    match serde_json::from_slice::<ErrorBody>(&bytes) {
        Ok(body) => Err(ApiFailure {
            status: status.as_u16(),
            code: body.error.code.to_string(),
            message: body.error.message,
        }
        .into()),
        Err(_) => Err(anyhow!("server answered HTTP {status}")),
    }
}

/// Percent-encodes a user-supplied id for use as one path segment, so the server (not the URL
/// parser) decides whether it is valid.
pub fn path_segment(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for b in raw.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
