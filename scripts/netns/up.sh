#!/usr/bin/env bash
# Creates N network namespaces moe-h0..moe-h(N-1), each a "host" of a test cluster on this
# machine: 10.213.0.(10+i)/24 on a veth to the bridge moe-br0 (root namespace, 10.213.0.1),
# loopback up, hostname moe-h<i> for processes started through rsh.sh. Idempotent: what
# exists is kept and re-configured; hosts >= N left over from a larger run are removed.
# Exit status 77 means "cannot run here" (not root, no ip netns): callers skip on it.
#
#   scripts/netns/up.sh 2      # then: scripts/netns/rsh.sh 10.213.0.11 hostname
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$here/common.sh"

n="${1:-2}"
if ! [[ "$n" =~ ^[0-9]+$ ]] || [ "$n" -lt 1 ] || [ "$n" -gt "$NETNS_MAX_HOSTS" ]; then
    echo "usage: $0 N   (1 <= N <= $NETNS_MAX_HOSTS)" >&2
    exit 2
fi
netns_require_root

# A half-built cluster is worse than none: tear everything down if any step fails.
ok=0
cleanup() { if [ "$ok" -ne 1 ]; then echo "netns: up.sh failed, removing partial setup" >&2; "$here/down.sh" || true; fi; }
trap cleanup EXIT

if ! ip link show "$NETNS_BRIDGE" >/dev/null 2>&1; then
    ip link add "$NETNS_BRIDGE" type bridge
fi
ip addr replace "${NETNS_ROOT_ADDR}/24" dev "$NETNS_BRIDGE"
ip link set "$NETNS_BRIDGE" up

for ((i = 0; i < n; i++)); do
    ns="${NETNS_PREFIX}${i}"
    addr="${NETNS_SUBNET}.$((NETNS_HOST_BASE + i))"
    host_if="moe-v${i}"   # root-namespace end, on the bridge
    ns_if="moe-p${i}"     # namespace end
    if ! ip netns list | awk '{print $1}' | grep -qx "$ns"; then
        ip netns add "$ns"
    fi
    ip -n "$ns" link set lo up
    if ! ip -n "$ns" link show "$ns_if" >/dev/null 2>&1; then
        # A stale root end without its peer (namespace deleted by hand) blocks re-creation.
        ip link del "$host_if" >/dev/null 2>&1 || true
        ip link add "$host_if" type veth peer name "$ns_if"
        ip link set "$ns_if" netns "$ns"
    fi
    ip link set "$host_if" master "$NETNS_BRIDGE"
    ip link set "$host_if" up
    ip -n "$ns" addr replace "${addr}/24" dev "$ns_if"
    ip -n "$ns" link set "$ns_if" up
done

# Hosts beyond N from an earlier, larger cluster.
for ns in $(netns_existing); do
    i="${ns#"$NETNS_PREFIX"}"
    if [ "$i" -ge "$n" ]; then
        ip netns del "$ns" || true
        ip link del "moe-v${i}" >/dev/null 2>&1 || true
    fi
done

ok=1
echo "netns: $n hosts up: $(for ((i = 0; i < n; i++)); do printf '%s=%s ' "${NETNS_PREFIX}${i}" "${NETNS_SUBNET}.$((NETNS_HOST_BASE + i))"; done)"
