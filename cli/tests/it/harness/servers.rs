//! A server in this test process, on ephemeral ports, and the requests tests make of it.

use super::*;

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

    /// Sends `request` as the test operator: the answer's status and JSON body (null if none).
    pub async fn as_operator(&self, request: reqwest::RequestBuilder) -> (u16, serde_json::Value) {
        let resp = request.bearer_auth(operator_token()).send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(serde_json::Value::Null))
    }

    pub async fn get_json(&self, path: &str) -> (u16, serde_json::Value) {
        let url = format!("{}{path}", self.http_url());
        self.as_operator(self.http_client().get(url)).await
    }

    pub async fn trigger(&self, client_id: &str) -> (u16, serde_json::Value) {
        let url = format!("{}/trigger-download/{client_id}", self.http_url());
        self.as_operator(self.http_client().post(url)).await
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
