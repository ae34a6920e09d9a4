"""The DiT's norm variants (issue 13, step 4), against the authors' DiT
(quandao10/LCT models/network_dit.py with --no-scale, and facebookresearch/DiT):

* norm1, norm2 and norm_final: LayerNorm(hidden, elementwise_affine=False, eps=1e-6),
  i.e. no parameter at all, in both variants;
* qk-norm (timm Attention, norm_layer over head_dim, LayerNorm's default eps 1e-5):
  model.norm=nsln: weight fixed at 1 (frozen), learnable bias (NsLN);
  model.norm=layernorm: learnable weight and bias (plain LayerNorm);
* model.norm_bias=true adds a learnable bias to norm1/norm2/norm_final (not in the
  paper: a separate option, off in the paper presets);
* model.fused picks kernels or eager PyTorch for the same math (a backend choice).
"""

import pytest
import torch
import torch.nn.functional as F

from lct_kernels.train.config import PRESETS, ConfigError, build_config
from lct_kernels.train.model import build_dit
from lct_kernels.train.pipeline import build_model


def _dit(norm="nsln", norm_bias=False, fused=True):
    torch.manual_seed(0)
    return build_dit("tiny", 8, 2, patch_size=2, nsln=(norm == "nsln"), norm_bias=norm_bias,
                     fused=fused, num_classes=3)


@pytest.mark.parametrize("norm", ["nsln", "layernorm"])
@pytest.mark.parametrize("fused", [True, False])
def test_block_and_final_norms_have_no_parameters(norm, fused):
    m = _dit(norm, fused=fused)
    names = [n for n, _ in m.named_parameters()]
    assert not [n for n in names if ".norm1." in n or ".norm2." in n or "norm_final" in n]
    for mod in [b.norm1 for b in m.blocks] + [b.norm2 for b in m.blocks] + [
            m.final_layer.norm_final]:
        assert mod.eps == 1e-6


@pytest.mark.parametrize("fused", [True, False])
def test_qk_norm(fused):
    for norm, weight_trains in (("nsln", False), ("layernorm", True)):
        m = _dit(norm, fused=fused)
        for q in (m.blocks[0].attn.q_norm, m.blocks[0].attn.k_norm):
            assert q.eps == 1e-5
            assert q.weight.requires_grad is weight_trains and q.bias.requires_grad
            assert torch.equal(q.weight, torch.ones(32)) and torch.equal(q.bias, torch.zeros(32))


def test_norm_bias_option():
    m = _dit("nsln", norm_bias=True)
    assert m.blocks[0].norm1.bias.shape == (128,) and m.final_layer.norm_final.bias.requires_grad


@pytest.mark.parametrize("norm,norm_bias", [("nsln", False), ("layernorm", False), ("nsln", True)])
def test_fused_equals_eager(norm, norm_bias):
    a, b = _dit(norm, norm_bias, fused=True), _dit(norm, norm_bias, fused=False)
    b.load_state_dict(a.state_dict())
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # non-trivial weights everywhere (adaLN-zero starts at zero)
        for p, q in zip(a.parameters(), b.parameters()):
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
                q.copy_(p)
    x, t, y = torch.randn(3, 2, 8, 8), torch.randn(3) * 100, torch.tensor([0, 1, 2])
    torch.testing.assert_close(a(x, t, y), b(x, t, y), rtol=1e-4, atol=1e-5)


def test_modulated_norm_formula():
    # y = LN_noaffine(x; eps 1e-6) * (1 + scale) + shift, (+ bias before the modulation)
    m = _dit("nsln", norm_bias=True, fused=False).blocks[0].norm1
    with torch.no_grad():
        m.bias.copy_(torch.randn(128))
    x, shift, scale = torch.randn(2, 5, 128).double(), torch.randn(2, 128).double(), torch.randn(2, 128).double()
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    want = ((x - mu) / torch.sqrt(var + 1e-6) + m.bias.double()) * (1 + scale[:, None]) + shift[:, None]
    torch.testing.assert_close(m.double()(x, shift, scale), want)


def test_config_norm_fields():
    assert build_config("demo").model.norm == "nsln"
    assert build_config("ict").model.norm == "layernorm"
    with pytest.raises(ConfigError, match=r"model\.norm"):
        build_config("demo", overrides=["model.norm=rmsnorm"])
    for name, preset in PRESETS.items():
        if name.startswith(("slct-", "ict-")):
            extra = ["data.latents=x.npy"]
            assert build_config(name, overrides=extra).model.norm_bias is False, name


def test_legacy_nsln_key_maps_to_the_old_model():
    # Checkpoints written before issue 13 hold model.nsln (with the block-norm biases).
    cfg = build_config("demo", overrides=["model.nsln=true"])
    assert (cfg.model.norm, cfg.model.norm_bias, cfg.model.nsln) == ("nsln", True, True)
    cfg = build_config("demo", overrides=["model.nsln=false"])
    assert (cfg.model.norm, cfg.model.norm_bias, cfg.model.nsln) == ("layernorm", False, False)


def test_build_model_follows_the_config():
    cfg = build_config("demo", overrides=["model.norm=layernorm", "model.norm_bias=true"])
    m = build_model(cfg, (2, 4, 4), 0)
    assert m.blocks[0].attn.q_norm.weight.requires_grad and m.blocks[0].norm1.bias is not None
