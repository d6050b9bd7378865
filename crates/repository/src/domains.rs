//! Domains belong to one app: a commit that adds a host name which another app's current
//! release names is refused, naming the holder, so the route table never has to choose.

use px_proto::api::Release;
use px_proto::manifest::AppManifest;

use crate::error::ApiError;
use crate::releases::Releases;

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

impl Releases {
    /// Refuses `domains` for `app` when another app's current release names one of them.
    /// The caller holds the domain claim lock from this check until its release is created,
    /// so two commits of this apprepo cannot both take a free name.
    pub(crate) async fn check_domains(
        &self,
        app: &str,
        domains: &[String],
    ) -> Result<(), ApiError> {
        for other in self.apps().await? {
            if other.name == app {
                continue;
            }
            let Some(release) = other.current else {
                continue;
            };
            if let Some(domain) = release
                .manifest
                .http
                .domains
                .iter()
                .find(|d| domains.contains(&d.to_ascii_lowercase()))
            {
                return Err(ApiError::DomainTaken {
                    domain: domain.to_ascii_lowercase(),
                    holder: other.name,
                    version: release.version,
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
