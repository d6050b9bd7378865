//! Why a build failed, phrased for the person who deployed: each message says what to change.

use std::io;
use std::path::PathBuf;

use px_bundle::BundleError;

/// Why [`build`](crate::build) failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The app asks for a runtime version the platform does not have.
    #[error(
        "{file} asks for {request}, which this platform does not have (it has {available}); change {file} to one of those, or ask the operator to add it to the runtimes directory (<runtimes_dir>/{name}/<version>/)"
    )]
    RuntimeUnavailable {
        /// Where the request came from (`app.toml`, `.python-version`, ...).
        file: String,
        /// What was asked, as written (`python3==3.99`).
        request: String,
        name: String,
        /// The versions the platform has, or "none".
        available: String,
    },
    /// The runtime was found but does not run once copied into the release.
    #[error(
        "the runtime {runtime} from {source_path} does not run from inside the release ({reason}); it is not relocatable: install a relocatable build in the runtimes directory"
    )]
    RuntimeNotRelocatable {
        runtime: String,
        source_path: PathBuf,
        reason: String,
    },
    /// The root files do not make an app the builder can build.
    #[error(transparent)]
    Detection(#[from] px_proto::detect::DetectError),
    /// The source's root files could not be read.
    #[error("reading the app's root files: {0}")]
    Source(#[source] BundleError),
    /// An installer input the builder cannot read.
    #[error("{file}: {reason}")]
    BadInput { file: String, reason: String },
    /// The lockfile does not match its manifest.
    #[error("{file} is out of date with {manifest}; update it ({hint}) and deploy again")]
    LockfileOutOfDate {
        file: String,
        manifest: String,
        hint: String,
    },
    /// A dependency the registry does not have.
    #[error(
        "the dependency `{name}` does not exist in the package registry; check its spelling in {file}"
    )]
    UnknownDependency { name: String, file: String },
    /// An installer or build step exited with an error.
    #[error("{step} failed ({status}); its last lines:\n{tail}")]
    StepFailed {
        step: String,
        status: String,
        tail: String,
    },
    /// Django's collectstatic failed.
    #[error(
        "python manage.py collectstatic --noinput failed; fix it, or set `[build] collectstatic = false` in app.toml to skip it; its last lines:\n{tail}"
    )]
    CollectstaticFailed { tail: String },
    #[error(
        "the build took longer than its time limit of {seconds} s and was stopped; make it faster or ask the operator for a longer build time"
    )]
    TimeLimit { seconds: u64 },
    #[error(
        "{step} ran out of memory (the build's limit is {limit_bytes} bytes) and was stopped; use less memory or ask the operator for a larger build memory limit"
    )]
    MemoryLimit { step: String, limit_bytes: u64 },
    #[error(
        "the build wrote more than its disk limit of {limit_bytes} bytes and was stopped; leave large files out of the build or ask the operator for a larger build disk limit"
    )]
    DiskLimit { limit_bytes: u64 },
    #[error(
        "the build printed more than its output limit of {limit_bytes} bytes and was stopped; make it quieter"
    )]
    OutputLimit { limit_bytes: u64 },
    #[error("{step} started more processes than the build's limit of {limit} and was stopped")]
    ProcessLimit { step: String, limit: u64 },
    /// bubblewrap is missing or cannot make its namespaces.
    #[error(
        "the build sandbox (bubblewrap) is unavailable: {reason}; install the `bubblewrap` package or run builds with `sandbox = \"none\"`"
    )]
    SandboxUnavailable { reason: String },
    /// The pinned uv could not be installed.
    #[error("cannot install uv {version} into {dir}: {reason}")]
    ToolInstall {
        version: String,
        dir: PathBuf,
        reason: String,
    },
    /// A layer could not be packed.
    #[error("packing the {layer} layer: {source}")]
    Pack {
        layer: &'static str,
        #[source]
        source: BundleError,
    },
    /// Local I/O failed; not the app's fault.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

impl BuildError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }

    /// True when the app (its files, its commands) is at fault rather than the node.
    pub fn is_app_error(&self) -> bool {
        !matches!(
            self,
            Self::Io { .. }
                | Self::SandboxUnavailable { .. }
                | Self::ToolInstall { .. }
                | Self::RuntimeNotRelocatable { .. }
        )
    }
}

/// Adds a context line to I/O errors.
pub(crate) trait IoContext<T> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T, BuildError>;
}

impl<T> IoContext<T> for Result<T, io::Error> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T, BuildError> {
        self.map_err(|e| BuildError::io(context(), e))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_runtime_message_names_the_file_the_request_and_what_exists() {
        let e = BuildError::RuntimeUnavailable {
            file: ".python-version".into(),
            request: "python3==3.99".into(),
            name: "python3".into(),
            available: "3.12.1, 3.11.7".into(),
        };
        let text = e.to_string();
        for part in [
            ".python-version",
            "python3==3.99",
            "3.12.1, 3.11.7",
            "runtimes directory",
        ] {
            assert!(text.contains(part), "{text}");
        }
        assert!(e.is_app_error());
    }

    #[test]
    fn messages_are_lowercase_without_a_trailing_period() {
        for e in [
            BuildError::TimeLimit { seconds: 1 },
            BuildError::DiskLimit { limit_bytes: 1 },
            BuildError::OutputLimit { limit_bytes: 1 },
            BuildError::UnknownDependency {
                name: "x".into(),
                file: "requirements.txt".into(),
            },
            BuildError::SandboxUnavailable { reason: "x".into() },
        ] {
            let s = e.to_string();
            assert!(!s.ends_with('.'), "{s}");
            assert!(s.chars().next().is_some_and(|c| c.is_lowercase()), "{s}");
        }
    }
}
