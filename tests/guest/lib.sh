# Helpers sourced by /init before every guest script or interactive command.
# shellcheck shell=sh disable=SC1091
. /etc/mvh/env
export MVH_IFACE MVH_MAC MVH_IP MVH_PEER

# result NAME VALUE...  -> "MVH-RESULT NAME=VALUE" (collected by the host)
result() {
    _n=$1
    shift
    echo "MVH-RESULT $_n=$*"
}

# fail TEXT...  -> "MVH-FAIL TEXT" and exit 1 from the script
fail() {
    echo "MVH-FAIL $*"
    exit 1
}

# now_ms: guest uptime in milliseconds (10 ms resolution)
now_ms() {
    awk '{ printf "%d\n", $1 * 1000 }' /proc/uptime
}

# sha256 FILE|-  -> just the hex digest
sha256() {
    sha256sum "${1:--}" | cut -d' ' -f1
}
