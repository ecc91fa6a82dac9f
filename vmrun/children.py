"""The supervisor's children: starting them, hearing from them, reaping them.

Exactly one place reaps: `reap()`, which takes what the SIGCHLD handler of
`vmrun._fastsig` collected (waitpid(-1, WNOHANG) in C, for every exited child at once:
drivers, the forwarder, and the QEMUs that re-parent here because the supervisor is a
child subreaper).  An exit can be reaped before its pid is known here (a child that dies
at once, a QEMU whose driver has not reported it yet): such exits are remembered.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vmrun import _fastsig, procs, zygote
from vmrun import protocol as p
from vmrun.layout import VMPaths
from vmrun.pidns import PidNamespace, born_inside
from vmrun.spawn import FORWARDED, spawn

EVENT_FD = 3  # a driver's event pipe, in the driver


@dataclass
class Child:
    """A driver process (for a VM, or the one-off capabilities probe)."""

    name: str  # the VM's; "" for the probe
    pid: int
    fd: int  # read end of its event pipe
    command_fd: int  # write end of its command pipe (its stdin)
    paths: VMPaths
    reader: p.LineReader = field(default_factory=p.LineReader)
    eof: bool = False
    status: int | None = None  # raw wait status once reaped
    state: p.VMState = p.VMState.STARTING
    qemu_pid: int | None = None
    running_at: float | None = None
    ended_at: float | None = None
    result: p.Result | None = None
    probed: bool = False
    reboots: int = 0  # Rebooted events: the guest came back in the same QEMU
    recorded: bool = False  # its end is in the VM's result (vmrun.supervisor)

    @property
    def done(self) -> bool:
        return self.eof and self.status is not None

    def command(self, command: p.Command) -> None:
        """Send a command to the driver; a driver that is gone cannot take it."""
        if self.command_fd >= 0:
            p.send(self.command_fd, command)

    def close_commands(self) -> None:
        if self.command_fd >= 0:
            os.close(self.command_fd)
            self.command_fd = -1

    def read(self) -> list[p.DriverEvent]:
        """The events the driver has sent so far (non-blocking); notes EOF (the caller
        closes `fd` then)."""
        events: list[p.DriverEvent] = []
        while not self.eof:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            if not data:
                self.eof = True
                break
            for line in self.reader.feed(data):
                with contextlib.suppress(p.ProtocolError):
                    events.append(p.decode_event(line))
        return events


class Children:
    def __init__(self, lock_fd: int = -1) -> None:
        self.lock_fd = lock_fd  # the stack's lock: drivers hold it while they live
        self.pidns: PidNamespace | None = None  # where children are born, if anywhere
        self.by_pid: dict[int, Child] = {}
        self.exits: dict[int, int] = {}  # pid -> raw status, for pids not (yet) known
        self.qemu_pids: set[int] = set()
        self.zygote: zygote.Zygote | None = None  # forks the drivers (vmrun/proc/zygote.py)
        self.zygote_args: tuple[Path, list[list[str]], Path] | None = None

    def start_zygote(self, stack_dir: Path, titles: Sequence[Sequence[str]], log: Path) -> None:
        """Start the driver zygote (vmrun/proc/zygote.py) now, so that its imports run
        while the supervisor prepares the rest; `titles`: every driver's command line."""
        self.zygote_args = (stack_dir, [list(t) for t in titles], log)
        self.zygote = zygote.start(stack_dir, titles, log, self.pidns)

    def adopt(self, pidns: PidNamespace | None, the_zygote: zygote.Zygote,
              stack_dir: Path, titles: Sequence[Sequence[str]], log: Path) -> None:
        """Take over a namespace and a zygote started before the lock was taken
        (vmrun/headstart.py); the zygote's log moves to `log`, where a zygote started
        again (`live_zygote`) writes too."""
        os.replace(the_zygote.log, log)
        the_zygote.log = str(log)
        self.pidns, self.zygote = pidns, the_zygote
        self.zygote_args = (stack_dir, [list(t) for t in titles], log)

    def live_zygote(self) -> zygote.Zygote:
        """The zygote; a new one if it is gone (killed, say: reaped, or a zombie still)."""
        if self.zygote is not None and (self.zygote.pid in self.exits
                                        or not procs.alive(self.zygote.pid)):
            self.exits.pop(self.zygote.pid, None)
            self.zygote.close()
            self.zygote = None
        if self.zygote is None:
            assert self.zygote_args is not None, "start_zygote() first"
            self.start_zygote(*self.zygote_args)
        assert self.zygote is not None
        return self.zygote

    def end_zygote(self) -> None:
        """End the zygote and reap it (the reaper is uninstalled by now)."""
        if self.zygote is not None:
            self.zygote.end()
            self.exits.pop(self.zygote.pid, None)
            self.zygote = None

    def spawn_driver(self, name: str, kind: str, spec: str, paths: VMPaths, log: Path,
                     proceed: Callable[[], bool] | None = None) -> Child | None:
        """Have the zygote fork a driver (`kind` "run" or "probe", its spec as JSON) with
        its event pipe on fd 3, its command pipe on stdin and `log` as stdout and stderr;
        None when `proceed` (asked with the stop signals held) says no.  Raises HostError
        when the zygote cannot."""
        log.parent.mkdir(parents=True, exist_ok=True)
        the_zygote = self.live_zygote()
        the_zygote.wait_ready()  # before the signals are held: its imports take a while
        event_r, event_w = os.pipe2(os.O_CLOEXEC)
        command_r, command_w = os.pipe2(os.O_CLOEXEC)
        log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        os.set_blocking(event_r, False)
        pid = None
        # Held until the pid is registered: a stop signal meanwhile reaches this driver
        # too, and a driver that exits at once stays a zombie until its pid is known.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, [*FORWARDED, signal.SIGCHLD])
        try:
            if proceed is None or proceed():
                pid = the_zygote.fork(["driver", kind, spec],
                                      zygote.title(kind, name, str(paths.dir)),
                                      command_r, log_fd, event_w, self.lock_fd)
                _fastsig.register_process(pid)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            for fd in (event_w, command_r, log_fd):
                os.close(fd)
            if pid is None:  # not started (or the zygote failed): our ends go too
                os.close(event_r)
                os.close(command_w)
        if pid is None:
            return None
        child = Child(name=name, pid=pid, fd=event_r, command_fd=command_w, paths=paths)
        self.by_pid[pid] = child
        if pid in self.exits:  # it exited before we got here
            child.status = self.exits.pop(pid)
        return child

    def spawn_other(self, argv: Sequence[str], fds: dict[int, int], log: Path,
                    python: bool = True) -> int:
        """Start a helper process (the forwarder: a Python module; passt: a program); its
        exit is in `exits` when reaped."""
        command = [sys.executable, "-m", *argv] if python else list(argv)
        with born_inside(self.pidns):
            pid = spawn(command, fds=fds, env=os.environ, log=log)
        assert pid is not None  # no `proceed`: always started
        return pid

    @property
    def parent_pid(self) -> int:
        """The supervisor's pid as its children see it: 0 from inside a PID namespace
        (the parent is outside it), for their parent-death checks."""
        return 0 if self.pidns else os.getpid()

    def reap(self) -> None:
        for pid, status in _fastsig.reap():
            child = self.by_pid.get(pid)
            if child is not None:
                child.status = status
                child.ended_at = time.time()
            elif pid in self.qemu_pids:
                self.qemu_pids.discard(pid)
            else:
                self.exits[pid] = status

    def qemu_started(self, pid: int) -> None:
        if pid in self.exits:
            del self.exits[pid]  # already gone and reaped
        else:
            self.qemu_pids.add(pid)

    def kill_qemu(self, child: Child) -> None:
        """Kill the QEMU of a driver that is gone (checked to be that VM's QEMU).  Only a
        driver that died before it reported its QEMU costs a scan of /proc (in a PID
        namespace the pidfile holds the namespace's pid, not ours)."""
        candidates = {child.qemu_pid, procs.read_pid(child.paths.pidfile)}
        if child.qemu_pid is None:
            candidates |= set(procs.qemus_of(child.paths.root))
        for pid in candidates:
            if pid and procs.is_qemu_of(pid, child.paths.root):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                self.qemu_pids.add(pid)

    def forget(self, child: Child) -> None:
        _fastsig.unregister_process(child.pid)
        child.close_commands()

    def settle_qemus(self) -> bool:
        """Drop QEMUs that are gone; True when none is left to be reaped."""
        self.qemu_pids = {pid for pid in self.qemu_pids if procs.alive(pid)}
        return not self.qemu_pids


def describe_status(status: int | None) -> str:
    if status is None:
        return "unknown status"
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        try:
            return f"killed by {signal.Signals(signum).name}"
        except ValueError:
            return f"killed by signal {signum}"
    if os.WIFEXITED(status):
        return f"exit status {os.WEXITSTATUS(status)}"
    return f"wait status {status}"
