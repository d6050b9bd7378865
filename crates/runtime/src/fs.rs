//! Durable file replacement: [`write_atomic`] writes a small state file (a generation, a
//! history, an assignment) so that after a crash or power loss the file holds either its old
//! content or its new one, whole, never a mix or nothing.
//!
//! The recipe: write a temporary file beside the target (same directory, so the same file
//! system), fsync it, rename it over the target, then fsync the directory so the rename itself
//! is on disk. Without the first fsync the rename can reach the disk before the data (an empty
//! file after a crash); without the second the rename can be lost (the old content back).
//!
//! The directory must already exist: creating it here would also need the parent's fsync, and
//! a missing state directory is better reported than papered over. Every error names the path.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use rand::Rng;

/// Writes `bytes` to `path` durably, replacing any previous content whole (see the module
/// documentation). Blocking: from async code, use [`write_atomic_async`].
///
/// Each call writes its own temporary file (`.<name>.<random>.tmp`, created exclusively), so
/// concurrent calls for one path never mix their bytes: the last rename wins. A temporary
/// file left by a crash is never opened again and does not disturb later writes.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let named = |what: &str, e: io::Error| {
        io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
    };
    let (dir, name) = match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) => (dir, name),
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a file path", path.display()),
            ));
        }
    };
    // `Path::new("state.json").parent()` is the empty path: the current directory.
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let tmp = temporary_path(dir, name);
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .and_then(|mut file| {
            file.write_all(bytes)?;
            file.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        // The temporary file is useless now; a failure to remove it changes nothing.
        let _ = std::fs::remove_file(&tmp);
        return Err(named("cannot write", e));
    }
    sync_dir(dir).map_err(|e| named("cannot sync the directory of", e))
}

/// [`write_atomic`] on a blocking thread, for async callers (an fsync can take milliseconds
/// on a busy disk, which must not stall the tasks of a runtime worker).
pub async fn write_atomic_async(path: PathBuf, bytes: Vec<u8>) -> io::Result<()> {
    tokio::task::spawn_blocking(move || write_atomic(&path, &bytes))
        .await
        .map_err(io::Error::other)?
}

/// Fsyncs a directory, so that entries created, renamed or removed in it survive a crash.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// `<dir>/.<name>.<16 hex digits>.tmp`: hidden, and ending in `.tmp` so that readers that
/// list the directory for `*.json` never pick it up.
fn temporary_path(dir: &Path, name: &std::ffi::OsStr) -> PathBuf {
    let mut tmp = OsString::from(".");
    tmp.push(name);
    tmp.push(format!(".{:016x}.tmp", rand::rng().random::<u64>()));
    dir.join(tmp)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn the_target_is_created_then_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write_atomic(&path, b"a long first content").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"a long first content");
        write_atomic(&path, b"short").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"short");
        assert_eq!(
            entries(dir.path()),
            ["state.json"],
            "no temporary file left"
        );
    }

    #[test]
    fn a_temporary_file_left_by_a_crash_does_not_disturb_the_next_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write_atomic(&path, b"before the crash").unwrap();
        // A crash between creating the temporary file and renaming it leaves this behind.
        let leftover = dir.path().join(".state.json.0123456789abcdef.tmp");
        std::fs::write(&leftover, b"half wri").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"before the crash");
        write_atomic(&path, b"after the restart").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"after the restart");
        assert_eq!(std::fs::read(&leftover).unwrap(), b"half wri");
    }

    #[test]
    fn a_missing_directory_is_an_error_naming_the_path_and_nothing_is_created() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing").join("state.json");
        let e = write_atomic(&path, b"x").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
        assert!(entries(dir.path()).is_empty());
    }

    #[test]
    fn a_failed_rename_leaves_the_target_and_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        // A directory in the target's place: the rename fails after the data was written.
        let path = dir.path().join("state.json");
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("inside"), b"kept").unwrap();
        let e = write_atomic(&path, b"x").unwrap_err();
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
        assert_eq!(entries(dir.path()), ["state.json"]);
        assert_eq!(std::fs::read(path.join("inside")).unwrap(), b"kept");
    }

    #[test]
    fn concurrent_writers_of_one_path_never_mix_their_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let contents: Vec<Vec<u8>> = (0..8u8).map(|i| vec![b'a' + i; 64 * 1024]).collect();
        std::thread::scope(|scope| {
            for content in &contents {
                let path = &path;
                scope.spawn(move || {
                    for _ in 0..10 {
                        write_atomic(path, content).unwrap();
                    }
                });
            }
        });
        let last = std::fs::read(&path).unwrap();
        assert!(
            contents.contains(&last),
            "the file holds one writer's bytes"
        );
        assert_eq!(entries(dir.path()), ["state.json"]);
    }

    #[tokio::test]
    async fn the_async_wrapper_writes_the_same_way() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write_atomic_async(path.clone(), b"from async".to_vec())
            .await
            .unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"from async");
    }
}
