"""The stack's private networks at run time: one network namespace per stack.

Each stack with networks gets a network namespace of its own (`vmrun-<hash of its state
directory>`), holding one bridge per `[network.NAME]` (`vr-NAME`, with the subnet's `.1`)
and nothing else: no physical interface, no route out, no veth to the host.  The drivers
of the stack's VMs enter it before they open libvirt, so libvirt creates the VMs' taps
there.  Frames on a stack's network can therefore reach only that stack's VMs: not the
host's interfaces, not another stack (whose namespace is another one, even when the
network names and subnets are the same), not the outside.  The port forwarder is the one
way in.

Namespaces are created and removed with iproute2's `ip`, through subprocess: callers run
this before the supervisor installs its reaper, or after it has removed it.
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

from vmrun.errors import HostError
from vmrun.layout import netns_name
from vmrun.manifest import Stack

NETNS_DIR = Path("/run/netns")
IP = "ip"


def name_for(stack_dir: Path) -> str:
    return netns_name(stack_dir)


def path_for(stack_dir: Path) -> Path:
    return NETNS_DIR / name_for(stack_dir)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run([IP, *args], capture_output=True, text=True, timeout=30,
                              check=False)
    except FileNotFoundError:
        raise HostError("iproute2's `ip` is not installed",
                        hint="run `make setup` in the vmrun checkout") from None
    if check and proc.returncode != 0:
        raise HostError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def require_root(stack: Stack) -> None:
    if stack.networks and os.geteuid() != 0:
        raise HostError(
            f"stack {stack.name} has private networks, which need root (a network "
            "namespace with a bridge per network)",
            hint="run vmrun as root, or remove the [network.*] tables and networks keys")


def setup(stack: Stack) -> Path | None:
    """Create the stack's namespace and bridges anew; None when it has no networks."""
    if not stack.networks:
        return None
    require_root(stack)
    teardown(stack.state_dir)
    name = name_for(stack.state_dir)
    _ip("netns", "add", name)
    _ip("-n", name, "link", "set", "lo", "up")
    for net in stack.networks.values():
        _ip("-n", name, "link", "add", net.bridge, "type", "bridge")
        _ip("-n", name, "addr", "add", f"{net.gateway}/{net.subnet.prefixlen}",
            "dev", net.bridge)
        _ip("-n", name, "link", "set", net.bridge, "up")
    return path_for(stack.state_dir)


def teardown(stack_dir: Path) -> bool:
    """Remove the stack's namespace (and with it its bridges); True if there was one."""
    if not path_for(stack_dir).exists():
        return False
    _ip("netns", "del", name_for(stack_dir), check=False)
    return True


def bind_forwards(stack: Stack) -> list[socket.socket]:
    """Listening sockets for every forward, bound now: a port in use is exit 3."""
    listeners: list[socket.socket] = []
    for vm in stack.vms:
        for fwd in vm.forward:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((fwd.host_address, fwd.host_port))
                sock.listen(64)
            except OSError as exc:
                sock.close()
                for other in listeners:
                    other.close()
                raise HostError(
                    f"VM {vm.name}: cannot forward {fwd.host_address}:{fwd.host_port}: "
                    f"{exc.strerror}",
                    hint="choose another host port, or stop what uses it") from None
            listeners.append(sock)
    return listeners
