"""lct-ablate's rows and its paired statistics (issue 13, step 6), without training.

Contract: each row differs from its parent row in exactly one setting, in the paper's
order (iCT -> Cauchy -> diffusion loss -> OT -> adaptive c -> NsLN), the adaptive-c
step three ways (paper, anchored, measured) against the OT row; the backend is never
part of a row.  For a row r with parent p and seeds 0..n-1 the paired difference is
d_k = metric(r, k) - metric(p, k), reported as mean(d) and its standard error
stdev(d) / sqrt(n) (stdev with n - 1), next to the absolute mean ± stdev.
"""

import json
import math
import statistics

import pytest

from lct_kernels.eval import ablation as A
from lct_kernels.train.cli import ablate_main


def test_rows_follow_the_paper_order_one_change_each():
    keys = [v[0] for v in A.VARIANTS]
    assert keys == ["ict", "cauchy", "diff", "ot", "c_paper", "c_anchored", "c_measured", "nsln"]
    parents = {v[0]: v[2] for v in A.VARIANTS}
    assert parents == {"ict": None, "cauchy": "ict", "diff": "cauchy", "ot": "diff",
                       "c_paper": "ot", "c_anchored": "ot", "c_measured": "ot", "nsln": "c_paper"}
    base = A.variant_config({}, 10, 0)
    fields = lambda cfg: {f"{s}.{k}": v for s, sec in cfg.to_dict().items() for k, v in sec.items()}  # noqa: E731
    by_key = {v[0]: fields(A.variant_config(v[3], 10, 0)) for v in A.VARIANTS}
    for key, parent in parents.items():
        if parent is None:
            continue
        changed = {k for k in by_key[key] if by_key[key][k] != by_key[parent][k]}
        if key.startswith("c_"):
            assert changed <= {"objective.adaptive_c", "objective.c_schedule"} and (
                "objective.adaptive_c" in changed), (key, changed)
        else:
            assert len(changed) == 1, (key, changed)
    # the same backend and the exact paper NsLN (no extra biases) in every row
    assert {f["model.fused"] for f in by_key.values()} == {base.model.fused}
    assert {f["model.norm_bias"] for f in by_key.values()} == {False}
    assert by_key["nsln"]["model.norm"] == "nsln" and by_key["c_paper"]["model.norm"] == "layernorm"
    assert {by_key[k]["objective.c_schedule"] for k in ("c_paper", "c_anchored", "c_measured")} == {
        "paper", "anchored", "measured"}


def _report():
    rows = []
    values = {"ict": [100.0, 90.0, 110.0], "cauchy": [80.0, 85.0, 70.0], "diff": [81.0, 84.0, 75.0]}
    for key, fds in values.items():
        label = A._BY_KEY[key][1]
        for seed, fd in enumerate(fds):
            rows.append({"variant": label, "key": key, "seed": seed, "final_loss": 0.0,
                         "stages": [{"s": 10, "c": 0.003}, {"s": 20, "c": 0.001 * (seed + 1)}],
                         "1": {"fd": fd, "recall": 0.5, "precision": 0.6},
                         "2": {"fd": fd / 2, "recall": 0.5, "precision": 0.6}})
    return {"budget": 10, "seeds": 3, "n_eval": 100, "seconds": 60.0, "rows": rows,
            "classifier_test_accuracy": 0.99}, values


def test_paired_difference_and_standard_error():
    report, v = _report()
    d = [a - b for a, b in zip(v["cauchy"], v["ict"])]          # -20, -5, -40
    mean, se, n = A.paired(report, "cauchy", "fd", "1")
    assert (mean, n) == (pytest.approx(statistics.fmean(d)), 3)
    assert se == pytest.approx(statistics.stdev(d) / math.sqrt(3))
    assert A.paired(report, "ict", "fd", "1") is None
    table = A.summarise(report)
    assert table["cauchy"]["abs"][("fd", "2")] == (pytest.approx(statistics.fmean(v["cauchy"]) / 2),
                                                   pytest.approx(statistics.stdev(v["cauchy"]) / 2))
    assert table["diff"]["c"] == pytest.approx([0.003, 0.002])
    text = A.markdown_table(report, "lct-ablate --budget 10")
    assert f"{statistics.fmean(d):.1f} ± {statistics.stdev(d) / math.sqrt(3):.1f}" in text


def test_from_json_rewrites_the_report(tmp_path):
    report, _ = _report()
    path = tmp_path / "ablation.json"
    path.write_text(json.dumps(report))
    assert ablate_main(["--from-json", str(path), "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "ablation.md").read_text().count("\n| ") >= 6
    assert (tmp_path / "o" / "ablation.png").stat().st_size > 1000


def test_merge_reports_of_seeds_run_side_by_side(tmp_path):
    report, _ = _report()
    a = {**report, "rows": [r for r in report["rows"] if r["seed"] < 2]}
    b = {**report, "rows": [r for r in report["rows"] if r["seed"] == 2], "seconds": 99.0}
    merged = A.merge_reports([a, b])
    assert merged["seeds"] == 3 and merged["seconds"] == 99.0 and merged["processes"] == 2
    assert A.summarise(merged)["cauchy"]["delta"] == A.summarise(report)["cauchy"]["delta"]
    with pytest.raises(ValueError, match="merge_reports"):
        A.merge_reports([a, a])
    for i, part in enumerate((a, b)):
        (tmp_path / f"{i}.json").write_text(json.dumps(part))
    assert ablate_main(["--from-json", str(tmp_path / "0.json"), str(tmp_path / "1.json"),
                        "--out", str(tmp_path / "m")]) == 0
    assert json.loads((tmp_path / "m" / "ablation.json").read_text())["seeds"] == 3


def test_a_small_real_difference_is_not_printed_as_an_exact_tie():
    # "0.0 ± 0.0" must mean identical results; a paired ΔFD of 0.004 (the NsLN row's size
    # at a short budget) is written in e-notation instead of rounding to 0.0
    report, _ = _report()
    for row in report["rows"]:
        if row["key"] == "diff":
            row["1"]["fd"] = next(r["1"]["fd"] for r in report["rows"]
                                  if r["key"] == "cauchy" and r["seed"] == row["seed"]) + 0.004 * (row["seed"] + 1)
    text = A.markdown_table(report, "x")
    line = next(l for l in text.splitlines() if l.startswith("| + diffusion loss | + Cauchy"))
    d = [0.004, 0.008, 0.012]
    assert f"{statistics.fmean(d):.1e} ± {statistics.stdev(d) / math.sqrt(3):.1e}" in line
    assert "| 0.0 ± 0.0 |" not in line
    assert A._pm(0.0, 0.0, 1) == "0.0 ± 0.0"
    assert A._pm(-5.6e-17, 0.026, 3) == "0.000 ± 0.026"  # equal metrics up to float rounding
