//! The host names an app is served on (docs/src/reference/em.md, "em domains"): its current
//! release's `[http] domains`, the names added with `em domains add` (read with the desired
//! state, no release), and `<app>.<cluster domain>`. The cluster's name stays served once an
//! app has names of its own, as Heroku keeps `*.herokuapp.com`, except on a cluster left at
//! `localhost` (`em up`), where it is served only to an app whose manifest names none, as
//! before added names existed. A name directly under the cluster domain, `<x>.<cluster
//! domain>`, belongs to the app called `x` alone: another app's manifest or added names of that
//! form are not served, so no app can take a neighbour's cluster name (apprepo, which does not
//! know the cluster domain, cannot refuse them).

use std::collections::BTreeMap;

use px_proto::api::Release;

/// The names added to each app with `em domains add`, by app (apps with none are absent).
pub type AddedDomains = BTreeMap<String, Vec<String>>;

/// The cluster domain of a machine that is no real cluster (`em up`, tests).
pub const LOCAL_CLUSTER_DOMAIN: &str = "localhost";

/// Every name `release` is served on, each once: the manifest's, then the added ones, then
/// the cluster's when served; never another app's cluster name.
pub fn served(release: &Release, added: Option<&Vec<String>>, cluster_domain: &str) -> Vec<String> {
    let manifest = &release.manifest.http.domains;
    let cluster = (manifest.is_empty() || cluster_domain != LOCAL_CLUSTER_DOMAIN)
        .then(|| format!("{}.{cluster_domain}", release.app));
    let mut names: Vec<String> = Vec::new();
    for name in manifest
        .iter()
        .cloned()
        .chain(added.into_iter().flatten().cloned())
        .filter(|name| !is_others_cluster_name(name, &release.app, cluster_domain))
        .chain(cluster)
    {
        if !names.iter().any(|n| n.eq_ignore_ascii_case(&name)) {
            names.push(name);
        }
    }
    names
}

/// Whether `name` is `<x>.<cluster domain>` for an `x` other than `app`: the cluster name of
/// the app called `x`, whether or not it exists yet.
fn is_others_cluster_name(name: &str, app: &str, cluster_domain: &str) -> bool {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let suffix = format!(".{}", cluster_domain.to_ascii_lowercase());
    match name.strip_suffix(&suffix) {
        Some(label) => !label.contains('.') && label != app,
        None => false,
    }
}

/// What the persisted generation numbers of the added names: `domains <app> <a,b>` for each
/// app that has some, so adding or removing one is a new assignment.
pub fn fingerprint(added: &AddedDomains) -> impl Iterator<Item = String> + '_ {
    added
        .iter()
        .map(|(app, names)| format!("domains {app} {}", names.join(",")))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn release(app: &str, domains: &[&str]) -> Release {
        let list: Vec<String> = domains.iter().map(|d| format!("{d:?}")).collect();
        let manifest = px_proto::manifest::AppManifest::parse(&format!(
            "name = {app:?}\nrun = \"true\"\n[http]\ndomains = [{}]",
            list.join(", ")
        ))
        .unwrap();
        serde_json::from_value(serde_json::json!({
            "app": app, "version": 1,
            "bundle": {"sha256": "00", "size": 1},
            "manifest": manifest,
            "config": {}, "cause": {"kind": "deploy"}, "description": "",
            "created_at": "2026-01-01T00:00:00Z", "created_by": "t"
        }))
        .unwrap()
    }

    #[test]
    fn the_cluster_name_stays_served_beside_the_apps_own_names_on_a_real_cluster() {
        let added = vec!["www.shop.example".to_string()];
        assert_eq!(
            served(
                &release("shop", &["shop.example"]),
                Some(&added),
                "apps.example.net"
            ),
            ["shop.example", "www.shop.example", "shop.apps.example.net"]
        );
        assert_eq!(
            served(&release("shop", &[]), None, "apps.example.net"),
            ["shop.apps.example.net"]
        );
    }

    #[test]
    fn on_localhost_the_cluster_name_is_served_only_when_the_manifest_names_none() {
        let added = vec!["shop.test".to_string()];
        assert_eq!(
            served(
                &release("shop", &["shop.example"]),
                Some(&added),
                "localhost"
            ),
            ["shop.example", "shop.test"]
        );
        assert_eq!(
            served(&release("shop", &[]), Some(&added), "localhost"),
            ["shop.test", "shop.localhost"]
        );
    }

    #[test]
    fn no_app_is_served_on_another_apps_cluster_name() {
        let added = vec![
            "blog.apps.example.net".to_string(),
            "www.shop.apps.example.net".to_string(),
        ];
        assert_eq!(
            served(
                &release("shop", &["blog.apps.example.net"]),
                Some(&added),
                "apps.example.net"
            ),
            ["www.shop.apps.example.net", "shop.apps.example.net"]
        );
        // On `em up` too: `blog.localhost` is the blog's.
        let added = vec!["blog.localhost".to_string()];
        assert_eq!(
            served(&release("shop", &[]), Some(&added), "localhost"),
            ["shop.localhost"]
        );
    }

    #[test]
    fn a_name_in_the_manifest_and_added_is_served_once() {
        let added = vec!["shop.example".to_string()];
        assert_eq!(
            served(
                &release("shop", &["shop.example"]),
                Some(&added),
                "localhost"
            ),
            ["shop.example"]
        );
    }
}
