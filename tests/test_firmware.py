"""Booting disks through firmware (SeaBIOS, OVMF), CD-ROMs, the boot disk, UEFI variables,
overlay sizes and overlays over a changed base: on real guests.

The bootable disks are the test guest on an MBR disk with SYSLINUX (bios.img) and on a
GPT disk with a standalone GRUB (uefi.img), built by tests/guest/build-disks.sh; their
kernel command line prints `firmware: bios` / `firmware: uefi` and powers off.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import cmdline, last_run, vmrun, write_stack
from vmrun import firmware, seed
from vmrun.errors import HostError


@pytest.fixture(scope="module")
def disks(guest: Path) -> Path:
    for name in ("bios.img", "uefi.img"):
        if not (guest / name).is_file():
            pytest.fail(f"{guest / name} is missing: run `make guest` (make test does)")
    return guest


def state(manifest: Path, vm: str) -> Path:
    return manifest.parent / ".vmrun" / "t" / "vms" / vm


@pytest.mark.timeout(150)
def test_bios_and_uefi_boot_their_disks(disks: Path, tmp_path: Path) -> None:
    manifest = write_stack(tmp_path, disks, {
        "b": {"boot": "bios", "disks": [{"image": str(disks / "bios.img")}],
              "success": "^firmware: bios$"},
        "u": {"boot": "uefi", "memory": "256M", "disks": [{"image": str(disks / "uefi.img")}],
              "success": "^firmware: uefi$"},
    })
    proc = vmrun("up", str(manifest), timeout=140)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    vms = last_run(manifest)["vms"]
    assert (vms["b"]["outcome"], vms["u"]["outcome"]) == ("ok", "ok"), vms
    # The UEFI VM has its own variables file, made from the firmware's template.
    nvram = state(manifest, "u") / "nvram.fd"
    template = firmware.find(False).template
    assert nvram.stat().st_size == template.stat().st_size
    assert not (state(manifest, "b") / "nvram.fd").exists()
    # The images themselves were never written.
    assert "vmrun-test" not in (disks / "bios.img").read_bytes()[:512].decode("latin-1")


@pytest.mark.timeout(200)
def test_uefi_variables_are_kept_and_fresh_starts_them_anew(disks: Path,
                                                            tmp_path: Path) -> None:
    manifest = write_stack(tmp_path, disks, {
        "u": {"boot": "uefi", "memory": "256M", "disks": [{"image": str(disks / "uefi.img")}],
              "success": "^firmware: uefi$"}})
    assert vmrun("up", str(manifest), timeout=90).returncode == 0
    nvram = state(manifest, "u") / "nvram.fd"
    first = nvram.stat()
    with open(nvram, "r+b") as vars_file:  # a mark the next run must keep
        vars_file.seek(first.st_size - 1)
        vars_file.write(b"\x5a")
    assert vmrun("up", str(manifest), timeout=90).returncode == 0
    assert nvram.stat().st_ino == first.st_ino
    assert nvram.read_bytes()[-1:] == b"\x5a"
    assert vmrun("up", "--fresh", str(manifest), timeout=90).returncode == 0
    assert nvram.read_bytes()[-1:] != b"\x5a"


@pytest.mark.timeout(120)
def test_boot_true_picks_the_boot_disk(disks: Path, tmp_path: Path) -> None:
    """The first disk is blank; the second says boot = true and is booted."""
    manifest = write_stack(tmp_path, disks, {
        "b": {"boot": "bios", "disks": [{"size": "8M"},
                                        {"image": str(disks / "bios.img"), "boot": True}],
              "success": "^firmware: bios$"}})
    proc = vmrun("up", str(manifest), timeout=100)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "guest: disks: vda vdb" in proc.stdout


@pytest.mark.timeout(120)
def test_cdrom_is_attached_read_only_on_virtio_scsi(guest: Path, tmp_path: Path) -> None:
    iso = tmp_path / "media.iso"
    seed.write(iso, {"user-data": b"#cloud-config\nfrom: the cdrom\n",
                             "meta-data": b"instance-id: x\n"})
    manifest = write_stack(tmp_path, guest, {
        "k": {"cmdline": cmdline(extra="guest.seed=1"),
              "disks": [{"image": str(iso), "media": "cdrom"}],
              "success": "seed: from: the cdrom"}})
    proc = vmrun("up", str(manifest), timeout=100)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "guest: seed on sr0" in proc.stdout
    xml = vmrun("render", str(manifest), "k").stdout
    assert "device=\"cdrom\"" in xml and "<readonly/>" in xml and 'model="virtio-scsi"' in xml


def write_base(path: Path, text: str) -> None:
    data = f"vmrun-test {text}\n".encode()
    path.write_bytes(data + b"\0" * (1024 * 1024 - len(data)))


@pytest.mark.timeout(200)
def test_overlay_over_a_base_changed_in_place_is_refused(guest: Path, tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    write_base(base, "first base")
    manifest = write_stack(tmp_path, guest, {
        "r": {"cmdline": cmdline(extra="guest.disk=read"),
              "disks": [{"image": str(base), "size": "64M"}]}})
    proc = vmrun("up", str(manifest), timeout=90)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "guest: disk says: vmrun-test first base" in proc.stdout
    overlay = state(manifest, "r") / "disk-0.qcow2"
    info = json.loads(subprocess.run(
        ["qemu-img", "info", "--output=json", str(overlay)], capture_output=True, text=True,
        check=True).stdout)
    assert info["virtual-size"] == 64 * 1024 * 1024
    # Rebuild the base in place (same path, same size, new content).
    write_base(base, "second base")
    os.utime(base, ns=(base.stat().st_atime_ns, base.stat().st_mtime_ns + 10**9))
    proc = vmrun("up", str(manifest), timeout=60)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "changed since its overlay" in proc.stderr and "--fresh" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = vmrun("up", "--fresh", str(manifest), timeout=90)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "guest: disk says: vmrun-test second base" in proc.stdout


def test_overlay_smaller_than_its_image_is_refused(guest: Path, tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    write_base(base, "x")
    with open(base, "r+b") as f:
        f.truncate(8 * 1024 * 1024)
    manifest = write_stack(tmp_path, guest, {
        "r": {"disks": [{"image": str(base), "size": "4M"}]}})
    proc = vmrun("check", str(manifest), timeout=30)
    assert proc.returncode == 2
    assert "vm.r.disks: invalid value in disks[0].size" in proc.stderr, proc.stderr
    assert "at least the image's (8M), found 4M" in proc.stderr


def test_missing_firmware_is_a_host_error(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(firmware, "KNOWN", ((tmp_path / "a", tmp_path / "b", False),
                                            (tmp_path / "c", tmp_path / "d", True)))
    with pytest.raises(HostError, match="no UEFI firmware with Secure Boot") as caught:
        firmware.find(True, dirs=(tmp_path,))
    assert caught.value.exit_code == 3
    with pytest.raises(HostError, match="no UEFI firmware for QEMU"):
        firmware.find(False, dirs=(tmp_path,))


def test_secure_boot_renders_the_secure_firmware(guest: Path, tmp_path: Path) -> None:
    manifest = write_stack(tmp_path, guest, {
        "s": {"boot": "uefi", "secure_boot": True,
              "disks": [{"image": str(guest / "uefi.img")}]}})
    proc = vmrun("render", str(manifest), "s", timeout=30)
    assert proc.returncode == 0, proc.stderr
    secure = firmware.find(True)
    assert f'secure="yes">{secure.code}</loader>' in proc.stdout
    assert f'template="{secure.template}"' in proc.stdout
    assert '<smm state="on"/>' in proc.stdout
