#!/usr/bin/env bash
# One prepared check of megagrpo's GPU path on one H100/H200, in well under 8 minutes.
#
#   tools/gpu_check.sh --plan   # list the checks and exit 0 (any machine, CPU CI included)
#   tools/gpu_check.sh          # run them; the table goes to $OUT/gpu_check.md (default ./outputs)
#
# The GPU machine has Python 3.12, torch (CUDA), Triton and transformers, but no megatron-core,
# datasets or network: the other packages come as .whl/gpu_site.tar.xz, the cp312 wheels that
# tools/fetch_gpu_wheels.sh downloads and unpacks beforehand (git-ignored; carry .whl), extracted
# offline into /tmp/site; wheels put in .whl/ by hand are installed there too.
set -u
cd "$(dirname "$0")/.."

# name | timeout (s) | command
CHECKS=(
  "Triton kernels vs fp64, speed vs eager and Liger (N=16384, V=151936, bf16)|150|python3 tools/bench_kernels.py --check --no-compile --n 16384 --v 151936 --iters 10 --out \$OUT/bench_kernels.md"
  "megatron-core bf16 logits vs transformers on CUDA|90|python3 tools/gpu_check.py parity"
  "20 GRPO demo steps on CUDA (no NaN, reward up) + peak memory of one update vs the --dry-run planner|240|python3 tools/gpu_check.py demo --steps 20"
)

if [ "${1:-}" = "--plan" ]; then
  echo "gpu_check.sh checks (each under its own timeout; the table goes to \$OUT/gpu_check.md):"
  total=0
  for c in "${CHECKS[@]}"; do
    IFS='|' read -r name limit _ <<<"$c"
    echo "- $name (timeout ${limit}s)"
    total=$((total + limit))
  done
  echo "worst case ${total}s, plus extracting .whl/gpu_site.tar.xz (tools/fetch_gpu_wheels.sh)"
  exit 0
fi

OUT="${OUT:-$PWD/outputs}"
mkdir -p "$OUT"
REPORT="$OUT/gpu_check.md"
LOG="$OUT/gpu_check.log"
: >"$LOG"

if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check.sh: no CUDA device here (tools/gpu_check.sh --plan lists the checks)" >&2
  exit 2
fi
mkdir -p /tmp/site
if [ -f .whl/gpu_site.tar.xz ]; then
  # Python's tarfile where the machine has no xz binary
  { tar -xJf .whl/gpu_site.tar.xz -C /tmp/site ||
    python3 -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='data')" \
      .whl/gpu_site.tar.xz /tmp/site; } >>"$LOG" 2>&1 ||
    echo "extracting .whl/gpu_site.tar.xz failed (see $LOG)" >&2
else
  echo "no .whl/gpu_site.tar.xz (run tools/fetch_gpu_wheels.sh beforehand): megatron-core," \
    "datasets and math-verify missing" | tee -a "$LOG" >&2
fi
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl >>"$LOG" 2>&1 || echo "wheel install failed (see $LOG)" >&2
fi
# megagrpo runs from this checkout; its Triton package is imported as megagrpo_kernels
mkdir -p /tmp/gpu_check_path
ln -sfn "$PWD/kernels" /tmp/gpu_check_path/megagrpo_kernels
export PYTHONPATH="/tmp/site:/tmp/gpu_check_path:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OUT
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1  # no network there: never wait for one

device=$(python3 -c "import torch; print(torch.cuda.get_device_name())")
versions=$(python3 -c "import torch, triton; print(f'torch {torch.__version__}, Triton {triton.__version__}')" 2>&1)
{
  echo "# megagrpo GPU check"
  echo
  echo "device: $device; $versions; date: $(date -u +%Y-%m-%d)"
  echo
  echo "| check | result | numbers |"
  echo "| --- | --- | --- |"
} >"$REPORT"

failed=0
for c in "${CHECKS[@]}"; do
  IFS='|' read -r name limit cmd <<<"$c"
  echo "== $name" | tee -a "$LOG"
  start=$(date +%s)
  out=$(timeout "$limit" bash -c "$cmd" 2>&1)
  rc=$?
  secs=$(($(date +%s) - start))
  printf '%s\n' "$out" >>"$LOG"
  rows=$(printf '%s\n' "$out" | grep '^RESULT|' || true)
  if [ -n "$rows" ]; then  # gpu_check.py: one row per result line
    printf '%s\n' "$rows" | while IFS='|' read -r _ check res numbers; do
      echo "| $check | $res | $numbers (${secs}s) |" >>"$REPORT"
    done
  else  # bench_kernels.py: the correctness lines and the speed table
    if [ $rc -eq 0 ]; then res=pass; elif [ $rc -eq 124 ]; then res="FAIL (timeout ${limit}s)"; else res="FAIL (rc $rc)"; fi
    summary=$(printf '%s\n' "$out" | grep -E '^- N=|copy bandwidth' | tr '\n' ' ')
    echo "| $name | $res | ${summary:-see gpu_check.log} (${secs}s; table: bench_kernels.md) |" >>"$REPORT"
  fi
  if [ $rc -ne 0 ]; then
    failed=1
    [ $rc -eq 124 ] && echo "| $name | FAIL | timed out after ${limit}s |" >>"$REPORT"
    printf '%s\n' "$out" | tail -n 20
  fi
done
[ -f "$OUT/bench_kernels.md" ] && { echo; echo "## Kernel benchmark"; echo; cat "$OUT/bench_kernels.md"; } >>"$REPORT"
cat "$REPORT"
exit $failed
