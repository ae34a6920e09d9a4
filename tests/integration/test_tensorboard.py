"""A short ``lct-train`` run with TensorBoard installed writes event files, and
TensorBoard's own ``EventAccumulator`` reads back the logged scalars (loss, c, N,
lr), step for step equal to the run's metrics.csv (the independent record)."""

import csv

import numpy as np
import pytest

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from integration_support import run_cli  # noqa: E402

STEPS = 5
LR = 2e-3


@pytest.fixture(scope="module")
def latents_run(tmp_path_factory):
    """lct-train on a small latents file (no decoder, so no VAE or autoencoder stage)."""
    tmp = tmp_path_factory.mktemp("tb")
    latents = np.random.default_rng(0).standard_normal((16, 2, 4, 4)).astype(np.float32)
    np.save(tmp / "latents.npy", latents)
    out = tmp / "run"
    proc = run_cli("lct-train", [
        "--preset", "demo", "--latents", tmp / "latents.npy", "--out", out, "--steps", STEPS,
        "--device", "cpu", "--no-progress", "optim.batch_size=8", f"optim.lr={LR}",
        "optim.warmup_steps=0", "run.log_every=1", f"run.ckpt_every={STEPS}",
        "run.sample_every=0", "run.n_samples=4", "run.tensorboard=true"], tmp)
    assert proc.returncode == 0, f"lct-train failed:\n{proc.stdout}\n{proc.stderr}"
    return out


def test_event_files_hold_the_logged_scalars(latents_run):
    events = list((latents_run / "tensorboard").glob("events.out.tfevents.*"))
    assert events, f"no TensorBoard event file in {latents_run / 'tensorboard'}"
    acc = EventAccumulator(str(latents_run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    with open(latents_run / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    for key in ("loss", "c", "N", "lr"):
        tag = f"train/{key}"
        assert tag in tags, f"{tag} not logged; scalars: {sorted(tags)}"
        scalars = acc.Scalars(tag)
        assert [e.step for e in scalars] == list(range(1, STEPS + 1)), tag
        got = np.array([e.value for e in scalars], dtype=np.float64)
        want = np.array([float(r[key]) for r in rows])
        # event files store float32
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=0, err_msg=tag)
    np.testing.assert_allclose([e.value for e in acc.Scalars("train/lr")], LR, rtol=1e-6)
    assert all(e.value >= 2 for e in acc.Scalars("train/N"))  # a curriculum has >= 2 points


def test_tensorboard_off_writes_no_events(tmp_path):
    np.save(tmp_path / "latents.npy", np.zeros((8, 2, 4, 4), np.float32) + np.arange(8.0)[:, None, None, None])
    out = tmp_path / "run"
    proc = run_cli("lct-train", [
        "--preset", "demo", "--latents", tmp_path / "latents.npy", "--out", out, "--steps", 2,
        "--device", "cpu", "--no-progress", "optim.batch_size=8", "run.log_every=1",
        "run.ckpt_every=2", "run.sample_every=0", "run.n_samples=2", "run.tensorboard=false"],
        tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert not list(out.rglob("events.out.tfevents.*"))
