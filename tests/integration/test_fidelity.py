"""``lct-eval --real DIR --inception-weights FILE`` through torch-fidelity's own code.

FILE is a randomly initialised torch-fidelity ``FeatureExtractorInceptionV3`` state
dict saved here (the values are meaningless, the wiring is real).  The FID and the
precision/recall that lct-eval reports are recomputed independently in float64
from the same extractor's 2048-d pool features of the same images:

    FID = ||mu_g - mu_r||^2 + tr S_g + tr S_r - 2 tr sqrt(S_g S_r),
    tr sqrt(S_g S_r) = sum of the singular values of Xg Xr^T / sqrt((n_g - 1)(n_r - 1))
    (Xg, Xr the centred feature rows: the nonzero eigenvalues of S_g S_r are those of
    (Xg Xr^T)(Xg Xr^T)^T / ((n_g - 1)(n_r - 1)));
    recall = fraction of real samples within the k-th nearest-neighbour radius (k = 3,
    self excluded) of some generated sample; precision the same with the roles swapped.

A missing, unreadable or wrong weights file stops lct-eval before sampling with a
message naming --inception-weights.
"""

import json
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

tf = pytest.importorskip("torch_fidelity")
pytest.importorskip("diffusers")
from torch_fidelity import feature_extractor_inceptionv3 as fe_mod  # noqa: E402

from integration_support import CLASSES, PER_CLASS, run_cli  # noqa: E402

K = 3
N_GEN = 10


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A random-init FeatureExtractorInceptionV3 state dict (torch-fidelity's layout)."""
    torch.manual_seed(0)
    cls = fe_mod.FeatureExtractorInceptionV3
    # construct without the download / load that __init__ always performs
    with mock.patch.object(fe_mod, "load_state_dict_from_url", return_value={}), \
            mock.patch.object(cls, "load_state_dict", lambda self, sd, *a, **k: None):
        fe = cls("inception-v3-compat", ["2048"])
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(fe.state_dict(), path)
    return path


def pool_features(weights, files):
    """(n, 2048) float64 pool features of PNG files with the extractor loaded from ``weights``
    through torch-fidelity's local-path API."""
    from PIL import Image

    fe = fe_mod.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                            feature_extractor_weights_path=str(weights))
    x = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1)
                     for f in files])
    with torch.no_grad():
        (feats,) = fe(x)
    return feats.double()


def fid64(g, r):
    gc, rc = g - g.mean(0), r - r.mean(0)
    tr_g = (gc * gc).sum() / (len(g) - 1)
    tr_r = (rc * rc).sum() / (len(r) - 1)
    cross = torch.linalg.svdvals(gc @ rc.T).sum() / np.sqrt((len(g) - 1) * (len(r) - 1))
    return float(((g.mean(0) - r.mean(0)) ** 2).sum() + tr_g + tr_r - 2 * cross)


def inside_fraction(points, centres, k=K):
    """Fraction of ``points`` within some centre's k-th nearest-neighbour radius."""
    radii = torch.cdist(centres, centres).sort(dim=1).values[:, k]  # column 0 is the centre
    return float((torch.cdist(points, centres) <= radii[None, :]).any(dim=1).double().mean())


def test_lct_eval_fid_and_recall_match_torch_fidelity_features(images_run, image_folder,
                                                              inception_weights, tmp_path):
    out = tmp_path / "eval"
    proc = run_cli("lct-eval", ["--ckpt", images_run, "--real", image_folder, "--inception-weights",
                                inception_weights, "--n", N_GEN, "--steps", "1", "--out", out,
                                "--device", "cpu"], tmp_path)
    assert proc.returncode == 0, f"lct-eval failed:\n{proc.stdout}\n{proc.stderr}"
    result = json.loads((out / "eval.json").read_text())["steps"]["1"]
    generated = sorted((out / "generated_1step").glob("*.png"))
    real = sorted(Path(image_folder).rglob("*.png"))  # class subfolders: searched recursively
    assert len(generated) == N_GEN and len(real) == PER_CLASS * len(CLASSES)
    g, r = pool_features(inception_weights, generated), pool_features(inception_weights, real)
    assert g.shape == (N_GEN, 2048) and torch.isfinite(g).all()
    want = fid64(g, r)
    assert want > 0
    assert result["fid"] == pytest.approx(want, rel=1e-3)
    assert result["recall"] == pytest.approx(inside_fraction(r, g), abs=1e-9)
    assert result["precision"] == pytest.approx(inside_fraction(g, r), abs=1e-9)


@pytest.mark.parametrize("case", ["missing", "corrupt", "wrong-dict", "not-a-dict"])
def test_bad_inception_weights_are_a_clear_error(case, images_run, image_folder, tmp_path):
    path = tmp_path / "weights.pth"
    if case == "corrupt":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif case == "wrong-dict":
        torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3),
                    "fc.weight": torch.zeros(10, 2048)}, path)
    elif case == "not-a-dict":
        torch.save([torch.zeros(3)], path)
    proc = run_cli("lct-eval", ["--ckpt", images_run, "--real", image_folder,
                                "--inception-weights", path, "--n", N_GEN, "--steps", "1",
                                "--out", tmp_path / "eval", "--device", "cpu"], tmp_path)
    assert proc.returncode == 1, proc.stderr
    msg = proc.stderr
    assert msg.startswith("lct-eval: error:") and "Traceback" not in msg, msg
    assert "inception" in msg.lower(), msg
    expected = {"missing": "--inception-weights FILE", "corrupt": "not a readable torch file",
                "wrong-dict": "fc.weight should have shape (1008, 2048)",
                "not-a-dict": "not a state dict"}[case]
    assert expected in msg, msg
    assert not (tmp_path / "eval").exists()  # refused before any sampling
