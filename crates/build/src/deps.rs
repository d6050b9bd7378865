//! The dependencies cache of an app: the key (the installer input files, the runtime layer's
//! digest, the installer's version and the build settings), the trees and archives kept by
//! key in `<app cache>/deps/<key>/`, and the last key's inputs, so a miss can say what changed.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::IoContext;
use crate::{BuildError, fsutil};

/// The file naming the last key's inputs.
const LAST_INPUTS: &str = "last.json";
/// Kept entries beyond which the oldest are removed: a few keys cover switching back and forth
/// between branches; more would only fill the disk.
const MAX_CACHED_KEYS: usize = 4;

/// What the dependencies key is made of, by name (`requirements.txt`, `runtime`, `installer`,
/// `settings`), each a digest or a short value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Inputs(pub BTreeMap<String, String>);

impl Inputs {
    /// Digests `files` of `dir` (absent ones as `absent`) and adds the other inputs.
    pub(crate) fn read(
        dir: &Path,
        files: &[&str],
        others: &[(&str, String)],
    ) -> Result<Self, BuildError> {
        let mut map = BTreeMap::new();
        for name in files {
            let path = dir.join(name);
            let value = match fs::read(&path) {
                Ok(bytes) => hex::encode(Sha256::digest(&bytes)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => "absent".into(),
                Err(e) => return Err(BuildError::io(format!("reading {}", path.display()), e)),
            };
            map.insert((*name).to_string(), value);
        }
        for (name, value) in others {
            map.insert((*name).to_string(), value.clone());
        }
        Ok(Self(map))
    }

    /// The key: SHA-256 over every input, in name order.
    pub(crate) fn key(&self) -> String {
        let mut hasher = Sha256::new();
        for (name, value) in &self.0 {
            hasher.update(name.as_bytes());
            hasher.update([0]);
            hasher.update(value.as_bytes());
            hasher.update([0]);
        }
        hex::encode(hasher.finalize())
    }

    /// Names of the inputs that differ from `before` (changed, added or gone).
    pub(crate) fn changed_since(&self, before: &Inputs) -> Vec<String> {
        let mut names: Vec<String> = self
            .0
            .iter()
            .filter(|(name, value)| before.0.get(*name) != Some(*value))
            .map(|(name, _)| name.clone())
            .collect();
        names.extend(
            before
                .0
                .keys()
                .filter(|name| !self.0.contains_key(*name))
                .cloned(),
        );
        names
    }
}

/// A cached dependencies entry.
#[derive(Debug, Clone)]
pub(crate) struct Cached {
    /// The tree as the release holds it (`.px/deps/...` or `node_modules/...`).
    pub tree: PathBuf,
    /// For a Node app with a build script: `node_modules` before the dev dependencies were
    /// pruned, which the build script needs.
    pub full: Option<PathBuf>,
    pub archive: PathBuf,
    pub sha256: String,
    pub size: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Stored {
    sha256: String,
    size: u64,
}

/// `<app cache>/deps/`.
#[derive(Debug)]
pub(crate) struct DepsCache {
    dir: PathBuf,
}

impl DepsCache {
    pub(crate) fn new(app_cache: &Path) -> Self {
        Self {
            dir: app_cache.join("deps"),
        }
    }

    pub(crate) fn lookup(&self, key: &str) -> Option<Cached> {
        let root = self.dir.join(key);
        let stored: Stored =
            serde_json::from_slice(&fs::read(root.join("layer.json")).ok()?).ok()?;
        let archive = root.join("layer");
        if !archive.is_file() || !root.join("tree").is_dir() {
            return None;
        }
        let full = root.join("full");
        Some(Cached {
            tree: root.join("tree"),
            full: full.is_dir().then_some(full),
            archive,
            sha256: stored.sha256,
            size: stored.size,
        })
    }

    /// The inputs of the last build's key, if any.
    pub(crate) fn last_inputs(&self) -> Option<Inputs> {
        serde_json::from_slice(&fs::read(self.dir.join(LAST_INPUTS)).ok()?).ok()
    }

    /// Remembers `inputs` as the last build's.
    pub(crate) fn set_last(&self, inputs: &Inputs) -> Result<(), BuildError> {
        fs::create_dir_all(&self.dir).context(|| format!("creating {}", self.dir.display()))?;
        let json = serde_json::to_vec(inputs)
            .map_err(|e| BuildError::io("describing the inputs", std::io::Error::other(e)))?;
        let temp = self.dir.join(format!(".{LAST_INPUTS}.tmp"));
        fs::write(&temp, json).context(|| format!("writing {}", temp.display()))?;
        fs::rename(&temp, self.dir.join(LAST_INPUTS))
            .context(|| format!("writing {}", self.dir.display()))
    }

    /// Keeps a freshly built entry: `tree` and `full` are moved in, `archive` linked or copied;
    /// all of it appears under the key at once. Older entries beyond [`MAX_CACHED_KEYS`] go.
    pub(crate) fn store(
        &self,
        key: &str,
        tree: &Path,
        full: Option<&Path>,
        archive: &Path,
        sha256: &str,
        size: u64,
    ) -> Result<Cached, BuildError> {
        fs::create_dir_all(&self.dir).context(|| format!("creating {}", self.dir.display()))?;
        let temp = tempfile::Builder::new()
            .prefix(&format!(".{key}.tmp-"))
            .tempdir_in(&self.dir)
            .context(|| format!("creating a directory in {}", self.dir.display()))?;
        // Readable by the build's user (collectstatic imports from it), writable by nobody
        // but the builder.
        fs::set_permissions(
            temp.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .context(|| format!("setting the mode of {}", temp.path().display()))?;
        move_tree(tree, &temp.path().join("tree"))?;
        if let Some(full) = full {
            move_tree(full, &temp.path().join("full"))?;
        }
        fsutil::link_or_copy(archive, &temp.path().join("layer"))?;
        let stored = serde_json::to_vec(&Stored {
            sha256: sha256.into(),
            size,
        })
        .map_err(|e| BuildError::io("describing the layer", std::io::Error::other(e)))?;
        fs::write(temp.path().join("layer.json"), stored)
            .context(|| "writing the layer's description".into())?;
        let made = temp.keep();
        let dest = self.dir.join(key);
        fsutil::publish(&made, &dest)?;
        self.prune(key);
        self.lookup(key).ok_or_else(|| {
            BuildError::io(
                format!("reading {}", dest.display()),
                std::io::Error::other("the cached entry vanished"),
            )
        })
    }

    /// Removes the oldest entries beyond [`MAX_CACHED_KEYS`], never `keep`; best effort.
    fn prune(&self, keep: &str) {
        let Ok(listing) = fs::read_dir(&self.dir) else {
            return;
        };
        let mut entries: Vec<(std::time::SystemTime, PathBuf)> = listing
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| n.len() == 64 && n != keep)
            })
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        entries.sort();
        let excess = (entries.len() + 1).saturating_sub(MAX_CACHED_KEYS);
        for (_, path) in entries.into_iter().take(excess) {
            let _ = fsutil::remove_all(&path);
        }
    }
}

/// Moves a tree by renaming it, or copies and removes it across file systems.
pub(crate) fn move_tree(from: &Path, to: &Path) -> Result<(), BuildError> {
    if fs::rename(from, to).is_ok() {
        return Ok(());
    }
    fsutil::copy_tree(from, to, &|_| false, fsutil::AbsoluteLinks::Keep)?;
    fsutil::remove_all(from)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_key_follows_the_inputs_and_a_miss_names_what_changed() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("requirements.txt"), b"django\n").unwrap();
        let others = [
            ("runtime", "aa".to_string()),
            ("installer", "uv 1".to_string()),
        ];
        let first = Inputs::read(dir.path(), &["requirements.txt"], &others).unwrap();
        assert_eq!(
            first.key(),
            Inputs::read(dir.path(), &["requirements.txt"], &others)
                .unwrap()
                .key()
        );
        fs::write(dir.path().join("requirements.txt"), b"django\ngunicorn\n").unwrap();
        let second = Inputs::read(dir.path(), &["requirements.txt"], &others).unwrap();
        assert_ne!(first.key(), second.key());
        assert_eq!(second.changed_since(&first), ["requirements.txt"]);
        let other_runtime = Inputs::read(
            dir.path(),
            &["requirements.txt"],
            &[
                ("runtime", "bb".to_string()),
                ("installer", "uv 1".to_string()),
            ],
        )
        .unwrap();
        assert_eq!(other_runtime.changed_since(&second), ["runtime"]);
    }
}
