"""Helpers for tests that run real guests under the real embedded driver.

The guest is the project's test guest (tests/guest/, built by `make guest` into
build/guest/): Debian's cloud kernel and a busybox initramfs whose init obeys
`guest.say=`, `guest.sleep=` and `guest.action=` on the kernel command line.
"""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmrun import manifest
from vmrun.errors import ManifestError
from vmrun.layout import StackPaths

REPO = Path(__file__).resolve().parent.parent
GUEST = REPO / "build" / "guest"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "guest" in item.fixturenames:
            item.add_marker(pytest.mark.guest)


@pytest.fixture(scope="session")
def guest() -> Path:
    for name in ("vmlinuz", "initrd.gz"):
        if not (GUEST / name).is_file():
            pytest.fail(f"{GUEST / name} is missing: run `make guest` (make test does)")
    return GUEST


def cmdline(say: str | None = None, action: str = "poweroff", sleep: float | None = None,
            extra: str = "") -> str:
    parts = ["console=ttyS0", "quiet"]
    if say is not None:
        parts.append(f'guest.say="{say}"')
    if sleep is not None:
        parts.append(f"guest.sleep={sleep:g}")
    parts.append(f"guest.action={action}")
    if extra:
        parts.append(extra)
    return " ".join(parts)


def in_netns(name: str) -> list[str]:
    """Command prefix: run in the network namespace `name` (a test's own), and in this
    mount namespace, so that namespaces vmrun creates are visible to the test."""
    return ["nsenter", f"--net=/run/netns/{name}"]


@pytest.fixture
def test_netns() -> Iterator[str]:
    """A network namespace of the test's own, with only loopback up: what a test forwards
    or sends stays inside it."""
    name = f"vmrun-test-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, timeout=30)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=30)


def vmrun(*args: str, netns: str | None = None,
          timeout: float = 200) -> subprocess.CompletedProcess[str]:
    """Run the vmrun command to its end (in the test's network namespace `netns`)."""
    prefix = in_netns(netns) if netns else []
    return subprocess.run([*prefix, sys.executable, "-m", "vmrun", *args],
                          capture_output=True, text=True, timeout=timeout)


def toml_value(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return str(value)


def load_text(directory: Path, text: str, env: dict[str, str] | None = None) -> manifest.Stack:
    """Write `text` to `directory`/s.toml and load it as a manifest (environment `env`,
    1 TiB of host memory): the stack is named "s" and relative paths resolve in `directory`."""
    path = directory / "s.toml"
    path.write_text(text)
    return manifest.loads(text, path, environ=env or {}, host_memory=1 << 20)


def problems_of_text(directory: Path, text: str, env: dict[str, str] | None = None) -> list[str]:
    """The problems (as printed) that loading the bad manifest `text` reports, as
    `load_text` loads it; fails the test if it loads."""
    with pytest.raises(ManifestError) as info:
        load_text(directory, text, env)
    return [str(p) for p in info.value.problems]


def write_stack(directory: Path, guest_dir: Path, vms: dict[str, dict[str, Any]],
                name: str = "t", **top: Any) -> Path:
    """Write a manifest with one [vm.NAME] table per entry of `vms`."""
    lines = [f"name = {toml_value(name)}"]
    lines += [f"{k} = {toml_value(v)}" for k, v in top.items()]
    lines += ["", "[defaults]",
              f"kernel = {toml_value(str(guest_dir / 'vmlinuz'))}",
              f"initrd = {toml_value(str(guest_dir / 'initrd.gz'))}",
              'memory = "192M"', "timeout = 90"]
    for vm, settings in vms.items():
        lines += ["", f"[vm.{vm}]"] + [f"{k} = {toml_value(v)}" for k, v in settings.items()]
    path = directory / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


class Up:
    """A `vmrun up` process whose stdout is read line by line in the background."""

    def __init__(self, manifest: Path, *args: str) -> None:
        self.manifest = manifest
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vmrun", "up", str(manifest), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.stderr = ""
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            # "one   | text" -> "one | text": the name column's padding is not tested here
            self.lines.put(re.sub(r"^(\S+) +\| ", r"\1 | ", line.rstrip("\n")))
        self.lines.put(None)

    def expect(self, *fragments: str, timeout: float = 60) -> None:
        """Wait until every fragment has appeared in some output line."""
        missing = [f for f in fragments if not any(f in line for line in self.seen)]
        deadline = time.monotonic() + timeout
        while missing:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting for {missing}; saw {self.seen}")
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                assert self.proc.stderr is not None
                raise AssertionError(f"vmrun up ended before {missing}; saw {self.seen}; "
                                     f"stderr: {self.proc.stderr.read()}")
            self.seen.append(line)
            missing = [f for f in missing if f not in line]

    def wait(self, timeout: float = 120) -> int:
        code = self.proc.wait(timeout)
        assert self.proc.stderr is not None
        self.stderr = self.proc.stderr.read()
        while True:
            line = self.lines.get(timeout=10)
            if line is None:
                break
            self.seen.append(line)
        return code

    @property
    def output(self) -> str:
        return "\n".join(self.seen)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def last_run(manifest: Path, name: str = "t") -> dict[str, Any]:
    data: dict[str, Any] = json.loads(
        (manifest.parent / ".vmrun" / name / "last-run.json").read_text())
    return data


def processes() -> Iterator[tuple[int, bytes]]:
    """(pid, command line) of every process that has one (zombies have none)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    yield int(entry), f.read()
            except OSError:
                continue


def stack_qemus(manifest: Path, vms: list[str], name: str = "t") -> dict[str, int]:
    """QEMU processes (not zombies) running for the given VMs of a stack, by VM name."""
    paths = StackPaths(manifest.parent / ".vmrun" / name)
    roots = {vm: os.fsencode(str(paths.vm(vm).root)) for vm in vms}
    return {vm: pid for pid, cmd in processes() if b"qemu-system" in cmd
            for vm, root in roots.items() if root in cmd}


def stack_roots(manifest: Path, vms: list[str], name: str = "t") -> list[Path]:
    """The embedded roots of the given VMs of a stack."""
    paths = StackPaths(manifest.parent / ".vmrun" / name)
    return [paths.vm(vm).root for vm in vms]


def seen(up: Up, fragment: str, times: int = 1, timeout: float = 90) -> None:
    """Wait until `fragment` has appeared in `times` output lines (Up.expect waits for a
    first appearance only)."""
    deadline = time.monotonic() + timeout
    while sum(fragment in line for line in up.seen) < times:
        try:
            line = up.lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"timed out waiting for {fragment!r} x{times}; "
                                 f"saw {up.seen}") from None
        if line is None:
            raise AssertionError(f"vmrun up ended before {fragment!r} x{times}; "
                                 f"saw {up.seen}")
        up.seen.append(line)


def wait_until(predicate: Any, timeout: float, interval: float = 0.05) -> float:
    """Poll a condition the kernel gives no event for; return the seconds it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)
    return time.monotonic() - start


def driver_pid(vm: str, manifest: Path) -> int:
    """The pid of the driver process of `vm` in the stack of `manifest`."""
    wanted = [b"vmrun.proc.driver", f'"name": "{vm}"'.encode(), os.fsencode(str(manifest.parent))]
    pids = [pid for pid, cmd in processes() if all(w in cmd for w in wanted)]
    assert len(pids) == 1, pids
    return pids[0]
