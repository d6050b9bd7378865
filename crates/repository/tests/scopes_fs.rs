//! Least privilege on apprepo with the disk backend: tokens limited to some apps, what each
//! role sees, minted tokens.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Repo;
use common::scope_suite::{self, add_scoped, add_unscoped};
use px_repository::auth::Role;

#[tokio::test]
async fn a_scoped_token_cannot_touch_another_app_and_lists_show_only_its_own() {
    let mut scoped = String::new();
    let repo =
        Repo::start_with(|c| scoped = add_scoped(c, "ci-shop", Role::Deploy, &["shop"])).await;
    scope_suite::a_scoped_token_acts_only_on_its_apps(&repo, &scoped).await;
    repo.stop().await;
}

#[tokio::test]
async fn a_read_token_sees_config_names_with_values_hidden() {
    let mut beacon = String::new();
    let repo = Repo::start_with(|c| beacon = add_unscoped(c, "beacon", Role::Beacon)).await;
    scope_suite::a_read_token_sees_config_names_only(&repo, &beacon).await;
    repo.stop().await;
}

#[tokio::test]
async fn a_minted_token_deploys_its_app_only_and_is_refused_once_revoked_or_expired() {
    let repo = Repo::start_fs().await;
    scope_suite::minted_tokens_act_within_their_scope_until_revoked_or_expired(&repo).await;
    repo.stop().await;
}
