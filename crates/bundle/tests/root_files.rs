//! The root files that say what an app is: collected alike by `pack_dir`, `inspect`, `unpack`
//! and `root_files`, bounded, with the Procfile's `web:` line as the run command, and what
//! detection refuses refused at packing and upload but never on a web server.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::symlink;

use common::{Hand, MANIFEST, pack, refused, write};
use px_bundle::{BundleError, Limits, inspect, pack_dir, root_files, unpack};
use px_proto::detect::{DetectError, MAX_DETECT_FILE_BYTES, Stack, detect};

const NO_RUN: &str = "name = \"hello\"\n";

fn limits() -> Limits {
    Limits::default()
}

#[test]
fn the_procfile_web_line_is_the_run_command_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "app.toml", NO_RUN.as_bytes(), false);
    write(
        d,
        "Procfile",
        b"web: gunicorn mysite.wsgi\nworker: celery -A mysite worker\n",
        false,
    );
    write(d, "requirements.txt", b"Django\ngunicorn\n", false);
    write(d, "manage.py", b"#!/usr/bin/env python\n", true);

    let mut bundle = Vec::new();
    let (summary, packed) = pack_dir(d, &mut bundle).unwrap();
    assert_eq!(packed.run.as_deref(), Some("gunicorn mysite.wsgi"));
    let inspected = inspect(&bundle[..], &limits()).unwrap();
    assert_eq!(inspected.manifest, packed);
    let parent = tempfile::tempdir().unwrap();
    let unpacked = unpack(&bundle[..], &parent.path().join("r"), &limits()).unwrap();
    assert_eq!(unpacked, inspected);
    // The same root files from the packer, the stream and the directory.
    assert_eq!(summary.root_files, inspected.root_files);
    assert_eq!(root_files(d).unwrap(), inspected.root_files);
    assert_eq!(
        inspected.root_files.names().collect::<Vec<_>>(),
        ["Procfile", "manage.py", "requirements.txt"]
    );
    // What consumers make of them: a Django app with a worker process kept for later.
    let detection = detect(Some(&inspected.manifest), &inspected.root_files).unwrap();
    assert!(detection.django && detection.needs_build());
    let procfile = detection.procfile.unwrap();
    assert_eq!(procfile.get("worker"), Some("celery -A mysite worker"));
}

#[test]
fn run_and_an_executable_apprunner_win_over_the_procfile() {
    let bundle = Hand::with_manifest()
        .file("Procfile", b"web: other\n", 0o644)
        .finish();
    let info = inspect(&bundle[..], &limits()).unwrap();
    assert_eq!(info.manifest.run.as_deref(), Some("python3 server.py"));

    let bundle = Hand::new()
        .file("app.toml", NO_RUN.as_bytes(), 0o644)
        .file("Procfile", b"web: other\n", 0o644)
        .file("apprunner", b"#!/bin/sh\n", 0o755)
        .finish();
    let info = inspect(&bundle[..], &limits()).unwrap();
    assert_eq!(info.manifest.run, None);
}

#[test]
fn a_procfile_that_cannot_start_the_app_is_refused_naming_it() {
    let cases: [(&[u8], &str); 4] = [
        (b"worker: celery\n", "no Procfile with a `web:` line"),
        (b"# web: x\n", "no Procfile with a `web:` line"),
        (b"web gunicorn x\n", "the Procfile, line 1"),
        (b"web: a\nweb: b\n", "appears again (first on line 1)"),
    ];
    for (procfile, needle) in cases {
        let bundle = Hand::new()
            .file("app.toml", NO_RUN.as_bytes(), 0o644)
            .file("Procfile", procfile, 0o644)
            .finish();
        // Both readers refuse, and a refused unpack leaves nothing behind.
        let e = refused(&bundle, &limits());
        assert!(e.to_string().contains(needle), "{e}");
    }
    // A Procfile deeper down is not the app's.
    let bundle = Hand::new()
        .file("app.toml", NO_RUN.as_bytes(), 0o644)
        .file("sub/Procfile", b"web: x\n", 0o644)
        .finish();
    assert!(matches!(refused(&bundle, &limits()), BundleError::NoRunner));
    // Nor is a symlink to one, which no reader follows.
    let bundle = Hand::new()
        .file("app.toml", NO_RUN.as_bytes(), 0o644)
        .file("Procfile.real", b"web: x\n", 0o644)
        .symlink("Procfile", "Procfile.real")
        .finish();
    assert!(matches!(refused(&bundle, &limits()), BundleError::NoRunner));
    // An oversized one needed for `run` is refused before its bytes are kept.
    let big = vec![b'#'; MAX_DETECT_FILE_BYTES as usize + 1];
    let bundle = Hand::new()
        .file("app.toml", NO_RUN.as_bytes(), 0o644)
        .file("Procfile", &big, 0o644)
        .finish();
    let e = refused(&bundle, &limits());
    assert!(
        matches!(
            e,
            BundleError::Detect(DetectError::TooLarge {
                file: "Procfile",
                ..
            })
        ),
        "{e:?}"
    );
}

#[test]
fn new_bundles_are_refused_when_detection_is_but_stored_ones_still_unpack() {
    let bundle = Hand::with_manifest()
        .file("package.json", b"{\"name\": \"x\",}", 0o644)
        .finish();
    let e = inspect(&bundle[..], &limits()).unwrap_err();
    assert!(e.is_client_error());
    let shown = e.to_string();
    assert!(shown.contains("package.json is not valid JSON"), "{shown}");
    // A release stored before this rule unpacks on a web server all the same.
    let parent = tempfile::tempdir().unwrap();
    let dest = parent.path().join("release");
    let info = unpack(&bundle[..], &dest, &limits()).unwrap();
    assert!(dest.join("package.json").is_file());
    assert!(info.root_files.contains("package.json"));

    // And `em deploy`'s packer says so before anything is uploaded.
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "app.toml", MANIFEST.as_bytes(), false);
    write(dir.path(), "package.json", b"{}", false);
    write(dir.path(), "yarn.lock", b"", false);
    let e = pack_dir(dir.path(), Vec::new()).unwrap_err();
    assert!(
        e.to_string()
            .contains("yarn.lock: npm is the Node installer"),
        "{e}"
    );
    // With a build command that installs, the same app packs.
    write(
        dir.path(),
        "app.toml",
        format!("{MANIFEST}[build]\ncommand = \"corepack yarn install\"\n").as_bytes(),
        false,
    );
    pack(dir.path());
}

#[test]
fn root_files_are_bounded_and_lockfiles_only_noted() {
    let big_lock = vec![b' '; 3 * MAX_DETECT_FILE_BYTES as usize];
    let bundle = Hand::with_manifest()
        .file(
            "package.json",
            b"{\"engines\": {\"node\": \"20.x\"}}",
            0o644,
        )
        .file("package-lock.json", &big_lock, 0o644)
        .finish();
    let info = inspect(&bundle[..], &limits()).unwrap();
    let lock = info.root_files.get("package-lock.json").unwrap();
    assert_eq!(lock.size, big_lock.len() as u64);
    assert_eq!(lock.content, None, "a lockfile's bytes are never kept");
    let detection = detect(Some(&info.manifest), &info.root_files).unwrap();
    assert!(matches!(detection.stack, Stack::Node(_)));

    let big_package = vec![b' '; MAX_DETECT_FILE_BYTES as usize + 1];
    let bundle = Hand::with_manifest()
        .file("package.json", &big_package, 0o644)
        .finish();
    let e = inspect(&bundle[..], &limits()).unwrap_err();
    assert!(e.to_string().contains("package.json is larger than"), "{e}");
}

#[test]
fn a_directory_shows_the_root_files_its_bundle_would_hold() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "Procfile", b"web: node server.js\n", false);
    write(d, "package.json", b"{}", false);
    write(d, "requirements.txt", b"flask\n", false);
    write(d, ".emignore", b"requirements.txt\n", false);
    write(d, "sub/pyproject.toml", b"[project]\n", false);
    write(d, "manage.py.bak", b"", false);
    std::fs::create_dir(d.join("runtime.txt")).unwrap();
    symlink("package.json", d.join("package-lock.json")).unwrap();
    let files = root_files(d).unwrap();
    assert_eq!(
        files.names().collect::<Vec<_>>(),
        ["Procfile", "package.json"],
        "ignored, nested, directory and symlink entries are not root files"
    );
    assert_eq!(
        files.get("Procfile").unwrap().content.as_deref(),
        Some(&b"web: node server.js\n"[..])
    );
    // An empty or missing directory has none, or says why it cannot be read.
    let empty = tempfile::tempdir().unwrap();
    assert!(root_files(empty.path()).unwrap().is_empty());
}
