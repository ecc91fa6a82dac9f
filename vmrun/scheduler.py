"""When each VM of a stack may start: `depends_on` and `restart`, without processes or
clocks.

The supervisor tells the scheduler what happened (a VM became ready, reported its
outcome, its driver ended, a stop was requested) and asks it which VMs to start now and
which can never start.  Pure and tested in milliseconds (tests/test_scheduler.py).

A dependency `(target, "ready")` is met once the target is ready; `(target, "ok")` once
the target ended with the outcome ok.  A dependency that can no longer be met (the
target failed, stopped, ended without being ready, or never started) fails the VM
without starting it.  After a stop request nothing starts any more: what was pending
ends "stopped".

A VM's `restart` policy starts it again when its driver has ended: "on-failure" after an
outcome failed (a driver that died without one failed), "always" after any outcome but
stopped (only a stop request stops a VM), at most `restart_max` times, and never once a
stop was requested.  Only an outcome after which no restart will come is final; the
dependencies wait for it: a VM restarted "always" meets `ok` only after its last run.
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


@dataclass(frozen=True)
class Restart:
    """A VM's restart policy (the manifest's `restart` and `restart_max`)."""

    policy: str = "no"  # "no" | "on-failure" | "always"
    max: int = 0

    def wants(self, outcome: Outcome) -> bool:
        """Whether a run that ended with `outcome` calls for another (count aside)."""
        if outcome is Outcome.STOPPED:
            return False
        return self.policy == "always" or \
            self.policy == "on-failure" and outcome is Outcome.FAILED


class Scheduler:
    def __init__(self, dependencies: Mapping[str, Dependencies],
                 restart: Mapping[str, Restart] | None = None) -> None:
        self.dependencies = dict(dependencies)
        self.restart = dict(restart or {})
        self.pending: list[str] = list(dependencies)  # in manifest order
        self.started: set[str] = set()
        self.ready: set[str] = set()
        self.outcomes: dict[str, Outcome] = {}  # of each VM's latest run that had one
        self.reported: set[str] = set()  # VMs whose current run has reported its outcome
        self.final: set[str] = set()  # VMs whose outcome is final: no restart will come
        self.restarting: list[str] = []  # ended, to be started again by due()
        self.restarts: dict[str, int] = dict.fromkeys(dependencies, 0)
        self.never_started: dict[str, NeverStarted] = {}
        self.cancelled = False

    # --- what happened ---

    def on_ready(self, name: str) -> None:
        self.ready.add(name)

    def will_restart(self, name: str, outcome: Outcome) -> bool:
        """Whether a run of `name` that ended with `outcome` is followed by another."""
        policy = self.restart.get(name, Restart())
        return not self.cancelled and self.restarts.get(name, 0) < policy.max and \
            policy.wants(outcome)

    def on_outcome(self, name: str, outcome: Outcome) -> bool:
        """The outcome of the VM's current run; True when it is final (no restart)."""
        self.outcomes[name] = outcome
        self.reported.add(name)
        if self.will_restart(name, outcome):
            return False
        self.final.add(name)
        return True

    def on_ended(self, name: str) -> bool:
        """The driver of the VM's current run is gone, with or without an outcome (then it
        failed).  True when the VM is to start again: `due()` returns it next."""
        if name in self.final:
            return False
        if name not in self.reported:
            self.outcomes[name] = Outcome.FAILED  # its driver died without a word
        if self.will_restart(name, self.outcomes[name]):
            self.restarting.append(name)
            return True
        self.final.add(name)
        return False

    def restart_refused(self, name: str) -> None:
        """A restart `due()` returned could not be started (a stop came first): the
        outcome of the run before is final."""
        self.restarts[name] -= 1
        self.reported.add(name)
        self.final.add(name)

    def cancel(self) -> list[NeverStarted]:
        """A stop was requested: every pending VM ends without starting, and no VM starts
        again (the outcome of its last run is final)."""
        self.cancelled = True
        dropped = [NeverStarted(name, Outcome.STOPPED, "stopped before it started")
                   for name in self.pending]
        for entry in dropped:
            self.never_started[entry.name] = entry
        self.pending = []
        self.final.update(self.restarting)
        self.restarting = []
        return dropped

    # --- what to do ---

    def _state(self, name: str) -> str:
        """"met", "waiting", or the reason the VM can never start."""
        for target, condition in self.dependencies[name]:
            if target in self.never_started:
                return f"dependency {target} failed"
            if target not in self.started:
                return "waiting"
            final = target in self.final
            if condition == "ok":
                if not final:
                    return "waiting"
                if self.outcomes.get(target) is not Outcome.OK:
                    return f"dependency {target} failed"
            elif target not in self.ready:
                if not final:
                    return "waiting"
                return f"dependency {target} failed"
        return "met"

    def due(self) -> tuple[list[str], list[NeverStarted]]:
        """VMs to start now (marked started; first the restarts, counted), and VMs that
        can never start."""
        start: list[str] = []
        never: list[NeverStarted] = []
        for name in self.restarting:
            self.restarts[name] += 1
            self.reported.discard(name)
            start.append(name)
        self.restarting = []
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
        """Nothing left to start (nor to start again)."""
        return not self.pending and not self.restarting
