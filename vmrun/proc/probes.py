"""Readiness probes, run by a VM's driver: a TCP connect, or a command that must exit 0.

The driver runs inside the stack's network namespace, so both reach the guest's private
address directly.  A probe makes one attempt at a time and never blocks: `start` begins
an attempt (and may answer at once), the driver's select() waits on `fds()` until
`deadline()`, and `poll` says how the attempt went once it is over.  When it went is
the Watch's business (vmrun/watch.py: Action.PROBE, `Watch.probed`).

A command runs as a child of the driver and is reaped by its own pid only (Popen.poll,
waitpid(pid, WNOHANG)): libvirt forks and reaps its own helpers in the driver, so nothing
here may wait for any child (waitpid(-1)).  Its exit is seen through a pidfd, its output
(the last few lines, for the reason of a VM that never became ready) through a pipe.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import socket
import subprocess

from vmrun.protocol import ReadyProbe

Result = tuple[bool, str]  # (succeeded, how it failed)
OUTPUT_KEPT = 4096  # bytes of a command's output kept for the failure's description
POLL_WITHOUT_PIDFD = 0.1  # seconds between looks at a command when pidfds are missing


def _strerror(code: int) -> str:
    text = os.strerror(code)
    return text[:1].lower() + text[1:]


class PortProbe:
    """A non-blocking TCP connect to (address, port): ready once it is accepted."""

    def __init__(self, address: str, port: int, attempt_timeout: float | None) -> None:
        self.target = (address, port)
        self.attempt_timeout = attempt_timeout
        self.sock: socket.socket | None = None
        self.until: float | None = None

    @property
    def busy(self) -> bool:
        return self.sock is not None

    def _failure(self, what: str) -> Result:
        return False, f"{self.target[0]}:{self.target[1]}: {what}"

    def start(self, now: float) -> Result | None:
        self.cancel()
        sock = socket.socket(socket.AF_INET,
                             socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            code = sock.connect_ex(self.target)
        except OSError as exc:  # an address the kernel refuses outright
            sock.close()
            return self._failure(_strerror(exc.errno) if exc.errno else str(exc))
        if code == 0:
            sock.close()
            return True, ""
        if code != errno.EINPROGRESS:
            sock.close()
            return self._failure(_strerror(code))
        self.sock = sock
        self.until = None if self.attempt_timeout is None else now + self.attempt_timeout
        return None

    def poll(self, now: float) -> Result | None:
        if self.sock is None:
            return None
        _, writable, _ = select.select([], [self.sock], [], 0)
        if writable:
            code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            self.cancel()
            return (True, "") if code == 0 else self._failure(_strerror(code))
        if self.until is not None and now >= self.until:
            self.cancel()
            return self._failure(f"no answer within {self.attempt_timeout:g}s")
        return None

    def fds(self) -> tuple[list[int], list[int]]:
        """(readable, writable) descriptors that end the attempt."""
        return ([], [self.sock.fileno()]) if self.sock is not None else ([], [])

    def deadline(self) -> float | None:
        return self.until if self.sock is not None else None

    def cancel(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock = self.until = None


class CommandProbe:
    """A command (e.g. ssh … COMMAND) that makes the VM ready when it exits 0."""

    def __init__(self, argv: tuple[str, ...], attempt_timeout: float | None) -> None:
        self.argv = argv
        self.name = os.path.basename(argv[0]) if argv else "command"
        self.attempt_timeout = attempt_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.pidfd: int | None = None
        self.output = bytearray()
        self.until: float | None = None
        self.next_look: float | None = None  # without a pidfd

    @property
    def busy(self) -> bool:
        return self.proc is not None

    def start(self, now: float) -> Result | None:
        self.cancel()
        try:
            # stdin: not the driver's (its command pipe); own process group, so that a
            # signal meant for the driver's group does not reach it
            proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    close_fds=True, process_group=0)
        except OSError as exc:
            return False, f"{self.name}: {exc.strerror or exc}"
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), False)
        self.proc = proc
        self.output.clear()
        try:
            self.pidfd = os.pidfd_open(proc.pid)
        except OSError:  # an old kernel: look now and then instead
            self.pidfd = None
            self.next_look = now + POLL_WITHOUT_PIDFD
        self.until = None if self.attempt_timeout is None else now + self.attempt_timeout
        return None

    def _drain(self) -> None:
        if self.proc is None or self.proc.stdout is None:
            return
        with contextlib.suppress(BlockingIOError, OSError):
            while data := os.read(self.proc.stdout.fileno(), 65536):
                self.output += data
                del self.output[:-OUTPUT_KEPT]

    def _last_line(self) -> str:
        lines = [line.strip() for line in
                 self.output.decode("utf-8", "replace").splitlines() if line.strip()]
        return lines[-1][:200] if lines else ""

    def poll(self, now: float) -> Result | None:
        if self.proc is None:
            return None
        self._drain()
        code = self.proc.poll()  # waitpid(its pid, WNOHANG): never another child
        if code is None:
            if self.until is not None and now >= self.until:
                self.cancel()
                return False, f"{self.name}: no answer within {self.attempt_timeout:g}s"
            if self.pidfd is None:
                self.next_look = now + POLL_WITHOUT_PIDFD
            return None
        self._drain()
        last = self._last_line()
        self._close()
        if code == 0:
            return True, ""
        status = f"exit status {code}" if code > 0 else \
            f"killed by {signal.Signals(-code).name}" if -code in signal.valid_signals() \
            else f"killed by signal {-code}"
        return False, f"{self.name}: {status}" + (f": {last}" if last else "")

    def fds(self) -> tuple[list[int], list[int]]:
        if self.proc is None or self.proc.stdout is None:
            return [], []
        reads = [self.proc.stdout.fileno()]
        if self.pidfd is not None:
            reads.append(self.pidfd)
        return reads, []

    def deadline(self) -> float | None:
        if self.proc is None:
            return None
        times = [t for t in (self.until, self.next_look if self.pidfd is None else None)
                 if t is not None]
        return min(times) if times else None

    def _close(self) -> None:
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        if self.pidfd is not None:
            os.close(self.pidfd)
        self.proc = None
        self.pidfd = self.until = self.next_look = None

    def cancel(self) -> None:
        """End the attempt: kill the command and reap it (by its pid)."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # its group: its own children too
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        self._close()


Probe = PortProbe | CommandProbe


def make(spec: ReadyProbe) -> Probe:
    if spec.port is not None:
        return PortProbe(spec.address, spec.port, spec.attempt_timeout)
    return CommandProbe(spec.argv, spec.attempt_timeout)
