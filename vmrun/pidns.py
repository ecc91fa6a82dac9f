"""The stack's PID namespace: nothing of a stack outlives its supervisor.

The supervisor's children (drivers, the probe, the forwarder) are born in a PID
namespace whose init is a small C program, vmrun-nsinit (vmrun/nsinit.c, built with the
extension: it reaps orphans and exits when the supervisor is gone).
When that init exits, for whatever reason, the kernel kills every process of the
namespace, QEMUs included, whatever order a `kill -9` of the whole tree takes: the
supervisor's death ends the init (parent-death signal, and EOF on a pipe only the
supervisor holds), and the init's death ends the rest.

Inside, pids are the namespace's: libvirt's pidfiles hold those, and a driver mounts a
/proc of its own (`_fastsig.private_proc`) so that libvirt reads the right processes.
The supervisor, outside, finds QEMU by its command line (procs.qemus_of).  A PID
namespace needs root (CAP_SYS_ADMIN); for other users the stack runs without one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from vmrun import _fastsig, procs
from vmrun.spawn import spawn

INIT = Path(__file__).with_name("vmrun-nsinit")
INIT_GUARD_FD = 3  # the read end of its guard pipe, in the init


class PidNamespace:
    """Create with `PidNamespace.create()`; spawn children inside `entered()`; `close()`
    ends the init and with it everything still in the namespace."""

    def __init__(self, init_pid: int, guard: int, fd: int, own: int) -> None:
        self.init_pid = init_pid
        self.guard = guard  # write end of the init's guard pipe
        self.fd = fd  # the namespace
        self.own = own  # the supervisor's own PID namespace

    @classmethod
    def create(cls) -> PidNamespace | None:
        """A new namespace with its init running; None when this user cannot make one."""
        if os.geteuid() != 0:
            return None
        own = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        guard_r, guard_w = os.pipe2(os.O_CLOEXEC)
        try:
            _fastsig.unshare_pid_namespace()
            try:
                # pid 1 of the new namespace
                pid = spawn([str(INIT)], fds={INIT_GUARD_FD: guard_r}, env={})
                assert pid is not None
                fd = os.open(f"/proc/{pid}/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
            finally:
                _fastsig.enter_pid_namespace(own)  # later children: here, as before
        except BaseException:
            for each in (own, guard_w):
                os.close(each)
            raise
        finally:
            os.close(guard_r)
        return cls(pid, guard_w, fd, own)

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Children spawned meanwhile are born in the namespace."""
        _fastsig.enter_pid_namespace(self.fd)
        try:
            yield
        finally:
            _fastsig.enter_pid_namespace(self.own)

    def adopted(self, ns_pid: int) -> int | None:
        """Our pid of the process `ns_pid` of the namespace, if the init has adopted it
        (a daemonized QEMU has): a look at the init's children, not a scan of /proc."""
        try:
            with open(f"/proc/{self.init_pid}/task/{self.init_pid}/children") as f:
                children = [int(pid) for pid in f.read().split()]
        except (OSError, ValueError):
            return None
        return next((pid for pid in children if procs.innermost_pid(pid) == ns_pid), None)

    def close(self) -> None:
        """End the init, and so everything still in the namespace.  The caller reaps
        `init_pid` (it is the supervisor's child)."""
        for fd in (self.guard, self.fd, self.own):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.guard = self.fd = self.own = -1


def born_inside(pidns: PidNamespace | None) -> contextlib.AbstractContextManager[None]:
    """Children spawned meanwhile are born in `pidns`, or where we are when it is None."""
    return pidns.entered() if pidns else contextlib.nullcontext()
