"""How a VM boots, settled from its keys: `boot` and the keys that only make sense with
one boot mode (kernel, initrd, cmdline, secure_boot, a disk's `boot = true`).

`boot` defaults to "kernel" when a kernel is given and to "bios" otherwise.  A key of the
wrong mode in the VM's own table is a problem at its line; one that comes from
[defaults] is ignored for the VMs it does not fit (a [defaults] kernel does not stop
another VM from booting its disk).
"""

from __future__ import annotations

from typing import Any

from vmrun.collect import Collector

KERNEL_ONLY = ("kernel", "initrd", "cmdline")


def settle(col: Collector, where: tuple[str, ...], table: dict[str, Any],
           values: dict[str, Any], broken: set[str]) -> None:
    """Set values["boot"]; drop the keys of another mode; report what does not fit."""
    if "boot" in broken:
        return
    explicit = "boot" in values
    boot = values.get("boot") or ("kernel" if "kernel" in values or "kernel" in broken
                                  else "bios")
    values["boot"] = boot
    disks = values.get("disks", ())
    if boot == "kernel":
        if "kernel" not in values and "kernel" not in broken:
            col.add(where, 'missing required key "kernel"',
                    hint=f'add kernel = "..." to [{".".join(where)}] or to [defaults], or '
                         'boot a disk image with boot = "bios" or "uefi"')
            broken.add("kernel")
        if "disks" not in broken and any(disk.boot for disk in disks):
            col.add((*where, "disks"), "boot = true on a disk with a kernel boot",
                    expected='boot = "bios" or "uefi" for the VM, to boot from a disk',
                    found='boot = "kernel"' if explicit else "a kernel")
            broken.add("disks")
    else:
        for key in KERNEL_ONLY:
            if key in table and key not in broken:
                col.add((*where, key), f"{key} with a firmware boot",
                        expected=f'{key} only with boot = "kernel"', found=f'boot = "{boot}"',
                        hint=f'remove {key}, or set boot = "kernel"')
                broken.add(key)
            values.pop(key, None)
        if "disks" not in broken:
            if not any(disk.image is not None or disk.url is not None for disk in disks):
                if explicit:
                    col.add((*where, "boot") if "boot" in table else where,
                            f'boot = "{boot}" without a disk to boot from',
                            expected='a disk with an image, e.g. disks = [{ image = '
                                     '"debian.qcow2" }]', found="no image disk",
                            hint='or boot a kernel directly with kernel = "..."')
                else:
                    col.add(where, "nothing to boot",
                            expected='kernel = "..." (a kernel booted directly) or a disk '
                                     'with an image (booted through firmware)',
                            found="neither", hint='e.g. kernel = "vmlinuz", or disks = '
                                                  '[{ image = "debian.qcow2" }]')
                broken.add("disks")
            elif sum(disk.boot for disk in disks) > 1:
                col.add((*where, "disks"), "more than one disk with boot = true",
                        expected="boot = true on one disk at most")
                broken.add("disks")
    if values.get("secure_boot") and boot != "uefi":
        if "secure_boot" in table and "secure_boot" not in broken:
            col.add((*where, "secure_boot"), "secure_boot without UEFI",
                    expected='secure_boot = true only with boot = "uefi"',
                    found=f'boot = "{boot}"')
            broken.add("secure_boot")
        values["secure_boot"] = False
