//! The `beacon` binary under `systemd-socket-activate`, which passes its sockets by name (`api`,
//! `control`), with a datagram socket the test owns as systemd's notification socket: READY=1
//! once serving, a status line, watchdog pings, a reload (the unit's `kill -HUP`) that swaps
//! the accepted tokens, then STOPPING=1.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use px_runtime::tokens::{generate, hash};
use px_test_support::systemd::{
    Notifications, Service, Signal, first_connection, get_with_token as get,
    require_socket_activate,
};
use px_test_support::{Pki, free_port};

const BIN: &str = env!("CARGO_BIN_EXE_beacon");

fn write_tokens(path: &Path, name: &str, token: &str) {
    std::fs::write(
        path,
        format!(
            "[[token]]\nname = \"{name}\"\nrole = \"read\"\nsha256 = \"{}\"\n",
            hash(token)
        ),
    )
    .unwrap();
}

#[test]
fn activated_beacon_is_ready_reports_pings_reloads_its_tokens_and_stops() {
    require_socket_activate();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&["localhost"]).unwrap();
    let repo_token = dir.path().join("repo-token");
    px_runtime::secrets::write_secret_file(&repo_token, &generate()).unwrap();
    let tokens_file = dir.path().join("tokens.toml");
    let (old, new) = (generate(), generate());
    write_tokens(&tokens_file, "old", &old);
    let config = dir.path().join("beacon.toml");
    // The configured addresses are never bound: systemd passes both sockets. No apprepo runs.
    std::fs::write(
        &config,
        format!(
            "http_listen = \"127.0.0.1:1\"\ncontrol_listen = \"127.0.0.1:1\"\ndata_dir = \"{}\"\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\ntokens_file = \"{}\"\n[api_tls]\nplain_http = true\n[repository]\nurl = \"http://127.0.0.1:1\"\ntoken_file = \"{}\"\n",
            dir.path().join("data").display(),
            pki.cert().display(),
            pki.key().display(),
            tokens_file.display(),
            repo_token.display()
        ),
    )
    .unwrap();
    let mut systemd = Notifications::bind();
    let (api, control) = (free_port(), free_port());
    let mut beacon = Service::activated(
        BIN,
        &[(api, "api"), (control, "control")],
        &systemd.path,
        &config,
        dir.path().join("beacon.log"),
    );

    // The first connection starts Beacon; it waits in the socket's queue meanwhile.
    let first = first_connection(move || get(api, "/healthz", ""));
    assert_eq!(systemd.next(&beacon), "READY=1", "READY=1 comes first");
    assert_eq!(get(api, "/v1/nodes", &old).unwrap(), "HTTP/1.1 200 OK");
    assert_eq!(first.join().unwrap().unwrap(), "HTTP/1.1 200 OK");
    let status = systemd.next(&beacon);
    assert!(
        status.starts_with("STATUS=0 nodes connected, 0 apps, generation 0; apprepo "),
        "{status:?}"
    );
    let mut pings = 0;
    while pings < 2 {
        // Status changes (apprepo found unreachable) may come between the pings.
        match systemd.next_or_ping(&beacon) {
            ping if ping == "WATCHDOG=1" => pings += 1,
            message => assert!(message.starts_with("STATUS="), "{message:?}"),
        }
    }

    // A reload reads the tokens file again: the new token is accepted, the old one no more.
    write_tokens(&tokens_file, "new", &new);
    beacon.signal(Signal::SIGHUP);
    let reloading = loop {
        let message = systemd.next(&beacon);
        if !message.starts_with("STATUS=") {
            break message;
        }
    };
    assert!(reloading.starts_with("RELOADING=1\n"), "{reloading:?}");
    assert_eq!(systemd.next(&beacon), "READY=1");
    assert_eq!(get(api, "/v1/nodes", &new).unwrap(), "HTTP/1.1 200 OK");
    assert_eq!(
        get(api, "/v1/nodes", &old).unwrap(),
        "HTTP/1.1 401 Unauthorized"
    );

    beacon.signal(Signal::SIGTERM);
    loop {
        let message = systemd.next(&beacon);
        if message == "STOPPING=1" {
            break;
        }
        assert!(message.starts_with("STATUS="), "{message:?}");
    }
    assert!(beacon.wait().success(), "{}", beacon.logs());
}
