"""Collecting a manifest's problems, and the steps that report them value by value.

A `Collector` keeps every located problem (file, line, key), up to MAX_PROBLEMS, so a
user fixes a manifest in one pass.  ${VAR} interpolation and the conversion of each value
by its setting (vmrun/settings.py) report into it and mark what they found broken, so
later checks neither repeat nor contradict them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vmrun import interpolate
from vmrun.convert import Context, Invalid, check_xml_text, describe, did_you_mean
from vmrun.errors import ManifestError, Problem
from vmrun.settings import Setting
from vmrun.sourcefile import Unreadable, not_utf8
from vmrun.tomlkeys import line_of

MAX_PROBLEMS = 100  # listed; then only how many more there are


class Collector:
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


BAD = object()  # what convert_value returns for a value it reported as invalid


def convert_value(col: Collector, keypath: tuple[str, ...], value: Any, setting: Setting,
                  ctx: Context) -> Any:
    """`value` converted by `setting`, or BAD once the reason is reported.  Every string
    is checked to be text XML can hold, whatever the key: libvirt gets paths, cmdline and
    xml_devices, and any string could end up there."""
    if keypath in col.broken:  # ${VAR} failed: already reported
        return BAD
    try:
        check_xml_text(value)
        return setting.convert(value, ctx)
    except Invalid as exc:
        in_key = f" in {keypath[-1]}{exc.where}" if exc.where else ""
        col.add(keypath, f"invalid value{in_key}", expected=exc.expected,
                found=exc.found or describe(value), hint=exc.hint)
        return BAD


def convert_table(
    col: Collector,
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
        converted = convert_value(col, where + (key,), value, setting, ctx)
        if converted is not BAD:
            out[key] = converted
    return out


def interpolate_values(data: dict[str, Any], col: Collector, base_dir: Path,
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
        col.append(not_utf8(env_path, exc, "the .env file"))
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
