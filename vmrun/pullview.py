"""What `vmrun pull` and `vmrun up` show while images are fetched (vmrun/images.py).

A line per image on the given stream (`pulled URL (N MiB)`, `cached URL`), and only when
standard error is a terminal, a rich progress bar there; otherwise plain
`vmrun: pulling URL (N MiB)` lines.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, TextIO

from vmrun.errors import printable

MIB = 1024 * 1024


class ImageProgress:
    """What images.localize reports: a line per image on `out` (`pulled URL (N MiB)`,
    `cached URL`) and, only when stderr is a terminal, a rich progress bar there."""

    def __init__(self, out: TextIO, cached_lines: bool) -> None:
        self.out, self.cached_lines = out, cached_lines
        self.tty = sys.stderr.isatty()
        self.bar: Any = None  # rich.progress.Progress, imported when first needed
        self.task: Any = None

    def _line(self, text: str, out: TextIO) -> None:
        text = ("vmrun: " if out is sys.stderr else "") + printable(text)
        if self.bar is not None and out.isatty():
            self.bar.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=out, flush=True)

    def waiting(self, url: str) -> None:
        self._line(f"waiting for another vmrun fetching {url}", sys.stderr)

    def start(self, url: str, total: int | None) -> None:
        if not self.tty:
            size = f" ({total / MIB:.1f} MiB)" if total is not None else ""
            self._line(f"pulling {url}{size}", sys.stderr)
            return
        if self.bar is None:
            from rich import progress as rp
            from rich.console import Console

            self.bar = rp.Progress(rp.TextColumn("{task.description}", markup=False),
                                   rp.BarColumn(), rp.DownloadColumn(), rp.TransferSpeedColumn(),
                                   rp.TimeRemainingColumn(), console=Console(stderr=True),
                                   transient=True, redirect_stdout=False, redirect_stderr=False)
            self.bar.start()
        if self.task is not None:  # a retry starts over
            self.bar.remove_task(self.task)
        self.task = self.bar.add_task(printable(url.rsplit("/", 1)[-1]), total=total)

    def advance(self, nbytes: int) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.advance(self.task, nbytes)

    def finish(self, url: str, path: Path, nbytes: int, cached: bool) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.remove_task(self.task)
            self.task = None
        if not cached:
            self._line(f"pulled {url} ({nbytes / MIB:.1f} MiB)", self.out)
        elif self.cached_lines:
            self._line(f"cached {url}", self.out)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
