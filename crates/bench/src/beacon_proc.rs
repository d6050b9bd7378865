//! The system under test: the real `beacon` binary as a child process with a config file
//! written here, optionally pinned to CPUs with `taskset`, plus the few HTTP calls the
//! benchmark makes to it (`/v1/apps`, `/metrics`) with reqwest.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use tokio::process::{Child, Command};

/// How long Beacon gets to answer `/healthz` and to read the desired state after it starts.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one HTTP call to Beacon may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest HTTP answer read; `/v1/apps` and `/metrics` are a few KiB here.
const MAX_HTTP_RESPONSE: usize = 1024 * 1024;
/// Lines of Beacon's log quoted in an error.
const LOG_TAIL_LINES: usize = 25;

/// The tokens Beacon is configured with (their SHA-256 goes into its config).
#[derive(Debug, Clone)]
pub struct Tokens {
    /// For Beacon's HTTP API (`/v1/apps`).
    pub read: String,
    /// What each simulated Maestro presents, by its index: each token is bound to that node's
    /// name ([`crate::fleet::node_name`]), as Beacon requires.
    pub maestro: Vec<String>,
    /// What the repository link presents.
    pub repository: String,
    /// Beacon's token for the repository stub.
    pub repo_read: String,
}

impl Tokens {
    /// Tokens for Beacon's API, its repository, and `links` simulated Maestros.
    pub fn generate(links: usize) -> Self {
        use px_runtime::tokens::generate;
        Self {
            read: generate(),
            maestro: (0..links).map(|_| generate()).collect(),
            repository: generate(),
            repo_read: generate(),
        }
    }
}

/// Where Beacon's TLS material is: its certificate (for `localhost`), presented on the links
/// and the API, and the CA that signed it.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

pub struct BeaconProcess {
    /// Killed when dropped, so an error anywhere in the benchmark stops Beacon too.
    child: Child,
    pub pid: u32,
    pub http: SocketAddr,
    pub control: SocketAddr,
    pub log: PathBuf,
    /// For the calls to Beacon's HTTP API.
    http_client: reqwest::Client,
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
             [[tokens]]\nname = \"bench-repository\"\nrole = \"repository\"\nsha256 = \"{repository}\"\n",
            data = path_string(&dir.join("data"))?,
            cert = path_string(&tls.cert)?,
            key = path_string(&tls.key)?,
            url = toml_string(repository_url),
            token_file = path_string(&repo_token_file)?,
            read = hash(&tokens.read),
            repository = hash(&tokens.repository),
        );
        // One maestro token per simulated node, bound to its name.
        let mut config = config;
        for (index, token) in tokens.maestro.iter().enumerate() {
            let node = crate::fleet::node_name(index);
            config.push_str(&format!(
                "\n[[tokens]]\nname = \"{node}\"\nrole = \"maestro\"\nsha256 = \"{}\"\nnode = \"{node}\"\n",
                hash(token)
            ));
        }
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
            http_client: http_client(&tls.ca)?,
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
        let body = http_get(&self.http_client, self.http, "/v1/apps", Some(read_token)).await?;
        serde_json::from_str(&body).context("parsing /v1/apps")
    }

    /// A counter or gauge from `/metrics`, which takes a reading token.
    pub async fn metric(&self, read_token: &str, name: &str) -> Result<u64> {
        let body = http_get(&self.http_client, self.http, "/metrics", Some(read_token)).await?;
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

/// The client for Beacon's API (HTTPS, trusting `ca` alone): loopback only, so no proxy from
/// the environment applies. No connection is kept between calls, so Beacon holds no idle HTTP
/// connection of ours while the benchmark measures it.
fn http_client(ca: &Path) -> Result<reqwest::Client> {
    let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
    let ca = reqwest::Certificate::from_pem(&pem).context("the benchmark's CA")?;
    reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .timeout(HTTP_TIMEOUT)
        .pool_max_idle_per_host(0)
        .no_proxy()
        .build()
        .context("building the HTTP client")
}

/// `GET path`; the body of a 2xx answer (at most `MAX_HTTP_RESPONSE` bytes), else an error.
async fn http_get(
    client: &reqwest::Client,
    addr: SocketAddr,
    path: &str,
    bearer: Option<&str>,
) -> Result<String> {
    // The certificate names `localhost`; the port is the one Beacon bound on 127.0.0.1.
    let url = format!("https://localhost:{}{path}", addr.port());
    let mut request = client.get(&url);
    if let Some(token) = bearer {
        request = request.bearer_auth(token);
    }
    let mut response = request.send().await.with_context(|| format!("GET {url}"))?;
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .with_context(|| format!("GET {url}: reading the answer"))?
    {
        if body.len() + chunk.len() > MAX_HTTP_RESPONSE {
            bail!("GET {url}: answer over {MAX_HTTP_RESPONSE} bytes");
        }
        body.extend_from_slice(&chunk);
    }
    let body = String::from_utf8_lossy(&body).into_owned();
    let status = response.status();
    if !status.is_success() {
        bail!("GET {path}: HTTP {status}: {}", body.trim());
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_strings_escape_quotes_and_backslashes() {
        assert_eq!(toml_string(r#"/tmp/a"b\c"#), r#""/tmp/a\"b\\c""#);
    }
}
