"""DiT (adaLN-zero) for consistency training, with sLCT's non-scaling LayerNorm.

The norms, as in the authors' DiT (quandao10/LCT models/network_dit.py; block norms
as facebookresearch/DiT):

* norm1, norm2, norm_final: LayerNorm over the hidden size without affine
  parameters (eps 1e-6), followed by adaLN's modulate;
* qk-norm (per head, over head_dim, eps 1e-5 as timm's LayerNorm default):
  ``nsln=True`` (sLCT): NsLN, the weight frozen at 1, a learnable bias;
  ``nsln=False`` (iCT / plain DiT): LayerNorm with learnable weight and bias;
* ``norm_bias=True`` (an option, not in the paper): a learnable zero-initialised bias
  on norm1/norm2/norm_final, added before the modulation (the model of this trainer
  before issue 13; the demo preset keeps it).

``fused`` picks the kernels (``lct_kernels.nsln_modulate``, ``NonScalingLayerNorm``,
``FusedLayerNorm``, the MLP's fused bias + GELU, the fused gated residual, and on the
CPU the explicit attention for short sequences, see ``attention``) or the
same math in eager PyTorch: a backend choice with the same
parameters and state_dict, never a different model.

Precision: under autocast the two ends of the network run in fp32 (``fp32_ends``):
the patch embedding of the input and the final layer (adaLN modulation, norm and
output projection); the transformer blocks run in bf16.  The residual stream is
fp32 throughout (the fp32 pos_embed promotes it).

Shapes: x (B, C, H, W) with H == W == input_size; t (B,) float (the caller's time
input, e.g. 250 * ln(sigma), may be negative); y (B,) int64 or None.
"""

import contextlib
import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.layer_norm import FusedLayerNorm, NonScalingLayerNorm
from ..ops import bias_gelu as _gelu
from ..ops import cpu_gemm as _gemm
from ..ops import gated_residual as _gated
from ..ops import layer_norm as _ln

DIT_SIZES = {
    "tiny": dict(depth=4, hidden_size=128, num_heads=4),
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}

_EPS = 1e-6  # DiT's block-norm eps (norm1, norm2, norm_final)
_QK_EPS = 1e-5  # qk-norm eps: timm's Attention builds it with LayerNorm's default


# Longest sequence for which the fused model's CPU attention is the explicit
# softmax(q k^T / sqrt(d)) v (see attention).
MATH_ATTENTION_MAX_TOKENS = 32


def _apply_linear(module, x, fused, with_bias=True):
    """``module(x)`` for an nn.Linear (without its bias: ``with_bias=False``); the fused
    model's large fp32 CPU GEMMs through ``lct_kernels.ops.cpu_gemm.linear`` (oneDNN
    where MKL is slow).  A replaced or hooked module (LoRA, adapters) is called as is."""
    bias = module.bias if with_bias else None
    if not fused or type(module) is not nn.Linear or module._forward_hooks \
            or module._forward_pre_hooks:
        return module(x) if with_bias else F.linear(x, module.weight)
    return _gemm.linear(x, module.weight, bias)


def attention(q, k, v, dropout_p=0.0, math_on_cpu=False):
    """Softmax attention: (B, heads, T, d) x3 -> (B, heads, T, d).

    ``F.scaled_dot_product_attention``, except with ``math_on_cpu`` for CPU tensors,
    no dropout and T <= MATH_ATTENTION_MAX_TOKENS: then the same formula as three
    ops, ``softmax(q k^T / sqrt(d)) v``.  Why: PyTorch's CPU flash-attention kernel
    costs about 2 us per (sample, head) problem whatever its size, and at short
    sequences that is most of its time.  Measured 2026-12-02 (2 threads, fp32,
    forward + backward): (128, 4, 4, 32), the demo's blocks, 2.61 -> 0.97 ms, and the
    demo's whole training step 73.9 -> 64.6 ms; (128, 6, 32, 64) 19.9 -> 13.3 ms.
    At (64, 6, 64, 64), DiT-S/2 on 16 x 16 latents, the op alone was 29.1 -> 25.3 ms
    but the whole step 1.6 % slower (its (B, heads, T, T) temporaries are 6 MB a
    block), so SDPA keeps T > 32, and CUDA."""
    T = q.shape[-2]
    if not (math_on_cpu and q.is_cpu and dropout_p == 0.0 and T <= MATH_ATTENTION_MAX_TOKENS):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    # the scale on the (T, T) logits (in place: matmul's backward does not need its
    # output), not on q: fewer elements when T < d
    logits = torch.matmul(q, k.transpose(-2, -1)).mul_(1.0 / math.sqrt(q.shape[-1]))
    return torch.matmul(logits.softmax(-1), v)


def num_parameters(model):
    """Number of trainable parameters (frozen NsLN unit weights excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def timestep_features(t, dim=256, max_period=10000.0):
    """Sinusoidal features of t: (B,) float -> (B, dim) float32 ([cos | sin]).

    Always fp32: |t| reaches ~1.5e3 here and bf16 phases would be meaningless.
    Negative t is fine (the features are just odd/even in t)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                           device=t.device) / half)
    args = t.to(torch.float32)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_pos_embed_2d(dim, grid):
    """Fixed 2-D sin-cos positional embedding: (grid * grid, dim) float32.

    Half of the channels encode the row, half the column; each half is [sin | cos]
    over dim / 4 geometric frequencies (MAE / DiT convention). dim % 4 == 0."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    pos = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")

    def encode(p):  # (grid * grid,) -> (grid * grid, dim / 2)
        a = p.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(a), torch.cos(a)], dim=1)

    # Column first then row, as the reference implementation orders them.
    return torch.cat([encode(cols), encode(rows)], dim=1).float()


def _qk_norm(head_dim, nsln, fused, backend):
    if fused:
        norm = (NonScalingLayerNorm if nsln else FusedLayerNorm)(head_dim, eps=_QK_EPS)
        norm.backend = backend
        return norm
    norm = nn.LayerNorm(head_dim, eps=_QK_EPS)
    if nsln:  # eager NsLN: the same frozen unit weight, so state_dicts match the fused model
        norm.weight.requires_grad_(False)
    return norm


class ModulatedNorm(nn.Module):
    """adaLN's ``(LN(x) + bias) * (1 + scale[:, None]) + shift[:, None]``, LN without affine
    (eps 1e-6).

    forward(x (B, T, D), shift (B, D), scale (B, D)) -> (B, T, D) in x's dtype
    (plain-PyTorch variant: whatever type promotion / autocast gives).
    ``bias`` (D,) exists only with ``bias=True`` (zero-initialised, learnable)."""

    def __init__(self, dim, bias=False, fused=True, backend=None):
        super().__init__()
        self.dim = dim
        self.eps = _EPS
        self.fused = bool(fused)
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None
        self.backend = backend

    def forward(self, x, shift, scale):
        if self.fused:
            # The kernel wants one dtype for x, shift, scale and bias outside autocast
            # (and accepts a mix under it); casting to x's dtype is right in both
            # cases and keeps autograd to the fp32 parameters through .to().
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return _ln.nsln_modulate(x, shift.to(x.dtype), scale.to(x.dtype), bias, self.eps,
                                     backend=self.backend)
        h = F.layer_norm(x, (self.dim,), None, self.bias, self.eps)
        return h * (1 + scale[:, None]) + shift[:, None]

    def extra_repr(self):
        return f"{self.dim}, bias={self.bias is not None}, fused={self.fused}"


class Attention(nn.Module):
    """Multi-head self-attention with per-head qk-norm: (B, T, D) -> (B, T, D)."""

    def __init__(self, dim, num_heads, nsln, fused, dropout, backend):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.dropout = dropout
        self.fused = bool(fused)
        self.big_gemm = self.fused and backend != "torch"  # cpu_gemm.linear (see _apply_linear)
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.q_norm = _qk_norm(self.head_dim, nsln, fused, backend)
        self.k_norm = _qk_norm(self.head_dim, nsln, fused, backend)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x, fold_bias=False):
        """``fold_bias``: return the output projection without its bias (the caller
        adds ``self.proj.bias``); only valid where the dropout after it is inactive."""
        B, T, D = x.shape
        qkv = _apply_linear(self.qkv, x, self.big_gemm)
        qkv = qkv.reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, T, head_dim)
        q, k = self.q_norm(q), self.k_norm(k)
        # SDPA wants one dtype; the eager LayerNorm may have promoted q, k to fp32 under
        # autocast while v stayed in the Linear's dtype.
        q, k = q.to(v.dtype), k.to(v.dtype)
        drop = self.dropout if self.training else 0.0
        out = attention(q, k, v, drop, math_on_cpu=self.fused)
        out = out.transpose(1, 2).reshape(B, T, D)
        if fold_bias:  # the caller adds proj's bias (no dropout to apply after it)
            return _apply_linear(self.proj, out, self.big_gemm, with_bias=False)
        return self.proj_drop(_apply_linear(self.proj, out, self.big_gemm))


class Mlp(nn.Module):
    """Linear -> GELU(tanh) -> Linear, with dropout: (B, T, D) -> (B, T, D).

    ``fused``: fc1's bias and the GELU in one pass (``lct_kernels.ops.bias_gelu``;
    the C++ kernel on the CPU, the same eager ops on CUDA); the parameters are the same."""

    def __init__(self, dim, hidden, dropout, fused=False, backend=None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)
        self.fused = bool(fused)
        self.backend = backend
        self.big_gemm = self.fused and backend != "torch"  # cpu_gemm.linear (see _apply_linear)

    def forward(self, x, fold_bias=False):
        """``fold_bias``: return fc2's output without its bias (the caller adds
        ``self.fc2.bias``); only valid where the dropout after it is inactive."""
        if self.fused:
            h = _gelu.linear_gelu(x, self.fc1.weight, self.fc1.bias, backend=self.backend)
        else:
            h = F.gelu(self.fc1(x), approximate="tanh")
        if fold_bias:
            return _apply_linear(self.fc2, self.drop(h), self.big_gemm, with_bias=False)
        return self.drop(_apply_linear(self.fc2, self.drop(h), self.big_gemm))


class DiTBlock(nn.Module):
    """adaLN-zero transformer block: forward(x (B, T, D), c (B, D)) -> (B, T, D)."""

    def __init__(self, dim, num_heads, mlp_ratio, nsln, fused, dropout, backend, norm_bias=False):
        super().__init__()
        self.norm1 = ModulatedNorm(dim, norm_bias, fused, backend)
        self.attn = Attention(dim, num_heads, nsln, fused, dropout, backend)
        self.norm2 = ModulatedNorm(dim, norm_bias, fused, backend)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout, fused, backend)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.fused = bool(fused)
        self.backend = backend
        self.dropout = dropout

    def forward(self, x, c):
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, 1)
        if self.fused:
            # x + gate[:, None] * (y + b) in one pass (and one in the backward), with the
            # bias b of the Linear producing y folded in on the CPU, so that Linear is a
            # plain GEMM (CPU addmm's bias broadcast costs two passes over its output;
            # CUDA's GEMM epilogue adds it for free, and CUDA runs the eager formula);
            # not where a dropout follows that Linear in training
            fold = (x.is_cpu and self.backend != "torch"
                    and not (self.training and self.dropout > 0))
            y = self.attn(self.norm1(x, shift_a, scale_a), fold_bias=fold)
            x = _gated.gated_residual(x, gate_a, y, self.attn.proj.bias if fold else None,
                                      backend=self.backend)
            y = self.mlp(self.norm2(x, shift_m, scale_m), fold_bias=fold)
            return _gated.gated_residual(x, gate_m, y, self.mlp.fc2.bias if fold else None,
                                         backend=self.backend)
        x = x + gate_a[:, None] * self.attn(self.norm1(x, shift_a, scale_a))
        return x + gate_m[:, None] * self.mlp(self.norm2(x, shift_m, scale_m))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) + norm + Linear: (B, T, D), c (B, D) -> (B, T, p * p * C)."""

    def __init__(self, dim, patch_size, out_channels, norm_bias, fused, backend):
        super().__init__()
        self.norm_final = ModulatedNorm(dim, norm_bias, fused, backend)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, 1)
        return self.linear(self.norm_final(x, shift, scale))


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"DiT: {name} must be an int >= {low}, got {value!r}")


def _check_real(name, value, ok, want):
    # NaN fails every comparison, so it is rejected too.
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not ok(value):
        raise ValueError(f"DiT: {name} must be a number {want}, got {value!r}")


class DiT(nn.Module):
    """Diffusion transformer with adaLN-zero; see the module docstring for the norm variants
    and the precision.

    forward(x (B, C, H, W) float, t (B,) float, y (B,) int64 or None) -> (B, C, H, W) in
    x's dtype. y must be given iff num_classes > 0. A freshly built model outputs zeros."""

    # Under autocast, run the patch embedding and the final layer in fp32 (False: the
    # whole network under autocast, as before issue 13; kept for the precision test).
    fp32_ends = True

    def __init__(self, input_size, in_channels, patch_size=2, hidden_size=384, depth=12,
                 num_heads=6, mlp_ratio=4.0, num_classes=0, nsln=True, fused=True, dropout=0.0,
                 backend=None, norm_bias=False):
        super().__init__()
        _check_int("input_size", input_size, 1)
        _check_int("in_channels", in_channels, 1)
        _check_int("patch_size", patch_size, 1)
        if patch_size not in (1, 2, 4) or input_size % patch_size:
            raise ValueError(f"DiT: patch_size must be 1, 2 or 4 and divide input_size "
                             f"({input_size}), got {patch_size!r}")
        _check_int("depth", depth, 1)
        _check_int("num_heads", num_heads, 1)
        _check_int("hidden_size", hidden_size, 1)
        # The 2-D sin-cos embedding splits the channels into 2 axes x (sin, cos).
        if hidden_size % 4:
            raise ValueError(f"DiT: hidden_size must be divisible by 4, got {hidden_size}")
        if hidden_size % num_heads:
            raise ValueError(f"DiT: hidden_size ({hidden_size}) must be divisible by num_heads "
                             f"({num_heads})")
        _check_real("mlp_ratio", mlp_ratio, lambda v: v > 0, "> 0")
        _check_int("num_classes", num_classes, 0)
        _check_real("dropout", dropout, lambda v: 0.0 <= v < 1.0, "in [0, 1)")

        self.input_size, self.in_channels, self.patch_size = input_size, in_channels, patch_size
        self.hidden_size, self.num_heads, self.num_classes = hidden_size, num_heads, num_classes
        self.nsln, self.fused, self.norm_bias = bool(nsln), bool(fused), bool(norm_bias)
        self.grid = input_size // patch_size

        self.x_embedder = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        # Not persistent: it is a pure function of the config, so checkpoints stay small
        # and load regardless of how it was computed.
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, self.grid)[None],
                             persistent=False)
        self.t_embedder = nn.Sequential(nn.Linear(256, hidden_size), nn.SiLU(),
                                        nn.Linear(hidden_size, hidden_size))
        self.y_embedder = nn.Embedding(num_classes, hidden_size) if num_classes > 0 else None
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio, nsln, fused, dropout, backend, norm_bias)
            for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels, norm_bias, fused,
                                      backend)
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():  # DiT's base init
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        # Patch embedding initialised like a Linear on the flattened kernel.
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.t_embedder[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder[2].weight, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.weight, std=0.02)
        # adaLN-zero: every residual branch and the output start at zero, so each
        # block is the identity and the model outputs 0 at initialisation.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def _check_inputs(self, x, t, y):
        size = self.input_size
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != (
                self.in_channels, size, size):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"DiT: x must be (B, {self.in_channels}, {size}, {size}), got {shape}")
        B = x.shape[0]
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (B,):
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"DiT: t must be a ({B},) tensor, got {shape}")
        if self.num_classes == 0:
            if y is not None:
                raise ValueError("DiT: y must be None for an unconditional model (num_classes=0)")
        elif y is None:
            raise ValueError(f"DiT: y (class labels, (B,) int64) is required: num_classes="
                             f"{self.num_classes}")
        elif not isinstance(y, torch.Tensor) or tuple(y.shape) != (B,):
            raise ValueError(f"DiT: y must be a ({B},) int64 tensor")

    def unpatchify(self, h):
        """(B, T, p * p * C) -> (B, C, H, W); token t is grid cell (t // grid, t % grid)."""
        B, p, g, C = h.shape[0], self.patch_size, self.grid, self.in_channels
        h = h.reshape(B, g, g, p, p, C)
        return h.permute(0, 5, 1, 3, 2, 4).reshape(B, C, g * p, g * p)

    def _ends(self, x):
        """The context of the network's two ends: autocast off (fp32) when ``fp32_ends``."""
        if self.fp32_ends and torch.is_autocast_enabled(x.device.type):
            return torch.autocast(x.device.type, enabled=False)
        return contextlib.nullcontext()

    def forward(self, x, t, y=None):
        self._check_inputs(x, t, y)
        # (B, D, g, g) -> (B, T, D).  In fp32 under autocast (fp32_ends): bf16 rounding of
        # the input here reaches the output almost undamped.  The fp32 pos_embed keeps the
        # residual stream fp32 under autocast (type promotion), as in the reference DiT.
        with self._ends(x):
            h = self.x_embedder(x.to(self.x_embedder.weight.dtype)).flatten(2).transpose(1, 2)
            h = h + self.pos_embed
        # Features are computed in fp32; cast to the MLP's dtype so a model converted with
        # .to(torch.bfloat16) runs without autocast (under autocast the weight stays fp32).
        c = self.t_embedder(timestep_features(t).to(self.t_embedder[0].weight.dtype))
        if self.y_embedder is not None:
            c = c + self.y_embedder(y)
        for block in self.blocks:
            h = block(h, c)
        with self._ends(x):  # the output projection in fp32: its rounding is the loss's floor
            dtype = self.final_layer.linear.weight.dtype
            out = self.final_layer(h.to(dtype), c.to(dtype))
        return self.unpatchify(out).to(x.dtype)


def build_dit(size, input_size, in_channels, patch_size=2, num_classes=0, nsln=True, fused=True,
              dropout=0.0, backend=None, depth=None, hidden_size=None, num_heads=None,
              norm_bias=False):
    """DiT of a named size (``DIT_SIZES``; case-insensitive, e.g. "s" or "XL"); ``depth``,
    ``hidden_size`` and ``num_heads`` override the size's values when given."""
    by_lower = {k.lower(): k for k in DIT_SIZES}
    key = by_lower.get(size.lower()) if isinstance(size, str) else None
    if key is None:
        raise ValueError(f"build_dit: size must be one of {list(DIT_SIZES)}, got {size!r}")
    dims = dict(DIT_SIZES[key])
    for name, value in (("depth", depth), ("hidden_size", hidden_size), ("num_heads", num_heads)):
        if value:
            dims[name] = value
    return DiT(input_size, in_channels, patch_size=patch_size, num_classes=num_classes, nsln=nsln,
               fused=fused, dropout=dropout, backend=backend, norm_bias=norm_bias, **dims)
