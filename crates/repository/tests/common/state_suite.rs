//! The Beacon state routes, run against one apprepo (the disk backend) or two apprepos over one
//! bucket: the holder of the `beacon` lease writes, a Beacon taking over reads, and a Beacon
//! that lost the lease is refused.

use px_proto::beacon_state::{
    MAX_EVENT_CHUNKS, MAX_STATE_DOCUMENT_BYTES, StateList, event_chunk_name,
};
use px_proto::lease::{Lease, LeaseClaim, MAX_LEASE_TTL_MS};
use reqwest::StatusCode;

use super::Repo;

async fn take_lease(repo: &Repo, token: &str, holder: &str) -> Lease {
    let response = repo
        .http
        .put(format!("{}/v1/leases/beacon", repo.url))
        .bearer_auth(token)
        .json(&LeaseClaim {
            holder: holder.into(),
            ttl_ms: MAX_LEASE_TTL_MS,
            api_url: format!("https://{holder}.example.com:7080"),
        })
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "{holder} takes the lease"
    );
    response.json().await.unwrap()
}

async fn release_lease(repo: &Repo, token: &str, holder: &str) {
    let response = repo
        .http
        .delete(format!("{}/v1/leases/beacon?holder={holder}", repo.url))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

async fn put(
    repo: &Repo,
    token: &str,
    name: &str,
    holder: &str,
    epoch: u64,
    body: impl Into<reqwest::Body>,
) -> reqwest::Response {
    repo.http
        .put(format!(
            "{}/v1/beacon-state/{name}?holder={holder}&epoch={epoch}",
            repo.url
        ))
        .bearer_auth(token)
        .body(body)
        .send()
        .await
        .unwrap()
}

async fn get(repo: &Repo, token: &str, name: &str) -> reqwest::Response {
    repo.http
        .get(format!("{}/v1/beacon-state/{name}", repo.url))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

async fn names(repo: &Repo, token: &str, prefix: &str) -> Vec<String> {
    let list: StateList = repo
        .http
        .get(format!("{}/v1/beacon-state?prefix={prefix}", repo.url))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    list.names
}

/// `one` holds the lease and writes the dedup state through `a`; `b` reads it back; `two`
/// cannot write; once `one` gives the lease up and `two` takes it (epoch 2), `one`'s epoch is
/// stale and refused, and `two` writes.
pub async fn only_the_lease_holder_at_its_epoch_writes(a: &Repo, b: &Repo, token: &str) {
    let first = take_lease(a, token, "one").await;
    let doc = r#"{"last_sent_unix_ms":{"node_lost:web-1":1700000000000}}"#;
    let written = put(a, token, "alerts", "one", first.epoch, doc).await;
    assert_eq!(written.status(), StatusCode::NO_CONTENT);
    let read = get(b, token, "alerts").await;
    assert_eq!(read.status(), StatusCode::OK);
    assert_eq!(
        read.text().await.unwrap(),
        doc,
        "the other apprepo reads it"
    );

    let intruder = put(b, token, "alerts", "two", first.epoch, "{}").await;
    assert_eq!(intruder.status(), StatusCode::CONFLICT);
    assert!(intruder.text().await.unwrap().contains("stale epoch"));

    release_lease(b, token, "one").await;
    let second = take_lease(b, token, "two").await;
    assert_eq!(second.epoch, first.epoch + 1);
    let stale = put(a, token, "alerts", "one", first.epoch, "{}").await;
    assert_eq!(
        stale.status(),
        StatusCode::CONFLICT,
        "the old holder is fenced"
    );
    let message = stale.text().await.unwrap();
    assert!(
        message.contains("stale epoch") && message.contains("at epoch 2"),
        "{message}"
    );
    assert_eq!(get(a, token, "alerts").await.text().await.unwrap(), doc);
    let newer = r#"{"last_sent_unix_ms":{}}"#;
    let taken_over = put(a, token, "alerts", "two", second.epoch, newer).await;
    assert_eq!(taken_over.status(), StatusCode::NO_CONTENT);
    assert_eq!(get(b, token, "alerts").await.text().await.unwrap(), newer);
    // A document no one wrote is a 404, not an empty one.
    assert_eq!(
        get(b, token, "rollouts-shop").await.status(),
        StatusCode::NOT_FOUND
    );
}

/// Names, JSON, sizes and roles are checked with a message saying what to fix; event chunks
/// past `MAX_EVENT_CHUNKS` are deleted oldest first, so the newest stay.
pub async fn documents_are_bounded_and_old_chunks_pruned(repo: &Repo, token: &str) {
    let lease = take_lease(repo, token, "one").await;
    let epoch = lease.epoch;
    let bad_name = put(repo, token, "Bad_Name", "one", epoch, "{}").await;
    assert_eq!(bad_name.status(), StatusCode::BAD_REQUEST);
    assert!(bad_name.text().await.unwrap().contains("lowercase"));
    let not_json = put(repo, token, "alerts", "one", epoch, "not json").await;
    assert_eq!(not_json.status(), StatusCode::BAD_REQUEST);
    assert!(not_json.text().await.unwrap().contains("JSON"));
    let huge = format!("\"{}\"", "x".repeat(MAX_STATE_DOCUMENT_BYTES));
    let too_large = put(repo, token, "alerts", "one", epoch, huge).await;
    assert_eq!(too_large.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(
        too_large
            .text()
            .await
            .unwrap()
            .contains(&MAX_STATE_DOCUMENT_BYTES.to_string())
    );
    let no_epoch = repo
        .http
        .put(format!("{}/v1/beacon-state/alerts", repo.url))
        .bearer_auth(token)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(no_epoch.status(), StatusCode::BAD_REQUEST);
    assert!(no_epoch.text().await.unwrap().contains("epoch"));
    let deployer = put(repo, &repo.deploy_token, "alerts", "one", epoch, "{}").await;
    assert_eq!(deployer.status(), StatusCode::FORBIDDEN);
    let reader = get(repo, &repo.read_token, "alerts").await;
    assert_eq!(reader.status(), StatusCode::FORBIDDEN);

    let extra = 2;
    for first_seq in 0..(MAX_EVENT_CHUNKS + extra) as u64 {
        let chunk = format!(r#"{{"events":[{{"seq":{first_seq}}}]}}"#);
        let written = put(
            repo,
            token,
            &event_chunk_name(first_seq + 1),
            "one",
            epoch,
            chunk,
        )
        .await;
        assert_eq!(written.status(), StatusCode::NO_CONTENT);
    }
    let kept = names(repo, token, "events-").await;
    assert_eq!(kept.len(), MAX_EVENT_CHUNKS);
    assert_eq!(
        kept[0],
        event_chunk_name(extra as u64 + 1),
        "the oldest went"
    );
    assert_eq!(
        kept.last().unwrap(),
        &event_chunk_name((MAX_EVENT_CHUNKS + extra) as u64)
    );
    assert!(names(repo, token, "rollouts-").await.is_empty());
}
