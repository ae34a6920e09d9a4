"""Specification of ot_assign and ot_couple: exact assignment, on every backend."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

import lct_kernels as L
from lct_kernels import _backend

BACKENDS = [b for b in ("cpu", "torch", "triton") if _backend.status("ot_assign", b, "cpu")[0]]
FAST = [b for b in BACKENDS if b == "cpu"]  # large problems: the compiled solver only
# the interpreted Triton and Python reference solvers take small problems
SMALL_N = {"cpu": 64, "torch": 24, "triton": 10}


def scipy_optimum(C):
    r, c = linear_sum_assignment(np.asarray(C, dtype=np.float64))
    return np.asarray(C, dtype=np.float64)[r, c].sum()


def total(C, cols):
    C = np.asarray(C, dtype=np.float64)
    return C[np.arange(C.shape[0]), np.asarray(cols)].sum()


def assert_valid_and_optimal(C, cols, rel=1e-12):
    cols = np.asarray(cols)
    n, m = np.asarray(C).shape
    assert cols.shape == (n,) and cols.dtype == np.int64
    assert len(set(cols.tolist())) == n and ((0 <= cols) & (cols < m)).all()
    ref = scipy_optimum(C)
    assert abs(total(C, cols) - ref) <= rel * max(1.0, abs(ref)), (total(C, cols), ref)


# ---------------------------------------------------------------------------
# Exactness
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 7, 64, 256, 512])
@pytest.mark.parametrize("D", [2, 64])
def test_random_gaussian_points_match_scipy(n, D):
    x, z = torch.randn(n, D, dtype=torch.float64), torch.randn(n, D, dtype=torch.float64)
    C = torch.cdist(x, z) ** 2
    for backend in BACKENDS:
        if n > SMALL_N[backend]:
            continue
        assert_valid_and_optimal(C, L.ot_assign(C, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_integer_costs_with_many_ties_are_exact(backend):
    rng = np.random.default_rng(1)
    n = min(40, SMALL_N[backend])
    for _ in range(5):
        C = rng.integers(0, 3, size=(n, n)).astype(np.float64)
        cols = L.ot_assign(torch.tensor(C), backend=backend)
        assert total(C, cols) == scipy_optimum(C)  # exactly


@pytest.mark.parametrize("backend", BACKENDS)
def test_degenerate_inputs(backend):
    x = torch.randn(5, 3, dtype=torch.float64)
    duplicated = torch.cdist(torch.cat([x, x]), torch.cat([x, x])) ** 2
    assert_valid_and_optimal(duplicated, L.ot_assign(duplicated, backend=backend))
    constant = torch.full((6, 6), 2.5, dtype=torch.float64)
    assert_valid_and_optimal(constant, L.ot_assign(constant, backend=backend))
    one = torch.tensor([[3.0]])
    assert L.ot_assign(one, backend=backend).tolist() == [0]
    empty = torch.zeros(0, 4)
    assert L.ot_assign(empty, backend=backend).shape == (0,)
    huge = torch.randn(6, 6, dtype=torch.float64) * 1e30
    assert_valid_and_optimal(huge, L.ot_assign(huge, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_rectangular_n_less_than_m(backend):
    C = torch.randn(5, 9, dtype=torch.float64)
    assert_valid_and_optimal(C, L.ot_assign(C, backend=backend))
    Ci = torch.randint(0, 3, (4, 7)).double()
    assert total(Ci, L.ot_assign(Ci, backend=backend)) == scipy_optimum(Ci)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_problems(backend):
    n = min(12, SMALL_N[backend])
    C = torch.randn(4, n, n + 2, dtype=torch.float64)
    cols = L.ot_assign(C, backend=backend)
    assert cols.shape == (4, n)
    for b in range(4):
        assert_valid_and_optimal(C[b], cols[b])


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_costs(backend):
    C = torch.randn(9, 9)
    cols = L.ot_assign(C, backend=backend)
    assert_valid_and_optimal(C.double(), cols, rel=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_duals_are_an_optimality_certificate(backend):
    C = torch.randn(3, 8, 10, dtype=torch.float64)
    cols, u, v = L.ot_assign(C, backend=backend, return_duals=True)
    assert u.dtype == v.dtype == torch.float64 and u.shape == (3, 8) and v.shape == (3, 10)
    reduced = C - u[:, :, None] - v[:, None, :]
    assert (reduced >= -1e-9).all()
    matched = torch.gather(reduced, 2, cols[:, :, None])
    assert matched.abs().max() < 1e-9
    assert (v <= 1e-12).all()  # rectangular: v <= 0, and 0 on unused columns
    used = torch.zeros(3, 10, dtype=torch.bool).scatter_(1, cols, True)
    assert (v[~used] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_forbidden_pairs_are_avoided(backend):
    C = torch.tensor([[1.0, float("inf"), 5.0], [float("inf"), 2.0, 1.0], [0.5, 1.0, float("inf")]],
                     dtype=torch.float64)
    cols = L.ot_assign(C, backend=backend)
    assert torch.isfinite(C[torch.arange(3), cols]).all()
    assert total(C.numpy(), cols) == scipy_optimum(C.numpy())


def _solver_cases():
    """Shapes whose widths exercise the vector bodies and their scalar tails (m mod 8),
    with ties (tight-edge reaches), forbidden pairs, float32 and rectangular problems."""
    rng = np.random.default_rng(7)
    for n, m in [(1, 1), (3, 5), (8, 8), (9, 13), (31, 31), (37, 45), (64, 64), (130, 133)]:
        yield rng.normal(size=(n, m))
        yield rng.integers(0, 3, size=(n, m)).astype(np.float64)
        pts = rng.normal(size=(n, 4)), rng.normal(size=(m, 4))
        yield (-2 * pts[0] @ pts[1].T).astype(np.float32)
        forbidden = rng.integers(0, 9, size=(n, m)).astype(np.float64)
        forbidden[rng.random((n, m)) < 0.25] = np.inf
        if np.isfinite(scipy_optimum_or_none(forbidden) or np.inf):
            yield forbidden


def scipy_optimum_or_none(C):
    try:
        return scipy_optimum(C)
    except ValueError:  # infeasible
        return None


@pytest.mark.skipif("cpu" not in BACKENDS, reason="compiled CPU extension not built")
def test_cpu_vector_and_baseline_builds_agree_bit_for_bit(monkeypatch):
    """The AVX2 row passes compute the same values in the same order as the scalar
    (baseline) build, so both return the same assignment and duals, and both are optimal."""
    cases = [torch.from_numpy(np.ascontiguousarray(C)) for C in _solver_cases()]
    results = {}
    for isa in ("auto", "base"):
        if isa == "base":
            monkeypatch.setenv("LCT_CPU_ISA", "base")
        results[isa] = [L.ot_assign(C, backend="cpu", return_duals=True) for C in cases]
    for C, ours, base in zip(cases, results["auto"], results["base"]):
        for a, b in zip(ours, base):
            assert torch.equal(a, b)
        Cd = C.double().numpy()
        assert abs(total(Cd, ours[0]) - scipy_optimum(Cd)) <= 1e-12 * max(1.0, abs(scipy_optimum(Cd)))


@pytest.mark.skipif("cpu" not in BACKENDS, reason="compiled CPU extension not built")
@pytest.mark.parametrize("n", [300, 700])
def test_cpu_solver_is_exact_on_larger_tie_heavy_problems(n):
    """Small integer costs make long runs of equal distances: levels with many columns
    and tight edges reached in the middle of a relaxation."""
    rng = np.random.default_rng(n)
    C = rng.integers(0, 4, size=(n, n)).astype(np.float64)
    cols = L.ot_assign(torch.from_numpy(C), backend="cpu")
    assert len(set(cols.tolist())) == n
    assert total(C, cols) == scipy_optimum(C)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 9),
    extra=st.integers(0, 3),
    data=st.data(),
)
def test_property_optimal_on_arbitrary_integer_matrices(n, extra, data):
    m = n + extra
    values = data.draw(st.lists(st.integers(-5, 5), min_size=n * m, max_size=n * m))
    C = torch.tensor(values, dtype=torch.float64).reshape(n, m)
    for backend in FAST + (["torch"] if "torch" in BACKENDS else []):
        cols = L.ot_assign(C, backend=backend)
        assert total(C.numpy(), cols) == scipy_optimum(C.numpy())


# ---------------------------------------------------------------------------
# Bad input never hangs: it raises, quickly
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_costs_raise_value_errors(backend):
    nan = torch.randn(4, 4, dtype=torch.float64)
    nan[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        L.ot_assign(nan, backend=backend)
    neg = torch.randn(4, 4, dtype=torch.float64)
    neg[0, 0] = float("-inf")
    with pytest.raises(ValueError, match="-inf"):
        L.ot_assign(neg, backend=backend)
    infeasible = torch.randn(3, 3, dtype=torch.float64)
    infeasible[:, 1] = float("inf")  # column 1 cannot be used, but all three are needed
    with pytest.raises(ValueError, match="infeasible"):
        L.ot_assign(infeasible, backend=backend)
    all_inf_row = torch.randn(3, 5, dtype=torch.float64)
    all_inf_row[2] = float("inf")
    with pytest.raises(ValueError, match="infeasible"):
        L.ot_assign(all_inf_row, backend=backend)
    batch = torch.randn(3, 4, 4, dtype=torch.float64)
    batch[2, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="problem 2 of the batch"):
        L.ot_assign(batch, backend=backend)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("cpu", "triton")])
def test_raw_op_refuses_bad_per_problem_sizes(backend):
    """The registered op takes per-problem (rows, columns) for padded batches; sizes
    outside the tensor or with rows > columns give status 6 (bad shape), x = -1 and
    zero duals for that problem, and leave the other problems alone."""
    op = torch.ops.lct.ot_assign if backend == "cpu" else torch.ops.lct.triton_ot_assign
    C = torch.randn(5, 4, 6, dtype=torch.float64)
    sizes = torch.tensor([[4, 6], [5, 6], [4, 7], [3, 2], [-1, 6]])
    x, u, v, status = op(C, sizes)
    assert status.tolist() == [0, 6, 6, 6, 6]
    assert_valid_and_optimal(C[0], x[0])
    assert (x[1:] == -1).all() and (u[1:] == 0).all() and (v[1:] == 0).all()


def test_argument_errors():
    with pytest.raises(ValueError, match="N <= M"):
        L.ot_assign(torch.randn(5, 3))
    with pytest.raises(TypeError, match="float32 or float64"):
        L.ot_assign(torch.randn(3, 3).half())
    with pytest.raises(ValueError, match=r"\(N, M\) or \(B, N, M\)"):
        L.ot_assign(torch.randn(3))
    with pytest.raises(TypeError, match="cost must be a torch.Tensor"):
        L.ot_assign(np.zeros((3, 3)))


# ---------------------------------------------------------------------------
# ot_couple
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("B,shape", [(64, (4, 4, 4)), (128, (16,)), (1, (3,))])
def test_couple_is_the_exact_squared_euclidean_coupling(backend, B, shape):
    x0, x1 = torch.randn(B, *shape), torch.randn(B, *shape)
    perm = L.ot_couple(x0, x1, backend=backend)
    C = (torch.cdist(x0.reshape(B, -1).double(), x1.reshape(B, -1).double()) ** 2).numpy()
    assert sorted(perm.tolist()) == list(range(B))
    assert abs(total(C, perm) - scipy_optimum(C)) <= 1e-6 * scipy_optimum(C)


def test_couple_with_bf16_inputs_upcasts():
    x0, x1 = torch.randn(32, 8).bfloat16(), torch.randn(32, 8).bfloat16()
    perm = L.ot_couple(x0, x1)
    C = (torch.cdist(x0.double(), x1.double()) ** 2).numpy()
    assert abs(total(C, perm) - scipy_optimum(C)) <= 1e-6 * abs(scipy_optimum(C))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_couple_within_groups(backend):
    B = 40 if backend == "cpu" else 12
    x0, x1 = torch.randn(B, 5), torch.randn(B, 5)
    groups = torch.randint(0, 3, (B,))
    perm = L.ot_couple(x0, x1, groups=groups, backend=backend)
    assert sorted(perm.tolist()) == list(range(B))
    assert torch.equal(groups[perm], groups)
    for g in groups.unique():
        idx = (groups == g).nonzero().flatten()
        C = (torch.cdist(x0[idx].double(), x1[idx].double()) ** 2).numpy()
        local = {int(j): k for k, j in enumerate(idx)}
        cols = [local[int(perm[i])] for i in idx]
        assert abs(total(C, cols) - scipy_optimum(C)) <= 1e-6 * max(1.0, abs(scipy_optimum(C)))


def test_couple_argument_errors():
    with pytest.raises(ValueError, match="same batch size"):
        L.ot_couple(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="same number of elements"):
        L.ot_couple(torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(ValueError, match="x1 is on meta"):
        L.ot_couple(torch.randn(4, 3), torch.randn(4, 3, device="meta"))
    with pytest.raises(TypeError, match="groups must be an integer tensor"):
        L.ot_couple(torch.randn(4, 3), torch.randn(4, 3), groups=torch.rand(4))
    with pytest.raises(ValueError, match="groups must have shape"):
        L.ot_couple(torch.randn(4, 3), torch.randn(4, 3), groups=torch.zeros(3, dtype=torch.long))
