"""Thread use of the C++ CPU kernels (csrc/cpu/parallel.h).

Contract:
  * threads(tasks, elems) = 1 when tasks <= 1, or max_threads <= 1, or the work
    tasks * elems is below 2 * K (K = 16384 elements per thread); otherwise
    min(max_threads, tasks, floor(tasks * elems / K)).  max_threads defaults to
    torch.get_num_threads(), so torch.set_num_threads(1) keeps every kernel on
    the calling thread, and a single problem never forks.
  * Results do not depend on the thread count: bit-identical outputs with 1 and
    2 threads, on shapes where 2 threads are really used.
"""

import pytest
import torch

import lct_kernels as L
from lct_kernels import _ext

pytestmark = pytest.mark.skipif(not _ext.CPU_EXT.loaded, reason="needs the C++ CPU extension")

K = 16384  # kMinElemsPerThread in csrc/cpu/parallel.h


def expected_threads(tasks, elems, max_threads):
    """The policy, written from the contract above (integer arithmetic)."""
    if tasks <= 1 or max_threads <= 1:
        return 1
    work = tasks * max(elems, 1)
    if work < 2 * K:
        return 1
    return min(max_threads, tasks, work // K)


@pytest.fixture
def threads():
    """Set torch's intra-op thread count for one test; restored afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("max_threads", [1, 2, 3, 8, 64])
def test_thread_plan_matches_contract(max_threads):
    grid = [0, 1, 2, 3, 7, 64, 128, 1000, 4096, 98304]
    elems = [0, 1, 32, 64, 128, 4096, 8191, 8192, 16384, 16385, 32768, 65536, 65537, 1 << 20]
    for t in grid:
        for e in elems:
            got = torch.ops.lct._cpu_threads(t, e, max_threads)
            assert got == expected_threads(t, e, max_threads), (t, e, max_threads, got)
            assert 1 <= got <= max(1, min(max_threads, max(t, 1)))


def test_single_problem_never_forks():
    for elems in (1, 4096, 1 << 20, 1 << 30):
        assert torch.ops.lct._cpu_threads(1, elems, 64) == 1


def test_demo_shapes_thread_use():
    # (tasks, elements per task) of the demo's calls.  Its losses (128 x 32, 128 x 64)
    # and its one ot_couple problem stay on the calling thread; its layer norms
    # (512 x 128 rows, 2048 x 32 rows, and the backward's (group, chunk) tasks) have
    # 64K elements, 4 K of work per thread: two threads on a 2-core machine, as ATen's.
    for tasks, elems in [(128, 32), (128, 64), (1, 128 * 128)]:
        assert torch.ops.lct._cpu_threads(tasks, elems, 64) == 1
    for tasks, elems in [(512, 128), (2048, 32), (128, 4 * 128)]:
        assert torch.ops.lct._cpu_threads(tasks, elems, 2) == 2
        assert torch.ops.lct._cpu_threads(tasks, elems, 64) == 4


def test_set_num_threads_is_honoured(threads):
    threads(1)
    assert torch.ops.lct._cpu_threads(1000, 1 << 20) == 1
    threads(2)
    assert torch.ops.lct._cpu_threads(1000, 1 << 20) == 2


def _run_all(seed=0):
    """Every CPU kernel at shapes where two threads are used; returns the outputs."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    # row-parallel losses (64 rows of 4096) and the split-row path (one long row)
    for name, (B, N) in {"rows": (64, 4096), "split": (1, 3 * K + 5)}.items():
        p = torch.randn(B, N, generator=g).requires_grad_()
        t = torch.randn(B, N, generator=g)
        w = torch.rand(B, generator=g) + 0.5
        for fn in (L.cauchy_loss, L.pseudo_huber_loss):
            for ew in (False, True):
                p.grad = None
                loss = fn(p, t, 0.3, weight=w, elementwise=ew, backend="cpu")
                loss.backward()
                out[f"{fn.__name__} {name} ew={ew}"] = (loss.detach().clone(), p.grad.clone())
    # consistency objective
    B, N = 64, 4096
    s = torch.randn(B, N, generator=g).requires_grad_()
    tt, x0 = torch.randn(B, N, generator=g), torch.randn(B, N, generator=g)
    w, dw = torch.rand(B, generator=g) + 0.5, torch.rand(B, generator=g) + 0.5
    mask = torch.rand(B, generator=g) < 0.5
    total, *_ = L.consistency_objective(s, tt, x0, w, dw, mask, 0.3, backend="cpu")
    total.backward()
    out["objective"] = (total.detach().clone(), s.grad.clone())
    # fused NsLN + modulate: 16 samples x 512 tokens x 256 (rows, and (group, chunk) tasks)
    x = torch.randn(16, 512, 256, generator=g).requires_grad_()
    shift = (torch.randn(16, 256, generator=g) * 0.1).requires_grad_()
    scale = (torch.randn(16, 256, generator=g) * 0.1).requires_grad_()
    bias = (torch.randn(256, generator=g) * 0.1).requires_grad_()
    y = L.nsln_modulate(x, shift, scale, bias, backend="cpu")
    y.backward(torch.randn(y.shape, generator=g))
    out["nsln_modulate"] = (y.detach().clone(), x.grad.clone(), shift.grad.clone(),
                            scale.grad.clone(), bias.grad.clone())
    # a batch of assignment problems (8 x 128 x 128)
    cost = torch.randn(8, 128, 128, generator=g)
    cols, u, v = L.ot_assign(cost, backend="cpu", return_duals=True)
    out["ot_assign"] = (cols, u, v)
    return out


def test_results_identical_for_one_and_two_threads(threads):
    # the shapes above must really use two threads, or the comparison says nothing
    for tasks, elems in [(64, 4096), (4, K), (16 * 2, 256 * 256), (8, 128 * 128)]:
        assert torch.ops.lct._cpu_threads(tasks, elems, 2) == 2
    threads(1)
    one = _run_all()
    threads(2)
    two = _run_all()
    assert one.keys() == two.keys()
    for k in one:
        for a, b in zip(one[k], two[k]):
            assert torch.equal(a, b), k


def test_long_row_paths_match_float64(threads):
    """One long row takes the split path with 2 threads and the serial chunked sum
    with 1: both give the Cauchy loss and gradient of the float64 formula."""
    g = torch.Generator().manual_seed(1)
    N = 3 * K + 5
    p = torch.randn(1, N, generator=g)
    t = torch.randn(1, N, generator=g)
    c = 0.3
    d = p.double() - t.double()
    m = (d * d).mean()
    ref_loss = torch.log1p(m / (2 * c * c))
    ref_grad = (2 * d / N) / (m + 2 * c * c)  # d/dp ln(1 + m / 2c^2)
    for n in (1, 2):
        threads(n)
        q = p.clone().requires_grad_()
        loss = L.cauchy_loss(q, t, c, backend="cpu")
        loss.backward()
        assert abs(float(loss.detach()) - float(ref_loss)) <= 1e-6 * abs(float(ref_loss))
        assert (q.grad.double() - ref_grad).abs().max() <= 1e-5 * ref_grad.abs().max()


def _cpuinfo_flags():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(not __import__("os").path.exists("/proc/cpuinfo"), reason="needs /proc/cpuinfo")
def test_cpu_report_names_model_and_isa_path(monkeypatch):
    """python -m lct_kernels reports the CPU model and the kernels' ISA path: AVX2+FMA
    exactly when /proc/cpuinfo lists both flags, base when LCT_CPU_ISA=base."""
    flags = _cpuinfo_flags()
    info = L.backend_info()["cpu"]
    with open("/proc/cpuinfo") as f:
        name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    assert info["model"].startswith(name)
    want = "avx2+fma" if {"avx2", "fma"} <= flags else "base"
    assert info["isa"].split(":")[0] == want
    monkeypatch.setenv("LCT_CPU_ISA", "base")
    assert L.backend_info()["cpu"]["isa"] == "base: forced by LCT_CPU_ISA=base"
    text = L.format_backend_info()
    assert name in text and "isa path" in text


def test_small_coupling_cost_runs_on_one_thread_and_restores_threads(threads, monkeypatch):
    """The demo-size cost GEMM runs with torch's thread count at 1 (no fork), the
    count is restored afterwards, and the cost is -2 x0 x1^T (float64 check)."""
    from lct_kernels.ops import ot as O

    seen = []
    real = torch.Tensor.__matmul__

    def spy(a, b):
        seen.append(torch.get_num_threads())
        return real(a, b)

    threads(2)
    g = torch.Generator().manual_seed(3)
    x0, x1 = torch.randn(128, 2, 4, 4, generator=g), torch.randn(128, 2, 4, 4, generator=g)
    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    cost = O.coupling_cost(x0, x1)
    big = O.coupling_cost(torch.randn(256, 128), torch.randn(256, 128))  # 2^23 > the limit
    monkeypatch.undo()
    assert seen == [1, 2]
    assert torch.get_num_threads() == 2
    ref = -2 * x0.reshape(128, -1).double() @ x1.reshape(128, -1).double().T
    assert (cost.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert big.shape == (256, 256)
