"""The stack's lock: one running supervisor per stack, found by its pid.

The supervisor holds an exclusive flock on `<stack>/lock` and writes its pid there; its
drivers inherit the descriptor, so the stack counts as running until the last of them
is gone.  `control.lock_holder` reads it from the other side.
"""

from __future__ import annotations

import fcntl
import os
import time

from vmrun import procs
from vmrun.errors import HostError
from vmrun.layout import StackPaths, private_dir, short_root_base

ORPHAN_WAIT = 20.0  # seconds to wait for the drivers of a dead supervisor to end


def take(paths: StackPaths, stack_name: str, manifest: str) -> int:
    """Create the stack's directory (0700) and take its lock (drivers are given the
    descriptor: they keep the stack locked while they live)."""
    claim(paths)
    try:
        fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise _unusable(paths, exc) from None
    if not _lock(fd, paths):
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise HostError(f'stack "{stack_name}" is already running (pid {pid})',
                        hint=f"see it with `vmrun ps {manifest}`, stop it with "
                             f"`vmrun down {manifest}`")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def claim(paths: StackPaths) -> None:
    """Make the stack's directory (0700, marked as vmrun's); refuse one vmrun did not make."""
    if not paths.is_ours():
        raise not_ours(paths)
    private_dir(short_root_base())
    private_dir(paths.runtime)
    try:
        paths.dir.mkdir(parents=True, exist_ok=True)
        paths.dir.chmod(0o700)
        paths.marker.touch()
        (paths.runtime / "state-dir").write_text(f"{paths.dir}\n")
    except OSError as exc:
        raise _unusable(paths, exc) from None


def _unusable(paths: StackPaths, exc: OSError) -> HostError:
    return HostError(f"the state directory {paths.dir} is unusable: {exc.strerror}",
                     hint="pass --state-dir DIR or set state_dir in the manifest "
                          "to a writable directory")


def not_ours(paths: StackPaths) -> HostError:
    return HostError(f"{paths.dir} exists and was not made by vmrun: not touching it",
                     hint="choose another state_dir (or --state-dir), or another stack name")


def _lock(fd: int, paths: StackPaths) -> bool:
    """Take the lock; False when a live supervisor holds it.  Drivers whose supervisor
    died may hold it a little longer (until they notice): they are ended, and waited for."""
    deadline = time.monotonic() + ORPHAN_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            if not text.isdigit() or procs.alive(int(text)) or time.monotonic() > deadline:
                return False
        procs.kill_and_wait(procs.stack_processes(paths, []), timeout=1.0)
        time.sleep(0.05)
