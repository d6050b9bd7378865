//! Least privilege on apprepo with the S3 backend (s3s-fs on loopback): the scenarios of
//! `scopes_fs.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::scope_suite::{self, add_scoped, add_unscoped};
use common::{BUCKET, Repo};
use px_repository::auth::Role;
use px_test_support::S3Server;

#[tokio::test]
async fn a_scoped_token_cannot_touch_another_app_on_s3() {
    let Some(s3) = S3Server::start(BUCKET) else {
        return;
    };
    let mut scoped = String::new();
    let repo = Repo::start_with(|c| {
        common::use_s3(c, &s3);
        scoped = add_scoped(c, "ci-shop", Role::Deploy, &["shop"]);
    })
    .await;
    scope_suite::a_scoped_token_acts_only_on_its_apps(&repo, &scoped).await;
    repo.stop().await;
}

#[tokio::test]
async fn a_read_token_sees_config_names_with_values_hidden_on_s3() {
    let Some(s3) = S3Server::start(BUCKET) else {
        return;
    };
    let mut beacon = String::new();
    let repo = Repo::start_with(|c| {
        common::use_s3(c, &s3);
        beacon = add_unscoped(c, "beacon", Role::Beacon);
    })
    .await;
    scope_suite::a_read_token_sees_config_names_only(&repo, &beacon).await;
    repo.stop().await;
}

#[tokio::test]
async fn a_minted_token_on_s3_deploys_its_app_only_and_is_refused_once_revoked_or_expired() {
    let Some(s3) = S3Server::start(BUCKET) else {
        return;
    };
    let repo = Repo::start_s3(&s3).await;
    scope_suite::minted_tokens_act_within_their_scope_until_revoked_or_expired(&repo).await;
    repo.stop().await;
}
