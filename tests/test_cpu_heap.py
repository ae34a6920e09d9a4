"""lct_kernels.tune_cpu_heap: freed CPU activations stay in the heap.

Specification:
* a process that allocates, writes and frees the same multi-megabyte blocks every
  "step" takes (almost) no page faults per step after tune_cpu_heap(); the same
  workload without it faults on most of its pages (glibc trims the heap top); counted
  with getrusage's minor faults, in fresh subprocesses;
* out-of-range arguments raise ValueError naming the argument and its range;
* where glibc's mallopt is unavailable it returns False and says why (never silently);
* lct-train calls it for CPU runs with run.cpu_heap=true (the default), not with
  run.cpu_heap=false, and warns when it cannot be applied.
"""

import platform
import subprocess
import sys
import warnings

import pytest

import lct_kernels
from lct_kernels import cpu_heap

# One "step" through glibc's malloc itself (what torch's CPU allocator calls): 8 blocks
# of 24 MiB, every page written, then freed.  Untuned, glibc trims the freed 192 MiB off
# the heap top (its adaptive trim threshold stops at 64 MiB), so every step faults again.
WORKLOAD = r"""
import ctypes, resource, sys
import lct_kernels
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
if sys.argv[1] == "tuned":
    assert lct_kernels.tune_cpu_heap(), lct_kernels.cpu_heap_status()
SIZE = 24 << 20
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():
    blocks = [libc.malloc(SIZE) for _ in range(8)]
    assert all(blocks)
    f0 = faults()
    for b in blocks:
        ctypes.memset(b, 1, SIZE)
    f = faults() - f0
    for b in blocks:
        libc.free(b)
    return f
step()
print(sum(step() for _ in range(5)) / 5)
"""
PAGES_PER_STEP = 8 * 24 * 2**20 // 4096


def faults_per_step(mode):
    out = subprocess.run([sys.executable, "-c", WORKLOAD, mode], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="glibc only")
def test_tuned_heap_takes_no_page_faults_per_step():
    plain, tuned = faults_per_step("plain"), faults_per_step("tuned")
    assert plain > 0.5 * PAGES_PER_STEP, (plain, tuned)  # the workload does fault untuned
    assert tuned < 0.02 * PAGES_PER_STEP, (plain, tuned)


@pytest.mark.parametrize("kwargs, name, rng", [
    (dict(mmap_threshold_mb=0), "mmap_threshold_mb", "[1, 32]"),
    (dict(mmap_threshold_mb=33), "mmap_threshold_mb", "[1, 32]"),
    (dict(mmap_threshold_mb=True), "mmap_threshold_mb", "[1, 32]"),
    (dict(mmap_threshold_mb=1.5), "mmap_threshold_mb", "[1, 32]"),
    (dict(trim_threshold_mb=0), "trim_threshold_mb", "[1, 2047]"),
    (dict(trim_threshold_mb=2048), "trim_threshold_mb", "[1, 2047]"),
])
def test_bad_arguments_name_the_argument_and_range(kwargs, name, rng):
    with pytest.raises(ValueError, match=rf"tune_cpu_heap: {name} must be an int in \{rng}"):
        lct_kernels.tune_cpu_heap(**kwargs)


def test_without_glibc_it_returns_false_and_says_why(monkeypatch):
    monkeypatch.setattr(cpu_heap.platform, "system", lambda: "Darwin")
    assert lct_kernels.tune_cpu_heap() is False
    applied, reason = lct_kernels.cpu_heap_status()
    assert not applied and "not Linux (Darwin)" in reason


def _trainer(tmp_path, **overrides):
    from lct_kernels.train.config import build_config
    from lct_kernels.train.loop import Trainer
    from test_train_formulas import synthetic_data

    items = {"model.size": "tiny", "model.depth": 1, "model.hidden_size": 32,
             "model.num_heads": 2, "model.patch_size": 2, "optim.batch_size": 16,
             "run.steps": 1, "run.device": "cpu", "run.progress": False,
             "run.tensorboard": False, "run.precision": "fp32"}
    items.update(overrides)
    cfg = build_config("slct", overrides=[f"{k}={v}" for k, v in items.items()])
    return Trainer(cfg, tmp_path, data=synthetic_data(), overwrite=True)


@pytest.mark.parametrize("setting, calls", [("true", 1), ("false", 0)])
def test_trainer_tunes_the_heap_on_cpu_runs_only_when_asked(tmp_path, monkeypatch, setting, calls):
    import lct_kernels.train.loop as loop

    seen = []
    monkeypatch.setattr(loop, "tune_cpu_heap", lambda: seen.append(1) or True)
    _trainer(tmp_path, **{"run.cpu_heap": setting})
    assert len(seen) == calls


def test_trainer_warns_when_the_heap_cannot_be_tuned(tmp_path, monkeypatch):
    import lct_kernels.train.loop as loop

    monkeypatch.setattr(cpu_heap.platform, "system", lambda: "Darwin")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(tmp_path)
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert any("run.cpu_heap=true could not be applied (not Linux (Darwin)" in m for m in msgs), msgs
    assert loop.cpu_heap_status()[0] is False
