#!/usr/bin/env bash
# Download, on a machine with network, the cp312 wheels tools/gpu_check.sh installs offline on
# the GPU machine (Python 3.12, torch, Triton and transformers already there) into .whl/
# (git-ignored). At most 64 MiB in all travel with one device run.
#
#   tools/fetch_gpu_wheels.sh            # then: tools/gpu_check.sh on the GPU machine
#
# Not brought: datasets' pyarrow (55 MB cp312 wheel) and pandas, which do not fit next to the
# rest; the demo check reports "skipped" where the GPU machine lacks them.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(
  megatron-core==0.16.1           # policy model, DDP, optimizer (platform wheel: a C++ helper)
  math-verify==0.9.0              # the demo's accuracy reward
  latex2sympy2_extended==1.11.0   # math-verify's LaTeX parser
  antlr4-python3-runtime==4.13.2  # its grammar runtime
  liger-kernel==0.8.5             # the speed comparison's triton_grpo_loss
)
mkdir -p .whl
# Pure-python wheels (py3-none-any) satisfy the platform tags too, so one command fits both.
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
total=$(du -cb .whl/*.whl | tail -n 1 | cut -f1)
echo "$(ls .whl/*.whl | wc -l) wheels, $((total / 1024 / 1024)) MiB in .whl/"
if [ "$total" -gt $((64 * 1024 * 1024)) ]; then
  echo "over the 64 MiB a device run can carry: remove stale wheels from .whl/" >&2
  exit 1
fi
