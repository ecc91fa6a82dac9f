"""Find and end the processes a stack left behind, by what /proc says about them.

A QEMU belongs to a VM when its command line names that VM's embedded root (every QEMU
libvirt starts there carries paths under its root); a pid from a pidfile alone is never
trusted, since pids are reused.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from vmrun.layout import StackPaths, remove


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _under(path: Path) -> bytes:
    """`path/` as bytes: matches paths under it, not under a sibling sharing its prefix."""
    return os.fsencode(str(path).rstrip("/") + "/")


def is_qemu_of(pid: int, root: Path) -> bool:
    """True while `pid` is a live QEMU started for the embedded root `root`."""
    cmd = cmdline(pid)
    return b"qemu" in cmd and _under(root) in cmd and alive(pid)


def innermost_pid(pid: int) -> int | None:
    """The pid of `pid` in its own (innermost) PID namespace: the last NSpid field."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return int(line.split()[-1])
    except (OSError, ValueError):
        pass
    return None


def qemus_of(root: Path) -> list[int]:
    """Live QEMUs started for the embedded root `root` (pids as this process sees them)."""
    return [pid for pid in all_pids() if is_qemu_of(pid, root)]


def using(path: Path) -> bool:
    """True when a live process names `path` (or something under it) on its command line:
    a driver (its spec) or a QEMU of an embedded root."""
    under = _under(path)
    return any(under in cmdline(pid) and alive(pid) for pid in all_pids())


def all_pids() -> Iterable[int]:
    return (int(entry) for entry in os.listdir("/proc") if entry.isdigit())


def stack_processes(paths: StackPaths, names: Iterable[str],
                    spare: Iterable[int] = ()) -> list[int]:
    """Live QEMUs of the named VMs and live drivers (and zygotes) of the stack, but for
    the pids in `spare` (this run's own zygote)."""
    roots = [_under(paths.vm(name).root) for name in names]
    stack_dir = _under(paths.dir)
    found = []
    for pid in all_pids():
        cmd = cmdline(pid)
        if b"qemu" in cmd and any(root in cmd for root in roots) or \
                (b"vmrun.proc.driver" in cmd or b"vmrun.proc.zygote" in cmd) and stack_dir in cmd:
            found.append(pid)
    spared = {os.getpid(), *spare}
    return [pid for pid in found if alive(pid) and pid not in spared]


def kill_and_wait(pids: Iterable[int], wait: Callable[[float], None] | None = None,
                  timeout: float = 10.0) -> list[int]:
    """SIGKILL the pids and wait until none is alive; return those still alive."""
    pids = list(pids)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while True:
        pids = [pid for pid in pids if alive(pid)]
        if not pids or time.monotonic() > deadline:
            return pids
        (wait or time.sleep)(0.05)


def clean_runtime(paths: StackPaths, names: Iterable[str],
                  wait: Callable[[float], None] | None = None,
                  spare: Iterable[int] = ()) -> list[int]:
    """End what a crashed run of the stack left and drop libvirt's stale runtime state.

    Returns the pids that were killed.
    """
    names = list(names)
    leftovers = stack_processes(paths, names, spare)
    kill_and_wait(leftovers, wait)
    for name in names:
        vm = paths.vm(name)
        remove(vm.run_dir)
        remove(vm.console_socket)
    return leftovers
