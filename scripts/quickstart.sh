#!/usr/bin/env bash
# macvhost quickstart (draft): one command, run as root on a Debian machine,
# that shows a real guest's traffic going through macvhost and a macvtap.
#
#   sudo scripts/quickstart.sh
#
# What it does (each step prints one line):
#   1. checks for (and apt-get installs) qemu-system-x86, linux-image-amd64,
#      busybox-static, iperf3, ethtool, iproute2, kmod;
#   2. cargo build --release;
#   3. builds the tiny test guest (tests/guest/build-guest.sh target/guest);
#   4. makes a sandbox network namespace with a veth pair: a macvtap (bridge
#      mode) on one end, the peer address 10.199.0.1/24 on the other;
#   5. starts macvhost in the namespace on that macvtap;
#   6. boots the guest (10.199.0.2/24) with QEMU on macvhost's socket, pings
#      the peer and measures iperf3 throughput both ways through the macvtap;
#   7. prints macvhost's per-queue counters;
#   8. tears everything down on exit or Ctrl-C.
# Nothing leaves the namespace: all traffic is between 10.199.0.1 and
# 10.199.0.2 inside it.
#
# Environment:
#   MACVHOST_ACCEL=kvm|tcg|auto   QEMU accelerator (auto: KVM if a probe boot
#                                 works, else TCG)
#   MACVHOST_BIN=PATH             use this macvhost binary, skip cargo build
#   MACVHOST_QUICKSTART_BACKEND=qemu
#                                 reference run without macvhost: QEMU's own
#                                 userspace virtio-net on the same macvtap
#   MACVHOST_QUICKSTART_IPERF_SECS=N  iperf3 duration per direction (5)
#   MACVHOST_QUICKSTART_KEEP=1    keep the work directory (logs)
#   MACVHOST_NO_INSTALL=1         never run apt-get, just report what's missing
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BACKEND=${MACVHOST_QUICKSTART_BACKEND:-macvhost}
IPERF_SECS=${MACVHOST_QUICKSTART_IPERF_SECS:-5}
NS=mvhq-$$
PEER_IP=10.199.0.1
GUEST_IP=10.199.0.2
GUEST_MAC=52:54:00:4d:56:48
QUEUES=2
GUEST_TIMEOUT=${MACVHOST_QUICKSTART_TIMEOUT:-300}

WORK=""
QEMU_PID=""
MACVHOST_PID=""
IPERF_PID=""
FOLLOW_PID=""

if [ -t 1 ]; then B=$'\033[1m' R=$'\033[31m' N=$'\033[0m'; else B="" R="" N=""; fi
step() { printf '%s==> %s%s\n' "$B" "$*" "$N"; }
note() { printf '    %s\n' "$*"; }
die() {
    printf '%squickstart: error: %s%s\n' "$R" "$*" "$N" >&2
    exit 1
}
show_log() { # show_log TITLE FILE
    if [ -s "$2" ]; then
        printf -- '--- %s (%s) ---\n' "$1" "$2" >&2
        tail -n 25 "$2" >&2
    fi
}

cleanup() {
    local rc=$?
    trap - EXIT
    # Finish the teardown even if the terminal or a pipe reader went away.
    trap '' INT TERM HUP PIPE
    [ -n "$WORK" ] && step "tearing down (namespace $NS, processes, $WORK)"
    for pid in $QEMU_PID $IPERF_PID $MACVHOST_PID; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in $QEMU_PID $IPERF_PID $MACVHOST_PID $FOLLOW_PID; do
        wait "$pid" 2>/dev/null || true
    done
    ip netns del "$NS" 2>/dev/null || true
    if [ -n "$WORK" ]; then
        if [ "$rc" -ne 0 ] || [ "${MACVHOST_QUICKSTART_KEEP:-0}" = 1 ]; then
            note "logs kept in $WORK"
        else
            rm -rf "$WORK"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'echo; echo "interrupted" >&2; exit 130' INT TERM HUP

# ------------------------------------------------------------ 1. checks ----
[ "$(id -u)" = 0 ] || die "run as root: it creates a network namespace, a macvtap and a VM (sudo $0)"
[ "$(uname -m)" = x86_64 ] || die "this quickstart boots an x86_64 guest; this machine is $(uname -m)"
case $BACKEND in macvhost | qemu) ;; *) die "MACVHOST_QUICKSTART_BACKEND must be macvhost or qemu" ;; esac

step "checking packages"
export PATH=$PATH:/usr/sbin:/sbin
missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
static_busybox=0
for b in /usr/bin/busybox /bin/busybox; do
    if [ -x "$b" ] && { ldd "$b" 2>&1 || true; } | grep -q 'not a dynamic'; then static_busybox=1; fi
done
[ $static_busybox = 1 ] || missing+=(busybox-static)
command -v iperf3 >/dev/null || missing+=(iperf3)
command -v ethtool >/dev/null || missing+=(ethtool)
command -v ip >/dev/null || missing+=(iproute2)
command -v modinfo >/dev/null || missing+=(kmod)
command -v cpio >/dev/null || missing+=(cpio)
have_kernel=0
for k in /boot/vmlinuz-*; do
    [ -e "$k" ] && [ -d "/lib/modules/${k#/boot/vmlinuz-}/kernel" ] && have_kernel=1
done
[ $have_kernel = 1 ] || missing+=(linux-image-amd64)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "${MACVHOST_NO_INSTALL:-0}" = 1 ] || ! command -v apt-get >/dev/null; then
        die "missing packages: ${missing[*]} (install them, e.g. apt-get install ${missing[*]})"
    fi
    step "installing ${missing[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
        die "apt-get install ${missing[*]} failed"
fi

modprobe tun 2>/dev/null || true
modprobe macvtap 2>/dev/null || true

WORK=$(mktemp -d /tmp/macvhost-quickstart.XXXXXX)

# ------------------------------------------------------------- 2. build ----
BIN=""
if [ "$BACKEND" = macvhost ]; then
    if [ -n "${MACVHOST_BIN:-}" ]; then
        BIN=$MACVHOST_BIN
        [ -x "$BIN" ] || die "MACVHOST_BIN=$BIN is not executable"
        step "using $BIN"
    else
        command -v cargo >/dev/null ||
            die "cargo not found: install a Rust toolchain >= 1.80 (e.g. with rustup; Debian 12's cargo is too old)"
        step "building macvhost (cargo build --release)"
        (cd "$ROOT" && cargo build --release --quiet) || die "cargo build --release failed"
        BIN=$ROOT/target/release/macvhost
    fi
fi

# ------------------------------------------------------- 3. guest image ----
step "building the test guest (installed Debian kernel, busybox, iperf3, ethtool) in target/guest"
"$ROOT/tests/guest/build-guest.sh" "$ROOT/target/guest" 2>"$WORK/build-guest.log" || {
    show_log "guest build" "$WORK/build-guest.log"
    die "building the guest image failed"
}
note "guest kernel $(cat "$ROOT/target/guest/kver"), initrd $(du -h "$ROOT/target/guest/initrd.img" | cut -f1)"
KERNEL=$ROOT/target/guest/kernel   # the PVH ELF image when there is one: boots ~3x faster under TCG
INITRD=$ROOT/target/guest/initrd.img

# ---------------------------------------------------------- 4. network ----
step "creating namespace $NS: veth mvh-peer ($PEER_IP/24) <-> mvh-lower + macvtap mvt0 (bridge, $GUEST_MAC)"
ip netns add "$NS" || die "cannot create network namespace $NS"
nsip() { ip -n "$NS" "$@"; }
nsip link set lo up
nsip link add mvh-peer type veth peer name mvh-lower || die "cannot create a veth pair (CONFIG_VETH)"
nsip addr add "$PEER_IP/24" dev mvh-peer
nsip link add link mvh-lower name mvt0 type macvtap mode bridge ||
    die "cannot create a macvtap (CONFIG_MACVTAP; try: modprobe macvtap)"
nsip link set mvt0 address "$GUEST_MAC"
nsip link set mvh-peer up
nsip link set mvh-lower up
nsip link set mvt0 up

# --------------------------------------------------------- 5. backend ----
SOCK=$WORK/vhost-user.sock
CTL=$WORK/control.sock
NETDEV=()
if [ "$BACKEND" = macvhost ]; then
    step "starting macvhost in $NS on mvt0 ($QUEUES queue pairs), socket $SOCK"
    ip netns exec "$NS" "$BIN" --socket-path "$SOCK" --macvtap mvt0 --queues "$QUEUES" \
        --control-socket "$CTL" >"$WORK/macvhost.log" 2>&1 &
    MACVHOST_PID=$!
    for _ in $(seq 100); do
        [ -S "$SOCK" ] && break
        kill -0 "$MACVHOST_PID" 2>/dev/null || {
            show_log macvhost "$WORK/macvhost.log"
            die "macvhost exited during startup"
        }
        sleep 0.1
    done
    [ -S "$SOCK" ] || {
        show_log macvhost "$WORK/macvhost.log"
        die "macvhost did not create $SOCK within 10 s"
    }
    NETDEV=(-chardev "socket,id=c0,path=$SOCK,reconnect=1"
        -netdev "vhost-user,id=n0,chardev=c0,queues=$QUEUES")
else
    step "reference backend: QEMU's own virtio-net on mvt0 (no macvhost)"
    # /dev/tapN is named after the ifindex, which is per namespace: another
    # namespace's macvtap may own that name. Use a private node made from our
    # macvtap's own device number instead.
    devno=$(ip netns exec "$NS" sh -c 'cat /sys/class/net/mvt0/macvtap/tap*/dev')
    TAPDEV=$WORK/mvt0-tapdev
    mknod "$TAPDEV" c "${devno%%:*}" "${devno##*:}" || die "mknod $TAPDEV failed"
    fds=""
    for q in $(seq 0 $((QUEUES - 1))); do
        fd=$((10 + q))
        eval "exec $fd<>\"$TAPDEV\""
        fds=${fds:+$fds:}$fd
    done
    NETDEV=(-netdev "tap,id=n0,fds=$fds,vhost=off")
fi

# --------------------------------------------------------------- 6. VM ----
probe_kvm() {
    [ -r /dev/kvm ] && [ -w /dev/kvm ] || return 1
    local boot_id cache=$ROOT/target/guest/kvm-probe
    boot_id=$(cat /proc/sys/kernel/random/boot_id 2>/dev/null || true)
    if [ -r "$cache" ] && [ "$(cut -d' ' -f1 "$cache")" = "$boot_id" ]; then
        [ "$(cut -d' ' -f2 "$cache")" = yes ]
        return
    fi
    echo 'result probe ok' >"$WORK/probe.sh"
    local verdict=no
    if timeout 20 qemu-system-x86_64 -accel kvm -cpu host -machine q35 -m 256 -smp 1 -nodefaults \
        -display none -monitor none -no-reboot -kernel "$KERNEL" -initrd "$INITRD" \
        -append 'console=ttyS0 quiet loglevel=3' -serial "file:$WORK/probe.log" \
        -fw_cfg "name=opt/macvhost/script,file=$WORK/probe.sh" </dev/null >/dev/null 2>&1 &&
        grep -q 'MVH-RESULT probe=ok' "$WORK/probe.log"; then
        verdict=yes
    fi
    echo "$boot_id $verdict" >"$cache"
    [ $verdict = yes ]
}
case ${MACVHOST_ACCEL:-auto} in
kvm) ACCEL=(-accel kvm -cpu host) ;;
tcg) ACCEL=(-accel tcg -cpu max) ;;
auto)
    if probe_kvm; then ACCEL=(-accel kvm -cpu host); else ACCEL=(-accel tcg -cpu max); fi
    ;;
*) die "MACVHOST_ACCEL must be kvm, tcg or auto" ;;
esac

cat >"$WORK/guest.sh" <<EOF
echo "eth0: \$(cat /sys/class/net/\$MVH_IFACE/address) \$MVH_IP; offloads: \$(ethtool -k \$MVH_IFACE | awk '/^(rx-checksumming|tx-checksumming|tcp-segmentation-offload):/ { printf "%s %s  ", \$1, \$2 }')"
if ping -c 3 -W 5 \$MVH_PEER; then result ping ok; else result ping FAILED; fi
for dir in "" -R; do
    ok=0
    for try in 1 2 3 4 5; do
        if iperf3 -c \$MVH_PEER -p 5201 -t $IPERF_SECS -f m \$dir >/tmp/iperf.txt 2>&1; then ok=1; break; fi
        sleep 1
    done
    if [ \$ok = 1 ]; then grep -E 'sender|receiver' /tmp/iperf.txt; else tail -n 5 /tmp/iperf.txt; fi
    mbps=\$(awk '/receiver/ { print \$7 }' /tmp/iperf.txt)
    if [ -z "\$dir" ]; then result tx_mbps \${mbps:-FAILED}; else result rx_mbps \${mbps:-FAILED}; fi
done
ethtool -S \$MVH_IFACE | grep -E '(rx|tx)_queue_[0-9]+_(packets|bytes):'
EOF

step "starting iperf3 server on $PEER_IP:5201 in $NS"
ip netns exec "$NS" iperf3 -s -B "$PEER_IP" -p 5201 >"$WORK/iperf3-server.log" 2>&1 &
IPERF_PID=$!

LOG=$WORK/serial.log
: >"$LOG"
# QEMU 7.2 crashes when a vhost(-user) NIC uses MSI-X without KVM's irqchip: INTx under TCG.
VECTORS=$((2 * QUEUES + 2))
if [ "$BACKEND" = macvhost ] && [ "${ACCEL[1]}" = tcg ]; then VECTORS=0; fi
step "booting the guest (${ACCEL[1]}, 2 vCPUs, 512 MiB, $QUEUES queue pairs, guest $GUEST_IP)"
# shellcheck disable=SC2054 # the commas are QEMU's
QEMU_CMD=(qemu-system-x86_64 "${ACCEL[@]}" -machine q35 -smp 2 -m 512
    -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem
    -nodefaults -display none -monitor none -no-reboot
    -kernel "$KERNEL" -initrd "$INITRD"
    -append "console=ttyS0 quiet loglevel=3 mitigations=off panic=-1 mvh.mac=$GUEST_MAC mvh.ip=$GUEST_IP/24 mvh.peer=$PEER_IP"
    -serial "file:$LOG"
    "${NETDEV[@]}"
    -device "virtio-net-pci,netdev=n0,mac=$GUEST_MAC,mq=on,vectors=$VECTORS,romfile="
    -fw_cfg "name=opt/macvhost/script,file=$WORK/guest.sh")
printf '%q ' "${QEMU_CMD[@]}" >"$WORK/qemu-cmdline"
"${QEMU_CMD[@]}" </dev/null >"$WORK/qemu.log" 2>&1 &
QEMU_PID=$!
started=$(date +%s)

# Follow the guest's console until it powers off. In the background + wait,
# so that Ctrl-C reaches the trap at once.
timeout "$GUEST_TIMEOUT" tail -n +1 -F --pid="$QEMU_PID" "$LOG" 2>/dev/null |
    sed -u -n -e 's/\r$//' -e '/MVH-READY/,/MVH-DONE/ { s/^.*\(MVH-\)/\1/; s/^/    guest| /; p }' &
FOLLOW_PID=$!
wait "$FOLLOW_PID" || true
FOLLOW_PID=""
if kill -0 "$QEMU_PID" 2>/dev/null; then
    show_log "guest console" "$LOG"
    die "the guest did not finish within $GUEST_TIMEOUT s"
fi
wait "$QEMU_PID" || true
QEMU_PID=""
grep -q 'MVH-DONE rc=0' "$LOG" || {
    show_log "qemu" "$WORK/qemu.log"
    show_log "guest console" "$LOG"
    [ -n "$MACVHOST_PID" ] && show_log macvhost "$WORK/macvhost.log"
    die "the guest run failed"
}
res() { sed -n "s/.*MVH-RESULT $1=//p" "$LOG" | tr -d '\r' | tail -n1; }
step "guest finished in $(($(date +%s) - started)) s: ping $(res ping); iperf3 guest->peer $(res tx_mbps) Mbit/s, peer->guest $(res rx_mbps) Mbit/s"

# ---------------------------------------------------------- 7. counters ----
if [ "$BACKEND" = macvhost ]; then
    step "macvhost per-queue counters (macvhost stats $CTL)"
    "$BIN" stats "$CTL" | sed 's/^/    /' || note "(macvhost stats failed)"
fi
step "macvtap mvt0 counters (ip -s link)"
ip -n "$NS" -s link show mvt0 | sed 's/^/    /'

[ "$(res ping)" = ok ] || die "ping through the macvtap failed"
case $(res tx_mbps)$(res rx_mbps) in *FAILED*) die "iperf3 through the macvtap failed" ;; esac
step "success"
