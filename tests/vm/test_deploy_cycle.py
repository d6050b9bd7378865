"""The full cycle on the VM cluster: the real ansible/site.yml provisions it (the `platform`
fixture), the host's em deploys a Python app, and both web servers switch from one release to
the next without failing a request. Scenario (a); test_recovery.py continues from here."""

from __future__ import annotations

import json
import time
from contextlib import ExitStack

from appcheck import (
    APP,
    REQUESTS_PER_STEP,
    SERVE_TIMEOUT_S,
    WEB_SERVERS,
    app_uid,
    deploy,
    make_app,
    pollers,
    serves,
    wait_for_nodes,
    wait_until,
)


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
    """(a) em deploy v1: both web servers serve it; em deploy v2 under a polling client on each:
    both switch to v2, no request fails, and none is answered by v1 after v2."""
    cluster = platform.cluster
    host = platform.host_header(APP)
    wait_for_nodes(platform)

    started = time.monotonic()
    first = deploy(platform, make_app(tmp_path, 1))
    vm_timings["em deploy v1 (first release)"] = time.monotonic() - started
    assert first["rolled_out"] is True, first
    print(f"em deploy v1: {json.dumps(first['seconds'])}")
    for name in WEB_SERVERS:
        port = cluster[name].ports[80]
        wait_until(f"{name} serves v1", lambda port=port: serves(port, host, 1), SERVE_TIMEOUT_S)
    # The operator's figure: scripts/provision's first run (what `terraform apply` runs once
    # the hosts exist) and em deploy until both web servers serve the app; the test's own
    # checks in between (the second, idempotence run among them) left out.
    vm_timings["scripts/provision (first run) + em deploy until both web servers serve"] = (
        platform.timings["scripts/provision first run"] + time.monotonic() - started
    )

    with ExitStack() as running:
        polling = [running.enter_context(poller) for poller in pollers(platform)]
        for poller in polling:
            wait_until(
                f"{poller.name}'s poller sees v1",
                lambda poller=poller: poller.count(1) >= REQUESTS_PER_STEP,
                SERVE_TIMEOUT_S,
            )
        started = time.monotonic()
        second = deploy(platform, make_app(tmp_path, 2))
        vm_timings["em deploy v2 (under polling)"] = time.monotonic() - started
        print(f"em deploy v2 in {vm_timings['em deploy v2 (under polling)']:.1f} s: {json.dumps(second['seconds'])}")
        assert second["rolled_out"] is True, second
        assert second["release"] == first["release"] + 1, (first, second)
        for poller in polling:
            wait_until(
                f"{poller.name}'s poller sees v2",
                lambda poller=poller: poller.count(2) >= REQUESTS_PER_STEP,
                SERVE_TIMEOUT_S,
            )

    for poller in polling:
        print(poller.summary())
        assert poller.failures == [], f"{poller.name}: failed requests: {poller.failures}"
        assert set(poller.seen) == {1, 2}, poller.summary()
        # Once a web server has switched, every new request goes to v2.
        first_v2 = poller.seen.index(2)
        assert 1 not in poller.seen[first_v2:], f"{poller.name} served v1 after v2: {poller.seen}"
    # The app runs on each web server as a uid of its own, not as px-maestro, Maestro's user.
    for name in WEB_SERVERS:
        web = cluster[name]
        procs = web.ssh(f"ps -u {app_uid(web)} -o args=").stdout
        assert "server.py" in procs, (name, procs)
        assert "server.py" not in web.ssh("ps -u px-maestro -o args=").stdout, name
