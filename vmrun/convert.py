"""The converters of the settings table (vmrun/settings.py), and what they share.

A converter takes the TOML value and returns the checked, typed value, or raises
`Invalid` saying what was expected.  The converters of settings that name files (kernel,
disks, cloud_init) are in vmrun/fileconvert.py.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmrun.limits import (
    ACCELS,
    DEPENDENCY_CONDITIONS,
    MAX_COUNT,
    MAX_CPUS,
    MAX_NETWORKS,
    MAX_RESTARTS,
    MAX_SECONDS,
    MAX_VMS,
    MIN_MEMORY_MIB,
    NAME_RE,
    STACK_NAME_MAX,
)
from vmrun.record import Record
from vmrun.xmltext import xml_unsafe as xml_unsafe

if TYPE_CHECKING:
    from vmrun import network
    from vmrun.watch import PatternError

# Imported where used, not here: difflib, vmrun.network, and vmrun.watch (with RE2 and
# vmrun.protocol), which a manifest without patterns or forwards never needs.


class Invalid(Exception):
    """Raised by a converter: the value has the wrong type or is out of range."""

    def __init__(self, expected: str, hint: str | None = None, found: str | None = None,
                 where: str = "") -> None:
        super().__init__(expected)
        self.expected = expected
        self.hint = hint
        self.found = found  # what was found, when not the whole value
        self.where = where  # the part of the value at fault, e.g. "[2].image"


class Context(Record):  # a frozen value class (vmrun/record.py)
    """What converters need to know besides the value."""

    base_dir: Path
    host_memory_mib: int

    def __init__(self, base_dir: Path, host_memory_mib: int) -> None:
        self._set(base_dir=base_dir, host_memory_mib=host_memory_mib)


Converter = Callable[[Any, Context], Any]


def did_you_mean(key: str, known: list[str]) -> str | None:
    import difflib

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


def string(value: Any, ctx: Context) -> str:
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


def accel(value: Any, ctx: Context) -> str:
    if value not in ACCELS:
        raise Invalid("one of " + ", ".join(f'"{a}"' for a in ACCELS))
    return str(value)


def seconds(value: Any, ctx: Context) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Invalid("a number of seconds")
    if not 0 < value <= MAX_SECONDS:
        raise Invalid(f"a number of seconds greater than 0 and at most {MAX_SECONDS}")
    return float(value)


def cpus(value: Any, ctx: Context) -> int:
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


# The sizes parse_size_mib accepts, as a JSON Schema pattern (see vmrun/settings.py).
_UNITS = "".join(_SIZE_FACTOR)  # JSON Schema patterns have no flags: spell out both cases
SIZE_JSON_PATTERN = rf"^\s*\d+\s*[{_UNITS}{_UNITS.lower()}]?(?:[iI]?[bB])?\s*$"


def memory(value: Any, ctx: Context) -> int:
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


RE2_SYNTAX = "RE2 syntax (Python `re` syntax without backreferences or lookaround)"
_LOOKAROUND = ("(?=", "(?!", "(?<=", "(?<!")


def _pattern_hint(pattern: str, exc: PatternError) -> str:
    if exc.size is not None:
        return ("large counted repetitions (.{0,300}, \\w{1000}) and Unicode classes (\\pL) "
                "make large programs: count less, or use * and + instead")
    reason = exc.reason
    if any(f"operator: {op}" in reason for op in _LOOKAROUND) or "(?P=" in pattern or any(
            f"escape sequence: \\{digit}" in reason for digit in "123456789"):
        return ("patterns are matched in linear time, without backtracking, so there are "
                "no backreferences or lookaround: match the text itself instead")
    if "escape sequence: \\Z" in reason:
        return "write $ (or \\z) for the end of the line"
    return "RE2's syntax: https://github.com/google/re2/wiki/Syntax"


def regex(value: Any, ctx: Context) -> str:
    """A pattern for console lines: it must compile with RE2, as the driver matches it
    (vmrun/watch.py), within the size that keeps a match cheap."""
    from vmrun.watch import MAX_PATTERN_PROGRAM, PatternError, compile_pattern

    if not isinstance(value, str) or not value:
        raise Invalid(f"a non-empty regular expression in {RE2_SYNTAX}")
    try:
        compile_pattern(value)
    except PatternError as exc:
        if exc.size is not None:
            expected = (f"a regular expression of at most {MAX_PATTERN_PROGRAM} RE2 "
                        f"instructions (this one has {exc.size})")
        else:
            expected = f"a regular expression in {RE2_SYNTAX}; RE2 says: {exc.reason}"
        raise Invalid(expected, hint=_pattern_hint(value, exc)) from None
    return value


def count(value: Any, ctx: Context) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_COUNT:
        raise Invalid(f"a whole number of copies from 1 to {MAX_COUNT}")
    return value


def depends_on(value: Any, ctx: Context) -> tuple[tuple[str, str], ...]:
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


def boolean(value: Any, ctx: Context) -> bool:
    if not isinstance(value, bool):
        raise Invalid("true or false")
    return value


def choice(*choices: str) -> Converter:
    """A converter accepting one of `choices` (strings)."""
    def convert(value: Any, ctx: Context) -> str:
        if not isinstance(value, str) or value not in choices:
            raise Invalid(" or ".join(f'"{c}"' for c in choices))
        return value
    return convert


def nat(value: Any, ctx: Context) -> bool | str:
    """nat = false | true | "no-host" (truthy when the VM has NAT)."""
    if isinstance(value, bool):
        return value
    if value == "no-host":
        return "no-host"
    raise Invalid('true, false or "no-host"')


def restart_max(value: Any, ctx: Context) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or \
            not 0 <= value <= MAX_RESTARTS:
        raise Invalid(f"a whole number of restarts from 0 to {MAX_RESTARTS}")
    return value


def network_names(value: Any, ctx: Context) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise Invalid('an array of network names, e.g. ["lan"]')
    if len(set(value)) != len(value):
        raise Invalid("each network once")
    if len(value) > MAX_NETWORKS:
        raise Invalid(f"at most {MAX_NETWORKS} networks")
    return tuple(value)


def forwards(value: Any, ctx: Context) -> tuple[network.Forward, ...]:
    from vmrun import network

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


def xml_devices(value: Any, ctx: Context) -> str:
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
