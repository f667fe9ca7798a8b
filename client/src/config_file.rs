//! The agent's configuration file: TOML, for a service installed for years
//! (`/etc/backhaul/agent.toml`; `%ProgramData%\Backhaul\agent.toml` on Windows). Every setting
//! the agent takes as a flag or an environment variable can be set there, under its flag's name
//! or its variable's name in lower case (`server_url` or `agent_server_url`), and labels go in a
//! `[labels]` table:
//!
//! ```toml
//! server_url = "wss://backhaul.example.com/ws/connect"
//! token_file = "/var/lib/backhaul/agent.token"
//! file_path = "/var/exports/today.csv"
//! shared_files = ["z-report=/var/exports/z.csv"]
//!
//! [labels]
//! region = "north"
//! brand = "burger-co"
//! ```
//!
//! Flags win over the environment, which wins over the file. An unknown key is an error, so a
//! typo does not silently leave a setting at its default.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{CommandFactory, FromArgMatches};

use crate::config::Config;

/// Where the agent looks for its file when neither `--config` nor `AGENT_CONFIG` names one.
pub const DEFAULT_CONFIG_FILE: &str = if cfg!(windows) {
    r"C:\ProgramData\Backhaul\agent.toml"
} else {
    "/etc/backhaul/agent.toml"
};

impl Config {
    /// The agent's settings from its command line, its environment and its configuration file.
    pub fn load() -> anyhow::Result<Self> {
        Self::load_from(std::env::args_os().collect(), |name| std::env::var_os(name))
    }

    /// [`Config::load`] with the arguments and the environment given, for tests.
    pub fn load_from(
        args: Vec<OsString>,
        env: impl Fn(&str) -> Option<OsString>,
    ) -> anyhow::Result<Self> {
        let first = Self::try_parse_args(&args)?;
        let (path, explicit) = match &first.config {
            Some(path) => (path.clone(), true),
            None => (PathBuf::from(DEFAULT_CONFIG_FILE), false),
        };
        if !explicit && !path.exists() {
            return Ok(first);
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading the configuration file {}", path.display()))?;
        let from_file = file_args(&path, &text, &args, &env)?;
        let mut merged = vec![args.first().cloned().unwrap_or_else(|| "client".into())];
        merged.extend(from_file);
        merged.extend(args.iter().skip(1).cloned());
        Self::try_parse_args(&merged)
    }

    fn try_parse_args(args: &[OsString]) -> anyhow::Result<Self> {
        let matches = Self::command().try_get_matches_from(args)?;
        Ok(Self::from_arg_matches(&matches)?)
    }
}

/// `client --check-config`: validates the settings and the token, and describes what the agent
/// would use. Shared files that do not exist (yet) are reported, not refused: tonight's z-report
/// may not have been written when the agent is installed.
pub fn check(config: &Config) -> anyhow::Result<String> {
    use std::fmt::Write;
    config.validate()?;
    let token = crate::token::AgentToken::load(config)?;
    let claims = shared::auth::peek_claims(token.current().expose())
        .context("the agent's token is not a JWT")?;
    anyhow::ensure!(
        claims.role == shared::auth::Role::Agent,
        "the token is not an agent token"
    );
    let mut out = String::new();
    let _ = writeln!(out, "configuration ok");
    if let Some(path) = &config.config {
        let _ = writeln!(out, "  file:     {}", path.display());
    }
    let _ = writeln!(out, "  server:   {}", config.server_url);
    let source = match &config.token_file {
        Some(p) if p.exists() => format!("{}", p.display()),
        _ => "AGENT_TOKEN".to_owned(),
    };
    let left = claims.exp.saturating_sub(shared::auth::unix_now());
    let _ = writeln!(
        out,
        "  token:    from {source}: client id {}, expires in {} days{}",
        claims.sub,
        left / 86_400,
        if left == 0 { " (EXPIRED)" } else { "" }
    );
    let mut shares = vec![(
        shared::protocol::DEFAULT_SHARE.to_owned(),
        config.file_path(),
    )];
    shares.extend(
        config
            .shares
            .iter()
            .map(|s| (s.name.to_string(), s.path.clone())),
    );
    for (name, path) in shares {
        let state = match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => "a symbolic link: it will be refused",
            Ok(m) if m.is_file() => "exists",
            Ok(_) => "not a regular file: it will be refused",
            Err(_) => "missing for now",
        };
        let sealed = shared::FileName::parse(&name)
            .map(|n| config.share_recipients(&n).len())
            .unwrap_or(0);
        let sealed = match sealed {
            0 => String::new(),
            n => format!(", encrypted to {n} recipient(s)"),
        };
        let _ = writeln!(
            out,
            "  share:    {name} = {} ({state}{sealed})",
            path.display()
        );
    }
    let labels = config.labels()?;
    let _ = writeln!(
        out,
        "  labels:   {}",
        if labels.is_empty() {
            "none".to_owned()
        } else {
            labels.to_string()
        }
    );
    Ok(out)
}

/// The file's settings as command-line arguments, leaving out those that the command line or the
/// environment already sets.
fn file_args(
    path: &Path,
    text: &str,
    args: &[OsString],
    env: &impl Fn(&str) -> Option<OsString>,
) -> anyhow::Result<Vec<OsString>> {
    let table: toml::Table =
        toml::from_str(text).with_context(|| format!("{} is not valid TOML", path.display()))?;
    let command = Config::command();
    let given = |long: &str| {
        let flag = format!("--{long}");
        args.iter().any(|a| {
            let a = a.to_string_lossy();
            a == flag || a.starts_with(&format!("{flag}="))
        })
    };
    let mut out = Vec::new();
    for (key, value) in &table {
        if key == "labels" {
            let toml::Value::Table(labels) = value else {
                bail!(
                    "{}: `labels` must be a table of key = \"value\"",
                    path.display()
                );
            };
            if given("label") || env("AGENT_LABELS").is_some() {
                continue;
            }
            for (k, v) in labels {
                let toml::Value::String(v) = v else {
                    bail!("{}: label {k} must be a string", path.display());
                };
                out.push("--label".into());
                out.push(format!("{k}={v}").into());
            }
            continue;
        }
        let arg = command
            .get_arguments()
            .find(|a| {
                let long = a.get_long().map(|l| l.replace('-', "_"));
                let env = a
                    .get_env()
                    .map(|e| e.to_string_lossy().to_ascii_lowercase());
                long.as_deref() == Some(key) || env.as_deref() == Some(key)
            })
            .filter(|a| !matches!(a.get_id().as_str(), "config" | "check_config"))
            .with_context(|| format!("{}: unknown setting `{key}`", path.display()))?;
        let long = arg.get_long().unwrap_or_default();
        if given(long)
            || arg
                .get_env()
                .is_some_and(|e| env(&e.to_string_lossy()).is_some())
        {
            continue;
        }
        let value = match value {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Array(items) => items
                .iter()
                .map(|i| match i {
                    toml::Value::String(s) => Ok(s.clone()),
                    other => Ok(other.to_string()),
                })
                .collect::<anyhow::Result<Vec<_>>>()?
                .join(","),
            other => bail!("{}: `{key}` cannot be {}", path.display(), other.type_str()),
        };
        out.push(format!("--{long}={value}").into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(file: &str, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Config> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, file).unwrap();
        let mut all: Vec<OsString> = vec!["client".into(), "--config".into(), path.into()];
        all.extend(args.iter().map(OsString::from));
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Config::load_from(all, |name| {
            env.iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| OsString::from(v))
        })
    }

    const FILE: &str = r#"
server_url = "wss://backhaul.example.com/ws/connect"
token_file = "/var/lib/backhaul/agent.token"
file_path = "/var/exports/today.csv"
shared_files = ["z-report=/var/exports/z.csv", "menu=/var/exports/menu.csv"]
upload_concurrency = 2

[labels]
region = "north"
brand = "burger-co"
"#;

    #[test]
    fn the_file_sets_what_flags_and_the_environment_leave_unset() {
        let c = load(FILE, &[], &[]).unwrap();
        assert_eq!(
            c.server_url.as_str(),
            "wss://backhaul.example.com/ws/connect"
        );
        assert_eq!(
            c.token_file.as_deref(),
            Some(Path::new("/var/lib/backhaul/agent.token"))
        );
        assert_eq!(c.shares.len(), 2);
        assert_eq!(c.upload_concurrency, 2);
        let labels: Vec<String> = c
            .labels
            .iter()
            .map(|l| format!("{}={}", l.key, l.value))
            .collect();
        assert_eq!(labels, ["brand=burger-co", "region=north"]);

        let c = load(FILE, &["--upload-concurrency", "8"], &[]).unwrap();
        assert_eq!(c.upload_concurrency, 8, "a flag wins");
        // A setting the environment holds is left to it (clap reads the real environment).
        let c = load(FILE, &[], &[("UPLOAD_CONCURRENCY", "6")]).unwrap();
        assert_eq!(c.upload_concurrency, 4, "the file's 2 was left out");
    }

    #[test]
    fn check_config_reports_what_the_agent_would_use() {
        let dir = tempfile::tempdir().unwrap();
        let token_file = dir.path().join("agent.token");
        let keys = shared::auth::TokenKeys::new(b"0123456789abcdef0123456789abcdef").unwrap();
        let token = keys
            .issue(
                "restaurant-1",
                shared::auth::Role::Agent,
                std::time::Duration::from_secs(30 * 86_400 + 43_200),
            )
            .unwrap();
        std::fs::write(&token_file, token).unwrap();
        let export = dir.path().join("today.csv");
        std::fs::write(&export, b"x").unwrap();
        let file = format!(
            "token_file = {token_file:?}\nfile_path = {export:?}\nshared_files = [\"z=/nonexistent/z.csv\"]\n[labels]\nregion = \"north\"\n"
        );
        let c = load(&file, &[], &[]).unwrap();
        let report = check(&c).unwrap();
        assert!(
            report.contains("client id restaurant-1, expires in 30 days"),
            "{report}"
        );
        assert!(report.contains("(exists)"), "{report}");
        assert!(
            report.contains("z = /nonexistent/z.csv (missing for now)"),
            "{report}"
        );
        assert!(report.contains("labels:   region=north"), "{report}");

        let operator = keys
            .issue(
                "alice",
                shared::auth::Role::Operator,
                std::time::Duration::from_secs(60),
            )
            .unwrap();
        std::fs::write(&token_file, operator).unwrap();
        let err = check(&load(&file, &[], &[]).unwrap()).unwrap_err();
        assert!(err.to_string().contains("not an agent token"), "{err}");
    }

    #[test]
    fn encrypted_shares_name_their_recipients() {
        let (_, a) = shared::sealed::Identities::generate();
        let (_, b) = shared::sealed::Identities::generate();
        let (_, c) = shared::sealed::Identities::generate();
        let file = format!(
            "encrypt_to = [\"{a}\", \"{b}\"]\nshared_files = [\"z=/var/z.csv;encrypt_to={c}\", \"m=/var/m.csv\"]\n"
        );
        let config = load(&file, &[], &[]).unwrap();
        config.validate().unwrap();
        let name = |n: &str| shared::FileName::parse(n).unwrap();
        assert_eq!(
            config.share_recipients(&name("z")),
            std::slice::from_ref(&c)
        );
        assert_eq!(config.share_recipients(&name("m")), &[a.clone(), b]);
        assert_eq!(
            config.share_recipients(&name("default")),
            config.encrypt_to.0.as_slice()
        );
        // Empty is none; a recipient that is not one is refused with its name.
        let none = load("", &["--encrypt-to="], &[]).unwrap();
        assert!(none.share_recipients(&name("default")).is_empty());
        let bad = load("encrypt_to = [\"age1nope\"]\n", &[], &[]).unwrap_err();
        assert!(format!("{bad:#}").contains("age1nope"), "{bad:#}");
        let bad = load("shared_files = [\"z=/z;encrypt_to=x\"]\n", &[], &[]).unwrap_err();
        assert!(format!("{bad:#}").contains("share z"), "{bad:#}");
    }

    #[test]
    fn the_packaged_example_is_valid() {
        let c = load(include_str!("../../packaging/agent.toml"), &[], &[]).unwrap();
        c.validate().unwrap();
        assert_eq!(c.labels().unwrap().get("region"), Some("north"));
    }

    #[test]
    fn mistakes_in_the_file_are_errors() {
        let typo = load("server_ur = \"ws://x/ws/connect\"\n", &[], &[]).unwrap_err();
        assert!(
            format!("{typo:#}").contains("unknown setting `server_ur`"),
            "{typo:#}"
        );
        let bad = load("[labels]\nRegion = \"north\"\n", &[], &[]).unwrap_err();
        assert!(format!("{bad:#}").contains("Region"), "{bad:#}");
        let not_toml = load("server_url = \n", &[], &[]).unwrap_err();
        assert!(
            format!("{not_toml:#}").contains("not valid TOML"),
            "{not_toml:#}"
        );
        let missing = Config::load_from(
            vec![
                "client".into(),
                "--config".into(),
                "/nonexistent/agent.toml".into(),
            ],
            |_| None,
        )
        .unwrap_err();
        assert!(format!("{missing:#}").contains("/nonexistent/agent.toml"));
    }
}
