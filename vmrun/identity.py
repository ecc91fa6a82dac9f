"""What names a stack and where its state is (`Identity`), read without the manifest parser.

ps, down, logs, console, clean, ssh, exec and cp find a stack by its identity: its name,
its state directory and its VMs' names.  `load_identity` reads them with tomllib and the
few keys that decide them (`name`, `state_dir`, the [vm.NAME] tables and their `count`),
so `vmrun ps` starts without loading the settings table, the converters and the checks
across VMs (vmrun/manifest.py: about 45 ms of imports).

It answers only when the answer is plain: every one of these values is valid as it is
written, none holds a ${VAR}, and the paths are usable.  Anything else (an error to
report, an interpolation, an odd path) goes to manifest.loads_identity, which then
decides and words the error, so the two cannot disagree (tests/test_identity.py compares
them on every manifest the tests and examples have).
"""

from __future__ import annotations

import os
from pathlib import Path

from vmrun.errors import UsageError
from vmrun.layout import MANIFEST_NAMES, StackPaths
from vmrun.limits import MAX_COUNT, MAX_VMS, NAME_RE, STACK_NAME_MAX, VM_NAME_MAX
from vmrun.record import Record
from vmrun.sourcefile import read_manifest
from vmrun.tomlkeys import parse_toml
from vmrun.xmltext import xml_unsafe

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class Identity(Record):  # a frozen value class (vmrun/record.py)
    """What names a stack and where its state is: enough to find and stop what runs."""

    path: Path  # resolved
    name: str
    state_dir: Path  # the stack's own directory: <state_dir>/<name>, as Stack.state_dir
    vm_names: tuple[str, ...]  # with the copies of `count`: NAME-1 ... NAME-N

    def __init__(self, path: Path, name: str, state_dir: Path,
                 vm_names: tuple[str, ...]) -> None:
        self._set(path=path, name=name, state_dir=state_dir, vm_names=vm_names)

    @property
    def paths(self) -> StackPaths:
        return StackPaths(self.state_dir)


def find_manifest(cwd: Path) -> Path:
    """`stack.toml`, else `vmrun.toml` in `cwd`; UsageError when neither is there."""
    for name in MANIFEST_NAMES:
        if (cwd / name).exists():
            return cwd / name
    raise UsageError(f"no {' or '.join(MANIFEST_NAMES)} in {cwd}",
                     hint="give the manifest's path, e.g. vmrun up path/to/stack.toml")


def load_identity(path: str | os.PathLike[str],
                  state_dir: str | os.PathLike[str] | None = None) -> Identity:
    """As manifest.load_identity (the same Identity, the same errors), in less time."""
    path = Path(path)
    source = read_manifest(path)
    data, lines = parse_toml(source, path)
    identity = plain_identity(data, path, state_dir)
    if identity is not None:
        return identity
    from vmrun import manifest

    return manifest.loads_identity(source, path, state_dir=state_dir, parsed=(data, lines))


def _name_ok(value: Any, longest: int) -> bool:
    return isinstance(value, str) and bool(NAME_RE.match(value)) and len(value) <= longest


def _resolve(path: Path) -> Path | None:
    try:
        return path.resolve()
    except (RuntimeError, OSError, ValueError):  # as convert.resolve; it words the error
        return None


def plain_identity(data: dict[str, Any], path: Path,
                   override: str | os.PathLike[str] | None) -> Identity | None:
    """The identity the parsed manifest `data` gives when it is plain (see the module),
    else None: manifest.loads_identity decides then."""
    resolved = _resolve(path)
    if resolved is None or xml_unsafe(str(resolved.parent)) is not None:
        return None
    name = data["name"] if "name" in data else path.name.removesuffix(".toml")
    if not _name_ok(name, STACK_NAME_MAX):
        return None
    if override is not None:
        try:
            root = _resolve(Path(override))
        except (TypeError, ValueError):
            return None
    else:
        configured = data.get("state_dir", ".vmrun")
        if not isinstance(configured, str) or "$" in configured or \
                xml_unsafe(configured) is not None:
            return None
        try:
            root = _resolve(resolved.parent / os.path.expanduser(configured))
        except ValueError:
            return None
    if root is None or xml_unsafe(str(root / name)) is not None:
        return None

    vm_tables = data.get("vm", {})
    defaults = data.get("defaults", {})
    if not isinstance(vm_tables, dict) or not isinstance(defaults, dict):
        return None
    names: list[str] = []
    for group, table in vm_tables.items():
        if not _name_ok(group, VM_NAME_MAX) or not isinstance(table, dict):
            return None
        if "count" not in table and "count" not in defaults:
            names.append(group)
            continue
        count = table["count"] if "count" in table else defaults["count"]
        if isinstance(count, bool) or not isinstance(count, int) or \
                not 1 <= count <= MAX_COUNT or len(f"{group}-{count}") > VM_NAME_MAX:
            return None
        names += [f"{group}-{index}" for index in range(1, count + 1)]
    if len(names) > MAX_VMS:
        return None
    return Identity(path=resolved, name=name, state_dir=root / name,
                    vm_names=tuple(dict.fromkeys(names)))
