"""FusedRAdam (lct_kernels.optim; kernel csrc/cpu/radam.cpp, isa/radam_span.h).

Contract: each step is RAdam's update (Liu et al. 2020, as torch.optim.RAdam with
coupled weight decay), written out here in float64 from its definition:
    g = grad + wd p;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
    rho_inf = 2 / (1 - b2) - 1;  rho_t = rho_inf - 2 t b2^t / (1 - b2^t)
    rho_t > 5:  p -= lr (m / (1 - b1^t)) r_t sqrt(1 - b2^t) / (sqrt(v) + eps)
                r_t = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))
    else:       p -= lr m / (1 - b1^t)
and, with ``step(ema_decay=d)``, every EMA shadow then moves e = e + (1 - d)(p - e).
Its state is torch.optim.RAdam's, so state_dicts load either way; results are the
same bits for any thread count; bad arguments raise errors naming the argument.
"""

import copy
import math

import pytest
import torch

from lct_kernels import _ext
from lct_kernels.optim import FusedRAdam

pytestmark = pytest.mark.skipif(not _ext.CPU_EXT.loaded, reason="needs the C++ CPU extension")

# sizes: a tail of 3 elements after the 8-lane vectors, more than one 16K span, a scalar
SHAPES = [(37, 5), (16384 * 2 + 11,), (1,)]


class RAdam64:
    """The reference: RAdam in float64 from the formula above."""

    def __init__(self, params, lr, betas, eps, wd):
        self.p = [p.detach().double().clone() for p in params]
        self.m = [torch.zeros_like(p) for p in self.p]
        self.v = [torch.zeros_like(p) for p in self.p]
        self.lr, (self.b1, self.b2), self.eps, self.wd, self.t = lr, betas, eps, wd, 0

    def step(self, grads):
        self.t += 1
        t, b1, b2 = self.t, self.b1, self.b2
        rho_inf = 2 / (1 - b2) - 1
        rho_t = rho_inf - 2 * t * b2 ** t / (1 - b2 ** t)
        for p, m, v, g in zip(self.p, self.m, self.v, grads):
            g = g.double() + self.wd * p
            m.mul_(b1).add_((1 - b1) * g)
            v.mul_(b2).add_((1 - b2) * g * g)
            m_hat = m / (1 - b1 ** t)
            if rho_t > 5:
                r = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf
                              / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
                p.sub_(self.lr * m_hat * r * math.sqrt(1 - b2 ** t) / (v.sqrt() + self.eps))
            else:
                p.sub_(self.lr * m_hat)


def params_and_grads(seed, steps):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g).requires_grad_() for s in SHAPES]
    grads = [[torch.randn(s, generator=g) for s in SHAPES] for _ in range(steps)]
    return params, grads


@pytest.mark.parametrize("isa", ["native", "base"])
@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_steps_follow_the_float64_formula_through_both_phases(monkeypatch, isa, wd):
    if isa == "base":
        monkeypatch.setenv("LCT_CPU_ISA", "base")
    # beta2 = 0.99: rho_t > 5 from t = 6 on, so 12 steps cover the un-rectified phase and
    # the rectified one
    lr, betas, eps = 1e-2, (0.9, 0.99), 1e-8
    params, grads = params_and_grads(0, 12)
    ref = RAdam64(params, lr, betas, eps, wd)
    opt = FusedRAdam(params, lr=lr, betas=betas, eps=eps, weight_decay=wd)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
        ref.step(gs)
        for p, r in zip(params, ref.p):
            assert (p.detach().double() - r).abs().max().item() <= 1e-6 * max(1.0, r.abs().max().item())
    assert float(opt.state[params[0]]["step"]) == 12.0


def test_matches_torch_radam_to_float32_rounding():
    params, grads = params_and_grads(1, 15)
    twins = [p.detach().clone().requires_grad_() for p in params]
    ours = FusedRAdam(params, lr=3e-3, weight_decay=1e-4)
    theirs = torch.optim.RAdam(twins, lr=3e-3, weight_decay=1e-4)
    for gs in grads:
        for p, q, g in zip(params, twins, gs):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    for p, q in zip(params, twins):
        assert torch.allclose(p, q, rtol=0, atol=1e-6)
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(ours.state[p][key], theirs.state[q][key], rtol=1e-6, atol=1e-9)


def test_ema_is_lerped_towards_the_updated_parameters():
    params, grads = params_and_grads(2, 3)
    idle = torch.randn(4, requires_grad=True)  # no gradient: no update, its EMA still moves
    shadows = [torch.zeros(p.shape) for p in params] + [torch.zeros(4)]
    opt = FusedRAdam(params + [idle], lr=1e-2, ema=shadows)
    want = [s.double().clone() for s in shadows]
    for k, (gs, decay) in enumerate(zip(grads, (0.1, 0.9, 0.999))):  # weight >= 0.5 and < 0.5
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step(ema_decay=decay)
        for e, p in zip(want, params + [idle]):
            e += (1 - decay) * (p.detach().double() - e)
    for s, w in zip(shadows, want):
        assert (s.double() - w).abs().max().item() <= 1e-6
    assert idle not in opt.state  # torch.optim.RAdam's rule: no gradient, no state


def test_state_dicts_load_into_and_from_torch_radam():
    params, grads = params_and_grads(3, 6)
    twins = [p.detach().clone().requires_grad_() for p in params]
    theirs = torch.optim.RAdam(twins, lr=1e-2)
    for gs in grads[:3]:
        for q, g in zip(twins, gs):
            q.grad = g.clone()
        theirs.step()
    with torch.no_grad():
        for p, q in zip(params, twins):
            p.copy_(q)
    ours = FusedRAdam(params, lr=1e-2)
    # a copy, as a checkpoint would hold: the two optimizers must not share step tensors
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))
    for gs in grads[3:]:
        for p, q, g in zip(params, twins, gs):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    for p, q in zip(params, twins):
        assert torch.allclose(p, q, atol=1e-6)
    back = torch.optim.RAdam([p.detach().clone().requires_grad_() for p in params], lr=1e-2)
    back.load_state_dict(ours.state_dict())
    assert float(back.state_dict()["state"][0]["step"]) == 6.0


def test_same_bits_for_any_thread_count():
    out = []
    old = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            params, grads = params_and_grads(4, 8)
            opt = FusedRAdam(params, lr=1e-2, weight_decay=0.01)
            for gs in grads:
                for p, g in zip(params, gs):
                    p.grad = g
                opt.step()
            out.append([p.detach().clone() for p in params])
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(a, b) for a, b in zip(*out))


@pytest.mark.parametrize("make,match", [
    (lambda p: FusedRAdam([p.detach().double().requires_grad_()]),
     "parameter 0 must be a contiguous float32 CPU tensor"),
    (lambda p: FusedRAdam([p.detach().t().requires_grad_()]), "non-contiguous"),
    (lambda p: FusedRAdam([p], lr=-1.0), "lr must be a finite number >= 0"),
    (lambda p: FusedRAdam([p], betas=(0.9, 1.0)), r"betas\[1\] must be a number in \[0, 1\)"),
    (lambda p: FusedRAdam([p], betas=0.9), "betas must be a pair"),
    (lambda p: FusedRAdam([p], eps=float("nan")), "eps must be a finite number"),
    (lambda p: FusedRAdam([p], weight_decay=-0.1), "weight_decay must be"),
    (lambda p: FusedRAdam([p], ema=[]), "one tensor per parameter"),
    (lambda p: FusedRAdam([p], ema=[torch.zeros(3)]), r"ema\[0\] must be"),
    (lambda p: FusedRAdam([p]).step(ema_decay=0.9), "ema_decay needs the ema tensors"),
    (lambda p: FusedRAdam([p], ema=[torch.zeros(p.shape)]).step(ema_decay=1.5),
     r"ema_decay must be a number in \[0, 1\]"),
])
def test_bad_arguments_name_the_argument(make, match):
    p = torch.randn(3, 2, requires_grad=True)
    with pytest.raises(ValueError, match=match):
        make(p)


def test_unsupported_torch_options_in_a_loaded_state_raise():
    p = torch.randn(3, requires_grad=True)
    src = torch.optim.RAdam([p], decoupled_weight_decay=True)
    opt = FusedRAdam([p])
    opt.load_state_dict(src.state_dict())
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match="decoupled_weight_decay and maximize"):
        opt.step()
