"""Per-call cost at the demo's and the qk-norm case's shapes: ours vs eager PyTorch.

Every case times the training-time call: forward + backward with autograd
(inputs that require grad, ``.backward()`` on the result), the way the
trainer calls the op.  ``ot_couple`` has no backward; it is timed against the
paper code's exact coupling (torchcfm's OTPlanSampler when installed, else the
same steps written out: squared cdist, POT emd, sampling from the plan).

    python benchmarks/bench_small_shapes.py            # full run (median of 400 reps)
    python benchmarks/bench_small_shapes.py --quick    # a few reps, to check it runs
    python benchmarks/bench_small_shapes.py --json out.json

Shapes (issue 14, item 2):
    losses        (128, 32)  the demo's 2x4x4 latents;  (128, 64)  4x4x4 latents
    layer norm    512x128    the demo DiT's block norms (batch 128 x 4 tokens), with modulate
                  2048x32    the demo's qk-norm rows (128 x 4 heads x 4 tokens, head_dim 32)
                  98304x64   the CPU qk-norm case of BENCHMARKS.md (32 x 12 heads x 256 tokens)
    ot_couple     N = 64 and N = 128, 32 features per sample (the demo's latents)

Timing: the implementations of a case run interleaved, one call each per rep,
each call timed alone; the table shows medians and ours / eager.
"""

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lct_kernels as L  # noqa: E402

C_DEMO = 0.00054 * math.sqrt(32)  # the paper code's c scaled to the demo's 32 elements

LOSS_SHAPES = [(128, 32), (128, 64)]
# name -> (M rows, D, group_rows or None for plain NsLN)
LN_SHAPES = {
    "512x128 mod": (512, 128, 4),
    "2048x32": (2048, 32, None),
    "98304x64": (98304, 64, None),
}
OT_SIZES = [64, 128]
OT_FEATURES = 32


def _eager_cauchy(pred, target, weight, c):
    """The paper code's Cauchy loss (per-sample form), weighted and averaged."""
    m = ((pred - target) ** 2).mean(dim=1)
    return (weight * (torch.log(m / 2 + c**2) - 2 * math.log(c))).mean()


def loss_case(B, N, seed=0):
    """name -> zero-argument callable running forward + backward once."""
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(B, N, generator=g).requires_grad_()
    target = torch.randn(B, N, generator=g)
    weight = torch.rand(B, generator=g) + 0.5

    def eager():
        pred.grad = None
        _eager_cauchy(pred, target, weight, C_DEMO).backward()

    def ours():
        pred.grad = None
        L.cauchy_loss(pred, target, C_DEMO, weight=weight).backward()

    return {"eager": eager, "lct": ours}


def layer_norm_case(M, D, group_rows, seed=0):
    """NsLN (+ adaLN modulate when group_rows is given) forward + backward; the
    upstream gradient is a fixed random tensor."""
    g = torch.Generator().manual_seed(seed)
    if group_rows is None:
        x = torch.randn(M, D, generator=g).requires_grad_()
        bias = (torch.randn(D, generator=g) * 0.1).requires_grad_()
        dy = torch.randn(M, D, generator=g)
        params = (x, bias)

        def eager_fn():
            return F.layer_norm(x, (D,), None, bias, 1e-6)

        def ours_fn():
            return L.non_scaling_layer_norm(x, D, bias, eps=1e-6)
    else:
        B, T = M // group_rows, group_rows
        x = torch.randn(B, T, D, generator=g).requires_grad_()
        shift = (torch.randn(B, D, generator=g) * 0.1).requires_grad_()
        scale = (torch.randn(B, D, generator=g) * 0.1).requires_grad_()
        bias = (torch.randn(D, generator=g) * 0.1).requires_grad_()
        dy = torch.randn(B, T, D, generator=g)
        params = (x, shift, scale, bias)

        def eager_fn():
            y = F.layer_norm(x, (D,), None, bias, 1e-6)
            return y * (1 + scale[:, None]) + shift[:, None]

        def ours_fn():
            return L.nsln_modulate(x, shift, scale, bias, eps=1e-6)

    def run(fn):
        def call():
            for p in params:
                p.grad = None
            fn().backward(dy)
        return call

    return {"eager": run(eager_fn), "lct": run(ours_fn)}


def eager_plan_indices():
    """The paper code's exact OT pairing, (x0, x1) -> (i, j) with (x0[i], x1[j]) the
    paired batch: torchcfm's OTPlanSampler(method="exact", normalize_cost=True) when
    installed, else the same steps written out (squared cdist, normalised by its
    maximum, POT's emd, B samples from the plan without replacement)."""
    try:
        from torchcfm.optimal_transport import OTPlanSampler

        sampler = OTPlanSampler(method="exact", normalize_cost=True)

        def plan(x0, x1):
            return sampler.sample_map(sampler.get_map(x0, x1), x0.shape[0], replace=False)

        return plan
    except Exception:
        pass
    import numpy as np
    import ot as pot  # POT: what torchcfm calls

    def plan(x0, x1):
        a, b = pot.unif(x0.shape[0]), pot.unif(x1.shape[0])
        M = torch.cdist(x0.reshape(x0.shape[0], -1), x1.reshape(x1.shape[0], -1)) ** 2
        M = M / M.max()
        p = pot.emd(a, b, M.detach().cpu().numpy())
        p = p.flatten() / p.sum()
        choices = np.random.choice(p.shape[0], size=x0.shape[0], p=p, replace=False)
        return np.divmod(choices, M.shape[1])

    return plan


def ot_case(n, d=OT_FEATURES, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, d, generator=g)
    x1 = torch.randn(n, d, generator=g)
    plan = eager_plan_indices()

    def eager():
        i, j = plan(x0, x1)
        return x0[i], x1[j]

    def ours():
        perm = L.ot_couple(x0, x1)
        return x0, x1[perm]

    return {"eager": eager, "lct": ours}


def all_cases():
    """[(case name, {impl name: callable})] in table order."""
    cases = [(f"cauchy fwd+bwd {B}x{N}", loss_case(B, N)) for B, N in LOSS_SHAPES]
    for name, (M, D, gr) in LN_SHAPES.items():
        label = "nsln_modulate" if gr else "nsln"
        cases.append((f"{label} fwd+bwd {name}", layer_norm_case(M, D, gr)))
    cases += [(f"ot_couple N={n} D={OT_FEATURES}", ot_case(n)) for n in OT_SIZES]
    return cases


def measure(impls, reps, warmup=5):
    """Median seconds per call of each implementation, interleaved (one call of each
    per rep, the starting implementation rotating)."""
    names = list(impls)
    for _ in range(warmup):
        for f in impls.values():
            f()
    times = {k: [] for k in names}
    for r in range(reps):
        order = names[r % len(names):] + names[: r % len(names)]
        for k in order:
            t0 = time.perf_counter()
            impls[k]()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def table(results):
    lines = ["| case | eager ms | lct ms | lct / eager |", "|---|---|---|---|"]
    for name, med in results:
        lines.append(f"| {name} | {med['eager'] * 1e3:.4f} | {med['lct'] * 1e3:.4f} | "
                     f"{med['lct'] / med['eager']:.2f} |")
    return lines


def run(reps, select=None, warmup=5):
    """[(case name, {impl: median s})] for the cases whose name contains `select`."""
    results = []
    for name, impls in all_cases():
        if select and select not in name:
            continue
        results.append((name, measure(impls, reps, warmup)))
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=400)
    ap.add_argument("--quick", action="store_true", help="10 reps: checks that it runs")
    ap.add_argument("--only", default=None, help="run the cases whose name contains this")
    ap.add_argument("--json", default=None, help="also write the medians here")
    args = ap.parse_args(argv)
    reps = 10 if args.quick else args.reps
    print(f"# small shapes, fwd+bwd per call: torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {reps} reps, median")
    results = run(reps, args.only)
    print("\n".join(table(results)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({name: med for name, med in results}, f, indent=1)


if __name__ == "__main__":
    main()
