//! Layers on this node's disk (docs/src/design/builds.md): each layer a built release is made
//! of is unpacked once into `state_dir/layers/<sha256>/`, its files made read-only, and
//! releases are assembled from layers with hard links, so releases sharing a runtime or
//! dependencies share their bytes and inodes. A release records the layers it was made of in
//! its own `.px/layers`, which is how a collection knows which layers kept releases still use.
//!
//! Concurrency: one fetch per digest at a time (two apps on one runtime deploying together
//! download it once); every assembly holds the collection lock shared from before it looks
//! for missing layers until its release is renamed into place, and a collection takes it
//! exclusively, or skips its turn when an assembly is in flight, so a layer is never removed
//! while a release is being linked from it. A removed layer costs a kept release nothing:
//! its hard links keep the bytes alive.
//!
//! What was downloaded is counted per kind of layer (`/metrics`), so an operator, and the
//! builds benchmark, can see that a code-only deploy fetched its app layer alone.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use px_proto::build::{AssignedLayer, LayerKind};
use tokio::sync::{OwnedRwLockReadGuard, RwLock};

use super::error::DeployError;
use super::store::{Fetch, dir_bytes, fetch};

/// Directory of the unpacked layers, in `state_dir`.
pub(crate) const LAYERS_DIR: &str = "layers";
/// The file, inside a built release, listing the digests of its layers (one per line).
pub(crate) const RELEASE_LAYERS_FILE: &str = ".px/layers";
/// Largest layer downloaded: apprepo stores layers under the same limit as bundles.
pub(crate) const MAX_LAYER_BYTES: u64 = super::store::MAX_BUNDLE_BYTES;

/// The unpacked layers of one node.
pub(super) struct Layers {
    dir: PathBuf,
    /// Shared by assemblies, exclusive for a collection (see the module doc).
    collection: Arc<RwLock<()>>,
    /// One lock per digest being fetched, so a layer is downloaded and unpacked once.
    fetching: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Layers downloaded whole, and their bytes, by kind ([`KINDS`] order).
    fetched: [Fetched; KINDS.len()],
}

/// The kinds of layer, in the order their counters are kept and shown.
const KINDS: [LayerKind; 3] = [LayerKind::Runtime, LayerKind::Dependencies, LayerKind::App];

/// Downloads of one kind of layer since Maestro started.
#[derive(Default)]
struct Fetched {
    layers: AtomicU64,
    bytes: AtomicU64,
}

impl Layers {
    pub(super) fn new(state_dir: &Path) -> Self {
        Self {
            dir: state_dir.join(LAYERS_DIR),
            collection: Arc::new(RwLock::new(())),
            fetching: Mutex::new(HashMap::new()),
            fetched: Default::default(),
        }
    }

    /// Prometheus lines: the layers this node downloaded whole (size and SHA-256 checked) since
    /// it started, and the bytes it received for them, by kind. A layer already here is not
    /// downloaded, so a code-only deploy adds only its app layer.
    pub(super) fn render_metrics(&self) -> String {
        let mut out = String::from(
            "# HELP maestro_layers_fetched_total Layers downloaded whole from the repository.\n\
             # TYPE maestro_layers_fetched_total counter\n",
        );
        for (kind, fetched) in KINDS.iter().zip(&self.fetched) {
            out.push_str(&format!(
                "maestro_layers_fetched_total{{kind=\"{}\"}} {}\n",
                kind.as_str(),
                fetched.layers.load(Ordering::Relaxed)
            ));
        }
        out.push_str(
            "# HELP maestro_layer_fetched_bytes_total Bytes received for the layers downloaded whole.\n\
             # TYPE maestro_layer_fetched_bytes_total counter\n",
        );
        for (kind, fetched) in KINDS.iter().zip(&self.fetched) {
            out.push_str(&format!(
                "maestro_layer_fetched_bytes_total{{kind=\"{}\"}} {}\n",
                kind.as_str(),
                fetched.bytes.load(Ordering::Relaxed)
            ));
        }
        out
    }

    /// Counts one layer of `kind` downloaded whole, `bytes` long.
    fn count_fetch(&self, kind: LayerKind, bytes: u64) {
        if let Some(i) = KINDS.iter().position(|k| *k == kind) {
            self.fetched[i].layers.fetch_add(1, Ordering::Relaxed);
            self.fetched[i].bytes.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    /// Where the layer with this (checked) digest is unpacked.
    pub(super) fn path(&self, sha256: &str) -> PathBuf {
        self.dir.join(sha256)
    }

    pub(super) fn has(&self, sha256: &str) -> bool {
        self.path(sha256).is_dir()
    }

    /// Held while a release is assembled: no collection runs meanwhile.
    pub(super) async fn assembling(&self) -> OwnedRwLockReadGuard<()> {
        self.collection.clone().read_owned().await
    }

    /// Downloads `layer` (its size and SHA-256 checked) and unpacks it into its directory,
    /// unless it is there already. On failure nothing of it is left behind.
    pub(super) async fn fetch(
        &self,
        layer: &AssignedLayer,
        http: &reqwest::Client,
        token: Option<&str>,
    ) -> Result<(), DeployError> {
        let what = format!("{} layer", layer.kind.as_str());
        if layer.size > MAX_LAYER_BYTES {
            return Err(DeployError::TooLarge {
                what,
                limit: MAX_LAYER_BYTES,
            });
        }
        let lock = self.lock_for(&layer.sha256);
        let _fetching = lock.lock().await;
        let dest = self.path(&layer.sha256);
        if dest.is_dir() {
            return Ok(());
        }
        tokio::fs::create_dir_all(&self.dir)
            .await
            .map_err(|source| DeployError::Storage {
                doing: "creating",
                path: self.dir.clone(),
                source,
            })?;
        // Only this fetch writes this name: the digest's lock is held.
        let download = self.dir.join(format!(".download-{}", layer.sha256));
        let fetched = fetch(
            http,
            token,
            &Fetch {
                url: &layer.url,
                sha256: &layer.sha256,
                what: &what,
                limit: layer.size,
            },
            &download,
        )
        .await;
        let unpacked = match fetched {
            Ok(bytes) => {
                // Counted once received and checked, whether or not the unpack then works:
                // the bytes crossed the network either way.
                self.count_fetch(layer.kind, bytes);
                unpack(download.clone(), dest).await
            }
            Err(e) => Err(e),
        };
        let _ = tokio::fs::remove_file(&download).await;
        unpacked
    }

    /// The lock of one digest; locks nobody holds any more are dropped on the way.
    fn lock_for(&self, sha256: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut fetching = self.fetching.lock().unwrap_or_else(|p| p.into_inner());
        fetching.retain(|_, lock| Arc::strong_count(lock) > 1);
        fetching
            .entry(sha256.to_string())
            .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(())))
            .clone()
    }

    /// Removes every layer no release under `apps_dir` lists (and what a crash left
    /// half-written), then measures what the layers left weigh. `None` when a release is being
    /// assembled: the collection waits for the next prune rather than for it.
    pub(super) async fn collect(&self, apps_dir: PathBuf) -> Option<u64> {
        let Ok(exclusive) = self.collection.clone().try_write_owned() else {
            tracing::debug!("a release is being assembled; collecting unused layers later");
            return None;
        };
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || {
            let _exclusive = exclusive;
            let used = layers_in_use(&apps_dir);
            let mut kept = 0u64;
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let path = entry.path();
                if used.contains(&name) {
                    kept += dir_bytes(&path, &mut Default::default()).weight;
                    continue;
                }
                let removed = if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
                match removed {
                    Ok(()) => tracing::info!(layer = %name, "removed a layer no kept release uses"),
                    Err(e) => {
                        tracing::warn!(layer = %name, error = %e, "removing an unused layer failed")
                    }
                }
            }
            kept
        })
        .await
        .ok()
    }
}

/// The digests listed by the releases under `apps_dir` (`<app>/releases/<n>/.px/layers`).
fn layers_in_use(apps_dir: &Path) -> BTreeSet<String> {
    let mut used = BTreeSet::new();
    for app in std::fs::read_dir(apps_dir).into_iter().flatten().flatten() {
        let releases = app.path().join("releases");
        for release in std::fs::read_dir(&releases).into_iter().flatten().flatten() {
            let numbered = release
                .file_name()
                .to_str()
                .is_some_and(|n| n.parse::<u64>().is_ok());
            if !numbered {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(release.path().join(RELEASE_LAYERS_FILE)) else {
                continue;
            };
            used.extend(
                text.lines()
                    .filter(|line| px_proto::names::check_sha256_hex(line).is_ok())
                    .map(str::to_string),
            );
        }
    }
    used
}

/// Unpacks the downloaded layer into `dest` and makes its files read-only, on a blocking
/// thread; `px_bundle::unpack_layer` leaves nothing behind when it fails.
async fn unpack(archive: PathBuf, dest: PathBuf) -> Result<(), DeployError> {
    tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&archive).map_err(DeployError::ReadDownload)?;
        px_bundle::unpack_layer(
            io::BufReader::new(file),
            &dest,
            &px_bundle::Limits::default(),
        )
        .map_err(DeployError::Unpack)?;
        // Every release made from the layer shares these inodes: an instance writing into one
        // of its files would change it for all of them. Maestro does not run as root on a
        // cluster, so read-only files cannot be written through a release.
        read_only(&dest).map_err(|source| {
            let _ = std::fs::remove_dir_all(&dest);
            DeployError::Storage {
                doing: "making read-only",
                path: dest.clone(),
                source,
            }
        })
    })
    .await
    .map_err(DeployError::UnpackTask)?
}

/// Takes the write permission off every regular file under `dir` (symlinks not followed).
fn read_only(dir: &Path) -> io::Result<()> {
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                pending.push(entry.path());
            } else if kind.is_file() {
                let path = entry.path();
                let mode = entry.metadata()?.permissions().mode();
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & !0o222))?;
            }
        }
    }
    Ok(())
}

/// Assembles release `dest` from the unpacked `layers`, in order, with hard links: directories
/// are made, symlinks recreated, files linked (a later layer's entry replaces an earlier one's
/// at the same path), and `.px/layers` lists `digests`. Built in a temporary sibling renamed
/// into place only when complete, so a release directory is always whole.
pub(super) fn assemble(layers: &[PathBuf], digests: &[String], dest: &Path) -> io::Result<()> {
    let parent = dest
        .parent()
        .ok_or_else(|| io::Error::other("a release directory has a parent"))?;
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = tempfile::Builder::new()
        .prefix(&format!(".assemble-{name}-"))
        .tempdir_in(parent)?;
    for layer in layers {
        link_tree(layer, temp.path())?;
    }
    let record = temp.path().join(RELEASE_LAYERS_FILE);
    if let Some(px) = record.parent() {
        std::fs::create_dir_all(px)?;
    }
    remove_any(&record)?;
    let mut listing = digests.join("\n");
    listing.push('\n');
    std::fs::write(&record, listing)?;
    std::fs::set_permissions(temp.path(), std::fs::Permissions::from_mode(0o755))?;
    let assembled = temp.keep();
    if let Err(e) = std::fs::rename(&assembled, dest) {
        let _ = std::fs::remove_dir_all(&assembled);
        return Err(e);
    }
    std::fs::File::open(parent)?.sync_all()
}

/// Mirrors the tree `from` into `to` with hard links (iterative: a deep tree cannot exhaust
/// the stack).
fn link_tree(from: &Path, to: &Path) -> io::Result<()> {
    let mut pending = vec![(from.to_path_buf(), to.to_path_buf())];
    while let Some((from, to)) = pending.pop() {
        for entry in std::fs::read_dir(&from)? {
            let entry = entry?;
            let source = entry.path();
            let target = to.join(entry.file_name());
            let kind = entry.file_type()?;
            if kind.is_dir() {
                if !std::fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir()) {
                    remove_any(&target)?;
                    std::fs::create_dir(&target)?;
                    let mode = entry.metadata()?.permissions().mode();
                    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode))?;
                }
                pending.push((source, target));
            } else if kind.is_symlink() {
                remove_any(&target)?;
                std::os::unix::fs::symlink(std::fs::read_link(&source)?, &target)?;
            } else if kind.is_file() {
                remove_any(&target)?;
                std::fs::hard_link(&source, &target)?;
            }
            // Nothing else passes the layer checker (no devices, FIFOs or sockets).
        }
    }
    Ok(())
}

/// Removes whatever is at `path`, if anything (a directory with all it holds).
fn remove_any(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}
