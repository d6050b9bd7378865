//! The runtime layer: a copy of the interpreter's tree under `.px/runtime/` without what an app
//! never loads (a Python's standard library compiled to hash-checked bytecode), checked to run
//! from there, packed once per runtime and kept in `cache_dir/runtimes/<key>/` for every later
//! build of every app.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::IoContext;
use crate::runtimes::{Runtime, RuntimeKind};
use crate::sandbox::{Jail, Step};
use crate::{BuildError, fsutil};

/// Bumped whenever what goes into a runtime layer changes (the exclusions below, the compiled
/// standard library), so layers made by an older builder are made again rather than reused.
const LAYOUT_VERSION: &str = "2";
/// How long compiling a Python's standard library may take: seconds on a server, under a
/// minute on an emulated machine; longer means the interpreter hangs.
const STDLIB_COMPILE_TIMEOUT: Duration = Duration::from_secs(600);
/// Where the runtime sits in a release.
pub(crate) const RUNTIME_DIR: &str = ".px/runtime";
/// The cached layer's description, beside the tree and the archive.
const LAYER_JSON: &str = "layer.json";

#[derive(Debug, Serialize, Deserialize)]
struct Stored {
    sha256: String,
    size: u64,
    /// The interpreter loads `lib/libpython*.so` from its own prefix.
    shared_lib: bool,
}

/// A runtime layer ready to use.
#[derive(Debug, Clone)]
pub(crate) struct RuntimeLayer {
    pub runtime: Runtime,
    pub key: String,
    /// `cache_dir/runtimes/<key>/`.
    root: PathBuf,
    pub sha256: String,
    pub size: u64,
    pub reused: bool,
    shared_lib: bool,
}

impl RuntimeLayer {
    /// The runtime's tree (what `.px/runtime` holds), read-only to builds.
    pub(crate) fn dir(&self) -> PathBuf {
        self.root.join("tree").join(RUNTIME_DIR)
    }

    pub(crate) fn bin(&self) -> PathBuf {
        self.dir().join("bin")
    }

    pub(crate) fn archive(&self) -> PathBuf {
        self.root.join("layer")
    }

    /// What instances (and build commands) need to run the copy: a shared-library CPython
    /// finds `libpython` through `LD_LIBRARY_PATH`, since its `RUNPATH` names the prefix it was
    /// built for. `{release}` stands for the release directory.
    pub(crate) fn env(&self, release: &str) -> Vec<(String, String)> {
        if self.shared_lib {
            vec![(
                "LD_LIBRARY_PATH".into(),
                format!("{release}/{RUNTIME_DIR}/lib"),
            )]
        } else {
            Vec::new()
        }
    }

    /// The commands the layer puts on `PATH`.
    pub(crate) fn commands(&self) -> Vec<String> {
        let names: &[&str] = match self.runtime.kind {
            RuntimeKind::Python => &["python", "python3"],
            RuntimeKind::Node => &["node", "npm", "npx"],
        };
        names.iter().map(|s| s.to_string()).collect()
    }
}

/// The cache key: the runtime's name, version and source, and the interpreter's size and
/// modification time, so a reinstalled interpreter at the same path makes a new layer.
fn key(runtime: &Runtime) -> Result<String, BuildError> {
    let meta = fs::metadata(&runtime.executable)
        .context(|| format!("reading {}", runtime.executable.display()))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let mut hasher = Sha256::new();
    for part in [
        LAYOUT_VERSION.to_string(),
        runtime.kind.name().to_string(),
        runtime.version.to_string(),
        runtime.executable.display().to_string(),
        meta.len().to_string(),
        mtime.to_string(),
    ] {
        hasher.update(part.as_bytes());
        hasher.update([0]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// The layer of `runtime`, from the cache or made now (copied, checked in `jail`, packed).
pub(crate) async fn prepare(
    runtime: &Runtime,
    cache_dir: &Path,
    jail: &mut Jail,
    output: &mut (dyn FnMut(&str) + Send),
) -> Result<RuntimeLayer, BuildError> {
    let key = key(runtime)?;
    let runtimes = cache_dir.join("runtimes");
    let root = runtimes.join(&key);
    if let Some(stored) = read_stored(&root) {
        jail.allow_read(&root.join("tree").join(RUNTIME_DIR));
        return Ok(RuntimeLayer {
            runtime: runtime.clone(),
            key,
            root,
            sha256: stored.sha256,
            size: stored.size,
            reused: true,
            shared_lib: stored.shared_lib,
        });
    }
    output(&format!(
        "-----> Preparing the runtime {} from {}",
        runtime.describe(),
        runtime.prefix.display()
    ));
    fs::create_dir_all(&runtimes).context(|| format!("creating {}", runtimes.display()))?;
    let temp = tempfile::Builder::new()
        .prefix(&format!(".{key}.tmp-"))
        .tempdir_in(&runtimes)
        .context(|| format!("creating a directory in {}", runtimes.display()))?;
    set_mode(temp.path(), 0o755)?;
    let tree = temp.path().join("tree");
    let dir = tree.join(RUNTIME_DIR);
    {
        let runtime = runtime.clone();
        let dir = dir.clone();
        tokio::task::spawn_blocking(move || copy_runtime(&runtime, &dir))
            .await
            .map_err(|e| BuildError::io("copying the runtime", std::io::Error::other(e)))??;
    }
    let shared_lib = runtime.kind == RuntimeKind::Python && has_libpython(&dir.join("lib"));
    if runtime.kind == RuntimeKind::Python {
        compile_stdlib(runtime, &dir, shared_lib, output).await;
    }
    check_relocated(runtime, &dir, shared_lib, jail).await?;

    let archive = temp.path().join("layer");
    let summary = {
        let tree = tree.clone();
        let archive = archive.clone();
        tokio::task::spawn_blocking(move || -> Result<px_bundle::LayerSummary, BuildError> {
            let file =
                fs::File::create(&archive).context(|| format!("creating {}", archive.display()))?;
            let mut out = std::io::BufWriter::new(file);
            let summary =
                px_bundle::pack_layer(&tree, &mut out).map_err(|source| BuildError::Pack {
                    layer: "runtime",
                    source,
                })?;
            use std::io::Write;
            out.flush()
                .context(|| format!("writing {}", archive.display()))?;
            Ok(summary)
        })
        .await
        .map_err(|e| BuildError::io("packing the runtime", std::io::Error::other(e)))??
    };
    let stored = Stored {
        sha256: summary.sha256.clone(),
        size: summary.size,
        shared_lib,
    };
    let json = serde_json::to_vec(&stored)
        .map_err(|e| BuildError::io("describing the runtime layer", std::io::Error::other(e)))?;
    fs::write(temp.path().join(LAYER_JSON), json)
        .context(|| "writing the runtime layer's description".into())?;
    jail.forget(&dir);
    let made = temp.keep();
    fsutil::publish(&made, &root)?;
    jail.allow_read(&root.join("tree").join(RUNTIME_DIR));
    output(&format!(
        "       {} packed: {} bytes",
        runtime.describe(),
        summary.size
    ));
    Ok(RuntimeLayer {
        runtime: runtime.clone(),
        key,
        root,
        sha256: summary.sha256,
        size: summary.size,
        reused: false,
        shared_lib,
    })
}

fn read_stored(root: &Path) -> Option<Stored> {
    let text = fs::read(root.join(LAYER_JSON)).ok()?;
    let stored: Stored = serde_json::from_slice(&text).ok()?;
    root.join("layer").is_file().then_some(stored)
}

fn set_mode(path: &Path, mode: u32) -> Result<(), BuildError> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .context(|| format!("setting the mode of {}", path.display()))
}

fn has_libpython(lib: &Path) -> bool {
    fs::read_dir(lib).is_ok_and(|listing| {
        listing.flatten().any(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with("libpython") && name.contains(".so")
        })
    })
}

/// Copies what an app can load of `runtime` into `dest`.
fn copy_runtime(runtime: &Runtime, dest: &Path) -> Result<(), BuildError> {
    let parent = dest.parent().unwrap_or(dest);
    fs::create_dir_all(parent).context(|| format!("creating {}", parent.display()))?;
    fs::create_dir(dest).context(|| format!("creating {}", dest.display()))?;
    let bin = dest.join("bin");
    fs::create_dir(&bin).context(|| format!("creating {}", bin.display()))?;
    let lib = dest.join("lib");
    fs::create_dir(&lib).context(|| format!("creating {}", lib.display()))?;
    let version = runtime.version.to_string();
    let mut numbers = version.split('.');
    let major_minor = format!(
        "{}.{}",
        numbers.next().unwrap_or("3"),
        numbers.next().unwrap_or("0")
    );
    let link = |target: &str, name: &str| {
        std::os::unix::fs::symlink(target, bin.join(name))
            .context(|| format!("linking {name} in {}", bin.display()))
    };
    match runtime.kind {
        RuntimeKind::Python => {
            let exe = format!("python{major_minor}");
            copy_file(&runtime.executable, &bin.join(&exe))?;
            link(&exe, "python3")?;
            link(&exe, "python")?;
            let stdlib = format!("python{major_minor}");
            let source = runtime.prefix.join("lib").join(&stdlib);
            let has_tk = fs::read_dir(source.join("lib-dynload")).is_ok_and(|l| {
                l.flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with("_tkinter"))
            });
            let skip = |rel: &Path| skip_stdlib(rel, has_tk);
            fsutil::copy_tree(
                &source,
                &lib.join(&stdlib),
                &skip,
                fsutil::AbsoluteLinks::Follow,
            )?;
            for entry in fs::read_dir(runtime.prefix.join("lib"))
                .context(|| format!("listing {}", runtime.prefix.display()))?
                .flatten()
            {
                let name = entry.file_name();
                let text = name.to_string_lossy();
                let ours =
                    text.starts_with(&format!("libpython{major_minor}")) || text == "libpython3.so";
                if ours && text.contains(".so") {
                    copy_file(&entry.path(), &lib.join(&name))?;
                }
            }
        }
        RuntimeKind::Node => {
            copy_file(&runtime.executable, &bin.join("node"))?;
            let npm = runtime.prefix.join("lib/node_modules/npm");
            if !npm.join("bin/npm-cli.js").is_file() {
                return Err(BuildError::RuntimeNotRelocatable {
                    runtime: runtime.describe(),
                    source_path: runtime.prefix.clone(),
                    reason: format!("there is no npm at {}", npm.display()),
                });
            }
            let modules = lib.join("node_modules");
            fs::create_dir(&modules).context(|| format!("creating {}", modules.display()))?;
            fsutil::copy_tree(
                &npm,
                &modules.join("npm"),
                &|_| false,
                fsutil::AbsoluteLinks::Follow,
            )?;
            link("../lib/node_modules/npm/bin/npm-cli.js", "npm")?;
            link("../lib/node_modules/npm/bin/npx-cli.js", "npx")?;
        }
    }
    Ok(())
}

/// What of `lib/python3.X/` an app never loads: the test suite, IDLE, Tk when its extension
/// is missing, caches, the static library's build files, and the installation's own
/// site-packages (pip, and whatever the operator installed there; apps bring their own). The
/// installation's `__pycache__` goes too: its bytecode is checked by the source's time, which
/// the copy changes; `compile_stdlib` writes bytecode that stays valid.
fn skip_stdlib(rel: &Path, has_tk: bool) -> bool {
    let first = rel
        .components()
        .next()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = rel
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let top = rel.components().count() == 1;
    name == "__pycache__"
        || (top && (first == "test" || first == "idlelib" || first.starts_with("config-")))
        || (top && !has_tk && (first == "tkinter" || first == "turtledemo"))
        || (first == "site-packages" && !top)
        || (first == "dist-packages" && !top)
        || name.ends_with(".a")
}

fn copy_file(from: &Path, to: &Path) -> Result<(), BuildError> {
    fs::copy(from, to).context(|| format!("copying {} to {}", from.display(), to.display()))?;
    set_mode(to, 0o755)
}

/// Compiles the copied standard library to bytecode checked by the source's hash, so it stays
/// valid in a layer whose files get new times when unpacked: without it every release's first
/// start compiles each module it imports again, which takes seconds (most of a Django app's
/// cold start) and cannot even be cached where the release's files are read-only.
///
/// This is the builder's own step on the operator's interpreter and its standard library, with
/// nothing of an app in it, like installing uv (`tools.rs`): it runs outside the sandbox, with
/// a cleared environment, in isolated mode and with a deadline. It cannot fail the build: a
/// file that does not compile (a test fixture of invalid syntax in a full installation) stays
/// source only and compiles when imported, as it did without this step.
async fn compile_stdlib(
    runtime: &Runtime,
    dir: &Path,
    shared_lib: bool,
    output: &mut (dyn FnMut(&str) + Send),
) {
    let Some(stdlib) = stdlib_dir(dir) else {
        return;
    };
    let host = px_runtime::host::env();
    // Without the builder's ambient capabilities (Maestro's, under maestro.service).
    let mut command =
        tokio::process::Command::from(px_runtime::caps::command(dir.join("bin/python3")));
    command
        .args([
            "-I",
            "-m",
            "compileall",
            "-q",
            "--invalidation-mode",
            "checked-hash",
        ])
        .arg(&stdlib)
        .env_clear()
        .env("PATH", &host.path)
        .envs(host.passed())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    if shared_lib {
        command.env("LD_LIBRARY_PATH", dir.join("lib"));
    }
    let outcome = match tokio::time::timeout(STDLIB_COMPILE_TIMEOUT, command.status()).await {
        Ok(Ok(status)) if status.success() => return,
        Ok(Ok(status)) => format!("compileall {status}"),
        Ok(Err(e)) => format!("compileall could not start: {e}"),
        Err(_) => format!(
            "compileall did not finish within {} s",
            STDLIB_COMPILE_TIMEOUT.as_secs()
        ),
    };
    output(&format!(
        "       some of {}'s standard library is not compiled ({outcome}): it compiles when imported",
        runtime.describe()
    ));
}

/// `lib/python3.X` of a copied Python, if there is one.
fn stdlib_dir(dir: &Path) -> Option<PathBuf> {
    fs::read_dir(dir.join("lib"))
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.is_dir()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("python3."))
        })
}

/// Runs the copied interpreter from its new place, in the sandbox (where the original is not
/// visible), and checks that it is really running from there with its standard library.
async fn check_relocated(
    runtime: &Runtime,
    dir: &Path,
    shared_lib: bool,
    jail: &mut Jail,
) -> Result<(), BuildError> {
    jail.allow_read(dir);
    let mut env = Vec::new();
    if shared_lib {
        env.push((
            "LD_LIBRARY_PATH".to_string(),
            dir.join("lib").into_os_string(),
        ));
    }
    let (program, args, expect): (PathBuf, Vec<&str>, String) = match runtime.kind {
        RuntimeKind::Python => (
            dir.join("bin/python3"),
            vec![
                "-I",
                "-c",
                "import sys, ssl, sqlite3, json, encodings; print(sys.prefix)",
            ],
            dir.display().to_string(),
        ),
        RuntimeKind::Node => (
            dir.join("bin/node"),
            vec!["-e", "console.log(process.version)"],
            format!("v{}", runtime.version),
        ),
    };
    let step = Step {
        label: format!("{} from {}", runtime.describe(), dir.display()),
        program: program.into_os_string(),
        args: args.into_iter().map(Into::into).collect(),
        cwd: dir.to_path_buf(),
        path: vec![dir.join("bin")],
        env,
        watch: &[],
    };
    let finished = jail.run(&step, &mut |_| {}).await?;
    let ok = finished.success && finished.tail.iter().any(|line| line.trim() == expect);
    if ok {
        return Ok(());
    }
    Err(BuildError::RuntimeNotRelocatable {
        runtime: runtime.describe(),
        source_path: runtime.prefix.clone(),
        reason: format!(
            "{}: {}",
            finished.status,
            finished.tail.last().map_or("no output", String::as_str)
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stdlib_copy_leaves_out_what_apps_never_load() {
        for (path, tk, skipped) in [
            ("test", true, true),
            ("test/test_os.py", true, false),
            ("idlelib", true, true),
            ("tkinter", false, true),
            ("tkinter", true, false),
            ("json/__pycache__", true, true),
            ("config-3.12-x86_64-linux-gnu", true, true),
            ("site-packages", true, false),
            ("site-packages/pip", true, true),
            ("json", true, false),
            ("asyncio/tests.py", true, false),
        ] {
            assert_eq!(skip_stdlib(Path::new(path), tk), skipped, "{path}");
        }
    }
}
