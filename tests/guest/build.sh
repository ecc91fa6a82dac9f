#!/bin/bash
# Build the vmrun test guest: a Debian cloud kernel and a tiny busybox initramfs.
#
#   bash tests/guest/build.sh [OUTDIR]      (OUTDIR defaults to <repo>/build/guest)
#
# Writes OUTDIR/vmlinuz and OUTDIR/initrd.gz. The .deb files are cached in
# OUTDIR/debs so a rebuild does not download again. Nothing is installed on the
# host. Does nothing when both outputs are newer than this script and the init.
# Set GUEST_FORCE=1 to rebuild anyway.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=${1:-$repo/build/guest}
self=$here/build.sh
init_src=$here/init
kernel_meta=linux-image-cloud-amd64
# Modules the init loads at boot (their dependencies are added in front, in
# load order), by group:
#   base    always: evdev and button, so the ACPI power button reaches userspace
#   virtio  only when the machine has a virtio PCI device: the virtio PCI
#           transport, network and disk drivers, virtio-scsi with the SCSI CD-ROM
#           driver and the iso9660 filesystem (cloud-init seed images)
#   virtiofs  only when the machine has a virtio-fs device (shared folders):
#           virtiofs and FUSE (its virtio dependencies are in group virtio)
base_modules=(evdev button)
virtio_modules=(virtio_pci virtio_net virtio_blk virtio_scsi sr_mod isofs)
virtiofs_modules=(virtiofs)
# Extra insmod arguments: scan SCSI buses synchronously, so a CD-ROM on
# virtio-scsi exists as soon as insmod virtio_scsi returns.
declare -A modargs=([scsi_mod]="scan=sync")
# Fixed timestamp for everything in the archive, so the initrd is reproducible.
epoch=${SOURCE_DATE_EPOCH:-0}

log() { echo "guest-build: $*" >&2; }
die() { log "error: $*"; exit 1; }

if [[ ${GUEST_FORCE:-0} != 1 && -f $out/vmlinuz && -f $out/initrd.gz &&
      $out/vmlinuz -nt $self && $out/vmlinuz -nt $init_src &&
      $out/initrd.gz -nt $self && $out/initrd.gz -nt $init_src ]]; then
    log "$out is up to date"
    exit 0
fi

for tool in apt-get apt-cache dpkg-deb cpio gzip; do
    command -v "$tool" >/dev/null || die "$tool not found"
done

debs=$out/debs
mkdir -p "$debs"
tmp=$(mktemp -d "${TMPDIR:-/tmp}/vmrun-guest.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# Name of the versioned kernel package the metapackage points at.
resolve_kernel() {
    apt-cache depends "$kernel_meta" 2>/dev/null |
        awk '$1 ~ /Depends:$/ && $2 ~ /^linux-image-[0-9]/ && !n++ { print $2 }'
}

# Path of the cached .deb for package $1 (a glob); fails if there is none.
cached_deb() {
    local f
    # shellcheck disable=SC2206 # $1 may be a glob
    for f in "$debs"/$1_*.deb; do
        [[ -f $f ]] && { echo "$f"; return 0; }
    done
    return 1
}

# Print the cached .deb for package $1, downloading it first if needed.
fetch() {
    local pkg=$1
    cached_deb "$pkg" && return 0
    log "downloading $pkg"
    rm -rf "$tmp/dl" && mkdir "$tmp/dl" || return 1
    (cd "$tmp/dl" && apt-get download -q -o APT::Sandbox::User=root "$pkg" >&2) || return 1
    mv "$tmp/dl/$pkg"_*.deb "$debs/" || return 1
    cached_deb "$pkg"
}

# Sets kernel_pkg, kernel_deb and busybox_deb. Uses only the cache when it
# holds what the apt lists name (or when there are no lists but a cached kernel).
get_debs() {
    local cached
    kernel_pkg=$(resolve_kernel) || kernel_pkg=
    if [[ -z $kernel_pkg ]]; then
        cached=$(cached_deb 'linux-image-[0-9]*-cloud-amd64') || return 1
        kernel_pkg=$(basename "$cached")
        kernel_pkg=${kernel_pkg%%_*}
        log "apt cannot resolve $kernel_meta; using cached $kernel_pkg"
    fi
    kernel_deb=$(fetch "$kernel_pkg") || return 1
    busybox_deb=$(fetch busybox-static) || return 1
}

if ! get_debs; then
    # Most likely no (or stale) package lists, as on a fresh machine.
    log "refreshing apt package lists"
    apt-get update -q >&2 || die "apt-get update failed"
    get_debs || die "cannot get $kernel_meta and busybox-static .debs"
fi
# Drop kernels of other ABIs from the cache.
for f in "$debs"/linux-image-*.deb; do
    [[ $f == "$kernel_deb" ]] || rm -f "$f"
done
log "kernel: $(basename "$kernel_deb")"
log "busybox: $(basename "$busybox_deb")"

mkdir "$tmp/kernel" "$tmp/busybox"
dpkg-deb -x "$kernel_deb" "$tmp/kernel"
dpkg-deb -x "$busybox_deb" "$tmp/busybox"

vmlinuz=("$tmp"/kernel/boot/vmlinuz-*)
[[ ${#vmlinuz[@]} == 1 && -f ${vmlinuz[0]} ]] || die "expected one boot/vmlinuz-* in $kernel_deb"
kver=${vmlinuz[0]##*/vmlinuz-}
moddir=$tmp/kernel/lib/modules/$kver
busybox=$tmp/busybox/bin/busybox
[[ -x $busybox ]] || die "no bin/busybox in $busybox_deb"

# --- initramfs tree ---------------------------------------------------------
root=$tmp/root
mkdir -m 0755 "$root"
mkdir -p "$root"/{bin,dev,etc,mnt,proc,sys,tmp,lib/modules}
chmod 1777 "$root/tmp"
install -m 0755 "$busybox" "$root/bin/busybox"
install -m 0755 "$init_src" "$root/init"

# Applets the init uses (and a few for poking around), as symlinks.
applets=(sh cat cut dd echo head insmod ip ls mkdir mount nc od poweroff printf reboot
         sleep sync timeout tr umount usleep
         dmesg grep ifconfig lsmod netstat ping ps uname)
available=$("$busybox" --list)
for a in "${applets[@]}"; do
    grep -qx "$a" <<<"$available" || die "busybox-static lacks the $a applet"
    ln -s busybox "$root/bin/$a"
done

# Kernel modules, stored uncompressed so insmod needs no decompressor support
# (Debian 12 ships them as plain .ko; compressed ones are handled anyway).
# The package has no modules.dep (depmod runs at install time), so each
# module's dependencies come from the "depends=" field of its .modinfo
# section. lib/modules/load-order lists the modules in an order that loads
# every dependency first, one "group name [insmod args]" per line.
declare -A seen=()
order=()
add_module() { # group, module name; appends "group name" (after its dependencies) to order
    local g=$1 m=$2 src dep deps
    [[ -z ${seen[$m]:-} ]] || return 0
    seen[$m]=1
    # modules.builtin names files, which may spell _ as -.
    if grep -Eq "/(${m}|${m//_/-})\.ko\$" "$moddir/modules.builtin" 2>/dev/null; then
        return 0 # built in, nothing to load
    fi
    src=$(find "$moddir/kernel" \( -name "$m.ko" -o -name "$m.ko.*" \
              -o -name "${m//_/-}.ko" -o -name "${m//_/-}.ko.*" \) | head -n1)
    [[ -n $src ]] || die "module $m not found in $kernel_pkg"
    case $src in
        *.ko) cp "$src" "$root/lib/modules/$m.ko" ;;
        *.ko.xz) xz -dc "$src" >"$root/lib/modules/$m.ko" ;;
        *.ko.gz) gzip -dc "$src" >"$root/lib/modules/$m.ko" ;;
        *.ko.zst) zstd -qdc "$src" >"$root/lib/modules/$m.ko" ;;
        *) die "unknown module format: $src" ;;
    esac
    chmod 0644 "$root/lib/modules/$m.ko"
    deps=$(tr '\0' '\n' <"$root/lib/modules/$m.ko" | grep -a -m1 '^depends=' || true)
    deps=${deps#depends=}
    for dep in ${deps//,/ }; do
        add_module "$g" "$dep"
    done
    order+=("$g $m")
}
for m in "${base_modules[@]}"; do
    add_module base "$m"
done
for m in "${virtio_modules[@]}"; do
    add_module virtio "$m"
done
for m in "${virtiofs_modules[@]}"; do
    add_module virtiofs "$m"
done
for gm in "${order[@]}"; do
    m=${gm#* }
    echo "$gm${modargs[$m]:+ ${modargs[$m]}}"
done >"$root/lib/modules/load-order"
log "modules: ${order[*]#* }"

# The kernel starts /init with /dev/console as stdin/out/err, so ship the node.
# Where mknod is not allowed the init reopens it from devtmpfs instead.
if ! mknod -m 0600 "$root/dev/console" c 5 1 2>/dev/null; then
    log "warning: mknod not permitted, initrd has no /dev/console (init copes)"
fi

# --- archive ----------------------------------------------------------------
find "$root" -exec touch -h -d "@$epoch" {} +
mkdir -p "$out"
(cd "$root" && find . | LC_ALL=C sort |
    cpio -o -H newc -R 0:0 --reproducible --quiet) | gzip -9 -n >"$tmp/initrd.gz"
cp "${vmlinuz[0]}" "$tmp/vmlinuz"
# Move into place only once both are complete (vmlinuz last, it is the marker).
mv -f "$tmp/initrd.gz" "$out/initrd.gz"
mv -f "$tmp/vmlinuz" "$out/vmlinuz"
touch "$out/initrd.gz" "$out/vmlinuz"
log "built $out/vmlinuz ($kver) and $out/initrd.gz ($(stat -c %s "$out/initrd.gz") bytes)"
