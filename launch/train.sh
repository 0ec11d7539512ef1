#!/usr/bin/env bash
# One node: torchrun with one process per GPU (or NPROC processes on CPU) running megagrpo train.
#
#   launch/train.sh --config launch/configs/qwen2.5-1.5b-math.yaml [--key value ...]
#   NPROC=2 launch/train.sh --config launch/configs/cpu-demo.yaml --dry-run
#
# NPROC: processes on this node (default: the GPUs nvidia-smi lists, else 1).
# Everything after the script name is passed to `megagrpo train` unchanged.
set -euo pipefail

if [[ -z "${NPROC:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    NPROC=$(nvidia-smi -L | wc -l)
  fi
  NPROC=${NPROC:-1}
  [[ "$NPROC" -ge 1 ]] || NPROC=1
fi

exec torchrun --standalone --nnodes=1 --nproc-per-node="$NPROC" -m megagrpo.cli train "$@"
