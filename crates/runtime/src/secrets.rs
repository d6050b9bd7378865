//! Secrets read from files (systemd `LoadCredential=`, Ansible-managed files), never from the
//! command line, and refused when other users could read them.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Largest secret file read; tokens and keys are far smaller.
pub const MAX_SECRET_BYTES: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read secret file {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    /// Its group or other users may read it (any of the mode bits 077).
    #[error(
        "secret file {path} is readable by its group or by other users (mode {mode:03o}); run `chmod 600 {path}`"
    )]
    WorldReadable { path: String, mode: u32 },
    #[error("secret file {path} is larger than {MAX_SECRET_BYTES} bytes")]
    TooLarge { path: String },
    #[error("secret file {path} is empty")]
    Empty { path: String },
}

/// Reads a secret, trimming surrounding whitespace.
pub fn read_secret_file(path: &Path) -> Result<String, SecretError> {
    let shown = path.display().to_string();
    let io = |source| SecretError::Io {
        path: shown.clone(),
        source,
    };
    let meta = check_private(path)?;
    if meta.len() > MAX_SECRET_BYTES {
        return Err(SecretError::TooLarge { path: shown });
    }
    let text = std::fs::read_to_string(path).map_err(io)?;
    let secret = text.trim().to_string();
    if secret.is_empty() {
        return Err(SecretError::Empty { path: shown });
    }
    Ok(secret)
}

/// Refuses `path` unless only its owner may read or write it (a private key, a token): a file
/// its group may read is shared with every service and person in that group. Returns its
/// metadata.
pub fn check_private(path: &Path) -> Result<std::fs::Metadata, SecretError> {
    let shown = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|source| SecretError::Io {
        path: shown.clone(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(SecretError::WorldReadable { path: shown, mode });
    }
    Ok(meta)
}

/// Writes a secret file readable by its owner only, creating it with mode 0600 from the start.
pub fn write_secret_file(path: &Path, secret: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(secret.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_private_file_and_refuses_shared_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        write_secret_file(&path, "s3cret").unwrap();
        assert_eq!(read_secret_file(&path).unwrap(), "s3cret");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_secret_file(&path).unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");
        // Readable by its group only is refused too, naming the file and its mode.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = read_secret_file(&path).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains("(mode 640)"), "{err}");
    }

    #[test]
    fn empty_and_missing_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        write_secret_file(&path, "  ").unwrap();
        assert!(matches!(
            read_secret_file(&path),
            Err(SecretError::Empty { .. })
        ));
        assert!(matches!(
            read_secret_file(&dir.path().join("nope")),
            Err(SecretError::Io { .. })
        ));
    }
}
