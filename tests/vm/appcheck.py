"""What the scenarios share: the app they deploy (the Python example, each release saying its
number on its page), requests to the web servers from the host, a polling client that records
every answer and failure, and the state of Maestro's unit in a VM."""

from __future__ import annotations

import http.client
import json
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# The app deployed: the stdlib-only example, whose page shows its GREETING, which each release
# sets to its own marker.
EXAMPLE_APP = REPO / "examples" / "python-hello"
APP = "vm-cycle"
WEB_SERVERS = ("web-1", "web-2")
# One request of the polling client (through qemu's forwarding and Maestro's proxy, emulated).
REQUEST_TIMEOUT_S = 15
# Pause between two requests of a polling client to one web server.
POLL_INTERVAL_S = 0.2
# Until a web server serves a release after em said it rolled out (it should be at once).
SERVE_TIMEOUT_S = 60
# Requests a poller must have seen answered before the next step.
REQUESTS_PER_STEP = 5
# A release's first health check under emulation: Python's start-up takes seconds there.
HEALTH_TIMEOUT = "120s"
# Until the Maestros are linked to Beacon: after site.yml started them, or after Beacon came
# back (their reconnect backoff reaches 30 s, plus jitter).
NODES_READY_TIMEOUT_S = 120
# A Maestro restart under systemd: from the restart (asked, or after a kill) to serving again.
RESTART_TIMEOUT_S = 120
WAIT_INTERVAL_S = 1

_MARKER = re.compile(r"vm-cycle release (\d+)\b")


def release_marker(version: int) -> str:
    return f"vm-cycle release {version}"


def make_app(root: Path, version: int) -> Path:
    """The example app, its greeting (shown on its page) saying which release it is."""
    app = root / f"v{version}"
    shutil.copytree(EXAMPLE_APP, app)
    (app / "app.toml").write_text(
        f'name = "{APP}"\n'
        'run = "exec python3 server.py \\"$1\\""\n'
        'runtime = "python3>=3.9"\n'
        "\n[health]\n"
        'path = "/healthz"\n'
        f'timeout = "{HEALTH_TIMEOUT}"\n'
        "\n[http]\n"
        'static = { "/static" = "public" }\n'
        "\n[env]\n"
        f'GREETING = "{release_marker(version)}"\n'
    )
    return app


def get(port: int, host: str, path: str = "/") -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
    try:
        conn.request("GET", path, headers={"Host": host, "Connection": "close"})
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        conn.close()


def release_in(body: str) -> int | None:
    """The release number a page of the app says it is, if any."""
    found = _MARKER.search(body)
    return int(found.group(1)) if found else None


def wait_until(what: str, condition, timeout: float, interval: float = WAIT_INTERVAL_S):
    """Calls condition() until it returns something true; fails naming `what` and the last
    value or error after timeout."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            last = condition()
            if last:
                return last
        except Exception as err:  # noqa: BLE001 - the last error goes into the failure
            last = err
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:.0f} s (last: {last!r})")
        time.sleep(interval)


def serves(port: int, host: str, version: int) -> bool:
    status, body = get(port, host)
    return status == 200 and release_in(body) == version


@dataclass
class Poller:
    """Polls one web server from the host in a thread: which release answered each request,
    and every failed one (an error, a refused connection, a status other than 200).
    `release_of` reads the release from a page (the deployed app's by default)."""

    name: str
    port: int
    host: str
    release_of: Callable[[str], int | None] = release_in
    seen: list[int] = field(default_factory=list)  # release of each answered request
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def run(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                status, body = get(self.port, self.host)
                release = self.release_of(body)
                if status != 200:
                    self.failures.append(f"{status}: {body[:200]}")
                elif release is None:
                    self.failures.append(f"200 from no known release: {body[:200]}")
                else:
                    self.seen.append(release)
            except Exception as err:  # noqa: BLE001 - every failure counts
                self.failures.append(
                    f"{type(err).__name__}: {err} after {time.monotonic() - started:.1f} s"
                )
            self.stop.wait(POLL_INTERVAL_S)

    def __enter__(self) -> Poller:
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self.stop.set()
        if self.thread:
            self.thread.join(REQUEST_TIMEOUT_S + 1)

    def count(self, version: int) -> int:
        return self.seen.count(version)

    def wait_served(self, at_least: int, timeout: float = SERVE_TIMEOUT_S) -> None:
        """Until `at_least` requests in all were answered by the app."""
        wait_until(
            f"{self.name} answers {at_least} requests",
            lambda: len(self.seen) >= at_least,
            timeout,
        )

    def summary(self) -> str:
        releases = sorted(set(self.seen))
        return (
            f"{self.name}: {len(self.seen)} requests answered by release(s) {releases}, "
            f"{len(self.failures)} failed"
        )


def pollers(platform) -> list[Poller]:
    """One poller per web server, for the deployed app."""
    host = platform.host_header(APP)
    return [Poller(name, platform.cluster[name].ports[80], host) for name in WEB_SERVERS]


def deploy(platform, app_dir: Path, *flags: str) -> dict:
    proc = platform.em("--json", "deploy", *flags, str(app_dir))
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["app"] == APP, result
    return result


def wait_for_nodes(platform, timeout: float = NODES_READY_TIMEOUT_S) -> None:
    """Both Maestros linked to Beacon, as em status shows them."""

    def linked():
        nodes = json.loads(platform.em("--json", "status").stdout)["nodes"]
        connected = {n["name"] for n in nodes if str(n.get("health")).lower() == "connected"}
        return connected >= set(WEB_SERVERS) and nodes

    wait_until("both web servers in em status", linked, timeout)


def current_release(platform) -> int:
    """The release both web servers serve now; skips the scenario when none is deployed (run
    it with the deploy test first)."""
    host = platform.host_header(APP)
    releases = set()
    for name in WEB_SERVERS:
        status, body = get(platform.cluster[name].ports[80], host)
        releases.add(release_in(body) if status == 200 else None)
    if None in releases:
        pytest.skip(f"{APP} is not deployed (run with test_deploy_cycle.py first)")
    assert len(releases) == 1, f"the web servers serve different releases: {releases}"
    return releases.pop()


def main_pid(web) -> int:
    """Maestro's process in the VM (0 when the unit is not running)."""
    return int(web.ssh("systemctl show -p MainPID --value maestro").stdout.strip())


def restarts(web) -> int:
    """How many times systemd restarted maestro.service since it was started."""
    return int(web.ssh("systemctl show -p NRestarts --value maestro").stdout.strip())


def app_uid(web, app: str = APP) -> int:
    """The uid `app`'s processes run as on `web` (Maestro's `app-uids.json`)."""
    uids = json.loads(web.ssh("cat /var/lib/platformx/maestro/app-uids.json").stdout)
    return int(uids["apps"][app])


def app_pids(web) -> set[int]:
    """The processes of the deployed app (its Python servers) in the VM, which run as the app's
    own uid."""
    out = web.ssh(f"pgrep -u {app_uid(web)} -f 'server.py' || true").stdout
    return {int(pid) for pid in out.split()}


def cgroup_of(web, pid: int) -> str:
    return web.ssh(f"cat /proc/{pid}/cgroup").stdout.strip()
