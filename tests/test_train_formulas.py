"""The trainer's formulas as a specification, each checked against an independent float64
computation written from the paper / the authors' code (``train_reference``), never
against the trainer's own helpers:

* 2-step sampling: x = f(x0 + sqrt(sigma_mid^2 - sigma_min^2) z', sigma_mid), z' a fresh draw;
* EMA: ema <- decay ema + (1 - decay) theta, decay = min(ema_decay, (1 + k) / (10 + k))
  with the warm-up, else ema_decay; buffers copied;
* the teacher is the live student (not the EMA) at sigma_{i+1}, with the same noise and
  the same dropout mask, evaluated under no_grad;
* the DiT layout: sin-cos position embedding values (facebookresearch/DiT's row/column
  order), unpatchify's token -> pixel map, the adaLN chunk order (a whole forward);
* the c schedule as the trainer applies it (per curriculum stage, c convention, adaptive c),
  parametrised over schedules.

tests/README.md lists the hand-made mutants each test catches.
"""

import math

import numpy as np
import pytest
import torch
from torch import nn

import train_reference as R
from lct_kernels.train import objective as obj
from lct_kernels.train.config import build_config
from lct_kernels.train.data.stats import LatentStats
from lct_kernels.train.loop import Trainer
from lct_kernels.train.model import DiT, sincos_pos_embed_2d
from lct_kernels.train.pipeline import TrainingData
from lct_kernels.train.sampling import sample

SIGMA_MIN, SIGMA_MAX, SIGMA_DATA = 0.002, 80.0, 0.5


def synthetic_data(n=64, shape=(2, 4, 4), num_classes=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn((n,) + shape, generator=g)
    labels = torch.randint(0, num_classes, (n,), generator=g) if num_classes else None
    return TrainingData(latents=latents, labels=labels, num_classes=num_classes,
                        stats=LatentStats.compute(latents), decoder={"kind": "none"})


def make_trainer(tmp_path, data=None, **overrides):
    """A Trainer on synthetic latents (no digits cache): a 2-block DiT, width 32, patch 2."""
    items = {
        "model.size": "tiny", "model.depth": 2, "model.hidden_size": 32, "model.num_heads": 2,
        "model.patch_size": 2, "optim.batch_size": 16, "optim.warmup_steps": 0,
        "run.steps": 70, "run.log_every": 1, "run.ckpt_every": 1000, "run.device": "cpu",
        "run.progress": False, "run.tensorboard": False, "run.sample_every": 0,
        "run.precision": "fp32",
    }
    items.update(overrides)
    cfg = build_config("slct", overrides=[f"{k}={v}" for k, v in items.items()])
    return Trainer(cfg, tmp_path, data=data or synthetic_data(), overwrite=True)


# ---- 2-step sampling -------------------------------------------------------------------
class ToyNet(nn.Module):
    """F(x, t) = sin(3 x) + 1e-3 t, any dtype: a net whose output depends on its input."""

    def forward(self, x, t, y=None):
        return torch.sin(3 * x) + 1e-3 * t.view(-1, *([1] * (x.dim() - 1)))


def toy_F(x, t):
    return torch.sin(3 * x) + 1e-3 * t.view(-1, *([1] * (x.dim() - 1)))


@pytest.mark.parametrize("sigma_mid", [0.8, 1.3836])
def test_two_step_sampling_renoises_with_a_fresh_draw(sigma_mid):
    shape = (6, 2, 3, 3)
    out = sample(ToyNet(), shape, steps=2, sigma_mid=sigma_mid,
                 generator=torch.Generator().manual_seed(11))
    # by hand: z then z' are the generator's first and second N(0, I) draws
    g = torch.Generator().manual_seed(11)
    z = torch.randn(shape, generator=g).double()
    z2 = torch.randn(shape, generator=g).double()
    n = shape[0]
    x0 = R.denoiser(toy_F, SIGMA_MAX * z, torch.full((n,), SIGMA_MAX, dtype=torch.float64))
    renoise = math.sqrt(sigma_mid**2 - SIGMA_MIN**2)
    mid = torch.full((n,), sigma_mid, dtype=torch.float64)
    expected = R.denoiser(toy_F, x0 + renoise * z2, mid)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-5)
    reused = R.denoiser(toy_F, x0 + renoise * z, mid)  # the mutant: z' = z
    assert (expected - reused).abs().max() > 0.05


def test_one_step_sampling_is_f_of_sigma_max_z():
    shape = (5, 1, 2, 2)
    out = sample(ToyNet(), shape, steps=1, generator=torch.Generator().manual_seed(3))
    z = torch.randn(shape, generator=torch.Generator().manual_seed(3)).double()
    expected = R.denoiser(toy_F, SIGMA_MAX * z, torch.full((5,), SIGMA_MAX, dtype=torch.float64))
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-5)


# ---- EMA -------------------------------------------------------------------------------
@pytest.mark.parametrize("warmup", [True, False])
@pytest.mark.parametrize("k", [0, 3, 40, 100_000])
def test_ema_update_is_decay_ema_plus_one_minus_decay_theta(tmp_path, warmup, k):
    t = make_trainer(tmp_path, **{"optim.ema_decay": 0.99, "optim.ema_warmup": warmup})
    t.model.double()
    t.ema.double()
    g = torch.Generator().manual_seed(k)
    for p in list(t.model.parameters()) + list(t.ema.parameters()):
        p.data.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    theta = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    before = {n: p.detach().clone() for n, p in t.ema.named_parameters()}
    t.update_ema(k)
    decay = min(0.99, (1 + k) / (10 + k)) if warmup else 0.99
    assert decay != 0.5  # (a decay of 1/2 would not tell decay from 1 - decay)
    for n, p in t.ema.named_parameters():
        torch.testing.assert_close(p.detach(), decay * before[n] + (1 - decay) * theta[n],
                                   rtol=1e-12, atol=1e-12)
    for (n, b), (_, mb) in zip(t.ema.named_buffers(), t.model.named_buffers()):
        assert torch.equal(b, mb), n


# ---- the teacher ----------------------------------------------------------------------
def test_teacher_is_the_live_student_with_the_same_noise_and_dropout_under_no_grad(tmp_path):
    t = make_trainer(tmp_path, **{"model.dropout": 0.3, "objective.ot": False})
    for p in t.model.parameters():  # leave adaLN-zero so dropout reaches the output
        if p.requires_grad:
            p.data.normal_(0, 0.2)
    t.ema.load_state_dict(t.model.state_dict())
    k = 25
    t.step = k
    x0, noise, _, indices, sigmas, _, _ = t.step_inputs(k)  # the step's draws

    calls, ema_calls, masks = [], [], []
    rng_at = []

    def pre(module, args):
        rng_at.append(torch.get_rng_state())
        calls.append({"grad": torch.is_grad_enabled(), "x": args[0].detach().double().clone(),
                      "t": args[1].detach().double().clone()})
        masks.append([])

    def drop_hook(module, args, out):  # (zero out, non-zero in): where the mask is visible
        masks[-1].append((out.detach() == 0, args[0].detach() != 0))

    hooks = [t.model.register_forward_pre_hook(pre),
             t.ema.register_forward_pre_hook(lambda m, a: ema_calls.append(1))]
    hooks += [m.register_forward_hook(drop_hook) for m in t.model.modules()
              if isinstance(m, nn.Dropout)]
    try:
        t.train_step()
    finally:
        for h in hooks:
            h.remove()

    assert not ema_calls, "the teacher must be the live student, not the EMA"
    assert [c["grad"] for c in calls] == [False, True]  # teacher under no_grad, then student
    teacher, student = calls
    sig_t = torch.exp(teacher["t"] / 250)
    sig_s = torch.exp(student["t"] / 250)
    grid = R.karras(sigmas.numel())
    torch.testing.assert_close(sig_s, grid[indices], rtol=1e-6, atol=0)
    torch.testing.assert_close(sig_t, grid[indices + 1], rtol=1e-6, atol=0)
    shape = (-1, 1, 1, 1)
    raw_s = student["x"] * torch.sqrt(sig_s**2 + SIGMA_DATA**2).view(shape)
    raw_t = teacher["x"] * torch.sqrt(sig_t**2 + SIGMA_DATA**2).view(shape)
    n_s = (raw_s - x0.double()) / sig_s.view(shape)
    n_t = (raw_t - x0.double()) / sig_t.view(shape)
    torch.testing.assert_close(n_s, noise.double(), rtol=0, atol=1e-4)
    torch.testing.assert_close(n_t, noise.double(), rtol=0, atol=2e-3)  # small sigma: /sigma
    # the same dropout RNG: identical global RNG state at entry, identical masks
    assert torch.equal(rng_at[0], rng_at[1])
    assert len(masks[0]) == len(masks[1]) > 0
    for (zero_t, seen_t), (zero_s, seen_s) in zip(*masks):
        both = seen_t & seen_s  # (GELU's output underflows to exact zeros for large -x)
        assert int(both.sum()) > 0.9 * both.numel()
        differ = int((zero_t != zero_s)[both].sum())
        assert differ == 0, f"{differ} of {int(both.sum())} dropout decisions differ"
    assert any((z & s).any() for z, s in masks[1])  # dropout did drop something


def _student_dropout_masks(trainer, k):
    masks = []

    def hook(module, args, out):
        if torch.is_grad_enabled():  # the student's call
            masks.append(out.detach() == 0)

    hooks = [m.register_forward_hook(hook) for m in trainer.model.modules()
             if isinstance(m, nn.Dropout)]
    trainer.step = k
    try:
        trainer.train_step()
    finally:
        for h in hooks:
            h.remove()
    return masks


def test_dropout_is_drawn_from_seed_and_step_not_from_the_global_rng(tmp_path):
    # What makes a resumed run with dropout repeat the uninterrupted one.
    over = {"model.dropout": 0.3, "objective.ot": False}
    a, b = make_trainer(tmp_path / "a", **over), make_trainer(tmp_path / "b", **over)
    torch.manual_seed(1)
    ma = _student_dropout_masks(a, 12)
    torch.manual_seed(2)
    mb = _student_dropout_masks(b, 12)
    assert len(ma) == len(mb) > 0
    assert all(torch.equal(x, y) for x, y in zip(ma, mb))
    mc = _student_dropout_masks(b, 13)  # another step: other masks
    assert not all(torch.equal(x, y) for x, y in zip(ma, mc))


# ---- the DiT layout ----------------------------------------------------------------------
@pytest.mark.parametrize("dim,grid", [(16, 2), (32, 4), (64, 3), (128, 8)])
def test_sincos_position_embedding_is_dits(dim, grid):
    want = torch.from_numpy(R.dit_get_2d_sincos_pos_embed(dim, grid))
    torch.testing.assert_close(sincos_pos_embed_2d(dim, grid).double(), want, rtol=0, atol=1e-6)
    model = DiT(grid * 2, 1, patch_size=2, hidden_size=dim, depth=1, num_heads=2)
    torch.testing.assert_close(model.pos_embed[0].double(), want, rtol=0, atol=1e-6)


def test_sincos_halves_are_column_then_row():
    # token t = row * grid + col; DiT's first half encodes the column (its meshgrid puts w
    # first), the second the row: at channel 0 (sin, frequency 1) that is sin(col), sin(row).
    grid, dim = 4, 16
    pe = sincos_pos_embed_2d(dim, grid).double()
    rows, cols = np.divmod(np.arange(grid * grid), grid)
    torch.testing.assert_close(pe[:, 0], torch.sin(torch.from_numpy(cols).double()), atol=1e-6,
                               rtol=0)
    torch.testing.assert_close(pe[:, dim // 2], torch.sin(torch.from_numpy(rows).double()),
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("p,C,g", [(1, 2, 3), (2, 1, 2), (2, 3, 3), (4, 2, 2)])
def test_unpatchify_maps_tokens_to_pixels_as_dit(p, C, g):
    model = DiT(g * p, C, patch_size=p, hidden_size=16, depth=1, num_heads=2)
    h = torch.randn(2, g * g, p * p * C, dtype=torch.float64)
    torch.testing.assert_close(model.unpatchify(h), R.unpatchify_by_loops(h, C, p, g),
                               rtol=0, atol=0)


def _randomised(model, seed=0, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # the NsLN unit weights stay 1 (frozen)
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model


@pytest.mark.parametrize("nsln,fused", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("patch_size,num_classes", [(2, 3), (1, 0)])
def test_dit_forward_matches_an_independent_construction(nsln, fused, patch_size, num_classes):
    # Every parameter random (adaLN-zero would hide the chunk order), float64 end to end.
    model = DiT(4, 2, patch_size=patch_size, hidden_size=32, depth=2, num_heads=2,
                num_classes=num_classes, nsln=nsln, fused=fused)
    model = _randomised(model).double().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    # moderate t: the model computes its time features in fp32 by design (phase error ~ t * 6e-8)
    t = torch.tensor([-3.0, 0.5, 2.0], dtype=torch.float64)
    y = torch.tensor([0, 2, 1]) if num_classes else None
    P = {k: v.detach() for k, v in model.state_dict().items()}
    want = R.dit_forward(P, x, t, y, patch_size=patch_size, num_heads=2, depth=2, nsln=nsln)
    got = model(x, t, y)
    assert want.abs().max() > 0.1  # a non-trivial output
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# ---- the c schedule as the trainer applies it ---------------------------------------
def _stage_and_c1(step, total, s0, s1, dim, convention, base_c):
    """The curriculum s(k) = min(s0 2^floor(k/K'), s1), K' = floor(K / (log2 floor(s1/s0) + 1))
    (iCT's and the authors' formula, log2 not rounded), and stage 1's c1 = 0.00054 sqrt(D)
    read in the convention's units: rho(D m; c) = rho(m; c / sqrt(D)) for the sum form."""
    per_stage = max(math.floor(total / (math.log2(math.floor(s1 / s0)) + 1)), 1)
    s = min(s0 * 2 ** (step // per_stage), s1)
    c1 = base_c if base_c else 0.00054 * math.sqrt(dim)
    return s, (c1 / math.sqrt(dim) if convention == "sum" else c1)


def paper_c(step, *, total, s0, s1, dim, convention, adaptive, base_c=None):
    """`paper`: c1 at stage 1 (s <= s0) or without adaptive c, else the authors' fit
    exp(-1.15 ln s - 0.85), a per-element value in either convention.  Returns (s, c)."""
    s, c1 = _stage_and_c1(step, total, s0, s1, dim, convention, base_c)
    return s, (math.exp(-1.15 * math.log(s) - 0.85) if adaptive and s > s0 else c1)


def anchored_c(step, *, total, s0, s1, dim, convention, adaptive, base_c=None):
    """`anchored`: c1 (s / s0)^-1.15 from stage 2 on (the fit's slope through stage 1's c)."""
    s, c1 = _stage_and_c1(step, total, s0, s1, dim, convention, base_c)
    return s, (c1 * (s / s0) ** -1.15 if adaptive and s > s0 else c1)


# objective.c_schedule -> the expected rule ("measured" depends on the residuals: see
# test_train_c_schedule.py).
C_SCHEDULES = {"paper": paper_c, "anchored": anchored_c}


@pytest.mark.parametrize("schedule", sorted(C_SCHEDULES))
@pytest.mark.parametrize("loss,convention,adaptive", [
    ("cauchy", "mean", True), ("cauchy", "sum", True), ("cauchy", "mean", False),
    ("pseudo_huber", "sum", False), ("pseudo_huber", "mean", True)])
def test_c_schedule_per_stage_as_the_trainer_applies_it(tmp_path, monkeypatch, schedule, loss,
                                                        convention, adaptive):
    total, s0, s1 = 70, 10, 640  # 7 stages of 10 steps
    over = {"objective.loss": loss, "objective.c_convention": convention,
            "objective.adaptive_c": adaptive, "objective.s0": s0, "objective.s1": s1,
            "run.steps": total}
    over["objective.c_schedule"] = schedule
    t = make_trainer(tmp_path, **over)
    dim = t.dim
    seen = []
    real = obj.lk.consistency_objective

    def spy(student, teacher, x0, weight, diff_weight, mask, c, **kw):
        seen.append((float(c), weight.detach().double().clone()))
        return real(student, teacher, x0, weight, diff_weight, mask, c, **kw)

    monkeypatch.setattr(obj.lk, "consistency_objective", spy)
    stage_steps = [0, 9, 10, 19, 20, 35, 40, 55, 60, 69]
    for k in stage_steps:
        t.step = k
        _, _, _, indices, sigmas, _, _ = t.step_inputs(k)
        metrics = t.train_step()
        s, c = C_SCHEDULES[schedule](k, total=total, s0=s0, s1=s1, dim=dim,
                                     convention=convention, adaptive=adaptive)
        assert metrics["N"] == s + 1 == sigmas.numel(), k
        c_used, weight = seen[-1]
        assert c_used == pytest.approx(c, rel=1e-6), (k, s)
        assert metrics["c"] == pytest.approx(c, rel=1e-6)
        grid = R.karras(s + 1)
        mult = math.sqrt(dim) if (loss == "pseudo_huber" and convention == "sum") else 1.0
        lam = mult / (grid[indices] - grid[indices + 1])
        torch.testing.assert_close(weight, lam, rtol=1e-6, atol=0)
    stages = sorted({C_SCHEDULES[schedule](k, total=total, s0=s0, s1=s1, dim=dim,
                                           convention=convention, adaptive=adaptive)[0]
                     for k in stage_steps})
    assert stages == [10, 20, 40, 80, 160, 320, 640]
