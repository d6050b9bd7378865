//! One-off commands (`em run`, docs/src/design/processes.md): `POST /v1/apps/{app}/run`
//! (deploy role) picks the node that runs the app with the fewest runs, asks it to start the
//! command, upgrades the connection to `px-run` and relays frames between `em` and the node's
//! link, within the window of `px_proto::run`. The run ends when the process exits, when
//! `em` leaves (the node hangs it up) or when the node's link drops (`em` is told so).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use px_proto::beacon::EventKind;
use px_proto::codec::FrameCodec;
use px_proto::link::FromBeacon;
use px_proto::run::{
    MAX_RUNS_PER_APP, MAX_RUNS_PER_NODE, NodeRunFrame, RUN_QUEUE_FRAMES, RUN_UPGRADE,
    RUN_WINDOW_BYTES, RunExit, RunFromEm, RunFromNode, RunRequest, RunStart, RunToEm,
};
use tokio::sync::mpsc;
use tokio_util::codec::Framed;

use crate::auth::Role;
use crate::events::EventDraft;
use crate::http::{ApiError, AppState};

/// How long Beacon waits for the node's word that a detached run started.
pub const DETACH_START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long Beacon waits, after `em` left, for the node to report the exit of the run it hung
/// up: the SIGHUP, SIGTERM, SIGKILL sequence is shorter, so the finished event names a status.
pub const EXIT_AFTER_HANGUP: Duration = Duration::from_secs(30);
/// Largest request body: the command within its limit, as JSON.
pub const MAX_RUN_BODY_BYTES: usize = 2 * px_proto::run::MAX_RUN_COMMAND_BYTES + 4096;

/// The runs Beacon relays, by id, so the link tasks can route a node's run frames.
#[derive(Default)]
pub struct Runs {
    inner: Mutex<HashMap<u64, Entry>>,
    next: AtomicU64,
}

struct Entry {
    node: String,
    conn: u64,
    app: String,
    frames: mpsc::Sender<RunFromNode>,
}

impl Runs {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Entry>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands a node's run frame to its relay. A frame of an unknown run is dropped (the run
    /// ended here first); a relay whose queue is full faces a node that ignored the window,
    /// and its run is ended.
    pub fn route(&self, node: &str, frame: RunFromNode) {
        let run = frame.run();
        let mut runs = self.lock();
        let Some(entry) = runs.get(&run).filter(|e| e.node == node) else {
            return;
        };
        if entry.frames.try_send(frame).is_err() {
            tracing::warn!(run, %node, "node sent past its run window; ending the run");
            runs.remove(&run);
        }
    }

    /// The node's link `conn` ended: each of its runs' relays sees its queue close.
    pub fn node_gone(&self, node: &str, conn: u64) {
        self.lock()
            .retain(|_, e| !(e.node == node && e.conn == conn));
    }

    fn forget(&self, run: u64) {
        self.lock().remove(&run);
    }

    /// Registers a run on the node with the fewest runs, within the limits.
    fn register(
        &self,
        app: &str,
        nodes: &[crate::hub::RunNode],
    ) -> Result<(u64, crate::hub::RunNode, mpsc::Receiver<RunFromNode>), ApiError> {
        let mut runs = self.lock();
        if runs.values().filter(|e| e.app == app).count() >= MAX_RUNS_PER_APP {
            return Err(ApiError::TooMany(format!(
                "{app} already has {MAX_RUNS_PER_APP} runs at once; wait for one to end"
            )));
        }
        let load = |name: &str| runs.values().filter(|e| e.node == name).count();
        let node = nodes
            .iter()
            .filter(|n| load(&n.name) < MAX_RUNS_PER_NODE)
            .min_by_key(|n| (load(&n.name), n.name.clone()))
            .cloned()
            .ok_or_else(|| {
                ApiError::TooMany(format!(
                    "every node that runs {app} already has {MAX_RUNS_PER_NODE} runs"
                ))
            })?;
        let run = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = mpsc::channel(RUN_QUEUE_FRAMES);
        runs.insert(
            run,
            Entry {
                node: node.name.clone(),
                conn: node.conn,
                app: app.to_string(),
                frames: tx,
            },
        );
        Ok((run, node, rx))
    }
}

/// The caller of a run: a deploy token that may act on `app`, named for the events.
fn deployer(state: &AppState, headers: &HeaderMap, app: &str) -> Result<String, ApiError> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .ok_or_else(|| ApiError::Unauthorized("send `Authorization: Bearer <token>`".into()))?;
    let entry = state.tokens.verify(token.trim()).ok_or_else(|| {
        ApiError::Unauthorized("unknown token; check `em login` or the token file".into())
    })?;
    if entry.role != Role::Deploy {
        return Err(ApiError::Forbidden(format!(
            "token {:?} may not run commands; a deploy token may",
            entry.name
        )));
    }
    if !entry.allows_app(app) {
        return Err(crate::auth::not_its_app(
            &entry.name,
            entry.apps.as_deref(),
            app,
        ));
    }
    Ok(entry.name.clone())
}

/// `POST /v1/apps/{app}/run`.
pub(crate) async fn run(
    State(state): State<AppState>,
    Path(app): Path<String>,
    mut request: Request<Body>,
) -> Result<Response, ApiError> {
    let who = deployer(&state, request.headers(), &app)?;
    let upgrade = request
        .headers()
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(RUN_UPGRADE.as_bytes()));
    let on_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));
    let body = axum::body::to_bytes(request.into_body(), MAX_RUN_BODY_BYTES)
        .await
        .map_err(|e| ApiError::BadRequest(format!("cannot read the run request: {e}")))?;
    let wanted: RunRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("expected a run request: {e}")))?;
    wanted
        .validate()
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    if !wanted.detach && on_upgrade.is_none() {
        return Err(ApiError::BadRequest(format!(
            "an attached run needs `Connection: upgrade` and `Upgrade: {RUN_UPGRADE}`"
        )));
    }
    let (release, nodes) = state.hub.run_nodes(&app).map_err(|e| match e {
        crate::hub::RunPlaceError::NoRelease(_) => ApiError::NotFound(e.to_string()),
        crate::hub::RunPlaceError::NoNode { .. } => ApiError::Unavailable(e.to_string()),
    })?;
    let runs = state.runs.clone();
    let (id, node, mut frames) = runs.register(&app, &nodes)?;
    let start = RunStart {
        run: id,
        app: app.clone(),
        release,
        command: wanted.command.clone(),
        tty: wanted.tty,
        size: wanted.size,
        detach: wanted.detach,
    };
    if node
        .commands
        .send(Box::new(FromBeacon::Run(NodeRunFrame::Start(start))))
        .await
        .is_err()
    {
        runs.forget(id);
        return Err(ApiError::Unavailable(format!(
            "node {} left before the run started; try again",
            node.name
        )));
    }
    let what = shell_words(&wanted.command);
    tracing::info!(%app, run = id, node = %node.name, by = %who, command = %what, "run requested");
    let run = Run {
        id,
        app,
        release,
        node: node.name.clone(),
        commands: node.commands,
        who,
        what,
        started: Instant::now(),
    };
    if wanted.detach {
        let first = tokio::time::timeout(DETACH_START_TIMEOUT, frames.recv()).await;
        return match first {
            Ok(Some(RunFromNode::Started { .. })) => {
                run.started_event(&state);
                let answer = RunToEm::Started {
                    run: id,
                    node: run.node.clone(),
                    release,
                };
                tokio::spawn(run.detached(state, frames));
                Ok((StatusCode::CREATED, Json(answer)).into_response())
            }
            Ok(Some(RunFromNode::Failed { message, .. })) => {
                runs.forget(id);
                Err(ApiError::Unavailable(message))
            }
            _ => {
                runs.forget(id);
                let _ = run.hang_up().await;
                Err(ApiError::Unavailable(format!(
                    "node {} did not start the run",
                    run.node
                )))
            }
        };
    }
    let Some(on_upgrade) = on_upgrade else {
        return Err(ApiError::BadRequest("no upgrade".into()));
    };
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let io = hyper_util::rt::TokioIo::new(upgraded);
                let em = Framed::new(io, FrameCodec::<RunFromEm, RunToEm>::new());
                run.relay(state, em, frames).await;
            }
            Err(e) => {
                tracing::info!(run = id, error = %e, "run connection not upgraded; hanging up");
                state.runs.forget(id);
                let _ = run.hang_up().await;
            }
        }
    });
    let mut response = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static(RUN_UPGRADE));
    Ok(response)
}

/// The command as a person reads it: words with spaces quoted.
fn shell_words(command: &[String]) -> String {
    command
        .iter()
        .map(|w| {
            if !w.is_empty()
                && w.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c))
            {
                w.clone()
            } else {
                format!("'{}'", w.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// One run as Beacon relays it.
struct Run {
    id: u64,
    app: String,
    release: u64,
    node: String,
    commands: crate::hub::CommandSender,
    who: String,
    what: String,
    started: Instant,
}

type EmConnection =
    Framed<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>, FrameCodec<RunFromEm, RunToEm>>;

impl Run {
    async fn to_node(&self, frame: NodeRunFrame) -> Result<(), ()> {
        self.commands
            .send(Box::new(FromBeacon::Run(frame)))
            .await
            .map_err(|_| ())
    }

    async fn hang_up(&self) -> Result<(), ()> {
        self.to_node(NodeRunFrame::Close { run: self.id }).await
    }

    fn started_event(&self, state: &AppState) {
        state.hub.events().record(EventDraft {
            kind: EventKind::RunStarted,
            node: Some(self.node.clone()),
            app: Some(self.app.clone()),
            release: Some(self.release),
            message: format!(
                "{} run.{} started by {:?} on {}: {}",
                self.app, self.id, self.who, self.node, self.what
            ),
            detail: None,
            level: None,
            failure: None,
            build: None,
        });
    }

    fn finished_event(&self, state: &AppState, how: &str) {
        state.hub.events().record(EventDraft {
            kind: EventKind::RunFinished,
            node: Some(self.node.clone()),
            app: Some(self.app.clone()),
            release: Some(self.release),
            message: format!(
                "{} run.{} by {:?} {how} after {:.1}s: {}",
                self.app,
                self.id,
                self.who,
                self.started.elapsed().as_secs_f64(),
                self.what
            ),
            detail: None,
            level: None,
            failure: None,
            build: None,
        });
    }

    /// A detached run: only its start and end matter here; its output goes to the logs.
    async fn detached(self, state: AppState, mut frames: mpsc::Receiver<RunFromNode>) {
        let how = loop {
            match frames.recv().await {
                Some(RunFromNode::Exited { exit, .. }) => break describe(&exit),
                Some(RunFromNode::Failed { message, .. }) => break format!("failed ({message})"),
                Some(_) => continue,
                None => break "no longer followed: its node's link dropped".to_string(),
            }
        };
        state.runs.forget(self.id);
        self.finished_event(&state, &how);
    }

    /// Relays until the run ends, then records how it ended.
    async fn relay(
        self,
        state: AppState,
        mut em: EmConnection,
        mut frames: mpsc::Receiver<RunFromNode>,
    ) {
        let mut in_flight: usize = 0;
        let mut started = false;
        let how = loop {
            tokio::select! {
                frame = frames.recv() => match frame {
                    Some(RunFromNode::Started { .. }) => {
                        started = true;
                        self.started_event(&state);
                        let hello = RunToEm::Started { run: self.id, node: self.node.clone(), release: self.release };
                        if em.send(hello).await.is_err() {
                            break self.em_left(&state, &mut frames).await;
                        }
                    }
                    Some(RunFromNode::Output { stream, data, .. }) => {
                        let bytes = data.len() as u64;
                        if em.send(RunToEm::Output { stream, data }).await.is_err() {
                            break self.em_left(&state, &mut frames).await;
                        }
                        if self.to_node(NodeRunFrame::Ack { run: self.id, bytes }).await.is_err() {
                            break self.node_lost(&mut em).await;
                        }
                    }
                    Some(RunFromNode::Ack { bytes, .. }) => {
                        in_flight = in_flight.saturating_sub(bytes as usize);
                    }
                    Some(RunFromNode::Exited { exit, .. }) => {
                        let _ = em.send(RunToEm::Exited(exit)).await;
                        break describe(&exit);
                    }
                    Some(RunFromNode::Failed { message, .. }) => {
                        let _ = em.send(RunToEm::Failed { message: message.clone() }).await;
                        break format!("failed ({message})");
                    }
                    None => break self.node_lost(&mut em).await,
                },
                frame = em.next(), if in_flight < RUN_WINDOW_BYTES => {
                    let forward = match frame {
                        Some(Ok(RunFromEm::Input { data })) => {
                            if data.len() > px_proto::run::MAX_RUN_CHUNK_BYTES {
                                break self.em_left(&state, &mut frames).await;
                            }
                            in_flight += data.len();
                            NodeRunFrame::Input { run: self.id, data }
                        }
                        Some(Ok(RunFromEm::Resize { size })) => NodeRunFrame::Resize { run: self.id, size },
                        Some(Ok(RunFromEm::Signal { signal })) => NodeRunFrame::Signal { run: self.id, signal },
                        Some(Ok(RunFromEm::Eof)) => NodeRunFrame::Eof { run: self.id },
                        Some(Ok(RunFromEm::Close)) | Some(Err(_)) | None => {
                            break self.em_left(&state, &mut frames).await;
                        }
                    };
                    if self.to_node(forward).await.is_err() {
                        break self.node_lost(&mut em).await;
                    }
                }
            }
        };
        state.runs.forget(self.id);
        if started {
            self.finished_event(&state, &how);
        } else {
            self.finished_event(&state, &format!("never started: {how}"));
        }
        let _ = em.close().await;
    }

    /// `em` left: the node hangs the run up; its exit is awaited for the event.
    async fn em_left(&self, state: &AppState, frames: &mut mpsc::Receiver<RunFromNode>) -> String {
        tracing::info!(run = self.id, app = %self.app, "em left the run; hanging it up");
        if self.hang_up().await.is_err() {
            return "ended: em left and its node's link dropped".into();
        }
        let _ = state;
        let wait = async {
            loop {
                match frames.recv().await {
                    Some(RunFromNode::Exited { exit, .. }) => {
                        return format!("hung up when em left, {}", describe(&exit));
                    }
                    Some(RunFromNode::Failed { message, .. }) => {
                        return format!("failed ({message})");
                    }
                    Some(RunFromNode::Output { data, .. }) => {
                        // Nobody reads it any more; acknowledged so the node is never stuck.
                        let bytes = data.len() as u64;
                        let _ = self
                            .to_node(NodeRunFrame::Ack {
                                run: self.id,
                                bytes,
                            })
                            .await;
                    }
                    Some(_) => {}
                    None => return "hung up when em left; its node's link dropped".into(),
                }
            }
        };
        tokio::time::timeout(EXIT_AFTER_HANGUP, wait)
            .await
            .unwrap_or_else(|_| "hung up when em left; no exit reported".into())
    }

    async fn node_lost(&self, em: &mut EmConnection) -> String {
        let message = format!(
            "the link to node {} dropped; the run was ended there",
            self.node
        );
        let _ = em.send(RunToEm::Failed { message }).await;
        "ended: its node's link dropped".into()
    }
}

/// How a run ended, for its event.
fn describe(exit: &RunExit) -> String {
    match (exit.code, exit.signal) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal}"),
        _ => "ended".into(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::hub::RunNode;

    fn node(name: &str) -> RunNode {
        RunNode {
            name: name.into(),
            conn: 1,
            commands: crate::hub::command_queue(1).0,
        }
    }

    #[test]
    fn runs_go_to_the_node_with_the_fewest_and_stop_at_the_app_limit() {
        let runs = Runs::default();
        let nodes = [node("a"), node("b")];
        let mut placed = Vec::new();
        let mut queues = Vec::new();
        for _ in 0..4 {
            let (id, node, rx) = runs.register("shop", &nodes).unwrap();
            placed.push((id, node.name));
            queues.push(rx);
        }
        let names: Vec<&str> = placed.iter().map(|(_, n)| n.as_str()).collect();
        assert_eq!(names, ["a", "b", "a", "b"], "spread over the nodes");
        let ids: std::collections::BTreeSet<u64> = placed.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids.len(), 4, "every run has its own id");

        for _ in 4..MAX_RUNS_PER_APP {
            queues.push(runs.register("shop", &nodes).unwrap().2);
        }
        let refused = runs.register("shop", &nodes).err().unwrap();
        assert!(matches!(refused, ApiError::TooMany(_)), "{refused}");
        // Another app still gets its runs.
        assert!(runs.register("blog", &nodes).is_ok());
    }

    #[tokio::test]
    async fn a_lost_link_closes_its_runs_and_frames_reach_only_their_run() {
        let runs = Runs::default();
        let (on_a, _, mut rx_a) = runs.register("shop", &[node("a")]).unwrap();
        let (on_b, _, mut rx_b) = runs.register("shop", &[node("b")]).unwrap();
        // A node cannot speak for another node's run.
        runs.route("a", RunFromNode::Started { run: on_b, pid: 1 });
        runs.route("a", RunFromNode::Started { run: on_a, pid: 2 });
        assert_eq!(
            rx_a.recv().await,
            Some(RunFromNode::Started { run: on_a, pid: 2 })
        );
        runs.node_gone("a", 1);
        assert_eq!(rx_a.recv().await, None, "the relay sees the link gone");
        assert!(rx_b.try_recv().is_err(), "b's run heard nothing");
        runs.node_gone("b", 1);
        assert_eq!(rx_b.recv().await, None);
    }
}
