//! Python builds with the real uv and packages from PyPI: a Django app built into layers that
//! run from any release directory, a code-only rebuild that reuses the dependencies, and a
//! project locked by uv (installed as locked; a stale lock fails naming it).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::Instant;

use common::{assemble, run_build, run_in_release, settings, write_tree};
use px_proto::build::LayerKind;

/// A Django project as its author publishes it: requirements, a Procfile-style run command,
/// `.python-version`, `manage.py`, whitenoise for static files.
fn django_app(dir: &Path, name: &str) {
    write_tree(
        dir,
        &[
            (
                "app.toml",
                &format!("name = \"{name}\"\nrun = \"gunicorn mysite.wsgi\"\n"),
            ),
            (
                "requirements.txt",
                "Django>=5.1\ngunicorn>=22\nwhitenoise>=6.6\n",
            ),
            (".python-version", "3.12\n"),
            (
                "manage.py",
                "#!/usr/bin/env python\nimport os, sys\n\nif __name__ == \"__main__\":\n    os.environ.setdefault(\"DJANGO_SETTINGS_MODULE\", \"mysite.settings\")\n    from django.core.management import execute_from_command_line\n    execute_from_command_line(sys.argv)\n",
            ),
            ("mysite/__init__.py", ""),
            (
                "mysite/settings.py",
                "from pathlib import Path\nBASE_DIR = Path(__file__).resolve().parent.parent\nSECRET_KEY = 'not-a-secret'\nDEBUG = False\nALLOWED_HOSTS = ['*']\nINSTALLED_APPS = ['django.contrib.admin', 'django.contrib.auth', 'django.contrib.contenttypes', 'django.contrib.sessions', 'django.contrib.messages', 'django.contrib.staticfiles']\nMIDDLEWARE = ['django.middleware.security.SecurityMiddleware', 'whitenoise.middleware.WhiteNoiseMiddleware', 'django.contrib.sessions.middleware.SessionMiddleware', 'django.middleware.common.CommonMiddleware', 'django.contrib.auth.middleware.AuthenticationMiddleware', 'django.contrib.messages.middleware.MessageMiddleware']\nROOT_URLCONF = 'mysite.urls'\nTEMPLATES = [{'BACKEND': 'django.template.backends.django.DjangoTemplates', 'DIRS': [], 'APP_DIRS': True, 'OPTIONS': {'context_processors': ['django.template.context_processors.request', 'django.contrib.auth.context_processors.auth', 'django.contrib.messages.context_processors.messages']}}]\nWSGI_APPLICATION = 'mysite.wsgi.application'\nDATABASES = {'default': {'ENGINE': 'django.db.backends.sqlite3', 'NAME': BASE_DIR / 'db.sqlite3'}}\nSTATIC_URL = 'static/'\nSTATIC_ROOT = BASE_DIR / 'staticfiles'\n",
            ),
            (
                "mysite/urls.py",
                "from django.http import HttpResponse\nfrom django.urls import path\n\ndef home(request):\n    return HttpResponse('hello from django')\n\nurlpatterns = [path('', home)]\n",
            ),
            (
                "mysite/wsgi.py",
                "import os\nfrom django.core.wsgi import get_wsgi_application\nos.environ.setdefault('DJANGO_SETTINGS_MODULE', 'mysite.settings')\napplication = get_wsgi_application()\n",
            ),
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_django_app_builds_into_layers_that_run_from_the_release() {
    let app = "build-test-django";
    let work = tempfile::tempdir().unwrap();
    let source = tempfile::tempdir().unwrap();
    django_app(source.path(), app);
    let settings = settings(work.path(), app);

    let started = Instant::now();
    let (built, output) = run_build(app, 1, source.path(), &settings).await;
    let built = built.unwrap_or_else(|e| panic!("build failed: {e}\n{}", output.join("\n")));
    eprintln!(
        "cold Django build (empty dependency cache): {:.2} s",
        started.elapsed().as_secs_f64()
    );

    let kinds: Vec<LayerKind> = built.layers.iter().map(|l| l.kind).collect();
    assert_eq!(
        kinds,
        [LayerKind::Runtime, LayerKind::Dependencies, LayerKind::App]
    );
    assert!(
        built
            .runtime
            .as_deref()
            .unwrap()
            .starts_with("python3 3.12."),
        "{:?}",
        built.runtime
    );
    assert_eq!(built.path, [".px/deps/bin", ".px/runtime/bin"]);
    assert_eq!(built.env["PYTHONUSERBASE"], "{release}/.px/deps");
    assert!(
        output
            .iter()
            .any(|l| l.contains("Installing dependencies with uv")),
        "{output:#?}"
    );
    assert!(
        output.iter().any(|l| l.contains("collectstatic")),
        "{output:#?}"
    );

    let releases = tempfile::tempdir().unwrap();
    let release = releases.path().join("v1");
    let t = Instant::now();
    assemble(&built, &release);
    eprintln!("assembled in {:.2} s", t.elapsed().as_secs_f64());
    // collectstatic ran into the app layer.
    assert!(release.join("staticfiles/admin/css/base.css").is_file());
    // The interpreter runs from the release, with its stdlib, ssl and sqlite3, and Django
    // comes from the dependencies layer; the host's pyenv is hidden.
    let (ok, text) = run_in_release(
        &built,
        &release,
        "python3 -c 'import sys, ssl, sqlite3, django; print(sys.prefix); print(django.__file__)' && gunicorn --check-config mysite.wsgi && echo gunicorn-ok",
    );
    eprintln!("ran in {:.2} s", t.elapsed().as_secs_f64());
    assert!(ok, "{text}");
    let prefix = release.join(".px/runtime").display().to_string();
    assert!(text.contains(&prefix), "{text}");
    assert!(
        text.contains(&format!(
            "{}/.px/deps/lib/python3.12/site-packages/django",
            release.display()
        )),
        "{text}"
    );
    assert!(text.contains("gunicorn-ok"), "{text}");
    // The standard library and the dependencies come compiled, with bytecode checked by the
    // source's hash (flags 3), so it is valid in the release and its first start compiles
    // nothing.
    let (ok, text) = run_in_release(
        &built,
        &release,
        "python3 -c 'import importlib.util as u, json, django\nfor m in (json, django):\n    head = open(u.cache_from_source(m.__file__), \"rb\").read(8)\n    print(m.__name__, \"flags\", int.from_bytes(head[4:8], \"little\"))'",
    );
    assert!(ok, "{text}");
    assert!(text.contains("json flags 3"), "{text}");
    assert!(text.contains("django flags 3"), "{text}");
    // Installed scripts run from any release directory.
    let gunicorn = std::fs::read_to_string(release.join(".px/deps/bin/gunicorn")).unwrap();
    assert!(
        gunicorn.starts_with("#!/usr/bin/env python3\n"),
        "{gunicorn}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_code_only_rebuild_reuses_the_dependencies_without_running_the_installer() {
    let app = "build-test-rebuild";
    let work = tempfile::tempdir().unwrap();
    let source = tempfile::tempdir().unwrap();
    django_app(source.path(), app);
    let settings = settings(work.path(), app);

    let (first, output) = run_build(app, 1, source.path(), &settings).await;
    let first = first.unwrap_or_else(|e| panic!("build failed: {e}\n{}", output.join("\n")));
    assert!(
        output
            .iter()
            .any(|l| l.contains("Installing dependencies with uv")),
        "{output:#?}"
    );

    // Only the code changes, and app.toml, which is no installer input: collectstatic off,
    // and a build command that needs the dependencies.
    let toml = format!(
        "name = \"{app}\"\nrun = \"gunicorn mysite.wsgi\"\n\n[build]\ncollectstatic = false\ncommand = \"\"\"python -c 'import django; open(\"version.txt\", \"w\").write(django.get_version())'\"\"\"\n"
    );
    write_tree(source.path(), &[("app.toml", &toml)]);
    write_tree(
        source.path(),
        &[(
            "mysite/urls.py",
            "from django.http import HttpResponse\nfrom django.urls import path\n\ndef home(request):\n    return HttpResponse('hello again')\n\nurlpatterns = [path('', home)]\n",
        )],
    );
    let started = Instant::now();
    let (second, output) = run_build(app, 2, source.path(), &settings).await;
    let second = second.unwrap_or_else(|e| panic!("rebuild failed: {e}\n{}", output.join("\n")));
    eprintln!(
        "code-only Django rebuild: {:.2} s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        !output.iter().any(|l| l.contains("Installing dependencies")),
        "{output:#?}"
    );
    assert!(
        !output
            .iter()
            .any(|l| l.contains("uv pip install") || l.contains("Resolved")),
        "{output:#?}"
    );
    assert!(
        output
            .iter()
            .any(|l| l.contains("reusing the cached layer, uv")),
        "{output:#?}"
    );
    let deps = |b: &px_build::Built| {
        b.layers
            .iter()
            .find(|l| l.kind == LayerKind::Dependencies)
            .unwrap()
            .clone()
    };
    assert_eq!(deps(&first).sha256, deps(&second).sha256);
    assert!(deps(&second).reused);
    assert!(second.layers[0].reused, "the runtime layer is reused too");
    assert_ne!(
        first.layers[2].sha256, second.layers[2].sha256,
        "the app layer has the new code"
    );
    assert!(
        !output.iter().any(|l| l.contains("collectstatic")),
        "{output:#?}"
    );
    let release = work.path().join("release-2");
    common::assemble(&second, &release);
    assert!(!release.join("staticfiles").exists(), "collectstatic ran");
    let version = std::fs::read_to_string(release.join("version.txt")).unwrap();
    assert!(
        version.starts_with(|c: char| c.is_ascii_digit()),
        "{version}"
    );

    // A changed requirement misses the cache, and the build says which input changed.
    write_tree(
        source.path(),
        &[(
            "requirements.txt",
            "Django>=5.1\ngunicorn>=22\nwhitenoise>=6.6\nsqlparse\n",
        )],
    );
    let (third, output) = run_build(app, 3, source.path(), &settings).await;
    third.unwrap_or_else(|e| panic!("build failed: {e}\n{}", output.join("\n")));
    assert!(
        output
            .iter()
            .any(|l| l.contains("Installing dependencies with uv")
                && l.contains("requirements.txt changed since the last build")),
        "{output:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debians_python_is_relocated_into_the_release_and_finds_its_dependencies() {
    // Debian's interpreter as an operator would list it in a runtimes directory: its prefix
    // is /usr, so the directory links to the pieces that make it up.
    if !Path::new("/usr/bin/python3.11").is_file() {
        panic!("this test needs Debian's python3.11 (/usr/bin/python3.11)");
    }
    let runtimes = tempfile::tempdir().unwrap();
    let prefix = runtimes.path().join("python3/3.11.2");
    std::fs::create_dir_all(prefix.join("bin")).unwrap();
    std::fs::create_dir_all(prefix.join("lib")).unwrap();
    std::os::unix::fs::symlink("/usr/bin/python3.11", prefix.join("bin/python3")).unwrap();
    std::os::unix::fs::symlink("/usr/lib/python3.11", prefix.join("lib/python3.11")).unwrap();

    let app = "build-test-debian-python";
    let work = tempfile::tempdir().unwrap();
    let source = tempfile::tempdir().unwrap();
    write_tree(
        source.path(),
        &[
            (
                "app.toml",
                &format!("name = \"{app}\"\nrun = \"python3 app.py\"\n"),
            ),
            ("requirements.txt", "six==1.17.0\n"),
            (".python-version", "3.11\n"),
            ("app.py", "import six\nprint('six', six.__version__)\n"),
        ],
    );
    let mut settings = settings(work.path(), app);
    settings.runtimes.dirs = vec![runtimes.path().to_path_buf()];
    settings.runtimes.discover_host = false;
    let (built, output) = run_build(app, 1, source.path(), &settings).await;
    let built = built.unwrap_or_else(|e| panic!("build failed: {e}\n{}", output.join("\n")));
    assert_eq!(built.runtime.as_deref(), Some("python3 3.11.2"));
    // A static interpreter needs no library path.
    assert!(
        !built.env.contains_key("LD_LIBRARY_PATH"),
        "{:?}",
        built.env
    );

    let releases = tempfile::tempdir().unwrap();
    let release = releases.path().join("v1");
    assemble(&built, &release);
    assert!(
        !release.join(".px/runtime/lib/python3.11/test").exists(),
        "the test suite was copied"
    );
    let (ok, text) = run_in_release(
        &built,
        &release,
        "python3 -c 'import sys, ssl, sqlite3; print(sys.prefix)' && python3 app.py",
    );
    assert!(ok, "{text}");
    assert!(
        text.contains(&release.join(".px/runtime").display().to_string()),
        "{text}"
    );
    assert!(text.contains("six 1.17.0"), "{text}");
}

/// A copy of the uv-locked fixture (`pyproject.toml` pinning six, its `uv.lock`).
fn uv_locked_app(dir: &Path) {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/uvlock");
    for file in [
        "app.toml",
        "app.py",
        "pyproject.toml",
        "uv.lock",
        ".python-version",
    ] {
        std::fs::copy(fixture.join(file), dir.join(file)).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_uv_locked_project_installs_what_its_lock_says() {
    let app = "uvlock-shop";
    let work = tempfile::tempdir().unwrap();
    let source = tempfile::tempdir().unwrap();
    uv_locked_app(source.path());
    let settings = settings(work.path(), app);

    let (built, output) = run_build(app, 1, source.path(), &settings).await;
    let built = built.unwrap_or_else(|e| panic!("build failed: {e}\n{}", output.join("\n")));
    let release = work.path().join("release");
    assemble(&built, &release);
    let (ok, out) = run_in_release(&built, &release, "python3 app.py");
    assert!(ok, "{out}");
    // The lock pins six 1.16.0, although newer ones exist.
    assert!(out.contains("six 1.16.0"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_uv_lock_out_of_sync_with_pyproject_fails_naming_the_lockfile() {
    let app = "uvlock-stale";
    let work = tempfile::tempdir().unwrap();
    let source = tempfile::tempdir().unwrap();
    uv_locked_app(source.path());
    // A dependency added to pyproject.toml without `uv lock`.
    let pyproject = std::fs::read_to_string(source.path().join("pyproject.toml")).unwrap();
    let pyproject = pyproject.replace("[\"six==1.16.0\"]", "[\"six==1.16.0\", \"idna\"]");
    write_tree(
        source.path(),
        &[
            ("pyproject.toml", &pyproject),
            (
                "app.toml",
                &format!("name = \"{app}\"\nrun = \"python3 app.py\"\n"),
            ),
        ],
    );
    let settings = settings(work.path(), app);

    let (built, output) = run_build(app, 1, source.path(), &settings).await;
    let e = built.expect_err("a stale uv.lock built");
    assert!(
        matches!(&e, px_build::BuildError::LockfileOutOfDate { file, .. } if file == "uv.lock"),
        "{e:?}\n{output:#?}"
    );
    assert!(
        e.to_string()
            .starts_with("uv.lock is out of date with pyproject.toml; update it (run `uv lock`"),
        "{e}"
    );
}
