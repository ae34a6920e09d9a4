"""Data-parallel training (torchrun, gloo on CPU).

Settings under which K processes and one process are mathematically equal:
``ot.scope=global`` (one exact coupling of the global batch) and the diffusion
loss averaged over the selected samples of the global batch (what the trainer
does under DDP).  Every random draw is made for the global batch, so the two runs
see the same data, noise and sigma indices; they differ only in the order of
floating-point sums (DDP averages per-process gradients)."""

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("sklearn")

import lct_kernels as lk  # noqa: E402
from lct_kernels.train import distributed as ddp_lib  # noqa: E402
from lct_kernels.train.checkpoint import list_checkpoints, load_checkpoint  # noqa: E402
from lct_kernels.train.cli import train_main  # noqa: E402
from lct_kernels.train.config import build_config  # noqa: E402
from lct_kernels.train.pipeline import prepare_data  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Subprocesses import the lct_kernels this process imported (the tree, or an installed
# wheel under `make integration`), never a tree built for another torch.
PKG_PARENT = str(Path(sys.modules["lct_kernels"].__file__).resolve().parents[1])
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pair_worker(rank, size, port, data, noise, labels, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=size)
    try:
        share = lambda t: None if t is None else ddp_lib.share(t, rank, size)  # noqa: E731
        mine = ddp_lib.global_ot_pair(share(data), share(noise), share(labels))
        torch.save(mine, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("conditional", [False, True])
def test_global_ot_equals_the_single_process_coupling_of_the_gathered_batch(tmp_path, conditional):
    torch.manual_seed(0)
    data, noise = torch.randn(24, 2, 4, 4), torch.randn(24, 2, 4, 4)
    labels = torch.arange(24) % 3 if conditional else None
    mp.spawn(_pair_worker, args=(2, _free_port(), data, noise, labels, str(tmp_path)), nprocs=2)
    paired = torch.cat([torch.load(tmp_path / f"rank{r}.pt") for r in range(2)])
    expected = noise[lk.ot_couple(data, noise, groups=labels)]
    assert torch.equal(paired, expected)
    # and it differs from coupling each half separately (the per-rank scope)
    per_rank = torch.cat([h_n[lk.ot_couple(h_d, h_n)] for h_d, h_n in
                          zip(data.chunk(2), noise.chunk(2))])
    assert not torch.equal(per_rank, expected)


def _status_worker(rank, size, port, data, noise, labels, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=size)
    try:
        share = lambda t: ddp_lib.share(t, rank, size)  # noqa: E731
        got = {"good": ddp_lib.global_ot_pair(share(data), share(noise), share(labels),
                                              host_labels=labels, return_status=True)}
        bad = data.clone()
        bad[17] = float("nan")  # a sample of rank 1's share: rank 0's solve fails
        got["bad"] = ddp_lib.global_ot_pair(share(bad), share(noise), share(labels),
                                            return_status=True)[1]
        try:
            ddp_lib.global_ot_pair(share(bad), share(noise), share(labels))
        except ValueError as e:
            got["raised"] = str(e)
        torch.save(got, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_global_ot_status_travels_with_the_permutation_to_every_rank(tmp_path):
    # with return_status the solve is not checked on the host; status is 0-d int32, 0 when
    # solved and the same nonzero code on every rank when rank 0's solve failed; without
    # it every rank raises (none is left waiting in a collective)
    torch.manual_seed(1)
    data, noise = torch.randn(24, 2, 4, 4), torch.randn(24, 2, 4, 4)
    labels = torch.arange(24) % 3
    mp.spawn(_status_worker, args=(2, _free_port(), data, noise, labels, str(tmp_path)), nprocs=2)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    expected = noise[lk.ot_couple(data, noise, groups=labels)]
    assert torch.equal(torch.cat([g["good"][0] for g in got]), expected)
    for g in got:
        assert g["good"][1].dtype == torch.int32 and g["good"][1].shape == () and g["good"][1] == 0
        assert g["bad"] == 2  # lct::lap_status NAN
        assert "global_ot_pair" in g["raised"] and "NaN" in g["raised"]


def test_diffusion_coefficient_gives_the_global_average():
    torch.manual_seed(1)
    e = torch.rand(8)  # per-sample diffusion errors of a global batch of 8
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 0, 1], dtype=torch.bool)
    single = e[mask].mean()
    contributions = []
    for rank in range(2):
        m, err = ddp_lib.share(mask, rank, 2), ddp_lib.share(e, rank, 2)
        local = err[m].mean() if m.any() else torch.tensor(0.0)
        contributions.append(ddp_lib.diffusion_coefficient(1.0, m, mask, 2) * local)
    torch.testing.assert_close(sum(contributions) / 2, single)  # DDP averages over processes


def _overrides(cache_dir, **extra):
    items = {
        "data.cache_dir": str(cache_dir), "data.ae_steps": 150,
        "model.depth": 2, "model.hidden_size": 64, "model.num_heads": 2,
        "optim.batch_size": 32, "optim.warmup_steps": 0, "ot.scope": "global",
        "run.steps": 6, "run.log_every": 1, "run.ckpt_every": 100, "run.n_samples": 10,
        "run.progress": False, "run.tensorboard": False, "run.device": "cpu",
    }
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]


def _torchrun(args, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "lct_kernels.train", *args]
    env = dict(os.environ, PYTHONPATH=PKG_PARENT, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _losses(run):
    with open(Path(run) / "metrics.csv", newline="") as fh:
        return np.array([[float(r["step"]), float(r["loss"])] for r in csv.DictReader(fh)])


def test_two_processes_save_resume_and_match_one_process(tmp_path):
    cache = tmp_path / "cache"
    args = _overrides(cache)
    prepare_data(build_config("demo", overrides=args), progress=False)  # stage 1 once

    single = tmp_path / "single"
    assert train_main(["--out", str(single), *args]) == 0

    two = tmp_path / "two"
    _torchrun(["--out", str(two), "--stop-after", "3", *args])
    assert [s for s, _ in list_checkpoints(two / "checkpoints")] == [3]
    _torchrun(["--out", str(two), "--resume", *args])
    a, b = _losses(single), _losses(two)
    assert a[:, 0].tolist() == b[:, 0].tolist() == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(b[:, 1], a[:, 1], rtol=1e-4)
    state = load_checkpoint(list_checkpoints(two / "checkpoints")[-1][1])
    assert state["world_size"] == 2 and state["step"] == 6

    # a one-process checkpoint resumed by two processes continues the same trajectory
    mixed = tmp_path / "mixed"
    assert train_main(["--out", str(mixed), "--stop-after", "3", *args]) == 0
    proc = _torchrun(["--out", str(mixed), "--resume", *args])
    assert "saved by 1 process(es) on 2" in proc.stderr
    np.testing.assert_allclose(_losses(mixed)[:, 1], a[:, 1], rtol=1e-4)

    # the default per-process OT scope couples each share separately: it trains, and
    # (the coupling being different) its trajectory departs from the global one
    per_rank = tmp_path / "per_rank"
    _torchrun(["--out", str(per_rank), *_overrides(cache, **{"ot.scope": "rank"})])
    c = _losses(per_rank)
    assert np.isfinite(c[:, 1]).all() and not np.allclose(c[:, 1], a[:, 1], rtol=1e-4)


def test_global_batch_must_divide_among_processes(tmp_path):
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "lct_kernels.train", "--out", str(tmp_path / "r"),
           *_overrides(cache, **{"optim.batch_size": 33, "data.ae_steps": 5})]
    env = dict(os.environ, PYTHONPATH=PKG_PARENT, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "optim.batch_size" in proc.stderr and "divisible" in proc.stderr
