"""GPU specification of the training step (skipped without CUDA).

Contract (issue: the whole training step): between two logging steps the step never
synchronises the host with the device: under ``torch.cuda.set_sync_debug_mode("error")``
any synchronising call raises.  The CPU twin (no host reads from lct_kernels' code)
is tests/test_train_sync_free.py.
"""

import pytest
import torch

pytestmark = pytest.mark.gpu
pytest.importorskip("sklearn")

from lct_kernels.train.config import build_config  # noqa: E402
from lct_kernels.train.loop import Trainer  # noqa: E402


def _trainer(tmp_path, **extra):
    items = {
        "data.cache_dir": str(tmp_path / "cache"), "data.ae_steps": 100,
        "model.depth": 2, "model.hidden_size": 64, "model.num_heads": 2,
        "optim.batch_size": 64, "optim.warmup_steps": 0,
        "run.steps": 40, "run.log_every": 10, "run.ckpt_every": 1000, "run.n_samples": 10,
        "run.progress": False, "run.tensorboard": False, "run.device": "cuda",
    }
    items.update(extra)
    cfg = build_config("demo", overrides=[f"{k}={v}" for k, v in items.items()])
    return Trainer(cfg, tmp_path / "run")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("extra", [{}, {"optim.grad_clip": 1.0}, {"run.precision": "fp32"},
                                   {"ot.scope": "global"}])
def test_train_step_never_syncs_between_logging_steps(tmp_path, extra):
    trainer = _trainer(tmp_path, **extra)
    trainer.train_step(fetch=True)  # step 0: creates the optimiser state (one host check)
    trainer.train_step(fetch=False)  # step 1: the first step after the optimiser state exists
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(trainer.cfg.run.log_every - 3):  # steps 2..8; step 8 starts stage 2
            trainer.train_step(fetch=False)  # (new sigma grid and c, made without a sync)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    fetched = trainer.fetch_metrics()
    assert fetched["good"] == trainer.cfg.run.log_every - 2 and fetched["skipped"] == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_nonfinite_step_is_skipped_on_the_device(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.train_step(fetch=True)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    ema_before = [p.detach().clone() for p in trainer.ema.parameters()]
    real = trainer.model.forward
    trainer.model.forward = lambda *a, **k: real(*a, **k) * float("nan")
    trainer.train_step(fetch=False)
    trainer.model.forward = real
    fetched = trainer.fetch_metrics()
    assert fetched["skipped"] == 1 and fetched["good"] == 0
    assert all(torch.equal(a, p) for a, p in zip(before, trainer.model.parameters()))
    assert all(torch.equal(a, p) for a, p in zip(ema_before, trainer.ema.parameters()))
