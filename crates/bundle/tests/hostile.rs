//! Hostile and broken bundles, built by hand: each must be refused by both `inspect` and
//! `unpack` with an error that names the problem, leaving nothing on disk.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{self, Read};
use std::time::{Duration, Instant};

use common::{Hand, MANIFEST, assert_unsafe, raw_header, refused};
use px_bundle::{BundleError, Limits, inspect, unpack};
use tar::EntryType;

fn limits() -> Limits {
    Limits::default()
}

/// Positive control: the hand builder makes bundles the reader accepts, so every refusal
/// below is about the hostile part and not about the builder.
#[test]
fn a_hand_built_bundle_with_odd_but_safe_shapes_is_accepted() {
    let bundle = Hand::new()
        .dir("./")
        .file("./app.toml", MANIFEST.as_bytes(), 0o600)
        .file("a/b/c.txt", b"deep", 0o600)
        .dir("a/")
        .dir("a/b")
        .symlink("a/up", "../a/b/c.txt")
        .file("bin//run", b"#!/bin/sh\n", 0o700)
        .finish();
    let info = inspect(&bundle[..], &limits()).unwrap();
    assert_eq!(info.manifest.name, "hello");
    let parent = tempfile::tempdir().unwrap();
    let dest = parent.path().join("release");
    let unpacked = unpack(&bundle[..], &dest, &limits()).unwrap();
    assert_eq!(unpacked, info);
    assert_eq!(std::fs::read(dest.join("a/up")).unwrap(), b"deep");
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &str| {
        std::fs::metadata(dest.join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("bin/run"), 0o755);
    assert_eq!(mode("app.toml"), 0o644);
    assert_eq!(mode("a"), 0o755);
}

#[test]
fn parent_dir_components_are_refused() {
    for name in ["../x", "a/../../x", "a/.."] {
        let bundle = Hand::with_manifest().file(name, b"pwned", 0o644).finish();
        assert_unsafe(&refused(&bundle, &limits()), name, "`..`");
    }
}

#[test]
fn absolute_paths_are_refused() {
    let bundle = Hand::with_manifest()
        .file("/etc/x", b"pwned", 0o644)
        .finish();
    assert_unsafe(&refused(&bundle, &limits()), "/etc/x", "absolute");
}

#[test]
fn empty_and_non_utf8_paths_are_refused() {
    let bundle = Hand::with_manifest()
        .raw(b"a\xff", EntryType::Regular, 0o644, b"", b"")
        .finish();
    assert_unsafe(&refused(&bundle, &limits()), "a\u{fffd}", "UTF-8");
    let bundle = Hand::with_manifest()
        .raw(b".", EntryType::Regular, 0o644, b"", b"x")
        .finish();
    assert_unsafe(&refused(&bundle, &limits()), ".", "empty");
}

#[test]
fn symlinks_pointing_outside_are_refused() {
    for (link, target) in [
        ("l", "../../etc"),
        ("l", "/etc"),
        ("d/l", "../.."),
        ("l", ".."),
    ] {
        let bundle = Hand::with_manifest()
            .dir("d")
            .symlink(link, target)
            .finish();
        assert_unsafe(
            &refused(&bundle, &limits()),
            link,
            "link points outside the bundle",
        );
    }
}

#[test]
fn a_symlink_chain_that_escapes_physically_is_refused() {
    // `x/l -> ..` is the root, fine on its own; `m -> x/l/..` looks like `x` lexically but
    // the kernel resolves it to the root's parent.
    let bundle = Hand::with_manifest()
        .dir("x")
        .symlink("x/l", "..")
        .symlink("m", "x/l/..")
        .finish();
    assert_unsafe(&refused(&bundle, &limits()), "m", "after a name");
}

#[test]
fn writing_through_a_symlink_is_refused() {
    // Inside the bundle, and still refused: nothing may be written below a symlink.
    let bundle = Hand::with_manifest()
        .dir("sub")
        .symlink("l", "sub")
        .file("l/x", b"through", 0o644)
        .finish();
    assert_unsafe(&refused(&bundle, &limits()), "l/x", "symlink `l`");
    // A link to the root itself, then a directory created through it.
    let bundle = Hand::with_manifest().symlink("l", ".").dir("l/d").finish();
    assert_unsafe(&refused(&bundle, &limits()), "l/d", "symlink `l`");
}

#[test]
fn duplicate_paths_are_refused() {
    let bundle = Hand::with_manifest()
        .file("a", b"1", 0o644)
        .file("./a", b"2", 0o644)
        .finish();
    assert_unsafe(&refused(&bundle, &limits()), "a", "twice");
    // A symlink replacing a directory that already has children.
    let bundle = Hand::with_manifest()
        .file("d/x", b"1", 0o644)
        .symlink("d", "x")
        .finish();
    assert_unsafe(&refused(&bundle, &limits()), "d", "twice");
}

#[test]
fn special_entries_are_refused_by_name() {
    for (kind, name, link) in [
        (EntryType::Char, "character device", &b""[..]),
        (EntryType::Block, "block device", b""),
        (EntryType::Fifo, "fifo", b""),
        (EntryType::Link, "hard link", b"app.toml"),
    ] {
        let bundle = Hand::with_manifest()
            .raw(b"dev/thing", kind, 0o644, link, b"")
            .finish();
        match refused(&bundle, &limits()) {
            BundleError::UnsupportedEntry { path, kind } => {
                assert_eq!(path, "dev/thing");
                assert_eq!(kind, name);
            }
            other => panic!("{name}: {other:?}"),
        }
    }
}

#[test]
fn too_many_entries_are_refused() {
    let mut hand = Hand::with_manifest();
    for i in 0..20 {
        hand = hand.file(&format!("f{i}"), b"", 0o644);
    }
    let bundle = hand.finish();
    let small = Limits {
        max_entries: 10,
        ..limits()
    };
    assert!(matches!(
        refused(&bundle, &small),
        BundleError::TooManyEntries { max: 10 }
    ));
    // The same bundle fits the default limits, so it was the count that failed.
    inspect(&bundle[..], &limits()).unwrap();
}

#[test]
fn a_decompression_bomb_is_stopped_quickly() {
    let header = raw_header(b"zeros", EntryType::Regular, 64 << 20, 0o644, b"");
    let bomb = Hand::with_manifest()
        .sized(&header, io::repeat(0).take(64 << 20))
        .finish();
    assert!(
        bomb.len() < 64 << 10,
        "64 MiB of zeros compress to {} bytes",
        bomb.len()
    );
    let small = Limits {
        max_unpacked_bytes: 1 << 20,
        ..limits()
    };
    let started = Instant::now();
    assert!(matches!(refused(&bomb, &small), BundleError::TooLarge { max } if max == 1 << 20));
    // Generous for debug builds; decompressing all 64 MiB twice would still pass, which is
    // why the next tests check how much was read.
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[test]
fn a_bomb_is_refused_before_its_data_is_read() {
    // The header claims 10 GiB; only 1 MiB follows and the stream is truncated. If the
    // reader looked at the data at all it would report a truncated (corrupt) bundle.
    let tar = {
        let mut tar = Hand::with_manifest().tar();
        tar.truncate(tar.len() - 1024); // drop the end-of-archive blocks
        tar.extend_from_slice(
            raw_header(b"zeros", EntryType::Regular, 10 << 30, 0o644, b"").as_bytes(),
        );
        tar.extend(std::iter::repeat_n(0u8, 1 << 20));
        tar
    };
    let bundle = zstd::encode_all(&tar[..], 3).unwrap();
    let e = refused(&bundle, &limits());
    assert!(matches!(e, BundleError::TooLarge { .. }), "{e:?}");
}

#[test]
fn many_small_files_count_towards_the_size_limit() {
    let mut hand = Hand::with_manifest();
    for i in 0..40 {
        hand = hand.file(&format!("f{i}"), &[7u8; 32 << 10], 0o644);
    }
    let bundle = hand.finish();
    let small = Limits {
        max_unpacked_bytes: 1 << 20,
        ..limits()
    };
    assert!(matches!(
        refused(&bundle, &small),
        BundleError::TooLarge { .. }
    ));
    let info = inspect(&bundle[..], &limits()).unwrap();
    assert_eq!(info.unpacked_bytes, 40 * (32 << 10) + MANIFEST.len() as u64);
}

#[test]
fn a_bomb_hidden_in_a_directory_entry_is_refused() {
    // Directory data would be skipped, which still means decompressing it. The header claims
    // 10 GiB and the stream is cut short: a reader that skipped would report truncation.
    let tar = {
        let mut tar = Hand::with_manifest().tar();
        tar.truncate(tar.len() - 1024);
        tar.extend_from_slice(
            raw_header(b"d", EntryType::Directory, 10 << 30, 0o755, b"").as_bytes(),
        );
        tar.extend(std::iter::repeat_n(0u8, 1 << 20));
        tar
    };
    let bundle = zstd::encode_all(&tar[..], 3).unwrap();
    let e = refused(&bundle, &limits());
    assert!(
        matches!(&e, BundleError::Corrupt(m) if m.contains("`d`") && m.contains("carries")),
        "{e:?}"
    );
}

#[test]
fn over_long_gnu_names_are_refused_without_reading_them() {
    let long = "a/".repeat(600) + "x";
    let bundle = Hand::with_manifest().long_file(&long, b"").finish();
    let e = refused(&bundle, &limits());
    match &e {
        BundleError::UnsafePath { path, reason } => {
            assert!(path.starts_with("a/a/a/"), "{e}");
            assert!(reason.contains("longer than 1024 bytes"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    // Within the limit, the same shape is fine.
    let ok = Hand::with_manifest()
        .long_file(&("a/".repeat(300) + "x"), b"")
        .finish();
    inspect(&ok[..], &limits()).unwrap();
}

/// `"<len> key=value\n"` where `<len>` counts the whole record, its own digits included.
fn pax_record(key: &str, value: &str) -> Vec<u8> {
    let body = format!(" {key}={value}\n");
    let len = (body.len() + 1..)
        .find(|n| n.to_string().len() + body.len() == *n)
        .unwrap();
    format!("{len}{body}").into_bytes()
}

#[test]
fn pax_paths_are_honoured() {
    // Positive control for the two tests below: a pax path is used instead of the header's.
    let bundle = Hand::with_manifest()
        .raw(
            b"PaxHeader",
            EntryType::XHeader,
            0o644,
            b"",
            &pax_record("path", "long/name.txt"),
        )
        .file("short", b"x", 0o644)
        .finish();
    let parent = tempfile::tempdir().unwrap();
    unpack(&bundle[..], &parent.path().join("r"), &limits()).unwrap();
    assert!(parent.path().join("r/long/name.txt").is_file());
    assert!(!parent.path().join("r/short").exists());
}

#[test]
fn pax_paths_are_checked_like_any_other() {
    let bundle = Hand::with_manifest()
        .raw(
            b"PaxHeader",
            EntryType::XHeader,
            0o644,
            b"",
            &pax_record("path", "../evil"),
        )
        .file("harmless", b"x", 0o644)
        .finish();
    assert_unsafe(&refused(&bundle, &limits()), "../evil", "`..`");
    let bundle = Hand::with_manifest()
        .raw(
            b"PaxHeader",
            EntryType::XHeader,
            0o644,
            b"",
            &pax_record("linkpath", "/etc"),
        )
        .symlink("l", "ok")
        .finish();
    assert_unsafe(&refused(&bundle, &limits()), "l", "outside");
}

#[test]
fn truncated_streams_are_corrupt() {
    let mut hand = Hand::with_manifest();
    for i in 0..50u8 {
        // Incompressible-ish content so the cut lands in the middle of the data.
        let data: Vec<u8> = (0..4096u32)
            .map(|j| (j.wrapping_mul(2_654_435_761) >> 13) as u8 ^ i)
            .collect();
        hand = hand.file(&format!("f{i}"), &data, 0o644);
    }
    let bundle = hand.finish();
    inspect(&bundle[..], &limits()).unwrap();
    for cut in [bundle.len() / 2, bundle.len() - 1, 20] {
        let e = refused(&bundle[..cut], &limits());
        assert!(matches!(e, BundleError::Corrupt(_)), "cut at {cut}: {e:?}");
    }
}

#[test]
fn garbage_is_corrupt() {
    let e = refused(b"PK\x03\x04 this is a zip file, not a bundle", &limits());
    assert!(matches!(e, BundleError::Corrupt(_)), "{e:?}");
    // Valid zstd around something that is not tar.
    let not_tar = zstd::encode_all(&[0x42u8; 2048][..], 3).unwrap();
    let e = refused(&not_tar, &limits());
    assert!(matches!(e, BundleError::Corrupt(_)), "{e:?}");
}

#[test]
fn data_after_the_archive_is_corrupt() {
    let mut tar = Hand::with_manifest().tar();
    tar.extend_from_slice(b"a second archive hiding behind the first");
    let e = refused(&zstd::encode_all(&tar[..], 3).unwrap(), &limits());
    assert!(matches!(e, BundleError::Corrupt(m) if m.contains("after the end")));
}

#[test]
fn a_missing_manifest_is_reported() {
    let bundle = Hand::new().file("server.py", b"print()", 0o644).finish();
    let e = refused(&bundle, &limits());
    assert!(matches!(e, BundleError::MissingManifest));
    assert!(e.to_string().contains("em init"));
    // Not at the root is not there.
    let bundle = Hand::new()
        .file("sub/app.toml", MANIFEST.as_bytes(), 0o644)
        .finish();
    assert!(matches!(
        refused(&bundle, &limits()),
        BundleError::MissingManifest
    ));
}

#[test]
fn a_bad_manifest_names_the_field() {
    let bundle = Hand::new()
        .file("app.toml", b"name = \"Hello World\"\nrun = \"x\"", 0o644)
        .finish();
    let e = refused(&bundle, &limits());
    assert!(
        matches!(&e, BundleError::Manifest(m) if m.field.as_deref() == Some("name")),
        "{e:?}"
    );
    assert!(e.to_string().contains("`name`"), "{e}");
    let bundle = Hand::new()
        .file(
            "app.toml",
            b"name = \"x\"\nrun = \"x\"\n[health]\ntimeout = \"soon\"",
            0o644,
        )
        .finish();
    assert!(
        refused(&bundle, &limits())
            .to_string()
            .contains("health.timeout")
    );
}

#[test]
fn a_manifest_must_be_a_small_regular_file() {
    let big = format!("name = \"x\"\nrun = \"x\"\n#{}", "a".repeat(70 * 1024));
    let bundle = Hand::new().file("app.toml", big.as_bytes(), 0o644).finish();
    assert!(
        refused(&bundle, &limits())
            .to_string()
            .contains("larger than")
    );
    let bundle = Hand::new()
        .file("real.toml", MANIFEST.as_bytes(), 0o644)
        .symlink("app.toml", "real.toml")
        .finish();
    assert!(
        refused(&bundle, &limits())
            .to_string()
            .contains("regular file")
    );
}

#[test]
fn an_app_needs_run_or_an_executable_apprunner() {
    let no_run = b"name = \"hello\"\n";
    let bundle = Hand::new().file("app.toml", no_run, 0o644).finish();
    let e = refused(&bundle, &limits());
    assert!(matches!(e, BundleError::NoRunner));
    assert!(e.to_string().contains("apprunner"));

    let bundle = Hand::new()
        .file("app.toml", no_run, 0o644)
        .file("apprunner", b"#!/bin/sh", 0o644)
        .finish();
    assert!(matches!(refused(&bundle, &limits()), BundleError::NoRunner));

    // Only at the root counts.
    let bundle = Hand::new()
        .file("app.toml", no_run, 0o644)
        .file("bin/apprunner", b"#!/bin/sh", 0o755)
        .finish();
    assert!(matches!(refused(&bundle, &limits()), BundleError::NoRunner));

    // Positive control: the same bundle with the exec bit set is accepted.
    let bundle = Hand::new()
        .file("app.toml", no_run, 0o644)
        .file("apprunner", b"#!/bin/sh", 0o755)
        .finish();
    let info = inspect(&bundle[..], &limits()).unwrap();
    assert!(info.manifest.run.is_none());
}

#[test]
fn unpack_refuses_an_existing_destination_and_leaves_it_alone() {
    let bundle = Hand::with_manifest().finish();
    let parent = tempfile::tempdir().unwrap();
    let dest = parent.path().join("release");
    std::fs::create_dir(&dest).unwrap();
    std::fs::write(dest.join("keep"), b"mine").unwrap();
    let e = unpack(&bundle[..], &dest, &limits()).unwrap_err();
    assert!(matches!(e, BundleError::Io { .. }), "{e:?}");
    assert!(!e.is_client_error());
    assert_eq!(std::fs::read(dest.join("keep")).unwrap(), b"mine");
    assert_eq!(
        std::fs::read_dir(parent.path()).unwrap().count(),
        1,
        "a temp dir was left behind"
    );
}
