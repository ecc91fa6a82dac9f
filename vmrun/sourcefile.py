"""Reading files vmrun is given: regular files only, and only up to a size cap.

The manifest, the `.env` beside it (vmrun/interpolate.py) and the first bytes of disk
images (vmrun/fileconvert.py) are read through `open_regular`: devices are never opened,
FIFOs never block, and nothing is read past its cap.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from vmrun.errors import ManifestError, Problem

MANIFEST_MAX = 1 << 20  # bytes


class Unreadable(Exception):
    """A file vmrun will not read (not a regular file, too large) or cannot read."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@contextlib.contextmanager
def open_regular(path: Path) -> Iterator[int]:
    """A file descriptor of the regular file `path`.

    Raises FileNotFoundError when it does not exist and Unreadable for anything else that
    is wrong.  Devices are never opened (opening some has effects), and a FIFO swapped in
    after the check does not block (O_NONBLOCK) and is refused by fstat.
    """
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise Unreadable("not a regular file")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise Unreadable(exc.strerror or str(exc)) from None
    except ValueError:  # a NUL in the path
        raise Unreadable("the path contains a NUL character") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise Unreadable("not a regular file")
        yield fd
    finally:
        os.close(fd)


def read_regular(path: Path, limit: int) -> bytes:
    """The contents of the regular file `path`, refused when larger than `limit` bytes."""
    chunks: list[bytes] = []
    size = 0
    with open_regular(path) as fd:
        while True:
            try:
                chunk = os.read(fd, min(1 << 16, limit + 1 - size))
            except OSError as exc:  # EIO from /proc/self/mem, EISDIR, ...
                raise Unreadable(exc.strerror or str(exc)) from None
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise Unreadable(f"larger than {limit // 1024} KiB")


def not_utf8(path: Path, exc: UnicodeDecodeError, what: str) -> Problem:
    """The problem of a file that is not UTF-8, at the line and column of the bad byte."""
    before = exc.object[:exc.start]
    column = exc.start - (before.rfind(b"\n") + 1) + 1
    return Problem(f"{what} is not UTF-8 text", file=path, line=before.count(b"\n") + 1,
                   found=f"the byte 0x{exc.object[exc.start]:02x} (column {column})")


def read_manifest(path: Path) -> str:
    """The manifest's text; ManifestError when it is missing, unreadable or not UTF-8."""
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
        raise ManifestError([not_utf8(path, exc, "the manifest")]) from None
