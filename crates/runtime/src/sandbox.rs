//! What every bubblewrap sandbox of the platform shows, shared by builds (`px_build`) and app
//! processes (Maestro's instances, release phases and one-off runs): the namespaces, the
//! system's read-only directories and the few files of `/etc`, a private `/proc`, a minimal
//! `/dev`, a private `/tmp` of a given size, and the parents of mount points made traversable.
//! Each user adds its own mounts (a build's directories, an app's release) after these.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

/// Where Nix keeps every package, on NixOS and wherever Nix is installed.
pub const NIX_STORE: &str = "/nix/store";

/// The system directories a sandbox sees, read-only (each only if it exists). On NixOS every
/// program, library and runtime lives in the Nix store, the other directories holding little
/// more than links into it, so the store is shown too: every user may read it by design, so a
/// sandbox sees nothing there that any local user could not.
pub const SYSTEM_DIRS: &[&str] = &[
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", NIX_STORE,
];

/// The few files of `/etc` a sandboxed process needs: TLS roots, name resolution, user names.
/// On NixOS the files in `/etc/ssl` are links into `/etc/static` (itself a link into the
/// store). Nothing else of `/etc` (not `/etc/platformx`, not `/etc/shadow`) is shown.
pub const SYSTEM_ETC: &[&str] = &[
    "/etc/ssl",
    "/etc/static",
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/passwd",
    "/etc/group",
    "/etc/nsswitch.conf",
];

/// Who the sandboxed process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identity {
    /// Bubblewrap runs as root without a user namespace; the command drops to an
    /// unprivileged user itself (through `setpriv`).
    Root,
    /// An unprivileged caller: a user namespace, in which the process is `uid`/`gid` (or the
    /// caller's own ids when `None`). `no_nested` refuses the process user namespaces of its
    /// own (`--disable-userns`), so it cannot gain the capabilities one would give it.
    Namespace {
        ids: Option<(u32, u32)>,
        no_nested: bool,
    },
}

/// The arguments of one bubblewrap command line, built in order.
#[derive(Debug, Default)]
pub struct Bwrap {
    args: Vec<OsString>,
}

impl Bwrap {
    /// The namespaces (all but the network's: sandboxed processes listen on and reach
    /// loopback ports), the system's directories, `/proc`, `/dev` and a private `/tmp` of
    /// `tmp_bytes`. `new_session` detaches the command from the caller's terminal; app
    /// processes go without it, so that a stop signal sent to their process group reaches
    /// them.
    pub fn base(identity: Identity, new_session: bool, tmp_bytes: u64) -> Self {
        let mut b = Self::default();
        if let Identity::Namespace { ids, no_nested } = identity {
            b.push(&["--unshare-user"]);
            if let Some((uid, gid)) = ids {
                b.push(&["--uid", &uid.to_string(), "--gid", &gid.to_string()]);
            }
            if no_nested {
                b.push(&["--disable-userns"]);
            }
        }
        b.push(&[
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--die-with-parent",
        ]);
        if new_session {
            b.push(&["--new-session"]);
        }
        // The parents of the system directories below `/` (`/nix` of the Nix store), made
        // before bubblewrap makes them itself with the caller's umask, which may leave them
        // closed to the sandbox's user.
        let existing: Vec<&Path> = SYSTEM_DIRS
            .iter()
            .map(Path::new)
            .filter(|dir| dir.exists())
            .collect();
        b.parents_of(&existing, &[]);
        for dir in SYSTEM_DIRS {
            let path = Path::new(dir);
            match std::fs::symlink_metadata(path) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    if let Ok(target) = std::fs::read_link(path) {
                        b.push_os(&["--symlink".as_ref(), target.as_os_str(), path.as_os_str()]);
                    }
                }
                Ok(_) => b.push_os(&["--ro-bind".as_ref(), path.as_os_str(), path.as_os_str()]),
                Err(_) => {}
            }
        }
        b.push(&["--proc", "/proc", "--dev", "/dev"]);
        let size = tmp_bytes.to_string();
        b.push(&["--perms", "1777", "--size", &size, "--tmpfs", "/tmp"]);
        b
    }

    /// Every parent of `paths` that is not `/`, `/tmp` or inside a system directory, made
    /// (in order, shallowest first) and traversable by the sandbox's user: bubblewrap makes
    /// the parents it creates itself 0700. `skip` are trees already mounted, whose insides
    /// need no making.
    pub fn parents_of(&mut self, paths: &[&Path], skip: &[&Path]) {
        let mut parents: Vec<&Path> = paths
            .iter()
            .flat_map(|path| path.ancestors().skip(1))
            .filter(|p| {
                *p != Path::new("/")
                    && *p != Path::new("/tmp")
                    && !skip.iter().any(|s| p.starts_with(s))
                    && !SYSTEM_DIRS.iter().any(|d| p.starts_with(d))
            })
            .collect();
        parents.sort_by_key(|p| (p.components().count(), p.to_path_buf()));
        parents.dedup();
        for parent in parents {
            self.push_os(&[
                "--perms".as_ref(),
                "0755".as_ref(),
                "--dir".as_ref(),
                parent.as_os_str(),
            ]);
        }
    }

    /// A mount of `path` at the same place: `how` is `--bind`, `--ro-bind`, `--ro-bind-try`.
    pub fn mount(&mut self, how: &str, path: &Path) {
        self.push_os(&[how.as_ref(), path.as_os_str(), path.as_os_str()]);
    }

    /// The arguments as they are.
    pub fn push(&mut self, words: &[&str]) {
        self.args.extend(words.iter().map(OsString::from));
    }

    /// The arguments as they are, paths among them.
    pub fn push_os(&mut self, words: &[&OsStr]) {
        self.args.extend(words.iter().map(|w| w.to_os_string()));
    }

    /// The command line after `bwrap`, ending with `--chdir cwd --`.
    pub fn finish(mut self, cwd: &Path) -> Vec<OsString> {
        self.push_os(&["--chdir".as_ref(), cwd.as_os_str(), "--".as_ref()]);
        self.args
    }
}

/// Finds `name` on the service's `PATH` (the process's, through [`crate::host`]).
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&crate::host::env().path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

/// Whether `path` is a file someone may execute.
pub fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unprivileged_sandbox_gets_a_user_namespace_without_nested_ones_and_a_sized_tmp() {
        let args = Bwrap::base(
            Identity::Namespace {
                ids: None,
                no_nested: true,
            },
            false,
            1024,
        )
        .finish(Path::new("/app"));
        let text: Vec<String> = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = text.join(" ");
        assert!(joined.starts_with("--unshare-user --disable-userns --unshare-pid"));
        assert!(!joined.contains("--new-session"));
        assert!(joined.contains("--perms 1777 --size 1024 --tmpfs /tmp"));
        assert!(joined.ends_with("--chdir /app --"));
    }

    #[test]
    fn parents_are_made_shallowest_first_once_without_system_or_skipped_ones() {
        let mut b = Bwrap::default();
        b.parents_of(
            &[
                Path::new("/srv/a/b/c"),
                Path::new("/srv/a/d"),
                Path::new("/usr/x/y"),
                Path::new("/srv/a/b/c/inner"),
            ],
            &[Path::new("/srv/a/b/c")],
        );
        let dirs: Vec<String> = b
            .args
            .chunks(4)
            .map(|w| w[3].to_string_lossy().into_owned())
            .collect();
        assert_eq!(dirs, ["/srv", "/srv/a", "/srv/a/b"]);
    }
}
