#!/usr/bin/env bash
# Creates .venv with the libtorch the build links against (torch==2.11.0, the version
# tch =0.24.0 requires) and the Python packages the tests compare against or read our files
# back with (transformers, tokenizers, safetensors, tensorboard). Idempotent: a stamp records
# what was installed; a changed requirement list reinstalls.
#
# The full torch wheel, with its NVIDIA libraries (cuBLAS, cuDNN, NCCL, ...), is installed
# on every machine: `import torch` (transformers) needs it even on a CPU, and on a GPU machine
# libtorch_cuda loads only with all of them. One resolver pass, so pip reports no conflicts.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.moe-stamp
want="torch==2.11.0 numpy safetensors tensorboard transformers==5.24.0"

# The CUDA 13 wheel needs an NVIDIA driver >= 580; an older one leaves training on the CPU.
scripts/check-driver.sh

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
echo "setup: creating .venv ($want)"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check --upgrade pip >/dev/null
# shellcheck disable=SC2086
.venv/bin/pip install -q --disable-pip-version-check $want
echo "$want" > "$stamp"
