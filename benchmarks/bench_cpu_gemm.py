"""fp32 CPU GEMMs: ATen's BLAS (MKL) against oneDNN at DiT-S/2's shapes, and the step.

    python benchmarks/bench_cpu_gemm.py            # the GEMM table
    python benchmarks/bench_cpu_gemm.py --step s2  # also the DiT-S/2 step, both GEMMs

For each (M, K, N): the forward x (M, K) @ W (N, K)^T + b, the input gradient
dy (M, N) @ W and the weight gradient dy^T @ x, each in ATen (``F.linear``, ``mm``)
and in oneDNN (``torch.ops.mkldnn._linear_pointwise``), timed interleaved, median
of ``--rounds`` calls.  ``--step``: bench_train's lct step (one process), steps
alternating between ``LCT_CPU_GEMM``'s two choices (``lct_kernels.ops.cpu_gemm``).
"""

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SHAPES = [(4096, 384, 1152), (4096, 1536, 384), (4096, 384, 1536), (4096, 384, 384)]


def interleaved(fns, rounds):
    """Median seconds of each fn, called in turn ``rounds`` times after 2 warm-ups."""
    for f in fns:
        f(), f()
    times = [[] for _ in fns]
    for _ in range(rounds):
        for i, f in enumerate(fns):
            t = time.perf_counter()
            f()
            times[i].append(time.perf_counter() - t)
    return [sorted(t)[len(t) // 2] for t in times]


def gemm_table(rounds):
    lp = torch.ops.mkldnn._linear_pointwise
    rows = ["| (M, K, N) | fwd ATen ms | fwd oneDNN ms | d input ATen | d input oneDNN | "
            "d weight ATen | d weight oneDNN |", "|---|---|---|---|---|---|---|"]
    for M, K, N in SHAPES:
        x, w, b, dy = torch.randn(M, K), torch.randn(N, K) * 0.02, torch.randn(N), torch.randn(M, N)
        t = interleaved([lambda: F.linear(x, w, b), lambda: lp(x, w, b, "none", [], ""),
                         lambda: dy.mm(w), lambda: lp(dy, w.t(), None, "none", [], ""),
                         lambda: dy.t().mm(x), lambda: lp(dy.t(), x.t(), None, "none", [], "")],
                        rounds)
        rows.append(f"| {M}, {K}, {N} | " + " | ".join(f"{s * 1e3:.1f}" for s in t) + " |")
    return "\n".join(rows)


def step_ab(config, rounds):
    import bench_train

    from lct_kernels import tune_cpu_heap
    from lct_kernels.ops import cpu_gemm

    tune_cpu_heap()
    fn = bench_train._build("lct", bench_train.CONFIGS[config], torch.device("cpu"), 2)
    times = {"aten": [], "onednn": []}
    for i in range(rounds):
        for choice in (("aten", "onednn") if i % 2 else ("onednn", "aten")):
            cpu_gemm._CHOICE = choice
            times[choice].append(fn()[0])
    cpu_gemm.reset_choice()
    med = {c: sorted(t)[len(t) // 2] * 1e3 for c, t in times.items()}
    return (f"lct step ({config}), median of {rounds} alternating steps: ATen GEMMs "
            f"{med['aten']:.1f} ms, oneDNN GEMMs {med['onednn']:.1f} ms "
            f"({med['aten'] / med['onednn']:.3f}x)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--step", choices=("tiny", "s2"), default=None)
    ap.add_argument("--step-rounds", type=int, default=8)
    args = ap.parse_args(argv)
    from lct_kernels.cpu_blas import _has_onednn, cpu_gemm_choice

    if not _has_onednn():
        raise SystemExit("bench_cpu_gemm: this torch has no oneDNN")

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, "
          f"{time.strftime('%Y-%m-%d')}; auto choice: {cpu_gemm_choice({})}\n")
    print(gemm_table(args.rounds))
    if args.step:
        print()
        print(step_ab(args.step, args.step_rounds))


if __name__ == "__main__":
    main()
