//! Pebble, the ACME test server, with pebble-challtestsrv as its DNS server answering every
//! name with 127.0.0.1, so any test host name validates against this machine. Pebble sends its
//! HTTP-01 and TLS-ALPN-01 checks to the ports a test names (the proxy's).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::{Pki, free_port, wait_for_port};

/// Set by `scripts/test`: tests that need Pebble fail instead of skipping when it is missing.
pub const REQUIRE_PEBBLE_ENV: &str = "PX_REQUIRE_PEBBLE";

/// Pebble's output, in its directory: what it was asked and what it issued.
const LOG_FILE: &str = "pebble.log";

/// How a test wants Pebble to issue; the default is Pebble's own (5-year certificates).
#[derive(Debug, Clone, Copy, Default)]
pub struct PebbleOptions {
    /// How long an issued certificate is valid (Pebble's `certificateValidityPeriod`, whole
    /// seconds): short, so a test sees a certificate renewed before it expires.
    pub certificate_validity: Option<Duration>,
}

/// A running Pebble and its DNS server, stopped on drop.
pub struct Pebble {
    /// The CA of Pebble's own HTTPS listener (directory and management API).
    pub listener_pki: Pki,
    pub port: u16,
    pub management_port: u16,
    children: Vec<Child>,
    dir: tempfile::TempDir,
}

fn find(binary: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(binary))
            .find(|p| p.is_file())
    })
}

impl Pebble {
    /// Starts Pebble validating HTTP-01 on `http_port` and TLS-ALPN-01 on `tls_port` of
    /// 127.0.0.1, or returns `None` (after saying so loudly) when it is not installed and
    /// [`REQUIRE_PEBBLE_ENV`] is not set.
    pub fn start(http_port: u16, tls_port: u16) -> Option<Self> {
        Self::start_with(http_port, tls_port, PebbleOptions::default())
    }

    /// [`Pebble::start`] issuing as `options` says.
    pub fn start_with(http_port: u16, tls_port: u16, options: PebbleOptions) -> Option<Self> {
        let (Some(pebble), Some(challtestsrv)) = (find("pebble"), find("pebble-challtestsrv"))
        else {
            if std::env::var_os(REQUIRE_PEBBLE_ENV).is_some() {
                panic!(
                    "{REQUIRE_PEBBLE_ENV} is set but pebble was not found; install it with scripts/install-test-tools"
                );
            }
            eprintln!(
                "SKIPPING ACME test: pebble not found (run scripts/install-test-tools, or set {REQUIRE_PEBBLE_ENV}=1 to make this fail)"
            );
            return None;
        };
        Some(
            Self::spawn(&pebble, &challtestsrv, http_port, tls_port, options)
                .unwrap_or_else(|e| panic!("starting pebble: {e:#}")),
        )
    }

    fn spawn(
        pebble: &Path,
        challtestsrv: &Path,
        http_port: u16,
        tls_port: u16,
        options: PebbleOptions,
    ) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let listener_pki = Pki::new(&["127.0.0.1", "localhost"])?;
        let (port, management_port, dns_port, dns_management_port) =
            (free_port(), free_port(), free_port(), free_port());
        let config = dir.path().join("pebble.json");
        // Pebble 2.4 (Debian's) reads the validity in seconds; unset, it issues for 5 years.
        let validity = options
            .certificate_validity
            .map(|v| format!(r#","certificateValidityPeriod":{}"#, v.as_secs().max(1)))
            .unwrap_or_default();
        std::fs::write(
            &config,
            format!(
                r#"{{"pebble":{{"listenAddress":"127.0.0.1:{port}","managementListenAddress":"127.0.0.1:{management_port}","certificate":"{}","privateKey":"{}","httpPort":{http_port},"tlsPort":{tls_port},"ocspResponderURL":"","externalAccountBindingRequired":false{validity}}}}}"#,
                listener_pki.cert().display(),
                listener_pki.key().display()
            ),
        )?;
        let mut children = Vec::new();
        children.push(
            Command::new(challtestsrv)
                .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
                .args(["-dns01", &format!("127.0.0.1:{dns_port}")])
                .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
                .args(["-management", &format!("127.0.0.1:{dns_management_port}")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("spawning pebble-challtestsrv")?,
        );
        let mut this = Self {
            listener_pki,
            port,
            management_port,
            children,
            dir,
        };
        wait_for_port(dns_port, Duration::from_secs(20))?;
        let log = std::fs::File::create(this.dir.path().join(LOG_FILE))?;
        this.children.push(
            Command::new(pebble)
                .arg("-config")
                .arg(&config)
                .args(["-dnsserver", &format!("127.0.0.1:{dns_port}")])
                // No random sleep before validating, and no nonce rejected on purpose: the tests
                // check what Beacon does, not how it rides out Pebble's chaos.
                .env("PEBBLE_VA_NOSLEEP", "1")
                .env("PEBBLE_WFE_NONCEREJECT", "0")
                // Every order is validated afresh (Pebble reuses half of its valid
                // authorizations by default): a renewal proves the cluster still answers.
                .env("PEBBLE_AUTHZREUSE", "0")
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("spawning pebble")?,
        );
        wait_for_port(port, Duration::from_secs(20))?;
        wait_for_port(management_port, Duration::from_secs(20))?;
        Ok(this)
    }

    /// The ACME directory URL.
    pub fn directory_url(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.port)
    }

    /// Pebble's log so far (its WFE logs every request it serves, e.g. `POST /order-plz`).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join(LOG_FILE)).unwrap_or_default()
    }

    /// How many new orders Pebble has been sent (RFC 8555 §7.4's `newOrder`).
    pub fn orders(&self) -> usize {
        self.log()
            .lines()
            .filter(|line| line.contains("POST /order-plz"))
            .count()
    }

    /// Where the root that signs issued certificates is served (PEM), over HTTPS under
    /// [`Pebble::listener_pki`]'s CA.
    pub fn root_url(&self) -> String {
        format!("https://127.0.0.1:{}/roots/0", self.management_port)
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
