"""`vmrun up` on a terminal: the live status table and coloured prefixes, or plain lines."""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import cmdline, write_stack


def run_on_pty(args: list[str], env: dict[str, str], timeout: float = 120) -> tuple[int, str]:
    master, slave = os.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "vmrun", *args], stdin=slave,
                            stdout=slave, stderr=slave, env=env, start_new_session=True)
    os.close(slave)
    output = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        readable, _, _ = select.select([master], [], [], 1)
        if readable:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer has closed the terminal
                break
            if not data:
                break
            output += data
        elif proc.poll() is not None:
            break
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)
    if proc.poll() is None:
        proc.kill()
    os.close(master)
    return proc.wait(10), output.decode("utf-8", "replace")


@pytest.mark.timeout(240)
def test_live_view_and_plain_fallback(guest: Path, tmp_path: Path) -> None:
    manifest = write_stack(tmp_path, guest, {
        "alpha": {"cmdline": cmdline(say="hello alpha", sleep=1)},
        "beta": {"cmdline": cmdline(say="hello beta")},
    })
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    env["COLUMNS"], env["LINES"] = "120", "40"

    code, live = run_on_pty(["up", str(manifest)], env)
    assert code == 0, live
    assert "LAST CONSOLE LINE" in live  # the status table
    assert "\x1b[" in live  # colours and cursor movement
    assert "hello alpha" in live and "hello beta" in live
    assert "OUTCOME" in live and "DURATION" in live  # the summary

    for extra_env, args in (({"NO_COLOR": "1"}, []), ({}, ["--progress", "plain"])):
        code, plain = run_on_pty(["up", *args, str(manifest)], env | extra_env)
        assert code == 0, plain
        assert "LAST CONSOLE LINE" not in plain and "\x1b[" not in plain
        assert "alpha | hello alpha" in plain.replace("\r", "")
        assert "OUTCOME" in plain
