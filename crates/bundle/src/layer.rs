//! Layers: a built release's runtime, dependencies and app trees, each in the bundle archive
//! format (docs/src/design/builds.md). [`pack_layer`] packs everything under a directory, with
//! no `.gitignore` walk and no `app.toml` rule; [`inspect_layer`] and [`unpack_layer`] read
//! one through the same entry checker and atomic rename as bundles.

use std::fs;
use std::io::{BufRead, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::error::IoContext;
use crate::pack::{check_sorted, write_archive};
use crate::unpack::{buffered, read_archive, unpack_atomically};
use crate::{BundleError, Limits};

/// Media type of a layer: the bundle format (a tar archive inside a zstd frame).
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.platformx.layer+zstd";

/// What [`pack_layer`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerSummary {
    /// Lowercase hex SHA-256 of the compressed stream: the layer's storage key.
    pub sha256: String,
    /// Compressed bytes written.
    pub size: u64,
    /// Entries (files, directories and symlinks) in the archive.
    pub entries: u64,
    /// Bytes of file content.
    pub unpacked_bytes: u64,
}

/// What a checked layer holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerInfo {
    /// Entries, counting directories only implied by deeper paths.
    pub entries: u64,
    /// Bytes of file content.
    pub unpacked_bytes: u64,
}

/// Packs everything under `dir` into `out` as a layer, streaming.
///
/// The output is as deterministic as a bundle's (sorted by path bytes, headers without
/// times or owners, the same zstd level), so the same tree always gives the same digest,
/// which is what lets a rebuild recognise a layer it already has. Unlike
/// [`pack_dir`](crate::pack_dir), nothing is left out and nothing is required at the root:
/// a layer is what a build produced, not what a developer chose to ship. Every entry still
/// goes through the bundle checker, so a symlink leaving the tree or a special file fails here.
pub fn pack_layer<W: Write>(dir: &Path, out: W) -> Result<LayerSummary, BundleError> {
    let entries = check_sorted(walk_all(dir)?)?;
    let summary = write_archive(&entries, out)?;
    Ok(LayerSummary {
        sha256: summary.sha256,
        size: summary.size,
        entries: summary.entries,
        unpacked_bytes: summary.unpacked_bytes,
    })
}

/// Reads a layer stream and checks every entry exactly as [`unpack_layer`] would, writing
/// nothing. Takes a buffered reader, as [`inspect`](crate::inspect) does. On success the stream
/// has been read to its end.
pub fn inspect_layer<R: BufRead>(reader: R, limits: &Limits) -> Result<LayerInfo, BundleError> {
    let reading = read_archive(reader, limits, None)?;
    Ok(LayerInfo {
        entries: reading.checker.entries(),
        unpacked_bytes: reading.checker.bytes(),
    })
}

/// Unpacks a layer into `dest`, which must not exist: written into a temporary sibling and
/// renamed into place once complete, exactly like [`unpack`](crate::unpack).
pub fn unpack_layer<R: Read>(
    reader: R,
    dest: &Path,
    limits: &Limits,
) -> Result<LayerInfo, BundleError> {
    unpack_atomically(dest, |temp| {
        let reading = read_archive(buffered(reader), limits, Some(temp))?;
        Ok(LayerInfo {
            entries: reading.checker.entries(),
            unpacked_bytes: reading.checker.bytes(),
        })
    })
}

/// Every path under `dir` (not `dir` itself), relative and '/'-separated, with where it is
/// on disk; symlinks are listed, never followed. Iterative, so a deep tree cannot exhaust
/// the stack.
fn walk_all(dir: &Path) -> Result<Vec<(String, PathBuf)>, BundleError> {
    let mut found = Vec::new();
    let mut pending: Vec<(String, PathBuf)> = vec![(String::new(), dir.to_path_buf())];
    while let Some((prefix, path)) = pending.pop() {
        let listing = fs::read_dir(&path).context(|| format!("listing {}", path.display()))?;
        for item in listing {
            let item = item.context(|| format!("listing {}", path.display()))?;
            let name = item.file_name();
            let Ok(name) = std::str::from_utf8(name.as_bytes()) else {
                return Err(BundleError::unsafe_path(
                    format!("{prefix}{}", name.to_string_lossy()),
                    "the path is not valid UTF-8; rename it",
                ));
            };
            let relative = format!("{prefix}{name}");
            let source = item.path();
            let is_dir = item
                .file_type()
                .context(|| format!("reading the type of {}", source.display()))?
                .is_dir();
            if is_dir {
                pending.push((format!("{relative}/"), source.clone()));
            }
            found.push((relative, source));
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_walk_lists_everything_relative_without_following_links() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join(".px/deps/bin")).unwrap();
        fs::write(dir.path().join(".px/deps/bin/tool"), b"x").unwrap();
        fs::write(dir.path().join(".gitignore"), b"*\n").unwrap();
        std::os::unix::fs::symlink(".px", dir.path().join("link")).unwrap();
        let mut found: Vec<String> = walk_all(dir.path())
            .unwrap()
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        found.sort();
        assert_eq!(
            found,
            [
                ".gitignore",
                ".px",
                ".px/deps",
                ".px/deps/bin",
                ".px/deps/bin/tool",
                "link"
            ]
        );
    }
}
