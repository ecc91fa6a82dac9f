"""Errors a user can cause, and the exit status each one maps to.

Only the CLI prints errors and chooses exit codes; everything below it raises a
`VmrunError` subclass that says where (file, line, key), what was expected, what was
found, and how to fix it where a hint helps.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_HOST = 3


@dataclass
class Problem:
    """One thing wrong with a manifest, located as precisely as is known."""

    message: str
    file: Path | None = None
    line: int | None = None
    key: str | None = None
    expected: str | None = None
    found: str | None = None
    hint: str | None = None

    def __str__(self) -> str:
        where = ""
        if self.file is not None:
            where = str(self.file)
            if self.line is not None:
                where += f":{self.line}"
            where += ": "
        key = f"{self.key}: " if self.key else ""
        text = f"{where}{key}{self.message}"
        if self.expected is not None:
            text += f": expected {self.expected}"
            if self.found is not None:
                text += f", found {self.found}"
        elif self.found is not None:
            text += f" (found {self.found})"
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text


class VmrunError(Exception):
    """Base of every error meant for the user; carries its exit status."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def lines(self) -> list[str]:
        text = self.message
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return [text]


class UsageError(VmrunError):
    """Bad command line or bad manifest: nothing was started or written."""

    exit_code = EXIT_USAGE


class ManifestError(UsageError):
    """One or more problems in a manifest, each reported on its own."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    def lines(self) -> list[str]:
        return [str(p) for p in self.problems]


class HostError(VmrunError):
    """The host cannot run the stack (missing software, KVM, lock, state dir)."""

    exit_code = EXIT_HOST
