//! The `beacon` binary: `--check-config` accepts a good configuration and names every problem
//! of a bad one, exiting 78.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_beacon");

#[test]
fn check_config_accepts_good_and_names_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let pki = px_test_support::Pki::new(&["localhost"]).unwrap();
    let token_file = dir.path().join("repo-token");
    px_runtime::secrets::write_secret_file(&token_file, "pxt_x").unwrap();
    let config = dir.path().join("beacon.toml");
    std::fs::write(
        &config,
        format!(
            "tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n[[tokens]]\nname = \"web\"\nrole = \"maestro\"\nsha256 = \"{}\"\nnode = \"web-1\"\n[repository]\nurl = \"http://127.0.0.1:7070\"\ntoken_file = \"{}\"\n",
            pki.cert().display(),
            pki.key().display(),
            px_runtime::tokens::hash("pxt_web"),
            token_file.display()
        ),
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .arg("--check-config")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Nothing configured: every missing piece is named at once.
    let empty = dir.path().join("empty.toml");
    std::fs::write(&empty, "").unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&empty)
        .arg("--check-config")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "no tokens configured",
        "tls_cert_file",
        "repository.token_file",
    ] {
        assert!(err.contains(needle), "{needle} missing from: {err}");
    }

    // A typo in a key names the key and the file.
    std::fs::write(&empty, "node_lost_afer = \"10s\"\n").unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&empty)
        .arg("--check-config")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("node_lost_afer") && err.contains("empty.toml"),
        "{err}"
    );
}

#[test]
fn check_config_takes_acme_settings_from_the_file_and_the_environment_and_names_bad_ones() {
    let dir = tempfile::tempdir().unwrap();
    let pki = px_test_support::Pki::new(&["localhost"]).unwrap();
    let token_file = dir.path().join("repo-token");
    px_runtime::secrets::write_secret_file(&token_file, "pxt_x").unwrap();
    let config = dir.path().join("beacon.toml");
    let base = format!(
        "tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n[[tokens]]\nname = \"web\"\nrole = \"maestro\"\nsha256 = \"{}\"\nnode = \"web-1\"\n[repository]\nurl = \"http://127.0.0.1:7070\"\ntoken_file = \"{}\"\n",
        pki.cert().display(),
        pki.key().display(),
        px_runtime::tokens::hash("pxt_web"),
        token_file.display()
    );
    let check = |acme: &str, env: &[(&str, &str)]| {
        std::fs::write(&config, format!("{base}{acme}")).unwrap();
        let mut command = Command::new(BIN);
        command.arg("--config").arg(&config).arg("--check-config");
        for (key, value) in env {
            command.env(key, value);
        }
        command.output().unwrap()
    };

    let good = format!(
        "[acme]\ndirectory_url = \"https://acme-staging-v02.api.letsencrypt.org/directory\"\nemail = \"ops@example.com\"\nca_file = \"{}\"\nchallenge = \"tls-alpn-01\"\nprofile = \"shortlived\"\nretry_after_failure = \"5m\"\n",
        pki.ca().display()
    );
    let out = check(&good, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Each bad value is named with what to do, from the file or from the environment.
    let out = check(
        "[acme]\ndirectory_url = \"http://acme.example.com/directory\"\nemail = \"not an address\"\nprofile = \"short lived\"\n",
        &[
            ("PX_BEACON_ACME__CA_FILE", "/nonexistent/acme-ca.pem"),
            ("PX_BEACON_ACME__RETRY_AFTER_FAILURE", "2d"),
        ],
    );
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "acme.directory_url",
        "must start with https://",
        "acme.email",
        "acme.profile",
        "acme.ca_file",
        "acme.retry_after_failure",
    ] {
        assert!(err.contains(needle), "{needle} missing from: {err}");
    }
    let out = check("", &[("PX_BEACON_ACME__CHALLENGE", "dns-01")]);
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("dns-01"), "{err}");
}
