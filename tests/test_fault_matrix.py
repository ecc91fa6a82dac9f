"""The fault matrix: what can go wrong around `vmrun up`, in one table, on real guests.

Each row of CASES runs a small stack (one or two VMs), does one thing to it, and states
the whole contract of docs/commands.md for it.  One function, `test_fault`, checks every
row the same way:

- each VM's outcome and reason, in last-run.json and in the summary of `vmrun up` (only
  the summary when last-run.json cannot be written: its directory deleted, its disk
  full); for a killed supervisor, last-run.json marks the run unfinished (exit null, no
  outcomes) and `vmrun down` afterwards exits 0;
- the exit status of every vmrun command the scenario ran (a killed `vmrun up` has none:
  -9 is Popen's "killed by SIGKILL");
- no QEMU of the stack is left within a few seconds, nor any other process of it, nor a
  cgroup of its guests, nor its control socket;
- every VM wrote to its disk, an overlay over a copy of build/guest/base.qcow2: the
  image itself is unchanged (sha256).

The scenarios synchronise on console lines and process state, not on sleeps.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from test_faults import descendants, fill

from conftest import (
    GUEST,
    Up,
    cmdline,
    driver_pid,
    last_run,
    processes,
    stack_qemus,
    stack_roots,
    vmrun,
    wait_until,
    write_stack,
)
from vmrun import cgroups
from vmrun.layout import StackPaths

WRITE = "guest.disk=write:fault-matrix"  # every guest writes its overlay right after boot


def hang(**settings: Any) -> dict[str, Any]:
    return {"cmdline": cmdline(action="hang", extra=WRITE), **settings}


class Run:
    """One scenario's stack, and what each vmrun command it ran returned."""

    def __init__(self, where: Path, guest: Path, base: Path) -> None:
        self.where, self.guest, self.base = where, guest, base
        self.manifest = where / "t.toml"
        self.names: list[str] = []
        self.up: Up | None = None
        self.exits: dict[str, int] = {}
        self.stderr: list[str] = []
        self.undo: list[Callable[[], object]] = []  # the scenario's own leftovers

    def write(self, vms: dict[str, dict[str, Any]]) -> None:
        self.names = list(vms)
        write_stack(self.where, self.guest, {
            vm: {**settings, "disks": [{"image": str(self.base)}]} for vm, settings in vms.items()
        }, stop_timeout=10)

    @property
    def state(self) -> StackPaths:
        return StackPaths(self.where / ".vmrun" / "t")

    def start(self, *expected: str) -> Up:
        """`vmrun up`, once every `expected` console line has shown."""
        self.up = Up(self.manifest)
        self.up.expect(*expected, timeout=60)
        return self.up

    def finish(self, label: str = "up") -> None:
        assert self.up is not None
        self.exits[label] = self.up.wait(90)
        self.stderr.append(self.up.stderr)

    def command(self, label: str, *args: str) -> subprocess.CompletedProcess[str]:
        proc = vmrun(*args, str(self.manifest), timeout=60)
        self.exits[label] = proc.returncode
        self.stderr.append(proc.stderr)
        return proc

    def qemus(self) -> dict[str, int]:
        return stack_qemus(self.manifest, self.names)

    def leftovers(self) -> list[int]:
        """Processes of the stack: drivers and QEMU name paths in its directory."""
        mark = os.fsencode(f"{self.where}/")
        return [pid for pid, cmd in processes() if mark in cmd]

    def summary(self) -> dict[str, tuple[str, str]]:
        """The last summary table of `vmrun up`: VM -> (outcome, reason with warnings)."""
        assert self.up is not None
        lines = self.up.seen
        header = max(i for i, line in enumerate(lines) if line.split()[:2] == ["VM", "OUTCOME"])
        rows = [line.split(None, 3) for line in lines[header + 1:header + 1 + len(self.names)]]
        return {row[0]: (row[1], row[3] if len(row) > 3 else "") for row in rows}

    def cleanup(self) -> None:
        if self.up is not None:
            self.up.kill()
        for undo in self.undo:
            undo()
        if self.qemus() or self.leftovers():
            vmrun("down", "--timeout", "0", str(self.manifest))


# --- the faults ------------------------------------------------------------------------------


def hanging(run: Run) -> list[str]:
    return [f"{vm} | guest: hanging" for vm in run.names]


def runs_to_its_end(run: Run) -> None:
    run.start()
    run.finish()


def stop_signal(signum: int) -> Callable[[Run], None]:
    def fault(run: Run) -> None:
        up = run.start(*hanging(run))
        up.proc.send_signal(signum)
        run.finish()
        assert "box | guest: acpi power button" in up.output  # asked nicely first

    return fault


def kill_supervisor(run: Run) -> None:
    run.start(*hanging(run)).proc.kill()
    run.finish()


def kill_tree(run: Run) -> None:
    """SIGKILL to the supervisor and every process below it but QEMU, in random order."""
    up = run.start(*hanging(run))
    commands = dict(processes())
    tree = [pid for pid in [up.proc.pid, *descendants(up.proc.pid)]
            if b"qemu-system" not in commands.get(pid, b"")]
    assert len(tree) >= 4, tree  # supervisor, the namespace's init, two drivers
    random.shuffle(tree)
    print(f"SIGKILL to {tree} in this order (the supervisor is {up.proc.pid})")
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    run.finish()


def kill_one(process: str) -> Callable[[Run], None]:
    """SIGKILL to the victim's driver or QEMU while the other VM is mid-run."""

    def fault(run: Run) -> None:
        up = run.start("victim | guest: hanging", "other | other up")
        qemus = run.qemus()
        assert set(qemus) == {"victim", "other"}
        os.kill(driver_pid("victim", run.manifest) if process == "driver" else qemus["victim"],
                signal.SIGKILL)
        wait_until(lambda: "victim" not in run.qemus(), timeout=5)
        assert run.qemus().get("other") == qemus["other"]  # carries on, to its own end
        run.finish()
        assert "other | guest: powering off" in up.output

    return fault


def second_up(run: Run) -> None:
    up = run.start(*hanging(run))
    before = run.qemus()
    second = run.command("second up", "up")
    assert f"already running (pid {up.proc.pid})" in second.stderr, second.stderr
    assert run.qemus() == before  # the first run untouched
    up.proc.send_signal(signal.SIGTERM)
    run.finish()


def crashed_state(run: Run) -> None:
    """A run killed with SIGKILL, then its state damaged further: `up` starts afresh."""
    run.start(*hanging(run)).proc.kill()
    run.finish("killed up")
    wait_until(lambda: not run.qemus(), timeout=5)
    state, box = run.state, run.state.vm("box")
    state.last_run.write_bytes(b'{"stack": "t", "exit": \x00\xff garbage')
    sidecar = box.disk(0).with_suffix(".json")
    sidecar.write_bytes(sidecar.read_bytes()[:9])
    with contextlib.suppress(FileNotFoundError):
        state.control_socket.unlink()
    with socket.socket(socket.AF_UNIX) as sock:  # bound, never listening, then closed
        sock.bind(str(state.control_socket))
    assert box.run_dir.is_dir()  # libvirt's runtime state of the killed run
    # ... whose pidfile names a live process that is not a QEMU: it must be left alone
    bystander = subprocess.Popen(["sleep", "120"])
    run.undo += [bystander.kill, bystander.wait]
    box.pidfile.parent.mkdir(parents=True, exist_ok=True)
    box.pidfile.write_text(f"{bystander.pid}\n")
    run.write({"box": {"cmdline": cmdline(say="box again", extra=WRITE),
                       "success": "box again"}})
    run.start()
    run.finish()
    assert bystander.poll() is None
    assert json.loads(sidecar.read_text())["image"] == str(run.base)


def control_socket_is_a_directory(run: Run) -> None:
    """Junk where the control socket goes, not even a socket: cleared like a stale one."""
    junk = run.state.control_socket
    junk.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    junk.mkdir()
    run.undo.append(lambda: junk.is_dir() and junk.rmdir())
    runs_to_its_end(run)


def deleted_state(run: Run) -> None:
    up = run.start(*hanging(run))
    shutil.rmtree(run.state.dir)
    run.command("down", "down")
    run.finish()
    assert "cannot write" in up.stderr  # last-run.json: said, not a crash
    assert not run.state.dir.exists()


def full_disk(run: Run) -> None:
    """The disk fills while the guest prints; the failure marker comes after."""
    up = run.start("box | box up")
    fill(run.where, leave=0)
    run.finish()
    assert "warning: console.log incomplete" in run.summary()["box"][1]
    assert "cannot write" in up.stderr
    assert last_run(run.manifest)["exit"] is None  # the run's first version: not a wrong one


# --- the matrix --------------------------------------------------------------------------------

ONE_HANG = {"box": hang()}
ONE_OK = {"box": {"cmdline": cmdline(say="box done", extra=WRITE)}}
TWO_HANG = {"one": hang(), "two": hang()}
VICTIM_AND_OTHER = {"victim": hang(),
                    "other": {"cmdline": cmdline(say="other up", sleep=5, extra=WRITE)}}
UNFINISHED = None  # last-run.json: exit null, no outcomes


@dataclass(frozen=True)
class Case:
    fault: Callable[[Run], None]
    vms: dict[str, dict[str, Any]]
    exits: dict[str, int]  # label of each vmrun command run -> its exit status
    outcomes: dict[str, tuple[str, str]] | None  # VM -> (outcome, reason)
    record: str = "last-run.json"  # where the outcomes are read: also "summary" only
    small_disk: bool = False  # the stack's directory on a 2 MiB tmpfs of the test's own
    defect: str | None = None  # a known defect of vmrun: the case is xfail(strict=True)


CASES: dict[str, Case] = {
    "SIGINT": Case(stop_signal(signal.SIGINT), ONE_HANG, {"up": 130},
                   {"box": ("stopped", "stopped")}),
    "SIGTERM": Case(stop_signal(signal.SIGTERM), ONE_HANG, {"up": 143},
                    {"box": ("stopped", "stopped")}),
    "SIGHUP": Case(stop_signal(signal.SIGHUP), ONE_HANG, {"up": 129},
                   {"box": ("stopped", "stopped")}),
    "kill-supervisor": Case(kill_supervisor, TWO_HANG, {"up": -9, "down": 0}, UNFINISHED),
    "kill-driver": Case(kill_one("driver"), VICTIM_AND_OTHER, {"up": 1},
                        {"victim": ("failed", "driver died (killed by SIGKILL)"),
                         "other": ("ok", "")}),
    "kill-qemu": Case(kill_one("qemu"), VICTIM_AND_OTHER, {"up": 1},
                      {"victim": ("failed", "crashed"), "other": ("ok", "")}),
    "kill-tree": Case(kill_tree, TWO_HANG, {"up": -9, "down": 0}, UNFINISHED),
    "panic": Case(runs_to_its_end, {"box": {"cmdline": cmdline(action="panic", extra=WRITE)}},
                  {"up": 1}, {"box": ("failed", "panic")}),
    "timeout": Case(runs_to_its_end, {"box": hang(timeout=6)}, {"up": 1},
                    {"box": ("failed", "timeout after 6s")}),
    "second-up": Case(second_up, ONE_HANG, {"second up": 3, "up": 143},
                      {"box": ("stopped", "stopped")}),
    "crashed-state": Case(crashed_state, ONE_HANG, {"killed up": -9, "up": 0},
                          {"box": ("ok", "")}),
    "control-sock-dir": Case(control_socket_is_a_directory, ONE_OK, {"up": 0},
                             {"box": ("ok", "")}),
    "deleted-state": Case(deleted_state, ONE_HANG, {"down": 0, "up": 0},
                          {"box": ("stopped", "stopped")}, record="summary"),
    "full-disk": Case(full_disk, {"box": {
        "cmdline": cmdline(say="box up", action="hang", extra=f"{WRITE} guest.lines=10000"),
        "failure": "guest: line 10000$"}}, {"up": 1},
        {"box": ("failed", "failure pattern matched: guest: line 10000")},
        record="summary", small_disk=True),
}


@contextlib.contextmanager
def tmpfs(mount: Path, size: str = "2m") -> Iterator[Path]:
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                   check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", [
    pytest.param(c, id=k, marks=[pytest.mark.xfail(strict=True, reason=c.defect)] * bool(c.defect))
    for k, c in CASES.items()])
def test_fault(case: Case, guest: Path, tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    shutil.copyfile(GUEST / "base.qcow2", base)
    pristine = sha256(base)
    with contextlib.ExitStack() as cleanup:
        where = cleanup.enter_context(tmpfs(tmp_path / "small")) if case.small_disk \
            else tmp_path
        run = Run(where, guest, base)
        cleanup.callback(run.cleanup)
        run.write(case.vms)

        case.fault(run)

        wait_until(lambda: not run.qemus(), timeout=5)
        if case.outcomes is UNFINISHED:
            data = last_run(run.manifest)
            assert data["exit"] is None, data
            assert {vm["outcome"] for vm in data["vms"].values()} == {None}, data
            run.command("down", "down")
        assert run.exits == case.exits, run.stderr
        assert not any("Traceback" in text for text in run.stderr), run.stderr
        wait_until(lambda: not run.leftovers(), timeout=5)
        assert not cgroups.find(stack_roots(run.manifest, run.names))
        assert not run.state.control_socket.exists()
        assert run.up is not None
        for vm in run.names:  # so the image below was really written to, through its overlay
            assert f"{vm} | guest: wrote disk" in run.up.output, run.up.output
        if case.outcomes is not UNFINISHED:
            summary = {vm: (outcome, reason.split("; warning: ")[0])
                       for vm, (outcome, reason) in run.summary().items()}
            assert summary == case.outcomes, run.up.output
        if case.record == "last-run.json" and case.outcomes is not UNFINISHED:
            data = last_run(run.manifest)
            assert data["exit"] == case.exits["up"], data
            assert {vm: (v["outcome"], v["reason"]) for vm, v in data["vms"].items()} \
                == case.outcomes, data
    assert sha256(base) == pristine
