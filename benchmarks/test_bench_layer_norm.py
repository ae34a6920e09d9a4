"""pytest-benchmark suite: NsLN and the fused NsLN + adaLN modulate vs F.layer_norm (+ eager
modulate) and torch.compile, forward, backward and forward+backward (see cases_layer_norm.py)."""

import pytest

import cases
import cases_layer_norm as ln
from conftest import DEVICE, DTYPE, ROUNDS

SHAPES = ln.GPU_SHAPES if DEVICE == "cuda" else ln.CPU_SHAPES
CASES = [(label, name) for label, shape in SHAPES.items() for name in ln.impls(DEVICE, shape[3])]


@pytest.mark.parametrize("mode", ["fwd", "bwd", "fwd+bwd"])
@pytest.mark.parametrize("label,impl", CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_layer_norm(benchmark, label, impl, mode):
    shape = SHAPES[label]
    fn = ln.impls(DEVICE, shape[3])[impl]
    args, grad_out = ln.inputs(shape, DTYPE, DEVICE)
    setup, run = cases.modes(fn, args, DEVICE, grad_out)[mode]

    def timed():
        run()
        cases.sync(DEVICE)

    for _ in range(3):
        setup()
        timed()
    benchmark.group = f"layer_norm {label} {mode}"
    benchmark.extra_info.update(device=DEVICE, dtype=str(DTYPE), shape=list(shape[:3]))
    benchmark.pedantic(timed, setup=setup, rounds=ROUNDS, iterations=1)
