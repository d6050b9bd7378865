//! What a Beacon failover keeps (docs/src/design/control-hosts.md, "What the next active Beacon
//! needs"): two Beacons over one apprepo on SeaweedFS, an alert webhook that counts, and an app
//! that reports the same error every half second. After the active Beacon stops, the one that
//! takes over lists the events recorded before the failover with their numbers, sends no alert
//! its predecessor sent within the dedup window, and records no "serving" event twice for one
//! release.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::acme_stack::{Stack, StackOptions, WAIT};
use px_beacon::config::ChallengeKind;
use px_proto::beacon::{Event, EventKind};

/// What the app reports over and over: one alert per dedup window, on whichever Beacon.
const ERROR_MESSAGE: &str = "payment provider unreachable";

/// The shop, reporting [`ERROR_MESSAGE`] as an error event every half second once it listens.
const REPORTING_SERVER_PY: &str = r#"import http.server, json, os, threading, time, urllib.request

def report():
    while True:
        body = json.dumps({"level": "error", "message": "payment provider unreachable"}).encode()
        request = urllib.request.Request(os.environ["PX_EVENTS_URL"], data=body, method="POST")
        request.add_header("Content-Type", "application/json")
        try:
            urllib.request.urlopen(request, timeout=5).read()
        except Exception:
            pass
        time.sleep(0.5)

class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(os.environ.get("GREETING", "hi").encode())

threading.Thread(target=report, daemon=True).start()
http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"#;

async fn deploy_reporting_shop(stack: &Stack) {
    let app_dir = tempfile::tempdir().unwrap();
    Stack::write_shop(app_dir.path(), "hello");
    std::fs::write(app_dir.path().join("server.py"), REPORTING_SERVER_PY).unwrap();
    stack.deploy_app("shop", app_dir.path()).await;
}

/// Every event the Beacon at `beacon_url` serves, oldest first, paging through them all.
async fn all_events(stack: &Stack, beacon_url: &str) -> Vec<Event> {
    let mut all: Vec<Event> = Vec::new();
    loop {
        let query = all
            .last()
            .map(|e| format!("?after={}&limit=1000", e.seq))
            .unwrap_or_else(|| "?limit=1000".into());
        let page: Vec<Event> = stack
            .get_json(format!("{beacon_url}/v1/events{query}"))
            .await;
        if page.is_empty() {
            return all;
        }
        all.extend(page);
    }
}

async fn wait_active(stack: &Stack, url: &str) {
    let start = Instant::now();
    loop {
        if let Ok(r) = stack
            .http
            .get(format!("{url}/v1/health/active"))
            .send()
            .await
            && r.status() == 200
        {
            return;
        }
        assert!(start.elapsed() < WAIT, "{url} never became active");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The alerts the webhook received about the app's error.
fn error_alerts(stack: &Stack) -> usize {
    stack
        .alerts
        .lock()
        .unwrap()
        .iter()
        .filter(|a| {
            a["text"]
                .as_str()
                .is_some_and(|t| t.contains(ERROR_MESSAGE))
        })
        .count()
}

/// Waits until `events` (read again each time) has an app event of the error numbered above
/// `above`.
async fn wait_error_event_above(stack: &Stack, beacon_url: &str, above: u64) {
    let start = Instant::now();
    loop {
        let events = all_events(stack, beacon_url).await;
        if events.iter().any(|e| {
            e.seq > above && e.kind == EventKind::AppEvent && e.message.contains(ERROR_MESSAGE)
        }) {
            return;
        }
        assert!(
            start.elapsed() < WAIT,
            "no app event above {above} reached {beacon_url}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The "serving" events a node recorded for each release of the shop: (node, release) pairs,
/// one per event.
fn serving(events: &[Event]) -> Vec<(String, u64)> {
    events
        .iter()
        .filter(|e| {
            e.kind == EventKind::DeployFinished
                && e.app.as_deref() == Some("shop")
                && e.message.contains("serving")
        })
        .map(|e| (e.node.clone().unwrap_or_default(), e.release.unwrap_or(0)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failover_keeps_the_events_repeats_no_alert_and_no_serving_event() {
    let options = StackOptions {
        seaweed: true,
        lease: true,
        alert_webhook: true,
        ..Default::default()
    };
    let Some(mut stack) = Stack::start_with(ChallengeKind::Http01, true, options).await else {
        return;
    };
    let active_url = stack.beacon_url.clone();
    wait_active(&stack, &active_url).await;
    let standby_url = stack.start_standby_beacon().await;

    deploy_reporting_shop(&stack).await;
    stack.wait_https("hello").await;
    let start = Instant::now();
    while error_alerts(&stack) == 0 {
        assert!(start.elapsed() < WAIT, "the app's error never alerted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = all_events(&stack, &active_url).await;
    let last_before = before.last().unwrap().seq;
    assert_eq!(serving(&before), [("web-1".to_string(), 1)], "{before:#?}");

    stack.stop_beacon().await;
    wait_active(&stack, &standby_url).await;
    // The app keeps reporting its error to the new active Beacon, which records it (so it
    // would alert, were the dedup state lost) above the new epoch's floor.
    let floor = 2u64 << 32;
    wait_error_event_above(&stack, &standby_url, floor).await;
    // Long enough for a node's "serving" to come again, had the rollout been forgotten.
    tokio::time::sleep(Duration::from_secs(20)).await;

    let after = all_events(&stack, &standby_url).await;
    let kept: Vec<&Event> = after.iter().filter(|e| e.seq <= last_before).collect();
    let before_refs: Vec<&Event> = before.iter().collect();
    assert_eq!(
        kept, before_refs,
        "the new active Beacon lists every event of the old one, in order, as it was"
    );
    assert!(
        after.iter().all(|e| e.seq <= last_before || e.seq > floor),
        "new events are numbered above the new epoch's floor"
    );
    assert!(after.windows(2).all(|w| w[0].seq < w[1].seq));
    let repeated = after
        .iter()
        .filter(|e| e.seq > floor && e.kind == EventKind::AppEvent)
        .count();
    assert!(repeated > 0);
    assert_eq!(
        error_alerts(&stack),
        1,
        "the error alerted once; {repeated} reports after the failover sent nothing: {:#?}",
        stack.alerts.lock().unwrap()
    );
    assert_eq!(
        serving(&after),
        [("web-1".to_string(), 1)],
        "one \"serving\" event for release 1: {:#?}",
        after.iter().filter(|e| e.seq > floor).collect::<Vec<_>>()
    );
    let rolled_out = after
        .iter()
        .filter(|e| e.kind == EventKind::DeployFinished && e.node.is_none())
        .count();
    assert_eq!(rolled_out, 1, "the rollout finished once");
    stack.stop().await;
}
