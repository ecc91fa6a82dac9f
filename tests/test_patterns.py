"""Patterns on a real guest: a catastrophic pattern cannot pin the driver, so `timeout`
still ends the VM (issue 8, item 14).  With Python's backtracking `re`, `(a+)+$` against
a line of 60 a's and a b takes longer than the age of the universe."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from conftest import Up, cmdline, last_run, stack_qemus, wait_until, write_stack

HOSTILE = "a" * 60 + "b"


@pytest.mark.timeout(120)
def test_catastrophic_success_pattern_still_times_out(guest: Path, tmp_path: Path) -> None:
    manifest = write_stack(tmp_path, guest, {
        "hostile": {"cmdline": cmdline(say=HOSTILE, action="hang"),
                    "success": "(a+)+$", "timeout": 15},
    })
    started = time.monotonic()
    up = Up(manifest)
    try:
        up.expect(f"hostile | {HOSTILE}", timeout=40)
        code = up.wait(40 - (time.monotonic() - started))
    finally:
        up.kill()
    assert code == 1, (up.output, up.stderr)
    assert time.monotonic() - started < 40
    vm = last_run(manifest)["vms"]["hostile"]
    assert (vm["outcome"], vm["reason"]) == ("failed", "timeout after 15s"), vm
    wait_until(lambda: not stack_qemus(manifest, ["hostile"]), 10)
    assert "Traceback" not in up.stderr
