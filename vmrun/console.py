"""Serial consoles: the relay inside a driver and the interactive client of `vmrun console`.

QEMU serves the guest's first serial port on a UNIX socket and accepts one connection:
the driver's.  The driver's relay copies everything the guest writes to the VM's
console.log and, line by line, to the driver's main loop; it also serves `attach.sock`
in the VM's root, where `vmrun console` clients connect: they get the guest's output as
it comes, and what they type goes to the guest.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import sys
import termios
import time
import tty
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

ESCAPE = 0x1D  # Ctrl-]
MAX_LINE = 16384  # a console "line" longer than this is handed on in pieces
CLIENT_SEND_TIMEOUT = 2.0
# After piped (non-terminal) input ends, output is still shown until the guest has been
# quiet this long, or at most DRAIN_MAX seconds.
DRAIN_QUIET = 1.0
DRAIN_MAX = 10.0


class Log:
    """The console log.  A write that fails (a full disk) loses that chunk, not the
    relay: patterns are matched on what the guest printed, logged or not."""

    def __init__(self, path: str) -> None:
        self.lost = 0  # bytes not written
        self.error = ""
        self.file: BinaryIO | None = None
        try:
            self.file = open(path, "ab", buffering=0)  # noqa: SIM115
        except OSError as exc:
            self.error = exc.strerror or str(exc)

    def write(self, chunk: bytes) -> None:
        written = 0
        try:
            if self.file is not None:
                written = self.file.write(chunk) or 0
        except OSError as exc:
            self.error = exc.strerror or str(exc)
        self.lost += len(chunk) - written

    def warning(self) -> str | None:
        if not self.lost:
            return None
        return f"console.log incomplete: {self.lost} bytes not written ({self.error})"

    def close(self) -> None:
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.close()


def relay(qemu_socket: str, attach_socket: str, log_path: str,
          on_line: Callable[[str], None], on_connected: Callable[[], None]) -> str | None:
    """Run until the guest's console closes (QEMU exited).  Returns a warning when the
    log could not be written whole."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(qemu_socket)
    finally:
        on_connected()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(attach_socket)
    old_umask = os.umask(0o177)
    try:
        listener.bind(attach_socket)
    finally:
        os.umask(old_umask)
    listener.listen(4)
    clients: list[socket.socket] = []
    pending = b""
    log = Log(log_path)
    try:
        while True:
            readable, _, _ = select.select([sock, listener, *clients], [], [])
            if listener in readable:
                client, _ = listener.accept()
                client.settimeout(CLIENT_SEND_TIMEOUT)
                clients.append(client)
            for client in [c for c in clients if c in readable]:
                try:
                    data = client.recv(4096)
                    if data:
                        sock.sendall(data)
                except OSError:
                    data = b""
                if not data:
                    clients.remove(client)
                    client.close()
            if sock not in readable:
                continue
            try:
                chunk = sock.recv(65536)
            except OSError:
                chunk = b""
            if not chunk:
                break
            log.write(chunk)
            for client in list(clients):
                try:
                    client.sendall(chunk)
                except OSError:  # a client that does not keep up is dropped
                    clients.remove(client)
                    client.close()
            pending += chunk
            *lines, pending = pending.split(b"\n")
            if len(pending) > MAX_LINE:  # no newline for that long: match it in pieces
                lines.append(pending)
                pending = b""
            for line in lines:
                on_line(line.rstrip(b"\r").decode("utf-8", "replace"))
        if pending:
            on_line(pending.rstrip(b"\r").decode("utf-8", "replace"))
    finally:
        log.close()
    for client in clients:
        client.close()
    listener.close()
    with contextlib.suppress(OSError):
        os.unlink(attach_socket)
    sock.close()
    return log.warning()


class _Leave(Exception):
    pass


def _raise_leave(signum: int, frame: Any) -> None:
    raise _Leave


def attach(attach_socket: Path, stdin: int = 0, stdout: int = 1) -> str:
    """Connect the terminal to a guest's console until Ctrl-], EOF or a signal.

    The terminal is put in raw mode and restored on every way out.  Input that is not a
    terminal (a pipe) is sent as it is; at its end the session lasts until the guest has
    been quiet for DRAIN_QUIET seconds.  Returns why it ended: "escape", "closed" (the VM
    stopped) or "signal".
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.connect(str(attach_socket))
    saved = termios.tcgetattr(stdin) if os.isatty(stdin) else None
    handlers = {s: signal.signal(s, _raise_leave)
                for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    why = "closed"
    inputs = [stdin, sock.fileno()]
    drain_until: float | None = None
    try:
        if saved is not None:
            tty.setraw(stdin, termios.TCSANOW)
        while True:
            wait = None
            if drain_until is not None:
                wait = min(DRAIN_QUIET, max(0.0, drain_until - time.monotonic()))
            readable, _, _ = select.select(inputs, [], [], wait)
            if not readable:  # piped input is done and the guest has gone quiet
                why = "escape"
                break
            if sock.fileno() in readable:
                data = sock.recv(65536)
                if not data:
                    break
                os.write(stdout, data)
            if stdin in readable:
                data = os.read(stdin, 4096)
                if not data:
                    # End of piped input: show what the guest answers, then leave.
                    inputs.remove(stdin)
                    drain_until = time.monotonic() + DRAIN_MAX
                    continue
                if ESCAPE in data:
                    sock.sendall(data[:data.index(ESCAPE)])
                    why = "escape"
                    break
                sock.sendall(data)
    except _Leave:
        why = "signal"
    finally:
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        sock.close()
        sys.stdout.flush()
    return why
