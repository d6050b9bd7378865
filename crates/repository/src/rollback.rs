//! Rollbacks: a new release that restores an earlier one's code and config. Asked for by a
//! person (`em rollback`, `POST /v1/apps/{app}/rollback`) or by Beacon when a release goes
//! over its error budget; the second kind only applies while the bad release is current.

use px_proto::api::{Release, ReleaseCause};

use crate::error::ApiError;
use crate::releases::{Draft, Releases};

/// What to roll back.
pub struct RollbackRequest<'a> {
    pub app: &'a str,
    /// The release to restore; by default the one before the current.
    pub to: Option<u64>,
    /// Only roll back if this is still the current release (Beacon's orders: a newer deploy
    /// or an earlier rollback makes the order stale).
    pub only_from: Option<u64>,
    /// Why, for the new release's description; by default "rollback to vN".
    pub reason: Option<&'a str>,
}

/// Commits the rollback as a new release. A stale `only_from` is a `Conflict`.
pub async fn commit(
    releases: &Releases,
    by: &str,
    request: RollbackRequest<'_>,
) -> Result<Release, ApiError> {
    let app = request.app;
    // Read the target first (outside the commit's retry loop): releases are immutable.
    let current = releases.current(app).await?;
    let stale = |current: u64| {
        request.only_from.filter(|from| *from != current).map(|from| {
            ApiError::Conflict(format!(
                "{app:?} is at v{current}, no longer at v{from}; the rollback of v{from} is not needed"
            ))
        })
    };
    if let Some(e) = stale(current.version) {
        return Err(e);
    }
    let target_version = match request.to {
        Some(v) => v,
        None if current.version > 1 => current.version - 1,
        None => {
            return Err(ApiError::Conflict(format!(
                "app {app:?} has only v1; there is nothing to roll back to"
            )));
        }
    };
    if target_version == 0 || target_version >= current.version {
        return Err(ApiError::BadRequest(format!(
            "v{target_version} is not an earlier release of {app:?} (current is v{})",
            current.version
        )));
    }
    let target = releases.release(app, target_version).await?;
    if !crate::phases::may_serve(&target) {
        return Err(ApiError::Conflict(format!(
            "v{target_version} of {app:?} never served: its release phase did not succeed; roll back to a release that served"
        )));
    }
    let description = match request.reason {
        Some(reason) => format!("rollback to v{}: {reason}", target.version),
        None => format!("rollback to v{}", target.version),
    };
    releases
        .commit(app, by, |now| {
            // Checked again against what is current when the number is taken, so two
            // repositories carrying out the same order commit it once.
            if let Some(e) = now.and_then(|r| stale(r.version)) {
                return Err(e);
            }
            Ok(Draft {
                bundle: target.bundle.clone(),
                manifest: target.manifest.clone(),
                config: target.config.clone(),
                // A built release comes back with its layers: a rollback never rebuilds.
                build: target.build.clone(),
                // Running the target's migrations again would be running old ones over a
                // newer schema; a rollback restores code and config only.
                phase: None,
                cause: ReleaseCause::Rollback { to: target.version },
                description: description.clone(),
            })
        })
        .await
}
