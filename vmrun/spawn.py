"""The one way the supervisor starts a child process: `spawn()`.

Why not subprocess.Popen: the supervisor reaps every child in exactly one place (the
SIGCHLD handler of `vmrun._fastsig`), and Popen's wait() would race it.  `spawn()` only
starts the process (os.posix_spawn) and returns its pid; the caller registers it with
the reaper's bookkeeping.

What it guarantees, in one place:
* The child gets exactly the descriptors it is given, at the numbers it is given
  (`fds`: child fd -> parent fd), and nothing else: vmrun's own descriptors are
  close-on-exec, inheritable ones the supervisor itself inherited (from a shell, say)
  are closed in the child, and the copies made for the renumbering are closed again
  here.
* Signals in `hold` are blocked in the supervisor from before the spawn until the
  caller's `registered(pid)` has run (a stop signal in between would reach the other
  children but not this one), and they stay blocked in the child, which unblocks them
  once its own handlers are in.
* The child runs in a process group of its own (the terminal's Ctrl-C reaches the
  supervisor only, which decides who hears of it).
"""

from __future__ import annotations

import fcntl
import os
import signal
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

# The stop signals the supervisor forwards to every child: held while one is spawned.
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

# Renumbering copies are made at or above this, clear of every target number.
_HIGH_FD = 64


def _inherited() -> list[int]:
    """Open descriptors above 2 that are not close-on-exec."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if fd > 2 and not fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC:
                found.append(fd)
        except OSError:  # listdir's own descriptor, closed by now
            continue
    return found


def spawn(argv: Sequence[str], *, fds: Mapping[int, int], env: Mapping[str, str],
          log: Path | None = None, hold: Sequence[signal.Signals] = (),
          registered: Callable[[int], None] | None = None,
          proceed: Callable[[], bool] | None = None) -> int | None:
    """Start `argv`; return its pid.  stdout and stderr go to `log` (appended) or
    /dev/null; fd 0 is /dev/null unless `fds` gives one.  With `proceed`, asked once
    the `hold` signals are blocked: False starts nothing and returns None."""
    assert all(target > 2 or target == 0 for target in fds), "stdout/stderr are the log"
    high = max([_HIGH_FD, *(target + 1 for target in fds)])
    copies = [fcntl.fcntl(source, fcntl.F_DUPFD_CLOEXEC, high) for source in fds.values()]
    actions: list[tuple[int, ...] | tuple[int, int, str, int, int]] = [
        (os.POSIX_SPAWN_CLOSE, fd) for fd in _inherited() if fd not in fds]
    if 0 not in fds:
        actions.append((os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0))
    actions += [(os.POSIX_SPAWN_OPEN, 1, str(log) if log else os.devnull,
                 os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600),
                (os.POSIX_SPAWN_DUP2, 1, 2)]
    # dup2 onto the target clears close-on-exec there; the copies are all above every
    # target, so no target is overwritten before it has been read.
    actions += [(os.POSIX_SPAWN_DUP2, copy, target)
                for copy, target in zip(copies, fds, strict=True)]
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, hold) if hold else None
    try:
        if proceed is not None and not proceed():
            return None  # decided with the signals held: nothing slips in between
        pid = os.posix_spawn(argv[0], list(argv), dict(env), file_actions=actions,
                             setpgroup=0, setsigmask=hold)
        if registered is not None:
            registered(pid)
    finally:
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for copy in copies:
            os.close(copy)
    return pid
