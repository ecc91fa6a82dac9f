"""The control socket of a running stack, served by its supervisor: `ControlServer`.

`<stack>/control.sock` (mode 0600, in the 0700 state directory) takes `vmrun ps` and
`vmrun down` requests (vmrun.protocol) as single JSON lines; the client side is
vmrun.client.

Socket paths are limited to 108 bytes and a state directory can be deep, so the socket is
bound and reached through /proc/self/fd/N/control.sock, N an O_PATH descriptor of the
directory (layout.short_socket_path): a short path to a socket in a directory of any depth.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import selectors
import socket
import time
from collections.abc import Callable
from typing import Any

from vmrun.layout import StackPaths, private_dir, remove, short_socket_path


def listen(paths: StackPaths, backlog: int = 16) -> socket.socket:
    """Bind the control socket, mode 0600, non-blocking (the caller holds the stack's lock)."""
    private_dir(paths.runtime)
    remove(paths.control_socket)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        old_umask = os.umask(0o177)
        try:
            with short_socket_path(paths.control_socket) as path:
                sock.bind(path)
        finally:
            os.umask(old_umask)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _remove_socket(paths: StackPaths) -> None:
    remove(paths.control_socket)


# --- the server side ----------------------------------------------------------------------
#
# The supervisor is single-threaded: one selector loop carries the drivers' event streams,
# the signal wake-up pipe and this socket.  Whatever a client does (connect thousands of
# times, write without reading, send a 100 MB line, send garbage) must cost it its own
# connection at worst, never stall that loop nor grow the supervisor without bound.  Hence:
#
# - One selector, the caller's.  The listener and each client are registered with a
#   callable as `data` (the loop calls `key.data(mask)`); nothing here waits or loops on its
#   own.  No select(): it cannot take descriptors past FD_SETSIZE (the old loop died at about
#   1,100 connections).
# - Every socket is non-blocking.  A reply is appended to its client's output buffer and
#   written when the socket is writable; EVENT_WRITE is registered only while there is
#   something to write (or requests left to serve, see below).
# - Bounded work per readiness event: one recv() of READ_CHUNK bytes, at most
#   LINES_PER_EVENT requests, at most ACCEPTS_PER_EVENT connections.  A busy client gets its
#   turn again on the next round of the loop, after everyone else.
# - Bounded memory per client.  A request line is at most `max_line` bytes, and newlines are
#   only searched for in bytes not scanned before, so a long line costs linear time and is
#   refused as soon as it is too long: the input buffer never exceeds max_line + READ_CHUNK.
#   Output past `max_pending` (a client that does not read) drops the client.
# - Backpressure: after each batch of requests, the rest of what was read waits until the
#   client's socket is writable again; new input is read only once every request read is
#   served and the output buffer is below a high-water mark.  A client that writes without
#   reading thus fills its own socket buffers, not the supervisor's memory.
# - Caps: at most `max_clients` connections (`down` waiters included); one more is told so
#   and closed.  A client that moves no byte either way for `idle_timeout` seconds is dropped
#   (checked on the server's own events), so one that never reads does not keep its slot.
#   Out of descriptors, a spare one is given up to accept and refuse the newcomer, so the
#   listener does not spin.
# - A request is a JSON object on one UTF-8 line.  Anything else gets an error reply and
#   never reaches the handler; a handler that raises costs that client its connection (with
#   an error reply), never the server.  Nothing is logged or printed.

Handler = Callable[[dict[str, Any]], tuple[dict[str, Any], bool]]
"""handler(request) -> (reply, keep).  keep=True: the client now waits for EOF (`vmrun
down` waits for the supervisor's exit): once its reply is written the server stops reading
it and holds the connection open until `ControlServer.close()`."""

READ_CHUNK = 65536  # bytes read from one client per readiness event
LINES_PER_EVENT = 64  # requests served for one client per readiness event
ACCEPTS_PER_EVENT = 64  # connections taken per readiness event of the listener
BACKLOG = 128
TOO_MANY_CLIENTS = b'{"ok": false, "error": "too many clients"}\n'
OUT_OF_FDS = b'{"ok": false, "error": "the supervisor is out of file descriptors"}\n'


class _Client:
    __slots__ = ("sock", "inbuf", "scanned", "out", "reading", "waiter", "events", "active",
                 "closed")

    def __init__(self, sock: socket.socket, now: float) -> None:
        self.sock = sock
        self.inbuf = bytearray()  # request bytes not served yet
        self.scanned = 0  # inbuf[:scanned] holds no newline
        self.out = bytearray()  # reply bytes not written yet
        self.reading = True  # False after EOF, after a keep reply, once dropped
        self.waiter = False  # a keep reply was queued: hold the connection until close()
        self.events = 0  # what it is registered for (0: not registered)
        self.active = now  # when a byte last moved either way
        self.closed = False


def _parse(line: bytes) -> tuple[dict[str, Any] | None, str]:
    """The request on a line, or None and why it is not one."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return None, "the request is not valid UTF-8"
    try:
        request = json.loads(text)
    except (ValueError, RecursionError):
        return None, "the request is not valid JSON"
    if not isinstance(request, dict):
        return None, "the request is not a JSON object"
    return request, ""


def _encode(reply: dict[str, Any]) -> bytes:
    return (json.dumps(reply) + "\n").encode()


def _spare_fd() -> int:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return -1


class ControlServer:
    """Serve `<stack>/control.sock` from the caller's selector loop.

    The caller registers nothing itself: it runs
    `for key, mask in selector.select(timeout): key.data(mask)` and calls `close()` at
    the end.  `handler` is called for each request, in the loop, one at a time.
    """

    def __init__(self, paths: StackPaths, selector: selectors.BaseSelector, handler: Handler,
                 *, max_clients: int = 64, max_line: int = 64 * 1024,
                 max_pending: int = 1024 * 1024, idle_timeout: float = 60.0) -> None:
        """Bind <stack dir>/control.sock (mode 0600), listen, register the listener."""
        if min(max_clients, max_line, max_pending) < 1 or not idle_timeout > 0:
            raise ValueError("ControlServer limits must be positive")
        self.paths = paths
        self.selector = selector
        self.handler = handler
        self.max_clients = max_clients
        self.max_line = max_line
        self.max_pending = max_pending
        self.high_water = max(1, max_pending // 4)  # stop serving a client's requests above
        self.idle_timeout = idle_timeout
        self._clients: set[_Client] = set()
        self._closed = False
        self._next_sweep = time.monotonic() + self._sweep_period
        self._spare = _spare_fd()
        try:
            self._listener = listen(paths, BACKLOG)
        except BaseException:
            if self._spare >= 0:
                os.close(self._spare)
            raise
        try:
            selector.register(self._listener, selectors.EVENT_READ, self._on_listener)
        except BaseException:
            self._closed = True
            _remove_socket(paths)
            self._listener.close()
            if self._spare >= 0:
                os.close(self._spare)
            raise

    @property
    def client_count(self) -> int:
        """Open client connections, waiters for EOF included."""
        return len(self._clients)

    @property
    def buffered_bytes(self) -> int:
        """Bytes held for clients: requests not served yet and replies not written yet."""
        return sum(len(client.inbuf) + len(client.out) for client in self._clients)

    @property
    def _sweep_period(self) -> float:
        return min(1.0, self.idle_timeout / 2)

    def close(self) -> None:
        """Unregister and close everything: listener, clients, waiters; remove the socket."""
        if self._closed:
            return
        self._closed = True
        _remove_socket(self.paths)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(self._listener)
        self._listener.close()
        for client in list(self._clients):  # a `vmrun down` returns when it sees this EOF
            self._close_client(client)
        if self._spare >= 0:
            os.close(self._spare)
            self._spare = -1

    # --- connections ----------------------------------------------------------------------

    def _on_listener(self, mask: int) -> None:
        if self._closed:
            return
        now = time.monotonic()
        self._sweep(now)
        for _ in range(ACCEPTS_PER_EVENT):
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE) and self._refuse_without_fd():
                    continue
                return
            conn.setblocking(False)
            if len(self._clients) >= self.max_clients:
                with contextlib.suppress(OSError):
                    conn.send(TOO_MANY_CLIENTS)  # best effort: it is a new, empty socket
                conn.close()
                continue
            client = _Client(conn, now)
            self._clients.add(client)
            self._set_events(client, selectors.EVENT_READ)

    def _refuse_without_fd(self) -> bool:
        """Out of descriptors: give up the spare one to accept and refuse a newcomer."""
        if self._spare < 0:
            self._spare = _spare_fd()
            return False
        os.close(self._spare)
        try:
            conn, _ = self._listener.accept()
        except OSError:
            conn = None
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.setblocking(False)
                conn.send(OUT_OF_FDS)
            conn.close()
        self._spare = _spare_fd()
        return conn is not None

    def _sweep(self, now: float) -> None:
        """Drop the clients that moved no byte for idle_timeout (waiters excepted)."""
        self._next_sweep = now + self._sweep_period
        for client in list(self._clients):
            if client.waiter and not client.out:
                continue
            if now - client.active > self.idle_timeout:
                self._refuse(client, "timed out")

    def _set_events(self, client: _Client, events: int) -> None:
        if events == client.events:
            return
        if client.events == 0:
            self.selector.register(client.sock, events, functools.partial(self._on_client,
                                                                          client))
        elif events == 0:
            self.selector.unregister(client.sock)
        else:
            self.selector.modify(client.sock, events, functools.partial(self._on_client,
                                                                        client))
        client.events = events

    def _close_client(self, client: _Client) -> None:
        if client.closed:
            return
        client.closed = True
        client.reading = False
        if client.events:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(client.sock)
            client.events = 0
        client.sock.close()
        client.inbuf = bytearray()
        client.out = bytearray()
        self._clients.discard(client)

    def _refuse(self, client: _Client, message: str) -> None:
        """Drop a client, telling it why if its socket takes the line right now."""
        client.out += _encode({"ok": False, "error": message})
        with contextlib.suppress(OSError):
            client.sock.send(client.out)
        self._close_client(client)

    # --- one client -----------------------------------------------------------------------

    def _on_client(self, client: _Client, mask: int) -> None:
        if client.closed:  # dropped earlier in the same round of the loop
            return
        now = time.monotonic()
        if mask & selectors.EVENT_WRITE:
            self._send(client, now)
        if (mask & selectors.EVENT_READ and not client.closed
                and client.events & selectors.EVENT_READ):
            self._receive(client, now)
        if not client.closed:
            self._serve(client, now)
        if now >= self._next_sweep:
            self._sweep(now)

    def _receive(self, client: _Client, now: float) -> None:
        try:
            data = client.sock.recv(READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # ECONNRESET and the like: the client is gone
            self._close_client(client)
            return
        if not data:  # EOF: serve nothing more, close once the replies are written
            client.reading = False
            client.inbuf = bytearray()  # an unterminated last line is no request
            client.scanned = 0
            return
        client.active = now
        client.inbuf += data

    def _line_end(self, client: _Client) -> int:
        """Where the first request in the input ends, or -1; scans each byte once."""
        end = client.inbuf.find(b"\n", client.scanned)
        client.scanned = len(client.inbuf) if end < 0 else end
        return end

    def _serve(self, client: _Client, now: float) -> None:
        """Serve some requests, write what can be written, register for what comes next."""
        served = 0
        while client.reading and len(client.out) < self.high_water:
            end = self._line_end(client)
            if end < 0 and len(client.inbuf) <= self.max_line:
                break
            if end < 0 or end > self.max_line:
                self._refuse(client, f"request line longer than {self.max_line} bytes")
                return
            if served == LINES_PER_EVENT:
                break
            served += 1
            line = bytes(client.inbuf[:end])
            del client.inbuf[:end + 1]
            client.scanned = 0
            if not self._answer(client, line):
                return
        self._send(client, now)
        if client.closed:
            return
        if not client.reading and not client.out:
            if client.waiter:
                self._set_events(client, 0)  # held open until close()
            else:
                self._close_client(client)  # EOF, and every reply written
            return
        events = 0
        if client.reading and len(client.out) < self.high_water:
            # more input is read only once every request already in is served
            events = (selectors.EVENT_WRITE if self._line_end(client) >= 0
                      else selectors.EVENT_READ)
        if client.out:
            events |= selectors.EVENT_WRITE
        self._set_events(client, events)

    def _answer(self, client: _Client, line: bytes) -> bool:
        """Queue the reply to one request line; False if the client or server is gone."""
        request, error = _parse(line)
        if request is None:
            client.out += _encode({"ok": False, "error": error})
            return True
        try:
            reply, keep = self.handler(request)
            if not isinstance(reply, dict):
                raise TypeError("the reply is not a dict")
            data = _encode(reply)
        except Exception:
            if not client.closed:
                self._refuse(client, "internal error while serving the request")
            return False
        if client.closed:  # the handler closed the server
            return False
        client.out += data
        if keep:
            client.waiter = True
            client.reading = False
            client.inbuf = bytearray()
            client.scanned = 0
        return True

    def _send(self, client: _Client, now: float) -> None:
        while client.out:
            try:
                sent = client.sock.send(client.out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # EPIPE, ECONNRESET: the client is gone
                self._close_client(client)
                return
            del client.out[:sent]
            client.active = now
        if len(client.out) > self.max_pending:
            self._close_client(client)
