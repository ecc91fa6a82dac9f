"""Domain XML: compared with golden files (VMRUN_REGENERATE=1 rewrites them)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vmrun import domain
from vmrun.manifest import VM

GOLDEN = Path(__file__).parent / "golden"

VMS = {
    "minimal": VM(name="alpha", kernel=Path("/guest/vmlinuz"), initrd=None,
                  cmdline="console=ttyS0", memory=256, cpus=1, timeout=None,
                  success=None, failure=None, ready=None, ready_timeout=120, count=1,
                  depends_on=(), xml_devices=None, disks=(), ephemeral=False, cloud_init=None,
                  networks=(), forward=()),
    "full": VM(name="beta-2", kernel=Path("/guest/vmlinuz"), initrd=Path("/guest/initrd.gz"),
               cmdline='console=ttyS0 quiet guest.say="a <b> & c"', memory=1024, cpus=2,
               timeout=60, success="OK", failure="FAIL", ready="READY", ready_timeout=30,
               count=1, depends_on=(), disks=(), ephemeral=False, cloud_init=None,
               networks=(), forward=(),
               xml_devices='<rng model="virtio"><backend model="random">/dev/urandom</backend>'
                           '</rng>'),
}


@pytest.mark.parametrize("accel", ["tcg", "kvm"])
@pytest.mark.parametrize("case", sorted(VMS))
def test_golden(case: str, accel: str) -> None:
    xml = domain.to_string(domain.build(VMS[case], accel, Path("/root/console.sock")))
    golden = GOLDEN / f"{case}-{accel}-out.xml"
    if os.environ.get("VMRUN_REGENERATE"):
        golden.write_text(xml)
    assert xml == golden.read_text()


def test_render_command(tmp_path: Path) -> None:
    (tmp_path / "k").write_bytes(b"")
    manifest = tmp_path / "s.toml"
    manifest.write_text('accel = "tcg"\n[vm.a]\nkernel = "k"\n[vm.b]\nkernel = "k"\n')
    proc = subprocess.run([sys.executable, "-m", "vmrun", "render", str(manifest), "b"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("<domain") == 1 and "<name>b</name>" in proc.stdout
    assert f"<kernel>{tmp_path / 'k'}</kernel>" in proc.stdout
    assert not (tmp_path / ".vmrun").exists()
    proc = subprocess.run([sys.executable, "-m", "vmrun", "render", str(manifest), "zz"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and 'no VM named "zz"' in proc.stderr


def test_no_usb_controller_unless_asked() -> None:
    """A regression guard for start-up speed (docs/performance.md): libvirt's default USB
    controller (and its PCIe root port) is switched off, unless xml_devices brings one."""
    xml = domain.build(VMS["minimal"], "tcg", Path("/root/console.sock"))
    assert [(c.get("type"), c.get("model")) for c in xml.iter("controller")] == [
        ("usb", "none")]
    mine = dataclasses.replace(VMS["minimal"],
                               xml_devices="<controller type='usb' model='qemu-xhci'/>")
    xml = domain.build(mine, "tcg", Path("/root/console.sock"))
    assert [(c.get("type"), c.get("model")) for c in xml.iter("controller")] == [
        ("usb", "qemu-xhci")]
