//! `em init` and the examples it is made from: the real binary writes each template, which is
//! the example of the same name, and the result packs as a bundle. That the examples run the way
//! Maestro runs an app, behind its proxy, is `crates/maestro/tests/examples.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use px_proto::manifest::AppManifest;

const EXAMPLES: [(&str, &str); 3] = [
    ("python", "python-hello"),
    ("node", "node-chat"),
    ("static", "static-site"),
];

/// The examples that are no template, on purpose: apps as their authors publish them, with
/// dependencies the platform installs when it builds them (`requirements.txt`,
/// `package-lock.json`). A template must run as `em init` writes it, with nothing to install,
/// and nothing in it that ages inside the `em` binary (a lockfile pins versions that later get
/// security fixes); an app like these is what `em deploy` builds, and `em up`'s tests deploy
/// them (`crates/em/tests/up.rs`).
const BUILT_EXAMPLES: [&str; 2] = ["django-notes", "express-hello"];

/// Examples that show one feature and are no template either: `python-worker` runs a worker
/// beside its web process (process types), and `em up`'s tests redeploy it under load.
const FEATURE_EXAMPLES: [&str; 1] = ["python-worker"];

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

fn em(args: &[&str], cwd: Option<&Path>) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_em"));
    command.args(args);
    if let Some(cwd) = cwd {
        command.current_dir(cwd);
    }
    command.output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `em init <tmp>/x --template T --name x`, checked to succeed; returns the app directory.
fn init(tmp: &Path, template: &str) -> PathBuf {
    let dir = tmp.join("x");
    let out = em(
        &[
            "init",
            dir.to_str().unwrap(),
            "--template",
            template,
            "--name",
            "x",
        ],
        None,
    );
    assert!(
        out.status.success(),
        "em init failed: {}",
        text(&out.stderr)
    );
    let stdout = text(&out.stdout);
    assert!(stdout.contains("app x"), "{stdout}");
    dir
}

#[test]
fn templates_are_the_examples() {
    for (template, example) in EXAMPLES {
        let tmp = tempfile::tempdir().unwrap();
        let dir = init(tmp.path(), template);
        let source = examples_dir().join(example);
        let written = files_under(&dir);
        let expected = files_under(&source);
        assert_eq!(
            written.keys().collect::<Vec<_>>(),
            expected.keys().collect::<Vec<_>>(),
            "{example}: em init must write every file of the example"
        );
        for (path, original) in &expected {
            let original = text(original);
            let wanted = match path.as_str() {
                "app.toml" => original.replace(&format!("name = \"{example}\""), "name = \"x\""),
                "README.md" => original.replace(example, "x"),
                _ => original,
            };
            assert_eq!(text(&written[path]), wanted, "{example}/{path}");
        }
    }
}

/// Relative path → content of every file under `root`, minus what the runtimes leave behind.
fn files_under(root: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            let name = entry.file_name();
            if name == "__pycache__" || name == "node_modules" {
                continue;
            }
            if entry.file_type().unwrap().is_dir() {
                pending.push(path);
            } else {
                let relative = path
                    .strip_prefix(root)
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .to_string();
                files.insert(relative, std::fs::read(&path).unwrap());
            }
        }
    }
    files
}

#[test]
fn examples_parse_and_pack() {
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(examples_dir()).unwrap() {
        let dir = entry.unwrap().path();
        if !dir.is_dir() {
            continue;
        }
        let name = dir.file_name().unwrap().to_str().unwrap().to_string();
        let manifest =
            AppManifest::parse(&std::fs::read_to_string(dir.join("app.toml")).unwrap()).unwrap();
        assert_eq!(
            manifest.name, name,
            "examples/{name}: name must match the directory"
        );
        // A template packs as it is; a built example may take its run command from its
        // Procfile, which packing adds to the manifest.
        if EXAMPLES.iter().any(|(_, example)| *example == name) {
            let (summary, packed) = px_bundle::pack_dir(&dir, std::io::sink()).unwrap();
            assert_eq!(packed, manifest);
            assert!(summary.entries >= 4, "examples/{name}: {summary:?}");
        }
        seen.push(name);
    }
    seen.sort();
    // Every example is a template or, deliberately, a built example.
    let mut known: Vec<&str> = EXAMPLES.iter().map(|(_, example)| *example).collect();
    known.extend(BUILT_EXAMPLES);
    known.extend(FEATURE_EXAMPLES);
    known.sort();
    assert_eq!(seen, known);
    // The worker example's Procfile types reach its release, with app.toml's grace.
    let (_, packed) =
        px_bundle::pack_dir(&examples_dir().join("python-worker"), std::io::sink()).unwrap();
    let worker = &packed.processes["worker"];
    assert_eq!(worker.command.as_deref(), Some("exec python3 worker.py"));
    assert_eq!(worker.stop_grace, Some(std::time::Duration::from_secs(30)));
    assert_eq!(packed.run.as_deref(), Some("exec python3 web.py \"$PORT\""));
}

#[test]
fn init_refuses_a_directory_that_is_not_empty() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("busy");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("notes.txt"), "mine").unwrap();
    let out = em(&["init", dir.to_str().unwrap(), "--name", "busy"], None);
    assert_eq!(out.status.code(), Some(6), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(stderr.contains(dir.to_str().unwrap()), "{stderr}");
    assert!(stderr.contains("is not empty"), "{stderr}");
    assert!(stderr.contains("empty one"), "{stderr}");
    // Nothing was touched.
    assert_eq!(files_under(&dir).len(), 1);

    // Nor a file.
    let file = tmp.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let out = em(&["init", file.to_str().unwrap(), "--name", "file"], None);
    assert_eq!(out.status.code(), Some(6), "{}", text(&out.stderr));
}

#[test]
fn init_refuses_a_bad_name_and_suggests_one() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("y");
    let out = em(&["init", dir.to_str().unwrap(), "--name", "Bad_Name"], None);
    assert_eq!(out.status.code(), Some(6), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("Bad_Name"), "{stderr}");
    assert!(
        stderr.contains("only lowercase letters, digits and '-'"),
        "{stderr}"
    );
    assert!(stderr.contains("--name bad-name"), "{stderr}");
    assert!(
        !dir.exists(),
        "a refused init must not create the directory"
    );

    // A directory name that is not a valid app name gets the same advice.
    let out = em(&["init", tmp.path().join("My_App").to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(6));
    assert!(
        text(&out.stderr).contains("--name my-app"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn init_names_the_app_after_its_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("my-site");
    let out = em(
        &["init", dir.to_str().unwrap(), "--template", "static"],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("my-site"));
    let manifest =
        AppManifest::parse(&std::fs::read_to_string(dir.join("app.toml")).unwrap()).unwrap();
    assert_eq!(manifest.name, "my-site");

    // `em init` in the current, empty directory (nested, to check the parent is untouched).
    let here = tmp.path().join("nested/hello-2");
    std::fs::create_dir_all(&here).unwrap();
    let out = em(&["init", "--template", "node"], Some(&here));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("hello-2"),
        "{}",
        text(&out.stdout)
    );
    let manifest =
        AppManifest::parse(&std::fs::read_to_string(here.join("app.toml")).unwrap()).unwrap();
    assert_eq!(manifest.name, "hello-2");
    assert!(here.join("server.js").is_file());
    let readme = std::fs::read_to_string(here.join("README.md")).unwrap();
    assert!(readme.starts_with("# hello-2:"), "{readme}");
}
