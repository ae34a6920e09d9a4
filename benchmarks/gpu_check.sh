#!/usr/bin/env bash
# The one prepared GPU check (issue 11): on the device tool's NVIDIA H200 machine (offline, its
# own python3 with torch 2.11.0, Triton 3.6.0, CUDA 13.0) it runs, in value order and under ONE
# deadline: environment report, peers (offline wheels), build, GPU tests (every case, no -x),
# registration/backend tests, compute-sanitizer memcheck + racecheck, kernel benchmarks, the
# patched-DiT step, the training step.  Each stage has a budget and a minimum: with less than its
# minimum left before the deadline it is skipped ("skipped: deadline"); otherwise it runs under
# timeout for its budget or the time left, whichever is less, and is killed past it ("timeout",
# or "timeout: deadline" when the time left was the limit).  A failing stage never stops the
# later ones.  $OUT receives at most 8 files: summary.md, logs.tar.gz (every log, the
# junit XML), the benchmark section, the benchmark JSON and at most 2 plots.
#
# The device tool call (after `make gpu-wheels` here: ~6 MB of Python 3.12 wheels, git-ignored):
#   run(command="bash benchmarks/gpu_check.sh", carry=["wheels-gpu"], timeout_s=600)
# The session's 15 device minutes hold that call (machine start included) and one rerun, made at
# once while the machine is warm (30 s), of the stages a fix touched, e.g.:
#   run(command="GPU_CHECK_DEADLINE=200 GPU_CHECK_STAGES='env peers build test_gpu_triton' \
#       bash benchmarks/gpu_check.sh", carry=["wheels-gpu"], timeout_s=260)
# (a warm machine keeps the ignored in-place build, so ninja recompiles only what changed)
# On a CPU machine, the plumbing check (tiny sizes, Triton interpreter, CPU tensors, .venv):
#   bash benchmarks/gpu_check.sh --dry-run          (make gpu-check-dry-run; about 3 min)
#
# Environment:
#   OUT                       results folder (the device tool sets it; default: a new folder
#                             runs/gpu_check-<time> on the GPU, a temp folder in the dry run)
#   PY                        python (GPU: python3; dry run: .venv/bin/python if it exists)
#   GPU_CHECK_DEADLINE        seconds for the whole script (default 480; dry run 300)
#   GPU_CHECK_STAGES          only these stages (space/comma separated); the others: "skipped:
#                             not selected"
#   GPU_CHECK_BUDGET_<STAGE>  one stage's budget in seconds, e.g. GPU_CHECK_BUDGET_BUILD=300
#   TORCH_CUDA_ARCH_LIST (9.0), MAX_JOBS (16); CUDA_HOME is left to setup.py unless it is set
# Exit status: 0 all ran stages passed; 1 a stage failed or timed out; 3 a plumbing check failed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=0
[[ ${1:-} == --dry-run ]] && DRY=1
T0=$(date +%s)

if (( DRY )); then
  PY=${PY:-$([[ -x .venv/bin/python ]] && echo "$ROOT/.venv/bin/python" || echo python3)}
  DEADLINE=${GPU_CHECK_DEADLINE:-300}
  OUT=${OUT:-$(mktemp -d /tmp/gpu_check_dry.XXXXXX)}
  export TRITON_INTERPRET=1   # Triton kernels run on CPU tensors under the interpreter
  # tiny sizes gain nothing from threads, and a busy 2-core machine makes OpenMP's spinning costly
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
  PY=${PY:-python3}
  DEADLINE=${GPU_CHECK_DEADLINE:-480}
  OUT=${OUT:-runs/gpu_check-$(date -u +%Y%m%d-%H%M%S)}
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
OUT_TMP=$(mktemp -d /tmp/gpu_check_work.XXXXXX)   # everything but the final files lives here
LOGS=$OUT_TMP/logs BENCH=$OUT_TMP/bench
mkdir -p "$LOGS" "$BENCH"
RESERVE=10   # seconds kept for the summary, the archive and the checks
SUMMARY=(${PY} "$ROOT/benchmarks/gpu_check_summary.py")
export PY DRY ROOT OUT_TMP LOGS BENCH PYTHONUNBUFFERED=1
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
[[ -n ${GPU_CHECK_STAGES:-} ]] && echo "stages selected: $GPU_CHECK_STAGES"

# ---- stage machinery ----------------------------------------------------------------------
# stages.tsv: name <TAB> status <TAB> seconds <TAB> budget <TAB> log <TAB> note
: > "$OUT_TMP/stages.tsv"
GPU_TESTS=$(ls tests/test_gpu*.py 2>/dev/null | sort)
PLANNED="env peers build backend"
for f in $GPU_TESTS; do PLANNED+=" $(basename "$f" .py)"; done
PLANNED+=" registration memcheck racecheck bench_kernels bench_dit_patch bench_train"
echo "$PLANNED" | tr ' ' '\n' > "$OUT_TMP/planned.txt"

selected() {  # selected NAME: is the stage in GPU_CHECK_STAGES (or no selection given)?
  [[ -z ${GPU_CHECK_STAGES:-} ]] && return 0
  [[ " ${GPU_CHECK_STAGES//,/ } " == *" $1 "* ]]
}

finalize() {  # rewrite summary.md and logs.tar.gz in $OUT (after every stage: a kill loses little)
  "${SUMMARY[@]}" write --work "$OUT_TMP" --out "$OUT" --mode "$([[ $DRY == 1 ]] && echo dry || echo gpu)" \
    --deadline "$DEADLINE" --elapsed $(( $(date +%s) - T0 )) > "$OUT_TMP/summary_helper.log" 2>&1 \
    || { echo "summary helper failed:"; cat "$OUT_TMP/summary_helper.log"; }
  cp -f "$OUT/summary.md" "$LOGS/summary.md" 2>/dev/null
  tar -czf "$OUT/logs.tar.gz.part" -C "$OUT_TMP" logs stages.tsv planned.txt \
    && mv -f "$OUT/logs.tar.gz.part" "$OUT/logs.tar.gz"
}

record() {  # record NAME STATUS SECONDS BUDGET LOG NOTE
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$6" >> "$OUT_TMP/stages.tsv"
  printf '%-18s %-32s %5ss  %s\n' "$1" "$2" "$3" "$6"
  finalize
}

LAST_STATUS=""
run_stage() {  # run_stage NAME BUDGET MIN_SECONDS OK_STATUS FUNCTION [ARGS...]
  local name=$1 budget=$2 min=$3 okstatus=$4; shift 4
  local var="GPU_CHECK_BUDGET_${name^^}"
  budget=${!var:-$budget}
  LAST_STATUS=""
  if ! selected "$name"; then record "$name" "skipped: not selected" 0 "$budget" "" ""; return; fi
  local left=$(( DEADLINE - ($(date +%s) - T0) - RESERVE ))
  if (( left < min )); then
    LAST_STATUS="skipped: deadline"
    record "$name" "$LAST_STATUS" 0 "$budget" "" "${left} s left, needs at least ${min} s"
    return
  fi
  local limit=$(( budget < left ? budget : left )) log="$name.log" t0=$(date +%s)
  echo "# stage $name: $* (budget ${budget} s, limit ${limit} s, $(date -u +%FT%TZ))" > "$LOGS/$log"
  STAGE=$name timeout -k 5 "$limit" bash -c '"$@"' _ "$@" >> "$LOGS/$log" 2>&1
  local rc=$? dt=$(( $(date +%s) - t0 )) status note=""
  if (( rc == 0 )); then
    status=$okstatus
    [[ $okstatus == skipped* ]] && note="its CPU plumbing ran and passed"
  elif (( rc == 124 || rc == 137 )); then
    if (( limit < budget )); then status="timeout: deadline"; else status="timeout"; fi
    note="killed after ${limit} s"
  elif (( rc == 77 )); then status="skipped: $(tail -n 1 "$LOGS/$log")"   # the stage said why
  else status="failed (rc $rc)"
  fi
  LAST_STATUS=$status
  record "$name" "$status" "$dt" "$budget" "$log" "$note"
}

# ---- stages (each runs in its own bash, under timeout; exit 77 = skipped, last line = why) ---
stage_env() {
  set -x
  uname -a; nproc; free -g | head -2
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  else echo "nvidia-smi: not found"; fi
  local nvcc=${CUDA_HOME:-/usr/local/cuda}/bin/nvcc
  [[ -x $nvcc ]] || nvcc=$(command -v nvcc || true)
  [[ -n $nvcc ]] && "$nvcc" --version | tail -n 2
  command -v compute-sanitizer && compute-sanitizer --version | tail -n 1
  { set +x; } 2>/dev/null
  "$PY" - <<'EOF'
import importlib.util, platform, sys
import torch, triton
print(f"ENV python {platform.python_version()} ({sys.executable})")
print(f"ENV torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN "
      f"{torch.backends.cudnn.version()}, triton {triton.__version__}")
print(f"ENV cuda available: {torch.cuda.is_available()}, devices: {torch.cuda.device_count()}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"ENV device {i}: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.0f} GiB")
mods = ["numpy", "scipy", "pytest", "matplotlib", "sklearn", "ot", "lap", "torchcfm"]
have = [f"{m} {getattr(__import__(m), '__version__', '?')}" if importlib.util.find_spec(m)
        else f"{m} -" for m in mods]
print("ENV packages: " + ", ".join(have))
EOF
}

stage_peers() {
  local whl=(wheels-gpu/*.whl)
  if [[ ! -e ${whl[0]} ]]; then echo "no wheels-gpu/ (make gpu-wheels; carry it)"; exit 77; fi
  set -x
  ls -l wheels-gpu/
  if (( DRY )); then
    # the GPU machine's install, for its Python 3.12, into a throw-away target (proves the set)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$OUT_TMP/peers312" \
      --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64 \
      --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 "${whl[@]}" || exit 1
    ls "$OUT_TMP/peers312"
    # this python can import only the pure-Python ones (torchcfm, torch-linear-assignment)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$OUT_TMP/peers" \
      wheels-gpu/*-py3-none-any.whl || exit 1
  else
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$OUT_TMP/peers" \
      "${whl[@]}" || exit 1
  fi
  PYTHONPATH=$OUT_TMP/peers:$PYTHONPATH "$PY" -c "
import os, ot, torchcfm.optimal_transport, torch_linear_assignment as tla, lap
where = lambda m: 'wheels-gpu' if m.__file__.startswith('$OUT_TMP/peers/') else 'this python'
print('ENV peers: ' + ', '.join(f'{n} {getattr(m, \"__version__\", \"\")} ({where(m)})' for n, m in
      [('POT', ot), ('torchcfm', torchcfm), ('lapx', lap), ('torch-linear-assignment', tla)]))"
}

stage_build() {
  echo "CUDA_HOME=${CUDA_HOME:-<unset: setup.py chooses /usr/local/cuda or realpath(nvcc)>}"
  if (( DRY )); then
    # the in-tree CPU extension belongs to .venv (others' tests use it): verify, never rebuild
    echo "dry run: the GPU machine runs: LCT_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16" \
         "$PY setup.py build_ext --inplace"
    set -x
    "$PY" -c "import ast; ast.parse(open('setup.py').read()); print('setup.py parses')" || exit 1
    "$PY" -c "
import json, os, lct_kernels, lct_kernels._C as c
print('in-tree CPU extension:', c.__file__)
print(json.load(open(os.path.join(os.path.dirname(lct_kernels.__file__), '_build_info.json'))))"
    return
  fi
  # torch's builder falls back to a serial, ninja-less build when no ninja is on the PATH: put
  # the python's own bin folder (a venv's pip-installed ninja) first
  PATH=$("$PY" -c 'import os, sys; print(os.path.dirname(sys.executable))'):$PATH
  set -x
  command -v ninja && ninja --version
  LCT_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
    "$PY" setup.py build_ext --inplace || exit 1
  "$PY" -c "import lct_kernels._C, lct_kernels._C_cuda; print('_C and _C_cuda load')"
}

stage_backend() {
  set -x
  "$PY" -m lct_kernels
}

stage_pytest() {  # stage_pytest JUNIT_NAME ARGS...: every case runs (no -x) and is listed (-v)
  local junit=$1; shift
  set -x
  "$PY" -m pytest "$@" -v -rfE -p no:cacheprovider --junitxml="$LOGS/$junit.xml"
}

stage_sanitize() {  # stage_sanitize TOOL
  if [[ ! -f benchmarks/sanitize_cuda.py ]]; then echo "script missing"; exit 77; fi
  if (( DRY )); then   # the same cases on CPU tensors: the script's plumbing, not the kernels
    set -x
    "$PY" benchmarks/sanitize_cuda.py --dry-run
    return
  fi
  local cs="" c
  for c in "$(command -v compute-sanitizer)" "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
           "${CUDA_HOME:-/usr/local/cuda}/compute-sanitizer/compute-sanitizer"; do
    [[ -n $c && -x $c ]] && { cs=$c; break; }
  done
  if [[ -z $cs ]]; then echo "compute-sanitizer not found"; exit 77; fi
  set -x
  # no caching allocator: each tensor is its own allocation, so an overrun hits unowned memory.
  # Only our kernels are instrumented (every one is in lct::cuda: mangled _ZN3lct4cuda...):
  # torch's own kernels then run at full speed, which keeps the stage inside its budget.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$cs" --tool "$1" --error-exitcode 3 \
    --kernel-name kns=_ZN3lct4cuda "$PY" benchmarks/sanitize_cuda.py
}

stage_bench_kernels() {
  set -x
  if (( DRY )); then
    "$PY" benchmarks/report.py --device cpu --tiny --write "$BENCH/BENCHMARKS.cpu.md" --plots "$BENCH"
  else
    "$PY" benchmarks/report.py --device cuda --rounds 30 --write "$BENCH/BENCHMARKS.cuda.md" \
      --plots "$BENCH"
  fi
}

stage_bench_dit_patch() {
  if [[ ! -f benchmarks/bench_dit_patch.py ]]; then echo "script missing"; exit 77; fi
  local args=(--device cuda)
  # dry run: eager only (inductor's CPU compile of even the tiny DiT takes minutes on 2 cores)
  (( DRY )) && args=(--device cpu --quick --modes eager)
  grep -q -- '"--json"' benchmarks/bench_dit_patch.py && args+=(--json "$BENCH/bench_dit_patch.json")
  set -x
  "$PY" benchmarks/bench_dit_patch.py "${args[@]}"
}

stage_bench_train() {
  set -x
  if (( DRY )); then
    "$PY" benchmarks/bench_train.py --config b2-smoke --device cpu --rounds 1 --warmup 1 \
      --json "$BENCH/bench_train.json"
  else
    "$PY" benchmarks/bench_train.py --config b2 --device cuda --rounds 20 \
      --json "$BENCH/bench_train.json"
  fi
}
export -f stage_env stage_peers stage_build stage_backend stage_pytest stage_sanitize \
  stage_bench_kernels stage_bench_dit_patch stage_bench_train

# ---- the run, in value order ---------------------------------------------------------------
# What the GPU-only stages report in the dry run: they run what they can, never a "pass".
NOGPU=$([[ $DRY == 1 ]] && echo "skipped: no GPU" || echo pass)
echo "gpu_check: $([[ $DRY == 1 ]] && echo "DRY RUN (CPU)" || echo GPU), deadline ${DEADLINE} s," \
     "python $PY, OUT=$OUT"
run_stage env 30 5 pass stage_env
run_stage peers 60 5 pass stage_peers
[[ $LAST_STATUS == pass ]] && export PYTHONPATH=$OUT_TMP/peers:$PYTHONPATH
run_stage build 240 60 pass stage_build
run_stage backend 30 5 pass stage_backend
for f in $GPU_TESTS; do
  name=$(basename "$f" .py)
  # 150 s: each Triton specialization compiles on first use; a file cut short keeps its -v lines
  run_stage "$name" 150 20 "$NOGPU" stage_pytest "$name" "$f" -m gpu
done
if (( DRY )); then   # the stage's plumbing only: the suite (make test) runs these tests in full
  run_stage registration 90 20 pass stage_pytest registration tests/test_registration.py \
    tests/test_backend.py -m "not compile" -k "not opcheck"
else
  run_stage registration 90 20 pass stage_pytest registration tests/test_registration.py \
    tests/test_backend.py
fi
run_stage memcheck 75 20 "$NOGPU" stage_sanitize memcheck
if (( DRY )); then
  record racecheck "skipped: no GPU" 0 75 "" "same script as memcheck, whose dry run covers it"
else
  run_stage racecheck 75 20 pass stage_sanitize racecheck
fi
run_stage bench_kernels 150 40 pass stage_bench_kernels
run_stage bench_dit_patch 75 30 pass stage_bench_dit_patch
run_stage bench_train 90 30 pass stage_bench_train

# ---- results: at most 8 files in $OUT -------------------------------------------------------
# summary.md + logs.tar.gz, then the benchmark section and JSON, then at most 2 plots, up to 8
{ ls "$BENCH"/BENCHMARKS.*.md "$BENCH"/bench_train.json "$BENCH"/bench_dit_patch.json
  ls "$BENCH"/*.md "$BENCH"/*.json; ls "$BENCH"/*.png | sort | head -n 2; } 2>/dev/null \
  | awk '!seen[$0]++' | head -n 6 | while read -r f; do cp -f "$f" "$OUT/"; done
cp -r "$BENCH" "$LOGS/bench"   # the archive keeps every benchmark output too
finalize
rc=0
grep -qP '\t(failed|timeout)' "$OUT_TMP/stages.tsv" && rc=1
mode=$([[ $DRY == 1 ]] && echo dry || echo gpu)
"${SUMMARY[@]}" check --work "$OUT_TMP" --out "$OUT" --mode "$mode" --deadline "$DEADLINE" \
  --elapsed $(( $(date +%s) - T0 )) > "$OUT_TMP/checks.txt" 2>&1 || rc=3
cat "$OUT_TMP/checks.txt"
{ echo; echo "## Plumbing checks"; echo; sed 's/^/    /' "$OUT_TMP/checks.txt"; } >> "$OUT/summary.md"
# the device tool's reply shows the output's end: the stage table and failed tests come last
sed -n '/^## Key benchmark lines/q;p' "$OUT/summary.md"
echo "gpu_check: done in $(( $(date +%s) - T0 )) s (deadline ${DEADLINE} s), rc $rc; files in $OUT:"
ls -l "$OUT"
rm -rf "$OUT_TMP"
exit $rc
