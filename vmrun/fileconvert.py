"""The converters of settings that name files: kernel and initrd, disks, cloud_init,
shares (directories).

A file must exist, be a regular, readable file, and have a path libvirt's XML can hold;
a disk image must be raw or qcow2 (other formats are recognised by their first bytes and
refused).  A disk's image may instead be a URL with a checksum; nothing is fetched here.
"""

from __future__ import annotations

import os
import re
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
from vmrun.limits import (
    CHECKSUMS,
    DISK_FORMATS,
    DISK_MEDIA,
    MAX_DISK_MIB,
    MAX_DISKS,
    MAX_SHARES,
    MIN_DISK_MIB,
    URL_SCHEMES,
)
from vmrun.record import Record
from vmrun.sourcefile import Unreadable, open_regular


def _existing(value: Any, ctx: Context, what: str) -> tuple[Path, int]:
    """`value`, a path relative to the manifest's directory, resolved; and its mode."""
    if not isinstance(value, str) or not value:
        raise Invalid(f"a {what} path (relative to the manifest's directory)")
    try:
        expanded = os.path.expanduser(value)
    except ValueError:  # "~user" with a NUL
        raise Invalid(f"a {what} path without NUL characters") from None
    path = resolve(ctx.base_dir / expanded)
    if xml_unsafe(str(path)) is not None:
        raise Invalid("a path libvirt's XML can hold: valid UTF-8, without control characters",
                      found=describe(str(path)))
    try:
        return path, os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise Invalid(f"an existing {what} (looked for {path})") from None
    except (OSError, ValueError) as exc:
        raise Invalid(f"an existing {what} ({path}: "
                      f"{getattr(exc, 'strerror', None) or exc})") from None


def file_path(value: Any, ctx: Context) -> Path:
    path, mode = _existing(value, ctx, "file")
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
    """One entry of `disks`: an image (overlaid unless read-only), a blank disk, or a CD-ROM.

    An image given by URL has `url` and `checksum` and no `image` until vmrun/images.py
    has fetched it into the cache (`images.localize` fills `image` and `format` then).
    """

    image: Path | None
    format: str  # of the image ("raw" | "qcow2"); blank disks are qcow2; "" = not known yet
    size_mib: int | None  # a blank disk's size, or an overlay's virtual size
    readonly: bool
    url: str | None = None
    checksum: tuple[str, str] | None = None  # (algorithm, lower-case hex digest)
    media: str = "disk"  # "disk" | "cdrom"
    boot: bool = False  # boot from this disk (firmware boot)

    @property
    def overlaid(self) -> bool:
        """Attached through a qcow2 file in the VM's state directory (overlay or blank)."""
        return not self.readonly and self.media == "disk"


def image_format(path: Path) -> str:
    """"qcow2" or "raw" from the image's first bytes; another known format is refused."""
    return _probe(path)[0]


def virtual_size(path: Path) -> int:
    """The image's virtual size in bytes: a qcow2 header's size field, or a raw file's size."""
    return _probe(path)[1]


def _probe(path: Path) -> tuple[str, int]:
    try:
        with open_regular(path) as fd:
            head = os.read(fd, 32)
            size = os.fstat(fd).st_size
    except FileNotFoundError:
        raise Invalid(f"an existing file (looked for {path})") from None
    except Unreadable as exc:
        raise Invalid(f"a readable image ({path}: {exc.reason})") from None
    except OSError as exc:  # EIO from /proc/self/mem
        raise Invalid(f"a readable image ({path}: {exc.strerror})") from None
    if head.startswith(b"QFI\xfb"):
        return "qcow2", int.from_bytes(head[24:32], "big")
    for magic, name in _FOREIGN_MAGIC.items():
        if head.startswith(magic):
            raise Invalid(f"a raw or qcow2 image ({path} is {name})")
    return "raw", size


_DISK_KEYS = ["image", "size", "readonly", "format", "sha256", "sha512", "media", "boot"]
_URL_RE = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://")


def is_url(text: str) -> bool:
    return _URL_RE.match(text) is not None


def _checksum(value: dict[str, Any]) -> tuple[str, str] | None:
    given = [algo for algo in CHECKSUMS if algo in value]
    if len(given) > 1:
        raise Invalid("one checksum: sha256 or sha512", found="both")
    if not given:
        return None
    algo = given[0]
    digest = value[algo]
    if not isinstance(digest, str) or \
            re.fullmatch(f"[0-9a-fA-F]{{{CHECKSUMS[algo]}}}", digest) is None:
        raise Invalid(f"{algo} = {CHECKSUMS[algo]} hexadecimal digits",
                      found=describe(digest), where=f".{algo}")
    return algo, digest.lower()


def _known_keys(value: dict[str, Any], keys: list[str], expected: str) -> None:
    """Refuse a table with a key not in `keys` (naming the first, with a close match)."""
    unknown = sorted(set(value) - set(keys))
    if unknown:
        raise Invalid(expected, found=f'the unknown key "{unknown[0]}"',
                      hint=did_you_mean(unknown[0], keys))


def _size(value: Any) -> int:
    size = parse_size_mib(value)
    if not MIN_DISK_MIB <= size <= MAX_DISK_MIB or not size.is_integer():
        raise Invalid(f"a disk size from {MIN_DISK_MIB}M to 64T, in whole MiB")
    return int(size)


def _disk(value: Any, ctx: Context) -> Disk:
    expected = ('a table { image = "file or URL" } or { size = "2G" }, with optional size '
                '(an overlay\'s size), readonly = true, format = "raw" | "qcow2", sha256 or '
                'sha512, media = "disk" | "cdrom" and boot = true')
    if not isinstance(value, dict):
        raise Invalid(expected)
    _known_keys(value, _DISK_KEYS, expected)
    if "image" not in value and "size" not in value:
        raise Invalid(expected + " (an image or a size)")
    for key in ("readonly", "boot"):
        if not isinstance(value.get(key, False), bool):
            raise Invalid(f"{key} = true or false", found=describe(value[key]), where=f".{key}")
    readonly, boot = value.get("readonly", False), value.get("boot", False)
    media = value.get("media", "disk")
    if media not in DISK_MEDIA:
        raise Invalid('media = "disk" or "cdrom"', found=describe(media), where=".media")
    size = _size(value["size"]) if "size" in value else None
    checksum = _checksum(value)
    if "image" not in value:
        if readonly or media != "disk" or checksum or "format" in value:
            raise Invalid(expected + " (a blank disk has only size, and boot)")
        assert size is not None
        return Disk(image=None, format="qcow2", size_mib=size, readonly=False, boot=boot)
    if media == "cdrom":
        if size is not None or value.get("readonly", True) is not True or \
                value.get("format", "raw") != "raw":
            raise Invalid("a CD-ROM: an image (raw, read-only), without size",
                          found=describe(value))
        readonly = True
    if readonly and size is not None:
        raise Invalid("size for an overlay only (not with readonly = true)",
                      found=describe(value))
    wanted = value.get("format")
    if wanted is not None and wanted not in DISK_FORMATS:
        raise Invalid('format = "raw" or "qcow2"', found=describe(wanted), where=".format")
    raw_image = value["image"]
    if isinstance(raw_image, str) and is_url(raw_image):
        url = _url(raw_image)
        if checksum is None:
            raise Invalid("a sha256 or sha512 checksum next to an image URL",
                          found=f"{url} without one",
                          hint="sha256sum the file you expect and add sha256 = \"…\"")
        return Disk(image=None, format=wanted or "", size_mib=size, readonly=readonly,
                    url=url, checksum=checksum, media=media, boot=boot)
    image = file_path(raw_image, ctx)
    found, virtual = _probe(image)
    if wanted == "qcow2" and found != "qcow2":
        raise Invalid(f"a qcow2 image ({image} is not one)")
    if size is not None and size * 1024 * 1024 < virtual:
        raise Invalid(f"an overlay size at least the image's ({_mib(virtual)})",
                      found=f"{size}M", where=".size")
    return Disk(image=image, format=wanted or found, size_mib=size, readonly=readonly,
                checksum=checksum, media=media, boot=boot)


def _mib(size: int) -> str:
    return f"{-(-size // (1024 * 1024))}M"


def _url(text: str) -> str:
    from urllib.parse import urlsplit

    if xml_unsafe(text) is not None or any(c.isspace() for c in text):
        raise Invalid("a URL without spaces or control characters", found=describe(text))
    try:
        parts = urlsplit(text)
    except ValueError as exc:
        raise Invalid(f"a URL ({exc})", found=describe(text)) from None
    if parts.scheme.lower() not in URL_SCHEMES:
        raise Invalid("an https://, http:// or file:// URL", found=describe(text))
    if parts.scheme.lower() != "file" and not parts.hostname:
        raise Invalid("a URL with a host", found=describe(text))
    if not parts.path or parts.path.endswith("/"):
        raise Invalid("a URL naming a file", found=describe(text))
    return text


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
                          where=f"[{number}]{exc.where}") from None
    return tuple(disks)


class CloudInit(Record):  # a frozen value class (vmrun/record.py)
    """The files of a NoCloud seed (meta-data is generated when not given)."""

    user_data: Path
    meta_data: Path | None
    network_config: Path | None

    def __init__(self, user_data: Path, meta_data: Path | None,
                 network_config: Path | None) -> None:
        self._set(user_data=user_data, meta_data=meta_data, network_config=network_config)


def cloud_init(value: Any, ctx: Context) -> CloudInit:
    expected = ('a table { user_data = "file" }, with optional meta_data and '
                'network_config files')
    if not isinstance(value, dict):
        raise Invalid(expected)
    keys = ["user_data", "meta_data", "network_config"]
    _known_keys(value, keys, expected)
    if "user_data" not in value:
        raise Invalid(expected, found="no user_data")
    return CloudInit(
        user_data=file_path(value["user_data"], ctx),
        meta_data=file_path(value["meta_data"], ctx) if "meta_data" in value else None,
        network_config=(file_path(value["network_config"], ctx)
                        if "network_config" in value else None),
    )


class Share(Record):  # a frozen value class (vmrun/record.py)
    """One entry of `shares`: a host directory the guest mounts (virtiofs) by its tag."""

    host: Path  # resolved, an existing directory
    guest: str  # absolute path in the guest
    readonly: bool
    tag: str  # the virtiofs tag: share<N>, N its index in `shares`

    def __init__(self, host: Path, guest: str, readonly: bool, tag: str) -> None:
        self._set(host=host, guest=guest, readonly=readonly, tag=tag)


_SHARE_KEYS = ["host", "guest", "readonly"]


def _directory(value: Any, ctx: Context) -> Path:
    path, mode = _existing(value, ctx, "directory")
    if not stat.S_ISDIR(mode):
        raise Invalid(f"a directory ({path} is not one)")
    return path


def _guest_path(value: Any) -> str:
    expected = "an absolute path in the guest, other than /, e.g. \"/src\""
    if not isinstance(value, str) or not value.startswith("/"):
        raise Invalid(expected)
    if any(c in value for c in "\t\n\r\0") or xml_unsafe(value) is not None:
        raise Invalid(expected + ", without control characters")
    parts = [part for part in value.split("/") if part not in ("", ".")]
    if not parts:
        raise Invalid(expected)
    if ".." in parts:
        raise Invalid(expected + ", without ..")
    return "/" + "/".join(parts)


def _share(value: Any, index: int, ctx: Context) -> Share:
    expected = ('a table { host = "directory", guest = "/path" }, with optional '
                'readonly = true')
    if not isinstance(value, dict):
        raise Invalid(expected)
    _known_keys(value, _SHARE_KEYS, expected)
    for key in ("host", "guest"):
        if key not in value:
            raise Invalid(expected, found=f"no {key}")
    readonly = value.get("readonly", False)
    if not isinstance(readonly, bool):
        raise Invalid("readonly = true or false", found=describe(readonly), where=".readonly")
    try:
        host = _directory(value["host"], ctx)
    except Invalid as exc:
        raise Invalid(exc.expected, hint=exc.hint, found=exc.found or describe(value["host"]),
                      where=".host") from None
    try:
        guest = _guest_path(value["guest"])
    except Invalid as exc:
        raise Invalid(exc.expected, found=describe(value["guest"]), where=".guest") from None
    return Share(host=host, guest=guest, readonly=readonly, tag=f"share{index}")


def shares(value: Any, ctx: Context) -> tuple[Share, ...]:
    if not isinstance(value, list):
        raise Invalid('an array of tables, e.g. [{ host = "./src", guest = "/src" }]')
    if len(value) > MAX_SHARES:
        raise Invalid(f"at most {MAX_SHARES} shared folders", found=f"{len(value)}")
    result: list[Share] = []
    for index, entry in enumerate(value):
        try:
            share = _share(entry, index, ctx)
        except Invalid as exc:
            raise Invalid(exc.expected, hint=exc.hint, found=exc.found or describe(entry),
                          where=f"[{index}]{exc.where}") from None
        if any(other.guest == share.guest for other in result):
            raise Invalid("one shared folder per guest path", found=describe(share.guest),
                          where=f"[{index}].guest")
        result.append(share)
    return tuple(result)
