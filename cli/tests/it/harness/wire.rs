//! The protocol and HTTP spoken by hand, as old agents and hostile callers speak them.

use super::*;

/// The `file_info` an honest protocol 2 agent sends for `data`.
pub fn file_info(
    upload_id: &str,
    file_name: &str,
    data: &[u8],
    min_part_size: u64,
) -> serde_json::Value {
    use base64::Engine;
    use md5::Md5;
    let (part_size, _) = shared::protocol::plan_parts(data.len() as u64, min_part_size).unwrap();
    let mut part_md5: Vec<String> = data
        .chunks(part_size as usize)
        .map(|c| base64::engine::general_purpose::STANDARD.encode(Md5::digest(c)))
        .collect();
    if part_md5.is_empty() {
        part_md5.push(base64::engine::general_purpose::STANDARD.encode(Md5::digest(b"")));
    }
    serde_json::json!({
        "type": "file_info",
        "upload_id": upload_id,
        "file_name": file_name,
        "size": data.len(),
        "modified_ms": 1,
        "sha256": hex::encode(Sha256::digest(data)),
        "part_size": part_size,
        "part_md5": part_md5,
    })
}

/// The protocol [`RawAgent`] speaks: the previous one, as agents in the field still do, so every
/// test that drives the wire by hand shows the server still serving them.
pub const RAW_PROTOCOL_VERSION: u32 = shared::protocol::OLDEST_PROTOCOL_VERSION;

/// The `file_info` an honest protocol 3 agent sends for `data`: a CRC64NVME per part.
pub fn file_info_v3(
    upload_id: &str,
    file_name: &str,
    data: &[u8],
    min_part_size: u64,
) -> serde_json::Value {
    let (part_size, _) = shared::protocol::plan_parts(data.len() as u64, min_part_size).unwrap();
    let mut crcs: Vec<String> = data
        .chunks(part_size as usize)
        .map(|c| shared::hash::Crc64Nvme::of(c).to_base64())
        .collect();
    if crcs.is_empty() {
        crcs.push(shared::hash::Crc64Nvme::of(b"").to_base64());
    }
    serde_json::json!({
        "type": "file_info",
        "upload_id": upload_id,
        "file_name": file_name,
        "size": data.len(),
        "modified_ms": 1,
        "part_size": part_size,
        "part_crc64nvme": crcs,
    })
}

/// A hand-driven agent connection of protocol 2, for protocol-level tests.
pub struct RawAgent {
    pub ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
}

/// Opens `/ws/connect` with an optional bearer token; `Err(status)` if the upgrade is refused.
pub async fn ws_connect(server: &TestServer, token: Option<&str>) -> Result<RawAgent, u16> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = server.ws_url().into_client_request().unwrap();
    if let Some(t) = token {
        req.headers_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => Ok(RawAgent { ws }),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("unexpected websocket error: {e}"),
    }
}

impl RawAgent {
    /// Connects and completes the hello/welcome handshake, speaking protocol 2.
    pub async fn connect(server: &TestServer, client_id: &str) -> Self {
        Self::connect_speaking(server, client_id, RAW_PROTOCOL_VERSION).await
    }

    /// Connects speaking protocol `version`; the welcome must name it.
    pub async fn connect_speaking(server: &TestServer, client_id: &str, version: u32) -> Self {
        Self::connect_with_token(server, &agent_token(client_id), version).await
    }

    /// Connects with `token`, speaking protocol `version`.
    pub async fn connect_with_token(server: &TestServer, token: &str, version: u32) -> Self {
        let mut a = ws_connect(server, Some(token)).await.unwrap();
        a.send_json(serde_json::json!({
            "type": "hello",
            "protocol_version": version,
            "agent_version": "raw"
        }))
        .await;
        let welcome = a.recv_json().await.expect("welcome");
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        assert_eq!(welcome["protocol_version"], version, "{welcome}");
        a
    }

    /// Connects as `client_id`, has the server trigger a download, describes a file of `size`
    /// bytes of 7s and returns the agent, the upload id and the `start_upload` plan. The
    /// multipart upload exists in storage from then on.
    pub async fn with_plan(
        server: &TestServer,
        client_id: &str,
        file_name: &str,
        size: u64,
    ) -> (Self, String, serde_json::Value) {
        let mut agent = Self::connect(server, client_id).await;
        let (status, trig) = server.trigger(client_id).await;
        assert_eq!(status, 202, "{trig}");
        let upload_id = trig["upload_id"].as_str().unwrap().to_owned();
        let describe = agent.recv_json().await.unwrap();
        assert_eq!(describe["type"], "describe_file", "{describe}");
        let min_part_size = describe["min_part_size"].as_u64().unwrap();
        agent
            .send_json(file_info(
                &upload_id,
                file_name,
                &vec![7u8; size as usize],
                min_part_size,
            ))
            .await;
        let plan = agent.recv_json().await.unwrap();
        assert_eq!(plan["type"], "start_upload", "{plan}");
        (agent, upload_id, plan)
    }

    pub async fn send_json(&mut self, v: serde_json::Value) {
        self.send_text(&v.to_string()).await;
    }

    pub async fn send_text(&mut self, s: &str) {
        use futures::SinkExt;
        self.ws
            .send(tokio_tungstenite::tungstenite::Message::Text(
                s.to_owned().into(),
            ))
            .await
            .unwrap();
    }

    /// Next JSON message, skipping pings; `None` once the server closed the connection.
    pub async fn recv_json(&mut self) -> Option<serde_json::Value> {
        use futures::StreamExt;
        use tokio_tungstenite::tungstenite::Message;
        loop {
            let next = tokio::time::timeout(Duration::from_secs(30), self.ws.next())
                .await
                .expect("no message within 30s");
            match next {
                Some(Ok(Message::Text(t))) => {
                    return Some(serde_json::from_str(t.as_str()).unwrap());
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Reads messages until the server closes; returns them.
    pub async fn drain_until_closed(&mut self) -> Vec<serde_json::Value> {
        let mut all = Vec::new();
        while let Some(m) = self.recv_json().await {
            all.push(m);
        }
        all
    }
}

/// Sends one HTTP/1.1 request with `path` exactly as given (HTTP clients normalise `..` and
/// `%2e%2e` away, hostile callers do not). Returns the status and the JSON body.
pub async fn raw_request(
    server: &TestServer,
    method: &str,
    path: &str,
    token: &str,
) -> (u16, serde_json::Value) {
    use tokio::io::AsyncReadExt;
    let mut stream = tokio::net::TcpStream::connect(server.api_addr)
        .await
        .unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        server.api_addr
    );
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut resp = Vec::new();
    stream.read_to_end(&mut resp).await.unwrap();
    let text = String::from_utf8_lossy(&resp);
    let status = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    (
        status,
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}
