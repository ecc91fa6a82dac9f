"""Outbound NAT (`nat = true | "no-host"`): manifest, seed and XML without a guest, and
real guests reaching (or not) a server on the host's loopback through passt.

The only traffic a guest sends here goes to the host's loopback, through the NAT NIC's
gateway address (10.0.2.2), to a server this test runs on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from lxml import etree

from conftest import cmdline, last_run, processes, vmrun, write_stack
from conftest import load_text as load
from conftest import problems_of_text as problems
from vmrun import nat, seed
from vmrun.errors import HostError
from vmrun.layout import StackPaths


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "vmlinuz").write_bytes(b"kernel")
    (tmp_path / "user.yaml").write_text("#cloud-config\n")
    return tmp_path


def test_nat_values_and_placeholders(files: Path) -> None:
    stack = load(files, '[vm.a]\nkernel = "vmlinuz"\nnat = true\n'
                        'cmdline = "ip={nat.cidr} gw={nat.gateway} dns={nat.dns} mac={nat.mac}"\n'
                        '[vm.b]\nkernel = "vmlinuz"\nnat = "no-host"\n[vm.c]\nkernel = "vmlinuz"\n')
    a, b, c = stack.vms
    assert (a.nat, b.nat, c.nat) == (True, "no-host", False)
    assert a.cmdline == f"ip=10.0.2.15/24 gw=10.0.2.2 dns=10.0.2.3 mac={nat.mac('s', 'a')}"
    assert nat.mac("s", "a") != nat.mac("s", "b") and nat.mac("s", "a").startswith("52:54:01:")


def test_bad_nat_value_and_placeholder_without_nat(files: Path) -> None:
    found = problems(files, '[vm.a]\nkernel = "vmlinuz"\nnat = "yes"\n'
                            '[vm.b]\nkernel = "vmlinuz"\ncmdline = "ip={nat.ip}"\n')
    assert any("s.toml:3: vm.a.nat" in f and '"no-host"' in f for f in found), found
    assert any("s.toml:6: vm.b.cmdline" in f and "placeholder" in f for f in found), found


def test_seed_gives_the_nat_nic_dhcp(files: Path) -> None:
    stack = load(files, '[network.lan]\n[vm.a]\nkernel = "vmlinuz"\nnat = true\n'
                        'networks = ["lan"]\ncloud_init = { user_data = "user.yaml" }\n')
    config = seed.contents(stack, stack.vms[0])["network-config"].decode()
    lan, nat_part = config.split("  nat:")
    assert "addresses: [10.77." in lan and "gateway" not in lan and "dhcp4" not in lan
    assert f'macaddress: "{nat.mac("s", "a")}"' in nat_part and "dhcp4: true" in nat_part


def test_render_and_passt_argv(files: Path) -> None:
    path = files / "s.toml"
    path.write_text('accel = "tcg"\n[vm.a]\nkernel = "vmlinuz"\nnat = "no-host"\n')
    proc = vmrun("render", str(path), timeout=30)
    assert proc.returncode == 0, proc.stderr
    args = [arg.get("value") for arg in etree.fromstring(proc.stdout).iter(
        "{http://libvirt.org/schemas/domain/qemu/1.0}arg")]
    assert args[0] == "-netdev" and "addr.type=unix,addr.path=" in args[1]
    assert args[2] == "-device" and json.loads(args[3])["bus"] == "pci.31"
    sock = Path("/r/nat/passt.sock")
    assert "--no-map-gw" in nat.passt_argv(sock, host_access=False)
    assert "--no-map-gw" not in nat.passt_argv(sock, host_access=True)


def test_missing_passt_is_a_host_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nat.shutil, "which", lambda name: None)
    nat.require(False)
    with pytest.raises(HostError, match="passt") as info:
        nat.require(True)
    assert info.value.exit_code == 3


@pytest.fixture
def receiver() -> Iterator[tuple[int, list[str]]]:
    """A TCP server on 127.0.0.1 that keeps the first line of each connection."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    received: list[str] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, peer = server.accept()
            except TimeoutError:
                continue
            conn.settimeout(5)
            with conn, conn.makefile("rb") as stream, contextlib.suppress(OSError):
                received.append(f"{stream.readline().decode().strip()} from {peer[0]}")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], received
    stop.set()
    thread.join(5)
    server.close()


@pytest.mark.timeout(150)
def test_nat_reaches_the_host_loopback_and_no_host_does_not(
        guest: Path, tmp_path: Path, receiver: tuple[int, list[str]]) -> None:
    """The guests send (rather than receive: the passt of Debian 12 can lose the data of
    a connection the host side closes at once) a line to the host's loopback."""
    port, received = receiver

    def send(vm: str, gateway: str = "{nat.gateway}") -> str:
        return f"guest.send={gateway}:{port}:hello-from-{vm}"

    manifest_path = write_stack(tmp_path, guest, {
        # with a private network: eth0 is the network's NIC, eth1 the NAT NIC
        "on": {"nat": True, "networks": ["lan"],
               "cmdline": cmdline(extra="guest.ip=eth0:{net.lan.cidr} "
                                        "guest.ip=eth1:{nat.cidr} guest.gw={nat.gateway} "
                                        + send("on")),
               "success": "guest: sent to"},
        "nohost": {"nat": "no-host",
                   "cmdline": cmdline(extra="guest.ip={nat.cidr} guest.gw={nat.gateway} "
                                            + send("nohost")),
                   "failure": "guest: sent to", "success": "send to .* failed"},
        "off": {"cmdline": cmdline(extra="guest.ip=10.0.2.15/24 guest.gw=10.0.2.2 "
                                         + send("off", "10.0.2.2")),
                "failure": "guest: sent to", "success": "send to .* failed"},
    }, network={"lan": {}})
    proc = vmrun("up", str(manifest_path), timeout=140)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"on     | guest: eth1 10.0.2.15/24 mac {nat.mac('t', 'on')}" in proc.stdout
    assert received == ["hello-from-on from 127.0.0.1"]
    vms = last_run(manifest_path)["vms"]
    assert {vm["outcome"] for vm in vms.values()} == {"ok"}, vms
    # passt is gone with the stack
    sockets = [os.fsencode(str(StackPaths(tmp_path / ".vmrun" / "t").vm(vm).nat_socket))
               for vm in ("on", "nohost")]
    assert not [pid for pid, cmd in processes()
                if b"passt" in cmd and any(sock in cmd for sock in sockets)]
