"""The driver zygote: imports the driver and libvirt once, then forks a driver per request.

Run as ``python -m vmrun.proc.zygote STACKDIR PAD`` by the supervisor (vmrun/zygote.py is
its side), in the stack's PID namespace, with a SOCK_SEQPACKET socket on fd 3.  Why: a
driver started as a fresh Python took ~0.1 s (idle machine) to 0.25 s (guests booting)
before it could open its root, in series for every VM, and kept ~20 MiB of its own; a
fork of a process that has already imported everything is ready in a millisecond and
shares those pages.

The protocol, one datagram each way per driver:

* supervisor -> zygote: JSON ``{"argv": [...], "title": [...]}`` with three or four
  descriptors (SCM_RIGHTS): the driver's command pipe (its fd 0), its log (fds 1 and 2),
  its event pipe (fd 3) and the stack's lock, which the driver keeps open as long as it
  lives.  The zygote itself holds nothing of the stack: it may be started before the
  supervisor has the lock (vmrun/headstart.py).
* zygote -> supervisor: the driver's pid in the namespace, with a pidfd of it (which names
  the process for the supervisor, whose pids differ from the namespace's).

A driver is forked with CLONE_PARENT (`_fastsig.fork_sibling`), so it is the supervisor's
child like any other: the supervisor reaps it and reads its exit status, and its parent-
death signal follows the supervisor.  The fork sets its command line to what a driver
started the old way showed (``python -m vmrun.proc.driver run|probe {"name", "dir"}``;
`PAD`, an argument of the right length, leaves room for it), for ps(1), `vmrun`'s own
leftover search (vmrun.procs) and the tests.

Nothing here may start a thread: forks of a threaded process inherit only the forking
thread, and a driver must enter namespaces before any thread exists (vmrun.proc.driver).
Importing libvirt starts none (it calls virInitialize, which reads LIBVIRT_LOG_OUTPUTS
now: the supervisor sets it to stderr, fd 2 of each driver is that driver's log).  The
zygote dies with the supervisor: EOF on its socket, or the parent-death signal.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import os
import signal
import socket
import sys

from vmrun import _fastsig
from vmrun.proc import driver
from vmrun.zygote import READY, SOCK_FD

MAX_REQUEST = 65536


def serve(sock: socket.socket) -> None:
    sock.send(READY)
    while True:
        data, fds, _flags, _addr = socket.recv_fds(sock, MAX_REQUEST, 4)
        if not data:
            return  # the supervisor is gone (or done)
        request = json.loads(data)
        pid = _fastsig.fork_sibling()
        if pid == 0:
            try:
                become_driver(sock, fds, request)
            finally:
                os._exit(1)
        for fd in fds:
            os.close(fd)
        pidfd = os.pidfd_open(pid)
        try:
            socket.send_fds(sock, [str(pid).encode()], [pidfd])
        finally:
            os.close(pidfd)


def become_driver(sock: socket.socket, fds: list[int], request: dict[str, object]) -> None:
    """In the fork: a process group of its own (as `vmrun.spawn` gives every child: the
    supervisor ends a driver and libvirt's forks in it with killpg), the descriptors in
    place, the rest closed; then the driver."""
    os.setpgid(0, 0)
    command_r, log, event_w = fds[:3]
    keep = fds[3] if len(fds) > 3 else -1  # the lock: received above fd 3, kept there
    for target, source in ((0, command_r), (1, log), (2, log), (driver.EVENT_FD, event_w)):
        os.dup2(source, target)
    sock.detach()
    first = driver.EVENT_FD + 1
    if keep >= first:
        os.closerange(first, keep)
        os.closerange(keep + 1, 1 << 20)
    else:
        os.closerange(first, 1 << 20)
    title = request["title"]
    assert isinstance(title, list)
    _fastsig.set_cmdline(_nul_joined(sys.orig_argv), _nul_joined(title))
    argv = request["argv"]
    assert isinstance(argv, list)
    sys.argv = [str(a) for a in argv]
    driver.main(sys.argv)  # ends with os._exit


def _nul_joined(args: list[str]) -> bytes:
    return b"".join(os.fsencode(a) + b"\0" for a in args)


def main(argv: list[str]) -> int:
    # Before anything else: the zygote ends with the supervisor (EOF on the socket is the
    # other way).  Its parent-death signal is SIGKILL: it holds no state worth saving.
    supervisor = os.getppid()
    if not _fastsig.set_pdeathsig(signal.SIGKILL, supervisor):
        return 1
    importlib.import_module("libvirt")  # what every driver needs, loaded once
    gc.collect()
    gc.freeze()  # what is here now is shared with every fork: keep the collector off it
    sock = socket.socket(fileno=SOCK_FD)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        serve(sock)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
