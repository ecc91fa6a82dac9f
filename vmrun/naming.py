"""What names a stack, its state and its VMs: the stack's name (by default from the file
name), its state directory, the [vm.NAME] table names and their copies (`count`).

load() and load_identity() (vmrun/manifest.py) determine them with these same functions,
so the two cannot disagree.
"""

from __future__ import annotations

import os
from pathlib import Path

from vmrun.collect import Collector
from vmrun.convert import Context, Invalid, describe, resolve, stack_name, xml_unsafe
from vmrun.limits import MAX_VMS, NAME_RE, VM_NAME_MAX


def default_name(col: Collector, path: Path, ctx: Context) -> str | None:
    stem = path.name.removesuffix(".toml")
    try:
        return stack_name(stem, ctx)
    except Invalid as exc:
        col.add((), "the stack has no valid name", expected=exc.expected,
                found=f'the file name "{stem}"', hint='set name = "..." in the manifest')
        return None


def stack_dir(col: Collector, base_dir: Path, configured: str,
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


def vm_name_ok(col: Collector, where: tuple[str, ...], name: str) -> bool:
    if NAME_RE.match(name) and len(name) <= VM_NAME_MAX:
        return True
    col.add(where, "invalid VM name",
            expected=f"lower-case letters, digits and '-', starting with a letter, "
                     f"at most {VM_NAME_MAX} characters",
            found=f'"{name}"')
    return False


def copy_names(col: Collector, where: tuple[str, ...], group: str, counted: bool,
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


def too_many_vms(col: Collector, where: tuple[str, ...]) -> None:
    col.add(where, f"more than {MAX_VMS} VMs", expected=f"at most {MAX_VMS} VMs in a stack, "
            "copies (count) included", hint="split the stack")
