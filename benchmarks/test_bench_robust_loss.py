"""pytest-benchmark suite: fused robust loss and objective vs eager and torch.compile.

Each case times forward, backward and forward+backward; the parameters name the
shape, the mode and the implementation (see cases.py).
"""

import pytest

import cases
from conftest import DEVICE, DTYPE, ROUNDS

LOSS_IMPLS = cases.loss_impls(DEVICE)
OBJECTIVE_IMPLS = cases.objective_impls(DEVICE)


def _run(benchmark, fn, inputs, mode):
    setup, run = cases.modes(fn, inputs, DEVICE)[mode]  # scalar losses: no grad_out

    def timed():
        run()
        cases.sync(DEVICE)

    for _ in range(3):  # warm-up, and torch.compile's first compilation
        setup()
        timed()
    benchmark.extra_info.update(device=DEVICE, dtype=str(DTYPE), shape=list(inputs[0].shape))
    benchmark.pedantic(timed, setup=setup, rounds=ROUNDS, iterations=1)


@pytest.mark.parametrize("impl", list(LOSS_IMPLS))
@pytest.mark.parametrize("mode", ["fwd", "bwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", list(cases.SHAPES))
def test_cauchy_loss(benchmark, shape, mode, impl):
    benchmark.group = f"cauchy {shape} {mode}"
    inputs = cases.loss_inputs(cases.SHAPES[shape], DTYPE, DEVICE)
    _run(benchmark, LOSS_IMPLS[impl], inputs, mode)


@pytest.mark.parametrize("impl", list(OBJECTIVE_IMPLS))
@pytest.mark.parametrize("shape", ["256x4x32x32", "128x4x32x32"])
def test_consistency_objective(benchmark, shape, impl):
    benchmark.group = f"objective {shape} fwd+bwd"
    inputs = cases.objective_inputs(cases.SHAPES[shape], DTYPE, DEVICE)
    _run(benchmark, OBJECTIVE_IMPLS[impl], inputs, "fwd+bwd")
