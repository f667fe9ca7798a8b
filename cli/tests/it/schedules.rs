//! Schedules: collections created by firing, a missed firing run once after a restart, and no
//! firing once deleted.

use std::time::Duration;

use shared::api::collections::CollectionSummary;

use crate::harness::*;

fn parse_time(s: &str) -> time::OffsetDateTime {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).unwrap()
}

/// The collections a schedule created, by firing.
async fn fired(server: &TestServer, schedule: &str) -> Vec<CollectionSummary> {
    let (status, body) = server.get_json("/collections?limit=1000").await;
    assert_eq!(status, 200, "{body}");
    let list: shared::api::collections::CollectionList = serde_json::from_value(body).unwrap();
    let mut mine: Vec<CollectionSummary> = list
        .collections
        .into_iter()
        .filter(|c| c.schedule_id.map(|s| s.to_string()).as_deref() == Some(schedule))
        .collect();
    mine.sort_by(|a, b| a.fired_at.cmp(&b.fired_at));
    mine
}

/// A schedule that fires every two seconds creates collections, each of which reaches the
/// store. The server stops over several firings: when it is back, the latest missed firing runs
/// once (not once per missed firing), and the schedule goes on. Deleted, it fires no more.
async fn a_schedule_fires_and_a_missed_firing_runs_once_after_a_restart(mode: Mode) {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let mut server = TestServer::builder(mode)
        .at("127.0.0.1:0".parse().unwrap(), &data_dir)
        .start()
        .await;
    let file = dir.path().join("f.csv");
    write_file(&file, 2222).await;
    let store = "scheduled-store";
    let agent = TestAgent::start(&server, store, &file);
    server.wait_connected(store).await;
    let out = run_cli(
        &server,
        &[
            "schedule",
            "create",
            "--cron",
            "*/2 * * * * *",
            "--time-zone",
            "Europe/Berlin",
            "--client-id",
            store,
            "--expires-in-secs",
            "600",
            "--json",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let schedule: shared::api::collections::ScheduleInfo =
        serde_json::from_str(&stdout(&out)).unwrap();
    let sid = schedule.schedule_id.to_string();
    assert!(schedule.next_fire_at.is_some());

    wait_until(Duration::from_secs(30), "two firings completed", || async {
        fired(&server, &sid)
            .await
            .iter()
            .filter(|c| c.counts.completed == 1)
            .count()
            >= 2
    })
    .await;
    drop(agent);
    server.wait_disconnected(store).await;
    let addr = server.api_addr;
    server.stop().await;
    let stopped = time::OffsetDateTime::now_utc();
    // Down over at least three firings. The server comes back 100 ms after a firing was due
    // (firings fall on even seconds), so that the one firing it missed last is the one just
    // before it started, and no regular firing falls due while it starts.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let now = time::OffsetDateTime::now_utc();
    let past_even = i64::from(now.second() % 2) * 1_000_000_000 + i64::from(now.nanosecond());
    let due = now - time::Duration::nanoseconds(past_even) + time::Duration::seconds(2);
    tokio::time::sleep((due - now + time::Duration::milliseconds(100)).unsigned_abs()).await;
    let starting = time::OffsetDateTime::now_utc();
    let server = TestServer::builder(mode).at(addr, &data_dir).start().await;
    let restarted = time::OffsetDateTime::now_utc();
    assert!(
        restarted - due < time::Duration::milliseconds(1900),
        "the server took until {restarted} to start, past the next firing after {due}"
    );
    let _agent = TestAgent::start(&server, store, &file);
    // The next regular firing after the restart, then look at what the downtime left.
    wait_until(
        Duration::from_secs(30),
        "a firing after the restart",
        || async {
            fired(&server, &sid)
                .await
                .iter()
                .any(|c| parse_time(c.fired_at.as_deref().unwrap()) > restarted)
        },
    )
    .await;
    let all = fired(&server, &sid).await;
    let in_downtime: Vec<_> = all
        .iter()
        .filter(|c| {
            let at = parse_time(c.fired_at.as_deref().unwrap());
            at > stopped && at < restarted
        })
        .collect();
    assert_eq!(
        in_downtime.len(),
        1,
        "one missed firing runs: {in_downtime:?}"
    );
    // The latest missed firing: the schedule fires every 2 s, so an earlier one would be more
    // than 2 s before the restart.
    let missed = parse_time(in_downtime[0].fired_at.as_deref().unwrap());
    assert!(
        restarted - missed <= time::Duration::seconds(2),
        "{missed} vs {restarted}"
    );
    assert!(
        parse_time(&in_downtime[0].created_at) > starting,
        "run after the restart"
    );
    // Every collection of the schedule reaches the store.
    wait_until(
        Duration::from_secs(60),
        "every firing completes",
        || async { fired(&server, &sid).await.iter().all(|c| c.settled) },
    )
    .await;
    assert!(
        fired(&server, &sid)
            .await
            .iter()
            .all(|c| c.counts.completed == 1)
    );

    let out = run_cli(&server, &["schedule", "delete", &sid]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let count = fired(&server, &sid).await.len();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        fired(&server, &sid).await.len(),
        count,
        "no firing once deleted"
    );
    let (status, body) = server.get_json(&format!("/schedules/{sid}")).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("SCHEDULE_NOT_FOUND"))
    );
    let (status, body) = server.get_json("/schedules/nope").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("INVALID_SCHEDULE_ID"))
    );
    for bad in [
        serde_json::json!({"cron": "61 * * * *", "template": {"target": {"kind": "all"}}}),
        serde_json::json!({"cron": "@daily", "time_zone": "Mars/Base", "template": {"target": {"kind": "all"}}}),
        serde_json::json!({"cron": "@daily", "template": {"target": {"kind": "glob", "pattern": "["}}}),
        serde_json::json!({"cron": "@daily", "template": {"target": {"kind": "all"}, "expires_in_secs": 0}}),
    ] {
        let resp = server
            .http_client()
            .post(format!("{}/schedules", server.http_url()))
            .bearer_auth(operator_token())
            .json(&bad)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 400, "{bad}");
    }
}

storage_modes!(schedule_fires_and_runs_a_missed_firing_once, |mode| {
    a_schedule_fires_and_a_missed_firing_runs_once_after_a_restart(mode)
});
