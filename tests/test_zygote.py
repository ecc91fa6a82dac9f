"""How vmrun's own processes are made, on real guests: drivers are forked by the driver
zygote (vmrun/proc/zygote.py); the PID namespace's init is a small program.

What must hold whoever forks them: every driver is the supervisor's child (it reaps them
and reads their exit statuses), shows a driver's command line, shares the zygote's
memory instead of importing everything again, and a zygote that dies is replaced when
the next driver is needed.  Synchronised on console lines; each test has a timeout.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from conftest import (
    Up,
    cmdline,
    driver_pid,
    processes,
    seen,
    stack_qemus,
    wait_until,
    write_stack,
)
from vmrun import procs


def parent(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("PPid:"))


def zygotes(manifest: Path) -> list[int]:
    here = os.fsencode(str(manifest.parent))
    return [pid for pid, cmd in processes() if b"vmrun.proc.zygote" in cmd and here in cmd]


def private_mib(pid: int) -> float:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        fields = {line.split(":")[0]: int(line.split()[1]) for line in f
                  if line.split()[-1] == "kB"}
    return (fields["Private_Clean"] + fields["Private_Dirty"]) / 1024


@pytest.mark.timeout(120)
def test_drivers_are_forks_of_the_zygote_and_children_of_the_supervisor(
        guest: Path, tmp_path: Path) -> None:
    manifest = write_stack(tmp_path, guest, {
        name: {"cmdline": cmdline(say=f"{name} up", action="hang")} for name in ("a", "b")})
    up = Up(manifest)
    try:
        up.expect("a | a up", "b | b up")
        [zygote] = zygotes(manifest)
        assert parent(zygote) == up.proc.pid
        for name in ("a", "b"):
            pid = driver_pid(name, manifest)
            assert parent(pid) == up.proc.pid  # reaped by the supervisor, not the zygote
            assert os.getpgid(pid) == pid  # its own group: killpg ends it and libvirt's forks
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = [a for a in f.read().split(b"\0") if a]
            assert args[-2:] == [b"run", f'{{"name": "{name}", "dir": '
                                         f'"{tmp_path}/.vmrun/t/vms/{name}"}}'.encode()]
            # a fork shares the zygote's imports (libvirt, the driver's modules), and gives
            # back what starting the guest took (trim_heap): a fresh Python that imported
            # them had ~18 MiB of its own, a fork that kept its heap ~8.5 MiB, now ~5
            assert private_mib(pid) < 7, private_mib(pid)
        # the namespace's init is vmrun-nsinit, not a fork of the supervisor (which kept
        # ~11 MiB of the supervisor's memory for as long as the stack ran)
        with open(f"/proc/{up.proc.pid}/task/{up.proc.pid}/children") as f:
            children = [int(pid) for pid in f.read().split()]
        [init] = [pid for pid in children if procs.cmdline(pid).endswith(b"vmrun-nsinit\0")]
        assert private_mib(init) < 1, private_mib(init)
        up.proc.send_signal(signal.SIGINT)
        assert up.wait(60) == 130, up.stderr
    finally:
        up.kill()
    wait_until(lambda: not zygotes(manifest), timeout=5)
    assert not stack_qemus(manifest, ["a", "b"])


@pytest.mark.timeout(180)
def test_a_zygote_that_died_is_replaced_for_the_next_driver(guest: Path,
                                                           tmp_path: Path) -> None:
    manifest = write_stack(tmp_path, guest, {"box": {
        "cmdline": cmdline(say="box up", action="hang"), "restart": "on-failure",
        "restart_max": 1}})
    up = Up(manifest)
    try:
        seen(up, "box | box up")
        [first] = zygotes(manifest)
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: first not in zygotes(manifest), timeout=5)
        os.kill(driver_pid("box", manifest), signal.SIGKILL)
        seen(up, "box | box up", 2)  # restarted by a new zygote's fork
        [second] = zygotes(manifest)
        assert second != first
        up.proc.send_signal(signal.SIGTERM)
        assert up.wait(60) == 143, up.stderr  # ended by the signal, as always
    finally:
        up.kill()
    wait_until(lambda: not zygotes(manifest), timeout=5)
    assert not stack_qemus(manifest, ["box"])
    assert "Traceback" not in up.stderr
