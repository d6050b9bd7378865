//! `em dev`'s file watcher: the app directory walked every [`WATCH_INTERVAL`], over exactly the
//! files `em deploy` would bundle ([`px_bundle::BundleWalk`]: `.gitignore` and `.emignore` in
//! every directory, `.git/` skipped), less what changes without the app's code changing.
//!
//! Polling rather than inotify: it needs no new dependency, works the same on every file
//! system (network and container mounts included), and at the bounded tree size
//! ([`MAX_WATCH_ENTRIES`]) a walk costs milliseconds. Files the app itself writes inside its
//! directory (a SQLite database, uploads) must be ignored in `.gitignore` or `.emignore`, as
//! they would be for a deploy, or every write restarts it.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use px_bundle::BundleWalk;
use px_proto::manifest::MANIFEST_FILE;
use tokio::sync::mpsc;

use super::output::warn;

/// How often the directory is walked. Half a second feels immediate after a save, and even a
/// tree at [`MAX_WATCH_ENTRIES`] costs only a small fraction of it to stat.
pub const WATCH_INTERVAL: Duration = Duration::from_millis(500);
/// After a change is seen, the tree is walked again this much later until two walks agree, so
/// an editor's save in several steps (write a temp file, rename, chmod) causes one restart of
/// the finished files, not one of a half-written file.
pub const SETTLE_INTERVAL: Duration = Duration::from_millis(100);
/// Most extra walks waiting for the tree to settle (one second); a tree that keeps changing
/// (a build writing into it) is restarted for anyway rather than never.
pub const MAX_SETTLE_ROUNDS: u32 = 10;
/// Most files and directories watched. Beyond it a walk every [`WATCH_INTERVAL`] would cost
/// real CPU and memory (a fingerprint entry is about 100 bytes); such trees almost always hold
/// a dependency or build directory that belongs in `.emignore`, so watching stops with a
/// warning that says so.
pub const MAX_WATCH_ENTRIES: usize = 50_000;

// What `em dev` never watches besides what a bundle leaves out. These skips are not about
// bundles, so they stay here rather than in `px_bundle`: a vendored `node_modules` or a `bin/`
// virtual environment may be deployed on purpose. But they change without the app's own code
// changing (an editor saving a swap file, Python writing bytecode, a package manager
// installing), or hold too many files to walk twice a second, and a restart for each of those
// writes would make `em dev` unusable.

/// Directory and file names never watched, at any depth: other version control systems' data
/// (`.git/` is never in a bundle), dependency directories and caches, and `4913`, the probe
/// file Vim writes before every save.
pub const SKIP_NAMES: &[&str] = &[
    ".hg",
    ".svn",
    "node_modules",
    "__pycache__",
    "target",
    ".venv",
    "venv",
    ".mypy_cache",
    ".pytest_cache",
    ".ruff_cache",
    ".tox",
    ".DS_Store",
    "4913",
];
/// Editors' lock files (Emacs `.#name`).
pub const SKIP_PREFIXES: &[&str] = &[".#"];
/// Editors' swap, backup and temporary files (Vim, Emacs, JetBrains), and Python bytecode.
pub const SKIP_SUFFIXES: &[&str] = &[
    "~",
    ".swp",
    ".swo",
    ".swx",
    ".pyc",
    "___jb_tmp___",
    "___jb_old___",
];

/// One watched entry as last seen. Directories count by presence only: their times change
/// whenever an entry inside does, which the entry itself already shows, and the path named
/// in "restarted (changed: …)" should be the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stamp {
    Dir,
    Other {
        len: u64,
        mtime: (i64, i64),
        /// Catches a chmod (an `apprunner` made executable) and same-size rewrites within
        /// one mtime tick.
        ctime: (i64, i64),
        /// Catches an editor's save by rename.
        ino: u64,
    },
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Self {
        if meta.is_dir() {
            return Self::Dir;
        }
        Self::Other {
            len: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
            ino: meta.ino(),
        }
    }
}

/// Relative path → stamp of every watched entry.
type Fingerprint = BTreeMap<PathBuf, Stamp>;

#[derive(Debug)]
enum WalkError {
    TooMany,
    Failed(String),
}

impl WalkError {
    fn warning(&self, dir: &Path) -> String {
        match self {
            WalkError::TooMany => format!(
                "{} holds more than {MAX_WATCH_ENTRIES} files and directories, too many to watch; not restarting on changes (leave dependency and build directories out with .emignore, or restart em dev by hand)",
                dir.display()
            ),
            WalkError::Failed(e) => format!(
                "cannot watch {} for changes ({e}); not restarting on changes (restart em dev by hand)",
                dir.display()
            ),
        }
    }
}

/// Whether `name` is one of `em dev`'s own skips (see [`SKIP_NAMES`]).
fn skipped(name: &OsStr) -> bool {
    let bytes = name.as_bytes();
    SKIP_NAMES.iter().any(|skip| name == OsStr::new(skip))
        || SKIP_PREFIXES
            .iter()
            .any(|prefix| bytes.starts_with(prefix.as_bytes()))
        || SKIP_SUFFIXES
            .iter()
            .any(|suffix| bytes.ends_with(suffix.as_bytes()))
}

/// Walks `dir` as [`BundleWalk`] does (without following symlinks), less the skips above.
fn fingerprint(dir: &Path) -> Result<Fingerprint, WalkError> {
    walk(dir, MAX_WATCH_ENTRIES)
}

/// [`fingerprint`] with the entry limit as a parameter, so tests need not make 50 000 files.
fn walk(dir: &Path, max_entries: usize) -> Result<Fingerprint, WalkError> {
    // The directory itself gone or unreadable is worth saying; an entry that vanished during
    // the walk is not (the next walk sees the tree again), and an ignore file that does not
    // parse is `em deploy`'s to report: its valid lines still apply.
    std::fs::read_dir(dir).map_err(|e| WalkError::Failed(e.to_string()))?;
    let mut found = Fingerprint::new();
    for entry in BundleWalk::new(dir).skipping(skipped).entries() {
        let Ok(entry) = entry else {
            continue;
        };
        // Not following symlinks, so a link loop is one entry.
        let Ok(meta) = std::fs::symlink_metadata(&entry.path) else {
            continue;
        };
        if found.len() >= max_entries {
            return Err(WalkError::TooMany);
        }
        found.insert(entry.relative, Stamp::of(&meta));
    }
    // `em dev` reads the manifest on every restart whatever an ignore file says (a bundle
    // without it is refused anyway), so a change to it always counts.
    if !found.contains_key(Path::new(MANIFEST_FILE))
        && let Ok(meta) = std::fs::symlink_metadata(dir.join(MANIFEST_FILE))
    {
        found.insert(PathBuf::from(MANIFEST_FILE), Stamp::of(&meta));
    }
    Ok(found)
}

/// [`fingerprint`] on the blocking pool: a walk is many `stat` calls.
async fn fingerprint_in_background(dir: PathBuf) -> Result<Fingerprint, WalkError> {
    tokio::task::spawn_blocking(move || fingerprint(&dir))
        .await
        .map_err(|e| WalkError::Failed(e.to_string()))?
}

/// The first path (in sorted order) that was added, removed or changed.
fn first_difference(old: &Fingerprint, new: &Fingerprint) -> Option<PathBuf> {
    let changed = new
        .iter()
        .filter(|(path, stamp)| old.get(*path) != Some(stamp))
        .map(|(path, _)| path)
        .next();
    let removed = old.keys().find(|path| !new.contains_key(*path));
    match (changed, removed) {
        (Some(a), Some(b)) => Some(a.min(b).clone()),
        (a, b) => a.or(b).cloned(),
    }
}

/// Takes the first fingerprint of `dir` now (so an edit made while the first instance starts
/// counts) and watches it from then on: the receiver yields the first changed path of each
/// change. `None`, with a warning, when the directory cannot be watched at all.
pub async fn start(dir: PathBuf) -> Option<mpsc::Receiver<PathBuf>> {
    match fingerprint_in_background(dir.clone()).await {
        Ok(first) => {
            let (tx, rx) = mpsc::channel(1);
            tokio::spawn(watch_files(dir, first, tx));
            Some(rx)
        }
        Err(e) => {
            warn(e.warning(&dir));
            None
        }
    }
}

/// The next changed path; never resolves once watching has stopped.
pub async fn next_change(changes: &mut Option<mpsc::Receiver<PathBuf>>) -> PathBuf {
    loop {
        let Some(rx) = changes.as_mut() else {
            return std::future::pending().await;
        };
        match rx.recv().await {
            Some(path) => return path,
            // The watcher gave up (and said why); keep serving without it.
            None => *changes = None,
        }
    }
}

/// Walks `dir` every [`WATCH_INTERVAL`] and sends the first changed path of each change.
/// The channel holds one change: while one waits, later ones are dropped, since the restart
/// it triggers reads the files after them anyway. Ends (with a warning) when the tree grows
/// too large or cannot be read, and when the receiver is gone.
async fn watch_files(dir: PathBuf, mut last: Fingerprint, changes: mpsc::Sender<PathBuf>) {
    loop {
        tokio::time::sleep(WATCH_INTERVAL).await;
        if changes.is_closed() {
            return;
        }
        let mut now = match fingerprint_in_background(dir.clone()).await {
            Ok(now) => now,
            Err(e) => {
                warn(e.warning(&dir));
                return;
            }
        };
        let Some(path) = first_difference(&last, &now) else {
            continue;
        };
        for _ in 0..MAX_SETTLE_ROUNDS {
            tokio::time::sleep(SETTLE_INTERVAL).await;
            match fingerprint_in_background(dir.clone()).await {
                Ok(again) if again == now => break,
                Ok(again) => now = again,
                Err(e) => {
                    warn(e.warning(&dir));
                    return;
                }
            }
        }
        last = now;
        match changes.try_send(path) {
            Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => {}
            Err(mpsc::error::TrySendError::Closed(_)) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::collections::BTreeSet;

    use super::*;

    /// Makes `relative` under `root`: a directory when it ends in '/', else a file.
    fn make(root: &Path, relative: &str) {
        let path = root.join(relative);
        if relative.ends_with('/') {
            std::fs::create_dir_all(path).unwrap();
        } else {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, "x").unwrap();
        }
    }

    #[test]
    fn ignore_patterns_skip_names_suffixes_and_prefixes_but_never_the_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // The lines the old parser was tested with, now read by the bundle's own rules. A lone
        // `*` is left out: it leaves everything out of a bundle, which `em deploy` refuses.
        std::fs::write(
            d.join(".gitignore"),
            "# comment\ndist/\n/.env\n*.log\nnpm-debug.log*\n!keep.log\ndata/*.db\napp.toml\n",
        )
        .unwrap();
        for entry in [
            "dist/",
            ".env",
            "x.log",
            "npm-debug.log.1",
            "node_modules/",
            ".#a.py",
            "a.py~",
            "4913",
            "server.py",
            "data/",
            "x.db",
            "keep",
            "app.toml",
            "public/",
        ] {
            make(d, entry);
        }
        let watched = fingerprint(d).unwrap();
        let skips = |name: &str| !watched.contains_key(Path::new(name));
        for skipped in [
            "dist",
            ".env",
            "x.log",
            "npm-debug.log.1",
            "node_modules",
            ".#a.py",
            "a.py~",
            "4913",
        ] {
            assert!(skips(skipped), "{skipped}");
        }
        for kept in ["server.py", "data", "x.db", "keep", "app.toml", "public"] {
            assert!(!skips(kept), "{kept}");
        }
    }

    #[test]
    fn the_fingerprint_sees_edits_additions_and_removals_but_not_skipped_entries() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("app.toml"), "name = \"x\"").unwrap();
        std::fs::create_dir_all(d.join("src/deep")).unwrap();
        std::fs::write(d.join("src/deep/a.py"), "1").unwrap();
        std::fs::create_dir_all(d.join("node_modules/pkg")).unwrap();
        std::fs::write(d.join(".gitignore"), "*.sqlite\n").unwrap();
        let first = fingerprint(d).unwrap();
        assert!(first.contains_key(Path::new("src/deep/a.py")));
        assert!(!first.keys().any(|p| p.starts_with("node_modules")));

        std::fs::write(d.join("node_modules/pkg/index.js"), "x").unwrap();
        std::fs::write(d.join("data.sqlite"), "x").unwrap();
        std::fs::write(d.join("src/deep/a.py~"), "x").unwrap();
        assert_eq!(first_difference(&first, &fingerprint(d).unwrap()), None);

        std::fs::write(d.join("src/deep/a.py"), "22").unwrap();
        let edited = fingerprint(d).unwrap();
        assert_eq!(
            first_difference(&first, &edited),
            Some(PathBuf::from("src/deep/a.py"))
        );
        std::fs::remove_file(d.join("src/deep/a.py")).unwrap();
        std::fs::write(d.join("src/new.py"), "").unwrap();
        let now = fingerprint(d).unwrap();
        assert_eq!(
            first_difference(&edited, &now),
            Some(PathBuf::from("src/deep/a.py"))
        );
        assert_eq!(first_difference(&now, &now), None);
    }

    #[test]
    fn too_many_entries_stop_the_walk() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("many");
        std::fs::create_dir(&d).unwrap();
        for i in 0..10 {
            std::fs::File::create(d.join(i.to_string())).unwrap();
        }
        // The directory and its ten files.
        assert_eq!(walk(dir.path(), 11).unwrap().len(), 11);
        assert!(matches!(walk(dir.path(), 10), Err(WalkError::TooMany)));
    }

    /// Every path under `root`, relative, '/'-separated.
    fn tree(root: &Path) -> BTreeSet<String> {
        let mut found = BTreeSet::new();
        let mut pending = vec![root.to_path_buf()];
        while let Some(dir) = pending.pop() {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                let relative = path
                    .strip_prefix(root)
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .to_string();
                if path.is_dir() {
                    pending.push(path);
                }
                found.insert(relative);
            }
        }
        found
    }

    #[test]
    fn em_dev_watches_exactly_the_files_em_deploy_bundles() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("app.toml"), "name = \"x\"\nrun = \"true\"\n").unwrap();
        // Patterns the old watcher's own parser did not understand: a `/` inside (anchored to
        // the ignore file's directory), `**`, a character class, a `!` negation, and ignore
        // files below the root.
        std::fs::write(
            d.join(".gitignore"),
            "data/*.db\n**/tmp/*.txt\nlog[0-9].txt\n*.log\n!keep.log\n",
        )
        .unwrap();
        std::fs::write(d.join(px_bundle::EMIGNORE_FILE), "/docs/\n").unwrap();
        for entry in [
            "server.py",
            "data/x.db",
            "data/notes.md",
            "sub/data/y.db",
            "sub/tmp/a.txt",
            "tmp/b.txt",
            "tmp/keep.md",
            "log1.txt",
            "logs.txt",
            "a.log",
            "keep.log",
            "docs/guide.md",
            "sub/docs/kept.md",
            "sub/.gitignore",
            "sub/local.txt",
        ] {
            make(d, entry);
        }
        std::fs::write(d.join("sub/.gitignore"), "local.txt\n").unwrap();

        let mut bundle = Vec::new();
        px_bundle::pack_dir(d, &mut bundle).unwrap();
        let unpacked = tempfile::tempdir().unwrap();
        let release = unpacked.path().join("release");
        px_bundle::unpack(bundle.as_slice(), &release, &px_bundle::Limits::default()).unwrap();
        let deployed = tree(&release);

        let watched: BTreeSet<String> = fingerprint(d)
            .unwrap()
            .into_keys()
            .map(|p| p.to_str().unwrap().to_string())
            .collect();
        assert_eq!(watched, deployed);
        // What the old parser got wrong, both ways: these were watched though never deployed…
        for left_out in ["data/x.db", "sub/tmp/a.txt", "tmp/b.txt", "log1.txt"] {
            assert!(!watched.contains(left_out), "{left_out}");
        }
        // …and this was not watched though deployed.
        assert!(watched.contains("keep.log"));
        assert!(!watched.contains("a.log"));
        assert!(watched.contains("sub/data/y.db"));
    }
}
