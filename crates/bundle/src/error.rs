//! The crate's error type: what is wrong with a bundle (or the app directory being packed),
//! phrased so the person deploying knows what to fix.

use std::io;

use px_proto::detect::DetectError;
use px_proto::manifest::ManifestError;

/// Why packing, inspecting or unpacking failed.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// A path that could escape the release directory or that the unpacker cannot represent.
    #[error("unsafe path `{path}`: {reason}")]
    UnsafePath { path: String, reason: String },
    /// An entry that is not a regular file, directory or symlink.
    #[error("`{path}` is a {kind}; bundles may only hold regular files, directories and symlinks")]
    UnsupportedEntry { path: String, kind: String },
    #[error(
        "the bundle has more than {max} entries; leave build output and dependencies out with .emignore"
    )]
    TooManyEntries { max: u64 },
    /// File contents add up to more than the limit (this is also how a bomb is stopped).
    #[error("the bundle unpacks to more than {max} bytes; leave large files out with .emignore")]
    TooLarge { max: u64 },
    #[error("no app.toml at the bundle root; run `em init` or add one")]
    MissingManifest,
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(
        "app.toml has no `run`, there is no executable `apprunner` at the root and no Procfile with a `web:` line; add `run = \"...\"` to app.toml, a `web: <command>` line to the Procfile, or ship an `apprunner` with its exec bit set (chmod +x apprunner)"
    )]
    NoRunner,
    /// The root files do not make an app detection knows how to build.
    #[error(transparent)]
    Detect(#[from] DetectError),
    /// The stream is not a zstd-compressed tar archive, or it is truncated.
    #[error("not a valid bundle (zstd-compressed tar): {0}; pack it again with `em deploy`")]
    Corrupt(String),
    /// Reading the source or writing the destination failed; not the bundle's fault.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

impl BundleError {
    /// True when the bundle's content (or the packed directory) is at fault, so the caller
    /// should tell the client what to fix (the repository answers 422); false for local I/O
    /// failures, which are the server's problem.
    pub fn is_client_error(&self) -> bool {
        !matches!(self, BundleError::Io { .. })
    }

    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        BundleError::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn unsafe_path(path: impl Into<String>, reason: impl Into<String>) -> Self {
        BundleError::UnsafePath {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

/// Adds a context line to I/O errors, so an `Io` error says which file it was about.
pub(crate) trait IoContext<T> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T, BundleError>;
}

impl<T> IoContext<T> for Result<T, io::Error> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T, BundleError> {
        self.map_err(|e| BundleError::io(context(), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_io_errors_are_server_errors() {
        let io = BundleError::io("writing x", io::Error::other("disk full"));
        assert!(!io.is_client_error());
        assert_eq!(io.to_string(), "writing x: disk full");
        for e in [
            BundleError::unsafe_path("../x", "leaves the bundle"),
            BundleError::MissingManifest,
            BundleError::NoRunner,
            BundleError::TooLarge { max: 1 },
            BundleError::TooManyEntries { max: 1 },
            BundleError::Corrupt("truncated".into()),
            BundleError::Detect(DetectError::NotUtf8 {
                file: "package.json",
            }),
        ] {
            assert!(e.is_client_error(), "{e}");
        }
    }

    #[test]
    fn messages_name_the_path_and_are_lowercase_without_period() {
        let e = BundleError::unsafe_path("../x", "leaves the bundle");
        assert_eq!(e.to_string(), "unsafe path `../x`: leaves the bundle");
        let e = BundleError::UnsupportedEntry {
            path: "dev/null".into(),
            kind: "fifo".into(),
        };
        assert!(e.to_string().contains("`dev/null`"));
        for e in [e, BundleError::MissingManifest, BundleError::NoRunner] {
            let s = e.to_string();
            assert!(!s.ends_with('.'), "{s}");
            assert!(s.chars().next().is_some_and(|c| !c.is_uppercase()), "{s}");
        }
    }
}
