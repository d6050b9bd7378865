//! `em dev`: run an app locally the way Maestro would, and restart it when its files change.
//!
//! Running the app is Maestro's own code, through its one facade for local runs
//! ([`px_maestro::local`]): the instance starts through the AppRunner contract
//! (docs/src/design/contracts.md: `PORT`, `$1`, the manifest's env, the app directory as
//! working directory) with its `[limits]` as rlimits and its `runtime`/`requires` checked,
//! takes traffic only once its health check passes, and Maestro's proxy sits in front on
//! `127.0.0.1:<port>`, serving the `[http] static` directories itself, beside the app events
//! endpoint (`PX_EVENTS_URL`) and the app's logs. So what works under `em dev` works on the
//! platform, and `em` keeps no copy of how Maestro runs apps. What `em dev` keeps: its
//! arguments, what the terminal shows (`output.rs`), the file watcher (`watch.rs`) and when to
//! restart (here).
//!
//! # Restarts
//!
//! The watcher walks the directory every [`watch::WATCH_INTERVAL`] over the files `em deploy`
//! would bundle. On a change, [`LocalApp::restart`] reads the manifest again and starts a new
//! instance beside the old one; only once it is healthy is the route swapped and the old
//! instance drained and stopped: the same zero-downtime switch Maestro does, so a browser
//! reloading while the developer saves never sees an error. A new instance that fails leaves
//! the old one serving; with no old one the proxy answers 503 until a change brings a healthy
//! one. A change while a new instance is still starting abandons that start and begins again
//! with the newer files.
//!
//! # Stopping
//!
//! Ctrl-C and SIGTERM come through `px_runtime::shutdown`, the one place that reads signals:
//! they cancel a token, and `em dev` stops the proxy, then the app (which runs in its own
//! process group, so the terminal's SIGINT never reaches it).

mod output;
mod watch;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use px_maestro::local::{LocalApp, LocalError, LocalSettings, RestartOutcome};
use px_proto::manifest::MANIFEST_FILE;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use self::output::{say, warn};
use crate::failure::{Failure, Result};

/// How long to wait, once the app stopped, for its last output lines to reach the terminal.
const OUTPUT_DRAIN: Duration = Duration::from_secs(1);

/// Set for every instance `em dev` starts, so apps may turn on development conveniences
/// (verbose errors, template reloading).
const PX_DEV: (&str, &str) = ("PX_DEV", "1");
/// Defaults the manifest's env may override. `PYTHONUNBUFFERED` makes Python's `print` output
/// show as it happens rather than in 8 KiB blocks on a pipe; it changes nothing else.
const DEV_DEFAULT_ENV: &[(&str, &str)] = &[("PYTHONUNBUFFERED", "1")];

/// Runs the app in `dir` behind a local proxy on `127.0.0.1:port` until Ctrl-C or SIGTERM.
pub async fn dev(dir: &Path, port: u16) -> Result<()> {
    // Signals first: from here on something runs that Ctrl-C must stop properly.
    let shutdown = px_runtime::shutdown::on_signals()
        .map_err(|e| Failure::failed(format!("cannot catch Ctrl-C and SIGTERM: {e}")))?;
    let log_dir = tempfile::Builder::new()
        .prefix("em-dev-logs-")
        .tempdir()
        .map_err(|e| {
            Failure::failed(format!(
                "cannot create a temporary directory for the app's logs: {e}; check TMPDIR"
            ))
        })?;
    let settings = LocalSettings {
        dir: dir.to_path_buf(),
        listen: SocketAddr::from(([127, 0, 0, 1], port)),
        logs_dir: log_dir.path().to_path_buf(),
        default_env: pairs(DEV_DEFAULT_ENV),
        extra_env: pairs(&[PX_DEV]),
        on_notice: Box::new(warn),
    };
    let mut app = LocalApp::start(settings, shutdown.clone())
        .await
        .map_err(|e| start_failure(e, port))?;
    // `--port 0` asks for any free port; say the one it got.
    let port = app.local_addr().port();
    let printer = tokio::spawn(output::print_app_output(app.follow()));
    // The first fingerprint before the first start, so an edit made while it starts counts.
    let changes = watch::start(app.dir().to_path_buf()).await;

    run(&mut app, &shutdown, changes, port).await;

    app.stop().await;
    // The printer ends once the app's last output lines are read and its logs are gone.
    let _ = tokio::time::timeout(OUTPUT_DRAIN, printer).await;
    drop(log_dir);
    say("stopped");
    Ok(())
}

fn pairs(vars: &[(&str, &str)]) -> Vec<(String, String)> {
    vars.iter()
        .map(|(key, value)| ((*key).to_string(), (*value).to_string()))
        .collect()
}

/// Why the next instance is started.
enum Trigger {
    First,
    Changed(PathBuf),
}

/// Starts instances, on start-up and on every change, until `shutdown`.
async fn run(
    app: &mut LocalApp,
    shutdown: &CancellationToken,
    mut changes: Option<mpsc::Receiver<PathBuf>>,
    port: u16,
) {
    let mut announced = false;
    let mut pending = Some(Trigger::First);
    loop {
        // A signal during the previous step: do not start an instance only to stop it.
        if shutdown.is_cancelled() {
            return;
        }
        if let Some(trigger) = pending.take() {
            let outcome = tokio::select! {
                outcome = app.restart() => outcome,
                // A change before the new instance is healthy: start again with the newer
                // files. The abandoned instance is stopped first thing by the next restart.
                path = watch::next_change(&mut changes) => {
                    pending = Some(Trigger::Changed(path));
                    continue;
                }
            };
            match outcome {
                Ok(RestartOutcome::Serving { app: name }) => match trigger {
                    Trigger::Changed(path) if announced => {
                        say(format!("restarted (changed: {})", path.display()));
                    }
                    _ => {
                        say(format!(
                            "serving {name} at http://localhost:{port}/ (Ctrl-C to stop)"
                        ));
                        announced = true;
                    }
                },
                Ok(RestartOutcome::Failed(why)) if app.is_serving() => warn(format!(
                    "{why}\nfix it and save; the running instance keeps serving meanwhile"
                )),
                Ok(RestartOutcome::Failed(why)) => warn(format!(
                    "{why}\nfix it and save; until then the proxy answers 503"
                )),
                Ok(RestartOutcome::Stopping) => return,
                Err(e) => warn(format!(
                    "{}{}",
                    describe(&e),
                    if app.is_serving() {
                        " (the running instance keeps serving)"
                    } else {
                        ""
                    }
                )),
            }
            continue;
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            exit = app.exited() => warn(format!(
                "{exit}\nfix it and save a file to start it again; until then the proxy answers 503"
            )),
            path = watch::next_change(&mut changes) => pending = Some(Trigger::Changed(path)),
        }
    }
}

/// A problem with the app's files, said with what to do about it.
fn describe(e: &LocalError) -> String {
    match e {
        LocalError::NoManifest { dir } => format!(
            "no {MANIFEST_FILE} in {}; run `em init` first",
            dir.display()
        ),
        other => other.to_string(),
    }
}

/// Why `em dev` could not start, with the fix and the exit code that fit.
fn start_failure(e: LocalError, port: u16) -> Failure {
    match e {
        LocalError::Listen { source, .. } if source.kind() == std::io::ErrorKind::AddrInUse => {
            Failure::failed(format!(
                "port {port} is taken; pass --port with a free one, e.g. `em dev --port {}`",
                port.wrapping_add(1).max(1024)
            ))
        }
        LocalError::Listen { source, .. } => Failure::failed(format!(
            "cannot listen on 127.0.0.1:{port}: {source}; pass --port with a port above 1023"
        )),
        e if e.is_bad_app() => Failure::bad_app(describe(&e)),
        e => Failure::failed(e.to_string()),
    }
}
