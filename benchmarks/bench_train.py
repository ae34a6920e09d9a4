"""Training-step time: lct_kernels' fused path vs the paper code's eager path.

    python benchmarks/bench_train.py --config tiny            # the demo's tiny DiT on this CPU
    python benchmarks/bench_train.py --config b2 --device cuda # DiT-B/2, 4x32x32, batch 256, bf16

One step = OT pairing of data and noise, the teacher forward (no grad), the
student forward + backward, and an RAdam step: everything the trainer pays per
step except data loading.  The paths, timed side by side in rotating order:

* ``lct``: DiT with fused NsLN + modulate and the MLP's fused bias + GELU,
  ``lct.consistency_objective`` (fused loss + gradient), ``lct.ot_couple`` (exact
  assignment on the device) and, on the CPU, ``FusedRAdam`` (RAdam + EMA in one pass);
* ``eager``: the same DiT math in plain PyTorch, the objective's PyTorch
  reference, and torchcfm's ``OTPlanSampler(method="exact")`` (cdist on the
  device, copy to the host, POT's network simplex, ``np.random.choice``), as the
  paper code does;
* ``eager+compile``: ``eager`` with ``torch.compile`` on the network (``--compile``);
* ``lct+compile``: ``lct`` with ``torch.compile(fullgraph=True)`` on the network, our
  kernels inside (``--compile``; what ``run.compile=true`` does in the trainer).

Isolation (``--isolation``): by default on the CPU each path runs in its own worker
process, and the parent asks the workers for one step at a time in rotating order
(interleaved in time, as before; the idle workers wait on a pipe).  In one process
the paths share glibc's heap: a path's freed activations were served back to the
other path without page faults, which measured DiT-S/2 (batch 64) 10 % faster for
lct and 8 % slower for eager than either runs alone (2026-12-02).  ``none`` keeps
every path in this process (the GPU default: CUDA's caching allocator, and the GPU
check's time budget).

CPU heap (``--cpu-heap``, CPU only): ``trainer`` (default) runs the lct paths with
``lct_kernels.tune_cpu_heap()``, as ``lct-train`` does (``run.cpu_heap=true``), and the
eager paths with glibc's defaults, as the paper code runs; ``all`` tunes every path
(what the kernels alone gain), ``none`` no path.  It needs process isolation: the
setting is process-wide.

Every path ends with the EMA update the trainer makes (``torch._foreach_lerp_``, or
inside FusedRAdam's pass: its "ema" phase is then empty).
The OT share is the OT pairing's time over the step's, measured in the same steps.
``--breakdown`` also times each phase (OT, forward = teacher + student + objective,
backward, optimizer, EMA) with a device sync between phases: the syncs cost
overlap on a GPU, so the phases' sum is a little above the step.
"""

import argparse
import datetime
import json
import multiprocessing
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lct_kernels.train import objective as obj  # noqa: E402
from lct_kernels.optim import FusedRAdam  # noqa: E402
from lct_kernels.cpu_heap import cpu_heap_status, tune_cpu_heap  # noqa: E402
from lct_kernels.train.model import build_dit  # noqa: E402

CONFIGS = {
    "tiny": dict(size="tiny", latent=(2, 4, 4), patch=2, batch=128, classes=10),
    "b2": dict(size="B", latent=(4, 32, 32), patch=2, batch=256, classes=0),
    # the mid-size model a user with a laptop tries: DiT-S/2 on 4x16x16 latents, batch 64
    "s2": dict(size="S", latent=(4, 16, 16), patch=2, batch=64, classes=0),
    # b2's code path (unconditional, 4 latent channels) at a size the CPU runs in seconds:
    # gpu_check.sh --dry-run checks the b2 stage's plumbing with it
    "b2-smoke": dict(size="tiny", latent=(4, 8, 8), patch=2, batch=32, classes=0),
}


def torchcfm_pairing():
    """torchcfm's exact OT sampler, as the paper code uses it (None if not installed)."""
    try:
        from torchcfm.optimal_transport import OTPlanSampler
    except Exception:
        return None
    sampler = OTPlanSampler(method="exact", normalize_cost=True)

    def pair(x, noise, y):
        x0, x1, y0, _ = sampler.sample_plan_with_labels(x, noise, y, None, replace=False)
        return x0, x1, y0

    return pair


def make_step(path, spec, device, compile_net=False):
    torch.manual_seed(0)
    C, H, _ = spec["latent"]
    fused = path == "lct"
    net = build_dit(spec["size"], H, C, spec["patch"], spec["classes"], nsln=True,
                    fused=fused).to(device)
    # give the zero-initialised adaLN layers non-zero weights so every kernel does real work
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad and p.abs().sum() == 0:
                p.normal_(0, 0.02)
    run_net = torch.compile(net, fullgraph=fused) if compile_net else net
    params = [p for p in net.parameters() if p.requires_grad]
    ema = [p.detach().clone() for p in params]
    # the trainer's optimiser: on the CPU the lct path's RAdam + EMA is FusedRAdam's one
    # pass; the eager path (and CUDA) is torch's RAdam then torch._foreach_lerp_
    fused_opt = fused and device.type == "cpu"
    opt = (FusedRAdam(params, lr=1e-4, weight_decay=1e-4, ema=ema) if fused_opt
           else torch.optim.RAdam(params, lr=1e-4, weight_decay=1e-4))
    # one coupling of the whole batch on both paths (as torchcfm does), so the OT work compares
    pair = (lambda x, n, y: obj.ot_pair(x, n, None)[:2] + (y,)) if fused else torchcfm_pairing()
    if pair is None:
        return None
    B = spec["batch"]
    sigmas = obj.karras_sigmas(81)
    probs = obj.index_probabilities(sigmas)
    autocast = device.type == "cuda"
    data = torch.randn(B, C, H, H, device=device) * 0.5
    labels = torch.randint(0, spec["classes"], (B,), device=device) if spec["classes"] else None
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(phases=None):
        """(step seconds, OT seconds); ``phases`` (a dict) also gets each phase's seconds,
        with a sync between phases."""
        noise = torch.randn_like(data)
        sync()
        t0 = time.perf_counter()
        x, n, y = pair(data, noise, labels)
        sync()
        t_ot = time.perf_counter() - t0
        marks = [("ot", t0 + t_ot)]

        def mark(name):
            if phases is not None:
                sync()
                marks.append((name, time.perf_counter()))

        idx = obj.sample_indices(probs, B, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            total, *_ = obj.consistency_losses(
                run_net, x, n, y, idx, sigmas, loss="cauchy", c=0.00277, diffusion=True,
                backend=None if fused else "torch")
        mark("forward")
        opt.zero_grad(set_to_none=True)
        total.backward()
        mark("backward")
        if fused_opt:
            opt.step(ema_decay=1 - 1e-4)  # the EMA inside the optimizer's pass
            mark("optimizer")
        else:
            opt.step()
            mark("optimizer")
            with torch.no_grad():
                torch._foreach_lerp_(ema, params, 1e-4)
        sync()
        t_end = time.perf_counter()
        if phases is not None:
            marks.append(("ema", t_end))
            prev = t0
            for name, t in marks:
                phases.setdefault(name, []).append(t - prev)
                prev = t
        return t_end - t0, t_ot

    return step


def _build(path, spec, device, warmup):
    fn = make_step(path.split("+")[0], spec, device, compile_net=path.endswith("compile"))
    if fn is not None:
        for _ in range(warmup):
            fn()
    return fn


def heap_tuned(path, device, cpu_heap):
    """Whether ``path`` runs with lct_kernels.tune_cpu_heap() under --cpu-heap ``cpu_heap``."""
    return device.type == "cpu" and (cpu_heap == "all" or (cpu_heap == "trainer" and
                                                            path.startswith("lct")))


def _worker(conn, path, config, device, warmup, threads, cpu_heap="none"):
    """One path in its own process: builds and warms its step, then answers requests
    ("step" -> (seconds, OT seconds); "phases" -> one step's phase dict) until "stop"."""
    torch.set_num_threads(threads)
    if heap_tuned(path, torch.device(device), cpu_heap) and not tune_cpu_heap():
        print(f"bench_train: {path}: tune_cpu_heap not applied: {cpu_heap_status()[1]}",
              file=sys.stderr)
    fn = _build(path, CONFIGS[config], torch.device(device), warmup)
    conn.send(fn is not None)
    while fn is not None:
        msg = conn.recv()
        if msg == "stop":
            break
        if msg == "step":
            conn.send(fn())
        else:
            phases = {}
            fn(phases)
            conn.send(phases)
    conn.close()


class _Remote:
    """A step running in a worker process (see _worker), called like a local step."""

    def __init__(self, path, config, device, warmup, cpu_heap="none"):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, daemon=True,
                                args=(child, path, config, str(device), warmup,
                                      torch.get_num_threads(), cpu_heap))
        self.proc.start()
        child.close()
        self.ok = self.conn.recv()  # after its warm-up: workers never warm up concurrently

    def __call__(self, phases=None):
        if phases is None:
            self.conn.send("step")
            return self.conn.recv()
        self.conn.send("phases")
        for k, v in self.conn.recv().items():
            phases.setdefault(k, []).extend(v)
        return None

    def close(self):
        if self.proc.is_alive():
            if self.ok:
                self.conn.send("stop")
            self.proc.join(timeout=60)
        if self.proc.is_alive():
            self.proc.kill()


def run(config, device, rounds, warmup, compile_net, breakdown=False, isolation="none",
        cpu_heap="none"):
    """Times the paths side by side; ``cpu_heap`` (see the module docstring) needs
    ``isolation="process"`` unless it is "none" or the device is not the CPU."""
    if cpu_heap not in ("trainer", "all", "none"):
        raise ValueError(f"bench_train: cpu_heap must be trainer, all or none, got {cpu_heap!r}")
    if cpu_heap != "none" and device.type == "cpu" and isolation != "process":
        raise ValueError("bench_train: --cpu-heap trainer/all needs --isolation process (the "
                         "heap setting is process-wide); use --cpu-heap none")
    spec = CONFIGS[config]
    paths = ["lct", "eager"] + (["lct+compile", "eager+compile"] if compile_net else [])
    steps, remotes = {}, []
    try:
        for p in paths:
            if isolation == "process":
                fn = _Remote(p, config, device, warmup, cpu_heap)
                remotes.append(fn)
                fn = fn if fn.ok else None
            else:
                fn = _build(p, spec, device, warmup)
            if fn is None:
                print(f"skipping {p}: torchcfm/POT not installed", file=sys.stderr)
                continue
            steps[p] = fn
        return spec, _time_steps(steps, rounds, breakdown)
    finally:
        for r in remotes:
            r.close()


def _time_steps(steps, rounds, breakdown):
    times = {p: [] for p in steps}
    ot = {p: [] for p in steps}
    for r in range(rounds):
        order = list(steps)[r % len(steps):] + list(steps)[: r % len(steps)]
        for p in order:
            t, t_ot = steps[p]()
            times[p].append(t)
            ot[p].append(t_ot)
    result = {p: {"step_ms": statistics.median(times[p]) * 1e3,
                  "ot_ms": statistics.median(ot[p]) * 1e3} for p in steps}
    if breakdown:  # separate rounds: the phase syncs must not touch the step timing
        for p, fn in steps.items():
            phases = {}
            for _ in range(max(rounds // 2, 1)):
                fn(phases)
            result[p]["phases_ms"] = {k: statistics.median(v) * 1e3 for k, v in phases.items()}
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true",
                    help="also time torch.compile on both nets (eager+compile, lct+compile)")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time each phase (OT, forward, backward, optimizer, EMA)")
    ap.add_argument("--isolation", choices=["process", "none"], default=None,
                    help="each path in its own worker process, or all in this one (default: "
                         "process on the CPU, none on CUDA; see the module docstring)")
    ap.add_argument("--cpu-heap", choices=["trainer", "all", "none"], default=None,
                    help="which paths run with lct_kernels.tune_cpu_heap() (default: trainer, "
                         "the lct paths as lct-train runs them, on the CPU with process "
                         "isolation; none otherwise)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    isolation = args.isolation or ("process" if device.type == "cpu" else "none")
    cpu_heap = args.cpu_heap or ("trainer" if device.type == "cpu" and isolation == "process"
                                 else "none")
    spec, result = run(args.config, device, args.rounds, args.warmup, args.compile, args.breakdown,
                       isolation, cpu_heap)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    C, H, _ = spec["latent"]
    print(f"### Training step: DiT-{spec['size']}/{spec['patch']}, latents {C}x{H}x{H}, batch "
          f"{spec['batch']}, {'bf16 autocast' if device.type == 'cuda' else 'fp32'}, {device.type} "
          f"({name}, {torch.get_num_threads()} threads), torch {torch.__version__}, "
          f"{datetime.date.today()}, median of {args.rounds} steps, isolation {isolation}"
          + (f", tune_cpu_heap: {cpu_heap}" if device.type == "cpu" else "") + "\n")
    print("| path | step (ms) | OT (ms) | OT share | speed-up vs eager |")
    print("|---|---|---|---|---|")
    base = result.get("eager", {}).get("step_ms")
    for p, r in result.items():
        speed = f"{base / r['step_ms']:.2f}x" if base else "-"
        print(f"| {p} | {r['step_ms']:.2f} | {r['ot_ms']:.2f} | {100 * r['ot_ms'] / r['step_ms']:.1f} % | {speed} |")
    if "eager+compile" in result and "lct+compile" in result:
        ratio = result["eager+compile"]["step_ms"] / result["lct+compile"]["step_ms"]
        print(f"\nlct+compile vs eager+compile: {ratio:.2f}x")
    if args.breakdown:
        names = ["ot", "forward", "backward", "optimizer", "ema"]
        print("\n| path (phases, ms, synced) | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        for p, r in result.items():
            ph = r.get("phases_ms", {})
            print(f"| {p} | " + " | ".join(f"{ph.get(k, float('nan')):.2f}" for k in names) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": args.config, "device": str(device),
                                               "name": name, "isolation": isolation,
                                               "cpu_heap": cpu_heap,
                                               "result": result}, indent=2))


if __name__ == "__main__":
    main()
