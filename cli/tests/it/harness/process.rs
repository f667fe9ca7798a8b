//! Agents in this test process, and servers or agents as processes of their own.

use super::*;

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

    /// SIGSTOP with `true`, SIGCONT with `false`: a stopped process keeps its connections and
    /// answers nothing, as a frozen or overloaded one would.
    pub fn pause(&self, paused: bool) {
        let pid = self.child.id().expect("the process is running").to_string();
        let signal = if paused { "-STOP" } else { "-CONT" };
        let status = std::process::Command::new("kill")
            .args([signal, &pid])
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// SIGKILL: no clean-up, no goodbye on the WebSocket.
    pub async fn kill9(&mut self) {
        self.child.start_kill().unwrap();
        let _ = self.child.wait().await;
    }
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
