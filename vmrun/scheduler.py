"""When each VM of a stack may start: `depends_on`, without processes or clocks.

The supervisor tells the scheduler what happened (a VM became ready, reported its
outcome, its driver ended, a stop was requested) and asks it which VMs to start now and
which can never start.  Pure and tested in milliseconds (tests/test_scheduler.py).

A dependency `(target, "ready")` is met once the target is ready; `(target, "ok")` once
the target ended with the outcome ok.  A dependency that can no longer be met (the
target failed, stopped, ended without being ready, or never started) fails the VM
without starting it.  After a stop request nothing starts any more: what was pending
ends "stopped".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from vmrun.protocol import Outcome

Dependencies = Sequence[tuple[str, str]]  # (VM name, "ready" | "ok")


@dataclass(frozen=True)
class NeverStarted:
    name: str
    outcome: Outcome
    reason: str


class Scheduler:
    def __init__(self, dependencies: Mapping[str, Dependencies]) -> None:
        self.dependencies = dict(dependencies)
        self.pending: list[str] = list(dependencies)  # in manifest order
        self.started: set[str] = set()
        self.ready: set[str] = set()
        self.outcomes: dict[str, Outcome] = {}
        self.ended: set[str] = set()  # driver gone (with or without an outcome)
        self.never_started: dict[str, NeverStarted] = {}
        self.cancelled = False

    # --- what happened ---

    def on_ready(self, name: str) -> None:
        self.ready.add(name)

    def on_outcome(self, name: str, outcome: Outcome) -> None:
        self.outcomes[name] = outcome

    def on_ended(self, name: str) -> None:
        self.ended.add(name)

    def cancel(self) -> list[NeverStarted]:
        """A stop was requested: every pending VM ends without starting."""
        self.cancelled = True
        dropped = [NeverStarted(name, Outcome.STOPPED, "stopped before it started")
                   for name in self.pending]
        for entry in dropped:
            self.never_started[entry.name] = entry
        self.pending = []
        return dropped

    # --- what to do ---

    def _state(self, name: str) -> str:
        """"met", "waiting", or the reason the VM can never start."""
        for target, condition in self.dependencies[name]:
            if target in self.never_started:
                return f"dependency {target} failed"
            if target not in self.started:
                return "waiting"
            outcome = self.outcomes.get(target)
            finished = outcome is not None or target in self.ended
            if condition == "ok":
                if not finished:
                    return "waiting"
                if outcome is not Outcome.OK:
                    return f"dependency {target} failed"
            elif target not in self.ready:
                if not finished:
                    return "waiting"
                return f"dependency {target} failed"
        return "met"

    def due(self) -> tuple[list[str], list[NeverStarted]]:
        """VMs to start now (marked started), and VMs that can never start."""
        start: list[str] = []
        never: list[NeverStarted] = []
        progress = not self.cancelled
        while progress:
            progress = False
            for name in list(self.pending):
                state = self._state(name)
                if state == "waiting":
                    continue
                self.pending.remove(name)
                progress = True
                if state == "met":
                    self.started.add(name)
                    start.append(name)
                else:
                    entry = NeverStarted(name, Outcome.FAILED, state)
                    self.never_started[name] = entry
                    never.append(entry)
        return start, never

    @property
    def idle(self) -> bool:
        """Nothing left to start."""
        return not self.pending
