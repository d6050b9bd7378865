//! `em up`: apprepo, Beacon and Maestro in one process on this machine, wired exactly as a
//! cluster is (the same services, TLS control links, HTTPS APIs under a CA of its own, tokens),
//! with state under one data directory so the next `em up` comes back with the same apps and
//! releases.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use px_runtime::tokens::{TokenEntry, generate, hash};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::cli::UpArgs;
use crate::failure::{Failure, Result};
use crate::settings::{self, EmConfig};
use crate::up_https::{self, Https};

/// Ports of the platform's own services, counted from `--port-base`.
pub const APPREPO_OFFSET: u16 = 0;
pub const BEACON_HTTP_OFFSET: u16 = 1;
pub const BEACON_CONTROL_OFFSET: u16 = 2;
pub const MAESTRO_STATUS_OFFSET: u16 = 3;
/// The local Maestro's node name, which its link token is bound to.
const LOCAL_NODE: &str = "local";
/// A tokens file in the data directory whose entries Beacon accepts besides its own, if it
/// exists (read at start).
const EXTRA_BEACON_TOKENS: &str = "beacon-tokens.toml";

/// Tokens of the local platform, kept in `data_dir/secrets` (mode 0600) across runs.
struct Secrets {
    deploy: String,
    /// Beacon's apprepo token: it only reads.
    read: String,
    /// Maestro's apprepo token: it reads, and as the node that builds it uploads layers and
    /// finishes builds.
    build: String,
    maestro_link: String,
    repository_link: String,
    dir: PathBuf,
}

fn secret(dir: &Path, name: &str) -> Result<String> {
    let path = dir.join(name);
    if path.exists() {
        return px_runtime::secrets::read_secret_file(&path)
            .map_err(|e| Failure::failed(e.to_string()));
    }
    let token = generate();
    px_runtime::secrets::write_secret_file(&path, &token)?;
    Ok(token)
}

fn secrets(data_dir: &Path) -> Result<Secrets> {
    let dir = data_dir.join("secrets");
    create_private_dir(&dir)?;
    Ok(Secrets {
        deploy: secret(&dir, "deploy-token")?,
        read: secret(&dir, "read-token")?,
        build: secret(&dir, "build-token")?,
        maestro_link: secret(&dir, "maestro-link-token")?,
        repository_link: secret(&dir, "repository-link-token")?,
        dir,
    })
}

fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    Ok(())
}

/// A throwaway CA and this machine's certificate (for `localhost` and `127.0.0.1`), made once
/// per data directory, in an owner-only directory, the key owner-only. Beacon presents it on
/// its links and API, and apprepo on its API: one host, one certificate, as in a cluster
/// where apprepo and Beacon share a control host.
fn pki(data_dir: &Path) -> Result<(PathBuf, PathBuf, PathBuf)> {
    let dir = data_dir.join("pki");
    create_private_dir(&dir)?;
    let (ca, cert, key) = (
        dir.join("ca.pem"),
        dir.join("beacon.pem"),
        dir.join("beacon.key"),
    );
    if ca.exists() && cert.exists() && key.exists() {
        return Ok((ca, cert, key));
    }
    let fail = |e: rcgen::Error| Failure::failed(format!("cannot make certificates: {e}"));
    let ca_key = rcgen::KeyPair::generate().map_err(fail)?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(fail)?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Platform.X em up CA");
    let ca_cert = ca_params.self_signed(&ca_key).map_err(fail)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let beacon_key = rcgen::KeyPair::generate().map_err(fail)?;
    let params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .map_err(fail)?;
    let beacon_cert = params.signed_by(&beacon_key, &issuer).map_err(fail)?;
    std::fs::write(&ca, ca_cert.pem())?;
    std::fs::write(&cert, beacon_cert.pem())?;
    px_runtime::secrets::write_secret_file(&key, &beacon_key.serialize_pem())?;
    Ok((ca, cert, key))
}

async fn bind(port: u16, what: &str, flag: &str) -> Result<TcpListener> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpListener::bind(addr).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            Failure::failed(format!(
                "port {port} ({what}) is taken; is another `em up` running? Stop it, or pass {flag} to use other ports"
            ))
        } else {
            Failure::failed(format!("cannot listen on {addr} ({what}): {e}"))
        }
    })
}

pub async fn up(options: UpArgs) -> Result<()> {
    let data = &options
        .data_dir
        .clone()
        .unwrap_or_else(settings::default_data_dir);
    create_private_dir(data)?;
    let https = up_https::resolve(data, &options)?;
    let base = options.port_base;
    let port = |offset: u16| {
        base.checked_add(offset)
            .ok_or_else(|| Failure::usage("--port-base is too high"))
    };
    // Bind everything first: a taken port fails before anything starts.
    let repo_listener = bind(port(APPREPO_OFFSET)?, "apprepo", "--port-base").await?;
    let beacon_http = bind(port(BEACON_HTTP_OFFSET)?, "Beacon API", "--port-base").await?;
    let beacon_control = bind(port(BEACON_CONTROL_OFFSET)?, "Beacon links", "--port-base").await?;
    let maestro_status = bind(
        port(MAESTRO_STATUS_OFFSET)?,
        "Maestro status",
        "--port-base",
    )
    .await?;
    let proxy = bind(options.http_port, "the app proxy", "--http-port").await?;
    let proxy_https = match &https {
        Some(https) => Some(bind(https.port, "the HTTPS app proxy", "--https-port").await?),
        None => None,
    };

    let secrets = secrets(data)?;
    let (ca, cert, key) = pki(data)?;
    // HTTPS even on loopback: the same code paths as a cluster, so what works here works there.
    let repo_url = format!("https://127.0.0.1:{}", port(APPREPO_OFFSET)?);
    let beacon_url = format!("https://127.0.0.1:{}", port(BEACON_HTTP_OFFSET)?);
    let control_addr = format!("127.0.0.1:{}", port(BEACON_CONTROL_OFFSET)?);

    let repo_config = px_repository::config::Config {
        listen: repo_listener.local_addr()?,
        data_dir: data.join("apprepo"),
        tokens: vec![
            TokenEntry {
                name: "em".into(),
                role: px_repository::auth::Role::Deploy,
                sha256: hash(&secrets.deploy),
                node: None,
                apps: None,
            },
            TokenEntry {
                name: "cluster".into(),
                role: px_repository::auth::Role::Beacon,
                sha256: hash(&secrets.read),
                node: None,
                apps: None,
            },
            TokenEntry {
                name: "local".into(),
                role: px_repository::auth::Role::Build,
                sha256: hash(&secrets.build),
                node: None,
                apps: None,
            },
        ],
        beacon: Some(px_repository::config::BeaconConfig {
            addr: Some(control_addr.clone()),
            addrs: Vec::new(),
            server_name: Some("localhost".into()),
            ca_file: ca.clone(),
            token_file: secrets.dir.join("repository-link-token"),
            name: "apprepo".into(),
        }),
        api_tls: px_runtime::http_server::ApiTls {
            cert_file: Some(cert.clone()),
            key_file: Some(key.clone()),
            plain_http: false,
        },
        ..Default::default()
    };
    let mut beacon_config = px_beacon::config::Config {
        http_listen: beacon_http.local_addr()?,
        control_listen: beacon_control.local_addr()?,
        data_dir: data.join("beacon"),
        tls_cert_file: cert,
        tls_key_file: key,
        // More tokens, when the data directory has them: a second local Maestro (the deploy
        // benchmark's) links with a maestro token of its own, bound to its own node name.
        tokens_file: Some(data.join(EXTRA_BEACON_TOKENS)).filter(|file| file.exists()),
        tokens: vec![
            TokenEntry {
                name: "em".into(),
                role: px_beacon::auth::Role::Deploy,
                sha256: hash(&secrets.deploy),
                node: None,
                apps: None,
            },
            TokenEntry {
                name: LOCAL_NODE.into(),
                role: px_beacon::auth::Role::Maestro,
                sha256: hash(&secrets.maestro_link),
                node: Some(LOCAL_NODE.into()),
                apps: None,
            },
            TokenEntry {
                name: "apprepo".into(),
                role: px_beacon::auth::Role::Repository,
                sha256: hash(&secrets.repository_link),
                node: None,
                apps: None,
            },
        ],
        domain: "localhost".into(),
        // Certificates for the names apps are given (`em domains add`, manifests); never for
        // `<app>.localhost`, which no CA issues for.
        acme: https
            .as_ref()
            .map(|https| https.acme.beacon_config())
            .unwrap_or_default(),
        alerts: px_beacon::config::AlertsConfig {
            webhooks: options.webhooks.clone(),
            ..Default::default()
        },
        ..Default::default()
    };
    beacon_config.repository.url = repo_url.clone();
    beacon_config.repository.token_file = secrets.dir.join("read-token");
    beacon_config.repository.ca_file = Some(ca.clone());
    let maestro_config = px_maestro::config::Config {
        node_name: LOCAL_NODE.into(),
        // The local Maestro builds what is deployed here, as a cluster's build nodes do.
        labels: std::collections::BTreeMap::from([(
            px_proto::build::BUILD_LABEL.to_string(),
            "true".to_string(),
        )]),
        http_listen: proxy.local_addr()?,
        // No certs_dir: the HTTPS listener serves the certificates ACME issues.
        https_listen: proxy_https.as_ref().map(|l| l.local_addr()).transpose()?,
        https_redirect_port: https.as_ref().map(|https| https.port),
        status_listen: maestro_status.local_addr()?,
        state_dir: data.join("maestro/state"),
        log_dir: data.join("maestro/logs"),
        // Locally, waiting is what a developer notices; apps stop fast or not at all.
        stop_grace: Duration::from_secs(5),
        drain_deadline: Duration::from_secs(10),
        repository_token_file: Some(secrets.dir.join("build-token")),
        beacon: Some(px_maestro::config::BeaconConfig {
            addr: Some(control_addr),
            addrs: Vec::new(),
            server_name: Some("localhost".into()),
            ca_file: ca.clone(),
            token_file: secrets.dir.join("maestro-link-token"),
        }),
        build: builder(data).await,
        sandbox: app_sandbox(options.no_sandbox).await,
        ..Default::default()
    };

    let app_url = format!("http://{{app}}.localhost:{}/", options.http_port);
    let config_path = settings::save(&EmConfig {
        remote: repo_url.clone(),
        beacon: Some(beacon_url.clone()),
        beacons: Vec::new(),
        token: secrets.deploy.clone(),
        app_url: Some(app_url.clone()),
        ca_file: Some(ca.clone()),
        insecure: false,
    })?;

    let shutdown = px_runtime::shutdown::on_signals()?;
    let repo = tokio::spawn(px_repository::run(
        repo_config,
        repo_listener,
        shutdown.clone(),
    ));
    let beacon = tokio::spawn(px_beacon::run(
        beacon_config,
        px_beacon::Listeners {
            http: beacon_http,
            control: beacon_control,
        },
        shutdown.clone(),
    ));
    let maestro = tokio::spawn(px_maestro::run(
        maestro_config,
        px_maestro::Listeners {
            http: proxy,
            https: proxy_https,
            status: maestro_status,
        },
        shutdown.clone(),
    ));
    println!(
        "Platform.X is up on this machine.\n\n  apps:        {}\n{}  status page: {beacon_url}/\n  apprepo:     {repo_url}\n  data:        {}\n  em config:   {}\n\nDeploy something:  em deploy examples/python-hello\nStop everything:   Ctrl-C",
        app_url.replace("{app}", "<app>"),
        https.as_ref().map_or_else(String::new, Https::banner_line),
        data.display(),
        config_path.display()
    );

    wait_for_services(
        &shutdown,
        vec![
            service("apprepo", repo),
            service("beacon", beacon),
            service("maestro", maestro),
        ],
    )
    .await?;
    println!("Platform.X stopped; `em up` brings the same apps back.");
    Ok(())
}

/// The local Maestro builds what is deployed, as a cluster's build node does: with the
/// interpreters of this machine (pyenv, nvm, asdf, `PATH`), its tools and caches under the data
/// directory, in bubblewrap when it works here, and trusting the CA the operator's own tools
/// trust (`SSL_CERT_FILE` and the like), so installers behind an inspecting proxy work as
/// `pip` and `npm` do in the same shell.
async fn builder(data: &Path) -> px_maestro::config::BuildConfig {
    use px_maestro::config::{BuildConfig, SandboxConfig};
    let sandbox = if bubblewrap_works().await {
        SandboxConfig::Bubblewrap
    } else {
        println!(
            "warning: bubblewrap (bwrap) does not work on this machine, so builds run without a sandbox; install the `bubblewrap` package to isolate them"
        );
        SandboxConfig::None
    };
    BuildConfig {
        enabled: true,
        discover_host_runtimes: true,
        tools_dir: Some(data.join("build/tools")),
        cache_dir: Some(data.join("build/cache")),
        sandbox,
        ca_file: operator_ca_file(),
        ..BuildConfig::default()
    }
}

/// Each app process in a sandbox of its own when bubblewrap works here (as root: a uid of its
/// own per app; as an ordinary user: a user namespace mapped to that user), said at start;
/// otherwise none, said as a warning (docs/src/design/trust.md, "On `em up`", says what each leaves).
async fn app_sandbox(no_sandbox: bool) -> px_maestro::config::AppSandboxConfig {
    use px_maestro::config::{AppSandboxConfig, SandboxConfig};
    if no_sandbox {
        println!(
            "warning: apps run without a sandbox (--no-sandbox): they can read each other's files and this user's"
        );
        return AppSandboxConfig {
            mode: SandboxConfig::None,
            ..AppSandboxConfig::default()
        };
    }
    let works = tokio::task::spawn_blocking(px_maestro::sandbox::bubblewrap_works)
        .await
        .unwrap_or(false);
    let mode = if works {
        let who = if rustix::process::geteuid().is_root() {
            "each app as a user of its own"
        } else {
            "all apps as your user, each in namespaces of its own"
        };
        println!("Apps run in bubblewrap sandboxes ({who}).");
        SandboxConfig::Bubblewrap
    } else {
        println!(
            "warning: bubblewrap (bwrap) cannot start a sandbox on this machine, so apps run without one and can read each other's files and this user's; install the `bubblewrap` package (and allow user namespaces) to isolate them"
        );
        SandboxConfig::None
    };
    AppSandboxConfig {
        mode,
        ..AppSandboxConfig::default()
    }
}

/// The variables that name a CA bundle for the installers, in the order they are read: the
/// first that names an existing file is the builds' `ca_file`.
const CA_ENV: &[&str] = &[
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "PIP_CERT",
    "NODE_EXTRA_CA_CERTS",
];

/// The CA bundle the operator's environment names, if any. `em` is a command a person runs,
/// not a service, so it reads its own environment (as it does for `HOME`).
fn operator_ca_file() -> Option<PathBuf> {
    CA_ENV
        .iter()
        .filter_map(std::env::var_os)
        .map(PathBuf::from)
        .find(|path| path.is_file())
}

/// How long the bubblewrap check may take: it starts `true` in a sandbox, milliseconds.
const SANDBOX_CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether bubblewrap can start a command here as the builder starts them: in a user
/// namespace when unprivileged, without one as root (either working is enough).
async fn bubblewrap_works() -> bool {
    for user_namespace in [true, false] {
        let mut command = tokio::process::Command::new("bwrap");
        command.args(["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]);
        command.args(["--unshare-pid", "--die-with-parent"]);
        if user_namespace {
            command.arg("--unshare-user");
        }
        command
            .args(["--", "true"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true);
        if matches!(
            tokio::time::timeout(SANDBOX_CHECK_TIMEOUT, command.status()).await,
            Ok(Ok(status)) if status.success()
        ) {
            return true;
        }
    }
    false
}

/// A service's task as [`wait_for_services`] takes it: its error becomes a sentence that
/// starts with the service's name.
fn service<E: std::fmt::Display + Send + 'static>(
    name: &'static str,
    task: JoinHandle<std::result::Result<(), E>>,
) -> JoinHandle<std::result::Result<(), String>> {
    tokio::spawn(async move {
        task.await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("{name}: {e}"))
    })
}

/// Waits for the services of `em up`, which share `shutdown`. Any service ending on its own is
/// a failure, and it ends them all: a service stops by itself only when a task it cannot serve
/// without ended, and then it cancels `shutdown` on its way out, which stops the other two as
/// Ctrl-C does. Every service is waited for, so Maestro stops the apps before the process
/// exits; then `em up` fails (exit 1) naming each service that failed and why (its error names
/// the task that ended), or succeeds when the user stopped it.
async fn wait_for_services(
    shutdown: &CancellationToken,
    services: Vec<JoinHandle<std::result::Result<(), String>>>,
) -> Result<()> {
    let (first, _, rest) = futures_util::future::select_all(services).await;
    let stopped_by_user = shutdown.is_cancelled();
    shutdown.cancel();
    let mut failures = Vec::new();
    for result in std::iter::once(first).chain(futures_util::future::join_all(rest).await) {
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failures.push(e),
            Err(e) => failures.push(e.to_string()),
        }
    }
    if !failures.is_empty() {
        return Err(Failure::failed(format!(
            "the platform stopped: {}",
            failures.join("; ")
        )));
    }
    if !stopped_by_user {
        return Err(Failure::failed(
            "a service stopped on its own; see the log above",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::failure::EXIT_FAILED;

    /// Far longer than stopping takes here; reached only when a service is never stopped.
    const WAIT: Duration = Duration::from_secs(10);

    /// [`wait_for_services`], failing the test if it never returns.
    async fn wait_within(
        shutdown: &CancellationToken,
        services: Vec<JoinHandle<std::result::Result<(), String>>>,
    ) -> Result<()> {
        tokio::time::timeout(WAIT, wait_for_services(shutdown, services))
            .await
            .unwrap()
    }

    /// A service that runs until `shutdown`, as the three do.
    fn until_shutdown(
        name: &'static str,
        shutdown: &CancellationToken,
    ) -> JoinHandle<std::result::Result<(), String>> {
        let shutdown = shutdown.clone();
        service(
            name,
            tokio::spawn(async move {
                shutdown.cancelled().await;
                Ok::<(), String>(())
            }),
        )
    }

    #[tokio::test]
    async fn a_critical_task_that_ends_in_one_service_stops_all_three_and_is_named() {
        let shutdown = CancellationToken::new();
        // What a service's `run` does when one of its critical tasks ends: it cancels the
        // shared token, drains, and returns the task's error.
        let token = shutdown.clone();
        let maestro = service(
            "maestro",
            tokio::spawn(async move {
                token.cancel();
                Err::<(), _>(
                    "the http proxy failed: the listener no longer accepts connections".to_string(),
                )
            }),
        );
        let failure = wait_within(
            &shutdown,
            vec![
                until_shutdown("apprepo", &shutdown),
                until_shutdown("beacon", &shutdown),
                maestro,
            ],
        )
        .await
        .unwrap_err();
        assert_eq!(failure.code, EXIT_FAILED);
        assert_eq!(
            failure.message,
            "the platform stopped: maestro: the http proxy failed: the listener no longer accepts connections"
        );
        assert!(shutdown.is_cancelled());
    }

    #[tokio::test]
    async fn ctrl_c_stops_all_three_and_is_no_failure() {
        let shutdown = CancellationToken::new();
        let services = vec![
            until_shutdown("apprepo", &shutdown),
            until_shutdown("beacon", &shutdown),
            until_shutdown("maestro", &shutdown),
        ];
        shutdown.cancel();
        assert!(wait_within(&shutdown, services).await.is_ok());
    }

    #[tokio::test]
    async fn a_service_that_returns_without_an_error_still_stops_the_others_and_fails() {
        let shutdown = CancellationToken::new();
        let quits = service("beacon", tokio::spawn(async { Ok::<(), String>(()) }));
        let failure = wait_within(
            &shutdown,
            vec![
                until_shutdown("apprepo", &shutdown),
                quits,
                until_shutdown("maestro", &shutdown),
            ],
        )
        .await
        .unwrap_err();
        assert_eq!(failure.code, EXIT_FAILED);
        assert_eq!(
            failure.message,
            "a service stopped on its own; see the log above"
        );
        assert!(shutdown.is_cancelled());
    }
}
