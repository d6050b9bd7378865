"""Certificates from a real ACME CA on the VM cluster: Pebble runs on control, site.yml is run
again with the ACME variables as an operator would, and both web servers serve the app's
certificate over HTTPS; a web server that lost its certificates serves them again within
seconds of starting, and services restarted several times order nothing they already hold.
Last, the cluster moves to a second Pebble that issues short-lived certificates (as an operator
moves to another CA): a name's certificate from it is renewed before it expires and both web
servers serve the new one. The first Pebble's orders are counted apart from the second's.

Pebble and pebble-challtestsrv (its DNS server) are the host's Debian binaries, copied into
control: the cached image stays as it is. The DNS server answers every name with web-1's LAN
address, and the app's added domain with web-2's, so Pebble validates against both web
servers over the LAN, as a real CA would reach them through DNS.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from appcheck import (
    APP,
    RESTART_TIMEOUT_S,
    WEB_SERVERS,
    current_release,
    release_in,
    wait_for_nodes,
    wait_until,
)

# The name added to the app with `em domains add`, which the DNS server answers with web-2's
# address; and the one added after the restarts (answered with web-1's, the default).
DOMAIN = "shop.example.com"
LATER_DOMAIN = "www.shop.example.com"
# The name whose certificate comes from the short-lived Pebble (answered with web-1's address).
SHORT_DOMAIN = "short.shop.example.com"
ACME_EMAIL = "ops@example.com"
# Where Pebble lives on control, its ports there (the directory and management API over
# HTTPS, its DNS server and that server's management API over plain HTTP).
PEBBLE_DIR = "/opt/pebble"
PEBBLE_PORT = 14000
PEBBLE_MANAGEMENT_PORT = 15000
DNS_PORT = 8053
DNS_MANAGEMENT_PORT = 8055
# The second Pebble's ports (it issues short-lived certificates, and shares the DNS server).
SHORT_PEBBLE_PORT = 14001
SHORT_PEBBLE_MANAGEMENT_PORT = 15001
# How long the second Pebble's certificates are valid (its certificateValidityPeriod): renewal
# comes two thirds in (Pebble offers no renewal information), leaving a third, 30 s, for the
# order and both web servers fetching the new certificate under emulation.
SHORT_VALIDITY_S = 90
# The transient units Pebble and its DNS server run as (systemd-run), so their output is in
# control's journal.
PEBBLE_UNIT = "px-test-pebble"
SHORT_PEBBLE_UNIT = "px-test-pebble-short"
DNS_UNIT = "px-test-pebble-dns"
# The LAN addresses the DNS server gives: every name web-1's, DOMAIN web-2's.
DEFAULT_ADDRESS = "10.77.0.11"
DOMAIN_ADDRESS = "10.77.0.12"
# Days Pebble's own listener certificate (made here with openssl) is valid.
LISTENER_CERT_DAYS = 2
# One openssl or curl command on the host.
HOST_COMMAND_TIMEOUT_S = 60
# Until Pebble's ports answer after it was started (the guest is emulated).
PEBBLE_START_TIMEOUT_S = 60
# From site.yml turning ACME on (or a name added) to every name's certificate issued and
# served: Beacon's account, the orders (each waits up to 90 s for validation), the Maestros
# fetching the certificates, all under emulation.
ISSUE_TIMEOUT_S = 240
# One HTTPS request from the host, through qemu's forwarding.
REQUEST_TIMEOUT_S = 15
# Pebble's log line for each new order (its wfe), counted to tell whether an order was sent.
ORDER_LOG_LINE = "Added order"
# How many times the restart test restarts Beacon and both Maestros.
RESTARTS = 3
# Beacon's configuration on control, as site.yml writes it.
BEACON_TOML = "/etc/platformx/beacon.toml"
# Where apprepo keeps the ACME account on control (the fs storage backend the tier runs).
ACCOUNT_FILE = "/var/lib/platformx/apprepo/storage/acme/account.json"
# Between two looks at the certificates the web servers present while waiting for renewal.
RENEWAL_POLL_S = 1.0
_ISSUER = re.compile(r"^\*\s+issuer: (.*)$", re.M)


@dataclass
class Acme:
    """Pebble on control, and the root of the certificates it issues (fetched from its
    management interface), which the host's clients trust."""

    root: Path
    listener_ca: Path
    release: int  # the app's release both web servers serve


def host(*command: str) -> str:
    proc = subprocess.run(
        command, capture_output=True, text=True, timeout=HOST_COMMAND_TIMEOUT_S, check=False
    )
    assert proc.returncode == 0, f"{command} exited with {proc.returncode}: {proc.stderr}"
    return proc.stdout


def copy_file(machine, source: Path, dest: str, mode: str) -> None:
    """Copies a host file into a VM over its SSH connection."""
    with open(source, "rb") as data:
        proc = subprocess.run(
            machine.ssh_command(
                f"mkdir -p $(dirname {dest}) && cat > {dest}.part && chmod {mode} {dest}.part"
                f" && mv {dest}.part {dest}"
            ),
            stdin=data,
            capture_output=True,
            timeout=HOST_COMMAND_TIMEOUT_S,
            check=False,
        )
    assert proc.returncode == 0, f"copying {source} to {machine.name}:{dest}: {proc.stderr!r}"


def make_listener_pki(workdir: Path) -> tuple[Path, Path, Path]:
    """A CA and, under it, the certificate of Pebble's own HTTPS listener for control's names
    (what Beacon's [acme] ca_file names). Returns (CA, certificate, key)."""
    ca, ca_key = workdir / "pebble-listener-ca.pem", workdir / "pebble-listener-ca.key"
    cert, key, csr = workdir / "pebble.pem", workdir / "pebble.key", workdir / "pebble.csr"
    ext = workdir / "pebble.ext"
    ext.write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectAltName=DNS:control,IP:10.77.0.10,IP:127.0.0.1\n"
    )
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
    days = str(LISTENER_CERT_DAYS)
    host("openssl", "req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca),
         "-days", days, "-subj", "/CN=Pebble listener CA (VM tier)")  # fmt: skip
    host("openssl", "req", *ec, "-keyout", str(key), "-out", str(csr), "-subj", "/CN=control")
    host("openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
         "-CAcreateserial", "-days", days, "-extfile", str(ext), "-out", str(cert))  # fmt: skip
    return ca, cert, key


def pebble_config(port: int, management_port: int, validity_s: int | None = None) -> str:
    """Pebble's configuration on control: its listener under the listener certificate, its
    validations sent to Maestro's ports; `validity_s` shortens the certificates it issues."""
    config = {
        "listenAddress": f"0.0.0.0:{port}",
        "managementListenAddress": f"127.0.0.1:{management_port}",
        "certificate": f"{PEBBLE_DIR}/pebble.pem",
        "privateKey": f"{PEBBLE_DIR}/pebble.key",
        # Where the CA's validations go on the address DNS gives: Maestro's ports.
        "httpPort": 80,
        "tlsPort": 443,
        "ocspResponderURL": "",
        "externalAccountBindingRequired": False,
    }
    if validity_s is not None:
        config["certificateValidityPeriod"] = validity_s
    return json.dumps({"pebble": config})


def run_pebble(control, unit: str, config: str, port: int, management_port: int) -> None:
    """Starts Pebble on control as `unit` with the configuration file `config` (a path there),
    resolving names with the DNS server, and waits for its ports."""
    # No random sleep before validating, no nonce refused on purpose: the scenario checks the
    # platform, not how it rides out Pebble's chaos.
    control.ssh(
        f"systemd-run --unit={unit} --setenv=PEBBLE_VA_NOSLEEP=1"
        f" --setenv=PEBBLE_WFE_NONCEREJECT=0 {PEBBLE_DIR}/pebble"
        f" -config {config} -dnsserver 127.0.0.1:{DNS_PORT}"
    )
    for listening in (port, management_port):
        wait_until(
            f"{unit} listens on {listening}",
            lambda listening=listening: control.ssh(
                f"curl -sk -o /dev/null https://127.0.0.1:{listening}/", check=False
            ).returncode
            == 0,
            PEBBLE_START_TIMEOUT_S,
        )


def start_pebble(control, workdir: Path) -> Path:
    """Copies Pebble into control and starts it with its DNS server; returns the listener CA."""
    ca, cert, key = make_listener_pki(workdir)
    config = workdir / "pebble.json"
    config.write_text(pebble_config(PEBBLE_PORT, PEBBLE_MANAGEMENT_PORT))
    for binary in ("pebble", "pebble-challtestsrv"):
        copy_file(control, Path("/usr/bin") / binary, f"{PEBBLE_DIR}/{binary}", "0755")
    copy_file(control, config, f"{PEBBLE_DIR}/pebble.json", "0644")
    copy_file(control, cert, f"{PEBBLE_DIR}/pebble.pem", "0644")
    copy_file(control, key, f"{PEBBLE_DIR}/pebble.key", "0600")
    copy_file(control, ca, f"{PEBBLE_DIR}/listener-ca.pem", "0644")
    control.ssh(
        f"systemd-run --unit={DNS_UNIT} {PEBBLE_DIR}/pebble-challtestsrv"
        f" -defaultIPv4 {DEFAULT_ADDRESS} -defaultIPv6 ''"
        f" -dns01 127.0.0.1:{DNS_PORT} -http01 '' -https01 '' -tlsalpn01 ''"
        f" -management 127.0.0.1:{DNS_MANAGEMENT_PORT}"
    )
    run_pebble(
        control, PEBBLE_UNIT, f"{PEBBLE_DIR}/pebble.json", PEBBLE_PORT, PEBBLE_MANAGEMENT_PORT
    )
    wait_until(
        "Pebble's DNS server answers its management API",
        lambda: control.ssh(
            f"curl -sS --fail -d '{json.dumps({'host': DOMAIN, 'addresses': [DOMAIN_ADDRESS]})}'"
            f" http://127.0.0.1:{DNS_MANAGEMENT_PORT}/add-a",
            check=False,
        ).returncode
        == 0,
        PEBBLE_START_TIMEOUT_S,
    )
    return ca


def pebble_root(control, management_port: int = PEBBLE_MANAGEMENT_PORT) -> str:
    """The root Pebble signs with, from its management interface (under the listener CA)."""
    pem = control.ssh(
        f"curl -sS --fail --cacert {PEBBLE_DIR}/listener-ca.pem"
        f" https://127.0.0.1:{management_port}/roots/0"
    ).stdout
    assert pem.startswith("-----BEGIN CERTIFICATE-----"), pem
    return pem


def orders_sent(control, unit: str = PEBBLE_UNIT) -> int:
    """New orders the Pebble running as `unit` has received since it started (its log says
    each)."""
    log = control.ssh(f"journalctl -u {unit} -o cat --no-pager").stdout
    return log.count(ORDER_LOG_LINE)


@dataclass
class Answer:
    http_version: str
    status: int
    body: str
    issuer: str


def https_get(web, root: Path, name: str, http: str) -> Answer:
    """`curl --http2` or `--http1.1` to https://<name>/ on a web server's forwarded HTTPS
    port, trusting Pebble's root alone; fails on any TLS or connection error."""
    port = web.ports[443]
    proc = subprocess.run(
        [
            "curl", "-sS", "-v", f"--{http}", "--max-time", str(REQUEST_TIMEOUT_S),
            "--resolve", f"{name}:{port}:127.0.0.1", "--cacert", str(root),
            "-w", "\n%{http_version} %{http_code}", f"https://{name}:{port}/",
        ],
        capture_output=True,
        text=True,
        timeout=REQUEST_TIMEOUT_S + 5,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, f"{web.name} {name} over {http}: {proc.stderr[-1500:]}"
    body, _, last = proc.stdout.rpartition("\n")
    version, status = last.split()
    issuer = _ISSUER.search(proc.stderr)
    return Answer(version, int(status), body, issuer.group(1) if issuer else "")


def served_serial(web, root: Path, name: str) -> int:
    """The serial number of the certificate a web server presents for `name`; fails when it
    is not valid under `root` now (an expired one included)."""
    context = ssl.create_default_context(cafile=str(root))
    with socket.create_connection(("127.0.0.1", web.ports[443]), REQUEST_TIMEOUT_S) as raw:
        with context.wrap_socket(raw, server_hostname=name) as tls:
            return int(tls.getpeercert()["serialNumber"], 16)


def serves_https(web, root: Path, name: str, release: int) -> bool:
    answer = https_get(web, root, name, "http1.1")
    return answer.status == 200 and release_in(answer.body) == release


def domains(platform) -> dict[str, dict]:
    """`em domains list --json` for the app: name -> its entry (source, certificate)."""
    listed = json.loads(platform.em("--json", "domains", "list", "--app", APP).stdout)
    return {entry["domain"]: entry for entry in listed["domains"]}


@dataclass
class NotIssued:
    """What is not issued yet: name -> its certificate entry (state, last error); false, so
    that a wait that runs out names it instead of saying nothing."""

    pending: dict[str, dict]

    def __bool__(self) -> bool:
        return False


def all_issued(platform) -> dict[str, dict] | NotIssued:
    listed = domains(platform)
    pending = {
        name: entry.get("certificate")
        for name, entry in listed.items()
        if (entry.get("certificate") or {}).get("state") != "issued"
    }
    return NotIssued(pending) if pending else listed


@pytest.fixture(scope="module")
def acme(platform, tmp_path_factory: pytest.TempPathFactory, vm_timings) -> Acme:
    """Pebble on control, and the platform configured for it through site.yml's ACME
    variables (directory URL, CA file, email)."""
    cluster = platform.cluster
    release = current_release(platform)  # skips when nothing is deployed
    workdir = tmp_path_factory.mktemp("acme")
    control = cluster["control"]
    listener_ca = start_pebble(control, workdir)
    root = workdir / "pebble-root.pem"
    root.write_text(wait_until("Pebble's root", lambda: pebble_root(control), PEBBLE_START_TIMEOUT_S))
    started = time.monotonic()
    platform.site_yml(
        "acme",
        px_acme_directory_url=f"https://control:{PEBBLE_PORT}/dir",
        px_acme_ca_file=str(listener_ca),
        px_acme_email=ACME_EMAIL,
    )
    vm_timings["site.yml with the ACME variables"] = time.monotonic() - started
    # site.yml restarted Maestro: the tests wait for HTTPS answers, as plain HTTP redirects to
    # HTTPS once a web server holds the name's certificate.
    return Acme(root, listener_ca, release)


def test_an_added_domain_gets_a_pebble_certificate_that_both_web_servers_serve(
    platform, acme, vm_timings
):
    """site.yml with px_acme_*: Beacon's [acme] names control's Pebble and its CA file, each
    web server listens on 443. `em domains add` gets the name a certificate, which both web
    servers serve over HTTP/2 and HTTP/1.1 under Pebble's root; `em domains list` shows every
    name of the app issued by Pebble."""
    cluster = platform.cluster
    release = acme.release
    control = cluster["control"]
    beacon_toml = control.ssh("cat /etc/platformx/beacon.toml").stdout
    assert f'directory_url = "https://control:{PEBBLE_PORT}/dir"' in beacon_toml, beacon_toml
    assert 'ca_file = "/etc/platformx/acme-ca.pem"' in beacon_toml, beacon_toml
    assert control.ssh("cat /etc/platformx/acme-ca.pem").stdout == acme.listener_ca.read_text()
    for name in WEB_SERVERS:
        state = cluster[name].ssh("systemctl is-active maestro-https.socket").stdout.strip()
        assert state == "active", (name, state)

    started = time.monotonic()
    platform.em("domains", "add", DOMAIN, "--app", APP)
    for name in WEB_SERVERS:
        web = cluster[name]
        wait_until(
            f"{name} serves {DOMAIN} over HTTPS",
            lambda web=web: serves_https(web, acme.root, DOMAIN, release),
            ISSUE_TIMEOUT_S,
        )
    vm_timings["em domains add to both web servers serving HTTPS"] = time.monotonic() - started

    for name in WEB_SERVERS:
        for http, version in (("http2", "2"), ("http1.1", "1.1")):
            answer = https_get(cluster[name], acme.root, DOMAIN, http)
            print(f"{name} {DOMAIN} {http}: {answer.http_version} {answer.status}, {answer.issuer}")
            assert answer.http_version == version, (name, http, answer)
            assert answer.status == 200 and release_in(answer.body) == release, (name, answer)
            assert "Pebble" in answer.issuer, (name, answer.issuer)

    listed = wait_until("every name of the app issued", lambda: all_issued(platform), ISSUE_TIMEOUT_S)
    print(platform.em("domains", "list", "--app", APP).stdout)
    assert listed[DOMAIN]["source"] == "added", listed
    assert f"{APP}.{platform.domain}" in listed, listed
    for name, entry in listed.items():
        assert "Pebble" in entry["certificate"].get("issuer", ""), (name, entry)
    # Pebble validated the added name against web-2, the others against web-1; each order
    # once.
    print(f"orders Pebble received: {orders_sent(control)}")
    assert orders_sent(control) >= len(listed)


def test_a_web_server_that_lost_its_certificates_serves_them_within_seconds(
    platform, acme, vm_timings
):
    """Maestro on web-2 stopped, its ACME state (state_dir/acme) removed, started again: it
    fetches the certificates from apprepo and serves the name over HTTPS; the seconds from
    start to serving go to the summary."""
    cluster = platform.cluster
    release = acme.release
    web = cluster["web-2"]
    acme_state = "/var/lib/platformx/maestro/acme"
    assert web.ssh(f"ls {acme_state}").stdout.split() != [], "web-2 kept no certificate"
    web.ssh("systemctl stop maestro")
    web.ssh(f"rm -rf {acme_state}")
    started = time.monotonic()
    web.ssh("systemctl start maestro")
    wait_until(
        f"web-2 serves {DOMAIN} over HTTPS after a start with no certificates",
        lambda: serves_https(web, acme.root, DOMAIN, release),
        RESTART_TIMEOUT_S,
        interval=0.2,
    )
    seconds = time.monotonic() - started
    vm_timings["web-2 with no certificates, start to serving HTTPS"] = seconds
    print(f"web-2 started with no certificates and served {DOMAIN} after {seconds:.1f} s")
    assert f"{DOMAIN}.json" in web.ssh(f"ls {acme_state}").stdout.split()
    assert "Pebble" in https_get(web, acme.root, DOMAIN, "http2").issuer


def test_restarted_beacon_and_maestro_order_nothing_they_hold(platform, acme):
    """Beacon and both Maestros restarted several times: both web servers serve the same
    certificate (serial) as before after each round, and the one new order Pebble receives
    afterwards is for a name added after the restarts, which shows Beacon's ordering ran and
    left the issued names alone."""
    cluster = platform.cluster
    release = acme.release
    control = cluster["control"]
    serials = {name: served_serial(cluster[name], acme.root, DOMAIN) for name in WEB_SERVERS}
    orders_before = orders_sent(control)

    for restart in range(1, RESTARTS + 1):
        control.ssh("systemctl restart beacon")
        for name in WEB_SERVERS:
            cluster[name].ssh("systemctl restart maestro")
        wait_for_nodes(platform)
        for name in WEB_SERVERS:
            web = cluster[name]
            wait_until(
                f"{name} serves {DOMAIN} over HTTPS after restart {restart}",
                lambda web=web: serves_https(web, acme.root, DOMAIN, release),
                RESTART_TIMEOUT_S,
            )
            assert served_serial(web, acme.root, DOMAIN) == serials[name], (name, restart)
        assert orders_sent(control) == orders_before, restart
    platform.em("domains", "add", LATER_DOMAIN, "--app", APP)
    for name in WEB_SERVERS:
        web = cluster[name]
        wait_until(
            f"{name} serves {LATER_DOMAIN} over HTTPS",
            lambda web=web: serves_https(web, acme.root, LATER_DOMAIN, release),
            ISSUE_TIMEOUT_S,
        )
    orders_after = orders_sent(control)
    print(
        f"orders Pebble received: {orders_before} before {RESTARTS} restarts, {orders_after} after"
    )
    assert orders_after == orders_before + 1, (orders_before, orders_after)
    for name in WEB_SERVERS:
        assert served_serial(cluster[name], acme.root, DOMAIN) == serials[name], name
        assert serves_https(cluster[name], acme.root, DOMAIN, release), name


def test_a_short_lived_certificate_is_renewed_before_it_expires_and_both_web_servers_serve_it(
    platform, acme, tmp_path_factory: pytest.TempPathFactory, vm_timings
):
    """The cluster moves to a second Pebble issuing 90-second certificates, as an operator
    moves to another CA: the account stored for the first removed from apprepo's storage (an
    account is valid at its own CA only), Beacon's directory_url changed and Beacon restarted.
    A name added then gets a certificate from it, which is renewed two thirds into its
    lifetime: both web servers present a valid certificate at every look until both present
    the new serial. The names issued by the first Pebble are not ordered again."""
    cluster = platform.cluster
    release = acme.release
    control = cluster["control"]
    workdir = tmp_path_factory.mktemp("acme-short")
    config = workdir / "pebble-short.json"
    config.write_text(
        pebble_config(SHORT_PEBBLE_PORT, SHORT_PEBBLE_MANAGEMENT_PORT, SHORT_VALIDITY_S)
    )
    copy_file(control, config, f"{PEBBLE_DIR}/pebble-short.json", "0644")
    run_pebble(
        control,
        SHORT_PEBBLE_UNIT,
        f"{PEBBLE_DIR}/pebble-short.json",
        SHORT_PEBBLE_PORT,
        SHORT_PEBBLE_MANAGEMENT_PORT,
    )
    root = workdir / "pebble-short-root.pem"
    root.write_text(pebble_root(control, SHORT_PEBBLE_MANAGEMENT_PORT))
    first_pebble_orders = orders_sent(control)

    # What site.yml does with a new px_acme_directory_url (the same CA file trusts both
    # Pebbles' listeners), without a whole run's minutes: Beacon's directory_url replaced and
    # Beacon restarted, once the first CA's account is gone.
    first_url = f'directory_url = "https://control:{PEBBLE_PORT}/dir"'
    short_url = f'directory_url = "https://control:{SHORT_PEBBLE_PORT}/dir"'
    control.ssh(
        f"grep -qF '{first_url}' {BEACON_TOML}"
        f" && sed -i 's|{first_url}|{short_url}|' {BEACON_TOML}"
        f" && rm {ACCOUNT_FILE} && systemctl restart beacon"
    )
    assert short_url in control.ssh(f"cat {BEACON_TOML}").stdout
    wait_for_nodes(platform)
    platform.em("domains", "add", SHORT_DOMAIN, "--app", APP)
    for name in WEB_SERVERS:
        web = cluster[name]
        wait_until(
            f"{name} serves {SHORT_DOMAIN} over HTTPS",
            lambda web=web: serves_https(web, root, SHORT_DOMAIN, release),
            ISSUE_TIMEOUT_S,
        )
    first = {name: served_serial(cluster[name], root, SHORT_DOMAIN) for name in WEB_SERVERS}
    assert len(set(first.values())) == 1, first

    # From now on every look at either web server gets a certificate valid under the second
    # Pebble's root (an expired one fails the handshake) until both present another serial.
    served = time.monotonic()
    looks = 0
    renewed: dict[str, int] = {}
    while len(renewed) < len(WEB_SERVERS):
        for name in WEB_SERVERS:
            serial = served_serial(cluster[name], root, SHORT_DOMAIN)
            looks += 1
            if serial != first[name]:
                renewed[name] = serial
        elapsed = time.monotonic() - served
        assert elapsed < SHORT_VALIDITY_S + ISSUE_TIMEOUT_S, (
            f"{SHORT_DOMAIN} not renewed on {set(WEB_SERVERS) - set(renewed)} after {elapsed:.0f} s"
        )
        time.sleep(RENEWAL_POLL_S)
    vm_timings["short-lived certificate, first served to renewed on both"] = (
        time.monotonic() - served
    )
    print(f"{SHORT_DOMAIN}: {first} renewed to {renewed} ({looks} looks, none failed)")
    assert len(set(renewed.values())) == 1, renewed
    for name in WEB_SERVERS:
        assert serves_https(cluster[name], root, SHORT_DOMAIN, release), name
    short_orders = orders_sent(control, SHORT_PEBBLE_UNIT)
    print(f"orders the second Pebble received: {short_orders}")
    assert short_orders >= 2, short_orders
    # The names the first Pebble issued keep its certificates: none was ordered again from
    # either Pebble (each still verifies under the first Pebble's root).
    assert orders_sent(control) == first_pebble_orders
    for name in WEB_SERVERS:
        assert serves_https(cluster[name], acme.root, DOMAIN, release), name
