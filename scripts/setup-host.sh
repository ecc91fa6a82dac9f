#!/bin/bash
# Install what vmrun needs on a Debian 12 host, as root. Idempotent: packages
# already installed and accounts that already exist are left alone.
set -euo pipefail

packages=(
    libvirt-daemon libvirt-daemon-driver-qemu   # the embedded QEMU driver
    qemu-system-x86 qemu-utils                  # QEMU itself and qemu-img
    libvirt-dev pkg-config gcc                  # to build libvirt-python
    python3 python3-venv python3-dev            # the venv and the Cython extension
    cpio gzip xz-utils                          # to build the test guest
    iproute2                                    # private networks (ip netns)
    passt                                       # outbound NAT (nat = true)
    openssh-client                              # vmrun ssh, exec, cp (the stack's key)
    ovmf                                        # UEFI firmware (boot = "uefi")
    fdisk mtools dosfstools e2fsprogs           # to build the bootable test disks
    syslinux syslinux-common grub-efi-amd64-bin #   (BIOS and UEFI boot loaders)
    debootstrap                                 # the Debian test guest
)

missing=()
for pkg in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done

if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "setup: missing packages: ${missing[*]} (run as root to install them)" >&2
        exit 1
    fi
    echo "setup: installing ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# libvirt's embedded driver looks these up even when running as root.
if ! getent group libvirt-qemu >/dev/null; then
    groupadd --system libvirt-qemu
fi
if ! getent passwd libvirt-qemu >/dev/null; then
    useradd --system --gid libvirt-qemu --no-create-home --home-dir /var/lib/libvirt \
        --shell /usr/sbin/nologin libvirt-qemu
fi
