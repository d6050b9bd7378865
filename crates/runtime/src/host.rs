//! The environment the process started with, read once: the services never call
//! `std::env::var` themselves, so what they pass on (to app instances, to version probes) is one
//! snapshot taken in one place, and no later change to the process environment reaches it.

use std::ffi::{OsStr, OsString};
use std::sync::OnceLock;

/// `PATH` when the process has none: the directories every Unix has.
pub const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Variables a service may pass on from its own environment to the processes it starts:
/// locale, time zone and `HOME` (some runtimes print nothing without it). Everything else a
/// child sees is chosen by the service, so apps behave the same on every node.
pub const PASSED_ENV: &[&str] = &["LANG", "LC_ALL", "TZ", "HOME"];

/// What the process was started with, as far as the services need it.
#[derive(Debug, Clone)]
pub struct HostEnv {
    /// `PATH`, or [`DEFAULT_PATH`] when unset.
    pub path: OsString,
    /// Each of [`PASSED_ENV`] that is set, in that order.
    pub passed: Vec<(&'static str, OsString)>,
}

impl HostEnv {
    fn capture() -> Self {
        Self {
            path: std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH.into()),
            passed: PASSED_ENV
                .iter()
                .filter_map(|key| std::env::var_os(key).map(|value| (*key, value)))
                .collect(),
        }
    }

    /// The passed-on variables as `(name, value)` pairs, for `Command::envs`.
    pub fn passed(&self) -> impl Iterator<Item = (&'static str, &OsStr)> + '_ {
        self.passed.iter().map(|(k, v)| (*k, v.as_os_str()))
    }
}

/// The snapshot, taken on first use.
pub fn env() -> &'static HostEnv {
    static HOST: OnceLock<HostEnv> = OnceLock::new();
    HOST.get_or_init(HostEnv::capture)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn the_snapshot_holds_the_path_and_only_the_passed_variables() {
        let host = env();
        assert_eq!(
            host.path,
            std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH.into())
        );
        for (key, value) in host.passed() {
            assert!(PASSED_ENV.contains(&key), "{key} is not passed on");
            assert_eq!(std::env::var_os(key).as_deref(), Some(value));
        }
        // The same snapshot every time.
        assert!(std::ptr::eq(env(), env()));
    }
}
