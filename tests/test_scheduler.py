"""depends_on scheduling (vmrun.scheduler), without a guest."""

from __future__ import annotations

from vmrun.protocol import Outcome
from vmrun.scheduler import NeverStarted, Scheduler


def test_independent_vms_start_at_once_in_order() -> None:
    s = Scheduler({"a": (), "b": (), "c": ()})
    assert s.due() == (["a", "b", "c"], [])
    assert s.idle
    assert s.due() == ([], [])


def test_ready_dependency() -> None:
    s = Scheduler({"db": (), "web": (("db", "ready"),)})
    assert s.due() == (["db"], [])
    assert s.due() == ([], [])
    assert not s.idle
    s.on_ready("db")
    assert s.due() == (["web"], [])


def test_ok_dependency_waits_for_the_outcome() -> None:
    s = Scheduler({"setup": (), "test": (("setup", "ok"),)})
    s.due()
    s.on_ready("setup")
    assert s.due() == ([], [])
    s.on_outcome("setup", Outcome.OK)
    assert s.due() == (["test"], [])


def test_failed_dependency_never_starts_and_cascades() -> None:
    s = Scheduler({"a": (), "b": (("a", "ok"),), "c": (("b", "ready"),)})
    s.due()
    s.on_outcome("a", Outcome.FAILED)
    start, never = s.due()
    assert start == []
    assert never == [NeverStarted("b", Outcome.FAILED, "dependency a failed"),
                     NeverStarted("c", Outcome.FAILED, "dependency b failed")]
    assert s.idle


def test_ended_without_being_ready() -> None:
    s = Scheduler({"a": (), "b": (("a", "ready"),)})
    s.due()
    s.on_ended("a")  # its driver died without a word
    assert s.due() == ([], [NeverStarted("b", Outcome.FAILED, "dependency a failed")])


def test_ready_is_enough_even_if_it_later_fails() -> None:
    s = Scheduler({"a": (), "b": (("a", "ready"),)})
    s.due()
    s.on_ready("a")
    s.on_outcome("a", Outcome.FAILED)
    assert s.due() == (["b"], [])


def test_cancel_stops_what_is_pending() -> None:
    s = Scheduler({"a": (), "b": (("a", "ready"),)})
    s.due()
    assert s.cancel() == [NeverStarted("b", Outcome.STOPPED, "stopped before it started")]
    s.on_ready("a")
    assert s.due() == ([], [])
    assert s.idle
