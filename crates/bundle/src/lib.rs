//! App bundles: an app directory packed into a deterministic zstd-compressed tar stream, and
//! the inspection and safe unpacking of such streams (docs/src/design/contracts.md).
//!
//! A bundle is a tar archive (GNU format, normalized headers) inside one zstd frame. `em`
//! packs it on a workstation with [`pack_dir`], the repository checks it at upload time with
//! [`inspect`], and every web server unpacks it into a release directory with [`unpack`].
//! What goes into a bundle is decided by one walk, [`BundleWalk`], public so that `em dev`
//! watches exactly the files `em deploy` would ship.
//!
//! Packing and reading also collect the root files that say what the app is
//! ([`px_proto::detect::RootFiles`]: `Procfile`, `requirements.txt`, `package.json`, ...), so
//! the repository learns it from the one pass it already makes; a Procfile's `web:` line is
//! the run command of an app whose `app.toml` names none. [`root_files`] reads the same files
//! from a directory that is not (yet) an app.
//!
//! Why zstd rather than gzip: it is faster than gzip both when compressing and when
//! decompressing, at a better ratio, which is what a deploy path that packs once on a
//! workstation and unpacks on every web server wants. Its output is deterministic for a fixed
//! level and library version, so the same tree gives the same bytes and the same SHA-256,
//! which lets the repository recognise a re-upload of an unchanged app.
//!
//! Safety model: a bundle is untrusted input. [`inspect`] and [`unpack`] run every entry
//! through the same checker (`check` module), so whatever the repository accepted at upload
//! time, a web server unpacks identically, and nothing a bundle says can make the unpacker
//! write outside the release directory, follow a symlink, create a device, or exhaust the
//! disk or memory beyond [`Limits`].

mod check;
mod error;
mod hash;
mod layer;
mod pack;
mod root;
mod unpack;
mod walk;

pub use check::MAX_NAME_LEN;
pub use error::BundleError;
pub use hash::{HashingReader, HashingWriter};
pub use layer::{
    LAYER_MEDIA_TYPE, LayerInfo, LayerSummary, inspect_layer, pack_layer, unpack_layer,
};
pub use pack::{EMIGNORE_FILE, PackSummary, pack_dir};
pub use root::root_files;
pub use unpack::{BundleInfo, MAX_PAX_HEADER_BYTES, MAX_TRAILING_BYTES, inspect, unpack};
pub use walk::{BundleWalk, WalkedPath};

/// Media type of a bundle: a tar archive inside a zstd frame.
pub const BUNDLE_MEDIA_TYPE: &str = "application/vnd.platformx.bundle+zstd";

/// zstd compression level. Level 3 is zstd's own default: most of the ratio of the higher
/// levels at several hundred MB/s, so packing never dominates `em deploy`. Changing it
/// changes every bundle's bytes and digest.
pub const ZSTD_LEVEL: i32 = 3;

/// Largest zstd window (as a power of two) the unpacker accepts. 2^24 = 16 MiB bounds the
/// decoder's memory per unpack, which matters when the repository inspects several uploads
/// at once; our own level-3 bundles use 2 MiB windows and even `zstd -19` stays at 8 MiB.
pub const ZSTD_WINDOW_LOG_MAX: u32 = 24;

/// Default for [`Limits::max_entries`]: a large Node.js app with its `node_modules` has tens
/// of thousands of files; past 100 000 it is almost certainly packing something by mistake.
pub const DEFAULT_MAX_ENTRIES: u64 = 100_000;

/// Default for [`Limits::max_unpacked_bytes`]: 4 GiB holds any reasonable app with its
/// dependencies and assets, and stops a decompression bomb long before it fills a disk.
pub const DEFAULT_MAX_UNPACKED_BYTES: u64 = 4 * 1024 * 1024 * 1024;

/// Default for [`Limits::max_path_len`]: Linux's `PATH_MAX` is 4096 for whole paths, but no
/// real app needs relative paths longer than 1024 bytes, and a short bound keeps error
/// messages and bookkeeping small.
pub const DEFAULT_MAX_PATH_LEN: usize = 1024;

/// What a bundle may contain before [`inspect`] and [`unpack`] refuse it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Most entries (files, directories and symlinks) in one bundle.
    pub max_entries: u64,
    /// Most bytes of file content, counted while copying, so a bomb stops early.
    pub max_unpacked_bytes: u64,
    /// Longest entry path or symlink target, in bytes.
    pub max_path_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_entries: DEFAULT_MAX_ENTRIES,
            max_unpacked_bytes: DEFAULT_MAX_UNPACKED_BYTES,
            max_path_len: DEFAULT_MAX_PATH_LEN,
        }
    }
}
