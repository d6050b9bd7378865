"""Fixtures of the VM tier: `cluster`, the session's booted VMs with an Ansible inventory.

The session builds (or finds cached) the image, boots control, web-1 and web-2 in parallel and
hands them to every test that asks for `cluster`. At the end the VMs are killed, unless
PX_VM_KEEP=1; the run's summary says how long the image and the boot took and, when a test
failed, where each VM's console log is and how it ends.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest

import image
import vm

# The cluster: name, private IP, and the guest ports forwarded to the host (each to a free host
# port, see Vm.ports). control runs apprepo and Beacon (API, status page, Maestro links); the web
# servers run Maestro (HTTP, status). SCRATCH_PORT is added to every VM.
CLUSTER = (
    ("control", "10.77.0.10", (7070, 7071, 7072)),
    ("web-1", "10.77.0.11", (80, 7090)),
    ("web-2", "10.77.0.12", (80, 7090)),
)
# Forwarded on every VM for a test's own throwaway server; the platform never listens there.
SCRATCH_PORT = 8999
# Ansible groups, as ansible/site.yml expects them.
GROUPS = {
    "repository": ("control",),
    "beacon": ("control",),
    "webservers": ("web-1", "web-2"),
}
# One ansible-playbook run (a whole site.yml on three emulated machines included).
ANSIBLE_TIMEOUT_S = 20 * 60
# Lines of ansible-playbook's output kept in a failure's message.
ANSIBLE_OUTPUT_TAIL_LINES = 60

# What the tier runs on the host; tests/vm/install-tools installs them.
REQUIRED_TOOLS = (
    "qemu-system-x86_64",
    "qemu-img",
    "debootstrap",
    "mkfs.ext4",
    "ssh",
    "ssh-keygen",
    "ansible-playbook",
)

_report = pytest.StashKey[dict]()


class Cluster:
    """The booted VMs of the session, by name, and what Ansible needs to reach them."""

    def __init__(self, vms: dict[str, vm.Vm], workdir: Path, inventory: Path):
        self.vms = vms
        self.workdir = workdir  # overlays, console logs, inventory
        self.inventory = inventory
        self.scratch_port = SCRATCH_PORT  # forwarded on every VM, see Vm.ports

    def __getitem__(self, name: str) -> vm.Vm:
        return self.vms[name]

    def __iter__(self):
        return iter(self.vms.values())

    def ansible_playbook(
        self, playbook: str | Path, *args: str, timeout: float = ANSIBLE_TIMEOUT_S
    ):
        """Runs `ansible-playbook -i <inventory> playbook args...`; a failure raises with the
        end of its output."""
        command = ["ansible-playbook", "-i", str(self.inventory), str(playbook), *args]
        proc = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,  # Ansible misbehaves when stdin is not a terminal
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_HOST_KEY_CHECKING": "False"},
        )
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-ANSIBLE_OUTPUT_TAIL_LINES:])
            raise AssertionError(f"{shlex.join(command)} exited with {proc.returncode}\n{tail}")
        return proc


def write_inventory(path: Path, vms: dict[str, vm.Vm]) -> None:
    key = next(iter(vms.values())).image.ssh_key
    lines = [
        "# Ansible inventory of this run's VMs, written by tests/vm/conftest.py.",
        *(
            f"{name} ansible_port={machine.ssh_port} private_ip={machine.ip}"
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
    for group, members in GROUPS.items():
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
    probe_started = time.monotonic()
    accel = vm.choose_accel(img, workdir)
    probe_seconds = time.monotonic() - probe_started
    report["accel"] = accel + (
        f" (KVM probed in {probe_seconds:.0f} s)" if probe_seconds >= 1 else ""
    )

    lan = vm.Lan()
    hosts = {name: ip for name, ip, _ in CLUSTER}
    vms = {
        name: vm.Vm(
            name,
            ip,
            image=img,
            lan=lan,
            workdir=workdir,
            hosts=hosts,
            guest_ports=(*ports, SCRATCH_PORT),
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
        yield Cluster(vms, workdir, inventory)
    finally:
        if not keep:
            for machine in vms.values():
                machine.kill()


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    report = config.stash.get(_report, None)
    if not report:
        return
    write = terminalreporter.write_line
    terminalreporter.section("VM tier")
    boot = f"{report['boot']:.1f} s" if "boot" in report else "did not finish"
    vms = report.get("vms", [])
    image_state, accel = report.get("image", "not built"), report.get("accel", "not chosen")
    write(f"image: {image_state}; accel: {accel}; {len(vms)} VMs booted to ready: {boot}")
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
