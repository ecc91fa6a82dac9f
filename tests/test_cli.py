"""The doctor and schema commands as a user runs them."""

from __future__ import annotations

import json

from conftest import vmrun
from vmrun import schema


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
