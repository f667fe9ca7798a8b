//! The store inventory: every store the server has seen, connected or not, with its labels,
//! across restarts.

use std::collections::HashMap;

use shared::api::ClientInfo;

use crate::harness::*;

async fn clients(server: &TestServer, args: &[&str]) -> HashMap<String, ClientInfo> {
    let mut all = vec!["clients", "--json"];
    all.extend_from_slice(args);
    let out = run_cli(server, &all).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let list: Vec<ClientInfo> = serde_json::from_str(&stdout(&out)).unwrap();
    list.into_iter()
        .map(|c| (c.client_id.as_str().to_owned(), c))
        .collect()
}

fn ids(map: &HashMap<String, ClientInfo>) -> Vec<&str> {
    let mut ids: Vec<&str> = map.keys().map(String::as_str).collect();
    ids.sort_unstable();
    ids
}

/// Three stores connect with labels; one leaves. `clients` lists the two connected ones,
/// `clients --all` all three (the one that left as offline, with when it was first and last
/// seen), and `--label` keeps exactly the stores with every label given. After a restart, with
/// no agent connected, the inventory is still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inventory_lists_offline_stores_and_filters_by_label() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let mut server = TestServer::builder(Mode::Embedded)
        .at("127.0.0.1:0".parse().unwrap(), &data_dir)
        .start()
        .await;
    let file = dir.path().join("f.csv");
    write_file(&file, 1000).await;
    let (a, b, c) = ("inv-north-a", "inv-north-b", "inv-south-c");
    let agent = |id: &str, labels: [&str; 2]| {
        TestAgent::start_with(
            &server,
            id,
            &file,
            &["--label", labels[0], "--label", labels[1]],
        )
    };
    let agent_a = agent(a, ["region=north", "brand=burger-co"]);
    let agent_b = agent(b, ["region=north", "brand=pizza-co"]);
    let agent_c = agent(c, ["region=south", "brand=burger-co"]);
    for id in [a, b, c] {
        server.wait_connected(id).await;
    }
    drop(agent_c);
    server.wait_disconnected(c).await;

    assert_eq!(ids(&clients(&server, &[]).await), [a, b]);
    let all = clients(&server, &["--all"]).await;
    assert_eq!(ids(&all), [a, b, c]);
    assert!(all[a].connected && all[a].connected_since.is_some());
    let gone = &all[c];
    assert!(!gone.connected);
    assert_eq!(gone.connected_since, None);
    assert_eq!(gone.labels.to_string(), "brand=burger-co,region=south");
    assert!(gone.first_seen.as_deref().unwrap() <= gone.last_seen.as_str());
    assert_eq!(gone.protocol_version, shared::protocol::PROTOCOL_VERSION);

    let north = clients(&server, &["--all", "--label", "region=north"]).await;
    assert_eq!(ids(&north), [a, b]);
    let burgers = clients(&server, &["--all", "--label", "brand=burger-co"]).await;
    assert_eq!(ids(&burgers), [a, c]);
    let both = clients(
        &server,
        &[
            "--all",
            "--label",
            "brand=burger-co",
            "--label",
            "region=south",
        ],
    )
    .await;
    assert_eq!(ids(&both), [c]);
    let connected_burgers = clients(&server, &["--label", "brand=burger-co"]).await;
    assert_eq!(ids(&connected_burgers), [a]);
    let text = run_cli(&server, &["clients", "--all"]).await;
    assert!(stdout(&text).contains("offline"), "{}", stdout(&text));

    // A malformed label is a clear 400, from the API and the cli.
    let (status, body) = server
        .get_json("/clients?all=true&label=Region%3Dnorth")
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("BAD_REQUEST"))
    );
    let out = run_cli(&server, &["clients", "--label", "no-equals-sign"]).await;
    assert!(!out.status.success());

    // A restart: nobody connected, everybody remembered.
    drop((agent_a, agent_b));
    server.wait_disconnected(a).await;
    server.wait_disconnected(b).await;
    let addr = server.api_addr;
    server.stop().await;
    let server = TestServer::builder(Mode::Embedded)
        .at(addr, &data_dir)
        .start()
        .await;
    assert!(clients(&server, &[]).await.is_empty());
    let after = clients(&server, &["--all"]).await;
    assert_eq!(ids(&after), [a, b, c]);
    assert!(after.values().all(|c| !c.connected));
    assert_eq!(after[c].first_seen, gone.first_seen, "first seen is kept");
}
