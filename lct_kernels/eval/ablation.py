"""The sLCT ablation on the embedded digits (``lct-ablate``).

Starting from the iCT-in-latent baseline, sLCT's components are added one at a
time in the paper's order (Cauchy loss, diffusion loss, OT coupling, adaptive c,
NsLN).  Each row changes exactly one thing against its parent row:

    iCT baseline -> + Cauchy -> + diffusion loss -> + OT -> + adaptive c -> + NsLN (= sLCT)

and the adaptive-c step is run three ways (``objective.c_schedule`` = paper,
anchored, measured), each against the OT row; the NsLN row builds on the paper's
c.  The backend (fused kernels or eager PyTorch) is the same in every row, and
so are the step budget, the seeds, the data and every random stream, so the
rows are paired: the table reports each row's absolute metrics (mean ± std over
seeds) and its paired difference against its parent (mean and standard error of
the per-seed differences).  Each run is scored with the offline digits metrics of
``evaluate`` at 1 and 2 sampling steps.
"""

import json
import math
import os
import statistics
import time
from pathlib import Path

from ..train.config import build_config

# (key, label, parent key, overrides on the `ict` preset: cumulative along the parents)
_ICT = {}
_CAUCHY = {**_ICT, "objective.loss": "cauchy"}
_DIFF = {**_CAUCHY, "objective.diffusion_loss": "true"}
_OT = {**_DIFF, "objective.ot": "true"}
_C_PAPER = {**_OT, "objective.adaptive_c": "true", "objective.c_schedule": "paper"}
_C_ANCHORED = {**_OT, "objective.adaptive_c": "true", "objective.c_schedule": "anchored"}
_C_MEASURED = {**_OT, "objective.adaptive_c": "true", "objective.c_schedule": "measured"}
_NSLN = {**_C_PAPER, "model.norm": "nsln"}
VARIANTS = [
    ("ict", "iCT baseline (Pseudo-Huber)", None, _ICT),
    ("cauchy", "+ Cauchy loss", "ict", _CAUCHY),
    ("diff", "+ diffusion loss", "cauchy", _DIFF),
    ("ot", "+ OT coupling", "diff", _OT),
    ("c_paper", "+ adaptive c, paper", "ot", _C_PAPER),
    ("c_anchored", "+ adaptive c, anchored", "ot", _C_ANCHORED),
    ("c_measured", "+ adaptive c, measured", "ot", _C_MEASURED),
    ("nsln", "+ NsLN (on paper c) = sLCT", "c_paper", _NSLN),
]
METRICS = (("fd", "FD ↓"), ("recall", "recall ↑"), ("precision", "precision ↑"))
_BY_KEY = {v[0]: v for v in VARIANTS}


def _check_variants():
    """Every row differs from its parent in exactly one setting (a sanity check of the table)."""
    for key, _, parent, overrides in VARIANTS:
        if parent is None:
            continue
        base = _BY_KEY[parent][3]
        changed = {k for k in set(base) | set(overrides) if base.get(k) != overrides.get(k)}
        # adaptive c is one setting: on, with its schedule
        changed -= {"objective.c_schedule"} if "objective.adaptive_c" in changed else set()
        if len(changed) != 1:
            raise AssertionError(f"ablation row {key!r} changes {sorted(changed)} against {parent!r}")


_check_variants()


def variant_config(overrides, budget, seed, extra=()):
    items = [f"{k}={v}" for k, v in overrides.items()]
    items += [f"run.steps={budget}", f"run.seed={seed}", "run.progress=false",
              "run.tensorboard=false", "run.sample_every=0", f"run.ckpt_every={budget}"]
    return build_config("ict", overrides=items + list(extra))


def run_ablation(budget, seeds, out_dir, extra=(), n_eval=1000, progress=True, only=None,
                 command="", first_seed=0):
    """Trains every variant (or the keys in ``only``) for ``budget`` steps with each seed in
    ``range(first_seed, first_seed + seeds)``; returns {"rows": [{"variant", "key", "seed", "1": {...}, "2": {...},
    "stages": [...]}, ...], ...} and writes it to ``out_dir/ablation.json``."""
    from tqdm.auto import tqdm

    from ..train.loop import Trainer
    from ..train.pipeline import default_cache_dir, make_decoder, prepare_data
    from .evaluate import digits_reference, evaluate_digits

    variants = [v for v in VARIANTS if only is None or v[0] in only]
    if not variants:
        raise ValueError(f"run_ablation: only={only!r} names no variant of {[v[0] for v in VARIANTS]}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = variant_config({}, budget, 0, extra)
    data = prepare_data(base, progress=progress)
    reference = None
    rows = []
    started, load0 = time.time(), os.getloadavg()
    loads = []
    # seed-major: a run stopped early still holds complete pairs for its first seeds
    jobs = [(v, seed) for seed in range(first_seed, first_seed + seeds) for v in variants]
    for (key, name, _, overrides), seed in tqdm(jobs, desc="lct-ablate", disable=not progress):
        cfg = variant_config(overrides, budget, seed, extra)
        slug = f"{[v[0] for v in VARIANTS].index(key):02d}-{key}-seed{seed}"
        t0 = time.time()
        trainer = Trainer(cfg, out / "runs" / slug, data=data, overwrite=True)
        summary = trainer.train()
        state = {"num_classes": data.num_classes, "latent_shape": data.latent_shape,
                 "decoder": data.decoder, "latent_stats": data.stats.state_dict()}
        if reference is None:
            reference = digits_reference(state, cfg, cfg.data.cache_dir or default_cache_dir())
        decode = make_decoder(data.decoder, data.stats, trainer.device)
        result = evaluate_digits(trainer.ema, state, cfg, decode, n=n_eval, seed=1000 + seed,
                                 device=trainer.device, reference=reference)
        loads.append(os.getloadavg()[0])
        rows.append({"variant": name, "key": key, "seed": seed,
                     "final_loss": summary["final"]["loss"], "seconds": round(time.time() - t0, 1),
                     "stages": [{"s": st["s"], "c": st["c"]} for st in summary["stages"]],
                     **{k: {m: v[m] for m, _ in METRICS} for k, v in result["steps"].items()}})
        report = {"command": command, "budget": budget, "seeds": seeds, "n_eval": n_eval, "extra": list(extra),
                  "seconds": round(time.time() - started, 1), "loadavg_start": load0[0],
                  "loadavg_mean": round(statistics.fmean(loads), 2), "cpus": os.cpu_count(),
                  "classifier_test_accuracy": reference["classifier_info"]["test_accuracy"],
                  "rows": rows}
        (out / "ablation.json").write_text(json.dumps(report, indent=2))  # after every run
    return report


def merge_reports(reports):
    """One report from several runs of the same ablation with different seeds (e.g. run
    side by side with --first-seed): rows concatenated, budgets must agree."""
    if not reports:
        raise ValueError("merge_reports: no reports")
    first = dict(reports[0])
    for r in reports[1:]:
        if (r["budget"], r["n_eval"], r.get("extra")) != (first["budget"], first["n_eval"],
                                                          first.get("extra")):
            raise ValueError("merge_reports: the reports differ in budget, n_eval or overrides")
    rows = [row for r in reports for row in r["rows"]]
    keys = {(row["key"], row["seed"]) for row in rows}
    if len(keys) != len(rows):
        raise ValueError("merge_reports: the same (row, seed) appears twice")
    first.update(rows=rows, seeds=len({row["seed"] for row in rows}),
                 seconds=max(r["seconds"] for r in reports), processes=len(reports),
                 seconds_per_report=[r["seconds"] for r in reports],
                 loadavg_mean=statistics.fmean(r.get("loadavg_mean", float("nan")) for r in reports))
    return first


def _mean_sd(values):
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else float("nan"))


def paired(report, key, metric, steps):
    """(mean, standard error, n) of the per-seed difference row(key) - row(parent) for one
    metric at ``steps`` NFE, over the seeds both rows have; None for the baseline."""
    parent = _BY_KEY[key][2]
    if parent is None:
        return None
    mine = {r["seed"]: r[steps][metric] for r in report["rows"] if r["key"] == key}
    theirs = {r["seed"]: r[steps][metric] for r in report["rows"] if r["key"] == parent}
    diffs = [mine[s] - theirs[s] for s in sorted(set(mine) & set(theirs))]
    if not diffs:
        return None
    mean, sd = _mean_sd(diffs)
    return mean, sd / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan"), len(diffs)


def summarise(report):
    """{key: {"label", "parent", "abs": {(metric, steps): (mean, sd)},
    "delta": {(metric, steps): (mean, se, n) or None}, "c": [mean c per stage]}}."""
    table = {}
    for key, label, parent, _ in VARIANTS:
        rows = [r for r in report["rows"] if r["key"] == key]
        if not rows:
            continue
        cs = [[st["c"] for st in r["stages"]] for r in rows]
        table[key] = {
            "label": label, "parent": parent, "n": len(rows),
            "abs": {(m, k): _mean_sd([r[k][m] for r in rows]) for m, _ in METRICS for k in ("1", "2")},
            "delta": {(m, k): paired(report, key, m, k) for m, _ in METRICS for k in ("1", "2")},
            "c": [statistics.fmean(col) for col in zip(*cs)],
        }
    return table


def _pm(mean, spread, digits):
    """``mean ± spread`` with ``digits`` decimals; a non-zero value that would round to 0
    at that precision (a small but real paired difference) is written in e-notation
    instead, so that "0.0 ± 0.0" means a tie (|mean| < 1e-9: float rounding of equal
    metrics, e.g. -5.6e-17, counts as a tie)."""
    small = 1e-9 <= abs(mean) < 0.5 * 10 ** -digits
    mean = mean if abs(mean) >= 1e-9 else 0.0
    fmt = (lambda v: f"{v:.1e}") if small else (lambda v: f"{v:.{digits}f}")
    if math.isnan(spread):
        return fmt(mean)
    return f"{fmt(mean)} ± {fmt(spread)}"


def markdown_table(report, command):
    """The ablation as Markdown: absolute values (mean ± std over seeds), then the paired
    differences against each row's parent (mean ± standard error over seeds)."""
    table = summarise(report)
    lines = [f"Command: `{command}`", "",
             f"Budget {report['budget']} steps per run, {report['seeds']} seed(s), "
             f"{report['n_eval']} samples per metric; held-out digits; digit classifier "
             f"held-out accuracy {report['classifier_test_accuracy']:.4f}; "
             + (f"{report['seconds'] / 60:.1f} min in all" if "seconds_per_report" not in report
                else f"{len(report['seconds_per_report'])} merged runs of "
                     + ", ".join(f"{t / 60:.1f}" for t in report["seconds_per_report"]) + " min")
             + f" on {report.get('cpus', '?')} CPUs "
             f"(1-min load average {report.get('loadavg_start', float('nan')):.1f} at the start, "
             f"{report.get('loadavg_mean', float('nan')):.1f} on average after each run).", "",
             "Absolute values (mean ± std over seeds):", "",
             "| row | seeds | FD 1-NFE ↓ | FD 2-NFE ↓ | recall 1-NFE ↑ | recall 2-NFE ↑ | precision 1-NFE ↑ | precision 2-NFE ↑ |",
             "|---|---|---|---|---|---|---|---|"]
    for key, cells in table.items():
        fmt = [_pm(*cells["abs"][(m, k)], 1 if m == "fd" else 3)
               for m in ("fd", "recall", "precision") for k in ("1", "2")]
        lines.append(f"| {cells['label']} | {cells['n']} | " + " | ".join(fmt) + " |")
    lines += ["", "Paired difference against the parent row, per seed (mean ± standard error; "
              "negative ΔFD and positive Δrecall/Δprecision are improvements):", "",
              "| row | parent | ΔFD 1-NFE | ΔFD 2-NFE | Δrecall 1-NFE | Δrecall 2-NFE | Δprecision 1-NFE | Δprecision 2-NFE |",
              "|---|---|---|---|---|---|---|---|"]
    for key, cells in table.items():
        if cells["parent"] is None:
            continue
        fmt = []
        for m in ("fd", "recall", "precision"):
            for k in ("1", "2"):
                d = cells["delta"][(m, k)]
                fmt.append("–" if d is None else _pm(d[0], d[1], 1 if m == "fd" else 3))
        parent = table.get(cells["parent"], {"label": cells["parent"]})["label"]
        lines.append(f"| {cells['label']} | {parent} | " + " | ".join(fmt) + " |")
    lines += ["", "c per curriculum stage (kernel units, mean over seeds):", "",
              "| row | " + " | ".join(f"s={st['s']}" for st in report["rows"][0]["stages"]) + " |",
              "|---|" + "---|" * len(report["rows"][0]["stages"])]
    for key, cells in table.items():
        lines.append(f"| {cells['label']} | " + " | ".join(f"{c:.4g}" for c in cells["c"]) + " |")
    return "\n".join(lines) + "\n"


def bar_plot(report, path):
    """Left: FD at 1 and 2 NFE per row (mean ± std); right: paired ΔFD against the parent
    (mean ± standard error)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    table = summarise(report)
    keys = list(table)
    labels = [table[k]["label"] for k in keys]
    x = np.arange(len(keys))
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.6))
    for offset, k in ((-0.2, "1"), (0.2, "2")):
        means = [table[n]["abs"][("fd", k)][0] for n in keys]
        sds = [np.nan_to_num(table[n]["abs"][("fd", k)][1]) for n in keys]
        ax.bar(x + offset, means, 0.4, yerr=sds, capsize=3, label=f"{k} NFE")
        deltas = [table[n]["delta"][("fd", k)] for n in keys]
        bx.bar(x + offset, [d[0] if d else 0 for d in deltas], 0.4,
               yerr=[np.nan_to_num(d[1]) if d else 0 for d in deltas], capsize=3, label=f"{k} NFE")
    for a, title in ((ax, "FD (mean ± std over seeds)"),
                     (bx, "ΔFD against the parent row (mean ± s.e., paired)")):
        a.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
        a.set_title(title, fontsize=10)
        a.grid(axis="y", alpha=0.3)
        a.legend()
    bx.axhline(0, color="k", lw=0.8)
    ax.set_ylabel("FD in digit-classifier features (lower is better)")
    fig.suptitle(f"sLCT ablation on the embedded digits ({report['budget']} steps, "
                 f"{report['seeds']} seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
