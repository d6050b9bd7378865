"""The VM image: a minimal Debian 12 with systemd, built once by debootstrap and cached.

`ensure_image()` returns the cached build for the current recipe, building it first when there
is none. A build is one directory under the cache (`~/.cache/platformx/vm/<key>/`) holding

    base.img      raw ext4 root file system (sparse); each VM boots a qcow2 overlay of it
    vmlinuz       the guest kernel, booted directly by qemu (-kernel)
    initrd.img    its initramfs, with just what mounts /dev/vda
    id_ed25519    the SSH key that logs in as root on every VM (and .pub)
    manifest.txt  what the build was made from

Beside the builds, `debs/` keeps the downloaded packages, so a new recipe rebuilds without
downloading them again, and `accel` remembers whether KVM works (see vm.choose_accel).

The key is a hash of this file, so changing the package list, the baked-in units or any build
step makes a new build; everything else reuses the old one. A build is made in a temporary
directory next to the cache entry and renamed into place at the end, so an interrupted build
never leaves a half-made image behind.

The guest side of the harness is baked in here:
- `px-net.service` applies `px.*` kernel parameters before the network is up: `px.ip=CIDR` on
  eth1 (the private LAN), `px.hostname=NAME` into /etc/hostname, `px.hosts=NAME:IP,...` into
  /etc/hosts. eth0 is qemu's user-mode NIC, which carries SSH and the forwarded ports.
- `px-host-keys.service` makes the VM's own SSH host key (ed25519) on its first boot, before
  sshd starts, and at every boot prints it to the serial console as cloud-init prints an EC2
  host's keys (`-----BEGIN SSH HOST KEY KEYS-----`): scripts/provision reads it from the
  console log, as it reads an EC2 host's from its console output. The image itself holds no
  host key, so each VM has its own.
- `px-ready.service` writes `PX-VM-READY` to the serial console once multi-user.target is
  reached: the harness waits for that line.
- Boot speed: the initrd is the harness's own (busybox and the virtio drivers, not Debian's
  udev-based one), and units, generators and udev work that only cost time in a test VM are
  masked. Under software emulation, where every process started costs a noticeable fraction of
  a second, that takes one VM from about 70 s to about 20 s to ready.
"""

from __future__ import annotations

import dataclasses
import fcntl
import glob
import hashlib
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

SUITE = "bookworm"
# What the guests run. Beyond RECIPES' list: the cloud kernel flavour (what Debian's cloud
# images boot: virtio drivers, ext4 built in, none of a PC's hardware drivers), busybox-static
# for the initrd, procps for ps, iputils-ping to check the LAN, ca-certificates for TLS
# clients, bubblewrap for the build node's sandbox (the maestro role installs it only when it
# is missing: the guests reach no Debian mirror). Ansible needs only python3 on the target as
# long as the roles avoid the apt module (which would need python3-apt); root logs in
# directly, so no sudo.
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "udev",
    "dbus",
    "linux-image-cloud-amd64",
    "busybox-static",
    "openssh-server",
    "python3",
    "iproute2",
    "iputils-ping",
    "procps",
    "curl",
    "ca-certificates",
    "bubblewrap",
)
# Units masked because they cannot work or only cost time in a test VM, where every process
# started costs about a second under software emulation. With them masked, boot is quicker and
# `systemctl is-system-running` says "running".
MASKED_UNITS = (
    # px-net configures the NICs; no network manager to wait for.
    "systemd-networkd-wait-online.service",
    # Each VM makes its machine ID on its first boot; nobody answers questions on the console.
    "systemd-firstboot.service",
    # No periodic maintenance competing with the tests for the CPU.
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    # File systems and kernel interfaces nothing in the platform uses, and the modules behind
    # them (the kernel still loads a module when something asks for it).
    "systemd-binfmt.service",
    "proc-sys-fs-binfmt_misc.automount",
    "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount",
    "sys-kernel-config.mount",
    "sys-fs-fuse-connections.mount",
    "dev-hugepages.mount",
    "kmod-static-nodes.service",
    "modprobe@configfs.service",
    "modprobe@dm_mod.service",
    "modprobe@drm.service",
    "modprobe@efi_pstore.service",
    "modprobe@fuse.service",
    "modprobe@loop.service",
    "systemd-pstore.service",
    # virtio-rng seeds the kernel's random pool; the journal is in memory (no flush to disk);
    # no utmp logins to record.
    "systemd-random-seed.service",
    "systemd-journal-flush.service",
    "systemd-update-utmp.service",
    "systemd-update-utmp-runlevel.service",
    # No console logins: root has no password; SSH is the way in.
    "getty@tty1.service",
    "serial-getty@ttyS0.service",
)
# Files replaced by links to /dev/null.
MASKED_FILES = (
    # udev loads no drivers: the initrd loads the few the VM's virtio hardware needs, and
    # probing the emulated PC's floppy, IDE, PS/2 and CPU features for modules costs seconds
    # under software emulation. (The kernel still loads the modules it asks for itself, such as
    # netfilter's.)
    "etc/udev/rules.d/80-drivers.rules",
    # Generators for things the VM does not have (encrypted or verity disks, hibernation, GPT
    # auto-discovery, SysV scripts without a native unit, console gettys); fstab's stays.
    *(
        f"etc/systemd/system-generators/systemd-{name}-generator"
        for name in (
            "cryptsetup", "debug", "getty", "gpt-auto", "hibernate-resume", "integritysetup",
            "rc-local", "run", "system-update", "sysv", "veritysetup",
        )
    ),
)  # fmt: skip
# Files written into the image as they are.
EXTRA_FILES = {
    # The journal lives in memory: nothing to flush to disk at boot. It does not survive a
    # reboot; the platform's own logs do.
    "etc/systemd/journald.conf.d/platformx-tests.conf": "[Journal]\nStorage=volatile\n",
    # The config is the image's own and known good: no `sshd -t` run before each start.
    "etc/systemd/system/ssh.service.d/platformx-tests.conf": "[Service]\nExecStartPre=\n",
    # udev replays the kernel's events only for disks and NICs, not for the 200-odd consoles,
    # ACPI and platform devices of the emulated PC that nothing here uses.
    "etc/systemd/system/systemd-udev-trigger.service.d/platformx-tests.conf": (
        "[Service]\nExecStart=\n"
        "ExecStart=-udevadm trigger --type=subsystems --action=add"
        " --subsystem-match=block --subsystem-match=net\n"
        "ExecStart=-udevadm trigger --type=devices --action=add"
        " --subsystem-match=block --subsystem-match=net\n"
    ),
}
# Removed to keep the image small; later package installs skip them too (DPKG_NODOC).
UNUSED_FILES = (
    "usr/share/doc/*",
    "usr/share/man/*",
    "usr/share/info/*",
    "usr/share/locale/*",
    "var/lib/apt/lists/*",
    "var/cache/apt/*",
    "var/cache/debconf/*-old",
    "var/log/*.log",
)
# Drivers the initrd loads (with what they need): the disk, both NICs, and a random number
# source so sshd and Python never wait for entropy.
INITRD_MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "virtio_rng")
BUSYBOX_APPLETS = ("sh", "cat", "mount", "umount", "insmod", "sleep", "switch_root", "poweroff")
# Room the guests have to write into (the raw file is sparse: it takes only what is used).
DISK_SIZE = "4G"
READY_MARKER = "PX-VM-READY"
# debootstrap took 1.5 min on these machines; the margin covers a slow mirror.
DEBOOTSTRAP_TIMEOUT_S = 20 * 60
# Any other build step (chroot commands, mkfs) takes seconds.
STEP_TIMEOUT_S = 5 * 60
# Lines of a failed build step's output kept in the error.
BUILD_ERROR_TAIL_LINES = 40
# Builds of other recipes are deleted once unused for this long, so the cache does not grow with
# every change of the recipe while a build another checkout still uses is left alone.
STALE_BUILD_AGE_S = 7 * 24 * 3600

INITRD_INIT = r"""#!/bin/sh
# init: the test VM's initramfs (made by tests/vm/image.py): loads the virtio drivers, mounts
# /dev/vda and hands over to systemd. A failure powers the VM off, which the harness reports.
export PATH=/bin
fail() { echo "px-initrd: $*"; sleep 1; poweroff -f; }
mount -t devtmpfs devtmpfs /dev
for module in $(cat /lib/modules/order); do
  insmod "/lib/modules/$module" || fail "cannot load $module"
done
tries=0
while [ ! -b /dev/vda ]; do
  tries=$((tries + 1))
  [ "$tries" -le 100 ] || fail "no /dev/vda after 10 s"
  sleep 0.1
done
mount -t ext4 -o rw,noatime /dev/vda /root || fail "cannot mount /dev/vda"
umount /dev
exec switch_root /root /sbin/init
"""

PX_NET_SCRIPT = r"""#!/bin/sh
# px-net: configures this test VM from the kernel command line (see tests/vm/image.py).
set -eu
ip_cidr= name= hosts=
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    px.ip=*) ip_cidr=${arg#px.ip=} ;;
    px.hostname=*) name=${arg#px.hostname=} ;;
    px.hosts=*) hosts=${arg#px.hosts=} ;;
  esac
done
ip link set lo up
# qemu's user-mode network answers at 10.0.2.2 and forwards the host ports to 10.0.2.15. It is
# restricted (no way out of the host), so there is no default route to add.
ip addr replace 10.0.2.15/24 dev eth0
ip link set eth0 up
if [ -n "$ip_cidr" ]; then
  ip addr replace "$ip_cidr" dev eth1
  ip link set eth1 up
fi
if [ -n "$name" ]; then
  echo "$name" > /etc/hostname
  hostname "$name"
fi
{
  echo "127.0.0.1 localhost"
  echo "::1 localhost ip6-localhost ip6-loopback"
  for entry in $(echo "$hosts" | tr ',' ' '); do
    echo "${entry#*:} ${entry%%:*}"
  done
} > /etc/hosts
"""

PX_NET_UNIT = """\
[Unit]
Description=Platform.X test VM network and name (px.* kernel parameters)
# The initrd loaded the NIC drivers, so eth0 and eth1 exist before systemd starts: no need to
# wait for udev.
DefaultDependencies=no
After=systemd-remount-fs.service
Wants=network-pre.target
Before=network-pre.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/px-net

[Install]
WantedBy=sysinit.target
"""

PX_READY_UNIT = f"""\
[Unit]
Description=Platform.X test VM readiness marker on the serial console
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'echo "{READY_MARKER} $(hostname)" > /dev/ttyS0'

[Install]
WantedBy=multi-user.target
"""

# Where cloud-init's block of host keys starts and ends on the console (scripts/provision
# looks for these lines).
HOST_KEYS_BEGIN = "-----BEGIN SSH HOST KEY KEYS-----"
HOST_KEYS_END = "-----END SSH HOST KEY KEYS-----"
HOST_KEY = "/etc/ssh/ssh_host_ed25519_key"
# ed25519 only: made in milliseconds, where an RSA key would take seconds under emulation.
PX_HOST_KEYS_SCRIPT = f"""#!/bin/sh
# px-host-keys: this VM's own SSH host key, made on its first boot and printed on the serial
# console as cloud-init prints an EC2 host's (see tests/vm/image.py).
set -eu
[ -s {HOST_KEY} ] || ssh-keygen -q -t ed25519 -N '' -C "root@$(hostname)" -f {HOST_KEY}
{{ echo "{HOST_KEYS_BEGIN}"; cat {HOST_KEY}.pub; echo "{HOST_KEYS_END}"; }} > /dev/ttyS0
"""

PX_HOST_KEYS_UNIT = """\
[Unit]
Description=Platform.X test VM SSH host key, printed on the serial console
After=local-fs.target px-net.service
Before=ssh.service px-ready.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/px-host-keys

[Install]
WantedBy=multi-user.target
"""

SSHD_CONFIG = f"""\
# The test harness logs in as root with its own key, and only so.
# The one host key, each VM's own (px-host-keys.service).
HostKey {HOST_KEY}
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UseDNS no
"""

# Later package installs in the guest (by a role) skip documentation too.
DPKG_NODOC = """\
path-exclude=/usr/share/doc/*
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
"""


@dataclasses.dataclass(frozen=True)
class Image:
    """One finished build in the cache."""

    dir: Path
    cached: bool  # True when this run found it already built
    build_seconds: float

    @property
    def disk(self) -> Path:
        return self.dir / "base.img"

    @property
    def kernel(self) -> Path:
        return self.dir / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.dir / "initrd.img"

    @property
    def ssh_key(self) -> Path:
        return self.dir / "id_ed25519"


def cache_root() -> Path:
    """Where builds live: $PX_VM_CACHE, else ~/.cache/platformx/vm."""
    return Path(os.environ.get("PX_VM_CACHE") or Path.home() / ".cache/platformx/vm")


def recipe_key() -> str:
    """A hash of this file: the package list, baked-in files and build steps all live here."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def debian_mirror() -> str:
    """The Debian mirror the host's apt uses, so the repository never names a host."""
    uris: list[str] = []
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        for line in Path(path).read_text().splitlines():
            if line.startswith("URIs:"):
                uris += line.split()[1:]
    for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
        if os.path.exists(path):
            for line in Path(path).read_text().splitlines():
                match = re.match(r"deb\s+(?:\[[^]]*\]\s+)?(\S+)", line)
                if match:
                    uris.append(match.group(1))
    for uri in uris:
        if uri.rstrip("/").endswith("/debian"):
            return uri.rstrip("/")
    raise RuntimeError("no Debian mirror (a URI ending in /debian) in /etc/apt's sources")


def ensure_image() -> Image:
    """The build for the current recipe, made now if the cache has none."""
    root = cache_root()
    key = recipe_key()
    final = root / key
    if (final / "manifest.txt").exists():
        os.utime(final)  # in use: not stale (see _remove_stale)
        return Image(final, cached=True, build_seconds=0.0)
    root.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    # One build at a time per cache: a second run waits for the first one's build, then uses it.
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "manifest.txt").exists():
            return Image(final, cached=True, build_seconds=0.0)
        _remove_stale(root, key)
        tmp = root / f".build-{key}-{os.getpid()}"
        tmp.mkdir()
        try:
            _build(tmp, root / "debs")
            tmp.rename(final)
        finally:
            _remove_tree(tmp)
    return Image(final, cached=False, build_seconds=time.monotonic() - started)


def _remove_stale(root: Path, key: str) -> None:
    """Deletes interrupted builds and builds of other recipes not used for a while."""
    for entry in root.iterdir():
        if entry.name.startswith(".build-"):
            _remove_tree(entry)
        elif (
            re.fullmatch(r"[0-9a-f]{16}", entry.name)
            and entry.name != key
            and time.time() - entry.stat().st_mtime > STALE_BUILD_AGE_S
        ):
            _remove_tree(entry)


def _remove_tree(path: Path) -> None:
    """Deletes a build directory, after unmounting whatever an interrupted debootstrap left
    mounted inside it (/proc, /sys; in a container, bind mounts of the host's /dev), so that
    nothing is ever deleted through a mount."""
    prefix = f"{path.resolve()}/"
    mount_points = [
        line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
    ]
    for mount_point in sorted(
        (m for m in mount_points if m.startswith(prefix)), key=len, reverse=True
    ):
        subprocess.run(["umount", "--lazy", mount_point], check=False, timeout=STEP_TIMEOUT_S)
    shutil.rmtree(path, ignore_errors=True)


def _run(*args: str | Path, timeout: float = STEP_TIMEOUT_S, log: Path | None = None) -> None:
    """Runs one build step; on failure the error carries the step's output."""
    out = open(log, "w") if log else subprocess.PIPE
    try:
        proc = subprocess.run(
            [str(a) for a in args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )
    finally:
        if log:
            out.close()
    if proc.returncode != 0:
        output = log.read_text() if log else proc.stdout
        tail = "\n".join(output.splitlines()[-BUILD_ERROR_TAIL_LINES:])
        raise RuntimeError(
            f"image build step failed ({proc.returncode}): {' '.join(map(str, args))}\n{tail}"
        )


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def _build(out: Path, debs: Path) -> None:
    """Makes every file of a build in `out`."""
    if os.geteuid() != 0:
        raise RuntimeError("building the VM image needs root (debootstrap, file ownership)")
    mirror = debian_mirror()
    rootfs = out / "rootfs"
    debs.mkdir(exist_ok=True)
    # debootstrap's --cache-dir keeps the downloaded packages, so a change of the recipe
    # rebuilds without downloading everything again.
    _run(
        "debootstrap",
        "--variant=minbase",
        f"--include={','.join(PACKAGES)}",
        f"--cache-dir={debs}",
        SUITE,
        rootfs,
        mirror,
        timeout=DEBOOTSTRAP_TIMEOUT_S,
        log=out / "debootstrap.log",
    )
    kernel_version = configure(rootfs, out)
    make_disk(rootfs, out)
    _write(
        out / "manifest.txt",
        f"key {recipe_key()}\nsuite {SUITE}\nmirror {mirror}\nkernel {kernel_version}\n"
        f"packages {' '.join(PACKAGES)}\nbuilt {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n",
    )


def configure(rootfs: Path, out: Path) -> str:
    """Turns a debootstrapped tree into the test VM; writes the key, kernel and initrd to `out`.

    Returns the kernel version."""
    key = out / "id_ed25519"
    _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "platformx-vm-tests", "-f", key)
    key.chmod(0o600)
    _write(rootfs / "root/.ssh/authorized_keys", (out / "id_ed25519.pub").read_text(), 0o600)
    (rootfs / "root/.ssh").chmod(0o700)
    _write(rootfs / "etc/ssh/sshd_config.d/platformx-tests.conf", SSHD_CONFIG)

    _write(rootfs / "usr/local/sbin/px-net", PX_NET_SCRIPT, 0o755)
    _write(rootfs / "etc/systemd/system/px-net.service", PX_NET_UNIT)
    _write(rootfs / "etc/systemd/system/px-ready.service", PX_READY_UNIT)
    _write(rootfs / "usr/local/sbin/px-host-keys", PX_HOST_KEYS_SCRIPT, 0o755)
    _write(rootfs / "etc/systemd/system/px-host-keys.service", PX_HOST_KEYS_UNIT)
    # The keys openssh-server's installation made would be every VM's: each makes its own.
    for key in glob.glob(str(rootfs / "etc/ssh/ssh_host_*")):
        os.remove(key)
    _write(rootfs / "etc/fstab", "/dev/vda / ext4 rw,noatime 0 0\n")
    _write(rootfs / "etc/hostname", "px-vm\n")
    # Empty: each VM makes its own machine ID on its first boot. D-Bus's copy would be used
    # instead of a new one, so it becomes a link, as on a Debian installed from scratch.
    _write(rootfs / "etc/machine-id", "", 0o444)
    (rootfs / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    (rootfs / "var/lib/dbus/machine-id").symlink_to("/etc/machine-id")
    _write(rootfs / "etc/dpkg/dpkg.cfg.d/platformx-nodoc", DPKG_NODOC)
    for name, text in EXTRA_FILES.items():
        _write(rootfs / name, text)
    for name in MASKED_FILES:
        (rootfs / name).parent.mkdir(parents=True, exist_ok=True)
        (rootfs / name).unlink(missing_ok=True)
        (rootfs / name).symlink_to("/dev/null")
    chroot = ("chroot", rootfs)
    _run(*chroot, "systemctl", "enable", "px-net.service", "px-host-keys.service", "px-ready.service")
    _run(*chroot, "systemctl", "mask", *MASKED_UNITS)
    _run(*chroot, "systemctl", "set-default", "multi-user.target")

    # Smaller: no documentation, translations or package lists.
    for pattern in UNUSED_FILES:
        for path in glob.glob(str(rootfs / pattern)):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)

    # First-boot jobs (ldconfig, sysusers, the journal catalog) run at boot when /usr looks
    # newer than these stamps; they ran when the packages were installed, so mark them done.
    # mkfs keeps whole seconds of each time, hence a stamp one second after /usr.
    stamp_time = int((rootfs / "usr").stat().st_mtime) + 1
    for stamp in ("etc/.updated", "var/.updated"):
        _write(rootfs / stamp, "")
        os.utime(rootfs / stamp, (stamp_time, stamp_time))

    (kernel_dir,) = glob.glob(str(rootfs / "usr/lib/modules/*"))
    kernel_version = os.path.basename(kernel_dir)
    shutil.copy(rootfs / f"boot/vmlinuz-{kernel_version}", out / "vmlinuz")
    _make_initrd(rootfs, Path(kernel_dir), out / "initrd.img")
    return kernel_version


def _make_initrd(rootfs: Path, kernel_dir: Path, initrd: Path) -> None:
    """An initramfs of busybox, the virtio drivers and INITRD_INIT, as an uncompressed cpio.

    Debian's own initramfs (udev, every storage driver) spends about 10 s of a TCG boot finding
    hardware we know in advance."""
    modules = _modules_with_dependencies(kernel_dir, INITRD_MODULES)
    staging = rootfs / "px-initrd"
    (staging / "bin").mkdir(parents=True)
    for sub in ("dev", "proc", "root", "lib/modules"):
        (staging / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy(rootfs / "usr/bin/busybox", staging / "bin/busybox")
    for applet in BUSYBOX_APPLETS:
        (staging / "bin" / applet).symlink_to("busybox")
    for module in modules:
        shutil.copy(kernel_dir / module, staging / "lib/modules" / os.path.basename(module))
    _write(staging / "lib/modules/order", "".join(os.path.basename(m) + "\n" for m in modules))
    _write(staging / "init", INITRD_INIT, 0o755)
    # cpio from the guest tree, so the host needs nothing beyond debootstrap.
    with open(initrd, "wb") as out:
        proc = subprocess.run(
            [
                "chroot",
                str(rootfs),
                "sh",
                "-c",
                "cd /px-initrd && find . | cpio --quiet -o -H newc",
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.PIPE,
            timeout=STEP_TIMEOUT_S,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"making the initrd failed: {proc.stderr.decode(errors='replace')}")
    shutil.rmtree(staging)


def _modules_with_dependencies(kernel_dir: Path, names: tuple[str, ...]) -> list[str]:
    """Paths (relative to kernel_dir) of the named modules and what they need, in load order."""
    deps: dict[str, list[str]] = {}
    for line in (kernel_dir / "modules.dep").read_text().splitlines():
        module, _, needs = line.partition(":")
        deps[module] = needs.split()
    by_name = {os.path.basename(m).removesuffix(".ko").replace("-", "_"): m for m in deps}
    ordered: list[str] = []

    def add(module: str) -> None:
        # modules.dep lists a module's dependencies so that the last one loads first.
        for needed in reversed(deps[module]):
            add(needed)
        if module not in ordered:
            ordered.append(module)

    for name in names:
        add(by_name[name.replace("-", "_")])
    return ordered


def make_disk(rootfs: Path, out: Path) -> None:
    """The raw ext4 base disk, filled from the tree; the tree is deleted afterwards."""
    disk = out / "base.img"
    _run("truncate", "-s", DISK_SIZE, disk)
    _run("mkfs.ext4", "-q", "-F", "-L", "px-root", "-d", rootfs, disk)
    _remove_tree(rootfs)
