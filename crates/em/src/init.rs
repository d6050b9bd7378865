//! `em init`: a new app directory from a template, or an `app.toml` for an app that is already
//! there (`existing`). The templates are the apps in `examples/`, embedded at compile time, so
//! what `em init` writes is exactly what the examples deploy.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use px_proto::detect::{Detection, Stack, detect};
use px_proto::manifest::APPRUNNER_FILE;
use px_proto::manifest::{AppManifest, MANIFEST_FILE};
use px_proto::names::{MAX_APP_NAME_LEN, check_app_name};
use px_proto::procfile::PROCFILE;

use crate::cli::Template;
use crate::failure::{Failure, Result};

/// One file of a template: its path inside the app, '/'-separated, and its content.
type TemplateFile = (&'static str, &'static str);

macro_rules! example {
    ($dir:literal: $($file:literal),+ $(,)?) => {
        &[$(($file, include_str!(concat!("../../../examples/", $dir, "/", $file)))),+]
    };
}

const PYTHON_FILES: &[TemplateFile] = example!("python-hello":
    "app.toml", "server.py", "public/style.css", ".emignore", "README.md",
);
const NODE_FILES: &[TemplateFile] = example!("node-chat":
    "app.toml", "server.js", "public/style.css", ".emignore", "README.md",
);
const STATIC_FILES: &[TemplateFile] = example!("static-site":
    "app.toml", "public/index.html", "public/about.html", "public/style.css", ".emignore",
    "README.md",
);

/// Where a template comes from: the example's name (its directory and its `name` in
/// app.toml) and its files.
struct Source {
    example: &'static str,
    files: &'static [TemplateFile],
}

fn source(template: Template) -> Source {
    match template {
        Template::Python => Source {
            example: "python-hello",
            files: PYTHON_FILES,
        },
        Template::Node => Source {
            example: "node-chat",
            files: NODE_FILES,
        },
        Template::Static => Source {
            example: "static-site",
            files: STATIC_FILES,
        },
    }
}

/// What `em init` did.
#[derive(Debug)]
pub enum Created {
    /// A new app from a template, in a new or empty directory.
    Template { name: String },
    /// An `app.toml` for the app the directory already held; `lines` say what was found.
    Existing { name: String, lines: Vec<String> },
}

/// Creates the app in `dir`: from `template` (default: python) when `dir` is new or empty,
/// or, when it already holds an app, an `app.toml` for that app.
pub fn init(dir: &Path, name: Option<&str>, template: Option<Template>) -> Result<Created> {
    if holds_files(dir)? {
        if template.is_some() {
            return Err(Failure::bad_app(format!(
                "{} is not empty; --template writes a new app into an empty directory, while `em init` without it writes an app.toml for the app already there",
                dir.display()
            )));
        }
        return init_existing(dir, name);
    }
    let template = template.unwrap_or(Template::Python);
    let exists = check_dir(dir)?;
    let name = match name {
        Some(name) => name.to_string(),
        None => name_from_dir(dir, exists)?,
    };
    check_name(&name)?;
    let source = source(template);
    // Everything is prepared before the first byte is written, so a bad template leaves
    // nothing behind.
    let files = source
        .files
        .iter()
        .map(|(path, text)| Ok((*path, render(&source, path, text, &name)?)))
        .collect::<Result<Vec<_>>>()?;

    if !exists {
        std::fs::create_dir_all(dir).map_err(|e| {
            Failure::failed(format!(
                "cannot create {}: {e}; check the parent directory exists and is writable",
                dir.display()
            ))
        })?;
    }
    if let Err(failure) = write_files(dir, &files) {
        // Leave the directory as it was: remove what we wrote (and the directory if we made it).
        if exists {
            for (path, _) in &files {
                let _ = std::fs::remove_file(dir.join(path));
            }
            let _ = std::fs::remove_dir(dir.join("public"));
        } else {
            let _ = std::fs::remove_dir_all(dir);
        }
        return Err(failure);
    }
    Ok(Created::Template { name })
}

/// Whether `dir` is a directory with something in it: then `em init` is about the app that
/// is there, not a template.
fn holds_files(dir: &Path) -> Result<bool> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => Ok(entries.next().is_some()),
        // Absent, a file, or unreadable: the template path says which, as before.
        Err(_) => Ok(false),
    }
}

/// How the `app.toml` written for an existing app starts it.
enum RunChoice {
    /// The Procfile's `web:` line, which the bundle turns into `run`.
    Procfile(String),
    /// The executable `apprunner` at the root.
    AppRunner,
    /// `npm start`, which runs `scripts.start`.
    NpmStart(String),
    /// Nothing `em init` can justify: a commented placeholder, and `em init` fails.
    Unknown,
}

/// Writes an `app.toml` for the app in `dir`, saying what detection found, and changes
/// nothing else. It refuses when `app.toml` exists, when detection refuses a file, and when
/// nothing in `dir` says what the app is; when it cannot tell how the app starts, it writes
/// the file with a commented `run` and fails, so `em init && em deploy` stops here.
fn init_existing(dir: &Path, name: Option<&str>) -> Result<Created> {
    let manifest_path = dir.join(MANIFEST_FILE);
    if std::fs::symlink_metadata(&manifest_path).is_ok() {
        return Err(Failure::bad_app(format!(
            "{} already exists; edit it, or remove it and run `em init` again",
            manifest_path.display()
        )));
    }
    let files = px_bundle::root_files(dir).map_err(|e| {
        let message = format!("cannot read the app in {}: {e}", dir.display());
        if e.is_client_error() {
            Failure::bad_app(message)
        } else {
            Failure::failed(message)
        }
    })?;
    let detection = detect(None, &files).map_err(|e| {
        Failure::bad_app(format!(
            "{} holds an app em cannot build as it is: {e}; nothing was written",
            dir.display()
        ))
    })?;
    let apprunner = std::fs::symlink_metadata(dir.join(APPRUNNER_FILE)).is_ok_and(|m| {
        use std::os::unix::fs::PermissionsExt;
        m.is_file() && m.permissions().mode() & 0o111 != 0
    });
    if !detection.recognised() && !apprunner {
        return Err(Failure::bad_app(format!(
            "{} is not empty, and holds no app em recognises (no {PROCFILE}, requirements.txt, pyproject.toml, Pipfile.lock, package.json, .python-version or runtime.txt at its root, and no executable {APPRUNNER_FILE}); run em init in an empty one for a new app, or write app.toml by hand",
            dir.display()
        )));
    }
    let name = match name {
        Some(name) => name.to_string(),
        None => name_from_dir(dir, true)?,
    };
    check_name(&name)?;
    let run = run_choice(&detection, apprunner);
    let text = existing_manifest(&name, &detection, &run);
    // What is written must parse; a failure here is em's own bug, caught before writing.
    AppManifest::parse(&text).map_err(|e| {
        Failure::failed(format!(
            "em wrote an app.toml that does not parse ({e}); this is a bug in em, please report it"
        ))
    })?;
    write_new(&manifest_path, &text)?;
    if let RunChoice::Unknown = run {
        return Err(Failure::bad_app(format!(
            "wrote {} for app {name}, but cannot tell how the app starts: set `run` in it (the command that starts one instance listening on $PORT), or add a Procfile with a `web:` line, then run `em deploy`",
            manifest_path.display()
        )));
    }
    Ok(Created::Existing {
        name,
        lines: detection.lines,
    })
}

/// How the app starts, from what detection can justify; never a guess.
fn run_choice(detection: &Detection, apprunner: bool) -> RunChoice {
    if let Some(web) = detection.procfile.as_ref().and_then(|p| p.web()) {
        return RunChoice::Procfile(web.to_string());
    }
    if apprunner {
        return RunChoice::AppRunner;
    }
    match &detection.stack {
        Stack::Node(node) => match &node.start_script {
            Some(start) => RunChoice::NpmStart(start.clone()),
            None => RunChoice::Unknown,
        },
        _ => RunChoice::Unknown,
    }
}

/// The text of the `app.toml` for an existing app: what was found as comments, the name, and
/// `run` only when `run_choice` could justify one.
fn existing_manifest(name: &str, detection: &Detection, run: &RunChoice) -> String {
    let mut text =
        String::from("# app.toml, written by `em init` for the app in this directory. It found:\n");
    for line in &detection.lines {
        text.push_str(&format!("#   {}\n", comment_safe(line)));
    }
    text.push_str(
        "# Those files decide the build at every deploy; this file adds what they cannot say.\n# Every field: docs/src/reference/manifest.md\n",
    );
    text.push_str(&format!("name = \"{name}\"\n"));
    match run {
        RunChoice::Procfile(web) => text.push_str(&format!(
            "# run: the Procfile's `web:` line starts the app ({}).\n",
            comment_safe(web)
        )),
        RunChoice::AppRunner => {
            text.push_str("# run: the executable `apprunner` starts the app.\n");
        }
        RunChoice::NpmStart(start) => text.push_str(&format!(
            "# run: `npm start` runs package.json's scripts.start ({}).\nrun = \"npm start\"\n",
            comment_safe(start)
        )),
        RunChoice::Unknown => text.push_str(
            "# run: em init cannot tell how this app starts. Set the command that starts one\n# instance listening on $PORT, or add a Procfile with a `web:` line, e.g.:\n# run = \"<command>\"\n",
        ),
    }
    text
}

/// A detection line as one comment line: a newline or other control character in it (from
/// a hostile `package.json`, say) is shown escaped, so it cannot end the comment.
fn comment_safe(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Checks `dir` is absent or an empty directory; returns whether it exists.
fn check_dir(dir: &Path) -> Result<bool> {
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => {
            let mut entries = std::fs::read_dir(dir)
                .map_err(|e| Failure::failed(format!("cannot read {}: {e}", dir.display())))?;
            if entries.next().is_some() {
                return Err(Failure::bad_app(format!(
                    "{} is not empty; choose a new directory or run em init in an empty one",
                    dir.display()
                )));
            }
            Ok(true)
        }
        Ok(_) => Err(Failure::bad_app(format!(
            "{} is a file, not a directory; choose a new directory or run em init in an empty one",
            dir.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Failure::failed(format!(
            "cannot read {}: {e}",
            dir.display()
        ))),
    }
}

/// The default app name: the directory's own name (of its real path, so `.` works).
fn name_from_dir(dir: &Path, exists: bool) -> Result<String> {
    let real: PathBuf = if exists {
        dir.canonicalize()
            .map_err(|e| Failure::failed(format!("cannot resolve {}: {e}", dir.display())))?
    } else {
        dir.to_path_buf()
    };
    real.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
        .ok_or_else(|| {
            Failure::bad_app(format!(
                "cannot tell an app name from {}; pass one with --name, e.g. --name hello",
                dir.display()
            ))
        })
}

fn check_name(name: &str) -> Result<()> {
    check_app_name(name).map_err(|rule| {
        Failure::bad_app(format!(
            "app name {rule}; use --name {}",
            suggest_name(name)
        ))
    })
}

/// A valid app name close to `name`: lowercase, with every run of other characters turned
/// into one '-'.
pub(crate) fn suggest_name(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
    }
    out.truncate(MAX_APP_NAME_LEN);
    let out = out.trim_end_matches('-').to_string();
    if check_app_name(&out).is_ok() {
        out
    } else {
        "my-app".to_string()
    }
}

/// A template file as written for the app `name`: app.toml gets the name (and must still
/// parse), the README names the app.
fn render(source: &Source, path: &str, text: &str, name: &str) -> Result<String> {
    match path {
        MANIFEST_FILE => {
            let example_line = format!("name = \"{}\"", source.example);
            if text.lines().filter(|l| *l == example_line).count() != 1 {
                return Err(template_bug(
                    source,
                    format!("it has no single line {example_line}"),
                ));
            }
            // The name passed check_app_name: a DNS label needs no TOML escaping.
            let rendered = text
                .lines()
                .map(|line| {
                    if line == example_line {
                        format!("name = \"{name}\"")
                    } else {
                        line.to_string()
                    }
                })
                .collect::<Vec<_>>()
                .join("\n")
                + "\n";
            let manifest =
                AppManifest::parse(&rendered).map_err(|e| template_bug(source, e.to_string()))?;
            if manifest.name != name {
                return Err(template_bug(source, "the name did not change".to_string()));
            }
            Ok(rendered)
        }
        "README.md" => Ok(text.replace(source.example, name)),
        _ => Ok(text.to_string()),
    }
}

fn template_bug(source: &Source, problem: String) -> Failure {
    Failure::failed(format!(
        "the {} template's app.toml is broken ({problem}); this is a bug in em, please report it",
        source.example
    ))
}

fn write_files(dir: &Path, files: &[(&str, String)]) -> Result<()> {
    for (path, text) in files {
        let target = dir.join(path);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|e| cannot_write(&target, &e))?;
        }
        // create_new: never overwrite something that appeared since the emptiness check.
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&target)
            .map_err(|e| cannot_write(&target, &e))?;
        file.write_all(text.as_bytes())
            .map_err(|e| cannot_write(&target, &e))?;
    }
    Ok(())
}

/// Creates `path` with `text`, never over an existing file; a file it created but could not
/// write whole is removed, so a failure leaves the directory as it was.
fn write_new(path: &Path, text: &str) -> Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| cannot_write(path, &e))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| {
            let _ = std::fs::remove_file(path);
            cannot_write(path, &e)
        })
}

fn cannot_write(path: &Path, e: &std::io::Error) -> Failure {
    Failure::failed(format!(
        "cannot write {}: {e}; check the directory is writable and has space",
        path.display()
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn suggestions_are_valid_names() {
        for (bad, good) in [
            ("Bad_Name", "bad-name"),
            ("My App!", "my-app"),
            ("--x--", "x"),
            ("a__b", "a-b"),
            ("___", "my-app"),
            ("", "my-app"),
            ("Émile", "mile"),
        ] {
            assert_eq!(suggest_name(bad), good, "{bad}");
        }
        let long = "a_".repeat(100);
        let suggested = suggest_name(&long);
        assert!(check_app_name(&suggested).is_ok(), "{suggested}");
    }

    #[test]
    fn every_template_renders_a_valid_manifest() {
        for template in [Template::Python, Template::Node, Template::Static] {
            let source = source(template);
            let (_, text) = source
                .files
                .iter()
                .find(|(p, _)| *p == MANIFEST_FILE)
                .unwrap();
            let rendered = render(&source, MANIFEST_FILE, text, "renamed-app").unwrap();
            let manifest = AppManifest::parse(&rendered).unwrap();
            assert_eq!(manifest.name, "renamed-app");
            let original = AppManifest::parse(text).unwrap();
            assert_eq!(original.name, source.example);
            assert_eq!(
                AppManifest {
                    name: source.example.to_string(),
                    ..manifest
                },
                original
            );
        }
    }

    #[test]
    fn a_hostile_detection_line_cannot_leave_its_comment() {
        // A start script with a newline and TOML after it: shown escaped in the comment, so
        // the app.toml still names the app it was written for and runs `npm start`.
        let package = r#"{"scripts": {"start": "node a.js\nname = \"evil\"\nrun = \"rm -rf /\""}}"#;
        let files = px_proto::detect::RootFiles::new().with("package.json", package);
        let detection = detect(None, &files).unwrap();
        let run = run_choice(&detection, false);
        let text = existing_manifest("mine", &detection, &run);
        let manifest = AppManifest::parse(&text).unwrap();
        assert_eq!(manifest.name, "mine");
        assert_eq!(manifest.run.as_deref(), Some("npm start"));
        assert!(text.contains("node a.js\\nname"), "{text}");
        assert_eq!(comment_safe("a\tb\r"), "a\\tb\\r");
    }

    #[test]
    fn the_run_command_is_never_guessed() {
        let detect_files = |list: &[(&str, &str)]| {
            let files = list
                .iter()
                .fold(px_proto::detect::RootFiles::new(), |files, (name, text)| {
                    files.with(name, text)
                });
            detect(None, &files).unwrap()
        };
        let django = detect_files(&[("requirements.txt", "django\n"), ("manage.py", "")]);
        assert!(matches!(run_choice(&django, false), RunChoice::Unknown));
        assert!(matches!(run_choice(&django, true), RunChoice::AppRunner));
        let no_start = detect_files(&[("package.json", "{}")]);
        assert!(matches!(run_choice(&no_start, false), RunChoice::Unknown));
        let procfile = detect_files(&[("Procfile", "web: serve\n"), ("package.json", "{}")]);
        assert!(matches!(run_choice(&procfile, true), RunChoice::Procfile(w) if w == "serve"));
    }

    #[test]
    fn every_file_starts_with_a_line_saying_what_it_is() {
        for template in [Template::Python, Template::Node, Template::Static] {
            for (path, text) in source(template).files {
                let first = text.lines().next().unwrap_or("");
                assert!(
                    ["#", "//", "/*", "<!--"]
                        .iter()
                        .any(|p| first.starts_with(p)),
                    "{path}: {first}"
                );
            }
        }
    }
}
