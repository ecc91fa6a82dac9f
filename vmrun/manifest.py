"""Parse and validate a stack manifest (TOML) into frozen dataclasses.

The settings table (vmrun/settings.py) converts each key; this module reads the file,
interpolates ${VAR}, applies [defaults], expands copies (`count`), resolves depends_on,
networks and addresses, and fills cmdline placeholders.  Every problem is collected,
located (file, line, key) and reported together, so a user fixes a manifest in one pass.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef,import-not-found,unused-ignore]

from vmrun import interpolate, network
from vmrun.errors import ManifestError, Problem
from vmrun.settings import (  # re-exported: the rest of vmrun reads them from here
    ACCELS,
    DEPENDENCY_CONDITIONS,
    DISK_FORMATS,
    MAX_CPUS,
    MAX_SECONDS,
    MIN_MEMORY_MIB,
    NAME_RE,
    NETWORK_NAME_MAX,
    SIZE_JSON_PATTERN,
    STACK_NAME_MAX,
    STACK_SETTINGS,
    STACK_TABLES,
    VM_NAME_MAX,
    VM_SETTINGS,
    CloudInit,
    Context,
    Disk,
    Invalid,
    Setting,
    describe,
    did_you_mean,
    image_format,
    json_pattern,
    parse_size_mib,
    stack_name,
    utf8,
)


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
        return line_of(self.lines, keypath)

    def vm(self, name: str) -> VM:
        for vm in self.vms:
            if vm.name == name:
                return vm
        raise KeyError(name)


def line_of(lines: Mapping[tuple[str, ...], int], keypath: tuple[str, ...]) -> int | None:
    """The line of `keypath`, or of the nearest enclosing table that has one."""
    while keypath:
        if keypath in lines:
            return lines[keypath]
        keypath = keypath[:-1]
    return None


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
        return line_of(self.lines, keypath)

    def add(self, keypath: tuple[str, ...], message: str, **kw: Any) -> None:
        self.problems.append(
            Problem(message, file=self.path, line=self.line_of(keypath),
                    key=".".join(keypath) or None, **kw)
        )


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
                    hint=did_you_mean(key, [*known, *extra_keys]))
            continue
        try:
            out[key] = setting.convert(value, ctx)
        except Invalid as exc:
            col.add(where + (key,), f"invalid value{' in ' + key + exc.where if exc.where else ''}",
                    expected=exc.expected, found=exc.found or describe(value), hint=exc.hint)
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
    if not utf8(str(base_dir)):
        raise ManifestError([Problem("the manifest's directory is not a UTF-8 path; vmrun "
                                     "keeps paths in libvirt's XML and needs UTF-8",
                                     file=path)])
    ctx = Context(base_dir=base_dir, host_memory_mib=host_memory or host_memory_mib())
    lines = locate_keys(source)
    col = _Collector(path, lines)
    data = _interpolate(data, col, base_dir, environ)

    top = _convert_table(col, (), data, STACK_SETTINGS, ctx, extra_keys=tuple(STACK_TABLES))
    if "name" not in data:
        stem = path.name.removesuffix(".toml")
        try:
            top["name"] = stack_name(stem, ctx)
        except Invalid as exc:
            col.add((), "the stack has no valid name", expected=exc.expected,
                    found=f'the file name "{stem}"', hint='set name = "..." in the manifest')

    defaults_raw = data.get("defaults", {})
    defaults: dict[str, Any] = {}
    if not isinstance(defaults_raw, dict):
        col.add(("defaults",), "invalid value", expected="a table", found=describe(defaults_raw))
    else:
        defaults = _convert_table(col, ("defaults",), defaults_raw, VM_SETTINGS, ctx)

    vms: list[VM] = []
    vm_tables = data.get("vm", {})
    if not isinstance(vm_tables, dict):
        col.add(("vm",), "invalid value", expected="tables [vm.NAME]", found=describe(vm_tables))
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
            col.add(where, "invalid value", expected="a table", found=describe(table))
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
    seen: dict[str, str] = {}
    for vm in list(vms):
        if vm.name in seen:
            col.add(("vm", vm.group), f'two VMs are named "{vm.name}"',
                    found=f"[vm.{seen[vm.name]}] and [vm.{vm.group}]",
                    hint="rename one table (copies of a table with count are named NAME-N)")
            vms.remove(vm)
        seen.setdefault(vm.name, vm.group)
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
    try:
        env_file, errors = interpolate.read_env_file(env_path)
    except (OSError, UnicodeDecodeError) as exc:
        col.problems.append(Problem("cannot read .env", file=env_path,
                                    found=getattr(exc, "strerror", None) or str(exc)))
        env_file, errors = {}, []
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
                found=describe(tables))
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
            col.add(where, "invalid value", expected="a table", found=describe(table))
            continue
        for key in set(table) - {"subnet"}:
            col.add((*where, key), "unknown key", hint=did_you_mean(key, ["subnet"]))
        subnets[name] = None
        if "subnet" in table:
            try:
                subnet = network.parse_subnet(str(table["subnet"]))
            except ValueError as exc:
                col.add((*where, "subnet"), "invalid value", expected=str(exc),
                        found=describe(table["subnet"]))
                continue
            clash = [n for n, other in subnets.items() if other and other.overlaps(subnet)]
            if clash:
                col.add((*where, "subnet"), f"overlaps the subnet of network {clash[0]}")
                continue
            subnets[name] = subnet
    wanted = [name for name, subnet in subnets.items() if subnet is None]
    free = network.default_subnets(len(wanted), {v for v in subnets.values() if v})
    if len(free) < len(wanted):
        col.add(("network", wanted[len(free)]), "no free default subnet",
                expected=f"a free /24 in {network.DEFAULT_SUBNET_BASE}",
                hint='give this network a subnet = "..." of its own')
        return {}
    defaults = dict(zip(wanted, free, strict=True))
    return {name: network.Network(name, subnet or defaults[name])
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
                        hint=did_you_mean(name, list(networks)) or
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
                        hint=did_you_mean(target, [*groups, *names]))
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


__all__ = [
    "ACCELS", "DEPENDENCY_CONDITIONS", "DISK_FORMATS", "MAX_CPUS", "MAX_SECONDS",
    "MIN_MEMORY_MIB", "NAME_RE", "NETWORK_NAME_MAX", "SIZE_JSON_PATTERN", "STACK_NAME_MAX",
    "STACK_SETTINGS", "STACK_TABLES", "VM", "VM_NAME_MAX", "VM_SETTINGS", "CloudInit",
    "Context", "Disk", "Invalid", "Setting", "Stack", "fill_placeholders", "image_format",
    "json_pattern", "load", "loads", "locate_keys", "parse_size_mib", "placeholder_values",
]
