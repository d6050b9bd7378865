//! `em deploy`: pack the app, upload it with a progress line, then follow it on Beacon's
//! streams. An upload that needs a build shows the build's output live until the build makes
//! a release (or fails, with its last lines); then the rollout is followed until every node
//! serves the new release (or one fails). An app with an error budget
//! (`[deploy] max_error_rate`) is followed through its watch window too, and `em deploy` fails
//! if Beacon rolls it back. A deploy that a newer one supersedes says which and returns at
//! once, with an exit code of its own.

use std::collections::VecDeque;
use std::io::IsTerminal;
use std::path::Path;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use px_proto::api::{self, Release};
use px_proto::beacon::{Event, EventKind, LogEntry};
use px_proto::build::{Build, BuildQueued, BuildResult};
use px_proto::detect::detect;
use px_proto::manifest::{AppManifest, MANIFEST_FILE};
use px_proto::size::human;

use crate::client::{Client, Feed, refusal, unreachable};
use crate::failure::{EXIT_UNREACHABLE, Failure, Result};

/// How long past the app's own health timeout a rollout may take before `em deploy` gives up.
pub const ROLLOUT_SLACK: Duration = Duration::from_secs(60);
/// How long past the watch window `em deploy` waits for Beacon's verdict on the release.
pub const WATCH_SLACK: Duration = Duration::from_secs(30);
/// How often the progress line is redrawn.
pub const PROGRESS_EVERY: Duration = Duration::from_millis(200);
/// Exit code of a deploy that a newer deploy of the app superseded: nothing failed, but what
/// goes out is not this upload, and a script must be able to tell that from 0 and from 1.
pub const EXIT_SUPERSEDED: u8 = 7;
/// Longest `em deploy` follows a build, queueing included: above the builder's own time
/// limit, so that a build that runs is never abandoned, while a build no node ever takes
/// does not hold a terminal forever.
pub const BUILD_WAIT: Duration = Duration::from_secs(30 * 60);
/// How often `em deploy` also asks apprepo how its build stands: Beacon's events say it at
/// once, and this bounds what a lost event costs.
pub const BUILD_POLL: Duration = Duration::from_secs(5);
/// How long the build's last output lines get to arrive once its end is known: they travel
/// apart from the event that ends it. The whole log stays in apprepo.
pub const OUTPUT_GRACE: Duration = Duration::from_millis(300);
/// Lines of a failed build's output quoted with the failure: the installer's error and what
/// led to it, short enough to read at once.
pub const FAILING_LINES: usize = 20;
/// Events about releases kept while a build runs: the rollout of the release it makes may
/// start before `em deploy` learns the release's number. Far more than one rollout makes.
const EARLY_EVENTS: usize = 1000;
/// Upload chunk size.
const CHUNK: usize = 256 * 1024;
/// Marks `em deploy`'s own steps in a build's output, as Heroku does.
pub(crate) const STEP: &str = "----->";
/// Indents the build's output under the steps.
pub(crate) const OUTPUT_INDENT: &str = "       ";

pub struct Options<'a> {
    pub dir: &'a Path,
    pub app: Option<&'a str>,
    pub wait: bool,
    pub message: Option<&'a str>,
    pub json: bool,
}

fn read_manifest(dir: &Path) -> Result<AppManifest> {
    let path = dir.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Failure::bad_app(no_manifest(dir)),
        _ => Failure::bad_app(format!("cannot read {}: {e}", path.display())),
    })?;
    AppManifest::parse(&text).map_err(|e| Failure::bad_app(format!("{} ({})", e, path.display())))
}

/// What to do about a directory without `app.toml`: `em init` there, and what it would find
/// (the same detection the build makes), so a person bringing an existing app sees at once
/// that it is understood, or what stops it.
fn no_manifest(dir: &Path) -> String {
    let shown = dir.display();
    let detected = px_bundle::root_files(dir)
        .map_err(|e| e.to_string())
        .and_then(|files| detect(None, &files).map_err(|e| e.to_string()));
    match detected {
        Ok(detection) if detection.recognised() => {
            let mut message = format!(
                "no {MANIFEST_FILE} in {shown}; run `em init` there to write one for the app it holds. It would find:"
            );
            for line in &detection.lines {
                message.push_str("\n  ");
                message.push_str(line);
            }
            message
        }
        Err(problem) => format!(
            "no {MANIFEST_FILE} in {shown}; `em init` there writes one for the app it holds, but would first stop at: {problem}"
        ),
        Ok(_) => format!(
            "no {MANIFEST_FILE} in {shown}; run `em init` to create an app, or pass the app's directory"
        ),
    }
}

/// Where `app.toml` replaces a Procfile line, said before the upload so no override is silent
/// (the bundle check already refused a Procfile that does not parse).
fn procfile_overrides(dir: &Path, manifest: &AppManifest) -> Vec<String> {
    let Ok(files) = px_bundle::root_files(dir) else {
        return Vec::new();
    };
    let procfile = files
        .get(px_proto::procfile::PROCFILE)
        .and_then(|f| f.content.as_deref())
        .and_then(|bytes| px_proto::procfile::Procfile::parse(bytes).ok());
    procfile
        .map(|p| px_proto::process::overrides(manifest, &p))
        .unwrap_or_default()
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// The failure of a deploy that a newer one superseded, from Beacon's sentence naming it.
pub(crate) fn superseded(message: &str) -> Failure {
    Failure::new(
        EXIT_SUPERSEDED,
        format!(
            "{message}: a newer deploy of the app came first and goes out instead; nothing failed"
        ),
    )
}

/// What apprepo made of an upload.
enum Uploaded {
    /// The upload is the release. Both are boxed: they are large and of different sizes.
    Release(Box<Release>),
    /// The upload waits for a build, which makes the release.
    Build(Box<Build>),
}

pub async fn deploy(client: &Client, options: Options<'_>) -> Result<()> {
    let started = Instant::now();
    let manifest = read_manifest(options.dir)?;
    let app = options.app.unwrap_or(&manifest.name).to_string();
    if app != manifest.name {
        return Err(Failure::bad_app(format!(
            "app.toml names the app {:?} but --app says {app:?}; change `name` in app.toml or drop --app",
            manifest.name
        )));
    }

    // Pack into a temporary file: streaming, never the whole bundle in memory.
    let bundle = tempfile::NamedTempFile::new()?;
    let (dir, out) = (options.dir.to_path_buf(), bundle.reopen()?);
    let (summary, _) = tokio::task::spawn_blocking(move || {
        px_bundle::pack_dir(&dir, std::io::BufWriter::new(out))
    })
    .await
    .map_err(|e| Failure::failed(e.to_string()))?
    .map_err(|e| Failure::bad_app(e.to_string()))?;
    let limits = px_bundle::Limits::default();
    if summary.entries > limits.max_entries || summary.unpacked_bytes > limits.max_unpacked_bytes {
        return Err(Failure::bad_app(format!(
            "{} has {} files and {:.0} MiB, over the platform's limits ({} files, {:.0} MiB); leave build output and dependencies out with .emignore",
            options.dir.display(),
            summary.entries,
            mib(summary.unpacked_bytes),
            limits.max_entries,
            mib(limits.max_unpacked_bytes)
        )));
    }
    let packed = started.elapsed();
    if !options.json {
        for line in procfile_overrides(options.dir, &manifest) {
            eprintln!("{STEP} {line}");
        }
    }

    // The app exists from its first deploy on.
    let created = client
        .http
        .post(client.repo("/v1/apps"))
        .bearer_auth(&client.config.token)
        .json(&api::CreateApp { name: app.clone() })
        .send()
        .await
        .map_err(|e| unreachable(&client.config.remote, &e))?;
    if !created.status().is_success() && created.status().as_u16() != 409 {
        let status = created.status();
        return Err(refusal(status, created.text().await.unwrap_or_default()));
    }

    // Follow from before the upload, so no event and no line of a build's output is missed.
    let mut events = if options.wait {
        let url = client.beacon(&format!("/v1/events/stream?app={app}"));
        Some(Feed::<Event>::follow(client, &url).await.map_err(|f| {
            if f.code == EXIT_UNREACHABLE {
                Failure::new(
                    f.code,
                    format!(
                        "cannot reach Beacon, which follows the rollout: {}. Nothing was uploaded; `em deploy --no-wait` commits the release to apprepo anyway, and Beacon rolls it out when it is back",
                        f.message
                    ),
                )
            } else {
                f
            }
        })?)
    } else {
        None
    };
    // Without it a build still runs and is followed; only its output is not shown.
    let output = match &events {
        Some(_) => {
            let url = client.beacon(&format!("/v1/apps/{app}/logs/stream?stream=build&lines=0"));
            Some(Feed::<LogEntry>::open(client, &url).await)
        }
        None => None,
    };

    let upload_started = Instant::now();
    let uploaded = upload(
        client,
        &app,
        bundle.path(),
        &summary.sha256,
        summary.size,
        options.message,
        options.json,
    )
    .await?;
    let uploaded_in = upload_started.elapsed();
    let url = client
        .config
        .app_url
        .as_ref()
        .map(|u| u.replace("{app}", &app));
    let times = Times {
        packed,
        uploaded: uploaded_in,
        built: None,
    };
    let (release, build, early, times) = match uploaded {
        Uploaded::Release(release) => {
            if !options.json {
                eprintln!(
                    "released {app} v{} ({}, {} files)",
                    release.version,
                    human(summary.size),
                    summary.entries
                );
            }
            (*release, None, Vec::new(), times)
        }
        Uploaded::Build(build) => {
            if !options.json {
                eprintln!(
                    "{STEP} {app} build {} queued ({}, {} files)",
                    build.number,
                    human(summary.size),
                    summary.entries
                );
            }
            let Some(events) = events.as_mut() else {
                report_queued(&options, &app, &build);
                return Ok(());
            };
            let output = match output {
                Some(Ok(feed)) => Some(feed),
                Some(Err(failure)) => {
                    if !options.json {
                        eprintln!("(the build's output cannot be shown: {failure})");
                    }
                    None
                }
                None => None,
            };
            let build_started = Instant::now();
            let mut watch = BuildWatch {
                client,
                app: &app,
                number: build.number,
                output,
                lines: ShownLines::new(options.json),
            };
            let (version, early) = watch.follow(events).await?;
            let release: Release = client
                .get(&client.repo(&format!("/v1/apps/{app}/releases/{version}")))
                .await?;
            if !options.json {
                eprintln!("{STEP} build {} made {app} v{version}", build.number);
            }
            let times = Times {
                built: Some(build_started.elapsed()),
                ..times
            };
            (release, Some(build.number), early, times)
        }
    };
    let Some(mut events) = events else {
        report(
            &options,
            &app,
            &release,
            build,
            url.as_deref(),
            &times,
            None,
        );
        return Ok(());
    };
    // A release with a release phase goes live only once the phase succeeded. The phase may
    // have ended already (a migration that fails at once, run before em read the release
    // after its build): the watch asks apprepo first, so it reports that end at once rather
    // than waiting on a rollout that will never come.
    let mut early = early;
    if let Some(phase) = release.phase.as_ref() {
        let timeout = Duration::from_secs(phase.timeout_secs);
        let mut watch =
            crate::release_phase::PhaseWatch::open(client, &app, &release, options.json).await;
        watch.follow(&mut events, &mut early, timeout).await?;
    }
    let budget = manifest.health.timeout + ROLLOUT_SLACK;
    let deploy = &release.manifest.deploy;
    let watch = deploy.max_error_rate.map(|rate| {
        if !options.json {
            eprintln!(
                "once live, v{} is watched for {}s against its error budget of {rate} (Ctrl-C stops following; the budget still applies)",
                release.version,
                deploy.watch.as_secs()
            );
        }
        deploy.watch + WATCH_SLACK
    });
    let phases = follow(&mut events, early, release.version, budget, watch).await?;
    report(
        &options,
        &app,
        &release,
        build,
        url.as_deref(),
        &times,
        Some(&phases),
    );
    Ok(())
}

async fn upload(
    client: &Client,
    app: &str,
    path: &Path,
    sha256: &str,
    size: u64,
    message: Option<&str>,
    quiet: bool,
) -> Result<Uploaded> {
    let file = tokio::fs::File::open(path).await?;
    let show = !quiet && std::io::stderr().is_terminal();
    let start = Instant::now();
    let mut sent = 0u64;
    let mut last_draw = Instant::now();
    let stream = tokio_util::io::ReaderStream::with_capacity(file, CHUNK).map(move |chunk| {
        if let Ok(bytes) = &chunk {
            sent += bytes.len() as u64;
            if show && (last_draw.elapsed() >= PROGRESS_EVERY || sent == size) {
                last_draw = Instant::now();
                let rate = mib(sent) / start.elapsed().as_secs_f64().max(0.001);
                eprint!(
                    "\ruploading {:.1} / {:.1} MiB ({rate:.1} MiB/s)   ",
                    mib(sent),
                    mib(size)
                );
                if sent == size {
                    eprintln!();
                }
            }
        }
        chunk
    });
    let mut request = client
        .http
        .post(client.repo(&format!("/v1/apps/{app}/releases")))
        .bearer_auth(&client.config.token)
        .header(api::HEADER_BUNDLE_SHA256, sha256)
        .header(reqwest::header::CONTENT_LENGTH, size)
        .header(reqwest::header::CONTENT_TYPE, px_bundle::BUNDLE_MEDIA_TYPE)
        .body(reqwest::Body::wrap_stream(stream));
    if let Some(message) = message {
        request = request.header(api::HEADER_DESCRIPTION, message);
    }
    let remote = &client.config.remote;
    let response = request.send().await.map_err(|e| unreachable(remote, &e))?;
    // 202: stored, and waiting for a build; any other success is the release itself.
    if response.status() == reqwest::StatusCode::ACCEPTED {
        let queued: BuildQueued = response
            .json()
            .await
            .map_err(|e| Failure::failed(format!("unexpected answer from {remote}: {e}")))?;
        return Ok(Uploaded::Build(Box::new(queued.build)));
    }
    crate::client::decode(remote, Ok(response))
        .await
        .map(|release| Uploaded::Release(Box::new(release)))
}

/// Follows one build: its output, its events, and apprepo's record of it.
struct BuildWatch<'a> {
    client: &'a Client,
    app: &'a str,
    number: u64,
    /// Beacon's stream of the app's build output; `None` when it could not be followed.
    output: Option<Feed<LogEntry>>,
    /// The build's lines as shown, and its last ones for a failure.
    lines: ShownLines,
}

/// The output of a task `em deploy` waits for (a build, a release phase): each line shown as
/// it comes (escaped for the terminal) unless `--json`, and the last [`FAILING_LINES`] kept
/// for the failure message.
pub(crate) struct ShownLines {
    /// `--json`: nothing but the result is printed.
    pub(crate) quiet: bool,
    pub(crate) tail: VecDeque<String>,
}

impl ShownLines {
    pub(crate) fn new(quiet: bool) -> Self {
        Self {
            quiet,
            tail: VecDeque::new(),
        }
    }

    pub(crate) fn show(&mut self, line: String) {
        if !self.quiet {
            eprintln!("{OUTPUT_INDENT}{}", crate::safe_text::line(&line));
        }
        if self.tail.len() >= FAILING_LINES {
            self.tail.pop_front();
        }
        self.tail.push_back(line);
    }
}

/// Hands `each` what is left of a followed output once its task's end is known, for at most
/// [`OUTPUT_GRACE`] (the last lines may still be on their way).
pub(crate) async fn drain_output(
    output: &mut Option<Feed<LogEntry>>,
    mut each: impl FnMut(LogEntry),
) {
    if output.is_none() {
        return;
    }
    let _ = tokio::time::timeout(OUTPUT_GRACE, async {
        while let Some(line) = next_line(output).await {
            each(line);
        }
    })
    .await;
}

impl BuildWatch<'_> {
    /// Shows the build's output until it makes a release; returns the release's number and the
    /// events about releases seen meanwhile (its rollout may have begun already).
    async fn follow(&mut self, events: &mut Feed<Event>) -> Result<(u64, Vec<Event>)> {
        let deadline = tokio::time::sleep(BUILD_WAIT);
        tokio::pin!(deadline);
        let mut poll = tokio::time::interval(BUILD_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is now; the build was only just queued.
        poll.tick().await;
        let mut early = VecDeque::new();
        loop {
            let made = tokio::select! {
                _ = &mut deadline => return Err(Failure::failed(format!(
                    "{} build {} did not end within {} minutes; it may still run (`em status`), and `em releases` shows the release it makes",
                    self.app,
                    self.number,
                    BUILD_WAIT.as_secs() / 60
                ))),
                _ = poll.tick() => self.ask_apprepo().await?,
                line = next_line(&mut self.output) => {
                    if let Some(line) = line {
                        self.show(line);
                    }
                    None
                }
                event = events.next() => {
                    let event = event.map_err(|end| Failure::failed(format!(
                        "Beacon's event stream was {end}; the build goes on, see `em status`"
                    )))?;
                    self.on_event(event, &mut early).await?
                }
            };
            if let Some(version) = made {
                self.drain_output().await;
                return Ok((version, early.into()));
            }
        }
    }

    /// Prints a line of the build's output (another build's is skipped) and keeps it.
    fn show(&mut self, line: LogEntry) {
        if line.build == Some(self.number) {
            self.lines.show(line.line);
        }
    }

    /// Shows what is left of the output once the build's end is known.
    async fn drain_output(&mut self) {
        let number = self.number;
        let lines = &mut self.lines;
        drain_output(&mut self.output, |line| {
            if line.build == Some(number) {
                lines.show(line.line);
            }
        })
        .await;
    }

    /// Acts on an event: one about the build may end it; one about a release is kept for the
    /// rollout. Returns the release the build made, once it did.
    async fn on_event(&mut self, event: Event, early: &mut VecDeque<Event>) -> Result<Option<u64>> {
        if event.build != Some(self.number) {
            if event.build.is_none() && event.release.is_some() {
                if early.len() >= EARLY_EVENTS {
                    early.pop_front();
                }
                early.push_back(event);
            }
            return Ok(None);
        }
        match event.kind {
            EventKind::BuildQueued => self.step(&event.message),
            EventKind::BuildStarted => match &event.node {
                Some(node) => self.step(&format!("building on {node}")),
                None => self.step(&event.message),
            },
            EventKind::BuildFinished => {
                // The node's word may come without the release; apprepo knows it.
                return Ok(match event.release {
                    Some(version) => Some(version),
                    None => self.ask_apprepo().await?,
                });
            }
            EventKind::BuildFailed => return Err(self.failed(&event.message, event.detail).await),
            EventKind::DeploySuperseded => return Err(superseded(&event.message)),
            _ => {}
        }
        Ok(None)
    }

    fn step(&self, text: &str) {
        if !self.lines.quiet {
            eprintln!("{STEP} {text}");
        }
    }

    /// How the build stands in apprepo: the release it made, or its failure or supersession
    /// as an error; `None` while it runs or when apprepo cannot say.
    async fn ask_apprepo(&mut self) -> Result<Option<u64>> {
        let url = self
            .client
            .repo(&format!("/v1/apps/{}/builds/{}", self.app, self.number));
        let Ok(build) = self.client.get::<Build>(&url).await else {
            return Ok(None);
        };
        match build.result {
            None => Ok(None),
            Some(BuildResult::Succeeded { release }) => Ok(Some(release)),
            Some(BuildResult::Failed { reason }) => {
                let message = format!("{} build {} failed: {reason}", self.app, self.number);
                Err(self.failed(&message, None).await)
            }
            Some(BuildResult::Superseded { by }) => Err(superseded(&format!(
                "{} build {} was superseded by {by}",
                self.app, self.number
            ))),
        }
    }

    /// The failure of the build: `message`, then the last lines of its output (apprepo's log,
    /// else what was shown here, else the event's detail).
    async fn failed(&mut self, message: &str, detail: Option<String>) -> Failure {
        let url = self
            .client
            .repo(&format!("/v1/apps/{}/builds/{}/log", self.app, self.number));
        let mut lines: Vec<String> = match self.client.get_text(&url).await {
            Ok(log) => last_lines(&log, FAILING_LINES),
            Err(_) => Vec::new(),
        };
        if lines.is_empty() {
            self.drain_output().await;
            lines = self.lines.tail.iter().cloned().collect();
        }
        if lines.is_empty()
            && let Some(detail) = detail
        {
            lines = last_lines(&detail, FAILING_LINES);
        }
        let quoted = if lines.is_empty() {
            String::new()
        } else {
            format!(
                "\nlast lines of the build's output:\n{}",
                lines
                    .iter()
                    .map(|l| format!("{OUTPUT_INDENT}{}", crate::safe_text::line(l)))
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        };
        Failure::failed(format!(
            "{message}{quoted}\nnothing changed in what serves; fix the app and run `em deploy` again"
        ))
    }
}

/// The next line of the build's output; never, once the stream is gone.
pub(crate) async fn next_line(output: &mut Option<Feed<LogEntry>>) -> Option<LogEntry> {
    let Some(feed) = output else {
        return std::future::pending().await;
    };
    match feed.next().await {
        Ok(line) => Some(line),
        Err(_) => {
            *output = None;
            None
        }
    }
}

/// The last `n` lines of `text` that are not blank.
pub(crate) fn last_lines(text: &str, n: usize) -> Vec<String> {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| l.to_string())
        .collect()
}

/// When each step of the rollout was seen, from the start of the follow.
#[derive(Debug, Default)]
pub struct Phases {
    pub assigned: Option<Duration>,
    pub healthy: Option<Duration>,
    pub switched: Option<Duration>,
    pub rolled_out: Duration,
    /// Beacon's verdict after the watch window, when `em deploy` waited for it.
    pub verdict: Option<String>,
}

/// Follows the rollout of `version` until it serves everywhere, or, with `watch`, until
/// Beacon's verdict on its error budget (waiting at most `watch` past the rollout). `early`
/// are events seen before the release was known (while its build ran), taken first.
async fn follow(
    events: &mut Feed<Event>,
    early: Vec<Event>,
    version: u64,
    budget: Duration,
    watch: Option<Duration>,
) -> Result<Phases> {
    let start = Instant::now();
    let mut phases = Phases::default();
    let deadline = tokio::time::sleep(budget);
    tokio::pin!(deadline);
    let mut live = false;
    let mut early = early.into_iter();
    loop {
        let event = match early.next() {
            Some(event) => event,
            None => tokio::select! {
                _ = &mut deadline => return Err(Failure::failed(if live {
                    format!("v{version} serves everywhere, but Beacon gave no verdict on its error budget in time; see `em releases`")
                } else {
                    format!(
                        "v{version} is not serving everywhere after {}s; see `em status` and `em logs`",
                        budget.as_secs()
                    )
                })),
                event = events.next() => event.map_err(|end| Failure::failed(format!(
                    "Beacon's event stream was {end}; the release is committed, see `em status`"
                )))?,
            },
        };
        if event.release != Some(version) || event.build.is_some() {
            continue;
        }
        let at = start.elapsed();
        match event.kind {
            EventKind::DeployStarted => phases.assigned = phases.assigned.or(Some(at)),
            EventKind::InstanceStarted => phases.healthy = phases.healthy.or(Some(at)),
            EventKind::DeployFinished if event.node.is_some() => {
                phases.switched = phases.switched.or(Some(at))
            }
            EventKind::DeployFinished => {
                phases.rolled_out = at;
                let Some(watch) = watch else {
                    return Ok(phases);
                };
                live = true;
                deadline.as_mut().reset(tokio::time::Instant::now() + watch);
            }
            EventKind::DeployVerified => {
                phases.verdict = Some(event.message);
                return Ok(phases);
            }
            EventKind::DeploySuperseded => return Err(superseded(&event.message)),
            EventKind::DeployRolledBack => {
                let detail = event
                    .detail
                    .map(|d| format!("\n{}", crate::safe_text::lines(&d)))
                    .unwrap_or_default();
                return Err(Failure::failed(format!(
                    "{}{detail}\nthe previous release serves again; fix the app and run `em deploy` again",
                    event.message
                )));
            }
            EventKind::DeployFailed if live => {
                // Serving everywhere, then judged over its budget but not rolled back.
                return Err(Failure::failed(event.message));
            }
            EventKind::DeployFailed => {
                let detail = event
                    .detail
                    .map(|d| {
                        format!(
                            "\nlast lines of its stderr:\n{}",
                            crate::safe_text::lines(&d)
                        )
                    })
                    .unwrap_or_default();
                // Without a node, Beacon itself found no node able to run the release.
                let failed = match event.node.as_deref() {
                    Some(node) => format!("v{version} failed on {node}"),
                    None => format!("v{version} cannot be placed"),
                };
                return Err(Failure::failed(format!(
                    "{failed}: {}{detail}\nthe previous release keeps serving; fix the app and run `em deploy` again",
                    event.message
                )));
            }
            _ => {}
        }
    }
}

/// How long packing, uploading and building took.
struct Times {
    packed: Duration,
    uploaded: Duration,
    built: Option<Duration>,
}

/// What `--no-wait` says of an upload that waits for a build.
fn report_queued(options: &Options<'_>, app: &str, build: &Build) {
    if options.json {
        println!(
            "{}",
            serde_json::json!({
                "app": app,
                "build": build.number,
                "release": null,
                "rolled_out": false,
            })
        );
    } else {
        println!(
            "{app} build {} queued; it builds and rolls out in the background (`em status` to watch)",
            build.number
        );
    }
}

fn report(
    options: &Options<'_>,
    app: &str,
    release: &Release,
    build: Option<u64>,
    url: Option<&str>,
    times: &Times,
    phases: Option<&Phases>,
) {
    let secs = |d: Option<Duration>| d.map(|d| (d.as_secs_f64() * 1000.0).round() / 1000.0);
    if options.json {
        println!(
            "{}",
            serde_json::json!({
                "app": app,
                "release": release.version,
                "build": build,
                "bundle_sha256": release.bundle.sha256,
                "url": url,
                "rolled_out": phases.is_some(),
                "seconds": {
                    "pack": secs(Some(times.packed)),
                    "upload": secs(Some(times.uploaded)),
                    "build": secs(times.built),
                    "assigned": secs(phases.and_then(|p| p.assigned)),
                    "healthy": secs(phases.and_then(|p| p.healthy)),
                    "switched": secs(phases.and_then(|p| p.switched)),
                    "rolled_out": secs(phases.map(|p| p.rolled_out)),
                },
                "verdict": phases.and_then(|p| p.verdict.as_deref()),
            })
        );
        return;
    }
    match phases {
        Some(p) => {
            let show = |d: Option<Duration>| {
                d.map(|d| format!("{:.2}s", d.as_secs_f64()))
                    .unwrap_or_else(|| "-".into())
            };
            println!(
                "{app} v{} is live{}",
                release.version,
                url.map(|u| format!(" at {u}")).unwrap_or_default()
            );
            let built = times
                .built
                .map(|d| format!(" · build {:.2}s", d.as_secs_f64()))
                .unwrap_or_default();
            println!(
                "pack {:.2}s · upload {:.2}s{built} · then assigned {} · healthy {} · switched {} · everywhere {:.2}s",
                times.packed.as_secs_f64(),
                times.uploaded.as_secs_f64(),
                show(p.assigned),
                show(p.healthy),
                show(p.switched),
                p.rolled_out.as_secs_f64()
            );
            if let Some(verdict) = &p.verdict {
                println!("{verdict}");
            }
        }
        None => println!(
            "{app} v{} committed; it rolls out in the background (`em status` to watch)",
            release.version
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_quotes_the_last_lines_that_say_something() {
        let log = "Collecting django\n\n  \nERROR: one\nERROR: two\n";
        assert_eq!(last_lines(log, 2), ["ERROR: one", "ERROR: two"]);
        assert_eq!(last_lines(log, 10).len(), 3);
        assert!(last_lines("", 3).is_empty());
    }

    #[test]
    fn each_override_of_a_procfile_line_is_said() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("Procfile"),
            "web: gunicorn app\nworker: celery worker\nclock: python3 clock.py\n",
        )
        .unwrap();
        let text = "name = \"shop\"\n[processes.worker]\ncommand = \"celery worker -c 4\"\n[processes.clock]\nreplace = \"stop_first\"\n";
        std::fs::write(dir.path().join("app.toml"), text).unwrap();
        let manifest = read_manifest(dir.path()).unwrap();
        assert_eq!(
            procfile_overrides(dir.path(), &manifest),
            ["worker: app.toml's command replaces the Procfile's line 2"]
        );
        // Without a Procfile there is nothing to override.
        std::fs::remove_file(dir.path().join("Procfile")).unwrap();
        assert!(procfile_overrides(dir.path(), &manifest).is_empty());
    }

    #[test]
    fn a_superseded_deploy_has_its_own_exit_code_and_says_nothing_failed() {
        let failure = superseded("hello v2 was superseded by v4 before it served everywhere");
        assert_eq!(failure.code, EXIT_SUPERSEDED);
        assert_ne!(EXIT_SUPERSEDED, crate::failure::EXIT_FAILED);
        assert!(failure.message.starts_with("hello v2 was superseded by v4"));
        assert!(failure.message.ends_with("nothing failed"));
    }
}
