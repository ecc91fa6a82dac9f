"""`vmrun up --detach`: run the supervisor in the background and report when it is up.

The supervisor is forked into a new session (no controlling terminal, so the shell's
Ctrl-C does not reach it), with its output in `<stack>/up.log`.  It reports to the
waiting foreground process over a pipe, as JSON lines: one `vm` line per VM that reached
the awaited state, then `up`, or `failed` (a VM failed first) or `error` (exit 2/3
before anything started).  The foreground process exits as soon as it knows.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

from vmrun import host, lock
from vmrun import protocol as p
from vmrun.errors import EXIT_FAILED, VmrunError
from vmrun.manifest import Stack


class _Reporter:
    """Supervisor listener in the background process: tells the foreground when it is up."""

    def __init__(self, stack: Stack, fd: int, wait_ready: bool, log: Any) -> None:
        self.fd = fd
        # the states in which a VM counts as up
        self.reached = {p.VMState.READY, p.VMState.STOPPED}
        if not wait_ready:
            self.reached |= {p.VMState.RUNNING, p.VMState.STOPPING}
        self.target = p.VMState.READY if wait_ready else p.VMState.RUNNING
        self.pending = {vm.name for vm in stack.vms}
        self.log = log

    def send(self, report: p.DetachReport) -> None:
        if self.fd >= 0:
            p.send(self.fd, report)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __call__(self, vm: str, event: p.Note, state: p.VMState | None) -> None:
        if isinstance(event, p.Console | p.Tick):
            return
        self.log.write(f"vmrun: {vm or 'stack'}: {event.to_json()}\n")
        self.log.flush()
        if isinstance(event, p.Result) and event.outcome is not p.Outcome.OK:
            # Any VM that ends badly before the whole stack is up, ready or not.
            self.send(p.VMFailed(vm=vm, outcome=event.outcome, reason=event.reason))
            self.close()
            return
        if vm in self.pending and state in self.reached:
            self.pending.discard(vm)
            self.send(p.VMReached(vm=vm, state=self.target))
            if not self.pending:
                self.send(p.StackUp(pid=os.getpid()))
                self.close()


def start(stack: Stack, the_host: host.Host, wait_ready: bool,
          fresh: bool = False) -> Iterator[p.DetachReport]:
    """Fork the supervisor into the background; yield its reports until it is up or not."""
    from vmrun.supervisor import Supervisor

    paths = stack.paths
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the background supervisor
        code = EXIT_FAILED
        try:
            os.close(read_fd)
            os.setsid()
            try:
                lock.claim(paths)
                # Appended to, never truncated: if the stack is running already, this
                # process only learns so in Supervisor.run(), and its log must survive.
                log = open(paths.up_log, "a", buffering=1)  # noqa: SIM115
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)
                os.dup2(log.fileno(), 1)
                os.dup2(log.fileno(), 2)
                reporter = _Reporter(stack, write_fd, wait_ready, log)
                result = Supervisor(stack, reporter, fresh=fresh, the_host=the_host).run()
                code = result.exit if result.exit is not None else EXIT_FAILED
                log.write(f"vmrun: exit status {code}\n")
            except VmrunError as exc:
                code = exc.exit_code
                p.send(write_fd, p.StartError(code=code, lines=tuple(exc.lines())))
            except OSError as exc:
                p.send(write_fd, p.StartError(
                    code=3, lines=(f"cannot start in the background: {exc}",)))
        finally:
            os._exit(code)
    os.close(write_fd)
    reader = p.LineReader()
    with os.fdopen(read_fd, "rb", buffering=0) as reports:
        while data := reports.read(65536):
            for line in reader.feed(data):
                with contextlib.suppress(p.ProtocolError):
                    yield p.decode_report(line)
