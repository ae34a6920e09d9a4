"""Data-parallel step time and OT share: per-rank vs global OT coupling.

    python benchmarks/bench_ddp.py                     # 2 processes, CPU (gloo), tiny DiT, global batch 512
    python benchmarks/bench_ddp.py --nproc 8 --device cuda --batch 2048 --steps 100

Runs ``torchrun --nproc_per_node K -m lct_kernels.train`` twice on the embedded
digits (``ot.scope=rank`` then ``ot.scope=global``) and reads each run's
metrics.csv: steps/s over the timed steps (the first ``--warmup`` logged rows
are dropped) and process 0's OT time per step (for the global scope this
includes the two all-gathers, the solve on process 0 and the broadcast).
"""

import argparse
import csv
import datetime
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def run(scope, args, out):
    overrides = [f"ot.scope={scope}", f"optim.batch_size={args.batch}", f"run.steps={args.steps}",
                 "run.log_every=5", "run.ckpt_every=100000", "run.progress=false",
                 "run.tensorboard=false", f"run.device={args.device}", "run.sample_every=0"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={args.nproc}", "-m", "lct_kernels.train", "--out", str(out),
           "--overwrite", *overrides]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    with open(out / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))[args.warmup:]
    return {"steps_per_s": statistics.median(float(r["steps_per_s"]) for r in rows),
            "ot_ms": statistics.median(float(r["ot_ms"]) for r in rows)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=512, help="global batch")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=2, help="logged rows (of 5 steps) to drop")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        results = {scope: run(scope, args, Path(tmp) / scope) for scope in ("rank", "global")}
    print(f"### Data-parallel step: {args.nproc} processes, {args.device} "
          f"({'gloo' if args.device == 'cpu' else 'nccl'}), DiT-tiny/2 (demo preset), digits "
          f"latents 2x4x4, global batch {args.batch} ({args.batch // args.nproc} per process), "
          f"torch {torch.__version__}, {datetime.date.today()}, median over "
          f"{args.steps - 5 * args.warmup} steps\n")
    print("| OT scope | step (ms) | OT (ms, process 0) | OT share |")
    print("|---|---|---|---|")
    for scope, r in results.items():
        step_ms = 1e3 / r["steps_per_s"]
        print(f"| {scope} | {step_ms:.1f} | {r['ot_ms']:.2f} | {100 * r['ot_ms'] / step_ms:.1f} % |")


if __name__ == "__main__":
    main()
