//! The lease routes, run against one apprepo (the disk backend) or two apprepos over one
//! bucket: what two Beacons competing for the active role see.

use std::time::Duration;

use px_proto::lease::{Lease, LeaseClaim, LeaseHeld};
use reqwest::StatusCode;

use super::Repo;

/// The TTL the claims that are to lapse ask for: the shortest allowed, so that a test waits
/// little for one to lapse.
pub const TTL_MS: u64 = px_proto::lease::MIN_LEASE_TTL_MS;
/// The TTL of claims that must not lapse while a test runs: a race through two apprepos can
/// take a second on a loaded machine, when the loser retries its compare-and-swap.
pub const LONG_TTL_MS: u64 = px_proto::lease::MAX_LEASE_TTL_MS;

pub async fn claim(repo: &Repo, token: &str, name: &str, holder: &str) -> reqwest::Response {
    claim_for(repo, token, name, holder, TTL_MS).await
}

async fn claim_for(
    repo: &Repo,
    token: &str,
    name: &str,
    holder: &str,
    ttl_ms: u64,
) -> reqwest::Response {
    repo.http
        .put(format!("{}/v1/leases/{name}", repo.url))
        .bearer_auth(token)
        .json(&LeaseClaim {
            holder: holder.into(),
            ttl_ms,
            api_url: format!("https://{holder}.example.com:7080"),
        })
        .send()
        .await
        .unwrap()
}

async fn granted(repo: &Repo, token: &str, name: &str, holder: &str) -> Lease {
    let response = claim(repo, token, name, holder).await;
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "{holder} should hold {name}"
    );
    response.json().await.unwrap()
}

async fn held(repo: &Repo, token: &str, name: &str, holder: &str) -> Lease {
    let response = claim(repo, token, name, holder).await;
    assert_eq!(
        response.status(),
        StatusCode::CONFLICT,
        "{holder} should be refused {name}"
    );
    let body: LeaseHeld = response.json().await.unwrap();
    assert_eq!(body.code, "lease_held");
    assert!(
        body.message.contains(&body.lease.holder),
        "{}",
        body.message
    );
    body.lease
}

/// `one` takes the lease through `a`; `two`, through `b`, is refused and told who holds it;
/// `one` renews it (same epoch, a later expiry); once it lapses `two` takes it with the next
/// epoch, and `one` is refused in turn.
pub async fn one_holder_at_a_time_and_the_next_after_expiry(a: &Repo, b: &Repo, token: &str) {
    let first = granted(a, token, "beacon", "one").await;
    assert_eq!(first.epoch, 1);
    assert_eq!(first.api_url, "https://one.example.com:7080");
    let seen = held(b, token, "beacon", "two").await;
    assert_eq!((seen.holder.as_str(), seen.epoch), ("one", 1));
    let read: Lease = b
        .http
        .get(format!("{}/v1/leases/beacon", b.url))
        .bearer_auth(&b.read_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(read, first, "both apprepos read the same record");

    let renewed = granted(b, token, "beacon", "one").await;
    assert_eq!(renewed.epoch, 1, "a renewal keeps the epoch");
    assert!(renewed.expires_at_unix_ms >= first.expires_at_unix_ms);

    // Past its expiry (by apprepo's clock) the lease is free for another holder.
    tokio::time::sleep(Duration::from_millis(TTL_MS + 300)).await;
    let taken = granted(b, token, "beacon", "two").await;
    assert_eq!(taken.epoch, 2, "a new holder gets the next epoch");
    assert_eq!(taken.api_url, "https://two.example.com:7080");
    let seen = held(a, token, "beacon", "one").await;
    assert_eq!((seen.holder.as_str(), seen.epoch), ("two", 2));
}

/// Two claimants ask for a free lease at the same moment, one through each apprepo, many
/// times over: each time exactly one is granted and the other sees the winner.
pub async fn racing_claimants_get_one_lease(a: &Repo, b: &Repo, token: &str) {
    const ROUNDS: usize = 8;
    for round in 0..ROUNDS {
        let name = format!("race-{round}");
        let (x, y) = tokio::join!(
            claim_for(a, token, &name, "east", LONG_TTL_MS),
            claim_for(b, token, &name, "west", LONG_TTL_MS)
        );
        let statuses = [x.status(), y.status()];
        let bodies = [x.text().await.unwrap(), y.text().await.unwrap()];
        let winners = statuses.iter().filter(|s| **s == StatusCode::OK).count();
        assert_eq!(winners, 1, "round {round}: {statuses:?} {bodies:?}");
        assert!(
            statuses.contains(&StatusCode::CONFLICT),
            "round {round}: {statuses:?}"
        );
    }
}

/// Only a `beacon` token takes a lease; names, TTLs, URLs and body sizes are checked.
pub async fn claims_are_checked(repo: &Repo, token: &str) {
    let refused = claim(repo, &repo.deploy_token, "beacon", "one").await;
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    let bad_name = claim(repo, token, "Bad_Name", "one").await;
    assert_eq!(bad_name.status(), StatusCode::BAD_REQUEST);
    assert!(bad_name.text().await.unwrap().contains("lease name"));
    let send = |body: serde_json::Value| {
        repo.http
            .put(format!("{}/v1/leases/beacon", repo.url))
            .bearer_auth(token)
            .json(&body)
            .send()
    };
    let short = send(serde_json::json!({"holder": "one", "ttl_ms": 10, "api_url": "https://a"}))
        .await
        .unwrap();
    assert_eq!(short.status(), StatusCode::BAD_REQUEST);
    assert!(short.text().await.unwrap().contains("ttl_ms"));
    let url = send(serde_json::json!({"holder": "one", "ttl_ms": 6000, "api_url": "a b"}))
        .await
        .unwrap();
    assert_eq!(url.status(), StatusCode::BAD_REQUEST);
    assert!(url.text().await.unwrap().contains("api_url"));
    let huge = "h".repeat(px_proto::lease::MAX_LEASE_REQUEST_BYTES);
    let too_big = send(serde_json::json!({"holder": huge, "ttl_ms": 6000, "api_url": "https://a"}))
        .await
        .unwrap();
    assert_eq!(too_big.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let none = repo
        .http
        .get(format!("{}/v1/leases/beacon", repo.url))
        .bearer_auth(&repo.read_token)
        .send()
        .await
        .unwrap();
    assert_eq!(none.status(), StatusCode::NOT_FOUND, "no claim was granted");
}

async fn release(repo: &Repo, token: &str, name: &str, holder: &str) -> reqwest::Response {
    repo.http
        .delete(format!("{}/v1/leases/{name}?holder={holder}", repo.url))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

/// A holder that stops gives its lease up: `one` holds it for the longest TTL through `a`,
/// `two` may not release it, `one` does (through `b`), and `two`'s next claim is granted at
/// once with the next epoch, long before the TTL `one` asked for. Releasing what is not held
/// (any more) changes nothing.
pub async fn a_released_lease_goes_to_the_next_claimant_at_once(a: &Repo, b: &Repo, token: &str) {
    let first = granted_for(a, token, "handover", "one", LONG_TTL_MS).await;
    let refused = release(b, token, "handover", "two").await;
    assert_eq!(
        refused.status(),
        StatusCode::CONFLICT,
        "only the holder releases"
    );
    let body: LeaseHeld = refused.json().await.unwrap();
    assert_eq!(
        body.lease, first,
        "the refused release left the lease as it was"
    );
    held(a, token, "handover", "two").await;

    let released = release(b, token, "handover", "one").await;
    assert_eq!(released.status(), StatusCode::OK);
    let released: Lease = released.json().await.unwrap();
    assert_eq!(
        (released.holder.as_str(), released.epoch),
        ("one", first.epoch)
    );
    assert!(
        released.expires_at_unix_ms < first.expires_at_unix_ms,
        "a released lease is stored expired: {released:?}"
    );
    let taken = granted_for(a, token, "handover", "two", LONG_TTL_MS).await;
    assert_eq!(
        taken.epoch,
        first.epoch + 1,
        "the next holder gets the next epoch"
    );

    let late = release(a, token, "handover", "one").await;
    assert_eq!(
        late.status(),
        StatusCode::CONFLICT,
        "one holds it no longer"
    );
    assert_eq!(
        release(b, token, "handover", "two").await.status(),
        StatusCode::OK
    );
    assert_eq!(
        release(b, token, "handover", "two").await.status(),
        StatusCode::NO_CONTENT,
        "nothing left to release"
    );
    assert_eq!(
        release(a, token, "never-taken", "one").await.status(),
        StatusCode::NO_CONTENT
    );
    let refused = a
        .http
        .delete(format!("{}/v1/leases/handover?holder=two", a.url))
        .bearer_auth(&a.deploy_token)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::FORBIDDEN, "Beacon's alone");
}

async fn granted_for(repo: &Repo, token: &str, name: &str, holder: &str, ttl_ms: u64) -> Lease {
    let response = claim_for(repo, token, name, holder, ttl_ms).await;
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "{holder} should hold {name}"
    );
    response.json().await.unwrap()
}
