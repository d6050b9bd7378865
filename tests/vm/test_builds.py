"""Builds on the cluster: an app with dependencies deployed as its author publishes it.

web-1 is a build node (the `builders` group) as well as a web server; web-2 only serves. The
VMs reach nothing outside, so web-1 installs from the host's package mirror (mirror.py) and
gets the builder's pinned uv and a Node runtime archive from the controller (site.yml, with
the `platform` fixture's variables). `em deploy` of `examples/django-notes` builds it on
web-1, with its output streamed to em, into a release of three layers that both web servers
serve; web-2 runs it with the release's own Python and has no Django or uv anywhere else. A
code-only redeploy under polling reuses the dependencies (the installer does not run) and
web-2 downloads only the new app layer. Runs last (conftest.MODULE_ORDER).

No scenario deploys a Node app: its runtime layer (Node itself, 110 MB, 41 MiB packed) costs
minutes more to pack, upload, download and unpack on emulated machines running debug builds,
and strained the 1 GiB control VM when tried; the runtimes role's Node archive is checked to
run on the build node instead, and `em up`'s tests build `examples/express-hello`.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

import mirror
from appcheck import (
    REQUESTS_PER_STEP,
    SERVE_TIMEOUT_S,
    WEB_SERVERS,
    Poller,
    app_uid,
    get,
    wait_for_nodes,
    wait_until,
)

REPO = Path(__file__).resolve().parents[2]
BUILDER = "web-1"
SERVER_ONLY = "web-2"
# Maestro's state directory and runtimes directory on the VMs (the roles' defaults).
STATE_DIR = "/var/lib/platformx/maestro"
RUNTIMES_DIR = "/opt/platformx/runtimes"
# One em deploy that builds: a cold build under emulation installs Django, collects the static
# files and packs a Python runtime (minutes), then both web servers download and start it.
BUILD_DEPLOY_TIMEOUT_S = 25 * 60
# The page and stylesheet of django-notes, and how its page says its release.
NOTES_TITLE = "Notes from Django"
NOTES_STYLESHEET = ("/static/notes/style.css", "notes-stylesheet")
NOTES_CHANGED_TITLE = "Notes from Django, rebuilt"
_NOTES_RELEASE = re.compile(r"Release <code>(\d+)</code>")
# em deploy's summary: "pack 0.01s · upload 0.12s · build 93.20s · then assigned ...".
_BUILD_SECONDS = re.compile(r"· build ([0-9.]+)s")


def notes_release(body: str) -> int | None:
    found = _NOTES_RELEASE.search(body)
    return int(found.group(1)) if found and NOTES_TITLE in body else None


def copy_example(name: str, root: Path) -> Path:
    """The example as published (every file of it), in a directory of the test's own."""
    app = root / name
    shutil.copytree(REPO / "examples" / name, app)
    return app


def build_deploy(platform, app: Path) -> tuple[str, float, float]:
    """`em deploy` of an app that builds, as a person runs it: the build's output streams to
    its terminal. Returns the whole output, the build's seconds (em's summary) and em's wall
    time; a failure raises with the output."""
    started = time.monotonic()
    proc = platform.em("deploy", str(app), timeout=BUILD_DEPLOY_TIMEOUT_S)
    wall = time.monotonic() - started
    output = proc.stdout + proc.stderr
    print(f"--- em deploy {app.name} ({wall:.1f} s)\n{output}")
    found = _BUILD_SECONDS.search(output)
    assert found, f"no build time in em deploy's summary:\n{output}"
    return output, float(found.group(1)), wall


def serves_page(port: int, host: str, path: str, needle: str) -> bool:
    status, body = get(port, host, path)
    return status == 200 and needle in body


def wait_served(platform, host: str, path: str, needle: str) -> None:
    for name in WEB_SERVERS:
        port = platform.cluster[name].ports[80]
        wait_until(
            f"{name} serves {needle!r} at {host}{path}",
            lambda port=port: serves_page(port, host, path, needle),
            SERVE_TIMEOUT_S,
        )


def mirror_requests(cluster, since: int = 0) -> list[str]:
    """The requests the build node made to the mirror since byte `since` of its access log."""
    log = cluster.mirror_log
    if not log.exists():
        return []
    with open(log) as lines:
        lines.seek(since)
        return [line for line in lines.read().splitlines() if '"GET ' in line]


def mirror_mark(cluster) -> int:
    return cluster.mirror_log.stat().st_size if cluster.mirror_log.exists() else 0


def layers_on(web) -> dict[str, int]:
    """The layers Maestro holds on `web`, by digest, with the inode of each one's directory."""
    out = web.ssh(f"stat -c '%n %i' {STATE_DIR}/layers/* 2>/dev/null || true").stdout
    layers = {}
    for line in out.splitlines():
        path, inode = line.rsplit(" ", 1)
        layers[path.rsplit("/", 1)[1]] = int(inode)
    return layers


def release_dir(app: str, release: int) -> str:
    return f"{STATE_DIR}/apps/{app}/releases/{release}"


def journal_since(web, unit: str, since: float) -> str:
    return web.ssh(f"journalctl -u {unit} -o cat --no-pager --since=@{int(since)}").stdout


def test_the_role_pins_the_uv_the_builder_pins():
    """The maestro role installs uv from a wheel of maestro_build_uv_version; the builder
    looks for px_build::tools::UV_VERSION: they must be the same version."""
    defaults = (REPO / "ansible/roles/maestro/defaults/main.yml").read_text()
    pinned = re.search(r'^maestro_build_uv_version: "([^"]+)"$', defaults, re.M).group(1)
    assert pinned == mirror.uv_version(), (pinned, mirror.uv_version())


def test_the_build_node_has_the_runtimes_the_role_installed_and_the_web_server_none(platform):
    """web-1's runtimes directory holds the copy of its own Python, which runs from there
    with its standard library, ssl and sqlite3 (the builder's relocation check), and the Node
    of the runtime archive, which runs; web-2 has no runtimes directory."""
    builder, server = platform.cluster[BUILDER], platform.cluster[SERVER_ONLY]
    version = builder.ssh("python3 -c 'import platform; print(platform.python_version())'").stdout.strip()
    copy = f"{RUNTIMES_DIR}/python3/{version}"
    prefix = builder.ssh(
        f"{copy}/bin/python3 -I -c 'import sys, ssl, sqlite3, json, encodings; print(sys.prefix)'"
    ).stdout.strip()
    assert prefix == copy, prefix
    node = builder.ssh(f"{RUNTIMES_DIR}/node/{mirror.NODE_VERSION}/bin/node --version").stdout.strip()
    assert node == f"v{mirror.NODE_VERSION}", node
    assert builder.ssh(f"ls {RUNTIMES_DIR}").stdout.split() == ["node", "python3"]
    assert server.ssh(f"test -e {RUNTIMES_DIR}; echo $?").stdout.strip() == "1"


def test_django_notes_builds_on_the_build_node_and_both_web_servers_serve_it(
    platform, tmp_path, vm_timings
):
    """em deploy of examples/django-notes as published: built on web-1 from the mirror, its
    output streamed to em; both web servers serve its page and its whitenoise stylesheet;
    web-2 has no Django and no uv outside the release, runs gunicorn with the release's own
    Python, and the release is hard links into its three layers."""
    cluster = platform.cluster
    builder, server = cluster[BUILDER], cluster[SERVER_ONLY]
    host = platform.host_header("django-notes")
    wait_for_nodes(platform)
    python = builder.ssh(f"ls {RUNTIMES_DIR}/python3").stdout.split()
    assert len(python) == 1, f"{BUILDER}'s runtimes: {python}"

    mark = mirror_mark(cluster)
    output, build_seconds, wall = build_deploy(platform, copy_example("django-notes", tmp_path))
    vm_timings["django-notes cold build on web-1"] = build_seconds
    vm_timings["em deploy django-notes (cold build, then rollout)"] = wall
    assert f"building on {BUILDER}" in output, output
    assert f"Preparing the runtime python3 {python[0]} from {RUNTIMES_DIR}/python3/" in output
    assert "Installing dependencies with uv" in output, output
    assert "collectstatic" in output, output
    # The Procfile's release line ran once, on one node, before the release went live.
    assert "release phase of v" in output and "Applying notes.0001_initial... OK" in output, output
    assert output.count("Applying notes.0001_initial") == 1, output
    # The installer fetched from the mirror: the index, then the wheels.
    fetched = mirror_requests(cluster, mark)
    assert any("/simple/django/" in line for line in fetched), fetched
    assert any("/files/django-" in line.lower() for line in fetched), fetched

    wait_served(platform, host, "/", NOTES_TITLE)
    wait_served(platform, host, *NOTES_STYLESHEET)
    # The Procfile's worker runs once across the cluster, beside gunicorn on each web server.
    rows = wait_until(
        "django-notes' worker running",
        lambda: [
            p
            for p in json.loads(platform.em("--json", "ps", "--app", "django-notes").stdout)
            if p.get("process") == "worker" and p["state"] in ("running", "healthy")
        ],
        SERVE_TIMEOUT_S,
    )
    assert [p["number"] for p in rows] == [1], rows
    status, body = get(server.ports[80], host)
    release = notes_release(body)
    assert status == 200 and release, body[:500]
    here = release_dir("django-notes", release)

    # web-2 builds nothing and installs nothing: no runtimes, no build cache, and no Django,
    # gunicorn or uv anywhere but in the release and the layers it is made of.
    assert server.ssh(f"test -e {RUNTIMES_DIR} || test -e {STATE_DIR}/build-cache; echo $?").stdout.strip() == "1"
    strays = server.ssh(
        f"find / -xdev \\( -path {STATE_DIR}/apps -o -path {STATE_DIR}/layers \\) -prune -o "
        "\\( -iname django -o -iname 'django-*.dist-info' -o -iname gunicorn -o -name uv "
        "-o -name 'uv-*' \\) -print"
    ).stdout.split()
    assert strays == [], f"{SERVER_ONLY} has dependencies outside the release: {strays}"
    assert server.ssh(f"test -d {here}/.px/deps/lib/python3.11/site-packages/django; echo $?").stdout.strip() == "0"

    # gunicorn runs on the release's own Python.
    # The Procfile's command runs under `sh -c`; gunicorn is the Python process it starts.
    # It runs as the app's own uid.
    uid = app_uid(server, "django-notes")
    pids = server.ssh(f"pgrep -u {uid} -f '/bin/gunicorn mysite.wsgi' || true").stdout.split()
    assert pids, server.ssh("ps -eo pid,uid,args").stdout
    for pid in pids:
        exe = server.ssh(f"readlink /proc/{pid}/exe").stdout.strip()
        assert exe.startswith(f"{here}/.px/runtime/bin/python3"), (pid, exe)

    # The release is assembled from its three layers with hard links: the interpreter, an
    # installed package and the app's own code are each the same inode in a layer.
    digests = server.ssh(f"cat {here}/.px/layers").stdout.split()
    assert len(digests) == 3, digests
    for file in (
        f".px/runtime/bin/python{mirror.PYTHON_VERSION}",
        ".px/deps/lib/python3.11/site-packages/django/__init__.py",
        "mysite/settings.py",
    ):
        same = server.ssh(f"find {STATE_DIR}/layers -samefile {here}/{shlex.quote(file)}").stdout.split()
        in_layer = same[0].removeprefix(f"{STATE_DIR}/layers/").split("/")[0] if same else None
        assert len(same) == 1 and in_layer in digests, (file, same, digests)

    # The build node ran it sandboxed: Maestro's log has no warning of a build without one.
    assert "without a sandbox" not in builder.ssh("journalctl -u maestro -o cat --no-pager").stdout


def test_a_code_only_redeploy_reuses_the_dependencies_without_a_failed_request(
    platform, tmp_path, vm_timings
):
    """A template changes: under a polling client on each web server, em deploy rebuilds
    without running the installer (the build log says the dependencies were reused, the
    mirror sees no request), web-2 downloads only the new app layer, and no request fails."""
    cluster = platform.cluster
    server = cluster[SERVER_ONLY]
    host = platform.host_header("django-notes")
    status, body = get(server.ports[80], host)
    before = notes_release(body)
    if status != 200 or before is None:
        pytest.skip("django-notes is not deployed (run with the test before)")
    app = copy_example("django-notes", tmp_path)
    template = app / "notes" / "templates" / "notes" / "home.html"
    template.write_text(template.read_text().replace(NOTES_TITLE, NOTES_CHANGED_TITLE))
    layers_before = layers_on(server)
    since = float(server.ssh("date +%s.%N").stdout)
    mark = mirror_mark(cluster)

    with ExitStack() as running:
        polling = [
            running.enter_context(
                Poller(name, cluster[name].ports[80], host, release_of=notes_release)
            )
            for name in WEB_SERVERS
        ]
        for poller in polling:
            wait_until(
                f"{poller.name}'s poller sees v{before}",
                lambda poller=poller: poller.count(before) >= REQUESTS_PER_STEP,
                SERVE_TIMEOUT_S,
            )
        output, build_seconds, wall = build_deploy(platform, app)
        vm_timings["django-notes code-only redeploy (em deploy under polling)"] = wall
        vm_timings["django-notes code-only rebuild on web-1"] = build_seconds
        after = before + 1
        for poller in polling:
            wait_until(
                f"{poller.name}'s poller sees v{after}",
                lambda poller=poller: poller.count(after) >= REQUESTS_PER_STEP,
                SERVE_TIMEOUT_S,
            )

    assert "Dependencies unchanged" in output, output
    assert "Installing dependencies" not in output, output
    assert mirror_requests(cluster, mark) == [], "the installer ran: it fetched from the mirror"
    for poller in polling:
        print(poller.summary())
        assert poller.failures == [], f"{poller.name}: failed requests: {poller.failures}"
        assert set(poller.seen) == {before, after}, poller.summary()
        first_new = poller.seen.index(after)
        assert before not in poller.seen[first_new:], f"{poller.name} served v{before} after v{after}"
    wait_served(platform, host, "/", NOTES_CHANGED_TITLE)

    # web-2 fetched the app layer alone: its log says so, and only one layer is new on disk
    # while the runtime and dependencies are the very same directories as before.
    assembled = [
        line
        for line in journal_since(server, "maestro", since).splitlines()
        if "assembling a release from its layers" in line and f"releases/{after}" in line
    ]
    assert len(assembled) == 1, assembled
    assert re.search(r"downloading=app [0-9a-f]{12}(\s|$)", assembled[0]), assembled[0]
    layers_after = layers_on(server)
    new = set(layers_after) - set(layers_before)
    assert len(new) == 1, (layers_before, layers_after)
    kept = server.ssh(f"cat {release_dir('django-notes', after)}/.px/layers").stdout.split()
    for digest in kept:
        if digest not in new:
            assert layers_after[digest] == layers_before[digest], f"layer {digest} was fetched again"
