"""Names between VMs: /etc/hosts entries for the VMs of a stack, given to guests that
have a cloud-init seed, so that `curl http://db/` works in a lab.

Each guest learns every VM of its stack (itself included) that shares a private network
with it: `ADDRESS NAME.NETWORK`, and `NAME` alone for the first network they share (the
order of the guest's own `networks`).  The lines are written by a boothook (a script
cloud-init runs early on every boot, whatever the user's cloud-config says), each marked,
so that a later boot replaces them rather than adding more.  VM and network names are
checked by the manifest parser (lower-case letters, digits, '-'), the addresses are
vmrun's own: nothing of the user's reaches the script.
"""

from __future__ import annotations

from vmrun.manifest import VM, Stack

MARK = "# vmrun"


def hosts_entries(stack: Stack, vm: VM) -> list[tuple[str, list[str]]]:
    """(address, names) for each VM sharing a network with `vm`, in a stable order."""
    entries: list[tuple[str, list[str]]] = []
    named: set[str] = set()
    for network in vm.networks:
        for other in stack.vms:
            for address in other.addresses:
                if address.network != network:
                    continue
                names = [f"{other.name}.{network}"]
                if other.name not in named:
                    names.insert(0, other.name)
                    named.add(other.name)
                entries.append((str(address.ip), names))
    return entries


def hosts_boothook(stack: Stack, vm: VM) -> bytes | None:
    """A cloud-boothook that puts `hosts_entries` into /etc/hosts; None without any."""
    entries = hosts_entries(stack, vm)
    if not entries:
        return None
    lines = [f"{ip} {' '.join(names)} {MARK}" for ip, names in entries]
    script = ["#cloud-boothook", "#!/bin/sh",
              f"# vmrun: the VMs of stack {stack.name} on {vm.name}'s networks",
              f"sed -i '/ {MARK}$/d' /etc/hosts",
              "cat >>/etc/hosts <<'VMRUN_HOSTS'", *lines, "VMRUN_HOSTS", ""]
    return "\n".join(script).encode()
