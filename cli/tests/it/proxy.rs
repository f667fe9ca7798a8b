//! A loopback proxy in front of S3 that counts part uploads and injects faults: 503s, cut
//! connections and corrupted bytes. The server presigns for the proxy's address
//! (`--s3-public-endpoint`), so agents send every part through it; the Host header is passed on
//! unchanged, which keeps the signatures valid.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::harness::{Mode, TestServer, localstack_endpoint};

/// Which part PUTs get a fault: the n-th PUT (counting from 1) gets the first matching rule.
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    /// Every n-th PUT is answered 503 without reaching storage.
    pub fail_every: Option<u32>,
    /// Every n-th PUT has its connection cut after the body is read.
    pub cut_every: Option<u32>,
    /// Every n-th PUT reaches storage with one byte flipped.
    pub corrupt_every: Option<u32>,
    /// The first n HeadObject requests are answered 503 without reaching storage.
    pub fail_heads: Option<u32>,
    /// The first completion (POST with an `uploadId`) reaches storage, but its answer is lost:
    /// the connection is cut instead.
    pub lose_completion_reply: bool,
    /// Storage's ETags are not MD5s, as on an SSE-KMS or SSE-C bucket: every ETag it gives
    /// (UploadPart and HeadObject headers, ListParts and CompleteMultipartUpload bodies) is
    /// rewritten, and completions have theirs restored on the way in.
    pub kms_etags: bool,
    /// The first n object GETs have their answer cut halfway through the body: the headers
    /// promise the whole object, the connection closes after half of it.
    pub cut_object_gets: Option<u32>,
    /// The first AbortMultipartUpload is held this long before it is passed on.
    pub slow_first_abort: Option<std::time::Duration>,
    /// Every part PUT is held this long before it is passed on: a slow uplink, seen from storage.
    pub slow_parts: Option<std::time::Duration>,
    /// The first completion reaches storage, and storage's answer is held this long before it
    /// is passed on: the object is whole while the agent still waits.
    pub hold_completion_reply: Option<std::time::Duration>,
}

#[derive(Debug, Default)]
pub struct ProxyStats {
    pub part_puts: AtomicU32,
    pub injected_503: AtomicU32,
    pub injected_cuts: AtomicU32,
    pub injected_corruptions: AtomicU32,
    pub injected_head_503: AtomicU32,
    /// Completion answers cut after storage completed.
    pub lost_completion_replies: AtomicU32,
    /// Completions (POST with an `uploadId`) that arrived, counted before they are forwarded.
    pub completions_seen: AtomicU32,
    /// Completions that storage answered and whose answer is held (`hold_completion_reply`).
    pub held_completion_replies: AtomicU32,
    /// Storage refused a corrupted part (BadDigest).
    pub rejected_by_storage: AtomicU32,
    /// The encryption each CreateMultipartUpload asked for: its `x-amz-server-side-encryption`
    /// and `x-amz-server-side-encryption-aws-kms-key-id` headers.
    pub encryption_asked: Mutex<Vec<(Option<String>, Option<String>)>>,
    /// ETags rewritten in answers (`kms_etags`).
    pub etags_rewritten: AtomicU32,
    /// Object GETs (a key, no `uploadId`), and those of them that asked for a `Range`.
    pub object_gets: AtomicU32,
    pub ranged_gets: AtomicU32,
    pub injected_get_cuts: AtomicU32,
    /// AbortMultipartUpload requests that arrived.
    pub aborts_seen: AtomicU32,
    /// Body bytes of part PUTs that reached the proxy, faults included.
    pub part_bytes: AtomicU64,
    /// Bytes to look for in every request body to storage (a plaintext marker), and how many
    /// bodies held them.
    pub watch_for: Mutex<Option<Vec<u8>>>,
    pub watch_hits: AtomicU32,
    /// Successful part PUTs by (uploadId, partNumber).
    pub stored: Mutex<HashMap<(String, u32), u32>>,
    /// When the first part PUT arrived and the last part body was complete.
    pub window: Mutex<Option<(Instant, Instant)>>,
}

impl ProxyStats {
    /// Parts that storage accepted more than once: a completed part uploaded twice.
    pub fn duplicates(&self) -> Vec<((String, u32), u32)> {
        self.stored
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(k, n)| (k.clone(), *n))
            .collect()
    }

    pub fn stored_parts(&self) -> u32 {
        self.stored.lock().unwrap().values().sum()
    }

    pub fn faults(&self) -> u32 {
        self.injected_503.load(Ordering::Relaxed)
            + self.injected_cuts.load(Ordering::Relaxed)
            + self.injected_corruptions.load(Ordering::Relaxed)
    }
}

pub struct FaultProxy {
    pub addr: SocketAddr,
    pub stats: Arc<ProxyStats>,
    upstream: Arc<Mutex<String>>,
}

impl FaultProxy {
    pub async fn start(upstream: &str, faults: Faults) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(ProxyStats::default());
        let upstream = Arc::new(Mutex::new(upstream.trim_end_matches('/').to_owned()));
        let up = upstream.clone();
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let st = stats.clone();
        tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                let (st, upstream, http) = (st.clone(), up.clone(), http.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let upstream = upstream.lock().unwrap().clone();
                        // Detached, so a client that dies mid-request does not stop the
                        // proxy from seeing (and counting) storage's answer.
                        let job =
                            tokio::spawn(forward(req, upstream, http.clone(), st.clone(), faults));
                        async move { job.await.unwrap_or(Err(Cut)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(socket), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            stats,
            upstream,
        }
    }

    /// Points the proxy at storage (an embedded store's address is known only once its
    /// server runs).
    pub fn set_upstream(&self, upstream: &str) {
        *self.upstream.lock().unwrap() = upstream.trim_end_matches('/').to_owned();
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// A path-style request for an object: a key after the bucket.
fn names_an_object(uri: &http::Uri) -> bool {
    uri.path()
        .trim_start_matches('/')
        .split_once('/')
        .is_some_and(|(_, key)| !key.is_empty())
}

/// Counts one more hit in `seen` while fewer than `limit` were counted; whether it counted.
fn one_of_the_first(seen: &AtomicU32, limit: Option<u32>) -> bool {
    limit.is_some_and(|n| {
        seen.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
            (s < n).then_some(s + 1)
        })
        .is_ok()
    })
}

type ProxyBody = BoxBody<Bytes, std::io::Error>;

fn full(bytes: Bytes) -> ProxyBody {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

#[derive(Debug, thiserror::Error)]
#[error("connection cut by the fault proxy")]
struct Cut;

fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| v.to_owned())
    })
}

async fn forward(
    req: Request<Incoming>,
    upstream: String,
    http: reqwest::Client,
    stats: Arc<ProxyStats>,
    faults: Faults,
) -> Result<Response<ProxyBody>, Cut> {
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    let query = parts.uri.query().unwrap_or("").to_owned();
    // HeadObject has a key after the bucket (path style); HeadBucket, at start-up, does not.
    let head_object = parts.method == http::Method::HEAD && names_an_object(&parts.uri);
    if head_object && one_of_the_first(&stats.injected_head_503, faults.fail_heads) {
        return Ok(Response::builder()
            .status(503)
            .body(full(Bytes::new()))
            .unwrap());
    }
    let completion =
        parts.method == http::Method::POST && query_param(&query, "uploadId").is_some();
    let object_get = parts.method == http::Method::GET
        && query_param(&query, "uploadId").is_none()
        && names_an_object(&parts.uri);
    if parts.method == http::Method::DELETE && query_param(&query, "uploadId").is_some() {
        let nth = stats.aborts_seen.fetch_add(1, Ordering::Relaxed) + 1;
        if let (1, Some(hold)) = (nth, faults.slow_first_abort) {
            tokio::time::sleep(hold).await;
        }
    }
    let mut cut_get = false;
    if object_get {
        stats.object_gets.fetch_add(1, Ordering::Relaxed);
        if parts.headers.contains_key(http::header::RANGE) {
            stats.ranged_gets.fetch_add(1, Ordering::Relaxed);
        }
        cut_get = one_of_the_first(&stats.injected_get_cuts, faults.cut_object_gets);
    }
    if parts.method == http::Method::POST
        && query
            .split('&')
            .any(|kv| kv == "uploads" || kv == "uploads=")
    {
        let header = |name: &str| {
            parts
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        stats.encryption_asked.lock().unwrap().push((
            header("x-amz-server-side-encryption"),
            header("x-amz-server-side-encryption-aws-kms-key-id"),
        ));
    }
    if completion {
        stats.completions_seen.fetch_add(1, Ordering::Relaxed);
    }
    let part = (parts.method == http::Method::PUT)
        .then(|| query_param(&query, "partNumber").zip(query_param(&query, "uploadId")))
        .flatten();
    let mut corrupt = false;
    let mut upload_key = None;
    if let Some((n, upload_id)) = &part {
        let nth = stats.part_puts.fetch_add(1, Ordering::Relaxed) + 1;
        {
            let mut w = stats.window.lock().unwrap();
            let first = w.map_or(started, |(f, _)| f.min(started));
            *w = Some((first, w.map_or(started, |(_, l)| l)));
        }
        if let Some(hold) = faults.slow_parts {
            tokio::time::sleep(hold).await;
        }
        let hit = |every: Option<u32>| every.is_some_and(|e| nth.is_multiple_of(e));
        if hit(faults.fail_every) {
            stats.injected_503.fetch_add(1, Ordering::Relaxed);
            let got = body.collect().await.map_err(|_| Cut)?.to_bytes();
            stats
                .part_bytes
                .fetch_add(got.len() as u64, Ordering::Relaxed);
            return Ok(Response::builder()
                .status(503)
                .body(full(Bytes::from_static(
                    b"<Error><Code>SlowDown</Code></Error>",
                )))
                .unwrap());
        }
        if hit(faults.cut_every) {
            stats.injected_cuts.fetch_add(1, Ordering::Relaxed);
            // Take some of the body, then drop the connection mid-request.
            let mut stream = body.into_data_stream();
            if let Some(Ok(chunk)) = futures::StreamExt::next(&mut stream).await {
                stats
                    .part_bytes
                    .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
            return Err(Cut);
        }
        corrupt = hit(faults.corrupt_every);
        if corrupt {
            stats.injected_corruptions.fetch_add(1, Ordering::Relaxed);
        }
        upload_key = Some((upload_id.clone(), n.parse::<u32>().unwrap_or(0)));
    }
    // Bodies are streamed through, never buffered: storage sees the request when the agent
    // sends it (presigned expiry), and an agent that dies mid-body leaves an incomplete one.
    let counting = part.is_some();
    let st = stats.clone();
    let mut flipped = !corrupt;
    let watch = stats.watch_for.lock().unwrap().clone();
    // The end of the previous chunk, so a marker split across two chunks is still seen.
    let mut tail: Vec<u8> = Vec::new();
    let stream = futures::StreamExt::map(body.into_data_stream(), move |chunk| {
        let chunk = chunk?;
        if let Some(marker) = &watch {
            tail.extend_from_slice(&chunk);
            if tail.windows(marker.len()).any(|w| w == &marker[..]) {
                st.watch_hits.fetch_add(1, Ordering::Relaxed);
            }
            let keep = tail.len().saturating_sub(marker.len());
            tail.drain(..keep);
        }
        if counting {
            st.part_bytes
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            let mut w = st.window.lock().unwrap();
            if let Some((_, last)) = w.as_mut() {
                *last = Instant::now();
            }
        }
        if !flipped && !chunk.is_empty() {
            flipped = true;
            let mut v = chunk.to_vec();
            v[chunk.len() / 2] ^= 0x01;
            return Ok::<_, hyper::Error>(Bytes::from(v));
        }
        Ok(chunk)
    });
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let mut out = http.request(parts.method.clone(), format!("{upstream}{path}"));
    for (name, value) in &parts.headers {
        out = out.header(name, value);
    }
    // A request without a length (the server's own bodiless calls) must not turn into a
    // chunked one, which storage refuses for lack of a Content-Length.
    let sized = parts.headers.contains_key(http::header::CONTENT_LENGTH)
        || parts.headers.contains_key(http::header::TRANSFER_ENCODING);
    let body = if sized && !(completion && faults.kms_etags) {
        reqwest::Body::wrap_stream(stream)
    } else {
        let mut all = Vec::new();
        let mut stream = std::pin::pin!(stream);
        while let Some(chunk) = futures::StreamExt::next(&mut stream).await {
            all.extend_from_slice(&chunk.map_err(|_| Cut)?);
        }
        if completion && faults.kms_etags {
            all = kms::xml_etags(&String::from_utf8_lossy(&all), kms::restore).into_bytes();
        }
        reqwest::Body::from(all)
    };
    let resp = out.body(body).send().await.map_err(|_| Cut)?;
    if completion
        && let Some(hold) = faults.hold_completion_reply
        && one_of_the_first(&stats.held_completion_replies, Some(1))
    {
        tokio::time::sleep(hold).await;
    }
    let status = resp.status();
    let mut headers = resp.headers().clone();
    let mut bytes = resp.bytes().await.map_err(|_| Cut)?;
    if faults.kms_etags {
        if let Some(etag) = headers
            .get(http::header::ETAG)
            .and_then(|v| v.to_str().ok())
        {
            let rewritten = kms::rewrite(etag);
            headers.insert(http::header::ETAG, rewritten.parse().unwrap());
            stats.etags_rewritten.fetch_add(1, Ordering::Relaxed);
        }
        let text = String::from_utf8_lossy(&bytes);
        if text.contains("<ETag>") {
            let n = text.matches("<ETag>").count() as u32;
            bytes = Bytes::from(kms::xml_etags(&text, kms::rewrite));
            stats.etags_rewritten.fetch_add(n, Ordering::Relaxed);
        }
    }
    if completion
        && faults.lose_completion_reply
        && stats
            .lost_completion_replies
            .compare_exchange(0, 1, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        return Err(Cut);
    }
    if let Some(k) = upload_key {
        if status.is_success() {
            *stats.stored.lock().unwrap().entry(k).or_default() += 1;
        } else if String::from_utf8_lossy(&bytes).contains("BadDigest") {
            stats.rejected_by_storage.fetch_add(1, Ordering::Relaxed);
        }
    }
    let mut builder = Response::builder().status(status.as_u16());
    for (name, value) in &headers {
        if name != http::header::TRANSFER_ENCODING && name != http::header::CONNECTION {
            builder = builder.header(name, value);
        }
    }
    if cut_get && bytes.len() > 1 {
        // The headers (Content-Length included) promise every byte; the body fails after
        // half of them, and hyper closes the connection.
        let half = bytes.slice(..bytes.len() / 2);
        let frames = futures::stream::iter([
            Ok(hyper::body::Frame::data(half)),
            Err(std::io::Error::other("cut by the fault proxy")),
        ]);
        return Ok(builder.body(BoxBody::new(StreamBody::new(frames))).unwrap());
    }
    Ok(builder.body(full(bytes)).unwrap())
}

/// ETags as an SSE-KMS bucket gives them: 32 hex digits (and a part count) that are no MD5 of the
/// bytes. Each hex digit of storage's ETag is rotated by one, so the proxy can give storage its
/// own ETags back in a completion.
mod kms {
    fn rotate(etag: &str, by: u32) -> String {
        // Quotes (plain or as XML entities) and the `-<parts>` suffix are kept.
        let (open, rest) = ["&quot;", "\""]
            .iter()
            .find_map(|q| etag.strip_prefix(q).map(|r| (*q, r)))
            .unwrap_or(("", etag));
        let (core, close) = ["&quot;", "\""]
            .iter()
            .find_map(|q| rest.strip_suffix(q).map(|r| (r, *q)))
            .unwrap_or((rest, ""));
        let (hash, count) = core
            .split_once('-')
            .map_or((core, None), |(h, c)| (h, Some(c)));
        let rotated: String = hash
            .chars()
            .map(|c| {
                c.to_digit(16)
                    .and_then(|d| char::from_digit((d + by) % 16, 16))
                    .unwrap_or(c)
            })
            .collect();
        match count {
            Some(count) => format!("{open}{rotated}-{count}{close}"),
            None => format!("{open}{rotated}{close}"),
        }
    }

    pub fn rewrite(etag: &str) -> String {
        rotate(etag, 1)
    }

    pub fn restore(etag: &str) -> String {
        rotate(etag, 15)
    }

    /// `xml` with `f` applied to every `<ETag>` value.
    pub fn xml_etags(xml: &str, f: fn(&str) -> String) -> String {
        let mut out = String::with_capacity(xml.len());
        let mut rest = xml;
        while let Some(start) = rest.find("<ETag>") {
            let (before, after) = rest.split_at(start + "<ETag>".len());
            out.push_str(before);
            let Some(end) = after.find("</ETag>") else {
                rest = after;
                break;
            };
            out.push_str(&f(&after[..end]));
            rest = &after[end..];
        }
        out.push_str(rest);
        out
    }

    #[test]
    fn etags_are_rewritten_and_restored() {
        let etag = "\"0cc175b9c0f1b6a831c399e269772661-3\"";
        let rewritten = rewrite(etag);
        assert_eq!(rewritten, "\"1dd286cad102c7b942d4aaf37a883772-3\"");
        assert_eq!(restore(&rewritten), etag);
        let xml = "<Part><ETag>&quot;0f&quot;</ETag></Part><ETag>\"a\"</ETag>";
        assert_eq!(
            xml_etags(xml, rewrite),
            "<Part><ETag>&quot;10&quot;</ETag></Part><ETag>\"b\"</ETag>"
        );
    }
}

/// A server whose storage is reached through a fault proxy with `faults`: its presigned URLs
/// name the proxy, which passes requests on to the server's storage (the embedded store, or
/// LocalStack). Parts are 5 MiB, S3's smallest, so small files have several.
pub async fn server_behind_proxy(mode: Mode, faults: Faults) -> (FaultProxy, TestServer) {
    let proxy = FaultProxy::start(&localstack_endpoint(), faults).await;
    let url = proxy.url();
    let server = TestServer::builder(mode)
        .args(&[
            "--s3-public-endpoint",
            url.as_str(),
            "--part-size",
            "5242880",
        ])
        .start()
        .await;
    proxy.set_upstream(&server.s3_endpoint);
    (proxy, server)
}
