//! `em scale` (an app's formation: how many processes of each type run) and `em ps` (every
//! process of an app, from the nodes' latest reports).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use px_proto::api::Formation;
use px_proto::beacon::AppProcess;
use px_proto::link::InstanceState;
use px_proto::procfile::WEB_PROCESS;

use crate::client::Client;
use crate::failure::{Failure, Result};

/// Most `type=count` pairs in one `em scale`: one per process type an app may have, and web.
const MAX_SCALE_PAIRS: usize = px_proto::procfile::MAX_PROCESS_TYPES + 1;

/// Reads `type=count` pairs (`web=2 worker=3`); a bad pair is refused naming it.
pub fn parse_pairs(pairs: &[String]) -> Result<BTreeMap<String, u32>> {
    if pairs.len() > MAX_SCALE_PAIRS {
        return Err(Failure::usage(format!(
            "at most {MAX_SCALE_PAIRS} type=count pairs at once"
        )));
    }
    let mut counts = BTreeMap::new();
    for pair in pairs {
        let bad = || {
            Failure::usage(format!(
                "{pair:?} is not type=count; write e.g. web=2 worker=3"
            ))
        };
        let (kind, count) = pair.split_once('=').ok_or_else(bad)?;
        px_proto::process::check_process_name(kind).map_err(Failure::usage)?;
        let count: u32 = count.trim().parse().map_err(|_| bad())?;
        if counts.insert(kind.to_string(), count).is_some() {
            return Err(Failure::usage(format!("{kind} is given twice")));
        }
    }
    Ok(counts)
}

/// `em scale [type=count …]`: changes the counts given (only those), then prints the formation;
/// without pairs, prints it.
pub async fn scale(client: &Client, app: &str, pairs: &[String], json: bool) -> Result<()> {
    let change = parse_pairs(pairs)?;
    let url = client.repo(&format!("/v1/apps/{app}/formation"));
    let formation: Formation = if change.is_empty() {
        client.get(&url).await?
    } else {
        client
            .send_json(reqwest::Method::PUT, &url, &change)
            .await?
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&formation).unwrap_or_default()
        );
        return Ok(());
    }
    print!("{}", formation_text(&formation));
    Ok(())
}

/// The formation as `em scale` prints it.
fn formation_text(formation: &Formation) -> String {
    let Some(release) = formation.release else {
        return format!(
            "{} has no release yet; `em deploy` it first\n",
            formation.app
        );
    };
    let mut out = format!("{} v{release}:\n", formation.app);
    let width = formation
        .processes
        .iter()
        .map(|e| e.process.len() + 1 + e.count.to_string().len())
        .max()
        .unwrap_or(0);
    for entry in &formation.processes {
        let scope = if entry.process == WEB_PROCESS {
            "on each web server"
        } else {
            "across the cluster"
        };
        let origin = if entry.explicit {
            "set with em scale"
        } else {
            "the release's default"
        };
        let pair = format!("{}={}", entry.process, entry.count);
        out.push_str(&format!("  {pair:<width$}  {scope} ({origin})\n"));
    }
    out
}

/// `em ps`: one line per process of the app, on every node.
pub async fn ps(client: &Client, app: &str, json: bool) -> Result<()> {
    let rows: Vec<AppProcess> = client
        .get(&client.beacon(&format!("/v1/apps/{app}/processes")))
        .await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&rows).unwrap_or_default()
        );
        return Ok(());
    }
    if rows.is_empty() {
        println!("no process of {app} is reported yet");
        return Ok(());
    }
    print!("{}", table(&rows, SystemTime::now()));
    Ok(())
}

/// The rows as aligned columns: `worker.2  web-1  v7  running  up 3m  restarts 0  41.2 MiB  3%`.
fn table(rows: &[AppProcess], now: SystemTime) -> String {
    let cells: Vec<[String; 8]> = rows
        .iter()
        .map(|row| {
            let s = &row.status;
            [
                format!("{}.{}", s.process, s.number),
                row.node.clone(),
                format!("v{}", s.release),
                state_word(s.state).to_string(),
                uptime(s.started_at.as_deref(), now),
                format!("restarts {}", s.restarts),
                s.memory_bytes.map_or("-".into(), mebibytes),
                s.cpu_permille
                    .map_or("-".into(), |p| format!("{}%", (p + 5) / 10)),
            ]
        })
        .collect();
    let mut widths = [0usize; 8];
    for row in &cells {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &cells {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .enumerate()
            .map(|(column, (cell, width))| match column {
                // Figures align right, words left.
                6 | 7 => format!("{cell:>width$}"),
                _ => format!("{cell:<width$}"),
            })
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn state_word(state: InstanceState) -> &'static str {
    match state {
        InstanceState::Starting => "starting",
        InstanceState::Healthy => "running",
        InstanceState::Unhealthy => "unhealthy",
        InstanceState::Crashed => "crashed",
        InstanceState::Stopping => "stopping",
    }
}

/// `up 3m` from the start time, or `-` when it is not running.
fn uptime(started_at: Option<&str>, now: SystemTime) -> String {
    let Some(started) = started_at.and_then(|t| humantime::parse_rfc3339(t).ok()) else {
        return "-".into();
    };
    let up = now
        .duration_since(started)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    let text = match up {
        0..60 => format!("{up}s"),
        60..3600 => format!("{}m", up / 60),
        3600..86400 => format!("{}h{}m", up / 3600, up % 3600 / 60),
        _ => format!("{}d{}h", up / 86400, up % 86400 / 3600),
    };
    format!("up {text}")
}

fn mebibytes(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use px_proto::api::FormationEntry;
    use px_proto::link::InstanceStatus;

    fn row(process: &str, number: u32, node: &str, started: &str) -> AppProcess {
        AppProcess {
            node: node.into(),
            status: InstanceStatus {
                app: "shop".into(),
                release: 7,
                state: InstanceState::Healthy,
                pid: Some(4242),
                port: None,
                restarts: 0,
                last_exit: None,
                process: process.into(),
                number,
                started_at: Some(started.into()),
                memory_bytes: Some(43_200_000),
                cpu_permille: Some(31),
            },
        }
    }

    #[test]
    fn ps_prints_one_aligned_line_per_process() {
        let now = humantime::parse_rfc3339("2026-11-25T10:03:00Z").unwrap();
        let mut crashed = row("worker", 12, "web-10", "2026-11-25T10:02:50Z");
        crashed.status.state = InstanceState::Crashed;
        crashed.status.started_at = None;
        crashed.status.memory_bytes = None;
        crashed.status.cpu_permille = None;
        crashed.status.restarts = 3;
        let rows = [
            row("web", 1, "web-1", "2026-11-24T08:00:00Z"),
            row("worker", 2, "web-1", "2026-11-25T10:00:00Z"),
            crashed,
        ];
        assert_eq!(
            table(&rows, now),
            "web.1      web-1   v7  running  up 1d2h  restarts 0  41.2 MiB  3%\n\
             worker.2   web-1   v7  running  up 3m    restarts 0  41.2 MiB  3%\n\
             worker.12  web-10  v7  crashed  -        restarts 3         -   -\n"
        );
    }

    #[test]
    fn scale_pairs_are_checked_before_anything_is_sent() {
        let pairs = |p: &[&str]| p.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let counts = parse_pairs(&pairs(&["web=2", "worker=0"])).unwrap();
        assert_eq!(counts.get("web"), Some(&2));
        assert_eq!(counts.get("worker"), Some(&0));
        for (bad, says) in [
            ("worker", "not type=count"),
            ("worker=x", "not type=count"),
            ("worker=-1", "not type=count"),
            ("=3", "no process type name"),
            ("wörker=3", "no process type name"),
        ] {
            let error = parse_pairs(&pairs(&[bad])).unwrap_err();
            assert!(error.message.contains(says), "{bad}: {error}");
        }
        let twice = parse_pairs(&pairs(&["web=1", "web=2"])).unwrap_err();
        assert!(twice.message.contains("twice"), "{twice}");
    }

    #[test]
    fn the_formation_says_where_each_count_applies_and_where_it_comes_from() {
        let formation = Formation {
            app: "shop".into(),
            release: Some(7),
            processes: vec![
                FormationEntry {
                    process: "web".into(),
                    count: 2,
                    explicit: true,
                },
                FormationEntry {
                    process: "worker".into(),
                    count: 1,
                    explicit: false,
                },
            ],
        };
        assert_eq!(
            formation_text(&formation),
            "shop v7:\n  web=2     on each web server (set with em scale)\n  worker=1  across the cluster (the release's default)\n"
        );
    }
}
