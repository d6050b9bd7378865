//! Packing: walks an app directory ([`BundleWalk`]: `.gitignore` and `.emignore` honoured,
//! `.git/` skipped) and streams it as a deterministic tar archive through zstd into any writer.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use px_proto::detect::RootFiles;
use px_proto::manifest::{APPRUNNER_FILE, AppManifest, MANIFEST_FILE, MAX_MANIFEST_BYTES};
use tar::{EntryType, Header};

use crate::check::{self, Checker, Kind, RawKind};
use crate::error::IoContext;
use crate::root;
use crate::walk::{BundleWalk, WalkedPath};
use crate::{BundleError, HashingWriter, Limits, ZSTD_LEVEL};

/// Name of the per-app ignore file, read with `.gitignore` syntax in every directory; for
/// what should stay in git but not be deployed (tests, docs, local data).
pub const EMIGNORE_FILE: &str = ".emignore";

/// What [`pack_dir`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackSummary {
    /// Lowercase hex SHA-256 of the compressed stream.
    pub sha256: String,
    /// Compressed bytes written.
    pub size: u64,
    /// Entries (files, directories and symlinks) in the archive.
    pub entries: u64,
    /// Bytes of file content.
    pub unpacked_bytes: u64,
    /// The detection files at the root, as packed (`px_proto::detect::detect` reads them).
    pub root_files: RootFiles,
}

/// One entry found in the source tree, already checked.
pub(crate) struct SourceEntry {
    /// Relative, '/'-separated path inside the bundle.
    path: String,
    /// Where it is on disk.
    source: PathBuf,
    kind: Kind,
}

/// Packs `dir` into `out` as a zstd-compressed tar stream, streaming (the bundle is never
/// held in memory).
///
/// Before writing anything it checks that `app.toml` is part of the bundle and parses, that
/// either `run` is set, an executable regular file `apprunner` is at the root, or the
/// Procfile has a `web:` line (returned as `run` in the manifest), and that detection makes an
/// app of the root files (`px_proto::detect`), as the repository will check them. Every
/// entry goes through the same checker as [`unpack`](crate::unpack), so a symlink pointing
/// outside the tree or a special file fails here rather than on the server. The size and
/// entry limits are not applied: they are the server's configuration, and it reports them.
///
/// The output depends only on the tree's paths, contents, exec bits and symlink targets:
/// entries are sorted by path bytes, headers carry no times, owners or other modes, and zstd
/// runs single-threaded at [`ZSTD_LEVEL`].
pub fn pack_dir<W: Write>(dir: &Path, out: W) -> Result<(PackSummary, AppManifest), BundleError> {
    let entries = collect(dir)?;
    let (manifest, root_files) = check_root(&entries)?;
    let mut summary = write_archive(&entries, out)?;
    summary.root_files = root_files;
    Ok((summary, manifest))
}

/// Writes checked, sorted entries as the deterministic tar-in-zstd stream that bundles and
/// layers share, hashing on the way.
pub(crate) fn write_archive<W: Write>(
    entries: &[SourceEntry],
    out: W,
) -> Result<PackSummary, BundleError> {
    let mut encoder = zstd::Encoder::new(HashingWriter::new(out), ZSTD_LEVEL)
        .context(|| "starting the zstd encoder".to_string())?;
    // The frame checksum lets the unpacker notice corruption the tar format would not.
    // Without a pledged size the content size is never written; say so explicitly so the
    // output cannot change with the library's defaults.
    encoder
        .include_checksum(true)
        .and_then(|()| encoder.include_contentsize(false))
        .context(|| "configuring the zstd encoder".to_string())?;
    let mut builder = tar::Builder::new(encoder);

    let mut unpacked_bytes = 0u64;
    for entry in entries {
        let mut header = Header::new_gnu();
        // A GNU header starts zeroed: mtime 0, uid/gid 0, empty user and group names.
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        let written = match &entry.kind {
            Kind::Dir { .. } => {
                header.set_entry_type(EntryType::Directory);
                header.set_mode(0o755);
                header.set_size(0);
                builder.append_data(&mut header, &entry.path, io::empty())
            }
            Kind::Symlink { target } => {
                header.set_entry_type(EntryType::Symlink);
                header.set_mode(0o777);
                header.set_size(0);
                builder.append_link(&mut header, &entry.path, target)
            }
            Kind::File { exec } => {
                header.set_entry_type(EntryType::Regular);
                header.set_mode(if *exec { 0o755 } else { 0o644 });
                let file = File::open(&entry.source)
                    .context(|| format!("opening {}", entry.source.display()))?;
                let size = file
                    .metadata()
                    .context(|| format!("reading the size of {}", entry.source.display()))?
                    .len();
                header.set_size(size);
                unpacked_bytes += size;
                let exact = ExactReader {
                    inner: file.take(size),
                    remaining: size,
                };
                builder.append_data(&mut header, &entry.path, exact)
            }
        };
        written.context(|| format!("packing {}", entry.source.display()))?;
    }
    let encoder = builder
        .into_inner()
        .context(|| "finishing the tar archive".to_string())?;
    let mut hashing = encoder
        .finish()
        .context(|| "finishing the zstd stream".to_string())?;
    hashing
        .flush()
        .context(|| "flushing the bundle".to_string())?;
    let (_, sha256, size) = hashing.finish();
    Ok(PackSummary {
        sha256,
        size,
        entries: entries.len() as u64,
        unpacked_bytes,
        // What detection reads is the bundle's business; `pack_dir` fills it in.
        root_files: RootFiles::new(),
    })
}

/// Reads exactly `remaining` bytes, failing if the file shrank while being packed (a short
/// entry would corrupt the archive; a grown file is cut by the `take`).
struct ExactReader<R> {
    inner: R,
    remaining: u64,
}

impl<R: Read> Read for ExactReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && self.remaining > 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the file shrank while it was being packed; pack again",
            ));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// Walks the tree and returns its entries sorted by path bytes, each checked.
fn collect(dir: &Path) -> Result<Vec<SourceEntry>, BundleError> {
    let mut found = Vec::new();
    for item in BundleWalk::new(dir).entries() {
        let WalkedPath {
            path: source,
            relative,
        } = item?;
        let mut path = Vec::new();
        for (i, component) in relative.iter().enumerate() {
            if i > 0 {
                path.push(b'/');
            }
            path.extend_from_slice(component.as_bytes());
        }
        let Ok(path) = String::from_utf8(path) else {
            return Err(BundleError::unsafe_path(
                relative.to_string_lossy(),
                "the path is not valid UTF-8; rename it",
            ));
        };
        found.push((path, source));
    }
    check_sorted(found)
}

/// Sorts found paths (relative, '/'-separated, with where each is on disk) and runs each
/// through the checker, reading its type from the disk without following symlinks.
pub(crate) fn check_sorted(
    mut found: Vec<(String, PathBuf)>,
) -> Result<Vec<SourceEntry>, BundleError> {
    // `str` orders by bytes, which is the order the spec promises.
    found.sort_by(|a, b| a.0.cmp(&b.0));

    // Shape rules only: the limits belong to the server that receives the bundle.
    let mut checker = Checker::new(&Limits {
        max_entries: u64::MAX,
        max_unpacked_bytes: u64::MAX,
        max_path_len: usize::MAX,
    });
    let mut entries = Vec::with_capacity(found.len());
    for (path, source) in found {
        let meta = fs::symlink_metadata(&source)
            .context(|| format!("reading the metadata of {}", source.display()))?;
        let file_type = meta.file_type();
        let target;
        let raw_kind = if file_type.is_dir() {
            RawKind::Dir
        } else if file_type.is_file() {
            RawKind::File {
                exec: meta.permissions().mode() & 0o111 != 0,
            }
        } else if file_type.is_symlink() {
            target = fs::read_link(&source)
                .context(|| format!("reading the symlink {}", source.display()))?;
            RawKind::Symlink {
                target: target.as_os_str().as_bytes(),
            }
        } else if file_type.is_fifo() {
            RawKind::Unsupported("fifo")
        } else if file_type.is_socket() {
            RawKind::Unsupported("socket")
        } else if file_type.is_char_device() {
            RawKind::Unsupported("character device")
        } else if file_type.is_block_device() {
            RawKind::Unsupported("block device")
        } else {
            RawKind::Unsupported("special file")
        };
        let checked = checker.check(path.as_bytes(), raw_kind)?;
        entries.push(SourceEntry {
            path: checked.path,
            source,
            kind: checked.kind,
        });
    }
    Ok(entries)
}

/// Applies the root rules to what will actually be packed, so an `app.toml`, `apprunner` or
/// detection file left out by an ignore file is noticed here and not on the server.
fn check_root(entries: &[SourceEntry]) -> Result<(AppManifest, RootFiles), BundleError> {
    let mut manifest = None;
    let mut runner = false;
    let mut root_files = RootFiles::new();
    for entry in entries {
        if matches!(entry.kind, Kind::File { .. }) && RootFiles::file_use(&entry.path).is_some() {
            let size = fs::symlink_metadata(&entry.source)
                .context(|| format!("reading the size of {}", entry.source.display()))?
                .len();
            root::read_into(&mut root_files, &entry.path, &entry.source, size)?;
        }
        if entry.path == MANIFEST_FILE {
            if !matches!(entry.kind, Kind::File { .. }) {
                return Err(check::manifest_not_regular());
            }
            let file = File::open(&entry.source)
                .context(|| format!("opening {}", entry.source.display()))?;
            let mut text = Vec::new();
            file.take(MAX_MANIFEST_BYTES + 1)
                .read_to_end(&mut text)
                .context(|| format!("reading {}", entry.source.display()))?;
            if text.len() as u64 > MAX_MANIFEST_BYTES {
                return Err(check::manifest_too_large());
            }
            manifest = Some(text);
        } else if entry.path == APPRUNNER_FILE {
            runner = matches!(entry.kind, Kind::File { exec: true });
        }
    }
    let manifest = check::check_root(manifest, runner, &root_files)?;
    check::check_detection(&manifest, &root_files)?;
    Ok((manifest, root_files))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_reader_refuses_a_file_that_shrank() {
        let mut r = ExactReader {
            inner: &b"abc"[..],
            remaining: 5,
        };
        let mut out = Vec::new();
        let e = r.read_to_end(&mut out).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        let mut r = ExactReader {
            inner: &b"abc"[..],
            remaining: 3,
        };
        out.clear();
        r.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"abc");
    }
}
