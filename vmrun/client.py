"""Reaching a running stack from another shell: is it running, ask its supervisor.

A running `vmrun up` holds an exclusive flock on `<stack>/lock` (its drivers hold it
too, so the stack counts as running until the last of them is gone) and serves
`<stack>/control.sock` (mode 0600, in the 0700 state directory; see vmrun.control).
Requests and replies are single JSON lines (vmrun.protocol).  A socket is only trusted
while the lock is held: a socket left by a supervisor that died is detected (lock free,
or connection refused) and removed.
"""

from __future__ import annotations

import fcntl
import json
import os

from vmrun import procs
from vmrun.errors import HostError
from vmrun.layout import StackPaths, remove, short_socket_path

TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket
    from typing import Any


class NotRunning(Exception):
    """The stack has no live supervisor."""


class NoAnswer(HostError):
    """The stack's lock is held but its supervisor does not answer."""

    def __init__(self, paths: StackPaths, holder: int | None) -> None:
        super().__init__(f"the stack in {paths.dir} holds its lock (pid {holder}) but does "
                         "not answer on its control socket",
                         hint=f"try again in a moment, or stop it: kill {holder}")


def lock_holder(paths: StackPaths) -> int | None:
    """The supervisor's pid while the lock is held (-1: not written yet), or None when
    nothing runs.  A lock held after its supervisor died (its drivers hold it until they
    have noticed and ended) counts as not running: what is left is for `down` to end."""
    try:
        fd = os.open(paths.lock, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise HostError(f"cannot read the stack's lock {paths.lock}: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            if not text.isdigit():
                return -1
            return int(text) if procs.alive(int(text)) else None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def connect(paths: StackPaths, timeout: float | None = 10.0) -> socket.socket:
    """Connect to a running stack; raise NotRunning (cleaning a stale socket) otherwise."""
    if lock_holder(paths) is None:
        remove_stale_socket(paths)
        raise NotRunning
    import socket  # not for `vmrun ps` of a stack that is not running

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        with short_socket_path(paths.control_socket) as path:
            sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        holder = lock_holder(paths)
        if holder is None:
            remove_stale_socket(paths)
            raise NotRunning from None
        raise NoAnswer(paths, holder) from None
    except OSError:
        sock.close()
        raise NoAnswer(paths, lock_holder(paths)) from None
    return sock


def remove_stale_socket(paths: StackPaths) -> None:
    remove(paths.control_socket)


def request(paths: StackPaths, message: dict[str, Any],
            timeout: float | None = 10.0) -> tuple[dict[str, Any], socket.socket]:
    """Send one request, return the first reply and the socket (for more replies/EOF)."""
    sock = connect(paths, timeout)
    return exchange(paths, sock, message), sock


def exchange(paths: StackPaths, sock: socket.socket, message: dict[str, Any]) -> dict[str, Any]:
    """Send one request on a connected socket and return the first reply (closing the
    socket on failure)."""
    try:
        sock.sendall((json.dumps(message) + "\n").encode())
        line = sock.makefile("rb").readline()
        reply: dict[str, Any] = json.loads(line) if line else {}
    except (OSError, ValueError):  # TimeoutError included: a supervisor that hangs
        sock.close()
        raise NoAnswer(paths, lock_holder(paths)) from None
    if not line:
        sock.close()
        raise NotRunning
    return reply


def wait_closed(sock: socket.socket, timeout: float | None) -> bool:
    """Wait until the server closes the connection (its supervisor has exited)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    except OSError:
        pass
    finally:
        sock.close()
    return True
