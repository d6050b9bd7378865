//! Which app a host goes to when two apps name it: the one created first (the older claim),
//! whatever their names, so the answer is the same on every node and after every restart.
//! apprepo refuses a release that adds a host another app holds; this is the rule for what
//! got past that check (releases from before it, or two apprepos racing).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::routes::{AppRoute, RouteTable};

/// An app as the proxy serves it.
pub(super) struct Served {
    /// Host names its assignment names.
    pub(super) domains: Vec<String>,
    pub(super) route: Arc<AppRoute>,
    /// The release the route serves, for events.
    pub(super) release: u64,
    /// When the app was created (RFC 3339), as its assignment says; `None` ranks last.
    pub(super) created_at: Option<String>,
}

/// A host named by more than one app: who got it and who did not.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Conflict {
    pub(super) host: String,
    pub(super) winner: String,
    /// The apps that named it too and are not routed there.
    pub(super) losers: Vec<String>,
}

impl Conflict {
    pub(super) fn message(&self) -> String {
        let losers: Vec<String> = self.losers.iter().map(|app| format!("{app:?}")).collect();
        format!(
            "host {:?} is also named by {}; it stays routed to {:?}, created first; remove it from the other app's [http] domains or its added names (`em domains remove`)",
            self.host,
            losers.join(", "),
            self.winner
        )
    }
}

/// The route table for `served`, and every host more than one app names.
pub(super) fn route_table(served: &BTreeMap<String, Served>) -> (RouteTable, Vec<Conflict>) {
    // host → apps naming it, oldest claim first: creation time (unknown last), then name.
    let mut claims: BTreeMap<String, Vec<(&String, &Served)>> = BTreeMap::new();
    for (app, served) in served {
        let hosts: BTreeSet<String> = served
            .domains
            .iter()
            .map(|d| d.to_ascii_lowercase())
            .collect();
        for host in hosts {
            claims.entry(host).or_default().push((app, served));
        }
    }
    let mut table = RouteTable::default();
    let mut conflicts = Vec::new();
    for (host, mut apps) in claims {
        apps.sort_by(|(a_name, a), (b_name, b)| {
            (a.created_at.is_none(), &a.created_at, a_name).cmp(&(
                b.created_at.is_none(),
                &b.created_at,
                b_name,
            ))
        });
        let Some(((winner, first), rest)) = apps.split_first() else {
            continue;
        };
        table.by_host.insert(host.clone(), first.route.clone());
        if !rest.is_empty() {
            conflicts.push(Conflict {
                host,
                winner: (*winner).clone(),
                losers: rest.iter().map(|(app, _)| (*app).clone()).collect(),
            });
        }
    }
    (table, conflicts)
}

/// The conflicts of `current` not in `reported`, which becomes `current`: a conflict is
/// reported once while it lasts, and again only if it ends and comes back.
pub(super) fn newly_reported(
    reported: &mut BTreeSet<Conflict>,
    current: Vec<Conflict>,
) -> Vec<Conflict> {
    let current: BTreeSet<Conflict> = current.into_iter().collect();
    let new = current.difference(reported).cloned().collect();
    *reported = current;
    new
}

#[cfg(test)]
mod tests {
    use super::*;

    fn served(app: &str, domains: &[&str], created_at: Option<&str>) -> (String, Served) {
        (
            app.to_owned(),
            Served {
                domains: domains.iter().map(|d| (*d).to_owned()).collect(),
                route: Arc::new(AppRoute::new(app, 1, Vec::new(), Vec::new())),
                release: 1,
                created_at: created_at.map(str::to_owned),
            },
        )
    }

    fn owner(table: &RouteTable, host: &str) -> String {
        table
            .lookup(host)
            .map(|r| r.app.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn a_host_two_apps_name_goes_to_the_app_created_first_not_the_last_sorted() {
        // "zeta" sorts last but was created first: it keeps the host.
        let apps = BTreeMap::from([
            served(
                "alpha",
                &["shop.example.com", "alpha.example.com"],
                Some("2026-03-01T00:00:00Z"),
            ),
            served("zeta", &["shop.example.com"], Some("2026-01-01T00:00:00Z")),
        ]);
        let (table, conflicts) = route_table(&apps);
        assert_eq!(owner(&table, "shop.example.com"), "zeta");
        assert_eq!(owner(&table, "alpha.example.com"), "alpha");
        assert_eq!(
            conflicts,
            [Conflict {
                host: "shop.example.com".into(),
                winner: "zeta".into(),
                losers: vec!["alpha".into()],
            }]
        );
        assert!(conflicts[0].message().contains("stays routed to \"zeta\""));
    }

    #[test]
    fn an_app_of_unknown_age_ranks_after_dated_ones_and_names_break_ties() {
        let apps = BTreeMap::from([
            served("a", &["x.example.com"], None),
            served("b", &["x.example.com"], Some("2026-05-01T00:00:00Z")),
        ]);
        assert_eq!(owner(&route_table(&apps).0, "x.example.com"), "b");
        let apps = BTreeMap::from([
            served("c", &["x.example.com"], None),
            served("d", &["x.example.com"], None),
        ]);
        assert_eq!(owner(&route_table(&apps).0, "x.example.com"), "c");
    }

    #[test]
    fn a_conflict_is_reported_once_while_it_lasts() {
        let apps = BTreeMap::from([
            served("a", &["x.example.com"], Some("2026-01-01T00:00:00Z")),
            served("b", &["x.example.com"], Some("2026-02-01T00:00:00Z")),
        ]);
        let mut reported = BTreeSet::new();
        assert_eq!(newly_reported(&mut reported, route_table(&apps).1).len(), 1);
        // Every later publish (a redeploy, a crash) finds the same conflict: nothing new.
        assert!(newly_reported(&mut reported, route_table(&apps).1).is_empty());
        assert!(newly_reported(&mut reported, Vec::new()).is_empty());
        assert_eq!(newly_reported(&mut reported, route_table(&apps).1).len(), 1);
    }

    #[test]
    fn hosts_named_once_make_no_conflict() {
        let apps = BTreeMap::from([
            served("a", &["a.example.com", "A.example.com"], None),
            served("b", &["b.example.com"], None),
        ]);
        let (table, conflicts) = route_table(&apps);
        assert_eq!(table.by_host.len(), 2);
        assert!(conflicts.is_empty());
    }
}
