//! Headless Chromium behind ChromeDriver, started per test, trusting only the root
//! certificates the test names: they go into an NSS database under a home directory of the
//! browser's own, which is where Chromium on Linux reads trust anchors a user added. Chromium's
//! built-in root store still applies, but no public CA issues for test names, so a page loads
//! only under a chain to one of those roots (a certificate error is never ignored wholesale).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::{free_port, wait_for_port};

/// Set by `scripts/test`: browser tests fail instead of skipping when Chromium, ChromeDriver or
/// NSS's `certutil` is missing.
pub const REQUIRE_CHROMIUM_ENV: &str = "PX_REQUIRE_CHROMIUM";
/// How long ChromeDriver may take to listen once spawned.
const DRIVER_START_LIMIT: Duration = Duration::from_secs(30);

/// A running ChromeDriver (and the Chromium it launches), killed on drop.
pub struct ChromeDriver {
    /// ChromeDriver's WebDriver endpoint on 127.0.0.1.
    pub port: u16,
    /// The Chromium binary a session must name (`goog:chromeOptions.binary`).
    pub chromium: PathBuf,
    child: Child,
    home: tempfile::TempDir,
}

fn find(binaries: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| binaries.iter().map(move |b| dir.join(b)))
        .find(|p| p.is_file())
}

impl ChromeDriver {
    /// Starts ChromeDriver with a home whose NSS database trusts `roots_pem` (PEM certificates)
    /// as certificate authorities for servers, or returns `None` (after saying so loudly) when a
    /// tool is missing and [`REQUIRE_CHROMIUM_ENV`] is not set.
    pub fn start(roots_pem: &[&[u8]]) -> Option<Self> {
        let chromium = find(&["chromium", "chromium-browser"]);
        let driver = find(&["chromedriver"]);
        let certutil = find(&["certutil"]);
        let (Some(chromium), Some(driver), Some(certutil)) = (chromium, driver, certutil) else {
            let message = "chromium, chromedriver (Debian's chromium-driver) and certutil (libnss3-tools) are needed";
            if std::env::var_os(REQUIRE_CHROMIUM_ENV).is_some() {
                panic!(
                    "{REQUIRE_CHROMIUM_ENV} is set but {message}; install them with scripts/install-test-tools"
                );
            }
            eprintln!(
                "SKIPPING browser test: {message} (run scripts/install-test-tools, or set {REQUIRE_CHROMIUM_ENV}=1 to make this fail)"
            );
            return None;
        };
        Some(
            Self::spawn(chromium, &driver, &certutil, roots_pem)
                .unwrap_or_else(|e| panic!("starting chromedriver: {e:#}")),
        )
    }

    fn spawn(
        chromium: PathBuf,
        driver: &Path,
        certutil: &Path,
        roots_pem: &[&[u8]],
    ) -> Result<Self> {
        let home = tempfile::tempdir()?;
        let nssdb = home.path().join(".pki/nssdb");
        std::fs::create_dir_all(&nssdb)?;
        let db = format!("sql:{}", nssdb.display());
        run(Command::new(certutil).args(["-N", "--empty-password", "-d", &db]))?;
        for (i, pem) in roots_pem.iter().enumerate() {
            let file = home.path().join(format!("root-{i}.pem"));
            std::fs::write(&file, pem)?;
            // "C,,": a CA trusted to issue server certificates, nothing else.
            run(Command::new(certutil)
                .args([
                    "-A",
                    "-t",
                    "C,,",
                    "-n",
                    &format!("test-root-{i}"),
                    "-d",
                    &db,
                    "-i",
                ])
                .arg(&file))?;
        }
        let port = free_port();
        let child = Command::new(driver)
            .arg(format!("--port={port}"))
            .arg(format!(
                "--log-path={}",
                home.path().join("chromedriver.log").display()
            ))
            .env("HOME", home.path())
            // A group of its own, so that drop ends the Chromium it launched too, even when a
            // failed test never closed its session.
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning chromedriver")?;
        let this = Self {
            port,
            chromium,
            child,
            home,
        };
        wait_for_port(port, DRIVER_START_LIMIT)?;
        Ok(this)
    }

    /// The WebDriver endpoint.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// ChromeDriver's log so far, for a failing test's message.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.home.path().join("chromedriver.log")).unwrap_or_default()
    }
}

fn run(command: &mut Command) -> Result<()> {
    let out = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    if !out.status.success() {
        bail!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        // The group's id is ChromeDriver's own (process_group(0)).
        if let Ok(id) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(id),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.child.wait();
    }
}
