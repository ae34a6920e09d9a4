"""Launcher logic of the Triton kernels, on the CPU: the layer-norm backward grid
(CUDA's 65535 limit on grid y), the device guard around every launch, and the
coverage of benchmarks/triton_compile_check.py (every @triton.jit kernel)."""

import contextlib
import importlib
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lct_kernels as L
from helpers import HAS_TRITON_CPU
from lct_kernels.ops.layer_norm import layer_norm

triton = pytest.importorskip("triton")
from lct_kernels.triton import _launch, layer_norm as LN, ot_assign as OT, robust_loss as RL  # noqa: E402

needs_interpreter = pytest.mark.skipif(not HAS_TRITON_CPU, reason="Triton interpreter unavailable")


# ---------------------------------------------------------------------------
# Layer-norm backward grid: y <= 65535, every row of a group in exactly one chunk
# ---------------------------------------------------------------------------
def check_grid(group_rows, D, limit=65535):
    chunks, rpc = LN.backward_grid(group_rows, D)
    assert 1 <= chunks <= limit, (group_rows, D, chunks)
    # chunk c covers [c * rpc, min((c + 1) * rpc, group_rows)): all rows, none empty
    assert (chunks - 1) * rpc < group_rows <= chunks * rpc, (group_rows, D, chunks, rpc)
    return chunks, rpc


@pytest.mark.parametrize("group_rows,D", [
    (1, 1), (1, 4096), (7, 64), (128, 64), (4096, 1), (100_000, 3),
    (524_288, 4096),  # the case: 65536 chunks of 8 rows before the clamp
    (524_289, 4096), (10**7, 64), (2**31 - 1, 4096), (2**31 - 1, 1), (3, 10**6),
])
def test_backward_grid_covers_every_row_within_the_grid_y_limit(group_rows, D):
    chunks, rpc = check_grid(group_rows, D)
    rows_per_task = max(1, LN.TASK_ELEMS // D)
    if -(-group_rows // rows_per_task) <= 65535:  # below the limit: about TASK_ELEMS per program
        assert rpc == -(-group_rows // chunks) and rpc <= rows_per_task


def test_backward_grid_enumerated_intervals_partition_the_group():
    for group_rows in (1, 2, 5, 17, 1000):
        for D in (1, 64, 4096, 40000):
            chunks, rpc = check_grid(group_rows, D)
            covered = [r for c in range(chunks) for r in range(c * rpc, min((c + 1) * rpc, group_rows))]
            assert covered == list(range(group_rows))


def test_backward_grid_follows_the_module_limit(monkeypatch):
    monkeypatch.setattr(LN, "MAX_GRID_Y", 3)
    for group_rows in (1, 3, 4, 100, 101, 12345):
        check_grid(group_rows, 4096, limit=3)


def test_backward_grid_rejects_empty_groups():
    with pytest.raises(ValueError, match="group_rows must be >= 1"):
        LN.backward_grid(0, 64)


def _ln_float64(x, weight, bias, shift, scale, group_rows, eps):
    """y = ((x - mean) rstd * weight + bias) * (1 + scale[g]) + shift[g], in float64."""
    x = x.double()
    mean = x.mean(-1, keepdim=True)
    z = (x - mean) / torch.sqrt(((x - mean) ** 2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        z = z * weight.double()
    if bias is not None:
        z = z + bias.double()
    if shift is not None:
        G = shift.shape[0]
        z = (z.view(G, group_rows, -1) * (1 + scale.double()[:, None])
             + shift.double()[:, None]).view_as(x)
    return z


@needs_interpreter
@pytest.mark.parametrize("D", [16, 64, 33])
def test_layer_norm_backward_with_a_clamped_grid_matches_float64(monkeypatch, D):
    """A grid-y limit of 2 forces several rows per chunk and few chunks per group."""
    monkeypatch.setattr(LN, "MAX_GRID_Y", 2)
    monkeypatch.setattr(LN, "TASK_ELEMS", D)  # one row per task: 9 chunks wanted, 2 allowed
    chunks, rpc = LN.backward_grid(9, D)
    assert (chunks, rpc) == (2, 5)
    B, T = 2, 9
    x = (torch.randn(B, T, D) * 2 + 0.5).requires_grad_()
    bias = torch.randn(D, requires_grad=True)
    shift = torch.randn(B, D, requires_grad=True)
    scale = torch.randn(B, D, requires_grad=True)
    y = L.nsln_modulate(x, shift, scale, bias=bias, backend="triton")
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, bias, shift, scale), gy)
    leaves = [t.detach().double().requires_grad_() for t in (x, bias, shift, scale)]
    ref = _ln_float64(leaves[0].view(B * T, D), None, leaves[1], leaves[2], leaves[3], T, 1e-6)
    want = torch.autograd.grad(ref, leaves, gy.double().view(B * T, D))
    torch.testing.assert_close(y.double(), ref.view(B, T, D).detach(), atol=2e-5, rtol=0)
    for name, g, w in zip(("x", "bias", "shift", "scale"), got, want):
        torch.testing.assert_close(g.double(), w, atol=5e-5, rtol=1e-5, msg=name)

    # layer_norm with weight: the partials' reduction over the clamped chunks
    weight = torch.randn(D, requires_grad=True)
    x2 = x.detach().view(B * T, D).requires_grad_()
    y2 = layer_norm(x2, D, weight=weight, bias=bias, backend="triton")
    got = torch.autograd.grad(y2, (x2, weight, bias), gy.view(B * T, D))
    leaves = [t.detach().double().requires_grad_() for t in (x2, weight, bias)]
    ref = _ln_float64(leaves[0], leaves[1], leaves[2], None, None, B * T, 1e-5)
    want = torch.autograd.grad(ref, leaves, gy.double().view(B * T, D))
    for name, g, w in zip(("x", "weight", "bias"), got, want):
        torch.testing.assert_close(g.double(), w, atol=5e-5, rtol=1e-5, msg=name)


# ---------------------------------------------------------------------------
# Device guard
# ---------------------------------------------------------------------------
class _FakeCuda:
    """Only .device is read by device_guard."""

    def __init__(self, index):
        self.device = torch.device("cuda", index)


def test_device_guard_enters_the_tensors_cuda_device(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def fake_device(dev):
        entered.append(dev)
        yield

    monkeypatch.setattr(torch.cuda, "device", fake_device)
    with _launch.device_guard(_FakeCuda(1)):
        pass
    assert entered == [torch.device("cuda", 1)]
    with _launch.device_guard(torch.empty(2)), _launch.device_guard(torch.empty(2, device="meta")):
        pass
    assert entered == [torch.device("cuda", 1)]  # CPU and meta tensors never touch CUDA


@needs_interpreter
def test_every_launcher_launches_inside_the_device_guard(monkeypatch):
    """Each launcher's kernel call happens while device_guard(its input) is entered."""
    guarded, launched = [], []

    @contextlib.contextmanager
    def recording_guard(t):
        guarded.append(t)
        yield
        guarded.pop()

    def wrap(module, attr):
        kernel = getattr(module, attr)

        class Checked:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    launched.append((attr, len(guarded) == 1 and guarded[0] is args[0]))
                    return kernel[grid](*args, **kwargs)
                return launch

        monkeypatch.setattr(module, attr, Checked())

    for module in (LN, OT, RL):
        monkeypatch.setattr(module, "device_guard", recording_guard)
    for module, attr in ((LN, "_ln_fwd_kernel"), (LN, "_ln_bwd_kernel"), (OT, "_lap_kernel"),
                         (RL, "_robust_loss_kernel"), (RL, "_consistency_objective_kernel")):
        wrap(module, attr)
    x = torch.randn(4, 16, requires_grad=True)
    layer_norm(x, 16, weight=torch.ones(16), backend="triton").sum().backward()
    L.ot_assign(torch.rand(3, 3, dtype=torch.float64), backend="triton")
    L.cauchy_loss(x.detach(), torch.zeros(4, 16), 1.0, backend="triton")
    L.consistency_objective(x.detach(), torch.zeros(4, 16), torch.zeros(4, 16), None, None, None,
                            1.0, backend="triton")
    assert sorted(launched) == sorted([("_ln_fwd_kernel", True), ("_ln_bwd_kernel", True),
                                       ("_lap_kernel", True), ("_robust_loss_kernel", True),
                                       ("_consistency_objective_kernel", True)])


# ---------------------------------------------------------------------------
# Compile-check coverage
# ---------------------------------------------------------------------------
CHECK = Path(__file__).resolve().parents[1] / "benchmarks" / "triton_compile_check.py"


def _listed_cases():
    """The check's cases, enumerated in a fresh process (without the interpreter, which
    replaces the @triton.jit objects the compiler needs)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(CHECK), "--list"], env=env, capture_output=True,
                         text=True, check=True).stdout
    return [json.loads(line) for line in out.splitlines()]


def test_compile_check_covers_every_jit_kernel_and_every_config():
    cases = _listed_cases()
    jit = {name: inspect.getsource(obj.fn) for m in (LN, OT, RL) for name, obj in vars(m).items()
           if hasattr(obj, "fn") and hasattr(obj, "arg_names")}  # JITFunction / InterpretedFunction
    # entry kernels: the jit functions no other jit function calls (the rest are helpers)
    entries = {n for n in jit if not any(f"{n}(" in src for m, src in jit.items() if m != n)}
    assert len(entries) == 5, entries
    assert {c["name"] for c in cases} == entries
    # every tile configuration the launchers can choose (sizes 0 .. 40000) is compiled on
    # both targets: computed here from the config functions, independently of the sweep
    want = {
        "_ln_fwd_kernel": {LN.forward_config(D) for D in range(40001)},
        "_ln_bwd_kernel": {LN.backward_config(D) for D in range(40001)},
        "_robust_loss_kernel": {RL.row_config(N) for N in range(40001)},
        "_consistency_objective_kernel": {RL.row_config(N) for N in range(40001)},
        "_lap_kernel": {OT.block_config(M) for M in range(1, OT.MAX_M + 1)},
    }
    for arch in (90, 80):
        for name, configs in want.items():
            got = set()
            for c in cases:
                if c["arch"] == arch and c["name"] == name:
                    cx, w = c["constexprs"], c["num_warps"]
                    if name.startswith("_ln"):
                        got.add((cx["ONE_BLOCK"], cx["BLOCK_D"], cx["ROWS"], w))
                    elif name == "_lap_kernel":
                        got.add((cx["BLOCK_M"], w))
                    else:
                        got.add((cx["ONE_BLOCK"], cx["BLOCK"], w))
            assert got == configs, (arch, name, configs ^ got)
    # and every dtype on sm_90
    for name in want:
        dtypes = {c["dtype"] for c in cases if c["arch"] == 90 and c["name"] == name}
        assert dtypes == ({"fp32", "fp64"} if name == "_lap_kernel" else {"fp32", "fp16", "bf16"})


def test_representatives_refuse_a_config_outside_the_sweep():
    sys.path.insert(0, str(CHECK.parent))
    try:
        T = importlib.import_module("triton_compile_check")
    finally:
        sys.path.remove(str(CHECK.parent))
    with pytest.raises(SystemExit, match="not covered"):
        T.representatives(lambda n: min(n, 100), 0, 50, huge=(1000,))
    assert T.representatives(lambda n: n // 10, 0, 29, huge=()) == {0: 9, 1: 19, 2: 29}
