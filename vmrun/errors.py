"""Errors a user can cause, and the exit status each one maps to.

Only the CLI prints errors and chooses exit codes; everything below it raises a
`VmrunError` subclass that says where (file, line, key), what was expected, what was
found, and how to fix it where a hint helps.
"""

from __future__ import annotations

import re

from vmrun.record import Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable
    from pathlib import Path

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_HOST = 3


# What a terminal could take for a command, or that would break a message's line: C0 and
# C1 controls (ESC, CSI), DEL, lone surrogates, line and paragraph separators, bidi controls.
# Compiled (and cached by `re`) when a message is first made, not at every start.
_UNPRINTABLE = ("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff"
                "\ufeff\ufffe\uffff]")
_SHORT = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def printable(text: str, keep: str = "") -> str:
    r"""`text` with control characters escaped as repr() does (`\x1b`, `\n`, `\u202e`),
    except those in `keep`: input echoed in a message never drives the user's terminal."""

    def escape(match: re.Match[str]) -> str:
        char = match.group()
        if char in keep:
            return char
        if char in _SHORT:
            return _SHORT[char]
        code = ord(char)
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"

    return re.sub(_UNPRINTABLE, escape, text)


class Problem(Record, frozen=False):
    """One thing wrong with a manifest, located as precisely as is known."""

    message: str
    file: Path | None
    line: int | None
    key: str | None
    expected: str | None
    found: str | None
    hint: str | None

    def __init__(self, message: str, file: Path | None = None, line: int | None = None,
                 key: str | None = None, expected: str | None = None,
                 found: str | None = None, hint: str | None = None) -> None:
        self._set(message=message, file=file, line=line, key=key, expected=expected,
                  found=found, hint=hint)

    def __str__(self) -> str:
        """One line (and a hint line): every part may echo input, so each is escaped."""
        where = ""
        if self.file is not None:
            where = printable(str(self.file))
            if self.line is not None:
                where += f":{self.line}"
            where += ": "
        key = f"{printable(self.key)}: " if self.key else ""
        text = f"{where}{key}{printable(self.message)}"
        if self.expected is not None:
            text += f": expected {printable(self.expected)}"
            if self.found is not None:
                text += f", found {printable(self.found)}"
        elif self.found is not None:
            text += f" (found {printable(self.found)})"
        if self.hint:
            text += f"\n  hint: {printable(self.hint)}"
        return text


class VmrunError(Exception):
    """Base of every error meant for the user; carries its exit status."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def lines(self) -> list[str]:
        """The message for the user, with control characters from input escaped."""
        text = printable(self.message, keep="\n\t")
        if self.hint:
            text += f"\n  hint: {printable(self.hint, keep=chr(10))}"
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
