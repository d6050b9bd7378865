"""A hostile tenant: an app deployed beside the deploy-cycle app tries, from inside its instance
on a real web server under maestro.service, every attack on the platform and its neighbour (read
Maestro's credentials, keys and state, the neighbour's environment and files; write them and its
own release; signal the neighbour; raise its own limits through cgroupfs; post events as the
neighbour; reach Beacon's and apprepo's ports with what it found). Each attempt fails, and the
neighbour serves throughout. Each app's processes run as a uid of their own, neither px-maestro's
nor the other app's, and the tenant holds no capability, read on the VM from outside and by the
tenant itself. Runs after test_isolation.py (the neighbour is test_deploy_cycle's
app), and the tenant stays deployed, as the hog does, for the scenarios after it; also prints `systemd-analyze security maestro.service` as the VM scores it."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import quote

from appcheck import (
    APP,
    REQUESTS_PER_STEP,
    SERVE_TIMEOUT_S,
    current_release,
    get,
    pollers,
    wait_until,
)

TENANT = "vm-tenant"
# Beacon's and apprepo's API ports on the control VM's private address (conftest.py's network).
CONTROL_IP = "10.77.0.10"
BEACON_API = f"http://{CONTROL_IP}:7080/v1/apps"
APPREPO_API = f"http://{CONTROL_IP}:7070/v1/apps"

# The tenant: `/probe?pid=N&release=DIR` tries each attack and answers what happened, as JSON.
TENANT_PY = r'''import glob, http.server, json, os, signal, sys, urllib.error, urllib.parse, urllib.request

def attempt(fn):
    try:
        return {"ok": True, "value": fn()}
    except Exception as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}"[:200]}

def read(path):
    with open(path, "rb") as f:
        return f.read(64).decode("latin-1")

def append(path):
    with open(path, "a") as f:
        f.write("# tampered\n")
    return "written"

def call(url, data=None, token=None):
    req = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code

def denied(status):
    if status >= 400:
        raise PermissionError(f"answered {status}")
    return status

def probe(query):
    pid = int(query["pid"][0])
    release = query["release"][0]
    found = {}
    secrets = (
        glob.glob("/run/credentials/maestro.service/*")
        + ["/run/credentials/maestro.service/link-token", "/run/credentials/maestro.service/repo-token"]
        + glob.glob("/etc/platformx/certs/*")
        + ["/etc/platformx/certs"]
        + glob.glob("/etc/platformx/*token*")
        + ["/etc/platformx/maestro-link-token", "/etc/platformx/maestro-repo-token", "/etc/platformx/maestro.toml"]
        + ["/var/lib/platformx/maestro/assignment.json", "/var/lib/platformx/maestro/app-uids.json"]
    )
    for path in secrets:
        found["read " + path] = attempt(lambda: read(path))
    found["list /etc/platformx"] = attempt(lambda: os.listdir("/etc/platformx"))
    found["list /run/credentials"] = attempt(lambda: os.listdir("/run/credentials"))
    found["read the neighbour's environ"] = attempt(lambda: read(f"/proc/{pid}/environ"))
    found["read the neighbour's cmdline"] = attempt(lambda: read(f"/proc/{pid}/cmdline"))
    found["read the neighbour's release"] = attempt(lambda: read(os.path.join(release, "app.toml")))
    found["list the neighbour's release"] = attempt(lambda: os.listdir(release))
    found["write the neighbour's release"] = attempt(lambda: append(os.path.join(release, "app.toml")))
    found["write its own release"] = attempt(lambda: append("app.toml"))
    found["replace its own release"] = attempt(lambda: os.rename("server.py", "moved.py"))
    found["signal the neighbour"] = attempt(lambda: os.kill(pid, signal.SIGKILL))
    found["raise its memory limit"] = attempt(lambda: append("/sys/fs/cgroup/memory.max"))
    own = open("/proc/self/cgroup").read().strip().split("::")[-1]
    found["raise its limit at its cgroup's path"] = attempt(
        lambda: append("/sys/fs/cgroup" + own + "/memory.max")
    )
    found["list /sys/fs/cgroup"] = attempt(lambda: os.listdir("/sys/fs/cgroup"))
    # Another instance's events URL differs in its secret; the tenant knows only its own.
    events = os.environ["PX_EVENTS_URL"]
    forged = events.rsplit("/", 1)[0] + "/" + "0" * 64
    body = json.dumps({"level": "critical", "message": "forged"}).encode()
    found["post events as the neighbour"] = attempt(lambda: denied(call(forged, body)))
    tokens = [v["value"].strip() for v in found.values() if v.get("ok") and isinstance(v.get("value"), str)]
    for name, url in (("Beacon", BEACON), ("apprepo", APPREPO)):
        found[f"call {name}'s API with nothing"] = attempt(lambda: denied(call(url)))
        for token in tokens:
            found[f"call {name}'s API with what it found"] = attempt(lambda: denied(call(url, token=token)))
    pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    caps = {
        line.split(":")[0]: int(line.split(":")[1], 16)
        for line in open("/proc/self/status")
        if line.startswith(("CapInh:", "CapPrm:", "CapEff:", "CapAmb:"))
    }
    return {"uid": os.getuid(), "pids": pids, "caps": caps, "attacks": found}

class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        url = urllib.parse.urlparse(self.path)
        if url.path == "/probe":
            body = json.dumps(probe(urllib.parse.parse_qs(url.query))).encode()
        else:
            body = b"tenant"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass

http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
'''


def make_tenant(root: Path) -> Path:
    app = root / TENANT
    app.mkdir()
    (app / "server.py").write_text(f"BEACON = {BEACON_API!r}\nAPPREPO = {APPREPO_API!r}\n" + TENANT_PY)
    (app / "app.toml").write_text(
        f'name = "{TENANT}"\n'
        'run = "exec python3 server.py \\"$1\\""\n'
        "\n[health]\n"
        'path = "/"\n'
        'timeout = "120s"\n'
    )
    return app


def neighbour(web) -> dict:
    """The neighbour's instance on `web` as its Maestro reports it (pid outside the sandbox)."""
    state = json.loads(web.ssh("curl -sf http://127.0.0.1:7090/v1/state").stdout)
    return next(i for i in state["instances"] if i["app"] == APP and i["state"] == "healthy")


def sandbox_processes(web, leader: int) -> dict[int, dict]:
    """Every process of the sandbox led by `leader` (bubblewrap, its init, the app and what it
    started), read on the VM from outside: pid → its real uid and capability sets."""
    table = [line.split() for line in web.ssh("ps -eo pid=,ppid=").stdout.splitlines()]
    tree = {leader}
    grew = True
    while grew:
        below = {int(pid) for pid, ppid in table if int(ppid) in tree}
        grew = not below <= tree
        tree |= below
    found = {}
    for pid in sorted(tree):
        status = web.ssh(f"cat /proc/{pid}/status", check=False).stdout
        if not status:
            continue  # gone meanwhile
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        found[pid] = {
            "uid": int(fields["Uid"].split()[0]),
            "caps": {name: int(fields[name], 16) for name in ("CapInh", "CapPrm", "CapEff", "CapAmb")},
        }
    return found


def instance(web, app: str) -> dict:
    state = json.loads(web.ssh("curl -sf http://127.0.0.1:7090/v1/state").stdout)
    return next(i for i in state["instances"] if i["app"] == app and i["state"] == "healthy")


def test_a_hostile_tenant_reaches_nothing_and_its_neighbour_serves_throughout(platform, tmp_path):
    web = platform.cluster["web-1"]
    version = current_release(platform)
    with pollers(platform)[0] as watched:
        watched.wait_served(REQUESTS_PER_STEP)
        platform.em("--json", "deploy", str(make_tenant(tmp_path)))
        host = platform.host_header(TENANT)
        wait_until("web-1 serves the tenant", lambda: get(web.ports[80], host) == (200, "tenant"), SERVE_TIMEOUT_S)
        # What the test reads of the node is really there for Maestro, so each failure below
        # is the sandbox's doing.
        for path in (
            "/run/credentials/maestro.service/link-token",
            "/etc/platformx/maestro-link-token",
            "/var/lib/platformx/maestro/assignment.json",
        ):
            web.ssh(f"test -s {path}")
        victim = neighbour(web)
        release = f"/var/lib/platformx/maestro/apps/{APP}/releases/{victim['release']}"
        web.ssh(f"test -s {release}/app.toml")
        before = web.ssh(f"sha256sum {release}/app.toml").stdout

        status, body = get(web.ports[80], host, f"/probe?pid={victim['pid']}&release={quote(release)}")
        assert status == 200, body
        report = json.loads(body)
        print(json.dumps(report, indent=1))
        succeeded = {name: r for name, r in report["attacks"].items() if r["ok"]}
        assert succeeded == {}, succeeded
        # The attacks the brief names were all tried.
        for name in (
            "read /run/credentials/maestro.service/link-token",
            "read /etc/platformx/maestro-link-token",
            "read the neighbour's environ",
            "write the neighbour's release",
            "write its own release",
            "signal the neighbour",
            "raise its limit at its cgroup's path",
            "post events as the neighbour",
            "call Beacon's API with nothing",
            "call apprepo's API with nothing",
        ):
            assert name in report["attacks"], name
        assert report["uid"] != 0
        assert victim["pid"] not in report["pids"] and len(report["pids"]) <= 3, report["pids"]
        # The tenant holds no capability, in any set, as it reads its own status.
        assert report["caps"] == {"CapInh": 0, "CapPrm": 0, "CapEff": 0, "CapAmb": 0}, report["caps"]

        # From outside: each app's processes are a uid of its own, neither px-maestro's nor
        # the other app's, and none of them holds a capability.
        maestro_uid = int(web.ssh("id -u px-maestro").stdout)
        uids = json.loads(web.ssh("cat /var/lib/platformx/maestro/app-uids.json").stdout)["apps"]
        seen = {}
        for app, leader in ((TENANT, instance(web, TENANT)["pid"]), (APP, victim["pid"])):
            processes = sandbox_processes(web, leader)
            print(app, json.dumps(processes))
            assert len(processes) >= 2, (app, processes)
            assert {p["uid"] for p in processes.values()} == {uids[app]}, (app, processes)
            assert all(set(p["caps"].values()) == {0} for p in processes.values()), (app, processes)
            assert web.ssh(f"ps -o uid= -p {leader}").stdout.strip() == str(uids[app])
            seen[app] = uids[app]
        assert maestro_uid not in seen.values() and 0 not in seen.values(), (maestro_uid, seen)
        assert seen[TENANT] != seen[APP], seen
        # Maestro's state stays closed to them: only traversable, its files 0600.
        assert web.ssh("stat -c %a /var/lib/platformx/maestro").stdout.strip() == "711"
        for name in ("assignment.json", "app-uids.json"):
            assert web.ssh(f"stat -c %a /var/lib/platformx/maestro/{name}").stdout.strip() == "600"

        # Nothing changed for the neighbour: its files, its process, its answers.
        assert web.ssh(f"sha256sum {release}/app.toml").stdout == before
        assert neighbour(web)["pid"] == victim["pid"]
        watched.wait_served(len(watched.seen) + REQUESTS_PER_STEP)
    print(watched.summary())
    assert watched.failures == [], watched.failures
    assert set(watched.seen) == {version}
    # The tenant's limits stayed as Maestro set them, in a cgroup of its own.
    cgroups = web.ssh("ls -d /sys/fs/cgroup/system.slice/maestro.service/instance-vm-tenant-*").stdout.split()
    assert cgroups, "the tenant has a cgroup of its own"

    security = web.ssh("systemd-analyze security maestro.service --no-pager || true").stdout
    print(security)
    overall = [line for line in security.splitlines() if "Overall exposure level" in line]
    assert overall, security
