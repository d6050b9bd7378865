//! Node builds with the real npm and packages from the npm registry: an Express app with a
//! lockfile built into layers that run from the release, and a lockfile out of sync with its
//! `package.json` refused naming the file.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};

use common::{assemble, run_build, run_in_release, settings, write_tree};
use px_build::BuildError;
use px_proto::build::LayerKind;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/express")
}

/// A copy of the Express fixture named `name`.
fn express_app(dir: &Path, name: &str) {
    for file in ["package.json", "package-lock.json", "server.js"] {
        std::fs::copy(fixture().join(file), dir.join(file)).unwrap();
    }
    write_tree(
        dir,
        &[(
            "app.toml",
            &format!("name = \"{name}\"\nrun = \"node server.js\"\n"),
        )],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_express_app_with_a_lockfile_builds_into_layers_that_run_from_the_release() {
    let app = "build-test-express";
    let work = tempfile::tempdir().unwrap();
    let source = tempfile::tempdir().unwrap();
    express_app(source.path(), app);
    // An uploaded node_modules is never used: dependencies come from the lockfile.
    write_tree(
        source.path(),
        &[(
            "node_modules/express/index.js",
            "throw new Error('stale');\n",
        )],
    );
    let settings = settings(work.path(), app);

    let (built, output) = run_build(app, 1, source.path(), &settings).await;
    let built = built.unwrap_or_else(|e| panic!("build failed: {e}\n{}", output.join("\n")));
    let kinds: Vec<LayerKind> = built.layers.iter().map(|l| l.kind).collect();
    assert_eq!(
        kinds,
        [LayerKind::Runtime, LayerKind::Dependencies, LayerKind::App]
    );
    assert!(
        built.runtime.as_deref().unwrap().starts_with("node "),
        "{:?}",
        built.runtime
    );
    assert_eq!(built.path, [".px/runtime/bin", "node_modules/.bin"]);
    assert_eq!(built.commands, ["node", "npm", "npx"]);
    assert!(
        output
            .iter()
            .any(|l| l.contains("Installing dependencies with npm")),
        "{output:#?}"
    );

    let releases = tempfile::tempdir().unwrap();
    let release = releases.path().join("v1");
    assemble(&built, &release);
    let (ok, text) = run_in_release(
        &built,
        &release,
        "node -e \"const e = require('express'); console.log(typeof e, require.resolve('express'), process.execPath)\"",
    );
    assert!(ok, "{text}");
    assert!(text.starts_with("function "), "{text}");
    assert!(
        text.contains(&format!(
            "{}/node_modules/express/index.js",
            release.display()
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("{}/.px/runtime/bin/node", release.display())),
        "{text}"
    );

    // The app layer holds the code and no dependencies.
    let app_layer = built
        .layers
        .iter()
        .find(|l| l.kind == LayerKind::App)
        .unwrap();
    let unpacked = tempfile::tempdir().unwrap();
    let dest = unpacked.path().join("app");
    px_bundle::unpack_layer(
        std::fs::File::open(&app_layer.archive).unwrap(),
        &dest,
        &px_bundle::Limits::default(),
    )
    .unwrap();
    assert!(dest.join("server.js").is_file());
    assert!(!dest.join("node_modules").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lockfile_out_of_sync_with_package_json_fails_naming_the_lockfile() {
    let app = "build-test-stale-lock";
    let work = tempfile::tempdir().unwrap();
    let source = tempfile::tempdir().unwrap();
    express_app(source.path(), app);
    // A dependency added to package.json without updating the lockfile.
    let package = std::fs::read_to_string(source.path().join("package.json")).unwrap();
    let package = package.replace(
        "\"express\": \"^4.21.2\"",
        "\"express\": \"^4.21.2\",\n    \"ms\": \"^2.1.3\"",
    );
    write_tree(source.path(), &[("package.json", &package)]);
    let settings = settings(work.path(), app);

    let (built, output) = run_build(app, 1, source.path(), &settings).await;
    let e = built.expect_err("a stale lockfile built");
    assert!(
        matches!(&e, BuildError::LockfileOutOfDate { file, .. } if file == "package-lock.json"),
        "{e:?}\n{output:#?}"
    );
    assert!(
        e.to_string()
            .starts_with("package-lock.json is out of date with package.json"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_script_and_the_build_command_run_and_a_rebuild_runs_them_without_npm_ci() {
    let app = "build-test-express-build";
    let work = tempfile::tempdir().unwrap();
    let source = tempfile::tempdir().unwrap();
    express_app(source.path(), app);
    let package = std::fs::read_to_string(source.path().join("package.json")).unwrap();
    // `scripts` is not part of the lockfile: the lockfile stays in sync.
    let package = package.replace(
        "\"start\": \"node server.js\"",
        "\"start\": \"node server.js\",\n    \"build\": \"node -e \\\"require('fs').writeFileSync('dist.txt', typeof require('express'))\\\"\"",
    );
    write_tree(
        source.path(),
        &[
            ("package.json", &package),
            (
                "app.toml",
                &format!(
                    "name = \"{app}\"\nrun = \"node server.js\"\n\n[build]\ncommand = \"node -e \\\"require('fs').writeFileSync('command.txt', process.version)\\\"\"\n"
                ),
            ),
        ],
    );
    let settings = settings(work.path(), app);
    let app_layer = |built: &px_build::Built, into: &Path| {
        let layer = built
            .layers
            .iter()
            .find(|l| l.kind == LayerKind::App)
            .unwrap();
        px_bundle::unpack_layer(
            std::fs::File::open(&layer.archive).unwrap(),
            into,
            &px_bundle::Limits::default(),
        )
        .unwrap();
    };

    let (first, output) = run_build(app, 1, source.path(), &settings).await;
    let first = first.unwrap_or_else(|e| panic!("build failed: {e}\n{}", output.join("\n")));
    assert!(
        output.iter().any(|l| l == "-----> npm run build"),
        "{output:#?}"
    );
    assert!(
        output
            .iter()
            .any(|l| l == "-----> Running the [build] command"),
        "{output:#?}"
    );
    let unpacked = tempfile::tempdir().unwrap();
    app_layer(&first, &unpacked.path().join("1"));
    assert_eq!(
        std::fs::read_to_string(unpacked.path().join("1/dist.txt")).unwrap(),
        "function"
    );
    assert!(
        std::fs::read_to_string(unpacked.path().join("1/command.txt"))
            .unwrap()
            .starts_with('v')
    );

    // A code-only change: the build script and the command run again on the cached
    // dependencies, npm ci does not.
    write_tree(
        source.path(),
        &[(
            "server.js",
            "require('express')().listen(process.env.PORT);\n",
        )],
    );
    let (second, output) = run_build(app, 2, source.path(), &settings).await;
    let second = second.unwrap_or_else(|e| panic!("rebuild failed: {e}\n{}", output.join("\n")));
    assert!(
        output
            .iter()
            .any(|l| l.contains("reusing the cached layer, npm")),
        "{output:#?}"
    );
    assert!(
        !output
            .iter()
            .any(|l| l.contains("added ") && l.contains("packages")),
        "npm ci ran: {output:#?}"
    );
    assert!(
        output.iter().any(|l| l == "-----> npm run build"),
        "{output:#?}"
    );
    app_layer(&second, &unpacked.path().join("2"));
    assert_eq!(
        std::fs::read_to_string(unpacked.path().join("2/dist.txt")).unwrap(),
        "function"
    );
    assert!(!unpacked.path().join("2/node_modules").exists());
    let deps = |b: &px_build::Built| {
        b.layers
            .iter()
            .find(|l| l.kind == LayerKind::Dependencies)
            .unwrap()
            .sha256
            .clone()
    };
    assert_eq!(deps(&first), deps(&second));
}
