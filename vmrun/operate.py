"""Verbs that operate a stack from another shell: ps, down, logs, clean.

They find the stack through its manifest (and --state-dir), talk to a running
supervisor over the control socket, and fall back to the state directory when nothing
runs.  Nothing here prints: the CLI does.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmrun import control, netns, procs
from vmrun.errors import HostError, UsageError
from vmrun.layout import StackPaths
from vmrun.manifest import MAX_SECONDS, Stack

# How long `down` waits beyond its timeout for the supervisor to finish.
DOWN_GRACE = 20.0


def paths_of(stack: Stack) -> StackPaths:
    return StackPaths(stack.state_dir)


def status(stack: Stack) -> dict[str, Any] | None:
    """The running stack's state from its supervisor, or None when it is not running."""
    try:
        reply, sock = control.request(paths_of(stack), {"cmd": "ps"})
    except control.NotRunning:
        return None
    sock.close()
    return reply


def last_run(stack: Stack) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(paths_of(stack).last_run.read_text())
    except (OSError, ValueError):
        return None
    return data


@dataclass(frozen=True)
class DownResult:
    was_running: bool
    supervisor_pid: int | None
    killed: tuple[int, ...]  # leftover processes of a crashed run that were killed


def down(stack: Stack, timeout: float | None) -> DownResult:
    """Stop a running stack gracefully and wait until it is gone; else clean up leftovers."""
    if timeout is not None and not (0 <= timeout <= MAX_SECONDS):
        raise UsageError(f"--timeout takes a number of seconds from 0 to {MAX_SECONDS}, "
                         f"not {timeout}")
    paths = paths_of(stack)
    wait_for = stack.stop_timeout if timeout is None else timeout
    request: dict[str, Any] = {"cmd": "down"}
    if timeout is not None:
        request["timeout"] = timeout
    try:
        reply, sock = control.request(paths, request)
    except control.NotRunning:
        killed = procs.clean_runtime(paths, [vm.name for vm in stack.vms])
        netns.teardown(stack.state_dir)
        return DownResult(False, None, tuple(killed))
    if not control.wait_closed(sock, wait_for + DOWN_GRACE):
        raise HostError(f'stack "{stack.name}" did not stop within {wait_for + DOWN_GRACE:g}s',
                        hint=f"its supervisor is pid {reply.get('pid')}")
    # Drivers hold the lock until they have exited: wait for that too.
    deadline = time.monotonic() + DOWN_GRACE
    while control.lock_holder(paths) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    return DownResult(True, reply.get("pid"), ())


def clean(stack: Stack) -> list[Path]:
    """Remove the stack's whole state; refused while it runs.  Returns what was removed."""
    paths = paths_of(stack)
    holder = control.lock_holder(paths)
    if holder is not None:
        raise HostError(f'stack "{stack.name}" is running (pid {holder}); not removing '
                        "its state", hint=f"stop it first: vmrun down {stack.path}")
    names = [vm.name for vm in stack.vms]
    if paths.dir.is_dir():  # VMs of earlier versions of the manifest too
        vms_dir = paths.dir / "vms"
        if vms_dir.is_dir():
            names += [p.name for p in vms_dir.iterdir() if p.name not in names]
    procs.clean_runtime(paths, names)
    netns.teardown(stack.state_dir)
    removed = []
    for name in names:
        vm = paths.vm(name)
        if vm.root != vm.root_link and vm.root.exists():
            shutil.rmtree(vm.root)
            removed.append(vm.root)
    if paths.dir.exists():
        shutil.rmtree(paths.dir)
        removed.append(paths.dir)
    return removed


def check_vm_names(stack: Stack, names: Sequence[str]) -> list[str]:
    known = [vm.name for vm in stack.vms]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UsageError(f"{stack.path}: no VM named " + ", ".join(f'"{n}"' for n in unknown),
                         hint="VMs: " + ", ".join(known))
    return list(names) or known


def _tail_lines(path: Path, count: int | None) -> tuple[list[str], int]:
    try:
        data = path.read_bytes()
    except OSError:  # not there (yet), or the state directory is unusable
        return [], 0
    text = data.decode("utf-8", "replace")
    complete, _, _partial = text.rpartition("\n")
    lines = [line.rstrip("\r") for line in complete.split("\n")] if complete else []
    if count is not None:
        lines = lines[-count:] if count > 0 else []
    return lines, len(data) - len(_partial.encode("utf-8", "replace"))


def logs(stack: Stack, names: Sequence[str], follow: bool, tail: int | None,
         poll: float = 0.1) -> Iterator[tuple[str, str]]:
    """(vm, line) of the VMs' consoles; with `follow`, until the stack stops running."""
    if tail is not None and tail < 0:
        raise UsageError(f"--tail takes a number of lines, 0 or more, not {tail}")
    paths = paths_of(stack)
    names = check_vm_names(stack, names)
    offsets: dict[str, int] = {}
    for name in names:
        lines, offsets[name] = _tail_lines(paths.vm(name).console_log, tail)
        for line in lines:
            yield name, line
    if not follow:
        return
    pending = {name: b"" for name in names}
    running = control.lock_holder(paths) is not None
    while True:
        for name in names:
            log = paths.vm(name).console_log
            try:
                size = log.stat().st_size
            except OSError:
                continue
            if size < offsets[name]:  # a new run truncated it
                offsets[name], pending[name] = 0, b""
            if size == offsets[name]:
                continue
            with open(log, "rb") as f:
                f.seek(offsets[name])
                data = f.read()
            offsets[name] += len(data)
            *complete, pending[name] = (pending[name] + data).split(b"\n")
            for raw in complete:
                yield name, raw.rstrip(b"\r").decode("utf-8", "replace")
        if not running:
            return
        running = control.lock_holder(paths) is not None  # one more pass after it stops
        time.sleep(poll)
