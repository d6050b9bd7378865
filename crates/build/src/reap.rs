//! Finding what is left of a build command after it was killed (its process group, and
//! bubblewrap's child, the sandbox's init, in a session of its own) and waiting until it is
//! gone, from `/proc`.

use std::time::Duration;

use tokio::time::Instant;

/// How long a killed command's processes may take to be gone: the kernel ends a PID
/// namespace's members once its init dies, which takes milliseconds; this bounds a stuck one.
const EXIT_WAIT: Duration = Duration::from_secs(5);

/// The processes of process group `pgid`, from `/proc`.
pub(crate) fn group_members(pgid: u32) -> Vec<u32> {
    let Ok(listing) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    listing
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| stat_fields(*pid).is_some_and(|(_, _, pgrp)| pgrp == pgid))
        .collect()
}

/// The children of `pid` (bwrap's is the sandbox's init, in another session).
pub(crate) fn children_of(pid: u32) -> Vec<u32> {
    let Ok(listing) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    listing
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| stat_fields(*child).is_some_and(|(_, ppid, _)| ppid == pid))
        .collect()
}

/// A process's state, parent and process group from `/proc/<pid>/stat`.
fn stat_fields(pid: u32) -> Option<(char, u32, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (in parentheses) may hold spaces; the fields after it do not.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split(' ');
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some((state, ppid, pgrp))
}

/// Waits until none of `pids` runs any more (gone, or a zombie waiting for its reaper), at
/// most [`EXIT_WAIT`].
pub(crate) async fn wait_gone(pids: &[u32]) {
    let until = Instant::now() + EXIT_WAIT;
    while Instant::now() < until {
        let running = pids
            .iter()
            .any(|pid| stat_fields(*pid).is_some_and(|(state, _, _)| state != 'Z' && state != 'X'));
        if !running {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
