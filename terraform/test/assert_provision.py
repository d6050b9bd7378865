"""The provisioning step (provision.tf), for assert_cluster.py: that the defaults plan it, that
the apply ran it once with what scripts/provision needs (test/provision_stand_in.py records
each run), and that a new release replaces it alone.

Each function takes the `check(ok, what, detail)` of assert_cluster.py, so every result is
counted there.
"""

import hashlib
import json
from pathlib import Path

PROVISION = "terraform_data.provision[0]"


def defaults(check, plan):
    """provision defaults to true: the plan has the step, after every host it configures."""
    steps = [rc for rc in plan["resource_changes"] if rc["address"] == PROVISION]
    check(len(steps) == 1 and steps[0]["change"]["actions"] == ["create"], "provision = true by default: the apply configures the hosts",
          [rc["address"] for rc in steps])


def runs(check, record_file, count, tfvars, release):
    """The stand-in ran `count` times in all; its last run saw every host and `release` as it is now
    (a tarball's path, or `version <version> <url>` for a published release)."""
    lines = Path(record_file).read_text().splitlines() if Path(record_file).exists() else []
    check(len(lines) == int(count), f"the provisioning ran {count} time(s) in all", len(lines))
    if not lines:
        return
    last = json.loads(lines[-1])
    prefix = tfvars["name_prefix"]
    hosts = sorted([f"{prefix}-control-{i}" for i in range(1, tfvars["control_count"] + 1)]
                   + [f"{prefix}-web-{i}" for i in range(1, tfvars["web_count"] + 1)])
    check(last["hosts"] == hosts, "it was given every host, each with its instance id and console output", last["hosts"])
    if release.startswith("version "):
        # A published release: its version and URL, which the roles fetch.
        check(last["release"] == release and last["release_sha256"] is None,
              f"it was given the published release ({release})", last)
        return
    sha = hashlib.sha256(Path(release).read_bytes()).hexdigest()
    check(last["release"] == release and last["release_sha256"] == sha, "it was given the release as it is now", last)


def only_provision_replaced(check, plan, moto_quirk):
    """After the release changed: the provisioning is replaced (it runs again) and nothing else
    changes, besides the updates `moto_quirk` recognises (moto's read-back differences, which
    the second plan after the apply allows for too)."""
    changes = [(rc["address"], rc["change"]["actions"]) for rc in plan.get("resource_changes", [])
               if rc["change"]["actions"] != ["no-op"] and not (rc["change"]["actions"] == ["update"] and moto_quirk(rc))]
    check(changes == [(PROVISION, ["delete", "create"])], "a new release replaces the provisioning step and nothing else", changes)
