"""cloud-init NoCloud seeds: an ISO 9660 image labelled `cidata` with the VM's
user-data, meta-data and (optionally) network-config, written with pycdlib.

The seed is made anew on each run in the VM's state directory and attached read-only as a
virtio disk (a SATA CD-ROM would be invisible to kernels without AHCI, such as Debian's
cloud kernel).
"""

from __future__ import annotations

import io
from pathlib import Path

from vmrun import access, names, nat, shares, userdata
from vmrun.manifest import VM, Stack
from vmrun.stackcheck import fill_known_placeholders, other_vms_values, placeholder_values

VOLUME_LABEL = "cidata"


def default_meta_data(stack: Stack, vm: VM) -> bytes:
    return f"instance-id: {stack.name}-{vm.name}\nlocal-hostname: {vm.name}\n".encode()


def contents(stack: Stack, vm: VM, ssh_key: str | None = None) -> dict[str, bytes]:
    """The seed's files, by name."""
    assert vm.cloud_init is not None
    files = {"user-data": userdata.compose(user_data(stack, vm), vmrun_parts(stack, vm, ssh_key))}
    if vm.cloud_init.meta_data is not None:
        files["meta-data"] = vm.cloud_init.meta_data.read_bytes()
    else:
        files["meta-data"] = default_meta_data(stack, vm)
    if vm.cloud_init.network_config is not None:
        files["network-config"] = vm.cloud_init.network_config.read_bytes()
    elif vm.addresses or vm.nat:
        files["network-config"] = default_network_config(stack, vm)
    return files


def vmrun_parts(stack: Stack, vm: VM, ssh_key: str | None) -> list[userdata.Part]:
    """What vmrun adds to the user's user-data (vmrun/userdata.py): the mounts of the
    shared folders, the stack's SSH key, the names of the VMs on the same networks."""
    parts = []
    mounts = shares.cloud_config(vm)
    if mounts is not None:
        parts.append(userdata.Part("text/cloud-config", "vmrun-shares.cfg", mounts,
                                   userdata.APPEND))
    if ssh_key is not None:
        parts.append(userdata.Part("text/cloud-config", "vmrun-ssh-key.cfg",
                                   access.key_config(ssh_key).encode(), userdata.APPEND))
    hosts = names.hosts_boothook(stack, vm)
    if hosts is not None:
        parts.append(userdata.Part("text/cloud-boothook", "vmrun-hosts.sh", hosts))
    return parts


def user_data(stack: Stack, vm: VM) -> bytes:
    """The user's user-data with the manifest's placeholders filled in: {vm.name},
    {index}, {net.NAME.ip}, {vm.OTHER.net.NAME.ip}, {nat.ip}... (only those: other braces
    are the YAML's, JSON's or Jinja's own).  Not UTF-8: given as it is."""
    assert vm.cloud_init is not None
    raw = vm.cloud_init.user_data.read_bytes()
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        return raw
    values = placeholder_values(vm, stack.name, stack.networks) | other_vms_values(stack.vms)
    return fill_known_placeholders(text, values).encode()


def default_network_config(stack: Stack, vm: VM) -> bytes:
    """cloud-init network config (version 2): each private NIC, matched by MAC, gets its
    address (no gateway); the NAT NIC, if any, DHCP: the default route and DNS."""
    lines = ["version: 2", "ethernets:"]
    for address in vm.addresses:
        lines += [f"  {address.network}:",
                  "    match:",
                  f'      macaddress: "{address.mac}"',
                  f"    set-name: {address.network}",
                  f"    addresses: [{address.cidr}]"]
    if vm.nat:
        lines += ["  nat:",
                  "    match:",
                  f'      macaddress: "{nat.mac(stack.name, vm.name)}"',
                  "    set-name: nat",
                  "    dhcp4: true"]
    return ("\n".join(lines) + "\n").encode()


def write(path: Path, files: dict[str, bytes]) -> None:
    """Write an ISO 9660 image (Joliet and Rock Ridge names) labelled cidata."""
    import pycdlib

    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident=VOLUME_LABEL)
    for number, (name, data) in enumerate(sorted(files.items())):
        # Plain ISO 9660 names are short and upper-case: Rock Ridge and Joliet carry
        # the real ones, which is what guests see.
        iso_name = f"/F{number}.;1"
        iso.add_fp(io.BytesIO(data), len(data), iso_name, rr_name=name, joliet_path=f"/{name}")
    tmp = path.with_name(path.name + ".new")
    iso.write(str(tmp))
    iso.close()
    tmp.replace(path)
