"""Benchmark cases for NsLN and the fused NsLN + adaLN modulate (shared by report.py
and the pytest-benchmark suite).

Baselines:
    eager    F.layer_norm followed by DiT's eager modulate x * (1 + scale) + shift
             (or F.layer_norm with a bias and no weight, for plain NsLN)
    compile  torch.compile of that same function
    liger / apex  their LayerNorm, when installed (not on the development machine)
    lct-*    lct_kernels with a forced backend
"""

import importlib.util
import math

import torch
import torch.nn.functional as F

import lct_kernels as L
from cases import compile_fn, lct_backends

# (B, T, D, modulate): DiT-B/2 and DiT-XL/2 block norms, qk-norm rows of head_dim 64,
# and a long-row case.
GPU_SHAPES = {
    "DiT-B/2 256x256x768 mod": (256, 256, 768, True),
    "DiT-XL/2 256x256x1152 mod": (256, 256, 1152, True),
    "qk-norm 786432x64": (256 * 12 * 256, 1, 64, False),
    "long 4096x8192": (4096, 1, 8192, False),
}
CPU_SHAPES = {
    "32x256x768 mod": (32, 256, 768, True),
    "32x256x1152 mod": (32, 256, 1152, True),
    "qk-norm 98304x64": (32 * 12 * 256, 1, 64, False),
    "long 512x8192": (512, 1, 8192, False),
}
TINY_SHAPES = {  # report.py --tiny: a plumbing check, not a measurement
    "tiny 2x8x64 mod": (2, 8, 64, True),
    "tiny 64x32": (64, 1, 32, False),
}


def eager_modulate(x, shift, scale, bias):
    D = x.shape[-1]
    return F.layer_norm(x, (D,), None, bias, 1e-6) * (1 + scale[:, None]) + shift[:, None]


def eager_nsln(x, bias):
    return F.layer_norm(x, (x.shape[-1],), None, bias, 1e-5)


def impls(device, modulate):
    base = eager_modulate if modulate else eager_nsln
    out = {"eager": base, "compile": compile_fn(base)}
    if not modulate and device == "cuda":
        out.update(_peer_layer_norms())
    for be in lct_backends(device):
        if modulate:
            out[f"lct-{be}"] = lambda x, sh, sc, b, be=be: L.nsln_modulate(x, sh, sc, b, backend=be)
        else:
            out[f"lct-{be}"] = lambda x, b, be=be: L.non_scaling_layer_norm(x, x.shape[-1], b,
                                                                             backend=be)
    return out


def _peer_layer_norms():
    """Liger's and Apex's LayerNorm (unit weight), where installed and importable."""
    peers = {}
    if importlib.util.find_spec("liger_kernel") is not None:
        try:
            from liger_kernel.ops.layer_norm import LigerLayerNormFunction

            peers["liger"] = lambda x, b: LigerLayerNormFunction.apply(x, torch.ones_like(b), b, 1e-5)
        except ImportError:
            pass
    if importlib.util.find_spec("apex") is not None:
        try:
            from apex.normalization import fused_layer_norm_affine

            peers["apex"] = lambda x, b: fused_layer_norm_affine(
                x, torch.ones_like(b), b, (x.shape[-1],), 1e-5)
        except ImportError:
            pass
    return peers


def inputs(shape, dtype, device):
    """(args, grad_out) for one case."""
    B, T, D, modulate = shape
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*s, scale=1.0):
        return (scale * torch.randn(*s, generator=g)).to(device=device, dtype=dtype).requires_grad_()

    x = rand(B, T, D) if modulate else rand(B * T, D)
    bias = rand(D)
    grad_out = torch.randn(x.shape, generator=g).to(device=device, dtype=dtype)
    if modulate:
        return (x, rand(B, D), rand(B, D, scale=0.1), None), grad_out
    return (x, bias), grad_out


def floor_bytes(shape, dtype):
    """Fewest bytes for fwd+bwd: read x, write y; read dy and x, write dx."""
    B, T, D, _ = shape
    return 5 * B * T * D * torch.empty((), dtype=dtype).element_size()


def numel(shape):
    return math.prod(shape[:3])
