//! App and access logs on disk: every instance's stdout and stderr, line by line, in
//! `log_dir/<app>/{stdout,stderr}.log`, one line per request in `log_dir/access.log`, all rotated
//! by size with a bounded number of old files; plus the newest lines of each app in memory (for
//! `em logs` and deploy-failed events) and a broadcast that live followers (`em logs -f`) read.
//!
//! # How a line travels
//!
//! `AppLogs::attach` starts one reader task per pipe. The reader splits the output on `\n`
//! (dropping a trailing `\r`, converting invalid UTF-8 lossily, cutting lines longer than
//! `MAX_LINE_BYTES`), stamps each line with the time, puts it in the app's in-memory tail,
//! broadcasts it to followers, emits it through `tracing` at debug level, and then queues it
//! for the file. One writer task per log file owns that file: it takes whatever lines are
//! queued (up to `WRITE_BATCH_LINES`) and writes them in one `spawn_blocking` call with plain
//! `std::fs`. `tokio::fs` would also hop to the blocking pool, but once per operation; one hop
//! per batch is cheaper and keeps a rotation (several renames) one synchronous step.
//!
//! # Back-pressure, not dropping
//!
//! The file queue is bounded (`WRITE_QUEUE_LINES`) and a reader waits for room in it. So when
//! the disk is slower than an app's output, the reader stops reading, the pipe fills and the
//! app blocks in `write(2)`, as it would on a slow terminal. This was chosen over dropping
//! lines because a log with silent holes misleads whoever debugs from it, and because it keeps
//! one order per stream without bookkeeping. A *failing* disk is different from a slow one:
//! write errors drop the line for the file (it still reaches the tail and followers), are
//! counted (`AppLogs::dropped_lines`) and logged once per outage, and never hold the reader,
//! so an app never stalls because its log cannot be written. The tail and followers get each
//! line before the reader waits on the file queue, so `em logs` stays live under back-pressure.
//!
//! # Bounds
//!
//! Disk: `(1 + keep_files) * max_file_bytes` per log file (a file passes `max_file_bytes` only
//! when a single line is longer than that); when a rotation fails, lines are dropped rather
//! than growing the live file. Memory per app: `2 * TAIL_LINES` lines in the tail and
//! `2 * WRITE_QUEUE_LINES` in the file queues, each at most `MAX_LINE_BYTES` of input; per
//! attached pipe one `READ_BUFFER_BYTES` buffer; followers share one `FOLLOW_BUFFER` ring.
//! Open files: a log file idle for `IDLE_CLOSE` is closed and reopened on the next line.
//!
//! # Where things live
//!
//! `rotation.rs` is the size-rotated file (`RotatingFile`) and its settings; `sink.rs` is one
//! file as a writer task drives it (the hop to the blocking pool, closing when idle, errors
//! logged once per outage); `lines.rs` splits an instance's pipe into bounded lines; `app.rs`
//! is the apps' logs (`AppLogs`: readers, tails, followers, one writer per file); `access.rs`
//! is the proxy's access log.

mod access;
mod app;
mod lines;
mod rotation;
mod sink;
#[cfg(test)]
mod testing;

pub(crate) use access::{ACCESS_LOG_QUEUE, access_log};
pub use app::{AppLogs, LogTasks};
pub use rotation::Rotation;

// The line types are wire types: Maestro forwards lines to Beacon, which streams them to `em logs`.
pub use px_proto::link::{LogLine, LogStream as Stream};
