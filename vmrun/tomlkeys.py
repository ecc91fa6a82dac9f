"""Where each key of a TOML document is, and the document parsed with located errors.

tomllib gives neither the lines of keys nor a bound on nesting.  A scanner that never
recurses finds both: `locate_keys` returns the lines, and `parse_toml` refuses nesting
that would exhaust tomllib's recursion before it parses, and turns tomllib's errors into
a ManifestError with a line.  `line_of` looks a key's line up.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vmrun.errors import ManifestError, Problem

MAX_NESTING = 20  # levels of tables, keys and arrays; a manifest needs 5


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


# --- parsing -----------------------------------------------------------------------------

_TOML_POS_RE = re.compile(r"\s*\(at line (\d+), column (\d+)\)")
_TOML_END_RE = re.compile(r"\s*\(at end of document\)")
_LONG_NUMBER_RE = re.compile(r"[0-9_]{4301,}")


def parse_toml(source: str, path: Path) -> tuple[dict[str, Any], dict[tuple[str, ...], int]]:
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

