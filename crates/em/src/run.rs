//! `em run`: a one-off command of an app's current release on a node that runs it, its
//! input and output attached to this terminal through Beacon (`POST /v1/apps/{app}/run`,
//! upgraded to `px-run` frames). Under a terminal the local one goes to raw mode, restored on
//! every way out, and its size follows SIGWINCH; `em` exits with the command's code.

use std::io::IsTerminal;

use futures_util::{SinkExt, StreamExt};
use px_proto::codec::FrameCodec;
use px_proto::run::{
    MAX_RUN_CHUNK_BYTES, OutputStream, RUN_UPGRADE, RunFromEm, RunRequest, RunSignal, RunToEm,
    WindowSize,
};
use reqwest::header;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio_util::codec::Framed;

use crate::client::{Client, refusal};
use crate::failure::{Failure, Result};

/// Chunks of stdin read ahead of the connection: the reader thread waits when they are not
/// taken, so a fast stdin (a file) never grows memory.
pub const STDIN_QUEUE: usize = 16;

/// The local terminal in raw mode until dropped: keys go to the remote command as typed
/// (Ctrl-C included), and nothing is echoed twice.
struct RawMode {
    saved: rustix::termios::Termios,
}

impl RawMode {
    fn enter() -> Option<Self> {
        let stdin = std::io::stdin();
        let saved = rustix::termios::tcgetattr(&stdin).ok()?;
        let mut raw = saved.clone();
        raw.make_raw();
        rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &raw).ok()?;
        Some(Self { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = rustix::termios::tcsetattr(
            std::io::stdin(),
            rustix::termios::OptionalActions::Now,
            &self.saved,
        );
    }
}

fn window_size() -> Option<WindowSize> {
    let size = rustix::termios::tcgetwinsize(std::io::stdout())
        .or_else(|_| rustix::termios::tcgetwinsize(std::io::stdin()))
        .ok()?;
    Some(WindowSize {
        rows: size.ws_row,
        cols: size.ws_col,
    })
}

/// Reads stdin on a thread of its own (a read of a terminal cannot be cancelled, and must not
/// hold the runtime at exit); `None` at its end.
fn stdin_chunks() -> mpsc::Receiver<Option<Vec<u8>>> {
    let (tx, rx) = mpsc::channel(STDIN_QUEUE);
    std::thread::spawn(move || {
        use std::io::Read;
        let mut stdin = std::io::stdin();
        let mut buf = vec![0u8; MAX_RUN_CHUNK_BYTES];
        loop {
            let chunk = match stdin.read(&mut buf) {
                Ok(0) | Err(_) => None,
                Ok(n) => Some(buf[..n].to_vec()),
            };
            let end = chunk.is_none();
            if tx.blocking_send(chunk).is_err() || end {
                return;
            }
        }
    });
    rx
}

/// The exit code of `em` for the remote command's own (128 + a signal, as a shell does).
fn exit_code(code: i32) -> u8 {
    u8::try_from(code).unwrap_or(if code < 0 { 1 } else { 255 })
}

pub async fn run(client: &Client, app: &str, command: Vec<String>, detach: bool) -> Result<()> {
    if command.is_empty() {
        return Err(Failure::usage(
            "which command? give it after `--`: em run -- python manage.py shell",
        ));
    }
    let tty = !detach && std::io::stdin().is_terminal();
    let request = RunRequest {
        command,
        tty,
        size: tty.then(window_size).flatten(),
        detach,
    };
    let url = client.beacon(&format!("/v1/apps/{app}/run"));
    let response = client
        .send(&url, |http, url| {
            let builder = http.post(url).json(&request);
            if detach {
                builder
            } else {
                builder
                    .header(header::CONNECTION, "upgrade")
                    .header(header::UPGRADE, RUN_UPGRADE)
            }
        })
        .await?;
    let status = response.status();
    if detach {
        if !status.is_success() {
            return Err(refusal(status, response.text().await.unwrap_or_default()));
        }
        let started: RunToEm = response
            .json()
            .await
            .map_err(|e| Failure::failed(format!("unexpected answer from {url}: {e}")))?;
        if let RunToEm::Started { run, node, release } = started {
            println!(
                "run.{run} of {app} v{release} started on {node}; its output goes to the app's logs:\n  em logs -f --app {app}"
            );
        }
        return Ok(());
    }
    if status != reqwest::StatusCode::SWITCHING_PROTOCOLS {
        return Err(refusal(status, response.text().await.unwrap_or_default()));
    }
    let upgraded = response
        .upgrade()
        .await
        .map_err(|e| Failure::failed(format!("beacon did not open the run: {e}")))?;
    let beacon = Framed::new(upgraded, FrameCodec::<RunToEm, RunFromEm>::new());
    // Raw mode only once the run is open, and restored when this guard goes, whatever the
    // way out (an error, a signal, the end).
    let raw = if tty { RawMode::enter() } else { None };
    let result = relay(beacon, tty).await;
    drop(raw);
    match result? {
        0 => Ok(()),
        code => Err(Failure::new(exit_code(code), "")),
    }
}

fn write_out(stream: OutputStream, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    match stream {
        OutputStream::Stdout => {
            let mut out = std::io::stdout().lock();
            out.write_all(data)?;
            out.flush()
        }
        OutputStream::Stderr => {
            let mut err = std::io::stderr().lock();
            err.write_all(data)?;
            err.flush()
        }
    }
}

/// Relays until the command ends; its exit code.
async fn relay<S>(mut beacon: Framed<S, FrameCodec<RunToEm, RunFromEm>>, tty: bool) -> Result<i32>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let lost = || Failure::failed("the connection to beacon dropped; the command was hung up");
    let mut stdin = stdin_chunks();
    let mut stdin_open = true;
    let mut winch = signal(SignalKind::window_change())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut hangup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            frame = beacon.next() => match frame {
                // Written in place: a terminal or pipe that does not take it stops this loop,
                // which stops the acknowledgements, which stops the remote command's output.
                Some(Ok(RunToEm::Output { stream, data })) => write_out(stream, &data)?,
                Some(Ok(RunToEm::Started { .. })) => {}
                Some(Ok(RunToEm::Exited(exit))) => return Ok(exit.shell_code()),
                Some(Ok(RunToEm::Failed { message })) => return Err(Failure::failed(message)),
                Some(Err(_)) | None => return Err(lost()),
            },
            chunk = stdin.recv(), if stdin_open => {
                let frame = match chunk.flatten() {
                    Some(data) => RunFromEm::Input { data },
                    None => {
                        stdin_open = false;
                        RunFromEm::Eof
                    }
                };
                beacon.send(frame).await.map_err(|_| lost())?;
            }
            _ = winch.recv(), if tty => {
                if let Some(size) = window_size() {
                    beacon.send(RunFromEm::Resize { size }).await.map_err(|_| lost())?;
                }
            }
            // Without a terminal, Ctrl-C reaches em itself: the command gets it instead.
            _ = interrupt.recv() => {
                beacon.send(RunFromEm::Signal { signal: RunSignal::Int }).await.map_err(|_| lost())?;
            }
            _ = terminate.recv() => {
                let _ = beacon.send(RunFromEm::Close).await;
                return Err(Failure::new(128 + 15, "terminated; the command was hung up"));
            }
            _ = hangup.recv() => {
                let _ = beacon.send(RunFromEm::Close).await;
                return Err(Failure::new(128 + 1, "hung up; so was the command"));
            }
        }
    }
}
