//! The `client` binary as an installer runs it: `--check-config` validates the settings and the
//! token from the environment alone and says what the agent would use, or exits 1 with the
//! reason. (The end-to-end tests in `cli/tests` run the agent as a library; this one runs `main`.)

use std::process::Command;
use std::time::Duration;

use shared::auth::{Role, TokenKeys};

fn check_config(token: &str, file: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_client"))
        .arg("--check-config")
        .env_clear()
        .env("HOME", file.parent().unwrap())
        .env("AGENT_SERVER_URL", "ws://127.0.0.1:9/ws/connect")
        .env("AGENT_TOKEN", token)
        .env("FILE_PATH", file)
        .output()
        .unwrap()
}

#[test]
fn check_config_reports_the_agent_or_the_reason_it_cannot_run() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("z-report.csv");
    std::fs::write(&file, b"total,42\n").unwrap();
    let keys = TokenKeys::new(b"binary-test-secret-binary-test-secret-0123").unwrap();

    let agent = keys
        .issue("store-7", Role::Agent, Duration::from_secs(3600))
        .unwrap();
    let out = check_config(&agent, &file);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.starts_with("configuration ok"), "{stdout}");
    assert!(stdout.contains("client id store-7"), "{stdout}");

    for (token, reason) in [
        (
            keys.issue("alice", Role::Operator, Duration::from_secs(3600))
                .unwrap(),
            "not an agent token",
        ),
        ("not-a-jwt".to_owned(), "not a JWT"),
    ] {
        let out = check_config(&token, &file);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{reason}: {stderr}");
        assert!(stderr.contains(reason), "{reason}: {stderr}");
    }
}
