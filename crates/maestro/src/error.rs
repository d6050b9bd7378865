//! Maestro's public error: why [`run`](crate::run) could not start (a bad configuration, a
//! listener or directory it could not open), or which task it cannot serve without ended.
//! Failures of apps (a deploy that fails, an instance that crashes) are reported as events and
//! never end `run`.

use px_runtime::config::ConfigError;
use px_runtime::shutdown::TaskEnded;

/// Why [`run`](crate::run) or [`run_with`](crate::run_with) returned early.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is wrong; the binary exits with `EX_CONFIG` (78).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A directory, socket or file Maestro needs could not be opened.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// A task Maestro cannot serve without ended while it ran (see
    /// [`CriticalTasks`](px_runtime::shutdown::CriticalTasks)); Maestro drained and stopped its
    /// apps, and under systemd exits non-zero to be restarted.
    #[error("{0}")]
    TaskEnded(#[from] TaskEnded),
}

impl px_runtime::service::StartFailure for Error {
    fn is_config(&self) -> bool {
        matches!(self, Error::Config(_))
    }
}
