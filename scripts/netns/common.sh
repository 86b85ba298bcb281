# Shared names of the one-machine "cluster" (sourced by up.sh, down.sh, rsh.sh).
# Host i is the network namespace moe-h<i> with address 10.213.0.(10+i)/24 on a veth whose
# other end is enslaved to the bridge moe-br0 in the root namespace; the root namespace has
# 10.213.0.1 on the bridge so that an mpirun started there reaches the orteds.
NETNS_PREFIX="moe-h"
NETNS_BRIDGE="moe-br0"
NETNS_SUBNET="10.213.0"
NETNS_ROOT_ADDR="${NETNS_SUBNET}.1"
NETNS_HOST_BASE=10
# At most this many hosts: addresses 10..(10+NETNS_MAX_HOSTS-1) stay inside the /24.
NETNS_MAX_HOSTS=64

netns_require_root() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "netns: must run as root (network namespaces need CAP_SYS_ADMIN/CAP_NET_ADMIN)" >&2
        exit 77
    fi
    if ! command -v ip >/dev/null 2>&1; then
        echo "netns: 'ip' not found (install iproute2)" >&2
        exit 77
    fi
}

# Lists the namespaces this project created (moe-h<digits>), one per line.
netns_existing() {
    ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${NETNS_PREFIX}[0-9]+$" || true
}
