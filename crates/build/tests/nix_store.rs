//! A build on a machine with Nix (NixOS, where every program and runtime lives in the store)
//! sees the store read-only, even under the umask Maestro's systemd unit gives it
//! (`UMask=0077`), with which bubblewrap would make `/nix` itself closed to the build's user.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;

use common::{run_build, settings, write_tree};

/// Set in the process this test starts again under umask 0077.
const UNDER_UMASK: &str = "PX_BUILD_TEST_UNDER_UMASK";
const TEST_NAME: &str = "a_build_reads_the_nix_store_where_there_is_one_and_cannot_write_to_it";

#[test]
fn a_build_reads_the_nix_store_where_there_is_one_and_cannot_write_to_it() {
    if std::env::var_os(UNDER_UMASK).is_none() {
        // The umask belongs to the whole process, so the test runs again in a process of its
        // own, started by a shell that sets it.
        let status = Command::new("sh")
            .args(["-c", "umask 077 && exec \"$@\"", "sh"])
            .arg(std::env::current_exe().unwrap())
            .args(["--exact", TEST_NAME, "--nocapture"])
            .env(UNDER_UMASK, "1")
            .status()
            .unwrap();
        assert!(status.success(), "the test under umask 0077 failed");
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let work = tempfile::tempdir().unwrap();
        let source = tempfile::tempdir().unwrap();
        let app = "build-test-nix-store";
        write_tree(
            source.path(),
            &[(
                "app.toml",
                "name = \"build-test-nix-store\"\nrun = \"./start\"\n\n[build]\ncommand = \"\"\"\nif ls /nix/store >/dev/null; then echo store-listed; fi\nmkdir /nix/store/px-build-test 2>/dev/null || echo store-unwritable\n\"\"\"\n",
            )],
        );
        let settings = settings(work.path(), app);
        let (built, output) = run_build(app, 1, source.path(), &settings).await;
        built.unwrap_or_else(|e| panic!("{e}\n{output:#?}"));
        let said = |line: &str| output.iter().any(|l| l == line);
        if Path::new("/nix/store").is_dir() {
            assert!(said("store-listed"), "{output:#?}");
        } else {
            assert!(!said("store-listed"), "{output:#?}");
        }
        assert!(said("store-unwritable"), "{output:#?}");
        assert!(!Path::new("/nix/store/px-build-test").exists());
    });
}
