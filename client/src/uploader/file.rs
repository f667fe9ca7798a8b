//! The shared file as the agent sees it: how it is opened, what its name becomes in storage, how
//! a change under the agent is noticed, and which agent-side error code each failure gets.

use std::path::Path;

use shared::{ErrorCode, FileName};

use super::UploadError;

/// Size and modification time of a file: if either moves between hashing and uploading, the
/// file changed under the agent and the upload stops with `FILE_CHANGED`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    pub size: u64,
    pub modified_ms: u64,
}

impl Snapshot {
    pub(super) fn of(meta: &std::fs::Metadata) -> Self {
        let modified_ms = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as u64);
        Self {
            size: meta.len(),
            modified_ms,
        }
    }
}

pub(super) fn changed_while_hashing(path: &Path) -> UploadError {
    UploadError::new(
        ErrorCode::FileChanged,
        format!("{} changed while it was being hashed", path.display()),
    )
}

/// `Err(FILE_CHANGED)` if the file no longer has the size and modification time it was hashed
/// with.
pub(super) async fn check_unchanged(path: &Path, snapshot: Snapshot) -> Result<(), UploadError> {
    let meta = tokio::fs::symlink_metadata(path)
        .await
        .map_err(|e| io_error(path, &e))?;
    let now = Snapshot::of(&meta);
    if now == snapshot {
        Ok(())
    } else {
        Err(UploadError::new(
            ErrorCode::FileChanged,
            format!(
                "{} changed after it was hashed (size {} -> {}, modified {} -> {})",
                path.display(),
                snapshot.size,
                now.size,
                snapshot.modified_ms,
                now.modified_ms
            ),
        ))
    }
}

/// Opens for reading without following a symbolic link in the last component.
pub(super) async fn open_no_follow(path: &Path) -> std::io::Result<tokio::fs::File> {
    tokio::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .await
}

pub(super) fn io_error(path: &Path, err: &std::io::Error) -> UploadError {
    let code = match err.kind() {
        std::io::ErrorKind::NotFound => ErrorCode::FileNotFound,
        std::io::ErrorKind::PermissionDenied => ErrorCode::PermissionDenied,
        _ => ErrorCode::FileReadError,
    };
    UploadError::new(code, format!("{}: {err}", path.display()))
}

/// The file's name as it will appear in the object key: characters outside the safe set become
/// `_`, so `Z report 1.csv` is stored as `Z_report_1.csv`.
pub fn stored_name(raw: &str) -> FileName {
    let mut name: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .take(shared::ids::MAX_FILE_NAME_LEN)
        .collect();
    if name == "." || name == ".." || name.is_empty() {
        name = "file".into();
    }
    FileName::parse(&name).expect("sanitized names are valid")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uploader::describe_file;
    use crate::uploader::hashing::DescribeSettings;

    const MIN_PART: u64 = 5 * 1024 * 1024;

    #[test]
    fn stored_names_are_safe() {
        assert_eq!(stored_name("Z report 1.csv").as_str(), "Z_report_1.csv");
        assert_eq!(stored_name("..").as_str(), "file");
        assert_eq!(stored_name("é.txt").as_str(), "_.txt");
        assert_eq!(stored_name(&"a".repeat(400)).as_str().len(), 255);
    }

    #[test]
    fn io_errors_map_to_agent_codes() {
        // Tests run as root here, where file modes cannot produce a real EACCES.
        let path = Path::new("/x");
        let kind = |k| io_error(path, &std::io::Error::from(k)).code;
        assert_eq!(kind(std::io::ErrorKind::NotFound), ErrorCode::FileNotFound);
        assert_eq!(
            kind(std::io::ErrorKind::PermissionDenied),
            ErrorCode::PermissionDenied
        );
        assert_eq!(
            kind(std::io::ErrorKind::InvalidData),
            ErrorCode::FileReadError
        );
    }

    #[tokio::test]
    async fn describe_reports_agent_side_codes() {
        let dir = std::env::temp_dir().join(format!("backhaul-describe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let min = MIN_PART;
        let missing = describe_file(
            &dir.join("missing.txt"),
            &DescribeSettings::for_test(100, min, 2),
        )
        .await
        .unwrap_err();
        assert_eq!(missing.code, ErrorCode::FileNotFound);
        let not_file = describe_file(&dir, &DescribeSettings::for_test(100, min, 2))
            .await
            .unwrap_err();
        assert_eq!(not_file.code, ErrorCode::FileReadError);
        let file = dir.join("ok.txt");
        std::fs::write(&file, b"hello").unwrap();
        let d = describe_file(&file, &DescribeSettings::for_test(100, min, 2))
            .await
            .unwrap();
        assert_eq!((d.file_name.as_str(), d.snapshot.size), ("ok.txt", 5));
        let too_big = describe_file(&file, &DescribeSettings::for_test(4, min, 2))
            .await
            .unwrap_err();
        assert_eq!(too_big.code, ErrorCode::FileTooLarge);
        let link = dir.join("link.txt");
        std::os::unix::fs::symlink("/etc/passwd", &link).unwrap();
        let linked = describe_file(&link, &DescribeSettings::for_test(u64::MAX, min, 2))
            .await
            .unwrap_err();
        assert_eq!(linked.code, ErrorCode::FileNotShared);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_file_that_changes_after_hashing_is_refused() {
        let dir = std::env::temp_dir().join(format!("backhaul-changed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("f.txt");
        std::fs::write(&file, b"before").unwrap();
        let d = describe_file(&file, &DescribeSettings::for_test(u64::MAX, MIN_PART, 2))
            .await
            .unwrap();
        assert!(check_unchanged(&file, d.snapshot).await.is_ok());
        std::fs::write(&file, b"after, longer").unwrap();
        let err = check_unchanged(&file, d.snapshot).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::FileChanged);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
