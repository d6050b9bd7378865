//! What an app directory's bundle holds: the walk [`pack_dir`](crate::pack_dir) makes, honouring
//! `.gitignore` and `.emignore` (in every directory) and skipping `.git/`, for anything that
//! must agree with `em deploy` on which files belong to the app (`em dev`'s file watcher).
//!
//! The rules live here once, on the `ignore` crate (the matcher ripgrep uses), so a pattern
//! with a `/` inside, a `**`, a character class or a `!` negation means the same to every
//! caller, and no caller keeps a partial parser of its own that could disagree.

use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ignore::WalkBuilder;

use crate::BundleError;
use crate::pack::EMIGNORE_FILE;

/// Never part of a bundle, at the root or below: version control data is not the app.
const GIT_DIR: &str = ".git";

/// A predicate on entry names that a caller adds to the bundle's own rules.
type NameFilter = Arc<dyn Fn(&OsStr) -> bool + Send + Sync>;

/// The walk over an app directory that decides what its bundle holds. Entries come in no
/// particular order; [`pack_dir`](crate::pack_dir) sorts them itself.
#[derive(Clone)]
pub struct BundleWalk {
    dir: PathBuf,
    skip: Option<NameFilter>,
}

/// One entry the walk found: a file, directory, symlink or special file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalkedPath {
    /// Where it is on disk (the walked directory joined with [`relative`](Self::relative)).
    pub path: PathBuf,
    /// Its path inside the app directory; never empty.
    pub relative: PathBuf,
}

impl std::fmt::Debug for BundleWalk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BundleWalk")
            .field("dir", &self.dir)
            .field("skip", &self.skip.is_some())
            .finish()
    }
}

impl BundleWalk {
    /// The walk of `dir`, with exactly the rules of a bundle.
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            skip: None,
        }
    }

    /// Also leaves out every entry whose name `skip` accepts, at any depth, and for a
    /// directory everything under it (which is never read). For a caller that wants fewer
    /// entries than the bundle holds, never more; replaces any earlier `skipping`.
    pub fn skipping(mut self, skip: impl Fn(&OsStr) -> bool + Send + Sync + 'static) -> Self {
        self.skip = Some(Arc::new(skip));
        self
    }

    /// Walks the directory, without following symlinks. An entry that cannot be read (it
    /// vanished during the walk, a directory without permission) or an ignore file that
    /// cannot be read or parsed is an error item; the walk goes on after it, so a caller can
    /// decide whether it matters.
    pub fn entries(&self) -> impl Iterator<Item = Result<WalkedPath, BundleError>> + use<> {
        let mut walk = WalkBuilder::new(&self.dir);
        walk.standard_filters(false)
            // Dotfiles are part of apps (`.env.example`, `.well-known/`); only ignore files decide.
            .hidden(false)
            // The bundle is the directory itself, not whatever repository it may sit in.
            .parents(false)
            .git_global(false)
            .git_exclude(false)
            .git_ignore(true)
            // Apps are often packed from a plain directory or a tarball checkout.
            .require_git(false)
            // ripgrep's `.ignore` files are not ours; only `.gitignore` and `.emignore` count.
            .ignore(false)
            .add_custom_ignore_filename(EMIGNORE_FILE)
            .follow_links(false);
        let skip = self.skip.clone();
        walk.filter_entry(move |e| {
            // The root itself is never filtered: it is the app, whatever its name.
            e.depth() == 0
                || (e.file_name() != OsStr::new(GIT_DIR)
                    && !skip.as_ref().is_some_and(|skip| skip(e.file_name())))
        });
        let dir = self.dir.clone();
        walk.build().filter_map(move |item| {
            let item = match item {
                Ok(item) => item,
                Err(e) => return Some(Err(walk_error(&dir, e))),
            };
            if item.depth() == 0 {
                return None;
            }
            let path = item.into_path();
            Some(match path.strip_prefix(&dir) {
                Ok(relative) => Ok(WalkedPath {
                    relative: relative.to_path_buf(),
                    path: path.clone(),
                }),
                Err(_) => Err(BundleError::io(
                    format!("walking {}", dir.display()),
                    io::Error::other(format!("{} is outside the directory", path.display())),
                )),
            })
        })
    }
}

fn walk_error(dir: &Path, e: ignore::Error) -> BundleError {
    let context = format!("walking {}", dir.display());
    match e.into_io_error() {
        Some(io) => BundleError::io(context, io),
        None => BundleError::io(context, io::Error::other("cannot read an ignore file")),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn relative_paths(walk: &BundleWalk) -> BTreeSet<String> {
        walk.entries()
            .map(|e| e.unwrap().relative.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn the_walk_honours_nested_ignore_files_negations_and_skips_git_but_not_the_root() {
        let dir = tempfile::tempdir().unwrap();
        // A root named like something skipped is still walked.
        let root = dir.path().join(".git");
        let d = root.as_path();
        std::fs::create_dir_all(d.join(".git/objects")).unwrap();
        std::fs::create_dir_all(d.join("data")).unwrap();
        std::fs::create_dir_all(d.join("sub/data")).unwrap();
        std::fs::create_dir_all(d.join("cache")).unwrap();
        for file in [
            "app.toml",
            ".git/HEAD",
            "data/x.db",
            "sub/data/y.db",
            "a.log",
            "keep.log",
            "cache/blob",
            "sub/local.txt",
            "sub/kept.txt",
        ] {
            std::fs::write(d.join(file), "x").unwrap();
        }
        std::fs::write(d.join(".gitignore"), "data/*.db\n*.log\n!keep.log\n").unwrap();
        std::fs::write(d.join(EMIGNORE_FILE), "cache/\n").unwrap();
        std::fs::write(d.join("sub/.gitignore"), "local.txt\n").unwrap();
        let expected: BTreeSet<String> = [
            ".gitignore",
            ".emignore",
            "app.toml",
            "data",
            "keep.log",
            "sub",
            "sub/.gitignore",
            "sub/data",
            "sub/data/y.db",
            "sub/kept.txt",
        ]
        .into_iter()
        .map(String::from)
        .collect();
        assert_eq!(relative_paths(&BundleWalk::new(d)), expected);

        // A caller's own skips only take entries away, directories with what is under them.
        let fewer = BundleWalk::new(d).skipping(|name| name == "sub" || name == "keep.log");
        let expected_fewer: BTreeSet<String> = expected
            .iter()
            .filter(|p| !p.starts_with("sub") && *p != "keep.log")
            .cloned()
            .collect();
        assert_eq!(relative_paths(&fewer), expected_fewer);
    }
}
