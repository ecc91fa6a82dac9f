"""The outcome rules of vmrun.watch, without a guest: console lines, crashes, stop
requests and the passing of (fake, monotonic) time in, actions and outcomes out."""

from __future__ import annotations

from vmrun.protocol import Outcome
from vmrun.watch import POWER_BUTTON_REPEAT, Action, Rules, Stopped, Watch, regex_matcher


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
    # a guest that powers off when asked: stopped, not ok
    assert w.outcome(Stopped.SHUTDOWN) == (Outcome.STOPPED, "signal SIGINT")


def test_second_stop_or_zero_timeout_destroys_now() -> None:
    w = watch()
    w.start(0.0)
    w.stop("signal SIGTERM", 10.0, 1.0)
    assert w.stop("signal SIGTERM", 10.0, 2.0) == [Action.DESTROY]
    w = watch()
    w.start(0.0)
    assert w.stop("stopped by vmrun down", 0.0, 1.0) == [Action.DESTROY]


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
    w = watch()
    w.start(0.0)
    assert w.destroy("destroyed on request") == [Action.DESTROY]
    assert w.outcome(Stopped.DESTROYED) == (Outcome.STOPPED, "destroyed on request")


def test_stopped_without_a_decision() -> None:
    w = watch()
    w.start(0.0)
    assert w.outcome(Stopped.DESTROYED) == (Outcome.FAILED, "destroyed from outside")
    assert w.outcome(Stopped.OTHER) == (Outcome.FAILED, "crashed")
