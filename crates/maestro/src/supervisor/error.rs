//! `DeployError`: every way a release can fail to deploy on this node, classified, and
//! [`DeployError::event`], the one place that turns such a failure into the "deploy failed"
//! event Beacon records and `em deploy` shows.

use std::io;
use std::path::PathBuf;

use px_proto::link::{FailureKind, NodeEvent, NodeEventKind};
use px_proto::size::ByteSize;

use super::shared::app_event;
use crate::process::StartFailure;

/// Why a release did not deploy on this node (the previous one, if any, keeps serving). The
/// messages are what users read in the event, after `<app> v<n> not deployed on <node>: `
/// and the like (see [`DeployError::event`]).
#[derive(Debug, thiserror::Error)]
pub(crate) enum DeployError {
    /// A directory or file of the release store could not be made or written.
    #[error("{doing} {}: {source}", .path.display())]
    Storage {
        doing: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// The release would take the disk under `min_free_disk`.
    #[error(
        "not enough disk: {free} free under {}, this release needs about {needed} and Maestro keeps {floor} free (min_free_disk); free some space (old releases, logs) or lower min_free_disk",
        .dir.display()
    )]
    NotEnoughDisk {
        free: ByteSize,
        dir: PathBuf,
        needed: ByteSize,
        floor: ByteSize,
    },
    /// The repository could not be reached, or the transfer broke off.
    #[error("downloading {url}: {source}")]
    Download { url: String, source: reqwest::Error },
    /// The repository answered, but not with the bundle or layer.
    #[error("downloading {url}: {status}")]
    DownloadRefused {
        url: String,
        status: reqwest::StatusCode,
    },
    /// The bundle or layer (`what`) is larger than Maestro downloads, or than it was said to be.
    #[error("{what} larger than {limit} bytes")]
    TooLarge { what: String, limit: u64 },
    /// The bytes downloaded are not the bundle or layer (`what`) Beacon assigned.
    #[error("{what} digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    /// What the build of a release says its instances need cannot be used on this node (a
    /// layer digest that is no digest, a `PATH` entry leaving the release, a variable the
    /// platform sets itself).
    #[error("the release's build output is unusable: {0}")]
    BadBuild(String),
    /// The bundle could not be unpacked (a bad bundle, or the disk).
    #[error("unpacking: {0}")]
    Unpack(#[source] px_bundle::BundleError),
    /// The downloaded bundle could not be opened again to unpack it.
    #[error("unpacking: {0}")]
    ReadDownload(#[source] io::Error),
    /// The unpacking thread panicked.
    #[error("{0}")]
    UnpackTask(#[source] tokio::task::JoinError),
    /// The node lacks the runtime or a command the release needs (`runtime`, `requires`).
    #[error("{0}")]
    RuntimeUnmet(String),
    /// Every port of `port_range` is taken.
    #[error("no free port in the configured range")]
    NoFreePort,
    /// The instance's command could not be spawned.
    #[error("cannot start: {0}")]
    CannotStart(#[source] io::Error),
    /// The instance ran but never passed its health check (or exited first).
    #[error("{0}")]
    NeverHealthy(StartFailure),
    /// The instance was ended by the OOM killer at its `[limits] memory` before it was healthy.
    #[error("{0}: it ran out of memory (the kernel's OOM killer ended it at its [limits] memory)")]
    OutOfMemory(StartFailure),
}

/// The step of a deploy that failed, which is what the event's sentence names.
enum Step {
    /// Getting the release onto the disk.
    Prepare,
    /// Checking the node has what the release needs.
    Requirements,
    /// Starting the release's instances.
    Instances,
}

impl DeployError {
    /// The failure as an instance failure, for the event's `failure` field. `None` when the
    /// release failed before any instance was started: there is no instance to classify, and
    /// Beacon's event log has always shown those without one.
    pub(crate) fn kind(&self) -> Option<FailureKind> {
        match self {
            Self::NoFreePort | Self::CannotStart(_) => Some(FailureKind::CannotStart),
            Self::NeverHealthy(failure) => Some(failure.kind()),
            Self::OutOfMemory(_) => Some(FailureKind::OutOfMemory),
            Self::Storage { .. }
            | Self::NotEnoughDisk { .. }
            | Self::Download { .. }
            | Self::DownloadRefused { .. }
            | Self::TooLarge { .. }
            | Self::DigestMismatch { .. }
            | Self::BadBuild(_)
            | Self::Unpack(_)
            | Self::ReadDownload(_)
            | Self::UnpackTask(_)
            | Self::RuntimeUnmet(_) => None,
        }
    }

    fn step(&self) -> Step {
        match self {
            Self::RuntimeUnmet(_) => Step::Requirements,
            // Every failure with an instance classified happened while starting instances.
            _ if self.kind().is_some() => Step::Instances,
            _ => Step::Prepare,
        }
    }

    /// The "deploy failed" event for release `release` of `app` on `node`, saying which release
    /// keeps serving (`serving`). When an instance was started, the detail is its last stderr
    /// lines (`stderr_tail`, read only then; an empty tail means no detail).
    pub(crate) fn event(
        &self,
        app: &str,
        release: u64,
        node: &str,
        serving: Option<u64>,
        stderr_tail: impl FnOnce() -> String,
    ) -> NodeEvent {
        let keeps = match serving {
            Some(serving) => format!("v{serving} keeps serving"),
            None => "nothing was serving before".to_string(),
        };
        let (message, detail) = match self.step() {
            Step::Prepare => (
                format!("{app} v{release} not deployed on {node}: {self}; {keeps}"),
                None,
            ),
            Step::Requirements => (
                format!("{app} v{release} not started on {node}: {self}; {keeps}"),
                None,
            ),
            Step::Instances => {
                let tail = stderr_tail();
                (
                    format!("{app} v{release} never became healthy: {self}; {keeps}"),
                    (!tail.is_empty()).then_some(tail),
                )
            }
        };
        app_event(
            NodeEventKind::DeployFailed,
            app,
            release,
            message,
            detail,
            self.kind(),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// The event of `error` for `shop` v3 on `node-a`, with v2 serving and `tail` as the stderr.
    fn event(error: &DeployError, serving: Option<u64>, tail: &str) -> NodeEvent {
        error.event("shop", 3, "node-a", serving, || tail.to_string())
    }

    #[test]
    fn a_release_that_never_reached_the_disk_is_not_deployed_and_carries_no_stderr() {
        let cases = [
            (
                DeployError::Storage {
                    doing: "creating",
                    path: PathBuf::from("/state/apps/shop/releases"),
                    source: io::Error::other("read-only file system"),
                },
                "creating /state/apps/shop/releases: read-only file system",
            ),
            (
                DeployError::NotEnoughDisk {
                    free: ByteSize(3 << 30),
                    dir: PathBuf::from("/state/apps/shop/releases"),
                    needed: ByteSize(1 << 20),
                    floor: ByteSize(4 << 30),
                },
                "not enough disk: 3GiB free under /state/apps/shop/releases, this release needs about 1MiB and Maestro keeps 4GiB free (min_free_disk); free some space (old releases, logs) or lower min_free_disk",
            ),
            (
                DeployError::DownloadRefused {
                    url: "http://repo/v1/bundles/ab".into(),
                    status: reqwest::StatusCode::UNAUTHORIZED,
                },
                "downloading http://repo/v1/bundles/ab: 401 Unauthorized",
            ),
            (
                DeployError::TooLarge {
                    what: "bundle".into(),
                    limit: 1024,
                },
                "bundle larger than 1024 bytes",
            ),
            (
                DeployError::DigestMismatch {
                    what: "bundle".into(),
                    expected: "aa".into(),
                    actual: "bb".into(),
                },
                "bundle digest mismatch: expected aa, got bb",
            ),
            (
                DeployError::DigestMismatch {
                    what: "dependencies layer".into(),
                    expected: "aa".into(),
                    actual: "bb".into(),
                },
                "dependencies layer digest mismatch: expected aa, got bb",
            ),
            (
                DeployError::BadBuild("PATH entry \"../bin\" leaves the release".into()),
                "the release's build output is unusable: PATH entry \"../bin\" leaves the release",
            ),
            (
                DeployError::Unpack(px_bundle::BundleError::MissingManifest),
                "unpacking: no app.toml at the bundle root; run `em init` or add one",
            ),
            (
                DeployError::ReadDownload(io::Error::other("gone")),
                "unpacking: gone",
            ),
        ];
        for (error, reason) in cases {
            let failed = event(&error, Some(2), "a stderr line");
            assert_eq!(
                failed.message,
                format!("shop v3 not deployed on node-a: {reason}; v2 keeps serving")
            );
            assert_eq!(failed.kind, NodeEventKind::DeployFailed);
            assert_eq!((failed.detail, failed.failure), (None, None), "{reason}");
        }
    }

    #[test]
    fn a_node_without_the_runtime_does_not_start_the_release() {
        let error = DeployError::RuntimeUnmet("needs python3>=99, found python3 3.11.2".into());
        let failed = event(&error, None, "a stderr line");
        assert_eq!(
            failed.message,
            "shop v3 not started on node-a: needs python3>=99, found python3 3.11.2; nothing was serving before"
        );
        assert_eq!((failed.detail, failed.failure), (None, None));
    }

    #[test]
    fn an_instance_that_never_became_healthy_carries_its_stderr_and_its_class() {
        let cases = [
            (
                DeployError::NoFreePort,
                "no free port in the configured range",
                FailureKind::CannotStart,
            ),
            (
                DeployError::CannotStart(io::Error::other("no such file")),
                "cannot start: no such file",
                FailureKind::CannotStart,
            ),
            (
                DeployError::NeverHealthy(StartFailure::NeverListened(
                    Duration::from_secs(5),
                    4000,
                )),
                "never listened on its port 4000 within 5s",
                FailureKind::NeverListened,
            ),
            (
                DeployError::NeverHealthy(StartFailure::Exited(
                    "exit code 3".into(),
                    FailureKind::ExitCode,
                )),
                "exited before becoming healthy (exit code 3)",
                FailureKind::ExitCode,
            ),
            (
                DeployError::OutOfMemory(StartFailure::Exited(
                    "killed by signal 9".into(),
                    FailureKind::Signal,
                )),
                "exited before becoming healthy (killed by signal 9): it ran out of memory (the kernel's OOM killer ended it at its [limits] memory)",
                FailureKind::OutOfMemory,
            ),
        ];
        for (error, reason, kind) in cases {
            let failed = event(&error, Some(2), "Traceback\nImportError: flask");
            assert_eq!(
                failed.message,
                format!("shop v3 never became healthy: {reason}; v2 keeps serving")
            );
            assert_eq!(
                failed.detail.as_deref(),
                Some("Traceback\nImportError: flask")
            );
            assert_eq!(failed.failure, Some(kind), "{reason}");
            // Without stderr there is no detail, rather than an empty one.
            assert_eq!(event(&error, Some(2), "").detail, None);
        }
    }
}
