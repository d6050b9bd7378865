//! Release phases through the real Beacon over real sockets: a release whose phase has not
//! ended, read from a stand-in repository, goes to exactly one node that may run the app (one
//! that runs it first) as a phase order, stays there, and leaves the assignment once the
//! repository has its end.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{
    Beacon, Peer, RepoStub, Tokens, WAIT, config, maestro_hello, open_link, repository_hello,
};
use futures_util::SinkExt;
use px_proto::beacon::App;
use px_proto::link::{InstanceState, InstanceStatus, ReleaseCommitted, ToBeacon};
use px_test_support::Pki;

/// The phases of `peer`'s latest assignment, as `app@version: command`.
fn phases(peer: &Peer) -> Vec<String> {
    peer.assignments()
        .last()
        .map(|a| {
            a.phases
                .iter()
                .map(|p| format!("{}@{}: {}", p.release.app, p.release.release, p.command))
                .collect()
        })
        .unwrap_or_default()
}

async fn wait_phases(peer: &Peer, expected: &[&str]) {
    let start = std::time::Instant::now();
    while phases(peer) != expected {
        assert!(
            start.elapsed() < WAIT,
            "{} was never assigned phases {expected:?}; its assignments: {:?}",
            peer.name,
            peer.assignments()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_phase_goes_to_one_node_running_the_app_stays_there_and_leaves_with_its_end() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = Tokens::new();
    let (repo, url) = RepoStub::start(tokens.repo_read.clone()).await;
    repo.release("hello", 1, "");
    let pki = Arc::new(Pki::new(&["localhost"]).unwrap());
    let mut cfg = config(dir.path(), &pki, &tokens, &url);
    // Reconciliation is slow here: only the repository's notices explain prompt changes.
    cfg.reconcile_interval = Duration::from_secs(3600);
    let beacon = Beacon::start(cfg, pki.clone(), &tokens, 0).await;
    beacon
        .wait_for("/v1/apps", "the first read", |apps: &Vec<App>| {
            apps.len() == 1
        })
        .await;
    let maestro = &tokens.maestro;
    let web1 = Peer::link(&beacon, maestro_hello("web-1", maestro, 0)).await;
    let web2 = Peer::link(&beacon, maestro_hello("web-2", maestro, 0)).await;
    // Only web-2 reports the app running: the phase should go there.
    web2.report.lock().unwrap().instances = vec![InstanceStatus {
        app: "hello".into(),
        release: 1,
        state: InstanceState::Healthy,
        pid: None,
        port: None,
        restarts: 0,
        last_exit: None,
        process: "web".into(),
        number: 1,
        started_at: None,
        memory_bytes: None,
        cpu_permille: None,
    }];
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut notices, _) = open_link(
        &beacon.control_addr,
        &pki.ca(),
        repository_hello("apprepo", &tokens.repository),
    )
    .await;

    // v2 is committed with its phase pending; apprepo's notice makes Beacon read it at once.
    repo.pending_phase("hello", 2, "./manage.py migrate --no-input");
    notices
        .send(ToBeacon::ReleaseCommitted(ReleaseCommitted {
            app: "hello".into(),
            version: 2,
            bundle_sha256: format!("{:064x}", 2),
        }))
        .await
        .unwrap();
    wait_phases(&web2, &["hello@2: ./manage.py migrate --no-input"]).await;
    let order = web2.assignments().last().unwrap().phases[0].clone();
    assert!(
        order
            .release
            .bundle_url
            .ends_with(&format!("/v1/bundles/{}", order.release.bundle_sha256)),
        "{order:?}"
    );
    assert_eq!(
        order.release.env["DATABASE_URL"], "postgres://db",
        "the release's config"
    );
    assert_eq!(order.timeout_secs, 600);
    // Exactly one node: web-1 gets no order, and both still run v1.
    assert!(phases(&web1).is_empty(), "{:?}", web1.assignments());
    for web in [&web1, &web2] {
        let last = web.assignments().last().cloned().unwrap();
        assert_eq!(
            last.apps[0].release, 1,
            "v1 serves until the phase succeeds"
        );
    }

    // The phase ends: it leaves web-2's assignment.
    repo.end_phases();
    notices
        .send(ToBeacon::ReleaseCommitted(ReleaseCommitted {
            app: "hello".into(),
            version: 2,
            bundle_sha256: format!("{:064x}", 2),
        }))
        .await
        .unwrap();
    wait_phases(&web2, &[]).await;
    beacon.stop().await;
}
