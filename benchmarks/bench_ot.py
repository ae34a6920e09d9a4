"""Benchmarks of the exact OT assignment (used by report.py and by `python benchmarks/bench_ot.py`).

Three views, each timed side by side (interleaved rounds, medians):
  * solver alone, every peer on the same float64 cost matrix (squared Euclidean
    distances between Gaussian points): lct_kernels, SciPy linear_sum_assignment,
    lapx lapjvh / lapjv, POT emd, torch-linear-assignment (where installed);
  * the whole coupling end to end: lct_kernels.ot_couple (the permutation), and
    with the gather x1[perm] the paired batches, vs torchcfm's OTPlanSampler
    (method "exact", sample_plan(replace=False), as LCT uses it), plus our cost
    GEMM alone (the floor of our path);
  * batches of problems: ot_assign on (B, N, N) vs a SciPy loop and lapx's
    lapjvh_batch / lapjvx_batch.
"""

import importlib.util
import statistics
import time

import numpy as np
import torch

import lct_kernels as L

HAVE = {name: importlib.util.find_spec(mod) is not None for name, mod in
        [("scipy", "scipy"), ("lap", "lap"), ("pot", "ot"), ("tla", "torch_linear_assignment"),
         ("torchcfm", "torchcfm")]}


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fns, rounds, device="cpu"):
    """{name: median seconds}, the functions interleaved round by round.

    Each timed call follows an untimed call of the same function, so every
    library is timed in its steady state, as a training loop calls it.  Without
    that, whichever function runs right after POT or SciPy pays for caches they
    evicted: a torch-dispatched call then costs about 0.3 ms more on this
    machine, while a Cython entry point like lapx's barely notices.
    """
    for f in fns.values():
        f()
    _sync(device)
    times = {k: [] for k in fns}
    keys = list(fns)
    for r in range(rounds):
        for k in keys[r % len(keys):] + keys[: r % len(keys)]:
            fns[k]()
            _sync(device)
            t0 = time.perf_counter()
            fns[k]()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def solver_fns(C, device="cpu"):
    """Solvers of one (N, N) float64 cost matrix C (numpy copy for the CPU peers)."""
    Cn = C.cpu().numpy()
    fns = {"lct": lambda: L.ot_assign(C)}
    if HAVE["scipy"]:
        from scipy.optimize import linear_sum_assignment

        fns["scipy"] = lambda: linear_sum_assignment(Cn)
    if HAVE["lap"]:
        import lap

        fns["lapjvh"] = lambda: lap.lapjvh(Cn)
        fns["lapjv"] = lambda: lap.lapjv(Cn)
    if HAVE["pot"] and Cn.shape[0] <= 1024:
        import ot

        a = ot.unif(Cn.shape[0])
        fns["pot emd"] = lambda: ot.emd(a, a, Cn)
    if HAVE["tla"]:
        from torch_linear_assignment import batch_linear_assignment

        fns["torch-linear-assignment"] = lambda: batch_linear_assignment(C[None])
    return fns


def points(n, d, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g).to(device), torch.randn(n, d, generator=g).to(device))


def solver_table(ns, d, rounds, device="cpu"):
    rows, names = [], []
    for n in ns:
        x, z = points(n, d, device)
        C = (torch.cdist(x.double(), z.double()) ** 2).contiguous()
        med = timed(solver_fns(C, device), rounds, device)
        names += [k for k in med if k not in names]
        rows.append((n, med))
    lines = ["| N | " + " | ".join(f"{k} ms" for k in names) + " | lct vs lapjvh | lct vs SciPy |",
             "|" + "---|" * (len(names) + 3)]
    for n, med in rows:
        ratio = lambda k: f"{med[k] / med['lct']:.2f}x" if k in med else "n/a"  # noqa: E731
        lines.append(f"| {n} | " + " | ".join(f"{med[k] * 1e3:.3f}" if k in med else "n/a"
                                              for k in names)
                     + f" | {ratio('lapjvh')} | {ratio('scipy')} |")
    return lines


def couple_fns(x0, x1):
    def paired():
        perm = L.ot_couple(x0, x1)
        return x0, x1[perm]

    fns = {"lct ot_couple": lambda: L.ot_couple(x0, x1), "lct paired batch": paired,
           "lct cost GEMM alone": lambda: L.ops.ot.coupling_cost(x0, x1)}
    if HAVE["torchcfm"]:
        from torchcfm.optimal_transport import OTPlanSampler

        sampler = OTPlanSampler(method="exact", normalize_cost=True)
        fns["torchcfm exact"] = lambda: sampler.sample_plan(x0, x1, replace=False)
    return fns


def couple_table(ns, ds, rounds, device="cpu"):
    """ot_couple returns the permutation; "paired" adds the gather x1[perm] that
    yields the paired batch, which is what torchcfm's sample_plan returns."""
    lines = ["| N | D | lct ot_couple ms | lct paired ms | our cost GEMM ms | torchcfm ms | "
             "paired vs torchcfm | ot_couple / GEMM |",
             "|---|---|---|---|---|---|---|---|"]
    for d in ds:
        for n in ns:
            x0, x1 = points(n, d, device, seed=1)
            med = timed(couple_fns(x0, x1), rounds, device)
            ours, paired, floor = med["lct ot_couple"], med["lct paired batch"], med["lct cost GEMM alone"]
            cfm = med.get("torchcfm exact")
            lines.append(
                f"| {n} | {d} | {ours * 1e3:.3f} | {paired * 1e3:.3f} | {floor * 1e3:.3f} | "
                + (f"{cfm * 1e3:.3f} | {cfm / paired:.1f}x" if cfm else "n/a | n/a")
                + f" | {ours / floor:.2f} |")
    return lines


def batch_table(bs, ns, d, rounds, device="cpu"):
    """ot_assign on (B, N, N) against a SciPy loop and lapx's batch APIs (lapjvh_batch,
    lapjvx_batch = lapjv's; both spread over all cores, as ours does).  The SciPy loop
    is left out where it would take minutes (B * N > 16384), and those cells use 3 rounds."""
    lines = ["| B | N | lct ot_assign ms | SciPy loop ms | lapjvh_batch ms | lapjvx_batch ms | "
             "vs SciPy | vs lapjvh_batch | vs lapjvx_batch |",
             "|---|---|---|---|---|---|---|---|---|"]
    for n in ns:
        for b in bs:
            g = torch.Generator().manual_seed(2)
            x = torch.randn(b, n, d, generator=g, dtype=torch.float64)
            z = torch.randn(b, n, d, generator=g, dtype=torch.float64)
            C = (torch.cdist(x, z) ** 2).contiguous().to(device)
            Cn = C.cpu().numpy()
            small = b * n <= 16384
            fns = {"lct": lambda: L.ot_assign(C)}
            if HAVE["scipy"] and small:
                from scipy.optimize import linear_sum_assignment

                fns["scipy"] = lambda: [linear_sum_assignment(c) for c in Cn]
            if HAVE["lap"]:
                import lap

                fns["lapjvh_batch"] = lambda: lap.lapjvh_batch(Cn)
                fns["lapjvx_batch"] = lambda: lap.lapjvx_batch(Cn)
            med = timed(fns, rounds if small else min(rounds, 3), device)
            cell = lambda k: f"{med[k] * 1e3:.3f}" if k in med else "n/a"  # noqa: E731
            ratio = lambda k: f"{med[k] / med['lct']:.2f}x" if k in med else "n/a"  # noqa: E731
            lines.append(f"| {b} | {n} | {cell('lct')} | {cell('scipy')} | {cell('lapjvh_batch')} | "
                         f"{cell('lapjvx_batch')} | {ratio('scipy')} | {ratio('lapjvh_batch')} | "
                         f"{ratio('lapjvx_batch')} |")
    return lines


def report(device="cpu", quick=False, tiny=False):
    """The OT section's lines.  ``tiny``: N = 32 only, 1 round, D = 64 only (a plumbing check
    of every table and peer, for gpu_check.sh --dry-run; the numbers mean nothing)."""
    rounds = 1 if tiny else 3 if quick else 9
    ns = [32] if tiny else [64, 256, 1024] if quick else [64, 128, 256, 512, 1024, 2048]
    if device == "cuda" and not quick and not tiny:  # host peers at N = 2048 would eat the GPU check's time
        ns = [64, 128, 256, 512, 1024]
    ds = (64,) if tiny else (64, 4096)
    out = [f"### {device.upper()}: exact OT assignment", "",
           "Float64 costs for the solver tables (every peer gets the same matrix), float32 "
           "-2·x0·x1ᵀ inside `ot_couple`.  One problem runs on one thread; batches spread over "
           "the threads.  Every timed call follows an untimed call of the same function "
           "(steady state; see `benchmarks/bench_ot.py`).", ""]
    for d in ds:
        out += [f"Solver alone, same float64 cost (squared distances of Gaussian points, D={d}):", ""]
        out += solver_table(ns, d, rounds, device) + [""]
    out += ["Whole coupling, minibatches to paired batches (torchcfm: OTPlanSampler exact, "
            "normalize_cost=True, sample_plan(replace=False), as LCT calls it):", ""]
    out += couple_table(ns if tiny else [64, 256, 1024], ds, rounds, device)
    out += ["", "Batches of problems (squared distances, D=64):", ""]
    bs, bns = ([2], ns) if tiny else ([8], [256]) if quick else ([1, 8, 64], [64, 256, 1024])
    out += batch_table(bs, bns, 64, rounds, device)
    versions = []
    for mod in ("scipy", "lap", "ot", "torch_linear_assignment", "torchcfm"):
        if importlib.util.find_spec(mod):
            m = __import__(mod)
            versions.append(f"{mod} {getattr(m, '__version__', '?')}")
    out += ["", "Peers: " + ", ".join(versions) + "."]
    return out


if __name__ == "__main__":
    import sys

    print("\n".join(report("cuda" if torch.cuda.is_available() else "cpu", "--quick" in sys.argv,
                           "--tiny" in sys.argv)))
