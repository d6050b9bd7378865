"""Losing a control host: two control VMs, each running apprepo and Beacon over one S3 server
(SeaweedFS on the host, reached through the control VMs' guestfwd rule, seaweed.py), one
Beacon active and the other standing by. The active one's host vanishes in the middle of a
rollout; the rollout completes through the other, an upload goes through the other apprepo,
and once the host is back its Beacon steps down and nothing is duplicated. Runs last
(conftest.MODULE_ORDER): it moves apprepo's storage to S3, so the apps deployed before are gone
from it, and it boots a second control VM of its own for this module only.

The control host vanishes as power loss, a hung kernel or a cut network makes one vanish: its
VM's CPUs are stopped (qemu's `stop`, vm.Vm.pause), so its peers get silence, no FIN and no
RST, and must notice it by their unanswered heartbeats. qemu keeps running, so `cont` brings the
same guest back with the same forwarded ports (which em and the Beacons' API URLs use from the
host), its clocks having stood still: to it, no time passed, and only its lease's renewal
tells it another Beacon took over.
"""

from __future__ import annotations

import copy
import os
import http.client
import json
import re
import ssl
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

import seaweed
import vm
from appcheck import (
    EXAMPLE_APP,
    HEALTH_TIMEOUT,
    REQUESTS_PER_STEP,
    SERVE_TIMEOUT_S,
    WEB_SERVERS,
    Poller,
    get,
    wait_until,
)
from conftest import CLUSTER, EM_TIMEOUT_S, GROUPS, SCRATCH_PORT, SITE_PLAYBOOK, _site_env, write_inventory

# The second control VM: its LAN address and the guest ports the host reaches.
SECOND_CONTROL = ("control-2", "10.77.0.13", (7070, 7080, 7443, SCRATCH_PORT))
CONTROLS = ("control", SECOND_CONTROL[0])
APP = "vm-failover"
# The app waits this long before it starts serving, so a rollout lasts long enough under
# emulation for the active Beacon to be lost in the middle of it.
APP_START_DELAY_S = 10
# Until one of the two Beacons holds the lease after site.yml started both, or the other
# takes it after the active one is lost (its ttl is 6 s; Beacon starts slowly under emulation).
ACTIVE_TIMEOUT_S = 120
# Until a release committed by `em deploy` shows in apprepo's list (an upload under emulation).
COMMIT_TIMEOUT_S = 180
# Until the Maestros are linked again, to the new active Beacon.
RELINK_TIMEOUT_S = 120
# One HTTPS call from the host to a control VM's API.
API_TIMEOUT_S = 15
# From the lost host's return until its Beacon has found its lease taken and stands by: its
# next renewal (a third of the 6 s TTL), its exit, and systemd starting it again, under emulation.
STEP_DOWN_TIMEOUT_S = 120
# What the returning Beacon logs when it finds the lease another's (crates/beacon/src/lease.rs).
STEPPING_DOWN = "stepping down"
# What a Beacon logs when it takes a Maestro's link (crates/beacon/src/links.rs): an active one.
MAESTRO_LINKED = "maestro linked"

_MARKER = re.compile(rf"{APP} release (\d+)\b")


def release_in(body: str) -> int | None:
    found = _MARKER.search(body)
    return int(found.group(1)) if found else None


def make_app(root: Path, version: int) -> Path:
    """The example app, slow to start, its page saying which release it is."""
    app = root / f"failover-v{version}"
    subprocess.run(["cp", "-r", str(EXAMPLE_APP), str(app)], check=True)
    (app / "app.toml").write_text(
        f'name = "{APP}"\n'
        f'run = "sleep {APP_START_DELAY_S}; exec python3 server.py \\"$1\\""\n'
        'runtime = "python3>=3.9"\n'
        "\n[health]\n"
        'path = "/healthz"\n'
        f'timeout = "{HEALTH_TIMEOUT}"\n'
        "\n[env]\n"
        f'GREETING = "{APP} release {version}"\n'
    )
    return app


class ControlPlane:
    """The two control VMs as the host reaches them: their Beacons' and apprepos' URLs, the
    cluster CA and em's token, and em configured for a chosen apprepo."""

    def __init__(self, platform, vms: dict[str, vm.Vm]):
        self.platform = platform
        self.vms = vms
        secrets = platform.cluster.workdir / ".secrets"
        self.ca_file = secrets / "ca.pem"
        self.token = (secrets / "tokens" / "em-deploy").read_text().strip()
        self.tls = ssl.create_default_context(cafile=str(self.ca_file))
        # The control VM paused by the scenario, until it resumes it, and where its journal
        # ended just before.
        self.paused: tuple[str, str] | None = None

    def beacon_url(self, name: str) -> str:
        return f"https://127.0.0.1:{self.vms[name].ports[7080]}"

    def apprepo_url(self, name: str) -> str:
        return f"https://127.0.0.1:{self.vms[name].ports[7070]}"

    def call(self, name: str, path: str) -> tuple[int, dict, str]:
        """GET `path` on `name`'s Beacon API, no redirect followed: status, headers, body."""
        conn = http.client.HTTPSConnection(
            "127.0.0.1", self.vms[name].ports[7080], timeout=API_TIMEOUT_S, context=self.tls
        )
        try:
            conn.request("GET", path, headers={"Authorization": f"Bearer {self.token}"})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read().decode(errors="replace")
        finally:
            conn.close()

    def active_status(self, name: str) -> int | None:
        """What `name`'s /v1/health/active answers (200 active, 503 standby), None when its
        Beacon does not answer."""
        try:
            return self.call(name, "/v1/health/active")[0]
        except OSError:
            return None

    def the_active(self) -> str | None:
        """The one control VM whose Beacon is active while the other is a standby, else None."""
        statuses = {name: self.active_status(name) for name in CONTROLS}
        active = [name for name, status in statuses.items() if status == 200]
        return active[0] if len(active) == 1 else None

    def em_via(self, apprepo: str):
        """The platform's em, its config the pki role's (every Beacon URL) with `remote` the
        apprepo of `apprepo`: as an API load balancer would send em to a live one."""
        home = self.platform.cluster.workdir / f"em-via-{apprepo}"
        (home / "em").mkdir(parents=True, exist_ok=True, mode=0o700)
        config = (self.platform.cluster.workdir / ".secrets" / "em-config.toml").read_text()
        config = re.sub(r'(?m)^remote = ".*"$', f'remote = "{self.apprepo_url(apprepo)}"', config)
        (home / "em" / "config.toml").write_text(config)
        (home / "em" / "config.toml").chmod(0o600)
        via = copy.copy(self.platform)
        via.em_config_home = home
        return via


@pytest.fixture(scope="module")
def two_controls(platform, tmp_path_factory, vm_timings):
    """SeaweedFS on the host, a second control VM, and site.yml run with both control VMs over
    S3: returns the ControlPlane once one Beacon is active and both Maestros are linked."""
    cluster = platform.cluster
    s3 = seaweed.start(cluster.workdir / "seaweed", cluster.s3_port)
    name, ip, ports = SECOND_CONTROL
    hosts = {vm_name: vm_ip for vm_name, vm_ip, _ in CLUSTER} | {name: ip}
    first = cluster["control"]
    second = vm.Vm(
        name,
        ip,
        image=first.image,
        lan=cluster.lan,
        workdir=cluster.workdir,
        hosts=hosts,
        guest_ports=ports,
        guest_forwards=(seaweed.guestfwd(cluster.s3_port),),
        accel=first.accel,
        keep=first.keep,
    )
    try:
        started = time.monotonic()
        second.start()
        second.wait_ready()
        vm_timings["second control VM booted"] = time.monotonic() - started
        vms = {**cluster.vms, name: second}
        controls = ControlPlane(platform, vms)
        # Both control VMs in `repository` and `beacon`, each Beacon with its API URL as the
        # host reaches it (`beacon_api_url`, where the standby redirects em).
        inventory = cluster.workdir / "inventory-failover.ini"
        write_inventory(
            inventory,
            vms,
            {**GROUPS, "repository": CONTROLS, "beacon": CONTROLS},
            {c: {"beacon_api_url": controls.beacon_url(c)} for c in CONTROLS},
        )
        site_vars = {
            **platform.site_vars,
            # apprepo on both control VMs over the one bucket (seaweed.py's credentials).
            "platformx_s3_bucket": seaweed.BUCKET,
            "platformx_s3_region": seaweed.REGION,
            "apprepo_s3_endpoint": f"http://{seaweed.S3_IP}:{seaweed.S3_PORT}",
            "apprepo_s3_path_style": True,
            "apprepo_s3_access_key_id": seaweed.ACCESS_KEY,
            "apprepo_s3_secret_access_key": seaweed.SECRET_KEY,
            # em tries both Beacons, as the host reaches them.
            "pki_em_beacon_urls": [controls.beacon_url(c) for c in CONTROLS],
        }
        extra_vars = cluster.workdir / "site-vars-failover.json"
        extra_vars.write_text(json.dumps(site_vars, indent=2) + "\n")
        started = time.monotonic()
        two = copy.copy(cluster)
        two.inventory = inventory
        two.ansible_playbook(
            SITE_PLAYBOOK, "-e", f"@{extra_vars}", env=_site_env(), log=cluster.workdir / "site-failover.log"
        )
        vm_timings["site.yml with two control hosts"] = time.monotonic() - started
        wait_until("one Beacon active, the other standing by", controls.the_active, ACTIVE_TIMEOUT_S)
        wait_for_nodes(controls.em_via("control"))
        yield controls
    finally:
        # A host left paused by a failed test runs again, so the session's VMs end as they began.
        if first.running:
            first.resume()
        second.kill()
        s3.stop()


def wait_for_nodes(platform, timeout: float = RELINK_TIMEOUT_S) -> None:
    def linked():
        nodes = json.loads(platform.em("--json", "status").stdout)["nodes"]
        connected = {n["name"] for n in nodes if str(n.get("health")).lower() == "connected"}
        return connected >= set(WEB_SERVERS) and nodes

    wait_until("both web servers linked to the active Beacon", linked, timeout)


def deploy(platform, app_dir: Path) -> dict:
    proc = platform.em("--json", "deploy", str(app_dir))
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["app"] == APP, result
    return result


def releases(platform) -> list[int]:
    listed = json.loads(platform.em("--json", "releases", "--app", APP).stdout)
    return [r["version"] for r in listed]


def pollers(platform) -> list[Poller]:
    host = f"{APP}.{platform.domain}"
    return [Poller(name, platform.cluster[name].ports[80], host, release_in) for name in WEB_SERVERS]


def serves(platform, name: str, version: int) -> bool:
    status, body = get(platform.cluster[name].ports[80], f"{APP}.{platform.domain}")
    return status == 200 and release_in(body) == version


def beacon_log_since(machine: vm.Vm, cursor: str) -> str:
    """Beacon's journal on `machine` after the journal cursor `cursor`."""
    return machine.ssh(f"journalctl -u beacon --no-pager -o cat --after-cursor='{cursor}'").stdout


def journal_cursor(machine: vm.Vm) -> str:
    """Where `machine`'s journal ends now."""
    out = machine.ssh("journalctl -n 0 --show-cursor --no-pager").stdout
    return out.strip().rsplit("-- cursor: ", 1)[-1].strip()


def test_both_control_hosts_run_apprepo_and_beacon_one_active(platform, two_controls, tmp_path):
    """site.yml with two control VMs: apprepo and Beacon run on both, one Beacon answers 200 on
    /v1/health/active and the other 503 and redirects /v1/ calls to it; the Maestros list both
    Beacons; v1 of the app deploys and both web servers serve it."""
    controls = two_controls
    for name in CONTROLS:
        for unit in ("apprepo", "beacon"):
            state = controls.vms[name].ssh(f"systemctl is-active {unit}", check=False).stdout.strip()
            assert state == "active", (name, unit, state)
    active = controls.the_active()
    standby = next(name for name in CONTROLS if name != active)
    assert controls.active_status(standby) == 503, standby
    status, headers, body = controls.call(standby, "/v1/apps")
    assert status == 307, (status, body)
    assert headers.get("location", headers.get("Location", "")).startswith(controls.beacon_url(active)), headers
    for name in WEB_SERVERS:
        config = controls.vms[name].ssh("cat /etc/platformx/maestro.toml").stdout
        assert "addrs = " in config and "10.77.0.10:7443" in config and "10.77.0.13:7443" in config, config

    first = deploy(controls.em_via(active), make_app(tmp_path, 1))
    assert first["rolled_out"] is True and first["release"] == 1, first
    for name in WEB_SERVERS:
        wait_until(f"{name} serves v1", lambda name=name: serves(platform, name, 1), SERVE_TIMEOUT_S)


def test_the_rollout_completes_through_the_other_beacon_and_uploads_go_through_the_other_apprepo(
    platform, two_controls, tmp_path, vm_timings
):
    """em deploy v2; once its release is committed, the active control host vanishes (its VM
    paused). The other Beacon takes the lease, the Maestros notice the silence and link to it,
    and the rollout completes: em deploy exits 0 and both web servers serve v2, with no failed
    request. Then, the host still gone, em deploy v3 uploads through the other apprepo. The
    failover times go to the summary."""
    controls = two_controls
    active = wait_until("an active Beacon", controls.the_active, ACTIVE_TIMEOUT_S)
    other = next(name for name in CONTROLS if name != active)
    through_active, through_other = controls.em_via(active), controls.em_via(other)

    with ExitStack() as running:
        polling = [running.enter_context(poller) for poller in pollers(platform)]
        for poller in polling:
            wait_until(f"{poller.name} answers v1", lambda p=poller: p.count(1) >= REQUESTS_PER_STEP, SERVE_TIMEOUT_S)
        app_dir = make_app(tmp_path, 2)
        em_deploy = subprocess.Popen(
            [str(platform.em_binary), "--json", "deploy", str(app_dir)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "XDG_CONFIG_HOME": str(through_active.em_config_home), "NO_COLOR": "1"},
        )
        try:
            def committed() -> bool:
                # An em deploy that ended before its release was committed will not commit it:
                # say why at once rather than after the whole wait.
                if em_deploy.poll() is not None:
                    out, err = em_deploy.communicate()
                    pytest.fail(f"em deploy v2 exited {em_deploy.returncode} before its release was committed\n{out}\n{err}")
                return 2 in releases(through_other)

            wait_until("release 2 committed", committed, COMMIT_TIMEOUT_S)
            assert not all(serves(platform, name, 2) for name in WEB_SERVERS), "the rollout was over before the loss"
            # Where its Beacon's log after the pause starts: read now, as a paused host answers
            # nothing, and once it is back its Beacon may step down before a read would.
            cursor = journal_cursor(controls.vms[active])
            lost_at = time.monotonic()
            controls.vms[active].pause()
            controls.paused = (active, cursor)
            wait_until(f"{other}'s Beacon active", lambda: controls.active_status(other) == 200, ACTIVE_TIMEOUT_S)
            took_over = time.monotonic() - lost_at
            for name in WEB_SERVERS:
                wait_until(f"{name} serves v2", lambda name=name: serves(platform, name, 2), EM_TIMEOUT_S)
            served = time.monotonic() - lost_at
            out, err = em_deploy.communicate(timeout=EM_TIMEOUT_S)
            deployed = time.monotonic() - lost_at
        finally:
            if em_deploy.poll() is None:
                em_deploy.kill()
        vm_timings["failover: control host paused to the other Beacon active"] = took_over
        vm_timings["failover: control host paused to both web servers serving v2"] = served
        vm_timings["failover: control host paused to em deploy v2 done"] = deployed
        print(
            f"failover (control host paused): other Beacon active after {took_over:.1f} s, "
            f"v2 served after {served:.1f} s, em deploy done after {deployed:.1f} s"
        )
        assert em_deploy.returncode == 0, f"em deploy v2 exited {em_deploy.returncode}\n{out}\n{err}"
        second = json.loads(out.strip().splitlines()[-1])
        assert second["release"] == 2 and second["rolled_out"] is True, second
        wait_for_nodes(through_other)

        started = time.monotonic()
        third = deploy(through_other, make_app(tmp_path, 3))
        vm_timings["em deploy v3 through the other apprepo"] = time.monotonic() - started
        assert third["release"] == 3 and third["rolled_out"] is True, third
        for poller in polling:
            wait_until(f"{poller.name} answers v3", lambda p=poller: p.count(3) >= REQUESTS_PER_STEP, SERVE_TIMEOUT_S)

    for poller in polling:
        print(poller.summary())
        assert poller.failures == [], f"{poller.name}: failed requests: {poller.failures}"
        assert set(poller.seen) == {1, 2, 3}, poller.summary()


def test_the_lost_host_comes_back_as_a_standby_and_nothing_is_duplicated(platform, two_controls):
    """The paused host runs again, its clocks having stood still: its Beacon, which believed
    itself active, finds at its next renewal that the lease is another's, steps down (it logs
    so, takes no Maestro's link, and comes back as a standby: 503) while the other stays active;
    the app's releases are 3, 2, 1, each once, through either apprepo; the active Beacon's log
    finished each rollout at most once; both web servers serve v3 throughout."""
    controls = two_controls
    assert controls.paused is not None, "the previous test paused no control host"
    lost, cursor = controls.paused
    active = next(name for name in CONTROLS if name != lost)
    assert controls.active_status(active) == 200, f"{active}'s Beacon is not the active one"
    with ExitStack() as running:
        polling = [running.enter_context(poller) for poller in pollers(platform)]
        controls.vms[lost].resume()
        controls.paused = None
        wait_until(f"{lost}'s Beacon standing by", lambda: controls.active_status(lost) == 503, STEP_DOWN_TIMEOUT_S)
        assert controls.the_active() == active, "the lease moved when the lost host came back"
        returned = beacon_log_since(controls.vms[lost], cursor)
        print(f"{lost}'s Beacon after its return:\n{returned}")
        assert STEPPING_DOWN in returned, f"the returning Beacon never stepped down:\n{returned}"
        assert MAESTRO_LINKED not in returned, f"the returning Beacon took a Maestro's link:\n{returned}"
        for name in CONTROLS:
            assert releases(controls.em_via(name)) == [3, 2, 1], name
        # Through qemu's port forwarding, a connection is now and then reset under load: the
        # question is what the log holds, so a reset call is made again.
        _, _, body = wait_until(
            "the active Beacon's events",
            lambda: (answer := controls.call(active, f"/v1/events?app={APP}&limit=1000"))[0] == 200 and answer,
            ACTIVE_TIMEOUT_S,
        )
        events = json.loads(body)
        # A rollout's own deploy_finished has no node (each node's "serving" has its name).
        finished = [e.get("release") for e in events if e.get("kind") == "deploy_finished" and not e.get("node")]
        # What the Beacons did meanwhile, for a failure's message: each one's restarts and the
        # app's deploy events as the active one holds them.
        restarts = {
            name: controls.vms[name].ssh("systemctl show -p NRestarts --value beacon").stdout.strip()
            for name in CONTROLS
        }
        deploys = [
            (e.get("seq"), e.get("at"), e.get("kind"), e.get("release"), e.get("node"), e.get("message"))
            for e in events
            if str(e.get("kind", "")).startswith("deploy_")
        ]
        assert len(finished) == len(set(finished)) and 3 in finished, (
            f"rollouts finished, by release: {finished}; Beacon restarts: {restarts}; deploy events: {deploys}"
        )
        print(f"the active Beacon's deploy events: {deploys}")
        for poller in polling:
            wait_until(f"{poller.name} answers v3", lambda p=poller: p.count(3) >= REQUESTS_PER_STEP, SERVE_TIMEOUT_S)
    for poller in polling:
        print(poller.summary())
        assert poller.failures == [], f"{poller.name}: failed requests: {poller.failures}"
        assert set(poller.seen) == {3}, poller.summary()
