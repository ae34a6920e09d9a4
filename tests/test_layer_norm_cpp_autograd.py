"""The layer norm's C++ autograd node (lct::layer_norm_autograd, csrc/cpu/layer_norm_autograd.cpp).

Contract: eager training calls of the layer norm family on CPU tensors record one C++
node (no Python autograd Function); its gradients are those of the formula
    y = ((x - mean) * rstd * weight + bias) * (1 + scale[g]) + shift[g],  g = row // group_rows
for every subset of the optional inputs given and every subset requiring grad (the node
maps needs_input_grad over the tensors actually given), in both memory modes; under
torch.inference_mode or no_grad the forward alone runs.  Checked against float64
autograd of the formula (tests/helpers.py, layer_norm64).
"""

import itertools

import pytest
import torch

import lct_kernels as L
from lct_kernels.ops.layer_norm import layer_norm
from helpers import layer_norm64
from lct_kernels import _ext

pytestmark = pytest.mark.skipif(not _ext.CPU_EXT.loaded, reason="needs the C++ CPU extension")

B, T, D = 3, 5, 16


def make(seed, which):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D, generator=g)
    t = {"x": x, "weight": 1 + 0.1 * torch.randn(D, generator=g),
         "bias": 0.1 * torch.randn(D, generator=g),
         "shift": 0.1 * torch.randn(B, D, generator=g), "scale": 0.1 * torch.randn(B, D, generator=g)}
    return {k: (v if k in which or k == "x" else None) for k, v in t.items()}


def recorded_node(y):
    """The name of the autograd node under the wrappers' reshape views."""
    node = y.grad_fn
    while type(node).__name__.startswith(("View", "Reshape", "Unsafe")):
        node = node.next_functions[0][0]
    return node.name()


def call(t, memory_efficient=False):
    if t["shift"] is not None:
        return L.nsln_modulate(t["x"], t["shift"], t["scale"], t["bias"], eps=1e-6)
    return layer_norm(t["x"], D, t["weight"], t["bias"], eps=1e-6,
                        memory_efficient=memory_efficient)


OPTIONAL_SETS = [(), ("bias",), ("weight",), ("weight", "bias"), ("shift", "scale"),
                 ("shift", "scale", "bias")]


@pytest.mark.parametrize("given", OPTIONAL_SETS, ids=lambda g: "+".join(g) or "plain")
def test_gradients_for_every_subset_requiring_grad(given):
    names = ["x", *given]
    for k in range(1, len(names) + 1):
        for wanted in itertools.combinations(names, k):
            t = make(0, given)
            for n in wanted:
                t[n].requires_grad_()
            y = call(t)
            assert "LayerNormFunction" in recorded_node(y), recorded_node(y)
            dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
            got = torch.autograd.grad(y, [t[n] for n in wanted], dy)
            ref_in = {n: (v.detach().double().requires_grad_() if n in wanted else v)
                      for n, v in t.items()}
            ref = layer_norm64(ref_in["x"], ref_in["weight"], ref_in["bias"], ref_in["shift"],
                            ref_in["scale"], 1e-6)
            torch.testing.assert_close(y.double(), ref.detach(), rtol=1e-5, atol=1e-5)
            want = torch.autograd.grad(ref, [ref_in[n] for n in wanted], dy.double())
            for n, a, b in zip(wanted, got, want):
                torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4,
                                           msg=f"given {given}, d/d{n} of {wanted}")


def test_memory_efficient_mode_keeps_y_and_matches():
    t = make(2, ("bias",))
    t["x"].requires_grad_()
    t["bias"].requires_grad_()
    y = call(t, memory_efficient=True)
    dy = torch.randn(y.shape)
    gx, gb = torch.autograd.grad(y, [t["x"], t["bias"]], dy)
    x64 = t["x"].detach().double().requires_grad_()
    b64 = t["bias"].detach().double().requires_grad_()
    rx, rb = torch.autograd.grad(layer_norm64(x64, None, b64, None, None, 1e-6), [x64, b64], dy.double())
    torch.testing.assert_close(gx.double(), rx, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gb.double(), rb, rtol=1e-4, atol=1e-4)


def test_no_node_without_grad_and_under_inference_mode():
    t = make(3, ("shift", "scale", "bias"))
    for p in t.values():
        if p is not None:
            p.requires_grad_()
    with torch.no_grad():
        assert call(t).grad_fn is None
    with torch.inference_mode():
        y = call({k: (v.detach() if v is not None else None) for k, v in t.items()})
    ref = layer_norm64(t["x"], None, t["bias"], t["shift"], t["scale"], 1e-6)
    torch.testing.assert_close(y.double(), ref.detach(), rtol=1e-5, atol=1e-5)


def test_the_direct_op_reports_its_gradients_to_the_right_inputs():
    # only shift requires grad, weight absent: the node must map needs_input_grad over
    # the tensors given (x, bias, shift, scale), not over the argument positions
    x = torch.randn(B * T, D)
    bias, scale = torch.randn(D), torch.randn(B, D)
    shift = torch.randn(B, D, requires_grad=True)
    y = torch.ops.lct.layer_norm_autograd(x, None, bias, shift, scale, 1e-6, T, False)
    (g,) = torch.autograd.grad(y.sum(), [shift])
    torch.testing.assert_close(g, torch.full((B, D), float(T)))  # d(sum y)/d shift_g = rows in g
