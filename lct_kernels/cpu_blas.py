"""Which library does the fused DiT's large fp32 CPU GEMMs: oneDNN or ATen's BLAS (MKL).

``cpu_gemm_choice()`` -> ("onednn" | "aten", reason), read by
``lct_kernels.ops.cpu_gemm.linear`` (where the measurements and the routing rules
are) and reported by ``python -m lct_kernels``:

* ``LCT_CPU_GEMM=onednn`` or ``=aten`` forces it (any other value raises);
* otherwise (``auto``) oneDNN on a CPU that is not Intel's when torch's BLAS is
  MKL (MKL takes its generic code path there), ATen's BLAS on Intel CPUs (MKL's own
  AVX-512 path) and where torch has no oneDNN.

A host setting, like ``cpu_heap``: it imports no op, so ``_backend`` may report it.
"""

import os

import torch

ENV = "LCT_CPU_GEMM"
CHOICES = ("auto", "onednn", "aten")


def cpuinfo_fields():
    """The first processor's fields of /proc/cpuinfo ({} where there is none: not Linux)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def _vendor():
    return cpuinfo_fields().get("vendor_id", "")


def _has_onednn():
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _blas_is_mkl():
    return "BLAS_INFO=mkl" in torch.__config__.show()


def cpu_gemm_choice(env=None):
    """("onednn" or "aten", reason): the CPU GEMM ``linear`` uses for large fp32 shapes.

    ``env``: the environment to read (default ``os.environ``).  Raises ValueError
    for an ``LCT_CPU_GEMM`` outside ``CHOICES``, and RuntimeError where
    ``LCT_CPU_GEMM=onednn`` is forced but this torch has no oneDNN."""
    env = os.environ if env is None else env
    want = (env.get(ENV) or "auto").strip().lower()
    if want not in CHOICES:
        raise ValueError(f"{ENV} must be one of {', '.join(CHOICES)}, got {env.get(ENV)!r}")
    if want == "aten":
        return "aten", f"{ENV}=aten"
    if not _has_onednn():
        if want == "onednn":
            raise RuntimeError(f"{ENV}=onednn, but this torch has no oneDNN "
                               "(torch.backends.mkldnn.is_available() is False)")
        return "aten", "torch has no oneDNN"
    if want == "onednn":
        return "onednn", f"{ENV}=onednn"
    vendor = _vendor()
    if not _blas_is_mkl():
        return "aten", "torch's BLAS is not MKL"
    if vendor == "GenuineIntel":
        return "aten", "Intel CPU: MKL's own code path"
    return "onednn", (f"{vendor or 'unknown vendor'} CPU: MKL takes its generic path, "
                      "oneDNN its ISA's")
