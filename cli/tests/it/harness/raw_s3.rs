//! Requests straight to storage through presigned URLs, as an agent (or a hostile client) makes
//! them, with no SDK in between.

/// The object key and S3 upload id a path-style presigned part or completion URL is for.
pub fn multipart_of(url: &str) -> (String, String) {
    let parsed = reqwest::Url::parse(url).unwrap();
    let key = parsed
        .path()
        .strip_prefix(&format!("/{}/", super::BUCKET))
        .unwrap_or_else(|| panic!("not a path-style URL for the test bucket: {url}"))
        .to_owned();
    let upload_id = parsed
        .query_pairs()
        .find(|(k, _)| k == "uploadId")
        .unwrap_or_else(|| panic!("no uploadId in {url}"))
        .1
        .into_owned();
    (key, upload_id)
}

/// PUTs one part, with `Content-MD5` when given.
pub async fn put_part(url: &str, content_md5: Option<&str>, body: Vec<u8>) -> reqwest::Response {
    try_put_part(url, content_md5, body).await.unwrap()
}

/// [`put_part`], for a request storage may refuse by closing the connection.
pub async fn try_put_part(
    url: &str,
    content_md5: Option<&str>,
    body: Vec<u8>,
) -> reqwest::Result<reqwest::Response> {
    let headers: Vec<(&str, &str)> = content_md5
        .map(|m| ("content-md5", m))
        .into_iter()
        .collect();
    try_put_part_with(url, &headers, body).await
}

/// PUTs one part with these headers (a protocol 3 part: `x-amz-checksum-crc64nvme`).
pub async fn try_put_part_with(
    url: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> reqwest::Result<reqwest::Response> {
    let mut req = reqwest::Client::new().put(url).body(body);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    req.send().await
}

/// PUTs the `index`th part of a plan (`parts[index]` of a `start_upload`) with its signed
/// `Content-MD5`, and returns the ETag storage gave it.
pub async fn put_planned_part(plan: &serde_json::Value, index: usize, body: Vec<u8>) -> String {
    let part = &plan["parts"][index];
    let resp = put_part(
        part["url"].as_str().unwrap(),
        part["content_md5"].as_str(),
        body,
    )
    .await;
    assert!(
        resp.status().is_success(),
        "part {index}: {}",
        resp.status()
    );
    resp.headers()["etag"].to_str().unwrap().to_owned()
}

/// POSTs the completion of a plan with these ETags, parts numbered from 1.
pub async fn complete(plan: &serde_json::Value, etags: &[String]) -> reqwest::Response {
    let mut body = String::from("<CompleteMultipartUpload>");
    for (i, etag) in etags.iter().enumerate() {
        body.push_str(&format!(
            "<Part><PartNumber>{}</PartNumber><ETag>{etag}</ETag></Part>",
            i + 1
        ));
    }
    body.push_str("</CompleteMultipartUpload>");
    reqwest::Client::new()
        .post(plan["complete_url"].as_str().unwrap())
        .body(body)
        .send()
        .await
        .unwrap()
}
