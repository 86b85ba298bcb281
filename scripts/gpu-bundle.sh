#!/usr/bin/env bash
# Builds here and gathers into gpu-bundle/ (ignored by git) what scripts/gpu-check.sh needs on
# a lent GPU machine that has PyTorch 2.11 with CUDA but no Rust toolchain: the `moe` binary,
# the test executables whose CUDA branches it runs, and the system libraries they link that
# such a machine may lack (OpenMPI's). libtorch and NVIDIA's libraries are NOT bundled: the
# check points the executables at that machine's own torch/lib.
#
# Then, with the device tool: run  bash scripts/gpu-check.sh  carrying ["gpu-bundle"].
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/env.sh
source scripts/env.sh
out=gpu-bundle
limit_mib=60 # the device tool carries 64 MiB in all, the working tree included

# The test executables gpu-check.sh runs: (target name, target kind) -> file name.
tests='{"moe_comm lib": "comm_unit", "nccl_conformance test": "nccl_conformance",
  "router test": "router", "experts_grouped test": "experts_grouped", "moe bin": "launch_unit"}'

# Whole-workspace builds only: a build of one package unifies features differently and
# rebuilds shared libraries, which would leave other test binaries (and examples) stale.
cargo build --release --workspace --bins --examples
rm -rf "$out"
mkdir -p "$out/bin" "$out/tests" "$out/lib"
cp target/release/moe "$out/bin/moe"

# Their paths, from cargo's own report (names carry a hash).
cargo test --release --workspace --no-run --message-format=json 2>/dev/null |
  WANT=$tests python3 -c '
import json, os, sys
want = json.loads(os.environ["WANT"])
found = {}
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") != "compiler-artifact" or not m.get("executable") or not m["profile"]["test"]:
        continue
    key = m["target"]["name"] + " " + m["target"]["kind"][0]
    if key in want:
        found[want[key]] = m["executable"]
missing = sorted(set(want.values()) - set(found))
if missing:
    sys.exit("gpu-bundle: no test executable for " + ", ".join(missing))
for name, exe in sorted(found.items()):
    print(name, exe)
' >"$out/.tests"
while read -r name exe; do
  cp "$exe" "$out/tests/$name"
done <"$out/.tests"
rm "$out/.tests"

# System libraries linked by the executables, except the C/C++ runtime every machine has
# and libtorch's (taken from the GPU machine's torch).
for f in "$out"/bin/* "$out"/tests/*; do
  ldd "$f" | awk '$2 == "=>" && $3 ~ /^\// {print $3}'
done | sort -u | while read -r lib; do
  case "$lib" in
    */site-packages/*) ;;
    */libc.so.* | */libm.so.* | */libdl.so.* | */librt.so.* | */libpthread.so.* | */libutil.so.* | \
      */libgcc_s.so.* | */libstdc++.so.* | */ld-linux*) ;;
    *) cp -L "$lib" "$out/lib/" ;;
  esac
done

strip --strip-unneeded "$out"/bin/* "$out"/tests/* "$out"/lib/* 2>/dev/null || true
{
  echo "built from $(git rev-parse --short HEAD)$(git diff --quiet || echo '+changes') on $(date -u +%FT%TZ)"
  echo "libtorch at build time: $LIBTORCH"
  (cd "$out" && find . -type f -printf '%s %p\n' | sort -k2)
} >"$out/MANIFEST"
size_kib=$(du -sk "$out" | cut -f1)
echo "gpu-bundle: $out/ holds $((size_kib / 1024)) MiB (limit ${limit_mib} MiB):"
(cd "$out" && ls -l bin tests lib)
if [ "$size_kib" -gt $((limit_mib * 1024)) ]; then
  echo "gpu-bundle: $out/ is larger than ${limit_mib} MiB; the device tool would refuse it" >&2
  exit 1
fi
