"""A real Debian 12 (systemd, cloud-init, sshd) booted through firmware, BIOS and UEFI,
configured by a NoCloud seed, reaching `ok`.  The slowest test of the suite (about a
minute and a half under TCG: both guests boot at once)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import last_run, vmrun, write_stack

USER_DATA = """\
#cloud-config
write_files:
  - path: /usr/local/bin/report
    permissions: "0755"
    content: |
      #!/bin/sh
      fw=$(cat /sys/firmware/efi/fw_platform_size 2>/dev/null || echo bios)
      root=$(df -BG --output=size / | tail -n 1 | tr -d " ")
      echo "DEBIAN-OK $(hostname) ssh=$(systemctl is-active ssh) fw=$fw root=$root" >/dev/ttyS0
runcmd:
  - [/usr/local/bin/report]
power_state:
  mode: poweroff
  condition: true
  timeout: 60
"""


@pytest.fixture(scope="module")
def debian(guest: Path) -> Path:
    image = guest / "debian.qcow2"
    if not image.is_file():
        pytest.fail(f"{image} is missing: run `make guest` (make test does)")
    return image


@pytest.mark.timeout(420)
def test_debian_boots_through_bios_and_uefi_with_a_seed(debian: Path, guest: Path,
                                                        tmp_path: Path) -> None:
    (tmp_path / "user.yaml").write_text(USER_DATA)
    vm = {"disks": [{"image": str(debian), "size": "3G"}], "memory": "768M",
          "cloud_init": {"user_data": "user.yaml"}, "timeout": 400}
    manifest = write_stack(tmp_path, guest, {
        "bios": {**vm, "boot": "bios", "success": "^DEBIAN-OK bios ssh=active fw=bios root=3G$"},
        "uefi": {**vm, "boot": "uefi", "success": "^DEBIAN-OK uefi ssh=active fw=64 root=3G$"},
    })
    proc = vmrun("up", str(manifest), timeout=410)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    vms = last_run(manifest)["vms"]
    assert (vms["bios"]["outcome"], vms["uefi"]["outcome"]) == ("ok", "ok"), vms
    # (root=3G: cloud-init grew the root partition into the larger overlay)
    assert "-----BEGIN SSH HOST KEY KEYS-----" in proc.stdout
