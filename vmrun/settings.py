"""The manifest's settings table: every key, its type, default, converter, JSON Schema
and documentation.

One table drives parsing and validation (vmrun/manifest.py), the JSON Schema
(vmrun/schema.py) and the reference in docs/manifest.md (a test checks the docs name every
key).  The converters are in vmrun/convert.py and vmrun/fileconvert.py, the bounds they
check in vmrun/limits.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from vmrun import convert, fileconvert
from vmrun.convert import SIZE_JSON_PATTERN, Converter
from vmrun.limits import (
    ACCELS,
    BOOT_MODES,
    DEPENDENCY_CONDITIONS,
    DISK_FORMATS,
    DISK_MEDIA,
    MAX_COUNT,
    MAX_CPUS,
    MAX_DISK_MIB,
    MAX_DISKS,
    MAX_NETWORKS,
    MAX_RESTARTS,
    MAX_SECONDS,
    MAX_SHARES,
    MAX_VMS,
    MIN_DISK_MIB,
    MIN_MEMORY_MIB,
    NAME_RE,
    NETWORK_NAME_MAX,
    ON_REBOOT,
    RESTART_POLICIES,
    STACK_NAME_MAX,
    VM_NAME_MAX,
)
from vmrun.sourcefile import Unreadable, read_regular


class Setting:
    """One manifest key: its converter, default and documentation.

    `schema` is the JSON Schema of the value (type, pattern, enum, bounds) as far as JSON
    Schema can say what `convert` accepts; vmrun/schema.py adds the description and the
    default and builds the manifest's schema from these tables.

    `doc` and `schema` may be given as functions that return them, called when first read:
    the `ready` setting's come from vmrun.readiness, which imports vmrun.protocol, and only
    a manifest with `ready` (or the docs and the schema) needs that module.
    """

    def __init__(self, key: str, type: str, default: Any, convert: Converter,
                 doc: str | Callable[[], str], required: bool = False, *,
                 schema: Mapping[str, Any] | Callable[[], Mapping[str, Any]]) -> None:
        self.key = key
        self.type = type  # shown in docs and errors
        self.default = default
        self.convert = convert
        self.required = required
        self._doc = doc
        self._schema = schema

    @property
    def doc(self) -> str:
        if callable(self._doc):
            self._doc = self._doc()
        return self._doc

    @property
    def schema(self) -> Mapping[str, Any]:
        if callable(self._schema):
            self._schema = self._schema()
        return self._schema

    def __repr__(self) -> str:
        return f"Setting({self.key!r})"


# --- JSON Schema of the values (see vmrun/schema.py) ------------------------------------

def json_pattern(regex: re.Pattern[str]) -> str:
    """A regex used with `re.match` and ending in `\\Z`, as an anchored JSON Schema pattern."""
    if not regex.pattern.endswith(r"\Z") or regex.flags & re.IGNORECASE:
        raise ValueError(f"cannot translate {regex.pattern!r} to a JSON Schema pattern")
    return "^" + regex.pattern.removesuffix(r"\Z") + "$"


_NAME_SCHEMA = {"type": "string", "pattern": json_pattern(NAME_RE), "maxLength": STACK_NAME_MAX}
_SECONDS_SCHEMA = {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_SECONDS}
_FILE_SCHEMA = {"type": "string", "minLength": 1}
_REGEX_SCHEMA = {"type": "string", "minLength": 1}
# A string using ${VAR} can only be checked once interpolated: the schema lets it through.
_INTERPOLATED = {"type": "string", "pattern": r"\$\{"}
_SIZE_SCHEMA = {"anyOf": [{"type": "integer", "minimum": MIN_MEMORY_MIB},
                          {"type": "string", "pattern": SIZE_JSON_PATTERN}, _INTERPOLATED]}


# The `ready` setting is vmrun.readiness's (its converter, doc and schema), imported on
# first use: see Setting.


def _ready(value: Any, ctx: convert.Context) -> Any:
    from vmrun import readiness

    return readiness.convert(value, ctx)


def _ready_doc() -> str:
    from vmrun import readiness

    return readiness.DOC


def _ready_schema() -> Mapping[str, Any]:
    from vmrun import readiness

    return readiness.SCHEMA


_SSH_USER_RE = re.compile(r"[a-z_][a-z0-9_.-]{0,31}\Z")


def _ssh_user(value: Any, ctx: convert.Context) -> str:
    """A user name as Debian's useradd takes it (`ssh_user`)."""
    if not isinstance(value, str) or not _SSH_USER_RE.match(value):
        raise convert.Invalid("a user name: lower-case letters, digits, '_', '.' and '-', "
                              "starting with a letter or '_', at most 32 characters")
    return value


STACK_SETTINGS: tuple[Setting, ...] = (
    Setting("name", "string", None, convert.stack_name,
            "Stack name: lower-case letters, digits and '-'. Default: the manifest's "
            "file name without `.toml`.", schema=_NAME_SCHEMA),
    Setting("accel", "string", "auto", convert.accel,
            '`"auto"` uses KVM when it really works on this host and TCG (software '
            'emulation) otherwise; `"kvm"` requires KVM; `"tcg"` always emulates.',
            schema={"type": "string", "enum": list(ACCELS)}),
    Setting("stop_timeout", "number", 10.0, convert.seconds,
            "Seconds a guest gets to shut down after an ACPI power-button press before "
            "it is destroyed.", schema=_SECONDS_SCHEMA),
    Setting("state_dir", "string", ".vmrun", convert.string,
            "Where run state lives, relative to the manifest's directory; the stack uses "
            "`<state_dir>/<name>/`.", schema={"type": "string"}),
)

VM_SETTINGS: tuple[Setting, ...] = (
    Setting("boot", "string", None, convert.choice(*BOOT_MODES),
            '`"kernel"` boots `kernel` directly (no firmware); `"bios"` (SeaBIOS) and '
            '`"uefi"` (OVMF) boot a disk through firmware, like a downloaded cloud image. '
            'The first disk boots unless a disk says `boot = true`. Default: `"kernel"` '
            'when `kernel` is set, `"bios"` otherwise.',
            schema={"type": "string", "enum": list(BOOT_MODES)}),
    Setting("kernel", "path", None, fileconvert.file_path,
            'Kernel image to boot directly, relative to the manifest\'s directory (with '
            '`boot = "kernel"` only).', schema=_FILE_SCHEMA),
    Setting("initrd", "path", None, fileconvert.file_path,
            'Initial ramdisk, relative to the manifest\'s directory (with `boot = "kernel"` '
            'only).', schema=_FILE_SCHEMA),
    Setting("cmdline", "string", "console=ttyS0", convert.string,
            'Kernel command line (with `boot = "kernel"` only). Keep `console=ttyS0` so the '
            'console can be streamed.',
            schema={"type": "string"}),
    Setting("secure_boot", "boolean", False, convert.boolean,
            'With `boot = "uefi"`: the Secure Boot firmware with Microsoft\'s keys enrolled '
            '(the host must have it: Debian\'s `ovmf` package does).',
            schema={"type": "boolean"}),
    Setting("memory", "size", 256, convert.memory,
            'Guest memory: an integer number of MiB, or a string with a K, M, G or T '
            'suffix ("512M", "2G").', schema=_SIZE_SCHEMA),
    Setting("cpus", "integer", 1, convert.cpus, "Number of virtual CPUs.",
            schema={"type": "integer", "minimum": 1, "maximum": MAX_CPUS}),
    Setting("timeout", "number", None, convert.seconds,
            "Seconds the guest may run; a guest still running then is destroyed and "
            "counts as failed (reason: timeout). Default: no limit.", schema=_SECONDS_SCHEMA),
    Setting("success", "regex", None, convert.regex,
            "The guest counts as ok only if a console line matched this regular "
            "expression (RE2 syntax: Python's without backreferences or lookaround; "
            "searched anywhere in the line, in linear time) before it stopped.",
            schema=_REGEX_SCHEMA),
    Setting("failure", "regex", None, convert.regex,
            "A console line matching this regular expression (RE2 syntax) makes the "
            "guest failed at once (it is destroyed).", schema=_REGEX_SCHEMA),
    Setting("ready", "regex or table", None, _ready, _ready_doc, schema=_ready_schema),
    Setting("ready_timeout", "number", 120.0, convert.seconds,
            "Seconds after the start a VM with `ready` may take to become ready; after "
            "that it is destroyed and counts as failed (reason: not ready).",
            schema=_SECONDS_SCHEMA),
    Setting("count", "integer", 1, convert.count,
            "Run this many copies of the VM, named NAME-1 ... NAME-N, each with its own "
            "state; `{index}` in `cmdline` is the copy's number. Without it the VM keeps "
            "its name (and `{index}` is 1).",
            schema={"type": "integer", "minimum": 1, "maximum": MAX_COUNT}),
    Setting("depends_on", "array or table", (), convert.depends_on,
            'Start this VM only after others: `["db"]` waits until db is ready, '
            '`{ db = "ok" }` until db has stopped with outcome ok. A VM whose dependency '
            "failed is never started (outcome failed).",
            schema={"anyOf": [
                {"type": "array", "items": {"type": "string"}, "maxItems": MAX_VMS},
                {"type": "object", "maxProperties": MAX_VMS,
                 "additionalProperties": {"enum": list(DEPENDENCY_CONDITIONS)}},
            ]}),
    Setting("disks", "array of tables", (), fileconvert.disks,
            'Disks, attached as virtio disks vda, vdb, ... in order. `{ image = "base.qcow2" '
            '}` gets a copy-on-write overlay in the VM\'s state directory (the image is '
            'never written; `size = "20G"` makes the overlay larger than the image); '
            '`{ size = "2G" }` is a blank disk; `readonly = true` attaches an image '
            'read-only without an overlay; `media = "cdrom"` attaches it as a read-only '
            'CD-ROM (virtio-scsi). `image` may be an `https://`, `http://` or `file://` URL '
            'with a `sha256` or `sha512` checksum: it is downloaded once into a cache '
            '(`.xz`, `.gz` and `.zst` files are decompressed there); a local image may have '
            'a checksum too. Images are raw or qcow2 (`format` overrides detection). '
            '`boot = true` marks the disk firmware boots from (default: the first). '
            'Overlays and blank disks are kept between runs unless `ephemeral` is set or '
            '`vmrun up --fresh` is given; `up` refuses an overlay whose image changed since.',
            schema={"type": "array", "maxItems": MAX_DISKS, "items": {
                "type": "object", "additionalProperties": False,
                "properties": {"image": {"type": "string", "minLength": 1},
                               "size": {"anyOf": [
                                   {"type": "integer", "minimum": MIN_DISK_MIB},
                                   {"type": "string", "pattern": SIZE_JSON_PATTERN},
                                   _INTERPOLATED]},
                               "readonly": {"type": "boolean"},
                               "format": {"enum": list(DISK_FORMATS)},
                               "sha256": {"type": "string", "pattern": "^[0-9a-fA-F]{64}$"},
                               "sha512": {"type": "string", "pattern": "^[0-9a-fA-F]{128}$"},
                               "media": {"enum": list(DISK_MEDIA)},
                               "boot": {"type": "boolean"}},
                "anyOf": [{"required": ["image"]}, {"required": ["size"]}]}}),
    Setting("ephemeral", "boolean", False, convert.boolean,
            "Start every overlay and blank disk anew on each run.",
            schema={"type": "boolean"}),
    Setting("shares", "array of tables", (), fileconvert.shares,
            'Host directories shared with the guest (virtiofs): `{ host = "./src", guest = '
            '"/src" }` (host relative to the manifest\'s directory, an existing directory; '
            'guest an absolute path). `readonly = true` makes the share read-only on the host '
            'side. Each share has the virtiofs tag `share<N>` (N its index from 0); a guest '
            'with a cloud-init seed mounts it at `guest` by itself, a kernel-booted guest '
            'mounts the tag (`mount -t virtiofs share0 /src`). Needs root.',
            schema={"type": "array", "maxItems": MAX_SHARES, "items": {
                "type": "object", "additionalProperties": False, "required": ["host", "guest"],
                "properties": {"host": {"type": "string", "minLength": 1},
                               "guest": {"anyOf": [{"type": "string", "pattern": "^/"},
                                                   _INTERPOLATED]},
                               "readonly": {"type": "boolean"}}}}),
    Setting("on_reboot", "string", "restart", convert.choice(*ON_REBOOT),
            'What a reboot inside the guest does: `"restart"` (the guest comes back, in the '
            'same run) or `"stop"` (the VM stops there, as after a poweroff: for one-shot '
            'runs). A kernel panic is a failure either way.',
            schema={"type": "string", "enum": list(ON_REBOOT)}),
    Setting("restart", "string", "no", convert.choice(*RESTART_POLICIES),
            'Start the VM again after it stopped: `"no"`, `"on-failure"` (after an outcome '
            '`failed`) or `"always"`, at most `restart_max` times. Never after a stop on '
            'request (`vmrun down`, Ctrl-C).',
            schema={"type": "string", "enum": list(RESTART_POLICIES)}),
    Setting("restart_max", "integer", 3, convert.restart_max,
            "How many times `restart` may start the VM again in one run.",
            schema={"type": "integer", "minimum": 0, "maximum": MAX_RESTARTS}),
    Setting("networks", "array", (), convert.network_names,
            "Private networks (`[network.NAME]`) the VM is attached to, as virtio NICs "
            "in this order; each gives it a fixed address and MAC (placeholders "
            "`{net.NAME.ip}` etc. in cmdline).",
            schema={"type": "array", "items": {"type": "string"}, "uniqueItems": True,
                    "maxItems": MAX_NETWORKS}),
    Setting("nat", "boolean or string", False, convert.nat,
            'Outbound network: `true` gives the VM a user-mode NIC (passt) with DHCP, a '
            'default route and DNS, so it reaches the internet and the host\'s loopback '
            '(through its gateway 10.0.2.2); `"no-host"` the same without the host\'s '
            'loopback. Default `false`: the VM reaches nothing outside its stack.',
            schema={"anyOf": [{"type": "boolean"}, {"enum": ["no-host"]}]}),
    Setting("forward", "array", (), convert.forwards,
            'Host TCP ports forwarded to the VM\'s first network address: "8080:80" '
            '(host 127.0.0.1:8080 to guest port 80) or "ADDRESS:HOSTPORT:GUESTPORT".',
            schema={"type": "array", "items": {"anyOf": [
                {"type": "string", "pattern": r"^(\d{1,3}(\.\d{1,3}){3}:)?\d{1,5}:\d{1,5}$"},
                _INTERPOLATED]}}),
    Setting("cloud_init", "table", None, fileconvert.cloud_init,
            "Build a cloud-init NoCloud seed (volume label cidata) from these files and "
            "attach it read-only as the last virtio disk. meta_data defaults to "
            "instance-id and local-hostname = the VM's name.",
            schema={"type": "object", "additionalProperties": False, "required": ["user_data"],
                    "properties": {k: {"type": "string", "minLength": 1}
                                   for k in ("user_data", "meta_data", "network_config")}}),
    Setting("ssh_user", "string", None, _ssh_user,
            "The user `vmrun ssh`, `exec` and `cp` log in as. Default: the user cloud-init "
            "gave the stack's SSH key (the image's default user, e.g. `debian` or `ubuntu`), "
            "as the guest's console showed it; `root` when none was shown.",
            schema={"anyOf": [{"type": "string", "pattern": json_pattern(_SSH_USER_RE)},
                              _INTERPOLATED]}),
    Setting("xml_devices", "string", None, convert.xml_devices,
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

__all__ = [
    # the bounds and choices (vmrun/limits.py), named here for the settings' readers
    "ACCELS", "DEPENDENCY_CONDITIONS", "DISK_FORMATS", "MAX_COUNT", "MAX_CPUS", "MAX_DISK_MIB",
    "MAX_DISKS", "MAX_NETWORKS", "MAX_SECONDS", "MAX_VMS", "MIN_DISK_MIB", "MIN_MEMORY_MIB",
    "NAME_RE", "NETWORK_NAME_MAX", "STACK_NAME_MAX", "VM_NAME_MAX",
    # bounded reading (vmrun/sourcefile.py), as vmrun/interpolate.py imports it
    "Unreadable", "read_regular",
    # the table
    "SIZE_JSON_PATTERN", "STACK_SETTINGS", "STACK_TABLES", "VM_SETTINGS", "Converter", "Setting",
    "json_pattern",
]
