//! App events, heartbeats and runtime requirements with real instances and real sockets: an
//! instance posts to its `PX_EVENTS_URL` and the event reaches Beacon, the events log and the
//! forwarded log lines; bad posts are refused and counted, and a flooding app neither gets past
//! its rate limit nor slows another app; connections held open or posts left half sent by a
//! neighbour lock no app out (nor get it restarted for missed heartbeats); an instance that
//! stops its heartbeats is restarted while one that never opted in is left alone; and a release
//! whose `runtime`/`requires` the node cannot meet is refused while the old one keeps serving.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{BeaconLink, BundleServer, FakeBeacon, Maestro, WAIT, alive, config, wait_gone};
use futures_util::{SinkExt, StreamExt};
use px_maestro::internals::{
    EVENT_BURST, EVENTS_PER_SECOND, MAX_CONNECTIONS, MAX_DRAIN_BYTES, MAX_EVENT_BYTES,
    MAX_REQUESTS_IN_FLIGHT, MISSED_HEARTBEATS,
};
use px_proto::beacon::Level;
use px_proto::link::{
    AppAssignment, Assignment, FailureKind, FromBeacon, LogStream, NodeEvent, NodeEventKind,
    ToBeacon,
};
use tokio::sync::mpsc;

/// An app for these tests (Python, standard library only):
/// - `/` answers `$GREETING`, `/pid` its pid, `/env` its `PX_*` variables, `PATH`,
///   `INSTANCE_PATH` (see `RUN`), and where `px-tool` is found on that;
/// - with `$ON_START` (a JSON text) it posts that to `$PX_EVENTS_URL` once it listens;
/// - with `HEARTBEAT=1` it sends a heartbeat every quarter of `$PX_HEARTBEAT_INTERVAL` until
///   `/heartbeat/stop` (which returns only once no heartbeat is in flight);
/// - `/flood?n=&threads=&seconds=` posts at least `n` events from `threads` threads for at
///   least `seconds`, and answers the count of each status and the time it took;
/// - `POST /relay` forwards its body to the events endpoint (`X-Method` for another method,
///   `X-Secret` for another secret) and answers the status and body it got.
const EVENTS_APP_PY: &str = r#"import http.server, json, os, shutil, sys, threading, time, urllib.error, urllib.request

URL = os.environ["PX_EVENTS_URL"]
beating = threading.Event()
beat_lock = threading.Lock()
if os.environ.get("HEARTBEAT") == "1":
    beating.set()

def post(body, method="POST", url=URL):
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode()
    request = urllib.request.Request(url, data=body, method=method)
    if body is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        try:
            return e.code, e.read().decode()
        except OSError as read_error:
            return e.code, "reading the answer: %r" % read_error
    except OSError as e:
        return 0, repr(e)

def heartbeats():
    interval = float(os.environ["PX_HEARTBEAT_INTERVAL"])
    while True:
        with beat_lock:
            if beating.is_set():
                status, body = post({"heartbeat": True})
                if status != 202:
                    print("heartbeat refused:", status, body, flush=True)
        time.sleep(interval / 4)

def flood(n, threads, seconds):
    lock = threading.Lock()
    state = {"sent": 0, "counts": {}}
    start = time.monotonic()
    def worker():
        while True:
            with lock:
                if state["sent"] >= n and time.monotonic() - start >= seconds:
                    return
                state["sent"] += 1
                i = state["sent"]
            status, _ = post({"level": "info", "message": "flood %d" % i})
            with lock:
                state["counts"][str(status)] = state["counts"].get(str(status), 0) + 1
    workers = [threading.Thread(target=worker) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return {"counts": state["counts"], "elapsed": time.monotonic() - start}

class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def reply(self, text, ctype="text/plain"):
        body = text.encode()
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        path, _, query = self.path.partition("?")
        q = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
        if path == "/pid":
            self.reply(str(os.getpid()))
        elif path == "/env":
            env = {k: v for k, v in os.environ.items() if k.startswith("PX_") or k == "PATH"}
            env["INSTANCE_PATH"] = os.environ.get("INSTANCE_PATH")
            env["which_px_tool"] = shutil.which("px-tool", path=os.environ.get("INSTANCE_PATH"))
            self.reply(json.dumps(env), "application/json")
        elif path == "/heartbeat/stop":
            with beat_lock:
                beating.clear()
            self.reply("stopped")
        elif path == "/flood":
            result = flood(int(q.get("n", "0")), int(q.get("threads", "1")), float(q.get("seconds", "0")))
            self.reply(json.dumps(result), "application/json")
        else:
            self.reply(os.environ.get("GREETING", "hi"))
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        method = self.headers.get("X-Method", "POST")
        url = URL
        if "X-Secret" in self.headers:
            url = URL.rsplit("/", 1)[0] + "/" + self.headers["X-Secret"]
        status, text = post(None if method == "GET" else body, method, url)
        self.reply(json.dumps({"status": status, "body": text}), "application/json")
    def log_message(self, *a):
        pass

server = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H)
threading.Thread(target=heartbeats, daemon=True).start()
if "ON_START" in os.environ:
    status, body = post(os.environ["ON_START"].encode())
    print("on-start event:", status, body.strip(), flush=True)
server.serve_forever()
"#;

/// How the app is started. The `PATH` Maestro gives the instance is kept in `INSTANCE_PATH`
/// before `python3` runs, since an interpreter shim (pyenv) may put its own directories first.
const RUN: &str = r#"export INSTANCE_PATH="$PATH"; exec python3 server.py "$1""#;

/// Every outcome `/metrics` counts.
const OUTCOMES: [&str; 7] = [
    "accepted",
    "heartbeat",
    "too_large",
    "rate_limited",
    "malformed",
    "unauthorized",
    "not_forwarded",
];

/// Packs an app (files with their modes), stores it on the bundle server, and returns its
/// assignment entry.
fn pack(
    bundles: &BundleServer,
    name: &str,
    release: u64,
    manifest: &str,
    files: &[(&str, &str, u32)],
    env: &[(&str, &str)],
) -> AppAssignment {
    bundles.app_with_modes(name, release, manifest, files, env)
}

/// The events app with `top` as top-level manifest keys, `health` inside `[health]`, and
/// `env` (with `GREETING` defaulting to the app's name).
fn events_app(
    bundles: &BundleServer,
    name: &str,
    release: u64,
    top: &str,
    health: &str,
    env: &[(&str, &str)],
) -> AppAssignment {
    let manifest = format!(
        "name = \"{name}\"\nrun = {RUN:?}\n{top}\n[health]\npath = \"/healthz\"\ntimeout = \"20s\"\n{health}\n"
    );
    let mut env = env.to_vec();
    if !env.iter().any(|(k, _)| *k == "GREETING") {
        env.push(("GREETING", name));
    }
    pack(
        bundles,
        name,
        release,
        &manifest,
        &[("server.py", EVENTS_APP_PY, 0o644)],
        &env,
    )
}

/// Beacon's side of the link, pumped by a task of its own: it answers every heartbeat at once
/// (so the link never drops while a test is busy elsewhere) and keeps every other frame, so a
/// test can wait for frames in any order and look back at what came.
struct Beacon {
    frames: mpsc::UnboundedReceiver<ToBeacon>,
    out: mpsc::UnboundedSender<FromBeacon>,
    /// Every frame but heartbeats, in arrival order.
    seen: Vec<ToBeacon>,
}

impl Beacon {
    async fn link(fake: &FakeBeacon) -> Self {
        let (link, _) = fake.accept().await;
        Self::pump(link)
    }

    fn pump(mut link: BeaconLink) -> Self {
        let (frames_tx, frames) = mpsc::unbounded_channel();
        let (out, mut out_rx) = mpsc::unbounded_channel::<FromBeacon>();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    message = out_rx.recv() => match message {
                        Some(m) => {
                            if link.send(m).await.is_err() {
                                return;
                            }
                        }
                        None => return,
                    },
                    frame = link.next() => match frame {
                        Some(Ok(ToBeacon::Heartbeat(_))) => {
                            if link.send(FromBeacon::Heartbeat).await.is_err() {
                                return;
                            }
                        }
                        Some(Ok(frame)) => {
                            if frames_tx.send(frame).is_err() {
                                return;
                            }
                        }
                        // The link ended: the receiver sees the channel close.
                        _ => return,
                    },
                }
            }
        });
        Self {
            frames,
            out,
            seen: Vec::new(),
        }
    }

    fn assign(&self, generation: u64, apps: Vec<AppAssignment>) {
        self.out
            .send(FromBeacon::Assign(Assignment {
                generation,
                apps,
                builds: Vec::new(),
                phases: Vec::new(),
            }))
            .unwrap();
    }

    /// The first frame, seen before or arriving within `WAIT`, for which `pick` gives a value.
    async fn wait_for<T>(&mut self, what: &str, mut pick: impl FnMut(&ToBeacon) -> Option<T>) -> T {
        if let Some(found) = self.seen.iter().find_map(&mut pick) {
            return found;
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let frame = tokio::time::timeout_at(deadline, self.frames.recv())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "waited {WAIT:?} for {what} in vain; saw {:#?}",
                        self.events()
                    )
                })
                .unwrap_or_else(|| panic!("the link ended while waiting for {what}"));
            let found = pick(&frame);
            self.seen.push(frame);
            if let Some(found) = found {
                return found;
            }
        }
    }

    async fn wait_event(&mut self, what: &str, want: impl Fn(&NodeEvent) -> bool) -> NodeEvent {
        self.wait_for(what, |frame| match frame {
            ToBeacon::Event(e) if want(e) => Some(e.clone()),
            _ => None,
        })
        .await
    }

    /// Takes in whatever arrived so far without waiting.
    fn drain(&mut self) {
        while let Ok(frame) = self.frames.try_recv() {
            self.seen.push(frame);
        }
    }

    /// Every event seen so far.
    fn events(&self) -> Vec<&NodeEvent> {
        self.seen
            .iter()
            .filter_map(|f| match f {
                ToBeacon::Event(e) => Some(e),
                _ => None,
            })
            .collect()
    }
}

/// `px_maestro_app_events_total` by outcome, from Maestro's `/metrics`.
async fn event_counts(maestro: &Maestro) -> BTreeMap<String, u64> {
    let text = maestro
        .http
        .get(format!("{}/metrics", maestro.status_url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let counts: BTreeMap<String, u64> = text
        .lines()
        .filter_map(|l| l.strip_prefix("px_maestro_app_events_total{result=\""))
        .map(|rest| {
            let (name, value) = rest.split_once("\"} ").unwrap();
            (name.to_string(), value.parse().unwrap())
        })
        .collect();
    assert_eq!(
        counts.keys().map(String::as_str).collect::<Vec<_>>(),
        {
            let mut names = OUTCOMES.to_vec();
            names.sort_unstable();
            names
        },
        "{text}"
    );
    counts
}

/// `before` with `changes` added: what the counters must read after exactly those posts.
fn plus(before: &BTreeMap<String, u64>, changes: &[(&str, u64)]) -> BTreeMap<String, u64> {
    let mut after = before.clone();
    for (name, n) in changes {
        *after.get_mut(*name).unwrap() += n;
    }
    after
}

async fn get_json(maestro: &Maestro, host: &str, path: &str) -> serde_json::Value {
    let (status, body) = maestro.get(host, path).await.unwrap();
    assert_eq!(status, 200, "{host}{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

async fn pid_of(maestro: &Maestro, host: &str) -> u32 {
    maestro.pid(host).await
}

/// Has the app's instance post through `POST /relay`; returns the status and body it got.
async fn relay(
    maestro: &Maestro,
    host: &str,
    body: impl Into<reqwest::Body>,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let mut request = maestro
        .http
        .post(format!("{}/relay", maestro.http_url))
        .header("host", host)
        .body(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200, "the relay itself failed");
    let answer: serde_json::Value = response.json().await.unwrap();
    (
        u16::try_from(answer["status"].as_u64().unwrap()).unwrap(),
        answer["body"].as_str().unwrap().to_string(),
    )
}

/// Polls `check` until it gives a value, failing after `WAIT` with `what`.
async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    mut check: impl FnMut() -> F,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            start.elapsed() < WAIT,
            "{what} did not happen within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_posted_by_an_instance_reaches_beacon_its_log_file_and_followers() {
    let dir = tempfile::tempdir().unwrap();
    let bundles = BundleServer::start().await;
    let fake = FakeBeacon::start().await;
    let maestro = Maestro::start(config(dir.path(), Some(&fake))).await;
    let mut beacon = Beacon::link(&fake).await;
    let before = event_counts(&maestro).await;
    assert!(before.values().all(|n| *n == 0), "{before:?}");

    let posted = r#"{"level": "error", "message": "payment provider unreachable", "fields": {"provider": "acme", "attempt": 3, "note": "timed out after 5s"}}"#;
    beacon.assign(
        1,
        vec![events_app(
            &bundles,
            "shop",
            1,
            "",
            "",
            &[("ON_START", posted)],
        )],
    );

    let event = beacon
        .wait_event("the app's event", |e| e.kind == NodeEventKind::AppEvent)
        .await;
    let rendered = "attempt=3 note=\"timed out after 5s\" provider=acme";
    assert_eq!(
        event,
        NodeEvent {
            kind: NodeEventKind::AppEvent,
            app: "shop".into(),
            release: 1,
            message: "payment provider unreachable".into(),
            detail: Some(rendered.into()),
            instance: Some(1),
            level: Some(Level::Error),
            failure: None,
            build: None,
        }
    );

    // The same event, as a line of the app's output, in a forwarded log batch.
    let expected_line = format!("[error] payment provider unreachable {rendered}");
    let line = beacon
        .wait_for("the event in a log batch", |frame| match frame {
            ToBeacon::Logs(batch) => batch
                .lines
                .iter()
                .find(|l| l.stream == LogStream::Event)
                .cloned(),
            _ => None,
        })
        .await;
    assert_eq!(
        (
            line.app.as_str(),
            line.release,
            line.instance,
            line.line.as_str()
        ),
        ("shop", 1, 1, expected_line.as_str())
    );

    // And in the app's events log, prefixed like its output.
    let events_log = maestro.log_dir.join("shop/events.log");
    let logged = eventually("the events.log line", || {
        let events_log = events_log.clone();
        async move {
            let text = std::fs::read_to_string(&events_log).ok()?;
            (!text.is_empty()).then_some(text)
        }
    })
    .await;
    let lines: Vec<&str> = logged.lines().collect();
    assert_eq!(lines.len(), 1, "{logged}");
    let (at, rest) = lines[0].split_once(' ').unwrap();
    assert!(humantime::parse_rfc3339(at).is_ok(), "{logged}");
    assert_eq!(rest, format!("v1 #1 {expected_line}"));

    // The instance saw its post accepted, and it is counted once.
    let stdout_log = maestro.log_dir.join("shop/stdout.log");
    let stdout = eventually("the instance's report of its post", || {
        let stdout_log = stdout_log.clone();
        async move {
            let text = std::fs::read_to_string(&stdout_log).ok()?;
            text.contains("on-start event:").then_some(text)
        }
    })
    .await;
    assert!(stdout.contains("on-start event: 202"), "{stdout}");
    assert_eq!(
        event_counts(&maestro).await,
        plus(&before, &[("accepted", 1)])
    );

    // What the instance was given: its own URL on loopback, and the default interval. (The
    // event was posted while the instance was starting, before traffic switched to it.)
    maestro.wait_body("shop.localhost", "shop").await;
    let env = get_json(&maestro, "shop.localhost", "/env").await;
    let url = env["PX_EVENTS_URL"].as_str().unwrap();
    let secret = url
        .strip_prefix("http://127.0.0.1:")
        .and_then(|rest| rest.split_once("/v1/events/"))
        .map(|(_, secret)| secret)
        .unwrap_or_else(|| panic!("unexpected PX_EVENTS_URL {url}"));
    assert!(
        secret.len() >= 32 && secret.chars().all(|c| c.is_ascii_hexdigit()),
        "{url}"
    );
    assert_eq!(env["PX_HEARTBEAT_INTERVAL"], "10");
    assert_eq!(env["PX_INSTANCE"], "1");
    // The secret never reaches the logs or Beacon.
    beacon.drain();
    assert!(!format!("{:?}", beacon.seen).contains(secret));
    assert!(!logged.contains(secret) && !stdout.contains(secret));
    maestro.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_posts_are_refused_and_counted_and_a_flood_disturbs_no_other_app() {
    let dir = tempfile::tempdir().unwrap();
    let bundles = BundleServer::start().await;
    let fake = FakeBeacon::start().await;
    let maestro = Maestro::start(config(dir.path(), Some(&fake))).await;
    let mut beacon = Beacon::link(&fake).await;
    let calm = events_app(&bundles, "calm", 1, "", "", &[]);
    let noisy = events_app(&bundles, "noisy", 1, "", "", &[]);
    beacon.assign(1, vec![calm, noisy.clone()]);
    maestro.wait_body("calm.localhost", "calm").await;
    maestro.wait_body("noisy.localhost", "noisy").await;
    let calm_url = get_json(&maestro, "calm.localhost", "/env").await["PX_EVENTS_URL"]
        .as_str()
        .unwrap()
        .to_string();
    let noisy_url = get_json(&maestro, "noisy.localhost", "/env").await["PX_EVENTS_URL"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(calm_url, noisy_url, "each instance has its own secret");

    // Each bad post, made by the calm app's instance, is refused with its own status and
    // counted under its own outcome, and nothing else moves.
    let oversized = format!(
        r#"{{"message": "big", "fields": {{"blob": "{}"}}}}"#,
        "x".repeat(9 * 1024)
    );
    assert!(oversized.len() > MAX_EVENT_BYTES);
    let wrong_secret = "0".repeat(48);
    // (what, body, relay headers, status, counted as, a word of the answer)
    let cases = [
        (
            "wrong secret",
            r#"{"message": "hi"}"#.to_string(),
            Some(("x-secret", wrong_secret.as_str())),
            (401, "unauthorized", "unknown secret"),
        ),
        ("9 KiB body", oversized, None, (413, "too_large", "at most")),
        (
            "malformed JSON",
            "{\"message\": ".into(),
            None,
            (400, "malformed", "not an event"),
        ),
        (
            "no message",
            r#"{"level": "info"}"#.into(),
            None,
            (400, "malformed", "\"message\""),
        ),
        (
            "unknown field",
            r#"{"message": "hi", "colour": "red"}"#.into(),
            None,
            (400, "malformed", "colour"),
        ),
        (
            "GET",
            String::new(),
            Some(("x-method", "GET")),
            (405, "malformed", "POST"),
        ),
    ];
    for (what, body, header, (status, outcome, hint)) in cases {
        let before = event_counts(&maestro).await;
        let headers: Vec<_> = header.into_iter().collect();
        let (got, answer) = relay(&maestro, "calm.localhost", body, &headers).await;
        assert_eq!(got, status, "{what}: {answer}");
        assert!(answer.contains(hint), "{what}: {answer}");
        assert_eq!(
            event_counts(&maestro).await,
            plus(&before, &[(outcome, 1)]),
            "{what}"
        );
    }
    // A client that sends its whole body before reading the answer (as urllib does) still
    // gets the 413 for a body far over the limit, rather than a reset connection.
    let before = event_counts(&maestro).await;
    let megabyte = usize::try_from(MAX_DRAIN_BYTES).unwrap();
    for _ in 0..20 {
        let (got, answer) = relay(&maestro, "calm.localhost", "x".repeat(megabyte), &[]).await;
        assert_eq!(got, 413, "a {megabyte}-byte post: {answer}");
    }
    assert_eq!(
        event_counts(&maestro).await,
        plus(&before, &[("too_large", 20)])
    );
    // From outside the instance too: a chunked body (no Content-Length) over the limit, and
    // a secret nobody was given.
    let before = event_counts(&maestro).await;
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..9).map(|_| Ok(vec![b' '; 1024])).collect();
    let response = maestro
        .http
        .post(&calm_url)
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    let base = calm_url.rsplit_once('/').unwrap().0;
    let response = maestro
        .http
        .post(format!("{base}/{wrong_secret}"))
        .body(r#"{"message": "let me in"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(
        event_counts(&maestro).await,
        plus(&before, &[("too_large", 1), ("unauthorized", 1)])
    );
    beacon.drain();
    assert!(
        beacon
            .events()
            .iter()
            .all(|e| e.kind != NodeEventKind::AppEvent),
        "a refused post became an event: {:#?}",
        beacon.events()
    );

    // The noisy app floods its endpoint from 8 threads for 2 s (at least 200 posts) while the
    // calm app is served through the proxy and still gets its own events through.
    let before = event_counts(&maestro).await;
    let flood = {
        let (http, url) = (maestro.http.clone(), maestro.http_url.clone());
        tokio::spawn(async move {
            http.get(format!("{url}/flood?n=200&threads=8&seconds=2"))
                .header("host", "noisy.localhost")
                .send()
                .await
                .unwrap()
                .json::<serde_json::Value>()
                .await
                .unwrap()
        })
    };
    let mut served = 0;
    let mut calm_event = None;
    let mut slowest = Duration::ZERO;
    while !flood.is_finished() {
        let start = Instant::now();
        let answer = maestro.get("calm.localhost", "/").await.unwrap();
        slowest = slowest.max(start.elapsed());
        assert_eq!(
            answer,
            (200, "calm".into()),
            "calm was not served during the flood"
        );
        served += 1;
        if served == 5 {
            let response = maestro
                .http
                .post(&calm_url)
                .body(r#"{"level": "warning", "message": "calm during the flood"}"#)
                .send()
                .await
                .unwrap();
            calm_event = Some(response.status().as_u16());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let result = flood.await.unwrap();
    eprintln!("flood: {result}; calm served {served} requests, slowest {slowest:?}");
    assert!(
        served >= 10,
        "the flood ended before calm was tested: {served}"
    );
    assert!(
        slowest < Duration::from_secs(2),
        "calm was slowed: {slowest:?}"
    );
    assert_eq!(calm_event, Some(202), "calm's own event was refused");
    let counts: BTreeMap<String, u64> = serde_json::from_value(result["counts"].clone()).unwrap();
    let elapsed = result["elapsed"].as_f64().unwrap();
    let accepted = counts.get("202").copied().unwrap_or(0);
    let limited = counts.get("429").copied().unwrap_or(0);
    assert_eq!(
        accepted + limited,
        counts.values().sum::<u64>(),
        "every post is accepted or rate limited: {counts:?}"
    );
    assert!(accepted + limited >= 200, "{counts:?}");
    assert!(limited > 0, "a flood was never rate limited: {counts:?}");
    // The bucket starts full, and refills at the sustained rate, never above the burst.
    assert!(accepted as f64 >= EVENT_BURST, "{counts:?}");
    assert!(
        accepted as f64 <= EVENT_BURST + EVENTS_PER_SECOND * elapsed + 1.0,
        "{accepted} accepted in {elapsed:.2} s: {counts:?}"
    );
    let after = event_counts(&maestro).await;
    assert_eq!(after["rate_limited"], before["rate_limited"] + limited);
    assert_eq!(
        after["accepted"] + after["not_forwarded"],
        before["accepted"] + before["not_forwarded"] + accepted + 1,
        "{before:?} → {after:?}"
    );
    let warning = beacon
        .wait_event("calm's event", |e| {
            e.kind == NodeEventKind::AppEvent && e.app == "calm"
        })
        .await;
    assert_eq!(
        (warning.message.as_str(), warning.level),
        ("calm during the flood", Some(Level::Warning))
    );

    // A secret speaks only for its own instance: what is posted with calm's URL is calm's,
    // whatever it claims.
    let response = maestro
        .http
        .post(&calm_url)
        .body(r#"{"message": "I am noisy", "fields": {"app": "noisy"}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let claimed = beacon
        .wait_event("the impersonation", |e| e.message == "I am noisy")
        .await;
    assert_eq!((claimed.app.as_str(), claimed.instance), ("calm", Some(1)));
    // Once calm's instance is gone, so is its secret.
    let calm_pid = pid_of(&maestro, "calm.localhost").await;
    beacon.assign(2, vec![noisy]);
    eventually("calm's instance to stop", || async {
        maestro
            .state()
            .await
            .instances
            .iter()
            .all(|i| i.app != "calm")
            .then_some(())
    })
    .await;
    assert!(!alive(calm_pid));
    let before = event_counts(&maestro).await;
    let response = maestro
        .http
        .post(&calm_url)
        .body(r#"{"message": "from beyond"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(
        event_counts(&maestro).await,
        plus(&before, &[("unauthorized", 1)])
    );
    // None of this touched noisy, which still serves.
    assert_eq!(
        maestro.get("noisy.localhost", "/").await.unwrap(),
        (200, "noisy".into())
    );
    beacon.drain();
    assert!(
        beacon
            .events()
            .iter()
            .all(|e| e.app != "noisy" || e.kind != NodeEventKind::InstanceCrashed),
        "{:#?}",
        beacon.events()
    );
    maestro.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_whose_heartbeats_stop_is_restarted_and_one_that_never_sent_any_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let bundles = BundleServer::start().await;
    let fake = FakeBeacon::start().await;
    let maestro = Maestro::start(config(dir.path(), Some(&fake))).await;
    let mut beacon = Beacon::link(&fake).await;
    beacon.assign(
        1,
        vec![
            events_app(
                &bundles,
                "beats",
                1,
                "",
                "heartbeat_interval = \"1s\"",
                &[("HEARTBEAT", "1")],
            ),
            events_app(
                &bundles,
                "silent",
                1,
                "",
                "heartbeat_interval = \"1500ms\"",
                &[],
            ),
        ],
    );
    maestro.wait_body("beats.localhost", "beats").await;
    maestro.wait_body("silent.localhost", "silent").await;
    let silent_since = Instant::now();
    let silent_pid = pid_of(&maestro, "silent.localhost").await;
    let beats_pid = pid_of(&maestro, "beats.localhost").await;
    let interval = Duration::from_secs(1);
    assert_eq!(
        get_json(&maestro, "beats.localhost", "/env").await["PX_HEARTBEAT_INTERVAL"],
        "1"
    );
    assert_eq!(
        get_json(&maestro, "silent.localhost", "/env").await["PX_HEARTBEAT_INTERVAL"],
        "1.5"
    );

    // While it sends heartbeats (four an interval), it is left alone well past the point
    // where silence would have ended it.
    eventually("the first heartbeat", || async {
        (event_counts(&maestro).await["heartbeat"] > 0).then_some(())
    })
    .await;
    let opted_in = Instant::now();
    eventually(
        "heartbeats for more than the missed-heartbeat deadline",
        || async {
            (opted_in.elapsed() > interval * (MISSED_HEARTBEATS + 1)
                && event_counts(&maestro).await["heartbeat"] >= 12)
                .then_some(())
        },
    )
    .await;
    assert_eq!(pid_of(&maestro, "beats.localhost").await, beats_pid);

    // It stops sending them but keeps serving: after MISSED_HEARTBEATS intervals it is
    // stopped, reported, and started again.
    let (status, body) = maestro
        .get("beats.localhost", "/heartbeat/stop")
        .await
        .unwrap();
    assert_eq!((status, body.as_str()), (200, "stopped"));
    let stopped = Instant::now();
    let unhealthy = beacon
        .wait_event("the missed-heartbeat report", |e| {
            e.kind == NodeEventKind::InstanceUnhealthy
        })
        .await;
    let silence = stopped.elapsed();
    assert_eq!((unhealthy.app.as_str(), unhealthy.release), ("beats", 1));
    assert_eq!(unhealthy.failure, Some(FailureKind::MissedHeartbeats));
    assert!(
        unhealthy.message.contains("instance 1 sent no heartbeat")
            && unhealthy.message.contains("PX_HEARTBEAT_INTERVAL=1)"),
        "{}",
        unhealthy.message
    );
    // A heartbeat may have gone out a quarter interval before the stop; none after it.
    assert!(
        silence >= interval * MISSED_HEARTBEATS - interval / 2,
        "restarted after only {silence:?} of silence"
    );
    assert!(
        silence < interval * MISSED_HEARTBEATS + Duration::from_secs(5),
        "{silence:?}"
    );
    let new_pid = eventually("beats to serve from a new process", || async {
        Some(maestro.pid("beats.localhost").await).filter(|p| *p != beats_pid)
    })
    .await;
    wait_gone(beats_pid).await;
    assert_eq!(
        maestro.get("beats.localhost", "/").await.unwrap(),
        (200, "beats".into())
    );
    // The state report follows the route switch closely, not at once.
    let beats = eventually("the restart in the state report", || async {
        let state = maestro.state().await;
        state
            .instances
            .into_iter()
            .find(|i| i.app == "beats" && i.pid == Some(new_pid))
    })
    .await;
    assert_eq!(beats.restarts, 1, "{beats:?}");
    assert!(beats.last_exit.is_some(), "{beats:?}");

    // The app that never sent a heartbeat was never watched for one: same process, no event,
    // more than MISSED_HEARTBEATS of its intervals (1.5 s) after it started.
    let silent_interval = Duration::from_millis(1500);
    let window = silent_interval * (MISSED_HEARTBEATS + 1);
    if let Some(rest) = window.checked_sub(silent_since.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    assert_eq!(pid_of(&maestro, "silent.localhost").await, silent_pid);
    let state = maestro.state().await;
    let silent = state.instances.iter().find(|i| i.app == "silent").unwrap();
    assert_eq!((silent.pid, silent.restarts), (Some(silent_pid), 0));
    beacon.drain();
    let events = beacon.events();
    assert!(
        events.iter().all(|e| e.app != "silent"
            || !matches!(
                e.kind,
                NodeEventKind::InstanceUnhealthy | NodeEventKind::InstanceCrashed
            )),
        "{events:#?}"
    );
    assert_eq!(
        events
            .iter()
            .filter(|e| e.kind == NodeEventKind::InstanceUnhealthy)
            .count(),
        1,
        "{events:#?}"
    );
    maestro.stop().await;
}

/// The version `python3 --version` prints on this machine (Maestro's `PATH` is ours).
fn host_python_version() -> String {
    let output = std::process::Command::new("python3")
        .arg("--version")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).to_string()
        + &String::from_utf8_lossy(&output.stderr);
    text.split_whitespace()
        .find(|w| w.starts_with(|c: char| c.is_ascii_digit()))
        .unwrap_or_else(|| panic!("no version in {text:?}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_whose_requirements_are_unmet_is_refused_and_the_old_one_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let bundles = BundleServer::start().await;
    let fake = FakeBeacon::start().await;
    let cfg = config(dir.path(), Some(&fake));
    let node = cfg.node_name.clone();
    let maestro = Maestro::start(cfg).await;
    let mut beacon = Beacon::link(&fake).await;
    let app = |release: u64, greeting: &str, top: &str| {
        events_app(&bundles, "rt", release, top, "", &[("GREETING", greeting)])
    };
    beacon.assign(1, vec![app(1, "one", "runtime = \"python3>=3\"")]);
    beacon
        .wait_event("v1 deployed", |e| {
            e.kind == NodeEventKind::DeployFinished && e.release == 1
        })
        .await;
    maestro.wait_body("rt.localhost", "one").await;
    let v1_pid = pid_of(&maestro, "rt.localhost").await;

    // A newer Python than the node has.
    beacon.assign(2, vec![app(2, "two", "runtime = \"python3>=99\"")]);
    let failed = beacon
        .wait_event("v2 refused", |e| {
            e.kind == NodeEventKind::DeployFailed && e.release == 2
        })
        .await;
    let python = host_python_version();
    for part in [
        format!("on {node}:"),
        "needs python3>=99".into(),
        format!("found python3 {python}"),
        "v1 keeps serving".into(),
    ] {
        assert!(
            failed.message.contains(&part),
            "{part:?} not in {:?}",
            failed.message
        );
    }
    assert_eq!(
        maestro.get("rt.localhost", "/").await.unwrap(),
        (200, "one".into())
    );
    assert_eq!(pid_of(&maestro, "rt.localhost").await, v1_pid);

    // A command the node does not have.
    beacon.assign(
        3,
        vec![app(3, "three", "requires = [\"px-no-such-command\"]")],
    );
    let failed = beacon
        .wait_event("v3 refused", |e| {
            e.kind == NodeEventKind::DeployFailed && e.release == 3
        })
        .await;
    for part in [
        format!("on {node}:"),
        "`px-no-such-command` is not installed".into(),
        "v1 keeps serving".into(),
    ] {
        assert!(
            failed.message.contains(&part),
            "{part:?} not in {:?}",
            failed.message
        );
    }
    assert_eq!(
        maestro.get("rt.localhost", "/").await.unwrap(),
        (200, "one".into())
    );
    let state = maestro.state().await;
    assert_eq!(state.instances.len(), 1, "{state:?}");
    assert_eq!(
        (state.instances[0].release, state.instances[0].pid),
        (1, Some(v1_pid))
    );

    // A tool the bundle ships in its own bin/: found there first, and its version counts.
    let tool = "#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'px-tool 2.5.0'; exit 0; fi\necho \"px-tool: $*\"\n";
    let with_tool = |release: u64, greeting: &str, requirement: &str| {
        let manifest = format!(
            "name = \"rt\"\nrun = {RUN:?}\nruntime = \"{requirement}\"\n[health]\npath = \"/healthz\"\ntimeout = \"20s\"\n"
        );
        pack(
            &bundles,
            "rt",
            release,
            &manifest,
            &[
                ("server.py", EVENTS_APP_PY, 0o644),
                ("bin/px-tool", tool, 0o755),
            ],
            &[("GREETING", greeting)],
        )
    };
    beacon.assign(4, vec![with_tool(4, "four", "px-tool>=2")]);
    beacon
        .wait_event("v4 deployed", |e| {
            e.release == 4
                && matches!(
                    e.kind,
                    NodeEventKind::DeployFinished | NodeEventKind::DeployFailed
                )
        })
        .await;
    beacon.drain();
    let v4 = beacon
        .events()
        .iter()
        .find(|e| e.release == 4 && e.kind == NodeEventKind::DeployFailed)
        .map(|e| e.message.clone());
    assert_eq!(v4, None, "v4 was refused");
    maestro.wait_body("rt.localhost", "four").await;
    let bin = maestro.state_dir.join("apps/rt/releases/4/bin");
    let env = get_json(&maestro, "rt.localhost", "/env").await;
    let path = env["INSTANCE_PATH"].as_str().unwrap();
    assert_eq!(
        path.split(':').next(),
        Some(bin.to_str().unwrap()),
        "the release's bin/ comes first on PATH: {path}"
    );
    assert_eq!(
        env["which_px_tool"].as_str(),
        Some(bin.join("px-tool").to_str().unwrap())
    );
    // The version checked is the bundled tool's.
    beacon.assign(5, vec![with_tool(5, "five", "px-tool>=3")]);
    let failed = beacon
        .wait_event("v5 refused", |e| {
            e.kind == NodeEventKind::DeployFailed && e.release == 5
        })
        .await;
    assert!(
        failed
            .message
            .contains("needs px-tool>=3, found px-tool 2.5.0")
            && failed.message.contains("v4 keeps serving"),
        "{}",
        failed.message
    );
    assert_eq!(
        maestro.get("rt.localhost", "/").await.unwrap(),
        (200, "four".into())
    );
    maestro.stop().await;
}

/// Opens a connection to the events endpoint and sends `head` (a request without its body).
async fn half_sent(addr: &str, head: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    stream
}

/// The status of the answer on `stream`, if one comes within `wait`.
async fn status_within(stream: &mut tokio::net::TcpStream, wait: Duration) -> Option<u16> {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(wait, stream.read(&mut buf))
        .await
        .ok()?
        .ok()?;
    let head = String::from_utf8_lossy(&buf[..n]);
    head.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_held_open_by_a_neighbour_lock_no_app_out() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let bundles = BundleServer::start().await;
    let fake = FakeBeacon::start().await;
    let maestro = Maestro::start(config(dir.path(), Some(&fake))).await;
    let mut beacon = Beacon::link(&fake).await;
    beacon.assign(
        1,
        vec![
            events_app(
                &bundles,
                "beats",
                1,
                "",
                "heartbeat_interval = \"1s\"",
                &[("HEARTBEAT", "1")],
            ),
            events_app(&bundles, "calm", 1, "", "", &[]),
        ],
    );
    maestro.wait_body("beats.localhost", "beats").await;
    maestro.wait_body("calm.localhost", "calm").await;
    let beats_pid = pid_of(&maestro, "beats.localhost").await;
    let calm_url = get_json(&maestro, "calm.localhost", "/env").await["PX_EVENTS_URL"]
        .as_str()
        .unwrap()
        .to_string();
    let (addr, calm_path) = calm_url
        .strip_prefix("http://")
        .unwrap()
        .split_once('/')
        .map(|(addr, path)| (addr.to_string(), format!("/{path}")))
        .unwrap();
    eventually("the first heartbeat", || async {
        (event_counts(&maestro).await["heartbeat"] > 0).then_some(())
    })
    .await;

    // A neighbour opens connections to the endpoint and never sends a request on them,
    // keeping 200 open: more than the endpoint serves at once.
    let stop = Arc::new(AtomicBool::new(false));
    let (open, cut) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let hog = {
        let (stop, open, cut, addr) = (stop.clone(), open.clone(), cut.clone(), addr.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                // At most 20 new connections every 10 ms: enough to keep the endpoint full.
                for _ in 0..20 {
                    if open.load(Ordering::Relaxed) >= 200 || stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok(mut stream) = tokio::net::TcpStream::connect(&addr).await else {
                        break;
                    };
                    open.fetch_add(1, Ordering::Relaxed);
                    let (stop, open, cut) = (stop.clone(), open.clone(), cut.clone());
                    tokio::spawn(async move {
                        use tokio::io::AsyncReadExt;
                        let mut buf = [0u8; 64];
                        while !stop.load(Ordering::Relaxed) {
                            if let Ok(read) = tokio::time::timeout(
                                Duration::from_millis(100),
                                stream.read(&mut buf),
                            )
                            .await
                            {
                                // Closed by the endpoint.
                                if matches!(read, Ok(0) | Err(_)) {
                                    cut.fetch_add(1, Ordering::Relaxed);
                                    break;
                                }
                            }
                        }
                        open.fetch_sub(1, Ordering::Relaxed);
                    });
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    eventually(
        "the neighbour to hold the endpoint's connections",
        || async {
            (open.load(Ordering::Relaxed) as usize > MAX_CONNECTIONS
                && cut.load(Ordering::Relaxed) > 0)
                .then_some(())
        },
    )
    .await;
    let siege = Instant::now();
    let heartbeats = event_counts(&maestro).await["heartbeat"];
    // Other apps are still heard, at once...
    let (status, answer) = relay(
        &maestro,
        "calm.localhost",
        r#"{"message": "heard through the siege"}"#,
        &[],
    )
    .await;
    assert_eq!(status, 202, "{answer}");
    assert!(
        siege.elapsed() < Duration::from_secs(2),
        "{:?}",
        siege.elapsed()
    );
    // ...and their heartbeats keep arriving, so nothing is restarted.
    let interval = Duration::from_secs(1);
    eventually("heartbeats through the siege", || async {
        (siege.elapsed() > interval * (MISSED_HEARTBEATS + 1)
            && event_counts(&maestro).await["heartbeat"] >= heartbeats + 12)
            .then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    hog.await.unwrap();
    eprintln!(
        "the neighbour had {} connections cut in {:?}",
        cut.load(Ordering::Relaxed),
        siege.elapsed()
    );
    assert_eq!(pid_of(&maestro, "beats.localhost").await, beats_pid);
    beacon.drain();
    assert!(
        beacon
            .events()
            .iter()
            .all(|e| e.kind != NodeEventKind::InstanceUnhealthy),
        "{:#?}",
        beacon.events()
    );

    // An instance that starts posts and never finishes them holds only a few requests: the
    // rest are refused at once, and other apps are heard meanwhile.
    let before = event_counts(&maestro).await;
    let head = format!(
        "POST {calm_path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n"
    );
    let mut streams = Vec::new();
    for _ in 0..20 {
        streams.push(half_sent(&addr, &head).await);
    }
    // All read at once: the held ones must still be held (not timed out) for what follows.
    let answers = futures_util::future::join_all(streams.into_iter().map(|mut stream| async {
        let status = status_within(&mut stream, Duration::from_secs(1)).await;
        (status, stream)
    }))
    .await;
    let mut refused = 0;
    let mut held = Vec::new();
    for (status, stream) in answers {
        match status {
            Some(429) => refused += 1,
            None => held.push(stream),
            Some(other) => panic!("a half-sent post answered {other}"),
        }
    }
    assert_eq!(
        (held.len(), refused),
        (MAX_REQUESTS_IN_FLIGHT, 20 - MAX_REQUESTS_IN_FLIGHT)
    );
    let (status, answer) = relay(&maestro, "calm.localhost", r#"{"message": "me too"}"#, &[]).await;
    assert_eq!(status, 429, "{answer}");
    assert!(answer.contains("at once"), "{answer}");
    let beats_url = get_json(&maestro, "beats.localhost", "/env").await["PX_EVENTS_URL"]
        .as_str()
        .unwrap()
        .to_string();
    let response = maestro
        .http
        .post(&beats_url)
        .body(r#"{"message": "beats is heard"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let after = event_counts(&maestro).await;
    assert_eq!(
        after["rate_limited"],
        before["rate_limited"] + 20 - MAX_REQUESTS_IN_FLIGHT as u64 + 1
    );
    // Once the neighbour gives up its posts, calm can post again.
    drop(held);
    eventually("calm to be heard again", || async {
        let (status, _) = relay(&maestro, "calm.localhost", r#"{"message": "back"}"#, &[]).await;
        (status == 202).then_some(())
    })
    .await;
    assert_eq!(pid_of(&maestro, "beats.localhost").await, beats_pid);
    maestro.stop().await;
}
