#!/bin/bash
# Build two bootable raw disk images of the vmrun test guest, for the firmware
# boot tests:
#
#   bash tests/guest/build-disks.sh [OUTDIR]   (OUTDIR defaults to <repo>/build/guest)
#
#   OUTDIR/bios.img  MBR, one bootable FAT partition: SYSLINUX, vmlinuz, initrd.gz
#                    (boots under SeaBIOS)
#   OUTDIR/uefi.img  GPT, one EFI system partition (FAT): a standalone GRUB as
#                    EFI/BOOT/BOOTX64.EFI, vmlinuz, initrd.gz (boots under OVMF)
#
# Both boot at once (no menu, no timeout) with
#   console=ttyS0 quiet no_timer_check guest.say="firmware: bios|uefi" guest.action=poweroff
# so the guest prints "firmware: bios" (or "firmware: uefi") and powers off.
#
# OUTDIR must already hold vmlinuz and initrd.gz (tests/guest/build.sh). No loop
# device, no mount: each FAT file system is made in a file of its own (mkfs.vfat,
# mtools, syslinux --install), then copied into the disk file at the partition's
# offset; sfdisk writes the partition table into the disk file. Does nothing
# when both images are newer than this script, vmlinuz and initrd.gz. Set
# GUEST_FORCE=1 to rebuild anyway.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=${1:-$repo/build/guest}
self=$here/build-disks.sh
vmlinuz=$out/vmlinuz
initrd=$out/initrd.gz
mbr_bin=/usr/lib/syslinux/mbr/mbr.bin
grub_dir=/usr/lib/grub/x86_64-efi
# Kernel command line, without the firmware's name.
cmdline_head='console=ttyS0 quiet no_timer_check'
cmdline_tail='guest.action=poweroff'
# FAT volume labels (at most 11 characters); GRUB finds its partition by label.
bios_label=VMRUN-BIOS
uefi_label=VMRUN-UEFI
# The partition starts at 1 MiB; the last MiB stays free (GPT's backup header).
part_start=2048 # sectors of 512 bytes
min_disk_mib=32

log() { echo "guest-disks: $*" >&2; }
die() { log "error: $*"; exit 1; }

up_to_date() { # image
    [[ -f $1 && $1 -nt $self && $1 -nt $vmlinuz && $1 -nt $initrd ]]
}

[[ -f $vmlinuz && -f $initrd ]] ||
    die "$out has no vmlinuz and initrd.gz (run: bash tests/guest/build.sh $out)"

if [[ ${GUEST_FORCE:-0} != 1 ]] && up_to_date "$out/bios.img" && up_to_date "$out/uefi.img"; then
    log "$out/bios.img and $out/uefi.img are up to date"
    exit 0
fi

for tool in sfdisk mkfs.vfat mcopy mmd syslinux grub-mkstandalone dd truncate; do
    command -v "$tool" >/dev/null ||
        die "$tool not found (install: fdisk mtools dosfstools syslinux grub-efi-amd64-bin, or run make host)"
done
[[ -f $mbr_bin ]] || die "$mbr_bin not found (install syslinux-common)"
[[ -d $grub_dir ]] || die "$grub_dir not found (install grub-efi-amd64-bin)"

# Work next to the outputs, so the final mv is a rename.
tmp=$(mktemp -d "$out/.disks.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
# mtools: do not reject a file system made for a disk whose geometry it cannot check.
export MTOOLS_SKIP_CHECK=1

# Disk size in MiB: the payload, 1 MiB before and after the partition, room
# for FAT overhead and a boot loader; at least min_disk_mib.
payload=$(($(stat -c %s "$vmlinuz") + $(stat -c %s "$initrd")))
disk_mib=$(((payload + 1048575) / 1048576 + 12))
((disk_mib >= min_disk_mib)) || disk_mib=$min_disk_mib
part_sectors=$((disk_mib * 2048 - 2 * part_start))

# Writes a FAT file system labelled $2 into the new file $1, the size of the
# partition, holding vmlinuz and initrd.gz at its root.
make_fat() { # file label
    truncate -s $((part_sectors * 512)) "$1"
    # -h: the partition's offset on the disk (hidden sectors), which boot code reads.
    mkfs.vfat -F 16 -n "$2" -h "$part_start" "$1" >/dev/null || die "mkfs.vfat failed on $1"
    mcopy -i "$1" "$vmlinuz" ::/vmlinuz || die "cannot copy vmlinuz into $1"
    mcopy -i "$1" "$initrd" ::/initrd.gz || die "cannot copy initrd.gz into $1"
}

# Writes an empty disk file $1 with the partition table read from stdin, and
# copies the partition image $2 into it at the partition's offset.
make_disk() { # disk partition-image (sfdisk script on stdin)
    truncate -s "${disk_mib}M" "$1"
    sfdisk --quiet --no-reread --no-tell-kernel "$1" >/dev/null || die "sfdisk failed on $1"
    dd if="$2" of="$1" bs=512 seek="$part_start" conv=notrunc,sparse status=none ||
        die "cannot copy the partition into $1"
}

# --- bios.img: MBR + FAT + SYSLINUX ------------------------------------------
log "building $out/bios.img (${disk_mib} MiB)"
make_fat "$tmp/bios.part" "$bios_label"
# SERIAL: SYSLINUX's own messages (its banner, errors) go to the serial console too.
cat >"$tmp/syslinux.cfg" <<EOF
SERIAL 0 115200
DEFAULT guest
PROMPT 0
TIMEOUT 0
LABEL guest
  LINUX /vmlinuz
  INITRD /initrd.gz
  APPEND $cmdline_head guest.say="firmware: bios" $cmdline_tail
EOF
mcopy -i "$tmp/bios.part" "$tmp/syslinux.cfg" ::/syslinux.cfg || die "cannot copy syslinux.cfg"
# The mtools-based installer: writes ldlinux.sys, ldlinux.c32 and the boot sector.
syslinux --install "$tmp/bios.part" || die "syslinux --install failed"
make_disk "$tmp/bios.img" "$tmp/bios.part" <<EOF
label: dos
label-id: 0x766d7275
unit: sectors

start=$part_start, size=$part_sectors, type=e, bootable
EOF
# The MBR's boot code (its first 440 bytes; the partition table stays).
dd if="$mbr_bin" of="$tmp/bios.img" bs=440 count=1 conv=notrunc status=none ||
    die "cannot write $mbr_bin into bios.img"

# --- uefi.img: GPT + EFI system partition + standalone GRUB ---------------------
log "building $out/uefi.img (${disk_mib} MiB)"
make_fat "$tmp/uefi.part" "$uefi_label"
# GRUB quotes a word that contains a blank when it passes it to the kernel, so
# the kernel gets "guest.say=firmware: uefi" (one parameter, as intended).
# A standalone GRUB has only its memdisk: load the partition and file system
# drivers before search. If the boot fails, say so and power off.
cat >"$tmp/grub.cfg" <<EOF
insmod part_gpt
insmod fat
insmod efi_gop
search --no-floppy --set=root --label $uefi_label
linux /vmlinuz $cmdline_head guest.say="firmware: uefi" $cmdline_tail
initrd /initrd.gz
boot
echo "grub: cannot boot the test guest from $uefi_label"
sleep 3
halt
EOF
# Only the modules grub.cfg needs (and their dependencies), no fonts, locales
# or themes: the image stays small (about 1 MiB instead of 6).
grub-mkstandalone -O x86_64-efi -d "$grub_dir" -o "$tmp/BOOTX64.EFI" \
    --install-modules="part_gpt fat search search_label linux boot echo sleep halt normal efi_gop" \
    --modules="part_gpt fat" --locales= --fonts= --themes= \
    "boot/grub/grub.cfg=$tmp/grub.cfg" || die "grub-mkstandalone failed"
mmd -i "$tmp/uefi.part" ::/EFI ::/EFI/BOOT || die "cannot make EFI/BOOT in uefi.img"
mcopy -i "$tmp/uefi.part" "$tmp/BOOTX64.EFI" ::/EFI/BOOT/BOOTX64.EFI ||
    die "cannot copy BOOTX64.EFI"
make_disk "$tmp/uefi.img" "$tmp/uefi.part" <<EOF
label: gpt
label-id: 766D7275-6E00-4000-8000-000000000001
unit: sectors

start=$part_start, size=$part_sectors, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, uuid=766D7275-6E00-4000-8000-000000000002, name="EFI system partition"
EOF

# --- into place -----------------------------------------------------------------
mv -f "$tmp/bios.img" "$out/bios.img"
mv -f "$tmp/uefi.img" "$out/uefi.img"
touch "$out/bios.img" "$out/uefi.img"
log "built $out/bios.img and $out/uefi.img ($disk_mib MiB each, raw, sparse)"
