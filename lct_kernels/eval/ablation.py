"""The sLCT ablation on the embedded digits (``lct-ablate``).

Starting from the iCT-in-latent baseline, sLCT's components are added one at a
time in the paper's order (Cauchy loss, diffusion loss, OT coupling, adaptive c,
NsLN); the last row is the full sLCT recipe.  Two more rows swap the c
convention (iCT's sum form instead of the paper code's per-element mean).
Every variant trains with the same step budget, seeds and data; each is scored
with the offline digits metrics of ``evaluate`` at 1 and 2 sampling steps.
"""

import json
import statistics
import time
from pathlib import Path

from ..train.config import build_config

# (name, overrides on the `ict` preset), cumulative in the paper's order.
_ICT = {}
_CAUCHY = {**_ICT, "objective.loss": "cauchy"}
_DIFF = {**_CAUCHY, "objective.diffusion_loss": "true"}
_OT = {**_DIFF, "objective.ot": "true"}
_ADAPT = {**_OT, "objective.adaptive_c": "true"}
_NSLN = {**_ADAPT, "model.nsln": "true"}
VARIANTS = [
    ("iCT baseline (Pseudo-Huber)", _ICT),
    ("+ Cauchy loss", _CAUCHY),
    ("+ diffusion loss", _DIFF),
    ("+ OT coupling", _OT),
    ("+ adaptive c", _ADAPT),
    ("+ NsLN = sLCT", _NSLN),
    ("sLCT, c in iCT's sum convention", {**_NSLN, "objective.c_convention": "sum"}),
    ("iCT baseline, c in iCT's sum convention", {**_ICT, "objective.c_convention": "sum"}),
]
METRICS = (("fd", "FD (classifier features) ↓"), ("recall", "recall ↑"), ("precision", "precision ↑"))


def variant_config(overrides, budget, seed, extra=()):
    items = [f"{k}={v}" for k, v in overrides.items()]
    items += [f"run.steps={budget}", f"run.seed={seed}", "run.progress=false",
              "run.tensorboard=false", "run.sample_every=0", f"run.ckpt_every={budget}"]
    return build_config("ict", overrides=items + list(extra))


def run_ablation(budget, seeds, out_dir, extra=(), n_eval=1000, progress=True):
    """Trains every variant for ``budget`` steps with each seed in ``range(seeds)``;
    returns {"rows": [{"variant", "seed", "1": {...}, "2": {...}}, ...], ...}."""
    from tqdm.auto import tqdm

    from .evaluate import digits_reference, evaluate_digits
    from ..train.loop import Trainer
    from ..train.pipeline import default_cache_dir, make_decoder, prepare_data

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = variant_config({}, budget, 0, extra)
    data = prepare_data(base, progress=progress)
    reference = None
    rows = []
    started = time.time()
    jobs = [(name, ov, seed) for name, ov in VARIANTS for seed in range(seeds)]
    for name, overrides, seed in tqdm(jobs, desc="lct-ablate", disable=not progress):
        cfg = variant_config(overrides, budget, seed, extra)
        slug = f"{VARIANTS.index((name, overrides)):02d}-seed{seed}"
        trainer = Trainer(cfg, out / "runs" / slug, data=data, overwrite=True)
        summary = trainer.train()
        state = {"num_classes": data.num_classes, "latent_shape": data.latent_shape,
                 "decoder": data.decoder, "latent_stats": data.stats.state_dict()}
        if reference is None:
            reference = digits_reference(state, cfg, cfg.data.cache_dir or default_cache_dir())
        decode = make_decoder(data.decoder, data.stats, trainer.device)
        result = evaluate_digits(trainer.ema, state, cfg, decode, n=n_eval, seed=1000 + seed,
                                 device=trainer.device, reference=reference)
        rows.append({"variant": name, "seed": seed, "final_loss": summary["final"]["loss"],
                     **{k: {m: v[m] for m, _ in METRICS} for k, v in result["steps"].items()}})
    report = {"budget": budget, "seeds": seeds, "n_eval": n_eval, "extra": list(extra),
              "seconds": round(time.time() - started, 1),
              "classifier_test_accuracy": reference["classifier_info"]["test_accuracy"],
              "rows": rows}
    (out / "ablation.json").write_text(json.dumps(report, indent=2))
    return report


def _mean_std(values):
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def summarise(report):
    """{variant: {(metric, steps): (mean, std)}} in VARIANTS order."""
    table = {}
    for name, _ in VARIANTS:
        rows = [r for r in report["rows"] if r["variant"] == name]
        if not rows:
            continue
        table[name] = {(m, k): _mean_std([r[k][m] for r in rows])
                       for m, _ in METRICS for k in ("1", "2")}
    return table


def markdown_table(report, command):
    """The ablation as Markdown (mean ± std over seeds at 1 and 2 NFE)."""
    table = summarise(report)
    lines = [f"Command: `{command}`", "",
             f"Budget {report['budget']} steps per variant, {report['seeds']} seed(s), "
             f"{report['n_eval']} samples per metric; held-out digits; digit classifier "
             f"held-out accuracy {report['classifier_test_accuracy']:.4f}; "
             f"{report['seconds'] / 60:.1f} min in all.", "",
             "| variant | FD 1-NFE ↓ | FD 2-NFE ↓ | recall 1-NFE ↑ | recall 2-NFE ↑ | precision 1-NFE ↑ | precision 2-NFE ↑ |",
             "|---|---|---|---|---|---|---|"]
    for name, cells in table.items():
        fmt = []
        for m in ("fd", "recall", "precision"):
            for k in ("1", "2"):
                mean, std = cells[(m, k)]
                digits = 1 if m == "fd" else 3
                fmt.append(f"{mean:.{digits}f} ± {std:.{digits}f}")
        lines.append(f"| {name} | " + " | ".join(fmt) + " |")
    return "\n".join(lines) + "\n"


def bar_plot(report, path):
    """FD at 1 and 2 NFE per variant (mean ± std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    table = summarise(report)
    names = list(table)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(10, 4.2))
    for offset, k in ((-0.2, "1"), (0.2, "2")):
        means = [table[n][("fd", k)][0] for n in names]
        stds = [table[n][("fd", k)][1] for n in names]
        ax.bar(x + offset, means, 0.4, yerr=stds, capsize=3, label=f"{k} NFE")
    ax.set_xticks(x, names, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("FD in digit-classifier features (lower is better)")
    ax.set_title(f"sLCT ablation on the embedded digits ({report['budget']} steps, "
                 f"{report['seeds']} seeds)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
