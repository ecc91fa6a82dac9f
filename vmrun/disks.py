"""A VM's disks: copy-on-write overlays over pristine images, blank disks, read-only images.

An image disk is attached through a qcow2 overlay in the VM's state directory, created
with `qemu-img create -b IMAGE -F FORMAT` (the backing format is always given, never
probed), so the image itself is never written.  Overlays and blank disks are kept between
runs (a lab VM keeps its state) unless the VM is `ephemeral` or `vmrun up --fresh` is
given; an overlay whose image changed in the manifest is started anew, and one whose
image was changed in place (rebuilt, copied over) is refused: its blocks no longer fit.
A VM booting through UEFI has its own variables file here too, kept the same way.

qemu-img runs through subprocess here: `prepare` is only called before the supervisor
installs its reaper (see supervisor.Supervisor.run).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from vmrun.errors import HostError
from vmrun.firmware import Uefi
from vmrun.layout import VMPaths
from vmrun.manifest import VM, Disk

QEMU_IMG = "qemu-img"


@dataclass(frozen=True)
class Attachment:
    """A file the domain gets as a virtio disk."""

    path: Path
    format: str
    readonly: bool
    media: str = "disk"  # "disk" | "cdrom"
    boot: bool = False  # firmware boots from it


def plan(vm: VM, paths: VMPaths) -> list[Attachment]:
    """The files attached for `vm`'s disks, in order, then its seed (nothing is created).

    The boot disk is the one with `boot = true`, else the first."""
    attachments = []
    boot = next((i for i, disk in enumerate(vm.disks) if disk.boot), 0)
    for index, disk in enumerate(vm.disks):
        if disk.overlaid:
            path, fmt = paths.disk(index), "qcow2"
        else:
            assert disk.image is not None, "images.localize fetches URL images first"
            path, fmt = disk.image, disk.format
        attachments.append(Attachment(path, fmt, disk.readonly, disk.media, index == boot))
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


def base_identity(disk: Disk) -> dict[str, object] | None:
    """What identifies the image under an overlay: its size and modification time, and its
    checksum when the manifest gives one.  A base rebuilt in place changes them."""
    if disk.image is None:
        return None
    stat = os.stat(disk.image)
    checksum = ":".join(disk.checksum) if disk.checksum else None
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "checksum": checksum}


def check_space(vm: VM, paths: VMPaths, fresh: bool) -> None:
    """Refuse (exit 3) a blank disk larger than the free space where it would live."""
    directory = paths.dir if paths.dir.exists() else paths.dir.parent
    while not directory.exists():
        directory = directory.parent
    stat = os.statvfs(directory)
    free_mib = stat.f_bavail * stat.f_frsize // (1024 * 1024)
    for index, disk in enumerate(vm.disks):
        target = paths.disk(index)
        if disk.image is None and disk.url is None and disk.size_mib is not None and \
                disk.size_mib > free_mib and (fresh or vm.ephemeral or not target.exists()):
            raise HostError(f"VM {vm.name}: disk {index} ({disk.size_mib}M) is larger than the "
                            f"free space in {directory} ({free_mib}M)",
                            hint="use a smaller size, or --state-dir on a larger filesystem")


def _keep(vm: VM, index: int, disk: Disk, target: Path, current: dict[str, object],
          base: dict[str, object] | None) -> bool:
    """Whether the existing disk file `target` is kept (grown if its size grew).

    It is not kept when the manifest names another image or format for it; HostError when
    its image changed since the overlay was made (booting it would corrupt the guest's
    filesystem) or when it would have to shrink."""
    wanted = _wanted(disk)
    if any(current.get(key) != wanted[key] for key in ("image", "format")):
        return False
    recorded = current.get("base")
    if base is not None and recorded is not None and recorded != base:
        raise HostError(
            f"VM {vm.name}: the image under disk {index} ({disk.image}) changed since its "
            f"overlay {target} was made: the overlay's blocks no longer fit it",
            hint=f"start the VM's disks anew (their changes are lost): vmrun up --fresh "
                 f"{vm.name}, or set ephemeral = true")
    old, new = current.get("size_mib"), disk.size_mib
    if new is not None and new != old:
        if isinstance(old, int) and new < old or disk.image is None and old is None:
            raise HostError(f"VM {vm.name}: disk {index} cannot shrink from {old}M to {new}M",
                            hint=f"start it anew (its data is lost): vmrun up --fresh {vm.name}")
        _run([QEMU_IMG, "resize", "-q", "-f", "qcow2", str(target), f"{new}M"])
    return True


def prepare(vm: VM, paths: VMPaths, fresh: bool, uefi: Uefi | None = None) -> list[Attachment]:
    """Create the overlays, blank disks and UEFI variables that are missing (or all, when
    fresh or ephemeral); refuse an overlay whose image changed under it."""
    paths.dir.mkdir(parents=True, exist_ok=True)
    anew = fresh or vm.ephemeral
    for index, disk in enumerate(vm.disks):
        if not disk.overlaid:
            continue
        target = paths.disk(index)
        sidecar = target.with_suffix(".json")
        base = base_identity(disk)
        try:
            current = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            current = None
        if target.exists() and isinstance(current, dict) and not anew and \
                _keep(vm, index, disk, target, current, base):
            sidecar.write_text(json.dumps({**_wanted(disk), "base": base}) + "\n")
            continue
        tmp = target.with_name(target.name + ".new")
        size = [f"{disk.size_mib}M"] if disk.size_mib is not None else []
        if disk.image is not None:
            _run([QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", str(disk.image),
                  "-F", disk.format, str(tmp), *size])
        else:
            _run([QEMU_IMG, "create", "-q", "-f", "qcow2", str(tmp), *size])
        tmp.replace(target)
        sidecar.write_text(json.dumps({**_wanted(disk), "base": base}) + "\n")
    if uefi is not None:
        _prepare_vars(uefi, paths.nvram, anew)
    return plan(vm, paths)


def _prepare_vars(uefi: Uefi, target: Path, anew: bool) -> None:
    """The VM's UEFI variables: a copy of the firmware's template, kept between runs."""
    sidecar = target.with_suffix(".json")
    wanted = {"template": str(uefi.template)}
    try:
        current = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        current = None
    if target.exists() and current == wanted and not anew:
        return
    tmp = target.with_name(target.name + ".new")
    shutil.copyfile(uefi.template, tmp)
    tmp.replace(target)
    sidecar.write_text(json.dumps(wanted) + "\n")


def remove_unused(vm: VM, paths: VMPaths) -> None:
    """Drop disk files of entries the manifest no longer has."""
    for path in paths.dir.glob("disk-*.qcow2"):
        index = path.stem.removeprefix("disk-")
        if index.isdigit() and (int(index) >= len(vm.disks) or
                                not vm.disks[int(index)].overlaid):
            path.unlink()
            path.with_suffix(".json").unlink(missing_ok=True)
    if vm.boot != "uefi":
        paths.nvram.unlink(missing_ok=True)
        paths.nvram.with_suffix(".json").unlink(missing_ok=True)



