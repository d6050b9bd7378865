//! HTTPS on `em up` with certificates from a real ACME server (Pebble): the real `em up` and
//! `em` binaries, and the real curl as the browser. Pebble's DNS answers every name with
//! 127.0.0.1 and its HTTP-01 checks come to `em up`'s HTTP port, so a made-up name such as
//! `shop.example.test` validates against this machine, as a real name would against Let's
//! Encrypt.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use px_test_support::pebble::{Pebble, PebbleOptions};

const BIN: &str = env!("CARGO_BIN_EXE_em");
/// Far longer than an order takes against Pebble (about a second here).
const WAIT: Duration = Duration::from_secs(120);
/// How long one curl may take: a handshake that waits in the listen backlog while `em up`
/// starts its apps is answered within Maestro's restore wait.
const CURL_MAX_SECONDS: &str = "60";
const DOMAIN: &str = "shop.example.test";
/// A name added after the restarts, to show the restarted Beacon orders what it lacks.
const LATER_DOMAIN: &str = "www.shop.example.test";
/// How many times `em up` is stopped and started with a certificate stored.
const RESTARTS: usize = 3;

struct Env {
    home: tempfile::TempDir,
    http_port: u16,
    https_port: u16,
    port_base: u16,
}

impl Env {
    fn new() -> Self {
        // Four consecutive free ports for the platform's services.
        let port_base = loop {
            let base = px_test_support::free_port();
            if base < 60000
                && (1..4).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok())
            {
                break base;
            }
        };
        // The kernel hands out free ports near each other, so the proxy's two are kept out of
        // the services' four and apart from each other.
        let reserved = port_base..port_base + 4;
        let other_port = |taken: &[u16]| loop {
            let port = px_test_support::free_port();
            if !reserved.contains(&port) && !taken.contains(&port) {
                break port;
            }
        };
        let http_port = other_port(&[]);
        let https_port = other_port(&[http_port]);
        Self {
            home: tempfile::tempdir().unwrap(),
            http_port,
            https_port,
            port_base,
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(BIN);
        command
            .args(args)
            .env("XDG_CONFIG_HOME", self.home.path().join("config"))
            .env("XDG_DATA_HOME", self.home.path().join("data"))
            .env("HOME", self.home.path())
            .env("PX_LOG", "warn");
        command
    }

    fn em(&self, args: &[&str]) -> Output {
        let out = self.command(args).output().unwrap();
        assert!(
            out.status.success(),
            "em {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Starts `em up` on the test's ports with `extra` flags and waits until it has written
    /// the em config (its ports are bound by then; the services are starting).
    fn up(&self, extra: &[&str]) -> Child {
        let (http, https, base) = (
            self.http_port.to_string(),
            self.https_port.to_string(),
            self.port_base.to_string(),
        );
        let mut args = vec!["up", "--http-port", &http, "--port-base", &base];
        // `--no-acme` turns HTTPS off, and refuses an HTTPS port.
        if !extra.contains(&"--no-acme") {
            args.extend(["--https-port", &https]);
        }
        args.extend_from_slice(extra);
        let config = self.home.path().join("config/em/config.toml");
        let _ = std::fs::remove_file(&config);
        let log = self.home.path().join("em-up.log");
        let mut child = self
            .command(&args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while !config.exists() {
            let said = || std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "em up {args:?} ended ({status}) before writing its config:\n{}",
                    said()
                );
            }
            assert!(
                start.elapsed() < WAIT,
                "em up never wrote its config:\n{}",
                said()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    }
}

fn stop(mut child: Child) {
    assert!(
        Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let status = child.wait().unwrap();
    assert!(status.success(), "em up exited with {status:?}");
}

/// What curl said: its `-w` output (after the body) and its verbose log.
struct Curl {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn curl(args: &[&str]) -> Curl {
    let out = Command::new("curl")
        .args(["--silent", "--show-error", "--max-time", CURL_MAX_SECONDS])
        .args(args)
        .output()
        .expect("curl is installed");
    Curl {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `https://DOMAIN:<https port>/` through curl trusting `root` alone, in `protocol`
/// (`--http2` or `--http1.1`): the body, then the HTTP version and the certificate chain
/// (`%{certs}`), one field a line.
fn get_https(env: &Env, root: &Path, protocol: &str) -> Curl {
    get_https_for(env, root, DOMAIN, protocol)
}

/// [`get_https`] for `name`.
fn get_https_for(env: &Env, root: &Path, name: &str, protocol: &str) -> Curl {
    let resolve = format!("{name}:{}:127.0.0.1", env.https_port);
    let url = format!("https://{name}:{}/", env.https_port);
    curl(&[
        protocol,
        "--verbose",
        "--cacert",
        root.to_str().unwrap(),
        "--resolve",
        &resolve,
        "--write-out",
        "\nversion=%{http_version}\n%{certs}",
        &url,
    ])
}

/// The root that signs Pebble's certificates, from its management interface, as a file.
fn pebble_root(pebble: &Pebble, dir: &Path) -> PathBuf {
    let path = dir.join("pebble-root.pem");
    let fetched = curl(&[
        "--cacert",
        pebble.listener_pki.ca().to_str().unwrap(),
        "--output",
        path.to_str().unwrap(),
        &pebble.root_url(),
    ]);
    assert!(fetched.ok, "{}", fetched.stderr);
    path
}

/// The leaf's serial number, from curl's `%{certs}`.
fn serial(curl: &Curl) -> String {
    curl.stdout
        .lines()
        .find_map(|l| l.strip_prefix("Serial Number:"))
        .unwrap_or_else(|| panic!("no serial in {}", curl.stdout))
        .trim()
        .to_string()
}

#[test]
fn em_up_gets_a_certificate_from_acme_serves_it_over_http2_and_http11_and_keeps_it_across_restarts()
{
    let env = Env::new();
    let Some(pebble) = Pebble::start(env.http_port, env.https_port) else {
        return;
    };
    let up = env.up(&[
        "--acme-directory",
        &pebble.directory_url(),
        "--acme-ca-file",
        pebble.listener_pki.ca().to_str().unwrap(),
        "--acme-email",
        "dev@example.test",
    ]);
    let app_dir = env.home.path().join("shop");
    let app_dir = app_dir.to_str().unwrap();
    env.em(&["init", app_dir, "--template", "python"]);
    env.em(&["deploy", app_dir]);
    env.em(&["domains", "add", DOMAIN, "--app", "shop"]);

    // The name is served over HTTPS under Pebble's certificate once Beacon's order is done.
    let root = pebble_root(&pebble, env.home.path());
    let start = Instant::now();
    let h2 = loop {
        let got = get_https(&env, &root, "--http2");
        if got.ok {
            break got;
        }
        assert!(
            start.elapsed() < WAIT,
            "https://{DOMAIN}/ never served under Pebble's certificate: {}",
            got.stderr
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(h2.stdout.contains("Hello from Platform.X"), "{}", h2.stdout);
    assert!(h2.stdout.contains("\nversion=2\n"), "{}", h2.stdout);
    assert!(
        h2.stderr.contains("issuer: CN=Pebble Intermediate CA"),
        "{}",
        h2.stderr
    );
    let h1 = get_https(&env, &root, "--http1.1");
    assert!(h1.ok, "{}", h1.stderr);
    assert!(h1.stdout.contains("Hello from Platform.X"), "{}", h1.stdout);
    assert!(h1.stdout.contains("\nversion=1.1\n"), "{}", h1.stdout);
    let issued_serial = serial(&h2);
    assert_eq!(serial(&h1), issued_serial);

    // `em domains list` shows it valid, with its expiry and issuer.
    let list = String::from_utf8(env.em(&["domains", "list", "--app", "shop"]).stdout).unwrap();
    let row: Vec<&str> = list
        .lines()
        .find(|l| l.starts_with(DOMAIN))
        .unwrap_or_else(|| panic!("{list}"))
        .split_whitespace()
        .collect();
    assert_eq!(row[..3], [DOMAIN, "added", "issued"], "{list}");
    let today = &humantime::format_rfc3339(std::time::SystemTime::now()).to_string()[..10];
    assert!(row[3].len() == 10 && row[3] > today, "{list}");
    assert_eq!(row[4..7], ["CN=Pebble", "Intermediate", "CA"], "{list}");

    // Plain HTTP to the name goes to HTTPS, on em up's HTTPS port, path and query kept.
    let redirect = curl(&[
        "--resolve",
        &format!("{DOMAIN}:{}:127.0.0.1", env.http_port),
        "--output",
        "/dev/null",
        "--write-out",
        "%{http_code} %{redirect_url}",
        &format!("http://{DOMAIN}:{}/notes?page=2", env.http_port),
    ]);
    assert_eq!(
        redirect.stdout,
        format!("308 https://{DOMAIN}:{}/notes?page=2", env.https_port)
    );

    // Stopped and started again, several times, with no ACME flag (they are remembered): the
    // same certificate serves at once after each start, and Pebble is sent no new order.
    let orders = pebble.orders();
    assert_eq!(orders, 1, "{}", pebble.log());
    let mut up = up;
    for restart in 1..=RESTARTS {
        stop(up);
        up = env.up(&[]);
        let again = get_https(&env, &root, "--http2");
        assert!(again.ok, "after restart {restart}: {}", again.stderr);
        assert_eq!(serial(&again), issued_serial, "after restart {restart}");
        // Beacon has read the app again, so its ACME passes see the name.
        let start = Instant::now();
        while !String::from_utf8(env.em(&["domains", "list", "--app", "shop"]).stdout)
            .unwrap()
            .contains("shop.localhost")
        {
            assert!(
                start.elapsed() < WAIT,
                "the Beacon of restart {restart} never served shop"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        assert_eq!(
            pebble.orders(),
            orders,
            "after restart {restart}: {}",
            pebble.log()
        );
    }
    // A name added after the restarts is ordered and served: the restarted Beacon's passes
    // over the app's names ran, and the one order they sent is the new name's.
    env.em(&["domains", "add", LATER_DOMAIN, "--app", "shop"]);
    let start = Instant::now();
    loop {
        let got = get_https_for(&env, &root, LATER_DOMAIN, "--http2");
        if got.ok {
            assert!(
                got.stdout.contains("Hello from Platform.X"),
                "{}",
                got.stdout
            );
            break;
        }
        assert!(
            start.elapsed() < WAIT,
            "https://{LATER_DOMAIN}/ never served after the restarts: {}",
            got.stderr
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(pebble.orders(), orders + 1, "{}", pebble.log());
    let still = get_https(&env, &root, "--http2");
    assert!(still.ok, "{}", still.stderr);
    assert_eq!(serial(&still), issued_serial);
    stop(up);

    // With ACME forgotten there is no HTTPS listener, so plain HTTP serves the name again
    // instead of sending browsers to a port nobody answers.
    let up = env.up(&["--no-acme"]);
    let http = format!("{DOMAIN}:{}:127.0.0.1", env.http_port);
    let url = format!("http://{DOMAIN}:{}/", env.http_port);
    let start = Instant::now();
    let plain = loop {
        let got = curl(&["--resolve", &http, "--write-out", "\n%{http_code}", &url]);
        if got.stdout.ends_with("\n200") {
            break got;
        }
        assert!(
            start.elapsed() < WAIT,
            "{url}: {} {}",
            got.stdout,
            got.stderr
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        plain.stdout.contains("Hello from Platform.X"),
        "{}",
        plain.stdout
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", env.https_port)).is_err(),
        "the HTTPS port still answers"
    );
    stop(up);
}

#[test]
fn em_up_answers_tls_alpn_01_on_its_https_port() {
    let env = Env::new();
    // Pebble's HTTP-01 checks would go to a port nobody serves: only the TLS-ALPN-01 check on
    // em up's HTTPS port can succeed.
    let Some(pebble) = Pebble::start(px_test_support::free_port(), env.https_port) else {
        return;
    };
    let up = env.up(&[
        "--acme-directory",
        &pebble.directory_url(),
        "--acme-ca-file",
        pebble.listener_pki.ca().to_str().unwrap(),
        "--acme-challenge",
        "tls-alpn-01",
    ]);
    let app_dir = env.home.path().join("shop");
    let app_dir = app_dir.to_str().unwrap();
    env.em(&["init", app_dir, "--template", "python"]);
    env.em(&["deploy", app_dir]);
    env.em(&["domains", "add", DOMAIN, "--app", "shop"]);
    let root = pebble_root(&pebble, env.home.path());
    let start = Instant::now();
    loop {
        let got = get_https(&env, &root, "--http2");
        if got.ok {
            assert!(
                got.stdout.contains("Hello from Platform.X"),
                "{}",
                got.stdout
            );
            break;
        }
        assert!(
            start.elapsed() < WAIT,
            "https://{DOMAIN}/ never served under Pebble's certificate: {}",
            got.stderr
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    stop(up);
}

#[test]
fn a_taken_https_port_is_named_before_anything_starts() {
    let env = Env::new();
    let taken = std::net::TcpListener::bind(("127.0.0.1", env.https_port)).unwrap();
    let out = env
        .command(&[
            "up",
            "--http-port",
            &env.http_port.to_string(),
            "--port-base",
            &env.port_base.to_string(),
            "--https-port",
            &env.https_port.to_string(),
            "--acme-directory",
            "https://127.0.0.1:14000/dir",
        ])
        .output()
        .unwrap();
    drop(taken);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "port {} (the HTTPS app proxy) is taken; is another `em up` running? Stop it, or pass --https-port to use other ports",
            env.https_port
        )),
        "{err}"
    );
}

/// How long Pebble's certificates last in the renewal test: renewal comes at two thirds
/// (Pebble offers no renewal information), so the test sees it within a minute.
const SHORT_VALIDITY: Duration = Duration::from_secs(60);

#[test]
fn em_up_renews_a_short_lived_certificate_before_it_expires_without_a_failed_request() {
    let env = Env::new();
    let Some(pebble) = Pebble::start_with(
        env.http_port,
        env.https_port,
        PebbleOptions {
            certificate_validity: Some(SHORT_VALIDITY),
        },
    ) else {
        return;
    };
    let up = env.up(&[
        "--acme-directory",
        &pebble.directory_url(),
        "--acme-ca-file",
        pebble.listener_pki.ca().to_str().unwrap(),
    ]);
    let app_dir = env.home.path().join("shop");
    let app_dir = app_dir.to_str().unwrap();
    env.em(&["init", app_dir, "--template", "python"]);
    env.em(&["deploy", app_dir]);
    env.em(&["domains", "add", DOMAIN, "--app", "shop"]);
    let root = pebble_root(&pebble, env.home.path());
    let start = Instant::now();
    let first = loop {
        let got = get_https(&env, &root, "--http2");
        if got.ok {
            break serial(&got);
        }
        assert!(start.elapsed() < WAIT, "never served: {}", got.stderr);
        std::thread::sleep(Duration::from_millis(200));
    };
    // From the first certificate on, every request succeeds under a valid certificate (curl
    // refuses an expired one) until another serial is served: renewed before it expired.
    let served = Instant::now();
    let mut requests = 0;
    let renewed = loop {
        let got = get_https(&env, &root, "--http2");
        requests += 1;
        assert!(
            got.ok,
            "request {requests}, {:?} after the first certificate, failed: {}",
            served.elapsed(),
            got.stderr
        );
        let now = serial(&got);
        if now != first {
            break now;
        }
        assert!(
            served.elapsed() < SHORT_VALIDITY + WAIT,
            "{first} was never renewed; Pebble: {}",
            pebble.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    eprintln!(
        "renewed {:?} after the first certificate was served ({requests} requests, none failed): {first} -> {renewed}",
        served.elapsed()
    );
    assert_eq!(pebble.orders(), 2, "{}", pebble.log());
    stop(up);
}
