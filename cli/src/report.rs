//! How `cli` shows an upload.

use std::io::Write;

use shared::api::{PhaseTimes, UploadState, UploadStatus};

/// How an upload ended: its status on `out`, or its error on stderr.
pub fn print_outcome(out: &mut dyn Write, status: &UploadStatus, json: bool) -> anyhow::Result<()> {
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(status)?)?;
        return Ok(());
    }
    match status.state {
        UploadState::Completed => {
            writeln!(out, "upload {} completed and verified", status.upload_id)?;
            print_upload(out, status, false)
        }
        _ => {
            let (code, message) = status
                .error
                .as_ref()
                .map(|e| (e.code.to_string(), printable(&e.message)))
                .unwrap_or_else(|| ("UNKNOWN".into(), "no error reported".into()));
            let state = status.state.to_string();
            eprintln!("upload {} {state}: {code}: {message}", status.upload_id);
            Ok(())
        }
    }
}

/// One upload's status, as text or JSON.
pub fn print_upload(out: &mut dyn Write, s: &UploadStatus, json: bool) -> anyhow::Result<()> {
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(s)?)?;
        return Ok(());
    }
    let opt = |v: &Option<String>| v.as_deref().map_or_else(|| "-".into(), printable);
    writeln!(out, "  upload:   {}", s.upload_id)?;
    writeln!(out, "  client:   {}", s.client_id)?;
    writeln!(out, "  state:    {}", s.state)?;
    writeln!(out, "  bucket:   {}", s.bucket)?;
    writeln!(out, "  key:      {}", opt(&s.key))?;
    writeln!(
        out,
        "  size:     {}",
        s.size
            .map(|v| format!("{v} bytes"))
            .unwrap_or_else(|| "-".into())
    )?;
    if let (Some(encoding), Some(stored)) = (s.encoding, s.stored_size) {
        let ratio = s
            .compression_ratio
            .map_or_else(|| "-".into(), |r| format!("{r:.2}x"));
        writeln!(
            out,
            "  stored:   {stored} bytes on the wire ({encoding}, ratio {ratio})"
        )?;
    }
    writeln!(
        out,
        "  parts:    {}/{}",
        s.parts_done,
        s.parts_total
            .map(|v| v.to_string())
            .unwrap_or_else(|| "?".into())
    )?;
    if s.parts_copied > 0 {
        writeln!(
            out,
            "  copied:   {} parts, {} bytes, from the previous object; {} parts sent",
            s.parts_copied,
            s.bytes_copied,
            s.parts_done.saturating_sub(s.parts_copied)
        )?;
    }
    writeln!(out, "  etag:     {}", opt(&s.etag))?;
    writeln!(out, "  sha256:   {}", opt(&s.sha256))?;
    writeln!(out, "  crc64:    {}", opt(&s.checksum_crc64nvme))?;
    if let Some(rate) = s.rate_bytes_per_sec {
        writeln!(
            out,
            "  rate:     {:.1} MiB/s",
            rate as f64 / (1024.0 * 1024.0)
        )?;
    }
    if let Some(eta) = s.eta_secs {
        writeln!(out, "  eta:      {eta}s")?;
    }
    if s.stalled {
        let who = if s.agent_connected {
            "no progress"
        } else {
            "agent away"
        };
        writeln!(out, "  stalled:  {who} for {}s", s.idle_secs.unwrap_or(0))?;
    }
    if s.resumes > 0 {
        writeln!(out, "  resumed:  {} times", s.resumes)?;
    }
    let p = s.phases;
    if p != PhaseTimes::default() {
        writeln!(
            out,
            "  phases:   describe {} ms, presign {} ms, transfer {} ms (complete {} ms), verify {} ms",
            p.describe_ms, p.presign_ms, p.transfer_ms, p.complete_ms, p.verify_ms
        )?;
    }
    if let Some(e) = &s.error {
        writeln!(out, "  error:    {}: {}", e.code, printable(&e.message))?;
    }
    writeln!(
        out,
        "  by:       {} from {}",
        s.requested_by, s.requested_from
    )?;
    Ok(())
}

/// `text` with control characters escaped (`\n`, `\u{1b}`): messages and names can come
/// from a store's agent, and must not forge lines or drive the operator's terminal.
pub fn printable(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(printable("disk\nerror"), "disk\\nerror");
        assert_eq!(printable("a\nb\u{1b}[2J\tc"), "a\\nb\\u{1b}[2J\\tc");
        assert_eq!(printable("Café 東京"), "Café 東京");
    }
}
