"""Parse and validate a stack manifest (TOML) into frozen dataclasses.

The settings table (vmrun/settings.py) converts each key; this module reads the file,
interpolates ${VAR}, applies [defaults], expands copies (`count`), resolves depends_on,
networks and addresses, and fills cmdline placeholders.  Every problem is collected,
located (file, line, key) and reported together, so a user fixes a manifest in one pass:
a VM with a bad value still takes part in the checks across VMs (dependencies, networks,
forwards, placeholders) that do not depend on that value.

`load_identity` reads only what names a stack and its state (name, state_dir, the VMs'
names), with the same helpers, for verbs that must work on a manifest that no longer
validates.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmrun import interpolate, network
from vmrun.errors import ManifestError, Problem, UsageError
from vmrun.layout import StackPaths
from vmrun.settings import (  # re-exported: the rest of vmrun reads them from here
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
    Unreadable,
    check_xml_text,
    describe,
    did_you_mean,
    image_format,
    json_pattern,
    parse_size_mib,
    read_regular,
    resolve,
    stack_name,
    xml_unsafe,
)

MANIFEST_MAX = 1 << 20  # bytes
MAX_NESTING = 20  # levels of tables, keys and arrays; a manifest needs 5
MAX_PROBLEMS = 100  # listed; then only how many more there are
MANIFEST_NAMES = ("stack.toml", "vmrun.toml")  # what find_manifest looks for


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


@dataclass(frozen=True)
class Identity:
    """What names a stack and where its state is: enough to find and stop what runs."""

    path: Path  # resolved
    name: str
    state_dir: Path  # the stack's own directory: <state_dir>/<name>, as Stack.state_dir
    vm_names: tuple[str, ...]  # with the copies of `count`: NAME-1 ... NAME-N

    @property
    def paths(self) -> StackPaths:
        return StackPaths(self.state_dir)


def line_of(lines: Mapping[tuple[str, ...], int], keypath: tuple[str, ...]) -> int | None:
    """The line of `keypath`, or of the nearest enclosing table that has one."""
    while keypath:
        if keypath in lines:
            return lines[keypath]
        keypath = keypath[:-1]
    return None


# --- locating keys in the source --------------------------------------------------------

_BLANK = re.compile(r"[ \t]*")
_BLANK_LINES = re.compile(r"(?:[ \t\r\n]|#[^\n]*)*")
_KEY_PART = re.compile(r"""([A-Za-z0-9_-]+)|"((?:[^"\\\n]|\\.)*)"|'([^'\n]*)'""")
_BASIC = re.compile(r'"((?:[^"\\\n]|\\.)*)"')
_LITERAL = re.compile(r"'([^'\n]*)'")
_ML_BASIC = re.compile(r'"""(?:[^"\\]|\\[\s\S]|"(?!""))*"{3,5}')
_ML_LITERAL = re.compile(r"'''(?:[^']|'(?!''))*'{3,5}")
_SCALAR = re.compile(r"[^,\]}#\r\n]+")
_ESCAPE = re.compile(r"\\(?:u([0-9A-Fa-f]{4})|U([0-9A-Fa-f]{8})|(.))")
_ESCAPES = {"b": "\b", "t": "\t", "n": "\n", "f": "\f", "r": "\r", '"': '"', "\\": "\\"}


def _unescape(text: str) -> str:
    def replace(match: re.Match[str]) -> str:
        code = match.group(1) or match.group(2)
        if code:
            value = int(code, 16)
            return chr(value) if value <= 0x10FFFF else match.group()
        return _ESCAPES.get(match.group(3), match.group())

    return _ESCAPE.sub(replace, text)


class _TooDeep(Exception):
    pass


class _Scanner:
    """Key paths with their lines, and whether the document nests deeper than MAX_NESTING,
    from TOML text.

    Not a TOML parser: it follows the structure (headers, dotted and quoted keys, strings,
    arrays, inline tables) of text that tomllib accepts.  On anything else it skips to the
    next line; it never fails and never recurses, so it can find nesting that would exhaust
    tomllib's recursion.  It stops at the first place nested deeper than MAX_NESTING.
    """

    def __init__(self, source: str) -> None:
        self.src = source
        self.pos = 0
        self.line = 1
        self.explicit: dict[tuple[str, ...], int] = {}  # headers and keys
        self.implicit: dict[tuple[str, ...], int] = {}  # tables made by [a.b.c] or a.b = 1
        self.depth = 0
        self.deepest_line = 1

    @property
    def lines(self) -> dict[tuple[str, ...], int]:
        return {**self.implicit, **self.explicit}

    def run(self) -> _Scanner:
        table: tuple[str, ...] = ()
        try:
            while self._blank(newlines=True) < len(self.src):
                if self.src[self.pos] == "[":
                    header = self._header()
                    table = header if header is not None else table
                else:
                    key = self._key()
                    if key is not None and self._eat("="):
                        self._record(table + key)
                        self._value(table + key)
                self._skip_line()
        except _TooDeep:
            pass
        return self

    def _blank(self, newlines: bool = False) -> int:
        if self.pos < len(self.src) and self.src[self.pos] not in " \t\r\n#":
            return self.pos
        match = (_BLANK_LINES if newlines else _BLANK).match(self.src, self.pos)
        assert match is not None  # both patterns match the empty string
        self.line += self.src.count("\n", self.pos, match.end())
        self.pos = match.end()
        return self.pos

    def _eat(self, text: str) -> bool:
        self._blank()
        if self.src.startswith(text, self.pos):
            self.pos += len(text)
            return True
        return False

    def _skip_line(self) -> None:
        end = self.src.find("\n", self.pos)
        self.pos = len(self.src) if end < 0 else end  # _blank counts the newline

    def _deepen(self, depth: int) -> None:
        if depth > self.depth:
            self.depth, self.deepest_line = depth, self.line
            if depth > MAX_NESTING:
                raise _TooDeep

    def _record(self, path: tuple[str, ...]) -> None:
        self._deepen(len(path))
        self.explicit.setdefault(path, self.line)
        for end in range(1, len(path)):
            self.implicit.setdefault(path[:end], self.line)

    def _header(self) -> tuple[str, ...] | None:
        double = self.src.startswith("[[", self.pos)
        self.pos += 2 if double else 1
        key = self._key()
        if key is None or not self._eat("]]" if double else "]"):
            return None
        self._record(key)
        return key

    def _key(self) -> tuple[str, ...] | None:
        parts: list[str] = []
        while True:
            self._blank()
            match = _KEY_PART.match(self.src, self.pos)
            if match is None:
                return None
            bare, basic, literal = match.groups()
            parts.append(_unescape(basic) if basic is not None else bare or literal or "")
            self.pos = match.end()
            if not self._eat("."):
                return tuple(parts)

    def _string(self) -> bool:
        for pattern in (_ML_BASIC, _ML_LITERAL, _BASIC, _LITERAL):
            match = pattern.match(self.src, self.pos)
            if match:
                self.line += self.src.count("\n", self.pos, match.end())
                self.pos = match.end()
                return True
        return False

    def _value(self, path: tuple[str, ...]) -> None:
        """Skip the value at `path`, recording the keys of inline tables and the indices
        of array elements; containers are kept on a list, not on the call stack."""
        open_: list[list[Any]] = []  # [bracket, path, index of the current element]
        state = "value"  # or "key" (in an inline table) or "after" (a value ended)
        while True:
            in_array = bool(open_) and open_[-1][0] == "["
            if self._blank(newlines=in_array) >= len(self.src):
                return
            char = self.src[self.pos]
            if state == "key":
                if char == "}":
                    self.pos += 1
                    open_.pop()
                    state = "after"
                    continue
                key = self._key()
                if key is None or not self._eat("="):
                    return
                path = open_[-1][1] + key
                self._record(path)
                state = "value"
            elif state == "value":
                if in_array:
                    if char == "]":  # an empty array, or a trailing comma
                        self.pos += 1
                        open_.pop()
                        state = "after"
                        continue
                    path = open_[-1][1] + (str(open_[-1][2]),)
                    self._record(path)
                if char in "[{":
                    self.pos += 1
                    open_.append([char, path, 0])
                    self._deepen(len(path) + 1)
                    state = "key" if char == "{" else "value"
                    continue
                if char in "\"'":
                    if not self._string():
                        return
                else:
                    match = _SCALAR.match(self.src, self.pos)
                    if not match:
                        return
                    self.pos = match.end()
                state = "after"
            else:
                if not open_:
                    return
                if char == ",":
                    self.pos += 1
                    open_[-1][2] += 1
                    state = "value" if open_[-1][0] == "[" else "key"
                elif char == ("]" if open_[-1][0] == "[" else "}"):
                    self.pos += 1
                    open_.pop()
                else:
                    return


def locate_keys(source: str) -> dict[tuple[str, ...], int]:
    """Map each key path (table headers, keys, keys of inline tables, array elements as
    "0", "1", ...) to the 1-based line defining it.  A table that no header of its own
    declares (the `vm` and `vm.alpha` of `[vm.alpha.disks]`, or of `vm.alpha.cpus = 1`)
    gets the line of its first mention."""
    return _Scanner(source).run().lines


# --- reading -----------------------------------------------------------------------------

def _not_utf8(path: Path, exc: UnicodeDecodeError, what: str) -> Problem:
    before = exc.object[:exc.start]
    column = exc.start - (before.rfind(b"\n") + 1) + 1
    return Problem(f"{what} is not UTF-8 text", file=path, line=before.count(b"\n") + 1,
                   found=f"the byte 0x{exc.object[exc.start]:02x} (column {column})")


def _read_manifest(path: Path) -> str:
    try:
        raw = read_regular(path, MANIFEST_MAX)
    except FileNotFoundError:
        raise ManifestError([Problem("no such manifest file", file=path)]) from None
    except Unreadable as exc:
        raise ManifestError([Problem(f"cannot read the manifest ({exc.reason})",
                                     file=path)]) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError([_not_utf8(path, exc, "the manifest")]) from None


_TOML_POS_RE = re.compile(r"\s*\(at line (\d+), column (\d+)\)")
_TOML_END_RE = re.compile(r"\s*\(at end of document\)")
_LONG_NUMBER_RE = re.compile(r"[0-9_]{4301,}")


def _parse_toml(source: str, path: Path) -> tuple[dict[str, Any], dict[tuple[str, ...], int]]:
    """The TOML data and the lines of its keys; ManifestError for a syntax error, or for
    nesting deeper than MAX_NESTING (which could exhaust the recursion of the parser)."""
    scan = _Scanner(source).run()
    too_deep = Problem("the manifest nests tables, arrays or keys too deeply", file=path,
                       line=scan.deepest_line, expected=f"at most {MAX_NESTING} levels")
    if scan.depth > MAX_NESTING:
        raise ManifestError([too_deep])
    try:
        data = tomllib.loads(source)
    except tomllib.TOMLDecodeError as exc:
        text, line = str(exc), None
        match = _TOML_POS_RE.search(text)
        if match:
            line = int(match.group(1))
            text = _TOML_POS_RE.sub("", text) + f" (column {match.group(2)})"
        elif _TOML_END_RE.search(text):
            line = source.rstrip().count("\n") + 1
            text = _TOML_END_RE.sub("", text) + " (at the end of the file)"
        raise ManifestError([Problem(f"TOML syntax error: {text}", file=path,
                                     line=line)]) from None
    except RecursionError:
        raise ManifestError([too_deep]) from None
    except ValueError as exc:  # an integer of more than 4300 digits
        long = _LONG_NUMBER_RE.search(source)
        raise ManifestError([Problem(
            "TOML syntax error: a number has too many digits", file=path,
            line=source.count("\n", 0, long.start()) + 1 if long else None,
            expected="at most 4300 digits",
            found=f"{len(long.group().replace('_', ''))} digits" if long else str(exc),
        )]) from None
    return data, scan.lines


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


def find_manifest(cwd: Path) -> Path:
    """`stack.toml`, else `vmrun.toml` in `cwd`; UsageError when neither is there."""
    for name in MANIFEST_NAMES:
        if (cwd / name).exists():
            return cwd / name
    raise UsageError(f"no {' or '.join(MANIFEST_NAMES)} in {cwd}",
                     hint="give the manifest's path, e.g. vmrun up path/to/stack.toml")


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
    """The problems found so far: at most MAX_PROBLEMS of them, then only a count."""

    def __init__(self, path: Path, lines: dict[tuple[str, ...], int]) -> None:
        self.path = path
        self.lines = lines
        self.problems: list[Problem] = []
        self.more = 0  # problems beyond MAX_PROBLEMS
        self.broken: set[tuple[str, ...]] = set()  # values already reported as broken

    @property
    def full(self) -> bool:
        return len(self.problems) >= MAX_PROBLEMS

    def line_of(self, keypath: tuple[str, ...]) -> int | None:
        return line_of(self.lines, keypath)

    def append(self, problem: Problem) -> None:
        if self.full:
            self.more += 1
        else:
            self.problems.append(problem)

    def add(self, keypath: tuple[str, ...], message: str, **kw: Any) -> None:
        self.append(Problem(message, file=self.path, line=self.line_of(keypath),
                            key=".".join(keypath) or None, **kw))

    def error(self) -> ManifestError:
        more = [Problem(f"and {self.more} more problem{'s' if self.more > 1 else ''}",
                        file=self.path, hint="fix these first")] if self.more else []
        return ManifestError(self.problems + more)


_BAD = object()  # what _convert returns for a value it reported as invalid
_VM_KEYS = {s.key: s for s in VM_SETTINGS}
_STACK_KEYS = {s.key: s for s in STACK_SETTINGS}


def _convert(col: _Collector, keypath: tuple[str, ...], value: Any, setting: Setting,
             ctx: Context) -> Any:
    """`value` converted by `setting`, or _BAD once the reason is reported.  Every string
    is checked to be text XML can hold, whatever the key: libvirt gets paths, cmdline and
    xml_devices, and any string could end up there."""
    if keypath in col.broken:  # ${VAR} failed: already reported
        return _BAD
    try:
        check_xml_text(value)
        return setting.convert(value, ctx)
    except Invalid as exc:
        in_key = f" in {keypath[-1]}{exc.where}" if exc.where else ""
        col.add(keypath, f"invalid value{in_key}", expected=exc.expected,
                found=exc.found or describe(value), hint=exc.hint)
        return _BAD


def _convert_table(
    col: _Collector,
    where: tuple[str, ...],
    table: dict[str, Any],
    settings: dict[str, Setting],
    ctx: Context,
    extra_keys: tuple[str, ...] = (),
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key in extra_keys or where + (key,) in col.broken:
            continue
        setting = settings.get(key)
        if setting is None:
            col.add(where + (key,), "unknown key",
                    hint=did_you_mean(key, [*settings, *extra_keys]))
            continue
        converted = _convert(col, where + (key,), value, setting, ctx)
        if converted is not _BAD:
            out[key] = converted
    return out


# The few things that name a stack, its state and its VMs: load() and load_identity()
# determine them with these same functions, so the two cannot disagree.

def _default_name(col: _Collector, path: Path, ctx: Context) -> str | None:
    stem = path.name.removesuffix(".toml")
    try:
        return stack_name(stem, ctx)
    except Invalid as exc:
        col.add((), "the stack has no valid name", expected=exc.expected,
                found=f'the file name "{stem}"', hint='set name = "..." in the manifest')
        return None


def _stack_dir(col: _Collector, base_dir: Path, configured: str,
               override: str | os.PathLike[str] | None, name: str) -> Path | None:
    """`<state_dir>/<name>`, resolved (Stack.state_dir); None once a problem is reported."""
    try:
        if override is not None:
            root = resolve(Path(override))
        else:
            root = resolve(base_dir / os.path.expanduser(configured))
    except (Invalid, ValueError) as exc:
        expected = exc.expected if isinstance(exc, Invalid) else "a path without NUL"
        col.add(() if override is not None else ("state_dir",),
                "unusable state directory", expected=expected)
        return None
    stack_dir = root / name
    if xml_unsafe(str(stack_dir)) is not None:
        col.add(() if override is not None else ("state_dir",), "unusable state directory",
                expected="a path libvirt's XML can hold: valid UTF-8, without control "
                         "characters", found=describe(str(stack_dir)))
        return None
    return stack_dir


def _vm_name_ok(col: _Collector, where: tuple[str, ...], name: str) -> bool:
    if NAME_RE.match(name) and len(name) <= VM_NAME_MAX:
        return True
    col.add(where, "invalid VM name",
            expected=f"lower-case letters, digits and '-', starting with a letter, "
                     f"at most {VM_NAME_MAX} characters",
            found=f'"{name}"')
    return False


def _copy_names(col: _Collector, where: tuple[str, ...], group: str, counted: bool,
                count: int) -> list[str] | None:
    """The names of a [vm.NAME] table's VMs: NAME, or NAME-1 ... NAME-N with `count`."""
    if not counted:
        return [group]
    names = [f"{group}-{index}" for index in range(1, count + 1)]
    if len(names[-1]) > VM_NAME_MAX:
        col.add((*where, "count"), f'the copy name "{names[-1]}" is too long',
                expected=f"VM names of at most {VM_NAME_MAX} characters",
                hint="use a shorter [vm.NAME]")
        return None
    return names


def _unique(names: list[str]) -> list[str]:
    return list(dict.fromkeys(names))


def _too_many_vms(col: _Collector, where: tuple[str, ...]) -> None:
    col.add(where, f"more than {MAX_VMS} VMs", expected=f"at most {MAX_VMS} VMs in a stack, "
            "copies (count) included", hint="split the stack")


def load(path: str | os.PathLike[str], state_dir: str | os.PathLike[str] | None = None) -> Stack:
    """Read, parse and validate a manifest; raise ManifestError listing every problem."""
    path = Path(path)
    return loads(_read_manifest(path), path, state_dir=state_dir)


def loads(
    source: str,
    path: Path,
    state_dir: str | os.PathLike[str] | None = None,
    host_memory: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> Stack:
    data, lines = _parse_toml(source, path)
    resolved, base_dir = _base_dir(path)
    ctx = Context(base_dir=base_dir, host_memory_mib=host_memory or host_memory_mib())
    col = _Collector(path, lines)
    data = _interpolate(data, col, base_dir, environ)

    top = _convert_table(col, (), data, _STACK_KEYS, ctx, extra_keys=tuple(STACK_TABLES))
    name = top.get("name") if "name" in data else _default_name(col, path, ctx)

    defaults_raw = data.get("defaults", {})
    defaults: dict[str, Any] = {}
    if not isinstance(defaults_raw, dict):
        col.add(("defaults",), "invalid value", expected="a table", found=describe(defaults_raw))
        defaults_raw = {}
    else:
        defaults = _convert_table(col, ("defaults",), defaults_raw, _VM_KEYS, ctx)
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
            _too_many_vms(col, where)
            unsure.update(list(vm_tables)[number:])
            break
        name_ok = _vm_name_ok(col, where, group)
        if not isinstance(table, dict):
            col.add(where, "invalid value", expected="a table", found=describe(table))
            unsure.add(group)
            continue
        own = _convert_table(col, where, table, _VM_KEYS, ctx)
        values = {**defaults, **own}
        broken = {k for k in table if k in _VM_KEYS and k not in own}
        broken |= defaults_bad - set(table)
        for key in (s.key for s in VM_SETTINGS if s.required and s.key not in values):
            if key not in broken:
                col.add(where, f'missing required key "{key}"',
                        hint=f'add {key} = "..." to [vm.{group}] or to [defaults]')
                broken.add(key)
        names = _copy_names(col, where, group, "count" in table or "count" in defaults,
                            values.get("count", 1)) if name_ok and "count" not in broken else None
        if names is not None and len(vms) + len(names) > MAX_VMS:
            _too_many_vms(col, where)
            unsure.update(list(vm_tables)[number:])
            break
        if names is None:
            unsure.add(group)
            continue
        settings = {s.key: values.get(s.key, s.default) for s in VM_SETTINGS}
        for index, vm_name in enumerate(names, start=1):
            vms.append(VM(name=vm_name, index=index, group=group, **settings))
            bad.setdefault(vm_name, broken)  # of two VMs with one name, the first stays
    _check_duplicates(col, vms)
    _resolve_dependencies(col, vms, vm_tables, bad, unsure)
    networks, declared = _parse_networks(col, data.get("network", {}))
    vms[:] = _attach_networks(col, vms, networks, declared, name or "", bad)
    others_unsure = bool(unsure) or declared != set(networks) or \
        any("networks" in keys for keys in bad.values())
    _fill_cmdlines(col, vms, name or "", networks, bad, others_unsure)

    stack_dir = None
    if name is not None and (state_dir is not None or "state_dir" in top
                             or "state_dir" not in data):
        stack_dir = _stack_dir(col, base_dir, top.get("state_dir", ".vmrun"), state_dir, name)
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
    return loads_identity(_read_manifest(path), path, state_dir=state_dir)


def loads_identity(source: str, path: Path, state_dir: str | os.PathLike[str] | None = None,
                   environ: Mapping[str, str] | None = None) -> Identity:
    data, lines = _parse_toml(source, path)
    resolved, base_dir = _base_dir(path)
    ctx = Context(base_dir=base_dir, host_memory_mib=0)  # no converter used here needs it
    col = _Collector(path, lines)
    scratch = _Collector(path, lines)  # problems of keys that do not matter here
    data = _interpolate(data, scratch, base_dir, environ)

    def value(keypath: tuple[str, ...], raw: Any, setting: Setting) -> Any:
        if keypath in scratch.broken:  # ${VAR} failed for a key that matters
            for problem in scratch.problems:
                if problem.key == ".".join(keypath):
                    col.append(problem)
            return _BAD
        return _convert(col, keypath, raw, setting, ctx)

    name = (value(("name",), data["name"], _STACK_KEYS["name"]) if "name" in data
            else _default_name(col, path, ctx))
    configured = ".vmrun"
    if "state_dir" in data and state_dir is None:
        configured = value(("state_dir",), data["state_dir"], _STACK_KEYS["state_dir"])
    stack_dir = None
    if name not in (None, _BAD) and configured is not _BAD:
        stack_dir = _stack_dir(col, base_dir, configured, state_dir, name)

    vm_tables = data.get("vm", {})
    defaults = data.get("defaults", {})
    defaults = defaults if isinstance(defaults, dict) else {}
    names: list[str] = []
    for group, table in (vm_tables.items() if isinstance(vm_tables, dict) else ()):
        where = ("vm", group)
        if not _vm_name_ok(col, where, group):
            continue
        if not isinstance(table, dict):
            col.add(where, "invalid value", expected="a table", found=describe(table))
            continue
        count, counted = 1, "count" in table or "count" in defaults
        if counted:
            keypath = (*where, "count") if "count" in table else ("defaults", "count")
            raw = table["count"] if "count" in table else defaults["count"]
            count = value(keypath, raw, _VM_KEYS["count"])
        if count is not _BAD:
            names += _copy_names(col, where, group, counted, count) or []
        if len(names) > MAX_VMS:
            _too_many_vms(col, where)
            break
    if col.problems or stack_dir is None or not isinstance(name, str):
        raise col.error()
    return Identity(path=resolved, name=name, state_dir=stack_dir,
                    vm_names=tuple(_unique(names)))


def _interpolate(data: dict[str, Any], col: _Collector, base_dir: Path,
                 environ: Mapping[str, str] | None) -> dict[str, Any]:
    """Apply ${VAR} interpolation (environment first, then .env beside the manifest)."""
    env_path = base_dir / ".env"
    env_file: dict[str, str] = {}
    try:
        env_file, errors = interpolate.read_env_file(env_path)
    except Unreadable as exc:
        col.append(Problem(f"cannot read .env ({exc.reason})", file=env_path))
        errors = []
    except UnicodeDecodeError as exc:
        col.append(_not_utf8(env_path, exc, "the .env file"))
        errors = []
    for number, text in errors:
        col.append(Problem("invalid line in .env", file=env_path, line=number,
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


class UnknownPlaceholder(Invalid):
    def __init__(self, expected: str, placeholder: str) -> None:
        super().__init__(expected)
        self.placeholder = placeholder


def fill_placeholders(text: str, values: Mapping[str, str]) -> str:
    """Replace {vm.name}-style placeholders; {{ and }} are literal braces."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) in ("{{", "}}"):
            return match.group(0)[0]
        key = match.group(1)
        if key not in values:
            own = [k for k in values if not (k.startswith("vm.") and k.count(".") > 1)]
            raise UnknownPlaceholder(
                "known placeholders only: " + ", ".join(f"{{{k}}}" for k in own)
                + (", {vm.OTHER.net.NAME.ip}" if len(own) < len(values) else "")
                + f" (found {{{key}}}; write {{{{ and }}}} for literal braces)", key)
        return values[key]

    return _PLACEHOLDER_RE.sub(replace, text)


def _check_duplicates(col: _Collector, vms: list[VM]) -> None:
    seen: dict[str, str] = {}
    for vm in list(vms):
        if vm.name in seen:
            col.add(("vm", vm.group), f'two VMs are named "{vm.name}"',
                    found=f"[vm.{seen[vm.name]}] and [vm.{vm.group}]",
                    hint="rename one table (copies of a table with count are named NAME-N)")
            vms.remove(vm)
        seen.setdefault(vm.name, vm.group)


def _parse_networks(col: _Collector, tables: Any) -> tuple[dict[str, network.Network], set[str]]:
    """The networks, and the names of every [network.NAME] table, valid or not."""
    if not isinstance(tables, dict):
        col.add(("network",), "invalid value", expected="tables [network.NAME]",
                found=describe(tables))
        return {}, set()
    subnets: dict[str, Any] = {}
    for number, (name, table) in enumerate(tables.items()):
        where = ("network", name)
        if number >= MAX_NETWORKS:
            col.add(where, f"more than {MAX_NETWORKS} networks",
                    expected=f"at most {MAX_NETWORKS} networks in a stack")
            break
        if not NAME_RE.match(name) or len(name) > NETWORK_NAME_MAX:
            col.add(where, "invalid network name",
                    expected=f"lower-case letters, digits and '-', starting with a letter, "
                             f"at most {NETWORK_NAME_MAX} characters", found=f'"{name}"')
            continue
        if not isinstance(table, dict):
            col.add(where, "invalid value", expected="a table", found=describe(table))
            continue
        if where in col.broken:  # ${VAR} failed
            continue
        for key in (k for k in table if k != "subnet"):
            col.add((*where, key), "unknown key", hint=did_you_mean(key, ["subnet"]))
        subnets[name] = None
        if "subnet" in table:
            value = table["subnet"]
            try:
                if not isinstance(value, str):
                    raise ValueError("an IPv4 subnet like 10.77.0.0/24, as a string")
                subnet = network.parse_subnet(value)
            except ValueError as exc:
                col.add((*where, "subnet"), "invalid value", expected=str(exc),
                        found=describe(value))
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
        return {}, set(tables)
    defaults = dict(zip(wanted, free, strict=True))
    return ({name: network.Network(name, subnet or defaults[name])
             for name, subnet in subnets.items()}, set(tables))


def _attach_networks(col: _Collector, vms: list[VM], networks: dict[str, network.Network],
                     declared: set[str], stack_name: str, bad: dict[str, set[str]]) -> list[VM]:
    """Check each VM's networks and forwards, and give it its addresses.  A VM whose
    `networks` or `forward` is invalid (already reported) is checked as far as it can be."""
    members: dict[str, list[str]] = {}
    ports: dict[tuple[str, int], str] = {}
    reported: set[str] = set()
    unknown: set[tuple[str, str]] = set()  # (network, table) reported, once for all copies
    for vm in vms:
        where = ("vm", vm.group, "networks")
        nets_ok = "networks" not in bad[vm.name]
        for name in vm.networks if nets_ok else ():
            if name not in declared:
                if (name, vm.group) not in unknown and not col.full:
                    col.add(where, f'unknown network "{name}"',
                            expected="the name of a [network.NAME] table",
                            hint=did_you_mean(name, list(declared)) or
                            f"declare it: [network.{name}]")
                unknown.add((name, vm.group))
            elif name in networks:
                members.setdefault(name, []).append(vm.name)
        for forward in vm.forward if nets_ok and "forward" not in bad[vm.name] else ():
            key = (forward.host_address, forward.host_port)
            if not vm.networks:
                if ("", vm.group) not in unknown:  # once for the table
                    col.add(("vm", vm.group, "forward"), "a forward needs a network",
                            hint='attach the VM to a network: networks = ["lan"] and a '
                                 "[network.lan] table")
                unknown.add(("", vm.group))
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
        networks.clear()  # no addresses: placeholders that need them are not checked
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
                   networks: dict[str, network.Network], bad: dict[str, set[str]],
                   others_unsure: bool) -> None:
    """Fill in each cmdline's placeholders.  An unknown placeholder that might be known
    once other problems are fixed ({net.NAME.ip} of an invalid network, say) is not
    reported."""
    reported: set[str] = set()
    others: dict[str, str] = {}  # {vm.OTHER.net.NAME.ip} etc.: other VMs' addresses
    for vm in vms:
        for address in vm.addresses:
            prefix = f"vm.{vm.name}.net.{address.network}."
            others[prefix + "ip"] = str(address.ip)
            others[prefix + "cidr"] = address.cidr
            others[prefix + "mac"] = address.mac
    for i, vm in enumerate(vms):
        if "cmdline" in bad[vm.name]:
            continue
        try:
            cmdline = fill_placeholders(vm.cmdline,
                                        placeholder_values(vm, stack_name, networks) | others)
        except UnknownPlaceholder as exc:
            key = exc.placeholder
            unsure = (key.startswith("vm.") and others_unsure) or (
                key.startswith("net.") and ("networks" in bad[vm.name] or any(
                    key.startswith(f"net.{n}.") for n in vm.networks if n not in networks)))
            if vm.group not in reported and not unsure:
                col.add(("vm", vm.group, "cmdline"), "invalid placeholder",
                        expected=exc.expected)
                reported.add(vm.group)
            continue
        vms[i] = VM(**{**vm.__dict__, "cmdline": cmdline})


def _resolve_dependencies(col: _Collector, vms: list[VM], vm_tables: dict[str, Any],
                          bad: dict[str, set[str]], unsure: set[str]) -> None:
    """Turn depends_on names (tables or copies) into VM names; reject unknowns and cycles.

    A name that may be one of the `unsure` tables' VMs (a table with an invalid name or
    count, already reported) is not called unknown.
    """
    groups: dict[str, list[str]] = {}
    for vm in vms:
        groups.setdefault(vm.group, []).append(vm.name)
    names = {vm.name for vm in vms}
    resolved: dict[str, tuple[tuple[str, str], ...]] = {}
    reported: set[tuple[tuple[str, ...], str]] = set()
    for i, vm in enumerate(vms):
        if "depends_on" in bad[vm.name]:
            continue
        where: tuple[str, ...] = ("vm", vm.group, "depends_on")
        if "depends_on" not in vm_tables[vm.group]:
            where = ("defaults", "depends_on")
        deps: list[tuple[str, str]] = []
        for target, condition in dict.fromkeys(vm.depends_on):
            if target in groups:
                members = groups[target]
            elif target in names:
                members = [target]
            else:
                group, _, index = target.rpartition("-")
                maybe = target in unsure or (group in unsure and index.isdigit())
                if (where, target) not in reported and not maybe and not col.full:
                    col.add(where, f'unknown VM "{target}"', expected="the name of a "
                            "[vm.NAME] table or of one of its copies",
                            hint=did_you_mean(target, [*groups, *names]))
                reported.add((where, target))
                continue
            deps += [(m, condition) for m in members]
        deps = list(dict.fromkeys(deps))
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
    """A cycle of `graph` as [a, b, ..., a], found depth first (without recursion)."""
    done: set[str] = set()
    for start in graph:
        if start in done:
            continue
        path: list[str] = [start]
        on_path = {start}
        todo = [iter(graph.get(start, []))]
        while todo:
            nxt = next(todo[-1], None)
            if nxt is None:
                node = path.pop()
                on_path.discard(node)
                done.add(node)
                todo.pop()
                continue
            if nxt in on_path:
                return path[path.index(nxt):] + [nxt]
            if nxt not in done:
                path.append(nxt)
                on_path.add(nxt)
                todo.append(iter(graph.get(nxt, [])))
    return None


__all__ = [
    "ACCELS", "DEPENDENCY_CONDITIONS", "DISK_FORMATS", "MANIFEST_MAX", "MAX_CPUS",
    "MAX_NESTING", "MAX_NETWORKS", "MAX_PROBLEMS", "MAX_SECONDS", "MAX_VMS",
    "MIN_MEMORY_MIB", "NAME_RE", "NETWORK_NAME_MAX",
    "SIZE_JSON_PATTERN", "STACK_NAME_MAX", "STACK_SETTINGS", "STACK_TABLES", "VM",
    "VM_NAME_MAX", "VM_SETTINGS", "CloudInit", "Context", "Disk", "Identity", "Invalid",
    "Setting", "Stack", "UnknownPlaceholder", "fill_placeholders", "find_manifest",
    "image_format", "json_pattern", "load", "load_identity", "loads", "loads_identity",
    "locate_keys", "parse_size_mib", "placeholder_values",
]
