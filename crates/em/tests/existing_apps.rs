//! Bringing an existing app, as a new user would: a Django app and an Express app as their
//! authors publish them (`tests/fixtures/`; small text files, the Express lockfile a stub since
//! nothing here runs npm). `em init` in their directory writes only `app.toml`, saying what it
//! found, and the result packs; `em deploy` without `app.toml` says to run `em init` and what it
//! would find.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use px_proto::manifest::AppManifest;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Copies fixture `name` to `<tmp>/<as_name>`, modes included; returns the copy.
fn copy_fixture(name: &str, tmp: &Path, as_name: &str) -> PathBuf {
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), &target).unwrap();
            }
        }
    }
    let dir = tmp.join(as_name);
    copy(&fixture(name), &dir);
    dir
}

/// Relative path → (mode, content) of every file under `root`.
fn snapshot(root: &Path) -> BTreeMap<String, (u32, Vec<u8>)> {
    let mut files = BTreeMap::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                pending.push(path);
                continue;
            }
            let relative = path
                .strip_prefix(root)
                .unwrap()
                .to_str()
                .unwrap()
                .to_string();
            let mode = meta.permissions().mode() & 0o7777;
            files.insert(relative, (mode, std::fs::read(&path).unwrap()));
        }
    }
    files
}

/// Runs em in `cwd` with fresh config and data directories under `home`.
fn em(home: &Path, cwd: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_em"))
        .args(args)
        .current_dir(cwd)
        .env("XDG_CONFIG_HOME", home.join("config"))
        .env("XDG_DATA_HOME", home.join("data"))
        .env("HOME", home)
        .env_remove("PX_LOG")
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `em init ARGS` run in `cwd` for the app in `dir`, checked to succeed and to add
/// `app.toml` and nothing else, every other file byte-identical with its mode; returns
/// stdout and the written app.toml.
fn init_adds_only_app_toml(home: &Path, cwd: &Path, dir: &Path, args: &[&str]) -> (String, String) {
    let before = snapshot(dir);
    let out = em(home, cwd, &[&["init"], args].concat());
    assert!(
        out.status.success(),
        "em init failed: {}",
        text(&out.stderr)
    );
    let mut after = snapshot(dir);
    let (mode, written) = after.remove("app.toml").expect("em init wrote no app.toml");
    assert_eq!(mode & 0o111, 0, "app.toml is not executable");
    assert_eq!(after, before, "em init changed or added other files");
    (text(&out.stdout), text(&written))
}

#[test]
fn em_init_in_a_django_app_writes_only_an_app_toml_that_deploys() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_fixture("django-app", tmp.path(), "mysite");
    let (stdout, written) = init_adds_only_app_toml(tmp.path(), &dir, &dir, &[]);
    assert!(stdout.contains("wrote app.toml for app mysite"), "{stdout}");
    for found in [
        "Procfile: web: gunicorn mysite.wsgi",
        "Python app: the build installs the dependencies in requirements.txt with uv",
        "runtime python3=3.12 (from .python-version)",
        "Django: `python manage.py collectstatic --noinput` runs after the install",
    ] {
        assert!(stdout.contains(&format!("  {found}\n")), "{stdout}");
        assert!(written.contains(&format!("#   {found}\n")), "{written}");
    }
    // The name from the directory, no `run`: the Procfile's web line is the run command,
    // and no runtime pinned, so .python-version keeps deciding.
    let manifest = AppManifest::parse(&written).unwrap();
    assert_eq!(manifest.name, "mysite");
    assert_eq!(manifest.run, None);
    assert_eq!(manifest.runtime, None);
    assert!(
        written.contains("the Procfile's `web:` line starts the app"),
        "{written}"
    );
    // What `em deploy` would upload: the run command is the Procfile's.
    let (summary, packed) = px_bundle::pack_dir(&dir, std::io::sink()).unwrap();
    assert_eq!(packed.run.as_deref(), Some("gunicorn mysite.wsgi"));
    assert!(summary.root_files.contains("manage.py"));

    // A second `em init` leaves the written file alone.
    let out = em(tmp.path(), &dir, &["init"]);
    assert_eq!(out.status.code(), Some(6), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("already exists"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("app.toml")).unwrap(),
        written
    );
}

#[test]
fn em_init_in_an_express_app_runs_npm_start() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_fixture("express-app", tmp.path(), "express-app");
    let (stdout, written) = init_adds_only_app_toml(
        tmp.path(),
        tmp.path(),
        &dir,
        &["express-app", "--name", "shop"],
    );
    assert!(stdout.contains("wrote app.toml for app shop"), "{stdout}");
    for found in [
        "Node app: `npm ci` from package-lock.json",
        "package.json scripts.start: node server.js",
        "runtime node>=18 (from package.json `engines.node`)",
    ] {
        assert!(written.contains(&format!("#   {found}\n")), "{written}");
    }
    let manifest = AppManifest::parse(&written).unwrap();
    assert_eq!(manifest.name, "shop");
    assert_eq!(manifest.run.as_deref(), Some("npm start"));
    let (_, packed) = px_bundle::pack_dir(&dir, std::io::sink()).unwrap();
    assert_eq!(packed, manifest);
}

#[test]
fn em_init_says_when_it_cannot_tell_how_an_app_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("flask-app");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("requirements.txt"), "flask\n").unwrap();
    std::fs::write(dir.join("app.py"), "print('hi')\n").unwrap();
    let before = snapshot(&dir);
    let out = em(tmp.path(), &dir, &["init"]);
    assert_eq!(out.status.code(), Some(6), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("cannot tell how the app starts") && stderr.contains("set `run`"),
        "{stderr}"
    );
    // The app.toml is there to fill in, with a commented placeholder, and parses.
    let mut after = snapshot(&dir);
    let (_, written) = after.remove("app.toml").unwrap();
    assert_eq!(after, before);
    let written = text(&written);
    assert!(written.contains("# run = \"<command>\""), "{written}");
    assert_eq!(AppManifest::parse(&written).unwrap().run, None);
    // Until `run` is set, it does not deploy, and says why.
    let e = px_bundle::pack_dir(&dir, std::io::sink()).unwrap_err();
    assert!(e.to_string().contains("no `run`"), "{e}");
}

#[test]
fn em_init_refuses_an_app_it_cannot_build_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_fixture("express-app", tmp.path(), "broken");
    std::fs::write(dir.join("package.json"), "{\"name\": \"broken\",}\n").unwrap();
    let before = snapshot(&dir);
    let out = em(tmp.path(), &dir, &["init"]);
    assert_eq!(out.status.code(), Some(6), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("package.json is not valid JSON") && stderr.contains("line 1 column"),
        "{stderr}"
    );
    assert!(stderr.contains("nothing was written"), "{stderr}");
    assert_eq!(snapshot(&dir), before);

    // A template is for a new app, not one that is there already.
    let dir = copy_fixture("django-app", tmp.path(), "mysite");
    let before = snapshot(&dir);
    let out = em(tmp.path(), &dir, &["init", "--template", "node"]);
    assert_eq!(out.status.code(), Some(6), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("--template"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(snapshot(&dir), before);
}

#[test]
fn em_init_json_lists_what_it_found() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_fixture("django-app", tmp.path(), "mysite");
    let out = em(tmp.path(), &dir, &["--json", "init"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["app"], "mysite");
    let detected: Vec<&str> = json["detected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    assert!(
        detected.contains(&"Procfile: web: gunicorn mysite.wsgi"),
        "{detected:?}"
    );
}

/// Writes an em config pointing at a port nobody answers on: `em deploy` must stop at the
/// app directory before it would reach for the network.
fn configure(home: &Path) {
    std::fs::create_dir_all(home.join("config/em")).unwrap();
    std::fs::write(
        home.join("config/em/config.toml"),
        "remote = \"http://127.0.0.1:9\"\nbeacon = \"http://127.0.0.1:9\"\ntoken = \"pxt_x\"\n",
    )
    .unwrap();
}

#[test]
fn em_deploy_without_app_toml_says_what_em_init_would_find() {
    let tmp = tempfile::tempdir().unwrap();
    configure(tmp.path());
    let dir = copy_fixture("django-app", tmp.path(), "mysite");
    let before = snapshot(&dir);
    let out = em(tmp.path(), tmp.path(), &["deploy", dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(6), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("no app.toml in"), "{stderr}");
    assert!(stderr.contains("run `em init` there"), "{stderr}");
    for found in [
        "  Procfile: web: gunicorn mysite.wsgi",
        "  runtime python3=3.12 (from .python-version)",
        "  Django: `python manage.py collectstatic --noinput` runs after the install",
    ] {
        assert!(stderr.contains(found), "{stderr}");
    }
    assert_eq!(snapshot(&dir), before, "em deploy wrote into the app");

    // What would stop `em init` is said up front too.
    let dir = copy_fixture("express-app", tmp.path(), "yarn-app");
    std::fs::write(dir.join("yarn.lock"), "# yarn lockfile v1\n").unwrap();
    std::fs::remove_file(dir.join("package-lock.json")).unwrap();
    let out = em(tmp.path(), &dir, &["deploy"]);
    assert_eq!(out.status.code(), Some(6), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("would first stop at: yarn.lock: npm is the Node installer"),
        "{stderr}"
    );

    // A directory with nothing em knows keeps the plain advice.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let out = em(tmp.path(), &empty, &["deploy"]);
    assert_eq!(out.status.code(), Some(6));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("run `em init` to create an app"),
        "{stderr}"
    );
}
