"""test/provision_unit.py: scripts/provision's host-key handling on console outputs shaped as
EC2 gives them (cloud-init's block among boot messages, carriage returns, prefixes), run by
terraform/check with its venv's Python, and its options for the release (a version with its URL,
a tarball or a directory, one of them). Prints every check and `provision: N passed, N failed`.
"""

import contextlib
import importlib.util
import io
import sys
import tempfile
from argparse import Namespace
from pathlib import Path

from cryptography.hazmat.primitives import serialization as s
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("provision", REPO / "ansible" / "provision.py")
provision = importlib.util.module_from_spec(spec)
spec.loader.exec_module(provision)

passed = failed = 0


def check(ok, what, detail=""):
    global passed, failed
    passed, failed = (passed + 1, failed) if ok else (passed, failed + 1)
    print(f"  {'ok  ' if ok else 'FAIL'} {what}" + ("" if ok else f": {detail}"))


def public_key(private):
    return private.public_key().public_bytes(s.Encoding.OpenSSH, s.PublicFormat.OpenSSH).decode()


def console(*keys, host="ip-10-42-0-5"):
    return "\r\n".join([
        "[   11.802113] cloud-init[612]: Cloud-init v. 22.4.2 running 'modules:final'",
        "ec2: -----BEGIN SSH HOST KEY FINGERPRINTS-----",
        "ec2: 256 SHA256:abc root@host (ED25519)",
        "ec2: -----END SSH HOST KEY FINGERPRINTS-----",
        provision.BEGIN_KEYS,
        *(f"{key} root@{host}" for key in keys),
        provision.END_KEYS,
        "[   12.1] cloud-init[612]: Cloud-init v. 22.4.2 finished",
    ])


old_ed = public_key(ed25519.Ed25519PrivateKey.generate())
new_ed = public_key(ed25519.Ed25519PrivateKey.generate())
new_ec = public_key(ec.generate_private_key(ec.SECP256R1()))

print("scripts/provision: host keys from console output")
keys = provision.host_keys_from_console(console(new_ec, new_ed))
check(keys == [tuple(new_ec.split()), tuple(new_ed.split())], "both keys of cloud-init's block, in order", keys)
rebooted = console(old_ed) + "\n" + console(new_ed)
check(provision.host_keys_from_console(rebooted) == [tuple(new_ed.split())], "a host that printed twice: the last block")
half = console(new_ed).split(provision.END_KEYS)[0]
check(provision.host_keys_from_console(half) == [], "a block not yet ended gives no key (the console is read again)")
check(provision.host_keys_from_console("no keys here") == [], "no block, no key")
odd = console("ssh-dss AAAAB3NzaC1kc3MAAACBAP", new_ed)
check(provision.host_keys_from_console(odd) == [tuple(new_ed.split())], "a key type sshd does not offer is left out")
check(provision.known_hosts_pattern({"ansible_host": "203.0.113.9"}, "web-1") == "203.0.113.9", "port 22: the address alone")
check(provision.known_hosts_pattern({"ansible_host": "127.0.0.1", "ansible_port": 2201}, "web-1") == "[127.0.0.1]:2201",
      "another port: [address]:port")

with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    log = tmp / "web-1.console.log"
    log.write_text(console(new_ed))
    hosts = {"web-1": {"ansible_host": "127.0.0.1", "ansible_port": 2201, "px_console_log": str(log)}}
    args = Namespace(known_hosts=None, host_keys_timeout=1)
    lines = provision.collect_host_keys(hosts, args, None)
    check(lines == [f"[127.0.0.1]:2201 {new_ed}"], "a VM's console log gives its known_hosts line", lines)
    known = tmp / "known_hosts"
    provision.write_known_hosts(known, lines, None)
    check(known.stat().st_mode & 0o777 == 0o600 and lines[0] in known.read_text(), "known_hosts written with mode 0600")
    try:
        provision.collect_host_keys({"web-2": {"ansible_host": "192.0.2.1"}}, args, None)
        check(False, "a host with no key source is refused")
    except provision.ProvisionError as err:
        check("--known-hosts" in str(err), "a host with no key source is refused, naming --known-hosts", err)
    log.write_text("booting...\n")
    try:
        provision.collect_host_keys(hosts, args, None)
        check(False, "a console without keys times out")
    except provision.ProvisionError as err:
        check("no SSH host keys after 1 s" in str(err), "a console without keys times out with a clear message", err)



def refused(argv, message, what):
    """parse_args exits (argparse's usage error) with `message` on standard error."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            provision.parse_args(argv)
        check(False, what, "accepted")
    except SystemExit:
        check(message in err.getvalue(), what, err.getvalue().strip().splitlines()[-1:])


inv = ["--inventory", "hosts.yml"]
args = provision.parse_args([*inv, "--release-version", "1.2.0", "--release-url", "https://releases.example.com/px/"])
check((args.release_version, args.release_url, args.release_tarball, args.bin_dir)
      == ("1.2.0", "https://releases.example.com/px/", None, None), "a release by version and URL", args)
check(provision.parse_args([*inv, "--release-version", "1.2.0", "--release-url", "file:///srv/releases"]).release_url
      == "file:///srv/releases", "a file:// release URL")
refused([*inv, "--release-version", "1.2.0"], "--release-version needs --release-url", "a version without a URL is refused")
refused([*inv, "--release-version", "../1.2.0", "--release-url", "https://r.example.com"], "is not a version",
        "a version that would leave its directory is refused")
refused([*inv, "--release-version", "1.2.0", "--release-url", "ftp://r.example.com"], "--release-url must be an https://",
        "an ftp:// URL is refused")
refused([*inv, "--release-version", "1.2.0", "--release-url", "https://r.example.com", "--release-tarball", "x.tar.gz"],
        "not allowed with argument", "a version and a tarball together are refused")
refused([*inv, "--bin-dir", "target/release", "--release-url", "https://r.example.com"],
        "--release-url is only used with --release-version", "a URL without a version is refused")
check(args.release_target is None, "no target: the roles' default (x86_64)", args.release_target)
arm = provision.parse_args([*inv, "--release-version", "1.2.0", "--release-url", "https://r.example.com",
                            "--release-target", "aarch64-unknown-linux-gnu"])
check(arm.release_target == "aarch64-unknown-linux-gnu", "a release for aarch64 hosts", arm.release_target)
refused([*inv, "--release-version", "1.2.0", "--release-url", "https://r.example.com", "--release-target", "arm64"],
        "invalid choice", "a target scripts/dist makes no tarball for is refused")
refused([*inv, "--release-tarball", "x.tar.gz", "--release-target", "aarch64-unknown-linux-gnu"],
        "--release-target is only used with --release-version", "a target with a tarball is refused")

print(f"provision: {passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
