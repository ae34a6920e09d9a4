"""The trainer end to end on the embedded digits (CPU): the CLI, outputs, lct-sample,
exact resume, SIGTERM, non-finite losses, OT use, bad configs, and convergence."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from lct_kernels.train import objective as obj  # noqa: E402
from lct_kernels.train.checkpoint import list_checkpoints, load_checkpoint  # noqa: E402
from lct_kernels.train.cli import sample_main, train_main  # noqa: E402
from lct_kernels.train.config import build_config  # noqa: E402
from lct_kernels.train.loop import Trainer, TrainingDiverged  # noqa: E402
from lct_kernels.train.pipeline import prepare_data  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Subprocesses import the lct_kernels this process imported (the tree, or an installed
# wheel under `make integration`), never a tree built for another torch.
PKG_PARENT = str(Path(sys.modules["lct_kernels"].__file__).resolve().parents[1])


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("lct_cache")


def tiny_overrides(cache_dir, **extra):
    """A seconds-long configuration: small AE, small DiT, small batch."""
    items = {
        "data.cache_dir": str(cache_dir), "data.ae_steps": 150,
        "model.depth": 2, "model.hidden_size": 64, "model.num_heads": 2,
        "optim.batch_size": 32, "optim.warmup_steps": 0,
        "run.steps": 8, "run.log_every": 1, "run.ckpt_every": 4, "run.n_samples": 20,
        "run.progress": False, "run.tensorboard": False, "run.device": "cpu",
    }
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]


def read_losses(run):
    with open(Path(run) / "metrics.csv", newline="") as fh:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(fh)]


def test_lct_train_cli_writes_every_output(tmp_path, cache_dir):
    out = tmp_path / "run"
    rc = train_main(["--preset", "demo", "--out", str(out), *tiny_overrides(cache_dir)])
    assert rc == 0
    for name in ("config.toml", "metrics.csv", "loss.png", "summary.json"):
        assert (out / name).is_file(), name
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [4, 8]
    assert (out / "samples" / "step00000008_1step.png").is_file()
    assert (out / "samples" / "step00000008_2step.png").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == 8
    losses = read_losses(out)
    assert [s for s, _ in losses] == list(range(1, 9))
    assert all(np.isfinite(v) for _, v in losses)
    # the saved config reads back with --config
    again = build_config("demo", out / "config.toml")
    assert again.model.hidden_size == 64 and again.run.steps == 8

    sample_dir = tmp_path / "samples"
    for steps in (1, 2):
        assert sample_main(["--ckpt", str(out), "--steps", str(steps), "--n", "12",
                            "--out", str(sample_dir), "--seed", "3"]) == 0
        images = np.load(sample_dir / f"samples_{steps}step.npy")
        assert images.shape == (12, 1, 8, 8) and np.abs(images).max() <= 1.0
        assert np.load(sample_dir / f"samples_{steps}step_latents.npy").shape == (12, 2, 4, 4)
        assert (sample_dir / f"samples_{steps}step.png").is_file()
        assert np.load(sample_dir / f"samples_{steps}step_labels.npy").tolist() == [i % 10 for i in range(12)]


def test_bad_config_is_rejected_before_training(tmp_path, cache_dir, capsys):
    with pytest.raises(SystemExit) as info:
        train_main(["--out", str(tmp_path / "x"), *tiny_overrides(cache_dir), "optim.lr=-3"])
    assert info.value.code == 2
    assert "optim.lr" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_resume_repeats_the_uninterrupted_trajectory(tmp_path, cache_dir):
    args = tiny_overrides(cache_dir, **{"run.steps": 10, "run.ckpt_every": 100})
    full, part = tmp_path / "full", tmp_path / "part"
    assert train_main(["--out", str(full), *args]) == 0
    assert train_main(["--out", str(part), "--stop-after", "4", *args]) == 0
    assert json.loads((part / "summary.json").read_text())["step"] == 4
    assert train_main(["--out", str(part), "--resume", *args]) == 0
    assert read_losses(part) == read_losses(full)  # exactly, step by step
    a = load_checkpoint(list_checkpoints(full / "checkpoints")[-1][1])
    b = load_checkpoint(list_checkpoints(part / "checkpoints")[-1][1])
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
        assert torch.equal(a["ema"][key], b["ema"][key]), key


def test_sigterm_saves_a_checkpoint_and_exits_zero(tmp_path, cache_dir):
    out = tmp_path / "run"
    # build the digits cache first so the subprocess starts training at once
    prepare_data(build_config("demo", overrides=tiny_overrides(cache_dir)), progress=False)
    cmd = [sys.executable, "-m", "lct_kernels.train", "--out", str(out),
           *tiny_overrides(cache_dir, **{"run.steps": 100000, "run.ckpt_every": 100000})]
    env = dict(os.environ, PYTHONPATH=PKG_PARENT)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (out / "metrics.csv").exists() and len(read_losses(out)) >= 3:
            break
        if proc.poll() is not None:
            pytest.fail(f"trainer exited early: {proc.communicate()}")
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr.decode()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted by SIGTERM"
    steps = [s for s, _ in list_checkpoints(out / "checkpoints")]
    assert steps == [summary["step"]] and summary["step"] >= 3
    load_checkpoint(list_checkpoints(out / "checkpoints")[-1][1])


class _NaNAfter(torch.nn.Module):
    """Wraps the DiT; outputs NaN from the ``start``-th training call on."""

    def __init__(self, net, start):
        super().__init__()
        self.net, self.start, self.calls = net, start, 0

    def forward(self, x, t, y=None):
        out = self.net(x, t, y)
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls > self.start:
                return out * float("nan")
        return out


def test_non_finite_losses_are_skipped_then_stop_the_run(tmp_path, cache_dir):
    cfg = build_config("demo", overrides=tiny_overrides(
        cache_dir, **{"run.steps": 50, "run.ckpt_every": 2, "run.max_nonfinite": 3}))
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.model = trainer.ddp = _NaNAfter(trainer.model, start=4)
    with pytest.raises(TrainingDiverged, match="3 consecutive non-finite"):
        trainer.train()
    assert trainer.skipped_total == 3 and trainer.step == 7
    newest = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    assert newest[0] == 6  # saved during the skips, with the last good weights
    state = load_checkpoint(newest[1])
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    rows = read_losses(tmp_path / "run")
    assert all(np.isfinite(v) for s, v in rows if s <= 4)
    assert all(np.isnan(v) for s, v in rows if s > 4)


def test_ot_coupling_is_used_when_enabled(tmp_path, cache_dir, monkeypatch):
    calls = []
    real = obj.lk.ot_couple

    def spy(x0, x1, **kw):
        out = real(x0, x1, **kw)
        perm = out[0] if kw.get("return_status") else out  # the trainer defers the status check
        calls.append((x0.shape, perm, kw.get("groups")))
        return out

    monkeypatch.setattr(obj.lk, "ot_couple", spy)
    for ot in (True, False):
        calls.clear()
        cfg = build_config("demo", overrides=tiny_overrides(
            cache_dir, **{"run.steps": 2, "objective.ot": ot}))
        trainer = Trainer(cfg, tmp_path / f"run{ot}")
        x, noise, *_ = trainer.step_inputs(0)
        if ot:
            assert len(calls) == 1 and calls[0][0] == (32, 2, 4, 4)
            # the noise is re-ordered into the exact OT pairing within each class (the model
            # is class-conditional): identity is now optimal in every class
            from scipy.optimize import linear_sum_assignment

            y = trainer.labels[trainer.batch_indices(0)]
            for c in y.unique():
                idx = (y == c).nonzero().flatten()
                cost = torch.cdist(x[idx].flatten(1).double(), noise[idx].flatten(1).double()) ** 2
                assert linear_sum_assignment(cost.numpy())[1].tolist() == list(range(len(idx)))
            assert torch.equal(calls[0][2], y)  # groups = the labels
        else:
            assert calls == []


def energy_distance(samples, data):
    """Energy distance 2E|X-Y| - E|X-X'| - E|Y-Y'| between two sets of latents (float64):
    0 iff the distributions match; it sees both collapse and spread."""
    a, b = samples.flatten(1).double(), data.flatten(1).double()
    return (2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean()).item()


def test_training_brings_one_step_samples_closer_to_the_data(tmp_path, cache_dir):
    from lct_kernels.train.sampling import sample

    cfg = build_config("demo", overrides=tiny_overrides(cache_dir, **{
        "run.steps": 300, "run.ckpt_every": 1000, "run.log_every": 25, "optim.lr": 1e-3,
        "optim.ema_decay": 0.99, "objective.s1": 20, "model.hidden_size": 96,
        "model.num_heads": 4}))
    trainer = Trainer(cfg, tmp_path / "run")
    data = trainer.latents
    labels = torch.arange(200) % 10

    def distance(net):
        g = torch.Generator().manual_seed(0)
        x = sample(net.eval(), (200,) + tuple(data.shape[1:]), 1, labels, generator=g)
        return energy_distance(x, data)

    before = distance(trainer.model)
    trainer.train()
    after = distance(trainer.model)
    losses = [v for _, v in read_losses(tmp_path / "run")]
    assert np.mean(losses[-3:]) < np.mean(losses[:2])
    assert after < 0.5 * before, (before, after)
    print(f"energy distance to the data: untrained {before:.3f}, trained {after:.3f}")


def test_periodic_evaluation_is_a_callback_the_loop_calls_on_eval_steps(tmp_path, cache_dir):
    # run.eval_every: the loop knows no metric, it calls evaluator(trainer) on process 0
    # at every eval step and writes the returned columns to metrics.csv.
    over = tiny_overrides(cache_dir, **{"run.steps": 4, "run.log_every": 1, "run.eval_every": 2,
                                        "run.ckpt_every": 4, "run.sample_every": 0})
    cfg = build_config("demo", overrides=over)
    with pytest.raises(ValueError, match=r"Trainer: run.eval_every=2 needs evaluator="):
        Trainer(cfg, tmp_path / "none")
    with pytest.raises(TypeError, match="Trainer: evaluator must be callable"):
        Trainer(cfg, tmp_path / "bad", evaluator={"fd_1step": 1.0})
    seen = []

    def evaluator(trainer):
        seen.append(trainer.step)
        return {"fd_1step": 10.0 + trainer.step}

    Trainer(cfg, tmp_path / "run", evaluator=evaluator).train()
    assert seen == [2, 4]
    with open(tmp_path / "run" / "metrics.csv", newline="") as fh:
        rows = {int(r["step"]): r["fd_1step"] for r in csv.DictReader(fh)}
    assert rows == {1: "", 2: "12.0", 3: "", 4: "14.0"}
