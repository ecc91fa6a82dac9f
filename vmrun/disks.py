"""A VM's disks: copy-on-write overlays over pristine images, blank disks, read-only images.

An image disk is attached through a qcow2 overlay in the VM's state directory, created
with `qemu-img create -b IMAGE -F FORMAT` (the backing format is always given, never
probed), so the image itself is never written.  Overlays and blank disks are kept between
runs (a lab VM keeps its state) unless the VM is `ephemeral` or `vmrun up --fresh` is
given; an overlay whose image changed in the manifest is started anew.

qemu-img runs through subprocess here: `prepare` is only called before the supervisor
installs its reaper (see supervisor.Supervisor.run).
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from vmrun.errors import HostError
from vmrun.layout import VMPaths
from vmrun.manifest import VM, Disk

QEMU_IMG = "qemu-img"


@dataclass(frozen=True)
class Attachment:
    """A file the domain gets as a virtio disk."""

    path: Path
    format: str
    readonly: bool


def plan(vm: VM, paths: VMPaths) -> list[Attachment]:
    """The files attached for `vm`'s disks, in order, then its seed (nothing is created)."""
    attachments = []
    for index, disk in enumerate(vm.disks):
        if disk.readonly and disk.image is not None:
            attachments.append(Attachment(disk.image, disk.format, True))
        else:
            attachments.append(Attachment(paths.disk(index), "qcow2", False))
    if vm.cloud_init is not None:
        attachments.append(Attachment(paths.seed, "raw", True))
    return attachments


def _run(argv: list[str]) -> None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    except FileNotFoundError:
        raise HostError(f"{argv[0]} is not installed",
                        hint="run `make setup` in the vmrun checkout (qemu-utils)") from None
    if proc.returncode != 0:
        raise HostError(f"{' '.join(argv)} failed: {proc.stderr.strip() or proc.returncode}")


def _wanted(disk: Disk) -> dict[str, object]:
    return {"image": str(disk.image) if disk.image else None, "format": disk.format,
            "size_mib": disk.size_mib}


def check_space(vm: VM, paths: VMPaths, fresh: bool) -> None:
    """Refuse (exit 3) a blank disk larger than the free space where it would live."""
    directory = paths.dir if paths.dir.exists() else paths.dir.parent
    while not directory.exists():
        directory = directory.parent
    stat = os.statvfs(directory)
    free_mib = stat.f_bavail * stat.f_frsize // (1024 * 1024)
    for index, disk in enumerate(vm.disks):
        target = paths.disk(index)
        if disk.size_mib is not None and disk.size_mib > free_mib and \
                (fresh or vm.ephemeral or not target.exists()):
            raise HostError(f"VM {vm.name}: disk {index} ({disk.size_mib}M) is larger than the "
                            f"free space in {directory} ({free_mib}M)",
                            hint="use a smaller size, or --state-dir on a larger filesystem")


def prepare(vm: VM, paths: VMPaths, fresh: bool) -> list[Attachment]:
    """Create the overlays and blank disks that are missing (or all, when fresh)."""
    paths.dir.mkdir(parents=True, exist_ok=True)
    for index, disk in enumerate(vm.disks):
        if disk.readonly:
            continue
        target = paths.disk(index)
        sidecar = target.with_suffix(".json")
        wanted = _wanted(disk)
        try:
            current = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            current = None
        if target.exists() and current == wanted and not fresh and not vm.ephemeral:
            continue
        tmp = target.with_name(target.name + ".new")
        if disk.image is not None:
            _run([QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", str(disk.image),
                  "-F", disk.format, str(tmp)])
        else:
            _run([QEMU_IMG, "create", "-q", "-f", "qcow2", str(tmp), f"{disk.size_mib}M"])
        tmp.replace(target)
        sidecar.write_text(json.dumps(wanted) + "\n")
    return plan(vm, paths)


def remove_unused(vm: VM, paths: VMPaths) -> None:
    """Drop disk files of entries the manifest no longer has."""
    for path in paths.dir.glob("disk-*.qcow2"):
        index = path.stem.removeprefix("disk-")
        if index.isdigit() and int(index) >= len(vm.disks):
            path.unlink()
            path.with_suffix(".json").unlink(missing_ok=True)



