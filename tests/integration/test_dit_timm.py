"""patch_dit on facebookresearch/DiT's model, built here from timm's real modules.

facebookresearch/DiT's models.py builds its blocks from
``timm.models.vision_transformer``'s ``PatchEmbed``, ``Attention`` and ``Mlp``;
this file writes the same DiTBlock / FinalLayer / DiT (its forward verbatim,
modulate included) on the installed timm.  Contract: after ``patch_dit`` the
model's outputs and gradients equal the unpatched model's in float64 to fp32
tolerance (train and eval), and under bf16 autocast it is as close to float64
as the unpatched model under autocast; every modulate runs ``nsln_modulate``.
"""

import copy
import math

import pytest
import torch
from torch import nn

pytest.importorskip("timm")
from timm.models.vision_transformer import Attention, Mlp, PatchEmbed  # noqa: E402

import lct_kernels.ops.layer_norm as ln_ops  # noqa: E402
from lct_kernels.nn import FusedLayerNorm, NonScalingLayerNorm, patch_dit, unpatch_dit  # noqa: E402


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class DiTBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, **block_kwargs):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True, **block_kwargs)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        mlp_hidden_dim = int(hidden_size * mlp_ratio)
        approx_gelu = lambda: nn.GELU(approximate="tanh")  # noqa: E731
        self.mlp = Mlp(in_features=hidden_size, hidden_features=mlp_hidden_dim,
                       act_layer=approx_gelu, drop=0)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
            self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        x = modulate(self.norm_final(x), shift, scale)
        x = self.linear(x)
        return x


class DiT(nn.Module):
    """facebookresearch/DiT's DiT without its embedders' details (t enters by a Linear)."""

    def __init__(self, input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2,
                 num_heads=4, qk_norm=False):
        super().__init__()
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = nn.Sequential(nn.Linear(1, hidden_size), nn.SiLU(),
                                        nn.Linear(hidden_size, hidden_size))
        # timm's qk-norm LayerNorms (timm >= 1.0.20 asks for the norm_layer explicitly)
        qk = dict(qk_norm=True, norm_layer=nn.LayerNorm) if qk_norm else {}
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, **qk) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        with torch.no_grad():  # random weights: adaLN-zero's zero gates would hide errors
            for p in self.parameters():
                p.normal_(0, 1 / math.sqrt(p.shape[-1]) if p.dim() > 1 else 0.3)

    def forward(self, x, t):
        h = self.x_embedder(x)
        c = self.t_embedder(t[:, None])
        for block in self.blocks:
            h = block(h, c)
        return self.final_layer(h, c)


def run(model, x, t, autocast=False):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = model(x.to(next(model.parameters()).dtype), t.to(next(model.parameters()).dtype))
    (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach().double(), {n: p.grad.double() for n, p in model.named_parameters()
                                 if p.grad is not None}


def errors(got, want):
    """Max error of the output and of each gradient, relative to its own scale (a gradient
    that is zero in exact arithmetic, e.g. a k-norm bias's, to the model's gradient scale)."""
    (y, g), (y_ref, g_ref) = got, want
    floor = 1e-3 * max(v.abs().max().item() for v in g_ref.values())
    out = {"out": ((y - y_ref).abs().max() / y_ref.abs().max()).item()}
    for n in g_ref:
        out[n] = (g[n] - g_ref[n]).abs().max().item() / max(g_ref[n].abs().max().item(), floor)
    return out


def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 4, 8, 8, generator=g), torch.rand(3, generator=g)


@pytest.fixture
def kernel_calls(monkeypatch):
    calls = []
    real = ln_ops.nsln_modulate
    monkeypatch.setattr(ln_ops, "nsln_modulate",
                        lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    return calls


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("train", [True, False])
def test_timm_dit_fp32_matches_float64(qk_norm, train, kernel_calls):
    model = DiT(qk_norm=qk_norm).train(train)
    ref64 = copy.deepcopy(model).double()
    x, t = inputs()
    assert patch_dit(model) == 3
    assert model.training is train
    kernel_calls.clear()
    errs = errors(run(model, x, t), run(ref64, x, t))
    assert max(errs.values()) < 1e-4, errs
    assert len(kernel_calls) == 5
    if qk_norm:
        assert isinstance(model.blocks[0].attn.q_norm, FusedLayerNorm)
    assert unpatch_dit(model) == 3
    assert type(model.blocks[0].norm1) is nn.LayerNorm and "forward" not in model.blocks[0].__dict__


def test_timm_dit_bf16_autocast_is_as_close_to_float64_as_eager():
    model = DiT(qk_norm=True)
    eager, ref64 = copy.deepcopy(model), copy.deepcopy(model).double()
    x, t = inputs()
    patch_dit(model)
    want = run(ref64, x, t)
    errs = errors(run(model, x, t, autocast=True), want)
    errs_eager = errors(run(eager, x, t, autocast=True), want)
    for k in errs:
        assert errs[k] < 1.5 * errs_eager[k] + 1e-2, (k, errs[k], errs_eager[k])


def test_timm_dit_non_scaling():
    model = DiT(qk_norm=True)
    for blk in model.blocks:  # unit qk-norm weights: NsLN changes nothing at patch time
        blk.attn.q_norm.weight.data.fill_(1)
        blk.attn.k_norm.weight.data.fill_(1)
    ref64 = copy.deepcopy(model).double()
    keys = set(model.state_dict())
    assert patch_dit(model, non_scaling=True) == 3
    assert len(set(model.state_dict()) - keys) == 5  # norm1, norm2 x 2 blocks, norm_final
    assert isinstance(model.blocks[1].attn.k_norm, NonScalingLayerNorm)
    x, t = inputs()
    y, _ = run(model, x, t)
    y64, _ = run(ref64, x, t)
    assert ((y - y64).abs().max() / y64.abs().max()).item() < 1e-4
