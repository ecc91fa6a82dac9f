"""Private networks of a stack: subnets, deterministic addresses and MACs, port forwards.

Pure functions, used by the manifest parser (addresses appear in `cmdline` placeholders,
cloud-init network-config, `vmrun ps` and last-run.json) and by the runtime (netns.py).
Each VM gets, per network, an IPv4 address and a MAC derived from the stack's, the VM's
and the network's names, so they stay the same from run to run; collisions within the
stack are resolved in a fixed order.  `.1` of each subnet is the stack's own address on
that network (the port forwarder connects from there).
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass

from vmrun.layout import bridge_name

DEFAULT_SUBNET_BASE = ipaddress.IPv4Network("10.77.0.0/16")
FIRST_HOST = 10  # .1-.9 are kept for the stack itself
_FORWARD_RE = re.compile(r"(?:(\d{1,3}(?:\.\d{1,3}){3}):)?(\d{1,5}):(\d{1,5})\Z")


@dataclass(frozen=True)
class Network:
    name: str
    subnet: ipaddress.IPv4Network

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return self.subnet.network_address + 1

    @property
    def bridge(self) -> str:
        return bridge_name(self.name)


@dataclass(frozen=True)
class Address:
    network: str
    ip: ipaddress.IPv4Address
    prefix: int
    mac: str

    @property
    def cidr(self) -> str:
        return f"{self.ip}/{self.prefix}"


@dataclass(frozen=True)
class Forward:
    host_address: str
    host_port: int
    guest_port: int

    def __str__(self) -> str:
        return f"{self.host_address}:{self.host_port}->{self.guest_port}"


def parse_forward(text: str) -> Forward:
    """"8080:80" or "127.0.0.1:2222:22"; raises ValueError with what is expected."""
    match = _FORWARD_RE.match(text)
    if not match:
        raise ValueError('"HOSTPORT:GUESTPORT" or "ADDRESS:HOSTPORT:GUESTPORT"')
    address = match.group(1) or "127.0.0.1"
    try:
        ipaddress.IPv4Address(address)
    except ValueError:
        raise ValueError(f"an IPv4 address (not {address})") from None
    host_port, guest_port = int(match.group(2)), int(match.group(3))
    if not (1 <= host_port <= 65535 and 1 <= guest_port <= 65535):
        raise ValueError("ports from 1 to 65535")
    return Forward(address, host_port, guest_port)


def parse_subnet(text: str) -> ipaddress.IPv4Network:
    """An IPv4 subnet with room for guests (prefix 8 to 28); raises ValueError."""
    try:
        subnet = ipaddress.IPv4Network(text, strict=True)
    except ValueError as exc:
        raise ValueError(f"an IPv4 subnet like 10.77.0.0/24 ({exc})") from None
    if not 8 <= subnet.prefixlen <= 28:
        raise ValueError("a prefix length from /8 to /28")
    return subnet


def default_subnets(count: int, taken: set[ipaddress.IPv4Network]) -> list[ipaddress.IPv4Network]:
    """`count` /24 subnets of 10.77.0.0/16 that overlap none of `taken`."""
    found: list[ipaddress.IPv4Network] = []
    for candidate in DEFAULT_SUBNET_BASE.subnets(new_prefix=24):
        if len(found) == count:
            break
        if not any(candidate.overlaps(t) for t in taken):
            found.append(candidate)
            taken.add(candidate)
    return found


def _digest(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("/".join(parts).encode()).digest()[:8], "big")


def assign(stack: str, networks: dict[str, Network],
           members: dict[str, list[str]]) -> dict[tuple[str, str], Address]:
    """Addresses by (vm, network) for `members` (network name -> VM names).

    Raises ValueError when a subnet has no room for its VMs.
    """
    result: dict[tuple[str, str], Address] = {}
    macs: set[str] = set()
    for net_name in sorted(members):
        net = networks[net_name]
        hosts = net.subnet.num_addresses - FIRST_HOST - 1
        vms = sorted(members[net_name])
        if len(vms) > hosts:
            raise ValueError(f"network {net_name} ({net.subnet}) has room for {hosts} VMs")
        used: set[int] = set()
        for vm in vms:
            offset = _digest(stack, net_name, vm) % hosts
            while offset in used:
                offset = (offset + 1) % hosts
            used.add(offset)
            ip = net.subnet.network_address + FIRST_HOST + offset
            attempt = 0
            while True:
                value = _digest(stack, net_name, vm, "mac", str(attempt)) & 0xFFFFFF
                mac = "52:54:00:" + ":".join(f"{(value >> s) & 0xFF:02x}" for s in (16, 8, 0))
                if mac not in macs:
                    break
                attempt += 1
            macs.add(mac)
            result[(vm, net_name)] = Address(net_name, ip, net.subnet.prefixlen, mac)
    return result


