"""README.md's "Drop-in recipes" run as written.

Each recipe is the first ```python block under its ### heading, executed as is;
the test then checks what the recipe promises against an independent
computation (the unpatched model, SciPy's assignment, the module types).  The
torchcfm and timm recipes need the real libraries (``make integration``)."""

import copy
import re
from pathlib import Path

import numpy as np
import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def recipe(heading):
    text = README.read_text()
    match = re.search(rf"^### {re.escape(heading)}\n(.*?)(?=^#{{2,3}} )", text, re.M | re.S)
    assert match, f"README.md has no '### {heading}' section"
    block = re.search(r"```python\n(.*?)```", match.group(1), re.S)
    assert block, f"README.md's '### {heading}' has no python block"
    return block.group(1)


def test_recipe_in_your_dit():
    from test_patch_dit import DiT, inputs

    model = DiT(depth=2)
    before = copy.deepcopy(model)
    scope = {"model": model}
    exec(recipe("In your DiT"), scope)
    assert scope["n"] == 3  # 2 blocks + the final layer
    x, t = inputs()
    assert torch.allclose(model(x, t), before(x, t), rtol=1e-5, atol=1e-5)


@pytest.mark.integration
def test_recipe_in_torchcfm():
    pytest.importorskip("torchcfm")
    from scipy.optimize import linear_sum_assignment

    import lct_kernels

    scope = {}
    try:
        exec(recipe("In torchcfm"), scope)
    finally:
        lct_kernels.ot.unpatch_torchcfm()
    assert isinstance(scope["cfm"].ot_sampler, lct_kernels.ot.OTPlanSampler)
    x0, x1, xt, ut = scope["x0"], scope["x1"], scope["xt"], scope["ut"]
    # sigma = 0: xt = (1 - t) a + t b and ut = b - a for each sampled pair (a, b); torchcfm
    # draws the pairs from the plan (with replacement), so each a must be paired with its
    # partner in SciPy's optimal assignment
    t = scope["t"][:, None]
    a, b = (xt - t * ut).double(), (xt - t * ut + ut).double()
    cost = torch.cdist(x0.double(), x1.double()) ** 2
    rows, cols = linear_sum_assignment(cost.numpy())
    partner = cols[np.argsort(rows)]
    i = torch.cdist(a, x0.double()).argmin(1).numpy()
    j = torch.cdist(b, x1.double()).argmin(1).numpy()
    assert np.array_equal(j, partner[i])


@pytest.mark.integration
def test_recipe_in_timm():
    pytest.importorskip("timm")
    from lct_kernels.nn import NonScalingLayerNorm

    scope = {}
    exec(recipe("In timm"), scope)
    vit = scope["vit"]
    norms = [m for m in vit.modules() if isinstance(m, NonScalingLayerNorm)]
    # per block: norm1, norm2, q_norm, k_norm; plus the final norm
    assert len(norms) == 2 * 4 + 1
    out = vit(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    assert np.isfinite(out.detach().numpy()).all()
    assert all(m.bias.grad is not None for m in norms)
