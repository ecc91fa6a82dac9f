#!/bin/bash
# Build a real Debian 12 (bookworm) guest disk for tests that need systemd,
# cloud-init and sshd.
#
#   bash tests/guest/build-debian.sh [OUTDIR]   (OUTDIR defaults to <repo>/build/guest)
#
# Writes OUTDIR/debian.qcow2 (compressed qcow2, 2 GiB virtual) and
# OUTDIR/debian.sha256 (its sha256sum, "HASH  debian.qcow2"). The disk boots
# under SeaBIOS and under OVMF: GPT, partition 1 a FAT32 EFI system partition
# holding the kernel, its initrd, SYSLINUX (BIOS: gptmbr.bin in the MBR, the
# partition marked legacy BIOS bootable) and a standalone GRUB as
# EFI/BOOT/BOOTX64.EFI (UEFI); partition 2 the ext4 root, made with
# `mkfs.ext4 -d` from a debootstrap tree. No loop devices, no mounts of the
# image. Guests are configured by cloud-init from a NoCloud seed (user
# `debian`, no root password; network by systemd-networkd).
#
# Caching: the finished image lives in CACHE=/var/cache/vmrun-test as
# debian-KEY.qcow2 (+ .sha256), KEY being a hash of this script, so any checkout
# of the same script on this machine reuses it; OUTDIR gets a hard link (or a
# copy). The .debs are kept in CACHE/debs (debootstrap --cache-dir). The cached
# image is checked against its hash on every use and rebuilt if it differs.
# GUEST_FORCE=1 rebuilds anyway. Everything is written to a temporary name and
# renamed into place, so an interrupted build leaves no partial image behind;
# builds are serialized by a lock (CACHE/.lock).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=${1:-$repo/build/guest}
self=$here/build-debian.sh
cache=/var/cache/vmrun-test
suite=bookworm
name=debian

# Packages on top of debootstrap's minbase. python3-cffi-backend provides the
# virtual python3-cffi-backend-api-* that python3-cryptography (cloud-init)
# needs: debootstrap does not resolve virtual packages.
packages=(
    systemd-sysv udev dbus linux-image-cloud-amd64 initramfs-tools
    cloud-init python3-cffi-backend cloud-guest-utils e2fsprogs
    openssh-server sudo iproute2 systemd-resolved procps
    curl ca-certificates netcat-openbsd
)
# Units that would only slow a short-lived test guest down.
mask_units=(
    apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer man-db.timer
    e2scrub_all.timer e2scrub_reap.service fstrim.timer
)

# Disk layout, in 512-byte sectors: 1 MiB gap, ESP, root, 1 MiB for the
# backup GPT at the end.
disk_mib=2048
esp_mib=200
esp_start=2048
root_start=$((esp_start + esp_mib * 2048))
root_sectors=$((disk_mib * 2048 - 2048 - root_start))
esp_type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B
linux_type=0FC63DAF-8483-4772-8E79-3D69D8477DE4

log() { echo "debian-guest: $*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $(id -u) == 0 ]] || die "must run as root (debootstrap, chroot)"
key=$(sha256sum "$self" | cut -c1-16)
cached=$cache/$name-$key.qcow2
mkdir -p "$cache/debs" "$out"

# One build at a time per machine: a second caller waits, then reuses.
exec 9>"$cache/.lock"
flock 9

tmpbase=${TMPDIR:-/var/tmp}
tmp=
child=
# Unmount whatever is mounted under directory $1 (debootstrap's mounts if it
# was interrupted), deepest first, then remove it; keep it if that fails.
remove_tree() {
    local dir=$1 mnt left=0
    while read -r mnt; do
        umount "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null || left=1
    done < <(awk -v t="$dir/" 'substr($5, 1, length(t)) == t { print $5 }' \
                 /proc/self/mountinfo | sort -r)
    if ((left)); then
        log "warning: could not unmount everything under $dir; not removing it"
    else
        rm -rf --one-file-system "$dir"
    fi
}
# On any exit: stop a running step (its whole process group), drop temp files.
cleanup() {
    if [[ -n $child ]]; then
        kill -TERM -- "-$child" 2>/dev/null || true
        wait "$child" 2>/dev/null || true
    fi
    rm -f "$cache/.$name"-*.qcow2.* "$out/.$name".*.??????
    [[ -z $tmp ]] || remove_tree "$tmp"
}
trap cleanup EXIT
trap 'log interrupted; exit 130' INT
trap 'log terminated; exit 143' TERM
trap 'log hangup; exit 129' HUP
# Run a long step in its own process group and wait for it: a signal then
# interrupts the wait at once, and cleanup stops the step and its children.
long() {
    local rc=0
    set -m
    "$@" </dev/null &
    child=$!
    set +m
    wait "$child" || rc=$?
    child=
    return "$rc"
}
# We hold the lock: temp trees of earlier builds are left over from a kill.
for stale in "$tmpbase"/vmrun-debian.??????; do
    [[ -d $stale ]] || continue
    log "removing $stale, left over by an interrupted build"
    remove_tree "$stale"
done

# Link (or copy) the cached image into OUTDIR, the hash first, the image last.
install_out() {
    local t
    t=$(mktemp "$out/.$name.sha256.XXXXXX")
    cp "$cached.sha256" "$t" && chmod 0644 "$t" && mv -f "$t" "$out/$name.sha256"
    t=$(mktemp -u "$out/.$name.qcow2.XXXXXX")
    ln "$cached" "$t" 2>/dev/null || cp "$cached" "$t"
    mv -f "$t" "$out/$name.qcow2"
    touch "$out/$name.qcow2" # newer than the script, for make
    log "$out/$name.qcow2 ($(stat -c %s "$out/$name.qcow2") bytes) from $cached"
}

if [[ ${GUEST_FORCE:-0} != 1 && -f $cached && -f $cached.sha256 ]]; then
    if [[ $(sha256sum "$cached" | cut -d' ' -f1) == "$(cut -d' ' -f1 "$cached.sha256")" ]]; then
        touch "$cached" # in use: keep it from being pruned
        if [[ $out/$name.qcow2 -ef $cached ]] && cmp -s "$out/$name.sha256" "$cached.sha256"; then
            touch "$out/$name.qcow2"
            log "$out/$name.qcow2 is up to date"
        else
            install_out
        fi
        exit 0
    fi
    log "cached $cached does not match its hash: rebuilding"
fi

for tool in debootstrap chroot systemctl mkfs.ext4 mkfs.vfat mmd mcopy syslinux \
            grub-mkstandalone sfdisk qemu-img sha256sum apt-get; do
    command -v "$tool" >/dev/null || die "$tool not found (run scripts/setup-host.sh)"
done
gptmbr=/usr/lib/SYSLINUX/gptmbr.bin
[[ -f $gptmbr ]] || die "$gptmbr not found (package syslinux-common)"

# The host's Debian mirror (and security mirror) as apt has them configured.
host_uri() { # suite
    apt-get indextargets --format '$(IDENTIFIER) $(RELEASE) $(REPO_URI)' 2>/dev/null |
        awk -v s="$1" '$1 == "Packages" && $2 == s { print $3; exit }'
}
mirror=$(host_uri "$suite")
security=$(host_uri "$suite-security")
if [[ -z $mirror ]]; then
    mirror=http://deb.debian.org/debian/
    log "no $suite source configured in apt; using $mirror"
fi
security=${security:-http://deb.debian.org/debian-security/}

tmp=$(mktemp -d "$tmpbase/vmrun-debian.XXXXXX")
root=$tmp/root
t0=$SECONDS
# --- root filesystem tree ----------------------------------------------------
log "debootstrap $suite from $mirror (debs cached in $cache/debs)"
include=$(IFS=,; echo "${packages[*]}")
if ! long debootstrap --variant=minbase --include="$include" --cache-dir="$cache/debs" \
        "$suite" "$root" "$mirror" >"$tmp/debootstrap.log" 2>&1; then
    tail -n 20 "$tmp/debootstrap.log" >&2
    [[ -f $root/debootstrap/debootstrap.log ]] && tail -n 30 "$root/debootstrap/debootstrap.log" >&2
    die "debootstrap failed"
fi
log "debootstrap done after $((SECONDS - t0)) s"

kernels=("$root"/boot/vmlinuz-*)
[[ ${#kernels[@]} == 1 && -f ${kernels[0]} ]] || die "expected one kernel in $root/boot"
kver=${kernels[0]##*/vmlinuz-}
[[ -f $root/boot/initrd.img-$kver ]] || die "no initrd for $kver (initramfs-tools)"
grep -A1 '^ *default_user:' "$root/etc/cloud/cloud.cfg" | grep -q 'name: debian$' ||
    die "cloud-init's default user is not 'debian': set it in cloud.cfg.d"
[[ $(awk -F: '$1 == "root" { print $2 }' "$root/etc/shadow") == [*!]* ]] ||
    die "root has a password"

# Identifiers, fresh for every build.
uuid() { cat /proc/sys/kernel/random/uuid; }
disk_uuid=$(uuid)
esp_uuid=$(uuid)
root_uuid=$(uuid)
fs_uuid=$(uuid)
fat_id=$(uuid | tr -d - | cut -c1-8)
fat_uuid=${fat_id:0:4}-${fat_id:4:4}
cmdline="root=PARTUUID=$root_uuid ro console=ttyS0 no_timer_check net.ifnames=0"

# --- configuration -----------------------------------------------------------
# No fsck at boot (pass 0): every test boot starts from a clean image, and
# systemd-fsck-root would sit on the boot's critical path.
cat >"$root/etc/fstab" <<EOF
# <file system> <mount point> <type> <options> <dump> <pass>
PARTUUID=$root_uuid / ext4 errors=remount-ro 0 0
EOF
echo "$name" >"$root/etc/hostname"
cat >"$root/etc/hosts" <<EOF
127.0.0.1	localhost
127.0.1.1	$name
::1		localhost ip6-localhost ip6-loopback
ff02::1		ip6-allnodes
ff02::2		ip6-allrouters
EOF
echo LANG=C.UTF-8 >"$root/etc/default/locale"
rm -f "$root/etc/apt/sources.list"
cat >"$root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $mirror
Suites: $suite $suite-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $security
Suites: $suite-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF

# cloud-init: NoCloud only (no waiting for metadata servers); systemd-networkd
# as the network renderer; a locale that needs no locale-gen; ed25519 and
# ECDSA host keys only (RSA and DSA key generation costs seconds under TCG);
# Debian's module lists without the modules that cannot work in this image
# (snap, byobu, grub-dpkg, rsyslog, ssh-import-id, fan, landscape, lxd,
# puppet, chef, mcollective, salt-minion, rmc, rightscale, ec2 metadata).
cat >"$root/etc/cloud/cloud.cfg.d/91_vmrun.cfg" <<'EOF'
# vmrun test guest (tests/guest/build-debian.sh)
datasource_list: [ NoCloud, None ]
locale: C.UTF-8
ssh_genkeytypes: [ed25519, ecdsa]
system_info:
  network:
    renderers: [networkd]
    activators: [networkd]
cloud_init_modules:
 - migrator
 - seed_random
 - bootcmd
 - write-files
 - growpart
 - resizefs
 - disk_setup
 - mounts
 - set_hostname
 - update_hostname
 - update_etc_hosts
 - ca-certs
 - users-groups
 - ssh
cloud_config_modules:
 - keyboard
 - locale
 - set-passwords
 - apt-pipelining
 - apt-configure
 - ntp
 - timezone
 - runcmd
cloud_final_modules:
 - package-update-upgrade-install
 - write-files-deferred
 - scripts-vendor
 - scripts-per-once
 - scripts-per-boot
 - scripts-per-instance
 - scripts-user
 - ssh-authkey-fingerprints
 - keys-to-console
 - install-hotplug
 - phone-home
 - final-message
 - power-state-change
EOF

systemctl --root="$root" enable systemd-networkd.service systemd-resolved.service >/dev/null 2>&1 ||
    die "cannot enable systemd-networkd"
for unit in "${mask_units[@]}"; do
    if [[ -e $root/lib/systemd/system/$unit ]]; then
        systemctl --root="$root" mask "$unit" >/dev/null 2>&1 || die "cannot mask $unit"
    fi
done

# Per-instance state: regenerated at first boot (cloud-init makes the ssh
# host keys and prints them to the console; systemd makes the machine id).
rm -f "$root"/etc/ssh/ssh_host_*_key "$root"/etc/ssh/ssh_host_*_key.pub
: >"$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id" "$root/var/lib/systemd/random-seed"
rm -rf "$root"/var/lib/cloud/*
rm -f "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin
find "$root/var/lib/apt/lists" -maxdepth 1 -type f ! -name lock -delete
find "$root/var/log" -type f -delete
rm -rf "$root"/tmp/* "$root"/var/tmp/*

# --- EFI system partition ------------------------------------------------------
log "ESP: kernel $kver, SYSLINUX, GRUB"
cat >"$tmp/syslinux.cfg" <<EOF
SERIAL 0 115200
DEFAULT debian
PROMPT 0
TIMEOUT 0
LABEL debian
  LINUX /vmlinuz
  INITRD /initrd.img
  APPEND $cmdline
EOF
cat >"$tmp/grub.cfg" <<EOF
insmod part_gpt
insmod fat
insmod efi_gop
search --no-floppy --fs-uuid --set=root $fat_uuid
linux /vmlinuz $cmdline
initrd /initrd.img
boot
echo "grub: cannot boot the Debian guest from the ESP $fat_uuid"
halt
EOF
grub-mkstandalone -O x86_64-efi --locales= --fonts= --themes= \
    --install-modules="normal configfile echo search search_fs_uuid part_gpt fat linux boot efi_gop halt" \
    -o "$tmp/BOOTX64.EFI" "boot/grub/grub.cfg=$tmp/grub.cfg"

esp=$tmp/esp.img
truncate -s "${esp_mib}M" "$esp"
mkfs.vfat -F 32 -n ESP -i "$fat_id" -h "$esp_start" "$esp" >/dev/null
syslinux --install "$esp"
export MTOOLS_SKIP_CHECK=1
mcopy -i "$esp" "$tmp/syslinux.cfg" ::/syslinux.cfg
mcopy -i "$esp" "$root/boot/vmlinuz-$kver" ::/vmlinuz
mcopy -i "$esp" "$root/boot/initrd.img-$kver" ::/initrd.img
mmd -i "$esp" ::/EFI ::/EFI/BOOT
mcopy -i "$esp" "$tmp/BOOTX64.EFI" ::/EFI/BOOT/BOOTX64.EFI

# --- root filesystem -------------------------------------------------------------
log "root filesystem: mkfs.ext4 -d ($(du -sh "$root" | cut -f1))"
rootfs=$tmp/root.img
truncate -s "$((root_sectors * 512))" "$rootfs"
long mkfs.ext4 -q -F -L root -U "$fs_uuid" -d "$root" \
    -E lazy_itable_init=0,lazy_journal_init=0 "$rootfs"

# --- disk ----------------------------------------------------------------------
raw=$tmp/disk.raw
truncate -s "${disk_mib}M" "$raw"
sfdisk -q --no-reread --no-tell-kernel "$raw" <<EOF
label: gpt
label-id: $disk_uuid
unit: sectors
first-lba: 2048
start=$esp_start, size=$((esp_mib * 2048)), type=$esp_type, uuid=$esp_uuid, name="EFI system partition", attrs="LegacyBIOSBootable"
start=$root_start, size=$root_sectors, type=$linux_type, uuid=$root_uuid, name="root"
EOF
dd if="$gptmbr" of="$raw" bs=440 count=1 conv=notrunc status=none
dd if="$esp" of="$raw" bs=1M seek=$((esp_start / 2048)) conv=notrunc,sparse status=none
dd if="$rootfs" of="$raw" bs=1M seek=$((root_start / 2048)) conv=notrunc,sparse status=none
rm -f "$esp" "$rootfs"

log "qemu-img convert (compressed)"
new=$(mktemp "$cache/.$name-$key.qcow2.XXXXXX")
long qemu-img convert -c -f raw -O qcow2 -o compression_type=zstd "$raw" "$new"
chmod 0444 "$new"
sum=$(sha256sum "$new" | cut -d' ' -f1)
echo "$sum  $name.qcow2" >"$new.sha256"
# The image last: it is what the fast path looks for.
mv -f "$new.sha256" "$cached.sha256"
mv -f "$new" "$cached"
log "built $cached in $((SECONDS - t0)) s"

# Drop images of other versions of this script unused for two weeks.
find "$cache" -maxdepth 1 -name "$name-*.qcow2" ! -name "$name-$key.qcow2" -mtime +14 \
    -exec sh -c 'rm -f "$1" "$1.sha256"' sh {} \;
install_out
