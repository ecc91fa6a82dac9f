"""The supervisor's side of the driver zygote (vmrun/proc/zygote.py: why, and the protocol).

`start()` spawns it, inside the stack's PID namespace: from `vmrun up` before the lock is
taken (vmrun/headstart.py; the supervisor adopts it), or from the supervisor
(`Children.start_zygote`, vmrun/children.py).  `Zygote.fork()` has it fork one driver and
returns that driver's pid as the supervisor sees it, read from the pidfd the zygote sends
along (/proc/self/fdinfo: "Pid:"), so there is no search for it.  The caller holds
SIGCHLD and the stop signals meanwhile (vmrun.children): a driver that dies at once stays
a zombie, so its pid is still there to be read.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from vmrun.errors import HostError
from vmrun.pidns import PidNamespace, born_inside
from vmrun.spawn import FORWARDED, spawn

SOCK_FD = 3  # the zygote's socket, in the zygote
READY = b"ready"  # the zygote's first message: its imports are done
READY_TIMEOUT = 120.0  # its imports, on a machine busy booting guests
REPLY_TIMEOUT = 30.0


def title(kind: str, name: str, directory: str) -> list[str]:
    """The command line a driver shows (ps, vmrun.procs, the tests)."""
    return [sys.executable, "-m", "vmrun.proc.driver", kind,
            json.dumps({"name": name, "dir": directory})]


def argv(stack_dir: str, titles: Sequence[Sequence[str]]) -> list[str]:
    """The zygote's command line: long enough for every driver's title to fit in it."""
    head = [sys.executable, "-m", "vmrun.proc.zygote", os.path.join(stack_dir, "")]
    need = max((sum(len(os.fsencode(a)) + 1 for a in t) for t in titles), default=0)
    have = sum(len(os.fsencode(a)) + 1 for a in head) + 1  # + the pad's NUL
    return [*head, "-" * max(1, need - have)]


def start(stack_dir: Path, titles: Sequence[Sequence[str]], log: Path,
          pidns: PidNamespace | None) -> Zygote:
    """Spawn the zygote (inside `pidns`, if any) with `log` as its stdout and stderr;
    `titles`: the command line of every driver it may fork.  It holds nothing of the
    stack (the lock goes to each driver with its request), so it may start before the
    supervisor takes the lock (vmrun/headstart.py)."""
    ours, theirs = socketpair()
    env = dict(os.environ)
    env.pop("PYTHONSTARTUP", None)
    env["LIBVIRT_LOG_OUTPUTS"] = "3:stderr"  # fd 2 of each driver is its own log
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_bytes(b"")
    try:
        with born_inside(pidns):
            pid = spawn(argv(str(stack_dir), titles), fds={SOCK_FD: theirs.fileno()}, env=env,
                        log=log, hold=FORWARDED)
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    assert pid is not None
    return Zygote(pid, ours, str(log))


class Zygote:
    def __init__(self, pid: int, sock: socket.socket, log: str) -> None:
        self.pid = pid
        self.sock = sock
        self.log = log
        self.ready = False

    def wait_ready(self) -> None:
        if self.ready:
            return
        self.sock.settimeout(READY_TIMEOUT)
        try:
            data = self.sock.recv(64)
        except (OSError, TimeoutError):
            data = b""
        if data != READY:
            raise HostError(f"vmrun's driver zygote did not start (see {self.log})")
        self.ready = True

    def fork(self, argv: Sequence[str], title: Sequence[str], command_r: int, log: int,
             event_w: int, keep: int) -> int:
        """A new driver running `argv`; its pid (ours).  `keep`: a descriptor the driver
        keeps open (the stack's lock), or -1.  After `wait_ready()` (which may take a
        while: not with signals held).  Raises HostError."""
        assert self.ready, "wait_ready() first"
        request = json.dumps({"argv": list(argv), "title": list(title)})
        self.sock.settimeout(REPLY_TIMEOUT)
        try:
            socket.send_fds(self.sock, [request.encode()],
                            [command_r, log, event_w, *([keep] if keep >= 0 else [])])
            data, fds, _flags, _addr = socket.recv_fds(self.sock, 64, 1)
        except (OSError, TimeoutError) as exc:
            raise HostError(f"vmrun's driver zygote failed: {exc} (see {self.log})") from None
        if not data or not fds:
            raise HostError(f"vmrun's driver zygote is gone (see {self.log})")
        try:
            return pid_of(fds[0])
        finally:
            for fd in fds:
                os.close(fd)

    def close(self) -> None:
        """EOF on its socket: the zygote exits (the caller reaps it)."""
        self.sock.close()

    def end(self) -> None:
        """Close its socket, kill it and reap it (the caller's reaper, if any, is off)."""
        self.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):  # reaped already
            os.waitpid(self.pid, 0)


def pid_of(pidfd: int) -> int:
    with open(f"/proc/self/fdinfo/{pidfd}") as f:
        for line in f:
            if line.startswith("Pid:"):
                pid = int(line.split()[1])
                if pid > 0:
                    return pid
    raise HostError("a driver vmrun's zygote forked is not visible here")


def socketpair() -> tuple[socket.socket, socket.socket]:
    """(ours, the zygote's): SOCK_SEQPACKET keeps each request a datagram."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

