//! Placement: which nodes run a release, decided from what each node told Beacon (its labels,
//! the runtimes on its host, what it runs now), and the sentence that says why no node can;
//! and which node runs each pending build. Pure functions over plain data; the hub calls them
//! under its lock.

use std::collections::BTreeMap;

use px_proto::api::Release;
use px_proto::build::{BUILD_LABEL, BuildStatus};
use px_proto::link::NodeReport;

/// What placement looks at on a node.
#[derive(Debug, Clone, Copy)]
pub struct Fit<'a> {
    pub labels: &'a BTreeMap<String, String>,
    /// Runtimes the node found on its host (`python3` → `3.11.7`).
    pub runtimes: &'a BTreeMap<String, String>,
    /// What the node last reported running; `None` for a node not seen yet.
    pub report: Option<&'a NodeReport>,
}

/// Labels and runtimes of a node that has none.
const NOTHING: &BTreeMap<String, String> = &BTreeMap::new();

impl Fit<'_> {
    /// A node with no labels, no runtimes and no report: when no release asks anything of a
    /// node, every node gets the assignment made for this one.
    pub const BARE: Fit<'static> = Fit {
        labels: NOTHING,
        runtimes: NOTHING,
        report: None,
    };
}

/// Whether the node has the runtime `release` needs: found on its host in a version that
/// satisfies it, or shipped in the bundle itself. An app without a `runtime` runs anywhere.
pub fn has_runtime(release: &Release, runtimes: &BTreeMap<String, String>) -> bool {
    let Some(runtime) = &release.manifest.runtime else {
        return true;
    };
    if release.bundle.bundled_commands.contains(&runtime.command) {
        return true;
    }
    let found = runtimes
        .get(&runtime.command)
        .and_then(|v| px_proto::runtime::Version::parse(v));
    runtime.admits(found.as_ref())
}

/// Whether a node should run `release`: its labels admit it and it has the runtime. A node
/// that already runs the app stays assigned even without the runtime, so that its Maestro
/// refuses the new release with a clear event and keeps the old one serving, rather than the
/// app vanishing from it.
pub fn places(release: &Release, fit: &Fit<'_>) -> bool {
    release.manifest.placement.admits(fit.labels)
        && (has_runtime(release, fit.runtimes)
            || fit
                .report
                .is_some_and(|r| r.instances.iter().any(|i| i.app == release.app)))
}

/// A node as the unplaced message describes it.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    pub name: &'a str,
    /// Silent past the deadline: not eligible, whatever it has.
    pub lost: bool,
    pub fit: Fit<'a>,
}

/// Says why no node can run `release`, naming what each node lacks, so `em deploy` can stop
/// waiting and tell the user: `hello v2 has no node to run on: it needs python3>=3.11; web-1
/// has python3 3.9, web-2 is lost`.
pub fn unplaced_message<'a>(
    release: &Release,
    nodes: impl IntoIterator<Item = Candidate<'a>>,
) -> String {
    let mut reasons = Vec::new();
    for node in nodes {
        let name = node.name;
        if node.lost {
            reasons.push(format!("{name} is lost"));
        } else if !release.manifest.placement.admits(node.fit.labels) {
            reasons.push(format!("{name} lacks the placement labels"));
        } else if let Some(runtime) = &release.manifest.runtime {
            let found = node.fit.runtimes.get(&runtime.command).map_or_else(
                || "none".to_string(),
                |v| format!("{} {v}", runtime.command),
            );
            reasons.push(format!("{name} has {found}"));
        }
    }
    let needs = release
        .manifest
        .runtime
        .as_ref()
        .map(|r| format!(" it needs {r};"))
        .unwrap_or_default();
    format!(
        "{} v{} has no node to run on:{needs} {}",
        release.app,
        release.version,
        reasons.join(", ")
    )
}

/// A build, by app and number.
pub type BuildKey = (String, u64);

/// Whether a node's labels let it run builds (`build = "true"`).
pub fn may_build(labels: &BTreeMap<String, String>) -> bool {
    labels.get(BUILD_LABEL).is_some_and(|v| v == "true")
}

/// A node as build placement sees it.
#[derive(Debug, Clone, Copy)]
pub struct BuildNode<'a> {
    pub name: &'a str,
    /// Labelled `build = "true"`.
    pub may_build: bool,
    /// Silent past the deadline.
    pub lost: bool,
    /// Its link is up now.
    pub linked: bool,
    /// The builds its last report shows, whatever their progress.
    pub reported: &'a [BuildStatus],
}

impl BuildNode<'_> {
    fn can_keep(&self) -> bool {
        self.may_build && !self.lost
    }

    fn reports(&self, (app, build): &BuildKey) -> bool {
        self.reported
            .iter()
            .any(|b| &b.app == app && b.build == *build)
    }
}

/// Decides which node runs each pending build, given where each runs now (`current`).
///
/// A build stays where it is while that node may build and is not lost, even with its link
/// down for a moment: moving it would start it over. Then a node whose report shows the build
/// keeps it: that is how a restarted Beacon finds where its builds run. Then, while nodes
/// Beacon has not seen since it started may still come back (`absent_may_return`), a build
/// stays on such a node. Every other build goes to the linked node that may build and runs
/// the fewest builds (by name among equals); with none, it waits (`None`).
pub fn place_builds(
    current: &BTreeMap<BuildKey, Option<String>>,
    nodes: &[BuildNode<'_>],
    absent_may_return: bool,
) -> BTreeMap<BuildKey, Option<String>> {
    let by_name: BTreeMap<&str, &BuildNode<'_>> = nodes.iter().map(|n| (n.name, n)).collect();
    let mut placed: BTreeMap<BuildKey, Option<String>> = BTreeMap::new();
    let mut load: BTreeMap<&str, usize> = BTreeMap::new();
    let mut waiting = Vec::new();
    for (key, node) in current {
        let known = node.as_deref().and_then(|name| by_name.get(name));
        let keep = known
            .filter(|n| n.can_keep())
            .map(|n| n.name)
            .or_else(|| {
                nodes
                    .iter()
                    .find(|n| n.can_keep() && n.reports(key))
                    .map(|n| n.name)
            })
            .or_else(|| {
                node.as_deref()
                    .filter(|name| absent_may_return && !by_name.contains_key(name))
            });
        match keep {
            Some(name) => {
                *load.entry(name).or_default() += 1;
                placed.insert(key.clone(), Some(name.to_string()));
            }
            None => waiting.push(key),
        }
    }
    for key in waiting {
        let choice = nodes
            .iter()
            .filter(|n| n.can_keep() && n.linked)
            .min_by_key(|n| (load.get(n.name).copied().unwrap_or(0), n.name))
            .map(|n| n.name);
        if let Some(name) = choice {
            *load.entry(name).or_default() += 1;
        }
        placed.insert(key.clone(), choice.map(str::to_string));
    }
    placed
}

/// A non-web process type of an app: (app, type).
pub type ProcessKey = (String, String);
/// Where each numbered process of each type runs: number → node.
pub type ProcessPlacement = BTreeMap<ProcessKey, BTreeMap<u32, String>>;

/// A node as process placement sees it.
#[derive(Debug, Clone)]
pub struct ProcessNode<'a> {
    pub name: &'a str,
    /// Silent past the deadline: its processes run elsewhere.
    pub lost: bool,
    /// Its link is up now: only such a node is given a process it does not have.
    pub linked: bool,
    /// The apps it may run (placement labels and runtimes, as for web instances).
    pub apps: Vec<&'a str>,
}

/// Decides which node runs each process of each non-web type (docs/src/design/processes.md),
/// given how many of each type are `wanted` in total and where each runs now (`current`).
///
/// A process keeps its node and number while the node may run the app and is not lost (a link
/// down for a moment does not move it: moving would stop a job in hand), or, while nodes
/// Beacon has not seen since it started may still come back (`absent_may_return`), while its
/// node is such a node. Every other process goes to the linked node that may run the app and
/// runs the fewest processes of its type (so each type spreads evenly), then the fewest of the
/// app's, by name among equals; with none, it waits (left out). Numbers run from 1 to the
/// count, so `worker.2` is the same process until its node is lost, and scaling down removes
/// the highest numbers.
pub fn place_processes(
    current: &ProcessPlacement,
    wanted: &BTreeMap<ProcessKey, u32>,
    nodes: &[ProcessNode<'_>],
    absent_may_return: bool,
) -> ProcessPlacement {
    let by_name: BTreeMap<&str, &ProcessNode<'_>> = nodes.iter().map(|n| (n.name, n)).collect();
    let mut placed = ProcessPlacement::new();
    // Processes of each app on each node, counted over all its types.
    let mut load: BTreeMap<(&str, &str), u32> = BTreeMap::new();
    // Processes of each type on each node.
    let mut type_load: BTreeMap<(&ProcessKey, &str), u32> = BTreeMap::new();
    let mut waiting: Vec<(&ProcessKey, u32)> = Vec::new();
    for (key, count) in wanted {
        let app = key.0.as_str();
        for number in 1..=*count {
            let now = current.get(key).and_then(|numbers| numbers.get(&number));
            let keep = now.filter(|node| match by_name.get(node.as_str()) {
                Some(n) => !n.lost && n.apps.contains(&app),
                None => absent_may_return,
            });
            match keep {
                Some(node) => {
                    *load.entry((app, node.as_str())).or_default() += 1;
                    *type_load.entry((key, node.as_str())).or_default() += 1;
                    placed
                        .entry(key.clone())
                        .or_default()
                        .insert(number, node.clone());
                }
                None => waiting.push((key, number)),
            }
        }
    }
    for (key, number) in waiting {
        let app = key.0.as_str();
        let choice = nodes
            .iter()
            .filter(|n| n.linked && !n.lost && n.apps.contains(&app))
            .min_by_key(|n| {
                (
                    type_load.get(&(key, n.name)).copied().unwrap_or(0),
                    load.get(&(app, n.name)).copied().unwrap_or(0),
                    n.name,
                )
            });
        if let Some(node) = choice {
            *load.entry((app, node.name)).or_default() += 1;
            *type_load.entry((key, node.name)).or_default() += 1;
            placed
                .entry(key.clone())
                .or_default()
                .insert(number, node.name.to_string());
        }
    }
    placed
}

/// Says that a build waits for a node that may build, and how to let one.
pub fn no_build_node_message(app: &str, build: u64) -> String {
    format!(
        "{app} build {build} waits: no node may build; give a Maestro the label {BUILD_LABEL} = \"true\" (in its config's `labels`) to build there"
    )
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]

    use px_proto::api::{BundleRef, ReleaseCause};
    use px_proto::link::{InstanceState, InstanceStatus};
    use px_proto::manifest::AppManifest;

    use super::*;

    /// A release of `app` whose `app.toml` has `extra` after its name and command.
    pub(crate) fn release(app: &str, version: u64, extra: &str) -> Release {
        Release {
            app: app.into(),
            version,
            bundle: BundleRef {
                sha256: format!("{version:064x}"),
                size: 1000,
                bundled_commands: Vec::new(),
                unpacked_size: None,
            },
            manifest: AppManifest::parse(&format!(
                "name = \"{app}\"\nrun = \"python3 server.py\"\n{extra}"
            ))
            .unwrap(),
            config: BTreeMap::new(),
            cause: ReleaseCause::Deploy,
            description: "deploy".into(),
            created_at: "2026-11-25T00:00:00Z".into(),
            created_by: "ci".into(),
            build: None,
            phase: None,
            config_hidden: false,
        }
    }

    pub(crate) fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    pub(crate) fn running(app: &str, release: u64, state: InstanceState) -> NodeReport {
        NodeReport {
            generation: 1,
            instances: vec![InstanceStatus {
                app: app.into(),
                release,
                state,
                pid: Some(4242),
                port: Some(20001),
                restarts: 0,
                last_exit: None,
                process: "web".into(),
                number: 1,
                started_at: None,
                memory_bytes: None,
                cpu_permille: None,
            }],
            rollouts: Vec::new(),
            disk: None,
            builds: Vec::new(),
        }
    }

    #[test]
    fn placement_rules() {
        let gpu = map(&[("gpu", "yes"), ("zone", "a")]);
        let no_gpu = map(&[("gpu", "no")]);
        let py312 = map(&[("python3", "3.12.1")]);
        let py39 = map(&[("python3", "3.9.18")]);
        let garbled = map(&[("python3", "unknown")]);
        let runs_hello = running("hello", 1, InstanceState::Healthy);
        let runs_other = running("other", 1, InstanceState::Healthy);
        let mut bundled = release("hello", 2, "runtime = \"python3>=3.11\"");
        bundled.bundle.bundled_commands = vec!["python3".into()];
        let needs_311 = release("hello", 2, "runtime = \"python3>=3.11\"");
        let any_python = release("hello", 2, "runtime = \"python3\"");
        let on_gpu = release("hello", 2, "[placement]\nlabels = { gpu = \"yes\" }");
        let plain = release("hello", 2, "");
        let fit = |labels, runtimes, report| Fit {
            labels,
            runtimes,
            report,
        };
        let cases: &[(&str, &Release, Fit<'_>, bool)] = &[
            ("no labels asked: any node", &plain, Fit::BARE, true),
            (
                "labels asked and present (others ignored)",
                &on_gpu,
                fit(&gpu, NOTHING, None),
                true,
            ),
            (
                "labels asked and missing",
                &on_gpu,
                fit(NOTHING, NOTHING, None),
                false,
            ),
            (
                "labels asked with another value",
                &on_gpu,
                fit(&no_gpu, NOTHING, None),
                false,
            ),
            (
                "labels deny even a node running the app",
                &on_gpu,
                fit(NOTHING, NOTHING, Some(&runs_hello)),
                false,
            ),
            (
                "runtime present in a satisfying version",
                &needs_311,
                fit(NOTHING, &py312, None),
                true,
            ),
            (
                "runtime too old",
                &needs_311,
                fit(NOTHING, &py39, None),
                false,
            ),
            (
                "runtime missing",
                &needs_311,
                fit(NOTHING, NOTHING, None),
                false,
            ),
            (
                "runtime version unreadable, a version asked",
                &needs_311,
                fit(NOTHING, &garbled, None),
                false,
            ),
            (
                "runtime version unreadable, any version asked",
                &any_python,
                fit(NOTHING, &garbled, None),
                true,
            ),
            (
                "runtime shipped in the bundle",
                &bundled,
                fit(NOTHING, NOTHING, None),
                true,
            ),
            (
                "node already running the app stays assigned without the runtime",
                &needs_311,
                fit(NOTHING, &py39, Some(&runs_hello)),
                true,
            ),
            (
                "running another app does not count",
                &needs_311,
                fit(NOTHING, &py39, Some(&runs_other)),
                false,
            ),
        ];
        for (what, release, fit, expected) in cases {
            assert_eq!(places(release, fit), *expected, "{what}");
        }
        assert!(has_runtime(&plain, NOTHING), "an app without a runtime");
        assert!(has_runtime(&bundled, &py39), "a bundled runtime wins");
        assert!(!has_runtime(&needs_311, &py39));
    }

    #[test]
    fn the_unplaced_message_says_what_each_node_lacks() {
        let py39 = map(&[("python3", "3.9.18")]);
        let gpu = map(&[("gpu", "yes")]);
        let needs_311 = release("hello", 2, "runtime = \"python3>=3.11\"");
        let nodes = [
            Candidate {
                name: "web-1",
                lost: false,
                fit: Fit {
                    labels: NOTHING,
                    runtimes: &py39,
                    report: None,
                },
            },
            Candidate {
                name: "web-2",
                lost: false,
                fit: Fit::BARE,
            },
            Candidate {
                name: "web-3",
                lost: true,
                fit: Fit::BARE,
            },
        ];
        assert_eq!(
            unplaced_message(&needs_311, nodes),
            "hello v2 has no node to run on: it needs python3>=3.11; web-1 has python3 3.9.18, web-2 has none, web-3 is lost"
        );
        let on_gpu = release("hello", 3, "[placement]\nlabels = { gpu = \"yes\" }");
        let nodes = [
            Candidate {
                name: "web-1",
                lost: false,
                fit: Fit::BARE,
            },
            Candidate {
                name: "web-2",
                lost: false,
                fit: Fit {
                    labels: &gpu,
                    runtimes: NOTHING,
                    report: None,
                },
            },
        ];
        assert_eq!(
            unplaced_message(&on_gpu, nodes),
            "hello v3 has no node to run on: web-1 lacks the placement labels"
        );
        assert_eq!(
            unplaced_message(&on_gpu, []),
            "hello v3 has no node to run on: "
        );
    }

    fn key(app: &str, build: u64) -> BuildKey {
        (app.to_string(), build)
    }

    fn running_build(app: &str, build: u64) -> BuildStatus {
        BuildStatus {
            app: app.into(),
            build,
            progress: px_proto::build::BuildProgress::Running,
            release: None,
        }
    }

    #[test]
    fn build_placement_rules() {
        let builds_shop = [running_build("shop", 4)];
        let node = |name: &'static str| BuildNode {
            name,
            may_build: true,
            lost: false,
            linked: true,
            reported: &[],
        };
        let web = BuildNode {
            may_build: false,
            ..node("web-1")
        };
        let b1 = node("build-1");
        let b2 = node("build-2");
        let b1_lost = BuildNode { lost: true, ..b1 };
        let b1_unlinked = BuildNode {
            linked: false,
            ..b1
        };
        let b2_reports_shop = BuildNode {
            reported: &builds_shop,
            ..b2
        };
        let one = |app: &str, build: u64, on: Option<&str>| {
            BTreeMap::from([(key(app, build), on.map(str::to_string))])
        };
        type Case<'a> = (
            &'a str,
            BTreeMap<BuildKey, Option<String>>,
            Vec<BuildNode<'a>>,
            bool,
            Vec<(&'a str, u64, Option<&'a str>)>,
        );
        let cases: Vec<Case<'_>> = vec![
            (
                "a new build goes to the only node that may build",
                one("shop", 4, None),
                vec![web, b1],
                false,
                vec![("shop", 4, Some("build-1"))],
            ),
            (
                "no node may build: it waits",
                one("shop", 4, None),
                vec![web],
                false,
                vec![("shop", 4, None)],
            ),
            (
                "a lost node takes no new build",
                one("shop", 4, None),
                vec![b1_lost],
                false,
                vec![("shop", 4, None)],
            ),
            (
                "an unlinked node takes no new build",
                one("shop", 4, None),
                vec![b1_unlinked],
                false,
                vec![("shop", 4, None)],
            ),
            (
                "placed: it stays, even with a less busy node beside it",
                one("shop", 4, Some("build-1")),
                vec![b1, b2],
                false,
                vec![("shop", 4, Some("build-1"))],
            ),
            (
                "placed on a node whose link is down but not lost: it stays",
                one("shop", 4, Some("build-1")),
                vec![b1_unlinked, b2],
                false,
                vec![("shop", 4, Some("build-1"))],
            ),
            (
                "its node is lost: it moves",
                one("shop", 4, Some("build-1")),
                vec![b1_lost, b2],
                false,
                vec![("shop", 4, Some("build-2"))],
            ),
            (
                "its node no longer may build: it moves",
                one("shop", 4, Some("build-1")),
                vec![
                    BuildNode {
                        may_build: false,
                        ..b1
                    },
                    b2,
                ],
                false,
                vec![("shop", 4, Some("build-2"))],
            ),
            (
                "unplaced, and a node reports running it: it goes there",
                one("shop", 4, None),
                vec![b1, b2_reports_shop],
                false,
                vec![("shop", 4, Some("build-2"))],
            ),
            (
                "on a node not seen since the start, which may still return: it stays",
                one("shop", 4, Some("build-9")),
                vec![b1],
                true,
                vec![("shop", 4, Some("build-9"))],
            ),
            (
                "on a node not seen since the start, after the wait: it moves",
                one("shop", 4, Some("build-9")),
                vec![b1],
                false,
                vec![("shop", 4, Some("build-1"))],
            ),
            (
                "a report of the build wins over a node that has not returned",
                one("shop", 4, Some("build-9")),
                vec![b1, b2_reports_shop],
                true,
                vec![("shop", 4, Some("build-2"))],
            ),
            (
                "new builds go to the least busy node, by name among equals",
                BTreeMap::from([
                    (key("api", 1), None),
                    (key("blog", 2), None),
                    (key("shop", 4), Some("build-2".to_string())),
                ]),
                vec![b1, b2],
                false,
                vec![
                    ("api", 1, Some("build-1")),
                    ("blog", 2, Some("build-1")),
                    ("shop", 4, Some("build-2")),
                ],
            ),
        ];
        for (what, current, nodes, absent_may_return, expected) in cases {
            let placed = place_builds(&current, &nodes, absent_may_return);
            let expected: BTreeMap<BuildKey, Option<String>> = expected
                .into_iter()
                .map(|(app, build, on)| (key(app, build), on.map(str::to_string)))
                .collect();
            assert_eq!(placed, expected, "{what}");
        }
    }

    #[test]
    fn only_build_true_lets_a_node_build() {
        assert!(may_build(&map(&[("build", "true"), ("zone", "a")])));
        for labels in [
            map(&[]),
            map(&[("build", "yes")]),
            map(&[("build", "false")]),
        ] {
            assert!(!may_build(&labels), "{labels:?}");
        }
        assert_eq!(
            no_build_node_message("shop", 4),
            "shop build 4 waits: no node may build; give a Maestro the label build = \"true\" (in its config's `labels`) to build there"
        );
    }

    /// A node for process placement: linked, not lost, running `apps`.
    fn pnode<'a>(name: &'a str, apps: &[&'a str]) -> ProcessNode<'a> {
        ProcessNode {
            name,
            lost: false,
            linked: true,
            apps: apps.to_vec(),
        }
    }

    /// A placement from `(app, type, number, node)` rows.
    fn placement(rows: &[(&str, &str, u32, &str)]) -> ProcessPlacement {
        let mut placed = ProcessPlacement::new();
        for (app, kind, number, node) in rows {
            placed
                .entry((app.to_string(), kind.to_string()))
                .or_default()
                .insert(*number, node.to_string());
        }
        placed
    }

    #[test]
    fn process_placement_rules() {
        let lost = |mut n: ProcessNode<'static>| {
            n.lost = true;
            n
        };
        let unlinked = |mut n: ProcessNode<'static>| {
            n.linked = false;
            n
        };
        let wanted = |rows: &[(&str, &str, u32)]| -> BTreeMap<ProcessKey, u32> {
            rows.iter()
                .map(|(app, kind, count)| ((app.to_string(), kind.to_string()), *count))
                .collect()
        };
        type Case = (
            &'static str,
            ProcessPlacement,
            BTreeMap<ProcessKey, u32>,
            Vec<ProcessNode<'static>>,
            bool,
            ProcessPlacement,
        );
        let cases: Vec<Case> = vec![
            (
                "one of each type, spread over the app's nodes, ties by name",
                placement(&[]),
                wanted(&[
                    ("shop", "clock", 1),
                    ("shop", "mailer", 1),
                    ("shop", "worker", 1),
                ]),
                vec![
                    pnode("web-2", &["shop"]),
                    pnode("web-1", &["shop"]),
                    pnode("web-3", &["shop"]),
                ],
                false,
                placement(&[
                    ("shop", "clock", 1, "web-1"),
                    ("shop", "mailer", 1, "web-2"),
                    ("shop", "worker", 1, "web-3"),
                ]),
            ),
            (
                "the fewest processes of that app wins, not of all apps",
                placement(&[
                    ("blog", "worker", 1, "web-2"),
                    ("shop", "worker", 1, "web-1"),
                ]),
                wanted(&[
                    ("blog", "worker", 1),
                    ("shop", "worker", 1),
                    ("shop", "clock", 1),
                ]),
                vec![
                    pnode("web-1", &["shop", "blog"]),
                    pnode("web-2", &["shop", "blog"]),
                ],
                false,
                placement(&[
                    ("blog", "worker", 1, "web-2"),
                    ("shop", "clock", 1, "web-2"),
                    ("shop", "worker", 1, "web-1"),
                ]),
            ),
            (
                "only nodes that may run the app (placement labels, runtimes)",
                placement(&[]),
                wanted(&[("shop", "worker", 1)]),
                vec![pnode("a-gpu", &["ml"]), pnode("b", &["shop"])],
                false,
                placement(&[("shop", "worker", 1, "b")]),
            ),
            (
                "stable: a process keeps its node and number, even when another node is emptier",
                placement(&[
                    ("shop", "worker", 1, "web-2"),
                    ("shop", "clock", 1, "web-2"),
                ]),
                wanted(&[("shop", "clock", 1), ("shop", "worker", 1)]),
                vec![pnode("web-1", &["shop"]), pnode("web-2", &["shop"])],
                false,
                placement(&[
                    ("shop", "worker", 1, "web-2"),
                    ("shop", "clock", 1, "web-2"),
                ]),
            ),
            (
                "stable: a node whose link is down for a moment keeps its processes",
                placement(&[("shop", "worker", 1, "web-2")]),
                wanted(&[("shop", "worker", 1)]),
                vec![
                    pnode("web-1", &["shop"]),
                    unlinked(pnode("web-2", &["shop"])),
                ],
                false,
                placement(&[("shop", "worker", 1, "web-2")]),
            ),
            (
                "a lost node's processes move, keeping their numbers",
                placement(&[
                    ("shop", "worker", 2, "web-2"),
                    ("shop", "worker", 1, "web-1"),
                ]),
                wanted(&[("shop", "worker", 2)]),
                vec![
                    pnode("web-1", &["shop"]),
                    lost(pnode("web-2", &["shop"])),
                    pnode("web-3", &["shop"]),
                ],
                false,
                placement(&[
                    ("shop", "worker", 1, "web-1"),
                    ("shop", "worker", 2, "web-3"),
                ]),
            ),
            (
                "a node that may no longer run the app gives its processes up",
                placement(&[("shop", "worker", 1, "web-1")]),
                wanted(&[("shop", "worker", 1)]),
                vec![pnode("web-1", &["blog"]), pnode("web-2", &["shop"])],
                false,
                placement(&[("shop", "worker", 1, "web-2")]),
            ),
            (
                "a new process goes only to a linked node",
                placement(&[]),
                wanted(&[("shop", "worker", 1)]),
                vec![
                    unlinked(pnode("web-1", &["shop"])),
                    pnode("web-2", &["shop"]),
                ],
                false,
                placement(&[("shop", "worker", 1, "web-2")]),
            ),
            (
                "no node for the app: the process waits",
                placement(&[("shop", "worker", 1, "web-1")]),
                wanted(&[("shop", "worker", 1)]),
                vec![
                    lost(pnode("web-1", &["shop"])),
                    unlinked(pnode("web-2", &["shop"])),
                ],
                false,
                placement(&[]),
            ),
            (
                "after a restart, a node not back yet keeps its processes while it may return",
                placement(&[("shop", "worker", 1, "web-9")]),
                wanted(&[("shop", "worker", 1)]),
                vec![pnode("web-1", &["shop"])],
                true,
                placement(&[("shop", "worker", 1, "web-9")]),
            ),
            (
                "... and loses them when that time is over",
                placement(&[("shop", "worker", 1, "web-9")]),
                wanted(&[("shop", "worker", 1)]),
                vec![pnode("web-1", &["shop"])],
                false,
                placement(&[("shop", "worker", 1, "web-1")]),
            ),
            (
                "types and apps no longer wanted are dropped",
                placement(&[("shop", "worker", 1, "web-1"), ("old", "clock", 1, "web-1")]),
                wanted(&[("shop", "mailer", 1)]),
                vec![pnode("web-1", &["shop"]), pnode("web-2", &["shop"])],
                false,
                placement(&[("shop", "mailer", 1, "web-1")]),
            ),
            (
                "several of a type spread, numbers from 1",
                placement(&[]),
                wanted(&[("shop", "worker", 3)]),
                vec![pnode("web-1", &["shop"]), pnode("web-2", &["shop"])],
                false,
                placement(&[
                    ("shop", "worker", 1, "web-1"),
                    ("shop", "worker", 2, "web-2"),
                    ("shop", "worker", 3, "web-1"),
                ]),
            ),
            (
                "scaling up keeps the running ones and spreads each type evenly",
                placement(&[
                    ("shop", "worker", 1, "web-1"),
                    ("shop", "clock", 1, "web-2"),
                ]),
                wanted(&[("shop", "clock", 1), ("shop", "worker", 4)]),
                vec![pnode("web-1", &["shop"]), pnode("web-2", &["shop"])],
                false,
                placement(&[
                    ("shop", "clock", 1, "web-2"),
                    ("shop", "worker", 1, "web-1"),
                    ("shop", "worker", 2, "web-2"),
                    ("shop", "worker", 3, "web-1"),
                    ("shop", "worker", 4, "web-2"),
                ]),
            ),
            (
                "scaling down removes the highest numbers, the others stay where they are",
                placement(&[
                    ("shop", "worker", 1, "web-2"),
                    ("shop", "worker", 2, "web-1"),
                    ("shop", "worker", 3, "web-2"),
                ]),
                wanted(&[("shop", "worker", 2)]),
                vec![pnode("web-1", &["shop"]), pnode("web-2", &["shop"])],
                false,
                placement(&[
                    ("shop", "worker", 1, "web-2"),
                    ("shop", "worker", 2, "web-1"),
                ]),
            ),
            (
                "a type scaled to 0 runs nowhere",
                placement(&[("shop", "worker", 1, "web-1")]),
                wanted(&[("shop", "worker", 0)]),
                vec![pnode("web-1", &["shop"])],
                false,
                placement(&[]),
            ),
        ];
        for (what, current, wanted, nodes, absent_may_return, expected) in cases {
            let placed = place_processes(&current, &wanted, &nodes, absent_may_return);
            assert_eq!(placed, expected, "{what}");
        }
    }
}
