#!/usr/bin/env bash
# The "Compression" study of BENCHMARKS.md (issue 12), end to end, printing one table.
#
#   scripts/compression-study.sh                      # the study: 2000 steps, 300 recovery steps
#   STEPS=20 RECOVER=5 CALIB=2 SETS="model.d_model=32 moe.expert_hidden=32 model.max_seq_len=32 \
#     data.seq_len=32 trainer.batch_size=4" OUT=/tmp/study scripts/compression-study.sh   # toy
#
# 1. Trains the original MoE (configs/shakespeare.yaml: Shakespeare text, 8 experts top-2,
#    4 blocks) for STEPS steps.
# 2. Slims it: experts 8 -> 4 by random / frequency / weighted / frequency + merge; depth
#    4 -> 3 by Block Influence and by dropping the last block; expert width halved. Each is
#    evaluated before recovery, after RECOVER steps of plain training and after RECOVER steps
#    with distillation from the original (trainer.distill, alpha 1, T 2).
# 3. Upcycling: a dense model (FFN as wide as one expert) trained STEPS - RECOVER steps, upcycled
#    to 8 experts top-2 and trained RECOVER steps, against the original MoE at the same total of
#    STEPS steps.
# Validation losses are `moe eval`'s (trainer.eval_iters batches of the validation split).
#
# Environment: STEPS (2000), RECOVER (300), CALIB (8, calibration batches), OUT
# (runs/compression-study; must not hold an earlier study), CONFIG (configs/shakespeare.yaml),
# MOE (target/release/moe), SETS (extra space-separated key=value overrides for every run).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
STEPS=${STEPS:-2000}
RECOVER=${RECOVER:-300}
CALIB=${CALIB:-8}
OUT=${OUT:-$root/runs/compression-study}
CONFIG=${CONFIG:-$root/configs/shakespeare.yaml}
MOE=${MOE:-$root/target/release/moe}
SETS=${SETS:-}

[ -x "$MOE" ] || { echo "error: $MOE not built (cargo build --release -p moe-launch)" >&2; exit 2; }
[ "$RECOVER" -lt "$STEPS" ] || { echo "error: RECOVER ($RECOVER) must be below STEPS ($STEPS)" >&2; exit 2; }
if [ -e "$OUT" ] && [ -n "$(ls -A "$OUT")" ]; then
    echo "error: OUT $OUT is not empty (an earlier study?); choose another OUT" >&2
    exit 2
fi
mkdir -p "$OUT"
log="$OUT/study.log"
echo "compression study: STEPS=$STEPS RECOVER=$RECOVER CALIB=$CALIB OUT=$OUT (log: $log)"

sets=()
for kv in $SETS; do sets+=(--set "$kv"); done
quiet=(--set trainer.eval_every=0 --set checkpoint.every=0 --set checkpoint.keep=1 --progress plain)

run() { echo "+ $*" >>"$log"; "$@" >>"$log" 2>&1; }

# Validation loss of a checkpoint or run directory, as `moe eval` prints it.
val() { "$MOE" eval --checkpoint "$1" 2>>"$log" | tee -a "$log" | sed -n 's/^val_loss \([0-9.]*\).*/\1/p'; }

# A JSON field of a run's surgery.json.
field() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))$2)" "$1/surgery.json"; }

train() { # train NAME STEPS [args...]
    local name=$1 steps=$2
    shift 2
    run "$MOE" train --config "$CONFIG" "${sets[@]}" "${quiet[@]}" \
        --set "run.out_dir=$OUT/$name" --set "trainer.max_steps=$steps" "$@"
}

recover() { # recover NAME: NAME-plain and NAME-kd, RECOVER steps each from NAME's checkpoint
    local name=$1 warm=$((RECOVER / 10))
    for mode in plain kd; do
        local extra=()
        [ "$mode" = kd ] && extra=(--set "trainer.distill.teacher=$OUT/orig")
        run "$MOE" train --config "$OUT/$name/config.yaml" "${quiet[@]}" \
            --init-from "$OUT/$name" --set "run.out_dir=$OUT/$name-$mode" \
            --set "trainer.max_steps=$RECOVER" --set "trainer.warmup_steps=$warm" "${extra[@]}"
    done
}

rows=()
row() { # row NAME LABEL: params, val before, after plain recovery, after distillation
    local name=$1 label=$2
    rows+=("$(printf '%-32s %9s %9s %9s %9s %9s' "$label" \
        "$(field "$OUT/$name" "['after']['total_params']")" \
        "$(field "$OUT/$name" "['after']['active_params']")" \
        "$(val "$OUT/$name")" "$(val "$OUT/$name-plain")" "$(val "$OUT/$name-kd")")")
}

echo "[1/3] original MoE, $STEPS steps"
train orig "$STEPS"
orig_val=$(val "$OUT/orig")

echo "[2/3] slims (calibration: $CALIB batches) and their recoveries"
slim() { # slim NAME LABEL [slim args...]
    local name=$1 label=$2
    shift 2
    run "$MOE" slim --checkpoint "$OUT/orig" --calib-batches "$CALIB" --out "$OUT/$name" "$@"
    recover "$name"
    row "$name" "$label"
}
slim e4-random "experts 8->4 random" --experts 4 --expert-criterion random
slim e4-frequency "experts 8->4 frequency" --experts 4 --expert-criterion frequency
slim e4-weighted "experts 8->4 weighted" --experts 4 --expert-criterion weighted
slim e4-merge "experts 8->4 frequency+merge" --experts 4 --expert-criterion frequency --merge
layers=$(sed -n 's/^  num_layers: *\([0-9]*\).*/\1/p' "$OUT/orig/config.yaml" | head -1)
slim d-bi "depth $layers->$((layers - 1)) block influence" --drop-layers 1
slim d-last "depth $layers->$((layers - 1)) last block" --layers $((layers - 1))
hidden=$(sed -n 's/^  expert_hidden: *\([0-9]*\).*/\1/p' "$OUT/orig/config.yaml" | head -1)
slim w-half "expert width $hidden->$((hidden / 2))" --expert-hidden $((hidden / 2))

echo "[3/3] upcycling: dense $((STEPS - RECOVER)) steps + MoE $RECOVER steps vs MoE $STEPS steps"
train dense $((STEPS - RECOVER)) --set moe.num_experts=1 --set moe.top_k=1 \
    --set "model.ffn_hidden=$hidden"
dense_val=$(val "$OUT/dense")
run "$MOE" upcycle --checkpoint "$OUT/dense" --experts 8 --top-k 2 --out "$OUT/upcycled"
run "$MOE" train --config "$OUT/upcycled/config.yaml" "${quiet[@]}" --init-from "$OUT/upcycled" \
    --set "run.out_dir=$OUT/upcycled-train" --set "trainer.max_steps=$RECOVER" \
    --set "trainer.warmup_steps=$((RECOVER / 10))"
up_val=$(val "$OUT/upcycled-train")

echo
echo "original MoE after $STEPS steps: val_loss $orig_val ($(field "$OUT/e4-random" "['before']['total_params']") params, $(field "$OUT/e4-random" "['before']['active_params']") active)"
printf '%-32s %9s %9s %9s %9s %9s\n' "variant" "params" "active" "before" "+plain" "+distill"
for r in "${rows[@]}"; do echo "$r"; done
echo "(+plain / +distill: after $RECOVER recovery steps without / with distillation from the original)"
echo
echo "dense $((STEPS - RECOVER)) steps: val_loss $dense_val; upcycled (8 experts top-2) + $RECOVER steps: $up_val; MoE from scratch $STEPS steps: $orig_val"
