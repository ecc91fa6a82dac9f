"""The converters of settings that name files: kernel and initrd, disks, cloud_init.

A file must exist, be a regular, readable file, and have a path libvirt's XML can hold;
a disk image must be raw or qcow2 (other formats are recognised by their first bytes and
refused).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmrun.convert import (
    Context,
    Invalid,
    describe,
    did_you_mean,
    parse_size_mib,
    resolve,
    xml_unsafe,
)
from vmrun.limits import DISK_FORMATS, MAX_DISK_MIB, MAX_DISKS, MIN_DISK_MIB
from vmrun.sourcefile import Unreadable, open_regular


def file_path(value: Any, ctx: Context) -> Path:
    if not isinstance(value, str) or not value:
        raise Invalid("a file path (relative to the manifest's directory)")
    try:
        expanded = os.path.expanduser(value)
    except ValueError:  # "~user" with a NUL
        raise Invalid("a file path without NUL characters") from None
    path = resolve(ctx.base_dir / expanded)
    if xml_unsafe(str(path)) is not None:
        raise Invalid("a path libvirt's XML can hold: valid UTF-8, without control characters",
                      found=describe(str(path)))
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise Invalid(f"an existing file (looked for {path})") from None
    except OSError as exc:
        raise Invalid(f"an existing file ({path}: {exc.strerror})") from None
    if not stat.S_ISREG(mode):
        raise Invalid(f"a regular file ({path} is not one)")
    if not os.access(path, os.R_OK):
        raise Invalid(f"a readable file ({path} cannot be read)")
    return path


# Image formats recognised by their first bytes, to refuse them clearly.
_FOREIGN_MAGIC = {b"KDMV": "vmdk", b"QED\x00": "qed", b"vhdxfile": "vhdx", b"conectix": "vpc",
                  b"LUKS\xba\xbe": "luks", b"<<< Oracle VM": "vdi"}


@dataclass(frozen=True)
class Disk:
    """One entry of `disks`: an image (overlaid unless read-only) or a blank disk."""

    image: Path | None
    format: str  # of the image ("raw" | "qcow2"); blank disks are qcow2
    size_mib: int | None
    readonly: bool


def image_format(path: Path) -> str:
    """"qcow2" or "raw" from the image's first bytes; another known format is refused."""
    try:
        with open_regular(path) as fd:
            head = os.read(fd, 16)
    except FileNotFoundError:
        raise Invalid(f"an existing file (looked for {path})") from None
    except Unreadable as exc:
        raise Invalid(f"a readable image ({path}: {exc.reason})") from None
    except OSError as exc:  # EIO from /proc/self/mem
        raise Invalid(f"a readable image ({path}: {exc.strerror})") from None
    if head.startswith(b"QFI\xfb"):
        return "qcow2"
    for magic, name in _FOREIGN_MAGIC.items():
        if head.startswith(magic):
            raise Invalid(f"a raw or qcow2 image ({path} is {name})")
    return "raw"


def _disk(value: Any, ctx: Context) -> Disk:
    expected = ('a table { image = "file" } or { size = "2G" }, with optional '
                'readonly = true (image only) and format = "raw" | "qcow2"')
    if not isinstance(value, dict):
        raise Invalid(expected)
    unknown = sorted(set(value) - {"image", "size", "readonly", "format"})
    if unknown:
        raise Invalid(expected, found=f'the unknown key "{unknown[0]}"',
                      hint=did_you_mean(unknown[0], ["image", "size", "readonly", "format"]))
    if ("image" in value) == ("size" in value):
        raise Invalid(expected + " (exactly one of image and size)")
    readonly = value.get("readonly", False)
    if not isinstance(readonly, bool) or (readonly and "size" in value):
        raise Invalid(expected + " (readonly is a boolean, for an image)")
    if "size" in value:
        size = parse_size_mib(value["size"])
        if not MIN_DISK_MIB <= size <= MAX_DISK_MIB or not size.is_integer():
            raise Invalid(f"a disk size from {MIN_DISK_MIB}M to 64T, in whole MiB")
        return Disk(image=None, format="qcow2", size_mib=int(size), readonly=False)
    image = file_path(value["image"], ctx)
    found = image_format(image)
    wanted = value.get("format", found)
    if wanted not in DISK_FORMATS:
        raise Invalid('format = "raw" or "qcow2"')
    if wanted == "qcow2" and found != "qcow2":
        raise Invalid(f"a qcow2 image ({image} is not one)")
    return Disk(image=image, format=wanted, size_mib=None, readonly=readonly)


def disks(value: Any, ctx: Context) -> tuple[Disk, ...]:
    if not isinstance(value, list):
        raise Invalid('an array of disk tables, e.g. [{ image = "base.qcow2" }, { size = "2G" }]')
    if len(value) > MAX_DISKS:
        raise Invalid(f"at most {MAX_DISKS} disks")
    disks = []
    for number, entry in enumerate(value):  # 0-based, like the files: disk-0.qcow2
        try:
            disks.append(_disk(entry, ctx))
        except Invalid as exc:
            raise Invalid(exc.expected, hint=exc.hint, found=exc.found or describe(entry),
                          where=f"[{number}]") from None
    return tuple(disks)


@dataclass(frozen=True)
class CloudInit:
    """The files of a NoCloud seed (meta-data is generated when not given)."""

    user_data: Path
    meta_data: Path | None
    network_config: Path | None


def cloud_init(value: Any, ctx: Context) -> CloudInit:
    expected = ('a table { user_data = "file" }, with optional meta_data and '
                'network_config files')
    if not isinstance(value, dict):
        raise Invalid(expected)
    keys = ["user_data", "meta_data", "network_config"]
    unknown = sorted(set(value) - set(keys))
    if unknown:
        raise Invalid(expected, found=f'the unknown key "{unknown[0]}"',
                      hint=did_you_mean(unknown[0], keys))
    if "user_data" not in value:
        raise Invalid(expected, found="no user_data")
    return CloudInit(
        user_data=file_path(value["user_data"], ctx),
        meta_data=file_path(value["meta_data"], ctx) if "meta_data" in value else None,
        network_config=(file_path(value["network_config"], ctx)
                        if "network_config" in value else None),
    )
