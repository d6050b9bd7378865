//! One build from start to end: the build directory, detection, the runtime layer, the
//! stack's installer (or the cached dependencies), Django's collectstatic, the `[build]
//! command`, and the app layer.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use px_proto::build::{LayerKind, RELEASE_DIR_PLACEHOLDER};

use crate::deps::{DepsCache, Inputs, move_tree};
use px_proto::detect::{Detection, NodeApp, NodeInstall, PythonInput, Stack};

use crate::detect::{self, key_files};
use crate::error::IoContext;
use crate::node::Node;
use crate::python::Python;
use crate::runtime_layer::{self, RuntimeLayer};
use crate::runtimes::{self, RuntimeKind};
use crate::sandbox::{Jail, Step};
use crate::{BuildError, BuildRequest, BuilderSettings, Built, BuiltLayer, Sandbox, fsutil, tools};

/// The directories of one build, all under `work_dir/<app>-<build>/`.
struct Dirs {
    root: PathBuf,
    /// The app's source, where every command runs; becomes the app layer.
    app: PathBuf,
    /// `HOME` of the build's commands.
    home: PathBuf,
    /// The packed layers.
    layers: PathBuf,
    /// The dependencies tree as the release holds it, before it moves to the cache.
    deps: PathBuf,
    /// A Node app's `node_modules` before pruning, for its build script on later builds.
    deps_full: PathBuf,
    /// `TMPDIR` without a sandbox (bubblewrap gives each command a private `/tmp`).
    tmp: PathBuf,
}

/// Runs one build. Everything it writes is under `settings.work_dir/<app>-<build>/` (emptied
/// first; the layers' archives stay there for the caller) and `settings.cache_dir`; its
/// output goes line by line to `output`.
pub async fn build(
    req: &BuildRequest<'_>,
    settings: &BuilderSettings,
    output: &mut (dyn FnMut(&str) + Send),
) -> Result<Built, BuildError> {
    let started = Instant::now();
    px_proto::names::check_app_name(req.app).map_err(|reason| BuildError::BadInput {
        file: "the app name".into(),
        reason,
    })?;
    let root = settings.work_dir.join(format!("{}-{}", req.app, req.build));
    let dirs = Dirs {
        app: root.join("app"),
        home: root.join("home"),
        layers: root.join("layers"),
        deps: root.join("deps"),
        deps_full: root.join("deps-full"),
        tmp: root.join("tmp"),
        root,
    };
    fsutil::remove_all(&dirs.root)?;
    fs::create_dir_all(&dirs.root).context(|| format!("creating {}", dirs.root.display()))?;
    for dir in [&dirs.home, &dirs.layers, &dirs.tmp] {
        fs::create_dir(dir).context(|| format!("creating {}", dir.display()))?;
    }
    fs::create_dir_all(dirs.deps.join(".px"))
        .context(|| format!("creating {}", dirs.deps.display()))?;
    fs::create_dir(&dirs.deps_full).context(|| format!("creating {}", dirs.deps_full.display()))?;
    // The app's own `.px/` is the platform's place in a release; it is not copied.
    fsutil::copy_tree(
        req.source_dir,
        &dirs.app,
        &|rel| rel == Path::new(".px"),
        fsutil::AbsoluteLinks::Keep,
    )?;
    let detection = detect::read(&dirs.app, req.manifest)?;
    if matches!(
        detection.stack,
        Stack::Node(NodeApp {
            install: NodeInstall::NpmCi { .. } | NodeInstall::NpmInstall,
            ..
        })
    ) {
        // Installed fresh by npm, never taken from the upload.
        fsutil::remove_all(&dirs.app.join("node_modules"))?;
    }

    // The app's cache, apart from the runtimes: a build may write to its own app's cache only.
    let app_cache = settings.cache_dir.join("apps").join(req.app);
    for dir in ["uv", "npm", "deps"] {
        fs::create_dir_all(app_cache.join(dir))
            .context(|| format!("creating {}", app_cache.display()))?;
    }
    let mut env: Vec<(String, OsString)> = vec![
        ("HOME".into(), dirs.home.clone().into()),
        ("UV_CACHE_DIR".into(), app_cache.join("uv").into()),
        ("npm_config_cache".into(), app_cache.join("npm").into()),
        // Interpreters come from the platform's runtimes, never downloaded by uv.
        ("UV_PYTHON_DOWNLOADS".into(), "never".into()),
        ("UV_NO_PROGRESS".into(), "1".into()),
    ];
    env.extend(tools::ca_env(settings.ca_file.as_deref()));
    if let Some(index) = &settings.python_index {
        env.push(("UV_INDEX_URL".into(), index.into()));
    }
    if let Some(registry) = &settings.npm_registry {
        env.push(("npm_config_registry".into(), registry.into()));
    }
    if settings.sandbox == Sandbox::None {
        env.push(("TMPDIR".into(), dirs.tmp.clone().into()));
    }
    // The installers' caches are writable; the kept dependency trees only readable, so a
    // build cannot change what a later build of the app reuses without installing.
    let mut jail = Jail::new(
        settings.sandbox,
        &settings.limits,
        vec![
            dirs.root.clone(),
            app_cache.join("uv"),
            app_cache.join("npm"),
        ],
        env,
        req.uid,
    )
    .await?;
    jail.lend_read(&app_cache.join("deps"));
    jail.withhold(&dirs.layers);
    if let Some(ca) = &settings.ca_file {
        jail.allow_read(ca);
    }
    jail.probe(&dirs.app).await?;

    let runtime = match runtime_kind(&detection) {
        Some(kind) => {
            let sources = settings.runtimes.clone();
            let found = tokio::task::spawn_blocking(move || runtimes::discover(&sources))
                .await
                .map_err(|e| BuildError::io("discovering runtimes", std::io::Error::other(e)))?;
            let chosen = runtimes::resolve(kind, detection.runtime.as_ref(), &found)?;
            let asked = detection.runtime.as_ref().map_or_else(String::new, |r| {
                format!(" ({} in {})", r.requirement, r.source)
            });
            output(&format!(
                "-----> Runtime: {}{asked}, from {}",
                chosen.describe(),
                chosen.found_in
            ));
            Some(runtime_layer::prepare(chosen, &settings.cache_dir, &mut jail, output).await?)
        }
        None => None,
    };

    let mut built = Built {
        layers: Vec::new(),
        path: Vec::new(),
        env: BTreeMap::new(),
        runtime: runtime.as_ref().map(|r| r.runtime.describe()),
        commands: runtime
            .as_ref()
            .map(RuntimeLayer::commands)
            .unwrap_or_default(),
    };
    if let Some(rt) = &runtime {
        let archive = dirs.layers.join("runtime.layer");
        fsutil::link_or_copy(&rt.archive(), &archive)?;
        built.layers.push(BuiltLayer {
            kind: LayerKind::Runtime,
            key: rt.key.clone(),
            sha256: rt.sha256.clone(),
            size: rt.size,
            archive,
            reused: rt.reused,
        });
        built.env.extend(rt.env(RELEASE_DIR_PLACEHOLDER));
    }
    let app_env: Vec<(String, OsString)> = req
        .manifest
        .env
        .iter()
        .map(|(k, v)| (k.clone(), v.into()))
        .collect();

    let mut ctx = Ctx {
        settings,
        dirs: &dirs,
        app_cache: &app_cache,
        jail: &mut jail,
        detection: &detection,
        app_env: &app_env,
    };
    match (&detection.stack, &runtime) {
        (Stack::Python { input }, Some(rt)) => ctx.python(*input, rt, &mut built, output).await?,
        (Stack::Node(node), Some(rt)) if node.install.npm_command().is_some() => {
            let lockfile = match node.install {
                NodeInstall::NpmCi { lockfile } => Some(lockfile),
                _ => None,
            };
            ctx.node(lockfile, node.build_script, rt, &mut built, output)
                .await?
        }
        // No installer the builder runs (nothing detected, or a yarn or pnpm app whose
        // `[build] command` installs): the command alone, with the runtime when there is one,
        // and everything it makes is the app layer.
        _ => {
            if let Some(command) = &detection.build_command {
                let mut path = Vec::new();
                if let Some(rt) = &runtime {
                    path.push(rt.bin());
                }
                let step =
                    command_step(command, &dirs.app, path, rt_env(runtime.as_ref()), &app_env);
                ctx.run_command(step, output).await?;
            }
            if runtime.is_some() {
                built.path.push(runtime_bin());
            }
        }
    }

    output("-----> Packing the app layer");
    let app_layer = pack(&dirs.app, &dirs.layers.join("app.layer"), "app").await?;
    built.layers.push(BuiltLayer {
        kind: LayerKind::App,
        key: app_layer.0.clone(),
        sha256: app_layer.0,
        size: app_layer.1,
        archive: dirs.layers.join("app.layer"),
        reused: false,
    });
    output(&format!(
        "-----> Built in {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    Ok(built)
}

/// The runtime a detection needs: the stack's, or for a `[build] command` alone, the one
/// `app.toml` names, if it is one the builder provides.
fn runtime_kind(detection: &Detection) -> Option<RuntimeKind> {
    match &detection.stack {
        Stack::Python { .. } => Some(RuntimeKind::Python),
        Stack::Node(_) => Some(RuntimeKind::Node),
        Stack::None => detection
            .runtime
            .as_ref()
            .and_then(|r| RuntimeKind::for_command(&r.requirement.command)),
    }
}

/// The runtime's commands, relative to the release.
fn runtime_bin() -> String {
    format!("{}/bin", runtime_layer::RUNTIME_DIR)
}

/// The runtime's variables at build time, where the release is the build's app directory.
fn rt_env(rt: Option<&RuntimeLayer>) -> Vec<(String, OsString)> {
    let Some(rt) = rt else { return Vec::new() };
    let dir = rt.dir();
    let release = dir
        .parent()
        .and_then(Path::parent)
        .unwrap_or(&dir)
        .display()
        .to_string();
    rt.env(&release)
        .into_iter()
        .map(|(k, v)| (k, v.into()))
        .collect()
}

/// The `[build] command`, run by `/bin/sh -c` in the app directory.
fn command_step(
    command: &str,
    app: &Path,
    path: Vec<PathBuf>,
    mut env: Vec<(String, OsString)>,
    app_env: &[(String, OsString)],
) -> Step {
    env.extend(app_env.iter().cloned());
    Step {
        label: "the [build] command".into(),
        program: "/bin/sh".into(),
        args: vec!["-c".into(), command.into()],
        cwd: app.to_path_buf(),
        path,
        env,
        watch: &[],
    }
}

/// Packs `dir` into `archive` on a blocking thread: (sha256, size).
async fn pack(
    dir: &Path,
    archive: &Path,
    layer: &'static str,
) -> Result<(String, u64), BuildError> {
    let dir = dir.to_path_buf();
    let archive = archive.to_path_buf();
    tokio::task::spawn_blocking(move || -> Result<(String, u64), BuildError> {
        let file =
            fs::File::create(&archive).context(|| format!("creating {}", archive.display()))?;
        let mut out = std::io::BufWriter::new(file);
        let summary = px_bundle::pack_layer(&dir, &mut out)
            .map_err(|source| BuildError::Pack { layer, source })?;
        use std::io::Write;
        out.flush()
            .context(|| format!("writing {}", archive.display()))?;
        Ok((summary.sha256, summary.size))
    })
    .await
    .map_err(|e| BuildError::io("packing a layer", std::io::Error::other(e)))?
}

/// What the stack-specific parts share.
struct Ctx<'a> {
    settings: &'a BuilderSettings,
    dirs: &'a Dirs,
    app_cache: &'a Path,
    jail: &'a mut Jail,
    detection: &'a Detection,
    app_env: &'a [(String, OsString)],
}

impl Ctx<'_> {
    async fn run_command(
        &mut self,
        step: Step,
        output: &mut (dyn FnMut(&str) + Send),
    ) -> Result<(), BuildError> {
        output("-----> Running the [build] command");
        let finished = self.jail.run(&step, output).await?;
        if finished.success {
            Ok(())
        } else {
            Err(BuildError::StepFailed {
                step: step.label,
                status: finished.status.clone(),
                tail: finished.tail_text(),
            })
        }
    }

    /// Says whether the dependencies key is cached, and if not, what changed.
    fn announce(
        &self,
        cache: &DepsCache,
        inputs: &Inputs,
        hit: bool,
        installer: &str,
        output: &mut (dyn FnMut(&str) + Send),
    ) {
        let key = inputs.key();
        if hit {
            output(&format!(
                "-----> Dependencies unchanged (key {}): reusing the cached layer, {installer} not run",
                &key[..12]
            ));
            return;
        }
        match cache.last_inputs() {
            Some(last) => {
                let changed = inputs.changed_since(&last);
                output(&format!(
                    "-----> Installing dependencies with {installer}: {} changed since the last build",
                    changed.join(", ")
                ));
            }
            None => output(&format!(
                "-----> Installing dependencies with {installer} (no earlier build to reuse)"
            )),
        }
    }

    async fn python(
        &mut self,
        input: PythonInput,
        rt: &RuntimeLayer,
        built: &mut Built,
        output: &mut (dyn FnMut(&str) + Send),
    ) -> Result<(), BuildError> {
        let settings = self.settings;
        let uv = tools::ensure_uv(
            &settings.tools_dir,
            &rt.runtime.executable,
            settings.python_index.as_deref(),
            settings.ca_file.as_deref(),
        )
        .await?;
        if let Some(tool_dir) = uv.parent().and_then(Path::parent) {
            self.jail.allow_read(tool_dir);
        }
        let python = Python {
            app_dir: &self.dirs.app,
            build_dir: &self.dirs.root,
            uv: &uv,
            runtime: rt,
        };
        let installer = format!("uv {}", tools::UV_VERSION);
        let inputs = Inputs::read(
            &self.dirs.app,
            key_files(input),
            &[
                ("runtime", rt.sha256.clone()),
                ("installer", installer.clone()),
                (
                    "settings",
                    format!(
                        "index={}; bytecode={}",
                        settings.python_index.as_deref().unwrap_or("default"),
                        crate::python::BYTECODE_INVALIDATION,
                    ),
                ),
            ],
        )?;
        let key = inputs.key();
        let cache = DepsCache::new(self.app_cache);
        let found = cache.lookup(&key);
        self.announce(&cache, &inputs, found.is_some(), &installer, output);
        let archive = self.dirs.layers.join("dependencies.layer");
        let reused = found.is_some();
        let cached = match found {
            Some(cached) => cached,
            None => {
                let prefix = self.dirs.deps.join(".px/deps");
                python.install(self.jail, input, &prefix, output).await?;
                let (sha256, size) = pack(&self.dirs.deps, &archive, "dependencies").await?;
                cache.store(&key, &self.dirs.deps, None, &archive, &sha256, size)?
            }
        };
        cache.set_last(&inputs)?;
        if reused {
            fsutil::link_or_copy(&cached.archive, &archive)?;
        }
        let userbase = cached.tree.join(".px/deps");
        if self.detection.collectstatic {
            output("-----> python manage.py collectstatic --noinput");
            python
                .collectstatic(self.jail, &userbase, self.app_env, output)
                .await?;
        }
        if let Some(command) = &self.detection.build_command {
            let step = python.app_step(
                "the [build] command",
                "/bin/sh",
                &["-c", command],
                &userbase,
                self.app_env,
            );
            self.run_command(step, output).await?;
        }
        built.layers.push(BuiltLayer {
            kind: LayerKind::Dependencies,
            key,
            sha256: cached.sha256,
            size: cached.size,
            archive,
            reused,
        });
        built.path = vec![".px/deps/bin".into(), runtime_bin()];
        built.env.insert(
            "PYTHONUSERBASE".into(),
            format!("{RELEASE_DIR_PLACEHOLDER}/.px/deps"),
        );
        Ok(())
    }

    async fn node(
        &mut self,
        lockfile: Option<&'static str>,
        build_script: bool,
        rt: &RuntimeLayer,
        built: &mut Built,
        output: &mut (dyn FnMut(&str) + Send),
    ) -> Result<(), BuildError> {
        let settings = self.settings;
        let node = Node {
            app_dir: &self.dirs.app,
            runtime: rt,
            app_env: self.app_env,
        };
        let npm_version = npm_version(rt);
        let installer = format!("npm {npm_version}");
        let mut files = vec!["package.json"];
        files.extend(lockfile);
        let inputs = Inputs::read(
            &self.dirs.app,
            &files,
            &[
                ("runtime", rt.sha256.clone()),
                ("installer", installer.clone()),
                (
                    "settings",
                    format!(
                        "registry={}; build_script={build_script}",
                        settings.npm_registry.as_deref().unwrap_or("default")
                    ),
                ),
            ],
        )?;
        let key = inputs.key();
        let cache = DepsCache::new(self.app_cache);
        let found = cache.lookup(&key);
        self.announce(&cache, &inputs, found.is_some(), &installer, output);
        let archive = self.dirs.layers.join("dependencies.layer");
        let modules = self.dirs.app.join("node_modules");
        let command = self.detection.build_command.clone();
        let mut path = vec![rt.bin(), modules.join(".bin")];
        path.dedup();
        let reused = found.is_some();
        let cached = match found {
            Some(cached) => {
                fsutil::link_or_copy(&cached.archive, &archive)?;
                if build_script || command.is_some() {
                    // The build steps need the dependencies (dev ones too, for a build script),
                    // but not the installer: a copy of the cached tree.
                    let source = match &cached.full {
                        Some(full) => full.join("node_modules"),
                        None => cached.tree.join("node_modules"),
                    };
                    fsutil::copy_tree(&source, &modules, &|_| false, fsutil::AbsoluteLinks::Keep)?;
                    self.jail.hand_over(&modules)?;
                    self.node_build_steps(&node, build_script, command.as_deref(), &path, output)
                        .await?;
                }
                cached
            }
            None => {
                node.install(self.jail, lockfile, output).await?;
                let mut full = None;
                if build_script {
                    fsutil::copy_tree(
                        &modules,
                        &self.dirs.deps_full.join("node_modules"),
                        &|_| false,
                        fsutil::AbsoluteLinks::Keep,
                    )?;
                    full = Some(self.dirs.deps_full.as_path());
                }
                self.node_build_steps(&node, build_script, command.as_deref(), &path, output)
                    .await?;
                if build_script {
                    output("-----> npm prune --omit=dev");
                    node.prune(self.jail, output).await?;
                }
                if modules.is_dir() {
                    move_tree(&modules, &self.dirs.deps.join("node_modules"))?;
                } else {
                    fs::create_dir(self.dirs.deps.join("node_modules"))
                        .context(|| "creating node_modules".into())?;
                }
                fsutil::remove_all(&self.dirs.deps.join(".px"))?;
                let (sha256, size) = pack(&self.dirs.deps, &archive, "dependencies").await?;
                cache.store(&key, &self.dirs.deps, full, &archive, &sha256, size)?
            }
        };
        cache.set_last(&inputs)?;
        // The app layer holds no dependencies: they are their own layer.
        fsutil::remove_all(&modules)?;
        built.layers.push(BuiltLayer {
            kind: LayerKind::Dependencies,
            key,
            sha256: cached.sha256,
            size: cached.size,
            archive,
            reused,
        });
        built.path = vec![runtime_bin(), "node_modules/.bin".into()];
        Ok(())
    }

    /// A Node app's build steps once its dependencies are in `node_modules` (dev ones too):
    /// `npm run build` when `package.json` has a build script, then the `[build] command`.
    async fn node_build_steps(
        &mut self,
        node: &Node<'_>,
        build_script: bool,
        command: Option<&str>,
        path: &[PathBuf],
        output: &mut (dyn FnMut(&str) + Send),
    ) -> Result<(), BuildError> {
        if build_script {
            output("-----> npm run build");
            node.run_build(self.jail, output).await?;
        }
        if let Some(command) = command {
            let step = command_step(
                command,
                &self.dirs.app,
                path.to_vec(),
                Vec::new(),
                self.app_env,
            );
            self.run_command(step, output).await?;
        }
        Ok(())
    }
}

/// The version of the npm inside the runtime layer, read from its `package.json`.
fn npm_version(rt: &RuntimeLayer) -> String {
    let file = rt.dir().join("lib/node_modules/npm/package.json");
    fs::read(&file)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        .and_then(|json| json["version"].as_str().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}
