"""depends_on and restart scheduling (vmrun.scheduler), without a guest."""

from __future__ import annotations

from vmrun.protocol import Outcome
from vmrun.scheduler import NeverStarted, Restart, Scheduler


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


# --- restart ---


def run(s: Scheduler, name: str, outcome: Outcome | None) -> bool:
    """One run of `name` ends with `outcome` (None: its driver died without one); whether
    it starts again."""
    final = s.on_outcome(name, outcome) if outcome is not None else None
    again = s.on_ended(name)
    assert final is None or final is not again
    return again


def test_no_restart_by_default() -> None:
    s = Scheduler({"a": ()})
    s.due()
    assert not run(s, "a", Outcome.FAILED)
    assert s.due() == ([], []) and s.idle and s.restarts["a"] == 0


def test_on_failure_restarts_at_most_restart_max_times() -> None:
    s = Scheduler({"a": ()}, {"a": Restart("on-failure", 2)})
    assert s.due() == (["a"], [])
    for restart in (1, 2):
        assert not s.on_outcome("a", Outcome.FAILED)  # not final: a restart follows
        assert s.on_ended("a")
        assert not s.idle
        assert s.due() == (["a"], [])
        assert s.restarts["a"] == restart
    assert s.on_outcome("a", Outcome.FAILED)  # the third failure is final
    assert not s.on_ended("a")
    assert s.due() == ([], []) and s.idle
    assert (s.outcomes["a"], s.restarts["a"]) == (Outcome.FAILED, 2)


def test_on_failure_stops_restarting_once_it_is_ok() -> None:
    s = Scheduler({"a": (), "b": (("a", "ok"),)}, {"a": Restart("on-failure", 3)})
    assert s.due() == (["a"], [])
    assert run(s, "a", Outcome.FAILED)
    assert s.due() == (["a"], [])  # b waits: a's failure was not final
    assert s.on_outcome("a", Outcome.OK)
    assert s.due() == (["b"], [])  # final at once, before its driver is gone
    assert not s.on_ended("a")
    assert s.restarts["a"] == 1


def test_a_driver_that_died_failed_and_is_restarted_on_failure() -> None:
    s = Scheduler({"a": ()}, {"a": Restart("on-failure", 1)})
    s.due()
    assert run(s, "a", None)
    assert s.due() == (["a"], [])
    assert not run(s, "a", None)
    assert s.outcomes["a"] is Outcome.FAILED and s.idle


def test_always_restarts_after_ok_and_dependants_wait_for_the_last_run() -> None:
    s = Scheduler({"a": (), "b": (("a", "ok"),), "c": (("a", "ready"),)},
                  {"a": Restart("always", 2)})
    assert s.due() == (["a"], [])
    assert run(s, "a", Outcome.OK)  # ok, not ready: c keeps waiting for a later run
    assert s.due() == (["a"], [])
    assert run(s, "a", Outcome.OK)
    assert s.due() == (["a"], [])
    assert not run(s, "a", Outcome.OK)
    # the last run's ok is final; never ready in any run: c can never start
    assert s.due() == (["b"], [NeverStarted("c", Outcome.FAILED, "dependency a failed")])
    assert s.restarts["a"] == 2


def test_always_ready_in_an_earlier_run_is_enough() -> None:
    s = Scheduler({"a": (), "c": (("a", "ready"),)}, {"a": Restart("always", 1)})
    s.due()
    s.on_ready("a")
    assert s.due() == (["c"], [])
    assert run(s, "a", Outcome.FAILED)
    assert s.due() == (["a"], [])


def test_always_fails_finally_with_the_last_outcome() -> None:
    s = Scheduler({"a": (), "b": (("a", "ok"),)}, {"a": Restart("always", 1)})
    s.due()
    assert run(s, "a", Outcome.OK)
    assert s.due() == (["a"], [])
    assert not run(s, "a", Outcome.FAILED)
    assert s.due() == ([], [NeverStarted("b", Outcome.FAILED, "dependency a failed")])


def test_never_restarted_after_a_stop() -> None:
    s = Scheduler({"a": ()}, {"a": Restart("always", 3)})
    s.due()
    assert not run(s, "a", Outcome.STOPPED)  # stopped on request: never again
    s = Scheduler({"a": ()}, {"a": Restart("always", 3)})
    s.due()
    s.cancel()
    assert not run(s, "a", Outcome.OK)
    assert s.due() == ([], []) and s.idle


def test_a_stop_cancels_a_restart_that_was_to_come() -> None:
    s = Scheduler({"a": (), "b": ()}, {"a": Restart("on-failure", 3),
                                       "b": Restart("on-failure", 3)})
    s.due()
    assert not s.on_outcome("a", Outcome.FAILED)  # a restart was to follow ...
    assert run(s, "b", Outcome.FAILED)  # ... and one is due
    assert s.cancel() == []
    assert not s.on_ended("a")  # ... until the stop: final
    assert {"a", "b"} <= s.final and s.outcomes["a"] is Outcome.FAILED
    assert s.due() == ([], []) and s.idle
    assert s.restarts == {"a": 0, "b": 0}


def test_a_restart_refused_at_spawn_keeps_the_last_outcome() -> None:
    s = Scheduler({"a": (), "b": (("a", "ok"),)}, {"a": Restart("on-failure", 3)})
    s.due()
    assert run(s, "a", Outcome.FAILED)
    assert s.due() == (["a"], [])
    s.restart_refused("a")  # a stop came as it was being spawned
    assert s.cancel() == [NeverStarted("b", Outcome.STOPPED, "stopped before it started")]
    assert "a" in s.final and s.outcomes["a"] is Outcome.FAILED and s.restarts["a"] == 0
    assert s.idle
