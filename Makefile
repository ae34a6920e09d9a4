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
#   make wheel       dist/lct_kernels-*.whl (CPU extension, torch 2.13) from a staged copy of the tree
#   make wheel-check install that wheel (+[train]) into a fresh venv, outside the tree; run it
#   make integration tests against the real timm/diffusers/torch-fidelity/tensorboard/torchcfm
#                    in .venv-cuda (torch 2.11), lct_kernels installed there from a wheel
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
.PHONY: install peers demo report test bench cuda-check cmake-check wheel wheel-check integration clean triton-compile-check

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

# setuptools: >= 70.1 builds wheels without the wheel package; torch 2.11 requires < 82.
$(CUDA_VENV)/bin/python:
	$(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/pip install -q --upgrade "pip>=23" "setuptools>=70.1,<82" wheel
	$(CUDA_VENV)/bin/pip install -q $(foreach r,$(CUDA_TORCH),"$(r)") ninja "numpy<2.4"

cuda-check: $(CUDA_VENV)/bin/python
	rm -rf build-cuda
	CUDA_HOME=$(CUDA_HOME) TORCH_CUDA_ARCH_LIST=$${TORCH_CUDA_ARCH_LIST:-9.0} LCT_BUILD_CUDA=1 \
	  $(CUDA_VENV)/bin/python setup.py -q build_ext -b build-cuda/lib -t build-cuda/tmp
	$(CUDA_VENV)/bin/python benchmarks/check_cuda_build.py build-cuda/lib/lct_kernels
	$(CUDA_VENV)/bin/python benchmarks/cuda_resources.py build-cuda/lib/lct_kernels --write docs/gpu_resources.md

cmake-check: $(BIN)/python
	cmake -S . -B build/cmake -G Ninja -DCMAKE_PREFIX_PATH="$$($(BIN)/python -c 'import torch;print(torch.utils.cmake_prefix_path)')"
	cmake --build build/cmake
	ctest --test-dir build/cmake --output-on-failure
	$(BIN)/python -c "import torch; torch.ops.load_library('build/cmake/liblct_ops.so'); print('liblct_ops.so loads:', torch.ops.lct.robust_loss)"

# Ahead-of-time Triton compilation for explicit GPU targets: fails on a compile error or
# an unexplained register spill (benchmarks/triton_compile_check.py).
triton-compile-check: $(BIN)/python
	$(BIN)/python benchmarks/triton_compile_check.py $(TRITON_CHECK_ARGS)

# --- wheel -----------------------------------------------------------------------
# Wheels are built from a staged copy of the sources (git's tracked and untracked,
# not ignored files), never from the tree itself: the in-tree editable build's .so
# and build/ must not leak into a wheel, and a build for another torch must not
# reuse them.  The staged build/ is kept, so a rebuild recompiles only what changed.
# $(call stage,DIR)
stage = mkdir -p $(1) && rm -rf $(1)/lct_kernels $(1)/csrc $(1)/build/lib.* $(1)/build/bdist.* && \
  git ls-files -z -co --exclude-standard -- setup.py pyproject.toml README.md csrc lct_kernels \
  | tar --null -T - --ignore-failed-read -cf - 2>/dev/null | tar -xf - -C $(1)
WHEEL_DIR := build-wheel
WHEEL_VENV := $(WHEEL_DIR)/venv

wheel: $(BIN)/python
	$(call stage,$(WHEEL_DIR)/src)
	rm -f dist/lct_kernels-*.whl
	cd $(WHEEL_DIR)/src && LCT_BUILD_CUDA=0 MAX_JOBS=$${MAX_JOBS:-2} \
	  $(abspath $(BIN))/pip wheel -q --no-build-isolation --no-deps . -w $(abspath dist)
	$(BIN)/python benchmarks/check_wheel.py --contents dist/lct_kernels-*.whl --source $(WHEEL_DIR)/src/lct_kernels

# A fresh venv each time (torch from the local wheel, then ours with its [train]
# extra, not editable); the checks run from a folder outside the source tree.
wheel-check: wheel
	rm -rf $(WHEEL_VENV) $(WHEEL_DIR)/run
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/pip install -q "$(TORCH)"
	$(WHEEL_VENV)/bin/pip install -q "$$(ls dist/lct_kernels-*.whl)[train]"
	mkdir -p $(WHEEL_DIR)/run
	cd $(WHEEL_DIR)/run && ../venv/bin/python $(abspath benchmarks/check_wheel.py) --installed

# --- integration -----------------------------------------------------------------
# The registry's torch 2.11 (a CUDA build, run on the CPU) has a torchvision, which
# timm needs; .venv-cuda (make cuda-check's venv) gets the real libraries, and
# lct_kernels is installed into it from a wheel built for torch 2.11 (CPU extension
# only), so the tests import site-packages, never the tree (whose .so is torch 2.13's).
INT_DIR := build-int
INT_PY := $(abspath $(CUDA_VENV))/bin/python
# Pins: the newest releases that install with torch 2.11 / numpy<2.4 / triton 3.6
# (torch 2.11 pins triton 3.6.0 itself); transformers is not needed by AutoencoderKL.
# torch and torchvision are restated so that pip never moves them (an unpinned
# torchvision requirement would otherwise pull a newer torch).
INT_TORCH ?= torch==2.11.0 torchvision==0.26.0
INT_DEPS := $(INT_TORCH) "timm==1.0.31" "diffusers==0.42.1" "torch-fidelity==0.4.0" \
  "tensorboard==2.21.0" "numpy<2.4" pytest hypothesis scipy pot scikit-learn tqdm matplotlib \
  safetensors pillow pyyaml

$(CUDA_VENV)/.integration-deps: $(CUDA_VENV)/bin/python
	$(CUDA_VENV)/bin/pip install -q $(INT_DEPS)
	$(CUDA_VENV)/bin/pip install -q --no-deps "torchcfm==1.0.7"
	touch $@

integration: $(CUDA_VENV)/.integration-deps
	$(call stage,$(INT_DIR)/src)
	rm -rf $(INT_DIR)/dist
	cd $(INT_DIR)/src && LCT_BUILD_CUDA=0 MAX_JOBS=$${MAX_JOBS:-2} \
	  $(INT_PY) -m pip wheel -q --no-build-isolation --no-deps . -w ../dist
	$(INT_PY) -m pip install -q --no-deps --force-reinstall $(INT_DIR)/dist/lct_kernels-*.whl
	cd $(INT_DIR) && export LCT_REQUIRE_INSTALLED=1 TRITON_INTERPRET=1; \
	  $(INT_PY) -m pytest ../tests -q -p no:cacheprovider -m "not integration"; suite=$$?; \
	  $(INT_PY) -m pytest ../tests -q -p no:cacheprovider -m integration; integ=$$?; \
	  echo "integration: suite exit $$suite, -m integration exit $$integ"; \
	  test $$suite -eq 0 && test $$integ -eq 0

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
	rm -rf build build-cuda build-wheel build-int dist runs *.egg-info lct_kernels/*.so lct_kernels/_build_info.json
