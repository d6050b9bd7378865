//! The capabilities this process holds, read from `/proc`, and the `setpriv` words that start a
//! child without them. `maestro.service` gives Maestro a few capabilities as ambient ones
//! (`CAP_SETUID`, `CAP_SETGID`, `CAP_CHOWN`, `CAP_KILL`) so that the `setpriv` in an app's
//! start chain can switch to the app's own uid; ambient capabilities pass to every child a
//! process starts, so every other child (a version probe, an installer run outside the
//! sandbox) starts through [`command`], which drops them before its program runs.

use std::ffi::{OsStr, OsString};
use std::path::PathBuf;

/// `CAP_CHOWN`: give a file to another user (an app's data directory to the app's uid).
pub const CAP_CHOWN: u32 = 0;
/// `CAP_KILL`: signal a process of another user (an app's processes, to stop them).
pub const CAP_KILL: u32 = 5;
/// `CAP_SETGID`: set the group ids and the supplementary groups of a process.
pub const CAP_SETGID: u32 = 6;
/// `CAP_SETUID`: set the user ids of a process.
pub const CAP_SETUID: u32 = 7;

/// Where a thread's capability sets are shown.
const STATUS_FILE: &str = "/proc/thread-self/status";
/// Where `setpriv` is when it is not on `PATH` (util-linux, in every Debian).
const SETPRIV_FALLBACK: &str = "/usr/bin/setpriv";
/// `setpriv`'s arguments that empty the ambient and inheritable sets, so the program it starts
/// holds no capability (an unprivileged user's exec keeps only the ambient ones).
pub const DROP_ARGS: &[&str] = &["--ambient-caps=-all", "--inh-caps=-all"];

/// The capability sets of the calling thread, as bit masks (bit `n` is capability `n`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CapSets {
    pub inheritable: u64,
    pub permitted: u64,
    pub effective: u64,
    pub ambient: u64,
}

impl CapSets {
    /// The sets of this thread; all empty when `/proc` cannot tell (no capability is assumed).
    pub fn current() -> Self {
        std::fs::read_to_string(STATUS_FILE)
            .map(|status| Self::parse(&status))
            .unwrap_or_default()
    }

    /// The sets a `/proc/<pid>/status` text shows (`CapInh:`, `CapPrm:`, `CapEff:`, `CapAmb:`).
    pub fn parse(status: &str) -> Self {
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|value| u64::from_str_radix(value.trim(), 16).ok())
                .unwrap_or(0)
        };
        Self {
            inheritable: field("CapInh:"),
            permitted: field("CapPrm:"),
            effective: field("CapEff:"),
            ambient: field("CapAmb:"),
        }
    }

    /// Whether `cap` is in the effective set.
    pub fn has(&self, cap: u32) -> bool {
        self.effective & (1 << cap) != 0
    }
}

/// What starting children as other users takes: switching (`CAP_SETUID`, `CAP_SETGID`),
/// giving them their directories (`CAP_CHOWN`) and stopping them (`CAP_KILL`).
pub const SWITCH_CAPS: [u32; 4] = [CAP_SETUID, CAP_SETGID, CAP_CHOWN, CAP_KILL];

/// Whether this process may start children as other users, and stop them: it is root, or it
/// holds every capability of [`SWITCH_CAPS`].
pub fn can_switch_users() -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    let sets = CapSets::current();
    SWITCH_CAPS.iter().all(|cap| sets.has(*cap))
}

/// `setpriv`: from `PATH`, else where util-linux puts it.
pub fn setpriv() -> PathBuf {
    crate::sandbox::find_on_path("setpriv").unwrap_or_else(|| PathBuf::from(SETPRIV_FALLBACK))
}

/// A command for `program` that runs it without this process's ambient capabilities: through
/// `setpriv` with [`DROP_ARGS`] when there are any, as is otherwise.
pub fn command(program: impl AsRef<OsStr>) -> std::process::Command {
    command_with(CapSets::current().ambient != 0, program.as_ref())
}

fn command_with(drop: bool, program: &OsStr) -> std::process::Command {
    if !drop {
        return std::process::Command::new(program);
    }
    let mut command = std::process::Command::new(setpriv());
    command.args(DROP_ARGS).arg("--").arg(program);
    command
}

/// The words of [`command`] before `program` (none without ambient capabilities), for a
/// command line assembled as words.
pub fn drop_words() -> Vec<OsString> {
    if CapSets::current().ambient == 0 {
        return Vec::new();
    }
    let mut words = vec![setpriv().into_os_string()];
    words.extend(DROP_ARGS.iter().map(OsString::from));
    words.push("--".into());
    words
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_sets_are_read_from_a_status_text() {
        let status = "Name:\tmaestro\nCapInh:\t00000000000000e1\nCapPrm:\t00000000000000e1\nCapEff:\t00000000000000e1\nCapBnd:\t00000000000000e1\nCapAmb:\t00000000000000e1\n";
        let sets = CapSets::parse(status);
        assert_eq!(sets.ambient, 0xe1);
        for cap in [CAP_CHOWN, CAP_KILL, CAP_SETGID, CAP_SETUID] {
            assert!(sets.has(cap), "{cap}");
        }
        assert!(!sets.has(1), "CAP_DAC_OVERRIDE is not held");
        assert_eq!(CapSets::parse("Name:\tx\n"), CapSets::default());
    }

    #[test]
    fn a_command_drops_ambient_capabilities_through_setpriv_only_when_there_are_any() {
        let plain = command_with(false, OsStr::new("python3"));
        assert_eq!(plain.get_program(), "python3");
        let dropped = command_with(true, OsStr::new("python3"));
        let args: Vec<&OsStr> = dropped.get_args().collect();
        assert!(dropped.get_program().to_string_lossy().ends_with("setpriv"));
        assert_eq!(
            args,
            ["--ambient-caps=-all", "--inh-caps=-all", "--", "python3"]
        );
    }

    #[test]
    fn a_child_started_through_setpriv_with_ambient_capabilities_holds_none() {
        // Needs root to give a child ambient capabilities in the first place.
        if !rustix::process::geteuid().is_root() {
            return;
        }
        let status = std::process::Command::new(setpriv())
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=+setuid,+setgid,+chown,+kill",
                "--ambient-caps=+setuid,+setgid,+chown,+kill",
                "--",
                "cat",
                "/proc/self/status",
            ])
            .output()
            .unwrap();
        let holding = CapSets::parse(&String::from_utf8_lossy(&status.stdout));
        assert_eq!(holding.ambient, 0xe1, "the test's child holds them");
        let output = std::process::Command::new(setpriv())
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=+setuid,+setgid,+chown,+kill",
                "--ambient-caps=+setuid,+setgid,+chown,+kill",
                "--",
            ])
            .arg(setpriv())
            .args(DROP_ARGS)
            .args(["--", "cat", "/proc/self/status"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout);
        let sets = CapSets::parse(&text);
        assert!(text.contains("CapAmb:"), "{text}");
        assert_eq!(sets, CapSets::default(), "{text}");
    }
}
