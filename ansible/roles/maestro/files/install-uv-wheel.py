"""install-uv-wheel.py WHEEL DEST: puts the uv binary of a uv wheel at DEST/bin/uv.

Run by the maestro role on build nodes (tasks/build.yml), with the node's own python3, which
every Ansible host has. DEST is `<tools_dir>/uv-<version>`, where the builder looks for its
pinned uv before it would install one with pip (px_build::tools::ensure_uv). The binary is
checked against the wheel's RECORD (PEP 376 hashes), written into a temporary directory
beside DEST and renamed into place, so the builder never sees a half-written uv. Prints
"installed DEST" when it changed something, "unchanged DEST" when DEST already held it.
"""

import base64
import hashlib
import os
import shutil
import sys
import tempfile
import zipfile


def main(wheel_path: str, dest: str) -> None:
    with zipfile.ZipFile(wheel_path) as wheel:
        names = wheel.namelist()
        binary = next((n for n in names if n.endswith(".data/scripts/uv")), None)
        record = next((n for n in names if n.endswith(".dist-info/RECORD")), None)
        if binary is None or record is None:
            sys.exit(f"{wheel_path} is not a uv wheel: it has no *.data/scripts/uv and RECORD")
        data = wheel.read(binary)
        expected = None
        for line in wheel.read(record).decode().splitlines():
            path, _, rest = line.partition(",")
            if path == binary:
                expected = rest.split(",")[0]
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    if expected != f"sha256={digest}":
        sys.exit(f"{binary} in {wheel_path} does not match the wheel's RECORD ({expected})")

    current = os.path.join(dest, "bin", "uv")
    try:
        with open(current, "rb") as installed:
            if installed.read() == data and os.access(current, os.X_OK):
                print(f"unchanged {dest}")
                return
    except FileNotFoundError:
        pass

    parent = os.path.dirname(dest.rstrip("/"))
    os.makedirs(parent, mode=0o755, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".uv-install-", dir=parent)
    try:
        os.chmod(staging, 0o755)
        os.mkdir(os.path.join(staging, "bin"), 0o755)
        target = os.path.join(staging, "bin", "uv")
        with open(target, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(target, 0o755)
        # The old directory, if any, goes aside first: a rename cannot replace a directory
        # that has files in it.
        old = None
        if os.path.lexists(dest):
            old = tempfile.mkdtemp(prefix=".uv-old-", dir=parent)
            os.rename(dest, os.path.join(old, "uv"))
        os.rename(staging, dest)
        staging = None
        if old:
            shutil.rmtree(old)
    finally:
        if staging:
            shutil.rmtree(staging, ignore_errors=True)
    print(f"installed {dest}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: install-uv-wheel.py WHEEL DEST")
    main(sys.argv[1], sys.argv[2])
