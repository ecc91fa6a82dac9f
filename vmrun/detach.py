"""`vmrun up --detach`: run the supervisor in the background and report when it is up.

The supervisor is forked into a new session (no controlling terminal, so the shell's
Ctrl-C does not reach it), with its output in `<stack>/up.log`.  It reports to the
waiting foreground process over a pipe, as JSON lines: one `vm` line per VM that reached
the awaited state, then `up`, or `failed` (a VM failed first) or `error` (exit 2/3
before anything started).  The foreground process exits as soon as it knows.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

from vmrun.errors import EXIT_FAILED, VmrunError
from vmrun.layout import StackPaths
from vmrun.manifest import Stack


class _Reporter:
    """Supervisor listener in the background process: tells the foreground when it is up."""

    def __init__(self, stack: Stack, fd: int, wait_ready: bool, log: Any) -> None:
        self.fd = fd
        self.target = "ready" if wait_ready else "running"
        self.pending = {vm.name for vm in stack.vms}
        self.log = log

    def send(self, **message: Any) -> None:
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            os.write(self.fd, (json.dumps(message) + "\n").encode())

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __call__(self, vm: str, event: str, data: dict[str, Any]) -> None:
        if event in ("console", "tick"):
            return
        self.log.write(f"vmrun: {vm or 'stack'}: {event} {json.dumps(data)}\n")
        self.log.flush()
        if event == "result" and data.get("outcome") != "ok":
            # Any VM that ends badly before the whole stack is up, ready or not.
            self.send(ev="failed", vm=vm, outcome=data.get("outcome"),
                      reason=data.get("reason") or "")
            self.close()
            return
        if vm not in self.pending:
            return
        reached = event in (self.target, "result") or (event == "ready" and
                                                      self.target == "running")
        if reached:
            self.pending.discard(vm)
            self.send(ev="vm", vm=vm, state=self.target)
            if not self.pending:
                self.send(ev="up", pid=os.getpid())
                self.close()


def start(stack: Stack, wait_ready: bool, fresh: bool = False) -> Iterator[dict[str, Any]]:
    """Fork the supervisor into the background; yield its reports until it is up or not."""
    from vmrun.supervisor import Supervisor

    paths = StackPaths(stack.state_dir)
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the background supervisor
        code = EXIT_FAILED
        try:
            os.close(read_fd)
            os.setsid()
            reporter = None
            try:
                paths.dir.mkdir(parents=True, exist_ok=True)
                # Appended to, never truncated: if the stack is running already, this
                # process only learns so in Supervisor.run(), and its log must survive.
                log = open(paths.dir / "up.log", "a", buffering=1)  # noqa: SIM115
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)
                os.dup2(log.fileno(), 1)
                os.dup2(log.fileno(), 2)
                reporter = _Reporter(stack, write_fd, wait_ready, log)
                result = Supervisor(stack, reporter, fresh=fresh).run()
                code = result.exit
                log.write(f"vmrun: exit status {code}\n")
            except VmrunError as exc:
                code = exc.exit_code
                message = {"ev": "error", "code": code, "lines": exc.lines()}
                with contextlib.suppress(OSError):
                    os.write(write_fd, (json.dumps(message) + "\n").encode())
            except OSError as exc:
                message = {"ev": "error", "code": 3,
                           "lines": [f"cannot start in the background: {exc}"]}
                with contextlib.suppress(OSError):
                    os.write(write_fd, (json.dumps(message) + "\n").encode())
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as reports:
        for line in reports:
            with contextlib.suppress(ValueError):
                yield json.loads(line)
