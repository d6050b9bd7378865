//! Who a build's commands are outside their sandbox, and the trees lent to that user.
//!
//! Given a uid ([`crate::BuildRequest::uid`], the app's own under `maestro.service`), a builder
//! that can switch users runs every command as that uid: as root, bubblewrap runs without a
//! user namespace and `setpriv` drops to the uid inside it; holding `CAP_SETUID`, `CAP_SETGID`
//! and `CAP_CHOWN` (Maestro's ambient capabilities), `setpriv` takes the uid and empties every
//! capability set it may before bubblewrap, which then makes a user namespace in which the uid
//! is `nobody`. Without a uid the commands are `nobody` (as root) or the builder's own uid.
//!
//! A builder that is not root cannot read what the uid writes (the umask of `maestro.service`
//! makes it 0600/0700), and the uid cannot reach the builder's directories. So, around each
//! command, the trees it writes (the build directory, the app's installer caches) and the
//! app's kept dependency trees are given to the uid ([`give_tree`]) and taken back after it
//! ([`take_back`], `CAP_CHOWN`), so that the builder checks and packs what the command left
//! as before; the directories above them are made traversable by others (nothing listed);
//! and the platform's shared read-only trees a command needs (a runtime's copy, the pinned
//! uv, the CA file), which hold nothing secret, are made readable by others ([`share_tree`]).

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::IoContext;
use crate::{BuildError, Sandbox};

/// The unprivileged user builds run as when no uid is given: `nobody`, which owns nothing.
pub(crate) const NOBODY: u32 = 65534;
/// Search permission for others: walk through a directory by name, list nothing.
const OTHERS_TRAVERSE: u32 = 0o001;
/// Read permission for group and others, and search (execute) where the owner has it.
const SHARED_READ: u32 = 0o044;
const SHARED_EXEC: u32 = 0o011;
/// What the owner needs on a directory taken back to list, walk and empty it.
const OWNER_DIR: u32 = 0o700;
/// Write permission for group and others, taken from every directory taken back.
const OTHERS_WRITE: u32 = 0o022;
/// The mode of a lent tree's top: its uid's, open to the builder's group, closed to others.
const GATE: u32 = 0o750;

/// Who a build's commands are outside the sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RunAs {
    /// The builder is root: bubblewrap without a user namespace, `setpriv` to `uid` inside.
    Root { uid: u32 },
    /// The builder can switch users without being root: `setpriv` to `uid`, dropping every
    /// capability, then bubblewrap in a user namespace.
    Switch { uid: u32 },
    /// The builder's own uid, in a user namespace mapped to `nobody`.
    Own,
}

impl RunAs {
    /// Who the commands of a build in `sandbox` are, `uid` asked for. Without a sandbox the
    /// commands run as the builder, whatever was asked.
    pub(crate) fn choose(sandbox: Sandbox, uid: Option<u32>) -> Result<Self, BuildError> {
        let root = rustix::process::geteuid().is_root();
        match (sandbox, uid) {
            (Sandbox::None, _) => Ok(Self::Own),
            (Sandbox::Bubblewrap, _) if root => Ok(Self::Root {
                uid: uid.unwrap_or(NOBODY),
            }),
            (Sandbox::Bubblewrap, None) => Ok(Self::Own),
            (Sandbox::Bubblewrap, Some(uid)) if px_runtime::caps::can_switch_users() => {
                Ok(Self::Switch { uid })
            }
            (Sandbox::Bubblewrap, Some(uid)) => Err(BuildError::SandboxUnavailable {
                reason: format!(
                    "the build was to run as uid {uid}, but the builder is neither root nor holds CAP_SETUID, CAP_SETGID, CAP_CHOWN and CAP_KILL"
                ),
            }),
        }
    }
}

/// Lends `path` and everything below it to `uid` (group `uid`), links not followed. What is
/// below is made readable by others first and `path` itself becomes a gate: the uid's, in the
/// builder's group, 0750. So only the builder (through the group) and the uid get in, and the
/// builder still reads what the command writes there (commands run with umask 022), to watch
/// the build's disk use. The tree is listed before it is given away: a directory given away
/// could no longer be listed by a builder that is not root. What is under `withheld` stays
/// the builder's as it is (the layers' archives, hard links into the shared cache).
pub(crate) fn give_tree(path: &Path, uid: u32, withheld: &[PathBuf]) -> Result<(), BuildError> {
    share_tree_but(path, withheld)?;
    let meta = fs::symlink_metadata(path).context(|| format!("reading {}", path.display()))?;
    if meta.is_dir() {
        let gate = (meta.mode() & 0o7777 & !0o007) | GATE;
        fs::set_permissions(path, fs::Permissions::from_mode(gate))
            .context(|| format!("closing {} to other uids", path.display()))?;
    }
    let mut listed = Vec::new();
    let mut pending = vec![path.to_path_buf()];
    while let Some(path) = pending.pop() {
        if withheld.contains(&path) {
            continue;
        }
        let meta = fs::symlink_metadata(&path).context(|| format!("reading {}", path.display()))?;
        if meta.is_dir() {
            for entry in fs::read_dir(&path).context(|| format!("listing {}", path.display()))? {
                pending.push(
                    entry
                        .context(|| format!("listing {}", path.display()))?
                        .path(),
                );
            }
        }
        listed.push(path);
    }
    let group = rustix::process::getegid().as_raw();
    for (i, entry) in listed.iter().enumerate().rev() {
        let gid = if i == 0 { group } else { uid };
        std::os::unix::fs::lchown(entry, Some(uid), Some(gid))
            .context(|| format!("handing {} to the build's uid", entry.display()))?;
    }
    Ok(())
}

/// Takes `path` and everything below it back from the build's uid, for the builder's own uid
/// and group, links not followed. Top down: each directory is the builder's again, and so
/// listable, before it is listed; one the build left without search permission for its owner
/// gets it back (0700 at least), so the builder can pack and remove it. Each directory also
/// loses write permission for group and others before it is listed, so no process of the uid
/// (an instance of the app that got out of its sandbox) can swap an entry for a link to
/// elsewhere while the walk goes on below it: every directory above an entry being taken
/// back is the builder's alone to change.
pub(crate) fn take_back(path: &Path) -> Result<(), BuildError> {
    let uid = rustix::process::geteuid().as_raw();
    let gid = rustix::process::getegid().as_raw();
    let mut pending = vec![path.to_path_buf()];
    while let Some(path) = pending.pop() {
        let meta = match fs::symlink_metadata(&path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(BuildError::io(format!("reading {}", path.display()), e)),
        };
        if meta.uid() != uid || meta.gid() != gid {
            std::os::unix::fs::lchown(&path, Some(uid), Some(gid))
                .context(|| format!("taking {} back from the build's uid", path.display()))?;
        }
        if meta.is_dir() {
            let mode = meta.mode() & 0o7777;
            let wanted = (mode | OWNER_DIR) & !OTHERS_WRITE;
            if mode != wanted {
                fs::set_permissions(&path, fs::Permissions::from_mode(wanted))
                    .context(|| format!("closing {} to the build's uid", path.display()))?;
            }
            for entry in fs::read_dir(&path).context(|| format!("listing {}", path.display()))? {
                pending.push(
                    entry
                        .context(|| format!("listing {}", path.display()))?
                        .path(),
                );
            }
        }
    }
    Ok(())
}

/// Lets others walk through every directory above `path` that the builder owns (search
/// permission only: nothing is listed), so a command's uid reaches `path` by name.
pub(crate) fn open_ancestors(path: &Path) -> Result<(), BuildError> {
    let own = rustix::process::geteuid().as_raw();
    for dir in path.ancestors().skip(1) {
        let Ok(meta) = fs::metadata(dir) else {
            continue;
        };
        let mode = meta.mode() & 0o7777;
        if meta.uid() == own && mode & OTHERS_TRAVERSE == 0 {
            fs::set_permissions(dir, fs::Permissions::from_mode(mode | OTHERS_TRAVERSE))
                .context(|| format!("letting the build's uid through {}", dir.display()))?;
        }
    }
    Ok(())
}

/// Makes what the builder owns in `path` readable by others (and searchable or executable
/// where its owner may), links not followed: for the platform's shared trees that hold
/// nothing secret. What others own is left as it is.
pub(crate) fn share_tree(path: &Path) -> Result<(), BuildError> {
    share_tree_but(path, &[])
}

/// [`share_tree`], leaving what is under `withheld` as it is.
fn share_tree_but(path: &Path, withheld: &[PathBuf]) -> Result<(), BuildError> {
    let own = rustix::process::geteuid().as_raw();
    let mut pending: Vec<PathBuf> = vec![path.to_path_buf()];
    while let Some(path) = pending.pop() {
        if withheld.contains(&path) {
            continue;
        }
        let meta = fs::symlink_metadata(&path).context(|| format!("reading {}", path.display()))?;
        if meta.is_symlink() {
            continue;
        }
        let mode = meta.mode() & 0o7777;
        let exec = if meta.is_dir() || mode & 0o100 != 0 {
            SHARED_EXEC
        } else {
            0
        };
        let wanted = mode | SHARED_READ | exec;
        if meta.uid() == own && wanted != mode {
            fs::set_permissions(&path, fs::Permissions::from_mode(wanted))
                .context(|| format!("sharing {} with the build's uid", path.display()))?;
        }
        if meta.is_dir()
            && let Ok(listing) = fs::read_dir(&path)
        {
            pending.extend(listing.flatten().map(|entry| entry.path()));
        }
    }
    Ok(())
}

/// `setpriv`'s arguments that make a command `uid` (and group `uid`, no other group) holding
/// no capability; `bounding` empties the bounding set too, which only root may.
pub(crate) fn switch_args(uid: u32, bounding: bool) -> Vec<String> {
    let mut args = vec![
        format!("--reuid={uid}"),
        format!("--regid={uid}"),
        "--clear-groups".into(),
    ];
    args.extend(
        px_runtime::caps::DROP_ARGS
            .iter()
            .map(|arg| arg.to_string()),
    );
    if bounding {
        args.push("--bounding-set=-all".into());
    }
    args.extend(["--no-new-privs".into(), "--".into()]);
    args
}

/// Runs file work off the async threads.
pub(crate) async fn blocking(
    work: impl FnOnce() -> Result<(), BuildError> + Send + 'static,
) -> Result<(), BuildError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| BuildError::io("handing trees to the build's uid", std::io::Error::other(e)))?
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn shared_trees_become_readable_and_ancestors_traversable_without_listing() {
        let dir = tempfile::tempdir().unwrap();
        let outer = dir.path().join("outer");
        let tree = outer.join("tree");
        fs::create_dir_all(tree.join("bin")).unwrap();
        fs::write(tree.join("bin/tool"), "x").unwrap();
        fs::write(tree.join("data"), "x").unwrap();
        let set = |p: &Path, m: u32| fs::set_permissions(p, fs::Permissions::from_mode(m)).unwrap();
        set(&tree.join("bin/tool"), 0o700);
        set(&tree.join("data"), 0o600);
        set(&tree.join("bin"), 0o700);
        set(&tree, 0o700);
        set(&outer, 0o700);
        share_tree(&tree).unwrap();
        open_ancestors(&tree).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().mode() & 0o7777;
        assert_eq!(mode(&tree.join("bin/tool")), 0o755);
        assert_eq!(mode(&tree.join("data")), 0o644);
        assert_eq!(mode(&tree.join("bin")), 0o755);
        assert_eq!(mode(&outer), 0o701, "walked through, not listed");
    }

    #[test]
    fn a_tree_taken_back_is_the_builders_and_walkable_again() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        fs::create_dir_all(tree.join("closed/inner")).unwrap();
        fs::create_dir_all(tree.join("open")).unwrap();
        fs::write(tree.join("closed/inner/file"), "x").unwrap();
        fs::set_permissions(tree.join("closed"), fs::Permissions::from_mode(0o000)).unwrap();
        fs::set_permissions(tree.join("open"), fs::Permissions::from_mode(0o777)).unwrap();
        take_back(&tree).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().mode() & 0o7777;
        assert_eq!(mode(&tree.join("closed")), 0o700);
        assert_eq!(
            mode(&tree.join("open")),
            0o755,
            "no longer writable by the build's uid"
        );
        assert!(tree.join("closed/inner/file").exists());
        if rustix::process::geteuid().is_root() {
            fs::create_dir(tree.join("kept")).unwrap();
            give_tree(&tree, NOBODY, &[tree.join("kept")]).unwrap();
            assert_eq!(
                fs::metadata(tree.join("kept")).unwrap().uid(),
                0,
                "withheld"
            );
            let file = fs::metadata(tree.join("closed/inner/file")).unwrap();
            assert_eq!((file.uid(), file.gid()), (NOBODY, NOBODY));
            let top = fs::metadata(&tree).unwrap();
            assert_eq!(
                (top.uid(), top.gid()),
                (NOBODY, 0),
                "the builder's group keeps a way in"
            );
            assert_eq!(top.mode() & 0o7777, 0o750);
            take_back(&tree).unwrap();
            let file = fs::metadata(tree.join("closed/inner/file")).unwrap();
            assert_eq!((file.uid(), file.gid()), (0, 0));
        }
    }
}
