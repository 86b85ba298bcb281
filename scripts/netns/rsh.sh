#!/usr/bin/env bash
# The "ssh" of the one-machine cluster: mpirun's rsh agent (`--mca plm_rsh_agent
# scripts/netns/rsh.sh`). mpirun calls `agent [ssh options] <host> <command words...>`, like
# ssh it expects the words to be joined and run by a shell on <host>. <host> is an address
# 10.213.0.(10+i) or a name moe-h<i>; the command runs in namespace moe-h<i>, in its own UTS
# namespace with hostname moe-h<i> (a real node has its own name; OpenMPI keys nodes and
# session directories by it).
#
# Environment: ssh would start from a login environment; here the remote command inherits
# PATH, LD_LIBRARY_PATH, HOME and the OMPI_*, RUST_*, MOE_*, LIBTORCH* variables of mpirun
# (the orted and the ranks need them: OMPI_ALLOW_RUN_AS_ROOT*, user MCA params) and nothing
# else, so a test does not pass only because of variables a real remote node lacks.
#
#   scripts/netns/rsh.sh 10.213.0.11 hostname
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$here/common.sh"

# ssh-style options mpirun may add before the host (-x, -T, -n, -l user); none matter here.
while [ $# -gt 0 ]; do
    case "$1" in
        -l | -p | -o | -i) shift 2 ;;
        -*) shift ;;
        *) break ;;
    esac
done
if [ $# -lt 2 ]; then
    echo "usage: $0 <host> <command...>" >&2
    exit 255
fi
host="$1"
shift
host="${host#*@}" # user@host

case "$host" in
    "${NETNS_SUBNET}".*)
        last="${host##*.}"
        if ! [[ "$last" =~ ^[0-9]+$ ]] || [ "$last" -lt "$NETNS_HOST_BASE" ]; then
            echo "rsh.sh: $host is not a test host (${NETNS_SUBNET}.${NETNS_HOST_BASE}..)" >&2
            exit 255
        fi
        i=$((last - NETNS_HOST_BASE))
        ;;
    "${NETNS_PREFIX}"[0-9]*)
        i="${host#"$NETNS_PREFIX"}"
        ;;
    *)
        echo "rsh.sh: unknown host '$host' (expected ${NETNS_SUBNET}.<10+i> or ${NETNS_PREFIX}<i>)" >&2
        exit 255
        ;;
esac
ns="${NETNS_PREFIX}${i}"
if ! ip netns list | awk '{print $1}' | grep -qx "$ns"; then
    echo "rsh.sh: namespace $ns for host $host does not exist (run scripts/netns/up.sh)" >&2
    exit 255
fi

# The environment the remote side gets (see above).
keep=(PATH LD_LIBRARY_PATH HOME USER LOGNAME TMPDIR LANG TERM)
envargs=()
for v in "${keep[@]}"; do
    if [ -n "${!v+x}" ]; then envargs+=("$v=${!v}"); fi
done
while IFS= read -r v; do
    envargs+=("$v=${!v}")
done < <(compgen -e | grep -E '^(OMPI_|RUST_|MOE_|LIBTORCH)' || true)

if [ -n "${MOE_NETNS_RSH_LOG:-}" ]; then
    printf '%s host=%s ns=%s cmd=%s\n' "$(date +%T)" "$host" "$ns" "$*" >>"$MOE_NETNS_RSH_LOG"
fi

# Joined like ssh joins its arguments; `exec` so that mpirun's signals reach the command.
exec ip netns exec "$ns" unshare --uts env -i "${envargs[@]}" \
    sh -c 'hostname "$1" && shift && exec sh -c "$*"' rsh "$ns" "$*"
