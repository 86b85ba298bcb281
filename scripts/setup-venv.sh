#!/usr/bin/env bash
# Creates .venv with the libtorch the build links against and the Python packages the tests
# use to read our files back (tensorboard, safetensors). Idempotent: a stamp records what
# was installed; a changed requirement list reinstalls.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.moe-stamp
want="torch==2.11.0 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85 | numpy safetensors tensorboard"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
echo "setup: creating .venv (torch 2.11.0 CPU libraries, tensorboard, safetensors)"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check --upgrade pip >/dev/null
# Without a GPU only libtorch_cpu is loaded: the CUDA runtime and CUPTI it links are enough,
# not the 2.2 GB of other NVIDIA wheels torch would pull in.
.venv/bin/pip install -q --disable-pip-version-check --no-deps \
  torch==2.11.0 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85
.venv/bin/pip install -q --disable-pip-version-check numpy safetensors tensorboard
echo "$want" > "$stamp"
