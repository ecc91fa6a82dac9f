"""The CI-style Makefile example runs as documented."""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from conftest import REPO, in_netns

EXAMPLE = REPO / "examples" / "makefile"


@pytest.mark.timeout(240)
def test_makefile_example(guest: Path, tmp_path: Path) -> None:
    work = tmp_path / "makefile"
    shutil.copytree(EXAMPLE, work, ignore=shutil.ignore_patterns(".vmrun", "ps.json"))
    # the example's relative paths point at the checkout's guest: keep them valid
    stack = work / "stack.toml"
    stack.write_text(stack.read_text().replace("../../build/guest", str(guest)))
    vmrun = Path(sys.executable).with_name("vmrun")
    proc = subprocess.run(["make", "-C", str(work), "test", f"VMRUN={vmrun}",
                           f"PYTHON={sys.executable}"],
                          capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "answer=42" in proc.stdout
    assert "stack ci stopped" in proc.stderr
    ps = subprocess.run([str(vmrun), "ps", str(stack)], capture_output=True, timeout=30)
    assert ps.returncode == 1  # brought down


@pytest.mark.timeout(300)
def test_lab_example(guest: Path, tmp_path: Path) -> None:
    """examples/lab runs to exit 0 (inside a network namespace of the test's own)."""
    work = tmp_path / "lab"
    shutil.copytree(REPO / "examples" / "lab", work,
                    ignore=shutil.ignore_patterns(".vmrun"))
    stack = work / "stack.toml"
    stack.write_text(stack.read_text().replace("../../build/guest", str(guest)))
    netns = f"vmrun-test-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", netns], check=True, timeout=30)
    try:
        subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True, timeout=30)
        # The lab's VMs have nat, and passt wants an interface with a default route: a
        # veth pair inside the namespace, leading nowhere (nothing leaves the namespace).
        for argv in (["link", "add", "out0", "type", "veth", "peer", "name", "out1"],
                     ["addr", "add", "198.51.100.1/24", "dev", "out0"],
                     ["link", "set", "out0", "up"], ["link", "set", "out1", "up"],
                     ["route", "add", "default", "via", "198.51.100.254", "dev", "out0"]):
            subprocess.run(["ip", "-n", netns, *argv], check=True, timeout=30)
        proc = subprocess.run([*in_netns(netns), sys.executable, "-m", "vmrun", "up",
                               str(stack)], capture_output=True, text=True, timeout=280)
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "web-2  | guest: fetched: hello-from-db" in proc.stdout
    assert "db     | guest: disk says: vmrun-test lab base image" in proc.stdout
    assert "cloudy | seed: message: configured by cloud-init" in proc.stdout
    assert "cloudy | net:       macaddress:" in proc.stdout  # the generated network-config
    assert "report | guest: wrote disk" in proc.stdout  # after both web copies ended ok
    # a read-only shared folder, and a NAT NIC after the lan NIC
    assert "cloudy | guest: cat /lab/user-data.yaml: message: configured by cloud-init" \
        in proc.stdout
    assert "cloudy | net:   nat:" in proc.stdout


def test_debian_example_checks() -> None:
    """examples/debian is valid (running it takes a Debian boot: docs/access.md shows it)."""
    proc = subprocess.run([sys.executable, "-m", "vmrun", "check",
                           str(REPO / "examples" / "debian" / "stack.toml")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
