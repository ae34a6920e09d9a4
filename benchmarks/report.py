"""Benchmark report: every lct_kernels backend vs eager PyTorch and torch.compile.

    python benchmarks/report.py                       # this machine's device, full run
    python benchmarks/report.py --quick               # fewer repetitions
    python benchmarks/report.py --write BENCHMARKS.md --plots docs/bench
    python benchmarks/report.py --tiny --device cpu   # plumbing check (gpu_check.sh --dry-run)

Implementations are timed side by side: in every round each implementation
runs once per case, in a rotating order, so machine noise hits all of them
alike; the table gives medians over rounds and ratios of medians.  Times
include everything a training step pays (argument checks, allocation, the
autograd graph).  The floor is the time to read pred and target once and write
the gradient once at the measured copy bandwidth.

With --write, the section between ``<!-- report:DEVICE -->`` markers of the
Markdown file is replaced (other devices' sections are kept).
"""

import argparse
import datetime
import os
import platform
import re
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cases  # noqa: E402
import bench_ot  # noqa: E402
import bench_small_shapes  # noqa: E402
import cases_layer_norm as ln_cases  # noqa: E402

import lct_kernels as L  # noqa: E402

MODES = ("fwd", "bwd", "fwd+bwd")


def measure(impls, make_inputs, shape, dtype, device, rounds, modes=MODES):
    """{(impl, mode): [seconds per round]} with implementations interleaved.

    make_inputs returns the argument tuple, or (arguments, grad_out) for a
    non-scalar output."""
    inputs = {name: make_inputs(shape, dtype, device) for name in impls}
    runners = {}
    for name, fn in impls.items():
        args, grad_out = inputs[name] if isinstance(inputs[name][0], tuple) else (inputs[name], None)
        for mode in modes:
            runners[(name, mode)] = cases.modes(fn, args, device, grad_out)[mode]
    for setup, run in runners.values():  # warm-up (includes torch.compile's compilation)
        for _ in range(3):
            cases.time_once(setup, run, device)
    times = {key: [] for key in runners}
    keys = list(runners)
    for r in range(rounds):
        for k in keys[r % len(keys):] + keys[: r % len(keys)]:
            times[k].append(cases.time_once(*runners[k], device))
    return times


def summarize(times):
    return {k: statistics.median(v) for k, v in times.items()}


def fmt_ms(s):
    return f"{s * 1e3:.3f}" if s >= 1e-4 else f"{s * 1e6:.1f} us"


def loss_table(device, dtype, rounds, bandwidth, shapes=cases.SHAPES):
    impls = cases.loss_impls(device)
    names = list(impls)
    lines = [
        "| shape | mode | " + " | ".join(f"{n} ms" for n in names)
        + " | best lct vs eager | best lct vs compile | floor ms | best lct / floor |",
        "|" + "---|" * (len(names) + 6),
    ]
    results = {}
    for label, shape in shapes.items():
        med = summarize(measure(impls, cases.loss_inputs, shape, dtype, device, rounds))
        floor = cases.floor_bytes(shape, dtype) / bandwidth
        for mode in MODES:
            row = [med[(n, mode)] for n in names]
            lct = [med[(n, mode)] for n in names if n.startswith("lct-")]
            best = min(lct) if lct else float("nan")
            results[(label, mode)] = dict(zip(names, row))
            floor_cells = f"{fmt_ms(floor)} | {best / floor:.2f}" if mode == "fwd+bwd" else " | "
            lines.append(
                f"| {label} | {mode} | " + " | ".join(fmt_ms(t) for t in row)
                + f" | {med[('eager', mode)] / best:.2f}x | {med[('compile', mode)] / best:.2f}x | "
                + floor_cells + " |"
            )
    return lines, results


def objective_table(device, dtype, rounds, shapes=None):
    impls = cases.objective_impls(device)
    names = list(impls)
    lines = [
        "| shape | " + " | ".join(f"{n} ms" for n in names) + " | best lct vs eager | best lct vs compile |",
        "|" + "---|" * (len(names) + 3),
    ]
    shapes = shapes or {k: cases.SHAPES[k] for k in ("128x4x32x32", "256x4x32x32")}
    for label, shape in shapes.items():
        med = summarize(
            measure(impls, cases.objective_inputs, shape, dtype, device, rounds,
                    modes=("fwd+bwd",))
        )
        row = [med[(n, "fwd+bwd")] for n in names]
        best = min(med[(n, "fwd+bwd")] for n in names if n.startswith("lct-"))
        lines.append(
            f"| {label} | " + " | ".join(fmt_ms(t) for t in row)
            + f" | {med[('eager', 'fwd+bwd')] / best:.2f}x | {med[('compile', 'fwd+bwd')] / best:.2f}x |"
        )
    return lines


def layer_norm_table(device, dtype, rounds, bandwidth, shapes=None):
    shapes = shapes or (ln_cases.GPU_SHAPES if device == "cuda" else ln_cases.CPU_SHAPES)
    lines = []
    for label, shape in shapes.items():
        impls = ln_cases.impls(device, shape[3])
        names = list(impls)
        lines += [
            f"**{label}**", "",
            "| mode | " + " | ".join(f"{n} ms" for n in names)
            + " | best lct vs eager | best lct vs compile | floor ms | best lct / floor |"
            + (" peak MB (fwd+bwd) |" if device == "cuda" else ""),
            "|" + "---|" * (len(names) + 5 + (1 if device == "cuda" else 0)),
        ]
        med = summarize(measure(impls, ln_cases.inputs, shape, dtype, device, rounds))
        floor = ln_cases.floor_bytes(shape, dtype) / bandwidth
        peaks = peak_memory(impls, shape, dtype) if device == "cuda" else {}
        for mode in MODES:
            row = [med[(n, mode)] for n in names]
            best = min(med[(n, mode)] for n in names if n.startswith("lct-"))
            floor_cells = f"{fmt_ms(floor)} | {best / floor:.2f}" if mode == "fwd+bwd" else " | "
            peak_cells = ""
            if peaks:
                peak_cells = " " + ", ".join(f"{n} {peaks[n]:.0f}" for n in names) + " |" if mode == "fwd+bwd" else " |"
            lines.append(
                f"| {mode} | " + " | ".join(fmt_ms(t) for t in row)
                + f" | {med[('eager', mode)] / best:.2f}x | {med[('compile', mode)] / best:.2f}x | "
                + floor_cells + " |" + peak_cells
            )
        lines.append("")
    return lines


def peak_memory(impls, shape, dtype):
    """Peak CUDA memory (MB) above the inputs during one forward + backward, per implementation."""
    out = {}
    for name, fn in impls.items():
        args, grad_out = ln_cases.inputs(shape, dtype, "cuda")
        fn(*args).backward(grad_out)  # warm-up
        for t in args:
            if isinstance(t, torch.Tensor):
                t.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(*args).backward(grad_out)
        torch.cuda.synchronize()
        out[name] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return out


def kernel_bandwidth_lines(device, dtype, bandwidth, rounds, shapes=None):
    """GPU only: the fused forward kernel alone, as a fraction of copy bandwidth."""
    lines = ["| shape | backend | kernel us | GB/s | % of copy bandwidth |", "|---|---|---|---|---|"]
    shapes = shapes or {k: cases.SHAPES[k] for k in ("256x4x32x32", "64x4x64x64")}
    for label, shape in shapes.items():
        pred, target, weight, c = cases.loss_inputs(shape, dtype, device)
        p2, t2 = pred.detach().reshape(shape[0], -1), target.reshape(shape[0], -1)
        c_t = torch.tensor(c, dtype=torch.float64, device=device)
        nbytes = cases.floor_bytes(shape, dtype)
        for be in cases.lct_backends(device):
            op = L.ops.robust_loss.fused_op(be)

            def run(op=op):
                op(p2, t2, c_t, weight, 0, False, 1, True)

            ts = sorted(cases.time_once(lambda: None, run, device) for _ in range(max(rounds, 50)))
            t = ts[len(ts) // 2]
            lines.append(f"| {label} | {be} | {t * 1e6:.1f} | {nbytes / t / 1e9:.0f} | "
                         f"{100 * nbytes / t / bandwidth:.0f}% |")
    return lines


def plot(results, device, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(lab for lab, _ in results))
    impls = [n for n in next(iter(results.values())) if n != "eager"]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(impls)
    for i, name in enumerate(impls):
        speedups = [results[(lab, "fwd+bwd")]["eager"] / results[(lab, "fwd+bwd")][name]
                    for lab in labels]
        ax.bar([x + i * width for x in range(len(labels))], speedups, width, label=name)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([x + width * (len(impls) - 1) / 2 for x in range(len(labels))], labels)
    ax.set_ylabel("speed-up over eager (fwd+bwd)")
    ax.set_title(f"Cauchy loss, {device}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def environment(device, dtype, bandwidth):
    info = L.backend_info()
    cpu = info.get("cpu") or {}  # CPU model and the ISA path of our kernels (and torch's)
    dev = info["cuda_device"] if device == "cuda" else (
        f"{cpu.get('model') or platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads")
    isa = (f"- CPU kernels' ISA path: {cpu.get('isa', 'n/a')}; torch's CPU capability: "
           f"{cpu.get('torch_capability', 'n/a')}")
    return [
        f"- date: {datetime.date.today().isoformat()}",
        f"- device: {device} ({dev}); dtype {str(dtype).replace('torch.', '')}",
        *([isa] if device == "cpu" else []),
        f"- torch {torch.__version__}, triton {info['versions']['triton']}, python {info['versions']['python']}",
        f"- measured copy bandwidth (read + write): {bandwidth / 1e9:.1f} GB/s",
    ]


_PRINTED = [0]  # how many report lines _flush has printed


def _flush(lines):
    """Print the report lines not printed yet (the same text as one print at the end), so a
    run killed part-way, as gpu_check.sh's stage timeout does, keeps what it measured."""
    if len(lines) > _PRINTED[0]:
        print("\n".join(lines[_PRINTED[0]:]), flush=True)
        _PRINTED[0] = len(lines)


def replace_section(path, device, body):
    start, end = f"<!-- report:{device} -->", f"<!-- /report:{device} -->"
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    block = f"{start}\n{body}\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--tiny", action="store_true",
                    help="tiny shapes, 2 rounds, torch.compile's eager backend: checks the "
                         "report's plumbing (gpu_check.sh --dry-run); the numbers mean nothing")
    ap.add_argument("--write", metavar="MARKDOWN", help="replace this device's section in the file")
    ap.add_argument("--plots", metavar="DIR", help="save PNG plots here")
    args = ap.parse_args(argv)
    device = args.device
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    rounds = args.rounds or (2 if args.tiny else 5 if args.quick else (40 if device == "cpu" else 100))
    tiny = args.tiny
    if tiny:
        cases.COMPILE_BACKEND = "eager"
    bandwidth = cases.copy_bandwidth(device, **({"nbytes": 4 * 2**20, "reps": 3} if tiny else {}))

    out = [f"### {device.upper()}: Cauchy loss (weighted, mean), forward / backward / both", ""]
    out += environment(device, dtype, bandwidth) + [f"- rounds: {rounds} (median)", ""]
    if tiny:
        out += ["**Tiny plumbing run (--tiny): shapes, rounds and torch.compile backend are not "
                "the report's; the numbers mean nothing.**", ""]
    lines, results = loss_table(device, dtype, rounds, bandwidth,
                                cases.TINY_SHAPES if tiny else cases.SHAPES)
    out += lines
    _flush(out)
    out += ["", f"### {device.upper()}: consistency objective (Cauchy + 5 x diffusion), fwd+bwd", ""]
    out += objective_table(device, dtype, rounds, dict(list(cases.TINY_SHAPES.items())[:1]) if tiny else None)
    _flush(out)
    out += ["", f"### {device.upper()}: NsLN / fused NsLN + adaLN modulate, forward / backward / both", ""]
    out += ["Floor: read x, write y, read dy and x, write dx once each.", ""]
    ln_rounds = rounds if tiny or device != "cpu" else max(5, rounds // 4)
    out += layer_norm_table(device, dtype, ln_rounds, bandwidth, ln_cases.TINY_SHAPES if tiny else None)
    _flush(out)
    out += [""] + bench_ot.report(device, quick=args.quick, tiny=tiny)
    _flush(out)
    if device == "cpu":  # issue 14: per-call cost at the demo's and qk-norm's shapes
        out += ["", "### CPU: per-call cost at the demo's shapes (fwd+bwd, interleaved medians)", ""]
        out += bench_small_shapes.table(bench_small_shapes.run(
            2 if tiny else 20 if args.quick else 400, warmup=1 if tiny else 5))
        _flush(out)
    if device == "cuda":
        out += ["", "### CUDA: fused forward kernel alone (loss + gradient), bytes = 3 x tensor", ""]
        out += kernel_bandwidth_lines(device, dtype, bandwidth, rounds, cases.TINY_SHAPES if tiny else None)
    _flush(out)
    body = "\n".join(out)
    if args.plots:
        os.makedirs(args.plots, exist_ok=True)
        path = os.path.join(args.plots, f"cauchy_{device}.png")
        plot(results, device, path)
        body += f"\n\n![speed-up over eager, {device}]({os.path.relpath(path, os.path.dirname(os.path.abspath(args.write)) if args.write else '.')})"
        print(f"\nplot: {path}")
    if args.write:
        replace_section(args.write, device, body)
        print(f"wrote the {device} section of {args.write}")


if __name__ == "__main__":
    main()
