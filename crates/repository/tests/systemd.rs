//! The `apprepo` binary under `systemd-socket-activate`, which passes its socket by name
//! (`api`; another one it has no use for is closed with a warning), with a datagram socket the test owns as systemd's notification socket: READY=1 once
//! serving with its storage checked, a status line, watchdog pings, a reload (the unit's
//! `kill -HUP`) that swaps the accepted tokens, then STOPPING=1.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpStream;
use std::path::Path;

use px_runtime::tokens::{generate, hash};
use px_test_support::free_port;
use px_test_support::systemd::{
    Notifications, Service, Signal, first_connection, get_with_token as get,
    require_socket_activate,
};

const BIN: &str = env!("CARGO_BIN_EXE_apprepo");

fn write_tokens(path: &Path, name: &str, token: &str) {
    std::fs::write(
        path,
        format!(
            "[[token]]\nname = \"{name}\"\nrole = \"deploy\"\nsha256 = \"{}\"\n",
            hash(token)
        ),
    )
    .unwrap();
}

#[test]
fn activated_apprepo_is_ready_reports_pings_reloads_its_tokens_and_stops() {
    require_socket_activate();
    let dir = tempfile::tempdir().unwrap();
    let tokens_file = dir.path().join("tokens.toml");
    let (old, new) = (generate(), generate());
    write_tokens(&tokens_file, "old", &old);
    let config = dir.path().join("apprepo.toml");
    let data_dir = dir.path().join("data");
    // The configured address is never bound: systemd passes the socket.
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:1\"\ndata_dir = \"{}\"\ntokens_file = \"{}\"\n[api_tls]\nplain_http = true\n",
            data_dir.display(),
            tokens_file.display(),
        ),
    )
    .unwrap();
    let mut systemd = Notifications::bind();
    // A second socket apprepo has no use for: closed, with a warning.
    let (api, unused) = (free_port(), free_port());
    let mut apprepo = Service::activated(
        BIN,
        &[(api, "api"), (unused, "metrics")],
        &systemd.path,
        &config,
        dir.path().join("apprepo.log"),
    );

    // The first connection starts apprepo; it waits in the socket's queue meanwhile.
    let first = first_connection(move || get(api, "/healthz", ""));
    assert_eq!(systemd.next(&apprepo), "READY=1", "READY=1 comes first");
    assert_eq!(get(api, "/v1/apps", &old).unwrap(), "HTTP/1.1 200 OK");
    assert_eq!(first.join().unwrap().unwrap(), "HTTP/1.1 200 OK");
    let logs = apprepo.logs();
    assert!(
        logs.contains("closing a socket systemd passed that this service does not use")
            && logs.contains("socket=metrics"),
        "{logs}"
    );
    assert!(
        TcpStream::connect(("127.0.0.1", unused)).is_err(),
        "the unused socket is closed"
    );
    assert_eq!(
        systemd.next(&apprepo),
        format!(
            "STATUS=storage filesystem at {} ok; 0 releases committed; no beacon configured",
            data_dir.join("storage").display()
        )
    );
    systemd.pings(2, &apprepo);

    // A reload reads the tokens file again: the new token is accepted, the old one no more.
    write_tokens(&tokens_file, "new", &new);
    apprepo.signal(Signal::SIGHUP);
    let reloading = systemd.next(&apprepo);
    assert!(reloading.starts_with("RELOADING=1\n"), "{reloading:?}");
    assert_eq!(systemd.next(&apprepo), "READY=1");
    assert_eq!(get(api, "/v1/apps", &new).unwrap(), "HTTP/1.1 200 OK");
    assert_eq!(
        get(api, "/v1/apps", &old).unwrap(),
        "HTTP/1.1 401 Unauthorized"
    );

    apprepo.signal(Signal::SIGTERM);
    assert_eq!(systemd.next(&apprepo), "STOPPING=1");
    assert!(apprepo.wait().success(), "{}", apprepo.logs());
}
