"""lct_kernels.nn.patch_dit / unpatch_dit.

Contract: after patching, a DiT-family model computes what it computed before
(outputs and gradients to float tolerance), with every
modulate(norm(x), shift, scale) run by lct_kernels.nsln_modulate and each block's gated
residual x + gate * y by lct_kernels.gated_residual.  The
reference is the unpatched model in float64 (a copy), an independent
computation of the same math; the patched fp32 model must be as close to it as
the unpatched fp32 model is.  The DiT here is facebookresearch/DiT's structure
written with plain torch modules (tests/integration/test_dit_timm.py builds it
from timm's Attention, Mlp and PatchEmbed)."""

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lct_kernels.ops.gated_residual as gated_ops
import lct_kernels.ops.layer_norm as ln_ops
from lct_kernels.nn import (FusedLayerNorm, NonScalingLayerNorm, patch_dit, unpatch_dit)
from lct_kernels.train.model import build_dit
from helpers import record_calls


# ---------------------------------------------------------------- facebookresearch/DiT, plain torch
def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Attention(nn.Module):  # timm's Attention: qkv, optional qk-norm, proj
    def __init__(self, dim, num_heads, qk_norm=False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.to(v.dtype), k.to(v.dtype)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act = nn.Linear(dim, hidden), nn.GELU("tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, qk_norm=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
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
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        x = modulate(self.norm_final(x), shift, scale)
        return self.linear(x)


class DiT(nn.Module):
    def __init__(self, input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2,
                 num_heads=4, qk_norm=True, block=DiTBlock):
        super().__init__()
        self.p, self.c = patch_size, in_channels
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.t_embedder = nn.Sequential(nn.Linear(1, hidden_size), nn.SiLU(),
                                        nn.Linear(hidden_size, hidden_size))
        self.blocks = nn.ModuleList(block(hidden_size, num_heads, qk_norm=qk_norm)
                                    for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        with torch.no_grad():  # random everything: adaLN-zero's zero gates would hide errors
            for p in self.parameters():
                p.normal_(0, 1 / math.sqrt(p.shape[-1]) if p.dim() > 1 else 0.3)

    def forward(self, x, t):
        h = self.x_embedder(x).flatten(2).transpose(1, 2)
        c = self.t_embedder(t[:, None])
        for block in self.blocks:
            h = block(h, c)
        return self.final_layer(h, c)


def inputs(dtype=torch.float32):
    return torch.randn(3, 4, 8, 8, dtype=dtype), torch.rand(3, dtype=dtype)


def out_and_grads(model, x, t, autocast=False):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = model(x, t)
    (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach().double(), {n.removeprefix("_orig_mod."): p.grad.double()
                                 for n, p in model.named_parameters() if p.grad is not None}


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def assert_matches(patched, reference, x, t, tol, autocast=False, ref_autocast=None):
    """patched (fp32) against reference (float64 or fp32): outputs and every gradient."""
    ref_autocast = autocast if ref_autocast is None else ref_autocast
    xr, tr = x.to(next(reference.parameters()).dtype), t.to(next(reference.parameters()).dtype)
    y, g = out_and_grads(patched, x, t, autocast)
    y_ref, g_ref = out_and_grads(reference, xr, tr, ref_autocast)
    assert rel(y, y_ref) < tol
    assert g.keys() == g_ref.keys()
    check_grads(g, g_ref, tol)


def check_grads(g, g_ref, tol):
    # Some gradients are zero in exact arithmetic (a k-norm bias shifts every logit of a
    # query by the same amount, which softmax ignores): those are measured against the
    # model's overall gradient scale instead of their own.
    floor = 1e-3 * max(v.abs().max().item() for v in g_ref.values())
    for n in g:
        err = (g[n] - g_ref[n]).abs().max().item()
        assert err < tol * max(g_ref[n].abs().max().item(), floor), n


@pytest.fixture
def count_kernel(monkeypatch):
    return record_calls(monkeypatch, ln_ops, "nsln_modulate")


@pytest.fixture
def count_residual(monkeypatch):
    return record_calls(monkeypatch, gated_ops, "gated_residual")


# ---------------------------------------------------------------- equivalence
@pytest.mark.parametrize("train", [True, False])
def test_patched_dit_matches_the_unpatched_float64_model(train, count_kernel, count_residual):
    model = DiT().train(train)
    ref64 = copy.deepcopy(model).double()
    x, t = inputs()
    # how close fp32 eager gets to float64: the patched model must do as well
    base = rel(out_and_grads(model, x, t)[0], out_and_grads(ref64, x.double(), t.double())[0])
    assert patch_dit(model) == 3  # 2 blocks + the final layer
    assert model.training is train
    count_kernel.clear()
    assert_matches(model, ref64, x, t, tol=max(1e-5, 10 * base))
    assert len(count_kernel) == 5  # norm1, norm2 of each block and norm_final
    assert len(count_residual) == 4  # both gated residuals of each block
    assert isinstance(model.blocks[0].norm1, FusedLayerNorm)
    assert isinstance(model.blocks[0].attn.q_norm, FusedLayerNorm)


def assert_bf16_as_close_as_eager(model, x, t):
    """Patch model; under bf16 autocast it must be about as close to the float64 model as
    the unpatched model under autocast is (bf16 matmuls on both sides; the fused modulate
    and qk-norm keep fp32 statistics)."""
    eager = copy.deepcopy(model)
    ref64 = copy.deepcopy(model).double()
    assert patch_dit(model) > 0
    y, g = out_and_grads(model, x, t, autocast=True)
    y_eager, g_eager = out_and_grads(eager, x, t, autocast=True)
    y64, g64 = out_and_grads(ref64, x.double(), t.double())
    assert rel(y, y64) < 1.5 * rel(y_eager, y64) + 1e-3
    floor = 1e-3 * max(v.abs().max().item() for v in g64.values())
    for n in g64:
        scale = max(g64[n].abs().max().item(), floor)
        err, err_eager = ((g[n] - g64[n]).abs().max().item() / scale,
                          (g_eager[n] - g64[n]).abs().max().item() / scale)
        assert err < 1.5 * err_eager + 1e-2, n


def test_bf16_autocast_is_as_close_to_float64_as_eager_autocast():
    assert_bf16_as_close_as_eager(DiT(), *inputs())


def test_state_dict_parameters_hooks_and_idempotence():
    model = DiT()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    model.blocks[1].register_forward_hook(lambda m, a, o: seen.append(o.shape))
    assert patch_dit(model) == 3
    assert patch_dit(model) == 0  # a second call does nothing more
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)
    x, t = inputs()
    model(x, t).square().sum().backward()
    opt.step()  # the optimizer built before patching trains the patched model
    assert not torch.equal(model.blocks[0].adaLN_modulation[1].weight,
                           before["blocks.0.adaLN_modulation.1.weight"])
    assert seen == [(3, 16, 64)]
    with pytest.raises(ValueError, match="unpatch_dit"):
        patch_dit(model, non_scaling=True)


def test_unpatch_restores_forwards_and_classes():
    model = DiT()
    ref = copy.deepcopy(model)
    patch_dit(model)
    assert "forward" in model.blocks[0].__dict__
    assert unpatch_dit(model) == 3
    assert "forward" not in model.blocks[0].__dict__
    assert type(model.blocks[0].norm1) is nn.LayerNorm
    assert type(model.blocks[0].attn.k_norm) is nn.LayerNorm
    x, t = inputs()
    assert torch.equal(model(x, t), ref(x, t))
    assert unpatch_dit(model) == 0


def test_non_scaling_adds_zero_nsln_biases_and_nsln_qk_norms():
    model = DiT()
    for blk in model.blocks:  # qk-norm weights at ones: NsLN then changes nothing
        blk.attn.q_norm.weight.data.fill_(1)
        blk.attn.k_norm.weight.data.fill_(1)
    ref = copy.deepcopy(model)
    keys = set(model.state_dict())
    assert patch_dit(model, non_scaling=True) == 3
    added = set(model.state_dict()) - keys
    assert added == {"blocks.0.norm1.bias", "blocks.0.norm2.bias", "blocks.1.norm1.bias",
                     "blocks.1.norm2.bias", "final_layer.norm_final.bias"}
    assert all(not model.state_dict()[k].any() for k in added)
    assert isinstance(model.blocks[0].norm1, NonScalingLayerNorm)
    assert isinstance(model.blocks[0].attn.q_norm, NonScalingLayerNorm)
    assert not model.blocks[0].attn.q_norm.weight.requires_grad
    x, t = inputs()
    assert rel(model(x, t).detach(), ref(x, t).detach()) < 1e-5
    # the NsLN bias is learnable and enters as (xhat + bias) * (1 + scale) + shift
    bias = model.final_layer.norm_final.bias
    with torch.no_grad():
        bias.normal_()
    fl = model.final_layer
    h = torch.randn(3, 16, 64)
    c = torch.randn(3, 64)
    shift, scale = fl.adaLN_modulation(c).double().chunk(2, dim=1)
    hd = h.double()
    var = hd.var(-1, unbiased=False, keepdim=True)
    xhat = (hd - hd.mean(-1, keepdim=True)) / torch.sqrt(var + 1e-6)
    want = ((xhat + bias.double()) * (1 + scale[:, None]) + shift[:, None]) @ \
        fl.linear.weight.double().T + fl.linear.bias.double()
    got = fl(h, c)
    assert rel(got.double(), want) < 1e-5
    got.sum().backward()
    assert bias.grad is not None and bias.grad.abs().sum() > 0


# ---------------------------------------------------------------- our trainer's DiT
@pytest.mark.parametrize("nsln", [True, False])
def test_trainer_dit_eager_path(nsln, count_kernel):
    model = build_dit("tiny", input_size=8, in_channels=4, depth=2, nsln=nsln, fused=False)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 1 / math.sqrt(p.shape[-1]) if p.dim() > 1 else 0.3)
    ref64 = copy.deepcopy(model).double()
    x, t = torch.randn(3, 4, 8, 8), torch.randn(3) * 100
    assert patch_dit(model) == 3
    count_kernel.clear()
    y, g = out_and_grads(model, x, t)
    y64, g64 = out_and_grads(ref64, x.double(), t.double())
    assert len(count_kernel) == 5
    assert rel(y, y64) < 1e-4
    check_grads(g, g64, 1e-4)
    assert unpatch_dit(model) == 3
    assert "forward" not in model.blocks[0].norm1.__dict__
    assert_bf16_as_close_as_eager(model, x, t)


# ---------------------------------------------------------------- refusals
def test_nothing_to_patch_warns_and_returns_zero():
    with pytest.warns(UserWarning, match="norm1, attn, norm2, mlp and adaLN_modulation"):
        assert patch_dit(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))) == 0


class SwappedBlock(DiTBlock):  # modulate(x, scale, shift): a different forward, same modules
    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
            self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), scale_msa, shift_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class RopeBlock(DiTBlock):
    def forward(self, x, c, rope=None):
        return super().forward(x, c)


class RMSBlock(DiTBlock):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.norm1 = nn.RMSNorm(self.norm2.normalized_shape, elementwise_affine=False)


@pytest.mark.parametrize("block,why", [(SwappedBlock, "differs from DiT's math"),
                                       (RopeBlock, r"exactly \(x, c\), got \(x, c, rope\)"),
                                       (RMSBlock, "must be nn.LayerNorm")])
def test_blocks_with_another_forward_are_refused_and_left_alone(block, why):
    model = DiT(block=block)
    ref = copy.deepcopy(model)
    with pytest.warns(UserWarning, match=why):
        assert patch_dit(model) == 1  # only the final layer
    assert "forward" not in model.blocks[0].__dict__
    assert type(model.blocks[0].norm2) is nn.LayerNorm
    x, t = inputs()
    assert rel(model(x, t).detach(), ref(x, t).detach()) < 1e-5


class HiddenEpsNorm(nn.Module):  # a modulated norm whose eps (1e-4) is not an attribute
    def __init__(self, dim, expose=False):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(dim))
        if expose:
            self.eps = 1e-4

    def forward(self, x, shift, scale):
        h = F.layer_norm(x, (x.shape[-1],), None, self.bias, 1e-4)
        return h * (1 + scale[:, None]) + shift[:, None]


class ModulatedBlock(DiTBlock):  # the trainer's layout: the norm applies the modulation
    def __init__(self, *a, expose=False, **k):
        super().__init__(*a, **k)
        self.norm1 = HiddenEpsNorm(self.norm2.normalized_shape[0], expose)
        self.norm2 = HiddenEpsNorm(self.norm2.normalized_shape[0], expose)

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
            self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(self.norm1(x, shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(self.norm2(x, shift_mlp, scale_mlp))


def test_modulated_norms_need_the_right_eps():
    # without an eps attribute DiT's 1e-6 is assumed: the probe's small-variance rows see
    # the difference and the blocks are refused
    with pytest.warns(UserWarning, match="eps=1e-06"):
        assert patch_dit(DiT(block=ModulatedBlock)) == 1
    model = DiT(block=lambda *a, **k: ModulatedBlock(*a, expose=True, **k))
    with torch.no_grad():
        for blk in model.blocks:
            blk.norm1.bias.normal_()
    ref64 = copy.deepcopy(model).double()
    assert patch_dit(model) == 3
    x, t = inputs()
    assert_matches(model, ref64, x * 1e-3, t, tol=1e-4)  # small variance: eps matters


def test_other_refusals():
    model = DiT(depth=3)
    model.blocks[0].adaLN_modulation[1] = nn.Linear(64, 5 * 64)
    model.blocks[1].norm2 = nn.LayerNorm(64, eps=1e-6)  # a learnable weight
    model.blocks[2].norm1.register_forward_hook(lambda *a: None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert patch_dit(model) == 1
    msg = str(caught[0].message)
    assert "blocks.0" in msg and "6 chunks" in msg
    assert "blocks.1" in msg and "learnable weight" in msg
    assert "blocks.2" in msg and "hooks" in msg
    # NsLN takes the learnable-weight block: its weight becomes the frozen ones
    assert patch_dit(DiT(depth=1), non_scaling=True) == 2


def test_bad_arguments():
    with pytest.raises(TypeError, match="patch_dit: model must be a torch.nn.Module"):
        patch_dit("model")
    with pytest.raises(TypeError, match="patch_dit: non_scaling must be a bool"):
        patch_dit(DiT(), non_scaling=1)
    with pytest.raises(TypeError, match="unpatch_dit: model"):
        unpatch_dit(None)


# ---------------------------------------------------------------- torch.compile
@pytest.mark.compile
def test_compiled_patched_dit_matches_eager_unpatched():
    torch._dynamo.reset()
    model = DiT(depth=1)
    ref = copy.deepcopy(model).double()
    patch_dit(model)
    compiled = torch.compile(model, fullgraph=True)
    x, t = inputs()
    assert_matches(compiled, ref, x, t, tol=1e-4)
