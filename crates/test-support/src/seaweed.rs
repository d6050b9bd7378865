//! SeaweedFS (`weed mini`), a second S3-compatible server, started per test on loopback. Unlike
//! s3s-fs it honours conditional writes as AWS S3 does (`PutObject` with `If-None-Match: *` and
//! with `If-Match` answer 412 when they do not hold, atomically), so tests of several
//! apprepos sharing one bucket run against it.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{REQUIRE_S3_ENV, S3_ACCESS_KEY, S3_SECRET_KEY, free_port};

/// Path of the `weed` binary; defaults to the one `scripts/install-test-tools` links into
/// `~/.cache/platformx/bin`, then the `PATH`.
pub const SEAWEEDFS_ENV: &str = "PX_SEAWEEDFS";
/// How long `weed mini` may take to answer S3 and make the bucket (about 2 s when idle).
const START_LIMIT: Duration = Duration::from_secs(60);
/// How long one readiness probe waits for its answer: the filer holds a write until it finds
/// a volume for it.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// How many times a server that exits while starting (a port taken meanwhile) is started again.
const START_ATTEMPTS: u32 = 3;
/// Lines of `weed`'s log given with a failure to start.
const LOG_TAIL_LINES: usize = 20;

/// `weed` exited before it served.
#[derive(Debug)]
struct Exited(std::process::ExitStatus);

impl std::fmt::Display for Exited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "weed exited while starting ({})", self.0)
    }
}

impl std::error::Error for Exited {}

/// A free port for each of `weed mini`'s servers, by flag. Every port named, so several
/// servers (one per test) run side by side; each gRPC port would otherwise be its HTTP port +
/// 10000.
fn pick_ports() -> Vec<(&'static str, u16)> {
    [
        "master.port",
        "master.port.grpc",
        "volume.port",
        "volume.port.grpc",
        "filer.port",
        "filer.port.grpc",
        "s3.port",
        "s3.port.grpc",
        "admin.port",
        "admin.port.grpc",
    ]
    .into_iter()
    .map(|flag| (flag, free_port()))
    .collect()
}

/// The file in the log directory that holds `weed`'s standard error.
const STDERR_FILE: &str = "stderr";

/// The last [`LOG_TAIL_LINES`] of what `weed` wrote to its standard error and of its warnings,
/// in `logs`.
fn log_tail(logs: &Path) -> String {
    let tails: Vec<String> = [STDERR_FILE, "weed.WARNING"]
        .into_iter()
        .filter_map(|name| {
            let text = std::fs::read_to_string(logs.join(name)).ok()?;
            let lines: Vec<&str> = text.lines().collect();
            (!lines.is_empty()).then(|| {
                let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
                format!("its {name} ends:\n{tail}")
            })
        })
        .collect();
    if tails.is_empty() {
        return format!("nothing in its log ({})", logs.display());
    }
    tails.join("\n")
}

fn find_weed() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(SEAWEEDFS_ENV) {
        return Some(path.into());
    }
    let mut candidates = Vec::new();
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(Path::new(&home).join(".cache/platformx/bin/weed"));
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("weed")));
    }
    candidates.into_iter().find(|p| p.is_file())
}

/// A `weed mini` server (master, volume, filer and S3 gateway in one process) on loopback
/// with one bucket and its own data directory, stopped on drop.
pub struct SeaweedServer {
    _data: tempfile::TempDir,
    pub s3_port: u16,
    child: Child,
}

impl SeaweedServer {
    /// Starts a server with `bucket`, or returns `None` (after saying so loudly) when the
    /// binary is missing and [`REQUIRE_S3_ENV`] is not set.
    pub fn start(bucket: &str) -> Option<Self> {
        let Some(binary) = find_weed() else {
            if std::env::var_os(REQUIRE_S3_ENV).is_some() {
                panic!(
                    "{REQUIRE_S3_ENV} is set but SeaweedFS (weed) was not found; install it with scripts/install-test-tools or set {SEAWEEDFS_ENV}"
                );
            }
            eprintln!(
                "SKIPPING SeaweedFS test: weed not found (run scripts/install-test-tools, or set {REQUIRE_S3_ENV}=1 to make this fail)"
            );
            return None;
        };
        let mut attempt = 1;
        loop {
            match Self::spawn(&binary, bucket, &pick_ports()) {
                Ok(server) => return Some(server),
                // The ports are picked free and then released, so another process may take
                // one before `weed` binds it; `weed` then exits, and fresh ports are tried.
                Err(e) if e.is::<Exited>() && attempt < START_ATTEMPTS => {
                    eprintln!("SeaweedFS: {e:#}; trying again with other ports");
                    attempt += 1;
                }
                Err(e) => panic!("starting SeaweedFS: {e:#}"),
            }
        }
    }

    fn spawn(binary: &Path, bucket: &str, ports: &[(&str, u16)]) -> Result<Self> {
        let data = tempfile::tempdir()?;
        let dir = data.path();
        std::fs::create_dir_all(dir.join("data"))?;
        std::fs::create_dir_all(dir.join("logs"))?;
        let identities = format!(
            r#"{{"identities":[{{"name":"px","credentials":[{{"accessKey":"{S3_ACCESS_KEY}","secretKey":"{S3_SECRET_KEY}"}}],"actions":["Admin","Read","Write","List","Tagging"]}}]}}"#
        );
        std::fs::write(dir.join("s3.json"), identities)?;
        let port = |name: &str| ports.iter().find(|(f, _)| *f == name).map(|(_, p)| *p);
        let (s3_port, filer_port) = (
            port("s3.port").unwrap_or(0),
            port("filer.port").unwrap_or(0),
        );
        let child = Command::new(binary)
            // `-logdir` is a global flag: before the command.
            .arg(format!("-logdir={}", dir.join("logs").display()))
            .arg("mini")
            .arg(format!("-dir={}", dir.join("data").display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .args(ports.iter().map(|(flag, port)| format!("-{flag}={port}")))
            .arg(format!("-s3.config={}", dir.join("s3.json").display()))
            .args([
                "-master.telemetry=false",
                "-webdav=false",
                "-admin.ui=false",
            ])
            .args(["-s3.port.iceberg=0", "-s3.port.lance=0"])
            .env("TMPDIR", dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            // Where `weed` says why it exits (a port it cannot bind), which its log files do not.
            .stderr(std::fs::File::create(dir.join("logs").join(STDERR_FILE))?)
            .spawn()
            .with_context(|| format!("spawning {}", binary.display()))?;
        let logs = dir.join("logs");
        let mut server = Self {
            _data: data,
            s3_port,
            child,
        };
        // A bucket is a directory under the filer's `/buckets`; the filer answers once the
        // master and volume server are up, and the S3 gateway once the filer is.
        // S3 answers before the volume server has joined the master, and writes fail with
        // 500 until it has: a file written through the filer (and removed) shows it has.
        let start = Instant::now();
        let mut made = false;
        let probe = format!("/buckets/{bucket}/.px-probe");
        loop {
            made = made
                || http_status(filer_port, "POST", &format!("/buckets/{bucket}/"), b"")
                    .is_ok_and(|s| s == 201);
            if made
                && http_status(filer_port, "PUT", &probe, b"probe").is_ok_and(|s| s == 201)
                && http_status(filer_port, "DELETE", &probe, b"").is_ok_and(|s| s < 300)
                && http_status(s3_port, "GET", "/", b"").is_ok_and(|s| s == 403)
            {
                return Ok(server);
            }
            if let Some(status) = server.child.try_wait()? {
                return Err(anyhow::Error::new(Exited(status)).context(log_tail(&logs)));
            }
            if start.elapsed() > START_LIMIT {
                bail!(
                    "SeaweedFS did not serve S3 with bucket {bucket} within {START_LIMIT:?}; {}",
                    log_tail(&logs)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }
}

impl Drop for SeaweedServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The status code of a request with `body` to `127.0.0.1:port`.
fn http_status(port: u16, method: &str, path: &str, body: &[u8]) -> Result<u16> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(PROBE_TIMEOUT))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    stream.write_all(body)?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head)?;
    let line = String::from_utf8_lossy(&head);
    line.get(9..12)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("not an HTTP answer: {line:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_whose_port_is_taken_is_told_apart_from_a_slow_one_and_says_why() {
        let Some(weed) = find_weed() else {
            assert!(
                std::env::var_os(REQUIRE_S3_ENV).is_none(),
                "{REQUIRE_S3_ENV} is set but SeaweedFS (weed) was not found"
            );
            eprintln!("SKIPPING: weed not found");
            return;
        };
        // Another process took the S3 port after it was picked.
        let mut ports = pick_ports();
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let taken_port = taken.local_addr().unwrap().port();
        for (flag, port) in &mut ports {
            if *flag == "s3.port" {
                *port = taken_port;
            }
        }
        let started = Instant::now();
        let error = SeaweedServer::spawn(&weed, "px-test", &ports)
            .err()
            .expect("a server that could not bind its port was taken as started");
        assert!(error.is::<Exited>(), "{error:#}");
        let message = format!("{error:#}");
        assert!(message.contains("weed exited while starting"), "{message}");
        assert!(message.contains(&taken_port.to_string()), "{message}");
        assert!(
            started.elapsed() < START_LIMIT,
            "the exit was noticed only at the start limit"
        );
    }

    #[test]
    fn the_log_tail_is_the_last_lines_of_stderr_and_the_warnings() {
        let logs = tempfile::tempdir().unwrap();
        let lines: Vec<String> = (0..30).map(|i| format!("line {i}")).collect();
        std::fs::write(logs.path().join("weed.WARNING"), lines.join("\n")).unwrap();
        std::fs::write(logs.path().join("weed.INFO"), "info only").unwrap();
        std::fs::write(
            logs.path().join(STDERR_FILE),
            "E1207 port 1 is not available",
        )
        .unwrap();
        let tail = log_tail(logs.path());
        assert!(
            tail.contains("its stderr ends:\nE1207 port 1 is not available"),
            "{tail}"
        );
        assert!(tail.ends_with("line 29"), "{tail}");
        assert!(
            tail.contains(&format!("line {}", 30 - LOG_TAIL_LINES)),
            "{tail}"
        );
        assert!(
            !tail.contains(&format!("line {}\n", 29 - LOG_TAIL_LINES)),
            "{tail}"
        );
        assert!(!tail.contains("info only"), "{tail}");
    }
}
