"""The S3 server of the failover scenario: SeaweedFS (`weed mini`) on the host, which honours
S3's conditional writes (`If-None-Match`, `If-Match`) as the apprepos' shared bucket and the
Beacons' lease need, reached by the control VMs through a `guestfwd` rule (`guestfwd`).

Each guest connection to S3_IP:S3_PORT runs this file's `relay` on the host with the connection
as its standard input and output, joined to SeaweedFS's S3 port on the host's loopback: no host
port opens to the guests' network, as for the package mirror (mirror.py).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import selectors
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# Where the control VMs reach S3 (their user network's guestfwd address), beside the mirror's.
S3_IP = "10.0.2.101"
S3_PORT = 8333
# The bucket, region and credentials the apprepos use.
BUCKET = "px-vm"
REGION = "us-east-1"
ACCESS_KEY = "pxvmaccess"
SECRET_KEY = "pxvmsecret-not-a-real-one"
# `weed mini` answers in about 2 s when idle; under a loaded host it may take much longer.
START_TIMEOUT_S = 120
# One readiness probe: the filer holds a write until it finds a volume for it.
PROBE_TIMEOUT_S = 10
# The most one relayed read takes from either side at once.
RELAY_BUFFER_BYTES = 64 * 1024
# The flags `weed mini` takes a port by (each picked free), so it never collides with another
# test's server: a gRPC port would otherwise be its HTTP port + 10000.
WEED_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


def weed_binary() -> Path:
    """SeaweedFS's `weed`, as scripts/install-test-tools links it (PX_SEAWEEDFS overrides)."""
    found = os.environ.get("PX_SEAWEEDFS") or shutil.which(
        "weed", path=os.pathsep.join([str(Path.home() / ".cache/platformx/bin"), os.environ.get("PATH", "")])
    )
    if not found:
        raise RuntimeError("SeaweedFS (weed) not found: run scripts/install-test-tools, or set PX_SEAWEEDFS")
    return Path(found)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(port: int, method: str, path: str, body: bytes = b"") -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=PROBE_TIMEOUT_S)
    try:
        conn.request(method, path, body=body)
        return conn.getresponse().status
    finally:
        conn.close()


@dataclass
class Seaweed:
    """A running `weed mini` with BUCKET, its S3 gateway on 127.0.0.1:s3_port."""

    s3_port: int
    workdir: Path
    process: subprocess.Popen

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


def start(workdir: Path, s3_port: int) -> Seaweed:
    """Starts SeaweedFS with its S3 gateway on `s3_port` (the port the control VMs' guestfwd
    rule relays to) and makes BUCKET; returns once a write through it works."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "data").mkdir(exist_ok=True)
    (workdir / "logs").mkdir(exist_ok=True)
    identities = {"identities": [{
        "name": "px",
        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}  # fmt: skip
    (workdir / "s3.json").write_text(json.dumps(identities))
    ports = {flag: _free_port() for flag in WEED_PORT_FLAGS}
    command = [
        str(weed_binary()),
        f"-logdir={workdir / 'logs'}",  # a global flag: before the command
        "mini",
        f"-dir={workdir / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-s3.port={s3_port}",
        *(f"-{flag}={port}" for flag, port in ports.items()),
        f"-s3.config={workdir / 's3.json'}",
        "-master.telemetry=false",
        "-webdav=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
    ]
    log = open(workdir / "weed.log", "a")  # noqa: SIM115 - kept open for the process's life
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "TMPDIR": str(workdir)},
        start_new_session=True,
    )
    server = Seaweed(s3_port, workdir, process)
    # A bucket is a directory under the filer's /buckets; S3 answers before the volume server
    # has joined the master, and writes fail until it has: a file written through the filer
    # (and removed) shows it has.
    filer = ports["filer.port"]
    deadline = time.monotonic() + START_TIMEOUT_S
    made = False
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"weed mini exited with {process.returncode}; see {workdir / 'weed.log'}")
        try:
            made = made or _status(filer, "POST", f"/buckets/{BUCKET}/") == 201
            if (
                made
                and _status(filer, "PUT", f"/buckets/{BUCKET}/.px-probe", b"probe") == 201
                and _status(filer, "DELETE", f"/buckets/{BUCKET}/.px-probe") < 300
                and _status(s3_port, "GET", "/") == 403
            ):
                return server
        except OSError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"SeaweedFS did not serve S3 within {START_TIMEOUT_S} s; see {workdir / 'weed.log'}")
        time.sleep(0.2)


def guestfwd(s3_port: int) -> str:
    """The `guestfwd=` value of a control VM's user network that relays S3_IP:S3_PORT to the
    host's 127.0.0.1:s3_port. qemu splits the command into words itself, so no path may hold a
    comma or a space."""
    command = [sys.executable, "-I", str(Path(__file__).resolve()), "relay", str(s3_port)]
    for word in command:
        if re.search(r"[,\s]", word):
            raise ValueError(f"{word!r}: qemu's guestfwd takes no commas or spaces")
    return f"tcp:{S3_IP}:{S3_PORT}-cmd:{' '.join(command)}"


def relay(port: int) -> None:
    """Joins the guest connection on standard input and output to 127.0.0.1:port, both ways,
    until either side closes. Nothing listening (no scenario started SeaweedFS): the guest's
    connection closes at once."""
    guest = socket.socket(fileno=os.dup(0))
    try:
        server = socket.create_connection(("127.0.0.1", port))
    except OSError:
        guest.close()
        return
    selector = selectors.DefaultSelector()
    selector.register(guest, selectors.EVENT_READ, server)
    selector.register(server, selectors.EVENT_READ, guest)
    server_open = True
    while server_open:
        for key, _ in selector.select():
            try:
                data = key.fileobj.recv(RELAY_BUFFER_BYTES)
                if data:
                    key.data.sendall(data)
                    continue
            except OSError:
                data = b""
            if key.fileobj is server:
                # The server is done: nothing more can come for the guest.
                server_open = False
                break
            # The guest finished sending: pass the end on, keep reading the answer.
            selector.unregister(guest)
            try:
                server.shutdown(socket.SHUT_WR)
            except OSError:
                server_open = False
    guest.close()
    server.close()


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "relay":
    relay(int(sys.argv[2]))
