"""What `vmrun up` shows while a stack runs: plain prefixed lines, or a live TTY view.

Plain mode (stdout not a terminal, NO_COLOR set, or `--progress plain`) prints each console
line as `vm | line`, notes on stderr, and a summary table: stable text for CI logs.  The
live view (rich) keeps a status table (VM, state, elapsed, last console line) at the bottom
of the terminal, prints the consoles above it with a coloured prefix per VM, and ends with
the same summary.

The supervisor is single-threaded on purpose (its signal handlers rely on it), so the live
view never refreshes from a thread of its own: it redraws when the supervisor reports an
event, including the periodic "tick".
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any, Protocol, TextIO

from vmrun import protocol as p

COLOURS = ("cyan", "magenta", "green", "yellow", "blue", "red", "bright_cyan",
           "bright_magenta", "bright_green", "bright_yellow", "bright_blue")
MAX_LINE = 60  # characters of the last console line shown in the status table


class View(Protocol):
    def __call__(self, vm: str, event: p.Note, state: p.VMState | None) -> None: ...
    def summary(self, result: Any) -> None: ...
    def close(self) -> None: ...


def choose(progress: str, stream: TextIO = sys.stdout) -> str:
    """"tty" or "plain", for `--progress auto|tty|plain`."""
    if progress != "auto":
        return progress
    if os.environ.get("NO_COLOR") or not stream.isatty():
        return "plain"
    return "tty"


def _note_text(vm: str, event: p.Note) -> str | None:
    if isinstance(event, p.Probing):
        return "probing QEMU's capabilities (once per host and QEMU build)"
    if isinstance(event, p.SignalReceived):
        return f"{signal.Signals(event.signal).name}: shutting every VM down"
    if isinstance(event, p.DownRequested):
        return "vmrun down: shutting every VM down"
    if isinstance(event, p.Result):
        return f"{vm} {event.outcome}" + (f" ({event.reason})" if event.reason else "")
    if isinstance(event, p.Restarting):
        return (f"{vm} {event.outcome}" + (f" ({event.reason})" if event.reason else "") +
                f": restarting ({event.restart} of {event.restart_max})")
    if isinstance(event, p.Rebooted):
        return f"{vm} rebooted"
    return None


def _times(count: int, what: str) -> str:
    return f"{what} {count} time" + ("s" if count != 1 else "")


def summary_rows(result: Any) -> list[tuple[str, str, str, str]]:
    rows = []
    for name, vm in result.vms.items():
        duration = f"{vm.duration:.1f}s" if vm.duration is not None else "-"
        notes = ([vm.reason] if vm.reason else []) + \
            ([_times(vm.restarts, "restarted")] if vm.restarts else []) + \
            ([_times(vm.reboots, "rebooted")] if vm.reboots else []) + \
            [f"warning: {w}" for w in vm.warnings]
        reason = "; ".join(notes)
        rows.append((name, str(vm.outcome or "-"), duration, reason))
    return rows


class PlainView:
    """Console lines prefixed by VM name, notes on stderr, a plain summary table."""

    def __init__(self, names: list[str], quiet: bool, out: TextIO = sys.stdout) -> None:
        self.width = max(len(n) for n in names)
        self.quiet = quiet
        self.out = out

    def note(self, text: str) -> None:
        print(f"vmrun: {text}", file=sys.stderr, flush=True)

    def __call__(self, vm: str, event: p.Note, state: p.VMState | None) -> None:
        if isinstance(event, p.Console):
            if not self.quiet:
                try:
                    self.out.write(f"{vm:<{self.width}} | {event.line}\n")
                    self.out.flush()
                except BrokenPipeError:
                    # The reader went away (`vmrun up | head`): keep running the stack.
                    os.dup2(os.open(os.devnull, os.O_WRONLY), self.out.fileno())
                    self.quiet = True
            return
        text = _note_text(vm, event)
        if text is not None and (not isinstance(event, p.Result) or not self.quiet):
            self.note(text)

    def close(self) -> None:
        pass

    def summary(self, result: Any) -> None:
        rows = [("VM", "OUTCOME", "DURATION", "REASON"), *summary_rows(result)]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        self.out.write("\n")
        for row in rows:
            cells = [row[i].ljust(widths[i]) for i in range(3)] + [row[3]]
            self.out.write("  ".join(cells).rstrip() + "\n")
        self.out.flush()
        for warning in result.warnings:
            self.note(f"warning: {warning}")


class LiveView:
    """A rich status table kept below the streamed, colour-prefixed consoles."""

    def __init__(self, names: list[str], quiet: bool) -> None:
        from rich.console import Console
        from rich.live import Live

        self.names = names
        self.quiet = quiet
        self.width = max(len(n) for n in names)
        self.colour = {n: COLOURS[i % len(COLOURS)] for i, n in enumerate(names)}
        self.state = {n: str(p.VMState.STARTING) for n in names}
        self.started: dict[str, float] = {}
        self.ended: dict[str, float] = {}
        self.last = {n: "" for n in names}
        self.console = Console(highlight=False)
        self.live = Live(self.table(), console=self.console, auto_refresh=False,
                         transient=True, redirect_stdout=False, redirect_stderr=False)
        self.live.start()

    def table(self) -> Any:
        from rich.table import Table

        table = Table(box=None, show_edge=False, pad_edge=False, header_style="bold")
        for column in ("VM", "STATE", "ELAPSED", "LAST CONSOLE LINE"):
            table.add_column(column, no_wrap=True, overflow="ellipsis")
        now = time.monotonic()
        for name in self.names:
            start = self.started.get(name)
            elapsed = f"{(self.ended.get(name, now) - start):.0f}s" if start else "-"
            last = self.last[name]
            if len(last) > MAX_LINE:
                last = last[:MAX_LINE - 1] + "…"
            table.add_row(f"[{self.colour[name]}]{name}[/]", self.state[name], elapsed, last)
        return table

    def __call__(self, vm: str, event: p.Note, state: p.VMState | None) -> None:
        from rich.text import Text

        if isinstance(event, p.Console):
            line = event.line
            if line.strip():
                self.last[vm] = line.strip()
            if not self.quiet:
                prefix = Text(f"{vm:<{self.width}} | ", style=self.colour[vm])
                self.console.print(prefix + Text(line), soft_wrap=True)
        elif vm in self.state and state is not None:
            # a VM that has stopped shows its outcome instead
            self.state[vm] = str(event.outcome) if isinstance(event, p.Result) else str(state)
            if isinstance(event, p.Running):
                self.started[vm] = time.monotonic()
            elif isinstance(event, p.Result):
                self.ended[vm] = time.monotonic()
        if not isinstance(event, p.Console | p.Tick):
            text = _note_text(vm, event)
            if text is not None:
                self.console.print(Text(f"vmrun: {text}", style="dim"))
        self.live.update(self.table(), refresh=True)

    def close(self) -> None:
        """Take the live table off the screen (also when the run ended in an error)."""
        self.live.stop()

    def summary(self, result: Any) -> None:
        from rich.table import Table
        from rich.text import Text

        table = Table(box=None, show_edge=False, pad_edge=False, header_style="bold")
        for column in ("VM", "OUTCOME", "DURATION", "REASON"):
            table.add_column(column)
        styles = {"ok": "green", "failed": "bold red", "stopped": "yellow"}
        for name, outcome, duration, reason in summary_rows(result):
            table.add_row(f"[{self.colour.get(name, 'white')}]{name}[/]",
                          f"[{styles.get(outcome, 'white')}]{outcome}[/]", duration,
                          Text(reason))  # text from the guest, not markup
        self.console.print()
        self.console.print(table)
        for warning in result.warnings:
            self.console.print(Text(f"vmrun: warning: {warning}", style="yellow"))


def make(progress: str, names: list[str], quiet: bool) -> View:
    if choose(progress) == "tty":
        return LiveView(names, quiet)
    return PlainView(names, quiet)
