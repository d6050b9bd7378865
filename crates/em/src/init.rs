//! `em init`: a new app directory from a template. The templates are the apps in `examples/`,
//! embedded at compile time, so what `em init` writes is exactly what the examples deploy.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use px_proto::manifest::{AppManifest, MANIFEST_FILE};
use px_proto::names::{MAX_APP_NAME_LEN, check_app_name};

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

/// Creates the app in `dir`; returns the app's name.
pub fn init(dir: &Path, name: Option<&str>, template: Template) -> Result<String> {
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
    Ok(name)
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
