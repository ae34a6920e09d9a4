"""The Cauchy scale c per curriculum stage, as the trainer applies it (issue 13, step 5).

Rules (s = number of intervals, s0 = the first stage's, D = elements per sample,
c1 = stage 1's c = 0.00054 sqrt(D) unless objective.c is set):
* paper:    c = c1 for s <= s0, else exp(-1.15 ln s - 0.85)      (sLCT code, --c-by-loss-std)
* anchored: c = c1 for s <= s0, else c1 (s / s0)^-1.15           (same slope, through c1)
* measured: c = c1 for s <= s0; from each later stage's first `c_measure_batches`
            batches (trained with the previous stage's c), c = sqrt(median(m) / 2),
            m = mean over elements of (f_theta - f_theta^-)^2 per sample: 2c^2 (the
            Cauchy knee, where the per-sample weight 1/(2c^2 + m) halves) sits at the
            median residual.
* c_convention=sum moves only c1 (iCT's constant is for ||d||^2 = D m) to the kernels'
  per-element units, c1 / sqrt(D); the fitted and measured c are per-element already.
"""

import math
import re

import numpy as np
import pytest
import torch

from lct_kernels.train import objective as obj
from lct_kernels.train.config import ConfigError, build_config
from lct_kernels.train.data import LatentStats
from lct_kernels.train.loop import Trainer
from lct_kernels.train.pipeline import TrainingData


def paper(s):
    return math.exp(-1.15 * math.log(s) - 0.85)


def test_paper_values_from_papers_md():
    for s, want in ((20, 0.01364), (40, 0.00614), (80, 0.00277), (160, 0.00125),
                    (320, 0.00056), (640, 0.00025)):
        got = obj.cauchy_c(s, 10, dim=4096, schedule="paper")
        assert got == pytest.approx(want, rel=2e-2)  # papers.md rounds to 2-4 digits
        assert got == pytest.approx(paper(s), rel=1e-12)
    assert obj.cauchy_c(10, 10, dim=4096) == pytest.approx(0.00054 * 64, rel=1e-12)


def test_anchored_is_continuous_through_stage_one():
    c1 = 0.00054 * math.sqrt(4096)
    got = obj.cauchy_c(20, 10, dim=4096, schedule="anchored")
    assert got == pytest.approx(c1 * 2.0 ** -1.15, rel=1e-12)
    assert round(got, 4) == 0.0156                      # the number, against 0.0136
    for s in (40, 80, 640):
        assert obj.cauchy_c(s, 10, dim=4096, schedule="anchored") == pytest.approx(
            c1 * (s / 10) ** -1.15, rel=1e-12)
    # the power law passes through c1 at s0: the ratio to stage 1 is the paper fit's slope
    assert obj.cauchy_c(10, 10, dim=4096, schedule="anchored") == pytest.approx(c1)
    # at D = 32 the paper rule jumps up 4.5x at stage 2; the anchored one falls
    c1_32 = 0.00054 * math.sqrt(32)
    assert obj.cauchy_c(20, 10, dim=32, schedule="paper") / c1_32 == pytest.approx(4.47, rel=1e-2)
    assert obj.cauchy_c(20, 10, dim=32, schedule="anchored") < c1_32


def test_base_c_and_non_adaptive():
    assert obj.cauchy_c(640, 10, base_c=0.1, schedule="anchored") == pytest.approx(
        0.1 * 64 ** -1.15)
    for schedule in ("paper", "anchored", "measured"):
        assert obj.cauchy_c(640, 10, base_c=0.1, adaptive=False, schedule=schedule) == 0.1


def test_measured_rule_against_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 512):
        m = rng.lognormal(-9, 2.0, size=n)
        want = math.sqrt(float(np.median(m)) / 2)
        got = obj.measured_c(torch.tensor(m, dtype=torch.float32))
        assert got == pytest.approx(want, rel=1e-6)
    assert obj.MEASURED_C_KAPPA == pytest.approx(1 / math.sqrt(2))


def test_measured_rule_rejects_bad_input():
    with pytest.raises(ValueError, match=r"measured_c: m"):
        obj.measured_c(torch.tensor([]))
    with pytest.raises(ValueError, match=r"measured_c: m"):
        obj.measured_c(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match=r"cauchy_c: .*measured"):
        obj.cauchy_c(20, 10, dim=32, schedule="measured")
    with pytest.raises(ValueError, match=r"cauchy_c: schedule"):
        obj.cauchy_c(20, 10, dim=32, schedule="fitted")


def test_config_fields():
    with pytest.raises(ConfigError, match=r"objective\.c_schedule"):
        build_config("demo", overrides=["objective.c_schedule=fitted"])
    with pytest.raises(ConfigError, match=r"objective\.c_measure_batches"):
        build_config("demo", overrides=["objective.c_measure_batches=0"])
    assert build_config("demo").objective.c_schedule == "paper"


# ---- the trainer ---------------------------------------------------------------------------

def _data(n=64, shape=(2, 4, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn((n,) + shape, generator=g) * 0.5
    stats = LatentStats.compute(raw)
    return TrainingData(stats.standardize(raw).float(), None, 0, stats, {"kind": "none"})


def _trainer(tmp_path, *extra, steps=20):
    cfg = build_config("demo", overrides=[
        "model.depth=1", "model.hidden_size=32", "model.num_heads=2", "model.patch_size=2",
        "optim.batch_size=16", "optim.warmup_steps=0", f"run.steps={steps}", "objective.s1=20",
        "run.log_every=1", "run.ckpt_every=1000", "run.progress=false", "run.tensorboard=false",
        "run.device=cpu", *extra])
    return Trainer(cfg, tmp_path / "run", data=_data())


@pytest.mark.parametrize("schedule", ["paper", "anchored"])
@pytest.mark.parametrize("convention", ["mean", "sum"])
@pytest.mark.parametrize("loss", ["cauchy", "pseudo_huber"])
def test_trainer_c_per_stage(tmp_path, schedule, convention, loss):
    t = _trainer(tmp_path, f"objective.c_schedule={schedule}", f"objective.c_convention={convention}",
                 f"objective.loss={loss}", "objective.s1=160", steps=50)
    D = 2 * 4 * 4
    c1 = 0.00054 * math.sqrt(D) / (math.sqrt(D) if convention == "sum" else 1.0)
    for step in range(50):
        s = 10 * 2 ** (step // 10)          # K' = floor(50 / (log2 16 + 1)) = 10
        if s == 10:
            want = c1
        elif schedule == "paper":
            want = paper(s)                  # per-element already: never divided by sqrt(D)
        else:
            want = c1 * (s / 10) ** -1.15
        assert t.robust_c(step) == pytest.approx(want, rel=1e-12), (step, s)


def test_trainer_non_adaptive_keeps_stage_one_c(tmp_path):
    t = _trainer(tmp_path, "objective.adaptive_c=false", "objective.c=0.02")
    assert {t.robust_c(k) for k in range(20)} == {0.02}


def _reference_m(trainer, step):
    """Per-sample m of step `step` in float64, from the formulas (not the trainer's code)."""
    o = trainer.cfg.objective
    x, noise, y, idx, sigmas, _, _ = trainer.step_inputs(step)
    net = __import__("copy").deepcopy(trainer.model).double()
    x, noise, sig = x.double(), noise.double(), sigmas.double()
    t, t2 = sig[idx], sig[idx + 1]

    def f(xs, s):
        c_skip = 0.25 / ((s - o.sigma_min) ** 2 + 0.25)
        c_out = (s - o.sigma_min) * 0.5 / torch.sqrt(s ** 2 + 0.25)
        c_in = 1 / torch.sqrt(s ** 2 + 0.25)
        v = lambda a: a.view(-1, 1, 1, 1)  # noqa: E731
        return v(c_skip) * xs + v(c_out) * net(v(c_in) * xs, 250 * torch.log(s), y)

    with torch.no_grad():
        d = f(x + t.view(-1, 1, 1, 1) * noise, t) - f(x + t2.view(-1, 1, 1, 1) * noise, t2)
    return (d ** 2).flatten(1).mean(1)


def test_trainer_measured_c(tmp_path, capsys):
    t = _trainer(tmp_path, "objective.c_schedule=measured", "objective.c_measure_batches=3")
    c1 = 0.00054 * math.sqrt(32)
    ms = []
    for step in range(16):                    # K' = floor(20 / 2) = 10: stage 2 from step 10
        if 10 <= step < 13:
            ms.append(_reference_m(t, step))
        row = t.train_step()
        want_before = c1                      # stage 1, and the window trains with its c
        if step < 13:
            assert row["c"] == pytest.approx(want_before, rel=1e-12), step
    m = torch.cat(ms).numpy()
    want = math.sqrt(float(np.median(m)) / 2)
    assert t.robust_c(13) == pytest.approx(want, rel=1e-4)
    assert t.train_step()["c"] == pytest.approx(want, rel=1e-4)
    assert t.stage_log[-1]["c"] == pytest.approx(want, rel=1e-4)
    assert t.stage_log[-1]["s"] == 20 and t.stage_log[-1]["step"] == 13
    err = capsys.readouterr().err
    assert re.search(r"stage 2 \(s=20, N=21\): c=.*measured", err), err


def test_measured_c_survives_resume(tmp_path):
    t = _trainer(tmp_path, "objective.c_schedule=measured", "objective.c_measure_batches=2")
    t.train(stop_after=14)
    c = t.robust_c(14)
    again = Trainer(None, tmp_path / "run", resume=True, data=_data())
    assert again.robust_c(14) == c and again.step == 14


def test_stage_changes_are_logged(tmp_path, capsys):
    t = _trainer(tmp_path, "objective.c_schedule=anchored")
    summary = t.train()
    err = capsys.readouterr().err
    assert "stage 1 (s=10, N=11)" in err and "stage 2 (s=20, N=21)" in err
    stages = summary["stages"]
    assert [(st["stage"], st["s"], st["step"]) for st in stages] == [(1, 10, 0), (2, 20, 10)]
    assert stages[1]["c"] == pytest.approx(0.00054 * math.sqrt(32) * 2 ** -1.15)
