"""Boot modes, disk entries (URLs, checksums, CD-ROMs, overlay sizes, the boot disk) and the
reboot/restart keys: parsed and validated without a guest."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import load_text as load
from conftest import problems_of_text as problems

SHA = "ab" * 32


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "vmlinuz").write_bytes(b"kernel")
    (tmp_path / "disk.raw").write_bytes(b"\0" * 2 * 1024 * 1024)
    (tmp_path / "cd.iso").write_bytes(b"\0" * 4096)
    return tmp_path


def test_boot_defaults(files: Path) -> None:
    stack = load(files, '[vm.k]\nkernel = "vmlinuz"\n[vm.d]\ndisks = [{ image = "disk.raw" }]\n'
                        '[vm.u]\nboot = "uefi"\nsecure_boot = true\n'
                        'disks = [{ image = "disk.raw" }]\n')
    k, d, u = stack.vms
    assert (k.boot, k.kernel, k.on_reboot, k.restart, k.restart_max) == (
        "kernel", files / "vmlinuz", "restart", "no", 3)
    assert (d.boot, d.kernel, d.secure_boot) == ("bios", None, False)
    assert (u.boot, u.secure_boot) == ("uefi", True)


def test_defaults_kernel_does_not_stop_a_firmware_vm(files: Path) -> None:
    stack = load(files, '[defaults]\nkernel = "vmlinuz"\ncmdline = "console=ttyS0 x"\n'
                        '[vm.k]\n[vm.d]\nboot = "bios"\ndisks = [{ image = "disk.raw" }]\n')
    k, d = stack.vms
    assert (k.boot, d.boot, d.kernel, d.initrd) == ("kernel", "bios", None, None)


@pytest.mark.parametrize(("body", "line", "key", "fragment"), [
    ('[vm.a]\nboot = "bios"\nkernel = "vmlinuz"\ndisks = [{ image = "disk.raw" }]\n', 3,
     "vm.a.kernel", 'kernel only with boot = "kernel"'),
    ('[vm.a]\nboot = "uefi"\ncmdline = "x"\ndisks = [{ image = "disk.raw" }]\n', 3,
     "vm.a.cmdline", 'found boot = "uefi"'),
    ('[vm.a]\nboot = "bios"\n', 2, "vm.a.boot", "without a disk to boot from"),
    ('[vm.a]\nboot = "bios"\ndisks = [{ size = "1G" }]\n', 2, "vm.a.boot",
     "without a disk to boot from"),
    ('[vm.a]\nboot = "floppy"\n', 2, "vm.a.boot", '"kernel" or "bios" or "uefi"'),
    ('[vm.a]\nkernel = "vmlinuz"\nsecure_boot = true\n', 3, "vm.a.secure_boot",
     'only with boot = "uefi"'),
    ('[vm.a]\nkernel = "vmlinuz"\ndisks = [{ image = "disk.raw", boot = true }]\n', 3,
     "vm.a.disks", "boot = true on a disk with a kernel boot"),
    ('[vm.a]\ndisks = [{ image = "disk.raw", boot = true }, { image = "cd.iso", boot = true }]\n',
     2, "vm.a.disks", "more than one disk with boot = true"),
    ('[vm.a]\ndisks = [{ image = "https://example.org/d.qcow2" }]\n', 2, "vm.a.disks",
     "a sha256 or sha512 checksum next to an image URL"),
    ('[vm.a]\ndisks = [{ image = "ftp://example.org/d.qcow2", sha256 = "' + SHA + '" }]\n', 2,
     "vm.a.disks", "https://, http:// or file:// URL"),
    ('[vm.a]\ndisks = [{ image = "https://example.org/", sha256 = "' + SHA + '" }]\n', 2,
     "vm.a.disks", "a URL naming a file"),
    ('[vm.a]\ndisks = [{ image = "disk.raw", sha256 = "abc" }]\n', 2, "vm.a.disks",
     "sha256 = 64 hexadecimal digits"),
    ('[vm.a]\ndisks = [{ image = "disk.raw", sha256 = "' + SHA + '", sha512 = "x" }]\n', 2,
     "vm.a.disks", "one checksum"),
    ('[vm.a]\ndisks = [{ image = "cd.iso", media = "cdrom", size = "1G" }]\n', 2, "vm.a.disks",
     "a CD-ROM"),
    ('[vm.a]\ndisks = [{ image = "cd.iso", media = "tape" }]\n', 2, "vm.a.disks",
     'media = "disk" or "cdrom"'),
    ('[vm.a]\ndisks = [{ size = "1G", media = "cdrom" }]\n', 2, "vm.a.disks",
     "a blank disk has only size"),
    ('[vm.a]\ndisks = [{ image = "disk.raw", size = "1M" }]\n', 2, "vm.a.disks",
     "at least the image's (2M)"),
    ('[vm.a]\nkernel = "vmlinuz"\non_reboot = "reset"\n', 3, "vm.a.on_reboot",
     '"restart" or "stop"'),
    ('[vm.a]\nkernel = "vmlinuz"\nrestart = "yes"\n', 3, "vm.a.restart",
     '"no" or "on-failure" or "always"'),
    ('[vm.a]\nkernel = "vmlinuz"\nrestart_max = -1\n', 3, "vm.a.restart_max", "0 to 100"),
])
def test_bad_boot_and_disk_values(files: Path, body: str, line: int, key: str,
                                  fragment: str) -> None:
    (found,) = problems(files, body)
    assert found.startswith(f"{files / 's.toml'}:{line}: {key}"), found
    assert fragment in found, found


def test_disk_entries(files: Path) -> None:
    stack = load(files, '[vm.a]\ndisks = [\n'
                        '  { image = "disk.raw", size = "64M", sha256 = "' + SHA.upper() + '" },\n'
                        '  { image = "cd.iso", media = "cdrom", boot = true },\n'
                        '  { image = "https://example.org/x/d.qcow2.xz", sha512 = "'
                        + "c" * 128 + '" },\n]\n')
    local, cdrom, url = stack.vms[0].disks
    assert (local.image, local.size_mib, local.checksum, local.overlaid) == (
        files / "disk.raw", 64, ("sha256", SHA), True)
    assert (cdrom.media, cdrom.readonly, cdrom.boot, cdrom.overlaid) == (
        "cdrom", True, True, False)
    assert (url.image, url.url, url.checksum, url.format) == (
        None, "https://example.org/x/d.qcow2.xz", ("sha512", "c" * 128), "")
