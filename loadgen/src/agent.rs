//! One simulated agent: a real WebSocket with a real agent JWT, from one of several 127.x
//! source addresses, to the replica its number picks; it answers `describe_file` with
//! FILE_NOT_FOUND, or, in a collection, with a real one-part upload.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::{SinkExt, StreamExt};
use rand::Rng;
use shared::auth::Role;
use tokio::sync::{Semaphore, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::{Args, Shared};

/// The file every simulated store uploads, and its digests (protocol 2: per-part MD5, SHA-256).
pub struct StoreFile {
    pub body: bytes::Bytes,
    pub md5_base64: String,
    pub sha256_hex: String,
}

/// What a simulated agent tells the coordinator.
pub enum Event {
    Command { agent: usize, at: Instant },
}

/// The `region` labels of `--list-stores` fleets.
pub const REGIONS: [&str; 4] = ["north", "south", "east", "west"];

/// The id of the fleet's agent number `i` (its number across every load-generator process).
pub fn client_id(i: usize) -> String {
    format!("loadgen-{i:06}")
}

/// The replica agent number `i` connects to; the one after it is where its triggers go.
pub fn holder(args: &Args, i: usize) -> usize {
    i % args.server.len()
}

fn source_ip(args: &Args, base: u8, i: usize) -> Ipv4Addr {
    let n = (i / args.agents_per_address.max(1)) as u32 + 2;
    Ipv4Addr::from(u32::from(Ipv4Addr::new(127, base, 0, 0)) + n)
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

async fn connect(shared: &Shared, i: usize) -> anyhow::Result<Ws> {
    let server = shared.args.server[holder(&shared.args, i)];
    let stream = if shared.args.agents_per_address == 0 {
        // The kernel picks the port at connect, unique per destination: cheap, and enough when
        // the agents are spread over several servers.
        tokio::net::TcpStream::connect(server).await?
    } else {
        // Binding first searches for a port free on that address, which costs more the more
        // ports are taken (a fifth of the machine in a storm while dropped sockets sat in
        // TIME_WAIT; storm drops are resets now, below).
        let socket = tokio::net::TcpSocket::new_v4()?;
        let ip = source_ip(
            &shared.args,
            shared.address_base,
            i - shared.args.first_agent,
        );
        socket.bind(SocketAddr::new(ip.into(), 0))?;
        socket.connect(server).await?
    };
    let token = shared
        .keys
        .issue(&client_id(i), Role::Agent, Duration::from_secs(24 * 3600))?;
    let mut req = format!("ws://{server}/ws/connect").into_client_request()?;
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    // Small buffers, as the server's: tungstenite's default 128 KiB read buffer per agent made
    // a load generator of 16,000 agents 2 GiB, and its page faults a large part of its CPU.
    let config = WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0);
    let (mut ws, _) =
        tokio_tungstenite::client_async_with_config(req, stream, Some(config)).await?;
    // Storing agents speak protocol 2 (the previous one, which the server still serves): its
    // one-part upload is a plain PUT with Content-MD5.
    let protocol = if shared.file.is_some() {
        shared::protocol::OLDEST_PROTOCOL_VERSION
    } else {
        shared::protocol::PROTOCOL_VERSION
    };
    let mut hello = serde_json::json!({
        "type": "hello",
        "protocol_version": protocol,
        "agent_version": "loadgen",
    });
    if shared.args.list_stores > 0 {
        hello["labels"] = serde_json::json!({ "region": REGIONS[i % REGIONS.len()] });
    }
    ws.send(Message::Text(hello.to_string().into())).await?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) if t.contains("\"welcome\"") => return Ok(ws),
            // A renewed token may come first (the server replaces tokens signed with the old
            // shared secret at once); the real agent takes messages in any order too.
            Some(Ok(Message::Text(t))) if t.contains("\"token_renewed\"") => continue,
            Some(Ok(Message::Text(t))) => bail!("expected welcome, got {t}"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
            None => bail!("closed before welcome"),
        }
    }
}

/// One simulated agent: connects (retrying), then serves commands until a storm drops it.
pub async fn agent(shared: Arc<Shared>, i: usize, gate: Arc<Semaphore>) {
    let mut storm = shared.storm.clone();
    let mut first = true;
    loop {
        let ws = {
            let _permit = if first {
                Some(gate.acquire().await)
            } else {
                None
            };
            let mut attempt = 0u32;
            loop {
                match connect(&shared, i).await {
                    Ok(ws) => break ws,
                    Err(e) => {
                        shared.failed(&e);
                        attempt += 1;
                        let cap = 100u64 << attempt.min(6);
                        let d = rand::thread_rng().gen_range(cap / 2..=cap);
                        tokio::time::sleep(Duration::from_millis(d)).await;
                    }
                }
            }
        };
        first = false;
        shared.connected.fetch_add(1, Ordering::Relaxed);
        let dropped = serve(&shared, i, ws, &mut storm).await;
        shared.connected.fetch_sub(1, Ordering::Relaxed);
        if dropped {
            let spread = shared.args.storm_spread_ms.max(1);
            let d = rand::thread_rng().gen_range(0..spread);
            tokio::time::sleep(Duration::from_millis(d)).await;
        }
    }
}

/// Returns true when a storm dropped the connection.
async fn serve(shared: &Shared, i: usize, mut ws: Ws, storm: &mut watch::Receiver<u64>) -> bool {
    loop {
        tokio::select! {
            _ = storm.changed() => {
                // A reset, as when a store's line is cut: a graceful close would leave the
                // socket in TIME_WAIT, and binding the next one on that address would search
                // past every such port (bind's port search took most of this process's CPU in
                // a storm).
                let _ = ws.get_ref().set_zero_linger();
                return true;
            }
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(t))) if t.contains("\"describe_file\"") => {
                    let at = Instant::now();
                    let _ = shared.events.send(Event::Command { agent: i, at });
                    let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap_or_default();
                    if let Some(file) = &shared.file {
                        if let Err(e) = upload(shared, &mut ws, &v, file).await {
                            eprintln!("agent {i}: upload failed: {e:#}");
                            return false;
                        }
                        continue;
                    }
                    let reply = serde_json::json!({
                        "type": "upload_failed",
                        "upload_id": v["upload_id"],
                        "code": "FILE_NOT_FOUND",
                        "message": "simulated agent",
                    });
                    if ws.send(Message::Text(reply.to_string().into())).await.is_err() {
                        return false;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return false,
            },
        }
    }
}

/// Serves one `describe_file` with a real one-part upload: `file_info`, the plan, the part PUT
/// and the completion through their presigned URLs, then `upload_completed`.
async fn upload(
    shared: &Shared,
    ws: &mut Ws,
    describe: &serde_json::Value,
    file: &StoreFile,
) -> anyhow::Result<()> {
    let upload_id = describe["upload_id"].clone();
    let info = serde_json::json!({
        "type": "file_info",
        "upload_id": upload_id,
        "file_name": "z-report.csv",
        "size": file.body.len(),
        "modified_ms": 1,
        "sha256": file.sha256_hex,
        "part_size": describe["min_part_size"],
        "part_md5": [file.md5_base64],
    });
    ws.send(Message::Text(info.to_string().into())).await?;
    let plan: serde_json::Value = loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) if t.contains("\"start_upload\"") => {
                break serde_json::from_str(t.as_str())?;
            }
            Some(Ok(Message::Text(t)))
                if t.contains("\"upload_failed\"") || t.contains("\"error\"") =>
            {
                bail!("the server refused the file: {t}")
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
            None => bail!("closed before the plan"),
        }
    };
    let part = &plan["parts"][0];
    let url = part["url"].as_str().context("no part URL")?;
    let resp = shared
        .storage
        .put(url)
        .header("content-md5", part["content_md5"].as_str().unwrap_or(""))
        .body(file.body.clone())
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!("part PUT answered {}", resp.status());
    }
    let etag = resp
        .headers()
        .get("etag")
        .context("no ETag")?
        .to_str()?
        .to_owned();
    let body = format!(
        "<CompleteMultipartUpload><Part><PartNumber>1</PartNumber><ETag>{etag}</ETag></Part></CompleteMultipartUpload>"
    );
    let url = plan["complete_url"].as_str().context("no completion URL")?;
    let resp = shared.storage.post(url).body(body).send().await?;
    if !resp.status().is_success() {
        bail!("completion answered {}", resp.status());
    }
    let done = serde_json::json!({
        "type": "upload_completed",
        "upload_id": upload_id,
        "parts": [{"part_number": 1, "etag": etag}],
    });
    ws.send(Message::Text(done.to_string().into())).await?;
    Ok(())
}
