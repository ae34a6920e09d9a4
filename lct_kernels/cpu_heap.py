"""Keep freed activations in the CPU heap: no page faults for the next step's.

    tune_cpu_heap(mmap_threshold_mb=32, trim_threshold_mb=2047) -> bool

A CPU training step allocates and frees the same multi-megabyte activations every step.
With glibc's default malloc settings many of them are given back to the kernel when
freed (blocks above the mmap threshold are unmapped; free memory at the top of the heap
above the trim threshold is trimmed), so the next step touches fresh pages and pays a
page fault, and the kernel's zeroing, per 4 KiB.  Measured 2026-12-03 on the 2-vCPU
development machine (AMD EPYC, torch 2.13.0+cpu, 2 threads), DiT-S/2 on 4 x 16 x 16
latents, batch 64, fp32, lct_kernels' path: about 39 000 minor faults and 0.37 s of
system time per step (a 6 s step); with this setting 5 000 faults and 0.16 s, and the
step 2.7-3.8 % faster in two side-by-side runs (eager PyTorch 0-3.5 %; BENCHMARKS.md).

What it does: ``mallopt(M_MMAP_THRESHOLD, mmap_threshold_mb MiB)`` (blocks up to that size
come from the heap, and the threshold stops adapting) and ``mallopt(M_TRIM_THRESHOLD,
trim_threshold_mb MiB)`` (up to that much free memory stays at the top of the heap).
The cost: the process keeps up to its peak heap after a step, which a training loop
reaches again at every step anyway.  It is process-wide and affects every allocation
made afterwards, by torch or anything else; glibc only (Linux).  ``lct-train`` calls it
on CPU runs (``run.cpu_heap=true``, the default); the same effect for any process:
``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=2146435072`` in its environment.
"""

import ctypes
import ctypes.util
import platform

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MAX_MMAP_THRESHOLD_MB = 32  # glibc's HEAP_MAX_SIZE / 2 on 64-bit: mallopt refuses more
_MAX_TRIM_THRESHOLD_MB = 2047  # mallopt takes an int (bytes)

# the environment variables that set the same two thresholds at process start
MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

_STATE = {"applied": False, "reason": "not called"}


def _check_mb(name, value, high):
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise ValueError(f"tune_cpu_heap: {name} must be an int in [1, {high}] (MiB), got {value!r}")


def _glibc():
    if platform.system() != "Linux":
        return None, f"not Linux ({platform.system()}): glibc's mallopt is unavailable"
    libc_ver = platform.libc_ver()[0]
    if libc_ver != "glibc":
        return None, f"the C library is not glibc ({libc_ver or 'unknown'})"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError) as e:
        return None, f"cannot load glibc's mallopt: {e}"
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return mallopt, ""


def tune_cpu_heap(mmap_threshold_mb=_MAX_MMAP_THRESHOLD_MB, trim_threshold_mb=_MAX_TRIM_THRESHOLD_MB):
    """Make glibc's malloc keep freed blocks up to ``mmap_threshold_mb`` MiB, and up to
    ``trim_threshold_mb`` MiB of free memory, in the heap (see the module docstring).

    Returns True when both settings were applied, False where they cannot be (not
    Linux/glibc; :func:`cpu_heap_status` says why).  Raises ValueError for out-of-range
    arguments (mmap_threshold_mb in [1, 32], trim_threshold_mb in [1, 2047])."""
    _check_mb("mmap_threshold_mb", mmap_threshold_mb, _MAX_MMAP_THRESHOLD_MB)
    _check_mb("trim_threshold_mb", trim_threshold_mb, _MAX_TRIM_THRESHOLD_MB)
    mallopt, reason = _glibc()
    if mallopt is None:
        _STATE.update(applied=False, reason=reason)
        return False
    ok_mmap = mallopt(_M_MMAP_THRESHOLD, mmap_threshold_mb << 20) == 1
    ok_trim = mallopt(_M_TRIM_THRESHOLD, trim_threshold_mb << 20) == 1
    if not (ok_mmap and ok_trim):
        _STATE.update(applied=False, reason=f"mallopt refused (M_MMAP_THRESHOLD ok: {ok_mmap}, "
                                            f"M_TRIM_THRESHOLD ok: {ok_trim})")
        return False
    _STATE.update(applied=True, reason=f"mmap threshold {mmap_threshold_mb} MiB, trim threshold "
                                       f"{trim_threshold_mb} MiB")
    return True


def cpu_heap_status():
    """(applied: bool, reason: str) of the last :func:`tune_cpu_heap` call in this process."""
    return _STATE["applied"], _STATE["reason"]


def describe_cpu_heap(environ):
    """One line on this process's heap setting (``python -m lct_kernels``): tuned here,
    set through ``MALLOC_ENV`` in ``environ``, or glibc's defaults."""
    applied, reason = cpu_heap_status()
    if applied:
        return f"tuned by tune_cpu_heap: {reason}"
    if any(environ.get(k) for k in MALLOC_ENV):
        return "glibc's settings from the MALLOC_* environment (see env)"
    return ("glibc defaults (tune_cpu_heap not applied in this process; lct-train applies it "
            "on CPU runs)")
