"""Domain XML: compared with golden files (VMRUN_REGENERATE=1 rewrites them)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
from lxml import etree

from vmrun import disks, domain, nat, shares
from vmrun.firmware import Uefi
from vmrun.layout import VMPaths
from vmrun.manifest import VM, Disk, Share

GOLDEN = Path(__file__).parent / "golden"

_COMMON = dict(boot="kernel", secure_boot=False, on_reboot="restart", restart="no", nat=False,
               restart_max=3, count=1, depends_on=(), ephemeral=False, cloud_init=None,
               networks=(), forward=(), timeout=None, success=None, failure=None, ready=None,
               ready_timeout=120, xml_devices=None, disks=(), memory=256, cpus=1,
               initrd=None, kernel=Path("/guest/vmlinuz"), cmdline="console=ttyS0")
_DISKS = (Disk(image=Path("/img/debian.qcow2"), format="qcow2", size_mib=None, readonly=False),
          Disk(image=Path("/img/installer.iso"), format="raw", size_mib=None, readonly=True,
               media="cdrom", boot=True),
          Disk(image=None, format="qcow2", size_mib=1024, readonly=False))

VMS = {
    "minimal": VM(name="alpha", **_COMMON),  # type: ignore[arg-type]
    "full": VM(**{**_COMMON, **dict(  # type: ignore[arg-type]
        name="beta-2", initrd=Path("/guest/initrd.gz"),
        cmdline='console=ttyS0 quiet guest.say="a <b> & c"', memory=1024, cpus=2,
        timeout=60, success="OK", failure="FAIL", ready="READY", ready_timeout=30,
        on_reboot="stop",
        xml_devices='<rng model="virtio"><backend model="random">/dev/urandom</backend>'
                    '</rng>')}),
    "bios": VM(**{**_COMMON, **dict(  # type: ignore[arg-type]
        name="gamma", boot="bios", kernel=None, disks=_DISKS)}),
    "uefi": VM(**{**_COMMON, **dict(  # type: ignore[arg-type]
        name="delta", boot="uefi", kernel=None, disks=_DISKS[:1])}),
    "nat": VM(**{**_COMMON, **dict(name="zeta", nat=True)}),  # type: ignore[arg-type]
    "shares": VM(**{**_COMMON, **dict(  # type: ignore[arg-type]
        name="eta", shares=(Share(Path("/src"), "/src", False, "share0"),
                            Share(Path("/data"), "/mnt/data", True, "share1")))}),
    "secure": VM(**{**_COMMON, **dict(  # type: ignore[arg-type]
        name="epsilon", boot="uefi", kernel=None, secure_boot=True, disks=_DISKS[:1])}),
}
UEFI = {False: Uefi(Path("/fw/CODE.fd"), Path("/fw/VARS.fd"), False),
        True: Uefi(Path("/fw/CODE.ms.fd"), Path("/fw/VARS.ms.fd"), True)}


def _build(vm: VM, accel: str) -> etree._Element:
    attachments = disks.plan(vm, VMPaths(vm.name, Path("/state"), Path("/state/root"),
                                         Path("/root")))
    uefi = UEFI[vm.secure_boot] if vm.boot == "uefi" else None
    link = nat.Link(Path("/root/nat/passt.sock"), nat.mac("t", vm.name)) if vm.nat else None
    mounts = shares.plan(vm, VMPaths(vm.name, Path("/state"), Path("/state/root"),
                                     Path("/root")))
    return domain.build(vm, accel, Path("/root/console.sock"), attachments, uefi=uefi,
                        nvram=Path("/state/nvram.fd"), nat_link=link, mounts=mounts,
                        virtiofsd=Path("/usr/lib/qemu/virtiofsd"))


@pytest.mark.parametrize("accel", ["tcg", "kvm"])
@pytest.mark.parametrize("case", sorted(VMS))
def test_golden(case: str, accel: str) -> None:
    xml = domain.to_string(_build(VMS[case], accel))
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


@pytest.mark.skipif(not domain.SCHEMA.exists(), reason="libvirt's schemas are not installed")
def test_golden_files_are_valid_libvirt_xml() -> None:
    schema = etree.RelaxNG(etree.parse(str(domain.SCHEMA)))
    for golden in sorted(GOLDEN.glob("*-out.xml")):
        assert schema.validate(etree.parse(str(golden))), (golden, schema.error_log.last_error)
