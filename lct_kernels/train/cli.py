"""Command lines: ``lct-train`` and ``lct-sample`` (also ``python -m lct_kernels.train``)."""

import argparse
import json
import sys
from pathlib import Path

from .config import PRESET_HELP, PRESETS, ConfigError, build_config

EPILOG = "presets:\n" + "\n".join(f"  {name:12s} {PRESET_HELP[name]}" for name in PRESETS) + """

overrides: any config field as section.field=value, e.g.
  lct-train --preset demo optim.lr=5e-4 objective.loss=pseudo_huber run.device=cpu
  (sections: data, model, objective, optim, run; the resolved config is saved
  as OUT/config.toml, which --config reads back)
"""


def train_parser():
    p = argparse.ArgumentParser(
        prog="lct-train", description="Train a latent consistency model (sLCT / iCT).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", default="demo", help="starting config (default: demo)")
    p.add_argument("--config", help="a .toml/.yaml/.json file applied on top of the preset")
    p.add_argument("--out", help="run folder (default: runs/<preset>)")
    p.add_argument("--steps", type=int, help="total training steps (run.steps)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in OUT/checkpoints; the run keeps "
                        "its saved config, except run.* fields")
    p.add_argument("--resume-from", metavar="CKPT",
                   help="continue from this checkpoint file (implies --resume)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an --out folder that already holds a run")
    p.add_argument("--stop-after", type=int, metavar="N",
                   help="stop after N steps of this invocation (checkpointed; --resume continues)")
    p.add_argument("--latents", help="train on a latents file (.npy/.npz/.pt/.safetensors)")
    p.add_argument("--images", help="train on an image folder, encoded with --vae")
    p.add_argument("--vae", help="a local diffusers AutoencoderKL directory (never downloaded)")
    p.add_argument("--seed", type=int, help="run.seed")
    p.add_argument("--device", help="run.device: auto, cpu, cuda, cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="section.field=value")
    return p


def _overrides(args):
    extra = list(args.overrides)
    if args.steps is not None:
        extra.append(f"run.steps={args.steps}")
    if args.latents:
        extra += ["data.source=latents", f"data.latents={args.latents}"]
    if args.images:
        extra += ["data.source=images", f"data.images={args.images}"]
    if args.vae:
        extra.append(f"data.vae={args.vae}")
    if args.seed is not None:
        extra.append(f"run.seed={args.seed}")
    if args.device:
        extra.append(f"run.device={args.device}")
    if args.no_progress:
        extra.append("run.progress=false")
    return extra


def train_main(argv=None):
    from .checkpoint import CheckpointError
    from .loop import Trainer, TrainingDiverged

    parser = train_parser()
    args = parser.parse_args(argv)
    try:
        cfg = build_config(args.preset, args.config, _overrides(args))
    except ConfigError as exc:
        parser.error(str(exc))
    if args.stop_after is not None and args.stop_after < 1:
        parser.error(f"--stop-after: must be >= 1, got {args.stop_after}")
    out = Path(args.out or f"runs/{args.preset}")
    from . import distributed as ddp_lib

    try:
        resume = args.resume_from or args.resume or None
        trainer = Trainer(cfg, out, resume=resume, overwrite=args.overwrite)
        summary = trainer.train(stop_after=args.stop_after)
    except (CheckpointError, TrainingDiverged, ConfigError, FileNotFoundError, FileExistsError,
            ImportError, ValueError) as exc:
        print(f"lct-train: error: {exc}", file=sys.stderr)
        ddp_lib.shutdown()
        return 1
    ddp_lib.shutdown()
    if not trainer.is_main:
        return 0
    print(f"lct-train: {summary['status']} at step {summary['step']}/{summary['steps_total']} "
          f"({summary['steps_per_s']} steps/s); outputs in {out}/ "
          "(config.toml, checkpoints/, samples/, metrics.csv, loss.png, summary.json)")
    return 0


def sample_parser():
    p = argparse.ArgumentParser(prog="lct-sample",
                                description="Sample a trained latent consistency model.")
    p.add_argument("--ckpt", required=True,
                   help="a checkpoint file, or a run folder / checkpoints folder (newest is used)")
    p.add_argument("--steps", type=int, choices=(1, 2), default=1, help="1 or 2 sampling steps")
    p.add_argument("--n", type=int, default=64, help="number of samples")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--sigma-mid", type=float, help="2-step re-noising sigma (default: paper code's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    return p


def sample_main(argv=None):
    import numpy as np
    import torch

    from .checkpoint import CheckpointError, list_checkpoints
    from .loop import load_for_sampling, resolve_device
    from .plots import save_image_grid
    from .sampling import default_sigma_mid, sample

    parser = sample_parser()
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"--n: must be >= 1, got {args.n}")
    ckpt = Path(args.ckpt)
    if ckpt.is_dir():
        folder = ckpt / "checkpoints" if (ckpt / "checkpoints").is_dir() else ckpt
        found = list_checkpoints(folder)
        if not found:
            print(f"lct-sample: error: no checkpoint (ckpt-*.pt) in {ckpt}", file=sys.stderr)
            return 1
        ckpt = found[-1][1]
    try:
        device = resolve_device(args.device)
        model, state, decode, cfg = load_for_sampling(ckpt, device, use_ema=not args.raw)
    except (CheckpointError, RuntimeError, FileNotFoundError, ImportError) as exc:
        print(f"lct-sample: error: {exc}", file=sys.stderr)
        return 1
    o = cfg.objective
    sigma_mid = args.sigma_mid or cfg.run.sigma_mid or default_sigma_mid(o.sigma_min, o.sigma_max, o.rho)
    if args.steps == 2 and not o.sigma_min < sigma_mid < o.sigma_max:
        parser.error(f"--sigma-mid: must be in ({o.sigma_min}, {o.sigma_max}), got {sigma_mid}")
    num_classes = state["num_classes"]
    labels = torch.arange(args.n, device=device) % num_classes if num_classes else None
    g = torch.Generator(device=device).manual_seed(args.seed)
    autocast = device.type == "cuda" and cfg.run.precision != "fp32"
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        latents = sample(model, (args.n,) + tuple(state["latent_shape"]), args.steps, labels,
                         sigma_mid, generator=g, device=device, sigma_min=o.sigma_min,
                         sigma_max=o.sigma_max, sigma_data=o.sigma_data, rho=o.rho)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images = decode(latents) if decode is not None else latents
    stem = f"samples_{args.steps}step"
    np.save(out / f"{stem}.npy", images.cpu().numpy())
    np.save(out / f"{stem}_latents.npy", latents.cpu().numpy())
    if labels is not None:
        np.save(out / f"{stem}_labels.npy", labels.cpu().numpy())
    png = save_image_grid(images, out / f"{stem}.png", nrow=10 if labels is not None else None)
    info = {"checkpoint": str(ckpt), "step": int(state["step"]), "steps": args.steps,
            "n": args.n, "sigma_mid": sigma_mid if args.steps == 2 else None, "seed": args.seed,
            "png": str(png), "npy": str(out / f"{stem}.npy"),
            "decoded": decode is not None, "ema": not args.raw}
    (out / f"{stem}.json").write_text(json.dumps(info, indent=2))
    print(f"lct-sample: wrote {png} and {out / (stem + '.npy')}")
    return 0


def _entry(main):
    def run():
        sys.exit(main())
    return run


train = _entry(train_main)
sample_cmd = _entry(sample_main)
