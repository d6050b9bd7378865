"""Process types on the cluster: examples/python-worker (a web process and a worker taking jobs
from a queue) deployed from the host. `em scale worker=2` places one worker on each web server
(other types count in total across the cluster) without restarting the web instances, `em ps`
lists every process with its node; a redeploy under a stream of jobs on both web servers
replaces both workers and loses no job, doing none twice; `em run` runs a command of the
current release on a node that runs the app, with its exit status, and under a terminal its
Ctrl-C reaches the remote command; a release whose release phase fails never serves.

Each web server keeps its own queue (in the app's data directory on that node, PX_DATA_DIR): one worker per web server is what makes each queue
drain here.
"""

from __future__ import annotations

import http.client
import json
import os
import pty
import select
import shutil
import subprocess
import threading
import time
from pathlib import Path

from appcheck import REQUEST_TIMEOUT_S, WEB_SERVERS, get, wait_for_nodes, wait_until

REPO = Path(__file__).resolve().parents[2]
APP = "vm-worker"
# Python's start under emulation takes seconds; the first health check waits this long.
HEALTH_TIMEOUT = "120s"
# Until a change of formation or a deploy shows in em ps and the events.
SETTLE_TIMEOUT_S = 180
# Until every queue is empty after the jobs stop.
DRAIN_TIMEOUT_S = 180
# Jobs posted to each web server during the redeploy: one every POST_INTERVAL_S.
POST_INTERVAL_S = 0.3
# One em run on the emulated cluster: placed, started, its output back.
RUN_TIMEOUT_S = 120


def make_app(root: Path, marker: str) -> Path:
    app = root / marker
    shutil.copytree(REPO / "examples" / "python-worker", app)
    toml = (app / "app.toml").read_text()
    toml = toml.replace('name = "python-worker"', f'name = "{APP}"')
    toml = toml.replace('path = "/healthz"', f'path = "/healthz"\ntimeout = "{HEALTH_TIMEOUT}"')
    toml = toml.replace('WORK_SECONDS = "0.2"', 'WORK_SECONDS = "0.1"')
    (app / "app.toml").write_text(toml)
    with open(app / "worker.py", "a") as worker:
        worker.write(f"# {marker}\n")
    return app


def processes(platform) -> list[dict]:
    return json.loads(platform.em("--json", "ps", "--app", APP).stdout)


def running(platform, kind: str) -> list[dict]:
    return [
        p
        for p in processes(platform)
        if p.get("process", "web") == kind and p["state"] in ("running", "healthy")
    ]


def post_job(port: int, host: str, payload: str) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
    try:
        conn.request("POST", "/jobs", body=payload.encode(), headers={"Host": host})
        response = conn.getresponse()
        body = response.read().decode(errors="replace")
        assert response.status == 201, (response.status, body)
        return json.loads(body)["id"]
    finally:
        conn.close()


def stats(port: int, host: str) -> dict:
    status, body = get(port, host, "/stats")
    assert status == 200, (status, body)
    return json.loads(body)


def test_a_worker_app_scales_redeploys_without_losing_a_job_and_runs_one_off_commands(
    platform, tmp_path, vm_timings
):
    cluster = platform.cluster
    host = platform.host_header(APP)
    wait_for_nodes(platform)
    first = json.loads(platform.em("--json", "deploy", str(make_app(tmp_path, "v1"))).stdout.splitlines()[-1])
    assert first["rolled_out"] is True, first
    for name in WEB_SERVERS:
        port = cluster[name].ports[80]
        wait_until(f"{name} serves {APP}", lambda port=port: get(port, host, "/healthz")[0] == 200, 120)

    # One worker by default, in total; two after em scale, one on each web server, and the
    # web instances are the same processes as before.
    wait_until("one worker running", lambda: len(running(platform, "worker")) == 1, SETTLE_TIMEOUT_S)
    web_before = {(p["node"], p["pid"]) for p in running(platform, "web")}
    assert {node for node, _ in web_before} == set(WEB_SERVERS), web_before
    platform.em("scale", "--app", APP, "worker=2")
    workers = wait_until(
        "two workers running", lambda: (w := running(platform, "worker")) and len(w) == 2 and w, SETTLE_TIMEOUT_S
    )
    assert {w["node"] for w in workers} == set(WEB_SERVERS), workers
    assert sorted(w["number"] for w in workers) == [1, 2], workers
    assert {(p["node"], p["pid"]) for p in running(platform, "web")} == web_before
    refused = platform.em("scale", "--app", APP, "nosuch=1", check=False)
    assert refused.returncode != 0 and "worker" in refused.stdout + refused.stderr, refused

    # A redeploy while jobs keep coming to both web servers: every job taken is done once.
    taken = {name: [] for name in WEB_SERVERS}
    errors: list[str] = []
    halt = threading.Event()

    def post_jobs(name: str) -> None:
        port = cluster[name].ports[80]
        n = 0
        while not halt.is_set():
            try:
                taken[name].append(post_job(port, host, f"job {n}"))
            except Exception as err:  # noqa: BLE001 - every refused job counts
                errors.append(f"{name}: {type(err).__name__}: {err}")
            n += 1
            halt.wait(POST_INTERVAL_S)

    threads = [threading.Thread(target=post_jobs, args=(name,), daemon=True) for name in WEB_SERVERS]
    for thread in threads:
        thread.start()
    wait_until("jobs posted to both web servers", lambda: all(len(t) >= 3 for t in taken.values()), 120)
    started = time.monotonic()
    second = json.loads(platform.em("--json", "deploy", str(make_app(tmp_path, "v2"))).stdout.splitlines()[-1])
    assert second["rolled_out"] is True, second
    release = second["release"]
    vm_timings["em deploy of the worker app (web live on both)"] = time.monotonic() - started

    def replaced() -> bool:
        workers = running(platform, "worker")
        return len(workers) == 2 and all(w["release"] == release for w in workers) and not [
            p for p in processes(platform) if p.get("process") == "worker" and p["release"] != release
        ]

    wait_until(f"both workers of v{release} and none older", replaced, SETTLE_TIMEOUT_S)
    vm_timings["em deploy to both workers replaced"] = time.monotonic() - started
    counts = {name: len(t) for name, t in taken.items()}
    wait_until("more jobs after the deploy", lambda: all(len(taken[n]) >= counts[n] + 3 for n in WEB_SERVERS), 120)
    halt.set()
    for thread in threads:
        thread.join(REQUEST_TIMEOUT_S + 1)
    assert errors == [], errors

    for name in WEB_SERVERS:
        port = cluster[name].ports[80]
        drained = wait_until(
            f"{name}'s queue drained",
            lambda port=port: (s := stats(port, host)) and s["new"] == 0 and s["claimed"] == 0 and s,
            DRAIN_TIMEOUT_S,
        )
        assert drained["done"] == len(taken[name]) and drained["twice"] == 0, (name, drained, len(taken[name]))
        for job in taken[name][:: max(1, len(taken[name]) // 10)]:
            status, body = get(port, host, f"/jobs/{job}")
            assert status == 200 and json.loads(body)["done"] is True, (name, job, body)

    # em run: the current release's environment, the command's exit status, and how soon
    # its first byte comes back.
    first_byte, ran = em_run_first_byte(platform, ["sh", "-c", 'echo "release $PX_RELEASE data $PX_DATA_DIR"'])
    vm_timings["em run: start to the first byte of output"] = first_byte
    assert ran.returncode == 0 and f"release {release} data /var/lib/platformx/maestro/data/{APP}" in ran.stdout, ran
    failed = platform.em("run", "--app", APP, "--", "sh", "-c", "exit 3", check=False, timeout=RUN_TIMEOUT_S)
    assert failed.returncode == 3, failed

    # Under a terminal: Ctrl-C reaches the remote command.
    output = run_in_terminal(
        platform,
        ["run", "--app", APP, "--", "sh", "-c", 'trap "echo got-INT; exit 42" INT; echo ready; while :; do sleep 1; done'],
    )
    assert "got-INT" in output["text"] and output["code"] == 42, output

    # A release phase that fails: the deploy fails with its output, nothing switches, and both
    # web servers keep serving the release before it.
    failing = make_app(tmp_path, "v3-failing-phase")
    procfile = failing / "Procfile"
    procfile.write_text(procfile.read_text() + "release: echo migrating; echo 'no such table: jobs' >&2; exit 3\n")
    refused = platform.em("deploy", str(failing), check=False, timeout=RUN_TIMEOUT_S * 3)
    said = refused.stdout + refused.stderr
    assert refused.returncode == 1 and "no such table: jobs" in said and f"v{release} still serves" in said, said
    assert {p["release"] for p in processes(platform)} == {release}, processes(platform)
    for name in WEB_SERVERS:
        status, _ = get(cluster[name].ports[80], host, "/healthz")
        assert status == 200, name


def em_run_first_byte(platform, command: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    """`em run -- COMMAND` without a terminal: seconds from its start to the first byte of
    its output, and the whole run."""
    started = time.monotonic()
    proc = subprocess.Popen(
        [str(platform.em_binary), "run", "--app", APP, "--", *command],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "XDG_CONFIG_HOME": str(platform.em_config_home), "NO_COLOR": "1"},
    )
    # One byte from the pipe itself: a buffered read would take more than it returns, and
    # communicate() reads the descriptor, not that buffer.
    first = os.read(proc.stdout.fileno(), 1)
    first_byte = time.monotonic() - started
    out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    return first_byte, subprocess.CompletedProcess(proc.args, proc.returncode, (first + out).decode(), err.decode())


def run_in_terminal(platform, args: list[str]) -> dict:
    """em under a pseudo-terminal of its own: waits for `ready`, types Ctrl-C, then reads to
    the end. Returns what the terminal showed and em's exit status."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [str(platform.em_binary), *args],
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env={**os.environ, "XDG_CONFIG_HOME": str(platform.em_config_home), "NO_COLOR": "1"},
        start_new_session=True,
    )
    os.close(follower)
    text = b""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    sent = False
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 1)
            if ready:
                try:
                    chunk = os.read(leader, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                text += chunk
            if not sent and b"ready" in text:
                os.write(leader, b"\x03")
                sent = True
            if proc.poll() is not None and not ready:
                break
        code = proc.wait(timeout=max(1, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)
    return {"text": text.decode(errors="replace"), "code": code, "sent": sent}
