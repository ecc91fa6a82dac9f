"""Outbound NAT for a VM (`nat = true` or `"no-host"`): a user-mode NIC served by passt.

Why passt, run by vmrun on the host side: a stack with private networks runs its QEMUs
in a network namespace of its own, which reaches nothing outside.  QEMU's built-in slirp
or a passt started by libvirt would live in that namespace too.  So the supervisor starts
one `passt` per NAT VM in the host's network namespace (and in the stack's PID namespace,
so it dies with the stack); QEMU reaches it through a UNIX socket (`-netdev stream`, QEMU
7.2), which works across network namespaces.  passt translates the guest's traffic into
ordinary sockets of the host: no tap, no bridge, no sysctl, no firewall rule on the host.

The guest side is the same for every VM, as with QEMU's slirp: address 10.0.2.15/24,
gateway 10.0.2.2, DNS 10.0.2.3 (forwarded to the host's resolver), served by passt's
DHCP.  Connections to the gateway reach the host's loopback (services on 127.0.0.1), unless
`nat = "no-host"` (passt's --no-map-gw).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pwd
import shutil
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vmrun import layout
from vmrun.errors import HostError

GUEST_IP = "10.0.2.15"
PREFIX = 24
GATEWAY = "10.0.2.2"
DNS = "10.0.2.3"
PASST = "passt"
NETDEV_ID = "vmrun-nat"
# The NIC's own PCIe root port, declared in the domain XML at the last slot of the root
# bus, so that the guest enumerates it after every NIC libvirt places (private networks
# stay eth0, eth1, ... in the manifest's order; the NAT NIC comes last).
PORT_INDEX = 31
PORT_SLOT = 0x1E


@dataclass(frozen=True)
class Link:
    """What the domain needs for a VM's NAT NIC: passt's socket and the NIC's MAC."""

    socket: Path
    mac: str

    def qemu_args(self) -> list[str]:
        """QEMU arguments: a stream netdev to passt and its virtio NIC (no option ROM).

        The device is given as JSON, like libvirt's own: QEMU 7.2 creates the devices
        given in the older key=value syntax before the JSON ones, before the root port
        it plugs into exists."""
        if "," in str(self.socket):
            raise ValueError(f"a comma in {self.socket} would split QEMU's option")
        device = {"driver": "virtio-net-pci", "netdev": NETDEV_ID, "id": NETDEV_ID,
                  "mac": self.mac, "romfile": "", "bus": f"pci.{PORT_INDEX}"}
        return ["-netdev", f"stream,id={NETDEV_ID},server=off,addr.type=unix,"
                           f"addr.path={self.socket}",
                "-device", json.dumps(device, separators=(",", ":"))]


def mac(stack: str, vm: str) -> str:
    """The NAT NIC's MAC: fixed per stack and VM, apart from private networks' 52:54:00."""
    value = int.from_bytes(hashlib.sha256(f"{stack}/{vm}/nat".encode()).digest()[:3], "big")
    return "52:54:01:" + ":".join(f"{(value >> s) & 0xFF:02x}" for s in (16, 8, 0))


def placeholder_values(stack: str, vm: str) -> dict[str, str]:
    """`{nat.ip}` and friends, for a VM with NAT (kernel-boot guests configure themselves)."""
    return {"nat.ip": GUEST_IP, "nat.prefix": str(PREFIX), "nat.cidr": f"{GUEST_IP}/{PREFIX}",
            "nat.gateway": GATEWAY, "nat.dns": DNS, "nat.mac": mac(stack, vm)}


def passt_argv(socket: Path, host_access: bool) -> list[str]:
    """passt in the foreground, IPv4, serving the fixed guest side on `socket`."""
    # Started as root, passt runs as `nobody` (and isolates itself: namespaces, seccomp).
    argv = [shutil.which(PASST) or PASST, "--foreground", "--quiet", "--ipv4-only",
            "--socket", str(socket),
            "--address", GUEST_IP, "--netmask", str(PREFIX), "--gateway", GATEWAY,
            "--dns", DNS, "--dns-forward", DNS, "--tcp-ports", "none", "--udp-ports", "none"]
    if not host_access:
        argv.append("--no-map-gw")
    return argv


def prepare_socket_dir(directory: Path) -> None:
    """Make the directory of a VM's passt socket anew (see layout.nat_socket_base): as
    root, owned by `nobody`, whom passt runs as, under a base others may pass through but
    neither list nor write."""
    base = directory.parent
    if os.geteuid() != 0:
        layout.private_dir(base)
    else:
        with contextlib.suppress(FileExistsError):
            base.mkdir(mode=0o711)
        st = os.lstat(base)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
            raise HostError(f"refusing to use {base}: not a directory of root's that only "
                            "root can write to", hint=f"remove {base}")
        os.chmod(base, 0o711)
    layout.remove(directory)
    directory.mkdir(mode=0o700)
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(directory, nobody.pw_uid, nobody.pw_gid)


def remove_socket_dir(directory: Path) -> None:
    layout.remove(directory)


SOCKET_TIMEOUT = 5.0  # passt makes its socket within milliseconds


def wait_for_socket(socket: Path, gone: Callable[[], bool],
                    pause: Callable[[float], object]) -> bool:
    """Wait until passt has made `socket`: False if passt ended first (`gone()`) or did
    not make it within SOCKET_TIMEOUT.  `pause(seconds)` waits between two looks (a sleep,
    or the supervisor's own loop, which reaps meanwhile)."""
    deadline = time.monotonic() + SOCKET_TIMEOUT
    while not socket.exists():
        if gone() or time.monotonic() > deadline:
            return socket.exists()
        pause(0.005)
    return True


def require(needed: bool) -> None:
    """HostError (exit 3) when a VM has NAT and passt is not installed or cannot run here
    (before anything starts; subprocesses are allowed then, the reaper is not there yet)."""
    if not needed:
        return
    if shutil.which(PASST) is None:
        raise HostError("nat needs passt, which is not installed",
                        hint="apt-get install passt (make setup does)")
    directory = layout.nat_socket_base() / f"check-{os.getpid()}"
    prepare_socket_dir(directory)
    socket = directory / "passt.sock"
    try:
        with subprocess.Popen(passt_argv(socket, True), stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
            started = wait_for_socket(socket, lambda: proc.poll() is not None, time.sleep)
            proc.kill()
            output = proc.communicate(timeout=5)[0].decode(errors="replace")
    finally:
        remove_socket_dir(directory)
    if not started:
        said = [line for line in output.splitlines() if line and "syslog" not in line]
        raise HostError(f"nat: passt cannot run here ({said[-1] if said else 'no message'})",
                        hint="passt needs a network interface with a default route")
