"""ansible/provision.py: configures a Platform.X cluster from an Ansible inventory (run through
scripts/provision, which makes the venv this runs in).

1. Host keys: each host's SSH host keys are read from its console output, where cloud-init (or
   the VM tier's image) prints them between `-----BEGIN SSH HOST KEY KEYS-----` and
   `-----END SSH HOST KEY KEYS-----`: EC2's console output for a host with `px_instance_id`
   (fetched with the operator's AWS credentials, a channel SSH's first contact does not
   have), a file for a host with `px_console_log`. They go to a known_hosts of the cluster's
   own, the only one Ansible uses, with strict checking: no trust on first use. Machines with
   neither come with a known_hosts the operator checked (`--known-hosts`).
2. `ansible/site.yml` with `ansible/ansible.cfg`, the inventory (the domain and ACME settings
   are in it) and the release: a published version (`--release-version` and `--release-url`,
   with `--release-target` for hosts that are not x86_64, which the roles fetch once and check
   against its `.sha256`), a tarball
   (`--release-tarball`, from scripts/dist) or a directory of binaries (`--bin-dir`). The web servers' play goes `--web-serial` hosts at a
   time, so an upgrade never restarts every Maestro at once.
3. The em config the pki role wrote (`<inventory dir>/.secrets/em-config.toml`), and the
   commands that point em at the cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
ANSIBLE_DIR = REPO / "ansible"
SITE_PLAYBOOK = ANSIBLE_DIR / "site.yml"
ANSIBLE_CONFIG = ANSIBLE_DIR / "ansible.cfg"

BEGIN_KEYS = "-----BEGIN SSH HOST KEY KEYS-----"
END_KEYS = "-----END SSH HOST KEY KEYS-----"
# The key types sshd offers; a line of the block naming another is refused, not guessed at.
KEY_TYPES = (
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
)
KEY_LINE = re.compile(r"(?:^|\s)(" + "|".join(map(re.escape, KEY_TYPES)) + r") ([A-Za-z0-9+/]+={0,2})(?:\s|$)")
# A new EC2 instance's console output appears a few minutes after boot (AWS updates it
# lazily); a VM's console log has the keys within its boot.
HOST_KEYS_TIMEOUT_S = 15 * 60
HOST_KEYS_POLL_INTERVAL_S = 10
# The largest inventory and console output read: far above a 50-host cluster's and EC2's
# console output (64 KiB), and small enough that a wrong path is refused quickly.
MAX_INVENTORY_BYTES = 1024 * 1024
MAX_CONSOLE_BYTES = 16 * 1024 * 1024
# One whole site.yml run; a real cluster takes minutes, an emulated one up to about ten.
ANSIBLE_TIMEOUT_S = 60 * 60
# The web servers' play goes this many hosts at a time by default: one, so an upgrade restarts
# one Maestro at a time while the others serve.
DEFAULT_WEB_SERIAL = "1"
WEB_SERIAL = re.compile(r"^([1-9][0-9]{0,3}|[1-9][0-9]?%|100%)$")
# A published release's version: it names a directory of the controller's cache and a file
# under --release-url, so nothing that could leave either (no slash, no leading dot).
RELEASE_VERSION = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._+-]{0,63}$")
RELEASE_URL = re.compile(r"^(https?|file)://\S+$")
# The targets scripts/dist makes release tarballs for (its --target).
RELEASE_TARGETS = ("x86_64-unknown-linux-gnu", "aarch64-unknown-linux-gnu")


class ProvisionError(Exception):
    """A problem the operator can fix; printed without a traceback."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/provision",
        description="Configure a Platform.X cluster from an Ansible inventory (ansible/site.yml).",
    )
    parser.add_argument("--inventory", required=True, type=Path, help="YAML inventory, as Terraform renders it")
    release = parser.add_mutually_exclusive_group(required=True)
    release.add_argument("--release-tarball", type=Path, help="release tarball from scripts/dist")
    release.add_argument("--bin-dir", type=Path, help="directory holding apprepo, beacon and maestro")
    release.add_argument(
        "--release-version",
        help="a published release's version (e.g. 1.2.0), fetched from --release-url and checked against its .sha256",
    )
    parser.add_argument(
        "--release-url",
        help="where scripts/dist's tarballs are published (https://, http:// or file://): "
        "<url>/platformx-<version>-<target>.tar.gz and its .sha256",
    )
    parser.add_argument(
        "--release-target",
        choices=RELEASE_TARGETS,
        help="the hosts' target triple, which names the published tarball (default: the roles' "
        "platformx_release_target, x86_64-unknown-linux-gnu)",
    )
    parser.add_argument(
        "--known-hosts",
        type=Path,
        help="a known_hosts the operator checked, for hosts without px_instance_id or px_console_log",
    )
    parser.add_argument("--private-key", type=Path, help="SSH private key (default: ssh-agent, ~/.ssh)")
    parser.add_argument("--aws-region", help="region of the px_instance_id hosts (default: the inventory's px_aws_region)")
    parser.add_argument(
        "--extra-vars", action="append", type=Path, default=[], help="a YAML or JSON file of more variables for site.yml"
    )
    parser.add_argument(
        "--web-serial",
        default=DEFAULT_WEB_SERIAL,
        help=f"web servers configured at a time: a count or a percentage (default {DEFAULT_WEB_SERIAL})",
    )
    parser.add_argument(
        "--host-keys-timeout", type=float, default=HOST_KEYS_TIMEOUT_S, help="seconds to wait for a host's keys"
    )
    args = parser.parse_args(argv)
    if args.release_version is not None:
        if not RELEASE_VERSION.match(args.release_version):
            parser.error(
                f"--release-version {args.release_version!r} is not a version: up to 64 letters, digits, "
                "dots, dashes, pluses and underscores, such as 1.2.0"
            )
        if args.release_url is None:
            parser.error("--release-version needs --release-url, where the release tarballs are published")
        if not RELEASE_URL.match(args.release_url):
            parser.error(f"--release-url must be an https://, http:// or file:// URL, not {args.release_url!r}")
    elif args.release_url is not None:
        parser.error("--release-url is only used with --release-version")
    if args.release_target is not None and args.release_version is None:
        parser.error("--release-target is only used with --release-version (a tarball or binaries are of one target already)")
    if not WEB_SERIAL.match(args.web_serial):
        parser.error(f"--web-serial must be a count from 1 to 9999 or a percentage from 1% to 100%, not {args.web_serial!r}")
    return args


def load_inventory(path: Path) -> dict[str, dict]:
    """The inventory's hosts: name -> the variables set on the host itself (YAML form only)."""
    if not path.is_file():
        raise ProvisionError(f"no inventory at {path}")
    if path.stat().st_size > MAX_INVENTORY_BYTES:
        raise ProvisionError(f"{path} is over {MAX_INVENTORY_BYTES} bytes: not an inventory")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ProvisionError(f"{path} is not YAML: {err}") from err
    if not isinstance(data, dict) or not isinstance(data.get("all"), dict):
        raise ProvisionError(f"{path} has no `all` group: expected a YAML inventory as Terraform renders it")
    hosts: dict[str, dict] = {}

    def walk(group: dict) -> None:
        for name, host_vars in (group.get("hosts") or {}).items():
            hosts.setdefault(name, {}).update(host_vars or {})
        for child in (group.get("children") or {}).values():
            walk(child or {})

    walk(data["all"])
    if not hosts:
        raise ProvisionError(f"{path} names no hosts")
    return hosts


def inventory_vars(path: Path) -> dict:
    return (yaml.safe_load(path.read_text())["all"].get("vars")) or {}


def host_keys_from_console(text: str) -> list[tuple[str, str]]:
    """The (type, base64) keys of the last complete host-key block of a console output: a host
    that rebooted printed its keys again, and the latest block is the one sshd serves now."""
    text = text.replace("\r", "")
    end = text.rfind(END_KEYS)
    if end < 0:
        return []
    begin = text.rfind(BEGIN_KEYS, 0, end)
    if begin < 0:
        return []
    keys = []
    for line in text[begin + len(BEGIN_KEYS) : end].splitlines():
        match = KEY_LINE.search(line)
        if match:
            keys.append((match.group(1), match.group(2)))
    return keys


def known_hosts_pattern(host_vars: dict, name: str) -> str:
    address = str(host_vars.get("ansible_host") or name)
    port = int(host_vars.get("ansible_port") or 22)
    return address if port == 22 else f"[{address}]:{port}"


def console_of_file(path: Path) -> str:
    if not path.is_file():
        return ""
    with open(path, "rb") as log:
        size = path.stat().st_size
        log.seek(max(0, size - MAX_CONSOLE_BYTES))
        return log.read().decode(errors="replace")


def ec2_console(region: str | None):
    """A function instance id -> console output text (the latest, not the boot-time cache)."""
    import boto3  # only when a host needs it: the operator's AWS credentials are read here

    client = boto3.client("ec2", region_name=region)

    def read(instance_id: str) -> str:
        try:
            reply = client.get_console_output(InstanceId=instance_id, Latest=True)
        except client.exceptions.ClientError as err:
            if "UnsupportedOperation" in str(err):
                # Latest=True needs a Nitro instance; older ones give the boot-time output.
                reply = client.get_console_output(InstanceId=instance_id)
            else:
                raise
        # botocore decodes the base64 the API sends (its decode_console_output handler).
        return reply.get("Output") or ""

    return read


def collect_host_keys(hosts: dict[str, dict], args: argparse.Namespace, region: str | None) -> list[str]:
    """known_hosts lines for every host with a console to read; waits for the slow ones."""
    sources = {}
    for name, host_vars in hosts.items():
        if host_vars.get("px_console_log"):
            sources[name] = ("console log", str(host_vars["px_console_log"]))
        elif host_vars.get("px_instance_id"):
            sources[name] = ("EC2 console output", str(host_vars["px_instance_id"]))
        elif args.known_hosts is None:
            raise ProvisionError(
                f"host {name} has neither px_instance_id nor px_console_log: its SSH host key cannot be "
                "checked. Give a known_hosts you verified with --known-hosts."
            )
    reader = None
    if any(kind == "EC2 console output" for kind, _ in sources.values()):
        reader = ec2_console(region)
    lines = []
    pending = dict(sources)
    deadline = time.monotonic() + args.host_keys_timeout
    while pending:
        for name, (kind, where) in list(pending.items()):
            text = console_of_file(Path(where)) if kind == "console log" else reader(where)
            keys = host_keys_from_console(text)
            if keys:
                pattern = known_hosts_pattern(hosts[name], name)
                lines += [f"{pattern} {key_type} {key}" for key_type, key in keys]
                print(f"provision: {name}: {len(keys)} host keys from its {kind} ({where})", flush=True)
                del pending[name]
        if not pending:
            break
        if time.monotonic() > deadline:
            missing = ", ".join(f"{name} ({kind} {where})" for name, (kind, where) in pending.items())
            raise ProvisionError(
                f"no SSH host keys after {args.host_keys_timeout:.0f} s in the console output of {missing}: "
                f"is cloud-init printing them (`{BEGIN_KEYS}`)?"
            )
        time.sleep(min(HOST_KEYS_POLL_INTERVAL_S, max(0.1, deadline - time.monotonic())))
    return lines


def write_known_hosts(path: Path, lines: list[str], operator_file: Path | None) -> None:
    if operator_file is not None:
        if not operator_file.is_file():
            raise ProvisionError(f"--known-hosts {operator_file} is not a file")
        lines = [*lines, *operator_file.read_text().splitlines()]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write("# The cluster's SSH host keys, written by scripts/provision from the hosts' console output.\n")
        out.write("\n".join(lines) + "\n")
    path.chmod(0o600)


def site_yml_command(args: argparse.Namespace, venv_bin: Path, release_vars: Path) -> list[str]:
    command = [str(venv_bin / "ansible-playbook"), "-i", str(args.inventory.resolve()), str(SITE_PLAYBOOK)]
    command += ["-e", f"@{release_vars}"]
    for extra in args.extra_vars:
        command += ["-e", f"@{extra.resolve()}"]
    if args.private_key is not None:
        command += ["--private-key", str(args.private_key.resolve())]
    return command


def ansible_env(known_hosts: Path) -> dict[str, str]:
    """The operator's environment (ANSIBLE_STRATEGY and the like pass through), with host key
    checking forced on against the cluster's own known_hosts and nothing else."""
    ssh_args = f"-o UserKnownHostsFile={known_hosts} -o GlobalKnownHostsFile=/dev/null -o StrictHostKeyChecking=yes"
    return {
        **os.environ,
        "ANSIBLE_CONFIG": str(ANSIBLE_CONFIG),
        "ANSIBLE_HOST_KEY_CHECKING": "True",
        "ANSIBLE_SSH_COMMON_ARGS": ssh_args,
        "ANSIBLE_NOCOLOR": os.environ.get("ANSIBLE_NOCOLOR", "1"),
    }


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    inventory = args.inventory.resolve()
    hosts = load_inventory(inventory)
    workdir = inventory.parent
    region = args.aws_region or inventory_vars(inventory).get("px_aws_region")

    known_hosts = workdir / "known_hosts"
    lines = collect_host_keys(hosts, args, region)
    write_known_hosts(known_hosts, lines, args.known_hosts)
    print(f"provision: {known_hosts}: keys of {len(hosts)} hosts ({time.monotonic() - started:.0f} s)", flush=True)

    if args.release_version is not None:
        # The roles fetch it (once, on this machine) and check it against its .sha256.
        release = {
            "platformx_release_version": args.release_version,
            "platformx_release_url": args.release_url,
            "platformx_release_tarball": "",
        }
        if args.release_target is not None:
            release["platformx_release_target"] = args.release_target
    elif args.release_tarball is not None:
        if not args.release_tarball.is_file():
            raise ProvisionError(f"--release-tarball {args.release_tarball} is not a file")
        release = {"platformx_release_tarball": str(args.release_tarball.resolve()), "platformx_release_version": ""}
    else:
        missing = [b for b in ("apprepo", "beacon", "maestro") if not (args.bin_dir / b).is_file()]
        if missing:
            raise ProvisionError(f"--bin-dir {args.bin_dir} lacks {', '.join(missing)}")
        release = {
            "platformx_bin_dir": str(args.bin_dir.resolve()),
            "platformx_release_tarball": "",
            "platformx_release_version": "",
        }
    release["platformx_web_serial"] = args.web_serial
    release_vars = workdir / "provision-vars.json"
    release_vars.write_text(json.dumps(release, indent=2) + "\n")

    command = site_yml_command(args, Path(sys.executable).parent, release_vars)
    print(f"provision: {' '.join(command)}", flush=True)
    ansible_started = time.monotonic()
    try:
        proc = subprocess.run(
            command, cwd=ANSIBLE_DIR, env=ansible_env(known_hosts), stdin=subprocess.DEVNULL, timeout=ANSIBLE_TIMEOUT_S
        )
    except subprocess.TimeoutExpired as err:
        raise ProvisionError(f"site.yml did not finish in {ANSIBLE_TIMEOUT_S} s") from err
    if proc.returncode != 0:
        raise ProvisionError(f"site.yml failed (exit {proc.returncode}): see its output above")
    print(f"provision: site.yml done in {time.monotonic() - ansible_started:.0f} s", flush=True)

    em_config = workdir / ".secrets" / "em-config.toml"
    print(f"provision: the cluster is configured ({time.monotonic() - started:.0f} s in all).")
    print("provision: point em at it with")
    print(f"  install -D -m 0600 {em_config} ~/.config/em/config.toml")
    print("  em status")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except ProvisionError as err:
        print(f"provision: {err}", file=sys.stderr)
        sys.exit(1)
