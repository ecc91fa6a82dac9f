"""Parse and validate a stack manifest (TOML) into frozen dataclasses.

One table of settings (`STACK_SETTINGS`, `VM_SETTINGS`) drives parsing, validation,
defaults and the reference in docs/manifest.md (a test checks that the docs name every
key).  Every problem is collected, located (file, line, key) and reported together, so a
user fixes a manifest in one pass.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef,import-not-found,unused-ignore]

from vmrun import interpolate, network
from vmrun.errors import ManifestError, Problem

NAME_RE = re.compile(r"[a-z][a-z0-9-]*\Z")
VM_NAME_MAX = 20
STACK_NAME_MAX = 40
ACCELS = ("auto", "kvm", "tcg")

MIN_MEMORY_MIB = 16
MAX_CPUS = 64
MAX_SECONDS = 7 * 24 * 3600
MAX_COUNT = 64
MAX_DISKS = 16


class Invalid(Exception):
    """Raised by a converter: the value has the wrong type or is out of range."""

    def __init__(self, expected: str, hint: str | None = None) -> None:
        super().__init__(expected)
        self.expected = expected
        self.hint = hint


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


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, str):
        return f'the string "{value}"'
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


def _name(value: Any, ctx: Context) -> str:
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


def parse_size_mib(value: Any) -> float:
    """A size as MiB: an integer is MiB, a string takes a K, M, G or T suffix."""
    if isinstance(value, bool):
        raise Invalid('an integer number of MiB or a string like "256M" or "2G"')
    if isinstance(value, int):
        return float(value)
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match:
            return int(match.group(1)) * _SIZE_FACTOR[match.group(2).upper()]
    raise Invalid('an integer number of MiB or a string like "256M" or "2G"')


def _memory(value: Any, ctx: Context) -> int:
    mib = parse_size_mib(value)
    if mib != int(mib) or mib < MIN_MEMORY_MIB:
        raise Invalid(f"a whole number of MiB, at least {MIN_MEMORY_MIB}M")
    if mib > ctx.host_memory_mib:
        raise Invalid(
            f"at most the host's memory ({ctx.host_memory_mib}M)",
            hint="a guest cannot have more memory than the host",
        )
    return int(mib)


def _file(value: Any, ctx: Context) -> Path:
    if not isinstance(value, str) or not value:
        raise Invalid("a file path (relative to the manifest's directory)")
    path = (ctx.base_dir / os.path.expanduser(value)).resolve()
    if not path.exists():
        raise Invalid(f"an existing file (looked for {path})")
    if not path.is_file():
        raise Invalid(f"a regular file ({path} is not one)")
    if not os.access(path, os.R_OK):
        raise Invalid(f"a readable file ({path} cannot be read)")
    return path


def _regex(value: Any, ctx: Context) -> str:
    if not isinstance(value, str) or not value:
        raise Invalid("a non-empty regular expression (Python syntax)")
    try:
        re.compile(value)
    except re.error as exc:
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
    with open(path, "rb") as f:
        head = f.read(16)
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
    unknown = set(value) - {"image", "size", "readonly", "format"}
    if unknown:
        raise Invalid(expected + f" (unknown key {sorted(unknown)[0]!r})")
    if ("image" in value) == ("size" in value):
        raise Invalid(expected + " (exactly one of image and size)")
    readonly = value.get("readonly", False)
    if not isinstance(readonly, bool) or (readonly and "size" in value):
        raise Invalid(expected + " (readonly is a boolean, for an image)")
    if "size" in value:
        size = parse_size_mib(value["size"])
        if size != int(size) or not MIN_DISK_MIB <= size <= MAX_DISK_MIB:
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
    return tuple(_disk(entry, ctx) for entry in value)


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
    if not isinstance(value, dict) or "user_data" not in value:
        raise Invalid(expected)
    unknown = set(value) - {"user_data", "meta_data", "network_config"}
    if unknown:
        raise Invalid(expected + f" (unknown key {sorted(unknown)[0]!r})")
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
    return tuple(value)


def _forwards(value: Any, ctx: Context) -> tuple[network.Forward, ...]:
    expected = 'an array like ["8080:80", "127.0.0.1:2222:22"]'
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise Invalid(expected)
    forwards = []
    for text in value:
        try:
            forwards.append(network.parse_forward(text))
        except ValueError as exc:
            raise Invalid(f"{expected}: {exc}") from None
    return tuple(forwards)


def _xml_devices(value: Any, ctx: Context) -> str:
    from lxml import etree

    if not isinstance(value, str) or not value.strip():
        raise Invalid("a string of libvirt <devices> XML elements")
    try:
        etree.fromstring(f"<devices>{value}</devices>")
    except etree.XMLSyntaxError as exc:
        raise Invalid(f"well-formed XML elements ({exc.msg})") from None
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
    Setting("name", "string", None, _name,
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
                {"type": "array", "items": {"type": "string"}},
                {"type": "object",
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
                               "size": _SIZE_SCHEMA,
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
            schema={"type": "array", "items": {"type": "string"}, "uniqueItems": True}),
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


@dataclass(frozen=True)
class VM:
    name: str
    kernel: Path
    initrd: Path | None
    cmdline: str
    memory: int  # MiB
    cpus: int
    timeout: float | None
    success: str | None
    failure: str | None
    ready: str | None
    ready_timeout: float
    count: int
    depends_on: tuple[tuple[str, str], ...]  # (VM name, "ready" | "ok"), resolved
    disks: tuple[Disk, ...]
    ephemeral: bool
    networks: tuple[str, ...]
    forward: tuple[network.Forward, ...]
    cloud_init: CloudInit | None
    xml_devices: str | None
    index: int = 1  # the copy's number, with `count`
    group: str = ""  # the [vm.NAME] table it comes from
    addresses: tuple[network.Address, ...] = ()  # one per network, in `networks` order


@dataclass(frozen=True)
class Stack:
    path: Path
    name: str
    accel: str
    stop_timeout: float
    state_dir: Path  # the stack's own directory: <state_dir>/<name>
    vms: tuple[VM, ...] = field(default_factory=tuple)
    lines: dict[tuple[str, ...], int] = field(default_factory=dict, compare=False)
    networks: dict[str, network.Network] = field(default_factory=dict)

    def line_of(self, *keypath: str) -> int | None:
        while keypath:
            if keypath in self.lines:
                return self.lines[keypath]
            keypath = keypath[:-1]
        return None

    def vm(self, name: str) -> VM:
        for vm in self.vms:
            if vm.name == name:
                return vm
        raise KeyError(name)


# --- locating keys in the source --------------------------------------------------------

_HEADER_RE = re.compile(r"\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(?:#.*)?$")
_KEY_PART = r"""(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')"""
_KEY_RE = re.compile(rf"\s*({_KEY_PART}(?:\s*\.\s*{_KEY_PART})*)\s*=")


def _split_key(text: str) -> tuple[str, ...]:
    parts = re.findall(r"""[A-Za-z0-9_-]+|"[^"]*"|'[^']*'""", text)
    return tuple(p.strip("\"'") for p in parts)


def locate_keys(source: str) -> dict[tuple[str, ...], int]:
    """Map each key path (table headers and keys) to the 1-based line defining it.

    A light scanner, not a TOML parser: it only needs to be right for manifests that
    tomllib has already accepted.  Multi-line strings are skipped.
    """
    lines: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    in_multiline: str | None = None
    for number, line in enumerate(source.splitlines(), start=1):
        if in_multiline:
            if line.count(in_multiline) % 2 == 1:
                in_multiline = None
            continue
        header = _HEADER_RE.match(line)
        if header and not _KEY_RE.match(line):
            table = _split_key(header.group(1))
            lines.setdefault(table, number)
            continue
        key = _KEY_RE.match(line)
        if key:
            path = table + _split_key(key.group(1))
            lines.setdefault(path, number)
            rest = line[key.end():]
            for quote in ('"""', "'''"):
                if rest.count(quote) % 2 == 1:
                    in_multiline = quote
    return lines


# --- parsing -----------------------------------------------------------------------------

def host_memory_mib() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 1024 * 1024


class _Collector:
    def __init__(self, path: Path, lines: dict[tuple[str, ...], int]) -> None:
        self.path = path
        self.lines = lines
        self.problems: list[Problem] = []
        self.broken: set[tuple[str, ...]] = set()  # values already reported as broken

    def line_of(self, keypath: tuple[str, ...]) -> int | None:
        while keypath:
            if keypath in self.lines:
                return self.lines[keypath]
            keypath = keypath[:-1]
        return None

    def add(self, keypath: tuple[str, ...], message: str, **kw: Any) -> None:
        self.problems.append(
            Problem(message, file=self.path, line=self.line_of(keypath),
                    key=".".join(keypath) or None, **kw)
        )


def _did_you_mean(key: str, known: list[str]) -> str | None:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f'did you mean "{close[0]}"?' if close else None


def _convert_table(
    col: _Collector,
    where: tuple[str, ...],
    table: dict[str, Any],
    settings: tuple[Setting, ...],
    ctx: Context,
    extra_keys: tuple[str, ...] = (),
) -> dict[str, Any]:
    known = {s.key: s for s in settings}
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key in extra_keys or where + (key,) in col.broken:
            continue
        setting = known.get(key)
        if setting is None:
            col.add(where + (key,), "unknown key",
                    hint=_did_you_mean(key, [*known, *extra_keys]))
            continue
        try:
            out[key] = setting.convert(value, ctx)
        except Invalid as exc:
            col.add(where + (key,), "invalid value", expected=exc.expected,
                    found=_describe(value), hint=exc.hint)
    return out


def load(path: str | os.PathLike[str], state_dir: str | os.PathLike[str] | None = None) -> Stack:
    """Read, parse and validate a manifest; raise ManifestError listing every problem."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ManifestError([Problem("no such manifest file", file=path)]) from None
    except OSError as exc:
        raise ManifestError([Problem(f"cannot read the manifest ({exc.strerror})",
                                     file=path)]) from None
    try:
        source = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError([Problem("the manifest is not UTF-8 text",
                                     file=path, found=str(exc))]) from None
    return loads(source, path, state_dir=state_dir)


_TOML_POS_RE = re.compile(r"\s*\(at line (\d+), column (\d+)\)")


def loads(
    source: str,
    path: Path,
    state_dir: str | os.PathLike[str] | None = None,
    host_memory: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> Stack:
    try:
        data = tomllib.loads(source)
    except tomllib.TOMLDecodeError as exc:
        text = str(exc)
        match = _TOML_POS_RE.search(text)
        line = int(match.group(1)) if match else None
        message = _TOML_POS_RE.sub("", text) if match else text
        if match:
            message += f" (column {match.group(2)})"
        raise ManifestError([Problem(f"TOML syntax error: {message}", file=path,
                                     line=line)]) from None

    base_dir = path.resolve().parent
    ctx = Context(base_dir=base_dir, host_memory_mib=host_memory or host_memory_mib())
    lines = locate_keys(source)
    col = _Collector(path, lines)
    data = _interpolate(data, col, base_dir, environ)

    top = _convert_table(col, (), data, STACK_SETTINGS, ctx, extra_keys=tuple(STACK_TABLES))
    if "name" not in data:
        stem = path.name.removesuffix(".toml")
        try:
            top["name"] = _name(stem, ctx)
        except Invalid as exc:
            col.add((), "the stack has no valid name", expected=exc.expected,
                    found=f'the file name "{stem}"', hint='set name = "..." in the manifest')

    defaults_raw = data.get("defaults", {})
    defaults: dict[str, Any] = {}
    if not isinstance(defaults_raw, dict):
        col.add(("defaults",), "invalid value", expected="a table", found=_describe(defaults_raw))
    else:
        defaults = _convert_table(col, ("defaults",), defaults_raw, VM_SETTINGS, ctx)

    vms: list[VM] = []
    vm_tables = data.get("vm", {})
    if not isinstance(vm_tables, dict):
        col.add(("vm",), "invalid value", expected="tables [vm.NAME]", found=_describe(vm_tables))
        vm_tables = {}
    if not vm_tables:
        col.add(("vm",), "the stack has no VM", expected="at least one [vm.NAME] table",
                found="none", hint='add a table such as [vm.alpha] with a kernel = "..." key')
    for vm_name, table in vm_tables.items():
        where = ("vm", vm_name)
        if not NAME_RE.match(vm_name) or len(vm_name) > VM_NAME_MAX:
            col.add(where, "invalid VM name",
                    expected=f"lower-case letters, digits and '-', starting with a letter, "
                             f"at most {VM_NAME_MAX} characters",
                    found=f'"{vm_name}"')
        if not isinstance(table, dict):
            col.add(where, "invalid value", expected="a table", found=_describe(table))
            continue
        values = dict(defaults)
        values.update(_convert_table(col, where, table, VM_SETTINGS, ctx))
        missing = [s.key for s in VM_SETTINGS
                   if s.required and s.key not in values and s.key not in table]
        for key in missing:
            col.add(where, f'missing required key "{key}"',
                    hint=f'add {key} = "..." to [vm.{vm_name}] or to [defaults]')
        if missing or any(s.key in table and s.key not in values for s in VM_SETTINGS):
            continue
        settings = {s.key: values.get(s.key, s.default) for s in VM_SETTINGS}
        vms.extend(_expand(col, where, vm_name, "count" in table or "count" in defaults,
                           settings, top.get("name", "")))
    _resolve_dependencies(col, vms, vm_tables, defaults_raw)
    networks = _parse_networks(col, data.get("network", {}))
    vms[:] = _attach_networks(col, vms, networks, top.get("name", ""))
    _fill_cmdlines(col, vms, top.get("name", ""), networks)

    if col.problems:
        raise ManifestError(col.problems)

    if state_dir is not None:
        root = Path(state_dir).resolve()
    else:
        root = (base_dir / os.path.expanduser(top.get("state_dir", ".vmrun"))).resolve()
    return Stack(
        path=path.resolve(),
        name=top["name"],
        accel=top.get("accel", "auto"),
        stop_timeout=top.get("stop_timeout", 10.0),
        state_dir=root / top["name"],
        vms=tuple(vms),
        lines=lines,
        networks=networks,
    )


def _interpolate(data: dict[str, Any], col: _Collector, base_dir: Path,
                 environ: Mapping[str, str] | None) -> dict[str, Any]:
    """Apply ${VAR} interpolation (environment first, then .env beside the manifest)."""
    env_path = base_dir / ".env"
    env_file, errors = interpolate.read_env_file(env_path)
    for number, text in errors:
        col.problems.append(Problem("invalid line in .env", file=env_path, line=number,
                                    expected="KEY=VALUE", found=repr(text)))
    lookup = interpolate.make_lookup(os.environ if environ is None else environ, env_file)

    def on_error(keypath: tuple[str, ...], exc: interpolate.InterpolationError) -> None:
        hint = None
        if exc.variable:
            hint = (f"set {exc.variable} in the environment or in {env_path}, or give a "
                    f"default: ${{{exc.variable}:-value}}")
        col.add(keypath, str(exc), hint=hint)
        col.broken.add(keypath[:3] if keypath[:1] == ("vm",) else keypath[:2])

    result: dict[str, Any] = interpolate.walk(data, lookup, on_error)
    return result


_PLACEHOLDER_RE = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")


def fill_placeholders(text: str, values: Mapping[str, str]) -> str:
    """Replace {vm.name}-style placeholders; {{ and }} are literal braces."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) in ("{{", "}}"):
            return match.group(0)[0]
        key = match.group(1)
        if key not in values:
            own = [k for k in values if not (k.startswith("vm.") and k.count(".") > 1)]
            raise Invalid("known placeholders only: " + ", ".join(f"{{{k}}}" for k in own)
                          + (", {vm.OTHER.net.NAME.ip}" if len(own) < len(values) else "")
                          + f" (found {{{key}}}; write {{{{ and }}}} for literal braces)")
        return values[key]

    return _PLACEHOLDER_RE.sub(replace, text)


def _expand(col: _Collector, where: tuple[str, ...], group: str, counted: bool,
            settings: dict[str, Any], stack_name: str) -> list[VM]:
    """One VM per copy (`count`), with its placeholders filled in."""
    copies = settings["count"]
    vms = []
    for index in range(1, copies + 1):
        name = f"{group}-{index}" if counted else group
        if counted and len(name) > VM_NAME_MAX:
            col.add((*where, "count"), f'the copy name "{name}" is too long',
                    expected=f"VM names of at most {VM_NAME_MAX} characters",
                    hint="use a shorter [vm.NAME]")
            return []
        vms.append(VM(name=name, index=index, group=group, **settings))
    return vms


def _parse_networks(col: _Collector, tables: Any) -> dict[str, network.Network]:
    if not isinstance(tables, dict):
        col.add(("network",), "invalid value", expected="tables [network.NAME]",
                found=_describe(tables))
        return {}
    subnets: dict[str, Any] = {}
    for name, table in tables.items():
        where = ("network", name)
        if not NAME_RE.match(name) or len(name) > NETWORK_NAME_MAX:
            col.add(where, "invalid network name",
                    expected=f"lower-case letters, digits and '-', starting with a letter, "
                             f"at most {NETWORK_NAME_MAX} characters", found=f'"{name}"')
            continue
        if not isinstance(table, dict):
            col.add(where, "invalid value", expected="a table", found=_describe(table))
            continue
        for key in set(table) - {"subnet"}:
            col.add((*where, key), "unknown key", hint=_did_you_mean(key, ["subnet"]))
        subnets[name] = None
        if "subnet" in table:
            try:
                subnet = network.parse_subnet(str(table["subnet"]))
            except ValueError as exc:
                col.add((*where, "subnet"), "invalid value", expected=str(exc),
                        found=_describe(table["subnet"]))
                continue
            clash = [n for n, other in subnets.items() if other and other.overlaps(subnet)]
            if clash:
                col.add((*where, "subnet"), f"overlaps the subnet of network {clash[0]}")
                continue
            subnets[name] = subnet
    free = iter(network.default_subnets(
        sum(1 for v in subnets.values() if v is None),
        {v for v in subnets.values() if v is not None}))
    return {name: network.Network(name, subnet or next(free))
            for name, subnet in subnets.items()}


def _attach_networks(col: _Collector, vms: list[VM], networks: dict[str, network.Network],
                     stack_name: str) -> list[VM]:
    """Check each VM's networks and forwards, and give it its addresses."""
    members: dict[str, list[str]] = {}
    ports: dict[tuple[str, int], str] = {}
    reported: set[str] = set()
    for vm in vms:
        where = ("vm", vm.group, "networks")
        for name in vm.networks:
            if name not in networks:
                col.add(where, f'unknown network "{name}"',
                        expected="the name of a [network.NAME] table",
                        hint=_did_you_mean(name, list(networks)) or
                        f"declare it: [network.{name}]")
            else:
                members.setdefault(name, []).append(vm.name)
        for forward in vm.forward:
            key = (forward.host_address, forward.host_port)
            if not vm.networks:
                col.add(("vm", vm.group, "forward"), "a forward needs a network",
                        hint='attach the VM to a network: networks = ["lan"] and a '
                             "[network.lan] table")
            elif key in ports and ports[key] not in reported:
                reported.add(ports[key])
                copies = vm.group != vm.name and ports[key].startswith(vm.group + "-")
                col.add(("vm", vm.group, "forward"),
                        f"host port {forward.host_address}:{forward.host_port} is already "
                        f"forwarded to {ports[key]}",
                        hint="copies (count) cannot share a host port: forward from a VM "
                             "without count" if copies else None)
            ports.setdefault(key, vm.name)
    try:
        addresses = network.assign(stack_name, networks, members)
    except ValueError as exc:
        col.add(("network",), str(exc), hint="use a larger subnet")
        return vms
    return [VM(**{**vm.__dict__, "addresses": tuple(
        addresses[(vm.name, n)] for n in vm.networks if (vm.name, n) in addresses)})
        for vm in vms]


def placeholder_values(vm: VM, stack_name: str,
                       networks: dict[str, network.Network] | None = None) -> dict[str, str]:
    values = {"vm.name": vm.name, "vm.index": str(vm.index), "index": str(vm.index),
              "stack.name": stack_name}
    for address in vm.addresses:
        prefix = f"net.{address.network}."
        values[prefix + "ip"] = str(address.ip)
        values[prefix + "prefix"] = str(address.prefix)
        values[prefix + "cidr"] = address.cidr
        values[prefix + "mac"] = address.mac
        if networks and address.network in networks:
            values[prefix + "gateway"] = str(networks[address.network].gateway)
    return values


def _fill_cmdlines(col: _Collector, vms: list[VM], stack_name: str,
                   networks: dict[str, network.Network]) -> None:
    reported: set[str] = set()
    others: dict[str, str] = {}  # {vm.OTHER.net.NAME.ip} etc.: other VMs' addresses
    for vm in vms:
        for address in vm.addresses:
            prefix = f"vm.{vm.name}.net.{address.network}."
            others[prefix + "ip"] = str(address.ip)
            others[prefix + "cidr"] = address.cidr
            others[prefix + "mac"] = address.mac
    for i, vm in enumerate(vms):
        try:
            cmdline = fill_placeholders(vm.cmdline,
                                        placeholder_values(vm, stack_name, networks) | others)
        except Invalid as exc:
            if vm.group not in reported:
                col.add(("vm", vm.group, "cmdline"), "invalid placeholder",
                        expected=exc.expected)
                reported.add(vm.group)
            continue
        vms[i] = VM(**{**vm.__dict__, "cmdline": cmdline})


def _resolve_dependencies(col: _Collector, vms: list[VM], vm_tables: Any,
                          defaults_raw: Any) -> None:
    """Turn depends_on names (tables or copies) into VM names; reject unknowns and cycles."""
    groups: dict[str, list[str]] = {}
    for vm in vms:
        groups.setdefault(vm.group, []).append(vm.name)
    names = {vm.name for vm in vms}
    resolved: dict[str, tuple[tuple[str, str], ...]] = {}
    for i, vm in enumerate(vms):
        where: tuple[str, ...] = ("vm", vm.group, "depends_on")
        if not isinstance(vm_tables.get(vm.group), dict) or \
                "depends_on" not in vm_tables[vm.group]:
            where = ("defaults", "depends_on")
        deps: list[tuple[str, str]] = []
        for target, condition in vm.depends_on:
            if target in groups:
                members = groups[target]
            elif target in names:
                members = [target]
            else:
                col.add(where, f'unknown VM "{target}"', expected="the name of a [vm.NAME] "
                        "table or of one of its copies",
                        hint=_did_you_mean(target, [*groups, *names]))
                continue
            deps += [(m, condition) for m in members]
        if any(m == vm.name for m, _ in deps):
            col.add(where, f'VM "{vm.name}" depends on itself')
            deps = [d for d in deps if d[0] != vm.name]
        resolved[vm.name] = tuple(deps)
        vms[i] = VM(**{**vm.__dict__, "depends_on": tuple(deps)})
    cycle = _find_cycle({name: [d for d, _ in deps] for name, deps in resolved.items()})
    if cycle:
        first = next(vm for vm in vms if vm.name == cycle[0])
        col.add(("vm", first.group, "depends_on"), "dependency cycle: " + " -> ".join(cycle),
                hint="remove one of these depends_on entries")


def _find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in graph.get(node, []):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in graph:
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None
