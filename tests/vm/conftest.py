"""Fixtures of the VM tier: `cluster`, the session's booted VMs with an Ansible inventory.

The session builds (or finds cached) the image, boots control, web-1 and web-2 in parallel and
hands them to every test that asks for `cluster`. At the end the VMs are killed, unless
PX_VM_KEEP=1; the run's summary says how long the image and the boot took and, when a test
failed, where each VM's console log is and how it ends.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest

import image
import mirror
import seaweed
import vm

# The cluster: name, private IP, and the guest ports forwarded to the host (each to a free host
# port, see Vm.ports). control runs apprepo (7070, its API) and Beacon (7080, its HTTP API and
# status page; 7443, the Maestros' TLS links), the ports of ansible/roles/platformx; the web
# servers run Maestro (HTTP, HTTPS once ACME is on, status). SCRATCH_PORT is added to every VM.
CLUSTER = (
    ("control", "10.77.0.10", (7070, 7080, 7443)),
    ("web-1", "10.77.0.11", (80, 443, 7090)),
    ("web-2", "10.77.0.12", (80, 443, 7090)),
)
# Forwarded on every VM for a test's own throwaway server; the platform never listens there.
SCRATCH_PORT = 8999
# The control VMs: each reaches the host's S3 server (SeaweedFS, which only the failover
# scenario starts) through a guestfwd rule, as a control host reaches its bucket.
CONTROL_VMS = ("control",)
# Ansible groups, as ansible/site.yml expects them. web-1 also builds, as a small cluster's
# web server does; web-2 only serves.
GROUPS = {
    "repository": ("control",),
    "beacon": ("control",),
    "webservers": ("web-1", "web-2"),
    "builders": ("web-1",),
}
# One ansible-playbook run (a whole site.yml on three emulated machines included).
ANSIBLE_TIMEOUT_S = 20 * 60
# The VMs printed their host keys before they were ready: the consoles have them at once.
PROVISION_HOST_KEYS_TIMEOUT_S = 30
# Ansible's connection timeout (its `timeout` setting) for the VMs.
ANSIBLE_CONNECT_TIMEOUT_S = 60
# Lines of ansible-playbook's output kept in a failure's message.
ANSIBLE_OUTPUT_TAIL_LINES = 60

# Debian's ansible-playbook (ansible-core 2.14, what the roles are written for), by absolute
# path: a pip-installed Ansible earlier on the PATH is another version. The `platform` fixture
# provisions through scripts/provision instead (its own pinned ansible-core 2.14), as
# `terraform apply` does; the scenarios' later site.yml runs use this one.
ANSIBLE_PLAYBOOK = "/usr/bin/ansible-playbook"
# What `terraform apply` runs to configure the hosts (terraform/provision.tf).
PROVISION = Path(__file__).resolve().parents[2] / "scripts" / "provision"
# What the tier runs on the host; tests/vm/install-tools installs them.
REQUIRED_TOOLS = (
    "qemu-system-x86_64",
    "qemu-img",
    "debootstrap",
    "mkfs.ext4",
    "ssh",
    "ssh-keygen",
    "openssl",
    ANSIBLE_PLAYBOOK,
    # Copied into the control VM by the ACME scenario (test_acme.py).
    "/usr/bin/pebble",
    "/usr/bin/pebble-challtestsrv",
)

# The repository (for ansible/ and systemd/) and the Cargo build the platform comes from.
REPO = Path(__file__).resolve().parents[2]
SITE_PLAYBOOK = REPO / "ansible" / "site.yml"
ANSIBLE_CONFIG = REPO / "ansible" / "ansible.cfg"
TARGET_DIR = Path(os.environ.get("CARGO_TARGET_DIR") or "/root/.cache/platformx/target")
SERVICE_BINARIES = ("apprepo", "beacon", "maestro")
# The app the build scenario deploys: the package mirror holds what it installs (mirror.py).
MIRRORED_REQUIREMENTS = (REPO / "examples" / "django-notes" / "requirements.txt",)
# Building the binaries (a debug build from scratch on 2 busy cores; seconds when up to date).
CARGO_BUILD_TIMEOUT_S = 60 * 60
# Stripping one debug binary (hundreds of MB) into the staging directory.
STRIP_TIMEOUT_S = 120
# The apps' domain the tests give Beacon: apps answer as <app>.<PLATFORM_DOMAIN> on port 80.
PLATFORM_DOMAIN = "apps.test"
# One em command (a deploy waits for the rollout on both web servers under emulation).
EM_TIMEOUT_S = 10 * 60

# Mitogen, which tests/vm/install-tools installs: site.yml runs with its strategy, which keeps
# one Python interpreter per VM for the whole run instead of starting one per task (seconds
# each under emulation). PX_VM_ANSIBLE_STRATEGY=linear runs Ansible's stock strategy instead.
MITOGEN_VERSION = re.search(
    r"^MITOGEN_VERSION=(\S+)$", (Path(__file__).parent / "install-tools").read_text(), re.M
).group(1)
MITOGEN_DIR = Path(
    os.environ.get("PX_VM_MITOGEN")
    or Path.home() / ".cache" / "platformx" / f"mitogen-{MITOGEN_VERSION}"
)


def ansible_strategy() -> str:
    return os.environ.get("PX_VM_ANSIBLE_STRATEGY", "mitogen_linear")


def _strategy_env() -> dict[str, str]:
    """The environment that selects the strategy ansible_strategy() names."""
    strategy = ansible_strategy()
    if not strategy.startswith("mitogen"):
        return {"ANSIBLE_STRATEGY": strategy}
    plugins = MITOGEN_DIR / "ansible_mitogen" / "plugins" / "strategy"
    if not plugins.is_dir():
        pytest.fail(f"no Mitogen in {MITOGEN_DIR}: run tests/vm/install-tools, or set PX_VM_ANSIBLE_STRATEGY=linear")
    return {
        "ANSIBLE_STRATEGY": strategy,
        "ANSIBLE_STRATEGY_PLUGINS": str(plugins),
        "PYTHONPATH": os.pathsep.join(p for p in (str(MITOGEN_DIR), os.environ.get("PYTHONPATH")) if p),
    }


_report = pytest.StashKey[dict]()


class Cluster:
    """The booted VMs of the session, by name, and what Ansible needs to reach them."""

    def __init__(
        self,
        vms: dict[str, vm.Vm],
        workdir: Path,
        inventory: Path,
        package_mirror: mirror.Mirror,
        mirror_log: Path,
        lan: vm.Lan,
        s3_port: int,
    ):
        self.vms = vms
        self.workdir = workdir  # overlays, console logs, inventory
        self.inventory = inventory
        # The private LAN, for a scenario's own VM (test_failover.py's second control host).
        self.lan = lan
        # The host port the control VMs' S3 guestfwd relays to (seaweed.py): a scenario that
        # needs S3 starts SeaweedFS there.
        self.s3_port = s3_port
        self.scratch_port = SCRATCH_PORT  # forwarded on every VM, see Vm.ports
        # The package mirror the build nodes reach (mirror.py), and its access log.
        self.mirror = package_mirror
        self.mirror_log = mirror_log

    def __getitem__(self, name: str) -> vm.Vm:
        return self.vms[name]

    def __iter__(self):
        return iter(self.vms.values())

    def ansible_playbook(
        self,
        playbook: str | Path,
        *args: str,
        timeout: float = ANSIBLE_TIMEOUT_S,
        env: dict[str, str] | None = None,
        log: Path | None = None,
    ):
        """Runs `ansible-playbook -i <inventory> playbook args...`; a failure raises with the
        failed tasks' messages and the end of its output. `env` adds environment variables
        (ANSIBLE_CONFIG, ...); `log`, when given, receives the whole output, failed or not."""
        command = [ANSIBLE_PLAYBOOK, "-i", str(self.inventory), str(playbook), *args]
        proc = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,  # Ansible misbehaves when stdin is not a terminal
            capture_output=True,
            text=True,
            timeout=timeout,
            env={
                **os.environ,
                "ANSIBLE_NOCOLOR": "1",
                "ANSIBLE_HOST_KEY_CHECKING": "False",
                # Connecting (SSH, and Mitogen's bootstrap over it) to an emulated guest on a
                # busy host can take longer than Ansible's default 10 s.
                "ANSIBLE_TIMEOUT": str(ANSIBLE_CONNECT_TIMEOUT_S),
                **_strategy_env(),
                **(env or {}),
            },
        )
        if log is not None:
            log.write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            lines = (proc.stdout + proc.stderr).splitlines()
            # The failed tasks' own messages, which a long per-task timing table at the end
            # of the output would push out of the tail.
            failures = [line for line in lines if line.startswith(("fatal:", "failed:"))]
            tail = "\n".join([*failures, *lines[-ANSIBLE_OUTPUT_TAIL_LINES:]])
            raise AssertionError(f"{shlex.join(command)} exited with {proc.returncode}\n{tail}")
        return proc


_RECAP = re.compile(r"^(\S+)\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)")


def play_recap(output: str) -> dict[str, dict[str, int]]:
    """The PLAY RECAP of ansible-playbook's output: host -> {ok, changed, unreachable, failed}."""
    recap = {}
    for line in output[output.rfind("PLAY RECAP") :].splitlines():
        match = _RECAP.match(line.strip())
        if match:
            host, *counts = match.groups()
            recap[host] = dict(zip(("ok", "changed", "unreachable", "failed"), map(int, counts)))
    return recap


class Platform:
    """Platform.X as scripts/provision installed it on the cluster, and the host's `em`
    configured for it (through control's forwarded ports)."""

    def __init__(
        self,
        cluster: Cluster,
        em: Path,
        em_config_home: Path,
        timings: dict,
        site_vars: dict,
    ):
        self.cluster = cluster
        # The known_hosts scripts/provision wrote from the consoles, beside its inventory.
        self.known_hosts = cluster.workdir / "known_hosts"
        self.em_binary = em
        self.em_config_home = em_config_home  # XDG_CONFIG_HOME holding em/config.toml
        self.domain = PLATFORM_DOMAIN
        self.timings = timings
        self.site_vars = site_vars  # the extra variables site.yml ran with

    def site_yml(self, name: str, **more_vars) -> str:
        """Runs site.yml again, as an operator who changed the inventory: the variables it ran
        with plus `more_vars`. Its output is kept as site-<name>.log; returns it."""
        extra_vars = self.cluster.workdir / f"site-vars-{name}.json"
        extra_vars.write_text(json.dumps({**self.site_vars, **more_vars}, indent=2) + "\n")
        proc = self.cluster.ansible_playbook(
            SITE_PLAYBOOK,
            "-e",
            f"@{extra_vars}",
            env=_site_env(),
            log=self.cluster.workdir / f"site-{name}.log",
        )
        return proc.stdout

    def em(self, *args: str, timeout: float = EM_TIMEOUT_S, check: bool = True):
        """Runs the host's em with the cluster's config; a failure raises with its output."""
        command = [str(self.em_binary), *args]
        proc = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "XDG_CONFIG_HOME": str(self.em_config_home), "NO_COLOR": "1"},
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{shlex.join(command)} exited with {proc.returncode}\n"
                f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
            )
        return proc

    def host_header(self, app: str) -> str:
        return f"{app}.{self.domain}"


def _built_binaries() -> Path:
    """target/debug with apprepo, beacon, maestro and em as the working tree has them: cargo
    builds what changed (a second or two when nothing did, as after `cargo test`)."""
    command = ["nice", "cargo", "build", "--locked"]
    for name in (*SERVICE_BINARIES, "em"):
        command += ["--bin", name]
    subprocess.run(
        command,
        cwd=REPO,
        check=True,
        timeout=CARGO_BUILD_TIMEOUT_S,
        env={**os.environ, "CARGO_TARGET_DIR": str(TARGET_DIR)},
    )
    return TARGET_DIR / "debug"


def _stage_binaries(debug: Path, staging: Path) -> None:
    """Stripped copies of the service binaries: a debug build is hundreds of MB, which SSH
    to an emulated guest copies slowly; without debug info and symbols it is a tenth of it."""
    staging.mkdir(parents=True, exist_ok=True)
    for name in SERVICE_BINARIES:
        subprocess.run(
            ["strip", "-o", str(staging / name), str(debug / name)],
            check=True,
            timeout=STRIP_TIMEOUT_S,
        )


def _site_vars(cluster: Cluster, staging: Path) -> dict:
    control = cluster["control"]
    return {
        # The binaries from the local (stripped) debug build; the units from ../systemd.
        "platformx_bin_dir": str(staging),
        # No time sync: the hypervisor keeps the guests' clocks, the image has no
        # systemd-timesyncd and the guests have no route out to a mirror or a time server.
        "common_time_sync": False,
        "common_time_sync_install": False,
        "beacon_domain": PLATFORM_DOMAIN,
        # em runs on the host and reaches control through its forwarded ports, over HTTPS:
        # 127.0.0.1 is control's ansible_host, which both API certificates name, and the em
        # config the pki role writes trusts the cluster CA (.secrets/ca.pem).
        "pki_em_apprepo_url": f"https://127.0.0.1:{control.ports[7070]}",
        "pki_em_beacon_url": f"https://127.0.0.1:{control.ports[7080]}",
        # The build node installs from the host's mirror (no route out), and gets the
        # builder's pinned uv and a Node runtime archive from the controller.
        "maestro_build_python_index": cluster.mirror.python_index,
        "maestro_build_uv_wheel": str(cluster.mirror.uv_wheel),
        "runtimes_archives": [
            {
                "name": "node",
                "version": mirror.NODE_VERSION,
                "archive": str(cluster.mirror.node_archive),
            }
        ],
    }


def _site_env() -> dict[str, str]:
    return {
        "ANSIBLE_CONFIG": str(ANSIBLE_CONFIG),
        # Each task's time at the end of the output (kept in site-<n>.log).
        "ANSIBLE_CALLBACKS_ENABLED": "ansible.posix.profile_tasks",
        "PROFILE_TASKS_TASK_OUTPUT_LIMIT": "100",
    }


def provision(cluster: Cluster, inventory: Path, release: list[str], extra_vars: Path, web_serial: str):
    """Runs scripts/provision as terraform/provision.tf does, with the VMs' console logs as the
    host keys' source and `release` as its release options (`--bin-dir DIR` for the local
    build, `--release-version V --release-url URL` for a published one); a failure raises with
    the end of its output."""
    command = [
        str(PROVISION),
        "--inventory", str(inventory),
        *release,
        "--private-key", str(next(iter(cluster)).image.ssh_key),
        "--extra-vars", str(extra_vars),
        "--web-serial", web_serial,
        "--host-keys-timeout", str(PROVISION_HOST_KEYS_TIMEOUT_S),
    ]  # fmt: skip
    proc = subprocess.run(
        command,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=ANSIBLE_TIMEOUT_S,
        env={
            **os.environ,
            "ANSIBLE_TIMEOUT": str(ANSIBLE_CONNECT_TIMEOUT_S),
            **_strategy_env(),
            **_site_env(),
        },
    )
    if proc.returncode != 0:
        lines = (proc.stdout + proc.stderr).splitlines()
        failures = [line for line in lines if line.startswith(("fatal:", "failed:"))]
        tail = "\n".join([*failures, *lines[-ANSIBLE_OUTPUT_TAIL_LINES:]])
        raise AssertionError(f"{shlex.join(command)} exited with {proc.returncode}\n{tail}")
    return proc


@pytest.fixture(scope="session")
def platform(request: pytest.FixtureRequest, cluster: Cluster) -> Platform:
    """Provisions the cluster through scripts/provision, the script `terraform apply` runs,
    with an inventory in the shape Terraform renders and the host keys from the VMs' console
    logs, twice (the second run must change nothing), and configures the host's em with the
    config it wrote. The times go to the run's summary."""
    report = request.config.stash.setdefault(_report, {})
    debug = _built_binaries()
    staging = cluster.workdir / "bin"
    _stage_binaries(debug, staging)
    site_vars = _site_vars(cluster, staging)
    extra_vars = cluster.workdir / "site-vars.json"
    extra_vars.write_text(json.dumps(site_vars, indent=2) + "\n")
    inventory = cluster.workdir / "hosts.yml"
    write_provision_inventory(inventory, cluster.vms)
    timings = {}
    # The first run installs everything at once (the CI budget); the second goes one web
    # server at a time, as an upgrade does.
    for run, web_serial in (("first", "100%"), ("second", "1")):
        started = time.monotonic()
        try:
            proc = provision(cluster, inventory, ["--bin-dir", str(staging)], extra_vars, web_serial)
        finally:
            timings[f"scripts/provision {run} run"] = time.monotonic() - started
            report["platform"] = timings
        (cluster.workdir / f"site-{run}.log").write_text(proc.stdout + proc.stderr)
        recap = play_recap(proc.stdout)
        assert set(recap) == {machine.name for machine in cluster}, proc.stdout[-3000:]
        assert all(counts["failed"] == 0 for counts in recap.values()), recap
    changed = {host: counts["changed"] for host, counts in recap.items() if counts["changed"]}
    assert not changed, f"the second site.yml run changed something: {changed}\n{proc.stdout}"

    em_config_home = cluster.workdir / "em-config-home"
    (em_config_home / "em").mkdir(parents=True, exist_ok=True, mode=0o700)
    em_config = em_config_home / "em" / "config.toml"
    shutil.copyfile(cluster.workdir / ".secrets" / "em-config.toml", em_config)
    em_config.chmod(0o600)
    return Platform(cluster, debug / "em", em_config_home, timings, site_vars)


def write_provision_inventory(path: Path, vms: dict[str, vm.Vm], groups: dict[str, tuple[str, ...]] = GROUPS) -> None:
    """The VMs' inventory in the shape terraform/templates/inventory.yml.tftpl renders, with
    each VM's console log (px_console_log) where Terraform names the EC2 instance
    (px_instance_id): scripts/provision reads the host keys from either."""
    control = vms["control"]

    def host(machine: vm.Vm) -> dict:
        return {
            "ansible_host": "127.0.0.1",
            "ansible_port": machine.ssh_port,
            "ansible_user": "root",
            "private_ip": machine.ip,
            "px_console_log": str(machine.console_log),
        }

    children = {
        group: {"hosts": {name: ({} if group == "builders" else host(vms[name])) for name in members}}
        for group, members in groups.items()
    }
    inventory = {
        "all": {
            "vars": {
                "platformx_beacon_address": f"{control.ip}:7443",
                "platformx_repository_url": f"https://{control.ip}:7070",
                "px_beacon_domain": PLATFORM_DOMAIN,
                "px_acme_directory_url": "",
                "px_acme_email": "",
                "ansible_python_interpreter": "/usr/bin/python3",
                "ansible_pipelining": True,
            },
            "children": children,
        }
    }
    header = "# Inventory of this run's VMs in Terraform's shape, written by tests/vm/conftest.py.\n"
    path.write_text(header + json.dumps(inventory, indent=2) + "\n")
    path.chmod(0o600)


def write_inventory(
    path: Path,
    vms: dict[str, vm.Vm],
    groups: dict[str, tuple[str, ...]] = GROUPS,
    host_vars: dict[str, dict[str, str]] | None = None,
) -> None:
    """The Ansible inventory of `vms` in `groups`, with more variables per host (`host_vars`)."""
    key = next(iter(vms.values())).image.ssh_key
    more = host_vars or {}
    lines = [
        "# Ansible inventory of this run's VMs, written by tests/vm/conftest.py.",
        *(
            " ".join([
                f"{name} ansible_port={machine.ssh_port} private_ip={machine.ip}",
                *(f"{var}={value}" for var, value in more.get(name, {}).items()),
            ])  # fmt: skip
            for name, machine in vms.items()
        ),
        "",
        "[all:vars]",
        "ansible_host=127.0.0.1",
        "ansible_user=root",
        f"ansible_ssh_private_key_file={key}",
        "ansible_ssh_common_args='-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null'",
        "ansible_python_interpreter=/usr/bin/python3",
        # Each task's module goes through the open SSH connection instead of a file copied
        # first: a third less time per task on these slow guests.
        "ansible_pipelining=true",
    ]
    for group, members in groups.items():
        lines += ["", f"[{group}]", *members]
    path.write_text("\n".join(lines) + "\n")


def write_ssh_config(path: Path, vms: dict[str, vm.Vm]) -> None:
    """For people: `ssh -F <path> web-1` opens a shell in web-1."""
    lines = ["# ssh -F <this file> <VM name>: a shell in that VM. Written by tests/vm/conftest.py."]
    for name, machine in vms.items():
        lines += [
            f"Host {name}",
            "  HostName 127.0.0.1",
            f"  Port {machine.ssh_port}",
            "  User root",
            f"  IdentityFile {machine.image.ssh_key}",
            "  StrictHostKeyChecking no",
            "  UserKnownHostsFile /dev/null",
            "  LogLevel ERROR",
        ]
    path.write_text("\n".join(lines) + "\n")


def _check_host() -> None:
    missing = [tool for tool in REQUIRED_TOOLS if not shutil.which(tool)]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: run tests/vm/install-tools", pytrace=False)
    if os.geteuid() != 0:
        pytest.fail("the VM tier runs as root (debootstrap, image ownership)", pytrace=False)


@pytest.fixture(scope="session")
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    _check_host()
    report = request.config.stash.setdefault(_report, {})
    keep = os.environ.get("PX_VM_KEEP") == "1"
    workdir = tmp_path_factory.mktemp("vm")

    img = image.ensure_image()
    report["image"] = "cached" if img.cached else f"built in {img.build_seconds:.0f} s"
    # Before the VMs boot: the build nodes' guestfwd rules name it.
    package_mirror = mirror.ensure_mirror(list(MIRRORED_REQUIREMENTS))
    report["mirror"] = (
        "cached" if package_mirror.cached else f"downloaded in {package_mirror.seconds:.0f} s"
    )
    mirror_log = workdir / "mirror-access.log"
    probe_started = time.monotonic()
    accel = vm.choose_accel(img, workdir)
    probe_seconds = time.monotonic() - probe_started
    report["accel"] = accel + (
        f" (KVM probed in {probe_seconds:.0f} s)" if probe_seconds >= 1 else ""
    )

    lan = vm.Lan()
    hosts = {name: ip for name, ip, _ in CLUSTER}
    s3_port = vm.free_port()
    vms = {
        name: vm.Vm(
            name,
            ip,
            image=img,
            lan=lan,
            workdir=workdir,
            hosts=hosts,
            guest_ports=(*ports, SCRATCH_PORT),
            guest_forwards=(
                *((package_mirror.guestfwd(mirror_log),) if name in GROUPS["builders"] else ()),
                *((seaweed.guestfwd(s3_port),) if name in CONTROL_VMS else ()),
            ),
            accel=accel,
            keep=keep,
        )
        for name, ip, ports in CLUSTER
    }
    report["vms"] = list(vms.values())
    report["keep"] = keep
    report["workdir"] = workdir
    started = time.monotonic()
    try:
        for machine in vms.values():
            machine.start()
        deadline = started + vm.BOOT_TIMEOUT_S
        for machine in vms.values():
            machine.wait_ready(max(1.0, deadline - time.monotonic()))
        report["boot"] = time.monotonic() - started
        inventory = workdir / "inventory.ini"
        write_inventory(inventory, vms)
        write_ssh_config(workdir / "ssh_config", vms)
        yield Cluster(vms, workdir, inventory, package_mirror, mirror_log, lan, s3_port)
    finally:
        if not keep:
            for machine in vms.values():
                machine.kill()


# The scenarios' order: each starts from the state the one before left (README.md). The
# release upgrade comes right after the first deploys, on the cluster as provisioned, and
# leaves it on the upgraded release (the site.yml runs after it install that one). The build
# scenario comes after the others, so they run with the cluster they were written for; the ACME
# scenario after them, as it turns HTTPS on across the cluster (site.yml with the ACME
# variables); the failover scenario last, as it moves apprepo to S3 (the apps deployed before
# are no longer in its storage) and adds a control VM of its own.
MODULE_ORDER = (
    "test_cluster_boots",
    "test_deploy_cycle",
    "test_release_upgrade",
    "test_isolation",
    "test_hostile_tenant",
    "test_recovery",
    "test_processes",
    "test_builds",
    "test_acme",
    "test_failover",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Runs the test modules in MODULE_ORDER (pytest's own order is by file name), each
    module's tests in file order; a module not listed runs last."""

    def rank(item: pytest.Item) -> int:
        name = Path(str(item.fspath)).stem
        return MODULE_ORDER.index(name) if name in MODULE_ORDER else len(MODULE_ORDER)

    items.sort(key=rank)


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    write = terminalreporter.write_line
    terminalreporter.section("VM tier")
    # One line scripts/test adds to the suite's total. A skipped scenario counts as failed: in
    # a whole run every scenario must run.
    stats = terminalreporter.stats
    passed = len([r for r in stats.get("passed", []) if r.when == "call"])
    failed = sum(len(stats.get(kind, [])) for kind in ("failed", "error", "skipped"))
    write(f"vm: {passed} passed, {failed} failed")
    report = config.stash.get(_report, None)
    if not report:
        return
    boot = f"{report['boot']:.1f} s" if "boot" in report else "did not finish"
    vms = report.get("vms", [])
    image_state, accel = report.get("image", "not built"), report.get("accel", "not chosen")
    write(f"image: {image_state}; accel: {accel}; {len(vms)} VMs booted to ready: {boot}")
    if "mirror" in report:
        write(f"package mirror: {report['mirror']}")
    for what, seconds in report.get("platform", {}).items():
        write(f"{what} (strategy {ansible_strategy()}): {seconds:.1f} s")
    for what, seconds in report.get("timings", {}).items():
        write(f"{what}: {seconds:.1f} s")
    for what, value in report.get("figures", {}).items():
        write(f"{what}: {value}")
    if exitstatus != 0:
        for machine in vms:
            write(
                f"--- {machine.name}: last {vm.CONSOLE_TAIL_LINES} lines of {machine.console_log}"
            )
            write(machine.console_tail())
    running = [machine for machine in vms if machine.running]
    if report.get("keep") and running:
        workdir = report["workdir"]
        write(f"PX_VM_KEEP=1: the VMs are still running; their files are in {workdir}")
        ssh_config = workdir / "ssh_config"
        for machine in running:
            write(
                f"  {machine.name}: ssh -F {ssh_config} {machine.name}   (qemu pid {machine.pid})"
            )
        write(f"  Ansible: ansible-playbook -i {workdir / 'inventory.ini'} PLAYBOOK")
        write("  End them with: kill " + " ".join(str(machine.pid) for machine in running))


@pytest.fixture(scope="session")
def vm_timings(request: pytest.FixtureRequest) -> dict[str, float]:
    """What -> seconds, printed in the run's summary (a test's own measurements)."""
    return request.config.stash.setdefault(_report, {}).setdefault("timings", {})


@pytest.fixture(scope="session")
def vm_figures(request: pytest.FixtureRequest) -> dict[str, object]:
    """What -> a figure other than seconds (a count), printed as is in the run's summary after
    the timings."""
    return request.config.stash.setdefault(_report, {}).setdefault("figures", {})
