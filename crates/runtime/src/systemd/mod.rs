//! systemd integration shared by the three services: listening sockets passed by socket
//! activation (`LISTEN_FDS`), readiness and status notifications (`NOTIFY_SOCKET`), watchdog
//! pings (`WATCHDOG_USEC`) and reload requests (SIGHUP). Outside systemd every part is a no-op
//! or a fallback, so the same binaries run under `em up`, in tests and as units.
//!
//! A service binary takes its sockets by name ([`Activation`], [`listener`]), then hands
//! [`Systemd::from_env`] to its `run_with`, which calls [`Systemd::ready`] once its listeners
//! and state are good: READY=1, a STATUS= line kept current, watchdog pings while the service's
//! own liveness probe passes, RELOADING=1 … READY=1 around each reload, STOPPING=1 at
//! shutdown. `em up` runs the three services in one process with [`Systemd::none`].
//!
//! The environment variables are read but not unset: `std::env::remove_var` is `unsafe` in
//! edition 2024 and the workspace forbids `unsafe_code`. That is harmless here because the
//! sockets themselves never reach a child (each is re-opened close-on-exec and its inherited
//! number closed), `LISTEN_PID` names this process so a child's `sd_listen_fds` ignores the
//! rest, and Maestro starts apps with a cleared environment. Code that starts a child without
//! clearing its environment removes [`SYSTEMD_ENV_VARS`] from it.
//!
//! One module per concern, each with its tests beside it:
//! - `activation.rs`: [`Activation`] takes the sockets of `LISTEN_FDS` by name; [`listener`]
//!   and [`optional_listener`] fall back to binding the configured address;
//! - `notify.rs`: [`Notifier`] sends the sd-notify datagrams;
//! - `watchdog.rs`: [`watchdog_interval`], [`spawn_watchdog`] and the liveness probes behind
//!   the pings ([`http_answers`]);
//! - `reload.rs`: [`ReloadRequests`] (SIGHUP), [`Reload`], [`Reloaded`] and the task that
//!   answers each request;
//! - `ready.rs`: [`Systemd::ready`], which starts all of the above for a ready service;
//! - here: [`Systemd`], what a service's `run_with` gets.

use std::io;
use std::time::Duration;

use crate::config::ConfigError;

mod activation;
mod notify;
mod ready;
mod reload;
mod watchdog;

pub use activation::{
    Activation, ActivationError, LISTEN_FDS_START, MAX_LISTEN_FDS, listener, optional_listener,
};
pub use notify::{MAX_STATUS_BYTES, NOTIFY_SEND_TIMEOUT, Notifier};
pub use ready::STATUS_INTERVAL;
pub use reload::{Reload, ReloadRequests, ReloadTrigger, Reloaded};
pub use watchdog::{PINGS_PER_WATCHDOG_TIMEOUT, http_answers, spawn_watchdog, watchdog_interval};

/// The variables systemd sets for this service alone. A child started without a cleared
/// environment should not see them (`Command::env_remove`); see the module comment.
pub const SYSTEMD_ENV_VARS: [&str; 6] = [
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
];

/// What a service's `run` gets from the service manager: where to send notifications, how
/// often to ping the watchdog, and reload requests with the way to read the configuration
/// again. [`Systemd::none`] (`em up`, tests) sends nothing and never reloads.
pub struct Systemd<C> {
    pub notifier: Notifier,
    /// Ping interval: half of `WatchdogSec=`; `None` without a watchdog.
    pub watchdog: Option<Duration>,
    pub reload: Option<Reload<C>>,
}

impl<C: Send + 'static> Systemd<C> {
    /// No service manager: nothing is sent, the watchdog is off, reloads never come.
    pub fn none() -> Self {
        Self {
            notifier: Notifier::disabled(),
            watchdog: None,
            reload: None,
        }
    }

    /// The service manager this process runs under, as its environment says (nothing outside
    /// systemd), with SIGHUP as the reload request and `load` to read the configuration
    /// again. Call within a tokio runtime, once per process (it takes over SIGHUP).
    pub fn from_env(
        load: impl FnMut() -> Result<C, ConfigError> + Send + 'static,
    ) -> io::Result<Self> {
        let notifier = Notifier::from_env();
        let watchdog = watchdog_interval();
        if let Some(socket) = notifier.socket() {
            tracing::info!(socket = %socket, watchdog_ping = ?watchdog, "notifying systemd");
        }
        Ok(Self {
            notifier,
            watchdog,
            reload: Some(Reload {
                requests: ReloadRequests::listen()?,
                load: Box::new(load),
            }),
        })
    }
}

/// The environment variable `name` as text, if it is set. systemd's values are ASCII, so a
/// lossy conversion changes nothing that is valid, and a mangled value fails to parse.
fn env_string(name: &str) -> Option<String> {
    std::env::var_os(name).map(|value| value.to_string_lossy().into_owned())
}

/// What the tests of every part share.
#[cfg(test)]
mod testing {
    use std::path::Path;
    use std::time::Duration;

    use super::Notifier;

    /// How long a test waits for something that should happen at once; generous, since it
    /// only bounds how long a failing test hangs.
    pub(super) const ARRIVAL_TIMEOUT: Duration = Duration::from_secs(10);

    pub(super) fn notifier_for(path: &Path) -> Notifier {
        Notifier::new(path.as_os_str()).unwrap()
    }
}
