"""The manifest's settings table: every key, its type, default, converter, JSON Schema
and documentation.

One table drives parsing and validation (vmrun/manifest.py), the JSON Schema
(vmrun/schema.py) and the reference in docs/manifest.md (a test checks the docs name every
key).  A converter takes the TOML value and returns the checked, typed value, or raises
`Invalid` saying what was expected.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import os
import re
import stat
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmrun import network

NAME_RE = re.compile(r"[a-z][a-z0-9-]*\Z")
VM_NAME_MAX = 20
STACK_NAME_MAX = 40
ACCELS = ("auto", "kvm", "tcg")

MIN_MEMORY_MIB = 16
MAX_CPUS = 64
MAX_SECONDS = 7 * 24 * 3600
MAX_COUNT = 64
MAX_DISKS = 16
MAX_VMS = 1024  # in a stack, copies (count) included
MAX_NETWORKS = 256  # in a stack: the /24s of the default 10.77.0.0/16


class Invalid(Exception):
    """Raised by a converter: the value has the wrong type or is out of range."""

    def __init__(self, expected: str, hint: str | None = None, found: str | None = None,
                 where: str = "") -> None:
        super().__init__(expected)
        self.expected = expected
        self.hint = hint
        self.found = found  # what was found, when not the whole value
        self.where = where  # the part of the value at fault, e.g. "[2].image"


@dataclass(frozen=True)
class Context:
    """What converters need to know besides the value."""

    base_dir: Path
    host_memory_mib: int


Converter = Callable[[Any, Context], Any]


@dataclass(frozen=True)
class Setting:
    """One manifest key: its converter, default and documentation.

    `schema` is the JSON Schema of the value (type, pattern, enum, bounds) as far as JSON
    Schema can say what `convert` accepts; vmrun/schema.py adds the description and the
    default and builds the manifest's schema from these tables.
    """

    key: str
    type: str  # shown in docs and errors
    default: Any
    convert: Converter
    doc: str
    required: bool = False
    schema: Mapping[str, Any] = field(kw_only=True, hash=False)


def did_you_mean(key: str, known: list[str]) -> str | None:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f'did you mean "{close[0]}"?' if close else None


DESCRIBE_MAX = 80  # characters of a string quoted in an error message


def describe(value: Any) -> str:
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, str):
        if len(value) > DESCRIBE_MAX:
            return f'the string "{value[:DESCRIBE_MAX - 20]}..." ({len(value)} characters)'
        return f'the string "{value}"'
    if isinstance(value, int) and value.bit_length() > 64:  # str() refuses > 4300 digits
        sign = "-" if value < 0 else ""
        return f"a number of about {sign}10^{int(value.bit_length() * math.log10(2))}"
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


def _string(value: Any, ctx: Context) -> str:
    if not isinstance(value, str):
        raise Invalid("a string")
    return value


def stack_name(value: Any, ctx: Context) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value) or len(value) > STACK_NAME_MAX:
        raise Invalid(
            f"a name of lower-case letters, digits and '-', starting with a letter, "
            f"at most {STACK_NAME_MAX} characters"
        )
    return value


def _accel(value: Any, ctx: Context) -> str:
    if value not in ACCELS:
        raise Invalid("one of " + ", ".join(f'"{a}"' for a in ACCELS))
    return str(value)


def _seconds(value: Any, ctx: Context) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Invalid("a number of seconds")
    if not 0 < value <= MAX_SECONDS:
        raise Invalid(f"a number of seconds greater than 0 and at most {MAX_SECONDS}")
    return float(value)


def _cpus(value: Any, ctx: Context) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid("a whole number of CPUs")
    if not 1 <= value <= MAX_CPUS:
        raise Invalid(f"a number of CPUs from 1 to {MAX_CPUS}")
    return value


_SIZE_RE = re.compile(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*\Z", re.IGNORECASE | re.ASCII)
_SIZE_FACTOR = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024, "": 1}
_SIZE_DIGITS_MAX = 30  # more digits than any size needs: the value counts as infinite


def parse_size_mib(value: Any) -> float:
    """A size as MiB: an integer is MiB, a string takes a K, M, G or T suffix.

    A size too large for a float is +inf (-inf for a huge negative integer), so that
    callers' range checks reject it.
    """
    if isinstance(value, bool):
        raise Invalid('an integer number of MiB or a string like "256M" or "2G"')
    if isinstance(value, int):
        try:
            return float(value)
        except OverflowError:
            return math.inf if value > 0 else -math.inf
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match:
            digits = match.group(1).lstrip("0") or "0"
            if len(digits) > _SIZE_DIGITS_MAX:
                return math.inf
            return int(digits) * float(_SIZE_FACTOR[match.group(2).upper()])
    raise Invalid('an integer number of MiB or a string like "256M" or "2G"')


def _memory(value: Any, ctx: Context) -> int:
    mib = parse_size_mib(value)
    if (math.isfinite(mib) and not mib.is_integer()) or mib < MIN_MEMORY_MIB:
        raise Invalid(f"a whole number of MiB, at least {MIN_MEMORY_MIB}M")
    if mib > ctx.host_memory_mib:
        raise Invalid(
            f"at most the host's memory ({ctx.host_memory_mib}M)",
            hint="a guest cannot have more memory than the host",
        )
    return int(mib)


def resolve(path: Path) -> Path:
    """`path.resolve()`, raising Invalid where pathlib raises (a symbolic link loop, a NUL)."""
    try:
        return path.resolve()
    except RuntimeError:
        raise Invalid(f"a path without a symbolic link loop ({path} has one)") from None
    except (OSError, ValueError) as exc:
        raise Invalid(f"a usable path ({exc})") from None


def _file(value: Any, ctx: Context) -> Path:
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


# XML 1.0 characters: tab, newline, carriage return, and the rest of Unicode except the
# C0 controls, lone surrogates (undecodable bytes of a file name or of the environment),
# U+FFFE and U+FFFF.  lxml refuses any other character in text or attributes.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def xml_unsafe(text: str) -> str | None:
    """The first character of `text` that XML 1.0 cannot hold, or None."""
    match = _NOT_XML.search(text)
    return match.group() if match else None


XML_TEXT = ("text libvirt's XML can hold: valid UTF-8, and no control characters other than "
            "tab, newline and carriage return")


def check_xml_text(value: Any) -> None:
    """Raise Invalid (saying where) if a string in `value` cannot go into XML."""
    pending: list[tuple[str, Any]] = [("", value)]
    while pending:
        where, item = pending.pop()
        if isinstance(item, str):
            if xml_unsafe(item) is not None:
                raise Invalid(XML_TEXT, found=describe(item), where=where)
        elif isinstance(item, dict):
            for key, sub in reversed(item.items()):
                if xml_unsafe(key) is not None:
                    raise Invalid(XML_TEXT, found=f'the key "{key}"', where=where)
                pending.append((f"{where}.{key}", sub))
        elif isinstance(item, list):
            pending.extend((f"{where}[{i}]", sub) for i, sub in reversed(list(enumerate(item))))


# --- reading files: regular files only, bounded -----------------------------------------

class Unreadable(Exception):
    """A file vmrun will not read (not a regular file, too large) or cannot read."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@contextlib.contextmanager
def open_regular(path: Path) -> Iterator[int]:
    """A file descriptor of the regular file `path`.

    Raises FileNotFoundError when it does not exist and Unreadable for anything else that
    is wrong.  Devices are never opened (opening some has effects), and a FIFO swapped in
    after the check does not block (O_NONBLOCK) and is refused by fstat.
    """
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise Unreadable("not a regular file")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise Unreadable(exc.strerror or str(exc)) from None
    except ValueError:  # a NUL in the path
        raise Unreadable("the path contains a NUL character") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise Unreadable("not a regular file")
        yield fd
    finally:
        os.close(fd)


def read_regular(path: Path, limit: int) -> bytes:
    """The contents of the regular file `path`, refused when larger than `limit` bytes."""
    chunks: list[bytes] = []
    size = 0
    with open_regular(path) as fd:
        while True:
            try:
                chunk = os.read(fd, min(1 << 16, limit + 1 - size))
            except OSError as exc:  # EIO from /proc/self/mem, EISDIR, ...
                raise Unreadable(exc.strerror or str(exc)) from None
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise Unreadable(f"larger than {limit // 1024} KiB")


def _regex(value: Any, ctx: Context) -> str:
    if not isinstance(value, str) or not value:
        raise Invalid("a non-empty regular expression (Python syntax)")
    try:
        with warnings.catch_warnings():  # "Possible nested set" and the like: not errors
            warnings.simplefilter("ignore")
            re.compile(value)
    except re.error as exc:
        raise Invalid(f"a valid regular expression ({exc})") from None
    except (OverflowError, RecursionError, ValueError) as exc:  # a{99999999999}, ((((...
        raise Invalid(f"a valid regular expression ({exc})") from None
    return value


def _count(value: Any, ctx: Context) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_COUNT:
        raise Invalid(f"a whole number of copies from 1 to {MAX_COUNT}")
    return value


DEPENDENCY_CONDITIONS = ("ready", "ok")


def _depends_on(value: Any, ctx: Context) -> tuple[tuple[str, str], ...]:
    expected = ('an array of VM names, or a table of VM name = "ready" or "ok" '
                '(e.g. depends_on = { db = "ok" })')
    if isinstance(value, list | dict) and len(value) > MAX_VMS:
        raise Invalid(f"at most {MAX_VMS} VM names")
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple((v, "ready") for v in value)
    if isinstance(value, dict) and all(isinstance(v, str) for v in value.values()):
        bad = [c for c in value.values() if c not in DEPENDENCY_CONDITIONS]
        if bad:
            raise Invalid(expected + f'; "{bad[0]}" is not a condition')
        return tuple(value.items())
    raise Invalid(expected)


DISK_FORMATS = ("raw", "qcow2")
MIN_DISK_MIB = 1
MAX_DISK_MIB = 64 * 1024 * 1024
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
    image = _file(value["image"], ctx)
    found = image_format(image)
    wanted = value.get("format", found)
    if wanted not in DISK_FORMATS:
        raise Invalid('format = "raw" or "qcow2"')
    if wanted == "qcow2" and found != "qcow2":
        raise Invalid(f"a qcow2 image ({image} is not one)")
    return Disk(image=image, format=wanted, size_mib=None, readonly=readonly)


def _disks(value: Any, ctx: Context) -> tuple[Disk, ...]:
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


def _bool(value: Any, ctx: Context) -> bool:
    if not isinstance(value, bool):
        raise Invalid("true or false")
    return value


@dataclass(frozen=True)
class CloudInit:
    """The files of a NoCloud seed (meta-data is generated when not given)."""

    user_data: Path
    meta_data: Path | None
    network_config: Path | None


def _cloud_init(value: Any, ctx: Context) -> CloudInit:
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
        user_data=_file(value["user_data"], ctx),
        meta_data=_file(value["meta_data"], ctx) if "meta_data" in value else None,
        network_config=(_file(value["network_config"], ctx)
                        if "network_config" in value else None),
    )


def _network_names(value: Any, ctx: Context) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise Invalid('an array of network names, e.g. ["lan"]')
    if len(set(value)) != len(value):
        raise Invalid("each network once")
    if len(value) > MAX_NETWORKS:
        raise Invalid(f"at most {MAX_NETWORKS} networks")
    return tuple(value)


def _forwards(value: Any, ctx: Context) -> tuple[network.Forward, ...]:
    expected = 'an array like ["8080:80", "127.0.0.1:2222:22"]'
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise Invalid(expected)
    forwards = []
    for number, text in enumerate(value):
        try:
            forwards.append(network.parse_forward(text))
        except ValueError as exc:
            raise Invalid(f"{expected}: {exc}", found=describe(text),
                          where=f"[{number}]") from None
    return tuple(forwards)


def _xml_devices(value: Any, ctx: Context) -> str:
    from lxml import etree

    if not isinstance(value, str) or not value.strip():
        raise Invalid("a string of libvirt <devices> XML elements")
    try:
        etree.fromstring(f"<devices>{value}</devices>")
    except etree.XMLSyntaxError as exc:
        raise Invalid(f"well-formed XML elements ({exc.msg})") from None
    except ValueError as exc:  # lxml refuses some strings outright
        raise Invalid(f"well-formed XML elements ({exc})") from None
    return value


# --- JSON Schema of the values (see vmrun/schema.py) ------------------------------------

def json_pattern(regex: re.Pattern[str]) -> str:
    """A regex used with `re.match` and ending in `\\Z`, as an anchored JSON Schema pattern."""
    if not regex.pattern.endswith(r"\Z") or regex.flags & re.IGNORECASE:
        raise ValueError(f"cannot translate {regex.pattern!r} to a JSON Schema pattern")
    return "^" + regex.pattern.removesuffix(r"\Z") + "$"


_UNITS = "".join(_SIZE_FACTOR)  # JSON Schema patterns have no flags: spell out both cases
SIZE_JSON_PATTERN = rf"^\s*\d+\s*[{_UNITS}{_UNITS.lower()}]?(?:[iI]?[bB])?\s*$"

_NAME_SCHEMA = {"type": "string", "pattern": json_pattern(NAME_RE), "maxLength": STACK_NAME_MAX}
_SECONDS_SCHEMA = {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_SECONDS}
_FILE_SCHEMA = {"type": "string", "minLength": 1}
_REGEX_SCHEMA = {"type": "string", "minLength": 1}
# A string using ${VAR} can only be checked once interpolated: the schema lets it through.
_INTERPOLATED = {"type": "string", "pattern": r"\$\{"}
_SIZE_SCHEMA = {"anyOf": [{"type": "integer", "minimum": MIN_MEMORY_MIB},
                          {"type": "string", "pattern": SIZE_JSON_PATTERN}, _INTERPOLATED]}


STACK_SETTINGS: tuple[Setting, ...] = (
    Setting("name", "string", None, stack_name,
            "Stack name: lower-case letters, digits and '-'. Default: the manifest's "
            "file name without `.toml`.", schema=_NAME_SCHEMA),
    Setting("accel", "string", "auto", _accel,
            '`"auto"` uses KVM when it really works on this host and TCG (software '
            'emulation) otherwise; `"kvm"` requires KVM; `"tcg"` always emulates.',
            schema={"type": "string", "enum": list(ACCELS)}),
    Setting("stop_timeout", "number", 10.0, _seconds,
            "Seconds a guest gets to shut down after an ACPI power-button press before "
            "it is destroyed.", schema=_SECONDS_SCHEMA),
    Setting("state_dir", "string", ".vmrun", _string,
            "Where run state lives, relative to the manifest's directory; the stack uses "
            "`<state_dir>/<name>/`.", schema={"type": "string"}),
)

VM_SETTINGS: tuple[Setting, ...] = (
    Setting("kernel", "path", None, _file,
            "Kernel image to boot directly, relative to the manifest's directory.",
            required=True, schema=_FILE_SCHEMA),
    Setting("initrd", "path", None, _file,
            "Initial ramdisk, relative to the manifest's directory.", schema=_FILE_SCHEMA),
    Setting("cmdline", "string", "console=ttyS0", _string,
            "Kernel command line. Keep `console=ttyS0` so the console can be streamed.",
            schema={"type": "string"}),
    Setting("memory", "size", 256, _memory,
            'Guest memory: an integer number of MiB, or a string with a K, M, G or T '
            'suffix ("512M", "2G").', schema=_SIZE_SCHEMA),
    Setting("cpus", "integer", 1, _cpus, "Number of virtual CPUs.",
            schema={"type": "integer", "minimum": 1, "maximum": MAX_CPUS}),
    Setting("timeout", "number", None, _seconds,
            "Seconds the guest may run; a guest still running then is destroyed and "
            "counts as failed (reason: timeout). Default: no limit.", schema=_SECONDS_SCHEMA),
    Setting("success", "regex", None, _regex,
            "The guest counts as ok only if a console line matched this regular "
            "expression before it stopped.", schema=_REGEX_SCHEMA),
    Setting("failure", "regex", None, _regex,
            "A console line matching this regular expression makes the guest failed at "
            "once (it is destroyed).", schema=_REGEX_SCHEMA),
    Setting("ready", "regex", None, _regex,
            "The VM counts as ready when a console line matches this regular expression "
            "(`vmrun up --detach --wait` waits for it; `vmrun ps` shows it). Default: "
            "ready as soon as it runs.", schema=_REGEX_SCHEMA),
    Setting("ready_timeout", "number", 120.0, _seconds,
            "Seconds after the start a VM with a `ready` pattern may take to become "
            "ready; after that it is destroyed and counts as failed (reason: not ready).",
            schema=_SECONDS_SCHEMA),
    Setting("count", "integer", 1, _count,
            "Run this many copies of the VM, named NAME-1 ... NAME-N, each with its own "
            "state; `{index}` in `cmdline` is the copy's number. Without it the VM keeps "
            "its name (and `{index}` is 1).",
            schema={"type": "integer", "minimum": 1, "maximum": MAX_COUNT}),
    Setting("depends_on", "array or table", (), _depends_on,
            'Start this VM only after others: `["db"]` waits until db is ready, '
            '`{ db = "ok" }` until db has stopped with outcome ok. A VM whose dependency '
            "failed is never started (outcome failed).",
            schema={"anyOf": [
                {"type": "array", "items": {"type": "string"}, "maxItems": MAX_VMS},
                {"type": "object", "maxProperties": MAX_VMS,
                 "additionalProperties": {"enum": list(DEPENDENCY_CONDITIONS)}},
            ]}),
    Setting("disks", "array of tables", (), _disks,
            'Disks, attached as virtio disks vda, vdb, ... in order. `{ image = "base.qcow2" '
            '}` gets a copy-on-write overlay in the VM\'s state directory (the image is '
            'never written); `{ size = "2G" }` is a blank disk; `readonly = true` attaches '
            'an image read-only without an overlay. Images are raw or qcow2 (`format` '
            'overrides detection). Overlays and blank disks are kept between runs unless '
            '`ephemeral` is set or `vmrun up --fresh` is given.',
            schema={"type": "array", "maxItems": MAX_DISKS, "items": {
                "type": "object", "additionalProperties": False,
                "properties": {"image": {"type": "string", "minLength": 1},
                               "size": {"anyOf": [
                                   {"type": "integer", "minimum": MIN_DISK_MIB},
                                   {"type": "string", "pattern": SIZE_JSON_PATTERN},
                                   _INTERPOLATED]},
                               "readonly": {"type": "boolean"},
                               "format": {"enum": list(DISK_FORMATS)}},
                "oneOf": [{"required": ["image"]}, {"required": ["size"]}]}}),
    Setting("ephemeral", "boolean", False, _bool,
            "Start every overlay and blank disk anew on each run.",
            schema={"type": "boolean"}),
    Setting("networks", "array", (), _network_names,
            "Private networks (`[network.NAME]`) the VM is attached to, as virtio NICs "
            "in this order; each gives it a fixed address and MAC (placeholders "
            "`{net.NAME.ip}` etc. in cmdline).",
            schema={"type": "array", "items": {"type": "string"}, "uniqueItems": True,
                    "maxItems": MAX_NETWORKS}),
    Setting("forward", "array", (), _forwards,
            'Host TCP ports forwarded to the VM\'s first network address: "8080:80" '
            '(host 127.0.0.1:8080 to guest port 80) or "ADDRESS:HOSTPORT:GUESTPORT".',
            schema={"type": "array", "items": {"anyOf": [
                {"type": "string", "pattern": r"^(\d{1,3}(\.\d{1,3}){3}:)?\d{1,5}:\d{1,5}$"},
                _INTERPOLATED]}}),
    Setting("cloud_init", "table", None, _cloud_init,
            "Build a cloud-init NoCloud seed (volume label cidata) from these files and "
            "attach it read-only as the last virtio disk. meta_data defaults to "
            "instance-id and local-hostname = the VM's name.",
            schema={"type": "object", "additionalProperties": False, "required": ["user_data"],
                    "properties": {k: {"type": "string", "minLength": 1}
                                   for k in ("user_data", "meta_data", "network_config")}}),
    Setting("xml_devices", "string", None, _xml_devices,
            "Expert escape hatch: libvirt `<devices>` child elements appended to the "
            "generated domain XML, checked against libvirt's schema before anything starts.",
            schema={"type": "string", "minLength": 1}),
)

# Stack-level keys that are tables, not settings.
STACK_TABLES = {
    "defaults": "Values for any `[vm.*]` key; a VM's own value wins.",
    "vm": "One table per VM: `[vm.NAME]`.",
    "network": "One table per private network: `[network.NAME]`, with an optional "
               '`subnet = "10.77.0.0/24"` (default: a free /24 of 10.77.0.0/16).',
}
NETWORK_NAME_MAX = 12  # bridge names (vr-NAME) must fit in 15 characters
