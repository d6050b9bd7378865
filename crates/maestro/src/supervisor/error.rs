//! `DeployError`: every way a release can fail to deploy on this node, classified, and
//! [`DeployError::event`], the one place that turns such a failure into the "deploy failed"
//! event Beacon records and `em deploy` shows.

use std::io;
use std::path::PathBuf;

use px_proto::link::{FailureKind, NodeEvent, NodeEventKind};
use px_proto::size::ByteSize;

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
    /// The repository answered, but not with the bundle.
    #[error("downloading {url}: {status}")]
    DownloadRefused {
        url: String,
        status: reqwest::StatusCode,
    },
    /// The bundle is larger than Maestro downloads.
    #[error("bundle larger than {limit} bytes")]
    TooLarge { limit: u64 },
    /// The bytes downloaded are not the bundle Beacon assigned.
    #[error("bundle digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch { expected: String, actual: String },
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
        NodeEvent {
            kind: NodeEventKind::DeployFailed,
            app: app.into(),
            release,
            message,
            detail,
            instance: None,
            level: None,
            failure: self.kind(),
        }
    }
}

