"""The cgroups libvirt makes for a stack's guests, and removing those a killed run left.

libvirt puts each guest's QEMU in a cgroup `machine/<machine name>.libvirt-qemu` in every
cgroup hierarchy (cgroup v2, or each v1 controller), with sub-cgroups (emulator, vcpuN),
and removes them when the guest stops.  A run killed before libvirt could do that leaves
them behind.  For an embedded root the machine name is
`qemu-embed-<first 8 hex digits of SHA-256(root)>-<domain id>-<name>` (libvirt's
virDomainDriverGenerateMachineName), so the cgroups of a VM are found from its root.

Only empty cgroups can be removed (rmdir): one that still holds a process is left alone.

vmrun's roots now switch libvirt's cgroups off (vmrun/roots.py, `cgroup_controllers`), so
this removes what runs of an earlier vmrun left, and anything a later libvirt might make.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

CGROUP_FS = Path("/sys/fs/cgroup")


def machine_prefix(root: Path) -> str:
    return "qemu-embed-" + hashlib.sha256(str(root).encode()).hexdigest()[:8] + "-"


def _machine_dirs() -> list[Path]:
    """Every `machine` cgroup directory: cgroup v2's, or one per v1 hierarchy."""
    found = [CGROUP_FS / "machine"] if (CGROUP_FS / "machine").is_dir() else []
    try:
        hierarchies = list(CGROUP_FS.iterdir())
    except OSError:
        return found
    return found + [h / "machine" for h in hierarchies if (h / "machine").is_dir()]


def find(roots: Iterable[Path]) -> list[Path]:
    """The cgroups of guests started on these embedded roots."""
    prefixes = tuple(machine_prefix(root) for root in roots)
    found = []
    for machine in _machine_dirs():
        try:
            entries = list(machine.iterdir())
        except OSError:
            continue
        found += [e for e in entries if e.name.startswith(prefixes) and
                  e.name.endswith(".libvirt-qemu") and e.is_dir()]
    return found


def remove(roots: Iterable[Path]) -> list[Path]:
    """Remove the empty cgroups of these roots' guests (sub-cgroups first); return those
    removed."""
    removed = []
    for group in find(roots):
        for directory, _, _ in sorted(os.walk(group), key=lambda w: -len(w[0])):
            try:
                os.rmdir(directory)
            except OSError:  # busy (a process is still in it), or gone already
                break
        else:
            removed.append(group)
    return removed
