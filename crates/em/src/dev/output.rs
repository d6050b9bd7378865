//! What `em dev` shows in the terminal: its own lines on stdout, problems it lives with on
//! stderr, and the app's output prefixed so the two stand apart. Writes never panic: a closed
//! terminal must not take `em dev` (and with it the app) down, as `println!` would.

use std::fmt::Display;
use std::io::Write as _;

use px_proto::link::{LogLine, LogStream};
use tokio::sync::broadcast;

/// Prefix of the app's output lines, so they stand apart from what `em` says.
const APP_PREFIX: &str = "[app]";

/// One line of what `em dev` does, on stdout.
pub fn say(line: impl Display) {
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

/// One problem `em dev` lives with, on stderr.
pub fn warn(line: impl Display) {
    let _ = writeln!(std::io::stderr().lock(), "em: {line}");
}

/// Prints the app's output lines, stdout (and its events) to stdout and stderr to stderr,
/// until the app's logs end.
pub async fn print_app_output(mut lines: broadcast::Receiver<LogLine>) {
    loop {
        match lines.recv().await {
            Ok(line) => {
                let _ = match line.stream {
                    LogStream::Stdout | LogStream::Event | LogStream::Build => {
                        writeln!(std::io::stdout().lock(), "{APP_PREFIX} {}", line.line)
                    }
                    LogStream::Stderr => {
                        writeln!(std::io::stderr().lock(), "{APP_PREFIX} {}", line.line)
                    }
                };
            }
            Err(broadcast::error::RecvError::Lagged(skipped)) => warn(format!(
                "{skipped} lines of app output were not shown; the terminal is slower than the app"
            )),
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}
