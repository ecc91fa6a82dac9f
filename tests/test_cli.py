"""The doctor and schema commands as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

from vmrun import schema


def vmrun(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmrun", *args], capture_output=True,
                          text=True, timeout=60)


def test_schema_command_prints_the_generated_schema() -> None:
    proc = vmrun("schema")
    assert proc.returncode == 0
    assert json.loads(proc.stdout) == schema.manifest_schema()


def test_doctor_command_on_this_host() -> None:
    proc = vmrun("doctor", "--json")
    assert proc.returncode == 0, proc.stdout
    report = json.loads(proc.stdout)
    assert report["ok"] is True
    assert {"libvirt", "qemu", "kvm", "fastsig"} <= {c["name"] for c in report["checks"]}
    plain = vmrun("doctor")
    assert plain.returncode == 0 and "fastsig" in plain.stdout
