//! One-off commands (`em run`, docs/src/design/processes.md): the request `em` sends Beacon,
//! the frames `em` and Beacon exchange on the upgraded connection, and the frames Beacon and
//! Maestro exchange on the control link, keyed by a run id. Both legs use [`crate::codec`].
//!
//! Flow control: bytes travel in chunks of at most [`MAX_RUN_CHUNK_BYTES`], and a sender
//! keeps at most [`RUN_WINDOW_BYTES`] unacknowledged per run and direction on the control
//! link ([`NodeRunFrame::Ack`], [`RunFromNode::Ack`]). A slow reader therefore stops the
//! process's writes (its pipe or terminal fills) instead of growing a buffer anywhere, and
//! the link never waits on one run.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The `Upgrade:` protocol name of `POST /v1/apps/{app}/run`.
pub const RUN_UPGRADE: &str = "px-run";
/// Largest chunk of input or output in one frame. 16 KiB is what a terminal or a pipe hands
/// over at once; as JSON (an array of numbers) a frame stays well under the codec's limit.
pub const MAX_RUN_CHUNK_BYTES: usize = 16 * 1024;
/// Bytes of one run in flight on the control link per direction before the sender waits for
/// an acknowledgement: 16 chunks keep a fast stream moving over a link with latency, and
/// bound what Beacon and Maestro hold per run.
pub const RUN_WINDOW_BYTES: usize = 16 * MAX_RUN_CHUNK_BYTES;
/// Frames queued per run inside Beacon or Maestro. The window already bounds the bytes;
/// a peer that sends more frames than this ignored the window and its run is ended.
pub const RUN_QUEUE_FRAMES: usize = 64;
/// Runs at once on one node: each is a process and a few tasks; more is a misuse.
pub const MAX_RUNS_PER_NODE: usize = 32;
/// Runs at once of one app across the cluster, so one app cannot take every node's slots.
pub const MAX_RUNS_PER_APP: usize = 16;
/// Longest a run may last: a shell left open over a working day and a night is ended.
pub const MAX_RUN_DURATION: Duration = Duration::from_secs(24 * 60 * 60);
/// Most words in a run's command, and most bytes in all of them: a command line, not a file.
pub const MAX_RUN_ARGS: usize = 1024;
pub const MAX_RUN_COMMAND_BYTES: usize = 64 * 1024;

/// A terminal's size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowSize {
    pub rows: u16,
    pub cols: u16,
}

/// The body of `POST /v1/apps/{app}/run`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    /// The command and its arguments, run without a shell (`sh -c '...'` for one).
    pub command: Vec<String>,
    /// Run it under a pseudo-terminal (em's stdin is a terminal).
    #[serde(default)]
    pub tty: bool,
    /// The terminal's size, for a `tty` run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<WindowSize>,
    /// Send the output to the app's logs (`run.N`) and answer at once.
    #[serde(default)]
    pub detach: bool,
}

/// Why a [`RunRequest`] is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunRequestError {
    #[error("the command is empty; give one after `--`")]
    Empty,
    #[error("the command has {0} words; at most {MAX_RUN_ARGS} are allowed")]
    TooManyArgs(usize),
    #[error("the command is {0} bytes long; at most {MAX_RUN_COMMAND_BYTES} are allowed")]
    TooLong(usize),
    #[error("the command holds a NUL byte")]
    Nul,
}

impl RunRequest {
    /// Checks the limits a hostile client could break.
    pub fn validate(&self) -> Result<(), RunRequestError> {
        if self.command.is_empty() || self.command[0].is_empty() {
            return Err(RunRequestError::Empty);
        }
        if self.command.len() > MAX_RUN_ARGS {
            return Err(RunRequestError::TooManyArgs(self.command.len()));
        }
        let bytes: usize = self.command.iter().map(String::len).sum();
        if bytes > MAX_RUN_COMMAND_BYTES {
            return Err(RunRequestError::TooLong(bytes));
        }
        if self.command.iter().any(|w| w.contains('\0')) {
            return Err(RunRequestError::Nul);
        }
        Ok(())
    }
}

/// Which output pipe a chunk came from (a terminal has only `Stdout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// A signal `em` may forward. Only these: a run is no way to send an arbitrary signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum RunSignal {
    Int,
    Term,
    Hup,
    Quit,
    Kill,
}

/// How the run's process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunExit {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
}

impl RunExit {
    /// The exit code a shell would give: the code, or 128 + the signal.
    pub fn shell_code(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(code), _) => code,
            (None, Some(signal)) => 128 + signal,
            (None, None) => 1,
        }
    }
}

/// A frame from `em` to Beacon after the upgrade.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RunFromEm {
    Input {
        data: Vec<u8>,
    },
    Resize {
        size: WindowSize,
    },
    Signal {
        signal: RunSignal,
    },
    /// `em`'s stdin ended: the process's stdin is closed (pipes only).
    Eof,
    /// The user is leaving: the run is hung up.
    Close,
}

/// A frame from Beacon to `em` after the upgrade.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RunToEm {
    /// The process started: its run number (`run.N` in the logs), node and release.
    Started {
        run: u64,
        node: String,
        release: u64,
    },
    Output {
        stream: OutputStream,
        data: Vec<u8>,
    },
    /// The process ended; the last frame.
    Exited(RunExit),
    /// The run ended without an exit status (it could not start, or its node was lost).
    Failed {
        message: String,
    },
}

/// What Beacon asks a node to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunStart {
    pub run: u64,
    pub app: String,
    /// The release Beacon expects the node to run; the node refuses when it has another.
    pub release: u64,
    pub command: Vec<String>,
    #[serde(default)]
    pub tty: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<WindowSize>,
    #[serde(default)]
    pub detach: bool,
}

/// A run frame from Beacon to a Maestro (`FromBeacon::Run`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum NodeRunFrame {
    Start(RunStart),
    Input {
        run: u64,
        data: Vec<u8>,
    },
    Resize {
        run: u64,
        size: WindowSize,
    },
    Signal {
        run: u64,
        signal: RunSignal,
    },
    Eof {
        run: u64,
    },
    /// Hang up: SIGHUP, then SIGTERM and SIGKILL after a grace.
    Close {
        run: u64,
    },
    /// `bytes` of output were delivered to `em`.
    Ack {
        run: u64,
        bytes: u64,
    },
}

impl NodeRunFrame {
    pub fn run(&self) -> u64 {
        match self {
            Self::Start(start) => start.run,
            Self::Input { run, .. }
            | Self::Resize { run, .. }
            | Self::Signal { run, .. }
            | Self::Eof { run }
            | Self::Close { run }
            | Self::Ack { run, .. } => *run,
        }
    }
}

/// A run frame from a Maestro to Beacon (`ToBeacon::Run`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum RunFromNode {
    Started {
        run: u64,
        pid: u32,
    },
    Output {
        run: u64,
        stream: OutputStream,
        data: Vec<u8>,
    },
    /// `bytes` of input were written to the process.
    Ack {
        run: u64,
        bytes: u64,
    },
    Exited {
        run: u64,
        #[serde(flatten)]
        exit: RunExit,
    },
    /// The run could not start (no such app or release here, a full node).
    Failed {
        run: u64,
        message: String,
    },
}

impl RunFromNode {
    pub fn run(&self) -> u64 {
        match self {
            Self::Started { run, .. }
            | Self::Output { run, .. }
            | Self::Ack { run, .. }
            | Self::Exited { run, .. }
            | Self::Failed { run, .. } => *run,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_over_the_limits_are_refused_with_a_reason() {
        let ok = RunRequest {
            command: vec!["sh".into(), "-c".into(), "echo hi".into()],
            tty: false,
            size: None,
            detach: false,
        };
        assert_eq!(ok.validate(), Ok(()));
        let empty = RunRequest {
            command: vec![],
            ..ok.clone()
        };
        assert_eq!(empty.validate(), Err(RunRequestError::Empty));
        let long = RunRequest {
            command: vec!["x".repeat(MAX_RUN_COMMAND_BYTES + 1)],
            ..ok.clone()
        };
        assert!(matches!(long.validate(), Err(RunRequestError::TooLong(_))));
        let many = RunRequest {
            command: vec!["x".into(); MAX_RUN_ARGS + 1],
            ..ok.clone()
        };
        assert!(matches!(
            many.validate(),
            Err(RunRequestError::TooManyArgs(_))
        ));
        let nul = RunRequest {
            command: vec!["a\0b".into()],
            ..ok
        };
        assert_eq!(nul.validate(), Err(RunRequestError::Nul));
    }

    #[test]
    fn frames_have_a_stable_shape_and_a_full_chunk_fits_a_frame() {
        let exit = RunFromNode::Exited {
            run: 7,
            exit: RunExit {
                code: Some(3),
                signal: None,
            },
        };
        assert_eq!(
            serde_json::to_value(&exit).unwrap(),
            serde_json::json!({"op": "exited", "run": 7, "code": 3})
        );
        let chunk = RunFromNode::Output {
            run: u64::MAX,
            stream: OutputStream::Stderr,
            data: vec![255; MAX_RUN_CHUNK_BYTES],
        };
        let bytes = serde_json::to_vec(&chunk).unwrap();
        assert!(bytes.len() < crate::codec::MAX_FRAME_BYTES);
        let signal = serde_json::to_value(RunFromEm::Signal {
            signal: RunSignal::Int,
        })
        .unwrap();
        assert_eq!(
            signal,
            serde_json::json!({"type": "signal", "signal": "INT"})
        );
    }

    #[test]
    fn a_signal_exit_maps_to_128_plus_the_signal() {
        let by_signal = RunExit {
            code: None,
            signal: Some(2),
        };
        assert_eq!(by_signal.shell_code(), 130);
        let by_code = RunExit {
            code: Some(3),
            signal: None,
        };
        assert_eq!(by_code.shell_code(), 3);
    }
}
