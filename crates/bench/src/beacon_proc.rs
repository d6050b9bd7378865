//! The system under test: the real `beacon` binary as a child process with a config file
//! written here, optionally pinned to CPUs with `taskset`, plus the few HTTP calls the
//! benchmark makes to it (`/healthz`, `/v1/apps`, `/metrics`) on a minimal HTTP/1.1 client.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

/// How long Beacon gets to answer `/healthz` and to read the desired state after it starts.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one HTTP call to Beacon may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest HTTP answer read; `/v1/apps` and `/metrics` are a few KiB here.
const MAX_HTTP_RESPONSE: u64 = 1024 * 1024;
/// Lines of Beacon's log quoted in an error.
const LOG_TAIL_LINES: usize = 25;

/// The tokens Beacon is configured with (their SHA-256 goes into its config).
#[derive(Debug, Clone)]
pub struct Tokens {
    /// For Beacon's HTTP API (`/v1/apps`).
    pub read: String,
    /// What every simulated Maestro presents.
    pub maestro: String,
    /// What the repository link presents.
    pub repository: String,
    /// Beacon's token for the repository stub.
    pub repo_read: String,
}

impl Tokens {
    pub fn generate() -> Self {
        use px_runtime::tokens::generate;
        Self {
            read: generate(),
            maestro: generate(),
            repository: generate(),
            repo_read: generate(),
        }
    }
}

/// Where Beacon's TLS material is.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub struct BeaconProcess {
    /// Killed when dropped, so an error anywhere in the benchmark stops Beacon too.
    child: Child,
    pub pid: u32,
    pub http: SocketAddr,
    pub control: SocketAddr,
    pub log: PathBuf,
}

/// A loopback port that was free a moment ago. Beacon binds it itself, from its config file,
/// as it does in production; the short race with other processes is acceptable for a benchmark.
fn free_port() -> Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?)
}

/// A TOML basic string. JSON string escapes (`\"`, `\\`, `\n`, `\u00XX`) are all valid TOML
/// escapes, so serde_json writes paths with any characters correctly.
fn toml_string(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

fn path_string(path: &Path) -> Result<String> {
    path.to_str()
        .map(toml_string)
        .ok_or_else(|| anyhow!("path {} is not UTF-8", path.display()))
}

impl BeaconProcess {
    /// Writes a config into `dir` and starts `binary` on it (through `taskset -c <cpus>` when
    /// `cpus` is given), with its log in `dir/beacon.log`.
    pub fn spawn(
        binary: &Path,
        cpus: Option<&str>,
        dir: &Path,
        tls: &TlsFiles,
        tokens: &Tokens,
        repository_url: &str,
    ) -> Result<Self> {
        use px_runtime::tokens::hash;
        let http = free_port()?;
        let control = free_port()?;
        let repo_token_file = dir.join("repo-token");
        px_runtime::secrets::write_secret_file(&repo_token_file, &tokens.repo_read)
            .context("writing Beacon's repository token file")?;
        // Only a release notice triggers the fan-out: the periodic reconcile must not run
        // during the benchmark. Nodes count as lost only after a minute of silence, so a
        // Beacon that falls behind shows up as lag in the figures, not as churn.
        let config = format!(
            "http_listen = \"{http}\"\ncontrol_listen = \"{control}\"\ndata_dir = {data}\n\
             tls_cert_file = {cert}\ntls_key_file = {key}\n\
             reconcile_interval = \"1h\"\nnode_lost_after = \"60s\"\n\n\
             [repository]\nurl = {url}\ntoken_file = {token_file}\n\n\
             [[tokens]]\nname = \"bench-read\"\nrole = \"read\"\nsha256 = \"{read}\"\n\n\
             [[tokens]]\nname = \"bench-maestro\"\nrole = \"maestro\"\nsha256 = \"{maestro}\"\n\n\
             [[tokens]]\nname = \"bench-repository\"\nrole = \"repository\"\nsha256 = \"{repository}\"\n",
            data = path_string(&dir.join("data"))?,
            cert = path_string(&tls.cert)?,
            key = path_string(&tls.key)?,
            url = toml_string(repository_url),
            token_file = path_string(&repo_token_file)?,
            read = hash(&tokens.read),
            maestro = hash(&tokens.maestro),
            repository = hash(&tokens.repository),
        );
        let config_path = dir.join("beacon.toml");
        std::fs::write(&config_path, config).context("writing Beacon's config")?;
        let log = dir.join("beacon.log");
        let log_file = std::fs::File::create(&log).context("creating Beacon's log file")?;
        let mut command = match cpus {
            Some(cpus) => {
                // taskset execs Beacon in place, so the child's pid is Beacon's own.
                let mut c = Command::new("taskset");
                c.arg("-c").arg(cpus).arg(binary);
                c
            }
            None => Command::new(binary),
        };
        command
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .kill_on_drop(true);
        let child = command.spawn().with_context(|| match cpus {
            Some(_) => format!("starting taskset {}", binary.display()),
            None => format!("starting {}", binary.display()),
        })?;
        let pid = child
            .id()
            .ok_or_else(|| anyhow!("beacon exited as soon as it started"))?;
        Ok(Self {
            child,
            pid,
            http,
            control,
            log,
        })
    }

    /// The last lines of Beacon's log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
        format!("last lines of {}:\n{tail}", self.log.display())
    }

    /// Fails, quoting the log, if Beacon has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("beacon exited ({status})\n{}", self.log_tail());
        }
        Ok(())
    }

    /// Waits until Beacon answers `/healthz` and has read the desired state, i.e. `/v1/apps`
    /// lists `app` at `release`: links opened after that get their assignment at once.
    pub async fn wait_ready(&mut self, read_token: &str, app: &str, release: u64) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut last_error = String::new();
        while Instant::now() < deadline {
            self.check_alive()?;
            match self.desired(read_token).await {
                Ok(apps) if apps.iter().any(|a| a.name == app && a.release == release) => {
                    return Ok(());
                }
                Ok(apps) => last_error = format!("/v1/apps lists {apps:?}"),
                Err(e) => last_error = format!("{e:#}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!(
            "beacon not ready after {START_TIMEOUT:?} ({last_error})\n{}",
            self.log_tail()
        )
    }

    async fn desired(&self, read_token: &str) -> Result<Vec<px_proto::beacon::App>> {
        let body = http_get(self.http, "/v1/apps", Some(read_token)).await?;
        serde_json::from_str(&body).context("parsing /v1/apps")
    }

    /// A counter or gauge from `/metrics`.
    pub async fn metric(&self, name: &str) -> Result<u64> {
        let body = http_get(self.http, "/metrics", None).await?;
        body.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .ok_or_else(|| anyhow!("/metrics has no {name}"))?
            .trim()
            .parse()
            .with_context(|| format!("/metrics: {name} is not a whole number"))
    }

    /// Stops Beacon (SIGKILL: its state is thrown away with the temporary directory).
    pub async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

/// `GET path` over HTTP/1.1 with `Connection: close`; the body of a 2xx answer, else an error.
/// Hand-written because the workspace has no HTTP client outside tests, and Beacon's answers
/// here are small, with a `Content-Length` or chunked.
pub async fn http_get(addr: SocketAddr, path: &str, bearer: Option<&str>) -> Result<String> {
    let exchange = async {
        let mut tcp = tokio::net::TcpStream::connect(addr).await?;
        let auth = bearer
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n");
        tcp.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        tcp.take(MAX_HTTP_RESPONSE)
            .read_to_end(&mut response)
            .await?;
        anyhow::Ok(response)
    };
    let response = tokio::time::timeout(HTTP_TIMEOUT, exchange)
        .await
        .map_err(|_| anyhow!("GET {path}: no answer in {HTTP_TIMEOUT:?}"))?
        .with_context(|| format!("GET http://{addr}{path}"))?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("GET {path}: truncated answer"))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("GET {path}: no status in {head:?}"))?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .replace(' ', "")
            .starts_with("transfer-encoding:chunked")
    });
    let body = if chunked {
        dechunk(body).ok_or_else(|| anyhow!("GET {path}: bad chunked body"))?
    } else {
        body.to_string()
    };
    if !(200..300).contains(&status) {
        bail!("GET {path}: HTTP {status}: {}", body.trim());
    }
    Ok(body)
}

/// Decodes a chunked body (no trailers expected).
fn dechunk(mut body: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size_line, rest) = body.split_once("\r\n")?;
        let size = usize::from_str_radix(size_line.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.push_str(rest.get(..size)?);
        body = rest.get(size..)?.strip_prefix("\r\n")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_decode() {
        assert_eq!(
            dechunk("4\r\nWiki\r\n6;x=y\r\npedia \r\n0\r\n\r\n").as_deref(),
            Some("Wikipedia ")
        );
        assert_eq!(dechunk("4\r\nWi"), None);
    }

    #[test]
    fn toml_strings_escape_quotes_and_backslashes() {
        assert_eq!(toml_string(r#"/tmp/a"b\c"#), r#""/tmp/a\"b\\c""#);
    }
}
