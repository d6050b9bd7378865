//! Detection, row by row: every file of the table in docs/src/design/builds.md, the order of
//! the runtime sources, and every malformed input with the message that names it.

use super::*;

/// Root files as (name, content) pairs.
type Files<'a> = Vec<(&'a str, &'a str)>;
/// A runtime request as text, and where it came from.
type Expected<'a> = Option<(&'a str, RuntimeSource)>;

fn files(list: &[(&str, &str)]) -> RootFiles {
    list.iter().fold(RootFiles::new(), |files, (name, text)| {
        files.with(name, text)
    })
}

fn manifest(extra: &str) -> AppManifest {
    AppManifest::parse(&format!("name = \"x\"\n{extra}")).unwrap()
}

fn ok(manifest: Option<&AppManifest>, list: &[(&str, &str)]) -> Detection {
    detect(manifest, &files(list)).unwrap_or_else(|e| panic!("{list:?}: {e}"))
}

fn err(manifest: Option<&AppManifest>, list: &[(&str, &str)]) -> DetectError {
    match detect(manifest, &files(list)) {
        Ok(d) => panic!("{list:?} was accepted: {d:?}"),
        Err(e) => e,
    }
}

fn runtime_text(d: &Detection) -> Option<(String, RuntimeSource)> {
    d.runtime
        .as_ref()
        .map(|r| (r.requirement.to_string(), r.source))
}

const DJANGO_REQUIREMENTS: &str =
    "# pinned\nDjango==5.1.4\ngunicorn>=22 # server\nwhitenoise[brotli]==6.8\n--hash=sha256:abc\n";
const EXPRESS_PACKAGE: &str = r#"{
  "name": "express-app",
  "scripts": { "start": "node server.js" },
  "engines": { "node": ">=18" },
  "dependencies": { "express": "^4.21.0" }
}"#;

#[test]
fn each_installer_input_makes_its_stack() {
    let py = |input| Stack::Python { input };
    let node = |install, build_script| {
        Stack::Node(NodeApp {
            install,
            build_script,
            start_script: None,
        })
    };
    let build = manifest("[build]\ncommand = \"corepack yarn install\"");
    let rows: Vec<(&str, Option<&AppManifest>, Files, Stack)> = vec![
        ("nothing", None, vec![], Stack::None),
        ("a plain server", None, vec![(MANAGE_PY, "")], Stack::None),
        (
            "requirements",
            None,
            vec![(REQUIREMENTS_TXT, "flask\n")],
            py(PythonInput::Requirements),
        ),
        (
            "requirements beside a tools-only pyproject",
            None,
            vec![
                (REQUIREMENTS_TXT, "flask\n"),
                (PYPROJECT_TOML, "[tool.ruff]\n"),
            ],
            py(PythonInput::Requirements),
        ),
        (
            "uv",
            None,
            vec![(PYPROJECT_TOML, "[project]\nname = \"a\"\n"), (UV_LOCK, "")],
            py(PythonInput::UvLock),
        ),
        (
            "poetry",
            None,
            vec![(PYPROJECT_TOML, "[tool.poetry]\n"), (POETRY_LOCK, "")],
            py(PythonInput::PoetryLock),
        ),
        (
            "pipenv",
            None,
            vec![(PIPFILE, ""), (PIPFILE_LOCK, "{\"default\": {}}")],
            py(PythonInput::PipfileLock),
        ),
        (
            "a lone Pipfile.lock",
            None,
            vec![(PIPFILE_LOCK, "{}")],
            py(PythonInput::PipfileLock),
        ),
        (
            "npm with a lockfile",
            None,
            vec![(PACKAGE_JSON, "{}"), (PACKAGE_LOCK_JSON, "")],
            node(
                NodeInstall::NpmCi {
                    lockfile: PACKAGE_LOCK_JSON,
                },
                false,
            ),
        ),
        (
            "npm with a shrinkwrap, which npm prefers",
            None,
            vec![
                (PACKAGE_JSON, "{}"),
                (PACKAGE_LOCK_JSON, ""),
                (NPM_SHRINKWRAP_JSON, ""),
            ],
            node(
                NodeInstall::NpmCi {
                    lockfile: NPM_SHRINKWRAP_JSON,
                },
                false,
            ),
        ),
        (
            "npm without a lockfile",
            None,
            vec![(PACKAGE_JSON, "{\"scripts\": {\"build\": \"vite build\"}}")],
            node(NodeInstall::NpmInstall, true),
        ),
        (
            "yarn with [build] command",
            Some(&build),
            vec![(PACKAGE_JSON, "{}"), (YARN_LOCK, "")],
            node(
                NodeInstall::ByBuildCommand {
                    lockfile: YARN_LOCK,
                },
                false,
            ),
        ),
    ];
    for (what, manifest, list, stack) in rows {
        let d = ok(manifest, &list);
        assert_eq!(d.stack, stack, "{what}");
        assert_eq!(
            d.needs_build(),
            !matches!(stack, Stack::None),
            "{what}: an installer input is what makes a build"
        );
        assert!(
            !d.lines.is_empty(),
            "{what}: detection always says something"
        );
    }
}

#[test]
fn a_build_command_alone_needs_a_build() {
    let m = manifest("[build]\ncommand = \"make\"");
    let d = ok(Some(&m), &[]);
    assert_eq!(d.stack, Stack::None);
    assert!(d.needs_build());
    assert_eq!(d.build_command.as_deref(), Some("make"));
    assert!(
        d.lines.iter().any(|l| l.contains("make (the whole build)")),
        "{:?}",
        d.lines
    );
    assert!(!ok(Some(&manifest("")), &[]).needs_build());
}

#[test]
fn the_runtime_comes_from_the_first_source_that_names_one() {
    let pinned = manifest("runtime = \"python3>=3.13\"");
    let rows: Vec<(&str, Option<&AppManifest>, Files, Expected)> = vec![
        (
            "app.toml wins, even over a file it makes unread",
            Some(&pinned),
            vec![(REQUIREMENTS_TXT, ""), (PYTHON_VERSION_FILE, "pypy3.10\n")],
            Some(("python3>=3.13", RuntimeSource::Manifest)),
        ),
        (
            ".python-version, a minor version",
            None,
            vec![(REQUIREMENTS_TXT, ""), (PYTHON_VERSION_FILE, "3.12\n")],
            Some(("python3=3.12", RuntimeSource::PythonVersionFile)),
        ),
        (
            ".python-version, its first version line",
            None,
            vec![
                (REQUIREMENTS_TXT, ""),
                (PYTHON_VERSION_FILE, "# pyenv\n\n 3.12.1 \n3.11\n"),
            ],
            Some(("python3=3.12.1", RuntimeSource::PythonVersionFile)),
        ),
        (
            ".python-version over runtime.txt",
            None,
            vec![
                (REQUIREMENTS_TXT, ""),
                (PYTHON_VERSION_FILE, "3.11"),
                (RUNTIME_TXT, "python-3.12.1"),
            ],
            Some(("python3=3.11", RuntimeSource::PythonVersionFile)),
        ),
        (
            "runtime.txt",
            None,
            vec![(REQUIREMENTS_TXT, ""), (RUNTIME_TXT, "python-3.12.1\n")],
            Some(("python3=3.12.1", RuntimeSource::RuntimeTxt)),
        ),
        (
            "runtime.txt over requires-python",
            None,
            vec![
                (REQUIREMENTS_TXT, ""),
                (RUNTIME_TXT, "python-3.12"),
                (PYPROJECT_TOML, "[project]\nrequires-python = \">=3.11\""),
            ],
            Some(("python3=3.12", RuntimeSource::RuntimeTxt)),
        ),
        (
            "requires-python",
            None,
            vec![
                (PYPROJECT_TOML, "[project]\nrequires-python = \">=3.11\""),
                (UV_LOCK, ""),
            ],
            Some(("python3>=3.11", RuntimeSource::RequiresPython)),
        ),
        (
            "a pyproject without requires-python",
            None,
            vec![(PYPROJECT_TOML, "[project]\nname = \"a\""), (UV_LOCK, "")],
            None,
        ),
        (
            "a Python version without dependencies",
            None,
            vec![(PYTHON_VERSION_FILE, "3.13")],
            Some(("python3=3.13", RuntimeSource::PythonVersionFile)),
        ),
        (
            "engines.node, at least",
            None,
            vec![(PACKAGE_JSON, r#"{"engines": {"node": ">=18"}}"#)],
            Some(("node>=18", RuntimeSource::EnginesNode)),
        ),
        (
            "engines.node, an x-range",
            None,
            vec![(PACKAGE_JSON, r#"{"engines": {"node": "20.x"}}"#)],
            Some(("node=20", RuntimeSource::EnginesNode)),
        ),
        (
            "engines.node, a caret range",
            None,
            vec![(PACKAGE_JSON, r#"{"engines": {"node": "^20.1"}}"#)],
            Some(("node>=20.1,<21", RuntimeSource::EnginesNode)),
        ),
        (
            "engines.node, a major version",
            None,
            vec![(PACKAGE_JSON, r#"{"engines": {"node": "20"}}"#)],
            Some(("node=20", RuntimeSource::EnginesNode)),
        ),
        (
            "a Node app ignores Python's files",
            None,
            vec![(PACKAGE_JSON, "{}"), (PYTHON_VERSION_FILE, "pypy")],
            None,
        ),
        (
            "engines without node",
            None,
            vec![(PACKAGE_JSON, r#"{"engines": {"npm": ">=10"}}"#)],
            None,
        ),
    ];
    for (what, manifest, list, expected) in rows {
        let d = ok(manifest, &list);
        let expected = expected.map(|(text, source)| (text.to_string(), source));
        assert_eq!(runtime_text(&d), expected, "{what}");
        if let Some((text, source)) = expected {
            let line = format!("runtime {text} (from {source})");
            assert!(d.lines.contains(&line), "{what}: {:?}", d.lines);
        }
    }
}

#[test]
fn django_needs_manage_py_and_django_in_the_dependency_file() {
    let off = manifest("[build]\ncollectstatic = false");
    let rows: Vec<(&str, Option<&AppManifest>, Files, bool, bool)> = vec![
        (
            "requirements",
            None,
            vec![(REQUIREMENTS_TXT, DJANGO_REQUIREMENTS), (MANAGE_PY, "")],
            true,
            true,
        ),
        (
            "collectstatic turned off",
            Some(&off),
            vec![(REQUIREMENTS_TXT, DJANGO_REQUIREMENTS), (MANAGE_PY, "")],
            true,
            false,
        ),
        (
            "no manage.py",
            None,
            vec![(REQUIREMENTS_TXT, DJANGO_REQUIREMENTS)],
            false,
            false,
        ),
        (
            "a package that only starts with django",
            None,
            vec![
                (REQUIREMENTS_TXT, "django-environ\ndjango_extensions\n"),
                (MANAGE_PY, ""),
            ],
            false,
            false,
        ),
        (
            "uv: pyproject's dependencies",
            None,
            vec![
                (
                    PYPROJECT_TOML,
                    "[project]\ndependencies = [\"Django>=5\", \"gunicorn\"]",
                ),
                (UV_LOCK, ""),
                (MANAGE_PY, ""),
            ],
            true,
            true,
        ),
        (
            "poetry: its dependency table",
            None,
            vec![
                (
                    PYPROJECT_TOML,
                    "[tool.poetry.dependencies]\npython = \"^3.12\"\nDjango = \"^5.1\"",
                ),
                (POETRY_LOCK, ""),
                (MANAGE_PY, ""),
            ],
            true,
            true,
        ),
        (
            "pipenv: the lock's default packages",
            None,
            vec![
                (
                    PIPFILE_LOCK,
                    r#"{"default": {"django": {"version": "==5.1"}}}"#,
                ),
                (MANAGE_PY, ""),
            ],
            true,
            true,
        ),
        (
            "pipenv: django only among the dev packages",
            None,
            vec![
                (
                    PIPFILE_LOCK,
                    r#"{"default": {}, "develop": {"django": {}}}"#,
                ),
                (MANAGE_PY, ""),
            ],
            false,
            false,
        ),
    ];
    for (what, manifest, list, django, collectstatic) in rows {
        let d = ok(manifest, &list);
        assert_eq!(
            (d.django, d.collectstatic),
            (django, collectstatic),
            "{what}"
        );
        let says_django = d.lines.iter().any(|l| l.starts_with("Django:"));
        assert_eq!(says_django, django, "{what}: {:?}", d.lines);
    }
    let d = ok(None, &[(REQUIREMENTS_TXT, "flask"), (MANAGE_PY, "")]);
    assert!(
        d.lines
            .iter()
            .any(|l| l.contains("requirements.txt does not name django")),
        "{:?}",
        d.lines
    );
}

#[test]
fn a_django_app_as_its_author_published_it() {
    let d = ok(
        None,
        &[
            (PROCFILE, "web: gunicorn mysite.wsgi\n"),
            (REQUIREMENTS_TXT, DJANGO_REQUIREMENTS),
            (PYTHON_VERSION_FILE, "3.12\n"),
            (MANAGE_PY, "#!/usr/bin/env python\n"),
        ],
    );
    assert_eq!(
        d.stack,
        Stack::Python {
            input: PythonInput::Requirements
        }
    );
    assert!(d.django && d.collectstatic && d.needs_build() && d.recognised());
    assert_eq!(
        d.procfile.as_ref().and_then(|p| p.web()),
        Some("gunicorn mysite.wsgi")
    );
    assert_eq!(
        d.lines,
        [
            "Procfile: web: gunicorn mysite.wsgi",
            "Python app: the build installs the dependencies in requirements.txt with uv",
            "runtime python3=3.12 (from .python-version)",
            "Django: `python manage.py collectstatic --noinput` runs after the install",
        ]
    );
}

#[test]
fn an_express_app_as_its_author_published_it() {
    let d = ok(
        None,
        &[(PACKAGE_JSON, EXPRESS_PACKAGE), (PACKAGE_LOCK_JSON, "{}")],
    );
    let Stack::Node(node) = &d.stack else {
        panic!("{:?}", d.stack)
    };
    assert_eq!(node.install.npm_command(), Some("npm ci"));
    assert_eq!(node.start_script.as_deref(), Some("node server.js"));
    assert!(!node.build_script);
    assert_eq!(
        runtime_text(&d),
        Some(("node>=18".to_string(), RuntimeSource::EnginesNode))
    );
    assert_eq!(
        d.lines,
        [
            "Node app: `npm ci` from package-lock.json",
            "package.json scripts.start: node server.js",
            "runtime node>=18 (from package.json `engines.node`)",
        ]
    );
}

#[test]
fn what_is_recognised_as_an_app() {
    assert!(!ok(None, &[]).recognised());
    assert!(!ok(Some(&manifest("runtime = \"python3\"")), &[]).recognised());
    assert!(ok(None, &[(PROCFILE, "web: ./serve")]).recognised());
    assert!(ok(None, &[(RUNTIME_TXT, "python-3.12")]).recognised());
    assert!(ok(None, &[(PACKAGE_JSON, "{}")]).recognised());
}

#[test]
fn malformed_files_are_refused_naming_the_file_and_the_fix() {
    let long_garbage = "x".repeat(500);
    let rows: Vec<(&str, Files, &[&str])> = vec![
        (
            "package.json that is not JSON",
            vec![(PACKAGE_JSON, "{\"name\": \"a\",}")],
            &["package.json is not valid JSON", "line 1 column"],
        ),
        (
            "package.json that is an array",
            vec![(PACKAGE_JSON, "[]")],
            &["package.json", "an array, not an object"],
        ),
        (
            "engines.node that is no version spec",
            vec![(PACKAGE_JSON, r#"{"engines": {"node": "banana"}}"#)],
            &["package.json: field `engines.node`", "\"banana\"", "e.g."],
        ),
        (
            "engines.node with alternatives",
            vec![(PACKAGE_JSON, r#"{"engines": {"node": "18 || 20"}}"#)],
            &["field `engines.node`", "alternatives"],
        ),
        (
            "engines.node that is a number",
            vec![(PACKAGE_JSON, r#"{"engines": {"node": 20}}"#)],
            &["field `engines.node`", "not a number"],
        ),
        (
            "engines that is a string",
            vec![(PACKAGE_JSON, r#"{"engines": "node"}"#)],
            &["field `engines`", "must be an object"],
        ),
        (
            "scripts.build that is not a command",
            vec![(PACKAGE_JSON, r#"{"scripts": {"build": true}}"#)],
            &["field `scripts.build`", "a boolean"],
        ),
        (
            "runtime.txt with garbage",
            vec![(REQUIREMENTS_TXT, ""), (RUNTIME_TXT, "python 3 please")],
            &["runtime.txt", "\"python 3 please\"", "python-3.12.1"],
        ),
        (
            "runtime.txt naming another language",
            vec![(RUNTIME_TXT, "ruby-3.3.0")],
            &["runtime.txt", "python-<version>"],
        ),
        (
            "runtime.txt with a long garbage line, quoted short",
            vec![(RUNTIME_TXT, &long_garbage)],
            &["runtime.txt", "…"],
        ),
        (
            ".python-version asking for PyPy",
            vec![(PYTHON_VERSION_FILE, "pypy3.10-7.3.17\n")],
            &[".python-version", "PyPy", "`runtime` in app.toml"],
        ),
        (
            ".python-version naming a virtualenv",
            vec![(PYTHON_VERSION_FILE, "myproject-env\n")],
            &[
                ".python-version",
                "\"myproject-env\" is not a Python version",
            ],
        ),
        (
            ".python-version with a development build",
            vec![(PYTHON_VERSION_FILE, "3.13-dev")],
            &[".python-version", "not a Python version"],
        ),
        (
            ".python-version with a free-threaded build",
            vec![(PYTHON_VERSION_FILE, "3.13t")],
            &[".python-version", "not a Python version"],
        ),
        (
            "an empty .python-version",
            vec![(PYTHON_VERSION_FILE, "\n# nothing\n")],
            &[".python-version", "is empty"],
        ),
        (
            "pyproject.toml that is not TOML",
            vec![(PYPROJECT_TOML, "[project\n"), (UV_LOCK, "")],
            &["pyproject.toml is not valid TOML", "line 1"],
        ),
        (
            "requires-python with an exclusion",
            vec![(
                PYPROJECT_TOML,
                "[project]\nrequires-python = \">=3.9,!=3.9.1\"",
            )],
            &[
                "pyproject.toml: field `project.requires-python`",
                "not supported",
            ],
        ),
        (
            "requires-python that is a number",
            vec![(PYPROJECT_TOML, "[project]\nrequires-python = 3.11")],
            &["field `project.requires-python`", "not a float"],
        ),
        (
            "Pipfile.lock that is not JSON",
            vec![(PIPFILE_LOCK, "default = {}")],
            &["Pipfile.lock is not valid JSON"],
        ),
        (
            "a Procfile that is not one",
            vec![(PROCFILE, "web gunicorn app")],
            &["Procfile, line 1", "`name: command`"],
        ),
        (
            "two Python dependency files",
            vec![(REQUIREMENTS_TXT, ""), (PIPFILE_LOCK, "{}")],
            &["found both Pipfile.lock and requirements.txt", ".emignore"],
        ),
        (
            "Python and Node",
            vec![(REQUIREMENTS_TXT, ""), (PACKAGE_JSON, "{}")],
            &[
                "found both requirements.txt and package.json",
                "one language",
            ],
        ),
        (
            "npm's and yarn's lockfiles",
            vec![
                (PACKAGE_JSON, "{}"),
                (PACKAGE_LOCK_JSON, ""),
                (YARN_LOCK, ""),
            ],
            &["found both package-lock.json and yarn.lock"],
        ),
        (
            "yarn's and pnpm's lockfiles",
            vec![(PACKAGE_JSON, "{}"), (YARN_LOCK, ""), (PNPM_LOCK_YAML, "")],
            &["found both yarn.lock and pnpm-lock.yaml"],
        ),
        (
            "a yarn app without [build] command",
            vec![(PACKAGE_JSON, "{}"), (YARN_LOCK, "")],
            &[
                "yarn.lock: npm is the Node installer",
                "`[build] command`",
                "corepack yarn install",
            ],
        ),
        (
            "a pnpm app without [build] command",
            vec![(PACKAGE_JSON, "{}"), (PNPM_LOCK_YAML, "")],
            &["pnpm-lock.yaml: npm is the Node installer", "corepack pnpm"],
        ),
        (
            "uv.lock without its project",
            vec![(UV_LOCK, "")],
            &["uv.lock without pyproject.toml"],
        ),
        (
            "poetry.lock without its project",
            vec![(POETRY_LOCK, "")],
            &["poetry.lock without pyproject.toml"],
        ),
        (
            "a Pipfile that was never locked",
            vec![(PIPFILE, "[packages]\n")],
            &["Pipfile without Pipfile.lock", "pipenv lock"],
        ),
        (
            "a lockfile without package.json",
            vec![(PACKAGE_LOCK_JSON, "{}")],
            &["package-lock.json without package.json"],
        ),
    ];
    for (what, list, needles) in rows {
        let shown = err(None, &list).to_string();
        for needle in needles {
            assert!(shown.contains(needle), "{what}: {shown:?} lacks {needle:?}");
        }
        assert!(!shown.ends_with('.'), "{what}: {shown}");
    }
}

#[test]
fn oversized_and_undecodable_files_are_refused() {
    let mut big = RootFiles::new();
    big.insert(PACKAGE_JSON, MAX_DETECT_FILE_BYTES + 1, None);
    assert_eq!(
        detect(None, &big).unwrap_err(),
        DetectError::TooLarge {
            file: PACKAGE_JSON,
            max: MAX_DETECT_FILE_BYTES
        }
    );
    // Content handed over past the limit is dropped, not kept.
    let mut big = RootFiles::new();
    let bytes = vec![b' '; MAX_DETECT_FILE_BYTES as usize + 1];
    big.insert(REQUIREMENTS_TXT, bytes.len() as u64, Some(bytes));
    assert_eq!(big.get(REQUIREMENTS_TXT).unwrap().content, None);
    assert!(matches!(
        detect(None, &big),
        Err(DetectError::TooLarge {
            file: REQUIREMENTS_TXT,
            ..
        })
    ));
    // A lockfile of any size is fine: only its presence counts.
    let mut lock = RootFiles::new().with(PACKAGE_JSON, "{}");
    lock.insert(PACKAGE_LOCK_JSON, 50 * MAX_DETECT_FILE_BYTES, None);
    assert!(detect(None, &lock).is_ok());

    let mut bad = RootFiles::new();
    bad.insert(REQUIREMENTS_TXT, 2, Some(vec![0xff, 0xfe]));
    assert_eq!(
        detect(None, &bad).unwrap_err(),
        DetectError::NotUtf8 {
            file: REQUIREMENTS_TXT
        }
    );
}

#[test]
fn root_files_keep_only_what_detection_reads() {
    assert_eq!(RootFiles::file_use(PACKAGE_JSON), Some(FileUse::Content));
    assert_eq!(RootFiles::file_use(MANAGE_PY), Some(FileUse::Presence));
    assert_eq!(RootFiles::file_use(YARN_LOCK), Some(FileUse::Presence));
    assert_eq!(RootFiles::file_use("server.py"), None);
    let mut files = RootFiles::new();
    files.insert("server.py", 3, Some(b"x=1".to_vec()));
    files.insert(MANAGE_PY, 3, Some(b"x=1".to_vec()));
    assert_eq!(files.names().collect::<Vec<_>>(), [MANAGE_PY]);
    assert_eq!(files.get(MANAGE_PY).unwrap().content, None);
    for name in DETECT_FILES {
        assert!(RootFiles::file_use(name).is_some(), "{name}");
    }
}

#[test]
fn every_error_names_its_file() {
    // One of each variant, checked for the file name and the house style.
    let errors = [
        DetectError::TooLarge {
            file: PACKAGE_JSON,
            max: 1,
        },
        DetectError::Unread { file: PACKAGE_JSON },
        DetectError::NotUtf8 { file: PACKAGE_JSON },
        DetectError::Json {
            file: PACKAGE_JSON,
            error: "x".into(),
        },
        DetectError::Toml {
            file: PACKAGE_JSON,
            error: "x".into(),
        },
        DetectError::Field {
            file: PACKAGE_JSON,
            field: "f",
            message: "x".into(),
        },
        DetectError::Version {
            file: PACKAGE_JSON,
            message: "x".into(),
        },
        DetectError::Missing {
            file: PACKAGE_JSON,
            needs: "y",
            hint: "z",
        },
        DetectError::UnsupportedInstaller {
            file: PACKAGE_JSON,
            installer: "yarn",
            example: "e",
        },
    ];
    for e in errors {
        let shown = e.to_string();
        assert!(shown.contains(PACKAGE_JSON), "{shown}");
        assert!(!shown.ends_with('.'), "{shown}");
    }
}
