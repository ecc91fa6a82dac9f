"""Where a stack keeps its state, and how each VM's embedded root gets a short path.

    <state_dir>/<stack>/            mode 0700
        lock                        held (flock) by the running supervisor; holds its pid
        last-run.json               outcome of the last run
        vms/<vm>/console.log        the VM's whole console of the last run
        vms/<vm>/driver.log         the driver's and libvirt's messages
        vms/<vm>/root               libvirt's embedded root (or a link to a short one)

UNIX socket paths are limited to 108 bytes and libvirt puts the QEMU monitor socket
under the root, so a root whose path would be too long lives in a short directory
under /run/vmrun (or the user's runtime directory) and is linked from the state dir.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

# Room left under the root: "/lib/qemu/domain-NNNN-<20 chars>/monitor.sock" and more.
ROOT_PATH_MAX = 48


def short_root_base() -> Path:
    if os.geteuid() == 0:
        return Path("/run/vmrun")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "vmrun" if runtime else Path(f"/tmp/vmrun-{os.getuid()}")


@dataclass(frozen=True)
class VMPaths:
    dir: Path
    root_link: Path  # <dir>/root: the root itself, or a link to it
    root: Path  # the path libvirt is given (short)
    console_log: Path
    driver_log: Path

    @property
    def console_socket(self) -> Path:
        return self.root / "console.sock"

    @property
    def attach_socket(self) -> Path:
        return self.root / "attach.sock"

    @property
    def qemu_conf(self) -> Path:
        return self.root / "etc" / "qemu.conf"

    @property
    def caps_dir(self) -> Path:
        return self.root / "cache" / "qemu" / "capabilities"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    def pidfile(self, domain: str) -> Path:
        return self.root / "run" / "qemu" / f"{domain}.pid"


@dataclass(frozen=True)
class StackPaths:
    dir: Path

    @property
    def lock(self) -> Path:
        return self.dir / "lock"

    @property
    def last_run(self) -> Path:
        return self.dir / "last-run.json"

    def vm(self, name: str) -> VMPaths:
        vm_dir = self.dir / "vms" / name
        link = vm_dir / "root"
        if len(str(link)) <= ROOT_PATH_MAX:
            root = link
        else:
            digest = hashlib.sha256(str(link).encode()).hexdigest()[:16]
            root = short_root_base() / digest
        return VMPaths(dir=vm_dir, root_link=link, root=root,
                       console_log=vm_dir / "console.log", driver_log=vm_dir / "driver.log")
