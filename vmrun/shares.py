"""Shared folders (`shares`): host directories a guest mounts through virtiofs.

How a share reaches the guest:

* The domain XML (vmrun/domain.py) has shared memory (`memfd`, `access mode='shared'`:
  virtiofsd maps the guest's memory) and one `<filesystem>` per share, with the virtiofs
  tag `share<N>` (N the share's index in `shares`).  libvirt starts one `virtiofsd` per
  share (the C virtiofsd of Debian's QEMU packages, found through QEMU's vhost-user
  descriptors) in the driver's process tree.
* virtiofsd does not serve the host directory itself but a bind mount of it in the VM's
  root (`<root>/shares/<tag>`, `VMPaths.share`) that the driver makes in its own, private
  mount namespace before libvirt starts (`bind`); nothing of it is visible outside the
  driver, its QEMU and its virtiofsds, and it is gone with them.  A `readonly` share is a
  read-only bind mount (recursively: submounts too), so the host refuses every write
  (EROFS), whatever the guest does: neither QEMU 7.2's virtiofsd nor libvirt 9.0 has a
  read-only virtiofs option.
* A guest with a cloud-init seed mounts its shares by itself: vmrun adds a cloud-config
  part (`bootcmd`, every boot) to its user-data (`cloud_config`, see vmrun/userdata.py).
  cloud-init 22.4's `mounts` module cannot: it drops a device name that is not a block
  device.  A kernel-booted
  guest mounts the tag (`mount -t virtiofs share0 /src`).

This module is loaded by the driver too (`bind`), so it imports nothing of the manifest
at run time.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vmrun.errors import HostError

if TYPE_CHECKING:
    from vmrun.layout import VMPaths
    from vmrun.manifest import VM, Stack

VIRTIOFSD = Path("/usr/lib/qemu/virtiofsd")  # Debian's QEMU packages (qemu-system-common)
DESCRIPTOR_DIRS = (Path("/etc/qemu/vhost-user"), Path("/usr/share/qemu/vhost-user"))


@dataclass(frozen=True)
class Mount:
    """A share as the domain XML and the driver see it."""

    tag: str  # the virtiofs tag: share<N>
    host: Path  # the host directory
    dir: Path  # its bind mount in the VM's root: what virtiofsd serves
    guest: str  # where the guest mounts it
    readonly: bool


def plan(vm: VM, paths: VMPaths) -> tuple[Mount, ...]:
    return tuple(Mount(tag=share.tag, host=share.host, dir=paths.share(share.tag),
                       guest=share.guest, readonly=share.readonly) for share in vm.shares)


# --- the host ---------------------------------------------------------------------------

def find_virtiofsd() -> Path:
    """virtiofsd as QEMU's vhost-user descriptors name it (type "fs"; a file in /etc
    overrides one of the same name in /usr/share; lower names win); else Debian's path."""
    chosen: dict[str, Path] = {}
    for directory in reversed(DESCRIPTOR_DIRS):
        try:
            for path in directory.glob("*.json"):
                chosen[path.name] = path
        except OSError:
            continue
    for name in sorted(chosen):
        try:
            data = json.loads(chosen[name].read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("type") == "fs" and \
                isinstance(data.get("binary"), str) and os.access(data["binary"], os.X_OK):
            return Path(data["binary"])
    return VIRTIOFSD


def require(stack: Stack) -> Path | None:
    """virtiofsd, when a VM has shares; HostError (exit 3) when the host cannot serve them."""
    sharing = [vm.name for vm in stack.vms if vm.shares]
    if not sharing:
        return None
    if os.geteuid() != 0:
        raise HostError(
            f"VM {sharing[0]} has shared folders, which need root (vmrun bind-mounts "
            "each share in the driver's own mount namespace, and virtiofsd runs as root)",
            hint="run vmrun as root, or remove the shares key")
    binary = find_virtiofsd()
    if not os.access(binary, os.X_OK):
        raise HostError(f"shared folders need virtiofsd, which is not installed ({binary})",
                        hint="apt-get install qemu-system-common (make setup does)")
    return binary


# --- the driver: bind mounts in its own mount namespace --------------------------------

_MS_RDONLY = 0x1
_MS_REMOUNT = 0x20
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MNT_DETACH = 0x2
_AT_FDCWD = -100
_AT_RECURSIVE = 0x8000
_MOUNT_ATTR_RDONLY = 0x1
_SYS_MOUNT_SETATTR = 442  # on every Linux architecture but alpha


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def _mount(source: str | None, target: str, flags: int) -> None:
    libc = _libc()
    _check(libc.mount(os.fsencode(source) if source else None, os.fsencode(target), None,
                      ctypes.c_ulong(flags), None), f"mount {source or ''} {target}")


def _read_only_tree(target: str) -> bool:
    """Make the mount at `target` and every mount below it read-only (mount_setattr,
    Linux 5.12); False when the kernel lacks it."""
    libc = _libc()
    attr = _MountAttr(attr_set=_MOUNT_ATTR_RDONLY)
    result = libc.syscall(ctypes.c_long(_SYS_MOUNT_SETATTR), ctypes.c_int(_AT_FDCWD),
                          ctypes.c_char_p(os.fsencode(target)), ctypes.c_uint(_AT_RECURSIVE),
                          ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)))
    if result != 0 and ctypes.get_errno() == errno.ENOSYS:
        return False
    _check(result, f"mount_setattr {target} read-only")
    return True


def bind(mounts: Iterable[tuple[str, str, bool]]) -> None:
    """Bind each (host directory, mount point, read-only) in this process's mount
    namespace, which must be private to it (`_fastsig.private_proc` made it so).  Raises
    OSError with a message that names the directory."""
    for source, target, readonly in mounts:
        os.makedirs(target, mode=0o700, exist_ok=True)
        _mount(source, target, _MS_BIND | _MS_REC)
        if readonly and not _read_only_tree(target):
            # An old kernel: without the submounts, which would stay writable.
            _check(_libc().umount2(os.fsencode(target), _MNT_DETACH), f"umount {target}")
            _mount(source, target, _MS_BIND)
            _mount(None, target, _MS_BIND | _MS_REMOUNT | _MS_RDONLY)


# --- the guest: cloud-init ---------------------------------------------------------------

def cloud_config(vm: VM) -> bytes | None:
    """A cloud-config that mounts the VM's shares at every boot (None without shares)."""
    if not vm.shares:
        return None
    lines = ["#cloud-config", "# vmrun: mount the shared folders (virtiofs) at every boot",
             "bootcmd:"]
    for share in vm.shares:
        where = shlex.quote(share.guest)
        options = "-o ro " if share.readonly else ""
        command = (f"mkdir -p {where} && {{ mountpoint -q {where} || "
                   f"mount -t virtiofs {options}{share.tag} {where}; }}")
        lines.append(f"  - {json.dumps(command, ensure_ascii=False)}")
    return ("\n".join(lines) + "\n").encode()
