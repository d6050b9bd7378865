//! Shared set-up for apprepo's integration tests: the real service on `127.0.0.1:0` (in-process
//! through `run`, or as the `apprepo` binary), a client, and bundles good and hostile.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use px_proto::api::{self, App, Release};
use px_repository::auth::Role;
use px_repository::config::{Backend, Config, S3Config, StorageConfig};
use px_repository::internals::{Metrics, Releases};
use px_runtime::tokens::{TokenEntry, generate, hash};
use px_test_support::{S3_ACCESS_KEY, S3_SECRET_KEY, S3Server};
use reqwest::StatusCode;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

pub const BUCKET: &str = "px-bundles";

pub struct Repo {
    pub url: String,
    pub deploy_token: String,
    pub read_token: String,
    /// A `build` token, as a node that may build holds.
    pub build_token: String,
    pub data: tempfile::TempDir,
    pub config: Config,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    pub http: reqwest::Client,
}

/// A config with a deploy and a read token, storage under a fresh directory.
pub fn test_config(data: &Path) -> (Config, String, String) {
    let deploy = generate();
    let read = generate();
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: data.to_path_buf(),
        tokens: vec![
            TokenEntry {
                name: "ci".into(),
                role: Role::Deploy,
                sha256: hash(&deploy),
                node: None,
                apps: None,
            },
            TokenEntry {
                name: "maestro".into(),
                role: Role::Read,
                sha256: hash(&read),
                node: None,
                apps: None,
            },
        ],
        // Plain HTTP on loopback, chosen on purpose: these tests are about the API, and
        // `api_fs.rs` proves the HTTPS listener.
        api_tls: px_runtime::http_server::ApiTls {
            plain_http: true,
            ..Default::default()
        },
        ..Config::default()
    };
    (config, deploy, read)
}

/// Points a config at an S3 server, writing the secret key file it needs.
pub fn use_s3(config: &mut Config, s3: &S3Server) {
    use_s3_endpoint(config, s3.endpoint());
}

/// Points a config at the S3 server at `endpoint` (s3s-fs or SeaweedFS, both with the test
/// keys), writing the secret key file it needs.
pub fn use_s3_endpoint(config: &mut Config, endpoint: String) {
    let secret_file = config.data_dir.join("s3-secret");
    std::fs::create_dir_all(&config.data_dir).unwrap();
    px_runtime::secrets::write_secret_file(&secret_file, S3_SECRET_KEY).unwrap();
    config.storage = StorageConfig {
        backend: Backend::S3,
        s3: Some(S3Config {
            bucket: BUCKET.into(),
            region: "us-east-1".into(),
            endpoint: Some(endpoint),
            path_style: true,
            prefix: String::new(),
            access_key_id: Some(S3_ACCESS_KEY.into()),
            secret_access_key_file: Some(secret_file),
        }),
    };
}

impl Repo {
    pub async fn start_fs() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_s3(s3: &S3Server) -> Self {
        Self::start_with(|c| use_s3(c, s3)).await
    }

    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> Self {
        // Service logs on stderr when asked for (`PX_LOG=debug cargo test ...`).
        if std::env::var_os("PX_LOG").is_some() {
            px_runtime::telemetry::init();
        }
        let data = tempfile::tempdir().unwrap();
        let (mut config, deploy_token, read_token) = test_config(data.path());
        let build_token = generate();
        config.tokens.push(TokenEntry {
            name: "builder".into(),
            role: Role::Build,
            sha256: hash(&build_token),
            node: None,
            apps: None,
        });
        adjust(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let run_config = config.clone();
        let token = shutdown.clone();
        let task = tokio::spawn(async move {
            px_repository::run(run_config, listener, token)
                .await
                .unwrap();
        });
        let repo = Self {
            url,
            deploy_token,
            read_token,
            build_token,
            data,
            config,
            shutdown,
            task: Some(task),
            http: reqwest::Client::new(),
        };
        repo.wait_until_serving().await;
        repo
    }

    /// Waits until `run` has finished starting (storage opened, routes served).
    async fn wait_until_serving(&self) {
        for _ in 0..200 {
            if self
                .http
                .get(format!("{}/healthz", self.url))
                .send()
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("apprepo at {} did not start", self.url);
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .unwrap()
                .unwrap();
        }
    }

    pub fn spool_dir(&self) -> PathBuf {
        self.data.path().join("tmp")
    }

    pub fn get(&self, path: &str, token: &str) -> reqwest::RequestBuilder {
        self.http
            .get(format!("{}{path}", self.url))
            .bearer_auth(token)
    }

    pub async fn create_app(&self, name: &str) -> App {
        let r = self
            .http
            .post(format!("{}/v1/apps", self.url))
            .bearer_auth(&self.deploy_token)
            .json(&serde_json::json!({ "name": name }))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            StatusCode::CREATED,
            "{}",
            r.text().await.unwrap()
        );
        r.json().await.unwrap()
    }

    pub fn upload_request(&self, app: &str, bundle: &[u8], token: &str) -> reqwest::RequestBuilder {
        self.http
            .post(format!("{}/v1/apps/{app}/releases", self.url))
            .bearer_auth(token)
            .header(api::HEADER_BUNDLE_SHA256, sha256_hex(bundle))
            .body(bundle.to_vec())
    }

    pub async fn upload(&self, app: &str, bundle: &[u8]) -> reqwest::Response {
        self.upload_request(app, bundle, &self.deploy_token)
            .send()
            .await
            .unwrap()
    }

    pub async fn deploy(&self, app: &str, bundle: &[u8]) -> Release {
        let r = self.upload(app, bundle).await;
        assert_eq!(
            r.status(),
            StatusCode::CREATED,
            "{}",
            r.text().await.unwrap()
        );
        r.json().await.unwrap()
    }

    pub async fn releases(&self, app: &str) -> Vec<Release> {
        let r = self
            .get(&format!("/v1/apps/{app}/releases"), &self.read_token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        r.json().await.unwrap()
    }

    /// Waits until the spool directory is empty: nothing half-received is left behind.
    pub async fn assert_spool_empties(&self) {
        for _ in 0..100 {
            if std::fs::read_dir(self.spool_dir()).unwrap().count() == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "spool directory still holds files: {:?}",
            std::fs::read_dir(self.spool_dir())
                .unwrap()
                .collect::<Vec<_>>()
        );
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Packs the sample app named `name`, with `extra` written into it so bundles differ.
pub fn sample_bundle(name: &str, extra: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    px_test_support::write_sample_app(dir.path(), name).unwrap();
    std::fs::write(dir.path().join("extra.txt"), extra).unwrap();
    let mut out = Vec::new();
    px_bundle::pack_dir(dir.path(), &mut out).unwrap();
    out
}

/// One entry of a hand-made (possibly hostile) bundle.
pub enum Raw<'a> {
    File(&'a str, &'a [u8]),
    Symlink(&'a str, &'a str),
    CharDevice(&'a str),
}

const GOOD_MANIFEST: &[u8] = b"name = \"hello\"\nrun = \"python3 server.py\"\n";

/// Builds a zstd tar from raw entries, writing names byte for byte (no sanitising), after a
/// valid `app.toml` unless one is given.
pub fn raw_bundle(entries: &[Raw<'_>]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    let has_manifest = entries
        .iter()
        .any(|e| matches!(e, Raw::File("app.toml", _)));
    let manifest = [Raw::File("app.toml", GOOD_MANIFEST)];
    let all = if has_manifest { &[][..] } else { &manifest[..] };
    for entry in all.iter().chain(entries) {
        let mut header = tar::Header::new_gnu();
        let (name, data): (&str, &[u8]) = match entry {
            Raw::File(name, data) => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_size(data.len() as u64);
                (name, data)
            }
            Raw::Symlink(name, target) => {
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_size(0);
                header.as_gnu_mut().unwrap().linkname[..target.len()]
                    .copy_from_slice(target.as_bytes());
                (name, &[])
            }
            Raw::CharDevice(name) => {
                header.set_entry_type(tar::EntryType::Char);
                header.set_size(0);
                (name, &[])
            }
        };
        header.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
        header.set_mode(0o644);
        header.set_cksum();
        builder.append(&header, data).unwrap();
    }
    let tar = builder.into_inner().unwrap();
    zstd::encode_all(&tar[..], 3).unwrap()
}

/// A zstd tar holding one file of `size` zero bytes: tiny compressed, huge unpacked.
pub fn bomb_bundle(size: u64) -> Vec<u8> {
    let mut encoder = zstd::Encoder::new(Vec::new(), 19).unwrap();
    {
        let mut builder = tar::Builder::new(&mut encoder);
        let mut header = tar::Header::new_gnu();
        header.set_path("app.toml").unwrap();
        header.set_size(GOOD_MANIFEST.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append(&header, GOOD_MANIFEST).unwrap();
        let mut header = tar::Header::new_gnu();
        header.set_path("zeros.bin").unwrap();
        header.set_size(size);
        header.set_mode(0o644);
        header.set_cksum();
        builder
            .append(&header, std::io::repeat(0).take_bytes(size))
            .unwrap();
        builder.finish().unwrap();
    }
    encoder.finish().unwrap()
}

trait TakeBytes: std::io::Read + Sized {
    fn take_bytes(self, n: u64) -> std::io::Take<Self> {
        std::io::Read::take(self, n)
    }
}
impl<R: std::io::Read> TakeBytes for R {}
pub mod acme_suite;
pub mod build_suite;
pub mod domain_suite;
pub mod lease_suite;
pub mod phase_suite;
pub mod scope_suite;
pub mod state_suite;
pub mod suite;

/// The sample app as a Python app to build: it has a `requirements.txt`.
pub fn built_bundle(name: &str, extra: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    px_test_support::write_sample_app(dir.path(), name).unwrap();
    std::fs::write(dir.path().join("extra.txt"), extra).unwrap();
    std::fs::write(dir.path().join("requirements.txt"), "gunicorn==23.0.0\n").unwrap();
    let mut out = Vec::new();
    px_bundle::pack_dir(dir.path(), &mut out).unwrap();
    out
}

/// A layer archive as a builder packs one: a zstd tar holding `path` with `content`.
pub fn layer(path: &str, content: &str) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_path(path).unwrap();
    header.set_size(content.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    builder.append(&header, content.as_bytes()).unwrap();
    let tar = builder.into_inner().unwrap();
    zstd::encode_all(&tar[..], 3).unwrap()
}

/// Retention off: the test runs its sweeps itself, at the moments (and `now`) it chooses.
pub fn no_periodic_retention(config: &mut Config) {
    config.retention.enabled = false;
}

impl Repo {
    /// A second handle on the storage this repository uses (the same directory or bucket),
    /// with its own metrics, for sweeping it directly.
    pub async fn sweeper(&self) -> (Releases, Arc<Metrics>) {
        let secret = self
            .config
            .storage
            .s3
            .as_ref()
            .and_then(|s3| s3.secret_access_key_file.as_ref())
            .map(|file| px_runtime::secrets::read_secret_file(file).unwrap());
        let storage = px_repository::internals::open_storage(&self.config, secret)
            .await
            .unwrap();
        let metrics = Arc::new(Metrics::default());
        (Releases::new(storage, metrics.clone()), metrics)
    }

    /// The status of a bundle download, and its bytes.
    pub async fn download(&self, sha256: &str) -> (StatusCode, Vec<u8>) {
        let r = self
            .get(&format!("/v1/bundles/{sha256}"), &self.read_token)
            .send()
            .await
            .unwrap();
        (r.status(), r.bytes().await.unwrap().to_vec())
    }

    /// `/metrics` as text.
    pub async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn rollback(&self, app: &str, body: serde_json::Value) -> reqwest::Response {
        self.http
            .post(format!("{}/v1/apps/{app}/rollback", self.url))
            .bearer_auth(&self.deploy_token)
            .json(&body)
            .send()
            .await
            .unwrap()
    }
}
