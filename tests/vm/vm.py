"""One test VM: a qemu process booting the cached image, reached over SSH on a forwarded port.

Each VM has two NICs. eth0 is qemu's user-mode network, restricted so that nothing leaves the
host: it only carries the host's forwarded ports (SSH and whatever guest ports the test asks
for) to the guest, and the guest's connections to the addresses a test forwards to a host
service (`guest_forwards`: the package mirror of the build scenario). eth1 sits on the run's private LAN (`Lan`), which the VMs of one run share
and nothing else sees. The serial console goes to a log file, which is also how readiness is
seen: the image writes `image.READY_MARKER` there once multi-user.target is reached.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path

import image

# Memory per VM. The guests idle at about 100 MB; the rest is room for the platform and its
# apps, and costs the host only what a guest touches.
MEMORY_MB = 1024
# The CPU model per accelerator (see the -cpu argument below).
CPU_MODEL = {"tcg": "max", "kvm": "host"}
# vCPUs per VM. Three TCG guests on two host cores boot fastest with one each (see README).
CPUS = 1
# The guest kernel's command line, before the px.* parameters (see image.py): the root disk, the
# serial console (where the readiness marker appears), classic NIC names (eth0 the host's user
# network, eth1 the LAN), and a quiet kernel, but systemd's one line per unit on the console so
# that the console log shows how far a boot got.
KERNEL_ARGS = (
    "root=/dev/vda",
    "rw",
    "console=ttyS0",
    "net.ifnames=0",
    "quiet",
    "systemd.show_status=1",
)
# Prefix length of the private LAN.
LAN_PREFIX = 24
# From qemu's start to the readiness marker. Three guests booting at once under software
# emulation on 2 cores take well under a minute; the margin covers a loaded CI machine.
BOOT_TIMEOUT_S = 240
# A guest that KVM runs boots in a few seconds; on these machines it hangs for ever instead.
KVM_PROBE_TIMEOUT_S = 20
# Making a VM's overlay disk (qemu-img create).
QEMU_IMG_TIMEOUT_S = 30
# One SSH command, unless the caller says otherwise.
SSH_TIMEOUT_S = 300
# SSH's own connection timeout (the TCP connection is local, the guest may be slow to answer).
SSH_CONNECT_TIMEOUT_S = 20
# A guest's `systemctl poweroff`, until qemu exits.
SHUTDOWN_TIMEOUT_S = 60
# How often the console log is read while waiting for the marker.
POLL_INTERVAL_S = 0.2
# Restarts of qemu when a host port picked for forwarding was taken in the meantime.
PORT_RETRIES = 3
# Lines of a console log shown when something goes wrong.
CONSOLE_TAIL_LINES = 50
# Lines of a failed command's output and errors kept in SshError's message.
SSH_ERROR_TAIL_LINES = 30
# One QMP command (pause, resume) on the VM's monitor socket, greeting included.
QMP_TIMEOUT_S = 10
# Longest QMP message read: a greeting, a command's answer or an event is far smaller.
QMP_MAX_LINE = 64 * 1024

# How long an idle shared SSH connection stays open (see SSH_OPTIONS).
SSH_CONTROL_PERSIST_S = 600

# One SSH connection per VM is kept open and shared by the commands that follow: a new
# connection costs about 2 s of the guest's emulated CPU, a command on an open one 0.2 s. The
# shared connection ends when the guest's sshd goes (reboot, poweroff) or after
# SSH_CONTROL_PERSIST_S idle; its socket is named by a hash of host, port and user.
SSH_OPTIONS = (
    "-o", "BatchMode=yes",
    "-o", "StrictHostKeyChecking=no",
    "-o", "UserKnownHostsFile=/dev/null",
    "-o", "LogLevel=ERROR",
    "-o", f"ConnectTimeout={SSH_CONNECT_TIMEOUT_S}",
    "-o", "ControlMaster=auto",
    "-o", "ControlPath=/tmp/px-vm-ssh-%C",
    "-o", f"ControlPersist={SSH_CONTROL_PERSIST_S}",
)  # fmt: skip


class VmError(RuntimeError):
    """A VM that did not boot, died, or did not answer."""


class SshError(subprocess.CalledProcessError):
    """A command that failed in a VM; its message carries the command's output."""

    def __init__(self, vm: str, proc: subprocess.CompletedProcess):
        super().__init__(proc.returncode, proc.args, proc.stdout, proc.stderr)
        self.vm = vm

    def __str__(self) -> str:
        stdout = _tail(self.stdout or "", SSH_ERROR_TAIL_LINES)
        stderr = _tail(self.stderr or "", SSH_ERROR_TAIL_LINES)
        return (
            f"{self.vm}: `{self.cmd[-1]}` exited with {self.returncode}\n"
            f"--- stdout\n{stdout}\n--- stderr\n{stderr}"
        )


class Lan:
    """A private Ethernet segment: UDP multicast on the loopback interface.

    qemu's socket netdev sends every frame to the group and receives everyone else's, so the
    VMs of one run share a switchless LAN. `localaddr=127.0.0.1` keeps the datagrams on the
    loopback interface (they never reach a real network), and a random group and port per run
    keep two runs on one machine apart."""

    def __init__(self) -> None:
        rng = random.SystemRandom()
        # 239.255.0.0/16 is the site-local administratively scoped block.
        self.group = f"239.255.{rng.randrange(256)}.{rng.randrange(1, 255)}"
        self.port = rng.randrange(20000, 60000)

    def netdev(self, netdev_id: str) -> str:
        return f"socket,id={netdev_id},mcast={self.group}:{self.port},localaddr=127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _die_with_parent() -> None:
    """Runs in the qemu child: SIGKILL it when the test run dies, so no guest is left behind."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Vm:
    """One guest. `start()` launches qemu and returns at once; `wait_ready()` waits for the boot."""

    def __init__(
        self,
        name: str,
        ip: str,
        *,
        image: image.Image,
        lan: Lan,
        workdir: Path,
        hosts: dict[str, str],
        guest_ports: tuple[int, ...] = (),
        guest_forwards: tuple[str, ...] = (),
        accel: str = "tcg",
        keep: bool = False,
    ) -> None:
        self.name = name
        self.ip = ip  # on the private LAN, without the prefix length
        self.image = image
        self.lan = lan
        self.hosts = hosts  # name -> private IP of every VM of the run, for /etc/hosts
        self.guest_ports = guest_ports
        # `guestfwd=` rules of the user network: connections from the guest to an address of
        # it that reach a service of the host (the tests' package mirror).
        self.guest_forwards = guest_forwards
        self.accel = accel
        self.keep = keep  # True: leave qemu running when the test run ends
        self.disk = workdir / f"{name}.qcow2"
        # qemu's QMP socket, through which the test pauses and resumes the guest's CPUs. A Unix
        # socket path must stay under 108 bytes, which a deep workdir may not: it goes in /tmp.
        self.qmp_socket = Path("/tmp") / f"px-vm-qmp-{os.getpid()}-{name}"
        self.console_log = workdir / f"{name}.console.log"
        self.qemu_log = workdir / f"{name}.qemu.log"
        self.ssh_port = 0
        self.ports: dict[int, int] = {}  # guest port -> host port on 127.0.0.1
        self._proc: subprocess.Popen | None = None
        self._ready_offset = 0  # where in console_log to look for the next marker
        self._qemu_log_offset = 0  # where in qemu_log this qemu's messages start
        self._port_retries = PORT_RETRIES

    def __repr__(self) -> str:
        return f"<Vm {self.name} {self.ip} ssh=127.0.0.1:{self.ssh_port}>"

    # Power

    def start(self) -> None:
        """Powers the VM on: a new qemu process on the same disk (its overlay survives)."""
        if self.running:
            raise VmError(f"{self.name} is already running")
        if not self.disk.exists():
            # A qcow2 overlay: the VM's writes go there, the cached image stays as it is.
            create = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw"]
            create += ["-b", str(self.image.disk), str(self.disk)]
            subprocess.run(create, check=True, timeout=QEMU_IMG_TIMEOUT_S)
        self.ssh_port = free_port()
        self.ports = {port: free_port() for port in self.guest_ports}
        self.console_log.touch()
        self._ready_offset = self.console_log.stat().st_size
        self.qemu_log.touch()
        self._qemu_log_offset = self.qemu_log.stat().st_size
        with open(self.qemu_log, "a") as log:
            self._proc = subprocess.Popen(
                self.qemu_command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=None if self.keep else _die_with_parent,
            )

    def qemu_command(self) -> list[str]:
        hosts = ",".join(f"{name}:{ip}" for name, ip in self.hosts.items())
        cmdline = " ".join([
            *KERNEL_ARGS,
            f"px.ip={self.ip}/{LAN_PREFIX} px.hostname={self.name} px.hosts={hosts}",
            f"systemd.hostname={self.name}",
        ])  # fmt: skip
        forwards = [f"hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22"]
        forwards += [f"hostfwd=tcp:127.0.0.1:{host}-:{guest}" for guest, host in self.ports.items()]
        forwards += [f"guestfwd={rule}" for rule in self.guest_forwards]
        mac = "52:54:00:77:00:{:02x}".format(int(self.ip.rsplit(".", 1)[1]))
        return [
            "qemu-system-x86_64",
            "-name", self.name,
            "-accel", self.accel,
            # The CPU a server has: emulated, the default model lacks AES-NI and PCLMULQDQ, and
            # TLS then decrypts in software so slowly that one large upload over HTTPS stalls a
            # one-vCPU control host past its watchdog; "max" has them (and "host" under KVM).
            "-cpu", CPU_MODEL[self.accel],
            "-m", str(MEMORY_MB),
            "-smp", str(CPUS),
            "-nodefaults", "-no-user-config", "-display", "none",
            "-kernel", str(self.image.kernel),
            "-initrd", str(self.image.initrd),
            "-append", cmdline,
            "-chardev", f"file,id=console,path={self.console_log},append=on",
            "-serial", "chardev:console",
            # Fixed PCI slots, so the kernel names the NICs in this order: eth0, eth1.
            "-drive", f"file={self.disk},format=qcow2,if=none,id=disk",
            "-device", "virtio-blk-pci,drive=disk,addr=0x2",
            "-netdev", f"user,id=hostnet,restrict=on,{','.join(forwards)}",
            "-device", "virtio-net-pci,netdev=hostnet,addr=0x3",
            "-netdev", self.lan.netdev("lan"),
            "-device", f"virtio-net-pci,netdev=lan,mac={mac},addr=0x4",
            "-device", "virtio-rng-pci,addr=0x5",
            "-qmp", f"unix:{self.qmp_socket},server=on,wait=off",
        ]  # fmt: skip

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def wait_ready(self, timeout: float = BOOT_TIMEOUT_S) -> float:
        """Waits for this boot's readiness marker and a working SSH; returns the seconds waited."""
        started = time.monotonic()
        deadline = started + timeout
        while not self._marker_seen():
            if not self.running:
                if self._port_taken() and self._port_retries > 0:
                    self._port_retries -= 1
                    self.start()
                    continue
                raise VmError(
                    f"{self.name}: qemu exited before the guest was ready\n{self.diagnosis()}"
                )
            if time.monotonic() > deadline:
                raise VmError(f"{self.name}: not ready after {timeout:.0f} s\n{self.diagnosis()}")
            time.sleep(POLL_INTERVAL_S)
        # sshd started before the marker was written: one try normally suffices.
        while True:
            proc = self.ssh("true", check=False, timeout=max(1.0, deadline - time.monotonic()))
            if proc.returncode == 0:
                return time.monotonic() - started
            if time.monotonic() > deadline:
                raise VmError(
                    f"{self.name}: ready, but SSH fails: {proc.stderr}\n{self.diagnosis()}"
                )
            time.sleep(POLL_INTERVAL_S)

    def _marker_seen(self) -> bool:
        with open(self.console_log, "rb") as log:
            log.seek(self._ready_offset)
            return image.READY_MARKER.encode() in log.read()

    def _port_taken(self) -> bool:
        """Whether this qemu exited because a host port picked for it was taken meanwhile."""
        with open(self.qemu_log, "rb") as log:
            log.seek(self._qemu_log_offset)
            return b"Could not set up host forwarding rule" in log.read()

    def reboot(self, timeout: float = BOOT_TIMEOUT_S) -> float:
        """`systemctl reboot` in the guest, then waits for it to be ready again; returns seconds."""
        self._ready_offset = self.console_log.stat().st_size
        self.ssh("systemctl reboot --no-block")
        return self.wait_ready(timeout)

    def stop(self, timeout: float = SHUTDOWN_TIMEOUT_S) -> None:
        """A clean shutdown (`systemctl poweroff`); kills qemu if the guest does not finish."""
        if not self.running:
            return
        self.ssh("systemctl poweroff --no-block", check=False)
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def pause(self) -> None:
        """Stops the guest's CPUs (QMP `stop`): the host vanishes as a power loss or a hung kernel
        makes it vanish. Its peers see silence, no FIN and no RST; qemu itself runs on, so its
        forwarded ports stay where they are (a connection to one is accepted by qemu and then
        gets no answer) and `resume` brings the guest back as it was."""
        self._qmp("stop")

    def resume(self) -> None:
        """Lets a paused guest run again (QMP `cont`; harmless on a running one). Its clocks
        stood still meanwhile: for the guest, no time passed."""
        self._qmp("cont")

    def _qmp(self, command: str) -> None:
        """Runs one QMP command without arguments, raising VmError unless qemu says it is done."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(QMP_TIMEOUT_S)
                sock.connect(str(self.qmp_socket))
                replies = sock.makefile("rb")

                def answer() -> dict:
                    # Events (`STOP`, `RESUME`) may come before the command's own answer.
                    while True:
                        line = replies.readline(QMP_MAX_LINE)
                        if not line:
                            raise VmError(f"{self.name}: qemu closed its QMP socket")
                        message = json.loads(line)
                        if "return" in message or "error" in message:
                            return message

                replies.readline(QMP_MAX_LINE)  # the greeting
                for execute in ("qmp_capabilities", command):
                    sock.sendall(json.dumps({"execute": execute}).encode() + b"\n")
                    reply = answer()
                    if "error" in reply:
                        raise VmError(f"{self.name}: QMP {execute}: {reply['error']}")
        except OSError as err:
            raise VmError(f"{self.name}: QMP {command}: {err}") from err

    def kill(self) -> None:
        """Pulls the plug: SIGKILL to qemu. What the guest had not written to disk is lost."""
        if self.running:
            self._proc.kill()
        if self._proc:
            self._proc.wait()

    # Access

    def ssh_command(self, command: str | None = None) -> list[str]:
        """The ssh command line that runs `command` in the VM (a login shell without one)."""
        argv = ["ssh", "-i", str(self.image.ssh_key), "-p", str(self.ssh_port), *SSH_OPTIONS]
        return [*argv, "root@127.0.0.1", *([command] if command is not None else [])]

    def ssh(
        self,
        command: str,
        *,
        check: bool = True,
        timeout: float = SSH_TIMEOUT_S,
        input: str | None = None,
    ) -> subprocess.CompletedProcess:
        """Runs a shell command in the VM as root. With check, a failure raises SshError."""
        try:
            proc = subprocess.run(
                self.ssh_command(command),
                input=input,
                stdin=None if input is not None else subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as err:
            raise VmError(f"{self.name}: `{command}` did not finish in {timeout:.0f} s") from err
        if check and proc.returncode != 0:
            raise SshError(self.name, proc)
        return proc

    # Diagnosis

    def console_tail(self, lines: int = CONSOLE_TAIL_LINES) -> str:
        """The end of the console log, without the carriage returns and colours of a terminal."""
        if not self.console_log.exists():
            return "(no console output)"
        text = self.console_log.read_bytes().decode(errors="replace").replace("\r", "")
        return _tail(re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text), lines)

    def diagnosis(self) -> str:
        """What to look at when this VM misbehaves: its console, qemu's own messages, paths."""
        qemu = self.qemu_log.read_text(errors="replace").strip() if self.qemu_log.exists() else ""
        return (
            f"--- last {CONSOLE_TAIL_LINES} lines of {self.console_log}\n{self.console_tail()}\n"
            + (f"--- qemu: {qemu}\n" if qemu else "")
            + f"--- ssh: {shlex.join(self.ssh_command())}"
        )


def choose_accel(img: image.Image, workdir: Path) -> str:
    """Returns "kvm" when a guest really boots with it here, else "tcg" (software emulation).

    $PX_VM_ACCEL overrides the probe. Otherwise the answer is probed once per host boot and
    kept in the cache: on these machines /dev/kvm exists, but a guest hangs with it."""
    forced = os.environ.get("PX_VM_ACCEL")
    if forced:
        return forced
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    remembered = image.cache_root() / "accel"
    if remembered.exists():
        seen_boot, _, accel = remembered.read_text().partition(" ")
        if seen_boot == boot_id:
            return accel.strip()
    probe = Vm(
        "kvm-probe", "10.77.0.254", image=img, lan=Lan(), workdir=workdir, hosts={}, accel="kvm"
    )
    probe.start()
    try:
        probe.wait_ready(KVM_PROBE_TIMEOUT_S)
        accel = "kvm"
    except VmError:
        accel = "tcg"
    finally:
        probe.kill()
    remembered.write_text(f"{boot_id} {accel}\n")
    return accel
