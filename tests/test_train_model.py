"""Specification of lct_kernels.train.model: the DiT (adaLN-zero) with NsLN variants."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lct_kernels.nn import NonScalingLayerNorm
from lct_kernels.ops import bias_gelu as gelu_ops
from lct_kernels.ops import gated_residual as gated_ops
from lct_kernels.ops import layer_norm as ln_ops
from lct_kernels.train.model import (DIT_SIZES, MATH_ATTENTION_MAX_TOKENS, DiT, attention,
                                     build_dit, num_parameters)
from helpers import record_calls

SMALL = dict(hidden_size=64, depth=2, num_heads=4)


def small(**kw):
    args = dict(input_size=8, in_channels=4, patch_size=2, **SMALL)
    args.update(kw)
    return DiT(**args)


def inputs(batch=3, num_classes=0, dtype=torch.float32):
    x = torch.randn(batch, 4, 8, 8, dtype=dtype)
    # The trainer passes 250 * ln(sigma) for sigma in [0.002, 80]: about [-1550, 1100].
    t = torch.empty(batch).uniform_(-1550.0, 1100.0)
    y = torch.randint(0, num_classes, (batch,)) if num_classes else None
    return x, t, y


def perturb(model, std=0.1):
    """Random values in every trainable parameter, so no branch is zero."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * std)
    return model


def qk_norms(model):
    return [m for name, m in model.named_modules() if name.endswith(("q_norm", "k_norm"))]


# ----------------------------------------------------------------------------
# Shapes, dtypes, conditioning
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("patch_size", [1, 2, 4])
@pytest.mark.parametrize("num_classes", [0, 10])
@pytest.mark.parametrize("nsln,fused", [(True, True), (True, False), (False, True)])
def test_output_shape_and_dtype(patch_size, num_classes, nsln, fused):
    model = perturb(small(patch_size=patch_size, num_classes=num_classes, nsln=nsln, fused=fused))
    x, t, y = inputs(num_classes=num_classes)
    out = model(x, t, y)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all() and out.abs().max() > 0


def test_labels_are_required_iff_conditional():
    x, t, _ = inputs()
    with pytest.raises(ValueError, match=r"\by\b"):
        small(num_classes=10)(x, t, None)
    with pytest.raises(ValueError, match=r"\by\b"):
        small(num_classes=0)(x, t, torch.zeros(3, dtype=torch.long))


def test_labels_change_the_output():
    model = perturb(small(num_classes=10))
    x, t, _ = inputs()
    a = model(x, t, torch.zeros(3, dtype=torch.long))
    b = model(x, t, torch.ones(3, dtype=torch.long))
    assert (a - b).abs().max() > 1e-4


def test_negative_and_large_times_are_distinguished():
    model = perturb(small())
    x, _, _ = inputs(batch=1)
    outs = [model(x, torch.tensor([v])) for v in (-1550.0, -1549.0, 0.0, 1100.0)]
    for i in range(len(outs) - 1):
        assert (outs[i] - outs[i + 1]).abs().max() > 1e-5


def test_bad_input_shapes_name_the_argument():
    model = small()
    x, t, _ = inputs()
    with pytest.raises(ValueError, match=r"\bx\b"):
        model(torch.randn(3, 4, 16, 16), t)
    with pytest.raises(ValueError, match=r"\bx\b"):
        model(torch.randn(3, 3, 8, 8), t)
    with pytest.raises(ValueError, match=r"\bt\b"):
        model(x, torch.randn(2))


# ----------------------------------------------------------------------------
# adaLN-zero and initialisation
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("nsln,fused", [(True, True), (True, False), (False, True)])
def test_fresh_model_outputs_exact_zeros(nsln, fused):
    model = small(num_classes=5, nsln=nsln, fused=fused)
    x, t, y = inputs(num_classes=5)
    assert torch.equal(model(x, t, y), torch.zeros_like(x))


def test_positional_embedding_is_fixed_and_not_in_state_dict():
    model = small()
    assert "pos_embed" in dict(model.named_buffers())
    assert all("pos_embed" not in name for name, _ in model.named_parameters())
    assert "pos_embed" not in model.state_dict()
    assert model.pos_embed.shape == (1, 16, 64)


# ----------------------------------------------------------------------------
# Fused NsLN vs the eager baseline
# ----------------------------------------------------------------------------
def test_fused_and_eager_nsln_agree_in_outputs_and_gradients():
    torch.manual_seed(1)
    fused = perturb(small(num_classes=10, fused=True))
    eager = small(num_classes=10, fused=False)
    assert fused.state_dict().keys() == eager.state_dict().keys()
    for k, v in fused.state_dict().items():
        assert eager.state_dict()[k].shape == v.shape, k
    eager.load_state_dict(fused.state_dict())

    x, t, y = inputs(num_classes=10)
    x_f, x_e = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_f, out_e = fused(x_f, t, y), eager(x_e, t, y)
    torch.testing.assert_close(out_f, out_e, rtol=1e-5, atol=1e-5)

    w = torch.randn_like(out_f)
    (out_f * w).sum().backward()
    (out_e * w).sum().backward()
    torch.testing.assert_close(x_f.grad, x_e.grad, rtol=1e-5, atol=1e-5)
    grads_e = {n: p.grad for n, p in eager.named_parameters()}
    for name, p in fused.named_parameters():
        assert (p.grad is None) == (grads_e[name] is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, grads_e[name], rtol=1e-4, atol=1e-5, msg=name)


def test_fused_model_calls_the_lct_ops(monkeypatch):
    calls = record_calls(monkeypatch, ln_ops, "nsln_modulate")
    model = small(depth=2, backend="torch")
    model(*inputs()[:2])
    assert len(calls) == 2 * 2 + 1  # norm1, norm2 per block, and the final norm
    assert {kwargs.get("backend") for _, kwargs in calls} == {"torch"}
    assert all(isinstance(m, NonScalingLayerNorm) and m.backend == "torch"
               for m in qk_norms(model))

    calls.clear()
    small(fused=False)(*inputs()[:2])
    small(nsln=False, fused=False)(*inputs()[:2])
    assert calls == []
    # fused is a backend choice for either norm variant (issue 13)
    small(nsln=False, backend="torch")(*inputs()[:2])
    assert len(calls) == 2 * 2 + 1


def test_fused_blocks_use_the_fused_mlp_and_gated_residual(monkeypatch):
    recorded = {name: record_calls(monkeypatch, mod, name)
                for mod, name in ((gelu_ops, "linear_gelu"), (gated_ops, "gated_residual"))}

    def calls():
        return {name: len(c) for name, c in recorded.items()}

    small(depth=3)(*inputs()[:2])
    assert calls() == {"linear_gelu": 3, "gated_residual": 2 * 3}  # fc1 and both residuals per block
    small(depth=3, fused=False)(*inputs()[:2])
    assert calls() == {"linear_gelu": 3, "gated_residual": 2 * 3}  # the eager model: neither


def attention64(q, k, v):
    """Float64 softmax(q k^T / sqrt(d)) v, from the definition."""
    q, k, v = q.double(), k.double(), v.double()
    w = torch.exp(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5)
    return (w / w.sum(-1, keepdim=True)) @ v


@pytest.mark.parametrize("T", [1, 4, MATH_ATTENTION_MAX_TOKENS, MATH_ATTENTION_MAX_TOKENS + 1])
@pytest.mark.parametrize("math_on_cpu", [True, False])
def test_attention_is_softmax_attention_on_either_path(T, math_on_cpu):
    """attention() = softmax(q k^T / sqrt(d)) v, forward and backward, whichever kernel runs
    (the explicit formula for short CPU sequences, SDPA otherwise)."""
    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(2, 3, T, 16, generator=g).requires_grad_() for _ in range(3))
    out = attention(q, k, v, 0.0, math_on_cpu=math_on_cpu)
    do = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad(out, (q, k, v), do)
    ins64 = tuple(t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention64(*ins64)
    want = torch.autograd.grad(ref, ins64, do.double())
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


def test_fused_cpu_model_runs_short_sequences_without_sdpa(monkeypatch):
    """The fused model's CPU attention at short sequences is the explicit formula (SDPA's
    CPU kernel costs ~2 us per (sample, head) problem); the eager model, a dropout in
    training and sequences over MATH_ATTENTION_MAX_TOKENS take SDPA."""
    calls = record_calls(monkeypatch, F, "scaled_dot_product_attention")
    small(depth=2)(*inputs()[:2])
    assert calls == []
    small(depth=2, fused=False)(*inputs()[:2])
    assert len(calls) == 2
    calls.clear()
    small(depth=2, dropout=0.1).train()(*inputs()[:2])
    assert len(calls) == 2
    q = torch.randn(1, 2, MATH_ATTENTION_MAX_TOKENS + 1, 8)
    calls.clear()
    attention(q, q, q, 0.0, math_on_cpu=True)
    assert len(calls) == 1


def test_checkpoint_moves_between_fused_and_eager():
    eager = perturb(small(fused=False))
    fused = small(fused=True)
    fused.load_state_dict(eager.state_dict())
    x, t, _ = inputs()
    with torch.no_grad():
        torch.testing.assert_close(fused(x, t), eager(x, t), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------
# Norm variants and trainability
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("fused", [True, False])
def test_nsln_qk_norm_has_frozen_unit_weight_and_trainable_bias(fused):
    model = small(nsln=True, fused=fused)
    norms = qk_norms(model)
    assert len(norms) == 2 * 2
    for m in norms:
        # eps 1e-5: the authors' NsLN (timm's qk-norm with LayerNorm's default), issue 13
        assert isinstance(m, nn.LayerNorm) and m.normalized_shape == (16,) and m.eps == 1e-5
        assert torch.equal(m.weight, torch.ones(16)) and not m.weight.requires_grad
        assert m.bias.requires_grad

    def block_biases(model):
        return [n for n, _ in model.named_parameters() if n.endswith(("norm1.bias", "norm2.bias",
                                                                      "norm_final.bias"))]

    # the authors' DiT has no affine on norm1/norm2/norm_final; the extra biases are an option
    assert block_biases(model) == []
    assert len(block_biases(small(nsln=True, fused=fused, norm_bias=True))) == 2 * 2 + 1


def test_plain_layernorm_variant_is_standard_dit():
    model = small(nsln=False)
    for m in qk_norms(model):  # FusedLayerNorm is an nn.LayerNorm on the fused kernels
        assert isinstance(m, nn.LayerNorm) and m.weight.requires_grad and m.bias.requires_grad
    assert all(type(m) is nn.LayerNorm for m in qk_norms(small(nsln=False, fused=False)))
    assert not any(n.endswith(("norm1.bias", "norm2.bias", "norm_final.bias"))
                   for n, _ in model.named_parameters())
    # fused is a backend choice: the same parameters either way.
    assert model.state_dict().keys() == small(nsln=False, fused=False).state_dict().keys()


@pytest.mark.parametrize("nsln,fused", [(True, True), (True, False), (False, True)])
def test_gradient_reaches_every_trainable_parameter(nsln, fused):
    model = perturb(small(num_classes=10, nsln=nsln, fused=fused))
    x, t, y = inputs(num_classes=10)
    (model(x, t, y) * torch.randn_like(x)).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    frozen_grads = [n for n, p in model.named_parameters()
                    if not p.requires_grad and p.grad is not None]
    assert frozen_grads == []


def test_num_parameters_counts_trainable_only():
    model = small(nsln=True)
    total = sum(p.numel() for p in model.parameters())
    frozen = sum(m.weight.numel() for m in qk_norms(model))
    assert num_parameters(model) == total - frozen


def test_dropout_is_active_in_training_only():
    model = perturb(small(dropout=0.5))
    x, t, _ = inputs()
    model.eval()
    torch.testing.assert_close(model(x, t), model(x, t))
    model.train()
    assert (model(x, t) - model(x, t)).abs().max() > 0


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_fused_and_eager_agree_with_dropout_in_either_mode(train):
    # with an active dropout the fused block keeps the Linears' biases before their
    # dropout (no folding into the gated residual); the same seed gives the same masks
    torch.manual_seed(3)
    fused = perturb(small(dropout=0.3))
    eager = small(dropout=0.3, fused=False)
    eager.load_state_dict(fused.state_dict())
    fused.train(train), eager.train(train)
    x, t, _ = inputs()
    torch.manual_seed(11)
    out_f = fused(x, t)
    torch.manual_seed(11)
    out_e = eager(x, t)
    torch.testing.assert_close(out_f, out_e, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,name", [
    (dict(patch_size=3), "patch_size"),
    (dict(patch_size=8), "patch_size"),
    (dict(input_size=6, patch_size=4), "patch_size"),
    (dict(patch_size=2.0), "patch_size"),
    (dict(hidden_size=64, num_heads=5), "num_heads"),
    (dict(hidden_size=62, num_heads=2), "hidden_size"),
    (dict(dropout=-0.1), "dropout"),
    (dict(dropout=1.0), "dropout"),
    (dict(dropout=float("nan")), "dropout"),
    (dict(num_classes=-1), "num_classes"),
    (dict(depth=0), "depth"),
    (dict(mlp_ratio=0.0), "mlp_ratio"),
])
def test_validation_errors_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        small(**kwargs)


def test_build_dit_unknown_size_names_size_and_choices():
    with pytest.raises(ValueError, match="size") as info:
        build_dit("M", 8, 4)
    for choice in DIT_SIZES:
        assert choice in str(info.value)


# ----------------------------------------------------------------------------
# Sizes
# ----------------------------------------------------------------------------
def test_size_table():
    expected = {"tiny": (4, 128, 4), "S": (12, 384, 6), "B": (12, 768, 12),
                "L": (24, 1024, 16), "XL": (28, 1152, 16)}
    assert set(DIT_SIZES) == set(expected)
    for name, (depth, hidden, heads) in expected.items():
        cfg = DIT_SIZES[name]
        assert (cfg["depth"], cfg["hidden_size"], cfg["num_heads"]) == (depth, hidden, heads)


@pytest.mark.parametrize("size", ["tiny", "TINY"])
def test_build_tiny(size):
    model = build_dit(size, 8, 4, num_classes=3)
    assert len(model.blocks) == 4 and model.hidden_size == 128 and model.num_heads == 4
    x, t, y = inputs(num_classes=3)
    assert model(x, t, y).shape == x.shape


def test_build_is_case_insensitive():
    with torch.device("meta"):  # no memory, no init cost: only the structure is checked
        assert len(build_dit("s", 32, 4).blocks) == 12
        assert build_dit("S", 32, 4).hidden_size == 384


def test_dit_b2_has_about_130m_parameters():
    with torch.device("meta"):
        model = build_dit("B", 32, 4, patch_size=2)
    assert 125e6 < num_parameters(model) < 135e6


# ----------------------------------------------------------------------------
# Mixed precision
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nsln,fused", [(True, True), (True, False), (False, True)])
def test_runs_under_bf16_autocast_and_returns_x_dtype(x_dtype, nsln, fused):
    model = perturb(small(num_classes=10, nsln=nsln, fused=fused))
    x, t, y = inputs(num_classes=10, dtype=x_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y)
    assert out.dtype == x_dtype and torch.isfinite(out).all()
    with torch.no_grad():
        ref = model(x.float(), t, y)
    # bf16 matmuls: loose agreement with the fp32 forward only.
    assert (out.float() - ref).abs().max() <= 0.1 * ref.abs().max() + 0.05
    out.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32
               for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("nsln,fused", [(True, True), (True, False), (False, True)])
def test_bf16_model_without_autocast(nsln, fused):
    model = perturb(small(num_classes=10, nsln=nsln, fused=fused))
    x, t, y = inputs(num_classes=10)
    with torch.no_grad():
        ref = model(x, t, y)
        out = model.to(torch.bfloat16)(x.bfloat16(), t, y)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() <= 0.1 * ref.abs().max() + 0.05
