//! The access log: the proxy's records formatted into lines by one task and written to
//! `log_dir/access.log` by another, each stage gathering a batch before it works.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use tokio::sync::mpsc;

use super::lines::cut_line;
use super::rotation::Rotation;
use super::sink::{FileSink, WRITE_BATCH_LINES, next_batch};
use crate::proxy::AccessLog;

/// How long each of the access log's two stages (formatting, writing) lets records gather
/// after the first one before it handles them: under load one wake-up and one write per batch
/// rather than per request, which the proxy benchmark showed costing a fifth of its
/// throughput; a line reaches the file up to twice this later.
pub const ACCESS_LOG_GATHER: Duration = Duration::from_millis(20);
/// Name of the access log inside `log_dir`.
pub const ACCESS_LOG_FILE: &str = "access.log";

/// Access records waiting to be formatted, and lines waiting for the writer; a disk slower
/// than the traffic drops records (counted) rather than slowing requests.
pub const ACCESS_LOG_QUEUE: usize = 8192;

/// The access log as `run` and the benchmark facade (`crate::bench`) start it: the proxy's
/// handle, then the two stages for the caller to spawn, records → lines
/// ([`format_access_records`]) and lines → `log_dir/access.log` rotated by `rotation`
/// ([`write_access_log`]). Both end once every handle is dropped and what was queued is
/// written.
pub fn access_log(
    log_dir: PathBuf,
    rotation: Rotation,
) -> (
    AccessLog,
    impl Future<Output = ()> + Send + 'static,
    impl Future<Output = ()> + Send + 'static,
) {
    let (access, records) = AccessLog::new(ACCESS_LOG_QUEUE);
    let (lines_tx, lines_rx) = mpsc::channel(ACCESS_LOG_QUEUE);
    (
        access,
        format_access_records(records, lines_tx),
        write_access_log(log_dir, rotation, lines_rx),
    )
}

/// The access log writer: writes each line received on `rx` to `log_dir/access.log`, rotated
/// like the app logs. Lines are cut at `MAX_LINE_BYTES`. Disk errors are logged and counted in
/// the log, never returned: serving must not stop because the access log cannot be written.
/// Ends once every sender is dropped and the queued lines are written.
pub async fn write_access_log(
    log_dir: PathBuf,
    rotation: Rotation,
    mut rx: mpsc::Receiver<String>,
) {
    let dropped = Arc::new(AtomicU64::new(0));
    let mut sink = FileSink::new(log_dir.join(ACCESS_LOG_FILE), rotation, dropped);
    let mut batch = Vec::with_capacity(WRITE_BATCH_LINES);
    while next_batch(&mut rx, &mut batch, &mut sink).await {
        gather(&mut rx, &mut batch).await;
        let mut lines = std::mem::take(&mut batch);
        lines.iter_mut().for_each(cut_line);
        sink.write(lines).await;
    }
}

/// Waits `ACCESS_LOG_GATHER`, then takes what arrived meanwhile (up to a full batch) without
/// waiting again: senders do not wake a receiver that is not waiting.
async fn gather<M>(rx: &mut mpsc::Receiver<M>, batch: &mut Vec<M>) {
    if batch.len() >= WRITE_BATCH_LINES {
        return;
    }
    tokio::time::sleep(ACCESS_LOG_GATHER).await;
    while batch.len() < WRITE_BATCH_LINES {
        match rx.try_recv() {
            Ok(item) => batch.push(item),
            Err(_) => break,
        }
    }
}

/// The access log's first stage: formats the proxy's records into lines for
/// [`write_access_log`], a batch at a time. Ends when the proxy is gone or the writer is.
pub async fn format_access_records(
    mut records: mpsc::Receiver<crate::proxy::AccessRecord>,
    lines: mpsc::Sender<String>,
) {
    let mut batch = Vec::with_capacity(WRITE_BATCH_LINES);
    while records.recv_many(&mut batch, WRITE_BATCH_LINES).await > 0 {
        gather(&mut records, &mut batch).await;
        for record in batch.drain(..) {
            if lines.send(record.to_line()).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::lines::{CUT_MARKER, MAX_LINE_BYTES};
    use crate::logs::rotation::rotated_path;
    use crate::logs::testing::{DEADLINE, lines_of};

    #[tokio::test]
    async fn the_access_log_writes_and_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let rotation = Rotation {
            max_file_bytes: 200,
            keep_files: 1,
        };
        let (tx, rx) = mpsc::channel(8);
        let writer = tokio::spawn(write_access_log(dir.path().to_path_buf(), rotation, rx));
        // 49 bytes + newline: four lines per file.
        let sent: Vec<String> = (0..10)
            .map(|i| format!("GET /{i} 200 {}", "-".repeat(38)))
            .collect();
        for line in &sent {
            tx.send(line.clone()).await.unwrap();
        }
        tx.send(format!("GET /{}", "l".repeat(MAX_LINE_BYTES)))
            .await
            .unwrap();
        drop(tx);
        tokio::time::timeout(DEADLINE, writer)
            .await
            .unwrap()
            .unwrap();

        let path = dir.path().join(ACCESS_LOG_FILE);
        let live = lines_of(&path);
        let cut = format!("GET /{}{CUT_MARKER}", "l".repeat(MAX_LINE_BYTES - 5));
        assert_eq!(live, [cut]);
        assert_eq!(lines_of(&rotated_path(&path, 1)), sent[8..]);
        assert!(!rotated_path(&path, 2).exists());
    }
}
