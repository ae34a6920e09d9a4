"""The torchcfm drop-in: lct_kernels.ot.OTPlanSampler and wasserstein.

The first four tests state what torchcfm's own test suite checks of its sampler
(written here in our words); the rest pin down the differences we promise."""

import math

import numpy as np
import ot as pot
import pytest
import torch

from lct_kernels.ot import OTPlanSampler, wasserstein

sampler = OTPlanSampler(method="exact")


def test_sample_map_without_replacement_recovers_a_permutation_plan():
    n = 128
    plan = np.random.default_rng().permutation(np.eye(n), axis=1)
    i, j = sampler.sample_map(plan, batch_size=n, replace=False)
    rebuilt = np.zeros((n, n))
    rebuilt[i, j] = 1
    assert np.array_equal(rebuilt, plan)


def test_get_map_equals_pot_emd():
    x0, x1 = torch.randn(128, 2, 2, 2), torch.randn(128, 2, 2, 2)
    M = torch.cdist(x0.reshape(128, -1), x1.reshape(128, -1)) ** 2
    expected = pot.emd(pot.unif(128), pot.unif(128), M.numpy())
    assert np.array_equal(sampler.get_map(x0, x1), expected)


def test_sample_plan_with_replacement_follows_sample_map_under_the_same_seed():
    torch.manual_seed(1980)
    np.random.seed(1980)
    x0, x1 = torch.randn(128, 2, 2, 2), torch.randn(128, 2, 2, 2)
    pi = sampler.get_map(x0, x1)
    i, j = sampler.sample_map(pi, batch_size=128, replace=True)
    torch.manual_seed(1980)
    np.random.seed(1980)
    s0, s1 = sampler.sample_plan(x0, x1, replace=True)
    assert torch.equal(x0[i], s0) and torch.equal(x1[j], s1)


def test_wasserstein_equals_pot():
    torch.manual_seed(1980)
    x0, x1 = torch.randn(128, 2, 2, 2), torch.randn(128, 2, 2, 2)
    M = torch.cdist(x0.reshape(128, -1), x1.reshape(128, -1))
    a = pot.unif(128)
    assert wasserstein(x0, x1, "exact") == np.sqrt(pot.emd2(a, a, (M**2).numpy()))
    assert wasserstein(x0, x1, "exact", power=1) == pot.emd2(a, a, M.numpy())
    assert wasserstein(x0, x1, "sinkhorn", reg=0.01, power=1) == pot.sinkhorn2(
        a, a, M.numpy(), reg=0.01, numItermax=int(1e7))
    with pytest.raises(ValueError):
        wasserstein(x0, x1, "noname", reg=0.01, power=1)


def test_sample_plan_without_replacement_is_the_permutation_in_random_order():
    x0, x1 = torch.randn(64, 6), torch.randn(64, 6)
    s0, s1 = sampler.sample_plan(x0, x1, replace=False)
    pi = sampler.get_map(x0, x1)
    rows = [int((x0 == r).all(1).nonzero()) for r in s0]
    cols = [int((x1 == c).all(1).nonzero()) for c in s1]
    assert sorted(rows) == list(range(64))
    assert all(pi[r, c] > 0 for r, c in zip(rows, cols))


def test_sample_plan_with_labels_keeps_labels_with_their_samples():
    x0, x1 = torch.randn(32, 3), torch.randn(32, 3)
    y0, y1 = torch.arange(32), torch.arange(100, 132)
    for replace in (False, True):
        a, b, ya, yb = sampler.sample_plan_with_labels(x0, x1, y0, y1, replace=replace)
        assert torch.equal(a, x0[ya]) and torch.equal(b, x1[yb - 100])
    a, b, ya, yb = sampler.sample_plan_with_labels(x0, x1, None, y1)
    assert ya is None and yb is not None


@pytest.mark.parametrize("method", ["sinkhorn", "unbalanced", "partial"])
def test_other_methods_delegate_to_pot(method):
    s = OTPlanSampler(method=method, reg=0.5)
    x0, x1 = torch.randn(16, 3), torch.randn(16, 3)
    pi = s.get_map(x0, x1)
    assert pi.shape == (16, 16) and np.isfinite(pi).all()
    a, b = s.sample_plan(x0, x1)
    assert a.shape == x0.shape


def test_exact_with_unequal_batches_delegates_to_pot():
    x0, x1 = torch.randn(8, 3), torch.randn(12, 3)
    M = torch.cdist(x0, x1) ** 2
    expected = pot.emd(pot.unif(8), pot.unif(12), M.numpy())
    assert np.allclose(sampler.get_map(x0, x1), expected)


def test_sample_trajectory_follows_the_plans():
    X = np.random.randn(16, 3, 2)
    traj = sampler.sample_trajectory(torch.tensor(X))
    assert traj.shape == (16, 3, 2)


def test_constructor_errors_and_compatibility_arguments():
    with pytest.raises(ValueError, match="Unknown method"):
        OTPlanSampler(method="greedy")
    s = OTPlanSampler("exact", normalize_cost=True, num_threads="max", warn=False)
    x0, x1 = torch.randn(10, 2), torch.randn(10, 2)
    assert np.array_equal(s.get_map(x0, x1), sampler.get_map(x0, x1))
    with pytest.raises(ValueError, match="power"):
        wasserstein(x0, x1, power=3)
    assert math.isfinite(wasserstein(x0, x1))
