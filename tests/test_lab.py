"""Lab features on real guests: disks and overlays, cloud-init seeds, private networks,
isolation between stacks, port forwards.

Tests that use networks run `vmrun` inside a network namespace the test creates
(`ip netns add`), and reach forwarded ports on that namespace's loopback only.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import Up, cmdline, in_netns, last_run, stack_qemus, vmrun, wait_until, write_stack
from vmrun import netns
from vmrun.manifest import load as load_manifest


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_base_images(directory: Path, text: str) -> tuple[Path, Path]:
    """A raw and a qcow2 image whose first line is `text`."""
    raw = directory / "base.raw"
    with open(raw, "wb") as f:
        f.write(f"{text}\n".encode())
        f.truncate(16 * 1024 * 1024)
    image = directory / "base.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(image)],
                   check=True, timeout=60)
    return raw, image


@pytest.mark.timeout(300)
def test_disks_overlay_blank_readonly_and_fresh(guest: Path, tmp_path: Path) -> None:
    raw, base = make_base_images(tmp_path, "vmrun-test pristine base")
    before, raw_before = sha256(base), sha256(raw)
    write = cmdline(extra="guest.disk=write:from-the-guest")
    vms = {
        "box": {"cmdline": write, "disks": [{"image": str(base)}, {"size": "8M"}]},
        "rawbox": {"cmdline": write, "disks": [{"image": str(raw)}]},
        "temp": {"cmdline": write, "disks": [{"image": str(base)}], "ephemeral": True},
        "ro": {"cmdline": cmdline(extra="guest.disk=read"),
               "disks": [{"image": str(base), "readonly": True}]},
    }
    manifest = write_stack(tmp_path, guest, vms)
    up = Up(manifest)
    assert up.wait(200) == 0, up.stderr
    assert "box | guest: wrote disk" in up.output
    assert "box | guest: disks: vda vdb" in up.output
    assert "ro | guest: disk says: vmrun-test pristine base" in up.output
    # the guests wrote to their overlays, never to the images
    assert sha256(base) == before and sha256(raw) == raw_before

    # overlays survive: the next run reads what the guest wrote, except an ephemeral VM's
    for vm in ("box", "rawbox", "temp"):
        vms[vm]["cmdline"] = cmdline(extra="guest.disk=read")
    del vms["ro"]
    write_stack(tmp_path, guest, vms)
    again = Up(manifest)
    assert again.wait(200) == 0, again.stderr
    assert "box | guest: disk says: vmrun-test from-the-guest" in again.output
    assert "rawbox | guest: disk says: vmrun-test from-the-guest" in again.output
    assert "temp | guest: disk says: vmrun-test pristine base" in again.output
    del vms["rawbox"], vms["temp"]
    write_stack(tmp_path, guest, vms)

    # --fresh starts it anew from the pristine image
    fresh = Up(manifest, "--fresh")
    assert fresh.wait(200) == 0, fresh.stderr
    assert "box | guest: disk says: vmrun-test pristine base" in fresh.output
    assert sha256(base) == before


@pytest.mark.timeout(120)
def test_disk_errors_before_anything_starts(guest: Path, tmp_path: Path) -> None:
    (tmp_path / "disk.vmdk").write_bytes(b"KDMV" + bytes(508))
    for disk, status, message in (
        ({"image": "missing.qcow2"}, 2, "existing file"),
        ({"image": str(tmp_path / "disk.vmdk")}, 2, "is vmdk"),
        ({"size": "60T"}, 3, "larger than the free space"),
    ):
        manifest = write_stack(tmp_path, guest, {"box": {"disks": [disk]}})
        proc = vmrun("up", str(manifest))
        assert proc.returncode == status, proc.stderr
        assert message in proc.stderr and "Traceback" not in proc.stderr
        assert not list((tmp_path / ".vmrun").glob("t/vms/*/root/run/qemu/*.pid"))


@pytest.mark.timeout(200)
def test_cloud_init_seed(guest: Path, tmp_path: Path) -> None:
    (tmp_path / "user-data.yaml").write_text("#cloud-config\nmessage: hello from the seed\n")
    manifest = write_stack(tmp_path, guest, {
        "cloudy": {"cmdline": cmdline(extra="guest.seed=1"),
                   "cloud_init": {"user_data": "user-data.yaml"},
                   "success": "seed: message: hello from the seed"},
    })
    up = Up(manifest)
    assert up.wait(150) == 0, up.stderr
    assert "cloudy | meta: instance-id: t-cloudy" in up.output
    assert "cloudy | meta: local-hostname: cloudy" in up.output


def read_forward(netns: str, port: int) -> str:
    """Connect to 127.0.0.1:port inside the test's namespace and read one line."""
    code = (f"import socket; s = socket.create_connection(('127.0.0.1', {port}), timeout=20); "
            "s.settimeout(20); print(s.makefile().readline().strip())")
    proc = subprocess.run([*in_netns(netns), sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def host_links() -> list[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True)
    return sorted(line.split(":")[1].strip() for line in out.stdout.splitlines())


@pytest.mark.timeout(400)
def test_private_network_isolation_and_forward(guest: Path, tmp_path: Path,
                                               test_netns: str) -> None:
    links_before = host_links()
    lab = tmp_path / "lab"
    other = tmp_path / "other"
    lab.mkdir()
    other.mkdir()
    net = {"network": ("lan", "10.77.0.0/24")}
    serve = "guest.ip={net.lan.cidr} guest.serve=8080:hello-from-server"
    manifest = write_network_stack(lab, guest, "lab", net, {
        "server": {"cmdline": cmdline(action="hang", extra=serve), "ready": "serving 8080",
                   "forward": ["18080:8080"]},
        "client": {"cmdline": cmdline(sleep=1, extra="guest.ip={net.lan.cidr} "
                                      "guest.fetch=SERVER:8080"),
                   "depends_on": ["server"], "success": "fetched: hello-from-server"},
    })
    server_ip = addresses_of(manifest, "server")
    text = manifest.read_text().replace("SERVER", server_ip)
    manifest.write_text(text)
    try:
        up = vmrun("up", "--detach", "--wait", str(manifest), netns=test_netns)
        assert up.returncode == 0, up.stderr
        # the two guests on one network exchanged a message
        wait_for_outcome(manifest, "lab", "client", test_netns)
        assert last_run_or_ps(manifest, "lab", test_netns)["client"] == "ok"
        # the host reaches the server through the forward (on the namespace's loopback)
        assert read_forward(test_netns, 18080) == "hello-from-server"
        # nothing of the stack's network appeared among the host's interfaces
        assert host_links() == links_before

        # a second stack, with the same network name and subnet, cannot reach the server
        intruder = write_network_stack(other, guest, "other", net, {
            "intruder": {"cmdline": cmdline(extra=f"guest.ip=10.77.0.200/24 "
                                            f"guest.fetch={server_ip}:8080"),
                         "success": f"fetch from {server_ip}:8080 failed",
                         "failure": "fetched: hello"},
        })
        proc = vmrun("up", str(intruder), netns=test_netns, timeout=200)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        # a port already in use is exit 3, before anything starts
        clash = write_network_stack(tmp_path, guest, "clash", net, {
            "x": {"cmdline": cmdline(extra="guest.ip={net.lan.cidr}"), "forward": ["18080:80"]},
        })
        proc = vmrun("up", str(clash), netns=test_netns)
        assert proc.returncode == 3 and "18080" in proc.stderr, proc.stderr
    finally:
        down = vmrun("down", "--timeout", "2", str(manifest), netns=test_netns)
    assert down.returncode == 0, down.stderr
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                timeout=30).stdout
    assert "vmrun-" not in namespaces.replace(test_netns, "")  # all torn down
    vms = last_run(manifest, "lab")["vms"]
    assert vms["server"]["addresses"]["lan"]["ip"] == server_ip
    assert vms["server"]["forwards"] == ["127.0.0.1:18080->8080"]


def write_network_stack(directory: Path, guest: Path, name: str,
                        net: dict[str, tuple[str, str]], vms: dict[str, dict[str, object]]
                        ) -> Path:
    for settings in vms.values():
        settings.setdefault("networks", [net["network"][0]])
    path = write_stack(directory, guest, vms, name=name)
    net_name, subnet = net["network"]
    path.write_text(path.read_text() + f'\n[network.{net_name}]\nsubnet = "{subnet}"\n')
    return path


def addresses_of(manifest: Path, vm: str) -> str:
    return str(load_manifest(manifest).vm(vm).addresses[0].ip)


def last_run_or_ps(manifest: Path, name: str, netns: str) -> dict[str, str]:
    proc = vmrun("ps", "--json", str(manifest), netns=netns)
    data = json.loads(proc.stdout)
    if data["running"]:
        return {vm: v["outcome"] for vm, v in data["vms"].items()}
    return {vm: v["outcome"] for vm, v in data["last_run"]["vms"].items()}


def wait_for_outcome(manifest: Path, name: str, vm: str, netns: str) -> None:
    deadline = time.monotonic() + 120
    while last_run_or_ps(manifest, name, netns).get(vm) is None:
        assert time.monotonic() < deadline, f"{vm} did not finish"
        time.sleep(0.5)



def netns_names() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                          timeout=30).stdout


@pytest.mark.timeout(300)
def test_network_left_by_a_killed_run_is_removed(guest: Path, tmp_path: Path,
                                                 test_netns: str) -> None:
    hang = cmdline(action="hang", extra="guest.ip={net.lan.cidr}")
    manifest = write_network_stack(tmp_path, guest, "killed",
                                   {"network": ("lan", "10.77.0.0/24")},
                                   {"one": {"cmdline": hang}})
    stack_ns = netns.name_for(load_manifest(manifest).state_dir)

    def up_and_kill() -> None:
        up = vmrun("up", "--detach", str(manifest), netns=test_netns)
        assert up.returncode == 0, up.stderr
        assert stack_ns in netns_names()
        pid = json.loads(vmrun("ps", "--json", str(manifest), netns=test_netns).stdout)["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not stack_qemus(manifest, ["one"], name="killed"), timeout=5)

    up_and_kill()
    assert stack_ns in netns_names()  # left behind by the killed run ...
    up_and_kill()  # ... and removed by the next `up`, which starts cleanly
    assert stack_ns in netns_names()
    down = vmrun("down", str(manifest), netns=test_netns)  # not running: cleans up
    assert down.returncode == 0, down.stderr
    assert stack_ns not in netns_names()


@pytest.mark.timeout(200)
def test_many_nics_starting_at_once(guest: Path, tmp_path: Path, test_netns: str) -> None:
    """Three VMs with two NICs each start together in one namespace: no tap name clash."""
    vms = {name: {"cmdline": cmdline(extra="guest.ip={net.lan.cidr}"),
                  "networks": ["lan", "back"]} for name in ("a", "b", "c")}
    manifest = write_network_stack(tmp_path, guest, "nics", {"network": ("lan", "10.77.0.0/24")},
                                   vms)
    manifest.write_text(manifest.read_text() + "\n[network.back]\n")
    proc = vmrun("up", str(manifest), netns=test_netns)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in vms:
        assert f"{name} | guest: eth0 " in proc.stdout.replace("  |", " |")
