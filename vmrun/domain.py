"""Build the libvirt domain XML for one VM (with lxml, never by string formatting)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lxml import etree

from vmrun import nat, shares
from vmrun.disks import Attachment
from vmrun.errors import ManifestError, Problem
from vmrun.firmware import Uefi
from vmrun.layout import VMPaths, bridge_name, tap_name
from vmrun.manifest import VM, Stack

MACHINE = "q35"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
ARCH = "x86_64"


def _sub(parent: etree._Element, tag: str, text: str | None = None, **attrs: str) -> etree._Element:
    element = etree.SubElement(parent, tag, attrs)
    if text is not None:
        element.text = text
    return element


def build(vm: VM, accel: str, console_socket: Path, disks: Sequence[Attachment] = (),
          uefi: Uefi | None = None, nvram: Path | None = None,
          nat_link: nat.Link | None = None, mounts: Sequence[shares.Mount] = (),
          virtiofsd: Path = shares.VIRTIOFSD) -> etree._Element:
    """The <domain> element for `vm`, accelerated by "kvm" or "tcg", with its disk files
    (for boot = "uefi", the firmware and the VM's variables file; with nat, passt's link;
    with shares, their mount points in the root (`shares.plan`) and virtiofsd)."""
    domain = etree.Element("domain", type="kvm" if accel == "kvm" else "qemu",
                           nsmap={"qemu": QEMU_NS} if nat_link else None)
    _sub(domain, "name", vm.name)
    _sub(domain, "memory", str(vm.memory * 1024), unit="KiB")
    if mounts:  # virtiofsd maps the guest's memory: it must be shared
        backing = _sub(domain, "memoryBacking")
        _sub(backing, "source", type="memfd")
        _sub(backing, "access", mode="shared")
    _sub(domain, "vcpu", str(vm.cpus))

    os_ = _sub(domain, "os")
    _sub(os_, "type", "hvm", arch=ARCH, machine=MACHINE)
    if vm.boot == "kernel":
        assert vm.kernel is not None
        _sub(os_, "kernel", str(vm.kernel))
        if vm.initrd is not None:
            _sub(os_, "initrd", str(vm.initrd))
        _sub(os_, "cmdline", vm.cmdline)
    elif vm.boot == "uefi":
        if uefi is None or nvram is None:
            raise ValueError("boot = uefi needs the firmware and a variables file")
        _sub(os_, "loader", str(uefi.code), readonly="yes", type="pflash",
             secure="yes" if uefi.secure else "no")
        _sub(os_, "nvram", str(nvram), template=str(uefi.template))
    # boot = "bios": libvirt gives QEMU SeaBIOS; the boot disk has <boot order='1'/>.

    features = _sub(domain, "features")
    _sub(features, "acpi")  # an in-guest poweroff ends the domain only with ACPI
    if uefi is not None and uefi.secure:
        _sub(features, "smm", state="on")  # Secure Boot firmware needs SMM
    if accel == "kvm":
        _sub(domain, "cpu", mode="host-passthrough")
    _sub(domain, "clock", offset="utc")
    _sub(domain, "on_poweroff", "destroy")
    _sub(domain, "on_reboot", "restart" if vm.on_reboot == "restart" else "destroy")
    _sub(domain, "on_crash", "destroy")

    devices = _sub(domain, "devices")
    virtio = scsi = 0
    for disk in disks:
        if disk.media == "cdrom":  # on virtio-scsi: Debian's cloud kernel has no AHCI
            element = _sub(devices, "disk", type="file", device="cdrom")
            target = f"sd{chr(ord('a') + scsi)}"
            scsi += 1
        else:
            element = _sub(devices, "disk", type="file", device="disk")
            target = f"vd{chr(ord('a') + virtio)}"
            virtio += 1
        _sub(element, "driver", name="qemu", type=disk.format)
        _sub(element, "source", file=str(disk.path))
        _sub(element, "target", dev=target, bus="scsi" if disk.media == "cdrom" else "virtio")
        if disk.readonly:
            _sub(element, "readonly")
        if disk.boot and vm.boot != "kernel":
            _sub(element, "boot", order="1")
    if scsi:
        _sub(devices, "controller", type="scsi", index="0", model="virtio-scsi")
    if nat_link is not None:  # the NAT NIC's root port (see nat.PORT_INDEX)
        port = _sub(devices, "controller", type="pci", index=str(nat.PORT_INDEX),
                    model="pcie-root-port")
        _sub(port, "address", type="pci", domain="0x0000", bus="0x00",
             slot=f"0x{nat.PORT_SLOT:02x}", function="0x0")
    for mount in mounts:  # libvirt starts a virtiofsd on each (vmrun/shares.py)
        fs = _sub(devices, "filesystem", type="mount", accessmode="passthrough")
        _sub(fs, "driver", type="virtiofs")
        _sub(fs, "binary", path=str(virtiofsd))
        _sub(fs, "source", dir=str(mount.dir))  # the driver's bind mount of mount.host
        _sub(fs, "target", dir=mount.tag)
    for address in vm.addresses:
        nic = _sub(devices, "interface", type="bridge")
        _sub(nic, "source", bridge=bridge_name(address.network))  # in the stack's netns
        _sub(nic, "mac", address=address.mac)
        _sub(nic, "target", dev=tap_name(address.mac))
        _sub(nic, "model", type="virtio")
        _sub(nic, "rom", enabled="no")  # no iPXE: vmrun boots kernels and disks, not PXE
    # The serial console is a UNIX socket QEMU listens on; the driver reads it.
    serial = _sub(devices, "serial", type="unix")
    _sub(serial, "source", mode="bind", path=str(console_socket))
    _sub(serial, "target", port="0")
    console = _sub(devices, "console", type="unix")
    _sub(console, "source", mode="bind", path=str(console_socket))
    _sub(console, "target", type="serial", port="0")
    _sub(devices, "memballoon", model="none")
    # pvpanic: a guest kernel with the driver reports a panic to libvirt directly.
    _sub(devices, "panic", model="isa")
    if vm.xml_devices:
        devices.extend(etree.fromstring(f"<devices>{vm.xml_devices}</devices>"))
    if not devices.xpath("controller[@type='usb']"):
        # Without this libvirt adds a USB xHCI controller on a PCIe root port, and a
        # spare root port: nothing here uses USB, and they cost the guest 0.2 s of boot
        # under TCG (docs/performance.md).  A USB controller in xml_devices wins.
        usb = etree.Element("controller", type="usb", model="none")
        devices.insert(devices.index(serial), usb)
    if nat_link is not None:
        # libvirt 9.0 has no interface type for a passt that runs outside the driver's
        # network namespace (vmrun/nat.py says why it must): the NIC is given to QEMU
        # directly.
        commandline = etree.SubElement(domain, f"{{{QEMU_NS}}}commandline")
        for arg in nat_link.qemu_args():
            etree.SubElement(commandline, f"{{{QEMU_NS}}}arg", value=arg)
    return domain


SCHEMA = Path("/usr/share/libvirt/schemas/domain.rng")


def validate(stack: Stack) -> None:
    """Check the XML of every VM with `xml_devices` against libvirt's domain schema."""
    if not any(vm.xml_devices for vm in stack.vms) or not SCHEMA.exists():
        return
    schema = etree.RelaxNG(etree.parse(str(SCHEMA)))
    problems = []
    for vm in stack.vms:
        uefi = Uefi(Path("/code.fd"), Path("/vars.fd"), vm.secure_boot)
        mounts = shares.plan(vm, VMPaths(vm.name, Path("/vm"), Path("/root"), Path("/root")))
        xml = build(vm, "tcg", Path("/console.sock"), uefi=uefi, nvram=Path("/nvram.fd"),
                    mounts=mounts)
        if vm.xml_devices and not schema.validate(xml):
            error = schema.error_log.last_error
            message = error.message if error is not None else "invalid"
            problems.append(Problem(
                "libvirt's domain schema rejects the XML", file=stack.path,
                line=stack.line_of("vm", vm.group, "xml_devices"),
                key=f"vm.{vm.group}.xml_devices", found=message,
                hint=f"see the whole XML with: vmrun render {stack.path} {vm.name}"))
    if problems:
        raise ManifestError(problems)


def to_string(domain: etree._Element) -> str:
    return etree.tostring(domain, pretty_print=True, encoding="unicode")
