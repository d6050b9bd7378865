//! The status page at `/`: nodes (with their disk), apps with their rollouts, repositories
//! (with their storage), and recent events, rendered on the server. A few lines of script refresh the content every few seconds without a reload.

use std::fmt::Write;

use px_proto::beacon::{NodeHealth, RolloutState};
use px_proto::link::DiskReport;

use crate::hub::Hub;

/// Events shown on the page.
pub const RECENT_EVENTS: usize = 25;

pub(crate) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

pub(crate) const STYLE: &str = "body{font:14px system-ui,sans-serif;margin:2em;color:#222}h1{font-size:1.4em}\
table{border-collapse:collapse;margin-bottom:2em;min-width:40em}th,td{text-align:left;padding:.3em .8em;border-bottom:1px solid #ddd}\
.ok{color:#16794c}.bad{color:#b3261e}.warn{color:#a66a00}small{color:#666}";

const REFRESH: &str = "setInterval(async()=>{try{const r=await fetch(location.pathname,{cache:'no-store'});\
const d=new DOMParser().parseFromString(await r.text(),'text/html');\
document.querySelector('main').replaceWith(d.querySelector('main'));}catch(e){}},3000);";

/// A byte count for people: `512 MiB`, `12.3 GiB`.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 || value >= 100.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// One cell on a peer's disk: what its data takes, and what is left (red near the floor).
fn disk_cell(disk: Option<&DiskReport>, what: &str) -> String {
    let Some(d) = disk else {
        return "<td><small>-</small></td>".into();
    };
    let objects = d.objects.map(|n| format!(" in {n}")).unwrap_or_default();
    let mut cell = format!("{}{objects} {what}", bytes(d.used_bytes));
    let mut class = "";
    if let Some(free) = d.free_bytes {
        let floor = d.floor_bytes.unwrap_or(0);
        class = if free <= floor.saturating_mul(2) {
            " class=bad"
        } else {
            ""
        };
        let _ = write!(cell, " · {} free", bytes(free));
        if floor > 0 {
            let _ = write!(cell, " (floor {})", bytes(floor));
        }
    }
    format!("<td{class}>{cell}</td>")
}

pub fn render(hub: &Hub) -> String {
    let nodes = hub.nodes();
    let apps = hub.apps();
    let events = hub.events().recent(RECENT_EVENTS);
    let connected = nodes
        .iter()
        .filter(|n| n.health == NodeHealth::Connected)
        .count();
    let mut html = String::new();
    let _ = write!(
        html,
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>Platform.X status</title>\
         <meta name=viewport content='width=device-width'><style>{STYLE}</style></head><body><main>\
         <h1>Platform.X</h1><p id=summary>{connected} of {} node(s) connected · {} app(s) · generation {} · repository {}</p>",
        nodes.len(),
        apps.len(),
        hub.generation(),
        if hub.repository_reachable() {
            "<span class=ok>reachable</span>"
        } else {
            "<span class=bad>unreachable</span>"
        },
    );
    html.push_str("<h2>Nodes</h2><table id=nodes><tr><th>node</th><th>link</th><th>instances</th><th>generation</th><th>labels</th><th>disk</th><th>last seen</th></tr>");
    for node in &nodes {
        let (class, health) = match node.health {
            NodeHealth::Connected => ("ok", "connected"),
            NodeHealth::Lost => ("bad", "lost"),
        };
        let instances: Vec<String> = node
            .instances
            .iter()
            .map(|i| {
                let process = if i.is_web() {
                    String::new()
                } else {
                    format!(" {}.{}", escape(&i.process), i.number)
                };
                format!("{}{process} v{} {:?}", escape(&i.app), i.release, i.state).to_lowercase()
            })
            .collect();
        let labels: Vec<String> = node
            .labels
            .iter()
            .map(|(k, v)| format!("{}={}", escape(k), escape(v)))
            .collect();
        let _ = write!(
            html,
            "<tr><td>{}</td><td class={class}>{health}</td><td>{}</td><td>{} / {}</td><td>{}</td>{}<td><small>{}</small></td></tr>",
            escape(&node.name),
            instances.join(", "),
            node.applied_generation,
            node.assigned_generation,
            labels.join(" "),
            disk_cell(node.disk.as_ref(), "of releases"),
            escape(&node.last_seen),
        );
    }
    html.push_str("</table><h2>Apps</h2><table id=apps><tr><th>app</th><th>release</th><th>rollout</th><th>healthy nodes</th><th>last deploy</th></tr>");
    for app in &apps {
        let (class, rollout) = match app.rollout {
            RolloutState::RolledOut => ("ok", "rolled out".to_string()),
            RolloutState::RollingOut => ("warn", "rolling out".to_string()),
            RolloutState::Failed => ("bad", "failed".to_string()),
            RolloutState::Unplaced => ("bad", "no eligible node".to_string()),
            RolloutState::RolledBack => ("bad", "rolled back".to_string()),
        };
        let took = app
            .rollout_seconds
            .map(|s| format!(" <small>in {s:.1}s</small>"))
            .unwrap_or_default();
        let f = app.figures;
        let deploy = app.outcome.clone().unwrap_or_else(|| {
            format!(
                "watching: {} requests, {} 5xx; {} to the previous release; {} connections moved, {} cut",
                f.new_requests, f.new_errors, f.old_requests, f.closed, f.cut
            )
        });
        let _ = write!(
            html,
            "<tr><td>{}</td><td>v{}</td><td class={class}>{rollout}{took}</td><td>{} / {}</td><td><small>{}</small></td></tr>",
            escape(&app.name),
            app.release,
            app.healthy_nodes,
            app.nodes.len(),
            escape(&deploy),
        );
    }
    let repositories = hub.repositories();
    if !repositories.is_empty() {
        html.push_str("</table><h2>Repositories</h2><table id=repositories><tr><th>repository</th><th>link</th><th>storage</th><th>last seen</th></tr>");
        for repo in &repositories {
            let (class, link) = if repo.connected {
                ("ok", "connected")
            } else {
                ("warn", "away")
            };
            let _ = write!(
                html,
                "<tr><td>{}</td><td class={class}>{link}</td>{}<td><small>{}</small></td></tr>",
                escape(&repo.name),
                disk_cell(repo.disk.as_ref(), "bundles"),
                escape(&repo.last_seen),
            );
        }
    }
    html.push_str("</table><h2>Recent events</h2><table id=events><tr><th>time</th><th>level</th><th>event</th></tr>");
    for event in &events {
        let class = match event.level {
            px_proto::beacon::Level::Info => "ok",
            px_proto::beacon::Level::Warning => "warn",
            px_proto::beacon::Level::Error | px_proto::beacon::Level::Critical => "bad",
        };
        let _ = write!(
            html,
            "<tr><td><small>{}</small></td><td class={class}>{:?}</td><td>{}</td></tr>",
            escape(&event.at),
            event.level,
            escape(&event.message),
        );
    }
    let _ = write!(
        html,
        "</table></main><script>{REFRESH}</script></body></html>"
    );
    html
}

#[cfg(test)]
mod tests {
    #[test]
    fn escapes_markup() {
        assert_eq!(
            super::escape("<a href='x'>&\"</a>"),
            "&lt;a href=&#39;x&#39;&gt;&amp;&quot;&lt;/a&gt;"
        );
    }
}
