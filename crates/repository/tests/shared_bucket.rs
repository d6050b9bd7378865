//! Two apprepos over one bucket, as a cluster with several control hosts runs them: each has
//! its own in-memory locks (nothing in the crate is process-wide), so every guarantee between
//! them rests on the storage's conditional writes. Run against SeaweedFS, which honours
//! `If-None-Match` and `If-Match` as AWS S3 does (s3s-fs does not check them atomically).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::domain_suite::bundle_with_domains;
use common::{Repo, no_periodic_retention, sample_bundle, use_s3_endpoint};
use futures_util::future::join_all;
use px_proto::api::Release;
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
