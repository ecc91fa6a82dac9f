"""Reboots and restarts on real guests: `on_reboot`, `restart` / `restart_max`, and the
reason of a VM stopped on request (a clean shutdown or a destroy after stop_timeout).

Synchronised on console lines (a fragment's n-th appearance) and process state, not on
sleeps; each scenario has a timeout.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import (
    Up,
    cmdline,
    driver_pid,
    last_run,
    seen,
    stack_qemus,
    vmrun,
    wait_until,
    write_stack,
)

BLANK = [{"size": "16M"}]  # where guest.action=reboot-once remembers its first boot


def ps(manifest: Path) -> dict[str, Any]:
    proc = vmrun("ps", "--json", str(manifest), timeout=30)
    assert proc.returncode == 0, proc.stderr
    data: dict[str, Any] = json.loads(proc.stdout)["vms"]
    return data


def summary(up: Up) -> dict[str, tuple[str, str]]:
    """The summary table of `vmrun up`: VM -> (outcome, reason and notes)."""
    lines = up.seen
    header = max(i for i, line in enumerate(lines) if line.split()[:2] == ["VM", "OUTCOME"])
    rows = [line.split(None, 3) for line in lines[header + 1:] if line.strip()]
    return {row[0]: (row[1], row[3] if len(row) > 3 else "") for row in rows}


def outcomes(manifest: Path) -> dict[str, tuple[str, str, int, int]]:
    """last-run.json: VM -> (outcome, reason, restarts, reboots)."""
    return {vm: (v["outcome"], v["reason"], v["restarts"], v["reboots"])
            for vm, v in last_run(manifest)["vms"].items()}


@pytest.mark.timeout(180)
def test_a_reboot_comes_back_in_the_same_qemu(guest: Path, tmp_path: Path) -> None:
    manifest = write_stack(tmp_path, guest, {"box": {
        "cmdline": cmdline(say="box up", action="reboot-once", sleep=2), "disks": BLANK,
        "success": "box up"}})
    up = Up(manifest)
    try:
        seen(up, "box | guest: rebooting once")
        qemu = stack_qemus(manifest, ["box"])["box"]
        seen(up, "box | box up", 2)  # the second boot, 2 s before it powers off
        assert stack_qemus(manifest, ["box"]) == {"box": qemu}
        status = ps(manifest)["box"]
        assert (status["qemu_pid"], status["reboots"], status["restarts"]) == (qemu, 1, 0)
        assert status["state"] in ("running", "ready")
        assert up.wait(90) == 0, up.stderr
    finally:
        up.kill()
    lines = up.output.splitlines()
    first = lines.index("box | guest: rebooting once")
    assert lines.index("box | guest: second boot") > first
    assert sum(line == "box | guest: booted" for line in lines) == 2
    assert outcomes(manifest) == {"box": ("ok", "", 0, 1)}
    assert summary(up)["box"] == ("ok", "rebooted 1 time")
    assert "vmrun: box rebooted" in up.stderr
    console = (tmp_path / ".vmrun/t/vms/box/console.log").read_text()
    assert "guest: rebooting once" in console and "guest: second boot" in console


@pytest.mark.timeout(180)
def test_on_reboot_stop_ends_at_the_reboot_and_a_panic_still_fails(guest: Path,
                                                                   tmp_path: Path) -> None:
    manifest = write_stack(tmp_path, guest, {
        "stops": {"cmdline": cmdline(action="reboot-once"), "disks": BLANK,
                  "on_reboot": "stop"},
        "panics": {"cmdline": cmdline(action="panic"), "on_reboot": "restart"},
    })
    up = Up(manifest)
    try:
        assert up.wait(120) == 1, up.stderr
    finally:
        up.kill()
    assert "stops | guest: rebooting once" in up.output
    assert "second boot" not in up.output
    assert sum("panics | guest: booted" in line for line in up.seen) == 1
    assert outcomes(manifest) == {"stops": ("ok", "", 0, 0), "panics": ("failed", "panic", 0, 0)}


@pytest.mark.timeout(240)
def test_on_failure_restarts_restart_max_times_then_fails(guest: Path,
                                                          tmp_path: Path) -> None:
    manifest = write_stack(tmp_path, guest, {"flaky": {
        "cmdline": cmdline(say="flaky up", action="panic", sleep=3),
        "restart": "on-failure", "restart_max": 2}})
    up = Up(manifest)
    try:
        seen(up, "flaky | flaky up")
        first = time.monotonic()
        assert ps(manifest)["flaky"]["restarts"] == 0
        for restart in (1, 2):
            seen(up, "flaky | flaky up", restart + 1)  # 3 s before it panics again
            status = ps(manifest)["flaky"]
            assert (status["restarts"], status["state"]) == (restart, "ready"), status
            assert status["uptime"] < time.monotonic() - first  # this run's
        assert up.wait(90) == 1, up.stderr
    finally:
        up.kill()
    assert sum(line == "flaky | guest: booted" for line in up.seen) == 3
    assert "vmrun: flaky failed (panic): restarting (1 of 2)" in up.stderr
    assert "vmrun: flaky failed (panic): restarting (2 of 2)" in up.stderr
    assert "vmrun: flaky failed (panic)\n" in up.stderr  # the final word, once
    assert outcomes(manifest) == {"flaky": ("failed", "panic", 2, 0)}
    assert summary(up)["flaky"] == ("failed", "panic; restarted 2 times")
    # one console.log over all runs
    assert (tmp_path / ".vmrun/t/vms/flaky/console.log").read_text().count("flaky up") == 3


@pytest.mark.timeout(240)
def test_always_restarts_a_clean_poweroff_and_ok_dependants_wait(guest: Path,
                                                                 tmp_path: Path) -> None:
    manifest = write_stack(tmp_path, guest, {
        "job": {"cmdline": cmdline(say="job run"), "restart": "always", "restart_max": 2},
        "after": {"cmdline": cmdline(say="after run"), "depends_on": {"job": "ok"}},
    })
    up = Up(manifest)
    try:
        assert up.wait(200) == 0, up.stderr
    finally:
        up.kill()
    lines = up.seen
    runs = [i for i, line in enumerate(lines) if line == "job | job run"]
    assert len(runs) == 3
    # `after` started only once the last run of job had ended ok
    last_end = max(i for i, line in enumerate(lines) if line == "job | guest: done")
    assert last_end > runs[-1]
    assert min(i for i, line in enumerate(lines) if line.startswith("after |")) > last_end
    assert outcomes(manifest) == {"job": ("ok", "", 2, 0), "after": ("ok", "", 0, 0)}
    assert "vmrun: job ok: restarting (2 of 2)" in up.stderr


@pytest.mark.timeout(240)
def test_a_driver_that_dies_is_restarted_and_the_last_reason_stands(guest: Path,
                                                                    tmp_path: Path) -> None:
    manifest = write_stack(tmp_path, guest, {"box": {
        "cmdline": cmdline(say="box up", action="hang"), "restart": "on-failure",
        "restart_max": 1}})
    up = Up(manifest)
    try:
        seen(up, "box | box up")
        first = stack_qemus(manifest, ["box"])["box"]
        victim = driver_pid("box", manifest)
        os.kill(victim, signal.SIGKILL)
        seen(up, "box | box up", 2)  # a new driver, a new QEMU, on the same root
        second = stack_qemus(manifest, ["box"])["box"]
        assert second != first and driver_pid("box", manifest) != victim
        os.kill(driver_pid("box", manifest), signal.SIGKILL)
        assert up.wait(60) == 1, up.stderr
    finally:
        up.kill()
    wait_until(lambda: not stack_qemus(manifest, ["box"]), timeout=5)
    assert outcomes(manifest) == {"box": ("failed", "driver died (killed by SIGKILL)", 1, 0)}
    assert "vmrun: box failed (driver died (killed by SIGKILL)): restarting (1 of 1)" \
        in up.stderr


@pytest.mark.timeout(180)
def test_down_never_restarts_and_tells_a_shutdown_from_a_destroy(guest: Path,
                                                                 tmp_path: Path) -> None:
    manifest = write_stack(tmp_path, guest, {
        "polite": {"cmdline": cmdline(action="hang"), "restart": "always"},
        "stubborn": {"cmdline": cmdline(action="hang", extra="guest.acpi=ignore"),
                     "restart": "always"},
    }, stop_timeout=4)
    up = Up(manifest)
    try:
        up.expect("polite | guest: hanging", "stubborn | guest: hanging", timeout=90)
        down = vmrun("down", str(manifest), timeout=60)
        assert down.returncode == 0, down.stderr
        assert up.wait(30) == 0, up.stderr
    finally:
        up.kill()
    assert "polite | guest: acpi power button" in up.output
    assert sum("guest: booted" in line for line in up.seen) == 2  # no restart
    assert outcomes(manifest) == {
        "polite": ("stopped", "stopped", 0, 0),
        "stubborn": ("stopped", "destroyed after stop_timeout", 0, 0)}
    assert summary(up) == {"polite": ("stopped", "stopped"),
                           "stubborn": ("stopped", "destroyed after stop_timeout")}


@pytest.mark.timeout(180)
def test_a_stop_signal_never_restarts(guest: Path, tmp_path: Path) -> None:
    manifest = write_stack(tmp_path, guest, {
        "box": {"cmdline": cmdline(action="hang"), "restart": "always", "restart_max": 5},
    })
    up = Up(manifest)
    try:
        up.expect("box | guest: hanging", timeout=90)
        up.proc.send_signal(signal.SIGINT)
        assert up.wait(60) == 128 + signal.SIGINT, up.stderr
    finally:
        up.kill()
    assert sum("guest: booted" in line for line in up.seen) == 1
    assert outcomes(manifest) == {"box": ("stopped", "stopped", 0, 0)}
