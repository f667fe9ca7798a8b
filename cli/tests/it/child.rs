//! The entry point of [`crate::harness::ChildProcess`]: this test binary, re-run with
//! `BACKHAUL_CHILD=agent|server`, runs the real agent or server library until killed.

use clap::Parser;

#[test]
#[ignore = "runs only inside a child process started by the fault tests"]
fn entry() {
    let Ok(kind) = std::env::var("BACKHAUL_CHILD") else {
        return;
    };
    let args: Vec<String> =
        serde_json::from_str(&std::env::var("BACKHAUL_CHILD_ARGS").unwrap()).unwrap();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .try_init();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let never = tokio_util::sync::CancellationToken::new();
    rt.block_on(async move {
        match kind.as_str() {
            "agent" => {
                let config = client::Config::try_parse_from(&args).unwrap();
                client::run(config, never).await.unwrap();
            }
            "server" => {
                let config = server::config::Config::try_parse_from(&args).unwrap();
                let api = tokio::net::TcpListener::bind(config.listen_addr)
                    .await
                    .unwrap();
                let embedded_s3 = match config.storage {
                    server::config::StorageKind::Embedded => Some(
                        tokio::net::TcpListener::bind(config.embedded_s3_listen_addr)
                            .await
                            .unwrap(),
                    ),
                    server::config::StorageKind::S3 => None,
                };
                server::run(config, server::Listeners { api, embedded_s3 }, never)
                    .await
                    .unwrap();
            }
            other => panic!("unknown child kind {other}"),
        }
    });
}
