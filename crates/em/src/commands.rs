//! The everyday commands: status, apps, releases (and a release's build log), rollback,
//! config, logs, login.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use px_proto::api::{self, Release};
use px_proto::beacon::{App, LogEntry, Node, NodeHealth, RolloutRecord, RolloutState};
use px_proto::manifest::{AppManifest, MANIFEST_FILE};

use crate::cli::ConfigChange;
use crate::client::{Client, Feed};
use crate::failure::{EXIT_NOT_CONFIGURED, EXIT_REFUSED, Failure, Result};
use crate::settings::{self, EmConfig};

/// The app a command is about: `--app`, else the `name` in `./app.toml`.
pub fn app_name(flag: Option<String>) -> Result<String> {
    if let Some(app) = flag {
        return Ok(app);
    }
    let text = std::fs::read_to_string(Path::new(MANIFEST_FILE)).map_err(|_| {
        Failure::usage(
            "which app? pass --app NAME, or run this in an app's directory (one with an app.toml)",
        )
    })?;
    Ok(AppManifest::parse(&text)
        .map_err(|e| Failure::bad_app(e.to_string()))?
        .name)
}

pub(crate) fn print_json<T: serde::Serialize>(value: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

pub async fn status(client: &Client, json: bool) -> Result<()> {
    let nodes: Vec<Node> = client.get(&client.beacon("/v1/nodes")).await?;
    let apps: Vec<App> = client.get(&client.beacon("/v1/apps")).await?;
    if json {
        print_json(&serde_json::json!({ "nodes": nodes, "apps": apps }));
        return Ok(());
    }
    println!("nodes:");
    if nodes.is_empty() {
        println!("  (none linked yet)");
    }
    for node in &nodes {
        let health = match node.health {
            NodeHealth::Connected => "connected",
            NodeHealth::Lost => "LOST",
        };
        println!(
            "  {:<20} {:<10} {} instance(s), generation {}",
            node.name,
            health,
            node.instances.len(),
            node.applied_generation
        );
    }
    println!("apps:");
    if apps.is_empty() {
        println!("  (none deployed yet; `em deploy`)");
    }
    for app in &apps {
        println!(
            "  {:<20} v{:<5} {:?} on {}/{} node(s)",
            app.name,
            app.release,
            app.rollout,
            app.healthy_nodes,
            app.nodes.len()
        );
    }
    Ok(())
}

pub async fn apps(client: &Client, json: bool) -> Result<()> {
    let apps: Vec<api::App> = client.get(&client.repo("/v1/apps")).await?;
    if json {
        print_json(&apps);
        return Ok(());
    }
    if apps.is_empty() {
        println!("no apps yet; `em init` then `em deploy`");
    }
    for app in apps {
        let current = app
            .current
            .map(|r| format!("v{} ({})", r.version, r.created_at))
            .unwrap_or_else(|| "no release".into());
        println!("{:<24} {current}", app.name);
    }
    Ok(())
}

/// Releases from the repository, each with what its rollout cost as Beacon recorded it
/// (requests to the old and new release, 5xx, connections moved and cut, the verdict).
pub async fn releases(client: &Client, app: &str, json: bool) -> Result<()> {
    let releases: Vec<Release> = client
        .get(&client.repo(&format!("/v1/apps/{app}/releases")))
        .await?;
    // The figures are Beacon's; without them the list is still worth showing.
    let rollouts: BTreeMap<u64, RolloutRecord> = match client
        .get::<Vec<RolloutRecord>>(&client.beacon(&format!("/v1/apps/{app}/rollouts")))
        .await
    {
        Ok(records) => records.into_iter().map(|r| (r.release, r)).collect(),
        Err(e) => {
            if !json {
                eprintln!("(no rollout figures: {e})");
            }
            BTreeMap::new()
        }
    };
    if json {
        let listed: Vec<serde_json::Value> = releases
            .iter()
            .map(|r| {
                let mut value = serde_json::to_value(r).unwrap_or_default();
                if let Some(object) = value.as_object_mut() {
                    object.insert(
                        "rollout".into(),
                        serde_json::to_value(rollouts.get(&r.version)).unwrap_or_default(),
                    );
                }
                value
            })
            .collect();
        print_json(&listed);
        return Ok(());
    }
    for r in releases {
        println!(
            "v{:<5} {}  {:<12} {}  by {}",
            r.version,
            r.created_at,
            &r.bundle.sha256[..12],
            r.description,
            r.created_by
        );
        if let Some(rollout) = rollouts.get(&r.version) {
            println!("       {}", rollout_line(rollout));
        }
    }
    Ok(())
}

/// One line on what a rollout cost: its verdict when there is one, its figures so far if not.
fn rollout_line(r: &RolloutRecord) -> String {
    if let Some(outcome) = &r.outcome {
        return outcome.clone();
    }
    let f = r.figures;
    let state = match r.state {
        RolloutState::RollingOut => "rolling out",
        RolloutState::RolledOut => "watching",
        RolloutState::Failed => "failed",
        RolloutState::Unplaced => "no eligible node",
        RolloutState::RolledBack => "rolled back",
    };
    let killed = if f.killed == 0 {
        String::new()
    } else {
        format!("; {} process(es) killed at their stop grace", f.killed)
    };
    format!(
        "{state}: {} requests, {} answered 5xx; {} to the previous release after the switch; {} long-lived connections moved, {} cut{killed}",
        f.new_requests, f.new_errors, f.old_requests, f.closed, f.cut
    )
}

/// A release number as people write it: `7` or `v7`.
fn release_number(text: &str) -> Result<u64> {
    text.trim_start_matches('v')
        .parse::<u64>()
        .map_err(|_| Failure::usage(format!("{text:?} is not a release such as 7 or v7")))
}

/// The log of the build that made `release`, from apprepo.
pub async fn build_log(client: &Client, app: &str, release: &str, json: bool) -> Result<()> {
    let version = release_number(release)?;
    let release: Release = client
        .get(&client.repo(&format!("/v1/apps/{app}/releases/{version}")))
        .await?;
    let Some(build) = release.build.as_ref().map(|b| b.build) else {
        return Err(Failure::new(
            EXIT_REFUSED,
            format!(
                "{app} v{version} was not built: its upload is the release, so there is no build log"
            ),
        ));
    };
    let log = client
        .get_text(&client.repo(&format!("/v1/apps/{app}/builds/{build}/log")))
        .await?;
    if json {
        print_json(&serde_json::json!({
            "app": app,
            "release": version,
            "build": build,
            "log": log,
        }));
    } else {
        // A build's log is the app's own text: shown, never obeyed by the terminal.
        print!("{}", crate::safe_text::lines(&log));
        if !log.is_empty() && !log.ends_with('\n') {
            println!();
        }
    }
    Ok(())
}

pub async fn rollback(
    client: &Client,
    app: &str,
    release: Option<String>,
    json: bool,
) -> Result<()> {
    let to = release.as_deref().map(release_number).transpose()?;
    let release: Release = client
        .send_json(
            reqwest::Method::POST,
            &client.repo(&format!("/v1/apps/{app}/rollback")),
            &api::Rollback { to },
        )
        .await?;
    if json {
        print_json(&release);
    } else {
        println!(
            "{app} rolled back: v{} ({}); it rolls out now, `em status` to watch",
            release.version, release.description
        );
    }
    Ok(())
}

pub async fn config(
    client: &Client,
    app: &str,
    change: Option<ConfigChange>,
    json: bool,
) -> Result<()> {
    let change = match change {
        None => {
            let vars: BTreeMap<String, String> = client
                .get(&client.repo(&format!("/v1/apps/{app}/config")))
                .await?;
            if json {
                print_json(&vars);
            } else if vars.is_empty() {
                println!("{app} has no config vars; `em config set KEY=VALUE`");
            } else {
                for (k, v) in vars {
                    println!("{k}={v}");
                }
            }
            return Ok(());
        }
        Some(ConfigChange::Set { pairs }) => {
            let mut set = BTreeMap::new();
            for pair in pairs {
                let (k, v) = pair
                    .split_once('=')
                    .ok_or_else(|| Failure::usage(format!("{pair:?} is not KEY=VALUE")))?;
                set.insert(k.to_string(), v.to_string());
            }
            api::ConfigChange {
                set,
                unset: Vec::new(),
            }
        }
        Some(ConfigChange::Unset { keys }) => api::ConfigChange {
            set: BTreeMap::new(),
            unset: keys,
        },
    };
    let release: Release = client
        .send_json(
            reqwest::Method::PATCH,
            &client.repo(&format!("/v1/apps/{app}/config")),
            &change,
        )
        .await?;
    if json {
        print_json(&release);
    } else {
        println!(
            "{app} v{}: {}; it rolls out now",
            release.version, release.description
        );
    }
    Ok(())
}

fn print_log(entry: &LogEntry, json: bool) {
    if json {
        println!("{}", serde_json::to_string(entry).unwrap_or_default());
        return;
    }
    println!("{}", log_line(entry));
}

/// One line of `em logs`: where it came from, then the app's text with its control
/// characters shown escaped, so the app cannot drive the reader's terminal.
fn log_line(entry: &LogEntry) -> String {
    // A build's output belongs to no release or instance yet; a process of another type than
    // web is named by its type and number (`worker.1`).
    let source = match (entry.build, &entry.process) {
        (Some(build), _) => format!("build {build}"),
        (None, Some(process)) => format!("v{} {process}.{}", entry.release, entry.instance),
        (None, None) => format!("v{}#{}", entry.release, entry.instance),
    };
    format!(
        "{} {} {source} {}: {}",
        entry.at,
        entry.node,
        entry.stream.as_str(),
        crate::safe_text::line(&entry.line)
    )
}

pub async fn logs(
    client: &Client,
    app: &str,
    follow: bool,
    lines: usize,
    json: bool,
) -> Result<()> {
    if !follow {
        let entries: Vec<LogEntry> = client
            .get(&client.beacon(&format!("/v1/apps/{app}/logs?lines={lines}")))
            .await?;
        for entry in &entries {
            print_log(entry, json);
        }
        return Ok(());
    }
    // Followed across a failover: reopened on the Beacon that takes over, without the backlog
    // again (lines written while no Beacon relayed them stay in the web servers' log files).
    let url = client.beacon(&format!("/v1/apps/{app}/logs/stream?lines={lines}"));
    let reopen_url = client.beacon(&format!("/v1/apps/{app}/logs/stream?lines=0"));
    let mut feed = Feed::<LogEntry>::follow_from(client, &url, &reopen_url).await?;
    // Ctrl-C (or SIGTERM) ends following, through the one signal handler `px_runtime` installs.
    let interrupted = px_runtime::shutdown::on_signals()
        .map_err(|e| Failure::failed(format!("cannot watch for Ctrl-C: {e}")))?;
    loop {
        let entry = tokio::select! {
            _ = interrupted.cancelled() => return Ok(()),
            entry = feed.next() => entry,
        };
        match entry {
            Ok(entry) => print_log(&entry, json),
            Err(end) => return Err(Failure::failed(format!("lost the log stream: {end}"))),
        }
    }
}

pub async fn login(
    remote: String,
    beacon: Vec<String>,
    token_file: Option<&Path>,
    ca_file: Option<std::path::PathBuf>,
) -> Result<()> {
    let insecure = INSECURE.load(Ordering::Relaxed);
    // Refused before a token is read: a URL that would send it in the clear.
    crate::client::check_url("remote", &remote, insecure)?;
    // Kept absolute, so that em finds it from any directory.
    let ca_file = ca_file
        .map(|path| std::path::absolute(&path))
        .transpose()
        .map_err(|e| Failure::usage(format!("--ca-file: {e}")))?;
    let token = match token_file {
        Some(path) => px_runtime::secrets::read_secret_file(path)
            .map_err(|e| Failure::usage(e.to_string()))?,
        None => {
            let mut text = String::new();
            std::io::stdin()
                .take(px_runtime::tokens::MAX_TOKEN_LEN as u64 + 2)
                .read_to_string(&mut text)?;
            text.trim().to_string()
        }
    };
    if token.is_empty() {
        return Err(Failure::usage(
            "no token given; pipe it in (`em login --remote URL < token`) or pass --token-file",
        ));
    }
    let beacons = if beacon.is_empty() {
        let url = reqwest::Url::parse(&remote)
            .map_err(|e| Failure::usage(format!("--remote {remote:?} is not a URL: {e}")))?;
        let port = url.port_or_known_default().unwrap_or(7070) + 1;
        vec![format!(
            "{}://{}:{port}",
            url.scheme(),
            url.host_str().unwrap_or("localhost")
        )]
    } else {
        beacon
    };
    let mut config = EmConfig {
        remote: remote.clone(),
        beacon: None,
        beacons: Vec::new(),
        token,
        app_url: None,
        ca_file,
        // Remembered: the operator chose plain HTTP for this remote.
        insecure,
    };
    config.set_beacon_urls(beacons);
    // Check before saving: the remote answers and takes the token.
    let client = Client::new(config.clone(), insecure)?;
    let _: Vec<api::App> = client.get(&client.repo("/v1/apps")).await?;
    let path = settings::save(&config)?;
    println!("logged in to {remote}; settings in {}", path.display());
    Ok(())
}

/// Whether the command line said `--insecure`. Set once by `main` before any command runs; a
/// flag rather than an argument because every command that talks to the platform goes through
/// [`client`].
static INSECURE: AtomicBool = AtomicBool::new(false);

/// Records the command line's `--insecure` for [`client`] and [`login`].
pub fn set_insecure(insecure: bool) {
    INSECURE.store(insecure, Ordering::Relaxed);
}

/// Loads the settings, or explains how to get some; their URLs are checked (see
/// [`crate::client::check_url`]).
pub fn client() -> Result<Client> {
    let config = settings::load().map_err(|f| Failure::new(EXIT_NOT_CONFIGURED, f.message))?;
    Client::new(config, INSECURE.load(Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_line_shows_an_apps_escape_sequences_as_text_and_keeps_tabs() {
        let entry = LogEntry {
            node: "web-1".into(),
            app: "shop".into(),
            release: 3,
            instance: 0,
            stream: px_proto::link::LogStream::Stdout,
            at: "2026-12-06T11:00:00Z".into(),
            line: "GET /\t200\x1b[31m\x1b]0;owned\x07\rcovered".into(),
            build: None,
            process: None,
        };
        assert_eq!(
            log_line(&entry),
            "2026-12-06T11:00:00Z web-1 v3#0 stdout: GET /\t200\\x1b[31m\\x1b]0;owned\\x07\\rcovered"
        );
    }
}
