"""Faults around a running stack: a full disk, a deleted state directory.  Whatever
happens to the state directory, the outcome and exit status stay right and no guest is
left running."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Up, cmdline, stack_qemus, vmrun, wait_until, write_stack
from vmrun import procs


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (the test's own mount), unmounted afterwards."""
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: Path, leave: int) -> Path:
    """Fill the filesystem of `directory` up to `leave` free bytes; return the filler."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError:
        pass
    finally:
        os.close(fd)
    # give back `leave` bytes
    size = filler.stat().st_size
    with open(filler, "r+b") as f:
        f.truncate(max(0, size - leave))
    return filler


@pytest.mark.timeout(240)
def test_full_disk_while_a_guest_runs_never_turns_failed_into_ok(guest: Path, tmp_path: Path,
                                                                  small_disk: Path) -> None:
    """The console log hits ENOSPC early; the failure marker printed long after must still
    fail the VM.  The lost log is reported."""
    manifest = write_stack(tmp_path, guest, {
        # the marker comes 3 s after the flood: the test frees the disk meanwhile
        "chatty": {"cmdline": cmdline(say="chatty up", sleep=3, extra="guest.lines=20000"),
                   "failure": "guest: powering off$"},
    }, state_dir=str(small_disk / "state"))
    filler = fill(small_disk, leave=64 * 1024)  # room to start, not for 20,000 lines
    up = Up(manifest)
    try:
        up.expect("chatty | guest: line 20000", timeout=180)  # console.log is full by now
        filler.unlink()  # room again, for last-run.json at the end
        assert up.wait(120) == 1, up.stderr
    finally:
        up.kill()
    data = json.loads((small_disk / "state" / "t" / "last-run.json").read_text())
    vm = data["vms"]["chatty"]
    assert vm["outcome"] == "failed" and vm["reason"].startswith("failure pattern matched")
    assert any("console.log incomplete" in w for w in vm["warnings"]), vm
    assert "warning: console.log incomplete" in up.output
    assert not stack_qemus(manifest, ["chatty"])


def test_a_directory_vmrun_did_not_make_is_never_touched(guest: Path, tmp_path: Path) -> None:
    """state_dir = "../shared" and a stack named "data": shared/data holds the user's own
    files.  clean must not delete them, up must not take them over (nor chmod them)."""
    shared = tmp_path / "shared"
    (shared / "data").mkdir(parents=True)
    (shared / "data" / "thesis.tex").write_text("precious\n")
    (shared / "data").chmod(0o755)
    project = tmp_path / "project"
    project.mkdir()
    manifest = write_stack(project, guest, {"a": {"cmdline": cmdline()}}, name="data",
                           state_dir="../shared")
    for verb in (["clean"], ["up"], ["up", "--detach"], ["down"]):
        out = vmrun(*verb, str(manifest))
        assert out.returncode == 3, (verb, out.stderr)
        assert "was not made by vmrun" in out.stderr
    assert (shared / "data" / "thesis.tex").read_text() == "precious\n"
    assert sorted(p.name for p in (shared / "data").iterdir()) == ["thesis.tex"]
    assert stat.S_IMODE((shared / "data").stat().st_mode) == 0o755
    # a stack directory vmrun made is cleaned as before
    other = write_stack(project, guest, {"a": {"cmdline": cmdline()}}, name="mine",
                        state_dir="../shared")
    assert vmrun("up", str(other)).returncode == 0
    assert (shared / "mine" / ".vmrun-stack").exists()
    assert vmrun("clean", str(other)).returncode == 0
    assert not (shared / "mine").exists()


@pytest.mark.timeout(120)
def test_full_disk_while_preparing_is_exit_3_with_nothing_half_written(guest: Path,
                                                                       tmp_path: Path) -> None:
    # A short mount point, so that the VM's embedded root lives in the state directory
    # itself (on the small disk) and gets its copy of QEMU's capabilities (~200 kB) there.
    mount = Path(tempfile.mkdtemp(prefix="vr", dir="/tmp"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True)
    try:
        manifest = write_stack(tmp_path, guest, {"a": {"cmdline": cmdline()}},
                               state_dir=str(mount))
        assert vmrun("up", str(manifest)).returncode == 0  # warm: capabilities cached
        root = mount / "t" / "vms" / "a" / "root"
        assert not root.is_symlink()
        shutil.rmtree(root / "cache")
        fill(mount, leave=64 * 1024)
        out = vmrun("up", str(manifest))
        assert out.returncode == 3, out.stderr
        assert "No space left on device" in out.stderr and "Traceback" not in out.stderr
        leftovers = [p.name for p in (root / "cache" / "qemu").glob("*")] \
            if (root / "cache" / "qemu").exists() else []
        assert leftovers == [], leftovers  # no half-copied capabilities
        assert not stack_qemus(manifest, ["a"])
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
        mount.rmdir()


def descendants(root_pid: int) -> list[int]:
    """Every live descendant of `root_pid`, from /proc (parents before children)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [root_pid]
    while frontier:
        children = [pid for pid, ppid in parents.items() if ppid in frontier]
        found += children
        frontier = children
    return found


@pytest.mark.timeout(600)
def test_whole_tree_sigkill_leaves_no_guest(guest: Path, tmp_path: Path) -> None:
    """20 times: kill -9 the supervisor and every vmrun process under it at once, in a
    random order; within 2 s no QEMU of the stack is left (the kernel ends the stack's
    PID namespace with its init)."""
    manifest = write_stack(tmp_path, guest, {
        "one": {"cmdline": cmdline(action="hang")},
        "two": {"cmdline": cmdline(action="hang")},
    })
    names = ["one", "two"]
    rng = random.Random(20261126)
    for attempt in range(20):
        up = Up(manifest, "--quiet")
        try:
            wait_until(lambda: len(stack_qemus(manifest, names)) == 2, timeout=120,
                       interval=0.02)
            tree = [up.proc.pid] + [pid for pid in descendants(up.proc.pid)
                                    if b"qemu-system" not in procs.cmdline(pid)]
            assert len(tree) >= 4, tree  # supervisor, the namespace's init, two drivers
            rng.shuffle(tree)
            for pid in tree:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            took = wait_until(lambda: not stack_qemus(manifest, names), timeout=2)
            print(f"attempt {attempt}: QEMUs gone {took:.2f}s after killing {len(tree)} "
                  "processes")
        finally:
            up.kill()
    assert vmrun("down", str(manifest)).returncode == 0



@pytest.mark.timeout(240)
def test_a_running_stack_whose_state_directory_is_deleted(guest: Path, tmp_path: Path) -> None:
    """The lock and the control socket live outside the state directory: a stack whose
    state directory is deleted stays findable, `down` shuts it down with ACPI (not as
    leftovers), and a signal still ends `vmrun up` with 128+N."""
    manifest = write_stack(tmp_path, guest, {
        "box": {"cmdline": cmdline(say="box up", action="hang"), "ready": "box up"},
    })
    state = tmp_path / ".vmrun" / "t"
    try:
        up = vmrun("up", "--detach", "--wait", str(manifest))
        assert up.returncode == 0, up.stderr
        shutil.rmtree(state)
        ps = vmrun("ps", "--json", str(manifest))
        assert ps.returncode == 0, ps.stderr
        assert json.loads(ps.stdout)["vms"]["box"]["state"] == "ready"
        down = vmrun("down", str(manifest))
        assert down.returncode == 0, down.stderr
        assert "stopped" in down.stderr and "leftover" not in down.stderr
        assert not stack_qemus(manifest, ["box"])
    finally:
        vmrun("down", "--timeout", "0", str(manifest))

    foreground = Up(manifest)
    try:
        foreground.expect("box | box up", timeout=120)
        shutil.rmtree(state)
        foreground.proc.send_signal(signal.SIGINT)
        assert foreground.wait(60) == 130, foreground.stderr
        assert "Traceback" not in foreground.stderr
        assert "cannot write" in foreground.stderr  # last-run.json: said, not a crash
    finally:
        foreground.kill()
    assert not stack_qemus(manifest, ["box"])
