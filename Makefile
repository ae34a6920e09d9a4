# Entry points used by README.md and .ci/run.
#   make demo        install (CPU) and run the main job: the sLCT trainer's demo preset on the
#                    embedded digits -> runs/demo/ (samples, metrics, checkpoints)
#   make test        install (CPU) and run the test suite (Triton under the interpreter)
#   make report      the benchmark report on this machine -> runs/BENCHMARKS.local.md + plots
#   make bench       pytest-benchmark suite
#   make cuda-check  compile the CUDA extension out of tree and load it (no GPU needed)
#   make cmake-check libtorch build of csrc/ plus its ctest
#   make triton-compile-check  compile every Triton kernel for sm_90/sm_80 (no GPU) and write
#                    the resource table to docs/gpu_resources.md (TRITON_CHECK_ARGS=--check-only: no write)
# Variables: PYTHON (a Python >= 3.10), VENV, TORCH (the torch requirement).

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
CUDA_VENV ?= .venv-cuda
CUDA_TORCH ?= torch==2.11.0 torchvision==0.26.0
CUDA_HOME ?= /usr/local/cuda
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*/*.cpp csrc/*/*.cu csrc/*/*.h csrc/*/*/*.h csrc/*/*.cuh csrc/include/lct/*.h)

.PHONY: gpu-wheels gpu-check-dry-run
.PHONY: install peers demo report test bench cuda-check cmake-check clean triton-compile-check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade "pip>=23" "setuptools>=64" wheel
	$(BIN)/pip install -q "$(TORCH)" ninja

$(VENV)/.installed: $(BIN)/python $(SOURCES)
	$(BIN)/pip install -q --no-build-isolation -e '.[test,bench,train]'
	touch $@

install: $(VENV)/.installed

# Benchmark peers: torchcfm without its training dependencies (we use only its
# optimal_transport module).
$(VENV)/.peers: $(VENV)/.installed
	$(BIN)/pip install -q --no-deps "torchcfm==1.0.7"
	touch $@

peers: $(VENV)/.peers

demo: install
	$(BIN)/lct-train --preset demo --out runs/demo --overwrite

report: install peers
	mkdir -p runs
	$(BIN)/python -m lct_kernels
	$(BIN)/python benchmarks/report.py --write runs/BENCHMARKS.local.md --plots runs

test: install
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q

bench: install peers
	$(BIN)/python -m pytest benchmarks -q --benchmark-only --benchmark-columns=median,iqr,rounds

$(CUDA_VENV)/bin/python:
	$(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/pip install -q $(foreach r,$(CUDA_TORCH),"$(r)") ninja "numpy<2.4"

cuda-check: $(CUDA_VENV)/bin/python
	rm -rf build-cuda
	CUDA_HOME=$(CUDA_HOME) TORCH_CUDA_ARCH_LIST=$${TORCH_CUDA_ARCH_LIST:-9.0} LCT_BUILD_CUDA=1 \
	  $(CUDA_VENV)/bin/python setup.py -q build_ext -b build-cuda/lib -t build-cuda/tmp
	$(CUDA_VENV)/bin/python benchmarks/check_cuda_build.py build-cuda/lib/lct_kernels

cmake-check: $(BIN)/python
	cmake -S . -B build/cmake -G Ninja -DCMAKE_PREFIX_PATH="$$($(BIN)/python -c 'import torch;print(torch.utils.cmake_prefix_path)')"
	cmake --build build/cmake
	$(CUDA_VENV)/bin/python benchmarks/cuda_resources.py build-cuda/lib/lct_kernels --write docs/gpu_resources.md
	ctest --test-dir build/cmake --output-on-failure
	$(BIN)/python -c "import torch; torch.ops.load_library('build/cmake/liblct_ops.so'); print('liblct_ops.so loads:', torch.ops.lct.robust_loss)"

# Ahead-of-time Triton compilation for explicit GPU targets: fails on a compile error or
# an unexplained register spill (benchmarks/triton_compile_check.py).
triton-compile-check: $(BIN)/python
	$(BIN)/python benchmarks/triton_compile_check.py $(TRITON_CHECK_ARGS)

# --- GPU check ---------------------------------------------------------------------
# Benchmark peers the GPU machine lacks (it has numpy, scipy, torch, triton, matplotlib, and
# can reach no registry), as Python 3.12 manylinux x86_64 wheels for the device tool's carry:
# benchmarks/gpu_check.sh installs them offline.  POT 0.9.6.post1, not 0.9.7: 0.9.7's cp312
# wheel is 33 MB (a 174 MB bsp extension) of the 64 MiB a call may carry; 0.9.6's is 1.5 MB,
# with the same emd.  torchcfm needs only torch, numpy and POT for optimal_transport.
GPU_WHEELS := wheels-gpu
GPU_PEERS := POT==0.9.6.post1 torchcfm==1.0.7 lapx==0.11.1 torch-linear-assignment==0.1.0
GPU_WHEEL_PLATFORMS := manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_24_x86_64 \
  manylinux_2_27_x86_64 manylinux_2_28_x86_64

$(GPU_WHEELS)/.done: Makefile
	rm -rf $(GPU_WHEELS)
	$(PYTHON) -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
	  $(addprefix --platform ,$(GPU_WHEEL_PLATFORMS)) --no-deps -d $(GPU_WHEELS) $(GPU_PEERS)
	ls -l $(GPU_WHEELS)
	touch $@

gpu-wheels: $(GPU_WHEELS)/.done

# The GPU check's plumbing on this CPU machine (tiny sizes, Triton interpreter, .venv).
gpu-check-dry-run: $(GPU_WHEELS)/.done
	bash benchmarks/gpu_check.sh --dry-run

clean:
	rm -rf build build-cuda runs *.egg-info lct_kernels/*.so lct_kernels/_build_info.json
