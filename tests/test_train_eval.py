"""lct-eval, the trainer's periodic evaluation, and lct-ablate (CPU, embedded digits)."""

import csv
import json

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from lct_kernels.train.cli import ablate_main, eval_main, train_main  # noqa: E402
from lct_kernels.eval.evaluate import check_real_data_inputs  # noqa: E402


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("lct_eval_cache")


def tiny(cache_dir, **extra):
    items = {"data.cache_dir": str(cache_dir), "data.ae_steps": 150, "model.depth": 1,
             "model.hidden_size": 32, "model.num_heads": 2, "optim.batch_size": 32,
             "run.progress": False, "run.tensorboard": False, "run.device": "cpu"}
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("run")
    assert train_main(["--out", str(out), *tiny(cache_dir, **{
        "run.steps": 20, "run.log_every": 10, "run.eval_every": 10, "run.eval_n": 40,
        "run.ckpt_every": 100})]) == 0
    return out


def test_trainer_logs_periodic_evaluation(trained_run):
    with open(trained_run / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [10, 20]
    for r in rows:
        for key in ("fd_1step", "fd_2step", "recall_1step", "precision_2step"):
            assert np.isfinite(float(r[key])), key
        assert 0 <= float(r["recall_1step"]) <= 1


def test_lct_eval_writes_json_and_panel(trained_run, tmp_path, monkeypatch, cache_dir):
    monkeypatch.setenv("LCT_CACHE_DIR", str(cache_dir))
    out = tmp_path / "eval"
    assert eval_main(["--ckpt", str(trained_run), "--n", "60", "--out", str(out)]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert (out / "eval_panel.png").is_file()
    assert report["classifier_test_accuracy"] > 0.9
    assert report["fd_train_vs_heldout"] >= 0
    assert set(report["steps"]) == {"1", "2"}
    for entry in report["steps"].values():
        assert entry["fd"] > report["fd_train_vs_heldout"]  # 20 steps: far from the data
        assert 0 <= entry["precision"] <= 1 and 0 <= entry["recall"] <= 1
        assert sum(entry["class_histogram"]) == 60 and 0 < entry["class_coverage"] <= 1
        assert entry["sliced_wasserstein_latent"] > 0
        assert 0 <= entry["label_agreement"] <= 1
    assert eval_main(["--ckpt", str(trained_run), "--steps", "1", "--n", "20",
                      "--out", str(tmp_path / "one")]) == 0
    assert set(json.loads((tmp_path / "one" / "eval.json").read_text())["steps"]) == {"1"}


def test_fid_on_real_data_never_downloads_and_says_what_to_provide(trained_run, tmp_path, capsys):
    real = tmp_path / "real"
    real.mkdir()
    with pytest.raises(FileNotFoundError, match="--inception-weights"):
        check_real_data_inputs(real, None)
    with pytest.raises(FileNotFoundError, match="--inception-weights"):
        check_real_data_inputs(real, tmp_path / "missing.pth")
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="--real"):
        check_real_data_inputs(tmp_path / "nope", weights)
    rc = eval_main(["--ckpt", str(trained_run), "--real", str(real), "--out", str(tmp_path / "e")])
    assert rc == 1
    err = capsys.readouterr().err
    assert "--inception-weights" in err and "nothing is downloaded" in err
    assert not (tmp_path / "e").exists()  # failed before sampling anything


def test_lct_ablate_writes_a_table_and_a_plot(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setenv("LCT_CACHE_DIR", str(cache_dir))
    out = tmp_path / "abl"
    # budget 10: 5 curriculum stages of 2 steps, so the measured-c row measures 1 batch each
    rc = ablate_main(["--budget", "10", "--seeds", "2", "--n", "20", "--out", str(out),
                      *tiny(cache_dir, **{"optim.batch_size": 16,
                                          "objective.c_measure_batches": 1})])
    assert rc == 0
    table = (out / "ablation.md").read_text()
    lines = table.splitlines()
    first = lines.index(next(line for line in lines if line.startswith("| row | seeds")))
    rows = []  # the absolute-values table: its rows up to the blank line after it
    for line in lines[first + 2:]:
        if not line.startswith("| "):
            break
        rows.append(line)
    assert len(rows) == 8
    assert any(line.startswith("| row | parent") for line in lines)  # the paired table
    assert rows[0].startswith("| iCT baseline") and rows[7].startswith("| + NsLN (on paper c) = sLCT")
    assert "±" in rows[0] and "lct-ablate --budget 10" in table
    assert (out / "ablation.png").is_file()
    report = json.loads((out / "ablation.json").read_text())
    assert len(report["rows"]) == 16 and {r["seed"] for r in report["rows"]} == {0, 1}


def test_sigma_mid_search_picks_the_value_it_reports(trained_run, tmp_path, monkeypatch, cache_dir):
    monkeypatch.setenv("LCT_CACHE_DIR", str(cache_dir))
    out = tmp_path / "search"
    assert eval_main(["--ckpt", str(trained_run), "--steps", "2", "--n", "20",
                      "--search-sigma-mid", "--out", str(out)]) == 0
    report = json.loads((out / "eval.json").read_text())
    search = report["sigma_mid_search"]
    assert len(search["history"]) == 12
    assert search["fd"] == min(fd for _, fd in search["history"])
    assert report["steps"]["2"]["sigma_mid"] == pytest.approx(search["best"])
    assert 0.05 <= search["best"] <= 10.0


def test_real_data_route_writes_pngs_and_passes_the_local_weights(trained_run, tmp_path, monkeypatch):
    """The torch-fidelity call itself is stubbed (no Inception weights here): this checks
    our side of it, i.e. generated PNGs, both folders and the weights path are handed over."""
    import sys
    import types

    calls = {}

    def calculate_metrics(**kwargs):
        calls.update(kwargs)
        return {"frechet_inception_distance": 12.5, "precision": 0.5, "recall": 0.25}

    monkeypatch.setitem(sys.modules, "torch_fidelity",
                        types.SimpleNamespace(calculate_metrics=calculate_metrics))
    real = tmp_path / "real"
    real.mkdir()
    weights = tmp_path / "pt_inception.pth"  # only the two tensors lct-eval checks
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3),
                "fc.weight": torch.zeros(1008, 2048)}, weights)
    out = tmp_path / "fid"
    assert eval_main(["--ckpt", str(trained_run), "--steps", "1", "--n", "30", "--real", str(real),
                      "--inception-weights", str(weights), "--out", str(out)]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["steps"]["1"] == {"fid": 12.5, "precision": 0.5, "recall": 0.25}
    assert calls["feature_extractor_weights_path"] == str(weights)
    assert calls["input2"] == str(real) and calls["fid"] and calls["prc"]
    # precision/recall on the same Inception features (torch-fidelity's PRC default is VGG16)
    assert calls["feature_extractor"] == "inception-v3-compat" and calls["samples_find_deep"]
    pngs = sorted((out / "generated_1step").glob("*.png"))
    assert len(pngs) == 30 and calls["input1"] == str(out / "generated_1step")
