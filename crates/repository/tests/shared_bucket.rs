//! Two apprepos over one bucket, as a cluster with several control hosts runs them: each has
//! its own in-memory locks (nothing in the crate is process-wide), so every guarantee between
//! them rests on the storage's conditional writes. Run against SeaweedFS, which honours
//! `If-None-Match` and `If-Match` as AWS S3 does (s3s-fs does not check them atomically). A
//! sweep runs on one of them through a second handle on the storage, as another apprepo's
//! periodic sweep would.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant, SystemTime};

use common::domain_suite::bundle_with_domains;
use common::{Repo, no_periodic_retention, sample_bundle, sha256_hex, use_s3_endpoint};
use common::{acme_suite, build_suite, lease_suite, state_suite};
use futures_util::future::join_all;
use px_proto::api::Release;
use px_repository::internals::{Policy, sweep};
use px_test_support::seaweed::SeaweedServer;
use reqwest::StatusCode;

const BUCKET: &str = "px-shared";

/// Two apprepos on `s3`'s bucket, the second accepting the first one's tokens.
async fn two_repos(s3: &SeaweedServer) -> (Repo, Repo) {
    let first = Repo::start_with(|c| {
        use_s3_endpoint(c, s3.endpoint());
        c.storage.s3.as_mut().unwrap().bucket = BUCKET.into();
        no_periodic_retention(c);
    })
    .await;
    let tokens = first.config.tokens.clone();
    let mut second = Repo::start_with(|c| {
        use_s3_endpoint(c, s3.endpoint());
        c.storage.s3.as_mut().unwrap().bucket = BUCKET.into();
        no_periodic_retention(c);
        c.tokens = tokens;
    })
    .await;
    second.deploy_token = first.deploy_token.clone();
    second.read_token = first.read_token.clone();
    second.build_token = first.build_token.clone();
    (first, second)
}

async fn set_config(repo: &Repo, app: &str, key: &str) -> reqwest::Response {
    repo.http
        .patch(format!("{}/v1/apps/{app}/config", repo.url))
        .bearer_auth(&repo.deploy_token)
        .json(&serde_json::json!({"set": {key: "1"}}))
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_commits_through_two_apprepos_lose_no_release_and_number_none_twice() {
    const PER_REPO: usize = 12;
    let Some(s3) = SeaweedServer::start(BUCKET) else {
        return;
    };
    let (a, b) = two_repos(&s3).await;
    a.create_app("shop").await;
    a.deploy("shop", &sample_bundle("shop", "one")).await;
    // Config changes and uploads, half through each apprepo, all at once.
    let changes = (0..PER_REPO).flat_map(|i| [(&a, format!("A{i}")), (&b, format!("B{i}"))]);
    let bundles: Vec<(&Repo, Vec<u8>)> = (0..PER_REPO / 2)
        .flat_map(|i| {
            [
                (&a, sample_bundle("shop", &format!("a{i}"))),
                (&b, sample_bundle("shop", &format!("b{i}"))),
            ]
        })
        .collect();
    let (configs, uploads) = tokio::join!(
        join_all(changes.map(|(repo, key)| async move { set_config(repo, "shop", &key).await })),
        join_all(
            bundles
                .iter()
                .map(|(repo, bundle)| repo.upload("shop", bundle))
        ),
    );
    let mut versions = vec![1];
    for r in configs.into_iter().chain(uploads) {
        assert_eq!(r.status(), StatusCode::CREATED);
        versions.push(r.json::<Release>().await.unwrap().version);
    }
    versions.sort_unstable();
    let total = 1 + 2 * PER_REPO + PER_REPO;
    assert_eq!(
        versions,
        (1..=total as u64).collect::<Vec<_>>(),
        "every commit got a number of its own, with no gap"
    );
    // Both apprepos list the same releases, and the last holds every key set: no config
    // change was built on a head another apprepo had already moved past.
    let listed_a = a.releases("shop").await;
    let listed_b = b.releases("shop").await;
    assert_eq!(listed_a.len(), total);
    assert_eq!(
        listed_a.iter().map(|r| r.version).collect::<Vec<_>>(),
        listed_b.iter().map(|r| r.version).collect::<Vec<_>>()
    );
    let newest = listed_a.iter().max_by_key(|r| r.version).unwrap();
    for i in 0..PER_REPO {
        for key in [format!("A{i}"), format!("B{i}")] {
            assert!(
                newest.config.contains_key(&key),
                "{key} lost: {:?}",
                newest.config.keys()
            );
        }
    }
    a.stop().await;
    b.stop().await;
}

/// Which of `one` and `two` hold `name`, as either apprepo lists them.
async fn holders(repo: &Repo, name: &str) -> Vec<&'static str> {
    let mut holders = Vec::new();
    for app in ["one", "two"] {
        if repo
            .domains(app)
            .await
            .iter()
            .any(|entry| entry.split(' ').next() == Some(name))
        {
            holders.push(app);
        }
    }
    holders
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_name_claimed_through_two_apprepos_at_once_goes_to_one_app() {
    const NAMES: usize = 6;
    let Some(s3) = SeaweedServer::start(BUCKET) else {
        return;
    };
    let (a, b) = two_repos(&s3).await;
    for app in ["one", "two"] {
        a.create_app(app).await;
        a.deploy(app, &sample_bundle(app, "v1")).await;
    }
    // `em domains add` of the same names through both apprepos at once.
    let names: Vec<String> = (0..NAMES).map(|i| format!("n{i}.example.com")).collect();
    let statuses = join_all(
        names
            .iter()
            .flat_map(|name| [a.add_domain("one", name), b.add_domain("two", name)]),
    )
    .await;
    for (i, name) in names.iter().enumerate() {
        let pair = (statuses[2 * i].status(), statuses[2 * i + 1].status());
        assert!(
            matches!(
                pair,
                (StatusCode::CREATED, StatusCode::CONFLICT)
                    | (StatusCode::CONFLICT, StatusCode::CREATED)
            ),
            "{name}: one claim won and the other was refused: {pair:?}"
        );
        assert_eq!(holders(&a, name).await.len(), 1, "{name}");
    }
    // A deploy naming a domain in its app.toml through one apprepo, `em domains add` of the
    // same name through the other.
    let manifest_names: Vec<String> = (0..NAMES).map(|i| format!("m{i}.example.com")).collect();
    for name in &manifest_names {
        let bundle = bundle_with_domains("one", &[name]);
        let (deployed, added) = tokio::join!(a.upload("one", &bundle), b.add_domain("two", name));
        let pair = (deployed.status(), added.status());
        assert!(
            matches!(
                pair,
                (StatusCode::CREATED, StatusCode::CONFLICT)
                    | (StatusCode::CONFLICT, StatusCode::CREATED)
            ),
            "{name}: the deploy or the add won, not both: {pair:?}"
        );
        assert_eq!(holders(&b, name).await.len(), 1, "{name}");
    }
    // A name given back through one apprepo is free at once through the other.
    let given = &names[0];
    let holder = holders(&a, given).await[0];
    let other = if holder == "one" { "two" } else { "one" };
    assert_eq!(
        a.remove_domain(holder, given).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        b.add_domain(other, given).await.status(),
        StatusCode::CREATED
    );
    assert_eq!(holders(&a, given).await, [other]);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sweep_on_one_apprepo_spares_an_old_bundle_another_commits_during_its_wait() {
    let Some(s3) = SeaweedServer::start(BUCKET) else {
        return;
    };
    let (a, b) = two_repos(&s3).await;
    a.create_app("shop").await;
    let old = sample_bundle("shop", "old");
    a.deploy("shop", &old).await;
    for i in 0..3 {
        a.deploy("shop", &sample_bundle("shop", &format!("new {i}")))
            .await;
    }
    // b sweeps, keeping two releases: v1 and v2 go, and their bundles are marked; while the
    // sweep waits, the old bundle is deployed again through a (stored already, so the
    // upload only commits a release naming it).
    let (sweeper, _) = b.sweeper().await;
    let policy = Policy {
        keep_releases: 2,
        keep_for: Duration::ZERO,
        bundle_grace: Duration::ZERO,
        condemn_wait: Duration::from_secs(4),
    };
    let sweeping = tokio::spawn(async move { sweep(&sweeper, &policy, SystemTime::now()).await });
    let mark = format!("condemned/bundles/{}", sha256_hex(&old));
    let (watcher, _) = a.sweeper().await;
    let start = Instant::now();
    while watcher.storage().read(&mark).await.unwrap().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the sweep never marked the old bundle"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let again = a.deploy("shop", &old).await;
    let report = sweeping.await.unwrap();
    assert!(report.errors.is_empty(), "{report:?}");
    // The release committed during the wait kept its bundle; v2's, which nothing named any
    // more, was collected.
    assert_eq!(again.bundle.sha256, sha256_hex(&old));
    assert_eq!(
        a.download(&sha256_hex(&old)).await,
        (StatusCode::OK, old.clone())
    );
    assert_eq!(report.bundles_deleted, 1, "{report:?}");
    assert!(
        watcher.storage().read(&mark).await.unwrap().is_none(),
        "the mark is gone"
    );
    a.stop().await;
    b.stop().await;
}

/// Here rather than beside the other build tests on s3s-fs: the build's claim is a
/// create-only write, which s3s-fs checks and then writes, so two finishes could both win.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_apprepos_finishing_one_build_commit_one_release() {
    let Some(s3) = SeaweedServer::start(BUCKET) else {
        return;
    };
    let (a, b) = two_repos(&s3).await;
    build_suite::two_repositories_finish_one_build(&a, &b).await;
    b.stop().await;
    a.stop().await;
}

/// Two apprepos on `s3`'s bucket sharing tokens, with a `beacon` token for the lease routes.
async fn two_repos_for_beacons(s3: &SeaweedServer) -> (Repo, Repo, String) {
    let mut beacon = String::new();
    let first = Repo::start_with(|c| {
        use_s3_endpoint(c, s3.endpoint());
        c.storage.s3.as_mut().unwrap().bucket = BUCKET.into();
        no_periodic_retention(c);
        beacon = acme_suite::add_beacon_token(c);
    })
    .await;
    let tokens = first.config.tokens.clone();
    let mut second = Repo::start_with(|c| {
        use_s3_endpoint(c, s3.endpoint());
        c.storage.s3.as_mut().unwrap().bucket = BUCKET.into();
        no_periodic_retention(c);
        c.tokens = tokens;
    })
    .await;
    second.deploy_token = first.deploy_token.clone();
    second.read_token = first.read_token.clone();
    (first, second, beacon)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lease_claimed_through_two_apprepos_has_one_holder_and_passes_on_after_expiry_or_release()
{
    let Some(s3) = SeaweedServer::start(BUCKET) else {
        return;
    };
    let (a, b, beacon) = two_repos_for_beacons(&s3).await;
    lease_suite::racing_claimants_get_one_lease(&a, &b, &beacon).await;
    lease_suite::one_holder_at_a_time_and_the_next_after_expiry(&a, &b, &beacon).await;
    lease_suite::a_released_lease_goes_to_the_next_claimant_at_once(&a, &b, &beacon).await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn beacon_state_through_two_apprepos_is_fenced_by_the_lease_and_bounded() {
    let Some(s3) = SeaweedServer::start(BUCKET) else {
        return;
    };
    let (a, b, beacon) = two_repos_for_beacons(&s3).await;
    state_suite::only_the_lease_holder_at_its_epoch_writes(&a, &b, &beacon).await;
    a.stop().await;
    b.stop().await;
    let Some(s3) = SeaweedServer::start(BUCKET) else {
        return;
    };
    let (a, b, beacon) = two_repos_for_beacons(&s3).await;
    state_suite::documents_are_bounded_and_old_chunks_pruned(&a, &beacon).await;
    a.stop().await;
    b.stop().await;
}
