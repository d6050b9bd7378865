//! File-tree helpers the builder needs: copying a tree (symlinks kept as links, modes kept),
//! measuring a tree's disk usage, handing a tree to the sandbox's user, and moving a finished
//! tree into the cache atomically.

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use crate::BuildError;
use crate::error::IoContext;

/// What [`copy_tree`] does with a symlink whose target is an absolute path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AbsoluteLinks {
    /// Copy it as a link, like every other.
    Keep,
    /// Copy the file it points to instead (a directory or a dangling link is left out): for a
    /// tree that moves to another machine, such as Debian's `sitecustomize.py` pointing into
    /// `/etc`.
    Follow,
}

/// Copies `from` into `to` (which must not exist), skipping every relative path for which
/// `skip` answers true (and what is below it). Symlinks are copied as links (absolute ones as
/// `absolute` says); files keep their exec bit; anything else (a FIFO, a socket) is left out.
pub(crate) fn copy_tree(
    from: &Path,
    to: &Path,
    skip: &dyn Fn(&Path) -> bool,
    absolute: AbsoluteLinks,
) -> Result<(), BuildError> {
    fs::create_dir(to).context(|| format!("creating {}", to.display()))?;
    let mut pending = vec![std::path::PathBuf::new()];
    while let Some(relative) = pending.pop() {
        let dir = from.join(&relative);
        for item in fs::read_dir(&dir).context(|| format!("listing {}", dir.display()))? {
            let item = item.context(|| format!("listing {}", dir.display()))?;
            let rel = relative.join(item.file_name());
            if skip(&rel) {
                continue;
            }
            let source = item.path();
            let target = to.join(&rel);
            let meta = fs::symlink_metadata(&source)
                .context(|| format!("reading {}", source.display()))?;
            let kind = meta.file_type();
            if kind.is_dir() {
                fs::create_dir(&target).context(|| format!("creating {}", target.display()))?;
                fs::set_permissions(&target, fs::Permissions::from_mode(0o755))
                    .context(|| format!("setting the mode of {}", target.display()))?;
                pending.push(rel);
            } else if kind.is_symlink() {
                let link = fs::read_link(&source)
                    .context(|| format!("reading the link {}", source.display()))?;
                if link.is_absolute() && absolute == AbsoluteLinks::Follow {
                    if fs::metadata(&source).is_ok_and(|m| m.is_file()) {
                        copy_file(&source, &target)?;
                    }
                    continue;
                }
                std::os::unix::fs::symlink(&link, &target)
                    .context(|| format!("creating the link {}", target.display()))?;
            } else if kind.is_file() {
                copy_file(&source, &target)?;
            }
        }
    }
    Ok(())
}

/// Copies one file (following a link), keeping only its exec bit, so it is readable by the
/// sandbox's user whatever the source's owner allowed.
fn copy_file(source: &Path, target: &Path) -> Result<(), BuildError> {
    fs::copy(source, target)
        .context(|| format!("copying {} to {}", source.display(), target.display()))?;
    let exec = fs::metadata(source).is_ok_and(|m| m.mode() & 0o111 != 0);
    let mode = if exec { 0o755 } else { 0o644 };
    fs::set_permissions(target, fs::Permissions::from_mode(mode))
        .context(|| format!("setting the mode of {}", target.display()))
}

/// Bytes of disk the trees under `paths` occupy (allocated blocks, so sparse files count for
/// what they use). Missing paths count as empty; entries that vanish while being measured are
/// skipped, since the build keeps changing its tree.
pub(crate) fn disk_usage(paths: &[&Path]) -> u64 {
    let mut total = 0u64;
    let mut pending: Vec<std::path::PathBuf> = paths.iter().map(|p| p.to_path_buf()).collect();
    while let Some(path) = pending.pop() {
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        total = total.saturating_add(meta.blocks().saturating_mul(512));
        if meta.is_dir()
            && let Ok(listing) = fs::read_dir(&path)
        {
            pending.extend(listing.flatten().map(|e| e.path()));
        }
    }
    total
}

/// Gives `path` and everything below it to `uid`:`gid`, without following symlinks.
pub(crate) fn chown_tree(path: &Path, uid: u32, gid: u32) -> Result<(), BuildError> {
    let mut pending = vec![path.to_path_buf()];
    while let Some(path) = pending.pop() {
        std::os::unix::fs::lchown(&path, Some(uid), Some(gid))
            .context(|| format!("handing {} to the build user", path.display()))?;
        let meta = fs::symlink_metadata(&path).context(|| format!("reading {}", path.display()))?;
        if meta.is_dir() {
            for item in fs::read_dir(&path).context(|| format!("listing {}", path.display()))? {
                pending.push(
                    item.context(|| format!("listing {}", path.display()))?
                        .path(),
                );
            }
        }
    }
    Ok(())
}

/// Removes `path` (a tree or a file) if it exists.
pub(crate) fn remove_all(path: &Path) -> Result<(), BuildError> {
    let result = match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    result.context(|| format!("removing {}", path.display()))
}

/// Moves the finished `temp` to `dest` in one rename; when another build put `dest` there
/// first, `temp` is dropped and theirs is kept (both are the same content by key).
pub(crate) fn publish(temp: &Path, dest: &Path) -> Result<(), BuildError> {
    match fs::rename(temp, dest) {
        Ok(()) => Ok(()),
        Err(_) if dest.exists() => remove_all(temp),
        Err(e) => Err(BuildError::io(
            format!("moving {} into place", dest.display()),
            e,
        )),
    }
}

/// Hard-links `from` to `to`, or copies it across file systems.
pub(crate) fn link_or_copy(from: &Path, to: &Path) -> Result<(), BuildError> {
    remove_all(to)?;
    if fs::hard_link(from, to).is_ok() {
        return Ok(());
    }
    fs::copy(from, to)
        .map(|_| ())
        .context(|| format!("copying {} to {}", from.display(), to.display()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_copy_keeps_links_and_exec_bits_and_skips_what_it_is_told() {
        let from = tempfile::tempdir().unwrap();
        fs::create_dir_all(from.path().join("bin")).unwrap();
        fs::create_dir_all(from.path().join("lib/test")).unwrap();
        fs::write(from.path().join("bin/python3.12"), b"elf").unwrap();
        fs::set_permissions(
            from.path().join("bin/python3.12"),
            fs::Permissions::from_mode(0o700),
        )
        .unwrap();
        std::os::unix::fs::symlink("python3.12", from.path().join("bin/python3")).unwrap();
        fs::write(from.path().join("lib/test/big"), b"skipped").unwrap();
        let out = tempfile::tempdir().unwrap();
        let to = out.path().join("copy");
        std::os::unix::fs::symlink("/etc/hostname", from.path().join("bin/outside")).unwrap();
        copy_tree(
            from.path(),
            &to,
            &|rel| rel == Path::new("lib/test"),
            AbsoluteLinks::Keep,
        )
        .unwrap();
        assert_eq!(
            fs::read_link(to.join("bin/outside")).unwrap(),
            Path::new("/etc/hostname")
        );
        let followed = out.path().join("followed");
        copy_tree(from.path(), &followed, &|_| false, AbsoluteLinks::Follow).unwrap();
        assert!(
            fs::symlink_metadata(followed.join("bin/outside"))
                .unwrap()
                .is_file()
        );
        assert_eq!(
            fs::read_link(followed.join("bin/python3")).unwrap(),
            Path::new("python3.12")
        );
        assert_eq!(
            fs::read_link(to.join("bin/python3")).unwrap(),
            Path::new("python3.12")
        );
        let mode = fs::metadata(to.join("bin/python3.12"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        assert!(to.join("lib").is_dir());
        assert!(!to.join("lib/test").exists());
        assert!(disk_usage(&[&to]) > 0);
    }
}
