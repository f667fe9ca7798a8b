use anyhow::Context;
use clap::Parser;
use server::config::{LogFormat, StorageKind};
use server::host::ServerCli;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let ServerCli { command, config } = ServerCli::parse();
    if let Some(command) = command {
        // Stdout carries the command's answer (a token), so the log goes to stderr.
        tracing_subscriber::fmt()
            .with_env_filter(log_filter())
            .with_writer(std::io::stderr)
            .init();
        println!("{}", server::host::run(&command)?);
        return Ok(());
    }
    init_tracing(config.log_format);
    config.validate()?;
    raise_open_file_limit();

    let api = TcpListener::bind(config.listen_addr)
        .await
        .with_context(|| format!("binding {}", config.listen_addr))?;
    let embedded_s3 = match config.storage {
        StorageKind::Embedded => Some(
            TcpListener::bind(config.embedded_s3_listen_addr)
                .await
                .with_context(|| format!("binding {}", config.embedded_s3_listen_addr))?,
        ),
        StorageKind::S3 => None,
    };

    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    server::run(config, server::Listeners { api, embedded_s3 }, shutdown)
        .await
        .map_err(|e| {
            tracing::error!(error = format!("{e:#}"), "server failed");
            e
        })
}

/// Each agent holds a socket open, and a service manager's default soft limit (1,024 under
/// systemd) would cap the fleet near a thousand agents: the soft limit is raised to the hard one.
fn raise_open_file_limit() {
    let before = rlimit::getrlimit(rlimit::Resource::NOFILE).map(|(soft, _)| soft);
    match (before, rlimit::increase_nofile_limit(u64::MAX)) {
        (Ok(before), Ok(now)) => {
            tracing::info!(before, now, "open-file limit");
        }
        (_, Err(e)) | (Err(e), _) => {
            tracing::warn!(error = %e, "could not raise the open-file limit");
        }
    }
}

async fn cancel_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("could not install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    shutdown.cancel();
}

fn log_filter() -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,aws_config=warn,aws_smithy_runtime=warn,s3s=warn".into())
}

fn init_tracing(format: LogFormat) {
    let builder = tracing_subscriber::fmt().with_env_filter(log_filter());
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
