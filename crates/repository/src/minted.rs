//! Tokens minted through the API (`em tokens`): limited to some apps, stored only as hashes
//! under `tokens/<name>.json`, expiring, accepted here and told to Beacon.
//!
//! The stored list is the truth: every apprepo sharing the storage reads it again every
//! [`TOKEN_REFRESH`] (and at once after its own mint or revoke), accepts what has not expired,
//! and sends the list to Beacon over its link whenever it changes, so a revoke reaches every
//! apprepo and Beacon within that bound.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use px_proto::api::{
    MAX_MINTED_TOKENS, MAX_TOKEN_APPS, MintToken, MintedRole, TokenGrant, TokenInfo, TokenMinted,
};
use px_runtime::tokens::TokenEntry;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::auth::{Caller, Role, Tokens};
use crate::error::ApiError;
use crate::storage::{Storage, StorageError};

/// Where minted tokens live in the storage.
const PREFIX: &str = "tokens/";
/// How long a minted token lives when the mint does not say: a month, so a forgotten CI token
/// stops working by itself.
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);
/// The longest a minted token may live: a year; a longer-lived token belongs in the tokens
/// file, where an operator sees it.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// How often the stored list is read again: the bound on how long a revoke (or a mint) made
/// through another apprepo takes to reach this one and its Beacon.
pub const TOKEN_REFRESH: Duration = Duration::from_secs(5);

/// The minted tokens: the storage, the table they are accepted through, and the list Beacon is
/// told of.
#[derive(Clone)]
pub struct Minted {
    storage: Arc<dyn Storage>,
    tokens: Tokens,
    grants: Arc<watch::Sender<Arc<Vec<TokenGrant>>>>,
}

fn key(name: &str) -> String {
    format!("{PREFIX}{name}.json")
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Whether a token with these apps is within the caller's: every app of it is one of the
/// caller's (a token of every app is within an unscoped caller only).
fn within(caller: &Caller, apps: &[String]) -> bool {
    apps.iter().all(|app| caller.sees(app))
}

/// Whether the caller's role may mint or revoke a token of `role`: deploy tokens either, read
/// tokens read ones only; the services' roles none.
fn may_grant(caller: &Caller, role: MintedRole) -> bool {
    match caller.role {
        Role::Deploy => true,
        Role::Read => role == MintedRole::Read,
        Role::Build | Role::Release | Role::Beacon => false,
    }
}

impl Minted {
    pub fn new(storage: Arc<dyn Storage>, tokens: Tokens) -> Self {
        let (grants, _) = watch::channel(Arc::new(Vec::new()));
        Self {
            storage,
            tokens,
            grants: Arc::new(grants),
        }
    }

    /// The list of unexpired grants, for the link to Beacon; it changes when the list does.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Vec<TokenGrant>>> {
        self.grants.subscribe()
    }

    /// Reads the stored tokens again: the unexpired ones are accepted from now on (in place of
    /// those before), expired records are removed, and Beacon is told when the list changed.
    pub async fn refresh(&self) -> Result<(), ApiError> {
        let now = unix_now();
        let mut grants = Vec::new();
        for name in self.storage.list(PREFIX).await? {
            let Some(stored) = self.storage.read(&format!("{PREFIX}{name}")).await? else {
                continue;
            };
            let grant: TokenGrant = match serde_json::from_slice(&stored.bytes) {
                Ok(grant) => grant,
                Err(e) => {
                    tracing::warn!(%name, error = %e, "a stored token is unreadable; it is not accepted");
                    continue;
                }
            };
            if grant.info.expires_at <= now {
                self.storage.delete(&key(&grant.info.name)).await?;
                continue;
            }
            if grants.len() < MAX_MINTED_TOKENS {
                grants.push(grant);
            }
        }
        let entries = grants
            .iter()
            .map(|grant| {
                let role = match grant.info.role {
                    MintedRole::Read => Role::Read,
                    MintedRole::Deploy => Role::Deploy,
                };
                let entry = TokenEntry {
                    name: grant.info.name.clone(),
                    role,
                    sha256: grant.sha256.clone(),
                    node: None,
                    apps: Some(grant.info.apps.clone()),
                };
                (
                    entry,
                    Some(UNIX_EPOCH + Duration::from_secs(grant.info.expires_at)),
                )
            })
            .collect();
        self.tokens
            .replace_minted(entries)
            .map_err(ApiError::Internal)?;
        self.grants.send_if_modified(|current| {
            if **current == grants {
                false
            } else {
                *current = Arc::new(grants);
                true
            }
        });
        Ok(())
    }

    /// Reads the stored list every [`TOKEN_REFRESH`] until `shutdown`.
    pub async fn keep_fresh(self, shutdown: CancellationToken) {
        let mut ticks = tokio::time::interval(TOKEN_REFRESH);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticks.tick() => {
                    if let Err(e) = self.refresh().await {
                        tracing::warn!(error = %e, "cannot read the minted tokens; the last list stays");
                    }
                }
            }
        }
    }

    /// Mints a token within the caller's role and apps; the token is in the answer only.
    pub async fn mint(&self, caller: &Caller, request: MintToken) -> Result<TokenMinted, ApiError> {
        px_proto::names::check_app_name(&request.name)
            .map_err(|m| ApiError::BadRequest(format!("token name: {m}")))?;
        if !may_grant(caller, request.role) {
            return Err(ApiError::Forbidden(format!(
                "token {:?} has role {}; it may not mint a {} token",
                caller.name,
                caller.role.as_str(),
                request.role.as_str()
            )));
        }
        if request.apps.is_empty() || request.apps.len() > MAX_TOKEN_APPS {
            return Err(ApiError::BadRequest(format!(
                "name between 1 and {MAX_TOKEN_APPS} apps the token may act on (--apps a,b)"
            )));
        }
        for app in &request.apps {
            px_proto::names::check_app_name(app)
                .map_err(|m| ApiError::BadRequest(format!("app {app:?}: {m}")))?;
        }
        if !within(caller, &request.apps) {
            return Err(ApiError::Forbidden(format!(
                "token {:?} is limited to its apps ({}); it may not mint a token for others",
                caller.name,
                caller.apps.as_deref().unwrap_or_default().join(", ")
            )));
        }
        let lifetime = request
            .expires_in_secs
            .map_or(DEFAULT_TOKEN_LIFETIME, Duration::from_secs);
        if lifetime.is_zero() || lifetime > MAX_TOKEN_LIFETIME {
            return Err(ApiError::BadRequest(format!(
                "a minted token lives between 1 second and {} days",
                MAX_TOKEN_LIFETIME.as_secs() / 86_400
            )));
        }
        if self.storage.list(PREFIX).await?.len() >= MAX_MINTED_TOKENS {
            return Err(ApiError::Conflict(format!(
                "{MAX_MINTED_TOKENS} tokens are minted already; revoke some (`em tokens revoke NAME`)"
            )));
        }
        let token = px_runtime::tokens::generate();
        let info = TokenInfo {
            name: request.name.clone(),
            role: request.role,
            apps: request.apps,
            created_at: crate::releases::now_rfc3339(),
            created_by: caller.name.clone(),
            expires_at: unix_now() + lifetime.as_secs(),
        };
        let grant = TokenGrant {
            info: info.clone(),
            sha256: px_runtime::tokens::hash(&token),
        };
        let bytes =
            serde_json::to_vec_pretty(&grant).map_err(|e| ApiError::Internal(e.to_string()))?;
        // Create-only: of two mints of one name, one wins and the other is told.
        match self
            .storage
            .create(&key(&info.name), Bytes::from(bytes))
            .await
        {
            Ok(()) => {}
            Err(StorageError::AlreadyExists(_)) => {
                return Err(ApiError::Conflict(format!(
                    "a token named {:?} exists; revoke it first or pick another name",
                    info.name
                )));
            }
            Err(e) => return Err(e.into()),
        }
        tracing::info!(token = %info.name, role = info.role.as_str(), apps = ?info.apps, by = %caller.name, "token minted");
        self.refresh().await?;
        Ok(TokenMinted { token, info })
    }

    /// The minted tokens within the caller's apps, without secrets or hashes.
    pub async fn list(&self, caller: &Caller) -> Vec<TokenInfo> {
        self.grants
            .borrow()
            .iter()
            .filter(|grant| within(caller, &grant.info.apps))
            .map(|grant| grant.info.clone())
            .collect()
    }

    /// Revokes a minted token within the caller's role and apps; it is refused here at once,
    /// and by Beacon once the new list reaches it.
    pub async fn revoke(&self, caller: &Caller, name: &str) -> Result<TokenInfo, ApiError> {
        px_proto::names::check_app_name(name)
            .map_err(|m| ApiError::BadRequest(format!("token name: {m}")))?;
        let missing = || ApiError::NotFound(format!("no minted token {name:?}"));
        let stored = self.storage.read(&key(name)).await?.ok_or_else(missing)?;
        let grant: TokenGrant = serde_json::from_slice(&stored.bytes)
            .map_err(|e| ApiError::Internal(format!("{}: {e}", key(name))))?;
        if !may_grant(caller, grant.info.role) || !within(caller, &grant.info.apps) {
            return Err(ApiError::Forbidden(format!(
                "token {:?} may not revoke {name:?}, a {} token of apps {}",
                caller.name,
                grant.info.role.as_str(),
                grant.info.apps.join(", ")
            )));
        }
        self.storage.delete(&key(name)).await?;
        tracing::info!(token = %name, by = %caller.name, "token revoked");
        self.refresh().await?;
        Ok(grant.info)
    }
}
