//! Helpers shared by the integration tests: writing source trees, building bundles by hand
//! (including hostile ones the real packer would never produce), and checking that a refused
//! unpack leaves nothing behind.

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use px_bundle::{BundleError, Limits, inspect, pack_dir, unpack};
use tar::{EntryType, Header};

pub const MANIFEST: &str = "name = \"hello\"\nrun = \"python3 server.py\"\n";

/// Writes `content` at `root/rel`, creating parents; `exec` sets 0o755, otherwise 0o644.
pub fn write(root: &Path, rel: &str, content: &[u8], exec: bool) {
    let path = root.join(rel);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(&path, content).unwrap();
    let mode = if exec { 0o755 } else { 0o644 };
    fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
}

pub fn pack(dir: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    pack_dir(dir, &mut out).unwrap();
    out
}

/// A GNU header with `name` and `link` written as raw bytes, so paths the tar crate's
/// setters refuse (`..`, absolute) can be expressed.
pub fn raw_header(name: &[u8], kind: EntryType, size: u64, mode: u32, link: &[u8]) -> Header {
    let mut header = Header::new_gnu();
    {
        let gnu = header.as_gnu_mut().unwrap();
        gnu.name[..name.len()].copy_from_slice(name);
        gnu.linkname[..link.len()].copy_from_slice(link);
    }
    header.set_entry_type(kind);
    header.set_size(size);
    header.set_mode(mode);
    header.set_mtime(0);
    header.set_cksum();
    header
}

/// Builds a tar archive in a zstd frame, entry by entry.
pub struct Hand {
    builder: tar::Builder<zstd::Encoder<'static, Vec<u8>>>,
}

impl Default for Hand {
    fn default() -> Self {
        Self::new()
    }
}

impl Hand {
    pub fn new() -> Self {
        Self {
            builder: tar::Builder::new(zstd::Encoder::new(Vec::new(), 3).unwrap()),
        }
    }

    /// Starts with a valid `app.toml`, so a refusal is about the entries added after it.
    pub fn with_manifest() -> Self {
        Self::new().file("app.toml", MANIFEST.as_bytes(), 0o644)
    }

    pub fn file(self, name: &str, data: &[u8], mode: u32) -> Self {
        self.raw(name.as_bytes(), EntryType::Regular, mode, b"", data)
    }

    /// A file added through the tar crate's own path handling, which writes a GNU long name
    /// entry for paths over 100 bytes.
    pub fn long_file(mut self, name: &str, data: &[u8]) -> Self {
        let mut header = Header::new_gnu();
        header.set_entry_type(EntryType::Regular);
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        self.builder.append_data(&mut header, name, data).unwrap();
        self
    }

    pub fn dir(self, name: &str) -> Self {
        self.raw(name.as_bytes(), EntryType::Directory, 0o755, b"", b"")
    }

    pub fn symlink(self, name: &str, target: &str) -> Self {
        self.raw(
            name.as_bytes(),
            EntryType::Symlink,
            0o777,
            target.as_bytes(),
            b"",
        )
    }

    pub fn raw(
        mut self,
        name: &[u8],
        kind: EntryType,
        mode: u32,
        link: &[u8],
        data: &[u8],
    ) -> Self {
        let header = raw_header(name, kind, data.len() as u64, mode, link);
        self.builder.append(&header, data).unwrap();
        self
    }

    /// Appends a header whose declared size is `size`, with data from `data`.
    pub fn sized(mut self, header: &Header, data: impl Read) -> Self {
        self.builder.append(header, data).unwrap();
        self
    }

    pub fn finish(self) -> Vec<u8> {
        self.builder.into_inner().unwrap().finish().unwrap()
    }

    /// The uncompressed tar archive, for tests that cut or extend it.
    pub fn tar(self) -> Vec<u8> {
        zstd::decode_all(&self.finish()[..]).unwrap()
    }
}

/// Checks that both `inspect` and `unpack` refuse `bundle` with the same error, and that the
/// failed unpack left neither `dest` nor a temporary directory behind.
pub fn refused(bundle: &[u8], limits: &Limits) -> BundleError {
    let inspected = inspect(bundle, limits).expect_err("inspect accepted a bad bundle");
    let parent = tempfile::tempdir().unwrap();
    let dest = parent.path().join("release");
    let unpacked = unpack(bundle, &dest, limits).expect_err("unpack accepted a bad bundle");
    assert_eq!(
        inspected.to_string(),
        unpacked.to_string(),
        "inspect and unpack disagree"
    );
    assert!(!dest.exists(), "dest exists after a failed unpack");
    let left: Vec<_> = fs::read_dir(parent.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        left.is_empty(),
        "left behind after a failed unpack: {left:?}"
    );
    assert!(unpacked.is_client_error(), "{unpacked:?}");
    unpacked
}

/// Asserts an `UnsafePath` naming `path` whose message contains `reason`.
pub fn assert_unsafe(e: &BundleError, path: &str, reason: &str) {
    match e {
        BundleError::UnsafePath { path: p, reason: r } => {
            assert_eq!(p, path, "{e}");
            assert!(r.contains(reason), "{e}");
            assert!(e.to_string().contains(&format!("`{path}`")), "{e}");
        }
        other => panic!("expected UnsafePath for {path}, got {other:?}"),
    }
}

/// A reader that counts the bytes taken from it.
pub struct Counting<R> {
    pub inner: R,
    pub read: u64,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        Ok(n)
    }
}

/// A writer that discards and counts.
pub struct Sink(pub u64);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
