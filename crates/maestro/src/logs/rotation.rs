//! Log files rotated by size: `RotatingFile` appends whole lines, a batch per `write`, and
//! renames the live file to `.1` (shifting the older ones) when the next line would pass
//! `Rotation::max_file_bytes`.

use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Size at which a log file is rotated. 10 MiB holds tens of thousands of lines, enough to see
/// what led up to a problem, while `tail`, `less` and `grep` on it stay instant.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 10 * 1024 * 1024;
/// Rotated files kept per log (`stdout.log.1` to `.5`); older ones are deleted, so an app that
/// logs without pause takes at most 60 MiB per stream on disk.
pub const DEFAULT_KEEP_FILES: usize = 5;
/// Most rotated files kept whatever the configuration says: every rotation renames each kept
/// file, and 100 files of the default size are already a gigabyte for one stream of one app.
pub const MAX_KEEP_FILES: usize = 100;

/// Log files may hold whatever apps print, secrets included: readable by the owner and its
/// group (typically `adm` for log readers), not by every local user.
const FILE_MODE: u32 = 0o640;
/// Directories for log files, matching `FILE_MODE`.
const DIR_MODE: u32 = 0o750;

/// When a log file rotates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rotation {
    /// The live file is rotated when the next line would make it larger than this.
    pub max_file_bytes: u64,
    /// Rotated files kept (`.1` newest); at most `MAX_KEEP_FILES`. With 0 the live file is
    /// simply started afresh.
    pub keep_files: usize,
}

impl Default for Rotation {
    fn default() -> Self {
        Self {
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
            keep_files: DEFAULT_KEEP_FILES,
        }
    }
}

/// A file that rotates by size. Lines are appended whole, a batch of them with one `write`
/// call; when a line would take the file past `max_file_bytes`, the file is first renamed to
/// `.1` (shifting `.1` to `.2` and so on, dropping the one beyond `keep_files`) and a new one is
/// opened. After an error the file is reopened on the next write rather than failing forever.
///
/// It uses blocking `std::fs`: call it from a blocking thread (as the writers here do).
pub struct RotatingFile {
    path: PathBuf,
    rotation: Rotation,
    /// `None` after an error or a rotation; the next write opens the file again.
    file: Option<File>,
    /// Bytes in the live file, for the rotation check without a `stat` per line.
    size: u64,
    /// A write failed part-way, so the file may end in a torn line: the next line starts with
    /// a newline to keep itself whole.
    torn: bool,
}

impl RotatingFile {
    /// Opens (creating it and its directory) `path` for appending; the bytes already in it
    /// count towards the next rotation.
    pub fn open(path: &Path, rotation: Rotation) -> io::Result<Self> {
        let rotation = Rotation {
            keep_files: rotation.keep_files.min(MAX_KEEP_FILES),
            ..rotation
        };
        let (file, size) = open_for_append(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            rotation,
            file: Some(file),
            size,
            torn: false,
        })
    }

    /// Appends `line` and a newline, rotating first when needed. A `\n` inside `line` is
    /// written as the two characters `\n`, so one call is always one line in the file (and an
    /// access-log field cannot forge a record). The writers use [`write_lines`](Self::write_lines);
    /// the tests write line by line to compare.
    #[cfg(test)]
    pub fn write_line(&mut self, line: &str) -> io::Result<()> {
        match self.write_lines(&[line]) {
            (_, Some(e)) => Err(e),
            (_, None) => Ok(()),
        }
    }

    /// Appends each of `lines` as `write_line` would, with one `write` per
    /// run of lines that fits before the next rotation rather than one per line: a busy access
    /// log or app writes thousands of lines a second. Returns how many lines were not written
    /// and the first error; after an error the rest of the batch still gets a chance (the file
    /// is reopened), as one `write_line` per line would give it.
    pub fn write_lines<S: AsRef<str>>(&mut self, lines: &[S]) -> (u64, Option<io::Error>) {
        let mut dropped = 0;
        let mut first_error = None;
        let mut run = Run::default();
        for line in lines {
            let start = run.bytes.len();
            run.push(line.as_ref());
            if let Err(e) = self.ensure_open() {
                // Nothing can be written until the file opens again: this line is lost.
                run.pop(start);
                dropped += 1;
                first_error.get_or_insert(e);
                continue;
            }
            let line_bytes = (run.bytes.len() - start) as u64;
            let before = self.size + u64::from(self.torn) + start as u64;
            if before > 0 && before.saturating_add(line_bytes) > self.rotation.max_file_bytes {
                // The lines before this one go into the current file; this one starts the next.
                let tail = run.split_off(start);
                self.flush(&mut run, &mut dropped, &mut first_error);
                run = tail;
                // After a failed write the file is reopened, so the size is the real one.
                let rotated = match self.ensure_open().map(|_| ()) {
                    Ok(()) if self.size == 0 => Ok(()),
                    Ok(()) => self.rotate(),
                    Err(e) => Err(e),
                };
                if let Err(e) = rotated {
                    // The line is not written: the disk stays bounded, and the next line
                    // tries the rotation again.
                    run.pop(0);
                    dropped += 1;
                    first_error.get_or_insert(e);
                }
            }
        }
        self.flush(&mut run, &mut dropped, &mut first_error);
        (dropped, first_error)
    }

    /// Writes `run` (emptying it) with as few `write` calls as the kernel allows, counting the
    /// lines that did not make it whole.
    fn flush(&mut self, run: &mut Run, dropped: &mut u64, first_error: &mut Option<io::Error>) {
        if run.lines == 0 {
            return;
        }
        let torn = self.torn;
        let result = self.ensure_open().and_then(|file| {
            if torn {
                file.write_all(b"\n")?;
            }
            file.write_all(&run.bytes)
        });
        match result {
            Ok(()) => {
                self.size += run.bytes.len() as u64 + u64::from(torn);
                self.torn = false;
            }
            Err(e) => {
                // Some lines may have reached the file before the error; which ones is not
                // known, so all count as lost and the next write starts on a fresh line.
                // Reopening reads the real size back; the handle may be what is broken.
                *dropped += run.lines;
                self.torn = true;
                self.file = None;
                first_error.get_or_insert(annotate(e, "writing", &self.path));
            }
        }
        run.bytes.clear();
        run.lines = 0;
    }

    /// Closes the file; the next write reopens it.
    #[cfg(test)]
    pub fn close(&mut self) {
        self.file = None;
    }

    fn ensure_open(&mut self) -> io::Result<&mut File> {
        match &mut self.file {
            Some(file) => Ok(file),
            slot @ None => {
                let (file, size) = open_for_append(&self.path)?;
                self.size = size;
                Ok(slot.insert(file))
            }
        }
    }

    /// Shifts the rotated files up by one and renames the live file to `.1`. Only the last
    /// rename decides success: a rotated file that cannot be moved is logged and overwritten
    /// or left behind, which loses old lines but never grows the disk use.
    fn rotate(&mut self) -> io::Result<()> {
        self.file = None;
        let keep = self.rotation.keep_files;
        if keep == 0 {
            remove_if_exists(&self.path).map_err(|e| annotate(e, "removing", &self.path))?;
        } else {
            // Oldest first, so that no rename lands on a file still to be moved.
            let oldest = rotated_path(&self.path, keep);
            if let Err(e) = remove_if_exists(&oldest) {
                tracing::warn!(path = %oldest.display(), "log rotation: removing: {e}");
            }
            for n in (1..keep).rev() {
                let from = rotated_path(&self.path, n);
                let to = rotated_path(&self.path, n + 1);
                match std::fs::rename(&from, &to) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => {
                        tracing::warn!(path = %from.display(), "log rotation: renaming: {e}");
                    }
                }
            }
            let first = rotated_path(&self.path, 1);
            std::fs::rename(&self.path, &first).map_err(|e| annotate(e, "rotating", &first))?;
        }
        self.size = 0;
        self.torn = false;
        tracing::debug!(path = %self.path.display(), "log file rotated");
        Ok(())
    }
}

/// Lines encoded for one `write`: each ends with a newline, and a newline inside a line is
/// written as the two characters `\n`.
#[derive(Default)]
struct Run {
    bytes: Vec<u8>,
    lines: u64,
}

impl Run {
    fn push(&mut self, line: &str) {
        for chunk in line.as_bytes().split_inclusive(|&b| b == b'\n') {
            match chunk.strip_suffix(b"\n") {
                Some(text) => {
                    self.bytes.extend_from_slice(text);
                    self.bytes.extend_from_slice(b"\\n");
                }
                None => self.bytes.extend_from_slice(chunk),
            }
        }
        self.bytes.push(b'\n');
        self.lines += 1;
    }

    /// Drops the last line, which starts at byte `start`.
    fn pop(&mut self, start: usize) {
        self.bytes.truncate(start);
        self.lines -= 1;
    }

    /// The lines from byte `start` on, which must be where a line starts.
    fn split_off(&mut self, start: usize) -> Run {
        let bytes = self.bytes.split_off(start);
        let moved = bytes.iter().filter(|&&b| b == b'\n').count() as u64;
        self.lines -= moved;
        Run {
            bytes,
            lines: moved,
        }
    }
}

/// `path.<n>`, the n-th rotated file (1 is the newest).
pub(super) fn rotated_path(path: &Path, n: usize) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

fn open_for_append(path: &Path) -> io::Result<(File, u64)> {
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(dir)
            .map_err(|e| annotate(e, "creating", dir))?;
    }
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(FILE_MODE)
        .open(path)
        .map_err(|e| annotate(e, "opening", path))?;
    let size = file
        .metadata()
        .map_err(|e| annotate(e, "reading the size of", path))?
        .len();
    Ok((file, size))
}

fn remove_if_exists(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn annotate(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::access::ACCESS_LOG_FILE;
    use crate::logs::app::STDOUT_FILE;
    use crate::logs::testing::{lines_of, read};

    #[test]
    fn rotation_happens_at_the_size_bound_and_keeps_only_keep_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app").join(STDOUT_FILE);
        let rotation = Rotation {
            max_file_bytes: 100,
            keep_files: 2,
        };
        let mut file = RotatingFile::open(&path, rotation).unwrap();
        // 29 characters + newline = 30 bytes: three lines fit in 100 bytes, a fourth does not.
        let written: Vec<String> = (0..20)
            .map(|i| format!("line {i:02} {}", "x".repeat(21)))
            .collect();
        for line in &written {
            file.write_line(line).unwrap();
        }

        let rotated_1 = rotated_path(&path, 1);
        let rotated_2 = rotated_path(&path, 2);
        for p in [&path, &rotated_1, &rotated_2] {
            let len = std::fs::metadata(p).unwrap().len();
            assert!(len <= 100, "{} has {len} bytes", p.display());
        }
        assert_eq!(lines_of(&rotated_1).len(), 3);
        assert_eq!(lines_of(&rotated_2).len(), 3);
        assert!(
            !rotated_path(&path, 3).exists(),
            "a third old file was kept"
        );
        // The kept files, oldest first, are the newest lines written, in order and complete.
        let kept: Vec<String> = [&rotated_2, &rotated_1, &path]
            .into_iter()
            .flat_map(|p| lines_of(p))
            .collect();
        assert_eq!(kept, written[written.len() - kept.len()..]);
        assert_eq!(kept.len(), 8);

        // Reopening counts the 60 bytes the file holds, so 50 more make it rotate.
        drop(file);
        let mut file = RotatingFile::open(&path, rotation).unwrap();
        file.write_line(&"y".repeat(49)).unwrap();
        assert_eq!(lines_of(&path), vec!["y".repeat(49)]);
        assert_eq!(
            lines_of(&rotated_1).last().unwrap(),
            written.last().unwrap()
        );
    }

    #[test]
    fn batches_land_in_the_same_files_as_lines_written_one_by_one() {
        let rotation = Rotation {
            max_file_bytes: 100,
            keep_files: 3,
        };
        // Lengths that straddle the bound at different places, one longer than the bound,
        // and a newline that must stay inside its line.
        let written: Vec<String> = (0..23)
            .map(|i| match i {
                9 => "a line far longer than the whole bound of this file ".repeat(3),
                14 => format!("line {i} with\na newline"),
                _ => format!("line {i:02} {}", "x".repeat(i * 3 % 40)),
            })
            .collect();
        let one_by_one = tempfile::tempdir().unwrap();
        let mut file = RotatingFile::open(&one_by_one.path().join("a.log"), rotation).unwrap();
        for line in &written {
            file.write_line(line).unwrap();
        }
        for batch_size in [1, 2, 7, 23] {
            let batched = tempfile::tempdir().unwrap();
            let mut file = RotatingFile::open(&batched.path().join("a.log"), rotation).unwrap();
            for batch in written.chunks(batch_size) {
                let (dropped, error) = file.write_lines(batch);
                assert_eq!((dropped, error.map(|e| e.to_string())), (0, None));
            }
            for name in ["a.log", "a.log.1", "a.log.2", "a.log.3"] {
                assert_eq!(
                    read(&batched.path().join(name)),
                    read(&one_by_one.path().join(name)),
                    "{name} with batches of {batch_size}"
                );
            }
        }
    }

    #[test]
    fn a_batch_that_cannot_be_written_counts_every_line_lost() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app").join(STDOUT_FILE);
        let mut file = RotatingFile::open(&path, Rotation::default()).unwrap();
        file.write_line("before").unwrap();
        // The directory is replaced by a file: the log cannot be reopened there.
        file.close();
        std::fs::remove_dir_all(dir.path().join("app")).unwrap();
        std::fs::write(dir.path().join("app"), "").unwrap();
        let (dropped, error) = file.write_lines(&["one", "two", "three"]);
        assert_eq!(dropped, 3);
        assert!(error.unwrap().to_string().contains("creating"));
        // Once the directory is back, writing works again.
        std::fs::remove_file(dir.path().join("app")).unwrap();
        assert_eq!(file.write_lines(&["four"]).0, 0);
        assert_eq!(read(&path), "four\n");
    }

    #[test]
    fn without_kept_files_the_log_starts_afresh_and_long_lines_stand_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(ACCESS_LOG_FILE);
        let rotation = Rotation {
            max_file_bytes: 10,
            keep_files: 0,
        };
        let mut file = RotatingFile::open(&path, rotation).unwrap();
        file.write_line("first").unwrap();
        file.write_line("a line longer than the bound").unwrap();
        assert_eq!(read(&path), "a line longer than the bound\n");
        file.write_line("next").unwrap();
        assert_eq!(read(&path), "next\n");
        assert!(!rotated_path(&path, 1).exists());
    }

    #[test]
    fn an_embedded_newline_cannot_make_two_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(ACCESS_LOG_FILE);
        let mut file = RotatingFile::open(&path, Rotation::default()).unwrap();
        file.write_line("GET /a\nforged 200").unwrap();
        assert_eq!(read(&path), "GET /a\\nforged 200\n");
    }
}
