"""`${VAR}` interpolation in manifest strings, as docker compose does it.

Values come from the environment and, where it lacks them, from a `.env` file beside the
manifest.  Forms: `${VAR}`, `${VAR:-default}` (default when unset or empty),
`${VAR-default}` (default when unset), and `$$` for a literal `$`.  Interpolation runs on
parsed TOML strings (never on the raw text), so a value can hold any character.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from vmrun.settings import read_regular

_TOKEN = re.compile(r"\$(?:(\$)|\{([^}]*)\}|(\{[^}]*$))")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class InterpolationError(Exception):
    def __init__(self, message: str, variable: str | None = None) -> None:
        super().__init__(message)
        self.variable = variable


ENV_FILE_MAX = 1 << 20  # bytes


def read_env_file(path: Path) -> tuple[dict[str, str], list[tuple[int, str]]]:
    """KEY=VALUE lines (optional `export `, quotes, `#` comments); returns (values, errors).

    A missing file is empty.  Only a regular file of at most ENV_FILE_MAX bytes is read:
    anything else raises settings.Unreadable, and text that is not UTF-8 raises
    UnicodeDecodeError, for the caller to report.
    """
    values: dict[str, str] = {}
    errors: list[tuple[int, str]] = []
    try:
        raw = read_regular(path, ENV_FILE_MAX)
    except FileNotFoundError:
        return values, errors
    text = raw.decode("utf-8")
    for number, entry in enumerate(text.split("\n"), start=1):
        line = entry.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not _NAME.match(key):
            errors.append((number, entry.rstrip("\r")))
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        values[key] = value
    return values, errors


def substitute(text: str, lookup: Callable[[str], str | None]) -> str:
    """Interpolate one string; raise InterpolationError for a bad or undefined variable."""

    def replace(match: re.Match[str]) -> str:
        if match.group(1):
            return "$"
        if match.group(3) is not None:
            raise InterpolationError(f'unterminated "${match.group(3)}"')
        body = match.group(2)
        name, default, mode = body, None, ""
        for separator in (":-", "-"):
            if separator in body:
                name, default = body.split(separator, 1)
                mode = separator
                break
        if not _NAME.match(name):
            raise InterpolationError(f'invalid variable name in "${{{body}}}"')
        value = lookup(name)
        if mode == ":-" and not value:
            return default or ""
        if mode == "-" and value is None:
            return default or ""
        if value is None:
            raise InterpolationError(f'variable "{name}" is not set and has no default',
                                     variable=name)
        return value

    return _TOKEN.sub(replace, text)


def walk(data: Any, lookup: Callable[[str], str | None],
         on_error: Callable[[tuple[str, ...], InterpolationError], None],
         path: tuple[str, ...] = ()) -> Any:
    """Interpolate every string in parsed TOML data; report each error with its key path."""
    if isinstance(data, str):
        try:
            return substitute(data, lookup)
        except InterpolationError as exc:
            on_error(path, exc)
            return data
    if isinstance(data, dict):
        return {k: walk(v, lookup, on_error, (*path, k)) for k, v in data.items()}
    if isinstance(data, list):
        return [walk(v, lookup, on_error, (*path, str(i))) for i, v in enumerate(data)]
    return data


def make_lookup(environ: Mapping[str, str], env_file: Mapping[str, str]
                ) -> Callable[[str], str | None]:
    def lookup(name: str) -> str | None:
        if name in environ:
            return environ[name]
        return env_file.get(name)

    return lookup
