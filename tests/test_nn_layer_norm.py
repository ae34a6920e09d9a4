"""Specification of the LayerNorm modules: NonScalingLayerNorm, FusedLayerNorm, NsLNModulate,
patch_layernorms / unpatch_layernorms."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lct_kernels as L
from lct_kernels.nn import (
    FusedLayerNorm,
    NonScalingLayerNorm,
    NsLNModulate,
    patch_layernorms,
    unpatch_layernorms,
)


class PaperStyleNsLN(nn.LayerNorm):
    """The paper code's NsLN as described in papers.md section 5: an nn.LayerNorm whose
    weight is frozen at one (written here from that description)."""

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True):
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias)
        if self.weight is not None:
            self.weight.requires_grad = False


def test_nsln_module_has_frozen_unit_weight_and_learnable_bias():
    m = NonScalingLayerNorm(16)
    assert isinstance(m, nn.LayerNorm)
    assert torch.equal(m.weight, torch.ones(16)) and not m.weight.requires_grad
    assert m.bias.requires_grad
    with torch.no_grad():
        m.bias.normal_()
    x = torch.randn(3, 5, 16, requires_grad=True)
    y = m(x)
    torch.testing.assert_close(y, F.layer_norm(x, (16,), None, m.bias, 1e-5), rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert m.bias.grad is not None and m.weight.grad is None


def test_state_dict_round_trip_with_paper_style_module():
    ours, theirs = NonScalingLayerNorm(24), PaperStyleNsLN(24)
    with torch.no_grad():
        theirs.bias.normal_()
    assert set(ours.state_dict()) == set(theirs.state_dict()) == {"weight", "bias"}
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(4, 24)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    back = PaperStyleNsLN(24)
    back.load_state_dict(ours.state_dict())
    torch.testing.assert_close(back(x), ours(x), rtol=1e-5, atol=1e-5)


def test_a_changed_weight_is_honoured_not_ignored():
    m = NonScalingLayerNorm(8)
    x = torch.randn(2, 8)
    before = m(x)
    with torch.no_grad():
        m.weight.mul_(2.0)  # someone edits the "frozen" weight
    after = m(x)
    torch.testing.assert_close(after, F.layer_norm(x, (8,), m.weight, m.bias), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, after)
    m.weight.requires_grad_(True)  # or unfreezes it: it then learns
    m(x).pow(2).sum().backward()
    assert m.weight.grad is not None


def test_constructor_variants():
    assert NonScalingLayerNorm(8, elementwise_affine=False).weight is None
    m = NonScalingLayerNorm(8, bias=False)
    assert m.bias is None and not m.weight.requires_grad
    x = torch.randn(3, 8)
    torch.testing.assert_close(m(x), F.layer_norm(x, (8,)), rtol=1e-5, atol=1e-5)


class QKNormAttention(nn.Module):
    """timm's Attention pattern: norm_layer(head_dim) applied to per-head q and k."""

    def __init__(self, dim, heads, norm_layer):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm, self.k_norm = norm_layer(self.head_dim), norm_layer(self.head_dim)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, C)


def test_usable_as_timm_norm_layer_for_qk_norm():
    torch.manual_seed(1)
    ours = QKNormAttention(64, 4, NonScalingLayerNorm)
    ref = QKNormAttention(64, 4, PaperStyleNsLN)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 10, 64)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-5)
    ours(x).sum().backward()
    assert ours.q_norm.bias.grad is not None


def test_nsln_modulate_module():
    m = NsLNModulate(32, bias=True)
    x, shift, scale = torch.randn(2, 5, 32), torch.randn(2, 32), torch.randn(2, 32)
    torch.testing.assert_close(m(x, shift, scale), L.nsln_modulate(x, shift, scale, m.bias))
    assert "32" in repr(m)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1 = nn.LayerNorm(16)
        self.norm2 = nn.LayerNorm(16, elementwise_affine=False)
        self.norm3 = PaperStyleNsLN(16)
        self.lin = nn.Linear(16, 16)

    def forward(self, x):
        return self.norm3(self.lin(self.norm2(self.norm1(x))))


def test_patch_keeps_outputs_weights_and_training_state_and_unpatch_restores():
    model = Block()
    with torch.no_grad():
        model.norm1.weight.normal_()  # a trained, non-unit weight
        model.norm1.bias.normal_()
    model.eval()
    params_before = {n: p for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    x = torch.randn(3, 16)
    ref = model(x)
    assert patch_layernorms(model) == 3
    assert isinstance(model.norm1, FusedLayerNorm) and not model.training
    assert {n: p for n, p in model.named_parameters()} == params_before  # same objects
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
    assert patch_layernorms(model) == 0  # idempotent
    assert unpatch_layernorms(model) == 3
    assert type(model.norm1) is nn.LayerNorm and type(model.norm3) is PaperStyleNsLN
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def test_patch_leaves_our_own_modules_alone():
    model = nn.Sequential(NonScalingLayerNorm(8), FusedLayerNorm(8))
    assert patch_layernorms(model) == 0
    assert type(model[0]) is NonScalingLayerNorm
    assert patch_layernorms(model, non_scaling=True) == 1  # the FusedLayerNorm becomes NsLN
    assert type(model[1]) is NonScalingLayerNorm


def test_patch_non_scaling_converts_to_nsln():
    model = Block()
    with torch.no_grad():
        model.norm1.weight.fill_(3.0)
    assert patch_layernorms(model, non_scaling=True) == 3
    assert isinstance(model.norm1, NonScalingLayerNorm)
    assert torch.equal(model.norm1.weight, torch.ones(16)) and not model.norm1.weight.requires_grad
    x = torch.randn(2, 16)
    torch.testing.assert_close(model.norm1(x), F.layer_norm(x, (16,), None, model.norm1.bias),
                               rtol=1e-5, atol=1e-5)


def test_patched_model_trains_like_the_original():
    torch.manual_seed(0)
    a = Block()
    b = copy.deepcopy(a)
    patch_layernorms(b)
    x = torch.randn(8, 16)
    for m in (a, b):
        m(x).square().mean().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        if pa.grad is not None:
            torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-6, msg=n)
