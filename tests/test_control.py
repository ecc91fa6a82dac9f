"""The control socket's server side (vmrun.control.ControlServer) against misbehaving clients.

The server runs in this process, in a selector loop driven by the test itself (step by step
between client actions, or in a background thread where a client blocks); clients are real
AF_UNIX sockets on the real socket path.  No guest is started.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import resource
import selectors
import shutil
import socket
import stat
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vmrun import client, control
from vmrun.control import ControlServer
from vmrun.layout import StackPaths, private_dir, short_socket_path

PS = b'{"cmd": "ps"}\n'


class Loop:
    """The supervisor's dispatch, one round at a time."""

    def __init__(self, selector: selectors.BaseSelector) -> None:
        self.selector = selector

    def step(self, timeout: float = 0.0) -> None:
        for key, mask in self.selector.select(timeout):
            key.data(mask)

    def until(self, condition: Callable[[], bool], timeout: float = 5.0,
              what: str = "the condition") -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            self.step(0.01)


@contextlib.contextmanager
def serving(loop: Loop) -> Iterator[None]:
    """Run the loop in a thread (for clients that block); re-raise what it raised."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            while not stop.is_set():
                loop.step(0.02)
        except BaseException as exc:  # noqa: B036 - handed to the test thread
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)
        assert not thread.is_alive()
    if errors:
        raise errors[0]


class Peer:
    """A non-blocking client socket that collects reply lines."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.buffer = b""
        self.replies: list[Any] = []
        self.eof = False

    def send(self, data: bytes) -> None:
        self.sock.setblocking(True)
        try:
            self.sock.sendall(data)
        finally:
            self.sock.setblocking(False)

    def poll(self) -> int:
        """Read what has arrived; return how many replies are in."""
        while not self.eof:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                break
            except ConnectionResetError:
                data = b""
            if not data:
                self.eof = True
                break
            self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        self.replies += [json.loads(line) for line in lines]
        return len(self.replies)

    def ended(self) -> bool:
        """Whether the server has closed the connection (after reading what came first)."""
        self.poll()
        return self.eof

    def ask(self, loop: Loop, data: bytes = PS, timeout: float = 5.0) -> Any:
        """Send one request, drive the loop until its reply is in, return the reply."""
        before = self.poll()
        self.send(data)
        loop.until(lambda: self.poll() > before, timeout, f"a reply to {data[:40]!r}")
        return self.replies[before]

    def close(self) -> None:
        self.sock.close()


class Handler:
    """Echo the request; `down` waits for EOF; `boom` raises; `big` returns a big reply."""

    def __init__(self) -> None:
        self.requests: list[Any] = []

    def __call__(self, request: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        self.requests.append(request)
        command = request.get("cmd")
        if command == "boom":
            raise RuntimeError("boom")
        if command == "not-a-dict":
            return "no", False  # type: ignore[return-value]
        if command == "big":
            return {"ok": True, "data": "x" * int(request["size"])}, False
        return {"ok": True, "echo": request}, command == "down"


@pytest.fixture
def paths(tmp_path: Path) -> Iterator[StackPaths]:
    """A stack directory whose lock is held, as a running supervisor holds it."""
    paths = StackPaths(tmp_path / "s")
    paths.dir.mkdir(mode=0o700)
    private_dir(paths.runtime)
    fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    yield paths
    os.close(fd)
    shutil.rmtree(paths.runtime, ignore_errors=True)


@pytest.fixture
def handler() -> Handler:
    return Handler()


@pytest.fixture
def selector() -> Iterator[selectors.BaseSelector]:
    with selectors.DefaultSelector() as sel:
        yield sel


@pytest.fixture
def loop(selector: selectors.BaseSelector) -> Loop:
    return Loop(selector)


@pytest.fixture
def make_server(paths: StackPaths, selector: selectors.BaseSelector,
                handler: Handler) -> Iterator[Callable[..., ControlServer]]:
    servers: list[ControlServer] = []

    def make(**limits: Any) -> ControlServer:
        server = ControlServer(paths, selector, handler, **limits)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


def peer(paths: StackPaths) -> Peer:
    return Peer(client.connect(paths, timeout=5))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.timeout(30)
def test_request_reply_through_the_client_functions(paths: StackPaths, loop: Loop,
                                                    make_server: Callable[..., ControlServer],
                                                    handler: Handler) -> None:
    server = make_server()
    assert stat.S_IMODE(os.stat(paths.control_socket).st_mode) == 0o600
    with serving(loop):
        reply, sock = client.request(paths, {"cmd": "ps"}, timeout=5)
        assert reply == {"ok": True, "echo": {"cmd": "ps"}}
        # several requests in one write: one reply each, in order
        sock.sendall(b"".join(b'{"cmd": "ps", "n": %d}\n' % n for n in range(300)))
        reader = sock.makefile("rb")
        assert [json.loads(reader.readline())["echo"]["n"] for _ in range(300)] == \
            list(range(300))
        reader.close()
        sock.close()
    assert len(handler.requests) == 301
    server.close()
    assert not (paths.control_socket).exists()
    with pytest.raises(client.NoAnswer):  # lock held, socket gone: no answer
        client.connect(paths)


@pytest.mark.timeout(30)
def test_bad_lines_get_an_error_and_never_reach_the_handler(
        paths: StackPaths, loop: Loop, make_server: Callable[..., ControlServer],
        handler: Handler) -> None:
    make_server()
    client = peer(paths)
    bad = [b"[1]", b"null", b'"x"', b"1", b"{", b"", b"   ", b'{"cmd": "\xff"}',
           b"\xef\xbb\xbf" + PS.strip(), b"[" * 60000, b"1" * 60000, b'{"cmd": "ps"']
    for line in bad:
        reply = client.ask(loop, line + b"\n")
        assert reply["ok"] is False and reply["error"], line[:20]
    assert handler.requests == []
    # ... and the same connection is still served
    assert client.ask(loop) == {"ok": True, "echo": {"cmd": "ps"}}
    assert handler.requests == [{"cmd": "ps"}]


@pytest.mark.timeout(30)
def test_a_handler_that_raises_costs_its_client_the_connection_quietly(
        paths: StackPaths, loop: Loop, make_server: Callable[..., ControlServer],
        capfd: pytest.CaptureFixture[str]) -> None:
    server = make_server()
    other = peer(paths)
    for command in (b"boom", b"not-a-dict"):
        client = peer(paths)
        reply = client.ask(loop, b'{"cmd": "%s"}\n{"cmd": "ps"}\n' % command)
        assert reply["ok"] is False and "internal error" in reply["error"]
        loop.until(client.ended, what="the dropped client's EOF")
        assert len(client.replies) == 1  # the request after it was not served
        client.close()
    assert server.client_count == 1
    assert other.ask(loop)["ok"] is True
    assert capfd.readouterr() == ("", "")


@pytest.mark.timeout(120)
def test_two_thousand_connections_at_once(paths: StackPaths, loop: Loop,
                                          make_server: Callable[..., ControlServer]) -> None:
    count = 2000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = open_fds() + 2 * count + 256
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {need}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    try:
        server = make_server()
        baseline = open_fds()
        clients: list[socket.socket] = []
        started = time.monotonic()
        with short_socket_path(paths.control_socket) as path:
            while len(clients) < count:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
                sock.setblocking(False)
                try:
                    sock.connect(path)
                except BlockingIOError:  # the backlog is full: let the server take some
                    sock.close()
                    loop.step(0.01)
                    continue
                clients.append(sock)
        loop.until(lambda: not loop.selector.select(0), what="the server to take them all")
        elapsed = time.monotonic() - started
        assert server.client_count == server.max_clients
        # the server holds max_clients sockets, not one per connection
        assert open_fds() - baseline - count <= server.max_clients
        refused = served = 0
        for sock in clients:
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                served += 1
                continue
            assert data == b'{"ok": false, "error": "too many clients"}\n'
            refused += 1
        assert (served, refused) == (server.max_clients, count - server.max_clients)
        assert elapsed < 30
        for sock in clients:
            sock.close()
        loop.until(lambda: server.client_count == 0, what="the server to see them go")
        assert peer(paths).ask(loop) == {"ok": True, "echo": {"cmd": "ps"}}
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("request_line", [PS, b'{"cmd": "big", "size": 20000}\n'],
                         ids=["small-replies", "20kB-replies"])
def test_a_client_that_never_reads_does_not_stall_the_others(
        paths: StackPaths, loop: Loop, make_server: Callable[..., ControlServer],
        request_line: bytes) -> None:
    server = make_server(idle_timeout=1.0)
    abuser = peer(paths)
    payload = memoryview(request_line * 100_000)
    sent = 0
    other = peer(paths)
    started = time.monotonic()
    dropped = False
    longest = 0.0
    while time.monotonic() - started < 30:
        # the abuser writes what it can, and never reads
        try:
            while sent < len(payload):
                sent += abuser.sock.send(payload[sent:sent + 65536])
        except BlockingIOError:
            pass
        except (BrokenPipeError, ConnectionResetError):
            dropped = True
        # ... while another client is answered promptly
        asked = time.monotonic()
        assert other.ask(loop, timeout=5) == {"ok": True, "echo": {"cmd": "ps"}}
        longest = max(longest, time.monotonic() - asked)
        # the abuser's input is not buffered, nor are its replies past a bound
        assert server.buffered_bytes <= (server.max_line + control.READ_CHUNK
                                         + server.high_water + 32 * 1024)  # + a reply
        if dropped or server.client_count == 1:
            break
    assert server.client_count == 1, "the abuser was never dropped"
    assert sent < len(payload)  # it was held back: the server stopped reading it
    assert longest < 5
    with pytest.raises((BrokenPipeError, ConnectionResetError)):
        for _ in range(100):  # the kernel may still take a little
            abuser.sock.send(payload[:65536])
    assert other.ask(loop)["ok"] is True


@pytest.mark.timeout(30)
def test_output_past_max_pending_drops_the_client(
        paths: StackPaths, loop: Loop, make_server: Callable[..., ControlServer]) -> None:
    server = make_server(max_pending=64 * 1024)
    client = peer(paths)
    client.send(b'{"cmd": "big", "size": 2000000}\n')
    loop.until(lambda: server.client_count == 0, what="the drop")
    assert server.buffered_bytes == 0
    assert peer(paths).ask(loop)["ok"] is True


@pytest.mark.timeout(30)
def test_a_100_mb_line_is_refused_quickly_in_bounded_memory(
        paths: StackPaths, loop: Loop, make_server: Callable[..., ControlServer]) -> None:
    server = make_server()
    client = peer(paths)
    chunk = memoryview(b"x" * (1 << 20))
    total = 100 << 20
    bound = server.max_line + control.READ_CHUNK
    tracemalloc.start()
    try:
        started = time.monotonic()
        sent = most = 0
        refused = False
        while sent < total and time.monotonic() - started < 20:
            try:
                while sent < total:
                    sent += client.sock.send(chunk[:min(len(chunk), total - sent)])
            except BlockingIOError:
                pass
            except (BrokenPipeError, ConnectionResetError):
                refused = True
                break
            loop.step(0.01)
            most = max(most, server.buffered_bytes)
        elapsed = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert refused, f"{sent} bytes of the line were taken"
    assert elapsed < 3
    assert sent < 8 << 20  # taken: what was read, plus what the kernel buffered
    assert most <= bound
    assert peak < 4 * bound, f"peak {peak} bytes traced"
    client.poll()
    assert client.eof
    assert client.replies == [{"ok": False, "error": "request line longer than 65536 bytes"}]
    assert server.client_count == 0


@pytest.mark.timeout(30)
def test_the_line_limit_is_exact(paths: StackPaths, loop: Loop,
                                 make_server: Callable[..., ControlServer]) -> None:
    make_server(max_line=1000)

    def line(length: int) -> bytes:
        head = b'{"cmd": "ps", "pad": "'
        return head + b"y" * (length - len(head) - 2) + b'"}\n'

    client = peer(paths)
    assert client.ask(loop, line(1000))["ok"] is True
    assert client.ask(loop, line(1001)) == {"ok": False,
                                            "error": "request line longer than 1000 bytes"}
    loop.until(client.ended, what="EOF")


@pytest.mark.timeout(30)
def test_keep_holds_the_connection_until_close(
        paths: StackPaths, loop: Loop, selector: selectors.BaseSelector,
        make_server: Callable[..., ControlServer]) -> None:
    baseline = open_fds()
    server = make_server()
    waiter = peer(paths)
    assert waiter.ask(loop, b'{"cmd": "down"}\n') == {"ok": True, "echo": {"cmd": "down"}}
    idle, partial = peer(paths), peer(paths)
    partial.send(b'{"cmd": "p')
    waiter.send(PS)  # a waiter is not read any more
    for _ in range(20):
        loop.step(0.01)
    assert waiter.poll() == 1 and not waiter.eof
    assert server.client_count == 3
    server.close()
    assert not (paths.control_socket).exists()
    assert not selector.get_map()
    assert open_fds() == baseline + 3  # only the test's own client sockets remain
    for each in (waiter, idle, partial):
        assert client.wait_closed(each.sock, 5)  # `vmrun down` returns on this EOF
    server.close()  # twice is harmless


@pytest.mark.timeout(30)
def test_half_closed_client_gets_every_reply_then_eof(
        paths: StackPaths, loop: Loop, make_server: Callable[..., ControlServer]) -> None:
    server = make_server()
    client = peer(paths)
    client.send(PS * 1000 + b'{"cmd": "unterminated"}')
    client.sock.shutdown(socket.SHUT_WR)
    loop.until(client.ended, what="EOF")
    assert len(client.replies) == 1000
    assert server.client_count == 0


@pytest.mark.timeout(30)
def test_clients_that_go_away_are_handled_quietly(
        paths: StackPaths, loop: Loop, make_server: Callable[..., ControlServer],
        capfd: pytest.CaptureFixture[str]) -> None:
    server = make_server()
    for _ in range(20):
        client = peer(paths)
        client.send(PS * 5000)  # replies pending when it vanishes: EPIPE/ECONNRESET
        loop.step(0)
        client.close()
    peer(paths).close()  # plain EOF
    loop.until(lambda: server.client_count == 0, what="the server to drop them")
    assert peer(paths).ask(loop)["ok"] is True
    assert capfd.readouterr() == ("", "")


@pytest.mark.timeout(30)
def test_an_idle_client_times_out(paths: StackPaths, loop: Loop,
                                  make_server: Callable[..., ControlServer]) -> None:
    server = make_server(idle_timeout=0.3)
    idle = peer(paths)
    waiter = peer(paths)
    assert waiter.ask(loop, b'{"cmd": "down"}\n')["ok"] is True
    busy = peer(paths)
    loop.until(lambda: busy.ask(loop)["ok"] and idle.ended(),
               what="the idle client's drop")
    assert idle.replies == [{"ok": False, "error": "timed out"}]
    assert server.client_count == 2  # the waiter stays


@pytest.mark.timeout(30)
def test_out_of_file_descriptors_the_listener_does_not_spin(
        paths: StackPaths, loop: Loop, make_server: Callable[..., ControlServer]) -> None:
    server = make_server()
    clients = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
               for _ in range(3)]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fillers: list[int] = []
    with short_socket_path(paths.control_socket) as path:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(map(int, os.listdir("/proc/self/fd")))
                                                    + 1, hard))
        try:
            with contextlib.suppress(OSError):
                while True:  # take every descriptor left below the limit
                    fillers.append(os.open(os.devnull, os.O_RDONLY))
            for sock in clients:
                sock.connect(path)
            rounds = 0
            while loop.selector.select(0) and rounds < 100:
                loop.step(0)
                rounds += 1
        finally:
            for fd in fillers:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert rounds < 100, "the listener stayed readable"
    for sock in clients:
        assert sock.recv(4096) == (b'{"ok": false, "error": "the supervisor is out of file '
                                   b'descriptors"}\n')
        sock.close()
    assert server.client_count == 0
    assert peer(paths).ask(loop)["ok"] is True
