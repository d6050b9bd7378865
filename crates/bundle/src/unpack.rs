//! Reading bundles: [`inspect`] checks a bundle without writing anything, [`unpack`] writes it
//! into a fresh directory. Both run the same reading loop, so they accept and refuse the same
//! entries; `inspect`, the gate of new uploads, also refuses a bundle whose root files
//! detection cannot make an app of (see `check::check_detection` for why `unpack` does not).

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use px_proto::manifest::{APPRUNNER_FILE, AppManifest, MANIFEST_FILE, MAX_MANIFEST_BYTES};
use tar::EntryType;

use crate::check::{self, Checked, Checker, Kind, RawKind};
use crate::error::IoContext;
use crate::root::RootCollector;
use crate::{BundleError, Limits, ZSTD_WINDOW_LOG_MAX};

/// Largest pax extended header accepted. Real ones hold a path, a link target and a few
/// attributes, well under 4 KiB; refusing bigger ones before reading them keeps a hostile
/// header from costing memory or decompression time.
pub const MAX_PAX_HEADER_BYTES: u64 = 64 * 1024;

/// Most zero bytes accepted after the tar end-of-archive block. GNU tar pads archives to a
/// 10 KiB record; anything well beyond that is not padding.
pub const MAX_TRAILING_BYTES: u64 = 1024 * 1024;

/// Copy buffer size: large enough that system call overhead does not matter, small enough to
/// allocate per unpack without thought.
const COPY_BUFFER_BYTES: usize = 64 * 1024;

/// How much of an over-long GNU long name is read, only to name it in the error.
const SHOWN_LONG_NAME_BYTES: u64 = 256;

/// What a checked bundle holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleInfo {
    /// The parsed, validated `app.toml`, with `run` taken from the Procfile's `web:` line
    /// when the file names no `run` and the bundle has no executable `apprunner`.
    pub manifest: AppManifest,
    /// The detection files at the bundle's root (`px_proto::detect::detect` reads them).
    pub root_files: px_proto::detect::RootFiles,
    /// Entries, counting directories only implied by deeper paths.
    pub entries: u64,
    /// Bytes of file content.
    pub unpacked_bytes: u64,
    /// Names of the executables (or symlinks) directly in `bin/`, at most
    /// `MAX_BIN_COMMANDS`: what the bundle ships on the instances' `PATH`.
    pub bin_commands: std::collections::BTreeSet<String>,
}

/// Most `bin/` entries [`BundleInfo::bin_commands`] lists; the rest are not listed.
pub const MAX_BIN_COMMANDS: usize = 256;

/// Reads a compressed bundle stream and checks every entry exactly as [`unpack`] would,
/// without writing anything; reads and validates `app.toml`, checks the runner rule and what
/// detection makes of the root files. For the repository, which must refuse bad bundles at
/// upload time.
///
/// Takes a buffered reader, whose buffer the decoder reads from directly: a caller that already
/// holds the bytes in memory (the repository's upload blocks) spares a copy; wrap any other
/// reader in a [`std::io::BufReader`]. On success the stream has been read to its end, so a
/// [`HashingReader`](crate::HashingReader) under `reader` has seen every byte.
pub fn inspect<R: BufRead>(reader: R, limits: &Limits) -> Result<BundleInfo, BundleError> {
    let info = read_bundle(reader, limits, None)?;
    check::check_detection(&info.manifest, &info.root_files)?;
    Ok(info)
}

/// Unpacks a bundle into `dest`, which must not exist.
///
/// The bundle is written into a temporary directory next to `dest` (same parent, named
/// `.<dest-name>.tmp-XXXXXX`) which is renamed to `dest` only once everything was checked and
/// written, so `dest` either holds the whole release or does not exist; on any error the
/// temporary directory is removed. The root directory and the parent are fsynced around the
/// rename so the rename survives a crash. Files are not fsynced one by one: a large app has
/// tens of thousands of them and every web server unpacks every release, so that cost would
/// land on each deploy.
///
/// Files get mode 0o755 when the bundle marks them executable and 0o644 otherwise,
/// directories 0o755, whatever the process umask.
pub fn unpack<R: Read>(reader: R, dest: &Path, limits: &Limits) -> Result<BundleInfo, BundleError> {
    unpack_atomically(dest, |temp| {
        read_bundle(buffered(reader), limits, Some(temp))
    })
}

/// `reader` behind a buffer of the size the decoder reads best in (zstd's recommended input
/// size, 128 KiB), as `zstd::Decoder::new` would make.
pub(crate) fn buffered<R: Read>(reader: R) -> io::BufReader<R> {
    io::BufReader::with_capacity(zstd::zstd_safe::DCtx::in_size(), reader)
}

/// Runs `write` on a fresh temporary directory beside `dest` and renames it to `dest` once
/// `write` succeeded: `dest` must not exist, and ends up whole or absent (the temporary
/// directory is removed on any error). Shared by bundles and layers.
pub(crate) fn unpack_atomically<T>(
    dest: &Path,
    write: impl FnOnce(&Path) -> Result<T, BundleError>,
) -> Result<T, BundleError> {
    let shown = dest.display();
    match fs::symlink_metadata(dest) {
        Ok(_) => {
            return Err(BundleError::io(
                format!("unpacking into {shown}"),
                io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "the destination already exists",
                ),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(BundleError::io(format!("checking {shown}"), e)),
    }
    let Some(name) = dest.file_name() else {
        return Err(BundleError::io(
            format!("unpacking into {shown}"),
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "the destination has no file name",
            ),
        ));
    };
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let temp = tempfile::Builder::new()
        .prefix(&format!(".{}.tmp-", name.to_string_lossy()))
        .tempdir_in(&parent)
        .context(|| format!("creating a temporary directory in {}", parent.display()))?;

    // From here on, returning early drops `temp`, which removes the partial tree.
    let info = write(temp.path())?;
    set_mode(temp.path(), 0o755)?;
    sync_dir(temp.path())?;

    let temp_path = temp.keep();
    if let Err(e) = fs::rename(&temp_path, dest) {
        // Best effort: the rename error is the one worth reporting.
        let _ = fs::remove_dir_all(&temp_path);
        return Err(BundleError::io(
            format!("renaming the unpacked bundle to {shown}"),
            e,
        ));
    }
    if let Err(e) = sync_dir(&parent) {
        // The promise is all or nothing; a rename that may not survive a crash is nothing.
        let _ = fs::remove_dir_all(dest);
        return Err(e);
    }
    Ok(info)
}

fn sync_dir(dir: &Path) -> Result<(), BundleError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .context(|| format!("syncing {}", dir.display()))
}

fn set_mode(path: &Path, mode: u32) -> Result<(), BundleError> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .context(|| format!("setting the mode of {}", path.display()))
}

/// Marks errors that come from the caller's reader, so they are reported as I/O errors (the
/// server's problem) and not as a corrupt bundle (the client's).
#[derive(Debug)]
struct SourceError(io::Error);

impl std::fmt::Display for SourceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for SourceError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

struct Source<R>(R);

impl<R: Read> Read for Source<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // The kind is kept so `Interrupted` is still retried by the layers above.
        self.0.read(buf).map_err(source_error)
    }
}

impl<R: BufRead> BufRead for Source<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        self.0.fill_buf().map_err(source_error)
    }

    fn consume(&mut self, n: usize) {
        self.0.consume(n);
    }
}

/// Marks an error as the source's, keeping its kind.
fn source_error(e: io::Error) -> io::Error {
    io::Error::new(e.kind(), SourceError(e))
}

/// Classifies an error met while reading the stream.
fn read_error(e: io::Error) -> BundleError {
    if e.get_ref().is_some_and(|inner| inner.is::<SourceError>()) {
        BundleError::io("reading the bundle", e)
    } else {
        BundleError::Corrupt(e.to_string())
    }
}

/// Path and link overrides that extension headers (GNU long name and long link, pax) carry
/// for the next real entry.
#[derive(Default)]
struct Pending {
    path: Option<Vec<u8>>,
    link: Option<Vec<u8>>,
    pax: bool,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.path.is_none() && self.link.is_none() && !self.pax
    }
}

/// State of one pass over a bundle.
pub(crate) struct Reading<'a> {
    pub(crate) checker: Checker,
    /// Where to write, for [`unpack`]; `None` for [`inspect`].
    root: Option<&'a Path>,
    manifest: Option<Vec<u8>>,
    runner_executable: bool,
    bin_commands: std::collections::BTreeSet<String>,
    root_files: RootCollector,
    buffer: Vec<u8>,
}

fn read_bundle<R: BufRead>(
    reader: R,
    limits: &Limits,
    root: Option<&Path>,
) -> Result<BundleInfo, BundleError> {
    let mut reading = read_archive(reader, limits, root)?;
    let root_files = reading.root_files.into_files();
    let manifest = check::check_root(
        reading.manifest.take(),
        reading.runner_executable,
        &root_files,
    )?;
    Ok(BundleInfo {
        manifest,
        root_files,
        entries: reading.checker.entries(),
        unpacked_bytes: reading.checker.bytes(),
        bin_commands: reading.bin_commands,
    })
}

/// Reads the whole archive, checking every entry (and writing it below `root` when given),
/// with no rule about what the root holds: what bundles and layers have in common.
pub(crate) fn read_archive<'a, R: BufRead>(
    reader: R,
    limits: &Limits,
    root: Option<&'a Path>,
) -> Result<Reading<'a>, BundleError> {
    let mut decoder = zstd::Decoder::with_buffer(Source(reader)).map_err(read_error)?;
    decoder
        .window_log_max(ZSTD_WINDOW_LOG_MAX)
        .map_err(read_error)?;
    let mut archive = tar::Archive::new(decoder);
    let mut reading = Reading {
        checker: Checker::new(limits),
        root,
        manifest: None,
        runner_executable: false,
        bin_commands: Default::default(),
        root_files: RootCollector::default(),
        buffer: vec![0; COPY_BUFFER_BYTES],
    };
    {
        // Raw mode hands us GNU long name and pax headers instead of reading them into memory
        // unbounded, so their sizes can be checked first.
        let entries = archive.entries().map_err(read_error)?.raw(true);
        let mut pending = Pending::default();
        for entry in entries {
            let mut entry = entry.map_err(read_error)?;
            reading.entry(&mut entry, &mut pending)?;
        }
        if !pending.is_empty() {
            return Err(BundleError::Corrupt(
                "the archive ends with an extension header but no entry".into(),
            ));
        }
    }
    // Read the rest of the stream: it must be zero padding, the zstd frame must end properly
    // (a truncated upload fails here), and a hashing reader around `reader` sees every byte.
    let mut decoder = archive.into_inner();
    check_trailer(&mut decoder, &mut reading.buffer)?;
    io::copy(&mut decoder.finish(), &mut io::sink()).map_err(read_error)?;
    Ok(reading)
}

fn check_trailer(decoder: &mut impl Read, buffer: &mut [u8]) -> Result<(), BundleError> {
    let mut trailing = 0u64;
    loop {
        let n = match decoder.read(buffer) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(read_error(e)),
        };
        trailing += n as u64;
        if trailing > MAX_TRAILING_BYTES || buffer[..n].iter().any(|b| *b != 0) {
            return Err(BundleError::Corrupt(
                "there is data after the end of the tar archive".into(),
            ));
        }
    }
}

impl Reading<'_> {
    fn entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        pending: &mut Pending,
    ) -> Result<(), BundleError> {
        let header = entry.header();
        let entry_type = header.entry_type();
        let size = header.entry_size().map_err(read_error)?;
        let max_name = (self.checker.max_path_len() as u64).saturating_add(1);
        match entry_type {
            EntryType::GNULongName => {
                if pending.path.is_some() {
                    return Err(BundleError::Corrupt("two long names for one entry".into()));
                }
                pending.path = Some(read_long_name(entry, size, max_name, "the path")?);
                return Ok(());
            }
            EntryType::GNULongLink => {
                if pending.link.is_some() {
                    return Err(BundleError::Corrupt(
                        "two long link names for one entry".into(),
                    ));
                }
                pending.link = Some(read_long_name(entry, size, max_name, "a symlink target")?);
                return Ok(());
            }
            EntryType::XHeader => {
                if pending.pax {
                    return Err(BundleError::Corrupt("two pax headers for one entry".into()));
                }
                pending.pax = true;
                let data = read_pax(entry, size)?;
                for (key, value) in parse_pax(&data)? {
                    match key {
                        b"path" => pending.path = Some(value.to_vec()),
                        b"linkpath" => pending.link = Some(value.to_vec()),
                        // Honouring a size override would make this reader and the tar
                        // crate disagree on where the next header starts; our bundles never
                        // need one (files stay far below the 8 GiB a ustar size can hold).
                        b"size" => {
                            return Err(BundleError::Corrupt(
                                "pax `size` records are not supported".into(),
                            ));
                        }
                        k if k.starts_with(b"GNU.sparse.") => {
                            return Err(BundleError::Corrupt(
                                "sparse files are not supported".into(),
                            ));
                        }
                        // Times, owners and the like are normalized away anyway.
                        _ => {}
                    }
                }
                return Ok(());
            }
            EntryType::XGlobalHeader => {
                // `git archive` writes one with the commit id; nothing in it matters here.
                self.checker.count_entry()?;
                read_pax(entry, size)?;
                return Ok(());
            }
            _ => {}
        }

        let raw_path = match pending.path.take() {
            Some(p) => p,
            None => header.path_bytes().into_owned(),
        };
        let raw_link = match pending.link.take() {
            Some(l) => Some(l),
            None => header.link_name_bytes().map(|l| l.into_owned()),
        };
        pending.pax = false;
        let unknown;
        let raw_kind = match entry_type {
            EntryType::Regular | EntryType::Continuous => {
                let mode = header.mode().map_err(read_error)?;
                RawKind::File {
                    exec: mode & 0o111 != 0,
                }
            }
            EntryType::Directory => RawKind::Dir,
            EntryType::Symlink => RawKind::Symlink {
                target: raw_link.as_deref().unwrap_or(b""),
            },
            EntryType::Link => RawKind::Unsupported("hard link"),
            EntryType::Char => RawKind::Unsupported("character device"),
            EntryType::Block => RawKind::Unsupported("block device"),
            EntryType::Fifo => RawKind::Unsupported("fifo"),
            EntryType::GNUSparse => RawKind::Unsupported("sparse file"),
            other => {
                unknown = format!("tar entry of type {:?}", char::from(other.as_byte()));
                RawKind::Unsupported(&unknown)
            }
        };
        let checked = self.checker.check(&raw_path, raw_kind)?;
        if !matches!(checked.kind, Kind::File { .. }) && size != 0 {
            // The tar reader would skip (decompress and discard) this data; refusing it stops
            // a bomb hidden in a directory or symlink entry.
            return Err(BundleError::Corrupt(format!(
                "`{}` is a directory or symlink but carries {size} bytes of data",
                checked.path
            )));
        }
        self.apply(entry, &checked, size)
    }

    /// Acts on a checked entry: notes root files, writes to disk when unpacking.
    fn apply(
        &mut self,
        entry: &mut impl Read,
        checked: &Checked,
        size: u64,
    ) -> Result<(), BundleError> {
        let at_root = |name: &str| checked.path == name;
        if at_root(MANIFEST_FILE) && !matches!(checked.kind, Kind::File { .. }) {
            return Err(check::manifest_not_regular());
        }
        if at_root(APPRUNNER_FILE) {
            self.runner_executable = matches!(checked.kind, Kind::File { exec: true });
        }
        if let Some(name) = checked.path.strip_prefix("bin/")
            && !name.contains('/')
            && matches!(
                checked.kind,
                Kind::File { exec: true } | Kind::Symlink { .. }
            )
            && self.bin_commands.len() < MAX_BIN_COMMANDS
        {
            self.bin_commands.insert(name.to_string());
        }
        if let Some(root) = self.root {
            for dir in &checked.new_parents {
                create_dir(&root.join(dir))?;
            }
        }
        let target = self.root.map(|root| root.join(&checked.path));
        match &checked.kind {
            Kind::Dir { existed } => {
                if let Some(target) = target.filter(|_| !checked.path.is_empty()) {
                    if *existed {
                        set_mode(&target, 0o755)?;
                    } else {
                        create_dir(&target)?;
                    }
                }
                Ok(())
            }
            Kind::Symlink { target: link } => {
                if let Some(path) = target {
                    std::os::unix::fs::symlink(link, &path)
                        .context(|| format!("creating the symlink {}", path.display()))?;
                }
                Ok(())
            }
            Kind::File { exec } => {
                self.checker.check_declared_size(size)?;
                let is_manifest = at_root(MANIFEST_FILE);
                if is_manifest {
                    if size > MAX_MANIFEST_BYTES {
                        return Err(check::manifest_too_large());
                    }
                    self.manifest = Some(Vec::with_capacity(size as usize));
                }
                self.root_files.start(&checked.path, size);
                let mode = if *exec { 0o755 } else { 0o644 };
                let mut file = match &target {
                    Some(path) => Some(
                        OpenOptions::new()
                            .write(true)
                            .create_new(true)
                            .mode(mode)
                            .open(path)
                            .context(|| format!("creating {}", path.display()))?,
                    ),
                    None => None,
                };
                let mut copied = 0u64;
                loop {
                    let n = match entry.read(&mut self.buffer) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(read_error(e)),
                    };
                    // Counted while copying, so the budget holds whatever the headers said.
                    self.checker.add_bytes(n as u64)?;
                    copied += n as u64;
                    let chunk = &self.buffer[..n];
                    if is_manifest && let Some(m) = self.manifest.as_mut() {
                        m.extend_from_slice(chunk);
                    }
                    self.root_files.chunk(chunk);
                    if let (Some(file), Some(path)) = (file.as_mut(), &target) {
                        file.write_all(chunk)
                            .context(|| format!("writing {}", path.display()))?;
                    }
                }
                if copied != size {
                    return Err(BundleError::Corrupt(format!(
                        "`{}` is truncated: {copied} of {size} bytes",
                        checked.path
                    )));
                }
                self.root_files.finish(size);
                if let (Some(file), Some(path)) = (file, &target) {
                    // `mode` above is filtered through the umask; the release must not be.
                    file.set_permissions(fs::Permissions::from_mode(mode))
                        .context(|| format!("setting the mode of {}", path.display()))?;
                }
                Ok(())
            }
        }
    }
}

fn create_dir(path: &Path) -> Result<(), BundleError> {
    fs::create_dir(path).context(|| format!("creating {}", path.display()))?;
    set_mode(path, 0o755)
}

/// Reads a GNU long name or long link entry, refusing over-long ones before reading them
/// whole (reading just enough to name them).
fn read_long_name(
    entry: &mut impl Read,
    size: u64,
    max: u64,
    what: &str,
) -> Result<Vec<u8>, BundleError> {
    if size > max {
        let mut start = Vec::new();
        entry
            .take(SHOWN_LONG_NAME_BYTES)
            .read_to_end(&mut start)
            .map_err(read_error)?;
        return Err(BundleError::unsafe_path(
            check::show(&start),
            format!("{what} is longer than {} bytes", max - 1),
        ));
    }
    let mut name = Vec::with_capacity(size as usize);
    entry.read_to_end(&mut name).map_err(read_error)?;
    if name.len() as u64 != size {
        return Err(BundleError::Corrupt(
            "a long name entry is truncated".into(),
        ));
    }
    // GNU tar stores the name with a terminating NUL.
    while name.last() == Some(&0) {
        name.pop();
    }
    Ok(name)
}

fn read_pax(entry: &mut impl Read, size: u64) -> Result<Vec<u8>, BundleError> {
    if size > MAX_PAX_HEADER_BYTES {
        return Err(BundleError::Corrupt(format!(
            "a pax header is larger than {MAX_PAX_HEADER_BYTES} bytes"
        )));
    }
    let mut data = Vec::with_capacity(size as usize);
    entry.read_to_end(&mut data).map_err(read_error)?;
    if data.len() as u64 != size {
        return Err(BundleError::Corrupt("a pax header is truncated".into()));
    }
    Ok(data)
}

/// One pax record: key and value bytes.
type PaxRecord<'a> = (&'a [u8], &'a [u8]);

/// Splits pax extended header data into `(key, value)` records: `"<len> <key>=<value>\n"`,
/// where `<len>` counts the whole record.
fn parse_pax(mut data: &[u8]) -> Result<Vec<PaxRecord<'_>>, BundleError> {
    let bad = || BundleError::Corrupt("a pax header is malformed".into());
    let mut records = Vec::new();
    while !data.is_empty() {
        let space = data.iter().position(|b| *b == b' ').ok_or_else(bad)?;
        let len: usize = std::str::from_utf8(&data[..space])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(bad)?;
        if len <= space + 1 || len > data.len() || data[len - 1] != b'\n' {
            return Err(bad());
        }
        let record = &data[space + 1..len - 1];
        let eq = record.iter().position(|b| *b == b'=').ok_or_else(bad)?;
        records.push((&record[..eq], &record[eq + 1..]));
        data = &data[len..];
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_records_are_parsed_and_malformed_ones_refused() {
        let data = b"12 path=a/b\n17 linkpath=../x\n";
        let records = parse_pax(data).unwrap();
        assert_eq!(
            records,
            [
                (&b"path"[..], &b"a/b"[..]),
                (&b"linkpath"[..], &b"../x"[..])
            ]
        );
        for bad in [
            &b"99 path=a\n"[..],
            b"5 path=a\n",
            b"x path=a\n",
            b"10 patha/b\n",
            b"9 path=a/",
        ] {
            assert!(
                matches!(parse_pax(bad), Err(BundleError::Corrupt(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn source_errors_are_io_and_decoder_errors_are_corrupt() {
        struct Failing;
        impl Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::other("connection reset"))
            }
        }
        let e = inspect(io::BufReader::new(Failing), &Limits::default()).unwrap_err();
        assert!(matches!(e, BundleError::Io { .. }), "{e:?}");
        assert!(!e.is_client_error());
        let e = inspect(&b"definitely not zstd"[..], &Limits::default()).unwrap_err();
        assert!(matches!(e, BundleError::Corrupt(_)), "{e:?}");
        assert!(e.is_client_error());
    }

    #[test]
    fn trailer_must_be_bounded_zero_padding() {
        let mut buf = vec![0; 1024];
        check_trailer(&mut &[0u8; 10240][..], &mut buf).unwrap();
        assert!(check_trailer(&mut &b"\0\0x"[..], &mut buf).is_err());
        let mut zeros = io::repeat(0).take(MAX_TRAILING_BYTES + 1);
        assert!(check_trailer(&mut zeros, &mut buf).is_err());
    }

    #[test]
    fn copying_stops_at_the_budget_whatever_the_header_said() {
        // A reader that yields more than the (lying) declared size: the byte budget is
        // enforced on what is read, not on the header.
        let limits = Limits {
            max_unpacked_bytes: 100_000,
            ..Limits::default()
        };
        let mut reading = Reading {
            checker: Checker::new(&limits),
            root: None,
            manifest: None,
            runner_executable: false,
            bin_commands: Default::default(),
            root_files: RootCollector::default(),
            buffer: vec![0; COPY_BUFFER_BYTES],
        };
        let checked = reading
            .checker
            .check(b"f", RawKind::File { exec: false })
            .unwrap();
        let mut source = io::repeat(7).take(10 * 1024 * 1024);
        let e = reading.apply(&mut source, &checked, 10).unwrap_err();
        assert!(matches!(e, BundleError::TooLarge { max: 100_000 }), "{e:?}");
        // It stopped within one buffer of the limit instead of draining 10 MiB.
        assert!(source.limit() >= 10 * 1024 * 1024 - 100_000 - COPY_BUFFER_BYTES as u64);
    }
}
