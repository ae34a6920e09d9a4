"""One complete ``Trainer.train_step`` against an independent float64 re-derivation.

Stage 3 of the curriculum (s = 40, N = 41, adaptive Cauchy c), exact minibatch OT
within classes, the diffusion loss on its index-space mask, a small real DiT
(2 blocks, width 32, patch 2, fused NsLN kernels, 3 classes, every parameter random).
The step's random draws (data rows, noise, sigma indices) are taken from the step;
everything computed from them is re-derived here in float64 from the formulas
(``train_reference``): the OT pairing (scipy's assignment solver), the Karras grid,
c_skip/c_out/c_in, the DiT, the teacher (the live student at sigma_{i+1}, no gradient),
rho, lambda, the EDM weight and mask, the total loss, every parameter's gradient,
and the EMA update that follows the optimiser step.

    m_i   = mean((f(x + sigma_i n) - f(x + sigma_{i+1} n))^2)
    total = mean_i lambda_i ln(1 + m_i / (2 c^2))
            + 5 * sum_{i >= floor(0.75 N)} (1/sigma_i^2 + 1/sigma_d^2) mean((f - x)^2) / #mask
"""

import math

import pytest
import torch

import train_reference as R
from lct_kernels.train import objective as obj
from test_train_formulas import _randomised, make_trainer, synthetic_data

scipy_optimize = pytest.importorskip("scipy.optimize")

B, CLASSES, STEP = 16, 3, 25  # 70 steps in 7 stages of 10: step 25 is stage 3, s = 40


def ot_pairing(x, noise, labels):
    """perm with noise[perm] the exact squared-Euclidean coupling of x within each class."""
    perm = torch.arange(x.shape[0])
    for cls in labels.unique():
        rows = torch.nonzero(labels == cls).flatten()
        xc = x[rows].reshape(len(rows), -1).double()
        nc = noise[rows].reshape(len(rows), -1).double()
        cost = torch.cdist(xc, nc) ** 2
        r, col = scipy_optimize.linear_sum_assignment(cost.numpy())
        perm[rows[torch.as_tensor(r)]] = rows[torch.as_tensor(col)]
    return perm


@pytest.fixture(scope="module")
def step_record(tmp_path_factory):
    t = make_trainer(tmp_path_factory.mktemp("step"), data=synthetic_data(n=48, num_classes=CLASSES),
                     **{"optim.batch_size": B, "objective.ot": True, "objective.diffusion_loss": True,
                        "objective.loss": "cauchy", "objective.adaptive_c": True,
                        "objective.s0": 10, "objective.s1": 640, "optim.grad_clip": 0,
                        "optim.ema_decay": 0.9, "optim.ema_warmup": False})
    _randomised(t.model, seed=5, std=0.3)
    _randomised(t.ema, seed=6, std=0.3)  # an EMA unlike the model: a teacher taken from it shows
    t.step = STEP
    rec = {}
    real_couple, real_indices = obj.lk.ot_couple, obj.sample_indices

    def couple(x0, x1, groups=None, backend=None, **kw):
        rec.update(x=x0.detach().clone(), noise=x1.detach().clone(), groups=groups)
        out = real_couple(x0, x1, groups=groups, backend=backend, **kw)
        rec["perm"] = out[0] if kw.get("return_status") else out  # the status is checked later
        return out

    def indices(*a, **k):
        rec["indices"] = real_indices(*a, **k)
        return rec["indices"]

    rec["theta0"] = {n: p.detach().double().clone() for n, p in t.model.named_parameters()}
    rec["ema0"] = {n: p.detach().double().clone() for n, p in t.ema.named_parameters()}
    mp = pytest.MonkeyPatch()
    mp.setattr(obj.lk, "ot_couple", couple)
    mp.setattr(obj, "sample_indices", indices)
    try:
        rec["metrics"] = t.train_step()
    finally:
        mp.undo()
    rec["grads"] = {n: p.grad.double().clone() for n, p in t.model.named_parameters()
                    if p.requires_grad}
    rec["theta1"] = {n: p.detach().double().clone() for n, p in t.model.named_parameters()}
    rec["ema1"] = {n: p.detach().double().clone() for n, p in t.ema.named_parameters()}
    rec["state"] = {k: v.detach().double().clone() for k, v in t.model.state_dict().items()}
    rec["trainer"] = t
    # the batch's labels, from the data set itself: the rows of x are rows of the latents
    rows = [int(torch.nonzero((t.data.latents == r).flatten(1).all(1)).flatten()[0])
            for r in rec["x"]]
    rec["labels"] = t.data.labels[rows]
    return rec


def reference_loss(rec):
    """(total, cm per sample, diff, mask, params) in float64 from the recorded draws."""
    x, noise, y = rec["x"].double(), rec["noise"].double(), rec["labels"]
    noise = noise[ot_pairing(x, noise, y)]
    N = 40 + 1
    grid = R.karras(N)
    i = rec["indices"]
    s_i, s_next = grid[i], grid[i + 1]
    names = [n for n, _ in rec["trainer"].model.named_parameters()]
    trainable = {n for n, p in rec["trainer"].model.named_parameters() if p.requires_grad}
    P = {k: v.clone() for k, v in rec["state"].items()}
    for n in names:  # the parameters as they were before the step (state_dict holds theta1)
        P[n] = rec["theta0"][n].clone().requires_grad_(n in trainable)

    def F(params):
        return lambda xin, tin: R.dit_forward(params, xin, tin, y, patch_size=2, num_heads=2,
                                              depth=2, nsln=True)

    view = (-1, 1, 1, 1)
    with torch.no_grad():  # the teacher: the live student's weights, stop-gradient
        frozen = {k: v.detach() for k, v in P.items()}
        teacher = R.denoiser(F(frozen), x + s_next.view(view) * noise, s_next)
    student = R.denoiser(F(P), x + s_i.view(view) * noise, s_i)
    c = math.exp(-1.15 * math.log(40) - 0.85)
    m = ((student - teacher) ** 2).flatten(1).mean(1)
    cm = R.rho_cauchy(m, c) / (s_i - s_next)
    mask = i >= math.floor(0.75 * N)
    e = ((student - x) ** 2).flatten(1).mean(1)
    diff = (mask.double() * (1 / s_i**2 + 1 / 0.5**2) * e).sum() / mask.sum()
    total = cm.mean() + 5.0 * diff
    return total, cm, diff, mask, P, trainable


def test_the_step_ran_where_the_test_means_it_to(step_record):
    m = step_record["metrics"]
    assert m["N"] == 41 and m["skipped"] == 0
    assert m["c"] == pytest.approx(math.exp(-1.15 * math.log(40) - 0.85), rel=1e-9)
    mask = step_record["indices"] >= math.floor(0.75 * 41)
    assert 0 < int(mask.sum()) < B  # the diffusion term is on, for some samples only
    perm = step_record["perm"]
    assert not torch.equal(perm, torch.arange(B))  # OT did re-pair


def test_ot_pairing_is_the_exact_assignment_within_classes(step_record):
    rec = step_record
    want = ot_pairing(rec["x"], rec["noise"], rec["labels"])
    assert torch.equal(rec["perm"].cpu(), want)
    assert torch.equal(rec["groups"], rec["labels"])  # the coupling is asked per class


def test_loss_matches_the_float64_derivation(step_record):
    total, cm, diff, _, _, _ = reference_loss(step_record)
    m = step_record["metrics"]
    assert m["loss"] == pytest.approx(float(total.detach()), rel=2e-5)
    assert m["cm_loss"] == pytest.approx(float(cm.detach().mean()), rel=2e-5)
    assert m["diff_loss"] == pytest.approx(float(diff.detach()), rel=2e-5)


def test_every_parameter_gradient_matches_the_float64_derivation(step_record):
    total, _, _, _, P, trainable = reference_loss(step_record)
    names = sorted(trainable)
    grads = torch.autograd.grad(total, [P[n] for n in names], allow_unused=True)
    scale = max(float(g.abs().max()) for g in grads if g is not None)
    checked = 0
    for n, g in zip(names, grads):
        got = step_record["grads"][n]
        want = torch.zeros_like(got) if g is None else g
        err = float((got - want).abs().max())
        assert err <= 1e-4 * scale + 1e-5 * float(want.abs().max()), (n, err, scale)
        checked += 1
    assert checked == len(step_record["grads"]) > 30
    assert all(float(g.abs().max()) > 0 for g in grads if g is not None)


def test_ema_follows_the_optimiser_step(step_record):
    rec = step_record
    for n, e1 in rec["ema1"].items():
        want = 0.9 * rec["ema0"][n] + 0.1 * rec["theta1"][n]
        torch.testing.assert_close(e1, want, rtol=1e-6, atol=1e-7)
