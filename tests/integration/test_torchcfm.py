"""lct_kernels' OT sampler inside the real torchcfm (1.0.7, installed with --no-deps).

* ``ExactOptimalTransportConditionalFlowMatcher`` with ``ot_sampler`` replaced by
  ``lct_kernels.ot.OTPlanSampler("exact")``: ``sample_location_and_conditional_flow``
  pairs every x0 row with its partner in SciPy's optimal assignment (torchcfm
  draws the pairs from the plan with replacement; without replacement the pairs
  are the whole assignment and their total cost is SciPy's optimum); t, xt, ut
  (and eps) have exactly the shapes and dtypes of torchcfm's own, and under the
  same seeds the very same values (the plan is the same permutation, the draw
  is torchcfm's).
* ``patch_torchcfm()`` returns what it replaced; afterwards every new torchcfm
  ``OTPlanSampler`` (directly, or inside the matchers) is ours; ``unpatch_torchcfm()``
  undoes it.
"""

import numpy as np
import pytest
import torch

pytest.importorskip("torchcfm")
import torchcfm.conditional_flow_matching as cfm_mod  # noqa: E402
import torchcfm.optimal_transport as tcfm_ot  # noqa: E402
from scipy.optimize import linear_sum_assignment  # noqa: E402
from torchcfm.conditional_flow_matching import (  # noqa: E402
    ExactOptimalTransportConditionalFlowMatcher,
    SchrodingerBridgeConditionalFlowMatcher,
)

import lct_kernels  # noqa: E402
from lct_kernels.ot import OTPlanSampler, patch_torchcfm, unpatch_torchcfm  # noqa: E402

TORCHCFM_SAMPLER = tcfm_ot.OTPlanSampler


def scipy_assignment(x0, x1):
    """SciPy's optimal assignment of the float64 squared-Euclidean cost: (sigma, cost)."""
    cost = (torch.cdist(x0.reshape(len(x0), -1).double(), x1.reshape(len(x1), -1).double())
            ** 2).numpy()
    rows, cols = linear_sum_assignment(cost)
    return cols[np.argsort(rows)], cost


def row_index(a, x):
    """Index in x of each row of a (rows are matched up to float rounding)."""
    d = torch.cdist(a.reshape(len(a), -1).double(), x.reshape(len(x), -1).double())
    dist, idx = d.min(1)
    assert float(dist.max()) < 1e-4
    return idx.numpy()


def batches(n=64):
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(n, 3, 2, 2, generator=g)  # images: torchcfm flattens (bs, *dim)
    x1 = torch.randn(n, 3, 2, 2, generator=g) + 2
    return x0, x1


@pytest.mark.parametrize("return_noise", [False, True])
def test_matcher_with_our_sampler_pairs_rows_with_their_optimal_partners(return_noise):
    x0, x1 = batches()
    ours = ExactOptimalTransportConditionalFlowMatcher(sigma=0.0)
    ours.ot_sampler = OTPlanSampler(method="exact")
    theirs = ExactOptimalTransportConditionalFlowMatcher(sigma=0.0)
    assert type(theirs.ot_sampler) is TORCHCFM_SAMPLER
    torch.manual_seed(5), np.random.seed(5)
    got = ours.sample_location_and_conditional_flow(x0, x1, return_noise=return_noise)
    torch.manual_seed(5), np.random.seed(5)
    want = theirs.sample_location_and_conditional_flow(x0, x1, return_noise=return_noise)
    assert len(got) == len(want) == (4 if return_noise else 3)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert torch.allclose(g, w, rtol=0, atol=1e-6)  # same plan, same draw
    t, xt, ut = got[:3]
    assert t.shape == (64,) and xt.shape == ut.shape == x0.shape
    # sigma = 0: xt = (1 - t) a + t b and ut = b - a for each sampled pair (a, b)
    tt = t.reshape(-1, 1, 1, 1)
    a, b = xt - tt * ut, xt - tt * ut + ut
    sigma, _ = scipy_assignment(x0, x1)
    i, j = row_index(a, x0), row_index(b, x1)
    assert np.array_equal(j, sigma[i])


def test_without_replacement_the_pairs_are_the_assignment_at_scipy_cost():
    x0, x1 = batches()
    sampler = ExactOptimalTransportConditionalFlowMatcher(sigma=0.0)
    sampler.ot_sampler = OTPlanSampler(method="exact")
    a, b = sampler.ot_sampler.sample_plan(x0, x1, replace=False)
    sigma, cost = scipy_assignment(x0, x1)
    i, j = row_index(a, x0), row_index(b, x1)
    assert sorted(i) == list(range(64)) and np.array_equal(j, sigma[i])
    total = float((a.double() - b.double()).reshape(64, -1).square().sum())
    assert total == pytest.approx(float(cost[np.arange(64), sigma].sum()), rel=1e-6)


def test_patch_torchcfm_replaces_the_class_torchcfm_builds_and_unpatch_restores_it():
    try:
        replaced = patch_torchcfm()
        assert replaced["torchcfm.optimal_transport.OTPlanSampler"] is TORCHCFM_SAMPLER
        assert replaced["torchcfm.conditional_flow_matching.OTPlanSampler"] is TORCHCFM_SAMPLER
        assert patch_torchcfm() == {}  # a second call changes nothing
        assert isinstance(tcfm_ot.OTPlanSampler(method="exact"), OTPlanSampler)
        assert isinstance(ExactOptimalTransportConditionalFlowMatcher().ot_sampler, OTPlanSampler)
        sb = SchrodingerBridgeConditionalFlowMatcher(sigma=1.0, ot_method="sinkhorn")  # to POT
        assert isinstance(sb.ot_sampler, OTPlanSampler) and sb.ot_sampler.method == "sinkhorn"
        # the patched matcher's pairs are SciPy's assignment (with replacement: each row's
        # optimal partner)
        x0, x1 = batches(32)
        t, xt, ut = ExactOptimalTransportConditionalFlowMatcher(
            sigma=0.0).sample_location_and_conditional_flow(x0, x1)
        tt = t.reshape(-1, 1, 1, 1)
        sigma, _ = scipy_assignment(x0, x1)
        i, j = row_index(xt - tt * ut, x0), row_index(xt - tt * ut + ut, x1)
        assert np.array_equal(j, sigma[i])
    finally:
        restored = unpatch_torchcfm()
    assert set(restored) == set(replaced)
    assert tcfm_ot.OTPlanSampler is TORCHCFM_SAMPLER and cfm_mod.OTPlanSampler is TORCHCFM_SAMPLER
    assert type(ExactOptimalTransportConditionalFlowMatcher().ot_sampler) is TORCHCFM_SAMPLER
    assert unpatch_torchcfm() == {}
    assert lct_kernels.ot.patch_torchcfm is patch_torchcfm
