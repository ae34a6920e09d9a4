"""Outlier statistics of a latents file (``lct-inspect``, issue 13, step 5).

Definitions (z: the latents standardised per element over the N samples, with the
population std, i.e. in units of each element's sigma, as the trainer sees them):
* per-channel excess kurtosis: E[(v - mean)^4] / var^2 - 3 over all values v of the
  channel (N * H * W of them); 0 for a Gaussian, 3 for a Laplace;
* the fraction of elements with |z| > 4 (2 (1 - Phi(4)) = erfc(4 / sqrt 2) = 6.33e-5 for N(0, 1));
* the largest |z|.
The references are numpy/scipy in float64.
"""

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats as st

from lct_kernels.train.cli import inspect_main
from lct_kernels.train.latent_report import format_outlier_report, outlier_stats


def _latents(seed=0):
    rng = np.random.default_rng(seed)
    n = 4000
    gauss = rng.standard_normal((n, 1, 4, 4))
    laplace = rng.laplace(size=(n, 1, 4, 4))
    spiky = rng.standard_normal((n, 1, 4, 4))
    spiky[rng.random(spiky.shape) < 0.002] *= 12.0          # impulsive outliers
    return np.concatenate([gauss * 3 + 1, laplace * 0.2, spiky], axis=1)


def _reference(x):
    z = (x - x.mean(0)) / x.std(0)
    kurt = [st.kurtosis(z[:, c].ravel(), fisher=True, bias=True) for c in range(x.shape[1])]
    return z, kurt


def test_outlier_stats_against_scipy():
    x = _latents()
    z, kurt = _reference(x)
    got = outlier_stats(torch.tensor(x, dtype=torch.float32))
    assert got["kurtosis_per_channel"] == pytest.approx(kurt, abs=2e-3)
    assert got["frac_beyond_4sigma"] == pytest.approx(float((np.abs(z) > 4).mean()), abs=1e-7)
    assert got["max_abs_z"] == pytest.approx(float(np.abs(z).max()), rel=1e-4)
    assert got["n"] == 4000 and got["shape"] == [3, 4, 4]
    # the three channels as built: Gaussian ~0, Laplace ~3, the spiky one far above
    assert abs(got["kurtosis_per_channel"][0]) < 0.3
    assert abs(got["kurtosis_per_channel"][1] - 3.0) < 0.6
    assert got["kurtosis_per_channel"][2] > 10
    assert got["gaussian_frac_beyond_4sigma"] == pytest.approx(math.erfc(4 / math.sqrt(2)))


def test_outlier_stats_rejects_bad_input():
    with pytest.raises(ValueError, match=r"outlier_stats: latents"):
        outlier_stats(torch.zeros(1, 2, 2, 2))
    with pytest.raises(ValueError, match=r"outlier_stats: latents"):
        outlier_stats(torch.tensor([float("nan")] * 8).view(4, 2))
    with pytest.raises(ValueError, match=r"outlier_stats: threshold"):
        outlier_stats(torch.randn(5, 2, 2, 2), threshold=0)


def test_report_names_every_statistic():
    text = format_outlier_report(outlier_stats(torch.tensor(_latents(), dtype=torch.float32)))
    for word in ("kurtosis", "4 sigma", "max |z|", "Gaussian"):
        assert word in text


def test_lct_inspect_cli(tmp_path, capsys):
    path = tmp_path / "lat.npy"
    np.save(path, _latents().astype(np.float32))
    out = tmp_path / "stats.json"
    assert inspect_main(["--latents", str(path), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "kurtosis" in printed and str(path) in printed
    saved = json.loads(out.read_text())
    assert saved["kurtosis_per_channel"][2] > 10
    assert inspect_main(["--latents", str(tmp_path / "missing.npy")]) == 1
    assert "lct-inspect: error" in capsys.readouterr().err
