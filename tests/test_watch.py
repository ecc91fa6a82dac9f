"""The outcome rules of vmrun.watch, without a guest: console lines, crashes, stop
requests and the passing of (fake, monotonic) time in, actions and outcomes out."""

from __future__ import annotations

import time

import pytest

from vmrun.protocol import Outcome
from vmrun.watch import (
    DESTROYED_AFTER_TIMEOUT,
    DESTROYED_AT_ONCE,
    MAX_PATTERN_PROGRAM,
    POWER_BUTTON_REPEAT,
    REBOOT_SETTLE,
    STOPPED_CLEANLY,
    Action,
    PatternError,
    Rules,
    Stopped,
    Watch,
    compile_pattern,
    regex_matcher,
)


def watch(success: str | None = None, failure: str | None = None, ready: str | None = None,
          timeout: float | None = None, ready_timeout: float = 0.0) -> Watch:
    return Watch(Rules(success=regex_matcher(success), failure=regex_matcher(failure),
                       ready=regex_matcher(ready), timeout=timeout,
                       ready_timeout=ready_timeout))


def test_a_guest_that_powers_off_is_ok() -> None:
    w = watch()
    assert w.start(0.0) == [Action.REPORT_READY]
    assert w.console("hello") == []
    assert w.outcome(Stopped.SHUTDOWN) == (Outcome.OK, "")


def test_success_pattern_missing_or_seen() -> None:
    w = watch(success="ALL OK")
    w.start(0.0)
    w.console("nothing to see")
    assert w.outcome(Stopped.SHUTDOWN) == (Outcome.FAILED, "success pattern missing")
    w = watch(success="ALL OK")
    w.start(0.0)
    w.console("tests: ALL OK")
    assert w.outcome(Stopped.SHUTDOWN) == (Outcome.OK, "")


def test_failure_pattern_destroys_at_once_and_wins() -> None:
    w = watch(failure="FAIL", success="OK")
    w.start(0.0)
    assert w.console("test FAIL here") == [Action.DESTROY]
    assert w.console("OK") == []  # decided: later lines change nothing
    outcome, reason = w.outcome(Stopped.DESTROYED)
    assert outcome is Outcome.FAILED and reason.startswith("failure pattern matched: test FAIL")


def test_panic_on_the_console_or_from_libvirt() -> None:
    w = watch()
    w.start(0.0)
    assert w.console("Kernel panic - not syncing: Attempted to kill init!") == [Action.DESTROY]
    assert w.outcome(Stopped.DESTROYED) == (Outcome.FAILED, "panic")
    w = watch()
    w.start(0.0)
    assert w.crashed() == [Action.DESTROY]
    assert w.outcome(Stopped.DESTROYED) == (Outcome.FAILED, "panic")


def test_timeout() -> None:
    w = watch(timeout=12.0)
    w.start(100.0)
    assert w.next_deadline() == 112.0
    assert w.tick(111.9) == []
    assert w.tick(112.0) == [Action.DESTROY]
    assert w.next_deadline() is None
    assert w.outcome(Stopped.DESTROYED) == (Outcome.FAILED, "timeout after 12s")


def test_ready_pattern_and_ready_timeout() -> None:
    w = watch(ready="listening", ready_timeout=8.0)
    assert w.start(0.0) == []
    assert w.console("booting") == []
    assert w.console("server listening") == [Action.REPORT_READY]
    assert w.console("listening again") == []  # reported once
    assert w.tick(9.0) == []
    w = watch(ready="listening", ready_timeout=8.0)
    w.start(0.0)
    assert w.tick(8.0) == [Action.DESTROY]
    assert w.outcome(Stopped.DESTROYED) == (Outcome.FAILED, "not ready after 8s")


def test_stop_presses_the_button_repeatedly_then_destroys() -> None:
    w = watch()
    w.start(0.0)
    assert w.stop("signal SIGINT", 10.0, 5.0) == [Action.REPORT_STOPPING,
                                                  Action.PRESS_POWER_BUTTON]
    assert w.decision == (Outcome.STOPPED, "signal SIGINT")
    assert w.tick(5.0 + POWER_BUTTON_REPEAT) == [Action.PRESS_POWER_BUTTON]
    assert w.tick(15.0) == [Action.DESTROY]
    assert w.next_deadline() is None
    # the request's reason is what `Stopping` reports; the outcome's says how it went
    assert w.outcome(Stopped.DESTROYED) == (Outcome.STOPPED, DESTROYED_AFTER_TIMEOUT)
    assert DESTROYED_AFTER_TIMEOUT == "destroyed after stop_timeout"


def test_a_guest_that_shuts_down_on_the_press_is_stopped_cleanly() -> None:
    w = watch()
    w.start(0.0)
    w.stop("stopped by vmrun down", 10.0, 5.0)
    assert w.tick(5.0 + POWER_BUTTON_REPEAT) == [Action.PRESS_POWER_BUTTON]
    # powered off when asked: stopped, not ok
    assert w.outcome(Stopped.SHUTDOWN) == (Outcome.STOPPED, STOPPED_CLEANLY)
    assert STOPPED_CLEANLY == "stopped"
    # ... also if it powered off just as the destroy went out
    w.tick(15.0)
    assert w.outcome(Stopped.SHUTDOWN) == (Outcome.STOPPED, STOPPED_CLEANLY)


def test_stopping_guest_destroyed_or_crashed_by_someone_else() -> None:
    w = watch()
    w.start(0.0)
    w.stop("signal SIGTERM", 10.0, 0.0)
    assert w.outcome(Stopped.DESTROYED) == (Outcome.STOPPED, "destroyed from outside")
    assert w.outcome(Stopped.OTHER) == (Outcome.STOPPED, "crashed")


def test_second_stop_or_zero_timeout_destroys_now() -> None:
    w = watch()
    w.start(0.0)
    w.stop("signal SIGTERM", 10.0, 1.0)
    assert w.stop("signal SIGTERM", 10.0, 2.0) == [Action.DESTROY]
    assert w.outcome(Stopped.DESTROYED) == (Outcome.STOPPED, DESTROYED_AT_ONCE)
    w = watch()
    w.start(0.0)
    assert w.stop("stopped by vmrun down", 0.0, 1.0) == [Action.DESTROY]
    assert w.outcome(Stopped.DESTROYED) == (Outcome.STOPPED, DESTROYED_AT_ONCE)


def test_stop_after_failure_keeps_the_failure() -> None:
    w = watch(timeout=1.0)
    w.start(0.0)
    w.tick(1.0)
    w.stop("signal SIGINT", 10.0, 1.5)
    assert w.outcome(Stopped.DESTROYED) == (Outcome.FAILED, "timeout after 1s")


def test_destroy_request_and_failed_press() -> None:
    w = watch()
    w.start(0.0)
    w.stop("signal SIGINT", 10.0, 0.0)
    assert w.press_failed() == [Action.DESTROY]
    assert w.next_deadline() is None
    assert w.outcome(Stopped.DESTROYED) == (Outcome.STOPPED, DESTROYED_AT_ONCE)
    w = watch()
    w.start(0.0)
    assert w.destroy("destroyed on request") == [Action.DESTROY]
    assert w.outcome(Stopped.DESTROYED) == (Outcome.STOPPED, "destroyed on request")


def test_a_reboot_changes_nothing_but_the_count() -> None:
    w = watch(success="ALL OK", timeout=30.0)
    w.start(0.0)
    w.console("tests: ALL OK")
    assert w.reset(10.0) == [Action.REPORT_REBOOTED]
    assert w.reset(10.04) == []  # one reboot, two resets (seen: 42 ms apart)
    assert w.reset(10.04 + REBOOT_SETTLE - 0.01) == []  # ... or more, in a burst
    assert w.reset(20.0) == [Action.REPORT_REBOOTED]
    assert w.reboots == 2
    assert w.next_deadline() == 30.0  # the timeout runs on from the first boot
    w.console("booting again")
    # the success pattern seen before the reboot still counts
    assert w.outcome(Stopped.SHUTDOWN) == (Outcome.OK, "")
    # and after a reboot a panic or a failure is as bad as ever
    w = watch(failure="FAIL")
    w.start(0.0)
    w.reset(1.0)
    assert w.console("Kernel panic - not syncing: x") == [Action.DESTROY]
    assert w.outcome(Stopped.DESTROYED) == (Outcome.FAILED, "panic")


def test_stopped_without_a_decision() -> None:
    w = watch()
    w.start(0.0)
    assert w.outcome(Stopped.DESTROYED) == (Outcome.FAILED, "destroyed from outside")
    assert w.outcome(Stopped.OTHER) == (Outcome.FAILED, "crashed")


# --- patterns: RE2, matched in linear time ----------------------------------------------

@pytest.mark.parametrize("pattern", [r"(a+)+$", r"(a|aa)+$", r"(.*a){25}$", r"^(\w+\s?)+$"])
def test_catastrophic_patterns_are_matched_in_linear_time(pattern: str) -> None:
    hostile = "a" * 5000 + "b!"  # makes Python's backtracking re run for ages
    match = compile_pattern(pattern)
    started = time.monotonic()
    for _ in range(10):
        assert not match(hostile)
    assert time.monotonic() - started < 0.5


def test_a_catastrophic_success_pattern_leaves_the_timeout_in_force() -> None:
    w = watch(success="(a+)+$", timeout=15.0)
    w.start(0.0)
    started = time.monotonic()
    assert w.console("a" * 5000 + "b") == []
    assert time.monotonic() - started < 0.5
    assert w.tick(15.0) == [Action.DESTROY]
    assert w.outcome(Stopped.DESTROYED) == (Outcome.FAILED, "timeout after 15s")
    w = watch(success="(a+)+$")
    w.start(0.0)
    w.console("a" * 5000)
    assert w.outcome(Stopped.SHUTDOWN) == (Outcome.OK, "")


@pytest.mark.parametrize(("pattern", "line", "expected"), [
    ("ALL OK", "tests: ALL OK (12 passed)", True),  # anywhere in the line
    ("ALL OK", "all ok", False),
    ("(?i)all ok", "tests: ALL OK", True),
    ("^guest: ", "guest: booted", True),
    ("^booted", "guest: booted", False),
    ("booted$", "guest: booted", True),
    ("guest$", "guest: booted", False),
    (r"^\d+ tests? passed$", "12 tests passed", True),
    (r"^\d+ tests? passed$", "12 tests passed, 1 failed", False),
    ("a.c", "abc", True),
    ("a.c", "a\u00e9c", True),  # `.` is a character, not a byte
    ("caf\u00e9", "un caf\u00e9", True),
    (r"\x1b\[31m", "\x1b[31mFAIL", True),
    (r"\bok\b", "it is ok.", True),
    (r"\bok\b", "okay", False),
    ("fail(ed|ure)", "test failure", True),
    ("", "anything", True),
    ("x*", "", True),
    (r"\pL+ done", "\u00e9t\u00e9 done", True),
])
def test_patterns_search_the_line_as_re_search_does(pattern: str, line: str,
                                                    expected: bool) -> None:
    assert compile_pattern(pattern)(line) is expected
    matcher = regex_matcher(pattern)
    assert matcher is not None and matcher(line) is expected


def test_the_panic_pattern() -> None:
    panic = Rules().panic
    assert panic is not None
    assert panic("[    1.2] Kernel panic - not syncing: VFS: Unable to mount root fs")
    assert not panic("guest: booted")


def test_no_pattern_no_matcher() -> None:
    assert regex_matcher(None) is None


@pytest.mark.parametrize("pattern", [r"(a)\1", r"(?P<x>a)(?P=x)", "a(?=b)", "a(?!b)",
                                     "(?<=a)b", "(?<!a)b", r"a\Z", "((", "a{1001}"])
def test_patterns_re2_refuses(pattern: str) -> None:
    with pytest.raises(PatternError) as info:
        compile_pattern(pattern)
    assert info.value.size is None and info.value.reason


def test_patterns_too_large_are_refused() -> None:
    compile_pattern(".{0,200}")
    with pytest.raises(PatternError) as info:
        compile_pattern(".{0,300}")
    assert info.value.size is not None and info.value.size > MAX_PATTERN_PROGRAM


def test_re2_prints_nothing_on_a_refused_pattern(capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(PatternError):
        compile_pattern("((")
    assert capfd.readouterr() == ("", "")


# --- readiness by a probe the driver runs (ready = { port = … } or { ssh = … }) ----------

def probing(interval: float = 0.2, ready_timeout: float = 0.0) -> Watch:
    return Watch(Rules(ready_probe=interval, ready_timeout=ready_timeout))


def test_a_probe_starts_at_once_and_repeats_until_it_succeeds() -> None:
    w = probing()
    assert w.start(10.0) == [Action.PROBE]  # not ready yet
    assert not w.ready and w.probing
    assert w.next_deadline() is None  # one attempt at a time: the driver answers first
    assert w.probed(10.05, ok=False, failure="refused") == []
    assert w.next_deadline() == pytest.approx(10.2)  # every 0.2 s from the last start
    assert w.tick(10.1) == []
    assert w.tick(10.2) == [Action.PROBE]
    assert w.tick(10.3) == []  # still waiting for that attempt's answer
    assert w.probed(10.3, ok=True) == [Action.REPORT_READY]
    assert w.ready and not w.probing and w.next_deadline() is None
    assert w.probed(10.4, ok=True) == []  # reported once
    assert w.outcome(Stopped.SHUTDOWN) == (Outcome.OK, "")


def test_a_slow_attempt_is_followed_at_once() -> None:
    w = probing(interval=0.2)
    w.start(0.0)
    w.probed(1.0, ok=False, failure="no answer within 1s")
    assert w.next_deadline() == 1.0
    assert w.tick(1.0) == [Action.PROBE]


def test_a_probe_that_never_succeeds_fails_the_vm_with_its_last_failure() -> None:
    w = probing(ready_timeout=5)
    w.start(0.0)
    now = 0.0
    while now < 5.0:
        w.probed(now, ok=False, failure="10.77.0.5:81: connection refused")
        now = w.next_deadline() or 5.0
        w.tick(now)
    assert w.decision == (Outcome.FAILED,
                          "not ready after 5s (last check: 10.77.0.5:81: connection refused)")
    assert not w.probing
    assert w.tick(6.0) == [] and w.next_deadline() is None  # no more probes
    assert w.probed(6.0, ok=True) == []  # too late: it stays failed
    assert w.outcome(Stopped.DESTROYED)[1].startswith("not ready after 5s")


def test_console_readiness_does_not_probe() -> None:
    w = watch(ready="up", ready_timeout=5)
    assert w.start(0.0) == []
    assert not w.probing and w.next_deadline() == 5.0
    assert w.probed(1.0, ok=True) == []  # no probe was asked for
    assert w.console("guest up") == [Action.REPORT_READY]
    w = watch(ready="up", ready_timeout=5)
    w.start(0.0)
    assert w.tick(5.0) == [Action.DESTROY]
    assert w.decision == (Outcome.FAILED, "not ready after 5s")  # no probe to name


def test_a_stop_request_ends_the_probing() -> None:
    w = probing(ready_timeout=60)
    w.start(0.0)
    w.probed(0.1, ok=False, failure="refused")
    assert w.stop("signal SIGINT", 10, 0.15) == [Action.REPORT_STOPPING,
                                                 Action.PRESS_POWER_BUTTON]
    assert not w.probing
    assert Action.PROBE not in w.tick(0.2)
    assert w.probed(0.3, ok=True) == []  # not ready: it is stopping
    assert not w.ready


def test_a_probed_guest_stays_ready_across_a_reboot() -> None:
    w = probing()
    w.start(0.0)
    w.probed(0.1, ok=True)
    assert w.reset(3.0) == [Action.REPORT_REBOOTED]
    assert w.ready and w.tick(3.5) == []
