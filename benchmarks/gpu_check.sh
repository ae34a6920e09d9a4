#!/usr/bin/env bash
# The one prepared GPU check (NVIDIA H200 machine, offline, its own python3/torch).
#   OUT=/some/dir bash benchmarks/gpu_check.sh
# 1. builds the extension in place against that machine's torch (no downloads)
# 2. runs the GPU tests (tests/test_gpu.py) and the registration tests
# 3. runs the GPU benchmark report and the training-step benchmark
# and writes summary.txt plus every log under $OUT, in well under 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PY:-python3}
T0=$(date +%s)
status() { echo "$1: $2 ($(( $(date +%s) - T0 )) s)" | tee -a "$OUT/summary.txt"; }
: > "$OUT/summary.txt"

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name(0))" \
  | tee -a "$OUT/summary.txt"

# 1. Build (in place; the GPU machine's pip may lack PEP 660 support, build_ext needs none).
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} LCT_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
timeout 300 $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1
status build $?
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
$PY -m lct_kernels > "$OUT/backend_info.txt" 2>&1
status backend_info $?
grep -E "^  _C|cuda +(cuda|triton)" "$OUT/backend_info.txt" | tee -a "$OUT/summary.txt"

# 2. Tests: GPU specification first, then the registration and backend tests.
timeout 180 $PY -m pytest tests/test_gpu.py -q -x -p no:cacheprovider > "$OUT/tests_gpu.log" 2>&1
status "tests/test_gpu.py" $?
tail -n 3 "$OUT/tests_gpu.log" | tee -a "$OUT/summary.txt"
timeout 90 $PY -m pytest tests/test_registration.py tests/test_backend.py -q -p no:cacheprovider \
  > "$OUT/tests_registration.log" 2>&1
status "registration/backend tests" $?
tail -n 2 "$OUT/tests_registration.log" | tee -a "$OUT/summary.txt"

# 3. Benchmarks (bf16): robust loss, objective, NsLN / NsLN + modulate, exact OT
#    assignment, written as a BENCHMARKS.md section plus a plot.
timeout 240 $PY benchmarks/report.py --device cuda --rounds 30 --write "$OUT/BENCHMARKS.gpu.md" \
  --plots "$OUT" > "$OUT/bench.log" 2>&1
status "benchmark report" $?
grep -E "^\*\*|^###|^\| (256x|64x|128x|8x|fwd|[0-9]+ \|)" "$OUT/bench.log" | head -90 | tee -a "$OUT/summary.txt"
# 4. Training step: DiT-B/2 on 4x32x32 latents, batch 256, bf16: fused path vs the paper
#    code's eager + torchcfm/POT path (skipped if torchcfm/POT are not installed there).
timeout 150 $PY benchmarks/bench_train.py --config b2 --device cuda --rounds 20 \
  --json "$OUT/bench_train.json" > "$OUT/bench_train.log" 2>&1
status "training-step benchmark" $?
grep -E "^###|^\|" "$OUT/bench_train.log" | tee -a "$OUT/summary.txt"
status done 0
