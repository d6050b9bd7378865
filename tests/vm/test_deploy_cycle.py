"""The full cycle on the VM cluster: the real ansible/site.yml provisions it (the `platform`
fixture), the host's em deploys a Python app, and both web servers switch from one release to
the next without failing a request."""

from __future__ import annotations

import http.client
import json
import shutil
import threading
import time
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
# Requests a poller must have seen answered by a release before the next step.
REQUESTS_PER_RELEASE = 5
# A release's first health check under emulation: Python's start-up takes seconds there.
HEALTH_TIMEOUT = "120s"
# Until the Maestros are linked to Beacon after site.yml started them.
NODES_READY_TIMEOUT_S = 120
WAIT_INTERVAL_S = 1


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
    return status == 200 and release_marker(version) in body


@dataclass
class Poller:
    """Polls one web server from the host in a thread: which release answered each request,
    and every failed one (an error, a refused connection, a status other than 200)."""

    name: str
    port: int
    host: str
    seen: list[int] = field(default_factory=list)  # release of each answered request
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                status, body = get(self.port, self.host)
                if status != 200:
                    self.failures.append(f"{status}: {body[:200]}")
                elif release_marker(1) in body:
                    self.seen.append(1)
                elif release_marker(2) in body:
                    self.seen.append(2)
                else:
                    self.failures.append(f"200 from no known release: {body[:200]}")
            except Exception as err:  # noqa: BLE001 - every failure counts
                self.failures.append(f"{type(err).__name__}: {err} after {time.monotonic() - started:.1f} s")
            self.stop.wait(POLL_INTERVAL_S)

    def count(self, version: int) -> int:
        return self.seen.count(version)


def deploy(platform, app_dir: Path) -> dict:
    proc = platform.em("--json", "deploy", str(app_dir))
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["app"] == APP, result
    assert result["rolled_out"] is True, result
    return result


def wait_for_nodes(platform) -> None:
    """Both Maestros linked to Beacon, as em status shows them."""

    def linked():
        nodes = json.loads(platform.em("--json", "status").stdout)["nodes"]
        connected = {n["name"] for n in nodes if str(n.get("health")).lower() == "connected"}
        return connected >= set(WEB_SERVERS) and nodes

    wait_until("both web servers in em status", linked, NODES_READY_TIMEOUT_S)


def test_site_yml_starts_every_service(platform):
    """apprepo and Beacon run on control, Maestro (socket-activated, as px-maestro) on each web
    server; the times of the two site.yml runs are in the summary."""
    cluster = platform.cluster
    for unit in ("apprepo.service", "beacon.service"):
        assert cluster["control"].ssh(f"systemctl is-active {unit}").stdout.strip() == "active"
    for name in WEB_SERVERS:
        web = cluster[name]
        for unit in ("maestro-http.socket", "maestro.service"):
            state = web.ssh(f"systemctl is-active {unit}").stdout.strip()
            assert state == "active", (name, unit, state)
        user = web.ssh("ps -o user= -p $(systemctl show -p MainPID --value maestro)").stdout
        assert user.strip() == "px-maestro", (name, user)
    for what, seconds in platform.timings.items():
        print(f"{what}: {seconds:.1f} s")


def test_deploy_switches_both_web_servers_without_a_failed_request(platform, tmp_path, vm_timings):
    cluster = platform.cluster
    host = platform.host_header(APP)
    ports = {name: cluster[name].ports[80] for name in WEB_SERVERS}
    wait_for_nodes(platform)

    started = time.monotonic()
    first = deploy(platform, make_app(tmp_path, 1))
    vm_timings["em deploy v1 (first release)"] = time.monotonic() - started
    print(f"em deploy v1: {json.dumps(first['seconds'])}")
    for name, port in ports.items():
        wait_until(f"{name} serves v1", lambda port=port: serves(port, host, 1), SERVE_TIMEOUT_S)

    pollers = [Poller(name, port, host) for name, port in ports.items()]
    threads = [threading.Thread(target=poller.run, daemon=True) for poller in pollers]
    for thread in threads:
        thread.start()
    try:
        for poller in pollers:
            wait_until(
                f"{poller.name}'s poller sees v1",
                lambda poller=poller: poller.count(1) >= REQUESTS_PER_RELEASE,
                SERVE_TIMEOUT_S,
            )
        started = time.monotonic()
        second = deploy(platform, make_app(tmp_path, 2))
        vm_timings["em deploy v2 (under polling)"] = time.monotonic() - started
        print(f"em deploy v2 in {vm_timings['em deploy v2 (under polling)']:.1f} s: {json.dumps(second['seconds'])}")
        assert second["release"] == first["release"] + 1, (first, second)
        for poller in pollers:
            wait_until(
                f"{poller.name}'s poller sees v2",
                lambda poller=poller: poller.count(2) >= REQUESTS_PER_RELEASE,
                SERVE_TIMEOUT_S,
            )
    finally:
        for poller in pollers:
            poller.stop.set()
        for thread in threads:
            thread.join(REQUEST_TIMEOUT_S + 1)

    for poller in pollers:
        print(f"{poller.name}: {len(poller.seen)} requests, {poller.count(1)} v1 then {poller.count(2)} v2, {len(poller.failures)} failed")
        assert poller.failures == [], f"{poller.name}: failed requests: {poller.failures}"
        assert poller.count(1) >= REQUESTS_PER_RELEASE and poller.count(2) >= REQUESTS_PER_RELEASE
        # Once a web server has switched, every new request goes to v2.
        first_v2 = poller.seen.index(2)
        assert 1 not in poller.seen[first_v2:], f"{poller.name} served v1 after v2: {poller.seen}"
    # The app runs on each web server as px-maestro, Maestro's user.
    for name in WEB_SERVERS:
        procs = cluster[name].ssh("ps -u px-maestro -o args=").stdout
        assert "server.py" in procs, (name, procs)


# A Maestro restart under systemd: from `systemctl restart` to the unit active again.
RESTART_TIMEOUT_S = 120


def current_release(platform) -> int:
    """The release both web servers serve now (the deploy test leaves v2)."""
    host = platform.host_header(APP)
    for version in (2, 1):
        if all(serves(platform.cluster[name].ports[80], host, version) for name in WEB_SERVERS):
            return version
    pytest.skip(f"{APP} is not deployed (run with the deploy test first)")


def test_maestro_restart_refuses_no_connection(platform):
    """(b) `systemctl restart maestro` on web-1 under a polling client: the socket stays with
    systemd, so requests wait instead of failing, and the app is served again after it."""
    cluster = platform.cluster
    web = cluster["web-1"]
    version = current_release(platform)
    pid_before = web.ssh("systemctl show -p MainPID --value maestro").stdout.strip()
    poller = Poller("web-1", web.ports[80], platform.host_header(APP))
    thread = threading.Thread(target=poller.run, daemon=True)
    thread.start()
    try:
        wait_until("poller sees the app", lambda: poller.count(version) >= REQUESTS_PER_RELEASE, SERVE_TIMEOUT_S)
        served_before = len(poller.seen)
        web.ssh("systemctl restart maestro", timeout=RESTART_TIMEOUT_S)
        assert web.ssh("systemctl is-active maestro").stdout.strip() == "active"
        pid_after = web.ssh("systemctl show -p MainPID --value maestro").stdout.strip()
        assert pid_after != pid_before, "maestro was not restarted"
        wait_until(
            "the app is served again after the restart",
            lambda: len(poller.seen) >= served_before + REQUESTS_PER_RELEASE,
            SERVE_TIMEOUT_S,
        )
    finally:
        poller.stop.set()
        thread.join(REQUEST_TIMEOUT_S + 1)
    print(f"web-1 during the restart: {len(poller.seen)} requests, {len(poller.failures)} failed")
    assert poller.failures == [], poller.failures
    assert set(poller.seen) == {version}
