"""Shared test helpers: the backends to test here, the tolerance rule, a call recorder."""

import torch

from lct_kernels import _backend

CPU_BACKENDS = [b for b in ("torch", "cpu", "triton") if _backend.status("robust_loss", b, "cpu")[0]]
HAS_TRITON_CPU = "triton" in CPU_BACKENDS
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}


def backends_for(device_type):
    names = ("torch", "cpu") if device_type == "cpu" else ("torch", "cuda")
    names += ("triton",)
    return [b for b in names if _backend.status("robust_loss", b, device_type)[0]]


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def assert_rule(out, ref64, torch_out, atol, what=""):
    """flash-attn's rule: the kernel's max error against a float64 reference is at most
    twice PyTorch's own error (same dtype) plus atol, atol scaled by the reference magnitude."""
    scale = max(1.0, ref64.abs().max().item())
    err = max_err(out, ref64)
    bound = 2 * max_err(torch_out, ref64) + atol * scale
    assert err <= bound, f"{what}: error {err:.3e} > bound {bound:.3e} (torch error {max_err(torch_out, ref64):.3e})"


def heavy_tailed(shape, dtype=torch.float32, outlier=1e4, frac=0.01):
    """Gaussian values with a fraction of impulsive outliers of the given magnitude."""
    x = torch.randn(shape, dtype=torch.float64)
    mask = torch.rand(shape, dtype=torch.float64) < frac
    x = torch.where(mask, outlier * torch.sign(torch.randn(shape, dtype=torch.float64)), x)
    return x.to(dtype)



def layer_norm64(x, weight, bias, shift, scale, eps):
    """Float64 layer norm of the trailing dim from the definition, with optional affine and
    DiT's adaLN modulate: ((x - mean) / sqrt(var + eps) * weight + bias) * (1 + scale[:, None])
    + shift[:, None] (biased variance; weight, bias (D,); shift, scale (B, D) for x (B, T, D))."""
    x = x.double()
    mean = x.mean(-1, keepdim=True)
    y = (x - mean) / torch.sqrt(((x - mean) ** 2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.double()
    if bias is not None:
        y = y + bias.double()
    if shift is not None:
        y = y * (1 + scale.double()[:, None]) + shift.double()[:, None]
    return y


def record_calls(monkeypatch, owner, name):
    """Wrap ``owner.name`` (a module's function) so that each call is recorded as
    (args, kwargs) in the returned list and still runs the real function."""
    calls = []
    real = getattr(owner, name)

    def recording(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, recording)
    return calls
