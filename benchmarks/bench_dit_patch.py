"""Forward + backward step of a DiT before and after ``lct_kernels.nn.patch_dit``.

    python benchmarks/bench_dit_patch.py                  # DiT-S/2, 4x16x16, this CPU (fp32)
    python benchmarks/bench_dit_patch.py --device cuda    # DiT-B/2, 4x32x32, bf16 autocast
    python benchmarks/bench_dit_patch.py --quick          # tiny smoke run (seconds + compile)

The network is the trainer's standard DiT (``build_dit(..., nsln=False,
fused=False)``: plain LayerNorm, DiT's modulate in eager ops, learnable
qk-norm); "patched" is a copy after ``patch_dit(model)`` (outputs unchanged: the
block and final norms run ``nsln_modulate``, the qk-norms ``FusedLayerNorm``).
One step = forward on (x, t), loss = mean(out^2), backward (gradients zeroed
before).  Eager and ``torch.compile``d, unpatched and patched, are timed side
by side in rotating order; the table gives median ms per step and the speed-up.
"""

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lct_kernels.nn import patch_dit  # noqa: E402
from lct_kernels.train.model import build_dit  # noqa: E402

CONFIGS = {
    "cpu": dict(size="S", latent=(4, 16, 16), batch=16, label="DiT-S/2, 4x16x16"),
    "cuda": dict(size="B", latent=(4, 32, 32), batch=64, label="DiT-B/2, 4x32x32"),
    "quick": dict(size="tiny", latent=(4, 8, 8), batch=4, depth=1,
                  label="DiT-tiny/2 depth 1, 4x8x8"),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(model, x, t, autocast):
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        for p in params:
            p.grad = None
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(x, t)
        out.float().square().mean().backward()

    return step


def run(args):
    device = torch.device(args.device)
    cfg = CONFIGS["quick" if args.quick else device.type]
    autocast = device.type == "cuda"
    torch.manual_seed(0)
    C, H, _ = cfg["latent"]
    model = build_dit(cfg["size"], input_size=H, in_channels=C, patch_size=2, nsln=False,
                      fused=False, depth=cfg.get("depth")).to(device)
    patched = copy.deepcopy(model)
    n = patch_dit(patched)
    batch = args.batch or cfg["batch"]
    x = torch.randn(batch, C, H, H, device=device)
    t = torch.randn(batch, device=device) * 100
    variants = {}
    for mode in args.modes:
        for name, net in (("unpatched", model), ("patched", patched)):
            net = torch.compile(net) if mode == "compiled" else net
            variants[(mode, name)] = make_step(net, x, t, autocast)
    for fn in variants.values():  # warm-up (compiles)
        for _ in range(args.warmup):
            fn()
    sync(device)
    times = {k: [] for k in variants}
    keys = list(variants)
    for r in range(args.rounds):
        for k in keys[r % len(keys):] + keys[: r % len(keys)]:  # rotating order
            sync(device)
            t0 = time.perf_counter()
            variants[k]()
            sync(device)
            times[k].append((time.perf_counter() - t0) * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    return dict(label=cfg["label"], batch=batch, device=str(device), autocast_bf16=autocast,
                modules_patched=n, rounds=args.rounds, torch=torch.__version__,
                machine=platform.processor() or platform.machine(),
                gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                median_ms={f"{m} {name}": v for (m, name), v in med.items()})


def table(res):
    med = res["median_ms"]
    lines = [f"{res['label']}, batch {res['batch']}, {res['device']}"
             f"{' bf16 autocast' if res['autocast_bf16'] else ' fp32'} "
             f"({res['modules_patched']} modules patched; median of {res['rounds']} steps)", "",
             "| mode | unpatched ms | patched ms | speed-up |", "|---|---|---|---|"]
    for mode in ("eager", "compiled"):
        if f"{mode} patched" in med:
            u, p = med[f"{mode} unpatched"], med[f"{mode} patched"]
            lines.append(f"| {mode} | {u:.2f} | {p:.2f} | {u / p:.2f}x |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu (DiT-S/2) or cuda (DiT-B/2, bf16)")
    ap.add_argument("--quick", action="store_true", help="tiny model, few steps (smoke run)")
    ap.add_argument("--batch", type=int, default=0, help="batch size (default per config)")
    ap.add_argument("--rounds", type=int, default=0, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--modes", default="eager,compiled",
                    help="comma-separated: eager, compiled (default both)")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    if not args.modes or any(m not in ("eager", "compiled") for m in args.modes):
        ap.error(f"--modes takes eager and/or compiled, got {args.modes}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device")
    args.rounds = args.rounds or (3 if args.quick else 20)
    args.warmup = args.warmup or (1 if args.quick else 3)
    res = run(args)
    print(table(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
