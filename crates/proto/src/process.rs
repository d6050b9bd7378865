//! Process types (docs/src/design/processes.md): the `[processes.<type>]` tables of `app.toml`
//! (`ProcessSettings`), their bounds, their validation, and which types run as processes beside
//! the web instances.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use std::collections::BTreeMap;

use crate::manifest::{AppManifest, ManifestError, ResourceLimits};
use crate::procfile::{MAX_PROCESS_NAME_LEN, MAX_PROCESS_TYPES, Procfile, WEB_PROCESS};

/// Name of the release phase's entry: a `release:` Procfile line or `[processes.release]`. It
/// is no process type: it runs once per release, before the release goes live.
pub const RELEASE_PHASE: &str = "release";
/// Most web instances of one app on one web server (the `web` count of a formation).
pub const MAX_WEB_PER_NODE: u32 = crate::manifest::MAX_INSTANCES;
/// Most processes of one non-web type across the cluster. A hundred workers of one type is a
/// large fleet already; more belongs in a second app, and the bound keeps a typo in `em scale`
/// from starting thousands of processes.
pub const MAX_PROCESSES_PER_TYPE: u32 = 100;
/// Bounds of `stop_grace`: a second is the least a process needs to hear SIGTERM and exit; a
/// day is the longest job a worker may finish before it is killed (longer jobs must be
/// resumable anyway, since a node can be lost at any time).
pub const MIN_STOP_GRACE: Duration = Duration::from_secs(1);
pub const MAX_STOP_GRACE: Duration = Duration::from_secs(24 * 3600);
/// Default and longest release phase (`[processes.release] timeout`): a migration longer than
/// an hour is an operation to run by hand, not a deploy step.
pub const DEFAULT_RELEASE_TIMEOUT: Duration = Duration::from_secs(600);
pub const MAX_RELEASE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Longest process command: the same bound as a Procfile line, one shell line.
pub const MAX_PROCESS_COMMAND_BYTES: usize = crate::procfile::MAX_PROCFILE_LINE_BYTES;

/// Whether processes of type `name` run beside the web instances: every type except `web`
/// (the instances themselves) and `release` (the release phase).
pub fn runs_as_process(name: &str) -> bool {
    name != WEB_PROCESS && name != RELEASE_PHASE
}

/// Which of a new process's two generations runs first when a release replaces it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplaceOrder {
    /// Start the new processes, then stop the old ones: no gap in the work.
    #[default]
    StartFirst,
    /// Stop the old processes, and start the new ones once they are gone: never two at once
    /// (a clock, or a consumer that must be alone).
    StopFirst,
}

impl ReplaceOrder {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// One `[processes.<type>]` table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessSettings {
    /// The shell command that starts one process; without it, the Procfile's line of the type.
    /// For `web`, `run` is the command and this must be absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// How long a process has after SIGTERM before SIGKILL; without it, the node's own
    /// `stop_grace`.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub stop_grace: Option<Duration>,
    /// Whether a new release starts its processes before or after the old ones stop.
    #[serde(default, skip_serializing_if = "ReplaceOrder::is_default")]
    pub replace: ReplaceOrder,
    /// Whether the process gets a `PORT` (nothing is proxied to it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub port: bool,
    /// What each process of the type may use; unset fields take the app's `[limits]`.
    #[serde(default, skip_serializing_if = "ResourceLimits::is_unlimited")]
    pub limits: ResourceLimits,
    /// For `release` only: how long the release phase may run.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
}

impl ProcessSettings {
    /// The limits of one process of the type: its own where set, the app's otherwise.
    pub fn limits_over(&self, app: &ResourceLimits) -> ResourceLimits {
        ResourceLimits {
            memory: self.limits.memory.or(app.memory),
            cpu_weight: self.limits.cpu_weight.or(app.cpu_weight),
            processes: self.limits.processes.or(app.processes),
            open_files: self.limits.open_files.or(app.open_files),
        }
    }

    /// The release phase's time limit.
    pub fn release_timeout(&self) -> Duration {
        self.timeout.unwrap_or(DEFAULT_RELEASE_TIMEOUT)
    }

    /// Checks the table of type `name`; errors name the field (`processes.worker.stop_grace`).
    pub fn validate(&self, name: &str) -> Result<(), ManifestError> {
        let field = |f: &str| format!("processes.{name}.{f}");
        if let Some(command) = &self.command {
            if name == WEB_PROCESS {
                return Err(ManifestError::field(
                    field("command"),
                    "the web command is `run` at the top level (or the Procfile's `web:` line); remove it here",
                ));
            }
            if command.trim().is_empty() {
                return Err(ManifestError::field(
                    field("command"),
                    "is empty; give the shell command that starts the process, or remove it to use the Procfile's line",
                ));
            }
            if command.len() > MAX_PROCESS_COMMAND_BYTES {
                return Err(ManifestError::field(
                    field("command"),
                    format!(
                        "is longer than {MAX_PROCESS_COMMAND_BYTES} bytes; put the steps in a script in the app and run that"
                    ),
                ));
            }
            if command.contains('\0') {
                return Err(ManifestError::field(
                    field("command"),
                    "contains a NUL character, which no shell command can hold",
                ));
            }
        }
        if let Some(grace) = self.stop_grace
            && !(MIN_STOP_GRACE..=MAX_STOP_GRACE).contains(&grace)
        {
            return Err(ManifestError::field(
                field("stop_grace"),
                format!(
                    "must be from {}s to {}h, e.g. \"30s\" or \"1h\"",
                    MIN_STOP_GRACE.as_secs(),
                    MAX_STOP_GRACE.as_secs() / 3600
                ),
            ));
        }
        if let Some(timeout) = self.timeout {
            if name != RELEASE_PHASE {
                return Err(ManifestError::field(
                    field("timeout"),
                    "only the release phase ([processes.release]) has a timeout; remove it",
                ));
            }
            if timeout < Duration::from_secs(1) || timeout > MAX_RELEASE_TIMEOUT {
                return Err(ManifestError::field(
                    field("timeout"),
                    format!(
                        "must be from 1s to {}s, e.g. \"10m\"",
                        MAX_RELEASE_TIMEOUT.as_secs()
                    ),
                ));
            }
        }
        if self.port && !runs_as_process(name) {
            return Err(ManifestError::field(
                field("port"),
                format!(
                    "only a process type other than web and release takes `port`; remove it from [processes.{name}]"
                ),
            ));
        }
        crate::manifest::validate_limits(&self.limits, &field("limits"))
    }
}

/// Checks a type's name as the Procfile does: 1 to 63 letters, digits, `_` or `-`, since it
/// names the processes, their log lines and `em ps` rows.
pub fn check_process_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > MAX_PROCESS_NAME_LEN
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(format!(
            "{name:?} is no process type name: 1 to {MAX_PROCESS_NAME_LEN} letters, digits, '_' or '-'"
        ));
    }
    Ok(())
}

/// Checks every `[processes.<type>]` table: names, count, each table.
pub fn validate_all<'a>(
    processes: impl ExactSizeIterator<Item = (&'a String, &'a ProcessSettings)>,
) -> Result<(), ManifestError> {
    if processes.len() > MAX_PROCESS_TYPES {
        return Err(ManifestError::field(
            "processes",
            format!("has more than {MAX_PROCESS_TYPES} process types"),
        ));
    }
    for (name, settings) in processes {
        check_process_name(name)
            .map_err(|m| ManifestError::field(format!("processes.{name:?}"), m))?;
        settings.validate(name)?;
    }
    Ok(())
}

/// Resolves the manifest's process types with the Procfile (docs/src/design/processes.md):
/// every Procfile type but `web` gets a table, and a table without `command` takes its type's
/// Procfile line; `app.toml`'s command wins where both have one. A table with no command and
/// no Procfile line is refused naming its type. `procfile` is `None` without a Procfile.
pub fn resolve(
    manifest: &mut AppManifest,
    procfile: Option<&Procfile>,
) -> Result<(), ManifestError> {
    let processes = &mut manifest.processes;
    for line in procfile.map(|p| p.processes.as_slice()).unwrap_or_default() {
        if line.name == WEB_PROCESS {
            continue;
        }
        let settings = processes.entry(line.name.clone()).or_default();
        if settings.command.is_none() {
            settings.command = Some(line.command.clone());
        }
    }
    if processes.len() > MAX_PROCESS_TYPES {
        return Err(ManifestError::field(
            "processes",
            format!(
                "app.toml and the Procfile name more than {MAX_PROCESS_TYPES} process types together"
            ),
        ));
    }
    if let Some((name, _)) = processes
        .iter()
        .find(|(name, s)| name.as_str() != WEB_PROCESS && s.command.is_none())
    {
        return Err(ManifestError::field(
            format!("processes.{name}"),
            format!(
                "has no command and the Procfile has no `{name}:` line; give `command = \"...\"` in [processes.{name}] or add a `{name}: <command>` line to the Procfile"
            ),
        ));
    }
    Ok(())
}

/// The sentences that say where `app.toml` replaces a Procfile line (`worker: app.toml's command
/// replaces the Procfile's line 2`), for `em deploy` and detection's lines, so no override is
/// silent. `manifest` is `app.toml` as written, before [`resolve`].
pub fn overrides(manifest: &AppManifest, procfile: &Procfile) -> Vec<String> {
    procfile
        .processes
        .iter()
        .filter_map(|line| {
            let what = if line.name == WEB_PROCESS {
                manifest.run.as_ref().map(|_| "`run`")
            } else {
                manifest
                    .processes
                    .get(&line.name)
                    .and_then(|s| s.command.as_ref())
                    .map(|_| "command")
            }?;
            Some(format!(
                "{}: app.toml's {what} replaces the Procfile's line {}",
                line.name, line.line
            ))
        })
        .collect()
}

/// The processes of each non-web type a release runs: the types of its resolved manifest, each
/// with its settings (for Beacon's formation and Maestro).
pub fn process_types(manifest: &AppManifest) -> BTreeMap<&str, &ProcessSettings> {
    manifest
        .processes
        .iter()
        .filter(|(name, _)| runs_as_process(name))
        .map(|(name, settings)| (name.as_str(), settings))
        .collect()
}

/// The counts that apply to a release (docs/src/design/processes.md, "Formation"): `web` per
/// web server (the explicit count, else the manifest's `instances`), and every other type the
/// release runs in total across the cluster (the explicit count, else
/// [`DEFAULT_PROCESSES_PER_TYPE`]). Explicit counts of types the release does not have are
/// left out: they apply again if a later release brings the type back.
pub fn formation(
    manifest: &AppManifest,
    explicit: &BTreeMap<String, u32>,
) -> BTreeMap<String, u32> {
    let mut counts = BTreeMap::new();
    counts.insert(
        WEB_PROCESS.to_string(),
        explicit
            .get(WEB_PROCESS)
            .copied()
            .unwrap_or(manifest.instances)
            .min(MAX_WEB_PER_NODE),
    );
    for kind in process_types(manifest).into_keys() {
        let count = explicit
            .get(kind)
            .copied()
            .unwrap_or(DEFAULT_PROCESSES_PER_TYPE)
            .min(MAX_PROCESSES_PER_TYPE);
        counts.insert(kind.to_string(), count);
    }
    counts
}

/// Processes of each non-web type when no formation names it: one across the cluster, so a
/// clock never runs its jobs twice.
pub const DEFAULT_PROCESSES_PER_TYPE: u32 = 1;

/// Checks a change of the formation (`em scale web=2 worker=3`) against the release it
/// applies to; the error is the sentence `em scale` prints.
pub fn check_scale(manifest: &AppManifest, change: &BTreeMap<String, u32>) -> Result<(), String> {
    if change.is_empty() {
        return Err("nothing to scale: give counts such as {\"web\": 2, \"worker\": 3}".into());
    }
    let types = process_types(manifest);
    for (kind, count) in change {
        if kind == WEB_PROCESS {
            if *count == 0 {
                return Err(
                    "web=0 would leave the app's domains answering 502 on every web server; keep at least one web instance, or delete the app to stop it"
                        .into(),
                );
            }
            if *count > MAX_WEB_PER_NODE {
                return Err(format!(
                    "web={count} is more than the limit of {MAX_WEB_PER_NODE} web instances per web server"
                ));
            }
        } else if types.contains_key(kind.as_str()) {
            if *count > MAX_PROCESSES_PER_TYPE {
                return Err(format!(
                    "{kind}={count} is more than the limit of {MAX_PROCESSES_PER_TYPE} processes of one type"
                ));
            }
        } else {
            let mut known = vec![WEB_PROCESS];
            known.extend(types.keys());
            let name: String = kind.chars().take(MAX_PROCESS_NAME_LEN).collect();
            return Err(format!(
                "the current release has no process type {name:?}; its types are {}",
                known.join(", ")
            ));
        }
    }
    Ok(())
}

/// The release phase a release's resolved manifest names: its command and its time limit, or
/// `None` when it has no `release:` line and no `[processes.release] command`.
pub fn release_phase(manifest: &AppManifest) -> Option<(&str, Duration)> {
    let settings = manifest.processes.get(RELEASE_PHASE)?;
    let command = settings.command.as_deref()?;
    Some((command, settings.release_timeout()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::AppManifest;
    use crate::size::ByteSize;

    fn worker_app() -> AppManifest {
        AppManifest::parse(
            "name = \"shop\"\nrun = \"web\"\ninstances = 2\n[processes.worker]\ncommand = \"w\"\n[processes.clock]\ncommand = \"c\"\n",
        )
        .unwrap()
    }

    #[test]
    fn the_formation_takes_explicit_counts_over_the_defaults() {
        let manifest = worker_app();
        let none = BTreeMap::new();
        let defaults: Vec<(String, u32)> = formation(&manifest, &none).into_iter().collect();
        assert_eq!(
            defaults,
            [("clock".into(), 1), ("web".into(), 2), ("worker".into(), 1)]
        );
        let explicit: BTreeMap<String, u32> =
            [("web".into(), 3), ("worker".into(), 5), ("gone".into(), 4)].into();
        let counts = formation(&manifest, &explicit);
        assert_eq!(counts.get("web"), Some(&3));
        assert_eq!(counts.get("worker"), Some(&5));
        assert_eq!(counts.get("clock"), Some(&1));
        // A type the release no longer has takes no part.
        assert_eq!(counts.get("gone"), None);
    }

    #[test]
    fn scale_changes_are_checked_against_the_release() {
        let manifest = worker_app();
        let change = |pairs: &[(&str, u32)]| -> BTreeMap<String, u32> {
            pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
        };
        assert_eq!(
            check_scale(&manifest, &change(&[("web", 3), ("worker", 0)])),
            Ok(())
        );
        let cases = [
            (change(&[]), "nothing to scale"),
            (
                change(&[("nosuch", 1)]),
                "no process type \"nosuch\"; its types are web, clock, worker",
            ),
            (change(&[("release", 1)]), "no process type \"release\""),
            (
                change(&[("worker", 101)]),
                "limit of 100 processes of one type",
            ),
            (
                change(&[("web", 65)]),
                "limit of 64 web instances per web server",
            ),
            (change(&[("web", 0)]), "web=0 would leave"),
        ];
        for (change, expected) in cases {
            let error = check_scale(&manifest, &change).unwrap_err();
            assert!(error.contains(expected), "{change:?}: {error}");
        }
    }

    #[test]
    fn the_design_example_parses_with_its_defaults() {
        let m = AppManifest::parse(
            r#"
name = "mysite"
run = "gunicorn mysite.wsgi"
[processes.worker]
command = "celery -A mysite worker"
stop_grace = "1h"
[processes.worker.limits]
memory = "512MiB"
[processes.clock]
replace = "stop_first"
command = "python clock.py"
[processes.release]
command = "python manage.py migrate"
timeout = "20m"
[processes.web]
stop_grace = "45s"
"#,
        )
        .unwrap();
        let worker = &m.processes["worker"];
        assert_eq!(worker.stop_grace, Some(Duration::from_secs(3600)));
        assert_eq!(worker.replace, ReplaceOrder::StartFirst);
        assert!(!worker.port);
        assert_eq!(worker.limits.memory, Some(ByteSize::mib(512)));
        assert_eq!(m.processes["clock"].replace, ReplaceOrder::StopFirst);
        assert_eq!(m.processes["clock"].stop_grace, None);
        assert_eq!(
            m.processes["release"].release_timeout(),
            Duration::from_secs(1200)
        );
        assert_eq!(
            ProcessSettings::default().release_timeout(),
            DEFAULT_RELEASE_TIMEOUT
        );
        assert_eq!(m.processes["web"].stop_grace, Some(Duration::from_secs(45)));
        let types: Vec<&str> = m
            .processes
            .keys()
            .map(String::as_str)
            .filter(|t| runs_as_process(t))
            .collect();
        assert_eq!(types, ["clock", "worker"]);
        // It travels and comes back the same, through JSON (links, records) and TOML.
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(serde_json::from_str::<AppManifest>(&json).unwrap(), m);
        let text = toml::to_string(&m).unwrap();
        assert_eq!(AppManifest::parse(&text).unwrap(), m);
    }

    #[test]
    fn a_manifest_without_processes_travels_as_before() {
        let m = AppManifest::parse("name = \"x\"").unwrap();
        assert!(m.processes.is_empty());
        assert!(!serde_json::to_string(&m).unwrap().contains("processes"));
    }

    #[test]
    fn per_type_limits_override_the_apps_field_by_field() {
        let app = ResourceLimits {
            memory: Some(ByteSize::mib(256)),
            cpu_weight: Some(50),
            processes: None,
            open_files: Some(1024),
        };
        let worker = ProcessSettings {
            limits: ResourceLimits {
                memory: Some(ByteSize::mib(1024)),
                processes: Some(32),
                ..ResourceLimits::default()
            },
            ..ProcessSettings::default()
        };
        assert_eq!(
            worker.limits_over(&app),
            ResourceLimits {
                memory: Some(ByteSize::mib(1024)),
                cpu_weight: Some(50),
                processes: Some(32),
                open_files: Some(1024),
            }
        );
        assert_eq!(ProcessSettings::default().limits_over(&app), app);
    }

    #[test]
    fn errors_name_the_field() {
        let cases: &[(&str, &str)] = &[
            (
                "[processes.worker]\nstop_grace = \"0s\"",
                "processes.worker.stop_grace",
            ),
            (
                "[processes.worker]\nstop_grace = \"25h\"",
                "processes.worker.stop_grace",
            ),
            (
                "[processes.worker]\nstop_grace = \"soon\"",
                "processes.worker.stop_grace",
            ),
            (
                "[processes.worker]\nreplace = \"sideways\"",
                "processes.worker.replace",
            ),
            (
                "[processes.worker]\ncommand = \" \"",
                "processes.worker.command",
            ),
            (
                "[processes.web]\ncommand = \"gunicorn\"",
                "processes.web.command",
            ),
            (
                "[processes.worker]\ntimeout = \"1m\"",
                "processes.worker.timeout",
            ),
            (
                "[processes.release]\ntimeout = \"2h\"",
                "processes.release.timeout",
            ),
            ("[processes.web]\nport = true", "processes.web.port"),
            (
                "[processes.worker.limits]\nmemory = \"1MiB\"",
                "processes.worker.limits.memory",
            ),
            (
                "[processes.worker.limits]\ncpu_weight = 0",
                "processes.worker.limits.cpu_weight",
            ),
            ("[processes.worker]\nsize = 1", "processes.worker.size"),
            ("[processes.\"a b\"]\nport = true", "processes.\"a b\""),
        ];
        for (table, field) in cases {
            let text = format!("name = \"x\"\n{table}");
            let e = AppManifest::parse(&text).unwrap_err();
            assert_eq!(e.field.as_deref(), Some(*field), "{text}: {e}");
            assert!(e.to_string().contains(field), "{e}");
        }
        let longest = format!(
            "name = \"x\"\n[processes.worker]\ncommand = \"{}\"",
            "x".repeat(MAX_PROCESS_COMMAND_BYTES)
        );
        assert!(AppManifest::parse(&longest).is_ok());
        let longer = format!(
            "name = \"x\"\n[processes.worker]\ncommand = \"{}\"",
            "x".repeat(MAX_PROCESS_COMMAND_BYTES + 1)
        );
        assert!(
            AppManifest::parse(&longer)
                .unwrap_err()
                .message
                .contains("script")
        );
    }

    fn resolved(toml: &str, procfile: Option<&str>) -> Result<AppManifest, ManifestError> {
        let mut m = AppManifest::parse(&format!("name = \"x\"\n{toml}")).unwrap();
        let procfile = procfile.map(|p| Procfile::parse(p.as_bytes()).unwrap());
        resolve(&mut m, procfile.as_ref())?;
        Ok(m)
    }

    #[test]
    fn the_procfile_and_app_toml_resolve_type_by_type() {
        let procfile = "web: serve\nworker: python3 w.py\nclock: python3 c.py\nrelease: migrate\n";
        let m = resolved(
            "run = \"gunicorn\"\n[processes.worker]\ncommand = \"celery worker\"\nstop_grace = \"2m\"\n[processes.mailer]\ncommand = \"python3 mail.py\"\n[processes.clock]\nreplace = \"stop_first\"",
            Some(procfile),
        )
        .unwrap();
        let commands: Vec<(&str, &str)> = m
            .processes
            .iter()
            .map(|(n, s)| (n.as_str(), s.command.as_deref().unwrap()))
            .collect();
        assert_eq!(
            commands,
            [
                ("clock", "python3 c.py"),
                ("mailer", "python3 mail.py"),
                ("release", "migrate"),
                ("worker", "celery worker"),
            ]
        );
        assert_eq!(
            m.processes["worker"].stop_grace,
            Some(Duration::from_secs(120))
        );
        assert_eq!(m.processes["clock"].replace, ReplaceOrder::StopFirst);
        // `release` keeps its command for the release phase but is no process type.
        let types: Vec<&str> = process_types(&m).into_keys().collect();
        assert_eq!(types, ["clock", "mailer", "worker"]);
        // A manifest without a Procfile keeps what it has.
        let m = resolved("[processes.worker]\ncommand = \"w\"", None).unwrap();
        assert_eq!(m.processes.len(), 1);
        let m = resolved("", None).unwrap();
        assert!(m.processes.is_empty());
        // [processes.web] (a grace) is no command and needs none.
        assert!(resolved("[processes.web]\nstop_grace = \"5s\"", None).is_ok());
    }

    #[test]
    fn a_table_without_a_command_anywhere_is_refused_naming_its_type() {
        let e = resolved(
            "[processes.worker]\nstop_grace = \"1m\"",
            Some("web: serve\n"),
        )
        .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("processes.worker"));
        assert!(e.to_string().contains("`worker:`"), "{e}");
        let e = resolved("[processes.clock]\nreplace = \"stop_first\"", None).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("processes.clock"), "{e}");
    }

    #[test]
    fn overrides_are_said_type_by_type() {
        let procfile = Procfile::parse(b"web: serve\nworker: w\nclock: c\n").unwrap();
        let m = AppManifest::parse(
            "name = \"x\"\nrun = \"gunicorn\"\n[processes.worker]\ncommand = \"celery\"\n[processes.clock]\nreplace = \"stop_first\"",
        )
        .unwrap();
        assert_eq!(
            overrides(&m, &procfile),
            [
                "web: app.toml's `run` replaces the Procfile's line 1",
                "worker: app.toml's command replaces the Procfile's line 2",
            ]
        );
        let plain = AppManifest::parse("name = \"x\"").unwrap();
        assert!(overrides(&plain, &procfile).is_empty());
    }

    #[test]
    fn too_many_types_together_are_refused() {
        let mut procfile = String::new();
        let mut toml = String::new();
        for i in 0..MAX_PROCESS_TYPES {
            procfile.push_str(&format!("p{i}: run\n"));
            toml.push_str(&format!("[processes.t{i}]\ncommand = \"run\"\n"));
        }
        let e = resolved(&toml, Some(&procfile)).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("processes"), "{e}");
    }

    #[test]
    fn too_many_types_are_refused() {
        let mut text = String::from("name = \"x\"\n");
        for i in 0..=MAX_PROCESS_TYPES {
            text.push_str(&format!("[processes.w{i}]\nport = true\n"));
        }
        let e = AppManifest::parse(&text).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("processes"), "{e}");
    }
}
