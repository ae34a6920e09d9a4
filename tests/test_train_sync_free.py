"""The training step reads nothing from the device between logging steps.

On a GPU each host read (``float(t)``, ``t.item()``, ``t.tolist()``, ``bool(t)``,
``int(t)``) waits for every queued kernel.  Contract: between two logging steps the
trainer's own code (anything under ``lct_kernels/``) makes no such call; the
metrics are summed on the device and fetched once per ``run.log_every``; a step
with a non-finite loss is skipped exactly (weights, optimiser state and EMA
untouched) without the host knowing.  The GPU twin of this test, under
``torch.cuda.set_sync_debug_mode("error")``, is in tests/test_gpu_train.py.
"""

import copy
import linecache
import os
import sys

import pytest
import torch

pytest.importorskip("sklearn")

from lct_kernels.optim import FusedRAdam  # noqa: E402
from lct_kernels.train.config import build_config  # noqa: E402
from lct_kernels.train.device_step import GuardedUpdate, MetricWindow  # noqa: E402
from lct_kernels.train.loop import Trainer  # noqa: E402

PKG = os.path.dirname(os.path.abspath(sys.modules["lct_kernels"].__file__))
READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")
# Reads that only ever run on CPU tensors (guarded by a device test in the code), so
# they can never wait for a GPU: (file, the guarding expression on that line).
# The group sizes of ot_couple are read where the labels live; the trainer hands it the
# host copy of the batch's labels, so on a GPU that read is a host one too (the GPU test
# checks it under torch.cuda.set_sync_debug_mode("error")).
# FusedRAdam reads its step counts, CPU tensors (it refuses any other parameter).
CPU_ONLY = {("ops/_fused_grad.py", 'g.device.type == "cpu"'), ("ops/ot.py", "int(counts.max())"),
            ("optim.py", "# cpu-only read")}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("lct_cache_sync")


def _overrides(cache_dir, **extra):
    items = {
        "data.cache_dir": str(cache_dir), "data.ae_steps": 150,
        "model.depth": 1, "model.hidden_size": 32, "model.num_heads": 2,
        "optim.batch_size": 32, "optim.warmup_steps": 0,
        "run.steps": 40, "run.log_every": 10, "run.ckpt_every": 1000, "run.n_samples": 10,
        "run.progress": False, "run.tensorboard": False, "run.device": "cpu",
        "run.sync_free": "true",  # the CUDA default, here on the CPU
    }
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]


class HostReads:
    """Records every host read of a tensor whose caller is lct_kernels' own code."""

    def __init__(self):
        self.calls = []

    def __enter__(self):
        self.saved = {name: getattr(torch.Tensor, name) for name in READS}
        for name, fn in self.saved.items():
            setattr(torch.Tensor, name, self._wrap(name, fn))
        return self

    def _wrap(self, name, fn):
        calls = self.calls

        def read(t, *args, **kwargs):
            frame = sys._getframe(1)
            caller = frame.f_code.co_filename
            if caller.startswith(PKG):
                where = os.path.relpath(caller, PKG)
                line = linecache.getline(caller, frame.f_lineno)
                if not any(where == f and guard in line for f, guard in CPU_ONLY):
                    calls.append(f"{name} at {where}:{frame.f_lineno}")
            return fn(t, *args, **kwargs)
        return read

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(torch.Tensor, name, fn)


@pytest.mark.parametrize("extra", [
    {},                                                   # the demo recipe: OT within classes
    {"optim.grad_clip": 1.0},                             # clipping on: a norm every step
    {"model.dropout": 0.1, "objective.diffusion_loss": False},
    {"ot.scope": "global"},                               # one coupling of the global batch
])
def test_no_host_read_between_logging_steps(tmp_path, cache_dir, extra):
    cfg = build_config("demo", overrides=_overrides(cache_dir, **{k: v for k, v in extra.items()}))
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.train_step(fetch=True)  # step 0 creates the optimiser state (one host check)
    with HostReads() as reads:
        for _ in range(cfg.run.log_every - 2):  # steps 1..8: none is a logging step
            trainer.train_step(fetch=False)
    assert reads.calls == [], sorted(set(reads.calls))
    fetched = trainer.fetch_metrics()  # step 9's fetch: the one read of the interval
    assert fetched["good"] == cfg.run.log_every - 2 and fetched["skipped"] == 0
    assert torch.isfinite(torch.tensor(fetched["loss"]))


@pytest.mark.parametrize("optimizer", [torch.optim.RAdam, FusedRAdam])
def test_guarded_update_skips_exactly_and_applies_otherwise(optimizer):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    ema = [p.detach().clone() for p in params]
    opt = optimizer(params, lr=0.1, weight_decay=0.01)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # the optimiser state exists from here on
    guard = GuardedUpdate(opt, params, ema)
    assert guard.ready()

    def snapshot():
        state = [v.clone() for p in params for v in opt.state[p].values() if torch.is_tensor(v)]
        return [p.detach().clone() for p in params] + [e.clone() for e in ema] + state

    def update():
        opt.step()
        for e, p in zip(ema, params):
            e.lerp_(p.detach(), 0.5)

    for p in params:
        p.grad = torch.randn_like(p)
    # an unguarded twin of the same state, for the applied case
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    ref_opt = optimizer(ref_params, lr=0.1, weight_decay=0.01)
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for rp, p in zip(ref_params, params):
        rp.grad = p.grad.clone()
    ref_ema = [e.clone() for e in ema]

    before = snapshot()
    guard(torch.tensor(True), update)  # skipped: every tensor as it was, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot()))
    guard(torch.tensor(False), update)  # applied: equal to the unguarded update
    ref_opt.step()
    for e, p in zip(ref_ema, ref_params):
        e.lerp_(p.detach(), 0.5)
    for got, want in zip(params + ema, ref_params + ref_ema):
        assert torch.equal(got.detach(), want.detach())
    assert not torch.equal(params[0].detach(), before[0])


def test_metric_window_means_over_good_steps_and_counts_runs_of_skips():
    w = MetricWindow(2, torch.device("cpu"), consecutive=1)
    steps = [(False, [1.0, 10.0]), (True, [float("nan"), 5.0]), (True, [3.0, float("inf")]),
             (False, [3.0, 30.0]), (True, [0.0, 0.0])]
    for found, values in steps:
        w.add(torch.tensor(found), torch.tensor(values))
    assert w.peek() == (3, 1, 2)
    means, good, skipped, run, longest = w.fetch()
    assert means == [2.0, 20.0] and (good, skipped, run, longest) == (2, 3, 1, 2)
    assert w.fetch()[1:] == (0, 0, 1, 1)  # reset, the current run carried over


@pytest.mark.parametrize("clip", [0.0, 0.01])
def test_logged_grad_norm_and_clipping(tmp_path, cache_dir, clip):
    # grad_norm = ||(grad of every parameter)||_2 before clipping, fetched as the mean over
    # the steps that computed it (every step with clipping on, else the logging step);
    # with optim.grad_clip = c > 0 the gradients the optimiser sees have norm <= c.
    cfg = build_config("demo", overrides=_overrides(cache_dir, **{
        "optim.grad_clip": clip, "run.log_every": 4}))
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.train_step(fetch=True)
    norms = []
    real_step = trainer.optimizer.step

    def step_and_record(*a, **k):  # the norm of the gradients the update uses
        norms.append(float(torch.linalg.vector_norm(
            torch.stack([p.grad.double().norm() for p in trainer._params if p.grad is not None]))))
        return real_step(*a, **k)

    trainer.optimizer.step = step_and_record
    for _ in range(3):  # steps 1..3; step 3 is the logging step
        trainer.train_step(fetch=False)
    fetched = trainer.fetch_metrics()
    assert fetched["good"] == 3 and len(norms) == 3
    assert torch.isfinite(torch.tensor(fetched["grad_norm"])) and fetched["grad_norm"] > 0
    if clip > 0:
        assert max(norms) <= clip * (1 + 1e-5), norms
        assert fetched["grad_norm"] > 10 * clip  # the logged norm is the one before clipping
    else:
        assert fetched["grad_norm"] == pytest.approx(norms[-1], rel=1e-5)  # the logging step's
