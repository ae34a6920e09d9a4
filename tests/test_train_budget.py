"""Epoch budgets, the curriculum's stage length and the paper presets (issue 13, step 2).

Formulas (the authors' code, quandao10/LCT):
* train_cm_latent.py:  K = ceil(|D| // B) * epochs = floor(|D| / B) * epochs;
* models/script_util.py, improve_scale_fn:
      K' = floor(K / (log2(floor(s1 / s0)) + 1))        (log2 NOT rounded)
      N(k) = min(s0 * 2^floor(k / K'), s1) + 1,   s(k) = N(k) - 1.
The references below are written from these formulas with Python's math module.
"""

import math

import pytest

from lct_kernels.train import objective as obj
from lct_kernels.train.config import PRESETS, ConfigError, build_config, resolve_total_steps


def ref_stage_length(K, s0, s1):
    return math.floor(K / (math.log2(math.floor(s1 / s0)) + 1))


def ref_intervals(k, K, s0, s1):
    return min(s0 * 2 ** math.floor(k / ref_stage_length(K, s0, s1)), s1)


@pytest.mark.parametrize("K,s0,s1", [
    (294_000, 10, 640),   # CelebA-HQ: 7 stages of 42 000 steps
    (2000, 10, 160),      # the demo: 5 stages of 400 steps
    (1000, 10, 480),      # s1/s0 = 48, not a power of 2: log2 = 5.585
    (1000, 10, 1280),     # iCT's s1
    (777, 7, 100),        # floor(100/7) = 14, log2 14 = 3.807
    (50, 10, 10),         # one stage
])
def test_curriculum_matches_the_authors_formula(K, s0, s1):
    assert obj.stage_length(K, s0, s1) == ref_stage_length(K, s0, s1)
    for k in range(0, K, max(1, K // 997)):
        assert obj.curriculum_intervals(k, K, s0, s1) == ref_intervals(k, K, s0, s1), k


def test_stage_length_does_not_round_log2_down():
    # s1/s0 = 48: the old rule (floor(log2 48) + 1 = 6 stages) gave K' = 166;
    # the authors' K / (log2 48 + 1) = 1000 / 6.585 gives 151.
    assert obj.stage_length(1000, 10, 480) == 151
    assert obj.curriculum_intervals(151 * 5, 1000, 10, 480) == 320
    assert obj.curriculum_intervals(151 * 6, 1000, 10, 480) == 480
    assert obj.curriculum_intervals(151 * 6 - 1, 1000, 10, 480) == 320


def test_celebahq_stage_is_200_epochs():
    # 27 000 latents at batch 128: 210 steps/epoch, 1400 epochs -> 294 000 steps;
    # 7 stages of 42 000 steps = 200 epochs each; s = 640 from epoch 1200.
    K = (27_000 // 128) * 1400
    assert K == 294_000
    assert obj.stage_length(K, 10, 640) == 42_000 == 200 * 210
    assert obj.curriculum_intervals(1200 * 210 - 1, K, 10, 640) == 320
    assert obj.curriculum_intervals(1200 * 210, K, 10, 640) == 640


@pytest.mark.parametrize("n,batch,epochs", [(27_000, 128, 1400), (70_000, 128, 1400),
                                            (252_454, 256, 1800), (1500, 128, 3), (129, 128, 5)])
def test_epoch_budget(n, batch, epochs):
    cfg = build_config("demo", overrides=["run.steps=0", f"optim.epochs={epochs}",
                                          f"optim.batch_size={batch}"])
    assert resolve_total_steps(cfg, n) == (n // batch) * epochs


def test_step_budget_is_unchanged():
    cfg = build_config("demo")
    assert cfg.optim.epochs == 0 and resolve_total_steps(cfg, 1500) == cfg.run.steps == 2000


def test_both_budgets_is_an_error_naming_both():
    with pytest.raises(ConfigError, match=r"run\.steps.*optim\.epochs|optim\.epochs.*run\.steps"):
        build_config("demo", overrides=["optim.epochs=3"])
    with pytest.raises(ConfigError, match=r"run\.steps.*optim\.epochs"):
        build_config("slct-celebahq256", overrides=["data.latents=x.npy", "run.steps=100"])


def test_neither_budget_is_an_error():
    with pytest.raises(ConfigError, match=r"run\.steps"):
        build_config("demo", overrides=["run.steps=0"])
    with pytest.raises(ConfigError, match=r"optim\.epochs"):
        build_config("demo", overrides=["optim.epochs=-1"])


def test_epoch_budget_needs_one_batch():
    cfg = build_config("demo", overrides=["run.steps=0", "optim.epochs=2", "optim.batch_size=64"])
    with pytest.raises(ValueError, match=r"resolve_total_steps.*batch"):
        resolve_total_steps(cfg, 63)


# Table 1 of the sLCT paper (epochs, total batch) and the paper code's recipe.
TABLE1 = {"slct-celebahq256": (1400, 128), "slct-church256": (1800, 256),
          "slct-ffhq256": (1400, 128)}


@pytest.mark.parametrize("name", sorted(TABLE1))
def test_paper_presets_reproduce_table1(name):
    cfg = build_config(name, overrides=["data.latents=lat.npy"])
    epochs, batch = TABLE1[name]
    assert (cfg.optim.epochs, cfg.optim.batch_size, cfg.run.steps) == (epochs, batch, 0)
    o = cfg.objective
    assert (o.s0, o.s1, o.loss, o.c_convention, o.c_schedule) == (10, 640, "cauchy", "mean", "paper")
    assert o.adaptive_c and o.diffusion_loss and o.ot and o.diff_coef == 5.0
    assert cfg.optim.ema_decay == 0.9999 and not cfg.optim.ema_warmup
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.warmup_steps, cfg.optim.grad_clip) == (
        1e-4, 1e-4, 0, 0)
    assert cfg.model.norm == "nsln" and not cfg.model.norm_bias and cfg.model.dropout == 0
    assert (cfg.model.size, cfg.model.patch_size) == ("B", 2)
    assert cfg.data.source == "latents" and cfg.data.latent_std == 0.5


def test_paper_preset_step_counts():
    # The README's table: K = floor(|D| / B) * epochs for each data set's size.
    sizes = {"slct-celebahq256": 27_000, "slct-church256": 252_454, "slct-ffhq256": 70_000}
    want = {"slct-celebahq256": 294_000, "slct-church256": 1_774_800, "slct-ffhq256": 764_400}
    for name, n in sizes.items():
        cfg = build_config(name, overrides=["data.latents=lat.npy"])
        assert resolve_total_steps(cfg, n) == want[name]


def test_presets_all_validate():
    for name in PRESETS:
        extra = ["data.latents=lat.npy"] if PRESETS[name].get("data.source") == "latents" else []
        build_config(name, overrides=extra)
