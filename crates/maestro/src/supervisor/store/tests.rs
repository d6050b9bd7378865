//! Tests of the release store against a repository stand-in: downloads checked and bounded,
//! releases unpacked and pruned, layered releases assembled.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};

use super::*;

const TOKEN: &str = "bundle-reader";

/// Bundles and layers by digest behind a bearer token, like apprepo's
/// `/v1/bundles/{sha256}` and `/v1/layers/{sha256}`, counting the downloads it serves, in
/// all and per digest.
#[derive(Clone, Default)]
struct Served {
    bundles: Arc<Mutex<HashMap<String, Vec<u8>>>>,
    downloads: Arc<AtomicUsize>,
    by_digest: Arc<Mutex<HashMap<String, usize>>>,
}

struct Repository {
    url: String,
    served: Served,
}

async fn bundle(
    State(served): State<Served>,
    UrlPath(sha): UrlPath<String>,
    headers: HeaderMap,
) -> Result<Vec<u8>, StatusCode> {
    if headers.get("authorization").and_then(|v| v.to_str().ok())
        != Some(&format!("Bearer {TOKEN}"))
    {
        return Err(StatusCode::UNAUTHORIZED);
    }
    let bytes = served.bundles.lock().unwrap().get(&sha).cloned();
    let bytes = bytes.ok_or(StatusCode::NOT_FOUND)?;
    served.downloads.fetch_add(1, Ordering::SeqCst);
    *served.by_digest.lock().unwrap().entry(sha).or_default() += 1;
    Ok(bytes)
}

impl Repository {
    async fn start() -> Self {
        let served = Served::default();
        let app = axum::Router::new()
            .route("/v1/bundles/{sha}", axum::routing::get(bundle))
            .route("/v1/layers/{sha}", axum::routing::get(bundle))
            .with_state(served.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { url, served }
    }

    /// Packs release `release` of `app` holding `data` (besides its `app.toml`), serves
    /// it, and returns its assignment and the bytes its unpacked files take.
    fn release(&self, app: &str, release: u64, data: &str) -> (AppAssignment, u64) {
        let dir = tempfile::tempdir().unwrap();
        let manifest = format!("name = \"{app}\"\nrun = \"true\"\n");
        std::fs::write(dir.path().join("app.toml"), &manifest).unwrap();
        std::fs::write(dir.path().join("data.txt"), data).unwrap();
        let mut bytes = Vec::new();
        let (summary, parsed) = px_bundle::pack_dir(dir.path(), &mut bytes).unwrap();
        self.served
            .bundles
            .lock()
            .unwrap()
            .insert(summary.sha256.clone(), bytes);
        let assignment = AppAssignment {
            app: app.into(),
            release,
            bundle_sha256: summary.sha256.clone(),
            bundle_size: summary.size,
            bundle_url: format!("{}/v1/bundles/{}", self.url, summary.sha256),
            instances: 1,
            manifest: parsed,
            env: BTreeMap::new(),
            domains: Vec::new(),
            build: None,
            processes: BTreeMap::new(),
            app_created_at: None,
            bundle_unpacked_size: None,
        };
        (assignment, (manifest.len() + data.len()) as u64)
    }

    fn downloads(&self) -> usize {
        self.served.downloads.load(Ordering::SeqCst)
    }
}

fn store(state_dir: &Path, keep_releases: usize, min_free_disk: u64) -> ReleaseStore {
    let settings = Settings {
        node_name: "node-a".into(),
        state_dir: state_dir.to_path_buf(),
        port_range: (20000, 20010),
        stop_grace: Duration::from_secs(1),
        keep_releases,
        min_free_disk,
        cgroup_limits: false,
        repository_token: Some(TOKEN.into()),
        repository_tls: None,
        sandbox: std::sync::Arc::new(crate::sandbox::AppSandbox::none()),
    };
    ReleaseStore::new(&settings, reqwest::Client::new())
}

/// What the app's releases directory holds, by name, sorted.
fn entries(state_dir: &Path, app: &str) -> Vec<String> {
    let dir = state_dir.join("apps").join(app).join("releases");
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn a_release_is_downloaded_verified_and_unpacked_once() {
    let repository = Repository::start().await;
    let state = tempfile::tempdir().unwrap();
    let store = store(state.path(), 3, 0);
    let (v1, _) = repository.release("shop", 1, "first");

    let prepared = store.prepare(&v1).await.unwrap();
    assert_eq!(
        prepared.dir,
        state.path().join("apps/shop/releases/1"),
        "where a release lives"
    );
    assert_eq!(
        std::fs::read_to_string(prepared.dir.join("data.txt")).unwrap(),
        "first"
    );
    // The bundle itself is not kept once unpacked.
    assert_eq!(entries(state.path(), "shop"), ["1"]);

    // A release already on disk (a restart, a rollback) is not downloaded again.
    let again = store.prepare(&v1).await.unwrap();
    assert_eq!(again.dir, prepared.dir);
    assert_eq!(repository.downloads(), 1);
}

/// A bundle of `unpacked` bytes of zeros, which compresses to almost nothing.
fn zeros_bundle(repository: &Repository, app: &str, unpacked: u64) -> AppAssignment {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("app.toml"),
        format!("name = \"{app}\"\nrun = \"true\"\n"),
    )
    .unwrap();
    // Sparse: no disk is spent making it, and it reads as zeros.
    std::fs::File::create(dir.path().join("zeros.bin"))
        .unwrap()
        .set_len(unpacked)
        .unwrap();
    let (mut assignment, _) = repository.release(app, 1, "");
    let mut bytes = Vec::new();
    let (summary, _) = px_bundle::pack_dir(dir.path(), &mut bytes).unwrap();
    repository
        .served
        .bundles
        .lock()
        .unwrap()
        .insert(summary.sha256.clone(), bytes);
    assignment.bundle_sha256 = summary.sha256.clone();
    assignment.bundle_size = summary.size;
    assignment.bundle_url = format!("{}/v1/bundles/{}", repository.url, summary.sha256);
    assignment
}

#[tokio::test]
async fn the_disk_check_counts_what_a_bundle_unpacks_to_not_twice_its_compressed_size() {
    const UNPACKED: u64 = 256 << 20;
    // Room for twice the compressed bundle many times over, but not for what it unpacks to:
    // the floor leaves half of it free. Other writes on the machine may move free space by
    // far less than that margin during the test.
    let repository = Repository::start().await;
    let state = tempfile::tempdir().unwrap();
    let mut bomb = zeros_bundle(&repository, "shop", UNPACKED);
    assert!(bomb.bundle_size < 1 << 20, "{}", bomb.bundle_size);
    bomb.bundle_unpacked_size = Some(UNPACKED + 20);
    let free = free_disk(state.path()).unwrap();
    let floor = free - UNPACKED / 2;
    let store = store(state.path(), 3, floor);
    let error = store.prepare(&bomb).await.unwrap_err();
    assert!(
        matches!(error, DeployError::NotEnoughDisk { .. }),
        "{error:?}"
    );
    let needed = format!(
        "this release needs about {}",
        ByteSize(bomb.bundle_size + UNPACKED + 20)
    );
    assert!(error.to_string().contains(&needed), "{error}");
    assert_eq!(repository.downloads(), 0, "refused before downloading");
}

#[tokio::test]
async fn the_disk_floor_refuses_a_release_before_downloading_and_names_the_sizes() {
    let repository = Repository::start().await;
    let state = tempfile::tempdir().unwrap();
    // A floor no disk reaches.
    let floor = u64::MAX / 2;
    let store = store(state.path(), 3, floor);
    let (v1, _) = repository.release("shop", 1, "first");

    let error = store.prepare(&v1).await.unwrap_err();
    assert!(
        matches!(error, DeployError::NotEnoughDisk { .. }),
        "{error:?}"
    );
    let message = error.to_string();
    let releases = state.path().join("apps/shop/releases");
    let sizes = format!(
        " free under {}, this release needs about {} and Maestro keeps {} free (min_free_disk); free some space (old releases, logs) or lower min_free_disk",
        releases.display(),
        ByteSize(v1.bundle_size * 2),
        ByteSize(floor)
    );
    assert!(
        message.starts_with("not enough disk: ") && message.ends_with(&sizes),
        "{message}"
    );
    // What is free comes first, as a size a person reads.
    let free = &message["not enough disk: ".len()..message.len() - sizes.len()];
    assert!(
        free.ends_with('B') && free.starts_with(|c: char| c.is_ascii_digit()),
        "{free}"
    );
    assert_eq!(repository.downloads(), 0);
    assert!(entries(state.path(), "shop").is_empty());
}

#[tokio::test]
async fn a_digest_mismatch_leaves_no_file_and_no_release_behind() {
    let repository = Repository::start().await;
    let state = tempfile::tempdir().unwrap();
    let store = store(state.path(), 3, 0);
    let (v1, _) = repository.release("shop", 1, "first");
    let forged = AppAssignment {
        bundle_sha256: "0".repeat(64),
        ..v1.clone()
    };

    let error = store.prepare(&forged).await.unwrap_err();
    assert_eq!(
        error.to_string(),
        format!(
            "bundle digest mismatch: expected {}, got {}",
            "0".repeat(64),
            v1.bundle_sha256
        )
    );
    assert_eq!(repository.downloads(), 1);
    assert!(
        entries(state.path(), "shop").is_empty(),
        "{:?}",
        entries(state.path(), "shop")
    );

    // The store is not wedged: the right bundle deploys.
    store.prepare(&v1).await.unwrap();
    assert_eq!(entries(state.path(), "shop"), ["1"]);
}

#[tokio::test]
async fn a_bundle_over_the_size_limit_is_abandoned_and_removed() {
    let repository = Repository::start().await;
    let state = tempfile::tempdir().unwrap();
    let mut store = store(state.path(), 3, 0);
    store.max_bundle_bytes = 16;
    let (v1, _) = repository.release("shop", 1, "first");

    let error = store.prepare(&v1).await.unwrap_err();
    assert_eq!(error.to_string(), "bundle larger than 16 bytes");
    assert!(entries(state.path(), "shop").is_empty());
}

#[tokio::test]
async fn a_download_the_repository_refuses_names_the_url_and_status() {
    let repository = Repository::start().await;
    let state = tempfile::tempdir().unwrap();
    let store = store(state.path(), 3, 0);
    let (v1, _) = repository.release("shop", 1, "first");
    let missing = AppAssignment {
        bundle_url: format!("{}/v1/bundles/{}", repository.url, "f".repeat(64)),
        ..v1
    };

    let error = store.prepare(&missing).await.unwrap_err();
    assert_eq!(
        error.to_string(),
        format!("downloading {}: 404 Not Found", missing.bundle_url)
    );
    assert!(entries(state.path(), "shop").is_empty());
}

#[tokio::test]
async fn pruning_keeps_the_newest_releases_and_the_serving_one() {
    let repository = Repository::start().await;
    let state = tempfile::tempdir().unwrap();
    let store = store(state.path(), 2, 0);
    let mut weights = BTreeMap::new();
    for (release, data) in [(1, "one"), (2, "two two"), (3, "three"), (4, "four four")] {
        let (assignment, bytes) = repository.release("shop", release, data);
        store.prepare(&assignment).await.unwrap();
        weights.insert(release, bytes);
    }
    // Another app's releases are not this app's to prune.
    let (other, other_bytes) = repository.release("blog", 7, "other");
    store.prepare(&other).await.unwrap();

    // A rollback to v1: it serves, so it stays beside the newest two.
    store.prune("shop", 1).await;
    assert_eq!(entries(state.path(), "shop"), ["1", "3", "4"]);
    assert_eq!(
        store.kept_bytes().get("shop"),
        Some(&(weights[&1] + weights[&3] + weights[&4]))
    );

    // Back on the newest: only the newest two are kept.
    store.prune("shop", 4).await;
    assert_eq!(entries(state.path(), "shop"), ["3", "4"]);
    assert_eq!(
        store.kept_bytes().get("shop"),
        Some(&(weights[&3] + weights[&4]))
    );
    assert_eq!(entries(state.path(), "blog"), ["7"]);
    store.prune("blog", 7).await;
    assert_eq!(store.kept_bytes().get("blog"), Some(&other_bytes));
}

#[tokio::test]
async fn a_prune_leaves_a_download_in_progress_and_clears_it_once_none_is() {
    let repository = Repository::start().await;
    let state = tempfile::tempdir().unwrap();
    let store = store(state.path(), 2, 0);
    let (v1, _) = repository.release("shop", 1, "one");
    store.prepare(&v1).await.unwrap();
    let releases = state.path().join("apps/shop/releases");

    // A release phase downloads v2 (holding what `prepare` holds) while the app's task prunes.
    let downloading = store.preparing_lock("shop").read_owned().await;
    std::fs::write(releases.join(".download-2"), b"half of v2").unwrap();
    store.prune("shop", 1).await;
    assert_eq!(entries(state.path(), "shop"), [".download-2", "1"]);

    // What a preparation that is gone left (a killed Maestro): the next prune clears it.
    drop(downloading);
    store.prune("shop", 1).await;
    assert_eq!(entries(state.path(), "shop"), ["1"]);
}

// Built releases: layers.

use std::os::unix::fs::PermissionsExt;

use px_proto::build::{AssignedLayer, LayerKind};

/// A file of a layer: its path and content, or a symlink's target with `->` in front.
type Entry<'a> = (&'a str, &'a str);

impl Repository {
    /// Packs `entries` as a layer of `kind`, serves it, and returns it as assigned with the
    /// bytes of its files.
    fn layer(&self, kind: LayerKind, entries: &[Entry<'_>]) -> (AssignedLayer, u64) {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes_of_files = 0;
        for (path, content) in entries {
            let path = dir.path().join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            match content.strip_prefix("->") {
                Some(target) => std::os::unix::fs::symlink(target, &path).unwrap(),
                None => {
                    std::fs::write(&path, content).unwrap();
                    if content.starts_with("#!") {
                        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                            .unwrap();
                    }
                    bytes_of_files += content.len() as u64;
                }
            }
        }
        let mut bytes = Vec::new();
        let summary = px_bundle::pack_layer(dir.path(), &mut bytes).unwrap();
        self.served
            .bundles
            .lock()
            .unwrap()
            .insert(summary.sha256.clone(), bytes);
        let layer = AssignedLayer {
            kind,
            url: format!("{}/v1/layers/{}", self.url, summary.sha256),
            sha256: summary.sha256,
            size: summary.size,
        };
        (layer, bytes_of_files)
    }

    /// Release `release` of `app`, built into `layers`, with the `PATH` entries and
    /// variables of a Python build.
    fn built(&self, app: &str, release: u64, layers: &[&AssignedLayer]) -> AppAssignment {
        let (mut assignment, _) = self.release(app, release, "the source");
        assignment.build = Some(AssignedBuild {
            layers: layers.iter().map(|l| (*l).clone()).collect(),
            path: vec![".px/deps/bin".into(), ".px/runtime/bin".into()],
            env: BTreeMap::from([(
                "PYTHONUSERBASE".to_string(),
                "{release}/.px/deps".to_string(),
            )]),
            commands: vec!["python3".into()],
        });
        assignment
    }

    /// Downloads of the bundle or layer `sha256` so far.
    fn downloads_of(&self, sha256: &str) -> usize {
        self.served
            .by_digest
            .lock()
            .unwrap()
            .get(sha256)
            .copied()
            .unwrap_or(0)
    }
}

/// What `state_dir/layers` holds, by name, sorted.
fn layer_dirs(state_dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(state_dir.join(layers::LAYERS_DIR))
        .map(|dir| {
            dir.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn sorted(mut names: Vec<String>) -> Vec<String> {
    names.sort();
    names
}

fn inode(path: &Path) -> u64 {
    std::fs::symlink_metadata(path).unwrap().ino()
}

const PYTHON: &str = "#!/bin/sh\necho Python 3.12.1\n";

#[tokio::test]
async fn a_second_built_release_downloads_only_its_app_layer_and_shares_the_rest() {
    let repository = Repository::start().await;
    let state = tempfile::tempdir().unwrap();
    let store = store(state.path(), 3, 0);
    let (runtime, runtime_bytes) = repository.layer(
        LayerKind::Runtime,
        &[
            (".px/runtime/bin/python3", PYTHON),
            (".px/runtime/bin/python", "->python3"),
        ],
    );
    let (deps, deps_bytes) = repository.layer(
        LayerKind::Dependencies,
        &[(".px/deps/lib/python3.12/site-packages/django.py", "DJANGO")],
    );
    let (app1, app1_bytes) = repository.layer(LayerKind::App, &[("manage.py", "print('v1')")]);
    let (app2, app2_bytes) = repository.layer(LayerKind::App, &[("manage.py", "print('v2')")]);

    let v1 = store
        .prepare(&repository.built("shop", 1, &[&runtime, &deps, &app1]))
        .await
        .unwrap();
    let v2 = store
        .prepare(&repository.built("shop", 2, &[&runtime, &deps, &app2]))
        .await
        .unwrap();

    // v2 fetched its app layer alone: the runtime and dependencies were here.
    assert_eq!(
        [&runtime, &deps, &app1, &app2].map(|l| repository.downloads_of(&l.sha256)),
        [1, 1, 1, 1]
    );
    assert_eq!(repository.downloads(), 4);
    assert_eq!(
        layer_dirs(state.path()),
        sorted(vec![
            runtime.sha256.clone(),
            deps.sha256.clone(),
            app1.sha256.clone(),
            app2.sha256.clone()
        ])
    );
    // Each release holds the stack, its own code on top.
    for (release, code) in [(&v1, "print('v1')"), (&v2, "print('v2')")] {
        assert_eq!(
            std::fs::read_to_string(release.dir.join("manage.py")).unwrap(),
            code
        );
        assert_eq!(
            std::fs::read_link(release.dir.join(".px/runtime/bin/python")).unwrap(),
            Path::new("python3")
        );
    }
    // The shared files are the layers' own inodes, not copies, and nobody writes them.
    for shared in [
        ".px/runtime/bin/python3",
        ".px/deps/lib/python3.12/site-packages/django.py",
    ] {
        assert_eq!(inode(&v1.dir.join(shared)), inode(&v2.dir.join(shared)));
    }
    assert_eq!(
        inode(&v1.dir.join(".px/runtime/bin/python3")),
        inode(
            &state
                .path()
                .join("layers")
                .join(&runtime.sha256)
                .join(".px/runtime/bin/python3")
        )
    );
    assert_ne!(
        inode(&v1.dir.join("manage.py")),
        inode(&v2.dir.join("manage.py"))
    );
    let mode = std::fs::metadata(v2.dir.join("manage.py"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o222, 0, "{mode:o}");

    // The disk report counts each layer once, however many releases link to it; the
    // app's own figure counts its releases' files once each.
    store.prune("shop", 2).await;
    let records: u64 = [&v1, &v2]
        .iter()
        .map(|r| {
            std::fs::metadata(r.dir.join(layers::RELEASE_LAYERS_FILE))
                .unwrap()
                .len()
        })
        .sum();
    let layer_bytes = runtime_bytes + deps_bytes + app1_bytes + app2_bytes;
    assert_eq!(store.used_bytes(), layer_bytes + records);
    assert_eq!(
        store.kept_bytes().get("shop"),
        Some(&(layer_bytes + records))
    );
}

/// `(layers, bytes)` of `kind` in the store's download metrics.
fn fetched(store: &ReleaseStore, kind: &str) -> (u64, u64) {
    let metrics = store.layer_fetch_metrics();
    let value = |name: &str| {
        let prefix = format!("{name}{{kind=\"{kind}\"}} ");
        let line = metrics.lines().find(|l| l.starts_with(&prefix));
        line.unwrap_or_else(|| panic!("no {prefix} in {metrics}"))[prefix.len()..]
            .parse()
            .unwrap()
    };
    (
        value("maestro_layers_fetched_total"),
        value("maestro_layer_fetched_bytes_total"),
    )
}

#[tokio::test]
async fn the_download_metrics_count_the_layers_a_release_fetched_and_no_more() {
    let repository = Repository::start().await;
    let state = tempfile::tempdir().unwrap();
    let store = store(state.path(), 3, 0);
    let (runtime, _) = repository.layer(LayerKind::Runtime, &[(".px/runtime/bin/python3", PYTHON)]);
    let (deps, _) = repository.layer(
        LayerKind::Dependencies,
        &[(".px/deps/lib/python3.12/site-packages/django.py", "DJANGO")],
    );
    let (app1, _) = repository.layer(LayerKind::App, &[("manage.py", "print('v1')")]);
    let (app2, _) = repository.layer(LayerKind::App, &[("manage.py", "print('v2, longer')")]);
    assert_eq!(fetched(&store, "app"), (0, 0));

    // The first release downloads all of it: each layer's archive, byte for byte.
    let v1 = repository.built("shop", 1, &[&runtime, &deps, &app1]);
    store.prepare(&v1).await.unwrap();
    assert_eq!(fetched(&store, "runtime"), (1, runtime.size));
    assert_eq!(fetched(&store, "dependencies"), (1, deps.size));
    assert_eq!(fetched(&store, "app"), (1, app1.size));

    // A code-only release adds its app layer alone, and preparing a release already on
    // disk downloads nothing.
    let v2 = repository.built("shop", 2, &[&runtime, &deps, &app2]);
    store.prepare(&v2).await.unwrap();
    store.prepare(&v2).await.unwrap();
    store.prepare(&v1).await.unwrap();
    assert_eq!(fetched(&store, "runtime"), (1, runtime.size));
    assert_eq!(fetched(&store, "dependencies"), (1, deps.size));
    assert_eq!(fetched(&store, "app"), (2, app1.size + app2.size));
    assert_eq!(repository.downloads(), 4);
}

#[tokio::test]
async fn two_apps_on_one_runtime_deploying_at_once_download_it_once() {
    let repository = Repository::start().await;
    let state = tempfile::tempdir().unwrap();
    let store = store(state.path(), 3, 0);
    let (runtime, _) = repository.layer(LayerKind::Runtime, &[(".px/runtime/bin/python3", PYTHON)]);
    let (shop, _) = repository.layer(LayerKind::App, &[("shop.py", "shop")]);
    let (blog, _) = repository.layer(LayerKind::App, &[("blog.py", "blog")]);
    let shop_v1 = repository.built("shop", 1, &[&runtime, &shop]);
    let blog_v1 = repository.built("blog", 1, &[&runtime, &blog]);

    let (a, b) = tokio::join!(store.prepare(&shop_v1), store.prepare(&blog_v1));
    let (a, b) = (a.unwrap(), b.unwrap());

    assert_eq!(repository.downloads_of(&runtime.sha256), 1);
    assert_eq!(
        inode(&a.dir.join(".px/runtime/bin/python3")),
        inode(&b.dir.join(".px/runtime/bin/python3"))
    );
}

#[tokio::test]
async fn a_layer_with_a_wrong_digest_leaves_nothing_behind() {
    let repository = Repository::start().await;
    let state = tempfile::tempdir().unwrap();
    let store = store(state.path(), 3, 0);
    let (runtime, _) = repository.layer(LayerKind::Runtime, &[(".px/runtime/bin/python3", PYTHON)]);
    let (app, _) = repository.layer(LayerKind::App, &[("manage.py", "code")]);
    // The repository serves other bytes, as many, under the app layer's digest.
    let (other, _) = repository.layer(LayerKind::App, &[("manage.py", "c0de")]);
    assert_eq!(other.size, app.size);
    let forged_bytes = repository.served.bundles.lock().unwrap()[&other.sha256].clone();
    repository
        .served
        .bundles
        .lock()
        .unwrap()
        .insert(app.sha256.clone(), forged_bytes);

    let error = store
        .prepare(&repository.built("shop", 1, &[&runtime, &app]))
        .await
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        format!(
            "app layer digest mismatch: expected {}, got {}",
            app.sha256, other.sha256
        )
    );
    // No release, no half-fetched layer: only the runtime, which was whole and verified.
    assert!(entries(state.path(), "shop").is_empty());
    assert_eq!(layer_dirs(state.path()), vec![runtime.sha256.clone()]);
    // Only what arrived whole and checked counts as downloaded.
    assert_eq!(fetched(&store, "runtime"), (1, runtime.size));
    assert_eq!(fetched(&store, "app"), (0, 0));

    // Served right, the same release deploys.
    let (app, _) = repository.layer(LayerKind::App, &[("manage.py", "code")]);
    store
        .prepare(&repository.built("shop", 1, &[&runtime, &app]))
        .await
        .unwrap();
    assert_eq!(entries(state.path(), "shop"), ["1"]);
}

#[tokio::test]
async fn a_build_output_reaching_outside_the_release_is_refused_before_any_download() {
    let repository = Repository::start().await;
    let state = tempfile::tempdir().unwrap();
    let store = store(state.path(), 3, 0);
    let (app, _) = repository.layer(LayerKind::App, &[("manage.py", "code")]);
    let good = repository.built("shop", 1, &[&app]);
    let with = |change: &dyn Fn(&mut AssignedBuild)| {
        let mut target = good.clone();
        change(target.build.as_mut().unwrap());
        target
    };
    let cases = [
        (
            with(&|b| b.path = vec!["../../bin".into()]),
            "PATH entry \"../../bin\" leaves the release",
        ),
        (
            with(&|b| b.path = vec!["/usr/bin".into()]),
            "PATH entry \"/usr/bin\" leaves the release",
        ),
        (
            with(&|b| {
                b.env.insert("PATH".into(), "/evil".into());
            }),
            "it sets PATH, which is made from its path entries",
        ),
        (
            with(&|b| {
                b.env.insert("PX_APP".into(), "other".into());
            }),
            "variable \"PX_APP\" is set by Platform.X itself; choose another name",
        ),
        (
            with(&|b| b.layers[0].sha256 = "../../etc".into()),
            "layer digest: \"../../etc\" is not a SHA-256 digest (64 lowercase hex characters)",
        ),
    ];
    for (target, reason) in cases {
        let error = store.prepare(&target).await.unwrap_err();
        assert_eq!(
            error.to_string(),
            format!("the release's build output is unusable: {reason}")
        );
    }
    assert_eq!(repository.downloads(), 0);
    assert!(layer_dirs(state.path()).is_empty());
}

#[tokio::test]
async fn pruning_keeps_the_layers_kept_releases_use_whichever_app_they_belong_to() {
    let repository = Repository::start().await;
    let state = tempfile::tempdir().unwrap();
    let store = store(state.path(), 1, 0);
    let (python312, _) =
        repository.layer(LayerKind::Runtime, &[(".px/runtime/bin/python3", PYTHON)]);
    let (python313, _) = repository.layer(
        LayerKind::Runtime,
        &[(".px/runtime/bin/python3", "#!/bin/sh\necho Python 3.13.0\n")],
    );
    let (shop1, _) = repository.layer(LayerKind::App, &[("shop.py", "1")]);
    let (shop2, _) = repository.layer(LayerKind::App, &[("shop.py", "2")]);
    let (shop3, _) = repository.layer(LayerKind::App, &[("shop.py", "3")]);
    let (blog1, _) = repository.layer(LayerKind::App, &[("blog.py", "1")]);
    let digests =
        |layers: &[&AssignedLayer]| sorted(layers.iter().map(|l| l.sha256.clone()).collect());

    store
        .prepare(&repository.built("shop", 1, &[&python312, &shop1]))
        .await
        .unwrap();
    store
        .prepare(&repository.built("shop", 2, &[&python312, &shop2]))
        .await
        .unwrap();
    store.prune("shop", 2).await;
    // v1 is gone with the layer only it used; the runtime stays for v2.
    assert_eq!(entries(state.path(), "shop"), ["2"]);
    assert_eq!(layer_dirs(state.path()), digests(&[&python312, &shop2]));

    // Another app on the same runtime.
    store
        .prepare(&repository.built("blog", 1, &[&python312, &blog1]))
        .await
        .unwrap();
    // The shop moves to a newer runtime: the old one stays while the blog uses it.
    let v3 = store
        .prepare(&repository.built("shop", 3, &[&python313, &shop3]))
        .await
        .unwrap();
    store.prune("shop", 3).await;
    assert_eq!(entries(state.path(), "shop"), ["3"]);
    assert_eq!(
        layer_dirs(state.path()),
        digests(&[&python312, &python313, &shop3, &blog1])
    );
    // A rollback to v2 would download again what it needs; nothing of v3 was touched.
    assert_eq!(
        std::fs::read_to_string(v3.dir.join("shop.py")).unwrap(),
        "3"
    );
}

#[tokio::test]
async fn a_built_release_runs_on_its_own_runtime_on_a_node_without_one() {
    let repository = Repository::start().await;
    let state = tempfile::tempdir().unwrap();
    let store = store(state.path(), 3, 0);
    let (runtime, _) = repository.layer(LayerKind::Runtime, &[(".px/runtime/bin/python3", PYTHON)]);
    let (app, _) = repository.layer(LayerKind::App, &[("manage.py", "code")]);
    let mut target = repository.built("shop", 1, &[&runtime, &app]);
    target.manifest = px_proto::manifest::AppManifest::parse(
        "name = \"shop\"\nruntime = \"python3>=3.12\"\n[env]\nMODE = \"manifest\"\nLEVEL = \"manifest\"\n",
    )
    .unwrap();
    // `em config set LEVEL=config`: config vars ride on top of the manifest's [env].
    target.env = BTreeMap::from([
        ("MODE".to_string(), "manifest".to_string()),
        ("LEVEL".to_string(), "config".to_string()),
    ]);
    if let Some(build) = target.build.as_mut() {
        build.env.insert("MODE".into(), "build".into());
        build.env.insert("LEVEL".into(), "build".into());
    }

    let prepared = store.prepare(&target).await.unwrap();

    // The node's own PATH has no python3 at all.
    let host = OsString::from("/nonexistent-host-bin");
    crate::runtimes::check(&target.manifest, &prepared.path_over(&host))
        .await
        .unwrap();
    let dirs: Vec<PathBuf> = std::env::split_paths(&prepared.path_over(&host)).collect();
    assert_eq!(
        dirs,
        [
            prepared.dir.join(".px/deps/bin"),
            prepared.dir.join(".px/runtime/bin"),
            prepared.dir.join("bin"),
            PathBuf::from("/nonexistent-host-bin"),
        ]
    );
    // The same release without its runtime layer would not start there.
    let unmet = crate::runtimes::check(
        &target.manifest,
        &process::instance_path_over(&prepared.dir, &host),
    )
    .await
    .unwrap_err();
    assert!(unmet.contains("`python3` is not installed"), "{unmet}");

    // [env] < what the build adds < config vars; `{release}` is this release's directory.
    assert_eq!(prepared.env["MODE"], "build");
    assert_eq!(prepared.env["LEVEL"], "config");
    assert_eq!(
        prepared.env["PYTHONUSERBASE"],
        format!("{}/.px/deps", prepared.dir.display())
    );
}
