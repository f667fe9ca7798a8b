//! kill -9 of the server in the middle of a completion, on the embedded store, where the
//! completion runs inside the server process.

use std::sync::atomic::Ordering;
use std::time::Duration;

use rand::Rng;

use crate::harness::*;
use crate::proxy::{FaultProxy, Faults};

const TRIALS: u32 = 20;

/// Part files and completion journals left in the store's directory.
fn leftovers(data_dir: &std::path::Path) -> Vec<String> {
    let mut found: Vec<String> = std::fs::read_dir(data_dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(".upload_id-"))
        .collect();
    for dir in [".backhaul-completions", ".backhaul-parts"] {
        if let Ok(entries) = std::fs::read_dir(data_dir.join(dir)) {
            found.extend(entries.filter_map(|e| {
                Some(format!("{dir}/{}", e.ok()?.file_name().into_string().ok()?))
            }));
        }
    }
    found
}

/// The server dies at a random moment from just before to just after the store completes an
/// upload (its completion copies 30 MiB of parts into the object). After each restart the upload
/// ends `completed` with the agent's bytes, and no part file, part record or journal is left
/// behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_during_completions() {
    let mut rng = seeded_rng("server_killed_during_completions");
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let (api, s3) = (free_addr(), free_addr());
    let proxy = FaultProxy::start(&format!("http://{s3}"), Faults::default()).await;
    let args = child_server_args(Mode::Embedded, &data_dir, api, s3, &proxy.url());
    let mut server_proc = ChildProcess::spawn("server", &args);
    let mut server =
        TestServer::attach(Mode::Embedded, api, &format!("http://{s3}"), &data_dir).await;
    let file = dir.path().join("z-report.bin");
    let sha = write_file(&file, 30 * MIB).await;
    let client_id = unique_client("complkill");
    let _agent = TestAgent::start(&server, &client_id, &file);
    server.wait_connected(&client_id).await;

    // Kills that found a completion journal: the store was mid-completion.
    let mut cut_short = 0;
    for trial in 0..TRIALS {
        let seen = proxy.stats.completions_seen.load(Ordering::Relaxed);
        let upload_id = trigger_id(&server, &client_id).await;
        wait_until(Duration::from_secs(60), "the agent to complete", || async {
            proxy.stats.completions_seen.load(Ordering::Relaxed) > seen
        })
        .await;
        // The store's completion copies the parts inside the kernel: tens of milliseconds.
        let delay = rng.gen_range(0..60);
        eprintln!(
            "completion kill trial {trial}: killing the server {delay} ms into the completion"
        );
        tokio::time::sleep(Duration::from_millis(delay)).await;
        server_proc.kill9().await;
        let journals = std::fs::read_dir(data_dir.join(".backhaul-completions"))
            .map(|d| d.count())
            .unwrap_or(0);
        if journals > 0 {
            cut_short += 1;
        }
        server_proc = ChildProcess::spawn("server", &args);
        server = TestServer::attach(Mode::Embedded, api, &format!("http://{s3}"), &data_dir).await;
        let status = server.wait_finished(&upload_id).await;
        assert_identical(&server, &status, &sha).await;
        assert_eq!(leftovers(&data_dir), Vec::<String>::new(), "trial {trial}");
        assert_eq!(server.in_progress_multiparts(&client_id).await, 0);
    }
    eprintln!(
        "FIGURES completion kill -9: {TRIALS} trials all completed; {cut_short} kills cut a completion short"
    );
    // Otherwise the trials never hit what they are for (17 of 20 did in one run).
    assert!(cut_short > 0, "no kill landed inside a completion");
}
