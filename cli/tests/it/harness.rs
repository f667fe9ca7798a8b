//! Starts real servers and agents on ephemeral ports and drives them the way users do.

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use aws_sdk_s3::config::Credentials;
use clap::Parser;
use sha2::{Digest, Sha256};
pub use shared::ErrorCode;
pub use shared::api::{ClientStatus, UploadState, UploadStatus};
use shared::auth::{Role, TokenKeys};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const SECRET: &str = "test-secret-test-secret-test-secret-0123";
pub const BUCKET: &str = "pos-uploads";
pub const EMBEDDED_ACCESS_KEY: &str = "backhaul-test";
pub const EMBEDDED_SECRET_KEY: &str = "backhaul-test-secret-key";
pub const MIB: u64 = 1024 * 1024;

/// Defines one test per storage mode from one body: `storage_modes!(name, |mode| body(mode))`
/// makes a module `name` with the tests `embedded` and `localstack`, each awaiting the body with
/// its [`Mode`].
macro_rules! storage_modes {
    ($name:ident, $body:expr) => {
        mod $name {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() {
                ($body)(Mode::Embedded).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn localstack() {
                ($body)(Mode::LocalStack).await
            }
        }
    };
}
pub(crate) use storage_modes;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Embedded,
    LocalStack,
}

pub fn localstack_endpoint() -> String {
    std::env::var("LOCALSTACK_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:4566".into())
}

pub fn keys() -> TokenKeys {
    TokenKeys::new(SECRET.as_bytes()).unwrap()
}

/// Checks a token as the server keeping its keys in `data_dir` does.
pub fn verify_with_keys_in(data_dir: &Path, token: &str) -> Result<shared::auth::Claims, String> {
    let Some(kid) = shared::auth::token_kid(token).map_err(|e| e.to_string())? else {
        return keys().verify(token).map_err(|e| e.to_string());
    };
    let file = server::tokens::keyfile::KeyFile::new(data_dir.join("token-keys.json"));
    let set = file.load_or_create().map_err(|e| format!("{e:#}"))?;
    let key = set.keys.get(&kid).ok_or_else(|| format!("no key {kid}"))?;
    key.keys.verify(token).map_err(|e| e.to_string())
}

pub fn agent_token(client_id: &str) -> String {
    keys()
        .issue(client_id, Role::Agent, Duration::from_secs(3600))
        .unwrap()
}

pub fn operator_token() -> String {
    keys()
        .issue("test-operator", Role::Operator, Duration::from_secs(3600))
        .unwrap()
}

/// A unique client id per test, so tests sharing a bucket never share a key prefix.
pub fn unique_client(name: &str) -> String {
    format!("{name}-{}", &uuid_like()[..8])
}

fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    hex::encode(Sha256::digest(format!("{t}-{n}-{}", std::process::id())))
}

/// Waits for `cond` to hold, polling, up to `timeout`.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Triggers a download of the agent's default file and returns the upload id.
pub async fn trigger_id(server: &TestServer, client_id: &str) -> String {
    let (status, trig) = server.trigger(client_id).await;
    assert_eq!(status, 202, "{trig}");
    trig["upload_id"].as_str().unwrap().to_owned()
}

/// The upload completed, with the file's SHA-256 recorded and the same bytes in `store`.
pub async fn assert_identical(store: &TestServer, status: &UploadStatus, sha: &str) {
    assert_eq!(status.state, UploadState::Completed, "{status:?}");
    assert_eq!(
        status.sha256.as_deref(),
        Some(sha),
        "the recorded SHA-256 is the file's"
    );
    assert_eq!(
        store.object_sha256(status.key()).await,
        sha,
        "stored bytes differ"
    );
}

/// Short reads of a typed upload status.
pub trait StatusExt {
    /// The code the upload ended with, if it failed or was cancelled.
    fn code(&self) -> Option<ErrorCode>;
    /// The object key, which every upload past `requested` has.
    fn key(&self) -> &str;
}

impl StatusExt for UploadStatus {
    fn code(&self) -> Option<ErrorCode> {
        self.error.as_ref().map(|e| e.code)
    }

    fn key(&self) -> &str {
        self.key
            .as_deref()
            .unwrap_or_else(|| panic!("upload {} has no key: {self:?}", self.upload_id))
    }
}

/// A random generator for a test's random choices (kill points, delays), seeded from
/// `BACKHAUL_TEST_SEED` when set and from the OS otherwise. The seed is printed first, so a failing
/// run can be replayed with the same choices.
pub fn seeded_rng(test: &str) -> rand::rngs::StdRng {
    use rand::SeedableRng;
    let seed = match std::env::var("BACKHAUL_TEST_SEED") {
        Ok(s) => s.parse().expect("BACKHAUL_TEST_SEED must be a u64"),
        Err(_) => rand::random(),
    };
    eprintln!("{test}: random choices from seed {seed} (replay with BACKHAUL_TEST_SEED={seed})");
    rand::rngs::StdRng::seed_from_u64(seed)
}

pub struct TestServer {
    pub mode: Mode,
    pub api_addr: SocketAddr,
    pub s3_endpoint: String,
    /// The embedded store's directory (unused with LocalStack).
    pub data_dir: PathBuf,
    /// The PEM certificate the server presents, when it serves TLS.
    pub ca_file: Option<PathBuf>,
    shutdown: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    _dir: Option<tempfile::TempDir>,
}

/// How to start a [`TestServer`]: `TestServer::builder(mode)`, then any of `args`, `at` and
/// `tls`, then `start`.
pub struct ServerBuilder {
    mode: Mode,
    args: Vec<String>,
    /// A fixed API address and data directory (to restart a server where it was).
    at: Option<(SocketAddr, PathBuf)>,
    tls: bool,
    s3_endpoint: Option<String>,
    /// Whether the server also accepts the test secret's HS256 tokens (`JWT_SECRET`).
    legacy_secret: bool,
}

impl ServerBuilder {
    /// A server without `JWT_SECRET`: only tokens signed with its own key get in.
    pub fn without_legacy_secret(mut self) -> Self {
        self.legacy_secret = false;
        self
    }

    /// Extra server arguments, after the harness's own.
    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|a| (*a).to_owned()));
        self
    }

    /// Listens on `api_addr` (port 0 for any) and keeps its data in `data_dir`, which outlives
    /// the server.
    pub fn at(mut self, api_addr: SocketAddr, data_dir: &Path) -> Self {
        self.at = Some((api_addr, data_dir.to_owned()));
        self
    }

    /// Uses S3 at `endpoint`: with [`Mode::Embedded`], another test server's embedded store (or
    /// a fault proxy in front of it), with that store's keys; with [`Mode::LocalStack`], a fault
    /// proxy in front of LocalStack.
    pub fn s3_endpoint(mut self, endpoint: &str) -> Self {
        self.s3_endpoint = Some(endpoint.to_owned());
        self
    }

    /// Serves TLS with a fresh self-signed certificate for 127.0.0.1 and localhost.
    pub fn tls(mut self) -> Self {
        self.tls = true;
        self
    }

    pub async fn start(self) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let mut args = self.args;
        if self.tls {
            let cert =
                rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
                    .unwrap();
            let cert_file = dir.path().join("cert.pem");
            let key_file = dir.path().join("key.pem");
            std::fs::write(&cert_file, cert.cert.pem()).unwrap();
            std::fs::write(&key_file, cert.key_pair.serialize_pem()).unwrap();
            for (flag, file) in [
                ("--tls-cert-file", &cert_file),
                ("--tls-key-file", &key_file),
            ] {
                args.push(flag.to_owned());
                args.push(file.display().to_string());
            }
        }
        let (api_addr, data_dir) = self
            .at
            .unwrap_or_else(|| ("127.0.0.1:0".parse().unwrap(), dir.path().join("data")));
        let extra: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut server = TestServer::start_at(
            self.mode,
            api_addr,
            &data_dir,
            &extra,
            self.s3_endpoint.as_deref(),
            self.legacy_secret,
        )
        .await;
        server._dir = Some(dir);
        server
    }
}

impl TestServer {
    /// A server on `mode`'s storage with the harness's settings.
    pub async fn start(mode: Mode) -> Self {
        Self::builder(mode).start().await
    }

    pub fn builder(mode: Mode) -> ServerBuilder {
        ServerBuilder {
            mode,
            args: Vec::new(),
            at: None,
            tls: false,
            s3_endpoint: None,
            legacy_secret: true,
        }
    }

    async fn start_at(
        mode: Mode,
        api_addr: SocketAddr,
        data_dir: &Path,
        extra: &[&str],
        s3_endpoint: Option<&str>,
        legacy_secret: bool,
    ) -> Self {
        let api = bind_retrying(api_addr).await;
        let api_addr = api.local_addr().unwrap();
        let (embedded_s3, s3_endpoint) = match (mode, s3_endpoint) {
            (_, Some(endpoint)) => (None, endpoint.to_owned()),
            (Mode::Embedded, None) => {
                let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
                let endpoint = format!("http://{}", l.local_addr().unwrap());
                (Some(l), endpoint)
            }
            (Mode::LocalStack, None) => {
                let endpoint = localstack_endpoint();
                assert_localstack_up(&endpoint).await;
                (None, endpoint)
            }
        };
        let args = if embedded_s3.is_none() && mode == Mode::Embedded {
            // Another server's embedded store, or a proxy in front of it.
            let mut args = s3_server_args(data_dir, api_addr, &s3_endpoint, true);
            args.extend(extra.iter().map(|a| (*a).to_owned()));
            args
        } else {
            let mut args = server_args(mode, data_dir, extra);
            if let Some(flag) = args.iter().position(|a| a == "--s3-endpoint-url") {
                args[flag + 1] = s3_endpoint.clone();
            }
            args
        };
        let mut args = args;
        if !legacy_secret && let Some(flag) = args.iter().position(|a| a == "--jwt-secret") {
            args.drain(flag..flag + 2);
        }
        let config = server::config::Config::try_parse_from(&args).unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server::run(
            config,
            server::Listeners { api, embedded_s3 },
            shutdown.clone(),
        ));
        let s = Self {
            mode,
            api_addr,
            s3_endpoint,
            data_dir: data_dir.to_owned(),
            ca_file: tls_cert_path(extra),
            shutdown,
            task: Some(task),
            _dir: None,
        };
        s.wait_healthy().await;
        s
    }

    /// A handle on a server running elsewhere (a [`ChildProcess`]); waits until it is healthy.
    pub async fn attach(
        mode: Mode,
        api_addr: SocketAddr,
        s3_endpoint: &str,
        data_dir: &Path,
    ) -> Self {
        let s = Self {
            mode,
            api_addr,
            s3_endpoint: match mode {
                Mode::Embedded => s3_endpoint.to_owned(),
                Mode::LocalStack => localstack_endpoint(),
            },
            data_dir: data_dir.to_owned(),
            ca_file: None,
            shutdown: CancellationToken::new(),
            task: None,
            _dir: None,
        };
        s.wait_healthy().await;
        s
    }

    async fn wait_healthy(&self) {
        let http = self.http_client();
        let url = format!("{}/healthz", self.http_url());
        wait_until(Duration::from_secs(30), "server health", || {
            let http = http.clone();
            let url = url.clone();
            async move {
                http.get(&url)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
            }
        })
        .await;
    }

    pub fn http_url(&self) -> String {
        let scheme = if self.ca_file.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.api_addr)
    }

    pub fn ws_url(&self) -> String {
        let scheme = if self.ca_file.is_some() { "wss" } else { "ws" };
        format!("{scheme}://{}/ws/connect", self.api_addr)
    }

    /// An HTTP client that trusts this server's certificate.
    pub fn http_client(&self) -> reqwest::Client {
        let mut b = reqwest::Client::builder();
        if let Some(ca) = &self.ca_file {
            let pem = std::fs::read(ca).unwrap();
            b = b.add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap());
        }
        b.build().unwrap()
    }

    /// Stops the server and waits for it to finish draining.
    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }

    pub async fn s3(&self) -> aws_sdk_s3::Client {
        let creds = match self.mode {
            Mode::Embedded => {
                Credentials::new(EMBEDDED_ACCESS_KEY, EMBEDDED_SECRET_KEY, None, None, "test")
            }
            Mode::LocalStack => Credentials::new("test", "test", None, None, "test"),
        };
        let conf = aws_sdk_s3::Config::builder()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .http_client(server::storage::https_client())
            .region(aws_sdk_s3::config::Region::new("us-east-1"))
            .endpoint_url(&self.s3_endpoint)
            .credentials_provider(creds)
            .force_path_style(true)
            .build();
        aws_sdk_s3::Client::from_conf(conf)
    }

    pub async fn get_json(&self, path: &str) -> (u16, serde_json::Value) {
        let resp = self
            .http_client()
            .get(format!("{}{path}", self.http_url()))
            .bearer_auth(operator_token())
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(serde_json::Value::Null))
    }

    pub async fn trigger(&self, client_id: &str) -> (u16, serde_json::Value) {
        let resp = self
            .http_client()
            .post(format!("{}/trigger-download/{client_id}", self.http_url()))
            .bearer_auth(operator_token())
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(serde_json::Value::Null))
    }

    /// `GET /uploads/{upload_id}`, read as the typed status: a renamed or missing field fails
    /// here at once, not as a wait that times out.
    pub async fn upload(&self, upload_id: &str) -> UploadStatus {
        let (code, body) = self.get_json(&format!("/uploads/{upload_id}")).await;
        assert_eq!(code, 200, "{body}");
        serde_json::from_value(body.clone())
            .unwrap_or_else(|e| panic!("not an upload status ({e}): {body}"))
    }

    /// `GET /status/{client_id}`, typed.
    pub async fn client(&self, client_id: &str) -> ClientStatus {
        let (code, body) = self.get_json(&format!("/status/{client_id}")).await;
        assert_eq!(code, 200, "{body}");
        serde_json::from_value(body.clone())
            .unwrap_or_else(|e| panic!("not a client status ({e}): {body}"))
    }

    /// Waits until `client_id` shows as connected.
    pub async fn wait_connected(&self, client_id: &str) {
        wait_until(Duration::from_secs(30), "agent to connect", || async {
            self.client(client_id).await.connected
        })
        .await;
    }

    /// One unlabelled sample from `/metrics`.
    pub async fn metric(&self, name: &str) -> u64 {
        let text = self
            .http_client()
            .get(format!("{}/metrics", self.http_url()))
            .bearer_auth(operator_token())
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.parse::<f64>().ok())
            .map(|v| v as u64)
            .unwrap_or_else(|| panic!("{name} not in /metrics"))
    }

    /// Waits until the server no longer lists the agent as connected (it removes the entry after
    /// the connection's task ends, a moment after the socket closes).
    pub async fn wait_disconnected(&self, client_id: &str) {
        wait_until(
            Duration::from_secs(30),
            "agent to be disconnected",
            || async { !self.client(client_id).await.connected },
        )
        .await;
    }

    /// Checks a token as this server does: with the key its header names, from the server's key
    /// file (`token-keys.json` in its data directory), or with the test secret if it names none.
    pub fn verify(&self, token: &str) -> Result<shared::auth::Claims, String> {
        verify_with_keys_in(&self.data_dir, token)
    }

    /// Waits until the upload is in a terminal state and returns its status.
    pub async fn wait_finished(&self, upload_id: &str) -> UploadStatus {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let status = self.upload(upload_id).await;
            if status.state.is_terminal() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "upload {upload_id} did not finish: {status:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Multipart uploads still in progress under a client's prefix, as ListMultipartUploads
    /// reports them (the embedded store implements it on top of s3s-fs).
    pub async fn in_progress_multiparts(&self, client_id: &str) -> usize {
        let out = self
            .s3()
            .await
            .list_multipart_uploads()
            .bucket(BUCKET)
            .prefix(format!("uploads/{client_id}/"))
            .send()
            .await
            .unwrap();
        out.uploads().len()
    }

    pub async fn object_sha256(&self, key: &str) -> String {
        if self.ca_file.is_some() {
            // The test's S3 client does not trust the throwaway certificate; s3s-fs keeps each
            // object as a plain file at `<root>/<bucket>/<key>`, so read that instead.
            let bytes = std::fs::read(self.data_dir.join(BUCKET).join(key)).unwrap();
            return hex::encode(Sha256::digest(&bytes));
        }
        let mut obj = self
            .s3()
            .await
            .get_object()
            .bucket(BUCKET)
            .key(key)
            .send()
            .await
            .unwrap();
        let mut hasher = Sha256::new();
        while let Some(chunk) = obj.body.try_next().await.unwrap() {
            hasher.update(&chunk);
        }
        hex::encode(hasher.finalize())
    }

    pub async fn list_keys(&self, client_id: &str) -> Vec<String> {
        let out = self
            .s3()
            .await
            .list_objects_v2()
            .bucket(BUCKET)
            .prefix(format!("uploads/{client_id}/"))
            .send()
            .await
            .unwrap();
        out.contents()
            .iter()
            .filter_map(|o| o.key().map(str::to_owned))
            .collect()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Arguments of a `STORAGE=s3` server listening on `api`, whose S3 is `endpoint` (in tests, another
/// server's embedded store). With `static_keys`, the embedded store's keys are in its settings;
/// without, it finds credentials through aws-config's default chain.
pub fn s3_server_args(
    data_dir: &Path,
    api: SocketAddr,
    endpoint: &str,
    static_keys: bool,
) -> Vec<String> {
    let mut args = base_server_args(data_dir);
    args.extend(
        [
            "--listen-addr",
            &api.to_string(),
            "--storage",
            "s3",
            "--s3-endpoint-url",
            endpoint,
            "--aws-region",
            "us-east-1",
            "--orphan-sweep-interval-secs",
            "0",
        ]
        .map(str::to_owned),
    );
    if static_keys {
        args.extend(
            [
                "--aws-access-key-id",
                EMBEDDED_ACCESS_KEY,
                "--aws-secret-access-key",
                EMBEDDED_SECRET_KEY,
            ]
            .map(str::to_owned),
        );
    }
    args
}

/// What every test server gets: the secret, the bucket, quick pings and its data directory.
fn base_server_args(data_dir: &Path) -> Vec<String> {
    vec![
        "server".into(),
        "--jwt-secret".into(),
        SECRET.into(),
        "--bucket".into(),
        BUCKET.into(),
        "--ping-interval-secs".into(),
        "2".into(),
        "--data-dir".into(),
        data_dir.display().to_string(),
    ]
}

/// Runs a server (embedded storage, data in `data_dir`) with `extra` arguments that must keep
/// it from starting; returns its error, in full.
pub async fn refused_start(data_dir: &Path, extra: &[&str]) -> String {
    let argv = server_args(Mode::Embedded, data_dir, extra);
    let config = server::config::Config::try_parse_from(&argv).unwrap();
    let listeners = server::Listeners {
        api: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        embedded_s3: Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
    };
    let run = server::run(config, listeners, CancellationToken::new());
    let err = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the server gives up within 30 s")
        .expect_err("the server does not start");
    format!("{err:#}")
}

/// Command-line arguments of a test server (listen addresses not included).
pub fn server_args(mode: Mode, data_dir: &Path, extra: &[&str]) -> Vec<String> {
    let mut args = base_server_args(data_dir);
    match mode {
        Mode::Embedded => args.extend([
            "--storage".into(),
            "embedded".into(),
            "--embedded-s3-access-key".into(),
            EMBEDDED_ACCESS_KEY.into(),
            "--embedded-s3-secret-key".into(),
            EMBEDDED_SECRET_KEY.into(),
        ]),
        Mode::LocalStack => args.extend([
            "--storage".into(),
            "s3".into(),
            "--s3-endpoint-url".into(),
            localstack_endpoint(),
            "--aws-access-key-id".into(),
            "test".into(),
            "--aws-secret-access-key".into(),
            "test".into(),
            "--aws-region".into(),
            "us-east-1".into(),
        ]),
    }
    // Test servers share LocalStack's bucket; a server sweeping orphans would abort the other
    // servers' uploads, so only tests that ask for the sweep get it.
    if mode == Mode::LocalStack && !extra.contains(&"--orphan-sweep-interval-secs") {
        args.extend(["--orphan-sweep-interval-secs".into(), "0".into()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Arguments of a server process (a [`ChildProcess`] to kill) on `mode`'s storage, listening
/// on `api`, with its embedded store (if any) on `s3`, presigning for `public` (a fault proxy)
/// and parts of 5 MiB.
pub fn child_server_args(
    mode: Mode,
    data_dir: &Path,
    api: SocketAddr,
    s3: SocketAddr,
    public: &str,
) -> Vec<String> {
    let (api, s3) = (api.to_string(), s3.to_string());
    server_args(
        mode,
        data_dir,
        &[
            "--listen-addr",
            &api,
            "--embedded-s3-listen-addr",
            &s3,
            "--s3-public-endpoint",
            public,
            "--part-size",
            "5242880",
        ],
    )
}

/// The arguments of an in-process [`TestAgent`], for running the same agent as a process.
pub fn agent_args(
    server_ws_url: &str,
    client_id: &str,
    file: &Path,
    extra: &[&str],
) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "client".into(),
        "--server-url".into(),
        server_ws_url.to_owned(),
        "--token".into(),
        agent_token(client_id),
        "--file-path".into(),
        file.display().to_string(),
        "--reconnect-min-ms".into(),
        "100".into(),
        "--reconnect-max-ms".into(),
        "1000".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// With `BACKHAUL_TEST_LOG_FILE` set, this test process's log (its in-process servers and
/// agents, filtered by `RUST_LOG`, `info` by default) is written to that file: for a test run
/// many times to catch a rare failure.
pub fn log_to_file_if_asked() {
    let Ok(path) = std::env::var("BACKHAUL_TEST_LOG_FILE") else {
        return;
    };
    let file = std::fs::File::create(&path).expect("creating BACKHAUL_TEST_LOG_FILE");
    let _ = tracing_subscriber::fmt()
        .with_writer(std::sync::Mutex::new(file))
        .with_ansi(false)
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
        .try_init();
}

/// An agent or server running as a separate process (this test binary, re-run with
/// [`crate::child::entry`]), so a test can kill it with SIGKILL.
pub struct ChildProcess {
    child: tokio::process::Child,
}

impl ChildProcess {
    pub fn spawn(kind: &str, args: &[String]) -> Self {
        Self::spawn_with_env(kind, args, &[])
    }

    /// Like [`ChildProcess::spawn`], with extra environment variables for the child alone (such
    /// as `SSL_CERT_FILE`, which a test must not set in its own process).
    pub fn spawn_with_env(kind: &str, args: &[String], env: &[(&str, &OsStr)]) -> Self {
        Self::spawn_inner(kind, args, env, None)
    }

    /// Like [`ChildProcess::spawn`], with the child's log (its stderr) written to `log`.
    pub fn spawn_logging(kind: &str, args: &[String], log: std::fs::File) -> Self {
        Self::spawn_inner(kind, args, &[], Some(log))
    }

    fn spawn_inner(
        kind: &str,
        args: &[String],
        env: &[(&str, &OsStr)],
        log: Option<std::fs::File>,
    ) -> Self {
        let exe = std::env::current_exe().unwrap();
        let stderr = log.map_or_else(std::process::Stdio::inherit, std::process::Stdio::from);
        let child = tokio::process::Command::new(exe)
            .envs(env.iter().copied())
            .stderr(stderr)
            .args([
                "--exact",
                "child::entry",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("BACKHAUL_CHILD", kind)
            .env("BACKHAUL_CHILD_ARGS", serde_json::to_string(args).unwrap())
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        Self { child }
    }

    /// SIGKILL: no clean-up, no goodbye on the WebSocket.
    pub async fn kill9(&mut self) {
        self.child.start_kill().unwrap();
        let _ = self.child.wait().await;
    }
}

/// A new, empty PostgreSQL database on the test command's server (`scripts/test.sh` starts it
/// and sets `BACKHAUL_TEST_DATABASE_URL`); its URL.
pub fn fresh_database() -> String {
    let admin = std::env::var("BACKHAUL_TEST_DATABASE_URL").expect(
        "the PostgreSQL tests need BACKHAUL_TEST_DATABASE_URL: run scripts/test.sh, or \
         engines/postgres.sh start and export BACKHAUL_TEST_DATABASE_URL=$(engines/postgres.sh url)",
    );
    let name = format!("backhaul_it_{}", uuid::Uuid::new_v4().simple());
    // The blocking client runs its own runtime, so not on this test's.
    let create = format!("CREATE DATABASE {name}");
    let admin_for_thread = admin.clone();
    std::thread::spawn(move || {
        let mut client = postgres::Client::connect(&admin_for_thread, postgres::NoTls)
            .expect("connecting to the test PostgreSQL");
        client.batch_execute(&create).expect("creating a database");
    })
    .join()
    .unwrap();
    let mut url = url::Url::parse(&admin).unwrap();
    url.set_path(&name);
    url.to_string()
}

/// A free loopback port (bound and released; the tiny race is acceptable in tests).
pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn tls_cert_path(extra: &[&str]) -> Option<PathBuf> {
    extra
        .iter()
        .position(|a| *a == "--tls-cert-file")
        .map(|i| PathBuf::from(extra[i + 1]))
}

async fn bind_retrying(addr: SocketAddr) -> TcpListener {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpListener::bind(addr).await {
            Ok(l) => return l,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("binding {addr}: {e}"),
        }
    }
}

async fn assert_localstack_up(endpoint: &str) {
    let url = format!("{endpoint}/_localstack/health");
    let ok = match reqwest::get(&url).await {
        Ok(r) => r.text().await.unwrap_or_default().contains("\"s3\""),
        Err(_) => false,
    };
    assert!(
        ok,
        "LocalStack is not reachable at {endpoint}: start it with localstack/start.sh \
         (scripts/test.sh does this); LocalStack tests fail rather than skip"
    );
}

/// A real agent (the `client` library) running in this process.
pub struct TestAgent {
    shutdown: CancellationToken,
}

impl TestAgent {
    pub fn start(server: &TestServer, client_id: &str, file: &Path) -> Self {
        Self::start_with(server, client_id, file, &[])
    }

    pub fn start_with(server: &TestServer, client_id: &str, file: &Path, extra: &[&str]) -> Self {
        let mut args = agent_args(&server.ws_url(), client_id, file, extra);
        if let Some(ca) = &server.ca_file {
            args.extend(["--ca-file".into(), ca.display().to_string()]);
        }
        let config = client::Config::try_parse_from(&args).unwrap();
        let shutdown = CancellationToken::new();
        tokio::spawn(client::run(config, shutdown.clone()));
        Self { shutdown }
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Writes `len` pseudo-random bytes (cheap, incompressible enough) and returns the SHA-256.
pub async fn write_file(path: &Path, len: u64) -> String {
    let mut f = tokio::fs::File::create(path).await.unwrap();
    let mut hasher = Sha256::new();
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15 ^ len;
    let mut buf = vec![0u8; MIB as usize];
    let mut left = len;
    while left > 0 {
        for chunk in buf.chunks_mut(8) {
            // xorshift64
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let bytes = state.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n]).await.unwrap();
        hasher.update(&buf[..n]);
        left -= n as u64;
    }
    f.flush().await.unwrap();
    hex::encode(hasher.finalize())
}

/// Runs the real `cli` binary against `server`, as the test operator.
pub async fn run_cli(server: &TestServer, args: &[&str]) -> Output {
    run_cli_as(server, &operator_token(), args).await
}

/// Runs the real `cli` binary against `server` with `token` as its API token, and no
/// `JWT_SECRET` in its environment.
pub async fn run_cli_as(server: &TestServer, token: &str, args: &[&str]) -> Output {
    let bin = env!("CARGO_BIN_EXE_cli");
    let mut cmd = tokio::process::Command::new(bin);
    if let Some(ca) = &server.ca_file {
        cmd.env("CA_FILE", ca);
    } else {
        cmd.env_remove("CA_FILE");
    }
    cmd.args(args)
        .env("SERVER_URL", server.http_url())
        .env("API_TOKEN", token)
        .env_remove("JWT_SECRET")
        .output()
        .await
        .unwrap()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The `file_info` an honest protocol 2 agent sends for `data`.
pub fn file_info(
    upload_id: &str,
    file_name: &str,
    data: &[u8],
    min_part_size: u64,
) -> serde_json::Value {
    use base64::Engine;
    use md5::Md5;
    let (part_size, _) = shared::protocol::plan_parts(data.len() as u64, min_part_size).unwrap();
    let mut part_md5: Vec<String> = data
        .chunks(part_size as usize)
        .map(|c| base64::engine::general_purpose::STANDARD.encode(Md5::digest(c)))
        .collect();
    if part_md5.is_empty() {
        part_md5.push(base64::engine::general_purpose::STANDARD.encode(Md5::digest(b"")));
    }
    serde_json::json!({
        "type": "file_info",
        "upload_id": upload_id,
        "file_name": file_name,
        "size": data.len(),
        "modified_ms": 1,
        "sha256": hex::encode(Sha256::digest(data)),
        "part_size": part_size,
        "part_md5": part_md5,
    })
}

/// The protocol [`RawAgent`] speaks: the previous one, as agents in the field still do, so every
/// test that drives the wire by hand shows the server still serving them.
pub const RAW_PROTOCOL_VERSION: u32 = shared::protocol::OLDEST_PROTOCOL_VERSION;

/// The `file_info` an honest protocol 3 agent sends for `data`: a CRC64NVME per part.
pub fn file_info_v3(
    upload_id: &str,
    file_name: &str,
    data: &[u8],
    min_part_size: u64,
) -> serde_json::Value {
    let (part_size, _) = shared::protocol::plan_parts(data.len() as u64, min_part_size).unwrap();
    let mut crcs: Vec<String> = data
        .chunks(part_size as usize)
        .map(|c| shared::hash::Crc64Nvme::of(c).to_base64())
        .collect();
    if crcs.is_empty() {
        crcs.push(shared::hash::Crc64Nvme::of(b"").to_base64());
    }
    serde_json::json!({
        "type": "file_info",
        "upload_id": upload_id,
        "file_name": file_name,
        "size": data.len(),
        "modified_ms": 1,
        "part_size": part_size,
        "part_crc64nvme": crcs,
    })
}

/// A hand-driven agent connection of protocol 2, for protocol-level tests.
pub struct RawAgent {
    pub ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
}

/// Opens `/ws/connect` with an optional bearer token; `Err(status)` if the upgrade is refused.
pub async fn ws_connect(server: &TestServer, token: Option<&str>) -> Result<RawAgent, u16> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = server.ws_url().into_client_request().unwrap();
    if let Some(t) = token {
        req.headers_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => Ok(RawAgent { ws }),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("unexpected websocket error: {e}"),
    }
}

impl RawAgent {
    /// Connects and completes the hello/welcome handshake, speaking protocol 2.
    pub async fn connect(server: &TestServer, client_id: &str) -> Self {
        Self::connect_speaking(server, client_id, RAW_PROTOCOL_VERSION).await
    }

    /// Connects speaking protocol `version`; the welcome must name it.
    pub async fn connect_speaking(server: &TestServer, client_id: &str, version: u32) -> Self {
        Self::connect_with_token(server, &agent_token(client_id), version).await
    }

    /// Connects with `token`, speaking protocol `version`.
    pub async fn connect_with_token(server: &TestServer, token: &str, version: u32) -> Self {
        let mut a = ws_connect(server, Some(token)).await.unwrap();
        a.send_json(serde_json::json!({
            "type": "hello",
            "protocol_version": version,
            "agent_version": "raw"
        }))
        .await;
        let welcome = a.recv_json().await.expect("welcome");
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        assert_eq!(welcome["protocol_version"], version, "{welcome}");
        a
    }

    /// Connects as `client_id`, has the server trigger a download, describes a file of `size`
    /// bytes of 7s and returns the agent, the upload id and the `start_upload` plan. The
    /// multipart upload exists in storage from then on.
    pub async fn with_plan(
        server: &TestServer,
        client_id: &str,
        file_name: &str,
        size: u64,
    ) -> (Self, String, serde_json::Value) {
        let mut agent = Self::connect(server, client_id).await;
        let (status, trig) = server.trigger(client_id).await;
        assert_eq!(status, 202, "{trig}");
        let upload_id = trig["upload_id"].as_str().unwrap().to_owned();
        let describe = agent.recv_json().await.unwrap();
        assert_eq!(describe["type"], "describe_file", "{describe}");
        let min_part_size = describe["min_part_size"].as_u64().unwrap();
        agent
            .send_json(file_info(
                &upload_id,
                file_name,
                &vec![7u8; size as usize],
                min_part_size,
            ))
            .await;
        let plan = agent.recv_json().await.unwrap();
        assert_eq!(plan["type"], "start_upload", "{plan}");
        (agent, upload_id, plan)
    }

    pub async fn send_json(&mut self, v: serde_json::Value) {
        self.send_text(&v.to_string()).await;
    }

    pub async fn send_text(&mut self, s: &str) {
        use futures::SinkExt;
        self.ws
            .send(tokio_tungstenite::tungstenite::Message::Text(
                s.to_owned().into(),
            ))
            .await
            .unwrap();
    }

    /// Next JSON message, skipping pings; `None` once the server closed the connection.
    pub async fn recv_json(&mut self) -> Option<serde_json::Value> {
        use futures::StreamExt;
        use tokio_tungstenite::tungstenite::Message;
        loop {
            let next = tokio::time::timeout(Duration::from_secs(30), self.ws.next())
                .await
                .expect("no message within 30s");
            match next {
                Some(Ok(Message::Text(t))) => {
                    return Some(serde_json::from_str(t.as_str()).unwrap());
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Reads messages until the server closes; returns them.
    pub async fn drain_until_closed(&mut self) -> Vec<serde_json::Value> {
        let mut all = Vec::new();
        while let Some(m) = self.recv_json().await {
            all.push(m);
        }
        all
    }
}

/// Sends one HTTP/1.1 request with `path` exactly as given (HTTP clients normalise `..` and
/// `%2e%2e` away, hostile callers do not). Returns the status and the JSON body.
pub async fn raw_request(
    server: &TestServer,
    method: &str,
    path: &str,
    token: &str,
) -> (u16, serde_json::Value) {
    use tokio::io::AsyncReadExt;
    let mut stream = tokio::net::TcpStream::connect(server.api_addr)
        .await
        .unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        server.api_addr
    );
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut resp = Vec::new();
    stream.read_to_end(&mut resp).await.unwrap();
    let text = String::from_utf8_lossy(&resp);
    let status = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    (
        status,
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}

/// Requests straight to storage through presigned URLs, as an agent (or a hostile client) makes
/// them, with no SDK in between.
pub mod raw_s3 {
    /// The object key and S3 upload id a path-style presigned part or completion URL is for.
    pub fn multipart_of(url: &str) -> (String, String) {
        let parsed = reqwest::Url::parse(url).unwrap();
        let key = parsed
            .path()
            .strip_prefix(&format!("/{}/", super::BUCKET))
            .unwrap_or_else(|| panic!("not a path-style URL for the test bucket: {url}"))
            .to_owned();
        let upload_id = parsed
            .query_pairs()
            .find(|(k, _)| k == "uploadId")
            .unwrap_or_else(|| panic!("no uploadId in {url}"))
            .1
            .into_owned();
        (key, upload_id)
    }

    /// PUTs one part, with `Content-MD5` when given.
    pub async fn put_part(
        url: &str,
        content_md5: Option<&str>,
        body: Vec<u8>,
    ) -> reqwest::Response {
        try_put_part(url, content_md5, body).await.unwrap()
    }

    /// [`put_part`], for a request storage may refuse by closing the connection.
    pub async fn try_put_part(
        url: &str,
        content_md5: Option<&str>,
        body: Vec<u8>,
    ) -> reqwest::Result<reqwest::Response> {
        let headers: Vec<(&str, &str)> = content_md5
            .map(|m| ("content-md5", m))
            .into_iter()
            .collect();
        try_put_part_with(url, &headers, body).await
    }

    /// PUTs one part with these headers (a protocol 3 part: `x-amz-checksum-crc64nvme`).
    pub async fn try_put_part_with(
        url: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> reqwest::Result<reqwest::Response> {
        let mut req = reqwest::Client::new().put(url).body(body);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        req.send().await
    }

    /// PUTs the `index`th part of a plan (`parts[index]` of a `start_upload`) with its signed
    /// `Content-MD5`, and returns the ETag storage gave it.
    pub async fn put_planned_part(plan: &serde_json::Value, index: usize, body: Vec<u8>) -> String {
        let part = &plan["parts"][index];
        let resp = put_part(
            part["url"].as_str().unwrap(),
            part["content_md5"].as_str(),
            body,
        )
        .await;
        assert!(
            resp.status().is_success(),
            "part {index}: {}",
            resp.status()
        );
        resp.headers()["etag"].to_str().unwrap().to_owned()
    }

    /// POSTs the completion of a plan with these ETags, parts numbered from 1.
    pub async fn complete(plan: &serde_json::Value, etags: &[String]) -> reqwest::Response {
        let mut body = String::from("<CompleteMultipartUpload>");
        for (i, etag) in etags.iter().enumerate() {
            body.push_str(&format!(
                "<Part><PartNumber>{}</PartNumber><ETag>{etag}</ETag></Part>",
                i + 1
            ));
        }
        body.push_str("</CompleteMultipartUpload>");
        reqwest::Client::new()
            .post(plan["complete_url"].as_str().unwrap())
            .body(body)
            .send()
            .await
            .unwrap()
    }
}
