//! Packing real directories: determinism, normalized headers, ignore files, the checks made
//! before anything is written, and `inspect` accepting what `pack_dir` produced.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;
use std::time::{Duration, SystemTime};

use common::{MANIFEST, Sink, pack, write};
use px_bundle::{BundleError, HashingReader, Limits, inspect, pack_dir, unpack};

/// A small app with nested directories, an executable, a symlink and an empty directory.
fn sample(root: &Path) {
    write(root, "app.toml", MANIFEST.as_bytes(), false);
    write(root, "server.py", b"print('hi')\n", false);
    write(
        root,
        "bin/start",
        b"#!/bin/sh\nexec python3 server.py\n",
        true,
    );
    write(root, "static/css/site.css", b"body{}", false);
    write(root, "static/a.txt", b"a", false);
    write(
        root,
        "static.txt",
        b"sorts between `static` and `static/`",
        false,
    );
    fs::create_dir_all(root.join("empty")).unwrap();
    symlink("static/css/site.css", root.join("site.css")).unwrap();
}

/// Copies a tree, giving every file and directory a different mtime and non-exec files a
/// different mode, neither of which may show in the bundle.
fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    let mut names: Vec<_> = fs::read_dir(from)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    // Create in reverse order so directory listing order differs from the original too.
    names.sort();
    names.reverse();
    for name in names {
        let (src, dst) = (from.join(&name), to.join(&name));
        let meta = fs::symlink_metadata(&src).unwrap();
        if meta.file_type().is_symlink() {
            symlink(fs::read_link(&src).unwrap(), &dst).unwrap();
        } else if meta.is_dir() {
            copy_tree(&src, &dst);
        } else {
            fs::copy(&src, &dst).unwrap();
            let exec = meta.permissions().mode() & 0o111 != 0;
            let mode = if exec { 0o700 } else { 0o600 };
            fs::set_permissions(&dst, fs::Permissions::from_mode(mode)).unwrap();
        }
        if !meta.file_type().is_symlink() {
            let file = fs::File::open(&dst).unwrap();
            file.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000))
                .unwrap();
        }
    }
}

#[test]
fn packing_is_deterministic_across_runs_paths_and_mtimes() {
    let a = tempfile::tempdir().unwrap();
    sample(a.path());
    let first = pack(a.path());
    let (summary, _) = pack_dir(a.path(), Vec::new()).unwrap();
    assert_eq!(pack(a.path()), first);

    let b = tempfile::tempdir().unwrap();
    let copy = b.path().join("elsewhere/deeper");
    copy_tree(a.path(), &copy);
    let mtime = |p: &Path| fs::metadata(p).unwrap().modified().unwrap();
    assert_ne!(
        mtime(&a.path().join("server.py")),
        mtime(&copy.join("server.py"))
    );
    let (copied, _) = pack_dir(&copy, Vec::new()).unwrap();
    assert_eq!(copied, summary);
    assert_eq!(pack(&copy), first);

    // And the digest really is the digest of the bytes.
    let mut reader = HashingReader::new(&first[..]);
    std::io::copy(&mut reader, &mut std::io::sink()).unwrap();
    assert_eq!(reader.digest(), summary.sha256);
    assert_eq!(summary.size, first.len() as u64);

    // A change in content changes the bundle (the comparison above is not vacuous).
    write(&copy, "server.py", b"print('ho')\n", false);
    assert_ne!(pack(&copy), first);
}

#[test]
fn exec_bit_changes_the_bundle_but_other_mode_bits_do_not() {
    let dir = tempfile::tempdir().unwrap();
    sample(dir.path());
    let before = pack(dir.path());
    let script = dir.path().join("server.py");
    fs::set_permissions(&script, fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(pack(dir.path()), before);
    fs::set_permissions(&script, fs::Permissions::from_mode(0o744)).unwrap();
    assert_ne!(pack(dir.path()), before);
}

#[test]
fn headers_are_normalized_and_sorted_by_path_bytes() {
    let dir = tempfile::tempdir().unwrap();
    sample(dir.path());
    let tar = zstd::decode_all(&pack(dir.path())[..]).unwrap();
    let mut archive = tar::Archive::new(&tar[..]);
    let mut seen = Vec::new();
    for entry in archive.entries().unwrap() {
        let entry = entry.unwrap();
        let h = entry.header();
        let path = String::from_utf8(entry.path_bytes().into_owned()).unwrap();
        assert!(!path.starts_with("./") && !path.starts_with('/'), "{path}");
        assert_eq!(h.mtime().unwrap(), 0, "{path}");
        assert_eq!((h.uid().unwrap(), h.gid().unwrap()), (0, 0), "{path}");
        assert_eq!(h.username_bytes().unwrap_or_default(), b"", "{path}");
        assert_eq!(h.groupname_bytes().unwrap_or_default(), b"", "{path}");
        let want = match h.entry_type() {
            tar::EntryType::Directory => 0o755,
            tar::EntryType::Symlink => 0o777,
            _ if path == "bin/start" => 0o755,
            _ => 0o644,
        };
        assert_eq!(h.mode().unwrap(), want, "{path}");
        if path == "site.css" {
            assert!(h.entry_type().is_symlink());
            assert_eq!(&*entry.link_name_bytes().unwrap(), b"static/css/site.css");
        }
        seen.push(path);
    }
    let expected = [
        "app.toml",
        "bin",
        "bin/start",
        "empty",
        "server.py",
        "site.css",
        "static",
        "static.txt",
        "static/a.txt",
        "static/css",
        "static/css/site.css",
    ];
    assert_eq!(seen, expected);
}

#[test]
fn ignore_files_are_honoured_and_git_is_left_out() {
    let outer = tempfile::tempdir().unwrap();
    // A parent directory's .gitignore must not reach into the app.
    write(outer.path(), ".gitignore", b"*.py\n", false);
    let dir = outer.path().join("app");
    let d = dir.as_path();
    write(d, "app.toml", MANIFEST.as_bytes(), false);
    write(d, "server.py", b"", false);
    write(d, ".gitignore", b"*.log\n!keep.log\nbuild/\n", false);
    write(d, ".emignore", b"secrets.txt\ntests/\n", false);
    write(d, ".env.example", b"A=1", false);
    write(d, "debug.log", b"", false);
    write(d, "keep.log", b"", false);
    write(d, "build/out.bin", b"", false);
    write(d, "secrets.txt", b"", false);
    write(d, "tests/test_app.py", b"", false);
    write(d, "local.cfg", b"", false);
    write(d, "src/.gitignore", b"local.cfg\n", false);
    write(d, "src/local.cfg", b"", false);
    write(d, "src/main.py", b"", false);
    write(d, "src/deep/trace.log", b"", false);
    write(d, ".git/config", b"", false);
    write(d, ".git/HEAD", b"", false);
    write(
        d,
        "vendor/lib/.git",
        b"gitdir: ../../.git/modules/lib",
        false,
    );
    write(d, "vendor/lib/lib.py", b"", false);

    let parent = tempfile::tempdir().unwrap();
    let dest = parent.path().join("release");
    unpack(&pack(d)[..], &dest, &Limits::default()).unwrap();
    let present = [
        "app.toml",
        "server.py",
        ".gitignore",
        ".emignore",
        ".env.example",
        "keep.log",
        "local.cfg",
        "src/main.py",
        "vendor/lib/lib.py",
    ];
    for p in present {
        assert!(dest.join(p).exists(), "{p} is missing");
    }
    let absent = [
        "debug.log",
        "build",
        "secrets.txt",
        "tests",
        "src/local.cfg",
        "src/deep/trace.log",
        ".git",
        "vendor/lib/.git",
    ];
    for p in absent {
        assert!(!dest.join(p).exists(), "{p} should have been left out");
    }
}

#[test]
fn inspect_accepts_what_pack_produced() {
    let dir = tempfile::tempdir().unwrap();
    sample(dir.path());
    let mut bundle = Vec::new();
    let (summary, manifest) = pack_dir(dir.path(), &mut bundle).unwrap();
    assert_eq!(manifest.name, "hello");
    let mut reader = HashingReader::new(&bundle[..]);
    let info = inspect(std::io::BufReader::new(&mut reader), &Limits::default()).unwrap();
    assert_eq!(info.manifest, manifest);
    assert_eq!(info.entries, summary.entries);
    assert_eq!(info.unpacked_bytes, summary.unpacked_bytes);
    // inspect reads to the end, so a hashing reader around it yields the bundle digest.
    let (_, digest, bytes) = reader.finish();
    assert_eq!((digest, bytes), (summary.sha256.clone(), summary.size));
    assert_eq!(summary.entries, 11);
    let content: u64 = [MANIFEST.len(), 12, 33, 6, 1, 36]
        .iter()
        .map(|n| *n as u64)
        .sum();
    assert_eq!(summary.unpacked_bytes, content);
}

#[test]
fn packing_streams_into_any_writer() {
    let dir = tempfile::tempdir().unwrap();
    sample(dir.path());
    let mut sink = Sink(0);
    let (summary, _) = pack_dir(dir.path(), &mut sink).unwrap();
    assert_eq!(sink.0, summary.size);
}

fn pack_err(dir: &Path) -> BundleError {
    pack_dir(dir, Vec::new()).expect_err("pack accepted a bad tree")
}

#[test]
fn pack_checks_the_manifest_and_runner_first() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "server.py", b"", false);
    assert!(matches!(pack_err(d), BundleError::MissingManifest));

    write(d, "app.toml", b"name = \"Bad Name\"", false);
    let e = pack_err(d);
    assert!(
        matches!(&e, BundleError::Manifest(m) if m.field.as_deref() == Some("name")),
        "{e}"
    );

    write(d, "app.toml", b"name = \"ok\"", false);
    assert!(matches!(pack_err(d), BundleError::NoRunner));
    write(d, "apprunner", b"#!/bin/sh\n", false);
    assert!(matches!(pack_err(d), BundleError::NoRunner));
    write(d, "apprunner", b"#!/bin/sh\n", true);
    let (_, manifest) = pack_dir(d, Vec::new()).unwrap();
    assert!(manifest.run.is_none());

    // An ignored manifest is as good as none: the server would not see it either.
    write(d, ".emignore", b"app.toml\n", false);
    assert!(matches!(pack_err(d), BundleError::MissingManifest));
}

#[test]
fn pack_refuses_links_out_of_the_tree_and_special_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "app.toml", MANIFEST.as_bytes(), false);
    pack_dir(d, Vec::new()).unwrap();

    symlink("/etc/passwd", d.join("passwd")).unwrap();
    let e = pack_err(d);
    assert!(
        matches!(&e, BundleError::UnsafePath { path, .. } if path == "passwd"),
        "{e}"
    );
    fs::remove_file(d.join("passwd")).unwrap();

    symlink("../../outside", d.join("sub")).unwrap();
    assert!(matches!(pack_err(d), BundleError::UnsafePath { .. }));
    fs::remove_file(d.join("sub")).unwrap();

    let status = std::process::Command::new("mkfifo")
        .arg(d.join("pipe"))
        .status()
        .unwrap();
    assert!(status.success());
    let e = pack_err(d);
    assert!(
        matches!(&e, BundleError::UnsupportedEntry { path, kind } if path == "pipe" && kind == "fifo"),
        "{e}"
    );
}

#[test]
fn symlinked_directories_are_stored_as_links_not_followed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "app.toml", MANIFEST.as_bytes(), false);
    write(d, "real/file.txt", b"x", false);
    symlink("real", d.join("alias")).unwrap();
    let parent = tempfile::tempdir().unwrap();
    let dest = parent.path().join("r");
    let info = unpack(&pack(d)[..], &dest, &Limits::default()).unwrap();
    assert_eq!(info.entries, 4);
    assert!(
        fs::symlink_metadata(dest.join("alias"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(fs::read(dest.join("alias/file.txt")).unwrap(), b"x");
}
