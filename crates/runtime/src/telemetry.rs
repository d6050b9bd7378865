//! Tracing set-up shared by the services: human-readable lines on stderr (journald adds the
//! time), filtered by `PX_LOG` (same syntax as `RUST_LOG`), `info` by default. Colours only on
//! a terminal: under systemd stderr is the journal, which would store the escape codes.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. Safe to call more than once (later calls do nothing).
pub fn init() {
    let filter = EnvFilter::try_from_env("PX_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}
