//! `.env.example` and `docker-compose.yml` stay true to the binaries' settings.

use std::collections::BTreeSet;

use clap::CommandFactory;

fn env_vars(cmd: &clap::Command, out: &mut BTreeSet<String>) {
    for arg in cmd.get_arguments() {
        if let Some(env) = arg.get_env() {
            out.insert(env.to_string_lossy().into_owned());
        }
    }
    for sub in cmd.get_subcommands() {
        env_vars(sub, out);
    }
}

fn all_settings() -> BTreeSet<String> {
    let mut vars = BTreeSet::new();
    env_vars(&server::config::Config::command(), &mut vars);
    env_vars(&client::Config::command(), &mut vars);
    env_vars(&cli::Cli::command(), &mut vars);
    vars
}

fn repo_file(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn env_example_lists_every_setting() {
    let example = repo_file(".env.example");
    let listed: BTreeSet<String> = example
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('=').map(|(k, _)| k.trim().to_owned()))
        .collect();
    let settings = all_settings();
    let missing: Vec<_> = settings.difference(&listed).collect();
    assert!(missing.is_empty(), ".env.example lacks {missing:?}");
    let stale: Vec<_> = listed.difference(&settings).collect();
    assert!(
        stale.is_empty(),
        ".env.example lists unknown settings {stale:?}"
    );
}

#[test]
fn docker_compose_only_sets_known_settings() {
    let compose = repo_file("docker-compose.yml");
    // LocalStack's own settings, read by the LocalStack container and its init hook, and
    // PostgreSQL's.
    let localstack = [
        "SERVICES",
        "S3_SKIP_SIGNATURE_VALIDATION",
        "S3_BUCKET_NAME",
        "POSTGRES_HOST_AUTH_METHOD",
    ];
    let settings = all_settings();
    let mut in_env = false;
    for line in compose.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("environment:") {
            in_env = true;
            continue;
        }
        if in_env {
            let Some((key, _)) = trimmed.split_once(':') else {
                in_env = false;
                continue;
            };
            if !key.chars().all(|c| c.is_ascii_uppercase() || c == '_') || key.is_empty() {
                in_env = false;
                continue;
            }
            assert!(
                settings.contains(key) || localstack.contains(&key),
                "docker-compose.yml sets {key}, which no binary reads"
            );
        }
    }
}

/// The packaged systemd unit passes `systemd-analyze verify` (with its binary swapped for one
/// that exists here).
#[test]
fn the_systemd_unit_verifies() {
    let unit = repo_file("packaging/backhaul-agent.service");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("backhaul-agent.service");
    std::fs::write(
        &path,
        unit.replace(
            "/usr/local/bin/backhaul-agent --config /etc/backhaul/agent.toml",
            "/bin/true",
        ),
    )
    .unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .expect("systemd-analyze (Debian's systemd package) runs the unit check");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
}
