"""UEFI firmware for `boot = "uefi"`: which OVMF files to give QEMU.

The firmware is found the way libvirt and QEMU document it: JSON descriptors in
/etc/qemu/firmware and /usr/share/qemu/firmware (a file in /etc overrides one of the same
name; lower file names win), keeping those that offer the "uefi" interface on a flash
device for x86_64 q35 machines.  Plain UEFI takes a descriptor without "secure-boot";
Secure Boot one with "secure-boot" and "enrolled-keys" (it then needs SMM).  When no
descriptor fits, the paths of Debian's `ovmf` package are tried.  BIOS boot needs nothing
from here: libvirt gives QEMU SeaBIOS by default.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path

from vmrun.errors import HostError

DESCRIPTOR_DIRS = (Path("/etc/qemu/firmware"), Path("/usr/share/qemu/firmware"))
# Debian's ovmf package, when no descriptor names it: (code, variables template, secure)
KNOWN = (
    (Path("/usr/share/OVMF/OVMF_CODE_4M.fd"), Path("/usr/share/OVMF/OVMF_VARS_4M.fd"), False),
    (Path("/usr/share/OVMF/OVMF_CODE_4M.ms.fd"), Path("/usr/share/OVMF/OVMF_VARS_4M.ms.fd"),
     True),
)
MACHINE = "pc-q35-7.2"  # what libvirt expands "q35" to with QEMU 7.2; matched by pattern


@dataclass(frozen=True)
class Uefi:
    """The firmware code (read-only) and the template of a VM's variables file."""

    code: Path
    template: Path
    secure: bool


def _descriptors(dirs: tuple[Path, ...]) -> list[Path]:
    chosen: dict[str, Path] = {}
    for directory in reversed(dirs):  # the first directory overrides the later ones
        try:
            for path in directory.glob("*.json"):
                chosen[path.name] = path
        except OSError:
            continue
    return [chosen[name] for name in sorted(chosen)]


def _fits(data: object, secure: bool) -> Uefi | None:
    if not isinstance(data, dict) or "uefi" not in data.get("interface-types", []):
        return None
    mapping = data.get("mapping", {})
    features = set(data.get("features", []))
    if not isinstance(mapping, dict) or mapping.get("device") != "flash":
        return None
    if secure != ("secure-boot" in features) or (secure and "enrolled-keys" not in features):
        return None
    if not any(target.get("architecture") == "x86_64" and
               any(fnmatch.fnmatch(MACHINE, m) for m in target.get("machines", []))
               for target in data.get("targets", []) if isinstance(target, dict)):
        return None
    try:
        code = Path(mapping["executable"]["filename"])
        template = Path(mapping["nvram-template"]["filename"])
        formats = {mapping["executable"].get("format", "raw"),
                   mapping["nvram-template"].get("format", "raw")}
    except (KeyError, TypeError):
        return None
    if formats != {"raw"} or not code.is_file() or not template.is_file():
        return None
    return Uefi(code, template, secure)


def find(secure: bool, dirs: tuple[Path, ...] = DESCRIPTOR_DIRS) -> Uefi:
    """The UEFI firmware to use; HostError (exit 3) when this host has none."""
    for path in _descriptors(dirs):
        try:
            found = _fits(json.loads(path.read_text(encoding="utf-8")), secure)
        except (OSError, ValueError):
            continue
        if found is not None:
            return found
    for code, template, is_secure in KNOWN:
        if is_secure == secure and code.is_file() and template.is_file():
            return Uefi(code, template, secure)
    what = "UEFI firmware with Secure Boot and enrolled keys" if secure else "UEFI firmware"
    raise HostError(f"this host has no {what} for QEMU (looked for firmware descriptors in "
                    f"{' and '.join(map(str, dirs))}, and for {KNOWN[secure][0]})",
                    hint="install Debian's ovmf package (make setup does)")
