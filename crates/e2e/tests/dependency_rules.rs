//! The dependency rules between the workspace's crates (ARCHITECTURE.md, "Invariants"), checked
//! against what the manifests say: `cargo metadata --no-deps --offline` lists every workspace
//! crate with its declared dependencies, and each edge between two workspace crates must be
//! allowed by `RULES`. A crate missing from `RULES` fails the test too, so a new crate's place
//! in the layering is decided when it is added, not discovered later.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// What one workspace crate may depend on among the workspace's crates.
struct Rule {
    krate: &'static str,
    /// Allowed as normal (and build) dependencies.
    normal: &'static [&'static str],
    /// Allowed as dev-dependencies, on top of `normal`.
    dev: &'static [&'static str],
}

/// The shared crates every service builds on.
const SHARED: &[&str] = &["px-proto", "px-bundle", "px-runtime", "px-link"];
/// The deployables; none may depend on another.
const SERVICES: &[&str] = &["px-repository", "px-beacon", "px-maestro"];

/// Every workspace crate and its allowed internal dependencies. A row may name a crate that does
/// not exist yet (`px-link`): the rule is ready when the crate arrives.
const RULES: &[Rule] = &[
    // The shared vocabulary (wire types, manifest schema, codec): everything depends on it, so
    // it depends on nothing of ours.
    Rule {
        krate: "px-proto",
        normal: &[],
        dev: &[],
    },
    // A bundle is valid only with a valid manifest, so the unpacker needs the schema; nothing
    // else.
    Rule {
        krate: "px-bundle",
        normal: &["px-proto"],
        dev: &[],
    },
    // What every service shares at run time (config, TLS, systemd) knows no domain type.
    Rule {
        krate: "px-runtime",
        normal: &[],
        dev: &[],
    },
    // The client side of the Beacon control link, shared by Maestro and apprepo: frames from
    // proto, TLS and backoff from runtime. Its tests may use the throwaway PKI.
    Rule {
        krate: "px-link",
        normal: &["px-proto", "px-runtime"],
        dev: &["px-test-support"],
    },
    // The services build on the shared crates only and never on each other, so each deploys,
    // versions and fails alone; their tests use the test helpers.
    Rule {
        krate: "px-repository",
        normal: SHARED,
        dev: &["px-test-support"],
    },
    Rule {
        krate: "px-beacon",
        normal: SHARED,
        dev: &["px-test-support"],
    },
    // Maestro also runs the builder on a node that builds (docs/src/design/builds.md); the
    // builder is a library of the node, not a service, so this is no edge between services.
    Rule {
        krate: "px-maestro",
        normal: &["px-proto", "px-bundle", "px-runtime", "px-link", "px-build"],
        dev: &["px-test-support"],
    },
    // The builder turns an app's source into layers: the manifest and detection from proto,
    // the layer format from bundle, the environment snapshot from runtime. Maestro runs it.
    Rule {
        krate: "px-build",
        normal: &["px-proto", "px-bundle", "px-runtime"],
        dev: &[],
    },
    // Test helpers are used by the services' tests: depending on a service would be a cycle
    // in spirit (and drag a service into every other service's tests).
    Rule {
        krate: "px-test-support",
        normal: SHARED,
        dev: &[],
    },
    // The CLI composes the three services in one process for `em up` and runs Maestro's
    // process and proxy code for `em dev`.
    Rule {
        krate: "px-em",
        normal: &[
            "px-proto",
            "px-bundle",
            "px-runtime",
            "px-link",
            "px-repository",
            "px-beacon",
            "px-maestro",
        ],
        dev: &["px-test-support"],
    },
    // The benchmark harness is never deployed: it runs Maestro's real proxy (`proxy-only`) and
    // uses the throwaway PKI at run time. Beacon is benchmarked as a binary, never linked.
    Rule {
        krate: "px-bench",
        normal: &[
            "px-proto",
            "px-bundle",
            "px-runtime",
            "px-link",
            "px-test-support",
            "px-maestro",
        ],
        dev: &[],
    },
    // Cross-service tests run the real services together, which only tests may do: services
    // only as dev-dependencies, so nothing built from this crate ever links two of them.
    Rule {
        krate: "px-e2e",
        normal: SHARED,
        dev: &[
            "px-test-support",
            "px-repository",
            "px-beacon",
            "px-maestro",
        ],
    },
];

/// The workspace's crates and their declared dependencies, without resolving or downloading
/// anything (`--no-deps` still lists each package's dependencies).
fn workspace_metadata() -> Value {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.toml");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--offline",
            "--no-deps",
        ])
        .arg("--manifest-path")
        .arg(&manifest)
        .output()
        .expect("running cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("cargo metadata's JSON")
}

/// Every edge between workspace crates that `RULES` does not allow, and every workspace crate
/// `RULES` does not know, one sentence each.
fn violations(metadata: &Value) -> Vec<String> {
    let packages = metadata["packages"].as_array().expect("packages");
    let workspace: BTreeSet<&str> = packages
        .iter()
        .map(|p| p["name"].as_str().expect("package name"))
        .collect();
    let mut found = Vec::new();
    for package in packages {
        let name = package["name"].as_str().expect("package name");
        let Some(rule) = RULES.iter().find(|r| r.krate == name) else {
            found.push(format!(
                "{name} is not in the dependency rules: add it to RULES in {}",
                file!()
            ));
            continue;
        };
        for dep in package["dependencies"].as_array().expect("dependencies") {
            let dep_name = dep["name"].as_str().expect("dependency name");
            if !workspace.contains(dep_name) {
                continue;
            }
            // `kind` is null for normal dependencies, "dev" or "build" otherwise.
            let (kind, allowed) = match dep["kind"].as_str() {
                Some("dev") => (
                    "dev-dependency",
                    rule.normal.contains(&dep_name) || rule.dev.contains(&dep_name),
                ),
                Some("build") => ("build-dependency", rule.normal.contains(&dep_name)),
                _ => ("dependency", rule.normal.contains(&dep_name)),
            };
            if !allowed {
                found.push(format!(
                    "{name} has {dep_name} as a {kind}, which is not allowed"
                ));
            }
        }
    }
    found
}

#[test]
fn workspace_crates_depend_only_as_the_rules_allow() {
    let found = violations(&workspace_metadata());
    assert!(
        found.is_empty(),
        "forbidden dependencies between workspace crates:\n  {}",
        found.join("\n  ")
    );
}

#[test]
fn the_rules_name_each_crate_once_and_only_known_crates() {
    let named: BTreeSet<&str> = RULES.iter().map(|r| r.krate).collect();
    assert_eq!(named.len(), RULES.len(), "a crate has two rows in RULES");
    for rule in RULES {
        for dep in rule.normal.iter().chain(rule.dev) {
            assert!(
                named.contains(dep),
                "{}'s rule names {dep}, which has no row",
                rule.krate
            );
            assert_ne!(*dep, rule.krate, "{} may not depend on itself", rule.krate);
        }
    }
    for service in SERVICES {
        assert!(named.contains(service), "no row for the service {service}");
    }
}

/// A made-up workspace crate: its name and its dependencies with their kind (`None` for a
/// normal one); "serde" stands for an outside crate.
type FakeCrate<'a> = (&'a str, &'a [(&'a str, Option<&'a str>)]);

/// Metadata of a made-up workspace, in the shape `cargo metadata` prints.
fn fake_metadata(crates: &[FakeCrate]) -> Value {
    let packages: Vec<Value> = crates
        .iter()
        .map(|(name, deps)| {
            let deps: Vec<Value> = deps
                .iter()
                .map(|(dep, kind)| serde_json::json!({ "name": dep, "kind": kind }))
                .collect();
            serde_json::json!({ "name": name, "dependencies": deps })
        })
        .collect();
    serde_json::json!({ "packages": packages })
}

#[test]
fn every_forbidden_edge_and_unknown_crate_is_reported() {
    let metadata = fake_metadata(&[
        ("px-proto", &[("serde", None)]),
        (
            "px-bundle",
            &[("px-proto", None), ("px-runtime", Some("dev"))],
        ),
        ("px-runtime", &[]),
        ("px-test-support", &[("px-maestro", None)]),
        (
            "px-maestro",
            &[("px-proto", None), ("px-test-support", Some("dev"))],
        ),
        (
            "px-beacon",
            &[
                ("px-proto", None),
                ("px-maestro", None),
                ("px-repository", Some("dev")),
            ],
        ),
        ("px-repository", &[("px-proto", Some("build"))]),
        (
            "px-e2e",
            &[("px-beacon", None), ("px-maestro", Some("dev"))],
        ),
        ("px-em", &[("px-beacon", None), ("px-maestro", None)]),
        ("px-bench", &[("px-maestro", None), ("px-beacon", None)]),
        ("px-gateway", &[("px-proto", None)]),
    ]);
    let found: BTreeSet<String> = violations(&metadata).into_iter().collect();
    let want: BTreeSet<String> = [
        "px-bundle has px-runtime as a dev-dependency, which is not allowed",
        "px-test-support has px-maestro as a dependency, which is not allowed",
        "px-beacon has px-maestro as a dependency, which is not allowed",
        "px-beacon has px-repository as a dev-dependency, which is not allowed",
        "px-e2e has px-beacon as a dependency, which is not allowed",
        "px-bench has px-beacon as a dependency, which is not allowed",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([format!(
        "px-gateway is not in the dependency rules: add it to RULES in {}",
        file!()
    )])
    .collect();
    assert_eq!(found, want);
}
