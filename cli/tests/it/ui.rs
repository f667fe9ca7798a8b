//! The operator page in a real browser: Debian's headless Chromium, driven by Playwright
//! (`ui-tests/ui.test.mjs`), against a real server with real agents, in both storage modes.
//! This side sets up the fleet (two stores connected, one offline whose last upload failed with
//! an error message that is an HTML tag) and checks what the browser script reports.
//!
//! `scripts/test.sh` installs Chromium and the script's one package; run alone, this test fails
//! with the command that installs them.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::harness::*;
use crate::proxy::{Faults, server_behind_proxy};

/// Text a store supplies that must reach the page as text, never as markup.
const HOSTILE: &str = "<img src=x onerror=alert(1)>";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn chromium() -> PathBuf {
    std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"))
}

async fn operator_page_works_end_to_end(mode: Mode) {
    let script = repo_root().join("ui-tests/ui.test.mjs");
    assert!(
        repo_root()
            .join("ui-tests/node_modules/playwright-core")
            .exists()
            && chromium().exists(),
        "the browser test needs Chromium and playwright-core: run scripts/test.sh, or \
         apt-get install chromium && npm ci --prefix ui-tests"
    );
    // Part PUTs are held for a while, so the page has time to show the upload under way.
    let faults = Faults {
        slow_parts: Some(Duration::from_millis(700)),
        ..Faults::default()
    };
    let (_proxy, server) = server_behind_proxy(mode, faults).await;
    let dir = tempfile::tempdir().unwrap();
    let tag = unique_client("fleet")
        .to_ascii_lowercase()
        .replace('_', "-");
    let label = format!("--label=fleet={tag}");

    // Two stores that stay connected, with a 24 MiB file each.
    let (a, b, c) = (
        unique_client("ui-a"),
        unique_client("ui-b"),
        unique_client("ui-c"),
    );
    let file_a = dir.path().join("a.bin");
    let sha_a = write_file(&file_a, 24 * MIB + 3).await;
    let file_b = dir.path().join("b.bin");
    write_file(&file_b, 3 * MIB).await;
    let _agent_a = TestAgent::start_with(&server, &a, &file_a, &[label.as_str()]);
    let _agent_b = TestAgent::start_with(&server, &b, &file_b, &[label.as_str()]);
    // One that connects, fails an upload with a hostile error message (its file's path), and
    // goes away.
    let hostile_file = dir.path().join(format!("{HOSTILE}.csv"));
    write_file(&hostile_file, 1024).await;
    {
        let _agent_c = TestAgent::start_with(&server, &c, &hostile_file, &[label.as_str()]);
        server.wait_connected(&c).await;
        std::fs::remove_file(&hostile_file).unwrap();
        let id = trigger_id(&server, &c).await;
        let failed = server.wait_finished(&id).await;
        let error = failed.error.expect("the upload failed");
        assert!(error.message.contains(HOSTILE), "{}", error.message);
    }
    server.wait_disconnected(&c).await;
    server.wait_connected(&a).await;
    server.wait_connected(&b).await;

    let shots = std::env::var_os("UI_SCREENSHOT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| dir.path().join("screenshots"));
    let run = tokio::process::Command::new("node")
        .arg(&script)
        .env("BASE_URL", server.http_url())
        .env("OPERATOR_TOKEN", operator_token())
        .env("STORE_A", &a)
        .env("STORE_B", &b)
        .env("STORE_OFFLINE", &c)
        .env("FILE_SHA256", &sha_a)
        .env("FLEET_LABEL", format!("fleet={tag}"))
        .env("HOSTILE_TEXT", HOSTILE)
        .env("CHROMIUM", chromium())
        .env("SCREENSHOT_DIR", &shots)
        .env("WORK_DIR", dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(240), run)
        .await
        .expect("the browser test finished within 4 minutes")
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the browser test failed\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    // The script's last line is what it checked, as JSON.
    let report: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("no report from the browser test ({e})\n{stdout}\n{stderr}"));
    assert_eq!(report["downloaded_sha256"], sha_a.as_str(), "{report}");
    assert_eq!(report["manifest_entries"], 2, "{report}");
    assert_eq!(report["dialogs"], 0, "{report}");
    assert!(
        report["partial_progress_seen"].as_bool() == Some(true),
        "the page showed the upload under way before it completed: {report}"
    );
    assert_eq!(report["no_cookie_status"], 401, "{report}");
    assert_eq!(report["no_csrf_status"], 403, "{report}");
    assert_eq!(report["forged_csrf_status"], 403, "{report}");
    assert_eq!(report["after_sign_out_status"], 401, "{report}");

    // What the page did happened on the server: the pull it started completed there.
    let (status, body) = server.get_json(&format!("/stores/{a}/uploads")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["uploads"][0]["state"], "completed", "{body}");
    assert_eq!(body["uploads"][0]["sha256"], sha_a.as_str(), "{body}");
}

storage_modes!(operator_page, operator_page_works_end_to_end);
