//! Host names of apps, and that each belongs to one app. An app is served on its current
//! release's `[http] domains` and on the names added with `em domains add`, which are no
//! release: they live in `apps/<app>/domains.json` beside the formation, written by
//! compare-and-swap as it is, so adding or removing one redeploys nothing.
//!
//! A name belongs to one app: adding one (by a release or `em domains add`) that another app
//! holds, in its current release or its added names, is refused naming the holder, so the
//! route table never has to choose. Both checks run under the `domain_claims` lock until the
//! name is written, so two claims through this apprepo cannot both take a free name, and each
//! new name is claimed in the storage first (`claims.rs`), so two apprepos cannot either.

use bytes::Bytes;
use px_proto::api::{DomainEntry, DomainSource, Domains, Release};
use px_proto::manifest::AppManifest;
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::releases::Releases;
use crate::storage::StorageError;

/// Most names an app may add with `em domains add`: the manifest's own limit, since Maestro
/// looks both up per request.
pub const MAX_ADDED_DOMAINS: usize = px_proto::manifest::MAX_DOMAINS;
/// Attempts at writing `domains.json` before giving up; each failure means another change of
/// the same app's names was written in between (by another apprepo sharing the storage).
pub const MAX_DOMAIN_ATTEMPTS: usize = 32;

/// The stored form of `apps/<app>/domains.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct DomainsRecord {
    /// The added names, lowercase, sorted, each once.
    domains: Vec<String>,
}

fn domains_key(app: &str) -> String {
    format!("apps/{app}/domains.json")
}

/// A change of an app's added names.
enum Change {
    Add,
    Remove,
}

/// The host names `next` names that `current` (the app's own release before it) does not,
/// lowercased: only these are checked, so an app that already shares a name from before this
/// check can still deploy (Maestro routes such a name to the app created first).
pub(crate) fn added(current: Option<&Release>, next: &AppManifest) -> Vec<String> {
    let held: Vec<String> = current
        .map(|r| {
            r.manifest
                .http
                .domains
                .iter()
                .map(|d| d.to_ascii_lowercase())
                .collect()
        })
        .unwrap_or_default();
    let mut added: Vec<String> = next
        .http
        .domains
        .iter()
        .map(|d| d.to_ascii_lowercase())
        .filter(|d| !held.contains(d))
        .collect();
    added.sort();
    added.dedup();
    added
}

/// The names as `GET /v1/apps/{app}/domains` answers them: the manifest's, then the added
/// ones; a name in both is listed once, as the manifest's. No certificate is known here yet.
fn view(app: &str, current: Option<&Release>, added: &[String]) -> Domains {
    let mut domains: Vec<DomainEntry> = Vec::new();
    let manifest = current
        .map(|r| r.manifest.http.domains.as_slice())
        .unwrap_or_default();
    for (name, source) in manifest
        .iter()
        .map(|d| (d.to_ascii_lowercase(), DomainSource::Manifest))
        .chain(added.iter().map(|d| (d.clone(), DomainSource::Added)))
    {
        if !domains.iter().any(|e| e.domain == name) {
            domains.push(DomainEntry {
                domain: name,
                source,
                certificate: None,
            });
        }
    }
    Domains {
        app: app.to_string(),
        domains,
    }
}

impl Releases {
    /// The stored record and its version (`None`: no name ever added).
    async fn domains_record(&self, app: &str) -> Result<(DomainsRecord, Option<String>), ApiError> {
        let key = domains_key(app);
        match self.count_storage_error(self.storage().read(&key).await)? {
            None => Ok((DomainsRecord::default(), None)),
            Some(stored) => {
                let record = serde_json::from_slice(&stored.bytes)
                    .map_err(|e| ApiError::Internal(format!("{key} is not valid JSON: {e}")))?;
                Ok((record, Some(stored.version)))
            }
        }
    }

    /// The names added to `app` with `em domains add` (empty when none).
    pub(crate) async fn added_domains(&self, app: &str) -> Result<Vec<String>, ApiError> {
        Ok(self.domains_record(app).await?.0.domains)
    }

    /// Every name `app` is served on that apprepo knows of.
    pub async fn domains(&self, app: &str) -> Result<Domains, ApiError> {
        let found = self.app(app).await?;
        Ok(view(app, found.current.as_ref(), &found.domains))
    }

    /// Adds `domain` to `app`'s names: refused when it is not a valid host name, when the app
    /// has [`MAX_ADDED_DOMAINS`] already, when its own release serves it already, or when
    /// another app holds it. Returns the names and whether this one is new (adding a name the
    /// app added before changes nothing).
    pub async fn add_domain(&self, app: &str, domain: &str) -> Result<(Domains, bool), ApiError> {
        px_proto::names::check_domain(domain)
            .map_err(|m| ApiError::BadRequest(format!("domain: {m}")))?;
        let _claim = self.lock_domain_claims().await;
        let found = self.app(app).await?;
        if let Some(release) = &found.current
            && release
                .manifest
                .http
                .domains
                .iter()
                .any(|d| d.eq_ignore_ascii_case(domain))
        {
            return Err(ApiError::Conflict(format!(
                "{app:?} already serves {domain:?} from its app.toml's [http] domains (release v{}); nothing to add",
                release.version
            )));
        }
        if found.domains.iter().any(|d| d == domain) {
            return Ok((view(app, found.current.as_ref(), &found.domains), false));
        }
        let names = [domain.to_ascii_lowercase()];
        // The scan names the holder precisely; the claim then keeps another apprepo's request
        // from taking the name between this check and the write.
        self.check_domains(app, &names).await?;
        let claims = self.claim_domains(app, &names).await?;
        claims.still_fresh()?;
        let domains = self.change_domains(app, domain, Change::Add).await?;
        Ok((view(app, found.current.as_ref(), &domains), true))
    }

    /// Removes the added `domain` from `app`'s names; a name from the manifest is refused
    /// (a deploy changes those), an unknown one is a 404.
    pub async fn remove_domain(&self, app: &str, domain: &str) -> Result<Domains, ApiError> {
        let _claim = self.lock_domain_claims().await;
        let found = self.app(app).await?;
        if !found.domains.iter().any(|d| d.eq_ignore_ascii_case(domain)) {
            let from_manifest = found.current.as_ref().is_some_and(|r| {
                r.manifest
                    .http
                    .domains
                    .iter()
                    .any(|d| d.eq_ignore_ascii_case(domain))
            });
            return Err(if from_manifest {
                ApiError::Conflict(format!(
                    "{domain:?} comes from {app:?}'s app.toml [http] domains; remove it there and deploy"
                ))
            } else {
                ApiError::NotFound(format!(
                    "{app:?} has no added domain {domain:?}; `em domains list` shows its domains"
                ))
            });
        }
        let name = domain.to_ascii_lowercase();
        let domains = self.change_domains(app, &name, Change::Remove).await?;
        let in_release = found.current.as_ref().is_some_and(|r| {
            r.manifest
                .http
                .domains
                .iter()
                .any(|d| d.eq_ignore_ascii_case(&name))
        });
        if !in_release {
            self.release_domain_claim(app, &name).await;
        }
        Ok(view(app, found.current.as_ref(), &domains))
    }

    /// Writes `change` of `domain` into `app`'s record by compare-and-swap, from a fresh read
    /// each attempt; returns the names written.
    async fn change_domains(
        &self,
        app: &str,
        domain: &str,
        change: Change,
    ) -> Result<Vec<String>, ApiError> {
        let key = domains_key(app);
        for _ in 0..MAX_DOMAIN_ATTEMPTS {
            let (mut record, version) = self.domains_record(app).await?;
            match change {
                Change::Add => {
                    if !record.domains.iter().any(|d| d == domain) {
                        if record.domains.len() >= MAX_ADDED_DOMAINS {
                            return Err(ApiError::BadRequest(format!(
                                "{app:?} has {MAX_ADDED_DOMAINS} added domains, the most an app may have; remove one with `em domains remove` first"
                            )));
                        }
                        record.domains.push(domain.to_string());
                        record.domains.sort();
                    }
                }
                Change::Remove => record.domains.retain(|d| d != domain),
            }
            let bytes = Bytes::from(
                serde_json::to_vec_pretty(&record)
                    .map_err(|e| ApiError::Internal(e.to_string()))?,
            );
            let written = match &version {
                Some(version) => self.storage().replace(&key, bytes, version).await,
                None => self.storage().create(&key, bytes).await,
            };
            match self.count_storage_error(written) {
                Ok(()) => return Ok(record.domains),
                Err(StorageError::Conflict(_) | StorageError::AlreadyExists(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ApiError::Conflict(format!(
            "too many concurrent changes of {app:?}'s domains; retry in a moment"
        )))
    }

    /// Refuses `domains` for `app` when another app holds one of them: in its current
    /// release, or added with `em domains add`. The caller holds the domain claim lock from
    /// this check until its release or record is written, so two claims of this apprepo
    /// cannot both take a free name.
    pub(crate) async fn check_domains(
        &self,
        app: &str,
        domains: &[String],
    ) -> Result<(), ApiError> {
        for other in self.apps().await? {
            if other.name == app {
                continue;
            }
            if let Some(release) = &other.current
                && let Some(domain) = release
                    .manifest
                    .http
                    .domains
                    .iter()
                    .find(|d| domains.contains(&d.to_ascii_lowercase()))
            {
                return Err(ApiError::DomainTaken {
                    domain: domain.to_ascii_lowercase(),
                    holder: other.name,
                    how: format!("its release v{}", release.version),
                });
            }
            if let Some(domain) = other.domains.iter().find(|d| domains.contains(d)) {
                return Err(ApiError::DomainTaken {
                    domain: domain.clone(),
                    holder: other.name.clone(),
                    how: "added with `em domains add`".into(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(domains: &[&str]) -> AppManifest {
        let list: Vec<String> = domains.iter().map(|d| format!("{d:?}")).collect();
        AppManifest::parse(&format!(
            "name = \"x\"\nrun = \"true\"\n[http]\ndomains = [{}]",
            list.join(", ")
        ))
        .unwrap()
    }

    #[test]
    fn only_names_the_app_did_not_hold_are_added_once_each() {
        let next = manifest(&["a.example.com", "b.example.com", "b.example.com"]);
        assert_eq!(added(None, &next), ["a.example.com", "b.example.com"]);
        let current = Release {
            app: "x".into(),
            version: 1,
            bundle: px_proto::api::BundleRef {
                sha256: "00".into(),
                size: 1,
                bundled_commands: Vec::new(),
                unpacked_size: None,
            },
            manifest: manifest(&["a.example.com"]),
            config: Default::default(),
            cause: px_proto::api::ReleaseCause::Deploy,
            description: String::new(),
            created_at: "2026-01-01T00:00:00Z".into(),
            created_by: "t".into(),
            build: None,
            phase: None,
            config_hidden: false,
        };
        assert_eq!(added(Some(&current), &next), ["b.example.com"]);
    }
}
