#!/usr/bin/env bash
# Download, on a machine with network, the cp312 wheels tools/gpu_check.sh needs on the GPU
# machine (Python 3.12, torch, Triton and transformers already there; no network), unpack them
# into one site tree and write it as .whl/gpu_site.tar.xz (git-ignored), which gpu_check.sh
# extracts into /tmp/site. At most 64 MiB in all travel with one device run: the wheels alone
# are ~70 MiB (pyarrow's 55 MB, pandas' 12 MB); stripped, one xz-compressed tar is 28 MiB.
#
#   tools/fetch_gpu_wheels.sh            # then: tools/gpu_check.sh on the GPU machine
#
# The wheels are downloaded into a temporary folder (never into .whl/, so that they do not travel
# next to the bundle). Stripped from the tree, unused at run time: tests, console scripts, pyarrow's
# C++ headers and Cython sources, pyarrow's Flight (RPC) and S3 libraries (pyarrow.fs imports
# without S3; datasets reads local and fsspec paths).
set -euo pipefail
cd "$(dirname "$0")/.."
LIMIT=$((64 * 1024 * 1024))
WHEELS=(
  megatron-core==0.16.1           # policy model, DDP, optimizer (platform wheel: a C++ helper)
  math-verify==0.9.0              # the demo's accuracy reward
  latex2sympy2_extended==1.11.0   # math-verify's LaTeX parser (sympy comes with torch)
  antlr4-python3-runtime==4.13.2  # its grammar runtime
  liger-kernel==0.8.5             # the speed comparison's triton_grpo_loss
  # megagrpo's data loader (megagrpo/data/sources.py) and what datasets needs beyond what
  # transformers brings (numpy, huggingface_hub>=1.31, fsspec, filelock, tqdm, packaging, pyyaml)
  datasets==5.2.0
  pyarrow==26.0.1
  pandas==3.1.1                   # needs numpy>=2.0.2
  python-dateutil==4.0.0          # pandas'
  tzdata==2026.6                  # python-dateutil 4's
  dill==0.4.1
  multiprocess==0.70.19
  xxhash==4.1.0
)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
  manylinux1_x86_64)
TARGET=(--python-version 3.12 --implementation cp --only-binary=:all: "${PLATFORMS[@]/#/--platform=}")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p .whl "$work/wheels"
# Pure-python wheels (py3-none-any) satisfy the platform tags too, so one command fits both.
python3 -m pip download -q --no-deps "${TARGET[@]}" -d "$work/wheels" "${WHEELS[@]}"
tree="$work/site"
python3 -m pip install -q --no-deps --no-index --no-compile "${TARGET[@]}" --target "$tree" \
  "$work"/wheels/*.whl
# Unused at run time (see the top): removed, each one named so a new version's layout shows.
strip=(bin pandas/tests pyarrow/tests multiprocess/tests dill/tests pyarrow/include
  pyarrow/includes pyarrow/src)
for p in "${strip[@]}"; do rm -rf "${tree:?}/$p"; done
find "$tree" \( -name '*.pxd' -o -name '*.pyx' -o -name '*.pxi' \) -delete
rm -f "$tree"/pyarrow/_pyarrow_cpp_tests.*.so \
  "$tree"/pyarrow/libarrow_flight.so.* "$tree"/pyarrow/_flight.*.so \
  "$tree"/pyarrow/libarrow_python_flight.so* \
  "$tree"/pyarrow/libarrow_s3.so.* "$tree"/pyarrow/_s3fs.*.so
# Wheels an earlier version of this script left in .whl/ would travel twice.
for w in "$work"/wheels/*.whl; do rm -f ".whl/$(basename "$w")"; done
bundle=.whl/gpu_site.tar.xz
# Sorted by name: pyarrow's three copies of each libarrow_python*.so sit within xz's window.
tar -C "$tree" --sort=name --owner=0 --group=0 --numeric-owner -cf - . |
  xz -9e --threads=2 >"$bundle.tmp"
mv "$bundle.tmp" "$bundle"
unpacked=$(du -sb "$tree" | cut -f1)
size=$(stat -c %s "$bundle")
total=$(du -cb .whl/* | tail -n 1 | cut -f1)
echo "$bundle: $size bytes ($((size / 1024 / 1024)) MiB; $((unpacked / 1024 / 1024)) MiB unpacked)," \
  "${#WHEELS[@]} packages; .whl/ holds $total bytes"
if [ "$size" -gt "$LIMIT" ] || [ "$total" -gt "$LIMIT" ]; then
  echo "fetch_gpu_wheels.sh: over the 64 MiB ($LIMIT bytes) a device run can carry:" \
    "bundle $size bytes, .whl/ $total bytes (remove stale files from .whl/)" >&2
  exit 1
fi
