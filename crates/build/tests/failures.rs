//! Builds that fail for a reason the app's author must fix, each with a message naming what
//! to change: a dependency that does not exist, a runtime the platform lacks.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{run_build, settings, write_tree};
use px_build::BuildError;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dependency_that_does_not_exist_fails_naming_it() {
    let app = "build-test-unknown-dep";
    let work = tempfile::tempdir().unwrap();
    let source = tempfile::tempdir().unwrap();
    write_tree(
        source.path(),
        &[
            (
                "app.toml",
                &format!("name = \"{app}\"\nrun = \"python3 app.py\"\n"),
            ),
            ("requirements.txt", "px-no-such-package-for-build-tests\n"),
            (".python-version", "3.12\n"),
            ("app.py", "print('hi')\n"),
        ],
    );
    let settings = settings(work.path(), app);
    let (built, output) = run_build(app, 1, source.path(), &settings).await;
    let e = built.expect_err("an unknown dependency built");
    assert!(
        matches!(&e, BuildError::UnknownDependency { name, file } if name == "px-no-such-package-for-build-tests" && file == "requirements.txt"),
        "{e:?}\n{output:#?}"
    );
    assert!(
        e.to_string()
            .contains("`px-no-such-package-for-build-tests` does not exist"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_the_platform_lacks_fails_naming_the_file_the_version_and_what_there_is() {
    let app = "build-test-no-runtime";
    let work = tempfile::tempdir().unwrap();
    let source = tempfile::tempdir().unwrap();
    write_tree(
        source.path(),
        &[
            (
                "app.toml",
                &format!("name = \"{app}\"\nrun = \"python3 app.py\"\n"),
            ),
            ("requirements.txt", "gunicorn\n"),
            (".python-version", "3.99\n"),
            ("app.py", "print('hi')\n"),
        ],
    );
    let settings = settings(work.path(), app);
    let (built, output) = run_build(app, 1, source.path(), &settings).await;
    let e = built.expect_err("a missing runtime built");
    let BuildError::RuntimeUnavailable {
        file,
        request,
        available,
        ..
    } = &e
    else {
        panic!("{e:?}\n{output:#?}");
    };
    assert_eq!(file, ".python-version");
    assert_eq!(request, "python3=3.99");
    // pyenv's interpreters are on this machine.
    assert!(
        available.contains("3.12.1") && available.contains("3.11.7"),
        "{available}"
    );
    let text = e.to_string();
    assert!(text.contains("runtimes directory"), "{text}");
    // Nothing was installed: the runtime is resolved before any installer runs.
    assert!(
        !output.iter().any(|l| l.contains("Installing dependencies")),
        "{output:#?}"
    );
}
