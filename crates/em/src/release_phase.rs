//! `em deploy`'s wait for a release's release phase (docs/src/design/processes.md): its output
//! live from Beacon's log stream (the lines of process `release` of the release), its end from
//! apprepo, which `em deploy` asks on an interval as well as on Beacon's phase events, so a
//! lost event only delays it. A failure exits 1 with the phase's last lines and says which
//! release still serves.

use std::time::Duration;

use px_proto::api::{App, PhaseState, Release};
use px_proto::beacon::{Event, EventKind, LogEntry};

use crate::client::{Client, Feed};
use crate::deploy::{
    BUILD_POLL, FAILING_LINES, OUTPUT_INDENT, STEP, ShownLines, drain_output, last_lines,
    next_line, superseded,
};
use crate::failure::{Failure, Result};

/// Whether a line of the app's output is release `version`'s phase speaking.
fn is_phase_line(line: &LogEntry, version: u64) -> bool {
    line.release == version && line.process.as_deref() == Some(PHASE_PROCESS)
}

/// Time over the phase's own timeout before `em deploy` stops waiting: for the node to get
/// the order, prepare the release and report the end.
pub const PHASE_SLACK: Duration = Duration::from_secs(120);
/// Lines of the app's recent output read when the stream opens, so the phase's first lines,
/// printed before `em deploy` learnt of the phase, are shown too: as many as Beacon keeps.
const BACKLOG_LINES: usize = 1000;
/// Events about the release kept for the rollout while the phase runs.
const EARLY_EVENTS: usize = 1000;
/// The process type the phase's lines carry (Maestro marks them so).
const PHASE_PROCESS: &str = px_proto::process::RELEASE_PHASE;

pub(crate) struct PhaseWatch<'a> {
    client: &'a Client,
    app: &'a str,
    version: u64,
    output: Option<Feed<LogEntry>>,
    /// The phase's lines as shown, and its last ones for a failure.
    lines: ShownLines,
}

impl<'a> PhaseWatch<'a> {
    /// Opens the app's log stream and says that the phase runs first.
    pub(crate) async fn open(
        client: &'a Client,
        app: &'a str,
        release: &Release,
        quiet: bool,
    ) -> PhaseWatch<'a> {
        let url = client.beacon(&format!("/v1/apps/{app}/logs/stream?lines={BACKLOG_LINES}"));
        let output = match Feed::<LogEntry>::open(client, &url).await {
            Ok(feed) => Some(feed),
            Err(failure) => {
                if !quiet {
                    eprintln!("(the release phase's output cannot be shown: {failure})");
                }
                None
            }
        };
        if !quiet && let Some(phase) = &release.phase {
            eprintln!(
                "{STEP} release phase of v{}: {} (timeout {}s)",
                release.version, phase.command, phase.timeout_secs
            );
        }
        PhaseWatch {
            client,
            app,
            version: release.version,
            output,
            lines: ShownLines::new(quiet),
        }
    }

    /// Shows the phase's output until it ends; on success the rollout follows, and the events
    /// about the release seen meanwhile are kept in `early` for it.
    pub(crate) async fn follow(
        &mut self,
        events: &mut Feed<Event>,
        early: &mut Vec<Event>,
        timeout: Duration,
    ) -> Result<()> {
        let deadline = tokio::time::sleep(timeout + PHASE_SLACK);
        tokio::pin!(deadline);
        let mut poll = tokio::time::interval(BUILD_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let ended = tokio::select! {
                _ = &mut deadline => return Err(Failure::failed(format!(
                    "{} v{}'s release phase did not end within {}s; it may still run (`em status`), and the old release keeps serving until it succeeds",
                    self.app,
                    self.version,
                    (timeout + PHASE_SLACK).as_secs()
                ))),
                _ = poll.tick() => self.ask_apprepo().await?,
                line = next_line(&mut self.output) => {
                    if let Some(line) = line {
                        self.show(line);
                    }
                    false
                }
                event = events.next() => {
                    let event = event.map_err(|end| Failure::failed(format!(
                        "Beacon's event stream was {end}; the release phase goes on, see `em status`"
                    )))?;
                    self.on_event(event, early).await?
                }
            };
            if ended {
                return Ok(());
            }
        }
    }

    fn mine(&self, line: &LogEntry) -> bool {
        is_phase_line(line, self.version)
    }

    /// Prints a line of the phase's output (any other line of the app is skipped) and keeps it.
    fn show(&mut self, line: LogEntry) {
        if self.mine(&line) {
            self.lines.show(line.line);
        }
    }

    /// Shows what is left of the output once the phase's end is known.
    async fn drain_output(&mut self) {
        let version = self.version;
        let lines = &mut self.lines;
        drain_output(&mut self.output, |line| {
            if is_phase_line(&line, version) {
                lines.show(line.line);
            }
        })
        .await;
    }

    /// Acts on an event: one about the phase may end it; others about the release are kept.
    async fn on_event(&mut self, event: Event, early: &mut Vec<Event>) -> Result<bool> {
        if event.release != Some(self.version) || event.build.is_some() {
            return Ok(false);
        }
        match event.kind {
            EventKind::PhaseStarted => {
                if !self.lines.quiet {
                    match &event.node {
                        Some(node) => eprintln!("{STEP} running on {node}"),
                        None => eprintln!("{STEP} {}", event.message),
                    }
                }
                Ok(false)
            }
            // apprepo has the word on how it ended.
            EventKind::PhaseSucceeded | EventKind::PhaseFailed => self.ask_apprepo().await,
            EventKind::DeploySuperseded => Err(superseded(&event.message)),
            _ => {
                if early.len() < EARLY_EVENTS {
                    early.push(event);
                }
                Ok(false)
            }
        }
    }

    /// How the phase stands in apprepo: `true` once it succeeded, its failure or supersession
    /// as an error; `false` while it runs or when apprepo cannot say.
    async fn ask_apprepo(&mut self) -> Result<bool> {
        let url = self
            .client
            .repo(&format!("/v1/apps/{}/releases/{}", self.app, self.version));
        let Ok(release) = self.client.get::<Release>(&url).await else {
            return Ok(false);
        };
        match release.phase.map(|p| p.state) {
            None | Some(PhaseState::Succeeded) => {
                self.drain_output().await;
                if !self.lines.quiet {
                    eprintln!("{STEP} release phase of v{} succeeded", self.version);
                }
                Ok(true)
            }
            Some(PhaseState::Pending | PhaseState::Running { .. }) => Ok(false),
            Some(PhaseState::Failed { reason }) => Err(self.failed(&reason).await),
            Some(PhaseState::Superseded { by }) => Err(superseded(&format!(
                "{} v{}'s release phase was superseded by {by} before it ran",
                self.app, self.version
            ))),
        }
    }

    /// The failure: the reason, the phase's last lines (apprepo's log, else what was shown
    /// here), and the release that still serves.
    async fn failed(&mut self, reason: &str) -> Failure {
        self.drain_output().await;
        let url = self.client.repo(&format!(
            "/v1/apps/{}/releases/{}/phase/log",
            self.app, self.version
        ));
        let mut lines: Vec<String> = match self.client.get_text(&url).await {
            Ok(log) => last_lines(&log, FAILING_LINES),
            Err(_) => Vec::new(),
        };
        if lines.is_empty() {
            lines = self.lines.tail.iter().cloned().collect();
        }
        let quoted = if lines.is_empty() {
            String::new()
        } else {
            format!(
                "\nlast lines of the release phase's output:\n{}",
                lines
                    .iter()
                    .map(|l| format!("{OUTPUT_INDENT}{l}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        };
        let app_url = self.client.repo(&format!("/v1/apps/{}", self.app));
        let serving = match self.client.get::<App>(&app_url).await {
            Ok(App {
                current: Some(current),
                ..
            }) => format!("v{} still serves", current.version),
            _ => "the app's earlier release, if any, still serves".into(),
        };
        Failure::failed(format!(
            "{} v{}'s release phase failed: {reason}{quoted}\n{serving}; v{} never goes live. Fix the release command (or what it migrates) and run `em deploy` again",
            self.app, self.version, self.version
        ))
    }
}
