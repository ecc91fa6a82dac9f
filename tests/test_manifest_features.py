"""Manifest features: ${VAR} interpolation, copies (count), placeholders, depends_on and
xml_devices — parsed and validated without a guest."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_text as load
from conftest import problems_of_text as problems
from vmrun import domain
from vmrun.errors import ManifestError


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "vmlinuz").write_bytes(b"kernel")
    return tmp_path


def test_interpolation_from_environment_and_env_file(files: Path) -> None:
    (files / ".env").write_text("# comment\nMEM=300\nexport WHO='from file'\nOVER=file\n")
    stack = load(files, '''
name = "${STACK:-lab}"
[vm.a]
kernel = "vmlinuz"
memory = "${MEM}M"
cmdline = "who=${WHO} over=${OVER} cost=$$5 empty=${UNSET-}"
''', env={"OVER": "env"})
    assert stack.name == "lab"
    vm = stack.vms[0]
    assert vm.memory == 300
    assert vm.cmdline == "who=from file over=env cost=$5 empty="


def test_undefined_variable_names_it_and_its_line(files: Path) -> None:
    (found,) = problems(files, '[vm.a]\nkernel = "vmlinuz"\ncmdline = "x=${NOPE}"\n')
    assert found.startswith(f"{files / 's.toml'}:3: vm.a.cmdline:")
    assert 'variable "NOPE" is not set' in found and "${NOPE:-value}" in found


def test_bad_env_file_line(files: Path) -> None:
    (files / ".env").write_text("GOOD=1\nthis is not an assignment\n")
    (found,) = problems(files, '[vm.a]\nkernel = "vmlinuz"\n')
    assert found.startswith(f"{files / '.env'}:2: invalid line in .env")


def test_count_makes_named_copies_with_placeholders(files: Path) -> None:
    stack = load(files, '''
name = "lab"
[vm.web]
kernel = "vmlinuz"
count = 3
cmdline = "console=ttyS0 name={vm.name} i={index} s={stack.name} {{literal}}"
[vm.db]
kernel = "vmlinuz"
cmdline = "i={index}"
''')
    assert [vm.name for vm in stack.vms] == ["web-1", "web-2", "web-3", "db"]
    assert stack.vms[1].cmdline == "console=ttyS0 name=web-2 i=2 s=lab {literal}"
    assert {vm.group for vm in stack.vms[:3]} == {"web"}
    assert stack.vms[3].cmdline == "i=1"


@pytest.mark.parametrize(("body", "line", "fragment"), [
    ('[vm.a]\nkernel = "vmlinuz"\ncmdline = "{nope}"\n', 3, "known placeholders only"),
    ('[vm.a]\nkernel = "vmlinuz"\ncount = 0\n', 3, "from 1 to 64"),
    ('[vm.abcdefghijklmnopqr]\nkernel = "vmlinuz"\ncount = 10\n', 3, "too long"),
    ('[vm.a]\nkernel = "vmlinuz"\ndepends_on = ["zz"]\n', 3, 'unknown VM "zz"'),
    ('[vm.a]\nkernel = "vmlinuz"\ndepends_on = { b = "done" }\n[vm.b]\nkernel = "vmlinuz"\n',
     3, '"done" is not a condition'),
    ('[vm.a]\nkernel = "vmlinuz"\ndepends_on = "b"\n', 3, "an array of VM names"),
    ('[vm.a]\nkernel = "vmlinuz"\ndepends_on = ["a"]\n', 3, "depends on itself"),
    ('[vm.a]\nkernel = "vmlinuz"\nxml_devices = "<rng>"\n', 3, "well-formed XML"),
])
def test_feature_errors(files: Path, body: str, line: int, fragment: str) -> None:
    found = problems(files, body)
    assert len(found) == 1, found
    assert found[0].startswith(f"{files / 's.toml'}:{line}: "), found
    assert fragment in found[0], found


def test_dependency_cycle_is_named(files: Path) -> None:
    (found,) = problems(files, '''
[vm.a]
kernel = "vmlinuz"
depends_on = ["b"]
[vm.b]
kernel = "vmlinuz"
depends_on = { c = "ok" }
[vm.c]
kernel = "vmlinuz"
depends_on = ["a"]
''')
    assert "dependency cycle: a -> b -> c -> a" in found


def test_depends_on_a_group_means_every_copy(files: Path) -> None:
    stack = load(files, '''
[vm.db]
kernel = "vmlinuz"
count = 2
[vm.app]
kernel = "vmlinuz"
depends_on = { db = "ok", db-1 = "ready" }
''')
    app = stack.vm("app")
    assert app.depends_on == (("db-1", "ok"), ("db-2", "ok"), ("db-1", "ready"))


def test_xml_devices_checked_by_libvirts_schema(files: Path) -> None:
    good = load(files, '''
[vm.a]
kernel = "vmlinuz"
xml_devices = """<rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>"""
''')
    domain.validate(good)
    xml = domain.to_string(domain.build(good.vms[0], "tcg", Path("/c.sock")))
    assert "<rng model=\"virtio\">" in xml
    bad = load(files, '[vm.a]\nkernel = "vmlinuz"\n\nxml_devices = "<rng model=\'bogus\'/>"\n')
    with pytest.raises(ManifestError) as info:
        domain.validate(bad)
    (problem,) = info.value.problems
    assert str(problem).startswith(f"{files / 's.toml'}:4: vm.a.xml_devices: libvirt's domain "
                                   "schema rejects the XML")


def test_cli_check_reports_schema_errors_with_exit_2(files: Path) -> None:
    path = files / "s.toml"
    path.write_text('[vm.a]\nkernel = "vmlinuz"\nxml_devices = "<disk type=\'x\'/>"\n')
    proc = subprocess.run([sys.executable, "-m", "vmrun", "check", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "libvirt's domain schema rejects the XML" in proc.stderr
    assert "Traceback" not in proc.stderr


NETWORKED = '''
name = "lab"
[network.lan]
subnet = "10.77.0.0/24"
[network.back]
[vm.web]
kernel = "vmlinuz"
count = 3
networks = ["lan", "back"]
cmdline = "ip={net.lan.cidr} gw={net.lan.gateway} mac={net.back.mac} db={vm.db.net.lan.ip}"
[vm.db]
kernel = "vmlinuz"
networks = ["lan"]
forward = ["8080:80", "0.0.0.0:2222:22"]
'''


def test_networks_addresses_and_placeholders(files: Path) -> None:
    stack = load(files, NETWORKED)
    assert str(stack.networks["lan"].subnet) == "10.77.0.0/24"
    assert str(stack.networks["back"].subnet) == "10.77.1.0/24"  # a free default /24
    ips = [str(a.ip) for vm in stack.vms for a in vm.addresses if a.network == "lan"]
    macs = [a.mac for vm in stack.vms for a in vm.addresses]
    assert len(set(ips)) == len(ips) == 4 and len(set(macs)) == len(macs) == 7
    web2 = stack.vm("web-2")
    lan = web2.addresses[0]
    assert lan.network == "lan" and lan.prefix == 24 and lan.mac.startswith("52:54:00:")
    db_ip = stack.vm("db").addresses[0].ip
    assert web2.cmdline == (f"ip={lan.cidr} gw=10.77.0.1 mac={web2.addresses[1].mac} "
                            f"db={db_ip}")
    assert [str(f) for f in stack.vm("db").forward] == ["127.0.0.1:8080->80",
                                                        "0.0.0.0:2222->22"]
    # deterministic: the same names give the same addresses on every load
    assert load(files, NETWORKED).vm("web-2").addresses == web2.addresses


@pytest.mark.parametrize(("body", "fragment"), [
    ('[vm.a]\nkernel = "vmlinuz"\nnetworks = ["nope"]\n', 'unknown network "nope"'),
    ('[network.lan]\nsubnet = "10.0.0.0/30"\n[vm.a]\nkernel = "vmlinuz"\n', "/8 to /28"),
    ('[network.lan]\nsubnet = "300.1.2.0/24"\n[vm.a]\nkernel = "vmlinuz"\n', "IPv4 subnet"),
    ('[network.a]\nsubnet = "10.1.0.0/16"\n[network.b]\nsubnet = "10.1.2.0/24"\n'
     '[vm.a]\nkernel = "vmlinuz"\n', "overlaps the subnet of network a"),
    ('[network.Bad]\n[vm.a]\nkernel = "vmlinuz"\n', "invalid network name"),
    ('[network.lan]\nmtu = 9000\n[vm.a]\nkernel = "vmlinuz"\n', "unknown key"),
    ('[vm.a]\nkernel = "vmlinuz"\nforward = ["8080:80"]\n', "a forward needs a network"),
    ('[vm.a]\nkernel = "vmlinuz"\nforward = ["80"]\n', "HOSTPORT:GUESTPORT"),
    ('[vm.a]\nkernel = "vmlinuz"\nforward = ["8080:99999"]\n', "ports from 1 to 65535"),
    ('[network.lan]\n[vm.a]\nkernel = "vmlinuz"\nnetworks = ["lan"]\nforward = ["80:80"]\n'
     '[vm.b]\nkernel = "vmlinuz"\nnetworks = ["lan"]\nforward = ["80:81"]\n',
     "already forwarded to a"),
    ('[network.lan]\n[vm.a]\nkernel = "vmlinuz"\nnetworks = ["lan"]\nforward = ["80:80"]\n'
     'count = 2\n', "copies (count) cannot share a host port"),
    ('[vm.a]\nkernel = "vmlinuz"\ndisks = [{ size = "1G", image = "vmlinuz", readonly = true }]\n',
     "size for an overlay only"),
    ('[vm.a]\nkernel = "vmlinuz"\ndisks = [{ size = "0" }]\n', "1M to 64T"),
    ('[vm.a]\nkernel = "vmlinuz"\ndisks = [{ image = "vmlinuz", format = "qcow2" }]\n',
     "a qcow2 image"),
    ('[vm.a]\nkernel = "vmlinuz"\ncloud_init = { meta_data = "vmlinuz" }\n', "user_data"),
])
def test_network_disk_and_seed_errors(files: Path, body: str, fragment: str) -> None:
    found = problems(files, body)
    assert len(found) == 1, found
    assert found[0].startswith(f"{files / 's.toml'}:"), found
    assert fragment in found[0], found


def test_entry_errors_name_the_entry_and_suggest(files: Path) -> None:
    found = problems(files, '''[vm.a]
kernel = "vmlinuz"
disks = [{ size = "1G" }, { imgae = "x" }]
cloud_init = { userdata = "x" }
forward = ["80:80", "bad"]
''')
    assert len(found) == 3, found
    # entries are numbered from 0, like the disk files (disk-0.qcow2) and TOML arrays
    assert "s.toml:3: vm.a.disks: invalid value in disks[1]:" in found[0]
    assert 'found the unknown key "imgae"' in found[0] and 'did you mean "image"' in found[0]
    assert "s.toml:4: vm.a.cloud_init:" in found[1] and 'did you mean "user_data"' in found[1]
    assert "s.toml:5: vm.a.forward: invalid value in forward[1]:" in found[2]
    assert 'found the string "bad"' in found[2]
