#!/usr/bin/env bash
# Warns (on stderr) when this machine's NVIDIA driver is too old for torch 2.11.0's CUDA 13
# build, which needs driver >= 580. Silent without nvidia-smi (no NVIDIA GPU) and with a
# recent driver. Always exits 0: the CPU build still works, so this is a warning, not a failure.
# Called by scripts/setup-venv.sh; tested with a stub nvidia-smi (tests/tests/setup_driver_check.rs).
set -uo pipefail

required=580
command -v nvidia-smi >/dev/null 2>&1 || exit 0
drv=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1 | tr -d '[:space:]')
major=${drv%%.*}
if [ -z "$drv" ]; then
  echo "setup: warning: nvidia-smi is present but reports no driver version; CUDA may not load (torch 2.11.0's CUDA 13 build needs NVIDIA driver >= $required)" >&2
elif ! [[ "$major" =~ ^[0-9]+$ ]]; then
  echo "setup: warning: cannot read the NVIDIA driver version from nvidia-smi ('$drv'); torch 2.11.0's CUDA 13 build needs driver >= $required" >&2
elif [ "$major" -lt "$required" ]; then
  echo "setup: warning: NVIDIA driver $drv is older than $required, which torch 2.11.0's CUDA 13 build needs; training will fail on cuda (device: auto falls back to the CPU with a warning)" >&2
fi
exit 0
