//! Crash-safe completions for the embedded store.
//!
//! s3s-fs completes a multipart upload by forgetting it first, then moving each part into the
//! object and deleting the part as it goes: a crash in between left neither the upload nor the
//! object. Before s3s-fs starts, a [`Journal`] hard-links every file of the upload (its record,
//! its metadata and the parts it lists) into `.backhaul-completions/<upload id>/` and then
//! writes a `target` file naming the object. Once the completion has ended, the journal is removed; if it
//! failed, the upload's files are linked back first. A journal found at start-up belongs to a
//! completion that a crash cut short: the upload's files are linked back, so the upload is
//! resumable and the agent completes it again, which rewrites whatever object the cut-short
//! completion left. Hard links cost no copy, whatever the size of the upload.

use std::io;
use std::path::{Path, PathBuf};

use base64::Engine;

/// Where the journals live, under the store's root. A leading dot keeps it out of the buckets.
const JOURNALS: &str = ".backhaul-completions";
/// Written last, atomically: a journal without it was cut short while it was being written, when
/// nothing of the upload had been touched yet.
const TARGET: &str = "target";

/// The journal of one running completion.
pub struct Journal {
    root: PathBuf,
    dir: PathBuf,
}

impl Journal {
    /// Links the files of upload `upload_id` of `bucket`/`key` into a fresh journal: its record,
    /// its metadata and the parts the completion lists (the ones s3s-fs consumes). `None` if
    /// there is no such upload (s3s-fs will refuse the completion, touching nothing).
    pub fn begin(
        root: &Path,
        bucket: &str,
        key: &str,
        upload_id: &str,
        parts: &[i32],
    ) -> io::Result<Option<Self>> {
        if uuid::Uuid::parse_str(upload_id).is_err()
            || !root.join(format!(".upload-{upload_id}.json")).exists()
        {
            return Ok(None);
        }
        let dir = root.join(JOURNALS).join(upload_id);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(&dir)?;
        for name in upload_files(root, bucket, key, upload_id, parts) {
            std::fs::hard_link(root.join(&name), dir.join(&name))?;
        }
        let tmp = dir.join(format!("{TARGET}.tmp"));
        std::fs::write(&tmp, format!("{bucket}\n{key}"))?;
        std::fs::rename(&tmp, dir.join(TARGET))?;
        Ok(Some(Self {
            root: root.to_owned(),
            dir,
        }))
    }

    /// The completion ended: its upload's files are no longer needed.
    pub fn finish(self) -> io::Result<()> {
        std::fs::remove_dir_all(&self.dir)
    }

    /// The completion failed or was cut short: the upload's files are put back, so the upload
    /// is as it was before the completion.
    pub fn roll_back(self) -> io::Result<()> {
        for entry in std::fs::read_dir(&self.dir)? {
            let name = entry?.file_name();
            if name == TARGET {
                continue;
            }
            let original = self.root.join(&name);
            if !original.exists() {
                std::fs::hard_link(self.dir.join(&name), original)?;
            }
        }
        std::fs::remove_dir_all(&self.dir)
    }

    /// At start-up: rolls back every completion a crash cut short, and removes the journals that
    /// were cut short while being written. Returns how many completions were rolled back.
    pub fn recover_all(root: &Path) -> io::Result<usize> {
        let journals = root.join(JOURNALS);
        if !journals.exists() {
            return Ok(0);
        }
        let mut rolled_back = 0;
        for entry in std::fs::read_dir(&journals)? {
            let dir = entry?.path();
            let journal = Self {
                root: root.to_owned(),
                dir: dir.clone(),
            };
            if dir.join(TARGET).exists() {
                journal.roll_back()?;
                rolled_back += 1;
            } else {
                std::fs::remove_dir_all(&dir)?;
            }
        }
        Ok(rolled_back)
    }
}

/// Part files (`.upload_id-<id>.part-<n>`) of uploads that no longer exist: left by an abort or
/// a completion that ended badly. Removed at start-up, after recovery.
pub fn remove_stray_parts(root: &Path) -> io::Result<usize> {
    let mut removed = 0;
    for entry in std::fs::read_dir(root)? {
        let name = entry?.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some((id, _part)) = name
            .strip_prefix(".upload_id-")
            .and_then(|rest| rest.split_once(".part-"))
        else {
            continue;
        };
        if !root.join(format!(".upload-{id}.json")).exists() {
            remove_if_present(&root.join(name))?;
            removed += 1;
        }
    }
    Ok(removed)
}

fn remove_if_present(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => Err(err),
        _ => Ok(()),
    }
}

fn encode(s: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
}

/// The names, in the store's root, of the files of an unfinished upload that exist: its record,
/// its metadata and the listed parts.
fn upload_files(
    root: &Path,
    bucket: &str,
    key: &str,
    upload_id: &str,
    parts: &[i32],
) -> Vec<String> {
    let mut names = vec![
        format!(".upload-{upload_id}.json"),
        format!(
            ".bucket-{}.object-{}.upload-{upload_id}.metadata.json",
            encode(bucket),
            encode(key)
        ),
    ];
    names.extend(
        parts
            .iter()
            .map(|n| format!(".upload_id-{upload_id}.part-{n}")),
    );
    names.retain(|n| root.join(n).exists());
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "7b0c5e4e-3c1a-4a53-9d43-0b5f0e1b2c3d";

    fn store() -> (tempfile::TempDir, Vec<String>) {
        let dir = tempfile::tempdir().unwrap();
        let names = vec![
            format!(".upload-{ID}.json"),
            format!(
                ".bucket-{}.object-{}.upload-{ID}.metadata.json",
                encode("b"),
                encode("k/f.bin")
            ),
            format!(".upload_id-{ID}.part-1"),
            format!(".upload_id-{ID}.part-2"),
        ];
        for (i, name) in names.iter().enumerate() {
            std::fs::write(dir.path().join(name), format!("content {i}")).unwrap();
        }
        (dir, names)
    }

    /// A completion cut short after s3s-fs forgot the upload and consumed a part: recovery
    /// puts every file back, with its content, and removes the journal.
    #[test]
    fn a_completion_cut_short_is_rolled_back() {
        let (dir, names) = store();
        let root = dir.path();
        let journal = Journal::begin(root, "b", "k/f.bin", ID, &[1, 2])
            .unwrap()
            .unwrap();
        std::fs::remove_file(root.join(&names[0])).unwrap();
        std::fs::remove_file(root.join(&names[2])).unwrap();
        drop(journal); // the process dies here
        assert_eq!(Journal::recover_all(root).unwrap(), 1);
        for (i, name) in names.iter().enumerate() {
            assert_eq!(
                std::fs::read_to_string(root.join(name)).unwrap(),
                format!("content {i}"),
                "{name}"
            );
        }
        assert_eq!(std::fs::read_dir(root.join(JOURNALS)).unwrap().count(), 0);
        assert_eq!(Journal::recover_all(root).unwrap(), 0);
    }

    #[test]
    fn a_finished_completion_leaves_nothing_and_unknown_uploads_are_not_journaled() {
        let (dir, names) = store();
        let root = dir.path();
        let journal = Journal::begin(root, "b", "k/f.bin", ID, &[1, 2])
            .unwrap()
            .unwrap();
        for name in &names {
            std::fs::remove_file(root.join(name)).unwrap();
        }
        journal.finish().unwrap();
        assert_eq!(Journal::recover_all(root).unwrap(), 0);
        assert!(names.iter().all(|n| !root.join(n).exists()));
        // The upload is gone now: a retried completion is not journaled (and so cannot roll
        // anything back).
        assert!(
            Journal::begin(root, "b", "k/f.bin", ID, &[1, 2])
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn stray_parts_are_removed() {
        let (dir, names) = store();
        let root = dir.path();
        assert_eq!(remove_stray_parts(root).unwrap(), 0, "the upload exists");
        std::fs::remove_file(root.join(&names[0])).unwrap();
        assert_eq!(remove_stray_parts(root).unwrap(), 2);
        assert!(!root.join(&names[2]).exists());
    }
}
