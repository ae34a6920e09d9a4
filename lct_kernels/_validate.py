"""Argument checks shared by every op.

Errors name the function, the argument and the rule, e.g.
``cauchy_loss: c must be a finite number > 0, got -1.0``.  Value checks that
would need the value of a device tensor are done asynchronously
(``torch._assert_async``) so they never synchronise the host.
"""

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
REDUCTIONS = ("none", "mean", "sum")


def tensor(fn, name, x, *, floating=True):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if floating and x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{fn}: {name} must be float32, float16, bfloat16 or float64, got {x.dtype}"
        )
    return x


def batched(fn, name, x):
    """A floating (B, ...) tensor with B >= 1 and at least one element per sample."""
    tensor(fn, name, x)
    if x.dim() < 1:
        raise ValueError(f"{fn}: {name} must have a batch dimension (B, ...), got a 0-d tensor")
    if x.numel() == 0:
        raise ValueError(
            f"{fn}: {name} must have at least one sample and one element per sample, "
            f"got shape {tuple(x.shape)}"
        )
    return x


def like(fn, ref_name, ref, name, x):
    """x matches ref in shape, device and dtype."""
    tensor(fn, name, x)
    if x.shape != ref.shape:
        raise ValueError(
            f"{fn}: {name} must have the shape of {ref_name} {tuple(ref.shape)}, "
            f"got {tuple(x.shape)}"
        )
    same_device(fn, ref_name, ref, name, x)
    if x.dtype != ref.dtype:
        raise TypeError(f"{fn}: {name} must have {ref_name}'s dtype {ref.dtype}, got {x.dtype}")
    return x


def same_device(fn, ref_name, ref, name, x):
    if x.is_cpu and ref.is_cpu:  # the common case, without building two device objects
        return
    if x.device != ref.device:
        raise ValueError(
            f"{fn}: {name} is on {x.device} but {ref_name} is on {ref.device}; "
            "move them to one device"
        )


def per_sample(fn, name, x, ref_name, ref, *, allow_bool=False):
    """A (B,) tensor on ref's device, B = ref.shape[0]."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor of shape (B,), got {type(x).__name__}")
    if x.dtype == torch.bool:
        if not allow_bool:
            raise TypeError(f"{fn}: {name} must be a floating tensor, got torch.bool")
    elif allow_bool and not x.is_floating_point():
        if x.dtype.is_complex:
            raise TypeError(f"{fn}: {name} must be bool or 0/1, got {x.dtype}")
    elif not x.is_floating_point():
        raise TypeError(f"{fn}: {name} must be a floating tensor, got {x.dtype}")
    if x.shape != (ref.shape[0],):
        raise ValueError(
            f"{fn}: {name} must have shape ({ref.shape[0]},) (one value per sample of "
            f"{ref_name}), got {tuple(x.shape)}"
        )
    same_device(fn, ref_name, ref, name, x)
    return x


def choice(fn, name, value, options):
    if value not in options:
        raise ValueError(f"{fn}: {name} must be one of {', '.join(map(repr, options))}, got {value!r}")
    return value


def positive_scalar(fn, name, c, device):
    """A Python number or a 0-d/1-element floating tensor > 0, as a float64 0-d tensor on
    device (a torch.device).

    Python numbers are checked here.  A CPU tensor is checked here too; a CUDA
    tensor is checked on the device without a host synchronisation.
    """
    rule = f"{fn}: {name} must be a finite number > 0"
    if isinstance(c, torch.Tensor):
        if c.numel() != 1 or not c.is_floating_point():
            raise TypeError(f"{rule}, got a {c.dtype} tensor of shape {tuple(c.shape)}")
        if c.requires_grad:
            raise ValueError(
                f"{fn}: {name} must not require grad; the robust losses treat it as a constant"
            )
        c_t = c.reshape(()).to(device=device, dtype=torch.float64)
        if not torch.compiler.is_compiling():
            if c.device.type == "cpu":
                value = float(c)
                if not (math.isfinite(value) and value > 0):
                    raise ValueError(f"{rule}, got {value}")
            else:
                torch._assert_async((c_t > 0) & torch.isfinite(c_t), f"{rule} (checked on device)")
        return c_t
    if isinstance(c, bool) or not isinstance(c, numbers.Real):
        raise TypeError(f"{rule}, got {type(c).__name__}")
    if torch.compiler.is_compiling():
        return torch.full((), c, dtype=torch.float64, device=device)
    if not (math.isfinite(c) and c > 0):
        raise ValueError(f"{rule}, got {c}")
    return _cached_scalar(float(c), device)


# (value, device, inference mode, CUDA stream) -> 0-d float64 tensor.  In eager mode a
# Python c becomes the same read-only tensor on every call instead of a fresh allocation
# (and, on CUDA, a fill kernel) per call; the ops never write to it.  Bounded: a schedule
# with many distinct c values simply rebuilds the cache.
# On CUDA the key holds the current stream: the caching allocator frees a block in the
# order of the stream that allocated it, so a tensor used only on its own stream cannot be
# reused while a kernel queued on another stream still reads it (when the cache clears).
# During CUDA-graph capture nothing is cached: a tensor made there holds its value only
# once the graph replays, so it is made fresh (and captured) on every capture.
_SCALARS = {}
_SCALARS_MAX = 256


def _cached_scalar(value, device):
    stream = None
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return torch.full((), value, dtype=torch.float64, device=device)
        stream = torch.cuda.current_stream(device).cuda_stream
    key = (value, device, torch.is_inference_mode_enabled(), stream)
    t = _SCALARS.get(key)
    if t is None:
        if len(_SCALARS) >= _SCALARS_MAX:
            _SCALARS.clear()
        t = _SCALARS[key] = torch.full((), value, dtype=torch.float64, device=device)
    return t


def rows(x):
    """View (B, ...) as (B, N) with unit column stride (copying only when needed)."""
    x2 = x if x.dim() == 2 else x.reshape(x.shape[0], -1)  # a 2-D x needs no new view
    if x2.shape[1] > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    return x2


def f32(t):
    """t as a contiguous float32 tensor (t itself when it already is one), or None."""
    if t is None or (t.dtype == torch.float32 and t.is_contiguous()):
        return t
    return t.to(torch.float32).contiguous()
