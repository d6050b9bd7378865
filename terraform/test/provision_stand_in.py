"""test/provision_stand_in.py: what terraform/check's apply runs instead of scripts/provision.

The one stand-in of the emulator test: moto's instances are records, not machines, so there is
no host to reach over SSH. Terraform starts this with exactly the arguments it would give
scripts/provision (provision_command), and it checks what it was given, with scripts/provision's
own code where it can run here:
- the inventory file: mode 0600 in a directory only its owner reads, every instance of the
  test cluster in it with its instance id, and the region, domain and ACME settings of
  test/moto.tfvars.json (its path in PX_TFVARS);
- the host keys' source: scripts/provision's EC2 console reader fetches each instance's console
  output from moto (at MOTO_ENDPOINT) with the region the inventory names;
- the release (PX_EXPECT_RELEASE: a tarball's path, or `version <version> <url>` for a
  published one given as --release-version and --release-url) and the web servers' batch size.
Each run appends one JSON line to PX_PROVISION_RECORD (so the check counts the runs: one per
apply that replaced the provisioning) and exits non-zero on the first mismatch, which fails the
apply as a failed site.yml would.
"""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def provision_module():
    spec = importlib.util.spec_from_file_location("provision", REPO / "ansible" / "provision.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fail(message: str) -> None:
    print(f"provision stand-in: {message}", file=sys.stderr)
    sys.exit(1)


def main() -> None:
    provision = provision_module()
    args = provision.parse_args(sys.argv[1:])
    tfvars = json.loads(Path(os.environ["PX_TFVARS"]).read_text())

    inventory = args.inventory
    mode = stat.S_IMODE(inventory.stat().st_mode)
    if mode != 0o600:
        fail(f"{inventory} has mode {mode:o}, not 600")
    dir_mode = stat.S_IMODE(inventory.parent.stat().st_mode)
    if dir_mode & 0o077:
        fail(f"{inventory.parent} has mode {dir_mode:o}: others may read the cluster's secrets there")

    hosts = provision.load_inventory(inventory)
    prefix = tfvars["name_prefix"]
    want = [f"{prefix}-control-{i}" for i in range(1, tfvars["control_count"] + 1)]
    want += [f"{prefix}-web-{i}" for i in range(1, tfvars["web_count"] + 1)]
    if sorted(hosts) != sorted(want):
        fail(f"inventory hosts {sorted(hosts)}, expected {sorted(want)}")
    all_vars = provision.inventory_vars(inventory)
    settings = {k: all_vars.get(k) for k in ("px_aws_region", "px_beacon_domain", "px_acme_directory_url", "px_acme_email")}
    expected = {
        "px_aws_region": tfvars["region"],
        "px_beacon_domain": tfvars["domain"],
        "px_acme_directory_url": tfvars["acme_directory_url"],
        "px_acme_email": tfvars["acme_email"],
    }
    if settings != expected:
        fail(f"inventory settings {settings}, expected {expected}")

    # The host keys' source: each instance's console output, read as scripts/provision reads it.
    os.environ.update(
        AWS_ENDPOINT_URL=os.environ["MOTO_ENDPOINT"], AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing"
    )
    read_console = provision.ec2_console(all_vars["px_aws_region"])
    consoles = {}
    for name, host_vars in hosts.items():
        instance_id = host_vars.get("px_instance_id", "")
        if not instance_id.startswith("i-"):
            fail(f"{name} has no instance id (px_instance_id={instance_id!r})")
        consoles[name] = len(read_console(instance_id))
        if consoles[name] == 0:
            fail(f"no console output for {name} ({instance_id})")

    # A published version is given as its version and URL; a tarball as its path.
    if args.release_version is not None:
        release = f"version {args.release_version} {args.release_url}"
    else:
        release = str(args.release_tarball)
    if release != os.environ["PX_EXPECT_RELEASE"]:
        fail(f"release {release}, expected {os.environ['PX_EXPECT_RELEASE']}")
    # The published tarball of the hosts' architecture (terraform's `architecture`, x86_64 here).
    if args.release_version is not None and args.release_target != "x86_64-unknown-linux-gnu":
        fail(f"release target {args.release_target}, expected x86_64-unknown-linux-gnu (the hosts' architecture)")
    if args.web_serial != "1":
        fail(f"web servers {args.web_serial} at a time, expected 1")

    record = {
        "hosts": sorted(hosts),
        "release": release,
        "release_sha256": provision_sha256(args.release_tarball) if args.release_tarball else None,
        "console_bytes": consoles,
    }
    with open(os.environ["PX_PROVISION_RECORD"], "a") as out:
        out.write(json.dumps(record) + "\n")
    print(f"provision stand-in: {len(hosts)} hosts, release {release}: as expected")


def provision_sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


if __name__ == "__main__":
    main()
