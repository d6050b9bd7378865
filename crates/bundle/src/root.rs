//! The detection files at an app's root ([`px_proto::detect::RootFiles`]), collected the way
//! the bundle holds them: from a directory ([`root_files`], for `em init` and `em deploy`'s
//! hints), from the entries [`pack_dir`](crate::pack_dir) packs, and from a bundle stream while
//! [`inspect`](crate::inspect) and [`unpack`](crate::unpack) read it. Only regular files
//! count, only the known names are kept, and only up to
//! [`MAX_DETECT_FILE_BYTES`](px_proto::detect::MAX_DETECT_FILE_BYTES) of each.

use std::ffi::OsStr;
use std::fs::File;
use std::io::Read;
use std::path::Path;

use px_proto::detect::{FileUse, MAX_DETECT_FILE_BYTES, RootFiles};

use crate::BundleError;
use crate::error::IoContext;
use crate::walk::{BundleWalk, WalkedPath};

/// The detection files at the root of the app directory `dir`, as its bundle would hold them:
/// a file left out by `.gitignore` or `.emignore` is not seen, a symlink is not followed, and
/// nothing below the root is walked.
pub fn root_files(dir: &Path) -> Result<RootFiles, BundleError> {
    let walk = BundleWalk::new(dir).skipping(|name: &OsStr| {
        // Everything that is not a detection file is skipped, directories included, so the
        // walk does not descend (below a directory named like one, only root paths count).
        name.to_str().and_then(RootFiles::file_use).is_none()
    });
    let mut files = RootFiles::new();
    for item in walk.entries() {
        let WalkedPath { path, relative } = item?;
        let Some(name) = relative.to_str() else {
            continue;
        };
        if relative.components().count() != 1 {
            continue;
        }
        let meta = std::fs::symlink_metadata(&path)
            .context(|| format!("reading the metadata of {}", path.display()))?;
        if meta.file_type().is_file() {
            read_into(&mut files, name, &path, meta.len())?;
        }
    }
    Ok(files)
}

/// Records the regular file at `path`, the root file `name` of `size` bytes, reading its
/// content only when detection needs it and it is within the limit.
pub(crate) fn read_into(
    files: &mut RootFiles,
    name: &str,
    path: &Path,
    size: u64,
) -> Result<(), BundleError> {
    let content = match RootFiles::file_use(name) {
        None => return Ok(()),
        Some(FileUse::Content) if size <= MAX_DETECT_FILE_BYTES => {
            let file = File::open(path).context(|| format!("opening {}", path.display()))?;
            let mut content = Vec::with_capacity(size as usize);
            // One byte past the limit tells a file that grew since its size was read.
            file.take(MAX_DETECT_FILE_BYTES + 1)
                .read_to_end(&mut content)
                .context(|| format!("reading {}", path.display()))?;
            let size = content.len() as u64;
            files.insert(name, size, Some(content));
            return Ok(());
        }
        Some(_) => None,
    };
    files.insert(name, size, content);
    Ok(())
}

/// Collects root files from a bundle stream: [`start`](Self::start) on each regular file,
/// [`chunk`](Self::chunk) with its bytes, [`finish`](Self::finish) once it was copied whole.
#[derive(Debug, Default)]
pub(crate) struct RootCollector {
    files: RootFiles,
    /// The root file being read: its name and, when detection reads it, its bytes so far.
    current: Option<(String, Option<Vec<u8>>)>,
}

impl RootCollector {
    /// A regular file at `path` of `size` bytes begins.
    pub fn start(&mut self, path: &str, size: u64) {
        self.current = match RootFiles::file_use(path) {
            None => None,
            Some(FileUse::Content) if size <= MAX_DETECT_FILE_BYTES => {
                Some((path.to_string(), Some(Vec::with_capacity(size as usize))))
            }
            Some(_) => Some((path.to_string(), None)),
        };
    }

    pub fn chunk(&mut self, bytes: &[u8]) {
        if let Some((_, Some(content))) = &mut self.current {
            content.extend_from_slice(bytes);
        }
    }

    /// The file of `size` bytes was copied whole.
    pub fn finish(&mut self, size: u64) {
        if let Some((name, content)) = self.current.take() {
            self.files.insert(&name, size, content);
        }
    }

    pub fn into_files(self) -> RootFiles {
        self.files
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_keeps_only_known_root_files_within_the_limit() {
        let mut c = RootCollector::default();
        for (path, bytes) in [
            ("Procfile", &b"web: x"[..]),
            ("server.py", b"print(1)"),
            ("sub/package.json", b"{}"),
            ("manage.py", b"import django"),
        ] {
            c.start(path, bytes.len() as u64);
            c.chunk(bytes);
            c.finish(bytes.len() as u64);
        }
        c.start("package.json", MAX_DETECT_FILE_BYTES + 1);
        c.chunk(b"{");
        c.finish(MAX_DETECT_FILE_BYTES + 1);
        let files = c.into_files();
        assert_eq!(
            files.names().collect::<Vec<_>>(),
            ["Procfile", "manage.py", "package.json"]
        );
        assert_eq!(
            files.get("Procfile").unwrap().content.as_deref(),
            Some(&b"web: x"[..])
        );
        // Presence only, and too large: sizes, no bytes kept.
        assert_eq!(files.get("manage.py").unwrap().content, None);
        let big = files.get("package.json").unwrap();
        assert_eq!(
            (big.size, big.content.is_none()),
            (MAX_DETECT_FILE_BYTES + 1, true)
        );
    }
}
