"""The rules that decide a VM's outcome, without libvirt, QEMU or a clock of their own.

A `Watch` is fed what happens to one guest (console lines, a crash, stop requests, the
passing of time as a monotonic `now`) and answers with actions for its driver to carry
out (destroy the guest, press its power button, report readiness or stopping).  When
the guest has stopped, `outcome()` says how the run ended.  The driver is a thin shell
around it; the rules are tested in milliseconds, on any machine (tests/test_watch.py).

The rules:
* The first decision wins: a panic, the failure pattern, `timeout` and `ready_timeout`
  decide "failed" and destroy the guest at once; a stop request decides "stopped".
* A stop request presses the ACPI power button, again every POWER_BUTTON_REPEAT seconds
  (a press before the guest's ACPI driver is up is lost), and destroys the guest after
  its timeout; a second request, or a timeout of 0, destroys it at once.  The reason
  says which: "stopped" (it shut down on the press), "destroyed after stop_timeout",
  "destroyed at once".
* A guest that powers off by itself is "ok", unless a `success` pattern never showed.
* A reboot that brings the guest back in the same QEMU (on_reboot = "restart") changes
  nothing of the above: the same timeouts run on, a `success` pattern seen before it
  counts, a ready guest stays ready; `reset()` only counts it.  One reboot can reset
  the machine more than once (the kernel tries one reset method after another; 2 resets
  42 ms apart here): resets less than REBOOT_SETTLE apart count as one reboot.  (With
  on_reboot = "stop", libvirt ends the domain at the reboot as at a poweroff: "ok".)
* Readiness: by a console line (`ready`), or by a probe the driver runs (`ready_probe`: a
  TCP connect, a command over ssh).  The Watch says when to probe (Action.PROBE, at most
  one attempt at a time, every `ready_probe` seconds until one succeeds) and the driver
  says how it went (`probed`); either way the first success marks the guest ready, and
  `ready_timeout` fails it (the reason then names the last probe's failure).

Patterns are RE2 expressions (`compile_pattern`): RE2 does not backtrack, so a line costs
time linear in its length whatever the pattern, and no pattern and line can pin the
driver's loop and keep its deadlines from firing.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

import re2

from vmrun.protocol import Outcome

# The kernel's own message; reported as the outcome "panic" as soon as it is seen.
PANIC_PATTERN = r"Kernel panic - not syncing"
# The reasons of a VM stopped on request, by how it went.
STOPPED_CLEANLY = "stopped"
DESTROYED_AFTER_TIMEOUT = "destroyed after stop_timeout"
DESTROYED_AT_ONCE = "destroyed at once"
POWER_BUTTON_REPEAT = 1.0  # seconds between ACPI power-button presses while stopping
REBOOT_SETTLE = 2.0  # seconds: resets closer together than this are one reboot

# The largest RE2 program (instructions, forward or reverse) a pattern may compile to.  A
# match costs at most about program size x line length steps; this bounds a line of 16 KiB
# to about 0.15 s in the worst case (a DFA that blows up, e.g. `a[ab]{990}c`), while
# `\pL` (1,200) or `.{0,200}` (1,800) still fit.
MAX_PATTERN_PROGRAM = 2000

Matcher = Callable[[str], bool]


class PatternError(ValueError):
    """RE2 refuses the pattern, or its program is larger than MAX_PATTERN_PROGRAM."""

    def __init__(self, reason: str, size: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.size = size  # the program's size, when that is what is wrong


_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # RE2 would also print its message on stderr
_OPTIONS.never_capture = True  # only "is there a match" is asked: no groups to track


def compile_pattern(pattern: str) -> Matcher:
    """A matcher that searches a line for `pattern` anywhere, as `re.search` does, with
    RE2 (no backtracking): raises PatternError if RE2 refuses it or it is too large."""
    try:
        compiled = re2.compile(pattern, _OPTIONS)
    except re2.error as exc:
        message = exc.args[0] if exc.args else "invalid pattern"
        if isinstance(message, bytes):
            message = message.decode("utf-8", "replace")
        raise PatternError(str(message)) from None
    size = max(compiled.programsize, compiled.reverseprogramsize)
    if size > MAX_PATTERN_PROGRAM:
        raise PatternError(f"pattern too large: {size} RE2 instructions, at most "
                           f"{MAX_PATTERN_PROGRAM}", size=size)
    # Console lines are decoded with "replace", so encoding them cannot fail; RE2 takes
    # the bytes as they are (no character offsets to compute for a yes-or-no answer).
    return lambda line: compiled.search(line.encode("utf-8", "replace")) is not None


def regex_matcher(pattern: str | None) -> Matcher | None:
    return None if pattern is None else compile_pattern(pattern)


@dataclass(frozen=True)
class Rules:
    success: Matcher | None = None
    failure: Matcher | None = None
    ready: Matcher | None = None  # None: ready as soon as it runs
    timeout: float | None = None  # seconds from start to a forced "failed"
    ready_timeout: float = 0.0  # 0: no limit
    ready_probe: float | None = None  # seconds between readiness probes; None: none
    panic: Matcher | None = regex_matcher(PANIC_PATTERN)


class Action(enum.Enum):
    DESTROY = "destroy"
    PRESS_POWER_BUTTON = "press"
    REPORT_READY = "ready"
    REPORT_STOPPING = "stopping"  # the reason is `Watch.decision`'s
    REPORT_REBOOTED = "rebooted"
    PROBE = "probe"  # start a readiness probe; answer with `Watch.probed`


class Stopped(enum.Enum):
    """How libvirt says the domain stopped."""

    SHUTDOWN = "shutdown"  # the guest powered off
    DESTROYED = "destroyed"
    OTHER = "other"  # QEMU crashed or failed


class Watch:
    def __init__(self, rules: Rules) -> None:
        self.rules = rules
        self.decision: tuple[Outcome, str] | None = None
        self.success_seen = False
        self.ready = False
        self.deadline: float | None = None
        self.ready_deadline: float | None = None
        self.stop_deadline: float | None = None
        self.next_press: float | None = None
        self.stop_requests = 0
        self.forced: str | None = None  # why a stop request ended in a destroy
        self.reboots = 0
        self.last_reset: float | None = None
        self.next_probe: float | None = None
        self.probe_started: float | None = None
        self.probe_failure: str | None = None  # how the last probe failed

    def _decide(self, outcome: Outcome, reason: str) -> None:
        if self.decision is None:
            self.decision = (outcome, reason)

    def _fail(self, reason: str) -> list[Action]:
        self._decide(Outcome.FAILED, reason)
        self.ready_deadline = None
        return [Action.DESTROY]

    def start(self, now: float) -> list[Action]:
        """The guest runs its first instruction now."""
        if self.rules.timeout:
            self.deadline = now + self.rules.timeout
        if self.rules.ready is None and self.rules.ready_probe is None:
            return self._mark_ready()
        if self.rules.ready_timeout:
            self.ready_deadline = now + self.rules.ready_timeout
        if self.rules.ready_probe is not None:
            self.probe_started = now
            return [Action.PROBE]
        return []

    @property
    def probing(self) -> bool:
        """Readiness probes are still wanted: not ready yet, and nothing decided."""
        return self.rules.ready_probe is not None and not self.ready and self.decision is None

    def probed(self, now: float, ok: bool, failure: str = "") -> list[Action]:
        """The driver's readiness probe succeeded, or failed (saying how)."""
        if not self.probing or self.rules.ready_probe is None:
            return []
        if ok:
            return self._mark_ready()
        self.probe_failure = failure or None
        started = now if self.probe_started is None else self.probe_started
        self.next_probe = max(now, started + self.rules.ready_probe)
        return []

    def _mark_ready(self) -> list[Action]:
        self.ready = True
        self.ready_deadline = None
        return [Action.REPORT_READY]

    def console(self, line: str) -> list[Action]:
        if self.decision is not None:
            return []
        rules = self.rules
        actions: list[Action] = []
        if rules.panic is not None and rules.panic(line):
            return self._fail("panic")
        if rules.failure is not None and rules.failure(line):
            return self._fail(f"failure pattern matched: {line.strip()[:120]}")
        if rules.success is not None and rules.success(line):
            self.success_seen = True
        if not self.ready and rules.ready is not None and rules.ready(line):
            actions += self._mark_ready()
        return actions

    def crashed(self) -> list[Action]:
        """libvirt reports a guest panic (pvpanic)."""
        if self.decision is not None:
            return [Action.DESTROY]
        return self._fail("panic")

    def stop(self, reason: str, timeout: float, now: float) -> list[Action]:
        """First request: ACPI power button, destroy after `timeout`; next: destroy now."""
        self.stop_requests += 1
        self._decide(Outcome.STOPPED, reason)
        self.ready_deadline = None
        if self.stop_requests == 1 and timeout > 0:
            self.stop_deadline = now + timeout
            self.next_press = now + POWER_BUTTON_REPEAT
            return [Action.REPORT_STOPPING, Action.PRESS_POWER_BUTTON]
        self.stop_deadline = self.next_press = None
        self.forced = self.forced or DESTROYED_AT_ONCE
        return [Action.DESTROY]

    def destroy(self, reason: str) -> list[Action]:
        """Destroy on request: stopped, for `reason`."""
        self._decide(Outcome.STOPPED, reason)
        self.stop_deadline = self.next_press = self.ready_deadline = None
        self.forced = self.forced or reason
        return [Action.DESTROY]

    def press_failed(self) -> list[Action]:
        """The power button could not be pressed: destroy instead."""
        self.stop_deadline = self.next_press = None
        self.forced = self.forced or DESTROYED_AT_ONCE
        return [Action.DESTROY]

    def reset(self, now: float) -> list[Action]:
        """The machine was reset (the guest rebooted) and runs on in the same QEMU: a
        reboot is counted and reported, nothing else."""
        last, self.last_reset = self.last_reset, now
        if last is not None and now - last < REBOOT_SETTLE:
            return []  # the same reboot
        self.reboots += 1
        return [Action.REPORT_REBOOTED]

    def next_deadline(self) -> float | None:
        probe = self.next_probe if self.probing else None
        times = [t for t in (self.deadline, self.ready_deadline, self.stop_deadline,
                             self.next_press, probe) if t is not None]
        return min(times) if times else None

    def tick(self, now: float) -> list[Action]:
        actions: list[Action] = []
        if self.deadline is not None and now >= self.deadline:
            self.deadline = None
            if self.decision is None:
                actions += self._fail(f"timeout after {self.rules.timeout:g}s")
        if self.ready_deadline is not None and now >= self.ready_deadline:
            self.ready_deadline = None
            failure = f" (last check: {self.probe_failure})" if self.probe_failure else ""
            actions += self._fail(f"not ready after {self.rules.ready_timeout:g}s{failure}")
        if self.next_probe is not None and now >= self.next_probe:
            self.next_probe = None
            if self.probing:
                self.probe_started = now
                actions.append(Action.PROBE)
        if self.stop_deadline is not None and now >= self.stop_deadline:
            self.stop_deadline = self.next_press = None
            self.forced = self.forced or DESTROYED_AFTER_TIMEOUT
            actions.append(Action.DESTROY)
        elif self.next_press is not None and now >= self.next_press:
            self.next_press = now + POWER_BUTTON_REPEAT
            actions.append(Action.PRESS_POWER_BUTTON)
        return actions

    def outcome(self, how: Stopped) -> tuple[Outcome, str]:
        """How the run ended, once the domain has stopped (after the last console line)."""
        if self.decision is not None:
            outcome = self.decision[0]
            if outcome is Outcome.STOPPED and self.stop_requests:
                # the request's reason said why; this says how it went
                if how is Stopped.SHUTDOWN:
                    return outcome, STOPPED_CLEANLY
                if how is Stopped.DESTROYED:
                    return outcome, self.forced or "destroyed from outside"
                return outcome, "crashed"
            return self.decision
        if how is Stopped.SHUTDOWN:
            if self.rules.success is not None and not self.success_seen:
                return Outcome.FAILED, "success pattern missing"
            return Outcome.OK, ""
        if how is Stopped.DESTROYED:
            return Outcome.FAILED, "destroyed from outside"
        return Outcome.FAILED, "crashed"
