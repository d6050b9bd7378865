"""Scenarios (b) to (f): what happens to a running cluster when a service restarts, dies, hangs
or a machine reboots. Each starts from the app test_deploy_cycle.py deployed, keeps a polling
client on the web servers throughout, and leaves the cluster serving as it found it."""

from __future__ import annotations

import time
from contextlib import ExitStack

from appcheck import (
    APP,
    REQUESTS_PER_STEP,
    RESTART_TIMEOUT_S,
    SERVE_TIMEOUT_S,
    Poller,
    app_pids,
    cgroup_of,
    current_release,
    deploy,
    make_app,
    main_pid,
    pollers,
    restarts,
    serves,
    wait_for_nodes,
    wait_until,
)

# (d) Until a release committed while Beacon was down is served by both web servers once it is
# back: apprepo's reconnect backoff (up to 30 s, plus jitter), Beacon's start, the Maestros'
# reconnect, then the rollout under emulation.
RESUME_TIMEOUT_S = 240
# (d) How long the web servers are watched serving alone while Beacon is down.
BEACON_DOWN_REQUESTS = 15
# (f) The watchdog the test gives Maestro, and the time to wait before hanging it: several
# watchdog periods that a Maestro pinging at half the period must survive.
TEST_WATCHDOG_S = 6
HEALTHY_UNDER_WATCHDOG_S = 3 * TEST_WATCHDOG_S
WATCHDOG_DROP_IN = "/run/systemd/system/maestro.service.d/50-vm-test-watchdog.conf"


def assert_no_refusal(poller: Poller, allowed_failures: int = 0) -> None:
    """No connection was refused (systemd holds the socket), and at most `allowed_failures`
    requests failed otherwise (a request in flight when a process was killed)."""
    print(poller.summary())
    refused = [f for f in poller.failures if "Refused" in f]
    assert refused == [], f"{poller.name}: refused connections: {refused}"
    assert len(poller.failures) <= allowed_failures, f"{poller.name}: {poller.failures}"


def wait_restarted(web, old_pid: int, timeout: float = RESTART_TIMEOUT_S) -> int:
    """Until maestro.service is active again with another main process; returns its PID."""

    def restarted():
        state = web.ssh("systemctl is-active maestro", check=False).stdout.strip()
        pid = main_pid(web)
        return pid if state == "active" and pid not in (0, old_pid) else None

    return wait_until(f"{web.name}: maestro active again after PID {old_pid}", restarted, timeout)


def test_b_maestro_restart_refuses_no_connection(platform):
    """(b) `systemctl restart maestro` on web-1 under a polling client: the socket stays with
    systemd, so requests wait instead of failing, and the restarted Maestro accepts them only
    once the app serves again."""
    web = platform.cluster["web-1"]
    version = current_release(platform)
    pid_before = main_pid(web)
    with pollers(platform)[0] as poller:
        poller.wait_served(REQUESTS_PER_STEP)
        served_before = len(poller.seen)
        web.ssh("systemctl restart maestro", timeout=RESTART_TIMEOUT_S)
        assert web.ssh("systemctl is-active maestro").stdout.strip() == "active"
        assert main_pid(web) != pid_before, "maestro was not restarted"
        poller.wait_served(served_before + REQUESTS_PER_STEP)
    assert_no_refusal(poller)
    assert set(poller.seen) == {version}


def test_c_killed_maestro_is_restarted_and_leaves_no_orphan(platform):
    """(c) kill -9 of Maestro on web-1: systemd ends the app processes left in its cgroup,
    restarts Maestro, which starts the app again from its persisted assignment; no process of
    the old app is left, and serving resumes with no refused connection."""
    web = platform.cluster["web-1"]
    version = current_release(platform)
    pid_before, restarts_before = main_pid(web), restarts(web)
    apps_before = app_pids(web)
    assert apps_before, "no app process before the kill"
    with pollers(platform)[0] as poller:
        poller.wait_served(REQUESTS_PER_STEP)
        served_before = len(poller.seen)
        web.ssh(f"kill -KILL {pid_before}")
        pid_after = wait_restarted(web, pid_before)
        poller.wait_served(served_before + REQUESTS_PER_STEP, RESTART_TIMEOUT_S)
    assert restarts(web) == restarts_before + 1, "systemd did not count a restart"
    apps_after = app_pids(web)
    assert apps_after, "the app was not started again"
    assert not apps_before & apps_after, f"orphans of the killed maestro: {apps_before & apps_after}"
    for pid in apps_after:
        assert "maestro.service" in cgroup_of(web, pid), f"app process {pid} outside maestro's cgroup"
    assert pid_after not in apps_after
    # The one request in flight at the kill may be cut; none may be refused.
    assert_no_refusal(poller, allowed_failures=1)
    assert set(poller.seen) == {version}


def test_d_web_servers_serve_without_beacon_and_deploys_resume(platform, tmp_path):
    """(d) Beacon stopped: both web servers keep serving; `em deploy` says Beacon is unreachable
    and uploads nothing; `em deploy --no-wait` commits a release to apprepo, which is rolled
    out once Beacon is back, with no further command and no failed request."""
    control = platform.cluster["control"]
    version = current_release(platform)
    following = version + 1
    with ExitStack() as running:
        polling = [running.enter_context(poller) for poller in pollers(platform)]
        control.ssh("systemctl stop beacon")
        try:
            for poller in polling:
                poller.wait_served(len(poller.seen) + BEACON_DOWN_REQUESTS)
            refused = platform.em("deploy", str(make_app(tmp_path, following)), check=False)
            assert refused.returncode != 0, refused.stdout
            assert "cannot reach Beacon" in refused.stderr and "Nothing was uploaded" in refused.stderr, refused.stderr
            committed = deploy(platform, make_app(tmp_path / "again", following), "--no-wait")
            assert committed["release"] == following, committed
            for poller in polling:
                poller.wait_served(len(poller.seen) + REQUESTS_PER_STEP)
                assert following not in poller.seen, "a release rolled out without Beacon"
        finally:
            control.ssh("systemctl start beacon")
        for poller in polling:
            wait_until(
                f"{poller.name} serves v{following} after Beacon is back",
                lambda poller=poller: poller.count(following) >= REQUESTS_PER_STEP,
                RESUME_TIMEOUT_S,
            )
    wait_for_nodes(platform)
    for poller in polling:
        assert_no_refusal(poller)
        assert set(poller.seen) == {version, following}, poller.summary()


def test_e_rebooted_web_server_serves_the_current_release(platform, vm_timings):
    """(e) web-2 reboots: it comes back serving the current release from its persisted
    assignment, with no action; web-1 serves throughout."""
    cluster = platform.cluster
    version = current_release(platform)
    web2 = cluster["web-2"]
    host = platform.host_header(APP)
    with pollers(platform)[0] as web1_poller:
        web1_poller.wait_served(REQUESTS_PER_STEP)
        started = time.monotonic()
        web2.reboot()
        wait_until(
            f"web-2 serves v{version} after its reboot",
            lambda: serves(web2.ports[80], host, version),
            SERVE_TIMEOUT_S,
        )
        vm_timings["reboot of web-2 to serving"] = time.monotonic() - started
    assert web2.ssh("systemctl is-active maestro").stdout.strip() == "active"
    assert app_pids(web2), "no app process on web-2 after the reboot"
    wait_for_nodes(platform)
    assert_no_refusal(web1_poller)
    assert set(web1_poller.seen) == {version}


def test_f_watchdog_restarts_a_hung_maestro(platform, vm_timings):
    """(f) With a short watchdog, a healthy Maestro keeps its process (it pings in time); once
    it is frozen with SIGSTOP, systemd's watchdog aborts and restarts it, and serving resumes
    with no refused connection."""
    web = platform.cluster["web-1"]
    version = current_release(platform)
    web.ssh(
        f"mkdir -p {WATCHDOG_DROP_IN.rsplit('/', 1)[0]} && "
        f"printf '[Service]\\nWatchdogSec={TEST_WATCHDOG_S}s\\n' > {WATCHDOG_DROP_IN} && "
        "systemctl daemon-reload && systemctl restart maestro",
        timeout=RESTART_TIMEOUT_S,
    )
    try:
        assert web.ssh("systemctl show -p WatchdogUSec --value maestro").stdout.strip() == f"{TEST_WATCHDOG_S}s"
        pid_before, restarts_before = main_pid(web), restarts(web)
        with pollers(platform)[0] as poller:
            time.sleep(HEALTHY_UNDER_WATCHDOG_S)
            assert main_pid(web) == pid_before, "the watchdog fired on a healthy maestro"
            served_before = len(poller.seen)
            since = web.ssh("date +%s").stdout.strip()
            started = time.monotonic()
            web.ssh(f"kill -STOP {pid_before}")
            wait_restarted(web, pid_before)
            vm_timings["SIGSTOP to maestro restarted by the watchdog"] = time.monotonic() - started
            poller.wait_served(served_before + REQUESTS_PER_STEP, RESTART_TIMEOUT_S)
        journal = web.ssh(f"journalctl -u maestro --since @{since} --no-pager").stdout
        assert "Watchdog timeout" in journal, journal[-3000:]
        assert restarts(web) == restarts_before + 1
        # Requests that reached the frozen Maestro may time out; none may be refused.
        assert_no_refusal(poller, allowed_failures=len(poller.failures))
        assert set(poller.seen) == {version}
    finally:
        web.ssh(
            f"rm -f {WATCHDOG_DROP_IN} && systemctl daemon-reload && systemctl restart maestro",
            timeout=RESTART_TIMEOUT_S,
        )
    host = platform.host_header(APP)
    wait_until(
        "web-1 serves after the watchdog test",
        lambda: serves(web.ports[80], host, version),
        SERVE_TIMEOUT_S,
    )
