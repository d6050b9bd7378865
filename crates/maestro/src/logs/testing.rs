//! What the logs' tests share: a deadline, and reading back the files they wrote.

use std::path::Path;
use std::time::Duration;

/// Generous bound for anything that should happen promptly; only reached when broken.
pub(super) const DEADLINE: Duration = Duration::from_secs(30);

pub(super) fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap()
}

pub(super) fn lines_of(path: &Path) -> Vec<String> {
    read(path).lines().map(str::to_string).collect()
}
