"""Slowdown under CPU contention: ours vs eager PyTorch, each beside one busy process.

For every case (the demo-size ops of bench_small_shapes.py, and the demo's
training step of bench_train.py --config tiny), the benchmark times our path
and eager PyTorch interleaved, first on a quiet machine, then with competing
CPU-bound processes that it starts itself (a pure-Python busy loop each) and
stops before the next case.  It reports each path's slowdown factor
(loaded / quiet median) and ours relative to eager's.  Goal (issue 14, item 5):
our slowdown no worse than eager's, i.e. the last column <= 1.

    python benchmarks/bench_contention.py             # full run
    python benchmarks/bench_contention.py --quick     # a few reps, to check it runs
    python benchmarks/bench_contention.py --no-step   # ops only
    python benchmarks/bench_contention.py --competitors 2

Real numbers need an otherwise quiet machine: other load adds to the
"quiet" phase and distorts both factors.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_small_shapes as small  # noqa: E402

BUSY_LOOP = "import signal, sys\nsignal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\nwhile True: pass\n"


class Competitors:
    """Context manager: `n` CPU-bound processes while inside, all stopped on exit
    (also on errors and Ctrl-C)."""

    def __init__(self, n, settle_s=0.3):
        self.n, self.settle_s, self.procs = n, settle_s, []

    def __enter__(self):
        for _ in range(self.n):
            self.procs.append(subprocess.Popen([sys.executable, "-c", BUSY_LOOP],
                                               stdin=subprocess.DEVNULL))
        time.sleep(self.settle_s)  # let them start spinning (interpreter start-up)
        for p in self.procs:
            if p.poll() is not None:
                raise RuntimeError(f"competitor process exited early with code {p.returncode}")
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []
        return False


def demo_step_case(rounds_warmup=2):
    """{"eager": step, "lct": step} for the demo's tiny DiT step, or None when the
    trainer or its eager pairing cannot be built here."""
    try:
        import bench_train as bt
    except Exception as exc:  # the trainer is optional (train extras)
        print(f"# demo step skipped: {exc}", file=sys.stderr)
        return None
    if bt.torchcfm_pairing() is None:
        # torchcfm is not installed: pair the eager path with the same steps
        # torchcfm runs (bench_small_shapes.eager_plan_indices).
        plan = small.eager_plan_indices()

        def fallback():
            def pair(x, noise, y):
                i, j = plan(x, noise)
                return x[i], noise[j], (y[i] if y is not None else None)
            return pair

        bt.torchcfm_pairing = fallback
    spec, device = bt.CONFIGS["tiny"], torch.device("cpu")
    try:
        steps = {"eager": bt.make_step("eager", spec, device),
                 "lct": bt.make_step("lct", spec, device)}
        for f in steps.values():
            for _ in range(rounds_warmup):
                f()
    except Exception as exc:  # e.g. the trainer mid-refactor: say so, keep the op table
        print(f"# demo step skipped: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None
    return {k: (lambda f=f: f()) for k, f in steps.items()}


def run(reps, step_reps, competitors, with_step=True, select=None):
    """[(case, {impl: (quiet s, loaded s)})]."""
    cases = [(n, c) for n, c in small.all_cases() if not select or select in n]
    if with_step and (not select or select in "demo step"):
        step = demo_step_case()
        if step is not None:
            cases.append(("demo step (tiny DiT, batch 128)", step))
    out = []
    for name, impls in cases:
        n = step_reps if name.startswith("demo step") else reps
        quiet = small.measure(impls, n)
        with Competitors(competitors):
            loaded = small.measure(impls, n)
        out.append((name, {k: (quiet[k], loaded[k]) for k in impls}))
        print(f"# done: {name}", file=sys.stderr, flush=True)
    return out


def table(results, competitors):
    lines = [f"| case | eager quiet ms | eager +{competitors} busy ms | eager slowdown | "
             f"lct quiet ms | lct +{competitors} busy ms | lct slowdown | lct / eager slowdown |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results:
        (eq, el), (lq, ll) = r["eager"], r["lct"]
        es, ls = el / eq, ll / lq
        lines.append(f"| {name} | {eq * 1e3:.3f} | {el * 1e3:.3f} | {es:.2f}x | {lq * 1e3:.3f} | "
                     f"{ll * 1e3:.3f} | {ls:.2f}x | {ls / es:.2f} |")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=200, help="reps per op case and phase")
    ap.add_argument("--step-reps", type=int, default=20, help="reps of the demo step per phase")
    ap.add_argument("--competitors", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="a few reps: checks that it runs")
    ap.add_argument("--no-step", action="store_true", help="skip the demo training step")
    ap.add_argument("--only", default=None, help="run the cases whose name contains this")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    reps, step_reps = (5, 2) if args.quick else (args.reps, args.step_reps)
    print(f"# CPU contention: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.competitors} busy process(es), medians of {reps} reps "
          f"({step_reps} for the step)")
    results = run(reps, step_reps, args.competitors, not args.no_step, args.only)
    print("\n".join(table(results, args.competitors)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({n: r for n, r in results}, f, indent=1)


if __name__ == "__main__":
    main()
