//! Each app process in a sandbox of its own (`[sandbox]`, docs/src/design/trust.md): every
//! instance, release phase and one-off run starts through bubblewrap, which shows it the
//! system's read-only directories (`px_runtime::sandbox`, shared with builds), a private
//! `/proc` of its own PID namespace, a minimal `/dev`, a private sized `/tmp`, and its release:
//! a sized, writable, in-memory app directory at the release's path with each top-level entry of
//! the release bound read-only into it. So an app writes new files beside its code (a SQLite
//! database, caches) and they vanish with the process, while no process can change what its
//! release holds for another instance or a later restart. Nothing else of the host is there:
//! not Maestro's state (other releases, `assignment.json`), not `/etc/platformx`, not
//! `/run/credentials`, not `/sys/fs/cgroup`.
//!
//! Each app also has a data directory on the node, `state_dir/data/<app>`, named by
//! `PX_DATA_DIR`: writable, kept across restarts and releases, and shared by the app's own
//! processes alone (its release phase migrates the SQLite database its web processes then
//! read), which is what the host's shared `/tmp` gave apps before each got its own.
//!
//! Who the process is: a uid of its own per app, from a range of its own, allocated once per
//! app and kept in `state_dir/app-uids.json`, wherever Maestro can switch users ([`Users`]).
//! A Maestro running as root (`em up` as root, the tests) runs bubblewrap without a user
//! namespace and drops the command to the app's uid with `setpriv` inside it. The production
//! Maestro (`maestro.service` as `px-maestro`, holding `CAP_SETUID`, `CAP_SETGID`, `CAP_CHOWN`
//! and `CAP_KILL` as ambient capabilities) switches first: `setpriv` takes the app's uid and
//! empties every capability set it may, then bubblewrap runs as the app, unprivileged, in a
//! user namespace in which new user namespaces are refused. A Maestro that can do neither
//! (`em up` as an ordinary user) gives every app a user namespace mapped to its own uid.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use px_proto::size::ByteSize;
use px_runtime::sandbox::{Bwrap, Identity, SYSTEM_ETC, find_on_path};
use serde::{Deserialize, Serialize};

use crate::config::SandboxConfig;

/// The first uid (and gid) handed to apps when Maestro can switch users. It lies in the upper
/// part of the range systemd sets aside for containers (524288 to 1879048191, see systemd's
/// `UIDS-GIDS.md`), away from system users, login users and the usual `/etc/subuid` ranges,
/// which start at 100000 and grow by 65536 per user.
pub const APP_UID_FIRST: u32 = 1_860_000_000;
/// How many apps a node can give uids to: far more apps than one node will ever have run.
pub const APP_UID_COUNT: u32 = 65_536;
/// Where the per-app uids are kept, under `state_dir`: an app keeps its uid across restarts
/// of Maestro, so files it leaves nowhere are never handed to another app's uid.
const UIDS_FILE: &str = "app-uids.json";
/// The apps' data directories, under `state_dir`.
const DATA_DIR: &str = "data";
/// The apps' releases, under `state_dir` (`apps/<app>/releases/<n>`, the release store's).
const APPS_DIR: &str = "apps";
/// Search permission for group and others: what Maestro's state directory, `apps/` and
/// `data/` give, so an app's uid can walk to its own release and data directory by name
/// while reading no directory listing and no file of Maestro's (those stay 0600/0700).
const TRAVERSE: u32 = 0o011;
/// The mode of `apps/<app>`, whose group is the app's: only Maestro and the app's uid get in.
const APP_DIR_MODE: u32 = 0o710;
/// The variable naming an app's data directory.
pub const DATA_DIR_VAR: &str = "PX_DATA_DIR";
/// Most top-level entries a release may have: each becomes a bind mount, and so an argument
/// of the sandbox's command line and a mount in the kernel. Real apps have tens; a bundle's
/// own entry limit is far higher, so this one is checked when the process starts.
pub const MAX_TOP_LEVEL_ENTRIES: usize = 1024;
/// Default size of an app process's private `/tmp`: in memory, and charged to its cgroup's
/// memory, so its memory limit bounds it too. Uploads and caches of a web app fit.
pub const DEFAULT_TMP_SIZE: ByteSize = ByteSize::mib(256);
/// Default size of what an app process may write into its app directory (a SQLite database,
/// caches): in memory, gone with the process, like a Heroku dyno's filesystem.
pub const DEFAULT_APP_DIR_SIZE: ByteSize = ByteSize::mib(256);

/// Why an app process cannot be sandboxed.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("the app sandbox is unavailable: {0}")]
    Unavailable(String),
    #[error("no free uid for app {0}: all {APP_UID_COUNT} app uids are taken")]
    UidsExhausted(String),
    #[error(
        "the release has {count} top-level entries, more than the {MAX_TOP_LEVEL_ENTRIES} a sandbox holds: move them into a directory"
    )]
    TooManyEntries { count: usize },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

impl From<SandboxError> for std::io::Error {
    fn from(e: SandboxError) -> Self {
        std::io::Error::other(e)
    }
}

/// How this Maestro starts app processes.
#[derive(Debug)]
pub(crate) struct AppSandbox {
    mode: SandboxConfig,
    bwrap: PathBuf,
    setpriv: PathBuf,
    /// Who app processes are.
    users: Users,
    /// Maestro's state directory, which holds the apps' releases under `apps/<app>`.
    state_dir: PathBuf,
    tmp_bytes: u64,
    app_dir_bytes: u64,
    /// Where the apps' data directories are.
    data: PathBuf,
    uids: Mutex<Uids>,
}

/// Who app processes are, from what Maestro can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Users {
    /// Maestro is root: bubblewrap without a user namespace, then `setpriv` to the app's uid.
    Root,
    /// Maestro holds `CAP_SETUID`, `CAP_SETGID`, `CAP_CHOWN` and `CAP_KILL` (`maestro.service`):
    /// `setpriv` to the app's uid, dropping every capability, then bubblewrap in an
    /// unprivileged user namespace.
    Capable,
    /// Neither: every app in a user namespace mapped to Maestro's own uid.
    Shared,
}

impl Users {
    /// What this process can do.
    fn detect() -> Self {
        if rustix::process::geteuid().is_root() {
            Self::Root
        } else if px_runtime::caps::can_switch_users() {
            Self::Capable
        } else {
            Self::Shared
        }
    }
}

/// The per-app uids and the file that keeps them.
#[derive(Debug)]
struct Uids {
    file: PathBuf,
    by_app: BTreeMap<String, u32>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct UidsFile {
    apps: BTreeMap<String, u32>,
}

impl AppSandbox {
    /// The sandbox `mode` asks for, its uids kept under `state_dir`. With bubblewrap, the
    /// tools must be on `PATH`.
    pub(crate) fn new(
        mode: SandboxConfig,
        state_dir: &Path,
        tmp_size: ByteSize,
        app_dir_size: ByteSize,
    ) -> Result<Self, SandboxError> {
        let file = state_dir.join(UIDS_FILE);
        let by_app = match std::fs::read(&file) {
            Ok(bytes) => serde_json::from_slice::<UidsFile>(&bytes)
                .map_err(|e| SandboxError::Io {
                    what: format!("reading {}", file.display()),
                    source: std::io::Error::other(e),
                })?
                .apps
                .into_iter()
                .filter(|(_, uid)| (APP_UID_FIRST..APP_UID_FIRST + APP_UID_COUNT).contains(uid))
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => {
                return Err(SandboxError::Io {
                    what: format!("reading {}", file.display()),
                    source,
                });
            }
        };
        let (bwrap, setpriv) = match mode {
            SandboxConfig::Bubblewrap => (
                find_on_path("bwrap")
                    .ok_or_else(|| SandboxError::Unavailable("`bwrap` is not on PATH".into()))?,
                find_on_path("setpriv").unwrap_or_else(|| PathBuf::from("/usr/bin/setpriv")),
            ),
            SandboxConfig::None => (PathBuf::new(), PathBuf::new()),
        };
        Ok(Self {
            mode,
            bwrap,
            setpriv,
            users: Users::detect(),
            state_dir: state_dir.to_path_buf(),
            tmp_bytes: tmp_size.0,
            app_dir_bytes: app_dir_size.0,
            data: state_dir.join(DATA_DIR),
            uids: Mutex::new(Uids { file, by_app }),
        })
    }

    /// No sandbox (tests of other parts, `em dev`).
    #[cfg(test)]
    pub(crate) fn none() -> Self {
        Self {
            mode: SandboxConfig::None,
            bwrap: PathBuf::new(),
            setpriv: PathBuf::new(),
            users: Users::Shared,
            state_dir: std::env::temp_dir(),
            tmp_bytes: 0,
            app_dir_bytes: 0,
            data: std::env::temp_dir(),
            uids: Mutex::new(Uids {
                file: PathBuf::new(),
                by_app: BTreeMap::new(),
            }),
        }
    }

    pub(crate) fn mode(&self) -> SandboxConfig {
        self.mode
    }

    /// Who app processes are.
    pub(crate) fn users(&self) -> Users {
        self.users
    }

    /// The words before an app process's command: bubblewrap with the mounts of `release`
    /// and the app's data directory, and `setpriv` to the app's uid where Maestro can switch
    /// users (before bubblewrap when Maestro is not root, after it when it is); without a
    /// sandbox, only `env` naming the data directory. No app process keeps a capability of
    /// Maestro's.
    pub(crate) fn prefix(&self, app: &str, release: &Path) -> Result<Vec<OsString>, SandboxError> {
        let uid = match (self.mode, self.users) {
            (SandboxConfig::Bubblewrap, Users::Root | Users::Capable) => Some(self.uid(app)?),
            _ => None,
        };
        let data = self.data_dir(app, uid)?;
        if self.mode == SandboxConfig::None {
            let mut set = OsString::from(format!("{DATA_DIR_VAR}="));
            set.push(&data);
            let mut words = px_runtime::caps::drop_words();
            words.extend(["env".into(), set]);
            return Ok(words);
        }
        let mut words = Vec::new();
        match (self.users, uid) {
            (Users::Capable, Some(uid)) => {
                self.open_release_to(app, release, uid)?;
                words.push(self.setpriv.clone().into_os_string());
                words.extend(switch_args(uid, self.users));
            }
            // Whatever ambient capability a Maestro that cannot switch holds stays behind.
            (Users::Shared, _) => words.extend(px_runtime::caps::drop_words()),
            _ => {}
        }
        let root = self.users == Users::Root;
        let identity = if root {
            Identity::Root
        } else {
            Identity::Namespace {
                ids: None,
                no_nested: true,
            }
        };
        let mut b = Bwrap::base(identity, false, self.tmp_bytes);
        let etc: Vec<&Path> = SYSTEM_ETC.iter().map(Path::new).collect();
        b.parents_of(&etc, &[]);
        for file in &etc {
            b.mount("--ro-bind-try", file);
        }
        b.parents_of(&[release, &data], &[]);
        b.mount("--bind", &data);
        b.push_os(&["--setenv".as_ref(), DATA_DIR_VAR.as_ref(), data.as_os_str()]);
        // The app directory: writable, in memory, its own. As root, the app's uid must be
        // able to write it; nothing but this app's processes shares the mount namespace. In
        // a user namespace the mount is the app's own user's already.
        let perms = if root { "1777" } else { "0755" };
        let size = self.app_dir_bytes.to_string();
        b.push(&["--perms", perms, "--size", &size]);
        b.push_os(&["--tmpfs".as_ref(), release.as_os_str()]);
        for entry in top_level(release)? {
            let path = release.join(&entry.name);
            match entry.link {
                // A link is made again rather than bound: binding would follow it.
                Some(target) => {
                    b.push_os(&["--symlink".as_ref(), target.as_os_str(), path.as_os_str()])
                }
                None => b.mount("--ro-bind", &path),
            }
        }
        // The app's home is its app directory, as on Heroku; Maestro's own is not there.
        b.push_os(&["--setenv".as_ref(), "HOME".as_ref(), release.as_os_str()]);
        b.push(&["--setenv", "TMPDIR", "/tmp"]);
        words.push(self.bwrap.clone().into_os_string());
        words.extend(b.finish(release));
        if let (Users::Root, Some(uid)) = (self.users, uid) {
            words.push(self.setpriv.clone().into_os_string());
            words.extend(switch_args(uid, self.users));
        }
        Ok(words)
    }

    /// Lets the app's uid reach its release when bubblewrap runs as that uid: Maestro's state
    /// directory and `apps/` only traversable by others (0711: nothing listed, nothing read),
    /// `apps/<app>` traversable by the app's group alone (0710), so no other app's uid gets
    /// to this app's releases, and the directories below it down to the release traversable.
    /// What a release holds is world-readable already (bundles and layers are unpacked 0644
    /// and 0755).
    fn open_release_to(&self, app: &str, release: &Path, uid: u32) -> Result<(), SandboxError> {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let apps = self.state_dir.join(APPS_DIR);
        let own = apps.join(app);
        if !release.starts_with(&own) {
            return Ok(());
        }
        let io = |path: &Path| {
            let what = format!("opening {} to the app's uid", path.display());
            move |source| SandboxError::Io { what, source }
        };
        // Below `apps/<app>`, `releases/` (made 0700 under Maestro's umask) down to the
        // release itself need search permission too; the gate above them is the group's.
        let below: Vec<&Path> = release.ancestors().take_while(|dir| *dir != own).collect();
        for dir in [self.state_dir.as_path(), apps.as_path()]
            .into_iter()
            .chain(below)
        {
            let mode = std::fs::metadata(dir).map_err(io(dir))?.mode() & 0o7777;
            if mode & TRAVERSE != TRAVERSE {
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | TRAVERSE))
                    .map_err(io(dir))?;
            }
        }
        let meta = std::fs::metadata(&own).map_err(io(&own))?;
        if meta.gid() != uid {
            std::os::unix::fs::chown(&own, None, Some(uid)).map_err(io(&own))?;
        }
        if meta.mode() & 0o7777 != APP_DIR_MODE {
            std::fs::set_permissions(&own, std::fs::Permissions::from_mode(APP_DIR_MODE))
                .map_err(io(&own))?;
        }
        Ok(())
    }

    /// The data directory of `app`, made when missing: its own (the app's uid's, when it has
    /// one), closed to everyone else. Its parent is only traversable by others, so each app's
    /// uid reaches its own directory and lists none.
    fn data_dir(&self, app: &str, uid: Option<u32>) -> Result<PathBuf, SandboxError> {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = self.data.join(app);
        let io = |source| SandboxError::Io {
            what: format!("making the data directory {}", dir.display()),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(io)?;
        if self.users == Users::Capable {
            let mode = std::fs::metadata(&self.data).map_err(io)?.mode() & 0o7777;
            if mode & TRAVERSE != TRAVERSE {
                std::fs::set_permissions(
                    &self.data,
                    std::fs::Permissions::from_mode(mode | TRAVERSE),
                )
                .map_err(io)?;
            }
        }
        // Once the app's, its mode is the app's own business (and a Maestro that is not root
        // may no longer change it).
        let owner = std::fs::metadata(&dir).map_err(io)?.uid();
        if uid.is_some_and(|uid| owner == uid) {
            return Ok(dir);
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
        if let Some(uid) = uid {
            // Everything in it too: what the app wrote while it ran as Maestro's user (before
            // it had a uid of its own) stays its own to read and change.
            chown_tree(&dir, uid).map_err(io)?;
        }
        Ok(dir)
    }

    /// The uid `app`'s builds run as outside their sandbox: the app's own, wherever Maestro
    /// can switch users (a build makes that app's release, which runs as that uid anyway);
    /// `None` where it cannot (`em up` as an ordinary user), so builds run as the builder's
    /// default.
    pub(crate) fn build_uid(&self, app: &str) -> Result<Option<u32>, SandboxError> {
        match self.users {
            Users::Root | Users::Capable => self.uid(app).map(Some),
            Users::Shared => Ok(None),
        }
    }

    /// The uid of `app`: the one it had, or the lowest free one, recorded before it is used.
    pub(crate) fn uid(&self, app: &str) -> Result<u32, SandboxError> {
        let mut uids = self.uids.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(uid) = uids.by_app.get(app) {
            return Ok(*uid);
        }
        let taken: std::collections::BTreeSet<u32> = uids.by_app.values().copied().collect();
        let uid = (APP_UID_FIRST..APP_UID_FIRST + APP_UID_COUNT)
            .find(|uid| !taken.contains(uid))
            .ok_or_else(|| SandboxError::UidsExhausted(app.into()))?;
        uids.by_app.insert(app.into(), uid);
        let file = UidsFile {
            apps: uids.by_app.clone(),
        };
        let written = serde_json::to_vec_pretty(&file)
            .map_err(std::io::Error::other)
            .and_then(|bytes| px_runtime::fs::write_atomic(&uids.file, &bytes));
        if let Err(source) = written {
            uids.by_app.remove(app);
            return Err(SandboxError::Io {
                what: format!("recording app uids in {}", uids.file.display()),
                source,
            });
        }
        Ok(uid)
    }
}

/// `setpriv`'s arguments that make the command `uid` (and group `uid`, no other groups) with
/// no capability it could keep (ambient and inheritable sets emptied; an unprivileged exec
/// keeps nothing else) and no way to gain one (no new privileges). The bounding set stays as
/// the unit left it: emptying it needs `CAP_SETPCAP`, and with nothing inheritable and no new
/// privileges no exec can raise a capability from it. Root, which can, empties it too.
fn switch_args(uid: u32, users: Users) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        format!("--reuid={uid}").into(),
        format!("--regid={uid}").into(),
        "--clear-groups".into(),
    ];
    args.extend(px_runtime::caps::DROP_ARGS.iter().map(OsString::from));
    if users == Users::Root {
        args.push("--bounding-set=-all".into());
    }
    args.extend(["--no-new-privs".into(), "--".into()]);
    args
}

/// Gives `path` and everything below it to `uid` (and group `uid`), links not followed. The
/// tree is listed first and given away deepest first: a directory given away (0700) could no
/// longer be listed or walked through by a Maestro that is not root.
fn chown_tree(path: &Path, uid: u32) -> std::io::Result<()> {
    let mut listed = Vec::new();
    let mut pending = vec![path.to_path_buf()];
    while let Some(path) = pending.pop() {
        if std::fs::symlink_metadata(&path)?.is_dir() {
            for entry in std::fs::read_dir(&path)? {
                pending.push(entry?.path());
            }
        }
        listed.push(path);
    }
    for path in listed.iter().rev() {
        std::os::unix::fs::lchown(path, Some(uid), Some(uid))?;
    }
    Ok(())
}

/// One top-level entry of a release.
struct Entry {
    name: OsString,
    /// Where it points, when it is a symbolic link.
    link: Option<PathBuf>,
}

/// The release's top-level entries, at most [`MAX_TOP_LEVEL_ENTRIES`].
fn top_level(release: &Path) -> Result<Vec<Entry>, SandboxError> {
    let io = |source| SandboxError::Io {
        what: format!("listing {}", release.display()),
        source,
    };
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(release).map_err(io)? {
        let entry = entry.map_err(io)?;
        if entries.len() == MAX_TOP_LEVEL_ENTRIES {
            let count = std::fs::read_dir(release).map_err(io)?.count();
            return Err(SandboxError::TooManyEntries { count });
        }
        let link = match entry.file_type().map_err(io)?.is_symlink() {
            true => Some(std::fs::read_link(entry.path()).map_err(io)?),
            false => None,
        };
        entries.push(Entry {
            name: entry.file_name(),
            link,
        });
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(entries)
}

/// Whether bubblewrap can start an app process on this machine (as this user): what `em up`
/// asks before choosing its sandbox.
pub fn bubblewrap_works() -> bool {
    let Some(bwrap) = find_on_path("bwrap") else {
        return false;
    };
    let identity = if rustix::process::geteuid().is_root() {
        Identity::Root
    } else {
        Identity::Namespace {
            ids: None,
            no_nested: true,
        }
    };
    let args = Bwrap::base(identity, false, DEFAULT_TMP_SIZE.0).finish(Path::new("/"));
    std::process::Command::new(bwrap)
        .args(args)
        .arg("true")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn sandbox(dir: &Path) -> AppSandbox {
        AppSandbox {
            mode: SandboxConfig::Bubblewrap,
            bwrap: "bwrap".into(),
            setpriv: "setpriv".into(),
            // As root, the sandbox drops to the app's uid (and gives it its data directory).
            users: Users::detect(),
            state_dir: dir.to_path_buf(),
            tmp_bytes: 1,
            app_dir_bytes: 1,
            data: dir.join(DATA_DIR),
            uids: Mutex::new(Uids {
                file: dir.join(UIDS_FILE),
                by_app: BTreeMap::new(),
            }),
        }
    }

    #[test]
    fn each_app_gets_its_own_uid_which_it_keeps_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let first = sandbox(dir.path());
        let a = first.uid("alpha").unwrap();
        let b = first.uid("beta").unwrap();
        assert_ne!(a, b);
        assert!(a >= APP_UID_FIRST && b >= APP_UID_FIRST);
        assert_eq!(first.uid("alpha").unwrap(), a);
        // A restarted Maestro reads them back.
        let again = AppSandbox::new(
            SandboxConfig::None,
            dir.path(),
            DEFAULT_TMP_SIZE,
            DEFAULT_APP_DIR_SIZE,
        )
        .unwrap();
        assert_eq!(again.uid("beta").unwrap(), b);
        assert_eq!(again.uid("alpha").unwrap(), a);
        assert_ne!(again.uid("gamma").unwrap(), a);
    }

    #[test]
    fn a_release_with_too_many_top_level_entries_is_refused_naming_the_count() {
        let dir = tempfile::tempdir().unwrap();
        let release = dir.path().join("release");
        std::fs::create_dir(&release).unwrap();
        for i in 0..=MAX_TOP_LEVEL_ENTRIES {
            std::fs::write(release.join(format!("f{i}")), "").unwrap();
        }
        let err = sandbox(dir.path()).prefix("alpha", &release).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "the release has {} top-level entries, more than the {MAX_TOP_LEVEL_ENTRIES} a sandbox holds: move them into a directory",
                MAX_TOP_LEVEL_ENTRIES + 1
            )
        );
    }

    #[test]
    fn release_entries_are_bound_read_only_into_a_sized_app_directory() {
        let dir = tempfile::tempdir().unwrap();
        let release = dir.path().join("release");
        std::fs::create_dir_all(release.join("static")).unwrap();
        std::fs::write(release.join("app.py"), "").unwrap();
        std::os::unix::fs::symlink("static", release.join("public")).unwrap();
        let words = sandbox(dir.path()).prefix("alpha", &release).unwrap();
        let text: Vec<String> = words
            .iter()
            .map(|w| w.to_string_lossy().into_owned())
            .collect();
        let joined = text.join(" ");
        let r = release.display();
        let perms = if rustix::process::geteuid().is_root() {
            "1777"
        } else {
            "0755"
        };
        assert!(joined.contains(&format!("--perms {perms} --size 1 --tmpfs {r} --ro-bind {r}/app.py {r}/app.py --symlink static {r}/public --ro-bind {r}/static {r}/static")), "{joined}");
        // The only writable bind is the app's data directory.
        let data = dir.path().join(DATA_DIR).join("alpha");
        assert_eq!(joined.matches("--bind ").count(), 1, "{joined}");
        assert!(
            joined.contains(&format!("--bind {0} {0}", data.display())),
            "{joined}"
        );
        if rustix::process::geteuid().is_root() {
            assert!(
                joined.contains(&format!("--reuid={APP_UID_FIRST}")),
                "{joined}"
            );
        }
    }
}
