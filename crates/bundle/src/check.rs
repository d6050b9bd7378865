//! The per-entry checker shared by packing, [`inspect`](crate::inspect) and
//! [`unpack`](crate::unpack): path rules, symlink rules, duplicates and the entry and size
//! budgets. Keeping one checker is what guarantees that a bundle the repository accepted is
//! unpacked identically on every web server.

use std::collections::HashMap;

use px_proto::detect::{DetectError, Detection, MAX_DETECT_FILE_BYTES, RootFiles, detect};
use px_proto::manifest::{AppManifest, MAX_MANIFEST_BYTES, ManifestError};
use px_proto::procfile::{PROCFILE, Procfile, WEB_PROCESS};

use crate::{BundleError, Limits};

/// Longest single path component. Linux refuses longer names (`NAME_MAX`) with an I/O error;
/// checking here turns that into a message about the bundle.
pub const MAX_NAME_LEN: usize = 255;

/// How much of an offending path an error message shows; the rest is elided.
const MAX_SHOWN_PATH: usize = 200;

/// An entry's type as the archive (or the source tree) declares it, before checking.
#[derive(Debug, Clone, Copy)]
pub(crate) enum RawKind<'a> {
    File {
        exec: bool,
    },
    Dir,
    Symlink {
        target: &'a [u8],
    },
    /// Anything else, named for the error message ("fifo", "hard link", ...).
    Unsupported(&'a str),
}

/// A checked entry's type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Kind {
    File {
        exec: bool,
    },
    /// `existed` is true when an earlier entry already implied this directory.
    Dir {
        existed: bool,
    },
    Symlink {
        target: String,
    },
}

/// An entry that passed every rule, with its normalized path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Checked {
    /// Relative, '/'-separated, no empty, `.` or `..` components; empty for the root itself
    /// (only ever a directory, which needs no action).
    pub path: String,
    pub kind: Kind,
    /// Directories this entry implies that no earlier entry created, outermost first; the
    /// unpacker creates them before the entry.
    pub new_parents: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NodeKind {
    /// Created because an entry below it needed it, not (yet) by its own entry.
    ImplicitDir,
    Dir,
    File,
    Symlink,
}

/// One path already in the bundle. A tree of component names rather than a set of full paths
/// keeps memory proportional to the number of entries, not entries times path length.
#[derive(Debug)]
struct Node {
    kind: NodeKind,
    children: HashMap<Box<str>, Node>,
}

impl Node {
    fn new(kind: NodeKind) -> Self {
        Self {
            kind,
            children: HashMap::new(),
        }
    }
}

/// Checks a sequence of entries against the rules and the limits.
#[derive(Debug)]
pub(crate) struct Checker {
    limits: Limits,
    entries: u64,
    bytes: u64,
    root: Node,
}

impl Checker {
    pub fn new(limits: &Limits) -> Self {
        Self {
            limits: limits.clone(),
            entries: 0,
            bytes: 0,
            root: Node::new(NodeKind::Dir),
        }
    }

    /// Entries so far, counting directories that were only implied by deeper paths.
    pub fn entries(&self) -> u64 {
        self.entries
    }

    /// The path length limit, which also bounds GNU long name entries.
    pub fn max_path_len(&self) -> usize {
        self.limits.max_path_len
    }

    /// File bytes so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Counts `n` more bytes of file content; called while copying, so a bundle whose
    /// content exceeds the limit stops there, whatever its headers claimed.
    pub fn add_bytes(&mut self, n: u64) -> Result<(), BundleError> {
        self.bytes = self.bytes.saturating_add(n);
        if self.bytes > self.limits.max_unpacked_bytes {
            return Err(BundleError::TooLarge {
                max: self.limits.max_unpacked_bytes,
            });
        }
        Ok(())
    }

    /// Refuses up front a file whose declared size alone would exceed the budget, so a bomb
    /// is stopped before a single byte of it is decompressed.
    pub fn check_declared_size(&self, size: u64) -> Result<(), BundleError> {
        if self.bytes.saturating_add(size) > self.limits.max_unpacked_bytes {
            return Err(BundleError::TooLarge {
                max: self.limits.max_unpacked_bytes,
            });
        }
        Ok(())
    }

    /// Counts an archive member that is not a path (a pax global header), so a stream of
    /// them cannot keep the reader busy without ever reaching a limit.
    pub fn count_entry(&mut self) -> Result<(), BundleError> {
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(BundleError::TooManyEntries {
                max: self.limits.max_entries,
            });
        }
        Ok(())
    }

    /// Checks one entry and records it. Rules, in order: the entry budget; the path (see
    /// [`normalize`]); the type; no parent that is a symlink or a file; no duplicate; and for
    /// symlinks, a target that stays inside the bundle (see [`check_link_target`]).
    pub fn check(&mut self, raw_path: &[u8], kind: RawKind<'_>) -> Result<Checked, BundleError> {
        self.count_entry()?;
        let path = normalize(raw_path, self.limits.max_path_len)?;
        let kind = match kind {
            RawKind::File { exec } => Kind::File { exec },
            RawKind::Dir => Kind::Dir { existed: false },
            RawKind::Symlink { target } => Kind::Symlink {
                target: check_link_target(&path, target, self.limits.max_path_len)?,
            },
            RawKind::Unsupported(what) => {
                return Err(BundleError::UnsupportedEntry {
                    path,
                    kind: what.to_string(),
                });
            }
        };
        if path.is_empty() {
            // `./` in archives made with `tar -C dir .`: the root, which always exists.
            return match kind {
                Kind::Dir { .. } => Ok(Checked {
                    path,
                    kind: Kind::Dir { existed: true },
                    new_parents: Vec::new(),
                }),
                _ => Err(BundleError::unsafe_path(
                    show(raw_path),
                    "the path is empty",
                )),
            };
        }
        self.record(path, kind)
    }

    fn record(&mut self, path: String, mut kind: Kind) -> Result<Checked, BundleError> {
        let components: Vec<&str> = path.split('/').collect();
        let Some((last, parents)) = components.split_last() else {
            return Err(BundleError::unsafe_path(path.clone(), "the path is empty"));
        };
        // Walk (and extend) the tree along the parents. New implicit directories count as
        // entries: each is an inode on disk, and counting them keeps the tree bounded.
        let mut new_parents = Vec::new();
        let mut implicit_new = 0u64;
        let mut node = &mut self.root;
        for (i, name) in parents.iter().enumerate() {
            let child = node.children.entry(Box::from(*name)).or_insert_with(|| {
                new_parents.push(components[..=i].join("/"));
                implicit_new += 1;
                Node::new(NodeKind::ImplicitDir)
            });
            match child.kind {
                NodeKind::Symlink => {
                    return Err(BundleError::unsafe_path(
                        path.clone(),
                        format!(
                            "goes through the symlink `{}`; nothing may be written below a symlink",
                            components[..=i].join("/")
                        ),
                    ));
                }
                NodeKind::File => {
                    return Err(BundleError::unsafe_path(
                        path.clone(),
                        format!(
                            "`{}` is a file, not a directory",
                            components[..=i].join("/")
                        ),
                    ));
                }
                NodeKind::Dir | NodeKind::ImplicitDir => {}
            }
            node = child;
        }
        let new_kind = match kind {
            Kind::File { .. } => NodeKind::File,
            Kind::Dir { .. } => NodeKind::Dir,
            Kind::Symlink { .. } => NodeKind::Symlink,
        };
        match node.children.get_mut(*last) {
            Some(existing)
                if existing.kind == NodeKind::ImplicitDir && new_kind == NodeKind::Dir =>
            {
                existing.kind = NodeKind::Dir;
                kind = Kind::Dir { existed: true };
            }
            Some(_) => {
                return Err(BundleError::unsafe_path(
                    path.clone(),
                    "appears twice in the bundle; each path may occur once",
                ));
            }
            None => {
                node.children.insert(Box::from(*last), Node::new(new_kind));
            }
        }
        for _ in 0..implicit_new {
            self.count_entry()?;
        }
        Ok(Checked {
            path,
            kind,
            new_parents,
        })
    }
}

/// The error for an `app.toml` that is there but is not a regular file.
pub(crate) fn manifest_not_regular() -> BundleError {
    BundleError::Manifest(ManifestError {
        field: None,
        message: "must be a regular file at the bundle root, not a directory or symlink".into(),
    })
}

/// The error for an `app.toml` over [`MAX_MANIFEST_BYTES`], raised before reading it.
pub(crate) fn manifest_too_large() -> BundleError {
    BundleError::Manifest(ManifestError {
        field: None,
        message: format!("is larger than {MAX_MANIFEST_BYTES} bytes; keep it small"),
    })
}

/// The rules about the bundle root, applied once every entry was seen: `app.toml` must be
/// there and valid, and the app must have a way to start: `run`, an executable regular file
/// `apprunner`, or else the Procfile's `web:` line, which then becomes `run` in the returned
/// manifest, so everything downstream (the release record, Beacon, Maestro) sees the command
/// that runs. The manifest's `processes` are resolved with the Procfile the same way
/// (`px_proto::process::resolve`): every other Procfile type, `app.toml`'s command winning.
///
/// A Procfile that does not parse fails here only when something needs it (the web command, a
/// `[processes.<type>]` without a command); [`check_detection`] refuses it for every new
/// bundle, while a release already stored still unpacks.
pub(crate) fn check_root(
    manifest: Option<Vec<u8>>,
    has_executable_runner: bool,
    root_files: &RootFiles,
) -> Result<AppManifest, BundleError> {
    let bytes = manifest.ok_or(BundleError::MissingManifest)?;
    let text = String::from_utf8(bytes).map_err(|_| ManifestError {
        field: None,
        message: "is not valid UTF-8; save it as UTF-8".into(),
    })?;
    let mut manifest = AppManifest::parse(&text)?;
    let procfile = match root_files.get(PROCFILE).and_then(|f| f.content.as_deref()) {
        Some(bytes) => Some(Procfile::parse(bytes).map_err(DetectError::from)),
        None if root_files.contains(PROCFILE) => Some(Err(DetectError::TooLarge {
            file: PROCFILE,
            max: MAX_DETECT_FILE_BYTES,
        })),
        None => None,
    };
    let needs_procfile = (manifest.run.is_none() && !has_executable_runner)
        || manifest
            .processes
            .iter()
            .any(|(name, s)| name != WEB_PROCESS && s.command.is_none());
    let procfile = match procfile {
        Some(Ok(procfile)) => Some(procfile),
        Some(Err(e)) if needs_procfile => return Err(e.into()),
        Some(Err(_)) | None => None,
    };
    if manifest.run.is_none() && !has_executable_runner {
        let web = procfile.as_ref().and_then(|p| p.web());
        manifest.run = Some(web.ok_or(BundleError::NoRunner)?.to_string());
    }
    px_proto::process::resolve(&mut manifest, procfile.as_ref())?;
    Ok(manifest)
}

/// What detection makes of a new bundle's root files: a bundle it cannot make an app of (a
/// `package.json` that is not JSON, a yarn-only app without `[build] command`, ...) is
/// refused when it is packed or uploaded, with detection's words.
///
/// Only [`pack_dir`](crate::pack_dir) and [`inspect`](crate::inspect) apply it, not
/// [`unpack`](crate::unpack): a release already stored must unpack on every web server
/// whatever rules later uploads meet.
pub(crate) fn check_detection(
    manifest: &AppManifest,
    root_files: &RootFiles,
) -> Result<Detection, BundleError> {
    Ok(detect(Some(manifest), root_files)?)
}

/// Shows raw path bytes in a message: lossy UTF-8, cut short when long.
pub(crate) fn show(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    if text.len() <= MAX_SHOWN_PATH {
        return text.into_owned();
    }
    let mut end = MAX_SHOWN_PATH;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// Turns an archive path into the canonical relative form, refusing anything that could
/// leave the root or that the file system cannot hold: empty, too long, not UTF-8, NUL
/// bytes, absolute, `..` components, over-long names. Empty and `.` components are dropped
/// (`./a//b` is `a/b`); the result is empty only for the root itself.
pub(crate) fn normalize(raw: &[u8], max_len: usize) -> Result<String, BundleError> {
    let unsafe_path = |reason: &str| BundleError::unsafe_path(show(raw), reason);
    if raw.is_empty() {
        return Err(unsafe_path("the path is empty"));
    }
    if raw.len() > max_len {
        return Err(unsafe_path(&format!(
            "the path is longer than {max_len} bytes"
        )));
    }
    let text = std::str::from_utf8(raw).map_err(|_| unsafe_path("the path is not valid UTF-8"))?;
    if text.contains('\0') {
        return Err(unsafe_path("the path contains a NUL byte"));
    }
    if text.starts_with('/') {
        return Err(unsafe_path(
            "absolute paths are not allowed; bundle paths are relative",
        ));
    }
    let mut parts = Vec::new();
    for part in text.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(unsafe_path("`..` components could leave the bundle")),
            name if name.len() > MAX_NAME_LEN => {
                return Err(unsafe_path(&format!(
                    "a path component is longer than {MAX_NAME_LEN} bytes"
                )));
            }
            name => parts.push(name),
        }
    }
    Ok(parts.join("/"))
}

/// Checks a symlink target and returns it unchanged. The target must be relative and,
/// resolved lexically from the link's directory, stay inside the root. In addition `..` may
/// only come first (`../../lib/x`, not `a/../x`): the kernel resolves `..` after a symlink
/// physically, so `x/l/..` with `x/l -> ..` would escape although it looks harmless
/// lexically. With `..` only at the front, and no entry allowed below a symlink, every
/// chain of bundle symlinks provably stays inside.
pub(crate) fn check_link_target(
    link: &str,
    raw_target: &[u8],
    max_len: usize,
) -> Result<String, BundleError> {
    let unsafe_link = |reason: String| BundleError::unsafe_path(link, reason);
    if raw_target.is_empty() {
        return Err(unsafe_link("the symlink has an empty target".into()));
    }
    if raw_target.len() > max_len {
        return Err(unsafe_link(format!(
            "the symlink target is longer than {max_len} bytes"
        )));
    }
    let Ok(target) = std::str::from_utf8(raw_target) else {
        return Err(unsafe_link("the symlink target is not valid UTF-8".into()));
    };
    if target.contains('\0') {
        return Err(unsafe_link("the symlink target contains a NUL byte".into()));
    }
    if target.starts_with('/') {
        return Err(unsafe_link(format!(
            "link points outside the bundle: `{target}` is absolute; use a relative target"
        )));
    }
    // Depth of the link's directory below the root.
    let mut depth = link.split('/').count().saturating_sub(1);
    let mut seen_name = false;
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." if seen_name => {
                return Err(unsafe_link(format!(
                    "link target `{target}` has `..` after a name; put every `..` first"
                )));
            }
            ".." => {
                if depth == 0 {
                    return Err(unsafe_link(format!(
                        "link points outside the bundle: `{target}`"
                    )));
                }
                depth -= 1;
            }
            _ => {
                seen_name = true;
                depth += 1;
            }
        }
    }
    Ok(target.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checker() -> Checker {
        Checker::new(&Limits::default())
    }

    fn reason(e: BundleError) -> String {
        match e {
            BundleError::UnsafePath { reason, .. } => reason,
            other => panic!("expected UnsafePath, got {other:?}"),
        }
    }

    #[test]
    fn normalize_accepts_and_canonicalizes_relative_paths() {
        assert_eq!(normalize(b"a/b.txt", 100).unwrap(), "a/b.txt");
        assert_eq!(normalize(b"./a//b/", 100).unwrap(), "a/b");
        assert_eq!(normalize(b"./", 100).unwrap(), "");
        assert_eq!(normalize(b"a..b/..c", 100).unwrap(), "a..b/..c");
    }

    #[test]
    fn normalize_refuses_escapes_and_unrepresentable_paths() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "empty"),
            (b"/etc/passwd", "absolute"),
            (b"../x", "`..`"),
            (b"a/../../x", "`..`"),
            (b"a/..", "`..`"),
            (b"a\xffb", "UTF-8"),
            (b"a\0b", "NUL"),
        ];
        for (raw, want) in cases {
            let e = normalize(raw, 100).unwrap_err();
            assert!(e.to_string().contains(&show(raw)), "{e}");
            assert!(reason(e).contains(want), "{raw:?}");
        }
        assert!(reason(normalize(&[b'a'; 101], 100).unwrap_err()).contains("longer than 100"));
        let long_name = format!("d/{}", "n".repeat(MAX_NAME_LEN + 1));
        assert!(reason(normalize(long_name.as_bytes(), 1000).unwrap_err()).contains("component"));
    }

    #[test]
    fn link_targets_must_stay_inside() {
        for (link, target) in [
            ("l", "sub"),
            ("l", "./sub/x"),
            ("a/l", "../b"),
            ("a/b/l", "../../c/d"),
            ("a/l", ".."),
            ("l", "."),
        ] {
            assert_eq!(
                check_link_target(link, target.as_bytes(), 100).unwrap(),
                target
            );
        }
        for (link, target, want) in [
            ("l", "../../etc", "outside"),
            ("l", "..", "outside"),
            ("a/l", "../../x", "outside"),
            ("l", "/etc", "outside"),
            ("l", "a/../../x", "after a name"),
            ("l", "x/l/..", "after a name"),
            ("l", "", "empty"),
        ] {
            let e = check_link_target(link, target.as_bytes(), 100).unwrap_err();
            assert!(e.to_string().contains(&format!("`{link}`")), "{e}");
            assert!(reason(e).contains(want), "{link} -> {target}");
        }
    }

    #[test]
    fn duplicates_are_refused_but_a_dir_may_follow_its_children() {
        let mut c = checker();
        let first = c.check(b"a/b/file", RawKind::File { exec: false }).unwrap();
        assert_eq!(first.new_parents, ["a", "a/b"]);
        assert_eq!(c.entries(), 3, "implied directories count as entries");
        let dir = c.check(b"a/", RawKind::Dir).unwrap();
        assert_eq!(dir.kind, Kind::Dir { existed: true });
        assert!(reason(c.check(b"a", RawKind::Dir).unwrap_err()).contains("twice"));
        assert!(reason(c.check(b"./a/b/file", RawKind::Dir).unwrap_err()).contains("twice"));
        assert!(
            reason(
                c.check(b"a/b", RawKind::Symlink { target: b"x" })
                    .unwrap_err()
            )
            .contains("twice")
        );
    }

    #[test]
    fn nothing_may_be_written_below_a_symlink_or_a_file() {
        let mut c = checker();
        c.check(b"sub", RawKind::Dir).unwrap();
        c.check(b"l", RawKind::Symlink { target: b"sub" }).unwrap();
        let e = c.check(b"l/x", RawKind::File { exec: false }).unwrap_err();
        assert!(e.to_string().contains("`l/x`"), "{e}");
        assert!(reason(e).contains("symlink `l`"));
        c.check(b"f", RawKind::File { exec: false }).unwrap();
        assert!(reason(c.check(b"f/x", RawKind::Dir).unwrap_err()).contains("`f` is a file"));
    }

    #[test]
    fn unsupported_kinds_are_named() {
        let e = checker()
            .check(b"dev/null", RawKind::Unsupported("character device"))
            .unwrap_err();
        assert!(
            matches!(&e, BundleError::UnsupportedEntry { path, kind } if path == "dev/null" && kind == "character device")
        );
    }

    #[test]
    fn the_root_may_appear_as_a_directory_only() {
        let mut c = checker();
        assert_eq!(c.check(b"./", RawKind::Dir).unwrap().path, "");
        assert!(
            reason(c.check(b".", RawKind::File { exec: false }).unwrap_err()).contains("empty")
        );
    }

    #[test]
    fn root_rules() {
        let none = RootFiles::new();
        assert!(matches!(
            check_root(None, true, &none),
            Err(BundleError::MissingManifest)
        ));
        let m = check_root(Some(b"name = \"x\"\nrun = \"./x\"".to_vec()), false, &none).unwrap();
        assert_eq!(m.name, "x");
        assert!(check_root(Some(b"name = \"x\"".to_vec()), true, &none).is_ok());
        assert!(matches!(
            check_root(Some(b"name = \"x\"".to_vec()), false, &none),
            Err(BundleError::NoRunner)
        ));
        let e = check_root(Some(b"name = \"X\"".to_vec()), true, &none).unwrap_err();
        assert!(
            matches!(&e, BundleError::Manifest(m) if m.field.as_deref() == Some("name")),
            "{e}"
        );
        let e = check_root(Some(b"name = \"\xff\"".to_vec()), true, &none).unwrap_err();
        assert!(e.to_string().contains("UTF-8"), "{e}");
    }

    #[test]
    fn the_procfile_starts_an_app_that_names_no_run() {
        let manifest = || Some(b"name = \"x\"".to_vec());
        let procfile = RootFiles::new().with(PROCFILE, "worker: w\nweb: serve --port $PORT\n");
        let m = check_root(manifest(), false, &procfile).unwrap();
        assert_eq!(m.run.as_deref(), Some("serve --port $PORT"));
        // An executable apprunner and `run` come first; the Procfile is then not even read.
        let broken = RootFiles::new().with(PROCFILE, "not a procfile");
        assert_eq!(check_root(manifest(), true, &broken).unwrap().run, None);
        let m = check_root(
            Some(b"name = \"x\"\nrun = \"./x\"".to_vec()),
            false,
            &broken,
        )
        .unwrap();
        assert_eq!(m.run.as_deref(), Some("./x"));
        let e = check_root(manifest(), false, &broken).unwrap_err();
        assert!(
            matches!(e, BundleError::Detect(DetectError::Procfile(_))),
            "{e:?}"
        );
        let no_web = RootFiles::new().with(PROCFILE, "worker: w");
        assert!(matches!(
            check_root(manifest(), false, &no_web),
            Err(BundleError::NoRunner)
        ));
    }

    #[test]
    fn the_release_records_every_process_type_with_its_command() {
        let procfile = RootFiles::new().with(
            PROCFILE,
            "web: serve\nworker: python3 worker.py\nclock: python3 clock.py\nrelease: python3 migrate.py\n",
        );
        let toml = "name = \"x\"\n[processes.worker]\ncommand = \"python3 worker.py --fast\"\n[processes.clock]\nreplace = \"stop_first\"";
        let m = check_root(Some(toml.as_bytes().to_vec()), false, &procfile).unwrap();
        assert_eq!(m.run.as_deref(), Some("serve"));
        let command = |t: &str| m.processes[t].command.as_deref();
        assert_eq!(command("worker"), Some("python3 worker.py --fast"));
        assert_eq!(command("clock"), Some("python3 clock.py"));
        assert_eq!(command("release"), Some("python3 migrate.py"));
        assert!(!m.processes.contains_key("web"));
        // An apprunner app with a Procfile of workers runs them too.
        let workers = RootFiles::new().with(PROCFILE, "worker: w");
        let m = check_root(Some(b"name = \"x\"".to_vec()), true, &workers).unwrap();
        assert_eq!(m.processes["worker"].command.as_deref(), Some("w"));
        // A table with no command and no line is refused naming the type.
        let e = check_root(
            Some(b"name = \"x\"\nrun = \"s\"\n[processes.mailer]\nstop_grace = \"1m\"".to_vec()),
            false,
            &workers,
        )
        .unwrap_err();
        assert!(e.to_string().contains("processes.mailer"), "{e}");
        // ... and when the Procfile that should have had it is broken, that is what is said.
        let broken = RootFiles::new().with(PROCFILE, "not a procfile");
        let e = check_root(
            Some(b"name = \"x\"\nrun = \"s\"\n[processes.worker]\nstop_grace = \"1m\"".to_vec()),
            false,
            &broken,
        )
        .unwrap_err();
        assert!(
            matches!(e, BundleError::Detect(DetectError::Procfile(_))),
            "{e:?}"
        );
    }

    #[test]
    fn budgets_are_enforced() {
        let limits = Limits {
            max_entries: 2,
            max_unpacked_bytes: 10,
            max_path_len: 100,
        };
        let mut c = Checker::new(&limits);
        c.check(b"a", RawKind::File { exec: false }).unwrap();
        // One entry plus one implied directory is over a budget of two.
        assert!(matches!(
            c.check(b"d/b", RawKind::File { exec: false }),
            Err(BundleError::TooManyEntries { max: 2 })
        ));
        let mut c = Checker::new(&limits);
        c.check_declared_size(10).unwrap();
        assert!(matches!(
            c.check_declared_size(11),
            Err(BundleError::TooLarge { max: 10 })
        ));
        c.add_bytes(6).unwrap();
        assert!(c.check_declared_size(5).is_err());
        assert!(matches!(
            c.add_bytes(5),
            Err(BundleError::TooLarge { max: 10 })
        ));
        assert_eq!(c.bytes(), 11);
    }
}
