"""Parse and validate a stack manifest (TOML) into frozen dataclasses.

This module reads the file (vmrun/sourcefile.py), parses it with the lines of its keys
(vmrun/tomlkeys.py), interpolates ${VAR}, applies [defaults], converts each key by the
settings table (vmrun/settings.py, through vmrun/collect.py), expands copies (`count`),
and has the checks across VMs made (vmrun/stackcheck.py): depends_on, networks and
addresses, forwards, cmdline placeholders.  Every problem is collected, located (file,
line, key) and reported together, so a user fixes a manifest in one pass: a VM with a bad
value still takes part in the checks across VMs that do not depend on that value.

`load_identity` reads only what names a stack and its state (name, state_dir, the VMs'
names), with the same helpers (vmrun/naming.py), for verbs that must work on a manifest
that no longer validates.  The CLI asks vmrun/identity.py, which answers for a plain
manifest without importing this module and leaves everything else to `loads_identity`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

# The names of __all__ imported here are re-exported: the rest of vmrun reads them from here.
from vmrun import bootcheck, naming, stackcheck
from vmrun.collect import (
    BAD,
    MAX_PROBLEMS,
    Collector,
    convert_table,
    convert_value,
    interpolate_values,
)
from vmrun.convert import (
    SIZE_JSON_PATTERN,
    Context,
    Invalid,
    describe,
    parse_size_mib,
    resolve,
    xml_unsafe,
)
from vmrun.errors import ManifestError, Problem
from vmrun.fileconvert import CloudInit, Disk, Share, image_format
from vmrun.identity import Identity, find_manifest
from vmrun.layout import StackPaths
from vmrun.limits import (
    ACCELS,
    DEPENDENCY_CONDITIONS,
    DISK_FORMATS,
    MAX_CPUS,
    MAX_NETWORKS,
    MAX_SECONDS,
    MAX_VMS,
    MIN_MEMORY_MIB,
    NAME_RE,
    NETWORK_NAME_MAX,
    STACK_NAME_MAX,
    VM_NAME_MAX,
)
from vmrun.settings import STACK_SETTINGS, STACK_TABLES, VM_SETTINGS, Setting, json_pattern
from vmrun.sourcefile import MANIFEST_MAX, read_manifest
from vmrun.stackcheck import UnknownPlaceholder, fill_placeholders, placeholder_values
from vmrun.tomlkeys import MAX_NESTING, line_of, locate_keys, parse_toml

if TYPE_CHECKING:  # imported where needed (vmrun.readiness imports vmrun.protocol)
    from vmrun import network
    from vmrun.readiness import Ready



@dataclass(frozen=True)
class VM:
    """One VM of the stack (each copy of a table with `count` is one), its settings
    converted."""

    name: str
    boot: str  # "kernel" | "bios" | "uefi"
    kernel: Path | None  # with boot = "kernel" (and only then)
    initrd: Path | None
    cmdline: str
    secure_boot: bool
    memory: int  # MiB
    cpus: int
    timeout: float | None
    success: str | None
    failure: str | None
    ready: Ready | None  # vmrun/readiness.py
    ready_timeout: float
    count: int
    depends_on: tuple[tuple[str, str], ...]  # (VM name, "ready" | "ok"), resolved
    disks: tuple[Disk, ...]
    ephemeral: bool
    on_reboot: str  # "restart" | "stop"
    restart: str  # "no" | "on-failure" | "always"
    restart_max: int
    networks: tuple[str, ...]
    nat: bool | str  # False | True | "no-host": truthy with a NAT NIC
    forward: tuple[network.Forward, ...]
    cloud_init: CloudInit | None
    xml_devices: str | None
    shares: tuple[Share, ...] = ()  # shared folders (virtiofs), tags share0, share1, ...
    ssh_user: str | None = None  # None: the user cloud-init names (vmrun/access.py)
    index: int = 1  # the copy's number, with `count`
    group: str = ""  # the [vm.NAME] table it comes from
    addresses: tuple[network.Address, ...] = ()  # one per network, in `networks` order

    @property
    def address(self) -> str | None:
        """Its address on its first network: where vmrun reaches it (ssh, ready, forward)."""
        return str(self.addresses[0].ip) if self.addresses else None


@dataclass(frozen=True)
class Stack:
    """A manifest, parsed and checked."""

    path: Path
    name: str
    accel: str
    stop_timeout: float
    state_dir: Path  # the stack's own directory: <state_dir>/<name>
    vms: tuple[VM, ...] = field(default_factory=tuple)
    lines: dict[tuple[str, ...], int] = field(default_factory=dict, compare=False)
    networks: dict[str, network.Network] = field(default_factory=dict)

    def line_of(self, *keypath: str) -> int | None:
        return line_of(self.lines, keypath)

    @property
    def paths(self) -> StackPaths:
        return StackPaths(self.state_dir)

    @property
    def identity(self) -> Identity:
        return Identity(path=self.path, name=self.name, state_dir=self.state_dir,
                        vm_names=tuple(vm.name for vm in self.vms))

    def vm(self, name: str) -> VM:
        for vm in self.vms:
            if vm.name == name:
                return vm
        raise KeyError(name)


def _base_dir(path: Path) -> tuple[Path, Path]:
    """The manifest's resolved path and directory; ManifestError when vmrun cannot use them."""
    try:
        resolved = resolve(path)
    except Invalid as exc:
        raise ManifestError([Problem("unusable manifest path", file=path,
                                     expected=exc.expected)]) from None
    if xml_unsafe(str(resolved.parent)) is not None:
        raise ManifestError([Problem(
            "the manifest's directory is not a UTF-8 path without control characters; "
            "vmrun keeps paths in libvirt's XML, which needs them", file=path)])
    return resolved, resolved.parent


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


_VM_KEYS = {s.key: s for s in VM_SETTINGS}
_STACK_KEYS = {s.key: s for s in STACK_SETTINGS}


def _unique(names: list[str]) -> list[str]:
    return list(dict.fromkeys(names))


def load(path: str | os.PathLike[str], state_dir: str | os.PathLike[str] | None = None) -> Stack:
    """Read, parse and validate a manifest; raise ManifestError listing every problem."""
    path = Path(path)
    return loads(read_manifest(path), path, state_dir=state_dir)


def loads(
    source: str,
    path: Path,
    state_dir: str | os.PathLike[str] | None = None,
    host_memory: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> Stack:
    data, lines = parse_toml(source, path)
    resolved, base_dir = _base_dir(path)
    ctx = Context(base_dir=base_dir, host_memory_mib=host_memory or host_memory_mib())
    col = Collector(path, lines)
    data = interpolate_values(data, col, base_dir, environ)

    top = convert_table(col, (), data, _STACK_KEYS, ctx, extra_keys=tuple(STACK_TABLES))
    name = top.get("name") if "name" in data else naming.default_name(col, path, ctx)

    defaults_raw = data.get("defaults", {})
    defaults: dict[str, Any] = {}
    if not isinstance(defaults_raw, dict):
        col.add(("defaults",), "invalid value", expected="a table", found=describe(defaults_raw))
        defaults_raw = {}
    else:
        defaults = convert_table(col, ("defaults",), defaults_raw, _VM_KEYS, ctx)
    defaults_bad = {k for k in defaults_raw if k in _VM_KEYS and k not in defaults}

    vm_tables = data.get("vm", {})
    if not isinstance(vm_tables, dict):
        col.add(("vm",), "invalid value", expected="tables [vm.NAME]", found=describe(vm_tables))
        vm_tables = {}
    if not vm_tables:
        col.add(("vm",), "the stack has no VM", expected="at least one [vm.NAME] table",
                found="none", hint='add a table such as [vm.alpha] with a kernel = "..." key')
    vms: list[VM] = []
    bad: dict[str, set[str]] = {}  # VM name -> its keys without a valid value
    unsure: set[str] = set()  # tables whose VMs are not known (bad name, table or count)
    for number, (group, table) in enumerate(vm_tables.items()):
        where = ("vm", group)
        if number >= MAX_VMS:
            naming.too_many_vms(col, where)
            unsure.update(list(vm_tables)[number:])
            break
        name_ok = naming.vm_name_ok(col, where, group)
        if not isinstance(table, dict):
            col.add(where, "invalid value", expected="a table", found=describe(table))
            unsure.add(group)
            continue
        own = convert_table(col, where, table, _VM_KEYS, ctx)
        values = {**defaults, **own}
        broken = {k for k in table if k in _VM_KEYS and k not in own}
        broken |= defaults_bad - set(table)
        bootcheck.settle(col, where, table, values, broken)
        for key in (s.key for s in VM_SETTINGS if s.required and s.key not in values):
            if key not in broken:
                col.add(where, f'missing required key "{key}"',
                        hint=f'add {key} = "..." to [vm.{group}] or to [defaults]')
                broken.add(key)
        names = (naming.copy_names(col, where, group, "count" in table or "count" in defaults,
                                   values.get("count", 1))
                 if name_ok and "count" not in broken else None)
        if names is not None and len(vms) + len(names) > MAX_VMS:
            naming.too_many_vms(col, where)
            unsure.update(list(vm_tables)[number:])
            break
        if names is None:
            unsure.add(group)
            continue
        settings = {s.key: values.get(s.key, s.default) for s in VM_SETTINGS}
        for index, vm_name in enumerate(names, start=1):
            vms.append(VM(name=vm_name, index=index, group=group, **settings))
            bad.setdefault(vm_name, broken)  # of two VMs with one name, the first stays
    stackcheck.check_duplicates(col, vms)
    stackcheck.resolve_dependencies(col, vms, vm_tables, bad, unsure)
    networks, declared = stackcheck.parse_networks(col, data.get("network", {}))
    vms[:] = stackcheck.attach_networks(col, vms, networks, declared, name or "", bad)
    stackcheck.check_ready(col, vms, vm_tables, bad)
    others_unsure = bool(unsure) or declared != set(networks) or \
        any("networks" in keys for keys in bad.values())
    stackcheck.fill_cmdlines(col, vms, name or "", networks, bad, others_unsure)

    stack_dir = None
    if name is not None and (state_dir is not None or "state_dir" in top
                             or "state_dir" not in data):
        stack_dir = naming.stack_dir(col, base_dir, top.get("state_dir", ".vmrun"), state_dir, name)
    if col.problems or name is None or stack_dir is None:
        raise col.error()
    return Stack(
        path=resolved,
        name=name,
        accel=top.get("accel", "auto"),
        stop_timeout=top.get("stop_timeout", 10.0),
        state_dir=stack_dir,
        vms=tuple(vms),
        lines=lines,
        networks=networks,
    )


def load_identity(path: str | os.PathLike[str],
                  state_dir: str | os.PathLike[str] | None = None) -> Identity:
    """The stack's name, state directory and VM names, even from a manifest that no longer
    validates (a deleted kernel, a missing image, a bad value elsewhere).

    Raises ManifestError (file, line) only when these cannot be determined: the file
    cannot be read or is not TOML, or the name, state_dir, a [vm.NAME] table name or a
    `count` is invalid.
    """
    path = Path(path)
    return loads_identity(read_manifest(path), path, state_dir=state_dir)


def loads_identity(source: str, path: Path, state_dir: str | os.PathLike[str] | None = None,
                   environ: Mapping[str, str] | None = None,
                   parsed: tuple[dict[str, Any], dict[tuple[str, ...], int]] | None = None,
                   ) -> Identity:
    """As load_identity, from the manifest's text; `parsed`: what tomlkeys.parse_toml made
    of `source` already (vmrun/identity.py), so that it is not parsed twice."""
    data, lines = parsed if parsed is not None else parse_toml(source, path)
    resolved, base_dir = _base_dir(path)
    ctx = Context(base_dir=base_dir, host_memory_mib=0)  # no converter used here needs it
    col = Collector(path, lines)
    scratch = Collector(path, lines)  # problems of keys that do not matter here
    data = interpolate_values(data, scratch, base_dir, environ)

    def value(keypath: tuple[str, ...], raw: Any, setting: Setting) -> Any:
        if keypath in scratch.broken:  # ${VAR} failed for a key that matters
            for problem in scratch.problems:
                if problem.key == ".".join(keypath):
                    col.append(problem)
            return BAD
        return convert_value(col, keypath, raw, setting, ctx)

    name = (value(("name",), data["name"], _STACK_KEYS["name"]) if "name" in data
            else naming.default_name(col, path, ctx))
    configured = ".vmrun"
    if "state_dir" in data and state_dir is None:
        configured = value(("state_dir",), data["state_dir"], _STACK_KEYS["state_dir"])
    stack_dir = None
    if name not in (None, BAD) and configured is not BAD:
        stack_dir = naming.stack_dir(col, base_dir, configured, state_dir, name)

    vm_tables = data.get("vm", {})
    defaults = data.get("defaults", {})
    defaults = defaults if isinstance(defaults, dict) else {}
    names: list[str] = []
    for group, table in (vm_tables.items() if isinstance(vm_tables, dict) else ()):
        where = ("vm", group)
        if not naming.vm_name_ok(col, where, group):
            continue
        if not isinstance(table, dict):
            col.add(where, "invalid value", expected="a table", found=describe(table))
            continue
        count, counted = 1, "count" in table or "count" in defaults
        if counted:
            keypath = (*where, "count") if "count" in table else ("defaults", "count")
            raw = table["count"] if "count" in table else defaults["count"]
            count = value(keypath, raw, _VM_KEYS["count"])
        if count is not BAD:
            names += naming.copy_names(col, where, group, counted, count) or []
        if len(names) > MAX_VMS:
            naming.too_many_vms(col, where)
            break
    if col.problems or stack_dir is None or not isinstance(name, str):
        raise col.error()
    return Identity(path=resolved, name=name, state_dir=stack_dir,
                    vm_names=tuple(_unique(names)))


__all__ = [
    "ACCELS", "DEPENDENCY_CONDITIONS", "DISK_FORMATS", "MANIFEST_MAX", "MAX_CPUS",
    "MAX_NESTING", "MAX_NETWORKS", "MAX_PROBLEMS", "MAX_SECONDS", "MAX_VMS",
    "MIN_MEMORY_MIB", "NAME_RE", "NETWORK_NAME_MAX",
    "SIZE_JSON_PATTERN", "STACK_NAME_MAX", "STACK_SETTINGS", "STACK_TABLES", "VM",
    "VM_NAME_MAX", "VM_SETTINGS", "CloudInit", "Context", "Disk", "Identity", "Invalid",
    "Setting", "Share", "Stack", "UnknownPlaceholder", "fill_placeholders", "find_manifest",
    "image_format", "json_pattern", "load", "load_identity", "loads", "loads_identity",
    "locate_keys", "parse_size_mib", "placeholder_values",
]
