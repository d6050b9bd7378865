"""A release installed by version, then the cluster rolled to the next version under load: what
`terraform apply` does with `release_version` (it runs scripts/provision with
`--release-version` and `--release-url`). The host publishes two release tarballs over HTTP,
as an operator publishes what scripts/dist made; the cluster, provisioned from the local build
by the platform fixture, is rolled to version B by scripts/provision while a client polls the
app on both web servers, and every host must end up running B's binaries with no failed
request. (Installing A first, then B, would show the same path twice and cost the tier minutes
of copying and unpacking under emulation: B's binaries differ from the running build's as much
as from A's.)

Release A is scripts/dist's tarball of the working tree (the debug profile the tier builds).
Release B is A repacked under the next version number, each binary given one more ELF section
that names B (not loaded at run time): its bytes differ, so every service is restarted onto
it, and the run's checksums tell A's binaries from B's. What changed inside a release does not
change the upgrade path (the same fetch, check, copy, unpack, install, restart, one web server
at a time), and building the tree twice would cost the tier minutes of compiling.

The tarballs are fetched by the machine running Ansible (here the host, on its loopback), not
by the hosts, so the VMs need no route to the server. The scenario leaves the cluster on B:
the later site.yml runs (`Platform.site_yml`) install B from the controller's cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import pytest

import vm
from appcheck import (
    REQUESTS_PER_STEP,
    SERVE_TIMEOUT_S,
    current_release,
    pollers,
    wait_for_nodes,
    wait_until,
)
from conftest import ANSIBLE_OUTPUT_TAIL_LINES, REPO, TARGET_DIR, play_recap, provision

# Building release A: scripts/dist's cargo build (up to date after the platform fixture's own,
# so seconds), stripping and packing.
DIST_TIMEOUT_S = 30 * 60
# Until the host's HTTP server answers.
SERVER_START_TIMEOUT_S = 10
# What each host runs of a release, by Ansible group: the binaries whose checksums are checked.
BINARIES = {"control": ("apprepo", "beacon"), "web-1": ("maestro",), "web-2": ("maestro",)}
# The ELF section that makes B's binaries differ from A's (objcopy adds it, nothing loads it).
RELEASE_SECTION = ".platformx.release"
_DIST_NAME = re.compile(r"^platformx-(\d+)\.(\d+)\.(\d+)-(.+)\.tar\.gz$")


def dist(out: Path) -> tuple[str, str, Path]:
    """scripts/dist's tarball of the working tree, debug profile: (version, target, path)."""
    subprocess.run(
        ["nice", str(REPO / "scripts" / "dist"), "--profile", "debug", "--out", str(out)],
        cwd=REPO,
        check=True,
        timeout=DIST_TIMEOUT_S,
        env={**os.environ, "CARGO_TARGET_DIR": str(TARGET_DIR)},
    )
    (tarball,) = out.glob("platformx-*.tar.gz")
    match = _DIST_NAME.match(tarball.name)
    assert match, f"scripts/dist made {tarball.name}, not platformx-<version>-<target>.tar.gz"
    major, minor, patch, target = match.groups()
    assert (out / f"{tarball.name}.sha256").is_file(), f"scripts/dist wrote no {tarball.name}.sha256"
    return f"{major}.{minor}.{patch}", target, tarball


def repack(tarball: Path, version: str, target: str, out: Path, scratch: Path) -> Path:
    """`tarball` under another version: its directory renamed, each binary given an ELF section
    naming `version`; with its .sha256 beside it, as scripts/dist writes them."""
    scratch.mkdir(parents=True)
    subprocess.run(["tar", "--extract", "--file", str(tarball), "--directory", str(scratch)], check=True, timeout=300)
    (top,) = scratch.iterdir()
    name = f"platformx-{version}-{target}"
    top = top.rename(scratch / name)
    marker = scratch / "release-marker"
    marker.write_text(f"platformx {version}\n")
    for binary in (top / "bin").iterdir():
        subprocess.run(
            ["objcopy", "--add-section", f"{RELEASE_SECTION}={marker}", str(binary)],
            check=True,
            timeout=120,
        )
    repacked = out / f"{name}.tar.gz"
    subprocess.run(
        ["tar", "--create", "--gzip", "--sort=name", "--owner=0", "--group=0", "--numeric-owner",
         "--file", str(repacked), "--directory", str(scratch), name],
        check=True,
        timeout=300,
    )  # fmt: skip
    digest = hashlib.sha256(repacked.read_bytes()).hexdigest()
    (out / f"{repacked.name}.sha256").write_text(f"{digest}  {repacked.name}\n")
    return repacked


def binary_sums(tarball: Path) -> dict[str, str]:
    """name -> SHA-256 of each binary under bin/ in a release tarball."""
    sums = {}
    with tarfile.open(tarball) as archive:
        for member in archive.getmembers():
            parts = Path(member.name).parts
            if len(parts) == 3 and parts[1] == "bin" and member.isfile():
                sums[parts[2]] = hashlib.sha256(archive.extractfile(member).read()).hexdigest()
    return sums


def running_sums(cluster) -> dict[tuple[str, str], tuple[str, str]]:
    """(VM, binary) -> (SHA-256 of /usr/bin/<binary>, SHA-256 of its running process's
    executable): the second is the process systemd runs now, which a replaced file does not
    change until the service restarts."""
    sums = {}
    for name, binaries in BINARIES.items():
        for binary in binaries:
            out = cluster[name].ssh(
                f"pid=$(systemctl show -p MainPID --value {binary}); "
                f"sha256sum /usr/bin/{binary} /proc/$pid/exe | cut -d' ' -f1"
            ).stdout.split()
            sums[(name, binary)] = (out[0], out[1])
    return sums


class ReleaseServer:
    """python's http.server on the host's loopback, serving a directory: the operator's
    release site. Its access log tells which files were fetched, and how often."""

    def __init__(self, root: Path, log: Path):
        self.root = root
        self.log = log
        self.port = vm.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> ReleaseServer:
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                ["python3", "-m", "http.server", str(self.port), "--bind", "127.0.0.1",
                 "--directory", str(self.root)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        wait_until(
            "the release server answers",
            lambda: urllib.request.urlopen(self.url + "/", timeout=2).status == 200,
            SERVER_START_TIMEOUT_S,
            interval=0.2,
        )
        return self

    def __exit__(self, *_exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)

    def fetches(self, name: str) -> int:
        """How many times `name` was fetched (answered 200)."""
        return len(re.findall(rf'"GET /{re.escape(name)} HTTP/[0-9.]+" 200', self.log.read_text()))


@pytest.fixture(scope="module")
def releases(platform, tmp_path_factory: pytest.TempPathFactory):
    """Release A (scripts/dist) and B (A repacked as the next patch version), published by a
    server on the host: (server, [(version, tarball), ...])."""
    workdir = tmp_path_factory.mktemp("releases")
    site = workdir / "site"
    site.mkdir()
    version_a, target, tarball_a = dist(site)
    major, minor, patch = version_a.split(".")
    version_b = f"{major}.{minor}.{int(patch) + 1}"
    tarball_b = repack(tarball_a, version_b, target, site, workdir / "repack")
    with ReleaseServer(site, workdir / "release-server.log") as server:
        yield server, target, [(version_a, tarball_a), (version_b, tarball_b)]


def test_a_release_installed_by_version_rolls_to_the_next_without_a_failed_request(
    platform, releases, vm_timings, vm_figures
):
    """scripts/provision --release-version B under a poller on both web servers: every host
    runs B's binaries (the file and the running process), the tarball and its .sha256 were
    fetched once for the three hosts, and no request failed. The seconds of the upgrade and its
    failed requests go to the summary."""
    cluster = platform.cluster
    server, target, published = releases
    app_release = current_release(platform)  # skips when nothing is deployed
    wait_for_nodes(platform)
    inventory = cluster.workdir / "hosts.yml"
    # The controller's release cache of this run, not the user's: versions repeat across runs.
    controller_cache = cluster.workdir / "controller-releases"
    release_vars = {"platformx_release_download_dir": str(controller_cache)}
    # The binaries' checksums of each version, which the hosts must run once it is installed.
    expected = {version: binary_sums(tarball) for version, tarball in published}
    assert expected[published[0][0]]["maestro"] != expected[published[1][0]]["maestro"], expected

    # The running build's binaries are not B's either: the upgrade restarts every service.
    for version, tarball in published[1:]:
        site_vars = {**platform.site_vars, **release_vars}
        extra_vars = cluster.workdir / f"site-vars-release-{version}.json"
        extra_vars.write_text(json.dumps(site_vars, indent=2) + "\n")
        with ExitStack() as running:
            polling = [running.enter_context(poller) for poller in pollers(platform)]
            for poller in polling:
                poller.wait_served(REQUESTS_PER_STEP)
            started = time.monotonic()
            proc = provision(
                cluster,
                inventory,
                ["--release-version", version, "--release-url", server.url],
                extra_vars,
                "1",
            )
            seconds = time.monotonic() - started
            (cluster.workdir / f"site-release-{version}.log").write_text(proc.stdout + proc.stderr)
            # A few more answers from each web server after the last restart.
            for poller in polling:
                seen = len(poller.seen)
                poller.wait_served(seen + REQUESTS_PER_STEP, SERVE_TIMEOUT_S)
        failures = [failure for poller in polling for failure in poller.failures]
        what = "release upgrade by version"
        print(f"scripts/provision --release-version {version}: {seconds:.1f} s; "
              + "; ".join(poller.summary() for poller in polling))  # fmt: skip
        vm_timings[f"{what} ({version}, scripts/provision, web servers one at a time)"] = seconds
        polled = sum(len(poller.seen) + len(poller.failures) for poller in polling)
        vm_figures[f"{what} ({version}): failed requests"] = f"{len(failures)} of {polled} polled"

        recap = play_recap(proc.stdout)
        assert set(recap) == set(BINARIES), proc.stdout[-3000:]
        assert all(counts["failed"] == 0 for counts in recap.values()), recap
        sums = running_sums(cluster)
        wrong = {
            where: got
            for where, got in sums.items()
            if got != (expected[version][where[1]],) * 2
        }
        assert not wrong, (
            f"hosts not running {version}'s binaries (file, process): {wrong}; "
            f"expected {expected[version]}\n"
            + "\n".join(proc.stdout.splitlines()[-ANSIBLE_OUTPUT_TAIL_LINES:])
        )
        for poller in polling:
            assert poller.failures == [], f"{poller.name}: failed requests during {version}: {poller.failures}"
            assert set(poller.seen) == {app_release}, poller.summary()
        # Fetched once for the three hosts, and kept on the controller with its checksum.
        name = tarball.name
        assert (server.fetches(name), server.fetches(f"{name}.sha256")) == (1, 1), server.log.read_text()
        cached = controller_cache / version / name
        assert cached.read_bytes() == tarball.read_bytes(), f"{cached} is not the published {name}"
        assert (controller_cache / version / f"{name}.sha256").is_file()
        assert not list((controller_cache / version).glob("*.part")), list((controller_cache / version).iterdir())

    # The operator's inventory now names B: the later site.yml runs install it (from the
    # controller's cache, as the server is gone by then) rather than the local build.
    version_b = published[-1][0]
    platform.site_vars.update(
        release_vars,
        platformx_release_version=version_b,
        platformx_release_url=server.url,
        platformx_release_target=target,
    )


def test_a_tarball_that_does_not_match_its_checksum_is_refused_and_not_kept(platform, releases):
    """A published version whose .sha256 names other bytes: site.yml stops on the controller,
    before any host is changed, saying so, and keeps no file of it."""
    cluster = platform.cluster
    server, target, published = releases
    version, tarball = published[-1]
    bad_version = f"{version}-bad"
    name = f"platformx-{bad_version}-{target}.tar.gz"
    shutil.copyfile(tarball, server.root / name)
    (server.root / f"{name}.sha256").write_text(f"{'0' * 64}  {name}\n")
    controller_cache = cluster.workdir / "controller-releases"
    before = running_sums(cluster)
    with pytest.raises(AssertionError) as refused:
        platform.site_yml(
            "release-bad-checksum",
            platformx_release_version=bad_version,
            platformx_release_url=server.url,
            platformx_release_target=target,
            platformx_release_download_dir=str(controller_cache),
        )
    message = str(refused.value)
    assert "does not match the SHA-256 published in" in message, message
    assert list((controller_cache / bad_version).iterdir()) == [], list((controller_cache / bad_version).iterdir())
    assert running_sums(cluster) == before
