"""lct_kernels' LayerNorms inside real timm modules.

* ``timm.layers.Attention(dim, num_heads, qk_norm=True, norm_layer=NonScalingLayerNorm)``:
  forward and backward equal a float64 attention written out here, with NsLN
  (x - mean) / sqrt(var + eps) + bias on q and k over head_dim.
* ``timm.models.VisionTransformer(norm_layer=NonScalingLayerNorm)``: every norm is
  our NsLN; outputs and gradients equal the same ViT built with torch's
  ``nn.LayerNorm`` (unit weight: NsLN's definition) and the same parameters.
* ``patch_layernorms`` on a timm ViT (random affine LayerNorm parameters): the same
  outputs and gradients as before; ``unpatch_layernorms`` restores the classes.
"""

import copy
import math

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")
from timm.layers import Attention  # noqa: E402
from timm.models import VisionTransformer  # noqa: E402

from lct_kernels.nn import (  # noqa: E402
    FusedLayerNorm,
    NonScalingLayerNorm,
    patch_layernorms,
    unpatch_layernorms,
)

ATOL = 2e-5


def nsln64(x, bias, eps):
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) + bias


def attention64(attn, x):
    """timm's Attention (qkv -> per-head q, k NsLN -> softmax(q k^T / sqrt(hd)) v -> proj),
    in float64 from the module's parameters."""
    p = {k: v.detach().double().requires_grad_(v.requires_grad) for k, v in attn.named_parameters()}
    B, T, D = x.shape
    H = attn.num_heads
    hd = D // H
    qkv = x @ p["qkv.weight"].T + (p["qkv.bias"] if "qkv.bias" in p else 0)
    q, k, v = qkv.reshape(B, T, 3, H, hd).permute(2, 0, 3, 1, 4)
    q = nsln64(q, p["q_norm.bias"], attn.q_norm.eps)
    k = nsln64(k, p["k_norm.bias"], attn.k_norm.eps)
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
    out = (w @ v).transpose(1, 2).reshape(B, T, D)
    return out @ p["proj.weight"].T + p["proj.bias"], p


def test_timm_attention_with_nsln_qk_norm():
    dim, heads = 32, 4
    attn = Attention(dim, num_heads=heads, qkv_bias=True, qk_norm=True,
                     norm_layer=NonScalingLayerNorm)
    assert isinstance(attn.q_norm, NonScalingLayerNorm) and isinstance(attn.k_norm, NonScalingLayerNorm)
    assert attn.q_norm.normalized_shape == (dim // heads,)
    assert not attn.q_norm.weight.requires_grad  # NsLN: the scale is fixed at 1
    with torch.no_grad():
        attn.q_norm.bias.normal_()
        attn.k_norm.bias.normal_()
    x = torch.randn(2, 7, dim, requires_grad=True)
    y = attn(x)
    x64 = x.detach().double().requires_grad_()
    want, p64 = attention64(attn, x64)
    torch.testing.assert_close(y.double(), want.detach(), atol=ATOL, rtol=1e-5)
    up = torch.randn_like(y)
    names = ["q_norm.bias", "k_norm.bias", "qkv.weight", "proj.weight"]
    params = dict(attn.named_parameters())
    got = torch.autograd.grad(y, [x] + [params[n] for n in names], up)
    ref = torch.autograd.grad(want, [x64] + [p64[n] for n in names], up.double())
    for name, g, r in zip(["x"] + names, got, ref):
        torch.testing.assert_close(g.double(), r, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def small_vit(norm_layer, seed=0, **kw):
    torch.manual_seed(seed)
    return VisionTransformer(img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=32,
                             depth=2, num_heads=4, mlp_ratio=2.0, norm_layer=norm_layer, **kw)


def forward_backward(model, x):
    x = x.clone().requires_grad_()
    out = model(x)
    up = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(out, [x] + [dict(model.named_parameters())[n] for n in names], up)
    return out, dict(zip(["input"] + names, grads))


def assert_same(a, b, atol=ATOL):
    (out_a, g_a), (out_b, g_b) = a, b
    torch.testing.assert_close(out_a, out_b, atol=atol, rtol=1e-5)
    assert g_a.keys() == g_b.keys()
    for name in g_a:
        torch.testing.assert_close(g_a[name], g_b[name], atol=1e-4, rtol=1e-4,
                                   msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("qk_norm", [False, True])
def test_vit_with_nsln_norm_layer_equals_unit_layernorm(qk_norm):
    ours = small_vit(NonScalingLayerNorm, qk_norm=qk_norm)
    norms = [m for m in ours.modules() if isinstance(m, nn.LayerNorm)]
    assert norms and all(isinstance(m, NonScalingLayerNorm) for m in norms)
    # blocks' norm1/norm2 (+ q/k norms) and the final norm
    assert len(norms) == 2 * 2 + (2 * 2 if qk_norm else 0) + 1
    ref = small_vit(nn.LayerNorm, qk_norm=qk_norm)
    with torch.no_grad():
        for m in norms:
            m.bias.normal_(0, 0.5)
    ref.load_state_dict(ours.state_dict())
    for m in ref.modules():  # the reference trains no LayerNorm weight either (NsLN's is frozen)
        if isinstance(m, nn.LayerNorm):
            m.weight.requires_grad_(False)
    x = torch.randn(3, 3, 16, 16)
    got, want = forward_backward(ours, x), forward_backward(ref, x)
    assert_same(got, want)
    assert all(torch.isfinite(g).all() for g in got[1].values())
    assert got[1]["norm.bias"].abs().sum() > 0  # the NsLN biases are learnt


def test_patch_layernorms_keeps_a_timm_vit_outputs_and_gradients():
    model = small_vit(nn.LayerNorm, qk_norm=True)
    with torch.no_grad():  # non-trivial affine parameters, so a dropped weight would show
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.3)
    x = torch.randn(2, 3, 16, 16)
    original = copy.deepcopy(model)
    before = forward_backward(model, x)
    n_norms = sum(isinstance(m, nn.LayerNorm) for m in model.modules())
    ids = {n: id(p) for n, p in model.named_parameters()}
    assert patch_layernorms(model) == n_norms
    assert all(type(m) is FusedLayerNorm for m in model.modules() if isinstance(m, nn.LayerNorm))
    assert {n: id(p) for n, p in model.named_parameters()} == ids  # same parameter objects
    after = forward_backward(model, x)
    assert_same(after, before)
    assert patch_layernorms(model) == 0  # a second call does nothing
    model.eval()
    original.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), atol=ATOL, rtol=1e-5)
    assert unpatch_layernorms(model) == n_norms
    assert all(type(m) is nn.LayerNorm for m in model.modules() if isinstance(m, nn.LayerNorm))
