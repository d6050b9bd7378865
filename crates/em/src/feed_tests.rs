//! Followed streams against small axum servers: one that ends its stream (a Beacon stepping
//! down closes its streams) and then refuses connections or redirects to the one that took
//! over (a test double of the standby, as in `beacons_tests`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::http::header;
use axum::response::IntoResponse;

use super::*;
use crate::beacons::tests::{Server, client, redirect};

/// An SSE body of the events `(id, value)`, ending after the last.
/// An event stream that sends `message` and then nothing, not even a keep-alive, while its
/// connection stays open: what a Beacon whose host vanished leaves a follower with.
fn silent_after(message: &'static str) -> axum::response::Response {
    let first = futures_util::stream::iter([Ok::<_, std::convert::Infallible>(message)]);
    let body = axum::body::Body::from_stream(first.chain(futures_util::stream::pending()));
    ([(header::CONTENT_TYPE, "text/event-stream")], body).into_response()
}

fn sse(events: &[(u64, u32)]) -> axum::response::Response {
    let body: String = events
        .iter()
        .map(|(id, value)| format!("id: {id}\nevent: event\ndata: {value}\n\n"))
        .collect();
    ([(header::CONTENT_TYPE, "text/event-stream")], body).into_response()
}

#[test]
fn sse_messages_are_split_and_partial_ones_kept() {
    let mut buffer = "id: 1\nevent: e\ndata: 7\n\n: keep-alive\n\ndata: 8\n\ndata: 9".to_string();
    assert_eq!(take_sse_after::<u32>(&mut buffer, None), [7, 8]);
    assert_eq!(buffer, "data: 9");
}

#[test]
fn the_last_id_is_that_of_the_last_message_taken_with_one() {
    let mut buffer =
        "id: 4\ndata: 7\n\n: keep-alive\n\nid: 5\ndata: 8\n\nid: 6\ndata: 9".to_string();
    let mut last_id = None;
    assert_eq!(
        take_sse_after::<u32>(&mut buffer, Some(&mut last_id)),
        [7, 8]
    );
    assert_eq!(last_id.as_deref(), Some("5"));
}

#[tokio::test]
async fn a_followed_stream_that_drops_is_reopened_on_the_next_beacon_after_the_last_event() {
    let first = Server::start(|_| sse(&[(1, 10), (2, 20)])).await;
    let second = Server::start(|_| sse(&[(3, 30)])).await;
    let client = client(&[&first.url, &second.url]);
    let mut feed = Feed::<u32>::follow(&client, &client.beacon("/v1/events/stream?app=shop"))
        .await
        .unwrap();
    assert_eq!(feed.next().await.unwrap(), 10);
    assert_eq!(feed.next().await.unwrap(), 20);
    // The first Beacon is gone: its stream ended, and its port refuses connections.
    first.stop().await;
    assert_eq!(feed.next().await.unwrap(), 30);
    let reopened = second.hits();
    assert_eq!(reopened.len(), 1, "{reopened:?}");
    assert_eq!(reopened[0].path, "/v1/events/stream?app=shop");
    assert_eq!(reopened[0].last_event_id.as_deref(), Some("2"));
    assert_eq!(
        reopened[0].authorization.as_deref(),
        Some(format!("Bearer {}", crate::beacons::tests::TOKEN).as_str())
    );
    assert!(client.beacon("/").starts_with(&second.url));
}

#[tokio::test]
async fn a_followed_stream_goes_on_through_the_standbys_redirect() {
    let active = Server::start(|_| sse(&[(8, 80)])).await;
    // The first Beacon serves the stream, then steps down and redirects to the active one.
    let stepped_down = Arc::new(AtomicBool::new(false));
    let down = Arc::clone(&stepped_down);
    let active_url = active.url.clone();
    let first = Server::start(move |path| {
        if down.swap(true, Ordering::Relaxed) {
            redirect(&format!("{active_url}{path}"))
        } else {
            sse(&[(7, 70)])
        }
    })
    .await;
    let client = client(&[&first.url, &active.url]);
    let mut feed = Feed::<u32>::follow(&client, &client.beacon("/v1/events/stream"))
        .await
        .unwrap();
    assert_eq!(feed.next().await.unwrap(), 70);
    assert_eq!(feed.next().await.unwrap(), 80);
    assert_eq!(first.hits().len(), 2);
    assert_eq!(active.hits()[0].last_event_id.as_deref(), Some("7"));
}

#[tokio::test]
async fn a_stream_opened_without_following_ends_with_its_connection() {
    let served = Arc::new(Mutex::new(0));
    let count = Arc::clone(&served);
    let beacon = Server::start(move |_| {
        *count.lock().unwrap() += 1;
        sse(&[(1, 10)])
    })
    .await;
    let client = client(&[&beacon.url]);
    let mut feed = Feed::<u32>::open(&client, &client.beacon("/v1/apps/shop/logs/stream"))
        .await
        .unwrap();
    assert_eq!(feed.next().await.unwrap(), 10);
    assert!(matches!(feed.next().await, Err(FeedEnd::Closed)));
    assert_eq!(*served.lock().unwrap(), 1);
}

#[tokio::test]
async fn a_followed_stream_that_falls_silent_is_reopened_on_the_next_beacon() {
    // The first Beacon sends one event and then nothing, not even a keep-alive, while its
    // connection stays open: its host vanished. The second has taken over.
    let first = Server::start(|_| silent_after("id: 1\nevent: event\ndata: 10\n\n")).await;
    let second = Server::start(|_| sse(&[(2, 20)])).await;
    let client = client(&[&first.url, &second.url]);
    let mut feed = Feed::<u32>::follow(&client, &client.beacon("/v1/events/stream?app=shop"))
        .await
        .unwrap();
    assert_eq!(feed.next().await.unwrap(), 10);
    let next = tokio::time::timeout(STREAM_SILENCE_DEADLINE + REOPEN_TIMEOUT, feed.next())
        .await
        .expect("the silent stream was never given up");
    assert_eq!(next.unwrap(), 20);
    assert_eq!(
        first.hits().len(),
        1,
        "the silent Beacon was not asked again"
    );
    let reopened = second.hits();
    assert_eq!(reopened.len(), 1, "{reopened:?}");
    assert_eq!(reopened[0].last_event_id.as_deref(), Some("1"));
    assert!(client.beacon("/").starts_with(&second.url));
    assert_eq!(FeedEnd::Silent.to_string(), "silent for 6s (no keep-alive)");
}

#[tokio::test]
async fn a_standby_still_naming_the_silent_beacon_is_not_followed_there_and_asked_again() {
    // The first Beacon's host vanished after one event. The second is a standby whose lease
    // claim has not gone through yet: it still redirects to the first, and only its second
    // answer is its own stream, once it has taken over.
    let first = Server::start(|_| silent_after("id: 1\nevent: event\ndata: 10\n\n")).await;
    let first_url = first.url.clone();
    let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let second = Server::start(move |path| {
        if asked.fetch_add(1, std::sync::atomic::Ordering::Relaxed) == 0 {
            redirect(&format!("{first_url}{path}"))
        } else {
            sse(&[(2, 20)])
        }
    })
    .await;
    let client = client(&[&first.url, &second.url]);
    let mut feed = Feed::<u32>::follow(&client, &client.beacon("/v1/events/stream?app=shop"))
        .await
        .unwrap();
    assert_eq!(feed.next().await.unwrap(), 10);
    // Two attempts to reopen: the redirect, then (after the first backoff, under a second)
    // the second Beacon's own stream; following the redirect would have met the silent
    // Beacon's stream again, or waited for the reopen timeout.
    let next = tokio::time::timeout(
        STREAM_SILENCE_DEADLINE + Duration::from_secs(3),
        feed.next(),
    )
    .await
    .expect("the stream was not reopened on the Beacon that took over");
    assert_eq!(next.unwrap(), 20);
    assert_eq!(
        first.hits().len(),
        1,
        "the redirect to the silent Beacon was followed"
    );
    assert_eq!(second.hits().len(), 2);
}

#[tokio::test]
async fn a_stream_followed_from_a_backlog_is_reopened_without_it() {
    // `em logs -f`: the first request asks for the last lines, a reopened one for none, so a
    // failover does not print the backlog twice.
    let first = Server::start(|_| silent_after("event: log\ndata: 10\n\n")).await;
    let second = Server::start(|_| sse(&[(2, 20)])).await;
    let client = client(&[&first.url, &second.url]);
    let mut feed = Feed::<u32>::follow_from(
        &client,
        &client.beacon("/v1/apps/shop/logs/stream?lines=100"),
        &client.beacon("/v1/apps/shop/logs/stream?lines=0"),
    )
    .await
    .unwrap();
    assert_eq!(feed.next().await.unwrap(), 10);
    let next = tokio::time::timeout(STREAM_SILENCE_DEADLINE + REOPEN_TIMEOUT, feed.next())
        .await
        .expect("the silent stream was never given up");
    assert_eq!(next.unwrap(), 20);
    assert_eq!(first.hits()[0].path, "/v1/apps/shop/logs/stream?lines=100");
    let reopened = second.hits();
    assert_eq!(reopened.len(), 1, "{reopened:?}");
    assert_eq!(reopened[0].path, "/v1/apps/shop/logs/stream?lines=0");
}
