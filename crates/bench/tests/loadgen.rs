//! The Beacon load generator end to end, small: 20 links against the real `beacon` binary,
//! fast heartbeats, one release fan-out. Checks that the benchmark measures what it claims
//! (every link got both assignments, the figures are there), not how fast Beacon is: figures
//! are for `benches/beacon`, never for timed tests (docs/src/design/figures.md).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::Context;

/// The debug `beacon` binary, built first. `CARGO_BIN_EXE_*` only covers this crate's own
/// binaries, so it is built with cargo into the same target directory; when it is up to date
/// that is a no-op, and building every time means the test never runs a stale Beacon.
/// The variables cargo sets for this test (`CARGO_MANIFEST_DIR`, `CARGO_PKG_*`, ...) are not
/// passed on: build scripts watch some of them (ring's watches `CARGO_MANIFEST_DIR`), and
/// different values would rebuild those crates here and again in the next outer build.
fn beacon_binary() -> anyhow::Result<PathBuf> {
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    let mut cargo = Command::new(env!("CARGO"));
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_BIN_")
            || [
                "CARGO_MANIFEST_DIR",
                "CARGO_MANIFEST_PATH",
                "CARGO_CRATE_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
            ]
            .contains(&name.as_ref())
        {
            cargo.env_remove(name.as_ref());
        }
    }
    let status = cargo
        .args(["build", "--quiet", "-p", "px-beacon", "--bin", "beacon"])
        .arg("--target-dir")
        .arg(&target)
        .current_dir(&workspace)
        .status()
        .context("running cargo build for beacon")?;
    anyhow::ensure!(
        status.success(),
        "cargo build -p px-beacon failed: {status}"
    );
    let binary = target.join("debug/beacon");
    anyhow::ensure!(
        binary.is_file(),
        "{} missing after the build",
        binary.display()
    );
    Ok(binary)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_links_get_both_assignments_and_the_report_is_sane() {
    let mut options = px_bench::Options::new(beacon_binary().expect("the beacon binary"), 20);
    options.heartbeat = Duration::from_millis(200);
    options.steady = Duration::from_secs(1);
    options.fanout_timeout = Duration::from_secs(10);

    let report = tokio::time::timeout(Duration::from_secs(60), px_bench::run(&options))
        .await
        .expect("the benchmark finished")
        .expect("the benchmark ran");
    println!("{report}");

    assert_eq!(report.linked, 20, "every link got its first assignment");
    assert_eq!(report.fanout.received, 20, "every link got the new one");
    assert_eq!(report.lost, 0, "no link broke: {:?}", report.first_error);
    let all = report.fanout.all.expect("the time for all links");
    assert!(all > Duration::ZERO && all == report.fanout.max, "{all:?}");
    assert!(report.fanout.p50 > Duration::ZERO && report.fanout.p50 <= report.fanout.p99);
    assert!(report.fanout.p99 <= report.fanout.max);
    let read = report
        .fanout
        .repository_read
        .expect("beacon read the repository");
    assert!(read > Duration::ZERO && read <= all, "{read:?} vs {all:?}");
    assert!(report.connect > Duration::ZERO);
    for memory in [
        report.memory_linked,
        report.memory_steady,
        report.memory_end,
    ] {
        assert!(
            memory.rss_kib > 0 && memory.hwm_kib >= memory.rss_kib,
            "{memory:?}"
        );
    }
    // 20 links at 5 heartbeats a second for a second: about 100, whatever the phases.
    assert!(
        (50..=150).contains(&report.heartbeats_sent),
        "{} heartbeats sent",
        report.heartbeats_sent
    );
    let counted = report
        .heartbeats_counted
        .expect("beacon's heartbeat counter");
    assert!(counted > 0, "beacon counted no heartbeats");
    assert!(report.steady_cpu.wall >= Duration::from_secs(1));
    let table = report.to_string();
    for row in [
        "connect all N",
        "beacon CPU, steady",
        "fan-out: all N have it",
    ] {
        assert!(table.contains(row), "{row:?} missing from\n{table}");
    }
}
