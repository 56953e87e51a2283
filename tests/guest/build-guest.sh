#!/bin/bash
# Build the tiny test guest used by macvhost's real-guest tests.
#
#   tests/guest/build-guest.sh OUTDIR
#
# Produces OUTDIR/vmlinuz (a copy of the installed Debian kernel), OUTDIR/kernel
# (what QEMU boots: the kernel's decompressed ELF image when it carries a PVH
# entry note, else the same bzImage) and OUTDIR/initrd.img (a gzip'ed newc cpio) containing:
#   * busybox-static with applet symlinks,
#   * the virtio-net-over-PCI kernel modules (+ qemu_fw_cfg) for that kernel,
#     decompressed and listed in load order in /etc/mvh/modules,
#   * iperf3 and ethtool with their shared libraries and the dynamic loader,
#   * /usr/bin/mvh-mcast (tests/guest/mvh-mcast.c, built here with gcc -static):
#     IPv4 multicast joins, leaves and datagram counts,
#   * /init (tests/guest/init.sh) and /etc/mvh/lib.sh (helpers for scripts).
#
# Idempotent: nothing is rebuilt when OUTDIR/initrd.img is newer than every
# input (this script, init.sh, lib.sh, mvh-mcast.c, kernel, busybox, iperf3,
# ethtool, gcc) and was built for the same kernel version.
#
# Environment:
#   MACVHOST_GUEST_KVER   kernel version to use (default: newest one that has
#                         both /boot/vmlinuz-V and /lib/modules/V)
#   MACVHOST_GUEST_FORCE=1  rebuild unconditionally
#
# Needs (Debian 12 packages): linux-image-amd64 busybox-static iperf3 ethtool
# gcc libc6-dev plus coreutils, gzip, kmod (modinfo) and cpio or busybox's cpio.
set -euo pipefail

die() { echo "build-guest: error: $*" >&2; exit 1; }
log() { echo "build-guest: $*" >&2; }

[ $# -eq 1 ] || die "usage: $0 OUTDIR"
OUT=$1
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
INIT_SRC=$HERE/init.sh
LIB_SRC=$HERE/lib.sh
MCAST_SRC=$HERE/mvh-mcast.c
[ -r "$INIT_SRC" ] || die "missing $INIT_SRC"
[ -r "$LIB_SRC" ] || die "missing $LIB_SRC"
[ -r "$MCAST_SRC" ] || die "missing $MCAST_SRC"

# ---------------------------------------------------------------- inputs ----
pick_kver() {
    if [ -n "${MACVHOST_GUEST_KVER:-}" ]; then
        echo "$MACVHOST_GUEST_KVER"
        return
    fi
    local v best=""
    for k in /boot/vmlinuz-*; do
        [ -e "$k" ] || continue
        v=${k#/boot/vmlinuz-}
        [ -d "/lib/modules/$v/kernel" ] || continue
        best=$(printf '%s\n%s\n' "$best" "$v" | sed '/^$/d' | sort -V | tail -n1)
    done
    echo "$best"
}
KVER=$(pick_kver)
[ -n "$KVER" ] || die "no kernel found: need /boot/vmlinuz-V and /lib/modules/V (apt-get install linux-image-amd64)"
KERNEL=/boot/vmlinuz-$KVER
MODDIR=/lib/modules/$KVER
[ -r "$KERNEL" ] || die "cannot read $KERNEL"
[ -d "$MODDIR" ] || die "missing $MODDIR"

BUSYBOX=""
for b in /usr/bin/busybox /bin/busybox; do
    if [ -x "$b" ] && file_is_static=$(ldd "$b" 2>&1 || true) && echo "$file_is_static" | grep -q 'not a dynamic'; then
        BUSYBOX=$b
        break
    fi
done
[ -n "$BUSYBOX" ] || die "no static busybox found (apt-get install busybox-static)"
IPERF3=$(command -v iperf3 || true)
[ -n "$IPERF3" ] || die "iperf3 not found (apt-get install iperf3)"
ETHTOOL=$(command -v ethtool || PATH=$PATH:/usr/sbin:/sbin command -v ethtool || true)
[ -n "$ETHTOOL" ] || die "ethtool not found (apt-get install ethtool)"
command -v modinfo >/dev/null || PATH=$PATH:/usr/sbin:/sbin
command -v modinfo >/dev/null || die "modinfo not found (apt-get install kmod)"
CC=$(command -v gcc || true)
[ -n "$CC" ] || die "gcc not found (apt-get install gcc libc6-dev): it builds mvh-mcast"

INPUTS=("${BASH_SOURCE[0]}" "$INIT_SRC" "$LIB_SRC" "$MCAST_SRC" "$KERNEL" "$BUSYBOX" "$IPERF3"
        "$ETHTOOL" "$CC")

# ------------------------------------------------------------ up to date? ----
up_to_date() {
    [ "${MACVHOST_GUEST_FORCE:-0}" = 1 ] && return 1
    [ -s "$OUT/initrd.img" ] && [ -s "$OUT/vmlinuz" ] && [ -s "$OUT/kernel" ] && [ -r "$OUT/kver" ] ||
        return 1
    [ "$(cat "$OUT/kver")" = "$KVER" ] || return 1
    local f
    for f in "${INPUTS[@]}"; do
        [ "$OUT/initrd.img" -nt "$f" ] || return 1
    done
    return 0
}

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

# Serialise concurrent builders (parallel cargo test binaries).
exec 9>"$OUT/.build.lock"
flock 9 2>/dev/null || true

if up_to_date; then
    log "up to date: $OUT (kernel $KVER)"
    exit 0
fi
log "building guest image for kernel $KVER into $OUT"

STAGE=$(mktemp -d "$OUT/.stage.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
ROOT=$STAGE/root
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,etc/mvh,proc,sys,dev,tmp,run,root,lib/modules,lib64,lib/x86_64-linux-gnu}

# ---------------------------------------------------------------- busybox ----
cp "$BUSYBOX" "$ROOT/bin/busybox"
for applet in $("$BUSYBOX" --list); do
    case $applet in busybox) continue ;; esac
    ln -sf busybox "$ROOT/bin/$applet"
done

# ---------------------------------------------------------------- modules ----
# Wanted modules; dependencies are resolved with modinfo and loaded first.
WANT=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
      failover net_failover virtio_net qemu_fw_cfg)
declare -A SEEN=()
ORDER=()
builtin_mod() {
    # A module compiled into the kernel needs no .ko.
    grep -qE "/$1\.ko(\.[a-z]+)?\$" "$MODDIR/modules.builtin" 2>/dev/null
}
visit() {
    local m=${1//-/_} dep deps
    [ -n "${SEEN[$m]:-}" ] && return 0
    SEEN[$m]=1
    if builtin_mod "$m"; then
        return 0
    fi
    deps=$(modinfo -k "$KVER" -F depends "$m" 2>/dev/null) || die "module $m not found for kernel $KVER"
    for dep in ${deps//,/ }; do
        visit "$dep"
    done
    ORDER+=("$m")
}
for m in "${WANT[@]}"; do
    if builtin_mod "$m"; then continue; fi
    if ! modinfo -k "$KVER" -n "$m" >/dev/null 2>&1; then
        # qemu_fw_cfg is optional (scripts can also be sent over the serial line).
        [ "$m" = qemu_fw_cfg ] && { log "note: qemu_fw_cfg not available"; continue; }
        die "module $m not found for kernel $KVER"
    fi
    visit "$m"
done
: >"$ROOT/etc/mvh/modules"
for m in "${ORDER[@]}"; do
    src=$(modinfo -k "$KVER" -n "$m")
    dst=$ROOT/lib/modules/$m.ko
    case $src in
        *.ko) cp "$src" "$dst" ;;
        *.ko.xz) xz -dc "$src" >"$dst" ;;
        *.ko.zst) zstd -qdc "$src" >"$dst" ;;
        *.ko.gz) gzip -dc "$src" >"$dst" ;;
        *) die "unknown module format: $src" ;;
    esac
    echo "$m" >>"$ROOT/etc/mvh/modules"
done
log "modules: ${ORDER[*]}"

# ------------------------------------------------------ dynamic binaries ----
copy_with_libs() {
    local bin=$1 dest=$2 lib
    cp -L "$bin" "$ROOT$dest"
    # ldd prints "name => /path (addr)" or "/path (addr)" for the loader.
    for lib in $(ldd "$bin" | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i }'); do
        [ -e "$ROOT$lib" ] && continue
        mkdir -p "$ROOT$(dirname "$lib")"
        cp -L "$lib" "$ROOT$lib"
    done
}
copy_with_libs "$IPERF3" /usr/bin/iperf3
copy_with_libs "$ETHTOOL" /usr/sbin/ethtool
# Debian's loader is /lib64/ld-linux-x86-64.so.2; make sure the multiarch
# directory exists under both /lib and /usr/lib spellings.
mkdir -p "$ROOT/usr/lib"
if [ -d "$ROOT/usr/lib/x86_64-linux-gnu" ] && [ ! -e "$ROOT/lib/x86_64-linux-gnu/libc.so.6" ]; then
    cp -a "$ROOT/usr/lib/x86_64-linux-gnu/." "$ROOT/lib/x86_64-linux-gnu/"
fi

# ------------------------------------------------------------ test tools ----
# Static, so it needs nothing from the image's (partial) libc. -static needs libc6-dev's libc.a.
"$CC" -static -O2 -Wall -Wextra -Werror -o "$ROOT/usr/bin/mvh-mcast" "$MCAST_SRC" \
    || die "cannot build mvh-mcast with $CC -static (apt-get install libc6-dev)"

# ------------------------------------------------------------- init + etc ----
install -m 0755 "$INIT_SRC" "$ROOT/init"
install -m 0644 "$LIB_SRC" "$ROOT/etc/mvh/lib.sh"
echo "$KVER" >"$ROOT/etc/mvh/kver"
echo "root:x:0:0:root:/root:/bin/sh" >"$ROOT/etc/passwd"
echo "root:x:0:" >"$ROOT/etc/group"
printf '127.0.0.1 localhost\n' >"$ROOT/etc/hosts"
# iperf3 wants a writable /tmp and nothing else.

# ------------------------------------------------------------------ pack ----
CPIO=$(command -v cpio || true)
(
    cd "$ROOT"
    if [ -n "$CPIO" ]; then
        find . -print0 | LC_ALL=C sort -z | "$CPIO" --null -o -H newc -R 0:0 --quiet
    else
        find . | LC_ALL=C sort | "$BUSYBOX" cpio -o -H newc -R 0:0
    fi
) | gzip -6 -n >"$STAGE/initrd.img"

# The kernel QEMU boots. Under TCG a bzImage spends ~8 s decompressing itself (measured: 13.3 s
# to READY with the bzImage, 5.6 s with the same kernel's ELF image booted through its PVH entry
# note, same kernel and initrd). So: find the compressed payload inside the bzImage, decompress it,
# and keep the ELF only when it has a PVH note (Xen note type 18; QEMU refuses an ELF without it).
pvh_elf() {
    local magic off tool
    for magic in '\xfd7zXZ\x00:xz' '\x28\xb5\x2f\xfd:zstd' '\x1f\x8b\x08\x00:gzip'; do
        tool=${magic##*:}
        command -v "$tool" >/dev/null || continue
        for off in $(LC_ALL=C grep -obUaP "${magic%:*}" "$KERNEL" | cut -d: -f1 | head -5); do
            tail -c +$((off + 1)) "$KERNEL" | "$tool" -dc 2>/dev/null >"$STAGE/vmlinux" || true
            if [ "$(head -c 4 "$STAGE/vmlinux" | od -An -tx1 | tr -d ' ')" = 7f454c46 ] &&
                LC_ALL=C grep -qaP '\x04\x00\x00\x00[\x04\x08]\x00\x00\x00\x12\x00\x00\x00Xen\x00' \
                    "$STAGE/vmlinux"; then
                return 0
            fi
        done
    done
    rm -f "$STAGE/vmlinux"
    return 1
}
cp "$KERNEL" "$STAGE/vmlinuz"
if pvh_elf; then
    mv -f "$STAGE/vmlinux" "$STAGE/kernel"
    log "kernel: the ELF image with its PVH entry ($(du -h "$STAGE/kernel" | cut -f1))"
else
    cp "$KERNEL" "$STAGE/kernel"
    log "kernel: the bzImage (no PVH entry found)"
fi
mv -f "$STAGE/vmlinuz" "$OUT/vmlinuz"
mv -f "$STAGE/kernel" "$OUT/kernel"
echo "$KVER" >"$OUT/kver"
# initrd.img last: its mtime marks a complete build.
mv -f "$STAGE/initrd.img" "$OUT/initrd.img"
log "done: $OUT/kernel $OUT/initrd.img ($(du -h "$OUT/initrd.img" | cut -f1))"
