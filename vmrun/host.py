"""What this host can do: find QEMU and libvirt's QEMU driver, decide the accelerator.

Pure Python and cheap: the supervisor runs these checks before it writes or starts
anything, so a host that cannot run guests fails with exit status 3 and a reason.
"""

from __future__ import annotations

import fcntl
import glob
import grp
import importlib.util
import os
import pwd
import shutil
from dataclasses import dataclass

from vmrun.errors import HostError

QEMU_BINARY = "qemu-system-x86_64"
LIBVIRT_QEMU_DRIVER_GLOB = "/usr/lib/*/libvirt/connection-driver/libvirt_driver_qemu.so"
KVM_DEVICE = "/dev/kvm"
_KVM_GET_API_VERSION = 0xAE00
_KVM_API_VERSION = 12

SETUP_HINT = "run `make setup` in the vmrun checkout (as root) to install it"


@dataclass(frozen=True)
class Accel:
    name: str  # "kvm" or "tcg"
    reason: str  # why this one was chosen


def kvm_problem() -> str | None:
    """None when KVM can run guests here, otherwise why it cannot."""
    try:
        fd = os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return f"{KVM_DEVICE} does not exist (no KVM module loaded)"
    except OSError as exc:
        return f"{KVM_DEVICE} cannot be opened ({exc.strerror})"
    try:
        version = fcntl.ioctl(fd, _KVM_GET_API_VERSION)
    except OSError as exc:
        return f"{KVM_DEVICE} does not answer KVM ioctls ({exc.strerror})"
    finally:
        os.close(fd)
    if version != _KVM_API_VERSION:
        return f"{KVM_DEVICE} speaks KVM API {version}, not {_KVM_API_VERSION}"
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            flags = next((line.split(":", 1)[1].split() for line in cpuinfo
                          if line.startswith("flags")), [])
    except OSError:
        flags = []
    if "vmx" not in flags and "svm" not in flags:
        return ("the CPU shows neither vmx nor svm, so KVM guests cannot run "
                f"(although {KVM_DEVICE} exists)")
    return None


def choose_accel(requested: str) -> Accel:
    """Resolve "auto" | "kvm" | "tcg" to the accelerator guests will use."""
    if requested == "tcg":
        return Accel("tcg", "requested")
    problem = kvm_problem()
    if requested == "kvm":
        if problem:
            raise HostError(f'accel = "kvm" but KVM is unusable on this host: {problem}',
                            hint='use accel = "auto" or "tcg" to run under emulation')
        return Accel("kvm", "requested")
    if problem:
        return Accel("tcg", f"KVM unusable: {problem}")
    return Accel("kvm", "KVM usable")


def find_qemu() -> str:
    path = shutil.which(QEMU_BINARY, path="/usr/bin:/usr/local/bin:" + os.environ.get("PATH", ""))
    if path is None:
        raise HostError(f"{QEMU_BINARY} is not installed", hint=SETUP_HINT)
    return path


def find_libvirt_driver() -> str:
    found = sorted(glob.glob(LIBVIRT_QEMU_DRIVER_GLOB))
    if not found:
        raise HostError("libvirt's QEMU driver (libvirt-daemon-driver-qemu) is not installed",
                        hint=SETUP_HINT)
    if importlib.util.find_spec("libvirt") is None:
        raise HostError("the libvirt Python binding is not installed in this environment",
                        hint=SETUP_HINT)
    return found[0]


def check_accounts() -> None:
    """As root, libvirt's embedded driver needs the libvirt-qemu user and group."""
    if os.geteuid() != 0:
        return
    try:
        grp.getgrnam("libvirt-qemu")
        pwd.getpwnam("libvirt-qemu")
    except KeyError:
        raise HostError("the libvirt-qemu user or group does not exist; libvirt's embedded "
                        "driver refuses to start without them",
                        hint=SETUP_HINT) from None


@dataclass(frozen=True)
class Host:
    qemu: str
    libvirt_driver: str
    accel: Accel


def check(requested_accel: str) -> Host:
    """Everything the host needs for a stack; raises HostError (exit 3) otherwise."""
    qemu = find_qemu()
    driver = find_libvirt_driver()
    check_accounts()
    return Host(qemu=qemu, libvirt_driver=driver, accel=choose_accel(requested_accel))
