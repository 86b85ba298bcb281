#!/usr/bin/env bash
# Removes every namespace moe-h<i>, its veth and the bridge moe-br0 created by up.sh.
# Idempotent: succeeds when nothing is there. Kills processes still running inside a
# namespace first (a stray orted would otherwise keep its veth alive).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$here/common.sh"
netns_require_root

for ns in $(netns_existing); do
    pids="$(ip netns pids "$ns" 2>/dev/null || true)"
    if [ -n "$pids" ]; then
        # shellcheck disable=SC2086
        kill -TERM $pids 2>/dev/null || true
        sleep 0.5
        pids="$(ip netns pids "$ns" 2>/dev/null || true)"
        # shellcheck disable=SC2086
        [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
    fi
    ip netns del "$ns" || true
done
# Deleting a namespace deletes its veth end and so the pair; these catch leftovers.
for link in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | sed 's/@.*//' | grep -E '^moe-v[0-9]+$' || true); do
    ip link del "$link" >/dev/null 2>&1 || true
done
if ip link show "$NETNS_BRIDGE" >/dev/null 2>&1; then
    ip link del "$NETNS_BRIDGE"
fi
echo "netns: down"
