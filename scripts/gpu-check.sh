#!/usr/bin/env bash
# One call on a lent GPU machine (PyTorch 2.11 with CUDA, no Rust toolchain) that checks the
# GPU path end to end and prints a PASS/FAIL/SKIP table (also $OUT/gpu-check.txt, with every
# check's log in $OUT/gpu-check.log, when $OUT is set).
#
#   here:   make gpu-bundle        (builds; gathers gpu-bundle/: moe, test executables, libs)
#   there:  the device tool's run with command "bash scripts/gpu-check.sh", carry
#           ["gpu-bundle"] and timeout_s 540, from the checkout the session started in
#           (the one the tool sends), after `make gpu-bundle` there
#
# Checks: the driver and libraries (nvidia-smi, libtorch_cuda loads and sees the GPU,
# libnccl.so.2 found), the quickstart trained 20 steps on cuda in fp32 and in bf16 (the
# start-up line must name the GPU), debug mode at EP=2 on the GPU, the CUDA branches of the
# router and grouped-experts tests and NCCL conformance at world size 1 (MOE_REQUIRE_CUDA=1:
# a CUDA variant that cannot run fails), and `moe bench layer` on CUDA. Every check has its
# own timeout and the whole run a budget (GPU_CHECK_BUDGET_S, default 450 s: the device tool
# allows 8 minutes for this call), so nothing hangs. Exit status 1 when any check failed.
#
# Run on a machine without a GPU it reports the CUDA checks as FAIL with the reason (a dry
# run of the script itself).
# The check functions are called indirectly ("check_$name"):
# shellcheck disable=SC2317
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)
BUNDLE=${MOE_GPU_BUNDLE:-$ROOT/gpu-bundle}
BUDGET=${GPU_CHECK_BUDGET_S:-450}
WORK=${GPU_CHECK_WORK:-$(mktemp -d /tmp/moe-gpu-check.XXXXXX)}
MOE=$BUNDLE/bin/moe
TESTS=$BUNDLE/tests
export ROOT BUNDLE WORK MOE TESTS

# ---------------------------------------------------------------- one check, in a child
# `gpu-check.sh --one NAME` runs check_NAME: exit 0 PASS, 77 SKIP, anything else FAIL; the
# last line of its output is the table's note.

skip() {
  echo "$1"
  exit 77
}

fail() {
  echo "$1"
  exit 1
}

check_driver() {
  command -v nvidia-smi >/dev/null || fail "no nvidia-smi on PATH: no NVIDIA driver"
  local q
  q=$(nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader) ||
    fail "nvidia-smi failed"
  echo "$q"
  local warn
  warn=$(bash scripts/check-driver.sh 2>&1)
  [ -z "$warn" ] || fail "$warn"
  echo "$q" | head -n 1 | cut -d, -f2-3 | sed 's/^ *//'
}

check_bundle() {
  [ -x "$MOE" ] || fail "$MOE missing: run 'make gpu-bundle' here and carry gpu-bundle"
  local missing
  missing=$(for f in "$MOE" "$TESTS"/*; do ldd "$f" | grep 'not found'; done | sort -u)
  [ -z "$missing" ] || fail "unresolved libraries: $(echo "$missing" | tr -s ' \t\n' ' ')"
  "$MOE" --help >/dev/null || fail "moe --help failed"
  head -n 1 "$BUNDLE/MANIFEST" 2>/dev/null
}

check_libtorch_cuda() {
  [ -f "$MOE_LIBTORCH_LIB/libtorch_cuda.so" ] ||
    fail "no libtorch_cuda.so in $MOE_LIBTORCH_LIB"
  # The library's own loader and torch's device count, required (a failure names the
  # library that did not load); then the driver probe, required to find the GPU.
  export MOE_REQUIRE_CUDA=1
  local out
  out=$("$TESTS/comm_unit" cuda:: --nocapture 2>&1)
  local rc=$?
  echo "$out"
  [ "$rc" -eq 0 ] || fail "$(first_failure "$out" "$rc")"
  out=$("$TESTS/launch_unit" gpu_driver::tests::the_probe_runs_here --nocapture 2>&1)
  rc=$?
  echo "$out"
  [ "$rc" -eq 0 ] || fail "driver probe: $(first_failure "$out" "$rc")"
  echo "libtorch_cuda loads from $MOE_LIBTORCH_LIB and sees the GPU"
}

check_libnccl() {
  [ -n "$NCCL_DIR" ] || fail "libnccl.so.2 not found under torch's site-packages"
  local out
  out=$("$TESTS/comm_unit" nccl::tests::probe --nocapture 2>&1)
  echo "$out"
  echo "$out" | grep -q "libnccl.so.2 is loadable" || fail "moe-comm cannot load libnccl.so.2"
  echo "libnccl.so.2 in $NCCL_DIR, loaded by moe-comm"
}

# The quickstart, 20 steps on cuda, with extra --set overrides; the start-up line must name
# the GPU and the run must end with 20 steps done.
train_quickstart() {
  local tag=$1
  shift
  local out
  out=$("$MOE" train --config configs/quickstart.yaml --set trainer.device=cuda \
    --set trainer.max_steps=20 --set trainer.warmup_steps=5 --set trainer.eval_every=10 \
    --set trainer.log_every=5 --set checkpoint.every=20 \
    --set "run.out_dir=$WORK/train-$tag" "$@" 2>&1)
  local rc=$?
  echo "$out"
  [ "$rc" -eq 0 ] || fail "moe train exited $rc: $(echo "$out" | grep -m1 'error' || echo "$out" | tail -n 1)"
  echo "$out" | grep -q "device cuda:0 (.*)" || fail "the start-up line does not name the GPU"
  echo "$out" | grep -q "^done: 20 steps" || fail "no 'done: 20 steps' line"
  echo "$(echo "$out" | grep -o 'device cuda:0 ([^)]*)'); $(echo "$out" | grep '^done:' | cut -d';' -f1)"
}

check_train_fp32() {
  train_quickstart fp32
}

check_train_bf16() {
  train_quickstart bf16 --set trainer.precision=bf16
}

check_debug_ep2() {
  local out
  # parallel.timeout_s ends a stuck exchange well inside this check's own timeout.
  out=$("$MOE" train --debug --config configs/debug.yaml --set trainer.device=cuda \
    --set parallel.ep_size=2 --set trainer.max_steps=6 --set trainer.warmup_steps=1 \
    --set trainer.eval_every=3 --set parallel.timeout_s=30 \
    --set "run.out_dir=$WORK/debug-ep2" 2>&1)
  local rc=$?
  echo "$out"
  [ "$rc" -eq 0 ] || fail "moe train --debug exited $rc: $(echo "$out" | grep -m1 'error' || echo "$out" | tail -n 1)"
  # Virtual ranks on a GPU (parallel.debug_ranks auto), in-process rank threads on a CPU.
  echo "$out" | grep -qE "debug mode: 2 (virtual )?expert-parallel" || fail "not in debug mode at EP=2"
  echo "$out" | grep -q "device cuda:0 (" || fail "debug mode did not run on cuda:0"
  echo "$out" | grep '^done:' | cut -d';' -f1
}

# The most telling line of a failed test executable's output.
first_failure() {
  echo "$1" | grep -m1 'MOE_REQUIRE_CUDA=1 but' ||
    echo "$1" | grep -m1 -A1 'panicked' | tr '\n' ' ' ||
    echo "exit $2"
}

# A test executable's CUDA variants, required to run.
run_tests() {
  local exe=$1
  shift
  local out
  out=$(MOE_REQUIRE_CUDA=1 "$TESTS/$exe" "$@" 2>&1)
  local rc=$?
  echo "$out"
  [ "$rc" -eq 0 ] || fail "$(first_failure "$out" "$rc")"
  echo "$out" | grep -q "skipped on cuda" && fail "a CUDA variant was skipped"
  echo "$out" | grep -E '^test result' | tail -n 1
}

check_router_cuda() {
  run_tests router
}

check_experts_cuda() {
  run_tests experts_grouped
}

check_nccl_ws1() {
  run_tests nccl_conformance
}

check_bench_layer() {
  "$MOE" bench --help | grep -q -- '--device' ||
    skip "moe bench layer has no --device option in this build: it runs on the CPU only"
  local out
  out=$("$MOE" bench layer --device cuda --iters 10 --warmup 3 --no-memory --threads 1 2>&1)
  local rc=$?
  echo "$out"
  [ "$rc" -eq 0 ] || fail "moe bench layer exited $rc"
  echo "$out" | tail -n 1
}

if [ "${1:-}" = "--one" ]; then
  "check_$2"
  exit $?
fi

# ---------------------------------------------------------------- environment

# Torch's lib dir: MOE_LIBTORCH_LIB, else the python3 that has torch (the GPU image's
# /opt/torch/.venv), else this checkout's .venv.
find_torch_lib() {
  if [ -n "${MOE_LIBTORCH_LIB:-}" ] && [ -d "$MOE_LIBTORCH_LIB" ]; then
    echo "$MOE_LIBTORCH_LIB"
    return
  fi
  local d
  d=$(timeout 60 python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))' 2>/dev/null)
  if [ -n "$d" ] && [ -d "$d" ]; then
    echo "$d"
    return
  fi
  for d in /opt/torch/.venv/lib/python3*/site-packages/torch/lib "$ROOT"/.venv/lib/python3*/site-packages/torch/lib; do
    if [ -d "$d" ]; then
      echo "$d"
      return
    fi
  done
}

MOE_LIBTORCH_LIB=$(find_torch_lib)
SITE=${MOE_LIBTORCH_LIB%/torch/lib}
NCCL_DIR=$(dirname "$(find "$SITE/nvidia" -maxdepth 4 -name 'libnccl.so.2' 2>/dev/null | head -n 1)" 2>/dev/null)
[ "$NCCL_DIR" = "." ] && NCCL_DIR=""
# The bundle's libraries first (the OpenMPI the executables were linked against), then the
# GPU machine's torch and NCCL.
LD_LIBRARY_PATH="$BUNDLE/lib:${MOE_LIBTORCH_LIB}${NCCL_DIR:+:$NCCL_DIR}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export MOE_LIBTORCH_LIB NCCL_DIR LD_LIBRARY_PATH

echo "gpu-check: torch lib ${MOE_LIBTORCH_LIB:-(not found)}, NCCL ${NCCL_DIR:-(not found)}, work dir $WORK, budget ${BUDGET} s"

# ---------------------------------------------------------------- the run

# name  timeout_s
checks=(
  "driver 30"
  "bundle 30"
  "libtorch_cuda 90"
  "libnccl 60"
  "train_fp32 120"
  "train_bf16 120"
  "debug_ep2 90"
  "router_cuda 90"
  "experts_cuda 90"
  "nccl_ws1 90"
  "bench_layer 90"
)

LOG=$WORK/gpu-check.log
TABLE=$WORK/gpu-check.txt
: >"$LOG"
results=()
failed=0
start=$SECONDS
for c in "${checks[@]}"; do
  read -r name limit <<<"$c"
  left=$((BUDGET - (SECONDS - start)))
  if [ "$left" -lt 15 ]; then
    results+=("$name|SKIP|0|no time left in the ${BUDGET} s budget")
    continue
  fi
  [ "$limit" -le "$((left - 5))" ] || limit=$((left - 5))
  t0=$SECONDS
  out=$(timeout -k 5 "$limit" bash "$ROOT/scripts/gpu-check.sh" --one "$name" 2>&1)
  rc=$?
  secs=$((SECONDS - t0))
  note=$(printf '%s\n' "$out" | sed '/^[[:space:]]*$/d' | tail -n 1 | cut -c1-220)
  case $rc in
    0) status=PASS ;;
    77) status=SKIP ;;
    124 | 137)
      status=FAIL
      note="timed out after ${limit} s: ${note}"
      ;;
    *) status=FAIL ;;
  esac
  [ "$status" = FAIL ] && failed=1
  results+=("$name|$status|$secs|$note")
  {
    echo "=============== $name: $status (exit $rc, ${secs} s)"
    printf '%s\n' "$out" | tail -n 150
  } >>"$LOG"
  echo "gpu-check: $name: $status (${secs} s)"
done

{
  echo "gpu-check on $(hostname) at $(date -u +%FT%TZ), $(head -n 1 "$BUNDLE/MANIFEST" 2>/dev/null)"
  printf '%-14s %-5s %5s  %s\n' check result secs note
  for r in "${results[@]}"; do
    IFS='|' read -r name status secs note <<<"$r"
    printf '%-14s %-5s %5s  %s\n' "$name" "$status" "$secs" "$note"
  done
} >"$TABLE"
echo
cat "$TABLE"
if [ -n "${OUT:-}" ]; then
  cp "$TABLE" "$LOG" "$OUT/" 2>/dev/null || true
fi
exit "$failed"
