//! `em`'s own words: `--help` texts and error messages, with the help texts compared to insta
//! snapshots in `tests/snapshots/`, and the exit codes scripts rely on. After a deliberate
//! change to a help text, rewrite the snapshots with
//! `INSTA_UPDATE=always cargo test -p px-em --test cli` and review the diff; a changed text
//! fails the test wherever `INSTA_UPDATE=no` or `CI` is set (scripts/test sets the former).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_em");

/// Runs em with fresh, empty config and data directories.
fn em(home: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("XDG_CONFIG_HOME", home.join("config"))
        .env("XDG_DATA_HOME", home.join("data"))
        .env("HOME", home)
        .env_remove("PX_LOG")
        .output()
        .unwrap()
}

#[test]
fn help_texts() {
    let home = tempfile::tempdir().unwrap();
    for (name, args) in [
        ("help", vec!["--help"]),
        ("help-up", vec!["up", "--help"]),
        ("help-deploy", vec!["deploy", "--help"]),
        ("help-releases", vec!["releases", "--help"]),
        ("help-config", vec!["config", "--help"]),
        ("help-logs", vec!["logs", "--help"]),
        ("help-login", vec!["login", "--help"]),
        ("help-init", vec!["init", "--help"]),
        ("help-run", vec!["run", "--help"]),
        ("help-scale", vec!["scale", "--help"]),
        ("help-ps", vec!["ps", "--help"]),
        ("help-domains", vec!["domains", "--help"]),
    ] {
        let out = em(home.path(), &args);
        assert!(out.status.success(), "{name}");
        insta::assert_snapshot!(name, String::from_utf8(out.stdout).unwrap());
    }
}

#[test]
fn errors_name_the_problem_and_the_fix() {
    let home = tempfile::tempdir().unwrap();
    // Nothing configured yet.
    let out = em(home.path(), &["status"]);
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("em up") && err.contains("em login"), "{err}");

    // A directory without app.toml, and a broken app.toml: exit 6, naming the file or field.
    std::fs::create_dir_all(home.path().join("config/em")).unwrap();
    std::fs::write(
        home.path().join("config/em/config.toml"),
        "remote = \"http://127.0.0.1:9\"\nbeacon = \"http://127.0.0.1:9\"\ntoken = \"pxt_x\"\n",
    )
    .unwrap();
    let app = home.path().join("app");
    std::fs::create_dir_all(&app).unwrap();
    let out = em(home.path(), &["deploy", app.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(6));
    assert!(String::from_utf8_lossy(&out.stderr).contains("em init"));
    std::fs::write(
        app.join("app.toml"),
        "name = \"Hello World\"\nrun = \"x\"\n",
    )
    .unwrap();
    let out = em(home.path(), &["deploy", app.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(6));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("`name`") && err.contains("lowercase"), "{err}");

    // A remote nobody answers on: exit 4, and what to check.
    std::fs::write(app.join("app.toml"), "name = \"hello\"\nrun = \"x\"\n").unwrap();
    let out = em(home.path(), &["deploy", app.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(4));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("cannot reach") && err.contains("em up"),
        "{err}"
    );

    // Which app? Outside an app directory, without --app.
    let out = Command::new(BIN)
        .args(["releases"])
        .current_dir(home.path())
        .env("XDG_CONFIG_HOME", home.path().join("config"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--app"));

    // A bad flag is clap's usage error.
    assert_eq!(
        em(home.path(), &["deploy", "--no-such-flag"]).status.code(),
        Some(2)
    );
}

#[test]
fn completions_are_generated() {
    let home = tempfile::tempdir().unwrap();
    for shell in ["bash", "zsh", "fish"] {
        let out = em(home.path(), &["completions", shell]);
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(
            text.contains("deploy") && text.contains("rollback"),
            "{shell}"
        );
    }
}
