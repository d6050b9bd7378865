//! One log file as a writer task drives it: batches written on the blocking pool, the file
//! closed when idle, write errors counted and logged once per outage.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;

use super::rotation::{RotatingFile, Rotation};

/// Most lines written in one blocking call: amortises the hop to the blocking pool while
/// keeping each call short.
pub const WRITE_BATCH_LINES: usize = 256;
/// A log file not written for this long is closed (and reopened on the next line), so a
/// quiet or removed app does not hold file descriptors, and a log file an operator moved or
/// deleted is recreated.
pub const IDLE_CLOSE: Duration = Duration::from_secs(60);

/// One log file as a writer task sees it: written on the blocking pool, closed when idle,
/// errors logged once per outage.
pub(super) struct FileSink {
    path: PathBuf,
    rotation: Rotation,
    /// `None` until the first line, and again after `IDLE_CLOSE` without one.
    file: Option<RotatingFile>,
    dropped: Arc<AtomicU64>,
    /// Lines dropped since writing last failed, while it keeps failing.
    failing: Option<u64>,
}

impl FileSink {
    pub(super) fn new(path: PathBuf, rotation: Rotation, dropped: Arc<AtomicU64>) -> Self {
        Self {
            path,
            rotation,
            file: None,
            dropped,
            failing: None,
        }
    }

    fn is_open(&self) -> bool {
        self.file.is_some()
    }

    fn close(&mut self) {
        self.file = None;
    }

    pub(super) async fn write(&mut self, lines: Vec<String>) {
        if lines.is_empty() {
            return;
        }
        let count = lines.len() as u64;
        let file = self.file.take();
        let path = self.path.clone();
        let rotation = self.rotation;
        let outcome =
            tokio::task::spawn_blocking(move || write_batch(file, &path, rotation, &lines)).await;
        let (file, dropped, error) = match outcome {
            Ok(outcome) => outcome,
            Err(e) => (None, count, Some(io::Error::other(e.to_string()))),
        };
        self.file = file;
        self.dropped.fetch_add(dropped, Ordering::Relaxed);
        match (error, self.failing) {
            (Some(e), None) => {
                tracing::error!(
                    path = %self.path.display(),
                    "cannot write log file, dropping its lines until it works again: {e}"
                );
                self.failing = Some(dropped);
            }
            (Some(_), Some(so_far)) => self.failing = Some(so_far + dropped),
            (None, Some(so_far)) => {
                tracing::info!(
                    path = %self.path.display(),
                    dropped_lines = so_far,
                    "log file writable again"
                );
                self.failing = None;
            }
            (None, None) => {}
        }
    }
}

/// Writes `lines` (opening the file first if needed) on a blocking thread. Returns the file
/// for the next batch, how many lines were dropped, and the first error.
fn write_batch(
    file: Option<RotatingFile>,
    path: &Path,
    rotation: Rotation,
    lines: &[String],
) -> (Option<RotatingFile>, u64, Option<io::Error>) {
    let mut file = match file {
        Some(file) => file,
        None => match RotatingFile::open(path, rotation) {
            Ok(file) => file,
            Err(e) => return (None, lines.len() as u64, Some(e)),
        },
    };
    let (dropped, first_error) = file.write_lines(lines);
    (Some(file), dropped, first_error)
}

/// Receives the next batch into `batch`; `false` when every sender is gone and the queue is
/// empty. While the file is open, waiting longer than `IDLE_CLOSE` closes it.
pub(super) async fn next_batch<M>(
    rx: &mut mpsc::Receiver<M>,
    batch: &mut Vec<M>,
    sink: &mut FileSink,
) -> bool {
    loop {
        if !sink.is_open() {
            return rx.recv_many(batch, WRITE_BATCH_LINES).await > 0;
        }
        match tokio::time::timeout(IDLE_CLOSE, rx.recv_many(batch, WRITE_BATCH_LINES)).await {
            Ok(received) => return received > 0,
            Err(_) => sink.close(),
        }
    }
}
