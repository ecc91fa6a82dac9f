"""Verbs that operate a stack from another shell: ps, down, logs, clean.

They find the stack through its identity (name, state directory, VM names: see
manifest.load_identity), not the whole manifest, so they work when the manifest no longer
validates (a deleted kernel must not keep `down` from stopping the stack).  They talk to
a running supervisor over the control socket and fall back to the state directory when
nothing runs.  Nothing here prints: the CLI does.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from vmrun import client
from vmrun.errors import HostError, UsageError
from vmrun.limits import MAX_SECONDS
from vmrun.record import Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence
    from typing import Any

    from vmrun import protocol as p
    from vmrun.identity import Identity

# `vmrun ps` of a stack that is not running imports none of vmrun.protocol (whose many
# dataclasses cost milliseconds), dataclasses, the manifest parser (vmrun.netns imports
# it) or socket: what only a running stack, `down` or `clean` needs is imported there.

# How long `down` waits beyond its timeout for the supervisor to finish.
DOWN_GRACE = 20.0


def status(stack: Identity) -> p.StackStatus | None:
    """The running stack's state from its supervisor, or None when it is not running."""
    paths = stack.paths
    try:
        sock = client.connect(paths)
    except client.NotRunning:
        return None
    from vmrun import protocol as p

    try:
        reply = client.exchange(paths, sock, p.PsRequest().to_dict())
    except client.NotRunning:
        return None
    sock.close()
    try:
        return p.StackStatus.from_dict(reply)
    except p.ProtocolError:
        raise client.NoAnswer(paths, client.lock_holder(paths)) from None


def last_run(stack: Identity) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(stack.paths.last_run.read_text())
    except (OSError, ValueError):
        return None
    return data


class DownResult(Record):  # a frozen value class (vmrun/record.py)
    was_running: bool
    supervisor_pid: int | None
    killed: tuple[int, ...]  # leftover processes of a crashed run that were killed

    def __init__(self, was_running: bool, supervisor_pid: int | None,
                 killed: tuple[int, ...]) -> None:
        self._set(was_running=was_running, supervisor_pid=supervisor_pid, killed=killed)


def down(stack: Identity, timeout: float | None) -> DownResult:
    """Stop a running stack gracefully and wait until it is gone; else clean up leftovers."""
    from vmrun import cgroups, lock, netns, procs
    from vmrun import protocol as p

    if timeout is not None and not (0 <= timeout <= MAX_SECONDS):
        raise UsageError(f"--timeout takes a number of seconds from 0 to {MAX_SECONDS}, "
                         f"not {timeout}")
    paths = stack.paths
    try:
        data, sock = client.request(paths, p.DownRequest(timeout=timeout).to_dict())
    except client.NotRunning:
        if not paths.is_ours():
            raise lock.not_ours(paths) from None
        killed = procs.clean_runtime(paths, stack.vm_names)
        netns.teardown(stack.state_dir)
        cgroups.remove(paths.vm(name).root for name in stack.vm_names)
        return DownResult(False, None, tuple(killed))
    try:
        reply = p.DownAccepted.from_dict(data)
    except p.ProtocolError:
        sock.close()
        raise client.NoAnswer(paths, client.lock_holder(paths)) from None
    if not client.wait_closed(sock, reply.timeout + DOWN_GRACE):
        raise HostError(f'stack "{stack.name}" did not stop within '
                        f"{reply.timeout + DOWN_GRACE:g}s",
                        hint=f"its supervisor is pid {reply.pid}")
    # Drivers hold the lock until they have exited: wait for that too.
    deadline = time.monotonic() + DOWN_GRACE
    while client.lock_holder(paths) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    return DownResult(True, reply.pid, ())


def clean(stack: Identity) -> list[Path]:
    """Remove the stack's whole state; refused while it runs.  Returns what was removed."""
    import shutil

    from vmrun import cgroups, lock, netns, procs

    paths = stack.paths
    if not paths.is_ours():
        raise lock.not_ours(paths)
    holder = client.lock_holder(paths)
    if holder is not None:
        raise HostError(f'stack "{stack.name}" is running (pid {holder}); not removing '
                        "its state", hint=f"stop it first: vmrun down {stack.path}")
    names = list(stack.vm_names)
    if paths.dir.is_dir():  # VMs of earlier versions of the manifest too
        vms_dir = paths.dir / "vms"
        if vms_dir.is_dir():
            names += [p.name for p in vms_dir.iterdir() if p.name not in names]
    procs.clean_runtime(paths, names)
    netns.teardown(stack.state_dir)
    cgroups.remove(paths.vm(name).root for name in names)
    removed = []
    for name in names:
        vm = paths.vm(name)
        if vm.root != vm.root_link and vm.root.exists():
            shutil.rmtree(vm.root)
            removed.append(vm.root)
    if paths.dir.exists():
        shutil.rmtree(paths.dir)
        removed.append(paths.dir)
    if paths.runtime.is_dir():
        shutil.rmtree(paths.runtime, ignore_errors=True)
    return removed


def check_vm_names(stack: Identity, names: Sequence[str]) -> list[str]:
    known = list(stack.vm_names)
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


def logs(stack: Identity, names: Sequence[str], follow: bool, tail: int | None,
         poll: float = 0.1) -> Iterator[tuple[str, str]]:
    """(vm, line) of the VMs' consoles; with `follow`, until the stack stops running."""
    if tail is not None and tail < 0:
        raise UsageError(f"--tail takes a number of lines, 0 or more, not {tail}")
    paths = stack.paths
    names = check_vm_names(stack, names)
    offsets: dict[str, int] = {}
    for name in names:
        lines, offsets[name] = _tail_lines(paths.vm(name).console_log, tail)
        for line in lines:
            yield name, line
    if not follow:
        return
    pending = {name: b"" for name in names}
    running = client.lock_holder(paths) is not None
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
        running = client.lock_holder(paths) is not None  # one more pass after it stops
        time.sleep(poll)
