//! `em deploy`: pack the app, upload it with a progress line, then follow the rollout on
//! Beacon's event stream until every node serves the new release (or one fails). An app with
//! an error budget (`[deploy] max_error_rate`) is followed through its watch window too, and
//! `em deploy` fails if Beacon rolls it back.

use std::io::IsTerminal;
use std::path::Path;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use px_proto::api::{self, Release};
use px_proto::beacon::{Event, EventKind};
use px_proto::detect::detect;
use px_proto::manifest::{AppManifest, MANIFEST_FILE};

use crate::client::{Client, refusal, unreachable};
use crate::failure::{EXIT_UNREACHABLE, Failure, Result};

/// How long past the app's own health timeout a rollout may take before `em deploy` gives up.
pub const ROLLOUT_SLACK: Duration = Duration::from_secs(60);
/// How long past the watch window `em deploy` waits for Beacon's verdict on the release.
pub const WATCH_SLACK: Duration = Duration::from_secs(30);
/// How often the progress line is redrawn.
pub const PROGRESS_EVERY: Duration = Duration::from_millis(200);
/// Upload chunk size.
const CHUNK: usize = 256 * 1024;

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

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
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

    // Follow the rollout from before the upload, so no event is missed.
    let events = if options.wait {
        let url = client.beacon(&format!("/v1/events/stream?app={app}"));
        Some(client.open_stream(&url).await.map_err(|f| {
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

    let upload_started = Instant::now();
    let release = upload(
        client,
        &app,
        bundle.path(),
        &summary.sha256,
        summary.size,
        options.message,
        options.json,
    )
    .await?;
    let uploaded = upload_started.elapsed();
    if !options.json {
        eprintln!(
            "released {app} v{} ({:.1} MiB, {} files)",
            release.version,
            mib(summary.size),
            summary.entries
        );
    }
    let url = client
        .config
        .app_url
        .as_ref()
        .map(|u| u.replace("{app}", &app));
    let Some(events) = events else {
        report(
            &options,
            &app,
            &release,
            url.as_deref(),
            packed,
            uploaded,
            None,
        );
        return Ok(());
    };
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
    let phases = follow(events, release.version, budget, watch).await?;
    report(
        &options,
        &app,
        &release,
        url.as_deref(),
        packed,
        uploaded,
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
) -> Result<Release> {
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
    crate::client::decode(&client.config.remote, request.send().await).await
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
/// Beacon's verdict on its error budget (waiting at most `watch` past the rollout).
async fn follow<S>(
    mut events: S,
    version: u64,
    budget: Duration,
    watch: Option<Duration>,
) -> Result<Phases>
where
    S: futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin,
{
    let start = Instant::now();
    let mut phases = Phases::default();
    let mut buffer = String::new();
    let deadline = tokio::time::sleep(budget);
    tokio::pin!(deadline);
    let mut live = false;
    loop {
        let chunk = tokio::select! {
            _ = &mut deadline => return Err(Failure::failed(if live {
                format!("v{version} serves everywhere, but Beacon gave no verdict on its error budget in time; see `em releases`")
            } else {
                format!(
                    "v{version} is not serving everywhere after {}s; see `em status` and `em logs`",
                    budget.as_secs()
                )
            })),
            chunk = events.next() => chunk,
        };
        let chunk = match chunk {
            Some(Ok(chunk)) => chunk,
            Some(Err(e)) => {
                return Err(Failure::failed(format!(
                    "lost Beacon's event stream ({e}); the release is committed, see `em status`"
                )));
            }
            None => {
                return Err(Failure::failed(
                    "Beacon closed the event stream; the release is committed, see `em status`",
                ));
            }
        };
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        for event in crate::client::take_sse::<Event>(&mut buffer) {
            if event.release != Some(version) {
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
                EventKind::DeployRolledBack => {
                    let detail = event.detail.map(|d| format!("\n{d}")).unwrap_or_default();
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
                        .map(|d| format!("\nlast lines of its stderr:\n{d}"))
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
}

fn report(
    options: &Options<'_>,
    app: &str,
    release: &Release,
    url: Option<&str>,
    packed: Duration,
    uploaded: Duration,
    phases: Option<&Phases>,
) {
    let secs = |d: Option<Duration>| d.map(|d| (d.as_secs_f64() * 1000.0).round() / 1000.0);
    if options.json {
        println!(
            "{}",
            serde_json::json!({
                "app": app,
                "release": release.version,
                "bundle_sha256": release.bundle.sha256,
                "url": url,
                "rolled_out": phases.is_some(),
                "seconds": {
                    "pack": secs(Some(packed)),
                    "upload": secs(Some(uploaded)),
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
            println!(
                "pack {:.2}s · upload {:.2}s · then assigned {} · healthy {} · switched {} · everywhere {:.2}s",
                packed.as_secs_f64(),
                uploaded.as_secs_f64(),
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
