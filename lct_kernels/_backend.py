"""Backend discovery and selection.

Four backends implement the kernel ops (the CPU-only families below take two):
    cuda    compiled CUDA kernels (lct_kernels._C_cuda), CUDA tensors
    triton  Triton kernels; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1
    cpu     compiled C++ kernels (lct_kernels._C), CPU tensors
    torch   the pure-PyTorch reference, any device

Rules:
  * ``backend=`` on an op, else the ``LCT_BACKEND`` environment variable, forces a
    backend.  A forced backend that cannot run raises ``BackendUnavailable`` with
    the reason.
  * Otherwise the choice follows the device: CUDA tensors use cuda, else triton,
    else torch; CPU tensors use cpu, else torch.  Falling back past the first
    choice warns once per (op, device, backend), naming what was missing.

  * CPU-only families (``CPU_ONLY_FAMILIES``: the fused bias + GELU, the gated
    residual and the fused RAdam step) have the cpu and torch backends only.  On CUDA
    tensors they run the torch path by design (ATen's CUDA GELU and torch's foreach
    RAdam are memory-bound already; the CPU kernels exist because ATen's CPU tanh,
    the for-loop RAdam and the per-op cost of small CPU elementwise ops are not),
    without a warning; forcing cuda or triton for them raises.

Everything the selection reads is computed once at import, so selection is a
few dictionary lookups and traces cleanly under ``torch.compile``.
"""

import importlib.util
import os
import warnings

import torch

from . import _ext
from .cpu_heap import MALLOC_ENV, describe_cpu_heap
from .cpu_blas import ENV as CPU_GEMM_ENV
from .cpu_blas import cpu_gemm_choice, cpuinfo_fields

BACKENDS = ("cuda", "triton", "cpu", "torch")
AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}

# op family -> the registered operators its compiled backends need.
OP_FAMILIES = {
    "robust_loss": ("lct::robust_loss",),
    "consistency_objective": ("lct::consistency_objective",),
    "layer_norm": ("lct::layer_norm_fwd", "lct::layer_norm_bwd"),
    "ot_assign": ("lct::ot_assign",),
    "bias_gelu": ("lct::bias_gelu_fwd", "lct::bias_gelu_bwd"),
    "radam": ("lct::radam_step",),
    "gated_residual": ("lct::gated_residual_fwd", "lct::gated_residual_bwd"),
}
# families with a C++ CPU kernel and no GPU kernel: their backends
CPU_ONLY_FAMILIES = {"bias_gelu": ("cpu", "torch"), "radam": ("cpu", "torch"),
                     "gated_residual": ("cpu", "torch")}

# dtypes the compiled and Triton kernels take; float64 always runs the torch reference.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None
CUDA_AVAILABLE = torch.cuda.is_available()


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run the requested op on the given device."""


def _has_kernel(qualname, key):
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key)
    except RuntimeError:  # the op itself is not registered
        return False


def _compiled_status(op, backend):
    ext = _ext.CUDA_EXT if backend == "cuda" else _ext.CPU_EXT
    if not ext.loaded:
        return False, f"extension {ext.name}: {ext.reason}"
    key = "CUDA" if backend == "cuda" else "CPU"
    missing = [q for q in OP_FAMILIES[op] if not _has_kernel(q, key)]
    if missing:
        return False, f"no {key} kernel registered for {', '.join(missing)}"
    if backend == "cuda" and not CUDA_AVAILABLE:
        return False, "torch.cuda.is_available() is False"
    return True, "ok"


def _triton_status(device_type):
    if not TRITON_IMPORTABLE:
        return False, "triton is not installed (pip install 'lct_kernels[triton]')"
    if device_type == "cuda":
        return (True, "ok") if CUDA_AVAILABLE else (False, "no CUDA device")
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, "ok (interpreter)"
    return False, "CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter)"


# (op, backend) -> (ok, reason) for the compiled backends; fixed after import.
_COMPILED = {(op, be): _compiled_status(op, be) for op in OP_FAMILIES for be in ("cuda", "cpu")}
_WARNED = set()


def status(op, backend, device_type):
    """(usable: bool, reason: str) for running ``op`` with ``backend`` on ``device_type``."""
    if backend == "torch":
        return True, "ok"
    if backend == "triton":
        if "triton" not in CPU_ONLY_FAMILIES.get(op, BACKENDS):
            return False, f"{op} has no triton kernel: a CPU kernel only"
        return _triton_status(device_type)
    if backend not in ("cuda", "cpu"):
        return False, f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}"
    if backend not in CPU_ONLY_FAMILIES.get(op, BACKENDS):
        return False, (f"{op} has no {backend} kernel: a CPU kernel only (CUDA tensors run "
                       "the torch path, see lct_kernels._backend)")
    if backend != device_type:
        return False, f"the {backend} backend runs on {backend} tensors, got {device_type} tensors"
    return _COMPILED[(op, backend)]


def requested_backend(backend, caller):
    """The forced backend name (argument first, then LCT_BACKEND), or None."""
    if backend is None:
        backend = os.environ.get("LCT_BACKEND") or None
        source = "LCT_BACKEND"
    else:
        source = "backend"
    if backend is not None and backend not in BACKENDS:
        raise ValueError(
            f"{caller}: {source} must be one of {', '.join(BACKENDS)} or None, got {backend!r}"
        )
    return backend


def select(op, device, backend=None, caller=None):
    """Pick the backend that runs ``op`` for tensors on ``device``."""
    caller = caller or op
    device_type = device.type if isinstance(device, torch.device) else str(device)
    forced = requested_backend(backend, caller)
    if forced is not None:
        ok, reason = status(op, forced, device_type)
        if not ok:
            raise BackendUnavailable(f"{caller}: backend {forced!r} is unavailable: {reason}")
        return forced
    order = AUTO_ORDER.get(device_type)
    if order is None:
        return "torch"
    order = tuple(b for b in order if b in CPU_ONLY_FAMILIES.get(op, BACKENDS))
    skipped = []
    for name in order:
        ok, reason = status(op, name, device_type)
        if ok:
            if skipped and not torch.compiler.is_compiling():
                key = (op, device_type, name)
                if key not in _WARNED:
                    _WARNED.add(key)
                    warnings.warn(
                        f"lct_kernels: {caller} on {device_type} tensors falls back to the "
                        f"{name!r} backend ({'; '.join(skipped)}). See lct_kernels.backend_info().",
                        RuntimeWarning,
                        stacklevel=3,
                    )
            return name
        skipped.append(f"{name}: {reason}")
    raise BackendUnavailable(f"{caller}: no backend can run on {device_type}")  # unreachable


# os.environ's own dict (keys encoded as the OS wants them): a membership test costs
# ~40 ns where os.environ.get (key encoding, Mapping.get) costs ~0.9 us, and
# pick_backend runs on every op call.  Writes through os.environ (monkeypatch.setenv
# included) update this dict, so nothing is cached.
_ENVIRON_DATA = getattr(os.environ, "_data", None)
_BACKEND_KEY = os.environ.encodekey("LCT_BACKEND") if _ENVIRON_DATA is not None else None


def _backend_env_unset():
    """Whether LCT_BACKEND is unset or empty."""
    if _ENVIRON_DATA is not None and _BACKEND_KEY not in _ENVIRON_DATA:
        return True
    return not os.environ.get("LCT_BACKEND")


def pick_backend(fn, family, x, backend):
    """The backend that runs op family ``family`` on tensor ``x`` for public op ``fn``.

    float64 always runs the torch reference (the kernels take KERNEL_DTYPES); forcing
    another backend for float64 raises TypeError.  Otherwise :func:`select` decides.
    """
    # The common case first, select's answer without its checks (about 2 us less per
    # call, which the demo's small ops pay ~50 times a step): a CPU tensor of a kernel
    # dtype, nothing forced, the cpu kernels loaded.
    if (backend is None and x.is_cpu and x.dtype in KERNEL_DTYPES
            and _backend_env_unset() and _COMPILED[(family, "cpu")][0]):
        return "cpu"
    if x.dtype not in KERNEL_DTYPES:
        forced = requested_backend(backend, fn)
        if forced not in (None, "torch"):
            raise TypeError(
                f"{fn}: the {forced} backend takes float32, float16 or bfloat16 inputs, got "
                f"{x.dtype}; use backend='torch' (float64 reference) or cast the inputs"
            )
        return "torch"
    return select(family, x.device, backend, fn)


def _cpu_model():
    """The CPU's model name from /proc/cpuinfo (Linux), with vendor, family, model and
    stepping (virtual machines often report a generic name), else platform's answer."""
    fields = cpuinfo_fields()
    name = fields.get("model name")
    if not name:
        import platform

        return platform.processor() or platform.machine()
    ids = [f"{k} {fields[k]}" for k in ("cpu family", "model", "stepping") if k in fields]
    detail = ", ".join([fields.get("vendor_id", "")] * bool(fields.get("vendor_id")) + ids)
    return f"{name} ({detail})" if detail else name


def cpu_info():
    """The CPU and how the kernels use it: model, the ISA path the C++ kernels take
    (AVX2+FMA or base, and why; from the loaded extension itself), torch's own
    CPU capability (the ISA of eager PyTorch's kernels), threads, the OpenMP
    settings that matter under contention, the heap setting (see README, Threads) and
    the GEMM the fused DiT's large fp32 CPU GEMMs use (lct_kernels.ops.cpu_gemm)."""
    if _ext.CPU_EXT.loaded and hasattr(torch.ops.lct, "_cpu_isa"):
        isa = torch.ops.lct._cpu_isa()
    else:
        isa = f"n/a (extension _C: {_ext.CPU_EXT.reason})"
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception as exc:  # noqa: BLE001 - report, never fail
        capability = f"unknown ({type(exc).__name__})"
    try:
        gemm = "%s (%s)" % cpu_gemm_choice()
    except (ValueError, RuntimeError) as exc:  # a bad LCT_CPU_GEMM: report it
        gemm = f"error: {exc}"
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    return {
        "model": _cpu_model(),
        "isa": isa,
        "torch_capability": capability,
        "torch_threads": torch.get_num_threads(),
        "usable_cpus": usable,
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY",
                                               "GOMP_SPINCOUNT", "LCT_CPU_ISA", CPU_GEMM_ENV)
                + MALLOC_ENV},
        "heap": describe_cpu_heap(os.environ),
        "gemm": gemm,
    }


def backend_info():
    """A structured report: versions, built extensions, and usable backends per op and device."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception as exc:  # noqa: BLE001 - report, never fail
        triton_version = f"unavailable ({type(exc).__name__}: {exc})"
    devices = ["cpu"] + (["cuda"] if CUDA_AVAILABLE else [])
    backends = {}
    for op in OP_FAMILIES:
        backends[op] = {}
        for dev in ("cpu", "cuda"):
            backends[op][dev] = {}
            for be in BACKENDS:
                if be in ("cpu", "cuda") and be != dev:
                    continue
                ok, reason = status(op, be, dev)
                backends[op][dev][be] = {"usable": ok, "reason": reason}
    info = {
        "versions": {
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "triton": triton_version,
            "python": ".".join(map(str, __import__("sys").version_info[:3])),
        },
        "build": _ext.BUILD_INFO,
        "extensions": {"_C": _ext.CPU_EXT.as_dict(), "_C_cuda": _ext.CUDA_EXT.as_dict()},
        "devices": devices,
        "cuda_device": torch.cuda.get_device_name(0) if CUDA_AVAILABLE else None,
        "cpu": cpu_info(),
        "LCT_BACKEND": os.environ.get("LCT_BACKEND"),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
        "backends": backends,
    }
    return info


def format_backend_info(info=None):
    """backend_info() as a human-readable table (what ``python -m lct_kernels`` prints)."""
    info = info or backend_info()
    lines = ["lct_kernels environment", ""]
    for k, v in info["versions"].items():
        lines.append(f"  {k:<12} {v}")
    lines.append(f"  {'devices':<12} {', '.join(info['devices'])}"
                 + (f" ({info['cuda_device']})" if info["cuda_device"] else ""))
    cpu = info.get("cpu")
    if cpu:
        env = ", ".join(f"{k}={v}" for k, v in cpu["env"].items() if v is not None) or "none set"
        lines += ["", "CPU",
                  f"  {'model':<12} {cpu['model']}",
                  f"  {'isa path':<12} {cpu['isa']}",
                  f"  {'torch isa':<12} {cpu['torch_capability']} (eager PyTorch's CPU kernels)",
                  f"  {'threads':<12} {cpu['torch_threads']} torch threads, "
                  f"{cpu['usable_cpus']} usable CPUs",
                  f"  {'env':<12} {env}",
                  f"  {'heap':<12} {cpu['heap']}",
                  f"  {'fp32 gemm':<12} {cpu['gemm']}: the fused DiT's large CPU GEMMs "
                  "(lct_kernels.ops.cpu_gemm)"]
    lines += ["", "Compiled extensions"]
    for name, ext in info["extensions"].items():
        extra = ""
        if ext.get("loaded"):
            extra = f" [torch {ext.get('built_with_torch')}, {ext.get('compiler')}"
            extra += f", archs {ext['cuda_archs']}]" if ext.get("cuda_archs") else "]"
        lines.append(f"  {name:<8} {'yes' if ext['loaded'] else 'no ':<4} {ext['reason']}{extra}")
    build = info.get("build") or {}
    if build:
        lines.append(f"  build record: variants {build.get('variants')}, cuda: {build.get('cuda')}"
                     + (f", archs {build['cuda_archs']}" if build.get("cuda_archs") else ""))
    lines += ["", "Backends (op / device / backend: usable, reason)"]
    for op, per_dev in info["backends"].items():
        for dev, per_be in per_dev.items():
            for be, st in per_be.items():
                mark = "yes" if st["usable"] else "no "
                lines.append(f"  {op:<22} {dev:<5} {be:<7} {mark}  {st['reason']}")
    lines.append("")
    lines.append(f"  LCT_BACKEND={info['LCT_BACKEND']}  TRITON_INTERPRET={info['TRITON_INTERPRET']}")
    return "\n".join(lines)
