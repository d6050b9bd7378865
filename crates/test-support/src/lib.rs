//! Helpers for Platform.X integration tests: a real S3-compatible server (s3s-fs) started per
//! test on loopback, throwaway certificates, sample apps, free ports, systemd played by its
//! own tools (`systemd`), Pebble, the ACME test server (`pebble`), headless Chromium behind
//! ChromeDriver, trusting only the roots a test names (`browser`), and SeaweedFS, an S3 server
//! that honours conditional writes (`seaweed`).

pub mod browser;
pub mod pebble;
pub mod seaweed;
pub mod systemd;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Set by `.ci/run` (and the README's test command): tests that need an S3 server fail
/// instead of skipping when the server binary is missing.
pub const REQUIRE_S3_ENV: &str = "PX_REQUIRE_S3";
/// Path of the `s3s-fs` binary; defaults to the one on `PATH` or in `~/.cargo/bin`.
pub const S3S_FS_ENV: &str = "PX_S3S_FS";

pub const S3_ACCESS_KEY: &str = "PXTESTACCESSKEY";
pub const S3_SECRET_KEY: &str = "pxtestsecretkey0123456789";

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port: {e}"))
}

fn find_s3s_fs() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(S3S_FS_ENV) {
        return Some(path.into());
    }
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("s3s-fs"))
                .collect()
        })
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(Path::new(&home).join(".cargo/bin/s3s-fs"));
    }
    candidates.into_iter().find(|p| p.is_file())
}

/// An s3s-fs server on loopback with its own data directory, stopped on drop.
pub struct S3Server {
    binary: PathBuf,
    data: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
}

impl S3Server {
    /// Starts a server with one bucket, or returns `None` (after saying so loudly) when the
    /// binary is missing and [`REQUIRE_S3_ENV`] is not set.
    pub fn start(bucket: &str) -> Option<Self> {
        let Some(binary) = find_s3s_fs() else {
            if std::env::var_os(REQUIRE_S3_ENV).is_some() {
                panic!(
                    "{REQUIRE_S3_ENV} is set but s3s-fs was not found; install it with .ci/run or set {S3S_FS_ENV}"
                );
            }
            eprintln!(
                "SKIPPING S3 test: s3s-fs not found (run `.ci/run`, or set {REQUIRE_S3_ENV}=1 to make this fail)"
            );
            return None;
        };
        let data = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        // s3s-fs serves each directory of its root as a bucket.
        std::fs::create_dir(data.path().join(bucket)).unwrap_or_else(|e| panic!("bucket dir: {e}"));
        let mut server = Self {
            binary,
            data,
            port: free_port(),
            child: None,
        };
        server
            .resume()
            .unwrap_or_else(|e| panic!("starting s3s-fs: {e:#}"));
        Some(server)
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn data_dir(&self) -> &Path {
        self.data.path()
    }

    /// Stops the server (SIGKILL), keeping its data, so tests can see S3 become unreachable.
    pub fn pause(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and data.
    pub fn resume(&mut self) -> Result<()> {
        let child = Command::new(&self.binary)
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", S3_ACCESS_KEY, "--secret-key", S3_SECRET_KEY])
            .arg(self.data.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("spawning {}", self.binary.display()))?;
        self.child = Some(child);
        wait_for_port(self.port, Duration::from_secs(20))
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.pause();
    }
}

/// Waits until something accepts TCP connections on `127.0.0.1:port`.
pub fn wait_for_port(port: u16, limit: Duration) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("nothing listening on 127.0.0.1:{port} after {limit:?}")
}

/// Writes a small runnable app (`app.toml`, a server script, a static asset) into `dir`.
pub fn write_sample_app(dir: &Path, name: &str) -> Result<()> {
    std::fs::create_dir_all(dir.join("public"))?;
    std::fs::write(
        dir.join("app.toml"),
        format!(
            "name = \"{name}\"\nrun = \"python3 server.py\"\n[health]\npath = \"/healthz\"\n[http]\nstatic = {{ \"/assets\" = \"public\" }}\n[env]\nGREETING = \"hello\"\n"
        ),
    )?;
    std::fs::write(
        dir.join("server.py"),
        "import os, http.server\nclass H(http.server.BaseHTTPRequestHandler):\n    def do_GET(self):\n        self.send_response(200); self.end_headers(); self.wfile.write(os.environ.get('GREETING','hi').encode())\nhttp.server.HTTPServer(('127.0.0.1', int(os.environ['PORT'])), H).serve_forever()\n",
    )?;
    std::fs::write(dir.join("public/style.css"), "body { color: teal }\n")?;
    Ok(())
}

/// A throwaway CA and one server certificate, as PEM files in a temporary directory.
pub struct Pki {
    pub dir: tempfile::TempDir,
}

impl Pki {
    /// Makes a CA and a certificate for `names` (DNS names or IP addresses).
    pub fn new(names: &[&str]) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let ca_key = rcgen::KeyPair::generate()?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Platform.X test CA");
        let ca = ca_params.self_signed(&ca_key)?;
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate()?;
        let params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        let cert = params.signed_by(&key, &issuer)?;
        std::fs::write(dir.path().join("ca.pem"), ca.pem())?;
        std::fs::write(dir.path().join("cert.pem"), cert.pem())?;
        // Owner-only, as the services require of a private key.
        let key_path = dir.path().join("key.pem");
        std::fs::write(&key_path, key.serialize_pem())?;
        std::fs::set_permissions(
            &key_path,
            <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600),
        )?;
        Ok(Self { dir })
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }
    pub fn cert(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }
    pub fn key(&self) -> PathBuf {
        self.dir.path().join("key.pem")
    }
}
