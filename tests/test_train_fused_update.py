"""The trainer's update on the CPU: FusedRAdam's one pass equals RAdam + the EMA lerp.

Contract: ``Trainer.update(k)`` (the optimiser step and the EMA update of step k) gives,
for every parameter, torch.optim.RAdam's update and then
    ema <- decay ema + (1 - decay) theta,  decay = min(ema_decay, (1 + k) / (10 + k))
(buffers copied), whether the fused CPU optimizer (the default on the CPU) or torch's
(``run.backend=torch``) runs it; the two agree to float32 rounding, and a checkpoint's
optimizer state carries over between them.
"""

import copy

import torch

from lct_kernels.optim import FusedRAdam
from test_train_formulas import make_trainer


def fill_grads(trainer, seed):
    g = torch.Generator().manual_seed(seed)
    for p in trainer._params:
        p.grad = torch.randn(p.shape, generator=g)


def test_cpu_trainer_uses_the_fused_optimizer_and_torch_backend_uses_torch(tmp_path):
    assert isinstance(make_trainer(tmp_path / "a").optimizer, FusedRAdam)
    t = make_trainer(tmp_path / "b", **{"run.backend": "torch"})
    assert type(t.optimizer) is torch.optim.RAdam and not t.fused_optimizer


def test_fused_update_equals_radam_then_the_ema_lerp(tmp_path):
    fused = make_trainer(tmp_path / "fused", **{"optim.ema_decay": 0.99})
    plain = make_trainer(tmp_path / "plain", **{"optim.ema_decay": 0.99, "run.backend": "torch"})
    plain.model.load_state_dict(fused.model.state_dict())
    plain.ema.load_state_dict(fused.ema.state_dict())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # an EMA different from the model, so the lerp is visible
        for e in list(fused.ema.parameters()):
            e.add_(0.1 * torch.randn(e.shape, generator=g))
        plain.ema.load_state_dict(fused.ema.state_dict())
    for k in range(8):  # warm-up decays 0.1 .. 0.47 (lerp weight >= 0.5), then < 0.5
        before = {n: p.detach().clone() for n, p in fused.ema.named_parameters()}
        fill_grads(fused, k)
        fill_grads(plain, k)
        fused.update(k)
        plain.update(k)
        decay = min(0.99, (1 + k) / (10 + k))
        theta = dict(fused.model.named_parameters())
        for n, e in fused.ema.named_parameters():  # the EMA formula, in float64
            want = decay * before[n].double() + (1 - decay) * theta[n].detach().double()
            assert (e.double() - want).abs().max().item() <= 1e-6, n
    for a, b in zip(list(fused.model.parameters()) + list(fused.ema.parameters()),
                    list(plain.model.parameters()) + list(plain.ema.parameters())):
        assert torch.allclose(a, b, rtol=0, atol=2e-6)


def test_optimizer_state_carries_over_between_the_two(tmp_path):
    plain = make_trainer(tmp_path / "plain", **{"run.backend": "torch"})
    for k in range(3):
        fill_grads(plain, k)
        plain.update(k)
    fused = make_trainer(tmp_path / "fused")
    fused.model.load_state_dict(plain.model.state_dict())
    fused.optimizer.load_state_dict(copy.deepcopy(plain.optimizer.state_dict()))  # as from disk
    fill_grads(fused, 3)
    fill_grads(plain, 3)
    fused.update(3)
    plain.update(3)
    for a, b in zip(fused.model.parameters(), plain.model.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=2e-6)
