//! Placement: which nodes run a release, decided from what each node told Beacon (its labels,
//! the runtimes on its host, what it runs now), and the sentence that says why no node can.
//! Pure functions over plain data; the hub calls them under its lock.

use std::collections::BTreeMap;

use px_proto::api::Release;
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
}
