"""Tests for vmrun._fastsig with real processes and real signals (no mocking).

install() takes over SIGCHLD and reaps *every* child of the calling process with
waitpid(-1), and the module state is process-global.  So each scenario runs in a
forked "scenario process": it installs the handlers, spawns its own children and
asserts; pytest's process only waits for that one pid and reports the traceback the
scenario sent back through a pipe.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
import traceback
from collections.abc import Callable, Iterable

import pytest

from vmrun import _fastsig as fastsig

SCENARIO_ALARM = 25  # seconds; SIGALRM (default action) kills a stuck scenario process
WAIT = 10.0  # seconds any single expected event may take


# --------------------------------------------------------------- pytest side


def run_forked(scenario: Callable[[], None], alarm: int = SCENARIO_ALARM) -> None:
    """Run scenario() in a forked process; fail with its traceback if it fails."""
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # scenario process: never return into pytest
        code = 1
        try:
            os.close(report_r)
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            signal.alarm(alarm)
            scenario()
            code = 0
        except BaseException:
            with contextlib.suppress(BaseException):
                os.write(report_w, traceback.format_exc().encode())
        finally:
            os._exit(code)

    os.close(report_w)
    # Grandchildren forked by a scenario inherit report_w, so EOF on report_r does not
    # mean the scenario is done; watch the scenario's pidfd instead.
    pidfd = os.pidfd_open(pid)
    os.set_blocking(report_r, False)
    report = bytearray()
    status = None
    try:
        deadline = time.monotonic() + alarm + 5
        while status is None and time.monotonic() < deadline:
            ready, _, _ = select.select([report_r, pidfd], [], [], deadline - time.monotonic())
            report += _read_available(report_r)
            if pidfd in ready:
                status = os.waitpid(pid, 0)[1]
    finally:
        if status is None:  # timed out (or pytest-timeout interrupted us)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        report += _read_available(report_r)
        os.close(pidfd)
        os.close(report_r)
    text = report.decode(errors="replace")
    if status is None:
        pytest.fail(f"scenario timed out:\n{text}")
    if status != 0:
        pytest.fail(f"scenario failed ({_describe(status)}):\n{text}")


def _read_available(fd: int) -> bytes:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"


# --------------------------------------------------------------- scenario helpers


def spawn(argv: list[str], **kwargs: object) -> int:
    return os.posix_spawn(argv[0], argv, os.environ, **kwargs)  # type: ignore[arg-type]


def wake_pipe() -> tuple[int, int]:
    """A pipe for install(): (read end, non-blocking; write end)."""
    r, w = os.pipe()
    os.set_blocking(r, False)
    return r, w


def wait_readable(fd: int, timeout: float = WAIT) -> bool:
    ready, _, _ = select.select([fd], [], [], timeout)
    return bool(ready)


def drain(fd: int) -> int:
    return len(_read_available(fd))


def collect(pids: Iterable[int], wake_r: int, timeout: float = WAIT) -> dict[int, int]:
    """reap() until every pid in pids has been returned (each exactly once)."""
    want = set(pids)
    got: dict[int, int] = {}
    deadline = time.monotonic() + timeout
    while True:
        for pid, status in fastsig.reap():
            assert pid not in got, f"pid {pid} reported twice"
            got[pid] = status
        if want <= got.keys():
            return got
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"not reaped in time: {sorted(want - got.keys())}"
        wait_readable(wake_r, remaining)
        drain(wake_r)


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of pid from /proc, or None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = data[data.rindex(")") + 2 :].split()
    return fields[0], int(fields[1])


def zombies_of(ppid: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = proc_stat(int(name))
            if st is not None and st[0] == "Z" and st[1] == ppid:
                found.append(int(name))
    return found


def no_children_left() -> bool:
    """True if this process has no children at all, zombie or alive (reaps nothing)."""
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return False


def exit_code(status: int) -> int:
    assert os.WIFEXITED(status), _describe(status)
    return os.WEXITSTATUS(status)


def term_signal(status: int) -> int:
    assert os.WIFSIGNALED(status), _describe(status)
    return os.WTERMSIG(status)


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    """Polling loop with a deadline, for events the kernel does not notify us of."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        select.select([], [], [], 0.001)


# --------------------------------------------------------------- tests: reaping


@pytest.mark.timeout(30)
def test_child_exit_is_reaped_by_handler_with_status() -> None:
    def scenario() -> None:
        r, w = wake_pipe()
        fastsig.install(w, [])
        pid = spawn(["/bin/sh", "-c", "exit 7"])
        assert wait_readable(r), "no wake-up byte after the child exited"
        # The handler wrote the byte after reaping: the zombie is gone already.
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        assert proc_stat(pid) is None
        reaped = fastsig.reap()
        assert [p for p, _ in reaped] == [pid]
        assert os.waitstatus_to_exitcode(reaped[0][1]) == 7
        assert fastsig.reap() == []

    run_forked(scenario)


@pytest.mark.timeout(30)
def test_burst_of_50_children_all_reaped_no_zombies() -> None:
    def scenario() -> None:
        r, w = wake_pipe()
        fastsig.install(w, [])
        gate_r, gate_w = os.pipe()
        expected = {}
        for i in range(50):
            pid = spawn(
                ["/bin/sh", "-c", f"read line; exit {i + 1}"],
                file_actions=[(os.POSIX_SPAWN_DUP2, gate_r, 0)],
            )
            expected[pid] = i + 1
        os.close(gate_r)
        assert fastsig.reap() == []  # nobody has exited yet
        os.close(gate_w)  # EOF for all 50 at once: they exit together
        # The handler alone must reap all of them, although the SIGCHLDs coalesce.
        deadline = time.monotonic() + WAIT
        while not no_children_left():
            assert wait_readable(r, deadline - time.monotonic()), zombies_of(os.getpid())
            drain(r)
        assert zombies_of(os.getpid()) == []
        reaped = fastsig.reap()
        assert len(reaped) == 50
        assert {pid: exit_code(st) for pid, st in reaped} == expected
        assert fastsig.reap() == []

    run_forked(scenario)


@pytest.mark.timeout(30)
def test_exit_before_registration_is_kept_until_reap() -> None:
    def scenario() -> None:
        r, w = wake_pipe()
        fastsig.install(w, [])
        pids = [spawn(["/bin/sh", "-c", f"exit {10 + i}"]) for i in range(5)]
        # Let the handler reap all of them before the "supervisor" records the pids.
        deadline = time.monotonic() + WAIT
        while not no_children_left():
            assert wait_readable(r, deadline - time.monotonic()), "children not reaped"
            drain(r)
        registry = {pid: 10 + i for i, pid in enumerate(pids)}
        reaped = fastsig.reap()
        assert len(reaped) == len(registry)
        assert {p: exit_code(st) for p, st in reaped} == registry
        assert fastsig.reap() == []

    run_forked(scenario)


@pytest.mark.timeout(30)
def test_reap_collects_zombies_the_handler_did_not_see() -> None:
    def scenario() -> None:
        r, w = wake_pipe()
        fastsig.install(w, [])
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGCHLD])
        pid = spawn(["/bin/sh", "-c", "exit 3"], setsigmask=[])
        # The handler cannot run; wait for (and consume) the pending SIGCHLD.
        assert signal.sigtimedwait([signal.SIGCHLD], WAIT) is not None
        assert proc_stat(pid) == ("Z", os.getpid())
        reaped = fastsig.reap()  # reaped by reap()'s own waitpid loop
        assert [p for p, _ in reaped] == [pid]
        assert exit_code(reaped[0][1]) == 3
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGCHLD])
        assert fastsig.reap() == []
        assert drain(r) == 0

    run_forked(scenario)


@pytest.mark.timeout(60)
def test_full_exit_buffer_leaves_zombies_for_reap() -> None:
    extra = 20

    def scenario() -> None:
        r, w = wake_pipe()
        fastsig.install(w, [])
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGCHLD])
        pids = [
            spawn(["/bin/true"], setsigmask=[]) for _ in range(fastsig.EXIT_BUFFER_SIZE + extra)
        ]
        running = set(pids)

        def all_exited() -> bool:
            for pid in list(running):
                if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
                    running.discard(pid)
            return not running

        wait_until(all_exited, timeout=30)
        # One handler run for all of them: it fills the buffer and stops reaping.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGCHLD])
        assert wait_readable(r)
        assert len(zombies_of(os.getpid())) == extra
        reaped = fastsig.reap()
        assert sorted(p for p, _ in reaped) == sorted(pids)
        assert all(exit_code(st) == 0 for _, st in reaped)
        assert no_children_left()
        assert fastsig.reap() == []

    run_forked(scenario, alarm=55)


@pytest.mark.timeout(30)
def test_subreaper_reaps_orphaned_grandchild() -> None:
    def scenario() -> None:
        fastsig.set_child_subreaper()
        r, w = wake_pipe()
        fastsig.install(w, [])
        hold_r, hold_w = os.pipe()  # the grandchild waits for EOF on this
        out_r, out_w = os.pipe()
        mid = spawn(
            ["/bin/sh", "-c", "(read line <&3; exit 5) >/dev/null & echo $!"],
            file_actions=[
                (os.POSIX_SPAWN_DUP2, hold_r, 3),
                (os.POSIX_SPAWN_DUP2, out_w, 1),
            ],
        )
        os.close(hold_r)
        os.close(out_w)
        out = b""
        while True:  # until EOF: the intermediate shell has exited
            assert wait_readable(out_r)
            chunk = os.read(out_r, 100)
            if not chunk:
                break
            out += chunk
        grandchild = int(out)
        assert exit_code(collect([mid], r)[mid]) == 0
        # Orphaned by its parent, re-parented to us rather than to init.
        state, parent = proc_stat(grandchild)
        assert parent == os.getpid() and state in ("S", "R"), (state, parent)
        os.close(hold_w)
        got = collect([grandchild], r)
        assert exit_code(got[grandchild]) == 5
        assert zombies_of(os.getpid()) == []
        assert no_children_left()

    run_forked(scenario)


# --------------------------------------------------------------- tests: forwarding


@pytest.mark.timeout(30)
def test_forwarded_sigterm_reaches_registered_process() -> None:
    def scenario() -> None:
        r, w = wake_pipe()
        fastsig.install(w, [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
        child = spawn(["/bin/sleep", "30"], setpgroup=0)
        assert os.getpgid(child) == child != os.getpgid(0)
        fastsig.register_process(child)
        assert drain(r) == 0
        os.kill(os.getpid(), signal.SIGTERM)  # we survive: the C handler took it
        assert wait_readable(r), "wake fd not readable after SIGTERM"
        got = collect([child], r)
        assert term_signal(got[child]) == signal.SIGTERM
        assert fastsig.take_signals() == [signal.SIGTERM]
        assert fastsig.take_signals() == []

    run_forked(scenario)


@pytest.mark.timeout(30)
def test_take_signals_ascending_once_each() -> None:
    def scenario() -> None:
        r, w = wake_pipe()
        fastsig.install(w, [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1])
        for sig in (signal.SIGUSR1, signal.SIGINT, signal.SIGHUP, signal.SIGHUP):
            os.kill(os.getpid(), sig)
        assert wait_readable(r)
        assert fastsig.take_signals() == sorted([signal.SIGHUP, signal.SIGINT, signal.SIGUSR1])
        assert fastsig.take_signals() == []

    run_forked(scenario)


@pytest.mark.timeout(30)
def test_forward_from_python_and_process_registry() -> None:
    def scenario() -> None:
        r, w = wake_pipe()
        fastsig.install(w, [signal.SIGTERM])
        a = spawn(["/bin/sleep", "30"], setpgroup=0)
        b = spawn(["/bin/sleep", "30"], setpgroup=0)
        assert fastsig.forward(0) == 0  # nothing registered
        fastsig.register_process(a)
        fastsig.register_process(b)
        fastsig.register_process(b)  # idempotent
        assert fastsig.forward(0) == 2
        fastsig.unregister_process(a)
        fastsig.unregister_process(a)  # not registered: no-op
        assert fastsig.forward(signal.SIGTERM) == 1
        assert term_signal(collect([b], r)[b]) == signal.SIGTERM
        st = proc_stat(a)
        assert st is not None and st[0] != "Z"  # a was not signalled
        fastsig.register_process(a)
        # b is gone now, so only the kill() for a succeeds.
        assert fastsig.forward(signal.SIGKILL) == 1
        assert term_signal(collect([a], r)[a]) == signal.SIGKILL
        assert fastsig.take_signals() == []  # forward() is not an arrival

        for bad in (0, 1, -5):
            with pytest.raises(ValueError):
                fastsig.register_process(bad)
        with pytest.raises(ValueError):
            fastsig.forward(-1)
        with pytest.raises(ValueError):
            fastsig.forward(100000)

    run_forked(scenario)


@pytest.mark.timeout(30)
def test_register_process_overflow() -> None:
    def scenario() -> None:
        fastsig.unregister_process(0)  # harmless
        # pgids above PID_MAX_LIMIT (2**22) can never exist, so nothing can be hit.
        fake = [2**30 + i for i in range(fastsig.MAX_PROCESSES)]
        for pgid in fake:
            fastsig.register_process(pgid)
        fastsig.register_process(fake[0])  # already there: still fine when full
        with pytest.raises(OverflowError):
            fastsig.register_process(2**30 + fastsig.MAX_PROCESSES)
        fastsig.unregister_process(fake[10])
        fastsig.register_process(2**30 + fastsig.MAX_PROCESSES)
        assert fastsig.forward(0) == 0

    run_forked(scenario)


# --------------------------------------------------------------- tests: install/uninstall


@pytest.mark.timeout(30)
def test_reinstall_replaces_and_uninstall_restores() -> None:
    def scenario() -> None:
        seen: list[int] = []
        signal.signal(signal.SIGHUP, lambda s, f: seen.append(s))
        signal.signal(signal.SIGTERM, lambda s, f: seen.append(s))
        r1, w1 = wake_pipe()
        r2, w2 = wake_pipe()

        fastsig.install(w1, [signal.SIGHUP, signal.SIGTERM, signal.SIGINT])
        os.kill(os.getpid(), signal.SIGHUP)
        assert wait_readable(r1)
        assert fastsig.take_signals() == [signal.SIGHUP]
        assert seen == []

        fastsig.install(w2, [signal.SIGHUP, signal.SIGINT])  # SIGTERM given back
        drain(r1)
        os.kill(os.getpid(), signal.SIGTERM)
        wait_until(lambda: seen == [signal.SIGTERM])
        os.kill(os.getpid(), signal.SIGHUP)
        assert wait_readable(r2)
        assert not wait_readable(r1, 0)
        assert fastsig.take_signals() == [signal.SIGHUP]
        assert seen == [signal.SIGTERM]

        fastsig.uninstall()
        fastsig.uninstall()  # idempotent
        drain(r2)
        os.kill(os.getpid(), signal.SIGHUP)
        wait_until(lambda: seen == [signal.SIGTERM, signal.SIGHUP])
        with pytest.raises(KeyboardInterrupt):  # Python's SIGINT handler is back
            os.kill(os.getpid(), signal.SIGINT)
            wait_until(lambda: False)
        # SIGCHLD is back to SIG_DFL: the child stays a zombie for os.waitpid.
        pid = spawn(["/bin/sh", "-c", "exit 4"])
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 4
        assert fastsig.reap() == []
        assert drain(r2) == 0
        assert fastsig.take_signals() == []

    run_forked(scenario)


@pytest.mark.timeout(30)
def test_install_validation_and_nonblocking_wake_fd() -> None:
    def scenario() -> None:
        r, w = os.pipe()  # blocking on purpose
        closed_r, closed_w = os.pipe()
        os.close(closed_r)
        os.close(closed_w)
        with pytest.raises(OSError):
            fastsig.install(closed_w, [])
        for bad in (signal.SIGCHLD, signal.SIGKILL, signal.SIGSTOP, 0, -1, 1000):
            with pytest.raises(ValueError):
                fastsig.install(w, [bad])
        assert os.get_blocking(w)  # failed installs changed nothing

        fastsig.install(w, [signal.SIGUSR1])
        assert not os.get_blocking(w)
        # Fill the pipe: the handlers must neither block nor fail on EAGAIN.
        os.set_blocking(r, False)
        with pytest.raises(BlockingIOError):
            while True:
                os.write(w, b"x" * 4096)
        with pytest.raises(BlockingIOError):
            while True:
                os.write(w, b"x")
        for _ in range(5):
            os.kill(os.getpid(), signal.SIGUSR1)
        pid = spawn(["/bin/sh", "-c", "exit 9"])
        wait_until(no_children_left)  # no wake-up possible while the pipe is full
        assert [(p, exit_code(st)) for p, st in fastsig.reap()] == [(pid, 9)]
        assert fastsig.take_signals() == [signal.SIGUSR1]
        drain(r)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert drain(r) == 1  # one byte per handler run once there is room again

    run_forked(scenario)


# --------------------------------------------------------------- tests: prctl


@pytest.mark.timeout(30)
def test_set_pdeathsig_return_value_and_errors() -> None:
    def scenario() -> None:
        assert fastsig.set_pdeathsig(signal.SIGTERM, os.getppid()) is True
        assert fastsig.set_pdeathsig(signal.SIGTERM, -1) is False
        assert fastsig.set_pdeathsig(0, os.getppid()) is True  # 0 clears it
        with pytest.raises(OSError):
            fastsig.set_pdeathsig(1000, os.getppid())
        with pytest.raises(OSError):
            fastsig.set_pdeathsig(-1, os.getppid())

    run_forked(scenario)


@pytest.mark.timeout(30)
def test_pdeathsig_child_dies_with_its_parent() -> None:
    def scenario() -> None:
        fastsig.set_child_subreaper()
        r, w = wake_pipe()
        fastsig.install(w, [])
        ready_r, ready_w = os.pipe()  # child -> us: "<pid> <set_pdeathsig result>"
        die_r, die_w = os.pipe()  # us -> parent: exit now
        block_r, block_w = os.pipe()  # the child blocks reading this forever

        mid = os.fork()
        if mid == 0:  # the parent
            try:
                signal.alarm(SCENARIO_ALARM)
                fastsig.uninstall()
                os.close(block_w)
                parent = os.getpid()
                child = os.fork()
                if child == 0:  # the child
                    try:
                        ok = fastsig.set_pdeathsig(signal.SIGTERM, parent)
                        os.write(ready_w, f"{os.getpid()} {int(ok)}\n".encode())
                        os.read(block_r, 1)  # until SIGTERM kills us
                    finally:
                        os._exit(99)
                os.read(die_r, 1)
            finally:
                os._exit(0)

        os.close(block_r)
        assert wait_readable(ready_r)
        child_pid, child_ok = map(int, os.read(ready_r, 100).split())
        assert child_ok == 1  # set_pdeathsig() returned True in the child
        os.write(die_w, b"x")
        got = collect([mid, child_pid], r)
        assert exit_code(got[mid]) == 0
        assert term_signal(got[child_pid]) == signal.SIGTERM
        assert no_children_left()

    run_forked(scenario)


@pytest.mark.timeout(30)
def test_set_pdeathsig_reports_parent_already_gone() -> None:
    def scenario() -> None:
        fastsig.set_child_subreaper()
        r, w = wake_pipe()
        fastsig.install(w, [])
        me = os.getpid()
        gone_r, gone_w = os.pipe()  # EOF once the parent has exited
        info_r, info_w = os.pipe()  # parent -> us: the child's pid

        mid = os.fork()
        if mid == 0:  # the parent
            try:
                fastsig.uninstall()
                parent = os.getpid()
                child = os.fork()
                if child == 0:  # the child
                    code = 2
                    try:
                        signal.alarm(SCENARIO_ALARM)
                        os.close(gone_w)
                        os.read(gone_r, 1)  # EOF: the parent is exiting
                        # Re-parenting follows closing the fds; no event for it.
                        wait_until(lambda: os.getppid() != parent)
                        ok = fastsig.set_pdeathsig(signal.SIGTERM, parent)
                        code = 0 if ok is False and os.getppid() == me else 1
                    finally:
                        os._exit(code)
                os.write(info_w, str(child).encode())
            finally:
                os._exit(0)

        os.close(gone_w)
        os.close(gone_r)
        os.close(info_w)
        assert wait_readable(info_r)
        child_pid = int(os.read(info_r, 100))
        got = collect([mid, child_pid], r)
        assert exit_code(got[mid]) == 0
        # 0: set_pdeathsig returned False and the orphan was re-parented to us.
        assert exit_code(got[child_pid]) == 0
        assert no_children_left()

    run_forked(scenario)
