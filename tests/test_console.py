"""`vmrun console`: an interactive serial console, driven through a real pty."""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from conftest import cmdline, vmrun, write_stack


class Terminal:
    """`vmrun console` on the slave side of a pty; the test types on the master side."""

    def __init__(self, manifest: Path, vm: str) -> None:
        self.master, self.slave = os.openpty()
        self.before = termios.tcgetattr(self.slave)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vmrun", "console", str(manifest), vm],
            stdin=self.slave, stdout=self.slave, stderr=self.slave, start_new_session=True)
        self.screen = b""

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def expect(self, text: bytes, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.screen:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{text!r} not seen; screen: {self.screen[-2000:]!r}")
            readable, _, _ = select.select([self.master], [], [], remaining)
            if readable:
                with contextlib.suppress(OSError):  # EIO: the slave side is closed
                    self.screen += os.read(self.master, 65536)

    def wait(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        os.close(self.master)
        os.close(self.slave)


@pytest.mark.timeout(240)
def test_console_types_into_the_guest_and_restores_the_terminal(guest: Path,
                                                                tmp_path: Path) -> None:
    manifest = write_stack(tmp_path, guest, {
        "box": {"cmdline": cmdline(action="shell"), "ready": "shell ready"},
    }, stop_timeout=10)
    term = None
    try:
        assert vmrun("up", "-d", "--wait", str(manifest)).returncode == 0
        term = Terminal(manifest, "box")
        term.expect(b"press Ctrl-] to leave")
        term.type(b"echo answer=$((6*7))\r")
        term.expect(b"answer=42")
        # raw mode while attached: no echo, no line editing by the host's terminal
        assert not termios.tcgetattr(term.slave)[3] & termios.ECHO
        term.type(b"\x1d")  # Ctrl-]
        assert term.wait() == 0
        term.expect(b"left box's console")
        assert termios.tcgetattr(term.slave) == term.before
        term.close()

        # attach again; the guest powering off ends the session the same way
        term = Terminal(manifest, "box")
        term.expect(b"press Ctrl-] to leave")
        term.type(b"exit\r")
        term.expect(b"the VM stopped", timeout=60)
        assert term.wait() == 0
        assert termios.tcgetattr(term.slave) == term.before
    finally:
        if term is not None:
            term.close()
        vmrun("down", "--timeout", "0", str(manifest))
    # everything the console showed is also in the log
    logs = vmrun("logs", str(manifest), "box")
    assert "answer=42" in logs.stdout


def test_console_of_a_stack_that_is_not_running(guest: Path, tmp_path: Path) -> None:
    manifest = write_stack(tmp_path, guest, {"box": {"cmdline": cmdline()}})
    proc = vmrun("console", str(manifest), "box")
    assert proc.returncode == 1 and "is not running" in proc.stderr
    proc = vmrun("console", str(manifest), "nope")
    assert proc.returncode == 2 and 'no VM named "nope"' in proc.stderr
