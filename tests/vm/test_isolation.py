"""Apps cannot starve each other: an app over its `[limits] memory` is ended by the kernel's OOM
killer inside its own cgroup and reported as out of memory, while its neighbour on the same web
server serves on. Runs after test_deploy_cycle.py (the neighbour is its app)."""

from __future__ import annotations

import json
from pathlib import Path

from appcheck import (
    REQUESTS_PER_STEP,
    SERVE_TIMEOUT_S,
    current_release,
    get,
    pollers,
    wait_until,
)

HOG = "vm-hog"
# The hog's memory limit, and what it allocates (and touches) when asked.
HOG_LIMIT_MIB = 64
HOG_ALLOCATES_MIB = 300
HOG_PY = f'''import sys, http.server
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/hog":
            hoard = b"x" * ({HOG_ALLOCATES_MIB} * 1024 * 1024)
        body = b"hog"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
'''


def make_hog(root: Path) -> Path:
    app = root / HOG
    app.mkdir()
    (app / "server.py").write_text(HOG_PY)
    (app / "app.toml").write_text(
        f'name = "{HOG}"\n'
        'run = "exec python3 server.py \\"$1\\""\n'
        "\n[health]\n"
        'path = "/"\n'
        'timeout = "120s"\n'
        "\n[limits]\n"
        f'memory = "{HOG_LIMIT_MIB}MiB"\n'
    )
    return app


def hog_instances(web) -> list[dict]:
    """The hog's instances as the web server's Maestro reports them (its status port listens
    on the VM's loopback only)."""
    state = json.loads(web.ssh("curl -sf http://127.0.0.1:7090/v1/state").stdout)
    return [i for i in state["instances"] if i["app"] == HOG]


def test_an_app_over_its_memory_limit_is_oom_killed_alone(platform, tmp_path):
    web = platform.cluster["web-1"]
    version = current_release(platform)
    platform.em("--json", "deploy", str(make_hog(tmp_path)))
    hog_host = platform.host_header(HOG)
    wait_until("web-1 serves the hog", lambda: get(web.ports[80], hog_host) == (200, "hog"), SERVE_TIMEOUT_S)
    # Its instance runs in a cgroup of its own, with its limit.
    limits = web.ssh(
        "cat /sys/fs/cgroup/system.slice/maestro.service/instance-vm-hog-*/memory.max"
    ).stdout.split()
    assert limits and all(int(l) == HOG_LIMIT_MIB << 20 for l in limits), limits

    with pollers(platform)[0] as neighbour:
        neighbour.wait_served(REQUESTS_PER_STEP)
        status, _ = get(web.ports[80], hog_host, "/hog")
        assert status == 502, f"the hog's request should die with it, got {status}"

        def reported_oom():
            exits = [i.get("last_exit") or {} for i in hog_instances(web)]
            return [e for e in exits if e.get("oom")]

        exits = wait_until("web-1 reports the hog's OOM kill", reported_oom, SERVE_TIMEOUT_S)
        print(f"hog exit as reported: {exits}")
        assert exits[0].get("kind") == "out_of_memory", exits
        # It is restarted, and the neighbour never noticed.
        wait_until("the hog serves again", lambda: get(web.ports[80], hog_host) == (200, "hog"), SERVE_TIMEOUT_S)
        neighbour.wait_served(len(neighbour.seen) + REQUESTS_PER_STEP)
    print(neighbour.summary())
    assert neighbour.failures == [], neighbour.failures
    assert set(neighbour.seen) == {version}
    # The hog stays deployed: the scenarios after this one run with a neighbour on each web
    # server, as a real cluster would.
