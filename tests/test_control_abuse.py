"""The control socket of a real running stack under abuse: garbage, non-objects, 2,000
connections, a client that never reads, a huge line.  The stack keeps running, `ps` and
`down` still work and the guests' results stay right."""

from __future__ import annotations

import contextlib
import json
import resource
import socket
import time
from pathlib import Path

import pytest

from conftest import cmdline, last_run, stack_qemus, vmrun, wait_until, write_stack
from vmrun.layout import StackPaths, short_socket_path


def raw_connect(paths: StackPaths) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with short_socket_path(paths.control_socket) as path:
        sock.connect(path)
    return sock


@pytest.mark.timeout(300)
def test_abuse_of_a_running_stack(guest: Path, tmp_path: Path) -> None:
    manifest = write_stack(tmp_path, guest, {
        "worker": {"cmdline": cmdline(say="WORK DONE", sleep=25), "success": "WORK DONE"},
        "server": {"cmdline": cmdline(action="hang")},
    })
    paths = StackPaths(tmp_path / ".vmrun" / "t")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    held: list[socket.socket] = []
    try:
        up = vmrun("up", "--detach", str(manifest))
        assert up.returncode == 0, up.stderr

        # garbage and non-objects get an error each, on one connection
        sock = raw_connect(paths)
        sock.sendall(b'[1]\nnull\n"x"\n1\n{not json\n\xff\xfe\n')
        reader = sock.makefile("rb")
        for _ in range(6):
            assert json.loads(reader.readline())["ok"] is False
        sock.close()

        # a client that writes and never reads, and one huge line
        spammer = raw_connect(paths)
        spammer.setblocking(False)
        try:
            for _ in range(20000):
                spammer.send(b'{"cmd": "ps"}\n' * 50)
        except BlockingIOError:
            pass  # its socket is full: the supervisor stopped reading it
        held.append(spammer)
        huge = raw_connect(paths)
        huge.setblocking(False)
        with contextlib.suppress(BlockingIOError, BrokenPipeError, ConnectionResetError):
            huge.sendall(b"x" * (100 << 20))
        held.append(huge)

        # 2,000 connections at once
        for _ in range(2000):
            try:
                held.append(raw_connect(paths))
            except OSError:
                break

        # through all that, ps answers promptly
        start = time.monotonic()
        for conn in held[2:]:  # make room: a stack serves a bounded number of clients
            conn.close()
        ps = vmrun("ps", "--json", str(manifest))
        assert ps.returncode == 0, ps.stderr
        assert time.monotonic() - start < 10
        assert set(json.loads(ps.stdout)["vms"]) == {"worker", "server"}
        assert set(stack_qemus(manifest, ["worker", "server"])) >= {"server"}

        # the worker finishes on its own, ok; down stops the server
        wait_until(lambda: json.loads(vmrun("ps", "--json", str(manifest)).stdout)
                   ["vms"]["worker"]["outcome"] is not None, timeout=120, interval=0.5)
        down = vmrun("down", str(manifest))
        assert down.returncode == 0, down.stderr
    finally:
        for conn in held:
            conn.close()
        vmrun("down", "--timeout", "0", str(manifest))
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    vms = last_run(manifest)["vms"]
    assert (vms["worker"]["outcome"], vms["server"]["outcome"]) == ("ok", "stopped"), vms
    assert last_run(manifest)["exit"] == 0
    assert not stack_qemus(manifest, ["worker", "server"])
