"""Command lines: ``lct-train``, ``lct-sample``, ``lct-eval``, ``lct-ablate`` and ``lct-inspect``
(``lct-train`` also as ``python -m lct_kernels.train``)."""

import argparse
import json
import sys
from pathlib import Path

import torch

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
    from ..eval.evaluate import PeriodicDigitsEval
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
        # run.eval_every's metrics come from the eval package; the loop only calls them.
        trainer = Trainer(cfg, out, resume=resume, overwrite=args.overwrite,
                          evaluator=PeriodicDigitsEval())
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

    from .checkpoint import CheckpointError
    from .loop import load_for_sampling, resolve_device
    from .plots import save_image_grid
    from .sampling import default_sigma_mid, sample

    parser = sample_parser()
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"--n: must be >= 1, got {args.n}")
    try:
        ckpt = _find_checkpoint(args.ckpt)
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


def eval_parser():
    p = argparse.ArgumentParser(
        prog="lct-eval", description="Evaluate a trained latent consistency model. On the "
        "embedded digits: Fréchet distance and precision/recall in a digit classifier's feature "
        "space, class coverage, sliced Wasserstein in latent space (offline). On real data: FID "
        "and recall with torch-fidelity (--real DIR --inception-weights FILE).")
    p.add_argument("--ckpt", required=True, help="a checkpoint, or a run / checkpoints folder")
    p.add_argument("--steps", type=int, nargs="+", choices=(1, 2), default=[1, 2])
    p.add_argument("--n", type=int, default=1000, help="generated samples per step count")
    p.add_argument("--out", help="output folder (default: the run folder's eval/)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sigma-mid", type=float, help="2-step re-noising sigma")
    p.add_argument("--device", default="auto")
    p.add_argument("--search-sigma-mid", action="store_true",
                   help="digits: ternary-search the 2-step sigma_mid that minimises the FD, "
                        "then evaluate with it")
    p.add_argument("--real", help="real data: a folder of real images (FID, recall)")
    p.add_argument("--inception-weights", help="real data: torch-fidelity's Inception weights file")
    return p


def _find_checkpoint(path):
    from .checkpoint import list_checkpoints

    ckpt = Path(path)
    if ckpt.is_dir():
        folder = ckpt / "checkpoints" if (ckpt / "checkpoints").is_dir() else ckpt
        found = list_checkpoints(folder)
        if not found:
            raise FileNotFoundError(f"no checkpoint (ckpt-*.pt) in {ckpt}")
        return found[-1][1]
    return ckpt


def eval_main(argv=None):
    from .checkpoint import CheckpointError
    from ..eval.evaluate import check_real_data_inputs, evaluate_digits, real_data_metrics, write_report
    from .loop import load_for_sampling, resolve_device

    parser = eval_parser()
    args = parser.parse_args(argv)
    if args.n < 10:
        parser.error(f"--n: must be >= 10, got {args.n}")
    try:
        if args.real or args.inception_weights:
            check_real_data_inputs(args.real, args.inception_weights)
        ckpt = _find_checkpoint(args.ckpt)
        device = resolve_device(args.device)
        model, state, decode, cfg = load_for_sampling(ckpt, device)
        out = Path(args.out) if args.out else ckpt.parent.parent / "eval"
        if state["decoder"].get("kind") == "digits" and not args.real:
            sigma_mid, search = args.sigma_mid, None
            if args.search_sigma_mid:
                sigma_mid, search = _search_sigma_mid(model, state, cfg, decode, args, device)
            result = evaluate_digits(model, state, cfg, decode, steps=tuple(args.steps), n=args.n,
                                     seed=args.seed, sigma_mid=sigma_mid, device=device)
            if search is not None:
                result["sigma_mid_search"] = search
            from .data.digits import load_digits_split

            real = load_digits_split(holdout=cfg.data.holdout, seed=0)["test_images"]
            path = write_report(result, out, real)
            _print_eval(result)
        else:
            if decode is None:
                raise ValueError("--ckpt: this run has no decoder (trained on a latents file), "
                                 "so there are no images to compare; FID needs an images run")
            result = {"n": args.n, "seed": args.seed, "steps": {}}
            for k in args.steps:
                folder = out / f"generated_{k}step"
                _write_images(model, state, cfg, decode, k, args.n, args.seed, device,
                              args.sigma_mid, folder)
                result["steps"][str(k)] = real_data_metrics(folder, args.real,
                                                            args.inception_weights)
            out.mkdir(parents=True, exist_ok=True)
            path = out / "eval.json"
            path.write_text(json.dumps(result, indent=2))
            print(json.dumps(result["steps"], indent=2))
    except (CheckpointError, FileNotFoundError, ImportError, ValueError) as exc:
        print(f"lct-eval: error: {exc}", file=sys.stderr)
        return 1
    print(f"lct-eval: wrote {path}" + (f" and {out / 'eval_panel.png'}"
                                      if (out / "eval_panel.png").exists() else ""))
    return 0


def _search_sigma_mid(model, state, cfg, decode, args, device):
    """Ternary search (log sigma) of the 2-step sigma_mid minimising the FD (fixed seed)."""
    from ..eval.evaluate import digits_reference, evaluate_digits
    from .pipeline import default_cache_dir
    from .sampling import search_sigma_mid

    ref = digits_reference(state, cfg, cfg.data.cache_dir or default_cache_dir())

    def fd(sigma_mid):
        r = evaluate_digits(model, state, cfg, decode, steps=(2,), n=min(args.n, 500),
                            seed=args.seed, sigma_mid=sigma_mid, device=device, reference=ref)
        return r["steps"]["2"]["fd"]

    best, value, history = search_sigma_mid(fd, lo=0.05, hi=10.0, iterations=6)
    print(f"lct-eval: sigma_mid search: best {best:.4g} (FD {value:.3f}, {len(history)} evaluations)")
    return best, {"best": best, "fd": value, "history": history}


def _print_eval(result):
    print(f"classifier held-out accuracy {result['classifier_test_accuracy']:.4f}; "
          f"FD train vs held-out (floor) {result['fd_train_vs_heldout']:.3f}")
    print("steps  FD        precision recall  coverage SWD(latent)")
    for k, e in result["steps"].items():
        print(f"{k:>5}  {e['fd']:8.3f}  {e['precision']:.3f}     {e['recall']:.3f}   "
              f"{e['class_coverage']:.2f}     {e['sliced_wasserstein_latent']:.4f}")


def _write_images(model, state, cfg, decode, steps, n, seed, device, sigma_mid, folder):
    from PIL import Image

    from ..eval.evaluate import _generate
    from .sampling import default_sigma_mid

    o = cfg.objective
    mid = sigma_mid or cfg.run.sigma_mid or default_sigma_mid(o.sigma_min, o.sigma_max, o.rho)
    latents, _ = _generate(model, state, cfg, steps, n, seed, device, mid)
    folder.mkdir(parents=True, exist_ok=True)
    for start in range(0, n, 100):
        images = decode(latents[start:start + 100]).cpu()
        arr = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for i, a in enumerate(arr):  # PNG, not JPEG: no compression artefacts in the metric
            Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a).save(folder / f"{start + i:06d}.png")


def ablate_parser():
    p = argparse.ArgumentParser(
        prog="lct-ablate", description="The sLCT ablation on the embedded digits: the iCT "
        "baseline, then each sLCT component added in the paper's order, one change per row "
        "(adaptive c three ways: paper, anchored, measured), with the same budget, seeds and "
        "random streams; writes ablation.md (absolute values, mean ± std over seeds, and each "
        "row's paired difference against its parent, mean ± standard error, at 1 and 2 NFE), "
        "ablation.png and ablation.json.")
    p.add_argument("--budget", type=int, help="training steps per variant (required unless "
                   "--from-json)")
    p.add_argument("--seeds", type=int, default=2, help="seeds per variant (default 2)")
    p.add_argument("--out", default="runs/ablation", help="output folder")
    p.add_argument("--n", type=int, default=1000, help="generated samples per metric")
    p.add_argument("--first-seed", type=int, default=0,
                   help="seeds first-seed .. first-seed + seeds - 1 (to run seeds side by side)")
    p.add_argument("--from-json", metavar="FILE", nargs="+",
                   help="no training: write ablation.md/.png in --out from ablation.json files "
                        "(merged; also partial ones: each is rewritten after every run)")
    p.add_argument("--only", nargs="+", metavar="ROW",
                   help="run only these rows (keys: ict cauchy diff ot c_paper c_anchored "
                        "c_measured nsln), e.g. to time one row")
    p.add_argument("overrides", nargs="*", metavar="section.field=value",
                   help="applied to every variant (e.g. model.hidden_size=64)")
    return p


def ablate_main(argv=None):
    from ..eval.ablation import bar_plot, markdown_table, run_ablation

    parser = ablate_parser()
    args = parser.parse_args(argv)
    command = "lct-ablate " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    if args.from_json:
        from ..eval.ablation import merge_reports

        try:
            report = merge_reports([json.loads(Path(f).read_text()) for f in args.from_json])
        except (OSError, ValueError) as exc:
            parser.error(f"--from-json: {exc}")
        out.mkdir(parents=True, exist_ok=True)
        (out / "ablation.json").write_text(json.dumps(report, indent=2))
        command = report.get("command", command)
        (out / "ablation.md").write_text(markdown_table(report, command))
        bar_plot(report, out / "ablation.png")
        print(f"lct-ablate: wrote {out / 'ablation.md'} and {out / 'ablation.png'}")
        return 0
    if args.budget is None or args.budget < 1:
        parser.error(f"--budget: must be >= 1, got {args.budget}")
    if args.seeds < 1:
        parser.error(f"--seeds: must be >= 1, got {args.seeds}")
    if args.n < 10:
        parser.error(f"--n: must be >= 10, got {args.n}")
    try:
        build_config("ict", overrides=args.overrides)
    except ConfigError as exc:
        parser.error(str(exc))
    from ..eval.ablation import VARIANTS

    keys = [v[0] for v in VARIANTS]
    if args.only and set(args.only) - set(keys):
        parser.error(f"--only: unknown rows {sorted(set(args.only) - set(keys))}; rows are {keys}")
    report = run_ablation(args.budget, args.seeds, out, extra=args.overrides, n_eval=args.n,
                          only=args.only, command=command, first_seed=args.first_seed)
    (out / "ablation.md").write_text(markdown_table(report, command))
    bar_plot(report, out / "ablation.png")
    print(markdown_table(report, command))
    print(f"lct-ablate: wrote {out / 'ablation.md'}, {out / 'ablation.png'}, {out / 'ablation.json'}")
    return 0


def inspect_parser():
    p = argparse.ArgumentParser(
        prog="lct-inspect", description="Outlier statistics of a latents file, the ones that "
        "motivate sLCT's Cauchy loss: per-channel excess kurtosis, the fraction of elements "
        "beyond 4 sigma and the largest |z|, with z the latents standardised per element "
        "(lct-train prints the same summary of its training latents when it starts).")
    p.add_argument("--latents", required=True, help="a .npy/.npz/.pt/.safetensors latents file")
    p.add_argument("--threshold", type=float, default=4.0, help="|z| threshold (default 4)")
    p.add_argument("--json", metavar="FILE", help="also write the statistics as JSON")
    return p


def inspect_main(argv=None):
    from .data import load_latents_file
    from .latent_report import format_outlier_report, outlier_stats

    parser = inspect_parser()
    args = parser.parse_args(argv)
    try:
        latents, _ = load_latents_file(args.latents)
        stats = outlier_stats(latents, threshold=args.threshold)
    except (FileNotFoundError, ImportError, ValueError) as exc:
        print(f"lct-inspect: error: {exc}", file=sys.stderr)
        return 1
    print(format_outlier_report(stats, args.latents))
    if args.json:
        Path(args.json).write_text(json.dumps(stats, indent=2))
    return 0


def _entry(main):
    def run():
        sys.exit(main())
    return run


train = _entry(train_main)
sample_cmd = _entry(sample_main)
eval_cmd = _entry(eval_main)
ablate_cmd = _entry(ablate_main)
inspect_cmd = _entry(inspect_main)
