"""Smoke test of the VM harness: three systemd machines boot, see each other, and stay apart;
then scripts/provision, the script `terraform apply` runs, configures them as it would EC2 hosts."""

from __future__ import annotations

import itertools
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from appcheck import wait_for_nodes

# A throwaway HTTP server in a guest starts listening within this (Python's start-up under
# emulation is the slow part).
HTTP_READY_TIMEOUT_S = 60
HTTP_RETRY_INTERVAL_S = 0.5
# One ping on the LAN.
PING_TIMEOUT_S = 5
# One SSH login to a VM from the host.
SSH_CHECK_TIMEOUT_S = 60


def test_systemd_is_pid_1_and_every_unit_started(cluster):
    for machine in cluster:
        assert machine.ssh("ps -p 1 -o comm=").stdout.strip() == "systemd"
        state = machine.ssh("systemctl is-system-running --wait", check=False).stdout.strip()
        failed = machine.ssh("systemctl --failed --no-legend --plain").stdout
        assert state == "running", f"{machine.name} is {state}; failed units:\n{failed}"


def test_each_vm_is_named_and_addressed_as_configured(cluster):
    for machine in cluster:
        # Maestro takes its node name from /etc/hostname.
        names = machine.ssh("cat /etc/hostname; hostname").stdout.split()
        assert names == [machine.name, machine.name]
        assert f"inet {machine.ip}/" in machine.ssh("ip -4 -o addr show dev eth1").stdout


def test_vms_reach_each_other_by_name_on_the_private_lan(cluster):
    for machine, other in itertools.permutations(cluster, 2):
        assert machine.ssh(f"getent hosts {other.name}").stdout.split()[0] == other.ip
        machine.ssh(f"ping -c1 -W{PING_TIMEOUT_S} {other.name}")
        machine.ssh(f"timeout {PING_TIMEOUT_S} bash -c '</dev/tcp/{other.name}/22'")


def test_a_forwarded_port_reaches_the_guest(cluster):
    web = cluster["web-1"]
    port = cluster.scratch_port
    token = uuid.uuid4().hex
    web.ssh(
        f"mkdir -p /srv/smoke && echo {token} > /srv/smoke/token && "
        f"systemd-run --unit=px-smoke-http python3 -m http.server --directory /srv/smoke {port}"
    )
    try:
        url = f"http://127.0.0.1:{web.ports[port]}/token"
        deadline = time.monotonic() + HTTP_READY_TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(url, timeout=HTTP_READY_TIMEOUT_S) as response:
                    assert response.read().decode().strip() == token
                    break
            except (urllib.error.URLError, ConnectionError) as err:
                # Until the server listens, qemu accepts the connection and then drops it.
                if time.monotonic() > deadline:
                    pytest.fail(f"{url} did not answer in {HTTP_READY_TIMEOUT_S} s: {err}")
                time.sleep(HTTP_RETRY_INTERVAL_S)
    finally:
        web.ssh("systemctl stop px-smoke-http", check=False)


def test_each_vm_has_its_own_disk_and_identity(cluster):
    token = uuid.uuid4().hex
    cluster["web-1"].ssh(f"echo {token} > /root/overlay-check")
    for machine in cluster:
        found = machine.ssh("cat /root/overlay-check", check=False).stdout.strip()
        assert (found == token) == (machine.name == "web-1"), machine.name
    machine_ids = {machine.ssh("cat /etc/machine-id").stdout.strip() for machine in cluster}
    assert len(machine_ids) == len(cluster.vms)


def test_a_rebooted_vm_comes_back_with_its_disk(cluster):
    web = cluster["web-2"]
    token = uuid.uuid4().hex
    web.ssh(f"echo {token} > /root/reboot-check && sync")
    boot_id = web.ssh("cat /proc/sys/kernel/random/boot_id").stdout
    seconds = web.reboot()
    print(f"web-2 rebooted in {seconds:.1f} s")
    assert web.ssh("cat /proc/sys/kernel/random/boot_id").stdout != boot_id
    assert web.ssh("cat /root/reboot-check").stdout.strip() == token
    cluster["control"].ssh(f"ping -c1 -W{PING_TIMEOUT_S} web-2")


def test_ansible_manages_every_vm(cluster):
    cluster.ansible_playbook(Path(__file__).with_name("smoke-playbook.yml"))


def _ssh_with_known_hosts(machine, known_hosts: Path) -> subprocess.CompletedProcess:
    """`ssh` to the VM trusting only `known_hosts`, as scripts/provision's Ansible does."""
    return subprocess.run(
        [
            "ssh", "-i", str(machine.image.ssh_key), "-p", str(machine.ssh_port),
            "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
            "root@127.0.0.1", "true",
        ],  # fmt: skip
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=SSH_CHECK_TIMEOUT_S,
    )


def test_provisioning_trusts_each_vm_by_the_host_key_its_console_printed(platform, tmp_path):
    """scripts/provision (the `platform` fixture, as `terraform apply` runs it) wrote a
    known_hosts from the consoles: each VM's own key, which SSH accepts, and a known_hosts
    naming another VM's key for a VM is refused."""
    cluster = platform.cluster
    lines = [line for line in platform.known_hosts.read_text().splitlines() if line and not line.startswith("#")]
    assert oct(platform.known_hosts.stat().st_mode & 0o777) == "0o600"
    by_pattern = {line.split()[0]: " ".join(line.split()[1:3]) for line in lines}
    keys = {}
    for machine in cluster:
        served = " ".join(machine.ssh("cat /etc/ssh/ssh_host_ed25519_key.pub").stdout.split()[:2])
        keys[machine.name] = served
        assert by_pattern.get(f"[127.0.0.1]:{machine.ssh_port}") == served, machine.name
        proc = _ssh_with_known_hosts(machine, platform.known_hosts)
        assert proc.returncode == 0, proc.stderr
    assert len(set(keys.values())) == len(keys), "the VMs share a host key"

    # web-1's entry with web-2's key: SSH (and so Ansible) refuses web-1.
    web1, web2 = cluster["web-1"], cluster["web-2"]
    forged = tmp_path / "known_hosts"
    forged.write_text(f"[127.0.0.1]:{web1.ssh_port} {keys['web-2']}\n")
    proc = _ssh_with_known_hosts(web1, forged)
    assert proc.returncode != 0 and "Host key verification failed" in proc.stderr, proc.stderr
    assert keys[web2.name] != keys[web1.name]


def test_provisioning_ends_with_a_cluster_em_reaches(platform):
    """The em config scripts/provision's run wrote reaches Beacon: `em status` shows both web
    servers' Maestros linked."""
    wait_for_nodes(platform)
