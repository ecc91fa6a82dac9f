"""vmrun.spawn and the supervisor's children: exactly the descriptors given, nothing
leaked in the supervisor (a leaked command pipe would never give a driver EOF)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from vmrun.children import Children
from vmrun.layout import StackPaths
from vmrun.spawn import spawn

LIST_FDS = "import os; print(sorted(int(f) for f in os.listdir('/proc/self/fd')))"


def open_fds() -> set[int]:
    return {int(f) for f in os.listdir("/proc/self/fd")}


def wait(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.timeout(60)
def test_child_gets_exactly_the_descriptors_given(tmp_path: Path) -> None:
    log = tmp_path / "log"
    r, w = os.pipe2(os.O_CLOEXEC)
    noise = os.open(os.devnull, os.O_RDONLY)  # inheritable: must not reach the child
    before = open_fds()
    pid = spawn([sys.executable, "-c", LIST_FDS], fds={4: w, 3: r}, env=os.environ, log=log)
    assert wait(pid) == 0
    assert open_fds() == before
    # 0, 1, 2, the two given at their numbers, and listdir's own descriptor
    listed = eval(log.read_text())
    assert listed[:5] == [0, 1, 2, 3, 4] and len(listed) == 6, listed
    for fd in (r, w, noise):
        os.close(fd)


@pytest.mark.timeout(60)
def test_renumbering_swaps_safely(tmp_path: Path) -> None:
    log = tmp_path / "log"
    a_r, a_w = os.pipe2(os.O_CLOEXEC)
    b_r, b_w = os.pipe2(os.O_CLOEXEC)
    os.write(a_w, b"A")
    os.write(b_w, b"B")
    script = "import os; print(os.read(3, 1).decode() + os.read(4, 1).decode())"
    # each target number is another source's number: copies must be made first
    pid = spawn([sys.executable, "-c", script], fds={3: b_r, 4: a_r}, env=os.environ,
                log=log)
    assert wait(pid) == 0
    assert log.read_text().strip() == "BA"
    for fd in (a_r, a_w, b_r, b_w):
        os.close(fd)


@pytest.mark.timeout(120)
def test_supervisor_keeps_two_descriptors_per_driver_and_frees_them(tmp_path: Path) -> None:
    children = Children()
    paths = StackPaths(tmp_path / "s")
    children.start_zygote(paths.dir, [], tmp_path / "zygote.log")
    try:
        before = open_fds()
        spawned = [children.spawn_driver(f"vm{i}", "no-such-mode", "{}", paths.vm(f"vm{i}"),
                                         tmp_path / f"driver{i}.log") for i in range(8)]
        assert len(open_fds()) == len(before) + 2 * len(spawned)
        for child in spawned:
            # The driver gets EOF on its command pipe once the supervisor lets go of it.
            children.forget(child)
            while not child.eof:
                child.read()
            os.close(child.fd)
            wait(child.pid)
        assert open_fds() == before
    finally:
        children.end_zygote()
