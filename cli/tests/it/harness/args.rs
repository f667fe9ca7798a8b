//! The command lines of test servers and agents.

use super::*;

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
