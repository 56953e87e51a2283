#!/bin/sh
# /init of the macvhost test guest (busybox sh, PID 1).
#
# Kernel command line parameters (all optional):
#   mvh.mac=52:54:00:12:34:56  pick the interface with this MAC (default: eth0)
#   mvh.ip=10.199.0.2/24       address to put on it (default: none)
#   mvh.peer=10.199.0.1        host-side peer, exported as $MVH_PEER to scripts
#   mvh.mtu=1500               MTU to set
#   mvh.tty=ttyS0              line used for the command channel
#
# Then one of:
#   * batch:       a script given with -fw_cfg name=opt/macvhost/script,file=F
#                  is run, "MVH-DONE rc=N" is printed and the guest powers off;
#   * interactive: (no script) a command loop on the serial line, see
#                  tests/support/guest.rs for the protocol:
#                    guest: MVH-PROMPT
#                    host:  MVH-CMD <id>\n <script lines>\n MVH-EOF <id>\n
#                    guest: <output> \n MVH-END <id> rc=<status>
#
# Everything machine-readable starts with "MVH-" at the start of a line:
#   MVH-READY iface=eth0 mac=.. link=up uptime=S   network is configured
#   MVH-RESULT name=value                  printed by scripts via `result`
#   MVH-ERROR text                         something in /init went wrong
# shellcheck disable=SC1091,SC2013
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
export HOME=/root
umask 022

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null || mdev -s
mkdir -p /dev/pts /dev/shm /tmp /run
mount -t devpts devpts /dev/pts 2>/dev/null
# Keep the console quiet: only errors and worse from the kernel.
echo "3 4 1 3" >/proc/sys/kernel/printk

MVH_MAC=""
MVH_IP=""
MVH_PEER=""
MVH_MTU=""
MVH_TTY=ttyS0
for arg in $(cat /proc/cmdline); do
    case $arg in
    mvh.mac=*) MVH_MAC=${arg#mvh.mac=} ;;
    mvh.ip=*) MVH_IP=${arg#mvh.ip=} ;;
    mvh.peer=*) MVH_PEER=${arg#mvh.peer=} ;;
    mvh.mtu=*) MVH_MTU=${arg#mvh.mtu=} ;;
    mvh.tty=*) MVH_TTY=${arg#mvh.tty=} ;;
    esac
done

if [ -c "/dev/$MVH_TTY" ]; then
    exec </dev/"$MVH_TTY" >/dev/"$MVH_TTY" 2>&1
fi

while read -r m; do
    insmod "/lib/modules/$m.ko" || echo "MVH-ERROR insmod $m failed"
done </etc/mvh/modules

hostname mvh-guest
ip link set lo up

# Is there a virtio-net PCI function at all (vendor 1af4, device 1000/1041)?
have_nic=0
for d in /sys/bus/pci/devices/*; do
    [ "$(cat "$d/vendor" 2>/dev/null)" = 0x1af4 ] || continue
    case $(cat "$d/device" 2>/dev/null) in 0x1000 | 0x1041) have_nic=1 ;; esac
done

# Find the NIC (by MAC if given). Probing is synchronous, but allow for slow TCG.
MVH_IFACE=""
i=0
[ $have_nic = 1 ] || i=200
while [ $i -lt 200 ]; do
    for d in /sys/class/net/*; do
        n=${d##*/}
        [ "$n" = lo ] && continue
        if [ -z "$MVH_MAC" ]; then
            [ "$n" = eth0 ] && MVH_IFACE=$n
        elif [ "$(cat "$d/address")" = "$MVH_MAC" ]; then
            MVH_IFACE=$n
        fi
    done
    [ -n "$MVH_IFACE" ] && break
    i=$((i + 1))
    sleep 0.05
done

if [ -n "$MVH_IFACE" ]; then
    [ -n "$MVH_MTU" ] && ip link set dev "$MVH_IFACE" mtu "$MVH_MTU"
    [ -n "$MVH_IP" ] && ip addr add "$MVH_IP" dev "$MVH_IFACE"
    ip link set dev "$MVH_IFACE" up || echo "MVH-ERROR cannot bring up $MVH_IFACE"
    # Wait (up to 10 s) for the carrier so that READY means usable.
    i=0
    while [ $i -lt 200 ] && [ "$(cat "/sys/class/net/$MVH_IFACE/operstate")" != up ]; do
        i=$((i + 1))
        sleep 0.05
    done
elif [ $have_nic = 1 ]; then
    echo "MVH-ERROR no network interface (mac=${MVH_MAC:-any}); have: $(echo /sys/class/net/* | sed 's|/sys/class/net/||g')"
fi

cat >/etc/mvh/env <<EOF
MVH_IFACE='$MVH_IFACE'
MVH_MAC='$MVH_MAC'
MVH_IP='$MVH_IP'
MVH_PEER='$MVH_PEER'
EOF

mac=none
link=none
if [ -n "$MVH_IFACE" ]; then
    mac=$(cat "/sys/class/net/$MVH_IFACE/address")
    link=$(cat "/sys/class/net/$MVH_IFACE/operstate")
fi
echo "MVH-READY iface=${MVH_IFACE:-none} mac=$mac link=$link uptime=$(cut -d' ' -f1 /proc/uptime)"

shutdown_now() {
    sync
    poweroff -f
    sleep 3600
}

SCRIPT=/sys/firmware/qemu_fw_cfg/by_name/opt/macvhost/script/raw
if [ -r "$SCRIPT" ]; then
    cp "$SCRIPT" /tmp/mvh-script.sh
    (. /etc/mvh/lib.sh && . /tmp/mvh-script.sh) </dev/null 2>&1
    echo "MVH-DONE rc=$?"
    shutdown_now
fi

# Interactive command loop. Raw mode: no echo, no CR/LF translation, no
# signal characters, no line-length limit.
stty raw -echo 2>/dev/null
while :; do
    echo "MVH-PROMPT"
    IFS= read -r hdr || { sleep 1; continue; }
    case $hdr in
    "MVH-CMD "*) id=${hdr#MVH-CMD } ;;
    *) continue ;;
    esac
    : >/tmp/mvh-cmd.sh
    while IFS= read -r line; do
        [ "$line" = "MVH-EOF $id" ] && break
        printf '%s\n' "$line" >>/tmp/mvh-cmd.sh
    done
    (. /etc/mvh/lib.sh && . /tmp/mvh-cmd.sh) </dev/null 2>&1
    rc=$?
    printf '\nMVH-END %s rc=%s\n' "$id" "$rc"
done
