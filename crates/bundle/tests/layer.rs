//! Layers: packed from everything under a directory (no ignore files, no manifest rule),
//! deterministic like bundles, and read through the same checker: every hostile archive a
//! bundle refuses, a layer refuses with the same error, leaving nothing on disk.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;

use common::{Hand, MANIFEST, refused, write};
use px_bundle::{BundleError, Limits, inspect_layer, pack_layer, unpack_layer};
use tar::EntryType;

/// A dependencies-shaped tree: dot directories, an ignore file that must not matter, an
/// executable, a relative symlink, an empty directory, and no `app.toml`.
fn sample(root: &Path) {
    write(
        root,
        ".px/deps/lib/python3.12/site-packages/django/__init__.py",
        b"VERSION = 6\n",
        false,
    );
    write(
        root,
        ".px/deps/bin/django-admin",
        b"#!/usr/bin/env python3\n",
        true,
    );
    write(root, ".gitignore", b"*\n.px/\n", false);
    write(root, ".git/HEAD", b"ref: refs/heads/main\n", false);
    symlink("../lib", root.join(".px/deps/bin/lib")).unwrap();
    fs::create_dir_all(root.join("empty")).unwrap();
}

fn pack(dir: &Path) -> (px_bundle::LayerSummary, Vec<u8>) {
    let mut out = Vec::new();
    let summary = pack_layer(dir, &mut out).unwrap();
    (summary, out)
}

#[test]
fn a_layer_round_trips_everything_under_its_directory() {
    let src = tempfile::tempdir().unwrap();
    sample(src.path());
    let (summary, bytes) = pack(src.path());
    assert_eq!(summary.size, bytes.len() as u64);

    let info = inspect_layer(&bytes[..], &Limits::default()).unwrap();
    assert_eq!(info.entries, summary.entries);
    assert_eq!(info.unpacked_bytes, summary.unpacked_bytes);

    let parent = tempfile::tempdir().unwrap();
    let dest = parent.path().join("layer");
    let unpacked = unpack_layer(&bytes[..], &dest, &Limits::default()).unwrap();
    assert_eq!(unpacked, info);
    // Ignore files and `.git` do not filter a layer: it is what the build made.
    assert_eq!(fs::read(dest.join(".gitignore")).unwrap(), b"*\n.px/\n");
    assert!(dest.join(".git/HEAD").is_file());
    assert_eq!(
        fs::read(dest.join(".px/deps/lib/python3.12/site-packages/django/__init__.py")).unwrap(),
        b"VERSION = 6\n"
    );
    let mode = fs::metadata(dest.join(".px/deps/bin/django-admin"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755);
    assert_eq!(
        fs::read_link(dest.join(".px/deps/bin/lib")).unwrap(),
        Path::new("../lib")
    );
    assert!(dest.join("empty").is_dir());
}

#[test]
fn packing_a_layer_is_deterministic_across_paths_and_mtimes() {
    let a = tempfile::tempdir().unwrap();
    sample(a.path());
    let (first, bytes) = pack(a.path());
    let (again, bytes_again) = pack(a.path());
    assert_eq!(first, again);
    assert_eq!(bytes, bytes_again);

    // The same tree written later elsewhere, in another order, with other modes beyond the
    // exec bit: the same digest.
    std::thread::sleep(std::time::Duration::from_millis(20));
    let b = tempfile::tempdir().unwrap();
    fs::create_dir_all(b.path().join("empty")).unwrap();
    write(b.path(), ".git/HEAD", b"ref: refs/heads/main\n", false);
    write(
        b.path(),
        ".px/deps/bin/django-admin",
        b"#!/usr/bin/env python3\n",
        true,
    );
    fs::set_permissions(
        b.path().join(".px/deps/bin/django-admin"),
        fs::Permissions::from_mode(0o700),
    )
    .unwrap();
    symlink("../lib", b.path().join(".px/deps/bin/lib")).unwrap();
    write(b.path(), ".gitignore", b"*\n.px/\n", false);
    write(
        b.path(),
        ".px/deps/lib/python3.12/site-packages/django/__init__.py",
        b"VERSION = 6\n",
        false,
    );
    let (other, _) = pack(b.path());
    assert_eq!(other.sha256, first.sha256);

    // One changed byte changes the digest.
    write(b.path(), ".gitignore", b"*\n.px\n", false);
    let (changed, _) = pack(b.path());
    assert_ne!(changed.sha256, first.sha256);
}

#[test]
fn a_layer_needs_no_manifest_but_a_bundle_does() {
    let src = tempfile::tempdir().unwrap();
    write(
        src.path(),
        "node_modules/express/index.js",
        b"module.exports = 1;\n",
        false,
    );
    let (_, bytes) = pack(src.path());
    inspect_layer(&bytes[..], &Limits::default()).unwrap();
    let e = px_bundle::inspect(&bytes[..], &Limits::default()).unwrap_err();
    assert!(matches!(e, BundleError::MissingManifest), "{e:?}");
}

#[test]
fn packing_refuses_links_out_of_the_tree_and_special_files() {
    let src = tempfile::tempdir().unwrap();
    write(src.path(), "a", b"x", false);
    symlink("/etc/passwd", src.path().join("out")).unwrap();
    let e = pack_layer(src.path(), &mut Vec::new()).unwrap_err();
    assert!(
        matches!(&e, BundleError::UnsafePath { path, .. } if path == "out"),
        "{e:?}"
    );

    let src = tempfile::tempdir().unwrap();
    let fifo = src.path().join("pipe");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let e = pack_layer(src.path(), &mut Vec::new()).unwrap_err();
    assert!(
        matches!(&e, BundleError::UnsupportedEntry { path, .. } if path == "pipe"),
        "{e:?}"
    );
}

/// Checks that a layer refuses `archive` exactly as a bundle does: the same message from
/// `inspect_layer` and `unpack_layer` as from `inspect` and `unpack`, and nothing left on disk.
fn refused_like_a_bundle(archive: &[u8], limits: &Limits) {
    let as_bundle = refused(archive, limits);
    let inspected = inspect_layer(archive, limits).unwrap_err();
    let parent = tempfile::tempdir().unwrap();
    let dest = parent.path().join("layer");
    let unpacked = unpack_layer(archive, &dest, limits).unwrap_err();
    assert_eq!(inspected.to_string(), as_bundle.to_string());
    assert_eq!(unpacked.to_string(), as_bundle.to_string());
    assert!(!dest.exists(), "dest exists after a failed unpack");
    assert_eq!(
        fs::read_dir(parent.path()).unwrap().count(),
        0,
        "a temporary directory was left"
    );
}

#[test]
fn hostile_layers_are_refused_exactly_as_bundles_are() {
    let limits = Limits {
        max_entries: 50,
        max_unpacked_bytes: 1024 * 1024,
        ..Limits::default()
    };
    // Each starts with a valid app.toml, so the bundle's refusal is about the hostile part.
    let cases: Vec<Vec<u8>> = vec![
        Hand::with_manifest().file("../x", b"pwned", 0o644).finish(),
        Hand::with_manifest()
            .file("/etc/x", b"pwned", 0o644)
            .finish(),
        Hand::with_manifest().symlink("l", "../../etc").finish(),
        Hand::with_manifest().symlink("l", "/etc").finish(),
        Hand::with_manifest()
            .dir("sub")
            .symlink("l", "sub")
            .file("l/x", b"x", 0o644)
            .finish(),
        Hand::with_manifest()
            .file("a", b"1", 0o644)
            .file("./a", b"2", 0o644)
            .finish(),
        Hand::with_manifest()
            .raw(b"dev", EntryType::Char, 0o644, b"", b"")
            .finish(),
        Hand::with_manifest()
            .raw(b"fifo", EntryType::Fifo, 0o644, b"", b"")
            .finish(),
        Hand::with_manifest()
            .raw(b"hard", EntryType::Link, 0o644, b"app.toml", b"")
            .finish(),
        Hand::with_manifest()
            .raw(b"a\xff", EntryType::Regular, 0o644, b"", b"")
            .finish(),
        Hand::with_manifest()
            .file("big", &vec![0; 2 * 1024 * 1024], 0o644)
            .finish(),
        (0..60)
            .fold(Hand::with_manifest(), |h, i| {
                h.file(&format!("f{i}"), b"", 0o644)
            })
            .finish(),
        b"definitely not zstd".to_vec(),
    ];
    for archive in &cases {
        refused_like_a_bundle(archive, &limits);
    }
    // A truncated stream too.
    let whole = Hand::with_manifest()
        .file("a", MANIFEST.as_bytes(), 0o644)
        .finish();
    refused_like_a_bundle(&whole[..whole.len() / 2], &limits);
}

#[test]
fn unpacking_a_layer_refuses_an_existing_destination() {
    let src = tempfile::tempdir().unwrap();
    sample(src.path());
    let (_, bytes) = pack(src.path());
    let parent = tempfile::tempdir().unwrap();
    let dest = parent.path().join("layer");
    fs::create_dir(&dest).unwrap();
    fs::write(dest.join("keep"), b"mine").unwrap();
    let e = unpack_layer(&bytes[..], &dest, &Limits::default()).unwrap_err();
    assert!(matches!(e, BundleError::Io { .. }), "{e:?}");
    assert_eq!(fs::read(dest.join("keep")).unwrap(), b"mine");
    assert_eq!(fs::read_dir(parent.path()).unwrap().count(), 1);
}
